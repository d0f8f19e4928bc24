"""One input contract for every public function (docs/guide/inputs.md): the same data gets the same
answer everywhere, checked against numpy, and bad data gets one clear error naming the problem.

Members are tiny real Keras models trained for one epoch on synthetic data; each kind of member
(softmax layer, softmax op, float16, sigmoid, logits, a Lambda softmax) and each form of labels
(integer, (N, 1), one-hot int / float / bool, soft, NaN) goes through every public function
that accepts it.
"""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest

from keras_snapshot import (
    average_weights,
    build_ensemble,
    distill,
    evaluation,
    fit_ensemble_weights,
)
from keras_snapshot.calibration import fit_temperature, temperature_from_probabilities, temperature_scale
from keras_snapshot.evaluation import evaluate_ensemble
from keras_snapshot.export import _serving_model
from keras_snapshot.inputs import ROW_TOLERANCE, output_kind

N, FEATURES, CLASSES, MEMBERS = 96, 6, 3, 2
TOLERANCE = 2e-5

# Label and NaN parsing is numpy before (or after) one predict pass: the same on every backend, so
# those tables run on TensorFlow; what depends on the backend (the output-kind probe, float16,
# BatchNorm statistics, wrappers, fusion, the export view) runs on all three.
numpy_level = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="backend-independent parsing: run on TensorFlow"
)
# One epoch of training leaves the averaged model worse than a member now and then: not the point here.
pytestmark = pytest.mark.filterwarnings("ignore::keras_snapshot.averaging.AveragingWarning")


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, FEATURES)).astype("float32")
    y = (x[:, 0] > 0).astype("int64") + (x[:, 1] > 0.5).astype("int64")  # 3 classes, learnable
    return x, y


def _trained(model, x, y, loss):
    model.compile(keras.optimizers.SGD(0.1), loss)
    model.fit(x, y, epochs=1, batch_size=32, verbose=0)
    return model


def make_members(kind: str, seed: int = 0) -> list[keras.Model]:
    """MEMBERS models of one kind, each trained for one epoch."""
    x, y = _data()
    models = []
    for index in range(MEMBERS):
        keras.utils.set_random_seed(seed + index)
        inputs = keras.Input((FEATURES,), name="features")
        hidden = keras.layers.Dense(8, activation="relu")(inputs)
        loss = "sparse_categorical_crossentropy"
        target = y
        if kind == "softmax_layer":
            outputs = keras.layers.Dense(CLASSES, activation="softmax")(hidden)
        elif kind == "softmax_op":  # the softmax is an op, not a layer
            outputs = keras.ops.softmax(keras.layers.Dense(CLASSES)(hidden))
        elif kind == "float16":  # a mixed-precision member without a float32 last layer
            outputs = keras.layers.Dense(CLASSES, activation="softmax", dtype="mixed_float16")(hidden)
        elif kind == "lambda_softmax":  # the graph cannot tell: a Lambda
            logits = keras.layers.Dense(CLASSES)(hidden)
            outputs = keras.layers.Lambda(lambda t: keras.ops.softmax(t), name="custom_head")(logits)
        elif kind == "logits":
            outputs = keras.layers.Dense(CLASSES)(hidden)
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        elif kind == "sigmoid":
            outputs = keras.layers.Dense(1, activation="sigmoid")(hidden)
            loss, target = "binary_crossentropy", (y > 0).astype("float32")
        elif kind == "mean":  # a regression output named "mean"
            outputs = keras.layers.Dense(2, name="mean")(hidden)
            loss, target = "mse", np.stack([x[:, 0], x[:, 1]], axis=1)
        elif kind == "log_variance":  # a regression output whose name ends in _variance
            outputs = keras.layers.Dense(1, name="log_variance")(hidden)
            loss, target = "mse", x[:, :1]
        elif kind == "batchnorm":
            normed = keras.layers.BatchNormalization()(hidden)
            outputs = keras.layers.Dense(CLASSES, activation="softmax")(normed)
        else:
            raise AssertionError(kind)
        models.append(_trained(keras.Model(inputs, outputs, name=f"{kind}_{index}"), x, target, loss))
    return models


_CACHE: dict[str, list[keras.Model]] = {}


def members(kind: str) -> list[keras.Model]:
    if kind not in _CACHE:
        _CACHE[kind] = make_members(kind)
    return _CACHE[kind]


def stack_of(models, x) -> np.ndarray:
    return np.stack([keras.ops.convert_to_numpy(m(x)).astype("float64") for m in models])


def predicted_stack(models, x) -> np.ndarray:
    """The members' outputs as the library computes them (`predict`, batches of 256): float16 kernels of an
    eager call and of a compiled predict may differ by one float16 ulp (oneDNN on AVX512-FP16 CPUs)."""
    return np.stack([m.predict(x, batch_size=256, verbose=0).astype("float64") for m in models])


def numpy_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def numpy_nll(p, y):
    return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-7, 1.0))))


# --------------------------------------------------------------------------- label forms
def label_forms(y: np.ndarray, classes: int = CLASSES) -> dict[str, np.ndarray]:
    eye = np.eye(classes)
    return {
        "integer": y.astype("int32"),
        "column": y.reshape(-1, 1).astype("int64"),
        "integral_float": y.astype("float32"),
        "one_hot_int": eye[y].astype("int32"),
        "one_hot_float": eye[y].astype("float32"),
        "one_hot_bool": eye[y].astype(bool),
    }


def soft_labels(y: np.ndarray) -> np.ndarray:
    return (0.8 * np.eye(CLASSES)[y] + 0.2 / CLASSES).astype("float32")


def with_nan(array: np.ndarray) -> np.ndarray:
    array = np.array(array, dtype="float32", copy=True)
    array.reshape(len(array), -1)[3, 0] = np.nan
    array.reshape(len(array), -1)[7, -1] = np.inf
    return array


NAN_MESSAGE = r"2 NaN or infinite value\(s\) in 2 row\(s\), the first in row 3"


# --------------------------------------------------------------------------- the functions
def split():
    x, y = _data()
    return x[:48], y[:48], x[48:], y[48:]


def run_evaluate(models, x, y, x_val, y_val):
    rows = evaluate_ensemble(models, x, y, temperature="fit", validation_data=(x_val, y_val))
    return rows[-1]["nll"], rows[-1]["temperature"]


def run_fit_temperature(models, x, y, x_val, y_val):
    return fit_temperature(models, (x_val, y_val))


def run_build_temperature(models, x, y, x_val, y_val):
    ensemble = build_ensemble(models, temperature="fit", validation_data=(x_val, y_val))
    return 1.0 / float(ensemble.get_layer("temperature").scale)


def run_fit_weights(models, x, y, x_val, y_val):
    return fit_ensemble_weights(models, (x_val, y_val))


def run_average(models, x, y, x_val, y_val):
    return average_weights(models, validation_data=(x_val, y_val)).averaging_report["averaged"]["nll"]


LABEL_FUNCTIONS = {
    "evaluate_ensemble": run_evaluate,
    "fit_temperature": run_fit_temperature,
    "build_ensemble(temperature='fit')": run_build_temperature,
    "fit_ensemble_weights": run_fit_weights,
    "average_weights": run_average,
}
SOFT_ACCEPTED = {"fit_ensemble_weights"}  # a cross-entropy against a distribution is what it computes


@numpy_level
@pytest.mark.parametrize("function", sorted(LABEL_FUNCTIONS))
def test_every_label_form_gives_the_answer_of_integer_labels(function):
    x, _, x_val, y_val = split()
    models = members("softmax_layer")
    run = LABEL_FUNCTIONS[function]
    reference = run(models, x, _data()[1][:48], x_val, y_val)
    for form, labels in label_forms(y_val).items():
        y_test = label_forms(_data()[1][:48])[form]
        np.testing.assert_allclose(
            run(models, x, y_test, x_val, labels), reference, err_msg=f"{function} {form}"
        )


@numpy_level
@pytest.mark.parametrize("function", sorted(LABEL_FUNCTIONS))
def test_soft_labels_are_used_where_they_make_sense_and_refused_elsewhere(function):
    x, y, x_val, y_val = split()
    models = members("softmax_layer")
    run = LABEL_FUNCTIONS[function]
    if function in SOFT_ACCEPTED:
        w = run(models, x, y, x_val, soft_labels(y_val))
        stack = stack_of(models, x_val)
        target = soft_labels(y_val).astype("float64")

        def loss(weights):
            return -np.mean(
                np.sum(target * np.log(np.clip(np.tensordot(weights, stack, 1), 1e-7, 1)), axis=1)
            )

        assert abs(w.sum() - 1) < 1e-9 and np.all(w >= 0)
        assert loss(w) <= loss(np.full(MEMBERS, 1.0 / MEMBERS)) + 1e-12
    else:
        with pytest.raises(ValueError, match="soft labels"):
            run(models, x, y, x_val, soft_labels(y_val))


def test_distill_takes_every_label_form_and_its_student_evaluates_integer_labels():
    x, y, x_val, y_val = split()
    models = members("softmax_layer")
    for form in ("integer", "column", "one_hot_int", "one_hot_bool"):
        keras.utils.set_random_seed(0)
        student = distill(models, x, y=label_forms(y)[form], epochs=1, batch_size=16, verbose=0)
        if form in ("integer", "column"):
            loss, accuracy = student.evaluate(x_val, y_val, verbose=0)
            p = keras.ops.convert_to_numpy(student(x_val)).astype("float64")
            np.testing.assert_allclose(loss, numpy_nll(p, y_val), rtol=1e-4)
            np.testing.assert_allclose(accuracy, np.mean(p.argmax(1) == y_val), atol=1e-6)
    student = distill(models, x, y=soft_labels(y), epochs=1, batch_size=16, verbose=0)  # soft: accepted
    # Without labels the student evaluates with class indices, as users do.
    student = distill(models, x, epochs=1, batch_size=16, verbose=0)
    loss, _ = student.evaluate(x_val, y_val, verbose=0)
    assert np.isfinite(loss)


# --------------------------------------------------------------------------- NaN and inf
def nan_cases():
    """(name, call) pairs: every function, every argument that takes data."""
    x, y, x_val, y_val = split()
    models = members("batchnorm")
    return {
        "evaluate_ensemble x": lambda: evaluate_ensemble(models, with_nan(x), y),
        "evaluate_ensemble y": lambda: evaluate_ensemble(models, x, with_nan(y)),
        "evaluate_ensemble x_val": lambda: evaluate_ensemble(
            models, x, y, temperature="fit", validation_data=(with_nan(x_val), y_val)
        ),
        "fit_temperature x_val": lambda: fit_temperature(models, (with_nan(x_val), y_val)),
        "fit_temperature y_val": lambda: fit_temperature(models, (x_val, with_nan(y_val))),
        "build_ensemble temperature x_val": lambda: build_ensemble(
            models, temperature="fit", validation_data=(with_nan(x_val), y_val)
        ),
        "build_ensemble weights y_val": lambda: build_ensemble(
            models, weights="fit", validation_data=(x_val, with_nan(y_val))
        ),
        "fit_ensemble_weights x_val": lambda: fit_ensemble_weights(models, (with_nan(x_val), y_val)),
        "fit_ensemble_weights y_val": lambda: fit_ensemble_weights(models, (x_val, with_nan(y_val))),
        "average_weights bn_data": lambda: average_weights(models, bn_data=with_nan(x)),
        "average_weights x_val": lambda: average_weights(
            models, bn_data=x, validation_data=(with_nan(x_val), y_val)
        ),
        "distill x": lambda: distill(models, with_nan(x), epochs=1, verbose=0),
        "distill y": lambda: distill(models, x, y=with_nan(y), epochs=1, verbose=0),
        "distill validation": lambda: distill(
            models, x, validation_data=with_nan(x_val), epochs=1, verbose=0
        ),
        "metrics p": lambda: evaluation.nll(
            with_nan(np.full((N, CLASSES), 1.0 / CLASSES)), np.zeros(N, "int64")
        ),
        "metrics y": lambda: evaluation.error(np.full((N, CLASSES), 1.0 / CLASSES), with_nan(np.zeros(N))),
    }


NAN_CASES = sorted(
    [
        "evaluate_ensemble x",
        "evaluate_ensemble y",
        "evaluate_ensemble x_val",
        "fit_temperature x_val",
        "fit_temperature y_val",
        "build_ensemble temperature x_val",
        "build_ensemble weights y_val",
        "fit_ensemble_weights x_val",
        "fit_ensemble_weights y_val",
        "average_weights bn_data",
        "average_weights x_val",
        "distill x",
        "distill y",
        "distill validation",
        "metrics p",
        "metrics y",
    ]
)


@numpy_level
@pytest.mark.parametrize("case", NAN_CASES)
def test_nan_and_inf_are_refused_with_the_count_and_the_first_row(case, monkeypatch):
    calls = nan_cases()
    assert sorted(calls) == NAN_CASES
    # Refused before any prediction or training: nothing runs on bad data.
    monkeypatch.setattr(keras.Model, "predict", lambda *a, **k: pytest.fail("predicted on bad data"))
    monkeypatch.setattr(keras.Model, "fit", lambda *a, **k: pytest.fail("trained on bad data"))
    with pytest.raises(ValueError, match=NAN_MESSAGE):
        calls[case]()


def test_a_member_that_outputs_nan_is_named():
    x, y, _, _ = split()
    models = make_members("softmax_layer", seed=10)
    broken = models[1]
    broken.layers[-1].kernel.assign(np.full(broken.layers[-1].kernel.shape, np.nan, "float32"))
    with pytest.raises(ValueError, match=r"model #2 .*NaN.*diverged"):
        evaluate_ensemble(models, x, y)


# --------------------------------------------------------------------------- what an output is
@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("softmax_layer", "classes"),
        ("softmax_op", "classes"),
        ("float16", "classes"),
        ("lambda_softmax", "classes"),
        ("sigmoid", "binary"),
        ("logits", "values"),
        ("mean", "values"),
    ],
)
def test_output_kind_from_the_graph_then_the_values(kind, expected):
    model = members(kind)[0]
    assert output_kind(model, model.output_names[0], None, 0) == expected
    if kind == "logits":
        assert output_kind(model, model.output_names[0], "softmax", 0) == "classes"


@pytest.mark.parametrize("kind", ["softmax_layer", "softmax_op", "float16", "lambda_softmax"])
def test_every_kind_of_probability_member_is_a_classifier_everywhere(kind):
    x, y, x_val, y_val = split()
    models = members(kind)
    stack = stack_of(models, x)
    mean = stack.mean(axis=0)
    rows = evaluate_ensemble(models, x, y)
    predicted = predicted_stack(models, x).mean(axis=0)  # evaluate_ensemble's member outputs, exactly
    np.testing.assert_allclose(rows[-1]["nll"], numpy_nll(predicted, y), atol=1e-6)
    np.testing.assert_allclose(rows[-1]["error"], np.mean(predicted.argmax(1) != y), atol=1e-9)
    # Temperature and uncertainty outputs: classifier measures, the values of numpy's.
    ensemble = build_ensemble(models, temperature=2.0, uncertainty=True)
    out = {k: keras.ops.convert_to_numpy(v) for k, v in ensemble(x).items()}
    assert sorted(out) == ["disagreement", "entropy", "mutual_information", "predictions"]
    atol = 5e-3 if kind == "float16" else TOLERANCE
    np.testing.assert_allclose(out["predictions"], temperature_scale(mean, 2.0), atol=atol)
    np.testing.assert_allclose(out["mutual_information"], evaluation.mutual_information(stack), atol=atol)
    # fit_temperature agrees with the numpy search on the same probabilities.
    t = fit_temperature(models, (x_val, y_val))
    np.testing.assert_allclose(
        t,
        temperature_from_probabilities(predicted_stack(models, x_val).mean(0), y_val, dtype="float16"),
        rtol=1e-6,
    )


@pytest.mark.parametrize("kind", ["softmax_layer", "softmax_op"])
def test_softmax_is_never_applied_twice(kind):
    x, _, _, _ = split()
    models = members(kind)
    plain = keras.ops.convert_to_numpy(build_ensemble(models)(x))
    with pytest.warns(UserWarning, match="already ends in softmax"):
        again = build_ensemble(models, output_activation="softmax")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(again(x)), plain, atol=TOLERANCE)
    np.testing.assert_allclose(plain, stack_of(models, x).mean(0), atol=TOLERANCE)
    with pytest.warns(UserWarning, match="already ends in softmax"):
        rows = evaluate_ensemble(models, x, _data()[1][:48], output_activation="softmax")
    np.testing.assert_allclose(
        rows[-1]["nll"], numpy_nll(stack_of(models, x).mean(0), _data()[1][:48]), atol=1e-6
    )


def test_logits_need_output_activation_and_then_work():
    x, y, _, _ = split()
    models = members("logits")
    with pytest.raises(ValueError, match="output_activation='softmax'"):
        evaluate_ensemble(models, x, y)
    rows = evaluate_ensemble(models, x, y, output_activation="softmax")
    mean = numpy_softmax(stack_of(models, x)).mean(axis=0)
    np.testing.assert_allclose(rows[-1]["nll"], numpy_nll(mean, y), atol=1e-6)


def test_float16_rows_get_the_float16_tolerance():
    x, y, _, _ = split()
    models = members("float16")
    assert models[0].output.dtype == "float16"
    sums = stack_of(models, x).sum(axis=-1)
    assert np.max(np.abs(sums - 1)) <= ROW_TOLERANCE["float16"]
    rows = evaluate_ensemble(models, x, y, temperature=1.5)
    assert all(np.isfinite(row["nll_ts"]) for row in rows)


def test_sigmoid_members_are_binary_classifiers():
    x, y, _, _ = split()
    models = members("sigmoid")
    binary = (y > 0).astype("int64")
    p = stack_of(models, x).mean(0)[:, 0]
    rows = evaluate_ensemble(models, x, binary)
    two = np.stack([1 - p, p], axis=1)
    np.testing.assert_allclose(rows[-1]["nll"], numpy_nll(two, binary), atol=1e-6)
    out = build_ensemble(models, uncertainty=True)(x)
    assert sorted(out) == ["disagreement", "entropy", "mutual_information", "predictions"]
    # Exported from a plain ensemble of the same in-memory models (called through wrappers): the same.
    view, _ = _serving_model(build_ensemble(models), False, uncertainty=True)
    assert sorted(view.output) == ["disagreement", "entropy", "mutual_information", "predictions"]
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(out["entropy"]), evaluation.entropy(p), atol=TOLERANCE
    )


# --------------------------------------------------------------------------- names
def test_a_regression_output_named_mean_gets_its_variance():
    x, _, _, _ = split()
    models = members("mean")
    ensemble = build_ensemble(models, uncertainty=True)
    out = {k: keras.ops.convert_to_numpy(v) for k, v in ensemble(x).items()}
    assert sorted(out) == ["predictions", "variance"]
    stack = stack_of(models, x)
    np.testing.assert_allclose(out["predictions"], stack.mean(0), atol=TOLERANCE)
    np.testing.assert_allclose(out["variance"], evaluation.variance(stack), atol=TOLERANCE)
    # The export of a plain ensemble adds the same measures, and no name clashes.
    view, _ = _serving_model(build_ensemble(models), False, uncertainty=True)
    served = view({"features": x})
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(served["variance"]), out["variance"], atol=TOLERANCE
    )


def test_export_decides_from_the_graph_not_from_output_names():
    x, _, _, _ = split()
    models = members("log_variance")  # an output called "log_variance" is not an uncertainty output
    view, _ = _serving_model(build_ensemble(models), False, uncertainty=True)
    assert sorted(view.output_names if isinstance(view.output, list) else view.output) == [
        "predictions",
        "variance",
    ]
    served = view({"features": x})
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(served["variance"]),
        evaluation.variance(stack_of(models, x)),
        atol=TOLERANCE,
    )
    # A model built with uncertainty=True is served as it is (no second set of measures).
    view, _ = _serving_model(build_ensemble(models, uncertainty=True), False, uncertainty=True)
    assert sorted(view.output) == ["predictions", "variance"]


def test_public_functions_leave_the_users_models_unchanged():
    x, y, x_val, y_val = split()
    models = make_members("softmax_layer", seed=20)
    names = [m.name for m in models]
    optimizers = [m.optimizer for m in models]
    losses = [m.loss for m in models]
    weights = [[w.copy() for w in m.get_weights()] for m in models]
    evaluate_ensemble(models, x, y, temperature="fit", validation_data=(x_val, y_val))
    build_ensemble(models, uncertainty=True, temperature=2.0)
    build_ensemble(models, weights="fit", validation_data=(x_val, y_val))
    fit_ensemble_weights(models, (x_val, y_val))
    fit_temperature(models, (x_val, y_val))
    average_weights(models, validation_data=(x_val, y_val))
    distill(models, x, epochs=1, verbose=0)
    assert [m.name for m in models] == names
    assert [m.optimizer for m in models] == optimizers and [m.loss for m in models] == losses
    for model, before in zip(models, weights, strict=True):
        for now, then in zip(model.get_weights(), before, strict=True):
            np.testing.assert_array_equal(now, then)


def test_softmax_op_members_fuse():
    x, _, _, _ = split()
    models = members("softmax_op")
    branches = keras.ops.convert_to_numpy(build_ensemble(models)(x))
    fused = build_ensemble(models, fuse=True, uncertainty=True)
    out = {k: keras.ops.convert_to_numpy(v) for k, v in fused(x).items()}
    np.testing.assert_allclose(out["predictions"], branches, atol=TOLERANCE)
    np.testing.assert_allclose(
        out["mutual_information"], evaluation.mutual_information(stack_of(models, x)), atol=TOLERANCE
    )


def test_fusion_passes_safe_mode_on(tmp_path):
    x, y, _, _ = split()
    keras.utils.set_random_seed(0)
    inputs = keras.Input((FEATURES,), name="features")
    scaled = keras.layers.Lambda(lambda t: t * 0.5, name="halve")(inputs)  # shared, weightless
    hidden = keras.layers.Dense(8, activation="relu")(scaled)
    model = keras.Model(inputs, keras.layers.Dense(CLASSES, activation="softmax")(hidden))
    model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    paths = []
    for index in range(MEMBERS):  # snapshots of one run: one architecture, weights one epoch apart
        model.fit(x, y, epochs=1, batch_size=32, verbose=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Keras warns that the lambda is unsafe to reload
            model.save(tmp_path / f"m{index}.keras")
        paths.append(tmp_path / f"m{index}.keras")
    with pytest.raises(ValueError, match="safe_mode=False"):
        build_ensemble(paths)
    branches = keras.ops.convert_to_numpy(build_ensemble(paths, safe_mode=False)(x))
    fused = build_ensemble(paths, safe_mode=False, fuse=True)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(fused(x)), branches, atol=TOLERANCE)
