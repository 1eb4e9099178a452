"""softsig: sigmoid+MSE vs softmax+CE on CIFAR-10, as a reusable JAX/Flax training kernel.

The losses are imported eagerly and need only jax; everything else (flax, optax,
orbax, tfds) loads on first use, so ``import softsig.losses`` stays light for other
JAX code.
"""

import importlib

from softsig.losses import (
    LOSS_NAMES,
    LOSSES,
    Loss,
    get_loss,
    sigmoid_mse,
    sigmoid_mse_with_integer_labels,
    softmax_cross_entropy,
    softmax_cross_entropy_with_integer_labels,
)

__version__ = "0.1.0"

_LAZY = {
    "CNN": "softsig.models",
    "ModelConfig": "softsig.models",
    "apply_model": "softsig.models",
    "init_params": "softsig.models",
    "DataParallel": "softsig.parallel",
    "make_parallel": "softsig.parallel",
    "TrainState": "softsig.train",
    "eval_sums_body": "softsig.train",
    "init_train_state": "softsig.train",
    "make_eval_step": "softsig.train",
    "make_optimizer": "softsig.train",
    "make_train_step": "softsig.train",
    "train_step_body": "softsig.train",
}

__all__ = [
    "LOSSES",
    "LOSS_NAMES",
    "Loss",
    "get_loss",
    "sigmoid_mse",
    "sigmoid_mse_with_integer_labels",
    "softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
    *_LAZY,
]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'softsig' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
