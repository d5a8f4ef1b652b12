"""Threads on the CPU: one BLAS thread while this library's CPU work runs, and
one Numba thread for calls too small to share.

NumPy's matmul runs on OpenBLAS, which keeps its own pool of threads, and
Numba's ``parallel=True`` kernels run on Numba's pool (OpenMP).  Both pools
size themselves to the machine, and both spin for a while after their work
before they sleep.  A model forward alternates GEMMs and Numba kernels many
times, so each pool's spinning threads take the cores the other pool's next
call needs, and the whole runs several times slower than either alone.

The policy here: while a CPU GEMM of this library runs (:func:`blas_limited`
around :func:`numba_mamba.layers.gemm`, and once around a whole model forward,
backward or loss-and-gradients call), OpenBLAS runs on ``BLAS_THREADS``
threads (1 by default), and Numba's threads do the parallel work.  The
previous thread counts come back when the outermost block ends, so NumPy
outside this library keeps its settings.  ``benchmarks/bench_cpu.py``
(``--blas``) measures the policy against the libraries' defaults.

The limit goes through threadpoolctl's controller, built once on first use
(a ``threadpool_limits`` block built per call rescans the loaded libraries
and costs hundreds of microseconds; setting the thread count through the
controller built once costs microseconds).  Without threadpoolctl, or with
the environment variable ``NUMBA_MAMBA_BLAS_THREADS=0``, nothing is limited.
The variable, read at import, sets ``BLAS_THREADS`` (a positive integer).

Small calls (decoding one token, streaming a few steps) pay more for waking
Numba's threads and waiting at the end of the parallel loop than the work
costs, and far more on a loaded machine, where a woken thread may wait for a
core.  :func:`serial_below` runs a ``parallel=True`` kernel on the calling
thread alone (``numba.set_num_threads(1)`` for the call) when its work is
below ``SERIAL_BELOW`` (``benchmarks/bench_cpu.py --parts tiny`` measures the
crossover).  The work is counted as the elements of the kernel's innermost
update (state updates for the scan, output elements for the elementwise
kernels and the convolution).

Memory: a training step on NumPy arrays allocates and frees tens of
megabytes of activations and gradients.  glibc's ``malloc`` gives large
blocks back to the kernel when they are freed (``munmap``, or a trim of the
heap's top), so the next step's arrays start as fresh pages, each a page
fault that zeroes 4 KiB: thousands per step of the examples' model, a
fifth of its time on this machine.  :func:`hold_heap`, called by
:class:`numba_mamba.training.TrainStep` on NumPy parameters, sets
``malloc``'s thresholds once for the process (``mallopt``: blocks up to
``MMAP_THRESHOLD`` bytes come from the heap, and up to ``TRIM_THRESHOLD``
bytes of free heap are kept) so that the memory of one step is reused by
the next.  The cost: the process keeps up to that much freed memory.  It
does nothing outside glibc, where a ``MALLOC_*_`` variable or
``GLIBC_TUNABLES`` already sets the allocator, or with
``NUMBA_MAMBA_HOLD_HEAP=0``.
"""

import ctypes
import os
import platform
import threading
from contextlib import contextmanager

import numba

__all__ = ["BLAS_THREADS", "MMAP_THRESHOLD", "SERIAL_BELOW", "TRIM_THRESHOLD", "blas_limited",
           "blas_threads", "hold_heap", "serial_below"]

MMAP_THRESHOLD = 32 << 20  # bytes: larger blocks are mapped (glibc's largest dynamic value)
TRIM_THRESHOLD = 512 << 20  # bytes of free heap kept rather than given back
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
_heap = None  # hold_heap's result, once tried

SERIAL_BELOW = 1 << 15


def _threads_from_env(value):
    """``BLAS_THREADS`` from the variable's text: a non-negative integer (0: no limit)."""
    if value is None or value.strip() == "":
        return 1
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise ValueError(f"NUMBA_MAMBA_BLAS_THREADS must be a non-negative integer "
                         f"(0: no limit), got {value!r}")
    return n


BLAS_THREADS = _threads_from_env(os.environ.get("NUMBA_MAMBA_BLAS_THREADS"))

_lock = threading.Lock()
_depth = 0
_saved = []  # (library controller, its thread count before the outermost block)
_libs = None  # threadpoolctl's BLAS library controllers, found on first use


def _blas_libs():
    """threadpoolctl's controllers of the loaded BLAS libraries ([] without threadpoolctl)."""
    global _libs
    if _libs is None:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:
            _libs = []
        else:
            _libs = list(ThreadpoolController().select(user_api="blas").lib_controllers)
    return _libs


def blas_threads():
    """Thread counts of the loaded BLAS libraries now, as ``{file path: threads}``.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_mamba._cpu_threads import blas_limited, blas_threads
    >>> before = blas_threads()
    >>> with blas_limited():
    ...     _ = np.ones((4, 4)) @ np.ones((4, 4))
    ...     all(n == 1 for n in blas_threads().values())
    True
    >>> blas_threads() == before
    True
    """
    return {lib.filepath: lib.get_num_threads() for lib in _blas_libs()}


@contextmanager
def blas_limited():
    """Limit BLAS to ``BLAS_THREADS`` threads inside the block (no-op when 0).

    Blocks nest (and may overlap across Python threads): the limit is set
    when the first one opens and undone when the last one closes.  A BLAS
    already on fewer threads keeps its count.  The BLAS thread count is the
    process's: while a block is open, NumPy matmuls in other Python threads
    run on ``BLAS_THREADS`` threads too.
    """
    global _depth
    if BLAS_THREADS == 0:
        yield
        return
    with _lock:
        _depth += 1
        if _depth == 1:
            for lib in _blas_libs():
                n = lib.get_num_threads()
                if n is not None and n > BLAS_THREADS:
                    _saved.append((lib, n))
                    lib.set_num_threads(BLAS_THREADS)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                while _saved:
                    lib, n = _saved.pop()
                    lib.set_num_threads(n)


@contextmanager
def serial_below(work):
    """Run the block on one Numba thread when ``work < SERIAL_BELOW``.

    Numba's thread count is per Python thread, so other threads keep theirs;
    the count comes back after the block.

    Examples
    --------
    >>> import numba
    >>> from numba_mamba._cpu_threads import SERIAL_BELOW, serial_below
    >>> with serial_below(SERIAL_BELOW - 1):
    ...     numba.get_num_threads()
    1
    >>> before = numba.get_num_threads()
    >>> with serial_below(SERIAL_BELOW):
    ...     numba.get_num_threads() == before
    True
    >>> numba.get_num_threads() == before
    True
    """
    n = numba.get_num_threads() if work < SERIAL_BELOW else 1
    if n == 1:
        yield
        return
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(n)


def hold_heap():
    """Keep freed memory in the process for the next allocations (glibc only; once).

    Sets ``mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)`` and
    ``mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)`` the first time it is
    called (see the module docstring) and returns whether they are in
    force.  False, and nothing set: not glibc, the allocator already set by
    the environment (``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_MMAP_THRESHOLD_``,
    ``MALLOC_TOP_PAD_``, ``MALLOC_MMAP_MAX_`` or ``GLIBC_TUNABLES``), or
    ``NUMBA_MAMBA_HOLD_HEAP=0``.

    Examples
    --------
    >>> from numba_mamba._cpu_threads import hold_heap
    >>> hold_heap() in (True, False) and hold_heap() == hold_heap()
    True
    """
    global _heap
    if _heap is None:
        _heap = _set_malloc_thresholds()
    return _heap


def _set_malloc_thresholds():
    if os.environ.get("NUMBA_MAMBA_HOLD_HEAP", "").strip() == "0":
        return False
    if any(v in os.environ for v in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_",
                                     "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_", "GLIBC_TUNABLES")):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # pragma: no cover (glibc has it)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # both, or the other stays at its start value (setting one stops glibc's adjusting both)
    return (mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
            and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
