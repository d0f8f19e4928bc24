"""What users pass in, checked in one place: inputs, labels, validation pairs and member outputs.

Every public function of the package (and the command line) reads its data through this module,
so the same data gets the same answer everywhere (docs/guide/inputs.md holds the table):

- inputs (`x`, `bn_data`, `x_val`): an array, a list or a dict of arrays with one row per
  example; floating arrays must be finite (NaN and inf are refused, naming the count and the first
  row), integer arrays (token ids) pass as they are;
- class labels (`y` of a classifier): integer classes of shape (N,) or (N, 1) (any integer or
  integral float dtype), or one-hot rows (N, C) of any dtype (int, float, bool). Soft labels
  (rows of a distribution) only where a cross-entropy against a distribution is what is computed:
  `distill(y=...)` and the weight fit (`fit_ensemble_weights`, `build_ensemble(weights="fit")`).
  Everywhere else (errors, NLL, ECE, temperature fits, the averaging guard) they are refused,
  never silently turned into their argmax;
- what a member output is: "classes" (a distribution over the last axis), "binary" (one sigmoid
  unit) or "values" (anything else: regression outputs, logits, multi-label sigmoids), decided by
  `output_kind` from the graph (a softmax or sigmoid layer, activation or op) and, where the graph
  cannot tell (a custom layer, a Lambda), from the values the output takes;
- a probability row is accepted when its values lie in [-tol, 1 + tol] and sum to 1 within tol,
  tol by the output's dtype (`row_tolerance`): 1e-3 for float32 and float64, 1e-2 for float16,
  5e-2 for bfloat16 (outputs of mixed-precision members are probabilities too).

The model-structure helpers (`structures`, `output_items`, `input_items`) live here too, so that
this module sits below every other one: it imports nothing from keras_snapshot.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Sequence

import keras
import numpy as np

__all__: list[str] = []  # internal interface: nothing here is re-exported from keras_snapshot

EPSILON = 1e-7  # probabilities are clipped to [EPSILON, 1] before a logarithm, as in Keras's losses
CLASSES, BINARY, VALUES = "classes", "binary", "values"

# The tolerance of a probability row (its sum, and the [0, 1] range), by the output's dtype: a
# float16 softmax over 10 classes rounds each value to ~5e-4, so its rows sum to 1 only to ~1e-2.
ROW_TOLERANCE = {"float64": 1e-3, "float32": 1e-3, "float16": 1e-2, "bfloat16": 5e-2}


# ---------------------------------------------------------------------------------------- model structure
def structures(model: keras.Model, label: str):
    """(inputs, outputs) of a model as it was built: a tensor, a list or a dict of KerasTensors."""
    try:
        if isinstance(model, keras.Sequential):
            return model.inputs[0], model.outputs[0]
        inputs, outputs = model.input, model.output
        if not isinstance(model.inputs, list) or not model.inputs:
            raise AttributeError
        # Keras 3.10 saves a single input (output) as a one-item list and its files reload that
        # way on every later version; 3.11+ unwrap it. Both are the same model: use the tensor.
        inputs, outputs = _unwrap_single(inputs), _unwrap_single(outputs)
    except (AttributeError, ValueError):
        raise ValueError(
            f"{label} has no symbolic inputs: members must be functional or Sequential models built on "
            "keras.Input (subclassed models cannot be combined into one graph)."
        ) from None
    return inputs, outputs


def _unwrap_single(struct):
    return struct[0] if isinstance(struct, (list, tuple)) and len(struct) == 1 else struct


def flat_items(struct, names: Sequence[str], what: str, label: str) -> list[tuple[str, object]]:
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


def output_names(model: keras.Model) -> list[str]:
    if isinstance(model, keras.Sequential):
        return [model.layers[-1].name]
    return list(model.output_names)


def output_items(model: keras.Model, label: str = "the model") -> list[tuple[str, object]]:
    return flat_items(structures(model, label)[1], output_names(model), "outputs", label)


def input_items(model: keras.Model, label: str = "the model") -> list[tuple[str, object]]:
    inputs = structures(model, label)[0]
    names = [tensor.name for tensor in keras.tree.flatten(inputs)]
    return flat_items(inputs, names, "inputs", label)


# ---------------------------------------------------------------------------------------- arrays
def check_finite(array, what: str) -> None:
    """Refuses NaN and inf in a floating array, naming how many and the first row holding one."""
    array = np.asarray(array)
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.complexfloating)):
        return
    bad = ~np.isfinite(array)
    if not bad.any():
        return
    count = int(bad.sum())
    rows = bad.reshape(bad.shape[0], -1).any(axis=1) if array.ndim else bad.reshape(1)
    first = int(np.argmax(rows))
    raise ValueError(
        f"`{what}` holds {count} NaN or infinite value(s) in {int(rows.sum())} row(s), the first in row "
        f"{first}: remove or impute those rows before passing the data."
    )


def refuse_streams(data, name: str, why: str | None = None) -> None:
    """In-memory arrays only: say why (`why`, the caller's reason, or the general one) and what to do
    for datasets, generators and loaders."""
    kind = None
    if isinstance(data, keras.utils.PyDataset):
        kind = "a keras.utils.PyDataset"
    elif hasattr(data, "as_numpy_iterator") or type(data).__module__.startswith("tensorflow.python.data"):
        kind = "a tf.data.Dataset"
    elif type(data).__name__ == "DataLoader":
        kind = "a torch DataLoader"
    elif hasattr(data, "__next__") or (hasattr(data, "__iter__") and not hasattr(data, "__len__")):
        kind = "a generator or iterator"
    if kind is not None:
        why = why or (
            "The members are run once over the whole data before anything else, so it must fit in memory."
        )
        raise TypeError(
            f"`{name}` is {kind}; pass in-memory arrays (a numpy array, a list or a dict of arrays). "
            f"{why} E.g. x = np.concatenate([batch for batch, *_ in dataset.as_numpy_iterator()])."
        )


def input_arrays(data, name: str, why_in_memory: str | None = None):
    """`data` as numpy arrays in its structure (one array, a list or a dict) and its row count.

    Refuses streams (saying `why_in_memory`, see `refuse_streams`), scalars, object arrays, arrays
    of different lengths, no rows, and NaN / inf.
    """
    refuse_streams(data, name, why_in_memory)
    if isinstance(data, dict):
        arrays = {str(key): np.asarray(value) for key, value in data.items()}
        leaves = list(arrays.items())
    elif isinstance(data, (list, tuple)):
        arrays = [np.asarray(value) for value in data]
        leaves = [(f"{name}[{i}]", value) for i, value in enumerate(arrays)]
    else:
        arrays = np.asarray(data)
        leaves = [(name, arrays)]
    if not leaves:
        raise ValueError(f"`{name}` is empty: pass the inputs as arrays.")
    for _, leaf in leaves:
        if leaf.ndim == 0 or leaf.dtype == object:
            raise ValueError(
                f"`{name}` must hold numeric arrays with a batch axis first, got an array of shape "
                f"{leaf.shape} and dtype {leaf.dtype}."
            )
    rows = {leaf.shape[0] for _, leaf in leaves}
    if len(rows) != 1:
        raise ValueError(f"The arrays of `{name}` have different numbers of rows: {sorted(rows)}.")
    count = rows.pop()
    if count == 0:
        raise ValueError(f"`{name}` has no rows.")
    for key, leaf in leaves:
        check_finite(leaf, key if key == name or key.startswith(f"{name}[") else f"{name}[{key!r}]")
    return arrays, count


def rows_of(x, what: str) -> int:
    """The number of examples in `x` (an array, a list or a dict of arrays of equal length), after
    refusing NaN and inf in it."""
    return input_arrays(x, what)[1]


def targets(y, count: int, what: str) -> np.ndarray:
    """Numeric, finite targets with one row per example (any shape after the first axis)."""
    refuse_streams(y, what)
    y = np.asarray(y)
    if y.ndim == 0 or y.shape[0] != count:
        raise ValueError(
            f"`{what}` has {y.shape[0] if y.ndim else 0} rows but the inputs have {count}: pass one target "
            "per example."
        )
    if not np.issubdtype(y.dtype, np.number) and not np.issubdtype(y.dtype, np.bool_):
        raise TypeError(f"`{what}` must be numeric, got dtype {y.dtype}.")
    check_finite(y, what)
    return y


def validation_pair(validation_data, what: str = "validation_data", *, rows: bool = True) -> tuple:
    """(x_val, y_val) from a tuple or list of two: held-out data, never the test set; both checked
    (rows agree, NaN / inf refused). rows=False leaves the row count of y_val to the caller
    (several outputs matched later), still refusing NaN / inf."""
    if not (isinstance(validation_data, (tuple, list)) and len(validation_data) == 2):
        raise TypeError(
            f"`{what}` must be a tuple (x_val, y_val) of held-out validation data (never the test "
            f"set), got {type(validation_data).__name__}."
        )
    x_val, y_val = validation_data
    count = rows_of(x_val, f"{what}[0]")
    several = isinstance(y_val, dict) or (
        isinstance(y_val, (list, tuple))
        and len(y_val) > 0
        and all(np.ndim(leaf) >= 1 and (not rows or np.shape(leaf)[0] == count) for leaf in y_val)
    )
    if several:  # one array per output: each checked against the rows
        for key, leaf in y_val.items() if isinstance(y_val, dict) else enumerate(y_val):
            if rows:
                targets(leaf, count, f"{what}[1][{key!r}]")
            else:
                check_finite(leaf, f"{what}[1][{key!r}]")
    elif rows:
        y_val = targets(y_val, count, f"{what}[1]")
    else:
        y_val = np.asarray(y_val)
        check_finite(y_val, f"{what}[1]")
    return x_val, y_val


def check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"`batch_size` must be an integer >= 1, got {batch_size!r}.")
    return int(batch_size)


def check_temperature(temperature):
    """None, a finite float > 0, or "fit"."""
    if temperature is None or (isinstance(temperature, str) and temperature == "fit"):
        return temperature
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"`temperature` must be None, a number > 0 or 'fit', got {temperature!r}.")
    value = float(temperature)
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"`temperature` must be finite and > 0 (1.0 changes nothing), got {temperature!r}.")
    return value


def compatible(shape, expected) -> bool:
    return len(shape) == len(expected) and all(
        e is None or s == e for s, e in zip(shape, expected, strict=True)
    )


def check_inputs(arrays, model: keras.Model, label: str, name: str) -> None:
    """`arrays` fit the model's inputs: one array, a list in order or a dict by input name."""
    items = input_items(model, label)
    names = [key for key, _ in items]
    if isinstance(arrays, dict):
        if set(arrays) != set(names):
            raise ValueError(
                f"`{name}` has keys {sorted(arrays)}, but {label} has inputs {names}: pass a dict with "
                "exactly the input names."
            )
        given = [arrays[key] for key in names]
    elif isinstance(arrays, list):
        if len(arrays) != len(names):
            raise ValueError(
                f"`{name}` holds {len(arrays)} arrays, but {label} has {len(names)} inputs {names}."
            )
        given = arrays
    else:
        if len(names) != 1:
            raise ValueError(
                f"`{name}` is one array, but {label} has {len(names)} inputs {names}: pass a list or a dict."
            )
        given = [arrays]
    for key, array, (_, tensor) in zip(names, given, items, strict=True):
        expected = tuple(tensor.shape)[1:]
        if not compatible(array.shape[1:], expected):
            raise ValueError(
                f"`{name}` for input {key!r} has rows of shape {array.shape[1:]}, but {label} expects "
                f"{expected}."
            )


# ---------------------------------------------------------------------------------------- labels
def _integral(y: np.ndarray) -> bool:
    if np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.bool_):
        return True
    if not np.issubdtype(y.dtype, np.floating):
        return False
    return bool(np.all(np.isfinite(y)) and np.all(np.mod(y, 1) == 0))


def looks_like_labels(y: np.ndarray) -> bool:
    """Integer class labels, (N,) or (N, 1)."""
    return (y.ndim == 1 or (y.ndim == 2 and y.shape[1] == 1)) and _integral(y)


def is_one_hot(y: np.ndarray) -> bool:
    """Rows of one 1 and zeros elsewhere, (N, C) with C > 1, any numeric or bool dtype."""
    if not (y.ndim == 2 and y.shape[1] > 1):
        return False
    if not (np.issubdtype(y.dtype, np.number) or np.issubdtype(y.dtype, np.bool_)):
        return False
    values = y.astype("float64")
    return bool(np.all((values == 0) | (values == 1)) and np.all(values.sum(axis=1) == 1))


def is_soft(y: np.ndarray, classes: int) -> bool:
    """Rows of a distribution over `classes` (non-negative, summing to 1) that are not all one-hot."""
    if not (y.ndim == 2 and y.shape[1] == classes and classes > 1 and np.issubdtype(y.dtype, np.floating)):
        return False
    return bool(np.all(y >= 0) and np.allclose(y.sum(axis=1), 1.0, atol=1e-3)) and not is_one_hot(y)


def _label_rows(y, count: int, what: str, against: str) -> np.ndarray:
    """`y` as an array with one finite row per example (`against` names what holds `count` rows)."""
    y = np.asarray(y)
    if y.ndim == 0 or y.shape[0] != count:
        raise ValueError(
            f"`{what}` has {y.shape[0] if y.ndim else 0} rows but {against} have {count}: "
            "pass one label per example."
        )
    check_finite(y, what)
    return y


def labels(y, count: int, classes: int, what: str = "y") -> np.ndarray:
    """(N,) int64 class indices in [0, classes) from integer labels (N,) / (N, 1) or one-hot rows
    (N, C) of any dtype. Soft labels, NaN and labels out of range are refused."""
    y = _label_rows(y, count, what, "the predictions")
    if y.ndim == 2 and y.shape[1] == classes and classes > 1 and not looks_like_labels(y):
        if is_one_hot(y):
            return np.argmax(y, axis=1).astype("int64")
        if is_soft(y, classes):
            raise ValueError(
                f"`{what}` holds soft labels (rows of a distribution, not one-hot): this measure needs "
                "the true class of each example. Pass integer class labels of shape (N,) or one-hot rows "
                "(their argmax would silently change the data, so it is not taken)."
            )
        raise ValueError(
            f"`{what}` has shape {y.shape}: one-hot rows must hold a single 1 and zeros elsewhere "
            "(or pass integer labels of shape (N,))."
        )
    if not looks_like_labels(y):
        raise ValueError(
            f"`{what}` must be integer class labels of shape (N,) or (N, 1), or one-hot rows of shape "
            f"(N, {classes}); got shape {y.shape} and dtype {y.dtype}."
        )
    y = y.reshape(-1).astype("int64")
    if y.size and (y.min() < 0 or y.max() >= classes):
        raise ValueError(
            f"`{what}` holds class indices in [{y.min()}, {y.max()}], but the predictions have {classes} classes: "
            f"labels must lie in [0, {classes - 1}]."
        )
    return y


def distributions(y, count: int, classes: int, what: str = "y") -> tuple[np.ndarray, bool]:
    """(N, classes) float64 target rows, and whether `y` held class indices.

    Integer labels (N,) / (N, 1) become one-hot; one-hot rows of any dtype and soft labels (rows
    of a distribution) are taken as they are. For one sigmoid unit (classes == 1) `y` holds 0/1
    (or soft) targets in [0, 1], returned as [1 - y, y].
    """
    y = _label_rows(y, count, what, "the inputs")
    if classes == 1:
        if not (y.ndim == 1 or (y.ndim == 2 and y.shape[1] == 1)):
            raise ValueError(f"`{what}` for one sigmoid unit must have shape (N,) or (N, 1), got {y.shape}.")
        p = y.reshape(-1, 1).astype("float64")
        if np.any((p < 0) | (p > 1)):
            raise ValueError(f"`{what}` for one sigmoid unit must lie in [0, 1], got [{p.min()}, {p.max()}].")
        return np.concatenate([1.0 - p, p], axis=1), False
    if looks_like_labels(y):
        indices = labels(y, count, classes, what)
        return np.eye(classes)[indices], True
    if y.ndim == 2 and y.shape[1] == classes and (is_one_hot(y) or is_soft(y, classes)):
        return y.astype("float64"), False
    raise ValueError(
        f"`{what}` must be class indices of shape (N,) or (N, 1), one-hot rows or soft labels (rows of "
        f"a distribution) of shape (N, {classes}); got shape {y.shape} and dtype {y.dtype}."
    )


# ---------------------------------------------------------------------------------------- member outputs
def probabilities(p, what: str = "p") -> np.ndarray:
    """(N, C) float64 class probabilities; one sigmoid unit, (N,) or (N, 1), becomes [1 - p, p].
    NaN and inf are refused."""
    p = np.asarray(p, dtype="float64")
    if p.ndim == 1:
        p = p[:, None]
    if p.ndim != 2 or p.shape[1] < 1:
        raise ValueError(
            f"`{what}` must be probabilities of shape (N, C), or (N,) / (N, 1) for one sigmoid unit; "
            f"got shape {p.shape}."
        )
    check_finite(p, what)
    if p.shape[1] == 1:
        p = np.concatenate([1.0 - p, p], axis=1)
    return p


def member_probabilities(stack, what: str = "stack") -> np.ndarray:
    """(M, N, C) float64 member probabilities; (M, N) or (M, N, 1) sigmoid units become two classes.
    NaN and inf are refused."""
    stack = np.asarray(stack, dtype="float64")
    if stack.ndim == 2:
        stack = stack[..., None]
    if stack.ndim != 3 or stack.shape[0] < 1:
        raise ValueError(
            f"`{what}` must hold the members' probabilities, shape (M, N, C) (or (M, N, 1) for one "
            f"sigmoid unit); got shape {stack.shape}."
        )
    check_outputs_finite(stack, None, f"`{what}`")
    if stack.shape[2] == 1:
        stack = np.concatenate([1.0 - stack, stack], axis=2)
    return stack


def row_tolerance(dtype) -> float:
    """How far a probability row may stray from [0, 1] and from summing to 1, by its dtype."""
    name = keras.backend.standardize_dtype(dtype) if dtype is not None else "float32"
    return ROW_TOLERANCE.get(name, 1e-3)


def lowest_precision(dtypes) -> str:
    """The dtype with the loosest tolerance among `dtypes` (the members may differ)."""
    names = [keras.backend.standardize_dtype(d) for d in dtypes if d is not None] or ["float32"]
    return max(names, key=lambda name: ROW_TOLERANCE.get(name, 1e-3))


def distribution_rows(values: np.ndarray, dtype=None) -> bool:
    """Whether every row of `values` (..., C) is a probability distribution (one unit: in [0, 1])."""
    values = np.asarray(values, dtype="float64")
    tol = row_tolerance(dtype)
    if values.size == 0 or not np.all(np.isfinite(values)):
        return False
    if np.any(values < -tol) or np.any(values > 1 + tol):
        return False
    return values.shape[-1] == 1 or bool(np.max(np.abs(values.sum(axis=-1) - 1.0)) <= tol)


def check_outputs_finite(stack: np.ndarray, names: Sequence[str] | None, what: str = "output") -> None:
    """Refuses NaN / inf in the members' outputs (M, N, ...), naming the member and the first row:
    the inputs were checked, so the member itself produced them (diverged weights)."""
    stack = np.asarray(stack)
    for index, member in enumerate(stack):
        bad = ~np.isfinite(member)
        if bad.any():
            rows = bad.reshape(bad.shape[0], -1).any(axis=1)
            name = names[index] if names else f"member #{index + 1}"
            raise ValueError(
                f"{name}'s {what} holds {int(bad.sum())} NaN or infinite value(s) in {int(rows.sum())} "
                f"row(s), the first in row {int(np.argmax(rows))}, on finite inputs: its weights are "
                "probably NaN (a diverged snapshot). Leave it out (`last`, or drop it from the list)."
            )


def check_probabilities(stack: np.ndarray, hint: str, dtype=None, what: str = "The members' outputs") -> None:
    """Refuses outputs that are not probabilities (logits), naming the values seen and the fix."""
    stack = np.asarray(stack, dtype="float64")
    check_outputs_finite(stack[None] if stack.ndim < 3 else stack, None)
    if distribution_rows(stack, dtype):
        return
    tol = row_tolerance(dtype)
    inside = bool(np.all(stack >= -tol) and np.all(stack <= 1 + tol))
    seen = f"values in [{np.min(stack):.3g}, {np.max(stack):.3g}]"
    if inside and stack.shape[-1] > 1:
        sums = stack.sum(axis=-1)
        seen = f"rows summing to {np.min(sums):.4g}..{np.max(sums):.4g} (tolerance {tol:g} for {dtype or 'float32'})"
    raise ValueError(
        f"{what} are not probabilities ({seen}): they look like logits. Pass "
        f"output_activation={hint!r} so that probabilities are used."
    )


def _activation_of(op) -> str | None:
    """The activation that makes `op`'s output: a name, or None when `op` does not say."""
    if isinstance(op, keras.layers.Softmax):
        return "softmax"
    if isinstance(op, keras.layers.Layer) and hasattr(op, "activation") and callable(op.activation):
        return getattr(op.activation, "__name__", None) or "unknown"
    name = type(op).__name__.lower()  # keras.ops.softmax / sigmoid applied to a KerasTensor
    if not isinstance(op, keras.layers.Layer) and name in ("softmax", "sigmoid", "logsoftmax", "log_softmax"):
        return name
    return None


def producer(model: keras.Model, target):
    """The operation (layer or op) of `model` whose output is `target`, or None."""
    if isinstance(model, keras.Sequential):
        return model.layers[-1] if model.layers else None
    for op in reversed(list(getattr(model, "operations", []))):
        try:
            if any(tensor is target for tensor in keras.tree.flatten(op.output)):
                return op
        except (AttributeError, ValueError):  # an op called more than once has no single output
            continue
    return None


def graph_kind(model: keras.Model, key: str | None, position: int | None = None) -> str | None:
    """CLASSES / BINARY / VALUES as the graph says, or None when it cannot tell (a custom layer,
    a Lambda, a reshape after the activation)."""
    try:
        items = output_items(model)
    except ValueError:
        return None
    named = dict(items)
    if key in named:
        target = named[key]
    elif position is not None and position < len(items):
        target = items[position][1]
    else:
        return None
    units = target.shape[-1] if len(target.shape) > 1 else 1
    op = model.layers[-1] if isinstance(model, keras.Sequential) else producer(model, target)
    if op is None:
        # A nested model's `output` is its own graph's tensor, not the one of this call: a wrapper
        # (a user's model called under its ensemble name) ends in the model it wraps.
        operations = list(getattr(model, "operations", []))
        if operations and isinstance(operations[-1], keras.Model):
            op = operations[-1]
    if isinstance(op, keras.Model):  # a nested model (a wrapper, a member): its own output decides
        return graph_kind(op, key, 0 if position is None else position)
    activation = _activation_of(op) if op is not None else None
    if activation is None:
        return None
    return _kind(activation, units)


def _kind(activation: str | None, units) -> str:
    if activation == "softmax" and units != 1:
        return CLASSES
    if activation == "sigmoid" and units == 1:
        return BINARY
    return VALUES


def _probe(model: keras.Model, key: str | None, position: int | None) -> np.ndarray | None:
    """The output `key` of `model` on a few synthetic rows (zeros and noise), or None when the
    inputs' shapes are not all known."""
    try:
        items = input_items(model)
        inputs = structures(model, "the model")[0]
        rng = np.random.default_rng(0)
        arrays = {}
        for name, tensor in items:
            shape = tuple(tensor.shape)[1:]
            if any(d is None for d in shape):
                return None
            dtype = keras.backend.standardize_dtype(tensor.dtype)
            if "int" in dtype:
                arrays[name] = np.zeros((4, *shape), dtype=dtype)
            else:
                arrays[name] = np.concatenate([np.zeros((1, *shape)), rng.normal(size=(3, *shape))]).astype(
                    dtype
                )
        if isinstance(inputs, dict):
            feed = arrays
        elif isinstance(inputs, (list, tuple)):
            feed = [arrays[name] for name, _ in items]
        else:
            feed = arrays[items[0][0]]
        outputs = model(feed, training=False)
        flat = dict(zip([k for k, _ in output_items(model)], keras.tree.flatten(outputs), strict=False))
        value = flat.get(key) if key in flat else list(flat.values())[position or 0]
        return np.asarray(keras.ops.convert_to_numpy(value), dtype="float64")
    except Exception:  # the probe only refines the graph's answer
        return None


def output_kind(
    model: keras.Model,
    key: str | None,
    activation: str | None = None,
    position: int | None = None,
    values: np.ndarray | None = None,
    dtype=None,
) -> str:
    """What a member output holds: CLASSES ("classes", a distribution over the last axis),
    BINARY ("binary", one sigmoid unit) or VALUES ("values": regression outputs, logits,
    multi-label sigmoids).

    `activation` is the `output_activation` applied to it (None or "linear": the member's own).
    Decided from the graph (a softmax or sigmoid layer, activation or op makes the output); where
    the graph cannot tell, from `values` (the output's values, (..., N, C)) or, without them, from
    the output on a few synthetic rows.
    """
    units = None
    try:
        items = output_items(model)
        target = dict(items).get(key)
        if target is None and position is not None:
            target = items[position][1]
        units = target.shape[-1] if len(target.shape) > 1 else 1
        dtype = dtype or target.dtype
    except Exception:
        pass
    if activation not in (None, "linear"):
        return _kind(activation, units)
    kind = graph_kind(model, key, position)
    if kind is not None:
        return kind
    if values is None:
        values = _probe(model, key, position)
    if values is None or units is None:
        return VALUES
    if distribution_rows(values, dtype):
        if units == 1:
            return VALUES  # one unit in [0, 1] is as likely a regression output: the graph must say
        return CLASSES
    return VALUES


def check_activation(model: keras.Model, key: str, activation: str | None, position: int | None = None):
    """`activation` unless the output already is what it would make (then None, with a warning):
    softmax over probabilities, or sigmoid over one sigmoid unit, is never applied twice."""
    if activation in (None, "linear"):
        return activation
    kind = output_kind(model, key, None, position)
    units = None
    try:
        target = dict(output_items(model)).get(key)
        units = target.shape[-1] if target is not None and len(target.shape) > 1 else 1
    except Exception:
        pass
    would_make = _kind(activation, units)
    if kind == would_make and kind != VALUES:
        name = "softmax" if kind == CLASSES else "sigmoid"
        warnings.warn(
            f"The members' output {key!r} already ends in {name} (its values are probabilities); "
            f"output_activation={activation!r} is ignored for it rather than applied a second time. "
            "Pass output_activation only when the members output logits.",
            UserWarning,
            stacklevel=5,
        )
        return None
    return activation
