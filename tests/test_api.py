"""The public API on NumPy arrays: validation, dtypes, layouts, and properties.

The numerical grid of the CPU backend against the reference lives in
test_cpu_backend.py; here the public functions are checked end to end.
"""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import numba_mamba as nm
from numba_mamba import reference
from tests.scan_cases import TOLERANCES, assert_close, make_inputs


def _args(**kw):
    return make_inputs(np.random.default_rng(0), Bt=2, Dc=4, L=9, N=3, **kw)


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("name, bad, pattern", [
    ("delta", np.ones((2, 4, 8)), r"^delta must have shape \(2, 4, 9\) like u, got \(2, 4, 8\)"),
    ("A", np.ones((3, 3)), r"^A must have shape \(4, N\)"),
    ("A", np.ones((4, 0)), r"^A must have shape \(4, N\) with N >= 1"),
    ("B", np.ones((2, 3, 8)), r"^B must have shape \(2, 3, 9\) \(variable"),
    ("B", np.ones((2, 3, 3, 9)), r"^B has 3 groups .* must divide the 4 channels"),
    ("C", np.ones((4, 2)), r"^C must have shape \(4, 3\) \(constant"),
    ("C", np.ones((1, 2, 3, 4, 9)), r"^C must have 2 dims .* got 5 dims"),
    ("D", np.ones(3), r"^D must have shape \(4,\)"),
    ("delta_bias", np.ones((4, 1)), r"^delta_bias must have shape \(4,\)"),
    ("z", np.ones((2, 4)), r"^z must have shape \(2, 4, 9\) like u"),
    ("initial_state", np.ones((2, 4, 2)), r"^initial_state must have shape \(2, 4, 3\)"),
    ("u", np.ones((4, 9)), r"^u must have 3 dims"),
])
def test_rejects_bad_shapes_naming_the_argument(name, bad, pattern):
    args = _args()
    args[name] = bad
    with pytest.raises(ValueError, match=pattern):
        nm.selective_scan(**args)
    with pytest.raises(ValueError, match=pattern):
        nm.selective_scan_vjp(**args)


def test_rejects_empty_length():
    args = _args()
    for name in ("u", "delta"):
        args[name] = args[name][..., :0]
    args["B"], args["C"] = args["B"][..., :0], args["C"][..., :0]
    with pytest.raises(ValueError, match="^u must have non-empty"):
        nm.selective_scan(**args)


@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan])
def test_rejects_non_finite_A(value):
    args = _args()
    args["A"][1, 2] = value
    with pytest.raises(ValueError, match="^A must be finite"):
        nm.selective_scan(**args)


@pytest.mark.parametrize("dtype", [np.complex128, np.complex64, object])  # (integers: float64)
def test_rejects_unsupported_dtype_listing_supported(dtype):
    args = _args()
    args["C"] = np.ones(args["C"].shape, dtype=dtype)
    with pytest.raises(TypeError, match="^C must have dtype float16, bfloat16, float32, float64"):
        nm.selective_scan(**args)


def test_backward_rejects_bad_dout_and_dlast_state():
    out, last, backward = nm.selective_scan_vjp(**_args())
    with pytest.raises(ValueError, match=r"^dout must have shape \(2, 4, 9\) like out"):
        backward(np.ones((2, 4, 8)))
    with pytest.raises(ValueError, match=r"^dlast_state must have shape \(2, 4, 3\)"):
        backward(np.ones_like(out), np.ones((2, 4)))


def test_missing_required_argument_is_named():
    args = _args()
    args["B"] = None
    with pytest.raises(TypeError, match="^B is required"):
        nm.selective_scan(**args)


# ---------------------------------------------------------------- dtypes and layouts

def _bfloat16():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    return np.dtype(ml_dtypes.bfloat16)


@pytest.mark.parametrize("dtype", [np.float16, "bfloat16", np.float32, np.float64])
def test_dtype_preserved_and_half_computes_in_float32(dtype):
    dtype = _bfloat16() if dtype == "bfloat16" else np.dtype(dtype)
    args = make_inputs(np.random.default_rng(3), Bt=2, Dc=4, L=33, N=3, dtype=np.float64,
                       D=True, z=True, delta_bias=True, softplus=True, initial_state=True)
    low = {k: (v.astype(dtype) if isinstance(v, np.ndarray) else v) for k, v in args.items()}
    out, last, backward = nm.selective_scan_vjp(**low)
    assert out.dtype == dtype
    assert last.dtype == (np.float64 if dtype == np.float64 else np.float32)
    dout = np.random.default_rng(4).standard_normal(out.shape).astype(dtype)
    grads = backward(dout)
    for field, g in grads._asdict().items():
        assert g.dtype == low[field[1:]].dtype and g.shape == low[field[1:]].shape, field

    if dtype.itemsize > 2:
        return
    # The half-precision result equals the float32 computation on the same
    # (rounded) values, rounded once at the end.
    as32 = {k: (v.astype(np.float32) if isinstance(v, np.ndarray) else v) for k, v in low.items()}
    out32 = nm.selective_scan(**as32)
    np.testing.assert_array_equal(out, out32.astype(dtype))


def test_non_contiguous_inputs_read_correctly():
    rng = np.random.default_rng(5)
    args = make_inputs(rng, Bt=2, Dc=4, L=20, N=3, D=True, z=True, initial_state=True,
                       B_kind="grouped", C_kind="var")
    strided = {}
    for k, v in args.items():
        if isinstance(v, np.ndarray):
            # the same values in a non-contiguous view (every other element of a buffer)
            big = np.zeros(v.shape + (2,), dtype=v.dtype)
            big[..., 0] = v
            strided[k] = big[..., 0]
            assert not strided[k].flags.c_contiguous
        else:
            strided[k] = v
    F = np.asfortranarray(args["u"])
    strided["u"] = F
    np.testing.assert_array_equal(nm.selective_scan(**strided), nm.selective_scan(**args))


def test_array_likes_accepted_on_cpu():
    args = _args()
    lists = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in args.items()}
    np.testing.assert_allclose(nm.selective_scan(**lists), nm.selective_scan(**args), rtol=1e-14)


def test_variable_bc_equals_one_group():
    args = _args(B_kind="var", C_kind="var")
    grouped = dict(args, B=args["B"][:, None], C=args["C"][:, None])
    out, last, bw = nm.selective_scan_vjp(**args)
    out_g, last_g, bw_g = nm.selective_scan_vjp(**grouped)
    np.testing.assert_array_equal(out, out_g)
    dout = np.random.default_rng(0).standard_normal(out.shape)
    g, gg = bw(dout), bw_g(dout)
    assert g.dB.shape == args["B"].shape
    np.testing.assert_array_equal(g.dB, gg.dB[:, 0])


def test_public_api_matches_reference_all_flags():
    for dtype in (np.float64, np.float32):
        args = make_inputs(np.random.default_rng(11), Bt=2, Dc=4, L=130, N=5, dtype=dtype,
                           B_kind="grouped", C_kind="const", D=True, z=True, delta_bias=True,
                           softplus=True, initial_state=True)
        out, last, bw = nm.selective_scan_vjp(**args)
        rout, rlast, rbw = reference.selective_scan_vjp(**args)
        tol = TOLERANCES[np.dtype(dtype)]
        assert_close("out", out, rout, *tol["out"])
        assert_close("last_state", last, rlast, *tol["out"])
        rng = np.random.default_rng(12)
        dout = rng.standard_normal(out.shape).astype(dtype)
        dlast = rng.standard_normal(last.shape).astype(dtype)
        got, want = bw(dout, dlast), rbw(dout, dlast)
        for field in got._fields:
            kind = {"du": "du", "ddelta": "ddelta_z", "dz": "du"}.get(field, "weights")
            assert_close(field, getattr(got, field), getattr(want, field), *tol[kind])


# ---------------------------------------------------------------- properties

@settings(max_examples=25, deadline=None)
@given(L=st.integers(2, 60), data=st.data())
def test_split_with_state_equals_one_pass(L, data):
    """Scanning [0, k) then [k, L) with the state passed on equals one pass, gradients too."""
    k = data.draw(st.integers(1, L - 1), label="k")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    rng = np.random.default_rng(seed)
    args = make_inputs(rng, Bt=2, Dc=4, L=L, N=3, B_kind="var", C_kind="grouped", D=True, z=True,
                       delta_bias=True, softplus=True, initial_state=True)

    def piece(a, lo, hi, h0):
        p = dict(a, initial_state=h0)
        for name in ("u", "delta", "z", "B", "C"):
            p[name] = a[name][..., lo:hi]
        return p

    out, last, bw = nm.selective_scan_vjp(**args)
    out1, h1, bw1 = nm.selective_scan_vjp(**piece(args, 0, k, args["initial_state"]))
    out2, h2, bw2 = nm.selective_scan_vjp(**piece(args, k, L, h1))
    np.testing.assert_allclose(np.concatenate([out1, out2], -1), out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(h2, last, rtol=1e-12, atol=1e-12)

    dout = rng.standard_normal(out.shape)
    dlast = rng.standard_normal(last.shape)
    g = bw(dout, dlast)
    g2 = bw2(dout[..., k:], dlast)
    g1 = bw1(dout[..., :k], g2.dinitial_state)  # truncated BPTT, made exact
    for name in ("du", "ddelta", "dz", "dB", "dC"):
        joined = np.concatenate([getattr(g1, name), getattr(g2, name)], -1)
        np.testing.assert_allclose(joined, getattr(g, name), rtol=1e-10, atol=1e-10, err_msg=name)
    for name in ("dA", "dD", "ddelta_bias"):
        np.testing.assert_allclose(getattr(g1, name) + getattr(g2, name), getattr(g, name),
                                   rtol=1e-10, atol=1e-10, err_msg=name)
    np.testing.assert_allclose(g1.dinitial_state, g.dinitial_state, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------ out=

@pytest.mark.parametrize("dtype", [np.float16, "bfloat16", np.float32, np.float64])
@pytest.mark.parametrize("last", [False, True], ids=["out", "out+last"])
def test_out_is_written_and_returned_with_the_same_values(dtype, last):
    dtype = _bfloat16() if dtype == "bfloat16" else np.dtype(dtype)
    args = make_inputs(np.random.default_rng(5), Bt=2, Dc=4, L=17, N=3, dtype=np.float64,
                       D=True, z=True, delta_bias=True, softplus=True, initial_state=True)
    args = {k: (v.astype(dtype) if isinstance(v, np.ndarray) else v) for k, v in args.items()}
    want = nm.selective_scan(**args, return_last_state=last)
    out = np.full(args["u"].shape, np.nan, dtype)
    got = nm.selective_scan(**args, return_last_state=last, out=out)
    got, want = (got, want) if last else ((got,), (want,))
    assert got[0] is out
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        np.testing.assert_array_equal(g, w)


def _out_args():
    args = _args(z=True)
    return args, np.empty(args["u"].shape)


@pytest.mark.parametrize("make, error, pattern", [
    (lambda a, o: [[0.0] * 9] * 4, TypeError, r"^out must be a numpy\.ndarray like u, got "
                                                r"builtins\.list"),
    (lambda a, o: o[:, :, :8], ValueError, r"^out must have shape \(2, 4, 9\) like u, got "
                                           r"\(2, 4, 8\)"),
    (lambda a, o: o.astype(np.float32), TypeError, r"^out must have u's dtype float64, "
                                                   r"got float32"),
    (lambda a, o: np.empty((9, 4, 2)).T, ValueError, r"^out must be C-contiguous"),
    (lambda a, o: np.broadcast_to(np.empty(9), o.shape), ValueError,
     r"^out must be C-contiguous"),
    (lambda a, o: (o.setflags(write=False), o)[1], ValueError, r"^out must be writeable"),
    (lambda a, o: a["u"], ValueError, r"^out must not share memory with u "),
    (lambda a, o: a["z"], ValueError, r"^out must not share memory with z "),
])
def test_out_rejected_naming_what_is_wrong(make, error, pattern):
    args, out = _out_args()
    bad = make(args, out)
    before = {k: v.copy() for k, v in args.items() if isinstance(v, np.ndarray)}
    with pytest.raises(error, match=pattern):
        nm.selective_scan(**args, out=bad)
    for k, v in before.items():  # (nothing written)
        np.testing.assert_array_equal(args[k], v)


def test_out_overlapping_part_of_an_input_is_rejected():
    args, _ = _out_args()
    n = args["u"].size
    both = np.zeros(2 * n)
    args["delta"] = both[:n].reshape(args["u"].shape) + 0.5
    args["z"] = both[:n].reshape(args["u"].shape)  # z over the first half
    out = both[n // 2:n // 2 + n].reshape(args["u"].shape)  # half of it over z
    with pytest.raises(ValueError, match="^out must not share memory with z "):
        nm.selective_scan(**args, out=out)
