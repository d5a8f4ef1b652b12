"""Rolling-origin backtest of the default MambaForecaster on four series, with 80 % intervals.

Series: sunspots and CO2 (statsmodels), airline and lynx (sktime's offline copies; needs
sktime).  Sunspots and CO2 were used to design the default recipe and its interval; airline
and lynx were not, so their rows are a held-out check.

For each series, ``n`` origins ``fh`` samples apart end the training part; every method is
fitted on the samples before the origin and forecasts the ``fh`` after it.  Rows:

* seasonal naive (period m);
* AutoReg with its lag order chosen by AIC (``ar_select_order``, up to 3 m lags);
* ETS (Holt-Winters: additive or multiplicative season, damped or not), chosen by AIC;
* ARIMA(p, d, q) with p <= 3, d <= 1, q <= 2 (a constant when d = 0) chosen by AIC
  (``--arima``);
* the linear skip alone (``MambaForecaster(steps=0)``: the default ensemble's linear
  autoregression, no Mamba: lags by AIC, the mean of the direct ridge map and the iterated
  one-step autoregression);
* the skip of the earlier default (``skip_lags=None, skip_fit="direct"``: each lookback's
  lags, direct ridge, median over lookbacks m, 2m, 3m);
* Mamba alone: the default without the ridge skip (``linear_skip=False``; ``--mamba-alone``);
* the default ``MambaForecaster(season=m)`` (lookbacks m, 2m, 3m; ridge skip; median).

MASE uses the in-sample seasonal naive scale with period m at each origin.  For the default
forecaster the table also shows the range of its single members' MASE (the seed and lookback
spread) and the empirical coverage and mean width of its nominal 80 % interval
(``predict_interval(coverage=0.8)``) over all test samples of all origins, and the mean
pinball loss over the levels 0.1, 0.5, 0.9.

Run:  python examples/forecast_backtest.py [--series sunspots,co2,airline,lynx] [--origins 4]
      [--seeds 1] [--arima] [--mamba-alone]
"""

import argparse
import time
import warnings

import numpy as np

from numba_mamba.timeseries import (MambaForecaster, interval_coverage, mase, pinball_loss,
                                    seasonal_naive)


def load(name):
    import statsmodels.api as sm
    if name == "sunspots":
        return sm.datasets.sunspots.load_pandas().data["SUNACTIVITY"].to_numpy(), 11, 20
    if name == "co2":
        co2 = sm.datasets.co2.load_pandas().data["co2"].resample("MS").mean().interpolate()
        return co2.to_numpy(), 12, 24
    if name in ("airline", "lynx"):
        from sktime import datasets
        y = getattr(datasets, "load_" + name)().to_numpy(dtype=np.float64)
        return (y, 12, 12) if name == "airline" else (y, 10, 10)
    raise SystemExit(f"unknown series {name!r}")


def autoreg_aic(train, h, m):
    from statsmodels.tsa.ar_model import AutoReg, ar_select_order
    sel = ar_select_order(train, maxlag=min(3 * m, len(train) // 4), ic="aic", trend="c")
    lags = sel.ar_lags if sel.ar_lags else 0
    return AutoReg(train, lags=lags, trend="c").fit().forecast(h)


def arima_aic(train, h, m):
    from statsmodels.tsa.arima.model import ARIMA
    best = None
    for d in (0, 1):
        for p in range(4):
            for q in range(3):
                try:
                    fit = ARIMA(train, order=(p, d, q), trend="c" if d == 0 else "n").fit()
                except Exception:  # an order that does not fit this series
                    continue
                if np.isfinite(fit.aic) and (best is None or fit.aic < best.aic):
                    best = fit
    return best.forecast(h)


def ets_aic(train, h, m):
    from statsmodels.tsa.holtwinters import ExponentialSmoothing
    best = None
    for seasonal in ("add", "mul"):
        if seasonal == "mul" and train.min() <= 0:
            continue
        for damped in (False, True):
            try:
                fit = ExponentialSmoothing(train, trend="add", damped_trend=damped,
                                           seasonal=seasonal, seasonal_periods=m).fit()
            except Exception:  # a variant that does not fit this series
                continue
            if np.isfinite(fit.aic) and (best is None or fit.aic < best.aic):
                best = fit
    return best.forecast(h)


def run(name, args):
    y, m, fh = load(name)
    T = len(y)
    origins = [T - fh - (args.origins - 1 - i) * fh for i in range(args.origins)]
    names = (["seasonal naive", "AutoReg (AIC)", "ETS (AIC)"] + ["ARIMA (AIC)"] * args.arima
             + ["linear skip alone", "earlier skip (direct m/2m/3m)"]
             + [f"Mamba alone (x{3 * args.seeds})"] * args.mamba_alone
             + [f"MambaForecaster (x{3 * args.seeds})"])
    scores = {k: [] for k in names}
    member_mase, cover, width, pinball, secs, stops, lags = [], [], [], [], 0.0, [], []
    for o in origins:
        train, test = y[:o], y[o:o + fh]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # statsmodels' convergence chatter
            fcs = [seasonal_naive(train, fh, m), autoreg_aic(train, fh, m),
                   ets_aic(train, fh, m)] + ([arima_aic(train, fh, m)] if args.arima else [])
        fcs.append(MambaForecaster(season=m, steps=0).fit(train, fh=fh).predict())
        fcs.append(MambaForecaster(season=m, steps=0, skip_lags=None, skip_fit="direct")
                   .fit(train, fh=fh).predict())
        if args.mamba_alone:
            fcs.append(MambaForecaster(season=m, n_seeds=args.seeds, linear_skip=False)
                       .fit(train, fh=fh).predict())
        t0 = time.perf_counter()
        f = MambaForecaster(season=m, n_seeds=args.seeds).fit(train, fh=fh)
        point = f.predict()
        lo, hi = f.predict_interval(coverage=0.8)
        qs = f.predict(quantiles=(0.1, 0.5, 0.9))
        secs += time.perf_counter() - t0
        fcs.append(point)
        for k, fc in zip(names, fcs):
            scores[k].append(mase(test, fc, train, m))
        member_mase.append([mase(test, p, train, m) for p in f.predict_members()])
        stops.append([h["best_step"] for e in f.engines_ for h in e.history_])
        lags.append(f.skip_lags_)
        cover.append(interval_coverage(test, lo, hi))
        width.append(float((hi - lo).mean()))
        pinball.append(pinball_loss(test, qs, (0.1, 0.5, 0.9)))
        print(f"{name} origin {o}: MASE " + ", ".join(f"{k} {scores[k][-1]:.3f}" for k in names)
              + f"; 80% coverage {cover[-1]:.2f}; {time.perf_counter() - t0:.0f} s", flush=True)
    lines = [f"\n{name}: T = {T}, fh = {fh}, m = {m}, origins {origins} (step {fh}); MASE "
             f"(scale: in-sample seasonal naive, period m)",
             f"{'method':<30}" + "".join(f"{'o' + str(i + 1):>8}" for i in range(len(origins)))
             + f"{'mean':>8}", "-" * (38 + 8 * len(origins))]
    for k in names:
        v = scores[k]
        lines.append(f"{k:<30}" + "".join(f"{x:8.3f}" for x in v) + f"{np.mean(v):8.3f}")
    mm = np.array(member_mase)  # (origins, members)
    lines.append(f"{'  single members, min':<30}" + "".join(f"{x:8.3f}" for x in mm.min(1))
                 + f"{mm.mean(0).min():8.3f}")
    lines.append(f"{'  single members, max':<30}" + "".join(f"{x:8.3f}" for x in mm.max(1))
                 + f"{mm.mean(0).max():8.3f}")
    lines.append(f"80% interval coverage per origin {[round(c, 2) for c in cover]}, overall "
                 f"{np.mean(cover):.3f} ({len(origins) * fh} test samples); mean width "
                 f"{np.mean(width):.2f}; mean pinball (0.1, 0.5, 0.9) {np.mean(pinball):.3f}")
    lines.append(f"MambaForecaster: {secs:.0f} s for {len(origins)} fits (+ predictions); "
                 f"skip lags (AIC) per origin {lags}; members' stopping steps per origin "
                 f"{stops} (0: the skip alone)")
    return "\n".join(lines), cover


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--series", default="sunspots,co2")
    ap.add_argument("--origins", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=1, help="n_seeds of the default forecaster")
    ap.add_argument("--arima", action="store_true", help="add ARIMA chosen by AIC")
    ap.add_argument("--mamba-alone", action="store_true", help="add the default without skip")
    args = ap.parse_args()
    out, covers = [], []
    for name in args.series.split(","):
        text, cover = run(name, args)
        out.append(text)
        covers.extend(cover)
    print("\n".join(out))
    print(f"\n80% interval coverage over all series' origins: {np.mean(covers):.3f}")


if __name__ == "__main__":
    main()
