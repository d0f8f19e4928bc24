"""One model from one run: SWA vs the single model, and snapshot ensembles with uniform, fitted and greedy
weights, on the reduced CPU protocol of benchmarks/results/accuracy.cpu.md.

Rows (Fashion-MNIST subset, the BatchNorm CNN of examples/training.py, batch 64, SGD + Nesterov 0.9):

- single model: the step schedule (rate 0.1, x0.1 at 50 % and 75 % of the steps), `--epochs` epochs;
- SWA at the same budget: rate 0.1, x0.1 at 50 % (a LearningRateScheduler), then from 75 % of the epochs
  StochasticWeightAveraging at a constant SWA rate (`--swa-rate`, no annealing), averaged at every epoch
  end, BatchNorm statistics recomputed on the training images;
- SWA at 1.25x the budget: the same first 75 % of `--epochs`, then a SWA phase 1.25x - 0.75 = 50 % of the
  budget long;
- snapshot ensemble (M = `--cycles`, alpha0 = 0.2): uniform mean, weights fitted on the validation split
  (fit_ensemble_weights), greedy selection on the validation split (greedy_selection). Serving: M passes.

Weights and selections use the validation split only; the test set is only reported.

    python benchmarks/swa.py --train-size 12000 --epochs 30 --cycles 5 --seeds 0 1 --width 8 --name swa.cpu

Each finished run is appended to benchmarks/results/<name>.runs.jsonl (a rerun skips runs already there),
then the report <name>.md/.json is written from all records.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "examples"))
import _common  # noqa: E402

METHODS = ("single", "swa_1x", "swa_1.25x", "snapshot")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-size", type=int, default=12000)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--cycles", type=int, default=5)
    parser.add_argument("--alpha0", type=float, default=0.2, help="snapshot ensemble's alpha0")
    parser.add_argument("--swa-rate", type=float, default=0.01, help="the constant rate of the SWA phase")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--name", default="swa.cpu")
    parser.add_argument("--aggregate-only", action="store_true")
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
    model.fit(
        data.x_train,
        data.y_train,
        batch_size=args.batch_size,
        epochs=epochs,
        shuffle=True,
        verbose=0,
        callbacks=[schedule, swa],
    )
    from training import predict_probabilities

    result = scores(predict_probabilities(model, data.x_val), predict_probabilities(model, data.x_test), data)
    before = build_cnn(data.input_shape, data.num_classes, width=args.width, seed=seed)
    before.set_weights(swa.final_weights)
    result["last_weights"] = scores(
        predict_probabilities(before, data.x_val), predict_probabilities(before, data.x_test), data
    )
    result.update(epochs=epochs, swa_start_epoch=start, averaged_points=swa.count, passes=1)
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

    with tempfile.TemporaryDirectory(prefix="swa-bench-") as tmp:
        directory = Path(tmp) / "snapshots"
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


def records_path(args) -> Path:
    return _common.RESULTS_DIR / f"{args.name}.runs.jsonl"


def read_records(args) -> list[dict]:
    path = records_path(args)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def mean_std(values) -> str:
    import numpy as np

    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        return "n/a"
    std = values.std(ddof=1) if len(values) > 1 else 0.0
    return f"{values.mean():.2f} ± {std:.2f}"


def mean_std4(values) -> str:
    import numpy as np

    values = np.asarray(values, dtype=float)
    std = values.std(ddof=1) if len(values) > 1 else 0.0
    return f"{values.mean():.4f} ± {std:.4f}"


def report(args, records: list[dict], seconds: float) -> None:
    import numpy as np

    by = {}
    for record in records:
        by.setdefault(record["method"], {})[record["seed"]] = record["result"]
    rows, table = [], {}

    def add(label, results, passes, budget):
        if not results:
            return
        table[label] = {
            "seeds": len(results),
            "test_error": [r["test_error"] for r in results],
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
                len(results),
            ]
        )

    e = args.epochs
    add("single model (step schedule)", list(by.get("single", {}).values()), 1, f"{e} epochs (1x)")
    swa1 = list(by.get("swa_1x", {}).values())
    add("SWA, same budget (last 25 %: constant rate)", swa1, 1, f"{e} epochs (1x)")
    add("  the same run's last weights (before averaging)", [r["last_weights"] for r in swa1], 1, "1x")
    swa125 = list(by.get("swa_1.25x", {}).values())
    add("SWA, 1.25x budget", swa125, 1, f"{round(1.25 * e)} epochs (1.25x)")
    snaps = list(by.get("snapshot", {}).values())
    m = args.cycles
    for name, label in (
        ("uniform", "uniform"),
        ("fit", "fitted on validation"),
        ("greedy", "greedy selection"),
    ):
        results = [r[name] for r in snaps]
        passes = "/".join(sorted({str(r["passes"]) for r in results})) if results else m
        add(f"snapshot ensemble (M={m}), {label}", results, passes, f"{e} epochs (1x)")
    header = ["model", "passes", "training", "val error %", "test error %", "val NLL", "test NLL", "seeds"]
    greedy_lines = [
        f"- seed {seed}: counts {r['greedy']['counts']}, fitted weights {r['fit']['weights']}"
        for seed, r in sorted(by.get("snapshot", {}).items())
    ]
    verdicts = []
    single = table.get("single model (step schedule)")
    swa = table.get("SWA, same budget (last 25 %: constant rate)")
    if single and swa:
        gain = np.mean(single["test_error"]) - np.mean(swa["test_error"])
        spread = (np.std(single["test_error"], ddof=1) if len(single["test_error"]) > 1 else 0) + (
            np.std(swa["test_error"], ddof=1) if len(swa["test_error"]) > 1 else 0
        )
        verdicts.append(
            f"- SWA (1x serving, same budget) vs the single model: test error gain {gain:+.2f} points, seeds' "
            f"spread {spread:.2f}: target (gain > spread) **{'MET' if gain > spread else 'NOT MET'}**."
        )
    uniform = table.get(f"snapshot ensemble (M={m}), uniform")
    greedy = table.get(f"snapshot ensemble (M={m}), greedy selection")
    if uniform and greedy:
        never_worse = all(g <= u + 1e-12 for g, u in zip(greedy["val_nll"], uniform["val_nll"], strict=True))
        verdicts.append(
            f"- Greedy selection never worse than uniform on validation NLL: **{'MET' if never_worse else 'NOT MET'}** "
            f"(per seed: greedy {[round(v, 4) for v in greedy['val_nll']]} vs uniform "
            f"{[round(v, 4) for v in uniform['val_nll']]}); test errors are in the table."
        )
    info = _common.machine()
    command = (
        f"KERAS_BACKEND=tensorflow python benchmarks/swa.py --train-size {args.train_size} --epochs {args.epochs} "
        f"--cycles {args.cycles} --seeds {' '.join(map(str, args.seeds))} --width {args.width} "
        f"--swa-rate {args.swa_rate} --name {args.name}"
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
            f"{info.get('commit')}",
            "- runs: "
            + "; ".join(
                f"{r['method']} seed {r['seed']} {r['seconds']:.0f} s (load {r['loadavg'][0] if r['loadavg'] else '?'})"
                for r in records
            ),
            "",
            f"Protocol (reduced CPU protocol, as benchmarks/results/accuracy.cpu.md): Fashion-MNIST, {args.train_size} "
            f"training images, the validation split for weights/selection, the 10,000 test images reported; CNN "
            f"width {args.width}, batch {args.batch_size}, SGD + Nesterov 0.9, weight decay 5e-4. Single model: rate "
            f"0.1, x0.1 at 50 % and 75 % of the steps. SWA: rate 0.1, 0.01 from 50 % of the epochs, then from epoch "
            f"{int(0.75 * e)} (0-based) the constant SWA rate {args.swa_rate}, averaged at every epoch end, BatchNorm "
            f"statistics recomputed on the training images. Snapshot ensemble: M = {m}, alpha0 = {args.alpha0}. "
            "Errors in %, NLL in nats, mean ± sample std over seeds. Passes = forward passes per prediction.",
            "",
            _common.markdown_table(header, rows),
            "",
            *verdicts,
            "",
            "Greedy selection counts (Caruana et al., 2004, on the validation split) and the fitted weights:",
            "",
            *greedy_lines,
        ]
    )
    out = {"command": command, "machine": info, "protocol": vars(args), "records": records, "summary": table}
    md, js = _common.write_results(args.name, _common.RESULTS_DIR, out, markdown)
    print(f"wrote {md} and {js}", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    if not args.aggregate_only:
        from data import load_dataset

        data = load_dataset("fashion_mnist", train_size=args.train_size)
        done = {(r["method"], r["seed"]) for r in read_records(args)}
        for seed in args.seeds:
            for method in METHODS:
                if (method, seed) in done:
                    continue
                begin = time.perf_counter()
                if method == "single":
                    result = run_single(args, data, seed)
                elif method == "snapshot":
                    result = run_snapshot(args, data, seed)
                else:
                    result = run_swa(args, data, seed, 1.0 if method == "swa_1x" else 1.25)
                record = {
                    "method": method,
                    "seed": seed,
                    "seconds": round(time.perf_counter() - begin, 1),
                    "loadavg": _common.loadavg(),
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
