"""discretize: each method against scipy.signal.cont2discrete, the backward pass
against finite differences, broadcasting, dtypes and errors.

The GPU kernels are also run here under the CUDA simulator (in a subprocess:
the simulator must be switched on before numba.cuda is imported) and compared
with the NumPy path, so their logic is checked on a machine without a GPU; on a
GPU (marker ``gpu``) the forward and backward on CuPy arrays are compared with
the NumPy path.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import signal

import numba_mamba as nm
from numba_mamba.discretize import DISCRETIZE_METHODS
from tests import filter_cases

ROOT = Path(__file__).resolve().parents[1]
SCIPY_METHODS = ("zoh", "euler", "backward_diff", "bilinear")
GBT_ALPHA = {"euler": 0.0, "backward_diff": 1.0, "bilinear": 0.5}
# rtol per dtype for forward values computed by a different algorithm
RTOL = {np.float64: 1e-12, np.float32: 2e-6}


def _system(rng, N, cplx):
    A = -rng.uniform(0.1, 3.0, N)
    if cplx:
        A = A + 1j * rng.uniform(-5.0, 5.0, N)
    B = rng.standard_normal(N) + (1j * rng.standard_normal(N) if cplx else 0)
    C = rng.standard_normal(N)
    return A, B, C


def _cont2discrete(A, B, C, D, dt, method):
    ad, bd, cd, dd, _ = signal.cont2discrete((np.diag(A), B[:, None], C[None, :],
                                              np.array([[D]])), dt, method=method)
    return ad, bd[:, 0], cd[0], dd[0, 0]


@pytest.mark.filterwarnings("ignore::numba_mamba.UnstableFilterWarning")  # ('euler', dt = 2)
@pytest.mark.parametrize("cplx", [False, True], ids=["real", "complex"])
@pytest.mark.parametrize("method", SCIPY_METHODS)
def test_each_method_matches_scipy_cont2discrete(method, cplx):
    rng = np.random.default_rng(1)
    A, B, C = _system(rng, 6, cplx)
    for dt in (0.01, 0.3, 2.0):
        ad, bd, _, _ = _cont2discrete(A, B, C, 0.0, dt, method)
        Ab, Bb = nm.discretize(A, B, dt, method)
        # the discretized matrix is diagonal
        np.testing.assert_allclose(ad - np.diag(np.diag(ad)), 0, atol=1e-14)
        np.testing.assert_allclose(Ab, np.diag(ad), rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(Bb, bd, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("cplx", [False, True], ids=["real", "complex"])
def test_mamba_is_zoh_for_A_and_euler_for_B(cplx):
    rng = np.random.default_rng(2)
    A, B, C = _system(rng, 5, cplx)
    ad_zoh, *_ = _cont2discrete(A, B, C, 0.0, 0.4, "zoh")
    _, bd_euler, *_ = _cont2discrete(A, B, C, 0.0, 0.4, "euler")
    Ab, Bb = nm.discretize(A, B, 0.4, "mamba")
    np.testing.assert_allclose(Ab, np.diag(ad_zoh), rtol=1e-12)
    np.testing.assert_allclose(Bb, bd_euler, rtol=1e-12)


@pytest.mark.parametrize("method", ["euler", "backward_diff", "bilinear"])
def test_scipy_gbt_output_pair_is_C_over_den_and_D_plus_alpha_C_Bb(method):
    # what the docstring says scipy does to C and D (the API returns Ab, Bb only)
    rng = np.random.default_rng(3)
    A, B, C = _system(rng, 4, False)
    D, dt, alpha = 0.7, 0.25, GBT_ALPHA[method]
    _, _, cd, dd = _cont2discrete(A, B, C, D, dt, method)
    _, Bb = nm.discretize(A, B, dt, method)
    np.testing.assert_allclose(cd, C / (1 - alpha * dt * A), rtol=1e-12)
    np.testing.assert_allclose(dd, D + alpha * np.dot(C, Bb), rtol=1e-12)


def test_zoh_leaves_C_and_D_unchanged_in_scipy():
    rng = np.random.default_rng(4)
    A, B, C = _system(rng, 4, False)
    _, _, cd, dd = _cont2discrete(A, B, C, 0.3, 0.5, "zoh")
    np.testing.assert_array_equal(cd, C)
    assert dd == 0.3


@pytest.mark.parametrize("method", DISCRETIZE_METHODS)
def test_dt_per_channel_and_per_sample_equal_scalar_calls(method):
    rng = np.random.default_rng(5)
    A = -rng.uniform(0.1, 2.0, (3, 4))           # (channels, N)
    B = rng.standard_normal((3, 4))
    dt_ch = rng.uniform(0.05, 0.5, (3, 1))       # per channel
    Ab, Bb = nm.discretize(A, B, dt_ch, method)
    for d in range(3):
        a, b = nm.discretize(A[d], B[d], float(dt_ch[d, 0]), method)
        np.testing.assert_allclose(Ab[d], a, rtol=1e-14)
        np.testing.assert_allclose(Bb[d], b, rtol=1e-14)
    dt_s = rng.uniform(0.05, 0.5, (3, 1, 7))     # per sample: (channels, 1, L)
    Ab, Bb = nm.discretize(A[..., None], B[..., None], dt_s, method)
    assert Ab.shape == Bb.shape == (3, 4, 7)
    for d in range(3):
        for t in (0, 6):
            a, b = nm.discretize(A[d], B[d], float(dt_s[d, 0, t]), method)
            np.testing.assert_allclose(Ab[d, :, t], a, rtol=1e-14)
            np.testing.assert_allclose(Bb[d, :, t], b, rtol=1e-14)


@pytest.mark.parametrize("dtype", [np.float32, np.complex64, np.float64, np.complex128])
def test_dtype_is_preserved_and_python_scalars_are_weak(dtype):
    rng = np.random.default_rng(6)
    A = (-rng.uniform(0.1, 2.0, 5)).astype(dtype)
    B = np.ones(5, dtype)
    Ab, Bb = nm.discretize(A, B, 0.1, "bilinear")
    assert Ab.dtype == dtype and Bb.dtype == dtype
    Ab64, _ = nm.discretize(A.astype(np.complex128 if np.iscomplexobj(A) else np.float64),
                            B, 0.1, "bilinear")
    np.testing.assert_allclose(Ab, Ab64, rtol=RTOL[np.float32])


def test_zoh_is_exact_near_and_at_A_zero():
    A = np.array([0.0, -1e-12, 1e-9j - 1e-10, -1e-5])
    dt = 0.5
    Ab, Bb = nm.discretize(A, np.ones(4), dt, "zoh")
    z = dt * A
    # Taylor series of dt (e^z - 1) / z, exact to rounding for |z| <= 1e-5
    expected = dt * (1 + z / 2 + z ** 2 / 6 + z ** 3 / 24)
    np.testing.assert_allclose(Bb, expected, rtol=1e-15)
    assert Bb[0] == dt and Ab[0] == 1.0


def _loss(A, B, dt, gAb, gBb, method):
    Ab, Bb = nm.discretize(A, B, dt, method)
    return float(np.real(np.sum(np.conj(gAb) * Ab) + np.sum(np.conj(gBb) * Bb)))


@pytest.mark.parametrize("cplx", [False, True], ids=["real", "complex"])
@pytest.mark.parametrize("method", DISCRETIZE_METHODS)
def test_backward_matches_finite_differences(method, cplx):
    # loss = Re(sum conj(g) f): its gradient is dl/du + i dl/dv per complex input
    rng = np.random.default_rng(7)
    A = -rng.uniform(0.1, 2.0, (3, 4))
    A[0, 0] = -0.02   # z = dt A inside the series branch of phi2 (|z| < 0.1)
    A[0, 1] = -0.3    # just outside it
    B = rng.standard_normal((1, 4))
    if cplx:
        A = A + 1j * rng.uniform(-2, 2, A.shape)
        A[0, 0] = -0.02 + 0.05j
        B = B + 1j * rng.standard_normal(B.shape)
    dt = rng.uniform(0.1, 0.4, (3, 1))
    ctype = np.complex128 if cplx else np.float64
    gAb = rng.standard_normal((3, 4)).astype(ctype)
    gBb = rng.standard_normal((3, 4)).astype(ctype)
    if cplx:
        gAb += 1j * rng.standard_normal((3, 4))
        gBb += 1j * rng.standard_normal((3, 4))
    _, _, backward = nm.discretize_vjp(A, B, dt, method)
    g = backward(gAb, gBb)
    assert g.dA.shape == A.shape and g.dB.shape == B.shape and g.ddt.shape == dt.shape
    eps = 1e-6

    def fd(name, arr, idx, step):
        args = dict(A=A, B=B, dt=dt)
        plus, minus = arr.copy(), arr.copy()
        plus[idx] += step
        minus[idx] -= step
        lp = _loss(**{**args, name: plus}, gAb=gAb, gBb=gBb, method=method)
        lm = _loss(**{**args, name: minus}, gAb=gAb, gBb=gBb, method=method)
        return (lp - lm) / (2 * eps)

    for name, arr, grad in (("A", A, g.dA), ("B", B, g.dB), ("dt", dt, g.ddt)):
        num = np.zeros(arr.shape, dtype=arr.dtype)
        for idx in np.ndindex(arr.shape):
            num[idx] = fd(name, arr, idx, eps)
            if np.iscomplexobj(arr):
                num[idx] += 1j * fd(name, arr, idx, 1j * eps)
        err = np.max(np.abs(grad - num))
        assert np.allclose(grad, num, rtol=1e-6, atol=1e-8), f"d{name}: max error {err:.2e}"


def test_backward_of_python_scalar_dt_is_None_and_dBb_defaults_to_zero():
    A, B = np.array([-1.0, -2.0]), np.array([1.0, 3.0])
    _, _, backward = nm.discretize_vjp(A, B, 0.2, "zoh")
    g = backward(np.ones(2))
    assert g.ddt is None
    np.testing.assert_allclose(g.dA, 0.2 * np.exp(0.2 * A), rtol=1e-14)
    np.testing.assert_array_equal(g.dB, 0.0)


def test_rejects_unknown_method_listing_the_choices():
    with pytest.raises(ValueError, match=r"^method must be one of 'zoh', 'euler', "
                                         r"'backward_diff', 'bilinear', 'mamba', got 'tustin'"):
        nm.discretize(np.array([-1.0]), np.array([1.0]), 0.1, "tustin")


def test_rejects_shapes_that_do_not_broadcast_naming_all_three():
    with pytest.raises(ValueError, match=r"^A, B and dt must broadcast.*A \(3, 4\), "
                                         r"B \(3, 5\), dt \(\)"):
        nm.discretize(-np.ones((3, 4)), np.ones((3, 5)), 0.1)


def test_rejects_negative_dt_and_complex_dt():
    with pytest.raises(ValueError, match="^dt must be finite and >= 0"):
        nm.discretize(-np.ones(3), np.ones(3), np.array([0.1, -0.1, 0.2]))
    with pytest.raises(TypeError, match="^dt must have dtype"):
        nm.discretize(-np.ones(3), np.ones(3), np.array([0.1j]))


def test_backward_rejects_wrong_gradient_shape():
    _, _, backward = nm.discretize_vjp(-np.ones((2, 3)), np.ones(3), 0.1)
    with pytest.raises(ValueError, match=r"^dAb must have shape \(2, 3\) like Ab, got \(3,\)"):
        backward(np.ones(3))


# ------------------------------------------------- on a GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cplx", [False, True], ids=["real", "complex"])
@pytest.mark.parametrize("method", filter_cases.METHODS)
def test_gpu_discretize_and_backward_match_cpu(gpu, method, cplx, dtype):
    rng = np.random.default_rng(0)
    A, B, _ = filter_cases.system(rng, (5,), 7, cplx, dtype)
    A[0, :3] = [0, -1e-3, -0.05]
    dt = rng.uniform(0.05, 1.0, (5, 1)).astype(dtype)
    gA = rng.standard_normal((5, 7)).astype(A.dtype)
    gB = rng.standard_normal((5, 7)).astype(A.dtype)
    Ab, Bb, bwd = nm.discretize_vjp(A, B, dt, method)
    g = bwd(gA, gB)
    Abg, Bbg, bwdg = nm.discretize_vjp(gpu.put(A), gpu.put(B), gpu.put(dt), method)
    gg = bwdg(gpu.put(gA), gpu.put(gB))
    assert isinstance(Abg, gpu.xp.ndarray) and Abg.dtype == Ab.dtype
    for name, got, ref in (("Ab", Abg, Ab), ("Bb", Bbg, Bb), ("dA", gg.dA, g.dA),
                           ("dB", gg.dB, g.dB), ("ddt", gg.ddt, g.ddt)):
        filter_cases.close(name, got, ref, dtype)


# ------------------------------------------------- GPU kernels, simulated
def _simulate(dtype_name):
    """Compare the CUDA kernels (simulator) with the NumPy path; subprocess only."""
    import numba

    assert numba.config.ENABLE_CUDASIM
    from numba_mamba.cuda_kernels import discretize as dk
    from numba_mamba.discretize import _backward_cpu, _forward_cpu

    ftype = np.dtype(dtype_name)
    rng = np.random.default_rng(8)
    M = 24
    report = {}
    for cplx in (False, True):
        A = -rng.uniform(0.01, 3.0, M)
        A[:4] = [0.0, -1e-3, -0.05, -0.2]   # phi1/phi2 at and near 0, both branches
        B = rng.standard_normal(M)
        gA, gB = rng.standard_normal(M), rng.standard_normal(M)
        if cplx:
            A = A + 1j * rng.uniform(-20, 20, M)   # includes |Im z| > pi/4 (quadrants)
            A[0] = 0.0
            B = B + 1j * rng.standard_normal(M)
            gA, gB = gA + 1j * rng.standard_normal(M), gB + 1j * rng.standard_normal(M)
        ctype = (np.complex64 if ftype == np.float32 else np.complex128) if cplx else ftype
        A, B = A.astype(ctype), B.astype(ctype)
        gA, gB = gA.astype(ctype), gB.astype(ctype)
        dt = rng.uniform(0.05, 1.0, M).astype(ftype)
        for method in DISCRETIZE_METHODS:
            Ab, Bb = dk.discretize_forward(A, B, dt, method)
            dA, dB, ddt = dk.discretize_backward(A, B, dt, gA, gB, method)
            # the NumPy path in float64 is the oracle
            c64 = np.complex128 if cplx else np.float64
            A64, B64, dt64 = A.astype(c64), B.astype(c64), dt.astype(np.float64)
            rAb, rBb = _forward_cpu(A64, B64, dt64, method)
            rdA, rdB, rddt = _backward_cpu(A64, B64, dt64, gA.astype(c64), gB.astype(c64),
                                           method)
            for key, got, ref in (("Ab", Ab, rAb), ("Bb", Bb, rBb), ("dA", dA, rdA),
                                  ("dB", dB, rdB), ("ddt", ddt, rddt)):
                # rounding in float arithmetic is relative to the largest term,
                # which grows with |A| (dAb/dt = A e^z, ...)
                scale = np.maximum(np.abs(ref), 1.0 + np.abs(A64))
                err = float(np.max(np.abs(got - ref) / scale) / np.finfo(ftype).eps)
                report[f"{'c' if cplx else 'r'}-{method}-{key}"] = err
    return report


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_simulated_gpu_kernels_match_numpy(dtype):
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, __file__, dtype], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    tol = 16  # units of the dtype's epsilon, relative to the largest term
    bad = {k: v for k, v in report.items() if not v <= tol}
    assert not bad, f"errors above {tol} eps: {bad}; all {report}"
    assert len(report) == 2 * len(DISCRETIZE_METHODS) * 5


if __name__ == "__main__":
    print(json.dumps(_simulate(sys.argv[1])))
