"""The `keras-snapshot` command line, run as real subprocesses on the snapshots of a real training run.

User errors are checked in real processes too (one line, exit status 1, no traceback); their many
variants are then checked through `main()` in this process, which is the same code without the
start-up cost.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from test_export import run_tf_serving_loader

from keras_snapshot import build_ensemble
from keras_snapshot.cli import main

BACKEND = keras.backend.backend()
TOLERANCE = 1e-5


def run_cli(*args, cwd: Path, script: bool = False) -> subprocess.CompletedProcess:
    installed = Path(sys.executable).with_name("keras-snapshot")
    command = (
        [str(installed)] if script and installed.exists() else [sys.executable, "-m", "keras_snapshot.cli"]
    )
    return subprocess.run(
        [*command, *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""},
        timeout=300,
    )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("keras-snapshot: error:")]


def table_rows(stdout: str) -> dict[str, list[str]]:
    """{first cell: the other cells} of a printed table (names with spaces joined back)."""
    rows = {}
    for line in stdout.splitlines():
        cells = line.split()
        if line.startswith("ensemble of last"):
            rows[" ".join(cells[:4])] = cells[4:]
        elif cells:
            rows[cells[0]] = cells[1:]
    return rows


def call(model, x):
    return keras.ops.convert_to_numpy(model(x, training=False))


# --------------------------------------------------------------------------- each sub-command
def test_info(digits_run, tmp_path):
    directory, _ = digits_run
    result = run_cli("info", directory, cwd=tmp_path, script=True)  # the installed console script
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"{directory}: 3 of 3 snapshots, 132 steps, cycles of 44 steps")
    header = lines[1].split()
    assert header[:4] == ["cycle", "step", "epoch", "learning_rate"] and header[-1] == "file"
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(header)
    rows = table_rows(result.stdout)
    manifest = json.loads((directory / "manifest.json").read_text())
    for entry in manifest["snapshots"]:
        row = rows[str(entry["cycle"])]
        assert row[0] == str(entry["step"]) and row[-1] == entry["file"]
        assert float(row[header.index("val_accuracy") - 1]) == pytest.approx(
            entry["logs"]["val_accuracy"], abs=1e-3
        )


def test_build_then_export(digits_run, digits, tmp_path):
    directory, _ = digits_run
    x = digits[2][:32]
    built = run_cli("build", directory, "-o", "ensemble.keras", "--last", "2", cwd=tmp_path)
    assert built.returncode == 0, built.stderr[-2000:]
    assert "snapshot_02, snapshot_03" in built.stdout
    ensemble = keras.saving.load_model(tmp_path / "ensemble.keras")  # plain Keras
    members = [keras.saving.load_model(directory / f"snapshot-0{c}.keras", compile=False) for c in (2, 3)]
    expected = np.mean([call(member, x) for member in members], axis=0)
    np.testing.assert_allclose(call(ensemble, x), expected, atol=TOLERANCE)

    exported = run_cli("export", "ensemble.keras", "serving/digits", "--version", "4", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr[-2000:]
    version = tmp_path / "serving" / "digits" / "4"
    assert (version / "saved_model.pb").is_file()
    assert sorted(p.name for p in version.parent.iterdir()) == ["4"]
    if BACKEND == "torch":
        # torch cannot write a SavedModel: the command ran itself again under TensorFlow. Check that
        # result the way TF Serving loads it (test_export covers the other backends).
        assert "exporting with the TensorFlow backend" in exported.stderr
        (served,) = run_tf_serving_loader(tmp_path, [(version, {"pixels": x})])
        np.testing.assert_allclose(served["predictions"], expected, atol=TOLERANCE)


def test_evaluate(digits_run, digits, tmp_path):
    directory, _ = digits_run
    x_test, y_test = digits[2], digits[3]
    np.savez(tmp_path / "test.npz", pixels=x_test, labels=y_test)
    result = run_cli(
        "evaluate", directory, "--data", "test.npz", "--x", "pixels", "--y", "labels", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = table_rows(result.stdout)
    assert result.stdout.splitlines()[1].split() == ["model", "accuracy", "sparse_categorical_crossentropy"]
    names = ["snapshot_01", "snapshot_02", "snapshot_03"] + [f"ensemble of last {m}" for m in (1, 2, 3)]
    assert all(name in rows for name in names)
    assert rows["ensemble of last 1"] == rows["snapshot_03"]
    for m in (2, 3):
        probabilities = call(build_ensemble(directory, last=m), x_test)
        accuracy = np.mean(probabilities.argmax(-1) == y_test)
        assert float(rows[f"ensemble of last {m}"][0]) == pytest.approx(accuracy, abs=1e-4)


def test_user_error_is_one_line_without_traceback(tmp_path):
    result = run_cli("build", tmp_path / "no-such-dir", "-o", "e.keras", cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    (line,) = error_lines(result.stderr)
    assert "no-such-dir" in line and "does not exist" in line
    assert result.stderr.rstrip().splitlines()[-1] == line


# --------------------------------------------------------------------------- user errors, in-process
def run_main(capsys, *args) -> tuple[int, str, str]:
    status = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_info_errors_and_an_empty_run(capsys, tmp_path):
    status, _, err = run_main(capsys, "info", tmp_path / "absent")
    assert status == 1 and "is not a directory" in err
    status, _, err = run_main(capsys, "info", tmp_path)
    assert status == 1 and "has no manifest.json" in err
    (tmp_path / "manifest.json").write_text("{broken")
    status, _, err = run_main(capsys, "info", tmp_path)
    assert status == 1 and "is not valid JSON" in err and len(err.splitlines()) == 1
    (tmp_path / "manifest.json").write_text(json.dumps({"format": 1, "cycles": 4, "snapshots": []}))
    status, out, _ = run_main(capsys, "info", tmp_path)
    assert status == 0 and "(no snapshots yet)" in out


def test_info_marks_missing_files(capsys, snapshot_dir):
    (snapshot_dir / "snapshot-01.keras").unlink()
    status, out, _ = run_main(capsys, "info", snapshot_dir)
    assert status == 0 and "snapshot-01.keras (missing)" in out


def test_build_fused(capsys, digits_run, digits, tmp_path):
    directory, _ = digits_run
    x = digits[2][:32]
    status, out, err = run_main(capsys, "build", directory, "-o", tmp_path / "fused.keras", "--fuse")
    assert status == 0, err
    assert "snapshot_01, snapshot_02, snapshot_03, fused" in out
    fused = keras.saving.load_model(tmp_path / "fused.keras")
    assert not [layer for layer in fused.layers if isinstance(layer, keras.Model)]  # stacked, no branches
    members = [keras.saving.load_model(path, compile=False) for path in sorted(directory.glob("*.keras"))]
    expected = np.mean([call(member, x) for member in members], axis=0)
    np.testing.assert_allclose(call(fused, x), expected, atol=TOLERANCE)


def test_build_errors(capsys, snapshot_dir, tmp_path):
    status, _, err = run_main(capsys, "build", snapshot_dir, "-o", tmp_path / "e.keras", "--last", "9")
    assert status == 1 and "out of range" in err and "1 <= last <= 3" in err
    status, _, err = run_main(capsys, "build", snapshot_dir, "-o", tmp_path / "e.h5")
    assert status == 1 and "must end in .keras" in err
    status, _, err = run_main(capsys, "build", snapshot_dir, "-o", tmp_path / "no" / "e.keras")
    assert status == 1 and "does not exist" in err
    (snapshot_dir / "snapshot-02.keras").write_bytes(b"garbage")
    status, _, err = run_main(capsys, "build", snapshot_dir, "-o", tmp_path / "e.keras")
    assert status == 1 and "snapshot-02.keras" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "e.keras").exists()


def test_export_errors(capsys, tmp_path):
    status, _, err = run_main(capsys, "export", tmp_path / "missing.keras", tmp_path / "serving")
    assert status == 1 and "missing.keras" in err and "does not exist" in err
    (tmp_path / "corrupt.keras").write_bytes(b"garbage")
    status, _, err = run_main(capsys, "export", tmp_path / "corrupt.keras", tmp_path / "serving")
    assert status == 1 and "corrupt.keras" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "serving").exists() or list((tmp_path / "serving").iterdir()) == []


def test_evaluate_data_errors(capsys, digits_run, digits, tmp_path):
    directory = digits_run[0]
    x, y = digits[2], digits[3]
    (tmp_path / "text.npz").write_text("these are not arrays")
    cases = {
        "missing.npz": None,
        "text.npz": None,
        "no-y.npz": {"x": x},
        "short-y.npz": {"x": x, "y": y[:5]},
        "wrong-width.npz": {"x": x[:, :63], "y": y},
    }
    for name, arrays in cases.items():
        if arrays is not None:
            np.savez(tmp_path / name, **arrays)
    expected = {
        "missing.npz": "does not exist",
        "text.npz": "is not a .npz file of numpy arrays",
        "no-y.npz": "has no array 'y' (it holds: x); pass --y NAME",
        "short-y.npz": "same, non-zero number of rows",
        "wrong-width.npz": "array 'x' has shape (397, 63), the model's input 'pixels' expects (N, 64)",
    }
    for name, message in expected.items():
        status, _, err = run_main(capsys, "evaluate", directory, "--data", tmp_path / name)
        assert status == 1, name
        assert message in err, (name, err)
        assert len(err.strip().splitlines()) == 1
    status, _, err = run_main(
        capsys, "evaluate", directory, "--data", tmp_path / "no-y.npz", "--x", "a", "--x", "b"
    )
    assert status == 1 and "has 1 inputs (pixels) but --x names 2" in err


def test_command_line_syntax_errors_exit_2(capsys, tmp_path):
    for args in (
        ["build", tmp_path],
        ["build", tmp_path, "-o", "e.keras", "--last", "0"],
        ["frobnicate"],
        [],
    ):
        with pytest.raises(SystemExit) as raised:
            main([str(a) for a in args])
        assert raised.value.code == 2
    capsys.readouterr()
