"""What the GPU test modules share: CuPy, whether it sees a GPU, their marks."""

import functools

import pytest


@functools.lru_cache(maxsize=1)
def cupy_or_why_not():
    """``(cupy, None)`` where CuPy imports and sees a CUDA GPU, else ``(None, reason)``."""
    try:
        import cupy
    except ImportError as exc:
        return None, f"CuPy is not installed ({exc})"
    try:
        if cupy.cuda.runtime.getDeviceCount() > 0:
            return cupy, None
    except Exception as exc:  # CUDA driver or runtime missing
        return None, f"CuPy sees no CUDA GPU ({type(exc).__name__}: {exc})"
    return None, "CuPy sees no CUDA GPU"


def gpu_module():
    """``(cupy, have_gpu, pytestmark)`` for a GPU test module.

    Skips the whole module where CuPy is not installed; where it is but sees
    no CUDA GPU (driver or runtime missing), the module's tests are marked to
    be skipped.  Every test is marked ``gpu`` (``pytest -m gpu`` runs them).
    """
    cupy = pytest.importorskip("cupy")
    try:
        have_gpu = cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # CUDA driver or runtime missing
        have_gpu = False
    return cupy, have_gpu, [pytest.mark.gpu,
                            pytest.mark.skipif(not have_gpu, reason="no CUDA GPU")]
