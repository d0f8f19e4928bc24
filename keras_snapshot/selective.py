"""Acting on uncertainty, measured in numpy: selective prediction and out-of-distribution detection.

Plain numpy functions (float64 inside) on scores already computed; `evaluate_ensemble` reports
them for every row, and `build_ensemble(..., abstain_coverage=c)` serves the abstain decision fitted
with `coverage_threshold`.

Selective prediction (a model that may abstain). `confidence` is (N,), higher = more sure (the max
probability); `wrong` is (N,) booleans, True where the top-1 class is not the label. Rows are
ranked by confidence, most confident first; rows of equal confidence are averaged over (the
result is the expectation over every order of the tied rows, so it never depends on the order of
the data): each row's error counts as the mean error of its tie group.

- `aurc`: area under the risk-coverage curve (Geifman & El-Yaniv, 2017): the mean over
  k = 1..N of (errors among the k most confident rows) / k. Lower is better.
- `augrc`: area under the generalised risk-coverage curve (Traub et al., 2024): the mean over
  k = 1..N of (errors among the k most confident rows) / N, the rate of "accepted and wrong".
  Lower is better; unlike AURC it does not weigh the few most confident rows heavily.
- `error_at_coverage(confidence, wrong, c)`: the error rate among the k = ceil(c * N) most
  confident rows.

Out-of-distribution detection. `scores_in` and `scores_out` are uncertainty scores (higher = more
likely OOD) of in-distribution and OOD rows; OOD is the positive class.

- `auroc`: the probability that a random OOD row scores higher than a random in-distribution row,
  ties counting one half (= `sklearn.metrics.roc_auc_score`). 0.5 = chance, 1 = separated.
- `aupr`: average precision with OOD positive (= `sklearn.metrics.average_precision_score`):
  sum over the distinct thresholds t, from high to low, of (recall(t) - recall(previous t)) *
  precision(t), flagging the rows with score >= t.
- `fpr95`: flag rows with score >= t, t the largest threshold that flags at least 95 % of the
  OOD rows (the first point of the ROC curve with TPR >= 0.95); the fraction of in-distribution
  rows flagged there. Lower is better.

Serving a decision:

- `coverage_threshold(scores, c)`: a threshold t such that the rows with score <= t (kept) are
  as close as possible to a fraction c of the rows (ties in the scores can make an exact c
  impossible; then the nearest achievable fraction, the smaller on a tie).
"""

from __future__ import annotations

import numbers

import numpy as np

__all__ = [
    "augrc",
    "aupr",
    "aurc",
    "auroc",
    "coverage_threshold",
    "error_at_coverage",
    "fpr95",
    "ood_metrics",
    "selective_metrics",
]

COVERAGES = (0.8, 0.9, 0.95)  # the coverages evaluate_ensemble reports the error at


# ---------------------------------------------------------------------------------------- checks
def _scores(values, what: str) -> np.ndarray:
    values = np.asarray(values, dtype="float64").reshape(-1) if np.ndim(values) else np.asarray([])
    if values.size == 0:
        raise ValueError(f"`{what}` must hold at least one score, got none.")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"`{what}` holds NaN or infinite values.")
    return values


def _pair(confidence, wrong) -> tuple[np.ndarray, np.ndarray]:
    confidence = _scores(confidence, "confidence")
    wrong = np.asarray(wrong).reshape(-1)
    if wrong.shape != confidence.shape:
        raise ValueError(
            f"`confidence` has {confidence.size} rows and `wrong` {wrong.size}: pass one of each per row."
        )
    if not np.all((wrong == 0) | (wrong == 1)):
        raise ValueError("`wrong` must hold booleans (or 0 / 1): True where the prediction is wrong.")
    return confidence, wrong.astype("float64")


def check_coverage(coverage, what: str = "coverage") -> float:
    if isinstance(coverage, bool) or not isinstance(coverage, numbers.Real):
        raise TypeError(f"`{what}` must be a number in (0, 1], got {coverage!r}.")
    coverage = float(coverage)
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"`{what}` must lie in (0, 1] (the fraction of rows kept), got {coverage!r}.")
    return coverage


# ---------------------------------------------------------------------------------------- selective
def _cumulative_errors(confidence, wrong) -> np.ndarray:
    """Expected errors among the k most confident rows, k = 1..N (ties averaged over)."""
    confidence, wrong = _pair(confidence, wrong)
    order = np.argsort(-confidence, kind="stable")
    confidence, wrong = confidence[order], wrong[order]
    # Each tie group's errors spread evenly over its positions: the mean over all orders of the group.
    _, start, counts = np.unique(-confidence, return_index=True, return_counts=True)
    group = np.repeat(np.arange(start.size), counts)
    group_errors = np.add.reduceat(wrong, start)
    return np.cumsum((group_errors / counts)[group])


def aurc(confidence, wrong) -> float:
    """Area under the risk-coverage curve: mean over k of (errors among the k most confident) / k."""
    errors = _cumulative_errors(confidence, wrong)
    return float(np.mean(errors / np.arange(1, errors.size + 1)))


def augrc(confidence, wrong) -> float:
    """Area under the generalised risk-coverage curve: mean over k of (errors among the k most
    confident) / N."""
    errors = _cumulative_errors(confidence, wrong)
    return float(np.mean(errors) / errors.size)


def error_at_coverage(confidence, wrong, coverage: float) -> float:
    """The error rate among the ceil(coverage * N) most confident rows (ties averaged over)."""
    coverage = check_coverage(coverage)
    errors = _cumulative_errors(confidence, wrong)
    # The 1e-9 keeps 0.8 * 10 = 8.000000000000002 from becoming 9.
    k = min(errors.size, max(1, int(np.ceil(coverage * errors.size - 1e-9))))
    return float(errors[k - 1] / k)


def selective_metrics(confidence, wrong) -> dict[str, float]:
    """{"aurc", "augrc", "error_at_80", "error_at_90", "error_at_95"}."""
    result = {"aurc": aurc(confidence, wrong), "augrc": augrc(confidence, wrong)}
    for coverage in COVERAGES:
        result[f"error_at_{round(100 * coverage)}"] = error_at_coverage(confidence, wrong, coverage)
    return result


# ---------------------------------------------------------------------------------------- OOD
def _labelled(scores_in, scores_out) -> tuple[np.ndarray, np.ndarray]:
    scores_in = _scores(scores_in, "scores_in")
    scores_out = _scores(scores_out, "scores_out")
    scores = np.concatenate([scores_in, scores_out])
    positive = np.concatenate([np.zeros(scores_in.size), np.ones(scores_out.size)])
    return scores, positive


def auroc(scores_in, scores_out) -> float:
    """P(score of a random OOD row > score of a random in-distribution row), ties counting 1/2."""
    scores, positive = _labelled(scores_in, scores_out)
    # Mann-Whitney U from mid-ranks (tied rows share the mean of their ranks).
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    mid_ranks = (ends - (counts - 1) / 2.0)[inverse]
    n_out = positive.sum()
    n_in = positive.size - n_out
    u = mid_ranks[positive == 1].sum() - n_out * (n_out + 1) / 2.0
    return float(u / (n_in * n_out))


def _roc_points(scores, positive):
    """(true positives, false positives) at each distinct threshold, from the highest down."""
    order = np.argsort(-scores, kind="stable")
    scores, positive = scores[order], positive[order]
    last = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]  # the last row of each tie group
    true_positives = np.cumsum(positive)[last]
    false_positives = (last + 1) - true_positives
    return true_positives, false_positives


def aupr(scores_in, scores_out) -> float:
    """Average precision with OOD rows positive (= sklearn's average_precision_score)."""
    scores, positive = _labelled(scores_in, scores_out)
    true_positives, false_positives = _roc_points(scores, positive)
    precision = true_positives / (true_positives + false_positives)
    recall = true_positives / positive.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def fpr95(scores_in, scores_out) -> float:
    """The fraction of in-distribution rows flagged (score >= t) at the largest threshold t that
    flags at least 95 % of the OOD rows."""
    scores, positive = _labelled(scores_in, scores_out)
    true_positives, false_positives = _roc_points(scores, positive)
    tpr = true_positives / positive.sum()
    index = int(np.searchsorted(tpr, 0.95 - 1e-12, side="left"))  # tpr rises; 1e-12: float rounding
    return float(false_positives[index] / (positive.size - positive.sum()))


def ood_metrics(scores_in, scores_out) -> dict[str, float]:
    """{"auroc", "aupr", "fpr95"} of an uncertainty score, OOD rows positive."""
    return {
        "auroc": auroc(scores_in, scores_out),
        "aupr": aupr(scores_in, scores_out),
        "fpr95": fpr95(scores_in, scores_out),
    }


# ---------------------------------------------------------------------------------------- serving
def coverage_threshold(scores, coverage: float) -> tuple[float, float]:
    """(t, kept): keeping the rows with score <= t keeps the fraction `kept` of `scores`, the one
    nearest `coverage` that a threshold can give (the smaller on a tie).

    t lies halfway between two consecutive distinct scores (in float32, as a served graph
    compares), so float rounding does not move a row across it; keeping every row gives t = the
    largest score + 1.
    """
    coverage = check_coverage(coverage)
    values = np.unique(_scores(scores, "scores"))  # sorted, distinct
    total = np.asarray(scores).size
    kept = np.searchsorted(np.sort(np.asarray(scores, dtype="float64").reshape(-1)), values, side="right")
    index = int(np.argmin(np.abs(kept - coverage * total)))  # nearest; argmin takes the first: fewer kept
    if index + 1 < values.size:
        threshold = (values[index] + values[index + 1]) / 2.0
        # Served graphs compare in float32: a midpoint of two neighbouring float32 scores may round
        # up onto the next score, which would then be kept too.
        if np.float32(threshold) >= np.float32(values[index + 1]):
            threshold = float(np.float32(values[index]))
    else:
        threshold = values[index] + 1.0
    return float(threshold), float(kept[index] / total)
