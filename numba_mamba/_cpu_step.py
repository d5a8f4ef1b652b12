"""CPU backend of recurrent inference: one time step of a Mamba model, fused.

The same functions, with the same arguments, as ``cuda_kernels/step.py``
(whose docstring has the math and the layout): two Numba ``@njit(parallel=True)``
kernels update a layer's states in place, one parallel task per (batch,
channel), and the residual add with RMSNorm is NumPy; the projections between
them are matmuls done by the caller (:mod:`numba_mamba.inference`).

Math
----
Convolution state ``s (Bt, C, W)``: the last ``W`` inputs, newest last::

    s[:, :, :-1] = s[:, :, 1:];  s[:, :, -1] = x_t
    out_t = silu(bias + sum_k weight[:, k] * s[:, :, k])      (the causal conv at t)

SSM state ``h (Bt, Dc, N)``, one step of the selective scan; ``dt``,
``B_t`` and ``C_t`` are read from ``x_proj``'s output ``x_dbl (Bt, R + 2N)``
(``dt_proj`` folded in), the gate ``z`` from ``in_proj``'s output ``xz``::

    delta = softplus(sum_r dt_weight[:, r] * x_dbl[:, r] + dt_bias)   (LTI: softplus(dt_bias))
    h     = exp(delta * A) * h + delta * B_t * x_t
    y_t   = (<C_t, h> + D * x_t) * silu(z_t)
"""

import numpy as np
from numba import njit, prange

__all__ = ["conv_step", "residual_rmsnorm", "ssm_step"]


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
def _ssm_step_kernel(x, xz, x_dbl, dt_w, dt_bias, A, Bm, Cm, D, var, has_D, has_z, state, out):
    Bt, Dc, N = state.shape
    zero = x.dtype.type(0)
    one = x.dtype.type(1)
    twenty = x.dtype.type(20)
    R = dt_w.shape[1]
    for bd in prange(Bt * Dc):
        b = bd // Dc
        d = bd - b * Dc
        delta = zero
        if var:
            for r in range(R):
                delta += dt_w[d, r] * x_dbl[b, r]
        delta += dt_bias[d]
        if delta <= twenty:
            delta = np.log1p(np.exp(delta))
        xv = x[b, d]
        y = zero
        for n in range(N):
            if var:
                bn = x_dbl[b, R + n]
                cn = x_dbl[b, R + N + n]
            else:
                bn = Bm[d, n]
                cn = Cm[d, n]
            h = np.exp(delta * A[d, n]) * state[b, d, n] + delta * bn * xv
            state[b, d, n] = h
            y += cn * h
        if has_D:
            y += D[d] * xv
        if has_z:
            zv = xz[b, Dc + d]
            y *= zv / (one + np.exp(-zv))
        out[b, d] = y


def _dummy(ndim, dtype):
    return np.zeros((1,) * ndim, dtype=dtype)


def conv_step(x, conv_state, weight, bias, silu, out=None):
    """Shift ``x``'s first ``C`` columns into ``conv_state (Bt, C, W)`` in place;
    return the conv output ``(Bt, C)`` (in ``out`` where given)."""
    Bt, C, _ = conv_state.shape
    out = np.empty((Bt, C), x.dtype) if out is None else out
    _conv_step_kernel(x, conv_state, weight, _dummy(1, x.dtype) if bias is None else bias,
                      bias is not None, bool(silu), out)
    return out


def ssm_step(x, xz, x_dbl, dt_weight, dt_bias, A, B, C, D, ssm_state, out=None):
    """Advance ``ssm_state (Bt, Dc, N)`` in place; return ``y (Bt, Dc)`` (in ``out``
    where given).  Arguments as ``cuda_kernels.step.ssm_step``: selective with
    ``x_dbl`` and ``dt_weight``, LTI with ``B`` and ``C``; ``xz`` and ``D`` may
    be None."""
    Bt, Dc, _ = ssm_state.shape
    var = x_dbl is not None
    d1, d2 = _dummy(1, x.dtype), _dummy(2, x.dtype)
    out = np.empty((Bt, Dc), x.dtype) if out is None else out
    _ssm_step_kernel(x, d2 if xz is None else xz, x_dbl if var else d2,
                     dt_weight if var else d2, dt_bias, A, d2 if var else B, d2 if var else C,
                     d1 if D is None else D, var, D is not None, xz is not None, ssm_state, out)
    return out


def residual_rmsnorm(h, hn, weight, eps, delta=None, tokens=None, table=None):
    """``hn = rmsnorm(h) * weight`` per row of ``h (Bt, d)``, after ``h`` is set to
    ``table[tokens]`` (``tokens`` given) or to ``h + delta`` (``delta`` given), in
    place: the arithmetic of :func:`numba_mamba.layers.rmsnorm_forward`."""
    if tokens is not None:
        np.take(table, tokens, axis=0, out=h)
    elif delta is not None:
        h += delta
    rstd = 1 / np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + eps)
    np.multiply(h * rstd, weight, out=hn)
    return hn
