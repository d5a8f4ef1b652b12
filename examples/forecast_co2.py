"""Forecast Mauna Loa CO2 48 months ahead with Mamba, against seasonal naive, Holt-Winters, SARIMA.

Data: statsmodels' ``co2`` (weekly, March 1958 - December 2001, ships with
statsmodels), resampled to monthly means (``resample("MS").mean()``), the
five empty months filled by linear interpolation: 526 months.  The last 48
months (1998-01 .. 2001-12) are held out and forecast in one go (h = 48);
scores are MAE, RMSE, MASE with seasonal period 12 (scale: in-sample mean
absolute error of the seasonal naive forecast on the training months) and
sMAPE.

The Mamba forecaster normalises each input window by its own mean and
standard deviation (instance normalisation), so the level of the trend is
taken from the window; its stopping step is picked on the last 15 % of the
training months.

Run:  python examples/forecast_co2.py [--quick] [--device cpu|gpu] [--seed 0]
      [--members 3] [--out co2_forecast.png]
"""

import argparse
import os
import time
import warnings


from numba_mamba.timeseries import MambaForecaster, seasonal_naive

from forecast_sunspots import pick_xp, table, to_host


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="one member (about a minute on 2 cores)")
    ap.add_argument("--members", type=int, default=3, help="ensemble size (seeds)")
    ap.add_argument("--lookback", type=int, default=96)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "co2_forecast.png"))
    args = ap.parse_args()
    import statsmodels.api as sm
    from statsmodels.tsa.holtwinters import ExponentialSmoothing
    from statsmodels.tsa.statespace.sarimax import SARIMAX

    xp = pick_xp(args.device)
    monthly = sm.datasets.co2.load_pandas().data["co2"].resample("MS").mean().interpolate()
    y, dates = monthly.to_numpy(), monthly.index
    h = 48
    train, test = y[:-h], y[-h:]

    rows = [("seasonal naive (m=12)", seasonal_naive(train, h, m=12))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # statsmodels' convergence chatter
        hw = ExponentialSmoothing(train, trend="add", seasonal="add", seasonal_periods=12).fit()
        rows.append(("Holt-Winters (add, add)", hw.forecast(h)))
        sarima = SARIMAX(train, order=(1, 1, 1), seasonal_order=(0, 1, 1, 12)).fit(disp=False)
        rows.append(("SARIMA(1,1,1)(0,1,1,12)", sarima.forecast(h)))

    members = 1 if args.quick else args.members
    t0 = time.perf_counter()
    f = MambaForecaster(lookback=args.lookback, horizon=h, d_model=16, n_layers=2, d_state=16,
                        dt_min=0.01, dt_max=1.0, instance_norm=True, steps=args.steps, lr=2e-3,
                        val_fraction=0.15, patience=100, n_members=members, seed=args.seed,
                        progress=False)
    f.fit(xp.asarray(train))
    fc = to_host(f.predict(h))
    secs = time.perf_counter() - t0
    print(f"validation MSE (scaled units) per member "
          f"{[round(m['best_val'], 4) for m in f.history_]}, stopping steps "
          f"{[m['best_step'] for m in f.history_]}")
    rows.append((f"Mamba (lookback {args.lookback}, x{members})", fc))

    print(f"\nCO2 monthly, train {dates[0]:%Y-%m} .. {dates[-h - 1]:%Y-%m} ({len(train)} months), "
          f"test {dates[-h]:%Y-%m} .. {dates[-1]:%Y-%m} (h = {h}); MASE scale: seasonal naive m = 12")
    print(table(rows, test, train, 12))
    print(f"Mamba: {secs:.1f} s on {args.device} (fit + predict)")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(10, 4))
    show = slice(len(y) - 12 * 12, len(y) - h)
    ax.plot(dates[show], y[show], color="0.4", label="history")
    ax.plot(dates[-h:], test, color="k", lw=2, label="truth")
    for (name, fcst), style in zip(rows, [":", "--", "-.", "-"]):
        ax.plot(dates[-h:], fcst, style, label=name)
    ax.set_xlabel("month")
    ax.set_ylabel("CO2 (ppm)")
    ax.set_title("Mauna Loa CO2: 48-month forecast")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
