"""The GPU kernels under the CUDA simulator, against the float64 reference.

The simulator (``NUMBA_ENABLE_CUDASIM=1``) runs the ``@cuda.jit`` kernels as
Python on the CPU, so this checks the kernels' logic -- chunking, the carry
between chunks, the combine across warps, the reverse scan, the atomics and
every optional input -- on a machine without a GPU.  The simulator has no
warp shuffles; under it the kernel factory combines warps through shared
memory instead, with a 4-lane "warp" so that a block of 8 threads has two.

The simulator must be switched on before ``numba.cuda`` is first imported, so
each case runs in a subprocess: this file, run as a script.  Sizes are tiny
(the simulator runs one Python thread per CUDA thread).  The block-scan engine
runs with 8 threads x 2 items, chunks of 16 steps, and L = 33 crosses two
chunk boundaries (the last chunk holds one step); the state-parallel engine
(``scan_states``, no warp operations at all) runs the same checks with small
blocks and tiles.
"""

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
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
}


def _to_backend_bc(M):
    """(Bt, N, L) -> (Bt, 1, N, L), as the public layer passes it."""
    return M[:, None] if M.ndim == 3 else M


def _simulate_case(name):
    """Run one case under the simulator; return {quantity: ok} and max errors.

    Called in the subprocess only.
    """
    import numba

    assert numba.config.ENABLE_CUDASIM, "the simulator must be on"
    from cuda_kernels import scan
    from numba_mamba import reference
    from tests.scan_cases import make_inputs

    n_segments = bwd_segments = None
    if name in STATES_CASES:
        dtype, bk, ck, flags, with_dlast, tuning, *split = STATES_CASES[name]
        n_segments, bwd_segments = (split + [None, None])[:2]
    else:
        dtype, bk, ck, flags, with_dlast = CASES[name]
        tuning = None
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    Bt, Dc, L, N, G = 1, 4, 33, 3, 2
    kw = make_inputs(rng, Bt=Bt, Dc=Dc, L=L, N=N, dtype=dtype, B_kind=bk, C_kind=ck,
                     G=G, **flags)
    dout = rng.standard_normal((Bt, Dc, L)).astype(dtype)
    dlast = rng.standard_normal((Bt, Dc, N)).astype(dtype) if with_dlast else None

    out_ref, last_ref, vjp = reference.selective_scan_vjp(**kw)
    g_ref = vjp(dout, dlast)

    u, delta, A = kw["u"], kw["delta"], kw["A"]
    B, C = _to_backend_bc(kw["B"]), _to_backend_bc(kw["C"])
    D, z, bias = kw["D"], kw["z"], kw["delta_bias"]
    sp, init = kw["delta_softplus"], kw["initial_state"]
    if tuning is not None:
        from cuda_kernels import scan_states

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
        return _compare(dtype, z, init, g_ref, out_ref, last_ref, out, last, du, ddelta, dA,
                        dB, dC, dD, dz, dbias, q_buf)
    n_chunks = -(-L // (THREADS * ITEMS))
    out = np.full((Bt, Dc, L), np.nan, dtype)
    last = np.full((Bt, Dc, N), np.nan, dtype)
    states = np.full((Bt, Dc, n_chunks, N), np.nan, dtype)
    scan.forward_into(u, delta, A, B, C, D, z, bias, sp, init, out, last, states,
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
    scan.backward_into(dout, dlast, u, delta, A, B, C, D, z, bias, sp, states,
                       du, ddelta, dA, dB, dC, dD, dz, dbias, q_buf,
                       threads=THREADS, items=ITEMS)
    return _compare(dtype, z, init, g_ref, out_ref, last_ref, out, last, du, ddelta, dA, dB, dC,
                    dD, dz, dbias, q_buf)


def _compare(dtype, z, init, g_ref, out_ref, last_ref, out, last, du, ddelta, dA, dB, dC, dD,
             dz, dbias, q_buf):
    """{quantity: {ok, max_err}} of the kernels' results against the reference."""
    from tests.scan_cases import TOLERANCES

    tol = TOLERANCES[dtype]
    got = dict(out=out, last_state=last, du=du, ddelta=ddelta, dA=dA,
               dB=dB.reshape(g_ref.dB.shape), dC=dC.reshape(g_ref.dC.shape),
               dD=dD, dz=dz, ddelta_bias=dbias,
               dinitial_state=None if init is None else q_buf[0])
    expected = dict(out=out_ref, last_state=last_ref, du=g_ref.du, ddelta=g_ref.ddelta,
                    dA=g_ref.dA, dB=g_ref.dB, dC=g_ref.dC, dD=g_ref.dD, dz=g_ref.dz,
                    ddelta_bias=g_ref.ddelta_bias, dinitial_state=g_ref.dinitial_state)
    kinds = dict(out="out", last_state="out", du="du", dz="du", dinitial_state="du",
                 ddelta="ddelta_z" if z is not None and dtype == np.float32 else "ddelta")
    report = {}
    for key, ref in expected.items():
        assert (got[key] is None) == (ref is None), key
        if ref is None:
            continue
        rtol, atol = tol[kinds.get(key, "weights")]
        g = np.asarray(got[key], np.float64)
        r = np.asarray(ref, np.float64)
        ok = bool(np.allclose(g, r, rtol=rtol, atol=atol)) and g.shape == r.shape
        report[key] = dict(ok=ok, max_err=float(np.max(np.abs(g - r))))
    return report


@pytest.mark.parametrize("name", list(CASES) + list(STATES_CASES))
def test_simulated_kernels_match_reference(name):
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, __file__, name], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    bad = {k: v for k, v in report.items() if not v["ok"]}
    assert not bad, f"{name}: mismatches {bad}; all {report}"
    assert "out" in report and "dA" in report


if __name__ == "__main__":
    print(json.dumps(_simulate_case(sys.argv[1])))
