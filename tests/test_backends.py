"""``numba_mamba._backends``: the one loader of the CPU and GPU modules of an operation."""

import numpy as np
import pytest

from numba_mamba import _backends

# operation -> the functions the API calls on either backend's module
CALLED = {
    "scan": ["scan_forward", "scan_backward"],
    "conv1d": ["conv1d_forward", "conv1d_backward"],
    "elementwise": ["silu_forward", "silu_backward", "softplus_forward", "softplus_backward"],
    "step": ["conv_step", "residual_rmsnorm", "ssm_step", "step_cells"],
    "sample": ["choose"],
    "optim": ["adamw_update", "prepare", "record_loss", "sum_of_squares"],
    "embedding": ["embedding_backward"],
}


@pytest.mark.parametrize("name", sorted(CALLED))
def test_numpy_gets_the_cpu_module_with_the_functions_the_api_calls(name):
    module = _backends.backend(np, name)
    assert module.__name__ == f"numba_mamba._cpu_{name}"
    assert module is _backends.cpu_module(name)
    for function in CALLED[name]:
        assert callable(getattr(module, function)), (name, function)


@pytest.mark.parametrize("name", sorted(CALLED))
def test_the_gpu_module_of_an_operation_has_the_same_functions(name):
    pytest.importorskip("numba.cuda")
    import importlib

    module = importlib.import_module(f"numba_mamba.cuda_kernels.{name}")
    for function in CALLED[name]:
        assert callable(getattr(module, function)), (name, function)


def test_without_a_gpu_the_gpu_module_raises_with_what_to_install(monkeypatch):
    from numba import cuda

    monkeypatch.setattr(cuda, "is_available", lambda: False)
    _backends.gpu_module.cache_clear()
    try:
        with pytest.raises(RuntimeError, match=r"pip install 'numba-mamba\[cuda12\]'.*"
                                               r"is_available\(\) is False"):
            _backends.gpu_module("scan")
        with pytest.raises(RuntimeError, match="is_available"):
            _backends.backend(object(), "conv1d")  # (any namespace but NumPy's)
    finally:
        _backends.gpu_module.cache_clear()  # (the failure is not kept either way)
