"""Snapshots as members of an ensemble: where they come from, loading them, and checking they agree.

Shared by the ensemble builder, weight fitting, evaluation, export and the CLI; the names here are
the package's internal interface (not re-exported from `keras_snapshot`).
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np

from keras_snapshot import manifest as manifest_lib
from keras_snapshot.inputs import (
    check_activation,
    check_outputs_finite,
    flat_items,
    input_items,
    lowest_precision,
    output_items,
    output_names,
    structures,
)

MEMBER_PREFIX = "snapshot_"


# ---------------------------------------------------------------------------------------- sources
def fresh_inputs(input_struct):
    """New `keras.Input`s with the names, shapes and dtypes of a model's inputs, in its structure."""
    return keras.tree.map_structure(
        lambda tensor: keras.Input(
            batch_shape=tuple(tensor.shape),
            dtype=tensor.dtype,
            sparse=bool(getattr(tensor, "sparse", False)),
            name=tensor.name,
        ),
        input_struct,
    )


class Member:
    """A loaded member: its model, its name in the ensemble, and how to name it in messages.

    `owned` is True for a model this package loaded from a file (it may be renamed); a model the
    user passed in is never renamed or changed: it is called inside a wrapper named `name`.
    """

    def __init__(self, model: keras.Model, name: str, label: str, owned: bool = False):
        self.model = model
        self.name = name
        self.label = label
        self.owned = owned
        self._node = None

    def node(self) -> keras.Model:
        """The model to call in an ensemble graph, named `self.name` (built once)."""
        if self.owned:  # our own copy, loaded from its file: identical saved names would clash
            self.model.name = self.name
            self._node = self.model
        if self._node is None:
            inputs = fresh_inputs(structures(self.model, self.label)[0])
            self._node = keras.Model(inputs, self.model(inputs), name=self.name)
        return self._node


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
        members.append(Member(model, name, label, owned=not isinstance(source, keras.Model)))
    return members


# ---------------------------------------------------------------------------------------- structure
# The structure helpers live in keras_snapshot.inputs (the bottom module); re-exported here for
# the modules that read members.
__all__ = [
    "flat_items",
    "input_items",
    "output_items",
    "output_names",
    "structures",
]


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
    # Softmax over probabilities is never applied twice: the output already is a distribution.
    for position, key in enumerate(keys):
        per_key[key] = check_activation(members[0].model, key, per_key[key], position)
    return per_key


# ---------------------------------------------------------------------------------------- running the members
def frame(members: list[Member], output_activation):
    """What every form of the ensemble shares: fresh inputs (the members' names, shapes and dtypes),
    the output keys, the output structure and the activation applied to each member output."""
    check_agreement(members)
    reference = members[0].model
    input_struct, output_struct = structures(reference, members[0].label)
    inputs = fresh_inputs(input_struct)
    keys = [key for key, _ in output_items(reference, members[0].label)]
    return inputs, keys, output_struct, resolve_activations(output_activation, keys, members)


def call_members(members: list[Member], inputs, keys, activations) -> dict[str, dict[str, object]]:
    """Every member called on `inputs`: {member name: {key: its output after the activation}}."""
    taps = {}
    for member in members:
        # Members saved alike share a name, which would clash in one graph: each is called under its
        # ensemble name (a user's in-memory model through a wrapper, so that it keeps its own).
        outputs = member.node()(inputs)
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
    stacks = {
        key: np.stack([outputs[m * len(keys) + index] for m in range(len(members))])
        for index, key in enumerate(keys)
    }
    for key, stack in stacks.items():  # the inputs are finite by now: NaN comes from a member
        check_outputs_finite(stack, [member.label for member in members], f"output {key!r}")
    return stacks


def output_dtype(members: list[Member], key: str) -> str:
    """The loosest dtype of the members' output `key` (float16 members get float16's tolerance)."""
    dtypes = []
    for member in members:
        found = dict(output_items(member.model, member.label)).get(key)
        dtypes.append(getattr(found, "dtype", None))
    return lowest_precision(dtypes)
