"""Which uncertainty score for which job? Selective prediction and OOD detection, measured.

Fashion-MNIST as in-distribution, restricted to five classes (T-shirt, trouser, pullover, dress, coat);
near-OOD = the other five classes' test images (sandal, shirt, sneaker, bag, ankle boot: never seen in
training); far-OOD = scikit-learn's 1,797 8x8 digits scaled up to 28x28 (no download). For each seed,
one model trained with the paper's single-model schedule (SGD + Nesterov, lr 0.1 dropped x0.1 at 50 %
and 75 %) and one snapshot run on the same budget (M cycles, alpha0 0.1: this MLP diverged at 0.2);
reported: the single model,
the last snapshot and the snapshot ensemble (all M). Per model and uncertainty score:

- selective prediction on the in-distribution test rows, ranking by that score (least uncertain kept
  first): AURC, AUGRC and the error at 80 % coverage (`keras_snapshot.selective`);
- OOD detection, near and far: AUROC and FPR95 of that score (OOD positive).

Scores: max_probability (1 - max p) and entropy of the temperature-scaled predictions (T fitted on a
validation split of the training classes, as `build_ensemble(..., temperature="fit")` serves them);
mutual_information and disagreement of the members (ensemble only). The max-probability rows come from
`keras_snapshot.evaluation.evaluate_ensemble` (its `aurc_ts` and `ood_ts`); the other scores' selective
metrics from the same predictions in numpy.

One command (about 10 minutes on 2 shared CPU cores):

    KERAS_BACKEND=tensorflow python benchmarks/uncertainty.py

`--quick` is a smoke run (not a measurement). Writes results/<name>.md and .json.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import _common

IN_CLASSES = (0, 1, 2, 3, 4)
NEAR_CLASSES = (5, 6, 7, 8, 9)
MODELS = ("single", "last snapshot", "ensemble")
SCORES = ("max_probability", "entropy", "mutual_information", "disagreement")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--train-size", type=int, default=6000, help="training images of the 5 classes")
    parser.add_argument("--val-size", type=int, default=1000)
    parser.add_argument("--test-size", type=int, default=2000, help="rows of each test set (ID, near)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--cycles", type=int, default=5)
    parser.add_argument("--alpha0", type=float, default=0.1, help="the snapshot run's restart rate")
    parser.add_argument("--width", type=int, default=256, help="hidden units of the MLP")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="a smoke run, not a measurement")
    parser.add_argument("--out", default=str(_common.RESULTS_DIR), help="'' writes nothing")
    parser.add_argument("--name", default="uncertainty.cpu")
    args = parser.parse_args(argv)
    if args.quick:
        args.train_size, args.val_size, args.test_size = 600, 200, 300
        args.epochs, args.cycles, args.seeds = 4, 2, [0]
    return args


# ---------------------------------------------------------------------------------------- data
def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load(args):
    root = Path(args.data_dir)
    x_train = _idx(root / "train-images-idx3-ubyte.gz").reshape(-1, 784).astype("float32") / 255.0
    y_train = _idx(root / "train-labels-idx1-ubyte.gz").astype("int64")
    x_test = _idx(root / "t10k-images-idx3-ubyte.gz").reshape(-1, 784).astype("float32") / 255.0
    y_test = _idx(root / "t10k-labels-idx1-ubyte.gz").astype("int64")
    inside = np.isin(y_train, IN_CLASSES)
    x_in, y_in = x_train[inside], y_train[inside]
    train = x_in[: args.train_size], y_in[: args.train_size]
    val = x_in[-args.val_size :], y_in[-args.val_size :]
    test_in = np.isin(y_test, IN_CLASSES)
    test = x_test[test_in][: args.test_size], y_test[test_in][: args.test_size]
    near = x_test[np.isin(y_test, NEAR_CLASSES)][: args.test_size]
    from sklearn.datasets import load_digits

    digits = load_digits().images / 16.0  # (1797, 8, 8) in [0, 1]
    big = np.kron(digits, np.ones((1, 3, 3)))  # 24x24, centred in 28x28 as MNIST's digits are
    far = np.zeros((len(big), 28, 28), dtype="float32")
    far[:, 2:26, 2:26] = big
    return train, val, test, near, far.reshape(-1, 784)[: args.test_size]


# ---------------------------------------------------------------------------------------- training
def make_model(args, seed):
    import keras

    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((784,), name="pixels"),
            keras.layers.Dense(args.width, activation="relu"),
            keras.layers.Dense(args.width // 2, activation="relu"),
            keras.layers.Dense(len(IN_CLASSES), activation="softmax"),
        ]
    )
    return model


def train(args, seed, train_data, directory: Path):
    import keras

    import keras_snapshot

    x, y = train_data
    steps = int(np.ceil(len(x) / 64)) * args.epochs
    single = make_model(args, seed)
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay(
        [steps // 2, (3 * steps) // 4], [0.1, 0.01, 0.001]
    )
    single.compile(
        keras.optimizers.SGD(schedule, momentum=0.9, nesterov=True), "sparse_categorical_crossentropy"
    )
    single.fit(x, y, batch_size=64, epochs=args.epochs, verbose=0, shuffle=True)
    snap = make_model(args, seed)
    snap.compile(
        keras.optimizers.SGD(args.alpha0, momentum=0.9, nesterov=True), "sparse_categorical_crossentropy"
    )
    snap.fit(
        x,
        y,
        batch_size=64,
        epochs=args.epochs,
        verbose=0,
        shuffle=True,
        callbacks=[
            keras_snapshot.SnapshotCallback(directory, cycles=args.cycles, initial_learning_rate=args.alpha0)
        ],
    )
    return single


# ---------------------------------------------------------------------------------------- metrics
def measure(args, seed, data, workdir: Path) -> dict:
    """{model: {score: {metric: value}}} for one seed."""
    import keras

    from keras_snapshot import selective
    from keras_snapshot.calibration import temperature_scale
    from keras_snapshot.evaluation import disagreement, entropy, evaluate_ensemble, mutual_information

    train_data, (x_val, y_val), (x_test, y_test), near, far = data
    directory = workdir / f"snapshots-{seed}"
    single = train(args, seed, train_data, directory)
    members = [keras.saving.load_model(p, compile=False) for p in sorted(directory.glob("*.keras"))]
    sources = {"single": [single], "last snapshot": members[-1:], "ensemble": members}
    result = {}
    for model_name, models in sources.items():
        rows = {
            ood_name: evaluate_ensemble(
                models, x_test, y_test, temperature="fit", validation_data=(x_val, y_val), ood=ood
            )[-1]
            for ood_name, ood in (("near", near), ("far", far))
        }
        row = rows["near"]
        stack = np.stack([m.predict(x_test, verbose=0, batch_size=512) for m in models]).astype("float64")
        t = row["temperature"]  # fitted on the validation split by evaluate_ensemble
        p = temperature_scale(stack.mean(0), t)
        wrong = p.argmax(1) != y_test
        uncertainty = {"max_probability": 1.0 - p.max(1), "entropy": entropy(p)}
        if len(models) > 1:
            uncertainty["mutual_information"] = mutual_information(stack)
            uncertainty["disagreement"] = disagreement(stack)
        scores = {"error": float(wrong.mean()), "temperature": float(t)}
        for score, values in uncertainty.items():
            metrics = selective.selective_metrics(-values, wrong)
            metrics.update({f"near_{k}": v for k, v in rows["near"]["ood_ts"][score].items()})
            metrics.update({f"far_{k}": v for k, v in rows["far"]["ood_ts"][score].items()})
            scores[score] = metrics
        # The library's own max-probability rows agree with the numpy ones above (to float32 rounding
        # of the predictions, which can swap near-equal confidences).
        assert abs(row["aurc_ts"] - scores["max_probability"]["aurc"]) < 1e-3, (row["aurc_ts"], scores)
        result[model_name] = scores
    return result


def summarise(runs: list[dict]) -> list[list]:
    """One line per (model, score): mean ± half the range over seeds of each metric."""
    columns = ("aurc", "augrc", "error_at_80", "near_auroc", "near_fpr95", "far_auroc", "far_fpr95")
    lines = []
    for model in MODELS:
        for score in SCORES:
            if score not in runs[0][model]:
                continue
            cells = [model, score]
            for column in columns:
                values = np.array([run[model][score][column] for run in runs])
                scale = 1.0 if column in ("near_auroc", "far_auroc") else 100.0  # rates in %
                mean, spread = scale * values.mean(), scale * (values.max() - values.min()) / 2
                cells.append(f"{mean:.2f} ± {spread:.2f}" if scale == 100.0 else f"{mean:.3f} ± {spread:.3f}")
            lines.append(cells)
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    import keras

    data = load(args)
    started = time.time()
    runs = []
    with tempfile.TemporaryDirectory() as workdir:
        for seed in args.seeds:
            runs.append(measure(args, seed, data, Path(workdir)))
            print(f"seed {seed} done ({time.time() - started:.0f} s)", flush=True)
    header = [
        "model",
        "score",
        "AURC %",
        "AUGRC %",
        "error@80 %",
        "near AUROC",
        "near FPR95 %",
        "far AUROC",
        "far FPR95 %",
    ]
    errors = {model: [100 * run[model]["error"] for run in runs] for model in MODELS}
    error_lines = [[m, f"{np.mean(v):.2f} ± {(max(v) - min(v)) / 2:.2f}"] for m, v in errors.items()]
    table = _common.markdown_table(header, summarise(runs))
    error_table = _common.markdown_table(["model", "test error %"], error_lines)
    command = _common.command_line()
    markdown = (
        f"# Which uncertainty score for which job ({'quick smoke run' if args.quick else 'measurement'})\n\n"
        f"Command: `KERAS_BACKEND={keras.backend.backend()} {command}`\n\n"
        f"- {len(args.seeds)} seed(s) {args.seeds}; {args.train_size} training images of classes {IN_CLASSES}, "
        f"MLP {args.width}-{args.width // 2}, {args.epochs} epochs, M = {args.cycles}, alpha0 {args.alpha0}; "
        f"ID test {len(data[2][0])} rows, near-OOD {len(data[3])}, far-OOD {len(data[4])}; "
        f"{time.time() - started:.0f} s\n"
        "- cells: mean ± half the range over seeds; rates in %, lower is better except AUROC\n\n"
        f"{error_table}\n\n{table}\n"
    )
    print(markdown)
    if args.out:
        record = {
            "benchmark": "uncertainty",
            "mode": "quick" if args.quick else "full",
            "command": command,
            "backend": keras.backend.backend(),
            "date": _common.now(),
            "machine": _common.machine(),
            "args": vars(args),
            "runs": runs,
        }
        _common.write_results(args.name, Path(args.out), record, markdown)
        print(json.dumps({"wrote": str(Path(args.out) / f"{args.name}.md")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
