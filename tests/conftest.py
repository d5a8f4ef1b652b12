"""What every test module shares: the PTX tests are opt-in.

The PTX tests (``ptx`` in their node id) compile the kernels for sm_90 with
NVRTC, which comes with the opt-in extra ``ptx`` (numba-cuda's ``cu12``
extra; CI installs it).  Where no NVRTC library can be loaded they are
skipped, so that the ``test`` extra needs no CUDA toolkit.  The CUDA
simulator's tests need numba-cuda only, which the ``test`` extra brings.
"""

import functools

import pytest


@functools.lru_cache(maxsize=1)
def nvrtc_missing():
    """None where the NVRTC library loads; else why not."""
    try:
        from cuda.pathfinder import load_nvidia_dynamic_lib

        load_nvidia_dynamic_lib("nvrtc")
    except Exception as exc:  # (ImportError, or the library not found)
        return f"{type(exc).__name__}: {exc}"
    return None


def pytest_collection_modifyitems(config, items):
    ptx = [item for item in items if "ptx" in item.nodeid.lower()]
    reason = nvrtc_missing() if ptx else None
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"PTX tests need NVRTC (pip install '.[test,ptx]'): {reason}")
    for item in ptx:
        item.add_marker(skip)
