"""The model kernels (conv1d, elementwise, step) compile to sm_90 PTX; float32 stays float32.

As ``tests/test_cuda_ptx.py`` does for the scan: ``numba.cuda.compile_ptx``
needs NVRTC/NVVM but no GPU, and a stand-in device reporting (9, 0) answers
the dispatchers of the device functions.  A ``.f64`` instruction in a float32
kernel means a Python float literal (or a float64 helper) crept in.
"""

import re

import pytest

cuda = pytest.importorskip("numba.cuda")
import numba  # noqa: E402

if numba.config.ENABLE_CUDASIM:  # pragma: no cover - the simulator has no PTX
    pytest.skip("compile_ptx is not available under the CUDA simulator",
                allow_module_level=True)

from numba.cuda import dispatcher as _dispatcher  # noqa: E402

from cuda_kernels import conv1d, elementwise, step  # noqa: E402

CC = (9, 0)
SIGNATURES = {name: rest for mod in (conv1d, elementwise, step)
              for name, *rest in mod.ptx_signatures()}
_F64 = re.compile(r"\.f64\b")


class _Sm90:
    compute_capability = CC


@pytest.fixture(scope="module")
def ptx():
    """name -> PTX text of every kernel, compiled once."""
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_dispatcher, "get_current_device", lambda: _Sm90())
        for name, (py_func, argtypes, _, launch_bounds) in SIGNATURES.items():
            kwargs = dict(launch_bounds=launch_bounds) if launch_bounds else {}
            out[name], _ = cuda.compile_ptx(py_func, argtypes, cc=CC, **kwargs)
    return out


def test_lists_every_kernel_for_both_dtypes():
    for dtype in ("float32", "float64"):
        assert {f"conv1d_forward_{dtype}_w4", f"conv1d_backward_{dtype}_w4",
                f"silu_forward_{dtype}", f"silu_backward_{dtype}",
                f"softplus_forward_{dtype}", f"softplus_backward_{dtype}",
                f"conv_step_{dtype}", f"ssm_step_{dtype}"} <= set(SIGNATURES)


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_kernel_compiles_to_sm90_ptx(ptx, name):
    assert ".target sm_90" in ptx[name]
    assert ".entry" in ptx[name]


@pytest.mark.parametrize("name", sorted(n for n, r in SIGNATURES.items() if r[2]))
def test_float32_kernel_has_no_f64(ptx, name):
    lines = [ln.strip() for ln in ptx[name].splitlines() if _F64.search(ln)]
    assert not lines, f"{name}: {len(lines)} float64 lines, e.g. {lines[:5]}"


@pytest.mark.parametrize("name", sorted(n for n, r in SIGNATURES.items() if not r[2]))
def test_float64_kernel_computes_in_float64(ptx, name):
    assert _F64.search(ptx[name])


def test_conv1d_backward_uses_shared_memory_and_barriers(ptx):
    text = ptx["conv1d_backward_float32_w4"]
    assert ".shared" in text and "bar.sync" in text
