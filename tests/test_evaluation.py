"""Metrics against plain-numpy references, and evaluate_ensemble on a real snapshot run."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from keras_snapshot import evaluation
from keras_snapshot.evaluation import evaluate_ensemble


# --------------------------------------------------------------------------- numpy references
def ref_probs(p):
    p = np.asarray(p, dtype="float64")
    if p.ndim == 1:
        p = p[:, None]
    return np.concatenate([1 - p, p], axis=1) if p.shape[1] == 1 else p


def ref_error(p, y):
    p = ref_probs(p)
    return np.mean([np.argmax(row) != label for row, label in zip(p, y, strict=True)])


def ref_nll(p, y):
    p = ref_probs(p)
    return -np.mean([np.log(max(row[label], 1e-7)) for row, label in zip(p, y, strict=True)])


def ref_brier(p, y):
    p = ref_probs(p)
    total = 0.0
    for row, label in zip(p, y, strict=True):
        total += sum((row[c] - (1.0 if c == label else 0.0)) ** 2 for c in range(len(row)))
    return total / len(p)


def ref_ece(p, y, bins=15):
    p = ref_probs(p)
    confidence, correct = p.max(axis=1), p.argmax(axis=1) == y
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        inside = (confidence > lo) & (confidence <= hi)
        if b == 0:
            inside |= confidence == 0
        if inside.any():
            total += inside.sum() / len(p) * abs(correct[inside].mean() - confidence[inside].mean())
    return total


def ref_entropy(p):
    p = ref_probs(p)
    return np.array([-sum(q * np.log(q) for q in row if q > 0) for row in p])


def ref_mutual_information(stack):
    return ref_entropy(np.mean(stack, axis=0)) - np.mean([ref_entropy(member) for member in stack], axis=0)


def ref_disagreement(stack):
    top = np.argmax(np.mean(stack, axis=0), axis=1)
    return np.mean([np.argmax(member, axis=1) != top for member in stack], axis=0)


def random_probs(rng, shape, sharpness=3.0):
    logits = rng.normal(size=shape) * sharpness
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# --------------------------------------------------------------------------- metrics
@pytest.mark.parametrize("seed", [0, 1])
def test_metrics_equal_numpy_references_on_random_inputs(seed):
    rng = np.random.default_rng(seed)
    p = random_probs(rng, (200, 5))
    y = rng.integers(0, 5, 200)
    assert evaluation.error(p, y) == pytest.approx(ref_error(p, y), abs=1e-12)
    assert evaluation.nll(p, y) == pytest.approx(ref_nll(p, y), abs=1e-12)
    assert evaluation.brier(p, y) == pytest.approx(ref_brier(p, y), abs=1e-12)
    for bins in (1, 7, 15):
        assert evaluation.ece(p, y, bins) == pytest.approx(ref_ece(p, y, bins), abs=1e-12)
    np.testing.assert_allclose(evaluation.entropy(p), ref_entropy(p), atol=1e-9)
    # (N, 1) labels and one-hot rows give the same numbers
    one_hot = np.eye(5)[y]
    for labels in (y.reshape(-1, 1), one_hot, y.astype("float32")):
        assert evaluation.nll(p, labels) == pytest.approx(ref_nll(p, y), abs=1e-12)
        assert evaluation.brier(p, labels) == pytest.approx(ref_brier(p, y), abs=1e-12)
    stack = random_probs(rng, (4, 50, 5))
    np.testing.assert_allclose(evaluation.mutual_information(stack), ref_mutual_information(stack), atol=1e-9)
    np.testing.assert_allclose(evaluation.disagreement(stack), ref_disagreement(stack), atol=1e-12)
    regression = rng.normal(size=(3, 50, 2))
    np.testing.assert_allclose(
        evaluation.variance(regression), regression.var(axis=0).mean(axis=1), atol=1e-12
    )
    target = rng.normal(size=(50, 2))
    assert evaluation.mse(regression[0], target) == pytest.approx(np.mean((regression[0] - target) ** 2))
    assert evaluation.mse(regression[0][:, :1], target[:, 0]) == pytest.approx(
        np.mean((regression[0][:, 0] - target[:, 0]) ** 2)
    )


def test_hand_made_cases():
    # Perfectly calibrated: in each confidence bin, the accuracy equals the confidence.
    p = np.array([[0.8, 0.2]] * 5 + [[0.6, 0.4]] * 5)
    y = np.array([0, 0, 0, 0, 1, 0, 0, 0, 1, 1])
    assert evaluation.ece(p, y) == pytest.approx(0.0, abs=1e-12)
    # Always confident and always wrong: ECE is the confidence, the error 1.
    wrong = np.array([[0.9, 0.05, 0.05]] * 8)
    assert evaluation.ece(wrong, np.ones(8, int)) == pytest.approx(0.9)
    assert evaluation.error(wrong, np.ones(8, int)) == 1.0
    assert evaluation.nll(wrong, np.ones(8, int)) == pytest.approx(-np.log(0.05))
    assert evaluation.brier(wrong, np.ones(8, int)) == pytest.approx(0.81 + 0.95**2 + 0.0025)
    # A zero probability for the label costs -log(1e-7), not infinity.
    assert evaluation.nll(np.array([[1.0, 0.0]]), [1]) == pytest.approx(-np.log(1e-7))
    # A confidence exactly on a bin edge goes to the lower bin: (lo, hi].
    edge = np.array([[0.6, 0.4], [0.6, 0.4]])
    assert evaluation.ece(edge, [0, 1], bins=5) == pytest.approx(abs(0.5 - 0.6))
    # Binary single unit = two classes [1 - p, p].
    sigmoid = np.array([[0.9], [0.2], [0.6]])
    y2 = np.array([1, 0, 0])
    assert evaluation.error(sigmoid, y2) == pytest.approx(1 / 3)
    assert evaluation.brier(sigmoid, y2) == pytest.approx((2 * 0.01 + 2 * 0.04 + 2 * 0.36) / 3)
    assert evaluation.nll(sigmoid[:, 0], y2) == pytest.approx(-np.mean(np.log([0.9, 0.8, 0.4])))
    np.testing.assert_allclose(evaluation.entropy(np.array([0.5])), [np.log(2)])
    # Uniform distribution: entropy log C.
    np.testing.assert_allclose(evaluation.entropy(np.full((2, 4), 0.25)), [np.log(4)] * 2)


def test_mutual_information_and_disagreement_bounds():
    rng = np.random.default_rng(3)
    member = random_probs(rng, (30, 4))
    same = np.stack([member] * 3)
    np.testing.assert_allclose(evaluation.mutual_information(same), 0.0, atol=1e-6)
    np.testing.assert_array_equal(evaluation.disagreement(same), 0.0)
    different = random_probs(rng, (3, 30, 4))
    mi = evaluation.mutual_information(different)
    assert np.all(mi >= 0) and mi.mean() > 0.01
    d = evaluation.disagreement(different)
    assert np.all((d >= 0) & (d <= 1)) and d.max() > 0
    # Two confident members that disagree: MI = log 2 (binary), disagreement 1/2.
    opposed = np.array([[[1.0, 0.0]], [[0.0, 1.0]]])
    np.testing.assert_allclose(evaluation.mutual_information(opposed), [np.log(2)], atol=1e-5)
    np.testing.assert_allclose(evaluation.disagreement(opposed), [0.5])
    # Weighted: weight 0 removes a member.
    np.testing.assert_allclose(
        evaluation.mutual_information(different, weights=[1, 1, 0]),
        ref_mutual_information(different[:2]),
        atol=1e-9,
    )


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: evaluation.nll(np.full((3, 2), 0.5), [0, 1]), "has 2 rows"),
        (lambda: evaluation.nll(np.full((3, 2), 0.5), [0, 1, 2]), r"labels must lie in \[0, 1\]"),
        (lambda: evaluation.nll(np.full((3, 2), 0.5), [0, 1, -1]), r"labels must lie in \[0, 1\]"),
        (lambda: evaluation.nll(np.full((3, 2), 0.5), [0.5, 1, 0]), "integer class labels"),
        (lambda: evaluation.nll(np.full((2, 3), 1 / 3), [[0.5, 0.5, 0], [1, 0, 0]]), "one-hot rows"),
        (lambda: evaluation.ece(np.full((3, 2), 0.5), [0, 1, 0], bins=0), "`bins` must be"),
        (lambda: evaluation.mutual_information(np.full((3, 2, 2, 2), 0.5)), r"\(M, N, C\)"),
    ],
)
def test_metric_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# --------------------------------------------------------------------------- evaluate_ensemble
def members_of(directory):
    import json

    manifest = json.loads((directory / "manifest.json").read_text())
    return [keras.saving.load_model(directory / e["file"], compile=False) for e in manifest["snapshots"]]


def test_evaluate_ensemble_rows_match_numpy(digits_run, digits, monkeypatch):
    directory, _ = digits_run
    _, _, x_test, y_test = digits
    x_val, y_val, x, y = x_test[:150], y_test[:150], x_test[150:], y_test[150:]
    stack = np.stack([keras.ops.convert_to_numpy(m(x)) for m in members_of(directory)]).astype("float64")
    val_stack = np.stack([keras.ops.convert_to_numpy(m(x_val)) for m in members_of(directory)])

    import keras_snapshot.members as members_module

    loads = []
    original = members_module.load_model
    monkeypatch.setattr(members_module, "load_model", lambda *a, **k: loads.append(a[0]) or original(*a, **k))
    rows = evaluate_ensemble(directory, x, y, temperature="fit", validation_data=(x_val, y_val))
    assert len(loads) == 3  # each snapshot loaded once

    assert [r["model"] for r in rows] == [
        "snapshot_01",
        "snapshot_02",
        "snapshot_03",
        "ensemble of last 1",
        "ensemble of last 2",
        "ensemble of last 3",
    ]
    assert [r["m"] for r in rows] == [None, None, None, 1, 2, 3]
    expected = [stack[0], stack[1], stack[2], stack[2], stack[1:].mean(0), stack.mean(0)]
    val_expected = [
        val_stack[0],
        val_stack[1],
        val_stack[2],
        val_stack[2],
        val_stack[1:].mean(0),
        val_stack.mean(0),
    ]
    for row, p, p_val in zip(rows, expected, val_expected, strict=True):
        assert set(row) == {
            "model", "m", "error", "nll", "brier", "ece",
            "temperature", "error_ts", "nll_ts", "brier_ts", "ece_ts",
            # selective prediction (issue 19; checked in tests/test_selective.py)
            "aurc", "augrc", "error_at_80", "error_at_90", "error_at_95",
            "aurc_ts", "augrc_ts", "error_at_80_ts", "error_at_90_ts", "error_at_95_ts",
        }  # fmt: skip
        assert row["error"] == pytest.approx(ref_error(p, y), abs=1e-9)
        assert row["nll"] == pytest.approx(ref_nll(p, y), abs=1e-5)
        assert row["brier"] == pytest.approx(ref_brier(p, y), abs=1e-5)
        assert row["ece"] == pytest.approx(ref_ece(p, y), abs=1e-5)
        # One T per row, fitted on the validation predictions of that row.
        from keras_snapshot.calibration import temperature_from_probabilities, temperature_scale

        t = temperature_from_probabilities(p_val, y_val)
        assert row["temperature"] == pytest.approx(t, rel=1e-4)
        scaled = temperature_scale(p, row["temperature"])
        assert row["nll_ts"] == pytest.approx(ref_nll(scaled, y), abs=1e-5)
        assert row["error_ts"] == pytest.approx(row["error"], abs=1e-9)  # the top-1 class is kept
    assert rows[-1]["m"] == 3

    # A float temperature is the same for every row; last=2 keeps two members.
    rows = evaluate_ensemble(directory, x, y, temperature=1.5, last=2, bins=10)
    assert [r["model"] for r in rows] == [
        "snapshot_02",
        "snapshot_03",
        "ensemble of last 1",
        "ensemble of last 2",
    ]
    assert {r["temperature"] for r in rows} == {1.5}
    assert rows[-1]["ece"] == pytest.approx(ref_ece(stack[1:].mean(0), y, 10), abs=1e-5)
    assert rows[-1]["nll_ts"] == pytest.approx(
        ref_nll(temperature_scale(stack[1:].mean(0), 1.5), y), abs=1e-5
    )


def dense_members(units, activation, count=2, inputs=4):
    models = []
    for seed in range(count):
        keras.utils.set_random_seed(seed)
        models.append(
            keras.Sequential(
                [keras.Input((inputs,), name="features"), keras.layers.Dense(units, activation=activation)]
            )
        )
    return models


def test_regression_binary_and_logits():
    rng = np.random.default_rng(0)
    x = rng.random((40, 4), dtype="float32")
    regressors = dense_members(2, None)
    target = rng.normal(size=(40, 2))
    rows = evaluate_ensemble(regressors, x, target)
    stack = np.stack([keras.ops.convert_to_numpy(m(x)) for m in regressors])
    assert set(rows[0]) == {"model", "m", "mse"}
    assert rows[-1]["mse"] == pytest.approx(np.mean((stack.mean(0) - target) ** 2), rel=1e-5)

    binary = dense_members(1, "sigmoid")
    y = rng.integers(0, 2, 40)
    rows = evaluate_ensemble(binary, x, y, temperature=2.0)
    p = np.stack([keras.ops.convert_to_numpy(m(x)) for m in binary]).mean(0)
    assert rows[-1]["nll"] == pytest.approx(ref_nll(p, y), abs=1e-5)
    assert rows[-1]["brier"] == pytest.approx(ref_brier(p, y), abs=1e-5)

    logits = dense_members(3, None)
    with pytest.raises(ValueError, match=r"look like logits.*output_activation='softmax'"):
        evaluate_ensemble(logits, x, rng.integers(0, 3, 40))
    rows = evaluate_ensemble(logits, x, rng.integers(0, 3, 40), output_activation="softmax")
    assert 0 <= rows[-1]["error"] <= 1


def two_output_model():
    inputs = keras.Input((4,), name="features")
    return keras.Model(
        inputs,
        {
            "label": keras.layers.Dense(3, activation="softmax")(inputs),
            "score": keras.layers.Dense(1)(inputs),
        },
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"temperature": 0.0}, ValueError, "finite and > 0"),
        ({"temperature": -1.0}, ValueError, "finite and > 0"),
        ({"temperature": float("nan")}, ValueError, "finite and > 0"),
        ({"temperature": "auto"}, TypeError, "`temperature` must be"),
        ({"temperature": "fit"}, ValueError, "needs validation_data"),
        ({"validation_data": (np.zeros((2, 64)), [0, 1])}, ValueError, "only used with temperature='fit'"),
        ({"y": np.zeros(5, int)}, ValueError, "has 5 rows but the inputs have 397"),
        ({"y": np.full(397, 10)}, ValueError, r"labels must lie in \[0, 9\]"),
        ({"last": 4}, ValueError, "out of range"),
        ({"bins": 0}, ValueError, "`bins` must be"),
        ({"batch_size": 0}, ValueError, "`batch_size` must be"),
        (
            {"temperature": "fit", "validation_data": (np.zeros((3, 64), "float32"), [0, 1])},
            ValueError,
            "has 2 rows but the inputs have 3",
        ),
        (
            {"temperature": "fit", "validation_data": (np.zeros((2, 64), "float32"), [0, 12])},
            ValueError,
            r"labels must lie in \[0, 9\]",
        ),
    ],
)
def test_bad_inputs_fail_before_any_prediction(digits_run, digits, monkeypatch, kwargs, error, message):
    directory, _ = digits_run
    x, y = digits[2], digits[3]
    kwargs = {"y": y, **kwargs}

    def refuse(*args, **kw):
        raise AssertionError("predict ran before the arguments were checked")

    monkeypatch.setattr(keras.Model, "predict", refuse)
    with pytest.raises(error, match=message):
        evaluate_ensemble(directory, x, **kwargs)


def test_multi_output_members_are_refused(monkeypatch):
    models = [two_output_model(), two_output_model()]
    monkeypatch.setattr(keras.Model, "predict", lambda *a, **k: pytest.fail("predicted"))
    with pytest.raises(ValueError, match=r"single-output members.*\['label', 'score'\]"):
        evaluate_ensemble(models, np.zeros((4, 4), "float32"), np.zeros(4, int))
