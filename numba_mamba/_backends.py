"""The one place that finds the module computing an operation on the CPU or the GPU.

Every operation has a CPU module, ``numba_mamba._cpu_<name>`` (Numba
``@njit`` kernels on NumPy arrays), and a GPU module,
``numba_mamba.cuda_kernels.<name>`` (Numba CUDA kernels on CuPy arrays),
with the same functions and arguments.  :func:`backend` gives the one for an
array namespace; the API modules ask it rather than importing either
directly, so that a CPU-only install never imports the CUDA stack and a
missing stack is reported once, with what to install.

Examples
--------
>>> import numpy as np
>>> from numba_mamba._backends import backend
>>> backend(np, "scan").__name__
'numba_mamba._cpu_scan'
"""

import functools
import importlib

import numpy as np

from ._validation import missing_gpu_stack_message

__all__ = ["backend", "cpu_module", "gpu_module"]


@functools.lru_cache(maxsize=None)
def cpu_module(name):
    """The CPU module of operation ``name``: ``numba_mamba._cpu_<name>``."""
    return importlib.import_module(f"{__package__}._cpu_{name}")


@functools.lru_cache(maxsize=None)  # (a failure raises, so it is not kept)
def gpu_module(name):
    """The GPU module of operation ``name``: ``numba_mamba.cuda_kernels.<name>``.

    Raises
    ------
    RuntimeError
        Where numba-cuda or CuPy is missing or sees no GPU, saying what to
        install.
    """
    try:
        from numba import cuda

        if not cuda.is_available():
            raise RuntimeError("numba.cuda.is_available() is False")
        return importlib.import_module(f"{__package__}.cuda_kernels.{name}")
    except (ImportError, RuntimeError) as exc:
        raise RuntimeError(f"{missing_gpu_stack_message} ({exc})") from exc


def backend(xp, name):
    """The module of operation ``name`` for arrays of namespace ``xp``: the CPU
    one for NumPy (:func:`cpu_module`), else the GPU one (:func:`gpu_module`)."""
    return cpu_module(name) if xp is np else gpu_module(name)
