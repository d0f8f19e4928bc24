"""Snapshots as members of an ensemble: where they come from, loading them, and checking they agree.

Shared by the ensemble builder, weight fitting, evaluation, export and the CLI; the names here are
the package's internal interface (not re-exported from `keras_snapshot`).
"""

from __future__ import annotations

import numbers
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np

from keras_snapshot import manifest as manifest_lib

MEMBER_PREFIX = "snapshot_"


# ---------------------------------------------------------------------------------------- sources
class Member:
    """A loaded member: its model, its name in the ensemble, and how to name it in messages."""

    def __init__(self, model: keras.Model, name: str, label: str):
        self.model = model
        self.name = name
        self.label = label


def check_last(last, available: int, where: str) -> int:
    if last is None:
        return available
    if isinstance(last, bool) or not isinstance(last, numbers.Integral):
        raise TypeError(f"`last` must be an integer or None, got {last!r} ({type(last).__name__}).")
    if not 1 <= last <= available:
        raise ValueError(
            f"`last`={last} is out of range: {where} holds {available} snapshot(s). "
            f"Pass 1 <= last <= {available}, or last=None for all of them."
        )
    return int(last)


def snapshot_sources(snapshots, last) -> list[tuple[str, object, str]]:
    """(member name, path or model, label) of the snapshots to use, oldest first, nothing loaded."""
    if isinstance(snapshots, (str, os.PathLike)):
        directory = Path(snapshots)
        if not directory.exists():
            raise FileNotFoundError(f"Snapshot directory {str(directory)!r} does not exist.")
        if not directory.is_dir():
            raise ValueError(
                f"{str(directory)!r} is not a directory. Pass a snapshot directory (with manifest.json), "
                f"or a list of .keras files, e.g. [{str(directory)!r}]."
            )
        manifest = manifest_lib.read_manifest(directory)
        if manifest is None:
            raise ValueError(
                f"{str(directory)!r} has no {manifest_lib.MANIFEST_NAME}, so it is not a snapshot directory "
                "written by SnapshotCallback. Pass the list of .keras files instead."
            )
        entries = sorted(manifest["snapshots"], key=lambda entry: entry["cycle"])
        if not entries:
            raise ValueError(
                f"{str(directory)!r} holds no snapshots yet ({manifest_lib.MANIFEST_NAME} lists none): "
                "train until at least one cycle has ended."
            )
        keep = check_last(last, len(entries), repr(str(directory)))
        return [
            (
                f"{MEMBER_PREFIX}{entry['cycle']:02d}",
                directory / entry["file"],
                str(directory / entry["file"]),
            )
            for entry in entries[len(entries) - keep :]
        ]
    if isinstance(snapshots, keras.Model) or not isinstance(snapshots, Sequence):
        raise TypeError(
            "`snapshots` must be a snapshot directory, a list of .keras paths or a list of keras.Model, "
            f"got {type(snapshots).__name__}."
        )
    items = list(snapshots)
    if not items:
        raise ValueError("`snapshots` is empty: pass at least one snapshot.")
    keep = check_last(last, len(items), "the list")
    sources = []
    for position, item in enumerate(items, start=1):
        if position <= len(items) - keep:
            continue  # skipped snapshots are never loaded
        name = f"{MEMBER_PREFIX}{position:02d}"
        if isinstance(item, keras.Model):
            sources.append((name, item, f"model #{position} ({item.name!r})"))
        elif isinstance(item, (str, os.PathLike)):
            sources.append((name, Path(item), str(item)))
        else:
            raise TypeError(
                f"`snapshots[{position - 1}]` must be a .keras path or a keras.Model, got "
                f"{type(item).__name__}."
            )
    return sources


def load_model(path: Path, safe_mode: bool = True, *, what: str = "snapshot") -> keras.Model:
    """Loads a `.keras` file without compiling it; a failure says which cause it is.

    Raises FileNotFoundError for a missing file and ValueError for the rest, each naming the file
    and the cause: a directory, not a `.keras` zip (e.g. a PNG or a text file), a zip that is not a
    Keras model, an unknown custom class (named), a refusal by safe mode, a file saved by an
    incompatible Keras (both versions named). `what` names the file in messages ("snapshot",
    "model").
    """
    import zipfile

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what.capitalize()} file {str(path)!r} does not exist.")
    prefix = f"Could not load {what} {str(path)!r}"
    if path.is_dir():
        raise ValueError(f"{prefix}: it is a directory; pass the .keras file.")
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{prefix}: it is not a .keras file (a .keras file is a zip archive), it looks like "
            f"{_file_kind(path)}. Is it the wrong file, or a corrupt or unfinished one?"
        )
    try:
        model = keras.saving.load_model(path, compile=False, safe_mode=safe_mode)
    except Exception as error:
        raise ValueError(_load_failure(path, error, safe_mode, prefix)) from error
    if not isinstance(model, keras.Model):
        raise ValueError(f"{str(path)!r} holds a {type(model).__name__}, not a keras.Model.")
    return model


def _file_kind(path: Path) -> str:
    """What a file that is not a zip archive looks like, for load_model's message."""
    with open(path, "rb") as handle:
        head = handle.read(4096)
    if not head:
        return "an empty file"
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return (
            "an HDF5 file (the legacy .h5 format): load it with keras.saving.load_model and save it "
            "again as .keras"
        )
    signatures = {
        b"\x89PNG": "a PNG image",
        b"\xff\xd8\xff": "a JPEG image",
        b"GIF8": "a GIF image",
        b"%PDF": "a PDF document",
        b"\x93NUMPY": "a .npy numpy array",
        b"\x80": "a Python pickle",
    }
    for signature, kind in signatures.items():
        if head.startswith(signature):
            return kind
    if b"\0" not in head:
        try:
            head.decode("utf-8")
        except UnicodeDecodeError:
            pass
        else:
            return "a text file"
    return "neither (unknown binary content)"


def _load_failure(path: Path, error: Exception, safe_mode: bool, prefix: str) -> str:
    """The message for a `.keras` zip that Keras failed to load: which cause, in one line."""
    import json
    import re
    import zipfile

    text = " ".join(str(error).split())
    if safe_mode and "safe_mode" in text:
        return (
            f"Refusing to load {str(path)!r} in safe mode: it holds Python code that loading would run "
            f"(Keras: {text.split('. ', 1)[0].rstrip('.')}). Pass safe_mode=False only for files you trust."
        )
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            config = json.loads(archive.read("config.json")) if "config.json" in names else None
            metadata = json.loads(archive.read("metadata.json")) if "metadata.json" in names else {}
    except Exception as read_error:  # a damaged archive
        return f"{prefix}: the zip archive is corrupt ({type(read_error).__name__}: {read_error})."
    if config is None:
        return (
            f"{prefix}: it is a zip archive but not a Keras model (no config.json; it holds "
            f"{', '.join(sorted(names)[:5]) or 'nothing'}). Is the file corrupt, or the wrong file?"
        )
    # Keras's message nests one "Exception encountered:" per level; the last is the cause.
    cause = text.rsplit("Exception encountered:", 1)[-1].strip()
    cause = cause.split(" Full object config:", 1)[0].split(" config={", 1)[0].strip()
    unknown = re.search(r"Could not locate (class|function) '([^']+)'", text)
    if unknown:
        kind, name = unknown.groups()
        where = _registered(config, name)
        return (
            f"{prefix}: it uses the custom {kind} {name!r}{where}, which this process does not know. "
            "Import the code that defines it (registered with "
            "@keras.saving.register_keras_serializable()) before loading the file."
        )
    saved = metadata.get("keras_version") if isinstance(metadata, dict) else None
    current = keras.__version__
    if isinstance(saved, str) and _version_key(saved) != _version_key(current):
        newer = _version_key(saved) > _version_key(current)
        advice = (
            f"upgrade Keras (pip install -U 'keras>={saved}') or save the model again with Keras {current}"
            if newer
            else f"load and save it again with Keras {saved}, or report the incompatibility to Keras"
        )
        return (
            f"{prefix}: it was saved by Keras {saved}, this is Keras {current}, which cannot read it "
            f"({type(error).__name__}: {cause}). Saved by an incompatible Keras: {advice}."
        )
    return (
        f"{prefix} ({type(error).__name__}: {cause}). The file is corrupt or not a Keras model; "
        "remove it from the list, or restore it."
    )


def _registered(config, name: str) -> str:
    """' (registered as ..., module ...)' for the config entry with class_name `name`, or ''."""
    stack = [config]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("class_name") == name:
                parts = [
                    f"{label} {node[key]!r}"
                    for key, label in (("registered_name", "registered as"), ("module", "module"))
                    if isinstance(node.get(key), str) and node[key] != name
                ]
                return f" ({', '.join(parts)})" if parts else ""
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return ""


def _version_key(version: str) -> tuple[int, ...]:
    """(major, minor) of a version string; patch releases read each other's files."""
    import re

    return tuple(int(part) for part in re.findall(r"\d+", version)[:2])


def load_members(snapshots, last: int | None = None, safe_mode: bool = True) -> list[Member]:
    sources = snapshot_sources(snapshots, last)
    # Every file must exist before the first (slow) load, so a typo fails at once.
    for _, source, _ in sources:
        if isinstance(source, Path) and not source.is_file():
            raise FileNotFoundError(f"Snapshot file {str(source)!r} does not exist.")
    seen = {}
    members = []
    for name, source, label in sources:
        if isinstance(source, keras.Model):
            if id(source) in seen:
                raise ValueError(f"{label} is the same model object as {seen[id(source)]}: pass each once.")
            seen[id(source)] = label
            model = source
        else:
            model = load_model(source, safe_mode)  # each file is loaded exactly once
        members.append(Member(model, name, label))
    return members


# ---------------------------------------------------------------------------------------- structure
def structures(model: keras.Model, label: str):
    """(inputs, outputs) of a member as it was built: a tensor, a list or a dict of KerasTensors."""
    try:
        if isinstance(model, keras.Sequential):
            return model.inputs[0], model.outputs[0]
        inputs, outputs = model.input, model.output
        if not isinstance(model.inputs, list) or not model.inputs:
            raise AttributeError
        # Keras 3.10 saves a single input (output) as a one-item list and its files reload that
        # way on every later version; 3.11+ unwrap it. Both are the same model: use the tensor.
        inputs, outputs = _unwrap_single(inputs), _unwrap_single(outputs)
    except (AttributeError, ValueError):
        raise ValueError(
            f"{label} has no symbolic inputs: members must be functional or Sequential models built on "
            "keras.Input (subclassed models cannot be combined into one graph)."
        ) from None
    return inputs, outputs


def _unwrap_single(struct):
    return struct[0] if isinstance(struct, (list, tuple)) and len(struct) == 1 else struct


def flat_items(struct, names: Sequence[str], what: str, label: str) -> list[tuple[str, object]]:
    """[(key, tensor)] of a tensor, a flat list or a flat dict: dict keys, else the layer names."""
    if isinstance(struct, dict):
        items = list(struct.items())
    elif isinstance(struct, (list, tuple)):
        items = list(zip(names, struct, strict=True))
    else:
        items = [(names[0], struct)]
    if any(isinstance(value, (dict, list, tuple)) for _, value in items):
        raise ValueError(
            f"{label} has nested {what}; build_ensemble supports a tensor, a list or a dict of tensors."
        )
    return [(str(key), value) for key, value in items]


def output_names(model: keras.Model) -> list[str]:
    if isinstance(model, keras.Sequential):
        return [model.layers[-1].name]
    return list(model.output_names)


def output_items(model: keras.Model, label: str = "the model") -> list[tuple[str, object]]:
    return flat_items(structures(model, label)[1], output_names(model), "outputs", label)


def input_items(model: keras.Model, label: str = "the model") -> list[tuple[str, object]]:
    inputs = structures(model, label)[0]
    names = [tensor.name for tensor in keras.tree.flatten(inputs)]
    return flat_items(inputs, names, "inputs", label)


def _signature(member: Member) -> dict[str, str]:
    """What members must agree on. Names count only for dict structures, where they are the keys:
    positional inputs and outputs of models built apart get different automatic names."""

    def describe(struct, items, with_dtype):
        keyed = isinstance(struct, dict)
        return (
            f"{type(struct).__name__} ["
            + ", ".join(
                (f"{key}: " if keyed else "") + f"{tuple(t.shape)}" + (f" {t.dtype}" if with_dtype else "")
                for key, t in items
            )
            + "]"
        )

    inputs, outputs = structures(member.model, member.label)
    return {
        "inputs": describe(inputs, input_items(member.model, member.label), True),
        # Output dtypes may differ: a float16 member still averages fine.
        "outputs": describe(outputs, output_items(member.model, member.label), False),
    }


def check_agreement(members: list[Member]) -> None:
    reference = _signature(members[0])
    for member in members[1:]:
        signature = _signature(member)
        for what in ("inputs", "outputs"):
            if signature[what] != reference[what]:
                raise ValueError(
                    f"Snapshots disagree on their {what}: {member.label} has {signature[what]}, "
                    f"{members[0].label} has {reference[what]}. All members of an ensemble need the same "
                    "inputs and outputs (structure, shapes, input dtypes, dict keys)."
                )


def resolve_activations(output_activation, keys: list[str], members: list[Member]) -> dict[str, str | None]:
    """The activation applied to each member output, by output key."""
    if output_activation is None or isinstance(output_activation, str):
        per_key = dict.fromkeys(keys, output_activation)
    elif isinstance(output_activation, dict):
        unknown = set(output_activation) - set(keys)
        if unknown:
            raise ValueError(
                f"`output_activation` names outputs {sorted(unknown)} that the members do not have; "
                f"their outputs are {keys}."
            )
        per_key = {key: output_activation.get(key) for key in keys}
    else:
        raise TypeError(
            "`output_activation` must be None, an activation name such as 'softmax', or a dict "
            f"{{output name: activation name}}, got {output_activation!r}."
        )
    for key, name in per_key.items():
        if name is None:
            continue
        if not isinstance(name, str):
            raise TypeError(f"`output_activation` for {key!r} must be an activation name, got {name!r}.")
        try:
            keras.activations.get(name)
        except (ValueError, TypeError):
            raise ValueError(
                f"`output_activation` {name!r} is not a Keras activation; use e.g. 'softmax' or 'sigmoid'."
            ) from None
        # Softmax over probabilities is not an error Keras would catch, only a flatter average.
        last_layer = _last_layer(members[0].model, key)
        current = getattr(getattr(last_layer, "activation", None), "__name__", None)
        if current == name:
            warnings.warn(
                f"The members' output {key!r} already ends in {name}; output_activation={name!r} applies "
                "it a second time. Pass output_activation only when the members output logits.",
                UserWarning,
                stacklevel=4,
            )
    return per_key


def _last_layer(model: keras.Model, key: str):
    try:
        if isinstance(model, keras.Sequential):
            return model.layers[-1]
        target = dict(output_items(model))[key]
        for layer in reversed(model.layers):
            try:
                if layer.output is target:
                    return layer
            except (AttributeError, ValueError):  # a layer called more than once has no single output
                continue
    except Exception:  # only used for a warning
        return None
    return None


# ---------------------------------------------------------------------------------------- running the members
def frame(members: list[Member], output_activation):
    """What every form of the ensemble shares: fresh inputs (the members' names, shapes and dtypes),
    the output keys, the output structure and the activation applied to each member output."""
    check_agreement(members)
    reference = members[0].model
    input_struct, output_struct = structures(reference, members[0].label)
    inputs = keras.tree.map_structure(
        lambda tensor: keras.Input(
            batch_shape=tuple(tensor.shape),
            dtype=tensor.dtype,
            sparse=bool(getattr(tensor, "sparse", False)),
            name=tensor.name,
        ),
        input_struct,
    )
    keys = [key for key, _ in output_items(reference, members[0].label)]
    return inputs, keys, output_struct, resolve_activations(output_activation, keys, members)


def call_members(members: list[Member], inputs, keys, activations) -> dict[str, dict[str, object]]:
    """Every member called on `inputs`: {member name: {key: its output after the activation}}."""
    taps = {}
    for member in members:
        # A member keeps the name it was saved with; identical names would clash in one graph.
        member.model.name = member.name
        outputs = member.model(inputs)
        items = flat_items(outputs, keys, "outputs", member.label)
        taps[member.name] = {
            key: keras.layers.Activation(activations[key] or "linear", name=f"{member.name}_{key}")(tensor)
            for key, tensor in items
        }
    return taps


def member_graph(members: list[Member], output_activation):
    """Fresh inputs, every member called on them, and each member output's tap (activation) tensor.

    Returns (inputs structure, output keys, output structure kind, {member name: {key: tap}}).
    """
    inputs, keys, output_struct, activations = frame(members, output_activation)
    return inputs, keys, output_struct, call_members(members, inputs, keys, activations)


def member_predictions(
    members: list[Member], x, *, output_activation=None, batch_size: int | None = None
) -> tuple[list[str], dict[str, np.ndarray]]:
    """Every member's outputs on `x` in one predict pass (each member runs once).

    Returns (output keys, {key: float64 array of shape (M, N, ...)}), the members in order,
    after `output_activation`.
    """
    inputs, keys, _, member_taps = member_graph(members, output_activation)
    return keys, predict_taps(members, inputs, keys, member_taps, x, batch_size)


def predict_taps(
    members: list[Member], inputs, keys, member_taps, x, batch_size=None
) -> dict[str, np.ndarray]:
    """{key: (M, N, ...) float64} from an existing member graph, in one predict pass."""
    flat = [member_taps[member.name][key] for member in members for key in keys]
    outputs = keras.Model(inputs, flat).predict(x, batch_size=batch_size, verbose=0)
    outputs = [np.asarray(p, dtype="float64") for p in keras.tree.flatten(outputs)]
    return {
        key: np.stack([outputs[m * len(keys) + index] for m in range(len(members))])
        for index, key in enumerate(keys)
    }
