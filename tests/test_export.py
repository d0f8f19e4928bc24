"""export_saved_model: versioned layout, atomic writes, and the SavedModel as TF Serving's loader sees it.

TF Serving itself cannot be installed here; its loader is TF1's `saved_model.loader.load` on the
"serve" tag followed by `Session.run` on the `serving_default` signature's tensors. That is run in a
fresh Python process in which keras and keras_snapshot cannot even be found.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from keras_snapshot import build_ensemble, export_saved_model

BACKEND = keras.backend.backend()
TOLERANCE = 1e-5

LOADER = r"""
import importlib.util, json, sys

HIDDEN = ("keras", "keras_snapshot", "tf_keras")


class Hide:
    # Wraps every import finder so that the hidden packages look uninstalled: find_spec returns
    # None (TensorFlow probes for keras this way and copes), and any import of them fails.
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            return None
        find = getattr(self.finder, "find_spec", None)
        return find(name, path, target) if find else None

    def __getattr__(self, attribute):
        return getattr(self.finder, attribute)


sys.meta_path[:] = [Hide(finder) for finder in sys.meta_path]
assert all(importlib.util.find_spec(name) is None for name in HIDDEN)

import numpy as np
import tensorflow as tf

report = {}
for directory, inputs_path, outputs_path in json.loads(sys.argv[1]):
    inputs = np.load(inputs_path)
    with tf.compat.v1.Session(graph=tf.Graph()) as session:
        meta_graph = tf.compat.v1.saved_model.loader.load(session, ["serve"], directory)
        signature = meta_graph.signature_def["serving_default"]
        assert sorted(signature.inputs) == sorted(inputs.files), (sorted(signature.inputs), inputs.files)
        feed = {signature.inputs[key].name: inputs[key] for key in signature.inputs}
        fetches = {key: info.name for key, info in signature.outputs.items()}
        np.savez(outputs_path, **session.run(fetches, feed))
        report[directory] = {"inputs": sorted(signature.inputs), "outputs": sorted(signature.outputs)}
imported = sorted(name for name in sys.modules if name.split(".")[0] in HIDDEN)
assert not imported, imported
print(json.dumps(report))
"""


def run_tf_serving_loader(tmp_path: Path, jobs: list[tuple[Path, dict]]) -> list[dict]:
    """Serves each (SavedModel version dir, {input key: array}) the way TF Serving loads it.

    Returns the signature's outputs per job, {output key: array}.
    """
    script = tmp_path / "tf_serving_loader.py"
    script.write_text(LOADER)
    triples = []
    for index, (directory, inputs) in enumerate(jobs):
        inputs_path, outputs_path = tmp_path / f"in-{index}.npz", tmp_path / f"out-{index}.npz"
        np.savez(inputs_path, **inputs)
        triples.append([str(directory), str(inputs_path), str(outputs_path)])
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    # -I: isolated mode, no PYTHONPATH, no current directory on sys.path.
    process = subprocess.run(
        [sys.executable, "-I", str(script), json.dumps(triples)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    return [dict(np.load(outputs)) for _, _, outputs in triples]


def call(model, x):
    return keras.tree.map_structure(keras.ops.convert_to_numpy, model(x, training=False))


def member_model(seed):
    """Two inputs (one int32) and dict outputs: probabilities and a score."""
    keras.utils.set_random_seed(seed)
    pixels = keras.Input((6,), name="pixels")
    category = keras.Input((1,), dtype="int32", name="category")
    embedded = keras.layers.Flatten()(keras.layers.Embedding(4, 3)(category))
    hidden = keras.layers.Dense(8, activation="relu")(keras.layers.Concatenate()([pixels, embedded]))
    outputs = {
        "label": keras.layers.Dense(3, activation="softmax")(hidden),
        "score": keras.layers.Dense(1)(hidden),
    }
    return keras.Model({"pixels": pixels, "category": category}, outputs, name="member")


def tiny_model():
    return keras.Sequential([keras.Input((4,), name="features"), keras.layers.Dense(2, activation="softmax")])


def refuses_torch(function, *args, **kwargs) -> bool:
    """On torch, asserts the clear refusal and returns True; elsewhere returns False."""
    if BACKEND != "torch":
        return False
    with pytest.raises(RuntimeError, match=r"torch backend is not supported.*keras-snapshot export"):
        function(*args, **kwargs)
    return True


def saved_model_cli() -> list[str]:
    script = Path(sys.executable).with_name("saved_model_cli")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli"]


# --------------------------------------------------------------------------- TF Serving's view
def test_tf_serving_loader_gives_the_ensemble_predictions(digits_run, digits, tmp_path):
    directory, _ = digits_run
    x = digits[2][:32]
    ensemble = build_ensemble(directory, last=2)
    members = [keras.saving.load_model(directory / f"snapshot-0{c}.keras", compile=False) for c in (2, 3)]
    if refuses_torch(export_saved_model, ensemble, tmp_path / "serving" / "digits", member_outputs=True):
        return
    digits_path = export_saved_model(ensemble, tmp_path / "serving" / "digits", member_outputs=True)
    assert digits_path == tmp_path / "serving" / "digits" / "1"

    member_files = []
    for seed in range(2):
        member_files.append(tmp_path / f"member-{seed}.keras")
        member_model(seed).save(member_files[-1])
    shaped = build_ensemble(member_files, weights=[0.25, 0.75])
    shaped_x = {
        "pixels": np.random.default_rng(0).random((8, 6), dtype="float32"),
        "category": (np.arange(8) % 4).reshape(8, 1).astype("int32"),
    }
    shaped_path = export_saved_model(shaped, tmp_path / "serving" / "shaped", version=7, member_outputs=True)

    served_digits, served_shaped = run_tf_serving_loader(
        tmp_path, [(digits_path, {"pixels": x}), (shaped_path, shaped_x)]
    )
    assert sorted(served_digits) == ["predictions", "snapshot_02", "snapshot_03"]
    np.testing.assert_allclose(served_digits["predictions"], call(ensemble, x), atol=TOLERANCE)
    for name, member in zip(["snapshot_02", "snapshot_03"], members, strict=True):
        np.testing.assert_allclose(served_digits[name], call(member, x), atol=TOLERANCE)

    expected = call(shaped, shaped_x)
    assert sorted(served_shaped) == [
        "label",
        "score",
        "snapshot_01_label",
        "snapshot_01_score",
        "snapshot_02_label",
        "snapshot_02_score",
    ]
    for key in ("label", "score"):
        np.testing.assert_allclose(served_shaped[key], expected[key], atol=TOLERANCE)
    first = call(keras.saving.load_model(member_files[0], compile=False), shaped_x)
    np.testing.assert_allclose(served_shaped["snapshot_01_label"], first["label"], atol=TOLERANCE)

    shown = subprocess.run(
        [*saved_model_cli(), "show", "--dir", str(digits_path), "--all"],
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        timeout=300,
    )
    assert shown.returncode == 0, shown.stderr[-2000:]
    for line in (
        "signature_def['serving_default']",
        "inputs['pixels']",
        "outputs['predictions']",
        "outputs['snapshot_02']",
        "Method name is: tensorflow/serving/predict",
    ):
        assert line in shown.stdout


# --------------------------------------------------------------------------- layout
def test_versions_are_numbered_and_never_overwritten_silently(tmp_path):
    model = tiny_model()
    base = tmp_path / "models" / "tiny"
    if refuses_torch(export_saved_model, model, base):
        return
    assert export_saved_model(model, base) == base / "1"  # base directory created
    (base / "notes").mkdir()  # TF Serving ignores what is not an integer; so does the numbering
    assert export_saved_model(model, base) == base / "2"
    assert export_saved_model(model, base, version=5) == base / "5"
    assert export_saved_model(model, base) == base / "6"
    with pytest.raises(FileExistsError, match=r"Version 2 already exists.*overwrite=True"):
        export_saved_model(model, base, version=2)
    before = (base / "2" / "saved_model.pb").stat().st_mtime_ns
    assert export_saved_model(model, base, version=2, overwrite=True) == base / "2"
    assert (base / "2" / "saved_model.pb").stat().st_mtime_ns >= before
    assert sorted(p.name for p in base.iterdir()) == ["1", "2", "5", "6", "notes"]  # no temporaries left
    for version in ("1", "2", "5", "6"):
        assert (base / version / "saved_model.pb").is_file()
        assert (base / version / "variables").is_dir()


def test_a_failed_write_leaves_no_version(tmp_path, monkeypatch):
    class BrokenArchive:
        def track_and_add_endpoint(self, *args, **kwargs):
            pass

        def write_out(self, path, **kwargs):
            os.makedirs(path)
            Path(path, "saved_model.pb").write_bytes(b"half")
            raise OSError("disk full")

    model = tiny_model()
    if refuses_torch(export_saved_model, model, tmp_path):
        return
    monkeypatch.setattr(keras.export, "ExportArchive", BrokenArchive)
    with pytest.raises(OSError, match="disk full"):
        export_saved_model(model, tmp_path / "tiny")
    assert list((tmp_path / "tiny").iterdir()) == []  # no "1", no temporary for TF Serving to trip on


def test_member_outputs_need_an_ensemble(tmp_path):
    with pytest.raises(ValueError, match=r"not an ensemble made by keras_snapshot\.build_ensemble"):
        export_saved_model(tiny_model(), tmp_path, member_outputs=True)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"version": 0}, ValueError, "positive integer"),
        ({"version": True}, ValueError, "positive integer"),
        ({"version": "3"}, ValueError, "positive integer"),
        ({"format": "pb"}, ValueError, "`format` must be one of"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, error, message):
    with pytest.raises(error, match=message):
        export_saved_model(tiny_model(), tmp_path, **kwargs)


def test_bad_targets(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        export_saved_model(tiny_model(), tmp_path / "file")
    with pytest.raises(TypeError, match=r"must be a keras\.Model"):
        export_saved_model("ensemble.keras", tmp_path)


def test_onnx_format(digits_run, digits, tmp_path):
    needed = {"tensorflow": ["tf2onnx", "onnx"], "jax": ["jax2onnx"], "torch": ["onnxscript", "onnx"]}[
        BACKEND
    ]
    ensemble = build_ensemble(digits_run[0], last=2)
    if any(importlib.util.find_spec(name) is None for name in needed):
        with pytest.raises(
            RuntimeError, match=rf"format='onnx' on the {BACKEND} backend needs .*pip install"
        ):
            export_saved_model(ensemble, tmp_path, format="onnx")
        assert list(tmp_path.iterdir()) == []
        return
    path = export_saved_model(ensemble, tmp_path, format="onnx", member_outputs=True)
    assert path == tmp_path / "1" and (path / "model.onnx").is_file()
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime

        x = digits[2][:8]
        session = onnxruntime.InferenceSession(str(path / "model.onnx"))
        assert [i.name for i in session.get_inputs()] == ["pixels"]
        names = [o.name for o in session.get_outputs()]
        assert sorted(names) == ["predictions", "snapshot_02", "snapshot_03"]
        served = dict(zip(names, session.run(None, {"pixels": x}), strict=True))
        np.testing.assert_allclose(served["predictions"], call(ensemble, x), atol=TOLERANCE)
