"""export_saved_model: a versioned TF Serving model directory with stable signature names."""

from __future__ import annotations

import importlib.util
import numbers
import os
import shutil
import uuid
import warnings
from pathlib import Path

import keras

from keras_snapshot.ensemble import (
    MEAN_SUFFIX,
    PREDICTIONS_KEY,
    is_uncertainty_block,
    member_output_tensors,
    member_weights_of,
    uncertainty_tensors,
    unique_name,
)
from keras_snapshot.inputs import output_items, output_kind, structures
from keras_snapshot.keras_internals import output_operations
from keras_snapshot.manifest import TEMP_PREFIX

__all__ = ["export_saved_model"]

FORMATS = ("tf_saved_model", "onnx")
SINGLE_OUTPUT_KEY = PREDICTIONS_KEY
ONNX_FILENAME = "model.onnx"


# What each backend needs for ONNX (Keras converts with tf2onnx, jax2onnx or torch.onnx).
_ONNX_NEEDS = {"tensorflow": ("tf2onnx", "onnx"), "jax": ("jax2onnx",), "torch": ("onnxscript", "onnx")}


def _backend_problem(format: str) -> str | None:
    """Why this process cannot write `format` with the current backend, or None when it can."""
    backend = keras.backend.backend()
    if backend not in _ONNX_NEEDS:
        return f"export_saved_model does not support the {backend!r} backend of Keras."
    if format == "tf_saved_model":
        if backend == "torch":
            # Keras's torch SavedModel path is experimental, needs torch_xla and takes no named
            # (dict) signatures; a .keras file reloads under TensorFlow with the same weights.
            return (
                "Exporting a SavedModel from the torch backend is not supported. Save the model "
                "(model.save('ensemble.keras')) and export it with the TensorFlow backend: "
                "`keras-snapshot export ensemble.keras SERVING_DIR` (which does this for you), or "
                "KERAS_BACKEND=tensorflow in the Python process that exports."
            )
        if importlib.util.find_spec("tensorflow") is None:
            return (
                "Writing a SavedModel needs TensorFlow, also from the JAX backend: "
                "pip install 'keras-snapshot[cpu]' (or tensorflow)."
            )
        return None
    missing = [name for name in _ONNX_NEEDS[backend] if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    hint = (
        "pip install 'keras-snapshot[onnx]'"
        if backend == "tensorflow"
        else f"pip install {' '.join(missing)}"
    )
    return (
        f"format='onnx' on the {backend} backend needs {', '.join(missing)}, which is not installed: {hint}"
        + (
            ""
            if backend == "tensorflow"
            else ", or export the .keras file with `keras-snapshot export --format onnx`, which uses "
            "TensorFlow and pip install 'keras-snapshot[onnx]'"
        )
        + "."
    )


def _serving_model(model: keras.Model, member_outputs: bool, uncertainty: bool = False):
    """A functional view of `model` with dict inputs and dict outputs under stable names.

    It shares the model's layers and graph (nothing is copied or computed twice), so the member
    outputs and the uncertainty outputs come from the same member calls as the ensemble's own
    outputs.
    """
    inputs, outputs = structures(model, f"model {model.name!r}")
    if isinstance(inputs, dict):
        named_inputs = dict(inputs)
    else:
        named_inputs = {tensor.name: tensor for tensor in keras.tree.flatten(inputs)}
    items = output_items(model, f"model {model.name!r}")
    if isinstance(outputs, (dict, list, tuple)):
        named_outputs = dict(items)
    else:
        # Auto-generated layer names ("dense_3") change from one training session to the next;
        # clients need a key that never does.
        named_outputs = {SINGLE_OUTPUT_KEY: items[0][1]}
    # A model from build_ensemble(..., uncertainty=True) already has its uncertainty outputs.
    built_in = _has_uncertainty(model, named_outputs)
    taps = None
    if member_outputs or (uncertainty and not built_in):
        try:
            taps = member_output_tensors(model)
        except ValueError as error:
            if not uncertainty or member_outputs:
                raise
            raise ValueError(
                f"uncertainty=True needs the members' outputs, and model {model.name!r} does not expose "
                "them: it is not an ensemble from build_ensemble, or a fused one (fuse=True holds its "
                "members stacked inside the graph). Build it with build_ensemble(..., uncertainty=True) "
                "(works with fuse=True too), or with fuse=False."
            ) from error
    member_keys = list(next(iter(taps.values()))) if taps else []
    # One member output per member: the members' outputs are "snapshot_XX".
    # (a single output served as "predictions" next to uncertainty or abstain outputs counts as one)
    single = len(member_keys) == 1 and (
        not isinstance(outputs, (dict, list, tuple))
        or (SINGLE_OUTPUT_KEY in named_outputs and member_keys[0] not in named_outputs)
    )
    extra = {}
    if member_outputs:
        for member, member_taps in taps.items():
            for key, tensor in member_taps.items():
                extra[member if single else f"{member}_{key}"] = tensor
    if uncertainty and not built_in:
        extra.update(_uncertainty(model, taps, member_keys, named_outputs, items, outputs))
    for key, tensor in extra.items():
        if key in named_outputs or key in named_inputs:
            raise ValueError(f"The output {key!r} clashes with a name the model already uses.")
        named_outputs[key] = tensor
    view = keras.Model(named_inputs, named_outputs, name=f"{model.name}_serving")
    signature = {
        key: keras.InputSpec(shape=tuple(tensor.shape), dtype=tensor.dtype, name=key)
        for key, tensor in named_inputs.items()
    }
    return view, signature


def _has_uncertainty(model: keras.Model, named_outputs: dict | None = None) -> bool:
    """Whether an output of `model` comes from an uncertainty block (build_ensemble(...,
    uncertainty=True)): decided by the graph, never by what the outputs are called, so that an
    output named "log_variance" or "max_entropy" is just an output."""
    del named_outputs  # what they are called says nothing
    if not any(is_uncertainty_block(layer) for layer in model.layers):
        return False
    # A block whose outputs are not served (the abstain decision's scores, computed but not
    # output without uncertainty=True) does not count: export must still add the measures.
    return any(is_uncertainty_block(op) for op in output_operations(model))


def _uncertainty(model, taps, member_keys, named_outputs, items, outputs) -> dict:
    """The uncertainty outputs of a build_ensemble model, added to its graph (see build_ensemble)."""
    members = list(taps)
    plain = not isinstance(outputs, (dict, list, tuple))
    ensemble_outputs = {items[0][0]: items[0][1]} if plain else dict(items)
    if (
        len(member_keys) == 1
        and member_keys[0] not in ensemble_outputs
        and SINGLE_OUTPUT_KEY in ensemble_outputs
    ):
        # One output served as "predictions" beside "abstain": its measures are named as for a
        # plain output ("entropy", ...), as build_ensemble(..., uncertainty=True) names them.
        plain, ensemble_outputs = True, {member_keys[0]: ensemble_outputs[SINGLE_OUTPUT_KEY]}
    result = {}
    taken = {layer.name for layer in model.layers}
    for position, key in enumerate(member_keys):
        if key not in ensemble_outputs:
            raise ValueError(
                f"Model {model.name!r} has member outputs {member_keys} but outputs {list(ensemble_outputs)}: "
                "it is not an ensemble made by build_ensemble."
            )
        predictions = ensemble_outputs[key]
        try:
            mean = model.get_layer(f"{key}{MEAN_SUFFIX}").output  # the mean before temperature scaling
        except ValueError:
            mean = predictions
        tap_layer = model.get_layer(f"{members[0]}_{key}")
        activation = getattr(tap_layer.activation, "__name__", None)
        kind = output_kind(model.get_layer(members[0]), key, activation, position)
        weights = member_weights_of(model, members, key)
        block = unique_name("uncertainty" if plain else f"{key}_uncertainty", taken)
        taken.add(block)
        result.update(
            uncertainty_tensors(
                [taps[member][key] for member in members],
                mean,
                predictions,
                weights,
                kind,
                "" if plain else f"{key}_",
                block,
            )
        )
    return result


def _all_layers(model: keras.Model):
    """Every layer of `model`, nested models' layers included (public API only)."""
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)


def _grouped_convolutions(model: keras.Model) -> list[str]:
    return [
        layer.name
        for layer in _all_layers(model)
        if isinstance(layer, keras.layers.Conv1D | keras.layers.Conv2D | keras.layers.Conv3D)
        and getattr(layer, "groups", 1) > 1
    ]


def _next_version(export_dir: Path) -> int:
    versions = [int(p.name) for p in export_dir.iterdir() if p.name.isdigit() and p.is_dir()]
    return max(versions, default=0) + 1


def export_saved_model(
    model: keras.Model,
    export_dir: str | os.PathLike,
    version: int | None = None,
    *,
    member_outputs: bool = False,
    uncertainty: bool = False,
    overwrite: bool = False,
    format: str = "tf_saved_model",
    verbose: bool = False,
) -> Path:
    """Writes `model` as `export_dir/<version>/`, the layout TensorFlow Serving loads.

    The SavedModel has the signatures `serve` and `serving_default` (the one TF Serving uses),
    with stable, readable keys:

    - inputs: the model's input names (the `keras.Input` names, or its dict keys);
    - outputs: "predictions" for a single-output model, else its output names (list outputs)
      or its dict keys;
    - with `member_outputs=True` (an ensemble made by `build_ensemble`), also each member's
      output, after `output_activation`: "snapshot_01", "snapshot_02", ... (or
      "snapshot_01_<output>" for several outputs), for disagreement and uncertainty estimates;
    - with `uncertainty=True` (an ensemble made by `build_ensemble`), also per-example (batch,)
      float32 outputs computed in the graph: "entropy" (of the predictions, in nats),
      "mutual_information" and "disagreement" for a classifier, "variance" otherwise
      ("<output>_entropy", ... for list or dict outputs); the same keys, definitions and values
      as `build_ensemble(..., uncertainty=True)`, whose models export them as they are.

    The version is written atomically: the SavedModel goes to a hidden temporary folder in
    `export_dir` (which TF Serving ignores, as it is not an integer) and is renamed to the
    version folder once complete, so a server polling `export_dir` never sees half a model.

    Works from the TensorFlow and JAX backends (both need TensorFlow installed). From the torch
    backend it raises: save the model and export the `.keras` file with
    `keras-snapshot export`, which switches to TensorFlow.

    Args:
        model: a functional or Sequential `keras.Model`, e.g. from `build_ensemble`.
        export_dir: the model's base directory (TF Serving's `--model_base_path`); created if
            missing.
        version: a positive integer; None takes the next free one (1 in an empty directory).
        member_outputs: also expose each member's output (needs a `build_ensemble` model).
        uncertainty: also serve the uncertainty outputs (needs a `build_ensemble` model built
            with fuse=False, or one built with `uncertainty=True`, fused or not).
        overwrite: replace an existing version folder instead of refusing.
        format: "tf_saved_model", or "onnx" (writes `<version>/model.onnx`, the layout of
            Triton's model repository, with the same input and output names; needs
            `pip install 'keras-snapshot[onnx]'` on TensorFlow, jax2onnx on JAX).
        verbose: print Keras's export summary.

    Returns:
        The path of the version folder written.

    Example:

    ```python
    import keras, numpy as np, keras_snapshot
    model = keras.Sequential([keras.Input((8,), name="features"), keras.layers.Dense(3, activation="softmax")])
    path = keras_snapshot.export_saved_model(model, "serving/my_model")    # serving/my_model/1
    # tensorflow_model_server --rest_api_port=8501 --model_name=my_model \\
    #     --model_base_path=$PWD/serving/my_model
    # POST /v1/models/my_model:predict  {"inputs": {"features": [[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]]}}
    # An ensemble that also serves "entropy", "mutual_information" and "disagreement" per example:
    # keras_snapshot.export_saved_model(keras_snapshot.build_ensemble("snapshots"), "serving/ens",
    #                                   uncertainty=True)
    ```
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"`model` must be a keras.Model, got {type(model).__name__}.")
    if format not in FORMATS:
        raise ValueError(f"`format` must be one of {FORMATS}, got {format!r}.")
    if version is not None and (
        isinstance(version, bool) or not isinstance(version, numbers.Integral) or version < 1
    ):
        raise ValueError(f"`version` must be a positive integer or None, got {version!r}.")
    if not isinstance(export_dir, (str, os.PathLike)) or not str(export_dir):
        raise TypeError(f"`export_dir` must be a non-empty path, got {export_dir!r}.")
    export_dir = Path(export_dir)
    if export_dir.exists() and not export_dir.is_dir():
        raise ValueError(f"`export_dir` {str(export_dir)!r} exists and is not a directory.")
    if not model.built:
        raise ValueError(
            f"Model {model.name!r} is not built: call it on data (or build it) before exporting."
        )
    if not isinstance(uncertainty, bool):
        raise TypeError(f"`uncertainty` must be True or False, got {uncertainty!r}.")
    view, signature = _serving_model(model, bool(member_outputs), uncertainty)
    problem = _backend_problem(format)
    if problem:
        raise RuntimeError(problem)
    if (
        format == "tf_saved_model"
        and keras.backend.backend() == "tensorflow"
        and _grouped_convolutions(model)
    ):
        warnings.warn(
            f"{model.name!r} has grouped convolutions ({', '.join(_grouped_convolutions(model))}), which "
            "Keras runs through XLA on TensorFlow, so the SavedModel needs XLA where it is served: "
            "TensorFlow Serving on CPU compiles XLA only with --xla_cpu_compilation_enabled=true. "
            "For a server without XLA, export an ensemble built with fuse=False.",
            UserWarning,
            stacklevel=2,
        )

    export_dir.mkdir(parents=True, exist_ok=True)
    version = _next_version(export_dir) if version is None else int(version)
    target = export_dir / str(version)
    if target.exists() and not overwrite:
        raise FileExistsError(
            f"Version {version} already exists: {str(target)!r}. Pass another version, version=None for "
            "the next free one, or overwrite=True to replace it."
        )
    temporary = export_dir / f"{TEMP_PREFIX}{uuid.uuid4().hex}-{version}"
    try:
        if format == "tf_saved_model":
            archive = keras.export.ExportArchive()
            archive.track_and_add_endpoint("serve", view, [signature])
            archive.write_out(str(temporary), verbose=verbose)  # also aliased as serving_default
        else:
            temporary.mkdir()
            view.export(
                str(temporary / ONNX_FILENAME), format="onnx", verbose=verbose, input_signature=[signature]
            )
        if target.exists():  # overwrite=True: move the old version aside, then swap
            retired = export_dir / f"{TEMP_PREFIX}{uuid.uuid4().hex}-old-{version}"
            os.replace(target, retired)
            os.replace(temporary, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(temporary, target)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return target
