"""SnapshotCallback next to Keras's other callbacks: EarlyStopping, rate setters, CSVLogger."""

from __future__ import annotations

import csv
import warnings

import keras
import numpy as np
import pytest
from conftest import make_digits_model
from test_callback import expected_rates, fit_callback_path, one_hot_data, one_weight_per_step_model

import keras_snapshot
from keras_snapshot import SnapshotCallback, SnapshotSchedule


# --------------------------------------------------------------------------- stopped early
def test_early_stopping_before_the_last_cycle_warns_with_the_counts(tmp_path, digits):
    x, y, x_test, _ = digits
    x, y = x[:640], y[:640]  # 10 steps per epoch of 64; 5 epochs, 5 cycles: T = 50, ends 10, 20, ..., 50
    # mode="max" on a falling loss: stops after the second epoch (step 20), as a patience-0 run does.
    stopper = keras.callbacks.EarlyStopping(monitor="loss", mode="max", patience=0)
    directory = tmp_path / "s"
    with pytest.warns(RuntimeWarning, match="stopped by EarlyStopping at step 20 of 50") as record:
        make_digits_model().fit(
            x,
            y,
            batch_size=64,
            epochs=5,
            verbose=0,
            callbacks=[SnapshotCallback(directory, cycles=5, initial_learning_rate=0.2), stopper],
        )
    message = next(str(w.message) for w in record if "stopped" in str(w.message))
    assert "2 of the 5 snapshots were taken (cycles [1, 2])" in message
    assert "build_ensemble works on the snapshots taken" in message
    assert "total_steps" in message and "EarlyStopping" in message
    assert [e["step"] for e in keras_snapshot.read_manifest(directory)["snapshots"]] == [10, 20]
    ensemble = keras_snapshot.build_ensemble(directory)  # as the warning says
    assert ensemble.predict(x_test[:4], verbose=0).shape == (4, 10)


def test_a_run_that_finishes_or_continues_in_another_fit_does_not_warn(tmp_path):
    x, y = one_hot_data(10)
    model = one_weight_per_step_model(10, 0.1)
    callback = SnapshotCallback(tmp_path / "s", cycles=2, initial_learning_rate=0.3, total_steps=20)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for epoch in range(2):  # the first fit ends at step 10 of 20 without stopping early
            model.fit(
                x, y, batch_size=1, initial_epoch=epoch, epochs=epoch + 1, verbose=0, callbacks=[callback]
            )
    assert len(keras_snapshot.read_manifest(tmp_path / "s")["snapshots"]) == 2


# --------------------------------------------------------------------------- rate setters
def rate_setters():
    return [
        keras.callbacks.LearningRateScheduler(lambda epoch, rate: rate * 0.5),
        keras.callbacks.ReduceLROnPlateau(monitor="loss", patience=0),
    ]


@pytest.mark.parametrize("setter", rate_setters(), ids=lambda c: type(c).__name__)
@pytest.mark.parametrize("first", [True, False], ids=["setter-first", "snapshot-first"])
@pytest.mark.parametrize("in_graph", [False, True], ids=["callback-path", "in-graph"])
def test_known_rate_setters_are_refused_before_training(tmp_path, setter, first, in_graph):
    x, y = one_hot_data(10)
    rate = SnapshotSchedule(0.2, total_steps=30, cycles=3) if in_graph else 0.5
    model = one_weight_per_step_model(10, rate)
    snapshot = SnapshotCallback(tmp_path / "s", cycles=3)
    callbacks = [setter, snapshot] if first else [snapshot, setter]
    with pytest.raises(ValueError, match=f"{type(setter).__name__} in the same fit as SnapshotCallback"):
        model.fit(x, y, batch_size=1, epochs=3, verbose=0, callbacks=callbacks)
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 0
    assert not (tmp_path / "s").exists() or not list((tmp_path / "s").glob("*.keras"))


class HalveRateAtEpochEnd(keras.callbacks.Callback):
    """A user's own rate setter, unknown to SnapshotCallback."""

    def on_epoch_end(self, epoch, logs=None):
        optimizer = self.model.optimizer
        optimizer.learning_rate = float(keras.ops.convert_to_numpy(optimizer.learning_rate)) / 2


@pytest.mark.parametrize("first", [True, False], ids=["setter-first", "snapshot-first"])
def test_an_unknown_rate_setter_is_caught_by_its_effect(tmp_path, first):
    x, y = one_hot_data(10)
    model = one_weight_per_step_model(10, 0.5)
    snapshot = SnapshotCallback(tmp_path / "s", cycles=3, initial_learning_rate=0.2)
    setter = HalveRateAtEpochEnd()
    with pytest.raises(RuntimeError, match=r"changed between two batches.*HalveRateAtEpochEnd"):
        model.fit(
            x,
            y,
            batch_size=1,
            epochs=3,
            verbose=0,
            callbacks=[setter, snapshot] if first else [snapshot, setter],
        )
    # Caught at the second epoch's first batch, before it ran.
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 10


# --------------------------------------------------------------------------- loggers
def csv_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_csv_logger_after_the_callback_gets_the_learning_rate(tmp_path):
    logger = keras.callbacks.CSVLogger(str(tmp_path / "log.csv"))
    x, y = one_hot_data(10)
    model = one_weight_per_step_model(10, 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        model.fit(
            x,
            y,
            batch_size=1,
            epochs=3,
            shuffle=False,
            verbose=0,
            callbacks=[SnapshotCallback(tmp_path / "s", cycles=4, initial_learning_rate=0.2), logger],
        )
    rates = [float(row["learning_rate"]) for row in csv_rows(tmp_path / "log.csv")]
    np.testing.assert_allclose(rates, expected_rates(0.2, 30, 4)[[9, 19, 29]], rtol=1e-6)


def test_csv_logger_before_the_callback_is_warned_about(tmp_path):
    # Documented: put SnapshotCallback first. A logger before it has written its row when
    # SnapshotCallback adds `learning_rate`; the warning says where to put it.
    logger = keras.callbacks.CSVLogger(str(tmp_path / "log.csv"))
    x, y = one_hot_data(10)
    model = one_weight_per_step_model(10, 0.5)
    with pytest.warns(
        RuntimeWarning, match="CSVLogger comes before SnapshotCallback.*Put SnapshotCallback first"
    ):
        model.fit(
            x,
            y,
            batch_size=1,
            epochs=3,
            verbose=0,
            callbacks=[logger, SnapshotCallback(tmp_path / "s", cycles=4, initial_learning_rate=0.2)],
        )
    assert "learning_rate" not in csv_rows(tmp_path / "log.csv")[0]


def test_history_always_gets_the_learning_rate(tmp_path):
    _, _, history = fit_callback_path(tmp_path / "s")
    np.testing.assert_allclose(
        history.history["learning_rate"], expected_rates(0.2, 30, 4)[[9, 19, 29]], rtol=1e-6
    )
