"""Small shared fixtures for the tests: a tiny model and random batches."""

import numpy as np

from softsig import models

TINY = models.ModelConfig(image_shape=(8, 8, 3), num_classes=10, conv_blocks=((4,), (8,)), dense_features=(16,))


def random_batch(seed: int, batch: int = 16, shape=(8, 8, 3), num_classes: int = 10) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "images": rng.normal(size=(batch, *shape)).astype(np.float32),
        "labels": rng.integers(0, num_classes, batch).astype(np.int32),
    }


def random_uint8_split(seed: int, count: int, shape=(8, 8, 3), num_classes: int = 10):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (count, *shape), dtype=np.uint8)
    labels = rng.integers(0, num_classes, count).astype(np.int32)
    return images, labels
