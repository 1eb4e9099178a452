"""Host-side loading of image-classification datasets into read-only uint8 numpy arrays.

Two sources:

* any prepared tensorflow-datasets (TFDS) dataset with an `image`/`label` feature
  pair that fits in memory (cifar10, cifar100, mnist, fashion_mnist, svhn_cropped, ...);
* `synthetic`: a deterministic, learnable CIFAR-shaped set generated from a seed, for
  offline runs and tests.

Each split is loaded once per process and cached. This module knows nothing about
JAX devices or training; another module puts the arrays on devices.

TFDS data is never downloaded from here: machines running training are often
offline, and TFDS retries the download host for minutes before failing. A dataset
that is not prepared in `data_dir` raises `DataNotFoundError` at once, with
instructions for preparing it elsewhere.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import os
import threading
import time
from collections.abc import Callable, Hashable

import importlib
import re
from typing import Any

import numpy as np
from absl import logging


class _LazyModule:
    """Imports a module on first attribute access: the synthetic dataset works without tfds/TF
    installed (e.g. on a GPU node with only jax), and importing softsig.data stays cheap."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._name), attr)


tfds = _LazyModule("tensorflow_datasets")

SYNTHETIC = "synthetic"

# Shown when a dataset name is unknown: the sets this project is known to work with.
SUGGESTED_DATASETS = (SYNTHETIC, "cifar10", "cifar100", "mnist", "fashion_mnist", "svhn_cropped")

SplitSpec = Any  # a tfds split string such as 'train[:10%]', or a tfds split object


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset that models and training loops need."""

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]  # (H, W, C)
    synthetic: bool
    class_names: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Split:
    """One split in memory: uint8 images [N, H, W, C] (C-contiguous) and int32 labels [N]."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(
                f"images must be uint8 [N, H, W, C], got {self.images.dtype} {self.images.shape}"
            )
        if self.labels.dtype != np.int32 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(
                f"labels must be int32 [{self.images.shape[0]}], "
                f"got {self.labels.dtype} {self.labels.shape}"
            )

    @property
    def num_examples(self) -> int:
        return int(self.labels.shape[0])


class DataNotFoundError(RuntimeError):
    """The dataset is not prepared in the data_dir, and this code will not download it."""


# ----------------------------------------------------------------------------------------
# Public entry points.


def dataset_info(name: str, data_dir: str | None = None) -> DatasetInfo:
    """Returns the dataset's classes and image shape without decoding any example.

    Raises ValueError for an unknown name or a dataset without image/label features, and
    DataNotFoundError when a TFDS dataset is not prepared in `data_dir`.
    """
    if name == SYNTHETIC:
        return SYNTHETIC_INFO
    builder = _prepared_builder(name, data_dir)
    features = builder.info.features
    return DatasetInfo(
        name=name,
        num_classes=int(features["label"].num_classes),
        image_shape=tuple(int(d) for d in features["image"].shape),
        synthetic=False,
        class_names=tuple(features["label"].names),
    )


def load_split(name: str, split: SplitSpec, *, data_dir: str | None = None, seed: int = 0) -> Split:
    """Returns decoded read-only arrays for a TFDS split spec ('train', 'test[:10%]', ...).

    Cached per process: the same arguments return the same `Split` object, loaded once.
    `seed` only affects the synthetic dataset; `data_dir=None` uses TFDS's default
    resolution (the `TFDS_DATA_DIR` environment variable, else ~/tensorflow_datasets).
    """
    if name == SYNTHETIC:
        seed = _check_seed(seed)
        return _cached((SYNTHETIC, split, seed), lambda: synthetic_split(split, seed))
    builder = _prepared_builder(name, data_dir)
    return _cached((name, split, os.fspath(builder.data_dir)), lambda: _read_tfds_split(builder, split))


def process_split(split: str, process_index: int, process_count: int) -> SplitSpec:
    """Returns this process's contiguous, equally sized share of `split` (remainder dropped).

    Wraps `tfds.split_for_jax_process(..., drop_remainder=True)`; the result is accepted by
    `load_split`. NOT topology-invariant: which examples a process holds (and so the data
    order seen in training) depends on `process_count`. The default elsewhere is for every
    host to load the full split.
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"need 0 <= process_index < process_count, got {process_index}, {process_count}")
    if process_count == 1:
        return split
    return tfds.split_for_jax_process(
        split, process_index=process_index, process_count=process_count, drop_remainder=True
    )


def clear_cache() -> None:
    """Forgets every cached split (for tests, or to free host memory)."""
    with _CACHE_LOCK:
        _CACHE.clear()


# ----------------------------------------------------------------------------------------
# Per-process cache.

_CACHE: dict[Hashable, Split] = {}
# Held while loading so concurrent callers of the same split wait and share one load.
_CACHE_LOCK = threading.Lock()


def _cached(key: Hashable, load: Callable[[], Split]) -> Split:
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = load()
        return _CACHE[key]


def _read_only_split(images: np.ndarray, labels: np.ndarray) -> Split:
    """Wraps arrays as a Split whose arrays callers cannot modify (they are shared via the cache)."""
    images = np.ascontiguousarray(images, dtype=np.uint8)
    labels = np.ascontiguousarray(labels, dtype=np.int32)
    images.flags.writeable = False
    labels.flags.writeable = False
    return Split(images=images, labels=labels)


# ----------------------------------------------------------------------------------------
# TFDS datasets.


def _resolved_data_dir(data_dir: str | os.PathLike[str] | None) -> str | None:
    """Absolute local path (remote URLs such as gs://... unchanged); None keeps TFDS's default."""
    if data_dir is None:
        return None
    data_dir = os.fspath(data_dir)
    if "://" in data_dir:
        return data_dir
    return os.path.abspath(os.path.expanduser(data_dir))


def _prepared_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
    """Returns the TFDS builder for `name`, checked to be an image/label set prepared on disk."""
    try:
        builder = tfds.builder(name, data_dir=_resolved_data_dir(data_dir))
    except tfds.core.DatasetNotFoundError:
        raise ValueError(
            f"Unknown dataset {name!r}: it is neither {SYNTHETIC!r} nor a registered "
            f"tensorflow-datasets name. Try one of: {', '.join(SUGGESTED_DATASETS)}."
        ) from None
    _check_image_label_features(name, builder.info.features)
    # Checked before any read: an unprepared builder would otherwise reach TFDS's download
    # path, which retries an unreachable host for minutes on an offline machine.
    if not builder.is_prepared():
        raise DataNotFoundError(_not_prepared_message(name, builder))
    return builder


def _check_image_label_features(name: str, features: tfds.features.FeaturesDict) -> None:
    """Raises ValueError unless `features` has a fixed-shape uint8 `image` and a ClassLabel `label`."""
    names = set(features.keys()) if isinstance(features, tfds.features.FeaturesDict) else set()
    image = features["image"] if "image" in names else None
    label = features["label"] if "label" in names else None
    if not isinstance(image, tfds.features.Image) or not isinstance(label, tfds.features.ClassLabel):
        raise ValueError(
            f"Dataset {name!r} is not an image-classification set: it needs an 'image' (Image) and a "
            f"'label' (ClassLabel) feature, and has {features}."
        )
    shape = tuple(image.shape)
    if len(shape) != 3 or any(d is None for d in shape) or np.dtype(image.np_dtype) != np.uint8:
        raise ValueError(
            f"Dataset {name!r} has images of shape {shape} and dtype {image.np_dtype}; "
            "only fixed-size uint8 [H, W, C] images are supported."
        )


def _not_prepared_message(name: str, builder: tfds.core.DatasetBuilder) -> str:
    root = os.fspath(builder.data_dir_root)
    dataset_folder = os.path.dirname(os.fspath(builder.data_dir))
    found = sorted(os.listdir(dataset_folder)) if os.path.isdir(dataset_folder) else []
    found_note = f" (found other versions: {found})" if found else ""
    return (
        f"Dataset {name!r} is not prepared in the TFDS data_dir {root!r}: no "
        f"{os.fspath(builder.data_dir)!r}{found_note}. It will not be downloaded from here.\n"
        "To get it: on a machine with internet run\n"
        f"    tfds build {name} --data_dir={root}\n"
        "  or\n"
        f"    python -c \"import tensorflow_datasets as tfds; tfds.load('{name}', data_dir='{root}')\"\n"
        "then copy that data_dir to this machine, and point at it with --data_dir or the "
        "TFDS_DATA_DIR environment variable. For an offline smoke test, use the "
        f"{SYNTHETIC!r} dataset."
    )


def _read_tfds_split(builder: tfds.core.DatasetBuilder, split: SplitSpec) -> Split:
    """Decodes a whole split of a prepared TFDS dataset into memory."""
    start = time.perf_counter()
    if builder.info.file_format in tfds.core.FileFormat.with_tf_data():
        images, labels = _read_with_tf_data(builder, split)
    else:  # array_record: random-access only, no tf.data reader in TFDS.
        images, labels = _read_with_data_source(builder, split)
    result = _read_only_split(images, labels)
    logging.info(
        "Loaded %s %s from %s: %d examples in %.1f s.",
        builder.name, split, builder.data_dir, result.num_examples, time.perf_counter() - start,
    )
    return result


def _read_with_tf_data(builder: tfds.core.DatasetBuilder, split: SplitSpec) -> tuple[np.ndarray, np.ndarray]:
    """Reads tfrecord data as one batch: parallel tf.data decoding is the fastest path measured."""
    dataset = builder.as_dataset(
        split=split,
        shuffle_files=False,
        decoders=tfds.decode.PartialDecoding({"image": True, "label": True}),  # skip e.g. 'id'
        # We keep the arrays ourselves; a tf.data cache would hold a second copy.
        read_config=tfds.ReadConfig(try_autocache=False),
    )
    # One batch holding the whole split (what `batch_size=-1` does, minus its prefetch/cache).
    (batch,) = tfds.as_numpy(dataset.batch(2**31 - 1))
    return batch["image"], batch["label"]


def _read_with_data_source(builder: tfds.core.DatasetBuilder, split: SplitSpec) -> tuple[np.ndarray, np.ndarray]:
    """Reads array_record data through TFDS's random-access data source (no partial decoding there)."""
    source = builder.as_data_source(split=split)
    examples = source.__getitems__(range(len(source)))
    return np.stack([e["image"] for e in examples]), np.array([e["label"] for e in examples])


# ----------------------------------------------------------------------------------------
# Synthetic dataset.
#
# Each class has a smooth random colour template. An example is its class template,
# randomly shifted (up to +-_SHIFT pixels) and mirrored, scaled by a random contrast, plus
# one of a bank of smooth class-independent "background" fields, a random per-channel
# brightness and uniform pixel noise. Shifts and mirroring make it hard for a linear model
# (60-70% test accuracy from 5000 examples, chance is 10%) and easy for a small CNN.
#
# Examples are generated in blocks of _BLOCK_SIZE, each from its own random stream keyed by
# (seed, split, block index), so every example is a pure function of (seed, split, index)
# and a slice only generates the blocks it touches.

SYNTHETIC_NUM_CLASSES = 10
SYNTHETIC_IMAGE_SHAPE = (32, 32, 3)
SYNTHETIC_SPLIT_SIZES = {"train": 50_000, "test": 10_000}  # as CIFAR-10
SYNTHETIC_INFO = DatasetInfo(
    name=SYNTHETIC,
    num_classes=SYNTHETIC_NUM_CLASSES,
    image_shape=SYNTHETIC_IMAGE_SHAPE,
    synthetic=True,
    class_names=tuple(f"synthetic_{i}" for i in range(SYNTHETIC_NUM_CLASSES)),
)

_BLOCK_SIZE = 1000  # divides both split sizes; each block is exactly class-balanced
_SPLIT_STREAM_IDS = {"train": 0, "test": 1}  # random-stream keys; never reorder
_TABLES_STREAM_ID = 7  # key of the stream for templates and backgrounds (shared by splits)
_SHIFT = 5  # max translation in pixels
_TEMPLATE_GRID = 8  # control points per side of a class template (higher: finer detail)
_TEMPLATE_STD = 22.5
_NUM_BACKGROUNDS = 256
_BACKGROUND_STD = 30.0
_NOISE_STD = 30.0


def _synthetic_ranges(split: SplitSpec) -> list[tuple[str, int, int]]:
    """``[(split_name, begin, end)]`` for a split spec, resolved as tfds resolves it.

    Plain names and in-range integer slices ('train', 'test[:512]', 'train[100:200]') are
    resolved here; anything else ('train[:10%]', 'train+test', ...) by tfds's own parser,
    which costs a 0.2 s import (and is needed: without tensorflow-datasets only the simple
    forms work).
    """
    match = re.fullmatch(r"(train|test)(?:\[(-?\d*):(-?\d*)\])?", str(split))
    if match:
        name, lo, hi = match.groups()
        size = SYNTHETIC_SPLIT_SIZES[name]
        if all(abs(int(bound)) <= size for bound in (lo, hi) if bound):  # tfds rejects the others
            begin, end, _ = slice(int(lo) if lo else None, int(hi) if hi else None).indices(size)
            return [(name, begin, max(begin, end))]
    return _synthetic_ranges_by_tfds(split)


def _synthetic_ranges_by_tfds(split: SplitSpec) -> list[tuple[str, int, int]]:
    try:
        core = importlib.import_module("tensorflow_datasets.core")
    except ImportError:
        raise ValueError(
            f"split {split!r}: without tensorflow-datasets installed only 'train'/'test' with in-range "
            "integer slices like 'train[:512]' are understood."
        ) from None
    split_infos = core.SplitDict(
        [core.SplitInfo(name=n, shard_lengths=[size], num_bytes=0) for n, size in SYNTHETIC_SPLIT_SIZES.items()]
    )
    ranges = []
    for instruction in core.ReadInstruction.from_spec(split).to_absolute(split_infos):
        begin = instruction.from_ or 0
        end = SYNTHETIC_SPLIT_SIZES[instruction.splitname] if instruction.to is None else instruction.to
        ranges.append((instruction.splitname, begin, max(begin, end)))
    return ranges


def synthetic_split(split: SplitSpec, seed: int = 0) -> Split:
    """Generates (uncached) the synthetic examples that `split` selects, as read-only arrays.

    Split strings follow TFDS semantics exactly ('train[100:200]', 'test[:10%]',
    'train+test', ...), since TFDS's own parser resolves them.
    """
    seed = _check_seed(seed)
    ranges = _synthetic_ranges(split)

    total = sum(end - begin for _, begin, end in ranges)
    images = np.empty((total, *SYNTHETIC_IMAGE_SHAPE), np.uint8)
    labels = np.empty((total,), np.int32)
    templates, backgrounds = _synthetic_tables(seed)
    offset = 0
    for split_name, begin, end in ranges:
        for block in range(begin // _BLOCK_SIZE, -(-end // _BLOCK_SIZE)):
            block_images, block_labels = _synthetic_block(seed, split_name, block, templates, backgrounds)
            lo = max(begin, block * _BLOCK_SIZE) - block * _BLOCK_SIZE
            hi = min(end, (block + 1) * _BLOCK_SIZE) - block * _BLOCK_SIZE
            images[offset : offset + hi - lo] = block_images[lo:hi]
            labels[offset : offset + hi - lo] = block_labels[lo:hi]
            offset += hi - lo
    return _read_only_split(images, labels)


def _check_seed(seed: int) -> int:
    seed = operator.index(seed)
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    return seed


def _smooth_fields(rng: np.random.Generator, count: int, size: int, grid: int) -> np.ndarray:
    """Returns `count` random colour fields [size, size, 3], bilinear upsampled from grid x grid, unit std."""
    positions = np.linspace(0, grid - 1, size)
    lower = np.minimum(np.floor(positions).astype(int), grid - 2)
    upsample = np.zeros((size, grid), np.float32)  # bilinear interpolation matrix
    upsample[np.arange(size), lower] = 1 - (positions - lower)
    upsample[np.arange(size), lower + 1] = positions - lower
    control_points = rng.standard_normal((count, grid, grid, 3), dtype=np.float32)
    # optimize=True contracts one axis at a time (two small matmuls): 50x faster than the
    # naive four-operand loop, which cost 0.25 s of every run's start-up.
    fields = np.einsum("hi,nijc,wj->nhwc", upsample, control_points, upsample, optimize=True)
    return fields / fields.std(axis=(1, 2, 3), keepdims=True)


@functools.lru_cache(maxsize=8)
def _synthetic_tables(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-seed class templates [classes, 32 + 2*shift, ...] and background fields [n, 32, 32, 3]."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, _TABLES_STREAM_ID]))
    height = SYNTHETIC_IMAGE_SHAPE[0]
    templates = _smooth_fields(rng, SYNTHETIC_NUM_CLASSES, height + 2 * _SHIFT, _TEMPLATE_GRID) * _TEMPLATE_STD
    backgrounds = _smooth_fields(rng, _NUM_BACKGROUNDS, height, _TEMPLATE_GRID) * _BACKGROUND_STD
    templates.flags.writeable = False
    backgrounds.flags.writeable = False
    return templates, backgrounds


def _synthetic_block(
    seed: int, split_name: str, block: int, templates: np.ndarray, backgrounds: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Generates examples [block * _BLOCK_SIZE, (block + 1) * _BLOCK_SIZE) of a split."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_STREAM_IDS[split_name], block]))
    n, size = _BLOCK_SIZE, SYNTHETIC_IMAGE_SHAPE[0]
    labels = rng.permutation(np.arange(n) % SYNTHETIC_NUM_CLASSES).astype(np.int32)
    # Crop a shifted, possibly mirrored window of each example's class template.
    pixel = np.arange(size)
    rows = rng.integers(0, 2 * _SHIFT + 1, n)[:, None] + pixel
    mirrored = rng.integers(0, 2, n).astype(bool)[:, None]
    cols = rng.integers(0, 2 * _SHIFT + 1, n)[:, None] + np.where(mirrored, pixel[::-1], pixel)
    images = templates[labels[:, None, None], rows[:, :, None], cols[:, None, :]]
    images *= rng.uniform(0.6, 1.4, (n, 1, 1, 1)).astype(np.float32)  # contrast
    images += backgrounds[rng.integers(0, len(backgrounds), n)]
    images += rng.normal(128.0, 20.0, (n, 1, 1, 3)).astype(np.float32)  # brightness per channel
    # Uniform noise from random bytes: several times cheaper than Gaussian noise.
    noise = rng.integers(0, 256, images.shape, dtype=np.uint8).astype(np.float32)
    noise -= 127.5
    noise *= _NOISE_STD / 73.9  # 73.9: std of uniform random bytes
    images += noise
    np.clip(images, 0, 255, out=images)
    return images.astype(np.uint8), labels
