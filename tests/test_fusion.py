"""build_ensemble(fuse=True): the members stacked into one set of wider layers, equal to their mean."""

from __future__ import annotations

import base64
import marshal
import subprocess
import sys

import keras
import numpy as np
import pytest
from test_export import call, refuses_torch, run_tf_serving_loader

from keras_snapshot import build_ensemble, export_saved_model, fusion

L = keras.layers
TOLERANCE = dict(rtol=1e-5, atol=1e-6)


def randomise_batch_norm(model, seed):
    """Moving statistics that differ per member, so batch normalisation is not the identity."""
    rng = np.random.default_rng(seed)
    for layer in model._flatten_layers():
        if isinstance(layer, L.BatchNormalization):
            layer.set_weights(
                [
                    rng.normal(1, 0.3, w.shape) if i != 3 else rng.uniform(0.5, 2, w.shape)
                    for i, w in enumerate(layer.get_weights())
                ]
            )
    return model


def image_cnn(seed):
    """Every image layer the fusion rewrites: a wide first convolution, batch norm, depthwise and
    grouped convolutions, a residual add, pooling, padding, flatten, concatenation, dropout."""
    keras.utils.set_random_seed(seed)
    image = keras.Input((8, 8, 3), name="image")
    x = L.Conv2D(4, 3, padding="same", activation="relu")(image)
    x = L.BatchNormalization()(x)
    y = L.DepthwiseConv2D(3, padding="same", depth_multiplier=2)(x)
    y = L.Conv2D(4, 1, groups=2, activation="elu")(y)
    x = L.Add()([x, y])
    x = L.MaxPooling2D()(x)
    x = L.Cropping2D(1)(L.ZeroPadding2D(1)(x))
    pooled = L.GlobalAveragePooling2D()(x)
    flat = L.Dense(6, activation="tanh")(L.Flatten()(x))
    h = L.Dropout(0.5)(L.Concatenate()([pooled, flat]))
    outputs = L.Dense(5, activation="softmax", name="probabilities")(h)
    return randomise_batch_norm(keras.Model(image, outputs, name="cnn"), seed)


def sequence_model(seed):
    """Token ids: embedding, causal and grouped 1-D convolutions, a dense layer on a sequence,
    reshape/permute, global pooling; logits out."""
    keras.utils.set_random_seed(seed)
    tokens = keras.Input((6,), dtype="int32", name="tokens")
    x = L.Embedding(11, 4)(tokens)
    x = L.Conv1D(6, 3, padding="causal", activation="relu")(x)
    x = L.Conv1D(6, 3, padding="same", groups=2)(x)
    x = L.Dense(5, activation="gelu")(x)
    x = L.Permute((2, 1))(L.Reshape((3, 10))(x))
    x = L.GlobalMaxPooling1D()(x)
    return keras.Model(tokens, L.Dense(3, name="logits")(x), name="sequence")


def nested_model(seed):
    """A nested Sequential block, a frozen identical preprocessing layer, Softmax on a reshaped
    tensor and list outputs."""
    keras.utils.set_random_seed(seed)
    block = keras.Sequential(
        [keras.Input((6,)), L.Dense(8), L.LeakyReLU(0.1), L.Dense(8, activation="sigmoid")], name="block"
    )
    features = keras.Input((6,), name="features")
    x = block(L.Rescaling(0.5, offset=0.1)(features))
    grid = L.Softmax(axis=1)(L.Reshape((2, 4))(x))
    first = L.Dense(3, activation="softmax", name="first")(L.Flatten()(grid))
    second = L.Dense(2, name="second")(x)
    return keras.Model(features, [first, second], name="nested")


def frozen_backbone(seed):
    """The same frozen first layer in every member (only the head was trained)."""
    keras.utils.set_random_seed(0)
    features = keras.Input((5,), name="features")
    backbone = L.Dense(7, activation="relu", name="backbone", trainable=False)
    hidden = backbone(features)
    keras.utils.set_random_seed(seed)
    head = L.Dense(4, activation="softmax", name="head")(hidden)
    return keras.Model(features, {"label": head, "embedding": hidden}, name="frozen")


def sequential_mlp(seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((6,), name="features"), L.Dense(8, activation="relu"), L.Dense(3, activation="softmax")]
    )


def inputs_for(model, rows=7, seed=3):
    rng = np.random.default_rng(seed)
    spec = model.inputs[0]
    if "int" in str(spec.dtype):
        return rng.integers(0, 11, (rows, *spec.shape[1:])).astype("int32")
    return rng.random((rows, *spec.shape[1:]), dtype=np.float32)


def weighted_mean(members, x, weights=None):
    outputs = [call(member, x) for member in members]
    weights = np.full(len(members), 1 / len(members)) if weights is None else np.asarray(weights)
    weights = weights / weights.sum()
    return keras.tree.map_structure(
        lambda *ys: sum(w * y for w, y in zip(weights, ys, strict=True)), *outputs
    )


def assert_structure_close(actual, expected):
    keras.tree.assert_same_structure(actual, expected)
    for a, e in zip(keras.tree.flatten(actual), keras.tree.flatten(expected), strict=True):
        np.testing.assert_allclose(a, e, **TOLERANCE)


def no_member_copies(fused, member):
    """The fused graph holds each weight once, stacked: no member model inside, and one variable
    per member variable (plus the combining kernel of each output)."""
    assert not [layer for layer in fused.layers if isinstance(layer, keras.Model)]
    outputs = len(keras.tree.flatten(member.outputs))
    assert len(fused.weights) <= len(member.weights) + outputs


# --------------------------------------------------------------------------- equal to the mean
@pytest.mark.parametrize(
    "maker", [image_cnn, sequence_model, nested_model, sequential_mlp], ids=lambda f: f.__name__
)
def test_fused_equals_the_mean_of_the_members(maker):
    members = [maker(seed) for seed in range(3)]
    x = inputs_for(members[0])
    expected = weighted_mean(members, x)
    fused = build_ensemble(members, fuse=True)
    assert_structure_close(call(fused, x), expected)
    no_member_copies(fused, members[0])
    # and the same as the branch graph, output for output
    assert_structure_close(call(build_ensemble(members), x), expected)


def test_fused_digits_snapshots(snapshot_dir, digits):
    """The real snapshot run: fused == branches == mean of the loaded files."""
    x = digits[2][:50]
    files = sorted(snapshot_dir.glob("snapshot-*.keras"))
    members = [keras.saving.load_model(path, compile=False) for path in files]
    fused = build_ensemble(snapshot_dir, fuse=True)
    np.testing.assert_allclose(call(fused, x), weighted_mean(members, x), **TOLERANCE)
    dense = [layer for layer in fused.layers if isinstance(layer, L.Dense)]
    assert [layer.units for layer in dense] == [32 * len(files)]  # the first layer, M members wide
    assert [type(layer).__name__ for layer in fused.layers].count("EinsumDense") == 2  # head + mean


def test_weights_last_and_output_activation(snapshot_dir, digits):
    x = digits[2][:20]
    files = sorted(snapshot_dir.glob("snapshot-*.keras"))[-2:]
    members = [keras.saving.load_model(path, compile=False) for path in files]
    fused = build_ensemble(snapshot_dir, last=2, weights=[1, 3], fuse=True)
    np.testing.assert_allclose(call(fused, x), weighted_mean(members, x, [1, 3]), **TOLERANCE)

    # A zero weight drops the member from the stack: 2 of 3 members, 64 units wide.
    three = [keras.saving.load_model(path, compile=False) for path in sorted(snapshot_dir.glob("*.keras"))]
    fused = build_ensemble(three, weights=[0.5, 0, 0.5], fuse=True)
    np.testing.assert_allclose(call(fused, x), weighted_mean([three[0], three[2]], x), **TOLERANCE)
    assert [layer.units for layer in fused.layers if isinstance(layer, L.Dense)] == [64]

    # Weights fitted on validation data: the same weights, the same outputs as the branch graph.
    x_val, y_val = digits[2][:100], digits[3][:100]
    fitted = build_ensemble(snapshot_dir, weights="fit", validation_data=(x_val, y_val), fuse=True)
    branches = build_ensemble(snapshot_dir, weights="fit", validation_data=(x_val, y_val))
    np.testing.assert_allclose(call(fitted, x), call(branches, x), **TOLERANCE)

    # Logits: softmax per member, then the mean.
    logits = [sequence_model(seed) for seed in range(2)]
    tokens = inputs_for(logits[0])
    fused = build_ensemble(logits, output_activation="softmax", fuse=True)
    expected = np.mean(
        [keras.ops.convert_to_numpy(keras.ops.softmax(call(m, tokens))) for m in logits], axis=0
    )
    np.testing.assert_allclose(call(fused, tokens), expected, **TOLERANCE)
    np.testing.assert_allclose(call(fused, tokens).sum(axis=-1), 1.0, rtol=1e-5)


def test_identical_frozen_layers_run_once():
    members = [frozen_backbone(seed) for seed in range(3)]
    x = inputs_for(members[0])
    fused = build_ensemble(members, fuse=True)
    assert_structure_close(call(fused, x), weighted_mean(members, x))
    backbone = fused.get_layer("backbone")
    assert backbone.units == 7  # not stacked: one copy serves all members
    np.testing.assert_array_equal(
        backbone.get_weights()[0], members[0].get_layer("backbone").get_weights()[0]
    )


def test_saves_and_reloads_without_this_package(tmp_path):
    members = [image_cnn(seed) for seed in range(2)]
    x = inputs_for(members[0])
    fused = build_ensemble(members, fuse=True)
    path = tmp_path / "fused.keras"
    fused.save(path)
    np.save(tmp_path / "x.npy", x)
    script = (
        "import sys, numpy as np, keras\n"
        "assert 'keras_snapshot' not in sys.modules\n"
        f"model = keras.saving.load_model({str(path)!r})\n"
        f"np.save({str(tmp_path / 'y.npy')!r}, keras.ops.convert_to_numpy(model(np.load({str(tmp_path / 'x.npy')!r}))))\n"
    )
    process = subprocess.run(
        [sys.executable, "-I", "-c", script], capture_output=True, text=True, timeout=300
    )
    assert process.returncode == 0, process.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), weighted_mean(members, x), **TOLERANCE)


def test_exported_fused_ensemble_as_tf_serving_loads_it(tmp_path):
    members = [image_cnn(seed) for seed in range(3)]
    x = inputs_for(members[0])
    fused = build_ensemble(members, fuse=True)
    if refuses_torch(export_saved_model, fused, tmp_path / "serving"):
        return
    with pytest.warns(UserWarning, match="XLA") if keras.backend.backend() == "tensorflow" else _no_warning():
        path = export_saved_model(fused, tmp_path / "serving")
    (served,) = run_tf_serving_loader(tmp_path, [(path, {"image": x})])
    np.testing.assert_allclose(served["predictions"], weighted_mean(members, x), **TOLERANCE)
    with pytest.raises(ValueError, match="fuse=False"):
        export_saved_model(fused, tmp_path / "serving", member_outputs=True)


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# --------------------------------------------------------------------------- refusals
def test_unsupported_layers_are_named():
    def with_layer_norm(seed):
        keras.utils.set_random_seed(seed)
        features = keras.Input((4,), name="features")
        x = L.LayerNormalization(name="norm")(L.Dense(6, name="hidden")(features))
        return keras.Model(features, L.Dense(2, activation="softmax")(x))

    with pytest.raises(ValueError, match=r"'norm' \(LayerNormalization\).*fuse=False"):
        build_ensemble([with_layer_norm(0), with_layer_norm(1)], fuse=True)
    # the default graph takes them
    build_ensemble([with_layer_norm(0), with_layer_norm(1)])


def test_unknown_sizes_are_refused_where_members_must_be_split():
    def variable_length(seed):
        keras.utils.set_random_seed(seed)
        tokens = keras.Input((None, 4), name="tokens")
        x = L.Conv1D(3, 2, name="conv")(tokens)
        return keras.Model(tokens, L.Softmax(name="per_step")(x))  # softmax per member needs the split

    with pytest.raises(ValueError, match=r"'per_step' \(Softmax\).*unknown until run time"):
        build_ensemble([variable_length(0), variable_length(1)], fuse=True)


def test_members_of_different_architectures_are_refused():
    def mlp(units, seed):
        keras.utils.set_random_seed(seed)
        features = keras.Input((4,), name="features")
        return keras.Model(features, L.Dense(2, activation="softmax")(L.Dense(units)(features)))

    with pytest.raises(ValueError, match="do not share one architecture"):
        build_ensemble([mlp(6, 0), mlp(5, 1)], fuse=True)


def test_fuse_must_be_a_bool(snapshot_dir):
    with pytest.raises(TypeError, match="fuse"):
        build_ensemble(snapshot_dir, fuse="yes")


def _halve_factory():
    return lambda t: t * 0.5


def test_lambda_bytecode_compares_by_what_it_is_not_by_marshal_flags():
    # marshal's bytes for one code object change with reference counts (its FLAG_REF bits): two
    # snapshots of one run saved at different moments held different strings for the same lambda,
    # and fusion refused them as "not one architecture" (seen on JAX after other tests had run).
    def serialized(code):
        return {
            "class_name": "__lambda__",
            "config": {"code": base64.b64encode(code).decode(), "closure": None},
        }

    alone = marshal.dumps(_halve_factory().__code__)
    function = _halve_factory()
    code = function.__code__  # a second reference: marshal now flags it
    held = marshal.dumps(code)
    assert alone != held
    assert fusion._canonical(serialized(alone)) == fusion._canonical(serialized(held))
    other = marshal.dumps((lambda t: t * 0.25).__code__)
    assert fusion._canonical(serialized(alone)) != fusion._canonical(serialized(other))
