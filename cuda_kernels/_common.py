"""Helpers shared by the kernel modules: device functions, streams, layouts.

Nothing here computes; these are the few lines every launcher needs, kept in
one place.
"""

import numba
import numpy as np
from numba import cuda

__all__ = ["array_module", "c_strided", "current_stream", "inline_device", "simulator"]


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


def c_strided(x):
    """``x`` (C-contiguous) viewed with exactly C strides.

    NumPy and CuPy call an array with a zero stride on a length-1 axis (as
    ``B[:, None]`` makes) C-contiguous, Numba does not, and the kernels are
    compiled for C-contiguous arrays only.  Scalars and NumPy arrays (the
    simulator, which checks no types) pass through.
    """
    if isinstance(x, np.ndarray) or not hasattr(x, "strides"):
        return x
    stride = x.itemsize
    for size, s in zip(reversed(x.shape), reversed(x.strides)):
        if s != stride:
            import cupy

            return cupy.ndarray(x.shape, x.dtype, x.data)
        stride *= size
    return x
