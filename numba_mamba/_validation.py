"""Argument checks shared by the public functions.

Every public function validates its arguments here before any kernel runs:
array kind (NumPy or CuPy, never mixed), dtype, ndim and shape, each error
naming the argument with what was expected and what was got.

Dtypes are decided by kind and size, never by identity with a NumPy type:
an array in non-native byte order (``>f8`` from a FITS or netCDF file) is
the float64 it holds.  Arrays are taken in native byte order
(:func:`as_float_array` converts the others), so results are native, as
those of NumPy's ufuncs are.  Integer and boolean arrays are taken as float64,
whether given as arrays or as lists; a ``bool`` is never taken for a number
or a length (:func:`check_int`, :func:`check_flag`).
"""

import numpy as np

__all__ = [
    "SUPPORTED_DTYPES",
    "array_namespace",
    "as_float_array",
    "check_dtype",
    "check_flag",
    "check_int",
    "check_shape",
    "complex_of",
    "compute_dtype",
    "is_cupy_array",
    "is_double",
    "missing_gpu_stack_message",
]

SUPPORTED_DTYPES = ("float16", "bfloat16", "float32", "float64")
COMPLEX_DTYPES = ("complex64", "complex128")

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


def is_double(dtype):
    """True for a 64-bit real or 128-bit complex dtype, in either byte order."""
    return (dtype.kind == "f" and dtype.itemsize == 8) or (dtype.kind == "c"
                                                            and dtype.itemsize == 16)


def compute_dtype(*arrays):
    """float64 if any array is float64 (of either byte order), else float32
    (half precisions compute in float32)."""
    if any(a is not None and is_double(a.dtype) for a in arrays):
        return np.dtype(np.float64)
    return np.dtype(np.float32)


def complex_of(ftype):
    """The complex dtype of the real float dtype ``ftype``: complex128 for
    float64, else complex64."""
    return np.dtype(np.complex128 if ftype == np.float64 else np.complex64)


def as_float_array(name, x, xp, allow_complex=False):
    """``x`` as an array of ``xp`` (numpy or cupy) of a supported dtype, native byte order.

    Array-likes (lists, scalars) become arrays; integer and boolean arrays
    (given as arrays or not) become float64; an array of non-native byte
    order is converted to the native order of its dtype.

    Raises
    ------
    TypeError
        Any other dtype (the message names ``name``, the accepted dtypes and
        the one got).

    Examples
    --------
    >>> import numpy as np
    >>> as_float_array("x", np.arange(3), np).dtype
    dtype('float64')
    >>> as_float_array("x", np.ones(2, dtype=">f4"), np).dtype.isnative
    True
    """
    if not (isinstance(x, np.ndarray) or is_cupy_array(x)):
        x = xp.asarray(x)
    dtype = x.dtype
    if dtype.kind in "iub":
        x = x.astype(np.float64)
    elif not dtype.isnative:
        x = x.astype(dtype.newbyteorder("="))
    ok = SUPPORTED_DTYPES + (COMPLEX_DTYPES if allow_complex else ())
    if x.dtype.name not in ok:
        raise TypeError(f"{name} must have dtype {', '.join(ok)} (or be integer), got "
                        f"{dtype}")
    return x


def check_int(name, value, low=None, what=""):
    """``value`` as an ``int``; TypeError unless it is an integer (``bool`` is
    not), ValueError if it is below ``low``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer{what}, got {value!r} "
                        f"({type(value).__name__})")
    if low is not None and value < low:
        raise ValueError(f"{name} must be an integer >= {low}{what}, got {value!r}")
    return int(value)


def check_flag(name, value):
    """``value`` as a ``bool``; TypeError unless it is a ``bool`` (or NumPy's)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r} "
                        f"({type(value).__name__})")
    return bool(value)


def check_shape(name, x, expected, what=""):
    """Raise ValueError unless ``x.shape == expected``; ``what`` explains the expectation."""
    if tuple(x.shape) != tuple(expected):
        detail = f" {what}" if what else ""
        raise ValueError(f"{name} must have shape {tuple(expected)}{detail}, got {tuple(x.shape)}")


def is_dask_array(*values):
    """True if any of ``values`` is a ``dask.array.Array`` (without importing
    Dask: where it is not imported, none can be one)."""
    import sys

    module = sys.modules.get("dask.array")
    return module is not None and any(isinstance(v, module.Array) for v in values)
