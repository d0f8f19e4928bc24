"""build_ensemble(..., abstain_coverage=c): the served abstain decision, in Keras, after a .keras round
trip and in the exported SavedModel read by TF Serving's loader."""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
from test_export import call, refuses_torch, run_tf_serving_loader
from test_uncertainty import member_stack, members_of

from keras_snapshot import build_ensemble, evaluation, export_saved_model
from keras_snapshot.calibration import temperature_scale


def threshold_of(model) -> float:
    return -float(model.get_layer("abstain_threshold").offset)


def numpy_scores(stack, predictions) -> dict:
    return {
        "max_probability": 1.0 - predictions.max(axis=1),
        "entropy": evaluation.entropy(predictions),
        "mutual_information": evaluation.mutual_information(stack),
        "disagreement": evaluation.disagreement(stack),
    }


def split(digits):
    x = digits[2]
    return x[:200], x[200:]


def kept_fraction(out) -> float:
    return 1.0 - float(np.mean(out["abstain"]))


@pytest.mark.parametrize("score", ["entropy", "max_probability", "mutual_information"])
def test_abstain_keeps_the_coverage_on_validation(digits_run, digits, score):
    directory, _ = digits_run
    x_val, x_test = split(digits)
    model = build_ensemble(
        directory, last=2, abstain_coverage=0.8, abstain_score=score, validation_data=(x_val, None)
    )
    out = call(model, x_val)
    assert sorted(out) == ["abstain", "predictions"]
    assert out["abstain"].shape == (200,) and out["abstain"].dtype == np.float32
    assert set(np.unique(out["abstain"])) <= {0.0, 1.0}
    assert abs(kept_fraction(out) - 0.8) <= 1 / 200
    # The decision is the documented one: the numpy score above the stored threshold.
    stack = member_stack(members_of(directory)[1:], np.concatenate([x_val, x_test]))
    expected = numpy_scores(stack, stack.mean(0))[score] > threshold_of(model)
    served = np.concatenate([out["abstain"], call(model, x_test)["abstain"]])
    scores = numpy_scores(stack, stack.mean(0))[score]
    # Rows whose float64 score lies within float32 rounding of the threshold may go either way.
    clear = np.abs(scores - threshold_of(model)) > 1e-5
    np.testing.assert_array_equal(served[clear], expected[clear].astype("float32"))
    assert clear.mean() > 0.95


def test_abstain_with_fitted_temperature_uses_the_calibrated_scores(digits_run, digits):
    directory, _ = digits_run
    x_val, _ = split(digits)
    y_val = digits[3][:200]
    model = build_ensemble(
        directory,
        uncertainty=True,
        temperature="fit",
        abstain_coverage=0.9,
        validation_data=(x_val, y_val),
    )
    out = call(model, x_val)
    assert sorted(out) == ["abstain", "disagreement", "entropy", "mutual_information", "predictions"]
    assert abs(kept_fraction(out) - 0.9) <= 1 / 200
    t = 1.0 / float(model.get_layer("temperature").scale)
    assert t != pytest.approx(1.0, abs=1e-3)  # T was fitted, so the scores differ from the raw ones
    stack = member_stack(members_of(directory), x_val)
    calibrated = evaluation.entropy(temperature_scale(stack.mean(0), t))
    assert np.mean(calibrated <= threshold_of(model)) == pytest.approx(0.9, abs=1 / 200 + 1e-9)
    np.testing.assert_array_equal(out["abstain"] == 1.0, out["entropy"] > np.float32(threshold_of(model)))


def test_abstain_fused(digits_run, digits):
    directory, _ = digits_run
    x_val, _ = split(digits)
    for score in ("entropy", "mutual_information"):
        model = build_ensemble(
            directory, fuse=True, abstain_coverage=0.85, abstain_score=score, validation_data=(x_val, None)
        )
        assert abs(kept_fraction(call(model, x_val)) - 0.85) <= 1 / 200, score


def test_discrete_scores_warn_and_keep_the_nearest_fraction(digits_run, digits):
    directory, _ = digits_run
    x_val, _ = split(digits)
    stack = member_stack(members_of(directory), x_val)
    levels = evaluation.disagreement(stack)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = build_ensemble(
            directory, abstain_coverage=0.999, abstain_score="disagreement", validation_data=(x_val, None)
        )
    kept = kept_fraction(call(model, x_val))
    # The reachable fractions are those of the distinct levels; the nearest to 0.999 is served.
    reachable = [np.mean(levels <= level + 1e-6) for level in np.unique(levels)]
    assert kept == pytest.approx(min(reachable, key=lambda f: abs(f - 0.999)), abs=1e-9)
    if abs(kept - 0.999) > 1 / 200:
        assert any("few distinct values" in str(w.message) for w in caught)


def test_abstain_survives_save_reload_and_export(digits_run, digits, tmp_path):
    directory, _ = digits_run
    x_val, x_test = split(digits)
    model = build_ensemble(directory, abstain_coverage=0.8, validation_data=(x_val, None))
    expected = {"val": call(model, x_val), "test": call(model, x_test)}
    model.save(tmp_path / "abstain.keras")
    reloaded = keras.saving.load_model(tmp_path / "abstain.keras")  # plain Keras, safe mode
    for name, x in (("val", x_val), ("test", x_test)):
        np.testing.assert_array_equal(call(reloaded, x)["abstain"], expected[name]["abstain"])
    assert abs(kept_fraction(call(reloaded, x_val)) - 0.8) <= 1 / 200
    if refuses_torch(export_saved_model, model, tmp_path / "served"):
        return
    version = export_saved_model(model, tmp_path / "served")
    # uncertainty=True on a model built without it: the measures are added next to "abstain".
    measured = export_saved_model(model, tmp_path / "served", uncertainty=True)
    served, with_measures = run_tf_serving_loader(
        tmp_path, [(version, {"pixels": x_val}), (measured, {"pixels": x_val})]
    )
    assert sorted(served) == ["abstain", "predictions"]
    assert abs(1.0 - float(np.mean(served["abstain"])) - 0.8) <= 1 / 200
    np.testing.assert_array_equal(served["abstain"], expected["val"]["abstain"])
    assert sorted(with_measures) == [
        "abstain",
        "disagreement",
        "entropy",
        "mutual_information",
        "predictions",
    ]
    np.testing.assert_array_equal(with_measures["abstain"], expected["val"]["abstain"])
    scores = numpy_scores(member_stack(members_of(directory), x_val), expected["val"]["predictions"])
    for key in ("entropy", "mutual_information", "disagreement"):
        np.testing.assert_allclose(with_measures[key], scores[key], atol=1e-5, err_msg=key)


def test_bad_abstain_arguments_fail_before_any_load(digits_run, tmp_path):
    del digits_run  # the session fixture is not needed: nothing may be loaded
    x_val = np.zeros((4, 64), dtype="float32")
    missing = tmp_path / "missing"  # a load would raise FileNotFoundError: the checks come first
    with pytest.raises(ValueError, match="abstain_coverage needs validation_data"):
        build_ensemble(missing, abstain_coverage=0.9)
    with pytest.raises(ValueError, match=r"must lie in \(0, 1\]"):
        build_ensemble(missing, abstain_coverage=0.0, validation_data=(x_val, None))
    with pytest.raises(TypeError, match="abstain_coverage"):
        build_ensemble(missing, abstain_coverage="90%", validation_data=(x_val, None))
    with pytest.raises(ValueError, match="`abstain_score` must be one of"):
        build_ensemble(missing, abstain_coverage=0.9, abstain_score="variance", validation_data=(x_val, None))
    regressor = keras.Sequential([keras.Input((64,), name="pixels"), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="abstain_coverage needs a single-output classifier"):
        build_ensemble([regressor], abstain_coverage=0.9, validation_data=(x_val, None))
