"""StochasticWeightAveraging: one model, the running mean of the weights along the end of a run."""

from __future__ import annotations

import io
import json
import math
import numbers
import os
import warnings
from pathlib import Path

import keras
import numpy as np

from keras_snapshot import keras_internals
from keras_snapshot import manifest as manifest_lib
from keras_snapshot.averaging import (
    RELATIVE_TOLERANCE,
    AveragingWarning,
    _batch_norms,
    _scores,
    recompute_batch_norm,
)
from keras_snapshot.callback import SnapshotCallback
from keras_snapshot.inputs import check_probabilities, input_arrays, labels, validation_pair

__all__ = ["StochasticWeightAveraging"]

STATE_NAME = "swa-state.npz"
MODEL_NAME = "swa.keras"
STATE_FORMAT = 1
ANNEALING_STRATEGIES = ("cos", "linear")


def _check_number(name: str, value, low: float, *, low_open: bool, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TypeError(f"`{name}` must be a finite number, got {value!r}.")
    value = float(value)
    if (value <= low if low_open else value < low) or (high is not None and value > high):
        bound = f"> {low}" if low_open else f">= {low}"
        raise ValueError(
            f"`{name}` must be {bound}" + (f" and <= {high}" if high else "") + f", got {value}."
        )
    return value


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}.")
    return int(value)


def _to_numpy(value) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(value))


class StochasticWeightAveraging(keras.callbacks.Callback):
    """Stochastic Weight Averaging (Izmailov et al., 2018): one model at the cost of one.

    From `start_epoch` on, the callback adds the model's weights to a running mean at the end of
    every epoch (or every `average_every` steps), and at the end of training puts that mean into
    the model. The averaged weights sit nearer the centre of the flat region the end of training
    explores, and generalise better than the last weights, at the serving cost of one model. It
    averages every floating-point weight (trainable or not, like torch's `AveragedModel` with
    buffers); integer variables (counters, seeds) keep their last value.

    Defaults follow the paper, `torch.optim.swa_utils` and Lightning: averaging starts at 75 % of
    the run (the paper's SWA phase is the last quarter of the budget; Lightning's default is 80 %),
    once per epoch end. With `swa_learning_rate`, the rate moves from its value at the start of the
    SWA phase to that constant over `annealing_epochs` epochs (cosine by default, torch's `SWALR`
    and Lightning's defaults: 10 epochs, "cos"), then stays there: the paper's constant SWA rate.
    Without it (the default) the callback never touches the rate: your float rate, your schedule
    or a `SnapshotCallback` owns it (averaging the last cycles of a cyclic schedule is FGE-like
    averaging, Garipov et al., 2018).

    BatchNormalization moving statistics of averaged weights are not the average of the
    statistics: pass `bn_data` (the training inputs) to recompute them exactly at train end (one
    pass per BN layer, `torch.optim.swa_utils.update_bn`'s job); without it they are the average
    of the statistics seen, and a warning says so.

    Resume: with `directory`, the running mean, its count and the averaged steps are written
    atomically to `directory/swa-state.npz` at every averaging point, and the callback rebuilds
    its state from that file and `optimizer.iterations` when training resumes after
    `keras.callbacks.BackupAndRestore` (which restores no callback state, and replays the
    interrupted epoch): the average and its count continue as if nothing happened, wherever the
    callback is in the list. Without `directory` the state lives in memory only, and a
    `BackupAndRestore` in the same `fit` is refused.

    Next to other callbacks: with `swa_learning_rate` the callback owns the rate during the SWA
    phase, so a `SnapshotCallback` (which sets the rate of every batch) in the same `fit` is
    refused, and so is a `LearningRateScheduler` after this callback in the list (it would
    override the SWA rate); any other change of the rate during the SWA phase raises a
    RuntimeError at the next epoch's first batch. Without `swa_learning_rate` it sets no rate and
    fits next to any of them.

    The SWA phase must end in the `fit` call that runs it: the average goes into the model at
    the end of every `fit` that averaged.

    Args:
        start_epoch: the first epoch (0-based, like `initial_epoch`) of the SWA phase: an integer,
            or a fraction in (0, 1) of the `fit` call's `epochs` (int(fraction * epochs), as
            Lightning). Default 0.75.
        swa_learning_rate: the constant rate of the SWA phase, or None (default) to leave the
            rate alone. Needs an optimizer compiled with a float learning rate.
        annealing_epochs: epochs over which the rate moves to `swa_learning_rate` (the SWA
            phase's epoch j, 0-based, runs at the fraction min(1, (j + 1) / annealing_epochs) of
            the way); 0 jumps to it at once. Default 10.
        annealing_strategy: "cos" (default) or "linear".
        average_every: "epoch" (default: at every epoch end of the SWA phase), or an integer k:
            every k optimizer steps from the start of the SWA phase (needs `steps_per_execution=1`
            and a known number of steps per epoch).
        bn_data: inputs (an array, a list or a dict of arrays, no labels), usually the training
            inputs, on which BatchNormalization statistics are recomputed at train end.
        validation_data: (x_val, y_val) with class indices or one-hot rows, for a model with one
            probability output: the model before and after averaging are scored at train end
            (`self.report`), and an `AveragingWarning` is raised when the average's NLL is more
            than 1 % worse (the weights before averaging stay in `self.final_weights`).
        directory: where the resume state (and `swa.keras`) go; created if missing. None keeps
            the state in memory.
        save_model: write the averaged model to `directory/swa.keras` at train end.
        batch_size: batch size of the BatchNorm pass and of the validation predictions.
        verbose: 1 prints a line at the start of the SWA phase and at train end.

    Example:

    ```python
    import keras, numpy as np, keras_snapshot
    x, y = np.random.rand(512, 8).astype("float32"), np.random.randint(0, 3, 512)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16), keras.layers.BatchNormalization(),
                              keras.layers.ReLU(), keras.layers.Dense(3, activation="softmax")])
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9), "sparse_categorical_crossentropy")
    swa = keras_snapshot.StochasticWeightAveraging(swa_learning_rate=0.02, annealing_epochs=1, bn_data=x,
                                                   directory="swa_run", save_model=True)
    model.fit(x, y, batch_size=32, epochs=8, verbose=0, callbacks=[swa])
    print(swa.count)  # 2 epoch ends averaged (epochs 6 and 7); the model now holds their mean
    ```
    """

    def __init__(
        self,
        start_epoch: int | float = 0.75,
        swa_learning_rate: float | None = None,
        annealing_epochs: int = 10,
        annealing_strategy: str = "cos",
        average_every: str | int = "epoch",
        bn_data=None,
        validation_data: tuple | None = None,
        directory: str | os.PathLike | None = None,
        save_model: bool = False,
        batch_size: int = 256,
        verbose: int = 0,
    ):
        super().__init__()
        if isinstance(start_epoch, bool) or not isinstance(start_epoch, numbers.Real):
            raise TypeError(
                f"`start_epoch` must be an integer epoch or a fraction in (0, 1) of the run, got {start_epoch!r}."
            )
        if isinstance(start_epoch, numbers.Integral):
            start_epoch = _check_int("start_epoch", start_epoch, 0)
        elif not 0.0 < float(start_epoch) < 1.0:
            raise ValueError(
                f"`start_epoch` {start_epoch!r} is neither an integer epoch nor a fraction in (0, 1) of the "
                "run: pass e.g. 0.75 (the last quarter of the epochs) or 30 (from the 31st epoch)."
            )
        self.start_epoch = start_epoch
        if swa_learning_rate is not None:
            swa_learning_rate = _check_number("swa_learning_rate", swa_learning_rate, 0.0, low_open=True)
        self.swa_learning_rate = swa_learning_rate
        self.annealing_epochs = _check_int("annealing_epochs", annealing_epochs, 0)
        if annealing_strategy not in ANNEALING_STRATEGIES:
            raise ValueError(f"`annealing_strategy` must be 'cos' or 'linear', got {annealing_strategy!r}.")
        self.annealing_strategy = annealing_strategy
        if average_every != "epoch":
            average_every = _check_int("average_every", average_every, 1)
        self.average_every = average_every
        if bn_data is not None:
            bn_data, _ = input_arrays(bn_data, "bn_data")  # NaN / inf refused up front
        self.bn_data = bn_data
        if validation_data is not None:
            validation_data = validation_pair(validation_data)
        self.validation_data = validation_data
        if directory is not None:
            if not isinstance(directory, (str, os.PathLike)) or not str(directory):
                raise TypeError(f"`directory` must be a non-empty path or None, got {directory!r}.")
            directory = Path(directory)
            if directory.exists() and not directory.is_dir():
                raise ValueError(f"`directory` {str(directory)!r} exists and is not a directory.")
        self.directory = directory
        if not isinstance(save_model, bool):
            raise TypeError(f"`save_model` must be True or False, got {save_model!r}.")
        if save_model and directory is None:
            raise ValueError("`save_model=True` writes `swa.keras` into `directory`: pass `directory=` too.")
        self.save_model = save_model
        self.batch_size = _check_int("batch_size", batch_size, 1)
        if isinstance(verbose, bool) or verbose not in (0, 1, 2):
            raise ValueError(f"`verbose` must be 0, 1 or 2, got {verbose!r}.")
        self.verbose = verbose
        self.count = 0  # averaging points in the running mean
        self.steps = []  # the global step of each averaging point
        self.report = None
        self.final_weights = None
        self._reset_run()

    # ------------------------------------------------------------------ the schedule
    def annealed_rate(self, phase_epoch: int, start_rate: float) -> float:
        """The rate of the SWA phase's epoch `phase_epoch` (0-based), from `start_rate` (the rate when
        the phase began) towards `swa_learning_rate`, as torch's SWALR."""
        if self.annealing_epochs == 0:
            return self.swa_learning_rate
        t = min(1.0, (phase_epoch + 1) / self.annealing_epochs)
        alpha = (1.0 - math.cos(math.pi * t)) / 2.0 if self.annealing_strategy == "cos" else t
        return self.swa_learning_rate * alpha + start_rate * (1.0 - alpha)

    def _reset_run(self) -> None:
        self._sum = None  # float64 running mean of the float weights
        self._levels = []  # the states at the last two epoch ends of the SWA phase, newest first
        self._epochs = []  # the epoch of each averaging point
        self._start_rate = None  # the rate when the SWA phase began (the annealing's origin)
        self._resumed = False  # the state is rebuilt for this fit
        self._finished = False  # the average went into the model (the state file says so)
        self._start = None

    # ------------------------------------------------------------------ set-up
    def _resolve_start(self) -> int:
        if isinstance(self.start_epoch, int):
            return self.start_epoch
        epochs = (self.params or {}).get("epochs")
        if not epochs:
            raise ValueError(
                "`start_epoch` is a fraction of the run but the number of epochs is unknown: pass an integer."
            )
        return int(self.start_epoch * epochs)

    def _check_setup(self) -> None:
        model = self.model
        if model.optimizer is None:
            raise ValueError("StochasticWeightAveraging needs a compiled model: call `model.compile` first.")
        epochs = (self.params or {}).get("epochs")
        if epochs and self._start >= epochs:
            warnings.warn(
                f"The SWA phase starts at epoch {self._start} (0-based) but fit runs {epochs} epochs: nothing "
                "will be averaged. Lower `start_epoch`.",
                RuntimeWarning,
                stacklevel=3,
            )
        siblings = keras_internals.sibling_callbacks(self) or []
        backups = [c for c in siblings if isinstance(c, keras.callbacks.BackupAndRestore)]
        if backups and self.directory is None:
            raise ValueError(
                "BackupAndRestore is in the same fit as StochasticWeightAveraging without a `directory`: after "
                "a restore the running average (kept in memory) would be lost or counted twice. Pass "
                "directory= (e.g. next to the backup) so that the average is resumed with the run."
            )
        if self.average_every != "epoch":
            execution = int(getattr(model, "steps_per_execution", 1) or 1)
            if execution > 1:
                raise ValueError(
                    f"average_every={self.average_every} steps needs steps_per_execution=1 (batch hooks fire "
                    f"once per {execution} steps); average at epoch ends (average_every='epoch') instead."
                )
            if not (self.params or {}).get("steps"):
                raise ValueError(
                    f"average_every={self.average_every} steps needs a known number of steps per epoch: pass "
                    "`steps_per_epoch=` to fit, or average at epoch ends (average_every='epoch')."
                )
        if self.swa_learning_rate is None:
            return
        snapshots = [c for c in siblings if isinstance(c, SnapshotCallback)]
        if snapshots:
            raise ValueError(
                "SnapshotCallback and StochasticWeightAveraging(swa_learning_rate=...) in the same fit: both "
                "would set the learning rate. Choose one owner: drop `swa_learning_rate` to average along the "
                "snapshot schedule, or drop SnapshotCallback for the SWA rate."
            )
        position = next((i for i, c in enumerate(siblings) if c is self), -1)
        later = [c for c in siblings[position + 1 :] if isinstance(c, keras.callbacks.LearningRateScheduler)]
        if later:
            raise ValueError(
                "LearningRateScheduler comes after StochasticWeightAveraging in callbacks=[...]: it sets the "
                "rate at every epoch begin after the SWA rate is set, so the SWA rate would never apply. Put "
                "StochasticWeightAveraging after it (the scheduler then owns the rate before the SWA phase)."
            )
        if epochs and self._start < epochs and self.annealing_epochs > epochs - self._start:
            warnings.warn(
                f"annealing_epochs={self.annealing_epochs} is longer than the SWA phase ({epochs - self._start} "
                f"epochs, from epoch {self._start}): the rate never reaches swa_learning_rate="
                f"{self.swa_learning_rate}. Pass a smaller annealing_epochs (e.g. a quarter of the phase).",
                RuntimeWarning,
                stacklevel=3,
            )
        rate = model.optimizer.learning_rate
        if not isinstance(rate, keras.Variable):
            raise TypeError(
                "`swa_learning_rate` needs an optimizer compiled with a float learning rate; this one has a "
                "learning rate schedule, which refuses a float rate. Compile with a float rate (and a "
                "LearningRateScheduler placed before this callback for the first phase), or drop "
                "`swa_learning_rate` to average along your schedule."
            )

    def _prepare_directory(self) -> None:
        if not self._chief or self.directory is None:
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ValueError(f"Cannot create the SWA directory {str(self.directory)!r}: {error}.") from None
        manifest_lib.remove_stale_temporaries(self.directory)

    # ------------------------------------------------------------------ state
    def _float_weights(self, model) -> list:
        return [
            w
            for w in model.weights
            if np.issubdtype(np.dtype(keras.backend.standardize_dtype(w.dtype)), np.floating)
        ]

    def _state_path(self) -> Path | None:
        return None if self.directory is None else self.directory / STATE_NAME

    def _save_state(self) -> None:
        """Writes the phase's start rate and the last two epoch-end states, atomically: a crash leaves
        the old file or the new one."""
        path = self._state_path()
        if path is None or not self._chief:
            return
        arrays, levels = {}, []
        for index, level in enumerate(self._levels):
            levels.append({key: value for key, value in level.items() if key != "mean"})
            for i, array in enumerate(level["mean"] or ()):
                arrays[f"l{index}_w{i}"] = array
        meta = {
            "format": STATE_FORMAT,
            "start_rate": self._start_rate,
            "levels": levels,
            "finished": self._finished,
        }

        def write(temp: str) -> None:
            buffer = io.BytesIO()
            np.savez(buffer, meta=np.array(json.dumps(meta)), **arrays)
            with open(temp, "wb") as handle:
                handle.write(buffer.getvalue())

        manifest_lib.atomic_write(path, write)

    def _load_state(self) -> dict | None:
        path = self._state_path()
        if path is None or not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                for index, level in enumerate(meta["levels"]):
                    names = sorted(
                        (n for n in data.files if n.startswith(f"l{index}_w")),
                        key=lambda n: int(n.split("w")[-1]),
                    )
                    level["mean"] = [np.asarray(data[n], dtype="float64") for n in names] or None
        except Exception as error:
            raise ValueError(
                f"{path} is not a readable StochasticWeightAveraging state ({error}). Remove it to start the "
                "average over, or use a new directory."
            ) from None
        if meta.get("format") != STATE_FORMAT:
            raise ValueError(
                f"{path} has state format {meta.get('format')!r}; this version reads {STATE_FORMAT}."
            )
        return meta

    def _rebuild(self) -> None:
        """At the first epoch of a fit (after any restore, wherever BackupAndRestore is in the list):
        the average as it was at the restored step, from the last epoch-end state at or before it."""
        model = self.model
        step = int(_to_numpy(model.optimizer.iterations))
        # Every worker reads the state (all of them put the average into their model); only the chief writes.
        state = self._load_state()
        self._levels, self._start_rate = [], None
        self._use_level(None)
        if state is None:
            return
        levels = state["levels"]
        if state.get("finished"):
            raise ValueError(
                f"{self._state_path()} holds the average of a finished SWA phase (another run, or an earlier fit "
                "of this one: the average went into the model at its end). Use a new directory for a new SWA "
                f"phase, or remove {STATE_NAME}."
            )
        if step == 0 and any(level["count"] for level in levels):
            raise ValueError(
                f"{self._state_path()} holds an average of another run, but this model has not trained yet "
                "(optimizer.iterations == 0). Use a new directory for a new run, or remove "
                f"{STATE_NAME}."
            )
        if step == 0:
            return  # a state without any average (an interrupted SWA phase's first epoch): a new run
        # States after the restored step happened after the backup: the replayed epochs redo them.
        usable = [i for i, level in enumerate(levels) if level["at_step"] <= step]
        if levels and not usable:
            raise ValueError(
                f"{self._state_path()} holds the average up to step {levels[-1]['at_step']} or later, but the "
                f"restored model is at step {step}: the backup is older than the last two epochs of the SWA "
                "phase, whose points cannot be taken out of the mean. Restart the SWA phase in a new directory."
            )
        shapes = [list(w.shape) for w in self._float_weights(model)]
        for level in levels:
            if level["mean"] is not None and [list(a.shape) for a in level["mean"]] != shapes:
                raise ValueError(
                    f"{self._state_path()} holds the average of a model with other weights than this one: it "
                    "belongs to another run. Use a new directory."
                )
        self._start_rate = state.get("start_rate")
        if usable:
            self._levels = levels[usable[0] :]
            self._use_level(self._levels[0])
            if self.average_every != "epoch" and step > self._levels[0]["at_step"]:
                warnings.warn(
                    f"Training resumed at step {step}, after the last epoch end of the SWA phase whose state was "
                    f"written (step {self._levels[0]['at_step']}): the averaging points between them are not in "
                    "the average. With average_every=k steps, the state is written at epoch ends only.",
                    RuntimeWarning,
                    stacklevel=3,
                )

    def _use_level(self, level) -> None:
        if level is None:
            self._sum, self.count, self.steps, self._epochs = None, 0, [], []
        else:
            self._sum, self.count = level["mean"], level["count"]
            self.steps, self._epochs = list(level["steps"]), list(level["epochs"])

    def _push_level(self, step: int, epoch: int) -> None:
        """The state at an epoch end of the SWA phase, kept with the one before it."""
        level = {
            "at_step": step,
            "epoch": epoch,
            "count": self.count,
            "steps": list(self.steps),
            "epochs": list(self._epochs),
            "mean": self._sum,
        }
        self._levels = [level, *self._levels[:1]]
        self._save_state()

    def _add(self, model, step: int, epoch: int) -> None:
        arrays = [_to_numpy(w).astype("float64") for w in self._float_weights(model)]
        if self._sum is None:
            self._sum = arrays
        else:
            n = self.count
            self._sum = [mean + (a - mean) / (n + 1) for mean, a in zip(self._sum, arrays, strict=True)]
        self.count += 1
        self.steps.append(step)
        self._epochs.append(epoch)

    # ------------------------------------------------------------------ hooks
    def on_train_begin(self, logs=None):
        self._reset_run()
        self._start = self._resolve_start()
        self._check_setup()
        self._chief = manifest_lib.is_chief(self.model)
        self._prepare_directory()
        self._assigner = keras_internals.RateAssigner()
        self._iterations = keras_internals.IterationsReader()
        self._assigned = None
        self._epoch = None
        self._first_batch = False

    def _begin(self, epoch: int) -> None:
        """Once per fit, before the first epoch (after any restore): the state, and the point of the
        epoch before when a crash lost it."""
        self._resumed = True
        self._rebuild()
        if self.average_every != "epoch" or epoch < 1 or epoch - 1 < self._start or epoch - 1 in self._epochs:
            return
        # The restore landed on the end of an averaged epoch whose point was lost with the crash (the
        # backup was written before this callback's epoch-end hook): the restored weights are that point.
        step = int(_to_numpy(self.model.optimizer.iterations))
        if step == 0 or (self.steps and self.steps[-1] >= step):
            return
        self._add(self.model, step, epoch - 1)
        self._push_level(step, epoch - 1)

    def on_epoch_begin(self, epoch, logs=None):
        if not self._resumed:
            self._begin(epoch)
        self._epoch = epoch
        self._first_batch = True
        if epoch < self._start or self.swa_learning_rate is None:
            self._assigned = None
            return
        model = self.model  # JAX: reach the optimizer through `self.model` every time
        if self._start_rate is None:
            self._start_rate = float(_to_numpy(model.optimizer.learning_rate))
            self._save_state()
            if self.verbose:
                print(
                    f"\nSWA phase from epoch {epoch + 1}: the rate goes from {self._start_rate:g} to "
                    f"{self.swa_learning_rate:g}",
                    flush=True,
                )
        rate = self.annealed_rate(epoch - self._start, self._start_rate)
        self._assigner.assign(model.optimizer, rate)
        dtype = keras.backend.standardize_dtype(model.optimizer.learning_rate.dtype)
        self._assigned = float(np.asarray(rate, dtype=dtype))

    def on_train_batch_begin(self, batch, logs=None):
        if not self._first_batch:
            return
        self._first_batch = False
        if self._assigned is None:
            return
        current = float(_to_numpy(self.model.optimizer.learning_rate))
        if current != self._assigned:
            raise RuntimeError(
                f"The learning rate changed during the SWA phase: StochasticWeightAveraging set "
                f"{self._assigned} for epoch {self._epoch + 1}, and at its first batch it is {current}. Another "
                "callback set it (a LearningRateScheduler after this callback, ReduceLROnPlateau, or one of "
                "your own): remove it, or drop `swa_learning_rate` and let that callback own the rate."
            )

    def on_train_batch_end(self, batch, logs=None):
        if self.average_every == "epoch" or self._epoch is None or self._epoch < self._start:
            return
        # optimizer.iterations without the JAX state sync of `self.model` on every batch.
        step = self._iterations.read(self)
        start_step = self._start * self.params["steps"]
        if step > start_step and (step - start_step) % self.average_every == 0 and step not in self.steps:
            self._add(self.model, step, self._epoch)

    def on_epoch_end(self, epoch, logs=None):
        if self.swa_learning_rate is not None and logs is not None:
            # The rate of every epoch, as LearningRateScheduler logs it (History, CSVLogger after this).
            rate = self._assigned
            if rate is None:
                rate = float(_to_numpy(self.model.optimizer.learning_rate))
            logs["learning_rate"] = rate
        if epoch < self._start:
            return
        model = self.model
        step = int(_to_numpy(model.optimizer.iterations))
        if self.average_every == "epoch" and epoch not in self._epochs:
            self._add(model, step, epoch)
        self._push_level(step, epoch)

    def on_train_end(self, logs=None):
        if not self._resumed:  # no epoch ran: a restore put the run at its end
            self._begin((self.params or {}).get("epochs") or 0)
        self._resumed = False
        if self._sum is None:
            if self.verbose:
                print("\nSWA: no averaging point in this run; the model keeps its weights.", flush=True)
            return
        model = self.model
        before = self._score(model) if self.validation_data is not None else None
        self.final_weights = [_to_numpy(w) for w in model.weights]
        for variable, mean in zip(self._float_weights(model), self._sum, strict=True):
            variable.assign(mean.astype(keras.backend.standardize_dtype(variable.dtype)))
        norms = _batch_norms(model)
        if norms and self.bn_data is not None:
            recompute_batch_norm(model, self.bn_data, self.batch_size)
        elif norms:
            warnings.warn(
                f"The model has BatchNormalization layers ({', '.join(repr(n.name) for n in norms[:3])}): their "
                "moving statistics are the average of the statistics seen, not the statistics of the averaged "
                "weights. Pass bn_data=x_train to recompute them exactly at train end.",
                RuntimeWarning,
                stacklevel=2,
            )
        if before is not None:
            after = self._score(model)
            worse = bool(after["nll"] > before["nll"] * (1 + RELATIVE_TOLERANCE))
            self.report = {
                "averaged": after,
                "before_averaging": before,
                "count": self.count,
                "averaged_is_worse": worse,
            }
            if worse:
                warnings.warn(
                    AveragingWarning(
                        f"The SWA model is worse than the model before averaging on validation data: NLL "
                        f"{after['nll']:.4f} vs {before['nll']:.4f}, error {after['error']:.2%} vs "
                        f"{before['error']:.2%} ({self.count} points averaged). The points are probably not in "
                        "one basin (a rate too high in the SWA phase), or the BatchNorm statistics were not "
                        "recomputed (bn_data). The weights before averaging are in `final_weights`: "
                        "model.set_weights(swa.final_weights)."
                    ),
                    stacklevel=2,
                )
        if self.save_model and self._chief:
            manifest_lib.atomic_write(self.directory / MODEL_NAME, model.save, suffix=".keras")
        self._finished = True
        self._save_state()
        if self.verbose:
            print(
                f"\nSWA: the model now holds the mean of {self.count} points (steps {self.steps}).",
                flush=True,
            )

    def _score(self, model) -> dict:
        x_val, y_val = self.validation_data
        p = keras.tree.flatten(model.predict(x_val, batch_size=self.batch_size, verbose=0))
        if len(p) != 1:
            raise ValueError(
                f"`validation_data` is supported for models with one output; this one has {len(p)}."
            )
        dtype = keras.backend.standardize_dtype(p[0].dtype)
        p = np.asarray(p[0], dtype="float64")
        classes = p.shape[-1] if p.ndim == 2 and p.shape[-1] > 1 else 1
        # The validation NLL needs class probabilities (N, C) or one sigmoid unit.
        hint = "softmax" if classes > 1 else "sigmoid"
        check_probabilities(p.reshape(len(p), -1)[None], hint, dtype, what="The model's outputs")
        return _scores(p, labels(y_val, len(p), max(classes, 2), "validation_data[1]"))
