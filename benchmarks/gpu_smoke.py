"""GPU smoke test and timing of the selective scan kernels (``cuda_kernels.scan``).

Checks one mid-size problem against the CPU float64 reference on a few
channels, times the forward and the backward with CUDA events (warm-up, then
the median of repeated runs), and prints each compiled kernel's registers per
thread, local memory per thread (spills) and static shared memory.

Run on a machine with a GPU, from the repository root::

    python benchmarks/gpu_smoke.py [--repeat 20]
"""

import argparse
import datetime
import statistics

import numpy as np


def _time(fn, stream, repeat, warmup=3):
    import cupy

    for _ in range(warmup):
        fn()
    stream.synchronize()
    times = []
    for _ in range(repeat):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record(stream)
        fn()
        stop.record(stream)
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop))
    return statistics.median(times), min(times)


def _per_kernel(value):
    if isinstance(value, dict):
        return ", ".join(str(v) for v in value.values())
    return str(value)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--Bt", type=int, default=8)
    parser.add_argument("--Dc", type=int, default=1536)
    parser.add_argument("--N", type=int, default=16)
    parser.add_argument("--L", type=int, default=2048)
    parser.add_argument("--sweep", action="store_true",
                        help="also time other (threads, items) splits and B/C kinds")
    args = parser.parse_args()

    import cupy

    from numba_mamba.cuda_kernels import scan, scan_blocks
    from numba_mamba import reference

    props = cupy.cuda.runtime.getDeviceProperties(0)
    print(f"date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}, "
          f"device {props['name'].decode()}")
    Bt, Dc, N, L = args.Bt, args.Dc, args.N, args.L
    rng = np.random.default_rng(0)
    f32 = np.float32
    host = dict(
        u=rng.standard_normal((Bt, Dc, L)).astype(f32),
        delta=rng.uniform(-3.0, 0.5, (Bt, Dc, L)).astype(f32),
        A=(-rng.uniform(0.2, 3.0, (Dc, N))).astype(f32),
        B=rng.standard_normal((Bt, 1, N, L)).astype(f32),
        C=rng.standard_normal((Bt, 1, N, L)).astype(f32),
        D=rng.standard_normal(Dc).astype(f32),
        z=rng.standard_normal((Bt, Dc, L)).astype(f32),
        delta_bias=rng.uniform(-1.0, 1.0, Dc).astype(f32),
    )
    dev = {k: cupy.asarray(v) for k, v in host.items()}
    fargs = (dev["u"], dev["delta"], dev["A"], dev["B"], dev["C"], dev["D"], dev["z"],
             dev["delta_bias"], True, None)
    dout = cupy.asarray(rng.standard_normal((Bt, Dc, L)).astype(f32))
    stream = cupy.cuda.get_current_stream()

    # correctness on a few channels (the reference is a sequential loop)
    out, last, saved = scan.scan_forward(*fargs)
    grads = scan.scan_backward(dout, None, *fargs, saved)
    worst = 0.0
    for b, d in [(0, 0), (Bt - 1, Dc - 1), (Bt // 2, Dc // 3)]:
        ch = slice(d, d + 1)
        sub = dict(u=host["u"][b:b + 1, ch], delta=host["delta"][b:b + 1, ch],
                   A=host["A"][ch], B=host["B"][b:b + 1, 0], C=host["C"][b:b + 1, 0],
                   D=host["D"][ch], z=host["z"][b:b + 1, ch],
                   delta_bias=host["delta_bias"][ch], delta_softplus=True)
        sub64 = {k: (v.astype(np.float64) if isinstance(v, np.ndarray) else v)
                 for k, v in sub.items()}
        rout, _, rback = reference.selective_scan_vjp(**sub64)
        rg = rback(dout[b:b + 1, ch].get().astype(np.float64))
        pairs = [(out[b:b + 1, ch].get(), rout), (grads[0][b:b + 1, ch].get(), rg.du),
                 (grads[1][b:b + 1, ch].get(), rg.ddelta)]
        for got, want in pairs:
            worst = max(worst, float(np.max(np.abs(got - want) / (1e-3 + np.abs(want)))))
    print(f"check vs reference on 3 channels (out, du, ddelta): max rel err {worst:.2e}")

    t_fwd = _time(lambda: scan.scan_forward(*fargs), stream, args.repeat)
    t_bwd = _time(lambda: scan.scan_backward(dout, None, *fargs, saved), stream,
                  args.repeat)
    print(f"Bt {Bt}, Dc {Dc}, N {N}, L {L}, float32, B/C variable, z, D, delta_bias, "
          f"softplus; {args.repeat} runs after 3 warm-up")
    print(f"forward : median {t_fwd[0]:.3f} ms (min {t_fwd[1]:.3f})")
    print(f"backward: median {t_bwd[0]:.3f} ms (min {t_bwd[1]:.3f})")

    if args.sweep:
        _sweep(scan, dev, dout, stream, args.repeat)

    print("kernel resources (registers/thread, local bytes/thread, static shared bytes):")
    for dtype, (threads, items) in scan.settings.blocks_tuning.items():
        k = scan_blocks.get_kernels(dtype, threads, items)  # compiled once, cached
        for kind, disp in (("forward", k.forward), ("backward", k.backward)):
            print(f"  {kind:8s} {dtype.name} threads {threads} items {items}: "
                  f"regs {_per_kernel(disp.get_regs_per_thread())}, "
                  f"local {_per_kernel(disp.get_local_mem_per_thread())}, "
                  f"shared {_per_kernel(disp.get_shared_mem_per_block())}")


def _sweep(scan, dev, dout, stream, repeat):
    """Time splits of the chunk and kinds of B/C (what the atomics cost)."""
    import cupy

    from numba_mamba.cuda_kernels import scan_blocks

    Bt, Dc, L = dev["u"].shape
    N = dev["A"].shape[1]
    kinds = {
        "B/C variable, G=1 (atomics over Dc)": (dev["B"], dev["C"]),
        "B/C grouped, G=Dc (plain stores)": (
            cupy.broadcast_to(dev["B"], (Bt, Dc, N, L)).copy(),
            cupy.broadcast_to(dev["C"], (Bt, Dc, N, L)).copy()),
        "B/C constant": (dev["B"][0, 0, :, :1].T.repeat(Dc, 0).copy(),
                         dev["C"][0, 0, :, :1].T.repeat(Dc, 0).copy()),
    }
    for label, (B, C) in kinds.items():
        fargs = (dev["u"], dev["delta"], dev["A"], B, C, dev["D"], dev["z"],
                 dev["delta_bias"], True, None)
        for threads, items in [(128, 16), (256, 8), (512, 4)]:
            fwd = _time(lambda: scan.scan_forward(*fargs, threads=threads, items=items),
                        stream, repeat)
            saved = scan.scan_forward(*fargs, threads=threads, items=items)[2]
            bwd = _time(lambda: scan.scan_backward(dout, None, *fargs, saved), stream, repeat)
            print(f"  {label:38s} threads {threads:3d} items {items:2d}: "
                  f"forward {fwd[0]:.3f} ms, backward {bwd[0]:.3f} ms")
        for threads, items in [(128, 16), (256, 8), (512, 4)]:
            k = scan_blocks.get_kernels(np.float32, threads, items).backward
            print(f"    backward threads {threads} items {items}: regs "
                  f"{_per_kernel(k.get_regs_per_thread())}, local "
                  f"{_per_kernel(k.get_local_mem_per_thread())}")


if __name__ == "__main__":
    main()
