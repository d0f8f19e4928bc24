"""Greedy ensemble selection with replacement (Caruana et al., ICML 2004): numpy in, counts out."""

from __future__ import annotations

import numbers
from collections.abc import Callable

import numpy as np

__all__ = ["greedy_selection"]

DEFAULT_MAX_ROUNDS = 100
EPSILON = 1e-7  # Keras's clipping of probabilities inside cross-entropies
# A candidate must lower the loss by more than this share to be added: float noise is no gain.
_RELATIVE_GAIN = 1e-12


def _greedy_from(loss_of: Callable[[np.ndarray], float], counts: np.ndarray, max_rounds: int):
    counts = counts.copy()
    current = loss_of(counts / counts.sum())
    count = counts.size
    for _ in range(max_rounds):
        total = counts.sum() + 1
        candidates = [loss_of((counts + np.eye(count, dtype=counts.dtype)[i]) / total) for i in range(count)]
        best = int(np.argmin(candidates))  # the first of equal losses: the earlier snapshot
        if not candidates[best] < current - _RELATIVE_GAIN * max(1.0, abs(current)):
            break
        counts[best] += 1
        current = candidates[best]
    return counts, current


def greedy_counts(loss_of: Callable[[np.ndarray], float], count: int, max_rounds: int) -> np.ndarray:
    """The selection counts for `count` members, `loss_of(weights)` being the validation loss of
    the weights' mixture (weights >= 0 summing to 1).

    From the best single member, each round adds (with replacement) the member whose addition
    lowers the loss most, until no addition lowers it or `max_rounds` rounds. If that ends above the
    uniform mixture's loss (greedy search can, in rare cases), the search restarts from the uniform
    mixture (every count 1), so the result is never worse than uniform or than the best member."""
    singles = [loss_of(np.eye(count)[i]) for i in range(count)]
    if not all(np.isfinite(singles)):
        raise ValueError(
            f"The validation loss of a member is not finite ({singles}): check x_val/y_val for NaN or "
            "infinite values."
        )
    start = np.zeros(count, dtype="int64")
    start[int(np.argmin(singles))] = 1
    counts, value = _greedy_from(loss_of, start, max_rounds)
    uniform = loss_of(np.full(count, 1.0 / count))
    if value > uniform:
        counts, _ = _greedy_from(loss_of, np.ones(count, dtype="int64"), max_rounds)
    return counts


def _loss(predictions: np.ndarray, y: np.ndarray, loss) -> Callable[[np.ndarray], float]:
    """loss(weights) of the weighted mean of `predictions` (M, N, ...) against `y`."""
    if callable(loss):
        return lambda w: float(loss(y, np.tensordot(w, predictions, axes=1)))
    classes = predictions.shape[-1] if predictions.ndim >= 3 else 1
    probabilities = bool(np.all(predictions >= -1e-6) and np.all(predictions <= 1 + 1e-6))
    if loss is None:
        integral = np.issubdtype(y.dtype, np.integer) or bool(np.all(np.mod(y, 1) == 0))
        if classes > 1 and integral and y.shape in (predictions.shape[1:-1], (*predictions.shape[1:-1], 1)):
            loss = "sparse_categorical_crossentropy"
        elif (
            classes > 1
            and probabilities
            and y.shape == predictions.shape[1:]
            and bool(np.all((y >= 0) & (y <= 1)))
            and np.allclose(np.sum(y, axis=-1), 1.0)
        ):
            loss = "categorical_crossentropy"
        elif classes == 1 and probabilities and integral and np.isin(y, (0, 1)).all():
            loss = "binary_crossentropy"
        else:
            loss = "mse"
    if loss != "mse" and not probabilities:
        raise ValueError(
            f"`loss` {loss!r} needs probabilities, but the predictions lie outside [0, 1]: pass the members' "
            "probabilities (softmax outputs), or loss='mse' for regression."
        )
    flat = predictions.reshape(predictions.shape[0], -1).astype("float64")
    if loss == "sparse_categorical_crossentropy":
        labels = y.reshape(predictions.shape[1:-1]).astype("int64")
        if labels.min() < 0 or labels.max() >= classes:
            raise ValueError(
                f"The labels must lie in [0, {classes - 1}], got [{labels.min()}, {labels.max()}]."
            )
        picked = np.take_along_axis(predictions, labels[None, ..., None], axis=-1).reshape(
            len(predictions), -1
        )
        return lambda w: float(-np.mean(np.log(np.clip(w @ picked, EPSILON, None))))
    target = y.reshape(-1).astype("float64")
    if target.size != flat.shape[1]:
        raise ValueError(f"`y` has shape {y.shape}; the predictions {predictions.shape[1:]}.")
    if loss == "categorical_crossentropy":
        rows = flat.shape[1] // classes
        return lambda w: float(-np.sum(target * np.log(np.clip(w @ flat, EPSILON, None))) / rows)
    if loss == "binary_crossentropy":

        def binary(w):
            p = np.clip(w @ flat, EPSILON, 1 - EPSILON)
            return float(-np.mean(target * np.log(p) + (1 - target) * np.log(1 - p)))

        return binary
    if loss == "mse":
        return lambda w: float(np.mean((w @ flat - target) ** 2))
    raise ValueError(
        "`loss` must be None, 'sparse_categorical_crossentropy', 'categorical_crossentropy', "
        f"'binary_crossentropy', 'mse' or a function loss(y_true, y_pred) -> float, got {loss!r}."
    )


def greedy_selection(
    predictions,
    y,
    *,
    loss: str | Callable | None = None,
    max_rounds: int = DEFAULT_MAX_ROUNDS,
) -> np.ndarray:
    """Greedy ensemble selection with replacement (Caruana et al., ICML 2004).

    Starts from the member with the lowest validation loss; each round adds (with replacement: a
    member may be added again) the member whose addition most lowers the loss of the running
    average, and stops when no addition lowers it, or after `max_rounds` additions. The ensemble
    weights are the counts divided by their sum. A weak member is never added unless it helps the
    average, so it gets weight 0; on the validation data the result is never worse than the best
    single member nor than the uniform average (should the greedy path end above the uniform
    average, the search restarts from it). Use held-out validation data, never the test set.

    Args:
        predictions: the members' predictions on the validation inputs, shape (M, N, ...): class
            probabilities (N, C) per member for classification, any values for regression.
        y: the validation targets: class indices (N,), one-hot rows (N, C), 0/1 for one sigmoid
            unit, or regression targets of the predictions' shape.
        loss: None picks the negative log-likelihood for probabilities (sparse, one-hot or binary
            from `y`) and the mean squared error otherwise; or one of
            "sparse_categorical_crossentropy", "categorical_crossentropy", "binary_crossentropy",
            "mse"; or a function `loss(y_true, y_pred) -> float` on numpy arrays.
        max_rounds: the most additions after the first member (>= 0).

    Returns:
        An int64 array of M selection counts (>= 0, at least one positive); the ensemble weights
        are `counts / counts.sum()`.

    Example:

    ```python
    import numpy as np, keras_snapshot
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    good = np.eye(3)[y] * 0.6 + 0.4 / 3                   # a good member
    noisy = rng.dirichlet(np.ones(3), 200)                 # a useless one
    counts = keras_snapshot.greedy_selection(np.stack([good, noisy, good * 0.9 + noisy * 0.1]), y)
    print(counts, counts / counts.sum())                   # the useless member gets 0
    ```
    """
    stack = np.asarray(predictions, dtype="float64")
    if stack.ndim < 2 or stack.shape[0] < 1 or stack.shape[1] < 1:
        raise ValueError(
            f"`predictions` must have shape (M, N, ...): M members' predictions on N validation rows, got "
            f"{stack.shape}."
        )
    targets = np.asarray(y)
    if targets.shape[:1] != stack.shape[1:2]:
        raise ValueError(
            f"`y` has {targets.shape[0] if targets.ndim else 0} rows, the predictions {stack.shape[1]}."
        )
    if not np.all(np.isfinite(stack)):
        raise ValueError("`predictions` hold NaN or infinite values.")
    if isinstance(max_rounds, bool) or not isinstance(max_rounds, numbers.Integral) or max_rounds < 0:
        raise ValueError(f"`max_rounds` must be an integer >= 0, got {max_rounds!r}.")
    return greedy_counts(_loss(stack, targets, loss), stack.shape[0], int(max_rounds))
