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

import functools
import math

import numpy as np
from numba import njit, prange

from ._cpu_threads import serial_below
from ._math import cpu

__all__ = ["conv_step", "residual_rmsnorm", "ssm_step", "step_cells"]


def step_cells(ftype, jit, fns):
    """``(conv_cell, ssm_cell)`` compiled by ``jit`` (``numba.njit`` here, a CUDA
    device-function decorator in ``cuda_kernels/step.py``): one source of the
    step's arithmetic for both targets, constants in ``ftype``.  ``fns`` holds
    the activations, :mod:`numba_mamba._math`'s bodies compiled for the same
    target (:data:`numba_mamba._math.cpu` here, inlined where they are called).

    ``conv_cell(x, state, w, bias, has_bias, act, out, b, c)`` (``act``: apply
    SiLU) and
    ``ssm_cell(x, xz, x_dbl, dt_w, dt_bias, A, Bm, Cm, D, var, has_D, has_z,
    state, out, b, d)`` each update one (batch, channel) of the module's math.
    """
    zero = np.dtype(ftype).type(0.0)
    silu, softplus = fns.silu, fns.softplus

    def conv_cell(x, state, w, bias, has_bias, act, out, b, c):
        W = state.shape[2]
        acc = bias[c] if has_bias else zero
        for k in range(W - 1):
            v = state[b, c, k + 1]
            state[b, c, k] = v
            acc += w[c, k] * v
        v = x[b, c]
        state[b, c, W - 1] = v
        acc += w[c, W - 1] * v
        if act:
            acc = silu(acc)
        out[b, c] = acc

    def ssm_cell(x, xz, x_dbl, dt_w, dt_bias, A, Bm, Cm, D, var, has_D, has_z, state, out,
                 b, d):
        Dc, N = state.shape[1], state.shape[2]
        R = dt_w.shape[1]
        delta = zero
        if var:
            for r in range(R):
                delta += dt_w[d, r] * x_dbl[b, r]
        delta = softplus(delta + dt_bias[d])
        xv = x[b, d]
        y = zero
        for n in range(N):
            if var:
                bn = x_dbl[b, R + n]
                cn = x_dbl[b, R + N + n]
            else:
                bn = Bm[d, n]
                cn = Cm[d, n]
            h = math.exp(delta * A[d, n]) * state[b, d, n] + delta * bn * xv
            state[b, d, n] = h
            y += cn * h
        if has_D:
            y += D[d] * xv
        if has_z:
            y *= silu(xz[b, Dc + d])
        out[b, d] = y

    return jit(conv_cell), jit(ssm_cell)


@functools.lru_cache(maxsize=None)
def _step_kernels(dtype):
    """The two parallel kernels for ``dtype``: one task per (batch, channel)."""
    conv_cell, ssm_cell = step_cells(dtype, njit, cpu)

    @njit(parallel=True)
    def conv_kernel(x, state, w, bias, has_bias, silu, out):
        Bt, C = state.shape[0], state.shape[1]
        for bc in prange(Bt * C):
            b = bc // C
            conv_cell(x, state, w, bias, has_bias, silu, out, b, bc - b * C)

    @njit(parallel=True)
    def ssm_kernel(x, xz, x_dbl, dt_w, dt_bias, A, Bm, Cm, D, var, has_D, has_z, state, out):
        Bt, Dc = state.shape[0], state.shape[1]
        for bd in prange(Bt * Dc):
            b = bd // Dc
            ssm_cell(x, xz, x_dbl, dt_w, dt_bias, A, Bm, Cm, D, var, has_D, has_z, state, out,
                     b, bd - b * Dc)

    return conv_kernel, ssm_kernel


def _dummy(ndim, dtype):
    return np.zeros((1,) * ndim, dtype=dtype)


def conv_step(x, conv_state, weight, bias, silu, out=None):
    """Shift ``x``'s first ``C`` columns into ``conv_state (Bt, C, W)`` in place;
    return the conv output ``(Bt, C)`` (in ``out`` where given)."""
    Bt, C, _ = conv_state.shape
    out = np.empty((Bt, C), x.dtype) if out is None else out
    with serial_below(conv_state.size):
        _step_kernels(x.dtype)[0](x, conv_state, weight,
                                  _dummy(1, x.dtype) if bias is None else bias,
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
    with serial_below(ssm_state.size):
        _step_kernels(x.dtype)[1](x, d2 if xz is None else xz, x_dbl if var else d2,
                                  dt_weight if var else d2, dt_bias, A, d2 if var else B,
                                  d2 if var else C, d1 if D is None else D, var, D is not None,
                                  xz is not None, ssm_state, out)
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
