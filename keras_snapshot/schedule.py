"""The cyclic cosine learning rate of Snapshot Ensembles, as a pure function and in-graph.

Huang et al., "Snapshot Ensembles: Train 1, Get M for Free" (ICLR 2017), eq. (2):

    alpha(t) = alpha0 / 2 * (cos(pi * mod(t - 1, ceil(T / M)) / ceil(T / M)) + 1)

for the iterations t = 1..T of the whole run, split into M cycles. A snapshot is
taken at the end of each cycle, where the rate is close to zero.
"""

from __future__ import annotations

import math
import numbers

import keras
import numpy as np

__all__ = [
    "SnapshotSchedule",
    "check_int",
    "check_rate",
    "cosine_rate",
    "cycle_length",
    "snapshot_learning_rate",
    "snapshot_steps",
    "validate_schedule_args",
]


def check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an integer, got {value!r} ({type(value).__name__}).")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}.")
    return int(value)


def check_rate(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a positive number, got {value!r} ({type(value).__name__}).")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}.")
    return float(value)


def cycle_length(total_steps: int, cycles: int) -> int:
    """ceil(T/M), in integers: exact for any T (a float division rounds past 2**53)."""
    return -(-total_steps // cycles)


def cosine_rate(remainder, length, initial_learning_rate, cos=math.cos):
    """The paper's formula, the one place it is written: alpha0/2 * (cos(pi * r / L) + 1).

    `remainder` is mod(t - 1, L) for the 1-based iteration t and the cycle length L = ceil(T/M),
    computed by the caller in integers (exact for any t). `cos` is `math.cos` for a Python float
    (the callback), `np.cos` for arrays (`snapshot_learning_rate`) or `keras.ops.cos` for a tensor
    (`SnapshotSchedule`), so the three paths evaluate the same expression in the same order.
    """
    return initial_learning_rate / 2.0 * (cos(math.pi * (remainder / length)) + 1.0)


def validate_schedule_args(initial_learning_rate, total_steps, cycles) -> tuple[float, int, int]:
    """Checks the schedule's arguments; returns them as (float, int, int).

    Besides types and ranges this rejects (T, M) for which the paper's cycle
    length ceil(T/M) leaves the last cycle empty (e.g. T=9, M=4: cycles of 3, 3, 3
    and 0 steps), since such a run would end with fewer than M snapshots.
    """
    initial_learning_rate = check_rate("initial_learning_rate", initial_learning_rate)
    cycles = check_int("cycles", cycles, 1)
    total_steps = check_int("total_steps", total_steps, 1)
    if cycles > total_steps:
        raise ValueError(
            f"`cycles` ({cycles}) cannot exceed `total_steps` ({total_steps}): each cycle needs at "
            "least one training step. Train for more steps or use fewer cycles."
        )
    length = cycle_length(total_steps, cycles)
    if (cycles - 1) * length >= total_steps:
        raise ValueError(
            f"With total_steps={total_steps} and cycles={cycles} the paper's cycle length "
            f"ceil(T/M)={length} leaves cycle {cycles} without any step, so only "
            f"{cycle_length(total_steps, length)} snapshots would be taken. Choose total_steps "
            "and cycles so that (cycles - 1) * ceil(total_steps / cycles) < total_steps "
            "(e.g. total_steps a multiple of cycles)."
        )
    return initial_learning_rate, total_steps, cycles


def snapshot_steps(total_steps: int, cycles: int) -> list[int]:
    """The 1-based global steps at which the M snapshots are taken (the cycle ends).

    Cycle k (1-based) ends at step min(k * ceil(T/M), T): when T is not a multiple
    of M the last cycle is shorter and still ends with a snapshot at step T.

    Example:

    >>> snapshot_steps(10, 3)
    [4, 8, 10]
    """
    _, total_steps, cycles = validate_schedule_args(1.0, total_steps, cycles)
    length = cycle_length(total_steps, cycles)
    return [min(k * length, total_steps) for k in range(1, cycles + 1)]


def snapshot_learning_rate(t, *, initial_learning_rate: float, total_steps: int, cycles: int):
    """The paper's learning rate at iteration `t` (1-based), vectorised over numpy arrays.

    Args:
        t: iteration number(s), 1 for the first training step. A scalar or an array
            of integers >= 1. Steps past `total_steps` continue the cycle pattern.
        initial_learning_rate: alpha0, the rate at the start of every cycle.
        total_steps: T, the number of training steps of the whole run.
        cycles: M, the number of cycles (and of snapshots).

    Returns:
        A float for a scalar `t`, else a float64 array shaped like `t`.

    Example:

    >>> snapshot_learning_rate(1, initial_learning_rate=0.2, total_steps=100, cycles=5)
    0.2
    """
    alpha0, total_steps, cycles = validate_schedule_args(initial_learning_rate, total_steps, cycles)
    try:
        t_array = np.asarray(t)
        if t_array.dtype == object:  # Python ints past int64, Fractions, Decimals...
            items = t_array.ravel().tolist()
            if any(isinstance(v, bool) or not isinstance(v, numbers.Real) for v in items):
                raise TypeError(f"`t` must be integer iteration number(s), got {t!r}.")
            t_array = np.asarray([float(v) for v in items], dtype=np.float64).reshape(t_array.shape)
    except OverflowError:
        raise ValueError(f"`t` must fit in int64, got {t!r}.") from None
    if t_array.dtype == bool or not (
        np.issubdtype(t_array.dtype, np.integer) or np.issubdtype(t_array.dtype, np.floating)
    ):
        raise TypeError(f"`t` must be integer iteration number(s), got {t!r}.")
    if not np.issubdtype(t_array.dtype, np.integer):
        if not np.all(np.isfinite(t_array)) or not np.all(np.mod(t_array, 1) == 0):
            raise ValueError(f"`t` must hold whole iteration numbers, got {t!r}.")
        if np.any(np.abs(t_array) >= 2.0**63):
            raise ValueError(f"`t` must fit in int64, got {t!r}.")
        t_array = t_array.astype(np.int64)
    if np.any(t_array < 1):
        raise ValueError(f"`t` is 1-based: every iteration number must be >= 1, got {t!r}.")
    length = cycle_length(total_steps, cycles)
    # The remainder in integers, so huge step numbers stay exact.
    rate = cosine_rate(np.mod(t_array - 1, length), length, alpha0, cos=np.cos)
    return float(rate) if rate.ndim == 0 else rate


@keras.saving.register_keras_serializable(package="keras_snapshot")
class SnapshotSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """The Snapshot Ensembles learning rate, computed in-graph from the optimizer's step.

    The optimizer calls the schedule with its 0-based step count, so step `s` gets
    `snapshot_learning_rate(s + 1, ...)`. That count advances once per batch whose
    gradients are applied or accumulated: with `gradient_accumulation_steps=k` it is
    the batch count (`optimizer.iterations` is then the updates, count // k) and T
    stays epochs x steps per epoch; a `LossScaleOptimizer` does not advance it on a
    batch whose update it skips. The callback path follows the same count. Because the rate is part of the compiled
    train step, it stays exact with `steps_per_execution > 1` and `jit_compile`, and
    costs no Python work per batch. Pair it with a `SnapshotCallback` with the same
    `cycles` and `total_steps` to write the snapshots; the callback then leaves the
    rate alone.

    Loading a `.keras` file whose optimizer uses this schedule needs
    `import keras_snapshot` first (Keras only auto-imports its own packages), or
    `keras.saving.load_model(path, compile=False)`.

    Args:
        initial_learning_rate: alpha0, the rate at the start of every cycle.
        total_steps: T, the number of training steps of the whole run
            (epochs x steps per epoch).
        cycles: M, the number of cycles (and of snapshots).

    Example:

    ```python
    steps = 60 * 10  # epochs x steps per epoch
    schedule = keras_snapshot.SnapshotSchedule(0.2, total_steps=steps, cycles=5)
    model.compile(optimizer=keras.optimizers.SGD(schedule, momentum=0.9), loss="mse")
    model.fit(x, y, batch_size=64, epochs=10, steps_per_execution=4,
              callbacks=[keras_snapshot.SnapshotCallback("snaps", cycles=5)])
    ```
    """

    def __init__(self, initial_learning_rate: float, total_steps: int, cycles: int):
        self.initial_learning_rate, self.total_steps, self.cycles = validate_schedule_args(
            initial_learning_rate, total_steps, cycles
        )
        self.cycle_length = cycle_length(self.total_steps, self.cycles)

    def __call__(self, step):
        # mod in the step's integer dtype: a float32 step is exact only up to 2**24 steps.
        step = keras.ops.convert_to_tensor(step)
        if "int" not in keras.backend.standardize_dtype(step.dtype):
            step = keras.ops.cast(step, "int64")
        remainder = keras.ops.mod(step, keras.ops.cast(self.cycle_length, step.dtype))
        remainder = keras.ops.cast(remainder, "float32")
        return cosine_rate(remainder, float(self.cycle_length), self.initial_learning_rate, cos=keras.ops.cos)

    def get_config(self) -> dict:
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "total_steps": self.total_steps,
            "cycles": self.cycles,
        }
