"""The launch seam on the GPU: the raw path builds for the kernels the API
uses, the Numba path (the fallback) gives the same results and is safe inside
a CUDA graph capture, and a second process loads the kernels from Numba's
disk cache and still launches them through the raw path.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.gpu import gpu_module

cupy, HAVE_GPU, pytestmark = gpu_module()

ROOT = Path(__file__).resolve().parents[1]


def _scan_inputs(rng, Bt=2, D=8, N=4, L=300):
    f = np.float32
    u = cupy.asarray(rng.standard_normal((Bt, D, L)).astype(f))
    delta = cupy.asarray(rng.uniform(0.0, 0.5, (Bt, D, L)).astype(f))
    A = cupy.asarray(-rng.uniform(0.5, 2.0, (D, N)).astype(f))
    B = cupy.asarray(rng.standard_normal((Bt, 1, N, L)).astype(f))
    C = cupy.asarray(rng.standard_normal((Bt, 1, N, L)).astype(f))
    z = cupy.asarray(rng.standard_normal((Bt, D, L)).astype(f))
    return dict(u=u, delta=delta, A=A, B=B, C=C, z=z, delta_softplus=True)


def test_gpu_kernels_of_the_public_api_take_the_raw_path():
    """With numba-cuda as installed, no kernel the API launches falls back."""
    import numba_mamba as nm
    from numba_mamba.cuda_kernels import _launch
    from numba_mamba.cuda_kernels.settings import settings

    assert settings.raw_launch, "NUMBA_MAMBA_RAW_LAUNCH=0 is set"
    kw = _scan_inputs(np.random.default_rng(0))
    for engine in ("blocks", "states"):
        with settings.override(engine=engine):
            out, _, backward = nm.selective_scan_vjp(**kw)
            backward(cupy.ones_like(out))
    cupy.cuda.get_current_stream().synchronize()
    device = cupy.cuda.runtime.getDevice()
    built = {k: r for (k, d), r in _launch._RAW.items() if d == device}
    assert len(built) >= 4
    assert all(r is not None for r in built.values()), {
        getattr(k, "__name__", k): _launch.fallback_reason(k) for k, r in built.items()
        if r is None}


def test_gpu_numba_path_matches_raw_path_and_runs_in_a_captured_graph(monkeypatch):
    """Every kernel forced onto the Numba path (the raw one failing to
    build): the same results as the raw path, also as a replayed CUDA graph
    (the views are made without a synchronization, which a capture forbids)."""
    import numba_mamba as nm
    from numba_mamba.cuda_kernels import _launch
    from numba_mamba.graphs import CapturedStep

    kw = _scan_inputs(np.random.default_rng(1))
    expected = nm.selective_scan(**kw).get()  # (raw path)

    class Broken:
        def __init__(self, dispatcher):
            raise AttributeError("'_Kernel' object has no attribute '_codelibrary' (test)")

    monkeypatch.setattr(_launch, "RawLaunch", Broken)
    monkeypatch.setattr(_launch, "_RAW", {})
    monkeypatch.setattr(_launch, "_WHY", {})
    monkeypatch.setattr(_launch, "_WARNED", [])
    # (the launches the state engine prepared per layout chose their path when prepared)
    from numba_mamba.cuda_kernels import scan_states

    monkeypatch.setattr(scan_states, "_FORWARD_PLANS", {})
    calls = []
    numba_launch = _launch.numba_launch

    def spy(kernel, grid, block, args):
        calls.append(kernel)
        numba_launch(kernel, grid, block, args)

    monkeypatch.setattr(_launch, "numba_launch", spy)
    with pytest.warns(_launch.LaunchFallbackWarning, match="_codelibrary"):
        eager = nm.selective_scan(**kw).get()
    assert calls and all(r is None for r in _launch._RAW.values())
    np.testing.assert_array_equal(eager, expected)

    step = CapturedStep(lambda: nm.selective_scan(**kw), graph=True)
    step()  # eager
    calls.clear()
    out = step()  # captured (through the Numba path), then replayed
    assert step.captured and calls
    np.testing.assert_array_equal(out.get(), expected)
    kw["u"][...] = kw["u"] * 2  # new data in the static input: a replay reads it
    again = nm.selective_scan(**dict(kw, u=kw["u"].copy())).get()
    calls.clear()
    out = step()
    assert not calls  # (a replay launches nothing from Python)
    np.testing.assert_array_equal(out.get(), again)


_CACHED = r"""
import json, cupy, numpy as np
from numba_mamba.cuda_kernels import _launch, elementwise
x = cupy.linspace(-5, 5, 10000, dtype=cupy.float32)
y = elementwise.silu_forward(x)
k = elementwise.get_kernels(np.dtype(np.float32))["silu_forward"]
print(json.dumps({"hits": sum(k.stats.cache_hits.values()),
                  "misses": sum(k.stats.cache_misses.values()),
                  "path": _launch.launch_path(k), "refused": _launch.cache_refusals(),
                  "y": y.get().tolist()[::997]}))
"""


def test_gpu_second_process_loads_kernels_from_the_disk_cache(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_MAMBA_KERNEL_CACHE"}
    env["NUMBA_CACHE_DIR"] = str(tmp_path)
    # (the source tree first, then what the parent had: a NumPy brought along, say)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    runs = []
    for _ in range(2):
        result = subprocess.run([sys.executable, "-c", _CACHED], env=env, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, result.stderr
        runs.append(json.loads(result.stdout.strip().splitlines()[-1]))
    first, second = runs
    assert first["refused"] == {} and first["misses"] == 1 and first["hits"] == 0
    assert second["hits"] == 1 and second["misses"] == 0
    assert first["path"] == second["path"] == "raw"  # (a cached kernel has its cubin)
    assert first["y"] == second["y"]
    assert any(tmp_path.rglob("*.nbi")), "no cache index was written"
