"""Numba CUDA kernel of the embedding's gradient summed in a fixed order.

Math
----
The gradient of ``out = weight[ids]`` with respect to ``weight`` sums the rows
of ``dout`` of every occurrence of an id::

    dweight[v] = sum over positions t with ids[t] == v of dout[t]

``cupyx.scatter_add`` adds them with atomics, in whatever order the threads
run, so the result may differ in the last bits from run to run.  With
``settings.deterministic`` the launcher here sorts the positions by id (then
by position: the keys ``id * T + t`` are distinct, so any sort gives one
order), and the kernel ``sum_rows_by_id`` sums each id's rows in that order.

Canonical layout
----------------
``order`` (T,) int64: the positions, sorted by id then position; ``starts``
(V + 1,) int64: where each id's positions begin in ``order``; ``rows``
(T * d,) and ``out`` (V * d,) of one float dtype, C-contiguous and flat.
One thread per element of ``out`` (consecutive threads on consecutive columns
of one row, so that the reads of a row are coalesced).
"""

import functools

import numba
import numpy as np
from numba import cuda, types

from ._common import compile_kernel, launch
from .settings import settings

__all__ = ["THREADS", "embedding_backward", "get_kernel", "ptx_signatures", "settings"]

THREADS = 256


def _make_kernel(ftype):
    """Python body of ``sum_rows_by_id`` for ``ftype``."""
    zero = np.dtype(ftype).type(0.0)

    def sum_rows_by_id(order, starts, rows, out, d):
        # out[v, j] = sum of rows[order[k], j] for k in [starts[v], starts[v + 1]),
        # in that order (flat arrays, d columns)
        i = cuda.grid(1)
        if i < out.shape[0]:
            v = i // d
            j = i - v * d
            s = zero
            for k in range(starts[v], starts[v + 1]):
                s += rows[order[k] * d + j]
            out[i] = s

    return sum_rows_by_id


def _argtypes(ftype):
    f1 = types.Array(numba.from_dtype(np.dtype(ftype)), 1, "C")
    i1 = types.Array(types.int64, 1, "C")
    return (i1, i1, f1, f1, types.int64)


@functools.lru_cache(maxsize=None)
def get_kernel(dtype):
    """``sum_rows_by_id`` compiled for ``dtype`` (cached)."""
    return compile_kernel(_make_kernel(dtype), types.void(*_argtypes(np.dtype(dtype))))


def ptx_signatures():
    """Yield ``(name, py_func, argtypes, is_float32, launch_bounds)`` of the kernel."""
    for dtype in (np.dtype(np.float32), np.dtype(np.float64)):
        yield (f"sum_rows_by_id_{dtype.name}", _make_kernel(dtype), _argtypes(dtype),
               dtype == np.float32, ())


def embedding_backward(ids, dout, shape):
    """``dweight`` of shape ``shape = (V, d)``: the rows of ``dout`` (``(..., d)``)
    summed per id of ``ids`` (integers in ``[0, V)``, the shape of ``dout[..., 0]``),
    in a fixed order (the same bits on every run).  CuPy arrays."""
    import cupy

    V, d = shape
    flat = ids.reshape(-1).astype(cupy.int64)
    T = flat.size
    keys = cupy.sort(flat * T + cupy.arange(T, dtype=cupy.int64))  # distinct: one order
    order = keys % T
    starts = cupy.searchsorted(keys // T, cupy.arange(V + 1, dtype=cupy.int64))
    rows = cupy.ascontiguousarray(dout).reshape(-1)
    out = cupy.empty(V * d, dout.dtype)
    if out.size:
        launch(get_kernel(dout.dtype), -(-out.size // THREADS), THREADS, "current",
               (order, starts.astype(cupy.int64), rows, out, np.int64(d)))
    return out.reshape(V, d)
