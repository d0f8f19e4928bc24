"""Training overhead of the snapshot learning rate: steps per second of `fit`, side by side.

Variants (one model each; same architecture, data and optimizer: SGD + Nesterov 0.9, batch 64):

  a  constant learning rate, no callback (the baseline)
  b  SnapshotCallback, callback path (float LR; the callback assigns the rate before every batch)
  c  SnapshotCallback + SnapshotSchedule, in-graph path (the callback only counts steps and saves)
  d  Keras LearningRateScheduler's update run before every batch (what users write by hand)

Mixed precision (TensorFlow and JAX; `--precision`): the same model with its hidden layers in
`mixed_float16` and its softmax layer in float32, the optimizer wrapped in `LossScaleOptimizer` (what
`compile` does under `set_global_policy("mixed_float16")`), in a second interleaved group:

  e  constant learning rate, no callback (the mixed-precision baseline)
  f  SnapshotCallback, callback path
  g  SnapshotCallback + SnapshotSchedule (in-graph)

with the float32 targets: (g)/(e) >= 0.98, and (f)/(e) >= 0.95 on the CNN. The layers get their dtype
policy one by one (not the global policy) because the variants run in threads of one process.

Method. The variants train at the same time in one process, one thread each, and a turnstile lets
exactly one of them run at a time: each runs a window of W steps, then hands over to the next
(a, b, c, d, a, b, c, d, ...), so every variant sees the same machine load and fit's set-up cost is paid
once per variant, outside the windows. A timing callback first in each callback list marks the start of
every batch: a window runs from the start of a batch to the start of the batch W later, so it holds W
whole steps with every callback's per-batch hooks. On JAX, whose steps are dispatched asynchronously, the
window end waits for the queued steps to finish (an in-process check showed (a)'s batch starts 40x
faster than its steps), and on JAX and torch for Keras's pending batch-end work (a thread pool when no
callback overrides on_train_batch_end), so nothing spills into the next window. The first steps of each fit (compilation, first calls) are a warm-up outside the
windows. Per variant: the median over windows of the time per step; speed ratio = median(a) / median(x)
(1.0 = no overhead). No snapshot is written during the windows (T is far larger than the steps run);
saves are timed in a separate, real fit whose cycles end inside it.

One worker process per backend (KERAS_BACKEND is read when Keras is imported); by default one compute
thread per process (--threads), because the machine these numbers come from is shared and with more
threads contention from other processes dominates (torch MLP step 107 ms with 2 OpenMP threads vs 5.8 ms
with 1, load average 7.5 on 2 cores).

    python benchmarks/overhead.py                      # all backends, both models (minutes)
    python benchmarks/overhead.py --quick              # smoke run: seconds per backend
    python benchmarks/overhead.py --backends jax --models mlp --rounds 300
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common

BATCH = 64
BIG_T = 10**8  # total_steps of the timed runs: no cycle ends inside them
CYCLES = 5
ALPHA0 = 0.1
VARIANTS = ("a", "b", "c", "d")
MIXED_VARIANTS = ("e", "f", "g")  # the mixed_float16 group; (e) is its baseline
MIXED_BACKENDS = ("tensorflow", "jax")
VARIANT_NAMES = {
    "a": "constant LR, no callback",
    "b": "SnapshotCallback, callback path",
    "c": "SnapshotCallback + SnapshotSchedule (in-graph)",
    "d": "LearningRateScheduler's update per batch (hand-written)",
    "e": "mixed_float16, constant LR, no callback",
    "f": "mixed_float16, SnapshotCallback, callback path",
    "g": "mixed_float16, SnapshotCallback + SnapshotSchedule (in-graph)",
}
# W steps per window, rounds of windows, warm-up steps before the first window
CONFIG = {
    "mlp": {
        "full": {"window": 10, "rounds": 600, "warmup": 20},
        "quick": {"window": 5, "rounds": 3, "warmup": 3},
    },
    "cnn": {
        "full": {"window": 2, "rounds": 150, "warmup": 6},
        "quick": {"window": 2, "rounds": 2, "warmup": 2},
    },
}
SAVES = {"full": 3, "quick": 1}
MODEL_DESCRIPTIONS = {
    "mlp": "tiny MLP: 32 inputs, Dense 64 relu, Dense 64 relu, Dense 10 softmax (6,922 parameters)",
    "cnn": "small CNN: 28x28x1, Conv 16 3x3 relu, pool, Conv 32 3x3 relu, pool, Dense 10 softmax "
    "(12,810 parameters)",
}
# wall: the window's time per step (steps per second: what the targets use). step: the median interval
# between batch starts inside a window (robust to preemption by other processes; n/a on JAX, where (a)'s
# batch starts show dispatch time only).
ESTIMATORS = ("wall", "step")


class Turnstile:
    """Lets one of n threads run at a time, in round-robin order; finished threads are skipped.

    One semaphore per thread: a hand-over wakes exactly the next thread, nobody else.
    """

    def __init__(self, n: int):
        self.lock = threading.Lock()
        self.gates = [threading.Semaphore(0) for _ in range(n)]
        self.finished = [False] * n
        self.turn = None
        self.n = n

    def start(self) -> None:
        with self.lock:
            self.turn = 0
            self.gates[0].release()

    def wait(self, index: int) -> None:
        self.gates[index].acquire()

    def _advance(self, index: int) -> None:
        for k in range(1, self.n + 1):
            j = (index + k) % self.n
            if not self.finished[j]:
                self.turn = j
                self.gates[j].release()
                return
        self.turn = None

    def pass_on(self, index: int) -> None:
        with self.lock:
            self._advance(index)

    def finish(self, index: int) -> None:
        with self.lock:
            if not self.finished[index]:
                self.finished[index] = True
                if self.turn == index:
                    self._advance(index)


def _bootstrap_ci(a: list[float], x: list[float], resamples: int = 1000) -> tuple[float, float]:
    """95% interval of median(a) / median(x), resampling whole rounds (a and x of a round stay paired)."""
    import numpy as np

    a, x = np.asarray(a), np.asarray(x)
    rng = np.random.default_rng(0)
    picks = rng.integers(0, len(a), size=(resamples, len(a)))
    ratios = np.median(a[picks], axis=1) / np.median(x[picks], axis=1)
    low, high = np.percentile(ratios, [2.5, 97.5])
    return float(low), float(high)


# ---------------------------------------------------------------------------------------------- worker
def _worker(args) -> dict:
    import os
    import tempfile

    import keras
    import numpy as np

    import keras_snapshot
    from keras_snapshot import SnapshotCallback, SnapshotSchedule

    backend = keras.backend.backend()
    mode = "quick" if args.quick else "full"

    def make_model(kind: str, mixed: bool = False) -> keras.Model:
        keras.utils.set_random_seed(0)
        hidden = {"dtype": "mixed_float16"} if mixed else {}
        if kind == "mlp":
            inputs = keras.Input((32,), name="features")
            x = keras.layers.Dense(64, activation="relu", **hidden)(inputs)
            x = keras.layers.Dense(64, activation="relu", **hidden)(x)
        else:
            inputs = keras.Input((28, 28, 1), name="image")
            x = keras.layers.Conv2D(16, 3, activation="relu", **hidden)(inputs)
            x = keras.layers.MaxPooling2D(**hidden)(x)
            x = keras.layers.Conv2D(32, 3, activation="relu", **hidden)(x)
            x = keras.layers.MaxPooling2D(**hidden)(x)
            x = keras.layers.Flatten(**hidden)(x)
        # The softmax in float32, as the mixed-precision guide recommends.
        outputs = keras.layers.Dense(10, activation="softmax", dtype="float32")(x)
        return keras.Model(inputs, outputs, name=kind)

    def compile_model(model, learning_rate, mixed: bool = False):
        optimizer = keras.optimizers.SGD(learning_rate, momentum=0.9, nesterov=True)
        if mixed:
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        model.compile(optimizer, "sparse_categorical_crossentropy")
        return model

    def data(kind: str, n: int):
        rng = np.random.default_rng(0)
        shape = (n, 32) if kind == "mlp" else (n, 28, 28, 1)
        return rng.random(shape, dtype=np.float32), rng.integers(0, 10, n).astype("int32")

    def drain(callback) -> None:
        """Waits for all work of the steps run so far, so none of it spills into the next window.

        JAX dispatches steps asynchronously (TF and torch run them synchronously on CPU), and on JAX and
        torch Keras runs the batch-end hooks in a thread pool when no callback overrides them.
        """
        if backend == "jax":
            import jax

            # The trainer's in-flight state, read without the `model` property (that would sync it back
            # into the variables and make the next step gather it again); else a host read.
            state = getattr(getattr(callback, "_model", None), "_jax_state", None)
            if state:
                jax.block_until_ready(state)
            else:
                keras.ops.convert_to_numpy(callback.model.optimizer.iterations)
        for future in list(getattr(callback.callback_list, "_futures", ())):
            future.result()

    class TurnTimer(keras.callbacks.Callback):
        """First in each callback list: runs its fit's windows when the turnstile says so, and times them."""

        def __init__(self, index: int, turnstile: Turnstile, window: int, rounds: int, warmup: int):
            super().__init__()
            self.index, self.turnstile = index, turnstile
            self.window, self.rounds, self.warmup = window, rounds, warmup
            self.ready = threading.Event()
            self.callback_list = None
            self.marks = []
            self.windows = []  # (seconds per step, median step interval)

        def on_train_begin(self, logs=None):
            self.ready.set()
            self.turnstile.wait(self.index)

        def on_train_batch_begin(self, batch, logs=None):
            offset = batch - self.warmup
            if offset < 0:
                return
            if offset % self.window:
                self.marks.append(time.perf_counter())
                return
            if offset:  # the end of a window
                drain(self)
                self.marks.append(time.perf_counter())
                intervals = [t1 - t0 for t0, t1 in zip(self.marks, self.marks[1:], strict=False)]
                self.windows.append(
                    ((self.marks[-1] - self.marks[0]) / self.window, _common.median(intervals))
                )
                if offset // self.window == self.rounds:
                    return  # keep the turn through the last step and the fit's end
            else:
                drain(self)  # the end of the warm-up
            self.turnstile.pass_on(self.index)
            self.turnstile.wait(self.index)
            self.marks = [time.perf_counter()]

        def on_train_end(self, logs=None):
            self.turnstile.finish(self.index)

    class PerBatchLearningRateScheduler(keras.callbacks.LearningRateScheduler):
        """LearningRateScheduler's own update (read the rate, call the schedule, assign), before every batch."""

        def __init__(self, schedule):
            super().__init__(schedule)
            self.step = 0

        def on_epoch_begin(self, epoch, logs=None):
            pass

        def on_train_batch_begin(self, batch, logs=None):
            optimizer = self.model.optimizer
            learning_rate = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
            optimizer.learning_rate = self.schedule(self.step, learning_rate)
            self.step += 1

    def cosine(step, learning_rate=None):
        length = math.ceil(BIG_T / CYCLES)
        return ALPHA0 / 2.0 * (math.cos(math.pi * (step % length) / length) + 1.0)

    tmp = Path(tempfile.mkdtemp(prefix="ks-overhead-"))

    def variant(name: str, kind: str):
        mixed = name in MIXED_VARIANTS
        model = make_model(kind, mixed)
        directory = tmp / f"{kind}-{name}"
        if name in ("a", "e"):
            compile_model(model, ALPHA0, mixed)
            extra = []
        elif name in ("b", "f"):
            compile_model(model, ALPHA0, mixed)
            extra = [
                SnapshotCallback(directory, cycles=CYCLES, initial_learning_rate=ALPHA0, total_steps=BIG_T)
            ]
        elif name in ("c", "g"):
            compile_model(model, SnapshotSchedule(ALPHA0, total_steps=BIG_T, cycles=CYCLES), mixed)
            extra = [SnapshotCallback(directory, cycles=CYCLES, total_steps=BIG_T)]
        elif name == "d":
            compile_model(model, ALPHA0)
            extra = [PerBatchLearningRateScheduler(cosine)]
        else:
            raise ValueError(name)
        return model, extra

    def interleaved(kind: str, names: list[str], config: dict) -> dict:
        """Runs the variants' fits in turnstile threads; returns {name: [(s/step, median interval), ...]}."""
        steps = config["warmup"] + config["rounds"] * config["window"] + 1
        x, y = data(kind, steps * BATCH)
        turnstile = Turnstile(len(names))
        timers, threads, errors = [], [], {}
        for index, name in enumerate(names):
            model, extra = variant(name, kind)
            timer = TurnTimer(index, turnstile, config["window"], config["rounds"], config["warmup"])
            timers.append(timer)

            # The list fit would build itself (History added, no progress bar), built here so that the
            # timer can wait for its pending asynchronous batch-end work at the end of each window.
            timer.callback_list = keras.callbacks.CallbackList(
                [timer, *extra],
                add_history=True,
                add_progbar=False,
                model=model,
                verbose=0,
                epochs=1,
                steps=steps,
            )

            def run(index=index, name=name, model=model, timer=timer):
                try:
                    model.fit(
                        x,
                        y,
                        batch_size=BATCH,
                        epochs=1,
                        shuffle=False,
                        verbose=0,
                        callbacks=timer.callback_list,
                    )
                except BaseException as error:  # reported by the main thread
                    errors[name] = error
                finally:
                    timer.ready.set()
                    turnstile.finish(index)

            thread = threading.Thread(target=run, name=f"variant-{name}", daemon=True)
            thread.start()
            timer.ready.wait()  # its fit's set-up is done before the next thread starts its own
            threads.append(thread)
        turnstile.start()
        for thread in threads:
            thread.join()
        if errors:
            name, error = next(iter(errors.items()))
            raise RuntimeError(f"variant {name} failed: {error!r}") from error
        for name, timer in zip(names, timers, strict=True):
            if len(timer.windows) != config["rounds"]:
                raise RuntimeError(
                    f"variant {name}: {len(timer.windows)} windows, expected {config['rounds']}"
                )
        return {name: timer.windows for name, timer in zip(names, timers, strict=True)}

    def measure_saves(kind: str, n_saves: int, steps_per_cycle: int) -> dict:
        """A real callback-path fit whose cycles end inside it; times the hooks that write a snapshot."""
        model = compile_model(make_model(kind), ALPHA0)
        directory = tmp / f"{kind}-saves"
        callback = SnapshotCallback(
            directory, cycles=n_saves, initial_learning_rate=ALPHA0, total_steps=n_saves * steps_per_cycle
        )
        durations = []

        def count():
            return sum(1 for n in os.listdir(directory) if n.endswith(".keras")) if directory.exists() else 0

        def timed(hook):
            def wrapper(*a, **k):
                before = count()
                start = time.perf_counter()
                hook(*a, **k)
                elapsed = time.perf_counter() - start
                if count() > before:
                    durations.append(elapsed)

            return wrapper

        # Instance attributes shadow the methods: the cycle ends mid-epoch (batch end) and at the epoch end.
        callback.on_train_batch_end = timed(callback.on_train_batch_end)
        callback.on_epoch_end = timed(callback.on_epoch_end)
        # The first save of a process pays one-off costs (imports, h5py set-up): not a per-snapshot cost.
        model.save(tmp / f"{kind}-warmup.keras")
        x, y = data(kind, n_saves * steps_per_cycle * BATCH)
        model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[callback])
        sizes = [p.stat().st_size for p in directory.glob("*.keras")]
        return {
            "seconds": durations,
            "median_s": _common.median(durations) if durations else float("nan"),
            "file_bytes": int(_common.median(sizes)) if sizes else 0,
            "snapshots": len(durations),
        }

    results = {
        "backend": backend,
        "device": _common.backend_device(),
        "keras": keras.__version__,
        "keras_snapshot": keras_snapshot.__version__,
        "mode": mode,
        "models": {},
    }

    def group_statistics(names: list[str], windows: dict) -> dict:
        """Per estimator: medians (us), speed vs the group's first variant, its 95% CI and per-round IQR."""
        base = names[0]
        estimators = {}
        for index, estimator in enumerate(ESTIMATORS):
            series = {name: [w[index] for w in windows[name]] for name in names}
            medians = {name: _common.median(series[name]) for name in names}
            estimators[estimator] = {
                "median_us": {name: medians[name] * 1e6 for name in names},
                f"speed_vs_{base}": {name: medians[base] / medians[name] for name in names},
                f"speed_vs_{base}_ci95": {
                    name: _bootstrap_ci(series[base], series[name]) for name in names if name != base
                },
                f"per_round_speed_vs_{base}_quartiles": {
                    name: _common.quartiles([a / v for a, v in zip(series[base], series[name], strict=True)])
                    for name in names
                    if name != base
                },
            }
        return estimators

    names = list(VARIANTS)
    for kind in args.models:
        config = dict(CONFIG[kind][mode])
        if args.rounds:
            config["rounds"] = args.rounds
        if args.window:
            config["window"] = args.window
        print(
            f"[{backend}/{kind}] {len(names)} variants x {config['rounds']} windows",
            file=sys.stderr,
            flush=True,
        )
        start = time.perf_counter()
        windows = interleaved(kind, names, config)
        elapsed = time.perf_counter() - start
        estimators = group_statistics(names, windows)
        saves = measure_saves(kind, SAVES[mode], 20 if kind == "mlp" else 4)
        results["models"][kind] = {
            "description": MODEL_DESCRIPTIONS[kind],
            "parameters": make_model(kind).count_params(),
            "config": config,
            "seconds": round(elapsed, 1),
            "windows_seconds_per_step": {name: [w[0] for w in windows[name]] for name in names},
            **estimators["wall"],
            "estimators": estimators,
            "save": saves,
        }
        print(f"[{backend}/{kind}] done in {elapsed:.1f}s", file=sys.stderr, flush=True)
        if args.precision in ("both", "mixed") and backend in MIXED_BACKENDS:
            mixed_names = list(MIXED_VARIANTS)
            start = time.perf_counter()
            windows = interleaved(kind, mixed_names, config)
            elapsed = time.perf_counter() - start
            estimators = group_statistics(mixed_names, windows)
            results["models"][kind]["mixed_float16"] = {
                "seconds": round(elapsed, 1),
                "windows_seconds_per_step": {name: [w[0] for w in windows[name]] for name in mixed_names},
                **estimators["wall"],
                "estimators": estimators,
            }
            print(f"[{backend}/{kind}] mixed_float16 done in {elapsed:.1f}s", file=sys.stderr, flush=True)
    return results


# ---------------------------------------------------------------------------------------------- driver
def _targets(backend: str, kind: str, speed: dict) -> list[tuple[str, float, bool]]:
    """(name, value, ok) for the issue's targets that apply to this backend and model."""
    out = []
    if "c" in speed and backend in ("tensorflow", "jax"):
        out.append(("(c)/(a) >= 0.98", speed["c"], speed["c"] >= 0.98))
    if "b" in speed and kind == "cnn":
        out.append(("(b)/(a) >= 0.95", speed["b"], speed["b"] >= 0.95))
    if "g" in speed:
        out.append(("(g)/(e) >= 0.98", speed["g"], speed["g"] >= 0.98))
    if "f" in speed and kind == "cnn":
        out.append(("(f)/(e) >= 0.95", speed["f"], speed["f"] >= 0.95))
    return out


def _all_targets(backend: str, kind: str, result: dict) -> list[tuple[str, float, bool, tuple]]:
    """Every target of one backend/model, float32 and mixed precision: (name, value, ok, 95% CI)."""
    out = []
    groups = [("a", result)] + ([("e", result["mixed_float16"])] if "mixed_float16" in result else [])
    for base, group in groups:
        speed, ci = group[f"speed_vs_{base}"], group[f"speed_vs_{base}_ci95"]
        for name, value, ok in _targets(backend, kind, speed):
            out.append((name, value, ok, tuple(ci[name[1]])))
    return out


def _report(record: dict) -> str:
    variants = record["variants"]
    cycle_steps = record["cycle_steps"]
    others = [v for v in variants if v != "a"]
    rows, cross_rows, target_rows, save_rows, default_rows = [], [], [], [], []
    mixed_rows = []
    for backend, result in record["backends"].items():
        for kind, res in result["models"].items():
            med, speed, est = res["median_us"], res["speed_vs_a"], res["estimators"]
            if "mixed_float16" in res:
                mixed = res["mixed_float16"]
                mixed_rows.append(
                    [backend, kind, f"{med['a']:.0f}"]
                    + [f"{mixed['median_us'][v]:.0f}" for v in MIXED_VARIANTS]
                    + [f"{mixed['speed_vs_e'][v]:.3f}" for v in MIXED_VARIANTS[1:]]
                    + [
                        "[{:.3f}, {:.3f}]".format(*mixed["per_round_speed_vs_e_quartiles"][v])
                        for v in MIXED_VARIANTS[1:]
                    ]
                )
            rows.append(
                [backend, kind] + [f"{med[v]:.0f}" for v in variants] + [f"{speed[v]:.3f}" for v in others]
            )
            cross_rows.append(
                [backend, kind]
                + ["n/a" if backend == "jax" else f"{est['step']['speed_vs_a'][v]:.3f}" for v in others]
                + ["[{:.3f}, {:.3f}]".format(*res["per_round_speed_vs_a_quartiles"][v]) for v in others]
            )
            if not _all_targets(backend, kind, res):
                target_rows.append(
                    [
                        backend,
                        kind,
                        "none here: (c)/(a) is for TF and JAX, (b)/(a) for the CNN",
                        "n/a",
                        "n/a",
                        "n/a",
                    ]
                )
            for name, value, ok, (low, high) in _all_targets(backend, kind, res):
                target_rows.append(
                    [backend, kind, name, f"{value:.3f}", f"[{low:.3f}, {high:.3f}]", _common.verdict(ok)]
                )
            save = res["save"]
            step = med.get("b", med["a"]) / 1e6
            cycle_time = cycle_steps * step
            save_rows.append(
                [
                    backend,
                    kind,
                    f"{save['median_s'] * 1e3:.1f}",
                    f"{save['file_bytes'] / 1024:.0f}",
                    f"{cycle_time:.2f}",
                    f"{save['median_s'] / cycle_time:.4f}",
                ]
            )
            if "b" in speed and "c" in speed:
                faster = "b (callback path)" if med["b"] <= med["c"] else "c (in-graph SnapshotSchedule)"
                default_rows.append(
                    [backend, kind, f"{med['b'] - med['a']:+.0f}", f"{med['c'] - med['a']:+.0f}", faster]
                )
    lines = [
        "Time per step (median over interleaved windows, microseconds) and speed relative to (a) "
        "(median(a) / median(x); 1.000 = no overhead):\n",
        _common.markdown_table(
            ["backend", "model"] + [f"{v} us" for v in variants] + [f"{v}/a" for v in others], rows
        ),
        "\nVariants: " + "; ".join(f"{v} = {VARIANT_NAMES[v]}" for v in variants) + ".",
        "\nTargets (verdict on the ratio of medians; the 95% interval comes from resampling rounds):\n",
        _common.markdown_table(["backend", "model", "target", "value", "95% CI", "verdict"], target_rows),
        "\nNoise gauges: the same ratios from the median step interval inside windows (robust to preemption; "
        "n/a on JAX, where (a)'s batch starts show dispatch time only), and the quartiles of the per-round "
        "ratios of window times:\n",
        _common.markdown_table(
            ["backend", "model"] + [f"{v}/a step" for v in others] + [f"{v}/a per-round IQR" for v in others],
            cross_rows,
        ),
    ]
    if mixed_rows:
        lines += [
            "\nMixed precision (hidden layers mixed_float16, softmax float32, LossScaleOptimizer; a second "
            "interleaved group, ratios against its own constant-LR baseline (e); (a) repeated for scale, from the "
            "float32 group):\n",
            _common.markdown_table(
                [
                    *("backend", "model", "a us (float32)", "e us", "f us", "g us", "f/e", "g/e"),
                    *("f/e per-round IQR", "g/e per-round IQR"),
                ],
                mixed_rows,
            ),
            "\n" + "; ".join(f"{v} = {VARIANT_NAMES[v]}" for v in MIXED_VARIANTS) + ".",
        ]
    if default_rows:
        lines += [
            "\nFaster path (added microseconds per step over (a)):\n",
            _common.markdown_table(["backend", "model", "b - a", "c - a", "faster"], default_rows),
        ]
    lines += [
        "\nSnapshot saves (the callback's hook that writes a snapshot: `.keras` file, fsync, rename, "
        "manifest), timed in a real fit whose cycles end inside it, median of "
        f"{SAVES[record['mode']]}; save/cycle = save time / training time of a {cycle_steps}-step cycle "
        "at (b)'s step time:\n",
        _common.markdown_table(
            ["backend", "model", "ms/snapshot", "file KiB", f"{cycle_steps}-step cycle (s)", "save/cycle"],
            save_rows,
        ),
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", default=",".join(_common.BACKENDS), help="comma-separated")
    parser.add_argument(
        "--models", default=None, help="comma-separated: mlp, cnn (default both; --quick: mlp)"
    )
    parser.add_argument("--rounds", type=int, default=0, help="windows per variant (default: per model)")
    parser.add_argument("--window", type=int, default=0, help="steps per window (default: per model)")
    parser.add_argument("--quick", action="store_true", help="smoke run: a few short windows, the MLP only")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="compute threads per backend process (default 1; 0 = the backend's default)",
    )
    parser.add_argument(
        "--precision",
        choices=("both", "float32", "mixed"),
        default="both",
        help="float32 variants a-d always run; 'both'/'mixed' add the mixed_float16 group e-g (TF and JAX)",
    )
    parser.add_argument("--cycle-steps", type=int, default=1000, help="cycle length for the save fraction")
    parser.add_argument("--out", default=str(_common.RESULTS_DIR), help="results folder ('' to skip writing)")
    parser.add_argument(
        "--name", default=None, help="results file stem (default: overhead[-backends][-quick])"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result-json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.models is None:
        args.models = "mlp" if args.quick else "mlp,cnn"
    args.models = [m for m in args.models.split(",") if m]
    for kind in args.models:
        if kind not in CONFIG:
            parser.error(f"unknown model {kind!r}")

    if args.worker:
        result = _worker(args)
        Path(args.result_json).write_text(json.dumps(result))
        return 0

    backends, record = _common.start_record(
        parser, args, "overhead", variants=list(VARIANTS), cycle_steps=args.cycle_steps
    )
    forwarded = ["--models", ",".join(args.models)]
    forwarded += ["--rounds", str(args.rounds), "--window", str(args.window)]
    forwarded += ["--quick"] if args.quick else []
    forwarded += ["--precision", args.precision]
    started = time.perf_counter()
    for backend in backends:
        record["backends"][backend] = _common.run_worker(
            Path(__file__).resolve(), backend, forwarded, threads=args.threads
        )
    record["seconds"] = round(time.perf_counter() - started, 1)
    record["loadavg_at_end"] = _common.loadavg()
    record["failed_targets"] = [
        f"{b}/{k} {name}"
        for b, res in record["backends"].items()
        for k, r in res["models"].items()
        for name, _, ok, _ in _all_targets(b, k, r)
        if not ok
    ]
    models = "\n".join(f"- {k}: {MODEL_DESCRIPTIONS[k]}" for k in args.models)
    markdown = (
        _common.report_header("# Training overhead", record, args.quick, args.threads) + f"{models}\n"
        f"- batch {BATCH}, SGD + Nesterov 0.9, synthetic float32 data, shuffle off, no metrics (the smallest "
        "step: the worst case for overhead); windows: "
        + ", ".join(
            f"{k} {r['config']['rounds']} x {r['config']['window']} steps"
            for k, r in next(iter(record["backends"].values()))["models"].items()
        )
        + f"\n\n{_report(record)}\n"
    )
    _common.publish(markdown, record, args, "overhead", backends)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
