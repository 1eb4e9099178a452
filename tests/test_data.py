"""Tests for softsig.data: the synthetic set, TFDS loading (under tfds.testing.mock_data and,
when prepared on this machine, on real CIFAR-10), the offline errors, and the cache."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from hypothesis import given, settings
from hypothesis import strategies as st

from softsig import data

# ----------------------------------------------------------------------------------------
# Synthetic data.


@pytest.fixture(scope="module")
def synthetic_full() -> dict[str, data.Split]:
    """Both full synthetic splits (seed 0), generated once for the module via the cache."""
    return {name: data.load_split(data.SYNTHETIC, name) for name in ("train", "test")}


def test_synthetic_info():
    info = data.dataset_info(data.SYNTHETIC)
    assert info == data.DatasetInfo(
        name="synthetic",
        num_classes=10,
        image_shape=(32, 32, 3),
        synthetic=True,
        class_names=tuple(f"synthetic_{i}" for i in range(10)),
    )


@pytest.mark.parametrize("split_name, size", [("train", 50_000), ("test", 10_000)])
def test_synthetic_shapes_and_dtypes(synthetic_full, split_name, size):
    split = synthetic_full[split_name]
    assert split.num_examples == size
    assert split.images.shape == (size, 32, 32, 3)
    assert split.images.dtype == np.uint8 and split.images.flags.c_contiguous
    assert split.labels.shape == (size,) and split.labels.dtype == np.int32
    assert not split.images.flags.writeable and not split.labels.flags.writeable
    # Uses the byte range without saturating: not constant, not clipped noise.
    sample = split.images[:2000]
    assert 20 < sample.std() < 90
    assert np.mean((sample == 0) | (sample == 255)) < 0.05


def test_synthetic_labels_in_range_and_balanced(synthetic_full):
    for split in synthetic_full.values():
        assert split.labels.min() >= 0 and split.labels.max() < 10
        counts = np.bincount(split.labels, minlength=10)
        assert (counts == split.num_examples // 10).all()  # each block of 1000 is exactly balanced
    prefix_counts = np.bincount(synthetic_full["train"].labels[:500], minlength=10)
    assert prefix_counts.min() >= 25 and prefix_counts.max() <= 75  # shuffled, not sorted by class


def test_synthetic_is_deterministic_per_seed(synthetic_full):
    again = data.synthetic_split("train[:1500]", seed=0)  # uncached: generated afresh
    assert again.images.tobytes() == synthetic_full["train"].images[:1500].tobytes()
    assert np.array_equal(again.labels, synthetic_full["train"].labels[:1500])
    other_seed = data.synthetic_split("train[:1500]", seed=1)
    assert not np.array_equal(other_seed.images, again.images)
    assert not np.array_equal(other_seed.labels, again.labels)


def test_synthetic_train_and_test_differ(synthetic_full):
    assert not np.array_equal(synthetic_full["train"].images[:1000], synthetic_full["test"].images[:1000])


@pytest.mark.parametrize(
    "spec, parts",
    [
        ("train[100:200]", [("train", 100, 200)]),
        ("test[:10%]", [("test", 0, 1000)]),
        ("train[-5%:]", [("train", 47_500, 50_000)]),
        ("train[999:1001]+test[-3:]", [("train", 999, 1001), ("test", 9_997, 10_000)]),
    ],
)
def test_synthetic_slices_match_full_split(synthetic_full, spec, parts):
    sliced = data.synthetic_split(spec)
    expected_images = np.concatenate([synthetic_full[name].images[lo:hi] for name, lo, hi in parts])
    expected_labels = np.concatenate([synthetic_full[name].labels[lo:hi] for name, lo, hi in parts])
    assert np.array_equal(sliced.images, expected_images)
    assert np.array_equal(sliced.labels, expected_labels)


@settings(max_examples=15, deadline=None)
@given(start=st.integers(0, 49_000), length=st.integers(0, 2500))
def test_synthetic_any_slice_matches_full_split(synthetic_full, start, length):
    stop = min(start + length, 50_000)
    sliced = data.synthetic_split(f"train[{start}:{stop}]")
    assert np.array_equal(sliced.images, synthetic_full["train"].images[start:stop])
    assert np.array_equal(sliced.labels, synthetic_full["train"].labels[start:stop])


def test_synthetic_is_learnable_by_linear_model_but_not_trivially():
    train = data.synthetic_split("train[:5000]")
    test = data.synthetic_split("test[:1000]")
    features = train.images.reshape(5000, -1).astype(np.float32) / 255.0
    mean = features.mean(axis=0)
    design = np.c_[features - mean, np.ones(5000, np.float32)]
    targets = np.eye(10, dtype=np.float32)[train.labels]
    # Ridge regression onto one-hot targets: a least-squares linear classifier.
    weights = np.linalg.solve(design.T @ design + 10.0 * np.eye(design.shape[1], dtype=np.float32), design.T @ targets)
    test_design = np.c_[test.images.reshape(1000, -1).astype(np.float32) / 255.0 - mean, np.ones(1000, np.float32)]
    accuracy = np.mean((test_design @ weights).argmax(axis=1) == test.labels)
    assert 0.3 < accuracy < 0.95, accuracy  # chance is 0.1; shifts and mirroring keep it well below 1


def test_synthetic_rejects_bad_seed_and_split():
    with pytest.raises(ValueError, match="seed"):
        data.synthetic_split("train", seed=-1)
    with pytest.raises(ValueError, match="validation"):
        data.synthetic_split("validation")


def test_process_split_gives_disjoint_equal_shares(synthetic_full):
    assert data.process_split("train", 0, 1) == "train"
    shares = [data.load_split(data.SYNTHETIC, data.process_split("train[:1001]", i, 2)) for i in range(2)]
    assert [share.num_examples for share in shares] == [500, 500]  # remainder dropped
    together = np.concatenate([share.labels for share in shares])
    assert np.array_equal(together, synthetic_full["train"].labels[:1000])
    with pytest.raises(ValueError):
        data.process_split("train", 2, 2)


# ----------------------------------------------------------------------------------------
# TFDS datasets under tfds.testing.mock_data.
#
# How the mock interacts with the real code path (tfds 4.9.10): `mock_data` patches
# `DatasetBuilder.__init__` to ignore the caller's data_dir and use its own: by default
# `tensorflow_datasets/testing/metadata`, which the pip package does not ship. So
# `builder.is_prepared()` (which `softsig.data` checks before reading, to never reach the
# download path) is False and loading raises DataNotFoundError. Writing the dataset's
# metadata files (dataset_info.json, features.json) into a temporary data_dir and passing
# it as `mock_data(data_dir=...)` makes the builder "prepared"; `as_dataset` then returns
# `num_examples` random examples for ANY split string: the mock ignores slicing. The test
# of slicing passes its own `as_dataset_fn` that honours the split sizes written in the
# metadata.


def _write_metadata(
    root: pathlib.Path, name: str, split_sizes: dict[str, int], file_format: str = "tfrecord"
) -> None:
    """Writes the metadata files that make `tfds.builder(name)` count as prepared under mock_data."""
    builder = tfds.builder(name, data_dir=os.fspath(root))
    builder.info.set_splits(
        tfds.core.SplitDict(
            [tfds.core.SplitInfo(name=split, shard_lengths=[size], num_bytes=0) for split, size in split_sizes.items()]
        )
    )
    builder.info.set_file_format(file_format, override=True)
    os.makedirs(builder.data_dir)
    builder.info.write_to_directory(builder.data_dir)


def _num_selected(builder: tfds.core.DatasetBuilder, split: str) -> int:
    """How many examples `split` selects, from the split sizes in the builder's metadata."""
    size = 0
    for instruction in tfds.core.ReadInstruction.from_spec(split).to_absolute(builder.info.splits):
        end = builder.info.splits[instruction.splitname].num_examples if instruction.to is None else instruction.to
        size += end - (instruction.from_ or 0)
    return size


def _fake_as_dataset_honouring_slices(self, split, decoders=None, read_config=None, **kwargs):
    """Replaces the builder's tfrecord reader: as many fake image/label examples as `split` selects."""
    import tensorflow as tf  # tfds already needs it to build datasets

    del decoders, read_config, kwargs
    image_shape = self.info.features["image"].shape
    num_classes = self.info.features["label"].num_classes
    return tf.data.Dataset.range(_num_selected(self, split)).map(
        lambda i: {"image": tf.fill(image_shape, tf.cast(i % 256, tf.uint8)), "label": i % num_classes}
    )


class _FakeDataSource:
    """Stands in for the random-access source that `builder.as_data_source` gives for array_record.

    (mock_data's own data-source mock cannot serve `__getitems__` in tfds 4.9.10: it sets a
    partial that lacks `self` on a MagicMock, so batched reads raise TypeError.)
    """

    def __init__(self, size: int, image_shape: tuple[int, ...], num_classes: int):
        self._size, self._image_shape, self._num_classes = size, image_shape, num_classes

    def __len__(self) -> int:
        return self._size

    def __getitems__(self, keys) -> list[dict[str, np.ndarray]]:
        return [
            {"image": np.full(self._image_shape, key % 256, np.uint8), "label": np.int64(key % self._num_classes)}
            for key in keys
        ]


def _fake_as_data_source(self, split, **kwargs):
    del kwargs
    features = self.info.features
    return _FakeDataSource(_num_selected(self, split), features["image"].shape, features["label"].num_classes)


@pytest.mark.parametrize(
    "name, image_shape, num_classes",
    [
        ("cifar10", (32, 32, 3), 10),
        ("cifar100", (32, 32, 3), 100),
        ("mnist", (28, 28, 1), 10),
        ("fashion_mnist", (28, 28, 1), 10),
        ("svhn_cropped", (32, 32, 3), 10),
    ],
)
def test_tfds_shapes_dtypes_and_labels_under_mock(tmp_path, name, image_shape, num_classes):
    _write_metadata(tmp_path, name, {"train": 100, "test": 20})
    with tfds.testing.mock_data(num_examples=24, data_dir=os.fspath(tmp_path)):
        info = data.dataset_info(name, data_dir=os.fspath(tmp_path))
        split = data.load_split(name, "train", data_dir=os.fspath(tmp_path))
    assert info == data.DatasetInfo(
        name=name,
        num_classes=num_classes,
        image_shape=image_shape,
        synthetic=False,
        class_names=info.class_names,
    )
    # Class names come from the metadata; for cifar10/100 they are only known after a real
    # download, so here they are '0', '1', ... (the real-data test checks 'airplane').
    assert len(info.class_names) == num_classes
    assert split.images.shape == (24, *image_shape)
    assert split.images.dtype == np.uint8 and split.images.flags.c_contiguous
    assert split.labels.shape == (24,) and split.labels.dtype == np.int32
    assert split.labels.min() >= 0 and split.labels.max() < num_classes
    assert not split.images.flags.writeable and not split.labels.flags.writeable


@pytest.mark.parametrize(
    "spec, size",
    [("train", 200), ("train[:10%]", 20), ("test[10:20]", 10), ("train[-25%:]", 50), ("train+test", 250)],
)
def test_tfds_split_slicing_under_mock(tmp_path, spec, size):
    _write_metadata(tmp_path, "cifar10", {"train": 200, "test": 50})
    with tfds.testing.mock_data(data_dir=os.fspath(tmp_path), as_dataset_fn=_fake_as_dataset_honouring_slices):
        split = data.load_split("cifar10", spec, data_dir=os.fspath(tmp_path))
    assert split.images.shape == (size, 32, 32, 3)
    assert split.labels.shape == (size,)


def test_array_record_data_is_read_through_data_source_under_mock(tmp_path):
    _write_metadata(tmp_path, "mnist", {"train": 300, "test": 50}, file_format="array_record")
    with tfds.testing.mock_data(data_dir=os.fspath(tmp_path), as_data_source_fn=_fake_as_data_source):
        split = data.load_split("mnist", "train[:10%]", data_dir=os.fspath(tmp_path))
    assert split.images.shape == (30, 28, 28, 1) and split.images.dtype == np.uint8
    assert np.array_equal(split.labels, np.arange(30, dtype=np.int32) % 10)
    assert np.array_equal(split.images[:, 0, 0, 0], np.arange(30))
    assert not split.images.flags.writeable


def test_mock_without_metadata_counts_as_not_prepared():
    """Documents the mock behaviour described above (tfds 4.9.10)."""
    with tfds.testing.mock_data(num_examples=4):
        with pytest.raises(data.DataNotFoundError, match="cifar10"):
            data.load_split("cifar10", "train")


def test_tfds_load_is_cached_under_mock(tmp_path):
    _write_metadata(tmp_path, "cifar10", {"train": 100, "test": 20})
    with tfds.testing.mock_data(num_examples=8, data_dir=os.fspath(tmp_path)):
        first = data.load_split("cifar10", "test", data_dir=os.fspath(tmp_path))
        assert data.load_split("cifar10", "test", data_dir=os.fspath(tmp_path)) is first
        assert data.load_split("cifar10", "test", data_dir=os.fspath(tmp_path), seed=3) is first  # seed: synthetic only


# ----------------------------------------------------------------------------------------
# Missing data and bad names.


def test_missing_dataset_fails_with_instructions(tmp_path):
    with pytest.raises(data.DataNotFoundError) as error:
        data.load_split("cifar10", "train", data_dir=os.fspath(tmp_path))
    message = str(error.value)
    assert "cifar10" in message
    assert os.fspath(tmp_path) in message
    assert "tfds build cifar10" in message
    assert "TFDS_DATA_DIR" in message
    with pytest.raises(data.DataNotFoundError):
        data.dataset_info("cifar10", data_dir=os.fspath(tmp_path))


def test_missing_dataset_message_resolves_relative_data_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(data.DataNotFoundError, match=str(tmp_path / "relative_dir")):
        data.dataset_info("mnist", data_dir="relative_dir")


def test_default_data_dir_honours_tfds_data_dir_env(tmp_path):
    # TFDS reads TFDS_DATA_DIR once, at import, so this needs a fresh interpreter.
    script = (
        "from softsig import data\n"
        "try:\n"
        "    data.dataset_info('cifar10')\n"
        "except data.DataNotFoundError as error:\n"
        "    print(error)\n"
    )
    env = dict(os.environ, TFDS_DATA_DIR=os.fspath(tmp_path), JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"data_dir {os.fspath(tmp_path)!r}" in result.stdout


def test_unknown_dataset_name_lists_suggestions():
    with pytest.raises(ValueError, match="synthetic") as error:
        data.load_split("no_such_dataset_xyz", "train")
    assert "no_such_dataset_xyz" in str(error.value) and "cifar10" in str(error.value)
    assert not isinstance(error.value, data.DataNotFoundError)


def test_dataset_without_image_label_features_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="image"):
        data.dataset_info("imdb_reviews", data_dir=os.fspath(tmp_path))


# ----------------------------------------------------------------------------------------
# Cache.


def test_load_split_caches_identical_object():
    first = data.load_split(data.SYNTHETIC, "test[:20]")
    assert data.load_split(data.SYNTHETIC, "test[:20]") is first
    assert data.load_split(data.SYNTHETIC, "test[:20]", seed=1) is not first
    with pytest.raises(ValueError):
        first.images[0, 0, 0, 0] = 1  # read-only: callers cannot corrupt the cache


def test_clear_cache_forgets_splits():
    first = data.load_split(data.SYNTHETIC, "test[:20]")
    data.clear_cache()
    again = data.load_split(data.SYNTHETIC, "test[:20]")
    assert again is not first and np.array_equal(again.images, first.images)


# ----------------------------------------------------------------------------------------
# Real CIFAR-10, when prepared on this machine.


def _prepared_cifar10_dir() -> str | None:
    candidates = (
        os.environ.get("SOFTSIG_CIFAR10_DATA_DIR"),
        os.environ.get("TFDS_DATA_DIR"),
        os.path.expanduser("~/tensorflow_datasets"),
    )
    for candidate in candidates:
        if candidate and tfds.builder("cifar10", data_dir=candidate).is_prepared():
            return candidate
    return None


@pytest.fixture(scope="module")
def cifar10_dir() -> str:
    found = _prepared_cifar10_dir()
    if found is None:
        pytest.skip(
            "no prepared CIFAR-10 in $SOFTSIG_CIFAR10_DATA_DIR, $TFDS_DATA_DIR or ~/tensorflow_datasets"
        )
    return found


def test_real_cifar10_splits(cifar10_dir):
    info = data.dataset_info("cifar10", data_dir=cifar10_dir)
    assert info.num_classes == 10 and info.image_shape == (32, 32, 3) and not info.synthetic
    assert info.class_names[:2] == ("airplane", "automobile")
    for split_name, size in (("train", 50_000), ("test", 10_000)):
        split = data.load_split("cifar10", split_name, data_dir=cifar10_dir)
        assert split.images.shape == (size, 32, 32, 3) and split.images.dtype == np.uint8
        assert split.labels.shape == (size,) and split.labels.dtype == np.int32
        assert (np.bincount(split.labels, minlength=10) == size // 10).all()
        assert split.images[:1000].std() > 30  # decoded pixels, not zeros
        assert data.load_split("cifar10", split_name, data_dir=cifar10_dir) is split


def test_real_cifar10_slices_match_full_split(cifar10_dir):
    full_test = data.load_split("cifar10", "test", data_dir=cifar10_dir)
    first_tenth = data.load_split("cifar10", "test[:10%]", data_dir=cifar10_dir)
    middle = data.load_split("cifar10", "test[10:20]", data_dir=cifar10_dir)
    assert first_tenth.num_examples == 1000 and middle.num_examples == 10
    assert np.array_equal(first_tenth.images, full_test.images[:1000])
    assert np.array_equal(middle.labels, full_test.labels[10:20])


def test_synthetic_split_fast_parsing_matches_tfds(monkeypatch):
    """Simple specs are resolved without importing tfds (0.2 s), exactly as tfds resolves them;
    on a node with only jax installed they still work, and the others fail clearly."""
    import importlib

    from softsig import data as data_module

    specs = ["train", "test", "train[:512]", "train[100:200]", "test[-100:]", "test[10:5]", "train[:0]",
             "train[50000:]", "train[-50000:]", "test[0:-1]", "train[-0:]"]
    by_tfds = [data_module._synthetic_ranges_by_tfds(spec) for spec in specs]
    real_import = importlib.import_module

    def no_tfds(name, *args, **kwargs):
        if name.startswith("tensorflow_datasets"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(data_module.importlib, "import_module", no_tfds)
    assert [data_module._synthetic_ranges(spec) for spec in specs] == by_tfds
    for needs_tfds in ["train[:10%]", "train+test", "train[:60000]"]:
        with pytest.raises(ValueError, match="without tensorflow-datasets"):
            data_module._synthetic_ranges(needs_tfds)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="incompatible with 50000 examples"):  # tfds's own error
        data_module._synthetic_ranges("train[:60000]")
