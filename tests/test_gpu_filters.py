"""The sequence-filter API on CuPy arrays (GPU) against the CPU path and scipy.

Runs only where CuPy sees a CUDA GPU (marker ``gpu``).  The CPU path is
itself tested against scipy.signal in tests/test_filters.py and
tests/test_discretize.py; here every GPU route is compared with it on the same
inputs: the discretization kernels (forward and backward), the selective-scan
route (real A, 'zoh'/'mamba'), the chunked-scan kernels (complex A and the
other methods), the FFT convolution, the kernel, and streaming.
"""

import numpy as np
import pytest
from scipy import signal

import numba_mamba as nm
from tests.gpu import gpu_module

cupy, _HAVE_GPU, pytestmark = gpu_module()

METHODS = ("zoh", "euler", "backward_diff", "bilinear", "mamba")
# max |gpu - cpu| / max(|cpu|, 1): both compute in the dtype under test
TOL = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 1e-4}


def close(name, got, ref, dtype):
    got = cupy.asnumpy(got) if isinstance(got, cupy.ndarray) else got
    assert got.shape == ref.shape, f"{name}: shape {got.shape} != {ref.shape}"
    err = float(np.max(np.abs(got.astype(np.complex128) - ref))) / max(
        float(np.max(np.abs(ref))), 1.0)
    assert err <= TOL[np.dtype(dtype)], f"{name}: max relative error {err:.3e}"


def system(rng, lead, N, cplx, dtype):
    # with dt <= 0.3 every method is stable, 'euler' included (|1 + dt A| < 1)
    ctype = (np.complex64 if dtype == np.float32 else np.complex128) if cplx else dtype
    A = -rng.uniform(0.2, 3.0, lead + (N,))
    if cplx:
        A = A + 1j * rng.uniform(-1, 1, A.shape)
    B = rng.standard_normal(lead + (N,))
    C = rng.standard_normal(lead + (N,))
    return A.astype(ctype), B.astype(dtype), C.astype(ctype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cplx", [False, True], ids=["real", "complex"])
@pytest.mark.parametrize("method", METHODS)
def test_gpu_discretize_and_backward_match_cpu(method, cplx, dtype):
    rng = np.random.default_rng(0)
    A, B, _ = system(rng, (5,), 7, cplx, dtype)
    A[0, :3] = [0, -1e-3, -0.05]
    dt = rng.uniform(0.05, 1.0, (5, 1)).astype(dtype)
    gA = rng.standard_normal((5, 7)).astype(A.dtype)
    gB = rng.standard_normal((5, 7)).astype(A.dtype)
    Ab, Bb, bwd = nm.discretize_vjp(A, B, dt, method)
    g = bwd(gA, gB)
    Abg, Bbg, bwdg = nm.discretize_vjp(cupy.asarray(A), cupy.asarray(B), cupy.asarray(dt),
                                       method)
    gg = bwdg(cupy.asarray(gA), cupy.asarray(gB))
    assert isinstance(Abg, cupy.ndarray) and Abg.dtype == Ab.dtype
    for name, got, ref in (("Ab", Abg, Ab), ("Bb", Bbg, Bb), ("dA", gg.dA, g.dA),
                           ("dB", gg.dB, g.dB), ("ddt", gg.ddt, g.ddt)):
        close(name, got, ref, dtype)


CASES = [(m, c, v) for m in METHODS for c in (False, True) for v in ("lti", "varying")]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("method,cplx,varying", CASES,
                         ids=[f"{m}-{'c' if c else 'r'}-{v}" for m, c, v in CASES])
@pytest.mark.parametrize("L", [1, 300, 5000])
def test_gpu_scan_matches_cpu(method, cplx, varying, dtype, L):
    rng = np.random.default_rng(1)
    A, B, C = system(rng, (3,), 4, cplx, dtype)
    x = rng.standard_normal((2, 3, L)).astype(dtype)
    dt = rng.uniform(0.05, 0.3, (3, 1)).astype(dtype)
    if varying == "varying":
        dt = rng.uniform(0.05, 0.3, (2, 3, L)).astype(dtype)
        B = rng.standard_normal((2, 1, L, 4)).astype(dtype)
    zi = rng.standard_normal((2, 3, 4)).astype(A.dtype)
    D = rng.standard_normal((3, 1)).astype(dtype)
    kw = dict(method=method, mode="scan")
    y, zf = nm.ssm_filter(A, B, C, x, D=D, dt=dt, zi=zi, **kw)
    yg, zfg = nm.ssm_filter(*(cupy.asarray(v) for v in (A, B, C, x)), D=cupy.asarray(D),
                            dt=cupy.asarray(dt), zi=cupy.asarray(zi), **kw)
    assert isinstance(yg, cupy.ndarray) and yg.dtype == dtype
    close("y", yg, y, dtype)
    close("zf", zfg, zf, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cplx", [False, True], ids=["real", "complex"])
@pytest.mark.parametrize("method", METHODS)
def test_gpu_conv_and_kernel_match_cpu(method, cplx, dtype):
    rng = np.random.default_rng(2)
    A, B, C = system(rng, (4,), 8, cplx, dtype)
    x = rng.standard_normal((4, 3000)).astype(dtype)
    dt = rng.uniform(0.05, 0.3, (4, 1)).astype(dtype)
    zi = rng.standard_normal((4, 8)).astype(A.dtype)
    y, zf = nm.ssm_filter(A, B, C, x, dt=dt, zi=zi, method=method, mode="scan")
    yg, zfg = nm.ssm_filter(*(cupy.asarray(v) for v in (A, B, C, x)), dt=cupy.asarray(dt),
                            zi=cupy.asarray(zi), method=method, mode="conv")
    close("y", yg, y, dtype)
    close("zf", zfg, zf, dtype)
    K = nm.ssm_kernel(A, B, C, dt, 500, method)
    Kg = nm.ssm_kernel(*(cupy.asarray(v) for v in (A, B, C, dt)), 500, method)
    close("K", Kg, K, dtype)


def test_gpu_lti_matches_lfilter_per_state():
    rng = np.random.default_rng(3)
    A, B, C = system(rng, (2,), 3, False, np.float64)
    x = rng.standard_normal((2, 100_000))
    dt = 0.1
    yg = nm.ssm_filter(cupy.asarray(A), cupy.asarray(B), cupy.asarray(C), cupy.asarray(x),
                       dt=dt)
    ref = np.zeros_like(x)
    for d in range(2):
        ad, bd, *_ = signal.cont2discrete((np.diag(A[d]), B[d][:, None], C[d][None], 0), dt)
        for n in range(3):
            ref[d] += C[d, n] * signal.lfilter([bd[n, 0]], [1, -ad[n, n]], x[d])
    close("y", yg, ref, np.float64)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gpu_streaming_equals_one_pass(dtype):
    rng = np.random.default_rng(4)
    A, B, C = system(rng, (3,), 4, False, dtype)
    x = cupy.asarray(rng.standard_normal((3, 400)).astype(dtype))
    args = [cupy.asarray(v) for v in (A, B, C)]
    y = nm.ssm_filter(*args, x, dt=0.2)
    f = nm.SSMFilter(*args, dt=0.2)
    parts = [f(x[:, :150]), f(x[:, 150:390])] + [f.step(x[:, t])[:, None]
                                                  for t in range(390, 400)]
    close("y", cupy.concatenate(parts, axis=-1), cupy.asnumpy(y).astype(np.float64), dtype)


def test_gpu_rejects_mixed_numpy_and_cupy():
    with pytest.raises(TypeError, match="must all be NumPy .* or all CuPy"):
        nm.ssm_filter(cupy.asarray(-np.ones(2)), np.ones(2), np.ones(2), np.ones(10))
