"""What the GPU test modules share: CuPy, whether it sees a GPU, their marks."""

import pytest


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
