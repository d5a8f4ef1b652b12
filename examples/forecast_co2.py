"""Forecast Mauna Loa CO2 48 months ahead with Mamba, against seasonal naive, Holt-Winters, SARIMA.

Data: statsmodels' ``co2`` (weekly, March 1958 - December 2001, ships with
statsmodels), resampled to monthly means (``resample("MS").mean()``), the
five empty months filled by linear interpolation: 526 months.  The last 48
months (1998-01 .. 2001-12) are held out and forecast in one go (h = 48);
scores are MAE, RMSE, MASE with seasonal period 12 (scale: in-sample mean
absolute error of the seasonal naive forecast on the training months) and
sMAPE.

Baselines: seasonal naive; SARIMA(1,1,1)(0,1,1,12); Holt-Winters as an
ETS model (``statsmodels.tsa.exponential_smoothing.ets.ETSModel``) with
additive errors and additive trend, the seasonality (additive or
multiplicative) and trend damping chosen by AIC on the training months;
and, for reference, ``ExponentialSmoothing(trend="add", seasonal="add")``
with statsmodels' default fit.

The forecaster is the library's default, ``MambaForecaster(season=12)``
fitted with ``fit(train, fh=48)`` (see ``forecast_sunspots.py``): a
linear autoregression of the next 48 months on the AIC's number of lags
plus a small Mamba model on the instance-normalised window that learns the
remainder; lookbacks of one, two and three years (12, 24, 36), median over
lookbacks x seeds; the ridge penalty and each member's stopping step are
chosen on the last 15 % of the training months, then each member is
refitted on all of them.

Run:  python examples/forecast_co2.py [--quick] [--device cpu|gpu] [--seed 0]
      [--members 3] [--out co2_forecast.png]
"""

import argparse
import os
import warnings

import numpy as np

from numba_mamba.timeseries import seasonal_naive

from forecast_sunspots import mamba_rows, pick_xp, table


def holt_winters(train, h):
    """ETS(A, A[d], A or M) with the lowest AIC; returns (forecast, label, AICs)."""
    from statsmodels.tsa.exponential_smoothing.ets import ETSModel
    fits = {}
    for seasonal in ("add", "mul"):
        for damped in (False, True):
            fits[(seasonal, damped)] = ETSModel(train, error="add", trend="add",
                                                seasonal=seasonal, seasonal_periods=12,
                                                damped_trend=damped).fit(disp=False)
    (seasonal, damped), best = min(fits.items(), key=lambda kv: kv[1].aic)
    label = f"Holt-Winters ETS(A,A{'d' if damped else ''},{seasonal[0].upper()})"
    aics = {f"{s}{', damped' if d else ''}": round(float(r.aic), 1)
            for (s, d), r in fits.items()}
    return np.asarray(best.forecast(h)), label, aics


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--seed", type=int, default=0, help="first seed")
    ap.add_argument("--quick", action="store_true",
                    help="one seed per lookback, no Mamba-alone row (under a minute on one core)")
    ap.add_argument("--members", type=int, default=3, help="seeds per lookback")
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
        rows.append(("ExponentialSmoothing(add, add)", hw.forecast(h)))
        ets, label, aics = holt_winters(train, h)
        print(f"Holt-Winters AIC on the training months {aics} -> {label}")
        rows.append((label, ets))
        sarima = SARIMAX(train, order=(1, 1, 1), seasonal_order=(0, 1, 1, 12)).fit(disp=False)
        rows.append(("SARIMA(1,1,1)(0,1,1,12)", sarima.forecast(h)))

    f, secs = mamba_rows(rows, train, h, args, xp, season=12)

    print(f"\nCO2 monthly, train {dates[0]:%Y-%m} .. {dates[-h - 1]:%Y-%m} ({len(train)} months), "
          f"test {dates[-h]:%Y-%m} .. {dates[-1]:%Y-%m} (h = {h}); lookbacks {list(f.lookbacks_)}, "
          f"seeds {f.seed}..{f.seed + f.n_seeds - 1}; MASE scale: seasonal naive m = 12")
    print(table(rows, test, train, 12))
    print(f"Mamba: {secs:.1f} s on {args.device} (all fits + predictions)")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(10, 4))
    show = slice(len(y) - 12 * 12, len(y) - h)
    ax.plot(dates[show], y[show], color="0.4", label="history")
    ax.plot(dates[-h:], test, color="k", lw=2, label="truth")
    styles = [":", "--", "-.", (0, (1, 1)), (0, (5, 1)), (0, (3, 1, 1, 1)), "-"]
    for (name, fcst), style in zip(rows, styles):
        if name.startswith("seasonal naive"):
            continue  # 5 ppm low: it squeezes the plot
        ax.plot(dates[-h:], fcst, linestyle=style, label=name,
                lw=2 if name.startswith("Mamba +") else 1.2)
    ax.set_xlabel("month")
    ax.set_ylabel("CO2 (ppm)")
    ax.set_title("Mauna Loa CO2: 48-month forecast")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
