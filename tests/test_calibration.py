"""Temperature scaling: the 1-D fit, fit_temperature, and the temperature baked into build_ensemble."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_snapshot import build_ensemble
from keras_snapshot.calibration import fit_temperature, temperature_from_probabilities, temperature_scale


def ref_scaled_nll(p, y, t):
    """NLL of softmax(log(clip(p)) / t), written out in numpy."""
    logits = np.log(np.clip(p, 1e-7, 1.0)) / t
    logits -= logits.max(axis=1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return -np.mean(log_p[np.arange(len(y)), y])


def overconfident(seed, n=400, classes=4, sharpness=6.0):
    """Probabilities sharper than the truth: labels drawn from a softer version of them."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, classes))
    truth = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y = np.array([rng.choice(classes, p=row) for row in truth])
    sharp = np.exp(sharpness * logits)
    return sharp / sharp.sum(1, keepdims=True), y


def members_of(directory):
    manifest = json.loads((directory / "manifest.json").read_text())
    return [keras.saving.load_model(directory / e["file"], compile=False) for e in manifest["snapshots"]]


# --------------------------------------------------------------------------- the 1-D fit
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fitted_temperature_is_the_minimum_and_never_worse_than_one(seed):
    p, y = overconfident(seed)
    t = temperature_from_probabilities(p, y)
    grid = np.exp(np.linspace(np.log(0.05), np.log(20), 2001))
    best = min(ref_scaled_nll(p, y, g) for g in grid)
    assert ref_scaled_nll(p, y, t) <= best + 1e-6
    assert ref_scaled_nll(p, y, t) < ref_scaled_nll(p, y, 1.0)
    assert 3.0 < t < 9.0  # the data were made 6x too sharp
    assert temperature_from_probabilities(p, y) == t  # deterministic
    # Under-confident probabilities need T < 1.
    soft, y_soft = overconfident(seed, sharpness=0.3)
    assert temperature_from_probabilities(soft, y_soft) < 1.0


def test_temperature_one_when_nothing_helps():
    # Perfect one-hot predictions: every T <= 1 gives the same (near-zero) NLL, none is strictly better.
    y = np.array([0, 1, 2, 1])
    p = np.eye(3)[y]
    t = temperature_from_probabilities(p, y)
    assert ref_scaled_nll(p, y, t) <= ref_scaled_nll(p, y, 1.0)
    # Binary single sigmoid unit: the two-class form, and the shape is kept.
    rng = np.random.default_rng(0)
    q = rng.random((50, 1))
    scaled = temperature_scale(q, 2.0)
    assert scaled.shape == (50, 1)
    logit = np.log(q) - np.log(1 - q)
    np.testing.assert_allclose(scaled, 1 / (1 + np.exp(-logit / 2.0)), rtol=1e-9)
    assert temperature_from_probabilities(q, (q[:, 0] > 0.5).astype(int)) > 0


def test_temperature_errors():
    with pytest.raises(ValueError, match="look like logits"):
        temperature_from_probabilities(np.array([[2.0, -1.0]]), [0])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\]"):
        temperature_from_probabilities(np.array([[0.3, 0.7]]), [2])


# --------------------------------------------------------------------------- fit_temperature
def test_fit_temperature_from_snapshots_and_from_a_model(digits_run, digits):
    directory, _ = digits_run
    x_val, y_val = digits[2][:200], digits[3][:200]
    mean = np.mean([keras.ops.convert_to_numpy(m(x_val)) for m in members_of(directory)], axis=0)
    t = fit_temperature(directory, (x_val, y_val))
    assert t == pytest.approx(temperature_from_probabilities(mean, y_val), rel=1e-3)
    assert ref_scaled_nll(mean, y_val, t) <= ref_scaled_nll(mean, y_val, 1.0)
    ensemble = build_ensemble(directory)
    assert fit_temperature(ensemble, (x_val, y_val)) == pytest.approx(t, rel=1e-3)
    last = fit_temperature(directory, (x_val, y_val), last=1)
    assert last == pytest.approx(
        temperature_from_probabilities(keras.ops.convert_to_numpy(members_of(directory)[-1](x_val)), y_val),
        rel=1e-3,
    )


# --------------------------------------------------------------------------- in the graph
KERAS_FREE = r"""
import importlib.util, json, sys


class Hide:
    # keras_snapshot is installed in the venv (editable): every finder is wrapped so that it looks
    # uninstalled, as on a server that has Keras only.
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "keras_snapshot":
            return None
        find = getattr(self.finder, "find_spec", None)
        return find(name, path, target) if find else None

    def __getattr__(self, attribute):
        return getattr(self.finder, attribute)


sys.meta_path[:] = [Hide(finder) for finder in sys.meta_path]
assert importlib.util.find_spec("keras_snapshot") is None, "keras_snapshot must not be importable here"
import numpy as np
import keras
x = np.load(sys.argv[1])
for path, target in json.loads(sys.argv[2]):
    model = keras.saving.load_model(path)  # safe mode, no custom objects
    out = model.predict(x, verbose=0)
    out = out if isinstance(out, dict) else {"predictions": out}
    np.savez(target, **{k: np.asarray(v) for k, v in out.items()})
assert "keras_snapshot" not in sys.modules
"""


def load_without_the_package(tmp_path, paths, x):
    """Outputs of .keras files loaded by plain Keras (safe mode) in a process that cannot import
    keras_snapshot: [{output key: array}] per path ("predictions" for a single output)."""
    script, inputs = tmp_path / "load.py", tmp_path / "x.npy"
    script.write_text(KERAS_FREE)
    np.save(inputs, x)
    jobs = [[str(path), str(tmp_path / f"out-{i}.npz")] for i, path in enumerate(paths)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    process = subprocess.run(
        [sys.executable, "-I", str(script), str(inputs), json.dumps(jobs)],
        capture_output=True,
        text=True,
        env={**env, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""},
        cwd=tmp_path,
        timeout=300,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    return [dict(np.load(target)) for _, target in jobs]


def test_temperature_in_the_graph(digits_run, digits, tmp_path):
    directory, _ = digits_run
    x_val, y_val, x = digits[2][:200], digits[3][:200], digits[2][200:260]
    members = members_of(directory)
    mean = np.mean([keras.ops.convert_to_numpy(m(x)) for m in members], axis=0)
    val_mean = np.mean([keras.ops.convert_to_numpy(m(x_val)) for m in members], axis=0)

    fixed = build_ensemble(directory, temperature=2.5)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(fixed(x)), temperature_scale(mean, 2.5), rtol=1e-4, atol=1e-6
    )
    assert fixed.output_names == [fixed.layers[-1].name]  # the output keeps the members' output name
    assert 1.0 / fixed.get_layer("temperature").scale == pytest.approx(2.5)

    fitted = build_ensemble(directory, temperature="fit", validation_data=(x_val, y_val))
    t = 1.0 / fitted.get_layer("temperature").scale
    assert t == pytest.approx(temperature_from_probabilities(val_mean, y_val), rel=1e-3)
    val_p = keras.ops.convert_to_numpy(fitted(x_val)).astype("float64")
    y_onehot = np.eye(10)[y_val]
    assert (
        -np.mean(np.sum(y_onehot * np.log(np.clip(val_p, 1e-7, 1)), 1))
        <= ref_scaled_nll(val_mean, y_val, 1.0) + 1e-6
    )
    # The top-1 class is unchanged.
    np.testing.assert_array_equal(np.argmax(keras.ops.convert_to_numpy(fitted(x)), 1), np.argmax(mean, 1))

    path = tmp_path / "calibrated.keras"
    fitted.save(path)
    reloaded = keras.saving.load_model(path)
    assert 1.0 / reloaded.get_layer("temperature").scale == pytest.approx(t)
    expected = keras.ops.convert_to_numpy(fitted(x))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(reloaded(x)), expected, atol=1e-6)
    # With uncertainty outputs too (one keras-free process for both files).
    uncertain = build_ensemble(directory, temperature=t, uncertainty=True)
    uncertain.save(tmp_path / "uncertain.keras")
    served, served_uncertain = load_without_the_package(tmp_path, [path, tmp_path / "uncertain.keras"], x)
    np.testing.assert_allclose(served["predictions"], expected, atol=1e-6)
    assert sorted(served_uncertain) == ["disagreement", "entropy", "mutual_information", "predictions"]
    for key, value in keras.tree.map_structure(keras.ops.convert_to_numpy, uncertain(x)).items():
        np.testing.assert_allclose(served_uncertain[key], value, atol=1e-6)

    # The fused graph fits T on its own mean (one predict pass of the fused graph).
    fused = build_ensemble(directory, temperature="fit", validation_data=(x_val, y_val), fuse=True)
    assert 1.0 / fused.get_layer("temperature").scale == pytest.approx(t, rel=1e-3)


def sigmoid_members(count=2):
    models = []
    for seed in range(count):
        keras.utils.set_random_seed(seed)
        models.append(
            keras.Sequential(
                [keras.Input((4,), name="features"), keras.layers.Dense(1, activation="sigmoid")]
            )
        )
    return models


def test_binary_temperature_in_the_graph():
    members = sigmoid_members()
    x = np.random.default_rng(0).random((16, 4), dtype="float32")
    mean = np.mean([keras.ops.convert_to_numpy(m(x)) for m in members], axis=0)
    ensemble = build_ensemble(members, temperature=0.5)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(ensemble(x)), temperature_scale(mean, 0.5), rtol=1e-4
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"temperature": 0}, ValueError, "finite and > 0"),
        ({"temperature": -2.0}, ValueError, "finite and > 0"),
        ({"temperature": True}, TypeError, "`temperature` must be"),
        ({"temperature": "fit"}, ValueError, r"temperature='fit' needs validation_data"),
        (
            {"validation_data": ([[0.0] * 64], [0])},
            ValueError,
            "only used with weights='fit' or temperature='fit'",
        ),
        (
            {"temperature": "fit", "validation_data": (np.zeros((2, 64), "float32"), [0])},
            ValueError,
            "has 1 rows but the inputs have 2",
        ),
    ],
)
def test_bad_temperatures_fail_before_loading(digits_run, monkeypatch, kwargs, error, message):
    import keras_snapshot.members as members_module

    monkeypatch.setattr(members_module, "load_model", lambda *a, **k: pytest.fail("loaded a snapshot"))
    with pytest.raises(error, match=message):
        build_ensemble(digits_run[0], **kwargs)


def test_temperature_needs_a_classifier_and_labels_in_range(digits_run, monkeypatch):
    regressors = [keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]) for _ in range(2)]
    with pytest.raises(ValueError, match="single-output classifier"):
        build_ensemble(regressors, temperature=2.0)
    monkeypatch.setattr(keras.Model, "predict", lambda *a, **k: pytest.fail("predicted"))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 9\]"):
        build_ensemble(
            digits_run[0], temperature="fit", validation_data=(np.zeros((2, 64), "float32"), [0, 10])
        )
    with pytest.raises(ValueError, match="`last` applies to snapshots"):
        fit_temperature(regressors[0], (np.zeros((2, 4)), [0, 1]), last=1)
