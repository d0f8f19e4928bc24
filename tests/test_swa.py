"""StochasticWeightAveraging: the mean of the recorded weights, the SWA rate, exact BatchNorm statistics,
resume after a crash at any point of an epoch end, and the refusals of ambiguous set-ups."""

from __future__ import annotations

import math
import warnings

import keras
import numpy as np
import pytest

import keras_snapshot
from keras_snapshot.averaging import AveragingWarning
from keras_snapshot.swa import STATE_NAME, StochasticWeightAveraging

STEPS = 8  # steps per epoch: 256 rows, batch 32


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 6)).astype("float32")
    y = (x[:, 0] + x[:, 1] * x[:, 2] > 0).astype("int32") + (x[:, 3] > 0.8).astype("int32")
    return x, y


def make_model(seed=0, batch_norm=True, rate=0.1):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((6,)), keras.layers.Dense(8, name="hidden")]
    if batch_norm:
        layers.append(keras.layers.BatchNormalization(name="norm"))
    layers += [keras.layers.ReLU(), keras.layers.Dense(3, activation="softmax", name="out")]
    model = keras.Sequential(layers)
    model.compile(keras.optimizers.SGD(rate, momentum=0.9), "sparse_categorical_crossentropy")
    return model


def float_weights(model):
    return [np.asarray(keras.ops.convert_to_numpy(w), dtype="float64") for w in model.weights]


class Probe(keras.callbacks.Callback):
    """Records the weights at every epoch end (or every step) and the rate of every batch."""

    def __init__(self, every_step=False):
        super().__init__()
        self.every_step = every_step
        self.epoch_weights, self.step_weights, self.rates = {}, {}, []

    def on_train_batch_begin(self, batch, logs=None):
        self.rates.append(float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)))

    def on_train_batch_end(self, batch, logs=None):
        if self.every_step:
            step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
            self.step_weights[step] = float_weights(self.model)

    def on_epoch_end(self, epoch, logs=None):
        self.epoch_weights[epoch] = float_weights(self.model)


def assert_mean_of(model, recorded, skip=()):
    expected = [np.mean(np.stack(arrays), axis=0) for arrays in zip(*recorded, strict=True)]
    for index, (got, want) in enumerate(zip(float_weights(model), expected, strict=True)):
        if index in skip:
            continue
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_final_weights_are_the_mean_of_the_epoch_end_weights(data):
    x, y = data
    model = make_model()
    probe = Probe()
    swa = StochasticWeightAveraging(start_epoch=0.5)  # epochs 3, 4, 5 of 6
    with pytest.warns(RuntimeWarning, match="BatchNormalization layers"):
        model.fit(x, y, batch_size=32, epochs=6, shuffle=False, verbose=0, callbacks=[swa, probe])
    assert swa.count == 3 and swa.steps == [4 * STEPS, 5 * STEPS, 6 * STEPS]
    # Every float weight, the BN statistics included (averaged, as the warning says), is the mean.
    assert_mean_of(model, [probe.epoch_weights[e] for e in (3, 4, 5)])
    assert not np.allclose(float_weights(model)[0], probe.epoch_weights[5][0])
    # No swa_learning_rate: the rate was never touched.
    np.testing.assert_allclose(probe.rates, 0.1, rtol=1e-6)


def test_every_k_steps(data):
    x, y = data
    model = make_model(batch_norm=False)
    probe = Probe(every_step=True)
    swa = StochasticWeightAveraging(start_epoch=2, average_every=3)
    model.fit(x, y, batch_size=32, epochs=4, shuffle=False, verbose=0, callbacks=[swa, probe])
    points = [2 * STEPS + 3 * k for k in range(1, 6)]  # 19, 22, ..., 31 (the run ends at step 32)
    assert swa.steps == points
    assert_mean_of(model, [probe.step_weights[s] for s in points])


@pytest.mark.parametrize("strategy", ["cos", "linear"])
def test_the_rate_anneals_to_the_swa_rate_and_stays(data, strategy):
    x, y = data
    model = make_model(batch_norm=False)
    probe = Probe()
    swa = StochasticWeightAveraging(
        start_epoch=2, swa_learning_rate=0.01, annealing_epochs=2, annealing_strategy=strategy
    )
    history = model.fit(x, y, batch_size=32, epochs=6, shuffle=False, verbose=0, callbacks=[swa, probe])
    rates = np.asarray(probe.rates).reshape(6, STEPS)
    half = 0.5  # (j + 1) / annealing_epochs for the phase's first epoch; cos and linear agree at 1/2
    middle = 0.01 * half + 0.1 * (1 - half)
    expected = [0.1, 0.1, middle, 0.01, 0.01, 0.01]
    for epoch, rate in enumerate(expected):
        np.testing.assert_allclose(rates[epoch], rate, rtol=1e-6)
    np.testing.assert_allclose(history.history["learning_rate"], expected, rtol=1e-6)
    assert swa.annealed_rate(0, 0.1) == pytest.approx(middle)
    three = StochasticWeightAveraging(swa_learning_rate=0.01, annealing_epochs=3, annealing_strategy=strategy)
    alpha = (1 - math.cos(math.pi / 3)) / 2 if strategy == "cos" else 1 / 3
    assert three.annealed_rate(0, 0.1) == pytest.approx(0.01 * alpha + 0.1 * (1 - alpha))
    assert three.annealed_rate(5, 0.1) == pytest.approx(0.01)
    # The rate each SGD step used: a plain SGD step moves a weight by -rate * gradient, and the mean
    # of the phase's points is what the model holds.
    assert_mean_of(model, [probe.epoch_weights[e] for e in range(2, 6)])


def test_batch_norm_statistics_are_recomputed_exactly_on_bn_data(data):
    x, y = data
    model = make_model()
    bn_data = x[:200]
    swa = StochasticWeightAveraging(start_epoch=2, bn_data=bn_data, batch_size=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "averaged, not recomputed" warning
        model.fit(x, y, batch_size=32, epochs=4, shuffle=False, verbose=0, callbacks=[swa])
    dense, norm = model.get_layer("hidden"), model.get_layer("norm")
    kernel, bias = (np.asarray(keras.ops.convert_to_numpy(w), dtype="float64") for w in dense.weights)
    hidden = bn_data.astype("float64") @ kernel + bias
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(norm.moving_mean), hidden.mean(axis=0), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(norm.moving_variance), hidden.var(axis=0), rtol=1e-4, atol=1e-6
    )


class Crash(keras.callbacks.Callback):
    """Raises once, at a given epoch end or at a given batch of an epoch."""

    def __init__(self, epoch, batch=None):
        super().__init__()
        self.epoch, self.batch = epoch, batch

    def on_train_batch_end(self, batch, logs=None):
        if self.batch is not None and self._epoch == self.epoch and batch == self.batch:
            raise KeyboardInterrupt("crash")

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if self.batch is None and epoch == self.epoch:
            raise KeyboardInterrupt("crash")


def run(x, y, tmp_path, order, crash=None, rate=0.02):
    """A 6-epoch run with the SWA phase from epoch 2, interrupted by `crash` and resumed."""
    initial = make_model()
    weights = initial.get_weights()

    def fit(callbacks):
        model = make_model()
        model.set_weights(weights)
        model.fit(x, y, batch_size=32, epochs=6, shuffle=False, verbose=0, callbacks=callbacks)
        return model

    def callbacks(with_crash):
        table = {
            "swa": StochasticWeightAveraging(
                start_epoch=2,
                swa_learning_rate=rate,
                annealing_epochs=2,
                bn_data=x,
                directory=tmp_path / "swa",
            ),
            "backup": keras.callbacks.BackupAndRestore(str(tmp_path / "backup")),
        }
        if with_crash:
            table["crash"] = crash
        return [table[name] for name in order if name in table]

    if crash is not None:
        with pytest.raises(KeyboardInterrupt):
            fit(callbacks(True))
        assert (tmp_path / "swa" / STATE_NAME).is_file()
    listed = callbacks(False)
    model = fit(listed)
    return model, next(c for c in listed if isinstance(c, StochasticWeightAveraging))


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    x, y = data
    return run(x, y, tmp_path_factory.mktemp("reference"), ["swa", "backup"])


@pytest.mark.parametrize(
    "order, crash",
    [
        # Mid-epoch of the SWA phase, after two points were averaged.
        (["backup", "swa", "crash"], ("batch", 4, 3)),
        # At an epoch end, after SWA wrote its point and before the backup: the point is redone.
        (["swa", "crash", "backup"], ("epoch", 3)),
        # At an epoch end, after the backup and before SWA's point: the restored weights are that point.
        (["backup", "crash", "swa"], ("epoch", 3)),
        # In the annealing, the phase's first epoch end.
        (["crash", "backup", "swa"], ("batch", 3, 0)),
    ],
    ids=["mid-epoch", "swa-then-crash-then-backup", "backup-then-crash-then-swa", "annealing"],
)
def test_crash_and_resume_gives_the_uninterrupted_average(data, uninterrupted, tmp_path, order, crash):
    x, y = data
    reference, ref_swa = uninterrupted
    crash_callback = Crash(crash[1], crash[2]) if crash[0] == "batch" else Crash(crash[1])
    resumed, swa = run(x, y, tmp_path / "resumed", order, crash_callback)
    assert swa.count == ref_swa.count == 4
    assert swa.steps == ref_swa.steps
    for got, want in zip(float_weights(resumed), float_weights(reference), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_works_next_to_snapshot_callback_which_owns_the_rate(data, tmp_path):
    x, y = data
    model = make_model(batch_norm=False)
    probe = Probe()
    snapshots = keras_snapshot.SnapshotCallback(tmp_path / "snapshots", cycles=2, initial_learning_rate=0.05)
    swa = StochasticWeightAveraging(start_epoch=0.5, directory=tmp_path / "swa", save_model=True)
    model.fit(x, y, batch_size=32, epochs=4, shuffle=False, verbose=0, callbacks=[snapshots, swa, probe])
    assert swa.count == 2
    assert_mean_of(model, [probe.epoch_weights[e] for e in (2, 3)])
    saved = keras.saving.load_model(tmp_path / "swa" / "swa.keras", compile=False)
    for got, want in zip(float_weights(saved), float_weights(model), strict=True):
        np.testing.assert_array_equal(got, want)
    # The rate stayed SnapshotCallback's cosine: the first step of each cycle at alpha0.
    assert probe.rates[0] == pytest.approx(0.05) and probe.rates[2 * STEPS] == pytest.approx(0.05)

    model = make_model(batch_norm=False)
    other = keras_snapshot.SnapshotCallback(tmp_path / "other", cycles=2, initial_learning_rate=0.05)
    with pytest.raises(ValueError, match="both would set the learning rate"):
        model.fit(
            x, y, epochs=1, verbose=0, callbacks=[other, StochasticWeightAveraging(swa_learning_rate=0.01)]
        )
    assert not (tmp_path / "other").exists() or not any((tmp_path / "other").glob("*.keras"))


def test_validation_guard_warns_and_keeps_the_weights_before_averaging(data):
    x, y = data

    class Scramble(keras.callbacks.Callback):
        """At the end of epoch 2 (before SWA's hook) the weights are noise, restored at the next epoch."""

        def on_epoch_end(self, epoch, logs=None):
            if epoch == 2:
                self.saved = self.model.get_weights()
                rng = np.random.default_rng(1)
                self.model.set_weights([rng.normal(0, 5, w.shape).astype(w.dtype) for w in self.saved])

        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 3:
                self.model.set_weights(self.saved)

    model = make_model(batch_norm=False)
    swa = StochasticWeightAveraging(start_epoch=2, validation_data=(x[:128], y[:128]))
    with pytest.warns(AveragingWarning, match="worse than the model before averaging"):
        model.fit(x, y, batch_size=32, epochs=4, shuffle=False, verbose=0, callbacks=[Scramble(), swa])
    assert swa.report["averaged_is_worse"] and swa.report["count"] == 2
    assert swa.report["averaged"]["nll"] > swa.report["before_averaging"]["nll"]
    before = keras.models.clone_model(model)
    before.set_weights(swa.final_weights)
    p = before.predict(x[:128], verbose=0)
    nll = -np.mean(np.log(np.clip(p[np.arange(128), y[:128]], 1e-7, None)))
    assert nll == pytest.approx(swa.report["before_averaging"]["nll"], rel=1e-4)


def test_refusals(data, tmp_path):
    x, y = data
    with pytest.raises(ValueError, match="fraction"):
        StochasticWeightAveraging(start_epoch=1.5)
    with pytest.raises(ValueError, match="annealing_epochs"):
        StochasticWeightAveraging(annealing_epochs=-1)
    with pytest.raises(ValueError, match="annealing_strategy"):
        StochasticWeightAveraging(annealing_strategy="step")
    with pytest.raises(ValueError, match="average_every"):
        StochasticWeightAveraging(average_every=0)
    with pytest.raises(ValueError, match="directory"):
        StochasticWeightAveraging(save_model=True)
    with pytest.raises(ValueError, match="swa_learning_rate"):
        StochasticWeightAveraging(swa_learning_rate=-0.1)

    model = make_model(batch_norm=False)
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    with pytest.raises(ValueError, match="without a `directory`"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[backup, StochasticWeightAveraging()])
    scheduler = keras.callbacks.LearningRateScheduler(lambda epoch, rate: rate)
    with pytest.raises(ValueError, match="LearningRateScheduler comes after"):
        model.fit(
            x,
            y,
            epochs=1,
            verbose=0,
            callbacks=[StochasticWeightAveraging(swa_learning_rate=0.01), scheduler],
        )
    scheduled = make_model(batch_norm=False)
    scheduled.compile(
        keras.optimizers.SGD(keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.9)),
        "sparse_categorical_crossentropy",
    )
    with pytest.warns(RuntimeWarning, match="never reaches swa_learning_rate"):
        model.fit(
            x, y, epochs=2, verbose=0, callbacks=[StochasticWeightAveraging(1, 0.01, annealing_epochs=2)]
        )
    with pytest.raises(TypeError, match="float learning rate"):
        scheduled.fit(
            x,
            y,
            epochs=1,
            verbose=0,
            callbacks=[StochasticWeightAveraging(swa_learning_rate=0.01, annealing_epochs=0)],
        )

    class Meddler(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.model.optimizer.learning_rate = 0.3

    with pytest.raises(RuntimeError, match="learning rate changed during the SWA phase"):
        model.fit(
            x,
            y,
            epochs=2,
            verbose=0,
            callbacks=[StochasticWeightAveraging(0, 0.01, annealing_epochs=0), Meddler()],
        )

    # A directory holding the average of a finished run, and a fresh model: refused, nothing lost.
    directory = tmp_path / "swa"
    make_model(batch_norm=False).fit(
        x, y, epochs=2, verbose=0, callbacks=[StochasticWeightAveraging(1, directory=directory)]
    )
    before = (directory / STATE_NAME).read_bytes()
    with pytest.raises(ValueError, match="another run"):
        make_model(batch_norm=False).fit(
            x, y, epochs=2, verbose=0, callbacks=[StochasticWeightAveraging(1, directory=directory)]
        )
    assert (directory / STATE_NAME).read_bytes() == before


def test_exported_from_the_package():
    assert keras_snapshot.StochasticWeightAveraging is StochasticWeightAveraging
