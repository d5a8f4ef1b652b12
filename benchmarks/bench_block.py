"""Benchmark one Mamba block, forward + backward, against the same block written in PyTorch.

Both run in the same process on the same GPU with the same weights and input
(d_model 768, batch 8, L 2048, float32 by default; d_inner 1536, N 16):

- ``numba-mamba``: :func:`numba_mamba.models.mamba_block_forward` /
  :func:`~numba_mamba.models.mamba_block_backward` on CuPy arrays (CuPy matmuls,
  Numba CUDA conv1d and scan kernels, hand-written backward).
- ``torch + our scan``: the block from ``torch.nn.functional`` (linear layers as
  matmuls, ``F.conv1d`` with ``groups=d_inner``, ``F.silu``), autograd for the
  backward, calling this library's scan through DLPack inside a
  ``torch.autograd.Function`` (what a PyTorch user of numba-mamba would write).

Also reported: the time of the scan alone (forward + backward on the block's
shapes), its share of the block, and the ratio of the two blocks.  Times are
CUDA-event medians of ``--reps`` runs after warm-up.  Goal: numba-mamba within
1.2x of the PyTorch block.

Run:  python benchmarks/bench_block.py [--reps 20] [--d-model 768 --batch 8 --length 2048]
      [--dtype float32|float64] [--no-torch]
"""

import argparse
import datetime
import statistics

import numpy as np

import numba_mamba as nm
from numba_mamba import models


def _time(cupy, fn, reps, warmup=3):
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    for _ in range(warmup):
        fn()
    cupy.cuda.get_current_stream().synchronize()
    times = []
    for _ in range(reps):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop))
    return statistics.median(times)


def torch_scan_function(torch, cupy):
    """``torch.autograd.Function`` around ``nm.selective_scan_vjp`` (tensors shared by DLPack)."""

    def cp(t):
        return cupy.from_dlpack(t.detach().contiguous())

    class Scan(torch.autograd.Function):
        @staticmethod
        def forward(ctx, u, delta, A, B, C, D, z, delta_bias):
            out, _, backward = nm.selective_scan_vjp(
                cp(u), cp(delta), cp(A), cp(B), cp(C), D=cp(D), z=cp(z),
                delta_bias=cp(delta_bias), delta_softplus=True)
            ctx.backward_fn = backward
            return torch.from_dlpack(out)

        @staticmethod
        def backward(ctx, dout):
            g = ctx.backward_fn(cp(dout))
            return tuple(torch.from_dlpack(x) for x in
                         (g.du, g.ddelta, g.dA, g.dB, g.dC, g.dD, g.dz, g.ddelta_bias))

    return Scan.apply


def torch_block(torch, scan, u, p):
    """The Mamba block in PyTorch (layout as the reference: (b, l, d) outside, (b, d, l) inside)."""
    F = torch.nn.functional
    di = p["in_proj.weight"].shape[0] // 2
    W = p["conv1d.weight"].shape[1]
    R = p["dt_proj.weight"].shape[1]
    N = p["A_log"].shape[1]
    L = u.shape[1]
    xz = F.linear(u, p["in_proj.weight"]).transpose(1, 2)  # (b, 2di, l)
    x, z = xz[:, :di], xz[:, di:]
    x = F.silu(F.conv1d(x, p["conv1d.weight"][:, None, :], p["conv1d.bias"], padding=W - 1,
                        groups=di)[..., :L])
    x_dbl = F.linear(x.transpose(1, 2), p["x_proj.weight"])  # (b, l, R + 2N)
    dt = F.linear(x_dbl[..., :R], p["dt_proj.weight"]).transpose(1, 2)  # (b, di, l)
    B = x_dbl[..., R:R + N].transpose(1, 2)
    C = x_dbl[..., R + N:].transpose(1, 2)
    y = scan(x.contiguous(), dt.contiguous(), -torch.exp(p["A_log"]), B.contiguous(),
             C.contiguous(), p["D"], z.contiguous(), p["dt_proj.bias"])
    return F.linear(y.transpose(1, 2), p["out_proj.weight"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--d-state", type=int, default=16)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args()

    import cupy

    dtype = np.dtype(args.dtype)
    cfg = models.MambaConfig(d_model=args.d_model, n_layers=1, vocab_size=8,
                             d_state=args.d_state)
    p = models.layer_params(models.init_params(cfg, seed=0, dtype=dtype, xp=cupy), 0)
    rng = cupy.random.default_rng(0)
    u = rng.standard_normal((args.batch, args.length, args.d_model), dtype=cupy.float32) \
        .astype(dtype)
    dout = rng.standard_normal(u.shape, dtype=cupy.float32).astype(dtype)

    def ours():
        out, cache = models.mamba_block_forward(u, p)
        models.mamba_block_backward(dout, cache)

    # the scan alone, on the block's shapes and values
    _, cache = models.mamba_block_forward(u, p)
    di, N, R = cfg.d_inner, cfg.d_state, cfg.rank
    xc = cache.conv.x  # stand-ins of the block's scan inputs (same shapes and layout)
    x_dbl = cupy.ascontiguousarray(rng.standard_normal((args.batch, R + 2 * N, args.length),
                                                       dtype=cupy.float32).astype(dtype))
    dt = rng.standard_normal(xc.shape, dtype=cupy.float32).astype(dtype) * 0.5 - 1
    z = rng.standard_normal(xc.shape, dtype=cupy.float32).astype(dtype)
    dy = rng.standard_normal(xc.shape, dtype=cupy.float32).astype(dtype)

    def scan_only():
        out, _, backward = nm.selective_scan_vjp(
            xc, dt, cache.A, x_dbl[:, R:R + N], x_dbl[:, R + N:], D=p["D"], z=z,
            delta_bias=p["dt_proj.bias"], delta_softplus=True)
        backward(dy)

    t_ours = _time(cupy, ours, args.reps)
    t_scan = _time(cupy, scan_only, args.reps)
    rows = [("numba-mamba block (fwd+bwd)", t_ours), ("  of which scan (fwd+bwd)", t_scan)]
    t_torch = None
    if not args.no_torch:
        import torch

        scan = torch_scan_function(torch, cupy)
        tp = {k: torch.from_dlpack(v).clone().requires_grad_(True) for k, v in p.items()}
        tu = torch.from_dlpack(u).clone().requires_grad_(True)
        tdout = torch.from_dlpack(dout)

        def theirs():
            for v in tp.values():
                v.grad = None
            tu.grad = None
            torch_block(torch, scan, tu, tp).backward(tdout)

        out_ours, _ = models.mamba_block_forward(u, p)
        out_torch = torch_block(torch, scan, tu, tp).detach()
        diff = float(cupy.abs(out_ours - cupy.from_dlpack(out_torch)).max())
        t_torch = _time(cupy, theirs, args.reps)
        rows.append(("torch block + our scan (fwd+bwd)", t_torch))

    name = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    print(f"# Mamba block forward+backward, {name}, {datetime.date.today()}")
    print(f"# d_model {args.d_model} (d_inner {di}, N {N}, dt_rank {R}), batch {args.batch}, "
          f"L {args.length}, {args.dtype}; median of {args.reps} runs")
    print(f"| {'what':36s} | {'ms':>8s} |")
    print(f"|{'-' * 38}|{'-' * 10}|")
    for label, t in rows:
        print(f"| {label:36s} | {t:8.3f} |")
    print(f"scan share of the numba-mamba block: {t_scan / t_ours:.1%}")
    if t_torch is not None:
        print(f"max |out_ours - out_torch| = {diff:.3g}")
        ratio = t_ours / t_torch
        print(f"numba-mamba / torch block: {ratio:.3f}x  (goal <= 1.2x: "
              f"{'met' if ratio <= 1.2 else 'NOT met'})")


if __name__ == "__main__":
    main()
