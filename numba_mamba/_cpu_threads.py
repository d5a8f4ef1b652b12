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
"""

import os
import threading
from contextlib import contextmanager

import numba

__all__ = ["BLAS_THREADS", "SERIAL_BELOW", "blas_limited", "blas_threads", "serial_below"]

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
