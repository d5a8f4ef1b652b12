"""CPU backend of the causal depthwise convolution: Numba ``@njit(parallel=True)``.

The public layer (:func:`numba_mamba.layers.conv1d_forward`) validates the
inputs and hands this module C-contiguous arrays of one dtype ``ftype``
(float32 or float64); nothing here validates or moves axes.

Math
----
Each channel ``c`` is filtered by its own ``W`` taps, causally (the input is
padded with ``W - 1`` zeros on the left, as ``torch.nn.Conv1d(groups=C,
padding=W-1)`` truncated to the first ``L`` outputs)::

    pre[b, c, t] = bias[c] + sum_{k=0}^{W-1} weight[c, k] * x[b, c, t - (W-1) + k]
    out[b, c, t] = pre  or  silu(pre) = pre * sigmoid(pre)

and the backward, with ``g = dout`` (times ``silu'(pre)`` with the activation)::

    dx[b, c, s]  = sum_k weight[c, k] * g[b, c, s + (W-1) - k]     (terms with index < L)
    dweight[c, k] = sum_{b, t} g[b, c, t] * x[b, c, t - (W-1) + k]
    dbias[c]      = sum_{b, t} g[b, c, t]

Canonical layout
----------------
==============  ==============  =======================================
name            shape           notes
==============  ==============  =======================================
``x``, ``out``  ``(Bt, C, L)``  batch, channels, length
``weight``      ``(C, W)``      ``weight[c, W-1]`` multiplies ``x_t``
``bias``        ``(C,)``        or a dummy with ``has_bias`` False
==============  ==============  =======================================

The forward keeps nothing: the backward recomputes ``pre`` from ``x`` (``W``
multiply-adds per element) instead of storing it.

References
----------
.. [1] A. Gu and T. Dao, "Mamba: Linear-Time Sequence Modeling with Selective
   State Spaces", arXiv:2312.00752, 2023 (the short causal convolution
   before the scan).
"""

import numpy as np
from numba import njit, prange

from ._cpu_threads import serial_below
from ._cpu_vmath import njit_noalias, vsigmoid

__all__ = ["conv1d_forward", "conv1d_backward"]

_ROWS_PER_TASK = 16  # (batch, channel) rows per parallel task of the backward (one scratch row)


# The row functions are compiled with ``njit_noalias`` and called, not
# inlined (inlining would drop their flags): their arguments are distinct rows,
# so LLVM vectorizes each loop over time without run-time overlap checks.
# A shifted row is read or written through a slice (``row[shift:][t]``), not
# as ``row[t + shift]`` or ``row[t - shift]``: an index that LLVM cannot prove
# non-negative keeps Numba's wraparound of negative indices in the loop, which
# then stays scalar (several times slower).


@njit_noalias(error_model="numpy")
def _taps_row(src, w, c, b0, causal, out):
    """The taps of channel ``c`` over one row, in order (as the math sums them).

    ``causal``: ``out[t] = b0 + sum_k w[c, k] * src[t - (W-1) + k]`` (the
    forward's pre-activation, terms before ``t = 0`` left out); else
    ``out[t] = b0 + sum_k w[c, k] * src[t + (W-1) - k]`` (the backward's
    ``dx`` from ``g``, terms past ``L - 1`` left out).  One contiguous loop
    per tap.
    """
    W = w.shape[1]
    L = src.shape[0]
    for t in range(L):
        out[t] = b0
    for k in range(W):
        shift = W - 1 - k
        wk = w[c, k]
        o = out[shift:] if causal else out
        s = src if causal else src[shift:]
        for t in range(max(L - shift, 0)):
            o[t] += wk * s[t]


@njit_noalias(error_model="numpy")
def _silu_row(o):
    """``o = o * sigmoid(o)`` in place."""
    for t in range(o.shape[0]):
        v = o[t]
        o[t] = v * vsigmoid(v)


@njit_noalias(error_model="numpy")
def _silu_grad_row(dr, g):
    """``g = dr * silu'(g)`` in place (``g`` holds the pre-activation)."""
    one = g.dtype.type(1)
    for t in range(g.shape[0]):
        pre = g[t]
        s = vsigmoid(pre)
        g[t] = dr[t] * (s * (one + pre * (one - s)))


@njit_noalias(fastmath={"reassoc"}, error_model="numpy")
def _sums_row(g, xr, dw):
    """``dw[k] = sum_t g[t + shift_k] * xr[t]``; returns ``sum(g)`` (any order: SIMD partial sums)."""
    W = dw.shape[0]
    L = g.shape[0]
    for k in range(W):
        shift = W - 1 - k
        gs = g[shift:]
        acc = g.dtype.type(0)
        for t in range(max(L - shift, 0)):
            acc += gs[t] * xr[t]
        dw[k] = acc
    total = g.dtype.type(0)
    for t in range(L):
        total += g[t]
    return total


@njit(parallel=True, cache=True, error_model="numpy")
def _forward_kernel(x, w, bias, has_bias, silu, out):
    """Overwrite out (Bt, C, L); one parallel task per (batch, channel)."""
    Bt, C, L = x.shape
    zero = x.dtype.type(0)
    for bc in prange(Bt * C):
        b = bc // C
        c = bc - b * C
        o = out[b, c]
        _taps_row(x[b, c], w, c, bias[c] if has_bias else zero, True, o)
        if silu:
            _silu_row(o)


@njit(parallel=True, cache=True, error_model="numpy")
def _backward_kernel(dout, x, w, bias, has_bias, silu, rows_per_task, dx, dw_part, db_part):
    """Overwrite dx (Bt, C, L), dw_part (Bt, C, W) and db_part (Bt, C).

    Each parallel task takes ``rows_per_task`` (batch, channel) rows with one
    scratch row for the gradient at the pre-activation, and writes only its
    own rows, so the partial sums over time need no atomics; the caller sums
    them over the batch.
    """
    Bt, C, L = x.shape
    zero = x.dtype.type(0)
    rows = Bt * C
    n_tasks = (rows + rows_per_task - 1) // rows_per_task
    for task in prange(n_tasks):
        g = np.empty(L, dtype=x.dtype)  # (L,) gradient at the pre-activation
        for bc in range(task * rows_per_task, min(rows, (task + 1) * rows_per_task)):
            b = bc // C
            c = bc - b * C
            xr = x[b, c]
            if silu:  # the pre-activation recomputed, not stored by the forward
                _taps_row(xr, w, c, bias[c] if has_bias else zero, True, g)
                _silu_grad_row(dout[b, c], g)
            else:
                g[:] = dout[b, c]
            db_part[b, c] = _sums_row(g, xr, dw_part[b, c])
            _taps_row(g, w, c, zero, False, dx[b, c])


def conv1d_forward(x, weight, bias, silu):
    """Causal depthwise convolution (optionally followed by SiLU) on the CPU.

    Parameters
    ----------
    x : ndarray, shape (Bt, C, L)
    weight : ndarray, shape (C, W)
    bias : ndarray, shape (C,), or None
    silu : bool

    Returns
    -------
    out : ndarray, shape (Bt, C, L)

    Examples
    --------
    >>> import numpy as np
    >>> from numba_mamba import _cpu_conv1d
    >>> x = np.arange(1.0, 6.0).reshape(1, 1, 5)
    >>> _cpu_conv1d.conv1d_forward(x, np.array([[1.0, 1.0]]), None, False)
    array([[[1., 3., 5., 7., 9.]]])
    """
    out = np.empty_like(x)
    with serial_below(out.size):
        _forward_kernel(x, weight, _bias_or_dummy(bias, x.dtype), bias is not None, bool(silu),
                        out)
    return out


def conv1d_backward(dout, x, weight, bias, silu, dx_out=None, dx_channel=0):
    """Gradients ``(dx, dweight, dbias)`` of :func:`conv1d_forward`.

    ``dbias`` is None when ``bias`` is None.  ``dx`` is written into channels
    ``dx_channel .. dx_channel + C`` of ``dx_out`` (shape ``(Bt, C', L)``)
    where given, and is that view.  See the module docstring for the formulas.
    """
    Bt, C, L = x.shape
    W = weight.shape[1]
    dx = np.empty_like(x) if dx_out is None else dx_out[:, dx_channel:dx_channel + C]
    dw_part = np.empty((Bt, C, W), dtype=x.dtype)
    db_part = np.empty((Bt, C), dtype=x.dtype)
    with serial_below(dx.size):
        _backward_kernel(dout, x, weight, _bias_or_dummy(bias, x.dtype), bias is not None,
                         bool(silu), _ROWS_PER_TASK, dx, dw_part, db_part)
    return dx, dw_part.sum(axis=0), None if bias is None else db_part.sum(axis=0)


def _bias_or_dummy(bias, dtype):
    return np.zeros(1, dtype=dtype) if bias is None else bias
