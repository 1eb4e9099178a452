"""Train state, optimizers and the per-device train/eval step bodies. Pure functions only.

A step is ``state, batch -> state, metrics``. The bodies take an optional
``axis_name``: with ``None`` they are a plain one-device step; with the name of a
mapped axis (``pmap`` or ``shard_map``, see ``parallel.py``) they average the
gradients and metrics over it. One body serves every parallel mode, so the modes
cannot drift apart.

Randomness comes only from ``state.key`` (the run's root key, never advanced)
folded with a stream id and the step, so a run is reproducible and resumable.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from softsig import models
from softsig.losses import Loss

Batch = dict[str, jax.Array]  # "images" float [B,H,W,C], "labels" int32 [B], optional "mask" bool [B]
Metrics = dict[str, jax.Array]

OPTIMIZERS = ("adam", "sgd")

# Stream ids folded into the root key: one independent stream per use.
DROPOUT_STREAM, SHUFFLE_STREAM, AUGMENT_STREAM = 1, 2, 3


class TrainState(NamedTuple):
    """Everything a run carries from step to step; a pytree of arrays."""

    step: jax.Array  # int32 scalar: number of optimizer steps taken
    params: models.Params
    opt_state: optax.OptState
    key: jax.Array  # uint32 [2]: raw root key data (storable by orbax, unlike typed keys)


def make_optimizer(name: str, learning_rate: float, momentum: float = 0.9) -> optax.GradientTransformation:
    """``adam`` or ``sgd`` (with momentum; 0 disables it)."""
    if name == "adam":
        return optax.adam(learning_rate)
    if name == "sgd":
        return optax.sgd(learning_rate, momentum=momentum or None)
    raise ValueError(f"Unknown optimizer {name!r}; valid optimizers: {', '.join(OPTIMIZERS)}.")


def root_key(seed: int) -> jax.Array:
    return jax.random.key_data(jax.random.key(seed))


def stream_key(state_key: jax.Array, stream: int, *data: jax.Array | int) -> jax.Array:
    """A typed key for ``stream`` derived from the stored root key and ``data`` (e.g. the step)."""
    key = jax.random.fold_in(jax.random.wrap_key_data(state_key), stream)
    for value in data:
        key = jax.random.fold_in(key, value)
    return key


def init_train_state(
    model_config: models.ModelConfig, tx: optax.GradientTransformation, seed: int
) -> tuple[nnx.GraphDef, TrainState]:
    """``(graphdef, state)`` at step 0; parameters and optimizer state built in one compiled call."""
    key = root_key(seed)
    graphdef, params = models.init_params(model_config, jax.random.fold_in(jax.random.key(seed), 0))
    opt_state = jax.jit(tx.init)(params)
    return graphdef, TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state, key=key)


def _pmean(tree, axis_name):
    return tree if axis_name is None else jax.lax.pmean(tree, axis_name)


def _psum(tree, axis_name):
    return tree if axis_name is None else jax.lax.psum(tree, axis_name)


def train_step_body(
    state: TrainState,
    batch: Batch,
    *,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    loss: Loss,
    axis_name: str | None = None,
) -> tuple[TrainState, Metrics]:
    """One optimizer step on this device's share of the global batch.

    Gradients are averaged with ``pmean`` over ``axis_name``. Under ``shard_map`` this
    is right only with ``check_vma=False`` (``parallel.py`` sets it): with the default
    VMA checking the gradient of a replicated parameter is already summed over the
    mesh, and a ``pmean`` on top would be N times too large.
    """
    dropout_key = stream_key(state.key, DROPOUT_STREAM, state.step)
    if axis_name is not None:  # dropout masks differ per device (not topology-invariant)
        dropout_key = jax.random.fold_in(dropout_key, jax.lax.axis_index(axis_name))

    def loss_fn(params):
        logits = models.apply_model(graphdef, params, batch["images"], dropout_key=dropout_key)
        return jnp.mean(loss.with_integer_labels(logits, batch["labels"])), logits

    (loss_value, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads = _pmean(grads, axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["labels"])
    metrics = _pmean({"loss": loss_value, "accuracy": accuracy}, axis_name)
    metrics["grad_norm"] = optax.tree.norm(grads)
    for layer, layer_grads in grads.items():  # per layer: where the two heads' gradients differ
        metrics[f"grad_norm_{layer}"] = optax.tree.norm(layer_grads)
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, key=state.key)
    return new_state, metrics


ECE_BINS = 15
SATURATION = 0.01  # an output p is saturated when p < 0.01 or p > 0.99


def eval_sums_body(
    params: models.Params,
    batch: Batch,
    *,
    graphdef: nnx.GraphDef,
    loss: Loss,
    axis_name: str | None = None,
) -> Metrics:
    """Sums over the batch's unmasked examples: loss, correct predictions, count, and diagnostics.

    Sums (not means) so padded batches and several devices combine exactly. Diagnostics:
    per-confidence-bin confidence and correct sums for the expected calibration error (the head's outputs
    normalised to sum to one: for sigmoid + MSE that is p / sum(p)), the number of saturated
    outputs (p < 0.01 or p > 0.99 before normalising), and the sum of p(1-p) on the true class
    (the factor that scales sigmoid + MSE's gradient and vanishes when saturated).
    """
    logits = models.apply_model(graphdef, params, batch["images"])
    mask = batch.get("mask")
    if mask is None:
        mask = jnp.ones(batch["labels"].shape, bool)
    per_example = loss.with_integer_labels(logits, batch["labels"])
    correct = jnp.argmax(logits, -1) == batch["labels"]
    outputs = loss.probabilities(logits)
    normalised = outputs / jnp.sum(outputs, -1, keepdims=True)
    confidence = jnp.max(normalised, -1)
    bins = jnp.clip((confidence * ECE_BINS).astype(jnp.int32), 0, ECE_BINS - 1)
    in_bin = jax.nn.one_hot(bins, ECE_BINS, dtype=jnp.float32) * mask[:, None]
    true_p = jnp.take_along_axis(outputs, batch["labels"][:, None], -1)[:, 0]
    saturated = jnp.mean((outputs < SATURATION) | (outputs > 1 - SATURATION), -1)  # fraction per example
    sums = {
        "loss_sum": jnp.sum(jnp.where(mask, per_example, 0.0)),
        "correct": jnp.sum(jnp.where(mask, correct, False), dtype=jnp.int32),
        "count": jnp.sum(mask, dtype=jnp.int32),
        "bin_confidence": jnp.sum(in_bin * confidence[:, None], 0),
        "bin_correct": jnp.sum(in_bin * correct[:, None], 0),
        "saturated_sum": jnp.sum(jnp.where(mask, saturated, 0.0)),
        "true_class_p1mp": jnp.sum(jnp.where(mask, true_p * (1 - true_p), 0.0)),
    }
    return _psum(sums, axis_name)


def summarize_eval(sums: Metrics, prefix: str = "") -> dict[str, Any]:
    """Host-side means from ``eval_sums_body`` totals (floats, or lists with a seed axis)."""
    count = np.asarray(sums["count"])
    denominator = np.maximum(count, 1)
    accuracy = np.asarray(sums["correct"], np.float64) / denominator
    values = {"loss": np.asarray(sums["loss_sum"], np.float64) / denominator, "accuracy": accuracy,
              "error_rate": 1.0 - accuracy, "count": count}
    if "bin_correct" in sums:
        gap = np.abs(np.asarray(sums["bin_correct"], np.float64) - np.asarray(sums["bin_confidence"], np.float64))
        values["ece"] = gap.sum(-1) / denominator  # sum_b |acc_b - conf_b| n_b / N
        values["true_class_p1mp"] = np.asarray(sums["true_class_p1mp"], np.float64) / denominator
        values["saturated_fraction"] = np.asarray(sums["saturated_sum"], np.float64) / denominator
    return {f"{prefix}{name}": value.tolist() for name, value in values.items()}


def make_train_step(
    graphdef: nnx.GraphDef, tx: optax.GradientTransformation, loss: Loss
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """Jitted one-device ``train_step(state, batch)``; ``state`` is donated."""
    body = functools.partial(train_step_body, graphdef=graphdef, tx=tx, loss=loss)
    return jax.jit(body, donate_argnums=0)


def make_eval_step(graphdef: nnx.GraphDef, loss: Loss) -> Callable[[TrainState, Batch], dict[str, Any]]:
    """Jitted one-device ``eval_step(state, batch) -> {loss, accuracy, count}`` (means over unmasked examples)."""
    sums_fn = jax.jit(functools.partial(eval_sums_body, graphdef=graphdef, loss=loss))

    def eval_step(state: TrainState, batch: Batch) -> dict[str, jax.Array]:
        sums = sums_fn(state.params, batch)
        count = jnp.maximum(sums["count"], 1)
        return {"loss": sums["loss_sum"] / count, "accuracy": sums["correct"] / count, "count": sums["count"]}

    return eval_step
