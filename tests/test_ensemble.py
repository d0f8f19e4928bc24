"""build_ensemble and fit_ensemble_weights: the mean of the members, every model shape, every error."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from keras_snapshot import build_ensemble, fit_ensemble_weights

TOLERANCE = 1e-5


# --------------------------------------------------------------------------- helpers
def load(path):
    return keras.saving.load_model(path, compile=False)


def predict(model, x):
    """The model's outputs as numpy; a direct call, as `predict` traces a function per model."""
    return keras.tree.map_structure(keras.ops.convert_to_numpy, model(x, training=False))


def digits_files(directory, cycles=(1, 2, 3)):
    return [directory / f"snapshot-{cycle:02d}.keras" for cycle in cycles]


def softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def multi_input_model(seed):
    """Two inputs, one of them int32 (a category id), one softmax output."""
    keras.utils.set_random_seed(seed)
    pixels = keras.Input((6,), name="pixels")
    category = keras.Input((1,), dtype="int32", name="category")
    embedded = keras.layers.Flatten()(keras.layers.Embedding(4, 3)(category))
    hidden = keras.layers.Dense(8, activation="relu")(keras.layers.Concatenate()([pixels, embedded]))
    return keras.Model([pixels, category], keras.layers.Dense(3, activation="softmax", name="probs")(hidden))


def multi_output_model(seed, as_dict):
    """One input; logits and a regression head, as a list or a dict of outputs."""
    keras.utils.set_random_seed(seed)
    features = keras.Input((5,), name="features")
    hidden = keras.layers.Dense(8, activation="tanh")(features)
    logits = keras.layers.Dense(4, name="logits")(hidden)
    value = keras.layers.Dense(1, name="value")(hidden)
    outputs = {"label": logits, "score": value} if as_dict else [logits, value]
    return keras.Model(features, outputs, name="two_heads")


@pytest.fixture(scope="module")
def shaped_files(tmp_path_factory):
    """Three saved members for each model shape: {"multi_input" | "list" | "dict": [paths]}."""
    root = tmp_path_factory.mktemp("shapes")
    makers = {
        "multi_input": multi_input_model,
        "list": lambda seed: multi_output_model(seed, as_dict=False),
        "dict": lambda seed: multi_output_model(seed, as_dict=True),
    }
    files = {}
    for shape, make in makers.items():
        files[shape] = []
        for seed in range(3):
            path = root / f"{shape}-{seed}.keras"
            make(seed).save(path)  # every member saved under the same model name, like real snapshots
            files[shape].append(path)
    return files


def shape_inputs(shape, rows=16):
    rng = np.random.default_rng(0)
    if shape == "multi_input":
        return [rng.random((rows, 6), dtype="float32"), rng.integers(0, 4, (rows, 1)).astype("int32")]
    return rng.random((rows, 5), dtype="float32")


# --------------------------------------------------------------------------- the mean
def test_directory_ensemble_is_the_mean_of_all_snapshots(digits_run, digits):
    directory, _ = digits_run
    x_test = digits[2]
    ensemble = build_ensemble(directory)
    members = [predict(load(path), x_test) for path in digits_files(directory)]
    np.testing.assert_allclose(predict(ensemble, x_test), np.mean(members, axis=0), atol=TOLERANCE)
    assert [t.name for t in ensemble.inputs] == ["pixels"]
    assert ensemble.inputs[0].dtype == "float32"
    assert ensemble.name == "snapshot_ensemble"
    assert [layer.name for layer in ensemble.layers if isinstance(layer, keras.Model)] == [
        "snapshot_01",
        "snapshot_02",
        "snapshot_03",
    ]


def test_last_keeps_the_last_snapshots_and_loads_only_them(digits_run, digits, monkeypatch):
    directory, _ = digits_run
    x_test = digits[2]
    loaded = []
    real_load = keras.saving.load_model
    monkeypatch.setattr(
        keras.saving,
        "load_model",
        lambda path, **kwargs: loaded.append(str(path)) or real_load(path, **kwargs),
    )
    ensemble = build_ensemble(directory, last=2)
    assert sorted(loaded) == [str(p) for p in digits_files(directory, (2, 3))]  # each file once
    monkeypatch.undo()
    members = [predict(load(path), x_test) for path in digits_files(directory, (2, 3))]
    np.testing.assert_allclose(predict(ensemble, x_test), np.mean(members, axis=0), atol=TOLERANCE)


def test_weights_are_normalised_and_honoured(digits_run, digits):
    directory, _ = digits_run
    x_test = digits[2]
    ensemble = build_ensemble(digits_files(directory), weights=[1.0, 0.0, 3.0])
    members = [predict(load(path), x_test) for path in digits_files(directory)]
    expected = 0.25 * members[0] + 0.75 * members[2]
    np.testing.assert_allclose(predict(ensemble, x_test), expected, atol=TOLERANCE)
    # The member of weight 0 is not in the graph at all: it would cost inference time for nothing.
    assert [layer.name for layer in ensemble.layers if isinstance(layer, keras.Model)] == [
        "snapshot_01",
        "snapshot_03",
    ]


def test_last_and_weights_together_with_model_objects(digits_run, digits):
    directory, _ = digits_run
    x_test = digits[2]
    models = [load(path) for path in digits_files(directory)]
    expected = [predict(model, x_test) for model in models]
    ensemble = build_ensemble(models, last=2, weights=np.array([3.0, 1.0]))
    np.testing.assert_allclose(
        predict(ensemble, x_test), 0.75 * expected[1] + 0.25 * expected[2], atol=TOLERANCE
    )
    # Used in place (weights shared) but never renamed: each is called inside a wrapper named snapshot_XX.
    assert [m.name for m in models] == ["digits_mlp"] * 3
    assert [layer.name for layer in ensemble.layers if isinstance(layer, keras.Model)] == [
        "snapshot_02",
        "snapshot_03",
    ]


@pytest.mark.parametrize("weights", [None, [0.2, 0.3, 0.5]])
def test_keras_round_trip_gives_the_same_predictions(digits_run, digits, tmp_path, weights):
    directory, _ = digits_run
    x_test = digits[2]
    ensemble = build_ensemble(directory, weights=weights)
    path = tmp_path / "ensemble.keras"
    ensemble.save(path)
    reloaded = keras.saving.load_model(path)  # plain Keras, safe mode, no custom objects
    np.testing.assert_allclose(predict(reloaded, x_test), predict(ensemble, x_test), atol=TOLERANCE)
    # Only built-in layers: nothing for Keras to import from this package.
    with open(path, "rb") as handle:
        assert b"keras_snapshot" not in handle.read()
    assert all(type(layer).__module__.startswith("keras.") for layer in reloaded.layers)


def test_multi_input_members(shaped_files, tmp_path):
    files = shaped_files["multi_input"]
    x = shape_inputs("multi_input")
    ensemble = build_ensemble(files)
    assert [(t.name, t.dtype, tuple(t.shape)) for t in ensemble.inputs] == [
        ("pixels", "float32", (None, 6)),
        ("category", "int32", (None, 1)),
    ]
    expected = np.mean([predict(load(path), x) for path in files], axis=0)
    np.testing.assert_allclose(predict(ensemble, x), expected, atol=TOLERANCE)
    ensemble.save(tmp_path / "multi_input.keras")
    reloaded = keras.saving.load_model(tmp_path / "multi_input.keras")
    np.testing.assert_allclose(predict(reloaded, x), expected, atol=TOLERANCE)


@pytest.mark.parametrize("shape", ["list", "dict"])
def test_multi_output_members_with_softmax_on_the_logits(shaped_files, tmp_path, shape):
    files = shaped_files[shape]
    x = shape_inputs(shape)
    activation = {"label": "softmax"} if shape == "dict" else {"logits": "softmax"}
    ensemble = build_ensemble(files, output_activation=activation, last=2)
    members = [predict(load(path), x) for path in files[1:]]
    if shape == "dict":
        expected = {
            "label": np.mean([softmax(m["label"]) for m in members], axis=0),
            "score": np.mean([m["score"] for m in members], axis=0),
        }
    else:
        expected = [
            np.mean([softmax(m[0]) for m in members], axis=0),
            np.mean([m[1] for m in members], axis=0),
        ]
    got = predict(ensemble, x)
    if shape == "dict":
        assert sorted(got) == ["label", "score"]
    keras.tree.map_structure(lambda g, e: np.testing.assert_allclose(g, e, atol=TOLERANCE), got, expected)
    ensemble.save(tmp_path / f"{shape}.keras")
    reloaded = predict(keras.saving.load_model(tmp_path / f"{shape}.keras"), x)
    keras.tree.map_structure(
        lambda g, e: np.testing.assert_allclose(g, e, atol=TOLERANCE), reloaded, expected
    )


def test_softmax_for_every_output_of_a_single_output_model(shaped_files):
    # The "label" head of the list model, cut out as a one-output model of logits.
    models = []
    for path in shaped_files["list"]:
        model = load(path)
        models.append(keras.Model(model.input, model.output[0]))
    x = shape_inputs("list")
    expected = np.mean([softmax(predict(m, x)) for m in models], axis=0)
    ensemble = build_ensemble(models, output_activation="softmax")
    np.testing.assert_allclose(predict(ensemble, x), expected, atol=TOLERANCE)
    np.testing.assert_allclose(predict(ensemble, x).sum(axis=-1), 1.0, atol=TOLERANCE)


def test_softmax_on_softmax_members_warns(digits_run):
    with pytest.warns(UserWarning, match="already ends in softmax"):
        build_ensemble(digits_files(digits_run[0])[:1], output_activation="softmax")


# --------------------------------------------------------------------------- errors
def test_missing_file_in_the_manifest_is_named(snapshot_dir):
    (snapshot_dir / "snapshot-02.keras").unlink()
    with pytest.raises(FileNotFoundError, match=r"snapshot-02\.keras"):
        build_ensemble(snapshot_dir)
    build_ensemble(snapshot_dir, last=1)  # the missing file is not needed for the last one


def test_missing_file_in_a_list_is_named(digits_run, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.keras"):
        build_ensemble([*digits_files(digits_run[0]), tmp_path / "nowhere.keras"])


def test_corrupt_file_is_named(snapshot_dir):
    (snapshot_dir / "snapshot-03.keras").write_bytes(b"not a zip file at all")
    with pytest.raises(ValueError, match=r"Could not load snapshot .*snapshot-03\.keras.*corrupt"):
        build_ensemble(snapshot_dir)


def test_directory_without_snapshots(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_ensemble(tmp_path / "absent")
    with pytest.raises(ValueError, match=r"no manifest\.json"):
        build_ensemble(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": 1, "snapshots": []}))
    with pytest.raises(ValueError, match="holds no snapshots"):
        build_ensemble(tmp_path)
    with pytest.raises(ValueError, match="empty"):
        build_ensemble([])


@pytest.mark.parametrize("last", [0, 4, -1])
def test_last_out_of_range(digits_run, last):
    with pytest.raises(ValueError, match=rf"`last`={last} is out of range.*holds 3 snapshot.*1 <= last <= 3"):
        build_ensemble(digits_run[0], last=last)


def test_last_must_be_an_integer(digits_run):
    with pytest.raises(TypeError, match="`last` must be an integer"):
        build_ensemble(digits_run[0], last=True)


def test_members_that_disagree_on_inputs_or_outputs(digits_run, tmp_path, shaped_files):
    other = keras.Sequential(
        [keras.Input((63,), name="pixels"), keras.layers.Dense(10, activation="softmax")]
    )
    other.save(tmp_path / "other-input.keras")
    with pytest.raises(
        ValueError, match=r"disagree on their inputs: .*other-input\.keras has .*\(None, 63\)"
    ):
        build_ensemble([*digits_files(digits_run[0]), tmp_path / "other-input.keras"])
    other = keras.Sequential([keras.Input((64,), name="pixels"), keras.layers.Dense(7, activation="softmax")])
    other.save(tmp_path / "other-output.keras")
    with pytest.raises(ValueError, match=r"disagree on their outputs: .*other-output\.keras"):
        build_ensemble([digits_files(digits_run[0])[0], tmp_path / "other-output.keras"])
    with pytest.raises(ValueError, match=r"disagree on their outputs: .*dict-0\.keras"):
        build_ensemble([shaped_files["list"][0], shaped_files["dict"][0]])


def test_lambda_layer_is_refused_by_default(tmp_path, digits):
    model = keras.Sequential(
        [keras.Input((64,), name="pixels"), keras.layers.Lambda(lambda t: t * 2.0), keras.layers.Dense(10)]
    )
    model.save(tmp_path / "lambda.keras")
    with pytest.raises(ValueError, match=r"Refusing to load .*lambda\.keras.*safe_mode=False"):
        build_ensemble([tmp_path / "lambda.keras"])
    ensemble = build_ensemble([tmp_path / "lambda.keras"], safe_mode=False)  # the user's explicit choice
    np.testing.assert_allclose(predict(ensemble, digits[2]), predict(model, digits[2]), atol=TOLERANCE)


@pytest.mark.parametrize(
    ("weights", "error", "message"),
    [
        ([1.0, 2.0], ValueError, "has 2 entries but the ensemble has 3"),
        ([1.0, -1.0, 1.0], ValueError, "finite and >= 0"),
        ([0.0, 0.0, 0.0], ValueError, "all zero"),
        ([1.0, float("nan"), 1.0], ValueError, "finite"),
        ("mean", ValueError, "'fit'"),
    ],
)
def test_bad_weights(digits_run, weights, error, message):
    with pytest.raises(error, match=message):
        build_ensemble(digits_run[0], weights=weights)


def test_bad_arguments(digits_run, tmp_path):
    directory = digits_run[0]
    with pytest.raises(ValueError, match="needs validation_data"):
        build_ensemble(directory, weights="fit")
    with pytest.raises(ValueError, match="only used with weights='fit'"):
        build_ensemble(directory, validation_data=(1, 2))
    with pytest.raises(ValueError, match="not a Keras activation"):
        build_ensemble(directory, output_activation="softmaxx")
    with pytest.raises(TypeError, match="must be a snapshot directory"):
        build_ensemble(load(digits_files(directory)[0]))
    with pytest.raises(ValueError, match="is not a directory"):
        build_ensemble(digits_files(directory)[0])
    with pytest.raises(ValueError, match="`name`"):
        build_ensemble(directory, name="")
    with pytest.raises(ValueError, match="has no symbolic inputs"):
        build_ensemble([keras.Sequential([keras.layers.Dense(2)])])  # never built: no inputs to copy


# --------------------------------------------------------------------------- fitted weights
def linear_member(kernel):
    model = keras.Sequential([keras.Input((2,), name="x"), keras.layers.Dense(1, use_bias=False)])
    model.layers[-1].set_weights([np.asarray(kernel, dtype="float32").reshape(2, 1)])
    return model


def test_fitted_weights_recover_a_known_mixture():
    members = [linear_member([1.0, 0.0]), linear_member([0.0, 1.0]), linear_member([1.0, 1.0])]
    x = np.random.default_rng(1).normal(size=(256, 2)).astype("float32")
    y = 0.3 * x[:, :1] + 0.7 * x[:, 1:]  # = 0.3 * member 1 + 0.7 * member 2, member 3 unused
    weights = fit_ensemble_weights(members, (x, y), loss="mse")
    np.testing.assert_allclose(weights, [0.3, 0.7, 0.0], atol=1e-3)
    assert weights.min() >= 0 and weights.sum() == pytest.approx(1.0)


def test_fitted_weights_lower_the_validation_loss(digits_run, digits):
    """Fit on a held-out validation half (never the test half); never worse than equal weights there."""
    directory, _ = digits_run
    x_held, y_held = digits[2], digits[3]
    x_val, y_val = x_held[:200], y_held[:200]
    weights = fit_ensemble_weights(directory, (x_val, y_val))
    assert weights.shape == (3,) and weights.min() >= 0 and weights.sum() == pytest.approx(1.0)
    members = np.stack([predict(load(path), x_val) for path in digits_files(directory)]).astype("float64")

    def loss(w):
        p = np.tensordot(w, members, axes=1)
        return -np.mean(np.log(np.clip(p[np.arange(len(y_val)), y_val], 1e-7, None)))

    assert loss(weights) <= loss(np.full(3, 1 / 3)) + 1e-9
    # The builder's option gives the same weights, in one pass over the files.
    ensemble = build_ensemble(directory, weights="fit", validation_data=(x_val, y_val))
    # One Rescaling per kept member, named after it (the output layer's auto-name varies with test order).
    scales = {
        layer.name.split("_")[1]: layer.scale for layer in ensemble.layers if layer.name.endswith("_weight")
    }
    expected_scales = {f"0{c}": w for c, w in zip((1, 2, 3), weights, strict=True) if w > 0}
    assert scales.keys() == expected_scales.keys()
    np.testing.assert_allclose(list(scales.values()), list(expected_scales.values()), atol=1e-6)
    expected = np.tensordot(
        weights, [predict(load(p), x_held[200:]) for p in digits_files(directory)], axes=1
    )
    np.testing.assert_allclose(predict(ensemble, x_held[200:]), expected, atol=TOLERANCE)


def test_fitted_weights_for_logits_need_an_activation(shaped_files):
    x = shape_inputs("dict", rows=64)
    y = {"label": np.arange(64) % 4, "score": np.zeros((64, 1), "float32")}
    loss = {"label": "sparse_categorical_crossentropy", "score": "mse"}
    with pytest.raises(ValueError, match="output_activation='softmax'"):
        fit_ensemble_weights(shaped_files["dict"], (x, y), loss=loss)
    weights = fit_ensemble_weights(
        shaped_files["dict"], (x, y), loss=loss, output_activation={"label": "softmax"}
    )
    assert weights.shape == (3,) and weights.sum() == pytest.approx(1.0)


def test_fitted_weights_with_a_custom_loss():
    members = [linear_member([1.0, 0.0]), linear_member([0.0, 1.0])]
    x = np.random.default_rng(2).normal(size=(128, 2)).astype("float32")
    y = x[:, 1:]

    def mean_absolute_error(y_true, y_pred):
        return np.mean(np.abs(y_true - y_pred))

    weights = fit_ensemble_weights(members, (x, y), loss=mean_absolute_error)
    np.testing.assert_allclose(weights, [0.0, 1.0], atol=1e-2)


def test_fit_argument_errors(digits_run, digits):
    directory = digits_run[0]
    with pytest.raises(TypeError, match="held-out validation data"):
        fit_ensemble_weights(directory, digits[2])
    with pytest.raises(ValueError, match="`loss` must be one of"):
        fit_ensemble_weights(directory, (digits[2], digits[3]), loss="hinge")
    with pytest.raises(ValueError, match="out of range"):
        fit_ensemble_weights(directory, (digits[2], digits[3]), last=5)
    with pytest.raises(ValueError, match="has 10 rows but x_val has"):
        fit_ensemble_weights(directory, (digits[2], digits[3][:10]))


# --------------------------------------------------------------------------- fusion fallback
def test_fuse_falls_back_to_branches_when_keras_internals_changed(digits_run, digits, monkeypatch):
    """A Keras release that moves fusion's graph internals must give the branch graph (same
    predictions) with a warning, never a wrong graph: both the up-front check and a failure inside."""
    from keras_snapshot import fusion, keras_internals

    directory, _ = digits_run
    x = digits[2][:32]
    reference = predict(build_ensemble(directory), x)

    monkeypatch.setattr(keras_internals, "fusion_supported", lambda: "Functional._run_through_graph is gone")
    with pytest.warns(RuntimeWarning, match="_run_through_graph is gone; building the branch graph"):
        ensemble = build_ensemble(directory, fuse=True)
    assert any(isinstance(layer, keras.Model) for layer in ensemble.layers)  # branches, not fused
    np.testing.assert_allclose(predict(ensemble, x), reference, atol=TOLERANCE)

    monkeypatch.setattr(keras_internals, "fusion_supported", lambda: None)

    def unavailable(*args, **kwargs):
        raise fusion.FusionUnavailable("Sequential._functional changed")

    monkeypatch.setattr(fusion, "fuse_members", unavailable)
    with pytest.warns(RuntimeWarning, match="_functional changed; building the branch graph"):
        ensemble = build_ensemble(directory, fuse=True, uncertainty=True)
    outputs = predict(ensemble, x)
    np.testing.assert_allclose(outputs["predictions"], reference, atol=TOLERANCE)
    assert outputs["mutual_information"].shape == (32,)
