"""Each Keras internal behind keras_snapshot.keras_internals, broken on purpose: the check at first use
fires, and the fallback still applies the exact rate at every step (or the failure is loud and clear).

A Keras release that renames an internal is simulated by pointing the module's name for it elsewhere
(what the package then sees is exactly what a rename would show it); one that changes behaviour by
patching the Keras class for the duration of the test.
"""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
from test_callback import (
    EpochWeights,
    applied_rates,
    expected_rates,
    fit_callback_path,
    one_hot_data,
    one_weight_per_step_model,
)

import keras_snapshot
from keras_snapshot import SnapshotCallback, SnapshotSchedule, fusion, keras_internals
from keras_snapshot.ensemble import is_uncertainty_block
from keras_snapshot.keras_internals import KerasInternalsError, KerasInternalsWarning

BACKEND = keras.backend.backend()
jax_only = pytest.mark.skipif(BACKEND != "jax", reason="a JAX trainer internal")


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """Fallback warnings are once per process: each test sees its own."""
    monkeypatch.setattr(keras_internals, "_WARNED", set())


def assert_exact_rates(recorder):
    np.testing.assert_allclose(applied_rates(recorder), expected_rates(0.2, 30, 4), rtol=0, atol=1e-6)


def fit_expecting_fallback(tmp_path, match, model=None):
    with pytest.warns(KerasInternalsWarning, match=match):
        model, recorder, _ = fit_callback_path(tmp_path / "s", model)
    assert_exact_rates(recorder)
    assert [e["step"] for e in keras_snapshot.read_manifest(tmp_path / "s")["snapshots"]] == [8, 16, 24, 30]
    return model


# ------------------------------------------------------------------------------- the contracts hold
def test_every_contract_holds_on_this_keras(tmp_path):
    """No fallback on the Keras installed here: a regression in a Keras upgrade shows up here first."""
    assert keras_internals.fusion_supported() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error", KerasInternalsWarning)
        _, recorder, _ = fit_callback_path(tmp_path / "s")
    assert_exact_rates(recorder)


def test_sibling_callbacks_sees_the_fit_list_in_order(tmp_path):
    seen = []

    class Probe(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            seen.append(keras_internals.sibling_callbacks(self))

    probe, csv = Probe(), keras.callbacks.CSVLogger(str(tmp_path / "log.csv"))
    x, y = one_hot_data(4)
    one_weight_per_step_model(4, 0.1).fit(x, y, batch_size=2, epochs=1, verbose=0, callbacks=[csv, probe])
    assert seen[0][:2] == [csv, probe]
    assert any(isinstance(c, keras.callbacks.History) for c in seen[0])
    assert keras_internals.sibling_callbacks(probe) is None  # outside fit: nothing to find


# ------------------------------------------------------------------------------- the rate, in place
@pytest.mark.skipif(BACKEND not in ("tensorflow", "torch"), reason="TF and torch assign in place")
def test_in_place_assignment_changed_falls_back_to_the_public_setter(tmp_path, monkeypatch):
    # A Keras release where `Variable.value` is no longer the backend variable itself (a read-only
    # tensor on TF, a copy on torch): assigning it in place would be lost.
    model = one_weight_per_step_model(10, 0.5)
    rate = model.optimizer.learning_rate
    cls = type(rate)
    real = cls.value
    if BACKEND == "tensorflow":
        import tensorflow as tf

        def value(self):
            v = real.fget(self)
            return tf.identity(v) if self is rate else v
    else:
        import torch

        def value(self):
            v = real.fget(self)
            return v.detach().clone() if self is rate else v

        def direct_assign(self, new):  # that release's own assignment writes the stored tensor
            with torch.no_grad():
                self._value.copy_(new)

        monkeypatch.setattr(cls, "_direct_assign", direct_assign)
    monkeypatch.setattr(cls, "value", property(value))
    fit_expecting_fallback(tmp_path, "in-place assignment", model)


# ------------------------------------------------------------------------------- the JAX trainer
@jax_only
@pytest.mark.parametrize(
    ("name", "renamed"),
    [
        ("JAX_STATE", "_jax_state_renamed"),
        ("JAX_STATE_SYNCED", "_jax_state_synced_renamed"),
        ("JAX_VARIABLE_VALUE", "_value_renamed"),  # Variable.value no longer returns what is set here
        ("CALLBACK_MODEL", "_model_renamed"),
    ],
)
def test_jax_internal_renamed_falls_back_to_the_public_sync(tmp_path, monkeypatch, name, renamed):
    monkeypatch.setattr(keras_internals, name, renamed)
    match = "Callback._model" if name == "CALLBACK_MODEL" else "JAX trainer's state"
    fit_expecting_fallback(tmp_path, match)


@jax_only
def test_jax_trainer_that_ignores_the_rate_fails_loudly(tmp_path, monkeypatch):
    # A release whose trainer keeps its own state although the flag reads "synced": the checks before
    # the step pass, and the one after it sees that the rate was not taken.
    model = one_weight_per_step_model(10, 0.5)
    flag = property(
        lambda self: self._jax_state_synced, lambda self, value: None
    )  # reads Keras's, writes nowhere
    monkeypatch.setattr(type(model), "_sync_flag_keras_ignores", flag, raising=False)
    monkeypatch.setattr(keras_internals, "JAX_STATE_SYNCED", "_sync_flag_keras_ignores")
    with pytest.raises(KerasInternalsError, match="did not take the learning rate"):
        fit_callback_path(tmp_path / "s", model)


@pytest.mark.skipif(BACKEND == "torch", reason="torch refuses steps_per_execution > 1")
@pytest.mark.parametrize("broken", [False, True])
def test_iterations_inside_executions(tmp_path, monkeypatch, broken):
    # In-graph path, steps_per_execution = 4: the step is read from the optimizer after every execution
    # (on JAX from the trainer's state; broken: from the synced model).
    if broken:
        monkeypatch.setattr(keras_internals, "JAX_STATE", "_jax_state_renamed")
    steps, epochs, cycles = 8, 7, 5
    x, y = one_hot_data(steps)
    model = one_weight_per_step_model(steps, SnapshotSchedule(0.2, total_steps=56, cycles=cycles), 4)
    recorder = EpochWeights()
    expect_warning = broken and BACKEND == "jax"
    context = (
        pytest.warns(KerasInternalsWarning, match="iterations")
        if expect_warning
        else warnings.catch_warnings()
    )
    with context:
        if not expect_warning:
            warnings.simplefilter("error", KerasInternalsWarning)
        model.fit(
            x,
            y,
            batch_size=1,
            epochs=epochs,
            shuffle=False,
            verbose=0,
            callbacks=[SnapshotCallback(tmp_path / "s", cycles=cycles), recorder],
        )
    np.testing.assert_allclose(applied_rates(recorder), expected_rates(0.2, 56, cycles), rtol=0, atol=1e-6)
    assert [e["step"] for e in keras_snapshot.read_manifest(tmp_path / "s")["snapshots"]] == [
        12,
        24,
        36,
        48,
        56,
    ]


# ------------------------------------------------------------------------------- sibling callbacks
def test_without_the_callback_list_a_rate_setter_is_still_caught_by_its_effect(tmp_path, monkeypatch):
    # A Keras whose fit no longer calls hooks through a CallbackList in the caller's frame: the
    # LearningRateScheduler cannot be named at train begin, but its rate change is seen at the
    # next epoch's first batch.
    monkeypatch.setattr(keras.callbacks, "CallbackList", type("NotTheCallbackList", (), {}))
    x, y = one_hot_data(10)
    model = one_weight_per_step_model(10, 0.5)
    scheduler = keras.callbacks.LearningRateScheduler(lambda epoch, rate: 0.01)
    with pytest.raises(RuntimeError, match="LearningRateScheduler, ReduceLROnPlateau"):
        model.fit(
            x,
            y,
            batch_size=1,
            epochs=3,
            verbose=0,
            callbacks=[SnapshotCallback(tmp_path / "s", cycles=3, initial_learning_rate=0.2), scheduler],
        )
    # It stopped at the second epoch's first batch, before any step with a wrong rate.
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 10


# ------------------------------------------------------------------------------- fusion
def members():
    models = []
    for seed in (0, 1):
        keras.utils.set_random_seed(seed)
        inputs = keras.Input((4,), name="x")
        hidden = keras.layers.Dense(3, activation="relu")(inputs)
        models.append(keras.Model(inputs, keras.layers.Dense(2, activation="softmax", name="y")(hidden)))
    return models


def fuse(models):
    inputs = keras.Input((4,), name="x")
    combined = fusion.fuse_members(models, ["m1", "m2"], inputs, ["y"], [0.5, 0.5], {"y": None})
    return keras.Model(inputs, combined["y"])


def test_fusion_works_through_the_internals():
    models = members()
    x = np.random.default_rng(0).random((5, 4), "float32")
    mean = np.mean([m.predict(x, verbose=0) for m in models], axis=0)
    np.testing.assert_allclose(fuse(models).predict(x, verbose=0), mean, rtol=1e-5, atol=1e-6)


def _removed(monkeypatch):
    from keras.src.ops.function import Function

    monkeypatch.delattr(Function, "_run_through_graph")


def _old_signature(monkeypatch):
    from keras.src.ops.function import Function

    real = Function._run_through_graph

    def run_through_graph(self, inputs, operation_fn):  # no call_fn
        return real(self, inputs, operation_fn)

    monkeypatch.setattr(Function, "_run_through_graph", run_through_graph)


def _no_call_fn_calls(monkeypatch):
    from keras.src.ops.function import Function

    real = Function._run_through_graph

    def run_through_graph(self, inputs, operation_fn=lambda op: op, call_fn=None):  # ignores call_fn
        return real(self, inputs, operation_fn)

    monkeypatch.setattr(Function, "_run_through_graph", run_through_graph)


def _nodes_gone(monkeypatch):
    from keras.src.models.functional import Functional

    monkeypatch.setattr(
        Functional, "_nodes_by_depth", property(lambda self: None, lambda self, value: None), raising=False
    )


def _sequential_graph_gone(monkeypatch):
    monkeypatch.setattr(
        keras.Sequential, "_functional", property(lambda self: None, lambda self, v: None), raising=False
    )


@pytest.mark.parametrize(
    "breakage", [_removed, _old_signature, _no_call_fn_calls, _nodes_gone, _sequential_graph_gone]
)
def test_fusion_internals_changed_raise_fusion_unavailable(monkeypatch, breakage):
    models = members()  # built before the breakage: Keras itself may rely on what is broken
    monkeypatch.setattr(keras_internals, "_FUSION_SUPPORTED", [])
    breakage(monkeypatch)
    reason = keras_internals.fusion_supported()
    assert reason
    with pytest.raises(fusion.FusionUnavailable, match="fuse=False") as error:
        fuse(models)
    assert reason in str(error.value)
    assert isinstance(error.value, fusion.FusionError)


# ------------------------------------------------------------------------------- served outputs
def _served_blocks(model):
    return sorted({op.name for op in keras_internals.output_operations(model) if is_uncertainty_block(op)})


@pytest.mark.parametrize("history_gone", [False, True])
def test_output_operations_tell_a_served_uncertainty_block_from_a_hidden_one(monkeypatch, history_gone):
    """export decides whether to add uncertainty outputs from this: the abstain decision's scores
    come from a block that is not served, and a nested model's `.output` cannot tell (it is the
    block's inner graph)."""
    models = members()
    rng = np.random.default_rng(0)
    x_val, y_val = rng.random((20, 4), "float32"), rng.integers(0, 2, 20)
    served = keras_snapshot.build_ensemble(models, uncertainty=True)
    hidden = keras_snapshot.build_ensemble(models, abstain_coverage=0.8, validation_data=(x_val, y_val))
    assert any(is_uncertainty_block(layer) for layer in hidden.layers)
    if history_gone:

        def gone(tensor):
            raise KerasInternalsError("KerasTensor._keras_history is gone")

        monkeypatch.setattr(keras_internals, "tensor_history", gone)
        with pytest.warns(KerasInternalsWarning, match="output_layers"):
            assert _served_blocks(served) == ["uncertainty"]
    else:
        assert _served_blocks(served) == ["uncertainty"]
    assert _served_blocks(hidden) == []


# ------------------------------------------------------------------------------- the step count
def accumulating_model(steps, accumulation):
    model = keras.Sequential(
        [keras.Input((steps,)), keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")]
    )
    model.compile(keras.optimizers.SGD(0.5, gradient_accumulation_steps=accumulation), loss="mse")
    return model


def test_the_step_count_schedules_read_is_the_optimizers_private_iterations():
    # The contract: with accumulation, Keras's schedules read `_iterations` (one per batch), and the
    # public `iterations` is it // k. A Keras that changes either breaks the step model.
    x, y = one_hot_data(5)
    model = accumulating_model(5, 2)
    model.fit(x, y, batch_size=1, epochs=1, verbose=0)
    variable = keras_internals.schedule_step_variable(model.optimizer)
    assert isinstance(variable, keras.Variable)
    assert int(keras.ops.convert_to_numpy(variable)) == 5
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 2
    plain = one_weight_per_step_model(5, 0.1)
    assert keras_internals.schedule_step_variable(plain.optimizer) is plain.optimizer.iterations


def test_step_count_renamed_falls_back_without_accumulation_and_fails_loudly_with_it(tmp_path, monkeypatch):
    monkeypatch.setattr(keras_internals, "ITERATIONS", "_iterations_renamed")
    fit_expecting_fallback(tmp_path, "Optimizer._iterations")  # the public iterations: the same counter
    x, y = one_hot_data(5)
    with pytest.raises(KerasInternalsError, match="gradient_accumulation_steps=2"):
        accumulating_model(5, 2).fit(
            x, y, batch_size=1, epochs=2, verbose=0, callbacks=[SnapshotCallback(tmp_path / "t", cycles=2)]
        )
