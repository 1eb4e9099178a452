"""One frozen dataclass of run settings, validated once; all bad input is caught here.

Validation runs before anything is compiled or loaded and raises ``ConfigError`` with
one line that names the flag and, where there is a fixed set, the valid values.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

from softsig.losses import LOSS_NAMES

OPTIMIZERS = ("adam", "sgd")
PARALLEL_MODES = ("none", "pmap", "shard_map")
COMPUTE_DTYPES = ("float32", "bfloat16")

# Settings that fix the shapes of the model or optimizer state: changing one against an
# existing workdir cannot resume, so it is an error rather than a restore crash.
SHAPE_FIELDS = ("dataset", "conv_blocks", "dense_features", "optimizer", "momentum_enabled", "num_seeds")


class ConfigError(ValueError):
    """A bad setting; the message names the flag."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of one training run (the absl flags of ``experiments/train.py``)."""

    loss: str = "softmax_cross_entropy"
    dataset: str = "cifar10"
    data_dir: str | None = None
    train_split: str = "train"
    test_split: str = "test"
    epochs: int = 10
    batch_size: int = 128
    eval_batch_size: int = 1000
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    momentum: float = 0.9
    seed: int = 0
    num_seeds: int = 1  # seeds seed, seed+1, ... trained together as one vmapped program
    parallel: str = "shard_map"
    num_devices: int = 0  # 0: every device
    augment: bool = False
    conv_blocks: str = "32,32;64,64"
    dense_features: str = "512"
    dropout_rate: float = 0.0
    compute_dtype: str = "float32"
    steps_per_dispatch: int = 50
    checkpoint_every_steps: int = 500
    keep_checkpoints: int = 3

    @property
    def momentum_enabled(self) -> bool:
        return self.optimizer == "sgd" and self.momentum > 0

    def conv_block_widths(self) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(int(w) for w in block.split(",")) for block in self.conv_blocks.split(";"))

    def dense_widths(self) -> tuple[int, ...]:
        return tuple(int(w) for w in self.dense_features.split(",") if w.strip())

    def validate(self) -> Config:
        """Returns self, or raises ``ConfigError`` naming the first bad flag."""
        _one_of("loss", self.loss, LOSS_NAMES)
        _one_of("optimizer", self.optimizer, OPTIMIZERS)
        _one_of("parallel", self.parallel, PARALLEL_MODES)
        _one_of("compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
        if not self.dataset or not re.fullmatch(r"[a-z0-9_]+(/[\w.-]+)?(:[\w.*]+)?", self.dataset):
            raise ConfigError(f"--dataset={self.dataset!r} is not a dataset name (e.g. cifar10, mnist, synthetic).")
        for name in ("epochs", "batch_size", "eval_batch_size", "steps_per_dispatch", "checkpoint_every_steps",
                     "keep_checkpoints", "num_seeds"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ConfigError(f"--{name}={getattr(self, name)!r} must be a positive integer.")
        if not self.learning_rate > 0:
            raise ConfigError(f"--learning_rate={self.learning_rate!r} must be positive.")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"--momentum={self.momentum!r} must be in [0, 1).")
        if not 0 <= self.dropout_rate < 1:
            raise ConfigError(f"--dropout_rate={self.dropout_rate!r} must be in [0, 1).")
        if self.num_devices < 0:
            raise ConfigError(f"--num_devices={self.num_devices} must be 0 (all devices) or positive.")
        if self.parallel == "none" and self.num_devices > 1:
            raise ConfigError(f"--parallel=none runs on one device; got --num_devices={self.num_devices}.")
        if self.seed < 0:
            raise ConfigError(f"--seed={self.seed} must be non-negative.")
        try:
            blocks = self.conv_block_widths()
            if not blocks or any(w <= 0 for block in blocks for w in block):
                raise ValueError
        except ValueError:
            raise ConfigError(
                f"--conv_blocks={self.conv_blocks!r} must be ';'-separated blocks of ','-separated positive "
                "widths, e.g. '32,32;64,64'."
            ) from None
        try:
            if any(w <= 0 for w in self.dense_widths()):
                raise ValueError
        except ValueError:
            raise ConfigError(
                f"--dense_features={self.dense_features!r} must be ','-separated positive widths, e.g. '512'."
            ) from None
        return self

    def check_devices(self, num_devices: int) -> None:
        """Batch sizes against the device count (known only after JAX starts)."""
        for name in ("batch_size", "eval_batch_size"):
            value = getattr(self, name)
            if value % num_devices:
                raise ConfigError(
                    f"--{name}={value} must be a multiple of the number of devices ({num_devices}); "
                    f"try --{name}={max(1, value // num_devices) * num_devices}."
                )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def shape_signature(self) -> dict:
        return {name: getattr(self, name) for name in SHAPE_FIELDS}


def _one_of(flag: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"--{flag}={value!r} is not valid; valid values: {', '.join(valid)}.")


def check_workdir(workdir: str) -> str:
    """Creates ``workdir`` and checks it is writable; returns its absolute path."""
    path = os.path.abspath(os.path.expanduser(workdir))
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_test_{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as error:
        raise ConfigError(f"--workdir={workdir!r} is not writable: {error.strerror or error}.") from None
    return path


def check_resumable(config: Config, saved_config_path: str, has_checkpoint: bool = True) -> None:
    """An existing run in the workdir must have the same model/optimizer shapes.

    Only a run that left a checkpoint binds the workdir; one that failed before its first
    save (bad input, an early NaN) does not.
    """
    if not has_checkpoint or not os.path.exists(saved_config_path):
        return
    with open(saved_config_path) as f:
        saved = json.load(f).get("config", {})
    for name in SHAPE_FIELDS:
        if name == "momentum_enabled":
            saved_value = saved.get("optimizer") == "sgd" and saved.get("momentum", 0) > 0
        else:
            saved_value = saved.get(name)
        if saved_value is not None and saved_value != getattr(config, name):
            flag = "momentum" if name == "momentum_enabled" else name
            raise ConfigError(
                f"--{flag}={getattr(config, flag)!r} differs from the run in this workdir "
                f"({flag}={saved.get(flag)!r}); it changes the model or optimizer state, so the run cannot "
                "resume. Use a new --workdir."
            )
