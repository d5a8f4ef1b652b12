"""CPU backend of the elementwise activations: fused Numba ``@njit(parallel=True)`` loops.

Each kernel reads its inputs once and writes its output once (NumPy would
make two or three temporaries for the same expression).  Arrays arrive
C-contiguous and flattened to 1-D, in float32 or float64.  The per-element
math is :mod:`numba_mamba._math`'s, the source that the GPU kernels
(``cuda_kernels/elementwise.py``) compile too; its constants take the
input's type, so float32 stays float32.

Math
----
::

    sigmoid(x)  = 1 / (1 + exp(-x))
    silu(x)     = x * sigmoid(x)          silu'(x)     = sigmoid(x) * (1 + x * (1 - sigmoid(x)))
    softplus(x) = log1p(exp(x))           softplus'(x) = sigmoid(x)
                  (x itself for x > 20, the cut-off of the reference implementation)

and RMSNorm over the rows of a C-contiguous ``(M, d)`` array, one pass per
row for the forward and one for the backward (NumPy makes five or more
temporaries of the whole array)::

    rstd = 1 / sqrt(sum(x**2) / d + eps)          out = x * rstd * weight
    xhat = x * rstd,  g = dout * weight           m = sum(g * xhat) / d
    dx = rstd * (g - xhat * m) (+ dx_add)         dweight = sum over rows of dout * xhat

The sums over a row are taken in any order (SIMD partial sums); ``dweight``
is summed row after row within a task of :data:`ROWS_PER_TASK` rows, then
over the tasks.
"""

import numpy as np
from numba import njit, prange

from ._cpu_threads import serial_below
from ._cpu_vmath import njit_noalias
from ._math import cpu

__all__ = ["ROWS_PER_TASK", "rmsnorm_backward", "rmsnorm_forward", "silu_forward",
           "silu_backward", "softplus_forward", "softplus_backward"]

ROWS_PER_TASK = 64  # rows of an RMSNorm backward task (one partial dweight row each)


_silu, _silu_backward, _softplus, _softplus_backward = (
    cpu.silu, cpu.silu_backward, cpu.softplus, cpu.softplus_backward)


@njit(parallel=True, cache=True)
def _silu_kernel(x, out):
    for i in prange(x.size):
        out[i] = _silu(x[i])


@njit(parallel=True, cache=True)
def _silu_backward_kernel(dout, x, dx):
    for i in prange(x.size):
        dx[i] = _silu_backward(dout[i], x[i])


@njit(parallel=True, cache=True)
def _softplus_kernel(x, out):
    for i in prange(x.size):
        out[i] = _softplus(x[i])


@njit(parallel=True, cache=True)
def _softplus_backward_kernel(dout, x, dx):
    for i in prange(x.size):
        dx[i] = _softplus_backward(dout[i], x[i])


def _run(kernel, *arrays):
    out = np.empty_like(arrays[0])
    with serial_below(out.size):
        kernel(*(a.reshape(-1) for a in arrays), out.reshape(-1))
    return out


def silu_forward(x):
    """``x * sigmoid(x)`` of a C-contiguous float array."""
    return _run(_silu_kernel, x)


def silu_backward(dout, x):
    """``dout * silu'(x)``."""
    return _run(_silu_backward_kernel, dout, x)


def softplus_forward(x):
    """``log1p(exp(x))`` (``x`` above 20)."""
    return _run(_softplus_kernel, x)


def softplus_backward(dout, x):
    """``dout * sigmoid(x)``."""
    return _run(_softplus_backward_kernel, dout, x)


# ---------------------------------------------------------------- RMSNorm


@njit_noalias(fastmath={"reassoc"}, error_model="numpy")
def _dot_row(a, b):
    """``sum(a * b)`` in any order (SIMD partial sums); called, not inlined,
    so that the flag stays on this loop only."""
    acc = a.dtype.type(0)
    for j in range(a.shape[0]):
        acc += a[j] * b[j]
    return acc


@njit_noalias(error_model="numpy")
def _rms_scale_row(x, rstd, w, out):
    for j in range(x.shape[0]):
        out[j] = x[j] * rstd * w[j]


@njit_noalias(error_model="numpy")
def _rms_grad_row(dout, x, w, rstd, m, add, dx, dw):
    """``dx = rstd * (dout w - x rstd m)`` (plus ``dx`` where ``add``); ``dw += dout x rstd``."""
    for j in range(x.shape[0]):
        xhat = x[j] * rstd
        v = rstd * (dout[j] * w[j] - xhat * m)
        dx[j] = dx[j] + v if add else v
        dw[j] += dout[j] * xhat


@njit(parallel=True, cache=True, error_model="numpy")
def _rmsnorm_kernel(x, w, eps, out, rstd):
    M, d = x.shape
    one = x.dtype.type(1)
    n = x.dtype.type(d)
    for i in prange(M):
        r = one / np.sqrt(_dot_row(x[i], x[i]) / n + eps)
        rstd[i] = r
        _rms_scale_row(x[i], r, w, out[i])


@njit_noalias(fastmath={"reassoc"}, error_model="numpy")
def _gxhat_row(dout, w, x, rstd):
    """``sum(dout * w * x * rstd)`` (``sum(g * xhat)``) in any order."""
    acc = x.dtype.type(0)
    for j in range(x.shape[0]):
        acc += (dout[j] * w[j]) * (x[j] * rstd)
    return acc


@njit(parallel=True, cache=True, error_model="numpy")
def _rmsnorm_backward_kernel(dout, x, w, rstd, add, rows_per_task, dx, dw_part):
    M, d = x.shape
    n = x.dtype.type(d)
    for task in prange(dw_part.shape[0]):
        dw = dw_part[task]
        dw[:] = 0
        for i in range(task * rows_per_task, min(M, (task + 1) * rows_per_task)):
            r = rstd[i]
            m = _gxhat_row(dout[i], w, x[i], r) / n
            _rms_grad_row(dout[i], x[i], w, r, m, add, dx[i], dw)


def rmsnorm_forward(x, weight, eps):
    """``(out, rstd)`` of RMSNorm over the last axis of C-contiguous ``x (M, d)``;
    ``rstd`` has shape ``(M,)``.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_mamba import _cpu_elementwise
    >>> out, rstd = _cpu_elementwise.rmsnorm_forward(np.array([[3.0, -4.0]]), np.ones(2), 0.0)
    >>> np.round(out, 4), np.round(rstd, 4)
    (array([[ 0.8485, -1.1314]]), array([0.2828]))
    """
    out = np.empty_like(x)
    rstd = np.empty(x.shape[0], dtype=x.dtype)
    with serial_below(x.size):
        _rmsnorm_kernel(x, weight, x.dtype.type(eps), out, rstd)
    return out, rstd


def rmsnorm_backward(dout, x, weight, rstd, dx_add=None):
    """``(dx, dweight)`` of :func:`rmsnorm_forward`; ``dx`` is added to
    ``dx_add`` (C-contiguous, like ``x``) in place where given, and is it."""
    M, d = x.shape
    n_tasks = max(1, -(-M // ROWS_PER_TASK))
    dx = np.empty_like(x) if dx_add is None else dx_add
    dw_part = np.empty((n_tasks, d), dtype=x.dtype)
    with serial_below(x.size):
        _rmsnorm_backward_kernel(dout, x, weight, rstd, dx_add is not None, ROWS_PER_TASK, dx,
                                 dw_part)
    return dx, dw_part.sum(axis=0)
