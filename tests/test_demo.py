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
TIMEOUT = 600  # a loaded 2-core machine; the pair takes ~3 minutes when it is quiet
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
            *("--distill-epochs", "1", "--output-dir", str(base / "demo")),
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
    # each "Snapshot k/M" line comes after the line of the epoch it was taken in, not before
    lines = output.splitlines()
    for k in (1, 2):
        announced = next(i for i, line in enumerate(lines) if line.startswith(f"Snapshot {k}/2"))
        epoch_line = next(i for i, line in enumerate(lines) if line.startswith(f"snapshot epoch   {k}/2"))
        assert epoch_line < announced, lines[epoch_line - 1 : announced + 2]
    # the calibration and cost table: every row, with its forward passes
    table = {
        line.split("|")[1].strip(): [cell.strip() for cell in line.strip().strip("|").split("|")[1:]]
        for line in lines
        if line.startswith("| ") and "|" in line[2:]
    }
    header = table["model"]
    for row, passes in (
        ("single model, step schedule", "1"),
        ("NoCycle ensemble (M=2)", "2"),
        ("snapshot ensemble (M=2)", "2"),
        ("distilled student (1x cost)", "1"),
        ("weight average (1x cost), snapshots", "1"),
        ("weight average (1x cost), NoCycle [1, 2]", "1"),
    ):
        cells = dict(zip(header, table[row], strict=True))
        assert cells["passes"] == passes
        for column in ("ECE %", "ECE % (TS)"):
            assert 0.0 <= float(cells[column]) <= 100.0
        assert float(cells["NLL"]) > 0 and float(cells["NLL (TS)"]) > 0 and float(cells["T"]) > 0
    assert "keras-snapshot evaluate " + str(out / "snapshots") + " --data " + str(out / "test.npz") in output
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
    assert results["uncertainty_mutual_information_max_gap"] < 1e-4
    calibration = results["calibration_test"]
    assert set(calibration) == {
        "single",
        "nocycle",
        "snapshot_ensemble",
        "distilled_student",
        "weight_average_snapshots",
        "weight_average_nocycle",
    }
    for row in calibration.values():
        assert 0 <= row["ece"] <= 1 and 0 <= row["ece_ts"] <= 1 and row["temperature"] > 0
        assert row["nll"] > 0 and 0 <= row["brier"] <= 2
    assert calibration["snapshot_ensemble"]["error_%"] == test["ensemble_last_m"][-1]
    assert (
        results["forward_passes"]["snapshot_ensemble"] == 2
        and results["forward_passes"]["distilled_student"] == 1
    )
    assert isinstance(results["weight_average_guard"]["snapshots"]["guard_fired"], bool)
    # floats are rounded for reading (5 significant digits)
    assert all(float(f"{v:.5g}") == v for v in _floats(results))
    # OOD detection: every model's score against the same OOD images, in the output and in the JSON
    assert "Out-of-distribution detection: 397 test images vs 397 OOD images" in output
    ood = results["ood"]
    assert ood["rows"] == 397 and "pixels shuffled" in ood["source"]
    assert set(ood["metrics"]) == {
        "single model, 1 - max probability",
        "last snapshot, 1 - max probability",
        "snapshot ensemble (M=2), 1 - max probability",
        "snapshot ensemble (M=2), entropy",
        "snapshot ensemble (M=2), mutual information",
    }
    for metrics in ood["metrics"].values():
        assert 0 <= metrics["auroc"] <= 1 and 0 <= metrics["aupr"] <= 1 and 0 <= metrics["fpr95"] <= 1
    assert "last snapshot, ranked by max probability" in results["selective_test_error_at_80%"]
    with np.load(out / "test.npz") as arrays:
        assert arrays["x"].shape == (397, 8, 8, 1) and arrays["y"].shape == (397,)
        assert arrays["x"].dtype == np.float32 and set(np.unique(arrays["y"])) <= set(range(10))
    if HAS_MATPLOTLIB:
        for name in ("lr_schedule.png", "ensemble_size.png", "reliability.png", "selective.png", "ood.png"):
            assert (out / name).read_bytes()[:8] == PNG_MAGIC
    else:
        assert "skipping the pictures" in output


def _floats(value):
    if isinstance(value, dict):
        for item in value.values():
            yield from _floats(item)
    elif isinstance(value, list):
        for item in value:
            yield from _floats(item)
    elif isinstance(value, float):
        yield value


def test_benchmark_quick_reports_every_method(smoke):
    out, output = _finish(smoke, "benchmark")
    report = json.loads((out / "accuracy.json").read_text())
    assert set(report["configs"]) == {"nocycle-M2", "snapshot-a0.2-M2"}
    assert report["single"]["test"]["n"] == 1
    assert report["selected"]["config"] == "snapshot-a0.2-M2"
    assert {"gain_points", "spread_points", "met"} <= report["target"].keys()
    assert report["meta"]["command"].endswith("benchmarks/accuracy.py --quick --output-dir " + str(out))
    records = [json.loads(line) for line in (out / "accuracy.runs.jsonl").read_text().splitlines()]
    assert [r["method"] for r in records] == ["step", "snapshot", "evaluate"]
    assert records[2]["failed"] == {}, records[2]["failed"]
    markdown = (out / "accuracy.md").read_text()
    assert "Quick smoke test" in markdown and "single model (step schedule)" in markdown
    assert "Table 1 analogue" in output
    evaluation = report["evaluation"]
    assert set(evaluation["rows"]) == {
        "single",
        "nocycle",
        "snapshot",
        "student",
        "average_snapshot",
        "average_same_basin",
    }
    for row in evaluation["rows"].values():
        assert 0 <= row["ece"]["mean"] <= 1 and 0 <= row["ece_ts"]["mean"] <= 1 and row["nll_ts"]["mean"] > 0
    # the single model's error from evaluate_ensemble is the training run's
    assert evaluation["rows"]["single"]["error_%"]["mean"] == pytest.approx(report["single"]["test"]["mean"])
    assert set(evaluation["targets"]) == {"ts_nll", "student", "selective"}
    assert evaluation["guard_fired"]["snapshot"] in ([True], [False])
    for row in ("distilled student (1x cost)", "weight average (1x cost), the snapshots", "same basin"):
        assert row in markdown
    assert markdown.count("MET**") == 4  # the accuracy target and the three of issues 11 and 12
    assert "at 80% coverage" in markdown
    if HAS_MATPLOTLIB:
        for name in ("lr_schedule", "ensemble_size", "reliability", "selective"):
            assert (out / f"accuracy.{name}.png").read_bytes()[:8] == PNG_MAGIC


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


def _evaluation(seed, single, ensemble, student, nll_ts, at_80):
    def row(error, nll):
        fixed = {"nll": 0.5, "ece": 0.02, "brier": 0.2, "temperature": 1.1, "ece_ts": 0.01, "brier_ts": 0.19}
        return {"error_%": error, "nll_ts": nll, **fixed}

    curves = {key: [value] * 3 for key, value in at_80.items()}
    bins = {"count": [1, 2], "confidence": [0.5, 1.8], "correct": [1, 2]}
    return {
        "method": "evaluate",
        "config": "snapshot-a0.2-M2",
        "seed": seed,
        "distill_epochs": 4,
        "student_init": "scratch",
        "same_basin_epochs": [2, 4],
        "failed": {},
        "calibration": {
            "single": row(single, nll_ts[0]),
            "nocycle": row(single, nll_ts[0]),
            "snapshot": row(ensemble, nll_ts[1]),
        },
        "student": {"row": row(student, 0.3)},
        "averaging": {
            "snapshot": {"row": row(30.0, 0.9), "guard_fired": True},
            "same_basin": {"row": row(single, 0.3), "guard_fired": False},
        },
        "selective": {
            "coverages": [0.7, 0.8, 0.9],
            "curves": curves,
            "at_80": at_80,
            "reliability": {"single": bins, "snapshot": bins},
        },
    }


def test_benchmark_evaluation_targets_per_seed_and_on_the_means():
    accuracy = _import(ROOT / "benchmarks" / "accuracy.py", "accuracy_under_test")
    at_80 = {"ensemble_mi": 5.0, "ensemble_maxprob": 4.0, "single_maxprob": 6.0}
    records = [
        # seed 0: gain 1.0, the student recovers 0.6 of it; seed 1: gain 1.0, the student recovers 0.2
        _evaluation(0, 10.0, 9.0, 9.4, (0.30, 0.25), at_80),
        _evaluation(1, 10.2, 9.2, 10.0, (0.31, 0.26), at_80 | {"ensemble_mi": 6.5}),
    ]
    result = accuracy.aggregate_evaluation(records, "snapshot-a0.2-M2")
    student = result["targets"]["student"]
    assert [s["recovery"] for s in student["per_seed"]] == pytest.approx([0.6, 0.2])
    assert [s["met"] for s in student["per_seed"]] == [True, False]
    assert student["recovery"] == pytest.approx((10.1 - 9.7) / (10.1 - 9.1)) and student["met"] is False
    ts = result["targets"]["ts_nll"]
    assert ts["gap"] == pytest.approx(0.05)
    assert ts["spread"] == pytest.approx(np.std([0.30, 0.31], ddof=1) + np.std([0.25, 0.26], ddof=1))
    assert ts["met"] is True
    selective = result["targets"]["selective"]
    assert selective["ensemble_mi"] == pytest.approx(5.75) and selective["met"] is True
    assert selective["paired"] == pytest.approx([1.0, -0.5])
    assert result["guard_fired"] == {"snapshot": [True, True], "same_basin": [False, False]}
    assert result["selective"]["reliability"]["single"]["count"] == [2, 4]  # pooled over seeds
    # an ensemble that does not beat the single model leaves the recovery ratio undefined, never "met"
    flat = accuracy.aggregate_evaluation(
        [_evaluation(0, 10.0, 10.5, 9.0, (0.3, 0.2), at_80)], "snapshot-a0.2-M2"
    )
    assert flat["targets"]["student"]["recovery"] is None and flat["targets"]["student"]["met"] is False
    markdown = "\n".join(
        accuracy.evaluation_markdown(accuracy.parse_args(["--epochs", "4", "--cycles", "2"]), result, 2)
    )
    assert "recovery ratio 0.40" in markdown and "fired on 2/2 seed(s)" in markdown


def test_benchmark_records_the_protocol_command_without_phase_flags():
    accuracy = _import(ROOT / "benchmarks" / "accuracy.py", "accuracy_under_test")
    argv = ["--epochs", "4", "--evaluate-only", "--snapshot-dir", "/tmp/x", "--resume", "--name", "a"]
    assert accuracy.protocol_argv(argv) == ["--epochs", "4", "--name", "a"]


def test_selective_errors_keep_the_most_certain_examples_first():
    training = _import(ROOT / "examples" / "training.py", "training_under_test")
    p = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.45, 0.55]])
    y = np.array([0, 1, 1, 0])  # examples 1 and 3 are wrong
    uncertainty = np.array([0.1, 0.2, 0.3, 0.4])
    assert training.selective_errors(p, y, uncertainty, (0.25, 0.5, 0.75, 1.0)) == pytest.approx(
        [0, 50, 100 / 3, 50]
    )
    bins = training.reliability_bins(p, y, bins=2)  # edges (0, 0.5], (0.5, 1]
    assert bins["count"] == [0, 4] and bins["correct"] == [0, 2]
    assert bins["confidence"][1] == pytest.approx(0.9 + 0.6 + 0.8 + 0.55)
    assert training.rounded({"a": [1.23456789, 0.0], "b": 7}) == {"a": [1.2346, 0.0], "b": 7}


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


def test_far_ood_images_need_no_download():
    data_module = _import(ROOT / "examples" / "data.py", "data_under_test")
    Dataset, far_ood = data_module.Dataset, data_module.far_ood
    rng = np.random.default_rng(0)

    def dataset(shape):
        images = rng.random((6, *shape), dtype=np.float32)
        labels = np.zeros(6, "int32")
        return Dataset("x", images, labels, images, labels, images, labels, 10, "made up")

    digits, source = far_ood(dataset((28, 28, 1)))
    assert digits.shape == (1797, 28, 28, 1) and digits.dtype == np.float32 and "digits" in source
    assert digits.min() == 0.0 and digits.max() == 1.0 and not digits[:, :2].any()  # centred, a blank border
    data = dataset((8, 8, 1))
    shuffled, source = far_ood(data)
    assert shuffled.shape == data.x_test.shape and "shuffled" in source
    # the same intensities per image, in other places
    np.testing.assert_array_equal(
        np.sort(shuffled.reshape(6, -1), axis=1), np.sort(data.x_test.reshape(6, -1), axis=1)
    )
    assert not np.array_equal(shuffled, data.x_test)
