"""Distributed training on Keras's own engines: the rate at every step, one writer, M snapshots, the ensemble.

- TensorFlow: `tf.distribute.MirroredStrategy` over 2 logical CPU devices (one process).
- JAX: `keras.distribution.DataParallel` over 2 CPU devices (one process), and the same over two
  processes on localhost (`keras.distribution.initialize`, one CPU device each): multi-worker.
- TensorFlow `MultiWorkerMirroredStrategy` with two workers: Keras 3 cannot train with it (xfail,
  upstream keras-team/keras#20585).
- PyTorch: Keras's torch backend has no distributed `fit` (skipped).

Each run is a subprocess: devices and clusters must be set up before the backend is imported. The
model (see tests/workers/train_worker.py) turns the weights into a record of every step's rate; with a
global batch of 2 split over 2 replicas, a snapshot's kernel must equal the one computed by hand
here, entry by entry, which also proves both halves of every batch were used.
"""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import keras
import numpy as np
import pytest
from workers import checks

BACKEND = keras.backend.backend()

# T = 24, M = 3: cycles of 8 steps end at 8 and 16 (mid-epoch) and 24 (the run's end). Global batch 2.
RUN = {"steps": 6, "epochs": 4, "cycles": 3, "alpha0": 0.2, "batch": 2, "order": ["snapshot", "record"]}


def make_config(tmp_path, name, **overrides):
    folder = tmp_path / name
    folder.mkdir()
    return {
        **RUN,
        "directory": str(folder / "snapshots"),
        "record": str(folder / "record.jsonl"),
        "writes": str(folder / "writes.jsonl"),
        "result": str(folder / "result.json"),
        **overrides,
    }


def expected_kernel(step, config):
    """The kernel after `step` steps by hand: step s of an epoch's batch b moves its B entries by -rate/B."""
    batch = config["batch"]
    kernel = np.zeros(config["steps"] * batch)
    for s in range(1, step + 1):
        b = (s - 1) % config["steps"]
        kernel[b * batch : (b + 1) * batch] -= checks.formula(s, config) / batch
    return kernel


def read_writes(config):
    path = Path(config["writes"])
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_run(config, records_of_workers, chief_pid):
    """Rates exact on every worker, one writer, M snapshots at their steps, the ensemble their mean."""
    total = config["steps"] * config["epochs"]
    sequences = []
    for record in records_of_workers:
        runs = checks.read_records(record)
        assert len(runs) == 1 and runs[0]["start"] == 0 and runs[0]["end"] == total, runs
        checks.assert_rates_exact(runs[0], config)
        sequences.append([rate for _, rate in runs[0]["steps"]])
    for other in sequences[1:]:
        np.testing.assert_allclose(other, sequences[0], rtol=0, atol=1e-7)  # the same on every worker

    manifest = checks.assert_complete(config["directory"], config)
    writes = read_writes(config)
    assert [w["kind"] for w in writes] == ["snapshot", "manifest"] * config["cycles"], writes
    assert {w["pid"] for w in writes} == {chief_pid}, "only the chief may write"
    assert [w["name"] for w in writes if w["kind"] == "manifest"] == [
        e["file"] for e in manifest["snapshots"]
    ]

    for entry in manifest["snapshots"]:
        model = keras.saving.load_model(Path(config["directory"]) / entry["file"], compile=False)
        kernel = np.asarray(model.get_weights()[0], dtype="float64")[:, 0]
        np.testing.assert_allclose(kernel, expected_kernel(entry["step"], config), rtol=0, atol=1e-6)
    checks.assert_ensemble_is_the_mean(config["directory"], config)
    return manifest


def run_single_process(tmp_path, distribution, env=None):
    """The callback path and the in-graph path, one after the other in one subprocess."""
    configs = [
        make_config(tmp_path, "callback", distribution=distribution, ensemble=True),
        make_config(tmp_path, "in_graph", distribution=distribution, ensemble=True, path="in_graph"),
    ]
    process = checks.run_worker(configs, tmp_path, timeout=300, env=env)
    assert process.returncode == 0, process.stderr[-4000:]
    for config in configs:
        result = json.loads(Path(config["result"]).read_text())
        assert result["chief"] is True
        check_run(config, [config["record"]], result["pid"])
        # The ensemble built and run inside the distributed process agrees with the one built here.
        members = [
            keras.saving.load_model(Path(config["directory"]) / f"snapshot-0{c}.keras", compile=False)
            for c in (1, 2, 3)
        ]
        x = np.eye(config["steps"] * config["batch"], dtype="float32")
        mean = np.mean([keras.ops.convert_to_numpy(m(x)) for m in members], axis=0)
        np.testing.assert_allclose(np.array(result["ensemble"]), mean, rtol=1e-5, atol=1e-7)
    return [json.loads(Path(c["result"]).read_text()) for c in configs]


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.distribute.MirroredStrategy is TensorFlow's")
def test_mirrored_strategy_over_two_cpu_devices(tmp_path):
    results = run_single_process(tmp_path, "mirrored")
    assert [r["replicas"] for r in results] == [2, 2]


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution.DataParallel runs on the JAX backend")
def test_jax_data_parallel_over_two_cpu_devices(tmp_path):
    results = run_single_process(tmp_path, "data_parallel")
    assert [r["devices"] for r in results] == [2, 2]


# --------------------------------------------------------------------------- two processes
def free_port():
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def run_workers(tmp_path, configs, envs, timeout=300):
    processes = [
        checks.start_worker(config, tmp_path, env=env, name=f"worker{index}")
        for index, (config, env) in enumerate(zip(configs, envs, strict=True))
    ]
    try:
        for process in processes:
            process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)
            process.log_file.close()
    logs = [(tmp_path / f"worker{index}.log").read_text() for index in range(len(processes))]
    return [process.returncode for process in processes], logs


@pytest.mark.skipif(BACKEND != "jax", reason="multi-process data parallel training runs on the JAX backend")
def test_two_jax_processes_only_the_chief_writes(tmp_path):
    port = free_port()
    shared = make_config(tmp_path, "shared", distribution="jax_multiprocess")
    configs = []
    for index in range(2):
        folder = tmp_path / f"process{index}"
        folder.mkdir()
        configs.append(
            {
                **shared,  # one snapshot directory for both: only the chief may touch it
                "coordinator": f"localhost:{port}",
                "processes": 2,
                "process_id": index,
                "record": str(folder / "record.jsonl"),
                "writes": str(folder / "writes.jsonl"),
                "result": str(folder / "result.json"),
            }
        )
    codes, logs = run_workers(tmp_path, configs, [None, None])
    assert codes == [0, 0], "\n\n".join(log[-3000:] for log in logs)
    results = [json.loads(Path(c["result"]).read_text()) for c in configs]
    assert [r["chief"] for r in results] == [True, False]
    assert [r["devices"] for r in results] == [2, 2]
    assert read_writes(configs[1]) == [], "a non-chief process wrote snapshot files"
    check_run(configs[0], [c["record"] for c in configs], results[0]["pid"])


class KerasMultiWorkerFailure(Exception):
    """The known upstream failure of Keras 3 fit under MultiWorkerMirroredStrategy."""


@pytest.mark.skipif(BACKEND != "tensorflow", reason="MultiWorkerMirroredStrategy is TensorFlow's")
@pytest.mark.xfail(
    raises=KerasMultiWorkerFailure,
    strict=True,
    reason=(
        "Keras 3 cannot fit under tf.distribute.MultiWorkerMirroredStrategy: its TF trainer's "
        "_maybe_symbolic_build calls strategy.reduce on the PerReplica input batch, which the "
        "collective ops reject ('Attempt to convert a value (PerReplica...) to a Tensor'); "
        "keras-team/keras#20585, tensorflow/tensorflow#72388. Use JAX multi-process instead."
    ),
)
def test_tf_multi_worker_mirrored_strategy(tmp_path):
    ports = [free_port(), free_port()]
    cluster = {"worker": [f"localhost:{port}" for port in ports]}
    shared = make_config(tmp_path, "shared", distribution="mwms")
    configs, envs = [], []
    for index in range(2):
        folder = tmp_path / f"worker{index}-files"
        folder.mkdir()
        configs.append(
            {
                **shared,
                "record": str(folder / "record.jsonl"),
                "writes": str(folder / "writes.jsonl"),
                "result": str(folder / "result.json"),
            }
        )
        tf_config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
        envs.append({"TF_CONFIG": json.dumps(tf_config), "WORKER_FULL_TRACEBACK": "1"})
    codes, logs = run_workers(tmp_path, configs, envs, timeout=240)
    if codes != [0, 0] and all("_maybe_symbolic_build" in log and "PerReplica" in log for log in logs):
        raise KerasMultiWorkerFailure(logs[0][-1500:])
    assert codes == [0, 0], "\n\n".join(log[-3000:] for log in logs)
    results = [json.loads(Path(c["result"]).read_text()) for c in configs]
    assert [r["chief"] for r in results] == [True, False]
    assert read_writes(configs[1]) == []
    check_run(configs[0], [c["record"] for c in configs], results[0]["pid"])
