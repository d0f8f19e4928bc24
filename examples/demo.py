"""keras-snapshot demo: train 1, get M for free, serve one model.

Trains a small BatchNorm CNN with `SnapshotCallback` (M cosine cycles, a `.keras` snapshot per cycle), trains
the same CNN with the standard step schedule on the same epoch budget (its weights at M equal intervals are the
NoCycle baseline), builds the averaged ensemble as ONE Keras model, exports it for TensorFlow Serving and prints
the test error of every snapshot, of the ensemble of the last m = 1..M snapshots and of the single model. Then
the calibration table (NLL, ECE, Brier before and after temperature scaling fitted on the validation split) and
the two ways to serve at the cost of one model: a student distilled from the snapshots (a few epochs) and the
weight average (guarded on validation data), and out-of-distribution detection: how well each model's
uncertainty scores tell the test images from images unlike the training data (scikit-learn's digits for
28x28 data, shuffled-pixel test images otherwise; nothing is downloaded). Saves five pictures when matplotlib
is installed: the paper's Figures 2 and 3, a reliability diagram, a selective-prediction curve and OOD score
histograms. Writes the test split to test.npz so
that `keras-snapshot evaluate <output dir>/snapshots --data <output dir>/test.npz` can be run on it.

    make demo                                  # or: python examples/demo.py
    python examples/demo.py --epochs 30 --cycles 5 --train-size 0          # longer, full Fashion-MNIST
    python examples/demo.py --dataset cifar10 --width 32 --epochs 40 --cycles 5   # online: downloads CIFAR-10

Offline, the default dataset is Fashion-MNIST from the Debian package `dataset-fashion-mnist`; `--dataset
digits` needs nothing but scikit-learn. The default run (a 5,000-image subset, 20 epochs, M = 4) takes a few
minutes on 2 CPU cores. Everything goes into --output-dir (default demo-output/).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

sys.path.insert(0, str(Path(__file__).resolve().parent))

import keras
import numpy as np
from data import DATASETS, far_ood, load_dataset
from figures import (
    matplotlib_missing,
    plot_ensemble_size,
    plot_lr_schedule,
    plot_ood_histograms,
    plot_reliability,
    plot_selective,
)
from training import (
    COVERAGES,
    EpochLog,
    average_with_guard,
    build_cnn,
    calibration_row,
    load_snapshots,
    predict_probabilities,
    reliability_bins,
    rounded,
    selective_errors,
    sgd,
    step_learning_rate,
    train_single,
    train_snapshots,
)

import keras_snapshot
from keras_snapshot.distillation import distill
from keras_snapshot.ensemble import build_ensemble
from keras_snapshot.evaluation import evaluate_ensemble, mutual_information
from keras_snapshot.export import export_saved_model
from keras_snapshot.selective import ood_metrics


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Snapshot Ensembles demo: train once with M cycles, build and export the averaged model, "
        "compare with a single model trained on the same budget.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--dataset",
        default="fashion_mnist",
        choices=DATASETS,
        help="offline: fashion_mnist, digits, mnist5k; online: cifar10, cifar100, mnist",
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help="folder with the Fashion-MNIST idx .gz files (default: the Debian package's)",
    )
    parser.add_argument("--train-size", type=int, default=5000, help="training images used (0: all)")
    parser.add_argument(
        "--val-size", type=int, default=2000, help="validation images, split off the training data"
    )
    parser.add_argument("--test-size", type=int, default=0, help="test images used (0: the whole test set)")
    parser.add_argument("--epochs", type=int, default=20, help="the budget B, the same for both models")
    parser.add_argument("--cycles", type=int, default=4, help="M: cosine cycles = snapshots")
    parser.add_argument(
        "--alpha0", type=float, default=0.2, help="the snapshot schedule's restart learning rate"
    )
    parser.add_argument(
        "--single-alpha0",
        type=float,
        default=0.1,
        help="the single model's initial rate (x0.1 at 50%% and 75%%)",
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--width", type=int, default=16, help="CNN width: filters of the first convolutions")
    parser.add_argument(
        "--distill-epochs",
        type=int,
        default=3,
        help="epochs of the distilled student (its extra training budget, on top of the snapshot run's)",
    )
    parser.add_argument(
        "--student-init",
        default="snapshot",
        choices=("snapshot", "scratch", "defaults"),
        help="snapshot: the student starts from the last snapshot's weights (a short fine-tune on the ensemble's "
        "probabilities with the labels, SGD at 0.01 cosine-decayed: a tuned recipe, not distill's defaults, kept "
        "because the demo's budget is a few epochs); defaults: distill(snapshots, x_train, epochs=N) with no "
        "other argument (a fresh student: give it the snapshot run's budget, --distill-epochs = --epochs); "
        "scratch: a fresh student with labels and the single model's peak rate cosine-decayed",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="demo-output")
    parser.add_argument(
        "--verbose",
        type=int,
        default=2,
        choices=(0, 1, 2),
        help="0 quiet, 1 Keras progress bars, 2 a line per epoch",
    )
    args = parser.parse_args(argv)
    for name in ("epochs", "cycles", "batch_size", "width", "val_size", "distill_epochs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.train_size < 0 or args.test_size < 0:
        parser.error("--train-size and --test-size must be >= 0 (0: all)")
    if args.cycles > args.epochs:
        parser.error(
            "--cycles cannot exceed --epochs: each cycle should last at least an epoch (several are better)"
        )
    return args


def log(message: str = "") -> None:
    print(message, flush=True)


def check_saved_model(version_dir, sample: np.ndarray, expected: np.ndarray) -> str:
    """Runs the SavedModel's serving_default signature (what TF Serving calls) and compares with Keras."""
    try:
        import tensorflow as tf
    except ImportError:
        return "not checked: TensorFlow is not importable here"
    signature = tf.saved_model.load(str(version_dir)).signatures["serving_default"]
    (input_key,) = signature.structured_input_signature[1].keys()
    (served,) = (np.asarray(value) for value in signature(**{input_key: tf.constant(sample)}).values())
    gap = float(np.max(np.abs(served - expected)))
    return f"serving_default checked on {len(sample)} images: max |served - Keras| = {gap:.1e}"


def export_child(keras_file: str, export_dir: str, sample_file: str) -> None:
    """The torch backend's export, run in a TensorFlow-backend child process: prints the version folder."""
    model = keras.saving.load_model(keras_file)
    version_dir = export_saved_model(model, export_dir, overwrite=True)
    with np.load(sample_file) as arrays:
        print(f"{version_dir} ({check_saved_model(version_dir, arrays['sample'], arrays['expected'])})")


def export_for_serving(
    ensemble, keras_file: Path, export_dir: Path, sample: np.ndarray, expected: np.ndarray
) -> str:
    """Exports to export_dir/<version>/ (the TF Serving layout) and checks serving_default against Keras.

    The torch backend cannot write a SavedModel: there the saved .keras file is exported and checked by a
    TensorFlow-backend child process, as keras_snapshot.export_saved_model's message recommends.
    """
    if keras.backend.backend() != "torch":
        version_dir = export_saved_model(ensemble, export_dir, overwrite=True)
        return f"{version_dir} ({check_saved_model(version_dir, sample, expected)})"
    sample_file = keras_file.with_name("export-check.npz")
    np.savez(sample_file, sample=sample, expected=expected)
    code = "import sys; sys.path.insert(0, sys.argv[1]); import demo; demo.export_child(*sys.argv[2:])"
    here = str(Path(__file__).resolve().parent)
    done = subprocess.run(
        [sys.executable, "-c", code, here, str(keras_file), str(export_dir), str(sample_file)],
        env=dict(os.environ, KERAS_BACKEND="tensorflow"),
        capture_output=True,
        text=True,
    )
    sample_file.unlink()
    if done.returncode:
        raise RuntimeError(f"the export in a TensorFlow-backend process failed:\n{done.stderr[-3000:]}")
    return done.stdout.strip().splitlines()[-1]


def format_table(rows, headers) -> str:
    widths = [max(len(str(row[i])) for row in [headers, *rows]) for i in range(len(headers))]
    line = "| " + " | ".join(str(h).ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = [
        "| "
        + " | ".join(
            str(c).rjust(w) if i else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        + " |"
        for row in rows
    ]
    return "\n".join([line, rule, *body])


def nocycle_epochs(epochs: int, cycles: int) -> list[int]:
    """The epochs at which NoCycle keeps the single run's weights: M equal intervals of the budget."""
    return sorted({max(1, round(epochs * k / cycles)) for k in range(1, cycles + 1)})


STUDENT_RECIPES = {
    "snapshot": "fine-tuned from the last snapshot with the labels, SGD 0.01 cosine-decayed: a tuned recipe, "
    "not distill's defaults",
    "defaults": "distill's defaults: from scratch, no labels, the teacher's optimizer decayed to zero",
    "scratch": "from scratch with the labels, SGD at the single model's rate cosine-decayed",
}


def train_student(args, data, snapshot_dir, snapshots, steps_per_epoch):
    """distill() from the snapshot ensemble on the training inputs, `--distill-epochs` (see --student-init)."""
    callbacks = [EpochLog("student", args.distill_epochs)] if args.verbose == 2 else []
    if (
        args.student_init == "defaults"
    ):  # what a user gets: no optional argument (callbacks and verbose only log)
        return distill(
            snapshot_dir,
            data.x_train,
            epochs=args.distill_epochs,
            callbacks=callbacks,
            verbose=1 if args.verbose == 1 else 0,
        )
    if args.student_init == "snapshot":
        # A copy of the last snapshot, fine-tuned on the ensemble's probabilities at a small decaying rate.
        student = keras.models.clone_model(snapshots[-1])
        student.set_weights(snapshots[-1].get_weights())
        rate = 0.01
    else:
        student = build_cnn(data.input_shape, data.num_classes, width=args.width, seed=args.seed + 1)
        rate = args.single_alpha0
    total = args.distill_epochs * steps_per_epoch
    optimizer = sgd(keras.optimizers.schedules.CosineDecay(rate, total))
    return distill(
        snapshot_dir,
        data.x_train,
        y=data.y_train,
        student=student,
        epochs=args.distill_epochs,
        batch_size=args.batch_size,
        optimizer=optimizer,
        callbacks=callbacks,
        verbose=1 if args.verbose == 1 else 0,
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.getLogger("tensorflow").setLevel(logging.ERROR)  # tf.function retracing notes: one per model run
    started = time.perf_counter()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    snapshot_dir, serving_dir = out / "snapshots", out / "serving" / "snapshot_ensemble"
    for stale in (snapshot_dir, serving_dir):
        if stale.exists():  # the demo's own output of an earlier run
            shutil.rmtree(stale)

    data = load_dataset(
        args.dataset,
        train_size=args.train_size or None,
        val_size=args.val_size,
        test_size=args.test_size or None,
        data_dir=args.data_dir,
    )
    steps_per_epoch = math.ceil(len(data.x_train) / args.batch_size)
    total_steps = args.epochs * steps_per_epoch
    cycle_epochs = args.epochs / args.cycles
    log(
        f"Keras {keras.__version__}, backend {keras.backend.backend()}; keras-snapshot {keras_snapshot.__version__}"
    )
    log(data.describe())
    log(
        f"Budget: {args.epochs} epochs x {steps_per_epoch} steps (batch {args.batch_size}) = {total_steps} steps "
        f"for each model. Snapshot run: M={args.cycles} cycles of {cycle_epochs:g} epochs, alpha0={args.alpha0}. "
        f"Single model: rate {args.single_alpha0}, x0.1 at 50% and 75%. SGD + Nesterov 0.9 for both."
    )
    if cycle_epochs < 3:
        log(
            f"Note: cycles of {cycle_epochs:g} epochs are short; early snapshots may be undertrained (use fewer cycles or more epochs)."
        )

    log(f"\n[1/5] Snapshot run -> {snapshot_dir}/")
    phase = time.perf_counter()
    model = build_cnn(data.input_shape, data.num_classes, width=args.width, seed=args.seed)
    log(f"CNN of width {args.width}: {model.count_params():,} parameters")
    snapshot_history = train_snapshots(
        model,
        data,
        snapshot_dir,
        epochs=args.epochs,
        cycles=args.cycles,
        batch_size=args.batch_size,
        alpha0=args.alpha0,
        verbose=args.verbose,
    )
    snapshot_seconds = time.perf_counter() - phase

    kept_epochs = nocycle_epochs(args.epochs, args.cycles)
    log(
        f"\n[2/5] Single model, step schedule, same budget (its weights at epochs {kept_epochs} are the NoCycle "
        "ensemble)"
    )
    phase = time.perf_counter()
    single = build_cnn(data.input_shape, data.num_classes, width=args.width, seed=args.seed)
    single_history, kept = train_single(
        single,
        data,
        epochs=args.epochs,
        batch_size=args.batch_size,
        alpha0=args.single_alpha0,
        keep_epochs=kept_epochs,
        verbose=args.verbose,
    )
    single_seconds = time.perf_counter() - phase
    nocycle = []
    for epoch in kept_epochs:
        member = keras.models.clone_model(single)
        member.set_weights(kept[epoch])
        nocycle.append(member)

    log("\n[3/5] Evaluating the snapshots, building the ensemble, exporting it for TF Serving")
    phase = time.perf_counter()
    manifest = keras_snapshot.read_manifest(snapshot_dir)
    snapshots = load_snapshots(snapshot_dir)
    count = len(snapshots)
    # One predict pass per snapshot on each split (keras_snapshot.evaluation.evaluate_ensemble): rows for every
    # snapshot and every ensemble of the last m; on the test set with T fitted on the validation split.
    val_rows = evaluate_ensemble(snapshot_dir, data.x_val, data.y_val)
    test_rows = evaluate_ensemble(
        snapshot_dir,
        data.x_test,
        data.y_test,
        temperature="fit",
        validation_data=(data.x_val, data.y_val),
    )

    def errors(rows):
        members = [100 * r["error"] for r in rows if r["m"] is None]
        last_m = [100 * r["error"] for r in sorted((r for r in rows if r["m"]), key=lambda r: r["m"])]
        return {"members": members, "last_m": last_m}

    val, test = errors(val_rows), errors(test_rows)
    single_row = calibration_row([single], data)
    single_val = 100 * evaluate_ensemble([single], data.x_val, data.y_val)[-1]["error"]
    single_test = single_row["error_%"]

    ensemble = build_ensemble(snapshot_dir)
    keras_file = out / "ensemble.keras"
    ensemble.save(keras_file)
    # The ensemble IS the mean of the snapshots' softmaxes; with uncertainty=True it also outputs the members'
    # mutual information. Both checked against the snapshots run one by one on some test images.
    check = data.x_test[:1000]
    check_stack = np.stack([predict_probabilities(s, check) for s in snapshots])
    ensemble_probs = predict_probabilities(ensemble, check)
    gap = float(np.max(np.abs(ensemble_probs - check_stack.mean(axis=0))))
    log(
        f"Ensemble model: {len(ensemble.layers)} layers, {ensemble.count_params():,} parameters, saved to {keras_file}"
    )
    log(
        f"Its outputs on {len(check)} test images match the mean of the snapshots' softmaxes (max |diff| = {gap:.1e})"
    )
    try:
        exported = export_for_serving(
            ensemble, keras_file, serving_dir, data.x_test[:64], ensemble_probs[:64]
        )
        log(f"Exported for TF Serving: {exported}")
    except Exception as error:  # the table is still worth printing
        exported = None
        log(f"EXPORT FAILED ({type(error).__name__}): {error}")

    uncertain = build_ensemble(snapshot_dir, uncertainty=True)
    served = uncertain.predict(data.x_test, batch_size=1000, verbose=0)
    ensemble_test = np.asarray(served["predictions"], dtype=np.float64)
    ensemble_mi = np.asarray(served["mutual_information"], dtype=np.float64)
    mi_gap = float(np.max(np.abs(ensemble_mi[: len(check)] - mutual_information(check_stack))))
    log(
        f"build_ensemble(uncertainty=True) outputs {sorted(served)}; its mutual information matches numpy's "
        f"on {len(check)} images (max |diff| = {mi_gap:.1e})"
    )
    single_test_probs = predict_probabilities(single, data.x_test)
    last_test_probs = predict_probabilities(snapshots[-1], data.x_test)
    # Out-of-distribution detection: does a score flag inputs unlike the training data?
    x_ood, ood_source = far_ood(data, seed=args.seed)
    served_ood = uncertain.predict(x_ood, batch_size=1000, verbose=0)
    ood_scores = {  # (model, score) -> (score on the test images, on the OOD images); higher = more likely OOD
        ("single model", "1 - max probability"): (
            1 - single_test_probs.max(axis=-1),
            1 - predict_probabilities(single, x_ood).max(axis=-1),
        ),
        ("last snapshot", "1 - max probability"): (
            1 - last_test_probs.max(axis=-1),
            1 - predict_probabilities(snapshots[-1], x_ood).max(axis=-1),
        ),
        (f"snapshot ensemble (M={count})", "1 - max probability"): (
            1 - ensemble_test.max(axis=-1),
            1 - np.asarray(served_ood["predictions"], dtype=np.float64).max(axis=-1),
        ),
        (f"snapshot ensemble (M={count})", "entropy"): (
            np.asarray(served["entropy"], dtype=np.float64),
            np.asarray(served_ood["entropy"], dtype=np.float64),
        ),
        (f"snapshot ensemble (M={count})", "mutual information"): (
            ensemble_mi,
            np.asarray(served_ood["mutual_information"], dtype=np.float64),
        ),
    }
    ood = {key: ood_metrics(inside, outside) for key, (inside, outside) in ood_scores.items()}
    ood_table = format_table(
        [
            (model, score, f"{m['auroc']:.3f}", f"{m['aupr']:.3f}", f"{100 * m['fpr95']:.1f}")
            for (model, score), m in ood.items()
        ],
        ("model", "OOD score", "AUROC", "AUPR", "FPR95 %"),
    )
    log(
        f"\nOut-of-distribution detection: {len(data.x_test)} test images vs {len(x_ood)} OOD images "
        f"({ood_source}); AUROC 0.5 = chance, FPR95 = test images flagged when 95 % of the OOD ones are"
    )
    log(ood_table)
    test_file = out / "test.npz"
    np.savez_compressed(test_file, x=data.x_test, y=data.y_test)
    evaluation_seconds = time.perf_counter() - phase

    log(
        f"\n[4/5] Serving at the cost of one model: a distilled student ({args.distill_epochs} epochs, "
        f"{STUDENT_RECIPES[args.student_init]}) and weight averages"
    )
    phase = time.perf_counter()
    student = train_student(args, data, snapshot_dir, snapshots, steps_per_epoch)
    student_seconds = time.perf_counter() - phase
    student_row = calibration_row([student], data)
    averaged_snapshots, guard_snapshots = average_with_guard(snapshot_dir, data)
    averaged_snapshots_row = calibration_row([averaged_snapshots], data)
    # Same basin: the single run's NoCycle weights after its first rate drop (at least the last two).
    basin = [e for e in kept_epochs if e > args.epochs / 2]
    basin = basin if len(basin) >= 2 else kept_epochs[-2:]
    basin_members = [nocycle[kept_epochs.index(e)] for e in basin]
    if len(basin_members) >= 2:
        averaged_basin, guard_basin = average_with_guard(basin_members, data)
        averaged_basin_row = calibration_row([averaged_basin], data)
    else:
        averaged_basin = guard_basin = averaged_basin_row = None
    for label, guard in (("snapshots", guard_snapshots), (f"NoCycle epochs {basin}", guard_basin)):
        if guard is None:
            continue
        report = guard["report"] or {}
        words = (
            "FIRED (the average is worse than the best member on validation)"
            if guard["guard_fired"]
            else "quiet"
        )
        summary = ""
        if report:
            summary = (
                f": validation NLL averaged {report['averaged']['nll']:.4f}, best member "
                f"{report['best_member']['nll']:.4f}, ensemble {report['ensemble']['nll']:.4f}"
            )
        log(f"Weight average of the {label}: guard {words}{summary}")

    snapshot_row = max((r for r in test_rows if r["m"]), key=lambda r: r["m"])
    snapshot_row = dict(snapshot_row, **{"error_%": 100 * snapshot_row["error"]})
    nocycle_row = calibration_row(nocycle, data)
    epochs_at = {entry["cycle"]: entry.get("epoch") for entry in manifest["snapshots"]}
    rows = []
    for k in range(count):
        rows.append(
            (
                f"snapshot {k + 1} (epoch {epochs_at.get(k + 1)})",
                f"{val['members'][k]:.2f}",
                f"{test['members'][k]:.2f}",
            )
        )
    for m in range(1, count + 1):
        note = " = exported model" if m == count else (f" = snapshot {count}" if m == 1 else "")
        rows.append(
            (
                f"ensemble of the last m={m}{note}",
                f"{val['last_m'][m - 1]:.2f}",
                f"{test['last_m'][m - 1]:.2f}",
            )
        )
    rows.append(("single model, step schedule", f"{single_val:.2f}", f"{single_test:.2f}"))
    table = format_table(rows, ("model", "val error %", "test error %"))
    gain = single_test - test["last_m"][-1]

    budget = f"{args.epochs} + {args.distill_epochs} epochs"
    calibrated = [
        ("single model, step schedule", 1, f"{args.epochs} epochs", single_row),
        (f"NoCycle ensemble (M={len(nocycle)})", len(nocycle), "the single run", nocycle_row),
        (f"snapshot ensemble (M={count})", count, f"{args.epochs} epochs", snapshot_row),
        ("distilled student (1x cost)", 1, budget, student_row),
        ("weight average (1x cost), snapshots", 1, f"{args.epochs} epochs", averaged_snapshots_row),
    ]
    if averaged_basin_row is not None:
        calibrated.append(
            (f"weight average (1x cost), NoCycle {basin}", 1, "the single run", averaged_basin_row)
        )
    calibration_table = format_table(
        [
            (
                label,
                str(passes),
                spent,
                f"{row['error_%']:.2f}",
                f"{row['nll']:.4f}",
                f"{100 * row['ece']:.2f}",
                f"{row['brier']:.4f}",
                f"{row['temperature']:.3f}",
                f"{row['nll_ts']:.4f}",
                f"{100 * row['ece_ts']:.2f}",
                f"{row['brier_ts']:.4f}",
            )
            for label, passes, spent, row in calibrated
        ],
        (
            "model",
            "passes",
            "training",
            "error %",
            "NLL",
            "ECE %",
            "Brier",
            "T",
            "NLL (TS)",
            "ECE % (TS)",
            "Brier (TS)",
        ),
    )

    selective = {
        "ensemble, ranked by mutual information": selective_errors(ensemble_test, data.y_test, ensemble_mi),
        "ensemble, ranked by max probability": selective_errors(
            ensemble_test, data.y_test, -ensemble_test.max(axis=-1)
        ),
        "single model, ranked by max probability": selective_errors(
            single_test_probs, data.y_test, -single_test_probs.max(axis=-1)
        ),
        "last snapshot, ranked by max probability": selective_errors(
            last_test_probs, data.y_test, -last_test_probs.max(axis=-1)
        ),
    }
    at80 = {label: errors[COVERAGES.index(0.8)] for label, errors in selective.items()}

    log("\n[5/5] Pictures")
    pictures = {}
    missing = matplotlib_missing()
    if missing:
        log(missing)
    else:
        pictures["lr_schedule"] = plot_lr_schedule(
            out / "lr_schedule.png",
            epochs=args.epochs,
            steps_per_epoch=steps_per_epoch,
            cycles=args.cycles,
            alpha0=args.alpha0,
            single_alpha0=args.single_alpha0,
            single_rate=lambda t: step_learning_rate(t, alpha0=args.single_alpha0, total_steps=total_steps),
            losses={"snapshot run": snapshot_history["loss"], "single model": single_history["loss"]},
            title=f"{data.name}: learning rate over {args.epochs} epochs, M={args.cycles} snapshots marked",
        )
        pictures["ensemble_size"] = plot_ensemble_size(
            out / "ensemble_size.png",
            {f"snapshot ensemble (alpha0={args.alpha0:g})": (test["last_m"], None)},
            baselines={"single model, step schedule": (single_test, None)},
            title=f"{data.name}: test error of the ensemble of the last m snapshots (one seed: {args.seed})",
            note=f"One training run per model (seed {args.seed}): differences of a few tenths are seed noise.",
            min_span=2.0,
        )
        pictures["reliability"] = plot_reliability(
            out / "reliability.png",
            {
                "single model": (reliability_bins(single_test_probs, data.y_test), single_row["ece"]),
                f"snapshot ensemble (M={count})": (
                    reliability_bins(ensemble_test, data.y_test),
                    snapshot_row["ece"],
                ),
            },
            title=f"{data.name}: reliability on {len(data.x_test)} test images (before temperature scaling)",
        )
        pictures["selective"] = plot_selective(
            out / "selective.png",
            COVERAGES,
            {label: (errors, None) for label, errors in selective.items()},
            title=f"{data.name}: keep only the most certain test images (one seed)",
        )
        panels = []
        for key in (
            ("single model", "1 - max probability"),
            (f"snapshot ensemble (M={count})", "entropy"),
            (f"snapshot ensemble (M={count})", "mutual information"),
        ):
            inside, outside = ood_scores[key]
            edges = np.linspace(0.0, max(float(inside.max()), float(outside.max()), 1e-6), 31)
            panels.append(
                {
                    "title": f"{key[0]}: {key[1]}\nAUROC {ood[key]['auroc']:.3f}",
                    "edges": edges,
                    "counts": {
                        "test images": np.histogram(inside, edges)[0],
                        f"OOD: {ood_source}": np.histogram(outside, edges)[0],
                    },
                    "xlabel": f"{key[1]} (higher = more likely OOD)",
                }
            )
        pictures["ood"] = plot_ood_histograms(
            out / "ood.png", panels, title=f"{data.name}: OOD scores, test images vs {ood_source} (one seed)"
        )
        for path in pictures.values():
            log(f"Saved {path}")

    total = time.perf_counter() - started
    calibration = {
        key: {
            k: row[k]
            for k in ("error_%", "nll", "ece", "brier", "temperature", "nll_ts", "ece_ts", "brier_ts")
        }
        for key, row in (
            ("single", single_row),
            ("nocycle", nocycle_row),
            ("snapshot_ensemble", snapshot_row),
            ("distilled_student", student_row),
            ("weight_average_snapshots", averaged_snapshots_row),
            ("weight_average_nocycle", averaged_basin_row),
        )
        if row is not None
    }
    results = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "backend": keras.backend.backend(),
        "dataset": data.describe(),
        "settings": vars(args),
        "steps_per_epoch": steps_per_epoch,
        "val_error": {"snapshots": val["members"], "ensemble_last_m": val["last_m"], "single": single_val},
        "test_error": {
            "snapshots": test["members"],
            "ensemble_last_m": test["last_m"],
            "single": single_test,
        },
        "calibration_test": calibration,
        "forward_passes": {
            "single": 1,
            "nocycle": len(nocycle),
            "snapshot_ensemble": count,
            "distilled_student": 1,
            "weight_average_snapshots": 1,
            "weight_average_nocycle": 1,
        },
        "distilled_student": {"epochs": args.distill_epochs, "init": args.student_init},
        "weight_average_guard": {
            "snapshots": guard_snapshots,
            **({f"nocycle_epochs_{'_'.join(map(str, basin))}": guard_basin} if guard_basin else {}),
        },
        "selective_test_error_at_80%": at80,
        "ood": {
            "source": ood_source,
            "rows": len(x_ood),
            "metrics": {f"{model}, {score}": m for (model, score), m in ood.items()},
        },
        "ensemble_model_max_gap": gap,
        "uncertainty_mutual_information_max_gap": mi_gap,
        "exported": exported,
        "test_data": str(test_file),
        "pictures": {key: str(path) for key, path in pictures.items()},
        "seconds": {
            "snapshot_run": snapshot_seconds,
            "single_run": single_seconds,
            "evaluation": evaluation_seconds,
            "student": student_seconds,
            "total": total,
        },
    }
    (out / "results.json").write_text(json.dumps(rounded(results), indent=2) + "\n")
    (out / "results.md").write_text(
        table
        + "\n\n"
        + calibration_table
        + f"\n\nOut-of-distribution detection ({ood_source}):\n\n"
        + ood_table
        + "\n"
    )

    log(
        f"\nTest error on {data.name} ({len(data.x_test)} test images; validation {len(data.x_val)} images), "
        f"{args.epochs} epochs each, backend {keras.backend.backend()}:\n"
    )
    log(table)
    verdict = "beats the single model by" if gain > 0 else "is behind the single model by"
    log(
        f"\nThe ensemble of all {count} snapshots {verdict} {abs(gain):.2f} points of test error "
        f"(one seed: differences of a few tenths are within seed noise; see benchmarks/accuracy.py)."
    )
    log(
        f"\nCalibration and cost on the test set. passes = forward passes per prediction; NLL in nats; "
        f"(TS) = after temperature scaling, T fitted on the {len(data.x_val)} validation images (never the test "
        f"set). The student trained {args.distill_epochs} more epoch(s) "
        f"({STUDENT_RECIPES[args.student_init]}) on the "
        "ensemble's probabilities; the weight averages recomputed batch-norm statistics on the training images.\n"
    )
    log(calibration_table)
    log(
        "\nSelective prediction, test error of the 80% most certain test images: "
        + "; ".join(f"{label} {value:.2f}%" for label, value in at80.items())
        + " (all images: ensemble "
        + f"{test['last_m'][-1]:.2f}%, single {single_test:.2f}%)."
    )
    log(
        f"\nTraining took {snapshot_seconds:.0f} s (snapshots) + {single_seconds:.0f} s (single) + "
        f"{student_seconds:.0f} s (student); total {total:.0f} s. Outputs in {out}/"
    )
    log(
        f"Evaluate the snapshots from the command line on the test split written to {test_file}:\n"
        f"  keras-snapshot evaluate {snapshot_dir} --data {test_file}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
