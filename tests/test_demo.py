"""Smoke tests of the main job (examples/demo.py) and of `benchmarks/accuracy.py --quick`.

Both run as real subprocesses under the current KERAS_BACKEND, on scikit-learn's digits with tiny settings;
they are started together (they are independent) so that the pair costs the time of the slower one.
The dataset loader is tested in-process, including the Fashion-MNIST idx reader on a small fake copy.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 300
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _import(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    base = tmp_path_factory.mktemp("smoke")
    # One compute thread per process: the two run side by side, and oversubscribed thread pools are what
    # makes small models crawl on a shared 2-core machine (torch: 10x slower).
    threads = {
        "OMP_NUM_THREADS": "1",
        "TF_NUM_INTRAOP_THREADS": "1",
        "TF_NUM_INTEROP_THREADS": "1",
        "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
    }
    env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2", **threads)
    commands = {
        "demo": [
            "examples/demo.py",
            *("--dataset", "digits", "--epochs", "2", "--cycles", "2", "--width", "4", "--val-size", "200"),
            *("--output-dir", str(base / "demo")),
        ],
        "benchmark": ["benchmarks/accuracy.py", "--quick", "--output-dir", str(base / "benchmark")],
    }
    processes = {
        name: subprocess.Popen(
            [sys.executable, *command],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name, command in commands.items()
    }
    yield base, processes
    for process in processes.values():
        if process.poll() is None:
            process.kill()
            process.communicate()


def _finish(smoke, name: str) -> tuple[Path, str]:
    base, processes = smoke
    output, _ = processes[name].communicate(timeout=TIMEOUT)
    assert processes[name].returncode == 0, output[-4000:]
    return base / name, output


def test_demo_trains_builds_exports_and_prints_the_table(smoke):
    out, output = _finish(smoke, "demo")
    for row in (
        "snapshot 1 (epoch 1)",
        "snapshot 2 (epoch 2)",
        "ensemble of the last m=1 = snapshot 2",
        "ensemble of the last m=2 = exported model",
        "single model, step schedule",
    ):
        assert row in output
    assert "| model" in output and "test error %" in output
    assert "Exported for TF Serving" in output and "EXPORT FAILED" not in output
    assert (out / "snapshots" / "snapshot-01.keras").is_file() and (
        out / "snapshots" / "snapshot-02.keras"
    ).is_file()
    assert (out / "ensemble.keras").is_file()
    assert (out / "serving" / "snapshot_ensemble" / "1" / "saved_model.pb").is_file()

    results = json.loads((out / "results.json").read_text())
    test = results["test_error"]
    assert len(test["snapshots"]) == 2 and len(test["ensemble_last_m"]) == 2
    assert test["ensemble_last_m"][0] == test["snapshots"][1]  # m=1 is the last snapshot
    assert results["ensemble_model_max_gap"] < 1e-5  # the built model is the mean of the snapshots' softmaxes
    if HAS_MATPLOTLIB:
        for name in ("lr_schedule.png", "ensemble_size.png"):
            assert (out / name).read_bytes()[:8] == PNG_MAGIC
    else:
        assert "skipping the pictures" in output


def test_benchmark_quick_reports_every_method(smoke):
    out, output = _finish(smoke, "benchmark")
    report = json.loads((out / "accuracy.json").read_text())
    assert set(report["configs"]) == {"nocycle-M2", "snapshot-a0.2-M2"}
    assert report["single"]["test"]["n"] == 1
    assert report["selected"]["config"] == "snapshot-a0.2-M2"
    assert {"gain_points", "spread_points", "met"} <= report["target"].keys()
    assert report["meta"]["command"].endswith("benchmarks/accuracy.py --quick --output-dir " + str(out))
    assert len((out / "accuracy.runs.jsonl").read_text().splitlines()) == 2
    markdown = (out / "accuracy.md").read_text()
    assert "Quick smoke test" in markdown and "single model (step schedule)" in markdown
    assert "Table 1 analogue" in output
    if HAS_MATPLOTLIB:
        for name in ("lr_schedule.png", "ensemble_size.png"):
            assert (out / name).read_bytes()[:8] == PNG_MAGIC


def test_benchmark_rejects_cycles_that_do_not_divide_the_budget(capsys):
    accuracy = _import(ROOT / "benchmarks" / "accuracy.py", "accuracy_under_test")
    with pytest.raises(SystemExit):
        accuracy.parse_args(["--epochs", "10", "--cycles", "3"])
    assert "must divide --epochs" in capsys.readouterr().err


def _errors(last_m):
    return {"members": list(last_m), "last_m": list(last_m)}


def test_benchmark_selects_on_validation_and_judges_the_target_by_the_spread():
    accuracy = _import(ROOT / "benchmarks" / "accuracy.py", "accuracy_under_test")
    args = accuracy.parse_args(
        ["--epochs", "4", "--cycles", "2", "--alphas", "0.1", "0.2", "--seeds", "0", "1"]
    )
    records = []
    for seed, noise in ((0, 0.0), (1, 0.2)):
        records.append(
            {"method": "step", "seed": seed, "single": {"val": 10.0 + noise, "test": 10.0 + noise}}
            | {"nocycle": {"2": {"val": _errors([10.0, 9.8]), "test": _errors([10.0, 9.9])}}}
        )
        # alpha0=0.1 is best on test, 0.2 best on validation: the selection must take 0.2
        records.append(
            {"method": "snapshot", "alpha0": 0.1, "cycles": 2, "seed": seed}
            | {"val": _errors([9.9, 9.5]), "test": _errors([9.5, 8.0 + noise])}
        )
        records.append(
            {"method": "snapshot", "alpha0": 0.2, "cycles": 2, "seed": seed}
            | {"val": _errors([9.9, 9.0]), "test": _errors([9.5, 9.5 + noise])}
        )
    result = accuracy.aggregate(args, records)
    assert result["selected"]["config"] == "snapshot-a0.2-M2"
    test = result["configs"]["snapshot-a0.2-M2"]["test"]
    assert test["mean"] == pytest.approx(9.6) and test["std"] == pytest.approx(np.std([9.5, 9.7], ddof=1))
    target = result["target"]
    assert target["gain_points"] == pytest.approx(10.1 - 9.6)
    assert target["spread_points"] == pytest.approx(2 * np.std([10.0, 10.2], ddof=1))
    assert target["met"] is True and target["wins"] == "2/2 seeds"
    assert result["configs"]["nocycle-M2"]["test_last_m"]["mean"] == pytest.approx([10.0, 9.9])


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_loader_reads_idx_files_and_splits_validation_off_training(tmp_path):
    data = _import(ROOT / "examples" / "data.py", "data_under_test")
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (50, 28, 28)),
        "y_train": np.arange(50) % 10,
        "x_test": rng.integers(0, 256, (20, 28, 28)),
        "y_test": np.arange(20) % 10,
    }
    for key, name in data.FASHION_MNIST_FILES.items():
        _write_idx(tmp_path / name, arrays[key])
    dataset = data.load_dataset("fashion_mnist", data_dir=tmp_path, val_size=10, train_size=30, test_size=15)
    assert dataset.input_shape == (28, 28, 1) and dataset.num_classes == 10
    assert (len(dataset.x_train), len(dataset.x_val), len(dataset.x_test)) == (30, 10, 15)
    assert (
        dataset.x_train.dtype == np.float32 and 0.0 <= dataset.x_train.min() <= dataset.x_train.max() <= 1.0
    )
    # validation and training images come from disjoint rows, and the split does not depend on train_size
    flat = (arrays["x_train"].reshape(50, -1) / 255.0).astype(np.float32)
    rows = lambda images: {int(np.flatnonzero((flat == image.reshape(-1)).all(1))[0]) for image in images}  # noqa: E731
    assert not rows(dataset.x_val) & rows(dataset.x_train)
    again = data.load_dataset("fashion_mnist", data_dir=tmp_path, val_size=10)
    np.testing.assert_array_equal(again.x_val, dataset.x_val)
    assert len(again.x_train) == 40


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path):
    data = _import(ROOT / "examples" / "data.py", "data_under_test")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data.load_dataset("fashion_mnist", data_dir=tmp_path / "nowhere")


def test_digits_dataset():
    data = _import(ROOT / "examples" / "data.py", "data_under_test")
    dataset = data.load_dataset("digits", val_size=200)
    assert (len(dataset.x_train), len(dataset.x_val), len(dataset.x_test)) == (1200, 200, 397)
    assert dataset.input_shape == (8, 8, 1)
    assert set(np.unique(dataset.y_test)) == set(range(10))
