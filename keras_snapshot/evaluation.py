"""Accuracy, calibration and uncertainty of snapshots and their ensembles, measured in numpy.

The metrics are plain numpy functions on predictions already computed (float64 inside):

- `error(p, y)`: top-1 error rate;
- `nll(p, y)`: mean negative log-likelihood of the true class (natural log);
- `brier(p, y)`: mean over examples of the sum over classes of the squared error (not divided by
  the number of classes);
- `ece(p, y, bins=15)`: expected calibration error on the top-1 confidence, `bins` equal-width
  bins with edges (lo, hi];
- `mse(pred, y)`: mean squared error (regression);
- `entropy(p)`: entropy of each predicted distribution, in nats, shape (N,);
- `mutual_information(stack)`: entropy of the members' mean minus the mean of the members'
  entropies (the members' disagreement, epistemic uncertainty), shape (N,), never negative;
- `disagreement(stack)`: fraction of members whose top-1 class differs from the ensemble's, (N,);
- `variance(stack)`: per-example variance across members, averaged over output units, (N,).

`p` is (N, C) probabilities; a binary classifier's single sigmoid unit, (N,) or (N, 1), counts as
two classes [1 - p, p] (so its Brier score sums over both classes). `y` is integer labels, (N,)
or (N, 1), or one-hot rows (N, C) of any dtype; soft labels, NaN and inf are refused (the rules of
keras_snapshot.inputs, docs/guide/inputs.md). `stack` is the members' predictions, (M, N, C) (M members).
The NLL and temperature scaling clip probabilities to [1e-7, 1] before the logarithm, as Keras's
cross-entropies do; entropies are exact (0 log 0 = 0).

`evaluate_ensemble` runs the snapshots once and reports every member and every ensemble of the
last m snapshots.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Sequence

import keras
import numpy as np

from keras_snapshot.calibration import temperature_from_probabilities, temperature_scale
from keras_snapshot.inputs import (
    BINARY,
    CLASSES,
    EPSILON,
    check_batch_size,
    check_probabilities,
    check_temperature,
    is_one_hot,
    labels,
    looks_like_labels,
    lowest_precision,
    member_probabilities,
    output_kind,
    probabilities,
    rows_of,
    targets,
    validation_pair,
)
from keras_snapshot.members import load_members, member_graph, output_dtype, predict_taps, snapshot_sources

__all__ = ["evaluate_ensemble"]

# The names below were defined here before keras_snapshot.inputs held them; kept for importers.
check_targets = targets
_check_batch_size = check_batch_size


# ---------------------------------------------------------------------------------------- inputs
def member_weights(weights, count: int) -> np.ndarray:
    if weights is None:
        return np.full(count, 1.0 / count)
    w = np.asarray(weights, dtype="float64").reshape(-1)
    if w.size != count or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(
            f"`weights` must be {count} finite, non-negative numbers with a positive sum, got {weights!r}."
        )
    return w / w.sum()


def _classified(p, y) -> tuple[np.ndarray, np.ndarray]:
    p = probabilities(p)
    return p, labels(y, p.shape[0], p.shape[1])


# ---------------------------------------------------------------------------------------- metrics
def error(p, y) -> float:
    """Top-1 error rate: the fraction of examples whose most probable class is not the label."""
    p, y = _classified(p, y)
    return float(np.mean(np.argmax(p, axis=1) != y))


def nll(p, y) -> float:
    """Mean negative log-likelihood of the labels (natural log; probabilities clipped at 1e-7)."""
    p, y = _classified(p, y)
    return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], EPSILON, 1.0))))


def brier(p, y) -> float:
    """Mean over examples of the sum over classes of (p - one_hot(y))^2."""
    p, y = _classified(p, y)
    target = np.zeros_like(p)
    target[np.arange(len(y)), y] = 1.0
    return float(np.mean(np.sum((p - target) ** 2, axis=1)))


def ece(p, y, bins: int = 15) -> float:
    """Expected calibration error on the top-1 confidence.

    Examples fall into `bins` equal-width bins of their top-1 probability, with edges (lo, hi]
    (a confidence of exactly 0 goes to the first bin); ECE = sum over bins of
    (bin size / N) * |accuracy in the bin - mean confidence in the bin|.
    """
    bins = _check_bins(bins)
    p, y = _classified(p, y)
    confidence = np.max(p, axis=1)
    correct = (np.argmax(p, axis=1) == y).astype("float64")
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(confidence, edges, right=True) - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        inside = index == b
        if inside.any():
            total += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(total)


def mse(pred, y) -> float:
    """Mean squared error over every example and output unit."""
    pred = np.asarray(pred, dtype="float64")
    y = np.asarray(y, dtype="float64")
    if y.shape != pred.shape:
        if y.ndim == 0 or y.shape[0] != pred.shape[0]:
            raise ValueError(
                f"`y` has {y.shape[0] if y.ndim else 0} rows but the predictions have {pred.shape[0]}."
            )
        if y.size != pred.size:
            raise ValueError(
                f"`y` has shape {y.shape}, the predictions {pred.shape}: pass targets of that shape."
            )
        y = y.reshape(pred.shape)
    return float(np.mean((pred - y) ** 2))


def entropy(p) -> np.ndarray:
    """Entropy of each predicted distribution, in nats: -sum_c p_c log p_c, shape (N,)."""
    p = probabilities(p)
    positive = p > 0
    return -np.sum(np.where(positive, p * np.log(np.where(positive, p, 1.0)), 0.0), axis=1)


def mutual_information(stack, *, weights=None) -> np.ndarray:
    """Entropy of the members' mean minus the mean of the members' entropies, shape (N,).

    The epistemic part of the ensemble's uncertainty (Depeweg et al., 2018): 0 when all members
    agree. Clipped at 0 (it is never negative in exact arithmetic). `weights`: one weight per
    member for a weighted ensemble (normalised; the default is the plain mean).
    """
    stack = member_probabilities(stack)
    w = member_weights(weights, stack.shape[0])
    mean = np.tensordot(w, stack, axes=1)
    members = np.stack([entropy(member) for member in stack])
    return np.maximum(entropy(mean) - w @ members, 0.0)


def disagreement(stack, *, weights=None) -> np.ndarray:
    """Fraction of members whose top-1 class differs from the ensemble mean's, shape (N,), in [0, 1].

    With `weights`, the weight of those members (normalised to sum to 1).
    """
    stack = member_probabilities(stack)
    w = member_weights(weights, stack.shape[0])
    top = np.argmax(np.tensordot(w, stack, axes=1), axis=1)
    return w @ (np.argmax(stack, axis=2) != top[None, :]).astype("float64")


def variance(stack, *, weights=None) -> np.ndarray:
    """Variance of the members' predictions (regression), per example, averaged over output units.

    `stack` is (M, N, ...); the result (N,). With `weights`, the weighted variance around the
    weighted mean.
    """
    stack = np.asarray(stack, dtype="float64")
    if stack.ndim < 2:
        raise ValueError(f"`stack` must have shape (M, N, ...), got {stack.shape}.")
    w = member_weights(weights, stack.shape[0])
    mean = np.tensordot(w, stack, axes=1)
    spread = np.tensordot(w, (stack - mean[None]) ** 2, axes=1)
    return spread.reshape(spread.shape[0], -1).mean(axis=1)


def classifier_metrics(p, y, bins: int) -> dict[str, float]:
    """{"error", "nll", "brier", "ece"} of probabilities `p` against labels `y` (already checked),
    and the selective prediction metrics on the max probability ("aurc", "augrc", "error_at_80",
    "error_at_90", "error_at_95"; see `keras_snapshot.selective`)."""
    from keras_snapshot.selective import selective_metrics

    metrics = {"error": error(p, y), "nll": nll(p, y), "brier": brier(p, y), "ece": ece(p, y, bins)}
    p, y = _classified(p, y)
    metrics.update(selective_metrics(np.max(p, axis=1), np.argmax(p, axis=1) != y))
    return metrics


def ood_scores(p, stack=None) -> dict[str, np.ndarray]:
    """{score: (N,) uncertainty, higher = more likely out of distribution}: "max_probability"
    (1 - the max probability of `p`), "entropy" (of `p`), and with the members' `stack` (2+
    members) "mutual_information" and "disagreement" of the stack."""
    scores = {"max_probability": 1.0 - np.max(probabilities(p), axis=1), "entropy": entropy(p)}
    if stack is not None and len(stack) >= 2:
        scores["mutual_information"] = mutual_information(stack)
        scores["disagreement"] = disagreement(stack)
    return scores


# ---------------------------------------------------------------------------------------- checks
def _check_bins(bins) -> int:
    if isinstance(bins, bool) or not isinstance(bins, numbers.Integral) or bins < 1:
        raise ValueError(f"`bins` must be an integer >= 1, got {bins!r}.")
    return int(bins)


def _check_ood(ood, x) -> None:
    """`ood` must hold rows shaped like those of `x` (the same structure and per-row shapes)."""

    def leaves(value):
        return keras.tree.flatten(value) if isinstance(value, (dict, list, tuple)) else [value]

    if rows_of(ood, "ood") < 1:
        raise ValueError("`ood` holds no rows: pass out-of-distribution inputs shaped like `x`, or None.")
    ood_shapes = [np.shape(leaf)[1:] for leaf in leaves(ood)]
    x_shapes = [np.shape(leaf)[1:] for leaf in leaves(x)]
    same_keys = not isinstance(x, dict) or (isinstance(ood, dict) and set(ood) == set(x))
    if not same_keys or ood_shapes != x_shapes:
        raise ValueError(
            f"`ood` must be structured like `x`, with rows of the same shape: got rows {ood_shapes}, "
            f"`x` has {x_shapes}{'' if same_keys else ' (or different input names)'}."
        )


# ---------------------------------------------------------------------------------------- tasks
def task_of(kind: str, classes: int, y: np.ndarray) -> str:
    """ "classification" or "regression", from the output's kind (see `ensemble.output_kind`),
    its number of units and the targets."""
    if kind in (CLASSES, BINARY):
        return "classification"
    if classes > 1 and (looks_like_labels(y) or (y.ndim == 2 and y.shape[1] == classes and is_one_hot(y))):
        return "classification"  # probabilities made some other way, or logits (refused later)
    return "regression"


# ---------------------------------------------------------------------------------------- public
def evaluate_ensemble(
    snapshots: str | os.PathLike | Sequence[str | os.PathLike | keras.Model],
    x,
    y,
    *,
    last: int | None = None,
    temperature: float | str | None = None,
    validation_data: tuple | None = None,
    batch_size: int = 256,
    output_activation: str | None = None,
    bins: int = 15,
    safe_mode: bool = True,
    ood=None,
) -> list[dict]:
    """Accuracy and calibration of every snapshot and of every ensemble of the last m snapshots.

    Each snapshot is loaded once and run once on `x` (one predict pass over all members; one more
    on the validation inputs with `temperature="fit"`); the ensembles are then averaged in numpy.

    Rows, in this order: one per member, `{"model": "snapshot_03", "m": None, ...}` (the member
    names of `build_ensemble`), then one per ensemble of the last m = 1..M snapshots,
    `{"model": "ensemble of last m", "m": m, ...}` (the plain mean, as in the paper). Keys:

    - classifiers: "error" (top-1), "nll" (natural log), "brier" (summed over classes), "ece"
      (`bins` equal-width bins on the top-1 confidence); see `keras_snapshot.evaluation`; and
      selective prediction with the max probability as confidence: "aurc", "augrc" and the error
      among the 80 / 90 / 95 % most confident rows, "error_at_80", "error_at_90", "error_at_95"
      (ties in confidence averaged over; see `keras_snapshot.selective`);
    - regressors: "mse".

    With `ood` (classifiers), every row also has "ood": {score: {"auroc", "aupr", "fpr95"}},
    OOD rows positive, for the scores "max_probability" (1 - max probability), "entropy" and,
    for ensembles of 2+ members, "mutual_information" and "disagreement" (see
    `keras_snapshot.selective`).

    With `temperature`, every row also has "temperature" and the same metrics after temperature
    scaling, softmax(log(p) / T): "error_ts", "nll_ts", "brier_ts", "ece_ts", "aurc_ts", ... and,
    with `ood`, "ood_ts" (max probability and entropy after scaling; the members' mutual
    information and disagreement as they are, as `build_ensemble` serves them). A float applies one T
    to every row; "fit" fits one T per row (each member and each ensemble its own, as a user
    calibrating that model would) on `validation_data`, never on the test set. Compare methods by
    their temperature-scaled NLL (Ashukha et al., ICLR 2020): raw NLL and ECE mislead.

    A classifier is an output ending in softmax (or `output_activation="softmax"`), one sigmoid
    unit (binary, counted as two classes), or several units with integer / one-hot targets whose
    outputs are probabilities. Anything else is a regressor. Members with several outputs are
    refused (evaluate each output's model separately).

    Args:
        snapshots: a snapshot directory, a list of `.keras` paths or a list of `keras.Model`s.
        x: test inputs (an array, or a list / dict matching the members' inputs).
        y: test targets: integer labels (N,) or (N, 1), or one-hot rows (N, C) of any dtype
            (soft labels are refused: error and ECE need one true class); regression targets of
            the outputs' shape. NaN or inf in `x`, `y` or the validation data is refused, naming
            the count and the first row.
        last: evaluate only the last m snapshots.
        temperature: None, a float > 0, or "fit" (needs `validation_data`).
        validation_data: (x_val, y_val), held-out validation data for `temperature="fit"`.
        batch_size: the batch size of the predict passes.
        output_activation: e.g. "softmax" when the members output logits.
        bins: the number of ECE bins.
        safe_mode: as for `build_ensemble`.
        ood: out-of-distribution inputs (structured like `x`) for the OOD detection metrics;
            their labels are not needed.

    Returns:
        A list of dicts, member rows first, then ensemble rows (m = 1..M).

    Raises:
        ValueError / TypeError: bad arguments, mismatched lengths, labels out of range, members
            with several outputs, logits without `output_activation`; checked before any
            snapshot is run.

    Example:

    ```python
    import keras, numpy as np, keras_snapshot
    from keras_snapshot.evaluation import evaluate_ensemble
    x, y = np.random.rand(600, 8).astype("float32"), np.random.randint(0, 3, 600)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3, activation="softmax")])
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9), "sparse_categorical_crossentropy")
    model.fit(x[:400], y[:400], batch_size=32, epochs=6, verbose=0,
              callbacks=[keras_snapshot.SnapshotCallback("snapshots", cycles=3)])
    rows = evaluate_ensemble("snapshots", x[500:], y[500:], temperature="fit",
                             validation_data=(x[400:500], y[400:500]))
    for row in rows:
        print(row["model"], row["error"], row["nll"], row["nll_ts"], row["temperature"])
    ```
    """
    if not isinstance(safe_mode, bool):
        raise TypeError(f"`safe_mode` must be True or False, got {safe_mode!r}.")
    batch_size = check_batch_size(batch_size)
    bins = _check_bins(bins)
    temperature = check_temperature(temperature)
    fit = temperature == "fit"
    if fit and validation_data is None:
        raise ValueError(
            "temperature='fit' needs validation_data=(x_val, y_val): held-out validation data, never the "
            "test set."
        )
    if not fit and validation_data is not None:
        raise ValueError(
            "`validation_data` is only used with temperature='fit'; drop it or pass temperature='fit'."
        )
    if output_activation is not None and not isinstance(output_activation, str):
        raise TypeError(
            "`output_activation` must be None or an activation name such as 'softmax' (evaluate_ensemble "
            f"takes single-output members), got {output_activation!r}."
        )
    snapshot_sources(snapshots, last)  # a bad `last` fails before any load
    y = targets(y, rows_of(x, "x"), "y")  # NaN / inf in x or y refused here, naming the first row
    if ood is not None:
        _check_ood(ood, x)  # NaN / inf refused by its rows_of
    if fit:
        x_val, y_val = validation_pair(validation_data)
    members = load_members(snapshots, last, safe_mode)
    inputs, keys, _, taps = member_graph(members, output_activation)
    if len(keys) != 1:
        raise ValueError(
            f"evaluate_ensemble takes single-output members; these snapshots have outputs {keys}. "
            "Evaluate each output separately (e.g. with members made of one output each)."
        )
    key = keys[0]
    tap = taps[members[0].name][key]
    classes = int(tap.shape[-1]) if len(tap.shape) > 1 and tap.shape[-1] is not None else 1
    kind = output_kind(members[0].model, key, output_activation, position=0)
    dtype = lowest_precision([output_dtype(members, key), tap.dtype])  # float16 members: looser rows
    task = task_of(kind, classes, y)
    if task == "classification":
        if len(tap.shape) != 2:
            raise ValueError(
                f"The members' output has shape {tuple(tap.shape)}: evaluate_ensemble takes classifiers with "
                "outputs of shape (batch, classes)."
            )
        labels(y, len(y), max(classes, 2))
        if fit:
            labels(y_val, len(y_val), max(classes, 2), "validation_data[1]")
    elif temperature is not None or ood is not None:
        raise ValueError(
            f"{'Temperature scaling' if ood is None else 'OOD detection (`ood`)'} applies to classifiers "
            "(probabilities); the members' output looks like a regression output (no softmax, no single "
            "sigmoid unit, targets that are not class labels). Drop it, or pass output_activation='softmax' "
            "for logits."
        )

    stack = predict_taps(members, inputs, keys, taps, x, batch_size)[key]
    if task == "regression":
        mse(stack[0], y)  # the targets' shape, before any row
    else:
        check_probabilities(stack, "softmax" if classes > 1 else "sigmoid", dtype)
    candidates = [(member.name, None, stack[i]) for i, member in enumerate(members)]
    candidates += [
        (f"ensemble of last {m}", m, stack[len(members) - m :].mean(axis=0))
        for m in range(1, len(members) + 1)
    ]
    if ood is not None:
        ood_stack = predict_taps(members, inputs, keys, taps, ood, batch_size)[key]
        check_probabilities(ood_stack, "softmax" if classes > 1 else "sigmoid", dtype)
    if fit:
        val_stack = predict_taps(members, inputs, keys, taps, x_val, batch_size)[key]
        check_probabilities(val_stack, "softmax" if classes > 1 else "sigmoid", dtype)
        val_candidates = [val_stack[i] for i in range(len(members))]
        val_candidates += [val_stack[len(members) - m :].mean(axis=0) for m in range(1, len(members) + 1)]

    rows = []
    for index, (name, m, p) in enumerate(candidates):
        row = {"model": name, "m": m}
        if task == "regression":
            row["mse"] = mse(p, y)
        else:
            row.update(classifier_metrics(p, y, bins))
            if temperature is not None:
                t = (
                    temperature_from_probabilities(val_candidates[index], y_val, dtype=dtype)
                    if fit
                    else temperature
                )
                row["temperature"] = float(t)
                scaled = classifier_metrics(temperature_scale(p, t), y, bins)
                row.update({f"{metric}_ts": value for metric, value in scaled.items()})
            if ood is not None:
                _add_ood(row, index, len(members), stack, ood_stack, row.get("temperature"))
        rows.append(row)
    return rows


def _add_ood(row: dict, index: int, count: int, stack, ood_stack, temperature) -> None:
    """row["ood"] (and row["ood_ts"] with a temperature): the OOD metrics of candidate `index`
    (members first, then the ensembles of the last m = 1..count)."""
    from keras_snapshot.calibration import temperature_scale
    from keras_snapshot.selective import ood_metrics

    members = slice(index, index + 1) if index < count else slice(2 * count - index - 1, count)
    inside, outside = stack[members], ood_stack[members]
    p_in, p_out = inside.mean(axis=0), outside.mean(axis=0)
    scores_in, scores_out = ood_scores(p_in, inside), ood_scores(p_out, outside)
    row["ood"] = {score: ood_metrics(scores_in[score], scores_out[score]) for score in scores_in}
    if temperature is not None:
        # Calibrated max probability and entropy; the members' disagreement as they are.
        scores_in.update(ood_scores(temperature_scale(p_in, temperature)))
        scores_out.update(ood_scores(temperature_scale(p_out, temperature)))
        row["ood_ts"] = {score: ood_metrics(scores_in[score], scores_out[score]) for score in scores_in}
