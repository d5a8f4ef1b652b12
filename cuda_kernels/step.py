"""Numba CUDA kernels of recurrent inference: one time step of a Mamba block.

Math
----
Convolution state ``s (Bt, C, W)`` holds the last ``W`` inputs, newest last::

    s[:, :, :-1] = s[:, :, 1:];  s[:, :, -1] = x_t
    out_t = silu(bias + sum_k weight[:, k] * s[:, :, k])

SSM state ``h (Bt, Dc, N)``, one step of the selective scan::

    delta = softplus(dt + dt_bias)
    h     = exp(delta * A) * h + delta * B_t * x_t
    y_t   = (<C_t, h> + D * x_t) * silu(z_t)

Canonical layout (C-contiguous, one float dtype)
-----------------------------------------------
==============  ========================================  ================
name            shape                                     notes
==============  ========================================  ================
x, dt, z, out   (Bt, C)                                   one step
conv_state      (Bt, C, W)                                updated in place
weight, bias    (C, W), (C,)
A               (Dc, N)
B, C            (Bt, 1, N) selective or (1, Dc, N) LTI    flag bit 4
D, dt_bias      (Dc,)                                     flag bits 0, 2
ssm_state       (Bt, Dc, N)                               updated in place
==============  ========================================  ================

One thread per (batch, channel): each step is tiny, the kernels exist to
update the states without a round trip of temporaries through memory.
"""

import functools
import math

import numba
import numpy as np
from numba import cuda, types

from ._common import dummy, launch

__all__ = ["THREADS", "conv_step", "get_kernels", "ptx_signatures", "ssm_step"]

THREADS = 128
FLAG_D, FLAG_Z, FLAG_BIAS, FLAG_SOFTPLUS, FLAG_VAR, FLAG_SILU = 1, 2, 4, 8, 16, 32


def _argtypes(ftype):
    t = numba.from_dtype(np.dtype(ftype))
    a1, a2, a3 = (types.Array(t, n, "C") for n in (1, 2, 3))
    i32 = types.int32
    conv = (a2, a3, a2, a1, i32, a2)  # x, conv_state, weight, bias, flags, out
    # x, dt, A, B, C, D, z, dt_bias, flags, ssm_state, out
    ssm = (a2, a2, a2, a3, a3, a1, a2, a1, i32, a3, a2)
    return conv, ssm


def _make_kernels(ftype):
    ftype = np.dtype(ftype).type
    zero = ftype(0.0)
    one = ftype(1.0)
    twenty = ftype(20.0)

    def conv_step(x, state, w, bias, flags, out):
        Bt, C, W = state.shape
        i = cuda.grid(1)
        if i >= Bt * C:
            return
        b = i // C
        c = i - b * C
        acc = bias[c] if (flags & FLAG_BIAS) != 0 else zero
        for k in range(W - 1):
            v = state[b, c, k + 1]
            state[b, c, k] = v
            acc += w[c, k] * v
        v = x[b, c]
        state[b, c, W - 1] = v
        acc += w[c, W - 1] * v
        if flags & FLAG_SILU:
            acc = acc / (one + math.exp(-acc))
        out[b, c] = acc

    def ssm_step(x, dt, A, B, C, D, z, dt_bias, flags, state, out):
        Bt, Dc, N = state.shape
        i = cuda.grid(1)
        if i >= Bt * Dc:
            return
        b = i // Dc
        d = i - b * Dc
        var = (flags & FLAG_VAR) != 0
        mb = b if var else 0
        md = 0 if var else d
        delta = dt[b, d]
        if flags & FLAG_BIAS:
            delta += dt_bias[d]
        if (flags & FLAG_SOFTPLUS) != 0 and delta <= twenty:
            delta = math.log1p(math.exp(delta))
        xv = x[b, d]
        y = zero
        for n in range(N):
            h = math.exp(delta * A[d, n]) * state[b, d, n] + delta * B[mb, md, n] * xv
            state[b, d, n] = h
            y += C[mb, md, n] * h
        if flags & FLAG_D:
            y += D[d] * xv
        if flags & FLAG_Z:
            zv = z[b, d]
            y *= zv / (one + math.exp(-zv))
        out[b, d] = y

    return conv_step, ssm_step


@functools.lru_cache(maxsize=None)
def get_kernels(dtype):
    """Compiled ``(conv_step, ssm_step)`` kernels for ``dtype`` (cached)."""
    conv_py, ssm_py = _make_kernels(np.dtype(dtype))
    conv_t, ssm_t = _argtypes(dtype)
    return cuda.jit(types.void(*conv_t))(conv_py), cuda.jit(types.void(*ssm_t))(ssm_py)


def ptx_signatures():
    """Yield ``(name, py_func, argtypes, is_float32, launch_bounds)`` of every kernel."""
    for dtype in (np.dtype(np.float32), np.dtype(np.float64)):
        conv_py, ssm_py = _make_kernels(dtype)
        conv_t, ssm_t = _argtypes(dtype)
        yield (f"conv_step_{dtype.name}", conv_py, conv_t, dtype == np.float32, ())
        yield (f"ssm_step_{dtype.name}", ssm_py, ssm_t, dtype == np.float32, ())


def _grid(n):
    return max(1, (n + THREADS - 1) // THREADS)


def conv_step(x, conv_state, weight, bias, silu):
    """Shift ``x (Bt, C)`` into ``conv_state (Bt, C, W)`` in place; return the conv output."""
    import cupy

    conv, _ = get_kernels(x.dtype)
    out = cupy.empty_like(x)
    flags = np.int32((FLAG_BIAS if bias is not None else 0) | (FLAG_SILU if silu else 0))
    bias = dummy(cupy, x.dtype, 1) if bias is None else bias
    launch(conv, _grid(x.shape[0] * x.shape[1]), THREADS, "current",
           (x, conv_state, weight, bias, flags, out))
    return out


def ssm_step(x, dt, A, B, C, D, z, dt_bias, softplus, ssm_state, variable):
    """Advance ``ssm_state (Bt, Dc, N)`` in place; return ``y (Bt, Dc)``.

    ``B`` and ``C`` are ``(Bt, N)`` when ``variable`` (selective), else ``(Dc, N)``.
    """
    import cupy

    _, ssm = get_kernels(x.dtype)
    Bt, Dc, N = ssm_state.shape
    shape3 = (Bt, 1, N) if variable else (1, Dc, N)
    flags = ((FLAG_D if D is not None else 0) | (FLAG_Z if z is not None else 0)
             | (FLAG_BIAS if dt_bias is not None else 0) | (FLAG_SOFTPLUS if softplus else 0)
             | (FLAG_VAR if variable else 0))
    d1 = dummy(cupy, x.dtype, 1)
    d2 = dummy(cupy, x.dtype, 2)
    out = cupy.empty_like(x)
    launch(ssm, _grid(Bt * Dc), THREADS, "current",
           (x, dt, A, cupy.ascontiguousarray(B).reshape(shape3),
            cupy.ascontiguousarray(C).reshape(shape3), d1 if D is None else D,
            d2 if z is None else z, d1 if dt_bias is None else dt_bias, np.int32(flags),
            ssm_state, out))
    return out
