"""Which uncertainty score for which job? Selective prediction and OOD detection, measured.

Fashion-MNIST as in-distribution, restricted to five classes (T-shirt, trouser, pullover, dress, coat);
near-OOD = the other five classes' test images (sandal, shirt, sneaker, bag, ankle boot: never seen in
training); far-OOD = scikit-learn's 1,797 8x8 digits scaled up to 28x28 (no download). For each seed,
one model trained with the paper's single-model schedule (SGD + Nesterov, lr 0.1 dropped x0.1 at 50 %
and 75 %) and one snapshot run on the same budget (M cycles, alpha0 0.1: this MLP diverged at 0.2);
reported: the single model, the last snapshot, the snapshot ensemble (all M) and the distilled student:
`keras_snapshot.distill(snapshot_dir, x_train, epochs=E)` with no other argument (distill's defaults:
no labels, T = 1, the teacher's optimizer at its alpha0 cosine-decayed to zero; E = --distill-epochs,
by default the single model's epochs, as the accuracy benchmark's "defaults" student). Per model and
uncertainty score:

- selective prediction on the in-distribution test rows, ranking by that score (least uncertain kept
  first): AURC, AUGRC and the error at 80 % coverage (`keras_snapshot.selective`);
- OOD detection, near and far: AUROC and FPR95 of that score (OOD positive).

Scores: max_probability (1 - max p) and entropy of the temperature-scaled predictions (T fitted on a
validation split of the training classes, as `build_ensemble(..., temperature="fit")` serves them);
mutual_information and disagreement of the members (ensemble only: the single model, the last snapshot
and the student have one member). The max-probability rows come from
`keras_snapshot.evaluation.evaluate_ensemble` (its `aurc_ts` and `ood_ts`); the other scores' selective
metrics from the same predictions in numpy.

The issue's targets are checked and printed MET / NOT MET: the ensemble's best score beats the single
model's max probability on near-OOD AUROC, far-OOD AUROC and AURC by more than the seeds' spread
(spread = sample std over seeds of the single row + that of the ensemble row, the rule of
benchmarks/accuracy.py). The best score is the one with the best mean over seeds on the TEST numbers
themselves (there is no separate selection split), so each target is also checked with a score fixed
in advance: the ensemble's entropy, `build_ensemble`'s default `abstain_score`.

Pictures, next to the report: <name>.risk_coverage.png (error among the kept test rows against the
fraction kept, each model ranked by its max probability, the ensemble also by its best AURC score when
that is another one; mean over seeds, band = sample std) and <name>.ood_histograms.png (the
uncertainty scores of the in-distribution test rows, the near-OOD and the far-OOD rows, pooled over
seeds: the single model's max probability and the ensemble's best score(s)).

One command (4 to 10 minutes on 2 shared CPU cores, depending on their load):

    KERAS_BACKEND=tensorflow python benchmarks/uncertainty.py

Each finished seed is appended to results/<name>.runs.jsonl; `--resume` keeps the seeds already there
(same protocol) and runs the rest, `--aggregate-only` only rebuilds the report and the pictures from it.
`--quick` is a smoke run (not a measurement). Writes results/<name>.md, .json, .runs.jsonl and the
two pictures.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
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
MODELS = ("single", "last snapshot", "ensemble", "student")
SCORES = ("max_probability", "entropy", "mutual_information", "disagreement")
COVERAGES = tuple(round(0.01 * k, 2) for k in range(1, 101))  # the risk-coverage picture's grid
HISTOGRAM_BINS = 40
OOD_SETS = ("id", "near", "far")
# (key, metric, label, higher is better)
TARGETS = (
    ("near_auroc", "near-OOD AUROC", True),
    ("far_auroc", "far-OOD AUROC", True),
    ("aurc", "AURC", False),
)
FIXED_SCORE = "entropy"  # build_ensemble's default abstain_score: a choice made before any test number
# Flags that say how a run is carried out, not what is measured.
NOT_PROTOCOL = ("seeds", "out", "name", "resume", "aggregate_only")


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
    parser.add_argument(
        "--distill-epochs",
        type=int,
        default=None,
        help="epochs of the distilled student (default: --epochs, the single model's budget)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="a smoke run, not a measurement")
    parser.add_argument("--out", default=str(_common.RESULTS_DIR), help="'' writes nothing")
    parser.add_argument("--name", default="uncertainty.cpu")
    parser.add_argument(
        "--resume", action="store_true", help="keep the finished seeds of <name>.runs.jsonl, run the rest"
    )
    parser.add_argument(
        "--aggregate-only",
        action="store_true",
        help="train nothing: rebuild the report and the pictures from <name>.runs.jsonl",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.train_size, args.val_size, args.test_size = 600, 200, 300
        args.epochs, args.cycles, args.seeds = 4, 2, [0]
    if args.distill_epochs is None:
        args.distill_epochs = args.epochs
    if args.distill_epochs < 1:
        parser.error("--distill-epochs must be >= 1")
    if (args.resume or args.aggregate_only) and not args.out:
        parser.error("--resume and --aggregate-only read <name>.runs.jsonl: they need --out")
    return args


def protocol(args) -> dict:
    """What is measured: runs.jsonl records of another protocol are never mixed in."""
    return {k: v for k, v in sorted(vars(args).items()) if k not in NOT_PROTOCOL}


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


def train_student(args, seed, train_data, directory: Path):
    """distill with its defaults on the snapshot directory: no labels, only the epochs set."""
    import keras

    from keras_snapshot import distill

    keras.utils.set_random_seed(seed)  # the student's initialisation; not an argument of distill
    started = time.time()
    student = distill(str(directory), train_data[0], epochs=args.distill_epochs, verbose=0)
    optimizer = student.optimizer
    rate = optimizer.get_config().get("learning_rate")
    info = {
        "call": f"distill(snapshot_dir, x_train, epochs={args.distill_epochs})",
        "optimizer": type(optimizer).__name__,
        "learning_rate": rate.get("class_name", str(rate)) if isinstance(rate, dict) else rate,
        "seconds": round(time.time() - started, 1),
    }
    if isinstance(rate, dict):
        config = rate.get("config", {})
        info["learning_rate"] = f"{rate.get('class_name')}(peak {config.get('initial_learning_rate')})"
    return student, info


# ---------------------------------------------------------------------------------------- metrics
def score_limit(score: str, classes: int) -> float:
    """The histograms' range: the largest value a score can take, except for the mutual information,
    whose values stay far below log(K) (members of one run agree): log(K) / 3, larger values counted
    in the last bin."""
    return {
        "max_probability": 1.0 - 1.0 / classes,
        "entropy": math.log(classes),
        "mutual_information": math.log(classes) / 3,
        "disagreement": 1.0,
    }[score]


def uncertainties(stack, t: float) -> tuple[dict, np.ndarray]:
    """({score: (N,) uncertainty, higher = less sure}, the temperature-scaled mean of `stack` (M, N, K))."""
    from keras_snapshot.calibration import temperature_scale
    from keras_snapshot.evaluation import disagreement, entropy, mutual_information

    p = temperature_scale(stack.mean(0), t)
    values = {"max_probability": 1.0 - p.max(1), "entropy": entropy(p)}
    if len(stack) > 1:
        values["mutual_information"] = mutual_information(stack)
        values["disagreement"] = disagreement(stack)
    return values, p


def measure(args, seed, data, workdir: Path) -> dict:
    """One seed's record: metrics per model and score, risk-coverage curves and score histograms."""
    import keras

    from keras_snapshot import selective
    from keras_snapshot.evaluation import evaluate_ensemble

    started = time.time()
    train_data, (x_val, y_val), (x_test, y_test), near, far = data
    directory = workdir / f"snapshots-{seed}"
    single = train(args, seed, train_data, directory)
    members = [keras.saving.load_model(p, compile=False) for p in sorted(directory.glob("*.keras"))]
    student, student_info = train_student(args, seed, train_data, directory)
    sources = {"single": [single], "last snapshot": members[-1:], "ensemble": members, "student": [student]}
    result, curves, histograms = {}, {}, {}
    classes = len(IN_CLASSES)
    for model_name, models in sources.items():
        rows = {
            ood_name: evaluate_ensemble(
                models, x_test, y_test, temperature="fit", validation_data=(x_val, y_val), ood=ood
            )[-1]
            for ood_name, ood in (("near", near), ("far", far))
        }
        row = rows["near"]
        t = row["temperature"]  # fitted on the validation split by evaluate_ensemble

        def stack_of(x, models=models):
            return np.stack([m.predict(x, verbose=0, batch_size=512) for m in models]).astype("float64")

        uncertainty, p = uncertainties(stack_of(x_test), t)
        outside = {"near": uncertainties(stack_of(near), t)[0], "far": uncertainties(stack_of(far), t)[0]}
        wrong = p.argmax(1) != y_test
        scores = {"error": float(wrong.mean()), "temperature": float(t)}
        for score, values in uncertainty.items():
            metrics = selective.selective_metrics(-values, wrong)
            for ood_name in ("near", "far"):
                library = rows[ood_name]["ood_ts"][score]
                metrics.update({f"{ood_name}_{k}": v for k, v in library.items()})
                # The library's OOD numbers are those of the scores drawn in the histograms.
                mine = selective.auroc(values, outside[ood_name][score])
                assert abs(mine - library["auroc"]) < 2e-3, (model_name, score, ood_name, mine, library)
            scores[score] = metrics
            curves[f"{model_name}/{score}"] = [
                float(selective.error_at_coverage(-values, wrong, c)) for c in COVERAGES
            ]
            edges = np.linspace(0.0, score_limit(score, classes), HISTOGRAM_BINS + 1)
            histograms[f"{model_name}/{score}"] = {
                name: np.histogram(np.clip(v, edges[0], edges[-1]), edges)[0].tolist()
                for name, v in (
                    ("id", values),
                    ("near", outside["near"][score]),
                    ("far", outside["far"][score]),
                )
            }
        # The library's own max-probability rows agree with the numpy ones above (to float32 rounding
        # of the predictions, which can swap near-equal confidences).
        assert abs(row["aurc_ts"] - scores["max_probability"]["aurc"]) < 1e-3, (row["aurc_ts"], scores)
        result[model_name] = scores
    return {
        "seed": seed,
        "command": _common.command_line(),
        "protocol": protocol(args),
        "seconds": round(time.time() - started, 1),
        "models": result,
        "student": student_info,
        "coverages": list(COVERAGES),
        "curves": curves,
        "histograms": histograms,
    }


# ---------------------------------------------------------------------------------------- report
def stats(values) -> dict:
    values = np.asarray(values, dtype=float)
    return {
        "mean": float(values.mean()),
        "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
        "half_range": float(values.max() - values.min()) / 2,
        "values": [float(v) for v in values],
    }


def aggregate(records: list[dict]) -> dict:
    """{model: {score: {metric: stats}}} over the seeds, plus the test errors."""
    out = {}
    for model in MODELS:
        if model not in records[0]["models"]:
            continue
        first = records[0]["models"][model]
        out[model] = {"error": stats([r["models"][model]["error"] for r in records])}
        for score in SCORES:
            if score in first:
                out[model][score] = {
                    metric: stats([r["models"][model][score][metric] for r in records])
                    for metric in first[score]
                }
    return out


def best_score(summary: dict, metric: str, higher: bool) -> str:
    candidates = [s for s in SCORES if s in summary["ensemble"]]
    sign = -1.0 if higher else 1.0
    return min(candidates, key=lambda s: (sign * summary["ensemble"][s][metric]["mean"], SCORES.index(s)))


def compare(summary: dict, metric: str, higher: bool, score: str) -> dict:
    ensemble, single = summary["ensemble"][score][metric], summary["single"]["max_probability"][metric]
    sign = 1.0 if higher else -1.0
    gain = sign * (ensemble["mean"] - single["mean"])
    spread = ensemble["std"] + single["std"]
    paired = [sign * (e - s) for e, s in zip(ensemble["values"], single["values"], strict=True)]
    return {
        "score": score,
        "ensemble": ensemble["mean"],
        "single": single["mean"],
        "gain": gain,
        "spread": spread,
        "paired_gains": paired,
        "wins": f"{sum(g > 0 for g in paired)}/{len(paired)}",
        # One seed has no spread: no verdict.
        "met": bool(gain > spread) if len(paired) > 1 else None,
    }


def targets(summary: dict) -> dict:
    """Per target: the ensemble's best score (chosen on the test numbers) and the score fixed in advance."""
    out = {}
    for metric, label, higher in TARGETS:
        out[metric] = {
            "label": label,
            "higher_is_better": higher,
            "best": compare(summary, metric, higher, best_score(summary, metric, higher)),
            "fixed": compare(summary, metric, higher, FIXED_SCORE),
        }
    return out


def verdict(met: bool | None) -> str:
    return "n/a (one seed: no spread)" if met is None else ("MET" if met else "NOT MET")


def fmt(value: float, metric: str) -> str:
    return f"{value:.3f}" if metric.endswith("auroc") else f"{100 * value:.2f}"


def target_lines(result: dict) -> list[str]:
    lines = []
    for metric, target in result.items():
        for kind, text in (
            ("best", "best score, chosen on these test numbers"),
            ("fixed", "fixed in advance"),
        ):
            t = target[kind]
            unit = "" if metric.endswith("auroc") else " points"
            lines.append(
                f"- {target['label']}, ensemble {t['score']} ({text}): {fmt(t['ensemble'], metric)} vs the single "
                f"model's max_probability {fmt(t['single'], metric)}: gain {fmt(t['gain'], metric)}{unit} vs spread "
                f"{fmt(t['spread'], metric)}; per-seed gains "
                f"{', '.join(fmt(g, metric) for g in t['paired_gains'])} (ensemble better on {t['wins']} seeds): "
                f"**{verdict(t['met'])}**"
            )
    return lines


def target_table(result: dict) -> str:
    header = [
        "target",
        "ensemble score",
        "ensemble",
        "single (max_probability)",
        "gain",
        "spread",
        "seeds better",
        "verdict",
    ]
    rows = []
    for metric, target in result.items():
        for kind, text in (("best", "best on test"), ("fixed", "fixed in advance")):
            t = target[kind]
            rows.append(
                [
                    target["label"] + (" (%)" if not metric.endswith("auroc") else ""),
                    f"{t['score']} ({text})",
                    fmt(t["ensemble"], metric),
                    fmt(t["single"], metric),
                    fmt(t["gain"], metric),
                    fmt(t["spread"], metric),
                    t["wins"],
                    f"**{verdict(t['met'])}**",
                ]
            )
    return _common.markdown_table(header, rows)


def summary_lines(summary: dict) -> list[list]:
    """One line per (model, score): mean ± half the range over seeds of each metric."""
    columns = ("aurc", "augrc", "error_at_80", "near_auroc", "near_fpr95", "far_auroc", "far_fpr95")
    lines = []
    for model in MODELS:
        for score in SCORES:
            if score not in summary.get(model, {}):
                continue
            cells = [model, score]
            for column in columns:
                s = summary[model][score][column]
                if column.endswith("auroc"):
                    cells.append(f"{s['mean']:.3f} ± {s['half_range']:.3f}")
                else:
                    cells.append(f"{100 * s['mean']:.2f} ± {100 * s['half_range']:.2f}")
            lines.append(cells)
    return lines


def draw(records: list[dict], summary: dict, result: dict, stem: Path) -> list[Path]:
    """The two pictures; nothing (with a message) without matplotlib."""
    sys.path.insert(0, str(_common.REPO_ROOT / "examples"))
    from figures import SINGLE_COLOR, SNAPSHOT_COLOR, matplotlib_missing, plot_ood_histograms, plot_selective

    missing = matplotlib_missing()
    if missing:
        print(missing)
        return []
    seeds = len(records)
    coverages = records[0]["coverages"]

    def curve(key):
        values = np.array([r["curves"][key] for r in records]) * 100
        return values.mean(0), (values.std(0, ddof=1) if seeds > 1 else None)

    aurc_best = result["aurc"]["best"]["score"]
    lines = {"ensemble, max probability": ("ensemble/max_probability", (SNAPSHOT_COLOR, "-"))}
    if aurc_best != "max_probability":
        lines[f"ensemble, {aurc_best}"] = (f"ensemble/{aurc_best}", ("tab:orange", "-"))
    lines["last snapshot, max probability"] = ("last snapshot/max_probability", (SNAPSHOT_COLOR, "--"))
    lines["single model, max probability"] = ("single/max_probability", (SINGLE_COLOR, "-"))
    lines["distilled student, max probability"] = ("student/max_probability", ("tab:green", "-"))
    curves, styles = {}, {}
    for label, (key, style) in lines.items():
        aurc = summary[key.split("/")[0]][key.split("/")[1]]["aurc"]["mean"]
        full = f"{label} (AURC {100 * aurc:.2f} %)"
        curves[full], styles[full] = curve(key), style
    risk = plot_selective(
        f"{stem}.risk_coverage.png",
        coverages,
        curves,
        styles=styles,
        title=f"Fashion-MNIST, 5 classes, MLP: risk-coverage (mean over {seeds} seed(s), band = std)",
    )

    def panel(model, score):
        key = f"{model}/{score}"
        counts = {name: np.sum([r["histograms"][key][name] for r in records], axis=0) for name in OOD_SETS}
        s = summary[model][score]
        name = "1 - max probability" if score == "max_probability" else score.replace("_", " ")
        return {
            "title": f"{'single model' if model == 'single' else model}: {name}\n"
            f"AUROC near {s['near_auroc']['mean']:.3f}, far {s['far_auroc']['mean']:.3f}",
            "edges": np.linspace(0.0, score_limit(score, len(IN_CLASSES)), HISTOGRAM_BINS + 1),
            "counts": {
                "in-distribution test": counts["id"],
                "near-OOD (held-out classes)": counts["near"],
                "far-OOD (digits)": counts["far"],
            },
            "xlabel": f"{name} (higher = more likely OOD)",
        }

    panels = [panel("single", "max_probability")]
    for score in dict.fromkeys([result["near_auroc"]["best"]["score"], result["far_auroc"]["best"]["score"]]):
        panels.append(panel("ensemble", score))
    ood = plot_ood_histograms(
        f"{stem}.ood_histograms.png",
        panels,
        title=f"OOD scores (temperature-scaled where it applies), pooled over {seeds} seed(s)",
    )
    return [risk, ood]


def read_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def main(argv=None) -> int:
    args = parse_args(argv)
    import keras

    out = Path(args.out) if args.out else None
    runs_path = out / f"{args.name}.runs.jsonl" if out else None
    started = time.time()
    pid = protocol(args)
    kept = []
    if runs_path and (args.resume or args.aggregate_only):
        kept = [r for r in read_records(runs_path) if r["protocol"] == pid and r["seed"] in args.seeds]
    elif runs_path and runs_path.exists():
        runs_path.unlink()
    done = {r["seed"] for r in kept}
    todo = [] if args.aggregate_only else [s for s in args.seeds if s not in done]
    print(f"seeds {args.seeds}: {len(done)} in {runs_path} ({sorted(done)}), {len(todo)} to run", flush=True)
    if todo:
        data = load(args)
        with tempfile.TemporaryDirectory() as workdir:
            for seed in todo:
                record = measure(args, seed, data, Path(workdir))
                kept.append(record)
                if runs_path:
                    runs_path.parent.mkdir(parents=True, exist_ok=True)
                    with runs_path.open("a", encoding="utf-8") as handle:
                        handle.write(json.dumps(record) + "\n")
                print(f"seed {seed} done ({time.time() - started:.0f} s)", flush=True)
    records = sorted(kept, key=lambda r: r["seed"])
    if not records:
        print("no records to report")
        return 1
    summary = aggregate(records)
    result = targets(summary)
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
    error_lines = [
        [
            m,
            f"{100 * s['error']['mean']:.2f} ± {100 * s['error']['half_range']:.2f}",
            ", ".join(f"{100 * v:.2f}" for v in s["error"]["values"]),
        ]
        for m, s in summary.items()
    ]
    error_table = _common.markdown_table(["model", "test error %", "per seed"], error_lines)
    student = records[0]["student"]
    command = _common.command_line()
    seconds = sum(r["seconds"] for r in records)
    seeds = [r["seed"] for r in records]
    measured_by = sorted({r.get("command", "?") for r in records} - {command})
    earlier = (
        "- seeds measured by an earlier command (this one rebuilt or resumed the report): "
        + "; ".join(f"`{c}`" for c in measured_by)
        + "\n"
        if measured_by
        else ""
    )
    markdown = (
        f"# Which uncertainty score for which job ({'quick smoke run' if args.quick else 'measurement'})\n\n"
        f"Command: `KERAS_BACKEND={keras.backend.backend()} {command}`\n\n"
        f"- {len(seeds)} seed(s) {seeds}; {args.train_size} training images of classes {IN_CLASSES}, "
        f"MLP {args.width}-{args.width // 2}, {args.epochs} epochs, M = {args.cycles}, alpha0 {args.alpha0}; "
        f"ID test {args.test_size} rows, near-OOD {args.test_size}, far-OOD {min(args.test_size, 1797)}; "
        f"{seconds:.0f} s of measurement over the seeds\n"
        f"- student: `{student['call']}` (distill's defaults: no labels, T = 1; its optimizer "
        f"{student['optimizer']}, learning rate {student['learning_rate']}), from scratch; "
        f"{args.epochs} + {args.distill_epochs} epochs of training in all\n"
        f"{earlier}"
        "- cells: mean ± half the range over seeds; rates in %, lower is better except AUROC; "
        "the student, the single model and the last snapshot have one member, so only max_probability "
        "and entropy\n\n"
        f"{error_table}\n\n{_common.markdown_table(header, summary_lines(summary))}\n\n"
        "## Targets\n\n"
        "The ensemble's best score must beat the single model's max probability by more than the seeds' "
        "spread, spread = sample std over seeds of the ensemble row + sample std of the single row (the rule "
        'of benchmarks/accuracy.py; the table above shows half ranges instead). "best on test": the score '
        "with the best mean over seeds on these test numbers (no separate split chooses it, so it is "
        f"optimistic); \"fixed in advance\": the ensemble's {FIXED_SCORE}, build_ensemble's default "
        "abstain_score. Gains are positive when the ensemble is better; AURC in points of %.\n\n"
        f"{target_table(result)}\n\n" + "\n".join(target_lines(result)) + "\n\n"
        f"Pictures: `{args.name}.risk_coverage.png`, `{args.name}.ood_histograms.png`.\n"
    )
    print(markdown)
    if out:
        pictures = draw(records, summary, result, out / args.name)
        record = {
            "benchmark": "uncertainty",
            "mode": "quick" if args.quick else "full",
            "command": command,
            "backend": keras.backend.backend(),
            "date": _common.now(),
            "machine": _common.machine(),
            "args": vars(args),
            "seeds": seeds,
            "summary": summary,
            "targets": result,
            "runs": [{k: v for k, v in r.items() if k not in ("curves", "histograms")} for r in records],
            "pictures": [p.name for p in pictures],
        }
        _common.write_results(args.name, out, record, markdown)
        print(json.dumps({"wrote": str(out / f"{args.name}.md"), "pictures": [str(p) for p in pictures]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
