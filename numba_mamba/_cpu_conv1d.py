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
from ._cpu_vmath import vsigmoid

__all__ = ["conv1d_forward", "conv1d_backward"]


@njit(inline="always")
def _pre_row(xr, w, c, out):
    """``out[t] += sum_k w[c, k] * xr[t - (W-1) + k]`` over the causal window.

    One contiguous loop per tap (the taps in order, as the math sums them),
    each of which LLVM vectorizes; terms before ``t = 0`` are left out.
    """
    W = w.shape[1]
    L = xr.shape[0]
    for k in range(W):
        shift = W - 1 - k
        wk = w[c, k]
        for t in range(shift, L):
            out[t] += wk * xr[t - shift]


@njit(fastmath={"reassoc"}, error_model="numpy", cache=True)
def _dot(a, a0, b, b0, n):
    """``sum_i a[a0 + i] * b[b0 + i]`` over ``i < n``, in any order (SIMD partial sums).

    Not inlined: Numba would drop the fastmath flag of an inlined function.
    """
    acc = a.dtype.type(0)
    for i in range(n):
        acc += a[a0 + i] * b[b0 + i]
    return acc


@njit(fastmath={"reassoc"}, error_model="numpy", cache=True)
def _sum(a):
    """``sum(a)`` in any order (SIMD partial sums)."""
    acc = a.dtype.type(0)
    for i in range(a.shape[0]):
        acc += a[i]
    return acc


@njit(parallel=True, cache=True, error_model="numpy")
def _forward_kernel(x, w, bias, has_bias, silu, out):
    """Overwrite out (Bt, C, L); one parallel task per (batch, channel)."""
    Bt, C, L = x.shape
    zero = x.dtype.type(0)
    for bc in prange(Bt * C):
        b = bc // C
        c = bc - b * C
        o = out[b, c]
        b0 = bias[c] if has_bias else zero
        for t in range(L):
            o[t] = b0
        _pre_row(x[b, c], w, c, o)
        if silu:
            for t in range(L):
                v = o[t]
                o[t] = v * vsigmoid(v)


@njit(parallel=True, cache=True, error_model="numpy")
def _backward_kernel(dout, x, w, bias, has_bias, silu, dx, dw_part, db_part):
    """Overwrite dx (Bt, C, L), dw_part (Bt, C, W) and db_part (Bt, C).

    Task (b, c) writes only its own rows, so the partial sums over time need
    no atomics; the caller sums them over the batch.
    """
    Bt, C, L = x.shape
    W = w.shape[1]
    zero = x.dtype.type(0)
    one = x.dtype.type(1)
    for bc in prange(Bt * C):
        b = bc // C
        c = bc - b * C
        xr = x[b, c]
        dr = dout[b, c]
        g = np.empty(L, dtype=x.dtype)  # (L,) gradient at the pre-activation
        if silu:  # the pre-activation recomputed, not stored by the forward
            b0 = bias[c] if has_bias else zero
            for t in range(L):
                g[t] = b0
            _pre_row(xr, w, c, g)
            for t in range(L):
                pre = g[t]
                s = vsigmoid(pre)
                g[t] = dr[t] * (s * (one + pre * (one - s)))
        else:
            for t in range(L):
                g[t] = dr[t]
        for k in range(W):
            shift = W - 1 - k
            dw_part[b, c, k] = _dot(g, shift, xr, 0, max(L - shift, 0))
        d = dx[b, c]
        for t in range(L):
            d[t] = zero
        for k in range(W):
            shift = W - 1 - k
            wk = w[c, k]
            for t in range(L - shift):
                d[t] += wk * g[t + shift]
        db_part[b, c] = _sum(g)


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
                         bool(silu), dx, dw_part, db_part)
    return dx, dw_part.sum(axis=0), None if bias is None else db_part.sum(axis=0)


def _bias_or_dummy(bias, dtype):
    return np.zeros(1, dtype=dtype) if bias is None else bias
