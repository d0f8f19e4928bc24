"""Accuracy benchmark: the paper's Table-1 protocol (Huang et al., ICLR 2017), scaled down, several seeds.

Methods, all with the same CNN, the same epoch budget B, batch 64 and SGD + Nesterov momentum 0.9:

- single model: rate 0.1, dropped x0.1 at 50% and 75% of the budget;
- NoCycle snapshot ensemble: that same run, snapshots at M equal intervals (softmax average);
- snapshot ensemble: M cosine cycles (keras_snapshot.SnapshotSchedule + SnapshotCallback) for every alpha0 in
  --alphas and every M in --cycles; the ensemble averages the softmax outputs of the M snapshots.

The single model and NoCycle come from one run per seed (the single model is its final state). Every
configuration reports validation and test error; the snapshot configuration (alpha0, M) is chosen on the
validation split only, never on the test set. Writes <name>.md, <name>.json (aggregates) and
<name>.runs.jsonl (one line per run) plus lr_schedule.png and ensemble_size.png into --output-dir.

    python benchmarks/accuracy.py --quick      # smoke test on digits (seconds of training), no accuracy claim

    # the committed results (benchmarks/results/accuracy.e24.*): full Fashion-MNIST, 24 epochs, M in {4, 6},
    # alpha0 in {0.1, 0.2}, 3 seeds, width 32 = the defaults; 15 runs in parallel on one GPU, about 4 minutes
    KERAS_BACKEND=jax python benchmarks/accuracy.py --jobs 15 --steps-per-execution 32 --name accuracy.e24

    # a reduced protocol that a 2-core CPU finishes in well under an hour (cycles of 6 epochs)
    python benchmarks/accuracy.py --train-size 12000 --epochs 30 --cycles 5 --seeds 0 1 --width 16

Settings that are not the protocol: --jobs, --steps-per-execution (in-graph schedules keep the learning rate
exact per step), --time-limit. Runs share one accelerator, so no process pre-allocates its memory.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Runs share one accelerator: no process may grab most of its memory up front (JAX and TF both would).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

import numpy as np  # noqa: E402

QUICK = {
    "dataset": "digits",
    "train_size": 0,
    "val_size": 200,
    "test_size": 0,
    "epochs": 4,
    "cycles": [2],
    "alphas": [0.2],  # each run costs a compile (slow on JAX/CPU); the selection is unit-tested on its own
    "seeds": [0],
    "width": 4,
    "batch_size": 64,
}
QUICK_OUTPUT = ROOT / "build" / "benchmark-quick"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Snapshot Ensembles vs a single model and NoCycle on the same budget (paper, Table 1).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"smoke test: {QUICK}; writes to build/benchmark-quick/"
    )
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST idx .gz files")
    parser.add_argument("--train-size", type=int, default=0, help="training images (0: all but validation)")
    parser.add_argument(
        "--val-size", type=int, default=6000, help="validation images split off the training data"
    )
    parser.add_argument("--test-size", type=int, default=0, help="test images (0: all)")
    parser.add_argument("--epochs", type=int, default=24, help="budget B (epochs) of every run")
    parser.add_argument("--cycles", type=int, nargs="+", default=[4, 6], help="candidate M (snapshot cycles)")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.1, 0.2], help="candidate alpha0")
    parser.add_argument("--single-alpha0", type=float, default=0.1)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--width", type=int, default=32, help="CNN width (filters of the first convolutions)")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel, each in its own process")
    parser.add_argument(
        "--steps-per-execution", type=int, default=1, help="training steps per compiled call (not torch)"
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        default=0,
        help="seconds; stop unfinished runs then and report what finished (0: none)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the finished runs of <name>.runs.jsonl and run only the rest",
    )
    parser.add_argument(
        "--aggregate-only", action="store_true", help="only rebuild the reports from <name>.runs.jsonl"
    )
    parser.add_argument(
        "--output-dir", default=None, help="default: benchmarks/results (build/benchmark-quick with --quick)"
    )
    parser.add_argument("--name", default="accuracy", help="file name stem of the reports")
    parser.add_argument(
        "--machine", default=None, help="describe the machine in the report (default: detected)"
    )
    parser.add_argument("--verbose", type=int, default=2, choices=(0, 2), help="2: a line per epoch")
    parser.add_argument("--run-one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    args.output_dir = Path(
        args.output_dir or (QUICK_OUTPUT if args.quick else ROOT / "benchmarks" / "results")
    )
    bad = [m for m in args.cycles if m < 1 or args.epochs % m]
    if bad:
        parser.error(
            f"every M in --cycles must divide --epochs={args.epochs} (cycles end on epoch ends); got {bad}"
        )
    if args.jobs < 1 or args.steps_per_execution < 1:
        parser.error("--jobs and --steps-per-execution must be >= 1")
    return args


def protocol(args) -> dict:
    keys = (
        "dataset",
        "train_size",
        "val_size",
        "test_size",
        "epochs",
        "cycles",
        "alphas",
        "single_alpha0",
        "batch_size",
        "width",
    )
    return {key: getattr(args, key) for key in keys}


def protocol_id(args) -> str:
    return hashlib.sha1(json.dumps(protocol(args), sort_keys=True).encode()).hexdigest()[:12]


def tasks(args) -> list[dict]:
    out = []
    for seed in args.seeds:
        out.append({"method": "step", "seed": seed})
        for cycles in args.cycles:
            for alpha0 in args.alphas:
                out.append({"method": "snapshot", "alpha0": alpha0, "cycles": cycles, "seed": seed})
    return out


def task_key(task: dict) -> str:
    if task["method"] == "step":
        return f"step-seed{task['seed']}"
    return f"snapshot-a{task['alpha0']:g}-M{task['cycles']}-seed{task['seed']}"


# ------------------------------------------------------------------------------------------------ one run
def run_task(args, task: dict, data=None) -> dict:
    """Trains one run and returns its record (errors of every snapshot and ensemble, val and test)."""
    import keras
    from data import load_dataset
    from training import (
        build_cnn,
        ensemble_errors,
        error_rate,
        load_snapshots,
        predict_probabilities,
        train_single,
        train_snapshots,
    )

    if data is None:
        data = load_data(args, load_dataset)
    label = task_key(task)
    started = time.perf_counter()
    model = build_cnn(data.input_shape, data.num_classes, width=args.width, seed=task["seed"])
    common = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "steps_per_execution": args.steps_per_execution,
    }
    record = {"task": label, **task, "protocol": protocol_id(args), "backend": keras.backend.backend()}
    record["parameters"] = model.count_params()
    if task["method"] == "step":
        keep = sorted({args.epochs // m * k for m in args.cycles for k in range(1, m + 1)})
        history, kept = train_single(
            model,
            data,
            alpha0=args.single_alpha0,
            keep_epochs=keep,
            verbose=args.verbose,
            label=label,
            **common,
        )
        trained = time.perf_counter()
        probabilities = {}
        for epoch, weights in kept.items():
            model.set_weights(weights)
            probabilities[epoch] = (
                predict_probabilities(model, data.x_val),
                predict_probabilities(model, data.x_test),
            )
        final = probabilities[args.epochs]
        record["single"] = {
            "val": error_rate(final[0], data.y_val),
            "test": error_rate(final[1], data.y_test),
        }
        record["nocycle"] = {}
        for m in args.cycles:
            epochs = [args.epochs // m * k for k in range(1, m + 1)]
            record["nocycle"][str(m)] = {
                "epochs": epochs,
                "val": ensemble_errors([probabilities[e][0] for e in epochs], data.y_val),
                "test": ensemble_errors([probabilities[e][1] for e in epochs], data.y_test),
            }
    else:
        with tempfile.TemporaryDirectory(prefix="snapshots-") as directory:
            history = train_snapshots(
                model,
                data,
                Path(directory) / "run",
                cycles=task["cycles"],
                alpha0=task["alpha0"],
                in_graph=True,
                announce=False,
                verbose=args.verbose,
                label=label,
                **common,
            )
            trained = time.perf_counter()
            snapshots = load_snapshots(Path(directory) / "run")
            record["val"] = ensemble_errors(
                [predict_probabilities(s, data.x_val) for s in snapshots], data.y_val
            )
            record["test"] = ensemble_errors(
                [predict_probabilities(s, data.x_test) for s in snapshots], data.y_test
            )
    record["train_loss"] = history["loss"]
    record["seconds"] = {"train": trained - started, "total": time.perf_counter() - started}
    return record


def load_data(args, load_dataset):
    return load_dataset(
        args.dataset,
        train_size=args.train_size or None,
        val_size=args.val_size,
        test_size=args.test_size or None,
        data_dir=args.data_dir,
    )


def append_record(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as handle:  # one write per line: safe with parallel runs
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------ driver
def run_parallel(args, todo: list[dict], runs_path: Path) -> list[str]:
    """Runs each task in its own process, `args.jobs` at a time; returns the keys of tasks that failed."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    deadline = time.monotonic() + args.time_limit if args.time_limit else None
    pending, running, failed = list(todo), {}, []
    lock = threading.Lock()

    def pump(key, process):
        for line in process.stdout:
            if not line.strip():
                continue
            with lock:
                print(line.rstrip() if line.startswith(key) else f"[{key}] {line.rstrip()}", flush=True)

    base = [sys.executable, str(Path(__file__).resolve()), *args.argv]
    while pending or running:
        while pending and len(running) < args.jobs:
            task = pending.pop(0)
            command = [*base, "--run-one", json.dumps(task), "--output-dir", str(args.output_dir)]
            process = subprocess.Popen(
                command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            thread = threading.Thread(target=pump, args=(task_key(task), process), daemon=True)
            thread.start()
            running[task_key(task)] = (process, thread)
        for key, (process, thread) in list(running.items()):
            if process.poll() is not None:
                thread.join()
                if process.returncode:
                    failed.append(key)
                    print(f"[{key}] FAILED with exit code {process.returncode}", flush=True)
                del running[key]
        if deadline and time.monotonic() > deadline:
            for key, (process, _) in running.items():
                process.kill()
                failed.append(key)
                print(f"[{key}] stopped at the --time-limit of {args.time_limit:g} s", flush=True)
            for task in pending:
                failed.append(task_key(task))
            break
        time.sleep(0.5)
    return failed


def mean_std(values) -> tuple[float, float]:
    values = np.asarray(values, dtype=float)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def summarise(values) -> dict:
    mean, std = mean_std(values)
    return {"mean": mean, "std": std, "n": len(values), "values": [float(v) for v in values]}


def aggregate(args, records: list[dict]) -> dict:
    """Means and spreads over seeds per configuration; the snapshot configuration picked on validation."""
    step = [r for r in records if r["method"] == "step"]
    snaps = [r for r in records if r["method"] == "snapshot"]
    result = {"configs": {}, "single": None, "selected": None}
    if step:
        result["single"] = {
            split: summarise([r["single"][split] for r in step]) for split in ("val", "test")
        } | {"seeds": [r["seed"] for r in step]}
    for m in args.cycles:
        runs = [r for r in step if str(m) in r.get("nocycle", {})]
        if runs:
            result["configs"][f"nocycle-M{m}"] = config_summary(
                [r["nocycle"][str(m)] for r in runs], runs, "nocycle", None, m
            )
        for alpha0 in args.alphas:
            runs = [r for r in snaps if r["cycles"] == m and math.isclose(r["alpha0"], alpha0)]
            if runs:
                result["configs"][f"snapshot-a{alpha0:g}-M{m}"] = config_summary(
                    runs, runs, "snapshot", alpha0, m
                )
    candidates = {k: c for k, c in result["configs"].items() if c["method"] == "snapshot"}
    if candidates:
        key = min(candidates, key=lambda k: (candidates[k]["val"]["mean"], k))
        result["selected"] = {
            "config": key,
            "by": "lowest mean validation error of the full ensemble (m = M)",
        }
        if result["single"]:
            best, single = candidates[key]["test"], result["single"]["test"]
            gain, spread = single["mean"] - best["mean"], single["std"] + best["std"]
            pairs = {r["seed"]: r["single"]["test"] for r in step}
            paired = [
                pairs[s] - v
                for s, v in zip(candidates[key]["seeds"], best["values"], strict=True)
                if s in pairs
            ]
            result["target"] = {
                "gain_points": gain,
                "spread_points": spread,
                "met": bool(gain > spread),
                "rule": "mean single-model test error - mean snapshot-ensemble test error > std(single) + std(ensemble)",
                "paired_gains": paired,
                "wins": f"{sum(g > 0 for g in paired)}/{len(paired)} seeds",
            }
    return result


def config_summary(parts, runs, method, alpha0, cycles) -> dict:
    """parts: dicts with val/test errors ({"members", "last_m"}); runs: the matching records (seeds)."""
    summary = {"method": method, "alpha0": alpha0, "cycles": cycles, "seeds": [r["seed"] for r in runs]}
    for split in ("val", "test"):
        summary[split] = summarise([p[split]["last_m"][-1] for p in parts])
        curves = np.array([p[split]["last_m"] for p in parts])
        members = np.array([p[split]["members"] for p in parts])
        summary[f"{split}_last_m"] = {
            "mean": curves.mean(0).tolist(),
            "std": curves.std(0, ddof=1).tolist() if len(parts) > 1 else [0.0] * curves.shape[1],
        }
        summary[f"{split}_members"] = {"mean": members.mean(0).tolist()}
    return summary


def fmt(summary: dict) -> str:
    return f"{summary['mean']:.2f} ± {summary['std']:.2f}" if summary["n"] > 1 else f"{summary['mean']:.2f}"


def report_markdown(args, meta: dict, result: dict) -> str:
    lines = [
        f"# Snapshot Ensembles accuracy benchmark ({args.dataset})",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}  ",
        f"Software: {meta['software']}  ",
        f"Data: {meta['data']}  ",
        f"Protocol: {args.epochs} epochs per run, batch {args.batch_size}, SGD + Nesterov 0.9, weight decay "
        f"{meta['weight_decay']:g}, CNN width {args.width} ({meta['parameters']:,} parameters); single model: rate "
        f"{args.single_alpha0:g}, x0.1 at 50% and 75%; NoCycle: that run, M snapshots at equal intervals; snapshot "
        f"ensembles: alpha0 in {args.alphas}, M in {args.cycles}. Seeds {args.seeds}. Errors in %, mean ± std "
        "(sample std over seeds). The snapshot configuration is chosen on the validation split; the test set is "
        "only reported.",
        "",
    ]
    if args.quick:
        lines += ["**Quick smoke test: tiny data and budget, no accuracy claim.**", ""]
    configs, single, selected = result["configs"], result["single"], result["selected"]
    if selected:
        chosen = configs[selected["config"]]
        m = chosen["cycles"]
        lines += [f"## Table 1 analogue (M = {m}, chosen on validation)", ""]
        lines += ["| method | val error | test error |", "|---|---|---|"]
        if single:
            lines.append(f"| single model (step schedule) | {fmt(single['val'])} | {fmt(single['test'])} |")
        if f"nocycle-M{m}" in configs:
            c = configs[f"nocycle-M{m}"]
            lines.append(f"| NoCycle snapshot ensemble (M={m}) | {fmt(c['val'])} | {fmt(c['test'])} |")
        for alpha0 in args.alphas:
            key = f"snapshot-a{alpha0:g}-M{m}"
            if key in configs:
                c = configs[key]
                mark = " (selected)" if key == selected["config"] else ""
                lines.append(
                    f"| snapshot ensemble, alpha0={alpha0:g}{mark} | {fmt(c['val'])} | {fmt(c['test'])} |"
                )
        lines.append("")
        if "target" in result:
            t = result["target"]
            verdict = "MET" if t["met"] else "NOT MET"
            lines += [
                f"Target ({t['rule']}): **{verdict}**: gain {t['gain_points']:.2f} points vs spread "
                f"{t['spread_points']:.2f}; the ensemble wins on {t['wins']} (paired by seed: "
                + ", ".join(f"{g:+.2f}" for g in t["paired_gains"])
                + ").",
                "",
            ]
        lines += [
            "## Every configuration",
            "",
            "| configuration | val error | test error | last snapshot alone (test) | seeds |",
            "|---|---|---|---|---|",
        ]
        for key, c in configs.items():
            alone = c["test_last_m"]["mean"][0]
            lines.append(f"| {key} | {fmt(c['val'])} | {fmt(c['test'])} | {alone:.2f} | {len(c['seeds'])} |")
        lines.append("")
        lines += [f"## Test error of the ensemble of the last m snapshots (mean over seeds, M = {m})", ""]
        shown = [k for k in configs if configs[k]["cycles"] == m]
        lines += ["| m | " + " | ".join(shown) + " |", "|---" * (len(shown) + 1) + "|"]
        for i in range(m):
            lines.append(
                f"| {i + 1} | "
                + " | ".join(f"{configs[k]['test_last_m']['mean'][i]:.2f}" for k in shown)
                + " |"
            )
        lines.append("")
    if meta.get("missing"):
        lines += [f"Runs that did not finish: {', '.join(meta['missing'])}.", ""]
    lines += [
        f"Wall time: {meta['wall_seconds']:.0f} s; per-run training times in {args.name}.runs.jsonl.",
        "",
    ]
    return "\n".join(lines)


def draw(args, result: dict, records: list[dict], meta: dict) -> list[str]:
    from figures import matplotlib_missing, plot_ensemble_size, plot_lr_schedule
    from training import step_learning_rate

    missing = matplotlib_missing()
    if missing:
        print(missing, flush=True)
        return []
    if not result["selected"]:
        return []
    chosen = result["configs"][result["selected"]["config"]]
    m, alpha0 = chosen["cycles"], chosen["alpha0"]
    steps_per_epoch = meta["steps_per_epoch"]
    total = args.epochs * steps_per_epoch
    seed = min(chosen["seeds"])
    losses = {}
    for r in records:
        if (
            r["seed"] == seed
            and r["method"] == "snapshot"
            and r["cycles"] == m
            and math.isclose(r["alpha0"], alpha0)
        ):
            losses[f"snapshot run (seed {seed})"] = r["train_loss"]
        if r["seed"] == seed and r["method"] == "step":
            losses[f"single model (seed {seed})"] = r["train_loss"]
    paths = [
        plot_lr_schedule(
            args.output_dir / "lr_schedule.png",
            epochs=args.epochs,
            steps_per_epoch=steps_per_epoch,
            cycles=m,
            alpha0=alpha0,
            single_alpha0=args.single_alpha0,
            single_rate=lambda t: step_learning_rate(t, alpha0=args.single_alpha0, total_steps=total),
            losses=losses,
            title=f"{args.dataset}: learning rate per iteration, M={m} snapshots marked",
        )
    ]
    curves = {}
    for c in result["configs"].values():
        if c["cycles"] == m:
            label = (
                f"NoCycle (M={m})"
                if c["method"] == "nocycle"
                else f"snapshot ensemble alpha0={c['alpha0']:g}"
            )
            curves[label] = (c["test_last_m"]["mean"], c["test_last_m"]["std"])
    single = result["single"]
    baselines = (
        {"single model, step schedule": (single["test"]["mean"], single["test"]["std"])} if single else {}
    )
    seeds = len(chosen["seeds"])
    paths.append(
        plot_ensemble_size(
            args.output_dir / "ensemble_size.png",
            curves,
            baselines=baselines,
            title=f"{args.dataset}, {args.epochs} epochs, {seeds} seeds: ensemble of the last m snapshots (mean ± std)",
        )
    )
    return [str(p) for p in paths]


def describe_machine() -> str:
    import keras

    cores = os.cpu_count()
    accelerator = "no accelerator"
    backend = keras.backend.backend()
    try:
        if backend == "jax":
            import jax

            devices = [d for d in jax.devices() if d.platform != "cpu"]
            if devices:
                accelerator = f"{len(devices)} x {devices[0].device_kind}"
        elif backend == "torch":
            import torch

            if torch.cuda.is_available():
                accelerator = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
        elif backend == "tensorflow":
            import tensorflow as tf

            gpus = tf.config.list_physical_devices("GPU")
            if gpus:
                accelerator = f"{len(gpus)} GPU(s)"
    except Exception:  # a description is not worth a crash
        pass
    return f"{platform.machine()}, {cores} CPU cores, {accelerator}"


def main(argv=None) -> int:
    args = parse_args(argv)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    runs_path = args.output_dir / f"{args.name}.runs.jsonl"

    if args.run_one:  # a child process of run_parallel
        record = run_task(args, json.loads(args.run_one))
        append_record(runs_path, record)
        return 0

    started = time.perf_counter()
    import keras
    from data import load_dataset
    from training import WEIGHT_DECAY

    data = load_data(args, load_dataset)
    pid = protocol_id(args)
    all_tasks = tasks(args)
    if args.aggregate_only or args.resume:
        done = {r["task"] for r in read_records(runs_path) if r["protocol"] == pid}
    else:
        done = set()
        if runs_path.exists():
            runs_path.unlink()
    todo = [t for t in all_tasks if task_key(t) not in done]
    print(f"Keras {keras.__version__}, backend {keras.backend.backend()}; {data.describe()}", flush=True)
    print(
        f"{len(all_tasks)} runs ({len(todo)} to do), {args.jobs} at a time; results in {args.output_dir}",
        flush=True,
    )

    failed = []
    if todo and not args.aggregate_only:
        if args.jobs == 1:
            for number, task in enumerate(todo, 1):
                print(f"--- run {number}/{len(todo)}: {task_key(task)}", flush=True)
                append_record(runs_path, run_task(args, task, data))
        else:
            failed = run_parallel(args, todo, runs_path)

    records = [r for r in read_records(runs_path) if r["protocol"] == pid]
    finished = {r["task"] for r in records}
    command = shlex.join(["python", "benchmarks/accuracy.py", *args.argv])
    backend = keras.backend.backend()
    meta = {
        "command": f"KERAS_BACKEND={backend} {command}",
        "machine": args.machine or describe_machine(),
        "software": f"Python {platform.python_version()}, Keras {keras.__version__} ({backend} backend), numpy {np.__version__}",
        "data": data.describe(),
        "parameters": records[0]["parameters"] if records else 0,
        "weight_decay": WEIGHT_DECAY,
        "steps_per_epoch": math.ceil(len(data.x_train) / args.batch_size),
        "missing": sorted(task_key(t) for t in all_tasks if task_key(t) not in finished),
        "failed": failed,
        "wall_seconds": time.perf_counter() - started,
        "protocol": protocol(args) | {"seeds": args.seeds, "steps_per_execution": args.steps_per_execution},
    }
    result = aggregate(args, records)
    meta["pictures"] = draw(args, result, records, meta)
    (args.output_dir / f"{args.name}.json").write_text(json.dumps({"meta": meta, **result}, indent=2) + "\n")
    markdown = report_markdown(args, meta, result)
    (args.output_dir / f"{args.name}.md").write_text(markdown)
    print("\n" + markdown, flush=True)
    for path in meta["pictures"]:
        print(f"Saved {path}", flush=True)
    return 1 if meta["missing"] and not args.time_limit else 0


if __name__ == "__main__":
    sys.exit(main())
