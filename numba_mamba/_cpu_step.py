"""CPU backend of recurrent inference: one time step of a Mamba block, fused.

Two Numba ``@njit(parallel=True)`` kernels update a layer's states in place,
one parallel task per (batch, channel); the projections between them are
matmuls done by the caller (:mod:`numba_mamba.inference`).

Math
----
Convolution state ``s (Bt, C, W)``: the last ``W`` inputs, newest last::

    s[:, :, :-1] = s[:, :, 1:];  s[:, :, -1] = x_t
    out_t = silu(bias + sum_k weight[:, k] * s[:, :, k])      (the causal conv at t)

SSM state ``h (Bt, Dc, N)``, as one step of the selective scan::

    delta = softplus(dt + dt_bias)
    h     = exp(delta * A) * h + delta * B_t * x_t
    y_t   = (<C_t, h> + D * x_t) * silu(z_t)

Canonical layout
----------------
=========================  ========================================  ==========
name                       shape                                     notes
=========================  ========================================  ==========
x, dt, z, out              (Bt, C)                                   one step
conv_state                 (Bt, C, W)                                in place
weight / bias              (C, W) / (C,)
A                          (Dc, N)
B, C                       (Bt, 1, N) selective or (1, Dc, N) LTI    3-D view
D, dt_bias                 (Dc,)
ssm_state                  (Bt, Dc, N)                               in place
=========================  ========================================  ==========
"""

import numpy as np
from numba import njit, prange

__all__ = ["conv_step", "ssm_step"]


@njit(parallel=True, cache=True)
def _conv_step_kernel(x, state, w, bias, has_bias, silu, out):
    Bt, C, W = state.shape
    one = x.dtype.type(1)
    for bc in prange(Bt * C):
        b = bc // C
        c = bc - b * C
        acc = bias[c] if has_bias else x.dtype.type(0)
        for k in range(W - 1):
            v = state[b, c, k + 1]
            state[b, c, k] = v
            acc += w[c, k] * v
        v = x[b, c]
        state[b, c, W - 1] = v
        acc += w[c, W - 1] * v
        if silu:
            acc = acc / (one + np.exp(-acc))
        out[b, c] = acc


@njit(parallel=True, cache=True)
def _ssm_step_kernel(x, dt, A, B, C, D, z, dt_bias, b_var, c_var, has_D, has_z, has_bias,
                     softplus, state, out):
    Bt, Dc, N = state.shape
    zero = x.dtype.type(0)
    one = x.dtype.type(1)
    twenty = x.dtype.type(20)
    for bd in prange(Bt * Dc):
        b = bd // Dc
        d = bd - b * Dc
        bb, bd_ = (b, 0) if b_var else (0, d)
        cb, cd_ = (b, 0) if c_var else (0, d)
        delta = dt[b, d]
        if has_bias:
            delta += dt_bias[d]
        if softplus and delta <= twenty:
            delta = np.log1p(np.exp(delta))
        xv = x[b, d]
        y = zero
        for n in range(N):
            h = np.exp(delta * A[d, n]) * state[b, d, n] + delta * B[bb, bd_, n] * xv
            state[b, d, n] = h
            y += C[cb, cd_, n] * h
        if has_D:
            y += D[d] * xv
        if has_z:
            zv = z[b, d]
            y *= zv / (one + np.exp(-zv))
        out[b, d] = y


def _dummy(ndim, dtype):
    return np.zeros((1,) * ndim, dtype=dtype)


def conv_step(x, conv_state, weight, bias, silu):
    """Shift ``x (Bt, C)`` into ``conv_state (Bt, C, W)`` in place; return the conv output."""
    out = np.empty_like(x)
    _conv_step_kernel(x, conv_state, weight, _dummy(1, x.dtype) if bias is None else bias,
                      bias is not None, bool(silu), out)
    return out


def ssm_step(x, dt, A, B, C, D, z, dt_bias, softplus, ssm_state, variable):
    """Advance ``ssm_state (Bt, Dc, N)`` in place by one step; return ``y (Bt, Dc)``.

    ``B`` and ``C`` are ``(Bt, N)`` when ``variable`` (selective) or ``(Dc, N)``
    (LTI).
    """
    Bt, Dc, N = ssm_state.shape
    shape3 = (Bt, 1, N) if variable else (1, Dc, N)
    out = np.empty_like(x)
    _ssm_step_kernel(x, dt, A, B.reshape(shape3), C.reshape(shape3),
                     _dummy(1, x.dtype) if D is None else D,
                     _dummy(2, x.dtype) if z is None else z,
                     _dummy(1, x.dtype) if dt_bias is None else dt_bias,
                     bool(variable), bool(variable), D is not None, z is not None,
                     dt_bias is not None, bool(softplus), ssm_state, out)
    return out
