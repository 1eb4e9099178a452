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


def test_per_layer_gradient_norms_make_up_the_global_norm():
    tx = optax.sgd(0.1)
    graphdef, state = train.init_train_state(TINY, tx, seed=0)
    _, metrics = train.make_train_step(graphdef, tx, losses.get_loss("sigmoid_mse"))(state, random_batch(4))
    layers = [k for k in metrics if k.startswith("grad_norm_")]
    assert sorted(layers) == sorted(f"grad_norm_{name}" for name in ("conv1_1", "conv2_1", "dense1", "head"))
    np.testing.assert_allclose(sum(float(metrics[k]) ** 2 for k in layers), float(metrics["grad_norm"]) ** 2, rtol=1e-5)


@pytest.mark.parametrize("loss_name", losses.LOSS_NAMES)
def test_eval_diagnostics_against_numpy(loss_name):
    loss = losses.get_loss(loss_name)
    graphdef, state = train.init_train_state(TINY, optax.sgd(0.1), seed=0)
    batch = random_batch(5, batch=40)
    batch["images"] = batch["images"] * 20  # spread the logits: some saturated outputs, several bins
    batch["mask"] = np.arange(40) < 33
    sums = jax.jit(lambda p, b: train.eval_sums_body(p, b, graphdef=graphdef, loss=loss))(state.params, batch)
    got = train.summarize_eval(jax.tree.map(np.asarray, sums))

    logits = np.asarray(models.apply_model(graphdef, state.params, batch["images"]), np.float64)[:33]
    labels = batch["labels"][:33]
    if loss_name == "sigmoid_mse":
        outputs = 1 / (1 + np.exp(-logits))
    else:
        outputs = np.exp(logits - logits.max(-1, keepdims=True))
        outputs /= outputs.sum(-1, keepdims=True)
    normalised = outputs / outputs.sum(-1, keepdims=True)
    confidence, predicted = normalised.max(-1), logits.argmax(-1)
    ece = 0.0
    for b in range(train.ECE_BINS):
        in_bin = np.minimum((confidence * train.ECE_BINS).astype(int), train.ECE_BINS - 1) == b
        if in_bin.any():
            ece += abs(np.mean(predicted[in_bin] == labels[in_bin]) - confidence[in_bin].mean()) * in_bin.sum() / 33
    true_p = outputs[np.arange(33), labels]
    np.testing.assert_allclose(got["ece"], ece, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got["true_class_p1mp"], np.mean(true_p * (1 - true_p)), rtol=1e-4, atol=1e-7)
    saturated = np.mean(((outputs < 0.01) | (outputs > 0.99)).mean(-1))
    np.testing.assert_allclose(got["saturated_fraction"], saturated, rtol=1e-5, atol=1e-7)
    assert got["count"] == 33
