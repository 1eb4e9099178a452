"""Device-resident epochs: the whole dataset lives on every device; batches are made there.

CIFAR-10 is 180 MB of uint8, so each device holds a full copy and nothing crosses from
host to device after the first load. Per epoch a permutation is drawn from the run's
key and the epoch number; step ``s`` of the epoch uses global examples
``perm[s*B:(s+1)*B]`` and each device gathers its slice ``[d*b:(d+1)*b]`` of that
global batch by index. The epoch order and every global batch are therefore a function
of (seed, epoch) alone: 1 device, 8 devices or 2 hosts see the same batches.
Augmentation keys are per *global* example position, so they are topology-invariant too.

Training runs ``num_steps`` steps per dispatch in one ``lax.scan`` and returns stacked
per-step metrics; evaluation of a whole (padded, masked) split is one compiled call.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from softsig import train
from softsig.losses import Loss
from softsig.parallel import BROADCAST, REPLICATED, DataParallel


class DeviceDataset(NamedTuple):
    """A split on the devices (placed ``REPLICATED``); ``mask`` is False on padding rows."""

    images: jax.Array  # uint8 [N, H, W, C]
    labels: jax.Array  # int32 [N]
    mask: jax.Array  # bool [N]


class Normalization(NamedTuple):
    """Per-channel statistics of the training split, in [0, 1] pixel units."""

    mean: np.ndarray  # float32 [C]
    std: np.ndarray  # float32 [C]


def normalization_from(images_NHWC: np.ndarray) -> Normalization:
    """Per-channel mean and std of uint8 images (computed on the host once)."""
    pixels = images_NHWC.reshape(-1, images_NHWC.shape[-1])
    mean = np.zeros(pixels.shape[-1], np.float64)
    sq = np.zeros(pixels.shape[-1], np.float64)
    for start in range(0, len(pixels), 1 << 22):  # chunks keep float64 temporaries small
        chunk = pixels[start : start + (1 << 22)].astype(np.float64) / 255.0
        mean += chunk.sum(0)
        sq += np.square(chunk).sum(0)
    mean /= len(pixels)
    std = np.sqrt(np.maximum(sq / len(pixels) - mean**2, 1e-12))
    return Normalization(mean.astype(np.float32), std.astype(np.float32))


def pad_to_multiple(images: np.ndarray, labels: np.ndarray, multiple: int) -> tuple[np.ndarray, ...]:
    """Pads with zero images and a False mask so the count divides by ``multiple``."""
    count = len(labels)
    padded = -(-count // multiple) * multiple
    mask = np.zeros(padded, bool)
    mask[:count] = True
    if padded != count:
        images = np.concatenate([images, np.zeros((padded - count, *images.shape[1:]), images.dtype)])
        labels = np.concatenate([labels, np.zeros(padded - count, labels.dtype)])
    return images, labels.astype(np.int32), mask


def put_dataset(dp: DataParallel, images: np.ndarray, labels: np.ndarray, pad_multiple: int = 1) -> DeviceDataset:
    """A host split -> one full copy per device (the only host-to-device transfer of a run)."""
    return dp.put(DeviceDataset(*pad_to_multiple(images, labels, pad_multiple)), REPLICATED)


def normalize(images_uint8: jax.Array, norm: Normalization) -> jax.Array:
    return (images_uint8.astype(jnp.float32) / 255.0 - norm.mean) / norm.std


def augment(images_BHWC: jax.Array, keys_B: jax.Array, pad: int = 4) -> jax.Array:
    """Random crop from a zero-padded image (``pad`` pixels each side) and random horizontal flip."""

    def one(image, key):
        crop_key, flip_key = jax.random.split(key)
        height, width, channels = image.shape
        padded = jnp.pad(image, ((pad, pad), (pad, pad), (0, 0)))
        dy, dx = jax.random.randint(crop_key, (2,), 0, 2 * pad + 1)
        image = jax.lax.dynamic_slice(padded, (dy, dx, 0), (height, width, channels))
        return jnp.where(jax.random.bernoulli(flip_key), image[:, ::-1, :], image)

    return jax.vmap(one)(images_BHWC, keys_B)


def epoch_permutation(state_key: jax.Array, epoch: jax.Array, num_examples: int) -> jax.Array:
    return jax.random.permutation(train.stream_key(state_key, train.SHUFFLE_STREAM, epoch), num_examples)


def _device_index(axis_name: str | None) -> jax.Array:
    return jnp.int32(0) if axis_name is None else jax.lax.axis_index(axis_name)


def train_chunk_body(
    state: train.TrainState,
    data: DeviceDataset,
    epoch: jax.Array,
    first_step: jax.Array,
    *,
    num_steps: int,
    global_batch: int,
    local_batch: int,
    norm: Normalization,
    use_augment: bool,
    step_body: Callable,
    axis_name: str | None,
) -> tuple[train.TrainState, train.Metrics]:
    """``num_steps`` train steps of ``epoch`` from its step ``first_step``, batches gathered on device."""
    perm = epoch_permutation(state.key, epoch, data.labels.shape[0])
    offset = _device_index(axis_name) * local_batch

    def one_step(state, step_in_epoch):
        start = step_in_epoch * global_batch + offset
        index = jax.lax.dynamic_slice_in_dim(perm, start, local_batch)
        images = normalize(data.images[index], norm)
        if use_augment:
            step_key = train.stream_key(state.key, train.AUGMENT_STREAM, state.step)
            positions = offset + jnp.arange(local_batch)
            images = augment(images, jax.vmap(functools.partial(jax.random.fold_in, step_key))(positions))
        return step_body(state, {"images": images, "labels": data.labels[index]}, axis_name=axis_name)

    if num_steps == 1:  # no loop at all: XLA:CPU's slow path hits even a one-trip while loop
        state, metrics = one_step(state, first_step)
        return state, jax.tree.map(lambda x: x[None], metrics)
    return jax.lax.scan(one_step, state, first_step + jnp.arange(num_steps))


def eval_body(
    params,
    data: DeviceDataset,
    *,
    global_batch: int,
    local_batch: int,
    norm: Normalization,
    sums_body: Callable,
    axis_name: str | None,
) -> train.Metrics:
    """Loss/correct/count sums over the whole padded split; each example counted once."""
    num_batches = data.labels.shape[0] // global_batch
    offset = _device_index(axis_name) * local_batch

    def one_batch(totals, batch_index):
        start = batch_index * global_batch + offset
        take = functools.partial(jax.lax.dynamic_slice_in_dim, start_index=start, slice_size=local_batch)
        batch = {"images": normalize(take(data.images), norm), "labels": take(data.labels), "mask": take(data.mask)}
        sums = sums_body(params, batch, axis_name=None)
        return jax.tree.map(jnp.add, totals, sums), None

    example = {"images": normalize(data.images[:local_batch], norm), "labels": data.labels[:local_batch],
               "mask": data.mask[:local_batch]}
    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(functools.partial(sums_body, axis_name=None), params, example))
    totals, _ = jax.lax.scan(one_batch, zeros, jnp.arange(num_batches))
    return totals if axis_name is None else jax.lax.psum(totals, axis_name)


class Programs:
    """The compiled train-chunk and evaluation calls of one run, compiled once per shape."""

    def __init__(
        self,
        dp: DataParallel,
        graphdef: nnx.GraphDef,
        tx: optax.GradientTransformation,
        loss: Loss,
        *,
        global_batch: int,
        eval_batch: int,
        norm: Normalization,
        use_augment: bool = False,
        host_loop: bool | None = None,
        vmap_seeds: bool = False,
    ):
        self.dp = dp
        self.global_batch = global_batch
        self.eval_batch = eval_batch
        self._local_batch = dp.check_batch_size(global_batch, "batch_size")
        self._local_eval_batch = dp.check_batch_size(eval_batch, "eval_batch_size")
        self._norm = Normalization(*(np.asarray(x, np.float32) for x in norm))
        self._use_augment = use_augment
        # XLA:CPU runs convolution gradients inside a while loop ~50x slower than outside one
        # (jax#12868; measured in BUILD_NOTES.md), so on CPU a chunk is a host loop of one-step
        # calls on the device-resident data. Elsewhere it is one lax.scan.
        self.host_loop = jax.default_backend() == "cpu" if host_loop is None else host_loop
        self._step_body = functools.partial(train.train_step_body, graphdef=graphdef, tx=tx, loss=loss)
        self._sums_body = functools.partial(train.eval_sums_body, graphdef=graphdef, loss=loss)
        # With vmap_seeds the state has a leading seed axis: several independent runs (own
        # init, data order, augmentation) trained as one program over the shared device data.
        self.vmap_seeds = vmap_seeds
        self._chunks: dict[int, Callable] = {}
        self.trace_count = 0  # incremented at trace time: tests assert no recompiles
        eval_fn = functools.partial(self._traced(eval_body), **self._eval_kwargs())
        self._evaluate = dp.compile(self._over_seeds(eval_fn, 2), (REPLICATED, REPLICATED), REPLICATED)

    def _traced(self, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            self.trace_count += 1
            return fn(*args, **kwargs)

        return wrapper

    def _over_seeds(self, per_device_fn, num_args):
        """``per_device_fn`` vmapped over the seed axis of its first argument (the state/params)."""
        if not self.vmap_seeds:
            return per_device_fn

        def mapped(*args, axis_name):
            return jax.vmap(
                functools.partial(per_device_fn, axis_name=axis_name), in_axes=(0,) + (None,) * (num_args - 1)
            )(*args)

        return mapped

    def _eval_kwargs(self):
        return dict(
            global_batch=self.eval_batch, local_batch=self._local_eval_batch, norm=self._norm, sums_body=self._sums_body
        )

    def train_chunk(
        self, state: train.TrainState, data: DeviceDataset, epoch: int, first_step: int, num_steps: int
    ) -> tuple[train.TrainState, train.Metrics]:
        """Runs ``num_steps`` steps (state donated); metrics stay on device, stacked per step."""
        if self.host_loop and num_steps > 1:
            per_step = []
            for offset in range(num_steps):
                state, metrics = self.train_chunk(state, data, epoch, first_step + offset, 1)
                per_step.append(metrics)
            return state, jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=-1), *per_step)
        if num_steps not in self._chunks:
            body = functools.partial(
                self._traced(train_chunk_body),
                num_steps=num_steps,
                global_batch=self.global_batch,
                local_batch=self._local_batch,
                norm=self._norm,
                use_augment=self._use_augment,
                step_body=self._step_body,
            )
            self._chunks[num_steps] = self.dp.compile(
                self._over_seeds(body, 4), (REPLICATED, REPLICATED, BROADCAST, BROADCAST), (REPLICATED, REPLICATED), donate_argnums=(0,)
            )
        return self._chunks[num_steps](state, data, np.int32(epoch), np.int32(first_step))

    def evaluate(self, state: train.TrainState, data: DeviceDataset) -> dict[str, float]:
        """Loss, accuracy, error rate, count and diagnostics over the whole split (host floats,
        or per-seed lists with ``vmap_seeds``)."""
        if data.labels.shape[-1] % self.eval_batch:
            raise ValueError("evaluation data must be padded to a multiple of eval_batch (use put_dataset).")
        sums = self.dp.get(self._evaluate(state.params, data), REPLICATED)
        return train.summarize_eval(sums)


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
    """Full batches per epoch (the partial last batch is dropped for training)."""
    steps = num_examples // global_batch
    if steps == 0:
        raise ValueError(f"batch_size={global_batch} exceeds the {num_examples} training examples.")
    return steps

