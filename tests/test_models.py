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
