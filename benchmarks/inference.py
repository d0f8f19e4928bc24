"""Ensemble inference and the builder: ONE averaged graph vs the loop peers use, side by side.

M = 5 snapshots of a small CNN (written by a real SnapshotCallback run), requests of batch 1, 32, 1024.

  ensemble   `build_ensemble(directory)`: one functional model averaging the members, one branch each
  fused      `build_ensemble(directory, fuse=True)`: the same mean, the members' weights stacked into
             one set of wider layers (about as many ops as one member)
  loop       what peers do: M separately loaded models, one call each, then `np.mean`
  member     ONE member alone (the reference for the compiled-path targets)
  ensemble+uncertainty, fused+uncertainty
             the same two graphs built with `uncertainty=True` (dict outputs: predictions, entropy,
             mutual_information, disagreement): what the uncertainty outputs cost (compiled path)

through three paths, compared like with like:

  predict           `model.predict(x, batch_size=len(x))` (carries tens of ms of fixed cost per call)
  compiled          `model.predict_on_batch(x)` (the compiled predict function, no per-call set-up)
  serving_default   the exported SavedModel's `serving_default` signature (what TF Serving runs),
                    loaded with `tf.saved_model.load`; from the TensorFlow and JAX backends

Builder: `build_ensemble(directory)` timed against loading the M files one by one; every call of
`keras.saving.load_model` and every zip archive opened is counted per file (each must be 1).
Peak memory: in fresh processes, the peak resident set size (VmHWM, reset after imports) of loading and
running one member, the ensemble (build + run) and the loop, above the process's size after imports.

One compute thread per backend process by default (--threads): on the shared 2-core machine these numbers
come from, torch with its default 2 OpenMP threads took 64 ms for one member at batch 1 instead of 2 ms.
With one thread the ensemble's independent branches cannot run in parallel. Every target is reported
for both graphs ([branches] and [fused]); the docs' Benchmarks page says which to use when.

Method: every case is warmed up (compilation, first calls), then timed in interleaved rounds (all cases of
a batch size one after the other, round after round); a sample repeats a fast call until it lasts about
20 ms; per case the median over rounds. Ratios are of medians measured in the same process.

    python benchmarks/inference.py                 # all backends (minutes)
    python benchmarks/inference.py --quick         # smoke run
    python benchmarks/inference.py --backends tensorflow --rounds 21
    python benchmarks/inference.py --uncertainty-only   # only the uncertainty outputs' cost (batch 1, 1024)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common

M = 5
BATCH_SIZES = (1, 32, 1024)
ROUNDS = {"full": {1: 15, 32: 15, 1024: 7}, "quick": {1: 1, 32: 1, 1024: 1}}
BUILD_ROUNDS = {"full": 5, "quick": 1}
SAMPLE_SECONDS = {"full": 0.02, "quick": 0.0}
MODEL_DESCRIPTION = (
    "small CNN: 28x28x1, Conv 16 3x3 relu, pool, Conv 32 3x3 relu, pool, Dense 10 softmax (12,810 parameters)"
)
EXPORT_BACKENDS = ("tensorflow", "jax")


# --------------------------------------------------------------------------------------------- helpers
def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE).group(1))


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def make_member(seed: int):
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((28, 28, 1), name="image")
    x = keras.layers.Conv2D(16, 3, activation="relu")(inputs)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(32, 3, activation="relu")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(10, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="cnn")


def write_snapshots(directory: Path) -> list[Path]:
    """A real SnapshotCallback run: M cycles, one snapshot each (weights differ: the members differ)."""
    import keras
    import numpy as np

    import keras_snapshot

    model = make_member(0)
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True), "sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.random((M * 2 * 32, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, len(x)).astype("int32")
    callback = keras_snapshot.SnapshotCallback(directory, cycles=M, initial_learning_rate=0.1)
    model.fit(x, y, batch_size=32, epochs=M, verbose=0, callbacks=[callback])
    manifest = keras_snapshot.read_manifest(directory)
    return [directory / entry["file"] for entry in manifest["snapshots"]]


# ---------------------------------------------------------------------------------------------- memory
def _memory_worker(args) -> dict:
    """Runs in a fresh process: peak RSS above the post-import size for one scenario."""
    import keras
    import numpy as np

    import keras_snapshot

    paths = [Path(p) for p in args.paths.split(os.pathsep)]
    x = np.random.default_rng(1).random((1024, 28, 28, 1), dtype=np.float32)
    keras.ops.convert_to_numpy(keras.ops.ones((2, 2)) + 1)  # backend runtime up before the baseline
    baseline = _status_kib("VmRSS")
    resettable = _reset_peak()
    if args.memory_worker == "member":
        model = keras.saving.load_model(paths[0], compile=False)
        outputs = [model.predict_on_batch(x), model.predict(x, batch_size=1024, verbose=0)]
    elif args.memory_worker in ("ensemble", "fused"):
        model = keras_snapshot.build_ensemble(paths, fuse=args.memory_worker == "fused")
        outputs = [model.predict_on_batch(x), model.predict(x, batch_size=1024, verbose=0)]
    elif args.memory_worker == "loop":
        models = [keras.saving.load_model(p, compile=False) for p in paths]
        outputs = [np.mean([m.predict_on_batch(x) for m in models], axis=0)]
        outputs.append(np.mean([m.predict(x, batch_size=1024, verbose=0) for m in models], axis=0))
    else:
        raise ValueError(args.memory_worker)
    assert all(np.isfinite(np.asarray(o)).all() for o in outputs)
    peak = _status_kib("VmHWM")
    return {
        "baseline_kib": baseline,
        "peak_kib": peak,
        "delta_kib": peak - baseline,
        "peak_reset": resettable,
    }


def _measure_memory(paths: list[Path], threads: int) -> dict:
    env = dict(os.environ)
    env.update(_common.thread_env(threads))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_common.REPO_ROOT), env.get("PYTHONPATH")]))
    out = {}
    for scenario in ("member", "ensemble", "fused", "loop"):
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--memory-worker",
            scenario,
            "--paths",
            os.pathsep.join(str(p) for p in paths),
        ]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"memory worker {scenario} failed ({proc.returncode}): {proc.stderr[-2000:]}")
        out[scenario] = json.loads(lines[-1])
    return out


# ---------------------------------------------------------------------------------------------- worker
def _worker(args) -> dict:
    import gc
    import statistics
    import tempfile
    import zipfile

    import keras
    import numpy as np

    import keras_snapshot

    backend = keras.backend.backend()
    mode = "quick" if args.quick else "full"
    rounds = dict(ROUNDS[mode])
    if args.rounds:
        rounds = {bs: args.rounds for bs in rounds}
    tmp = Path(tempfile.mkdtemp(prefix="ks-inference-"))
    log = lambda text: print(f"[{backend}] {text}", file=sys.stderr, flush=True)  # noqa: E731

    log("writing M snapshots (a real SnapshotCallback run)")
    directory = tmp / "snapshots"
    paths = write_snapshots(directory)
    assert len(paths) == M, paths
    keras.backend.clear_session()
    gc.collect()

    if args.uncertainty_only:
        return _uncertainty_worker(args, directory, backend, mode, rounds, log)

    # ----------------------------------------------------------------- builder: time and load counts
    loads, archives = [], []
    real_load_model = keras.saving.load_model
    real_zip_init = zipfile.ZipFile.__init__

    def counting_load_model(filepath, *a, **k):
        loads.append(str(Path(filepath).resolve()))
        return real_load_model(filepath, *a, **k)

    def counting_zip_init(self, file, *a, **k):
        name = file if isinstance(file, (str, os.PathLike)) else getattr(file, "name", None)
        if name is not None and str(name).endswith(".keras"):
            archives.append(str(Path(name).resolve()))
        return real_zip_init(self, file, *a, **k)

    def peers_load():
        return [keras.saving.load_model(p, compile=False) for p in paths]

    keras.saving.load_model = counting_load_model
    zipfile.ZipFile.__init__ = counting_zip_init
    try:
        build_times, load_times, build_counts = [], [], []
        first = 1 if args.quick else 0  # round 0: a warm-up round (imports, first traces), not in quick
        for round_index in range(first, BUILD_ROUNDS[mode] + 1):
            order = (
                [("build", None), ("load", None)]
                if round_index % 2 == 0
                else [("load", None), ("build", None)]
            )
            for case, _ in order:
                gc.collect()
                loads.clear()
                archives.clear()
                start = time.perf_counter()
                if case == "build":
                    ensemble = keras_snapshot.build_ensemble(directory)
                else:
                    members = peers_load()
                elapsed = time.perf_counter() - start
                if round_index == 0:
                    continue
                if case == "build":
                    build_times.append(elapsed)
                    build_counts.append(
                        {
                            "load_model_calls": len(loads),
                            "max_loads_per_file": max(loads.count(p) for p in set(loads)) if loads else 0,
                            "files_loaded": len(set(loads)),
                            "zip_opens": len(archives),
                            "max_zip_opens_per_file": max(archives.count(p) for p in set(archives))
                            if archives
                            else 0,
                        }
                    )
                else:
                    load_times.append(elapsed)
    finally:
        keras.saving.load_model = real_load_model
        zipfile.ZipFile.__init__ = real_zip_init
    builder = {
        "build_s": _common.median(build_times),
        "load_m_files_s": _common.median(load_times),
        "build_over_load": _common.median(build_times) / _common.median(load_times),
        "counts": build_counts,
        "load_model_calls": max(c["load_model_calls"] for c in build_counts),
        "max_loads_per_file": max(c["max_loads_per_file"] for c in build_counts),
        "max_zip_opens_per_file": max(c["max_zip_opens_per_file"] for c in build_counts),
        "files_loaded": min(c["files_loaded"] for c in build_counts),
    }
    log(f"builder: build {builder['build_s']:.2f}s, loads/file {builder['max_loads_per_file']}")

    # ------------------------------------------------------------------------------ inference
    ensemble = keras_snapshot.build_ensemble(directory)
    fused = keras_snapshot.build_ensemble(directory, fuse=True)
    uncertain = {
        graph: keras_snapshot.build_ensemble(directory, fuse=graph == "fused", uncertainty=True)
        for graph in GRAPHS
    }
    members = peers_load()
    member = members[-1]
    rng = np.random.default_rng(2)
    inputs = {bs: rng.random((bs, 28, 28, 1), dtype=np.float32) for bs in BATCH_SIZES}

    # Same numbers from every path (a benchmark of wrong answers is worthless). On a GPU, convolutions
    # and matmuls run in TF32 by default (JAX, torch's cuDNN), so two groupings of the same sums agree
    # only to ~1e-3 there; the largest difference is recorded either way.
    device = _common.backend_device()
    tolerance = dict(rtol=1e-4, atol=1e-6) if device.startswith("cpu") else dict(atol=5e-3)
    x = inputs[32]
    reference = np.mean([m.predict_on_batch(x) for m in members], axis=0)
    differences = {}

    def check(what, values):
        values = np.asarray(values)
        differences[what] = float(np.max(np.abs(values - reference)))
        np.testing.assert_allclose(values, reference, **tolerance, err_msg=what)

    check("ensemble", ensemble.predict_on_batch(x))
    check("fused", fused.predict_on_batch(x))
    for graph, model in uncertain.items():
        check(f"{graph}+uncertainty", model.predict_on_batch(x)["predictions"])

    def load_serving(model, where):
        """The exported SavedModel's serving_default as a numpy function, checked against the mean."""
        import warnings

        import tensorflow as tf

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the fused CNN's XLA notice (grouped convolutions)
            export_path = keras_snapshot.export_saved_model(model, tmp / where)
        loaded = tf.saved_model.load(str(export_path))
        signature = loaded.signatures["serving_default"]
        (input_key,) = signature.structured_input_signature[1].keys()
        (output_key,) = signature.structured_outputs.keys()

        def serving(x):
            return signature(**{input_key: tf.constant(x)})[output_key].numpy()

        check(f"{where} serving_default", serving(x))
        return serving

    serving, export_note = {}, None
    if backend in EXPORT_BACKENDS:
        try:
            serving = {"ensemble": load_serving(ensemble, "ensemble"), "fused": load_serving(fused, "fused")}
        except Exception as error:  # reported, not hidden
            serving, export_note = {}, f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"
    else:
        export_note = "export_saved_model runs from the TensorFlow and JAX backends only"

    def cases_for(bs: int) -> dict:
        x = inputs[bs]
        cases = {
            "ensemble.predict": lambda: ensemble.predict(x, batch_size=bs, verbose=0),
            "loop.predict": lambda: np.mean(
                [m.predict(x, batch_size=bs, verbose=0) for m in members], axis=0
            ),
            "member.predict": lambda: member.predict(x, batch_size=bs, verbose=0),
            "ensemble.compiled": lambda: ensemble.predict_on_batch(x),
            "fused.predict": lambda: fused.predict(x, batch_size=bs, verbose=0),
            "fused.compiled": lambda: fused.predict_on_batch(x),
            "loop.compiled": lambda: np.mean([m.predict_on_batch(x) for m in members], axis=0),
            "member.compiled": lambda: member.predict_on_batch(x),
        }
        for graph, model in uncertain.items():
            cases[f"{graph}+uncertainty.compiled"] = lambda model=model: model.predict_on_batch(x)
        for graph, function in serving.items():
            cases[f"{graph}.serving_default"] = lambda function=function: function(x)
        return cases

    timings = {}
    for bs in BATCH_SIZES:
        cases = cases_for(bs)
        repeat = {}
        for name, fn in cases.items():  # warm-up, and calls per sample
            fn()
            repeat[name] = 1
            if SAMPLE_SECONDS[mode]:
                start = time.perf_counter()
                fn()
                once = time.perf_counter() - start
                repeat[name] = max(1, round(SAMPLE_SECONDS[mode] / max(once, 1e-6)))
        samples = {name: [] for name in cases}
        names = list(cases)
        for round_index in range(rounds[bs]):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                fn, n = cases[name], repeat[name]
                start = time.perf_counter()
                for _ in range(n):
                    fn()
                samples[name].append((time.perf_counter() - start) / n)
        timings[str(bs)] = {
            "median_ms": {name: _common.median(v) * 1e3 for name, v in samples.items()},
            "calls_per_sample": repeat,
            "rounds": rounds[bs],
            "samples_ms": {name: [s * 1e3 for s in v] for name, v in samples.items()},
            "spread": {
                name: statistics.pstdev(v) / _common.median(v) for name, v in samples.items() if len(v) > 1
            },
        }
        log(f"batch {bs}: " + ", ".join(f"{k} {v:.2f}ms" for k, v in timings[str(bs)]["median_ms"].items()))

    memory = None if args.no_memory else _measure_memory(paths, args.threads)
    return {
        "backend": backend,
        "device": device,
        "max_abs_difference_from_mean": differences,
        "keras": keras.__version__,
        "mode": mode,
        "members": M,
        "builder": builder,
        "timings_ms": timings,
        "serving_default": export_note or "ok",
        "memory": memory,
    }


def _time_cases(cases: dict, rounds: int, sample_seconds: float) -> dict:
    """Warm-up, then `rounds` interleaved rounds of every case; a sample repeats a fast call ~sample_seconds."""
    import statistics

    repeat = {}
    for name, fn in cases.items():
        fn()
        repeat[name] = 1
        if sample_seconds:
            start = time.perf_counter()
            fn()
            once = time.perf_counter() - start
            repeat[name] = max(1, round(sample_seconds / max(once, 1e-6)))
    samples = {name: [] for name in cases}
    names = list(cases)
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            fn, n = cases[name], repeat[name]
            start = time.perf_counter()
            for _ in range(n):
                fn()
            samples[name].append((time.perf_counter() - start) / n)
    return {
        "median_ms": {name: _common.median(v) * 1e3 for name, v in samples.items()},
        "calls_per_sample": repeat,
        "rounds": rounds,
        "samples_ms": {name: [s * 1e3 for s in v] for name, v in samples.items()},
        "spread": {
            name: statistics.pstdev(v) / _common.median(v) for name, v in samples.items() if len(v) > 1
        },
    }


def _uncertainty_worker(args, directory: Path, backend: str, mode: str, rounds: dict, log) -> dict:
    """--uncertainty-only: the two graphs with and without uncertainty outputs, compiled path, batch 1 and
    1024, timed side by side (interleaved rounds); predictions checked against the members' mean."""
    import keras
    import numpy as np

    import keras_snapshot

    graphs = {
        name: keras_snapshot.build_ensemble(directory, fuse=graph == "fused", uncertainty=with_outputs)
        for graph in GRAPHS
        for name, with_outputs in ((graph, False), (f"{graph}+uncertainty", True))
    }
    members = [keras.saving.load_model(p, compile=False) for p in sorted(directory.glob("*.keras"))]
    rng = np.random.default_rng(2)
    inputs = {bs: rng.random((bs, 28, 28, 1), dtype=np.float32) for bs in UNCERTAINTY_BATCHES}
    device = _common.backend_device()
    tolerance = dict(rtol=1e-4, atol=1e-6) if device.startswith("cpu") else dict(atol=5e-3)
    x = inputs[1024][:32]
    reference = np.mean([m.predict_on_batch(x) for m in members], axis=0)
    differences = {}
    for name, model in graphs.items():
        values = model.predict_on_batch(x)
        values = np.asarray(values["predictions"] if isinstance(values, dict) else values)
        differences[name] = float(np.max(np.abs(values - reference)))
        np.testing.assert_allclose(values, reference, **tolerance, err_msg=name)
    timings = {}
    for bs in UNCERTAINTY_BATCHES:
        cases = {
            f"{name}.compiled": (lambda model=model, x=inputs[bs]: model.predict_on_batch(x))
            for name, model in graphs.items()
        }
        timings[str(bs)] = _time_cases(cases, rounds[bs], SAMPLE_SECONDS[mode])
        log(f"batch {bs}: " + ", ".join(f"{k} {v:.2f}ms" for k, v in timings[str(bs)]["median_ms"].items()))
    return {
        "backend": backend,
        "device": device,
        "max_abs_difference_from_mean": differences,
        "keras": keras.__version__,
        "mode": mode,
        "cases": "uncertainty-only",
        "members": M,
        "timings_ms": timings,
    }


# ---------------------------------------------------------------------------------------------- driver
GRAPHS = {"ensemble": "branches", "fused": "fused"}


def _targets(backend: str, res: dict) -> list[tuple[str, str, bool | None]]:
    """Every latency target for each graph: [branches] = build_ensemble(d), [fused] = fuse=True."""
    t = {int(bs): v["median_ms"] for bs, v in res["timings_ms"].items()}
    out = []
    for graph, label in GRAPHS.items():
        speedup = t[1]["loop.predict"] / t[1][f"{graph}.predict"]
        out.append((f"[{label}] batch 1, predict: loop / ensemble >= 4", f"{speedup:.2f}", speedup >= 4))
        ratio = t[1][f"{graph}.compiled"] / t[1]["member.compiled"]
        out.append((f"[{label}] batch 1, compiled: ensemble / member <= 2", f"{ratio:.2f}", ratio <= 2))
        ratio = t[1024][f"{graph}.compiled"] / (M * t[1024]["member.compiled"])
        out.append(
            (
                f"[{label}] batch 1024, compiled: ensemble / ({M} x member) <= 1.0",
                f"{ratio:.2f}",
                ratio <= 1.0,
            )
        )
        if all(f"{graph}.serving_default" in t[bs] for bs in t):
            ratios = {bs: t[bs][f"{graph}.serving_default"] / t[bs][f"{graph}.compiled"] for bs in t}
            out.append(
                (
                    f"[{label}] serving_default / compiled <= 1.2 (every batch size)",
                    ", ".join(f"{bs}: {r:.2f}" for bs, r in ratios.items()),
                    max(ratios.values()) <= 1.2,
                )
            )
        else:
            out.append(
                (f"[{label}] serving_default / compiled <= 1.2", f"n/a ({res['serving_default']})", None)
            )
    b = res["builder"]
    out.append(
        (
            "builder loads each snapshot once",
            f"{b['load_model_calls']} load_model calls for {b['files_loaded']} files, max per file "
            f"{b['max_loads_per_file']} (zip opens per file {b['max_zip_opens_per_file']})",
            b["max_loads_per_file"] == 1 and b["files_loaded"] == M,
        )
    )
    return out


UNCERTAINTY_BATCHES = (1, 1024)
UNCERTAINTY_LIMIT = 1.10


def _uncertainty_costs(res: dict) -> list[tuple[str, int, float, float, float]]:
    """(graph label, batch, plain compiled ms, with uncertainty compiled ms, ratio) where both were timed."""
    t = {int(bs): v["median_ms"] for bs, v in res["timings_ms"].items()}
    out = []
    for graph, label in GRAPHS.items():
        for bs in UNCERTAINTY_BATCHES:
            plain, with_outputs = (
                t.get(bs, {}).get(f"{graph}.compiled"),
                t.get(bs, {}).get(f"{graph}+uncertainty.compiled"),
            )
            if plain and with_outputs:
                out.append((label, bs, plain, with_outputs, with_outputs / plain))
    return out


def _uncertainty_targets(res: dict) -> list[tuple[str, str, bool | None]]:
    """Issue 11: the uncertainty outputs add at most 10% to the compiled latency (batch 1 and 1024)."""
    return [
        (
            f"[{label}] batch {bs}, compiled: with uncertainty outputs / without <= {UNCERTAINTY_LIMIT:.2f}",
            f"{ratio:.2f}",
            ratio <= UNCERTAINTY_LIMIT,
        )
        for label, bs, _, _, ratio in _uncertainty_costs(res)
    ]


def _uncertainty_report(record: dict) -> str:
    rows = [
        [backend, label, bs, f"{plain:.3f}", f"{with_outputs:.3f}", f"{ratio:.2f}", _common.verdict(ok)]
        for backend, res in record["backends"].items()
        for (label, bs, plain, with_outputs, ratio), (_, _, ok) in zip(
            _uncertainty_costs(res), _uncertainty_targets(res), strict=True
        )
    ]
    if not rows:
        return ""
    return "\n".join(
        [
            "The uncertainty outputs' cost: `build_ensemble(d, uncertainty=True)` (outputs predictions, entropy, "
            "mutual_information, disagreement) vs the same graph without them, compiled path "
            "(`predict_on_batch`), timed side by side in interleaved rounds; target: with / without <= "
            f"{UNCERTAINTY_LIMIT:.2f} (issue 11):\n",
            _common.markdown_table(
                [
                    "backend",
                    "graph",
                    "batch",
                    "without (ms)",
                    "with uncertainty (ms)",
                    "with / without",
                    "verdict",
                ],
                rows,
            ),
        ]
    )


def _report(record: dict) -> str:
    lines = []
    timing_rows, ratio_rows, target_rows, builder_rows, memory_rows = [], [], [], [], []
    for backend, res in record["backends"].items():
        for bs, tm in res["timings_ms"].items():
            med = tm["median_ms"]

            def ms(key, digits, med=med):
                return "n/a" if key not in med else f"{med[key]:.{digits}f}"

            timing_rows.append(
                [
                    backend,
                    bs,
                    ms("ensemble.predict", 2),
                    ms("fused.predict", 2),
                    ms("loop.predict", 2),
                    ms("member.predict", 2),
                    ms("ensemble.compiled", 3),
                    ms("fused.compiled", 3),
                    ms("loop.compiled", 3),
                    ms("member.compiled", 3),
                    ms("ensemble.serving_default", 3),
                    ms("fused.serving_default", 3),
                ]
            )
            for graph, label in GRAPHS.items():
                sd = med.get(f"{graph}.serving_default")
                ratio_rows.append(
                    [
                        backend,
                        label,
                        bs,
                        f"{med['loop.predict'] / med[f'{graph}.predict']:.2f}",
                        f"{med['loop.compiled'] / med[f'{graph}.compiled']:.2f}",
                        f"{med[f'{graph}.compiled'] / med['member.compiled']:.2f}",
                        f"{med[f'{graph}.compiled'] / (M * med['member.compiled']):.2f}",
                        "n/a" if sd is None else f"{sd / med[f'{graph}.compiled']:.2f}",
                    ]
                )
        for name, value, ok in _targets(backend, res):
            target_rows.append([backend, name, value, _common.verdict(ok)])
        b = res["builder"]
        builder_rows.append(
            [
                backend,
                f"{b['build_s']:.2f}",
                f"{b['load_m_files_s']:.2f}",
                f"{b['build_over_load']:.2f}",
                b["load_model_calls"],
                b["max_loads_per_file"],
                b["max_zip_opens_per_file"],
            ]
        )
        if res.get("memory"):
            mem = res["memory"]
            member, ensemble, fused, loop = (
                mem[k]["delta_kib"] / 1024 for k in ("member", "ensemble", "fused", "loop")
            )
            memory_rows.append(
                [
                    backend,
                    f"{member:.1f}",
                    f"{M * member:.1f}",
                    f"{ensemble:.1f}",
                    f"{ensemble / (M * member):.2f}",
                    f"{fused:.1f}",
                    f"{fused / (M * member):.2f}",
                    f"{loop:.1f}",
                ]
            )
    lines += [
        "Latency per call, milliseconds (median over interleaved rounds; one call = one request of the "
        "batch size; ensemble = the branch graph, fused = `fuse=True`):\n",
        _common.markdown_table(
            [
                "backend",
                "batch",
                "ensemble predict",
                "fused predict",
                "loop predict",
                "member predict",
                "ensemble compiled",
                "fused compiled",
                "loop compiled",
                "member compiled",
                "ensemble serving_default",
                "fused serving_default",
            ],
            timing_rows,
        ),
        "\nRatios (like with like):\n",
        _common.markdown_table(
            [
                "backend",
                "graph",
                "batch",
                "loop/ensemble (predict)",
                "loop/ensemble (compiled)",
                "ensemble/member (compiled)",
                f"ensemble/({M} x member) (compiled)",
                "serving_default/compiled",
            ],
            ratio_rows,
        ),
        "\nTargets:\n",
        _common.markdown_table(["backend", "target", "value", "verdict"], target_rows),
        f"\nBuilder (`build_ensemble(directory)` with M={M}, vs loading the M files one by one; loads counted "
        "by wrapping `keras.saving.load_model` and `zipfile.ZipFile`):\n",
        _common.markdown_table(
            [
                "backend",
                "build (s)",
                "load M files (s)",
                "build/load",
                "load_model calls",
                "max loads per file",
                "max zip opens per file",
            ],
            builder_rows,
        ),
    ]
    table = _uncertainty_report(record)
    if table:
        lines += ["", table]
    agreement = [
        f"- {backend}: " + ", ".join(f"{what} {diff:.1e}" for what, diff in differences.items())
        for backend, res in record["backends"].items()
        if (differences := res.get("max_abs_difference_from_mean"))
    ]
    if agreement:
        lines += [
            "\nLargest |difference| from the mean of the members' own outputs (batch 32):\n",
            *agreement,
        ]
    if memory_rows:
        lines += [
            "\nPeak memory above the post-import size (fresh process each; load or build, then predict_on_batch "
            "and predict at batch 1024), MiB:\n",
            _common.markdown_table(
                [
                    "backend",
                    "one member",
                    f"{M} x one member",
                    "ensemble (build + run)",
                    f"ensemble / ({M} x member)",
                    "fused (build + run)",
                    f"fused / ({M} x member)",
                    "peers' loop",
                ],
                memory_rows,
            ),
        ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", default=",".join(_common.BACKENDS), help="comma-separated")
    parser.add_argument(
        "--rounds", type=int, default=0, help="interleaved rounds per batch size (default 15/15/7)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: one round, no memory processes")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    parser.add_argument(
        "--uncertainty-only",
        action="store_true",
        help="time only the graphs with and without uncertainty outputs (compiled path, batch 1 and 1024)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="compute threads per backend process (default 1, as in overhead.py; 0 = the backend's default)",
    )
    parser.add_argument("--out", default=str(_common.RESULTS_DIR), help="results folder ('' to skip writing)")
    parser.add_argument(
        "--name", default=None, help="results file stem (default: inference[-backends][-quick])"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result-json", help=argparse.SUPPRESS)
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    parser.add_argument("--paths", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick or args.uncertainty_only:
        args.no_memory = True

    if args.memory_worker:
        print(json.dumps(_memory_worker(args)))
        return 0
    if args.worker:
        result = _worker(args)
        Path(args.result_json).write_text(json.dumps(result))
        return 0

    backends, record = _common.start_record(parser, args, "inference", members=M)
    forwarded = ["--rounds", str(args.rounds), "--threads", str(args.threads)]
    forwarded += (["--quick"] if args.quick else []) + (["--no-memory"] if args.no_memory else [])
    forwarded += ["--uncertainty-only"] if args.uncertainty_only else []
    started = time.perf_counter()
    for backend in backends:
        record["backends"][backend] = _common.run_worker(
            Path(__file__).resolve(), backend, forwarded, threads=args.threads
        )
    record["seconds"] = round(time.perf_counter() - started, 1)
    record["loadavg_at_end"] = _common.loadavg()
    if args.uncertainty_only:
        record["failed_targets"] = [
            f"{b}: {name}"
            for b, res in record["backends"].items()
            for name, _, ok in _uncertainty_targets(res)
            if ok is False
        ]
        markdown = (
            _common.report_header(
                "# The uncertainty outputs' cost (inference.py --uncertainty-only)",
                record,
                args.quick,
                args.threads,
            )
            + f"- members: M={M} snapshots of a {MODEL_DESCRIPTION}, written by a real SnapshotCallback run; "
            "random inputs\n- only the four compiled-path cases below were timed (the full run times every "
            f"graph and path)\n\n{_uncertainty_report(record)}\n"
        )
        _common.publish(markdown, record, args, "inference-uncertainty", backends)
        return 0
    record["failed_targets"] = [
        f"{b}: {name}"
        for b, res in record["backends"].items()
        for name, _, ok in _targets(b, res) + _uncertainty_targets(res)
        if ok is False
    ]
    markdown = (
        _common.report_header("# Ensemble inference and builder", record, args.quick, args.threads)
        + f"- members: M={M} snapshots of a {MODEL_DESCRIPTION}, written by a real SnapshotCallback run; "
        f"random inputs\n\n{_report(record)}\n"
    )
    _common.publish(markdown, record, args, "inference", backends)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
