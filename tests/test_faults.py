"""Faults while writing snapshots: a clear error, earlier snapshots and the manifest intact and loadable.

Real OS faults, no mocks: the directory deleted or moved away mid-run, made read-only (chmod, or a
read-only bind mount when running as root), a full disk (a small tmpfs when mounting is allowed; an
RLIMIT_FSIZE file size limit in a subprocess everywhere), and a snapshot file deleted between runs.
Where the fault can be repaired, the run then resumes with BackupAndRestore and ends complete.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import make_digits_model
from workers import checks

import keras_snapshot
from keras_snapshot import SnapshotCallback

STEPS, EPOCHS, CYCLES = 10, 3, 3  # 640 samples / 64: T = 30, cycles end at 10, 20, 30 (epoch ends)


class Interrupt(RuntimeError):
    """An in-process interruption of fit."""


def raise_interrupt():
    raise Interrupt("interrupted")


class FaultAt(keras.callbacks.Callback):
    """Runs `action` at the start of epoch `epoch`: after snapshot 1, before snapshot 2."""

    def __init__(self, epoch, action):
        super().__init__()
        self.epoch, self.action = epoch, action

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            self.action()


def fit(digits, directory, backup, *extra):
    x, y = digits[0], digits[1]
    model = make_digits_model()
    callbacks = [
        keras.callbacks.BackupAndRestore(str(backup)),
        *extra,
        SnapshotCallback(directory, cycles=CYCLES, initial_learning_rate=0.2),
    ]
    model.fit(
        x[: STEPS * 64],
        y[: STEPS * 64],
        batch_size=64,
        epochs=EPOCHS,
        verbose=0,
        callbacks=callbacks,
    )
    return model


def assert_intact(directory, cycles, digits):
    """The manifest lists `cycles`, names exactly the files there, and every snapshot loads and predicts."""
    directory = Path(directory)
    manifest = keras_snapshot.read_manifest(directory)
    assert [entry["cycle"] for entry in manifest["snapshots"]] == cycles
    assert not list(directory.glob(".tmp-*")), "a temporary file was left behind"
    x_test = digits[2]
    for entry in manifest["snapshots"]:
        model = keras.saving.load_model(directory / entry["file"])
        probabilities = keras.ops.convert_to_numpy(model(x_test[:32]))
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
        assert (probabilities.argmax(axis=1) == digits[3][:32]).mean() > 0.5  # a trained model
    return manifest


def resume_to_completion(digits, directory, backup, kept):
    """Resumes with BackupAndRestore; the earlier files must come through untouched."""
    fit(digits, directory, backup)
    manifest = assert_intact(directory, [1, 2, 3], digits)
    assert [entry["step"] for entry in manifest["snapshots"]] == [10, 20, 30]
    assert sorted(p.name for p in Path(directory).iterdir()) == sorted(
        ["manifest.json", *(entry["file"] for entry in manifest["snapshots"])]
    )
    now = checks.directory_state(directory)
    for name, state in kept.items():
        assert now[name] == state, f"{name} was rewritten"


# --------------------------------------------------------------------------- the directory goes away
def test_directory_deleted_mid_run(tmp_path, digits):
    directory = tmp_path / "snapshots"
    with pytest.raises(FileNotFoundError, match=r"Could not write snapshot 2 .*no longer exists"):
        fit(digits, directory, tmp_path / "backup", FaultAt(1, lambda: shutil.rmtree(directory)))
    assert not directory.exists(), "the callback must not silently recreate a vanished directory"


def test_directory_moved_away_mid_run_then_put_back(tmp_path, digits):
    directory, moved = tmp_path / "snapshots", tmp_path / "moved"
    with pytest.raises(FileNotFoundError, match=r"Could not write snapshot 2 .*no longer exists"):
        fit(digits, directory, tmp_path / "backup", FaultAt(1, lambda: os.rename(directory, moved)))
    assert_intact(moved, [1], digits)
    kept = checks.directory_state(moved)
    os.rename(moved, directory)
    resume_to_completion(digits, directory, tmp_path / "backup", kept)


# --------------------------------------------------------------------------- read-only directory
def _run(command):
    """Runs a mount command; returns None on success, else why it failed."""
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    except OSError as error:  # no mount binary here
        return str(error)
    return None if result.returncode == 0 else (result.stderr.strip() or f"{command} failed")


def _bind_read_only(directory):
    for command in (
        ["mount", "--bind", str(directory), str(directory)],
        ["mount", "-o", "remount,bind,ro", str(directory), str(directory)],
    ):
        problem = _run(command)
        if problem:
            _run(["umount", str(directory)])
            return problem
    return None


@pytest.fixture()
def read_only(tmp_path):
    """make(directory) turns a directory read-only for this process; undone at teardown."""
    undo = []

    def make(directory):
        if os.geteuid() != 0:
            directory.chmod(0o555)
            undo.append(lambda: directory.chmod(0o755))
            return
        problem = _bind_read_only(directory)
        if problem:
            pytest.skip(f"running as root and a read-only bind mount is not allowed here: {problem}")
        undo.append(lambda: _run(["umount", str(directory)]))

    yield make
    for step in reversed(undo):
        step()


def test_directory_made_read_only_mid_run(tmp_path, digits, read_only):
    directory = tmp_path / "snapshots"
    made = []

    def fault():
        read_only(directory)
        made.append(True)

    with pytest.raises(OSError, match=r"Could not write snapshot 2 .*(Read-only|Permission denied)") as info:
        fit(digits, directory, tmp_path / "backup", FaultAt(1, fault))
    assert info.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
    assert_intact(directory, [1], digits)


def test_read_only_directory_fails_before_training(tmp_path, digits, read_only):
    directory = tmp_path / "snapshots"
    directory.mkdir()
    callback = SnapshotCallback(directory, cycles=CYCLES)
    read_only(directory)
    model = make_digits_model()
    with pytest.raises(ValueError, match="Cannot write to the snapshot directory"):
        model.fit(
            digits[0][:640], digits[1][:640], batch_size=64, epochs=EPOCHS, verbose=0, callbacks=[callback]
        )
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 0
    with pytest.raises(ValueError, match="cannot be written"):  # and already when the callback is made
        SnapshotCallback(directory, cycles=CYCLES)


# --------------------------------------------------------------------------- full disk
@pytest.fixture()
def tmpfs(tmp_path):
    """mount(directory, size_bytes) mounts a tmpfs there (skips where mounting is not allowed)."""
    mounted = []

    def mount(directory, size):
        directory.mkdir(exist_ok=True)
        options = f"size={size}"
        if mounted:
            command = ["mount", "-o", f"remount,{options}", str(directory)]
        else:
            command = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(directory)]
        problem = _run(command)
        if problem:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {problem}")
        mounted.append(directory)

    yield mount
    if mounted:
        _run(["umount", "-l", str(mounted[0])])


def snapshot_pages(tmp_path, digits):
    """The size of one snapshot of the digits model, in 4 KiB pages (tmpfs counts whole pages)."""
    model = make_digits_model()
    model.fit(digits[0][:64], digits[1][:64], batch_size=64, epochs=1, verbose=0)
    path = tmp_path / "probe.keras"
    model.save(path)
    pages = -(-path.stat().st_size // 4096)
    path.unlink()
    return pages


def test_disk_full_at_the_second_snapshot_then_space_freed(tmp_path, digits, tmpfs):
    directory = tmp_path / "snapshots"
    pages = snapshot_pages(tmp_path, digits)
    tmpfs(directory, (pages + 2) * 4096)  # one snapshot and the manifest, not two snapshots
    with pytest.raises(OSError, match=r"Could not write snapshot 2 .*No space left on device") as info:
        fit(digits, directory, tmp_path / "backup")
    assert info.value.errno == errno.ENOSPC
    assert_intact(directory, [1], digits)
    kept = checks.directory_state(directory)
    tmpfs(directory, (3 * pages + 4) * 4096)  # space freed: the resumed run completes
    resume_to_completion(digits, directory, tmp_path / "backup", kept)


def test_disk_full_at_the_manifest_write(tmp_path, digits, tmpfs):
    """The second snapshot file fits, its manifest update does not: the resumed run adopts the file."""
    directory = tmp_path / "snapshots"
    pages = snapshot_pages(tmp_path, digits)
    tmpfs(directory, (2 * pages + 1) * 4096)  # two snapshots and one manifest page, no second page
    with pytest.raises(OSError, match=r"Could not write snapshot 2 .*No space left on device"):
        fit(digits, directory, tmp_path / "backup")
    manifest = assert_intact(directory, [1], digits)
    if not (directory / "snapshot-02.keras").exists():
        pytest.skip("this filesystem ran out of space in the snapshot file, not in the manifest write")
    assert manifest["snapshots"][0]["file"] == "snapshot-01.keras"
    keras.saving.load_model(directory / "snapshot-02.keras")  # complete: renamed into place only whole
    kept = checks.directory_state(directory)
    tmpfs(directory, (3 * pages + 4) * 4096)
    resume_to_completion(digits, directory, tmp_path / "backup", kept)


def test_file_size_limit_in_a_subprocess(tmp_path):
    """RLIMIT_FSIZE lowered mid-run (SIGXFSZ ignored): writes fail with EFBIG, as on a full disk."""
    config = {
        "directory": str(tmp_path / "snapshots"),
        "steps": 5,
        "epochs": 5,
        "cycles": 3,
        "alpha0": 0.2,
        "order": ["fsize", "snapshot"],
        "fsize_at": {"step": 12, "bytes": 4096},  # after snapshot 1 (step 9); a snapshot is ~14 KB
    }
    process = checks.run_worker(config, tmp_path, timeout=240)
    assert process.returncode == 1, process.stderr[-3000:]
    assert "Could not write snapshot 2" in process.stderr, process.stderr[-3000:]
    assert "File too large" in process.stderr, process.stderr[-3000:]
    directory = Path(config["directory"])
    manifest = keras_snapshot.read_manifest(directory)
    assert [entry["cycle"] for entry in manifest["snapshots"]] == [1]
    assert sorted(p.name for p in directory.iterdir()) == ["manifest.json", "snapshot-01.keras"]
    model = keras.saving.load_model(directory / "snapshot-01.keras", compile=False)
    expected = -np.sum(checks.formula(np.arange(1, 10), config))
    assert float(np.sum(model.get_weights()[0])) == pytest.approx(expected, abs=1e-5)


# --------------------------------------------------------------------------- damage between runs
def test_snapshot_deleted_between_runs_is_reported(tmp_path, digits):
    directory = tmp_path / "snapshots"
    with pytest.raises(Interrupt):
        fit(digits, directory, tmp_path / "backup", FaultAt(2, raise_interrupt))
    (directory / "snapshot-01.keras").unlink()
    before = (directory / "manifest.json").read_text()
    with pytest.raises(ValueError, match=r"files are gone: \['snapshot-01.keras'\]"):
        fit(digits, directory, tmp_path / "backup")
    assert (directory / "manifest.json").read_text() == before
    assert json.loads(before)["snapshots"][1]["file"] == "snapshot-02.keras"
