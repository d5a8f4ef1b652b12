"""Benchmark the GPU selective scan against the reference CUDA kernel's figures.

For each row: forward and backward times (CUDA events, median of ``--reps``
runs after warm-up, fresh random inputs each run), the effective bandwidth of
the bytes each pass must move, the ratio to the memory floor at the copy
bandwidth measured in the same run, and the ratio to the reference
implementation's figures measured on an H200 (issue 3).

Both GPU engines are timed in the same run: ``states`` (one thread per state,
``cuda_kernels/scan_states.py``) and ``blocks`` (the parallel block scan along
the sequence, ``cuda_kernels/scan_blocks.py``); ``auto`` is what the public API picks.
Where PyTorch with CUDA is importable, a second table times the forward as a
plain PyTorch loop over the sequence (one step of the recurrence per
iteration, :func:`sequential_loop`) on the same inputs, next to the figure
issue 3 quotes for it.  The last table lists registers and local memory
(spills) of every kernel used.

A second table times the same calls issued back to back, without waiting
for the GPU between them (:func:`back_to_back_ms`), as a training loop issues
them: there the host work of one call overlaps the kernels before it.

``--memory`` reports, per row and engine, the bytes the forward keeps for the
backward and the device memory CuPy's pool held at most during one forward +
backward (:func:`peak_pool_bytes`).

``--forward-only`` adds a table of the forward as inference calls it
(``selective_scan``: the state engine keeps no states for a backward) against
the forward of ``selective_scan_vjp``, both back to back, with the device
memory each call allocates (:func:`forward_only_ms`).

``--long`` instead runs one sequence of 2**20 steps (batch 1, D 1536, N 16)
forward and backward and checks 8 of its channels against the CPU scan in
float64 (:func:`long_sequence`).

Run:  python benchmarks/bench_scan.py [--quick] [--reps 20] [--engines states,blocks]
      [--torch-reps 5] [--memory] [--forward-only] [--long] [--cast-half]
"""

import argparse
import datetime
import re
import statistics

import numpy as np

import numba_mamba as nm

# (batch, D, N, L, dtype): reference fwd ms, bwd ms (state-spaces/mamba csrc/selective_scan,
# sm_90 build, H200, z, D, delta_bias, softplus on, B and C variable (batch, N, L)).
ROWS = [
    ((8, 1536, 16, 2048, "float32"), 0.89, 2.09),
    ((8, 1536, 16, 2048, "bfloat16"), 0.47, 1.82),
    ((2, 1536, 16, 16384, "float32"), 1.91, 4.20),
    ((64, 64, 16, 1024, "float32"), 0.17, 0.44),
]
# PyTorch sequential loop, forward ms, as issue 3 quotes it (None: not given).
TORCH_LOOP_MS = [117, 191, None, 66]

# The reference's figures of issue 19 (same build and settings as ROWS, measured
# in one process beside ours on 2026-12-03): (batch, D, N, L, dtype): fwd ms, bwd ms.
REFERENCE_19 = {
    (8, 1536, 16, 2048, "float32"): (0.894, 2.082),
    (8, 1536, 16, 2048, "bfloat16"): (0.462, 1.781),
    (2, 1536, 16, 16384, "float32"): (1.960, 4.291),
    (64, 64, 16, 1024, "float32"): (0.203, 0.474),
    (1, 768, 16, 4096, "float32"): (0.146, 0.368),
    (1, 768, 16, 4096, "bfloat16"): (0.116, 0.364),
    (1, 1536, 16, 16384, "float32"): (0.991, 2.282),
    (1, 2048, 16, 65536, "float32"): (5.698, 12.869),
    (1, 2048, 16, 65536, "bfloat16"): (2.958, 11.154),
    (1, 64, 16, 65536, "float32"): (0.819, 1.635),
    (2, 768, 16, 8192, "float32"): (0.514, 1.157),
    (2, 768, 16, 8192, "bfloat16"): (0.300, 1.070),
    (8, 768, 16, 1024, "bfloat16"): (0.146, 0.537),
    (8, 2048, 16, 2048, "bfloat16"): (0.625, 2.369),
    (64, 768, 16, 256, "float32"): (0.379, 1.229),
    (64, 64, 16, 4096, "bfloat16"): (0.362, 1.445),
    (8, 1536, 4, 2048, "float32"): (0.373, 0.826),
    (8, 1536, 4, 2048, "bfloat16"): (0.205, 0.644),
    (8, 1536, 64, 2048, "float32"): (3.176, 7.502),
    (8, 1536, 64, 2048, "bfloat16"): (1.533, 6.662),
    (16, 1536, 16, 4096, "bfloat16"): (1.788, 6.893),
}


def grid_rows(quick=False):
    """The ``--grid`` rows: ``(batch, D, N, L, dtype name, variable B/C)``.

    Issue 19's rows (where the reference has a figure), then one factor at a
    time around (8, 1536, 16, 2048) -- batch {1, 2, 8, 16, 64}, D {64, 768,
    1536, 2048, 4096}, N {4, 8, 16, 32, 64} -- and L {256 ... 65,536} at batch
    1, D 1536, in float32, bfloat16 and float16, a few rows with constant
    B and C, and three in float64.  ``quick``: issue 19's rows only.
    """
    rows = [key + (True,) for key in REFERENCE_19]
    if quick:
        return rows
    for dtype in ("float32", "bfloat16", "float16"):
        for Bt in (1, 2, 8, 16, 64):
            rows.append((Bt, 1536, 16, 2048, dtype, True))
        for Dc in (64, 768, 2048, 4096):
            rows.append((8, Dc, 16, 2048, dtype, True))
        for N in (4, 8, 32, 64):
            rows.append((8, 1536, N, 2048, dtype, True))
        for L in (256, 1024, 4096, 16384, 65536):
            rows.append((1, 1536, 16, L, dtype, True))
        for shape in ((8, 1536, 16, 2048), (1, 768, 16, 4096)):
            rows.append(shape + (dtype, False))
    for shape in ((8, 1536, 16, 2048), (1, 768, 16, 4096), (8, 1536, 64, 2048)):
        rows.append(shape + ("float64", True))
    seen, unique = set(), []
    for row in rows:
        if row not in seen:
            seen.add(row)
            unique.append(row)
    return unique


def sequential_loop(exp, softplus, sigmoid, u, delta, A, B, C, D, z, delta_bias):
    """The selective scan forward as a loop over the sequence, one step per iteration.

    Array-library neutral (NumPy, PyTorch): ``exp``, ``softplus`` and ``sigmoid``
    are the library's; ``u, delta, z`` (Bt, D, L), ``A`` (D, N), ``B, C`` (Bt, N, L),
    ``D, delta_bias`` (D,); softplus on.  Returns ``out`` (Bt, D, L).
    """
    dt = softplus(delta + delta_bias[:, None])
    h = (u[:, :, 0, None] * 0) * A  # (Bt, D, N) zeros of the library's kind
    y = u * 0
    for t in range(u.shape[2]):
        dt_t = dt[:, :, t, None]  # (Bt, D, 1)
        h = exp(dt_t * A) * h + (dt_t * u[:, :, t, None]) * B[:, None, :, t]
        y[:, :, t] = (h * C[:, None, :, t]).sum(-1)
    out = y + D[:, None] * u
    return out * z * sigmoid(z)


def torch_loop_ms(cupy, Bt, Dc, N, L, dtype_name, reps):
    """Median forward time (ms) of :func:`sequential_loop` in PyTorch on the GPU, or None
    where PyTorch with CUDA is not importable."""
    try:
        import torch
        if not torch.cuda.is_available():
            return None
    except Exception:
        return None
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    rng = cupy.random.default_rng(1)
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for i in range(reps + 1):  # the first run warms up
        args = make_inputs(cupy, Bt, Dc, N, L, cupy.float32, rng)
        t = {k: torch.from_dlpack(v).to(tdtype) if k in ("u", "delta", "z", "B", "C")
             else torch.from_dlpack(v) for k, v in args.items() if k != "delta_softplus"}
        torch.cuda.synchronize()
        start.record()
        sequential_loop(torch.exp, torch.nn.functional.softplus, torch.sigmoid,
                        t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"],
                        t["delta_bias"])
        stop.record()
        torch.cuda.synchronize()
        if i:
            times.append(start.elapsed_time(stop))
    return statistics.median(times)


def copy_bandwidth(cupy, nbytes=2 << 30, reps=10):
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    src = cupy.ones(nbytes // 4, dtype=cupy.float32)
    dst = cupy.empty_like(src)
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    times = []
    for _ in range(reps):
        start.record()
        dst[...] = src
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop) / 1e3)
    del src, dst
    return 2 * nbytes / statistics.median(times)


def make_inputs(cupy, Bt, Dc, N, L, dtype, rng, var_bc=True):
    def rnd(*shape, scale=1.0, shift=0.0):
        return (rng.standard_normal(shape, dtype=cupy.float32) * scale + shift).astype(dtype)
    bc_shape = (Bt, N, L) if var_bc else (Dc, N)
    bc_dtype = dtype if var_bc else cupy.float32
    return dict(
        u=rnd(Bt, Dc, L), delta=rnd(Bt, Dc, L, scale=0.5, shift=-1.0),
        A=-cupy.exp(rnd(Dc, N, scale=0.5).astype(cupy.float32)),
        B=rnd(*bc_shape).astype(bc_dtype), C=rnd(*bc_shape).astype(bc_dtype),
        D=rnd(Dc).astype(cupy.float32),
        z=rnd(Bt, Dc, L), delta_bias=rnd(Dc, scale=0.1).astype(cupy.float32),
        delta_softplus=True,
    )


def _backends():
    """The GPU kernel modules (``cuda_kernels`` of the source tree or the installed wheel)."""
    import importlib

    from numba_mamba.scan import _gpu_backend

    backend = _gpu_backend()
    return backend, importlib.import_module(backend.__package__ + ".scan_states")


def force_engine(engine):
    """A context manager in which the public API uses ``engine`` (None: its own
    choice): an override of the kernels' ``settings.engine``."""
    return _backends()[0].settings.override(engine="auto" if engine is None else engine)


def time_row(cupy, Bt, Dc, N, L, dtype, reps, warmup=3, engine=None, var_bc=True):
    with force_engine(engine):
        return _time_row(cupy, Bt, Dc, N, L, dtype, reps, warmup, var_bc)


def _time_row(cupy, Bt, Dc, N, L, dtype, reps, warmup, var_bc=True):
    rng = cupy.random.default_rng(0)
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    fwd, bwd = [], []
    for i in range(warmup + reps):
        # fresh inputs, never zeros
        args = make_inputs(cupy, Bt, Dc, N, L, dtype, rng, var_bc)
        dout = rng.standard_normal((Bt, Dc, L), dtype=cupy.float32).astype(dtype)
        cupy.cuda.get_current_stream().synchronize()
        start.record()
        out, last, backward = nm.selective_scan_vjp(**args)
        stop.record()
        stop.synchronize()
        t_fwd = cupy.cuda.get_elapsed_time(start, stop)
        start.record()
        backward(dout)
        stop.record()
        stop.synchronize()
        t_bwd = cupy.cuda.get_elapsed_time(start, stop)
        if i >= warmup:
            fwd.append(t_fwd)
            bwd.append(t_bwd)
    return statistics.median(fwd), statistics.median(bwd)


def peak_pool_bytes(cupy, Bt, Dc, N, L, dtype, engine=None):
    """``(input bytes, saved bytes, peak bytes)`` of one forward + backward.

    Runs with a fresh CuPy memory pool as the allocator: the pool keeps every
    block it has handed out (freed ones cached for reuse), so its size after
    the backward, less the inputs, is the most device memory the two calls
    held at once beyond the inputs (rounding and fragmentation included).
    ``saved`` is what the forward keeps for the backward (its saved states,
    and any cast copies of the inputs).
    """
    with force_engine(engine):
        pool = cupy.cuda.MemoryPool()
        allocator = cupy.cuda.get_allocator()
        cupy.cuda.set_allocator(pool.malloc)
        try:
            rng = cupy.random.default_rng(0)
            args = make_inputs(cupy, Bt, Dc, N, L, dtype, rng)
            dout = rng.standard_normal((Bt, Dc, L), dtype=cupy.float32).astype(dtype)
            inputs = sum(v.nbytes for v in args.values() if hasattr(v, "nbytes")) + dout.nbytes
            cupy.cuda.get_current_stream().synchronize()
            pool.free_all_blocks()  # the temporaries of drawing the inputs
            base = pool.used_bytes()
            out, last, backward = nm.selective_scan_vjp(**args)
            cupy.cuda.get_current_stream().synchronize()
            saved = pool.used_bytes() - base - out.nbytes - last.nbytes
            backward(dout)
            cupy.cuda.get_current_stream().synchronize()
            return inputs, saved, pool.total_bytes() - base
        finally:
            cupy.cuda.set_allocator(allocator)


def back_to_back_ms(cupy, Bt, Dc, N, L, dtype, reps, sets=4):
    """Per-call ms of ``reps`` forward calls, then of ``reps`` backward calls,
    issued back to back (no synchronization between calls; inputs cycle
    through ``sets`` fresh random sets), as a training loop issues them: the
    host work of one call overlaps the kernels of the previous ones."""
    rng = cupy.random.default_rng(1)
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    inputs = [make_inputs(cupy, Bt, Dc, N, L, dtype, rng) for _ in range(sets)]
    dout = rng.standard_normal((Bt, Dc, L), dtype=cupy.float32).astype(dtype)
    backwards = [nm.selective_scan_vjp(**args)[2] for args in inputs]  # (warm-up too)
    backwards[0](dout)
    cupy.cuda.get_current_stream().synchronize()
    start.record()
    for i in range(reps):
        nm.selective_scan_vjp(**inputs[i % sets])
    stop.record()
    stop.synchronize()
    t_fwd = cupy.cuda.get_elapsed_time(start, stop) / reps
    start.record()
    for i in range(reps):
        backwards[i % sets](dout)
    stop.record()
    stop.synchronize()
    return t_fwd, cupy.cuda.get_elapsed_time(start, stop) / reps


def forward_only_ms(cupy, Bt, Dc, N, L, dtype, reps, sets=4):
    """Per-call ms of ``selective_scan`` and of ``selective_scan_vjp``'s forward,
    each issued ``reps`` times back to back (inputs cycling through ``sets``
    fresh random sets), and the bytes one call of each takes from CuPy's pool
    (outputs and what is kept for a backward)."""
    rng = cupy.random.default_rng(2)
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    inputs = [make_inputs(cupy, Bt, Dc, N, L, dtype, rng) for _ in range(sets)]
    pool = cupy.get_default_memory_pool()
    result = []
    for fn in (nm.selective_scan, nm.selective_scan_vjp):
        fn(**inputs[0])  # (warm-up)
        cupy.cuda.get_current_stream().synchronize()
        before = pool.used_bytes()
        kept = fn(**inputs[0])
        taken = pool.used_bytes() - before
        del kept
        start.record()
        for i in range(reps):
            fn(**inputs[i % sets])
        stop.record()
        stop.synchronize()
        result += [cupy.cuda.get_elapsed_time(start, stop) / reps, taken]
    return tuple(result)


def long_sequence(cupy, Bt=1, Dc=1536, N=16, L=2**20, reps=3, check_channels=8):
    """Forward + backward of one long sequence (issue 3: batch 1, D 1536, N 16,
    L = 2**20, float32); returns a dict of times (ms, median of ``reps``), the
    peak pool bytes and the largest relative errors of ``check_channels``
    channels against the CPU scan in float64 on the same inputs.

    The channels of a scan are independent, so a few of them are a complete
    check of the sequence direction (``out``, ``du``, ``ddelta``, ``dz`` and
    the rows of ``dA``, ``dD``, ``ddelta_bias``); ``dB`` and ``dC`` sum over
    every channel and are left out.
    """
    rng = cupy.random.default_rng(7)
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    args = make_inputs(cupy, Bt, Dc, N, L, cupy.float32, rng)
    dout = rng.standard_normal((Bt, Dc, L), dtype=cupy.float32)
    fwd, bwd = [], []
    pool = cupy.get_default_memory_pool()
    for _ in range(reps):
        cupy.cuda.get_current_stream().synchronize()
        start.record()
        out, last, backward = nm.selective_scan_vjp(**args)
        stop.record()
        stop.synchronize()
        fwd.append(cupy.cuda.get_elapsed_time(start, stop))
        start.record()
        grads = backward(dout)
        stop.record()
        stop.synchronize()
        bwd.append(cupy.cuda.get_elapsed_time(start, stop))
    peak = pool.total_bytes()
    pick = slice(0, check_channels)
    picked = dict(args, u=args["u"][:, pick], delta=args["delta"][:, pick], z=args["z"][:, pick],
                  A=args["A"][pick], D=args["D"][pick], delta_bias=args["delta_bias"][pick])
    sub = {k: (cupy.asnumpy(v).astype(np.float64) if hasattr(v, "shape") else v)
           for k, v in picked.items()}
    r_out, _, r_backward = nm.selective_scan_vjp(**sub)
    r = r_backward(cupy.asnumpy(dout[:, pick]).astype(np.float64))

    def rel(got, want):
        got = cupy.asnumpy(got).astype(np.float64)
        return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-300))

    errors = {"out": rel(out[:, pick], r_out), "du": rel(grads.du[:, pick], r.du),
              "ddelta": rel(grads.ddelta[:, pick], r.ddelta), "dz": rel(grads.dz[:, pick], r.dz),
              "dA": rel(grads.dA[pick], r.dA), "dD": rel(grads.dD[pick], r.dD),
              "ddelta_bias": rel(grads.ddelta_bias[pick], r.ddelta_bias)}
    return dict(fwd_ms=statistics.median(fwd), bwd_ms=statistics.median(bwd), peak=peak,
                errors=errors)


def pass_bytes(Bt, Dc, N, L, itemsize):
    """Bytes each pass must move at least (inputs read once, outputs written once)."""
    seq = Bt * Dc * L * itemsize  # one (Bt, D, L) tensor
    bc = Bt * N * L * itemsize  # one variable B or C
    fwd = 3 * seq + 2 * bc + seq  # u, delta, z, B, C in; out
    bwd = 4 * seq + 2 * bc + 3 * seq + 2 * bc  # u, delta, z, dout, B, C in; du, ddelta, dz, dB, dC
    return fwd, bwd


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="first row only")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--engines", default=None,
                        help="comma-separated engines to time: states, blocks, auto "
                             "(default states,blocks; with --grid, auto)")
    parser.add_argument("--torch-reps", type=int, default=5,
                        help="timed runs of the PyTorch loop per row (0: skip it)")
    parser.add_argument("--memory", action="store_true",
                        help="also report saved bytes and the peak pool size of forward+backward")
    parser.add_argument("--forward-only", action="store_true",
                        help="also time selective_scan (no states kept) against the forward "
                             "of selective_scan_vjp")
    parser.add_argument("--long", action="store_true",
                        help="instead, run batch 1, D 1536, N 16, L 2**20 (float32) forward + "
                             "backward and check 8 channels against the CPU in float64")
    parser.add_argument("--grid", action="store_true",
                        help="instead, time the wide grid of issue 19 (grid_rows; with --quick "
                             "its reference rows only), forward and backward of the engines "
                             "named by --engines (default here: auto)")
    parser.add_argument("--filter", default=None,
                        help="with --grid, only the rows whose 'batch, D, N, L | dtype | B, C' "
                             "text matches this regular expression")
    parser.add_argument("--deterministic", action="store_true",
                        help="settings.deterministic on: the backward's sums in a fixed order")
    parser.add_argument("--cast-half", action="store_true",
                        help="cast float16/bfloat16 inputs to float32 around the state engine "
                             "(settings.direct_half off) instead of reading them directly")
    args = parser.parse_args()
    if args.cast_half:
        _backends()[0].settings.direct_half = False
    if args.deterministic:
        _backends()[0].settings.deterministic = True
    if args.long:
        import cupy

        res = long_sequence(cupy)
        print(f"# {datetime.date.today()}: batch 1, D 1536, N 16, L 2**20, float32: "
              f"fwd {res['fwd_ms']:.1f} ms, bwd {res['bwd_ms']:.1f} ms (median of 3), "
              f"pool {res['peak'] / 1e9:.1f} GB")
        print("# largest error relative to the largest value, 8 channels vs CPU float64: "
              + ", ".join(f"{k} {v:.1e}" for k, v in res["errors"].items()))
        return
    engines = [e.strip() for e in (args.engines or ("auto" if args.grid else "states,blocks"))
               .split(",") if e.strip()]
    import cupy

    if args.grid:
        grid(cupy, engines, args.reps, args.quick, args.torch_reps, args.filter)
        return

    rows = ROWS[:1] if args.quick else ROWS
    bw = copy_bandwidth(cupy)
    dev = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"].decode()
    print(f"# {datetime.date.today()} on {dev}; copy bandwidth {bw / 1e12:.2f} TB/s; "
          f"median of {args.reps} after warm-up")
    header = ("| batch, D, N, L | dtype | engine | fwd ms | fwd GB/s | fwd / floor | ref fwd ms | fwd / ref "
              "| bwd ms | bwd GB/s | bwd / floor | ref bwd ms | bwd / ref |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for (Bt, Dc, N, L, dtype_name), ref_fwd, ref_bwd in rows:
        dtype = cupy.dtype(dtype_name) if dtype_name != "bfloat16" else _bf16(cupy)
        if dtype is None:
            print(f"| {Bt}, {Dc}, {N}, {L} | {dtype_name} | (this CuPy has no bfloat16) |")
            continue
        b_fwd, b_bwd = pass_bytes(Bt, Dc, N, L, dtype.itemsize)
        floor_fwd, floor_bwd = b_fwd / bw * 1e3, b_bwd / bw * 1e3
        for engine in engines:
            t_fwd, t_bwd = time_row(cupy, Bt, Dc, N, L, dtype, args.reps,
                                    engine=None if engine == "auto" else engine)
            print(f"| {Bt}, {Dc}, {N}, {L} | {dtype_name} | {engine} | {t_fwd:.3f} | "
                  f"{b_fwd / t_fwd / 1e6:.0f} | {t_fwd / floor_fwd:.1f} | {ref_fwd} | "
                  f"{t_fwd / ref_fwd:.2f} | {t_bwd:.3f} | {b_bwd / t_bwd / 1e6:.0f} | "
                  f"{t_bwd / floor_bwd:.1f} | {ref_bwd} | {t_bwd / ref_bwd:.2f} |", flush=True)
    print()
    print("| batch, D, N, L | dtype | engine | fwd ms back to back | fwd / ref "
          "| bwd ms back to back | bwd / ref |")
    print("|---|---|---|---|---|---|---|")
    for (Bt, Dc, N, L, dtype_name), ref_fwd, ref_bwd, dtype in _with_dtypes(cupy, rows):
        for engine in engines:
            with force_engine(None if engine == "auto" else engine):
                t_fwd, t_bwd = back_to_back_ms(cupy, Bt, Dc, N, L, dtype, args.reps)
            print(f"| {Bt}, {Dc}, {N}, {L} | {dtype_name} | {engine} | {t_fwd:.3f} | "
                  f"{t_fwd / ref_fwd:.2f} | {t_bwd:.3f} | {t_bwd / ref_bwd:.2f} |", flush=True)
    if args.forward_only:
        print()
        print("| batch, D, N, L | dtype | selective_scan ms | MB per call "
              "| selective_scan_vjp forward ms | MB per call |")
        print("|---|---|---|---|---|---|")
        for (Bt, Dc, N, L, dtype_name), _, _, dtype in _with_dtypes(cupy, rows):
            t_inf, b_inf, t_vjp, b_vjp = forward_only_ms(cupy, Bt, Dc, N, L, dtype, args.reps)
            print(f"| {Bt}, {Dc}, {N}, {L} | {dtype_name} | {t_inf:.3f} | {b_inf / 1e6:.1f} | "
                  f"{t_vjp:.3f} | {b_vjp / 1e6:.1f} |", flush=True)
    if args.memory:
        print()
        print("| batch, D, N, L | dtype | engine | inputs MB | kept for the backward MB "
              "| peak beyond the inputs during fwd+bwd MB |")
        print("|---|---|---|---|---|---|")
        for (Bt, Dc, N, L, dtype_name), _, _, dtype in _with_dtypes(cupy, rows):
            for engine in engines:
                inputs, saved, peak = peak_pool_bytes(cupy, Bt, Dc, N, L, dtype,
                                                      None if engine == "auto" else engine)
                print(f"| {Bt}, {Dc}, {N}, {L} | {dtype_name} | {engine} | {inputs / 1e6:.1f} | "
                      f"{saved / 1e6:.1f} | {peak / 1e6:.1f} |", flush=True)
    if args.torch_reps:
        print()
        print("| batch, D, N, L | dtype | PyTorch loop fwd ms (median) | issue 3's figure |")
        print("|---|---|---|---|")
        for ((Bt, Dc, N, L, dtype_name), _, _), quoted in zip(rows, TORCH_LOOP_MS):
            ms = torch_loop_ms(cupy, Bt, Dc, N, L, dtype_name, args.torch_reps)
            shown = "(no PyTorch with CUDA)" if ms is None else f"{ms:.1f}"
            print(f"| {Bt}, {Dc}, {N}, {L} | {dtype_name} | {shown} | {quoted or '-'} |",
                  flush=True)
    print_registers({(np.float32 if dtype_name != "float64" else np.float64, N, Dc)
                     for (Bt, Dc, N, L, dtype_name), _, _ in rows})


def grid(cupy, engines, reps, quick, torch_reps, pattern=None):
    """Print the ``--grid`` table (:func:`grid_rows`) and a summary of the
    targets of issue 19."""
    bw = copy_bandwidth(cupy)
    dev = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"].decode()
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {dev}; "
          f"copy bandwidth {bw / 1e12:.2f} TB/s; median of {reps} after 3 warm-ups; "
          f"selective_scan_vjp forward / its backward, host time included")
    header = ("| batch, D, N, L | dtype | B, C | engine | fwd ms | fwd / floor | ref fwd | "
              "fwd / ref | bwd ms | bwd / floor | ref bwd | bwd / ref | bwd / fwd |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    times = {}
    for Bt, Dc, N, L, dtype_name, var_bc in grid_rows(quick):
        dtype = cupy.dtype(dtype_name) if dtype_name != "bfloat16" else _bf16(cupy)
        text = f"{Bt}, {Dc}, {N}, {L} | {dtype_name} | {'var' if var_bc else 'const'}"
        if dtype is None or (pattern and not re.search(pattern, text)):
            continue
        ref = REFERENCE_19.get((Bt, Dc, N, L, dtype_name)) if var_bc else None
        b_fwd, b_bwd = pass_bytes(Bt, Dc, N if var_bc else 0, L, dtype.itemsize)
        for engine in engines:
            try:
                t_fwd, t_bwd = time_row(cupy, Bt, Dc, N, L, dtype, reps,
                                        engine=None if engine == "auto" else engine,
                                        var_bc=var_bc)
            except Exception as exc:  # an engine that cannot take the row
                print(f"| {Bt}, {Dc}, {N}, {L} | {dtype_name} | {'var' if var_bc else 'const'} "
                      f"| {engine} | {type(exc).__name__}: {str(exc)[:60]} |")
                continue
            times[(Bt, Dc, N, L, dtype_name, var_bc, engine)] = (t_fwd, t_bwd)
            r_f = f"{ref[0]} | {t_fwd / ref[0]:.2f}" if ref else "- | -"
            r_b = f"{ref[1]} | {t_bwd / ref[1]:.2f}" if ref else "- | -"
            print(f"| {Bt}, {Dc}, {N}, {L} | {dtype_name} | {'var' if var_bc else 'const'} | "
                  f"{engine} | {t_fwd:.3f} | {t_fwd / (b_fwd / bw * 1e3):.1f} | {r_f} | "
                  f"{t_bwd:.3f} | {t_bwd / (b_bwd / bw * 1e3):.1f} | {r_b} | "
                  f"{t_bwd / t_fwd:.2f} |", flush=True)
    print()
    print("# issue 19's targets (each engine):")
    for engine in engines:
        mine = {k[:6]: v for k, v in times.items() if k[6] == engine}
        over_ref = [(k, f / REFERENCE_19[k[:5]][0], b / REFERENCE_19[k[:5]][1])
                    for k, (f, b) in mine.items() if k[5] and k[:5] in REFERENCE_19]
        bad_ref = [k for k, rf, rb in over_ref if rf > 0.9 or rb > 0.9]
        worst_f = max(over_ref, key=lambda r: r[1], default=None)
        worst_b = max(over_ref, key=lambda r: r[2], default=None)
        bwd_fwd = max(((b / f, k) for k, (f, b) in mine.items()), default=None)
        half = []
        for k, (f, b) in mine.items():
            base = mine.get(k[:4] + ("float32",) + k[5:])
            if k[4] in ("float16", "bfloat16") and base:
                half.append((max(f / base[0], b / base[1]), k))
        print(f"#   {engine}: rows over 0.9x the reference: {len(bad_ref)} of {len(over_ref)}"
              + (f"; worst fwd {worst_f[1]:.2f}x at {worst_f[0][:5]}, worst bwd "
                 f"{worst_b[2]:.2f}x at {worst_b[0][:5]}" if over_ref else ""))
        if bwd_fwd:
            print(f"#   {engine}: largest bwd / fwd {bwd_fwd[0]:.2f} at {bwd_fwd[1]}")
        if half:
            worst = max(half)
            print(f"#   {engine}: largest half / float32 time {worst[0]:.2f} at {worst[1]}; "
                  f"rows above 0.75: {sum(r > 0.75 for r, _ in half)} of {len(half)}")
    if torch_reps:
        print()
        print("| batch, D, N, L | dtype | PyTorch loop fwd ms | ours (auto) fwd ms |")
        print("|---|---|---|---|")
        for Bt, Dc, N, L, dtype_name in ((1, 768, 16, 4096, "float32"), (64, 64, 16, 1024,
                                                                          "float32")):
            ms = torch_loop_ms(cupy, Bt, Dc, N, L, dtype_name, torch_reps)
            ours = times.get((Bt, Dc, N, L, dtype_name, True, "auto"))
            print(f"| {Bt}, {Dc}, {N}, {L} | {dtype_name} | "
                  f"{'(no PyTorch with CUDA)' if ms is None else f'{ms:.1f}'} | "
                  f"{'-' if ours is None else f'{ours[0]:.3f}'} |", flush=True)


def print_registers(configs):
    """Registers and local memory per thread of the scan kernels of ``configs``.

    ``configs``: set of (compute dtype, N, Dc) of the timed rows (B and C variable).
    """
    backend, scan_states = _backends()
    print()
    print("| kernel | registers / thread | local bytes / thread |")
    print("|---|---|---|")
    for dtype, N, Dc in sorted(configs, key=str):
        threads, items = backend.settings.blocks_tuning[np.dtype(dtype)]
        p = scan_states.plan(dtype, N, Dc, 1, 1)
        named = [(f"blocks {np.dtype(dtype).name} threads={threads} items={items}",
                  backend.get_kernels(dtype, threads, items)),
                 (f"states {np.dtype(dtype).name} N={N} block={p.ch}x{N} tiles={p.t_fwd}/{p.t_bwd}",
                  scan_states.get_kernels(dtype, N, p, True, True))]
        for name, kernels in named:
            for kind in ("forward", "backward"):
                disp = getattr(kernels, kind)
                for overload in disp.overloads.values():
                    print(f"| {name} {kind} | {overload.regs_per_thread} | "
                          f"{overload.local_mem_per_thread} |")


def _with_dtypes(cupy, rows):
    """``(shape and dtype name, ref fwd, ref bwd, dtype)`` of the rows whose dtype this CuPy has."""
    for (Bt, Dc, N, L, dtype_name), ref_fwd, ref_bwd in rows:
        dtype = cupy.dtype(dtype_name) if dtype_name != "bfloat16" else _bf16(cupy)
        if dtype is not None:
            yield (Bt, Dc, N, L, dtype_name), ref_fwd, ref_bwd, dtype


def _bf16(cupy):
    try:
        import ml_dtypes
        dt = np.dtype(ml_dtypes.bfloat16)
        cupy.zeros(2, dtype=dt)
        return dt
    except Exception:
        return None


if __name__ == "__main__":
    main()
