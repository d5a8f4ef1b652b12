"""Forecast an irregularly sampled Van der Pol oscillator: the time step as the SSM's step.

The system ``x'' - mu (1 - x^2) x' + x = 0`` (mu = 1, a limit cycle of
period about 6.7) is integrated with ``scipy.integrate.solve_ivp`` and
observed, with small noise, at irregular times.  Both coordinates (x, x')
are forecast at the next ``H = 5`` sample times, known in advance (as for a
scheduled measurement).

Training: one trajectory with gaps drawn uniformly in [0.05, 0.65] time
units (the forecaster holds out the end of it for early stopping).  Tests,
forecasting from every 3rd sample with the true history up to it:

* ``same``: the last 20 % of the training trajectory's samples (not trained
  on), gaps U[0.05, 0.65] as in training;
* ``dense``: a new trajectory sampled about 3x as often, gaps U[0.02, 0.22];
* ``sparse``: a new trajectory sampled about 2x less often, gaps U[0.3, 1.0]
  (gaps up to 1.5x the largest seen in training).

Three fits of the same forecaster (same size, seed, steps):

* ignoring the times: ``fit(y)`` (what a regular-grid forecasting library does);
* times as inputs only: ``fit(y, t)`` with ``time_as="feature"`` (the gap
  before each sample and the offsets of the query times are input channels;
  the scan's step is not touched);
* times as the SSM's step: ``fit(y, t)`` with ``time_as="delta"`` (the same
  inputs, and each block's selective step is a learned multiple of the gap,
  so the state decays over the real time elapsed).

Each is repeated over seeds (data and initialisation); the table gives the
mean MAE over seeds and, for the two timed variants, on how many seeds
"delta" beat "feature".  A last-value forecast is the floor.

Run:  python examples/forecast_irregular.py [--quick] [--device cpu|gpu] [--seeds 3]
      [--out irregular_forecast.png]
"""

import argparse
import os
import time

import numpy as np
from scipy.integrate import solve_ivp

from numba_mamba.timeseries import MambaForecaster, mae

from forecast_sunspots import pick_xp, to_host

REGIMES = {"same": (0.05, 0.65), "dense": (0.02, 0.22), "sparse": (0.3, 1.0)}


def van_der_pol(n, seed, lo=0.05, hi=0.65, mu=1.0, noise=0.02, x0=(2.0, 0.0)):
    rng = np.random.default_rng(seed)
    t = np.concatenate([[0.0], np.cumsum(rng.uniform(lo, hi, n - 1))])
    sol = solve_ivp(lambda _, s: [s[1], mu * (1 - s[0] ** 2) * s[1] - s[0]], (0, t[-1]),
                    list(x0), t_eval=t, rtol=1e-9, atol=1e-9)
    y = sol.y.T + noise * rng.standard_normal((n, 2))
    return t, y


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--seeds", type=int, default=3, help="repetitions (data and init seeds)")
    ap.add_argument("--quick", action="store_true",
                    help="one seed, fewer samples and steps (under a minute)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "irregular_forecast.png"))
    args = ap.parse_args()
    xp = pick_xp(args.device)
    n, steps, seeds = (800, 200, 1) if args.quick else (1500, 400, args.seeds)
    H, lookback, n_test = 5, 32, 300
    variants = [("ignoring the times", None), ("times as inputs only", "feature"),
                ("times as the SSM step", "delta")]
    names = ["last value"] + [f"Mamba, {v}" for v, _ in variants]
    err = {(m, r): [] for m in names for r in REGIMES}
    secs = {m: 0.0 for m in names}
    example = None
    for seed in range(seeds):
        t, y = van_der_pol(n, 10 * seed)
        cut = int(0.8 * n)
        tests = {"same": (t, y, range(cut, n - H + 1, 3))}
        for k, (reg, (lo, hi)) in enumerate(REGIMES.items()):
            if reg != "same":
                tt, yy = van_der_pol(n_test, 10 * seed + k, lo, hi, x0=(0.5, 1.0))
                tests[reg] = (tt, yy, range(lookback, n_test - H + 1, 3))
        for reg, (tt, yy, origins) in tests.items():
            truth = np.stack([yy[o:o + H] for o in origins])
            last = np.stack([np.repeat(yy[o - 1:o], H, axis=0) for o in origins])
            err[("last value", reg)].append(mae(truth, last))
        for (vname, time_as), name in zip(variants, names[1:]):
            t0 = time.perf_counter()
            # one lookback, Mamba alone: the plain model, to isolate what the times bring
            f = MambaForecaster(lookback=lookback, season=1, linear_skip=False,
                                instance_norm=False, refit=False, d_model=16, n_layers=2,
                                d_state=8, dt_min=0.01, dt_max=1.0, steps=steps, lr=3e-3,
                                val_fraction=0.15, patience=100, seed=seed,
                                time_as=time_as or "delta")
            f.fit(xp.asarray(y[:cut]), fh=H,
                  t=None if time_as is None else xp.asarray(t[:cut]))
            for reg, (tt, yy, origins) in tests.items():
                yd, td = xp.asarray(yy), xp.asarray(tt)
                if time_as is None:
                    pred = [f.predict(H, y=yd[:o]) for o in origins]
                else:
                    pred = [f.predict(H, y=yd[:o], t=td[:o], t_future=td[o:o + H])
                            for o in origins]
                pred = np.stack([to_host(p) for p in pred])
                truth = np.stack([yy[o:o + H] for o in origins])
                err[(name, reg)].append(mae(truth, pred))
                if seed == 0 and reg == "sparse":
                    example = example or {"t": tt, "y": yy, "o": origins[len(origins) // 2]}
                    example[name] = pred[len(origins) // 2]
            secs[name] += time.perf_counter() - t0

    print(f"Van der Pol (mu = 1), H = {H}, lookback {lookback}; trained on {int(0.8 * n)} "
          f"samples with gaps U[0.05, 0.65], {steps} steps; mean MAE over {seeds} seed(s)")
    head = "".join(f"{f'{r} U[{lo:g},{hi:g}]':>20}" for r, (lo, hi) in REGIMES.items())
    print(f"{'method':<32}{head}{'fit+predict s':>15}")
    print("-" * (32 + 20 * len(REGIMES) + 15))
    for name in names:
        cells = "".join(f"{np.mean(err[(name, r)]):20.4f}" for r in REGIMES)
        print(f"{name:<32}{cells}{secs[name]:15.1f}")
    if seeds > 1:
        d, fe = names[3], names[2]
        wins = "".join(f"{sum(a < b for a, b in zip(err[(d, r)], err[(fe, r)]))}/{seeds}"
                       .rjust(20) for r in REGIMES)
        print(f"{'seeds where delta < feature':<32}{wins}")
    for name in names[1:]:
        print(f"  {name}: per-seed MAE " + "; ".join(
            f"{r} {np.round(err[(name, r)], 4).tolist()}" for r in REGIMES))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(10, 4))
    t, y, o = example["t"], example["y"], example["o"]
    ax.plot(t[o - lookback:o + H], y[o - lookback:o + H, 0], "k.-", label="observed x")
    for name, marker in zip(names[1:], "^sD"):
        ax.plot(t[o:o + H], example[name][:, 0], marker, ls="--", label=name)
    ax.axvline(t[o - 1], color="0.6", lw=0.8)
    ax.set_xlabel("time")
    ax.set_ylabel("x")
    ax.set_title("Van der Pol sampled sparser than in training (gaps U[0.3, 1.0]): "
                 "5-sample forecast")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
