"""Tests of the vectorized CPU scan (issue 22): the arithmetic exp, softplus and
sigmoid of ``numba_mamba._cpu_vmath``, and ``numba_mamba._cpu_scan``'s
blocks of 16 states (N a multiple, or padded), its channel slices and its
time-major B/C planes, on many channels and groups
(``tests/test_cpu_backend.py`` covers the options on 4 channels)."""

import numpy as np
import pytest
from numba import njit

from numba_mamba import _cpu_scan
from numba_mamba._cpu_vmath import EXP_COEFFS, njit_noalias, vexp, vsigmoid, vsoftplus
from tests.scan_cases import TOLERANCES
from tests.test_cpu_backend import TOL, _check_against_reference, _draw, _run_backend


@njit(error_model="numpy")
def _apply(kind, x, out):
    for i in range(x.size):
        if kind == 0:
            out[i] = vexp(x[i])
        elif kind == 1:
            out[i] = vsoftplus(x[i])
        else:
            out[i] = vsigmoid(x[i])


def _run(kind, x):
    out = np.empty_like(x)
    _apply(kind, x, out)
    return out


def _ulps(got, exact, dtype):
    """|got - exact| in units of the last place of ``exact`` rounded to ``dtype``."""
    exact_rounded = exact.astype(dtype)
    ulp = np.spacing(np.abs(exact_rounded)).astype(np.longdouble)
    return np.abs(got.astype(np.longdouble) - exact) / ulp


# where vexp promises its accuracy: results normal, x below (bias + 0.5) ln 2
# (above it vexp gives inf, where the exact result lies within a factor
# sqrt(2) of the largest finite number)
EXP_RANGE = {np.float32: (-87.3, 88.37), np.float64: (-708.3, 709.43)}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_vexp_within_one_and_a_half_units_in_the_last_place(dtype):
    lo, hi = EXP_RANGE[dtype]
    x = np.linspace(lo, hi, 1_000_001).astype(dtype)
    x = np.concatenate([x, np.random.default_rng(0).uniform(-2, 2, 200_000).astype(dtype),
                        np.array([0, -0.0, 1e-30, -1e-30], dtype)])
    exact = np.exp(x.astype(np.longdouble))
    got = _run(0, x)
    assert got.dtype == dtype
    err = _ulps(got, exact, dtype)
    assert err.max() <= 1.5, f"worst {err.max():.3f} ulp at x = {x[err.argmax()]!r}"
    assert _run(0, np.zeros(1, dtype))[0] == 1  # exp(0) is exact


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_vexp_special_values(dtype):
    lo, hi = EXP_RANGE[dtype]
    x = np.array([np.nan, -np.inf, np.inf, -1e30, 1e30, lo - 2, hi + 2], dtype)
    got = _run(0, x)
    assert np.isnan(got[0])
    np.testing.assert_array_equal(got[1:], np.array([0, np.inf, 0, np.inf, 0, np.inf], dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_vexp_coefficients_are_of_the_dtype(dtype):
    coeffs = EXP_COEFFS[np.dtype(dtype).name]
    assert all(type(c) is np.dtype(dtype).type for c in coeffs)
    # q(0) = 1/2 and q'(0) = 1/6: exp(r) = 1 + r + r^2/2 + r^3/6 + ...
    assert abs(float(coeffs[0]) - 0.5) < 1e-6 and abs(float(coeffs[1]) - 1 / 6) < 1e-4


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_vsoftplus_within_four_and_a_half_units_in_the_last_place(dtype):
    # for x < 0 the result log1p(y) ~ y (1 - y/2) of y = vexp(x) carries y's own
    # rounding error, and lies in a lower binade than y for y just above a power
    # of 2: one unit of y's last place is two of the result's
    x = np.concatenate([np.linspace(-60, 30, 1_000_001),
                        np.random.default_rng(1).uniform(-8, 3, 200_000)]).astype(dtype)
    xl = x.astype(np.longdouble)
    exact = np.where(xl > 20, xl, np.log1p(np.exp(xl)))
    got = _run(1, x)
    err = _ulps(got, exact, dtype)
    assert err.max() <= 4.5, f"worst {err.max():.3f} ulp at x = {x[err.argmax()]!r}"
    big = np.array([20.5, 1e4, np.inf], dtype)
    np.testing.assert_array_equal(_run(1, big), big)  # the cut-off: x itself above 20
    assert np.isnan(_run(1, np.array([np.nan], dtype))[0])
    assert _run(1, np.array([-np.inf], dtype))[0] == 0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_vsigmoid_within_three_units_in_the_last_place(dtype):
    x = np.linspace(-80, 40, 400_001).astype(dtype)
    exact = 1 / (1 + np.exp(-x.astype(np.longdouble)))
    err = _ulps(_run(2, x), exact, dtype)
    assert err.max() <= 3, f"worst {err.max():.3f} ulp at x = {x[err.argmax()]!r}"


def test_states_padded_to_whole_blocks():
    assert [_cpu_scan._padded(n) for n in (1, 4, 16, 17, 32, 33)] == [16, 16, 16, 32, 32, 48]


def test_slices_cover_the_channels_evenly():
    assert _cpu_scan._slice_starts(10, 3).tolist() == [0, 3, 6, 10]
    assert _cpu_scan._slice_starts(5, 1).tolist() == [0, 5]


def test_variable_B_becomes_time_major_planes_padded_with_zeros():
    rng = np.random.default_rng(3)
    B = rng.standard_normal((2, 3, 5, 7))  # (Bt, G, N, L)
    Bc, BT, var, group = _cpu_scan._states_last(B, 6, 16, np.float64)
    assert var and group == 2 and Bc.shape == (1, 16) and (Bc == 1).all()
    assert BT.shape == (2, 3, 7, 16)
    np.testing.assert_array_equal(BT[..., :5], B.transpose(0, 1, 3, 2))
    assert (BT[..., 5:] == 0).all()
    # constant: per-channel values, the planes ones
    Bc, BT, var, group = _cpu_scan._states_last(B[0, 0, :, :6].T.copy(), 6, 16, np.float64)
    assert not var and group == 1 and Bc.shape == (6, 16) and (Bc[:, 5:] == 0).all()
    assert BT.shape == (1, 1, 1, 16) and (BT == 1).all()


# (B kind, C kind, D, z, delta_bias, softplus, initial_state, dlast_state)
FULL = ("var", "var", True, True, True, True, True, True)
CASES = [
    # 37 channels, N 16: one block of states
    dict(Dc=37, G=1, N=16, combo=FULL, L=150),
    # 40 channels in 4 groups of 10; N 20: two blocks, the second padded
    dict(Dc=40, G=4, N=20, combo=("grouped", "grouped", True, True, True, True, True, True),
         L=97),
    # constant B and C: per-channel values
    dict(Dc=35, G=1, N=16, combo=("const", "const", True, False, True, True, True, False), L=130),
    # B grouped in 5 groups of 7, C variable; N 5, padded to 16
    dict(Dc=35, G=5, N=5, combo=("grouped", "var", False, True, False, True, False, True), L=70),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", CASES, ids=[f"D{c['Dc']}-G{c['G']}-N{c['N']}" for c in CASES])
def test_many_channels_match_reference(case, dtype):
    kwargs, dout, dlast = _draw(5, case["L"], case["combo"], dtype, Bt=2, Dc=case["Dc"],
                                N=case["N"], G=case["G"])
    got = _run_backend(kwargs, dout, dlast, chunk_size=32)
    _check_against_reference(kwargs, dout, dlast, got, dtype)


@pytest.mark.parametrize("n_slices", [1, 2, 3, 5])
def test_many_channels_any_slicing(n_slices):
    # 48 channels in 3 groups split in 1 to 5 slices, some across a group boundary
    kwargs, dout, dlast = _draw(9, 60, ("grouped", "var") + (True,) * 6, np.float64, Bt=1, Dc=48,
                                N=4, G=3)
    got = _run_backend(kwargs, dout, dlast, chunk_size=16, n_slices=n_slices)
    _check_against_reference(kwargs, dout, dlast, got, np.float64)


def test_nan_step_stays_in_its_channel():
    # a NaN delta poisons its own channel from that step on, and no other
    kwargs, dout, _ = _draw(2, 40, FULL[:-1] + (False,), np.float32, Bt=1, Dc=20, N=16, G=1)
    kwargs["delta"][0, 3, 10] = np.nan
    out, _, grads = _run_backend(kwargs, dout, None)
    assert np.isnan(out[0, 3, 10:]).all() and np.isfinite(out[0, 3, :10]).all()
    others = np.delete(out[0], 3, axis=0)
    assert np.isfinite(others).all()
    assert np.isfinite(np.delete(grads[0][0], 3, axis=0)).all()  # du


def test_tolerances_are_the_shared_ones():
    # this file checks with the tolerances of test_cpu_backend, unchanged
    assert TOL[np.dtype(np.float32)] is TOLERANCES[np.dtype(np.float32)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_backward_recomputes_the_forward_states_bit_for_bit(dtype):
    # the backward recomputes a chunk's states with keep=True (states in hs),
    # the forward runs keep=False (state in pv): the same states, to the bit;
    # y = <C_t, h_t> is summed in any order, so within that sum's rounding
    rng = np.random.default_rng(4)
    steps, Np = 40, 32
    pv = np.zeros((8, Np), dtype)
    A, B, C, H = (pv[r] for r in (_cpu_scan._A, _cpu_scan._B, _cpu_scan._C, _cpu_scan._H))
    A[:] = -rng.uniform(0.1, 3, Np)
    B[:] = rng.standard_normal(Np)
    C[:] = rng.standard_normal(Np)
    h0 = rng.standard_normal(Np).astype(dtype)
    H[:] = h0
    BT, CT = (rng.standard_normal((steps, Np)).astype(dtype) for _ in range(2))
    dts = rng.uniform(0.01, 2, steps).astype(dtype)
    dtx = rng.standard_normal(steps).astype(dtype)
    ys_f, ys_b = np.zeros(steps, dtype), np.zeros(steps, dtype)
    hs = np.zeros((steps + 1, Np), dtype)
    hs[0] = h0
    aa = np.zeros((steps + 1, Np), dtype)
    _cpu_scan._forward_steps(A, B, C, H, BT, CT, 0, 0, True, True, dts, dtx, ys_f, steps,
                             np.zeros((1, 1), dtype), np.zeros((1, 1), dtype), False)
    _cpu_scan._forward_steps(A, B, C, H, BT, CT, 0, 0, True, True, dts, dtx, ys_b, steps, hs,
                             aa, True)
    assert not np.array_equal(H, h0)
    np.testing.assert_array_equal(hs[steps], H)
    # the decays the adjoint reads: exp(delta_t A) (the product rounded in the
    # dtype, as the kernel takes it) within vexp's 1.5 units in the last place
    exact = np.exp((dts[:, None] * A).astype(np.float64))
    np.testing.assert_allclose(aa[1:], exact, rtol=1.5 * np.finfo(dtype).eps, atol=0)
    terms = np.abs(C.astype(np.float64) * CT * hs[1:])
    bound = Np * np.finfo(dtype).eps * terms.sum(axis=1)
    assert (np.abs(ys_b.astype(np.float64) - ys_f) <= bound).all()


def _axpy(a, x, y):
    for i in range(x.shape[0]):
        y[i] += a * x[i]


def _noalias_in_definition(dispatcher):
    """How many ``noalias`` the LLVM definition of the compiled function itself carries."""
    ir = next(iter(dispatcher.inspect_llvm().values()))
    name = dispatcher.py_func.__name__
    lines = [ln for ln in ir.splitlines() if ln.startswith("define") and name in ln
             and "cpython" not in ln and "cfunc" not in ln]
    assert len(lines) == 1, lines
    return lines[0].count("noalias")


def test_noalias_functions_mark_their_array_arguments():
    with_flag = njit_noalias(error_model="numpy")(_axpy)
    plain = njit(error_model="numpy")(_axpy)
    for f in (with_flag, plain):
        y = np.ones(3)
        f(2.0, np.arange(3.0), y)
        np.testing.assert_array_equal(y, [1.0, 3.0, 5.0])
    # the return and exception pointers carry it in both; the arrays' pointers only with the flag
    assert _noalias_in_definition(with_flag) >= _noalias_in_definition(plain) + 2 * 3
    for helper in (_cpu_scan._forward_steps, _cpu_scan._adjoint_steps,
                   _cpu_scan._chunk_inputs):
        assert type(helper) is type(with_flag)
