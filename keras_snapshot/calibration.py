"""Temperature scaling (Guo et al., 2017): one scalar T, fitted on validation NLL.

The calibrated probabilities are softmax(log(p) / T), with p the ensemble's mean probabilities
(clipped to [1e-7, 1] before the logarithm). T > 1 softens over-confident predictions, T < 1
sharpens under-confident ones; the top-1 class never changes, so neither does the error.

Fit T on held-out validation data, never on the test set: a temperature chosen on the data you
report on makes the reported NLL and ECE look better than they are.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import keras
import numpy as np

from keras_snapshot.inputs import (
    EPSILON,
    check_activation,
    check_batch_size,
    check_probabilities,
    labels,
    lowest_precision,
    output_items,
    probabilities,
    structures,
    validation_pair,
)
from keras_snapshot.members import load_members, member_predictions, output_dtype, snapshot_sources

__all__ = ["fit_temperature"]

LOG_T_RANGE = (math.log(0.05), math.log(20.0))  # the search interval of log T
_GRID = 61  # coarse grid points on log T, then golden-section search around the best one
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def _log_probabilities(p) -> np.ndarray:
    return np.log(np.clip(probabilities(p), EPSILON, 1.0))


def temperature_scale(p, temperature: float) -> np.ndarray:
    """softmax(log(p) / T), in the shape of `p` (one sigmoid unit stays one unit)."""
    p = np.asarray(p, dtype="float64")
    logits = _log_probabilities(p) / float(temperature)
    logits -= logits.max(axis=1, keepdims=True)
    scaled = np.exp(logits)
    scaled /= scaled.sum(axis=1, keepdims=True)
    if p.ndim == 1:
        return scaled[:, 1]
    if p.shape[-1] == 1:
        return scaled[:, 1:]
    return scaled


def _nll_curve(p, y):
    """f(T) = the NLL of softmax(log(p) / T) against labels y."""
    logits = _log_probabilities(p)
    rows = np.arange(len(logits))
    y = labels(y, logits.shape[0], logits.shape[1])
    picked = logits[rows, y]

    def f(t: float) -> float:
        scaled = logits / t
        top = scaled.max(axis=1)
        log_sum = top + np.log(np.sum(np.exp(scaled - top[:, None]), axis=1))
        return float(np.mean(log_sum - picked / t))

    return f


def temperature_from_probabilities(p, y, *, dtype=None) -> float:
    """The temperature T minimising the NLL of softmax(log(p) / T) against labels `y`.

    A deterministic, bounded 1-D search on log T in [log 0.05, log 20]: a coarse grid, then golden-
    section search in the grid interval around the best point. Returns 1.0 unless the found T has a
    strictly lower NLL than T = 1 on this data, so the result never makes it worse.

    Args:
        p: probabilities, (N, C), or (N,) / (N, 1) for one sigmoid unit.
        y: integer labels (N,) / (N, 1) or one-hot rows (N, C) of any dtype (not soft labels).
        dtype: the dtype the probabilities were computed in (float16 rows get a looser sum
            tolerance, see keras_snapshot.inputs.row_tolerance); None for float32.

    Returns:
        T as a Python float.
    """
    p = np.asarray(p, dtype="float64")
    if p.size == 0:
        raise ValueError("Cannot fit a temperature on no examples: `p` is empty.")
    check_probabilities(probabilities(p), "softmax", dtype)
    f = _nll_curve(p, y)
    grid = np.linspace(*LOG_T_RANGE, _GRID)
    values = [f(math.exp(g)) for g in grid]
    best = int(np.argmin(values))
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, _GRID - 1)]
    # Golden-section search on [lo, hi] (the NLL is unimodal in log T near its minimum).
    a, b = lo + (1 - _GOLDEN) * (hi - lo), lo + _GOLDEN * (hi - lo)
    fa, fb = f(math.exp(a)), f(math.exp(b))
    for _ in range(60):
        if hi - lo < 1e-7:
            break
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = lo + (1 - _GOLDEN) * (hi - lo)
            fa = f(math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + _GOLDEN * (hi - lo)
            fb = f(math.exp(b))
    candidates = [(values[best], math.exp(grid[best])), (fa, math.exp(a)), (fb, math.exp(b))]
    value, t = min(candidates)
    if not (np.isfinite(value) and value < f(1.0)):
        return 1.0
    return float(t)


def fit_temperature(
    snapshots_or_model: keras.Model | str | os.PathLike | Sequence[str | os.PathLike | keras.Model],
    validation_data: tuple,
    *,
    last: int | None = None,
    output_activation: str | None = None,
    batch_size: int = 256,
    safe_mode: bool = True,
) -> float:
    """The temperature T that minimises the validation NLL of softmax(log(p) / T).

    `p` is the plain mean of the snapshots' probabilities (a directory, or a list of paths or
    models: each member is run once on `x_val`), or the probabilities of one model, e.g. an
    ensemble from `build_ensemble` (weighted or fused; a model with dict outputs from
    `build_ensemble(..., uncertainty=True)` is read at its "predictions" output).

    Fit on held-out validation data, never on the test set. The search is deterministic and
    bounded (T in [0.05, 20]) and never returns a T worse than 1 on the validation data (it
    returns 1.0 then). `build_ensemble(..., temperature="fit")` does this and bakes T into the
    graph; `build_ensemble(..., temperature=T)` bakes a T found here.

    Args:
        snapshots_or_model: a `keras.Model` with one (probability) output, or snapshots as for
            `build_ensemble`.
        validation_data: (x_val, y_val); y_val integer labels (N,) / (N, 1) or one-hot (N, C).
        last: use only the last m snapshots (snapshots only).
        output_activation: e.g. "softmax" when the members (or the model) output logits.
        batch_size: the batch size of the predict pass.
        safe_mode: as for `build_ensemble`.

    Returns:
        T as a Python float (1.0: no temperature helps).

    Example:

    ```python
    import keras, numpy as np, keras_snapshot
    from keras_snapshot.calibration import fit_temperature
    x, y = np.random.rand(512, 8).astype("float32"), np.random.randint(0, 3, 512)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3, activation="softmax")])
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9), "sparse_categorical_crossentropy")
    model.fit(x[:400], y[:400], batch_size=32, epochs=6, verbose=0,
              callbacks=[keras_snapshot.SnapshotCallback("snapshots", cycles=3)])
    t = fit_temperature("snapshots", (x[400:], y[400:]))      # validation data, not the test set
    ensemble = keras_snapshot.build_ensemble("snapshots", temperature=t)
    ```
    """
    if not isinstance(safe_mode, bool):
        raise TypeError(f"`safe_mode` must be True or False, got {safe_mode!r}.")
    batch_size = check_batch_size(batch_size)
    if output_activation is not None and not isinstance(output_activation, str):
        raise TypeError(f"`output_activation` must be None or an activation name, got {output_activation!r}.")
    x_val, y_val = validation_pair(validation_data)  # NaN / inf refused, naming the first row
    if isinstance(snapshots_or_model, keras.Model):
        if last is not None:
            raise ValueError("`last` applies to snapshots; for one model pass last=None.")
        p, dtype = _model_probabilities(snapshots_or_model, x_val, y_val, output_activation, batch_size)
    else:
        snapshot_sources(snapshots_or_model, last)  # a bad `last` fails before any load
        members = load_members(snapshots_or_model, last, safe_mode)
        keys, stacks = member_predictions(
            members, x_val, output_activation=output_activation, batch_size=batch_size
        )
        if len(keys) != 1:
            raise ValueError(
                f"fit_temperature takes single-output members; these snapshots have outputs {keys}."
            )
        stack = stacks[keys[0]]
        dtype = output_dtype(members, keys[0])
        check_probabilities(stack, _hint(stack), dtype)
        p = stack.mean(axis=0)
        labels(y_val, len(y_val), max(p.shape[-1] if p.ndim > 1 else 1, 2), "validation_data[1]")
    return temperature_from_probabilities(p, y_val, dtype=dtype)


def _hint(p: np.ndarray) -> str:
    return "sigmoid" if p.shape[-1] == 1 else "softmax"


def _model_probabilities(model, x_val, y_val, output_activation, batch_size) -> tuple[np.ndarray, str]:
    """The model's probabilities on x_val (after `output_activation`, never applied twice) and
    the dtype they were computed in."""
    outputs = structures(model, f"model {model.name!r}")[1]
    if isinstance(outputs, dict) and "predictions" in outputs:
        key = "predictions"  # build_ensemble(..., uncertainty=True)
        output_activation = check_activation(model, key, output_activation)
    else:
        items = output_items(model, f"model {model.name!r}")
        if len(items) != 1:
            raise ValueError(
                f"fit_temperature takes a single-output model; {model.name!r} has outputs "
                f"{[k for k, _ in items]}."
            )
        key = None
        output_activation = check_activation(model, items[0][0], output_activation, 0)
    p = model.predict(x_val, batch_size=batch_size, verbose=0)
    if key is not None:
        p = p[key]
    elif isinstance(p, dict):
        p = next(iter(p.values()))
    elif isinstance(p, (list, tuple)):
        p = p[0]
    dtype = lowest_precision([tensor.dtype for _, tensor in output_items(model)])
    p = np.asarray(p, dtype="float64")
    if output_activation is not None:
        p = np.asarray(
            keras.ops.convert_to_numpy(keras.activations.get(output_activation)(p)), dtype="float64"
        )
    check_probabilities(p, _hint(p), dtype)
    labels(y_val, len(y_val), max(p.shape[-1] if p.ndim > 1 else 1, 2), "validation_data[1]")
    return p, dtype
