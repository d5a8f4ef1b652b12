"""The GPU kernels under the CUDA simulator, against the float64 reference.

The simulator (``NUMBA_ENABLE_CUDASIM=1``) runs the ``@cuda.jit`` kernels as
Python on the CPU, so this checks the kernels' logic -- chunking, the carry
between chunks, the combine across warps, the reverse scan, the atomics and
every optional input -- on a machine without a GPU.  The simulator has no
warp shuffles; under it the kernel factory combines warps through shared
memory instead, with a 4-lane "warp" so that a block of 8 threads has two.

The simulator must be switched on before ``numba.cuda`` is first imported, so
the cases run in subprocesses, a few per process: this file, run as a script,
beside the other tests (``tests/background.py``).  Sizes are tiny
(the simulator runs one Python thread per CUDA thread).  The block-scan engine
runs with 8 threads x 2 items, chunks of 16 steps, and L = 33 crosses two
chunk boundaries (the last chunk holds one step); the state-parallel engine
(``scan_states``, no warp operations at all) runs the same checks with small
blocks and tiles, and with float16 and bfloat16 storage of the per-step
arrays (float32 compute): against the reference with the float32 tolerances
widened by one rounding to the half type where a result is stored in it, and
bit for bit against the float32 kernels' results rounded afterwards.
"""

import json
import sys
import zlib

import numpy as np
import pytest

THREADS, ITEMS = 8, 2

ALL_FLAGS = dict(D=True, z=True, delta_bias=True, softplus=True, initial_state=True)
CASES = {
    # name: (dtype, B kind, C kind, flags, dlast_state given)
    "float64-const-const-allflags": ("float64", "const", "const", ALL_FLAGS, True),
    "float64-var-var-allflags": ("float64", "var", "var", ALL_FLAGS, True),
    "float64-grouped-grouped-allflags": ("float64", "grouped", "grouped", ALL_FLAGS, True),
    "float64-grouped-const-noflags": ("float64", "grouped", "const", {}, False),
    "float32-var-grouped-allflags": ("float32", "var", "grouped", ALL_FLAGS, True),
    "float32-const-var-allflags": ("float32", "const", "var", ALL_FLAGS, True),
}
# The state-parallel engine (cuda_kernels/scan_states.py), with small blocks and
# tiles: (channels per block, forward tile, backward tile).  Dc = 4 channels in
# G = 2 groups; 3 channels per block leave a block with one channel and idle
# threads, forward tiles of 8 hold four backward tiles of 2 (L = 33: 5 tiles,
# the last of one step).  A seventh entry splits the forward's sequence into
# that many segments (``scan_states.segments``; 3 with tiles of 8: segments of
# 16, 16 and 1 steps; 2 with tiles of 4: 20 and 13); an eighth the backward's
# (``scan_states.backward_segments``, None for one segment as these sizes get
# by default).
STATES_CASES = {
    "states-float64-var-var-allflags": ("float64", "var", "var", ALL_FLAGS, True, (3, 8, 2)),
    "states-float64-grouped-const-noflags": ("float64", "grouped", "const", {}, False, (2, 4, 4)),
    "states-float64-const-grouped-allflags": ("float64", "const", "grouped", ALL_FLAGS, True,
                                              (1, 16, 8)),
    "states-float32-grouped-var-allflags": ("float32", "grouped", "var", ALL_FLAGS, True,
                                            (4, 8, 8)),
    "states-float64-var-var-allflags-3segments": ("float64", "var", "var", ALL_FLAGS, True,
                                                  (3, 8, 2), 3),
    "states-float32-const-grouped-noflags-2segments": ("float32", "const", "grouped", {},
                                                       False, (2, 4, 4), 2),
    # a fourth tuning entry keeps one state in that many backward tiles: 17 tiles
    # of 2 steps in stretches of 3 (the last of 2); 9 tiles of 4 in stretches of
    # 4 (the last of 1), with the sequence in 2 segments
    "states-float64-var-var-allflags-save3": ("float64", "var", "var", ALL_FLAGS, True,
                                              (3, 8, 2, 3)),
    "states-float32-grouped-const-allflags-save4-2segments": ("float32", "grouped", "const",
                                                              ALL_FLAGS, True, (2, 4, 4, 4), 2),
    # the backward's sequence in segments: of 12, 12 and 9 steps (tiles of 2);
    # 20 and 13 (tiles of 4; no dlast_state, no initial_state); 10, 10, 10
    # and 3 with the forward's in 3 segments (no dlast_state)
    "states-float64-var-var-allflags-bwd3segments": ("float64", "var", "var", ALL_FLAGS, True,
                                                     (3, 8, 2), None, 3),
    "states-float32-const-grouped-noflags-bwd2segments": ("float32", "const", "grouped", {},
                                                          False, (2, 4, 4), None, 2),
    "states-float64-grouped-var-allflags-nodlast-3segments-bwd4segments": (
        "float64", "grouped", "var", ALL_FLAGS, False, (3, 8, 2), 3, 4),
    # and with one saved state per stretch of backward tiles: segments of 18
    # (three stretches of 3 tiles of 2) and 15 steps (3, 3 and 2 tiles);
    # of 12 (three stretches of 2 tiles of 2), 12 and 9 steps (2, 2, 1 tiles)
    "states-float64-var-var-allflags-save3-bwd2segments": ("float64", "var", "var", ALL_FLAGS,
                                                           True, (3, 8, 2, 3), None, 2),
    "states-float32-const-var-allflags-save2-2segments-bwd3segments": (
        "float32", "const", "var", ALL_FLAGS, True, (2, 8, 2, 2), 2, 3),
    # half storage (float32 compute): u, delta, z, variable B/C and dout in
    # float16 or bfloat16 (bfloat16 as uint16 bits: the simulator's NumPy
    # conversions), out, du, ddelta, dz written in it; A, D, delta_bias,
    # initial_state, dlast_state and a constant B/C float32
    "states-float16-var-var-allflags-3segments-bwd3segments": (
        "float16", "var", "var", ALL_FLAGS, True, (3, 8, 2), 3, 3),
    "states-bfloat16-grouped-var-allflags-save2-2segments-bwd2segments": (
        "bfloat16", "grouped", "var", ALL_FLAGS, True, (2, 4, 4, 2), 2, 2),
    "states-bfloat16-const-grouped-noflags": ("bfloat16", "const", "grouped", {}, False,
                                              (3, 8, 2)),
    "states-float16-grouped-const-allflags-nodlast-save3": (
        "float16", "grouped", "const", ALL_FLAGS, False, (3, 8, 2, 3)),
    # more states than a tile has steps (STATES_N): the sums over states split
    # among N // tile threads per step (5 states in parts of 3 and 2, forward
    # and backward; 8 in two parts of 4 forward and four of 2 backward; 6 in
    # three parts of 2 backward)
    "states-float64-var-var-allflags-N5": ("float64", "var", "var", ALL_FLAGS, True, (3, 2, 2)),
    "states-float32-grouped-var-allflags-N8-bwd2segments": (
        "float32", "grouped", "var", ALL_FLAGS, True, (2, 4, 2), None, 2),
    "states-bfloat16-var-const-allflags-N6-save2": ("bfloat16", "var", "const", ALL_FLAGS, True,
                                                    (2, 8, 2, 2)),
}
# settings.deterministic: the backward's partial sums stored and summed in order
# (B in 2 groups of 2 channels, one channel per block: 2 blocks per group of B,
# 4 of C, 2 backward segments; constant B and C; half storage)
STATES_CASES.update({
    "states-float64-grouped-var-allflags-det-bwd2segments": (
        "float64", "grouped", "var", ALL_FLAGS, True, (1, 8, 2), None, 2),
    "states-float32-const-const-allflags-det-3segments-bwd3segments": (
        "float32", "const", "const", ALL_FLAGS, True, (3, 8, 2), 3, 3),
    "states-bfloat16-var-grouped-allflags-det": ("bfloat16", "var", "grouped", ALL_FLAGS, True,
                                                 (2, 4, 4)),
})
DETERMINISTIC = {name for name in STATES_CASES if "-det" in name}
# States of the cases that do not have N = 3.
STATES_N = {"states-float64-var-var-allflags-N5": 5,
            "states-float32-grouped-var-allflags-N8-bwd2segments": 8,
            "states-bfloat16-var-const-allflags-N6-save2": 6}
HALF = ("float16", "bfloat16")
# the direct half path of the API: dtype, then A, D, delta_bias, initial_state in
# float32 or in the half dtype
API_HALF_CASES = [f"{dtype}-{weights}" for dtype in HALF
                  for weights in ("float32-weights", "half-weights")]
# cases per simulator process (each process pays for importing numba and numba_mamba)
BATCH = 4


def _to_backend_bc(M):
    """(Bt, N, L) -> (Bt, 1, N, L), as the public layer passes it."""
    return M[:, None] if M.ndim == 3 else M


def _simulate_case(name):
    """Run one case under the simulator; return {quantity: ok} and max errors.

    Called in the subprocess only.
    """
    import numba

    assert numba.config.ENABLE_CUDASIM, "the simulator must be on"
    from numba_mamba.cuda_kernels import scan_blocks
    from numba_mamba import reference
    from tests.scan_cases import half_dtype, make_inputs

    n_segments = bwd_segments = None
    if name in STATES_CASES:
        dtype, bk, ck, flags, with_dlast, tuning, *split = STATES_CASES[name]
        n_segments, bwd_segments = (split + [None, None])[:2]
    else:
        dtype, bk, ck, flags, with_dlast = CASES[name]
        tuning = None
    dtype = half_dtype(dtype) if dtype in HALF else np.dtype(dtype)
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    Bt, Dc, L, N, G = 1, 4, 33, STATES_N.get(name, 3), 2
    kw = make_inputs(rng, Bt=Bt, Dc=Dc, L=L, N=N, dtype=dtype, B_kind=bk, C_kind=ck,
                     G=G, **flags)
    dout = rng.standard_normal((Bt, Dc, L)).astype(dtype)
    dlast_dtype = np.float32 if dtype.name in HALF else dtype
    dlast = rng.standard_normal((Bt, Dc, N)).astype(dlast_dtype) if with_dlast else None
    if dtype.name in HALF:  # half storage: all but the per-step arrays float32
        for key in ("A", "D", "delta_bias", "initial_state", "B", "C"):
            x = kw[key]
            if x is not None and (key not in ("B", "C") or x.ndim == 2):
                kw[key] = x.astype(np.float32)

    exact = {k: (v.astype(np.float64) if isinstance(v, np.ndarray) else v)
             for k, v in kw.items()}
    out_ref, last_ref, vjp = reference.selective_scan_vjp(**exact)
    g_ref = vjp(dout.astype(np.float64), None if dlast is None else dlast.astype(np.float64))

    u, delta, A = kw["u"], kw["delta"], kw["A"]
    B, C = _to_backend_bc(kw["B"]), _to_backend_bc(kw["C"])
    D, z, bias = kw["D"], kw["z"], kw["delta_bias"]
    sp, init = kw["delta_softplus"], kw["initial_state"]
    if tuning is not None:
        from numba_mamba.cuda_kernels import scan_states

        args = (u, delta, A, B, C, D, z, bias, sp, init)
        out, last, saved = scan_states.scan_forward(*args, tuning=tuning,
                                                    n_segments=n_segments)
        if len(tuning) > 3:  # one saved state per stretch of backward tiles
            assert saved.tile_states.shape[2] == -(-(-(-L // tuning[2])) // tuning[3])
        p = scan_states.StatesPlan(*tuning[:1], 0, *tuning[1:])
        if n_segments is not None:  # the split is the one asked for
            assert scan_states.segments(Bt, Dc, L, p, n_segments)[0] == n_segments
        if bwd_segments is not None:
            assert scan_states.backward_segments(Bt, Dc, L, p, bwd_segments)[0] == bwd_segments
        else:  # these sizes take one backward segment by default
            assert scan_states.backward_segments(Bt, Dc, L, saved.plan)[0] == 1
        du, ddelta, dA, dB, dC, dD, dz, dbias, dinit = scan_states.scan_backward(
            dout, dlast, *args, saved, n_segments=bwd_segments)
        q_buf = np.stack([dinit if dinit is not None else np.zeros_like(last)] * 2)
        report = _compare(dtype, z, init, g_ref, out_ref, last_ref, out, last, du, ddelta, dA,
                          dB, dC, dD, dz, dbias, q_buf, inputs=kw)
        # a forward for no backward keeps no states and computes the same bits
        out_ns, last_ns, saved_ns = scan_states.scan_forward(*args, tuning=tuning,
                                                             n_segments=n_segments, save=False)
        report["forward without saved states"] = dict(
            ok=saved_ns is None and np.array_equal(out_ns.view(np.uint8), out.view(np.uint8))
            and np.array_equal(last_ns, last))
        if dtype.name in HALF:
            # the same values in float32 through the float32 kernels, the
            # results rounded to the half type afterwards: the same bits
            f32 = [x.astype(np.float32) if isinstance(x, np.ndarray) else x for x in args]
            out32, _, saved32 = scan_states.scan_forward(*f32, tuning=tuning,
                                                         n_segments=n_segments)
            g32 = scan_states.scan_backward(dout.astype(np.float32), dlast, *f32, saved32,
                                            n_segments=bwd_segments)
            for key, a, b in (("out", out, out32), ("du", du, g32[0]), ("ddelta", ddelta, g32[1]),
                              ("dz", dz, g32[6])):
                if a is not None:
                    same = bool(np.array_equal(a.view(np.uint16), b.astype(dtype).view(np.uint16)))
                    report[f"{key} as float32 then rounded"] = dict(ok=same)
        return report
    n_chunks = -(-L // (THREADS * ITEMS))
    out = np.full((Bt, Dc, L), np.nan, dtype)
    last = np.full((Bt, Dc, N), np.nan, dtype)
    states = np.full((Bt, Dc, n_chunks, N), np.nan, dtype)
    scan_blocks.forward_into(u, delta, A, B, C, D, z, bias, sp, init, out, last, states,
                      threads=THREADS, items=ITEMS)

    du = np.full_like(u, np.nan)
    ddelta = np.full_like(u, np.nan)
    dA = np.zeros_like(A)
    dB = np.zeros_like(B)
    dC = np.zeros_like(C)
    dD = None if D is None else np.zeros_like(D)
    dz = None if z is None else np.full_like(u, np.nan)
    dbias = None if bias is None else np.zeros_like(bias)
    q_buf = np.full((2, Bt, Dc, N), np.nan, dtype)
    scan_blocks.backward_into(dout, dlast, u, delta, A, B, C, D, z, bias, sp, states,
                       du, ddelta, dA, dB, dC, dD, dz, dbias, q_buf,
                       threads=THREADS, items=ITEMS)
    return _compare(dtype, z, init, g_ref, out_ref, last_ref, out, last, du, ddelta, dA, dB, dC,
                    dD, dz, dbias, q_buf)


def _compare(dtype, z, init, g_ref, out_ref, last_ref, out, last, du, ddelta, dA, dB, dC, dD,
             dz, dbias, q_buf, inputs=None):
    """{quantity: {ok, max_err}} of the kernels' results against the reference.

    Half storage (``dtype`` float16 or bfloat16): the float32 tolerances,
    widened by one rounding to ``dtype`` for the results stored in it
    (:func:`tests.scan_cases.rounded_once`); each result must have the dtype
    of its input (``inputs``: the arrays given; ``out`` that of ``u``,
    ``last_state`` and ``dinitial_state`` float32).
    """
    from tests.scan_cases import HALF_UNIT_ROUNDOFF, TOLERANCES, rounded_once

    half = dtype.name in HALF_UNIT_ROUNDOFF
    tol = TOLERANCES[np.dtype(np.float32) if half else dtype]
    got = dict(out=out, last_state=last, du=du, ddelta=ddelta, dA=dA,
               dB=dB.reshape(g_ref.dB.shape), dC=dC.reshape(g_ref.dC.shape),
               dD=dD, dz=dz, ddelta_bias=dbias,
               dinitial_state=None if init is None else q_buf[0])
    expected = dict(out=out_ref, last_state=last_ref, du=g_ref.du, ddelta=g_ref.ddelta,
                    dA=g_ref.dA, dB=g_ref.dB, dC=g_ref.dC, dD=g_ref.dD, dz=g_ref.dz,
                    ddelta_bias=g_ref.ddelta_bias, dinitial_state=g_ref.dinitial_state)
    f32 = dtype == np.float32 or half
    kinds = dict(out="out", last_state="out", du="du", dz="du", dinitial_state="du",
                 ddelta="ddelta_z" if z is not None and f32 else "ddelta")
    report = {}
    for key, ref in expected.items():
        assert (got[key] is None) == (ref is None), key
        if ref is None:
            continue
        rtol, atol = tol[kinds.get(key, "weights")]
        dtype_ok = True
        if half:
            want = (np.dtype(np.float32) if key in ("last_state", "dinitial_state")
                    else inputs["u" if key == "out" else key[1:]].dtype)
            dtype_ok = got[key].dtype == want
            if got[key].dtype == dtype:  # rounded once to the half type
                rtol, atol = rounded_once(rtol, atol, HALF_UNIT_ROUNDOFF[dtype.name])
        g = np.asarray(got[key], np.float64)
        r = np.asarray(ref, np.float64)
        ok = bool(np.allclose(g, r, rtol=rtol, atol=atol)) and g.shape == r.shape and dtype_ok
        report[key] = dict(ok=ok, max_err=float(np.max(np.abs(g - r))),
                           dtype=str(got[key].dtype))
    return report


def _batched(names, size, *head):
    """``pytest.param(name)`` for each name, marked to run in a simulator process
    with the ``size - 1`` names after or before it (``tests/background.py``)."""
    names = list(names)
    params = []
    for i in range(0, len(names), size):
        batch = names[i:i + size]
        mark = pytest.mark.background("tests/test_cuda_simulator.py", *head, *batch,
                                      env={"NUMBA_ENABLE_CUDASIM": "1"})
        params += [pytest.param(name, marks=mark) for name in batch]
    return params


def _report(proc, name):
    """The report of case ``name`` from a simulator process run by ``__main__``."""
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])[name]
    assert "error" not in report, f"{name} raised:\n{report.get('error')}"
    return report


@pytest.mark.parametrize("name", _batched(list(CASES) + list(STATES_CASES), BATCH))
def test_simulated_kernels_match_reference(name, background):
    report = _report(background, name)
    bad = {k: v for k, v in report.items() if not v["ok"]}
    assert not bad, f"{name}: mismatches {bad}; all {report}"
    assert "out" in report and "dA" in report


@pytest.mark.parametrize("case", _batched(API_HALF_CASES, len(API_HALF_CASES), "api-half"))
def test_simulated_api_half_states_engine_direct_path(case, background):
    """With ``settings.direct_half`` on, the API passes half ``u``, ``delta``, ``z``,
    variable ``B``/``C`` and ``dout`` to the state engine uncast, and gets what its
    cast path gets (the same bits where rounded to the half type); dtypes as its
    contract says (A, D, delta_bias, initial_state given in the half dtype or float32)."""
    pytest.importorskip("ml_dtypes")
    dtype = case.split("-")[0]
    report = _report(background, case)
    bad = {k: v for k, v in report.items() if not v["ok"]}
    assert not bad, f"{dtype}: mismatches {bad}; all {report}"
    assert "dB" in report and "dz" in report


def _simulate_api_half(dtype_name, half_weights):
    """The public API's direct half path (``settings.direct_half``) under the
    simulator, against its cast path: {check: {ok}}.

    The API sends NumPy arrays to the CPU; here it is made to take them for
    CuPy arrays of a GPU whose backend runs the state engine (small tiles) on
    them.  Called in the subprocess only.
    """
    import types

    import numba_mamba as nm
    import numba_mamba.scan as api
    from numba_mamba.cuda_kernels import scan_states
    from tests.scan_cases import half_dtype, make_inputs

    dtype = half_dtype(dtype_name)
    rng = np.random.default_rng(zlib.crc32(dtype_name.encode()))
    kw = make_inputs(rng, Bt=1, Dc=4, L=33, N=3, dtype=dtype, B_kind="var", C_kind="grouped",
                     G=2, **ALL_FLAGS)
    if not half_weights:  # A, D, delta_bias, initial_state float32 (allowed either way)
        for key in ("A", "D", "delta_bias", "initial_state"):
            kw[key] = kw[key].astype(np.float32)
    dout = rng.standard_normal((1, 4, 33)).astype(dtype)
    dlast = rng.standard_normal((1, 4, 3)).astype(np.float32)

    seen = []  # dtypes of u and dout as the backend got them

    def forward(*args):
        seen.append(("u", args[0].dtype))
        return scan_states.scan_forward(*args, tuning=(3, 8, 2), n_segments=2)

    def backward(dout_, dlast_, *args):
        seen.append(("dout", dout_.dtype))
        return scan_states.scan_backward(dout_, dlast_, *args, n_segments=2)

    backend = types.SimpleNamespace(scan_states=scan_states, scan_forward=forward,
                                    scan_backward=backward, settings=scan_states.settings,
                                    choose_engine=lambda Bt, Dc, N: "states")
    gpu_xp = types.ModuleType("gpu_xp")  # NumPy under another name: "CuPy"
    gpu_xp.__dict__.update(np.__dict__)
    api.array_namespace = lambda **arrays: gpu_xp
    api._backend = lambda xp: backend
    api._gpu_backend = lambda: backend

    results = {}
    for direct in (False, True):
        seen.clear()
        with scan_states.settings.override(direct_half=direct):
            out, last, vjp = nm.selective_scan_vjp(**kw)
            grads = vjp(dout, dlast)
        results[direct] = (out, last, grads, list(seen))
    report = {}
    f32 = np.dtype(np.float32)
    report["cast path casts"] = dict(ok=results[False][3] == [("u", f32), ("dout", f32)])
    report["direct path passes half"] = dict(ok=results[True][3] == [("u", dtype),
                                                                     ("dout", dtype)])
    (out0, last0, g0, _), (out1, last1, g1, _) = results[False], results[True]
    report["out dtype"] = dict(ok=out1.dtype == dtype and out0.dtype == dtype)
    report["last_state float32"] = dict(ok=last1.dtype == f32 and last0.dtype == f32)
    report["out same bits"] = dict(ok=bool(np.array_equal(out0.view(np.uint16),
                                                          out1.view(np.uint16))))
    report["last_state equal"] = dict(ok=bool(np.array_equal(last0, last1)))
    for field in g0._fields:
        a, b = getattr(g0, field), getattr(g1, field)
        x = kw[field[1:]]
        shape_dtype = (a.shape == b.shape == x.shape and a.dtype == b.dtype == x.dtype)
        if b.dtype == dtype and field not in ("dB", "dC"):
            # rounded once, from the same float32 values
            same = np.array_equal(a.view(np.uint16), b.view(np.uint16))
        else:  # (float32 sums of atomics, in an order that may vary: to a half ulp)
            unit = 2.0 ** -8 if dtype_name == "bfloat16" else 2.0 ** -11
            same = np.allclose(a.astype(np.float64), b.astype(np.float64),
                               rtol=2 * unit if b.dtype == dtype else 1e-6, atol=1e-6)
        report[field] = dict(ok=bool(shape_dtype and same), dtype=str(b.dtype))
    return report


def _main(argv):
    """``[api-half] name...``: {name: report, or {"error": traceback}} of each case."""
    import traceback

    from numba_mamba.cuda_kernels.settings import settings

    api_half = argv[:1] == ["api-half"]
    reports = {}
    for name in argv[1:] if api_half else argv:
        try:
            if api_half:  # (it replaces the API's backend for the rest of the process)
                dtype, weights = name.split("-", 1)
                reports[name] = _simulate_api_half(dtype, weights == "half-weights")
            else:
                with settings.override(deterministic=name in DETERMINISTIC):
                    reports[name] = _simulate_case(name)
        except Exception:
            reports[name] = {"error": traceback.format_exc()}
    return reports


if __name__ == "__main__":
    print(json.dumps(_main(sys.argv[1:])))
