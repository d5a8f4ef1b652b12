"""A long multichannel LTI filter on Dask (issue 25) against pieces with zi/zf one after another.

The signal, ``channels x 2^log2-length`` float64 samples, is generated lazily
chunk by chunk (a chunk is a function of its position: the same numbers in
every run and in the baseline); it is never held whole.  Compared:

* ``pieces``: one process calls ``ssm_filter(..., zi=h)`` on the chunks one
  after another (generating each), keeping the state -- the way a user
  streams a signal larger than memory without Dask;
* ``dask``: ``ssm_filter`` on the Dask array (pass 1, the prefix over chunks,
  pass 2; see numba_mamba.dask) on a ``LocalCluster`` of 1 and 2 worker
  processes with one thread each.  On one worker the automatic graph has no
  pass 1 (``numba-mamba.prefix`` 'sequential'); the row ``prefix=chain`` is
  the two-pass graph on one worker.

Both reduce the output to its sum per channel (so that nothing of the
length of the signal is kept) and return the final state; the two must
agree.  Every worker, and the baseline, runs one thread (Numba, BLAS), so
the scaling is the workers'.  The generator makes one fresh array per
chunk (as a reader would), the library's pass 2 one more (its output), in
both runs alike.  Reported: wall time (the Dask one includes building the
graph and scheduling, not the one-time compilation of the call's validating
probe in the client, as the baseline's compilation is not timed either), the
CPU time (user + system) of the processes involved (the workers' and, for
Dask, the client's and scheduler's: on a machine shared with other work it
moves less than the wall time) and its system part (mostly the kernel
clearing freshly faulted pages), the peak resident memory of each worker
process (``ru_maxrss``; a fresh cluster per run) and that of the baseline's.
``--saturation S`` adds the Dask rows again on clusters whose scheduler has
``worker-saturation`` S (Dask's default 1.1 gives a worker of one thread two
chunk generations at once, so it holds a chunk more than the loop; 1.0 one).
``--repeat`` interleaves the runs and reports the best.

Run::

    python benchmarks/bench_dask.py --quick            # ~1 min on 2 cores
    python benchmarks/bench_dask.py                    # the issue's 64 x 16 x 2^24
    python benchmarks/bench_dask.py --costs            # one chunk's parts (paper estimate)
    python benchmarks/bench_dask.py --quick --repeat 2 --saturation 1.0 --no-chain

With ``--series N`` it runs the issue's second target instead: N series
(AR(2) with random stable coefficients plus a period-12 seasonality, 500
samples and 12 held out), one ``MambaForecaster`` per series with
``numba_mamba.dask.forecast_many`` on 1 and 2 workers, against a per-series
``statsmodels`` ``AutoReg(lags=2, seasonal=True, period=12)``: wall time and
the mean MAE and MASE (m = 12) over the series::

    python benchmarks/bench_dask.py --series 1000 --steps 300    # the issue's (hours here)
    python benchmarks/bench_dask.py --series 1000 --steps 0      # what ran (RESULTS.md)
    python benchmarks/bench_dask.py --series 16 --steps 50       # a short run
"""

import argparse
import datetime
import os
import platform
import time

for _var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
             "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # (before NumPy and Numba load; workers inherit it)

import numpy as np  # noqa: E402


def piece(channels, start, n, seed):
    """Samples ``start .. start + n`` of the test signal (channels, n): white
    noise plus a slow sine, generated from the chunk's position."""
    rng = np.random.default_rng([seed, start])
    out = rng.standard_normal((channels, n))
    out += np.sin(2e-5 * np.arange(start, start + n))[None, :]  # (in place: one fresh chunk)
    return out


def filter_bank(channels, states):
    rng = np.random.default_rng(1)
    A = -np.exp(rng.uniform(np.log(1e-4), np.log(1.0), (channels, states)))
    B = rng.standard_normal((channels, states))
    C = rng.standard_normal((channels, states)) / states
    return A, B, C


def peak_rss_mib():
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_times():
    """This process's (user + system, system) CPU seconds."""
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF)
    return np.array([r.ru_utime + r.ru_stime, r.ru_stime])


def pieces(channels, states, length, chunk, seed):
    """The baseline: chunks one after another with zi/zf (in one worker process)."""
    import numba_mamba as nm

    A, B, C = filter_bank(channels, states)
    h = np.zeros((channels, states))
    nm.ssm_filter(A, B, C, piece(channels, 0, 16, seed), zi=h)  # (compile outside the timing)
    total = np.zeros(channels)
    t0, c0 = time.perf_counter(), cpu_times()
    for start in range(0, length, chunk):
        y, h = nm.ssm_filter(A, B, C, piece(channels, start, min(chunk, length - start), seed),
                             zi=h)
        total += y.sum(axis=-1)
    return total, h, time.perf_counter() - t0, cpu_times() - c0, peak_rss_mib()


def warm_up():
    """Compile the kernels a worker runs (outside the timing)."""
    import numba_mamba as nm
    from numba_mamba.dask import _filter_pass1

    A, B, C = filter_bank(2, 4)
    x = piece(2, 0, 16, 0)
    nm.ssm_filter(A, B, C, x, zi=np.zeros((2, 4)))
    _filter_pass1(x, A[:, None], B[:, None], np.ones((1, 1)), "zoh")
    return peak_rss_mib()


def warm_forecaster(steps):
    """Compile the forecaster's kernels in a worker (outside the timing)."""
    from numba_mamba.timeseries import MambaForecaster

    y = np.sin(np.arange(200) * 0.5)
    MambaForecaster(season=12, steps=min(steps, 2)).fit(y, fh=12).predict()


def lazy_signal(channels, length, chunk, seed):
    import dask.array as da

    chunks = ((channels,), tuple(min(chunk, length - s) for s in range(0, length, chunk)))

    def block(block_info=None):
        (_, _), (start, stop) = block_info[None]["array-location"]
        return piece(channels, start, stop - start, seed)

    return da.map_blocks(block, chunks=chunks, dtype=np.float64,
                         meta=np.empty((0, 0), np.float64))


def cluster(workers, saturation=None):
    """A LocalCluster of ``workers`` processes of one thread (kernels compiled in
    each); ``saturation``: the scheduler's ``worker-saturation`` (Dask's default
    if None), how many root tasks (here: chunk generations) a thread is given
    at once."""
    import dask
    from distributed import Client, LocalCluster

    config = {} if saturation is None else {"distributed.scheduler.worker-saturation":
                                            saturation}
    with dask.config.set(config):  # (read when the scheduler starts)
        lc = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                          memory_limit=0, dashboard_address=None)
    client = Client(lc)
    client.run(warm_up)
    return lc, client


def run_dask(workers, channels, states, length, chunk, seed, prefix="auto", saturation=None):
    import dask

    import numba_mamba as nm

    lc, client = cluster(workers, saturation)
    try:
        base = client.run(peak_rss_mib)
        A, B, C = filter_bank(channels, states)
        # (the call validates with a one-sample probe: compile it here outside the timing,
        # as the baseline's kernels are)
        nm.ssm_filter(A, B, C, lazy_signal(channels, length, chunk, seed),
                      zi=np.zeros((channels, states)))
        c0 = sum(client.run(cpu_times).values()) + cpu_times()
        t0 = time.perf_counter()
        with dask.config.set({"numba-mamba.prefix": prefix}):
            y, zf = nm.ssm_filter(A, B, C, lazy_signal(channels, length, chunk, seed),
                                  zi=np.zeros((channels, states)))
        total, h = dask.compute(y.sum(axis=-1), zf)
        elapsed = time.perf_counter() - t0
        cpu = sum(client.run(cpu_times).values()) + cpu_times() - c0
        peaks = client.run(peak_rss_mib)
    finally:
        client.close()
        lc.close()
    return total, h, elapsed, cpu, sorted(peaks.values()), max(base.values())


def run_pieces(channels, states, length, chunk, seed):
    lc, client = cluster(1)
    try:
        base = max(client.run(peak_rss_mib).values())
        return client.submit(pieces, channels, states, length, chunk, seed,
                             pure=False).result() + (base,)
    finally:
        client.close()
        lc.close()


def run_costs(channels, states, chunk, seed, reps=5):
    """Per chunk, in this process (one thread), best of ``reps``: generating it,
    pass 2 (``ssm_filter`` with ``zi``) and the LTI pass 1 (its end state)."""
    import numba_mamba as nm
    from numba_mamba.dask import _filter_pass1

    warm_up()
    A, B, C = filter_bank(channels, states)
    h = np.zeros((channels, states))

    def best(fn):
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    x = piece(channels, 0, chunk, seed)
    return {"generate": best(lambda: piece(channels, 0, chunk, seed)),
            "pass 2 (the scan)": best(lambda: nm.ssm_filter(A, B, C, x, zi=h)),
            "pass 1 (end state)": best(lambda: _filter_pass1(x, A[:, None], B[:, None],
                                                             np.ones((1, 1)), "zoh"))}


def panel(n, length, fh, seed):
    """n series of AR(2) noise (random stable coefficients) plus a period-12 season."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        r, theta = rng.uniform(0.3, 0.9), rng.uniform(0.2, 2.5)  # complex pole pair
        a1, a2 = 2 * r * np.cos(theta), -r * r
        e = rng.standard_normal(length + fh + 100)
        y = np.zeros_like(e)
        for t in range(2, len(e)):
            y[t] = a1 * y[t - 1] + a2 * y[t - 2] + e[t]
        season = rng.uniform(0.5, 3) * np.sin(2 * np.pi * np.arange(len(e)) / 12
                                              + rng.uniform(0, 2 * np.pi))
        out.append((y + season)[100:])
    return out


def autoreg(series, length, fh):
    from statsmodels.tsa.ar_model import AutoReg

    return [AutoReg(y[:length], lags=2, seasonal=True, period=12).fit().forecast(fh)
            for y in series]


def run_series(args):
    from numba_mamba.dask import forecast_many
    from numba_mamba.timeseries import mae, mase

    length, fh = 500, 12
    series = panel(args.series, length, fh, args.seed)
    print(f"# bench_dask --series {args.series} --steps {args.steps} "
          f"{datetime.date.today()} {platform.node()} ({os.cpu_count()} cores): "
          f"AR(2) + season 12, {length} samples, fh {fh}")
    print("| run | workers | time s | mean MAE | mean MASE |")
    print("|---|---|---|---|---|")

    def row(name, workers, seconds, forecasts):
        e = np.mean([mae(y[length:], f) for y, f in zip(series, forecasts)])
        m = np.mean([mase(y[length:], f, y[:length], m=12) for y, f in zip(series, forecasts)])
        print(f"| {name} | {workers} | {seconds:.1f} | {e:.3f} | {m:.3f} |")

    t0 = time.perf_counter()
    ar = autoreg(series, length, fh)
    row("AutoReg(2) + seasonal dummies (statsmodels)", 1, time.perf_counter() - t0, ar)
    for w in args.workers:
        lc, client = cluster(w)
        try:
            client.run(warm_forecaster, args.steps)
            t0 = time.perf_counter()
            got = forecast_many([y[:length] for y in series], fh, client=client,
                                progress=False, season=12, steps=args.steps)
            row(f"MambaForecaster per series (steps={args.steps})", w,
                time.perf_counter() - t0, got)
        finally:
            client.close()
            lc.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--states", type=int, default=16)
    parser.add_argument("--log2-length", type=int, default=24)
    parser.add_argument("--log2-chunk", type=int, default=18)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs of each (interleaved); the table has the best and all")
    parser.add_argument("--quick", action="store_true",
                        help="2^21 samples in chunks of 2^17 (about a minute on 2 cores)")
    parser.add_argument("--saturation", type=float, default=None,
                        help="also run the Dask rows with this worker-saturation (Dask's "
                             "default 1.1: a thread is given two chunk generations at once)")
    parser.add_argument("--prefix", nargs="*", default=[],
                        choices=["chain", "tree", "sequential"],
                        help="also run the Dask rows with these numba-mamba.prefix kinds (on "
                             "clusters with --saturation, if given)")
    parser.add_argument("--no-chain", action="store_true",
                        help="leave out the row prefix=chain (the two-pass graph on 1 worker)")
    parser.add_argument("--costs", action="store_true",
                        help="only time one chunk's generation, pass 1 and pass 2 (one thread)")
    parser.add_argument("--series", type=int, default=0,
                        help="run the many-series benchmark with this many series instead")
    parser.add_argument("--steps", type=int, default=300,
                        help="training steps of each MambaForecaster (--series)")
    args = parser.parse_args()
    if args.series:
        return run_series(args)
    if args.quick:
        args.log2_length, args.log2_chunk = 21, 17
    length, chunk = 2 ** args.log2_length, 2 ** args.log2_chunk
    if args.costs:
        costs = run_costs(args.channels, args.states, chunk, args.seed)
        print(f"# per chunk of {args.channels} x 2^{args.log2_chunk}, {args.states} states, one "
              f"thread, best of 5 (load {os.getloadavg()[0]:.1f}): "
              + ", ".join(f"{k} {v:.3f} s" for k, v in costs.items()))
        return
    ch, st = args.channels, args.states
    size = ch * length * 8 / 2 ** 30
    print(f"# bench_dask {datetime.date.today()} {platform.node()} ({os.cpu_count()} cores): "
          f"LTI float64, {ch} channels x {st} states x 2^{args.log2_length} samples "
          f"({size:.2f} GiB of input), chunks of 2^{args.log2_chunk} "
          f"({ch * chunk * 8 / 2 ** 20:.0f} MiB), {-(-length // chunk)} chunks; load average "
          f"{', '.join(f'{v:.1f}' for v in os.getloadavg())}")
    runs = {}  # (name, workers) -> [(seconds, peaks)]
    for _ in range(args.repeat):  # (interleaved: a load from elsewhere hits every run alike)
        want, want_h, t_base, cpu, peak_base, idle = run_pieces(ch, st, length, chunk,
                                                                 args.seed)
        runs.setdefault(("pieces with zi/zf", 1), []).append((t_base, cpu, [peak_base]))
        kinds = [(w, "auto", None) for w in args.workers] \
            + [(1, "chain", None)] * (1 in args.workers and not args.no_chain) \
            + [(w, "auto", args.saturation) for w in args.workers] * (args.saturation is not None) \
            + [(w, prefix, args.saturation) for prefix in args.prefix for w in args.workers]
        kinds = list(dict.fromkeys(kinds))  # (each row once)
        for w, prefix, sat in kinds:
            total, h, t, cpu, peaks, idle = run_dask(w, ch, st, length, chunk, args.seed,
                                                     prefix, sat)
            err = max(np.abs(total - want).max() / np.abs(want).max(),
                      np.abs(h - want_h).max() / np.abs(want_h).max())
            if err > 1e-9:
                raise SystemExit(f"dask and pieces disagree: relative difference {err:.2e}")
            name = {"auto": "dask ssm_filter"}.get(prefix, f"dask ssm_filter, prefix={prefix}")
            name += "" if sat is None else f", worker-saturation {sat:g}"
            runs.setdefault((name, w), []).append((t, cpu, peaks))
    base = min(t for t, _, _ in runs[("pieces with zi/zf", 1)])
    base_cpu = min(c[0] for _, c, _ in runs[("pieces with zi/zf", 1)])
    print(f"| run | workers | time s (best of {args.repeat}) | vs pieces | all times s | "
          f"CPU s (best) | CPU vs pieces | of which system s | peak RSS per worker MiB "
          f"(idle {idle:.0f}) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (name, w), got in runs.items():
        best, cpu = min(t for t, _, _ in got), min((c for _, c, _ in got), key=lambda c: c[0])
        peaks = [max(p[i] for _, _, p in got) for i in range(len(got[0][2]))]
        print(f"| {name} | {w} | {best:.2f} | {best / base:.2f} | "
              f"{', '.join(f'{t:.1f}' for t, _, _ in got)} | {cpu[0]:.1f} | "
              f"{cpu[0] / base_cpu:.2f} | {cpu[1]:.1f} | {', '.join(f'{p:.0f}' for p in peaks)} |")
    print(f"load average after: {', '.join(f'{v:.1f}' for v in os.getloadavg())}")

if __name__ == "__main__":
    main()
