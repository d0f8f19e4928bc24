"""keras-snapshot demo: train 1, get M for free, serve one model.

Trains a small BatchNorm CNN with `SnapshotCallback` (M cosine cycles, a `.keras` snapshot per cycle), trains
the same CNN with the standard step schedule on the same epoch budget, builds the averaged ensemble as ONE
Keras model, exports it for TensorFlow Serving and prints the test error of every snapshot, of the ensemble
of the last m = 1..M snapshots and of the single model. Saves the paper's Figures 2 and 3 when matplotlib
is installed.

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
from data import DATASETS, load_dataset
from figures import matplotlib_missing, plot_ensemble_size, plot_lr_schedule
from training import (
    build_cnn,
    ensemble_errors,
    error_rate,
    load_snapshots,
    predict_probabilities,
    step_learning_rate,
    train_single,
    train_snapshots,
)

import keras_snapshot
from keras_snapshot.ensemble import build_ensemble
from keras_snapshot.export import export_saved_model


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
    for name in ("epochs", "cycles", "batch_size", "width", "val_size"):
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


def main(argv=None) -> int:
    args = parse_args(argv)
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

    log(f"\n[1/4] Snapshot run -> {snapshot_dir}/")
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

    log("\n[2/4] Single model, step schedule, same budget")
    phase = time.perf_counter()
    single = build_cnn(data.input_shape, data.num_classes, width=args.width, seed=args.seed)
    single_history, _ = train_single(
        single,
        data,
        epochs=args.epochs,
        batch_size=args.batch_size,
        alpha0=args.single_alpha0,
        verbose=args.verbose,
    )
    single_seconds = time.perf_counter() - phase

    log("\n[3/4] Evaluating the snapshots, building the ensemble, exporting it for TF Serving")
    manifest = keras_snapshot.read_manifest(snapshot_dir)
    snapshots = load_snapshots(snapshot_dir)
    val_probs = [predict_probabilities(m, data.x_val) for m in snapshots]
    test_probs = [predict_probabilities(m, data.x_test) for m in snapshots]
    val, test = ensemble_errors(val_probs, data.y_val), ensemble_errors(test_probs, data.y_test)
    single_val = error_rate(predict_probabilities(single, data.x_val), data.y_val)
    single_test = error_rate(predict_probabilities(single, data.x_test), data.y_test)

    ensemble = build_ensemble(snapshot_dir)
    keras_file = out / "ensemble.keras"
    ensemble.save(keras_file)
    # The ensemble IS the mean of the snapshots' softmaxes: check that on some test images (predicting the whole
    # test set again through M members would double the evaluation time), use the exact mean for the table.
    check = data.x_test[:1000]
    ensemble_probs = predict_probabilities(ensemble, check)
    gap = float(np.max(np.abs(ensemble_probs - np.mean([p[: len(check)] for p in test_probs], axis=0))))
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

    epochs_at = {entry["cycle"]: entry.get("epoch") for entry in manifest["snapshots"]}
    count = len(snapshots)
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

    log("\n[4/4] Pictures")
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
            title=f"{data.name}: test error of the ensemble of the last m snapshots",
        )
        for path in pictures.values():
            log(f"Saved {path}")

    total = time.perf_counter() - started
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
        "ensemble_model_max_gap": gap,
        "exported": exported,
        "pictures": {key: str(path) for key, path in pictures.items()},
        "seconds": {"snapshot_run": snapshot_seconds, "single_run": single_seconds, "total": total},
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(table + "\n")

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
        f"Training took {snapshot_seconds:.0f} s (snapshots) + {single_seconds:.0f} s (single); total {total:.0f} s. "
        f"Outputs in {out}/"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
