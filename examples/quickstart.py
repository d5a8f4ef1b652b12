"""Quickstart: filter a noisy signal with the selective scan and check it against SciPy.

A state space model with constant time step, B and C is a bank of first-order
IIR filters, one per state; each state n is

    h_n = scipy.signal.lfilter([dt * B_n], [1, -exp(dt * A_n)], u)

and the output is y = sum_n C_n h_n.  This script builds such a smoothing
filter, runs it through ``numba_mamba.selective_scan`` on the CPU (NumPy) or
the GPU (CuPy), and compares with ``scipy.signal.lfilter``.  Then it makes the
filter *selective*: the time step grows where the signal jumps, so the filter
follows edges and smooths flat parts, and checks that against the float64
reference.

Run:  python examples/quickstart.py [--device cpu|gpu|auto] [--length 100000]
"""

import argparse
import time

import numpy as np
from scipy import signal

import numba_mamba as nm


def pick_device(name):
    if name in ("gpu", "auto"):
        try:
            import cupy
            if cupy.cuda.runtime.getDeviceCount() > 0:
                return "gpu", cupy
        except Exception as exc:  # no CuPy, or no GPU
            if name == "gpu":
                raise SystemExit(f"--device gpu: no usable CuPy GPU ({exc})")
    return "cpu", np


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "gpu", "auto"], default="auto")
    parser.add_argument("--length", type=int, default=100_000, help="samples per channel")
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    device, xp = pick_device(args.device)
    rng = np.random.default_rng(args.seed)

    # A piecewise-constant signal with noise, one per channel: (batch 1, channels, length).
    L, Dc, N = args.length, args.channels, 4
    steps = np.repeat(rng.standard_normal((Dc, L // 1000 + 1)), 1000, axis=1)[:, :L]
    clean = steps[None]
    u = clean + 0.3 * rng.standard_normal((1, Dc, L))

    # Smoothing filter bank: poles at several time constants, B = 1, C averaging the states.
    dt = 1.0
    A = -np.tile(np.array([0.01, 0.02, 0.05, 0.1]), (Dc, 1))  # (Dc, N)
    B = np.ones((Dc, N))
    # state n has DC gain dt*B_n / (1 - exp(dt*A_n)); C averages the states at unit gain
    C = (1 - np.exp(dt * A)) / (N * dt * B)

    delta = np.full((1, Dc, L), dt)
    t0 = time.perf_counter()
    y = nm.selective_scan(xp.asarray(u), xp.asarray(delta), xp.asarray(A), xp.asarray(B),
                          xp.asarray(C))
    y = y.get() if device == "gpu" else y
    t_scan = time.perf_counter() - t0

    t0 = time.perf_counter()
    y_scipy = np.zeros_like(u)
    for n in range(N):
        for d in range(Dc):
            h = signal.lfilter([dt * B[d, n]], [1.0, -np.exp(dt * A[d, n])], u[0, d])
            y_scipy[0, d] += C[d, n] * h
    t_scipy = time.perf_counter() - t0
    err_lti = np.max(np.abs(y - y_scipy))

    # Selective: the step grows where a causal edge detector fires (the difference of two
    # adjacent moving averages), so the filter follows jumps and smooths flat parts.
    w = 20
    c = np.cumsum(u, axis=-1)
    mean = (c - np.concatenate([np.zeros((1, Dc, w)), c[..., :-w]], axis=-1)) / w
    edge = np.abs(mean - np.concatenate([mean[..., :w], mean[..., :-w]], axis=-1))
    delta_sel = dt * (1.0 + 200.0 * edge ** 2)
    # With a varying step, B_t = (1 - exp(delta_t A)) / delta_t keeps each state at unit DC
    # gain (the exact zero-order-hold input term); one group per channel, shape (1, Dc, N, L).
    B_sel = (1.0 - np.exp(delta_sel[:, :, None, :] * A[None, :, :, None])) / delta_sel[:, :, None, :]
    C_sel = np.full((Dc, N), 1.0 / N)
    y_sel = nm.selective_scan(xp.asarray(u), xp.asarray(delta_sel), xp.asarray(A),
                              xp.asarray(B_sel), xp.asarray(C_sel))
    y_sel = y_sel.get() if device == "gpu" else y_sel
    check = slice(0, min(L, 20_000))  # the float64 reference is a Python loop over time
    y_ref = nm.reference.selective_scan(u[..., check], delta_sel[..., check], A,
                                        B_sel[..., check], C_sel)
    err_sel = np.max(np.abs(y_sel[..., check] - y_ref))

    rms = lambda e: float(np.sqrt(np.mean(e ** 2)))  # noqa: E731
    print(f"device: {device}; signal: {Dc} channels x {L} samples, {N} states")
    print(f"{'quantity':<44}{'value':>12}")
    print(f"{'rms error of the noisy input':<44}{rms(u - clean):>12.4f}")
    print(f"{'rms error, LTI filter':<44}{rms(y - clean):>12.4f}")
    print(f"{'rms error, selective filter':<44}{rms(y_sel - clean):>12.4f}")
    print(f"{'max |scan - scipy.signal.lfilter| (LTI)':<44}{err_lti:>12.2e}")
    print(f"{'max |scan - float64 reference| (selective)':<44}{err_sel:>12.2e}")
    print(f"{'selective_scan time incl. compile (s)':<44}{t_scan:>12.3f}")
    print(f"{'lfilter loop time (s)':<44}{t_scipy:>12.3f}")
    ok = err_lti < 1e-9 and err_sel < 1e-9  # float64 on either device
    print("agreement with scipy and the reference:", "OK" if ok else "FAILED")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
