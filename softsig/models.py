"""The vanilla CNN of the study, in Flax NNX.

Default architecture: the classic Keras CIFAR-10 CNN
(conv32-conv32-pool-conv64-conv64-pool-dense512-dense10, ReLU, 'SAME' padding).
It returns raw logits: the output activation belongs to the loss.

The model knows shapes, not data or training. ``init_params`` builds the
parameters under ``jax.jit`` (eager NNX init compiles every parameter shape
separately: seconds on CPU) and hands back the functional pair the train step
uses: a static ``GraphDef`` and a plain nested dict of parameter arrays.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything that fixes the model's parameter shapes (checked against checkpoints)."""

    image_shape: tuple[int, int, int] = (32, 32, 3)
    num_classes: int = 10
    conv_blocks: tuple[tuple[int, ...], ...] = ((32, 32), (64, 64))
    dense_features: tuple[int, ...] = (512,)
    dropout_rate: float = 0.0
    compute_dtype: str = "float32"
    # Images per chunk for the conv kernels' gradient (see ``chunked_weight_grad_conv``);
    # None: 16 on CPU, off (0) on GPU/TPU. Changes speed, not the function or parameters.
    weight_grad_chunk: int | None = None

    def __post_init__(self):
        if len(self.image_shape) != 3 or min(self.image_shape) <= 0:
            raise ValueError(f"image_shape must be (H, W, C) with positive sizes, got {self.image_shape}.")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {self.num_classes}.")
        if any(f <= 0 for block in self.conv_blocks for f in block) or any(not b for b in self.conv_blocks):
            raise ValueError(f"conv_blocks must be non-empty tuples of positive widths, got {self.conv_blocks}.")
        if any(f <= 0 for f in self.dense_features):
            raise ValueError(f"dense_features must be positive, got {self.dense_features}.")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate}.")
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"compute_dtype must be float32 or bfloat16, got {self.compute_dtype!r}.")
        if self.weight_grad_chunk is not None and self.weight_grad_chunk < 0:
            raise ValueError(f"weight_grad_chunk must be >= 0 (0: off) or None (auto), got {self.weight_grad_chunk}.")
        height, width, _ = self.image_shape
        if height >> len(self.conv_blocks) == 0 or width >> len(self.conv_blocks) == 0:
            raise ValueError(
                f"{len(self.conv_blocks)} pooling stages shrink a {height}x{width} image to nothing."
            )


def max_pool_2x2(x_BHWC: jax.Array) -> jax.Array:
    """2x2/stride-2 max pooling by reshape-and-max (odd edges dropped, like 'VALID').

    Same values and gradients as ``nnx.max_pool(x, (2, 2), (2, 2))`` where maxima are
    unique; its backward pass is several times cheaper on XLA:CPU than reduce_window's
    select-and-scatter (see BUILD_NOTES.md).
    """
    batch, height, width, channels = x_BHWC.shape
    x_BHWC = x_BHWC[:, : height // 2 * 2, : width // 2 * 2, :]
    x_BhwC = x_BHWC.reshape(batch, height // 2, 2, width // 2, 2, channels)
    return x_BhwC.max(axis=(2, 4))


CPU_WEIGHT_GRAD_CHUNK = 16  # measured best of 4..64 on the 2-core dev VM (BUILD_NOTES.md, issue 6)


def resolve_weight_grad_chunk(chunk: int | None, backend: str | None = None) -> int:
    """The chunk size a model uses: ``chunk`` if given, else 16 on CPU and 0 (off) elsewhere."""
    if chunk is not None:
        return chunk
    return CPU_WEIGHT_GRAD_CHUNK if (backend or jax.default_backend()) == "cpu" else 0


@functools.lru_cache(maxsize=None)
def chunked_weight_grad_conv(images_per_chunk: int):
    """A drop-in ``lax.conv_general_dilated`` whose kernel gradient is summed over batch chunks.

    Forward pass and input gradient are XLA's own. XLA:CPU computes the kernel gradient as one
    convolution whose window is the whole image and whose patch matrix (9x the activations) falls
    out of cache: 75 GF/s against 170 for the forward conv. Summing it over chunks of
    ``images_per_chunk`` images keeps each chunk's patches in cache. Mathematically the same
    gradient; only the order of the floating-point sum over the batch changes (tests compare it to
    autodiff of the plain conv). Cached per chunk size so graphdefs stay equal across calls.
    """

    def conv(lhs, rhs, window_strides, padding, **kwargs):
        def plain(lhs, rhs):
            return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)

        numbers = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, kwargs.get("dimension_numbers"))
        batch = lhs.shape[numbers.lhs_spec[0]]
        if numbers.lhs_spec[0] != 0 or numbers.out_spec[0] != 0 or batch <= images_per_chunk:
            return plain(lhs, rhs)

        @jax.custom_vjp
        def chunked(lhs, rhs):
            return plain(lhs, rhs)

        def forward(lhs, rhs):
            return plain(lhs, rhs), (lhs, rhs)

        def backward(residuals, grad_out):
            lhs, rhs = residuals
            grad_lhs = jax.vjp(lambda x: plain(x, rhs), lhs)[1](grad_out)[0]
            grad_rhs = functools.reduce(operator.add, (
                jax.vjp(lambda w, s=start: plain(lhs[s:s + images_per_chunk], w), rhs)[1](
                    grad_out[start:start + images_per_chunk])[0]
                for start in range(0, batch, images_per_chunk)))
            return grad_lhs, grad_rhs

        chunked.defvjp(forward, backward)
        return chunked(lhs, rhs)

    return conv


class CNN(nnx.Module):
    """Blocks of 3x3 'SAME' conv + ReLU, each block ending in 2x2 max pooling; then dense layers."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype = jnp.dtype(config.compute_dtype)
        in_features = config.image_shape[-1]
        chunk = resolve_weight_grad_chunk(config.weight_grad_chunk)
        conv_fn = chunked_weight_grad_conv(chunk) if chunk else jax.lax.conv_general_dilated
        self.conv_names: tuple[tuple[str, ...], ...] = ()
        for block_index, block in enumerate(config.conv_blocks):
            names = []
            for layer_index, features in enumerate(block):
                name = f"conv{block_index + 1}_{layer_index + 1}"
                setattr(self, name, nnx.Conv(in_features, features, (3, 3), padding="SAME", dtype=dtype,
                                               conv_general_dilated=conv_fn, rngs=rngs))
                names.append(name)
                in_features = features
            self.conv_names += (tuple(names),)
        height, width, _ = config.image_shape
        for _ in config.conv_blocks:
            height, width = height // 2, width // 2
        in_features = height * width * in_features
        self.dense_names: tuple[str, ...] = ()
        for index, features in enumerate(config.dense_features):
            name = f"dense{index + 1}"
            setattr(self, name, nnx.Linear(in_features, features, dtype=dtype, rngs=rngs))
            self.dense_names += (name,)
            in_features = features
        self.head = nnx.Linear(in_features, config.num_classes, dtype=dtype, rngs=rngs)

    def __call__(self, images_BHWC: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        """Logits ``[B, num_classes]`` in float32 for normalised float images ``[B, H, W, C]``.

        Dropout (if ``config.dropout_rate > 0``) is active only when ``dropout_key`` is given.
        """
        x = images_BHWC.astype(self.config.compute_dtype)
        for block in self.conv_names:
            for name in block:
                x = jax.nn.relu(getattr(self, name)(x))
            x = max_pool_2x2(x)
        x = x.reshape(x.shape[0], -1)
        for index, name in enumerate(self.dense_names):
            x = jax.nn.relu(getattr(self, name)(x))
            x = self._dropout(x, dropout_key, index)
        return self.head(x).astype(jnp.float32)

    def _dropout(self, x: jax.Array, key: jax.Array | None, layer_index: int) -> jax.Array:
        rate = self.config.dropout_rate
        if key is None or rate == 0.0:
            return x
        keep = jax.random.bernoulli(jax.random.fold_in(key, layer_index), 1.0 - rate, x.shape)
        return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def init_params(config: ModelConfig, key: jax.Array) -> tuple[nnx.GraphDef, Params]:
    """``(graphdef, params)`` for ``CNN(config)``; parameters are built in one compiled call."""
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: CNN(config, rngs=nnx.Rngs(0))))
    return graphdef, _build_params(config, key)


@functools.partial(jax.jit, static_argnums=0)
def _build_params(config: ModelConfig, key: jax.Array) -> Params:
    return nnx.to_pure_dict(nnx.state(CNN(config, rngs=nnx.Rngs(params=key)), nnx.Param))


def apply_model(graphdef: nnx.GraphDef, params: Params, images_BHWC: jax.Array, **kwargs) -> jax.Array:
    """Runs the model described by ``graphdef`` with ``params`` (the functional NNX pattern)."""
    return nnx.merge(graphdef, params)(images_BHWC, **kwargs)


def count_params(params: Params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))


def flops_per_example(config: ModelConfig) -> int:
    """Forward multiply-adds x2 for one image (conv and dense layers only)."""
    height, width, channels = config.image_shape
    flops = 0
    for block in config.conv_blocks:
        for features in block:
            flops += 2 * height * width * 9 * channels * features
            channels = features
        height, width = height // 2, width // 2
    features_in = height * width * channels
    for features in (*config.dense_features, config.num_classes):
        flops += 2 * features_in * features
        features_in = features
    return flops


def parse_widths(text: str | Sequence[int]) -> tuple[int, ...]:
    """'512,256' -> (512, 256); '' -> ()."""
    if not isinstance(text, str):
        return tuple(int(x) for x in text)
    return tuple(int(part) for part in text.split(",") if part.strip())
