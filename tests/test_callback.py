"""SnapshotCallback with real training: the rate applied at every step, the snapshots, and bad input."""

from __future__ import annotations

import hashlib
import json
import tempfile
import warnings

import keras
import numpy as np
import pytest
from conftest import DIGITS_BATCH, DIGITS_CYCLES, DIGITS_EPOCHS, make_digits_model

import keras_snapshot
from keras_snapshot import SnapshotCallback, SnapshotSchedule, snapshot_learning_rate, snapshot_steps

BACKEND = keras.backend.backend()


# --------------------------------------------------------------------------- the rate, from the weights
class EpochWeights(keras.callbacks.Callback):
    """Records the kernel at train begin and after every epoch (through `self.model`: JAX syncs there)."""

    def __init__(self):
        super().__init__()
        self.kernels = []

    def on_train_begin(self, logs=None):
        if not self.kernels:
            self.kernels.append(np.array(self.model.get_weights()[0][:, 0]))

    def on_epoch_end(self, epoch, logs=None):
        self.kernels.append(np.array(self.model.get_weights()[0][:, 0]))


def mean_prediction(y_true, y_pred):
    """A loss whose gradient with respect to the prediction is exactly 1 (batch of 1)."""
    return keras.ops.mean(y_pred)


def one_weight_per_step_model(steps_per_epoch, learning_rate, steps_per_execution=1):
    """y = x . w with a one-hot x per batch and loss mean(y): step b of an epoch moves w[b] by exactly -lr."""
    model = keras.Sequential(
        [keras.Input((steps_per_epoch,)), keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")]
    )
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate),  # no momentum: the update is -lr * gradient
        loss=mean_prediction,
        steps_per_execution=steps_per_execution,
    )
    return model


def applied_rates(recorder):
    """The learning rate of every step, in order: minus the per-epoch weight changes."""
    kernels = recorder.kernels
    return np.concatenate([kernels[i] - kernels[i + 1] for i in range(len(kernels) - 1)])


def one_hot_data(steps_per_epoch):
    return np.eye(steps_per_epoch, dtype="float32"), np.zeros((steps_per_epoch, 1), "float32")


def expected_rates(alpha0, total, cycles, first=1):
    return snapshot_learning_rate(
        np.arange(first, total + 1), initial_learning_rate=alpha0, total_steps=total, cycles=cycles
    )


def fit_callback_path(directory, model=None):
    """The callback path on T = 30 steps (10 per epoch), M = 4: cycles of 8, 8, 8 and 6 steps.
    Returns (model, recorder, history)."""
    model = model or one_weight_per_step_model(10, 0.5)  # the compiled rate must be overridden
    x, y = one_hot_data(10)
    recorder = EpochWeights()
    history = model.fit(
        x,
        y,
        batch_size=1,
        epochs=3,
        shuffle=False,
        verbose=0,
        callbacks=[SnapshotCallback(directory, cycles=4, initial_learning_rate=0.2), recorder],
    )
    return model, recorder, history


def test_callback_path_applies_the_formula_at_every_step(tmp_path):
    _, recorder, history = fit_callback_path(tmp_path / "s")
    np.testing.assert_allclose(applied_rates(recorder), expected_rates(0.2, 30, 4), rtol=0, atol=1e-6)
    # The rate of each epoch's last step is in the logs, for History and TensorBoard.
    np.testing.assert_allclose(
        history.history["learning_rate"], expected_rates(0.2, 30, 4)[[9, 19, 29]], rtol=1e-6
    )
    manifest = keras_snapshot.read_manifest(tmp_path / "s")
    assert [entry["step"] for entry in manifest["snapshots"]] == [8, 16, 24, 30]


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="the JAX trainer's state sync is JAX-only")
def test_callback_path_does_not_sync_the_jax_state_every_batch(tmp_path, monkeypatch):
    # Reading `callback.model` on JAX copies every weight and optimizer slot back into the Variables;
    # per batch that cost 27% of a small CNN's step on an H100. The rate must still apply at every step.
    model = one_weight_per_step_model(10, 0.5)
    syncs = []
    real_sync = type(model).jax_state_sync

    def counting_sync(self):
        if not self._jax_state_synced:  # a call that copies the state (others return at once)
            syncs.append(1)
        real_sync(self)

    monkeypatch.setattr(type(model), "jax_state_sync", counting_sync)
    _, recorder, _ = fit_callback_path(tmp_path / "s", model)
    np.testing.assert_allclose(applied_rates(recorder), expected_rates(0.2, 30, 4), rtol=0, atol=1e-6)
    # Keras syncs about once per epoch and per callback reading the model at epoch end, and each of
    # the 4 snapshots syncs once: 30 steps must not mean 30 syncs (the full sync per batch gave 30).
    assert len(syncs) < 15, len(syncs)


def test_in_graph_path_is_exact_with_steps_per_execution():
    # T = 56, M = 5: ceil(56/5) = 12, cycle ends 12, 24, 36, 48, 56, all on execution boundaries of 4.
    steps, epochs, cycles, execution = 8, 7, 5, 4
    x, y = one_hot_data(steps)
    schedule = SnapshotSchedule(0.2, total_steps=steps * epochs, cycles=cycles)
    if BACKEND == "torch":  # Keras's torch backend refuses the mode itself, clearly, before training
        with pytest.raises(ValueError, match="steps_per_execution"):
            one_weight_per_step_model(steps, schedule, steps_per_execution=execution).fit(x, y, verbose=0)
        return
    model = one_weight_per_step_model(steps, schedule, steps_per_execution=execution)
    recorder = EpochWeights()
    with tempfile.TemporaryDirectory() as directory:
        model.fit(
            x,
            y,
            batch_size=1,
            epochs=epochs,
            shuffle=False,
            verbose=0,
            callbacks=[recorder, SnapshotCallback(directory, cycles=cycles)],
        )
        manifest = keras_snapshot.read_manifest(directory)
    np.testing.assert_allclose(applied_rates(recorder), expected_rates(0.2, 56, cycles), rtol=0, atol=1e-6)
    assert [entry["step"] for entry in manifest["snapshots"]] == [12, 24, 36, 48, 56]
    assert [entry["learning_rate"] for entry in manifest["snapshots"]] == pytest.approx(
        list(expected_rates(0.2, 56, cycles)[[11, 23, 35, 47, 55]])
    )


def test_rate_follows_the_global_step_across_fit_calls(tmp_path):
    steps, cycles = 10, 3  # T = 30 over three fit calls of one epoch each
    x, y = one_hot_data(steps)
    model = one_weight_per_step_model(steps, 0.1)
    callback = SnapshotCallback(tmp_path / "s", cycles=cycles, initial_learning_rate=0.3, total_steps=30)
    recorder = EpochWeights()
    for epoch in range(3):
        model.fit(
            x,
            y,
            batch_size=1,
            initial_epoch=epoch,
            epochs=epoch + 1,
            shuffle=False,
            verbose=0,
            callbacks=[callback, recorder],
        )
    np.testing.assert_allclose(applied_rates(recorder), expected_rates(0.3, 30, cycles), rtol=0, atol=1e-6)
    assert [e["step"] for e in keras_snapshot.read_manifest(tmp_path / "s")["snapshots"]] == [10, 20, 30]


# --------------------------------------------------------------------------- the snapshots
class CycleEndWeights(keras.callbacks.Callback):
    """Copies the weights at given global steps (spe = 1: one batch hook per step)."""

    def __init__(self, steps):
        super().__init__()
        self.steps, self.step, self.weights = set(steps), 0, {}

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if self.step in self.steps:
            self.weights[self.step] = [np.array(w) for w in self.model.get_weights()]


def test_snapshots_are_the_model_at_each_cycle_end(tmp_path, digits):
    x, y, x_test, y_test = digits
    x, y = x[:640], y[:640]  # 10 steps per epoch of 64
    epochs, cycles = 5, 3  # T = 50, ceil(50/3) = 17: ends 17, 34, 50 (the last cycle is shorter)
    ends = snapshot_steps(50, cycles)
    model = make_digits_model()
    recorder = CycleEndWeights(ends)
    model.fit(
        x,
        y,
        batch_size=64,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        validation_data=(x_test, y_test),
        callbacks=[recorder, SnapshotCallback(tmp_path / "snaps", cycles=cycles, initial_learning_rate=0.2)],
    )
    files = sorted(p.name for p in (tmp_path / "snaps").iterdir())
    assert files == ["manifest.json", "snapshot-01.keras", "snapshot-02.keras", "snapshot-03.keras"]
    manifest = json.loads((tmp_path / "snaps" / "manifest.json").read_text())
    assert manifest["total_steps"] == 50 and manifest["cycles"] == 3 and manifest["cycle_length"] == 17
    assert [e["cycle"] for e in manifest["snapshots"]] == [1, 2, 3]
    assert [e["step"] for e in manifest["snapshots"]] == ends
    assert [e["epoch"] for e in manifest["snapshots"]] == [2, 4, 5]
    assert [e["file"] for e in manifest["snapshots"]] == files[1:]
    for entry in manifest["snapshots"]:
        assert entry["learning_rate"] == pytest.approx(
            snapshot_learning_rate(entry["step"], initial_learning_rate=0.2, total_steps=50, cycles=3)
        )
        assert "loss" in entry["logs"] and "accuracy" in entry["logs"]
    # The last cycle ends on an epoch end: its entry carries the validation metrics too.
    assert "val_loss" in manifest["snapshots"][-1]["logs"]

    reference = make_digits_model()
    for entry in manifest["snapshots"]:
        loaded = keras.saving.load_model(tmp_path / "snaps" / entry["file"])
        reference.set_weights(recorder.weights[entry["step"]])
        np.testing.assert_allclose(
            loaded.predict(x_test, verbose=0), reference.predict(x_test, verbose=0), rtol=1e-5, atol=1e-6
        )
    # Different minima: consecutive snapshots are different models.
    first = keras.saving.load_model(tmp_path / "snaps" / "snapshot-01.keras")
    last = keras.saving.load_model(tmp_path / "snaps" / "snapshot-03.keras")
    assert not np.allclose(first.get_weights()[0], last.get_weights()[0])


def test_digits_run_writes_m_snapshots_with_validation_logs(digits_run):
    directory, history = digits_run
    manifest = keras_snapshot.read_manifest(directory)
    steps_per_epoch = 1400 // DIGITS_BATCH + 1
    assert [e["step"] for e in manifest["snapshots"]] == snapshot_steps(
        DIGITS_EPOCHS * steps_per_epoch, DIGITS_CYCLES
    )
    assert all("val_accuracy" in e["logs"] for e in manifest["snapshots"])
    assert len(history.history["learning_rate"]) == DIGITS_EPOCHS
    # Each snapshot is a trained model (digits is easy): far above chance.
    assert min(e["logs"]["val_accuracy"] for e in manifest["snapshots"]) > 0.8
    assert not list(directory.glob(".tmp-*"))


# --------------------------------------------------------------------------- bad input, before training
def digest(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"cycles": 0}, ValueError, "cycles"),
        ({"cycles": "3"}, TypeError, "cycles"),
        ({"cycles": True}, TypeError, "cycles"),
        ({"cycles": 3, "initial_learning_rate": -0.1}, ValueError, "initial_learning_rate"),
        ({"cycles": 3, "initial_learning_rate": float("inf")}, ValueError, "initial_learning_rate"),
        ({"cycles": 3, "total_steps": 0}, ValueError, "total_steps"),
        ({"cycles": 5, "total_steps": 4}, ValueError, "cannot exceed"),
        ({"cycles": 4, "total_steps": 9}, ValueError, "without any step"),
        ({"cycles": 3, "filename": "snap.keras"}, ValueError, "cycle"),
        ({"cycles": 3, "filename": "snap-{cycle}.h5"}, ValueError, "keras"),
        ({"cycles": 3, "filename": "snap-{epoch}.keras"}, ValueError, "cycle"),
        ({"cycles": 3, "verbose": 3}, ValueError, "verbose"),
    ],
)
def test_bad_arguments_fail_in_init(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        SnapshotCallback(tmp_path / "s", **kwargs)


def test_directory_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        SnapshotCallback(tmp_path / "file", cycles=2)
    with pytest.raises(ValueError, match="cannot be written"):
        SnapshotCallback(tmp_path / "file" / "sub", cycles=2)


def fit_fails_before_training(model, callback, match, error=ValueError, **fit_kwargs):
    x, y = np.random.default_rng(0).random((64, 4), "float32"), np.zeros((64, 1), "float32")
    args = {"x": x, "y": y, "batch_size": 16, "epochs": 2, "verbose": 0, **fit_kwargs}
    with pytest.raises(error, match=match):
        model.fit(callbacks=[callback], **args)
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 0


def small_model(learning_rate=0.1, **compile_kwargs):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(learning_rate), "mse", **compile_kwargs)
    return model


def test_unwritable_directory_fails_at_train_begin():
    # Root can write almost anywhere; /proc refuses new entries even to root.
    callback = SnapshotCallback("/proc/keras-snapshot-test", cycles=2)
    fit_fails_before_training(small_model(), callback, "Cannot write")


def test_unknown_run_length_asks_for_total_steps(tmp_path):
    def batches():
        rng = np.random.default_rng(0)
        while True:
            yield rng.random((16, 4), "float32"), np.zeros((16, 1), "float32")

    model = small_model()
    with pytest.raises(ValueError, match="total_steps"):
        model.fit(batches(), epochs=2, verbose=0, callbacks=[SnapshotCallback(tmp_path / "s", cycles=2)])
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 0


def test_too_many_cycles_for_the_run(tmp_path):
    # 64 samples / 16 = 4 steps per epoch, 2 epochs: T = 8 < 9 cycles.
    fit_fails_before_training(small_model(), SnapshotCallback(tmp_path / "s", cycles=9), "cannot exceed")


def test_float_rate_with_steps_per_execution_names_the_in_graph_path(tmp_path):
    if BACKEND == "torch":
        with pytest.raises(ValueError, match="steps_per_execution"):
            small_model(steps_per_execution=2).fit(np.ones((8, 4)), np.ones((8, 1)), verbose=0)
        return
    model = small_model(steps_per_execution=2)
    fit_fails_before_training(model, SnapshotCallback(tmp_path / "s", cycles=2), "SnapshotSchedule")


def test_cycle_end_inside_an_execution_is_refused(tmp_path):
    # 4 steps per epoch, T = 8, M = 3: ceil(8/3) = 3, cycle end 3 falls inside an execution of 2.
    if BACKEND == "torch":
        pytest.skip("the torch backend refuses steps_per_execution > 1 (asserted in the in-graph test)")
    model = small_model(SnapshotSchedule(0.1, total_steps=8, cycles=3), steps_per_execution=2)
    fit_fails_before_training(model, SnapshotCallback(tmp_path / "s", cycles=3), "inside an execution")


def test_schedule_and_callback_must_agree(tmp_path):
    model = small_model(SnapshotSchedule(0.1, total_steps=8, cycles=2))
    fit_fails_before_training(model, SnapshotCallback(tmp_path / "s", cycles=4), "disagree")
    model = small_model(SnapshotSchedule(0.1, total_steps=100, cycles=2))
    fit_fails_before_training(
        model, SnapshotCallback(tmp_path / "s", cycles=2), "schedule's total_steps is 100"
    )
    model = small_model(SnapshotSchedule(0.1, total_steps=8, cycles=2))
    callback = SnapshotCallback(tmp_path / "s", cycles=2, initial_learning_rate=0.3)
    fit_fails_before_training(model, callback, "alpha0")


def test_other_schedules_are_refused(tmp_path):
    model = small_model(keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.9))
    fit_fails_before_training(model, SnapshotCallback(tmp_path / "s", cycles=2), "cannot override", TypeError)


def test_new_run_into_a_used_directory_keeps_the_old_snapshots(snapshot_dir):
    before = digest(snapshot_dir)
    model = make_digits_model()
    x = np.zeros((1400, 64), "float32")
    y = np.zeros(1400, "int32")
    callback = SnapshotCallback(snapshot_dir, cycles=DIGITS_CYCLES, initial_learning_rate=0.2)
    with pytest.raises(ValueError, match="already holds snapshots"):
        model.fit(x, y, batch_size=DIGITS_BATCH, epochs=DIGITS_EPOCHS, verbose=0, callbacks=[callback])
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 0
    assert digest(snapshot_dir) == before
    # A different run configuration is refused at train begin, naming both.
    callback = SnapshotCallback(snapshot_dir, cycles=2, initial_learning_rate=0.2)
    with pytest.raises(ValueError, match="another run"):
        model.fit(x, y, batch_size=DIGITS_BATCH, epochs=DIGITS_EPOCHS, verbose=0, callbacks=[callback])
    assert digest(snapshot_dir) == before


def test_corrupt_manifest_is_reported_not_overwritten(tmp_path):
    directory = tmp_path / "s"
    directory.mkdir()
    (directory / "manifest.json").write_text("{not json")
    fit_fails_before_training(small_model(), SnapshotCallback(directory, cycles=2), "not valid JSON")
    assert (directory / "manifest.json").read_text() == "{not json"


class FirstStepIndexCallback(SnapshotCallback):
    """Hooks as Keras 3.10 calls them with steps_per_execution = k > 1: the batch index passed to
    on_train_batch_end is the execution's FIRST step (3.11+ pass its last)."""

    def on_train_batch_begin(self, batch, logs=None):
        self.first_index = batch
        super().on_train_batch_begin(batch, logs)

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(self.first_index, logs)


def test_steps_come_from_the_optimizer_not_the_hook_batch_index(tmp_path):
    # T = 56, M = 5, k = 4 (as the in-graph test): counting from batch indices fell behind on
    # Keras 3.10 and skipped cycle snapshots; optimizer.iterations is right on every release.
    if BACKEND == "torch":
        pytest.skip("the torch backend refuses steps_per_execution > 1")
    steps, epochs, cycles = 8, 7, 5
    x, y = one_hot_data(steps)
    model = one_weight_per_step_model(steps, SnapshotSchedule(0.2, total_steps=56, cycles=cycles), 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "cycle ... cannot be taken"
        model.fit(
            x,
            y,
            batch_size=1,
            epochs=epochs,
            shuffle=False,
            verbose=0,
            callbacks=[FirstStepIndexCallback(tmp_path / "s", cycles=cycles)],
        )
    manifest = keras_snapshot.read_manifest(tmp_path / "s")
    assert [e["step"] for e in manifest["snapshots"]] == [12, 24, 36, 48, 56]
    # Cycles ending on an epoch end are written there, with the epoch's logs.
    assert [e["epoch"] for e in manifest["snapshots"]] == [2, 3, 5, 6, 7]


def test_step_count_is_checked_against_the_optimizer_at_epoch_end(tmp_path):
    # Callback path: one batch hook per step, counted, and equal to optimizer.iterations after
    # every batch (checked here by a probe after the callback) and at every epoch end.
    seen = []

    class Probe(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append((snapshot._step, int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))))

    snapshot = SnapshotCallback(tmp_path / "s", cycles=4, initial_learning_rate=0.2)
    x, y = one_hot_data(10)
    one_weight_per_step_model(10, 0.5).fit(
        x, y, batch_size=1, epochs=3, verbose=0, callbacks=[snapshot, Probe()]
    )
    assert [counted for counted, _ in seen] == [iterations for _, iterations in seen] == list(range(1, 31))
