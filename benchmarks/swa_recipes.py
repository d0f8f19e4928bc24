"""Which SWA recipe, on the reduced CPU protocol of benchmarks/swa.py: each recipe is ONE fit that gives the SWA
model and that run's last weights; the `defaults` recipe is the single model's run, so its last weights are the
single model and every recipe is compared with it seed by seed.

Recipes (0-based epochs; E = --epochs, start = int(0.75 * E)), all with BatchNorm statistics recomputed on the
training images (`bn_data=x_train`):

- `defaults`: the single model's step schedule (0.1, x0.1 at 50 % and 75 % of the steps) with
  `StochasticWeightAveraging(bn_data=x_train)` and nothing else: averaging at every epoch end from `start`, at
  the schedule's 0.001;
- `defaults_k<k>`: the same, averaged every k steps (`average_every=k`);
- `const<r>`: 0.1 until E // 2, 0.01 until `start`, then the constant SWA rate r, averaged at every epoch end;
  `_k<k>` averages every k steps; `_s<e>` starts the constant rate and the averaging at epoch e;
- `lin<hi>-<lo>` / `cos<hi>-<lo>`: 0.1 until E // 2, 0.01 until `start`, then one cycle per epoch from hi down
  to lo (linear: Izmailov et al.'s cyclical SWA; or cosine), averaged at every epoch end (the cycles' low
  points).

    python benchmarks/swa_recipes.py --recipes defaults const0.01_k20 --seeds 1 2

Each finished run is appended to results/<name>.runs.jsonl (a rerun skips recorded runs); the report
<name>.md/.json is written from all records. Picking a recipe on these numbers is tuning: the validation
columns are the ones to pick on.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import _common
import swa as swa_benchmark

RECIPE = re.compile(
    r"^(?:(?P<defaults>defaults)|const(?P<rate>[0-9.e-]+)|(?P<shape>lin|cos)(?P<hi>[0-9.]+)-(?P<lo>[0-9.]+))"
    r"(?:_k(?P<every>\d+))?(?:_s(?P<start>\d+))?$"
)


def parse_recipe(name: str) -> dict:
    match = RECIPE.match(name)
    if match is None:
        raise argparse.ArgumentTypeError(
            f"unknown recipe {name!r}: defaults[_k<k>], const<r>[_k<k>][_s<e>], lin<hi>-<lo> or cos<hi>-<lo>"
        )
    parts = match.groupdict()
    if parts["defaults"] and parts["start"]:
        raise argparse.ArgumentTypeError(f"{name!r}: the defaults recipe keeps start_epoch=0.75")
    return {
        "kind": "defaults" if parts["defaults"] else ("const" if parts["rate"] else parts["shape"]),
        "rate": float(parts["rate"]) if parts["rate"] else None,
        "high": float(parts["hi"]) if parts["hi"] else None,
        "low": float(parts["lo"]) if parts["lo"] else None,
        "every": int(parts["every"]) if parts["every"] else None,
        "start": int(parts["start"]) if parts["start"] else None,
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="+", type=str, default=["defaults", "const0.01_k20"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dataset", default="fashion_mnist", help="fashion_mnist, or digits for a smoke run")
    parser.add_argument("--train-size", type=int, default=12000)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--name", default="swa.recipes")
    parser.add_argument("--out", default=str(_common.RESULTS_DIR), help="where the records and the report go")
    parser.add_argument("--aggregate-only", action="store_true")
    args = parser.parse_args(argv)
    for recipe in args.recipes:
        try:
            parse_recipe(recipe)
        except argparse.ArgumentTypeError as error:
            parser.error(str(error))
    return args


def learning_rate(recipe: dict, epochs: int, steps_per_epoch: int, start: int):
    """The recipe's rate as a pure function of the optimizer's step (a LearningRateSchedule)."""
    import keras
    from training import step_schedule

    if recipe["kind"] == "defaults":
        return step_schedule(0.1, epochs * steps_per_epoch)

    class Recipe(keras.optimizers.schedules.LearningRateSchedule):
        def __call__(self, step):
            step = keras.ops.cast(step, "float32")
            epoch = keras.ops.floor(step / steps_per_epoch)
            if recipe["kind"] == "const":
                tail = keras.ops.convert_to_tensor(recipe["rate"], "float32")
            else:
                position = (step - epoch * steps_per_epoch) / steps_per_epoch  # 0 -> 1 within the epoch
                high, low = recipe["high"], recipe["low"]
                if recipe["kind"] == "lin":
                    tail = (1.0 - position) * high + position * low
                else:
                    tail = low + 0.5 * (high - low) * (1.0 + keras.ops.cos(math.pi * position))
            return keras.ops.where(epoch < epochs // 2, 0.1, keras.ops.where(epoch < start, 0.01, tail))

        def get_config(self):
            return dict(recipe)

    return Recipe()


def run(args, data, name: str, seed: int) -> dict:
    from training import EqualIntervalWeights, build_cnn, compile_sgd

    import keras_snapshot

    recipe = parse_recipe(name)
    steps_per_epoch = math.ceil(len(data.x_train) / args.batch_size)
    start = recipe["start"] if recipe["start"] is not None else int(0.75 * args.epochs)
    model = build_cnn(data.input_shape, data.num_classes, width=args.width, seed=seed)
    compile_sgd(model, learning_rate(recipe, args.epochs, steps_per_epoch, start))
    options = {"bn_data": data.x_train}
    if recipe["every"]:
        options["average_every"] = recipe["every"]
    if recipe["kind"] != "defaults":
        options["start_epoch"] = start
    swa = keras_snapshot.StochasticWeightAveraging(**options)
    # train_single's callbacks, plus the SWA callback
    result, history = swa_benchmark.fit_swa(
        args, data, seed, model, swa, [EqualIntervalWeights(())], args.epochs
    )
    result.update(
        averaged_points=swa.count,
        start_epoch=start,
        train_accuracy=round(float(history["accuracy"][-1]), 4),
    )
    return result


def report(args, records: list[dict], seconds: float) -> None:
    import numpy as np

    by = {}
    for record in records:
        by.setdefault(record["recipe"], {})[record["seed"]] = record["result"]
    single = {seed: result["last_weights"] for seed, result in by.get("defaults", {}).items()}
    mean_std = swa_benchmark.mean_std
    rows = []
    if single:
        seeds = sorted(single)
        rows.append(
            [
                "single model (= the defaults run's last weights)",
                mean_std([single[s]["val_error"] for s in seeds]),
                f"{np.mean([single[s]['val_nll'] for s in seeds]):.4f}",
                mean_std([single[s]["test_error"] for s in seeds]),
                "",
                "",
                ", ".join(map(str, seeds)),
            ]
        )
    for name in sorted(by, key=lambda n: (n != "defaults", n)):
        results = by[name]
        seeds = sorted(results)
        paired = sorted(set(seeds) & set(single))
        gains = [single[s]["test_error"] - results[s]["test_error"] for s in paired]
        rows.append(
            [
                f"`{name}`",
                mean_std([results[s]["val_error"] for s in seeds]),
                f"{np.mean([results[s]['val_nll'] for s in seeds]):.4f}",
                mean_std([results[s]["test_error"] for s in seeds]),
                mean_std([results[s]["last_weights"]["test_error"] for s in seeds]),
                (f"{np.mean(gains):+.2f} (" + ", ".join(f"{g:+.2f}" for g in gains) + ")")
                if gains
                else "n/a",
                ", ".join(map(str, seeds)),
            ]
        )
    header = [
        "model",
        "val error %",
        "val NLL",
        "test error %",
        "its run's last weights, test %",
        "gain over the single model, points (per seed)",
        "seeds",
    ]
    info = _common.machine()
    command = (
        f"KERAS_BACKEND=tensorflow python benchmarks/swa_recipes.py --recipes {' '.join(args.recipes)} "
        f"--seeds {' '.join(map(str, args.seeds))} --train-size {args.train_size} --epochs {args.epochs} "
        f"--width {args.width} --name {args.name}"
        + (f" --dataset {args.dataset}" if args.dataset != "fashion_mnist" else "")
    )
    markdown = "\n".join(
        [
            "# Which SWA recipe: one fit per recipe and seed, compared with the single model seed by seed",
            "",
            f"Command: `{command}`",
            "",
            f"Date: {_common.now()}; this invocation {seconds:.0f} s (records accumulate across invocations).",
            "",
            f"- machine: {info['cpu']}, nproc={info['nproc']}, Python {info['python']}; "
            f"versions: {', '.join(f'{k} {v}' for k, v in info['versions'].items())}; commit {info.get('commit')}",
            f"- protocol: {args.dataset}, {args.train_size} training images, the BatchNorm CNN of width {args.width}, "
            f"batch {args.batch_size}, {args.epochs} epochs, SGD + Nesterov 0.9, weight decay 5e-4; the recipes are "
            "described in benchmarks/swa_recipes.py's docstring. Mean ± sample std over the seeds (the bare value "
            "for one seed); the gain is the single model's test error minus the recipe's, on the same seed.",
            "",
            _common.markdown_table(header, rows),
        ]
    )
    out = {"command": command, "machine": info, "protocol": vars(args), "records": records}
    md, js = _common.write_results(args.name, Path(args.out), out, markdown)
    print(f"wrote {md} and {js}", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    path = Path(args.out) / f"{args.name}.runs.jsonl"
    records = (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    )
    if not args.aggregate_only:
        from data import load_dataset

        data = load_dataset(args.dataset, train_size=args.train_size)
        done = {(r["recipe"], r["seed"]) for r in records}
        for seed in args.seeds:
            for name in args.recipes:
                if (name, seed) in done:
                    continue
                begin = time.perf_counter()
                result = run(args, data, name, seed)
                record = {
                    "recipe": name,
                    "seed": seed,
                    "seconds": round(time.perf_counter() - begin, 1),
                    "loadavg": _common.loadavg(),
                    "commit": _common.machine().get("commit"),
                    "result": result,
                }
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "a") as handle:
                    handle.write(json.dumps(record) + "\n")
                records.append(record)
                print(
                    f"{name} seed {seed}: test error {result['test_error']:.2f}, {record['seconds']} s",
                    flush=True,
                )
    report(args, records, time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
