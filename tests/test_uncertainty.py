"""Uncertainty outputs in the graph: build_ensemble(..., uncertainty=True) and export_saved_model(..., uncertainty=True)."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
from test_export import call, member_model, refuses_torch, run_tf_serving_loader

from keras_snapshot import build_ensemble, evaluation, export_saved_model
from keras_snapshot.calibration import temperature_scale
from keras_snapshot.export import _serving_model

CLASSIFIER_KEYS = ["disagreement", "entropy", "mutual_information", "predictions"]
TOLERANCE = 2e-5


def members_of(directory):
    manifest = json.loads((directory / "manifest.json").read_text())
    return [keras.saving.load_model(directory / e["file"], compile=False) for e in manifest["snapshots"]]


def member_stack(members, x):
    return np.stack([keras.ops.convert_to_numpy(m(x)) for m in members]).astype("float64")


def check_classifier(out, stack, predictions, weights=None):
    assert sorted(out) == CLASSIFIER_KEYS
    for key in CLASSIFIER_KEYS[:3]:
        assert out[key].shape == (stack.shape[1],) and out[key].dtype == np.float32, (key, out[key].shape)
    np.testing.assert_allclose(out["predictions"], predictions, atol=TOLERANCE)
    np.testing.assert_allclose(out["entropy"], evaluation.entropy(predictions), atol=TOLERANCE)
    np.testing.assert_allclose(
        out["mutual_information"], evaluation.mutual_information(stack, weights=weights), atol=TOLERANCE
    )
    np.testing.assert_allclose(
        out["disagreement"], evaluation.disagreement(stack, weights=weights), atol=1e-6
    )
    assert np.all(out["mutual_information"] >= 0)
    assert np.all((out["disagreement"] >= 0) & (out["disagreement"] <= 1))


@pytest.mark.parametrize("fuse", [False, True])
def test_uncertainty_outputs_equal_numpy(digits_run, digits, fuse):
    directory, _ = digits_run
    x = digits[2][:64]
    stack = member_stack(members_of(directory), x)
    ensemble = build_ensemble(directory, uncertainty=True, fuse=fuse)
    out = call(ensemble, x)
    check_classifier(out, stack, stack.mean(0))
    assert out["mutual_information"].mean() > 0  # three snapshots of one run still differ

    weighted = build_ensemble(directory, weights=[0.2, 0.0, 0.8], uncertainty=True, fuse=fuse)
    w = np.array([0.2, 0.0, 0.8])
    check_classifier(call(weighted, x), stack, np.tensordot(w, stack, axes=1), weights=w)


def test_identical_members_carry_no_epistemic_uncertainty(digits_run, digits):
    directory, _ = digits_run
    x = digits[2][:64]
    path = directory / "snapshot-03.keras"
    for fuse in (False, True):
        out = call(build_ensemble([path, path, path], uncertainty=True, fuse=fuse), x)
        np.testing.assert_allclose(out["mutual_information"], 0.0, atol=1e-6)
        np.testing.assert_array_equal(out["disagreement"], 0.0)
        assert out["entropy"].mean() > 0


def test_temperature_with_uncertainty(digits_run, digits, tmp_path):
    """predictions and entropy are calibrated; mutual information and disagreement use the raw members."""
    directory, _ = digits_run
    x = digits[2][:64]
    stack = member_stack(members_of(directory), x)
    ensemble = build_ensemble(directory, temperature=2.0, uncertainty=True)
    out = call(ensemble, x)
    check_classifier(out, stack, temperature_scale(stack.mean(0), 2.0))
    path = tmp_path / "uncertain.keras"
    ensemble.save(path)
    # export_saved_model(..., uncertainty=True) adds the same outputs to the plain calibrated ensemble
    # (its serving view, checked in-process on every backend; served on TF/JAX below).
    view, _ = _serving_model(build_ensemble(directory, temperature=2.0), False, True)
    added = call(view, {"pixels": x})
    assert sorted(added) == CLASSIFIER_KEYS
    for key in CLASSIFIER_KEYS:
        np.testing.assert_allclose(added[key], out[key], atol=1e-6)
    reloaded = call(keras.saving.load_model(path), x)  # without the package: test_calibration
    assert sorted(reloaded) == CLASSIFIER_KEYS
    for key in CLASSIFIER_KEYS:
        np.testing.assert_allclose(reloaded[key], out[key], atol=1e-6)


def test_regression_binary_and_multi_output(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.random((16, 4), dtype="float32")
    regressors, binary = [], []
    for seed in range(3):
        keras.utils.set_random_seed(seed)
        regressors.append(keras.Sequential([keras.Input((4,), name="features"), keras.layers.Dense(2)]))
        binary.append(
            keras.Sequential(
                [keras.Input((4,), name="features"), keras.layers.Dense(1, activation="sigmoid")]
            )
        )
    out = call(build_ensemble(regressors, uncertainty=True), x)
    assert sorted(out) == ["predictions", "variance"]
    stack = member_stack(regressors, x)
    np.testing.assert_allclose(out["variance"], evaluation.variance(stack), rtol=1e-4, atol=1e-7)
    assert out["variance"].shape == (16,) and out["variance"].dtype == np.float32

    for fuse in (False, True):
        out = call(build_ensemble(binary, uncertainty=True, fuse=fuse), x)
        stack = member_stack(binary, x)
        check_classifier(out, stack, stack.mean(0))

    files = []
    for seed in range(2):
        files.append(tmp_path / f"member-{seed}.keras")
        member_model(seed).save(files[-1])
    inputs = {
        "pixels": rng.random((8, 6), dtype="float32"),
        "category": (np.arange(8) % 4).reshape(8, 1).astype("int32"),
    }
    out = call(build_ensemble(files, uncertainty=True), inputs)
    assert sorted(out) == [
        "label",
        "label_disagreement",
        "label_entropy",
        "label_mutual_information",
        "score",
        "score_variance",
    ]
    members = [keras.saving.load_model(f, compile=False) for f in files]
    labels = np.stack([call(m, inputs)["label"] for m in members]).astype("float64")
    np.testing.assert_allclose(
        out["label_mutual_information"], evaluation.mutual_information(labels), atol=TOLERANCE
    )


# --------------------------------------------------------------------------- served
def test_served_uncertainty_equals_numpy(digits_run, digits, tmp_path):
    directory, _ = digits_run
    x = digits[2][:32]
    stack = member_stack(members_of(directory)[1:], x)
    branches = build_ensemble(directory, last=2)
    if refuses_torch(export_saved_model, branches, tmp_path / "a", uncertainty=True):
        return
    added = export_saved_model(branches, tmp_path / "added", uncertainty=True, member_outputs=True)
    fused = build_ensemble(directory, last=2, fuse=True, uncertainty=True, temperature=1.5)
    built_in = export_saved_model(fused, tmp_path / "built_in")
    served_added, served_built_in = run_tf_serving_loader(
        tmp_path, [(added, {"pixels": x}), (built_in, {"pixels": x})]
    )

    assert sorted(served_added) == [*CLASSIFIER_KEYS, "snapshot_02", "snapshot_03"]
    check_classifier({k: served_added[k] for k in CLASSIFIER_KEYS}, stack, stack.mean(0))
    assert sorted(served_built_in) == CLASSIFIER_KEYS  # the Keras model's keys are the signature's
    check_classifier(served_built_in, stack, temperature_scale(stack.mean(0), 1.5))


def test_export_uncertainty_needs_the_members(digits_run, tmp_path):
    directory, _ = digits_run
    with pytest.raises(TypeError, match="`uncertainty` must be True or False"):
        export_saved_model(build_ensemble(directory), tmp_path, uncertainty="yes")
    with pytest.raises(ValueError, match=r"uncertainty=True needs the members' outputs.*fuse=True"):
        export_saved_model(build_ensemble(directory, fuse=True), tmp_path, uncertainty=True)
    plain = keras.Sequential(
        [keras.Input((4,), name="features"), keras.layers.Dense(2, activation="softmax")]
    )
    with pytest.raises(ValueError, match="uncertainty=True needs the members' outputs"):
        export_saved_model(plain, tmp_path, uncertainty=True)
    with pytest.raises(TypeError, match="`uncertainty` must be True or False"):
        build_ensemble(directory, uncertainty=1)
