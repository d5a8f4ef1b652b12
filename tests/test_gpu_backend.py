"""The GPU backend (``cuda_kernels.scan``) against the float64 reference.

Calls ``scan_forward`` / ``scan_backward`` directly, in the canonical layout of
the backend contract (a (Bt, N, L) B or C passed as one group, (Bt, 1, N, L)).
Inputs are drawn in float64 and rounded to the dtype under test; the reference
runs in float64 on the rounded values, so the comparison measures the
kernels' arithmetic.  Runs only where CuPy sees a CUDA GPU (marker ``gpu``).
"""

import numpy as np
import pytest

from numba_mamba import reference
from tests.gpu import gpu_module
from tests.scan_cases import TOLERANCES, assert_close, make_inputs

cupy, _HAVE_GPU, pytestmark = gpu_module()

if _HAVE_GPU:
    from numba_mamba.cuda_kernels import scan, scan_states

LENGTHS = [1, 7, 8, 372, 784, 1134, 2048, 4097]
FLAG_SETS = [
    dict(),
    dict(D=True, z=True, delta_bias=True, softplus=True, initial_state=True),
    dict(D=True, initial_state=True),
    dict(z=True, delta_bias=True, softplus=True),
]
BC_KINDS = [("var", "var"), ("const", "const"), ("grouped", "const"), ("const", "grouped"),
            ("grouped", "grouped")]
GRADS = ("du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias", "dinitial_state")


def _backend_bc(M):
    """A (Bt, N, L) B or C goes to the backend as one group, (Bt, 1, N, L)."""
    return M[:, None] if M.ndim == 3 else M


def _kind(field, with_z, dtype):
    if field in ("out", "last_state"):
        return "out"
    if field in ("du", "dz", "dinitial_state"):
        return "du"
    if field == "ddelta":
        return "ddelta_z" if with_z and dtype == np.float32 else "ddelta"
    return "weights"


def _run_and_compare(kw, dtype, with_dlast, rng, engine=None, states_tuning=None,
                     n_segments=None, bwd_segments=None, **tuning):
    """Run the backend forward + backward and compare everything to the reference.

    ``engine`` picks the forward's engine (the backward follows what the
    forward saved); ``states_tuning`` runs the state-parallel engine with that
    ``(channels per block, forward tile, backward tile)`` (and ``n_segments``
    segments of the forward's sequence, ``bwd_segments`` of the backward's);
    ``tuning`` is the block engine's ``threads``/``items``.
    """
    dtype = np.dtype(dtype)
    host = {k: (v.astype(dtype) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
    exact = {k: (v.astype(np.float64) if isinstance(v, np.ndarray) else v)
             for k, v in host.items()}
    dev = {k: (cupy.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in host.items()}
    for name in ("B", "C"):
        dev[name] = cupy.ascontiguousarray(_backend_bc(dev[name]))
    args = [dev[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias",
                             "delta_softplus", "initial_state")]

    if states_tuning is not None:
        out, last, saved = scan_states.scan_forward(*args, tuning=states_tuning,
                                                    n_segments=n_segments)
    elif engine is not None:
        out, last, saved = scan.scan_forward(*args, engine=engine, **tuning)
    else:
        out, last, saved = scan.scan_forward(*args, **tuning)
    if engine == "states" or states_tuning is not None:
        assert isinstance(saved, scan_states.StatesSaved)
    rout, rlast, rbackward = reference.selective_scan_vjp(**exact)
    assert out.dtype == dtype and last.dtype == dtype
    tol = TOLERANCES[dtype]
    with_z = kw["z"] is not None
    assert_close("out", out.get(), rout, *tol["out"])
    assert_close("last_state", last.get(), rlast, *tol["out"])

    dout = rng.standard_normal(out.shape).astype(dtype)
    dlast = rng.standard_normal(last.shape).astype(dtype) if with_dlast else None
    if bwd_segments is not None:
        grads = scan_states.scan_backward(cupy.asarray(dout),
                                          None if dlast is None else cupy.asarray(dlast),
                                          *args, saved, n_segments=bwd_segments)
    else:
        grads = scan.scan_backward(cupy.asarray(dout),
                                   None if dlast is None else cupy.asarray(dlast),
                                   *args, saved, **tuning)
    want = rbackward(dout.astype(np.float64),
                     None if dlast is None else dlast.astype(np.float64))
    assert len(grads) == len(GRADS)
    for field, g in zip(GRADS, grads):
        w = getattr(want, field)
        if w is None:
            assert g is None, field
            continue
        assert isinstance(g, cupy.ndarray) and g.dtype == dtype, field
        assert_close(field, g.get().reshape(w.shape), w, *tol[_kind(field, with_z, dtype)])
    return out, grads


def _grid():
    cases = []
    for i, L in enumerate(LENGTHS):
        for j, dtype in enumerate(("float32", "float64")):
            k = 2 * i + j
            cases.append((L, dtype, BC_KINDS[k % len(BC_KINDS)], FLAG_SETS[k % len(FLAG_SETS)],
                          k % 3 != 0))
    # every flag set with every B/C kind, past one chunk of the default tuning
    for dtype in ("float32", "float64"):
        for f, flags in enumerate(FLAG_SETS):
            for b, bc in enumerate(BC_KINDS):
                cases.append((2500, dtype, bc, flags, (f + b) % 2 == 0))
    return cases


def _id(case):
    L, dtype, bc, flags, dlast = case
    return (f"L{L}-{dtype}-{bc[0]}-{bc[1]}-{'+'.join(flags) or 'plain'}-"
            f"{'dlast' if dlast else 'nodlast'}")


@pytest.mark.parametrize("engine", ["blocks", "states"])
@pytest.mark.parametrize("case", _grid(), ids=_id)
def test_gpu_matches_reference(case, engine):
    L, dtype, (bk, ck), flags, with_dlast = case
    rng = np.random.default_rng(L * 7 + len(flags))
    kw = make_inputs(rng, Bt=2, Dc=8, L=L, N=5, dtype=np.float64, B_kind=bk, C_kind=ck,
                     G=2, **flags)
    _run_and_compare(kw, dtype, with_dlast, rng, engine=engine)


# (channels per block, forward tile, backward tile): one channel per block,
# channels not dividing the group, tiles of one step, sub-tiles, the default
STATES_TUNINGS = [(1, 1, 1), (3, 8, 2), (4, 32, 16), (6, 16, 16), None]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("tuning", STATES_TUNINGS, ids=str)
@pytest.mark.parametrize("N", [1, 5, 16, 64])
def test_gpu_states_engine_independent_of_layout(dtype, tuning, N):
    rng = np.random.default_rng(N)
    kw = make_inputs(rng, Bt=2, Dc=12, L=300, N=N, dtype=np.float64, B_kind="grouped",
                     C_kind="var", G=2, D=True, z=True, delta_bias=True, softplus=True,
                     initial_state=True)
    if tuning is None:
        p = scan_states.plan(dtype, N, 12, 2, 1)
        tuning = (p.ch, p.t_fwd, p.t_bwd)
    _run_and_compare(kw, dtype, True, rng, states_tuning=tuning)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("n_segments", [2, 3, 8])
def test_gpu_states_engine_split_sequence(dtype, n_segments):
    """The forward split into segments (last one short) matches the reference."""
    rng = np.random.default_rng(n_segments)
    kw = make_inputs(rng, Bt=2, Dc=12, L=1000, N=16, dtype=np.float64, B_kind="var",
                     C_kind="grouped", G=2, D=True, z=True, delta_bias=True, softplus=True,
                     initial_state=True)
    p = scan_states.plan(dtype, 16, 12, 1, 2)
    assert scan_states.segments(2, 12, 1000, p, n_segments)[0] == n_segments
    _run_and_compare(kw, dtype, True, rng, states_tuning=(p.ch, p.t_fwd, p.t_bwd),
                     n_segments=n_segments)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("save_every", [2, 8])
def test_gpu_states_engine_keeps_one_state_in_several_tiles(dtype, save_every):
    """The forward keeps one state per ``save_every`` backward tiles (the last stretch short);
    the backward recovers the others and matches the reference."""
    rng = np.random.default_rng(save_every)
    kw = make_inputs(rng, Bt=2, Dc=12, L=1000, N=16, dtype=np.float64, B_kind="grouped",
                     C_kind="var", G=3, D=True, z=True, delta_bias=True, softplus=True,
                     initial_state=True)
    p = scan_states.plan(dtype, 16, 12, 3, 1)
    _run_and_compare(kw, dtype, True, rng,
                     states_tuning=(p.ch, p.t_fwd, p.t_bwd, save_every), n_segments=3)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("with_dlast", [True, False])
@pytest.mark.parametrize("n_segments", [None, 2, 3, 8])
def test_gpu_states_engine_split_backward(dtype, with_dlast, n_segments):
    """The backward split into segments (last one short; None: the default split, 3
    segments here) matches the reference, with and without ``dlast_state``."""
    rng = np.random.default_rng(n_segments or 1)
    kw = make_inputs(rng, Bt=2, Dc=12, L=1000, N=16, dtype=np.float64, B_kind="var",
                     C_kind="grouped", G=2, D=True, z=True, delta_bias=True, softplus=True,
                     initial_state=True)
    p = scan_states.plan(dtype, 16, 12, 1, 2)
    assert scan_states.backward_segments(2, 12, 1000, p, n_segments)[0] == (n_segments or 3)
    _run_and_compare(kw, dtype, with_dlast, rng, states_tuning=(p.ch, p.t_fwd, p.t_bwd),
                     bwd_segments=n_segments)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("bc", [("grouped", "var"), ("const", "const")], ids="-".join)
@pytest.mark.parametrize("save_every", [2, 8])
def test_gpu_states_engine_split_backward_keeps_one_state_in_several_tiles(dtype, bc,
                                                                           save_every):
    """The backward in 2 segments of whole stretches of ``save_every`` tiles (the
    forward's sequence in 3) matches the reference."""
    rng = np.random.default_rng(save_every)
    kw = make_inputs(rng, Bt=2, Dc=12, L=1000, N=16, dtype=np.float64, B_kind=bc[0],
                     C_kind=bc[1], G=3, D=True, z=True, delta_bias=True, softplus=True,
                     initial_state=True)
    p = scan_states.plan(dtype, 16, 12, 3 if bc[0] == "grouped" else 0,
                         1 if bc[1] == "var" else 0)._replace(save_every=save_every)
    assert scan_states.backward_segments(2, 12, 1000, p, 2)[0] == 2
    _run_and_compare(kw, dtype, True, rng,
                     states_tuning=(p.ch, p.t_fwd, p.t_bwd, save_every), n_segments=3,
                     bwd_segments=2)


@pytest.mark.parametrize("engine", ["blocks", "states"])
def test_gpu_raw_launch_matches_numba_launch(engine, monkeypatch):
    """Kernels launched through CuPy (``_launch.RawLaunch``) give what Numba's launcher gives."""
    from numba_mamba.cuda_kernels import _launch
    from numba_mamba.cuda_kernels.settings import settings

    rng = np.random.default_rng(3)
    kw = make_inputs(rng, Bt=2, Dc=12, L=777, N=5, dtype=np.float32, B_kind="grouped",
                     C_kind="var", G=3, D=True, z=True, delta_bias=True, softplus=True,
                     initial_state=True)
    args = [cupy.asarray(kw[k]) if isinstance(kw[k], np.ndarray) else kw[k]
            for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "delta_softplus",
                      "initial_state")]
    args[4] = cupy.ascontiguousarray(args[4][:, None])
    dout = cupy.asarray(rng.standard_normal(kw["u"].shape).astype(np.float32))
    dlast = cupy.asarray(rng.standard_normal((2, 12, 5)).astype(np.float32))
    results = {}
    for raw in (False, True):
        with settings.override(raw_launch=raw):
            out, last, saved = scan.scan_forward(*args, engine=engine)
            grads = scan.scan_backward(dout, dlast, *args, saved)
        results[raw] = [out.get(), last.get()] + [g.get() for g in grads]
    assert any(r is not None for r in _launch._RAW.values()), "the raw launcher was not used"
    names = ("out", "last_state") + GRADS
    for name, a, b in zip(names, results[False], results[True]):
        if name in ("dA", "dB", "dC", "dD", "ddelta_bias"):  # float32 atomics: order varies
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=name)
        else:
            np.testing.assert_array_equal(b, a, err_msg=name)


def test_gpu_engine_choice():
    assert scan.choose_engine(8, 1536, 16) == "states"
    assert scan.choose_engine(1, 4, 4) == "states"
    assert scan.choose_engine(64, 64, 256) == "blocks"  # more states than a block holds


TUNINGS = [("float32", t) for t in [(32, 1), (32, 4), (64, 3), (128, 16), (256, 2), (512, 4)]]
TUNINGS += [("float64", t) for t in [(32, 1), (32, 4), (64, 3), (128, 8), (256, 2)]]


@pytest.mark.parametrize("dtype,tuning", TUNINGS, ids=[f"{d}-t{t}-i{i}" for d, (t, i) in TUNINGS])
def test_gpu_result_independent_of_threads_and_items(dtype, tuning):
    threads, items = tuning
    rng = np.random.default_rng(11)
    kw = make_inputs(rng, Bt=2, Dc=6, L=1134, N=4, dtype=np.float64, B_kind="grouped",
                     C_kind="var", G=3, D=True, z=True, delta_bias=True, softplus=True,
                     initial_state=True)
    _run_and_compare(kw, dtype, True, rng, threads=threads, items=items)


def test_gpu_backward_rejects_a_chunk_other_than_the_forwards():
    kw = make_inputs(np.random.default_rng(0), Bt=1, Dc=2, L=50, N=2, dtype=np.float32,
                     B_kind="const", C_kind="const")
    args = [cupy.asarray(v) if isinstance(v, np.ndarray) else v
            for v in (kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], None, None, None,
                      False, None)]
    out, _, saved = scan.scan_forward(*args, threads=64, items=2)
    with pytest.raises(ValueError, match=r"threads \* items must equal the forward's chunk 128"):
        scan.scan_backward(cupy.ones_like(out), None, *args, saved, threads=32, items=2)
    # the same chunk split differently is fine
    g = scan.scan_backward(cupy.ones_like(out), None, *args, saved, threads=32, items=4)
    g_ref = scan.scan_backward(cupy.ones_like(out), None, *args, saved)
    np.testing.assert_allclose(g[0].get(), g_ref[0].get(), rtol=1e-5, atol=1e-6)


def test_gpu_launches_on_the_current_cupy_stream():
    rng = np.random.default_rng(5)
    kw = make_inputs(rng, Bt=2, Dc=8, L=3000, N=4, dtype=np.float32, D=True, z=True)
    args = [cupy.asarray(kw[k]) if isinstance(kw[k], np.ndarray) else kw[k]
            for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "delta_softplus",
                      "initial_state")]
    args[3] = cupy.ascontiguousarray(args[3][:, None])
    args[4] = cupy.ascontiguousarray(args[4][:, None])
    expected = scan.scan_forward(*args)[0].get()
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        out = scan.scan_forward(*args)[0]
        host = cupy.asnumpy(out, stream=stream)  # ordered after the kernel on `stream`
    stream.synchronize()
    np.testing.assert_array_equal(host, expected)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["blocks", "states"])
def test_gpu_forward_past_2_31_elements(engine):
    """u, delta and out have more than 2**31 elements: 64-bit indexing."""
    Bt, Dc, L, N = 1024, 1024, 2049, 2
    assert Bt * Dc * L > 2**31
    rng = np.random.default_rng(7)
    crng = cupy.random.default_rng(7)
    u = crng.standard_normal((Bt, Dc, L), dtype=cupy.float32)
    delta = crng.random((Bt, Dc, L), dtype=cupy.float32) * np.float32(3.5) - np.float32(3.0)
    A = -rng.uniform(0.2, 3.0, (Dc, N)).astype(np.float32)
    B = rng.standard_normal((Dc, N)).astype(np.float32)
    C = rng.standard_normal((Dc, N)).astype(np.float32)
    D = rng.standard_normal(Dc).astype(np.float32)
    bias = rng.uniform(-1.0, 1.0, Dc).astype(np.float32)
    out, last, _ = scan.scan_forward(u, delta, cupy.asarray(A), cupy.asarray(B),
                                     cupy.asarray(C), cupy.asarray(D), None,
                                     cupy.asarray(bias), True, None, engine=engine)
    tol = TOLERANCES[np.dtype(np.float32)]["out"]
    # the first channel, channels whose offsets straddle 2**31, and the last one
    flat = [0, 2**31 // L, 2**31 // L + 1, Bt * Dc - 1]
    for f in flat:
        b, d = divmod(f, Dc)
        ch = slice(d, d + 1)
        rout, rlast = reference.selective_scan(
            u[b:b + 1, ch].get(), delta[b:b + 1, ch].get(), A[ch], B[ch], C[ch], D=D[ch],
            delta_bias=bias[ch], delta_softplus=True, return_last_state=True)
        assert_close(f"out[{b}, {d}]", out[b:b + 1, ch].get(), rout, *tol)
        assert_close(f"last_state[{b}, {d}]", last[b:b + 1, ch].get(), rlast, *tol)
