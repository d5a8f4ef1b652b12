"""Half-precision storage of the state-parallel engine on the GPU.

The state engine (``cuda_kernels.scan_states``) reads ``u``, ``delta``, ``z``,
variable ``B``/``C`` and ``dout`` in float16 or bfloat16 and writes ``out``,
``du``, ``ddelta``, ``dz`` in it, computing in float32; the public API takes
that path where ``settings.direct_half`` is on (the default).  Checked here:

* the backend against the float64 reference on the half-rounded inputs, with
  the float32 tolerances widened by one rounding to the half type where a
  result is stored in it (``tests.scan_cases.rounded_once``), and against the
  float32 kernels run on the same values with their results rounded to the
  half type afterwards (which the half kernels should match to the bit; one
  half ulp is allowed);
* the API with ``direct_half`` on against the API with it off (the cast
  path) and against the reference (``tests/test_gpu_api.py``'s half
  tolerances), and that the half arrays do reach the engine uncast;
* Numba's launcher against ``RawLaunch`` on half arrays.

Runs only where CuPy sees a CUDA GPU (marker ``gpu``).
"""

import numpy as np
import pytest

import numba_mamba as nm
from numba_mamba import reference
from tests.gpu import gpu_module
from tests.scan_cases import (HALF_UNIT_ROUNDOFF, TOLERANCES, assert_close, half_dtype,
                              make_inputs, rounded_once)

cupy, _HAVE_GPU, pytestmark = gpu_module()

if _HAVE_GPU:
    from numba_mamba.cuda_kernels import scan, scan_states

GRADS = ("du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias", "dinitial_state")
F32 = np.dtype(np.float32)


def _dtype(name):
    if name == "bfloat16":
        pytest.importorskip("ml_dtypes")
    dtype = half_dtype(name)
    try:
        cupy.asarray(np.zeros(2, dtype=dtype))
    except Exception as exc:  # CuPy without bfloat16 arrays
        pytest.skip(f"this CuPy has no {name} arrays: {exc}")
    return dtype


def _half_inputs(kw, dtype):
    """Host arrays as the half path takes them: per-step arrays (u, delta, z,
    variable B/C) in ``dtype``, the rest float32 (rounded through ``dtype``, so
    that both hold the same values)."""
    host = {}
    for k, v in kw.items():
        if not isinstance(v, np.ndarray):
            host[k] = v
            continue
        v = v.astype(dtype)
        per_step = k in ("u", "delta", "z") or (k in ("B", "C") and v.ndim != 2)
        host[k] = v if per_step else v.astype(np.float32)
    return host


def _backend_args(host):
    dev = {k: (cupy.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in host.items()}
    for name in ("B", "C"):
        if dev[name].ndim == 3:
            dev[name] = cupy.ascontiguousarray(dev[name][:, None])
    return [dev[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias",
                             "delta_softplus", "initial_state")]


def _tol(kind, got_dtype, dtype, with_z):
    tol = TOLERANCES[F32]
    if kind == "ddelta" and with_z:
        kind = "ddelta_z"
    rtol, atol = tol[kind]
    if got_dtype == dtype:
        rtol, atol = rounded_once(rtol, atol, HALF_UNIT_ROUNDOFF[dtype.name])
    return rtol, atol


def _kind(field):
    if field in ("out", "last_state"):
        return "out"
    if field in ("du", "dz", "dinitial_state"):
        return "du"
    return "ddelta" if field == "ddelta" else "weights"


def _run_backend(args, dout, dlast, states_tuning, n_segments, bwd_segments):
    out, last, saved = scan_states.scan_forward(*args, tuning=states_tuning,
                                                n_segments=n_segments)
    grads = scan_states.scan_backward(dout, dlast, *args, saved, n_segments=bwd_segments)
    return out, last, grads


def _check_backend(kw, dtype_name, rng, with_dlast=True, states_tuning=None, n_segments=None,
                   bwd_segments=None):
    dtype = _dtype(dtype_name)
    host = _half_inputs(kw, dtype)
    exact = {k: (v.astype(np.float64) if isinstance(v, np.ndarray) else v)
             for k, v in host.items()}
    args = _backend_args(host)
    Bt, Dc, L = kw["u"].shape
    N = kw["A"].shape[1]
    if states_tuning is None:
        p = scan_states.plan(F32, N, Dc, scan_states._groups(args[3]),
                             scan_states._groups(args[4]))
        states_tuning = (p.ch, p.t_fwd, p.t_bwd)
    dout = rng.standard_normal((Bt, Dc, L)).astype(dtype)
    dlast = rng.standard_normal((Bt, Dc, N)).astype(np.float32) if with_dlast else None
    d_dout = cupy.asarray(dout)
    d_dlast = None if dlast is None else cupy.asarray(dlast)

    out, last, grads = _run_backend(args, d_dout, d_dlast, states_tuning, n_segments,
                                    bwd_segments)
    with_z = kw["z"] is not None
    rout, rlast, rbackward = reference.selective_scan_vjp(**exact)
    want = rbackward(dout.astype(np.float64), None if dlast is None else dlast.astype(np.float64))
    assert out.dtype == dtype and last.dtype == F32
    assert_close("out", out.get(), rout, *_tol("out", out.dtype, dtype, with_z))
    assert_close("last_state", last.get(), rlast, *_tol("out", last.dtype, dtype, with_z))
    for field, g in zip(GRADS, grads):
        w = getattr(want, field)
        if w is None:
            assert g is None, field
            continue
        given = host["initial_state" if field == "dinitial_state" else field[1:]]
        expect_dtype = F32 if field == "dinitial_state" else given.dtype
        assert isinstance(g, cupy.ndarray) and g.dtype == expect_dtype, (field, g.dtype)
        assert_close(field, g.get().reshape(w.shape), w,
                     *_tol(_kind(field), g.dtype, dtype, with_z))

    # the float32 kernels on the same values, rounded afterwards
    args32 = [a.astype(np.float32) if isinstance(a, cupy.ndarray) else a for a in args]
    out32, last32, grads32 = _run_backend(args32, d_dout.astype(np.float32), d_dlast,
                                          states_tuning, n_segments, bwd_segments)
    unit = HALF_UNIT_ROUNDOFF[dtype.name]
    np.testing.assert_allclose(out.get().astype(np.float64),
                               out32.astype(dtype).get().astype(np.float64),
                               rtol=2 * unit, atol=1e-6, err_msg="out vs float32 kernels")
    np.testing.assert_allclose(last.get(), last32.get(), rtol=1e-6, atol=1e-7,
                               err_msg="last_state vs float32 kernels")
    for field, g, g32 in zip(GRADS, grads, grads32):
        if g is None:
            continue
        rounded = g32.astype(g.dtype).get().astype(np.float64)
        if g.dtype == dtype:
            np.testing.assert_allclose(g.get().astype(np.float64), rounded, rtol=2 * unit,
                                       atol=1e-6, err_msg=f"{field} vs float32 kernels")
        else:
            # float32, summed with atomics in an order that varies: the rounding
            # of such a sum is relative to the size of its terms, not to a result
            # that cancels (on the H200, dA[0, 6] = -0.0357 among values up to 15
            # differed by 1.9e-6 between two runs), so atol scales with the array
            atol = 1e-6 * max(1.0, float(np.abs(rounded).max()))
            np.testing.assert_allclose(g.get(), rounded, rtol=1e-5, atol=atol, err_msg=field)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("bc", [("var", "var"), ("grouped", "const"), ("const", "grouped"),
                                ("const", "const")], ids="-".join)
@pytest.mark.parametrize("flags", [dict(), dict(D=True, z=True, delta_bias=True, softplus=True,
                                                initial_state=True)],
                         ids=["plain", "allflags"])
def test_gpu_half_states_backend_matches_reference(dtype, bc, flags):
    rng = np.random.default_rng(len(flags) * 10 + len(bc[0]))
    kw = make_inputs(rng, Bt=2, Dc=12, L=1000, N=16, dtype=np.float64, B_kind=bc[0],
                     C_kind=bc[1], G=2, **flags)
    _check_backend(kw, dtype, rng, with_dlast=bool(flags))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("tuning,n_segments,bwd_segments",
                         [((3, 8, 2), 3, 3), ((1, 1, 1), None, None), ((4, 32, 16, 2), 2, 2),
                          ((6, 16, 16, 8), 3, None)], ids=str)
def test_gpu_half_states_backend_layouts_and_segments(dtype, tuning, n_segments, bwd_segments):
    """Small blocks and tiles, one saved state in several tiles, forward and
    backward split into segments: the same results."""
    rng = np.random.default_rng(len(tuning))
    kw = make_inputs(rng, Bt=2, Dc=12, L=777, N=5, dtype=np.float64, B_kind="grouped",
                     C_kind="var", G=3, D=True, z=True, delta_bias=True, softplus=True,
                     initial_state=True)
    _check_backend(kw, dtype, rng, states_tuning=tuning, n_segments=n_segments,
                   bwd_segments=bwd_segments)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_gpu_half_states_backend_rejects_mixed_dtypes(dtype):
    dtype = _dtype(dtype)
    kw = make_inputs(np.random.default_rng(0), Bt=1, Dc=4, L=50, N=4, dtype=np.float64)
    args = _backend_args(_half_inputs(kw, dtype))
    bad = list(args)
    bad[1] = bad[1].astype(np.float32)  # delta
    with pytest.raises(TypeError, match="delta must have the dtype of u"):
        scan_states.scan_forward(*bad)
    bad = list(args)
    bad[2] = bad[2].astype(dtype)  # A
    with pytest.raises(TypeError, match="A must be float32"):
        scan_states.scan_forward(*bad)
    with pytest.raises(TypeError, match="'blocks' engine"):
        scan.scan_forward(*args, engine="blocks")


# ------------------------------------------------------------------- the API
# the reference project's half tolerances, as tests/test_gpu_api.py uses them
HALF_TOLERANCES = {
    "float16": dict(out=(3e-3, 5e-3), grads=(5e-3, 1e-2)),
    "bfloat16": dict(out=(3e-2, 5e-2), grads=(5e-2, 1e-1)),
}


def _api_run(dev, dout, dlast):
    out, last, backward = nm.selective_scan_vjp(**dev)
    grads = backward(dout, dlast)
    return out, last, grads


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("bc", [("var", "var"), ("grouped", "const")], ids="-".join)
@pytest.mark.parametrize("half_weights", [True, False], ids=["half-weights", "float32-weights"])
def test_gpu_api_direct_half_matches_cast_path_and_reference(monkeypatch, dtype, bc,
                                                             half_weights):
    dtype = _dtype(dtype)
    Bt, Dc, L, N = 2, 512, 300, 16  # Bt * Dc * N = 16384: the state engine
    assert scan.choose_engine(Bt, Dc, N) == "states"
    rng = np.random.default_rng(7)
    kw = make_inputs(rng, Bt=Bt, Dc=Dc, L=L, N=N, dtype=np.float64, B_kind=bc[0],
                     C_kind=bc[1], G=4, D=True, z=True, delta_bias=True, softplus=True,
                     initial_state=True)
    host = {k: (v.astype(dtype) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
    if not half_weights:
        for k in ("A", "D", "delta_bias", "initial_state"):
            host[k] = host[k].astype(np.float32)
    exact = {k: (v.astype(np.float64) if isinstance(v, np.ndarray) else v)
             for k, v in host.items()}
    dev = {k: (cupy.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in host.items()}
    dout = rng.standard_normal((Bt, Dc, L)).astype(dtype)
    dlast = rng.standard_normal((Bt, Dc, N)).astype(np.float32)

    seen = []
    forward, backward = scan_states.scan_forward, scan_states.scan_backward

    def spy_forward(u, *args, **kwargs):
        seen.append(("u", u.dtype))
        return forward(u, *args, **kwargs)

    def spy_backward(dout_, *args, **kwargs):
        seen.append(("dout", dout_.dtype))
        return backward(dout_, *args, **kwargs)

    monkeypatch.setattr(scan_states, "scan_forward", spy_forward)
    monkeypatch.setattr(scan_states, "scan_backward", spy_backward)
    results = {}
    for direct in (False, True):
        seen.clear()
        with scan.settings.override(direct_half=direct):
            results[direct] = _api_run(dev, cupy.asarray(dout), cupy.asarray(dlast))
        want = dtype if direct else F32
        assert seen == [("u", want), ("dout", want)], (direct, seen)

    (out0, last0, g0), (out1, last1, g1) = results[False], results[True]
    assert out1.dtype == dtype and last1.dtype == F32
    unit = HALF_UNIT_ROUNDOFF[dtype.name]
    np.testing.assert_allclose(out1.get().astype(np.float64), out0.get().astype(np.float64),
                               rtol=2 * unit, atol=1e-6, err_msg="out: direct vs cast")
    np.testing.assert_allclose(last1.get(), last0.get(), rtol=1e-6, atol=1e-6)
    for field in g0._fields:
        a, b = getattr(g0, field), getattr(g1, field)
        assert b.dtype == a.dtype == host[field[1:]].dtype and b.shape == a.shape, field
        np.testing.assert_allclose(b.get().astype(np.float64), a.get().astype(np.float64),
                                   rtol=2 * unit, atol=1e-5, err_msg=f"{field}: direct vs cast")

    tol = HALF_TOLERANCES[dtype.name]
    rout, rlast, rbackward = reference.selective_scan_vjp(**exact)
    assert_close("out", out1.get(), rout, *tol["out"])
    assert_close("last_state", last1.get(), rlast, *tol["out"])
    want = rbackward(dout.astype(np.float64), dlast.astype(np.float64))
    for field in g1._fields:
        assert_close(field, getattr(g1, field).get(), getattr(want, field), *tol["grads"])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_gpu_api_direct_half_not_taken_for_mixed_dtypes_or_the_blocks_engine(monkeypatch,
                                                                              dtype):
    dtype = _dtype(dtype)
    assert scan.settings.direct_half  # (the default)
    seen = []
    forward = scan_states.scan_forward

    def spy_forward(u, *args, **kwargs):
        seen.append(u.dtype)
        return forward(u, *args, **kwargs)

    monkeypatch.setattr(scan_states, "scan_forward", spy_forward)
    rng = np.random.default_rng(1)
    kw = make_inputs(rng, Bt=2, Dc=512, L=64, N=16, dtype=np.float64, D=True, z=True)
    dev = {k: (cupy.asarray(v.astype(dtype)) if isinstance(v, np.ndarray) else v)
           for k, v in kw.items()}
    out = nm.selective_scan(**dict(dev, delta=dev["delta"].astype(np.float32)))
    assert out.dtype == dtype and seen == [F32]  # delta float32: cast
    out = nm.selective_scan(**dev)
    assert out.dtype == dtype and seen == [F32, dtype]  # direct
    small = {k: (v[:, :4] if k in ("u", "delta", "z") else v[:4] if k in ("A", "D") else v)
             for k, v in dev.items()}
    with scan.settings.override(engine="blocks"):
        out = nm.selective_scan(**small)  # the blocks engine: cast, state engine not called
    assert out.dtype == dtype and seen == [F32, dtype]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_gpu_half_raw_launch_matches_numba_launch(monkeypatch, dtype):
    """Half arrays launched through CuPy (``_launch.RawLaunch``) give what Numba's
    launcher gives."""
    from numba_mamba.cuda_kernels.settings import settings

    dtype = _dtype(dtype)
    rng = np.random.default_rng(3)
    kw = make_inputs(rng, Bt=2, Dc=12, L=777, N=5, dtype=np.float64, B_kind="grouped",
                     C_kind="var", G=3, D=True, z=True, delta_bias=True, softplus=True,
                     initial_state=True)
    args = _backend_args(_half_inputs(kw, dtype))
    dout = cupy.asarray(rng.standard_normal(kw["u"].shape).astype(dtype))
    dlast = cupy.asarray(rng.standard_normal((2, 12, 5)).astype(np.float32))
    results = {}
    for raw in (False, True):
        with settings.override(raw_launch=raw):
            out, last, saved = scan_states.scan_forward(*args)
            grads = scan_states.scan_backward(dout, dlast, *args, saved)
        results[raw] = [out, last] + list(grads)
    names = ("out", "last_state") + GRADS
    for name, a, b in zip(names, results[False], results[True]):
        a = a.get().astype(np.float64)
        b = b.get().astype(np.float64)
        if name in ("dA", "dB", "dC", "dD", "ddelta_bias"):  # atomics: order varies
            np.testing.assert_allclose(b, a, rtol=2 * HALF_UNIT_ROUNDOFF[dtype.name],
                                       atol=1e-6, err_msg=name)
        else:
            np.testing.assert_array_equal(b, a, err_msg=name)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_gpu_narrow_rounds_as_astype_does(dtype):
    """The kernel that rounds the float32 sums of a half ``dB``/``dC`` to their
    dtype (``scan_states.narrow``, so that a recorded backward repeats it)
    gives ``astype``'s bits: ties, the largest finite values, infinities,
    subnormals and random values."""
    dtype = _dtype(dtype)
    rng = np.random.default_rng(11)
    finfo = np.finfo(dtype) if dtype.name == "float16" else pytest.importorskip(
        "ml_dtypes").finfo(dtype)
    special = np.array([0.0, -0.0, np.inf, -np.inf, float(finfo.max), -float(finfo.max),
                        float(finfo.max) * 1.001, float(finfo.tiny), float(finfo.tiny) / 3,
                        1.0 + float(finfo.eps) / 2, 1.0 + 1.5 * float(finfo.eps), 3e-41],
                       np.float32)
    n = 100_008  # (with the 12 special values: 4 x 8335 x 3)
    x = np.concatenate([special, rng.standard_normal(n).astype(np.float32)
                        * np.float32(10.0) ** rng.integers(-8, 8, n).astype(np.float32)])
    x = x.astype(np.float32).reshape(4, -1, 3)
    got = scan_states.narrow(cupy.asarray(x), dtype)
    cupy.cuda.get_current_stream().synchronize()
    assert got.dtype == dtype and got.shape == x.shape
    with np.errstate(over="ignore"):  # (past the largest finite value: infinity)
        want = x.astype(dtype)  # (NumPy's / ml_dtypes' rounding, on the host)
    np.testing.assert_array_equal(got.get().view(np.uint16), want.view(np.uint16))
    nan = scan_states.narrow(cupy.asarray(np.full(3, np.nan, np.float32)), dtype).get()
    assert np.isnan(nan.astype(np.float32)).all()
