"""One model from one run: SWA vs the single model, and snapshot ensembles with uniform, fitted and greedy
weights, on the reduced CPU protocol of benchmarks/results/accuracy.cpu.md.

Rows (Fashion-MNIST subset, the BatchNorm CNN of examples/training.py, batch 64, SGD + Nesterov 0.9):

- single model (`single`): the step schedule (rate 0.1, x0.1 at 50 % and 75 % of the steps), `--epochs` epochs;
- SWA, library defaults (`swa_defaults`): the single model's run with
  `StochasticWeightAveraging(bn_data=x_train)` and no other argument: averaging from 75 % of the epochs at
  every epoch end, the rate left to the step schedule (so 0.001 during the averaging), BatchNorm statistics
  recomputed on the training images;
- SWA, tuned, at the same budget (`swa_1x`): rate 0.1, x0.1 at 50 % (a LearningRateScheduler, per epoch),
  then from epoch int(0.75 * epochs) a constant SWA rate (`--swa-rate`, annealing_epochs=0), averaged at
  every epoch end, BatchNorm statistics recomputed on the training images;
- SWA, tuned, at 1.25x the budget (`swa_1.25x`): the same first 75 % of `--epochs`, then a SWA phase
  1.25x - 0.75 = 50 % of the budget long;
- snapshot ensemble (`snapshot`, M = `--cycles`, alpha0 = 0.2): uniform mean, weights fitted on the
  validation split (fit_ensemble_weights), greedy selection on the validation split (greedy_selection).
  Serving: M passes. The snapshots are kept in `--snapshot-dir`/seed<k> for the student;
- distilled student (`distill`): `keras_snapshot.distill(snapshot_dir, x_train)` with distill's defaults (the
  snapshot run's epochs) on that seed's kept snapshots (skipped when they are not there). Serving: 1 pass;
  training: the snapshot run plus the student's epochs.

Weights and selections use the validation split only; the test set is only reported.

    python benchmarks/swa.py --train-size 12000 --epochs 30 --cycles 5 --seeds 0 1 --width 8 --name swa.cpu

Each finished run is appended to benchmarks/results/<name>.runs.jsonl (a rerun skips runs already there),
then the report <name>.md/.json is written from all records.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "examples"))
import _common  # noqa: E402

# Run order within a seed: the defaults first (what a user gets), the tuned SWA rows after the ensemble.
FULL_TRAIN = 54000  # Fashion-MNIST's 60,000 training images less the 10 % validation split
METHODS = ("single", "swa_defaults", "snapshot", "swa_1x", "swa_1.25x", "distill")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-size", type=int, default=12000)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--cycles", type=int, default=5)
    parser.add_argument("--alpha0", type=float, default=0.2, help="snapshot ensemble's alpha0")
    parser.add_argument("--swa-rate", type=float, default=0.01, help="the constant rate of the SWA phase")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        default=list(METHODS),
        help="which rows to run (in METHODS order)",
    )
    parser.add_argument(
        "--snapshot-dir",
        default=str(Path(tempfile.gettempdir()) / "swa-bench-snapshots"),
        help="where the snapshot run keeps its members (<dir>/<name>/seed<k>) for the distilled student",
    )
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--name", default="swa.cpu")
    parser.add_argument("--aggregate-only", action="store_true")
    parser.add_argument("--out", default=str(_common.RESULTS_DIR), help="where the records and the report go")
    parser.add_argument("--note", default="", help="a sentence for the report (e.g. seeds not run, and why)")
    return parser.parse_args(argv)


def nll(p, y) -> float:
    import numpy as np

    return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-7, None))))


def scores(p_val, p_test, data) -> dict:
    from training import error_rate

    return {
        "val_error": error_rate(p_val, data.y_val),
        "test_error": error_rate(p_test, data.y_test),
        "val_nll": nll(p_val, data.y_val),
        "test_nll": nll(p_test, data.y_test),
    }


def fit_swa(args, data, seed: int, model, swa, callbacks: list, epochs: int) -> tuple[dict, dict]:
    """Fits `model` with `callbacks` then the SWA callback; the scores of the average and of the run's last
    weights (`result["last_weights"]`), and the fit's history."""
    from training import build_cnn, predict_probabilities

    history = model.fit(
        data.x_train,
        data.y_train,
        batch_size=args.batch_size,
        epochs=epochs,
        shuffle=True,
        verbose=0,
        callbacks=[*callbacks, swa],
    )
    result = scores(predict_probabilities(model, data.x_val), predict_probabilities(model, data.x_test), data)
    last = build_cnn(data.input_shape, data.num_classes, width=args.width, seed=seed)
    last.set_weights(swa.final_weights)
    result["last_weights"] = scores(
        predict_probabilities(last, data.x_val), predict_probabilities(last, data.x_test), data
    )
    return result, history.history


def run_swa(args, data, seed: int, budget: float) -> dict:
    import keras
    from training import build_cnn, compile_sgd

    import keras_snapshot

    start = int(0.75 * args.epochs)
    epochs = round(budget * args.epochs)
    half = args.epochs // 2
    model = build_cnn(data.input_shape, data.num_classes, width=args.width, seed=seed)
    compile_sgd(model, 0.1)
    schedule = keras.callbacks.LearningRateScheduler(lambda epoch, rate: 0.1 if epoch < half else 0.01)
    swa = keras_snapshot.StochasticWeightAveraging(
        start_epoch=start, swa_learning_rate=args.swa_rate, annealing_epochs=0, bn_data=data.x_train
    )
    result, _ = fit_swa(args, data, seed, model, swa, [schedule], epochs)
    result.update(epochs=epochs, swa_start_epoch=start, averaged_points=swa.count, passes=1)
    return result


def run_swa_defaults(args, data, seed: int) -> dict:
    """The single model's run (train_single's recipe) with StochasticWeightAveraging(bn_data=x_train) only."""
    import math

    from training import EqualIntervalWeights, build_cnn, compile_sgd, step_schedule

    import keras_snapshot

    model = build_cnn(data.input_shape, data.num_classes, width=args.width, seed=seed)
    steps_per_epoch = math.ceil(len(data.x_train) / args.batch_size)
    compile_sgd(model, step_schedule(0.1, args.epochs * steps_per_epoch))
    swa = keras_snapshot.StochasticWeightAveraging(bn_data=data.x_train)  # the library's defaults
    # train_single's callbacks, plus the SWA callback
    result, _ = fit_swa(args, data, seed, model, swa, [EqualIntervalWeights(())], args.epochs)
    result.update(
        epochs=args.epochs,
        swa_start_epoch=int(0.75 * args.epochs),
        averaged_points=swa.count,
        passes=1,
        defaults={
            "start_epoch": swa.start_epoch,
            "swa_learning_rate": swa.swa_learning_rate,
            "annealing_epochs": swa.annealing_epochs,
            "average_every": swa.average_every,
        },
    )
    return result


def run_single(args, data, seed: int) -> dict:
    from training import build_cnn, predict_probabilities, train_single

    model = build_cnn(data.input_shape, data.num_classes, width=args.width, seed=seed)
    train_single(model, data, epochs=args.epochs, batch_size=args.batch_size, alpha0=0.1, verbose=0)
    result = scores(predict_probabilities(model, data.x_val), predict_probabilities(model, data.x_test), data)
    result.update(epochs=args.epochs, passes=1)
    return result


def run_snapshot(args, data, seed: int) -> dict:
    import numpy as np
    from training import build_cnn, load_snapshots, predict_probabilities, train_snapshots

    import keras_snapshot

    directory = snapshot_dir(args, seed)
    if directory.exists():
        shutil.rmtree(directory)  # a run cut off earlier: start afresh
    directory.parent.mkdir(parents=True, exist_ok=True)
    model = build_cnn(data.input_shape, data.num_classes, width=args.width, seed=seed)
    train_snapshots(
        model,
        data,
        directory,
        epochs=args.epochs,
        cycles=args.cycles,
        batch_size=args.batch_size,
        alpha0=args.alpha0,
        verbose=0,
    )
    members = load_snapshots(directory)
    val = np.stack([predict_probabilities(m, data.x_val) for m in members])
    test = np.stack([predict_probabilities(m, data.x_test) for m in members])
    fitted = keras_snapshot.fit_ensemble_weights(directory, (data.x_val, data.y_val))
    counts = keras_snapshot.greedy_selection(val, data.y_val)
    result = {"epochs": args.epochs, "passes": len(members)}
    for name, weights in (
        ("uniform", np.full(len(members), 1.0 / len(members))),
        ("fit", np.asarray(fitted)),
        ("greedy", counts / counts.sum()),
    ):
        result[name] = scores(np.tensordot(weights, val, axes=1), np.tensordot(weights, test, axes=1), data)
        result[name]["weights"] = [round(float(w), 4) for w in weights]
        result[name]["passes"] = int(np.count_nonzero(weights))
    result["greedy"]["counts"] = [int(c) for c in counts]
    result["members"] = [scores(v, t, data) for v, t in zip(val, test, strict=True)]
    return result


def snapshot_dir(args, seed: int) -> Path:
    return Path(args.snapshot_dir) / args.name / f"seed{seed}"


def run_distill(args, data, seed: int) -> dict | None:
    """distill with its defaults on the kept snapshots of this seed's snapshot run; None when they are gone."""
    import inspect

    import keras
    from training import predict_probabilities

    import keras_snapshot

    directory = snapshot_dir(args, seed)
    if not directory.exists() or not any(directory.glob("*.keras")):
        print(f"distill seed {seed}: no kept snapshots in {directory}, skipped", flush=True)
        return None
    keras.utils.set_random_seed(1000 + seed)
    student = keras_snapshot.distill(str(directory), data.x_train, verbose=0)  # no optional argument
    result = scores(
        predict_probabilities(student, data.x_val), predict_probabilities(student, data.x_test), data
    )
    defaults = inspect.signature(keras_snapshot.distill).parameters
    optimizer = student.optimizer
    result.update(
        epochs=args.epochs,
        distill_epochs=len(student.history.history["loss"]),
        passes=1,
        defaults={name: defaults[name].default for name in ("epochs", "batch_size", "temperature", "alpha")},
        optimizer=type(optimizer).__name__ if optimizer is not None else None,
    )
    return result


def records_path(args) -> Path:
    return Path(args.out) / f"{args.name}.runs.jsonl"


def read_records(args) -> list[dict]:
    path = records_path(args)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def mean_std(values) -> str:
    """Mean ± sample std (ddof=1) over seeds; the bare value for one seed."""
    import numpy as np

    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{values.mean():.2f} ± {values.std(ddof=1):.2f}"


def mean_std4(values) -> str:
    import numpy as np

    values = np.asarray(values, dtype=float)
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{values.mean():.4f} ± {values.std(ddof=1):.4f}"


SINGLE = "single model (step schedule)"
DERIVED = "= the SWA-defaults run's last weights (the same run until train end; `single` not run separately)"
DEFAULTS = "SWA, library defaults: the single model's run + StochasticWeightAveraging(bn_data=x_train)"
TUNED_1X = "SWA, tuned, same budget"
TUNED_125X = "SWA, tuned, 1.25x budget"
TUNED_CHANGES = (
    "changed from the defaults: the schedule before averaging (0.1, then 0.01 from 50 % of the epochs, per "
    "epoch), swa_learning_rate={rate} (default None: the rate left alone), annealing_epochs=0 (default 10), "
    "start_epoch={start} as an integer (the default 0.75 gives the same epoch at 1x, epoch {start125} at 1.25x)"
)


def verdict_line(label: str, single: dict, swa: dict) -> str:
    """Gain of an SWA row over the single model on their common seeds, against the seeds' spread."""
    import numpy as np

    seeds = sorted(set(single) & set(swa))
    if not seeds:
        return f"- {label} vs the single model: no common seed, no verdict."
    a = np.array([single[s]["test_error"] for s in seeds])
    b = np.array([swa[s]["test_error"] for s in seeds])
    gain = float(a.mean() - b.mean())
    per_seed = ", ".join(f"seed {s}: {g:+.2f}" for s, g in zip(seeds, a - b, strict=True))
    if len(seeds) < 2:
        return (
            f"- {label} vs the single model: test error gain {gain:+.2f} points on seed {seeds[0]} only: the "
            "seeds' spread needs 2 seeds, **no verdict**."
        )
    spread = float(a.std(ddof=1) + b.std(ddof=1))
    met = gain > spread
    return (
        f"- {label} vs the single model (seeds {', '.join(map(str, seeds))}): test error gain {gain:+.2f} points "
        f"({per_seed}); seeds' spread {spread:.2f} (the single model's sample std over seeds + this row's, "
        f"ddof=1): target (gain > spread) **{'MET' if met else 'NOT MET'}**."
    )


def own_last_weights_line(label: str, swa: dict) -> str:
    """Paired gain of an SWA row over the same run's last weights (the same run, the same machine)."""
    import numpy as np

    seeds = sorted(swa)
    gains = np.array([swa[s]["last_weights"]["test_error"] - swa[s]["test_error"] for s in seeds])
    nll = np.array([swa[s]["last_weights"]["val_nll"] - swa[s]["val_nll"] for s in seeds])
    per_seed = ", ".join(f"seed {s}: {g:+.2f}" for s, g in zip(seeds, gains, strict=True))
    std = f", sample std of the per-seed gains {gains.std(ddof=1):.2f}" if len(seeds) > 1 else ""
    return (
        f"  - paired with the same run's last weights: test error gain {gains.mean():+.2f} points ({per_seed}{std}); "
        f"validation NLL lowered on {int((nll > 0).sum())} of {len(seeds)} seeds."
    )


def report(args, records: list[dict], seconds: float) -> None:
    import numpy as np

    by = {}
    for record in records:
        by.setdefault(record["method"], {})[record["seed"]] = record["result"]
    rows, table = [], {}

    def add(label, results_by_seed, passes, budget):
        if not results_by_seed:
            return
        seeds = sorted(results_by_seed)
        results = [results_by_seed[s] for s in seeds]
        table[label] = {
            "seeds": seeds,
            "test_error": [r["test_error"] for r in results],
            "val_error": [r["val_error"] for r in results],
            "val_nll": [r["val_nll"] for r in results],
        }
        rows.append(
            [
                label,
                passes,
                budget,
                mean_std([r["val_error"] for r in results]),
                mean_std([r["test_error"] for r in results]),
                mean_std4([r["val_nll"] for r in results]),
                mean_std4([r["test_nll"] for r in results]),
                ", ".join(map(str, seeds)),
            ]
        )

    e = args.epochs
    start = int(0.75 * e)
    single = by.get("single", {})
    defaults = by.get("swa_defaults", {})
    derived = not single and bool(defaults)
    if derived:
        # The defaults run IS the single model's run until train end (same seed, schedule and callbacks; the
        # SWA callback only reads weights), so its last weights are the single model: one run gives both rows.
        single = {s: r["last_weights"] for s, r in defaults.items()}
    add(SINGLE + (f" {DERIVED}" if derived else ""), single, 1, f"{e} epochs (1x)")
    add(DEFAULTS, defaults, 1, f"{e} epochs (1x) + a BN pass")
    if not derived:
        add(
            "  the same run's last weights (before averaging: the single model's recipe)",
            {s: r["last_weights"] for s, r in defaults.items()},
            1,
            "1x",
        )
    swa1 = by.get("swa_1x", {})
    add(f"{TUNED_1X} (SWA rate {args.swa_rate} for the last 25 %)", swa1, 1, f"{e} epochs (1x) + a BN pass")
    add(
        "  the same run's last weights (before averaging)",
        {s: r["last_weights"] for s, r in swa1.items()},
        1,
        "1x",
    )
    swa125 = by.get("swa_1.25x", {})
    add(
        f"{TUNED_125X} (SWA rate {args.swa_rate} for epochs {start}-{round(1.25 * e) - 1})",
        swa125,
        1,
        f"{round(1.25 * e)} epochs (1.25x) + a BN pass",
    )
    snaps = by.get("snapshot", {})
    m = args.cycles
    for name, label in (
        ("uniform", "uniform"),
        ("fit", "fitted on validation"),
        ("greedy", "greedy selection"),
    ):
        results = {s: r[name] for s, r in snaps.items()}
        passes = "/".join(sorted({str(r["passes"]) for r in results.values()})) if results else m
        add(f"snapshot ensemble (M={m}), {label}", results, passes, f"{e} epochs (1x)")
    students = by.get("distill", {})
    if students:
        extra = sorted({r["distill_epochs"] for r in students.values()})
        # Records made before distill's default became the snapshot run's epochs (when it was 10) say so.
        call = "distill(snapshot_dir, x_train), distill's defaults"
        if extra != [e]:
            call = (
                f"distill(snapshot_dir, x_train, epochs={'/'.join(map(str, extra))}): distill's defaults when "
                f"recorded; today's default trains the snapshot run's {e} epochs"
            )
        add(
            f"distilled student: {call}",
            students,
            1,
            f"{e} + {'/'.join(map(str, extra))} epochs (the snapshot run + the student)",
        )
    header = ["model", "passes", "training", "val error %", "test error %", "val NLL", "test NLL", "seeds"]
    greedy_lines = [
        f"- seed {seed}: counts {r['greedy']['counts']}, fitted weights {r['fit']['weights']}"
        for seed, r in sorted(snaps.items())
    ]
    verdicts = []
    if single:
        candidates = [("SWA, library defaults (1x serving, same budget)", defaults)]
        tuned = [(f"{TUNED_1X} (1x serving)", swa1), (f"{TUNED_125X} (1x serving)", swa125)]
        tuned = [(label, results) for label, results in tuned if results]
        for label, results in candidates + tuned:
            if results:
                verdicts.append(verdict_line(label, single, results))
                verdicts.append(own_last_weights_line(label, results))
        if tuned:
            best = min(tuned, key=lambda item: np.mean([r["test_error"] for r in item[1].values()]))
            verdicts.append(
                f"- Best tuned row by mean test error (chosen on the test set, so for this report only): {best[0]}."
            )
    if snaps:
        seeds = sorted(snaps)
        never_worse = all(
            snaps[s]["greedy"]["val_nll"] <= snaps[s]["uniform"]["val_nll"] + 1e-12 for s in seeds
        )
        detail = "; ".join(
            f"seed {s}: val NLL greedy {snaps[s]['greedy']['val_nll']:.4f} vs uniform "
            f"{snaps[s]['uniform']['val_nll']:.4f}, test error greedy {snaps[s]['greedy']['test_error']:.2f} % vs "
            f"uniform {snaps[s]['uniform']['test_error']:.2f} %"
            for s in seeds
        )
        verdicts.append(
            f"- Greedy selection never worse than uniform on validation NLL: **{'MET' if never_worse else 'NOT MET'}** "
            f"({detail})."
        )
    if students and single:
        verdicts.append(
            verdict_line(
                "Distilled student (1x serving, the snapshot run + the student's epochs; the same rule as SWA's "
                "target)",
                single,
                students,
            )
        )
    if students and single and snaps:
        lines = []
        for s in sorted(set(students) & set(single) & set(snaps)):
            one, ens, stu = (
                single[s]["test_error"],
                snaps[s]["uniform"]["test_error"],
                students[s]["test_error"],
            )
            ratio = (
                f"{(one - stu) / (one - ens):.2f}"
                if one > ens
                else "n/a (the ensemble did not beat the single model)"
            )
            lines.append(
                f"seed {s}: single {one:.2f}, ensemble (uniform) {ens:.2f}, student {stu:.2f}, recovery "
                f"(single - student) / (single - ensemble) {ratio}"
            )
        if lines:
            verdicts.append("- Distilled student: " + "; ".join(lines) + ".")
    info = _common.machine()
    protocol = (
        "reduced CPU protocol, as benchmarks/results/accuracy.cpu.md"
        if args.train_size < FULL_TRAIN
        else "the reduced CPU protocol's model and epochs on the whole training split"
    )
    methods = "" if list(args.methods) == list(METHODS) else f" --methods {' '.join(args.methods)}"
    command = (
        f"KERAS_BACKEND=tensorflow python benchmarks/swa.py --train-size {args.train_size} --epochs {args.epochs} "
        f"--cycles {args.cycles} --seeds {' '.join(map(str, args.seeds))} --width {args.width} "
        f"--swa-rate {args.swa_rate} --name {args.name}{methods}"
    )
    markdown = "\n".join(
        [
            "# One model from one run: SWA, and snapshot ensembles with uniform / fitted / greedy weights",
            "",
            f"Command: `{command}`",
            "",
            *([f"**{args.note}**", ""] if args.note else []),
            f"Date: {_common.now()}; this invocation {seconds:.0f} s (records accumulate across invocations).",
            "",
            f"- machine: {info['cpu']}, nproc={info['nproc']}, {info['platform']}, Python {info['python']}; "
            "shared with other jobs, so the run times below are not a measure of cost",
            f"- versions: {', '.join(f'{k} {v}' for k, v in info['versions'].items())}; code: commit "
            f"{info.get('commit')} (of this report; each run's commit is in the runs list when recorded)",
            "- runs: "
            + "; ".join(
                f"{r['method']} seed {r['seed']} {r['seconds']:.0f} s (load {r['loadavg'][0] if r['loadavg'] else '?'}"
                + (f", commit {r['commit']}" if r.get("commit") else "")
                + ")"
                for r in records
            ),
            "",
            f"Protocol ({protocol}): Fashion-MNIST, {args.train_size} "
            f"training images, the validation split for weights/selection, the 10,000 test images reported; CNN "
            f"width {args.width}, batch {args.batch_size}, SGD + Nesterov 0.9, weight decay 5e-4. Single model: rate "
            f"0.1, x0.1 at 50 % and 75 % of the steps.",
            "",
            "- **SWA, library defaults** (the row the library's defaults give): the single model's run, same "
            "schedule, with `StochasticWeightAveraging(bn_data=x_train)` and no other argument. The defaults: "
            f"start_epoch=0.75 (int(0.75 * {e}) = epoch {start}, 0-based), swa_learning_rate=None (the callback "
            "leaves the rate to the step schedule, so the averaging runs at 0.1 x 0.01 = 0.001), annealing_epochs=10 "
            "and annealing_strategy='cos' (unused without a SWA rate), average_every='epoch' (at every epoch end "
            f"of epochs {start}-{e - 1}: {e - start} points), BatchNorm statistics recomputed on the training images.",
            *(
                [
                    f"- **SWA, tuned** (the rows labelled tuned; {TUNED_CHANGES.format(rate=args.swa_rate, start=start, start125=int(0.75 * round(1.25 * e)))}): "
                    f"rate 0.1, 0.01 from epoch {e // 2}, then from epoch {start} (0-based) the constant SWA rate "
                    f"{args.swa_rate}, averaged at every epoch end, BatchNorm statistics recomputed on the training images; "
                    f"the 1.25x row runs {round(1.25 * e)} epochs, its SWA phase epochs {start}-{round(1.25 * e) - 1}."
                ]
                if swa1 or swa125
                else []
            ),
            *(
                [
                    f"- Snapshot ensemble: M = {m}, alpha0 = {args.alpha0}; weights fitted (fit_ensemble_weights) and "
                    "greedy selection (greedy_selection, with replacement, on validation NLL) use the validation split."
                ]
                if snaps
                else []
            ),
            *(
                [
                    "- Distilled student: `keras_snapshot.distill(snapshot_dir, x_train)` on that seed's snapshots, with no "
                    "optional argument (distill's defaults: the snapshot run's epochs (10 before this release: the row says "
                    "which the records used), batch 64, T = 1, the teacher's optimizer cosine-decayed from its alpha0); "
                    "training = the snapshot run plus the student's epochs; seeds without kept snapshots have no student."
                ]
                if students
                else []
            ),
            "",
            "Errors in %, NLL in nats, mean ± sample std (ddof=1) over the seeds listed in the last column (the bare "
            "value for one seed). Passes = forward passes per prediction.",
            "",
            _common.markdown_table(header, rows),
            "",
            *verdicts,
            "",
            *(
                [
                    "Greedy selection counts (Caruana et al., 2004, on the validation split) and the fitted weights:",
                    "",
                ]
                if greedy_lines
                else []
            ),
            *greedy_lines,
        ]
    )
    out = {"command": command, "machine": info, "protocol": vars(args), "records": records, "summary": table}
    md, js = _common.write_results(args.name, Path(args.out), out, markdown)
    print(f"wrote {md} and {js}", flush=True)


RUNNERS = {
    "single": run_single,
    "swa_defaults": run_swa_defaults,
    "snapshot": run_snapshot,
    "swa_1x": lambda args, data, seed: run_swa(args, data, seed, 1.0),
    "swa_1.25x": lambda args, data, seed: run_swa(args, data, seed, 1.25),
    "distill": run_distill,
}


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    if not args.aggregate_only:
        from data import load_dataset

        data = load_dataset("fashion_mnist", train_size=args.train_size)
        done = {(r["method"], r["seed"]) for r in read_records(args)}
        for seed in args.seeds:
            for method in METHODS:
                if method not in args.methods or (method, seed) in done:
                    continue
                begin = time.perf_counter()
                print(f"{method} seed {seed}: started {_common.now()}", flush=True)
                result = RUNNERS[method](args, data, seed)
                if result is None:
                    continue
                record = {
                    "method": method,
                    "seed": seed,
                    "seconds": round(time.perf_counter() - begin, 1),
                    "loadavg": _common.loadavg(),
                    "commit": _common.machine().get("commit"),
                    "result": result,
                }
                records_path(args).parent.mkdir(parents=True, exist_ok=True)
                with open(records_path(args), "a") as handle:
                    handle.write(json.dumps(record) + "\n")
                print(
                    f"{method} seed {seed}: test error {result.get('test_error', '-')}, "
                    f"{record['seconds']} s",
                    flush=True,
                )
                report(args, read_records(args), time.perf_counter() - started)
    report(args, read_records(args), time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
