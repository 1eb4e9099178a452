r"""Train the CNN once: one loss, one seed.

  python experiments/train.py --workdir=/tmp/softsig/run1 --loss=sigmoid_mse --epochs=10

Rerunning the same command resumes from the latest good checkpoint in --workdir.
JAX's own options are flags too (--jax_num_cpu_devices, --jax_compilation_cache_dir, ...).
Multi-host: add --coordinator_address/--num_processes/--process_id, or --distributed to
let jax.distributed detect the cluster (SLURM, Open MPI, TPU pods).
"""

import dataclasses
import os
import sys

from softsig import launch  # noqa: E402  (imports nothing heavy)

launch.reexec_with_tuned_cpu_environment()  # before jax is imported
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF (used by tfds) is chatty at import

from absl import app, flags, logging  # noqa: E402

import jax  # noqa: E402

from softsig import config as config_lib  # noqa: E402
from softsig.data import DataNotFoundError  # noqa: E402
from softsig.metrics import NonFiniteLossError  # noqa: E402

jax.config.config_with_absl()

_DEFAULTS = config_lib.Config()
_HELP = {
    "loss": f"One of {', '.join(config_lib.LOSS_NAMES)}.",
    "dataset": "A tfds image-classification dataset (cifar10, cifar100, mnist, ...) or 'synthetic'.",
    "data_dir": "tfds data_dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets).",
    "train_split": "tfds split string for training, e.g. 'train' or 'train[:5000]'.",
    "test_split": "tfds split string evaluated once per epoch.",
    "epochs": "Training epochs.",
    "batch_size": "Global training batch size (split over all devices).",
    "eval_batch_size": "Global evaluation batch size (the test split is padded, never truncated).",
    "optimizer": f"One of {', '.join(config_lib.OPTIMIZERS)}.",
    "learning_rate": "Learning rate.",
    "momentum": "SGD momentum (0 disables it).",
    "seed": "Seed for the initialisation, the epoch order and augmentation.",
    "num_seeds": "Train seeds seed..seed+N-1 together as one vmapped program (metrics become per-seed lists).",
    "parallel": f"Data parallelism: one of {', '.join(config_lib.PARALLEL_MODES)}.",
    "num_devices": "Devices to use (0: all).",
    "augment": "Random crop (4-pixel padding) and horizontal flip, on device.",
    "conv_blocks": "Conv widths: ';' between pooling blocks, ',' between convs.",
    "dense_features": "Hidden dense widths, ','-separated ('' for none).",
    "dropout_rate": "Dropout after the hidden dense layers.",
    "compute_dtype": f"One of {', '.join(config_lib.COMPUTE_DTYPES)} (parameters stay float32).",
    "steps_per_dispatch": "Train steps per compiled call (lax.scan).",
    "checkpoint_every_steps": "Save a checkpoint every N steps (and at every epoch end).",
    "keep_checkpoints": "Latest checkpoints to keep (the best by test accuracy is kept apart).",
}


def define_config_flags():
    """One absl flag per Config field, with the dataclass defaults."""
    for field in dataclasses.fields(config_lib.Config):
        default, help_text = getattr(_DEFAULTS, field.name), _HELP[field.name]
        if isinstance(default, bool):
            flags.DEFINE_bool(field.name, default, help_text)
        elif isinstance(default, int):
            flags.DEFINE_integer(field.name, default, help_text)
        elif isinstance(default, float):
            flags.DEFINE_float(field.name, default, help_text)
        else:
            flags.DEFINE_string(field.name, default, help_text)


def config_from_flags() -> config_lib.Config:
    return config_lib.Config(**{f.name: getattr(flags.FLAGS, f.name) for f in dataclasses.fields(config_lib.Config)})


def define_distributed_flags():
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for jax.distributed.")
    flags.DEFINE_integer("num_processes", None, "Processes in a multi-host job.")
    flags.DEFINE_integer("process_id", None, "This process's index in a multi-host job.")
    flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with cluster auto-detection.")


def start_jax():
    """Multi-host start-up and the persistent compilation cache; before any other JAX work."""
    from softsig import parallel, run

    explicit = (flags.FLAGS.coordinator_address, flags.FLAGS.num_processes, flags.FLAGS.process_id)
    if flags.FLAGS.distributed or any(value is not None for value in explicit):
        parallel.initialize_distributed(*(explicit if any(v is not None for v in explicit) else (None, None, None)))
    run.enable_compilation_cache()


def run_main(body):
    """Runs ``body()`` turning the expected failures into one-line messages and exit codes."""
    from softsig.run import PREEMPTED_EXIT_CODE, Preempted

    try:
        body()
    except (config_lib.ConfigError, DataNotFoundError, NonFiniteLossError) as error:
        sys.stderr.write(f"error: {error}\n")
        sys.exit(1)
    except Preempted as error:
        sys.stderr.write(f"{error}\n")
        sys.exit(PREEMPTED_EXIT_CODE)


def _fmt(value) -> str:
    """A float, or a per-seed list as 'mean [v1 v2 ...]'."""
    if isinstance(value, list):
        return f"{sum(value) / len(value):.4f} [" + " ".join(f"{v:.4f}" for v in value) + "]"
    return f"{value:.4f}"


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO; -v 0 brings it back
        logging.set_verbosity(logging.WARNING)

    def body():
        config = config_from_flags().validate()
        start_jax()
        from softsig.run import train_and_evaluate

        final = train_and_evaluate(config, flags.FLAGS.workdir)
        if final:
            print("final: " + " ".join(f"{name} {_fmt(final[name])}" for name in (
                "test_error_rate", "test_accuracy", "test_loss")) + f" (step {final['step']})")

    run_main(body)


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics.jsonl, TensorBoard and config.json.")
    flags.mark_flag_as_required("workdir")
    define_config_flags()
    define_distributed_flags()
    app.run(main)
