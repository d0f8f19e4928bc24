"""Greedy ensemble selection with replacement (Caruana et al., ICML 2004)."""
