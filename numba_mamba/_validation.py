"""Argument checks shared by the public functions.

Every public function validates its arguments here before any kernel runs:
array kind (NumPy or CuPy, never mixed), dtype, ndim and shape, each error
naming the argument with what was expected and what was got.
"""

import numpy as np

__all__ = [
    "SUPPORTED_DTYPES",
    "array_namespace",
    "check_dtype",
    "check_shape",
    "compute_dtype",
    "is_cupy_array",
    "missing_gpu_stack_message",
]

SUPPORTED_DTYPES = ("float16", "bfloat16", "float32", "float64")

missing_gpu_stack_message = (
    "CuPy arrays need the CUDA stack of numba-mamba: install it with "
    "`pip install 'numba-mamba[cuda12]'` (or `[cuda13]`, matching your CUDA driver) "
    "and check that `numba.cuda.is_available()` is True"
)


_IS_CUPY_TYPE = {}  # type -> is it a CuPy array type (the test costs a microsecond a call)


def is_cupy_array(x):
    """True for a ``cupy.ndarray``, without importing CuPy."""
    cls = type(x)
    known = _IS_CUPY_TYPE.get(cls)
    if known is None:
        known = _IS_CUPY_TYPE[cls] = (cls.__module__.split(".")[0] == "cupy"
                                      and hasattr(cls, "__cuda_array_interface__"))
    return known


def array_namespace(**arrays):
    """Return ``numpy`` or ``cupy`` for the given named arrays (None entries skipped).

    Raises
    ------
    TypeError
        If NumPy and CuPy arrays are mixed (the message says which argument is
        where), or CuPy arrays live on different devices.
    """
    kinds = [is_cupy_array(x) for x in arrays.values() if x is not None]
    if not any(kinds):
        return np
    if not all(kinds):
        on_gpu = {name: is_cupy_array(x) for name, x in arrays.items() if x is not None}
        host = [name for name, gpu in on_gpu.items() if not gpu]
        gpu = [name for name, g in on_gpu.items() if g]
        raise TypeError(
            f"arrays must all be NumPy (CPU) or all CuPy (GPU): {', '.join(gpu)} "
            f"{'is a CuPy array' if len(gpu) == 1 else 'are CuPy arrays'} on the GPU but "
            f"{', '.join(host)} {'is' if len(host) == 1 else 'are'} on the host "
            f"({', '.join(type(arrays[n]).__name__ for n in host)})")
    devices = {x.data.device_id for x in arrays.values() if x is not None}
    if len(devices) > 1:
        raise TypeError("CuPy arrays must be on one device, got "
                        + ", ".join(f"{n} on device {x.data.device_id}"
                                    for n, x in arrays.items() if x is not None))
    import cupy
    return cupy


_CHECKED_DTYPES = set()  # dtypes found supported (``dtype.name`` costs microseconds a call)


def check_dtype(name, x):
    """Raise TypeError unless ``x`` has a supported floating dtype."""
    dtype = x.dtype
    if dtype in _CHECKED_DTYPES:
        return
    if dtype.name not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must have dtype {', '.join(SUPPORTED_DTYPES)}, "
                        f"got {x.dtype}")
    _CHECKED_DTYPES.add(dtype)


def compute_dtype(*arrays):
    """float64 if any array is float64, else float32 (half precisions compute in float32)."""
    if any(a is not None and a.dtype == np.float64 for a in arrays):
        return np.dtype(np.float64)
    return np.dtype(np.float32)


def check_shape(name, x, expected, what=""):
    """Raise ValueError unless ``x.shape == expected``; ``what`` explains the expectation."""
    if tuple(x.shape) != tuple(expected):
        detail = f" {what}" if what else ""
        raise ValueError(f"{name} must have shape {tuple(expected)}{detail}, got {tuple(x.shape)}")
