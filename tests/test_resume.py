"""Resume with keras.callbacks.BackupAndRestore after an interruption anywhere, in-process and by SIGKILL.

Every scenario ends with: exactly M snapshots, each the model after exactly its cycle's end step (the
kernel sum proves the step and every rate before it), a manifest that lists exactly the files, every
step of every run (killed ones included) at the formula's rate, and the snapshots written before the
interruption untouched (same inode, mtime and bytes; same manifest entry).
"""

from __future__ import annotations

import copy
import random
import warnings

import keras
import pytest
from workers import checks
from workers.train_worker import Interrupted, run

BACKEND = keras.backend.backend()

# T = 25 steps, M = 3: cycles of ceil(25/3) = 9 steps end at 9 (mid-epoch), 18 (mid-epoch), 25 (run end).
BASE = {"steps": 5, "epochs": 5, "cycles": 3, "alpha0": 0.2, "save_freq": "epoch", "path": "callback"}

SCENARIOS = {
    "mid-cycle mid-epoch, backup first": (
        {"order": ["backup", "snapshot", "record", "kill"]},
        [{"step": 13, "hook": "batch_end"}],
    ),
    "at a cycle end before its snapshot, snapshot callback first, mid-epoch backups": (
        {"order": ["kill", "snapshot", "backup", "record"], "save_freq": 3},
        [{"step": 9, "hook": "batch_end"}],
    ),
    "restore lands on a cycle end whose snapshot was lost": (
        {"order": ["backup", "kill", "snapshot", "record"], "save_freq": 1},
        [{"step": 9, "hook": "batch_end"}],
    ),
    "last cycle end, between the final backup and the snapshot": (
        {"order": ["backup", "kill", "snapshot", "record"]},
        [{"step": 25, "hook": "epoch_end"}],
    ),
    "while writing the snapshot file": (
        {"order": ["record", "snapshot", "backup"]},
        [{"step": 18, "hook": "write"}],
    ),
    "between the snapshot file and the manifest": (
        {"order": ["snapshot", "record", "backup"]},
        [{"step": 18, "hook": "record"}],
    ),
    "twice, in-graph schedule, backup last": (
        {"order": ["snapshot", "record", "kill", "backup"], "path": "in_graph", "save_freq": 2},
        [{"step": 12, "hook": "batch_begin"}, {"step": 22, "hook": "batch_end"}],
    ),
}


def make_config(tmp_path, overrides):
    config = {
        **copy.deepcopy(BASE),
        "directory": str(tmp_path / "snapshots"),
        "backup": str(tmp_path / "backup"),
        "record": str(tmp_path / "record.jsonl"),
        **copy.deepcopy(overrides),
    }
    return config


class Kept:
    """The snapshot files and manifest entries present after an interruption, to compare at the end."""

    def __init__(self):
        self.files = {}
        self.entries = {}

    def add(self, directory):
        self.files.update(checks.directory_state(directory))
        manifest = checks.read_manifest_raw(directory)
        for entry in (manifest or {}).get("snapshots", []):
            self.entries.setdefault(entry["cycle"], entry)

    def assert_untouched(self, directory, manifest):
        now = checks.directory_state(directory)
        for name, state in self.files.items():
            assert now.get(name) == state, f"{name} was rewritten or removed"
        by_cycle = {entry["cycle"]: entry for entry in manifest["snapshots"]}
        for cycle, entry in self.entries.items():
            assert by_cycle[cycle] == entry, f"the manifest entry of cycle {cycle} changed"


def assert_resumed_correctly(config, kept, final_start=None, warnings_seen=()):
    manifest = checks.assert_complete(config["directory"], config)
    kept.assert_untouched(config["directory"], manifest)
    checks.assert_ensemble_is_the_mean(config["directory"], config)
    runs = checks.read_records(config["record"])
    assert len(runs) >= 2, "expected the interrupted run(s) and the resumed run in the records"
    for each in runs:
        checks.assert_rates_exact(each, config)
    final = runs[-1]
    total = config["steps"] * config["epochs"]
    assert final["end"] is not None and final["end"] >= total
    if final_start is not None:
        assert final["start"] == final_start
    for message in warnings_seen:
        # Legitimate only where the run restarted from step 0 after writing a snapshot.
        assert "of an interrupted run" not in message or final["start"] == 0, message
    return runs


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_in_process_interruption_then_resume(tmp_path, name):
    overrides, kills = SCENARIOS[name]
    config = make_config(tmp_path, overrides)
    kept = Kept()
    for kill in kills:
        with pytest.raises(Interrupted):
            run({**config, "kill": {**kill, "how": "raise"}})
        kept.add(config["directory"])
    run_and_check_warnings(config)
    assert_resumed_correctly(config, kept)


def test_interrupted_before_the_first_backup_keeps_the_first_snapshot(tmp_path):
    # T = 30, M = 6: cycles of 5 steps; the first snapshot (step 5) comes before the first backup
    # (end of epoch 1, step 10). Killed at step 7 the run restarts from step 0 and keeps snapshot 1.
    config = make_config(tmp_path, {"steps": 10, "epochs": 3, "cycles": 6})
    kept = Kept()
    with pytest.raises(Interrupted):
        run({**config, "kill": {"step": 7, "hook": "batch_end", "how": "raise"}})
    kept.add(config["directory"])
    assert list(kept.entries) == [1]
    with pytest.warns(RuntimeWarning, match=r"holds snapshots \[1\] of an interrupted run"):
        run(config)
    assert_resumed_correctly(config, kept, final_start=0)


# --------------------------------------------------------------------------- hard kill of a subprocess
def random_kill_config(tmp_path, seed):
    """A random run and a random SIGKILL point; the kind of point cycles with the seed."""
    rng = random.Random(seed)
    steps, epochs = rng.randint(3, 6), rng.randint(3, 5)
    total = steps * epochs
    cycles = rng.choice([m for m in (2, 3, 4) if (m - 1) * -(-total // m) < total])
    order = ["backup", "snapshot", "record", "kill"]
    rng.shuffle(order)
    overrides = {
        "steps": steps,
        "epochs": epochs,
        "cycles": cycles,
        "alpha0": rng.choice([0.1, 0.2, 0.3]),
        "order": order,
        "save_freq": rng.choice(["epoch", rng.randint(1, steps)]),
        "path": "in_graph" if rng.random() < 0.3 else "callback",
    }
    config = make_config(tmp_path, overrides)
    ends = checks.cycle_ends(config)
    kind = ("step", "write", "async")[seed % 3]
    if kind == "step":
        hook = rng.choice(["batch_begin", "batch_end", "epoch_end"])
        step = steps * rng.randint(1, epochs) if hook == "epoch_end" else rng.randint(2, total)
        kill = {"step": step, "hook": hook}
    elif kind == "write":
        kill = {"step": rng.choice(ends), "hook": rng.choice(["write", "record"])}
    else:  # asynchronous: the first time a snapshot's temporary file shows up, after 0-3 ms
        kill = {"hook": "write_async", "delay": rng.choice([0.0, 0.001, 0.003])}
    return config, {**kill, "how": "sigkill"}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkill_at_a_random_step_then_resume(tmp_path, seed):
    config, kill = random_kill_config(tmp_path, seed)
    process = checks.run_worker({**config, "kill": kill}, tmp_path, timeout=240)
    assert process.returncode == -9, (config, kill, process.returncode, process.stderr[-3000:])
    kept = Kept()
    kept.add(config["directory"])
    killed = checks.read_records(config["record"])
    assert killed, "the killed run recorded no step"
    runs = assert_resumed_correctly(config, kept, warnings_seen=run_and_check_warnings(config))
    assert runs[0]["start"] == 0


def run_and_check_warnings(config):
    """Runs to the end; returns the RuntimeWarnings' texts. None may report a snapshot as lost."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(config)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert not [m for m in messages if "cannot be taken" in m], messages
    return messages
