"""The one-device train/eval steps against independent computations."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from softsig import losses, models, train
from tests.helpers import TINY, random_batch


@pytest.mark.parametrize("loss_name", losses.LOSS_NAMES)
def test_sgd_step_is_params_minus_lr_times_the_gradient(loss_name):
    loss = losses.get_loss(loss_name)
    tx = optax.sgd(0.1)
    graphdef, state = train.init_train_state(TINY, tx, seed=0)
    params_before = jax.tree.map(np.asarray, state.params)
    batch = random_batch(0)

    def reference_loss(params):
        logits = models.apply_model(graphdef, params, batch["images"])
        return jnp.mean(loss.fn(logits, jax.nn.one_hot(batch["labels"], 10)))

    expected_loss, grads = jax.value_and_grad(reference_loss)(params_before)
    new_state, metrics = train.make_train_step(graphdef, tx, loss)(state, batch)
    expected = jax.tree.map(lambda p, g: p - 0.1 * g, params_before, grads)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), new_state.params, expected)
    np.testing.assert_allclose(metrics["loss"], expected_loss, rtol=1e-6)
    np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(grads), rtol=1e-5)
    assert int(new_state.step) == 1


@pytest.mark.parametrize("loss_name", losses.LOSS_NAMES)
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_training_fits_a_fixed_batch(loss_name, optimizer):
    tx = train.make_optimizer(optimizer, 3e-3 if optimizer == "adam" else 0.3)
    graphdef, state = train.init_train_state(TINY, tx, seed=0)
    step = train.make_train_step(graphdef, tx, losses.get_loss(loss_name))
    batch = random_batch(1)
    _, first = step(state, batch)  # donated state: recreate before reusing
    graphdef, state = train.init_train_state(TINY, tx, seed=0)
    for _ in range(60):
        state, metrics = step(state, batch)
    assert float(metrics["loss"]) < 0.8 * float(first["loss"])
    assert float(metrics["accuracy"]) > float(first["accuracy"])


def test_train_step_compiles_once():
    traces = []
    tx = optax.adam(1e-3)
    graphdef, state = train.init_train_state(TINY, tx, seed=0)
    loss = losses.get_loss("sigmoid_mse")

    def counted(state, batch):
        traces.append(1)
        return train.train_step_body(state, batch, graphdef=graphdef, tx=tx, loss=loss)

    step = jax.jit(counted, donate_argnums=0)
    for seed in range(4):
        state, _ = step(state, random_batch(seed))
    assert len(traces) == 1 and int(state.step) == 4


def test_same_seed_same_run_and_different_seed_different_run():
    def run(seed):
        tx = optax.adam(1e-2)
        graphdef, state = train.init_train_state(TINY, tx, seed=seed)
        step = train.make_train_step(graphdef, tx, losses.get_loss("softmax_cross_entropy"))
        for i in range(3):
            state, _ = step(state, random_batch(i))
        return jax.tree.map(np.asarray, state.params)

    a, b, c = run(0), run(0), run(1)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert not np.array_equal(a["head"]["kernel"], c["head"]["kernel"])


def test_eval_step_masks_padding_rows():
    tx = optax.sgd(0.1)
    graphdef, state = train.init_train_state(TINY, tx, seed=0)
    loss = losses.get_loss("softmax_cross_entropy")
    eval_step = train.make_eval_step(graphdef, loss)
    batch = random_batch(3)
    masked = dict(batch, mask=np.arange(16) < 10)
    subset = {k: v[:10] for k, v in batch.items()}
    got, expected = eval_step(state, masked), eval_step(state, subset)
    assert int(got["count"]) == 10
    np.testing.assert_allclose(got["loss"], expected["loss"], rtol=1e-6)
    np.testing.assert_allclose(got["accuracy"], expected["accuracy"])
    logits = models.apply_model(graphdef, state.params, subset["images"])
    np.testing.assert_allclose(
        got["loss"], np.mean(optax.softmax_cross_entropy_with_integer_labels(logits, subset["labels"])), rtol=1e-6
    )


def test_summarize_eval():
    summary = train.summarize_eval({"loss_sum": 5.0, "correct": 3, "count": 4}, prefix="test_")
    assert summary == {"test_loss": 1.25, "test_accuracy": 0.75, "test_error_rate": 0.25, "test_count": 4}


def test_unknown_optimizer_lists_valid_ones():
    with pytest.raises(ValueError, match="adam, sgd"):
        train.make_optimizer("rmsprop", 0.1)
