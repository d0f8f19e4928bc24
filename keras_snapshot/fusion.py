"""The members of an ensemble fused into one set of wider layers (`build_ensemble(..., fuse=True)`).

Snapshots of one run share one architecture, so the M copies of each layer can run as ONE layer
whose weights are the M members' weights side by side: one convolution with M x F filters
(grouped M ways after the first layer), one `EinsumDense` that holds the M dense kernels, one
batch normalisation with M x C channels. The graph then has about as many ops as one member
instead of M times as many, which is what small-batch latency pays for. Results equal the mean of
the members (to float rounding); only built-in layers are used.

Tensors of the fused graph come in three layouts (B = batch, M = members, C = channels):

- shared: the same for every member (the inputs, and what frozen, identical layers make of them);
- stacked: channels last, member m's channels at [m*C, (m+1)*C), e.g. (B, H, W, M*C);
- member: a member axis after the batch axis, (B, M, ...): where per-member dense layers,
  flattening and last-axis activations such as softmax are exact.

Layers with identical weights in every member (frozen preprocessing, a frozen backbone) that only
see shared tensors run once, unstacked.
"""

from __future__ import annotations

import base64
import binascii
import inspect
import marshal
import types

import keras
import numpy as np

from keras_snapshot import keras_internals

# Activations that act element by element, so they may run on any layout. Any other activation
# (softmax, log_softmax, a custom one) acts on the last axis and runs on the member layout.
_ELEMENTWISE_ACTIVATIONS = frozenset(
    [
        "linear",
        "relu",
        "relu6",
        "sigmoid",
        "tanh",
        "elu",
        "selu",
        "gelu",
        "silu",
        "swish",
        "softplus",
        "softsign",
        "exponential",
        "leaky_relu",
        "hard_sigmoid",
        "hard_silu",
        "hard_swish",
        "mish",
        "celu",
        "log_sigmoid",
        "hard_tanh",
        "tanh_shrink",
        "soft_shrink",
        "hard_shrink",
        "squareplus",
        "sparse_plus",
    ]
)
_ELEMENTWISE_LAYERS = (
    keras.layers.ReLU,
    keras.layers.LeakyReLU,
    keras.layers.ELU,
    keras.layers.Dropout,
    keras.layers.SpatialDropout1D,
    keras.layers.SpatialDropout2D,
    keras.layers.SpatialDropout3D,
    keras.layers.GaussianNoise,
    keras.layers.GaussianDropout,
    keras.layers.AlphaDropout,
    keras.layers.Rescaling,
    keras.layers.Identity,
    keras.layers.ActivityRegularization,
)
# Per-channel, channels-last layers without weights: exact on the stacked layout.
_PER_CHANNEL_LAYERS = (
    keras.layers.MaxPooling1D,
    keras.layers.MaxPooling2D,
    keras.layers.MaxPooling3D,
    keras.layers.AveragePooling1D,
    keras.layers.AveragePooling2D,
    keras.layers.AveragePooling3D,
    keras.layers.GlobalMaxPooling1D,
    keras.layers.GlobalMaxPooling2D,
    keras.layers.GlobalMaxPooling3D,
    keras.layers.GlobalAveragePooling1D,
    keras.layers.GlobalAveragePooling2D,
    keras.layers.GlobalAveragePooling3D,
    keras.layers.UpSampling1D,
    keras.layers.UpSampling2D,
    keras.layers.UpSampling3D,
    keras.layers.ZeroPadding1D,
    keras.layers.ZeroPadding2D,
    keras.layers.ZeroPadding3D,
    keras.layers.Cropping1D,
    keras.layers.Cropping2D,
    keras.layers.Cropping3D,
)
_MERGE_LAYERS = (
    keras.layers.Add,
    keras.layers.Subtract,
    keras.layers.Multiply,
    keras.layers.Average,
    keras.layers.Maximum,
    keras.layers.Minimum,
)
_CONV_LAYERS = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)
_DEPTHWISE_LAYERS = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)
SUPPORTED = (
    "Dense, Conv1D/2D/3D, DepthwiseConv1D/2D, BatchNormalization, Embedding (mask_zero=False), "
    "pooling, global pooling, padding, cropping, up-sampling (channels_last), Flatten, Reshape, "
    "Permute, Concatenate, Add/Subtract/Multiply/Average/Maximum/Minimum, Activation, Softmax, ReLU, "
    "LeakyReLU, ELU, Rescaling, keras.ops.softmax/sigmoid, dropout and noise layers, nested "
    "functional/Sequential models, and "
    "any layer whose weights are identical in every member and whose inputs are the model's inputs"
)
SHARED, STACKED, MEMBER, BROKEN = "shared", "stacked", "member", "broken"


class FusionError(ValueError):
    """The members cannot be fused; the message says which layer and why."""


class FusionUnavailable(FusionError):
    """This Keras release changed the graph internals fusion walks (see `keras_internals`): no
    members can be fused, and the branch graph (fuse=False) is the correct fallback."""


def _static(tensor) -> tuple[int, ...]:
    """The shape less the batch axis; moving the member axis needs it known before run time."""
    shape = tuple(tensor.shape[1:])
    if any(d is None for d in shape):
        raise FusionError(
            f"a tensor of shape {(None, *shape)} has dimensions unknown until run time, and moving the "
            "member axis needs them static"
        )
    return shape


def _assign(layer, arrays) -> None:
    """set_weights, reshaped to each variable (EinsumDense keeps broadcast 1s in its bias)."""
    layer.set_weights([np.reshape(a, v.shape) for a, v in zip(arrays, layer.weights, strict=True)])


class _T:
    """A tensor of the fused graph and its layout."""

    def __init__(self, tensor, layout: str):
        self.tensor = tensor
        self.layout = layout


# ------------------------------------------------------------------------------------- structure
def _functional(model):
    if isinstance(model, keras.Sequential):
        functional = keras_internals.sequential_graph(model)
        if functional is None:
            raise FusionError(f"Sequential model {model.name!r} has no Input: it cannot be fused.")
        return functional
    return model


def _is_model(op) -> bool:
    return isinstance(op, keras.Model)


def _config(op) -> dict:
    try:
        config = dict(op.get_config())
    except NotImplementedError:  # a custom layer without get_config: compare what is known
        return {}
    config.pop("name", None)
    return _canonical(config)


def _canonical(value):
    """`value` with every serialized lambda's bytecode replaced by what the code is: marshal's bytes
    for one function differ from one save to the next (its reference flags follow the objects'
    reference counts), so two snapshots of one run would not compare equal."""
    if isinstance(value, dict):
        if value.get("class_name") == "__lambda__" and isinstance(value.get("config"), dict):
            config = dict(value["config"])
            config["code"] = _code_key(config.get("code"))
            return {**value, "config": _canonical(config)}
        return {key: _canonical(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_canonical(item) for item in value)
    return value


def _code_key(code):
    """A comparable description of a base64-marshalled code object (the string itself if it is not one)."""
    if not isinstance(code, str):
        return code
    try:
        loaded = marshal.loads(base64.b64decode(code.encode("ascii")))
    except (ValueError, EOFError, TypeError, binascii.Error):
        return code
    return _code_tuple(loaded) if isinstance(loaded, types.CodeType) else code


def _code_tuple(code: types.CodeType) -> tuple:
    consts = tuple(_code_tuple(c) if isinstance(c, types.CodeType) else repr(c) for c in code.co_consts)
    return (code.co_code, consts, code.co_names, code.co_varnames, code.co_argcount, code.co_kwonlyargcount)


def _signature(model) -> list:
    """What two members must share to be fused: every op's class, config (less its name) and
    weight shapes, and how the ops are wired, by position."""
    functional = _functional(model)
    ops = list(functional.operations)
    index = {id(op): i for i, op in enumerate(ops)}
    signature = []
    for op in ops:
        if _is_model(op):
            signature.append((type(op).__name__, _signature(op)))
        else:
            signature.append(
                (type(op).__name__, repr(_config(op)), [tuple(w.shape) for w in getattr(op, "weights", [])])
            )
    nodes = keras_internals.nodes_by_depth(functional)
    for depth in sorted(nodes, reverse=True):
        for node in nodes[depth]:
            if node.operation is None or node.is_input:
                continue
            wiring = []
            for t in node.input_tensors:
                operation, node_index, tensor_index = keras_internals.tensor_history(t)
                wiring.append((index.get(id(operation)), node_index, tensor_index))
            signature.append((index.get(id(node.operation)), wiring))
    return signature


def _peers(models) -> dict[int, list]:
    """{id(op of the first member): [the same op in every member]}, nested models included."""
    peers = {}
    lists = [list(_functional(model).operations) for model in models]
    for ops in zip(*lists, strict=True):
        peers[id(ops[0])] = list(ops)
        if _is_model(ops[0]):
            peers.update(_peers(ops))
    return peers


# ------------------------------------------------------------------------------------- the builder
class _Fuser:
    def __init__(self, models, labels, taken, safe_mode: bool = True):
        self.models = models
        self.safe_mode = safe_mode
        self.count = len(models)
        reference = _signature(models[0])
        for model, label in zip(models[1:], labels[1:], strict=True):
            if _signature(model) != reference:
                raise FusionError(
                    f"{label} and {labels[0]} do not share one architecture (layers, their settings and "
                    "wiring), so their layers cannot be stacked. Snapshots of one training run always "
                    "do; for members built apart use fuse=False."
                )
        self.peers = _peers(models)
        self.names = set(taken)
        self.problems = []
        self._weights = {}

    # -------------------------------------------------------------------- helpers
    def name(self, base: str) -> str:
        name, suffix = base, 1
        while name in self.names:
            suffix += 1
            name = f"{base}_{suffix}"
        self.names.add(name)
        return name

    def weights(self, op) -> list[list[np.ndarray]]:
        """The op's weights in every member: [member][weight], read once per op."""
        if id(op) not in self._weights:
            self._weights[id(op)] = [peer.get_weights() for peer in self.peers[id(op)]]
        return self._weights[id(op)]

    def to_member(self, t: _T) -> _T:
        if t.layout == MEMBER:
            return t
        x = t.tensor
        shape = _static(x)
        if t.layout == SHARED:
            x = keras.layers.Reshape((1, *shape), name=self.name("fused_expand"))(x)
            if self.count > 1:
                x = keras.layers.Concatenate(axis=1, name=self.name("fused_repeat"))([x] * self.count)
            return _T(x, MEMBER)
        *spatial, channels = shape
        channels //= self.count
        x = keras.layers.Reshape((*spatial, self.count, channels), name=self.name("fused_split"))(x)
        rank = len(spatial)
        if rank:
            order = (rank + 1, *range(1, rank + 1), rank + 2)
            x = keras.layers.Permute(order, name=self.name("fused_members_first"))(x)
        return _T(x, MEMBER)

    def to_stacked(self, t: _T) -> _T:
        if t.layout == STACKED:
            return t
        x = t.tensor
        if t.layout == SHARED:
            if self.count > 1:
                x = keras.layers.Concatenate(axis=-1, name=self.name("fused_tile"))([x] * self.count)
            return _T(x, STACKED)
        _, *spatial, channels = _static(x)
        rank = len(spatial)
        if rank:
            order = (*range(2, rank + 2), 1, rank + 2)
            x = keras.layers.Permute(order, name=self.name("fused_members_last"))(x)
        x = keras.layers.Reshape((*spatial, self.count * channels), name=self.name("fused_join"))(x)
        return _T(x, STACKED)

    def fresh(self, op, **changes):
        config = op.get_config()
        config.update(changes)
        config["name"] = self.name(changes.get("name", op.name))
        # Layers that run code (Lambda) take the caller's safe_mode, as loading the files did.
        if "safe_mode" in inspect.signature(type(op).from_config).parameters:
            return type(op).from_config(config, safe_mode=self.safe_mode)
        return type(op).from_config(config)

    def activate(self, t: _T, activation, base: str) -> _T:
        """Applies an activation given by name (or config) on the right layout."""
        name = activation if isinstance(activation, str) else None
        if name == "linear":
            return t
        if name not in _ELEMENTWISE_ACTIVATIONS:
            t = self.to_member(t)
        layer = keras.layers.Activation(activation, name=self.name(f"{base}_activation"))
        return _T(layer(t.tensor), t.layout)

    # -------------------------------------------------------------------- the walk
    def run(self, model, inputs):
        """Runs `model`'s graph on fused tensors `inputs` (a structure of _T)."""
        functional = _functional(model)
        flat = keras.tree.flatten(inputs) if not isinstance(inputs, _T) else [inputs]
        return keras_internals.run_graph(functional, flat, self.call)

    def call(self, op, *args, **kwargs):
        tensors = [a for a in keras.tree.flatten((args, kwargs)) if isinstance(a, _T)]
        # Keras records `training` at graph construction; the caller's mode overrides it at run time.
        extra = {k: v for k, v in kwargs.items() if v is not None and k != "training"}
        if any(isinstance(v, _T) for v in keras.tree.flatten(kwargs)) or extra:
            self.problems.append(f"{op.name!r} ({type(op).__name__}): it is called with keyword arguments")
            return self.placeholder(op)
        if any(t.layout == BROKEN for t in tensors):
            return self.placeholder(op)
        if _is_model(op):
            return self.run(op, args[0] if len(args) == 1 else list(args))
        try:
            if all(t.layout == SHARED for t in tensors) and self.identical(op):
                return self.shared(op, args)
            handler = self.handler(op)
            if handler is None:
                raise FusionError("it has no fused form")
            return handler(op, *args)
        except FusionError as error:
            self.problems.append(f"{op.name!r} ({type(op).__name__}): {error}")
            return self.placeholder(op)

    def shared(self, op, args):
        """Frozen or weightless and fed the same data: one copy serves every member."""
        try:
            layer = self.fresh(op)
        except Exception as error:
            raise FusionError(f"cannot re-create it from its config ({error})") from error
        outputs = layer(*keras.tree.map_structure(lambda a: a.tensor if isinstance(a, _T) else a, args))
        if op.weights:
            layer.set_weights(op.get_weights())
        return keras.tree.map_structure(lambda x: _T(x, SHARED), outputs)

    def placeholder(self, op):
        """Stands for the outputs of a layer that could not be fused, so that the walk goes on and
        one error message names every such layer."""
        try:
            count = len(keras.tree.flatten(op.output))  # the outputs of the op's first call
        except (AttributeError, ValueError):  # never called
            count = 1
        return _T(None, BROKEN) if count == 1 else [_T(None, BROKEN) for _ in range(count)]

    def identical(self, op) -> bool:
        weights = self.weights(op)
        return all(
            all(np.array_equal(a, b) for a, b in zip(weights[0], other, strict=True)) for other in weights[1:]
        )

    def handler(self, op):
        if isinstance(op, keras.layers.Activation):
            return self.activation_layer
        if isinstance(op, _ELEMENTWISE_LAYERS):
            return self.elementwise
        if isinstance(op, _PER_CHANNEL_LAYERS):
            return self.per_channel
        if isinstance(op, keras.layers.Softmax):
            return self.softmax
        if isinstance(op, keras.layers.Flatten):
            return self.flatten
        if isinstance(op, keras.layers.Reshape):
            return self.reshape
        if isinstance(op, keras.layers.Permute):
            return self.permute
        if isinstance(op, _MERGE_LAYERS):
            return self.merge
        if isinstance(op, keras.layers.Concatenate):
            return self.concatenate
        if isinstance(op, keras.layers.BatchNormalization):
            return self.batch_normalization
        if isinstance(op, keras.layers.Dense):
            return self.dense
        if isinstance(op, _CONV_LAYERS) and not isinstance(op, _DEPTHWISE_LAYERS):
            return self.conv
        if isinstance(op, _DEPTHWISE_LAYERS):
            return self.depthwise
        if isinstance(op, keras.layers.Embedding):
            return self.embedding
        if not isinstance(op, keras.layers.Layer) and type(op).__name__ in ("Softmax", "Sigmoid"):
            return self.activation_op  # keras.ops.softmax / sigmoid applied in a functional model
        return None

    # -------------------------------------------------------------------- layer rules
    def activation_layer(self, op, t):
        return self.activate(t, op.get_config()["activation"], op.name)

    def activation_op(self, op, t):
        if type(op).__name__ == "Sigmoid":
            return self.activate(t, "sigmoid", op.name)
        axis = getattr(op, "axis", -1)
        axes = axis if isinstance(axis, (list, tuple)) else [axis]
        t = self.to_member(t)
        moved = [a if a < 0 else a + 1 for a in axes]
        layer = keras.layers.Softmax(
            axis=moved if isinstance(axis, (list, tuple)) else moved[0], name=self.name(op.name)
        )
        return _T(layer(t.tensor), MEMBER)

    def elementwise(self, op, t):
        return _T(self.fresh(op)(t.tensor), t.layout)

    def per_channel(self, op, t):
        if op.get_config().get("data_format", "channels_last") != "channels_last":
            raise FusionError("only data_format='channels_last' is supported")
        t = self.to_stacked(t)
        return _T(self.fresh(op)(t.tensor), STACKED)

    def softmax(self, op, t):
        axis = op.get_config()["axis"]
        axes = axis if isinstance(axis, (list, tuple)) else [axis]
        t = self.to_member(t)
        moved = [a if a < 0 else a + 1 for a in axes]
        return _T(
            self.fresh(op, axis=moved if isinstance(axis, (list, tuple)) else moved[0])(t.tensor), MEMBER
        )

    def flatten(self, op, t):
        t = self.to_member(t)
        return _T(keras.layers.Reshape((self.count, -1), name=self.name(op.name))(t.tensor), MEMBER)

    def reshape(self, op, t):
        t = self.to_member(t)
        target = (self.count, *op.get_config()["target_shape"])
        return _T(keras.layers.Reshape(target, name=self.name(op.name))(t.tensor), MEMBER)

    def permute(self, op, t):
        t = self.to_member(t)
        dims = (1, *(d + 1 for d in op.get_config()["dims"]))
        return _T(keras.layers.Permute(dims, name=self.name(op.name))(t.tensor), MEMBER)

    def _common(self, tensors: list[_T]) -> list[_T]:
        if any(t.layout == MEMBER for t in tensors) or any(len(t.tensor.shape) < 2 for t in tensors):
            return [self.to_member(t) for t in tensors]
        return [self.to_stacked(t) for t in tensors]

    def merge(self, op, inputs):
        tensors = self._common(list(inputs))
        return _T(self.fresh(op)([t.tensor for t in tensors]), tensors[0].layout)

    def concatenate(self, op, inputs):
        tensors = [self.to_member(t) for t in inputs]
        axis = op.get_config()["axis"]
        layer = self.fresh(op, axis=axis if axis < 0 else axis + 1)
        return _T(layer([t.tensor for t in tensors]), MEMBER)

    def batch_normalization(self, op, t):
        config = op.get_config()
        axis = config["axis"]
        axis = axis[0] if isinstance(axis, (list, tuple)) and len(axis) == 1 else axis
        rank = len(t.tensor.shape) - (t.layout == MEMBER)
        if axis not in (-1, rank - 1):
            raise FusionError("only axis=-1 (channels last) is supported")
        t = self.to_stacked(t)
        layer = self.fresh(op, axis=-1)
        x = layer(t.tensor)
        layer.set_weights([np.concatenate(ws, axis=0) for ws in zip(*self.weights(op), strict=True)])
        return _T(x, STACKED)

    def dense(self, op, t):
        config = op.get_config()
        if config.get("lora_rank"):
            raise FusionError("LoRA-enabled Dense layers are not supported")
        weights = self.weights(op)
        activation = config["activation"]
        elementwise = isinstance(activation, str) and activation in _ELEMENTWISE_ACTIVATIONS
        if t.layout == SHARED:
            layer = self.fresh(
                op, units=config["units"] * self.count, activation=activation if elementwise else "linear"
            )
            x = layer(t.tensor)
            layer.set_weights([np.concatenate(ws, axis=-1) for ws in zip(*weights, strict=True)])
            out = _T(x, STACKED)
            return out if elementwise else self.activate(out, activation, op.name)
        t = self.to_member(t)
        inner = tuple(t.tensor.shape[2:-1])
        extra = "bcdefghjkl"[: len(inner)]
        layer = keras.layers.EinsumDense(
            f"am{extra}i,mio->am{extra}o",
            output_shape=(self.count, *inner, config["units"]),
            bias_axes="mo" if config["use_bias"] else None,
            activation=activation,
            dtype=config.get("dtype"),
            name=self.name(op.name),
        )
        x = layer(t.tensor)
        _assign(layer, [np.stack(ws, axis=0) for ws in zip(*weights, strict=True)])
        return _T(x, MEMBER)

    def conv(self, op, t):
        config = op.get_config()
        if config.get("data_format", "channels_last") != "channels_last":
            raise FusionError("only data_format='channels_last' is supported")
        groups = config.get("groups", 1)
        activation = config["activation"]
        elementwise = isinstance(activation, str) and activation in _ELEMENTWISE_ACTIVATIONS
        if t.layout == SHARED and groups == 1:
            new_groups = 1  # every member reads the same channels: one wide convolution
        else:
            t = self.to_stacked(t)
            new_groups = groups * self.count  # member m's channels only feed member m's filters
        layer = self.fresh(
            op,
            filters=config["filters"] * self.count,
            groups=new_groups,
            activation=activation if elementwise else "linear",
        )
        x = layer(t.tensor)
        layer.set_weights([np.concatenate(ws, axis=-1) for ws in zip(*self.weights(op), strict=True)])
        out = _T(x, STACKED)
        return out if elementwise else self.activate(out, activation, op.name)

    def depthwise(self, op, t):
        config = op.get_config()
        if config.get("data_format", "channels_last") != "channels_last":
            raise FusionError("only data_format='channels_last' is supported")
        activation = config["activation"]
        elementwise = isinstance(activation, str) and activation in _ELEMENTWISE_ACTIVATIONS
        t = self.to_stacked(t)
        layer = self.fresh(op, activation=activation if elementwise else "linear")
        x = layer(t.tensor)
        # kernel (..., C, multiplier): members side by side on the channel axis; bias (C*multiplier,)
        layer.set_weights(
            [
                np.concatenate(ws, axis=-2 if ws[0].ndim > 1 else 0)
                for ws in zip(*self.weights(op), strict=True)
            ]
        )
        out = _T(x, STACKED)
        return out if elementwise else self.activate(out, activation, op.name)

    def embedding(self, op, t):
        config = op.get_config()
        if config.get("mask_zero"):
            raise FusionError("mask_zero=True is not supported")
        if t.layout != SHARED:
            raise FusionError("only embeddings of the model's inputs are supported")
        layer = self.fresh(op, output_dim=config["output_dim"] * self.count)
        x = layer(t.tensor)
        layer.set_weights([np.concatenate(ws, axis=-1) for ws in zip(*self.weights(op), strict=True)])
        return _T(x, STACKED)


def fuse_members(
    models, labels, inputs, keys, weights, activations, member_stacks=None, safe_mode: bool = True
) -> dict:
    """{output key: the weighted mean of `models`' outputs}, computed with stacked layers.

    `inputs` are the ensemble's fresh `keras.Input`s (the members' structure), `keys` the
    members' output keys, `weights` one normalised weight per member, `activations`
    {key: activation name or None} applied to each member output before averaging.
    `member_stacks`, if a dict, receives {key: the members' activated outputs, (B, M, ...)}
    (for uncertainty outputs); keys whose output every member computes alike are left out.
    `safe_mode` is the caller's (build_ensemble's): layers re-created from their config (a Lambda
    shared by every member) are deserialized under it, as the members' files were.
    """
    reason = keras_internals.fusion_supported()
    if reason is not None:
        raise FusionUnavailable(_unavailable(reason))
    try:
        return _fuse(models, labels, inputs, keys, weights, activations, member_stacks, safe_mode)
    except keras_internals.KerasInternalsError as error:
        raise FusionUnavailable(_unavailable(str(error))) from error


def _unavailable(reason: str) -> str:
    return (
        f"Fusion relies on Keras graph internals that Keras {keras.version()} changed ({reason}); "
        "build the ensemble with fuse=False (the branch graph gives the same predictions)."
    )


def _fuse(models, labels, inputs, keys, weights, activations, member_stacks=None, safe_mode=True) -> dict:
    # The combined outputs carry the members' output names, so no other layer may take them.
    fuser = _Fuser(
        models, labels, taken=[x.name for x in keras.tree.flatten(inputs)] + keys, safe_mode=safe_mode
    )
    flat_inputs = [_T(x, SHARED) for x in keras.tree.flatten(inputs)]
    outputs = fuser.run(models[0], flat_inputs)
    if isinstance(outputs, dict):
        flat_outputs = [outputs[key] for key in keys]
    else:
        flat_outputs = [outputs] if isinstance(outputs, _T) else list(outputs)
    if fuser.problems:
        raise FusionError(
            "These layers cannot be fused: "
            + "; ".join(fuser.problems)
            + f". Supported: {SUPPORTED}. Build with fuse=False (the default) for these members."
        )
    combined = {}
    for key, t in zip(keys, flat_outputs, strict=True):
        activation = activations[key]
        if t.layout == SHARED:  # every member computes the same output
            combined[key] = keras.layers.Activation(activation or "linear", name=key)(t.tensor)
            continue
        if activation:
            t = fuser.activate(fuser.to_member(t), activation, f"{key}_members")
        t = fuser.to_member(t)
        if member_stacks is not None:
            member_stacks[key] = t.tensor
        extra = "bcdefghjkl"[: len(t.tensor.shape) - 2]
        mean = keras.layers.EinsumDense(
            f"am{extra},m->a{extra}",
            output_shape=tuple(t.tensor.shape[2:]) or (),
            trainable=False,
            name=key,
        )
        x = mean(t.tensor)
        mean.set_weights([np.asarray(weights, dtype=mean.kernel.dtype)])
        combined[key] = x
    return combined
