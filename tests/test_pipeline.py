"""Device-resident epochs: order, coverage, topology invariance, scan vs single steps, padded eval."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from softsig import losses, parallel, pipeline, train
from softsig.parallel import BROADCAST, REPLICATED
from tests.helpers import TINY, random_uint8_split

NUM_EXAMPLES, GLOBAL_BATCH = 80, 16


def recorded_global_batches(mode, num_devices, epoch, num_steps=NUM_EXAMPLES // GLOBAL_BATCH, augment=False):
    """The example indices (and augmented pixels) of each global batch, via a recording step body."""
    dp = parallel.make_parallel(mode, num_devices)
    images = np.broadcast_to(np.arange(NUM_EXAMPLES, dtype=np.uint8)[:, None, None, None], (NUM_EXAMPLES, 8, 8, 3))
    data = pipeline.put_dataset(dp, np.ascontiguousarray(images), np.arange(NUM_EXAMPLES, dtype=np.int32))
    state = dp.put(train.TrainState(np.int32(0), {}, (), train.root_key(7)), REPLICATED)

    def recording_body(state, batch, *, axis_name):
        record = {"labels": batch["labels"], "images": batch["images"]}
        if axis_name is not None:
            record = jax.lax.all_gather(record, axis_name, tiled=True)
        return state._replace(step=state.step + 1), record

    body = functools.partial(
        pipeline.train_chunk_body,
        num_steps=num_steps,
        global_batch=GLOBAL_BATCH,
        local_batch=GLOBAL_BATCH // dp.num_devices,
        norm=pipeline.Normalization(np.zeros(3, np.float32), np.ones(3, np.float32)),
        use_augment=augment,
        step_body=recording_body,
    )
    chunk = dp.compile(body, (REPLICATED, REPLICATED, BROADCAST, BROADCAST), (REPLICATED, REPLICATED))
    _, record = chunk(state, data, np.int32(epoch), np.int32(0))
    return dp.get(record, REPLICATED)


def test_every_example_once_per_epoch_and_epochs_differ():
    epoch0 = recorded_global_batches("none", 1, epoch=0)["labels"]
    epoch1 = recorded_global_batches("none", 1, epoch=1)["labels"]
    assert epoch0.shape == (NUM_EXAMPLES // GLOBAL_BATCH, GLOBAL_BATCH)
    np.testing.assert_array_equal(np.sort(epoch0.ravel()), np.arange(NUM_EXAMPLES))
    np.testing.assert_array_equal(np.sort(epoch1.ravel()), np.arange(NUM_EXAMPLES))
    assert not np.array_equal(epoch0, epoch1)
    assert not np.array_equal(epoch0.ravel(), np.arange(NUM_EXAMPLES))  # shuffled


@pytest.mark.parametrize("mode, num_devices", [("shard_map", 2), ("shard_map", 8), ("pmap", 2), ("pmap", 8)])
def test_global_batches_and_augmentation_do_not_depend_on_the_topology(mode, num_devices):
    reference = recorded_global_batches("none", 1, epoch=3, augment=True)
    got = recorded_global_batches(mode, num_devices, epoch=3, augment=True)
    np.testing.assert_array_equal(got["labels"], reference["labels"])
    np.testing.assert_array_equal(got["images"], reference["images"])


def test_augment_crops_and_flips_within_the_padded_image():
    image = np.arange(8 * 8, dtype=np.float32).reshape(1, 8, 8, 1) + 1.0
    keys = jax.random.split(jax.random.key(0), 64)
    out = pipeline.augment(jnp.broadcast_to(image, (64, 8, 8, 1)), keys, pad=2)
    padded = np.pad(image[0, :, :, 0], 2)
    windows = {padded[y : y + 8, x : x + 8].tobytes() for y in range(5) for x in range(5)}
    windows |= {padded[y : y + 8, x : x + 8][:, ::-1].tobytes() for y in range(5) for x in range(5)}
    for crop in np.asarray(out)[..., 0]:
        assert crop.tobytes() in windows
    assert len({crop.tobytes() for crop in np.asarray(out)}) > 10  # keys differ per example


def make_programs(dp, use_augment=False):
    tx = optax.adam(1e-2)
    graphdef, state = train.init_train_state(TINY, tx, seed=0)
    images, labels = random_uint8_split(0, NUM_EXAMPLES)
    norm = pipeline.normalization_from(images)
    programs = pipeline.Programs(
        dp, graphdef, tx, losses.get_loss("softmax_cross_entropy"),
        global_batch=GLOBAL_BATCH, eval_batch=24, norm=norm, use_augment=use_augment,
    )
    return programs, dp.put(state, REPLICATED), pipeline.put_dataset(dp, images, labels), graphdef


def test_scanned_chunk_equals_single_steps():
    dp = parallel.make_parallel("none")
    programs, state, data, _ = make_programs(dp, use_augment=True)
    programs.host_loop = False
    scanned, metrics = programs.train_chunk(state, data, epoch=0, first_step=0, num_steps=4)
    _, state, _, _ = make_programs(dp, use_augment=True)
    single_metrics = []
    for step in range(4):
        state, m = programs.train_chunk(state, data, epoch=0, first_step=step, num_steps=1)
        single_metrics.append(m["loss"][0])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), scanned, state)
    np.testing.assert_allclose(metrics["loss"], single_metrics, rtol=1e-6)
    assert programs.trace_count == 2  # one trace per chunk length (eval is traced lazily, not yet)
    programs.train_chunk(state, data, epoch=1, first_step=0, num_steps=4)
    assert programs.trace_count == 2  # epoch and first step are runtime values: no retrace


@pytest.mark.parametrize("mode", ["none", "pmap", "shard_map"])
def test_padded_eval_counts_every_example_once(mode):
    dp = parallel.make_parallel(mode)
    programs, state, _, graphdef = make_programs(dp)
    images, labels = random_uint8_split(1, 50)  # 50 is not a multiple of the eval batch 24
    data = pipeline.put_dataset(dp, images, labels, pad_multiple=programs.eval_batch)
    result = programs.evaluate(state, data)
    host_state = dp.get(state, REPLICATED)
    norm = pipeline.normalization_from(random_uint8_split(0, NUM_EXAMPLES)[0])
    from softsig import models

    logits = models.apply_model(graphdef, host_state.params, pipeline.normalize(images, norm))
    expected_loss = np.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
    assert result["count"] == 50
    np.testing.assert_allclose(result["loss"], expected_loss, rtol=1e-5)
    np.testing.assert_allclose(result["accuracy"], np.mean(np.argmax(logits, -1) == labels))


def test_normalization_matches_numpy():
    images, _ = random_uint8_split(2, 30)
    norm = pipeline.normalization_from(images)
    pixels = images.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(norm.mean, pixels.mean(0), rtol=1e-6)
    np.testing.assert_allclose(norm.std, pixels.std(0), rtol=1e-5)


def test_steps_per_epoch_drops_the_partial_batch():
    assert pipeline.steps_per_epoch(50_000, 128) == 390
    with pytest.raises(ValueError, match="exceeds"):
        pipeline.steps_per_epoch(10, 16)


@pytest.mark.parametrize("mode", ["none", "pmap", "shard_map"])
def test_host_loop_chunk_equals_scanned_chunk(mode):
    dp = parallel.make_parallel(mode)
    programs, state, data, _ = make_programs(dp)
    programs.host_loop = False
    scanned, scanned_metrics = programs.train_chunk(state, data, epoch=0, first_step=1, num_steps=3)
    programs, state, data, _ = make_programs(dp)
    programs.host_loop = True
    looped, looped_metrics = programs.train_chunk(state, data, epoch=0, first_step=1, num_steps=3)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
        dp.get(scanned, REPLICATED), dp.get(looped, REPLICATED),
    )
    scanned_metrics, looped_metrics = dp.get(scanned_metrics, REPLICATED), dp.get(looped_metrics, REPLICATED)
    assert looped_metrics["loss"].shape == (3,)
    np.testing.assert_allclose(looped_metrics["loss"], scanned_metrics["loss"], rtol=1e-6)
