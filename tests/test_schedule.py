"""The schedule as a pure function, and SnapshotSchedule equal to it at every step."""

import math

import keras
import numpy as np
import pytest

import keras_snapshot
from keras_snapshot import SnapshotSchedule, snapshot_learning_rate, snapshot_steps


def paper(t, alpha0, total, cycles):
    """Eq. (2) of the paper, written out once more by hand for scalars."""
    length = math.ceil(total / cycles)
    return alpha0 / 2 * (math.cos(math.pi * ((t - 1) % length) / length) + 1)


@pytest.mark.parametrize(
    ("t", "expected"),
    [
        (1, 0.2),  # every cycle starts at alpha0
        (11, 0.1),  # halfway through a 20-step cycle: cos(pi/2) = 0
        (20, 0.1 * (math.cos(math.pi * 19 / 20) + 1)),  # last step of cycle 1, close to 0
        (21, 0.2),  # restart
        (100, 0.1 * (math.cos(math.pi * 19 / 20) + 1)),  # last step of the run
    ],
)
def test_hand_computed_values(t, expected):
    got = snapshot_learning_rate(t, initial_learning_rate=0.2, total_steps=100, cycles=5)
    assert isinstance(got, float)
    assert got == pytest.approx(expected, abs=1e-12)


def test_t_not_divisible_by_cycles():
    # T=10, M=3: ceil(10/3) = 4, cycles of 4, 4 and 2 steps.
    rates = snapshot_learning_rate(np.arange(1, 11), initial_learning_rate=1.0, total_steps=10, cycles=3)
    expected = [paper(t, 1.0, 10, 3) for t in range(1, 11)]
    np.testing.assert_allclose(rates, expected, rtol=0, atol=1e-12)
    assert rates[8] == 1.0  # t=9 starts the short third cycle
    assert rates[9] == pytest.approx(0.5 * (math.cos(math.pi / 4) + 1))
    assert snapshot_steps(10, 3) == [4, 8, 10]
    assert snapshot_steps(100, 5) == [20, 40, 60, 80, 100]
    assert snapshot_steps(7, 1) == [7]


def test_vectorised_shapes():
    t = np.arange(1, 13).reshape(3, 4)
    rates = snapshot_learning_rate(t, initial_learning_rate=0.1, total_steps=12, cycles=3)
    assert rates.shape == (3, 4)
    assert rates.dtype == np.float64
    np.testing.assert_allclose(rates[0], [paper(i, 0.1, 12, 3) for i in range(1, 5)])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"t": 0}, ValueError, "1-based"),
        ({"t": np.array([1, -3])}, ValueError, "1-based"),
        ({"t": 1.5}, ValueError, "whole"),
        ({"cycles": 0}, ValueError, "cycles"),
        ({"cycles": 2.0}, TypeError, "cycles"),
        ({"cycles": True}, TypeError, "cycles"),
        ({"total_steps": 0}, ValueError, "total_steps"),
        ({"total_steps": 3, "cycles": 4}, ValueError, "cannot exceed"),
        ({"total_steps": 9, "cycles": 4}, ValueError, "without any step"),
        ({"initial_learning_rate": 0.0}, ValueError, "initial_learning_rate"),
        ({"initial_learning_rate": float("nan")}, ValueError, "initial_learning_rate"),
        ({"initial_learning_rate": "0.1"}, TypeError, "initial_learning_rate"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    args = {"t": 1, "initial_learning_rate": 0.1, "total_steps": 100, "cycles": 5, **kwargs}
    t = args.pop("t")
    with pytest.raises(error, match=match):
        snapshot_learning_rate(t, **args)


@pytest.mark.parametrize(("total", "cycles"), [(100, 5), (10, 3), (57, 4), (1, 1)])
def test_in_graph_schedule_equals_function_at_every_step(total, cycles):
    schedule = SnapshotSchedule(0.2, total_steps=total, cycles=cycles)
    steps = np.arange(total)  # the optimizer passes its 0-based iterations
    in_graph = np.array([float(keras.ops.convert_to_numpy(schedule(int(s)))) for s in steps])
    expected = snapshot_learning_rate(steps + 1, initial_learning_rate=0.2, total_steps=total, cycles=cycles)
    np.testing.assert_allclose(in_graph, expected, rtol=1e-6, atol=1e-7)


def test_in_graph_schedule_matches_keras_cosine_restarts_when_divisible():
    # An independent implementation of the same curve: SGDR with t_mul = m_mul = 1 and alpha = 0.
    ours = SnapshotSchedule(0.1, total_steps=60, cycles=4)
    reference = keras.optimizers.schedules.CosineDecayRestarts(0.1, 15, t_mul=1.0, m_mul=1.0, alpha=0.0)
    for step in range(60):
        assert float(keras.ops.convert_to_numpy(ours(step))) == pytest.approx(
            float(keras.ops.convert_to_numpy(reference(step))), abs=1e-6
        )


def test_schedule_validates_and_serializes():
    with pytest.raises(ValueError, match="without any step"):
        SnapshotSchedule(0.1, total_steps=9, cycles=4)
    schedule = SnapshotSchedule(0.2, total_steps=57, cycles=4)
    assert schedule.get_config() == {"initial_learning_rate": 0.2, "total_steps": 57, "cycles": 4}
    restored = keras.optimizers.schedules.deserialize(keras.optimizers.schedules.serialize(schedule))
    assert isinstance(restored, SnapshotSchedule)
    assert restored.get_config() == schedule.get_config()


def test_schedule_survives_keras_save_and_load(tmp_path):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(SnapshotSchedule(0.2, total_steps=57, cycles=4)), "mse")
    model.fit(np.ones((8, 3)), np.ones((8, 1)), batch_size=4, epochs=1, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    schedule = loaded.optimizer._learning_rate
    assert isinstance(schedule, keras_snapshot.SnapshotSchedule)
    assert schedule.get_config() == {"initial_learning_rate": 0.2, "total_steps": 57, "cycles": 4}
    assert int(keras.ops.convert_to_numpy(loaded.optimizer.iterations)) == 2


def test_import_registers_the_schedule_before_keras_is_imported():
    """`import keras_snapshot` (lazy public names) still registers SnapshotSchedule, so Keras can load a
    snapshot whose optimizer uses it, whichever of keras and keras_snapshot is imported first."""
    import subprocess
    import sys

    code = (
        "import keras_snapshot, keras\n"
        "assert keras.saving.get_registered_object('keras_snapshot>SnapshotSchedule') is not None\n"
        "assert keras.saving.get_registered_object('keras_snapshot>DistillationLoss') is not None\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
