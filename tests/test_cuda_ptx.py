"""Every GPU kernel compiles to PTX for sm_90, and float32 kernels stay float32.

``numba.cuda.compile_ptx`` needs NVRTC/NVVM (the ``cu12`` extra of numba-cuda)
but no GPU, so this runs on any machine.  A stray Python float literal in a
float32 kernel would promote arithmetic to float64 (slow on most GPUs, and a
silent change of precision); the PTX shows it as ``.f64`` instructions.

Numba compiles a kernel's device functions through their dispatchers, which
ask the current device for its compute capability; here a stand-in device
reporting (9, 0) answers, so the whole kernel is compiled for sm_90 without a
driver.
"""

import re

import numpy as np
import pytest

cuda = pytest.importorskip("numba.cuda")
import numba  # noqa: E402

if numba.config.ENABLE_CUDASIM:  # pragma: no cover - the simulator has no PTX
    pytest.skip("compile_ptx is not available under the CUDA simulator",
                allow_module_level=True)

from numba.cuda import dispatcher as _dispatcher  # noqa: E402

from cuda_kernels import scan  # noqa: E402

CC = (9, 0)
SIGNATURES = {name: rest for name, *rest in scan.ptx_signatures()}
_F64 = re.compile(r"\.f64\b")


class _Sm90:
    compute_capability = CC


@pytest.fixture(scope="module")
def ptx():
    """name -> PTX text of every kernel signature, compiled once."""
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_dispatcher, "get_current_device", lambda: _Sm90())
        for name, (py_func, argtypes, _, launch_bounds) in SIGNATURES.items():
            text, _ = cuda.compile_ptx(py_func, argtypes, cc=CC, launch_bounds=launch_bounds)
            out[name] = text
    return out


def test_lists_forward_and_backward_for_both_dtypes():
    names = set(SIGNATURES)
    for dtype in ("float32", "float64"):
        threads, items = scan.DEFAULT_TUNING[np.dtype(dtype)]
        tag = f"{dtype}_t{threads}_i{items}"
        assert {f"forward_{tag}", f"backward_{tag}"} <= names


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_kernel_compiles_to_sm90_ptx(ptx, name):
    text = ptx[name]
    assert ".target sm_90" in text
    assert ".entry" in text
    # the warp combine uses shuffles, not the simulator's shared-memory path
    assert "shfl.sync" in text


@pytest.mark.parametrize("name", sorted(n for n, r in SIGNATURES.items() if r[2]))
def test_float32_kernel_has_no_f64(ptx, name):
    lines = [ln.strip() for ln in ptx[name].splitlines() if _F64.search(ln)]
    assert not lines, f"{name}: {len(lines)} float64 lines, e.g. {lines[:5]}"


@pytest.mark.parametrize("name", sorted(n for n, r in SIGNATURES.items() if not r[2]))
def test_float64_kernel_computes_in_float64(ptx, name):
    assert _F64.search(ptx[name])
    assert not re.search(r"\bcvt\.rn\.f32\.f64\b", ptx[name]), "float64 kernel rounds to float32"


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_default_tuning_keeps_item_arrays_in_registers(ptx, dtype):
    # the per-thread item arrays are fully unrolled into registers; a local
    # memory depot would mean they are indexed dynamically (slow)
    threads, items = scan.DEFAULT_TUNING[np.dtype(dtype)]
    for kind in ("forward", "backward"):
        text = ptx[f"{kind}_{dtype}_t{threads}_i{items}"]
        assert "__local_depot" not in text, f"{kind} {dtype} uses local memory"



@pytest.mark.parametrize("dtype,threads,items", [("float32", 256, 16), ("float64", 128, 16)])
def test_chunk_too_large_for_static_shared_memory_is_rejected(dtype, threads, items):
    # four staged rows of threads * (items + 1) values must fit in 48 KiB
    with pytest.raises(ValueError, match=rf"^threads \* items = {threads * items} needs"):
        scan._make_kernels(np.dtype(dtype), threads, items, sim=False)
