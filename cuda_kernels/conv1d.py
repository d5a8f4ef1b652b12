"""Numba CUDA kernels of the causal depthwise convolution (with optional SiLU).

Math
----
Each channel ``c`` has ``W`` taps; the input is zero before ``t = 0``::

    pre[b, c, t] = bias[c] + sum_{k=0}^{W-1} weight[c, k] * x[b, c, t - (W-1) + k]
    out[b, c, t] = pre, or silu(pre) = pre * sigmoid(pre) with the activation

Backward, with ``g = dout`` (times ``silu'(pre)`` with the activation)::

    dx[b, c, s]   = sum_k weight[c, k] * g[b, c, s + (W-1) - k]      (indices < L)
    dweight[c, k] = sum_{b, t} g[b, c, t] * x[b, c, t - (W-1) + k]
    dbias[c]      = sum_{b, t} g[b, c, t]

Canonical layout (C-contiguous, one float dtype ``ftype``)
---------------------------------------------------------
===========  ==============  ============================================
name         shape           notes
===========  ==============  ============================================
x, out, dx   (Bt, C, L)
weight       (C, W)          W fixed per compiled kernel
bias         (C,)            a 1-element dummy when absent (flag bit 0)
dw_part      (Bt, C, W)      per-batch partial sums, summed by the launcher
db_part      (Bt, C)
===========  ==============  ============================================

Summary of algorithm
--------------------
Forward: one thread per output element (1-D grid over ``Bt * C * L``); the
``W`` reads of neighbouring samples hit the same cache lines as the
neighbouring threads' reads.

Backward: one block of ``THREADS`` threads per (batch, channel) walks the
sequence in tiles of ``THREADS`` steps.  For a tile starting at ``t0`` the
threads first write ``g`` at ``t0 .. t0 + THREADS + W - 2`` into shared memory
(recomputing ``pre`` from ``x``: the forward stores nothing), then thread
``i`` reads the ``W`` values it needs for ``dx`` at ``t0 + i`` and adds its
terms of ``dweight`` and ``dbias`` to registers.  After the last tile the block
reduces its ``W + 1`` sums through shared memory into ``dw_part[b, c]`` and
``db_part[b, c]``.

References
----------
A. Gu and T. Dao, "Mamba: Linear-Time Sequence Modeling with Selective State
Spaces", arXiv:2312.00752, 2023.
"""

import functools

import numba
import numpy as np
from numba import cuda, types

from ._common import activations, compile_kernel, dummy, inline_device, launch

__all__ = ["THREADS", "conv1d_backward", "conv1d_forward", "get_kernels", "ptx_signatures"]

#: Threads per block of both kernels (a power of two: the block reduction halves it).
THREADS = 128
FLAG_BIAS = 1
FLAG_SILU = 2


def _argtypes(ftype):
    t = numba.from_dtype(np.dtype(ftype))
    a1 = types.Array(t, 1, "C")
    a2 = types.Array(t, 2, "C")
    a3 = types.Array(t, 3, "C")
    i32 = types.int32
    fwd = (a3, a2, a1, i32, a3)  # x, weight, bias, flags, out
    bwd = (a3, a3, a2, a1, i32, a3, a3, a2)  # dout, x, weight, bias, flags, dx, dw_part, db_part
    return fwd, bwd


def _make_kernels(ftype, width):
    """Python bodies of the forward and backward kernels for ``ftype`` and ``W = width``."""
    ftype = np.dtype(ftype).type
    nb_ftype = numba.from_dtype(np.dtype(ftype))
    zero = ftype(0.0)
    one = ftype(1.0)
    W = int(width)
    T = THREADS
    TILE = T + W - 1  # a tile of g and its halo of W - 1 later steps
    RED = (W + 1) * T  # the block's W + 1 partial sums, row k at k * T

    @inline_device
    def pre_at(x, w, bias, has_bias, b, c, t):
        acc = bias[c] if has_bias else zero
        for k in range(W):
            s = t - (W - 1) + k
            if s >= 0:
                acc += w[c, k] * x[b, c, s]
        return acc

    _, sigmoid = activations(ftype)

    def forward(x, w, bias, flags, out):
        Bt, C, L = x.shape
        i = cuda.grid(1)
        if i >= Bt * C * L:
            return
        bc = i // L
        t = i - bc * L
        b = bc // C
        c = bc - b * C
        acc = pre_at(x, w, bias, (flags & FLAG_BIAS) != 0, b, c, t)
        if flags & FLAG_SILU:
            acc = acc * sigmoid(acc)
        out[b, c, t] = acc

    def backward(dout, x, w, bias, flags, dx, dw_part, db_part):
        Bt, C, L = x.shape
        has_bias = (flags & FLAG_BIAS) != 0
        silu = (flags & FLAG_SILU) != 0
        bc = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        b = bc // C
        c = bc - b * C
        g_sh = cuda.shared.array(TILE, nb_ftype)
        red = cuda.shared.array(RED, nb_ftype)
        acc_w = cuda.local.array(W, nb_ftype)
        for k in range(W):
            acc_w[k] = zero
        acc_b = zero
        for t0 in range(0, L, T):
            j = tid
            while j < TILE:
                t = t0 + j
                gt = zero
                if t < L:
                    gt = dout[b, c, t]
                    if silu:
                        p = pre_at(x, w, bias, has_bias, b, c, t)
                        s = sigmoid(p)
                        gt *= s * (one + p * (one - s))
                g_sh[j] = gt
                j += T
            cuda.syncthreads()  # the tile of g is complete before threads read neighbours
            t = t0 + tid
            if t < L:
                gt = g_sh[tid]
                acc_b += gt
                acc = zero
                for k in range(W):
                    s = t - (W - 1) + k
                    if s >= 0:
                        acc_w[k] += gt * x[b, c, s]
                    acc += w[c, k] * g_sh[tid + (W - 1) - k]
                dx[b, c, t] = acc
            cuda.syncthreads()  # every thread has read the tile before the next overwrites it
        for k in range(W):
            red[k * T + tid] = acc_w[k]
        red[W * T + tid] = acc_b
        cuda.syncthreads()  # all partial sums are in shared memory
        stride = T // 2
        while stride > 0:  # same trip count in every thread
            if tid < stride:
                for k in range(W + 1):
                    red[k * T + tid] += red[k * T + tid + stride]
            cuda.syncthreads()  # this halving step is done before the next reads it
            stride //= 2
        if tid < W:
            dw_part[b, c, tid] = red[tid * T]
        elif tid == W:
            db_part[b, c] = red[W * T]

    return forward, backward


@functools.lru_cache(maxsize=None)
def get_kernels(dtype, width):
    """Compiled ``(forward, backward)`` kernels for ``dtype`` and ``width`` taps (cached)."""
    fwd_py, bwd_py = _make_kernels(np.dtype(dtype), width)
    fwd_t, bwd_t = _argtypes(dtype)
    fwd = compile_kernel(fwd_py, types.void(*fwd_t), launch_bounds=(THREADS,))
    bwd = compile_kernel(bwd_py, types.void(*bwd_t), launch_bounds=(THREADS,))
    return fwd, bwd


def ptx_signatures(widths=(4,)):
    """Yield ``(name, py_func, argtypes, is_float32, launch_bounds)`` of every kernel."""
    for dtype in (np.dtype(np.float32), np.dtype(np.float64)):
        fwd_t, bwd_t = _argtypes(dtype)
        for width in widths:
            fwd_py, bwd_py = _make_kernels(dtype, width)
            tag = f"{dtype.name}_w{width}"
            yield (f"conv1d_forward_{tag}", fwd_py, fwd_t, dtype == np.float32, (THREADS,))
            yield (f"conv1d_backward_{tag}", bwd_py, bwd_t, dtype == np.float32, (THREADS,))


def _flags(bias, silu):
    return np.int32((FLAG_BIAS if bias is not None else 0) | (FLAG_SILU if silu else 0))


def conv1d_forward(x, weight, bias, silu):
    """Launch the forward on CuPy arrays in the canonical layout; returns ``out``."""
    import cupy

    Bt, C, L = x.shape
    fwd, _ = get_kernels(x.dtype, weight.shape[1])
    out = cupy.empty_like(x)
    n = Bt * C * L
    launch(fwd, (n + THREADS - 1) // THREADS, THREADS, "current",
           (x, weight, dummy(cupy, x.dtype, 1) if bias is None else bias, _flags(bias, silu), out))
    return out


def conv1d_backward(dout, x, weight, bias, silu):
    """Launch the backward; returns ``(dx, dweight, dbias)`` (``dbias`` None without bias)."""
    import cupy

    Bt, C, L = x.shape
    W = weight.shape[1]
    _, bwd = get_kernels(x.dtype, W)
    dx = cupy.empty_like(x)
    dw_part = cupy.empty((Bt, C, W), x.dtype)
    db_part = cupy.empty((Bt, C), x.dtype)
    launch(bwd, Bt * C, THREADS, "current",
           (dout, x, weight, dummy(cupy, x.dtype, 1) if bias is None else bias, _flags(bias, silu),
            dx, dw_part, db_part))
    return dx, dw_part.sum(axis=0), None if bias is None else db_part.sum(axis=0)
