"""pmap and shard_map against a one-device step on the whole batch (8 fake CPU devices)."""

import functools

import jax
import numpy as np
import pytest

from softsig import losses, parallel, train
from softsig.parallel import REPLICATED, SHARDED
from tests.helpers import TINY, random_batch

BATCHES = [random_batch(seed, batch=16) for seed in range(5)]


def run_five_steps(mode, optimizer, num_devices=None):
    tx = train.make_optimizer(optimizer, 1e-2 if optimizer == "adam" else 0.1)
    graphdef, state = train.init_train_state(TINY, tx, seed=0)
    loss = losses.get_loss("sigmoid_mse" if optimizer == "sgd" else "softmax_cross_entropy")
    dp = parallel.make_parallel(mode, num_devices)
    traces = []

    def counted_body(state, batch, *, axis_name):
        traces.append(1)
        return train.train_step_body(state, batch, graphdef=graphdef, tx=tx, loss=loss, axis_name=axis_name)

    step = dp.compile(counted_body, (REPLICATED, SHARDED), (REPLICATED, REPLICATED), donate_argnums=(0,))
    state = dp.put(state, REPLICATED)
    for batch in BATCHES:
        state, metrics = step(state, dp.put(batch, SHARDED))
    evaluate = dp.compile(
        functools.partial(train.eval_sums_body, graphdef=graphdef, loss=loss), (REPLICATED, SHARDED), REPLICATED
    )
    eval_sums = evaluate(state.params, dp.put(random_batch(9, batch=16), SHARDED))
    return dp.get(state, REPLICATED), dp.get(metrics, REPLICATED), dp.get(eval_sums, REPLICATED), len(traces)


@pytest.fixture(scope="module", params=["sgd", "adam"])
def reference(request):
    return request.param, run_five_steps("none", request.param)


def test_eight_devices_are_visible():
    assert jax.device_count() == 8


@pytest.mark.parametrize("mode", ["pmap", "shard_map"])
def test_data_parallel_matches_one_device_on_the_full_batch(reference, mode):
    optimizer, (ref_state, ref_metrics, ref_eval, _) = reference
    state, metrics, eval_sums, traces = run_five_steps(mode, optimizer)
    assert traces == 1
    assert int(state.step) == int(ref_state.step) == 5
    diffs = jax.tree.map(lambda a, b: np.max(np.abs(a - b)), state.params, ref_state.params)
    assert max(jax.tree.leaves(diffs)) < 1e-4, diffs
    opt_diffs = jax.tree.map(lambda a, b: np.max(np.abs(np.asarray(a, float) - b)), state.opt_state, ref_state.opt_state)
    assert max(jax.tree.leaves(opt_diffs), default=0.0) < 1e-4
    for name in ("loss", "accuracy", "grad_norm"):
        np.testing.assert_allclose(metrics[name], ref_metrics[name], rtol=1e-5, atol=1e-6)
    assert int(eval_sums["count"]) == int(ref_eval["count"]) == 16
    assert int(eval_sums["correct"]) == int(ref_eval["correct"])
    np.testing.assert_allclose(eval_sums["loss_sum"], ref_eval["loss_sum"], rtol=1e-5)


def test_two_of_eight_devices(reference):
    optimizer, (ref_state, *_) = reference
    state, *_ = run_five_steps("shard_map", optimizer, num_devices=2)
    diffs = jax.tree.map(lambda a, b: np.max(np.abs(a - b)), state.params, ref_state.params)
    assert max(jax.tree.leaves(diffs)) < 1e-4


def test_pmean_of_shard_map_gradients_with_vma_checking_is_n_times_too_large():
    """The trap the bodies avoid: with check_vma=True grads of replicated params arrive psum-ed."""
    from jax.sharding import PartitionSpec as P

    dp = parallel.make_parallel("shard_map")
    w = np.float32(2.0)
    x = np.arange(8, dtype=np.float32)

    def grad_then_pmean(w, x):
        g = jax.grad(lambda w: jax.numpy.mean(w * x))(w)
        return jax.lax.pmean(g, parallel.AXIS)

    checked = jax.jit(jax.shard_map(grad_then_pmean, mesh=dp.mesh, in_specs=(P(), P("data")), out_specs=P()))
    unchecked = jax.jit(
        jax.shard_map(grad_then_pmean, mesh=dp.mesh, in_specs=(P(), P("data")), out_specs=P(), check_vma=False)
    )
    true_grad = np.mean(x)
    np.testing.assert_allclose(unchecked(w, x), true_grad)
    np.testing.assert_allclose(checked(w, x), 8 * true_grad)


def test_batch_not_divisible_by_devices_is_a_clear_error():
    dp = parallel.make_parallel("pmap")
    with pytest.raises(ValueError, match=r"batch_size=12 must be a positive multiple of the number of devices \(8\)"):
        dp.check_batch_size(12)
    with pytest.raises(ValueError, match="multiple of the number of devices"):
        dp.put(random_batch(0, batch=12), SHARDED)


def test_unknown_mode_lists_valid_modes():
    with pytest.raises(ValueError, match="none, pmap, shard_map"):
        parallel.make_parallel("fsdp")


def test_put_get_round_trip():
    tree = {"a": np.arange(6, dtype=np.float32).reshape(3, 2), "b": np.int32(4)}
    batch = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
    for mode in parallel.MODES:
        dp = parallel.make_parallel(mode)
        back = dp.get(dp.put(tree, REPLICATED), REPLICATED)
        jax.tree.map(np.testing.assert_array_equal, back, tree)
        assert all(type(leaf) is np.ndarray for leaf in jax.tree.leaves(back))  # orbax rejects np.int32 scalars
        np.testing.assert_array_equal(dp.get(dp.put(batch, SHARDED), SHARDED), batch)
