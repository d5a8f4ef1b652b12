"""Denoise a signal with an analog Butterworth low-pass written as a diagonal SSM.

An analog filter H(s) = sum_k r_k / (s - p_k) (partial fractions of the
transfer function) *is* a diagonal state space model: A = p_k, B = 1, C = r_k.
Its poles come in complex-conjugate pairs; for a real input the pair's states
are conjugate, so one state per pair with C doubled and the real part of the
output gives the same filter (the S4D convention that ``ssm_filter`` uses for
complex A).  This script

1. designs a 6th-order Butterworth low-pass (``scipy.signal.butter``,
   analog) and turns it into a 3-state complex diagonal SSM;
2. filters a noisy two-tone signal with ``numba_mamba.ssm_filter`` on the CPU
   (NumPy) or the GPU (CuPy), with the scan and the FFT-convolution engines,
   and checks them against scipy: ``lfilter`` per state and ``dlsim`` with the
   mapped system ``dlti(Ab, Bb, C Ab, C Bb, dt)``;
3. streams the same signal through ``SSMFilter`` in blocks;
4. prints a result table and saves a plot of the signal, the filtered output
   and the impulse response (``ssm_kernel`` against ``scipy.signal.dimpulse``
   of the mapped system; scipy's dlsim and dimpulse are real-only, so there
   each complex state is written as a real 2x2 block).

Run:  python examples/filter_signals.py [--device cpu|gpu] [--seed 0] [--out filter_signals.png]
"""

import argparse
import time

import numpy as np
from scipy import signal

import numba_mamba as nm


def pick_device(name):
    if name == "gpu":
        try:
            import cupy
            if cupy.cuda.runtime.getDeviceCount() > 0:
                return cupy
        except Exception as exc:  # no CuPy, or no GPU
            raise SystemExit(f"--device gpu: no usable CuPy GPU ({exc})")
        raise SystemExit("--device gpu: CuPy sees no GPU")
    return np


def butterworth_as_diagonal_ssm(order, cutoff_hz):
    """Poles and residues of an analog Butterworth low-pass, one per conjugate pair."""
    b, a = signal.butter(order, 2 * np.pi * cutoff_hz, analog=True)
    r, p, k = signal.residue(b, a)
    assert len(k) == 0 and order % 2 == 0
    upper = p.imag > 0
    return p[upper], 2 * r[upper]          # A, C (B = 1)


def real_block_form(Ab, Bb, C):
    """The complex diagonal system (real output Re(C h)) as a real one: 2x2 blocks."""
    N = len(Ab)
    Ad = np.zeros((2 * N, 2 * N))
    for n in range(N):
        Ad[2 * n:2 * n + 2, 2 * n:2 * n + 2] = [[Ab[n].real, -Ab[n].imag],
                                                [Ab[n].imag, Ab[n].real]]
    Bd = np.stack([Bb.real, Bb.imag], axis=1).reshape(2 * N, 1)
    Cd = np.stack([C.real, -C.imag], axis=1).reshape(1, 2 * N)
    return Ad, Bd, Cd


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--out", default="filter_signals.png", help="PNG path ('' to skip)")
    args = parser.parse_args()
    xp = pick_device(args.device)
    to_host = (lambda v: v.get()) if xp is not np else (lambda v: v)
    rng = np.random.default_rng(args.seed)

    fs, cutoff = 1000.0, 25.0
    dt = 1.0 / fs
    t = np.arange(int(args.seconds * fs)) * dt
    clean = np.sin(2 * np.pi * 3.0 * t) + 0.5 * np.sin(2 * np.pi * 11.0 * t)
    x = clean + 0.6 * rng.standard_normal(t.shape)

    A, C = butterworth_as_diagonal_ssm(6, cutoff)       # 3 complex states
    B = np.ones_like(A)
    N = len(A)

    dev = [xp.asarray(v) for v in (A, B, C, x)]
    results = {}
    for mode in ("scan", "conv"):
        nm.ssm_filter(*dev, dt=dt, mode=mode)             # compile / warm up
        t0 = time.perf_counter()
        y = to_host(nm.ssm_filter(*dev, dt=dt, mode=mode))
        results[mode] = (y, time.perf_counter() - t0)
    y = results["scan"][0]

    # scipy, two ways: lfilter per (complex) state, and dlsim of the mapped system
    Ab, Bb = nm.discretize(A, B, dt, "zoh")
    t0 = time.perf_counter()
    y_lfilter = sum((C[n] * signal.lfilter([Bb[n]], [1.0, -Ab[n]], x.astype(complex))).real
                    for n in range(N))
    t_lfilter = time.perf_counter() - t0
    # dlsim is real-only: the complex states as real 2x2 blocks, then the mapping
    # of the current-input convention to scipy's: dlti(Ab, Bb, C Ab, C Bb + D)
    Ad, Bd, Cd = real_block_form(Ab, Bb, C)
    mapped = signal.dlti(Ad, Bd, Cd @ Ad, Cd @ Bd, dt=dt)
    _, y_dlsim, _ = signal.dlsim(mapped, x)
    y_dlsim = y_dlsim[:, 0]

    # streaming: blocks of 256 samples, then the last ones one at a time
    f = nm.SSMFilter(*dev[:3], dt=dt)
    blocks = [to_host(f(dev[3][i:i + 256])) for i in range(0, len(x) - 10, 256)]
    stop = sum(len(b) for b in blocks)
    tail = [float(to_host(f.step(dev[3][i]))) for i in range(stop, len(x))]
    y_stream = np.concatenate(blocks + [np.array(tail)])

    # noise left: filter the clean signal too, and compare what the noise adds
    y_clean = to_host(nm.ssm_filter(*dev[:3], xp.asarray(clean), dt=dt))
    rms = lambda e: float(np.sqrt(np.mean(e ** 2)))  # noqa: E731
    K = to_host(nm.ssm_kernel(*dev[:3], dt, 200))
    _, (K_ref,) = signal.dimpulse(mapped, n=200)
    K_ref = K_ref[:, 0]

    print(f"device: {args.device}; {len(x)} samples at {fs:g} Hz; Butterworth order 6, "
          f"cutoff {cutoff:g} Hz as {N} complex diagonal states")
    print(f"{'quantity':<48}{'value':>12}")
    for mode in ("scan", "conv"):
        print(f"{'max |' + mode + ' - scipy lfilter per state|':<48}"
              f"{np.max(np.abs(results[mode][0] - y_lfilter)):>12.2e}")
    print(f"{'max |scan - scipy dlsim (mapped system)|':<48}{np.max(np.abs(y - y_dlsim)):>12.2e}")
    print(f"{'max |streaming - one pass|':<48}{np.max(np.abs(y_stream - y)):>12.2e}")
    print(f"{'max |ssm_kernel - scipy dimpulse|':<48}"
          f"{np.max(np.abs(K - K_ref)):>12.2e}")
    print(f"{'rms noise in the input':<48}{rms(x - clean):>12.4f}")
    print(f"{'rms noise after the filter':<48}{rms(y - y_clean):>12.4f}")
    print(f"{'time scan / conv / lfilter loop (ms)':<48}"
          f"{1e3 * results['scan'][1]:>6.1f} / {1e3 * results['conv'][1]:.1f} / "
          f"{1e3 * t_lfilter:.1f}")
    errs = [np.max(np.abs(results[m][0] - y_lfilter)) for m in ("scan", "conv")]
    errs += [np.max(np.abs(y - y_dlsim)), np.max(np.abs(y_stream - y)),
             np.max(np.abs(K - K_ref))]
    ok = max(errs) < 1e-9 and rms(y - y_clean) < 0.5 * rms(x - clean)
    print("agreement with scipy and noise reduction:", "OK" if ok else "FAILED")

    if args.out:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib is not installed: no plot (pip install matplotlib)")
        else:
            fig, axes = plt.subplots(3, 1, figsize=(9, 8))
            show = t < 1.5
            axes[0].plot(t[show], x[show], lw=0.5, color="0.6", label="noisy input")
            axes[0].plot(t[show], clean[show], lw=1.5, label="clean")
            axes[0].set_title("signal")
            axes[1].plot(t[show], y[show], label="ssm_filter (scan)")
            axes[1].plot(t[show], results["conv"][0][show], "--", label="ssm_filter (conv)")
            axes[1].plot(t[show], y_lfilter[show], ":", label="scipy lfilter per state")
            axes[1].set_title("filtered output")
            tk = np.arange(200) * dt * 1e3
            axes[2].plot(tk, K, label="ssm_kernel")
            axes[2].plot(tk, K_ref, ":", label="scipy dimpulse (mapped system)")
            axes[2].set_title("impulse response")
            axes[2].set_xlabel("time (ms)")
            axes[0].set_xlabel("time (s)")
            axes[1].set_xlabel("time (s)")
            for ax in axes:
                ax.legend(loc="upper right", fontsize=8)
            fig.tight_layout()
            fig.savefig(args.out, dpi=110)
            print(f"plot saved to {args.out}")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
