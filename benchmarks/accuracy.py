"""Accuracy benchmark: the paper's Table-1 protocol (Huang et al., ICLR 2017), scaled down, several seeds.

Methods, all with the same CNN, the same epoch budget B, batch 64 and SGD + Nesterov momentum 0.9:

- single model: rate 0.1, dropped x0.1 at 50% and 75% of the budget;
- NoCycle snapshot ensemble: that same run, snapshots at M equal intervals (softmax average);
- snapshot ensemble: M cosine cycles (keras_snapshot.SnapshotSchedule + SnapshotCallback) for every alpha0 in
  --alphas and every M in --cycles; the ensemble averages the softmax outputs of the M snapshots.

The single model and NoCycle come from one run per seed (the single model is its final state). Every
configuration reports validation and test error; the snapshot configuration (alpha0, M) is chosen on the
validation split only, never on the test set.

Then, per seed, an evaluation run on the selected configuration (keras_snapshot's own functions):

- calibration (keras_snapshot.evaluation.evaluate_ensemble): test NLL, ECE, Brier of the single model, NoCycle
  and the snapshot ensemble, before and after temperature scaling with T fitted on the validation split;
- selective prediction: test error of the 80% most certain test images, the ensemble ranked by its mutual
  information (build_ensemble(uncertainty=True)) or its max probability, the single model by its max probability;
- "distilled student (1x cost)": keras_snapshot.distill from the snapshot ensemble on the training inputs,
  --distill-epochs epochs, counted in the table, one row per --students variant: "defaults" is
  distill(teacher, x_train, epochs=E) with no optional argument (what a user gets), "labels" adds only
  y=y_train, "tuned" says what it changes (labels + the single model's SGD step schedule, or with
  --student-init snapshot a fine-tune of the last snapshot); each with its recovery ratio
  (single - student) / (single - ensemble) of test errors per seed, and its validation error;
- "weight average (1x cost)": keras_snapshot.average_weights (batch-norm statistics recomputed on the training
  inputs, guard measured on the validation split) of (a) the snapshot ensemble's snapshots and (b) same-basin
  snapshots: the single run's NoCycle snapshots after its first rate drop; whether the guard fired.

The targets of issues 11 and 12 are checked and printed MET / NOT MET. Snapshots stay on disk
(--snapshot-dir), so the evaluation can be re-run alone (--evaluate-only). Writes <name>.md, <name>.json
(aggregates) and <name>.runs.jsonl (one line per run) plus four pictures, <name>.lr_schedule.png,
<name>.ensemble_size.png, <name>.reliability.png and <name>.selective.png, into --output-dir.

    python benchmarks/accuracy.py --quick      # smoke test on digits (seconds of training), no accuracy claim

    # the committed results (benchmarks/results/accuracy.e24.*): full Fashion-MNIST, 24 epochs, M in {4, 6},
    # alpha0 in {0.1, 0.2}, 3 seeds, width 32 = the defaults; 15 runs in parallel on one GPU, about 4 minutes
    KERAS_BACKEND=jax python benchmarks/accuracy.py --jobs 15 --steps-per-execution 32 --name accuracy.e24

    # the reduced protocol of benchmarks/results/accuracy.cpu.* (cycles of 6 epochs; CNN width 8 so that a
    # shared 2-core CPU finishes it in about an hour, student included)
    python benchmarks/accuracy.py --train-size 12000 --epochs 30 --cycles 5 --alphas 0.2 --seeds 0 1 \
        --width 8 --jobs 4 --distill-epochs 30 --name accuracy.cpu --no-evaluate --snapshot-dir DIR
    # then the evaluation (calibration, weight averages, students) on those snapshots, as often as needed:
    python benchmarks/accuracy.py ... (the same protocol flags) --students defaults labels --evaluate-only \
        --snapshot-dir DIR

Settings that are not the protocol: --jobs, --steps-per-execution (in-graph schedules keep the learning rate
exact per step), --time-limit, --snapshot-dir. Runs share one accelerator, so no process pre-allocates its
memory; on a CPU, parallel runs split the cores between them (one thread pool each).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import threading
import time
import traceback
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
    "distill_epochs": 2,
    "students": ["defaults"],
}
QUICK_OUTPUT = ROOT / "build" / "benchmark-quick"
# The distilled students: the defaults first (what a user gets), then what changes in each other one.
STUDENTS = {
    "defaults": "distill(teacher, x_train, epochs=E): no optional argument",
    "labels": "distill(teacher, x_train, y=y_train, epochs=E): the defaults plus the labels",
    "tuned": "distill(..., y=y_train, optimizer=SGD + Nesterov with the single model's step schedule) "
    "(--student-init snapshot: from the last snapshot, rate 0.01 cosine-decayed)",
}
STUDENT_ROWS = {"defaults": "student", "labels": "student_labels", "tuned": "student_tuned"}


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
    parser.add_argument(
        "--distill-epochs",
        type=int,
        default=None,
        help="epochs of the distilled student, counted in its budget (default: --epochs, the single model's)",
    )
    parser.add_argument(
        "--students",
        nargs="+",
        default=["defaults", "labels"],
        choices=tuple(STUDENTS),
        help="distilled students to train: " + "; ".join(f"{k}: {v}" for k, v in STUDENTS.items()),
    )
    parser.add_argument(
        "--student-init",
        default="scratch",
        choices=("scratch", "snapshot"),
        help="the tuned student starts fresh (distill's default) or from the last snapshot's weights",
    )
    parser.add_argument(
        "--no-evaluate",
        action="store_true",
        help="train and report errors only (no calibration, student or weight average)",
    )
    parser.add_argument(
        "--evaluate-only",
        action="store_true",
        help="keep the training runs of <name>.runs.jsonl and their snapshots; redo the evaluation runs",
    )
    parser.add_argument(
        "--snapshot-dir",
        default=None,
        help="where the runs keep their snapshots (default: build/<name>.snapshots, or <output-dir>/"
        "<name>.snapshots when --output-dir is given)",
    )
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
    parser.add_argument(
        "--note", default="", help="a sentence for the report's header (e.g. why the protocol is reduced)"
    )
    parser.add_argument("--verbose", type=int, default=2, choices=(0, 2), help="2: a line per epoch")
    parser.add_argument("--run-one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    explicit_output = args.output_dir is not None
    args.output_dir = Path(
        args.output_dir or (QUICK_OUTPUT if args.quick else ROOT / "benchmarks" / "results")
    )
    if args.distill_epochs is None:
        args.distill_epochs = args.epochs
    if args.snapshot_dir is None:
        base = args.output_dir if explicit_output or args.quick else ROOT / "build"
        args.snapshot_dir = base / f"{args.name}.snapshots"
    args.snapshot_dir = Path(args.snapshot_dir)
    if args.distill_epochs < 1:
        parser.error("--distill-epochs must be >= 1")
    bad = [m for m in args.cycles if m < 1 or args.epochs % m]
    if bad:
        parser.error(
            f"every M in --cycles must divide --epochs={args.epochs} (cycles end on epoch ends); got {bad}"
        )
    if args.jobs < 1 or args.steps_per_execution < 1:
        parser.error("--jobs and --steps-per-execution must be >= 1")
    return args


# Flags that say how or where this invocation ran, not what was measured: left out of the recorded command.
PHASE_FLAGS = {"--resume": 0, "--aggregate-only": 0, "--evaluate-only": 0, "--snapshot-dir": 1, "--note": 1}


def protocol_argv(argv: list[str]) -> list[str]:
    out, skip = [], 0
    for item in argv:
        if skip:
            skip -= 1
            continue
        name = item.split("=", 1)[0]
        if name in PHASE_FLAGS:
            skip = PHASE_FLAGS[name] if "=" not in item else 0
            continue
        out.append(item)
    return out


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
    if task["method"] == "evaluate":
        part = f"-student_{task['part']}" if task.get("part") else ""  # a student trained in its own run
        return f"evaluate-{task['config']}{part}-seed{task['seed']}"
    return f"snapshot-a{task['alpha0']:g}-M{task['cycles']}-seed{task['seed']}"


def nocycle_file(args, seed: int, epoch: int) -> Path:
    """The single run's weights at the end of `epoch`, saved as a .keras file (a NoCycle snapshot)."""
    return args.snapshot_dir / f"step-seed{seed}" / f"epoch-{epoch:03d}.keras"


def nocycle_epochs(args, cycles: int) -> list[int]:
    return [args.epochs // cycles * k for k in range(1, cycles + 1)]


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
    if task["method"] == "evaluate":
        return run_evaluation(args, task, data)
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
            nocycle_file(args, task["seed"], epoch).parent.mkdir(parents=True, exist_ok=True)
            model.save(nocycle_file(args, task["seed"], epoch))
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
            epochs = nocycle_epochs(args, m)
            record["nocycle"][str(m)] = {
                "epochs": epochs,
                "val": ensemble_errors([probabilities[e][0] for e in epochs], data.y_val),
                "test": ensemble_errors([probabilities[e][1] for e in epochs], data.y_test),
            }
    else:
        directory = args.snapshot_dir / label
        if directory.exists():  # an earlier run of this task: start afresh
            shutil.rmtree(directory)
        history = train_snapshots(
            model,
            data,
            directory,
            cycles=task["cycles"],
            alpha0=task["alpha0"],
            in_graph=True,
            announce=False,
            verbose=args.verbose,
            label=label,
            **common,
        )
        trained = time.perf_counter()
        snapshots = load_snapshots(directory)
        record["val"] = ensemble_errors([predict_probabilities(s, data.x_val) for s in snapshots], data.y_val)
        record["test"] = ensemble_errors(
            [predict_probabilities(s, data.x_test) for s in snapshots], data.y_test
        )
    record["train_loss"] = history["loss"]
    record["seconds"] = {"train": trained - started, "total": time.perf_counter() - started}
    return record


def run_evaluation(args, task: dict, data) -> dict:
    """Calibration, selective prediction, distilled student and weight averages of one seed (see the module
    docstring), every number from keras_snapshot's functions. A part that fails is recorded as failed (with
    its error) and the others still run."""
    import keras
    from training import (
        COVERAGES,
        EpochLog,
        average_with_guard,
        calibration_row,
        error_rate,
        jsonable,
        predict_probabilities,
        reliability_bins,
        selective_errors,
        sgd,
        step_schedule,
    )

    seed = task["seed"]
    alpha0, cycles = task["alpha0"], task["cycles"]
    label = task_key(task)
    snapshot_dir = args.snapshot_dir / task_key(
        {"method": "snapshot", "alpha0": alpha0, "cycles": cycles, "seed": seed}
    )
    epochs = nocycle_epochs(args, cycles)
    nocycle = [nocycle_file(args, seed, e) for e in epochs]
    single = nocycle_file(args, seed, args.epochs)
    # Same basin: the single run's snapshots after its first rate drop (at least the last two).
    basin = [e for e in epochs if e > args.epochs / 2]
    basin = basin if len(basin) >= 2 else epochs[-2:]
    started = time.perf_counter()
    record = {
        "task": label,
        **task,
        "protocol": protocol_id(args),
        "backend": keras.backend.backend(),
        "distill_epochs": args.distill_epochs,
        "student_init": args.student_init,
        "same_basin_epochs": basin,
        "failed": {},
        "seconds": {},
    }

    def part(name, work):
        began = time.perf_counter()
        try:
            record[name] = work()
        except Exception as error:  # recorded: the other parts are still worth having
            traceback.print_exc()
            record["failed"][name] = f"{type(error).__name__}: {error}"
        record["seconds"][name] = time.perf_counter() - began
        print(f"{label} {name} done in {record['seconds'][name]:.0f}s", flush=True)

    def calibration():
        return {
            "single": calibration_row([str(single)], data),
            "nocycle": calibration_row([str(p) for p in nocycle], data),
            "snapshot": calibration_row(str(snapshot_dir), data),
        }

    def selective():
        from keras_snapshot.ensemble import build_ensemble

        served = build_ensemble(str(snapshot_dir), uncertainty=True).predict(
            data.x_test, batch_size=256, verbose=0
        )
        ensemble = np.asarray(served["predictions"], dtype=np.float64)
        information = np.asarray(served["mutual_information"], dtype=np.float64)
        alone = predict_probabilities(keras.saving.load_model(single, compile=False), data.x_test)
        curves = {
            "ensemble_mi": selective_errors(ensemble, data.y_test, information),
            "ensemble_maxprob": selective_errors(ensemble, data.y_test, -ensemble.max(axis=-1)),
            "single_maxprob": selective_errors(alone, data.y_test, -alone.max(axis=-1)),
        }
        return {
            "coverages": list(COVERAGES),
            "curves": curves,
            "at_80": {key: errors[COVERAGES.index(0.8)] for key, errors in curves.items()},
            "reliability": {
                "single": reliability_bins(alone, data.y_test),
                "snapshot": reliability_bins(ensemble, data.y_test),
            },
        }

    def student(variant):
        from keras_snapshot.distillation import distill

        keras.utils.set_random_seed(1000 + seed)
        log = [EpochLog(f"{label} student {variant}", args.distill_epochs)] if args.verbose == 2 else []
        if variant == "defaults":  # what a user gets: no optional argument (callbacks and verbose only log)
            trained = distill(
                str(snapshot_dir), data.x_train, epochs=args.distill_epochs, callbacks=log, verbose=0
            )
        elif variant == "labels":
            trained = distill(
                str(snapshot_dir),
                data.x_train,
                y=data.y_train,
                epochs=args.distill_epochs,
                callbacks=log,
                verbose=0,
            )
        else:
            steps = math.ceil(len(data.x_train) / args.batch_size) * args.distill_epochs
            if args.student_init == "snapshot":
                # The last snapshot, fine-tuned on the ensemble's probabilities at a small decaying rate.
                members = sorted(snapshot_dir.glob("*.keras"))
                model = keras.saving.load_model(members[-1], compile=False)
                rate = keras.optimizers.schedules.CosineDecay(STUDENT_FINE_TUNE_RATE, steps)
            else:
                model = None  # distill's default: a fresh copy of the members' architecture
                rate = step_schedule(args.single_alpha0, steps)  # the single model's recipe
            trained = distill(
                str(snapshot_dir),
                data.x_train,
                y=data.y_train,
                student=model,
                epochs=args.distill_epochs,
                batch_size=args.batch_size,
                optimizer=sgd(rate),
                callbacks=log,
                verbose=0,
            )
        optimizer = trained.optimizer
        return {
            "variant": variant,
            "recipe": STUDENTS[variant],
            "row": calibration_row([trained], data),
            "val_error_%": error_rate(predict_probabilities(trained, data.x_val), data.y_val),
            "optimizer": {
                "class": type(optimizer).__name__,
                "learning_rate": jsonable(optimizer.get_config()["learning_rate"]),
            },
            "epochs": args.distill_epochs,
            "init": args.student_init if variant == "tuned" else "scratch",
            **inspect_defaults(distill, ("temperature", "alpha")),
        }

    def averaging():
        out = {}
        for key, sources in (
            ("snapshot", str(snapshot_dir)),
            ("same_basin", [str(nocycle_file(args, seed, e)) for e in basin]),
        ):
            model, guard = average_with_guard(sources, data)
            out[key] = {"row": calibration_row([model], data), **guard}
        return out

    # With --jobs > 1 every student trains in its own run, in parallel with the seed's main run.
    variants = [task["part"]] if task.get("part") else args.students[: 1 if args.jobs == 1 else 0]
    if not task.get("part"):  # the main run of the seed; its other students run alone, in parallel
        part("calibration", calibration)
        part("selective", selective)
        part("averaging", averaging)
    record["students"] = {}
    for variant in variants:  # the longest parts last
        part(f"student_{variant}", lambda variant=variant: student(variant))
        if f"student_{variant}" in record:
            record["students"][variant] = record.pop(f"student_{variant}")
    record["seconds"]["total"] = time.perf_counter() - started
    return record


def inspect_defaults(function, names) -> dict:
    import inspect

    parameters = inspect.signature(function).parameters
    return {f"{name}_default": parameters[name].default for name in names if name in parameters}


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
    if args.jobs > 1:  # on a CPU, the runs split the cores instead of each oversubscribing all of them
        threads = str(max(1, (os.cpu_count() or 1) // args.jobs))
        for name in ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
            env.setdefault(name, threads)
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
            command += ["--snapshot-dir", str(args.snapshot_dir)]
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


def run_all(args, todo: list[dict], runs_path: Path, data) -> list[str]:
    """Runs `todo` in this process (--jobs 1) or in child processes; returns the keys of the failed ones."""
    if args.jobs > 1:
        return run_parallel(args, todo, runs_path)
    failed = []
    for number, task in enumerate(todo, 1):
        print(f"--- run {number}/{len(todo)}: {task_key(task)}", flush=True)
        append_record(runs_path, run_task(args, task, data))
    return failed


def result_config(key: str) -> dict:
    """{"alpha0", "cycles"} of a configuration key such as "snapshot-a0.2-M5"."""
    _, alpha, cycles = key.split("-")
    return {"alpha0": float(alpha[1:]), "cycles": int(cycles[1:])}


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
        result["evaluation"] = aggregate_evaluation(records, key)
    return result


STUDENT_FINE_TUNE_RATE = 0.01  # --student-init snapshot: cosine from this rate to 0 over --distill-epochs
CALIBRATION_METRICS = ("error_%", "nll", "ece", "brier", "temperature", "nll_ts", "ece_ts", "brier_ts")
EVALUATED = {
    "single": "single model (step schedule)",
    "nocycle": "NoCycle snapshot ensemble",
    "snapshot": "snapshot ensemble (selected)",
    "student": "distilled student (1x cost), defaults: distill(teacher, x_train, epochs=E)",
    "student_labels": "distilled student (1x cost), defaults + labels: distill(teacher, x_train, y=y_train, "
    "epochs=E)",
    "student_tuned": "distilled student (1x cost), tuned: labels + the single model's SGD step schedule",
    "average_snapshot": "weight average (1x cost), the snapshots",
    "average_same_basin": "weight average (1x cost), same basin",
}
SELECTIVE = {
    "ensemble_mi": "snapshot ensemble, ranked by mutual information",
    "ensemble_maxprob": "snapshot ensemble, ranked by max probability",
    "single_maxprob": "single model, ranked by max probability",
}


def evaluation_rows(record: dict) -> dict:
    """{EVALUATED key: metrics row} of one evaluation record (the parts that finished)."""
    rows = dict(record.get("calibration") or {})
    if record.get("student"):  # records before the student variants: one student
        rows["student"] = record["student"]["row"]
    for variant, value in (record.get("students") or {}).items():
        rows[STUDENT_ROWS[variant]] = value["row"]
    for key, value in (record.get("averaging") or {}).items():
        rows[f"average_{key}"] = value["row"]
    return rows


def aggregate_evaluation(records: list[dict], selected: str) -> dict | None:
    """Calibration, selective prediction, student and weight averages over seeds, and the targets of issues
    11 and 12 (MET / NOT MET)."""
    evals = sorted(
        (r for r in records if r["method"] == "evaluate" and r["config"] == selected), key=lambda r: r["seed"]
    )
    if not evals:
        return None
    per_seed = {}
    for r in evals:  # a seed's main evaluation run and its students' own runs
        per_seed.setdefault(r["seed"], {}).update(evaluation_rows(r))
    failed = {}
    for r in evals:
        if r["failed"]:
            failed.setdefault(str(r["seed"]), {}).update(r["failed"])
    students = {}
    for r in evals:
        for variant, value in (r.get("students") or {}).items():
            students.setdefault(variant, []).append(
                {"seed": r["seed"], **{k: v for k, v in value.items() if k != "row"}}
            )
    out = {
        "seeds": sorted(per_seed),
        "students": {variant: students[variant] for variant in STUDENTS if variant in students},
        "distill_epochs": evals[0]["distill_epochs"],
        "student_init": evals[0]["student_init"],
        "same_basin_epochs": evals[0]["same_basin_epochs"],
        "failed": failed,
        "rows": {},
    }
    for key in EVALUATED:
        rows = [rows[key] for rows in per_seed.values() if key in rows]
        if rows:
            out["rows"][key] = {m: summarise([row[m] for row in rows]) for m in CALIBRATION_METRICS}
    out["guard_fired"] = {
        key: [
            bool(r["averaging"][key]["guard_fired"])
            for r in evals
            if r.get("averaging") and key in r["averaging"]
        ]
        for key in ("snapshot", "same_basin")
    }
    selective = [r["selective"] for r in evals if r.get("selective")]
    if selective:
        curves = {key: np.array([s["curves"][key] for s in selective]) for key in SELECTIVE}
        out["selective"] = {
            "coverages": selective[0]["coverages"],
            "at_80": {key: summarise([s["at_80"][key] for s in selective]) for key in SELECTIVE},
            "curves": {
                key: {
                    "mean": c.mean(0).tolist(),
                    "std": c.std(0, ddof=1).tolist() if len(c) > 1 else None,
                }
                for key, c in curves.items()
            },
            "reliability": {
                key: {
                    field: np.sum([s["reliability"][key][field] for s in selective], axis=0).tolist()
                    for field in ("count", "confidence", "correct")
                }
                for key in ("single", "snapshot")
            },
        }
    out["targets"] = evaluation_targets(out, per_seed, [r for r in evals if r.get("selective")])
    return out


def evaluation_targets(out: dict, per_seed: dict, selective_records) -> dict:
    targets = {}
    rows = out["rows"]
    if "single" in rows and "snapshot" in rows:
        single, ensemble = rows["single"]["nll_ts"], rows["snapshot"]["nll_ts"]
        gap, spread = single["mean"] - ensemble["mean"], single["std"] + ensemble["std"]
        targets["ts_nll"] = {
            "rule": "mean TS-NLL(single) - mean TS-NLL(snapshot ensemble) > std(single) + std(ensemble)",
            "gap": gap,
            "spread": spread,
            "paired": [
                r["single"]["nll_ts"] - r["snapshot"]["nll_ts"]
                for r in per_seed.values()
                if "single" in r and "snapshot" in r
            ],
            "met": bool(gap > spread),
        }
    for key in STUDENT_ROWS.values():
        if {"single", "snapshot", key} <= rows.keys():
            targets[key] = student_target(rows, per_seed, key)
    if out.get("selective"):
        at = out["selective"]["at_80"]
        paired = [
            s["selective"]["at_80"]["single_maxprob"] - s["selective"]["at_80"]["ensemble_mi"]
            for s in selective_records
        ]
        targets["selective"] = {
            "rule": "at 80% coverage: error(ensemble ranked by mutual information) < error(single model ranked "
            "by max probability), means over seeds",
            "ensemble_mi": at["ensemble_mi"]["mean"],
            "ensemble_maxprob": at["ensemble_maxprob"]["mean"],
            "single_maxprob": at["single_maxprob"]["mean"],
            "paired": paired,
            "met": bool(at["ensemble_mi"]["mean"] < at["single_maxprob"]["mean"]),
        }
    return targets


def student_target(rows: dict, per_seed: dict, key: str) -> dict:
    """The recovery ratio (single - student) / (single - ensemble) of test errors, on the means and per seed."""
    seeds = []
    for seed, r in per_seed.items():
        if {"single", "snapshot", key} <= r.keys():
            single, ensemble, student = (r[k]["error_%"] for k in ("single", "snapshot", key))
            gain = single - ensemble
            seeds.append(
                {
                    "seed": seed,
                    "single": single,
                    "ensemble": ensemble,
                    "student": student,
                    "recovery": (single - student) / gain if gain > 0 else None,
                    "met": bool(gain > 0 and single - student >= 0.5 * gain),
                }
            )
    single, ensemble, student = (rows[k]["error_%"]["mean"] for k in ("single", "snapshot", key))
    gain = single - ensemble
    return {
        "rule": "error(single) - error(student) >= 0.5 * (error(single) - error(ensemble)), on the means "
        "over seeds (and per seed); undefined when the ensemble does not beat the single model",
        "ensemble_gain": gain,
        "student_gain": single - student,
        "recovery": (single - student) / gain if gain > 0 else None,
        "per_seed": seeds,
        "no_seed_worse_than_single": all(s["student"] <= s["single"] for s in seeds),
        "met": bool(gain > 0 and single - student >= 0.5 * gain),
    }


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


def fmt(summary: dict, digits: int = 2, scale: float = 1.0) -> str:
    mean, std = scale * summary["mean"], scale * summary["std"]
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if summary["n"] > 1 else f"{mean:.{digits}f}"


def verdict(met: bool) -> str:
    return "**MET**" if met else "**NOT MET**"


def evaluation_markdown(args, evaluation: dict, cycles: int, last_alone: float | None = None) -> list[str]:
    rows, epochs, extra = evaluation["rows"], args.epochs, evaluation["distill_epochs"]
    init = "from the last snapshot" if evaluation["student_init"] == "snapshot" else "from scratch"
    basin = evaluation["same_basin_epochs"]
    passes = {"nocycle": cycles, "snapshot": cycles}
    training = {
        "single": f"{epochs}",
        "nocycle": f"{epochs} (the single run)",
        "snapshot": f"{epochs}",
        "student": f"{epochs} + {extra} (student, from scratch)",
        "student_labels": f"{epochs} + {extra} (student, from scratch)",
        "student_tuned": f"{epochs} + {extra} (student, {init})",
        "average_snapshot": f"{epochs} (+ a batch-norm pass)",
        "average_same_basin": f"{epochs} (the single run; + a batch-norm pass)",
    }
    names = dict(
        EVALUATED, average_same_basin=f"weight average (1x cost), same basin: NoCycle epochs {basin}"
    )
    names["nocycle"] = f"NoCycle snapshot ensemble (M={cycles})"
    names["snapshot"] = f"snapshot ensemble (M={cycles}, selected)"
    seeds = len(evaluation["seeds"])
    lines = [
        f"## Calibration and cost on the test set ({seeds} seed(s), mean ± std)",
        "",
        "T fitted on the validation split for each model (never on the test set); (TS) = after temperature "
        "scaling. NLL in nats, ECE with 15 equal-width bins (%), Brier summed over classes. Passes = forward "
        "passes per prediction; training in epochs of the same CNN.",
        "",
        "| model | passes | training (epochs) | test error % | NLL | ECE % | Brier | T | NLL (TS) | ECE % (TS) | "
        "Brier (TS) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, row in rows.items():
        lines.append(
            f"| {names[key]} | {passes.get(key, 1)} | {training[key]} | {fmt(row['error_%'])} | "
            f"{fmt(row['nll'], 4)} | {fmt(row['ece'], 2, 100)} | {fmt(row['brier'], 4)} | "
            f"{fmt(row['temperature'], 3)} | {fmt(row['nll_ts'], 4)} | {fmt(row['ece_ts'], 2, 100)} | "
            f"{fmt(row['brier_ts'], 4)} |"
        )
    lines.append("")
    guard = evaluation["guard_fired"]
    for key, label in (("snapshot", "the snapshots"), ("same_basin", f"NoCycle epochs {basin}")):
        if guard.get(key):
            lines.append(
                f"- Weight average of {label}: the guard (AveragingWarning: worse than the best member on "
                f"validation) fired on {sum(guard[key])}/{len(guard[key])} seed(s)."
            )
    recipe = (
        "SGD + Nesterov with the single model's step schedule (rate 0.1, x0.1 at 50% and 75%)"
        if evaluation["student_init"] == "scratch"
        else f"SGD + Nesterov, rate {STUDENT_FINE_TUNE_RATE:g} cosine-decayed to 0"
    )
    alone = (
        f" The last snapshot alone, where the student started: {last_alone:.2f}% test error."
        if (last_alone is not None and evaluation["student_init"] == "snapshot")
        else ""
    )
    students = evaluation.get("students") or {}
    for variant, runs in students.items():
        first = runs[0]
        validation = ", ".join(f"seed {r['seed']}: {r['val_error_%']:.2f}%" for r in runs)
        rate = first["optimizer"]["learning_rate"]
        schedule = rate.get("class_name", "") if isinstance(rate, dict) else f"constant {rate}"
        config = rate.get("config", {}) if isinstance(rate, dict) else {}
        peak = f" from {config['initial_learning_rate']:g}" if "initial_learning_rate" in config else ""
        lines.append(
            f"- Student `{variant}`: {first['recipe']}; distill's defaults: temperature "
            f"{first.get('temperature_default')}, alpha {first.get('alpha_default')}; optimizer "
            f"{first['optimizer']['class']} ({schedule}{peak}); {extra} epochs; validation error {validation}."
            + (f" Tuned recipe: {recipe}.{alone}" if variant == "tuned" else "")
        )
    if "student" in rows and not students:  # records before the student variants
        lines.append(
            f"- Distilled student: keras_snapshot.distill from the selected ensemble's snapshots on the training "
            f"inputs with their labels (distill's default temperature and alpha), {extra} epochs {init}, {recipe}; "
            f"its budget counts the teacher's run.{alone}"
        )
    for seed, failed in evaluation["failed"].items():
        lines.append(f"- Seed {seed}: parts that failed: {failed}.")
    lines.append("")
    if evaluation.get("selective"):
        at = evaluation["selective"]["at_80"]
        lines += [
            "## Selective prediction: test error of the 80% most certain test images",
            "",
            "| ranking | error at 80% coverage (%) |",
            "|---|---|",
        ]
        lines += [f"| {SELECTIVE[key]} | {fmt(at[key])} |" for key in SELECTIVE]
        lines.append("")
    targets = evaluation["targets"]
    if targets:
        lines += ["## Targets (issues 11 and 12)", ""]
    if "ts_nll" in targets:
        t = targets["ts_nll"]
        lines.append(
            f"- Temperature-scaled NLL, snapshot ensemble below the single model by more than the summed seed "
            f"spread: {verdict(t['met'])}: gap {t['gap']:.4f} vs spread {t['spread']:.4f} (paired by seed: "
            + ", ".join(f"{g:+.4f}" for g in t["paired"])
            + ")."
        )
    for key, what in (
        ("student", "Distilled student with distill's defaults"),
        ("student_labels", "Distilled student, defaults + labels"),
        ("student_tuned", "Distilled student, tuned recipe"),
    ):
        if key not in targets:
            continue
        t = targets[key]
        ratio = "undefined (the ensemble did not beat the single model)"
        if t["recovery"] is not None:
            ratio = f"{t['recovery']:.2f}"
        per_seed = "; ".join(
            f"seed {s['seed']}: single {s['single']:.2f}, ensemble {s['ensemble']:.2f}, student "
            f"{s['student']:.2f}, recovery {'n/a' if s['recovery'] is None else format(s['recovery'], '.2f')} "
            f"({'met' if s['met'] else 'not met'})"
            for s in t["per_seed"]
        )
        worse = (
            "no seed worse than the single model"
            if t.get("no_seed_worse_than_single", True)
            else ("a seed WORSE than the single model")
        )
        lines.append(
            f"- {what} recovers at least half of the ensemble's test-error gain: {verdict(t['met'])}: "
            f"recovery ratio {ratio} (ensemble gain {t['ensemble_gain']:.2f} points, student gain "
            f"{t['student_gain']:.2f}; {worse}); {per_seed}."
        )
    if "selective" in targets:
        t = targets["selective"]
        lines.append(
            f"- At 80% coverage, the ensemble ranked by its mutual information errs less than the single model "
            f"ranked by its max probability: {verdict(t['met'])}: {t['ensemble_mi']:.2f}% vs "
            f"{t['single_maxprob']:.2f}% (the ensemble ranked by its max probability: "
            f"{t['ensemble_maxprob']:.2f}%; paired by seed, single - ensemble(MI): "
            + ", ".join(f"{g:+.2f}" for g in t["paired"])
            + ")."
        )
    lines.append("")
    return lines


def run_times(records: list[dict]) -> str:
    """How long the runs took (from their records, whichever invocation ran them)."""
    parts = []
    for what, method, key in (("training", None, "total"), ("evaluation", "evaluate", "total")):
        seconds = [
            r["seconds"][key]
            for r in records
            if (r["method"] == method if method else r["method"] != "evaluate")
            and key in r.get("seconds", {})
        ]
        if seconds:
            parts.append(f"{len(seconds)} {what} run(s) of {min(seconds):.0f}-{max(seconds):.0f} s")
    return ("Runs: " + "; ".join(parts) + ".") if parts else ""


def report_markdown(args, meta: dict, result: dict, records: list[dict] = ()) -> str:
    lines = [
        f"# Snapshot Ensembles accuracy benchmark ({args.dataset})",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}  ",
        f"Code: commit {meta['code'].get('commit') or '?'}"
        + (
            " with uncommitted changes in keras_snapshot/"
            if meta["code"].get("package_uncommitted_changes")
            else ""
        )
        + "  ",
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
    if args.note:
        lines += [f"**{args.note}**", ""]
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
        if result.get("evaluation"):
            alone = chosen["test_last_m"]["mean"][0]
            lines += evaluation_markdown(args, result["evaluation"], m, alone)
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
        f"Wall time of this invocation: {meta['wall_seconds']:.0f} s. {run_times(records)} Per-run times in "
        f"{args.name}.runs.jsonl.",
        "",
    ]
    return "\n".join(lines)


def draw(args, result: dict, records: list[dict], meta: dict) -> list[str]:
    from figures import (
        matplotlib_missing,
        plot_ensemble_size,
        plot_lr_schedule,
        plot_reliability,
        plot_selective,
    )
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
            args.output_dir / f"{args.name}.lr_schedule.png",
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
            args.output_dir / f"{args.name}.ensemble_size.png",
            curves,
            baselines=baselines,
            title=f"{args.dataset}, {args.epochs} epochs, {seeds} seeds: ensemble of the last m snapshots (mean ± std)",
        )
    )
    evaluation = result.get("evaluation") or {}
    selective = evaluation.get("selective")
    if selective:
        seeds = len(evaluation["seeds"])
        rows = evaluation["rows"]
        ece = {
            key: rows[key]["ece"]["mean"] if key in rows else float("nan") for key in ("single", "snapshot")
        }
        paths.append(
            plot_reliability(
                args.output_dir / f"{args.name}.reliability.png",
                {
                    "single model": (selective["reliability"]["single"], ece["single"]),
                    f"snapshot ensemble (M={m})": (selective["reliability"]["snapshot"], ece["snapshot"]),
                },
                title=f"{args.dataset} test set, {seeds} seed(s) pooled (before temperature scaling)",
            )
        )
        paths.append(
            plot_selective(
                args.output_dir / f"{args.name}.selective.png",
                selective["coverages"],
                {SELECTIVE[key]: (curve["mean"], curve["std"]) for key, curve in selective["curves"].items()},
                title=f"{args.dataset}: keep only the most certain test images (mean ± std over {seeds} seed(s))",
            )
        )
    return [str(p) for p in paths]


def code_state() -> dict:
    """The commit measured (benchmarks/_common.git_state), or an empty dict where it cannot be told."""
    try:
        from _common import git_state

        return git_state()
    except Exception:  # a description is not worth a crash
        return {}


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
    if args.aggregate_only or args.resume or args.evaluate_only:
        kept = read_records(runs_path)
        if args.evaluate_only:  # the training runs stay, their evaluation is redone
            kept = [r for r in kept if r["method"] != "evaluate"]
            runs_path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        done = {r["task"] for r in kept if r["protocol"] == pid}
    else:
        done = set()
        if runs_path.exists():
            runs_path.unlink()
    todo = [t for t in all_tasks if task_key(t) not in done]
    print(f"Keras {keras.__version__}, backend {keras.backend.backend()}; {data.describe()}", flush=True)
    print(
        f"{len(all_tasks)} training runs ({len(todo)} to do), {args.jobs} at a time; results in "
        f"{args.output_dir}, snapshots in {args.snapshot_dir}",
        flush=True,
    )

    failed = []
    if todo and not (args.aggregate_only or args.evaluate_only):
        failed += run_all(args, todo, runs_path, data)

    records = [r for r in read_records(runs_path) if r["protocol"] == pid]
    evaluations = []
    if not (args.aggregate_only or args.no_evaluate):
        selected = aggregate(args, records)["selected"]
        if selected:
            config = result_config(selected["config"])
            done = {r["task"] for r in records if r["method"] == "evaluate"}
            evaluations = [
                {"method": "evaluate", "config": selected["config"], "seed": r["seed"], **config}
                | ({"part": part} if part else {})
                for r in records
                if r["method"] == "snapshot"
                and task_key(r) == f"{selected['config']}-seed{r['seed']}"
                and any(s["method"] == "step" and s["seed"] == r["seed"] for s in records)
                # with --jobs 1 the first student runs in the seed's main run
                for part in [None, *args.students[1 if args.jobs == 1 else 0 :]]
            ]
            evaluations = [t for t in evaluations if task_key(t) not in done]
            print(
                f"Evaluation of {selected['config']} (selected on validation): {len(evaluations)} seed(s)",
                flush=True,
            )
            failed += run_all(args, evaluations, runs_path, data)
        records = [r for r in read_records(runs_path) if r["protocol"] == pid]
    finished = {r["task"] for r in records}
    command = shlex.join(["python", "benchmarks/accuracy.py", *protocol_argv(args.argv)])
    backend = keras.backend.backend()
    meta = {
        "command": f"KERAS_BACKEND={backend} {command}",
        "machine": args.machine or describe_machine(),
        "code": code_state(),
        "software": f"Python {platform.python_version()}, Keras {keras.__version__} ({backend} backend), numpy {np.__version__}",
        "data": data.describe(),
        "parameters": records[0]["parameters"] if records else 0,
        "weight_decay": WEIGHT_DECAY,
        "steps_per_epoch": math.ceil(len(data.x_train) / args.batch_size),
        "missing": sorted(task_key(t) for t in all_tasks if task_key(t) not in finished),
        "failed": failed,
        "wall_seconds": time.perf_counter() - started,
        "protocol": protocol(args)
        | {
            "seeds": args.seeds,
            "steps_per_execution": args.steps_per_execution,
            "distill_epochs": args.distill_epochs,
            "student_init": args.student_init,
            "students": args.students,
        },
        "invocation": shlex.join(["python", "benchmarks/accuracy.py", *args.argv]),
    }
    result = aggregate(args, records)
    meta["pictures"] = draw(args, result, records, meta)
    (args.output_dir / f"{args.name}.json").write_text(json.dumps({"meta": meta, **result}, indent=2) + "\n")
    markdown = report_markdown(args, meta, result, records)
    (args.output_dir / f"{args.name}.md").write_text(markdown)
    print("\n" + markdown, flush=True)
    for path in meta["pictures"]:
        print(f"Saved {path}", flush=True)
    return 1 if meta["missing"] and not args.time_limit else 0


if __name__ == "__main__":
    sys.exit(main())
