"""The two losses of the study, in optax's calling convention.

``fn(logits, labels, *, axis=-1, where=None) -> per-example losses`` with the
class axis (or axes) reduced away, exactly like ``optax.losses.softmax_cross_entropy``.
Integer-label variants take class indices instead of one-hot targets.

This module is a leaf: it imports only jax, so other JAX code can import it
without pulling in the rest of softsig (models, data, orbax, tfds).

All arithmetic runs in float32 (so bfloat16/float16 logits up to +-1e4 give
finite values and gradients) and the result is cast back to the logits' dtype.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

Axis = int | tuple[int, ...]

__all__ = [
    "Loss",
    "LOSSES",
    "LOSS_NAMES",
    "get_loss",
    "sigmoid_mse",
    "sigmoid_mse_with_integer_labels",
    "softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
]


def _check_floating(logits: jax.Array, fn_name: str) -> None:
    if not jnp.issubdtype(jnp.result_type(logits), jnp.floating):
        raise TypeError(f"{fn_name}: logits must be floating point, got dtype {jnp.result_type(logits)}.")


def _normalize_axes(axis: Axis, ndim: int, fn_name: str) -> tuple[int, ...]:
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    if not all(isinstance(a, int) for a in axes):
        raise TypeError(f"{fn_name}: axis must be an int or a tuple of ints, got {axis!r}.")
    if not all(-ndim <= a < ndim for a in axes):
        raise ValueError(f"{fn_name}: axis {axis!r} is out of range for logits with {ndim} dimensions.")
    normalized = tuple(sorted(a % ndim for a in axes))
    if len(set(normalized)) != len(normalized):
        raise ValueError(f"{fn_name}: axis {axis!r} repeats a dimension.")
    return normalized


def _broadcast_where(where, logits_shape, axes, fn_name):
    """Mask of shape logits.shape; a per-example mask is expanded along ``axes`` (optax's rule)."""
    if where is None:
        return None
    where = jnp.asarray(where)
    if where.ndim != len(logits_shape):
        where = jnp.expand_dims(where, axes)
    try:
        return jnp.broadcast_to(where.astype(bool), logits_shape)
    except ValueError:
        raise ValueError(
            f"{fn_name}: where of shape {where.shape} does not broadcast to logits shape {logits_shape}."
        ) from None


def _check_same_shape(logits, labels, fn_name):
    if jnp.shape(logits) != jnp.shape(labels):
        raise ValueError(
            f"{fn_name}: logits and labels must have the same shape, got logits shape "
            f"{jnp.shape(logits)} and labels shape {jnp.shape(labels)}."
        )


def sigmoid_mse(
    logits: jax.Array,
    labels: jax.Array,
    *,
    axis: Axis = -1,
    where: jax.Array | None = None,
) -> jax.Array:
    r"""Mean squared error between ``sigmoid(logits)`` and ``labels`` over the class axis.

    ``loss = mean_k (sigmoid(x_k) - y_k)**2`` (the Keras ``mse`` on sigmoid outputs),
    averaged over the classes that ``where`` includes; a row with no class included
    gives 0. The gradient per logit, with ``p = sigmoid(x)`` and K included classes, is

        d loss / d x_k = (2 / K) (p_k - y_k) p_k (1 - p_k),

    at most (2/K)(4/27) in magnitude and vanishing for confidently wrong outputs
    (p_k near 0 for the true class) -- the reason this head learns slowly.

    Args:
      logits: float array ``[..., K, ...]``.
      labels: targets in [0, 1], same shape as ``logits`` (one-hot or probabilities).
      axis: class axis or axes, reduced away.
      where: optional boolean mask of elements to include, of ``logits.shape`` or of the
        per-example shape (then applied to whole examples).

    Returns:
      Per-example losses of shape ``logits.shape`` without ``axis``, in ``logits.dtype``.
    """
    _check_floating(logits, "sigmoid_mse")
    _check_same_shape(logits, labels, "sigmoid_mse")
    axes = _normalize_axes(axis, jnp.ndim(logits), "sigmoid_mse")
    mask = _broadcast_where(where, jnp.shape(logits), axes, "sigmoid_mse")
    probs = jax.nn.sigmoid(jnp.asarray(logits, jnp.float32))
    squared = jnp.square(probs - jnp.asarray(labels, jnp.float32))
    if mask is None:
        loss = jnp.mean(squared, axis=axes)
    else:
        total = jnp.sum(jnp.where(mask, squared, 0.0), axis=axes)
        count = jnp.sum(mask, axis=axes, dtype=jnp.float32)
        loss = total / jnp.maximum(count, 1.0)
    return loss.astype(jnp.result_type(logits))


def softmax_cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    *,
    axis: Axis = -1,
    where: jax.Array | None = None,
) -> jax.Array:
    r"""Cross-entropy between ``softmax(logits)`` and the target distribution ``labels``.

    ``loss = -sum_k y_k log softmax(x)_k``, computed with a stable log-softmax.
    Classes excluded by ``where`` leave both the normaliser and the sum. The gradient
    per logit is ``softmax(x)_k * sum(y) - y_k`` (``p - y`` for one-hot targets).

    Args:
      logits: float array ``[..., K, ...]``.
      labels: target probabilities, same shape as ``logits``.
      axis: class axis or axes, reduced away.
      where: optional boolean mask, as in ``optax.losses.softmax_cross_entropy``.

    Returns:
      Per-example losses of shape ``logits.shape`` without ``axis``, in ``logits.dtype``.
    """
    _check_floating(logits, "softmax_cross_entropy")
    _check_same_shape(logits, labels, "softmax_cross_entropy")
    axes = _normalize_axes(axis, jnp.ndim(logits), "softmax_cross_entropy")
    mask = _broadcast_where(where, jnp.shape(logits), axes, "softmax_cross_entropy")
    log_probs = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=axes, where=mask)
    terms = jnp.asarray(labels, jnp.float32) * log_probs
    if mask is not None:
        terms = jnp.where(mask, terms, 0.0)
    return (-jnp.sum(terms, axis=axes)).astype(jnp.result_type(logits))


def _one_hot_for(logits, labels, axis, fn_name):
    """One-hot targets for integer ``labels`` along the int class ``axis`` of ``logits``."""
    _check_floating(logits, fn_name)
    if not isinstance(axis, int):
        raise TypeError(f"{fn_name}: axis must be an int for integer labels, got {axis!r}.")
    if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
        raise TypeError(f"{fn_name}: labels must be integer class indices, got dtype {jnp.result_type(labels)}.")
    (class_axis,) = _normalize_axes(axis, jnp.ndim(logits), fn_name)
    logits_shape = jnp.shape(logits)
    expected = logits_shape[:class_axis] + logits_shape[class_axis + 1 :]
    if jnp.shape(labels) != expected:
        raise ValueError(
            f"{fn_name}: labels shape {jnp.shape(labels)} must be logits shape {logits_shape} "
            f"without axis {axis}, i.e. {expected}."
        )
    return jax.nn.one_hot(labels, logits_shape[class_axis], axis=class_axis, dtype=jnp.float32)


def sigmoid_mse_with_integer_labels(
    logits: jax.Array,
    labels: jax.Array,
    *,
    axis: int = -1,
    where: jax.Array | None = None,
) -> jax.Array:
    """``sigmoid_mse`` with integer class indices; ``labels.shape`` is ``logits.shape`` without ``axis``."""
    one_hot = _one_hot_for(logits, labels, axis, "sigmoid_mse_with_integer_labels")
    return sigmoid_mse(logits, one_hot, axis=axis, where=where)


def softmax_cross_entropy_with_integer_labels(
    logits: jax.Array,
    labels: jax.Array,
    *,
    axis: int = -1,
    where: jax.Array | None = None,
) -> jax.Array:
    """``softmax_cross_entropy`` with integer class indices; ``labels.shape`` is ``logits.shape`` without ``axis``."""
    one_hot = _one_hot_for(logits, labels, axis, "softmax_cross_entropy_with_integer_labels")
    return softmax_cross_entropy(logits, one_hot, axis=axis, where=where)


@dataclasses.dataclass(frozen=True)
class Loss:
    """A named loss: its one-hot and integer-label functions and its output activation."""

    name: str
    fn: Callable[..., jax.Array]
    with_integer_labels: Callable[..., jax.Array]
    activation: Callable[..., jax.Array]

    def probabilities(self, logits: jax.Array, axis: int = -1) -> jax.Array:
        """The head's outputs: per-class sigmoids (not normalised) or a softmax distribution."""
        return self.activation(logits, axis)


LOSSES: dict[str, Loss] = {
    "sigmoid_mse": Loss(
        name="sigmoid_mse",
        fn=sigmoid_mse,
        with_integer_labels=sigmoid_mse_with_integer_labels,
        activation=lambda logits, axis: jax.nn.sigmoid(logits),
    ),
    "softmax_cross_entropy": Loss(
        name="softmax_cross_entropy",
        fn=softmax_cross_entropy,
        with_integer_labels=softmax_cross_entropy_with_integer_labels,
        activation=lambda logits, axis: jax.nn.softmax(logits, axis=axis),
    ),
}
LOSS_NAMES: tuple[str, ...] = tuple(LOSSES)


def get_loss(name: str) -> Loss:
    """The registered loss called ``name``; an unknown name lists the valid ones."""
    try:
        return LOSSES[name]
    except (KeyError, TypeError):
        raise ValueError(f"Unknown loss {name!r}; valid losses: {', '.join(LOSS_NAMES)}.") from None
