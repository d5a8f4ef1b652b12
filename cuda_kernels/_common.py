"""Helpers shared by the kernel modules: device functions, streams, layouts.

Nothing here computes; these are the few lines every launcher needs, kept in
one place, and a cheaper way to launch a compiled kernel on CuPy arrays.
"""

import math
import os

import numba
import numpy as np
from numba import cuda

__all__ = ["RAW_LAUNCH", "RawLaunch", "activations", "array_module", "as_variable", "c_strided", "current_stream",
           "inline_device", "launch", "simulator"]


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


def activations(ftype):
    """Device functions ``softplus(x)`` (``x`` itself above 20) and ``sigmoid(x)``
    with every constant cast to ``ftype``, so float32 code stays float32."""
    one = ftype(1.0)
    twenty = ftype(20.0)

    @inline_device
    def softplus(x):
        if x > twenty:
            return x
        return math.log1p(math.exp(x))

    @inline_device
    def sigmoid(x):
        return one / (one + math.exp(-x))

    return softplus, sigmoid


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


# ------------------------------------------------------------------ launching
#: Launch kernels on CuPy arrays through CuPy (:class:`RawLaunch`) rather than
#: through Numba's dispatcher.  Environment ``NUMBA_MAMBA_RAW_LAUNCH=0`` turns
#: it off.
RAW_LAUNCH = os.environ.get("NUMBA_MAMBA_RAW_LAUNCH", "1") != "0"


class RawLaunch:
    """Launch one compiled Numba kernel as a CuPy function.

    Numba's dispatcher spends tens of microseconds per launch and 12-15 more
    per CuPy array argument (it wraps each one as a Numba device array).  This
    loads the kernel's cubin, as Numba linked it, into a CuPy module once, and
    passes the arguments the way Numba's launcher does: an array of ``ndim``
    dimensions as ``(meminfo, parent, size, itemsize, data, *shape,
    *strides)``, an integer by value.

    Parameters
    ----------
    dispatcher : numba.cuda dispatcher
        Compiled for exactly one signature (``cuda.jit(signature)``), with
        C-contiguous array and integer arguments only.
    """

    def __init__(self, dispatcher):
        import cupy
        from numba.core import types as nbtypes

        (kernel,) = dispatcher.overloads.values()
        self._pack = []
        for ty in kernel.argument_types:
            if isinstance(ty, nbtypes.Array) and ty.layout == "C":
                self._pack.append(ty.ndim)
            elif isinstance(ty, nbtypes.Integer):
                self._pack.append(np.dtype(str(ty)).type)
            else:
                raise TypeError(f"RawLaunch takes C arrays and integers, got {ty}")
        lib = kernel._codelibrary
        self._module = cupy.cuda.function.Module()
        image = lib.get_cubin()
        image = getattr(image, "code", image)  # numba-cuda on cuda.core: an ObjectCode
        if not isinstance(image, bytes):
            raise TypeError(f"expected the kernel's cubin as bytes, got {type(image).__name__}")
        self._module.load(image)
        self._function = self._module.get_function(lib._entry_name)

    def __call__(self, grid, block, stream, args):
        """Launch on CuPy arrays ``args`` (C-contiguous) on ``stream`` (a CuPy stream)."""
        packed = []
        i64 = np.int64
        null = np.uint64(0)
        for kind, value in zip(self._pack, args):
            if kind.__class__ is int:  # an array of `kind` dimensions
                itemsize = value.itemsize
                packed += (null, null, i64(value.size), i64(itemsize), np.uint64(value.data.ptr))
                shape = value.shape
                packed += [i64(s) for s in shape]
                stride = itemsize
                strides = []
                for s in reversed(shape):  # C strides: Numba's kernels index by them
                    strides.append(i64(stride))
                    stride *= s
                packed += reversed(strides)
            else:
                packed.append(kind(value))
        self._function((int(grid),), (int(block),), tuple(packed), stream=stream)


_RAW = {}


def launch(kernel, grid, block, stream, args):
    """Launch ``kernel[grid, block, stream](*args)``.

    On CuPy arrays (and :data:`RAW_LAUNCH` on) through :class:`RawLaunch` on
    CuPy's current stream, else through Numba's dispatcher on ``stream``
    (None: the default stream; the CUDA simulator and NumPy arrays take this
    path).
    """
    if RAW_LAUNCH and not simulator() and not isinstance(args[0], np.ndarray):
        import cupy

        key = (id(kernel), cupy.cuda.runtime.getDevice())  # a module per device
        raw = _RAW.get(key)
        if raw is None or raw[0] is not kernel:
            raw = _RAW[key] = (kernel, RawLaunch(kernel))
        raw[1](grid, block, cupy.cuda.get_current_stream(), args)
        return
    args = [c_strided(a) for a in args]
    if stream is None:
        kernel[grid, block](*args)
    else:
        kernel[grid, block, stream](*args)
