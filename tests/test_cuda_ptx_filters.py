"""The sequence-filter GPU kernels compile to sm_90 PTX, and float32 kernels stay float32.

Same method as tests/test_cuda_ptx.py: ``numba.cuda.compile_ptx`` with NVRTC
and a stand-in device reporting compute capability (9, 0), no GPU needed.
A float64 instruction in a float32 kernel would come from a stray Python float
literal or from a libdevice function with a float64 slow path (``sinf`` and
``cosf`` have one, which is why the complex float32 kernels use their own
sine and cosine).
"""

import re

import pytest

cuda = pytest.importorskip("numba.cuda")
import numba  # noqa: E402

if numba.config.ENABLE_CUDASIM:  # pragma: no cover - the simulator has no PTX
    pytest.skip("compile_ptx is not available under the CUDA simulator",
                allow_module_level=True)

from numba.cuda import dispatcher as _dispatcher  # noqa: E402

from cuda_kernels import discretize as kernels  # noqa: E402

CC = (9, 0)
SIGNATURES = {name: rest for name, *rest in kernels.ptx_signatures()}
_F64 = re.compile(r"\.f64\b")


class _Sm90:
    compute_capability = CC


@pytest.fixture(scope="module")
def ptx():
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_dispatcher, "get_current_device", lambda: _Sm90())
        for name, (py_func, argtypes, _) in SIGNATURES.items():
            out[name], _ = cuda.compile_ptx(py_func, argtypes, cc=CC)
    return out


def test_lists_every_kernel_for_both_dtypes_and_real_and_complex():
    for dtype in ("float32", "float64"):
        for kind in ("real", "complex"):
            expected = {f"discretize_forward_{kind}_{dtype}",
                        f"discretize_backward_{kind}_{dtype}"}
            expected |= {f"recurrence_{k}_{kind}_{dtype}" for k in ("summary", "carry",
                                                                     "output")}
            assert expected <= set(SIGNATURES)


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_kernel_compiles_to_sm90_ptx(ptx, name):
    assert ".target sm_90" in ptx[name]
    assert ".entry" in ptx[name]


@pytest.mark.parametrize("name", sorted(n for n, r in SIGNATURES.items() if r[2]))
def test_float32_kernel_has_no_f64(ptx, name):
    lines = [ln.strip() for ln in ptx[name].splitlines() if _F64.search(ln)]
    assert not lines, f"{name}: {len(lines)} float64 lines, e.g. {lines[:5]}"
    assert "__local_depot" not in ptx[name], f"{name} uses local memory"


@pytest.mark.parametrize("name", sorted(n for n, r in SIGNATURES.items() if not r[2]))
def test_float64_kernel_computes_in_float64(ptx, name):
    assert _F64.search(ptx[name])
    assert not re.search(r"\bcvt\.rn\.f32\.f64\b", ptx[name]), "float64 kernel rounds to float32"
