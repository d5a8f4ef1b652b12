"""Forecast an irregularly sampled Van der Pol oscillator: the time step as the SSM's step.

The system ``x'' - mu (1 - x^2) x' + x = 0`` (mu = 1, a limit cycle of
period about 6.7) is integrated with ``scipy.integrate.solve_ivp`` and
observed, with small noise, at irregular times: gaps drawn uniformly in
[0.05, 0.65] time units, so the phase advance between samples varies
13-fold.  Both coordinates (x, x') are forecast at the next ``H = 5``
sample times, known in advance (as for a scheduled measurement).

Three fits of the same forecaster (same size, seed, steps):

* ignoring the times: ``fit(y)`` (what a regular-grid forecasting library does);
* times as inputs only: ``fit(y, t)`` with ``time_as="feature"`` (the gap
  before each sample and the offsets of the query times are input channels;
  the scan's step is not touched);
* times as the SSM's step: ``fit(y, t)`` with ``time_as="delta"`` (the same
  inputs, and each block's selective step is a learned multiple of the gap).

The first 80 % of the samples train (the forecaster holds out the end of that
part for early stopping); forecasts start from every 3rd sample of the last
20 %, from the true history up to that sample.  A last-value forecast is
the floor.

Run:  python examples/forecast_irregular.py [--quick] [--device cpu|gpu] [--seed 0]
      [--out irregular_forecast.png]
"""

import argparse
import os
import time

import numpy as np
from scipy.integrate import solve_ivp

from numba_mamba.timeseries import MambaForecaster, mae, rmse

from forecast_sunspots import pick_xp, to_host


def van_der_pol(n, seed, mu=1.0, noise=0.02):
    rng = np.random.default_rng(seed)
    t = np.concatenate([[0.0], np.cumsum(rng.uniform(0.05, 0.65, n - 1))])
    sol = solve_ivp(lambda _, s: [s[1], mu * (1 - s[0] ** 2) * s[1] - s[0]], (0, t[-1]),
                    [2.0, 0.0], t_eval=t, rtol=1e-9, atol=1e-9)
    y = sol.y.T + noise * rng.standard_normal((n, 2))
    return t, y


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="fewer samples and steps (about a minute)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "irregular_forecast.png"))
    args = ap.parse_args()
    xp = pick_xp(args.device)
    n, steps = (800, 200) if args.quick else (1500, 400)
    H, lookback = 5, 32
    t, y = van_der_pol(n, args.seed)
    cut = int(0.8 * n)
    origins = list(range(cut, n - H + 1, 3))

    variants = [("ignoring the times", None), ("times as inputs only", "feature"),
                ("times as the SSM step", "delta")]
    results, forecasts = [], {}
    truth = np.stack([y[o:o + H] for o in origins])  # (n_origins, H, 2)
    last = np.stack([np.repeat(y[o - 1:o], H, axis=0) for o in origins])
    results.append(("last value", mae(truth, last), rmse(truth, last), 0.0))
    for name, time_as in variants:
        t0 = time.perf_counter()
        f = MambaForecaster(lookback=lookback, horizon=H, d_model=16, n_layers=2, d_state=8,
                            dt_min=0.01, dt_max=1.0, steps=steps, lr=3e-3, val_fraction=0.15,
                            patience=100, seed=args.seed, time_as=time_as or "delta",
                            progress=False)
        yt, tt = xp.asarray(y), xp.asarray(t)
        if time_as is None:
            f.fit(yt[:cut])
            pred = [f.predict(H, y=yt[:o]) for o in origins]
        else:
            f.fit(yt[:cut], t=tt[:cut])
            pred = [f.predict(H, y=yt[:o], t=tt[:o], t_future=tt[o:o + H]) for o in origins]
        pred = np.stack([to_host(p) for p in pred])
        secs = time.perf_counter() - t0
        forecasts[name] = pred
        results.append((f"Mamba, {name}", mae(truth, pred), rmse(truth, pred), secs))

    print(f"Van der Pol (mu = 1), {n} samples at irregular times (gaps U[0.05, 0.65]); "
          f"train {cut}, {len(origins)} forecast origins in the last {n - cut}, H = {H}, "
          f"lookback {lookback}")
    print(f"{'method':<36}{'MAE':>8}{'RMSE':>8}{'fit+predict s':>15}")
    print("-" * 67)
    for name, a, b, s in results:
        print(f"{name:<36}{a:8.4f}{b:8.4f}{s:15.1f}")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(10, 4))
    k = len(origins) // 2
    o = origins[k]
    ax.plot(t[o - lookback:o + H], y[o - lookback:o + H, 0], "k.-", label="observed x")
    for (name, pred), marker in zip(forecasts.items(), "^sD"):
        ax.plot(t[o:o + H], pred[k, :, 0], marker, ls="--", label=f"Mamba, {name}")
    ax.axvline(t[o - 1], color="0.6", lw=0.8)
    ax.set_xlabel("time")
    ax.set_ylabel("x")
    ax.set_title("Irregularly sampled Van der Pol oscillator: 5-sample forecast")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
