"""The `keras-snapshot` command line: inspect, build, export, evaluate, distil and average snapshots.

    keras-snapshot info DIR
    keras-snapshot build DIR -o ensemble.keras [--last M] [--output-activation softmax] [--fuse]
                         [--weights fit|greedy] [--abstain-coverage C [--abstain-score S]]
                         [--validation-data val.npz]
    keras-snapshot export ensemble.keras SERVING_DIR [--version N] [--member-outputs] [--overwrite]
    keras-snapshot evaluate DIR --data test.npz [--x NAME ...] [--y NAME] [--last M]
                            [--temperature T|fit --validation-data val.npz] [--ood ood.npz] [--bins 15]
    keras-snapshot distill DIR --data train.npz -o student.keras [--y NAME] [--epochs N] ...
    keras-snapshot average DIR --bn-data train.npz -o averaged.keras [--validation-data val.npz]

`--help` (and `info`) never import Keras, TensorFlow or numpy: each sub-command imports what it
needs when it runs. TensorFlow's C++ logging is turned down (TF_CPP_MIN_LOG_LEVEL=2 unless set) and
its Python logging to errors. The lines TensorFlow's native code prints while it loads, before that
setting takes effect (absl's notice, oneDNN and CPU-instruction notes: which ones depends on the CPU),
are caught at the file-descriptor level during the import and dropped; anything else printed then is
replayed on stderr. So on success stderr holds only the command's own lines.

Errors. A failing command ends in one of two ways:

- a problem with the user's input (a path, a data file, an option value, a file that does not
  load, with its cause) prints one line, `keras-snapshot: error: ...`, on stderr and exits with 1;
  bad command-line syntax exits with 2 (argparse);
- anything else, an unexpected exception inside keras-snapshot, Keras or TensorFlow, prints the
  full traceback followed by one line saying it is a bug to report, and exits with 1. A traceback
  is what a bug report needs, so it is shown without asking.

`--traceback` (accepted before or after the sub-command) prints the traceback of user errors too,
e.g. to see the Keras error behind a file that does not load.

Which is which (`_is_user_error`): the CLI's own checks raise `UserError`; otherwise an exception
counts as a user error when keras-snapshot's own argument and data checks raised it, i.e. the last
frame of its traceback is a `raise` statement in a keras_snapshot module (not keras_internals,
whose errors mean Keras's internals changed) and it is a ValueError, TypeError, OSError or
RuntimeError. The library raises exactly these types, with a clear message, for bad input, and
re-raises load failures with their cause (`members.load_model`). An exception raised deeper, inside
Keras, TensorFlow or numpy, or a KeyError/AttributeError/... anywhere, was not anticipated by a
check, so its message alone would not help: it shows the traceback. One more case is the user's:
an OSError carrying a file name (permission denied, disk full, a missing file), whoever raised it.
Messages of library errors are put in command-line terms (`last=None` becomes "no --last"); the
options are also checked up front, before anything is loaded, so most errors are the CLI's own.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import math
import os
import re
import subprocess
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

__all__ = ["main"]

PROG = "keras-snapshot"
_REEXEC_FLAG = "KERAS_SNAPSHOT_EXPORT_REEXEC"
_PACKAGE = Path(__file__).resolve().parent


class UserError(Exception):
    """A problem with the user's paths, data or options: reported in one line."""


# ---------------------------------------------------------------------------------------- errors
def _is_user_error(error: BaseException) -> bool:
    """True for errors in the user's input, False for unexpected ones (see the module docstring)."""
    if isinstance(error, UserError):
        return True
    if isinstance(error, OSError) and error.filename is not None:
        return True  # the file system refused: permissions, a full disk, a missing file
    if not isinstance(error, (ValueError, TypeError, OSError, RuntimeError)):
        return False
    if type(error).__module__ == "keras_snapshot.keras_internals":
        return False
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return False
    last = frames[-1]
    source = Path(last.filename).resolve()
    if source.parent != _PACKAGE or source.name == "keras_internals.py":
        return False
    return (last.line or "").lstrip().startswith("raise ")


# The library's Python-API words for the options this CLI passes, and their command-line names.
_FLAGS = {"overwrite": "--overwrite", "member_outputs": "--member-outputs", "fuse": "--fuse"}
_OPTIONS = {
    "last": "--last",
    "version": "--version",
    "output_activation": "--output-activation",
    "temperature": "--temperature",
    "alpha": "--alpha",
    "epochs": "--epochs",
    "batch_size": "--batch-size",
    "bins": "--bins",
    "validation_data": "--validation-data",
    "bn_data": "--bn-data",
}


def _cli_terms(message: str) -> str:
    """`last=None`, `overwrite=True`, `safe_mode=False`, ... in the library's messages, as options."""
    message = re.sub(r"\bsafe_mode=False\b", "--unsafe", message)
    for name, flag in _FLAGS.items():
        message = re.sub(rf"`?\b{name}=True\b`?", flag, message)
        message = re.sub(rf"`?\b{name}=False\b`?", f"no {flag}", message)
    for name, option in _OPTIONS.items():
        message = re.sub(rf"`?\b{name}=None\b`?", f"no {option}", message)
        message = re.sub(rf"`?\b{name}`?=(['\"]?)([\w.+-]+)\1`?", rf"{option} \2", message)
        message = re.sub(rf"`{name}`", option, message)
        message = re.sub(rf"(\d\s*<=?\s*){name}(\s*<=?\s*\d)", rf"\1{option}\2", message)
    return message


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings as one line each: `keras-snapshot: AveragingWarning: ...`."""
    return f"{PROG}: {category.__name__}: {_cli_terms(_one_line(message))}\n"


def _quiet_startup() -> None:
    """Keeps TensorFlow's and absl's start-up logging out of the output (before they are imported)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


# What TensorFlow's native code prints on stderr while it loads, before absl's logging starts (so
# TF_CPP_MIN_LOG_LEVEL cannot silence it): absl's notice, then INFO/WARNING lines of the files that
# report the CPU set-up at import (port.cc: oneDNN on, or TF_ENABLE_ONEDNN_OPTS unreadable;
# cpu_feature_guard.cc: unused CPU instructions, with its continuation line). Which of them appear
# depends on the CPU (oneDNN is on by default where AVX-512 VNNI/BF16 or AMX exist).
_STARTUP_NOISE = re.compile(
    r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|[IW]\d{4} [\d:.]+ +\d+ (port|cpu_feature_guard)\.cc:\d+\] .*"
    r"|To enable the following instructions: .* rebuild TensorFlow with the appropriate compiler flags\."
)


@contextlib.contextmanager
def _startup_noise_filtered():
    """Runs the block with file descriptor 2 pointed at a temporary file, then replays on stderr
    every captured line that is not TensorFlow's known start-up noise, so that a real error printed
    during an import is never swallowed. Turning oneDNN off instead would change numerics and speed.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            lines = capture.read().decode(errors="replace").splitlines(keepends=True)
            kept = [line for line in lines if not _STARTUP_NOISE.fullmatch(line.rstrip("\r\n"))]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def _import_keras(writes_files: bool = False):
    """Imports Keras (so TensorFlow on its backend) for a sub-command that needs it, with
    TensorFlow's native start-up lines filtered and its Python logging turned down.

    `writes_files`: the command saves a `.keras` file or exports, for which Keras imports TensorFlow
    (when it is installed) on every backend; it is then imported here, inside the filter.
    """
    import logging

    with _startup_noise_filtered():
        import keras

        if writes_files and importlib.util.find_spec("tensorflow") is not None:
            import tensorflow  # noqa: F401
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    if "absl.logging" in sys.modules:
        sys.modules["absl.logging"].set_verbosity("error")
    return keras


# ---------------------------------------------------------------------------------------- helpers
def _format_value(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def _metric(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return _format_value(value)
    value = float(value)
    return f"{value:.4f}" if math.isfinite(value) else str(value)


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


def _snapshot_directory(path: str, last: int | None = None, need_snapshots: bool = True) -> tuple[Path, dict]:
    """The directory and its manifest; `--last` checked against the snapshots it lists."""
    from keras_snapshot import manifest as manifest_lib

    directory = Path(path)
    if not directory.exists():
        raise UserError(f"Snapshot directory {path!r} does not exist.")
    if not directory.is_dir():
        raise UserError(f"{path!r} is not a directory (expected a snapshot directory with manifest.json).")
    manifest = manifest_lib.read_manifest(directory)
    if manifest is None:
        raise UserError(
            f"{path!r} has no manifest.json: it is not a snapshot directory written by SnapshotCallback."
        )
    count = len(manifest.get("snapshots") or [])
    if count == 0 and need_snapshots:
        raise UserError(f"{path!r} holds no snapshots yet: train until at least one cycle has ended.")
    if last is not None and last > count:
        raise UserError(
            f"--last {last} is out of range: {path!r} holds {count} snapshot(s). Pass --last 1 to "
            f"{count}, or leave --last out for all of them."
        )
    return directory, manifest


def _output_file(path: str) -> Path:
    output = Path(path)
    if output.suffix != ".keras":
        raise UserError(f"The output file must end in .keras, got {path!r}.")
    if output.is_dir():
        raise UserError(f"The output {path!r} is a directory; name a .keras file.")
    if not output.parent.is_dir():
        raise UserError(f"The output's directory {str(output.parent)!r} does not exist.")
    return output


def _data_file(path: str, option: str) -> str:
    if not Path(path).exists():
        raise UserError(f"Data file {path!r} ({option}) does not exist.")
    if Path(path).is_dir():
        raise UserError(f"{path!r} ({option}) is a directory; pass a .npz file.")
    return path


def _load_members(args):
    """The snapshots to use, each loaded once (load failures name their cause)."""
    from keras_snapshot.members import load_members

    return load_members(args.directory, args.last, not args.unsafe)


def _load_data(path: str, option: str, x_names, y_name, members):
    """(x, y) from a .npz file, checked against the members' inputs; y is None when `y_name` is None.

    x is one array for a single-input model, else a dict by input name (in the model's order).
    """
    import numpy as np

    from keras_snapshot.inputs import input_items

    items = input_items(members[0].model, members[0].label)
    input_names = [key for key, _ in items]
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except Exception as error:
        raise UserError(
            f"{path!r} ({option}) is not a .npz file of numpy arrays ({type(error).__name__}: "
            f"{_one_line(error)})."
        ) from None
    if not arrays:
        raise UserError(f"{path!r} ({option}) holds no arrays.")
    if x_names is None:
        x_names = ["x"] if len(input_names) == 1 else input_names
    if len(x_names) != len(input_names):
        raise UserError(
            f"The model has {len(input_names)} inputs ({', '.join(input_names)}) but --x names {len(x_names)} "
            "array(s): pass --x once per input, in that order."
        )
    wanted = [*x_names, *([y_name] if y_name is not None else [])]
    for name in wanted:
        if name not in arrays:
            flag = "--y" if name == y_name and name not in x_names else "--x"
            raise UserError(
                f"{path!r} ({option}) has no array {name!r} (it holds: {', '.join(sorted(arrays))}); "
                f"pass {flag} NAME."
            )
    rows = {name: arrays[name].shape[0] if arrays[name].ndim else 0 for name in wanted}
    if len(set(rows.values())) != 1 or not next(iter(rows.values())):
        raise UserError(
            f"{path!r} ({option}): the arrays must have the same, non-zero number of rows, got {rows}."
        )
    for name, (key, tensor) in zip(x_names, items, strict=True):
        array, expected = arrays[name], tuple(tensor.shape)[1:]
        if array.ndim != len(expected) + 1 or any(
            e is not None and e != a for e, a in zip(expected, array.shape[1:], strict=True)
        ):
            raise UserError(
                f"{path!r} ({option}): array {name!r} has shape {array.shape}, the model's input {key!r} "
                f"expects (N, {', '.join('?' if e is None else str(e) for e in expected)})."
            )
    from keras_snapshot.inputs import check_finite

    for name in wanted:  # the library's rule: NaN / inf refused, naming the count and the first row
        try:
            check_finite(arrays[name], name)
        except ValueError as error:
            raise UserError(f"{path!r} ({option}): {error}") from None
    x = (
        arrays[x_names[0]]
        if len(x_names) == 1
        else {key: arrays[name] for name, key in zip(x_names, input_names, strict=True)}
    )
    return x, (arrays[y_name] if y_name is not None else None)


def _member_name(value, members) -> str:
    """A member as the library names it when given a list of models -> its snapshot name.

    By position: `snapshot_01` (rows of evaluate_ensemble) or `model #1 ('name')` (labels)."""
    from keras_snapshot.members import MEMBER_PREFIX

    text = str(value)
    match = re.fullmatch(rf"{MEMBER_PREFIX}(\d+)|model #(\d+) \(.*\)", text)
    if match:
        position = int(match.group(1) or match.group(2))
        if 1 <= position <= len(members):
            return members[position - 1].name
    return text


def _check_activation(keras, name: str | None) -> None:
    if name is None:
        return
    try:
        keras.activations.get(name)
    except (ValueError, TypeError):
        raise UserError(
            f"--output-activation {name!r} is not a Keras activation; use e.g. softmax or sigmoid."
        ) from None


# ---------------------------------------------------------------------------------------- commands
def _info(args) -> int:
    directory, manifest = _snapshot_directory(args.directory, need_snapshots=False)
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
    output = _output_file(args.output)
    _snapshot_directory(args.directory, args.last)
    needs = [f"--weights {args.weights}"] if args.weights is not None else []
    needs += [f"--abstain-coverage {args.abstain_coverage:g}"] if args.abstain_coverage is not None else []
    if needs and args.validation_data is None:
        raise UserError(
            f"{' and '.join(needs)} needs --validation-data val.npz (held-out validation data, never the "
            "test set)."
        )
    if args.validation_data is not None:
        if not needs:
            raise UserError(
                "--validation-data is used only with --weights fit|greedy or --abstain-coverage C."
            )
        _data_file(args.validation_data, "--validation-data")
    if args.abstain_score is not None and args.abstain_coverage is None:
        raise UserError("--abstain-score is used only with --abstain-coverage C.")
    if args.abstain_coverage == 0:
        raise UserError("--abstain-coverage must be above 0 (the fraction of validation inputs kept).")
    keras = _import_keras(writes_files=True)
    _check_activation(keras, args.output_activation)

    from keras_snapshot.ensemble import ABSTAIN_LAYER, build_ensemble
    from keras_snapshot.manifest import atomic_write
    from keras_snapshot.members import snapshot_sources

    snapshots, validation = args.directory, None
    if needs:
        loaded = _load_members(args)
        # Labels only where the weights are fitted: the abstain threshold needs the inputs alone.
        y_name = args.y if args.weights is not None else None
        validation = _load_data(args.validation_data, "--validation-data", args.x, y_name, loaded)
        snapshots = [member.model for member in loaded]
    abstain = {}
    if args.abstain_coverage is not None:
        abstain = {
            "abstain_coverage": args.abstain_coverage,
            "abstain_score": args.abstain_score or "entropy",
        }
    ensemble = build_ensemble(
        snapshots,
        last=args.last if not needs else None,
        output_activation=args.output_activation,
        safe_mode=not args.unsafe,
        fuse=args.fuse,
        weights=args.weights,
        validation_data=validation,
        **abstain,
    )
    atomic_write(output, ensemble.save, suffix=".keras")
    members = [name for name, _, _ in snapshot_sources(args.directory, args.last)]
    form = ", fused" if args.fuse else ""
    if abstain:
        threshold = -float(ensemble.get_layer(ABSTAIN_LAYER).offset)
        form += (
            f"; output 'abstain' = 1 where {abstain['abstain_score']} > {threshold:.6g} (keeps "
            f"{args.abstain_coverage:.0%} of {args.validation_data})"
        )
    if args.weights is None:
        print(f"Wrote {output}: the mean of {len(members)} snapshot(s) ({', '.join(members)}{form}).")
        return 0
    kept = sum(weight > 0 for weight in ensemble.ensemble_weights)
    how = "greedy selection" if args.weights == "greedy" else "weights fitted"
    print(f"Wrote {output}: {kept} of {len(members)} snapshot(s), {how} on {args.validation_data}{form}.")
    header = ["snapshot", *(["count"] if args.weights == "greedy" else []), "weight"]
    counts = getattr(ensemble, "selection_counts", None)
    rows = [
        [name, *([str(counts[i])] if counts is not None else []), f"{weight:.4f}"]
        for i, (name, weight) in enumerate(zip(members, ensemble.ensemble_weights, strict=True))
    ]
    print(_table(header, rows))
    return 0


def _export(args, argv: list[str]) -> int:
    model_path, serving_dir = Path(args.model), Path(args.serving_dir)
    if model_path.is_dir():
        raise UserError(
            f"{args.model!r} is a directory; pass the .keras file (e.g. from keras-snapshot build)."
        )
    if not model_path.exists():
        raise UserError(f"Model file {args.model!r} does not exist.")
    if serving_dir.exists() and not serving_dir.is_dir():
        raise UserError(f"{args.serving_dir!r} exists and is not a directory.")
    if args.version is not None and (serving_dir / str(args.version)).exists() and not args.overwrite:
        raise UserError(
            f"Version {args.version} already exists: {str(serving_dir / str(args.version))!r}. Pass another "
            "--version, leave --version out for the next free one, or add --overwrite to replace it."
        )
    keras = _import_keras(writes_files=True)

    from keras_snapshot.export import export_saved_model
    from keras_snapshot.members import load_model

    # Loaded here on every backend, so that a file that does not load is reported by this process.
    model = load_model(model_path, safe_mode=not args.unsafe, what="model")
    backend = keras.backend.backend()
    tensorflow_installed = importlib.util.find_spec("tensorflow") is not None
    reexec = not os.environ.get(_REEXEC_FLAG)
    if backend == "torch" and args.format == "tf_saved_model" and tensorflow_installed and reexec:
        # torch cannot write a SavedModel; the .keras file is backend-independent, so the
        # same command runs again under TensorFlow.
        print(
            f"{PROG}: exporting with the TensorFlow backend (torch cannot write {args.format}).",
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


def _evaluate(args) -> int:
    _snapshot_directory(args.directory, args.last)
    _data_file(args.data, "--data")
    if args.temperature == "fit" and args.validation_data is None:
        raise UserError(
            "--temperature fit needs --validation-data val.npz (fit the temperature on validation data, "
            "never on the test set)."
        )
    if args.validation_data is not None:
        if args.temperature != "fit":
            raise UserError("--validation-data is used only with --temperature fit.")
        _data_file(args.validation_data, "--validation-data")
    if args.ood is not None:
        _data_file(args.ood, "--ood")
    keras = _import_keras()
    _check_activation(keras, args.output_activation)

    from keras_snapshot.evaluation import evaluate_ensemble

    members = _load_members(args)
    x, y = _load_data(args.data, "--data", args.x, args.y, members)
    validation = None
    if args.validation_data is not None:
        validation = _load_data(args.validation_data, "--validation-data", args.x, args.y, members)
    ood = None if args.ood is None else _load_data(args.ood, "--ood", args.x, None, members)[0]
    rows = evaluate_ensemble(
        [member.model for member in members],
        x,
        y,
        temperature=args.temperature,
        validation_data=validation,
        batch_size=args.batch_size,
        output_activation=args.output_activation,
        bins=args.bins,
        ood=ood,
    )
    columns = []
    for row in rows:
        for key in row:
            if key not in ("model", "m", "ood", "ood_ts") and key not in columns:
                columns.append(key)
    if "temperature" in columns:  # after the metrics it scales
        columns.append(columns.pop(columns.index("temperature")))
    table = [
        [_member_name(row["model"], members), *(_metric(row.get(key)) for key in columns)] for row in rows
    ]
    examples = len(y)
    print(f"{args.data}: {examples} examples, {len(members)} snapshots from {args.directory}")
    print(_table(["model", *columns], table))
    if ood is not None:
        _print_ood(args.ood, rows, members)
    return 0


def _print_ood(path: str, rows: list[dict], members) -> None:
    """One line per model and uncertainty score: OOD AUROC, AUPR and FPR95 (and after scaling)."""
    metrics = ("auroc", "aupr", "fpr95")
    scaled = "ood_ts" in rows[0]
    header = ["model", "score", *metrics, *(f"{metric}_ts" for metric in metrics if scaled)]
    table = []
    for row in rows:
        for score, values in row["ood"].items():
            after = [row["ood_ts"][score][metric] for metric in metrics] if scaled else []
            table.append(
                [
                    _member_name(row["model"], members),
                    score,
                    *(_metric(values[metric]) for metric in metrics),
                    *(_metric(value) for value in after),
                ]
            )
    print(f"\nOut-of-distribution detection ({path} positive; scores: higher = more likely OOD):")
    print(_table(header, table))


def _distill(args) -> int:
    output = _output_file(args.output)
    _snapshot_directory(args.directory, args.last)
    _data_file(args.data, "--data")
    if args.validation_data is not None:
        _data_file(args.validation_data, "--validation-data")
    keras = _import_keras(writes_files=True)
    _check_activation(keras, args.output_activation)

    from keras_snapshot.distillation import FALLBACK_EPOCHS, default_optimizer, distill, teacher_epochs
    from keras_snapshot.manifest import atomic_write

    members = _load_members(args)
    x, y = _load_data(args.data, "--data", args.x, args.y, members)
    validation = None
    if args.validation_data is not None:
        x_val, y_val = _load_data(args.validation_data, "--validation-data", args.x, args.y, members)
        validation = x_val if y_val is None else (x_val, y_val)
    # The members are loaded without their optimizers: the default recipe (the teacher's optimizer at its
    # alpha0, decayed to zero) is read from the directory, as distill(directory, ...) would.
    rows = keras.tree.flatten(x)[0].shape[0]
    if args.epochs is None:  # distill's default: as long as the snapshot run
        args.epochs = teacher_epochs(args.directory, args.last) or FALLBACK_EPOCHS
    optimizer = default_optimizer(args.directory, args.last, -(-rows // args.batch_size) * args.epochs)
    student = distill(
        [member.model for member in members],
        x,
        optimizer=optimizer,
        y=y,
        validation_data=validation,
        epochs=args.epochs,
        batch_size=args.batch_size,
        temperature=args.temperature,
        alpha=args.alpha,
        verbose=2,
        output_activation=args.output_activation,
    )
    atomic_write(output, student.save, suffix=".keras")
    labels = f", with the hard labels {args.y!r} (alpha {args.alpha:g})" if y is not None else ""
    print(
        f"Wrote {output}: a student distilled from {len(members)} snapshot(s) "
        f"({', '.join(member.name for member in members)}) in {args.epochs} epoch(s){labels}."
    )
    return 0


def _average(args) -> int:
    output = _output_file(args.output)
    _snapshot_directory(args.directory, args.last)
    if args.bn_data is not None:
        _data_file(args.bn_data, "--bn-data")
    if args.validation_data is not None:
        _data_file(args.validation_data, "--validation-data")
    _import_keras(writes_files=True)

    from keras_snapshot.averaging import average_weights
    from keras_snapshot.manifest import atomic_write

    members = _load_members(args)
    bn_data = None
    if args.bn_data is not None:
        bn_data, _ = _load_data(args.bn_data, "--bn-data", args.x, None, members)
    validation = None
    if args.validation_data is not None:
        validation = _load_data(args.validation_data, "--validation-data", args.x, args.y, members)
    averaged = average_weights(
        [member.model for member in members],
        bn_data=bn_data,
        validation_data=validation,
        batch_size=args.batch_size,
    )
    atomic_write(output, averaged.save, suffix=".keras")
    print(
        f"Wrote {output}: the weight average of {len(members)} snapshot(s) "
        f"({', '.join(member.name for member in members)})."
    )
    report = getattr(averaged, "averaging_report", None)
    if isinstance(report, dict):
        rows = []
        for key, label in (
            ("averaged", "weight average"),
            ("best_member", "best member"),
            ("ensemble", None),
        ):
            entry = report.get(key)
            if not isinstance(entry, dict):
                continue
            if label is None:
                label = f"ensemble of {len(members)}"
            elif key == "best_member" and entry.get("model") is not None:
                label = f"best member ({_member_name(entry['model'], members)})"
            rows.append([label, _metric(entry.get("nll")), _metric(entry.get("error"))])
        if rows:
            print(f"{args.validation_data}:")
            print(_table(["model", "nll", "error"], rows))
        # When the average is worse, average_weights warns (one line on stderr) and says what to do.
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


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _temperature(text: str) -> float | str:
    if text == "fit":
        return text
    try:
        return _positive_float(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'fit', got {text!r}") from None


# build_ensemble's abstain scores (ensemble.ABSTAIN_SCORES; a test checks they agree): --help imports no Keras.
ABSTAIN_SCORES = ("max_probability", "entropy", "mutual_information", "disagreement")


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    # --traceback before or after the sub-command; SUPPRESS keeps a sub-parser from resetting it.
    after = argparse.ArgumentParser(add_help=False)
    after.add_argument("--traceback", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Snapshot Ensembles for Keras 3: inspect, build, export, evaluate, distil and "
        "average snapshots.",
        epilog="Errors in your input end in one line (exit status 1); unexpected errors show a traceback.",
    )
    parser.add_argument(
        "--traceback", action="store_true", help="also print the traceback of errors in your input"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, description=help, parents=[after])

    info = command("info", "table of the snapshots in a snapshot directory")
    info.add_argument("directory", metavar="DIR")

    def unsafe(sub):
        sub.add_argument(
            "--unsafe",
            action="store_true",
            help="load files in unsafe mode (Lambda layers); only for files you trust",
        )

    def activation(sub):
        sub.add_argument(
            "--output-activation",
            metavar="NAME",
            help="activation applied to each snapshot's output before averaging (softmax for logits)",
        )

    def last(sub):
        sub.add_argument("--last", type=_positive_int, metavar="M", help="use only the last M snapshots")

    def data_names(sub, y_help: str, y_default):
        sub.add_argument(
            "--x",
            action="append",
            metavar="NAME",
            help="input array name, once per model input (default: x, or the model's input names)",
        )
        sub.add_argument("--y", default=y_default, metavar="NAME", help=y_help)

    build = command("build", "build the ensemble model and save it as .keras")
    build.add_argument("directory", metavar="DIR")
    build.add_argument("-o", "--output", required=True, metavar="FILE.keras")
    last(build)
    activation(build)
    unsafe(build)
    build.add_argument(
        "--fuse",
        action="store_true",
        help="stack the members into one set of wider layers: faster for small batches",
    )
    build.add_argument(
        "--weights",
        choices=["fit", "greedy"],
        help="member weights from --validation-data: fitted on the simplex, or greedy selection with "
        "replacement (counts shown; useless snapshots get 0)",
    )
    build.add_argument(
        "--abstain-coverage",
        type=_fraction,
        metavar="C",
        help="add the output 'abstain' (1.0 = do not trust this prediction), its threshold fitted so that "
        "a fraction C of --validation-data's inputs is kept",
    )
    build.add_argument(
        "--abstain-score",
        choices=ABSTAIN_SCORES,
        help="the uncertainty score --abstain-coverage thresholds (default: entropy)",
    )
    build.add_argument(
        "--validation-data",
        metavar="FILE.npz",
        help="validation inputs (and labels, for --weights) for --weights and --abstain-coverage",
    )
    data_names(build, "validation label array name (default: y)", "y")

    export = command("export", "export a .keras model as a versioned TF Serving directory")
    export.add_argument("model", metavar="MODEL.keras")
    export.add_argument("serving_dir", metavar="SERVING_DIR", help="the model's base path for TF Serving")
    export.add_argument("--version", type=_positive_int, metavar="N", help="default: the next free version")
    export.add_argument(
        "--member-outputs", action="store_true", help="also output each snapshot's prediction"
    )
    export.add_argument("--overwrite", action="store_true", help="replace an existing version")
    export.add_argument("--format", choices=["tf_saved_model", "onnx"], default="tf_saved_model")
    unsafe(export)

    evaluate = command(
        "evaluate",
        "error, NLL, Brier score and ECE (MSE for regression) of each snapshot and of the ensembles "
        "of the last m = 1..M snapshots",
    )
    evaluate.add_argument("directory", metavar="DIR")
    evaluate.add_argument(
        "--data", required=True, metavar="FILE.npz", help="a .npz file with inputs and targets"
    )
    data_names(evaluate, "target array name (default: y)", "y")
    last(evaluate)
    evaluate.add_argument(
        "--temperature",
        type=_temperature,
        metavar="T|fit",
        help="also report the metrics after temperature scaling by T, or by the T fitted on --validation-data",
    )
    evaluate.add_argument(
        "--validation-data", metavar="FILE.npz", help="validation arrays (same names) for --temperature fit"
    )
    evaluate.add_argument(
        "--ood",
        metavar="FILE.npz",
        help="out-of-distribution inputs (the same --x names; no targets): also print OOD AUROC, AUPR "
        "and FPR95 of each uncertainty score",
    )
    evaluate.add_argument(
        "--bins", type=_positive_int, default=15, metavar="N", help="ECE bins (default: 15)"
    )
    evaluate.add_argument("--batch-size", type=_positive_int, default=256, metavar="N")
    activation(evaluate)
    unsafe(evaluate)

    distill = command(
        "distill", "train one student model on the ensemble's averaged probabilities (1x serving cost)"
    )
    distill.add_argument("directory", metavar="DIR")
    distill.add_argument(
        "--data", required=True, metavar="FILE.npz", help="training inputs (labels optional)"
    )
    distill.add_argument("-o", "--output", required=True, metavar="FILE.keras")
    data_names(distill, "hard-label array name, mixed in with weight --alpha (default: no labels)", None)
    distill.add_argument(
        "--epochs",
        type=_positive_int,
        default=None,
        metavar="N",
        help="default: the snapshot run's epochs (its manifest), else 10",
    )
    last(distill)
    distill.add_argument("--batch-size", type=_positive_int, default=64, metavar="N", help="default: 64")
    distill.add_argument(
        "--temperature",
        type=_positive_float,
        default=1.0,
        metavar="T",
        help="softening temperature (default: 1, distill's)",
    )
    distill.add_argument(
        "--alpha",
        type=_fraction,
        default=0.5,
        metavar="A",
        help="weight of the hard-label loss (default: 0.5)",
    )
    distill.add_argument(
        "--validation-data", metavar="FILE.npz", help="validation inputs (and --y labels) reported each epoch"
    )
    activation(distill)
    unsafe(distill)

    average = command(
        "average", "average the snapshots' weights into one model (checked on --validation-data)"
    )
    average.add_argument("directory", metavar="DIR")
    average.add_argument(
        "--bn-data",
        metavar="FILE.npz",
        help="inputs to recompute batch-norm statistics (needed with BatchNormalization)",
    )
    average.add_argument("-o", "--output", required=True, metavar="FILE.keras")
    data_names(average, "target array name in --validation-data (default: y)", "y")
    last(average)
    average.add_argument(
        "--validation-data",
        metavar="FILE.npz",
        help="compare the average with the best member and the ensemble",
    )
    average.add_argument("--batch-size", type=_positive_int, default=256, metavar="N")
    unsafe(average)
    return parser


_COMMANDS = {
    "info": _info,
    "build": _build,
    "evaluate": _evaluate,
    "distill": _distill,
    "average": _average,
}


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
    _quiet_startup()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    show_traceback = getattr(args, "traceback", False)
    format_warning = warnings.formatwarning
    warnings.formatwarning = _format_warning
    try:
        if args.command == "export":
            return _export(args, argv)
        return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return 130
    except Exception as error:
        if _is_user_error(error):
            if show_traceback:
                traceback.print_exception(error)
            print(f"{PROG}: error: {_cli_terms(_one_line(error))}", file=sys.stderr)
            return 1
        traceback.print_exception(error)
        print(
            f"{PROG}: internal error: {type(error).__name__}: {_one_line(error)} -- an unexpected error "
            "in keras-snapshot, Keras or TensorFlow, not in your input; please report it with the "
            "traceback above.",
            file=sys.stderr,
        )
        return 1
    finally:
        warnings.formatwarning = format_warning


if __name__ == "__main__":
    sys.exit(main())
