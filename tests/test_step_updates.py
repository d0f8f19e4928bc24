"""The step model on the set-ups where batches and weight updates differ: mixed precision (a loss-scale
optimizer that skips updates), gradient accumulation, runs that end short, warm starts.

The schedule's step t is the optimizer's step count that Keras's learning-rate schedules read (one per
batch whose gradients are applied or accumulated; a batch whose update the loss scaler skips does not
count). Each test trains a model whose every weight update is visible: y = x . w with one-hot rows, a
loss whose gradient is exactly 1, plain SGD, so a batch that updates moves the kernel's sum by exactly
minus the rate it used, and a batch that does not update leaves it unchanged.
"""

from __future__ import annotations

import logging
import warnings

import keras
import numpy as np
import pytest

import keras_snapshot
from keras_snapshot import SnapshotCallback, SnapshotSchedule, keras_internals, snapshot_learning_rate

BACKEND = keras.backend.backend()


def mean_prediction(y_true, y_pred):
    return keras.ops.mean(y_pred)


def one_hot_data(steps):
    return np.eye(steps, dtype="float32"), np.zeros((steps, 1), "float32")


def make_model(steps, rate, accumulation=None, loss_scale=None, seed=0):
    """y = x . w, float32 weights; `loss_scale`: a LossScaleOptimizer of that initial scale under the
    mixed_float16 policy (the default scale 2**15 overflows float16 gradients of the first batches
    in real models; a larger one forces a known number of skipped updates here)."""
    keras.utils.set_random_seed(seed)
    policy = "mixed_float16" if loss_scale else "float32"
    dense = keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros", dtype=policy)
    model = keras.Sequential([keras.Input((steps,)), dense])
    optimizer = keras.optimizers.SGD(rate, gradient_accumulation_steps=accumulation)
    if loss_scale:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer, initial_scale=loss_scale)
    model.compile(optimizer=optimizer, loss=mean_prediction)
    return model


def step_count(model) -> int:
    return int(keras.ops.convert_to_numpy(keras_internals.schedule_step_variable(model.optimizer)))


class Updates(keras.callbacks.Callback):
    """Per batch: the step count before it, whether it moved the weights, and by what rate."""

    def __init__(self):
        super().__init__()
        self.rows = []  # (step before, step after, rate applied or 0.0)

    def on_train_batch_begin(self, batch, logs=None):
        self.before = (step_count(self.model), np.array(self.model.get_weights()[0], dtype="float64"))

    def on_train_batch_end(self, batch, logs=None):
        step, kernel = self.before
        after = np.array(self.model.get_weights()[0], dtype="float64")
        self.rows.append((step, step_count(self.model), float(np.sum(kernel - after))))


def check_rates(rows, alpha0, total, cycles, accumulation=1):
    """Every update used the paper's rate at t = (step before) + 1; every other batch moved nothing."""
    updates = 0
    for before, after, moved in rows:
        assert after in (before, before + 1), rows
        is_update = after == before + 1 and after % accumulation == 0
        if is_update:
            want = snapshot_learning_rate(
                after, initial_learning_rate=alpha0, total_steps=total, cycles=cycles
            )
            assert moved == pytest.approx(want, abs=2e-6), (before, after, moved, want)
            updates += 1
        else:
            assert moved == 0.0, (before, after, moved)
    return updates


def saved_kernel(directory, entry):
    model = keras.saving.load_model(directory / entry["file"], compile=False, safe_mode=False)
    return np.array(model.get_weights()[0])


@pytest.fixture
def float32_policy_after():
    yield
    keras.mixed_precision.set_global_policy("float32")


# --------------------------------------------------------------------------- mixed precision
@pytest.mark.parametrize("in_graph", [False, True], ids=["callback-path", "in-graph"])
def test_skipped_updates_still_give_all_snapshots_and_exact_rates(
    tmp_path, in_graph, float32_policy_after, monkeypatch
):
    # 16 steps per epoch, 3 epochs, M = 3: T = 48, cycles of 16. The initial loss scale 2**18 makes
    # float16 gradients overflow until the scale is 2**15: the first 3 updates are skipped, so the
    # step count ends at 45 < T. Cycles 1 and 2 end at steps 16 and 32 (batches 19 and 35); the run
    # is over at batch 48, and its final weights are cycle 3's snapshot, recorded at step 45.
    steps, epochs, cycles, alpha0 = 16, 3, 3, 0.2
    rate = SnapshotSchedule(alpha0, total_steps=48, cycles=cycles) if in_graph else 0.5
    model = make_model(steps, rate, loss_scale=2.0**18)
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    x, y = one_hot_data(steps)
    updates = Updates()
    directory = tmp_path / "s"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # every snapshot is taken: nothing to warn about
        model.fit(
            x,
            y,
            batch_size=1,
            epochs=epochs,
            shuffle=False,
            verbose=0,
            callbacks=[SnapshotCallback(directory, cycles=cycles, initial_learning_rate=alpha0), updates],
        )
        # The same run without the recorder, whose reads of the model sync the JAX trainer's state
        # every batch: the callback alone sets the rates between steps there.
        alone = make_model(steps, rate, loss_scale=2.0**18)
        reads = []
        read = keras_internals.IterationsReader.read
        monkeypatch.setattr(
            keras_internals.IterationsReader, "read", lambda self, cb: reads.append(1) or read(self, cb)
        )
        alone.fit(
            x,
            y,
            batch_size=1,
            epochs=epochs,
            shuffle=False,
            verbose=0,
            callbacks=[SnapshotCallback(tmp_path / "alone", cycles=cycles, initial_learning_rate=alpha0)],
        )
    np.testing.assert_allclose(alone.get_weights()[0], model.get_weights()[0], rtol=0, atol=1e-6)
    if in_graph:
        # The rate is in the graph: the count is read only near cycle ends (cycle 1: at batches 16
        # and 19; cycle 2: 35; the end: 48), at the first batch and at the 3 epoch ends, not 48 times.
        assert len(reads) <= 10, len(reads)
    else:
        assert len(reads) >= steps * epochs  # the callback path needs the count for every rate
    alone_entries = keras_snapshot.read_manifest(tmp_path / "alone")["snapshots"]
    assert [(e["step"], e["batches"]) for e in alone_entries] == [(16, 19), (32, 35), (45, 48)]
    skipped = [i for i, (before, after, _) in enumerate(updates.rows) if after == before]
    assert skipped == [0, 1, 2]
    assert check_rates(updates.rows, alpha0, 48, cycles) == 45
    manifest = keras_snapshot.read_manifest(directory)
    entries = manifest["snapshots"]
    assert [e["cycle"] for e in entries] == [1, 2, 3]
    assert [e["step"] for e in entries] == [16, 32, 45]
    assert [e["batches"] for e in entries] == [19, 35, 48]
    assert "iterations" not in entries[0]  # optimizer.iterations is the step count here
    assert entries[-1]["learning_rate"] == pytest.approx(
        snapshot_learning_rate(45, initial_learning_rate=alpha0, total_steps=48, cycles=cycles)
    )
    # Each snapshot is the model after the updates it records; the last one is the final model.
    for entry in entries:
        applied = sum(moved for _, after, moved in updates.rows if after <= entry["step"])
        assert float(np.sum(saved_kernel(directory, entry))) == pytest.approx(-applied, abs=1e-5)
    np.testing.assert_array_equal(saved_kernel(directory, entries[-1]), model.get_weights()[0])


def test_too_many_skipped_updates_warn_instead_of_a_silent_short_run(tmp_path, float32_policy_after):
    # The scale 2**30 skips 15 of 24 updates, 3 cycles of 8: the step count ends at 9, inside cycle 2.
    model = make_model(8, 0.5, loss_scale=2.0**30)
    x, y = one_hot_data(8)
    with pytest.warns(RuntimeWarning, match=r"skipped 15 updates.*1 of the 3 snapshots.*step 9 of T=24"):
        model.fit(
            x, y, batch_size=1, epochs=3, verbose=0, callbacks=[SnapshotCallback(tmp_path / "s", cycles=3)]
        )
    assert [e["step"] for e in keras_snapshot.read_manifest(tmp_path / "s")["snapshots"]] == [8]


# --------------------------------------------------------------------------- gradient accumulation
@pytest.mark.parametrize(
    ("accumulation", "steps", "epochs", "cycles"),
    [(2, 9, 3, 3), (3, 8, 4, 4)],  # T = 27 and 32: neither a multiple of its k
    ids=["k2-T27", "k3-T32"],
)
@pytest.mark.parametrize("in_graph", [False, True], ids=["callback-path", "in-graph"])
def test_gradient_accumulation(tmp_path, accumulation, steps, epochs, cycles, in_graph):
    total, alpha0 = steps * epochs, 0.3
    rate = SnapshotSchedule(alpha0, total_steps=total, cycles=cycles) if in_graph else 0.5
    model = make_model(steps, rate, accumulation=accumulation)
    x, y = one_hot_data(steps)
    updates = Updates()
    directory = tmp_path / "s"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        model.fit(
            x,
            y,
            batch_size=1,
            epochs=epochs,
            shuffle=False,
            verbose=0,
            callbacks=[SnapshotCallback(directory, cycles=cycles, initial_learning_rate=alpha0), updates],
        )
    # One step per batch; the weights move every k-th batch, with the rate of that step.
    assert [after for _, after, _ in updates.rows] == list(range(1, total + 1))
    assert check_rates(updates.rows, alpha0, total, cycles, accumulation) == total // accumulation
    entries = keras_snapshot.read_manifest(directory)["snapshots"]
    ends = keras_snapshot.snapshot_steps(total, cycles)
    assert [e["step"] for e in entries] == ends
    # optimizer.iterations counts the weight updates: recorded truthfully next to the step.
    assert [e["iterations"] for e in entries] == [end // accumulation for end in ends]
    for entry in entries:
        loaded = keras.saving.load_model(
            directory / entry["file"], custom_objects={"mean_prediction": mean_prediction}
        )
        assert int(keras.ops.convert_to_numpy(loaded.optimizer.iterations)) == entry["iterations"]
        applied = sum(moved for _, after, moved in updates.rows if after <= entry["step"])
        assert float(np.sum(loaded.get_weights()[0])) == pytest.approx(-applied, abs=1e-5)
    np.testing.assert_array_equal(saved_kernel(directory, entries[-1]), model.get_weights()[0])


class Crash(keras.callbacks.Callback):
    def __init__(self, at_batch):
        super().__init__()
        self.at_batch, self.seen = at_batch, 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen == self.at_batch:
            raise KeyboardInterrupt("crash")


def test_crash_inside_an_accumulation_window_then_resume(tmp_path):
    # k = 3, 8 batches per epoch: the epoch-1 backup holds 2 accumulated batches of the window that
    # ends at batch 9. Crashed at batch 13 (mid-window, mid-epoch 2), the resumed run replays epoch 2
    # and must end exactly as the same run without a crash: every snapshot and the final weights.
    steps, epochs, cycles, k = 8, 4, 4, 3
    x, y = one_hot_data(steps)

    def fit(directory, backup=None, crash=None, seed=0):
        model = make_model(steps, 0.5, accumulation=k, seed=seed)
        callbacks = [SnapshotCallback(directory, cycles=cycles, initial_learning_rate=0.3)]
        if backup:
            callbacks.append(keras.callbacks.BackupAndRestore(str(backup)))
        if crash:
            callbacks.append(Crash(crash))
        model.fit(x, y, batch_size=1, epochs=epochs, shuffle=False, verbose=0, callbacks=callbacks)
        return model

    reference = fit(tmp_path / "ref")
    with pytest.raises(KeyboardInterrupt):
        fit(tmp_path / "s", backup=tmp_path / "b", crash=13)
    assert [e["step"] for e in keras_snapshot.read_manifest(tmp_path / "s")["snapshots"]] == [8]
    resumed = fit(tmp_path / "s", backup=tmp_path / "b")
    np.testing.assert_allclose(resumed.get_weights()[0], reference.get_weights()[0], rtol=0, atol=1e-6)
    ref_entries = keras_snapshot.read_manifest(tmp_path / "ref")["snapshots"]
    entries = keras_snapshot.read_manifest(tmp_path / "s")["snapshots"]
    assert [(e["step"], e["iterations"]) for e in entries] == [(8, 2), (16, 5), (24, 8), (32, 10)]
    assert [(e["step"], e["iterations"]) for e in entries] == [
        (e["step"], e["iterations"]) for e in ref_entries
    ]
    for entry, ref in zip(entries, ref_entries, strict=True):
        np.testing.assert_allclose(
            saved_kernel(tmp_path / "s", entry), saved_kernel(tmp_path / "ref", ref), rtol=0, atol=1e-6
        )


# --------------------------------------------------------------------------- runs that end short
def test_initial_epoch_on_a_fresh_optimizer_warns(tmp_path):
    # fit(epochs=4, initial_epoch=2) runs 16 of the 32 batches T counts: the optimizer's step count
    # reaches 16, two of four cycles.
    x, y = one_hot_data(8)
    model = make_model(8, 0.5)
    with pytest.warns(RuntimeWarning, match=r"initial_epoch=2.*reach step 16 of T=32.*2 of the 4 snapshots"):
        model.fit(
            x,
            y,
            batch_size=1,
            epochs=4,
            initial_epoch=2,
            verbose=0,
            callbacks=[SnapshotCallback(tmp_path / "s", cycles=4)],
        )
    assert len(keras_snapshot.read_manifest(tmp_path / "s")["snapshots"]) == 2


def test_data_that_runs_out_warns(tmp_path):
    # steps_per_epoch=10 for 3 epochs, but the generator gives 25 batches: Keras stops the last epoch
    # after 5 (with its own warning); the run reaches step 25 of 30.
    def batches():
        for i in range(25):
            yield np.eye(10, dtype="float32")[i % 10 : i % 10 + 1], np.zeros((1, 1), "float32")

    model = make_model(10, 0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(
            batches(),
            steps_per_epoch=10,
            epochs=3,
            verbose=0,
            callbacks=[SnapshotCallback(tmp_path / "s", cycles=3)],
        )
    ours = [
        str(w.message)
        for w in caught
        if "SnapshotCallback" in str(w.message) or "data ran out" in str(w.message)
    ]
    assert any(
        "data ran out" in m and "25 of its 30 batches" in m and "2 of the 3 snapshots" in m for m in ours
    ), [str(w.message) for w in caught]
    assert [e["step"] for e in keras_snapshot.read_manifest(tmp_path / "s")["snapshots"]] == [10, 20]


class StopAt(keras.callbacks.Callback):
    def __init__(self, batch):
        super().__init__()
        self.batch, self.seen = batch, 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen == self.batch:
            self.model.stop_training = True


def test_stop_training_from_any_callback_warns(tmp_path):
    x, y = one_hot_data(10)
    model = make_model(10, 0.5)
    with pytest.warns(RuntimeWarning, match=r"stopped by a callback.*at step 15 of 30.*1 of the 3 snapshots"):
        model.fit(
            x,
            y,
            batch_size=1,
            epochs=3,
            verbose=0,
            callbacks=[SnapshotCallback(tmp_path / "s", cycles=3), StopAt(15)],
        )


def test_the_manifest_epoch_is_global_across_fit_calls(tmp_path):
    # Three fits of 2 epochs each, none with initial_epoch (Keras numbers each fit's epochs from 0);
    # T = 60 given, 6 cycles of one epoch each. The third fit has a new callback (as a new process
    # would): it continues the count from the manifest.
    x, y = one_hot_data(10)
    model = make_model(10, 0.5)
    callback = SnapshotCallback(tmp_path / "s", cycles=6, total_steps=60)
    for fit in range(3):
        if fit == 2:
            callback = SnapshotCallback(tmp_path / "s", cycles=6, total_steps=60)
        model.fit(x, y, batch_size=1, epochs=2, verbose=0, callbacks=[callback])
    entries = keras_snapshot.read_manifest(tmp_path / "s")["snapshots"]
    assert [(e["step"], e["epoch"]) for e in entries] == [(10 * i, i) for i in range(1, 7)]


# --------------------------------------------------------------------------- warm starts
def test_warm_up_before_the_first_fit_is_refused_then_a_fresh_optimizer_starts_the_cycles(tmp_path):
    x, y = one_hot_data(8)
    model = make_model(8, 0.1)
    model.fit(x, y, batch_size=1, epochs=2, verbose=0)  # warm-up without the callback
    warm = np.array(model.get_weights()[0])
    directory = tmp_path / "s"
    with pytest.raises(ValueError, match=r"already taken 16 steps.*compile it again with a new optimizer"):
        model.fit(x, y, batch_size=1, epochs=3, verbose=0, callbacks=[SnapshotCallback(directory, cycles=3)])
    # Refused at the first batch: nothing trained, nothing written (the directory is reusable).
    np.testing.assert_array_equal(model.get_weights()[0], warm)
    assert list(directory.iterdir()) == []
    # The documented way: the same weights, a new optimizer; cycles count from its step 0.
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=mean_prediction)
    updates = Updates()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        model.fit(
            x,
            y,
            batch_size=1,
            epochs=3,
            shuffle=False,
            verbose=0,
            callbacks=[SnapshotCallback(directory, cycles=3, initial_learning_rate=0.2), updates],
        )
    check_rates(updates.rows, 0.2, 24, 3)
    entries = keras_snapshot.read_manifest(directory)["snapshots"]
    assert [e["step"] for e in entries] == [8, 16, 24]
    applied = sum(moved for *_, moved in updates.rows[:8])
    np.testing.assert_allclose(np.sum(saved_kernel(directory, entries[0]) - warm), -applied, atol=1e-5)


# --------------------------------------------------------------------------- JAX compilations
@pytest.mark.skipif(BACKEND != "jax", reason="jit compilation counts are JAX's")
@pytest.mark.parametrize("loss_scale", [None, 2.0**18], ids=["float32", "mixed-skipping"])
def test_jax_callback_path_compiles_the_train_step_as_often_as_fit_alone(
    tmp_path, loss_scale, float32_policy_after
):
    import jax

    compiled = []

    class Count(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("Compiling jit(train_step)"):
                compiled.append(record.getMessage())

    handler = Count()
    logger = logging.getLogger("jax")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    jax.config.update("jax_log_compiles", True)
    counts = []
    try:
        x, y = one_hot_data(8)
        for callbacks in ([], [SnapshotCallback(tmp_path / "s", cycles=3)]):
            compiled.clear()
            model = make_model(8, 0.1, loss_scale=loss_scale)
            model.fit(x, y, batch_size=1, epochs=3, verbose=0, callbacks=callbacks)
            counts.append(len(compiled))
    finally:
        jax.config.update("jax_log_compiles", False)
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert counts[0] >= 1
    assert counts[1] == counts[0], counts
