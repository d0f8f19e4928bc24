"""The snapshots as ONE functional Keras model, and the members' predictions in one pass.

`build_ensemble` turns M snapshots into a single graph: fresh `keras.Input`s (the members' names,
shapes and dtypes) feed every member, each member output passes through one `Activation` layer (the
optional `output_activation`, else "linear"), and the members are combined per output with `Average`
(equal weights) or `Rescaling(w_i)` + `Add` (weighted). Only built-in layers are used, so the result
saves to `.keras`, reloads with plain Keras and exports as a SavedModel without this package.

Layer names in the result (relied on by `export_saved_model(..., member_outputs=True)`):

- members: `snapshot_XX` (XX = the cycle for a snapshot directory, else the 1-based position);
- per member and output: `snapshot_XX_<output>` (the activation), `snapshot_XX_<output>_weight`;
- the combined outputs carry the members' output names (or dict keys), so the ensemble is a drop-in
  replacement for one snapshot.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import keras
import numpy as np

from keras_snapshot import fusion
from keras_snapshot.members import (
    MEMBER_PREFIX,
    call_members,
    frame,
    load_members,
    output_items,
    predict_taps,
    snapshot_sources,
)
from keras_snapshot.weights import check_validation_data, check_weights, fitted_weights

__all__ = ["build_ensemble"]


# ---------------------------------------------------------------------------------------- the graph
def combine(inputs, keys, output_struct, taps, weights, name: str) -> keras.Model:
    combined = {}
    for key in keys:
        tensors = [member_taps[key] for member_taps in taps.values()]
        if weights is None:
            combined[key] = keras.layers.Average(name=key)(tensors)
        else:
            # A member of weight 0 stays off the graph: same outputs, one member less to run.
            scaled = [
                keras.layers.Rescaling(float(weight), name=f"{member}_{key}_weight")(tensor)
                for member, weight, tensor in zip(taps, weights, tensors, strict=True)
                if weight > 0
            ]
            combined[key] = keras.layers.Add(name=key)(scaled)
    return assemble(inputs, keys, output_struct, combined, name)


def assemble(inputs, keys, output_struct, combined: dict, name: str) -> keras.Model:
    """The ensemble model, its outputs in the members' structure (a tensor, a list or a dict)."""
    if isinstance(output_struct, dict):
        outputs = combined
    elif isinstance(output_struct, (list, tuple)):
        outputs = [combined[key] for key in keys]
    else:
        outputs = combined[keys[0]]
    return keras.Model(inputs, outputs, name=name)


def member_output_tensors(model: keras.Model) -> dict[str, dict[str, object]]:
    """{member name: {output key: tensor}} of an ensemble made by `build_ensemble` (after reload too)."""
    members = [layer.name for layer in model.layers if isinstance(layer, keras.Model)]
    keys = [key for key, _ in output_items(model)]
    result = {}
    try:
        for member in members:
            result[member] = {key: model.get_layer(f"{member}_{key}").output for key in keys}
    except ValueError:
        result = {}
    if not result:
        raise ValueError(
            f"Model {model.name!r} is not an ensemble made by keras_snapshot.build_ensemble with "
            f"fuse=False (no '{MEMBER_PREFIX}XX_<output>' layers found), so its members' outputs cannot "
            "be exposed. A fused ensemble holds its members stacked: rebuild with fuse=False."
        )
    return result


# ---------------------------------------------------------------------------------------- public
def _check_name(name) -> str:
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"`name` must be a non-empty string without '/', got {name!r}.")
    return name


# ---------------------------------------------------------------------------------------- public
def build_ensemble(
    snapshots: str | os.PathLike | Sequence[str | os.PathLike | keras.Model],
    *,
    last: int | None = None,
    weights: Sequence[float] | np.ndarray | str | None = None,
    output_activation: str | dict[str, str | None] | None = None,
    name: str = "snapshot_ensemble",
    safe_mode: bool = True,
    validation_data: tuple | None = None,
    fuse: bool = False,
) -> keras.Model:
    """One functional Keras model whose outputs are the (weighted) mean of the snapshots' outputs.

    The result is made only of built-in Keras layers: it saves to `.keras`, reloads with plain
    `keras.saving.load_model` (no custom objects) and exports as a SavedModel. Its inputs have
    the members' names, shapes and dtypes, and its outputs the members' structure (a tensor, a list
    or a dict with the same keys). Each snapshot file is loaded once, with `compile=False`.

    The paper (Huang et al., 2017) averages the softmax outputs of the last m snapshots: with members
    that end in softmax keep `output_activation=None`; with members that output logits pass
    `output_activation="softmax"` so that probabilities, not logits, are averaged.

    Args:
        snapshots: a snapshot directory written by `SnapshotCallback` (its manifest, ordered by
            cycle), a list of `.keras` paths, or a list of `keras.Model`s (used as they are, not
            copied: they are renamed `snapshot_XX` and share their weights with the ensemble).
        last: keep only the last m snapshots (1 <= m <= M); None keeps all.
        weights: None for the plain mean; one non-negative weight per member kept (normalised to
            sum to 1); or "fit" to fit them on `validation_data` (see `fit_ensemble_weights`).
            Members of weight 0 are left out of the model, so they cost nothing at inference.
        output_activation: an activation name applied to every member output before averaging
            (e.g. "softmax" for logits), or a dict {output name: activation or None}.
        name: the name of the ensemble model.
        safe_mode: load snapshot files in Keras's safe mode, which refuses Lambda layers holding
            Python code. Pass False only for files you trust.
        validation_data: (x_val, y_val), used only with `weights="fit"`: held-out validation data,
            never the test set.
        fuse: stack the members' weights into one set of wider layers (one convolution with
            M x F filters, one `EinsumDense` holding the M dense kernels, ...) instead of M
            branches. The graph then has about as many ops as one member: for small batches (online
            serving) it is the fast form (see benchmarks/results/inference.md); for large batches
            on JAX and torch the branches are faster. Needs members of one architecture (snapshots of one
            run are) built from the layers listed in `keras_snapshot.fusion.SUPPORTED`; anything
            else raises ValueError naming the layers. The outputs are the same to float rounding.
            Per-member outputs (`export_saved_model(..., member_outputs=True)`) need fuse=False.
            On TensorFlow, Keras runs the grouped convolutions of a fused CNN through XLA.

    Returns:
        The ensemble, a functional `keras.Model` (not compiled).

    Raises:
        FileNotFoundError: the directory or a snapshot file is missing (named in the message).
        ValueError: no snapshots, `last` out of range, a corrupt file or one refused by safe mode,
            members that disagree on their inputs or outputs, bad weights, members that cannot
            be fused (with fuse=True).

    Example:

    ```python
    import keras, numpy as np, keras_snapshot
    x, y = np.random.rand(256, 8).astype("float32"), np.random.randint(0, 3, 256)
    model = keras.Sequential([keras.Input((8,), name="features"), keras.layers.Dense(3, activation="softmax")])
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9), "sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=32, epochs=6, verbose=0,
              callbacks=[keras_snapshot.SnapshotCallback("snapshots", cycles=3)])
    ensemble = keras_snapshot.build_ensemble("snapshots", last=2)
    probabilities = ensemble.predict(x, verbose=0)   # mean of snapshots 2 and 3
    ensemble.save("ensemble.keras")                  # reloads with plain keras.saving.load_model
    ```
    """
    name = _check_name(name)
    if not isinstance(safe_mode, bool):
        raise TypeError(f"`safe_mode` must be True or False, got {safe_mode!r}.")
    fit = isinstance(weights, str)
    if fit and weights != "fit":
        raise ValueError(f"`weights` must be None, a sequence of numbers or 'fit', got {weights!r}.")
    if fit and validation_data is None:
        raise ValueError(
            "weights='fit' needs validation_data=(x_val, y_val): held-out validation data, never the test set."
        )
    if not fit and validation_data is not None:
        raise ValueError("`validation_data` is only used with weights='fit'; drop it or pass weights='fit'.")
    # Cheap checks first: a bad `last` or a wrong weight count must not cost M loads.
    count = len(snapshot_sources(snapshots, last))
    if weights is not None and not fit:
        weights = check_weights(weights, count)
    if not isinstance(fuse, bool):
        raise TypeError(f"`fuse` must be True or False, got {fuse!r}.")
    members = load_members(snapshots, last, safe_mode)
    inputs, keys, output_struct, activations = frame(members, output_activation)
    # The branches are built only where they are used: the branch graph, or the weight fit.
    taps = call_members(members, inputs, keys, activations) if fit or not fuse else None
    if fit:
        x_val, y_val = check_validation_data(validation_data)
        stacks = predict_taps(members, inputs, keys, taps, x_val)  # each member runs once
        weights = fitted_weights(stacks, keys, output_struct, y_val, None, max_iter=1000)
    if not fuse:
        return combine(inputs, keys, output_struct, taps, weights, name)
    if weights is None:
        weights = np.full(len(members), 1.0 / len(members))
    kept = [i for i, weight in enumerate(weights) if weight > 0]
    combined = fusion.fuse_members(
        [members[i].model for i in kept],
        [members[i].label for i in kept],
        inputs,
        keys,
        [float(weights[i]) for i in kept],
        activations,
    )
    return assemble(inputs, keys, output_struct, combined, name)
