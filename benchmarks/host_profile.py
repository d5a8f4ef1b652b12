"""Where the host time of one public call goes: cProfile of many calls on a tiny problem.

Run on the GPU machine::

    python benchmarks/host_profile.py [--calls 3000] [--top 25]

Prints, for ``selective_scan`` and for the backward of ``selective_scan_vjp``
on (batch 1, D 4, N 4, L 16) float32 CuPy arrays, the median wall time of a
call (GPU idle: the stream is synchronized before each timed call) and the
functions with the most own time under cProfile (whose overhead inflates
every figure, but not their order).

``--ab`` instead times, in one process and interleaved (the GPU machine's
host CPU is shared, so figures from different runs differ by up to 2x),
each call as it is and with the validated layouts of ``numba_mamba.scan``
emptied before each call (every call validated in full).
"""

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_scan  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--ab", action="store_true",
                        help="time with and without the validation cache instead")
    args = parser.parse_args()
    import cupy

    import numba_mamba as nm

    rng = cupy.random.default_rng(0)
    kw = bench_scan.make_inputs(cupy, 1, 4, 4, 16, cupy.float32, rng)
    out, _, backward = nm.selective_scan_vjp(**kw)
    dout = cupy.ones_like(out)
    stream = cupy.cuda.get_current_stream()
    if args.ab:
        return ab(cupy, stream, lambda: nm.selective_scan(**kw), lambda: backward(dout))
    for name, fn in (("selective_scan", lambda: nm.selective_scan(**kw)),
                     ("backward(dout)", lambda: backward(dout))):
        for _ in range(50):
            fn()
        ts = []
        for _ in range(200):
            stream.synchronize()
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        stream.synchronize()
        print(f"{name}: median {statistics.median(ts) * 1e6:.1f} us per call "
              f"(min {min(ts) * 1e6:.1f})", flush=True)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.calls):
            fn()
        prof.disable()
        stream.synchronize()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(args.top)
        print(text.getvalue(), flush=True)


def ab(cupy, stream, forward, backward, reps=400):
    """Median microseconds per call with and without the validation cache, interleaved."""
    from numba_mamba import scan as api

    modes = [("validation cached", True), ("validated each call", False)]
    for name, fn in (("selective_scan", forward), ("backward(dout)", backward)):
        times = {label: [] for label, _ in modes}
        for _ in range(reps):
            for label, cached in modes:
                if not cached:
                    api._VALIDATED.clear()
                stream.synchronize()
                t = time.perf_counter()
                fn()
                times[label].append(time.perf_counter() - t)
        stream.synchronize()
        print(f"{name}: " + ", ".join(f"{label} {statistics.median(ts) * 1e6:.1f} us"
                                      for label, ts in times.items()), flush=True)


if __name__ == "__main__":
    main()
