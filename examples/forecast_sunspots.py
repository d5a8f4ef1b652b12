"""Forecast yearly sunspot numbers 1989-2008 with Mamba, against seasonal naive, AutoReg and ARIMA.

Data: statsmodels' ``sunspots`` (yearly 1700-2008, ships with statsmodels).
Train on 1700-1988 (289 years), forecast the 20 years 1989-2008 in one go
(h = 20) and score with MAE, RMSE, MASE (scale: in-sample mean absolute
error of the naive forecast, m = 1, on the training years) and sMAPE.

The forecaster (``MambaForecaster(linear_skip=True, instance_norm=True)``)
adds two parts: a direct linear autoregression of the next ``h`` years on
the last ``lookback`` years (ridge, closed form, in globally scaled units:
it keeps the amplitude of the cycles), and a small Mamba model that sees
the window normalised by its own mean and spread and learns what the
linear part leaves over.  The Mamba head starts at zero, so training starts
from the linear forecast.

Protocol (the test years are used only for the table):

* the last 15 % of the training years (1946-1988) are a validation split:
  it picks the ridge penalty (from 1e-5, 1e-3, 1e-1, for the linear part
  alone) and each member's stopping step; each member is then refitted on
  all training years for that many steps;
* the lookbacks are fixed in advance at one, two and three solar cycles
  (11, 22, 33 years), and the forecast is the median over lookbacks x seeds
  (an N-BEATS-style ensemble), not a choice among them.

Rows: the linear part alone (same ensemble, no Mamba), Mamba alone (no
linear part; full run only) and the two together.

Run:  python examples/forecast_sunspots.py [--quick] [--device cpu|gpu] [--seed 0]
      [--members 5] [--lookbacks 11,22,33] [--out sunspots_forecast.png]
"""

import argparse
import os
import time
import warnings

import numpy as np

from numba_mamba.timeseries import MambaForecaster, mae, mase, rmse, seasonal_naive, smape

RIDGES = (1e-5, 1e-3, 1e-1)


def pick_xp(device):
    if device == "gpu":
        try:
            import cupy
            if cupy.cuda.runtime.getDeviceCount() > 0:
                return cupy
        except Exception as exc:  # no CuPy, or no GPU
            raise SystemExit(f"--device gpu: no usable CuPy GPU ({exc})")
        raise SystemExit("--device gpu: CuPy sees no GPU")
    return np


def to_host(a):
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.asarray(a)


def table(rows, y_test, y_train, m):
    lines = [f"{'method':<36}{'MAE':>8}{'RMSE':>8}{'MASE':>8}{'sMAPE':>8}",
             "-" * 68]
    for name, f in rows:
        lines.append(f"{name:<36}{mae(y_test, f):8.2f}{rmse(y_test, f):8.2f}"
                     f"{mase(y_test, f, y_train, m):8.3f}{smape(y_test, f):8.1f}")
    return "\n".join(lines)


def pick_ridge(train, h, lookbacks, xp, ridges=RIDGES):
    """Ridge penalty of the linear part with the lowest mean validation MSE over lookbacks."""
    scores = {}
    for r in ridges:
        vals = [MambaForecaster(lb, h, steps=0, linear_skip=True, skip_ridge=r,
                                instance_norm=True, progress=False).fit(xp.asarray(train))
                .history_[0]["best_val"] for lb in lookbacks]
        scores[r] = float(np.mean(vals))
    return min(scores, key=scores.get), scores


def ensemble(train, h, lookbacks, seeds, xp, **kw):
    """Median forecast of one forecaster per (lookback, seed); also the stopping steps."""
    fcs, stops = [], []
    for lb in lookbacks:
        for seed in seeds:
            f = MambaForecaster(lookback=lb, horizon=h, seed=seed, progress=False, **kw)
            f.fit(xp.asarray(train))
            fcs.append(to_host(f.predict(h)))
            stops.append(f.history_[0]["best_step"])
    return np.median(np.stack(fcs), axis=0), stops


# Mamba settings shared by the examples: 2 blocks of width 16, refit after early stopping
MAMBA = dict(d_model=16, n_layers=2, d_state=16, dt_min=0.01, dt_max=1.0, lr=2e-3,
             val_fraction=0.15, patience=100, refit=True, instance_norm=True)


def mamba_rows(rows, train, h, args, xp):
    """Append the forecaster's rows to ``rows``: its linear part alone, Mamba alone (not with
    ``--quick``) and both, each an ensemble over ``--lookbacks`` x seeds (median).

    Returns ``(lookbacks, seeds, seconds)``.
    """
    lookbacks = [int(v) for v in args.lookbacks.split(",")]
    seeds = list(range(args.seed, args.seed + (1 if args.quick else args.members)))
    n = len(lookbacks) * len(seeds)
    t0 = time.perf_counter()
    ridge, scores = pick_ridge(train, h, lookbacks, xp)
    print("ridge penalty of the linear part, mean validation MSE (scaled units): "
          + ", ".join(f"{r:g}: {v:.4f}" for r, v in scores.items()) + f" -> {ridge:g}")
    skip, _ = ensemble(train, h, lookbacks, [args.seed], xp, steps=0, linear_skip=True,
                       skip_ridge=ridge, **MAMBA)
    rows.append((f"linear part alone (x{len(lookbacks)})", skip))
    if not args.quick:
        t1 = time.perf_counter()
        alone, stops = ensemble(train, h, lookbacks, seeds, xp, steps=args.steps, **MAMBA)
        print(f"Mamba alone: stopping steps {stops} ({time.perf_counter() - t1:.1f} s)")
        rows.append((f"Mamba alone (x{n})", alone))
    t1 = time.perf_counter()
    fc, stops = ensemble(train, h, lookbacks, seeds, xp, steps=args.steps, linear_skip=True,
                         skip_ridge=ridge, **MAMBA)
    print(f"Mamba + linear part: stopping steps {stops} ({time.perf_counter() - t1:.1f} s)")
    rows.append((f"Mamba + linear part (x{n})", fc))
    return lookbacks, seeds, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--seed", type=int, default=0, help="first seed")
    ap.add_argument("--quick", action="store_true",
                    help="one seed per lookback, no Mamba-alone row (about 30 s on one core)")
    ap.add_argument("--members", type=int, default=5, help="seeds per lookback")
    ap.add_argument("--lookbacks", default="11,22,33", help="lookbacks of the ensemble")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "sunspots_forecast.png"))
    args = ap.parse_args()
    import statsmodels.api as sm
    from statsmodels.tsa.ar_model import AutoReg
    from statsmodels.tsa.arima.model import ARIMA

    xp = pick_xp(args.device)
    data = sm.datasets.sunspots.load_pandas().data
    years, y = data["YEAR"].to_numpy().astype(int), data["SUNACTIVITY"].to_numpy()
    train, test = y[years <= 1988], y[years > 1988]
    h = len(test)  # 20

    rows = [("seasonal naive (m=11)", seasonal_naive(train, h, m=11))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # statsmodels' convergence chatter
        rows.append(("AutoReg(9)", AutoReg(train, lags=9).fit().forecast(h)))
        rows.append(("ARIMA(9,0,0)", ARIMA(train, order=(9, 0, 0)).fit().forecast(h)))

    lookbacks, seeds, secs = mamba_rows(rows, train, h, args, xp)

    print(f"\nSunspots, train 1700-1988 ({len(train)} years), test 1989-2008 (h = {h}); "
          f"lookbacks {lookbacks}, seeds {seeds}; MASE scale: in-sample naive (m = 1)")
    print(table(rows, test, train, 1))
    print(f"Mamba: {secs:.1f} s on {args.device} (all fits + predictions)")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(10, 4))
    show = years >= 1900
    ax.plot(years[show & (years <= 1988)], y[show & (years <= 1988)], color="0.4",
            label="history")
    ax.plot(years[years > 1988], test, color="k", lw=2, label="truth")
    for (name, fcst), style in zip(rows, [":", "--", "-.", (0, (1, 1)), (0, (5, 1)), "-"]):
        ax.plot(years[years > 1988], fcst, linestyle=style, label=name,
                lw=2 if name.startswith("Mamba +") else 1.2)
    ax.set_xlabel("year")
    ax.set_ylabel("sunspot number")
    ax.set_title("Sunspots: 20-year forecast from 1988")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
