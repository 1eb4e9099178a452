r"""One prepared accelerator check: correctness that matters, then throughput; one JSON file out.

  python experiments/gpu_check.py --output=gpu_check.json

Needs only jax, flax, optax, numpy (synthetic data; no tfds/TF/orbax). Checks, on the
default backend against the CPU backend: the losses and their gradients, 5 Adam steps of
the default CNN, the scanned multi-step chunk against single steps, the padded full-split
eval; then measures train images/s at several batch sizes, vmapped seeds, and one full
synthetic epoch (50,000 images) with its test evaluation.
"""

import json
import os
import platform
import sys
import time
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

_OUTPUT = flags.DEFINE_string("output", "gpu_check.json", "Where to write the results.")
_BATCHES = flags.DEFINE_list("batch_sizes", ["128", "512", "1024"], "Batch sizes to time.")
_SEEDS = flags.DEFINE_integer("num_seeds", 3, "Seeds for the vmapped-seeds measurement.")
_QUICK = flags.DEFINE_bool("quick", False, "Tiny sizes (to try the script on a CPU).")


def _timed(fn, repeats=3):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def check_losses(results):
    from softsig import losses

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, 10)).astype(np.float32) * 5
    labels = rng.integers(0, 10, 64)
    one_hot = np.eye(10)[labels]
    p = 1 / (1 + np.exp(-logits.astype(np.float64)))
    log_softmax = logits - logits.max(-1, keepdims=True)
    log_softmax = log_softmax - np.log(np.exp(log_softmax).sum(-1, keepdims=True))
    expected = {"sigmoid_mse": ((p - one_hot) ** 2).mean(-1), "softmax_cross_entropy": -(one_hot * log_softmax).sum(-1)}
    grads = {"sigmoid_mse": 2 / 10 * (p - one_hot) * p * (1 - p), "softmax_cross_entropy": np.exp(log_softmax) - one_hot}
    for name, loss in losses.LOSSES.items():
        value, grad = jax.value_and_grad(lambda x: loss.with_integer_labels(x, labels).sum())(jnp.asarray(logits))
        results[f"loss_{name}_max_abs_error"] = float(np.max(np.abs(np.asarray(jax.vmap(
            lambda x, y: loss.with_integer_labels(x, y))(jnp.asarray(logits), labels)) - expected[name])))
        results[f"loss_{name}_grad_max_abs_error"] = float(np.max(np.abs(np.asarray(grad) - grads[name])))
        extreme = jnp.asarray(np.where(rng.random((8, 10)) < 0.5, 1e4, -1e4), jnp.bfloat16)
        v, g = jax.value_and_grad(lambda x: loss.with_integer_labels(x, labels[:8]).sum().astype(jnp.float32))(extreme)
        results[f"loss_{name}_bf16_extreme_finite"] = bool(np.isfinite(float(v)) and np.all(np.isfinite(np.asarray(g, np.float32))))
    assert all(results[f"loss_{n}_max_abs_error"] < 1e-5 for n in losses.LOSS_NAMES), results


def five_steps(model_config, device, batches):
    from softsig import losses, train

    with jax.default_device(device):
        tx = train.make_optimizer("adam", 1e-3)
        graphdef, state = train.init_train_state(model_config, tx, seed=0)
        step = train.make_train_step(graphdef, tx, losses.get_loss("softmax_cross_entropy"))
        for batch in batches:
            state, metrics = step(state, jax.device_put(batch, device))
        return jax.tree.map(np.asarray, state.params), float(metrics["loss"])


def check_against_cpu(results, model_config, batch_size):
    rng = np.random.default_rng(1)
    shape = model_config.image_shape
    batches = [{"images": rng.normal(size=(batch_size, *shape)).astype(np.float32),
                "labels": rng.integers(0, model_config.num_classes, batch_size).astype(np.int32)} for _ in range(5)]
    with jax.default_matmul_precision("highest"):
        accel_params, accel_loss = five_steps(model_config, jax.devices()[0], batches)
        cpu_params, cpu_loss = five_steps(model_config, jax.devices("cpu")[0], batches)
    diff = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), accel_params, cpu_params)))
    results["five_adam_steps_max_abs_param_diff_vs_cpu"] = diff
    results["five_adam_steps_loss_accel_vs_cpu"] = [accel_loss, cpu_loss]


def check_chunk_and_eval(results, model_config, split, test_split, batch_size):
    from softsig import losses, parallel, pipeline, train

    dp = parallel.make_parallel("none")
    tx = train.make_optimizer("adam", 1e-3)
    norm = pipeline.normalization_from(split.images)
    data = pipeline.put_dataset(dp, split.images, split.labels)

    def programs(host_loop):
        graphdef, state = train.init_train_state(model_config, tx, seed=0)
        progs = pipeline.Programs(dp, graphdef, tx, losses.get_loss("sigmoid_mse"), global_batch=batch_size,
                                  eval_batch=1000, norm=norm, use_augment=True, host_loop=host_loop)
        return progs, dp.put(jax.tree.map(np.asarray, state), parallel.REPLICATED)

    progs, state = programs(False)
    scanned, scanned_metrics = progs.train_chunk(state, data, 0, 0, 4)
    progs_loop, state = programs(True)
    looped, looped_metrics = progs_loop.train_chunk(state, data, 0, 0, 4)
    results["scan_vs_single_steps_max_abs_param_diff"] = max(jax.tree.leaves(jax.tree.map(
        lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), scanned.params, looped.params)))
    test_data = pipeline.put_dataset(dp, test_split.images, test_split.labels, pad_multiple=1000)
    evaluated = progs.evaluate(scanned, test_data)
    results["eval_counts_every_test_example_once"] = evaluated["count"] == test_split.num_examples


def measure(results, model_config, split, test_split):
    from softsig import losses, models, parallel, pipeline, train

    dp = parallel.make_parallel("none")
    tx = train.make_optimizer("adam", 1e-3)
    norm = pipeline.normalization_from(split.images)
    data = pipeline.put_dataset(dp, split.images, split.labels)
    test_data = pipeline.put_dataset(dp, test_split.images, test_split.labels, pad_multiple=1000)
    flops = 3 * models.flops_per_example(model_config)
    results["throughput"] = {}
    for num_seeds in (1, _SEEDS.value):
        for batch_size in [int(b) for b in _BATCHES.value]:
            steps = 20 if not _QUICK.value else 2
            graphdef, state = train.init_train_state(model_config, tx, seed=0)
            host_state = jax.tree.map(np.asarray, state)
            if num_seeds > 1:
                host_state = jax.tree.map(lambda x: np.stack([x] * num_seeds), host_state)
            progs = pipeline.Programs(dp, graphdef, tx, losses.get_loss("softmax_cross_entropy"), global_batch=batch_size,
                                      eval_batch=1000, norm=norm, vmap_seeds=num_seeds > 1)
            state = dp.put(host_state, parallel.REPLICATED)
            start = time.perf_counter()
            state, _ = progs.train_chunk(state, data, 0, 0, steps)
            jax.block_until_ready(state)
            compile_and_first = time.perf_counter() - start
            holder = {"state": state}

            def run():
                holder["state"], metrics = progs.train_chunk(holder["state"], data, 0, 0, steps)
                return metrics

            seconds = _timed(run)
            ips = steps * batch_size * num_seeds / seconds
            results["throughput"][f"batch{batch_size}_seeds{num_seeds}"] = {
                "train_images_per_second": ips, "tflops": ips * flops / 1e12,
                "first_call_seconds_incl_compile": compile_and_first,
            }
    # One full epoch (all of the train split) plus the full test-set eval, batch 128, one seed.
    graphdef, state = train.init_train_state(model_config, tx, seed=0)
    progs = pipeline.Programs(dp, graphdef, tx, losses.get_loss("softmax_cross_entropy"), global_batch=128,
                              eval_batch=1000, norm=norm)
    state = dp.put(jax.tree.map(np.asarray, state), parallel.REPLICATED)
    steps = pipeline.steps_per_epoch(split.num_examples, 128)
    state, _ = progs.train_chunk(state, data, 0, 0, steps)
    progs.evaluate(state, test_data)
    jax.block_until_ready(state)
    start = time.perf_counter()
    state, metrics = progs.train_chunk(state, data, 1, 0, steps)
    evaluated = progs.evaluate(state, test_data)
    results["epoch_seconds_batch128_incl_eval"] = time.perf_counter() - start
    results["epoch_test_accuracy_after_2_epochs_synthetic"] = evaluated["accuracy"]


def main(argv):
    del argv
    from softsig import data, models

    results = {"backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
               "jax": jax.__version__, "python": platform.python_version(), "errors": {}}
    model_config = models.ModelConfig()
    train_size, test_size = (2048, 1000) if _QUICK.value else (50_000, 10_000)
    split = data.load_split("synthetic", f"train[:{train_size}]")
    test_split = data.load_split("synthetic", f"test[:{test_size}]")
    checks = [
        ("losses", lambda: check_losses(results)),
        ("against_cpu", lambda: check_against_cpu(results, model_config, 64)),
        ("chunk_and_eval", lambda: check_chunk_and_eval(results, model_config, split, test_split, 128)),
        ("throughput", lambda: measure(results, model_config, split, test_split)),
    ]
    for name, check in checks:
        start = time.perf_counter()
        try:
            check()
        except Exception:  # record and go on: one failure must not hide the other numbers
            results["errors"][name] = traceback.format_exc()[-3000:]
        results[f"{name}_seconds"] = time.perf_counter() - start
        with open(_OUTPUT.value, "w") as f:
            json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))
    sys.exit(1 if results["errors"] else 0)


if __name__ == "__main__":
    app.run(main)
