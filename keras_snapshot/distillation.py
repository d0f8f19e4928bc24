"""Knowledge distillation: one student trained on the snapshot ensemble's averaged probabilities.

Serving a snapshot ensemble costs M forward passes. `distill` trains ONE model, the student, to
match the ensemble's softened probabilities (Hinton et al., 2015), so that it serves at the cost
of one member. Labels are optional: unlabeled inputs are the common case.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np

from keras_snapshot.inputs import (
    check_inputs,
    compatible,
    distribution_rows,
    distributions,
    input_arrays,
    output_items,
    refuse_streams,
    row_tolerance,
    structures,
)
from keras_snapshot.members import (
    MEMBER_PREFIX,
    Member,
    check_agreement,
    load_members,
    member_predictions,
    output_dtype,
    resolve_activations,
    snapshot_sources,
)

__all__ = ["distill"]

EPSILON = 1e-7  # Keras's clipping of probabilities inside cross-entropies
# The default recipe (see `distill`'s docstring and docs/guide/one-model.md for the measurements).
DEFAULT_TEMPERATURE = 1.0
DEFAULT_ALPHA = 0.5
FALLBACK_LEARNING_RATE = 1e-3  # Adam's peak rate when the teacher's optimizer cannot be read
FALLBACK_EPOCHS = 10  # the student's epochs when the teacher's run length cannot be read


# ---------------------------------------------------------------------------------------- the loss
@keras.saving.register_keras_serializable(package="keras_snapshot")
class DistillationLoss(keras.losses.Loss):
    """(1 - alpha) * T^2 * KL(teacher_T || student_T) + alpha * CE(labels, student), per sample.

    `y_true` holds the teacher's probabilities already softened at temperature T (computed once,
    in numpy) and, when `labelled`, the one-hot labels after them on the last axis. `y_pred` is
    the student's probabilities, softened here: softmax(log(p) / T). A single sigmoid unit
    (`binary`) is the two-class distribution [1 - p, p].
    """

    def __init__(
        self,
        temperature: float = 2.0,
        alpha: float = 0.5,
        labelled: bool = False,
        binary: bool = False,
        name: str = "distillation",
        reduction: str = "sum_over_batch_size",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.labelled = bool(labelled)
        self.binary = bool(binary)

    def call(self, y_true, y_pred):
        ops = keras.ops
        y_true = ops.cast(y_true, "float32")
        y_pred = ops.cast(y_pred, "float32")
        if self.binary:
            y_pred = ops.concatenate([1.0 - y_pred, y_pred], axis=-1)
        width = y_pred.shape[-1]
        log_p = ops.log(ops.clip(y_pred, EPSILON, 1.0))
        soft = y_true[..., :width]
        log_student = ops.log_softmax(log_p / self.temperature, axis=-1)
        kl = ops.sum(soft * (ops.log(ops.clip(soft, 1e-12, 1.0)) - log_student), axis=-1)
        scale = self.temperature**2
        if not self.labelled:
            return scale * kl
        cross_entropy = -ops.sum(y_true[..., width:] * log_p, axis=-1)
        return (1.0 - self.alpha) * scale * kl + self.alpha * cross_entropy

    def get_config(self):
        config = super().get_config()
        config.update(
            temperature=self.temperature, alpha=self.alpha, labelled=self.labelled, binary=self.binary
        )
        return config


@keras.saving.register_keras_serializable(package="keras_snapshot")
def teacher_agreement(y_true, y_pred):
    """1 where the student's top-1 class is the teacher's, else 0 (per sample)."""
    ops = keras.ops
    y_true = ops.cast(y_true, "float32")
    y_pred = ops.cast(y_pred, "float32")
    if y_pred.shape[-1] == 1:
        student = ops.cast(y_pred[..., 0] > 0.5, "int32")
        teacher = ops.cast(ops.argmax(y_true[..., :2], axis=-1), "int32")
    else:
        student = ops.cast(ops.argmax(y_pred, axis=-1), "int32")
        teacher = ops.cast(ops.argmax(y_true[..., : y_pred.shape[-1]], axis=-1), "int32")
    return ops.cast(ops.equal(student, teacher), "float32")


def soften(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log(p) / T) over the last axis; one sigmoid unit becomes [1 - p, p] first."""
    p = np.asarray(probabilities, dtype="float64")
    if p.shape[-1] == 1:
        p = np.concatenate([1.0 - p, p], axis=-1)
    logits = np.log(np.clip(p, EPSILON, 1.0)) / temperature
    logits -= logits.max(axis=-1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=-1, keepdims=True)


# ---------------------------------------------------------------------------------------- checks
def _check_number(value, name: str, low: float, high: float | None, low_open: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value):
        raise TypeError(f"`{name}` must be a finite number, got {value!r}.")
    value = float(value)
    if (value <= low if low_open else value < low) or (high is not None and value > high):
        bound = f"> {low}" if low_open else f">= {low}"
        bound += f" and <= {high}" if high is not None else ""
        raise ValueError(f"`{name}` must be {bound}, got {value}.")
    return value


def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")
    return int(value)


# Why distill refuses a dataset or a generator (keras_snapshot.inputs.refuse_streams says what to do).
_IN_MEMORY = (
    "distill computes the teacher's probabilities once, before training, with each member run once over "
    "the data; a stream would have to run all M members at every step of every epoch."
)


def as_arrays(data, name: str):
    """data as numpy arrays in its structure (one array, a list or a dict), and its row count;
    streams refused with distill's reason, NaN / inf refused naming the first row."""
    return input_arrays(data, name, _IN_MEMORY)


def _check_probabilities(values: np.ndarray, what: str, hint: str, dtype=None) -> None:
    """Probabilities over the last axis, within the row tolerance of `dtype` (float16 looser)."""
    if distribution_rows(values, dtype):
        return
    finite = bool(np.all(np.isfinite(values)))
    seen = f"values in [{np.nanmin(values):.3g}, {np.nanmax(values):.3g}]" if finite else "NaN or inf values"
    tol = row_tolerance(dtype)
    if finite and values.shape[-1] > 1 and np.all(values >= -tol) and np.all(values <= 1 + tol):
        sums = values.sum(axis=-1)
        seen = f"rows summing to {np.min(sums):.4g}..{np.max(sums):.4g}"
    raise ValueError(
        f"{what} are not probabilities over the last axis ({seen}). distill matches distributions: {hint}"
    )


def _hard_labels(y, key: str, output_shape: tuple, rows: int) -> tuple[np.ndarray, bool]:
    """Target rows of width max(C, 2) and whether they were integer class indices.

    The shared label rules (keras_snapshot.inputs): class indices (N,) / (N, 1), one-hot rows of
    any dtype, or soft labels (a distribution per row); 0/1 (or soft) targets for one sigmoid unit.
    """
    what = f"y (output {key!r})"
    if len(output_shape) == 1:
        return distributions(y, rows, output_shape[-1], what)
    # Outputs with more axes (per-pixel classes): class indices of the leading shape, or one-hot rows.
    y = np.asarray(y)
    classes = output_shape[-1]
    if y.shape[:1] != (rows,):
        raise ValueError(f"`{what}` has {y.shape[0] if y.ndim else 0} rows but `x` has {rows}.")
    flat_shape = (rows * int(np.prod(output_shape[:-1])),)
    if y.shape[1:] == output_shape:
        flat = distributions(y.reshape(-1, classes), flat_shape[0], classes, what)[0]
        return flat.reshape((rows, *output_shape[:-1], max(classes, 2))), False
    if y.shape[1:] in (output_shape[:-1], (*output_shape[:-1], 1)):
        flat, integer = distributions(y.reshape(-1), flat_shape[0], classes, what)
        return flat.reshape((rows, *output_shape[:-1], max(classes, 2))), integer
    raise ValueError(
        f"`{what}` has rows of shape {y.shape[1:]}: pass class indices of shape "
        f"{output_shape[:-1]} or one-hot rows of shape {output_shape}."
    )


def _per_key(data, keys: list[str], output_struct, name: str) -> dict:
    if isinstance(output_struct, dict) or len(keys) > 1:
        if isinstance(data, dict) and set(data) == set(keys):
            return {key: data[key] for key in keys}
        if isinstance(data, (list, tuple)) and len(data) == len(keys) and not isinstance(output_struct, dict):
            return dict(zip(keys, data, strict=True))
        raise ValueError(f"`{name}` must hold one array per output {keys} (a dict by output name).")
    return {keys[0]: data}


def _structure(per_key: dict, keys: list[str], output_struct):
    if isinstance(output_struct, dict):
        return {key: per_key[key] for key in keys}
    if isinstance(output_struct, (list, tuple)):
        return [per_key[key] for key in keys]
    return per_key[keys[0]]


# ---------------------------------------------------------------------------------------- the teacher
def _teacher_members(teacher, last, safe_mode):
    """(members, the model whose architecture the default student copies, its output activations
    as found in a built ensemble or None)."""
    if isinstance(teacher, keras.Model):
        if last is not None:
            raise ValueError(
                "`last` only applies to a snapshot directory or a list of snapshots, not a model."
            )
        inner = [layer for layer in teacher.layers if isinstance(layer, keras.Model)]
        inner = [layer for layer in inner if layer.name.startswith(MEMBER_PREFIX)]
        reference, activations = teacher, None
        if inner:  # an ensemble made by build_ensemble: the student copies one member
            reference = inner[0]
            activations = {}
            for key, _ in output_items(teacher):
                try:
                    layer = teacher.get_layer(f"{reference.name}_{key}")
                except ValueError:
                    activations = None
                    break
                name = getattr(getattr(layer, "activation", None), "__name__", "linear")
                activations[key] = None if name == "linear" else name
        elif any(layer.name.startswith("fused_") for layer in teacher.layers):
            reference = None  # a fused ensemble: its copy would cost M members
        return (
            [Member(teacher, f"{MEMBER_PREFIX}01", f"the teacher {teacher.name!r}")],
            reference,
            activations,
        )
    snapshot_sources(teacher, last)  # cheap checks (paths, `last`) before any load
    members = load_members(teacher, last, safe_mode)
    return members, members[0].model, None


def _teacher_probabilities(members, x, output_activation, batch_size):
    # member_predictions never renames a user's model (it calls it inside a wrapper).
    _, stacks = member_predictions(members, x, output_activation=output_activation, batch_size=batch_size)
    return {key: stack.mean(axis=0) for key, stack in stacks.items()}


def _default_student(reference, activations: dict | None, label: str) -> keras.Model:
    clone = keras.models.clone_model(reference)  # same architecture, freshly initialised weights
    if not activations or all(value is None for value in activations.values()):
        clone.name = "student"
        return clone
    inputs, outputs = structures(clone, label)
    items = output_items(clone, label)
    tensors = {
        key: keras.layers.Activation(activations[key] or "linear", name=f"{key}_probabilities")(tensor)
        for key, tensor in items
    }
    keys = [key for key, _ in items]
    return keras.Model(inputs, _structure(tensors, keys, outputs), name="student")


def _check_student(student, reference_outputs, keys, output_struct, label: str) -> None:
    if not isinstance(student, keras.Model):
        raise TypeError(f"`student` must be a keras.Model or None, got {type(student).__name__}.")
    _, student_struct = structures(student, "the student")
    student_items = output_items(student, "the student")
    kind = type(output_struct).__name__ if isinstance(output_struct, (dict, list, tuple)) else "tensor"
    student_kind = (
        type(student_struct).__name__ if isinstance(student_struct, (dict, list, tuple)) else "tensor"
    )
    if len(student_items) != len(keys) or (
        isinstance(output_struct, dict) and {key for key, _ in student_items} != set(keys)
    ):
        raise ValueError(
            f"The student's outputs {[key for key, _ in student_items]} ({student_kind}) do not match "
            f"{label}'s outputs {keys} ({kind}): the student needs the same outputs."
        )
    if isinstance(output_struct, dict):  # matched by key, else by position
        student_items = [(key, dict(student_items)[key]) for key, _ in reference_outputs]
    for (key, tensor), (student_key, student_tensor) in zip(reference_outputs, student_items, strict=True):
        expected, shape = tuple(tensor.shape)[1:], tuple(student_tensor.shape)[1:]
        if not compatible(shape, expected) and not compatible(expected, shape):
            raise ValueError(
                f"The student's output {student_key!r} has shape {shape}, {label}'s output {key!r} has "
                f"{expected}: the student must predict the same classes."
            )


# ---------------------------------------------------------------------------------------- the default recipe
def _saved_optimizer(path) -> object | None:
    """The serialized optimizer of a `.keras` file's compile config (None if it was saved uncompiled).

    Read from the archive's config.json (the documented `.keras` layout), so the file is not loaded
    a second time and a custom loss in its compile config cannot get in the way.
    """
    import json
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    compile_config = config.get("compile_config") if isinstance(config, dict) else None
    return compile_config.get("optimizer") if isinstance(compile_config, dict) else None


def _run_manifest(directory) -> dict:
    """The snapshot directory's manifest, or {} when there is none or it cannot be read."""
    from keras_snapshot import manifest as manifest_lib

    try:
        return manifest_lib.read_manifest(directory) or {}
    except (OSError, ValueError):
        return {}


def _manifest_rate(directory) -> float | None:
    rate = _run_manifest(directory).get("initial_learning_rate")
    return float(rate) if isinstance(rate, numbers.Real) and rate > 0 else None


def teacher_epochs(teacher, last=None) -> int | None:
    """The epochs of the run that wrote the teacher's snapshots (the manifest's global epoch count), for a
    snapshot directory or a list of files in one; None for models or files outside a snapshot directory."""
    from keras_snapshot.members import snapshot_sources

    if isinstance(teacher, keras.Model):
        return None
    try:
        first = snapshot_sources(teacher, last)[0][1]
    except (OSError, ValueError, TypeError):
        return None
    if isinstance(first, keras.Model):
        return None
    epochs = _run_manifest(Path(first).parent).get("epochs")
    valid = isinstance(epochs, numbers.Integral) and not isinstance(epochs, bool) and epochs >= 1
    return int(epochs) if valid else None


def _peak_rate(learning_rate) -> float | None:
    """The highest rate of a schedule as compiled (a schedule's initial or warmup-target rate), or a float's."""
    if isinstance(learning_rate, keras.optimizers.schedules.LearningRateSchedule):
        config = learning_rate.get_config()
        for key in ("warmup_target", "initial_learning_rate"):
            if isinstance(config.get(key), numbers.Real):
                return float(config[key])
        if isinstance(config.get("values"), (list, tuple)) and config["values"]:  # PiecewiseConstantDecay
            return float(max(config["values"]))
        return float(keras.ops.convert_to_numpy(learning_rate(0)))
    return float(learning_rate) if isinstance(learning_rate, numbers.Real) else None


def teacher_optimizer(teacher, last=None) -> tuple[keras.optimizers.Optimizer | None, float | None]:
    """The optimizer that trained the teacher (a fresh instance of its class and settings, no state)
    and its peak rate; (None, None) when either cannot be read.

    The optimizer comes from the first snapshot's compile config (a file) or from the model's
    `optimizer` (an in-memory model). The peak rate is the run's alpha0 from the snapshot directory's
    manifest when there is one (also for a list of files inside a snapshot directory), else the
    compiled rate (a schedule's initial rate). None for an uncompiled model, an ensemble made by
    `build_ensemble`, or an optimizer or schedule class that is not registered.
    """
    from keras_snapshot.members import snapshot_sources

    first = teacher if isinstance(teacher, keras.Model) else snapshot_sources(teacher, last)[0][1]
    try:
        if isinstance(first, keras.Model):
            optimizer, manifest_rate = getattr(first, "optimizer", None), None
        else:
            serialized = _saved_optimizer(first)
            optimizer = keras.optimizers.get(serialized) if serialized is not None else None
            manifest_rate = _manifest_rate(Path(first).parent)
        if optimizer is None:
            return None, None
        optimizer = getattr(optimizer, "inner_optimizer", optimizer)  # LossScaleOptimizer: compile re-wraps
        config = optimizer.get_config()
        rate = config.get("learning_rate")
        if isinstance(rate, dict):
            rate = keras.optimizers.schedules.deserialize(rate)
        peak = manifest_rate or _peak_rate(rate)
        fresh = type(optimizer).from_config(config)
    except Exception:  # an unregistered class or schedule, an unreadable file: the default falls back
        return None, None
    if peak is None or not np.isfinite(peak) or peak <= 0:
        return None, None
    return fresh, peak


def default_optimizer(teacher, last, total_steps: int) -> keras.optimizers.Optimizer:
    """The teacher's optimizer (class and settings: momentum, weight decay...) at the teacher's peak
    rate, decayed to zero over the student's `total_steps` by a cosine; `Adam(1e-3)` decayed the same
    way when the teacher's optimizer cannot be read."""
    optimizer, peak = teacher_optimizer(teacher, last)
    if optimizer is None:
        optimizer, peak = keras.optimizers.Adam(), FALLBACK_LEARNING_RATE
    config = optimizer.get_config()
    config["learning_rate"] = keras.optimizers.schedules.CosineDecay(peak, decay_steps=total_steps, alpha=0.0)
    return type(optimizer).from_config(config)


# ---------------------------------------------------------------------------------------- public
def distill(
    teacher: str | os.PathLike | Sequence[str | os.PathLike | keras.Model] | keras.Model,
    x,
    *,
    y=None,
    student: keras.Model | None = None,
    validation_data=None,
    epochs: int | None = None,
    batch_size: int = 64,
    temperature: float = DEFAULT_TEMPERATURE,
    alpha: float = DEFAULT_ALPHA,
    optimizer=None,
    callbacks: Sequence[keras.callbacks.Callback] | None = None,
    verbose="auto",
    last: int | None = None,
    output_activation: str | dict[str, str | None] | None = None,
    safe_mode: bool = True,
) -> keras.Model:
    """Trains one model, the student, on the snapshot ensemble's averaged probabilities.

    The ensemble costs M forward passes per prediction; the student costs one. It learns the
    teacher's probabilities softened at temperature T (Hinton et al., 2015), which carry more
    than the top-1 class (which wrong classes look alike), so labels are optional:

        loss = (1 - alpha) * T^2 * KL(teacher_T || student_T) + alpha * CE(y, student)

    where p_T = softmax(log(p) / T); T^2 keeps the gradients of the soft term on the scale of
    the hard one. Without `y` the loss is T^2 * KL alone and `alpha` is ignored.

    The defaults are a measured recipe, not a guess (docs/guide/one-model.md, benchmarks/results/
    accuracy.cpu.md): the student trains like the teacher did, for as many epochs as the snapshot
    run (read from its manifest), with the teacher's own optimizer
    (its class and settings: momentum, Nesterov, weight decay, read from the first snapshot's
    compile config) at the teacher's peak rate (alpha0 from the snapshot directory's manifest),
    decayed to zero over the `epochs` of distillation by a cosine, at T = 1 (the ensemble's
    probabilities as they are). A student at a constant rate ends where the gradient noise leaves
    it: with a constant Adam(1e-3), the former default, the student was 2.7 to 5.2 points worse
    than the single model on Fashion-MNIST; with the teacher's optimizer decayed to zero it
    recovers most of the ensemble's gain (see the guide for the numbers). When the teacher's
    optimizer cannot be read (an uncompiled model, an ensemble from `build_ensemble`, a class that
    is not registered), the fallback is Adam at 1e-3 decayed to zero the same way.

    The teacher's probabilities are computed ONCE, before training, in one pass over `x` that
    runs each member once (and once over the validation inputs), so an epoch of `distill` costs
    about an epoch of `fit` of the student (benchmarks/results/distill_cost.md). That is why `x`
    must be in-memory arrays: a `tf.data.Dataset`, `PyDataset` or generator is refused, because
    the teacher would have to run all M members at every step of every epoch. Random data
    augmentation is therefore not applied; distil on the (unaugmented) training inputs, plus
    unlabeled inputs if you have them.

    The student is trained with `fit`, so `callbacks` see it as `self.model`: `SnapshotCallback`,
    `BackupAndRestore`, `EarlyStopping(monitor="val_loss")` and `TensorBoard` work as usual. The
    logs hold `loss` and `teacher_agreement` (the share of samples whose top-1 class is the
    teacher's), with `val_` twins given `validation_data`. Checkpoints written during training
    carry the distillation loss in their compile config: load them with `compile=False` (as
    `build_ensemble` does) or after importing keras_snapshot. The returned student is re-compiled
    with built-in losses only (see Returns).

    Args:
        teacher: a snapshot directory written by `SnapshotCallback`, a list of `.keras` paths or
            `keras.Model`s (their mean probabilities), or one `keras.Model`, e.g. an ensemble made
            by `build_ensemble`.
        x: training inputs: an array, a list of arrays (one per input) or a dict by input name.
        y: optional labels (class indices (N,) / (N, 1), one-hot rows of any dtype, or soft
            labels; a dict by output name for several outputs), mixed in with weight `alpha`.
            NaN or inf in `x`, `y` or `validation_data` is refused, naming the first row.
        student: the model to train (its weights are trained in place). Default: a fresh copy of
            the members' architecture, re-initialised (`keras.models.clone_model`), so the student
            costs one member; from a `build_ensemble` model the copy is of its first member, with
            the ensemble's `output_activation`. Any model with the teacher's inputs and outputs
            works; it must end in probabilities, as the teacher.
        validation_data: inputs, or (inputs, labels) when `y` is given, to report `val_loss`
            (the same loss) and `val_teacher_agreement` each epoch.
        epochs: epochs of student training (>= 1): count them in the student's training budget.
            Default None: the epochs of the snapshot run (its manifest's count, for a snapshot
            directory or files in one), the measured recipe (a third of them cost 0.4 points of
            test error in benchmarks/results/swa.cpu.md); 10 when the teacher is models, files
            outside a snapshot directory, or a directory whose manifest predates the epoch count
            (keras-snapshot 0.2).
        batch_size: the training batch size, also used for the teacher's predictions.
        temperature: T > 0. Default 1: the ensemble's averaged probabilities are already soft
            (an average of M members); above 1 softens them further (2 to 4 is usual for one
            confident teacher).
        alpha: the weight of the hard-label loss, in [0, 1]; ignored without `y`. Default 0.5.
        optimizer: an optimizer or its name, used as given. Default: a `student` you pass keeps its
            own optimizer if it is compiled; else (the default student) the teacher's optimizer (a fresh instance of its class and settings) with
            `CosineDecay(peak, decay_steps=ceil(rows / batch_size) * epochs)`, peak = the teacher's
            alpha0 (the manifest's `initial_learning_rate`; for models, their compiled rate or a
            schedule's initial rate), so the rate reaches zero at the end of the run; `Adam` at
            1e-3 decayed the same way when the teacher's optimizer cannot be read.
        callbacks: Keras callbacks passed to `fit`.
        verbose: passed to `fit`.
        last: distil only the last m snapshots of a directory or list.
        output_activation: an activation applied to each member's output before averaging
            (e.g. "softmax" when the members output logits, as in `build_ensemble`), and to the
            default student's outputs so that it ends in probabilities too.
        safe_mode: load snapshot files in Keras's safe mode.

    Returns:
        The trained student, a plain functional `keras.Model`. It is compiled with the training
        optimizer (its state kept) and built-in Keras objects only: `categorical_crossentropy`
        when `y` held one-hot or soft rows, else (class indices, or no `y`)
        `sparse_categorical_crossentropy` (`binary_crossentropy` for a single sigmoid unit), with
        the metric "accuracy". So `student.evaluate(x_test, y_test)`
        works and `student.save("student.keras")` reloads with plain `keras.saving.load_model`,
        without keras_snapshot. `student.history.history` holds the training logs.

    Raises:
        TypeError: `x` is a dataset or generator, or an argument has the wrong type.
        ValueError: bad arguments, inputs that do not fit the teacher, a student whose inputs or
            outputs differ from the teacher's, or outputs that are not probabilities; all raised
            before any training.

    Example:

    ```python
    import keras, numpy as np, keras_snapshot
    x, y = np.random.rand(512, 8).astype("float32"), np.random.randint(0, 3, 512)
    model = keras.Sequential([keras.Input((8,), name="features"), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(3, activation="softmax")])
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9), "sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=32, epochs=6, verbose=0,
              callbacks=[keras_snapshot.SnapshotCallback("snapshots", cycles=3)])
    student = keras_snapshot.distill("snapshots", x, epochs=5, verbose=0)  # no labels needed
    student.save("student.keras")   # one model's cost; reloads with plain keras.saving.load_model
    ```
    """
    # Everything cheap first: no load, no prediction and no training before the arguments are right.
    epochs = _check_positive_int(epochs, "epochs") if epochs is not None else None
    batch_size = _check_positive_int(batch_size, "batch_size")
    temperature = _check_number(temperature, "temperature", 0.0, None, low_open=True)
    alpha = _check_number(alpha, "alpha", 0.0, 1.0, low_open=False)
    if not isinstance(safe_mode, bool):
        raise TypeError(f"`safe_mode` must be True or False, got {safe_mode!r}.")
    if callbacks is not None and (
        isinstance(callbacks, keras.callbacks.Callback) or not isinstance(callbacks, Sequence)
    ):
        raise TypeError("`callbacks` must be a list of keras.callbacks.Callback or None.")
    x, rows = as_arrays(x, "x")
    if y is not None:
        refuse_streams(y, "y", _IN_MEMORY)
    x_val = y_val = None
    if validation_data is not None:
        # As in Keras: a tuple is (x_val, y_val) or (x_val,); with `y`, a two-item list is (x_val, y_val) too.
        pair = isinstance(validation_data, list) and len(validation_data) == 2 and y is not None
        if (isinstance(validation_data, tuple) and len(validation_data) in (1, 2)) or pair:
            x_val = validation_data[0]
            y_val = validation_data[1] if len(validation_data) == 2 else None
        else:
            x_val = validation_data
        x_val, _ = as_arrays(x_val, "validation_data")
        if (y is None) != (y_val is None):
            raise ValueError(
                "`validation_data` must match the training data: pass (x_val, y_val) with `y`, and only "
                "x_val without `y` (the validation loss is the training loss, which uses labels only "
                "when `y` is given)."
            )
    if optimizer is not None:
        optimizer = keras.optimizers.get(optimizer)

    members, reference, ensemble_activations = _teacher_members(teacher, last, safe_mode)
    if epochs is None:  # as long as the snapshot run: the measured recipe
        epochs = teacher_epochs(teacher, last) or FALLBACK_EPOCHS
    check_agreement(members)
    teacher_model, label = members[0].model, members[0].label
    check_inputs(x, teacher_model, label, "x")
    if x_val is not None:
        check_inputs(x_val, teacher_model, label, "validation_data")
    reference_outputs = output_items(teacher_model, label)
    keys = [key for key, _ in reference_outputs]
    _, output_struct = structures(teacher_model, label)
    output_shapes = {key: tuple(tensor.shape)[1:] for key, tensor in reference_outputs}
    for key, shape in output_shapes.items():
        if not shape or shape[-1] is None:
            raise ValueError(f"{label}'s output {key!r} has shape {shape}: distill needs a known class axis.")
    activations = resolve_activations(output_activation, keys, members)

    labels = labels_val = None
    integer_labels = dict.fromkeys(keys, False)
    if y is not None:
        labels, labels_val = {}, {}
        for key, value in _per_key(y, keys, output_struct, "y").items():
            labels[key], integer_labels[key] = _hard_labels(value, key, output_shapes[key], rows)
        rows_val = keras.tree.flatten(x_val)[0].shape[0] if x_val is not None else 0
        if y_val is not None:
            for key, value in _per_key(y_val, keys, output_struct, "validation_data labels").items():
                labels_val[key], _ = _hard_labels(value, key, output_shapes[key], rows_val)

    # A default student is a clone, and Keras compiles the clone of a compiled model with a copy of its
    # optimizer (at its last rate): that copy is not the user's choice, so the default recipe applies.
    given_student = student is not None
    if student is None:
        if reference is None:
            raise ValueError(
                f"{label} is a fused ensemble (build_ensemble(fuse=True)): a copy of it would cost all M "
                "members. Pass the snapshot directory or list as the teacher, or a `student` model."
            )
        default_activations = ensemble_activations or activations
        student = _default_student(reference, default_activations, label)
        hint = "pass output_activation='softmax' when the members output logits."
    else:
        hint = "end the student in softmax (or sigmoid for one unit)."
    _check_student(student, reference_outputs, keys, output_struct, label)
    check_inputs(x, student, "the student", "x")
    probe = keras.tree.map_structure(lambda a: a[: min(rows, batch_size)], x)
    probe_outputs = _per_key(
        student.predict(probe, batch_size=batch_size, verbose=0), keys, output_struct, "the student outputs"
    )
    student_dtypes = dict(output_items(student, "the student"))
    for position, key in enumerate(keys):
        tensor = student_dtypes.get(key, list(student_dtypes.values())[position])
        _check_probabilities(
            np.asarray(probe_outputs[key], dtype="float64"),
            f"The student's outputs {key!r}",
            hint,
            tensor.dtype,
        )
    if optimizer is None and given_student:  # a compiled student of the user's: its own optimizer
        optimizer = getattr(student, "optimizer", None)
    if optimizer is None:  # the default recipe: the teacher's optimizer, its peak rate decayed to zero
        optimizer = default_optimizer(teacher, last, math.ceil(rows / batch_size) * epochs)

    # The one expensive pass: every member once over x (and over x_val).
    probabilities = _teacher_probabilities(members, x, output_activation, batch_size)
    for key in keys:
        _check_probabilities(
            probabilities[key],
            f"The teacher's outputs {key!r}",
            "pass output_activation='softmax' (or 'sigmoid') when the members output logits.",
            output_dtype(members, key),
        )
    probabilities_val = (
        _teacher_probabilities(members, x_val, output_activation, batch_size) if x_val is not None else None
    )

    def targets(probs, hard):
        packed = {}
        for key in keys:
            soft = soften(probs[key], temperature)
            packed[key] = (np.concatenate([soft, hard[key]], axis=-1) if hard else soft).astype("float32")
        return _structure(packed, keys, output_struct)

    losses = {
        key: DistillationLoss(
            temperature,
            alpha,
            labelled=y is not None,
            binary=output_shapes[key][-1] == 1,
            name="distillation",
        )
        for key in keys
    }
    student.compile(
        optimizer=optimizer,
        loss=_structure(losses, keys, output_struct),
        metrics=_structure({key: [teacher_agreement] for key in keys}, keys, output_struct),
    )
    student.fit(
        x,
        targets(probabilities, labels),
        validation_data=(x_val, targets(probabilities_val, labels_val)) if x_val is not None else None,
        epochs=epochs,
        batch_size=batch_size,
        callbacks=list(callbacks) if callbacks is not None else None,
        verbose=verbose,
    )
    history = student.history

    def final_loss(key):
        if output_shapes[key][-1] == 1:
            return "binary_crossentropy"
        # Class indices are what users evaluate with unless they trained on one-hot / soft rows.
        labelled_with_rows = y is not None and not integer_labels[key]
        return "categorical_crossentropy" if labelled_with_rows else "sparse_categorical_crossentropy"

    student.compile(
        optimizer=student.optimizer,
        loss=_structure({key: final_loss(key) for key in keys}, keys, output_struct),
        metrics=_structure({key: ["accuracy"] for key in keys}, keys, output_struct),
    )
    student.history = history
    return student
