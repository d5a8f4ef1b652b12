"""Benchmark the sequence filter (issue 4) against scipy.signal / cupyx.scipy.signal.

1. Time-invariant filter, 64 channels x 16 states x 2**20 samples (defaults):
   ``numba_mamba.ssm_filter`` (scan and conv engines) against a loop of
   ``lfilter([Bb_n], [1, -Ab_n], x_d)`` per channel and state, summed with C
   (``scipy.signal.lfilter`` on the CPU, ``cupyx.scipy.signal.lfilter`` on
   the GPU); the ratio and the agreement are measured in the same run.
2. The conv vs scan crossover: both engines over a range of lengths with the
   same channels and states.

Times are the median of ``--reps`` runs after one warm-up run (which compiles);
on the GPU each run is synchronized.  Prints Markdown tables for
benchmarks/RESULTS.md.

Run:  python benchmarks/bench_filter.py --device cpu|gpu [--quick] [--reps 3]
"""

import argparse
import datetime
import os
import platform
import statistics
import time

import numpy as np

import numba_mamba as nm


def get_xp(device):
    if device == "cpu":
        return np, None
    import cupy

    if cupy.cuda.runtime.getDeviceCount() == 0:
        raise SystemExit("--device gpu: CuPy sees no GPU")
    return cupy, cupy.cuda.Device().synchronize


def timeit(fn, reps, sync):
    fn()  # warm-up (compiles)
    if sync:
        sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def problem(xp, Dc, N, L, dtype, seed=0):
    rng = np.random.default_rng(seed)
    A = -np.exp(rng.uniform(np.log(1e-3), np.log(1.0), (Dc, N)))   # time constants 1..1000
    B = rng.standard_normal((Dc, N))
    C = rng.standard_normal((Dc, N)) / N
    x = rng.standard_normal((Dc, L))
    return [xp.asarray(v.astype(dtype)) for v in (A, B, C, x)]


def lfilter_loop(xp, A, B, C, x, dt):
    """y = sum_n C_n lfilter([Bb_n], [1, -Ab_n], x) per channel (the scipy baseline)."""
    if xp is np:
        from scipy.signal import lfilter
    else:
        from cupyx.scipy.signal import lfilter
    Ab, Bb = nm.discretize(A, B, dt, "zoh")
    Ab_h, Bb_h, C_h = (v.get() if hasattr(v, "get") else v for v in (Ab, Bb, C))
    y = xp.zeros_like(x)
    for d in range(x.shape[0]):
        for n in range(A.shape[1]):
            y[d] += float(C_h[d, n]) * lfilter(xp.asarray([Bb_h[d, n]], x.dtype),
                                               xp.asarray([1.0, -Ab_h[d, n]], x.dtype), x[d])
    return y


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--states", type=int, default=16)
    parser.add_argument("--log2-length", type=int, default=20)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="2**16 samples, short sweep")
    args = parser.parse_args()
    xp, sync = get_xp(args.device)
    Dc, N = args.channels, args.states
    L = 2 ** (16 if args.quick else args.log2_length)
    dt = 1.0

    if args.device == "cpu":
        import numba
        where = f"{platform.processor() or platform.machine()}, {numba.get_num_threads()} threads"
    else:
        import cupy
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        where = props["name"].decode()
    print(f"# bench_filter.py --device {args.device}: {datetime.date.today()}, {where}, "
          f"numba-mamba {nm.__version__}, os.cpu_count()={os.cpu_count()}")
    print(f"\n## LTI filter, {Dc} channels x {N} states x {L} samples (zoh, dt = 1)\n")
    print("| dtype | engine | time (s) | speed-up vs lfilter loop | max rel. diff vs lfilter |")
    print("|---|---|---|---|---|")
    for dtype in (np.float64, np.float32):
        A, B, C, x = problem(xp, Dc, N, L, dtype)
        t_ref, y_ref = timeit(lambda: lfilter_loop(xp, A, B, C, x, dt), 1, sync)
        scale = float(abs(y_ref).max())
        print(f"| {np.dtype(dtype).name} | {'scipy' if xp is np else 'cupyx'}.signal.lfilter "
              f"x {Dc * N} | {t_ref:.3f} | 1.0 | - |")
        for mode in ("scan", "conv"):
            t, y = timeit(lambda: nm.ssm_filter(A, B, C, x, dt=dt, mode=mode), args.reps, sync)
            diff = float(abs(y - y_ref).max()) / scale
            print(f"| {np.dtype(dtype).name} | ssm_filter mode='{mode}' | {t:.4f} | "
                  f"{t_ref / t:.1f} | {diff:.1e} |")
        del A, B, C, x, y, y_ref

    print(f"\n## conv vs scan crossover, {Dc} channels x {N} states, float32 (time in ms)\n")
    print("| L | scan | conv | faster |")
    print("|---|---|---|---|")
    top = 16 if args.quick else (min(22, args.log2_length + 2) if args.device == "gpu"
                                  else args.log2_length)
    for k in range(8, top + 1, 2):
        A, B, C, x = problem(xp, Dc, N, 2 ** k, np.float32)
        ts, _ = timeit(lambda: nm.ssm_filter(A, B, C, x, mode="scan"), args.reps, sync)
        tc, _ = timeit(lambda: nm.ssm_filter(A, B, C, x, mode="conv"), args.reps, sync)
        print(f"| 2^{k} | {1e3 * ts:.2f} | {1e3 * tc:.2f} | {'scan' if ts < tc else 'conv'} |")
    if args.device == "gpu":
        print("\n## crossover without the selective-scan fast path (method='bilinear', "
              "chunked scan kernel), float32 (ms)\n")
        print("| L | scan | conv | faster |")
        print("|---|---|---|---|")
        for k in range(8, top + 1, 2):
            A, B, C, x = problem(xp, Dc, N, 2 ** k, np.float32)
            kw = dict(method="bilinear")
            ts, _ = timeit(lambda: nm.ssm_filter(A, B, C, x, mode="scan", **kw), args.reps,
                           sync)
            tc, _ = timeit(lambda: nm.ssm_filter(A, B, C, x, mode="conv", **kw), args.reps,
                           sync)
            print(f"| 2^{k} | {1e3 * ts:.2f} | {1e3 * tc:.2f} | "
                  f"{'scan' if ts < tc else 'conv'} |")


if __name__ == "__main__":
    main()
