"""Benchmark the PyTorch adapter (numba_mamba.torch) against this library's scan called directly.

On one CUDA GPU, forward + backward, CUDA-event medians of ``--reps`` runs after
warm-up, for each shape of ``--shapes`` (``d_model:batch:length``):

- scan alone, on the shapes of the block's scan (``d_inner = 2 d_model``,
  ``N = 16``, variable B and C, D, z, delta_bias, softplus):
  ``nm.selective_scan_vjp`` on CuPy arrays (no torch); ``selective_scan_fn``
  eagerly (the adapter's ``autograd.Function``); the custom op
  ``torch.ops.numba_mamba.selective_scan`` with its registered backward
  (which reruns the forward's chunk states); and a ``torch.compile``-d
  function around ``selective_scan_fn`` (the op inside the graph).
- the Mamba block: :class:`numba_mamba.torch.Mamba` (the adapter), and the
  same block with the same weights where the scan is called through a bare
  ``autograd.Function`` around ``nm.selective_scan_vjp`` (no validation of
  tensors, no stream or dtype handling: ``bench_block.torch_scan_function``).

The differences are the adapter's overhead.  Also printed: the largest
difference between the two blocks' outputs.

Run:  python benchmarks/bench_torch.py [--reps 20] [--shapes 768:8:2048,256:1:256]
      [--dtype float32|bfloat16] [--no-compile] [--device cuda|cpu]
"""

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import numba_mamba as nm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_block import _time as bench_block_time  # noqa: E402
from bench_block import torch_block, torch_scan_function  # noqa: E402


def _time(torch, fn, reps, warmup=3):
    """Median ms of ``fn``: CUDA events (bench_block's timer: torch and CuPy share
    the default stream), or the wall clock in a --device cpu dry run."""
    if torch.cuda.is_available():
        import cupy

        return bench_block_time(cupy, fn, reps, warmup)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _scan_rows(torch, xp, nt, d_model, batch, length, dtype, reps, compile_, device):
    di, N = 2 * d_model, 16
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device=device, generator=g).to(dtype)

    u, z, dout = randn(batch, di, length), randn(batch, di, length), randn(batch, di, length)
    delta = randn(batch, di, length) * 0.5 - 1
    BC = randn(batch, 2 * N, length)
    B, C = BC[:, :N], BC[:, N:]
    A = -torch.rand(di, N, device=device, generator=g) - 0.5
    D, bias = torch.ones(di, device=device), torch.rand(di, device=device, generator=g) - 4
    arrays = [xp.from_dlpack(t) for t in (u, delta, A, B, C, D, z, bias, dout)]

    def direct():
        *args, dy = arrays
        _, _, backward = nm.selective_scan_vjp(*args[:5], D=args[5], z=args[6],
                                               delta_bias=args[7], delta_softplus=True)
        backward(dy)

    leaves = [t.detach().clone().requires_grad_(True) for t in (u, delta, A, B, C, D, z, bias)]

    def eager():
        for t in leaves:
            t.grad = None
        out = nt.selective_scan_fn(*leaves[:5], D=leaves[5], z=leaves[6],
                                   delta_bias=leaves[7], delta_softplus=True)
        out.backward(dout)

    op = torch.ops.numba_mamba.selective_scan

    def custom_op():
        for t in leaves:
            t.grad = None
        out, _ = op(*leaves, None, True)
        out.backward(dout)

    rows = [("scan: nm.selective_scan_vjp, no torch", _time(torch, direct, reps)),
            ("scan: selective_scan_fn (eager)", _time(torch, eager, reps)),
            ("scan: custom op (backward recomputes)", _time(torch, custom_op, reps))]
    if compile_:
        def f(*a):
            return nt.selective_scan_fn(*a[:5], D=a[5], z=a[6], delta_bias=a[7],
                                        delta_softplus=True)

        compiled = torch.compile(f, fullgraph=True)

        def comp():
            for t in leaves:
                t.grad = None
            compiled(*leaves).backward(dout)

        rows.append(("scan: torch.compile(selective_scan_fn)", _time(torch, comp, reps)))
    return rows


def _block_rows(torch, xp, nt, d_model, batch, length, dtype, reps, device):
    torch.manual_seed(0)
    block = nt.Mamba(d_model, d_state=16, device=device, dtype=dtype)
    x = torch.randn(batch, length, d_model, device=device, dtype=dtype, requires_grad=True)
    dout = torch.randn_like(x)
    scan = torch_scan_function(torch, xp)  # (NumPy's from_dlpack serves on the CPU)
    p = {k: (v[:, 0, :] if k == "conv1d.weight" else v) for k, v in block.named_parameters()}

    def adapter():
        block.zero_grad(set_to_none=True)
        x.grad = None
        block(x).backward(dout)

    def direct():
        block.zero_grad(set_to_none=True)
        x.grad = None
        torch_block(torch, scan, x, p).backward(dout)

    with torch.no_grad():
        diff = float((block(x) - torch_block(torch, scan, x, p)).abs().max())
    return [("block: numba_mamba.torch.Mamba", _time(torch, adapter, reps)),
            ("block: same, bare autograd.Function scan", _time(torch, direct, reps))], diff


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="768:8:2048,256:1:256",
                        help="d_model:batch:length, comma separated")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: a dry run of the script (wall-clock times)")
    args = parser.parse_args()

    import torch

    import numba_mamba.torch as nt

    if args.device == "cuda":
        import cupy as xp
        name = torch.cuda.get_device_name()
    else:
        xp, name = np, "CPU"
        torch.cuda.is_available = lambda: False  # (the timer's switch)
    dtype = getattr(torch, args.dtype)
    print(f"# numba_mamba.torch adapter, forward+backward, {name}, {datetime.date.today()}, "
          f"torch {torch.__version__}, {args.dtype}; median of {args.reps} runs, ms")
    print(f"| {'shape (d_model, batch, L)':26s} | {'what':42s} | {'ms':>8s} |")
    print(f"|{'-' * 28}|{'-' * 44}|{'-' * 10}|")
    for spec in args.shapes.split(","):
        d_model, batch, length = map(int, spec.split(":"))
        rows = _scan_rows(torch, xp, nt, d_model, batch, length, dtype, args.reps,
                          not args.no_compile, args.device)
        block_rows, diff = _block_rows(torch, xp, nt, d_model, batch, length, dtype,
                                       args.reps, args.device)
        for label, t in rows + block_rows:
            print(f"| {f'{d_model}, {batch}, {length}':26s} | {label:42s} | {t:8.3f} |")
        print(f"#   {spec}: max |Mamba - bare block| = {diff:.3g}; adapter overhead "
              f"{rows[1][1] - rows[0][1]:+.3f} ms (scan), "
              f"{block_rows[0][1] - block_rows[1][1]:+.3f} ms (block)")


if __name__ == "__main__":
    main()
