"""ssm_filter, ssm_kernel and SSMFilter against scipy (independent oracles).

- time-invariant filters: scipy.signal.lfilter per state, scipy.signal.dlsim
  with the mapped system, dimpulse for the kernel; discretization by
  scipy.signal.cont2discrete, never by the code under test;
- time-varying filters: scipy.linalg.solve_banded on the bidiagonal system;
- properties (hypothesis): splitting with zi/zf, streaming, conv == scan, axis;
- the GPU recurrence kernels under the CUDA simulator (subprocess) against
  the CPU engine, and the selective-scan route of the GPU run on NumPy arrays;
- tests taking ``backend`` run on NumPy and on CuPy arrays (``gpu``: marker
  ``gpu``, skipped where CuPy sees no CUDA GPU); those marked ``gpu`` alone
  compare every GPU route with the CPU path on the same inputs: the
  selective-scan route (real A, 'zoh'/'mamba'), the chunked-scan kernels
  (complex A and the other methods), the FFT convolution, the kernel.
"""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import linalg, signal

import numba_mamba as nm
from numba_mamba import filters as F
from tests import filter_cases
from tests.scan_cases import non_native

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("zoh", "euler", "backward_diff", "bilinear")
ALL_METHODS = METHODS + ("mamba",)
# max |got - expected| / max(|expected|, 1) per compute dtype
TOL = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 2e-5}


def assert_close(name, got, expected, dtype):
    got = np.asarray(got, dtype=np.complex128 if np.iscomplexobj(got) else np.float64)
    scale = max(float(np.max(np.abs(expected))), 1.0)
    err = float(np.max(np.abs(got - expected))) / scale
    tol = TOL[np.dtype(dtype)]
    assert got.shape == np.shape(expected), f"{name}: shape {got.shape} != {np.shape(expected)}"
    assert err <= tol, f"{name}: max relative error {err:.3e} > {tol:.0e}"


def c2d(A, B, dt, method):
    """Diagonal Ab, Bb of one channel by scipy.signal.cont2discrete (the oracle)."""
    if method == "mamba":
        ad, _, _, _, _ = signal.cont2discrete((np.diag(A), B[:, None], np.ones((1, len(A))),
                                               0), dt, method="zoh")
        return np.diag(ad), dt * B
    ad, bd, _, _, _ = signal.cont2discrete((np.diag(A), B[:, None], np.ones((1, len(A))), 0),
                                           dt, method=method)
    return np.diag(ad), bd[:, 0]


def make_lti(rng, Dc, N, cplx=False, dt_range=(0.05, 0.5)):
    A = -rng.uniform(0.2, 3.0, (Dc, N))
    if cplx:
        A = A + 1j * rng.uniform(-3.0, 3.0, (Dc, N))
    B = rng.standard_normal((Dc, N))
    C = rng.standard_normal((Dc, N)) + (1j * rng.standard_normal((Dc, N)) if cplx else 0)
    dt = rng.uniform(*dt_range, (Dc, 1))
    return A, B, C, dt


def lfilter_oracle(A, B, C, D, dt, x, method, zi=None):
    """y and final state by scipy.signal.lfilter per state; channels on axis 0."""
    Dc, N = A.shape
    y = np.zeros(x.shape)
    zf = np.zeros((Dc, N), complex)
    for d in range(Dc):
        Ab, Bb = c2d(A[d], B[d], float(dt[d, 0]), method)
        acc = np.zeros(x.shape[-1], complex)
        for n in range(N):
            z0 = None if zi is None else [Ab[n] * zi[d, n]]
            if z0 is None:
                h = signal.lfilter([Bb[n]], [1.0, -Ab[n]], x[d].astype(complex))
            else:
                h, zout = signal.lfilter([Bb[n]], [1.0, -Ab[n]], x[d].astype(complex), zi=z0)
                zf[d, n] = zout[0] / Ab[n]     # scipy's zf is Ab h_{L-1}
            acc += C[d, n] * h
        y[d] = acc.real + (0 if D is None else D[d, 0] * x[d])
    return y, zf


# ------------------------------------------------------- LTI vs scipy
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("method", ALL_METHODS)
def test_lti_matches_lfilter_per_state(method, dtype):
    rng = np.random.default_rng(10)
    A, B, C, dt = make_lti(rng, 3, 5)
    D = rng.standard_normal((3, 1))
    x = rng.standard_normal((3, 400)).astype(dtype)
    args = [a.astype(dtype) for a in (A, B, C, D, dt)]
    y = nm.ssm_filter(args[0], args[1], args[2], x, D=args[3], dt=args[4], method=method)
    assert y.dtype == dtype
    # oracle in float64 on the values rounded to dtype
    ref, _ = lfilter_oracle(*[a.astype(np.float64) for a in args], x.astype(np.float64),
                            method)
    assert_close("y", y, ref, dtype)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_complex_A_matches_lfilter_with_complex_coefficients(method):
    rng = np.random.default_rng(11)
    A, B, C, dt = make_lti(rng, 2, 4, cplx=True)
    x = rng.standard_normal((2, 300))
    zi = rng.standard_normal((2, 4)) + 1j * rng.standard_normal((2, 4))
    y, zf = nm.ssm_filter(A, B, C, x, dt=dt, method=method, zi=zi)
    ref, zf_ref = lfilter_oracle(A, B, C, None, dt, x, method, zi=zi)
    assert_close("y", y, ref, np.float64)
    assert_close("zf", zf, zf_ref, np.float64)
    assert np.iscomplexobj(zf) and y.dtype == np.float64


@pytest.mark.parametrize("method", ALL_METHODS)
def test_matches_dlsim_with_mapped_system_and_x0_equal_to_zi(method):
    # scipy's convention: y_k = Cd s_k + Dd u_k with s_k the state before sample k
    rng = np.random.default_rng(12)
    A, B, C, dt = make_lti(rng, 2, 3)
    D = rng.standard_normal((2, 1))
    zi = rng.standard_normal((2, 3))
    x = rng.standard_normal((2, 200))
    y, zf = nm.ssm_filter(A, B, C, x, D=D, dt=dt, method=method, zi=zi)
    for d in range(2):
        Ab, Bb = c2d(A[d], B[d], float(dt[d, 0]), method)
        sys_d = signal.dlti(np.diag(Ab), Bb[:, None], (C[d] * Ab)[None, :],
                            np.array([[C[d] @ Bb + D[d, 0]]]), dt=float(dt[d, 0]))
        _, yd, sd = signal.dlsim(sys_d, x[d], x0=zi[d])
        assert_close(f"y[{d}]", y[d], yd[:, 0], np.float64)
        # dlsim's last state is the one before the last sample: step it once more
        assert_close(f"zf[{d}]", zf[d], Ab * sd[-1] + Bb * x[d, -1], np.float64)


@pytest.mark.parametrize("method", METHODS)
def test_zi_maps_to_lfilter_zi_times_Ab_and_back(method):
    rng = np.random.default_rng(13)
    A, B, C, dt = make_lti(rng, 2, 3)
    x = rng.standard_normal((2, 150))
    zi = rng.standard_normal((2, 3))
    y, zf = nm.ssm_filter(A, B, C, x, dt=dt, method=method, zi=zi)
    ref, zf_ref = lfilter_oracle(A, B, C, None, dt, x, method, zi=zi)
    assert_close("y", y, ref, np.float64)
    assert_close("zf", zf, zf_ref.real, np.float64)
    # lfilter_zi's steady state for a unit step: the SSM state Bb / (1 - Ab) per state
    Ab, Bb = c2d(A[0], B[0], float(dt[0, 0]), method)
    zi_ss = np.array([signal.lfilter_zi([Bb[n]], [1.0, -Ab[n]])[0] for n in range(3)])
    _, h = nm.ssm_filter(A[0], B[0], C[0], np.ones(5), dt=float(dt[0, 0]), method=method,
                         zi=zi_ss / Ab)
    np.testing.assert_allclose(h, zi_ss / Ab, rtol=1e-10)  # a steady state stays


@pytest.mark.parametrize("cplx", [False, True], ids=["real", "complex"])
@pytest.mark.parametrize("method", ALL_METHODS)
def test_kernel_matches_dimpulse(method, cplx):
    rng = np.random.default_rng(14)
    A, B, C, dt = make_lti(rng, 2, 4, cplx=cplx)
    K = nm.ssm_kernel(A, B, C, dt, 64, method)
    assert K.shape == (2, 64) and K.dtype == np.float64
    for d in range(2):
        Ab, Bb = c2d(A[d], B[d], float(dt[d, 0]), method)
        # dimpulse of dlti(Ab, Bb, C Ab, C Bb): the complex system's real part
        sys_d = signal.dlti(np.diag(Ab), Bb[:, None], (C[d] * Ab)[None, :],
                            np.array([[C[d] @ Bb]]), dt=float(dt[d, 0]))
        if cplx:  # dimpulse is real-only: simulate the complex system by dlsim on an impulse
            imp = np.zeros(64)
            imp[0] = 1
            s = np.zeros(4, complex)
            ref = np.empty(64)
            for k in range(64):
                ref[k] = (C[d] @ (Ab * s) + (C[d] @ Bb) * imp[k]).real
                s = Ab * s + Bb * imp[k]
        else:
            _, (ref,) = signal.dimpulse(sys_d, n=64)
            ref = ref[:, 0]
        assert_close(f"K[{d}]", K[d], ref, np.float64)


# 'euler' is only conditionally stable: some complex poles leave the unit circle
@pytest.mark.filterwarnings("ignore::numba_mamba.UnstableFilterWarning")
@pytest.mark.parametrize("cplx", [False, True], ids=["real", "complex"])
@pytest.mark.parametrize("method", ALL_METHODS)
def test_conv_mode_equals_scan_mode_with_state(method, cplx):
    rng = np.random.default_rng(15)
    A, B, C, dt = make_lti(rng, 3, 6, cplx=cplx)
    x = rng.standard_normal((2, 3, 1000))
    zi = rng.standard_normal((2, 3, 6)) + (1j * rng.standard_normal((2, 3, 6)) if cplx else 0)
    ys, zs = nm.ssm_filter(A, B, C, x, dt=dt, method=method, zi=zi, mode="scan")
    yc, zc = nm.ssm_filter(A, B, C, x, dt=dt, method=method, zi=zi, mode="conv")
    assert_close("y", yc, ys, np.float64)
    assert_close("zf", zc, zs, np.float64)


def test_conv_mode_float32_equals_float64_scan():
    rng = np.random.default_rng(16)
    A, B, C, dt = make_lti(rng, 4, 8)
    x = rng.standard_normal((4, 5000))
    args32 = [a.astype(np.float32) for a in (A, B, C, x, dt)]
    y32 = nm.ssm_filter(*args32[:4], dt=args32[4], mode="conv")
    ref = nm.ssm_filter(*[a.astype(np.float64) for a in args32[:4]],
                        dt=args32[4].astype(np.float64), mode="scan")
    assert y32.dtype == np.float32
    assert_close("y", y32, ref, np.float32)


# ------------------------------------------------- time-varying filters
def banded_oracle(Ab, Bb, C, x, zi):
    """Per state: h_t - Ab_t h_{t-1} = Bb_t x_t (h_{-1} = zi) by solve_banded."""
    N, L = Ab.shape
    y = np.zeros(L)
    hf = np.zeros(N, complex)
    for n in range(N):
        ab = np.zeros((2, L), complex)
        ab[0] = 1.0                   # main diagonal
        ab[1, :-1] = -Ab[n, 1:]       # subdiagonal: -Ab_t at row t, column t-1
        rhs = (Bb[n] * x).astype(complex)
        rhs[0] += Ab[n, 0] * zi[n]
        h = linalg.solve_banded((1, 0), ab, rhs)
        y += (C[n] * h).real
        hf[n] = h[-1]
    return y, hf


@pytest.mark.parametrize("cplx", [False, True], ids=["real", "complex"])
@pytest.mark.parametrize("method", ALL_METHODS)
def test_time_varying_matches_solve_banded(method, cplx):
    # dt per sample (irregular sampling), B and C varying along time
    rng = np.random.default_rng(17)
    N, L = 3, 80
    A = -rng.uniform(0.2, 2.0, N) + (1j * rng.uniform(-2, 2, N) if cplx else 0)
    t = np.cumsum(rng.uniform(0.01, 0.6, L))       # irregular sample times
    dt = np.diff(t, prepend=0.0)
    Bt = rng.standard_normal((L, N))               # x's shape (L,) + (N,)
    Ct = rng.standard_normal((L, N))
    x = rng.standard_normal(L)
    zi = rng.standard_normal(N) + (1j * rng.standard_normal(N) if cplx else 0)
    y, zf = nm.ssm_filter(A, Bt, Ct, x, dt=dt, method=method, zi=zi)
    Ab = np.empty((N, L), complex)
    Bb = np.empty((N, L), complex)
    for k in range(L):
        Ab[:, k], Bb[:, k] = c2d(A, Bt[k], dt[k], method)
    ref, hf = banded_oracle(Ab, Bb, Ct.T, x, zi)
    assert_close("y", y, ref, np.float64)
    assert_close("zf", zf, hf if cplx else hf.real, np.float64)


def test_time_varying_with_time_on_axis_0_and_batch():
    rng = np.random.default_rng(18)
    L, Bt, Dc, N = 50, 2, 3, 4
    A = -rng.uniform(0.2, 2.0, (Dc, N))
    x = rng.standard_normal((L, Bt, Dc))              # time first
    dt = rng.uniform(0.05, 0.5, (L, Bt, 1))           # per sample, shared by channels
    B = rng.standard_normal((L, Bt, 1, N))            # varying, shared by channels
    C = rng.standard_normal((Dc, N))                  # constant
    y = nm.ssm_filter(A, B, C, x, dt=dt, axis=0)
    assert y.shape == (L, Bt, Dc)
    for b in range(Bt):
        for d in range(Dc):
            Ab = np.exp(dt[:, b, 0, None] * A[d]).T                       # (N, L)
            Bb = (np.expm1(dt[:, b, 0, None] * A[d]) / A[d] * B[:, b, 0]).T
            ref, _ = banded_oracle(Ab, Bb, np.repeat(C[d][:, None], L, 1), x[:, b, d],
                                   np.zeros(N))
            assert_close(f"y[:, {b}, {d}]", y[:, b, d], ref, np.float64)


def test_zero_dt_holds_the_state():
    A, B, C = np.array([-1.0, -2.0]), np.ones(2), np.ones(2)
    x = np.array([1.0, 5.0, 7.0])
    y, h = nm.ssm_filter(A, B, C, x, dt=np.array([0.3, 0.0, 0.0]), zi=np.zeros(2))
    assert y[1] == y[0] and y[2] == y[0]


# ------------------------------------------------- GPU routes run on NumPy
@pytest.mark.parametrize("varying", ["lti", "dt", "dt+B+C"])
@pytest.mark.parametrize("method", ["zoh", "mamba"])
def test_selective_scan_route_equals_recurrence(method, varying):
    # the GPU sends real A with 'zoh'/'mamba' to selective_scan with B' = phi1(dt A) B;
    # the same route runs on NumPy arrays here
    rng = np.random.default_rng(19)
    A, B, C, dt = make_lti(rng, 3, 4)
    x = rng.standard_normal((2, 3, 90))
    if "dt" in varying:
        dt = rng.uniform(0.05, 0.5, (2, 3, 90))
    if "B" in varying:
        B = rng.standard_normal((2, 1, 90, 4))
        C = rng.standard_normal((2, 3, 90, 4))
    zi = rng.standard_normal((2, 3, 4))
    p = F._prepare(A, B, C, x, None, dt, method, -1, zi)
    y1, h1 = F._selective_scan_gpu(p)
    y2, h2 = F._scan(p)
    assert_close("y", y1, y2, np.float64)
    assert_close("zf", h1, h2, np.float64)


# ------------------------------------------------- shapes, axis, dtypes
def test_one_signal_through_a_filter_bank_broadcasts():
    rng = np.random.default_rng(20)
    A, B, C, dt = make_lti(rng, 5, 3)
    x = rng.standard_normal((1, 100))
    y = nm.ssm_filter(A, B, C, x, dt=dt)
    assert y.shape == (5, 100)
    for d in range(5):
        np.testing.assert_allclose(y[d], nm.ssm_filter(A[d], B[d], C[d], x[0],
                                                       dt=float(dt[d, 0])), rtol=1e-13)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_output_keeps_the_dtype_of_x(dtype):
    rng = np.random.default_rng(21)
    A, B, C, dt = make_lti(rng, 2, 3)
    x = rng.standard_normal((2, 20)).astype(dtype)
    y, zf = nm.ssm_filter(A, B, C, x, dt=dt, zi=np.zeros((2, 3)))
    assert y.dtype == dtype
    assert zf.dtype == (np.float64 if dtype == "float64" else np.float32)


def test_D_and_dt_broadcast_against_x_on_any_axis():
    rng = np.random.default_rng(22)
    A, B, C, _ = make_lti(rng, 3, 2)
    x = rng.standard_normal((40, 3))
    D = rng.standard_normal((1, 3))
    dt = rng.uniform(0.1, 0.5, (1, 3))
    y = nm.ssm_filter(A, B, C, x, D=D, dt=dt, axis=0)
    y_t = nm.ssm_filter(A, B, C, x.T, D=D.T, dt=dt.T, axis=-1)
    np.testing.assert_allclose(y, y_t.T, rtol=1e-14)


# ------------------------------------------------- properties (hypothesis)
@st.composite
def filter_case(draw):
    seed = draw(st.integers(0, 2 ** 32 - 1))
    rng = np.random.default_rng(seed)
    N = draw(st.integers(1, 5))
    batch = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
    L = draw(st.integers(2, 120))
    ndim = len(batch) + 1
    axis = draw(st.integers(-ndim, ndim - 1))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    method = draw(st.sampled_from(ALL_METHODS))
    cplx = draw(st.booleans())
    poles = -np.exp(rng.uniform(-3, 1.5, batch + (N,)))         # |Re A| from 0.05 to 4.5
    if cplx:
        poles = poles + 1j * rng.uniform(-4, 4, poles.shape)
    dt = float(rng.uniform(0.01, 0.4))
    if method == "euler":  # only conditionally stable: keep |1 + dt A| < 1
        dt = min(dt, 0.9 * float(np.min(2 * np.abs(poles.real) / np.abs(poles) ** 2)))
    B = rng.standard_normal(batch + (N,))
    C = rng.standard_normal(batch + (N,))
    shape = list(batch)
    shape.insert(axis % ndim, L)
    x = rng.standard_normal(tuple(shape)).astype(dtype)
    split = draw(st.integers(1, L - 1))
    return dict(A=poles, B=B, C=C, x=x, dt=dt, method=method, axis=axis, split=split,
                dtype=np.dtype(dtype))


_SETTINGS = settings(max_examples=30, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])
_QUIET = pytest.mark.filterwarnings("ignore::numba_mamba.UnstableFilterWarning")


@_QUIET
@_SETTINGS
@given(filter_case())
def test_split_with_state_equals_one_pass(case):
    kw = dict(dt=case["dt"], method=case["method"], axis=case["axis"])
    A, B, C, x = case["A"], case["B"], case["C"], case["x"]
    zi0 = np.zeros(A.shape)
    y, zf = nm.ssm_filter(A, B, C, x, zi=zi0, **kw)
    first, second = np.split(x, [case["split"]], axis=case["axis"])
    y1, h = nm.ssm_filter(A, B, C, first, zi=zi0, **kw)
    y2, h2 = nm.ssm_filter(A, B, C, second, zi=h, **kw)
    assert_close("y", np.concatenate([y1, y2], axis=case["axis"]), y.astype(np.float64),
                 case["dtype"])
    assert_close("zf", h2, zf, case["dtype"])


@_QUIET
@_SETTINGS
@given(filter_case())
def test_streaming_step_equals_one_pass(case):
    kw = dict(dt=case["dt"], method=case["method"])
    A, B, C = case["A"], case["B"], case["C"]
    x = np.moveaxis(case["x"], case["axis"], -1)            # the class takes time last
    y = nm.ssm_filter(A, B, C, x, **kw)
    f = nm.SSMFilter(A, B, C, **kw)
    k = case["split"]
    parts = [f(x[..., :k])] + [f.step(x[..., t])[..., None] for t in range(k, x.shape[-1])]
    assert_close("y", np.concatenate(parts, axis=-1), y.astype(np.float64), case["dtype"])


@_QUIET
@_SETTINGS
@given(filter_case())
def test_conv_equals_scan_and_axis_is_a_moveaxis(case):
    kw = dict(dt=case["dt"], method=case["method"])
    A, B, C, x, axis = case["A"], case["B"], case["C"], case["x"], case["axis"]
    ys = nm.ssm_filter(A, B, C, x, axis=axis, mode="scan", **kw)
    yc = nm.ssm_filter(A, B, C, x, axis=axis, mode="conv", **kw)
    assert ys.dtype == yc.dtype == case["dtype"]
    assert_close("conv", yc, ys.astype(np.float64), case["dtype"])
    y_last = nm.ssm_filter(A, B, C, np.moveaxis(x, axis, -1), **kw)
    np.testing.assert_array_equal(np.moveaxis(ys, axis, -1), y_last)


# ------------------------------------------------- bad input
def test_unstable_poles_warn():
    A, B, C = np.array([0.5, -1.0]), np.ones(2), np.ones(2)
    with pytest.warns(nm.UnstableFilterWarning, match="positive real part"):
        nm.ssm_filter(A, B, C, np.ones(10))


def test_euler_with_too_large_dt_warns_about_the_discrete_poles():
    A, B, C = np.array([-1.0]), np.ones(1), np.ones(1)
    with pytest.warns(nm.UnstableFilterWarning, match=r"'euler' lie outside the unit circle"):
        nm.ssm_filter(A, B, C, np.ones(10), dt=3.0, method="euler")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nm.ssm_filter(A, B, C, np.ones(10), dt=3.0, method="bilinear")  # A-stable: silent


def test_rejects_mismatched_state_counts_naming_the_argument():
    with pytest.raises(ValueError, match=r"^C must have 4 states \(like A\) in its last axis, "
                                         r"got shape \(3, 5\)"):
        nm.ssm_filter(-np.ones((3, 4)), np.ones((3, 4)), np.ones((3, 5)), np.ones((3, 10)))
    with pytest.raises(ValueError, match=r"^zi must have shape \(\.\.\., 4\)"):
        nm.ssm_filter(-np.ones((3, 4)), 1.0, 1.0, np.ones((3, 10)), zi=np.zeros((3, 3)))


def test_rejects_channels_that_do_not_broadcast_listing_them():
    with pytest.raises(ValueError, match=r"channel axes .* x \(3,\), A \(2,\)"):
        nm.ssm_filter(-np.ones((2, 4)), 1.0, 1.0, np.ones((3, 10)))


def test_rejects_varying_B_of_wrong_length_and_dt_of_wrong_length():
    with pytest.raises(ValueError, match=r"^B varies along time .* length 10 .* got shape "
                                         r"\(3, 9, 4\)"):
        nm.ssm_filter(-np.ones((3, 4)), np.ones((3, 9, 4)), 1.0, np.ones((3, 10)))
    with pytest.raises(ValueError, match=r"^dt must have length 1 or 10"):
        nm.ssm_filter(-np.ones((3, 4)), 1.0, 1.0, np.ones((3, 10)), dt=np.ones(3))


def test_rejects_conv_for_time_varying_and_unknown_mode():
    with pytest.raises(ValueError, match=r"^mode='conv' needs a time-invariant filter"):
        nm.ssm_filter(-np.ones(2), 1.0, 1.0, np.ones(10), dt=np.full(10, 0.1), mode="conv")
    with pytest.raises(ValueError, match=r"^mode must be one of 'auto', 'scan', 'conv'"):
        nm.ssm_filter(-np.ones(2), 1.0, 1.0, np.ones(10), mode="fft")


def test_rejects_bad_axis_empty_signal_and_complex_x():
    with pytest.raises(ValueError, match=r"^axis must be an integer in \[-2, 1\]"):
        nm.ssm_filter(-np.ones(2), 1.0, 1.0, np.ones((2, 5)), axis=2)
    with pytest.raises(ValueError, match="^x must have at least one sample"):
        nm.ssm_filter(-np.ones(2), 1.0, 1.0, np.ones((2, 0)))
    with pytest.raises(TypeError, match="^x must have dtype"):
        nm.ssm_filter(-np.ones(2), 1.0, 1.0, np.ones(5) * 1j)


def test_ssm_kernel_rejects_bad_length():
    with pytest.raises(ValueError, match=r"^L must be an integer >= 1 \(the number of taps\)"):
        nm.ssm_kernel(-np.ones(2), 1.0, 1.0, 0.1, 0)


# ------------------------------------------------- byte order, causality, SSMFilter's state
def _rng(seed=0):
    return np.random.default_rng(seed)


def _filter_args(rng, D=3, N=4):
    return dict(A=-rng.uniform(0.1, 1, (D, N)), B=rng.standard_normal((D, N)),
                C=rng.standard_normal((D, N)))


def test_big_endian_float64_computes_in_float64():
    """A ``>f8`` signal was filtered in float32 while the result said ``>f8``."""
    rng = _rng(1)
    p = _filter_args(rng)
    x = rng.standard_normal((3, 200))
    want = nm.ssm_filter(**p, x=x)
    got = nm.ssm_filter(**{k: non_native(v) for k, v in p.items()}, x=non_native(x))
    assert got.dtype == np.float64 and got.dtype.isnative
    np.testing.assert_array_equal(got, want)
    got = nm.ssm_filter(**p, x=non_native(x), zi=np.zeros((3, 4)))[1]
    assert got.dtype == np.float64


@pytest.mark.parametrize("code", ["f8", "f4"])
def test_discretize_kernel_and_streaming_in_non_native_byte_order(code):
    rng = _rng(2)
    p = {k: v.astype(code) for k, v in _filter_args(rng).items()}
    s = {k: non_native(v, code) for k, v in p.items()}
    dt = rng.uniform(0.1, 1, (3, 1)).astype(code)
    sdt = non_native(dt, code)
    ones = np.ones((3, 4), code)
    pairs = [(nm.discretize(p["A"], p["B"], dt), nm.discretize(s["A"], s["B"], sdt)),
             (nm.discretize_vjp(p["A"], p["B"], dt)[2](ones),
              nm.discretize_vjp(s["A"], s["B"], sdt)[2](non_native(ones, code))),
             ((nm.ssm_kernel(**p, dt=dt, L=16),), (nm.ssm_kernel(**s, dt=sdt, L=16),))]
    for want, got in pairs:
        for w, g in zip(want, got):
            assert g.dtype == w.dtype == np.dtype(code) and g.dtype.isnative
            np.testing.assert_array_equal(g, w)
    x = rng.standard_normal((3, 20)).astype(code)
    f, fs = nm.SSMFilter(**p), nm.SSMFilter(**s)
    for piece in (x[:, :10], x[:, 10:19]):
        w, g = f(piece), fs(non_native(piece, code))
        assert g.dtype == np.dtype(code) and g.dtype.isnative
        np.testing.assert_array_equal(g, w)
    w, g = f.step(x[:, 19]), fs.step(non_native(x[:, 19], code))
    assert g.dtype == np.dtype(code) and g.dtype.isnative
    np.testing.assert_array_equal(g, w)
    assert fs.state.dtype.isnative


def _lti(rng, L, dtype=np.float32):
    p = {k: v.astype(dtype) for k, v in _filter_args(rng, D=2, N=8).items()}
    return p, rng.standard_normal((2, L)).astype(dtype)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_conv_mode_never_spreads_a_non_finite_sample_backwards(value):
    """mode='conv' turned every output before a NaN or inf sample NaN."""
    p, x = _lti(_rng(4), 4096)
    t = 3000
    clean = nm.ssm_filter(**p, x=x, mode="scan")
    bad = x.copy()
    bad[1, t] = value
    for mode in ("conv", "auto", "scan"):
        y = nm.ssm_filter(**p, x=bad, mode=mode)
        np.testing.assert_array_equal(y[:, :t], np.r_[clean[:1, :t], clean[1:, :t]])
        np.testing.assert_array_equal(y[0], clean[0])  # (the other channel)
        assert not np.isfinite(y[1, t])
        zf = nm.ssm_filter(**p, x=bad, mode=mode, zi=np.zeros((2, 8), np.float32))[1]
        assert np.isfinite(zf[0]).all() and not np.isfinite(zf[1]).all()


def test_auto_mode_outputs_before_an_outlier_do_not_move():
    """An outlier changes no output before it, to the bit, in the default mode."""
    p, x = _lti(_rng(5), 2**14)
    t = 2**14 - 100
    spiked = x.copy()
    spiked[:, t] = 1e6
    for mode in ("auto", "scan"):
        a = nm.ssm_filter(**p, x=x, mode=mode)
        b = nm.ssm_filter(**p, x=spiked, mode=mode)
        np.testing.assert_array_equal(a[:, :t], b[:, :t])
    f, g = nm.SSMFilter(**p), nm.SSMFilter(**p)
    np.testing.assert_array_equal(f(x)[:, :t], g(spiked)[:, :t])


def test_auto_mode_scans_on_every_device():
    from numba_mamba import filters

    assert filters._pick_mode("auto") == "scan" and filters._pick_mode("conv") == "conv"
    with pytest.raises(ValueError, match="^mode must be one of"):
        filters._pick_mode(True)


def test_ssmfilter_step_cache_follows_the_batch_shape_and_reset():
    """step cached coefficients of the first call's batch shape; reset kept them."""
    rng = _rng(6)
    p = _filter_args(rng, D=2, N=3)
    f = nm.SSMFilter(**p)
    batch = rng.standard_normal((4, 2))
    assert f.step(batch).shape == (4, 2)
    f.reset()
    one = rng.standard_normal(2)
    y = f.step(one)
    assert y.shape == (2,)
    np.testing.assert_allclose(y, nm.ssm_filter(**p, x=one[:, None])[:, 0], rtol=1e-12)
    y2 = f.step(one)  # (from the cache now)
    np.testing.assert_allclose(y2, nm.ssm_filter(**p, x=np.c_[one, one])[:, 1], rtol=1e-12)


def test_ssmfilter_validates_in_init():
    p = _filter_args(_rng(7), D=2, N=3)
    with pytest.raises(ValueError, match="^mode must be one of"):
        nm.SSMFilter(**p, mode="fft")
    with pytest.raises(ValueError, match="^B must have 3 states"):
        nm.SSMFilter(p["A"], np.ones((2, 5)), p["C"])
    with pytest.raises(ValueError, match="channel axes of the arguments must broadcast"):
        nm.SSMFilter(np.resize(p["A"], (4, 3)), p["B"], p["C"])
    with pytest.raises(ValueError, match="^A must be finite"):
        nm.SSMFilter(np.full((2, 3), np.nan), p["B"], p["C"])
    with pytest.raises(ValueError, match="^dt must be finite"):
        nm.SSMFilter(**p, dt=-1.0)
    with pytest.raises(ValueError, match="^zi must have shape"):
        nm.SSMFilter(**p, zi=np.zeros((2, 4)))


def test_ssmfilter_change_of_channels_names_the_state():
    rng = _rng(8)
    f = nm.SSMFilter(-np.ones(3), np.ones(3), np.ones(3))  # channels broadcast from x
    f(rng.standard_normal((2, 10)))
    with pytest.raises(ValueError, match=r"zi \(2,\).*state from earlier samples.*reset\(\)"):
        f(rng.standard_normal((5, 10)))
    f.reset()
    assert f(rng.standard_normal((5, 10))).shape == (5, 10)
    f.reset()
    f.step(rng.standard_normal(2))
    with pytest.raises(ValueError, match=r"zi \(2,\).*state from earlier samples.*reset\(\)"):
        f.step(rng.standard_normal(5))


# ------------------------------------------------- on both backends, and GPU against CPU
def test_lti_long_signal_matches_lfilter_per_state(backend):
    rng = np.random.default_rng(3)
    A, B, C = filter_cases.system(rng, (2,), 3, False, np.float64)
    x = rng.standard_normal((2, 100_000))
    dt = 0.1
    y = nm.ssm_filter(*(backend.put(v) for v in (A, B, C, x)), dt=dt)
    ref = np.zeros_like(x)
    for d in range(2):
        ad, bd, *_ = signal.cont2discrete((np.diag(A[d]), B[d][:, None], C[d][None], 0), dt)
        for n in range(3):
            ref[d] += C[d, n] * signal.lfilter([bd[n, 0]], [1, -ad[n, n]], x[d])
    filter_cases.close("y", backend.host(y), ref, np.float64)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_streaming_equals_one_pass(backend, dtype):
    rng = np.random.default_rng(4)
    A, B, C = filter_cases.system(rng, (3,), 4, False, dtype)
    x = backend.put(rng.standard_normal((3, 400)).astype(dtype))
    args = [backend.put(v) for v in (A, B, C)]
    y = nm.ssm_filter(*args, x, dt=0.2)
    f = nm.SSMFilter(*args, dt=0.2)
    parts = [f(x[:, :150]), f(x[:, 150:390])] + [f.step(x[:, t])[:, None]
                                                  for t in range(390, 400)]
    filter_cases.close("y", backend.host(backend.xp.concatenate(parts, axis=-1)),
                       backend.host(y).astype(np.float64), dtype)


GPU_CASES = [(m, c, v) for m in filter_cases.METHODS for c in (False, True)
             for v in ("lti", "varying")]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("method,cplx,varying", GPU_CASES,
                         ids=[f"{m}-{'c' if c else 'r'}-{v}" for m, c, v in GPU_CASES])
@pytest.mark.parametrize("L", [1, 300, 5000])
def test_gpu_scan_matches_cpu(gpu, method, cplx, varying, dtype, L):
    rng = np.random.default_rng(1)
    A, B, C = filter_cases.system(rng, (3,), 4, cplx, dtype)
    x = rng.standard_normal((2, 3, L)).astype(dtype)
    dt = rng.uniform(0.05, 0.3, (3, 1)).astype(dtype)
    if varying == "varying":
        dt = rng.uniform(0.05, 0.3, (2, 3, L)).astype(dtype)
        B = rng.standard_normal((2, 1, L, 4)).astype(dtype)
    zi = rng.standard_normal((2, 3, 4)).astype(A.dtype)
    D = rng.standard_normal((3, 1)).astype(dtype)
    kw = dict(method=method, mode="scan")
    y, zf = nm.ssm_filter(A, B, C, x, D=D, dt=dt, zi=zi, **kw)
    yg, zfg = nm.ssm_filter(*(gpu.put(v) for v in (A, B, C, x)), D=gpu.put(D),
                            dt=gpu.put(dt), zi=gpu.put(zi), **kw)
    assert isinstance(yg, gpu.xp.ndarray) and yg.dtype == dtype
    filter_cases.close("y", yg, y, dtype)
    filter_cases.close("zf", zfg, zf, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cplx", [False, True], ids=["real", "complex"])
@pytest.mark.parametrize("method", filter_cases.METHODS)
def test_gpu_conv_and_kernel_match_cpu(gpu, method, cplx, dtype):
    rng = np.random.default_rng(2)
    A, B, C = filter_cases.system(rng, (4,), 8, cplx, dtype)
    x = rng.standard_normal((4, 3000)).astype(dtype)
    dt = rng.uniform(0.05, 0.3, (4, 1)).astype(dtype)
    zi = rng.standard_normal((4, 8)).astype(A.dtype)
    y, zf = nm.ssm_filter(A, B, C, x, dt=dt, zi=zi, method=method, mode="scan")
    yg, zfg = nm.ssm_filter(*(gpu.put(v) for v in (A, B, C, x)), dt=gpu.put(dt),
                            zi=gpu.put(zi), method=method, mode="conv")
    filter_cases.close("y", yg, y, dtype)
    filter_cases.close("zf", zfg, zf, dtype)
    K = nm.ssm_kernel(A, B, C, dt, 500, method)
    Kg = nm.ssm_kernel(*(gpu.put(v) for v in (A, B, C, dt)), 500, method)
    filter_cases.close("K", Kg, K, dtype)


@pytest.mark.gpu
def test_gpu_rejects_mixed_numpy_and_cupy(gpu):
    with pytest.raises(TypeError, match="must all be NumPy .* or all CuPy"):
        nm.ssm_filter(gpu.put(-np.ones(2)), np.ones(2), np.ones(2), np.ones(10))


# ------------------------------------------------- GPU kernels, simulated
def _simulate():
    """The chunked-scan kernels (simulator) against the CPU engine; subprocess only."""
    import numba

    assert numba.config.ENABLE_CUDASIM
    from numba_mamba.cuda_kernels import discretize as dk

    rng = np.random.default_rng(23)
    R, N, L = 3, 2, 37
    report = {}
    for dtype in (np.float32, np.float64):
        for cplx in (False, True):
            for kinds in ("ccc", "vcc", "vvv", "cvc"):
                ctype = (np.complex64 if dtype == np.float32 else np.complex128) if cplx \
                    else dtype

                def arr(kind, scale=1.0, shift=0.0):
                    La = L if kind == "v" else 1
                    v = rng.uniform(-1, 1, (R, La, N)) * scale + shift
                    if cplx:
                        v = v + 1j * rng.uniform(-1, 1, (R, La, N)) * scale
                    return v.astype(ctype)

                a = arr(kinds[0], 0.3, 0.5)
                b, c = arr(kinds[1]), arr(kinds[2])
                x = rng.standard_normal((R, L)).astype(dtype)
                h0 = arr("c")[:, 0].copy()
                for chunk in (1, 5, 16, 64):
                    y, hf = dk.recurrence(x, a, b, c, h0, chunk=chunk)
                    c64 = np.complex128 if cplx else np.float64
                    y_ref = np.empty((R, L))
                    hf_ref = np.empty((R, N), c64)
                    F._recurrence_cpu(x.astype(np.float64), a.astype(c64), b.astype(c64),
                                      c.astype(c64), h0.astype(c64), y_ref, hf_ref)
                    err = max(float(np.max(np.abs(y - y_ref))),
                              float(np.max(np.abs(hf - hf_ref))))
                    key = f"{np.dtype(dtype).name}-{'c' if cplx else 'r'}-{kinds}-T{chunk}"
                    report[key] = float(err / np.finfo(dtype).eps)
    return report


def test_simulated_gpu_recurrence_matches_cpu_engine():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, __file__], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    bad = {k: v for k, v in report.items() if not v <= 64}   # units of eps
    assert not bad, f"errors above 64 eps: {bad}"
    assert len(report) == 2 * 2 * 4 * 4


if __name__ == "__main__":
    print(json.dumps(_simulate()))
