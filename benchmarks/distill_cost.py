"""What does an epoch of `distill` cost next to an epoch of plain `fit` of the same student?

`distill` computes the teacher's probabilities ONCE, before training (one predict pass, each member
once); its epochs then train the student on those arrays with the temperature-scaled KL loss. The
target (issue 12): an epoch of `distill` costs at most 1.2x an epoch of `fit` of the student on the
same in-memory arrays.

Variants (same architecture, data, batch and optimizer: an MLP 64-256-256-10, Adam 1e-3, batch 64,
synthetic float32 data, 3 teacher members of the same architecture):

  fit       the student's plain `fit` on hard labels (sparse cross-entropy + the "accuracy" metric)
  distill   `distill(members, x)`: no labels, KL to the teacher + the teacher_agreement metric
  distill+y `distill(members, x, y=y, alpha=0.5)`: the KL and the hard-label loss

Method. Each call trains for E epochs with a timing callback (epoch begin to epoch end); the first
epoch of every call (tracing, compilation) is left out, so the per-epoch numbers are the training
loop's steady state. Calls are interleaved (fit, distill, distill+y, fit, ...) R times so every
variant sees the same machine load; per variant, the median of the timed epochs. Ratio = median
epoch of the variant / median epoch of fit. The one-off set-up of a call (everything outside the
timed epochs: for distill the checks, the teacher's pass over x and the compilation) is reported
apart, per call.

    python benchmarks/distill_cost.py                          # tensorflow, jax, torch
    python benchmarks/distill_cost.py --backends tensorflow    # one backend
    python benchmarks/distill_cost.py --quick                  # smoke run: not a measurement
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common

BATCH = 64
FEATURES, HIDDEN, CLASSES, MEMBERS = 64, 256, 10, 3
TARGET = 1.2
VARIANTS = ("fit", "distill", "distill+y")
CONFIG = {
    "full": {"rows": 16384, "epochs": 4, "repeats": 5},
    "quick": {"rows": 1024, "epochs": 2, "repeats": 1},
}


# ---------------------------------------------------------------------------------------------- worker
def _worker(args) -> dict:
    import keras
    import numpy as np

    from keras_snapshot.distillation import distill

    config = CONFIG["quick" if args.quick else "full"]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(config["rows"], FEATURES)).astype("float32")
    y = rng.integers(0, CLASSES, config["rows"]).astype("int32")

    def mlp(seed):
        keras.utils.set_random_seed(seed)
        inputs = keras.Input((FEATURES,), name="features")
        h = keras.layers.Dense(HIDDEN, activation="relu")(inputs)
        h = keras.layers.Dense(HIDDEN, activation="relu")(h)
        return keras.Model(inputs, keras.layers.Dense(CLASSES, activation="softmax")(h), name="mlp")

    members = [mlp(seed) for seed in range(1, MEMBERS + 1)]

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times = []

        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.times.append(time.perf_counter() - self.start)

    def run(variant, seed):
        timer = EpochTimer()
        started = time.perf_counter()
        if variant == "fit":
            student = mlp(seed)
            student.compile(
                keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"]
            )
            student.fit(x, y, batch_size=BATCH, epochs=config["epochs"], callbacks=[timer], verbose=0)
        else:
            keras.utils.set_random_seed(seed)
            distill(
                members,
                x,
                y=y if variant == "distill+y" else None,
                epochs=config["epochs"],
                batch_size=BATCH,
                optimizer=keras.optimizers.Adam(1e-3),
                callbacks=[timer],
                verbose=0,
            )
        total = time.perf_counter() - started
        return timer.times, total - sum(timer.times)

    epochs = {variant: [] for variant in VARIANTS}
    setup = {variant: [] for variant in VARIANTS}
    for repeat in range(config["repeats"]):
        for variant in VARIANTS:
            times, overhead = run(variant, 100 + repeat)
            epochs[variant].extend(times[1:])  # the first epoch traces and compiles
            setup[variant].append(overhead + times[0])
    base = _common.median(epochs["fit"])
    return {
        "device": _common.backend_device(),
        "config": config,
        "steps_per_epoch": -(-config["rows"] // BATCH),
        "variants": {
            variant: {
                "epoch_s": _common.median(epochs[variant]),
                "epoch_quartiles_s": _common.quartiles(epochs[variant]),
                "epochs_timed": len(epochs[variant]),
                "setup_s": _common.median(setup[variant]),
                "ratio_vs_fit": _common.median(epochs[variant]) / base,
            }
            for variant in VARIANTS
        },
    }


# ---------------------------------------------------------------------------------------------- report
def _report(record: dict) -> str:
    rows = []
    for backend, result in record["backends"].items():
        for variant in VARIANTS:
            r = result["variants"][variant]
            ok = None if variant == "fit" else r["ratio_vs_fit"] <= TARGET
            rows.append(
                [
                    backend,
                    variant,
                    r["epoch_s"] * 1e3,
                    f"{r['epoch_quartiles_s'][0] * 1e3:.1f}-{r['epoch_quartiles_s'][1] * 1e3:.1f}",
                    r["epochs_timed"],
                    r["ratio_vs_fit"],
                    r["setup_s"],
                    _common.verdict(ok),
                ]
            )
    return _common.markdown_table(
        [
            "backend",
            "variant",
            "epoch ms (median)",
            "quartiles ms",
            "epochs timed",
            f"epoch ratio vs fit (target <= {TARGET})",
            "set-up s per call",
            "verdict",
        ],
        rows,
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", default=",".join(_common.BACKENDS), help="comma-separated")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny data, one repeat")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="compute threads per backend process (default 1; 0 = the backend's default)",
    )
    parser.add_argument("--out", default=str(_common.RESULTS_DIR), help="results folder ('' to skip writing)")
    parser.add_argument("--name", default=None, help="results file stem (default: distill_cost[-quick])")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result-json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        Path(args.result_json).write_text(json.dumps(_worker(args)))
        return 0

    backends, record = _common.start_record(parser, args, "distill_cost", variants=list(VARIANTS))
    started = time.perf_counter()
    for backend in backends:
        record["backends"][backend] = _common.run_worker(
            Path(__file__).resolve(), backend, ["--quick"] if args.quick else [], threads=args.threads
        )
    record["seconds"] = round(time.perf_counter() - started, 1)
    record["loadavg_at_end"] = _common.loadavg()
    record["failed_targets"] = [
        f"{backend}/{variant}"
        for backend, result in record["backends"].items()
        for variant in VARIANTS[1:]
        if result["variants"][variant]["ratio_vs_fit"] > TARGET
    ]
    config = next(iter(record["backends"].values()))["config"]
    steps = next(iter(record["backends"].values()))["steps_per_epoch"]
    markdown = (
        _common.report_header("# Distillation cost per epoch", record, args.quick, args.threads)
        + f"- model: MLP {FEATURES}-{HIDDEN}-{HIDDEN}-{CLASSES}, Adam 1e-3, batch {BATCH}, {config['rows']} "
        f"synthetic rows ({steps} steps per epoch); teacher: {MEMBERS} members of the same architecture\n"
        f"- {config['repeats']} interleaved calls per variant of {config['epochs']} epochs each, the first "
        "epoch of each call left out\n\n"
        + _report(record)
        + "\n\nThe set-up column is per call, paid once however many epochs follow: for distill it holds "
        f"the teacher's one pass over x ({MEMBERS} members, each run once), the checks and the compilation; "
        "for fit the compilation.\n"
    )
    if args.name is None:  # one result file whatever the backends: it names them
        args.name = "distill_cost" + ("-quick" if args.quick else "")
    _common.publish(markdown, record, args, "distill_cost", backends)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
