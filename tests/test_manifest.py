"""The manifest names plain files inside the snapshot directory: real files, a real symlink, both sides."""

from __future__ import annotations

import json
import os

import pytest

from keras_snapshot import manifest as manifest_lib


def manifest_with(*files):
    snapshots = [{"cycle": i, "step": 10 * i, "file": name} for i, name in enumerate(files, start=1)]
    return {
        "format": manifest_lib.MANIFEST_FORMAT,
        "total_steps": 10 * len(files),
        "cycles": len(files),
        "cycle_length": 10,
        "initial_learning_rate": 0.1,
        "snapshots": snapshots,
    }


def write_raw(directory, manifest):
    (directory / manifest_lib.MANIFEST_NAME).write_text(json.dumps(manifest))


@pytest.fixture()
def layout(tmp_path):
    """tmp/outside.keras (a file outside) and tmp/snaps/ with snapshot-01.keras in it."""
    (tmp_path / "outside.keras").write_bytes(b"outside")
    directory = tmp_path / "snaps"
    directory.mkdir()
    (directory / "snapshot-01.keras").write_bytes(b"inside")
    return directory


def test_plain_names_are_read_and_written(layout):
    manifest = manifest_with("snapshot-01.keras", "snapshot-02.keras")  # a missing file is not a path issue
    manifest_lib.write_manifest(layout, manifest)
    assert manifest_lib.read_manifest(layout) == manifest


BAD = [
    ("../outside.keras", "path separator"),
    ("sub/snapshot-01.keras", "path separator"),
    ("sub\\snapshot-01.keras", "path separator"),
    ("..", "names a directory"),
    ("C:snapshot.keras", "absolute path"),
    ("", "non-empty string"),
]


@pytest.mark.parametrize(("name", "why"), BAD)
def test_reading_refuses_entries_that_leave_the_directory(layout, name, why):
    write_raw(layout, manifest_with("snapshot-01.keras", name))
    with pytest.raises(ValueError, match="not a plain file name") as error:
        manifest_lib.read_manifest(layout)
    assert why in str(error.value) and repr(name) in str(error.value) and "cycle 2" in str(error.value)


def test_reading_refuses_an_absolute_path(layout):
    absolute = str(layout.parent / "outside.keras")
    write_raw(layout, manifest_with(absolute))
    with pytest.raises(ValueError, match=r"path separator|absolute"):
        manifest_lib.read_manifest(layout)


@pytest.mark.parametrize(("name", "why"), BAD)
def test_writing_refuses_them_and_writes_nothing(layout, name, why):
    with pytest.raises(ValueError, match=why):
        manifest_lib.write_manifest(layout, manifest_with(name))
    assert not (layout / manifest_lib.MANIFEST_NAME).exists()
    assert not list(layout.glob(f"{manifest_lib.TEMP_PREFIX}*"))


def test_a_symlink_leading_out_is_refused_on_both_sides(layout):
    os.symlink(layout.parent / "outside.keras", layout / "snapshot-02.keras")
    manifest = manifest_with("snapshot-01.keras", "snapshot-02.keras")
    with pytest.raises(ValueError, match=r"symlink to .*outside.keras.*outside the directory"):
        manifest_lib.write_manifest(layout, manifest)
    write_raw(layout, manifest)
    with pytest.raises(ValueError, match="symlink") as error:
        manifest_lib.read_manifest(layout)
    assert "snapshot-02.keras" in str(error.value)


def test_a_relative_symlink_through_dotdot_is_refused(layout):
    os.symlink("../outside.keras", layout / "snapshot-02.keras")
    write_raw(layout, manifest_with("snapshot-02.keras"))
    with pytest.raises(ValueError, match="symlink"):
        manifest_lib.read_manifest(layout)


def test_a_symlink_inside_the_directory_is_accepted(layout):
    os.symlink("snapshot-01.keras", layout / "latest.keras")
    manifest = manifest_with("latest.keras")
    manifest_lib.write_manifest(layout, manifest)
    assert manifest_lib.read_manifest(layout) == manifest


def test_build_ensemble_does_not_load_a_model_outside_the_directory(snapshot_dir):
    # The attack from the issue, end to end: an entry pointing at a real model outside.
    import keras_snapshot

    outside = snapshot_dir.parent / "outside.keras"
    (snapshot_dir / "snapshot-01.keras").rename(outside)
    manifest = json.loads((snapshot_dir / manifest_lib.MANIFEST_NAME).read_text())
    manifest["snapshots"][0]["file"] = "../outside.keras"
    write_raw(snapshot_dir, manifest)
    with pytest.raises(ValueError, match="not a plain file name"):
        keras_snapshot.build_ensemble(snapshot_dir)


# --------------------------------------------------------------------------- types and uniqueness
def entries_with(**changes):
    """Two valid entries, the second changed."""
    manifest = manifest_with("snapshot-01.keras", "snapshot-02.keras")
    manifest["snapshots"][1].update(changes)
    return manifest


BAD_ENTRIES = [
    ({"cycle": None}, r"snapshot entry 2 has cycle None \(NoneType\); a cycle is an integer >= 1"),
    ({"cycle": "2"}, r"snapshot entry 2 has cycle '2' \(str\)"),
    ({"cycle": 2.0}, r"snapshot entry 2 has cycle 2.0 \(float\)"),
    ({"cycle": True}, r"snapshot entry 2 has cycle True \(bool\)"),
    ({"cycle": 0}, r"snapshot entry 2 has cycle 0 \(int\)"),
    ({"cycle": 1}, r"snapshot entry 2 repeats cycle 1 of entry 1"),
    (
        {"file": "snapshot-01.keras"},
        r"snapshot entry 2 \(cycle 2\) names the file 'snapshot-01.keras' of entry 1",
    ),
    ({"file": None}, r"not a plain file name"),
    ({"step": "20"}, r"snapshot entry 2 \(cycle 2\) has step '20'; it must be an integer >= 0"),
    ({"step": -1}, r"has step -1"),
    ({"iterations": 1.5}, r"has iterations 1.5"),
]


@pytest.mark.parametrize(("changes", "message"), BAD_ENTRIES, ids=[str(c) for c, _ in BAD_ENTRIES])
def test_reading_and_writing_refuse_wrong_types_and_duplicates(layout, changes, message):
    manifest = entries_with(**changes)
    write_raw(layout, manifest)
    with pytest.raises(ValueError, match=message) as error:
        manifest_lib.read_manifest(layout)
    assert str(layout / manifest_lib.MANIFEST_NAME) in str(error.value)
    (layout / manifest_lib.MANIFEST_NAME).unlink()
    with pytest.raises(ValueError, match=message):
        manifest_lib.write_manifest(layout, manifest)
    assert not (layout / manifest_lib.MANIFEST_NAME).exists()


@pytest.mark.parametrize("entry", [None, 3, "snapshot-02.keras", {"cycle": 2, "file": "x.keras"}])
def test_an_entry_that_is_not_a_full_object_is_named(layout, entry):
    manifest = manifest_with("snapshot-01.keras")
    manifest["snapshots"].append(entry)
    write_raw(layout, manifest)
    with pytest.raises(ValueError, match=r"snapshot entry 2 (is|has no step)"):
        manifest_lib.read_manifest(layout)


def test_optional_counts_and_a_null_epoch_are_accepted(layout):
    manifest = entries_with(iterations=5, batches=23, epoch=None)
    manifest_lib.write_manifest(layout, manifest)
    assert manifest_lib.read_manifest(layout) == manifest


def test_cli_info_reports_a_bad_manifest_as_a_data_error(layout):
    import subprocess
    import sys

    write_raw(layout, entries_with(cycle=None))
    result = subprocess.run(
        [sys.executable, "-m", "keras_snapshot.cli", "info", str(layout)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("keras-snapshot:")]
    assert lines and lines[0].startswith("keras-snapshot: error: "), result.stderr
    assert "snapshot entry 2 has cycle None" in lines[0]
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
