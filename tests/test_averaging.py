"""average_weights: the mean of one architecture's weights, exact BatchNorm statistics, and the guard."""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
from conftest import make_digits_model

from keras_snapshot.averaging import AveragingWarning, average_weights


def predict(model, x):
    return keras.ops.convert_to_numpy(model(x, training=False)).astype("float64")


def copy_of(model):
    twin = keras.models.clone_model(model)
    twin.set_weights(model.get_weights())
    return twin


def bn_model(seed):
    """Dense -> BN and Conv -> BN, with non-trivial gamma/beta so the second BN's input depends on the first."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((64,), name="pixels")
    h = keras.layers.Dense(16)(inputs)
    h = keras.layers.BatchNormalization(name="bn_dense")(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.Reshape((4, 4, 1))(h)
    h = keras.layers.Conv2D(3, 3, padding="same")(h)
    h = keras.layers.BatchNormalization(name="bn_conv")(h)
    outputs = keras.layers.Dense(10, activation="softmax")(keras.layers.Flatten()(keras.layers.ReLU()(h)))
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, variance = layer.get_weights()
            layer.set_weights(
                [rng.uniform(0.5, 2, gamma.shape), rng.normal(size=beta.shape), mean + 0.3, variance * 2]
            )
    return model


def test_copies_average_to_the_model(digits):
    x_test = digits[2]
    model = make_digits_model(seed=3)
    model.fit(digits[0], digits[1], epochs=1, verbose=0)
    averaged = average_weights([model, copy_of(model), copy_of(model)])
    for got, expected in zip(averaged.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(got, expected)
    np.testing.assert_allclose(predict(averaged, x_test), predict(model, x_test), atol=1e-6)


def test_batch_norm_statistics_are_the_population_moments(digits, tmp_path):
    x = digits[0]
    averaged = average_weights([bn_model(1), bn_model(2)], bn_data=x, batch_size=300)  # 1400 rows: uneven
    for name, axes in (("bn_dense", (0,)), ("bn_conv", (0, 1, 2))):
        layer = averaged.get_layer(name)
        inputs = keras.Model(averaged.inputs, layer.input).predict(x, verbose=0).astype("float64")
        np.testing.assert_allclose(layer.moving_mean.numpy(), inputs.mean(axis=axes), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(layer.moving_variance.numpy(), inputs.var(axis=axes), rtol=1e-4, atol=1e-5)
    averaged.save(tmp_path / "averaged.keras")
    reloaded = keras.saving.load_model(tmp_path / "averaged.keras")
    np.testing.assert_allclose(predict(reloaded, x[:32]), predict(averaged, x[:32]), atol=1e-6)


def test_batch_norm_needs_bn_data():
    with pytest.raises(ValueError, match="pass bn_data=x_train"):
        average_weights([bn_model(1), bn_model(2)])


def test_mismatched_architectures_refused_by_name():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((64,), name="pixels")
    hidden = keras.layers.Dense(16, activation="relu", name="narrow")(inputs)
    other = keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(hidden))
    with pytest.raises(
        ValueError, match=r"weighted layer #1: .*'dense[_0-9]*'.*\(64, 32\).*'narrow'.*\(64, 16\)"
    ):
        average_weights([make_digits_model(), other])


def test_directory_and_last(digits_run, digits):
    averaged = average_weights(digits_run[0], last=2)
    first = keras.saving.load_model(digits_run[0] / "snapshot-02.keras", compile=False)
    second = keras.saving.load_model(digits_run[0] / "snapshot-03.keras", compile=False)
    expected = [(a + b) / 2 for a, b in zip(first.get_weights(), second.get_weights(), strict=True)]
    for got, want in zip(averaged.get_weights(), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def trained(seed, x, y, epochs):
    model = make_digits_model(seed)
    model.fit(x, y, batch_size=64, epochs=epochs, verbose=0)
    return model


@pytest.fixture(scope="module")
def independent(digits):
    """Two models trained from independent initialisations: different basins."""
    x, y = digits[:2]
    return trained(1, x, y, 3), trained(2, x, y, 3)


def test_guard_fires_on_distant_models(digits, independent):
    _, _, x_test, y_test = digits
    first, second = independent
    with pytest.warns(AveragingWarning, match="distil"):
        averaged = average_weights([first, second], validation_data=(x_test, y_test))
    report = averaged.averaging_report
    print({key: report[key] for key in ("averaged", "best_member", "ensemble")})
    assert report["averaged_is_worse"]
    assert report["averaged"]["nll"] > report["best_member"]["nll"]
    assert report["ensemble"]["error"] <= report["best_member"]["error"] + 0.02


def test_guard_quiet_in_one_basin(digits, independent):
    x, y, x_test, y_test = digits
    first = independent[0]
    second = copy_of(first)
    second.compile(keras.optimizers.SGD(1e-4), "sparse_categorical_crossentropy")
    second.fit(x[:320], y[:320], batch_size=64, epochs=1, verbose=0)  # five small steps away
    with warnings.catch_warnings():
        warnings.simplefilter("error", AveragingWarning)
        averaged = average_weights([first, second], validation_data=(x_test, y_test))
    report = averaged.averaging_report
    print({key: report[key] for key in ("averaged", "best_member", "ensemble")})
    assert not report["averaged_is_worse"]
    assert set(report) == {"averaged", "best_member", "ensemble", "members", "averaged_is_worse"}
    assert report["best_member"]["model"].startswith("model #")
