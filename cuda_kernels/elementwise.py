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
writes its output once, with a grid-stride loop over ``n``.  The per-element
math is :mod:`numba_mamba._math`'s (the CPU kernels of
``numba_mamba._cpu_elementwise`` compile the same source), its constants in
the argument's type so that float32 stays float32.
"""

import functools

import numba
import numpy as np
from numba import cuda, types

from ._common import array_module, compile_kernel, device_math, launch

__all__ = ["THREADS", "get_kernels", "ptx_signatures", "silu_backward", "silu_forward",
           "softplus_backward", "softplus_forward"]

THREADS = 256
_NAMES = ("silu_forward", "silu_backward", "softplus_forward", "softplus_backward")


def _argtypes(ftype):
    a1 = types.Array(numba.from_dtype(np.dtype(ftype)), 1, "C")
    return {"silu_forward": (a1, a1), "silu_backward": (a1, a1, a1),
            "softplus_forward": (a1, a1), "softplus_backward": (a1, a1, a1)}


def _make_kernels():
    """Python bodies of the four kernels (a dict by name): grid-stride loops over
    :mod:`numba_mamba._math`'s bodies, the source the CPU kernels compile too.
    The same bodies serve every dtype (the signature compiled decides it)."""
    fns = device_math()
    silu, silu_grad, softplus, softplus_grad = (fns.silu, fns.silu_backward, fns.softplus,
                                                fns.softplus_backward)

    def silu_forward(x, out):
        start, stride = cuda.grid(1), cuda.gridsize(1)
        for i in range(start, x.shape[0], stride):
            out[i] = silu(x[i])

    def silu_backward(dout, x, dx):
        start, stride = cuda.grid(1), cuda.gridsize(1)
        for i in range(start, x.shape[0], stride):
            dx[i] = silu_grad(dout[i], x[i])

    def softplus_forward(x, out):
        start, stride = cuda.grid(1), cuda.gridsize(1)
        for i in range(start, x.shape[0], stride):
            out[i] = softplus(x[i])

    def softplus_backward(dout, x, dx):
        start, stride = cuda.grid(1), cuda.gridsize(1)
        for i in range(start, x.shape[0], stride):
            dx[i] = softplus_grad(dout[i], x[i])

    return {"silu_forward": silu_forward, "silu_backward": silu_backward,
            "softplus_forward": softplus_forward, "softplus_backward": softplus_backward}


@functools.lru_cache(maxsize=None)
def get_kernels(dtype):
    """Compiled kernels for ``dtype`` (a dict by name, cached)."""
    bodies = _make_kernels()
    sigs = _argtypes(dtype)
    return {name: compile_kernel(bodies[name], types.void(*sigs[name])) for name in _NAMES}


def ptx_signatures():
    """Yield ``(name, py_func, argtypes, is_float32, launch_bounds)`` of every kernel."""
    for dtype in (np.dtype(np.float32), np.dtype(np.float64)):
        bodies = _make_kernels()
        sigs = _argtypes(dtype)
        for name in _NAMES:
            yield (f"{name}_{dtype.name}", bodies[name], sigs[name], dtype == np.float32, ())


def _launch(name, *arrays):
    x = arrays[-1]
    out = array_module(x).empty_like(x)
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
