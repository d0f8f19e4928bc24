"""The `keras-snapshot` command line, run as real subprocesses on the snapshots of a real training run.

Each sub-command's happy path and the start-up (`--help`: fast, quiet, no Keras) run in real
processes; the many user-error variants then run through `main()` in this process, which is the
same code without the start-up cost. Internal errors are real exceptions (a KeyError, a ValueError
raised by Keras itself) thrown by a stand-in for one of our functions, monkeypatched in-process.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest
from test_export import run_tf_serving_loader

from keras_snapshot import build_ensemble, read_manifest
from keras_snapshot.cli import main

BACKEND = keras.backend.backend()
TOLERANCE = 1e-5
# TensorFlow's C++ log lines (I0000 00:00:... file.cc:227] ...) and absl's start-up warning.
TF_NOISE = re.compile(r"^[IWEF]\d{4} |absl::InitializeLog|cpu_feature_guard|oneDNN custom operations")


def quiet_env(onednn: str | None = "1") -> dict[str, str]:
    """The environment of a CLI process: no TF_CPP_MIN_LOG_LEVEL (keeping quiet is the CLI's job) and
    TF_ENABLE_ONEDNN_OPTS=1 by default, which makes TensorFlow print its oneDNN start-up lines on any
    CPU, as it does by default on CPUs with AVX-512 VNNI/BF16 (None: unset, TensorFlow decides)."""
    drop = ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")
    env = {key: value for key, value in os.environ.items() if key not in drop}
    if onednn is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = onednn
    return {**env, "CUDA_VISIBLE_DEVICES": ""}


def run_cli(*args, cwd: Path, script: bool = False, onednn: str | None = "1") -> subprocess.CompletedProcess:
    """The CLI in a fresh process (environment: `quiet_env`)."""
    installed = Path(sys.executable).with_name("keras-snapshot")
    command = (
        [str(installed)] if script and installed.exists() else [sys.executable, "-m", "keras_snapshot.cli"]
    )
    return subprocess.run(
        [*command, *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=quiet_env(onednn),
        timeout=300,
    )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("keras-snapshot: error:")]


def assert_quiet(stderr: str) -> None:
    """Only the CLI's own lines (`keras-snapshot: ...`) on stderr, no TensorFlow start-up noise."""
    noise = [line for line in stderr.splitlines() if TF_NOISE.search(line)]
    assert not noise, noise
    foreign = [line for line in stderr.splitlines() if not line.startswith("keras-snapshot: ")]
    assert not foreign, foreign


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


def table(stdout: str, first: str = "model") -> tuple[list[str], dict[str, dict[str, str]]]:
    """(header, {row name: {column: cell}}) of the table whose header starts with `first`."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == [first])
    header = lines[start].split()
    rows = {}
    for cells in (line.split() for line in lines[start + 1 :]):
        if not cells:
            break
        width = len(cells) - len(header) + 1  # a name of several words
        rows[" ".join(cells[:width])] = dict(zip(header[1:], cells[width:], strict=True))
    return header, rows


def call(model, x):
    return keras.ops.convert_to_numpy(model(x, training=False))


@pytest.fixture()
def npz(digits, tmp_path):
    """train.npz (1400 rows), val.npz and test.npz (the 397 test rows split), arrays pixels/labels."""
    x, y, x_test, y_test = digits
    paths = {
        "train": (x, y),
        "val": (x_test[:200], y_test[:200]),
        "test": (x_test[200:], y_test[200:]),
    }
    for name, (inputs, labels) in paths.items():
        np.savez(tmp_path / f"{name}.npz", pixels=inputs, labels=labels)
    return {name: tmp_path / f"{name}.npz" for name in paths}


# --------------------------------------------------------------------------- start-up
def test_help_is_fast_quiet_and_imports_no_keras(tmp_path):
    probe = (
        "import sys, time\n"
        "start = time.perf_counter()\n"
        # What the `keras-snapshot` console script is when it imports the package; a plain
        # `import keras_snapshot` in a program registers its Keras classes, so imports Keras.
        "sys.argv[0] = '/usr/local/bin/keras-snapshot'\n"
        "from keras_snapshot.cli import main\n"
        "for argv in (['--help'], ['evaluate', '--help'], ['distill', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as exit:\n"
        "        assert exit.code == 0, exit.code\n"
        "heavy = [m for m in ('keras', 'tensorflow', 'jax', 'torch', 'numpy') if m in sys.modules]\n"
        "print('HEAVY', heavy, 'SECONDS', time.perf_counter() - start)\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
    probed = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
    )
    assert probed.returncode == 0, probed.stderr[-2000:]
    assert "HEAVY [] SECONDS" in probed.stdout, probed.stdout[-500:]  # nothing heavy imported

    # Fast because nothing heavy is imported (checked above), not timed: a loaded machine may take
    # any time, and a test must not depend on that.
    result = run_cli("--help", cwd=tmp_path, script=True)  # the installed console script
    assert result.returncode == 0 and result.stderr == "", result.stderr[-2000:]
    assert "evaluate" in result.stdout and "distill" in result.stdout and "average" in result.stdout


STARTUP_NOISE = (
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
    "I0000 00:00:1796324666.473680    4435 port.cc:153] oneDNN custom operations are on. You may see "
    "slightly different numerical results due to floating-point round-off errors from different "
    "computation orders. To turn them off, set the environment variable `TF_ENABLE_ONEDNN_OPTS=0`.\n"
    "W0000 00:00:1796324641.321790    4421 port.cc:148] TF_ENABLE_ONEDNN_OPTS is not set to either '0', "
    "'false', '1', or 'true'. Using the default setting: false\n"
    "I0000 00:00:1796324555.678884    2363 cpu_feature_guard.cc:227] This TensorFlow binary is optimized "
    "to use available CPU instructions in performance-critical operations.\n"
    "To enable the following instructions: AVX2 FMA, in other operations, rebuild TensorFlow with the "
    "appropriate compiler flags.\n"
)


def test_startup_filter_drops_only_known_noise(capfd):
    """What TensorFlow 2.21 prints at import is dropped; any other line written to file descriptor 2
    meanwhile (a real error) is replayed after the block, in order."""
    from keras_snapshot.cli import _startup_noise_filtered

    real = ["E0000 00:00:1796324666.5    4435 cuda_dnn.cc:8] a real error\n", "Traceback: not noise\n"]
    with _startup_noise_filtered():
        os.write(2, (STARTUP_NOISE + real[0] + STARTUP_NOISE + real[1]).encode())
    os.write(2, b"after\n")
    assert capfd.readouterr().err == real[0] + real[1] + "after\n"


@pytest.mark.skipif(BACKEND != "tensorflow", reason="a TensorFlow import in a subprocess: run it once")
@pytest.mark.parametrize("onednn", ["1", None, "0", ""])
def test_tensorflow_import_is_quiet_on_every_cpu(onednn, tmp_path):
    """TensorFlow's real start-up lines, forced with TF_ENABLE_ONEDNN_OPTS=1 on any CPU (the default on
    AVX-512 VNNI/BF16 CPUs), unset (TensorFlow decides by the CPU) and invalid: none reach stderr when
    the CLI imports Keras; without the CLI's filter the forced lines are there (so this test can fail)."""
    env = {**quiet_env(onednn), "KERAS_BACKEND": "tensorflow"}
    probe = (  # what `keras-snapshot build ...` does before it loads anything
        "import sys; sys.argv[0] = 'keras-snapshot'\n"
        "from keras_snapshot.cli import _import_keras, _quiet_startup\n"
        "_quiet_startup(); _import_keras()\n"
    )
    quiet = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert quiet.stderr == ""
    if onednn == "1":
        bare = subprocess.run(
            [sys.executable, "-c", "import tensorflow"],
            capture_output=True,
            text=True,
            env={**env, "TF_CPP_MIN_LOG_LEVEL": "2"},
            cwd=tmp_path,
            timeout=300,
        )
        assert "oneDNN custom operations are on" in bare.stderr, bare.stderr[-2000:]


# --------------------------------------------------------------------------- each sub-command
def test_info(digits_run, tmp_path):
    directory, _ = digits_run
    result = run_cli("info", directory, cwd=tmp_path, script=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr == ""
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
    assert_quiet(built.stderr)
    assert "snapshot_02, snapshot_03" in built.stdout
    ensemble = keras.saving.load_model(tmp_path / "ensemble.keras")  # plain Keras
    members = [keras.saving.load_model(directory / f"snapshot-0{c}.keras", compile=False) for c in (2, 3)]
    expected = np.mean([call(member, x) for member in members], axis=0)
    np.testing.assert_allclose(call(ensemble, x), expected, atol=TOLERANCE)

    exported = run_cli("export", "ensemble.keras", "serving/digits", "--version", "4", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert_quiet(exported.stderr)
    version = tmp_path / "serving" / "digits" / "4"
    assert (version / "saved_model.pb").is_file()
    assert sorted(p.name for p in version.parent.iterdir()) == ["4"]
    if BACKEND == "torch":
        # torch cannot write a SavedModel: the command ran itself again under TensorFlow. Check that
        # result the way TF Serving loads it (test_export covers the other backends).
        assert "exporting with the TensorFlow backend" in exported.stderr
        (served,) = run_tf_serving_loader(tmp_path, [(version, {"pixels": x})])
        np.testing.assert_allclose(served["predictions"], expected, atol=TOLERANCE)


def test_evaluate_with_temperature(digits_run, digits, npz, tmp_path):
    directory, _ = digits_run
    result = run_cli(
        "evaluate", directory, "--data", npz["test"], "--x", "pixels", "--y", "labels",
        "--temperature", "fit", "--validation-data", npz["val"], "--bins", "10",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert_quiet(result.stderr)
    assert result.stdout.splitlines()[0].startswith(f"{npz['test']}: 197 examples, 3 snapshots")
    header, rows = table(result.stdout)
    assert {"error", "nll", "brier", "ece", "nll_ts", "ece_ts", "brier_ts", "error_ts"} <= set(header)
    names = ["snapshot_01", "snapshot_02", "snapshot_03"] + [f"ensemble of last {m}" for m in (1, 2, 3)]
    assert set(names) <= set(rows)
    assert rows["ensemble of last 1"]["nll"] == rows["snapshot_03"]["nll"]
    x_test, y_test = digits[2][200:], digits[3][200:]
    for m in (2, 3):
        probabilities = call(build_ensemble(directory, last=m), x_test).astype("float64")
        error = np.mean(probabilities.argmax(-1) != y_test)
        nll = -np.mean(np.log(np.clip(probabilities[np.arange(len(y_test)), y_test], 1e-12, None)))
        assert float(rows[f"ensemble of last {m}"]["error"]) == pytest.approx(error, abs=1e-4)
        assert float(rows[f"ensemble of last {m}"]["nll"]) == pytest.approx(nll, abs=2e-4)
        # A temperature fitted on validation data is never far off on the test set.
        assert float(rows[f"ensemble of last {m}"]["nll_ts"]) < nll + 0.05


def test_evaluate_last_keeps_snapshot_names(capsys, digits_run, npz):
    status, out, err = run_main(
        capsys, "evaluate", digits_run[0], "--data", npz["test"], "--x", "pixels", "--y", "labels",
        "--last", "2", "--temperature", "1.5",
    )  # fmt: skip
    assert status == 0, err
    header, rows = table(out)
    assert set(rows) == {"snapshot_02", "snapshot_03", "ensemble of last 1", "ensemble of last 2"}
    assert "nll_ts" in header
    assert rows["ensemble of last 1"]["nll"] == rows["snapshot_03"]["nll"]


def test_distill(digits_run, digits, npz, tmp_path):
    directory, _ = digits_run
    assert read_manifest(directory)["epochs"] == 6
    result = run_cli(
        "distill", directory, "--data", npz["train"], "--x", "pixels", "-o", "student.keras",
        "--batch-size", "32",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert_quiet(result.stderr)
    assert "Wrote student.keras: a student distilled from 3 snapshot(s)" in result.stdout
    assert "in 6 epoch(s)" in result.stdout  # no --epochs: the snapshot run's 6, from its manifest
    student = keras.saving.load_model(tmp_path / "student.keras")  # plain Keras
    assert not list(tmp_path.glob(".*student*"))  # written atomically, no temporary left
    x_test = digits[2]
    teacher = call(build_ensemble(directory), x_test)
    agreement = np.mean(call(student, x_test).argmax(-1) == teacher.argmax(-1))
    assert agreement > 0.5, agreement  # chance is 0.1


def test_average(digits_run, digits, npz, tmp_path):
    directory, _ = digits_run
    result = run_cli(
        "average", directory, "--bn-data", npz["train"], "--x", "pixels", "--y", "labels",
        "--validation-data", npz["val"], "-o", "averaged.keras",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert_quiet(result.stderr)
    # Warnings (an AveragingWarning when averaging loses) are one line each.
    for line in result.stderr.splitlines():
        assert line.startswith("keras-snapshot: "), result.stderr
    assert "Wrote averaged.keras: the weight average of 3 snapshot(s)" in result.stdout
    header, rows = table(result.stdout)
    assert header == ["model", "nll", "error"]
    assert {"weight average", "ensemble of 3"} <= set(rows)
    assert any(name.startswith("best member (snapshot_0") for name in rows)
    averaged = keras.saving.load_model(tmp_path / "averaged.keras", compile=False)
    members = [keras.saving.load_model(path, compile=False) for path in sorted(directory.glob("*.keras"))]
    for index, weights in enumerate(averaged.get_weights()):
        expected = np.mean([member.get_weights()[index] for member in members], axis=0)
        np.testing.assert_allclose(weights, expected, atol=1e-6)


# --------------------------------------------------------------------------- errors in real processes
def test_user_error_is_one_line_without_traceback(tmp_path):
    result = run_cli("build", tmp_path / "no-such-dir", "-o", "e.keras", cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    (line,) = error_lines(result.stderr)
    assert "no-such-dir" in line and "does not exist" in line
    assert result.stderr.splitlines() == [line]


# --------------------------------------------------------------------------- internal errors: tracebacks
def run_main(capsys, *args) -> tuple[int, str, str]:
    status = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _raise_key_error(*args, **kwargs):
    raise KeyError("cycle")  # a bug: the kind of exception no input check raises


def _raise_from_keras(*args, **kwargs):
    keras.layers.Dense(units=-1)  # Keras itself raises this ValueError


def _raise_value_error_outside_the_package(*args, **kwargs):
    raise ValueError("not raised by one of keras_snapshot's checks")


@pytest.mark.parametrize(
    ("stand_in", "kind"),
    [
        (_raise_key_error, "KeyError"),
        (_raise_from_keras, "ValueError"),
        (_raise_value_error_outside_the_package, "ValueError"),
    ],
)
def test_unexpected_errors_show_the_traceback(capsys, monkeypatch, digits_run, tmp_path, stand_in, kind):
    import keras_snapshot.ensemble

    monkeypatch.setattr(keras_snapshot.ensemble, "build_ensemble", stand_in)
    status, _, err = run_main(capsys, "build", digits_run[0], "-o", tmp_path / "e.keras")
    assert status == 1
    assert err.startswith("Traceback (most recent call last):"), err
    assert stand_in.__name__ in err  # the frame that raised
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"keras-snapshot: internal error: {kind}:") and "please report it" in last
    assert not (tmp_path / "e.keras").exists()


def test_traceback_flag_shows_user_errors_in_full(capsys, tmp_path):
    (tmp_path / "notes.keras").write_text("not a model")
    for argv in (
        ["--traceback", "export", tmp_path / "notes.keras", tmp_path / "serving"],
        ["export", tmp_path / "notes.keras", tmp_path / "serving", "--traceback"],
    ):
        status, _, err = run_main(capsys, *argv)
        assert status == 1
        assert err.startswith("Traceback (most recent call last):") and "members.py" in err
        assert err.strip().splitlines()[-1].startswith("keras-snapshot: error: Could not load model")
    status, _, err = run_main(capsys, "export", tmp_path / "notes.keras", tmp_path / "serving")
    assert status == 1 and "Traceback" not in err and len(err.splitlines()) == 1


def test_user_errors_raised_by_the_library_stay_one_line(capsys, snapshot_dir, tmp_path):
    """A ValueError from one of the library's own checks (here: a manifest entry that leaves the
    directory, caught by the manifest reader) is the user's, without a traceback."""
    manifest = json.loads((snapshot_dir / "manifest.json").read_text())
    manifest["snapshots"][0]["file"] = "../outside.keras"
    (snapshot_dir / "manifest.json").write_text(json.dumps(manifest))
    status, _, err = run_main(capsys, "build", snapshot_dir, "-o", tmp_path / "e.keras")
    assert status == 1 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert "outside.keras" in err


# --------------------------------------------------------------------------- load errors say the cause
def rewrite_keras_file(source: Path, target: Path, edit) -> Path:
    """A copy of a real .keras zip with config.json and metadata.json edited by `edit(name, dict)`."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for item in old.infolist():
            data = old.read(item.filename)
            if item.filename in ("config.json", "metadata.json"):
                data = json.dumps(edit(item.filename, json.loads(data)))
            new.writestr(item, data)
    return target


def dense_layers(config: dict) -> list[dict]:
    return [layer for layer in config["config"]["layers"] if layer["class_name"] == "Dense"]


def custom_layer(name: str, content: dict) -> dict:
    if name == "config.json":
        layer = dense_layers(content)[0]
        layer.update(class_name="SnapDense", module="acme.layers", registered_name="acme>SnapDense")
    return content


def future_keras(name: str, content: dict) -> dict:
    if name == "metadata.json":
        content["keras_version"] = "3.99.0"
    else:
        dense_layers(content)[0]["config"]["hyper_sparsity"] = 0.5  # an option of a later Keras
    return content


def test_load_errors_name_their_cause(capsys, digits_run, tmp_path):
    source = digits_run[0] / "snapshot-01.keras"
    (tmp_path / "picture.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    (tmp_path / "notes.keras").write_text("these are notes, not a model\n")
    lambda_model = keras.Sequential([keras.Input((64,)), keras.layers.Lambda(lambda t: t * 2.0)])
    lambda_model.save(tmp_path / "lambda.keras")
    rewrite_keras_file(source, tmp_path / "custom.keras", custom_layer)
    rewrite_keras_file(source, tmp_path / "future.keras", future_keras)
    (tmp_path / "a-directory").mkdir()
    expected = {
        "missing.keras": ["does not exist"],
        "a-directory": ["is a directory; pass the .keras file (e.g. from keras-snapshot build)"],
        "picture.png": ["not a .keras file", "looks like a PNG image"],
        "notes.keras": ["not a .keras file", "looks like a text file"],
        "custom.keras": ["uses the custom class 'SnapDense'", "registered as 'acme>SnapDense'"],
        "lambda.keras": [
            "Refusing to load",
            "in safe mode",
            "Lambda",
            "Pass --unsafe only for files you trust",
        ],
        "future.keras": [
            f"saved by Keras 3.99.0, this is Keras {keras.__version__}",
            "hyper_sparsity",
            "incompatible Keras",
        ],
    }
    for name, fragments in expected.items():
        status, _, err = run_main(capsys, "export", tmp_path / name, tmp_path / "serving")
        assert status == 1, name
        assert len(err.splitlines()) == 1 and "Traceback" not in err, (name, err)
        for fragment in fragments:
            assert fragment in err, (name, fragment, err)
        assert "TFSMLayer" not in err
    assert not (tmp_path / "serving").exists()


# --------------------------------------------------------------------------- user errors, in-process
def test_info_errors_and_an_empty_run(capsys, tmp_path):
    status, _, err = run_main(capsys, "info", tmp_path / "absent")
    assert status == 1 and "does not exist" in err
    (tmp_path / "file").write_text("")
    status, _, err = run_main(capsys, "info", tmp_path / "file")
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


def test_build_with_an_abstain_output(capsys, digits_run, digits, tmp_path):
    """--abstain-coverage: the served decision keeps the asked fraction of the validation inputs,
    read from a file without labels; the scores offered are build_ensemble's."""
    from keras_snapshot import cli, ensemble

    assert cli.ABSTAIN_SCORES == ensemble.ABSTAIN_SCORES
    directory, _ = digits_run
    x_val = digits[2][:200]
    np.savez(tmp_path / "val.npz", x=x_val)  # inputs only
    output = tmp_path / "abstain.keras"
    status, out, err = run_main(
        capsys,
        "build",
        directory,
        "-o",
        output,
        "--abstain-coverage",
        "0.8",
        "--abstain-score",
        "max_probability",
        "--validation-data",
        tmp_path / "val.npz",
    )
    assert status == 0, err
    assert "output 'abstain' = 1 where max_probability >" in out and "keeps 80%" in out
    served = keras.saving.load_model(output)
    outputs = served.predict(x_val, verbose=0)
    assert set(outputs) == {"predictions", "abstain"}
    assert abs(float(np.mean(outputs["abstain"] == 0.0)) - 0.8) <= 1 / len(x_val)
    members = [keras.saving.load_model(path, compile=False) for path in sorted(directory.glob("*.keras"))]
    mean = np.mean([call(member, x_val) for member in members], axis=0)
    np.testing.assert_allclose(outputs["predictions"], mean, atol=TOLERANCE)
    threshold = float(out.split("max_probability > ")[1].split()[0])
    np.testing.assert_array_equal(outputs["abstain"], (1.0 - mean.max(axis=1) > threshold).astype("float32"))

    status, _, err = run_main(capsys, "build", directory, "-o", output, "--abstain-coverage", "0.8")
    assert status == 1 and "--abstain-coverage 0.8 needs --validation-data val.npz" in err
    status, _, err = run_main(capsys, "build", directory, "-o", output, "--abstain-score", "entropy")
    assert status == 1 and "--abstain-score is used only with --abstain-coverage" in err
    status, _, err = run_main(
        capsys,
        "build",
        directory,
        "-o",
        output,
        "--abstain-coverage",
        "0",
        "--validation-data",
        tmp_path / "val.npz",
    )
    assert status == 1 and "must be above 0" in err


def test_build_errors(capsys, snapshot_dir, tmp_path):
    status, _, err = run_main(capsys, "build", snapshot_dir, "-o", tmp_path / "e.keras", "--last", "9")
    assert status == 1 and "--last 9 is out of range" in err and "--last 1 to 3" in err
    assert "last=" not in err
    status, _, err = run_main(capsys, "build", snapshot_dir, "-o", tmp_path / "e.h5")
    assert status == 1 and "must end in .keras" in err
    status, _, err = run_main(capsys, "build", snapshot_dir, "-o", tmp_path / "no" / "e.keras")
    assert status == 1 and "does not exist" in err
    status, _, err = run_main(
        capsys, "build", snapshot_dir, "-o", tmp_path / "e.keras", "--output-activation", "softmaxx"
    )
    assert status == 1 and "--output-activation 'softmaxx' is not a Keras activation" in err
    (snapshot_dir / "snapshot-02.keras").write_bytes(b"garbage")
    status, _, err = run_main(capsys, "build", snapshot_dir, "-o", tmp_path / "e.keras")
    assert status == 1 and "snapshot-02.keras" in err and len(err.splitlines()) == 1
    assert "looks like a text file" in err
    assert not (tmp_path / "e.keras").exists()


def test_export_errors(capsys, digits_run, tmp_path):
    (tmp_path / "serving" / "digits" / "3").mkdir(parents=True)
    model = digits_run[0] / "snapshot-01.keras"
    status, _, err = run_main(capsys, "export", model, tmp_path / "serving" / "digits", "--version", "3")
    assert status == 1 and "Version 3 already exists" in err
    assert "--overwrite" in err and "--version" in err and "overwrite=True" not in err
    (tmp_path / "a-file").write_text("")
    status, _, err = run_main(capsys, "export", model, tmp_path / "a-file")
    assert status == 1 and "exists and is not a directory" in err


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


def test_option_errors_speak_in_options(capsys, digits_run, npz, tmp_path):
    directory = digits_run[0]
    test, train = (["--x", "pixels", "--data", npz[name]] for name in ("test", "train"))
    cases = [
        (["evaluate", directory, *test, "--temperature", "fit"], "--temperature fit needs --validation-data"),
        (["evaluate", directory, *test, "--last", "4"], "--last 4 is out of range"),
        (["evaluate", directory, *test, "--validation-data", npz["val"]], "only with --temperature fit"),
        (["distill", directory, *train, "-o", tmp_path / "s.h5"], "must end in .keras"),
        (["distill", directory, "--data", tmp_path / "absent.npz", "-o", tmp_path / "s.keras"], "(--data) does not exist"),
        (["distill", directory, *train, "-o", tmp_path / "s.keras", "--y", "nope"], "has no array 'nope'"),
        (["average", directory, "--bn-data", tmp_path / "absent.npz", "-o", tmp_path / "a.keras"], "(--bn-data) does not exist"),
        (["average", directory, "-o", tmp_path / "a.keras", "--x", "pixels", "--validation-data", npz["val"], "--y", "nope"], "has no array 'nope'"),
    ]  # fmt: skip
    for argv, message in cases:
        status, _, err = run_main(capsys, *argv)
        assert status == 1, argv
        assert message in err and len(err.splitlines()) == 1, (argv, err)
        assert not re.search(r"\b(last|temperature|validation_data|bn_data)=", err), err
    assert not list(tmp_path.glob("*.keras"))


def test_command_line_syntax_errors_exit_2(capsys, tmp_path):
    for args in (
        ["build", tmp_path],
        ["build", tmp_path, "-o", "e.keras", "--last", "0"],
        ["evaluate", tmp_path, "--data", "t.npz", "--temperature", "-1"],
        ["distill", tmp_path, "--data", "t.npz", "-o", "s.keras", "--alpha", "2"],
        ["frobnicate"],
        [],
    ):
        with pytest.raises(SystemExit) as raised:
            main([str(a) for a in args])
        assert raised.value.code == 2
    capsys.readouterr()


def test_library_messages_are_put_in_option_terms():
    from keras_snapshot.cli import _cli_terms
    from keras_snapshot.members import check_last

    with pytest.raises(ValueError) as raised:
        check_last(9, 3, "'snapshots'")
    assert _cli_terms(str(raised.value)) == (
        "--last 9 is out of range: 'snapshots' holds 3 snapshot(s). Pass 1 <= --last <= 3, or no --last "
        "for all of them."
    )
    assert _cli_terms("Pass another version, version=None for the next free one, or overwrite=True.") == (
        "Pass another version, no --version for the next free one, or --overwrite."
    )
    assert _cli_terms("pass output_activation='softmax' when") == "pass --output-activation softmax when"
    assert (
        _cli_terms("Pass safe_mode=False only for files you trust.")
        == "Pass --unsafe only for files you trust."
    )
    assert _cli_terms("the last snapshot; keras_version=3.10") == "the last snapshot; keras_version=3.10"
