"""``selective_scan`` and ``selective_scan_vjp``, end to end through the public API.

Tests that take the ``backend`` fixture run on NumPy arrays (``cpu``) and on
CuPy arrays (``gpu``: marker ``gpu``, skipped where CuPy sees no CUDA GPU);
those marked ``gpu`` alone compare the GPU with the CPU path or test what only
the GPU does (streams, remembered layouts, the engines' settings).  Inputs of
every dtype are drawn in float64 and rounded to the dtype under test, and the
reference runs in float64 on the rounded values, so a comparison measures the
kernels' arithmetic, not the rounding of the inputs.

The backends' own grids (chunk sizes, slicings, engines, tunings) are in
test_cpu_backend.py and test_gpu_backend.py; the oracle's own tests in
test_reference.py.
"""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import numba_mamba as nm
from numba_mamba import reference
from tests.gpu import cupy_or_why_not
from tests.scan_cases import (HALF_UNIT_ROUNDOFF, TOLERANCES, assert_close, float64_args,
                              half_dtype, make_inputs, non_native)

cupy = cupy_or_why_not()[0]  # (None without a GPU: the tests that use it skip)


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
def test_rejects_bad_shapes_naming_the_argument(backend, name, bad, pattern):
    args = _args()
    args[name] = bad
    args = backend.put(args)
    with pytest.raises(ValueError, match=pattern):
        nm.selective_scan(**args)
    with pytest.raises(ValueError, match=pattern):
        nm.selective_scan_vjp(**args)


def test_rejects_empty_length(backend):
    args = _args()
    for name in ("u", "delta"):
        args[name] = args[name][..., :0]
    args["B"], args["C"] = args["B"][..., :0], args["C"][..., :0]
    with pytest.raises(ValueError, match="^u must have non-empty"):
        nm.selective_scan(**backend.put(args))


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


def test_backward_rejects_bad_dout_and_dlast_state(backend):
    xp = backend.xp
    out, last, backward = nm.selective_scan_vjp(**backend.put(_args()))
    with pytest.raises(ValueError, match=r"^dout must have shape \(2, 4, 9\) like out"):
        backward(xp.ones((2, 4, 8)))
    with pytest.raises(ValueError, match=r"^dlast_state must have shape \(2, 4, 3\)"):
        backward(xp.ones_like(out), xp.ones((2, 4)))


def test_missing_required_argument_is_named(backend):
    args = _args()
    args["B"] = None
    with pytest.raises(TypeError, match="^B is required"):
        nm.selective_scan(**backend.put(args))


@pytest.mark.gpu
def test_mixing_numpy_and_cupy_is_a_type_error_naming_both(gpu):
    args = make_inputs(np.random.default_rng(0), Bt=1, Dc=2, L=5, N=2, dtype=np.float32)
    mixed = dict(args, u=cupy.asarray(args["u"]), C=cupy.asarray(args["C"]))
    with pytest.raises(TypeError, match=r"u, C are CuPy arrays on the GPU but delta, A, B are "
                                        r"on the host"):
        nm.selective_scan(**mixed)
    out, last, backward = nm.selective_scan_vjp(**gpu.put(args))
    with pytest.raises(TypeError, match="dout is on the host"):
        backward(out.get())


# ---------------------------------------------------------------- dtypes and layouts

def _bfloat16():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    return np.dtype(ml_dtypes.bfloat16)


def _dtype(name, backend):
    """The NumPy dtype called ``name``; skips where the backend has no such arrays."""
    if name != "bfloat16":
        return np.dtype(name)
    dt = _bfloat16()
    if backend.name == "gpu":
        try:
            cupy.asarray(np.zeros(2, dtype=dt))
        except Exception as exc:  # CuPy without bfloat16 arrays
            pytest.skip(f"this CuPy has no bfloat16 arrays: {exc}")
    return dt


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


@pytest.mark.parametrize("case", [
    dict(seed=5, L=20, dtype=np.float64, D=True, z=True, initial_state=True,
         B_kind="grouped", C_kind="var"),
    dict(seed=4, L=300, dtype=np.float32, D=True, z=True),
], ids=["L20-float64", "L300-float32"])
def test_non_contiguous_inputs_read_correctly(backend, case):
    xp = backend.xp
    case = dict(case)
    args = backend.put(make_inputs(np.random.default_rng(case.pop("seed")), Bt=2, Dc=4, N=3,
                                   **case))
    strided = {}
    for k, v in args.items():
        if isinstance(v, xp.ndarray):
            # the same values in a non-contiguous view (every other element of a buffer)
            big = xp.zeros(v.shape + (2,), dtype=v.dtype)
            big[..., 0] = v
            strided[k] = big[..., 0]
            assert not strided[k].flags.c_contiguous
        else:
            strided[k] = v
    strided["u"] = xp.asfortranarray(args["u"])
    np.testing.assert_array_equal(backend.host(nm.selective_scan(**strided)),
                                  backend.host(nm.selective_scan(**args)))


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


# Half precisions: the reference project's own tolerances for its float16 and
# bfloat16 tests (out), and a half-rounding allowance for the gradients, which
# are returned in the half dtype.
HALF_TOLERANCES = {
    "float16": dict(out=(3e-3, 5e-3), grads=(5e-3, 1e-2)),
    "bfloat16": dict(out=(3e-2, 5e-2), grads=(5e-2, 1e-1)),
}


def _tol(dtype, kind):
    if dtype.name in HALF_TOLERANCES:
        return HALF_TOLERANCES[dtype.name]["out" if kind == "out" else "grads"]
    return TOLERANCES[dtype][kind]


LENGTHS = [1, 7, 8, 372, 784, 1134, 2048, 4097]
FLAG_SETS = [
    dict(),
    dict(D=True, z=True, delta_bias=True, softplus=True),
    dict(D=True, initial_state=True),
    dict(z=True, softplus=True, initial_state=True),
]
ALL_FLAGS = dict(D=True, z=True, delta_bias=True, softplus=True, initial_state=True)
BC_KINDS = [("var", "var"), ("const", "const"), ("grouped", "var"), ("const", "grouped")]


def _reference_cases():
    """(Dc, N, L, dtype, (B, C kinds), flags, with dlast, seed of the inputs, seed of
    the output gradients or None for the inputs' generator)."""
    cases = []
    for i, L in enumerate(LENGTHS):
        for j, dtype in enumerate(["float32", "float16", "bfloat16"]):
            flags = FLAG_SETS[(i + j) % len(FLAG_SETS)]
            bc = BC_KINDS[(i + 2 * j) % len(BC_KINDS)]
            cases.append((8, 4, L, dtype, bc, flags, (i + j) % 2 == 0, L, None))
    # every flag set with every B/C kind at a multi-chunk length, float32
    for flags, bc in itertools.product(FLAG_SETS, BC_KINDS):
        cases.append((8, 4, 2500, "float32", bc, flags, True, 2500, None))
    # every flag, float64 and float32; float64 over several chunks
    for dtype in ("float64", "float32"):
        cases.append((4, 5, 130, dtype, ("grouped", "const"), ALL_FLAGS, True, 11, 12))
    cases.append((4, 8, 3000, "float64", ("grouped", "var"), ALL_FLAGS, True, 2, None))
    return cases


def _reference_id(case):
    Dc, N, L, dtype, bc, flags, dlast = case[:7]
    flags = "all" if flags is ALL_FLAGS else "+".join(flags) or "plain"
    return (f"D{Dc}-N{N}-L{L}-{dtype}-{bc[0]}{bc[1]}-{flags}-"
            f"{'dlast' if dlast else 'nodlast'}")


# On the CPU the lengths from 1134 on are left to the CPU kernels' own grid against the
# reference (test_cpu_backend.py: the same lengths and options, float32 and float64),
# which keeps CI's time; shorter ones run here too, the half dtypes included.
CPU_MAX_LENGTH = 784


def _reference_params():
    params = []
    for case in _reference_cases():
        if case[2] <= CPU_MAX_LENGTH:
            params.append(pytest.param("cpu", case, id="cpu-" + _reference_id(case)))
        params.append(pytest.param("gpu", case, id="gpu-" + _reference_id(case),
                                   marks=pytest.mark.gpu))
    return params


@pytest.mark.parametrize("backend, case", _reference_params(), indirect=["backend"])
def test_matches_reference(backend, case):
    Dc, N, L, dtype_name, (B_kind, C_kind), flags, with_dlast, seed, grad_seed = case
    dtype = _dtype(dtype_name, backend)
    rng = np.random.default_rng(seed)
    args64 = make_inputs(rng, Bt=2, Dc=Dc, L=L, N=N, dtype=np.float64, B_kind=B_kind,
                         C_kind=C_kind, G=2, **flags)
    host = {k: (v.astype(dtype) if isinstance(v, np.ndarray) else v) for k, v in args64.items()}
    exact = {k: (v.astype(np.float64) if isinstance(v, np.ndarray) else v)
             for k, v in host.items()}

    out, last, backward = nm.selective_scan_vjp(**backend.put(host))
    assert isinstance(out, backend.xp.ndarray) and out.dtype == dtype
    rout, rlast, rbackward = reference.selective_scan_vjp(**exact)
    assert_close("out", backend.host(out), rout, *_tol(dtype, "out"))
    assert_close("last_state", backend.host(last), rlast, *_tol(dtype, "out"))

    if grad_seed is not None:
        rng = np.random.default_rng(grad_seed)
    dout = rng.standard_normal(out.shape).astype(dtype)
    f = np.float64 if dtype == np.float64 else np.float32
    dlast = rng.standard_normal(last.shape).astype(f) if with_dlast else None
    grads = backward(backend.put(dout), backend.put(dlast))
    want = rbackward(dout.astype(np.float64), dlast)
    for field in grads._fields:
        g, w = getattr(grads, field), getattr(want, field)
        if w is None:
            assert g is None, field
            continue
        assert isinstance(g, backend.xp.ndarray) and g.dtype == host[field[1:]].dtype, field
        kind = {"du": "du", "dz": "du",
                "ddelta": "ddelta_z" if flags.get("z") else "ddelta"}.get(field, "weights")
        assert_close(field, backend.host(g), w, *_tol(dtype, kind))


@pytest.mark.gpu
def test_gpu_runs_on_current_stream_and_matches_cpu(gpu):
    rng = np.random.default_rng(3)
    args = make_inputs(rng, Bt=3, Dc=16, L=5000, N=16, dtype=np.float32, D=True, z=True,
                       delta_bias=True, softplus=True)
    cpu = nm.selective_scan(**args)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        out = nm.selective_scan(**gpu.put(args))
        host = cupy.asnumpy(out, stream=stream)
    stream.synchronize()
    assert_close("gpu vs cpu", host, cpu, *TOLERANCES[np.dtype(np.float32)]["out"])


@pytest.mark.gpu
@pytest.mark.parametrize("Bt,Dc", [(1, 4), (2, 1024)], ids=["blocks", "states"])
def test_gpu_non_finite_A_shows_in_the_results_without_a_check(gpu, Bt, Dc):
    # On the GPU A is not checked (a check would wait for the device): a NaN
    # in A makes that channel's output NaN; -inf forgets the state at once
    # (the limit of a very negative A) and makes the delta gradient NaN.
    # (On the CPU a non-finite A is an error: test_rejects_non_finite_A.)
    rng = np.random.default_rng(5)
    args = make_inputs(rng, Bt=Bt, Dc=Dc, L=40, N=16, dtype=np.float32, D=True, z=True,
                       delta_bias=True, softplus=True)
    dev = gpu.put(args)
    A = dev["A"].copy()
    A[1, 3] = cupy.nan
    out = nm.selective_scan(**dict(dev, A=A)).get()
    assert np.isnan(out[:, 1]).all()
    assert np.isfinite(np.delete(out, 1, axis=1)).all()

    A = dev["A"].copy()
    A[1, 3] = -cupy.inf
    out, _, backward = nm.selective_scan_vjp(**dict(dev, A=A))
    limit = dict(args, A=args["A"].copy())
    limit["A"][1, 3] = -1e30
    assert_close("out", out.get(), nm.selective_scan(**limit),
                 *TOLERANCES[np.dtype(np.float32)]["out"])
    grads = backward(cupy.ones_like(out))
    assert np.isnan(grads.ddelta.get()[:, 1]).any()


# ---------------------------------------------------------------- byte order, integers

@pytest.mark.parametrize("code", ["f8", "f4"])
def test_selective_scan_in_non_native_byte_order(code):
    args = {k: v.astype(code) for k, v in float64_args(np.random.default_rng(0)).items()}
    want, want_h = nm.selective_scan(**args, return_last_state=True)
    swapped = {k: non_native(v, code) for k, v in args.items()}
    got, h = nm.selective_scan(**swapped, return_last_state=True)
    assert got.dtype == np.dtype(code) and got.dtype.isnative
    assert h.dtype == want_h.dtype and h.dtype.isnative
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(h, want_h)
    out, _, backward = nm.selective_scan_vjp(**swapped)
    grads = backward(non_native(np.ones_like(want), code))
    want_grads = nm.selective_scan_vjp(**args)[2](np.ones_like(want))
    assert grads.dinitial_state is None and sum(g is not None for g in grads) == 8
    for g, w in zip(grads[:-1], want_grads):
        assert g.dtype == w.dtype and g.dtype.isnative
        np.testing.assert_array_equal(g, w)
    # out= of either byte order
    target = np.empty(want.shape, np.dtype(code).newbyteorder("S"))
    assert nm.selective_scan(**swapped, out=target) is target
    np.testing.assert_array_equal(target, want)


def test_integer_arrays_in_the_scan():
    rng = np.random.default_rng(9)
    args = float64_args(rng)
    ints = dict(args, u=np.arange(54).reshape(2, 3, 9) % 5 - 2)
    want = nm.selective_scan(**dict(ints, u=ints["u"].tolist()))
    got = nm.selective_scan(**ints)
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, want)


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


# ------------------------------------------- repeated layouts (cached validation), out=
REPEAT_CASES = [  # (Bt, Dc, N, L, dtype, make_inputs options): both engines, split sequences,
    # half I/O
    (1, 4, 4, 16, "float32", dict(D=True, z=True, delta_bias=True, softplus=True)),
    (2, 3, 5, 300, "float64", dict(B_kind="const", C_kind="grouped", G=3, initial_state=True)),
    (2, 1024, 16, 1100, "float32", dict(D=True, z=True, delta_bias=True, softplus=True)),
    (1, 512, 32, 700, "float32", dict(B_kind="grouped", G=2, initial_state=True, D=True)),
    (2, 1024, 16, 600, "bfloat16", dict(D=True, z=True, delta_bias=True, softplus=True)),
    (2, 1024, 16, 600, "float16", dict(z=True, initial_state=True)),
    # (the 'blocks' engine computes float16 in float32: copied into a given out)
    (1, 4, 4, 16, "float16", dict(D=True, z=True, delta_bias=True, softplus=True)),
]
ATOMIC_SUMS = ("dA", "dB", "dC", "dD", "ddelta_bias")  # summed with atomics: order varies


def _device_inputs(rng, Bt, Dc, N, L, dtype, options):
    host = make_inputs(rng, Bt=Bt, Dc=Dc, L=L, N=N, dtype=np.float64, **options)
    per_step = ("u", "delta", "z", "B", "C")
    out = {}
    for k, v in host.items():
        if not isinstance(v, np.ndarray):
            out[k] = v
        elif dtype.itemsize == 2 and (k not in per_step or v.ndim == 2):
            out[k] = cupy.asarray(v.astype(np.float32))  # (half I/O: the rest float32)
        else:
            out[k] = cupy.asarray(v.astype(dtype))
    return out


def _repeat_start(gpu, monkeypatch, case, seed):
    """A case's sizes, dtype and inputs of 3 calls, with no layout validated yet."""
    from numba_mamba import scan as api

    Bt, Dc, N, L, name, options = case
    monkeypatch.setattr(api, "_VALIDATED", {})
    dtype = half_dtype(name) if name in ("float16", "bfloat16") else np.dtype(name)
    if name == "bfloat16":
        _dtype(name, gpu)  # (skips where CuPy has no bfloat16 arrays)
    rng = np.random.default_rng(Bt * Dc + L + seed)
    return (Bt, Dc, N, L, dtype, rng,
            [_device_inputs(rng, Bt, Dc, N, L, dtype, options) for _ in range(3)])


def _first_seen(monkeypatch, fn):
    """``fn()`` with no layout validated before (the full validation)."""
    from numba_mamba import scan as api

    with monkeypatch.context() as mp:
        mp.setattr(api, "_VALIDATED", {})
        return fn()


def _equal(got, want, name=""):
    assert got.dtype == want.dtype and got.shape == want.shape, name
    np.testing.assert_array_equal(got.get().astype(np.float64), want.get().astype(np.float64),
                                  err_msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("case", REPEAT_CASES, ids=lambda c: f"{c[:4]}-{c[4]}")
@pytest.mark.parametrize("out", [False, True], ids=["new", "out="])
def test_gpu_repeated_layout_gives_the_first_calls_result_to_the_bit(gpu, monkeypatch, case,
                                                                     out):
    """Calls of a layout validated before (checks skipped) give, to the bit, what
    a call of a layout never seen gives; a given ``out`` is written and returned."""
    from numba_mamba import scan as api

    Bt, Dc, N, L, dtype, rng, inputs = _repeat_start(gpu, monkeypatch, case, 0)
    outs = [cupy.full((Bt, Dc, L), np.nan, dtype) if out else None for _ in inputs]
    got = [nm.selective_scan(**kw, return_last_state=True, out=o) for kw, o in zip(inputs, outs)]
    assert len(api._VALIDATED) == 1
    for kw, o, (y, last) in zip(inputs, outs, got):
        want_y, want_last = _first_seen(
            monkeypatch, lambda: nm.selective_scan(**kw, return_last_state=True))
        assert o is None or y is o
        assert y.flags.c_contiguous
        _equal(y, want_y, "out")
        _equal(last, want_last, "last_state")


def _assert_grads_equal(grads, want, f):
    """Gradients equal to the bit, but for the sums added atomically (a few units
    in the last place of the largest; a half dB/dC may flip its last bit)."""
    for field in want._fields:
        g, w = getattr(grads, field), getattr(want, field)
        if w is None:
            assert g is None, field
            continue
        assert g.dtype == w.dtype and g.shape == w.shape, field
        if field not in ATOMIC_SUMS:
            _equal(g, w, field)
            continue
        half = g.dtype.name
        g, w = g.get().astype(np.float64), w.get().astype(np.float64)
        rtol = 2 * HALF_UNIT_ROUNDOFF[half] if half in HALF_UNIT_ROUNDOFF else 0
        np.testing.assert_allclose(g, w, rtol=rtol, atol=64 * np.finfo(f).eps * np.abs(w).max(),
                                   err_msg=field)


@pytest.mark.gpu
@pytest.mark.parametrize("case", REPEAT_CASES[:6], ids=lambda c: f"{c[:4]}-{c[4]}")
def test_gpu_repeated_layout_vjp_and_backward_give_the_first_calls_results(gpu, monkeypatch,
                                                                           case):
    Bt, Dc, N, L, dtype, rng, inputs = _repeat_start(gpu, monkeypatch, case, 1)
    f = np.float64 if dtype == np.float64 else np.float32
    douts = [(cupy.asarray(rng.standard_normal((Bt, Dc, L)).astype(dtype)),
              cupy.asarray(rng.standard_normal((Bt, Dc, N)).astype(f))) for _ in inputs]

    def run(kw, dout, dlast):
        out, last, backward = nm.selective_scan_vjp(**kw)
        return out, last, backward(dout, dlast)

    got = [run(kw, *d) for kw, d in zip(inputs, douts)]
    for kw, d, (out, last, grads) in zip(inputs, douts, got):
        want_out, want_last, want = _first_seen(monkeypatch, lambda: run(kw, *d))
        _equal(out, want_out, "out")
        _equal(last, want_last, "last_state")
        _assert_grads_equal(grads, want, f)


@pytest.mark.gpu
@pytest.mark.parametrize("case", REPEAT_CASES[:6], ids=lambda c: f"{c[:4]}-{c[4]}")
def test_gpu_a_vjp_layout_seen_before_runs_its_plans_with_the_first_calls_results(
        gpu, monkeypatch, case):
    """From the third call of a layout on (the first validates, the second plans),
    ``selective_scan_vjp`` runs the state engine's remembered forward plan, and
    its backward the remembered backward
    plan (no pass through the launchers) where ``dout`` is C-contiguous, of the
    dtype the forward read and no ``dlast_state`` is given; each call gives
    what a call of a layout never seen gives.  A ``dout`` of another dtype or
    strides, or a ``dlast_state``, takes the full path, and so does a call
    after a change of settings."""
    from numba_mamba import scan as api
    from numba_mamba.cuda_kernels import scan_states
    from numba_mamba.cuda_kernels.settings import settings

    Bt, Dc, N, L, dtype, rng, inputs = _repeat_start(gpu, monkeypatch, case, 2)
    f = np.float64 if dtype == np.float64 else np.float32
    calls = {"forward": 0, "backward": 0}
    for name in calls:
        launcher = getattr(scan_states, f"scan_{name}")

        def spy(*args, _launcher=launcher, _name=name, **kwargs):
            calls[_name] += 1
            return _launcher(*args, **kwargs)

        monkeypatch.setattr(scan_states, f"scan_{name}", spy)
    states = scan_states.usable(Bt, Dc, N) and settings.engine != "blocks"

    def run(kw, dout, dlast=None):
        out, last, backward = nm.selective_scan_vjp(**kw)
        return out, last, backward(dout, dlast)

    def check(kw, dout, dlast=None):
        got = run(kw, dout, dlast)
        want = _first_seen(monkeypatch, lambda: run(kw, dout, dlast))
        _equal(got[0], want[0], "out")
        _equal(got[1], want[1], "last_state")
        _assert_grads_equal(got[2], want[2], f)

    def dout_of(kw, dt=None, length=L):
        dt = dtype if dt is None else dt
        return cupy.asarray(rng.standard_normal((Bt, Dc, length)).astype(np.float32).astype(dt))

    seen = []
    for kw in inputs:  # (validated, planned, then the plans)
        before = dict(calls)
        check(kw, dout_of(kw))
        seen.append((calls["forward"] - before["forward"], calls["backward"] - before["backward"]))
    # (each check's reference call, a layout never seen, passes through the launchers once)
    if states:
        assert seen == [(2, 2), (2, 2), (1, 1)], seen
    (checked,) = api._VALIDATED.values()
    planned = checked.plans.get((True if case[5].get("softplus") else False, "vjp"))
    assert (planned is not None) == states
    kw = inputs[0]
    other = np.float64 if dtype != np.float64 else np.float32
    for dout, dlast in ((dout_of(kw, length=2 * L)[..., ::2], None), (dout_of(kw, other), None),
                        (dout_of(kw), cupy.asarray(rng.standard_normal((Bt, Dc, N)).astype(f)))):
        before = calls["backward"]
        check(kw, dout, dlast)
        if states:
            assert calls["backward"] - before == 2  # (the full path, and the reference's)
    with settings.override(save_every=2):  # (a new generation: the full path again)
        before = dict(calls)
        check(inputs[1], dout_of(inputs[1]))
        if states:
            assert (calls["forward"] - before["forward"],
                    calls["backward"] - before["backward"]) == (2, 2)


@pytest.mark.gpu
def test_gpu_repeated_calls_with_copies_or_aliased_arrays_are_right(gpu, monkeypatch):
    from numba_mamba import scan as api

    rng = np.random.default_rng(5)
    monkeypatch.setattr(api, "_VALIDATED", {})
    kw = _device_inputs(rng, 1, 4, 4, 40, np.dtype(np.float32), dict(D=True))
    wide = cupy.asarray(rng.standard_normal((1, 4, 80)).astype(np.float32))
    strided = dict(kw, u=wide[..., ::2])  # copied to C order
    same = dict(kw, C=kw["B"])  # one array as B and C
    for args in (strided, same, strided, same):
        out = nm.selective_scan(**args)
        want = reference.selective_scan(**{k: v.get() if hasattr(v, "get") else v
                                           for k, v in args.items()})
        np.testing.assert_allclose(out.get(), want, rtol=1e-4, atol=1e-5)
    assert len(api._VALIDATED) == 2


@pytest.mark.gpu
def test_gpu_out_sharing_memory_with_an_input_is_refused_on_a_known_layout(gpu, monkeypatch):
    from numba_mamba import scan as api

    Bt, Dc, N, L, _, options = REPEAT_CASES[0]
    rng = np.random.default_rng(7)
    kw = _device_inputs(rng, Bt, Dc, N, L, np.dtype(np.float32), options)
    both = cupy.zeros(2 * kw["z"].size, cupy.float32)
    kw["z"] = both[:kw["z"].size].reshape(kw["z"].shape)
    kw["z"][...] = 0.5
    over = both[5:5 + kw["z"].size].reshape(kw["z"].shape)  # (over most of z)
    for out, arg in ((kw["u"], "u"), (over, "z")):
        before = {k: v.copy() for k, v in kw.items() if isinstance(v, cupy.ndarray)}
        for known in (False, True):
            if not known:
                monkeypatch.setattr(api, "_VALIDATED", {})
            nm.selective_scan(**kw, out=cupy.empty_like(kw["u"]))  # (the layout now known)
            with pytest.raises(ValueError, match=f"^out must not share memory with {arg} "):
                nm.selective_scan(**kw, out=out)
            for k, v in before.items():  # (no kernel ran)
                np.testing.assert_array_equal(kw[k].get(), v.get())


@pytest.mark.gpu
def test_gpu_out_of_another_kind_dtype_or_layout_is_refused(gpu):
    Bt, Dc, N, L, _, options = REPEAT_CASES[0]
    kw = _device_inputs(np.random.default_rng(8), Bt, Dc, N, L, np.dtype(np.float32), options)
    shape = kw["u"].shape
    for out, error, pattern in [
            (np.empty(shape, np.float32), TypeError, r"^out must be a cupy\.ndarray like u"),
            (cupy.empty(shape, cupy.float64), TypeError, r"^out must have u's dtype float32"),
            (cupy.empty(shape[::-1], cupy.float32).T, ValueError, r"^out must be C-contiguous"),
            (cupy.empty(shape[:2] + (L - 1,), cupy.float32), ValueError,
             r"^out must have shape \(1, 4, 16\) like u")]:
        for _ in range(2):  # (unknown, then known layout of the arguments)
            with pytest.raises(error, match=pattern):
                nm.selective_scan(**kw, out=out)


def _count_state_engine_forwards(monkeypatch):
    """A list that grows by one item per call of the state engine's launcher."""
    from numba_mamba.cuda_kernels import scan_states

    calls = []
    forward = scan_states.scan_forward

    def spy(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    monkeypatch.setattr(scan_states, "scan_forward", spy)
    return calls


@pytest.mark.gpu
def test_gpu_a_setting_changed_through_the_public_import_is_seen_by_the_api(gpu,
                                                                            monkeypatch):
    """``numba_mamba.cuda_kernels.settings.settings`` is the object the API's kernels
    read: forcing the engine through it changes which engine a call runs."""
    from numba_mamba import scan as api
    from numba_mamba.cuda_kernels.settings import settings

    assert api._gpu_backend().settings is settings
    rng = np.random.default_rng(9)
    kw = _device_inputs(rng, 1, 4, 4, 16, np.dtype(np.float32), dict(D=True))
    calls = _count_state_engine_forwards(monkeypatch)
    with settings.override(engine="blocks"):
        blocks = nm.selective_scan(**kw)
    assert calls == []
    states = nm.selective_scan(**kw)  # ('auto')
    assert calls == [1]
    with settings.override(engine="blocks"):
        assert nm.selective_scan(**kw).shape == blocks.shape and calls == [1]
    np.testing.assert_allclose(states.get(), blocks.get(), rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_gpu_a_layout_seen_before_runs_its_plan_and_follows_the_settings(gpu, monkeypatch):
    """From the third call of a layout on, ``selective_scan`` runs the plan the
    state engine worked out for it (no pass through the launchers); every
    call, new data each time, agrees with the CPU, and a change of settings
    is seen by the next call."""
    from numba_mamba import scan as api
    from numba_mamba.cuda_kernels.settings import settings

    monkeypatch.setattr(api, "_VALIDATED", {})
    rng = np.random.default_rng(11)
    options = dict(D=True, z=True, delta_bias=True, softplus=True)
    calls = _count_state_engine_forwards(monkeypatch)

    def check(n_calls):
        kw = _device_inputs(rng, 2, 8, 16, 300, np.dtype(np.float32), options)
        y, last = nm.selective_scan(**kw, return_last_state=True)
        host = {k: v.get() if hasattr(v, "get") else v for k, v in kw.items()}
        want_y, want_last = nm.selective_scan(**host, return_last_state=True)
        np.testing.assert_allclose(y.get(), want_y, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(last.get(), want_last, rtol=1e-4, atol=1e-5)
        assert len(calls) == n_calls

    for n_calls in (1, 2, 2, 2):  # validated, planned, then the plan
        check(n_calls)
    (checked,) = api._VALIDATED.values()
    assert checked.plans[True][1] is not None
    with settings.override(save_every=2):  # (a new generation: planned again)
        for n_calls in (3, 3):
            check(n_calls)
    with settings.override(engine="blocks"):  # (no plan: the blocks engine each call)
        for n_calls in (3, 3):
            check(n_calls)
    for n_calls in (4, 4):  # (back: planned again, then the plan)
        check(n_calls)
