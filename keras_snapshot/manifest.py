"""The snapshot directory's manifest and the atomic file writes that keep it consistent.

A snapshot directory holds one `.keras` file per finished cycle and `manifest.json`:

    {"format": 1, "total_steps": T, "cycles": M, "cycle_length": ceil(T/M),
     "initial_learning_rate": alpha0,
     "snapshots": [{"cycle": 1, "step": 120, "epoch": 2, "learning_rate": 1.7e-05,
                    "logs": {"loss": 0.31, ...}, "file": "snapshot-01.keras"}, ...]}

Every write goes to a temporary file in the same directory, is flushed to disk and
then renamed over the target, so a crash leaves either the old or the new file,
never a half-written one that looks valid.

The manifest is data, not a path authority: every entry's "file" must be a plain file
name inside the snapshot directory (no separator, no `..`, not absolute, not a symlink
leading out of the directory). Both `read_manifest` and `write_manifest` refuse any
other entry with a ValueError naming it.
"""

from __future__ import annotations

import errno
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path, PurePosixPath, PureWindowsPath

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one writer per directory is then the user's care
    fcntl = None

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
TEMP_PREFIX = ".tmp-"


def is_chief(model) -> bool:
    """Whether this process writes files: only one worker of a multi-worker run may."""
    import keras  # here, not at the top: `keras-snapshot info` reads manifests without Keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        strategy = getattr(model, "distribute_strategy", None)
        extended = getattr(strategy, "extended", None)
        return bool(getattr(extended, "should_checkpoint", True))
    if backend == "jax":
        import jax

        return jax.process_index() == 0
    if backend == "torch":
        import torch.distributed

        return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    return True


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(target: str | os.PathLike, write: Callable[[str], None], suffix: str = "") -> None:
    """Calls `write(temp_path)`, then moves the finished file onto `target` atomically.

    `suffix` is kept at the end of the temporary name (Keras insists on `.keras`).
    On any failure the temporary file is removed and `target` is left untouched.
    """
    target = Path(target)
    temp = target.parent / f"{TEMP_PREFIX}{uuid.uuid4().hex}-{target.name}{suffix}"
    try:
        write(str(temp))
        with open(temp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, target)
    except BaseException:
        try:
            temp.unlink()
        except OSError:
            pass
        raise
    _fsync_directory(target.parent)


def _unsafe_reason(directory: Path, name) -> str | None:
    """Why `name` is not a plain file name inside `directory`, or None where it is."""
    if not isinstance(name, str) or not name:
        return "it is not a non-empty string"
    if "\0" in name:
        return "it contains a NUL character"
    if name in (".", ".."):
        return "it names a directory"
    # Both separators, whatever this system's: a manifest may travel between systems.
    if "/" in name or "\\" in name or os.sep in name or (os.altsep and os.altsep in name):
        return "it contains a path separator"
    if (
        PurePosixPath(name).is_absolute()
        or PureWindowsPath(name).is_absolute()
        or PureWindowsPath(name).drive
    ):
        return "it is an absolute path"
    path = directory / name
    if path.is_symlink():
        target = path.resolve()
        root = directory.resolve()
        if target.parent != root and root not in target.parents:
            return f"it is a symlink to {str(target)!r}, outside the directory"
    return None


def check_entry_file(directory: str | os.PathLike, entry: dict, source: str) -> None:
    """Raises ValueError unless `entry["file"]` is a plain file name inside `directory`.

    `source` names where the entry comes from (the manifest's path) for the message."""
    name = entry.get("file")
    reason = _unsafe_reason(Path(directory), name)
    if reason is not None:
        raise ValueError(
            f"{source}: the entry of cycle {entry.get('cycle')!r} names the file {name!r}, which is not a "
            f"plain file name inside the snapshot directory ({reason}). Manifest entries must name files "
            f"in {str(directory)!r} itself, e.g. 'snapshot-01.keras': put the snapshot file there and "
            "write only its name in the entry."
        )


def write_manifest(directory: str | os.PathLike, manifest: dict) -> None:
    """Writes `manifest` as `directory/manifest.json`, atomically.

    Raises ValueError, writing nothing, where an entry is not valid (`check_entries`)."""
    check_entries(directory, manifest.get("snapshots", []), str(Path(directory) / MANIFEST_NAME))
    text = json.dumps(manifest, indent=2, sort_keys=False, allow_nan=True) + "\n"

    def write(path: str) -> None:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)

    atomic_write(Path(directory) / MANIFEST_NAME, write)


def read_manifest(directory: str | os.PathLike) -> dict | None:
    """The manifest of a snapshot directory, or None where there is none yet.

    Raises ValueError, naming the file and the entry, when it exists but is not a valid manifest:
    an entry without cycle/step/file, a cycle that is not an integer >= 1, a step that is not an
    integer >= 0, two entries of one cycle or one file, or a file that is not a plain file name
    inside the directory (a path with a separator, `..`, an absolute path, a symlink leading out).
    """
    path = Path(directory) / MANIFEST_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path} is not valid JSON ({error}); it is not a keras-snapshot manifest."
        ) from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("snapshots"), list):
        raise ValueError(f"{path} is not a keras-snapshot manifest (no 'snapshots' list).")
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(
            f"{path} has manifest format {manifest.get('format')!r}; this keras-snapshot "
            f"reads format {MANIFEST_FORMAT}."
        )
    check_entries(directory, manifest["snapshots"], str(path))
    return manifest


def _is_count(value, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def check_entries(directory: str | os.PathLike, snapshots: list, source: str) -> None:
    """Raises ValueError, naming the entry (its position and cycle), unless every entry is a dict
    with an integer `cycle` >= 1, an integer `step` >= 0 (and `iterations`/`batches`, where
    present), a plain file name inside `directory`, and no two entries share a cycle or a file.

    Two entries of one cycle would make two ensemble members of one name (the ensemble silently
    shrinks to one); two of one file would count that snapshot twice."""
    cycles, files = {}, {}
    for position, entry in enumerate(snapshots, start=1):
        where = f"{source}: snapshot entry {position}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} is {entry!r}, not an object with cycle, step and file.")
        missing = [key for key in ("cycle", "step", "file") if key not in entry]
        if missing:
            raise ValueError(f"{where} has no {'/'.join(missing)}: {entry!r}.")
        cycle = entry["cycle"]
        if not _is_count(cycle, 1):
            raise ValueError(
                f"{where} has cycle {cycle!r} ({type(cycle).__name__}); a cycle is an integer >= 1."
            )
        for key, minimum in (("step", 0), ("iterations", 0), ("batches", 0)):
            if key in entry and not _is_count(entry[key], minimum):
                raise ValueError(
                    f"{where} (cycle {cycle}) has {key} {entry[key]!r}; it must be an integer >= {minimum}."
                )
        check_entry_file(directory, entry, source)
        if cycle in cycles:
            raise ValueError(
                f"{where} repeats cycle {cycle} of entry {cycles[cycle]}: each cycle has one snapshot. "
                "Remove the wrong entry from the manifest."
            )
        if entry["file"] in files:
            raise ValueError(
                f"{where} (cycle {cycle}) names the file {entry['file']!r} of entry {files[entry['file']]}: "
                "each snapshot has its own file. Remove the wrong entry from the manifest."
            )
        cycles[cycle], files[entry["file"]] = position, position


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Deletes temporary files left in `directory` by an interrupted write."""
    removed = []
    for path in Path(directory).glob(f"{TEMP_PREFIX}*"):
        try:
            path.unlink()
            removed.append(path)
        except OSError:
            pass
    return removed


# --------------------------------------------------------------------------------- one writer
# The directories this process holds the writer lock of: (st_dev, st_ino) -> the open descriptor.
_LOCKS: dict[tuple[int, int], int] = {}


def _lock_holder(status: os.stat_result) -> str:
    """Who holds the lock on the directory of `status`, as far as /proc/locks (Linux) tells."""
    try:
        with open("/proc/locks", encoding="ascii") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return "another process"
    device = f"{os.major(status.st_dev):02x}:{os.minor(status.st_dev):02x}:{status.st_ino}"
    for line in lines:
        fields = line.split()
        if "FLOCK" in fields and device in fields:
            pid = fields[fields.index(device) - 1]
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as handle:
                    command = handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                command = ""
            return f"process {pid}" + (f" ({command[:200]})" if command else "")
    return "another process"


def lock_directory(directory: str | os.PathLike) -> tuple[int, int] | None:
    """Takes the writer lock of a snapshot directory for this process; returns its key for
    `unlock_directory` (None where the system has no such locks).

    The lock is an advisory `flock` on the directory itself (no file is added to it), which the
    operating system releases when the process ends, however it ends (SIGKILL included): a killed
    run never blocks its own resumption. Held already by this process: nothing to do (a run that
    resumes in the process that was interrupted). Held by another process: RuntimeError naming
    the directory and that process."""
    if fcntl is None:
        return None
    descriptor = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    status = os.fstat(descriptor)
    key = (status.st_dev, status.st_ino)
    if key in _LOCKS:
        os.close(descriptor)
        return key
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        os.close(descriptor)
        if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None  # a file system without flock: no lock rather than no training
        raise RuntimeError(
            f"The snapshot directory {str(directory)!r} is being written by another run: "
            f"{_lock_holder(status)} holds its writer lock. Two runs in one directory would mix their "
            "snapshots. Give this run its own directory, or stop the other run first (a process that "
            "ends, even killed, releases the directory by itself)."
        ) from None
    _LOCKS[key] = descriptor
    return key


def unlock_directory(key: tuple[int, int] | None) -> None:
    """Releases the writer lock `lock_directory` took (nothing where it took none)."""
    descriptor = _LOCKS.pop(key, None) if key is not None else None
    if descriptor is not None:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_UN)
        finally:
            os.close(descriptor)
