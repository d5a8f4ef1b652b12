"""``tests.gpu``: how the GPU test modules find CuPy and skip without a GPU (CPU)."""

import sys
import types
from types import SimpleNamespace

import pytest

from tests.gpu import gpu_module


@pytest.mark.parametrize("devices", [0, 1, "error"])
def test_gpu_test_modules_skip_where_cupy_sees_no_gpu(monkeypatch, devices):
    """``tests.gpu.gpu_module``: every test marked ``gpu``, and skipped unless CuPy
    sees a device (a missing driver raises in CuPy: skipped too)."""
    def count():
        if devices == "error":
            raise RuntimeError("no CUDA driver")
        return devices

    fake = types.ModuleType("cupy")
    fake.cuda = SimpleNamespace(runtime=SimpleNamespace(getDeviceCount=count))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    cupy, have_gpu, marks = gpu_module()
    assert cupy is fake and have_gpu == (devices == 1)
    assert marks[0].name == "gpu" and marks[1].name == "skipif"
    assert marks[1].args == (devices != 1,)
