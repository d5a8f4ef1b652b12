"""Numba CUDA kernels of recurrent inference: one time step of a Mamba model.

A decode step of a model is, per layer, the residual add and RMSNorm
(:func:`residual_rmsnorm`), ``in_proj`` (a matmul, by the caller), the
convolution step (:func:`conv_step`), ``x_proj`` (a matmul) and the SSM step
with ``dt_proj`` folded in (:func:`ssm_step`), then ``out_proj`` (a matmul).
The kernels read the matmuls' outputs where they lie (``x`` and ``z`` in
``in_proj``'s output ``xz``, ``dt``, ``B`` and ``C`` in ``x_proj``'s output
``x_dbl``): no split copies.

Math
----
Residual and RMSNorm of a row ``h`` (``d`` features)::

    h  = embedding[token]  or  h + delta  or  h        (flags: embed, add)
    hn = h * (1 / sqrt(sum(h * h) / d + eps)) * weight

Convolution state ``s (Bt, C, W)`` holds the last ``W`` inputs, newest last::

    s[:, :, :-1] = s[:, :, 1:];  s[:, :, -1] = x_t
    out_t = silu(bias + sum_k weight[:, k] * s[:, :, k])

SSM state ``h (Bt, Dc, N)``, one step of the selective scan, ``R = dt_rank``::

    delta = softplus(sum_r dt_weight[:, r] * x_dbl[:, r] + dt_bias)   (LTI: softplus(dt_bias))
    B_t, C_t = x_dbl[:, R:R+N], x_dbl[:, R+N:]                       (LTI: the (Dc, N) B, C)
    h     = exp(delta * A) * h + delta * B_t * x_t
    y_t   = (<C_t, h> + D * x_t) * silu(z_t),   z_t = xz[:, Dc:]

Canonical layout (C-contiguous, one float dtype; tokens int64)
---------------------------------------------------------------
==============  ========================================  ==========================
name            shape                                     notes
==============  ========================================  ==========================
h, delta, hn    (Bt, d)                                   h updated in place
tokens, table   (Bt,), (V, d)                             embed flag; ids clamped
x, out          (Bt, C) or wider: x's first C columns     conv_step's x may be xz
conv_state      (Bt, C, W)                                updated in place
weight, bias    (C, W), (C,)
xz              (Bt, 2 Dc)                                z = its last Dc columns
x_dbl           (Bt, R + 2N)                              selective (flag)
dt_weight       (Dc, R)                                   selective
A, B, C         (Dc, N); B, C only for LTI
D, dt_bias      (Dc,)
ssm_state       (Bt, Dc, N)                               updated in place
==============  ========================================  ==========================

``residual_rmsnorm`` runs one block per row (a block-wide sum through shared
memory); the step kernels one thread per (batch, channel), their arithmetic
that of ``numba_mamba._cpu_step.step_cells`` (one source for the CPU and the
GPU, its activations those of ``numba_mamba._math``): each step is tiny, the
kernels exist to update the states without temporaries.  Token ids are not
checked here (a check would wait for the device): an id outside ``[0, V)``
reads the nearest row instead of memory outside the table.
"""

import functools
import math

import numba
import numpy as np
from numba import cuda, types

from .._cpu_step import step_cells
from ._common import (array_module, compile_kernel, device_math, dummy, inline_device, launch,
                      simulator)

__all__ = ["NORM_THREADS", "THREADS", "block_sum", "conv_step", "get_kernels", "ptx_signatures",
           "residual_rmsnorm", "ssm_step"]

THREADS = 128
NORM_THREADS = 128
FLAG_D, FLAG_Z, FLAG_BIAS, FLAG_VAR, FLAG_SILU = 1, 2, 4, 16, 32
FLAG_EMBED, FLAG_ADD = 1, 2  # residual_rmsnorm


def block_sum(threads):
    """Device function ``total = sum(sh, v, t)``: the sum of ``v`` over a block
    of ``threads`` threads (a power of two; ``t`` the thread's index), through
    the shared array ``sh`` of ``threads`` entries, returned to every thread.
    Every thread of the block must call it (it synchronizes).  (Under the
    simulator a device function of the simulator's own, which sees its
    ``cuda.syncthreads``.)"""

    def block_sum_(sh, v, t):
        sh[t] = v
        cuda.syncthreads()
        s = threads // 2
        while s > 0:
            if t < s:
                sh[t] += sh[t + s]
            cuda.syncthreads()
            s //= 2
        total = sh[0]
        cuda.syncthreads()  # (sh may be written again right after)
        return total

    return cuda.jit(device=True)(block_sum_) if simulator() else inline_device(block_sum_)


def _argtypes(ftype):
    t = numba.from_dtype(np.dtype(ftype))
    a1, a2, a3 = (types.Array(t, n, "C") for n in (1, 2, 3))
    i1 = types.Array(types.int64, 1, "C")
    i32 = types.int32
    conv = (a2, a3, a2, a1, i32, a2)  # x, conv_state, weight, bias, flags, out
    # x, xz, x_dbl, dt_weight, dt_bias, A, B, C, D, flags, ssm_state, out
    ssm = (a2, a2, a2, a2, a1, a2, a2, a2, a1, i32, a3, a2)
    # h, delta, tokens, table, weight, eps, flags, hn
    norm = (a2, a2, i1, a2, a1, t, i32, a2)
    return conv, ssm, norm


def _make_kernels(ftype, norm_threads=NORM_THREADS):
    ftype = np.dtype(ftype).type
    zero = ftype(0.0)
    one = ftype(1.0)
    conv_cell, ssm_cell = step_cells(ftype, inline_device, device_math())
    total_of = block_sum(norm_threads)

    def conv_step(x, state, w, bias, flags, out):
        Bt, C = state.shape[0], state.shape[1]
        i = cuda.grid(1)
        if i < Bt * C:
            b = i // C
            conv_cell(x, state, w, bias, (flags & FLAG_BIAS) != 0, (flags & FLAG_SILU) != 0,
                      out, b, i - b * C)

    def ssm_step(x, xz, x_dbl, dt_w, dt_bias, A, Bm, Cm, D, flags, state, out):
        Bt, Dc = state.shape[0], state.shape[1]
        i = cuda.grid(1)
        if i < Bt * Dc:
            b = i // Dc
            ssm_cell(x, xz, x_dbl, dt_w, dt_bias, A, Bm, Cm, D, (flags & FLAG_VAR) != 0,
                     (flags & FLAG_D) != 0, (flags & FLAG_Z) != 0, state, out, b, i - b * Dc)

    def residual_rmsnorm(h, delta, tokens, table, w, eps, flags, hn):
        b = cuda.blockIdx.x
        t = cuda.threadIdx.x
        sh = cuda.shared.array(norm_threads, ftype)
        d = h.shape[1]
        embed = (flags & FLAG_EMBED) != 0
        add = (flags & FLAG_ADD) != 0
        row = 0
        if embed:
            row = min(max(tokens[b], 0), table.shape[0] - 1)
        acc = zero
        for j in range(t, d, norm_threads):
            if embed:
                v = table[row, j]
                h[b, j] = v
            elif add:
                v = h[b, j] + delta[b, j]
                h[b, j] = v
            else:
                v = h[b, j]
            acc += v * v
        total = total_of(sh, acc, t)
        rstd = one / math.sqrt(total / ftype(d) + eps)
        for j in range(t, d, norm_threads):
            hn[b, j] = h[b, j] * rstd * w[j]

    return conv_step, ssm_step, residual_rmsnorm


@functools.lru_cache(maxsize=None)
def get_kernels(dtype, norm_threads=NORM_THREADS):
    """Compiled ``(conv_step, ssm_step, residual_rmsnorm)`` kernels for ``dtype``,
    the last in blocks of ``norm_threads`` (a power of two; cached)."""
    bodies = _make_kernels(np.dtype(dtype), norm_threads)
    sigs = _argtypes(dtype)
    bounds = ((THREADS,), (THREADS,), (norm_threads,))
    return tuple(compile_kernel(f, types.void(*s), launch_bounds=lb)
                 for f, s, lb in zip(bodies, sigs, bounds))


def ptx_signatures():
    """Yield ``(name, py_func, argtypes, is_float32, launch_bounds)`` of every kernel."""
    for dtype in (np.dtype(np.float32), np.dtype(np.float64)):
        bodies = _make_kernels(dtype)
        sigs = _argtypes(dtype)
        for name, f, s, lb in zip(("conv_step", "ssm_step", "rmsnorm_step"), bodies, sigs,
                                  ((THREADS,), (THREADS,), (NORM_THREADS,))):
            yield (f"{name}_{dtype.name}", f, s, dtype == np.float32, lb)


def _grid(n):
    return max(1, (n + THREADS - 1) // THREADS)


def conv_step(x, conv_state, weight, bias, silu, out=None):
    """Shift ``x``'s first ``C`` columns into ``conv_state (Bt, C, W)`` in place;
    return the conv output ``(Bt, C)`` (in ``out`` where given)."""
    xp = array_module(x)
    conv = get_kernels(x.dtype)[0]
    Bt, C, _ = conv_state.shape
    out = xp.empty((Bt, C), x.dtype) if out is None else out
    flags = np.int32((FLAG_BIAS if bias is not None else 0) | (FLAG_SILU if silu else 0))
    bias = dummy(xp, x.dtype, 1) if bias is None else bias
    launch(conv, _grid(Bt * C), THREADS, "current", (x, conv_state, weight, bias, flags, out))
    return out


def ssm_step(x, xz, x_dbl, dt_weight, dt_bias, A, B, C, D, ssm_state, out=None):
    """Advance ``ssm_state (Bt, Dc, N)`` in place; return ``y (Bt, Dc)`` (in ``out``
    where given).

    Selective where ``x_dbl (Bt, R + 2N)`` and ``dt_weight (Dc, R)`` are given
    (``B``, ``C`` None), LTI where ``B``, ``C (Dc, N)`` are (``x_dbl``,
    ``dt_weight`` None).  ``xz (Bt, 2 Dc)`` holds the gate ``z`` in its last
    ``Dc`` columns (None: no gate); ``D`` may be None.  ``delta`` always goes
    through softplus after ``dt_bias`` (as in every Mamba block).
    """
    xp = array_module(x)
    ssm = get_kernels(x.dtype)[1]
    Bt, Dc, _ = ssm_state.shape
    var = x_dbl is not None
    flags = ((FLAG_D if D is not None else 0) | (FLAG_Z if xz is not None else 0)
             | (FLAG_VAR if var else 0))
    d1 = dummy(xp, x.dtype, 1)
    d2 = dummy(xp, x.dtype, 2)
    out = xp.empty((Bt, Dc), x.dtype) if out is None else out
    launch(ssm, _grid(Bt * Dc), THREADS, "current",
           (x, d2 if xz is None else xz, x_dbl if var else d2, dt_weight if var else d2,
            dt_bias, A, d2 if var else B, d2 if var else C, d1 if D is None else D,
            np.int32(flags), ssm_state, out))
    return out


def residual_rmsnorm(h, hn, weight, eps, delta=None, tokens=None, table=None,
                     threads=NORM_THREADS):
    """``hn = rmsnorm(h) * weight`` per row of ``h (Bt, d)``, after ``h`` is set to
    ``table[tokens]`` (``tokens`` given) or to ``h + delta`` (``delta`` given), in
    place; one block of ``threads`` per row."""
    xp = array_module(h)
    norm = get_kernels(h.dtype, threads)[2]
    flags = FLAG_EMBED if tokens is not None else FLAG_ADD if delta is not None else 0
    d2 = dummy(xp, h.dtype, 2)
    launch(norm, h.shape[0], threads, "current",
           (h, d2 if delta is None else delta,
            dummy(xp, np.dtype(np.int64), 1) if tokens is None else tokens,
            d2 if table is None else table, weight, h.dtype.type(eps), np.int32(flags), hn))
    return hn
