"""Smoke tests of the benchmark scripts: each one's --quick mode on the current backend only.

They check that the scripts run with one command and print well-formed ratio tables and result files;
the numbers of a --quick run are not measurements and are not checked.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
BACKEND = keras.backend.backend()
VERDICT = re.compile(r"^(PASS|FAIL|n/a)$")


def run_quick(script: str, out: Path) -> str:
    env = dict(os.environ, KERAS_BACKEND=BACKEND, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick", "--backends", BACKEND, "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def tables(text: str) -> list[list[list[str]]]:
    """Every markdown table in `text`, as rows of cells (header first, separator dropped)."""
    found, current = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            current.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif current:
            found.append(current)
            current = []
    for table in found:
        assert len(table) >= 3, table  # header, separator, at least one row
        assert all(set(cell) <= set("- ") for cell in table[1]), table[1]
        width = len(table[0])
        assert all(len(row) == width for row in table), table
        assert all(cell for row in table for cell in row), table
    return [[table[0], *table[2:]] for table in found]


def table_with(found, *columns):
    for table in found:
        if all(column in table[0] for column in columns):
            return table
    raise AssertionError(f"no table with columns {columns}: {[t[0] for t in found]}")


def check_record(out: Path, stem: str, benchmark: str) -> dict:
    record = json.loads((out / f"{stem}.json").read_text())
    markdown = (out / f"{stem}.md").read_text()
    assert record["benchmark"] == benchmark
    assert record["mode"] == "quick"
    assert f"--backends {BACKEND}" in record["command"] and "--quick" in record["command"]
    assert record["machine"]["nproc"] >= 1 and record["machine"]["cpu"]
    assert "keras" in record["machine"]["versions"]
    assert record["date"]
    assert list(record["backends"]) == [BACKEND]
    assert record["command"] in markdown
    return record


def test_overhead_quick(tmp_path):
    stdout = run_quick("overhead.py", tmp_path)
    found = tables(stdout)
    timing = table_with(found, "backend", "model", "a us", "b us", "c us", "d us", "b/a", "c/a", "d/a")
    assert [row[:2] for row in timing[1:]] == [[BACKEND, "mlp"]]
    for row in timing[1:]:
        assert all(float(cell) > 0 for cell in row[2:])
    targets = table_with(found, "target", "value", "verdict")
    for row in targets[1:]:
        assert VERDICT.match(row[-1]), row
    if BACKEND in ("tensorflow", "jax"):
        assert any(row[2] == "(c)/(a) >= 0.98" for row in targets[1:])
    saves = table_with(found, "ms/snapshot", "save/cycle")
    assert float(saves[1][2]) > 0
    record = check_record(tmp_path, f"overhead-{BACKEND}-quick", "overhead")
    result = record["backends"][BACKEND]["models"]["mlp"]
    assert set(result["median_us"]) == {"a", "b", "c", "d"}
    assert result["save"]["snapshots"] == 1


def test_inference_quick(tmp_path):
    stdout = run_quick("inference.py", tmp_path)
    found = tables(stdout)
    latency = table_with(
        found,
        "batch",
        "ensemble predict",
        "fused predict",
        "loop predict",
        "fused compiled",
        "member compiled",
    )
    assert [row[1] for row in latency[1:]] == ["1", "32", "1024"]
    ratios = table_with(
        found, "graph", "loop/ensemble (predict)", "ensemble/member (compiled)", "serving_default/compiled"
    )
    assert [row[1:3] for row in ratios[1:]] == [
        [graph, batch] for batch in ("1", "32", "1024") for graph in ("branches", "fused")
    ]
    targets = table_with(found, "target", "value", "verdict")
    assert len(targets) == 1 + 2 * 4 + 1  # 4 latency targets per graph, then the builder
    for row in targets[1:]:
        assert VERDICT.match(row[-1]), row
    builder = table_with(found, "build (s)", "max loads per file")
    # Not a timing: the builder must load every snapshot exactly once.
    assert builder[1][-2] == "1" and builder[1][-3] == "5", builder
    record = check_record(tmp_path, f"inference-{BACKEND}-quick", "inference")
    result = record["backends"][BACKEND]
    assert result["builder"]["max_loads_per_file"] == 1
    if BACKEND in ("tensorflow", "jax"):
        assert result["serving_default"] == "ok", result["serving_default"]


@pytest.mark.parametrize("script", ["overhead.py", "inference.py"])
def test_help_runs_without_a_backend(script):
    """The drivers import no backend themselves: --help must work (and be quick) anywhere."""
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "--quick" in proc.stdout and "--backends" in proc.stdout


def test_every_committed_result_names_its_command():
    """results/ keeps the latest run per question and the GPU runs, each with the command that made it."""
    reports = sorted((BENCHMARKS / "results").glob("*.md"))
    assert reports
    for report in reports:
        text = report.read_text()
        assert re.search(r"^Command: `[^`]*python benchmarks/\w+\.py[^`]*`", text, re.MULTILINE), report
        assert report.with_suffix(".json").is_file(), f"{report.name} has no JSON record"


def _load_benchmark(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_uncertainty_report_from_records(tmp_path):
    """uncertainty.py --aggregate-only on made-up seed records: the targets' verdicts and both pictures
    (no training: the measurement itself takes minutes)."""
    pytest.importorskip("matplotlib")
    bench = _load_benchmark("uncertainty")
    argv = ["--aggregate-only", "--out", str(tmp_path), "--name", "toy"]
    protocol = bench.protocol(bench.parse_args(argv))
    grid, bins = len(bench.COVERAGES), bench.HISTOGRAM_BINS

    def metrics(aurc, near, far):
        return {"aurc": aurc, "augrc": aurc / 2, "error_at_80": 2 * aurc, "near_auroc": near,
                "near_fpr95": 0.5, "far_auroc": far, "far_fpr95": 0.4}  # fmt: skip

    records = []
    for seed, noise in enumerate((-0.01, 0.0, 0.01)):
        single = metrics(0.03 + noise / 10, 0.80 + noise, 0.80 + noise)
        models = {
            "single": {"max_probability": single, "entropy": metrics(0.031, 0.81, 0.82)},
            # near: far beyond the spread; far: a tie with the single model; AURC: 1 point lower
            "ensemble": {
                "max_probability": metrics(0.02 + noise / 10, 0.85, 0.80 + noise),
                "entropy": metrics(0.021, 0.90 + noise, 0.79 + noise),
                "mutual_information": metrics(0.04, 0.88, 0.78),
                "disagreement": metrics(0.08, 0.6, 0.6),
            },
        }
        models["last snapshot"] = {k: models["single"][k] for k in ("max_probability", "entropy")}
        models["student"] = dict(models["last snapshot"])
        for name, model in models.items():
            model["error"], model["temperature"] = 0.12 if name != "ensemble" else 0.11, 1.3
        keys = [f"{m}/{s}" for m, scores in models.items() for s in scores if s in bench.SCORES]
        records.append(
            {
                "seed": seed,
                "protocol": protocol,
                "seconds": 1.0,
                "models": models,
                "student": {"call": "distill(...)", "optimizer": "SGD", "learning_rate": "CosineDecay"},
                "coverages": list(bench.COVERAGES),
                "curves": {k: list(np.linspace(0.0, 0.12, grid)) for k in keys},
                "histograms": {k: {s: [seed + 1] * bins for s in bench.OOD_SETS} for k in keys},
            }
        )
    (tmp_path / "toy.runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert bench.main(argv) == 0
    report = (tmp_path / "toy.md").read_text()
    verdicts = re.findall(r"^- (.+?), ensemble (\w+) \((best|fixed)[^*]*\*\*(MET|NOT MET)\*\*$", report, re.M)
    found = {(label, kind): (score, verdict) for label, score, kind, verdict in verdicts}
    assert found == {
        ("near-OOD AUROC", "best"): ("entropy", "MET"),
        ("near-OOD AUROC", "fixed"): ("entropy", "MET"),
        ("far-OOD AUROC", "best"): ("max_probability", "NOT MET"),
        ("far-OOD AUROC", "fixed"): ("entropy", "NOT MET"),
        ("AURC", "best"): ("max_probability", "MET"),
        ("AURC", "fixed"): ("entropy", "MET"),
    }, report
    record = json.loads((tmp_path / "toy.json").read_text())
    assert record["targets"]["aurc"]["best"]["gain"] == pytest.approx(0.01)
    for picture in ("toy.risk_coverage.png", "toy.ood_histograms.png"):
        assert (tmp_path / picture).stat().st_size > 10_000


def test_swa_report_from_records(tmp_path):
    """swa.py --aggregate-only on made-up records: without `single` runs, the single model's row is the
    SWA-defaults runs' last weights, and each SWA row's verdict follows the gain-over-spread rule."""
    bench = _load_benchmark("swa")

    def scores(test_error):
        return {"val_error": test_error - 1, "test_error": test_error, "val_nll": 0.4, "test_nll": 0.45}

    records = []
    for seed, single in enumerate((11.8, 11.9, 12.0)):
        defaults = {**scores(single - 0.5), "last_weights": scores(single)}  # 0.5 points, spread 0.2: met
        tuned = {**scores(single + 0.05), "last_weights": scores(single + 0.3)}  # a loss: not met
        for method, result in (("swa_defaults", defaults), ("swa_1x", tuned)):
            records.append(
                {"method": method, "seed": seed, "seconds": 1.0, "loadavg": None, "result": result}
            )
    (tmp_path / "toy.runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert (
        bench.main(["--aggregate-only", "--out", str(tmp_path), "--name", "toy", "--seeds", "0", "1", "2"])
        == 0
    )
    report = (tmp_path / "toy.md").read_text()
    single_row = next(line for line in report.splitlines() if line.startswith(f"| {bench.SINGLE}"))
    assert bench.DERIVED in single_row and "| 11.90 ± 0.10 |" in single_row, single_row
    assert "the same run's last weights (before averaging: the single model's recipe)" not in report
    verdicts = dict(re.findall(r"^- (SWA, [^(]+?) \(.*?\*\*(MET|NOT MET)\*\*", report, re.M))
    assert verdicts == {"SWA, library defaults": "MET", "SWA, tuned, same budget": "NOT MET"}, report
    assert "test error gain +0.50 points" in report and "test error gain -0.05 points" in report


def test_swa_recipes_rates_and_pairing(tmp_path):
    """swa_recipes.py: each recipe's rate is the documented function of the step, bad names are refused, and
    two recipes that differ only in when they average share their run (the pairing the report relies on)."""
    pytest.importorskip("sklearn")
    bench = _load_benchmark("swa_recipes")
    spe, epochs, start = 10, 4, 3
    rate = bench.learning_rate(bench.parse_recipe("lin0.05-0.001"), epochs, spe, start)
    at = {step: float(keras.ops.convert_to_numpy(rate(step))) for step in (0, 19, 20, 29, 30, 35, 39)}
    assert at[0] == at[19] == pytest.approx(0.1) and at[20] == at[29] == pytest.approx(0.01)
    assert (
        at[30] == pytest.approx(0.05) and at[35] == pytest.approx(0.0255) and at[39] == pytest.approx(0.0059)
    )
    cosine = bench.learning_rate(bench.parse_recipe("cos0.02-0"), epochs, spe, start)
    assert float(keras.ops.convert_to_numpy(cosine(35))) == pytest.approx(0.01, abs=1e-7)
    constant = bench.learning_rate(bench.parse_recipe("const0.003_k5_s2"), epochs, spe, 2)
    assert [float(keras.ops.convert_to_numpy(constant(s))) for s in (19, 20, 39)] == pytest.approx(
        [0.1, 0.003, 0.003]
    )
    assert bench.parse_recipe("const0.003_k5_s2") == {
        "kind": "const", "rate": 0.003, "high": None, "low": None, "every": 5, "start": 2,
    }  # fmt: skip
    for bad in ("swa", "const", "defaults_s3", "lin0.1"):
        with pytest.raises(SystemExit):
            bench.parse_args(["--recipes", bad])
    data_args = [
        "--dataset",
        "digits",
        "--train-size",
        "192",
        "--epochs",
        "2",
        "--width",
        "2",
        "--seeds",
        "0",
        "--out",
        str(tmp_path),
    ]
    assert bench.main([*data_args, "--recipes", "defaults", "defaults_k1", "--name", "toy"]) == 0
    runs = [json.loads(line)["result"] for line in (tmp_path / "toy.runs.jsonl").read_text().splitlines()]
    assert runs[0]["last_weights"] == runs[1]["last_weights"]  # one run until train end: the single model
    assert (runs[0]["averaged_points"], runs[1]["averaged_points"]) == (1, 3)  # epoch 1's end; its 3 steps
    report = (tmp_path / "toy.md").read_text()
    assert "| single model (= the defaults run's last weights) |" in report and "`defaults_k1`" in report
