"""Where the host time of one public call goes: cProfile of many calls on a tiny problem.

Run on the GPU machine::

    python benchmarks/host_profile.py [--calls 3000] [--top 25]

Prints, for ``selective_scan`` and for the backward of ``selective_scan_vjp``
on (batch 1, D 4, N 4, L 16) float32 CuPy arrays, the median wall time of a
call (GPU idle: the stream is synchronized before each timed call) and the
functions with the most own time under cProfile (whose overhead inflates
every figure, but not their order).
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
    args = parser.parse_args()
    import cupy

    import numba_mamba as nm

    rng = cupy.random.default_rng(0)
    kw = bench_scan.make_inputs(cupy, 1, 4, 4, 16, cupy.float32, rng)
    out, _, backward = nm.selective_scan_vjp(**kw)
    dout = cupy.ones_like(out)
    stream = cupy.cuda.get_current_stream()
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


if __name__ == "__main__":
    main()
