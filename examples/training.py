"""The training recipe shared by the demo and the accuracy benchmark.

One small BatchNorm CNN, SGD with Nesterov momentum 0.9 (the paper's optimiser), and two schedules on the
same epoch budget:

- the single model's step schedule: alpha0, dropped x0.1 at 50% and x0.01 at 75% of the steps;
- the snapshot schedule: M cosine cycles, a snapshot at the end of each (keras_snapshot.SnapshotCallback).

Evaluation helpers turn snapshots into the errors of each snapshot and of the ensemble of the last m,
by averaging softmax outputs as the paper does. Every metric comes from `keras_snapshot.evaluation`; what
is here only arranges its inputs (the members' probabilities, the examples kept at a coverage, the bins of
a reliability diagram).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import keras
import numpy as np

import keras_snapshot

__all__ = [
    "COVERAGES",
    "EpochLog",
    "EqualIntervalWeights",
    "SnapshotAnnouncer",
    "average_with_guard",
    "build_cnn",
    "calibration_row",
    "compile_sgd",
    "ensemble_errors",
    "error_rate",
    "jsonable",
    "load_snapshots",
    "predict_probabilities",
    "reliability_bins",
    "rounded",
    "selective_errors",
    "sgd",
    "step_learning_rate",
    "step_schedule",
    "train_single",
    "train_snapshots",
]

COVERAGES = tuple(np.round(np.arange(0.1, 1.0001, 0.05), 2).tolist())  # fractions of examples kept

WEIGHT_DECAY = 5e-4
BN_MOMENTUM = 0.9  # moving statistics that settle within a few dozen steps (Torch's default)


def build_cnn(input_shape, num_classes: int, *, width: int = 32, seed: int = 0) -> keras.Model:
    """A small BatchNorm CNN: four 3x3 convolutions (width, width, 2 width, 2 width filters; max-pools after the
    1st, 3rd and 4th), a BatchNorm dense layer of 4 width units and a softmax output.

    The input layer is named "image": that is the key of the exported serving signature.
    """
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(tuple(input_shape), name="image")
    x = inputs
    for index, (filters, pool) in enumerate(
        ((width, True), (width, False), (2 * width, True), (2 * width, True)), 1
    ):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{index}")(x)
        x = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"bn{index}")(x)
        x = keras.layers.Activation("relu", name=f"relu{index}")(x)
        if pool:
            x = keras.layers.MaxPooling2D(2, padding="same", name=f"pool{index}")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(4 * width, use_bias=False, name="dense")(x)
    x = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name="bn_dense")(x)
    x = keras.layers.Activation("relu", name="relu_dense")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="cnn")


def sgd(learning_rate) -> keras.optimizers.Optimizer:
    """SGD + Nesterov momentum 0.9 with weight decay; `learning_rate` a float or a LearningRateSchedule."""
    return keras.optimizers.SGD(learning_rate, momentum=0.9, nesterov=True, weight_decay=WEIGHT_DECAY)


def compile_sgd(model: keras.Model, learning_rate, *, steps_per_execution: int = 1) -> keras.Model:
    """SGD + Nesterov momentum 0.9 with weight decay; `learning_rate` a float or a LearningRateSchedule."""
    model.compile(
        optimizer=sgd(learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        steps_per_execution=steps_per_execution,
    )
    return model


def _step_boundaries(total_steps: int) -> tuple[int, int]:
    return total_steps // 2, (3 * total_steps) // 4


def step_schedule(alpha0: float, total_steps: int) -> keras.optimizers.schedules.LearningRateSchedule:
    """The standard schedule: alpha0, then alpha0/10 after 50% and alpha0/100 after 75% of the steps."""
    return keras.optimizers.schedules.PiecewiseConstantDecay(
        list(_step_boundaries(total_steps)), [alpha0, alpha0 / 10, alpha0 / 100]
    )


def step_learning_rate(t, *, alpha0: float, total_steps: int) -> np.ndarray:
    """The step schedule at 1-based iteration(s) t, as `step_schedule` applies it (numpy, for plots)."""
    step = np.asarray(t) - 1  # the optimizer's 0-based iterations
    first, second = _step_boundaries(total_steps)
    return np.where(step <= first, alpha0, np.where(step <= second, alpha0 / 10, alpha0 / 100))


class EpochLog(keras.callbacks.Callback):
    """One compact line per epoch (`label epoch e/E  loss ..  acc ..  lr ..  12.3s`), flushed at once."""

    def __init__(self, label: str, epochs: int, print_fn=print):
        super().__init__()
        self.label, self.epochs, self.print_fn = label, epochs, print_fn

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        parts = [f"{self.label} epoch {epoch + 1:>3}/{self.epochs}"]
        for key, name in (("loss", "loss"), ("accuracy", "acc"), ("val_accuracy", "val_acc")):
            if key in logs:
                parts.append(f"{name} {float(logs[key]):.4f}")
        if "learning_rate" in logs:
            parts.append(f"lr {float(logs['learning_rate']):.2e}")
        parts.append(f"{time.perf_counter() - self._start:.1f}s")
        self.print_fn("  ".join(parts), flush=True)


class SnapshotAnnouncer(keras.callbacks.Callback):
    """Prints "Snapshot k/M ..." for each snapshot written, AFTER the progress line of its epoch.

    SnapshotCallback(verbose=1) prints when it writes the file, at the end of a cycle's last batch: before the
    epoch's own line (EpochLog's or Keras's progress bar, which print at the epoch's end). This reads the
    manifest at each epoch's end and prints the new entries when the next epoch starts (or training ends),
    so each message follows the epoch it belongs to whatever the verbosity.
    """

    def __init__(self, directory, cycles: int, print_fn=print):
        super().__init__()
        self.directory, self.cycles, self.print_fn = Path(directory), cycles, print_fn
        self.seen: set[int] = set()
        self.pending: list[str] = []

    def _entries(self) -> list[dict]:
        manifest = keras_snapshot.read_manifest(self.directory)
        return sorted(manifest["snapshots"], key=lambda e: e["cycle"]) if manifest else []

    def on_train_begin(self, logs=None):
        self.seen = {entry["cycle"] for entry in self._entries()}  # a resumed run's earlier snapshots

    def on_epoch_end(self, epoch, logs=None):
        for entry in self._entries():
            if entry["cycle"] not in self.seen:
                self.seen.add(entry["cycle"])
                self.pending.append(
                    f"Snapshot {entry['cycle']}/{self.cycles} (step {entry['step']}, end of epoch {epoch + 1}): "
                    f"{self.directory / entry['file']}"
                )

    def _flush(self):
        for line in self.pending:
            self.print_fn(line, flush=True)
        self.pending = []

    def on_epoch_begin(self, epoch, logs=None):
        self._flush()

    def on_train_end(self, logs=None):
        self._flush()


class EqualIntervalWeights(keras.callbacks.Callback):
    """Keeps a copy of the weights at the end of the listed epochs (1-based): NoCycle snapshots."""

    def __init__(self, epochs):
        super().__init__()
        self.epochs = sorted(set(int(e) for e in epochs))
        self.weights: dict[int, list[np.ndarray]] = {}

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 in self.epochs:
            self.weights[epoch + 1] = [np.array(w) for w in self.model.get_weights()]


def _history(history) -> dict:
    return {key: [float(v) for v in values] for key, values in history.history.items()}


def train_single(
    model,
    data,
    *,
    epochs: int,
    batch_size: int,
    alpha0: float = 0.1,
    keep_epochs=(),
    steps_per_execution: int = 1,
    validate: bool = False,
    verbose: int = 2,
    label: str = "single",
    print_fn=print,
):
    """Trains with the step schedule. Returns (history dict, {epoch: weights} for `keep_epochs`)."""
    steps_per_epoch = math.ceil(len(data.x_train) / batch_size)
    compile_sgd(
        model, step_schedule(alpha0, epochs * steps_per_epoch), steps_per_execution=steps_per_execution
    )
    keeper = EqualIntervalWeights(keep_epochs)
    callbacks = [keeper]
    if verbose == 2:
        callbacks.append(EpochLog(label, epochs, print_fn))
    history = model.fit(
        data.x_train,
        data.y_train,
        batch_size=batch_size,
        epochs=epochs,
        validation_data=(data.x_val, data.y_val) if validate else None,
        shuffle=True,
        verbose=1 if verbose == 1 else 0,
        callbacks=callbacks,
    )
    return _history(history), keeper.weights


def train_snapshots(
    model,
    data,
    directory,
    *,
    epochs: int,
    cycles: int,
    batch_size: int,
    alpha0: float = 0.2,
    in_graph: bool = False,
    steps_per_execution: int = 1,
    validate: bool = False,
    verbose: int = 2,
    label: str = "snapshot",
    print_fn=print,
    announce: bool = True,
):
    """Trains with M = `cycles` cosine cycles, writing `directory/snapshot-XX.keras`. Returns the history dict.

    `in_graph=False` is the callback path (float rate set per batch by SnapshotCallback); `in_graph=True`
    compiles a `SnapshotSchedule`, which also allows `steps_per_execution > 1` (fast on accelerators).
    """
    steps_per_epoch = math.ceil(len(data.x_train) / batch_size)
    total_steps = epochs * steps_per_epoch
    if in_graph:
        rate = keras_snapshot.SnapshotSchedule(alpha0, total_steps=total_steps, cycles=cycles)
    else:
        rate = alpha0
    compile_sgd(model, rate, steps_per_execution=steps_per_execution)
    # The callback itself stays quiet: SnapshotAnnouncer prints each snapshot after its epoch's line.
    callbacks = [keras_snapshot.SnapshotCallback(directory, cycles=cycles, initial_learning_rate=alpha0)]
    if verbose == 2:
        callbacks.append(EpochLog(label, epochs, print_fn))
    if verbose and announce:
        callbacks.append(SnapshotAnnouncer(directory, cycles, print_fn))
    history = model.fit(
        data.x_train,
        data.y_train,
        batch_size=batch_size,
        epochs=epochs,
        validation_data=(data.x_val, data.y_val) if validate else None,
        shuffle=True,
        verbose=1 if verbose == 1 else 0,
        callbacks=callbacks,
    )
    return _history(history)


def load_snapshots(directory) -> list[keras.Model]:
    """The snapshots listed in `directory/manifest.json`, in cycle order, loaded without their optimizer."""
    manifest = keras_snapshot.read_manifest(directory)
    if not manifest or not manifest["snapshots"]:
        raise FileNotFoundError(f"No snapshots recorded in {str(directory)!r}.")
    entries = sorted(manifest["snapshots"], key=lambda entry: entry["cycle"])
    return [keras.saving.load_model(Path(directory) / e["file"], compile=False) for e in entries]


def predict_probabilities(model, x, batch_size: int = 1000) -> np.ndarray:
    return np.asarray(model.predict(x, batch_size=batch_size, verbose=0), dtype=np.float64)


def error_rate(probabilities, labels) -> float:
    """Top-1 error in percent (keras_snapshot.evaluation.error, a fraction, x 100)."""
    from keras_snapshot.evaluation import error

    return float(100.0 * error(np.asarray(probabilities), np.asarray(labels)))


def ensemble_errors(probabilities: list[np.ndarray], labels) -> dict:
    """Errors (%) of each member and of the average of the softmax outputs of the last m, m = 1..M.

    `probabilities` is in training order (snapshot 1 first); "last m" are the m latest snapshots.
    """
    members = [error_rate(p, labels) for p in probabilities]
    count = len(probabilities)
    ensembles = [error_rate(np.mean(probabilities[count - m :], axis=0), labels) for m in range(1, count + 1)]
    return {"members": members, "last_m": ensembles}


def calibration_row(snapshots, data, *, last=None) -> dict:
    """Test metrics of the ensemble of (the last `last` of) `snapshots`, before and after temperature scaling.

    One `keras_snapshot.evaluation.evaluate_ensemble` call: T is fitted on the validation split (never on
    the test set), the metrics are measured on the test set. Returns its row for the largest m (the whole
    ensemble; for one model, that model), with the error in percent as "error_%" next to the fraction.
    """
    from keras_snapshot.evaluation import evaluate_ensemble

    rows = evaluate_ensemble(
        snapshots,
        data.x_test,
        data.y_test,
        last=last,
        temperature="fit",
        validation_data=(data.x_val, data.y_val),
    )
    row = max((r for r in rows if r.get("m") is not None), key=lambda r: r["m"])
    row = {
        key: (float(value) if isinstance(value, (float, np.floating)) else value)
        for key, value in row.items()
    }
    row["error_%"] = 100.0 * row["error"]
    return row


def average_with_guard(snapshots, data, *, last=None, batch_size: int = 256):
    """`keras_snapshot.averaging.average_weights` with the batch-norm statistics recomputed on the training
    inputs and the guard measured on the validation split. Returns (model, {"guard_fired", "warning",
    "report"}): the guard fired when average_weights warned (AveragingWarning) that the average loses.
    """
    import warnings

    from keras_snapshot.averaging import average_weights

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = average_weights(
            snapshots,
            last=last,
            bn_data=data.x_train,
            validation_data=(data.x_val, data.y_val),
            batch_size=batch_size,
        )
    fired = [w for w in caught if type(w.message).__name__ == "AveragingWarning"]
    for other in caught:
        if other not in fired:
            warnings.warn_explicit(other.message, other.category, other.filename, other.lineno)
    report = getattr(model, "averaging_report", None)
    return model, {
        "guard_fired": bool(fired),
        "warning": str(fired[0].message) if fired else None,
        "report": jsonable(report),
    }


def selective_errors(probabilities, labels, uncertainty, coverages=COVERAGES) -> list[float]:
    """Error (%) of the examples kept when only the fraction c with the LOWEST `uncertainty` is kept, per c.

    Ties are broken by the example's position (a stable sort), so the result does not depend on the backend.
    """
    probabilities, labels = np.asarray(probabilities), np.asarray(labels)
    order = np.argsort(np.asarray(uncertainty, dtype=np.float64), kind="stable")
    errors = []
    for coverage in coverages:
        keep = order[: max(1, round(coverage * len(order)))]
        errors.append(error_rate(probabilities[keep], labels[keep]))
    return errors


def reliability_bins(probabilities, labels, bins: int = 15) -> dict:
    """Counts, mean top-1 confidence and accuracy per equal-width confidence bin (edges (lo, hi]): the data
    of a reliability diagram (the same binning as keras_snapshot.evaluation.ece)."""
    probabilities, labels = np.asarray(probabilities, dtype=np.float64), np.asarray(labels)
    confidence = probabilities.max(axis=-1)
    correct = probabilities.argmax(axis=-1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(confidence, edges, right=True) - 1, 0, bins - 1)
    count = np.bincount(index, minlength=bins)
    summed_confidence = np.bincount(index, weights=confidence, minlength=bins)
    summed_correct = np.bincount(index, weights=correct.astype(np.float64), minlength=bins)
    return {
        "count": count.tolist(),
        "confidence": summed_confidence.tolist(),
        "correct": summed_correct.tolist(),
    }


def jsonable(value):
    """`value` with numpy scalars and arrays turned into plain Python numbers and lists (for json.dumps)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def rounded(value, digits: int = 5):
    """`value` (nested dicts/lists) with every float rounded to `digits` significant digits."""
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v, digits) for v in value]
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if not math.isfinite(value) or value == 0 else float(f"{value:.{digits}g}")
    return value
