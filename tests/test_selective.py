"""Selective prediction and OOD metrics: numpy references, sklearn, known answers, evaluate_ensemble."""

from __future__ import annotations

import itertools

import keras
import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from keras_snapshot import SnapshotCallback, selective
from keras_snapshot.evaluation import evaluate_ensemble


# ---------------------------------------------------------------------------------------- references
def reference_curve(confidence, wrong, order):
    """Errors among the k first rows of `order`, k = 1..N (no tie handling: one order)."""
    return np.cumsum(np.asarray(wrong, dtype="float64")[order])


def reference_tie_averaged(confidence, wrong):
    """The mean over every order of the tied rows, by enumeration (small inputs only)."""
    confidence = np.asarray(confidence, dtype="float64")
    groups = [np.flatnonzero(confidence == value) for value in sorted(set(confidence), reverse=True)]
    curves = []
    for choice in itertools.product(*(itertools.permutations(group) for group in groups)):
        curves.append(reference_curve(confidence, wrong, np.concatenate(choice)))
    return np.mean(curves, axis=0)


def test_aurc_augrc_match_the_definitions_without_ties():
    rng = np.random.default_rng(0)
    confidence = rng.random(200)
    wrong = rng.random(200) < 0.3
    errors = reference_curve(confidence, wrong, np.argsort(-confidence))
    k = np.arange(1, 201)
    assert selective.aurc(confidence, wrong) == pytest.approx(np.mean(errors / k), abs=1e-12)
    assert selective.augrc(confidence, wrong) == pytest.approx(np.mean(errors / 200), abs=1e-12)
    for coverage, size in ((0.8, 160), (0.9, 180), (0.95, 190), (1.0, 200)):
        expected = errors[size - 1] / size
        assert selective.error_at_coverage(confidence, wrong, coverage) == pytest.approx(expected, abs=1e-12)
    assert selective.error_at_coverage(confidence, wrong, 1.0) == pytest.approx(wrong.mean())


def test_known_answers():
    # The two wrong rows are the least confident: an oracle ranking.
    confidence = [0.9, 0.8, 0.7, 0.2, 0.1]
    wrong = [0, 0, 0, 1, 1]
    # risks at k = 1..5: 0, 0, 0, 1/4, 2/5
    assert selective.aurc(confidence, wrong) == pytest.approx((0.25 + 0.4) / 5)
    assert selective.augrc(confidence, wrong) == pytest.approx((1 / 5 + 2 / 5) / 5)
    assert selective.error_at_coverage(confidence, wrong, 0.6) == 0.0
    # The worst ranking: the wrong rows first.
    assert selective.aurc(confidence, wrong[::-1]) == pytest.approx((1 + 1 + 2 / 3 + 2 / 4 + 2 / 5) / 5)


def test_ties_are_averaged_over_every_order():
    confidence = np.array([0.9, 0.5, 0.5, 0.5, 0.2, 0.2, 0.9])
    wrong = np.array([1, 0, 1, 0, 1, 0, 0])
    errors = reference_tie_averaged(confidence, wrong)
    k = np.arange(1, 8)
    assert selective.aurc(confidence, wrong) == pytest.approx(np.mean(errors / k), abs=1e-12)
    assert selective.augrc(confidence, wrong) == pytest.approx(np.mean(errors / 7), abs=1e-12)
    assert selective.error_at_coverage(confidence, wrong, 3 / 7) == pytest.approx(errors[2] / 3, abs=1e-12)
    # Independent of the rows' order.
    permutation = np.random.default_rng(1).permutation(7)
    assert selective.aurc(confidence[permutation], wrong[permutation]) == pytest.approx(
        selective.aurc(confidence, wrong), abs=1e-15
    )
    # All tied: every prefix has the overall error rate.
    assert selective.aurc(np.ones(4), [1, 0, 0, 0]) == pytest.approx(0.25)


@pytest.mark.parametrize("discrete", [False, True])
def test_ood_metrics_match_sklearn(discrete):
    rng = np.random.default_rng(2)
    scores_in = rng.normal(0.0, 1.0, 300)
    scores_out = rng.normal(0.7, 1.0, 120)
    if discrete:  # many ties, as disagreement has
        scores_in, scores_out = np.round(scores_in), np.round(scores_out)
    truth = np.r_[np.zeros(300), np.ones(120)]
    scores = np.r_[scores_in, scores_out]
    assert selective.auroc(scores_in, scores_out) == pytest.approx(roc_auc_score(truth, scores), abs=1e-12)
    assert selective.aupr(scores_in, scores_out) == pytest.approx(
        average_precision_score(truth, scores), abs=1e-12
    )
    fpr, tpr, _ = roc_curve(truth, scores, drop_intermediate=False)
    expected = fpr[np.searchsorted(tpr, 0.95, side="left")]
    assert selective.fpr95(scores_in, scores_out) == pytest.approx(expected, abs=1e-12)
    # The definition: P(OOD > ID) + P(tie) / 2 over every pair.
    greater = (scores_out[:, None] > scores_in[None, :]).mean()
    ties = (scores_out[:, None] == scores_in[None, :]).mean()
    assert selective.auroc(scores_in, scores_out) == pytest.approx(greater + ties / 2, abs=1e-12)


def test_ood_known_answers():
    separated = selective.ood_metrics([0.1, 0.2, 0.3], [0.5, 0.6])
    assert separated == {"auroc": 1.0, "aupr": 1.0, "fpr95": 0.0}
    constant = selective.ood_metrics(np.zeros(10), np.zeros(5))  # e.g. mutual information of equal members
    assert constant["auroc"] == 0.5
    assert constant["aupr"] == pytest.approx(5 / 15)
    assert constant["fpr95"] == 1.0
    reversed_ = selective.ood_metrics([0.5, 0.6], [0.1, 0.2, 0.3])
    assert reversed_["auroc"] == 0.0 and reversed_["fpr95"] == 1.0
    # 20 OOD rows: 19 above every ID row, one below them all; 95 % are flagged with no ID row.
    assert selective.fpr95(np.zeros(10), np.r_[np.ones(19), -1.0]) == 0.0
    assert selective.fpr95(np.zeros(10), np.r_[np.ones(18), -1.0, -1.0]) == 1.0


def test_coverage_threshold():
    rng = np.random.default_rng(3)
    scores = rng.random(101).astype("float32")
    for coverage in (0.5, 0.8, 0.9, 0.95, 1.0):
        threshold, kept = selective.coverage_threshold(scores, coverage)
        actual = np.mean(scores <= np.float32(threshold))
        assert actual == kept
        assert abs(actual - coverage) <= 1 / 101 / 2 + 1e-12
    # Discrete scores: the nearest achievable fraction, the smaller on a tie.
    threshold, kept = selective.coverage_threshold([0, 0, 0, 0, 0, 0, 0, 0, 0.5, 1], 0.85)
    assert kept == 0.8 and 0 < threshold < 0.5
    threshold, kept = selective.coverage_threshold([0, 0, 0, 0, 0, 0, 0, 0, 0.5, 1], 0.2)
    assert kept == 0.8
    # Neighbouring float32 values: the threshold still separates them in float32.
    a = np.float32(0.3)
    b = np.nextafter(a, np.float32(1))
    threshold, kept = selective.coverage_threshold(np.array([a, b], dtype="float32"), 0.5)
    assert kept == 0.5 and a <= np.float32(threshold) < b


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="one of each per row"):
        selective.aurc([0.1, 0.2], [1])
    with pytest.raises(ValueError, match="booleans"):
        selective.aurc([0.1, 0.2], [2, 0])
    with pytest.raises(ValueError, match="NaN"):
        selective.auroc([np.nan], [1.0])
    with pytest.raises(ValueError, match="at least one"):
        selective.auroc([], [1.0])
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        selective.coverage_threshold([0.1], 0.0)
    with pytest.raises(TypeError, match=r"\(0, 1\]"):
        selective.error_at_coverage([0.1], [0], "0.9")


# ---------------------------------------------------------------------------------------- evaluate_ensemble
def softmax_model(seed, identical_to=None):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    if identical_to is not None:
        model.set_weights(identical_to.get_weights())
    return model


def toy_data(rows, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 4)).astype("float32")
    return x, (x[:, 0] > 0).astype("int64") + (x[:, 1] > 0.5)


def test_evaluate_ensemble_rows_gain_selective_and_ood_metrics(tmp_path):
    x, y = toy_data(160, 0)
    model = softmax_model(0)
    model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    model.fit(
        x, y, batch_size=16, epochs=4, verbose=0, callbacks=[SnapshotCallback(tmp_path / "s", cycles=2)]
    )
    x_test, y_test = toy_data(120, 1)
    x_ood = (10.0 * np.random.default_rng(2).normal(size=(50, 4))).astype("float32")
    rows = evaluate_ensemble(tmp_path / "s", x_test, y_test, ood=x_ood, temperature=1.5)
    members = [keras.saving.load_model(path) for path in sorted((tmp_path / "s").glob("*.keras"))]
    stack = np.stack([m.predict(x_test, verbose=0) for m in members]).astype("float64")
    stack_ood = np.stack([m.predict(x_ood, verbose=0) for m in members]).astype("float64")
    assert [row["model"] for row in rows] == [
        "snapshot_01",
        "snapshot_02",
        "ensemble of last 1",
        "ensemble of last 2",
    ]
    expected_p = [stack[0], stack[1], stack[1], stack.mean(0)]
    expected_ood = [stack_ood[0], stack_ood[1], stack_ood[1], stack_ood.mean(0)]
    for row, p, p_ood in zip(rows, expected_p, expected_ood, strict=True):
        wrong = p.argmax(1) != y_test
        expected = selective.selective_metrics(p.max(1), wrong)
        for key, value in expected.items():
            assert row[key] == pytest.approx(value, abs=1e-6), (row["model"], key)
        truth = np.r_[np.zeros(len(p)), np.ones(len(p_ood))]
        score = np.r_[1 - p.max(1), 1 - p_ood.max(1)]
        assert row["ood"]["max_probability"]["auroc"] == pytest.approx(roc_auc_score(truth, score), abs=1e-4)
        assert row["ood"]["max_probability"]["aupr"] == pytest.approx(
            average_precision_score(truth, score), abs=1e-4
        )
        averaged = row["m"] is not None and row["m"] >= 2
        expected_scores = {"max_probability", "entropy"} | (
            {"mutual_information", "disagreement"} if averaged else set()
        )
        assert set(row["ood"]) == expected_scores
        assert set(row["ood_ts"]) == expected_scores
        for key in ("aurc_ts", "augrc_ts", "error_at_80_ts", "error_at_90_ts", "error_at_95_ts"):
            assert 0.0 <= row[key] <= 1.0
    # Far-away inputs: the max probability of a linear softmax saturates, so OOD rows look surer.
    assert rows[-1]["ood"]["entropy"]["auroc"] < 0.5


def test_identical_members_have_zero_mutual_information_and_chance_auroc(tmp_path):
    first = softmax_model(0)
    second = softmax_model(1, identical_to=first)
    x, y = toy_data(64, 3)
    x_ood = (3.0 + np.random.default_rng(4).normal(size=(40, 4))).astype("float32")
    rows = evaluate_ensemble([first, second], x, y, ood=x_ood)
    ensemble = rows[-1]
    assert ensemble["m"] == 2
    assert ensemble["ood"]["mutual_information"]["auroc"] == 0.5
    assert ensemble["ood"]["disagreement"]["auroc"] == 0.5
    assert ensemble["ood"]["mutual_information"]["fpr95"] == 1.0
    assert "ood_ts" not in ensemble


def test_separable_ood_has_auroc_one(tmp_path):
    # Members whose confidence grows with x[0]: OOD rows (x[0] << 0) are the least confident.
    def member(scale):
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
        kernel = np.zeros((4, 2), dtype="float32")
        kernel[0, 0] = scale
        model.set_weights([kernel, np.zeros(2, dtype="float32")])
        return model

    rng = np.random.default_rng(5)
    x = np.abs(rng.normal(size=(50, 4))).astype("float32") + 2.0
    x_ood = rng.normal(size=(30, 4)).astype("float32") * 0.1
    rows = evaluate_ensemble([member(1.0), member(2.0)], x, np.zeros(50, dtype="int64"), ood=x_ood)
    for row in rows:
        assert row["ood"]["max_probability"] == pytest.approx({"auroc": 1.0, "aupr": 1.0, "fpr95": 0.0})
        assert row["ood"]["entropy"]["auroc"] == 1.0
        assert row["aurc"] == 0.0


def test_ood_is_checked_before_any_prediction(tmp_path):
    model = softmax_model(0)
    x, y = toy_data(8, 0)
    with pytest.raises(ValueError, match="ood"):
        evaluate_ensemble([model], x, y, ood=np.zeros((0, 4), dtype="float32"))
    with pytest.raises(ValueError, match=r"`ood` must be structured like `x`.*\(3,\)"):
        evaluate_ensemble([model], x, y, ood=np.zeros((5, 3), dtype="float32"))
    regressor = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    with pytest.raises(ValueError, match="classifier"):
        evaluate_ensemble([regressor], x, x[:, 0], ood=x)


# ---------------------------------------------------------------------------------------- CLI
def ood_table(stdout: str) -> dict[tuple[str, str], dict[str, float]]:
    """{(model, score): {column: value}} of the table after "Out-of-distribution detection"."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Out-of-distribution detection")) + 1
    header = lines[start].split()
    result = {}
    for cells in (line.split() for line in lines[start + 1 :] if line.strip()):
        width = len(cells) - len(header) + 1
        values = dict(zip(header[1:], cells[width:], strict=True))
        score = values.pop("score")
        result[(" ".join(cells[:width]), score)] = {k: float(v) for k, v in values.items()}
    return result


def test_cli_evaluate_ood(capsys, digits_run, digits, tmp_path):
    from keras_snapshot.cli import main

    directory = digits_run[0]
    x_test, y_test = digits[2][200:], digits[3][200:]
    np.savez(tmp_path / "test.npz", pixels=x_test, labels=y_test)
    # Far OOD: the digits' pixels inverted and shuffled across positions.
    x_ood = np.random.default_rng(0).permutation(1.0 - digits[2][:150], axis=1).astype("float32")
    np.savez(tmp_path / "ood.npz", pixels=x_ood)
    argv = [
        "evaluate",
        str(directory),
        "--data",
        str(tmp_path / "test.npz"),
        "--x",
        "pixels",
        "--y",
        "labels",
    ]
    status = main([*argv, "--ood", str(tmp_path / "ood.npz"), "--temperature", "1.5"])
    out, err = capsys.readouterr()
    assert status == 0, err
    header = out.splitlines()[1].split()
    assert {"aurc", "augrc", "error_at_80", "error_at_90", "error_at_95", "aurc_ts"} <= set(header)
    assert "ood" not in header and "ood_ts" not in header
    served = ood_table(out)
    scores = {"max_probability", "entropy", "mutual_information", "disagreement"}
    assert {score for model, score in served if model == "ensemble of last 3"} == scores
    assert {score for model, score in served if model == "snapshot_01"} == {"max_probability", "entropy"}
    rows = evaluate_ensemble(directory, x_test, y_test, ood=x_ood, temperature=1.5)
    for row in rows:
        for score, metrics in row["ood"].items():
            printed = served[(row["model"], score)]
            for metric, value in metrics.items():
                assert printed[metric] == pytest.approx(value, abs=1e-4)
                assert printed[f"{metric}_ts"] == pytest.approx(row["ood_ts"][score][metric], abs=1e-4)
    # Bad --ood files fail before any snapshot is run, naming the option.
    assert main([*argv, "--ood", str(tmp_path / "absent.npz")]) == 1
    assert "(--ood) does not exist" in capsys.readouterr().err
    np.savez(tmp_path / "wrong.npz", other=x_ood)
    assert main([*argv, "--ood", str(tmp_path / "wrong.npz")]) == 1
    assert "has no array 'pixels'" in capsys.readouterr().err
