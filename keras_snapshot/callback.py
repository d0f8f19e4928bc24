"""SnapshotCallback: the cyclic cosine learning rate and one `.keras` snapshot per cycle."""

from __future__ import annotations

import math
import numbers
import os
import time
import warnings
from pathlib import Path

import keras
import numpy as np

from keras_snapshot import keras_internals
from keras_snapshot import manifest as manifest_lib
from keras_snapshot.schedule import (
    SnapshotSchedule,
    check_int,
    check_rate,
    cosine_rate,
    cycle_length,
    snapshot_steps,
    validate_schedule_args,
)

__all__ = ["SnapshotCallback"]

DEFAULT_LEARNING_RATE = 0.1

# Callbacks known to set the learning rate: with SnapshotCallback they have no effect or break it.
_RATE_SETTERS = (keras.callbacks.LearningRateScheduler, keras.callbacks.ReduceLROnPlateau)
# Callbacks that write the epoch logs where they are in the list.
_LOGGERS = (keras.callbacks.CSVLogger, keras.callbacks.TensorBoard, keras.callbacks.ProgbarLogger)
# Callbacks that stop training.
_STOPPERS = (keras.callbacks.EarlyStopping, keras.callbacks.TerminateOnNaN)
# Callbacks that never touch the learning rate (left out when naming suspects).
_PASSIVE = (
    keras.callbacks.History,
    keras.callbacks.ProgbarLogger,
    keras.callbacks.CSVLogger,
    keras.callbacks.TensorBoard,
    keras.callbacks.ModelCheckpoint,
    keras.callbacks.BackupAndRestore,
    keras.callbacks.EarlyStopping,
    keras.callbacks.TerminateOnNaN,
)


def _json_logs(logs) -> dict:
    """The scalar entries of a Keras logs dict as plain floats (JSON-ready)."""
    out = {}
    for key, value in (logs or {}).items():
        try:
            array = np.asarray(keras.ops.convert_to_numpy(value))
        except Exception:  # a value Keras could not convert is not worth a crash
            continue
        if array.size == 1 and np.issubdtype(array.dtype, np.number):
            out[str(key)] = float(array.reshape(()))
    return out


def _writable_ancestor(path: Path) -> Path | None:
    """The nearest existing ancestor of `path` (itself included), or None."""
    for candidate in [path, *path.parents]:
        if candidate.exists():
            return candidate
    return None


class SnapshotCallback(keras.callbacks.Callback):
    """Snapshot Ensembles: a cyclic cosine learning rate and a `.keras` snapshot per cycle.

    Over a run of T training steps split into M cycles the rate on step t (1-based) is

        alpha0 / 2 * (cos(pi * mod(t - 1, ceil(T/M)) / ceil(T/M)) + 1)

    (Huang et al., ICLR 2017). At the last step of every cycle the whole model is
    written to `directory` as a `.keras` file and recorded in
    `directory/manifest.json` (cycle, step, global epoch, learning rate, the logs
    then, file name). Files are written atomically and only by the chief worker.

    The step model. t counts the optimizer's steps as Keras's learning-rate schedules
    do (what the in-graph `SnapshotSchedule` receives): one per batch whose gradients
    are applied or accumulated, saved with the optimizer, so it stays right across
    `fit` calls and after `BackupAndRestore`. T defaults to `epochs x steps_per_epoch`.

    - Gradient accumulation (`gradient_accumulation_steps=k`): every batch is a step,
      the weights move every k-th with the rate of its step; `optimizer.iterations`
      (the updates, step // k) is recorded as `iterations` in the manifest.
    - Mixed precision (a `LossScaleOptimizer`): a batch whose gradients overflow is
      skipped and the step stays, so the next batch gets that step's rate. The run
      ends short of T by the skipped updates; the final weights are then the last
      cycle's snapshot, taken at train end and recorded with the step reached (and
      `batches`, the batches trained).
    - A warm start (an optimizer that has taken steps, first `fit` into a new
      directory) is refused at the first batch: compile again with a new optimizer
      to start the cycles from the warm weights.
    - One writer per directory: a second live process gets a RuntimeError naming it
      and the process holding it (an OS lock, released when that process dies).

    Two ways to drive the rate:

    - Callback path (default): compile with a float learning rate; the callback
      assigns the rate before every batch. Needs `steps_per_execution=1`.
    - In-graph path: compile the optimizer with a `SnapshotSchedule` of the same
      T and M; the callback then only writes snapshots. Exact with
      `steps_per_execution > 1` and `jit_compile`, and free of per-batch Python work.

    Each cycle must be long enough for the model to settle into a minimum: if the
    ensemble disappoints, try fewer, longer cycles first.

    Next to other callbacks (Keras gives a callback no public view of the others, so
    the callback finds the list `fit` is calling it from, `CallbackList.callbacks`,
    in its caller's frame through `keras_internals.sibling_callbacks`, and also
    checks effects, which need no such view):

    - Put SnapshotCallback FIRST in `callbacks=[...]`. It adds `learning_rate` to the
      epoch logs in `on_epoch_end`; loggers before it (CSVLogger, TensorBoard) have
      already written their row by then. A logger found before it gets a warning.
    - Callbacks that set the learning rate are refused: `LearningRateScheduler` and
      `ReduceLROnPlateau` (or a second SnapshotCallback) in the same `fit` raise a
      ValueError at train begin, since SnapshotCallback sets the rate of every
      batch and theirs would silently have no effect. Any other callback that
      changes the rate is caught by its effect: at the first batch of every epoch
      the rate must still be the one SnapshotCallback set last, else RuntimeError
      naming the callbacks that may have done it.
    - A run that ends before its last cycle (`EarlyStopping`, `TerminateOnNaN` or
      anything that sets `model.stop_training`, data that ran out, `initial_epoch`
      on an optimizer that has not taken those steps) gets a RuntimeWarning at train
      end with the snapshots taken and the step reached; `build_ensemble` works on
      the snapshots taken.

    The step is read from the optimizer after every batch where updates can be
    skipped or hooks fire once per execution of `steps_per_execution` > 1 steps (the
    batch index Keras passes to the hooks differs between Keras releases); otherwise
    each batch hook counts one step, checked against the optimizer at every epoch end.

    Args:
        directory: where snapshots and the manifest go; created if missing.
        cycles: M, the number of cycles and of snapshots (>= 1).
        initial_learning_rate: alpha0, the rate at the start of every cycle. Defaults
            to 0.1, or to the `SnapshotSchedule`'s rate on the in-graph path.
        total_steps: T, the number of training steps (batches, see the step model
            above) of the whole run. Defaults to `epochs * steps_per_epoch` of the
            `fit` call; pass it when the run spans several `fit` calls or the
            dataset's length is unknown.
        filename: snapshot file name pattern with a `{cycle}` field, ending in `.keras`.
        verbose: 1 prints a line per snapshot written.

    Example:

    ```python
    import keras, numpy as np, keras_snapshot
    x, y = np.random.rand(256, 8), np.random.randint(0, 3, 256)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3, activation="softmax")])
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9), "sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=32, epochs=6,
              callbacks=[keras_snapshot.SnapshotCallback("snapshots", cycles=3)])
    # snapshots/ now holds snapshot-01.keras .. snapshot-03.keras and manifest.json
    ```
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        cycles: int,
        initial_learning_rate: float | None = None,
        total_steps: int | None = None,
        filename: str = "snapshot-{cycle:02d}.keras",
        verbose: int = 0,
    ):
        super().__init__()
        if not isinstance(directory, (str, os.PathLike)) or not str(directory):
            raise TypeError(f"`directory` must be a non-empty path, got {directory!r}.")
        self.directory = Path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise ValueError(f"`directory` {str(self.directory)!r} exists and is not a directory.")
        ancestor = _writable_ancestor(self.directory.absolute())
        if ancestor is None or not os.access(ancestor, os.W_OK | os.X_OK):
            raise ValueError(
                f"`directory` {str(self.directory)!r} cannot be written: {str(ancestor)!r} is not "
                "writable. Pass a directory you can write to."
            )
        if initial_learning_rate is not None:
            initial_learning_rate = check_rate("initial_learning_rate", initial_learning_rate)
        if total_steps is None:
            check_int("cycles", cycles, 1)
        else:
            validate_schedule_args(1.0, total_steps, cycles)
        if not isinstance(filename, str) or not filename.endswith(".keras"):
            raise ValueError(f"`filename` must end with '.keras', got {filename!r}.")
        try:
            first, second = filename.format(cycle=1), filename.format(cycle=2)
        except (KeyError, IndexError, ValueError, TypeError, AttributeError) as error:
            raise ValueError(
                f"`filename` {filename!r} must be a format string with a single "
                f"{{cycle}} field, e.g. 'snapshot-{{cycle:02d}}.keras' ({error})."
            ) from None
        if first == second or os.sep in first or first == manifest_lib.MANIFEST_NAME:
            raise ValueError(
                f"`filename` {filename!r} must contain the {{cycle}} field and no directory, "
                "e.g. 'snapshot-{cycle:02d}.keras'."
            )
        if first.startswith(manifest_lib.TEMP_PREFIX):
            raise ValueError(f"`filename` must not start with {manifest_lib.TEMP_PREFIX!r}.")
        if "\0" in first or (os.altsep and os.altsep in first) or first in (".keras", "..keras"):
            raise ValueError(f"`filename` {filename!r} does not give a valid file name.")
        checked = min(int(cycles), 10_000)  # enough for any pattern with a {cycle} field
        names = {filename.format(cycle=cycle) for cycle in range(1, checked + 1)}
        if len(names) != checked:
            raise ValueError(
                f"`filename` {filename!r} gives the same file name to different cycles; use a "
                "pattern such as 'snapshot-{cycle:02d}.keras'."
            )
        if isinstance(verbose, bool) or not isinstance(verbose, numbers.Integral) or verbose not in (0, 1, 2):
            raise ValueError(f"`verbose` must be 0, 1 or 2, got {verbose!r}.")
        self.cycles = int(cycles)
        self.initial_learning_rate = initial_learning_rate
        self.total_steps = None if total_steps is None else int(total_steps)
        self.filename = filename
        self.verbose = verbose
        self._step = None  # global step (optimizer iterations) after the last batch

    # ------------------------------------------------------------------ set-up
    def _optimizer_schedule(self):
        """The optimizer's learning rate as compiled: a `keras.Variable` (a float rate), a
        `SnapshotSchedule`, or something else (another schedule or callable: its description).

        Read from the optimizer's public config: the `learning_rate` property gives a schedule's
        current value, not the schedule."""
        optimizer = self.model.optimizer
        if optimizer is None:
            raise ValueError(
                "SnapshotCallback needs a compiled model: call `model.compile(optimizer=...)` first."
            )
        inner = getattr(optimizer, "inner_optimizer", optimizer)  # LossScaleOptimizer
        rate = inner.learning_rate
        if isinstance(rate, keras.Variable):
            return rate
        try:
            config = inner.get_config().get("learning_rate")
        except Exception as error:  # e.g. a custom schedule without get_config
            return f"whose config cannot be read ({error})"
        if isinstance(config, dict) and config.get("class_name") == SnapshotSchedule.__name__:
            try:
                schedule = keras.saving.deserialize_keras_object(config)
            except Exception:  # a same-named class of another package
                schedule = None
            if isinstance(schedule, SnapshotSchedule):
                return schedule
        name = config.get("class_name") if isinstance(config, dict) else type(config).__name__
        return f"{name} ({config!r})" if not isinstance(config, dict) else f"{name} ({config.get('config')})"

    def _resolve_run(self) -> None:
        """Fixes T, alpha0 and the path (callback or in-graph) for this `fit` call."""
        schedule = self._optimizer_schedule()
        params = self.params or {}
        epochs, steps = params.get("epochs"), params.get("steps")
        fit_total = epochs * steps if epochs and steps else None
        if isinstance(schedule, SnapshotSchedule):
            self._sets_rate = False
            total = self.total_steps or fit_total or schedule.total_steps
            mismatch = []
            if total != schedule.total_steps:
                source = "total_steps" if self.total_steps else "epochs x steps per epoch of fit"
                mismatch.append(
                    f"T: {source} is {total}, the schedule's total_steps is {schedule.total_steps}"
                )
            if self.cycles != schedule.cycles:
                mismatch.append(
                    f"M: the callback's cycles is {self.cycles}, the schedule's is {schedule.cycles}"
                )
            if self.initial_learning_rate not in (None, schedule.initial_learning_rate):
                mismatch.append(
                    f"alpha0: the callback's initial_learning_rate is {self.initial_learning_rate}, "
                    f"the schedule's is {schedule.initial_learning_rate}"
                )
            if mismatch:
                raise ValueError(
                    "The optimizer's SnapshotSchedule and the SnapshotCallback disagree ("
                    + "; ".join(mismatch)
                    + "). Build both with the same total_steps and cycles."
                )
            alpha0 = schedule.initial_learning_rate
        else:
            if not isinstance(schedule, keras.Variable):
                raise TypeError(
                    f"The optimizer was compiled with the learning rate schedule {schedule}, which the "
                    "callback cannot override. Compile with a float learning rate (callback path) or with "
                    "keras_snapshot.SnapshotSchedule(...) (in-graph path)."
                )
            self._sets_rate = True
            total = self.total_steps or fit_total
            if total is None:
                raise ValueError(
                    "SnapshotCallback cannot tell the run's length T: the data has no known number of "
                    "steps per epoch. Pass `total_steps=` to SnapshotCallback (the number of training "
                    "steps of the whole run) or `steps_per_epoch=` to fit."
                )
            alpha0 = self.initial_learning_rate or DEFAULT_LEARNING_RATE
            steps_per_execution = int(getattr(self.model, "steps_per_execution", 1) or 1)
            if steps_per_execution > 1:
                raise ValueError(
                    f"steps_per_execution={steps_per_execution}: batch callbacks fire once per "
                    f"{steps_per_execution} steps, so a rate set by the callback would be wrong inside "
                    "each execution. Use the in-graph path: compile the optimizer with "
                    f"keras_snapshot.SnapshotSchedule({alpha0}, total_steps={total}, cycles={self.cycles}) "
                    "and keep this callback, or compile with steps_per_execution=1."
                )
        self._alpha0, self._total, _ = validate_schedule_args(alpha0, total, self.cycles)
        self._cycle_length = cycle_length(self._total, self.cycles)
        self._cycle_ends = snapshot_steps(self._total, self.cycles)
        self._check_execution_boundaries(steps)

    def _check_execution_boundaries(self, steps_per_epoch) -> None:
        """With steps_per_execution = k, hooks only see every k-th step of an epoch."""
        k = int(getattr(self.model, "steps_per_execution", 1) or 1)
        if k == 1:
            return
        if not steps_per_epoch:
            raise ValueError(
                f"With steps_per_execution={k} the callback can only take snapshots at execution "
                "boundaries, which it cannot check when the number of steps per epoch is unknown. "
                "Pass `steps_per_epoch=` to fit."
            )
        unreachable = [end for end in self._cycle_ends if (end % steps_per_epoch) % k != 0]
        if unreachable:
            raise ValueError(
                f"Cycle ends at steps {unreachable} fall inside an execution of steps_per_execution={k} "
                f"(with {steps_per_epoch} steps per epoch), where no callback can see the weights. "
                f"Choose steps_per_execution dividing the cycle length {self._cycle_length} and the "
                "steps per epoch, or epochs and cycles so that cycles end on epoch ends."
            )

    def _prepare_directory(self) -> None:
        self._chief = manifest_lib.is_chief(self.model)
        manifest = None
        if self._chief:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                probe = self.directory / f"{manifest_lib.TEMP_PREFIX}probe"
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as error:
                raise ValueError(
                    f"Cannot write to the snapshot directory {str(self.directory)!r}: {error}. "
                    "Pass a writable directory."
                ) from None
            # One writer per directory: a second live run would mix its snapshots with this one's.
            self._lock = manifest_lib.lock_directory(self.directory)
            manifest_lib.remove_stale_temporaries(self.directory)
            manifest = manifest_lib.read_manifest(self.directory)
        run = {
            "total_steps": self._total,
            "cycles": self.cycles,
            "cycle_length": self._cycle_length,
            "initial_learning_rate": self._alpha0,
        }
        self._fresh_directory = manifest is None
        if manifest is None:
            manifest = {"format": manifest_lib.MANIFEST_FORMAT, **run, "snapshots": []}
            if self._chief:
                # Written now, so that a run interrupted before its first snapshot is recognised as
                # this run when it resumes (its optimizer has taken steps by then).
                manifest_lib.write_manifest(self.directory, manifest)
        else:
            recorded = {key: manifest.get(key) for key in run}
            if recorded != run:
                raise ValueError(
                    f"{str(self.directory)!r} holds snapshots of another run ({recorded}), not of this one "
                    f"({run}). Use a new directory, or remove the old snapshots and manifest.json."
                )
        self._manifest = manifest
        self._adopt_unrecorded_snapshots()

    def _refuse_warm_start(self) -> None:
        """The first fit into a new directory with an optimizer that has already taken steps."""
        if not self._manifest["snapshots"]:
            try:  # the manifest this fit wrote at train begin: leave the directory as it was
                (self.directory / manifest_lib.MANIFEST_NAME).unlink()
            except OSError:
                pass
        raise ValueError(
            f"The optimizer has already taken {self._step} steps, but {str(self.directory)!r} holds no run "
            "yet: the schedule counts the optimizer's steps from the start of the run, so it would begin "
            f"at step {self._step + 1} and record the warm-up model as a snapshot. To start the cycles from "
            "a warm (pre-trained or warmed-up) model, compile it again with a new optimizer, e.g. "
            "`model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss=...)` (the weights "
            "stay, the step count starts at 0), then fit with SnapshotCallback. To resume an interrupted "
            "run, use the directory it wrote."
        )

    def _adopt_unrecorded_snapshots(self) -> None:
        """Records snapshot files that were written just before a crash hit the manifest write.

        Every file is renamed into place only once complete, so a present file is a whole one.
        """
        if not self._chief:
            return
        missing = []
        recorded = {entry["cycle"] for entry in self._manifest["snapshots"]}
        for entry in self._manifest["snapshots"]:
            if not (self.directory / entry["file"]).is_file():
                missing.append(entry["file"])
        if missing:
            raise ValueError(
                f"The manifest in {str(self.directory)!r} lists snapshots whose files are gone: {missing}. "
                "Restore them or start a new run in a new directory."
            )
        adopted = False
        for cycle, end in enumerate(self._cycle_ends, start=1):
            name = self.filename.format(cycle=cycle)
            if cycle not in recorded and (self.directory / name).is_file():
                self._record(cycle, end, epoch=None, logs={}, file=name, write=False)
                adopted = True
        if adopted:
            manifest_lib.write_manifest(self.directory, self._manifest)

    # ------------------------------------------------------------------ hooks
    def on_train_begin(self, logs=None):
        self._resolve_run()
        self._siblings = keras_internals.sibling_callbacks(self)
        self._check_siblings()
        self._prepare_directory()
        model = self.model
        self._assigner = keras_internals.RateAssigner()
        self._iterations = keras_internals.IterationsReader(model.optimizer)
        self._execution = int(getattr(model, "steps_per_execution", 1) or 1)
        # A loss-scale optimizer (what compile wraps the optimizer in under mixed_float16) skips the
        # update of a batch whose gradients overflow, and the step count stays: read it after every
        # batch then. Otherwise (gradient accumulation included) each batch is one step: counted.
        self._skips_possible = isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        self._read_each_batch = self._execution > 1 or self._skips_possible
        # In-graph schedule with a loss scaler: the rate needs no count from here, only the cycle ends
        # do. The count after n unread batches is at most n more than the last read, so it is read
        # only once it could have reached the next cycle end (a host read per batch costs 10-20 % of a
        # small model's step, and stalls an accelerator's pipeline).
        self._read_lazily = self._skips_possible and not self._sets_rate and self._execution == 1
        self._unread = 0  # batches since the count was last read (lazy reading only)
        if self._sets_rate and keras_internals.JaxRateSetter.applies(model):
            self._jax_rates = keras_internals.JaxRateSetter(model, self._rate)
        else:
            self._jax_rates = None
        self._step = None  # read from the optimizer at the first batch, after any restore
        self._fit_start = None  # the step count at this fit's first batch
        self._fit_batches = 0  # batches run in this fit
        self._first_epoch = None  # Keras's index of this fit's first epoch
        self._epoch_offset = 0  # epochs of earlier fits, where Keras numbers this fit's from 0
        self._epoch = 0
        self._epoch_batches = 0  # batch hooks seen in this epoch
        self._assigned = None  # the rate this callback set last, in this fit
        self._deferred = None
        self._warned_past_end = False
        self._warned_count = False

    def on_epoch_begin(self, epoch, logs=None):
        if self._first_epoch is None:
            self._first_epoch = epoch
        self._epoch = epoch
        self._epoch_batches = 0

    def on_train_batch_begin(self, batch, logs=None):
        if self._step is None:
            self._start_counting()
        if not self._sets_rate:
            return
        if self._epoch_batches == 0 and self._assigned is not None:
            self._check_rate_kept()
        step = self._step + 1
        self._assigned = self._rate(step)
        if self._jax_rates is not None:
            model = keras_internals.unsynced_model(self)
            if model is not None and self._jax_rates.set(model, step):
                return
        # JAX: reach the optimizer through `self.model` (that property syncs the trainer's state;
        # an assignment to a cached optimizer would be ignored).
        self._assigner.assign(self.model.optimizer, self._assigned)

    def on_train_batch_end(self, batch, logs=None):
        if self._step is None:  # a subclass or hook order skipped batch_begin
            self._start_counting()
        self._epoch_batches += 1
        self._fit_batches += self._batches_of_hook()
        if self._read_lazily:
            self._unread += 1
            if self._step + self._unread >= self._next_read_step():
                self._step, self._unread = self._iterations.read(self), 0
        elif self._read_each_batch:
            # One hook for several steps (the batch index Keras passes is the execution's first step
            # on Keras 3.10, its last on 3.11+), or a batch whose update a loss-scale optimizer may
            # have skipped: the optimizer's count is right on all.
            self._step = self._iterations.read(self)
        else:
            # One hook per step: counting is free, and is checked against the optimizer's count at
            # every epoch end (where reading it costs no state sync).
            self._step += 1
        if self._jax_rates is not None and self._jax_rates.pending is not None:
            model = keras_internals.unsynced_model(self)
            if model is not None:
                self._jax_rates.verify(model)
        if self._step > self._total and not self._warned_past_end:
            self._warned_past_end = True
            warnings.warn(
                f"Training has gone past total_steps={self._total}: the rate starts a new cycle and no "
                "more snapshots are taken. After a mid-epoch restore (BackupAndRestore with an integer "
                "save_freq replays the interrupted epoch from its start) this is expected and all "
                "snapshots are already taken; otherwise pass the run's real length as total_steps.",
                RuntimeWarning,
                stacklevel=2,
            )
        for cycle in self._due_cycles():
            end = self._cycle_ends[cycle - 1]
            if end == self._step and self._is_last_batch_of_epoch():
                self._deferred = cycle  # written in on_epoch_end, with the validation metrics
            elif end == self._step:
                self._snapshot(cycle, logs)
            else:
                warnings.warn(
                    f"Cycle {cycle} ended at step {end} but the callback first saw step {self._step}; "
                    "its snapshot cannot be taken. This happens when training resumes from a state past "
                    "the cycle end that was saved without its snapshot.",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self._done_cycles.add(cycle)

    def on_epoch_end(self, epoch, logs=None):
        if self._step is not None:
            self._check_step_count()
        if self._step and logs is not None:
            logs["learning_rate"] = self._rate(self._step)
        if self._deferred is not None:
            cycle, self._deferred = self._deferred, None
            self._snapshot(cycle, logs)

    def on_train_end(self, logs=None):
        if self._step is None:
            # No batch ran: a restore put the run at its end (initial_epoch == epochs). The backup
            # may hold the final cycle end whose snapshot the interrupted run could not write.
            self._start_counting()
        elif self._unread:
            self._step, self._unread = self._iterations.read(self), 0
        if self._deferred is not None:  # training stopped between the last batch and epoch end
            cycle, self._deferred = self._deferred, None
            self._snapshot(cycle, logs)
        try:
            self._finish_run(logs)
            if self._chief and self._first_epoch is not None and self._fit_batches:
                # The global epoch reached, for the epoch numbers of a later fit that starts from 0.
                self._manifest["epochs"] = self._epoch_offset + self._epoch + 1
                manifest_lib.write_manifest(self.directory, self._manifest)
        finally:
            manifest_lib.unlock_directory(getattr(self, "_lock", None))
            self._lock = None
        self._step = None

    # ------------------------------------------------------------------ other callbacks
    def _check_siblings(self) -> None:
        """Refuses callbacks known to set the learning rate; warns about loggers placed before this
        callback, which write their epoch row before `learning_rate` is in the logs."""
        if not self._siblings:
            return
        setters = [
            c
            for c in self._siblings
            if isinstance(c, _RATE_SETTERS) or (isinstance(c, SnapshotCallback) and c is not self)
        ]
        if setters:
            names = ", ".join(type(c).__name__ for c in setters)
            what = (
                "sets the learning rate of every batch itself"
                if self._sets_rate
                else "runs with an optimizer compiled with a SnapshotSchedule, which refuses other rates"
            )
            raise ValueError(
                f"{names} in the same fit as SnapshotCallback: SnapshotCallback {what}, so {names} would "
                "have no effect (or fail), and the schedule would not be the one you set. Remove "
                f"{names}: the snapshot schedule is the learning rate schedule of this run."
            )
        position = next(i for i, c in enumerate(self._siblings) if c is self)
        loggers = [type(c).__name__ for c in self._siblings[:position] if isinstance(c, _LOGGERS)]
        if loggers:
            warnings.warn(
                f"{', '.join(loggers)} comes before SnapshotCallback in callbacks=[...], so its epoch logs "
                "will not hold `learning_rate` (SnapshotCallback adds it at epoch end). Put "
                "SnapshotCallback first in the list.",
                RuntimeWarning,
                stacklevel=3,
            )

    def _check_rate_kept(self) -> None:
        """At an epoch's first batch: the rate must still be the one this callback set last.

        Another callback that sets the rate (in on_epoch_begin/end, or in batch hooks after this
        one) shows here; once per epoch the Variables hold the state, so reading is cheap."""
        variable = self.model.optimizer.learning_rate
        current = float(np.asarray(keras.ops.convert_to_numpy(variable)).reshape(()))
        expected = float(np.asarray(self._assigned, dtype=keras.backend.standardize_dtype(variable.dtype)))
        if current == expected:
            return
        if self._siblings:
            others = [
                type(c).__name__ for c in self._siblings if c is not self and not isinstance(c, _PASSIVE)
            ]
            suspects = f"one of {others}" if others else "another callback"
        else:
            suspects = "another callback (LearningRateScheduler, ReduceLROnPlateau or one of your own)"
        raise RuntimeError(
            f"The learning rate changed between two batches: SnapshotCallback set {expected} for step "
            f"{self._step}, and at the start of epoch {self._epoch + 1} it is {current}. It was changed by "
            f"{suspects}. SnapshotCallback sets the rate of every batch, so that callback either has no "
            "effect or makes the schedule wrong: remove it from callbacks=[...]."
        )

    def _check_step_count(self) -> None:
        """At epoch end (where reading it costs no state sync): the step must equal the optimizer's
        iterations, counted (one batch hook per step) or read inside the epoch."""
        iterations = self._iterations.read(self)
        unread, self._unread = self._unread, 0
        if self._step <= iterations <= self._step + unread:  # lazily read: skips happened or not
            self._step = iterations
            return
        if not self._warned_count:
            self._warned_count = True
            warnings.warn(
                f"SnapshotCallback counted step {self._step} but the optimizer's step count is {iterations} "
                f"at the end of epoch {self._epoch + 1}: batch hooks did not run once per step (a callback "
                "or trainer that skips them?). The schedule follows the optimizer's count from here on; the "
                f"rates of this epoch were off by up to {abs(iterations - self._step)} steps.",
                RuntimeWarning,
                stacklevel=2,
            )
        self._step = iterations

    def _skip_allowance(self) -> int:
        """How many updates a loss-scale optimizer may skip in a healthy run: one per halving of its
        initial scale while it settles, and about two per growth of the scale after that."""
        if not self._skips_possible:
            return 0
        optimizer = self.model.optimizer
        scale = float(getattr(optimizer, "initial_scale", 2.0**15) or 1.0)
        growth = int(getattr(optimizer, "dynamic_growth_steps", 2000) or 2000)
        return math.ceil(math.log2(max(scale, 1.0))) + 1 + 2 * (-(-self._total // growth))

    def _finish_run(self, logs) -> None:
        """At train end: the last snapshot where skipped updates kept the step count below T, else a
        warning wherever a cycle has no snapshot and the fit is not one part of a longer run."""
        missing = [cycle for cycle in range(1, self.cycles + 1) if cycle not in self._done_cycles]
        if not missing or self._fit_start is None:
            return
        params = self.params or {}
        steps, epochs = params.get("steps"), params.get("epochs")
        planned = None
        if steps and epochs and self._first_epoch is not None:
            planned = max(0, epochs - self._first_epoch) * steps  # batches this fit was to run
        stopped = bool(getattr(self.model, "stop_training", False))
        ran_out = not stopped and planned is not None and self._fit_batches < planned
        skipped = max(0, self._fit_batches - (self._step - self._fit_start))
        allowance = self._skip_allowance()
        # The step this fit would have reached had no update been skipped.
        reach = self._fit_start + (planned if planned is not None else self._fit_batches)
        ends_run = reach + allowance >= self._total
        short = self._total - self._step
        previous_end = self._cycle_ends[-2] if self.cycles > 1 else 0
        if (
            not stopped
            and not ran_out
            and ends_run
            and missing == [self.cycles]
            and self._step > previous_end
            and short <= skipped + allowance
        ):
            # The run is over: its last cycle ended short by the updates the loss scaler skipped.
            # The final weights are that cycle's snapshot, recorded with their own step count.
            self._snapshot(self.cycles, logs, step=self._step)
            return
        if not stopped and not ran_out and not ends_run and self.total_steps is not None:
            return  # one fit of a run that total_steps says goes on in another fit
        taken = sorted(self._done_cycles)
        head = (
            f"{len(taken)} of the {self.cycles} snapshots were taken"
            + (f" (cycles {taken})" if taken else "")
            + f"; the run reached step {self._step} of T={self._total}"
        )
        if stopped:
            stoppers = [type(c).__name__ for c in self._siblings or () if isinstance(c, _STOPPERS)]
            by = f" by {', '.join(stoppers)}" if stoppers else " by a callback (model.stop_training)"
            message = (
                f"Training was stopped{by} at step {self._step} of {self._total}, before the last cycle "
                f"ended (step {self._cycle_ends[-1]}): {head}. build_ensemble works on the snapshots taken. "
                "Stopping early defeats the schedule: the rate restarts high at every cycle, so a pause in "
                "progress does not mean the end. Remove EarlyStopping, or set total_steps (or epochs) to "
                "the run you mean and let it finish."
            )
        elif ran_out:
            message = (
                f"The data ran out: this fit ran {self._fit_batches} of its {planned} batches "
                f"(epochs x steps_per_epoch), so the run ended before its last cycle: {head}. Make the "
                "dataset long enough (e.g. `.repeat()` on a tf.data.Dataset), lower steps_per_epoch or "
                "epochs, or pass total_steps= the number of batches the data gives."
            )
        elif not ends_run:
            first = self._first_epoch or 0
            message = (
                f"This fit started at step {self._fit_start} (optimizer steps taken before it)"
                + (f" and at epoch {first + 1} (initial_epoch={first})" if first else "")
                + f", so its {planned if planned is not None else self._fit_batches} batches could only "
                f"reach step {reach} of T={self._total}: {head}. The schedule counts the optimizer's "
                "steps, not Keras's epoch numbers: start a new run from step 0 (a freshly compiled "
                "optimizer, no initial_epoch), or pass total_steps= the number of steps this run "
                "really trains."
            )
        else:
            message = (
                f"The loss-scale optimizer skipped {skipped} updates in this fit (gradients that "
                f"overflowed in float16), so the run ended before its last cycle: {head}. Train a little "
                "longer (total_steps a little below epochs x steps_per_epoch), or lower the "
                "LossScaleOptimizer's initial_scale."
            )
        warnings.warn(message, RuntimeWarning, stacklevel=2)

    # ------------------------------------------------------------------ internals
    def _rate(self, t: int) -> float:
        return cosine_rate((t - 1) % self._cycle_length, self._cycle_length, self._alpha0)

    def _batches_of_hook(self) -> int:
        """The batches the batch hook just seen stands for: one, or an execution of k (the last
        one of an epoch possibly shorter)."""
        if self._execution == 1:
            return 1
        steps = (self.params or {}).get("steps")
        if not steps:
            return self._execution
        return max(0, min(self._execution, steps - (self._epoch_batches - 1) * self._execution))

    def _is_last_batch_of_epoch(self) -> bool:
        """Whether the batch hook just seen ends the epoch: an epoch of S steps runs ceil(S/k)
        executions of k steps (hook calls), the last one possibly shorter."""
        steps = (self.params or {}).get("steps")
        return bool(steps) and self._epoch_batches == -(-steps // self._execution)

    def _start_counting(self) -> None:
        """Reads the global step once per fit: after on_train_begin, so after any restore."""
        self._step = self._iterations.read(self)
        self._fit_start = self._step
        self._skipped_before = 0
        steps = (self.params or {}).get("steps")
        if self._first_epoch and steps and self._skips_possible:
            # Keras's epoch number continues the run (BackupAndRestore, initial_epoch): the batches
            # before this fit that made no step are updates the loss scaler skipped.
            gap = self._first_epoch * steps - self._step
            self._skipped_before = gap if 0 < gap <= self._skip_allowance() else 0
        self._done_cycles = {entry["cycle"] for entry in self._manifest["snapshots"]}
        if self._step > 0 and self._fresh_directory and self._chief:
            self._refuse_warm_start()
        if (self._first_epoch or 0) == 0 and self._step > 0:
            # A fit that continues a run without initial_epoch: Keras numbers its epochs from 0.
            self._epoch_offset = int(self._manifest.get("epochs") or 0)
        if self._step == 0 and self._done_cycles and self._chief:
            if len(self._done_cycles) == self.cycles:
                raise ValueError(
                    f"{str(self.directory)!r} already holds snapshots: all {self.cycles} of a finished run, "
                    "but this model has not trained yet (optimizer.iterations == 0). Use a new directory "
                    "for a new run, or remove the old snapshots and manifest.json."
                )
            # An interrupted run that wrote snapshots before BackupAndRestore's first backup restarts
            # from step 0: its snapshots are kept (never retaken or overwritten), the others follow.
            warnings.warn(
                f"{str(self.directory)!r} holds snapshots {sorted(self._done_cycles)} of an interrupted "
                "run but this model starts at step 0 (no backup was restored): they are kept and only the "
                "missing cycles will be snapshotted. If this is a new run, stop it and use a new directory.",
                RuntimeWarning,
                stacklevel=2,
            )
        # A restore can land exactly on a cycle end whose snapshot was lost with the crash
        # (the backup was written before this callback's hook): the weights are that state.
        if self._step in self._cycle_ends:
            cycle = self._cycle_ends.index(self._step) + 1
            if cycle not in self._done_cycles:
                steps = (self.params or {}).get("steps")
                epoch = -(-self._step // steps) if steps else self._epoch_offset + self._epoch
                self._snapshot(cycle, {}, epoch=epoch)

    def _next_read_step(self) -> int:
        """Lazy reading: the smallest step at which something happens (a cycle end whose snapshot
        is due, or the step past total_steps that warns)."""
        ends = [
            end
            for cycle, end in enumerate(self._cycle_ends, start=1)
            if end > self._step and cycle not in self._done_cycles
        ]
        if ends:
            return min(ends)
        return self._total + 1 if not self._warned_past_end else math.inf

    def _due_cycles(self) -> list[int]:
        return [
            cycle
            for cycle, end in enumerate(self._cycle_ends, start=1)
            if end <= self._step and cycle not in self._done_cycles and cycle != self._deferred
        ]

    def _save_model(self, path: str) -> None:
        """Writes the whole model (architecture, weights, optimizer state) to `path`."""
        model = self.model
        if keras.backend.backend() == "jax" and keras_internals.jax_process_count() > 1:
            # Keras's saving builds reference objects (an Optimizer, with variables). Under a
            # multi-process distribution every variable creation is a collective that the other
            # processes, which do not write, never join: the chief alone would hang or fail. The
            # model's own variables are read as they are; only those throwaway objects change.
            distribution = keras.distribution.distribution()
            keras.distribution.set_distribution(None)
            try:
                model.save(path)
            finally:
                keras.distribution.set_distribution(distribution)
            return
        model.save(path)

    def _record(self, cycle, step, epoch, logs, file, write=True) -> None:
        counts, self._counts = getattr(self, "_counts", None) or {}, None
        entry = {
            "cycle": cycle,
            "step": step,
            **counts,
            "epoch": epoch,
            "learning_rate": self._rate(step),
            "logs": logs,
            "file": file,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        snapshots = [e for e in self._manifest["snapshots"] if e["cycle"] != cycle] + [entry]
        self._manifest["snapshots"] = sorted(snapshots, key=lambda e: e["cycle"])
        if write:
            manifest_lib.write_manifest(self.directory, self._manifest)

    def _saved_counts(self, step: int) -> dict:
        """What the saved model's optimizer says, where it differs from `step` (the schedule's count):
        `iterations` (the weight updates: step // k with gradient accumulation) and `batches` (the
        batches trained, more than `step` where a loss-scale optimizer skipped updates)."""
        counts = {}
        iterations = int(np.asarray(keras.ops.convert_to_numpy(self.model.optimizer.iterations)))
        if iterations != step:
            counts["iterations"] = iterations
        if self._fit_start is not None:
            batches = self._fit_start + self._fit_batches + self._skipped_before
            if batches != step:
                counts["batches"] = batches
        return counts

    def _snapshot(self, cycle: int, logs, epoch: int | None = None, step: int | None = None) -> None:
        self._done_cycles.add(cycle)
        if not self._chief:
            return
        step = self._cycle_ends[cycle - 1] if step is None else step
        name = self.filename.format(cycle=cycle)
        try:
            counts = self._saved_counts(step)
            manifest_lib.atomic_write(self.directory / name, self._save_model, suffix=".keras")
            epoch = self._epoch_offset + self._epoch + 1 if epoch is None else epoch
            self._counts = counts  # for _record (the manifest entry)
            self._record(cycle, step, epoch, _json_logs(logs), name)
        except OSError as error:
            if not self.directory.is_dir():
                advice = (
                    "the directory no longer exists: it was deleted or moved during training, with the "
                    "snapshots written there before. Put it back with its manifest.json"
                )
            else:
                advice = (
                    f"{error.strerror or error}. Earlier snapshots and manifest.json are untouched; "
                    "free space or fix the directory"
                )
            message = (
                f"Could not write snapshot {cycle} ({name}) to {str(self.directory)!r}: {advice}, then "
                "resume the run with keras.callbacks.BackupAndRestore, which continues from the last "
                "backup and takes the missing snapshots."
            )
            if error.errno is None:
                raise OSError(message) from error
            raise OSError(error.errno, message) from error
        if self.verbose:
            print(f"\nSnapshot {cycle}/{self.cycles} at step {step}: {self.directory / name}", flush=True)
