"""Forecast yearly sunspot numbers 1989-2008 with Mamba, against seasonal naive, AutoReg and ARIMA.

Data: statsmodels' ``sunspots`` (yearly 1700-2008, ships with statsmodels).
Train on 1700-1988 (289 years), forecast the 20 years 1989-2008 in one go
(h = 20) and score with MAE, RMSE, MASE (scale: in-sample mean absolute
error of the naive forecast, m = 1, on the training years) and sMAPE.

The Mamba forecaster picks its stopping step on the last 15 % of the
training years (1946-1988); the test years are used only for the table.
With ``--lookbacks`` giving several values, the lookback is also chosen on
that validation split (mean validation MSE over the ensemble members).

Run:  python examples/forecast_sunspots.py [--quick] [--device cpu|gpu] [--seed 0]
      [--members 3] [--lookbacks 40,60,80] [--out sunspots_forecast.png]
"""

import argparse
import os
import time
import warnings

import numpy as np

from numba_mamba.timeseries import MambaForecaster, mae, mase, rmse, seasonal_naive, smape


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
    lines = [f"{'method':<28}{'MAE':>8}{'RMSE':>8}{'MASE':>8}{'sMAPE':>8}",
             "-" * 60]
    for name, f in rows:
        lines.append(f"{name:<28}{mae(y_test, f):8.2f}{rmse(y_test, f):8.2f}"
                     f"{mase(y_test, f, y_train, m):8.3f}{smape(y_test, f):8.1f}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true",
                    help="one member, lookback 60 (about half a minute on 2 CPU cores)")
    ap.add_argument("--members", type=int, default=3, help="ensemble size (seeds)")
    ap.add_argument("--lookbacks", default="40,60,80",
                    help="candidate lookbacks, chosen on the validation split")
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

    members = 1 if args.quick else args.members
    lookbacks = [60] if args.quick else [int(v) for v in args.lookbacks.split(",")]
    t0 = time.perf_counter()
    best = None
    for lb in lookbacks:
        f = MambaForecaster(lookback=lb, horizon=h, d_model=16, n_layers=2, d_state=16,
                            dt_min=0.01, dt_max=1.0, instance_norm=True, steps=args.steps,
                            lr=2e-3, val_fraction=0.15, patience=100, n_members=members,
                            seed=args.seed, progress=False)
        f.fit(xp.asarray(train))
        val = float(np.mean([m["best_val"] for m in f.history_]))
        print(f"lookback {lb:3d}: validation MSE (scaled units) {val:.3f}, stopping steps "
              f"{[m['best_step'] for m in f.history_]}")
        if best is None or val < best[0]:
            best = (val, lb, f)
    _, lb, f = best
    fc = to_host(f.predict(h))
    secs = time.perf_counter() - t0
    rows.append((f"Mamba (lookback {lb}, x{members})", fc))

    print(f"\nSunspots, train 1700-1988 ({len(train)} years), test 1989-2008 (h = {h}); "
          f"MASE scale: in-sample naive (m = 1)")
    print(table(rows, test, train, 1))
    print(f"Mamba: {secs:.1f} s on {args.device} (fit + predict, all lookbacks)")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(10, 4))
    show = years >= 1900
    ax.plot(years[show & (years <= 1988)], y[show & (years <= 1988)], color="0.4",
            label="history")
    ax.plot(years[years > 1988], test, color="k", lw=2, label="truth")
    for (name, fcst), style in zip(rows, [":", "--", "-.", "-"]):
        ax.plot(years[years > 1988], fcst, style, label=name)
    ax.set_xlabel("year")
    ax.set_ylabel("sunspot number")
    ax.set_title("Sunspots: 20-year forecast from 1988")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
