"""Checks shared by the resume, fault and distribution tests: rates, snapshots, manifest, subprocesses."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

WORKER = Path(__file__).with_name("train_worker.py")
REPO = Path(__file__).resolve().parents[2]


def formula(t, config):
    """The paper's rate at global step(s) t (1-based): eq. (2), written out here once more."""
    total = config["steps"] * config["epochs"]
    length = math.ceil(total / config["cycles"])
    t = np.asarray(t)
    return config["alpha0"] / 2.0 * (np.cos(np.pi * np.mod(t - 1, length) / length) + 1.0)


def cycle_ends(config):
    total = config["steps"] * config["epochs"]
    length = math.ceil(total / config["cycles"])
    return [min(k * length, total) for k in range(1, config["cycles"] + 1)]


def read_records(path):
    """The recorder's lines, split into runs: [{"start": it, "steps": [(it, rate), ...], "end": it}]."""
    runs = []
    path = Path(path)
    if not path.exists():
        return runs
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by SIGKILL
            continue
        if "start" in record:
            runs.append({"start": record["start"], "steps": [], "end": None})
        elif "it" in record:
            runs[-1]["steps"].append((record["it"], record["rate"]))
        elif "end" in record:
            runs[-1]["end"] = record["end"]
    return runs


def assert_rates_exact(run, config, atol=2e-6):
    """Every step of a run applied the formula's rate at its global step, and the steps are consecutive."""
    if not run["steps"]:
        return
    steps = np.array([it for it, _ in run["steps"]])
    rates = np.array([rate for _, rate in run["steps"]])
    np.testing.assert_array_equal(steps, np.arange(run["start"] + 1, run["start"] + 1 + len(steps)))
    np.testing.assert_allclose(rates, formula(steps, config), rtol=0, atol=atol)


def directory_state(directory):
    """{file name: (inode, mtime_ns, sha256)} of the snapshot files, to prove they were not rewritten."""
    state = {}
    for path in sorted(Path(directory).glob("*.keras")):
        if path.name.startswith(".tmp-"):
            continue
        stat = path.stat()
        state[path.name] = (stat.st_ino, stat.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
    return state


def read_manifest_raw(directory):
    path = Path(directory) / "manifest.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def assert_complete(directory, config, atol=1e-5):
    """Exactly M snapshots, each the model at its cycle end step; the manifest matches the files."""
    import keras

    directory = Path(directory)
    ends = cycle_ends(config)
    manifest = read_manifest_raw(directory)
    assert manifest is not None, f"no manifest in {directory}"
    entries = manifest["snapshots"]
    assert [e["cycle"] for e in entries] == list(range(1, config["cycles"] + 1)), entries
    assert [e["step"] for e in entries] == ends
    listing = sorted(p.name for p in directory.iterdir())
    assert listing == sorted(["manifest.json", *(e["file"] for e in entries)]), listing
    cumulative = np.cumsum(formula(np.arange(1, ends[-1] + 1), config))
    for entry in entries:
        assert math.isclose(entry["learning_rate"], float(formula(entry["step"], config)), abs_tol=1e-12)
        model = keras.saving.load_model(directory / entry["file"], compile=False)
        kernel_sum = float(np.sum(np.asarray(model.get_weights()[0], dtype="float64")))
        # The sum of the kernel is minus the sum of every rate applied so far: the snapshot is the
        # model after exactly `step` steps, all at the formula's rate.
        assert kernel_sum == _approx(-cumulative[entry["step"] - 1], atol), (entry, kernel_sum)
    return manifest


def assert_ensemble_is_the_mean(directory, config):
    """build_ensemble(directory) is one model whose output is the mean of the M snapshots' outputs."""
    import keras

    from keras_snapshot.ensemble import build_ensemble

    directory = Path(directory)
    x = np.eye(config["steps"] * config.get("batch", 1), dtype="float32")
    manifest = read_manifest_raw(directory)
    outputs = [
        keras.ops.convert_to_numpy(keras.saving.load_model(directory / e["file"], compile=False)(x))
        for e in manifest["snapshots"]
    ]
    ensemble = build_ensemble(directory)
    got = keras.ops.convert_to_numpy(ensemble(x))
    np.testing.assert_allclose(got, np.mean(outputs, axis=0), rtol=1e-5, atol=1e-7)


class _approx:
    def __init__(self, value, atol):
        self.value, self.atol = value, atol

    def __eq__(self, other):
        return abs(other - self.value) <= self.atol

    def __repr__(self):
        return f"{self.value} +- {self.atol}"


def run_worker(config, work_dir, *, timeout=180, env=None, name="config"):
    """Runs the worker in a subprocess; returns the CompletedProcess (stdout and stderr as text)."""
    work_dir = Path(work_dir)
    config_path = work_dir / f"{name}.json"
    config_path.write_text(json.dumps(config), encoding="utf-8")
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, str(WORKER), str(config_path)],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def start_worker(config, work_dir, *, env=None, name="config"):
    """Starts the worker without waiting (for several workers at once); returns the Popen."""
    work_dir = Path(work_dir)
    config_path = work_dir / f"{name}.json"
    config_path.write_text(json.dumps(config), encoding="utf-8")
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1", **(env or {})}
    log = open(work_dir / f"{name}.log", "w", encoding="utf-8")  # noqa: SIM115 (closed by the caller)
    process = subprocess.Popen(
        [sys.executable, str(WORKER), str(config_path)],
        cwd=REPO,
        env=full_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    process.log_file = log
    return process
