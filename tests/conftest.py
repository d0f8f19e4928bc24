"""Shared fixtures: real data (scikit-learn's digits) and a real, short snapshot training run."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest

import keras_snapshot

# On a GPU, JAX and torch's cuDNN run float32 matmuls and convolutions in TF32 by default (about three
# decimal digits); the tests compare graphs to 1e-5, so they compute in full float32 there.
if keras.backend.backend() == "jax":
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
elif keras.backend.backend() == "torch":
    import torch

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False

DIGITS_CYCLES = 3
DIGITS_EPOCHS = 6
DIGITS_BATCH = 64


@pytest.fixture(scope="session")
def digits():
    """(x_train, y_train, x_test, y_test): 8x8 digits flattened to 64 floats in [0, 1]."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    y = y.astype("int32")
    return x[:1400], y[:1400], x[1400:], y[1400:]


def make_digits_model(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((64,), name="pixels")
    hidden = keras.layers.Dense(32, activation="relu")(inputs)
    outputs = keras.layers.Dense(10, activation="softmax")(hidden)
    model = keras.Model(inputs, outputs, name="digits_mlp")
    model.compile(
        keras.optimizers.SGD(0.2, momentum=0.9, nesterov=True),
        "sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory, digits):
    """A real snapshot run on digits: (directory, history). 3 cycles of 2 epochs, 22 steps per epoch.

    Session-scoped and read-only for tests: copy the directory before changing anything in it.
    """
    x, y, x_test, y_test = digits
    directory = tmp_path_factory.mktemp("digits") / "snapshots"
    model = make_digits_model()
    history = model.fit(
        x,
        y,
        batch_size=DIGITS_BATCH,
        epochs=DIGITS_EPOCHS,
        validation_data=(x_test, y_test),
        verbose=0,
        callbacks=[
            keras_snapshot.SnapshotCallback(directory, cycles=DIGITS_CYCLES, initial_learning_rate=0.2)
        ],
    )
    return directory, history


@pytest.fixture()
def snapshot_dir(digits_run, tmp_path):
    """A private copy of the digits run's snapshot directory, free to change."""
    import shutil

    target = tmp_path / "snapshots"
    shutil.copytree(digits_run[0], target)
    return target


__all__ = ["DIGITS_BATCH", "DIGITS_CYCLES", "DIGITS_EPOCHS", "make_digits_model", "np"]
