"""The snapshots as ONE functional Keras model, and member weights fitted on validation data.

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

import numbers
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import keras
import numpy as np

from keras_snapshot import fusion
from keras_snapshot import manifest as manifest_lib

__all__ = ["build_ensemble", "fit_ensemble_weights"]

MEMBER_PREFIX = "snapshot_"
_NAMED_LOSSES = {
    "categorical_crossentropy": "categorical_crossentropy",
    "sparse_categorical_crossentropy": "sparse_categorical_crossentropy",
    "binary_crossentropy": "binary_crossentropy",
    "mean_squared_error": "mean_squared_error",
    "mse": "mean_squared_error",
}
_EPSILON = 1e-7  # Keras's clipping of probabilities inside cross-entropies


# ---------------------------------------------------------------------------------------- sources
class _Member:
    """A loaded member: its model, its name in the ensemble, and how to name it in messages."""

    def __init__(self, model: keras.Model, name: str, label: str):
        self.model = model
        self.name = name
        self.label = label


def _check_last(last, available: int, where: str) -> int:
    if last is None:
        return available
    if isinstance(last, bool) or not isinstance(last, numbers.Integral):
        raise TypeError(f"`last` must be an integer or None, got {last!r} ({type(last).__name__}).")
    if not 1 <= last <= available:
        raise ValueError(
            f"`last`={last} is out of range: {where} holds {available} snapshot(s). "
            f"Pass 1 <= last <= {available}, or last=None for all of them."
        )
    return int(last)


def _sources(snapshots, last) -> list[tuple[str, object, str]]:
    """(member name, path or model, label) of the snapshots to use, oldest first, nothing loaded."""
    if isinstance(snapshots, (str, os.PathLike)):
        directory = Path(snapshots)
        if not directory.exists():
            raise FileNotFoundError(f"Snapshot directory {str(directory)!r} does not exist.")
        if not directory.is_dir():
            raise ValueError(
                f"{str(directory)!r} is not a directory. Pass a snapshot directory (with manifest.json), "
                f"or a list of .keras files, e.g. [{str(directory)!r}]."
            )
        manifest = manifest_lib.read_manifest(directory)
        if manifest is None:
            raise ValueError(
                f"{str(directory)!r} has no {manifest_lib.MANIFEST_NAME}, so it is not a snapshot directory "
                "written by SnapshotCallback. Pass the list of .keras files instead."
            )
        entries = sorted(manifest["snapshots"], key=lambda entry: entry["cycle"])
        if not entries:
            raise ValueError(
                f"{str(directory)!r} holds no snapshots yet ({manifest_lib.MANIFEST_NAME} lists none): "
                "train until at least one cycle has ended."
            )
        keep = _check_last(last, len(entries), repr(str(directory)))
        return [
            (
                f"{MEMBER_PREFIX}{entry['cycle']:02d}",
                directory / entry["file"],
                str(directory / entry["file"]),
            )
            for entry in entries[len(entries) - keep :]
        ]
    if isinstance(snapshots, keras.Model) or not isinstance(snapshots, Sequence):
        raise TypeError(
            "`snapshots` must be a snapshot directory, a list of .keras paths or a list of keras.Model, "
            f"got {type(snapshots).__name__}."
        )
    items = list(snapshots)
    if not items:
        raise ValueError("`snapshots` is empty: pass at least one snapshot.")
    keep = _check_last(last, len(items), "the list")
    sources = []
    for position, item in enumerate(items, start=1):
        if position <= len(items) - keep:
            continue  # skipped snapshots are never loaded
        name = f"{MEMBER_PREFIX}{position:02d}"
        if isinstance(item, keras.Model):
            sources.append((name, item, f"model #{position} ({item.name!r})"))
        elif isinstance(item, (str, os.PathLike)):
            sources.append((name, Path(item), str(item)))
        else:
            raise TypeError(
                f"`snapshots[{position - 1}]` must be a .keras path or a keras.Model, got "
                f"{type(item).__name__}."
            )
    return sources


def _load(path: Path, safe_mode: bool) -> keras.Model:
    if not path.is_file():
        raise FileNotFoundError(f"Snapshot file {str(path)!r} does not exist.")
    try:
        model = keras.saving.load_model(path, compile=False, safe_mode=safe_mode)
    except Exception as error:
        text = " ".join(str(error).split())
        if "safe_mode" in text:
            raise ValueError(
                f"Refusing to load {str(path)!r} in safe mode: it holds Python code (e.g. a Lambda layer) "
                f"that loading would run ({text}). Pass safe_mode=False only for files you trust."
            ) from error
        raise ValueError(
            f"Could not load snapshot {str(path)!r} ({type(error).__name__}: {text}). The file is corrupt or "
            "not a Keras model; remove it from the list, or restore it."
        ) from error
    if not isinstance(model, keras.Model):
        raise ValueError(f"{str(path)!r} holds a {type(model).__name__}, not a keras.Model.")
    return model


def _load_members(snapshots, last, safe_mode: bool) -> list[_Member]:
    sources = _sources(snapshots, last)
    # Every file must exist before the first (slow) load, so a typo fails at once.
    for _, source, _ in sources:
        if isinstance(source, Path) and not source.is_file():
            raise FileNotFoundError(f"Snapshot file {str(source)!r} does not exist.")
    seen = {}
    members = []
    for name, source, label in sources:
        if isinstance(source, keras.Model):
            if id(source) in seen:
                raise ValueError(f"{label} is the same model object as {seen[id(source)]}: pass each once.")
            seen[id(source)] = label
            model = source
        else:
            model = _load(source, safe_mode)  # each file is loaded exactly once
        members.append(_Member(model, name, label))
    return members


# ---------------------------------------------------------------------------------------- structure
def _structures(model: keras.Model, label: str):
    """(inputs, outputs) of a member as it was built: a tensor, a list or a dict of KerasTensors."""
    try:
        if isinstance(model, keras.Sequential):
            return model.inputs[0], model.outputs[0]
        inputs, outputs = model.input, model.output
        if not isinstance(model.inputs, list) or not model.inputs:
            raise AttributeError
    except (AttributeError, ValueError):
        raise ValueError(
            f"{label} has no symbolic inputs: members must be functional or Sequential models built on "
            "keras.Input (subclassed models cannot be combined into one graph)."
        ) from None
    return inputs, outputs


def _flat_items(struct, names: Sequence[str], what: str, label: str) -> list[tuple[str, object]]:
    """[(key, tensor)] of a tensor, a flat list or a flat dict: dict keys, else the layer names."""
    if isinstance(struct, dict):
        items = list(struct.items())
    elif isinstance(struct, (list, tuple)):
        items = list(zip(names, struct, strict=True))
    else:
        items = [(names[0], struct)]
    if any(isinstance(value, (dict, list, tuple)) for _, value in items):
        raise ValueError(
            f"{label} has nested {what}; build_ensemble supports a tensor, a list or a dict of tensors."
        )
    return [(str(key), value) for key, value in items]


def _output_names(model: keras.Model) -> list[str]:
    if isinstance(model, keras.Sequential):
        return [model.layers[-1].name]
    return list(model.output_names)


def _output_items(model: keras.Model, label: str = "the model") -> list[tuple[str, object]]:
    return _flat_items(_structures(model, label)[1], _output_names(model), "outputs", label)


def _input_items(model: keras.Model, label: str = "the model") -> list[tuple[str, object]]:
    inputs = _structures(model, label)[0]
    names = [tensor.name for tensor in keras.tree.flatten(inputs)]
    return _flat_items(inputs, names, "inputs", label)


def _signature(member: _Member) -> dict[str, str]:
    """What members must agree on. Names count only for dict structures, where they are the keys:
    positional inputs and outputs of models built apart get different automatic names."""

    def describe(struct, items, with_dtype):
        keyed = isinstance(struct, dict)
        return (
            f"{type(struct).__name__} ["
            + ", ".join(
                (f"{key}: " if keyed else "") + f"{tuple(t.shape)}" + (f" {t.dtype}" if with_dtype else "")
                for key, t in items
            )
            + "]"
        )

    inputs, outputs = _structures(member.model, member.label)
    return {
        "inputs": describe(inputs, _input_items(member.model, member.label), True),
        # Output dtypes may differ: a float16 member still averages fine.
        "outputs": describe(outputs, _output_items(member.model, member.label), False),
    }


def _check_agreement(members: list[_Member]) -> None:
    reference = _signature(members[0])
    for member in members[1:]:
        signature = _signature(member)
        for what in ("inputs", "outputs"):
            if signature[what] != reference[what]:
                raise ValueError(
                    f"Snapshots disagree on their {what}: {member.label} has {signature[what]}, "
                    f"{members[0].label} has {reference[what]}. All members of an ensemble need the same "
                    "inputs and outputs (structure, shapes, input dtypes, dict keys)."
                )


def _activations(output_activation, keys: list[str], members: list[_Member]) -> dict[str, str | None]:
    """The activation applied to each member output, by output key."""
    if output_activation is None or isinstance(output_activation, str):
        per_key = dict.fromkeys(keys, output_activation)
    elif isinstance(output_activation, dict):
        unknown = set(output_activation) - set(keys)
        if unknown:
            raise ValueError(
                f"`output_activation` names outputs {sorted(unknown)} that the members do not have; "
                f"their outputs are {keys}."
            )
        per_key = {key: output_activation.get(key) for key in keys}
    else:
        raise TypeError(
            "`output_activation` must be None, an activation name such as 'softmax', or a dict "
            f"{{output name: activation name}}, got {output_activation!r}."
        )
    for key, name in per_key.items():
        if name is None:
            continue
        if not isinstance(name, str):
            raise TypeError(f"`output_activation` for {key!r} must be an activation name, got {name!r}.")
        try:
            keras.activations.get(name)
        except (ValueError, TypeError):
            raise ValueError(
                f"`output_activation` {name!r} is not a Keras activation; use e.g. 'softmax' or 'sigmoid'."
            ) from None
        # Softmax over probabilities is not an error Keras would catch, only a flatter average.
        last_layer = _last_layer(members[0].model, key)
        current = getattr(getattr(last_layer, "activation", None), "__name__", None)
        if current == name:
            warnings.warn(
                f"The members' output {key!r} already ends in {name}; output_activation={name!r} applies "
                "it a second time. Pass output_activation only when the members output logits.",
                UserWarning,
                stacklevel=4,
            )
    return per_key


def _last_layer(model: keras.Model, key: str):
    try:
        if isinstance(model, keras.Sequential):
            return model.layers[-1]
        outputs = dict(_output_items(model))
        return outputs[key]._keras_history[0]
    except Exception:  # only used for a warning
        return None


# ---------------------------------------------------------------------------------------- the graph
def _frame(members: list[_Member], output_activation):
    """What every form of the ensemble shares: fresh inputs (the members' names, shapes and dtypes),
    the output keys, the output structure and the activation applied to each member output."""
    _check_agreement(members)
    reference = members[0].model
    input_struct, output_struct = _structures(reference, members[0].label)
    inputs = keras.tree.map_structure(
        lambda tensor: keras.Input(
            batch_shape=tuple(tensor.shape),
            dtype=tensor.dtype,
            sparse=bool(getattr(tensor, "sparse", False)),
            name=tensor.name,
        ),
        input_struct,
    )
    keys = [key for key, _ in _output_items(reference, members[0].label)]
    return inputs, keys, output_struct, _activations(output_activation, keys, members)


def _taps(members: list[_Member], inputs, keys, activations) -> dict[str, dict[str, object]]:
    """Every member called on `inputs`: {member name: {key: its output after the activation}}."""
    taps = {}
    for member in members:
        # A member keeps the name it was saved with; identical names would clash in one graph.
        member.model.name = member.name
        outputs = member.model(inputs)
        items = _flat_items(outputs, keys, "outputs", member.label)
        taps[member.name] = {
            key: keras.layers.Activation(activations[key] or "linear", name=f"{member.name}_{key}")(tensor)
            for key, tensor in items
        }
    return taps


def _member_graph(members: list[_Member], output_activation):
    """Fresh inputs, every member called on them, and each member output's tap (activation) tensor.

    Returns (inputs structure, output keys, output structure kind, {member name: {key: tap}}).
    """
    inputs, keys, output_struct, activations = _frame(members, output_activation)
    return inputs, keys, output_struct, _taps(members, inputs, keys, activations)


def _combine(inputs, keys, output_struct, taps, weights, name: str) -> keras.Model:
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
    return _model(inputs, keys, output_struct, combined, name)


def _model(inputs, keys, output_struct, combined: dict, name: str) -> keras.Model:
    """The ensemble model, its outputs in the members' structure (a tensor, a list or a dict)."""
    if isinstance(output_struct, dict):
        outputs = combined
    elif isinstance(output_struct, (list, tuple)):
        outputs = [combined[key] for key in keys]
    else:
        outputs = combined[keys[0]]
    return keras.Model(inputs, outputs, name=name)


def _member_output_tensors(model: keras.Model) -> dict[str, dict[str, object]]:
    """{member name: {output key: tensor}} of an ensemble made by `build_ensemble` (after reload too)."""
    members = [layer.name for layer in model.layers if isinstance(layer, keras.Model)]
    keys = [key for key, _ in _output_items(model)]
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


# ---------------------------------------------------------------------------------------- weights
def _check_weights(weights, count: int) -> np.ndarray:
    try:
        array = np.asarray(weights, dtype="float64")
    except (TypeError, ValueError):
        raise TypeError(
            f"`weights` must be a sequence of non-negative numbers, 'fit' or None, got {weights!r}."
        ) from None
    if array.ndim != 1 or array.size != count:
        raise ValueError(
            f"`weights` has {array.size} entries but the ensemble has {count} member(s): pass one weight "
            "per member kept (after `last`)."
        )
    if not np.all(np.isfinite(array)) or np.any(array < 0):
        raise ValueError(f"`weights` must be finite and >= 0, got {array.tolist()}.")
    total = array.sum()
    if total <= 0:
        raise ValueError("`weights` are all zero: at least one member needs a positive weight.")
    return array / total


def _project_to_simplex(vector: np.ndarray) -> np.ndarray:
    """Euclidean projection onto {w >= 0, sum w = 1} (Duchi et al., 2008)."""
    ordered = np.sort(vector)[::-1]
    cumulative = np.cumsum(ordered) - 1.0
    index = np.arange(1, vector.size + 1)
    rho = np.nonzero(ordered - cumulative / index > 0)[0][-1]
    return np.maximum(vector - cumulative[rho] / (rho + 1.0), 0.0)


def _objective(loss, stack: np.ndarray, y: np.ndarray, key: str) -> Callable[[np.ndarray], tuple]:
    """f(w) -> (loss of the w-weighted mean of the member predictions, gradient in w).

    `stack` holds the M member predictions, shape (M, N, ...).
    """
    if callable(loss):

        def value(w):
            return float(loss(y, np.tensordot(w, stack, axes=1)))

        def numeric(w):  # central differences: M is small, the user's loss is a black box
            f = value(w)
            grad = np.empty_like(w)
            for i in range(w.size):
                step = np.zeros_like(w)
                step[i] = 1e-6
                grad[i] = (value(w + step) - value(w - step)) / 2e-6
            return f, grad

        return numeric

    name = _loss_name(loss, stack, y, key)
    if name == "sparse_categorical_crossentropy":
        labels = y.reshape(stack.shape[1:-1]).astype("int64")
        if labels.min() < 0 or labels.max() >= stack.shape[-1]:
            raise ValueError(
                f"The labels of output {key!r} must lie in [0, {stack.shape[-1] - 1}], got "
                f"[{labels.min()}, {labels.max()}]."
            )
        # Only the true class's probability matters: gather it once.
        picked = np.take_along_axis(stack, labels[None, ..., None], axis=-1)[..., 0].reshape(
            stack.shape[0], -1
        )

        def sparse(w):
            p = np.clip(w @ picked, _EPSILON, None)
            return float(-np.mean(np.log(p))), -(picked / p).mean(axis=1)

        return sparse
    if y.size != stack[0].size:
        raise ValueError(
            f"`y_val` for output {key!r} has shape {y.shape}, the predictions {stack.shape[1:]}: "
            f"{name} needs targets of the predictions' shape."
        )
    flat = stack.reshape(stack.shape[0], -1)
    target = y.reshape(-1).astype("float64")
    rows = stack[0].size // stack.shape[-1]  # losses are means over samples, not over classes
    if name == "categorical_crossentropy":

        def categorical(w):
            p = np.clip(w @ flat, _EPSILON, None)
            return float(-np.sum(target * np.log(p)) / rows), -(flat * (target / p)).sum(axis=1) / rows

        return categorical
    if name == "binary_crossentropy":

        def binary(w):
            p = np.clip(w @ flat, _EPSILON, 1 - _EPSILON)
            value = -np.mean(target * np.log(p) + (1 - target) * np.log(1 - p))
            return float(value), -(flat * (target / p - (1 - target) / (1 - p))).mean(axis=1)

        return binary

    def squared(w):
        residual = w @ flat - target
        return float(np.mean(residual**2)), 2 * (flat * residual).mean(axis=1)

    return squared


def _loss_name(loss, stack: np.ndarray, y: np.ndarray, key: str) -> str:
    probabilities = bool(np.all(stack >= -1e-6) and np.all(stack <= 1 + 1e-6))
    if loss is None:
        classes = stack.shape[-1]
        integral = np.issubdtype(y.dtype, np.integer) or (y.size and np.all(np.mod(y, 1) == 0))
        if classes > 1 and integral and y.shape in (stack.shape[1:-1], (*stack.shape[1:-1], 1)):
            loss = "sparse_categorical_crossentropy"
        elif y.shape == stack.shape[1:] and classes > 1:
            loss = "categorical_crossentropy"
        elif y.shape in (stack.shape[1:], stack.shape[1:-1]) and classes == 1 and np.isin(y, (0, 1)).all():
            loss = "binary_crossentropy"
        else:
            raise ValueError(
                f"Cannot tell which loss to minimise for output {key!r} (predictions {stack.shape[1:]}, "
                f"targets {y.shape}): pass loss='categorical_crossentropy', "
                "'sparse_categorical_crossentropy', 'binary_crossentropy', 'mse' or a function."
            )
    if not isinstance(loss, str) or loss not in _NAMED_LOSSES:
        raise ValueError(f"`loss` must be one of {sorted(_NAMED_LOSSES)} or a function, got {loss!r}.")
    name = _NAMED_LOSSES[loss]
    if name != "mean_squared_error" and not probabilities:
        raise ValueError(
            f"The members' output {key!r} is not a probability (values outside [0, 1]), so {name} is "
            "undefined: pass output_activation='softmax' (or 'sigmoid') when the members output logits."
        )
    return name


def _fit_simplex(objectives: list[Callable], count: int, max_iter: int, tolerance: float) -> np.ndarray:
    """Projected gradient descent with backtracking, from equal weights.

    The loss of a mixture is convex in the weights for cross-entropy and squared error, so the
    minimum over the simplex is global; every accepted step lowers the loss, so the result is never
    worse on the validation data than equal weights.
    """

    def total(w):
        values, grads = zip(*(objective(w) for objective in objectives), strict=True)
        return sum(values), np.sum(grads, axis=0)

    w = np.full(count, 1.0 / count)
    if count == 1:
        return w
    value, grad = total(w)
    if not (np.isfinite(value) and np.all(np.isfinite(grad))):
        raise ValueError(
            f"The validation loss at equal weights is {value}: check x_val/y_val for NaN or infinite values."
        )
    step = 1.0
    for _ in range(max_iter):
        while True:
            candidate = _project_to_simplex(w - step * grad)
            moved = candidate - w
            new_value, new_grad = total(candidate)
            # Sufficient decrease for projected gradient steps (Beck & Teboulle).
            decrease = new_value <= value + grad @ moved + (moved @ moved) / (2 * step)
            if (np.isfinite(new_value) and decrease) or step < 1e-12:
                break
            step /= 2
        if (
            not np.isfinite(new_value) or new_value > value
        ):  # no step lowers the loss: w is optimal to working precision
            break
        converged = np.abs(moved).sum() < tolerance
        w, value, grad = candidate, new_value, new_grad
        if converged:
            break
        step *= 2
    return w


def _fitted_weights(members, inputs, keys, output_struct, taps, validation_data, loss, batch_size, max_iter):
    if not (isinstance(validation_data, (tuple, list)) and len(validation_data) == 2):
        raise TypeError(
            "`validation_data` must be a tuple (x_val, y_val) of held-out validation data (never the test "
            f"set), got {type(validation_data).__name__}."
        )
    x_val, y_val = validation_data
    flat_taps = [taps[member.name][key] for member in members for key in keys]
    # One predict pass runs every member once on the validation data.
    predictions = keras.Model(inputs, flat_taps).predict(x_val, batch_size=batch_size, verbose=0)
    predictions = [np.asarray(p, dtype="float64") for p in keras.tree.flatten(predictions)]
    if isinstance(output_struct, dict):
        if not isinstance(y_val, dict) or set(y_val) != set(keys):
            raise ValueError(
                f"`y_val` must be a dict with the output keys {keys}, got {type(y_val).__name__}."
            )
        targets = [y_val[key] for key in keys]
    elif isinstance(output_struct, (list, tuple)):
        if isinstance(y_val, dict) and set(y_val) == set(keys):
            targets = [y_val[key] for key in keys]
        elif isinstance(y_val, (list, tuple)) and len(y_val) == len(keys):
            targets = list(y_val)
        else:
            raise ValueError(f"`y_val` must be a list of {len(keys)} arrays (outputs {keys}).")
    else:
        targets = [y_val]
    if isinstance(loss, dict):
        missing = set(keys) - set(loss)
        if missing:
            raise ValueError(f"`loss` has no entry for outputs {sorted(missing)}.")
        losses = [loss[key] for key in keys]
    else:
        losses = [loss] * len(keys)
    objectives = []
    for index, key in enumerate(keys):
        stack = np.stack([predictions[m * len(keys) + index] for m in range(len(members))])
        y = np.asarray(targets[index])
        if y.shape[:1] != stack.shape[1:2]:
            raise ValueError(
                f"`y_val` for output {key!r} has {y.shape[0] if y.ndim else 0} rows but x_val has "
                f"{stack.shape[1]}."
            )
        objectives.append(_objective(losses[index], stack, y, key))
    return _fit_simplex(objectives, len(members), max_iter=max_iter, tolerance=1e-9)


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
    count = len(_sources(snapshots, last))
    if weights is not None and not fit:
        weights = _check_weights(weights, count)
    if not isinstance(fuse, bool):
        raise TypeError(f"`fuse` must be True or False, got {fuse!r}.")
    members = _load_members(snapshots, last, safe_mode)
    inputs, keys, output_struct, activations = _frame(members, output_activation)
    # The branches are built only where they are used: the branch graph, or the weight fit.
    taps = _taps(members, inputs, keys, activations) if fit or not fuse else None
    if fit:
        weights = _fitted_weights(
            members, inputs, keys, output_struct, taps, validation_data, None, None, max_iter=1000
        )
    if not fuse:
        return _combine(inputs, keys, output_struct, taps, weights, name)
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
    return _model(inputs, keys, output_struct, combined, name)


def fit_ensemble_weights(
    snapshots: str | os.PathLike | Sequence[str | os.PathLike | keras.Model],
    validation_data: tuple,
    *,
    last: int | None = None,
    loss: str | Callable | dict | None = None,
    output_activation: str | dict[str, str | None] | None = None,
    safe_mode: bool = True,
    batch_size: int | None = None,
    max_iter: int = 1000,
) -> np.ndarray:
    """Member weights that minimise the validation loss of the weighted mean, over the simplex.

    Fit them on held-out validation data, never on the test set: weights chosen on the data you
    report on overstate the ensemble's accuracy (a common mistake of "optimised" snapshot
    ensembles). Each member is run once on `x_val`; the weights are then found in numpy by
    projected gradient descent from equal weights (the loss is convex in the weights for
    cross-entropy and squared error), so they are never worse than equal weights on that data.

    Args:
        snapshots: as for `build_ensemble` (a snapshot directory, `.keras` paths or models).
        validation_data: (x_val, y_val), held-out validation data (never the test set); y_val has
            the members' output structure (an array, a list or a dict of arrays).
        last: use only the last m snapshots.
        loss: "sparse_categorical_crossentropy", "categorical_crossentropy",
            "binary_crossentropy", "mse", a function `loss(y_true, y_pred) -> float` on numpy
            arrays, or a dict of these per output. None picks a cross-entropy from the targets:
            integer labels -> sparse, one-hot -> categorical, 0/1 with one unit -> binary.
        output_activation: as for `build_ensemble`; the weights apply to the activated outputs.
        safe_mode: as for `build_ensemble`.
        batch_size: the batch size of the prediction pass.
        max_iter: the most optimisation steps.

    Returns:
        A float64 array of one weight per member kept, >= 0, summing to 1; pass it to
        `build_ensemble(..., weights=w)`.

    Example:

    ```python
    import keras, numpy as np, keras_snapshot
    x, y = np.random.rand(512, 8).astype("float32"), np.random.randint(0, 3, 512)
    x_train, y_train, x_val, y_val = x[:400], y[:400], x[400:], y[400:]   # keep a validation split
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3, activation="softmax")])
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9), "sparse_categorical_crossentropy")
    model.fit(x_train, y_train, batch_size=32, epochs=6, verbose=0,
              callbacks=[keras_snapshot.SnapshotCallback("snapshots", cycles=3)])
    w = keras_snapshot.fit_ensemble_weights("snapshots", (x_val, y_val))
    ensemble = keras_snapshot.build_ensemble("snapshots", weights=w)
    # or in one call, loading each snapshot once:
    ensemble = keras_snapshot.build_ensemble("snapshots", weights="fit", validation_data=(x_val, y_val))
    ```
    """
    if not isinstance(safe_mode, bool):
        raise TypeError(f"`safe_mode` must be True or False, got {safe_mode!r}.")
    if isinstance(max_iter, bool) or not isinstance(max_iter, numbers.Integral) or max_iter < 1:
        raise ValueError(f"`max_iter` must be an integer >= 1, got {max_iter!r}.")
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1
    ):
        raise ValueError(f"`batch_size` must be an integer >= 1 or None, got {batch_size!r}.")
    if not (
        loss is None
        or callable(loss)
        or isinstance(loss, dict)
        or (isinstance(loss, str) and loss in _NAMED_LOSSES)
    ):
        raise ValueError(f"`loss` must be one of {sorted(_NAMED_LOSSES)}, a function or None, got {loss!r}.")
    _sources(snapshots, last)  # a bad `last` fails before any load
    members = _load_members(snapshots, last, safe_mode)
    inputs, keys, output_struct, taps = _member_graph(members, output_activation)
    weights = _fitted_weights(
        members, inputs, keys, output_struct, taps, validation_data, loss, batch_size, int(max_iter)
    )
    return weights
