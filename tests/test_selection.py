"""Greedy ensemble selection (Caruana et al., 2004): the pure function, and build_ensemble /
fit_ensemble_weights / `keras-snapshot build --weights greedy` on a real run with a useless member."""

from __future__ import annotations

import json
import shutil

import keras
import numpy as np
import pytest
from conftest import make_digits_model
from test_cli import run_cli

import keras_snapshot
from keras_snapshot.selection import greedy_selection


def nll(p, y):
    return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-7, None))))


def synthetic(seed=0, rows=300, classes=4):
    """Three informative members with different errors and one useless (random) member."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, rows)
    members = []
    for _ in range(3):
        logits = 2.0 * np.eye(classes)[y] + rng.normal(0, 1.5, (rows, classes))
        members.append(np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True))
    members.append(rng.dirichlet(np.ones(classes), rows))
    return np.stack(members), y


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_drops_the_useless_member_and_beats_uniform_and_the_best_member(seed):
    stack, y = synthetic(seed)
    counts = greedy_selection(stack, y)
    assert counts.dtype == np.int64 and counts[3] == 0 and counts.sum() >= 2
    weights = counts / counts.sum()
    value = nll(np.tensordot(weights, stack, axes=1), y)
    assert value <= nll(stack.mean(axis=0), y)
    assert value <= min(nll(member, y) for member in stack)
    # It stopped because no addition lowers the loss (with replacement: any member, again).
    for i in range(len(stack)):
        more = counts.copy()
        more[i] += 1
        assert nll(np.tensordot(more / more.sum(), stack, axes=1), y) >= value - 1e-12
    # It started from the best single member (with no round allowed, the uniform average instead
    # when that is better: the result is never worse than uniform).
    singles = [nll(member, y) for member in stack]
    start = greedy_selection(stack, y, max_rounds=0).tolist()
    if min(singles) <= nll(stack.mean(axis=0), y):
        assert start == np.eye(4, dtype=int)[int(np.argmin(singles))].tolist()
    else:
        assert start == [1, 1, 1, 1]
    assert counts[int(np.argmin(singles))] >= 1


def test_each_round_adds_the_member_that_lowers_the_loss_most():
    stack, y = synthetic(3)
    counts = np.zeros(4, dtype=int)
    counts[int(np.argmin([nll(member, y) for member in stack]))] = 1
    for rounds in range(1, 4):
        got = greedy_selection(stack, y, max_rounds=rounds)
        values = []
        for i in range(4):
            more = counts.copy()
            more[i] += 1
            values.append(nll(np.tensordot(more / more.sum(), stack, axes=1), y))
        current = nll(np.tensordot(counts / counts.sum(), stack, axes=1), y)
        if min(values) < current:
            counts[int(np.argmin(values))] += 1
        assert got.tolist() == counts.tolist()


def test_regression_uses_the_squared_error_and_a_custom_loss():
    rng = np.random.default_rng(0)
    target = rng.normal(size=(200, 2))
    stack = np.stack([target + rng.normal(0, s, target.shape) for s in (0.3, 0.5, 5.0)])
    counts = greedy_selection(stack, target)
    assert counts[2] == 0 and counts[0] >= 1
    mse = np.mean((np.tensordot(counts / counts.sum(), stack, axes=1) - target) ** 2)
    assert mse <= min(np.mean((member - target) ** 2) for member in stack)
    absolute = greedy_selection(stack, target, loss=lambda t, p: float(np.mean(np.abs(t - p))))
    assert absolute[2] == 0


def test_bad_input_is_refused_with_a_message():
    stack, y = synthetic()
    with pytest.raises(ValueError, match="rows"):
        greedy_selection(stack, y[:10])
    with pytest.raises(ValueError, match="max_rounds"):
        greedy_selection(stack, y, max_rounds=-1)
    with pytest.raises(ValueError, match="shape"):
        greedy_selection(np.ones(3), y)
    with pytest.raises(ValueError, match="NaN"):
        greedy_selection(np.where(stack > 0.5, np.nan, stack), y)
    with pytest.raises(ValueError, match="probabilities"):
        greedy_selection(stack * 5, y, loss="sparse_categorical_crossentropy")
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\]"):
        greedy_selection(stack, y + 4)


@pytest.fixture(scope="module")
def with_useless(digits_run, tmp_path_factory):
    """The digits snapshot directory plus a fourth snapshot of random (untrained) weights."""
    directory = tmp_path_factory.mktemp("greedy") / "snapshots"
    shutil.copytree(digits_run[0], directory)
    make_digits_model(seed=7).save(directory / "snapshot-04.keras")
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["snapshots"].append({**manifest["snapshots"][-1], "cycle": 4, "file": "snapshot-04.keras"})
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


def test_build_ensemble_greedy_gives_the_useless_member_weight_zero(with_useless, digits):
    _, _, x_test, y_test = digits
    x_val, y_val, x_rest = x_test[:200], y_test[:200], x_test[200:]
    ensemble = keras_snapshot.build_ensemble(with_useless, weights="greedy", validation_data=(x_val, y_val))
    counts = np.asarray(ensemble.selection_counts)
    assert counts[3] == 0 and counts.sum() >= 1
    np.testing.assert_allclose(ensemble.ensemble_weights, counts / counts.sum())
    members = [
        keras.saving.load_model(with_useless / f"snapshot-0{i}.keras", compile=False) for i in range(1, 5)
    ]
    stack = np.stack([m.predict(x_val, verbose=0) for m in members]).astype("float64")
    value = nll(np.tensordot(counts / counts.sum(), stack, axes=1), y_val)
    assert value <= nll(stack.mean(axis=0), y_val) + 1e-9
    assert value <= min(nll(member, y_val) for member in stack) + 1e-9
    assert counts.tolist() == greedy_selection(stack, y_val).tolist()
    # The model computes the count-weighted mean.
    expected = np.tensordot(
        counts / counts.sum(), np.stack([m.predict(x_rest, verbose=0) for m in members]), axes=1
    )
    np.testing.assert_allclose(ensemble.predict(x_rest, verbose=0), expected, atol=1e-5)
    weights = keras_snapshot.fit_ensemble_weights(with_useless, (x_val, y_val), method="greedy")
    np.testing.assert_allclose(weights, counts / counts.sum())
    with pytest.raises(ValueError, match="'greedy' needs validation_data"):
        keras_snapshot.build_ensemble(with_useless, weights="greedy")
    with pytest.raises(ValueError, match="'fit' or 'greedy'"):
        keras_snapshot.fit_ensemble_weights(with_useless, (x_val, y_val), method="best")


def test_cli_build_greedy_shows_the_counts(with_useless, digits, tmp_path):
    _, _, x_test, y_test = digits
    np.savez(tmp_path / "val.npz", pixels=x_test[:200], labels=y_test[:200])
    result = run_cli(
        "build",
        with_useless,
        "-o",
        tmp_path / "greedy.keras",
        "--weights",
        "greedy",
        "--validation-data",
        tmp_path / "val.npz",
        "--x",
        "pixels",
        "--y",
        "labels",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "greedy selection on" in lines[0]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:] if line.startswith("snapshot_")}
    assert rows["snapshot_04"] == ["0", "0.0000"]
    counts = [int(rows[f"snapshot_0{i}"][0]) for i in range(1, 5)]
    assert sum(counts) >= 1
    loaded = keras.saving.load_model(tmp_path / "greedy.keras")
    reference = keras_snapshot.build_ensemble(
        with_useless, weights=np.asarray(counts, dtype=float), name="reference"
    )
    np.testing.assert_allclose(
        loaded.predict(x_test[200:], verbose=0), reference.predict(x_test[200:], verbose=0), atol=1e-5
    )
    missing = run_cli("build", with_useless, "-o", tmp_path / "x.keras", "--weights", "greedy", cwd=tmp_path)
    assert missing.returncode == 1 and "--validation-data" in missing.stderr
