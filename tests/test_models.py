"""The CNN: shapes, determinism, FLOP count, and the fast pooling against nnx.max_pool."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from softsig import models
from tests.helpers import TINY


def test_default_model_is_the_keras_cifar10_cnn():
    config = models.ModelConfig()
    graphdef, params = models.init_params(config, jax.random.key(0))
    shapes = jax.tree.map(lambda x: x.shape, params)
    assert shapes == {
        "conv1_1": {"kernel": (3, 3, 3, 32), "bias": (32,)},
        "conv1_2": {"kernel": (3, 3, 32, 32), "bias": (32,)},
        "conv2_1": {"kernel": (3, 3, 32, 64), "bias": (64,)},
        "conv2_2": {"kernel": (3, 3, 64, 64), "bias": (64,)},
        "dense1": {"kernel": (8 * 8 * 64, 512), "bias": (512,)},
        "head": {"kernel": (512, 10), "bias": (10,)},
    }
    assert models.count_params(params) == 2_168_362
    # 159.5 MFLOP per training image = 3 x forward (forward + two backward passes).
    assert 3 * models.flops_per_example(config) == 159_479_808
    logits = models.apply_model(graphdef, params, jnp.zeros((2, 32, 32, 3)))
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32


def test_shapes_follow_the_data():
    config = models.ModelConfig(image_shape=(28, 28, 1), num_classes=7, conv_blocks=((4,), (4,), (4,)), dense_features=())
    graphdef, params = models.init_params(config, jax.random.key(0))
    assert models.apply_model(graphdef, params, jnp.ones((3, 28, 28, 1))).shape == (3, 7)
    assert params["head"]["kernel"].shape == (3 * 3 * 4, 7)  # 28 -> 14 -> 7 -> 3


def test_init_is_a_function_of_the_key():
    _, a = models.init_params(TINY, jax.random.key(1))
    _, b = models.init_params(TINY, jax.random.key(1))
    _, c = models.init_params(TINY, jax.random.key(2))
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert not np.array_equal(a["head"]["kernel"], c["head"]["kernel"])


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (1, 7, 9, 2)])
def test_reshape_max_pool_matches_nnx_max_pool_values_and_gradients(shape):
    x = jax.random.normal(jax.random.key(0), shape)  # continuous values: maxima are unique
    np.testing.assert_array_equal(models.max_pool_2x2(x), nnx.max_pool(x, (2, 2), (2, 2)))
    cotangent = jax.random.normal(jax.random.key(1), models.max_pool_2x2(x).shape)
    grad_fast = jax.grad(lambda v: jnp.sum(models.max_pool_2x2(v) * cotangent))(x)
    grad_ref = jax.grad(lambda v: jnp.sum(nnx.max_pool(v, (2, 2), (2, 2)) * cotangent))(x)
    np.testing.assert_array_equal(grad_fast, grad_ref)


def test_dropout_only_with_a_key():
    config = models.ModelConfig(**{**TINY.__dict__, "dropout_rate": 0.5})
    graphdef, params = models.init_params(config, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
    plain = models.apply_model(graphdef, params, x)
    np.testing.assert_array_equal(plain, models.apply_model(graphdef, params, x))
    dropped = models.apply_model(graphdef, params, x, dropout_key=jax.random.key(2))
    assert not np.allclose(plain, dropped)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_classes": 1}, "num_classes"),
        ({"conv_blocks": ((0,),)}, "conv_blocks"),
        ({"dropout_rate": 1.0}, "dropout_rate"),
        ({"compute_dtype": "float16"}, "compute_dtype"),
        ({"image_shape": (2, 2, 3), "conv_blocks": ((4,), (4,))}, "pooling"),
    ],
)
def test_bad_model_config_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        models.ModelConfig(**kwargs)


# --- The CPU fast path: kernel gradients summed over batch chunks (issue 6). ---

SMALL = models.ModelConfig(image_shape=(16, 16, 3), conv_blocks=((8, 8), (16,)), dense_features=(32,))


def _plain_and_chunked(config, chunk):
    plain = models.ModelConfig(**{**config.__dict__, "weight_grad_chunk": 0})
    fast = models.ModelConfig(**{**config.__dict__, "weight_grad_chunk": chunk})
    graph_plain, params = models.init_params(plain, jax.random.key(0))
    graph_fast, params_fast = models.init_params(fast, jax.random.key(0))
    jax.tree.map(np.testing.assert_array_equal, params, params_fast)  # same parameters
    return graph_plain, graph_fast, params


@pytest.mark.parametrize("batch, chunk", [(10, 4), (12, 3), (5, 16)])  # uneven last chunk; batch <= chunk
def test_chunked_weight_grad_equals_autodiff_of_the_plain_conv(batch, chunk):
    graph_plain, graph_fast, params = _plain_and_chunked(SMALL, chunk)
    images = jax.random.normal(jax.random.key(1), (batch, 16, 16, 3))
    labels = jax.random.randint(jax.random.key(2), (batch,), 0, 10)

    def loss(graphdef, params):
        logits = models.apply_model(graphdef, params, images)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

    np.testing.assert_array_equal(  # the forward pass is the same XLA convolution
        jax.jit(lambda p: models.apply_model(graph_fast, p, images))(params),
        jax.jit(lambda p: models.apply_model(graph_plain, p, images))(params))
    value_plain, grads_plain = jax.jit(jax.value_and_grad(lambda p: loss(graph_plain, p)))(params)
    value_fast, grads_fast = jax.jit(jax.value_and_grad(lambda p: loss(graph_fast, p)))(params)
    np.testing.assert_array_equal(value_fast, value_plain)
    for layer in grads_plain:  # only the order of the sum over the batch differs
        for name in ("kernel", "bias"):
            np.testing.assert_allclose(grads_fast[layer][name], grads_plain[layer][name], rtol=2e-5,
                                       atol=2e-6 * float(jnp.max(jnp.abs(grads_plain[layer][name]))))


def test_chunked_weight_grad_under_vmap_over_seeds_and_float64_reference():
    """vmapped seeds (the study) batch the custom rule; the kernel gradient also matches float64."""
    conv = models.chunked_weight_grad_conv(3)
    x = jax.random.normal(jax.random.key(0), (2, 7, 6, 6, 4))  # [seed, B, H, W, C]
    w = jax.random.normal(jax.random.key(1), (2, 3, 3, 4, 5))
    cotangent = jax.random.normal(jax.random.key(2), (2, 7, 6, 6, 5))

    fast = jax.jit(jax.vmap(lambda x, w, c: jax.vjp(
        lambda w: conv(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")), w)[1](c)[0]))(x, w, cotangent)
    # float64 reference: the kernel gradient is sum_{b,h,w} patch(x)[dy,dx,c] * g[o]
    x64, g64 = np.asarray(x, np.float64), np.asarray(cotangent, np.float64)
    padded = np.pad(x64, ((0, 0), (0, 0), (1, 1), (1, 1), (0, 0)))
    expected = np.stack([np.stack([np.einsum("sbhwc,sbhwo->sco", padded[:, :, dy:dy + 6, dx:dx + 6], g64)
                                   for dx in range(3)], 1) for dy in range(3)], 1)
    np.testing.assert_allclose(fast, expected, rtol=1e-4, atol=1e-4)


def test_weight_grad_chunk_defaults_per_backend():
    assert models.resolve_weight_grad_chunk(None, "cpu") == models.CPU_WEIGHT_GRAD_CHUNK
    assert models.resolve_weight_grad_chunk(None, "gpu") == 0
    assert models.resolve_weight_grad_chunk(None, "tpu") == 0
    assert models.resolve_weight_grad_chunk(8, "gpu") == 8
    assert models.chunked_weight_grad_conv(8) is models.chunked_weight_grad_conv(8)  # stable graphdefs
    with pytest.raises(ValueError, match="weight_grad_chunk"):
        models.ModelConfig(weight_grad_chunk=-1)
