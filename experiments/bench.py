r"""Throughput of the softsig train step, input pipeline and evaluation on this machine.

  python experiments/bench.py --batch_size=128 --output=bench.json
  python experiments/bench.py --peers=keras,torch,torch_channels_last --rounds=5   # pip install -e .[bench]

Reports images/s (median over timed dispatches, after warm-up), achieved GFLOP/s and its
fraction of an f32 matmul peak measured in the same run, compile time, time from process
start to the first finished train step, the wall time of one epoch (train + eval over
``--num_examples``), and the on-device input pipeline's images/s (gather + normalise
[+ augment]) against the step's consumption. Synthetic data only: the numbers do not depend
on pixel values.

With ``--peers``, the same CNN and optimizer in other frameworks (``experiments/peers.py``,
each in its own process) are timed in interleaved rounds with the softsig step: in every
round each implementation runs ``--steps`` steps in turn, and ratios are taken within a
round, so machine-wide slowdowns cancel.
"""

import dataclasses
import json
import os
import statistics
import sys
import time

from softsig import launch  # imports nothing heavy

launch.reexec_with_tuned_cpu_environment()  # before jax is imported
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peers import compare_with_peers, format_peer_table  # noqa: E402  (experiments/peers.py)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

jax.config.config_with_absl()

_BATCH = flags.DEFINE_integer("batch_size", 128, "Global training batch size.")
_LOSS = flags.DEFINE_string("loss", "softmax_cross_entropy", "Loss name.")
_PARALLEL = flags.DEFINE_enum("parallel", "none", ["none", "pmap", "shard_map"], "Data parallelism.")
_DTYPE = flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"], "Conv/dense compute dtype.")
_CONV = flags.DEFINE_string("conv_blocks", "32,32;64,64", "Conv widths (see train.py).")
_DENSE = flags.DEFINE_string("dense_features", "512", "Dense widths.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed train steps per repetition.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions (the median is reported).")
_AUGMENT = flags.DEFINE_bool("augment", False, "Include on-device augmentation in the pipeline.")
_NUM_EXAMPLES = flags.DEFINE_integer("num_examples", 10_000, "Device-resident training examples.")
_HOST_LOOP = flags.DEFINE_enum("host_loop", "auto", ["auto", "true", "false"],
                               "Chunk as a host loop of one-step calls (auto: on CPU) or one lax.scan.")
_NUM_SEEDS = flags.DEFINE_integer("num_seeds", 1, "Seeds trained as one vmapped program (images/s counts all seeds).")
_WEIGHT_GRAD_CHUNK = flags.DEFINE_integer(
    "weight_grad_chunk", None, "Images per chunk of the conv kernel gradient (0: plain XLA conv "
    "gradient; default: the model's, 16 on CPU, off on GPU/TPU).")
_EPOCH = flags.DEFINE_bool("epoch", True, "Also time one full epoch (train + eval over --num_examples).")
_CACHE = flags.DEFINE_bool("compilation_cache", True, "Use the persistent compilation cache (off: cold compile).")
_PEERS = flags.DEFINE_list("peers", [], "Peer implementations to time against softsig, interleaved: "
                           "keras, keras_xla, torch, torch_channels_last, torch_compile (need .[bench]).")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Interleaved rounds when --peers is given.")
_OUTPUT = flags.DEFINE_string("output", None, "Write the results as JSON here.")


def _median_seconds(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak_gflops(size: int = 2048, repeats: int = 5) -> float:
    a = jnp.ones((size, size), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    jax.block_until_ready(matmul(a))
    return 2 * size**3 / _median_seconds(lambda: matmul(a), repeats) / 1e9


def main(argv):
    del argv
    from softsig import config as config_lib
    from softsig import data, losses, models, parallel, pipeline, run, train

    if _CACHE.value:
        run.enable_compilation_cache()
    start_time = time.perf_counter()
    config = config_lib.Config(
        loss=_LOSS.value, batch_size=_BATCH.value, parallel=_PARALLEL.value, compute_dtype=_DTYPE.value,
        conv_blocks=_CONV.value, dense_features=_DENSE.value, augment=_AUGMENT.value, dataset="synthetic",
    ).validate()
    dp = parallel.make_parallel(config.parallel)
    config.check_devices(dp.num_devices)
    split = data.load_split("synthetic", f"train[:{_NUM_EXAMPLES.value}]")
    model_config = run.model_config_for(config, data.SYNTHETIC_INFO)
    if _WEIGHT_GRAD_CHUNK.value is not None:
        model_config = dataclasses.replace(model_config, weight_grad_chunk=_WEIGHT_GRAD_CHUNK.value)
    tx = train.make_optimizer("adam", 1e-3)
    graphdef, state = train.init_train_state(model_config, tx, seed=0)
    state = jax.tree.map(np.asarray, state)
    if _NUM_SEEDS.value > 1:
        state = jax.tree.map(lambda x: np.stack([x] * _NUM_SEEDS.value), state)
    norm = pipeline.normalization_from(split.images)
    programs = pipeline.Programs(
        dp, graphdef, tx, losses.get_loss(config.loss),
        global_batch=config.batch_size, eval_batch=config.batch_size * 4, norm=norm, use_augment=config.augment,
        vmap_seeds=_NUM_SEEDS.value > 1, host_loop=None if _HOST_LOOP.value == "auto" else _HOST_LOOP.value == "true",
    )
    state = dp.put(state, parallel.REPLICATED)
    train_data = pipeline.put_dataset(dp, split.images, split.labels)
    eval_data = pipeline.put_dataset(dp, split.images, split.labels, pad_multiple=programs.eval_batch)
    init_seconds = time.perf_counter() - start_time

    start = time.perf_counter()
    state, _ = programs.train_chunk(state, train_data, 0, 0, 1)
    jax.block_until_ready(state)
    first_step_seconds = time.perf_counter() - start
    time_to_first_step = launch.seconds_since_process_start()  # from the command, imports included

    steps_per_epoch = pipeline.steps_per_epoch(split.num_examples, config.batch_size)
    count = min(_STEPS.value, steps_per_epoch)
    position = {"step": 1}

    def train_steps():
        """Exactly ``count`` steps per call (a chunk never crosses an epoch end), so every timed call
        does the same work and compiles nothing new."""
        nonlocal state
        first = position["step"] % steps_per_epoch
        if first + count > steps_per_epoch:
            first = 0
        state, metrics = programs.train_chunk(state, train_data, 0, first, count)
        position["step"] = first + count
        return metrics

    train_steps()  # warm-up (also compiles the chunk length)
    train_seconds = _median_seconds(train_steps, _REPEATS.value)
    train_ips = count * config.batch_size * _NUM_SEEDS.value / train_seconds

    programs.evaluate(state, eval_data)
    eval_seconds = _median_seconds(lambda: programs.evaluate(state, eval_data), _REPEATS.value)
    eval_ips = split.num_examples * _NUM_SEEDS.value / eval_seconds

    # The input pipeline alone: permutation, gather, normalise (+ augment) for steps_per_epoch batches.
    key = jax.random.key_data(jax.random.key(0))

    @jax.jit
    def input_only(images, labels, key):
        perm = pipeline.epoch_permutation(key, 0, labels.shape[0])

        def one(total, step):
            index = jax.lax.dynamic_slice_in_dim(perm, step * config.batch_size, config.batch_size)
            batch = pipeline.normalize(images[index], norm)
            if config.augment:
                keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(index)
                batch = pipeline.augment(batch, keys)
            return total + jnp.sum(batch) + jnp.sum(labels[index]), None

        return jax.lax.scan(one, jnp.float32(0), jnp.arange(steps_per_epoch))[0]

    host_data = (jnp.asarray(split.images), jnp.asarray(split.labels))
    jax.block_until_ready(input_only(*host_data, key))
    input_seconds = _median_seconds(lambda: input_only(*host_data, key), _REPEATS.value)
    input_ips = steps_per_epoch * config.batch_size / input_seconds

    epoch_seconds = None
    if _EPOCH.value:
        start = time.perf_counter()
        for first in range(0, steps_per_epoch, config.steps_per_dispatch):
            state, _ = programs.train_chunk(state, train_data, 1, first, min(config.steps_per_dispatch, steps_per_epoch - first))
        programs.evaluate(state, eval_data)  # returns host values: synchronised
        epoch_seconds = time.perf_counter() - start

    peers = {}
    if _PEERS.value:
        def softsig_round():
            start = time.perf_counter()
            jax.block_until_ready(train_steps())
            return count * config.batch_size * _NUM_SEEDS.value / (time.perf_counter() - start)

        peers = compare_with_peers(softsig_round, _PEERS.value, config.batch_size, _STEPS.value, _ROUNDS.value)

    peak = matmul_peak_gflops()
    flops_per_image = 3 * models.flops_per_example(model_config)
    achieved = train_ips * flops_per_image / 1e9
    results = {
        "implementation": "softsig",
        "backend": jax.default_backend(),
        "devices": dp.num_devices,
        "device_kind": dp.devices[0].device_kind,
        "parallel": config.parallel,
        "batch_size": config.batch_size,
        "num_seeds": _NUM_SEEDS.value,
        "compute_dtype": config.compute_dtype,
        "weight_grad_chunk": models.resolve_weight_grad_chunk(model_config.weight_grad_chunk),
        "host_loop": programs.host_loop,
        "train_images_per_second": train_ips,
        "eval_images_per_second": eval_ips,
        "input_pipeline_images_per_second": input_ips,
        "input_to_train_ratio": input_ips / train_ips,
        "gflop_per_image": flops_per_image / 1e9,
        "achieved_gflops": achieved,
        "matmul_peak_gflops": peak,
        "fraction_of_matmul_peak": achieved / peak,
        "init_seconds": init_seconds,
        "epoch_seconds": epoch_seconds,
        "epoch_examples": split.num_examples,
        "compilation_cache": _CACHE.value,
        "first_step_seconds": first_step_seconds,
        "time_to_first_step_seconds": time_to_first_step,
        **launch.describe_environment(),
        "command": " ".join(sys.argv),
    }
    if peers:
        results["interleaved"] = peers
    width = max(map(len, results))
    for name, value in results.items():
        if name == "interleaved":
            continue
        print(f"{name:<{width}}  {value:,.3f}" if isinstance(value, float) else f"{name:<{width}}  {value}")
    if peers:
        print(format_peer_table(peers, config.batch_size))
    if _OUTPUT.value:
        with open(_OUTPUT.value, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    app.run(main)
