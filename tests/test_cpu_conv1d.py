"""The CPU convolution kernels (``numba_mamba._cpu_conv1d``) at lengths where
their loops run vectorized bodies and remainders, against the formulas of the
module docstring evaluated in float64 with NumPy."""

import numpy as np
import pytest
import scipy.special

from numba_mamba import _cpu_conv1d

TOL = {np.float64: dict(rtol=1e-12, atol=1e-12), np.float32: dict(rtol=2e-5, atol=2e-5)}


def _formulas(x, w, bias, silu, dout):
    """(out, dx, dweight, dbias) in float64 from the module docstring's sums."""
    x, w, dout = (a.astype(np.float64) for a in (x, w, dout))
    Bt, C, L = x.shape
    W = w.shape[1]
    xp = np.concatenate([np.zeros((Bt, C, W - 1)), x], axis=-1)  # zeros before t = 0
    pre = sum(w[None, :, k, None] * xp[..., k:k + L] for k in range(W))
    if bias is not None:
        pre = pre + bias.astype(np.float64)[None, :, None]
    s = scipy.special.expit(pre)
    out = pre * s if silu else pre
    g = dout * (s * (1 + pre * (1 - s))) if silu else dout
    gp = np.concatenate([g, np.zeros((Bt, C, W - 1))], axis=-1)  # zeros after t = L - 1
    dx = sum(w[None, :, k, None] * gp[..., W - 1 - k:W - 1 - k + L] for k in range(W))
    dw = np.stack([(g * xp[..., k:k + L]).sum(axis=(0, 2)) for k in range(W)], axis=1)
    return out, dx, dw, None if bias is None else g.sum(axis=(0, 2))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("W, L, silu, has_bias", [
    (4, 301, True, True), (4, 301, False, False), (1, 67, True, False), (5, 3, True, True),
    (3, 1, False, True)])
def test_kernels_match_the_formulas(dtype, W, L, silu, has_bias):
    rng = np.random.default_rng(W * 1000 + L)
    Bt, C = 2, 5
    x = rng.standard_normal((Bt, C, L)).astype(dtype)
    w = (rng.standard_normal((C, W)) / np.sqrt(W)).astype(dtype)
    bias = rng.standard_normal(C).astype(dtype) if has_bias else None
    dout = rng.standard_normal((Bt, C, L)).astype(dtype)
    want = _formulas(x, w, bias, silu, dout)
    out = _cpu_conv1d.conv1d_forward(x, w, bias, silu)
    got = (out,) + _cpu_conv1d.conv1d_backward(dout, x, w, bias, silu)
    for name, g, r in zip(("out", "dx", "dweight", "dbias"), got, want):
        if r is None:
            assert g is None, name
            continue
        assert g.dtype == dtype, name
        # dweight and dbias sum over Bt * L terms: their scale grows with sqrt(Bt L)
        scale = np.sqrt(Bt * L) if name in ("dweight", "dbias") else 1.0
        np.testing.assert_allclose(g, r, rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"] * scale,
                                   err_msg=name)
