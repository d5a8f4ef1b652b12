"""Numba CUDA kernels of the elementwise activations (SiLU and softplus, with backward).

Math
----
::

    sigmoid(x)  = 1 / (1 + exp(-x))
    silu(x)     = x * sigmoid(x)          dx = dout * sigmoid(x) * (1 + x * (1 - sigmoid(x)))
    softplus(x) = log1p(exp(x))           dx = dout * sigmoid(x)
                  (x itself for x > 20, the cut-off of the reference implementation)

Canonical layout
----------------
Every array is C-contiguous and flattened to 1-D (``x``, ``dout``, ``out``,
``dx``: ``(n,)``), in one float dtype.  Each kernel reads its inputs once and
writes its output once, with a grid-stride loop over ``n``; constants are
made in the kernel's dtype so that float32 stays float32.
"""

import functools
import math

import numba
import numpy as np
from numba import cuda, types

from ._common import compile_kernel, launch

__all__ = ["THREADS", "get_kernels", "ptx_signatures", "silu_backward", "silu_forward",
           "softplus_backward", "softplus_forward"]

THREADS = 256
_NAMES = ("silu_forward", "silu_backward", "softplus_forward", "softplus_backward")


def _argtypes(ftype):
    a1 = types.Array(numba.from_dtype(np.dtype(ftype)), 1, "C")
    return {"silu_forward": (a1, a1), "silu_backward": (a1, a1, a1),
            "softplus_forward": (a1, a1), "softplus_backward": (a1, a1, a1)}


def _make_kernels(ftype):
    """Python bodies of the four kernels for ``ftype`` (a dict by name)."""
    ftype = np.dtype(ftype).type
    one = ftype(1.0)
    twenty = ftype(20.0)

    def silu_forward(x, out):
        start, stride = cuda.grid(1), cuda.gridsize(1)
        for i in range(start, x.shape[0], stride):
            v = x[i]
            out[i] = v / (one + math.exp(-v))

    def silu_backward(dout, x, dx):
        start, stride = cuda.grid(1), cuda.gridsize(1)
        for i in range(start, x.shape[0], stride):
            v = x[i]
            s = one / (one + math.exp(-v))
            dx[i] = dout[i] * s * (one + v * (one - s))

    def softplus_forward(x, out):
        start, stride = cuda.grid(1), cuda.gridsize(1)
        for i in range(start, x.shape[0], stride):
            v = x[i]
            out[i] = v if v > twenty else math.log1p(math.exp(v))

    def softplus_backward(dout, x, dx):
        start, stride = cuda.grid(1), cuda.gridsize(1)
        for i in range(start, x.shape[0], stride):
            dx[i] = dout[i] / (one + math.exp(-x[i]))

    return {"silu_forward": silu_forward, "silu_backward": silu_backward,
            "softplus_forward": softplus_forward, "softplus_backward": softplus_backward}


@functools.lru_cache(maxsize=None)
def get_kernels(dtype):
    """Compiled kernels for ``dtype`` (a dict by name, cached)."""
    bodies = _make_kernels(np.dtype(dtype))
    sigs = _argtypes(dtype)
    return {name: compile_kernel(bodies[name], types.void(*sigs[name])) for name in _NAMES}


def ptx_signatures():
    """Yield ``(name, py_func, argtypes, is_float32, launch_bounds)`` of every kernel."""
    for dtype in (np.dtype(np.float32), np.dtype(np.float64)):
        bodies = _make_kernels(dtype)
        sigs = _argtypes(dtype)
        for name in _NAMES:
            yield (f"{name}_{dtype.name}", bodies[name], sigs[name], dtype == np.float32, ())


def _launch(name, *arrays):
    import cupy

    x = arrays[-1]
    out = cupy.empty_like(x)
    n = x.size
    blocks = max(1, min((n + THREADS - 1) // THREADS, 65536))
    kernel = get_kernels(x.dtype)[name]
    launch(kernel, blocks, THREADS, "current", [a.reshape(-1) for a in arrays] + [out.reshape(-1)])
    return out


def silu_forward(x):
    """``x * sigmoid(x)`` of a C-contiguous CuPy array."""
    return _launch("silu_forward", x)


def silu_backward(dout, x):
    """``dout * silu'(x)``."""
    return _launch("silu_backward", dout, x)


def softplus_forward(x):
    """``log1p(exp(x))`` (``x`` above 20)."""
    return _launch("softplus_forward", x)


def softplus_backward(dout, x):
    """``dout * sigmoid(x)``."""
    return _launch("softplus_backward", dout, x)
