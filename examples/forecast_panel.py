"""A panel of generated monthly series: one global MambaForecaster against per-series AutoReg.

The panel: ``--series`` series of 60 to 144 months, each a seasonal (period 12) pattern of
random shape and amplitude, a random-walk level and AR(1) noise, on its own scale and offset
(seeded, so every run sees the same panel).  The last 12 months of each series are the test
part.  Rows:

* seasonal naive (m = 12), per series;
* AutoReg with lags chosen by AIC (``ar_select_order``, up to 24 lags), per series;
* the global linear skip alone (``MambaForecaster(season=12, steps=0)`` fitted on the list);
* the global default (``MambaForecaster(season=12)`` fitted on the list: one ensemble over all
  series, each scaled by its own training part).

MASE: in-sample seasonal naive scale (m = 12) of each series, averaged over series; also the
80 % interval's coverage of the global default over all test months.

Run:  python examples/forecast_panel.py [--series 200] [--seed 0]
"""

import argparse
import time
import warnings

import numpy as np

from numba_mamba.timeseries import MambaForecaster, interval_coverage, mase, seasonal_naive


def make_panel(n, seed):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        T = int(rng.integers(60, 145))
        shape = rng.standard_normal(12)
        season = np.tile(shape - shape.mean(), T // 12 + 1)[:T] * rng.uniform(0.5, 2.0)
        level = np.cumsum(rng.normal(0, rng.uniform(0.05, 0.3), T))
        e = np.zeros(T)
        phi = rng.uniform(-0.3, 0.8)
        for t in range(1, T):
            e[t] = phi * e[t - 1] + rng.normal(0, 0.3)
        out.append(rng.uniform(1, 50) * (season + level + e) + rng.uniform(-100, 100))
    return out


def autoreg_aic(train, h):
    from statsmodels.tsa.ar_model import AutoReg, ar_select_order
    sel = ar_select_order(train, maxlag=min(24, len(train) // 3), ic="aic", trend="c")
    return AutoReg(train, lags=sel.ar_lags if sel.ar_lags else 0, trend="c").fit().forecast(h)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--series", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    h, m = 12, 12
    panel = make_panel(args.series, args.seed)
    trains, tests = [y[:-h] for y in panel], [y[-h:] for y in panel]
    rows = {}
    rows["seasonal naive"] = [seasonal_naive(tr, h, m) for tr in trains]
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # statsmodels' convergence chatter
        rows["AutoReg (AIC), per series"] = [autoreg_aic(tr, h) for tr in trains]
    t_ar = time.perf_counter() - t0
    t0 = time.perf_counter()
    rows["global linear skip alone"] = MambaForecaster(season=m, steps=0).fit(trains, fh=h) \
        .predict()
    t_skip = time.perf_counter() - t0
    t0 = time.perf_counter()
    f = MambaForecaster(season=m).fit(trains, fh=h)
    rows[f"global MambaForecaster (x{len(f.lookbacks_)})"] = f.predict()
    lo, hi = f.predict_interval(coverage=0.8)
    t_m = time.perf_counter() - t0
    print(f"Panel: {len(panel)} series of {min(map(len, panel))}-{max(map(len, panel))} months "
          f"(seed {args.seed}), h = {h}; lookbacks {list(f.lookbacks_)}, ridge {f.ridge_:g}; "
          f"MASE: in-sample seasonal naive scale (m = 12), mean over series")
    print(f"{'method':<36}{'mean MASE':>10}{'median':>8}{'wins vs AutoReg':>17}")
    ar = np.array([mase(te, p, tr, m) for te, p, tr in
                   zip(tests, rows["AutoReg (AIC), per series"], trains)])
    for name, preds in rows.items():
        v = np.array([mase(te, p, tr, m) for te, p, tr in zip(tests, preds, trains)])
        print(f"{name:<36}{v.mean():10.3f}{np.median(v):8.3f}{(v < ar).mean():16.0%}")
    cover = np.mean([interval_coverage(te, a, b) for te, a, b in zip(tests, lo, hi)])
    print(f"80% interval coverage of the global default over all {h * len(panel)} test months: "
          f"{cover:.3f}")
    print(f"seconds: AutoReg {t_ar:.0f}, global skip {t_skip:.0f}, global default {t_m:.0f}")


if __name__ == "__main__":
    main()
