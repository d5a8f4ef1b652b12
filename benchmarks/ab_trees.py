"""Time the state engine through the API in one source tree, for A/B runs.

Prints one line: for each row of ``bench_scan.ROWS``, the per-call ms of 20
training forwards, of 20 ``selective_scan`` calls (forward only) and of 20
backwards, issued back to back (``bench_scan.back_to_back_ms`` and
``forward_only_ms``), with the ratio to the reference.  Run it alternately on
two trees (a checkout of each commit) in one session, so that both see the
same machine::

    python benchmarks/ab_trees.py /tmp/before before
    python benchmarks/ab_trees.py . after

The tree's ``numba_mamba`` and its kernels (``numba_mamba.cuda_kernels``) are
imported ahead of any installed copy (checked).
"""

import os
import sys


def main():
    tree, label = os.path.abspath(sys.argv[1]), sys.argv[2]
    sys.path[:0] = [tree, os.path.join(tree, "benchmarks")]
    import cupy
    import bench_scan
    import numba_mamba

    import numba_mamba.cuda_kernels as kernels

    for module in (numba_mamba, kernels):
        if not module.__file__.startswith(tree):
            raise SystemExit(f"{module.__name__} imported from {module.__file__}, not from {tree}")
    res = []
    for (Bt, Dc, N, L, name), ref_fwd, ref_bwd in bench_scan.ROWS:
        dt = bench_scan._bf16(cupy) if name == "bfloat16" else cupy.dtype(name)
        fwd, bwd = bench_scan.back_to_back_ms(cupy, Bt, Dc, N, L, dt, 20)
        fwd_only = bench_scan.forward_only_ms(cupy, Bt, Dc, N, L, dt, 20)[0]
        res.append(f"{(Bt, Dc, N, L)} {name}: fwd {fwd:.3f} ({fwd / ref_fwd:.2f}) "
                   f"fwd-only {fwd_only:.3f} bwd {bwd:.3f} ({bwd / ref_bwd:.2f})")
    print(label, *res, sep="\n  ", flush=True)


if __name__ == "__main__":
    main()
