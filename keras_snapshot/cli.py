"""The `keras-snapshot` command line: info, build, export and evaluate a snapshot directory.

    keras-snapshot info DIR
    keras-snapshot build DIR -o ensemble.keras [--last M] [--output-activation softmax] [--fuse]
    keras-snapshot export ensemble.keras SERVING_DIR [--version N] [--member-outputs]
    keras-snapshot evaluate DIR --data test.npz [--x x] [--y y]

User errors (bad paths, bad data, out-of-range options) end with one line on stderr and exit
status 1 (2 for bad command-line syntax), without a traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

__all__ = ["main"]

PROG = "keras-snapshot"
_REEXEC_FLAG = "KERAS_SNAPSHOT_EXPORT_REEXEC"


class UserError(Exception):
    """A problem with the user's paths, data or options: reported in one line."""


# ---------------------------------------------------------------------------------------- helpers
def _format_value(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = []
    for row in [header, *rows]:
        cells = [
            str(cell).ljust(w) if i == 0 else str(cell).rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _snapshot_directory(path: str) -> tuple[Path, dict]:
    from keras_snapshot import manifest as manifest_lib

    directory = Path(path)
    if not directory.is_dir():
        raise UserError(f"{path!r} is not a directory (expected a snapshot directory with manifest.json).")
    manifest = manifest_lib.read_manifest(directory)
    if manifest is None:
        raise UserError(
            f"{path!r} has no manifest.json: it is not a snapshot directory written by SnapshotCallback."
        )
    return directory, manifest


# ---------------------------------------------------------------------------------------- commands
def _info(args) -> int:
    directory, manifest = _snapshot_directory(args.directory)
    entries = sorted(manifest["snapshots"], key=lambda entry: entry["cycle"])
    print(
        f"{directory}: {len(entries)} of {manifest.get('cycles', '?')} snapshots, "
        f"{manifest.get('total_steps', '?')} steps, cycles of {manifest.get('cycle_length', '?')} steps, "
        f"initial learning rate {_format_value(manifest.get('initial_learning_rate'))}"
    )
    if not entries:
        print("(no snapshots yet)")
        return 0
    log_keys = []
    for entry in entries:
        for key in entry.get("logs") or {}:
            if key not in log_keys and key != "learning_rate":
                log_keys.append(key)
    header = ["cycle", "step", "epoch", "learning_rate", *log_keys, "file"]
    rows = []
    for entry in entries:
        logs = entry.get("logs") or {}
        present = (directory / entry["file"]).is_file()
        rows.append(
            [
                str(entry["cycle"]),
                str(entry["step"]),
                _format_value(entry.get("epoch")),
                f"{entry['learning_rate']:.3g}" if isinstance(entry.get("learning_rate"), float) else "-",
                *(_format_value(logs.get(key)) for key in log_keys),
                entry["file"] + ("" if present else " (missing)"),
            ]
        )
    print(_table(header, rows))
    return 0


def _build(args) -> int:
    from keras_snapshot.ensemble import build_ensemble
    from keras_snapshot.manifest import atomic_write
    from keras_snapshot.members import snapshot_sources

    output = Path(args.output)
    if output.suffix != ".keras":
        raise UserError(f"The output file must end in .keras, got {args.output!r}.")
    if output.parent and not output.parent.is_dir():
        raise UserError(f"The output's directory {str(output.parent)!r} does not exist.")
    ensemble = build_ensemble(
        args.directory,
        last=args.last,
        output_activation=args.output_activation,
        safe_mode=not args.unsafe,
        fuse=args.fuse,
    )
    atomic_write(output, ensemble.save, suffix=".keras")
    members = [name for name, _, _ in snapshot_sources(args.directory, args.last)]
    form = ", fused" if args.fuse else ""
    print(f"Wrote {output}: the mean of {len(members)} snapshot(s) ({', '.join(members)}{form}).")
    return 0


def _export(args, argv: list[str]) -> int:
    import keras

    from keras_snapshot.export import _backend_problem, export_saved_model
    from keras_snapshot.members import load_model

    if not Path(args.model).is_file():
        raise UserError(f"Model file {args.model!r} does not exist.")
    if Path(args.serving_dir).exists() and not Path(args.serving_dir).is_dir():
        raise UserError(f"{args.serving_dir!r} exists and is not a directory.")
    # Loaded here on every backend, so that a corrupt or unsafe file is reported by this process.
    model = load_model(Path(args.model), safe_mode=not args.unsafe)
    if (
        keras.backend.backend() != "tensorflow"
        and _backend_problem(args.format)
        and importlib.util.find_spec("tensorflow") is not None
        and not os.environ.get(_REEXEC_FLAG)
    ):
        # E.g. torch cannot write a SavedModel; the .keras file is backend-independent, so the
        # same command runs again under TensorFlow.
        print(
            f"keras-snapshot: exporting with the TensorFlow backend ({keras.backend.backend()} cannot "
            f"write {args.format} here).",
            file=sys.stderr,
        )
        env = {**os.environ, "KERAS_BACKEND": "tensorflow", _REEXEC_FLAG: "1"}
        return subprocess.run(
            [sys.executable, "-m", "keras_snapshot.cli", *argv], env=env, check=False
        ).returncode
    target = export_saved_model(
        model,
        args.serving_dir,
        version=args.version,
        member_outputs=args.member_outputs,
        overwrite=args.overwrite,
        format=args.format,
    )
    print(f"Wrote {target} ({args.format}, version {target.name}).")
    return 0


def _load_data(path: str, x_names: list[str] | None, y_name: str, input_names: list[str]):
    import numpy as np

    if not Path(path).is_file():
        raise UserError(f"Data file {path!r} does not exist.")
    try:
        archive = np.load(path, allow_pickle=False)
        arrays = {name: archive[name] for name in archive.files}
    except Exception as error:
        raise UserError(
            f"{path!r} is not a .npz file of numpy arrays ({type(error).__name__}: {error})."
        ) from None
    if not isinstance(arrays, dict) or not arrays:
        raise UserError(f"{path!r} holds no arrays.")
    if x_names is None:
        x_names = ["x"] if len(input_names) == 1 else input_names
    if len(x_names) != len(input_names):
        raise UserError(
            f"The model has {len(input_names)} inputs ({', '.join(input_names)}) but --x names {len(x_names)} "
            "array(s): pass --x once per input, in that order."
        )
    for name in [*x_names, y_name]:
        if name not in arrays:
            option = "--y" if name == y_name else "--x"
            raise UserError(
                f"{path!r} has no array {name!r} (it holds: {', '.join(sorted(arrays))}); pass {option} NAME."
            )
    rows = {name: arrays[name].shape[0] if arrays[name].ndim else 0 for name in [*x_names, y_name]}
    if len(set(rows.values())) != 1 or not next(iter(rows.values())):
        raise UserError(f"{path!r}: the arrays must have the same, non-zero number of rows, got {rows}.")
    return [arrays[name] for name in x_names], arrays[y_name], x_names


def _evaluate(args) -> int:
    import keras
    import numpy as np

    from keras_snapshot.members import input_items, load_members, member_graph
    from keras_snapshot.weights import loss_name as pick_loss
    from keras_snapshot.weights import objective

    _snapshot_directory(args.directory)
    if not Path(args.data).is_file():  # before the snapshots are loaded
        raise UserError(f"Data file {args.data!r} does not exist.")
    members = load_members(args.directory, None, not args.unsafe)
    inputs, keys, _, taps = member_graph(members, args.output_activation)
    if len(keys) != 1:
        raise UserError(f"evaluate supports single-output models; these snapshots have outputs {keys}.")
    input_items = input_items(members[0].model, members[0].label)
    x_arrays, y, x_names = _load_data(args.data, args.x, args.y, [key for key, _ in input_items])
    for name, array, (key, tensor) in zip(x_names, x_arrays, input_items, strict=True):
        expected = tuple(tensor.shape)[1:]
        if array.ndim != len(expected) + 1 or any(
            e is not None and e != a for e, a in zip(expected, array.shape[1:], strict=True)
        ):
            raise UserError(
                f"{args.data!r}: array {name!r} has shape {array.shape}, the model's input {key!r} expects "
                f"(N, {', '.join('?' if e is None else str(e) for e in expected)})."
            )
    x = (
        dict(zip([key for key, _ in input_items], x_arrays, strict=True))
        if len(x_arrays) > 1
        else x_arrays[0]
    )
    key = keys[0]
    tap_model = keras.Model(inputs, [taps[member.name][key] for member in members])
    # One predict pass runs every snapshot once; ensembles of the last m are means of these.
    predictions = keras.tree.flatten(tap_model.predict(x, batch_size=args.batch_size, verbose=0))
    stack = np.stack([np.asarray(p, dtype="float64") for p in predictions])

    y = np.asarray(y)
    classes = stack.shape[-1]
    if classes > 1 and y.shape in (stack.shape[1:-1], (*stack.shape[1:-1], 1), stack.shape[1:]):
        kind = "categorical"
    elif classes == 1 and y.size == stack[0].size and np.isin(y, (0, 1)).all():
        kind = "binary"
    elif y.size == stack[0].size:
        kind = "regression"
    else:
        raise UserError(f"{args.data!r}: y has shape {y.shape}, the snapshots' output {stack.shape[1:]}.")
    try:
        loss_name = "mean_squared_error" if kind == "regression" else pick_loss(None, stack, y, key)
    except ValueError:
        loss_name = None  # logits: accuracy still ranks, a cross-entropy would be meaningless

    def scores(subset: np.ndarray) -> list[str]:
        mean = subset.mean(axis=0)
        row = []
        if kind == "categorical":
            labels = y.argmax(-1) if y.shape == mean.shape else y.reshape(mean.shape[:-1])
            row.append(f"{np.mean(mean.argmax(-1) == labels):.4f}")
        elif kind == "binary":
            row.append(f"{np.mean((mean.reshape(y.shape) > 0.5) == y):.4f}")
        if loss_name is not None:
            weights = np.full(len(subset), 1.0 / len(subset))
            row.append(f"{objective(loss_name, subset, y, key)(weights)[0]:.4f}")
        return row

    header = ["model"] + (["accuracy"] if kind != "regression" else []) + ([loss_name] if loss_name else [])
    rows = [[member.name, *scores(stack[i : i + 1])] for i, member in enumerate(members)]
    for m in range(1, len(members) + 1):
        rows.append([f"ensemble of last {m}", *scores(stack[len(members) - m :])])
    print(f"{args.data}: {stack.shape[1]} examples, {len(members)} snapshots from {args.directory}")
    print(_table(header, rows))
    if loss_name is None:
        print(
            "note: the snapshots do not output probabilities; pass --output-activation softmax to average "
            "probabilities, as the paper does."
        )
    return 0


# ---------------------------------------------------------------------------------------- parser
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Snapshot Ensembles for Keras 3: inspect, build, export and evaluate snapshots.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = commands.add_parser("info", help="table of the snapshots in a snapshot directory")
    info.add_argument("directory", metavar="DIR")

    unsafe = {
        "action": "store_true",
        "help": "load files in unsafe mode (Lambda layers); only for trusted files",
    }
    activation = {
        "metavar": "NAME",
        "help": "activation applied to each snapshot's output before averaging (softmax for logits)",
    }
    build = commands.add_parser("build", help="build the ensemble model and save it as .keras")
    build.add_argument("directory", metavar="DIR")
    build.add_argument("-o", "--output", required=True, metavar="FILE.keras")
    build.add_argument("--last", type=_positive_int, metavar="M", help="use only the last M snapshots")
    build.add_argument("--output-activation", **activation)
    build.add_argument("--unsafe", **unsafe)
    build.add_argument(
        "--fuse",
        action="store_true",
        help="stack the members into one set of wider layers: faster for small batches (see README)",
    )

    export = commands.add_parser("export", help="export a .keras model as a versioned TF Serving directory")
    export.add_argument("model", metavar="MODEL.keras")
    export.add_argument("serving_dir", metavar="SERVING_DIR", help="the model's base path for TF Serving")
    export.add_argument("--version", type=_positive_int, metavar="N", help="default: the next free version")
    export.add_argument(
        "--member-outputs", action="store_true", help="also output each snapshot's prediction"
    )
    export.add_argument("--overwrite", action="store_true", help="replace an existing version")
    export.add_argument("--format", choices=["tf_saved_model", "onnx"], default="tf_saved_model")
    export.add_argument("--unsafe", **unsafe)

    evaluate = commands.add_parser(
        "evaluate", help="metrics of each snapshot and of the ensembles of the last m = 1..M snapshots"
    )
    evaluate.add_argument("directory", metavar="DIR")
    evaluate.add_argument(
        "--data", required=True, metavar="FILE.npz", help="a .npz file with inputs and targets"
    )
    evaluate.add_argument(
        "--x",
        action="append",
        metavar="NAME",
        help="input array name, once per model input (default: x, or the model's input names)",
    )
    evaluate.add_argument("--y", default="y", metavar="NAME", help="target array name (default: y)")
    evaluate.add_argument("--batch-size", type=_positive_int, default=256, metavar="N")
    evaluate.add_argument("--output-activation", **activation)
    evaluate.add_argument("--unsafe", **unsafe)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the `keras-snapshot` command line; returns the exit status.

    Args:
        argv: the arguments after the program name; None reads `sys.argv`.

    Example:

    ```python
    from keras_snapshot.cli import main
    main(["info", "snapshots"])   # same as `keras-snapshot info snapshots` in a shell
    ```
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    try:
        if args.command == "info":
            return _info(args)
        if args.command == "build":
            return _build(args)
        if args.command == "export":
            return _export(args, argv)
        return _evaluate(args)
    except (UserError, ValueError, OSError, RuntimeError) as error:
        # Keras's messages span lines; a user error gets one.
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
