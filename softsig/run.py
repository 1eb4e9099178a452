"""``train_and_evaluate``: the loop that ties config, data, devices, steps and checkpoints together.

A run, as data: ``Config`` (validated) -> uint8 splits (loaded once) -> full copies on the
devices -> restore or initialise the state -> per dispatch a scanned chunk of train steps
-> stacked metrics to ``metrics.jsonl`` -> checkpoints -> a full test-set eval per epoch.

Dispatch boundaries are a fixed function of the step (multiples of ``steps_per_dispatch``
and ``checkpoint_every_steps``, and epoch ends), and every checkpoint sits on one. A run
resumed from any checkpoint therefore replays exactly the dispatches of a run never
interrupted and ends with bit-identical state and metrics on CPU.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import threading
import time
from typing import Any

import jax
import numpy as np
from absl import logging

from softsig import checkpoint as checkpoint_lib
from softsig import data as data_lib
from softsig import metrics as metrics_lib
from softsig import launch, models, parallel, pipeline, train
from softsig.config import Config, ConfigError, check_resumable, check_workdir
from softsig.losses import get_loss
from softsig.parallel import REPLICATED

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, what schedulers expect from a terminated job


_first_step_reported = threading.Event()


class Preempted(Exception):
    """The run saved a checkpoint and stopped because it was asked to (SIGTERM or the cluster)."""


def default_compilation_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "softsig", "jax-compilation-cache")


def enable_compilation_cache(directory: str | None = None) -> None:
    """Turns on JAX's persistent compilation cache unless the user already chose a directory."""
    if jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", directory or default_compilation_cache_dir())
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def next_boundary(step: int, steps_per_epoch: int, config: Config) -> int:
    """The next step at which a dispatch ends (a pure function of ``step``)."""
    candidates = [
        (step // steps_per_epoch + 1) * steps_per_epoch,
        (step // config.steps_per_dispatch + 1) * config.steps_per_dispatch,
        (step // config.checkpoint_every_steps + 1) * config.checkpoint_every_steps,
    ]
    return min(candidates)


def model_config_for(config: Config, info: data_lib.DatasetInfo) -> models.ModelConfig:
    return models.ModelConfig(
        image_shape=tuple(info.image_shape),
        num_classes=info.num_classes,
        conv_blocks=config.conv_block_widths(),
        dense_features=config.dense_widths(),
        dropout_rate=config.dropout_rate,
        compute_dtype=config.compute_dtype,
    )


def run_description(config: Config, info: data_lib.DatasetInfo, dp: parallel.DataParallel) -> dict[str, Any]:
    """What ``config.json`` records: every setting, the versions and the devices."""
    import importlib.metadata

    def version(package):
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "config": config.to_dict(),
        "dataset": {
            "name": info.name,
            "synthetic": info.synthetic,
            "num_classes": info.num_classes,
            "image_shape": list(info.image_shape),
        },
        "versions": {
            "python": platform.python_version(),
            **{name.replace("-", "_"): version(name) for name in (
                "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tensorflow-datasets", "numpy", "softsig")},
        },
        "environment": launch.describe_environment(),
        "devices": {
            "platform": jax.default_backend(),
            "process_count": jax.process_count(),
            "used": dp.num_devices,
            "kinds": sorted({d.device_kind for d in dp.devices}),
            "host": platform.node(),
        },
    }


@contextlib.contextmanager
def _sigterm_flag():
    """Yields an Event set on SIGTERM (main thread only; elsewhere the event is never set)."""
    event = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield event
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: event.set())
    try:
        yield event
    finally:
        signal.signal(signal.SIGTERM, previous)


def _flag_error(flag: str, value: Any, fn, *args, **kwargs):
    """``fn(...)``, with a ValueError from deeper down reported as a ConfigError naming ``--flag``."""
    try:
        return fn(*args, **kwargs)
    except (ConfigError, data_lib.DataNotFoundError):
        raise
    except ValueError as error:
        raise ConfigError(f"--{flag}={value!r}: {str(error).splitlines()[0]}") from None


def train_and_evaluate(config: Config, workdir: str, *, show_progress: bool = True) -> dict[str, Any]:
    """Trains and evaluates per ``config`` in ``workdir``, resuming from its checkpoints.

    Returns the last evaluation record (test loss, accuracy and error rate at the end).
    Raises ``Preempted`` after saving on SIGTERM, ``NonFiniteLossError`` on a NaN/Inf loss,
    ``ConfigError``/``DataNotFoundError`` on bad input (before anything is compiled).
    """
    with _sigterm_flag() as sigterm:
        return _train_and_evaluate(config, workdir, show_progress, sigterm)


def _train_and_evaluate(config: Config, workdir: str, show_progress: bool, sigterm: threading.Event) -> dict[str, Any]:
    config.validate()
    workdir = check_workdir(workdir)
    config_path = os.path.join(workdir, "config.json")
    checkpoint_dir = os.path.join(workdir, "checkpoints")
    check_resumable(config, config_path, has_checkpoint=checkpoint_lib.has_checkpoint(checkpoint_dir))
    info = _flag_error("dataset", config.dataset, data_lib.dataset_info, config.dataset, config.data_dir)
    dp = _flag_error("num_devices", config.num_devices, parallel.make_parallel, config.parallel, config.num_devices or None)
    config.check_devices(dp.num_devices)
    is_main = jax.process_index() == 0

    # The synthetic dataset is fixed (its own seed 0), not redrawn per training seed: seeds vary
    # the init and the data order over the same data, as with a real dataset.
    train_split = _flag_error("train_split", config.train_split, data_lib.load_split, config.dataset,
                              config.train_split, data_dir=config.data_dir)
    test_split = _flag_error("test_split", config.test_split, data_lib.load_split, config.dataset,
                             config.test_split, data_dir=config.data_dir)
    if test_split.num_examples == 0:
        raise ConfigError(f"--test_split={config.test_split!r} selects no examples.")
    steps_per_epoch = _flag_error("batch_size", config.batch_size, pipeline.steps_per_epoch,
                                  train_split.num_examples, config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    norm = pipeline.normalization_from(train_split.images)

    model_config = _flag_error("conv_blocks", config.conv_blocks, model_config_for, config, info)
    if is_main:  # written once every input is known to be good
        with open(config_path + ".tmp", "w") as f:
            json.dump(run_description(config, info, dp), f, indent=2, sort_keys=True)
        os.replace(config_path + ".tmp", config_path)
    tx = train.make_optimizer(config.optimizer, config.learning_rate, config.momentum)
    seeds = list(range(config.seed, config.seed + config.num_seeds))
    vmap_seeds = len(seeds) > 1
    fresh_states = []
    for seed in seeds:
        graphdef, fresh_state = train.init_train_state(model_config, tx, seed)
        fresh_states.append(jax.tree.map(np.asarray, fresh_state))
    host_state = jax.tree.map(lambda *xs: np.stack(xs), *fresh_states) if vmap_seeds else fresh_states[0]
    as_record = (lambda x: np.asarray(x).tolist()) if vmap_seeds else float  # per-seed lists, or scalars
    checkpointer = checkpoint_lib.Checkpointer(checkpoint_dir, keep=config.keep_checkpoints)
    writer = metrics_lib.MetricsWriter(workdir, enabled=is_main)
    progress = metrics_lib.Progress(total_steps, enabled=show_progress and is_main)
    zero = as_record(np.zeros(len(seeds))) if vmap_seeds else 0.0
    zero_sums = {"loss": zero, "accuracy": zero, "steps": 0}
    epoch_sums = zero_sums
    last_eval: dict[str, Any] = {}

    restored = checkpointer.restore_latest(host_state._asdict())
    step = 0
    if restored is not None:
        step, state_dict, meta = restored
        host_state = train.TrainState(**state_dict)
        epoch_sums = meta["epoch_sums"]
        last_eval = meta.get("last_eval", {})
        progress.message(f"Resuming {workdir} from step {step} (epoch {step / steps_per_epoch:.2f}).")
    writer.truncate_after(step)
    if step >= total_steps:
        progress.message(f"Run in {workdir} already finished ({total_steps} steps); nothing to do.")
        checkpointer.close()
        return last_eval

    label = " [SYNTHETIC DATA]" if info.synthetic else ""
    progress.message(
        f"Training {config.loss} on {info.name}{label}: {train_split.num_examples} train / "
        f"{test_split.num_examples} test examples, {config.epochs} epochs x {steps_per_epoch} steps, "
        f"batch {config.batch_size} on {dp.num_devices} {jax.default_backend()} device(s) ({config.parallel})"
        + (f", seeds {seeds[0]}..{seeds[-1]} vmapped." if vmap_seeds else ".")
    )
    programs = pipeline.Programs(
        dp, graphdef, tx, get_loss(config.loss),
        global_batch=config.batch_size, eval_batch=config.eval_batch_size, norm=norm, use_augment=config.augment,
        vmap_seeds=vmap_seeds,
    )
    state = dp.put(host_state, REPLICATED)
    train_data = pipeline.put_dataset(dp, train_split.images, train_split.labels)
    test_data = pipeline.put_dataset(dp, test_split.images, test_split.labels, pad_multiple=config.eval_batch_size)

    def save(step, state, test_accuracy=None):
        meta = {"step": step, "epoch_sums": epoch_sums, "last_eval": last_eval}
        checkpointer.save(step, dp.get(state, REPLICATED)._asdict(), meta, test_accuracy=test_accuracy)

    if sigterm.is_set():
        checkpointer.close()
        raise Preempted(f"preempted before training resumed at step {step}; nothing new to save in {workdir}.")
    try:
        while step < total_steps:
            epoch, step_in_epoch = divmod(step, steps_per_epoch)
            num_steps = next_boundary(step, steps_per_epoch, config) - step
            start_time = time.perf_counter()
            state, chunk_metrics = programs.train_chunk(state, train_data, epoch, step_in_epoch, num_steps)
            chunk_metrics = dp.get(chunk_metrics, REPLICATED)  # waits for the chunk
            seconds = time.perf_counter() - start_time
            if not _first_step_reported.is_set():  # once per process (a study runs several)
                _first_step_reported.set()
                progress.message(
                    f"First {num_steps} step(s) done {launch.seconds_since_process_start():.1f} s after the "
                    "process started (imports, data, compilation included)."
                )
            for seed, losses in zip(seeds, np.reshape(chunk_metrics["loss"], (len(seeds), -1))):
                metrics_lib.check_finite(losses, step, seed=seed if vmap_seeds else None)
            step += num_steps
            images_per_second = num_steps * config.batch_size * len(seeds) / seconds

            def over_steps(name, reduce):  # per seed (last axis = steps), float64
                return reduce(np.asarray(chunk_metrics[name], np.float64), axis=-1)

            epoch_sums = {
                "loss": as_record(np.asarray(epoch_sums["loss"]) + over_steps("loss", np.sum)),
                "accuracy": as_record(np.asarray(epoch_sums["accuracy"]) + over_steps("accuracy", np.sum)),
                "steps": epoch_sums["steps"] + num_steps,
            }
            writer.write({
                "step": step,
                "epoch": step / steps_per_epoch,
                "train_loss": as_record(over_steps("loss", np.mean)),
                "train_accuracy": as_record(over_steps("accuracy", np.mean)),
                **{name: as_record(over_steps(name, np.mean)) for name in chunk_metrics if name.startswith("grad_norm")},
                "images_per_second": images_per_second,
                "dispatch_seconds": seconds,
            })
            progress.update(step, epoch, float(np.mean(chunk_metrics["loss"][..., -1])), images_per_second)

            test_accuracy = None
            if step % steps_per_epoch == 0:
                last_eval = _evaluate_epoch(programs, state, test_data, step, steps_per_epoch, epoch_sums)
                epoch_sums = zero_sums
                test_accuracy = float(np.mean(last_eval["test_accuracy"]))
                writer.write(last_eval)
                progress.message(
                    f"epoch {last_eval['epoch']:.0f}: " + " ".join(
                        f"{name} {np.mean(last_eval[name]):.4f}" for name in ("train_loss", "test_loss", "test_error_rate")
                    ) + (" (means over seeds)" if vmap_seeds else "")
                )
            preempted = sigterm.is_set() or checkpointer.reached_preemption(step)
            if step % config.checkpoint_every_steps == 0 or test_accuracy is not None or preempted:
                save(step, state, test_accuracy)
            if preempted:
                checkpointer.wait()
                raise Preempted(f"preempted: saved a checkpoint at step {step} in {workdir}; rerun to resume.")
    finally:
        progress.close()
        checkpointer.close()
        writer.close()
    return last_eval


def _evaluate_epoch(programs, state, test_data, step, steps_per_epoch, epoch_sums) -> dict[str, Any]:
    start_time = time.perf_counter()
    result = programs.evaluate(state, test_data)
    steps = max(epoch_sums["steps"], 1)
    per_step = (lambda x: (np.asarray(x) / steps).tolist()) if isinstance(epoch_sums["loss"], list) else (
        lambda x: x / steps)
    return {
        "step": step,
        "epoch": step / steps_per_epoch,
        "train_loss": per_step(epoch_sums["loss"]),
        "train_accuracy": per_step(epoch_sums["accuracy"]),
        "test_loss": result["loss"],
        "test_accuracy": result["accuracy"],
        "test_error_rate": result["error_rate"],
        "test_examples": result["count"],
        "test_ece": result["ece"],
        "test_saturated_fraction": result["saturated_fraction"],
        "test_true_class_p1mp": result["true_class_p1mp"],
        "eval_seconds": time.perf_counter() - start_time,
    }
