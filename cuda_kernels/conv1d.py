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
dw_part      (Bt, nT, C, W)  per-block partial sums, summed by the launcher
db_part      (Bt, nT, C)
===========  ==============  ============================================

Summary of algorithm
--------------------
Both kernels give each thread ``STEPS`` consecutive steps of one (batch,
channel) row and each block of ``THREADS`` threads ``THREADS * STEPS``
steps of it: a 1-D grid of ``Bt * C * nT`` blocks, ``nT`` the blocks per
row.  A thread reads the ``x`` it needs once into registers -- its steps and
the ``W - 1`` before them; the backward also the ``W - 1`` after, for the
``g`` of later steps that its ``dx`` needs -- so index arithmetic is paid
once per ``STEPS`` outputs, and neighbouring threads' overlapping reads hit
the same cache lines.

Forward: ``out`` at the thread's steps from its registers.

Backward: the thread recomputes ``pre`` (hence ``g``) at its steps and the
``W - 1`` after them, writes ``dx`` at its steps, and adds its terms of
``dweight`` and ``dbias``.  The block reduces its ``W + 1`` sums through
shared memory into ``dw_part[b, j, c]`` and ``db_part[b, j, c]`` (``j`` the
block's place in the row); the launcher sums those over ``b`` and ``j`` --
a fixed order, so the gradients are the same bits on every run.

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
#: Consecutive steps of one row per thread.
STEPS = 4
FLAG_BIAS = 1
FLAG_SILU = 2


def _argtypes(ftype):
    t = numba.from_dtype(np.dtype(ftype))
    a1 = types.Array(t, 1, "C")
    a2 = types.Array(t, 2, "C")
    a3 = types.Array(t, 3, "C")
    a4 = types.Array(t, 4, "C")
    i32 = types.int32
    fwd = (a3, a2, a1, i32, a3)  # x, weight, bias, flags, out
    # dout, x, weight, bias, flags, dx (channels from dx_channel), dx_channel, dw_part, db_part
    bwd = (a3, a3, a2, a1, i32, a3, types.int64, a4, a3)
    return fwd, bwd


def _make_kernels(ftype, width):
    """Python bodies of the forward and backward kernels for ``ftype`` and ``W = width``."""
    ftype = np.dtype(ftype).type
    nb_ftype = numba.from_dtype(np.dtype(ftype))
    zero = ftype(0.0)
    one = ftype(1.0)
    W = int(width)
    T = THREADS
    P = STEPS
    NX_F = P + W - 1  # x read by a forward thread: its steps and the W - 1 before
    NX_B = P + 2 * (W - 1)  # the backward's: also the W - 1 after
    NG = P + W - 1  # g at a backward thread's steps and the W - 1 after
    RED = (W + 1) * T  # the block's W + 1 partial sums, row k at k * T

    _, sigmoid = activations(ftype)

    @inline_device
    def row_start(n_rows_blocks, C):
        """``(b, c, block in the row, first step of this thread)``."""
        blk = cuda.blockIdx.x
        bc = blk // n_rows_blocks
        j = blk - bc * n_rows_blocks
        b = bc // C
        return b, bc - b * C, j, (j * T + cuda.threadIdx.x) * P

    @inline_device
    def read_row(x, w, bias, flags, b, c, t0, L, xs, n, wk):
        """Into registers: ``xs[i] = x[b, c, t0 - (W-1) + i]`` for ``i < n``
        (zero outside ``0 .. L - 1``) and ``wk`` the taps of channel ``c``;
        returns its bias (zero without)."""
        for k in range(W):
            wk[k] = w[c, k]
        for i in range(n):
            s = t0 - (W - 1) + i
            xs[i] = x[b, c, s] if s >= 0 and s < L else zero
        return bias[c] if (flags & FLAG_BIAS) != 0 else zero

    @inline_device
    def pre_from(xs, i, wk, bias_c):
        """``pre`` at the step whose window starts at ``xs[i]``."""
        acc = bias_c
        for k in range(W):
            acc += wk[k] * xs[i + k]
        return acc

    def forward(x, w, bias, flags, out):
        Bt, C, L = x.shape
        n_blocks = (L + T * P - 1) // (T * P)
        b, c, _, t0 = row_start(n_blocks, C)
        if t0 >= L:
            return
        xs = cuda.local.array(NX_F, nb_ftype)
        wk = cuda.local.array(W, nb_ftype)
        bias_c = read_row(x, w, bias, flags, b, c, t0, L, xs, NX_F, wk)
        for i in range(P):
            t = t0 + i
            if t < L:
                acc = pre_from(xs, i, wk, bias_c)
                if flags & FLAG_SILU:
                    acc = acc * sigmoid(acc)
                out[b, c, t] = acc

    def backward(dout, x, w, bias, flags, dx, dx_channel, dw_part, db_part):
        Bt, C, L = x.shape
        b, c, j, t0 = row_start(dw_part.shape[1], C)
        tid = cuda.threadIdx.x
        silu = (flags & FLAG_SILU) != 0
        xs = cuda.local.array(NX_B, nb_ftype)
        g = cuda.local.array(NG, nb_ftype)
        wk = cuda.local.array(W, nb_ftype)
        bias_c = read_row(x, w, bias, flags, b, c, t0, L, xs, NX_B, wk)
        for i in range(NG):
            t = t0 + i
            gt = zero
            if t < L:
                gt = dout[b, c, t]
                if silu:
                    p = pre_from(xs, i, wk, bias_c)
                    sg = sigmoid(p)
                    gt *= sg * (one + p * (one - sg))
            g[i] = gt
        for i in range(P):  # (g is zero past L: no terms from there)
            t = t0 + i
            if t < L:
                acc = zero
                for k in range(W):
                    acc += wk[k] * g[i + (W - 1) - k]
                dx[b, dx_channel + c, t] = acc
        red = cuda.shared.array(RED, nb_ftype)
        for k in range(W):
            acc = zero
            for i in range(P):
                acc += g[i] * xs[i + k]
            red[k * T + tid] = acc
        acc = zero
        for i in range(P):
            acc += g[i]
        red[W * T + tid] = acc
        cuda.syncthreads()  # all partial sums are in shared memory
        stride = T // 2
        while stride > 0:  # same trip count in every thread
            if tid < stride:
                for k in range(W + 1):
                    red[k * T + tid] += red[k * T + tid + stride]
            cuda.syncthreads()  # this halving step is done before the next reads it
            stride //= 2
        if tid < W:
            dw_part[b, j, c, tid] = red[tid * T]
        elif tid == W:
            db_part[b, j, c] = red[W * T]

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


def _row_blocks(L):
    """Blocks per (batch, channel) row of ``L`` steps."""
    return max(1, -(-L // (THREADS * STEPS)))


def _flags(bias, silu):
    return np.int32((FLAG_BIAS if bias is not None else 0) | (FLAG_SILU if silu else 0))


def conv1d_forward(x, weight, bias, silu):
    """Launch the forward on CuPy arrays in the canonical layout; returns ``out``."""
    import cupy

    Bt, C, L = x.shape
    fwd, _ = get_kernels(x.dtype, weight.shape[1])
    out = cupy.empty_like(x)
    launch(fwd, Bt * C * _row_blocks(L), THREADS, "current",
           (x, weight, dummy(cupy, x.dtype, 1) if bias is None else bias, _flags(bias, silu), out))
    return out


def conv1d_backward(dout, x, weight, bias, silu, dx_out=None, dx_channel=0):
    """Launch the backward; returns ``(dx, dweight, dbias)`` (``dbias`` None
    without bias).  ``dx`` goes into channels ``dx_channel .. dx_channel + C``
    of ``dx_out`` (C-contiguous, ``(Bt, C', L)``) where given, and is that view."""
    import cupy

    Bt, C, L = x.shape
    W = weight.shape[1]
    _, bwd = get_kernels(x.dtype, W)
    dx = cupy.empty_like(x) if dx_out is None else dx_out
    nT = _row_blocks(L)
    dw_part = cupy.empty((Bt, nT, C, W), x.dtype)
    db_part = cupy.empty((Bt, nT, C), x.dtype)
    launch(bwd, Bt * C * nT, THREADS, "current",
           (dout, x, weight, dummy(cupy, x.dtype, 1) if bias is None else bias, _flags(bias, silu),
            dx, np.int64(dx_channel), dw_part, db_part))
    if dx_out is not None:
        dx = dx_out[:, dx_channel:dx_channel + C]
    dweight = dw_part.reshape(Bt * nT, C * W).sum(axis=0).reshape(C, W)
    return dx, dweight, None if bias is None else db_part.reshape(Bt * nT, C).sum(axis=0)
