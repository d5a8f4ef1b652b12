"""Choosing the forecaster's defaults on development origins, before the backtest's test origins.

The backtest (``forecast_backtest.py``) scores 4 origins at the end of each series.  The
choices made here use only **earlier** origins of the same series, whose test windows end
before the backtest's first origin:

* sunspots (h = 20, m = 11): origins 129, 149, 169, 189, 209;
* CO2 (h = 24, m = 12): origins 310, 334, 358, 382, 406;
* airline (h = 12, m = 12): origins 60, 72, 84;
* lynx (h = 10, m = 10): origins 44, 54, 64.

Each variant is fitted on the samples before an origin and forecasts the ``h`` after it;
MASE as in the backtest (in-sample seasonal naive scale, period m).  Variants: the default
with ``min_gain`` in ``--gains`` (the fraction of the skip's validation MSE a member's Mamba
part must remove to be kept; 0 keeps the best validation step, as before) and the skip alone
(``steps=0``).

``--linear``: the linear skip alone (``steps=0``, no Mamba) instead, in the variants that
set the skip's default: the earlier skip (each lookback's lags, direct ridge, median over
lookbacks m, 2m, 3m) and, with the AIC's lag order, the direct ridge map, the iterated one-step
autoregression (the same forecast as statsmodels' ``AutoReg`` at that order) and their mean
(the default, ``skip_fit="both"``).  No rule picks among these automatically: the mean was
taken for being close to the best variant on every series (forecast combination), see
``examples/RESULTS_forecasting.md``.

The rule for ``min_gain``, fixed before its first run: the chosen variant has the lowest mean over the four
series of (variant's mean MASE) / (seasonal naive's mean MASE), so that each series weighs
the same; among variants within 0.005 of the lowest, the larger ``min_gain`` (the simpler
forecast).

Run:  python examples/forecast_select.py [--gains 0,0.1,0.25] [--series ...] [--linear]
"""

import argparse
import time

import numpy as np

from forecast_backtest import load
from numba_mamba.timeseries import MambaForecaster, mase, seasonal_naive

DEV = {"sunspots": [129, 149, 169, 189, 209], "co2": [310, 334, 358, 382, 406],
       "airline": [60, 72, 84], "lynx": [44, 54, 64]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--series", default=",".join(DEV))
    ap.add_argument("--gains", default="0,0.1,0.25")
    ap.add_argument("--linear", action="store_true", help="the skip's variants, no Mamba")
    args = ap.parse_args()
    gains = [float(g) for g in args.gains.split(",")]
    if args.linear:
        gains = []
        variants = {"earlier skip (direct m/2m/3m)": dict(skip_lags=None, skip_fit="direct"),
                    "direct ridge, AIC lags": dict(skip_fit="direct"),
                    "recursive AR, AIC lags": dict(skip_fit="recursive"),
                    "mean of both (default skip)": dict(skip_fit="both")}
        variants = {k: dict(v, steps=0) for k, v in variants.items()}
    else:
        variants = {f"default, min_gain={g}": dict(min_gain=g) for g in gains}
        variants["skip alone (steps=0)"] = dict(steps=0)
    rel = {k: [] for k in variants}
    for name in args.series.split(","):
        y, m, h = load(name)
        rows = {"seasonal naive": []} | {k: [] for k in variants}
        t0 = time.perf_counter()
        for o in DEV[name]:
            train, test = y[:o], y[o:o + h]
            rows["seasonal naive"].append(mase(test, seasonal_naive(train, h, m), train, m))
            for k, kw in variants.items():
                f = MambaForecaster(season=m, **kw).fit(train, fh=h)
                rows[k].append(mase(test, f.predict(), train, m))
        print(f"\n{name}: h = {h}, m = {m}, development origins {DEV[name]} "
              f"({time.perf_counter() - t0:.0f} s)")
        for k, v in rows.items():
            print(f"{k:<30}" + "".join(f"{x:8.3f}" for x in v) + f"{np.mean(v):8.3f}")
            if k in rel:
                rel[k].append(np.mean(v) / np.mean(rows["seasonal naive"]))
    print("\nmean over series of (mean MASE / seasonal naive's mean MASE):")
    score = {k: float(np.mean(v)) for k, v in rel.items()}
    for k, v in score.items():
        print(f"{k:<30}{v:8.3f}")
    if not gains:
        return
    low = min(score.values())
    close = [g for g in gains if score[f"default, min_gain={g}"] <= low + 0.005]
    print(f"chosen: min_gain = {max(close)}" if close else
          "chosen: none of the min_gain variants is within 0.005 of the skip alone")


if __name__ == "__main__":
    main()
