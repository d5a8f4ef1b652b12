"""Half-precision storage: per-step arrays read and written in float16 or
bfloat16 by kernels that compute in float32.

What a kernel of the state engine (:mod:`.scan_states`) needs to take such
arrays: which compute dtype and storage kind an array's dtype means
(:func:`storage_of`), the dtype the kernel's arguments have
(:func:`storage_dtype`; bfloat16 as its ``uint16`` bits), and the device
functions that convert one value as it is read or written
(:func:`storage_io`, :func:`storage_widen`), with NumPy versions of the
bfloat16 conversions for the simulator and the CPU tests.
"""

import numpy as np
from numba import cuda

from ._common import inline_device, simulator

__all__ = ["HALF_STORAGE", "bfloat16_bits_to_float32", "float32_to_bfloat16_bits", "kernel_view",
           "storage_dtype", "storage_io", "storage_of", "storage_widen"]

#: Storage kinds of per-step arrays that kernels read and write in a half type
#: while computing in float32 (see :func:`storage_io`).
HALF_STORAGE = ("float16", "bfloat16")


_STORAGE_OF = {}  # dtype -> (compute dtype, storage) (``dtype.name`` costs microseconds)


def storage_of(dtype):
    """``(compute dtype, storage)`` for arrays of ``dtype``: float16 and bfloat16
    compute in float32 and keep their name as the storage kind; float32 and
    float64 compute in themselves with storage None (no conversion)."""
    found = _STORAGE_OF.get(dtype)
    if found is None:
        d = np.dtype(dtype)
        found = (np.dtype(np.float32), d.name) if d.name in HALF_STORAGE else (d, None)
        _STORAGE_OF[dtype] = found
    return found


def storage_dtype(storage, ftype):
    """dtype of the arrays a kernel takes for ``storage``: float16 itself,
    bfloat16 as its bits (``uint16``; Numba has no bfloat16 arrays), None
    the compute dtype ``ftype``."""
    if storage is None:
        return np.dtype(ftype)
    if storage == "float16":
        return np.dtype(np.float16)
    if storage == "bfloat16":
        return np.dtype(np.uint16)
    raise ValueError(f"storage must be None, 'float16' or 'bfloat16', got {storage!r}")


def kernel_view(x):
    """``x`` as the kernels take it: a bfloat16 array viewed as ``uint16``
    (:func:`storage_dtype`), any other array (and None) unchanged."""
    if x is not None and storage_of(x.dtype)[1] == "bfloat16":
        return x.view(np.uint16)
    return x


def bfloat16_bits_to_float32(bits):
    """float32 value of bfloat16 bits (``uint16``, scalar or array): the bits
    are the high half of the float32's.  NumPy; the simulator's load."""
    b = np.asarray(bits, np.uint16).astype(np.uint32) << np.uint32(16)
    return b.view(np.float32)[()]


def float32_to_bfloat16_bits(x):
    """bfloat16 bits (``uint16``) of float32 ``x`` (scalar or array), rounded
    to nearest, ties to even, on the bits (infinities stay infinite, values
    past the largest bfloat16 become infinite, subnormals round like any
    value); a NaN stays a NaN (its quiet bit set).  NumPy; the simulator's
    store."""
    b = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    rounded = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    nan = (b & 0x7FFFFFFF) > 0x7F800000
    return np.where(nan, (b >> 16) | 0x40, rounded).astype(np.uint16)[()]


def _bf16_load_gpu(M, i):
    # the 16 bits shifted into the high half of a float32's
    return cuda.libdevice.int_as_float(np.int32(np.int64(M[i]) << 16))


def _bf16_store_gpu(M, i, y):
    b = np.int64(cuda.libdevice.float_as_int(y)) & 0xFFFFFFFF
    if (b & 0x7FFFFFFF) > 0x7F800000:  # NaN: keep it one (quiet)
        h = (b >> 16) | 0x40
    else:  # round to nearest even: a carry past the 16 low bits rounds up
        h = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    M[i] = np.uint16(h)


def storage_widen(storage, ftype):
    """``(zero, widen)``: the zero of :func:`storage_dtype` and a device function
    converting one value read from an array of it to ``ftype`` (what
    :func:`storage_io`'s ``load`` does after the read).  A kernel that reads a
    value long before it uses it keeps the raw value in a register and widens
    it late: the conversion waits for the read, the register does not."""
    zero = storage_dtype(storage, ftype).type(0)
    if storage is None:
        @inline_device
        def widen(v):
            return v
    elif storage == "float16":
        @inline_device
        def widen(v):
            return np.float32(v)
    elif simulator():
        def widen(v):
            return bfloat16_bits_to_float32(v)
    else:
        @inline_device
        def widen(v):
            return cuda.libdevice.int_as_float(np.int32(np.int64(v) << 16))
    return zero, widen


def storage_io(storage, ftype):
    """Device functions ``load(M, i)`` (``M[i]`` as ``ftype``) and
    ``store(M, i, y)`` (``ftype`` ``y`` into ``M[i]``) for arrays of
    ``storage`` (:func:`storage_dtype`).

    None: plain ``M[i]`` and ``M[i] = y`` (the compiled code is that of an
    array of ``ftype``).  ``'float16'``: Numba's float16 conversions
    (``cvt`` instructions).  ``'bfloat16'``: on bits (``uint16`` arrays) --
    a load puts them in the high half of a float32, a store rounds to
    nearest even (:func:`float32_to_bfloat16_bits`); under the simulator
    the NumPy versions of both.
    """
    storage_dtype(storage, ftype)  # (checks the kind)
    if storage is None:
        @inline_device
        def load(M, i):
            return M[i]

        @inline_device
        def store(M, i, y):
            M[i] = y
    elif storage == "float16":
        @inline_device
        def load(M, i):
            return np.float32(M[i])

        @inline_device
        def store(M, i, y):
            M[i] = np.float16(y)
    elif simulator():
        def load(M, i):
            return bfloat16_bits_to_float32(M[i])

        def store(M, i, y):
            M[i] = float32_to_bfloat16_bits(y)
    else:
        load = inline_device(_bf16_load_gpu)
        store = inline_device(_bf16_store_gpu)
    return load, store
