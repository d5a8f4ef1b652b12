"""Layers (CPU): every backward against central finite differences in float64.

Each check draws a random upstream gradient ``R`` and compares the layer's
backward with the central difference of ``sum(R * forward(...))`` in every
entry of every input.  Forward oracles that are not our code are used where
one exists (``scipy.signal.lfilter`` for the causal convolution).
"""

import numpy as np
import pytest
import scipy.signal
import scipy.special

from numba_mamba import layers

FD_EPS = 1e-6
FD_TOL = dict(rtol=1e-6, atol=1e-8)  # central differences in float64: O(eps**2) + roundoff


def numeric_grad(f, arrays, name, eps=FD_EPS):
    """Central-difference gradient of the scalar ``f()`` w.r.t. ``arrays[name]`` (in place)."""
    x = arrays[name]
    g = np.zeros_like(x, dtype=np.float64)
    flat, gflat = x.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        fp = f()
        flat[i] = old - eps
        fm = f()
        flat[i] = old
        gflat[i] = (fp - fm) / (2 * eps)
    return g


def assert_grads_match(name, analytic, numeric, rtol=FD_TOL["rtol"], atol=FD_TOL["atol"]):
    analytic = np.asarray(analytic, dtype=np.float64)
    assert analytic.shape == numeric.shape, f"{name}: shape {analytic.shape} != {numeric.shape}"
    err = np.max(np.abs(analytic - numeric)) if numeric.size else 0.0
    scale = np.max(np.abs(numeric)) if numeric.size else 0.0
    np.testing.assert_allclose(analytic, numeric, rtol=rtol, atol=atol + 1e-7 * scale,
                               err_msg=f"{name}: max abs error {err:.3g} (scale {scale:.3g})")


def check_layer(forward, backward, arrays, rng, names, **options):
    """Compare ``backward`` with finite differences for every array in ``names``."""
    out, cache = forward(**arrays, **options)
    R = rng.standard_normal(out.shape)
    grads = backward(R, cache)
    grads = grads if isinstance(grads, tuple) else (grads,)
    order = list(arrays)

    def f():
        return float((forward(**arrays, **options)[0] * R).sum())

    for name in names:
        assert_grads_match(f"d{name}", grads[order.index(name)], numeric_grad(f, arrays, name))


# ---------------------------------------------------------------- Linear


@pytest.mark.parametrize("axis", [-1, -2])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_backward_matches_finite_differences(axis, bias):
    rng = np.random.default_rng(1)
    shape = (2, 5, 3) if axis == -1 else (2, 3, 5)
    arrays = dict(x=rng.standard_normal(shape), weight=rng.standard_normal((4, 3)),
                  bias=rng.standard_normal(4) if bias else None)
    names = ["x", "weight"] + (["bias"] if bias else [])
    check_layer(layers.linear_forward, layers.linear_backward, arrays, rng, names, axis=axis)


def test_linear_channels_first_equals_features_last_transposed():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 6, 3))
    w, b = rng.standard_normal((4, 3)), rng.standard_normal(4)
    last, _ = layers.linear_forward(x, w, b)
    first, _ = layers.linear_forward(np.ascontiguousarray(x.transpose(0, 2, 1)), w, b, axis=-2)
    np.testing.assert_allclose(first.transpose(0, 2, 1), last, rtol=1e-13, atol=1e-13)


def test_linear_backward_of_transposed_view_matches_contiguous_copy():
    # the block feeds out_proj a transposed view; the gradients must not depend on it
    rng = np.random.default_rng(3)
    y = rng.standard_normal((2, 3, 7))  # (Bt, d, L)
    w = rng.standard_normal((5, 3))
    R = rng.standard_normal((2, 7, 5))
    g_view = layers.linear_backward(R, layers.linear_forward(y.transpose(0, 2, 1), w)[1])
    g_copy = layers.linear_backward(
        R, layers.linear_forward(np.ascontiguousarray(y.transpose(0, 2, 1)), w)[1])
    for a, b in zip(g_view, g_copy):
        if a is not None:
            np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("axis, out_axis", [(-1, -2), (-2, -1)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_moving_the_features_matches_finite_differences(axis, out_axis, bias):
    rng = np.random.default_rng(5)
    shape = (2, 5, 3) if axis == -1 else (2, 3, 5)
    arrays = dict(x=rng.standard_normal(shape), weight=rng.standard_normal((4, 3)),
                  bias=rng.standard_normal(4) if bias else None)
    names = ["x", "weight"] + (["bias"] if bias else [])
    check_layer(layers.linear_forward, layers.linear_backward, arrays, rng, names, axis=axis,
                out_axis=out_axis)


@pytest.mark.parametrize("axis, out_axis", [(-1, -2), (-2, -1)])
def test_linear_moving_the_features_equals_a_transpose_of_the_result(axis, out_axis):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 6, 3) if axis == -1 else (2, 3, 6))
    w, b = rng.standard_normal((4, 3)), rng.standard_normal(4)
    moved, _ = layers.linear_forward(x, w, b, axis=axis, out_axis=out_axis)
    kept, _ = layers.linear_forward(x, w, b, axis=axis)
    assert moved.flags.c_contiguous
    np.testing.assert_allclose(moved, kept.transpose(0, 2, 1), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("axis,out_axis", [(-1, -1), (-2, -2), (-1, -2), (-2, -1)])
def test_linear_backward_adds_dx_to_dx_add_in_place(axis, out_axis):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 5, 6) if axis == -1 else (2, 6, 5))
    w = rng.standard_normal((4, 6))
    out, cache = layers.linear_forward(x, w, axis=axis, out_axis=out_axis)
    dout = rng.standard_normal(out.shape)
    dx, dw, _ = layers.linear_backward(dout, cache)
    acc = rng.standard_normal(x.shape)
    before = acc.copy()
    dx2, dw2, _ = layers.linear_backward(dout, cache, dx_add=acc)
    assert dx2 is acc
    np.testing.assert_allclose(acc, before + dx, rtol=1e-14, atol=1e-14)
    np.testing.assert_array_equal(dw2, dw)
    with pytest.raises(ValueError, match="dx_add"):
        layers.linear_backward(dout, cache, dx_add=np.zeros((3,) + x.shape[1:]))


def test_linear_rejects_unknown_out_axis():
    with pytest.raises(ValueError, match=r"^out_axis must be -1 or -2, got 1"):
        layers.linear_forward(np.zeros((3, 4)), np.zeros((5, 4)), out_axis=1)


def test_linear_rejects_wrong_feature_count():
    with pytest.raises(ValueError, match=r"^x must have 3 features along axis -1"):
        layers.linear_forward(np.zeros((2, 4)), np.zeros((5, 3)))


def test_linear_rejects_unknown_axis():
    with pytest.raises(ValueError, match=r"^axis must be -1 or -2, got 0"):
        layers.linear_forward(np.zeros((3, 4)), np.zeros((5, 3)), axis=0)


def test_linear_rejects_float16():
    with pytest.raises(TypeError, match=r"^x must have dtype float32 or float64, got float16"):
        layers.linear_forward(np.zeros((2, 3), np.float16), np.zeros((5, 3), np.float16))


def test_linear_rejects_mixed_dtypes():
    with pytest.raises(TypeError, match=r"^weight must have the dtype of x"):
        layers.linear_forward(np.zeros((2, 3)), np.zeros((5, 3), np.float32))


# ---------------------------------------------------------------- Embedding


def test_embedding_backward_matches_finite_differences():
    rng = np.random.default_rng(4)
    ids = np.array([[0, 3, 3], [4, 0, 1]])
    arrays = dict(weight=rng.standard_normal((5, 3)))
    out, cache = layers.embedding_forward(ids, arrays["weight"])
    R = rng.standard_normal(out.shape)
    dweight = layers.embedding_backward(R, cache)

    def f():
        return float((layers.embedding_forward(ids, arrays["weight"])[0] * R).sum())

    assert_grads_match("dweight", dweight, numeric_grad(f, arrays, "weight"))
    assert not dweight[2].any()  # id 2 never occurs


def test_embedding_rejects_out_of_range_ids():
    with pytest.raises(ValueError, match=r"^ids must lie in \[0, 5\)"):
        layers.embedding_forward(np.array([1, 5]), np.zeros((5, 2)))


def test_embedding_rejects_float_ids():
    with pytest.raises(TypeError, match=r"^ids must have an integer dtype"):
        layers.embedding_forward(np.array([1.0]), np.zeros((5, 2)))


# ---------------------------------------------------------------- RMSNorm


def test_rmsnorm_backward_matches_finite_differences():
    rng = np.random.default_rng(5)
    arrays = dict(x=rng.standard_normal((2, 3, 6)), weight=rng.standard_normal(6))
    check_layer(layers.rmsnorm_forward, layers.rmsnorm_backward, arrays, rng, ["x", "weight"],
                eps=1e-5)


def test_rmsnorm_output_has_unit_rms_with_unit_weight():
    x = np.random.default_rng(6).standard_normal((4, 16)) * 7.0
    out, _ = layers.rmsnorm_forward(x, np.ones(16), eps=0.0)
    np.testing.assert_allclose(np.sqrt((out ** 2).mean(-1)), 1.0, rtol=1e-12)


def _rmsnorm_float64(x, w, dout, eps):
    """(out, dx, dweight) of RMSNorm in float64 from the formulas of rmsnorm_backward's docstring."""
    x, w, dout = (a.astype(np.float64) for a in (x, w, dout))
    rstd = 1 / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    xhat, g = x * rstd, dout * w
    dx = rstd * (g - xhat * (g * xhat).mean(-1, keepdims=True))
    return xhat * w, dx, (dout * xhat).reshape(-1, x.shape[-1]).sum(0)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape, strided", [((3, 7, 64), False), ((5, 130), True), ((9,), False),
                                            ((70, 3), False)])
def test_rmsnorm_cpu_kernels_match_float64_formulas(dtype, shape, strided):
    """The Numba rows (vectorized sums, tasks of 64 rows for dweight) against NumPy in float64,
    on a strided ``x`` too; ``dx_add`` receives ``dx`` in place."""
    rng = np.random.default_rng(len(shape) * 100 + shape[-1])
    full = rng.standard_normal(shape[:-1] + (2 * shape[-1],) if strided else shape) * 3
    x = (full[..., ::2] if strided else full).astype(dtype)
    w = rng.uniform(0.5, 1.5, shape[-1]).astype(dtype)
    dout = rng.standard_normal(shape).astype(dtype)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == np.float64 else dict(rtol=2e-5, atol=2e-5)
    want = _rmsnorm_float64(x, w, dout, 1e-5)
    out, cache = layers.rmsnorm_forward(x, w, 1e-5)
    dx, dw = layers.rmsnorm_backward(dout, cache)
    for name, got, ref in zip(("out", "dx", "dweight"), (out, dx, dw), want):
        assert got.dtype == dtype and got.shape == ref.shape, name
        scale = np.sqrt(x.size / shape[-1]) if name == "dweight" else 1.0  # a sum over rows
        np.testing.assert_allclose(got, ref, rtol=tol["rtol"], atol=tol["atol"] * scale,
                                   err_msg=name)
    acc = rng.standard_normal(shape).astype(dtype)
    before = acc.copy()
    dx2, dw2 = layers.rmsnorm_backward(dout, cache, dx_add=acc)
    assert dx2 is acc
    np.testing.assert_array_equal(acc, before + dx)
    np.testing.assert_array_equal(dw2, dw)
    strided = np.repeat(before, 2, axis=-1)[..., ::2]  # dx_add not C-contiguous
    assert layers.rmsnorm_backward(dout, cache, dx_add=strided)[0] is strided
    np.testing.assert_array_equal(strided, before + dx)


def test_rmsnorm_backward_rejects_dx_add_of_another_shape():
    out, cache = layers.rmsnorm_forward(np.ones((2, 4)), np.ones(4))
    with pytest.raises(ValueError, match=r"dx_add"):
        layers.rmsnorm_backward(out, cache, dx_add=np.zeros((2, 5)))


# ---------------------------------------------------------------- causal depthwise Conv1d


@pytest.mark.parametrize("W,L", [(1, 5), (4, 9), (4, 2), (5, 5)])
def test_conv1d_matches_scipy_lfilter(W, L):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 3, L))
    w = rng.standard_normal((3, W))
    b = rng.standard_normal(3)
    out, _ = layers.conv1d_forward(x, w, b)
    want = np.stack([np.stack([scipy.signal.lfilter(w[c, ::-1], [1.0], x[i, c]) + b[c]
                               for c in range(3)]) for i in range(2)])
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12)
    out_silu, _ = layers.conv1d_forward(x, w, b, activation="silu")
    np.testing.assert_allclose(out_silu, want * scipy.special.expit(want), rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("W,L", [(4, 7), (3, 2)])
def test_conv1d_backward_matches_finite_differences(activation, bias, W, L):
    rng = np.random.default_rng(8)
    arrays = dict(x=rng.standard_normal((2, 3, L)), weight=rng.standard_normal((3, W)),
                  bias=rng.standard_normal(3) if bias else None)
    names = ["x", "weight"] + (["bias"] if bias else [])
    check_layer(layers.conv1d_forward, layers.conv1d_backward, arrays, rng, names,
                activation=activation)


def test_conv1d_float32_matches_float64():
    rng = np.random.default_rng(9)
    x = rng.standard_normal((2, 8, 50))
    w, b = rng.standard_normal((8, 4)), rng.standard_normal(8)
    R = rng.standard_normal(x.shape)
    o64, c64 = layers.conv1d_forward(x, w, b, activation="silu")
    o32, c32 = layers.conv1d_forward(*(a.astype(np.float32) for a in (x, w, b)),
                                     activation="silu")
    assert o32.dtype == np.float32
    np.testing.assert_allclose(o32, o64, rtol=1e-5, atol=1e-5)
    for g32, g64 in zip(layers.conv1d_backward(R.astype(np.float32), c32),
                        layers.conv1d_backward(R, c64)):
        assert g32.dtype == np.float32
        np.testing.assert_allclose(g32, g64, rtol=1e-4, atol=1e-4)


def test_conv1d_rejects_mismatched_weight_shape():
    with pytest.raises(ValueError, match=r"^weight must have shape \(3, W\)"):
        layers.conv1d_forward(np.zeros((1, 3, 5)), np.zeros((4, 4)))


def test_conv1d_rejects_unknown_activation():
    with pytest.raises(ValueError, match=r"^activation must be one of"):
        layers.conv1d_forward(np.zeros((1, 3, 5)), np.zeros((3, 4)), activation="relu")


def test_conv1d_rejects_2d_input():
    with pytest.raises(ValueError, match=r"^x must have 3 dims"):
        layers.conv1d_forward(np.zeros((3, 5)), np.zeros((3, 4)))


# ---------------------------------------------------------------- SiLU and softplus


def test_silu_and_softplus_match_scipy():
    x = np.linspace(-30, 30, 121)
    np.testing.assert_allclose(layers.silu_forward(x)[0], x * scipy.special.expit(x),
                               rtol=1e-13, atol=1e-300)
    sp = layers.softplus_forward(x)[0]
    np.testing.assert_allclose(sp, np.logaddexp(0.0, x), rtol=3e-9, atol=0)  # cut-off at 20


@pytest.mark.parametrize("name", ["silu", "softplus"])
def test_activation_backward_matches_finite_differences(name):
    rng = np.random.default_rng(10)
    arrays = dict(x=rng.standard_normal((3, 7)) * 3)
    check_layer(getattr(layers, f"{name}_forward"), getattr(layers, f"{name}_backward"),
                arrays, rng, ["x"])


def test_activations_keep_float32():
    x = np.linspace(-5, 5, 11, dtype=np.float32)
    for name in ("silu", "softplus"):
        out, cache = getattr(layers, f"{name}_forward")(x)
        dx = getattr(layers, f"{name}_backward")(np.ones_like(x), cache)
        assert out.dtype == np.float32 and dx.dtype == np.float32


# ---------------------------------------------------------------- selective scan layer


def test_scan_layer_backward_matches_finite_differences_including_last_state():
    rng = np.random.default_rng(11)
    Bt, D, L, N = 1, 2, 6, 3
    arrays = dict(u=rng.standard_normal((Bt, D, L)), delta=rng.uniform(-1, 0.5, (Bt, D, L)),
                  A=-rng.uniform(0.5, 2, (D, N)), B=rng.standard_normal((Bt, N, L)),
                  C=rng.standard_normal((Bt, N, L)), D=rng.standard_normal(D),
                  z=rng.standard_normal((Bt, D, L)), delta_bias=rng.standard_normal(D))
    out, last, cache = layers.selective_scan_forward(**arrays, delta_softplus=True)
    R, S = rng.standard_normal(out.shape), rng.standard_normal(last.shape)
    grads = layers.selective_scan_backward(R, cache, dlast_state=S)

    def f():
        o, h, _ = layers.selective_scan_forward(**arrays, delta_softplus=True)
        return float((o * R).sum() + (h * S).sum())

    for name in arrays:
        assert_grads_match(f"d{name}", getattr(grads, f"d{name}"), numeric_grad(f, arrays, name))


@pytest.mark.parametrize("channel", [0, 2])
def test_conv1d_backward_writes_dx_into_a_channel_range_of_dx_out(channel):
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 3, 7))
    w = rng.standard_normal((3, 4))
    out, cache = layers.conv1d_forward(x, w, rng.standard_normal(3), activation="silu")
    dout = rng.standard_normal(out.shape)
    dx, dw, db = layers.conv1d_backward(dout, cache)
    joint = np.full((2, 6, 7), np.nan)
    dx2, dw2, db2 = layers.conv1d_backward(dout, cache, dx_out=joint, dx_channel=channel)
    np.testing.assert_array_equal(dx2, dx)
    np.testing.assert_array_equal(joint[:, channel:channel + 3], dx)
    assert np.isnan(np.delete(joint, range(channel, channel + 3), axis=1)).all()
    np.testing.assert_array_equal(dw2, dw)
    np.testing.assert_array_equal(db2, db)
    with pytest.raises(ValueError, match="dx_out must have shape"):
        layers.conv1d_backward(dout, cache, dx_out=joint, dx_channel=4)
    with pytest.raises(ValueError, match="dx_out must be C-contiguous of dtype float64"):
        layers.conv1d_backward(dout, cache, dx_out=joint.astype(np.float32))
