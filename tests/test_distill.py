"""distill: a student trained on the snapshot ensemble's probabilities, with and without labels, on real digits."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from conftest import make_digits_model

import keras_snapshot
from keras_snapshot import build_ensemble
from keras_snapshot.distillation import distill, soften


def predict(model, x):
    return keras.ops.convert_to_numpy(model(x, training=False)).astype("float64")


def kl(teacher, student):
    """Mean KL(teacher || student) over rows (T = 1)."""
    t = np.clip(teacher, 1e-7, 1)
    return float(np.mean(np.sum(t * (np.log(t) - np.log(np.clip(student, 1e-7, 1))), axis=-1)))


@pytest.fixture(scope="module")
def teacher(digits_run, digits):
    """(snapshot directory, the ensemble's probabilities on the training and on the test inputs)."""
    x, _, x_test, _ = digits
    ensemble = build_ensemble(digits_run[0])
    return digits_run[0], predict(ensemble, x), predict(ensemble, x_test)


def test_unlabeled_student_approaches_the_teacher(teacher, digits):
    directory, p_train, p_test = teacher
    x, _, x_test, _ = digits
    student = make_digits_model(seed=7)  # compiled with SGD: distill keeps its optimizer
    before = kl(p_train, predict(student, x))
    returned = distill(directory, x, student=student, epochs=4, temperature=2.0, verbose=0)
    assert returned is student
    after = kl(p_train, predict(student, x))
    agreement = float(np.mean(predict(student, x_test).argmax(-1) == p_test.argmax(-1)))
    print(f"KL to the teacher on x: {before:.3f} -> {after:.3f}; held-out top-1 agreement {agreement:.3f}")
    assert after < 0.5 * before
    assert agreement > 0.8  # chance: 0.1
    history = student.history.history
    assert set(history) >= {"loss", "teacher_agreement"} and history["loss"][-1] < history["loss"][0]


def test_default_student_with_labels(teacher, digits, tmp_path):
    directory, _, p_test = teacher
    x, y, x_test, y_test = digits
    snapshots = tmp_path / "student_snapshots"
    student = distill(
        directory,
        x,
        y=y,
        alpha=0.3,
        validation_data=(x_test, y_test),
        epochs=4,
        optimizer=keras.optimizers.Adam(0.01),
        callbacks=[keras_snapshot.SnapshotCallback(snapshots, cycles=2, initial_learning_rate=0.01)],
        verbose=0,
    )
    # A fresh copy of one member: one member's cost.
    member = keras.saving.load_model(directory / "snapshot-01.keras", compile=False)
    assert student.count_params() == member.count_params()
    assert set(student.history.history) >= {"val_loss", "val_teacher_agreement"}
    _, accuracy = student.evaluate(x_test, y_test, verbose=0)  # re-compiled: sparse CE + accuracy
    agreement = float(np.mean(predict(student, x_test).argmax(-1) == p_test.argmax(-1)))
    print(f"labelled student: test accuracy {accuracy:.3f}, agreement {agreement:.3f}")
    assert accuracy > 0.75 and agreement > 0.75  # chance: 0.1
    # Callbacks ran on the student: SnapshotCallback wrote its snapshots, which load as members do.
    assert sorted(p.name for p in snapshots.glob("*.keras")) == ["snapshot-01.keras", "snapshot-02.keras"]
    last = keras.saving.load_model(snapshots / "snapshot-02.keras", compile=False)
    np.testing.assert_allclose(predict(last, x_test[:8]), predict(student, x_test[:8]), atol=1e-5)


def test_student_reloads_without_keras_snapshot(teacher, digits, tmp_path):
    directory, _, _ = teacher
    x, y, x_test, _ = digits
    ensemble = build_ensemble(directory)  # a built ensemble as the teacher
    student = distill(ensemble, x[:512], y=y[:512], epochs=1, verbose=0)
    assert ensemble.name == "snapshot_ensemble"  # the teacher keeps its name
    path = tmp_path / "student.keras"
    student.save(path)
    np.save(tmp_path / "x.npy", x_test[:16])
    np.save(tmp_path / "expected.npy", predict(student, x_test[:16]))
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["keras_snapshot"] = None  # any import of the package fails
        import keras, numpy as np
        model = keras.saving.load_model({str(path)!r})
        assert model.compiled and model.optimizer is not None
        got = keras.ops.convert_to_numpy(model(np.load({str(tmp_path / "x.npy")!r}), training=False))
        np.testing.assert_allclose(got, np.load({str(tmp_path / "expected.npy")!r}), atol=1e-5)
        print("reloaded", type(model.loss).__name__ if not isinstance(model.loss, str) else model.loss)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env={**os.environ}
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "reloaded" in proc.stdout


def test_logit_members_need_output_activation(digits, tmp_path):
    x = digits[0][:256]
    paths = []
    for seed in (1, 2):
        keras.utils.set_random_seed(seed)
        inputs = keras.Input((64,), name="pixels")
        model = keras.Model(inputs, keras.layers.Dense(10)(inputs))  # logits
        paths.append(tmp_path / f"m{seed}.keras")
        model.save(paths[-1])
    with pytest.raises(ValueError, match="output_activation='softmax'"):
        distill(paths, x, epochs=1, verbose=0)
    student = distill(paths, x, epochs=1, output_activation="softmax", verbose=0)
    np.testing.assert_allclose(predict(student, x[:8]).sum(-1), 1.0, atol=1e-5)


def test_soften_is_tempered_softmax():
    p = np.array([[0.7, 0.2, 0.1]])
    expected = np.exp(np.log(p) / 2) / np.exp(np.log(p) / 2).sum()
    np.testing.assert_allclose(soften(p, 2.0), expected)
    np.testing.assert_allclose(soften(np.array([[0.8]]), 1.0), [[0.2, 0.8]])


class _Batches(keras.utils.PyDataset):
    def __len__(self):
        return 1

    def __getitem__(self, index):
        return np.zeros((4, 64), "float32")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"temperature": 0.0}, ValueError, "temperature"),
        ({"alpha": 1.5}, ValueError, "alpha"),
        ({"epochs": 0}, ValueError, "epochs"),
        ({"x": np.zeros((8, 63), "float32")}, ValueError, "expects"),
        ({"x": _Batches()}, TypeError, "in-memory arrays"),
        ({"y": np.zeros(7, "int32")}, ValueError, "rows"),
        ({"y": np.full(8, 10)}, ValueError, "class indices"),
        ({"validation_data": np.zeros((4, 64), "float32"), "y": np.zeros(8, "int32")}, ValueError, "y_val"),
        ({"student": "student"}, TypeError, "student"),
        ({"last": 9}, ValueError, "last"),
    ],
)
def test_bad_arguments_fail_before_training(teacher, kwargs, error, match):
    directory = teacher[0]
    arguments = {"x": np.zeros((8, 64), "float32"), "epochs": 1, "verbose": 0, **kwargs}
    with pytest.raises(error, match=match):
        distill(directory, **arguments)


def test_fused_ensemble_needs_a_student(teacher):
    fused = build_ensemble(teacher[0], fuse=True)
    with pytest.raises(ValueError, match="fused ensemble"):
        distill(fused, np.zeros((8, 64), "float32"), verbose=0)


def test_student_with_other_outputs_refused(teacher):
    inputs = keras.Input((64,), name="pixels")
    student = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(inputs))
    with pytest.raises(ValueError, match="same classes"):
        distill(teacher[0], np.zeros((8, 64), "float32"), student=student, verbose=0)


# ---------------------------------------------------------------------------------------- the default recipe
def _rate(optimizer) -> float:
    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))


def test_default_recipe_is_the_teachers_optimizer_decayed_to_zero(teacher, digits):
    """No optional argument: the teacher's SGD (momentum 0.9, Nesterov) at the run's alpha0 (0.2, from the
    manifest, not the near-zero rate the snapshot files were saved at), cosine-decayed to ~0 by the last step;
    T = 1."""
    directory, _, _ = teacher
    x = digits[0][:640]
    manifest = keras_snapshot.read_manifest(directory)
    assert manifest["initial_learning_rate"] == 0.2
    student = distill(directory, x, epochs=3, verbose=0)  # 640 / 64 = 10 steps an epoch
    optimizer = student.optimizer
    assert isinstance(optimizer, keras.optimizers.SGD)
    config = optimizer.get_config()
    assert config["momentum"] == 0.9 and config["nesterov"] is True
    schedule = keras.optimizers.schedules.deserialize(config["learning_rate"])
    assert isinstance(schedule, keras.optimizers.schedules.CosineDecay)
    assert schedule.initial_learning_rate == pytest.approx(0.2) and schedule.decay_steps == 30
    assert int(keras.ops.convert_to_numpy(optimizer.iterations)) == 30
    assert float(keras.ops.convert_to_numpy(schedule(0))) == pytest.approx(0.2)
    assert float(keras.ops.convert_to_numpy(schedule(29))) < 0.2 * 0.01  # the last step's rate: ~0
    assert _rate(optimizer) == pytest.approx(0.0, abs=1e-7)  # after the run: zero
    import inspect

    parameters = inspect.signature(distill).parameters
    assert parameters["temperature"].default == 1.0 and parameters["alpha"].default == 0.5


def test_default_recipe_from_files_and_models(teacher, digits, tmp_path):
    directory, _, _ = teacher
    x = digits[0][:128]
    # Files of a snapshot directory: the manifest's alpha0 still.
    paths = sorted(directory.glob("snapshot-*.keras"))
    student = distill(paths, x, epochs=1, verbose=0)
    schedule = keras.optimizers.schedules.deserialize(student.optimizer.get_config()["learning_rate"])
    assert isinstance(student.optimizer, keras.optimizers.SGD)
    assert schedule.initial_learning_rate == pytest.approx(0.2)
    # An in-memory compiled model: its class and its compiled rate (Adam 3e-3 here), decayed over 2 steps.
    model = make_digits_model(seed=3)
    model.compile(keras.optimizers.Adam(3e-3, beta_1=0.8), "sparse_categorical_crossentropy")
    student = distill([model], x, epochs=1, verbose=0)
    config = student.optimizer.get_config()
    schedule = keras.optimizers.schedules.deserialize(config["learning_rate"])
    assert isinstance(student.optimizer, keras.optimizers.Adam) and config["beta_1"] == pytest.approx(0.8)
    assert schedule.initial_learning_rate == pytest.approx(3e-3) and schedule.decay_steps == 2
    # No optimizer to read (an ensemble from build_ensemble is not compiled): Adam 1e-3, decayed to zero.
    student = distill(build_ensemble(directory), x, epochs=2, verbose=0)
    schedule = keras.optimizers.schedules.deserialize(student.optimizer.get_config()["learning_rate"])
    assert isinstance(student.optimizer, keras.optimizers.Adam)
    assert schedule.initial_learning_rate == pytest.approx(1e-3) and schedule.decay_steps == 4
    assert _rate(student.optimizer) == pytest.approx(0.0, abs=1e-9)


def test_default_epochs_are_the_snapshot_runs(teacher, digits, snapshot_dir):
    """No `epochs`: as many as the snapshot run (the manifest's count), whose rate decays over all of them;
    10 when the teacher is in-memory models (no run to read) or the manifest has no count (0.2)."""
    directory, _, _ = teacher
    x = digits[0][:128]  # 2 steps an epoch
    epochs = keras_snapshot.read_manifest(directory)["epochs"]
    assert epochs == 6
    for source in (directory, sorted(directory.glob("snapshot-*.keras"))[-2:]):
        student = distill(source, x, verbose=0)
        assert len(student.history.history["loss"]) == epochs
        schedule = keras.optimizers.schedules.deserialize(student.optimizer.get_config()["learning_rate"])
        assert schedule.decay_steps == 2 * epochs
    members = [keras.saving.load_model(path, compile=False) for path in sorted(directory.glob("*.keras"))]
    student = distill(members, x, verbose=0)
    assert len(student.history.history["loss"]) == 10
    manifest = keras_snapshot.read_manifest(snapshot_dir)
    del manifest["epochs"]
    keras_snapshot.manifest.write_manifest(snapshot_dir, manifest)
    student = distill(snapshot_dir, x, verbose=0)
    assert len(student.history.history["loss"]) == 10
    assert keras_snapshot.distillation.FALLBACK_EPOCHS == 10


def test_every_default_stays_overridable(teacher, digits):
    directory, _, _ = teacher
    x = digits[0][:128]
    mine = keras.optimizers.RMSprop(0.005)
    student = distill(directory, x, epochs=1, optimizer=mine, verbose=0)
    assert student.optimizer is mine and _rate(mine) == pytest.approx(
        0.005
    )  # used as given: no schedule added
    student = distill(directory, x, epochs=1, optimizer="adam", verbose=0)
    assert isinstance(student.optimizer, keras.optimizers.Adam) and _rate(student.optimizer) == pytest.approx(
        1e-3
    )


def test_labels_are_used_when_given(teacher, digits):
    """With `y`, the default loss mixes in the labels (alpha 0.5): labels that contradict the teacher pull the
    student towards them; without `y` nothing does."""
    directory, p_train, _ = teacher
    x = digits[0][:640]
    wrong = (p_train[:640].argmax(-1) + 1) % 10  # every label a class the teacher does not pick
    keras.utils.set_random_seed(5)
    without = distill(directory, x, epochs=4, verbose=0)
    keras.utils.set_random_seed(5)
    with_labels = distill(directory, x, y=wrong, epochs=4, verbose=0)
    rows = np.arange(640)
    mass_without = float(np.mean(predict(without, x)[rows, wrong]))
    mass_with = float(np.mean(predict(with_labels, x)[rows, wrong]))
    print(f"mean probability of the given labels: without y {mass_without:.3f}, with y {mass_with:.3f}")
    assert mass_with > mass_without + 0.1
