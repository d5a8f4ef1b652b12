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
"""

import numpy as np
from numba import njit, prange

from ._cpu_threads import serial_below
from ._math import cpu

__all__ = ["silu_forward", "silu_backward", "softplus_forward", "softplus_backward"]


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
