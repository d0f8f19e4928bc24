# Two entry points for a fresh machine: `make demo` (the main job) and `make test` (lint + the test suite
# on the TensorFlow, JAX and PyTorch backends). Both build .venv from this repo's own files first.
# CI (.ci/run) also runs `make test-keras-lowest` (the lowest Keras setup.cfg allows) and `make docs`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DOCS_STAMP := $(VENV)/.installed-docs
BACKENDS ?= tensorflow jax torch
PYTEST_ARGS ?=

# The lowest-Keras pass: its own venv, pinned by constraints/keras-lowest.txt. On TensorFlow and JAX
# (LOWEST_TESTS): the trainer hooks and the internals contracts (JAX's trainer state is JAX-only). On
# TensorFlow only (LOWEST_TF_TESTS): loading members, the graphs, fusion and export, whose Keras internals
# (functional graph, saving) are the same Python on every backend and are the slowest tests on JAX; the
# main pass runs them on every backend on the newest Keras. A listed file that does not exist is skipped.
LOWEST_VENV := .venv-keras-lowest
LOWEST_BIN := $(LOWEST_VENV)/bin
LOWEST_STAMP := $(LOWEST_VENV)/.installed
LOWEST_CONSTRAINTS := constraints/keras-lowest.txt
LOWEST_BACKENDS ?= tensorflow jax
LOWEST_TESTS ?= tests/test_callback.py tests/test_schedule.py tests/test_resume.py tests/test_keras_internals.py \
  tests/test_other_callbacks.py tests/test_manifest.py tests/test_step_updates.py tests/test_swa.py
LOWEST_TF_TESTS ?= tests/test_ensemble.py tests/test_fusion.py tests/test_export.py tests/test_abstain.py

# One line with the versions a pass runs on (from the installed packages' metadata: nothing is imported).
VERSIONS_PY := import importlib.metadata as md, platform; \
  v = {d.metadata["Name"].lower().replace("_", "-"): d.version for d in md.distributions()}; \
  names = ("keras", "tensorflow-cpu", "tensorflow", "jax", "jaxlib", "torch", "numpy"); \
  print("versions: " + ", ".join(["python " + platform.python_version()] + [n + " " + v[n] for n in names if n in v]))

.PHONY: install install-keras-lowest test test-keras-lowest lint docs docs-serve demo clean

$(STAMP): setup.cfg setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU wheel of torch; an unpinned torch would pull the multi-GB CUDA build.
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[cpu,jax,torch,plots,test]"
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	@$(BIN)/python -c '$(VERSIONS_PY)'
	@set -e; for backend in $(BACKENDS); do \
	  echo "=== pytest, KERAS_BACKEND=$$backend ==="; \
	  KERAS_BACKEND=$$backend $(BIN)/python -m pytest -q $(PYTEST_ARGS); \
	done

$(LOWEST_STAMP): setup.cfg setup.py $(LOWEST_CONSTRAINTS)
	$(PYTHON) -m venv $(LOWEST_VENV)
	$(LOWEST_BIN)/python -m pip install -q --upgrade pip
	$(LOWEST_BIN)/python -m pip install -q -c $(LOWEST_CONSTRAINTS) -e ".[cpu,jax,test]"
	touch $(LOWEST_STAMP)

install-keras-lowest: $(LOWEST_STAMP)

test-keras-lowest: install-keras-lowest
	@want=$$(sed -n 's/^keras==//p' $(LOWEST_CONSTRAINTS)); \
	  have=$$($(LOWEST_BIN)/python -c 'import importlib.metadata as md; print(md.version("keras"))'); \
	  if [ "$$have" != "$$want" ]; then echo "$(LOWEST_VENV) has keras $$have, not $$want"; exit 1; fi
	@$(LOWEST_BIN)/python -c '$(VERSIONS_PY)'
	@for f in $(LOWEST_TESTS) $(LOWEST_TF_TESTS); do [ -f "$$f" ] || echo "(not there yet, skipped: $$f)"; done; \
	  if [ -z "$(wildcard $(LOWEST_TESTS))" ]; then echo "no test file of LOWEST_TESTS exists"; exit 1; fi; \
	  set -e; for backend in $(LOWEST_BACKENDS); do \
	    files="$(wildcard $(LOWEST_TESTS))"; \
	    if [ "$$backend" = tensorflow ]; then files="$$files $(wildcard $(LOWEST_TF_TESTS))"; fi; \
	    echo "=== pytest, lowest Keras, KERAS_BACKEND=$$backend ==="; \
	    KERAS_BACKEND=$$backend $(LOWEST_BIN)/python -m pytest -q $(PYTEST_ARGS) $$files; \
	  done

# The documentation site (mkdocs.yml, docs/): `make docs` builds it strictly into site/ (CI runs this),
# `make docs-serve` serves it at http://127.0.0.1:8000 while you edit. NO_MKDOCS_2_WARNING silences
# mkdocs-material 9.8's banner (Material for MkDocs reaches end of life on 2027-05-05; Zensical succeeds it).
$(DOCS_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e ".[docs]"
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	@if [ ! -f mkdocs.yml ]; then echo "docs: no mkdocs.yml in this tree yet, nothing to build (skipped)"; exit 0; fi; \
	  NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

docs-serve: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

# The demo's data: Fashion-MNIST from the Debian package dataset-fashion-mnist, installed only when missing
# (make demo DEMO_ARGS="--dataset digits" needs nothing but scikit-learn).
FASHION_MNIST_DIR ?= /usr/share/datasets/fashion-mnist
DEMO_ARGS ?=
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

demo: install
	@if ! echo " $(DEMO_ARGS) " | grep -Eq -- "--data-dir|--dataset[ =](digits|mnist5k|cifar10|cifar100|mnist) " \
	    && [ ! -f "$(FASHION_MNIST_DIR)/train-images-idx3-ubyte.gz" ]; then \
	  echo "Fashion-MNIST is not in $(FASHION_MNIST_DIR): installing the Debian package dataset-fashion-mnist"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist \
	    || echo "Could not install dataset-fashion-mnist; try: make demo DEMO_ARGS=\"--dataset digits\""; \
	fi
	FASHION_MNIST_DIR=$(FASHION_MNIST_DIR) $(BIN)/python examples/demo.py $(DEMO_ARGS)

clean:
	rm -rf $(VENV) $(LOWEST_VENV) site .pytest_cache .ruff_cache build *.egg-info
