"""Every contact keras-snapshot has with Keras's private internals, and nothing else.

No other module of the package reads or writes a private Keras attribute. Each internal used
here has (a) a check at first use that it is there and behaves as expected, and (b) a public
fallback, or a loud error where no correct fallback exists; tests/test_keras_internals.py
breaks each one on purpose and checks both.

| internal | used for | check | when it fails |
| --- | --- | --- | --- |
| `Callback._model` | reach the model on JAX without the full state sync of `Callback.model` | is a `keras.Model` | `callback.model` (syncs, correct) |
| backend variable `.value`, assigned in place (TF `assign`, torch `fill_`) | set the rate every batch at half the cost of `Variable.assign` | the rate reads back exactly after the first assignment | `optimizer.learning_rate = rate` |
| JAX trainer `model._jax_state`, `model._jax_state_synced`, `Variable._value` | set the rate between JAX steps without copying every weight back | the state's groups match the model's variables, `Variable.value` returns what was put in `_value`, and after the next step the trainer's state holds the rate set | missing or different: the public sync + assignment; the trainer did not take the rate: `KerasInternalsError` (the rate of one step was wrong, so training must not go on) |
| JAX trainer `model._jax_state` (optimizer group) | read the step count inside an epoch (`steps_per_execution > 1`, or a loss-scale optimizer that skips updates) | the group matches `optimizer.variables`; the value is an integer scalar | the public read through `callback.model` (syncs, correct) |
| `Optimizer._iterations` (of the inner optimizer of a `LossScaleOptimizer`) | the step count learning-rate schedules read, which the snapshot schedule follows (with `gradient_accumulation_steps=k`, `optimizer.iterations` is it // k) | a Variable among `optimizer.variables`; without accumulation it is `optimizer.iterations` | without accumulation `optimizer.iterations` (the same counter); with accumulation `KerasInternalsError` |
| the caller's frame: `keras.callbacks.CallbackList.callbacks` | find the callbacks of the same `fit` (no public API) | the list holds the asking callback | None: the callers rely on detecting effects |
| `Sequential._functional`, `Functional._nodes_by_depth`, `KerasTensor._keras_history`, `Functional._run_through_graph(inputs, operation_fn=, call_fn=)` | fusion: walk the members' graphs | `fusion_supported()` runs them on a tiny nested model | `KerasInternalsError`; fusion raises `fusion.FusionUnavailable` |
| `KerasTensor._keras_history` (of `model.outputs`) | export: whether an uncertainty block's outputs are served (a nested model's `.output` is its inner graph's) | read at use; `output_operations` is tested against a model that serves its block and one that does not | the functional config's `output_layers` (public, slower) |

Replaced by public APIs (no longer used): `optimizer._learning_rate` (the compiled schedule is
read from `optimizer.get_config()`), `Operation._inbound_nodes` (`Operation.output`), and hook
batch indices for counting steps (`optimizer.iterations`).

Verified: Keras 3.15.1 (TensorFlow 2.21, JAX 0.10, torch 2.13, CPU) with this module's tests.
Keras 3.10.0 and 3.12.0: every internal above was present when the package's tests ran there
before this module existed (the project's design notes; 3.12.0 passed, 3.10.0 failed only on the
batch-index step count, replaced here, and on one-item list inputs); the Keras-version CI pass
runs this module's tests there. `_run_through_graph`'s signature changed between 3.10 and 3.15; it is
called with keywords only, and its parameters are checked by name.

Fallbacks warn once per process with a `KerasInternalsWarning` (a `RuntimeWarning`): they are
correct but slower, and a maintainer should know that a Keras release moved an internal.
"""

from __future__ import annotations

import inspect
import warnings

import keras
import numpy as np

VERIFIED_KERAS_VERSIONS = ("3.10.0", "3.12.0", "3.15.1")

# The names of the private attributes, in one place (tests point them elsewhere to simulate a
# Keras release that renamed them).
CALLBACK_MODEL = "_model"
JAX_STATE = "_jax_state"
JAX_STATE_SYNCED = "_jax_state_synced"
JAX_VARIABLE_VALUE = "_value"
JAX_STATE_GROUPS = (
    "trainable_variables",
    "non_trainable_variables",
    "optimizer_variables",
    "metrics_variables",
)


class KerasInternalsWarning(RuntimeWarning):
    """A Keras internal is not as expected; a slower public path is used instead."""


class KerasInternalsError(RuntimeError):
    """A Keras internal is not as expected and no correct fallback exists."""


_WARNED: set[str] = set()


def _fallback(contract: str, reason: str, instead: str) -> None:
    if contract in _WARNED:
        return
    _WARNED.add(contract)
    warnings.warn(
        f"keras-snapshot: Keras {keras.version()} changed {contract} ({reason}); using {instead} "
        f"instead, which is correct but slower. Verified Keras versions: "
        f"{', '.join(VERIFIED_KERAS_VERSIONS)}. Please report this with your Keras version.",
        KerasInternalsWarning,
        stacklevel=3,
    )


def _scalar(value) -> float:
    return float(np.asarray(keras.ops.convert_to_numpy(value)).reshape(()))


# --------------------------------------------------------------------------------- Callback._model
def unsynced_model(callback):
    """The callback's model without the JAX state sync that `callback.model` performs, or None
    (the caller then uses `callback.model`)."""
    model = getattr(callback, CALLBACK_MODEL, None)
    if isinstance(model, keras.Model):
        return model
    _fallback("Callback._model", f"{CALLBACK_MODEL!r} is not the model", "Callback.model")
    return None


# --------------------------------------------------------------------------------- the rate, in place
class RateAssigner:
    """Sets a float learning rate, the cheapest way each backend allows.

    `optimizer.learning_rate = rate` goes through Keras's setter and `Variable.assign` (a
    conversion to a tensor, a shape check, a cast and, on TensorFlow, a read-back): about twice
    the cost of the backend variable's own in-place assignment, every batch. The in-place
    assignment is checked once per `fit` by reading the rate back.
    """

    def __init__(self):
        self.in_place = None  # None: not checked yet in this fit; then True or False

    def assign(self, optimizer, rate: float) -> None:
        variable = optimizer.learning_rate  # the rate's Variable itself when compiled with a float
        backend = keras.backend.backend()
        if isinstance(variable, keras.Variable) and backend == "jax":
            # Keras's assignment is already the direct one; the value goes in placed as the one it
            # replaces (committed to its sharding or not), else jit(train_step) compiles again.
            variable.assign(_placed_like(variable.value, rate))
            return
        if not isinstance(variable, keras.Variable) or backend not in ("tensorflow", "torch"):
            optimizer.learning_rate = rate
            return
        if self.in_place:
            _assign_in_place(backend, variable, rate)
            return
        if self.in_place is False:
            optimizer.learning_rate = rate
            return
        try:
            _assign_in_place(backend, variable, rate)
            expected = float(np.asarray(rate, dtype=keras.backend.standardize_dtype(variable.dtype)))
            got = _scalar(variable)
            reason = None if got == expected else f"the rate read back {got}, not {expected}"
        except Exception as error:  # an attribute or method that is gone or changed
            reason = f"{type(error).__name__}: {error}"
        self.in_place = reason is None
        if reason:
            _fallback(
                "the backend variable's in-place assignment (Variable.value)",
                reason,
                "optimizer.learning_rate = rate",
            )
            optimizer.learning_rate = rate


def _placed_like(current, rate: float):
    """`rate` as a JAX array of `current`'s dtype, committed to its sharding where it is committed
    (public JAX API: `jax.Array.committed`, `.sharding`, `jax.device_put`)."""
    import jax

    value = np.asarray(rate, dtype=current.dtype)
    if getattr(current, "committed", False):
        return jax.device_put(value, current.sharding)
    return jax.numpy.asarray(value)


def _assign_in_place(backend: str, variable, rate: float) -> None:
    if backend == "tensorflow":
        variable.value.assign(rate, read_value=False)
    else:
        import torch

        with torch.no_grad():
            variable.value.fill_(rate)


# --------------------------------------------------------------------------------- the JAX trainer
class JaxRateSetter:
    """Sets the learning rate between JAX training steps without Keras's full state sync.

    Between steps of an epoch the JAX trainer keeps the model's state outside its Variables (whose
    values it drops) and passes it from step to step. Reading `callback.model` syncs it back with
    a Keras-level `assign` of every weight and optimizer slot, and assigning the rate converts a
    Python float to a device array: per batch that cost a third of a small CNN's step on an H100
    (b/a 0.68-0.75). Instead, the state the trainer last returned (`model._jax_state`) goes back
    into the Variables as it is, with the new rate, and the state is marked synced, so that the
    trainer takes the rate at its next step as after a full sync. The rates themselves are made
    on the device CHUNK steps at a time by one compiled call (a `device_put` per step cost ~50 us
    on CPU; the call ~40 us per 16 steps, after one compilation of ~0.2 s per process).

    Checks: before the first use, that the state matches the model's variables and that
    `Variable.value` returns what is put in `_value` (else `set` returns False for good and the
    caller syncs and assigns publicly); after the first step that used a rate set here
    (`verify`), that the trainer's state holds that rate (else `KerasInternalsError`).
    """

    CHUNK = 16

    def __init__(self, model, rate_of):
        optimizer = model.optimizer
        self.rate = optimizer.learning_rate
        self.rate_of = rate_of
        self.groups = (
            ("trainable_variables", list(model.trainable_variables)),
            ("non_trainable_variables", list(model.non_trainable_variables)),
            ("optimizer_variables", list(optimizer.variables)),
            ("metrics_variables", list(model.metrics_variables)),
        )
        self.rate_index = next((i for i, v in enumerate(self.groups[2][1]) if v is self.rate), None)
        self.first, self.rates, self.handed = None, (), set()
        self.disabled = False
        self.checked = False  # the first use's checks passed
        self.pending = None  # (step, rate) set here and not yet seen in the trainer's state

    @classmethod
    def applies(cls, model) -> bool:
        return (
            keras.backend.backend() == "jax"
            and jax_process_count() == 1
            # NNX variables mirror their values elsewhere (older Keras 3 releases have no NNX switch)
            and not getattr(keras.config, "is_nnx_enabled", lambda: False)()
            and isinstance(model.optimizer.learning_rate, keras.Variable)
        )

    def _disable(self, reason: str) -> bool:
        self.disabled = True
        _fallback(
            "the JAX trainer's state (model._jax_state, _jax_state_synced, Variable._value)",
            reason,
            "Keras's state sync and optimizer.learning_rate = rate",
        )
        return False

    def set(self, model, step: int) -> bool:
        """Sets the rate of `step`; False where the caller must sync and assign instead (epoch
        start, another callback synced, or the trainer is not as expected)."""
        if self.disabled:
            return False
        synced = getattr(model, JAX_STATE_SYNCED, None)
        if not isinstance(synced, bool):
            return self._disable(f"model.{JAX_STATE_SYNCED} is {synced!r}, not a bool")
        if synced:
            return False  # the Variables hold the state (epoch start, or another callback synced)
        state = getattr(model, JAX_STATE, None)
        if not isinstance(state, dict) or not set(JAX_STATE_GROUPS) <= state.keys():
            return self._disable(f"model.{JAX_STATE} is not a dict of {JAX_STATE_GROUPS}")
        if self.rate_index is None:
            return self._disable("the learning rate is not among optimizer.variables")
        pairs = []
        for key, variables in self.groups:
            values = state.get(key)
            if values is None and not variables:
                continue
            if values is None or len(values) != len(variables):
                return self._disable(f"the state's {key!r} does not match the model's")
            pairs += zip(variables, values, strict=True)
        for variable, value in pairs:
            if variable is self.rate:
                value = self.device_rate(step, value)
                rate_value = value
            setattr(variable, JAX_VARIABLE_VALUE, value)
        if not self.checked:
            # First use: Keras's trainer reads `variable.value`; it must be what was put in.
            try:
                taken = self.rate.value is rate_value
            except Exception:  # a purged or relocated value can fail in any way
                taken = False
            if not taken:
                return self._disable(f"Variable.value does not return Variable.{JAX_VARIABLE_VALUE}")
            self.checked = True
            self.pending = (step, float(np.asarray(rate_value)))
        setattr(model, JAX_STATE_SYNCED, True)
        return True

    def verify(self, model) -> None:
        """After the step that used the first rate set here: the trainer's state must hold it."""
        if self.pending is None:
            return
        step, expected = self.pending
        self.pending = None
        state = getattr(model, JAX_STATE, None) or {}
        values = state.get("optimizer_variables") or ()
        got = float(np.asarray(values[self.rate_index])) if len(values) > self.rate_index else None
        if got != expected:
            raise KerasInternalsError(
                f"Keras {keras.version()}'s JAX trainer did not take the learning rate set between steps "
                f"(step {step}: set {expected}, the trainer's state holds {got}): this Keras release changed "
                "model._jax_state / _jax_state_synced, and the rate of that step was wrong. Use a verified "
                f"Keras ({', '.join(VERIFIED_KERAS_VERSIONS)}) or another backend, and please report it."
            )

    def device_rate(self, step: int, like):
        """The rate of `step` as a device scalar with the dtype and sharding of `like`.

        Each scalar is handed out once: the train step donates its optimizer variables, so a
        scalar put into the rate Variable is deleted by the step that reads it. The step count
        can stay put between two batches (a loss-scale optimizer skips the update of a batch whose
        gradients overflow), and the same step's rate is then made again, never reused."""
        first = step - step % self.CHUNK
        if first != self.first or step in self.handed:
            rates = np.array([self.rate_of(t) for t in range(first, first + self.CHUNK)], dtype=like.dtype)
            # Placed as the trainer's value is: committed to its sharding, or left uncommitted as
            # Keras's own values are without a distribution. A rate placed otherwise than the
            # value it replaces makes jit(train_step) compile again (it counts placement).
            sharding = like.sharding if getattr(like, "committed", True) else None
            self.first, self.rates = first, _jax_splitter(self.CHUNK, sharding)(rates)
            self.handed = set()
        self.handed.add(step)
        return self.rates[step - first]


def jax_process_count() -> int:
    import jax

    return jax.process_count()


_JAX_SPLITTERS: dict = {}


def _jax_splitter(size: int, sharding):
    """A compiled function: `size` values -> `size` device scalars placed like `sharding` (None:
    uncommitted, as the results of a jit call on host values are); one per process and placement,
    so that each fit does not compile it again."""
    key = (size, sharding)
    if key not in _JAX_SPLITTERS:
        import jax

        split = lambda values: tuple(values[i] for i in range(size))  # noqa: E731
        _JAX_SPLITTERS[key] = (
            jax.jit(split) if sharding is None else jax.jit(split, out_shardings=(sharding,) * size)
        )
    return _JAX_SPLITTERS[key]


ITERATIONS = "_iterations"


def schedule_step_variable(optimizer):
    """The variable Keras's learning-rate schedules read: the optimizer's count of steps.

    A schedule compiled into an optimizer is called with the (inner) optimizer's private
    `_iterations`, which advances once per batch whose gradients are applied or accumulated.
    The public `optimizer.iterations` is the same Variable, except with
    `gradient_accumulation_steps=k`, where it is `_iterations // k` (the weight updates), a
    tensor. A LossScaleOptimizer skips both on a batch whose gradients overflow.

    Check: the attribute is a Variable among `optimizer.variables` and, without accumulation,
    is `optimizer.iterations`. Fallback: `optimizer.iterations` where it is that Variable
    (without accumulation it is the same counter); with accumulation there is no public one:
    `KerasInternalsError`.
    """
    inner = getattr(optimizer, "inner_optimizer", optimizer)  # LossScaleOptimizer
    accumulation = getattr(inner, "gradient_accumulation_steps", None)
    variable = getattr(inner, ITERATIONS, None)
    reason = None
    if not isinstance(variable, keras.Variable):
        reason = f"{ITERATIONS!r} is not a Variable"
    elif not any(v is variable for v in optimizer.variables):
        reason = f"{ITERATIONS!r} is not among optimizer.variables"
    elif not accumulation and variable is not inner.iterations:
        reason = f"{ITERATIONS!r} is not optimizer.iterations"
    if reason is None:
        return variable
    public = inner.iterations
    if not accumulation and isinstance(public, keras.Variable):
        _fallback("Optimizer._iterations", reason, "optimizer.iterations")
        return public
    raise KerasInternalsError(
        f"Keras {keras.version()} changed Optimizer.{ITERATIONS} ({reason}): with "
        f"gradient_accumulation_steps={accumulation} the step count that learning-rate schedules "
        "read has no public equivalent, so the snapshot schedule cannot follow it. Train without "
        f"gradient accumulation or use a verified Keras ({', '.join(VERIFIED_KERAS_VERSIONS)}), and "
        "please report it."
    )


class IterationsReader:
    """The optimizer's step count (`schedule_step_variable`) after a batch, without the JAX state
    sync where the trainer's state holds it (the public read syncs every weight back into the
    Variables)."""

    def __init__(self, optimizer=None):
        self.index = None
        self.variable = None if optimizer is None else schedule_step_variable(optimizer)
        self.disabled = keras.backend.backend() != "jax"

    def read(self, callback) -> int:
        model = None if self.disabled else unsynced_model(callback)
        if model is not None and getattr(model, JAX_STATE_SYNCED, None) is False:
            value = self._from_state(model)
            if value is not None:
                return value
        optimizer = callback.model.optimizer  # JAX: syncs the trainer's state into the Variables
        if self.variable is None:
            self.variable = schedule_step_variable(optimizer)
        return int(_scalar(self.variable))

    def _from_state(self, model):
        optimizer = model.optimizer
        variables = list(optimizer.variables)
        if self.variable is None:
            self.variable = schedule_step_variable(optimizer)
        if self.index is None:
            self.index = next((i for i, v in enumerate(variables) if v is self.variable), -1)
        state = getattr(model, JAX_STATE, None)
        values = state.get("optimizer_variables") if isinstance(state, dict) else None
        value = values[self.index] if values is not None and len(values) == len(variables) else None
        array = None if value is None or self.index < 0 else np.asarray(value)
        if array is None or array.shape != () or not np.issubdtype(array.dtype, np.integer):
            self.disabled = True
            _fallback(
                "the JAX trainer's state (model._jax_state['optimizer_variables'])",
                "it does not hold the optimizer's step count",
                "callback.model.optimizer.iterations",
            )
            return None
        return int(array)


# --------------------------------------------------------------------------------- sibling callbacks
def sibling_callbacks(callback, depth: int = 4):
    """The callbacks of the `fit` that is calling `callback` now, in their order, or None.

    Keras has no public way for a callback to see the others. `fit` calls each hook through a
    `keras.callbacks.CallbackList`, whose `callbacks` attribute is public; it is found in the
    calling frames (read-only) and accepted only if it holds `callback` itself.
    """
    frame = inspect.currentframe()
    try:
        for _ in range(depth):
            frame = frame.f_back if frame is not None else None
            if frame is None:
                return None
            owner = frame.f_locals.get("self")
            if isinstance(owner, keras.callbacks.CallbackList):
                found = list(getattr(owner, "callbacks", None) or [])
                if any(c is callback for c in found):
                    return found
    finally:
        del frame
    return None


# --------------------------------------------------------------------------------- graphs (fusion)
def sequential_graph(model):
    """The functional graph a Sequential model with an Input keeps, or None without an Input."""
    if not hasattr(model, "_functional"):
        raise KerasInternalsError("Sequential._functional is gone")
    return model._functional


def nodes_by_depth(functional) -> dict:
    nodes = getattr(functional, "_nodes_by_depth", None)
    if not isinstance(nodes, dict):
        raise KerasInternalsError("Functional._nodes_by_depth is not a dict")
    return nodes


def tensor_history(tensor) -> tuple:
    """(operation, node_index, tensor_index) of a symbolic tensor."""
    history = getattr(tensor, "_keras_history", None)
    try:
        return history.operation, history.node_index, history.tensor_index
    except AttributeError:
        raise KerasInternalsError(
            "KerasTensor._keras_history has no operation/node_index/tensor_index"
        ) from None


def output_operations(model) -> list:
    """The operations (layers) that produce `model.outputs`, in the outer graph (a nested model's
    `.output` is its own inner graph's, so it cannot say whether the model serves it)."""
    try:
        return [tensor_history(tensor)[0] for tensor in keras.tree.flatten(model.outputs)]
    except KerasInternalsError as error:
        _fallback("KerasTensor._keras_history", str(error), "the model config's output_layers")
    # Public: a functional model's config names the layer behind each output.
    names = [entry[0] for entry in _output_layer_entries(model.get_config().get("output_layers"))]
    # `operations` holds ops (a `keras.ops.cast` in the graph) as well as layers.
    by_name = {op.name: op for op in getattr(model, "operations", model.layers)}
    return [by_name[name] for name in names if name in by_name]


def _output_layer_entries(spec) -> list:
    """The [layer_name, node_index, tensor_index] entries of a config's output_layers (a list, a
    dict or one entry)."""
    if isinstance(spec, dict):
        return [entry for value in spec.values() for entry in _output_layer_entries(value)]
    if isinstance(spec, (list, tuple)) and spec and isinstance(spec[0], str):
        return [spec]
    return [entry for item in spec or () for entry in _output_layer_entries(item)]


def run_graph(functional, inputs, call_fn):
    """Runs the graph's nodes in order, each through `call_fn(op, *args, **kwargs)`."""
    method = getattr(functional, "_run_through_graph", None)
    if method is None:
        raise KerasInternalsError("Functional._run_through_graph is gone")
    try:
        parameters = inspect.signature(method).parameters
    except (TypeError, ValueError):
        parameters = {}
    if not {"operation_fn", "call_fn"} <= set(parameters):
        raise KerasInternalsError(
            f"Functional._run_through_graph takes {list(parameters)}, not operation_fn= and call_fn="
        )
    return method(inputs, operation_fn=lambda op: op, call_fn=call_fn)


_FUSION_SUPPORTED: list = []


def fusion_supported() -> str | None:
    """None where the graph internals fusion needs behave as expected on this Keras, else the reason.

    Checked once per process on a tiny model (a Dense, then a nested Sequential)."""
    if not _FUSION_SUPPORTED:
        _FUSION_SUPPORTED.append(_check_fusion())
    return _FUSION_SUPPORTED[0]


class _Probe:
    """Stands for a tensor in the fusion check (any object a graph walk passes along as it is)."""

    def __init__(self, op):
        self.op = op


def _check_fusion() -> str | None:
    try:
        # Every name given: auto-naming would move the counters behind the user's own models' names.
        inner = keras.Sequential(
            [
                keras.Input((2,), name="keras_snapshot_probe_inner_input"),
                keras.layers.Dense(1, name="probe_inner"),
            ],
            name="keras_snapshot_probe_inner",
        )
        inputs = keras.Input((2,), name="keras_snapshot_probe_input")
        dense = keras.layers.Dense(2, name="keras_snapshot_probe_dense")
        model = keras.Model(inputs, inner(dense(inputs)), name="keras_snapshot_probe")
        graph = sequential_graph(inner)
        if graph is None or not any(op is inner.layers[0] for op in graph.operations):
            return "Sequential._functional does not hold the Sequential's layers"
        wiring = []
        for depth in sorted(nodes_by_depth(model), reverse=True):
            for node in nodes_by_depth(model)[depth]:
                if node.operation is None or node.is_input:
                    continue
                wiring.append((node.operation, [tensor_history(t)[0] for t in node.input_tensors]))
        if [op for op, _ in wiring] != [dense, inner] or wiring[1][1] != [dense]:
            return "Functional._nodes_by_depth / KerasTensor._keras_history do not describe the graph"
        calls = []

        def call_fn(op, *args, **kwargs):
            calls.append((op, args))
            return _Probe(op)

        start = _Probe(None)
        result = keras.tree.flatten(run_graph(model, [start], call_fn))
        if (
            [op for op, _ in calls] != [dense, inner]
            or calls[0][1] != (start,)
            or len(calls[1][1]) != 1
            or calls[1][1][0].op is not dense
        ):
            return "Functional._run_through_graph does not call call_fn on each node in order"
        if len(result) != 1 or not isinstance(result[0], _Probe) or result[0].op is not inner:
            return "Functional._run_through_graph does not return call_fn's outputs"
    except KerasInternalsError as error:
        return str(error)
    except Exception as error:  # a changed internal can fail in any way
        return f"{type(error).__name__}: {error}"
    return None
