"""The snapshots as ONE functional Keras model, and the members' predictions in one pass.

`build_ensemble` turns M snapshots into a single graph: fresh `keras.Input`s (the members' names,
shapes and dtypes) feed every member, each member output passes through one `Activation` layer (the
optional `output_activation`, else "linear"), and the members are combined per output with `Average`
(equal weights) or `Rescaling(w_i)` + `Add` (weighted). Temperature scaling and the uncertainty
outputs add built-in layers (`Rescaling`, `Softmax`) and `keras.ops` nodes, which Keras saves and
reloads in safe mode. Only built-in layers and ops are used, so the result saves to `.keras`,
reloads with plain Keras and exports as a SavedModel without this package.

Layer names in the result (relied on by `export_saved_model(..., member_outputs=True)`):

- members: `snapshot_XX` (XX = the cycle for a snapshot directory, else the 1-based position);
- per member and output: `snapshot_XX_<output>` (the activation), `snapshot_XX_<output>_weight`;
- the combined outputs carry the members' output names (or dict keys), so the ensemble is a drop-in
  replacement for one snapshot; with a temperature, the mean before scaling is `<output>_mean`
  and the scaling layer `temperature` (a `Rescaling` by 1 / T).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import keras
import numpy as np

from keras_snapshot import calibration, fusion, keras_internals, selective
from keras_snapshot.inputs import (
    BINARY,
    CLASSES,
    EPSILON,
    VALUES,
    check_temperature,
    labels,
    output_items,
    output_kind,
    rows_of,
    validation_pair,
)
from keras_snapshot.members import (
    MEMBER_PREFIX,
    call_members,
    frame,
    load_members,
    output_dtype,
    predict_taps,
    snapshot_sources,
)
from keras_snapshot.selection import DEFAULT_MAX_ROUNDS
from keras_snapshot.weights import check_weights, fitted_weights

__all__ = ["build_ensemble"]


# ---------------------------------------------------------------------------------------- the graph
PREDICTIONS_KEY = "predictions"  # the output key of a single-output model with uncertainty outputs
CLASSIFIER_MEASURES = ("entropy", "mutual_information", "disagreement")
REGRESSOR_MEASURES = ("variance",)
TEMPERATURE_LAYER = "temperature"  # Rescaling(1 / T): T = 1 / model.get_layer("temperature").scale
MEAN_SUFFIX = "_mean"  # with a temperature, the mean before scaling is the layer "<output>_mean"
ABSTAIN_KEY = "abstain"  # the output of build_ensemble(..., abstain_coverage=c)
# Rescaling(1, offset=-t) of the abstain score: t = -model.get_layer("abstain_threshold").offset
ABSTAIN_LAYER = "abstain_threshold"
ABSTAIN_SCORES = ("max_probability", *CLASSIFIER_MEASURES)


def mean_tensors(keys, taps, weights) -> dict:
    """{key: the (weighted) mean of the members' tap tensors}, each layer named after its output."""
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
    return combined


def combine(inputs, keys, output_struct, taps, weights, name: str) -> keras.Model:
    return assemble(inputs, keys, output_struct, mean_tensors(keys, taps, weights), name)


def assemble(inputs, keys, output_struct, combined: dict, name: str) -> keras.Model:
    """The ensemble model, its outputs in the members' structure (a tensor, a list or a dict)."""
    if isinstance(output_struct, dict):
        outputs = combined
    elif isinstance(output_struct, (list, tuple)):
        outputs = [combined[key] for key in keys]
    else:
        outputs = combined[keys[0]]
    return keras.Model(inputs, outputs, name=name)


def temperature_head(mean, temperature: float, kind: str, name: str):
    """softmax(log(p) / T) in the graph, with built-in layers and ops only (p clipped to [1e-7, 1])."""
    p = keras.ops.cast(mean, "float32")
    if kind == BINARY:  # sigmoid((log p - log(1 - p)) / T): the two-class softmax
        logits = keras.ops.log(keras.ops.clip(p, EPSILON, 1.0)) - keras.ops.log(
            keras.ops.clip(1.0 - p, EPSILON, 1.0)
        )
        scaled = keras.layers.Rescaling(1.0 / temperature, name=TEMPERATURE_LAYER)(logits)
        return keras.layers.Activation("sigmoid", name=name)(scaled)
    logits = keras.ops.log(keras.ops.clip(p, EPSILON, 1.0))
    scaled = keras.layers.Rescaling(1.0 / temperature, name=TEMPERATURE_LAYER)(logits)
    return keras.layers.Softmax(axis=-1, name=name)(scaled)


def _per_example(tensor):
    """(B, ...) -> (B,): the mean over every axis but the batch axis."""
    if len(tensor.shape) > 1:
        tensor = keras.ops.mean(tensor, axis=tuple(range(1, len(tensor.shape))))
    return tensor


ENTROPY_FLOOR = 1e-30  # p log p of a smaller p is 0 in float32 anyway; keeps log(0) out of the graph


def _entropy(p):
    return -keras.ops.sum(p * keras.ops.log(keras.ops.clip(p, ENTROPY_FLOOR, 1.0)), axis=-1)


def _two_classes(p):
    return keras.ops.concatenate([1.0 - p, p], axis=-1)


UNCERTAINTY_INPUT = "uncertainty_members"  # marks the uncertainty block: see is_uncertainty_block


def uncertainty_tensors(
    members, mean, predictions, weights, kind: str, prefix: str = "", name: str = "uncertainty"
):
    """{measure: (batch,) float32 tensor} from the members' outputs, in the graph.

    `members` holds the members' outputs after their activation: a list of M tensors (B, ...) or
    one stacked tensor (B, M, ...); `mean` their (weighted) mean; `predictions` the ensemble's
    output (after temperature scaling, if any); `weights` one weight per member. Classifiers
    ("classes" or "binary" `kind`): "entropy" of `predictions`, "mutual_information" (entropy of
    `mean` minus the weighted mean of the members' entropies, clipped at 0) and "disagreement"
    (the weight of the members whose top-1 class differs from the mean's); "values": "variance"
    (around `mean`, averaged over output units).

    The measures are computed inside one nested functional model called `name`, whose inputs
    are named "uncertainty_members", ...: its ops ("mean", "sum", ...) live in their own
    namespace, so that no output of the ensemble (an output called "mean", "variance" or
    "entropy") can clash with them, and export recognises the block by what it is.
    """
    w = np.asarray(weights, dtype="float64")
    w = (w / w.sum()).astype("float32")

    def like(tensor, input_name, batch_shape=None):
        return keras.Input(
            batch_shape=batch_shape or tuple(tensor.shape), dtype=tensor.dtype, name=input_name
        )

    if isinstance(members, (list, tuple)):
        member_inputs = [like(t, f"{UNCERTAINTY_INPUT}_{i + 1}") for i, t in enumerate(members)]
        stack = keras.ops.stack([keras.ops.cast(t, "float32") for t in member_inputs], axis=1)
        fed = list(members)
    else:
        member_inputs = [like(members, UNCERTAINTY_INPUT)]
        stack = keras.ops.cast(member_inputs[0], "float32")
        fed = [members]
    mean_input = like(mean, "uncertainty_mean")
    block_inputs = [*member_inputs, mean_input]
    fed.append(mean)
    mean_f = keras.ops.cast(mean_input, "float32")

    def over_members(tensor):  # (B, M, ...) -> (B, ...), weighted
        return keras.ops.sum(tensor * w.reshape((1, w.size) + (1,) * (len(tensor.shape) - 2)), axis=1)

    if kind == VALUES:
        spread = over_members(keras.ops.square(stack - keras.ops.expand_dims(mean_f, 1)))
        measures = {f"{prefix}variance": _per_example(spread)}
    else:
        predictions_input = like(predictions, "uncertainty_predictions")
        block_inputs.append(predictions_input)
        fed.append(predictions)
        predictions_f = keras.ops.cast(predictions_input, "float32")
        if kind == BINARY:
            stack, mean_f, predictions_f = (
                _two_classes(stack),
                _two_classes(mean_f),
                _two_classes(predictions_f),
            )
        members_entropy = over_members(_entropy(stack))
        top = keras.ops.argmax(stack, axis=-1)
        ensemble_top = keras.ops.expand_dims(keras.ops.argmax(mean_f, axis=-1), 1)
        differs = keras.ops.cast(keras.ops.not_equal(top, ensemble_top), "float32")
        measures = {
            f"{prefix}entropy": _per_example(_entropy(predictions_f)),
            f"{prefix}mutual_information": _per_example(
                keras.ops.maximum(_entropy(mean_f) - members_entropy, 0.0)
            ),
            f"{prefix}disagreement": _per_example(over_members(differs)),
        }
    block = keras.Model(block_inputs, measures, name=name)
    return block(fed)


def is_uncertainty_block(layer) -> bool:
    """Whether `layer` is the uncertainty block of `uncertainty_tensors` (by its graph: a nested
    functional model fed the members' outputs), whatever the outputs are called."""
    if not isinstance(layer, keras.Model):
        return False
    try:
        names = [tensor.name for tensor in layer.inputs]
    except (AttributeError, ValueError):
        return False
    return bool(names) and all(
        name.startswith(UNCERTAINTY_INPUT) or name in ("uncertainty_mean", "uncertainty_predictions")
        for name in names
    )


def unique_name(base: str, taken) -> str:
    taken = set(taken)
    name, suffix = base, 1
    while name in taken:
        suffix += 1
        name = f"{base}_{suffix}"
    return name


def abstain_head(inputs, predictions, measures: dict, kind: str, score: str, coverage: float, x_val):
    """1.0 where `score` exceeds the threshold that keeps a fraction `coverage` of `x_val`, else 0.0.

    The threshold is fitted on the very tensor the graph serves (after temperature scaling, fused
    or not), predicted on the validation inputs; it is stored as the offset of a `Rescaling`
    layer, so the decision is built-in layers and ops only.
    """
    if score == "max_probability":
        p = keras.ops.cast(predictions, "float32")
        tensor = 1.0 - keras.ops.max(_two_classes(p) if kind == "binary" else p, axis=-1)
    else:
        tensor = measures[score]
    values = np.asarray(keras.Model(inputs, tensor).predict(x_val, verbose=0)).reshape(-1)
    threshold, kept = selective.coverage_threshold(values, coverage)
    if abs(kept - coverage) > 1.0 / values.size:
        warnings.warn(
            f"abstain_score={score!r} takes few distinct values on the validation inputs: the nearest "
            f"threshold keeps {100 * kept:.1f} % of them, not {100 * coverage:.1f} %. Use a continuous score "
            "('entropy' or 'max_probability') for a precise coverage.",
            UserWarning,
            stacklevel=3,
        )
    shifted = keras.layers.Rescaling(1.0, offset=-threshold, name=ABSTAIN_LAYER)(tensor)
    return keras.ops.cast(keras.ops.greater(shifted, 0.0), "float32")


def uncertainty_outputs(keys, single: bool, outputs: dict, measures: dict) -> dict:
    """The dict outputs of a model with uncertainty: "predictions" and the measures for a single
    (plain tensor) output, else the output names and "<output>_<measure>"."""
    named = {PREDICTIONS_KEY: outputs[keys[0]]} if single else dict(outputs)
    for key, extra in measures.items():
        clash = set(extra) & set(named)
        if clash:
            raise ValueError(
                f"The uncertainty output {sorted(clash)[0]!r} of {key!r} clashes with an output of the "
                "same name; rename the members' outputs."
            )
        named.update(extra)
    return named


def member_output_tensors(model: keras.Model) -> dict[str, dict[str, object]]:
    """{member name: {output key: tensor}} of an ensemble made by `build_ensemble` (after reload too).

    The tensors are the outputs of the per-member activation layers `snapshot_XX_<output>`.
    """
    members = [
        layer.name
        for layer in model.layers
        if isinstance(layer, keras.Model) and layer.name.startswith(MEMBER_PREFIX)
    ]
    result = {}
    for member in members:
        taps = {
            layer.name[len(member) + 1 :]: layer.output
            for layer in model.layers
            if isinstance(layer, keras.layers.Activation) and layer.name.startswith(f"{member}_")
        }
        if taps:
            result[member] = taps
    keys = {tuple(taps) for taps in result.values()}
    if not result or len(keys) != 1 or len(result) != len(members):
        raise ValueError(
            f"Model {model.name!r} is not an ensemble made by keras_snapshot.build_ensemble with "
            f"fuse=False (no '{MEMBER_PREFIX}XX_<output>' layers found), so its members' outputs cannot "
            "be exposed. A fused ensemble holds its members stacked: rebuild with fuse=False."
        )
    return result


def member_weights_of(model: keras.Model, members, key: str) -> list[float]:
    """The members' weights in an ensemble made by `build_ensemble` (the Rescaling layers
    `snapshot_XX_<output>_weight`; equal weights without them)."""
    weights = []
    for member in members:
        try:
            weights.append(float(model.get_layer(f"{member}_{key}_weight").scale))
        except ValueError:
            weights.append(1.0)
    return weights


def _check_name(name) -> str:
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"`name` must be a non-empty string without '/', got {name!r}.")
    return name


def _branches(members, kept, keys, taps, weights, uncertainty: bool):
    """The branch graph's means and, for the uncertainty outputs, each output's members stacked."""
    means = mean_tensors(keys, taps, weights)
    stacks = {}
    if uncertainty:  # the members' taps, stacked inside the uncertainty block
        stacks = {key: [taps[members[i].name][key] for i in kept] for key in keys}
    return means, stacks


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
    temperature: float | str | None = None,
    uncertainty: bool = False,
    abstain_coverage: float | None = None,
    abstain_score: str = "entropy",
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
            copied and never renamed: each is called inside a wrapper named `snapshot_XX` and
            shares its weights with the ensemble).
        last: keep only the last m snapshots (1 <= m <= M); None keeps all.
        weights: None for the plain mean; one non-negative weight per member kept (normalised to
            sum to 1); or "fit" to fit them on `validation_data` (see `fit_ensemble_weights`); or
            "greedy" for greedy selection with replacement on `validation_data` (Caruana et al.,
            2004; see `greedy_selection`: useless members get weight 0). With "fit" or "greedy"
            the model's attribute `ensemble_weights` holds the weights (one per member kept by
            `last`), and with "greedy" `selection_counts` the counts.
            Members of weight 0 are left out of the model, so they cost nothing at inference.
        output_activation: an activation name applied to every member output before averaging
            (e.g. "softmax" for logits), or a dict {output name: activation or None}. It is never
            applied to an output that already is what it makes (softmax over a softmax output):
            that output keeps its values, with a UserWarning.
        name: the name of the ensemble model.
        safe_mode: load snapshot files in Keras's safe mode, which refuses Lambda layers holding
            Python code. Pass False only for files you trust.
        validation_data: (x_val, y_val), used only with `weights="fit"` or `"greedy"`,
            `temperature="fit"` and/or `abstain_coverage` (all fit on it: the weights first, then
            T, then the abstain threshold; the threshold needs only x_val): held-out validation
            data, never the test set.
        fuse: stack the members' weights into one set of wider layers (one convolution with
            M x F filters, one `EinsumDense` holding the M dense kernels, ...) instead of M
            branches. The graph then has about as many ops as one member: for small batches (online
            serving) it is the fast form (see benchmarks/results/inference.md); for large batches
            on JAX and torch the branches are faster. Needs members of one architecture (snapshots of one
            run are) built from the layers listed in `keras_snapshot.fusion.SUPPORTED`; anything
            else raises ValueError naming the layers. The outputs are the same to float rounding.
            Per-member outputs (`export_saved_model(..., member_outputs=True)`) need fuse=False.
            On TensorFlow, Keras runs the grouped convolutions of a fused CNN through XLA.
        temperature: temperature scaling baked into the graph: the output becomes
            softmax(log(p) / T) of the mean p (clipped to [1e-7, 1]; one sigmoid unit: the
            two-class form, sigmoid((log p - log(1 - p)) / T)). A float T > 0, or "fit" to find the
            T minimising the NLL on `validation_data` (`keras_snapshot.calibration.fit_temperature`;
            never worse than T = 1 there). Built from built-in layers and ops: the mean is the layer
            "<output>_mean", T is `1 / model.get_layer("temperature").scale`, and the file still
            reloads without this package. The top-1 class does not change. Needs a single-output
            classifier (softmax, or one sigmoid unit, or `output_activation` of these).
        uncertainty: add per-example uncertainty outputs, each (batch,) float32, computed in the
            graph; the model then has dict outputs. For a single (tensor) output: "predictions"
            (the ensemble's output) plus "entropy" (of the predictions, in nats),
            "mutual_information" (entropy of the members' mean minus the mean of the members'
            entropies: their disagreement, epistemic) and "disagreement" (the fraction of members
            whose top-1 class differs from the ensemble's) for a classifier, or "variance" (across
            members, averaged over output units) for anything else. With list or dict outputs: the
            output names, plus "<output>_entropy", ... per output. With `temperature`, "predictions"
            and "entropy" are the calibrated ones; "mutual_information" and "disagreement" are
            computed on the members as they are (temperature scaling does not change which member
            disagrees, and the raw mean keeps the information decomposition exact). With weights,
            every mean over members is weighted by them. An output is a classifier when it ends in
            softmax or one sigmoid unit (a layer, an activation or a `keras.ops` op, or
            `output_activation`; where the graph cannot tell, its values decide: see
            docs/guide/inputs.md); several sigmoid units (multi-label) count as values. The
            measures are computed in one nested block named "uncertainty", so outputs called
            "mean", "variance" or "entropy" do not clash with them. Works with `fuse=True` (the fused graph computes
            the members' outputs stacked). `export_saved_model` serves the same keys.
        abstain_coverage: a fraction c in (0, 1]: add the output "abstain", (batch,) float32,
            1.0 where `abstain_score` exceeds a threshold t fitted on `validation_data`'s inputs
            so that a fraction c of them is kept (score <= t), else 0.0. The model then has dict
            outputs: "predictions", "abstain" (and the uncertainty outputs with
            `uncertainty=True`). t is computed from the served graph itself, so it holds after
            temperature scaling (with temperature="fit", T is fitted first and the scores are
            the calibrated ones) and with fuse=True (the fused graph's own scores); it is stored
            as the offset of the `Rescaling` layer "abstain_threshold" (t = -offset), so the
            model saves, reloads and exports (`serving_default` serves "abstain") without this
            package. Needs a single-output classifier. With tied scores (disagreement takes M + 1
            values) the kept fraction is the nearest one achievable, with a warning when it is
            more than 1/N away.
        abstain_score: the uncertainty the decision thresholds: "entropy" (default; of the
            served, calibrated predictions), "max_probability" (1 - the max probability),
            "mutual_information" or "disagreement" (of the members, as with `uncertainty`).

    Returns:
        The ensemble, a functional `keras.Model` (not compiled).

    Raises:
        FileNotFoundError: the directory or a snapshot file is missing (named in the message).
        ValueError: no snapshots, `last` out of range, a corrupt file or one refused by safe mode,
            members that disagree on their inputs or outputs, bad weights, members that cannot
            be fused (with fuse=True), a temperature <= 0, "fit" without `validation_data`, a
            temperature on a multi-output or non-classifier model, labels out of range.

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
    # calibrated on held-out validation data (never the test set), with uncertainty outputs:
    x_val, y_val = np.random.rand(64, 8).astype("float32"), np.random.randint(0, 3, 64)
    served = keras_snapshot.build_ensemble("snapshots", temperature="fit", validation_data=(x_val, y_val),
                                           uncertainty=True)
    out = served.predict(x, verbose=0)  # {"predictions", "entropy", "mutual_information", "disagreement"}
    ```
    """
    name = _check_name(name)
    if not isinstance(safe_mode, bool):
        raise TypeError(f"`safe_mode` must be True or False, got {safe_mode!r}.")
    if not isinstance(fuse, bool):
        raise TypeError(f"`fuse` must be True or False, got {fuse!r}.")
    if not isinstance(uncertainty, bool):
        raise TypeError(f"`uncertainty` must be True or False, got {uncertainty!r}.")
    abstain = abstain_coverage is not None
    if abstain:
        abstain_coverage = selective.check_coverage(abstain_coverage, "abstain_coverage")
    if abstain_score not in ABSTAIN_SCORES:
        raise ValueError(f"`abstain_score` must be one of {ABSTAIN_SCORES}, got {abstain_score!r}.")
    if abstain and validation_data is None:
        raise ValueError(
            "abstain_coverage needs validation_data=(x_val, y_val) to fit its threshold on: held-out "
            "validation data, never the test set."
        )
    fit = isinstance(weights, str)
    if fit and weights not in ("fit", "greedy"):
        raise ValueError(
            f"`weights` must be None, a sequence of numbers, 'fit' or 'greedy', got {weights!r}."
        )
    method = weights if fit else None
    temperature = check_temperature(temperature)
    fit_temperature = temperature == "fit"
    for wanted, what in ((fit, f"weights={method!r}"), (fit_temperature, "temperature='fit'")):
        if wanted and validation_data is None:
            raise ValueError(
                f"{what} needs validation_data=(x_val, y_val): held-out validation data, never the test set."
            )
    if not (fit or fit_temperature or abstain) and validation_data is not None:
        raise ValueError(
            "`validation_data` is only used with weights='fit' or temperature='fit' (or weights='greedy', "
            "abstain_coverage); drop it or pass one of these."
        )
    if fit or fit_temperature:  # NaN / inf refused before any load, naming the first row
        x_val, y_val = validation_pair(validation_data)
    elif abstain:  # the threshold needs only the inputs: (x_val, None) is enough
        pair = isinstance(validation_data, (tuple, list)) and len(validation_data) == 2
        if pair and validation_data[1] is None:
            x_val = validation_data[0]
            rows_of(x_val, "validation_data[0]")
        else:
            x_val, _ = validation_pair(validation_data)
    if fuse and (reason := keras_internals.fusion_supported()):
        warnings.warn(
            f"fuse=True: {reason}; building the branch graph instead.", RuntimeWarning, stacklevel=2
        )
        fuse = False
    # Cheap checks first: a bad `last` or a wrong weight count must not cost M loads.
    count = len(snapshot_sources(snapshots, last))
    if weights is not None and not fit:
        weights = check_weights(weights, count)
    members = load_members(snapshots, last, safe_mode)
    inputs, keys, output_struct, activations = frame(members, output_activation)
    kinds = (
        {
            key: output_kind(members[0].model, key, activations[key], position)
            for position, key in enumerate(keys)
        }
        if temperature is not None or uncertainty or abstain
        else {}
    )
    if abstain and (len(keys) != 1 or kinds[keys[0]] == "values"):
        raise ValueError(
            "abstain_coverage needs a single-output classifier (an output ending in softmax or one sigmoid "
            f"unit, or output_activation='softmax' for logits); these members have outputs "
            f"{ {key: kinds[key] for key in keys} } (kind 'values' = not probabilities)."
        )
    if temperature is not None:
        if len(keys) != 1 or kinds[keys[0]] == VALUES:
            raise ValueError(
                "Temperature scaling needs a single-output classifier (an output ending in softmax or one "
                f"sigmoid unit, or output_activation='softmax' for logits); these members have outputs "
                f"{ {key: kinds[key] for key in keys} } (kind 'values' = not probabilities)."
            )
        if fit_temperature:
            units = output_items(members[0].model)[0][1].shape[-1] if kinds[keys[0]] == CLASSES else 2
            labels(y_val, len(y_val), units, "validation_data[1]")  # before any prediction
    # The branches are built only where they are used: the branch graph, or the weight fit.
    taps = call_members(members, inputs, keys, activations) if fit or not fuse else None
    stacks = None
    counts = None
    if fit:
        stacks = predict_taps(members, inputs, keys, taps, x_val)  # each member runs once
        if method == "greedy":
            counts = fitted_weights(stacks, keys, output_struct, y_val, None, DEFAULT_MAX_ROUNDS, "greedy")
            weights = counts / counts.sum()
        else:
            weights = fitted_weights(stacks, keys, output_struct, y_val, None, max_iter=1000)
    if weights is None:
        weights = np.full(len(members), 1.0 / len(members))
        equal = True
    else:
        equal = False
    kept = [i for i, weight in enumerate(weights) if weight > 0]
    member_stacks = {}
    stacked = uncertainty or abstain  # the measures need the members stacked
    if not fuse:
        means, member_stacks = _branches(members, kept, keys, taps, None if equal else weights, stacked)
    else:
        try:
            means = fusion.fuse_members(
                [members[i].model for i in kept],
                [members[i].label for i in kept],
                inputs,
                keys,
                [float(weights[i]) for i in kept],
                activations,
                member_stacks=member_stacks if stacked else None,
                safe_mode=safe_mode,
            )
        except fusion.FusionUnavailable as error:  # Keras changed what fusion reads: same outputs, branches
            warnings.warn(
                f"fuse=True: {error}; building the branch graph instead.", RuntimeWarning, stacklevel=2
            )
            taps = taps or call_members(members, inputs, keys, activations)
            means, member_stacks = _branches(members, kept, keys, taps, None if equal else weights, stacked)
    outputs = dict(means)
    if temperature is not None:
        key = keys[0]
        if fit_temperature:
            if stacks is not None:  # the members' validation outputs are known: no second pass
                p_val = np.tensordot(np.asarray(weights, dtype="float64"), stacks[key], axes=1)
            else:
                p_val = keras.Model(inputs, means[key]).predict(x_val, verbose=0)
            temperature = calibration.temperature_from_probabilities(
                p_val, y_val, dtype=output_dtype(members, key)
            )
        # The scaled output takes the output's name; the mean before scaling becomes "<key>_mean".
        keras.Model(inputs, means[key]).get_layer(key).name = f"{key}{MEAN_SUFFIX}"
        outputs[key] = temperature_head(means[key], float(temperature), kinds[key], key)
    if not stacked:
        return _with_counts(assemble(inputs, keys, output_struct, outputs, name), method, weights, counts)
    single = not isinstance(output_struct, (dict, list, tuple))
    kept_weights = [float(weights[i]) for i in kept]
    measures = {}
    taken = set(keys) | {tensor.name for tensor in keras.tree.flatten(inputs)}
    for key in keys:
        if key in member_stacks:
            stack, stack_weights = member_stacks[key], kept_weights
        else:  # a fused output every member computes alike
            stack, stack_weights = [means[key]], [1.0]
        block = unique_name("uncertainty" if single else f"{key}_uncertainty", taken)
        taken.add(block)
        measures[key] = uncertainty_tensors(
            stack, means[key], outputs[key], stack_weights, kinds[key], "" if single else f"{key}_", block
        )
    named = uncertainty_outputs(keys, single, outputs, measures if uncertainty else {})
    if abstain:
        key = keys[0]
        named[ABSTAIN_KEY if single else f"{key}_{ABSTAIN_KEY}"] = abstain_head(
            inputs, outputs[key], measures[key], kinds[key], abstain_score, abstain_coverage, x_val
        )
    return _with_counts(keras.Model(inputs, named, name=name), method, weights, counts)


def _with_counts(model: keras.Model, method, weights, counts) -> keras.Model:
    """Fitted or selected weights, one per member kept by `last`, stay readable on the model:
    `ensemble_weights`, and `selection_counts` for weights="greedy"."""
    if method is not None:
        model.ensemble_weights = [float(w) for w in weights]
    if counts is not None:
        model.selection_counts = [int(c) for c in counts]
    return model
