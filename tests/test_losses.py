"""Tests for ``softsig/losses.py``.

The references used here are independent of the implementation:

* a float64 NumPy reference written from the mathematical definitions
  (stable sigmoid via ``exp(-|x|)``, stable log-softmax via max subtraction),
* optax (``optax.losses.softmax_cross_entropy`` and friends, and
  ``optax.losses.squared_error(jax.nn.sigmoid(x), y).mean(axis)``),
* closed-form gradients:
  ``d sigmoid_mse / dx = (2 / K) (p - y) p (1 - p)`` and
  ``d softmax_ce / dx = softmax(x) sum(y) - y`` (restricted to the included
  classes when ``where`` is given).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import math
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import numpy.testing as npt
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import softsig
from softsig import losses as L

NAMES = ("sigmoid_mse", "softmax_cross_entropy")
ONE_HOT_FNS = {
    "sigmoid_mse": lambda: L.sigmoid_mse,
    "softmax_cross_entropy": lambda: L.softmax_cross_entropy,
}
INT_FNS = {
    "sigmoid_mse": lambda: L.sigmoid_mse_with_integer_labels,
    "softmax_cross_entropy": lambda: L.softmax_cross_entropy_with_integer_labels,
}
DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)

# Value tolerances for float32 results against float64 references.
RTOL, ATOL = 1e-5, 1e-6
# Gradient tolerances (float32).
GRTOL, GATOL = 1e-5, 1e-6

FAST = settings(max_examples=30, deadline=None)
MEDIUM = settings(max_examples=40, deadline=None)


# --------------------------------------------------------------------------
# Shape / axis helpers
# --------------------------------------------------------------------------


def canon_axes(axis, ndim):
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(sorted(a % ndim for a in axes))


def reduced_shape(shape, axis):
    axes = canon_axes(axis, len(shape))
    return tuple(d for i, d in enumerate(shape) if i not in axes)


def full_mask(where, shape, axis):
    """Boolean mask of logits.shape, expanding a per-example mask like optax."""
    if where is None:
        return np.ones(shape, dtype=bool)
    where = np.asarray(where, dtype=bool)
    if where.ndim != len(shape):
        where = np.expand_dims(where, canon_axes(axis, len(shape)))
    return np.broadcast_to(where, shape)


def to_f64(a):
    """Exact float64 copy of an array (of any float dtype, incl. bfloat16)."""
    return np.asarray(jnp.asarray(a).astype(jnp.float32), dtype=np.float64)


def np_one_hot(labels, num_classes, axis, ndim):
    oh = np.eye(num_classes, dtype=np.float64)[np.asarray(labels)]
    return np.moveaxis(oh, -1, axis % ndim)


# --------------------------------------------------------------------------
# float64 NumPy references
# --------------------------------------------------------------------------


def np_sigmoid(x):
    x = np.asarray(x, dtype=np.float64)
    z = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + z), z / (1.0 + z))


def np_masked_log_softmax(x, axes, mask):
    """log-softmax over ``axes`` restricted to ``mask`` (masked entries: 0)."""
    x = np.asarray(x, dtype=np.float64)
    xm = np.where(mask, x, -np.inf)
    mx = xm.max(axis=axes, keepdims=True)
    mx = np.where(np.isfinite(mx), mx, 0.0)
    e = np.where(mask, np.exp(np.where(mask, x - mx, 0.0)), 0.0)
    s = e.sum(axis=axes, keepdims=True)
    lse = mx + np.log(np.where(s > 0, s, 1.0))
    return np.where(mask, x - lse, 0.0)


def ref_sigmoid_mse(logits, labels, axis=-1, where=None):
    x, y = to_f64(logits), to_f64(labels)
    axes = canon_axes(axis, x.ndim)
    m = full_mask(where, x.shape, axis)
    sq = np.where(m, (np_sigmoid(x) - y) ** 2, 0.0)
    n = m.sum(axis=axes)
    return np.where(n > 0, sq.sum(axis=axes) / np.maximum(n, 1), 0.0)


def ref_softmax_ce(logits, labels, axis=-1, where=None):
    x, y = to_f64(logits), to_f64(labels)
    axes = canon_axes(axis, x.ndim)
    m = full_mask(where, x.shape, axis)
    ls = np_masked_log_softmax(x, axes, m)
    return -np.where(m, y * ls, 0.0).sum(axis=axes)


REFS = {"sigmoid_mse": ref_sigmoid_mse, "softmax_cross_entropy": ref_softmax_ce}


def grad_sigmoid_mse(logits, labels, axis=-1, where=None):
    """Analytic gradient of sum(sigmoid_mse) w.r.t. logits."""
    x, y = to_f64(logits), to_f64(labels)
    axes = canon_axes(axis, x.ndim)
    m = full_mask(where, x.shape, axis)
    n = m.sum(axis=axes, keepdims=True)
    p = np_sigmoid(x)
    g = 2.0 / np.maximum(n, 1) * (p - y) * p * (1.0 - p)
    return np.where(m & (n > 0), g, 0.0)


def grad_softmax_ce(logits, labels, axis=-1, where=None):
    """Analytic gradient of sum(softmax_ce) w.r.t. logits."""
    x, y = to_f64(logits), to_f64(labels)
    axes = canon_axes(axis, x.ndim)
    m = full_mask(where, x.shape, axis)
    sm = np.where(m, np.exp(np_masked_log_softmax(x, axes, m)), 0.0)
    ysum = np.where(m, y, 0.0).sum(axis=axes, keepdims=True)
    return np.where(m, sm * ysum - y, 0.0)


GRADS = {"sigmoid_mse": grad_sigmoid_mse, "softmax_cross_entropy": grad_softmax_ce}


# --------------------------------------------------------------------------
# optax references
# --------------------------------------------------------------------------


def _expand_where_jnp(where, ndim, axis):
    if where is not None and where.ndim != ndim:
        where = jnp.expand_dims(where, axis)
    return where


def optax_sigmoid_mse(logits, labels, axis=-1, where=None):
    sq = optax.losses.squared_error(jax.nn.sigmoid(logits), labels)
    if where is None:
        return sq.mean(axis)
    w = jnp.broadcast_to(_expand_where_jnp(where, logits.ndim, axis), logits.shape)
    n = w.sum(axis)
    out = sq.mean(axis, where=w)
    return jnp.where(n > 0, out, 0.0)


def optax_softmax_ce(logits, labels, axis=-1, where=None):
    return optax.losses.softmax_cross_entropy(logits, labels, axis=axis, where=where)


OPTAX = {"sigmoid_mse": optax_sigmoid_mse, "softmax_cross_entropy": optax_softmax_ce}


# --------------------------------------------------------------------------
# Jitted wrappers (module level, so compilations are cached across examples)
# --------------------------------------------------------------------------


def _fn(name, integer):
    return (INT_FNS if integer else ONE_HOT_FNS)[name]()


@functools.partial(jax.jit, static_argnames=("name", "integer", "axis"))
def impl_vg(x, y, where, *, name, integer, axis):
    """(per-example loss, d sum(loss) / d logits) of the implementation."""
    fn = _fn(name, integer)

    def total(a):
        out = fn(a, y, axis=axis, where=where)
        return jnp.sum(out.astype(jnp.float32)), out

    (_, out), g = jax.value_and_grad(total, has_aux=True)(x)
    return out, g


@functools.partial(jax.jit, static_argnames=("name", "integer", "axis"))
def optax_value(x, y, where, *, name, integer, axis):
    if integer and name == "softmax_cross_entropy":
        return optax.losses.softmax_cross_entropy_with_integer_labels(
            x, y, axis=axis, where=where
        )
    if integer:
        y = jax.nn.one_hot(y, x.shape[axis], axis=axis)
    return OPTAX[name](x, y, axis=axis, where=where)


def loss_sum(fn, labels, **kw):
    return lambda x: jnp.sum(fn(x, labels, **kw).astype(jnp.float32))


# --------------------------------------------------------------------------
# Data generation
# --------------------------------------------------------------------------

# A few fixed (shape, axis) configurations for the value/gradient property
# tests (each distinct configuration costs a compilation); arbitrary shapes and
# axes are covered by the (trace-only) shape tests below.
CASES = [
    ((6,), 0),
    ((3, 4), -1),
    ((4, 3), 0),
    ((2, 3, 4), -2),
    ((2, 3, 4), (0, 2)),
    ((3, 2, 2), (1, -1)),
]
INT_CASES = [c for c in CASES if isinstance(c[1], int)]
cases = st.sampled_from(CASES)
int_cases = st.sampled_from(INT_CASES)
seeds = st.integers(0, 2**32 - 1)
label_kinds = st.sampled_from(["onehot", "prob", "any"])
where_kinds = st.sampled_from(["none", "example", "element"])


@st.composite
def shape_and_axis(draw, tuple_axes=False, max_ndim=4, max_dim=3):
    """An arbitrary small shape, and an axis (int, maybe negative, or a tuple)."""
    ndim = draw(st.integers(1, max_ndim))
    shape = tuple(draw(st.lists(st.integers(1, max_dim), min_size=ndim, max_size=ndim)))
    if tuple_axes and draw(st.booleans()):
        axes = draw(st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim, unique=True))
        axis = tuple(a - ndim if draw(st.booleans()) else a for a in axes)
    else:
        a = draw(st.integers(0, ndim - 1))
        axis = a - ndim if draw(st.booleans()) else a
    return shape, axis


def make_logits(rng, shape, scale=3.0):
    return rng.normal(scale=scale, size=shape).astype(np.float32)


def make_int_labels(rng, shape, axis):
    axes = canon_axes(axis, len(shape))
    k = math.prod(shape[a] for a in axes)
    return rng.integers(0, k, size=reduced_shape(shape, axis)).astype(np.int32)


def make_labels(rng, shape, axis, kind):
    """One-hot / probability / arbitrary [0, 1) labels over ``axis``."""
    ndim = len(shape)
    axes = canon_axes(axis, ndim)
    if kind == "onehot":
        red = reduced_shape(shape, axis)
        idx = make_int_labels(rng, shape, axis)
        k = math.prod(shape[a] for a in axes)
        oh = np.eye(k, dtype=np.float32)[idx]
        oh = oh.reshape(red + tuple(shape[a] for a in axes))
        return np.moveaxis(oh, tuple(range(len(red), ndim)), axes).astype(np.float32)
    if kind == "prob":
        g = rng.gamma(1.0, size=shape) * (rng.random(shape) < 0.8)
        g = g + (g.sum(axis=axes, keepdims=True) == 0)  # avoid all-zero rows
        return (g / g.sum(axis=axes, keepdims=True)).astype(np.float32)
    return rng.random(shape).astype(np.float32)


def make_where(rng, shape, axis, kind):
    if kind == "none":
        return None
    if kind == "example":
        w = np.asarray(rng.random(reduced_shape(shape, axis)) < 0.6)
    else:
        w = rng.random(shape) < 0.6
        if rng.random() < 0.5:
            # force (at least) one fully masked example
            axes = canon_axes(axis, len(shape))
            sel = tuple(slice(None) if i in axes else 0 for i in range(len(shape)))
            w[sel] = False
    return jnp.asarray(w)


def np_where(w):
    return None if w is None else np.asarray(w)


# --------------------------------------------------------------------------
# Study anchors and small hand-computed values
# --------------------------------------------------------------------------


def test_study_anchors_at_zero_logits():
    k = 10
    logits = jnp.zeros((4, k), jnp.float32)
    int_labels = jnp.array([0, 3, 9, 5], jnp.int32)
    labels = jax.nn.one_hot(int_labels, k)
    # sigmoid_mse: (0.5 - 1)^2 / 10 + 9 * 0.5^2 / 10 = 0.25
    npt.assert_allclose(L.sigmoid_mse(logits, labels), np.full(4, 0.25), rtol=1e-6)
    npt.assert_allclose(
        L.sigmoid_mse_with_integer_labels(logits, int_labels), np.full(4, 0.25), rtol=1e-6
    )
    # softmax CE: ln(10)
    npt.assert_allclose(L.softmax_cross_entropy(logits, labels), np.full(4, np.log(10)), rtol=1e-6)
    npt.assert_allclose(
        L.softmax_cross_entropy_with_integer_labels(logits, int_labels),
        np.full(4, np.log(10)),
        rtol=1e-6,
    )
    npt.assert_allclose(L.get_loss("sigmoid_mse").probabilities(logits), np.full((4, k), 0.5))
    npt.assert_allclose(
        L.get_loss("softmax_cross_entropy").probabilities(logits), np.full((4, k), 0.1), rtol=1e-6
    )


def test_small_hand_computed_values():
    logits = jnp.array([[2.0, -1.0, 0.5, 0.0]], jnp.float32)
    labels = jnp.array([[0.0, 1.0, 0.0, 0.0]], jnp.float32)
    z = np.array([2.0, -1.0, 0.5, 0.0])
    p = 1.0 / (1.0 + np.exp(-z))
    expected_mse = ((p - np.array([0.0, 1.0, 0.0, 0.0])) ** 2).mean()
    expected_ce = np.log(np.exp(z).sum()) + 1.0
    npt.assert_allclose(L.sigmoid_mse(logits, labels), [expected_mse], rtol=1e-6)
    npt.assert_allclose(L.softmax_cross_entropy(logits, labels), [expected_ce], rtol=1e-6)
    # masked: mean over the two included classes / CE over the included classes
    w = jnp.array([[True, True, False, False]])
    npt.assert_allclose(
        L.sigmoid_mse(logits, labels, where=w), [(p[0] ** 2 + (p[1] - 1) ** 2) / 2], rtol=1e-6
    )
    npt.assert_allclose(
        L.softmax_cross_entropy(logits, labels, where=w),
        [np.log(np.exp(z[:2]).sum()) + 1.0],
        rtol=1e-6,
    )
    # whole example masked out -> exactly 0
    for fn in ONE_HOT_FNS.values():
        assert float(fn()(logits, labels, where=jnp.array([False]))[0]) == 0.0
        assert float(fn()(logits, labels, where=jnp.zeros((1, 4), bool))[0]) == 0.0


# --------------------------------------------------------------------------
# float64 NumPy reference: values and gradients
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@MEDIUM
@given(case=cases, seed=seeds, lk=label_kinds, wk=where_kinds)
def test_one_hot_matches_numpy_reference(name, case, seed, lk, wk):
    shape, axis = case
    rng = np.random.default_rng(seed)
    x = make_logits(rng, shape)
    y = make_labels(rng, shape, axis, lk)
    w = make_where(rng, shape, axis, wk)
    out, g = impl_vg(jnp.asarray(x), jnp.asarray(y), w, name=name, integer=False, axis=axis)
    assert out.shape == reduced_shape(shape, axis)
    assert out.dtype == jnp.float32
    assert g.shape == x.shape and g.dtype == jnp.float32
    npt.assert_allclose(np.asarray(out), REFS[name](x, y, axis, np_where(w)), rtol=RTOL, atol=1e-5)
    # analytic gradients: (2/K_included)(p-y)p(1-p) and softmax*sum(y) - y
    npt.assert_allclose(
        np.asarray(g), GRADS[name](x, y, axis, np_where(w)), rtol=GRTOL, atol=GATOL
    )


@pytest.mark.parametrize("name", NAMES)
@FAST
@given(case=int_cases, seed=seeds, wk=where_kinds)
def test_integer_labels_match_numpy_reference(name, case, seed, wk):
    shape, axis = case
    rng = np.random.default_rng(seed)
    x = make_logits(rng, shape)
    yi = make_int_labels(rng, shape, axis)
    w = make_where(rng, shape, axis, wk)
    out, g = impl_vg(jnp.asarray(x), jnp.asarray(yi), w, name=name, integer=True, axis=axis)
    y = np_one_hot(yi, shape[axis], axis, len(shape))
    assert out.shape == reduced_shape(shape, axis)
    assert out.dtype == jnp.float32
    npt.assert_allclose(np.asarray(out), REFS[name](x, y, axis, np_where(w)), rtol=RTOL, atol=1e-5)
    npt.assert_allclose(
        np.asarray(g), GRADS[name](x, y, axis, np_where(w)), rtol=GRTOL, atol=GATOL
    )


@pytest.mark.parametrize("name", NAMES)
def test_grad_fixed_example_eager(name):
    k = 4
    rng = np.random.default_rng(0)
    x = rng.normal(scale=2.0, size=(3, k)).astype(np.float32)
    yi = np.array([0, 3, 2], np.int32)
    y = np.eye(k, dtype=np.float32)[yi]
    p = np_sigmoid(x)
    if name == "sigmoid_mse":
        expected = (2.0 / k) * (p - y) * p * (1.0 - p)
    else:
        e = np.exp(x.astype(np.float64) - x.max(-1, keepdims=True))
        expected = e / e.sum(-1, keepdims=True) - y
    g = jax.grad(loss_sum(ONE_HOT_FNS[name](), jnp.asarray(y)))(jnp.asarray(x))
    npt.assert_allclose(np.asarray(g), expected, rtol=GRTOL, atol=GATOL)
    gi = jax.grad(loss_sum(INT_FNS[name](), jnp.asarray(yi)))(jnp.asarray(x))
    npt.assert_allclose(np.asarray(gi), expected, rtol=GRTOL, atol=GATOL)


def test_sigmoid_mse_grad_with_mask_uses_included_class_count():
    x = np.array([[0.3, -1.2, 2.0, 0.7], [1.0, 1.0, 1.0, 1.0], [0.1, 0.2, 0.3, 0.4]], np.float32)
    y = np.array([[1, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0]], np.float32)
    w = np.array([[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 0]], bool)
    g = jax.grad(loss_sum(L.sigmoid_mse, jnp.asarray(y), where=jnp.asarray(w)))(jnp.asarray(x))
    p = np_sigmoid(x)
    base = (p - y) * p * (1 - p)
    expected = np.zeros_like(p)
    expected[0, [0, 2]] = (2.0 / 2.0) * base[0, [0, 2]]
    expected[2, :3] = (2.0 / 3.0) * base[2, :3]
    npt.assert_allclose(np.asarray(g), expected, rtol=GRTOL, atol=GATOL)


# --------------------------------------------------------------------------
# optax reference
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@MEDIUM
@given(case=cases, seed=seeds, lk=label_kinds, wk=where_kinds)
def test_one_hot_matches_optax(name, case, seed, lk, wk):
    shape, axis = case
    rng = np.random.default_rng(seed)
    x = jnp.asarray(make_logits(rng, shape))
    y = jnp.asarray(make_labels(rng, shape, axis, lk))
    w = make_where(rng, shape, axis, wk)
    out, _ = impl_vg(x, y, w, name=name, integer=False, axis=axis)
    expected = optax_value(x, y, w, name=name, integer=False, axis=axis)
    assert out.shape == expected.shape
    npt.assert_allclose(np.asarray(out), np.asarray(expected), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", NAMES)
@FAST
@given(case=int_cases, seed=seeds, wk=where_kinds)
def test_integer_labels_match_optax(name, case, seed, wk):
    shape, axis = case
    rng = np.random.default_rng(seed)
    x = jnp.asarray(make_logits(rng, shape))
    yi = make_int_labels(rng, shape, axis)
    w = make_where(rng, shape, axis, wk)
    if wk == "element":
        # optax's integer CE does not apply `where` to the label's own logit,
        # so only compare where each example's label class is included (or the
        # whole example is masked out).
        w = np.array(w)
        oh = np_one_hot(yi, shape[axis], axis, len(shape)).astype(bool)
        w = jnp.asarray(w | (oh & w.any(axis=axis, keepdims=True)))
    yi = jnp.asarray(yi)
    out, _ = impl_vg(x, yi, w, name=name, integer=True, axis=axis)
    expected = optax_value(x, yi, w, name=name, integer=True, axis=axis)
    assert out.shape == expected.shape
    npt.assert_allclose(np.asarray(out), np.asarray(expected), rtol=RTOL, atol=ATOL)


def test_softmax_ce_where_matches_optax_fixed_example_eager():
    x = jnp.array([[1.0, 2.0, 3.0, 0.0], [0.5, -1.0, 2.0, 0.0], [0.0, 4.0, -2.0, 1.0]])
    y = jnp.array([[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.2, 0.3, 0.4, 0.1]])
    w = jnp.array([[1, 1, 0, 1], [0, 0, 0, 0], [1, 0, 1, 1]], bool)
    for where in (w, jnp.array([True, False, True])):
        out = L.softmax_cross_entropy(x, y, where=where)
        expected = optax.losses.softmax_cross_entropy(x, y, where=where)
        npt.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-6, atol=1e-7)
        assert float(out[1]) == 0.0  # fully masked row


# --------------------------------------------------------------------------
# Integer-label versions == one-hot versions
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@FAST
@given(case=int_cases, seed=seeds, wk=where_kinds)
def test_integer_labels_equal_one_hot(name, case, seed, wk):
    shape, axis = case
    rng = np.random.default_rng(seed)
    x = jnp.asarray(make_logits(rng, shape))
    yi = jnp.asarray(make_int_labels(rng, shape, axis))
    w = make_where(rng, shape, axis, wk)
    y = jax.nn.one_hot(yi, shape[axis], axis=axis)
    out_int, g_int = impl_vg(x, yi, w, name=name, integer=True, axis=axis)
    out_oh, g_oh = impl_vg(x, y, w, name=name, integer=False, axis=axis)
    assert out_int.shape == out_oh.shape == reduced_shape(shape, axis)
    npt.assert_allclose(np.asarray(out_int), np.asarray(out_oh), rtol=1e-6, atol=1e-6)
    npt.assert_allclose(np.asarray(g_int), np.asarray(g_oh), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_integer_labels_equal_one_hot_when_label_class_is_masked(name):
    # The spec defines the integer versions as the one-hot versions applied to
    # jax.nn.one_hot(labels, K, axis=axis).  With the label's own class masked
    # out, no label mass is left in the (masked) one-hot sum.
    x = jnp.array([[1.0, 2.0, 3.0, 0.0], [0.5, -1.0, 2.0, 0.0], [0.0, 4.0, -2.0, 1.0]])
    yi = jnp.array([1, 0, 3], jnp.int32)
    w = jnp.array([[1, 0, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]], bool)
    y = jax.nn.one_hot(yi, 4)
    out_oh = ONE_HOT_FNS[name]()(x, y, where=w)
    npt.assert_allclose(np.asarray(out_oh), REFS[name](x, y, -1, np.asarray(w)), rtol=1e-6)
    out_int = INT_FNS[name]()(x, yi, where=w)
    npt.assert_allclose(np.asarray(out_int), np.asarray(out_oh), rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------
# Masking properties
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@MEDIUM
@given(case=cases, seed=seeds, lk=label_kinds, wk=st.sampled_from(["example", "element"]))
def test_masked_elements_do_not_affect_result(name, case, seed, lk, wk):
    shape, axis = case
    rng = np.random.default_rng(seed)
    x = make_logits(rng, shape)
    y = make_labels(rng, shape, axis, lk)
    w = make_where(rng, shape, axis, wk)
    m = full_mask(np.asarray(w), shape, axis)
    # replace logits (by huge values) and labels at the masked positions
    junk = rng.choice(np.array([-1e4, 1e4, 30.0, -30.0], np.float32), size=shape)
    x2 = np.where(m, x, junk).astype(np.float32)
    y2 = np.where(m, y, rng.random(shape) * 5).astype(np.float32)
    out1, _ = impl_vg(jnp.asarray(x), jnp.asarray(y), w, name=name, integer=False, axis=axis)
    out2, g2 = impl_vg(jnp.asarray(x2), jnp.asarray(y2), w, name=name, integer=False, axis=axis)
    npt.assert_allclose(np.asarray(out2), np.asarray(out1), rtol=1e-6, atol=1e-7)
    # fully masked examples give exactly 0
    empty = ~m.any(axis=canon_axes(axis, len(shape)))
    assert np.all(np.asarray(out1)[empty] == 0.0)
    assert np.all(np.asarray(out2)[empty] == 0.0)
    # no gradient flows to masked positions, and nothing is NaN/Inf
    assert np.all(np.isfinite(np.asarray(g2)))
    assert np.all(np.asarray(g2)[~m] == 0.0)


@pytest.mark.parametrize("name", NAMES)
def test_where_all_true_equals_no_where(name):
    rng = np.random.default_rng(1)
    x = jnp.asarray(make_logits(rng, (2, 3, 4)))
    y = jnp.asarray(make_labels(rng, (2, 3, 4), -2, "prob"))
    base, _ = impl_vg(x, y, None, name=name, integer=False, axis=-2)
    full, _ = impl_vg(x, y, jnp.ones((2, 3, 4), bool), name=name, integer=False, axis=-2)
    ex, _ = impl_vg(x, y, jnp.ones((2, 4), bool), name=name, integer=False, axis=-2)
    npt.assert_allclose(np.asarray(full), np.asarray(base), rtol=1e-6, atol=1e-7)
    npt.assert_allclose(np.asarray(ex), np.asarray(base), rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------
# Value ranges
# --------------------------------------------------------------------------


@FAST
@given(case=cases, seed=seeds, lk=label_kinds, big=st.booleans())
def test_sigmoid_mse_in_unit_interval(case, seed, lk, big):
    shape, axis = case
    rng = np.random.default_rng(seed)
    x = jnp.asarray(make_logits(rng, shape, scale=1e3 if big else 3.0))
    y = jnp.asarray(make_labels(rng, shape, axis, lk))
    out, _ = impl_vg(x, y, None, name="sigmoid_mse", integer=False, axis=axis)
    out = np.asarray(out)
    assert np.all(out >= 0.0) and np.all(out <= 1.0)


@FAST
@given(case=cases, seed=seeds, onehot=st.booleans(), big=st.booleans())
def test_softmax_ce_nonnegative_for_probability_labels(case, seed, onehot, big):
    shape, axis = case
    rng = np.random.default_rng(seed)
    x = jnp.asarray(make_logits(rng, shape, scale=1e3 if big else 3.0))
    y = jnp.asarray(make_labels(rng, shape, axis, "onehot" if onehot else "prob"))
    out, g = impl_vg(x, y, None, name="softmax_cross_entropy", integer=False, axis=axis)
    out = np.asarray(out)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(np.asarray(g)))
    assert np.all(out >= 0.0)


# --------------------------------------------------------------------------
# Dtypes and extreme logits
# --------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("name",))
def all_variants_vg(x, y, yi, w, *, name):
    """Value and gradient of one-hot/integer versions, with and without `where`."""
    res = {}
    for kind, fn, lab in (("onehot", ONE_HOT_FNS[name](), y), ("int", INT_FNS[name](), yi)):
        for wname, where in (("none", None), ("mask", w)):

            def total(a, fn=fn, lab=lab, where=where):
                out = fn(a, lab, where=where)
                return jnp.sum(out.astype(jnp.float32)), out

            (_, out), g = jax.value_and_grad(total, has_aux=True)(x)
            res[f"{kind}-{wname}"] = (out, g)
    return res


EXTREME_LOGITS = np.array(
    [
        [1e4, 1e4, 1e4, 1e4],
        [-1e4, -1e4, -1e4, -1e4],
        [1e4, -1e4, 1e4, -1e4],
        [-1e4, 1e4, 0.0, 3.5],
        [1e4, 0.0, -2.0, -1e4],
        [-1e4, -1e4, -1e4, 1e4],
    ],
    np.float32,
)
EXTREME_INT_LABELS = np.array([0, 2, 1, 0, 3, 0], np.int32)
EXTREME_MASK = np.array(
    [[1, 1, 0, 1], [1, 0, 1, 1], [0, 0, 0, 0], [1, 0, 1, 1], [1, 1, 0, 1], [0, 1, 1, 1]], bool
)
# float32 rounding of a logsumexp near 1e4 is ~1e-3 in absolute terms.
EXTREME_TOLS = {
    jnp.float32: dict(rtol=1e-5, atol=4e-3),
    jnp.bfloat16: dict(rtol=1e-2, atol=1e-2),
    jnp.float16: dict(rtol=2e-3, atol=4e-3),
}
# Internally float32: a low-precision result is (about) the float32 result on
# the same (already rounded) inputs, rounded once to the output dtype.
MODERATE_TOLS = {
    jnp.float32: dict(rtol=1e-5, atol=1e-6),
    jnp.bfloat16: dict(rtol=1e-2, atol=1e-3),
    jnp.float16: dict(rtol=2e-3, atol=2e-4),
}
dtype_ids = lambda d: jnp.dtype(d).name  # noqa: E731


def check_all_variants(name, dtype, x_np, y_np, yi_np, w_np, tols, check_int=True):
    x = jnp.asarray(x_np, dtype)
    y = jnp.asarray(y_np, dtype)
    res = all_variants_vg(x, y, jnp.asarray(yi_np), jnp.asarray(w_np), name=name)
    for key, (out, g) in res.items():
        if key.startswith("int") and not check_int:
            continue
        assert out.dtype == jnp.dtype(dtype), key
        assert g.dtype == jnp.dtype(dtype), key
        assert out.shape == (x.shape[0],), key
        assert np.all(np.isfinite(to_f64(out))), (key, out)
        assert np.all(np.isfinite(to_f64(g))), (key, g)
        where = w_np if key.endswith("mask") else None
        npt.assert_allclose(to_f64(out), REFS[name](x, y, -1, where), err_msg=key, **tols)
        npt.assert_allclose(to_f64(g), GRADS[name](x, y, -1, where), err_msg=key, **tols)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", ["extreme-onehot", "extreme-prob", "moderate-prob"])
def test_dtypes_and_extreme_logits(name, dtype, kind):
    rng = np.random.default_rng(2)
    if kind.startswith("extreme"):
        x, tols = EXTREME_LOGITS, EXTREME_TOLS[dtype]
    else:
        x, tols = make_logits(rng, (6, 4)), MODERATE_TOLS[dtype]
    if kind.endswith("onehot"):
        y = np.eye(4, dtype=np.float32)[EXTREME_INT_LABELS]
    else:
        y = make_labels(rng, (6, 4), -1, "prob")
    check_all_variants(
        name, dtype, x, y, EXTREME_INT_LABELS, EXTREME_MASK, tols, check_int=kind.endswith("onehot")
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=15, deadline=None)
@given(seed=seeds)
def test_random_extreme_logits(name, dtype, seed):
    rng = np.random.default_rng(seed)
    shape = (6, 4)
    vals = np.array([-1e4, 1e4, -1e4 + 8, 9984.0, 0.0, -50.0, 50.0], np.float32)
    x = rng.choice(vals, size=shape)
    yi = make_int_labels(rng, shape, -1)
    y = np.eye(4, dtype=np.float32)[yi]
    w = np.asarray(make_where(rng, shape, -1, "element"))
    check_all_variants(name, dtype, x, y, yi, w, EXTREME_TOLS[dtype])


def test_eager_dtypes_preserved():
    for dtype in DTYPES:
        x = jnp.asarray(EXTREME_LOGITS[:3], dtype)
        yi = jnp.asarray(EXTREME_INT_LABELS[:3])
        y = jax.nn.one_hot(yi, 4, dtype=dtype)
        for name in NAMES:
            out = ONE_HOT_FNS[name]()(x, y)
            assert out.dtype == jnp.dtype(dtype) and out.shape == (3,)
            assert np.all(np.isfinite(to_f64(out)))
            out = INT_FNS[name]()(x, yi)
            assert out.dtype == jnp.dtype(dtype) and out.shape == (3,)
            assert np.all(np.isfinite(to_f64(out)))


# --------------------------------------------------------------------------
# jit / vmap
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("integer", [False, True], ids=["onehot", "int"])
def test_jit_matches_eager(name, integer):
    rng = np.random.default_rng(4)
    shape, axis = (3, 4), -1
    fn = _fn(name, integer)
    x = jnp.asarray(make_logits(rng, shape))
    if integer:
        y = jnp.asarray(make_int_labels(rng, shape, axis))
    else:
        y = jnp.asarray(make_labels(rng, shape, axis, "prob"))
    w = jnp.asarray(rng.random(shape) < 0.6)
    for where in (None, w):
        eager = fn(x, y, axis=axis, where=where)
        jitted = jax.jit(lambda a, b, c: fn(a, b, axis=axis, where=c))(x, y, where)
        npt.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-6, atol=1e-6)
    ge = jax.grad(loss_sum(fn, y, axis=axis, where=w))(x)
    gj = jax.jit(jax.grad(loss_sum(fn, y, axis=axis, where=w)))(x)
    npt.assert_allclose(np.asarray(gj), np.asarray(ge), rtol=1e-6, atol=1e-7)
    # `axis` as a static argument of jit
    jf = jax.jit(fn, static_argnames=("axis",))
    npt.assert_allclose(
        np.asarray(jf(x, y, axis=axis)), np.asarray(fn(x, y, axis=axis)), rtol=1e-6, atol=1e-6
    )


@functools.partial(jax.jit, static_argnames=("name", "integer", "axis_full", "axis_inner"))
def direct_and_vmapped(x, y, w, *, name, integer, axis_full, axis_inner):
    fn = _fn(name, integer)
    direct = fn(x, y, axis=axis_full, where=w)
    mapped = jax.vmap(lambda a, b, c: fn(a, b, axis=axis_inner, where=c))(x, y, w)
    return direct, mapped


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("integer", [False, True], ids=["onehot", "int"])
@pytest.mark.parametrize("axes", [(-1, -1), (1, 0)], ids=["last", "first"])
def test_vmap_matches_batch_call(name, integer, axes):
    axis_full, axis_inner = axes
    rng = np.random.default_rng(5)
    shape = (4, 3, 5)  # vmapped over the leading axis
    x = jnp.asarray(make_logits(rng, shape))
    if integer:
        y = jnp.asarray(make_int_labels(rng, shape, axis_full))
    else:
        y = jnp.asarray(make_labels(rng, shape, axis_full, "prob"))
    w = jnp.asarray(rng.random(shape) < 0.7)
    for where in (None, w):
        direct, mapped = direct_and_vmapped(
            x, y, where, name=name, integer=integer, axis_full=axis_full, axis_inner=axis_inner
        )
        assert mapped.shape == direct.shape == reduced_shape(shape, axis_full)
        npt.assert_allclose(np.asarray(mapped), np.asarray(direct), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------
# Output shapes for arbitrary batch dims and axes (trace only)
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=60, deadline=None)
@given(sa=shape_and_axis(tuple_axes=True), wk=where_kinds)
def test_output_shape(name, sa, wk):
    shape, axis = sa
    red = reduced_shape(shape, axis)
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    y = jax.ShapeDtypeStruct(shape, jnp.float32)
    w = {"none": None, "example": jax.ShapeDtypeStruct(red, jnp.bool_),
         "element": jax.ShapeDtypeStruct(shape, jnp.bool_)}[wk]
    fn = ONE_HOT_FNS[name]()
    out = jax.eval_shape(lambda a, b, c: fn(a, b, axis=axis, where=c), x, y, w)
    assert out.shape == red and out.dtype == jnp.float32
    if isinstance(axis, int):
        yi = jax.ShapeDtypeStruct(red, jnp.int32)
        out = jax.eval_shape(lambda a, b, c: INT_FNS[name]()(a, b, axis=axis, where=c), x, yi, w)
        assert out.shape == red and out.dtype == jnp.float32


@pytest.mark.parametrize("name", NAMES)
def test_tuple_axis_equals_flattened_axis(name):
    rng = np.random.default_rng(6)
    x = make_logits(rng, (3, 2, 2))
    y = make_labels(rng, (3, 2, 2), (1, 2), "prob")
    out, _ = impl_vg(jnp.asarray(x), jnp.asarray(y), None, name=name, integer=False, axis=(1, -1))
    flat, _ = impl_vg(
        jnp.asarray(x.reshape(3, 4)), jnp.asarray(y.reshape(3, 4)), None,
        name=name, integer=False, axis=-1,
    )
    assert out.shape == (3,)
    npt.assert_allclose(np.asarray(out), np.asarray(flat), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


def shape_regex(shape):
    """Matches ``(2, 5)``, ``[2,5]``, ``f32[2,5]``, ``(3,)`` ..."""
    return r"[\(\[]\s*" + r"\s*,\s*".join(str(d) for d in shape) + r"\s*,?\s*[\)\]]"


def assert_mentions_shapes(excinfo, *shapes):
    msg = str(excinfo.value)
    for s in shapes:
        assert re.search(shape_regex(s), msg), f"shape {s} not mentioned in: {msg!r}"


def _caller(fn, mode):
    if mode == "eager":
        return fn
    if mode == "jit":
        return jax.jit(fn)
    return lambda a, b: jax.eval_shape(fn, a, b)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("mode", ["eager", "jit", "eval_shape"])
def test_one_hot_shape_mismatch_raises(name, mode):
    call = _caller(ONE_HOT_FNS[name](), mode)
    x = jnp.zeros((2, 5), jnp.float32)
    with pytest.raises(ValueError) as excinfo:
        call(x, jnp.zeros((2, 4), jnp.float32))
    assert_mentions_shapes(excinfo, (2, 5), (2, 4))
    # broadcast-compatible but different shapes are an error too
    with pytest.raises(ValueError) as excinfo:
        call(x, jnp.zeros((1, 5), jnp.float32))
    assert_mentions_shapes(excinfo, (2, 5), (1, 5))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("mode", ["eager", "jit", "eval_shape"])
def test_integer_shape_mismatch_raises(name, mode):
    call = _caller(INT_FNS[name](), mode)
    x = jnp.zeros((2, 5), jnp.float32)
    with pytest.raises(ValueError) as excinfo:
        call(x, jnp.zeros((3,), jnp.int32))
    assert_mentions_shapes(excinfo, (2, 5), (3,))
    with pytest.raises(ValueError) as excinfo:
        call(x, jnp.zeros((2, 1), jnp.int32))
    assert_mentions_shapes(excinfo, (2, 5), (2, 1))


@pytest.mark.parametrize("name", NAMES)
def test_integer_shape_checked_against_axis(name):
    fn = INT_FNS[name]()
    x = jax.ShapeDtypeStruct((4, 3), jnp.float32)
    yi = jax.ShapeDtypeStruct((3,), jnp.int32)
    assert jax.eval_shape(lambda a, b: fn(a, b, axis=0), x, yi).shape == (3,)
    assert jax.eval_shape(lambda a, b: fn(a, b, axis=-2), x, yi).shape == (3,)
    with pytest.raises(ValueError):  # axis=-1 expects labels of shape (4,)
        jax.eval_shape(lambda a, b: fn(a, b, axis=-1), x, yi)


@pytest.mark.parametrize("name", NAMES)
def test_non_floating_logits_raise(name):
    y = jnp.zeros((2, 3), jnp.float32)
    yi = jnp.zeros((2,), jnp.int32)
    for bad in (jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 3), bool)):
        with pytest.raises((TypeError, ValueError)):
            ONE_HOT_FNS[name]()(bad, y)
        with pytest.raises((TypeError, ValueError)):
            INT_FNS[name]()(bad, yi)


@pytest.mark.parametrize("name", NAMES)
def test_integer_variants_reject_non_integer_labels(name):
    x = jnp.zeros((2, 3), jnp.float32)
    for bad in (jnp.zeros((2,), jnp.float32), jnp.zeros((2,), bool)):
        with pytest.raises((TypeError, ValueError)):
            INT_FNS[name]()(x, bad)
    with pytest.raises((TypeError, ValueError)):
        jax.jit(INT_FNS[name]())(x, jnp.zeros((2,), jnp.float32))


# --------------------------------------------------------------------------
# Registry, re-exports, imports
# --------------------------------------------------------------------------


def test_registry_contents():
    assert isinstance(L.LOSS_NAMES, tuple)
    assert sorted(L.LOSS_NAMES) == sorted(NAMES)
    assert set(L.LOSSES) == set(NAMES)
    for name in NAMES:
        loss = L.get_loss(name)
        assert loss is L.LOSSES[name]
        assert isinstance(loss, L.Loss)
        assert loss.name == name
        assert dataclasses.is_dataclass(loss)
        with pytest.raises(dataclasses.FrozenInstanceError):
            loss.name = "other"  # type: ignore[misc]


@pytest.mark.parametrize("name", NAMES)
def test_registry_functions(name):
    loss = L.get_loss(name)
    rng = np.random.default_rng(7)
    x = jnp.asarray(make_logits(rng, (3, 4)))
    yi = jnp.asarray(make_int_labels(rng, (3, 4), -1))
    y = jax.nn.one_hot(yi, 4)
    npt.assert_allclose(loss.fn(x, y), REFS[name](x, y), rtol=1e-5, atol=1e-6)
    npt.assert_allclose(loss.with_integer_labels(x, yi), REFS[name](x, y), rtol=1e-5, atol=1e-6)
    x64 = to_f64(x)
    for axis in (-1, 0):
        probs = np.asarray(loss.probabilities(x, axis=axis))
        if name == "sigmoid_mse":
            expected = np_sigmoid(x64)
        else:
            e = np.exp(x64 - x64.max(axis=axis, keepdims=True))
            expected = e / e.sum(axis=axis, keepdims=True)
        assert probs.shape == x.shape
        npt.assert_allclose(probs, expected, rtol=1e-5, atol=1e-7)
    npt.assert_allclose(loss.probabilities(x), loss.probabilities(x, axis=-1))


def test_get_loss_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as excinfo:
        L.get_loss("hinge")
    for name in NAMES:
        assert name in str(excinfo.value)


def test_package_reexports():
    for fn_name in (
        "sigmoid_mse",
        "softmax_cross_entropy",
        "sigmoid_mse_with_integer_labels",
        "softmax_cross_entropy_with_integer_labels",
    ):
        assert getattr(softsig, fn_name) is getattr(L, fn_name)


ALLOWED_IMPORTS = {
    "jax",
    "jax.numpy",
    "dataclasses",
    "typing",
    "collections.abc",
    "functools",
    "math",
    "__future__",
}


def test_losses_module_imports_only_jax_and_stdlib():
    tree = ast.parse(pathlib.Path(L.__file__).read_text())
    imported = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import in softsig/losses.py"
            imported.append(node.module)
    # jax submodules (e.g. `import jax.nn`) are tolerated; nothing else.
    bad = [m for m in imported if m not in ALLOWED_IMPORTS and not m.startswith("jax.")]
    assert not bad, f"softsig/losses.py imports disallowed modules: {bad}"
