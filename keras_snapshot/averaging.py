"""Weight averaging: one network whose weights are the mean of the snapshots' weights, guarded.

Averaging the weights (SWA, Izmailov et al., 2018) serves at the cost of one model, but it only
works when the members lie in one basin of the loss; snapshots taken after large learning-rate
restarts often do not, and their average is then far worse than any of them. So
`average_weights` measures the result on validation data when given some, and warns
(`AveragingWarning`) when the average loses to the best member.
"""

from __future__ import annotations

import contextlib
import numbers
import os
import warnings
from collections.abc import Sequence

import keras
import numpy as np

from keras_snapshot.inputs import (
    EPSILON,
    check_inputs,
    check_probabilities,
    input_arrays,
    labels,
    output_items,
    validation_pair,
)
from keras_snapshot.members import load_members, member_predictions, output_dtype, snapshot_sources

__all__ = ["AveragingWarning", "average_weights"]

# The averaged model "loses" when its validation NLL exceeds the best member's by more than this
# share: snapshots a few steps apart average to about the mean of their losses, a hair above the
# better one, which is no reason to warn.
RELATIVE_TOLERANCE = 0.01


class AveragingWarning(UserWarning):
    """The averaged model is worse on validation data than the best snapshot."""


# ---------------------------------------------------------------------------------------- layers
def _weighted_layers(model: keras.Model, path: str = "") -> list[tuple[str, keras.layers.Layer]]:
    """(path, layer) of every layer holding weights, in order, nested models opened."""
    result = []
    for layer in model.layers:
        name = f"{path}{layer.name}"
        if isinstance(layer, keras.Model):
            result.extend(_weighted_layers(layer, f"{name}/"))
        elif layer.weights:
            result.append((name, layer))
    return result


def _describe(name: str, layer) -> str:
    shapes = ", ".join(f"{weight.name} {tuple(weight.shape)}" for weight in layer.weights)
    return f"{name!r} ({type(layer).__name__}: {shapes})"


def _check_architecture(members) -> None:
    reference = _weighted_layers(members[0].model)
    for member in members[1:]:
        layers = _weighted_layers(member.model)
        for index, (first, other) in enumerate(zip(reference, layers, strict=False), start=1):
            (name_a, layer_a), (name_b, layer_b) = first, other
            same = type(layer_a) is type(layer_b) and [tuple(w.shape) for w in layer_a.weights] == [
                tuple(w.shape) for w in layer_b.weights
            ]
            if not same:
                raise ValueError(
                    f"Snapshots differ in architecture at weighted layer #{index}: {members[0].label} has "
                    f"{_describe(name_a, layer_a)}, {member.label} has {_describe(name_b, layer_b)}. "
                    "Weights can only be averaged between copies of one architecture (snapshots of one run)."
                )
        if len(layers) != len(reference):
            longer, shorter = (members[0], member) if len(reference) > len(layers) else (member, members[0])
            extra = (reference if len(reference) > len(layers) else layers)[min(len(reference), len(layers))]
            raise ValueError(
                f"Snapshots differ in architecture: {longer.label} has a weighted layer "
                f"{_describe(*extra)} that {shorter.label} lacks ({len(reference)} vs {len(layers)} weighted "
                "layers). Weights can only be averaged between copies of one architecture."
            )


def _batch_norms(model: keras.Model) -> list:
    return [
        layer for _, layer in _weighted_layers(model) if isinstance(layer, keras.layers.BatchNormalization)
    ]


# ---------------------------------------------------------------------------------------- BN statistics
class _Moments:
    """Population mean and variance over all reduced axes, merged batch by batch in float64 (Chan et al.)."""

    def __init__(self):
        self.count = 0
        self.mean = None
        self.m2 = None

    def add(self, values: np.ndarray, axis: int) -> None:
        values = np.moveaxis(np.asarray(values, dtype="float64"), axis, -1)
        values = values.reshape(-1, values.shape[-1])
        count = values.shape[0]
        if count == 0:
            return
        mean = values.mean(axis=0)
        m2 = ((values - mean) ** 2).sum(axis=0)
        if self.count == 0:
            self.count, self.mean, self.m2 = count, mean, m2
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * count / total
        self.m2 = self.m2 + m2 + delta**2 * self.count * count / total
        self.count = total


def _batches(data, rows: int, batch_size: int):
    for start in range(0, rows, batch_size):
        yield keras.tree.map_structure(lambda array, s=start: array[s : s + batch_size], data)


def _no_gradients():
    if keras.backend.backend() == "torch":
        import torch

        return torch.no_grad()
    return contextlib.nullcontext()


def recompute_batch_norm(model: keras.Model, data, batch_size: int) -> None:
    """Sets every BatchNormalization's moving mean and variance to the population statistics of its
    input over `data`, in inference mode, one layer at a time in graph order (a layer's input
    depends on the statistics of the layers before it)."""
    rows = keras.tree.flatten(data)[0].shape[0]
    for layer in _batch_norms(model):
        moments = _Moments()
        original = layer.call
        axis = layer.axis

        def probe(inputs, *args, _original=original, _moments=moments, _axis=axis, **kwargs):
            values = keras.ops.convert_to_numpy(inputs)
            _moments.add(values, _axis % values.ndim)
            return _original(inputs, *args, **kwargs)

        shadowed = "call" in vars(layer)
        layer.call = probe  # an instance attribute: Layer.__call__ runs it, eagerly
        try:
            with _no_gradients():
                for batch in _batches(data, rows, batch_size):
                    model(batch, training=False)
        finally:
            if shadowed:
                layer.call = original
            else:
                del layer.call
        if moments.count == 0:
            raise ValueError(
                f"BatchNormalization layer {layer.name!r} never ran on `bn_data`: it is not reached by the "
                "model's inputs, so its statistics cannot be recomputed."
            )
        layer.moving_mean.assign(moments.mean.astype(layer.moving_mean.dtype))
        layer.moving_variance.assign((moments.m2 / moments.count).astype(layer.moving_variance.dtype))


# ---------------------------------------------------------------------------------------- the report
def _scores(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Mean negative log-likelihood and top-1 error of class probabilities (N, C) or (N, 1)."""
    p = np.asarray(probabilities, dtype="float64").reshape(len(labels), -1)
    if p.shape[1] == 1:
        p = np.concatenate([1.0 - p, p], axis=1)
    picked = p[np.arange(len(labels)), labels]
    return {
        "nll": float(-np.mean(np.log(np.clip(picked, EPSILON, None)))),
        "error": float(np.mean(np.argmax(p, axis=1) != labels)),
    }


def _report(members, averaged, x_val, y_val, batch_size) -> dict:
    keys = [key for key, _ in output_items(members[0].model, members[0].label)]
    if len(keys) != 1:
        raise ValueError(
            f"`validation_data` is supported for models with one output; these have {len(keys)} ({keys})."
        )
    _, stacks = member_predictions(members, x_val, batch_size=batch_size)
    stack = stacks[keys[0]]
    rows, classes = stack.shape[1], stack.shape[-1]
    if stack.ndim != 3:
        raise ValueError(
            f"`validation_data` is supported for class probabilities of shape (N, C); the output has shape "
            f"{stack.shape[1:]}."
        )
    try:
        check_probabilities(stack, "softmax" if classes > 1 else "sigmoid", output_dtype(members, keys[0]))
    except ValueError as error:
        raise ValueError(
            f"{error} The validation NLL of the averaging report is only defined for members that end in "
            "softmax (or one sigmoid unit)."
        ) from None
    indices = labels(y_val, rows, max(classes, 2), "validation_data[1]")
    averaged_p = keras.tree.flatten(averaged.predict(x_val, batch_size=batch_size, verbose=0))[0]
    if not np.all(np.isfinite(averaged_p)):
        raise ValueError(
            "The averaged model predicts NaN or inf on the validation inputs: its averaged weights (or the "
            "BatchNormalization statistics recomputed from bn_data) are not finite."
        )
    member_scores = [_scores(p, indices) for p in stack]
    best = min(range(len(members)), key=lambda i: (member_scores[i]["nll"], member_scores[i]["error"]))
    report = {
        "averaged": _scores(averaged_p, indices),
        "best_member": {"model": members[best].label, **member_scores[best]},
        "ensemble": _scores(stack.mean(axis=0), indices),
        "members": [
            {"model": member.label, **scores} for member, scores in zip(members, member_scores, strict=True)
        ],
    }
    report["averaged_is_worse"] = bool(
        report["averaged"]["nll"] > report["best_member"]["nll"] * (1 + RELATIVE_TOLERANCE)
    )
    return report


# ---------------------------------------------------------------------------------------- public
def average_weights(
    snapshots: str | os.PathLike | Sequence[str | os.PathLike | keras.Model],
    *,
    last: int | None = None,
    bn_data=None,
    validation_data: tuple | None = None,
    batch_size: int = 256,
    safe_mode: bool = True,
) -> keras.Model:
    """One model whose weights are the element-wise mean of the snapshots' weights.

    It serves at the cost of one model, like `distill`, but needs no training. It works only when
    the snapshots lie in one basin of the loss: SWA-style snapshots (small cyclic rates after
    pre-training, the last cycles of a run with a small `initial_learning_rate`, NoCycle snapshots
    of one run). Snapshot-ensemble snapshots taken after large restarts usually do not, and the
    average of distant minima can be far worse than any snapshot. Pass `validation_data` to find out:
    the averaged model, each member and the output-averaging ensemble are scored, and an
    `AveragingWarning` is raised when the averaged model's NLL exceeds the best member's by more
    than 1% (then use the ensemble, or `distill` it into one model).

    BatchNormalization moving statistics of the averaged weights are not the mean of the members'
    statistics, so they are recomputed from `bn_data`, exactly: each BN layer's moving mean and
    variance become the population mean and (biased, as BN's) variance of its input over all of
    `bn_data`, over the batch and spatial axes, one layer at a time in graph order with the
    layers before it already updated, in inference mode. This runs the model eagerly once over
    `bn_data` per BN layer.

    Args:
        snapshots: a snapshot directory written by `SnapshotCallback`, a list of `.keras` paths or
            a list of `keras.Model`s (not modified) of one architecture.
        last: average only the last m snapshots (1 <= m <= M); None averages all.
        bn_data: inputs (an array, a list or a dict of arrays, no labels), usually the training
            inputs: required when the model has BatchNormalization layers, unused otherwise.
        validation_data: (x_val, y_val) with class indices or one-hot rows, for a model with one
            probability output: attaches the report and runs the guard.
        batch_size: batch size of the statistics passes and of the validation predictions.
        safe_mode: load snapshot files in Keras's safe mode.

    Returns:
        A functional `keras.Model` (not compiled), a copy of the first kept member's architecture
        with the averaged weights: it saves to `.keras` and reloads with plain Keras. With
        `validation_data`, its attribute `averaging_report` is a dict
        `{"averaged": {"nll", "error"}, "best_member": {"model", "nll", "error"}, "ensemble": {"nll",
        "error"}, "members": [...], "averaged_is_worse": bool}` (the best member has the lowest NLL).

    Raises:
        ValueError: members of different architectures (naming the first mismatching layer), a
            BatchNormalization model without `bn_data`, bad `bn_data` or `validation_data`.
        FileNotFoundError: a missing directory or snapshot file.

    Warns:
        AveragingWarning: the averaged model is worse than the best member on `validation_data`.

    Example:

    ```python
    import keras, numpy as np, keras_snapshot
    x, y = np.random.rand(512, 8).astype("float32"), np.random.randint(0, 3, 512)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16), keras.layers.BatchNormalization(),
                              keras.layers.ReLU(), keras.layers.Dense(3, activation="softmax")])
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9), "sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=32, epochs=6, verbose=0,
              callbacks=[keras_snapshot.SnapshotCallback("snapshots", cycles=3, initial_learning_rate=0.05)])
    averaged = keras_snapshot.average_weights("snapshots", last=2, bn_data=x,
                                              validation_data=(x[:128], y[:128]))
    print(averaged.averaging_report["averaged"], averaged.averaging_report["best_member"])
    averaged.save("averaged.keras")
    ```
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"`batch_size` must be an integer >= 1, got {batch_size!r}.")
    batch_size = int(batch_size)
    if not isinstance(safe_mode, bool):
        raise TypeError(f"`safe_mode` must be True or False, got {safe_mode!r}.")
    if validation_data is not None:
        x_val, y_val = validation_pair(validation_data)  # NaN / inf refused, naming the first row
    if bn_data is not None:
        bn_data, _ = input_arrays(bn_data, "bn_data")  # NaN / inf refused: one NaN spoils every BN mean
    snapshot_sources(snapshots, last)  # cheap checks (paths, `last`) before any load
    members = load_members(snapshots, last, safe_mode)
    _check_architecture(members)
    reference = members[0].model
    norms = _batch_norms(reference)
    if norms and bn_data is None:
        raise ValueError(
            f"The snapshots have BatchNormalization layers ({', '.join(repr(n.name) for n in norms[:3])}"
            f"{', ...' if len(norms) > 3 else ''}), whose moving statistics do not fit the averaged weights: "
            "pass bn_data=x_train (the training inputs, no labels) to recompute them."
        )
    if bn_data is not None and norms:
        check_inputs(bn_data, reference, members[0].label, "bn_data")

    averaged = keras.models.clone_model(reference)
    averaged.name = reference.name
    stacks = [_weighted_layers(member.model) for member in members]
    for position, (_, layer) in enumerate(_weighted_layers(averaged)):
        values = []
        for index in range(len(layer.weights)):
            arrays = [np.asarray(layers[position][1].weights[index].numpy()) for layers in stacks]
            if np.issubdtype(arrays[0].dtype, np.floating):
                values.append(np.mean(np.stack(arrays).astype("float64"), axis=0).astype(arrays[0].dtype))
            else:  # counters and seed states are not averaged: the first member's
                values.append(arrays[0])
        layer.set_weights(values)
    if norms:
        recompute_batch_norm(averaged, bn_data, batch_size)
    if validation_data is not None:
        report = _report(members, averaged, x_val, y_val, batch_size)
        averaged.averaging_report = report
        if report["averaged_is_worse"]:
            avg, best, ens = report["averaged"], report["best_member"], report["ensemble"]
            warnings.warn(
                AveragingWarning(
                    f"The averaged model is worse than the best snapshot on validation data: NLL "
                    f"{avg['nll']:.4f} vs {best['nll']:.4f} ({best['model']}), error {avg['error']:.2%} vs "
                    f"{best['error']:.2%} (the output-averaging ensemble: NLL {ens['nll']:.4f}, error "
                    f"{ens['error']:.2%}). The snapshots are probably not in one basin (large learning-rate "
                    "restarts). Serve the best snapshot or the ensemble (build_ensemble), or distil the "
                    "ensemble into one model at 1x cost: keras_snapshot.distill(snapshots, x_train)."
                ),
                stacklevel=2,
            )
    return averaged
