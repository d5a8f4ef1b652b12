"""Run the GPU scan kernels once each on benchmark shapes, for a profiler (Nsight Compute).

Calls the backend directly (canonical layout, no public-API overhead), so a
profiler sees each kernel's own time.  Run on the GPU machine, e.g.::

    ncu --clock-control none --metrics gpu__time_duration.sum python benchmarks/profile_scan.py

Arguments: ``--rows`` (indices into ``bench_scan.ROWS``), ``--engines``, and
for the state engine, as overrides of the kernels' settings
(``numba_mamba.cuda_kernels.settings.settings``): ``--min-blocks``
(``forward:backward`` pairs of float32 ``min_blocks`` to compile with),
``--target-blocks`` (``target_blocks`` values; 0 never splits the sequence),
``--backward-target-blocks`` (``backward_target_blocks`` values; 0 never
splits the backward's sequence) and ``--save-every`` (``save_every`` values:
backward tiles per saved state).

``--host`` instead prints the host time of the API's and the backend's pieces;
``--host --rounds N`` the host time of a tiny ``selective_scan`` (batch 1, D 4,
N 4, L 16, float32) against CuPy's own ``u + z`` in the same N rounds (issue
18's target: at most 2x)::

    python benchmarks/profile_scan.py --host --rounds 5
"""

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_scan  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="0,3")
    parser.add_argument("--engines", default="states,blocks")
    parser.add_argument("--min-blocks", default="",
                        help="comma-separated forward:backward pairs of the state engine's "
                             "min_blocks (float32) to run; default: the settings'")
    parser.add_argument("--target-blocks", default="",
                        help="comma-separated values of the state engine's target_blocks to run "
                             "(0: one segment); default: the settings'")
    parser.add_argument("--backward-target-blocks", default="",
                        help="comma-separated values of the state engine's backward_target_blocks "
                             "to run (0: one backward segment); default: the settings'")
    parser.add_argument("--save-every", default="",
                        help="comma-separated values of the state engine's save_every to run; "
                             "default: the settings'")
    parser.add_argument("--host", action="store_true",
                        help="instead, print the host time of each call (no profiler)")
    parser.add_argument("--rounds", type=int, default=0,
                        help="with --host: instead, time the tiny selective_scan and CuPy's "
                             "u + z in this many interleaved rounds")
    args = parser.parse_args()
    import cupy

    if args.host and args.rounds:
        return host_rounds(cupy, args.rounds)
    if args.host:
        return host_times(cupy)

    backend, _ = bench_scan._backends()
    settings = backend.settings
    rng = cupy.random.default_rng(0)
    f32 = cupy.dtype("float32")
    pairs = [tuple(int(v) for v in pair.split(":")) for pair in args.min_blocks.split(",") if pair]
    pairs = pairs or [(settings.min_blocks[(f32, "forward")],
                       settings.min_blocks[(f32, "backward")])]
    targets = [int(v) for v in args.target_blocks.split(",") if v] or [settings.target_blocks]
    bwd_targets = ([int(v) for v in args.backward_target_blocks.split(",") if v]
                   or [settings.backward_target_blocks])
    saves = [int(v) for v in args.save_every.split(",") if v] or [settings.save_every]
    for (fwd_mb, bwd_mb), target, bwd_target, save in itertools.product(
            pairs, targets, bwd_targets, saves):
        min_blocks = {**settings.min_blocks, (f32, "forward"): fwd_mb,
                      (f32, "backward"): bwd_mb}
        with settings.override(min_blocks=min_blocks, target_blocks=target,
                               backward_target_blocks=bwd_target, save_every=save):
            print(f"float32 min_blocks forward {fwd_mb} backward {bwd_mb}, "
                  f"target_blocks {target}, backward_target_blocks {bwd_target}, "
                  f"save_every {save}", flush=True)
            run_rows(cupy, backend, args, rng)


def run_rows(cupy, backend, args, rng):
    for r in (int(i) for i in args.rows.split(",")):
        (Bt, Dc, N, L, dtype_name), _, _ = bench_scan.ROWS[r]
        if dtype_name == "bfloat16":
            continue
        kw = bench_scan.make_inputs(cupy, Bt, Dc, N, L, cupy.dtype(dtype_name), rng)
        B = cupy.ascontiguousarray(kw["B"][:, None])
        C = cupy.ascontiguousarray(kw["C"][:, None])
        a = (kw["u"], kw["delta"], kw["A"], B, C, kw["D"], kw["z"], kw["delta_bias"], True, None)
        dout = rng.standard_normal(kw["u"].shape, dtype=cupy.float32).astype(kw["u"].dtype)
        for engine in args.engines.split(","):
            for _ in range(2):  # the second run is the one to read (compiled, warm)
                out, last, saved = backend.scan_forward(*a, engine=engine)
                backend.scan_backward(dout, None, *a, saved)
            cupy.cuda.get_current_stream().synchronize()
            print(f"row {r} {Bt, Dc, N, L, dtype_name} engine {engine} done", flush=True)


def host_median_us(cupy, call, reps):
    """Median host microseconds of ``call(k)``, k = 0 .. reps - 1, the current
    stream synchronized before each call (so the GPU is idle)."""
    import statistics
    import time

    stream = cupy.cuda.get_current_stream()
    ts = []
    for k in range(reps):
        stream.synchronize()
        t = time.perf_counter()
        call(k)
        ts.append(time.perf_counter() - t)
    stream.synchronize()
    return statistics.median(ts) * 1e6


def host_rounds(cupy, rounds, reps=200, n_sets=8):
    """Issue 18's host target: the median host time of a ``selective_scan``
    (the full path: validation remembered per layout, canonical forms, the
    backend's launch) on (batch 1, D 4, N 4, L 16) float32, per round of
    ``reps`` calls (the stream synchronized before each), with and without
    ``out=``, and of CuPy's ``u + z`` in the same rounds as a gauge of the
    host's speed, which drifts between runs and machines (see
    ``benchmarks/RESULTS.md``); the target is at most 2x the gauge.  The
    calls cycle over ``n_sets`` sets of inputs at different addresses, as a
    training loop passes new arrays each step."""
    import statistics

    import numba_mamba as nm

    rng = cupy.random.default_rng(0)
    sets = [bench_scan.make_inputs(cupy, 1, 4, 4, 16, cupy.float32, rng) for _ in range(n_sets)]
    outs = [cupy.empty_like(kw["u"]) for kw in sets]
    calls = {
        "selective_scan": lambda i: nm.selective_scan(**sets[i]),
        "selective_scan(out=)": lambda i: nm.selective_scan(**sets[i], out=outs[i]),
        "u + z": lambda i: sets[i]["u"] + sets[i]["z"],
    }
    for fn in calls.values():  # (compiled, layouts validated)
        for i in range(n_sets):
            fn(i)

    def med(fn):
        return host_median_us(cupy, lambda k: fn(k % n_sets), reps)

    names = list(calls)
    table = {name: [] for name in names}
    print(f"host us per call, median of {reps} per round, (1, 4, 4, 16) float32:")
    print("round  " + "  ".join(f"{name:>20s}" for name in names) + "  scan / (u + z)")
    for r in range(rounds):
        for name in names:
            table[name].append(med(calls[name]))
        row = [table[name][-1] for name in names]
        print(f"{r:5d}  " + "  ".join(f"{v:20.2f}" for v in row) + f"  {row[0] / row[-1]:14.2f}")
    meds = [statistics.median(table[name]) for name in names]
    print("median " + "  ".join(f"{v:20.2f}" for v in meds) + f"  {meds[0] / meds[-1]:14.2f}")
    for name in names[:2]:
        ratios = [a / b for a, b in zip(table[name], table["u + z"])]
        print(f"{name} / (u + z) per round: {min(ratios):.2f}-{max(ratios):.2f}, median "
              f"{statistics.median(ratios):.2f}; rounds at or below 2x: "
              f"{sum(r <= 2 for r in ratios)} of {rounds}")


def host_times(cupy, reps=100):
    """Host microseconds per call of the API and backend pieces (median), GPU kept busy-free."""
    import numba_mamba as nm
    from numba_mamba import scan as api

    backend, _ = bench_scan._backends()
    rng = cupy.random.default_rng(0)

    def med(fn):
        return host_median_us(cupy, lambda k: fn(), reps)

    for shape in [(1, 4, 4, 16), (8, 1536, 16, 2048)]:
        Bt, Dc, N, L = shape
        kw = bench_scan.make_inputs(cupy, Bt, Dc, N, L, cupy.float32, rng)
        B = cupy.ascontiguousarray(kw["B"][:, None])
        C = cupy.ascontiguousarray(kw["C"][:, None])
        a = (kw["u"], kw["delta"], kw["A"], B, C, kw["D"], kw["z"], kw["delta_bias"], True, None)
        res = {}
        res["api selective_scan"] = med(lambda: nm.selective_scan(**kw))
        given = cupy.empty_like(kw["u"])
        res["api selective_scan(out=...)"] = med(lambda: nm.selective_scan(**kw, out=given))
        values = tuple(kw.get(k) for k in ("u", "delta", "A", "B", "C", "D", "z",
                                           "delta_bias", "initial_state"))
        res["  of which the layout key"] = med(lambda: api._gpu_layout(values))
        res["  of which _prepare (validated before)"] = med(lambda: api._prepare(
            kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], kw["D"], kw["z"],
            kw["delta_bias"], True, None))
        canonical = api._prepare(*values[:8], True, None).args
        res["  of which the backend's forward"] = med(
            lambda: backend.scan_forward(*canonical, save=False))
        res["api selective_scan, validated each call"] = med(
            lambda: (api._VALIDATED.clear(), nm.selective_scan(**kw)))
        res["api selective_scan_vjp"] = med(lambda: nm.selective_scan_vjp(**kw))
        out, _, backward = nm.selective_scan_vjp(**kw)
        dout = cupy.ones_like(out)
        res["api backward(dout)"] = med(lambda: backward(dout))
        for raw in (True, False):
            how = "raw launch" if raw else "Numba launch"
            with backend.settings.override(raw_launch=raw):
                for engine in ("states", "blocks"):
                    res[f"backend forward {engine}, {how}"] = med(
                        lambda: backend.scan_forward(*a, engine=engine))
        threads, items = backend.settings.blocks_tuning[cupy.dtype(cupy.float32)]
        n_chunks = -(-L // (threads * items))
        outs = (cupy.empty_like(kw["u"]), cupy.empty((Bt, Dc, N), cupy.float32),
                cupy.empty((Bt, Dc, n_chunks, N), cupy.float32))
        res["backend forward_into, blocks (launch only)"] = med(
            lambda: backend.forward_into(*a, *outs, threads=threads, items=items,
                                         stream="current"))
        res["cupy.isfinite(A).all() -> bool"] = med(lambda: bool(cupy.isfinite(kw["A"]).all()))
        res["cupy.empty x3"] = med(lambda: [cupy.empty_like(kw["u"]) for _ in range(3)])
        res["cupy.empty x1"] = med(lambda: cupy.empty_like(kw["u"]))
        res["cupy.cuda.alloc x1"] = med(lambda: cupy.cuda.alloc(kw["u"].nbytes))
        mem = cupy.cuda.alloc(kw["u"].nbytes)
        res["cupy.ndarray on an allocation"] = med(
            lambda: cupy.ndarray(kw["u"].shape, kw["u"].dtype, memptr=mem))
        res["cupy u + z (an allocation, a kernel)"] = med(lambda: kw["u"] + kw["z"])
        res["cupy.zeros(1) x2"] = med(lambda: [cupy.zeros((1,), cupy.float32) for _ in range(2)])
        print(f"host us per call, shape {shape}:")
        for k, v in res.items():
            print(f"  {k:40s} {v:9.1f}")


if __name__ == "__main__":
    main()
