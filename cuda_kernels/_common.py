"""Helpers shared by the kernel modules: device functions, streams, layouts
(half-precision storage has its own module, :mod:`.half`).

Nothing here computes; these are the few lines every launcher needs, kept in
one place.  Kernels are compiled and launched through :mod:`._launch`
(:func:`compile_kernel`, :func:`launch`, re-exported here).
"""

import numba
import numpy as np
from numba import cuda

from .._math import compiled

__all__ = ["BoundLaunch", "RawLaunch", "activations", "array_module", "as_variable", "c_strided",
           "compile_kernel", "current_stream", "device_math", "dummy", "inline_device", "launch",
           "prepare_launch", "simulator"]


def simulator():
    """True under the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``)."""
    return bool(numba.config.ENABLE_CUDASIM)


def inline_device(fn):
    """Compile ``fn`` as a device function, force-inlined into its callers.

    Under the simulator it stays a plain Python function (the simulator runs
    kernels as Python, with the ``cuda`` module swapped for its emulation).
    """
    if simulator():
        return fn
    return cuda.jit(device=True, forceinline=True)(fn)


def device_math():
    """:mod:`numba_mamba._math`'s scalar bodies as device functions, force-inlined
    (a namespace: ``sigmoid``, ``softplus``, ``silu``, ``silu_backward``,
    ``softplus_backward``; plain Python under the simulator).  The CPU kernels
    compile the same source: one body, both targets.  Constants take the type
    of the argument, so float32 code stays float32."""
    return compiled(inline_device)


def activations(ftype=None):
    """Device functions ``softplus(x)`` (``x`` itself above 20) and ``sigmoid(x)``
    of :func:`device_math`.  Both take the type of their argument (``ftype``
    is accepted for the callers and not needed), so float32 code stays float32."""
    fns = device_math()
    return fns.softplus, fns.sigmoid


def as_variable(M):
    """A constant ``B``/``C`` (Dc, N) viewed as (1, Dc, N, 1): a variable one with
    G = Dc groups, batch 1 and length 1; a (Bt, G, N, L) one unchanged."""
    return M.reshape(1, M.shape[0], M.shape[1], 1) if M.ndim == 2 else M


def array_module(x):
    """``numpy`` for NumPy arrays (which reach the kernels only under the simulator), else ``cupy``."""
    if isinstance(x, np.ndarray):
        return np
    import cupy

    return cupy


def current_stream(xp=None):
    """CuPy's current stream as a Numba stream; None for NumPy arrays (the simulator)."""
    if xp is np:
        return None
    import cupy

    return cuda.external_stream(cupy.cuda.get_current_stream().ptr)


# ------------------------------------------------------------------ launching
# Every launch goes through the launch seam, ``_launch`` (the one module that
# reads internals of numba-cuda and CuPy); its names are re-exported here for
# the kernel modules.
from ._launch import (BoundLaunch, RawLaunch, c_strided, compile_kernel, launch,  # noqa: E402
                      prepare_launch)


_DUMMIES = {}


def dummy(xp, dtype, ndim):
    """A one-element array of ``ndim`` dimensions standing in for an absent
    optional argument (kernels take every argument; a flag says it is absent).
    Cached per device and dtype: never written, so shared by every launch."""
    if xp is np:
        return np.zeros((1,) * ndim, dtype)
    key = (xp.cuda.runtime.getDevice(), dtype, ndim)
    x = _DUMMIES.get(key)
    if x is None:
        x = _DUMMIES[key] = xp.zeros((1,) * ndim, dtype)
    return x
