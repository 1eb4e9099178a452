r"""Conv-lowering experiments for the CPU train step (issue 6), kept so their numbers can be rerun.

  python experiments/conv_lowering.py --batch_size=128 --rounds=5

Two measurements, both in this one process with interleaved rounds:
1. The default CNN's train step (softmax CE, SGD, reshape-max pooling) with its 3x3 convs
   lowered several ways: ``lax`` (``conv_general_dilated``: XLA:CPU's Eigen kernels), ``im2col``
   (9 shifted slices concatenated, one matmul; autodiff backward), ``im2col_vjp`` (the same with
   a hand-written backward: weight gradient = patches^T @ g, input gradient = im2col of g times
   the flipped kernel), ``chunkedN`` (softsig's ``chunked_weight_grad_conv``: lax forward and
   input gradient, kernel gradient summed over chunks of N images). Gradients are checked
   against ``lax`` first.
2. The weight gradient alone per layer shape: ``lax`` (XLA's transposed conv),
   ``chunked16``, ``p3g3`` (3 column-shifted copies of x against 3 row-shifted copies of g: one
   matmul of K = B*(H+2)*W), ``dot9`` (9 matmuls on shifted slices), ``p9`` (full im2col^T @ g),
   and the kernel gradient written as a *forward* conv with the operands' roles swapped:
   ``swap_x`` (x as the input with channels as batch and images as features, g as a B-input
   kernel) and ``swap_g`` (g as the input, x as the kernel, output flipped); next to XLA's
   forward and input-gradient convs, the forward as im2col (``fwd_im2col``) and, with
   ``--with_tf``, TensorFlow's three conv ops (oneDNN kernels: what Keras runs).
3. Where the softsig train step's time goes (the real model, Adam, batch on device): forward
   only, forward + backward, + SGD, + Adam, and the full ``train_step_body`` (diagnostics too).
   Set against part 2's per-layer sums, it shows how much of the step the convs are.
Reports images/s (1) and milliseconds (2, 3), medians over rounds; ``--parts`` picks which.
"""

import statistics
import time

from softsig import launch

launch.reexec_with_tuned_cpu_environment()

from absl import app, flags  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

_BATCH = flags.DEFINE_integer("batch_size", 128, "Batch size.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Interleaved timing rounds.")
_STEPS = flags.DEFINE_integer("steps", 5, "Train steps per round and variant.")
_PARTS = flags.DEFINE_list("parts", ["step", "layers", "split"],
                           "Which measurements: step (1), layers (2), split (3).")
_WITH_TF = flags.DEFINE_bool("with_tf", True, "Also time TensorFlow's (oneDNN) conv forward/backward ops per layer.")


def conv_lax(x_BHWC, w_HWIO):
    return jax.lax.conv_general_dilated(x_BHWC, w_HWIO, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def patches_3x3(x_BHWC):
    """'SAME' 3x3 patches [B, H, W, 9C], ordered (dy, dx, c) like an HWIO kernel reshaped."""
    _, height, width, _ = x_BHWC.shape
    padded = jnp.pad(x_BHWC, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return jnp.concatenate(
        [padded[:, dy:dy + height, dx:dx + width, :] for dy in range(3) for dx in range(3)], axis=-1)


def conv_im2col(x_BHWC, w_HWIO):
    return jnp.dot(patches_3x3(x_BHWC), w_HWIO.reshape(-1, w_HWIO.shape[-1]))


@jax.custom_vjp
def conv_im2col_vjp(x_BHWC, w_HWIO):
    return conv_im2col(x_BHWC, w_HWIO)


def _im2col_fwd(x_BHWC, w_HWIO):
    patches = patches_3x3(x_BHWC)
    return jnp.dot(patches, w_HWIO.reshape(-1, w_HWIO.shape[-1])), (patches, w_HWIO)


def _im2col_bwd(residuals, g_BHWO):
    patches, w_HWIO = residuals
    _, _, channels, features = w_HWIO.shape
    dw = jnp.einsum("bhwk,bhwo->ko", patches, g_BHWO).reshape(w_HWIO.shape)
    w_flipped = w_HWIO[::-1, ::-1].transpose(0, 1, 3, 2)
    dx = jnp.dot(patches_3x3(g_BHWO), w_flipped.reshape(9 * features, channels))
    return dx, dw


conv_im2col_vjp.defvjp(_im2col_fwd, _im2col_bwd)
def conv_chunked(images_per_chunk):
    from softsig.models import chunked_weight_grad_conv

    fn = chunked_weight_grad_conv(images_per_chunk)
    return lambda x, w: fn(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


CONVS = {"lax": conv_lax, "im2col": conv_im2col, "im2col_vjp": conv_im2col_vjp,
         "chunked4": conv_chunked(4), "chunked8": conv_chunked(8), "chunked16": conv_chunked(16),
         "chunked32": conv_chunked(32)}


def dw_lax(x, g, w):
    return jax.vjp(lambda w: conv_lax(x, w), w)[1](g)[0]


def dw_p3g3(x, g, w):
    _, height, width, channels = x.shape
    features = g.shape[-1]
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    cols = jnp.stack([padded[:, :, dx:dx + width, :] for dx in range(3)], axis=3)
    rows = jnp.stack([jnp.pad(g, ((0, 0), (dy, 2 - dy), (0, 0), (0, 0))) for dy in range(3)], axis=3)
    dw = jnp.dot(cols.reshape(-1, 3 * channels).T, rows.reshape(-1, 3 * features))
    return dw.reshape(3, channels, 3, features).transpose(2, 0, 1, 3)


def dw_dot9(x, g, w):
    _, height, width, channels = x.shape
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    g_flat = g.reshape(-1, g.shape[-1])
    return jnp.stack([jnp.stack([
        jnp.dot(padded[:, dy:dy + height, dx:dx + width, :].reshape(-1, channels).T, g_flat)
        for dx in range(3)]) for dy in range(3)])


def dw_p9(x, g, w):
    return jnp.dot(patches_3x3(x).reshape(-1, 9 * x.shape[-1]).T, g.reshape(-1, g.shape[-1])).reshape(w.shape)


def dw_chunked16(x, g, w):
    return jax.vjp(lambda w: conv_chunked(16)(x, w), w)[1](g)[0]


def fwd_lax(x, g, w):
    return conv_lax(x, w)


def dx_lax(x, g, w):
    return jax.vjp(lambda x: conv_lax(x, w), x)[1](g)[0]


def dw_swap_x(x, g, w):
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))  # [B, H+2, W+2, C]: batch C, features B
    dw_CHWO = jax.lax.conv_general_dilated(padded, g, (1, 1), "VALID", dimension_numbers=("CHWN", "IHWO", "NHWC"))
    return dw_CHWO.transpose(1, 2, 0, 3)


def dw_swap_g(x, g, w):
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))  # the kernel: [B, H+2, W+2, C] as IHWO
    dw_OHWC = jax.lax.conv_general_dilated(g, padded, (1, 1), ((2, 2), (2, 2)), dimension_numbers=("CHWN", "IHWO", "NHWC"))
    return dw_OHWC[:, ::-1, ::-1, :].transpose(1, 2, 3, 0)


def fwd_im2col(x, g, w):
    return conv_im2col(x, w)


WEIGHT_GRADIENTS = {"lax": dw_lax, "chunked16": dw_chunked16, "p3g3": dw_p3g3, "dot9": dw_dot9, "p9": dw_p9,
                    "swap_x": dw_swap_x, "swap_g": dw_swap_g}


def tf_conv_ops(x, g, w):
    """TensorFlow's forward, input-gradient and kernel-gradient ops (oneDNN on x86), timed like ours."""
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    x, g, w = (tf.constant(np.asarray(a)) for a in (x, g, w))
    strides, shape_x, shape_w = [1, 1, 1, 1], list(x.shape), list(w.shape)
    return {
        "fwd": tf.function(lambda: tf.nn.conv2d(x, w, 1, "SAME")),
        "dx": tf.function(lambda: tf.raw_ops.Conv2DBackpropInput(
            input_sizes=shape_x, filter=w, out_backprop=g, strides=strides, padding="SAME")),
        "dw": tf.function(lambda: tf.raw_ops.Conv2DBackpropFilter(
            input=x, filter_sizes=shape_w, out_backprop=g, strides=strides, padding="SAME")),
    }


def init(key):
    keys = jax.random.split(key, 6)
    shapes = [(3, 3, 3, 32), (3, 3, 32, 32), (3, 3, 32, 64), (3, 3, 64, 64)]
    params = {f"conv{i}": (jax.random.normal(keys[i], s) * (2 / np.prod(s[:3])) ** 0.5, jnp.zeros(s[-1]))
              for i, s in enumerate(shapes)}
    params["dense"] = (jax.random.normal(keys[4], (4096, 512)) * (2 / 4096) ** 0.5, jnp.zeros(512))
    params["head"] = (jax.random.normal(keys[5], (512, 10)) * (1 / 512) ** 0.5, jnp.zeros(10))
    return params


def forward(params, x, conv):
    for i in range(4):
        w, b = params[f"conv{i}"]
        x = jax.nn.relu(conv(x, w) + b)
        if i % 2 == 1:
            batch, height, width, channels = x.shape
            x = x.reshape(batch, height // 2, 2, width // 2, 2, channels).max(axis=(2, 4))
    x = jax.nn.relu(x.reshape(x.shape[0], -1) @ params["dense"][0] + params["dense"][1])
    return x @ params["head"][0] + params["head"][1]


def loss_fn(params, x, y, conv):
    logits = forward(params, x, conv)
    return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * jax.nn.one_hot(y, 10), -1))


def _time(fn, *args):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def main(argv):
    del argv
    batch = _BATCH.value
    if "step" in _PARTS.value:
        time_steps(batch)
    if "layers" in _PARTS.value:
        time_layers(batch)
    if "split" in _PARTS.value:
        time_split(batch)


def time_steps(batch):
    params = init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (batch, 32, 32, 3))
    y = jax.random.randint(jax.random.key(2), (batch,), 0, 10)
    reference = jax.jit(jax.grad(loss_fn), static_argnums=3)(params, x, y, conv_lax)
    steps = {}
    for name, conv in CONVS.items():
        grads = jax.jit(jax.grad(loss_fn), static_argnums=3)(params, x, y, conv)
        error = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
                    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(reference)))
        print(f"{name:11s} max relative gradient difference to lax: {error:.1e}")

        def make_step(conv=conv):
            def step(params, x, y):
                grads = jax.grad(loss_fn)(params, x, y, conv)
                return jax.tree.map(lambda p, g: p - 1e-3 * g, params, grads)

            return jax.jit(step)

        steps[name] = make_step()
        jax.block_until_ready(steps[name](params, x, y))

    def run_steps(step):
        state = params
        for _ in range(_STEPS.value):
            state = step(state, x, y)
        return state

    rates = {name: [] for name in steps}
    for _ in range(_ROUNDS.value):
        for name, step in steps.items():
            rates[name].append(_STEPS.value * batch / _time(run_steps, step))
    print(f"\ntrain step, batch {batch}, images/s (median of {_ROUNDS.value} interleaved rounds)")
    for name, values in rates.items():
        print(f"  {name:11s} {statistics.median(values):7.1f}   rounds {[round(v) for v in values]}")


def time_layers(batch):
    print(f"\nper layer, batch {batch}, ms (median of {_ROUNDS.value} interleaved rounds): XLA forward and "
          f"input gradient, forward as im2col; kernel gradient (dw) {len(WEIGHT_GRADIENTS)} ways" + ("; TensorFlow's ops" if _WITH_TF.value else ""))
    for height, channels, features in [(32, 3, 32), (32, 32, 32), (16, 32, 64), (16, 64, 64)]:
        x_l = jax.random.normal(jax.random.key(0), (batch, height, height, channels))
        w_l = jax.random.normal(jax.random.key(1), (3, 3, channels, features))
        g_l = jax.random.normal(jax.random.key(2), (batch, height, height, features))
        expected = jax.jit(dw_lax)(x_l, g_l, w_l)
        times = {"fwd": jax.jit(fwd_lax), "dx": jax.jit(dx_lax), "fwd_im2col": jax.jit(fwd_im2col)}
        jax.block_until_ready([fn(x_l, g_l, w_l) for fn in times.values()])
        assert float(jnp.max(jnp.abs(times["fwd_im2col"](x_l, g_l, w_l) - times["fwd"](x_l, g_l, w_l)))) < 1e-3
        for name, fn in WEIGHT_GRADIENTS.items():
            fn = jax.jit(fn)
            got = fn(x_l, g_l, w_l)
            assert float(jnp.max(jnp.abs(got - expected)) / jnp.max(jnp.abs(expected))) < 1e-5, name
            times[f"dw_{name}"] = fn
        if _WITH_TF.value:
            for name, op in tf_conv_ops(x_l, g_l, w_l).items():
                op()  # trace
                times[f"tf_{name}"] = lambda *_, op=op: op().numpy()
        ms = {name: [] for name in times}
        for _ in range(_ROUNDS.value):
            for name, fn in times.items():
                ms[name].append(1e3 * _time(fn, x_l, g_l, w_l))
        gflop = 2 * batch * height * height * 9 * channels * features / 1e9
        print(f"  {height}x{height} {channels:2d}->{features:2d} ({gflop:.2f} GFLOP): " + "  ".join(
            f"{name} {statistics.median(v):6.2f}" for name, v in ms.items()))



def time_split(batch):
    import functools

    import optax

    from softsig import config as config_lib
    from softsig import data, losses, models, run, train

    config = config_lib.Config(batch_size=batch, dataset="synthetic").validate()
    tx, loss = train.make_optimizer("adam", 1e-3), losses.get_loss(config.loss)
    graphdef, state = train.init_train_state(run.model_config_for(config, data.SYNTHETIC_INFO), tx, 0)
    batch_data = {"images": jax.random.normal(jax.random.key(1), (batch, 32, 32, 3)),
                  "labels": jax.random.randint(jax.random.key(2), (batch,), 0, 10)}

    def loss_of(params):
        logits = models.apply_model(graphdef, params, batch_data["images"])
        return jnp.mean(loss.with_integer_labels(logits, batch_data["labels"]))

    def sgd(params):
        return jax.tree.map(lambda p, g: p - 1e-3 * g, params, jax.grad(loss_of)(params))

    def adam(params, opt_state):
        updates, opt_state = tx.update(jax.grad(loss_of)(params), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    step = functools.partial(train.train_step_body, graphdef=graphdef, tx=tx, loss=loss)
    parts = {"forward": (jax.jit(loss_of), (state.params,)), "forward+backward": (jax.jit(jax.grad(loss_of)), (state.params,)),
             "+ SGD": (jax.jit(sgd), (state.params,)), "+ Adam": (jax.jit(adam), (state.params, state.opt_state)),
             "softsig train step": (jax.jit(step), (state, batch_data))}
    for fn, args in parts.values():
        jax.block_until_ready(fn(*args))
    ms = {name: [] for name in parts}
    for _ in range(_ROUNDS.value):
        for name, (fn, args) in parts.items():
            ms[name].append(1e3 * statistics.median(_time(fn, *args) for _ in range(_STEPS.value)))
    print(f"\nthe softsig step taken apart, batch {batch}, ms (median of {_ROUNDS.value} interleaved rounds)")
    for name, values in ms.items():
        print(f"  {name:19s} {statistics.median(values):7.2f}")


if __name__ == "__main__":
    app.run(main)
