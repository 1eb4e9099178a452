"""softsig: sigmoid+MSE vs softmax+CE on CIFAR-10, as a reusable JAX/Flax training kernel.

Every public name loads on first use (PEP 562), so ``import softsig.losses`` pulls in jax
only, and ``softsig.launch`` can run before jax is imported at all.
"""

import importlib

__version__ = "0.1.0"

_LAZY = {
    "LOSS_NAMES": "softsig.losses",
    "LOSSES": "softsig.losses",
    "Loss": "softsig.losses",
    "get_loss": "softsig.losses",
    "sigmoid_mse": "softsig.losses",
    "sigmoid_mse_with_integer_labels": "softsig.losses",
    "softmax_cross_entropy": "softsig.losses",
    "softmax_cross_entropy_with_integer_labels": "softsig.losses",
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

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'softsig' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
