"""Member weights fitted on validation data: the loss of the weighted mean, minimised over the simplex."""

from __future__ import annotations

import numbers
import os
from collections.abc import Callable, Sequence

import keras
import numpy as np

from keras_snapshot.inputs import distributions, labels, structures, validation_pair
from keras_snapshot.members import load_members, member_predictions, snapshot_sources
from keras_snapshot.selection import DEFAULT_MAX_ROUNDS, greedy_counts

__all__ = ["fit_ensemble_weights"]

NAMED_LOSSES = {
    "categorical_crossentropy": "categorical_crossentropy",
    "sparse_categorical_crossentropy": "sparse_categorical_crossentropy",
    "binary_crossentropy": "binary_crossentropy",
    "mean_squared_error": "mean_squared_error",
    "mse": "mean_squared_error",
}
EPSILON = 1e-7  # Keras's clipping of probabilities inside cross-entropies


def check_weights(weights, count: int) -> np.ndarray:
    try:
        array = np.asarray(weights, dtype="float64")
    except (TypeError, ValueError):
        raise TypeError(
            f"`weights` must be a sequence of non-negative numbers, 'fit' or None, got {weights!r}."
        ) from None
    if array.ndim != 1 or array.size != count:
        raise ValueError(
            f"`weights` has {array.size} entries but the ensemble has {count} member(s): pass one weight "
            "per member kept (after `last`)."
        )
    if not np.all(np.isfinite(array)) or np.any(array < 0):
        raise ValueError(f"`weights` must be finite and >= 0, got {array.tolist()}.")
    total = array.sum()
    if total <= 0:
        raise ValueError("`weights` are all zero: at least one member needs a positive weight.")
    return array / total


def project_to_simplex(vector: np.ndarray) -> np.ndarray:
    """Euclidean projection onto {w >= 0, sum w = 1} (Duchi et al., 2008)."""
    ordered = np.sort(vector)[::-1]
    cumulative = np.cumsum(ordered) - 1.0
    index = np.arange(1, vector.size + 1)
    rho = np.nonzero(ordered - cumulative / index > 0)[0][-1]
    return np.maximum(vector - cumulative[rho] / (rho + 1.0), 0.0)


def objective(loss, stack: np.ndarray, y: np.ndarray, key: str) -> Callable[[np.ndarray], tuple]:
    """f(w) -> (loss of the w-weighted mean of the member predictions, gradient in w).

    `stack` holds the M member predictions, shape (M, N, ...).
    """
    if callable(loss):

        def value(w):
            return float(loss(y, np.tensordot(w, stack, axes=1)))

        def numeric(w):  # central differences: M is small, the user's loss is a black box
            f = value(w)
            grad = np.empty_like(w)
            for i in range(w.size):
                step = np.zeros_like(w)
                step[i] = 1e-6
                grad[i] = (value(w + step) - value(w - step)) / 2e-6
            return f, grad

        return numeric

    name = loss_name(loss, stack, y, key)
    if name == "sparse_categorical_crossentropy":
        if stack.ndim == 3:  # (M, N, C): the shared label rules (integer or one-hot rows of any dtype)
            indices = labels(y, stack.shape[1], stack.shape[-1], f"y_val for output {key!r}")
        else:
            indices = y.reshape(stack.shape[1:-1]).astype("int64")
            if indices.min() < 0 or indices.max() >= stack.shape[-1]:
                raise ValueError(
                    f"The labels of output {key!r} must lie in [0, {stack.shape[-1] - 1}], got "
                    f"[{indices.min()}, {indices.max()}]."
                )
        # Only the true class's probability matters: gather it once.
        picked = np.take_along_axis(stack, indices[None, ..., None], axis=-1)[..., 0].reshape(
            stack.shape[0], -1
        )

        def sparse(w):
            p = np.clip(w @ picked, EPSILON, None)
            return float(-np.mean(np.log(p))), -(picked / p).mean(axis=1)

        return sparse
    if y.size != stack[0].size:
        raise ValueError(
            f"`y_val` for output {key!r} has shape {y.shape}, the predictions {stack.shape[1:]}: "
            f"{name} needs targets of the predictions' shape."
        )
    if name == "categorical_crossentropy" and stack.ndim == 3:  # one-hot (any dtype) or soft rows
        y = distributions(y, stack.shape[1], stack.shape[-1], f"y_val for output {key!r}")[0]
    flat = stack.reshape(stack.shape[0], -1)
    target = y.reshape(-1).astype("float64")
    rows = stack[0].size // stack.shape[-1]  # losses are means over samples, not over classes
    if name == "categorical_crossentropy":

        def categorical(w):
            p = np.clip(w @ flat, EPSILON, None)
            return float(-np.sum(target * np.log(p)) / rows), -(flat * (target / p)).sum(axis=1) / rows

        return categorical
    if name == "binary_crossentropy":

        def binary(w):
            p = np.clip(w @ flat, EPSILON, 1 - EPSILON)
            value = -np.mean(target * np.log(p) + (1 - target) * np.log(1 - p))
            return float(value), -(flat * (target / p - (1 - target) / (1 - p))).mean(axis=1)

        return binary

    def squared(w):
        residual = w @ flat - target
        return float(np.mean(residual**2)), 2 * (flat * residual).mean(axis=1)

    return squared


def loss_name(loss, stack: np.ndarray, y: np.ndarray, key: str) -> str:
    probabilities = bool(np.all(stack >= -1e-6) and np.all(stack <= 1 + 1e-6))
    if loss is None:
        classes = stack.shape[-1]
        integral = np.issubdtype(y.dtype, np.integer) or (y.size and np.all(np.mod(y, 1) == 0))
        if classes > 1 and integral and y.shape in (stack.shape[1:-1], (*stack.shape[1:-1], 1)):
            loss = "sparse_categorical_crossentropy"
        elif y.shape == stack.shape[1:] and classes > 1:
            loss = "categorical_crossentropy"
        elif y.shape in (stack.shape[1:], stack.shape[1:-1]) and classes == 1 and np.isin(y, (0, 1)).all():
            loss = "binary_crossentropy"
        else:
            raise ValueError(
                f"Cannot tell which loss to minimise for output {key!r} (predictions {stack.shape[1:]}, "
                f"targets {y.shape}): pass loss='categorical_crossentropy', "
                "'sparse_categorical_crossentropy', 'binary_crossentropy', 'mse' or a function."
            )
    if not isinstance(loss, str) or loss not in NAMED_LOSSES:
        raise ValueError(f"`loss` must be one of {sorted(NAMED_LOSSES)} or a function, got {loss!r}.")
    name = NAMED_LOSSES[loss]
    if name != "mean_squared_error" and not probabilities:
        raise ValueError(
            f"The members' output {key!r} is not a probability (values outside [0, 1]), so {name} is "
            "undefined: pass output_activation='softmax' (or 'sigmoid') when the members output logits."
        )
    return name


def fit_simplex(objectives: list[Callable], count: int, max_iter: int, tolerance: float) -> np.ndarray:
    """Projected gradient descent with backtracking, from equal weights.

    The loss of a mixture is convex in the weights for cross-entropy and squared error, so the
    minimum over the simplex is global; every accepted step lowers the loss, so the result is never
    worse on the validation data than equal weights.
    """

    def total(w):
        values, grads = zip(*(objective(w) for objective in objectives), strict=True)
        return sum(values), np.sum(grads, axis=0)

    w = np.full(count, 1.0 / count)
    if count == 1:
        return w
    value, grad = total(w)
    if not (np.isfinite(value) and np.all(np.isfinite(grad))):
        raise ValueError(
            f"The validation loss at equal weights is {value}: check x_val/y_val for NaN or infinite values."
        )
    step = 1.0
    for _ in range(max_iter):
        while True:
            candidate = project_to_simplex(w - step * grad)
            moved = candidate - w
            new_value, new_grad = total(candidate)
            # Sufficient decrease for projected gradient steps (Beck & Teboulle).
            decrease = new_value <= value + grad @ moved + (moved @ moved) / (2 * step)
            if (np.isfinite(new_value) and decrease) or step < 1e-12:
                break
            step /= 2
        if (
            not np.isfinite(new_value) or new_value > value
        ):  # no step lowers the loss: w is optimal to working precision
            break
        converged = np.abs(moved).sum() < tolerance
        w, value, grad = candidate, new_value, new_grad
        if converged:
            break
        step *= 2
    return w


check_validation_data = validation_pair  # (x_val, y_val), NaN / inf refused: see keras_snapshot.inputs


def fitted_weights(
    stacks: dict[str, np.ndarray], keys, output_struct, y_val, loss, max_iter: int, method: str = "fit"
) -> np.ndarray:
    """The weights minimising the validation loss, from the members' predictions {key: (M, N, ...)};
    with method="greedy", the greedy selection counts (int64, weights = counts / counts.sum())."""
    if isinstance(output_struct, dict):
        if not isinstance(y_val, dict) or set(y_val) != set(keys):
            raise ValueError(
                f"`y_val` must be a dict with the output keys {keys}, got {type(y_val).__name__}."
            )
        targets = [y_val[key] for key in keys]
    elif isinstance(output_struct, (list, tuple)):
        if isinstance(y_val, dict) and set(y_val) == set(keys):
            targets = [y_val[key] for key in keys]
        elif isinstance(y_val, (list, tuple)) and len(y_val) == len(keys):
            targets = list(y_val)
        else:
            raise ValueError(f"`y_val` must be a list of {len(keys)} arrays (outputs {keys}).")
    else:
        targets = [y_val]
    if isinstance(loss, dict):
        missing = set(keys) - set(loss)
        if missing:
            raise ValueError(f"`loss` has no entry for outputs {sorted(missing)}.")
        losses = [loss[key] for key in keys]
    else:
        losses = [loss] * len(keys)
    objectives = []
    for index, key in enumerate(keys):
        stack = stacks[key]
        y = np.asarray(targets[index])
        if y.shape[:1] != stack.shape[1:2]:
            raise ValueError(
                f"`y_val` for output {key!r} has {y.shape[0] if y.ndim else 0} rows but x_val has "
                f"{stack.shape[1]}."
            )
        objectives.append(objective(losses[index], stack, y, key))
    if method == "greedy":
        return greedy_counts(
            lambda w: sum(f(w)[0] for f in objectives), len(stacks[keys[0]]), max_rounds=max_iter
        )
    return fit_simplex(objectives, len(stacks[keys[0]]), max_iter=max_iter, tolerance=1e-9)


def fit_ensemble_weights(
    snapshots: str | os.PathLike | Sequence[str | os.PathLike | keras.Model],
    validation_data: tuple,
    *,
    last: int | None = None,
    loss: str | Callable | dict | None = None,
    output_activation: str | dict[str, str | None] | None = None,
    safe_mode: bool = True,
    batch_size: int | None = None,
    max_iter: int | None = None,
    method: str = "fit",
) -> np.ndarray:
    """Member weights that minimise the validation loss of the weighted mean, over the simplex.

    Fit them on held-out validation data, never on the test set: weights chosen on the data you
    report on overstate the ensemble's accuracy (a common mistake of "optimised" snapshot
    ensembles). Each member is run once on `x_val`; the weights are then found in numpy by
    projected gradient descent from equal weights (the loss is convex in the weights for
    cross-entropy and squared error), so they are never worse than equal weights on that data.

    Args:
        snapshots: as for `build_ensemble` (a snapshot directory, `.keras` paths or models).
        validation_data: (x_val, y_val), held-out validation data (never the test set); y_val has
            the members' output structure (an array, a list or a dict of arrays).
        last: use only the last m snapshots.
        loss: "sparse_categorical_crossentropy", "categorical_crossentropy",
            "binary_crossentropy", "mse", a function `loss(y_true, y_pred) -> float` on numpy
            arrays, or a dict of these per output. None picks a cross-entropy from the targets:
            integer labels -> sparse, one-hot -> categorical, 0/1 with one unit -> binary.
        output_activation: as for `build_ensemble`; the weights apply to the activated outputs.
        safe_mode: as for `build_ensemble`.
        batch_size: the batch size of the prediction pass.
        max_iter: the most optimisation steps ("fit", default 1000), or the most selection
            rounds ("greedy", default 100).
        method: "fit" (default): the minimum over the simplex. "greedy": greedy ensemble
            selection with replacement (Caruana et al., 2004; see `greedy_selection`): from the
            best member, add the member that most lowers the validation loss of the running
            average until none does; the weights are the selection counts over their sum. It gives
            useless members weight 0 and, with few validation rows, overfits them less than "fit".

    Returns:
        A float64 array of one weight per member kept, >= 0, summing to 1; pass it to
        `build_ensemble(..., weights=w)`.

    Example:

    ```python
    import keras, numpy as np, keras_snapshot
    x, y = np.random.rand(512, 8).astype("float32"), np.random.randint(0, 3, 512)
    x_train, y_train, x_val, y_val = x[:400], y[:400], x[400:], y[400:]   # keep a validation split
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3, activation="softmax")])
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9), "sparse_categorical_crossentropy")
    model.fit(x_train, y_train, batch_size=32, epochs=6, verbose=0,
              callbacks=[keras_snapshot.SnapshotCallback("snapshots", cycles=3)])
    w = keras_snapshot.fit_ensemble_weights("snapshots", (x_val, y_val))
    ensemble = keras_snapshot.build_ensemble("snapshots", weights=w)
    # or in one call, loading each snapshot once:
    ensemble = keras_snapshot.build_ensemble("snapshots", weights="fit", validation_data=(x_val, y_val))
    ```
    """
    if not isinstance(safe_mode, bool):
        raise TypeError(f"`safe_mode` must be True or False, got {safe_mode!r}.")
    if method not in ("fit", "greedy"):
        raise ValueError(f"`method` must be 'fit' or 'greedy', got {method!r}.")
    if max_iter is None:
        max_iter = DEFAULT_MAX_ROUNDS if method == "greedy" else 1000
    if isinstance(max_iter, bool) or not isinstance(max_iter, numbers.Integral) or max_iter < 1:
        raise ValueError(f"`max_iter` must be an integer >= 1, got {max_iter!r}.")
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1
    ):
        raise ValueError(f"`batch_size` must be an integer >= 1 or None, got {batch_size!r}.")
    if not (
        loss is None
        or callable(loss)
        or isinstance(loss, dict)
        or (isinstance(loss, str) and loss in NAMED_LOSSES)
    ):
        raise ValueError(f"`loss` must be one of {sorted(NAMED_LOSSES)}, a function or None, got {loss!r}.")
    snapshot_sources(snapshots, last)  # a bad `last` fails before any load
    x_val, y_val = validation_pair(validation_data, rows=False)  # NaN / inf refused, naming the first row
    members = load_members(snapshots, last, safe_mode)
    output_struct = structures(members[0].model, members[0].label)[1]
    keys, stacks = member_predictions(
        members, x_val, output_activation=output_activation, batch_size=batch_size
    )
    weights = fitted_weights(stacks, keys, output_struct, y_val, loss, int(max_iter), method)
    return weights / weights.sum() if method == "greedy" else weights
