"""Bad input everywhere (hypothesis): every invalid argument raises ValueError/TypeError with a message,
every valid one gives the paper's schedule, and fit never trains with a wrong rate.

The oracle (`rate_ok`, `count_ok`, `run_ok`, `filename_ok`) is written from the method's definition,
not from the package's code. Examples are derandomized so CI is reproducible.
"""

from __future__ import annotations

import fractions
import math
import numbers
import os
import tempfile
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st

import keras_snapshot
from keras_snapshot import SnapshotCallback, SnapshotSchedule, snapshot_learning_rate, snapshot_steps
from keras_snapshot.schedule import validate_schedule_args

BACKEND = keras.backend.backend()
FAST = settings(max_examples=300, deadline=None, derandomize=True, database=None)
ERRORS = (ValueError, TypeError)
WORK = Path(tempfile.mkdtemp(prefix="keras-snapshot-properties-"))

# Anything a user might pass for a number.
ANYTHING = st.one_of(
    st.integers(min_value=-5, max_value=200),
    st.integers(min_value=-(2**70), max_value=2**53),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.text(max_size=4),
    st.sampled_from(
        [
            np.int64(12),
            np.int32(3),
            np.uint8(4),
            np.float32(0.1),
            np.float64(2.0),
            np.int64(-1),
            np.float64("nan"),
        ]
    ),
    st.fractions(min_value=fractions.Fraction(-2), max_value=fractions.Fraction(2), max_denominator=100),
    st.just([3]),
    st.just(np.array([4])),
)


def rate_ok(value) -> bool:
    """alpha0: a real number (not a bool), finite and > 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    return math.isfinite(value) and float(value) > 0


def count_ok(value) -> bool:
    """T and M: whole numbers of the integer kind (not bool, not 3.0)."""
    return not isinstance(value, bool) and isinstance(value, numbers.Integral)


def run_ok(total, cycles) -> bool:
    """M cycles of ceil(T/M) steps, all of them non-empty, within T steps."""
    if not (count_ok(total) and count_ok(cycles) and total >= 1 and cycles >= 1 and cycles <= total):
        return False
    length = -(-int(total) // int(cycles))
    return (int(cycles) - 1) * length < int(total)


def paper(t, alpha0, total, cycles):
    length = -(-total // cycles)
    return alpha0 / 2 * (math.cos(math.pi * ((t - 1) % length) / length) + 1)


def assert_refused(call, *names):
    with pytest.raises(ERRORS) as info:
        call()
    message = str(info.value)
    assert len(message) > 15, f"an error without a useful message: {message!r}"
    if names:
        assert any(name in message for name in names), message


# --------------------------------------------------------------------------- the schedule's arguments
@FAST
@given(
    alpha0=st.one_of(st.floats(1e-6, 10.0), ANYTHING),
    total=st.one_of(st.integers(1, 10**6), ANYTHING),
    cycles=st.one_of(st.integers(1, 12), ANYTHING),
    keep=st.sampled_from(["all", "all", "alpha0", "total", "cycles", "none"]),
)
@example(alpha0=0.1, total=9, cycles=4, keep="none")  # the paper's ceil leaves cycle 4 empty
@example(alpha0=0.1, total=10, cycles=3, keep="none")  # a shorter last cycle, still M snapshots
@example(alpha0=fractions.Fraction(1, 10), total=np.int64(12), cycles=np.uint8(4), keep="none")
def test_schedule_arguments(alpha0, total, cycles, keep):
    # Half the examples are a valid run with at most one argument from anywhere.
    if keep != "none":
        valid_alpha0 = alpha0 if rate_ok(alpha0) else 0.1
        valid_cycles = int(cycles) if count_ok(cycles) and 1 <= cycles <= 12 else 4
        valid_total = valid_cycles * (int(total) if count_ok(total) and 1 <= total <= 10**6 else 25)
        alpha0 = alpha0 if keep == "alpha0" else valid_alpha0
        total = total if keep == "total" else valid_total
        cycles = cycles if keep == "cycles" else valid_cycles
    valid = rate_ok(alpha0) and run_ok(total, cycles)
    event("valid" if valid else "refused")
    if not valid:
        assert_refused(lambda: validate_schedule_args(alpha0, total, cycles))
        assert_refused(lambda: SnapshotSchedule(alpha0, total_steps=total, cycles=cycles))
        assert_refused(
            lambda: snapshot_learning_rate(1, initial_learning_rate=alpha0, total_steps=total, cycles=cycles)
        )
        if not run_ok(total, cycles):
            assert_refused(lambda: snapshot_steps(total, cycles), "total_steps", "cycles")
        return
    total, cycles = int(total), int(cycles)
    assert validate_schedule_args(alpha0, total, cycles) == (float(alpha0), total, cycles)
    ends = snapshot_steps(total, cycles)
    length = -(-total // cycles)
    assert len(ends) == cycles and ends[-1] == total
    assert ends == [min(k * length, total) for k in range(1, cycles + 1)]
    assert all(b > a for a, b in zip([0, *ends], ends, strict=False))  # no empty cycle
    probe = sorted({1, 2, length, length + 1, total, max(1, total - 1), *ends[:3]})
    got = snapshot_learning_rate(
        np.array(probe), initial_learning_rate=alpha0, total_steps=total, cycles=cycles
    )
    want = [paper(t, float(alpha0), total, cycles) for t in probe]
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-300)
    assert np.all(got <= float(alpha0)) and np.all(got >= 0)
    assert snapshot_learning_rate(1, initial_learning_rate=alpha0, total_steps=total, cycles=cycles) == float(
        alpha0
    )


@FAST
@given(t=st.one_of(ANYTHING, st.lists(st.integers(-3, 50), max_size=4)))
def test_step_argument(t):
    kwargs = {"initial_learning_rate": 0.2, "total_steps": 40, "cycles": 4}
    if isinstance(t, bool) or (isinstance(t, (int, np.integer)) and abs(int(t)) >= 2**63):
        assert_refused(lambda: snapshot_learning_rate(t, **kwargs))  # a bool, or beyond int64
        return
    if isinstance(t, (float, np.floating)) and math.isfinite(t) and abs(t) > 2**62:
        assert_refused(lambda: snapshot_learning_rate(t, **kwargs))  # beyond int64: refused, never wrapped
        return
    values = np.asarray(t) if isinstance(t, (list, np.ndarray)) else None
    whole_numbers = (
        isinstance(t, numbers.Real) and not isinstance(t, bool) and math.isfinite(t) and float(t) == int(t)
    ) or (values is not None and values.dtype.kind in "iu")
    if whole_numbers and np.all(np.asarray(t) >= 1):
        got = snapshot_learning_rate(t, **kwargs)
        want = [paper(int(v), 0.2, 40, 4) for v in np.ravel(np.asarray(t))]
        np.testing.assert_allclose(np.ravel(got), want, rtol=1e-12)
    elif values is not None and values.size == 0:
        assert snapshot_learning_rate(t, **kwargs).size == 0
    else:
        assert_refused(lambda: snapshot_learning_rate(t, **kwargs))


# --------------------------------------------------------------------------- the callback's arguments
FIELDS = ["{cycle}", "{cycle:02d}", "{cycle:03}", "{cycle:x}", "", "{epoch}", "{}", "{0}", "{cycle[0]}"]
FIELDS += ["{cycle:s}", "{cycle.real}", "{{cycle}}", "{cycle", "{cycle:%}", "{cycle:.0e}", "{cycle:>1}"]
FILENAMES = st.one_of(
    st.builds(
        lambda head, field, tail: head + field + tail,
        st.sampled_from(["snapshot-", "", ".tmp-", "a/b-", "run\0-", "m_", "manifest"]),
        st.sampled_from(FIELDS),
        st.sampled_from([".keras", ".h5", "", ".keras.bak", "-final.keras"]),
    ),
    st.sampled_from([None, 3, b"snap-{cycle}.keras", ["{cycle}.keras"]]),
)


def filename_ok(filename, cycles) -> bool:
    """A pattern whose names for cycles 1..M are distinct plain `.keras` file names of our own."""
    if not isinstance(filename, str) or not filename.endswith(".keras"):
        return False
    try:
        names = [filename.format(cycle=c) for c in range(1, min(cycles, 10_000) + 1)]
    except Exception:
        return False
    if len(set(names)) != len(names):
        return False
    return all("/" not in n and "\0" not in n and not n.startswith(".tmp-") for n in names)


DIRECTORIES = st.one_of(
    st.sampled_from(["ok-str", "ok-path"]),
    st.sampled_from(["ok-str", "ok-path", "file", "under-file", "", None, 7, b"bytes"]),
)


def make_directory(kind):
    if kind == "ok-str":
        return str(WORK / "snapshots")
    if kind == "ok-path":
        return WORK / "snapshots-path"
    if kind in ("file", "under-file"):
        (WORK / "a-file").write_text("x")
        return WORK / "a-file" if kind == "file" else WORK / "a-file" / "sub"
    return kind


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(
    directory=DIRECTORIES,
    cycles=st.one_of(st.integers(1, 12), st.integers(-2, 12), ANYTHING),
    alpha0=st.one_of(st.none(), st.floats(1e-6, 10.0), ANYTHING),
    total=st.one_of(st.none(), st.integers(1, 60), st.integers(-2, 60), ANYTHING),
    filename=st.one_of(st.just("snapshot-{cycle:02d}.keras"), FILENAMES),
    verbose=st.one_of(
        st.sampled_from([0, 1, 2]), st.sampled_from([0, 1, 2, 3, -1, True, 1.0, "1", None, np.int64(1)])
    ),
    keep=st.sampled_from(["none", "directory", "cycles", "alpha0", "total", "filename", "verbose"]),
)
def test_callback_arguments(directory, cycles, alpha0, total, filename, verbose, keep):
    if keep != "none":  # a valid set, with at most the one argument `keep` from anywhere
        args = {"directory": "ok-str", "cycles": 3, "alpha0": None, "total": None}
        args |= {"filename": "snapshot-{cycle:02d}.keras", "verbose": 0}
        args[keep] = locals()[keep]
        directory, cycles, alpha0, total = args["directory"], args["cycles"], args["alpha0"], args["total"]
        filename, verbose = args["filename"], args["verbose"]
    path = make_directory(directory)
    valid = (
        directory in ("ok-str", "ok-path")
        and count_ok(cycles)
        and cycles >= 1
        and (alpha0 is None or rate_ok(alpha0))
        and (total is None or run_ok(total, cycles))
        and filename_ok(filename, int(cycles))
        and isinstance(verbose, (int, np.integer))
        and not isinstance(verbose, bool)
        and verbose in (0, 1, 2)
    )
    event("valid" if valid else "refused")
    build = lambda: SnapshotCallback(  # noqa: E731
        path,
        cycles=cycles,
        initial_learning_rate=alpha0,
        total_steps=total,
        filename=filename,
        verbose=verbose,
    )
    if not valid:
        assert_refused(build)
        return
    callback = build()
    assert callback.cycles == int(cycles)


# --------------------------------------------------------------------------- fit: refuse, or train right
class EpochKernels(keras.callbacks.Callback):
    """The kernel before and after every epoch (one-hot inputs: entry b moves by -rate of batch b)."""

    def __init__(self):
        super().__init__()
        self.rates, self.begin = [], None

    def on_epoch_begin(self, epoch, logs=None):
        self.begin = np.array(self.model.get_weights()[0][:, 0], dtype="float64")

    def on_epoch_end(self, epoch, logs=None):
        self.rates.extend(self.begin - np.array(self.model.get_weights()[0][:, 0], dtype="float64"))


def expected_refusal(steps, epochs, cycles, total, schedule, execution):
    """Why this fit must be refused before its first step, or None if it must train (the oracle)."""
    if BACKEND == "torch" and execution > 1:
        return "steps_per_execution"  # Keras's torch backend refuses it itself
    run_total = total or steps * epochs
    if schedule is not None:
        if run_total != schedule[0] or cycles != schedule[1]:
            return "disagree"
    elif execution > 1:
        return "SnapshotSchedule"
    if not run_ok(run_total, cycles):
        return "cycle"
    length = -(-run_total // cycles)
    ends = [min(k * length, run_total) for k in range(1, cycles + 1)]
    if execution > 1 and any((end % steps) % execution for end in ends):
        return "inside an execution"
    return None


@settings(
    max_examples=int(os.environ.get("FIT_EXAMPLES", "12")),
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(
    steps=st.integers(1, 5),
    epochs=st.integers(1, 4),
    cycles=st.integers(1, 7),
    total=st.one_of(st.none(), st.integers(1, 24)),
    in_graph=st.booleans(),
    schedule_shift=st.sampled_from([(0, 0), (0, 0), (1, 0), (0, 1)]),
    execution=st.sampled_from([1, 1, 2, 3]),
)
def test_fit_refuses_before_training_or_applies_the_formula(
    steps, epochs, cycles, total, in_graph, schedule_shift, execution
):
    run_total = total or steps * epochs
    schedule = None
    if in_graph:
        schedule_total, schedule_cycles = run_total + schedule_shift[0], cycles + schedule_shift[1]
        assume(run_ok(schedule_total, schedule_cycles))
        schedule = (schedule_total, schedule_cycles)
    refusal = expected_refusal(steps, epochs, cycles, total, schedule, execution)
    event(f"refused: {refusal}" if refusal else "trained")
    learning_rate = SnapshotSchedule(0.3, schedule[0], schedule[1]) if schedule else 0.5
    model = keras.Sequential(
        [keras.Input((steps,)), keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")]
    )
    model.compile(
        keras.optimizers.SGD(learning_rate), loss=lambda y, p: p[:, 0], steps_per_execution=execution
    )
    directory = Path(tempfile.mkdtemp(dir=WORK))
    make = lambda: SnapshotCallback(  # noqa: E731
        directory / "s", cycles=cycles, total_steps=total, initial_learning_rate=None if schedule else 0.3
    )
    if total is not None and not run_ok(total, cycles):
        assert_refused(make, "cycle")  # refused even earlier, when the callback is made
        return
    callback = make()
    recorder = EpochKernels()
    x, y = np.eye(steps, dtype="float32"), np.zeros((steps, 1), "float32")
    fit = lambda: model.fit(  # noqa: E731
        x, y, batch_size=1, epochs=epochs, shuffle=False, verbose=0, callbacks=[callback, recorder]
    )
    if refusal:
        with pytest.raises(ERRORS, match=refusal):
            fit()
        assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 0
        assert not recorder.rates
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit()
    past_end = [w for w in caught if "gone past total_steps" in str(w.message)]
    iterations = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
    assert len(past_end) == (1 if run_total < steps * epochs else 0), (
        [(w.category.__name__, str(w.message), w.filename, w.lineno) for w in past_end],
        {"iterations": iterations, "T": run_total, "done": steps * epochs},
    )
    done = steps * epochs
    want = [paper(t, 0.3, run_total, cycles) for t in range(1, done + 1)]
    np.testing.assert_allclose(recorder.rates, want, rtol=0, atol=2e-6)
    length = -(-run_total // cycles)
    ends = [min(k * length, run_total) for k in range(1, cycles + 1)]
    manifest = keras_snapshot.read_manifest(directory / "s") or {"snapshots": []}  # none before snapshot 1
    assert [e["step"] for e in manifest["snapshots"]] == [end for end in ends if end <= done]


# --------------------------------------------------------------------------- edges of schedule.py
def test_in_graph_schedule_is_exact_past_2_to_the_24_steps():
    # T = 40,000,000 steps, M = 40,000: cycles of 1,000 steps. Step t = 20,001,000 ends a cycle (rate
    # ~5e-7); computed in float32 its 0-based step 20,000,999 would round to a new cycle (alpha0 = 0.2).
    schedule = SnapshotSchedule(0.2, total_steps=40_000_000, cycles=40_000)
    iterations = keras.ops.convert_to_tensor(np.array(20_000_999, dtype="int64"))
    got = float(keras.ops.convert_to_numpy(schedule(iterations)))
    want = paper(20_001_000, 0.2, 40_000_000, 40_000)
    assert got == pytest.approx(want, abs=1e-6)


def test_snapshot_steps_end_at_total_steps_for_huge_runs():
    total = 2**63 - 1
    assert snapshot_steps(total, 3)[-1] == total


def test_step_true_is_refused():
    assert_refused(lambda: snapshot_learning_rate(True, initial_learning_rate=0.2, total_steps=40, cycles=4))


def test_step_beyond_int64_is_refused_with_a_value_error():
    assert_refused(
        lambda: snapshot_learning_rate(10**20, initial_learning_rate=0.2, total_steps=40, cycles=4)
    )


@pytest.mark.skipif(BACKEND == "torch", reason="the torch backend refuses steps_per_execution > 1")
def test_in_graph_with_a_short_last_execution_per_epoch(tmp_path):
    # Found by the property above: 3 steps per epoch and steps_per_execution = 2, so every epoch ends
    # with a 1-step execution that Keras reports as batch 3 (not 2). Counted naively, the callback
    # drifted by one step per epoch and took snapshot 1 at step 5 instead of 6.
    steps, epochs, cycles = 3, 4, 2  # T = 12: cycles end at 6 and 12, both epoch ends
    model = keras.Sequential(
        [keras.Input((steps,)), keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")]
    )
    model.compile(
        keras.optimizers.SGD(SnapshotSchedule(0.3, total_steps=12, cycles=cycles)),
        loss=lambda y, p: p[:, 0],
        steps_per_execution=2,
    )
    recorder = EpochKernels()
    x, y = np.eye(steps, dtype="float32"), np.zeros((steps, 1), "float32")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        model.fit(
            x,
            y,
            batch_size=1,
            epochs=epochs,
            shuffle=False,
            verbose=0,
            callbacks=[SnapshotCallback(tmp_path / "s", cycles=cycles), recorder],
        )
    want = [paper(t, 0.3, 12, cycles) for t in range(1, 13)]
    np.testing.assert_allclose(recorder.rates, want, rtol=0, atol=2e-6)
    manifest = keras_snapshot.read_manifest(tmp_path / "s")
    assert [e["step"] for e in manifest["snapshots"]] == [6, 12]
    assert [e["epoch"] for e in manifest["snapshots"]] == [2, 4]
    for entry in manifest["snapshots"]:
        kernel = keras.saving.load_model(tmp_path / "s" / entry["file"], compile=False).get_weights()[0]
        assert float(np.sum(kernel)) == pytest.approx(-sum(want[: entry["step"]]), abs=1e-5)
