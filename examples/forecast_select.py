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

The rule, fixed before the first run: the chosen variant has the lowest mean over the four
series of (variant's mean MASE) / (seasonal naive's mean MASE), so that each series weighs
the same; among variants within 0.005 of the lowest, the larger ``min_gain`` (the simpler
forecast).

Run:  python examples/forecast_select.py [--gains 0,0.1,0.25] [--series ...]
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
    args = ap.parse_args()
    gains = [float(g) for g in args.gains.split(",")]
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
    low = min(score.values())
    close = [g for g in gains if score[f"default, min_gain={g}"] <= low + 0.005]
    print(f"chosen: min_gain = {max(close)}" if close else
          "chosen: none of the min_gain variants is within 0.005 of the skip alone")


if __name__ == "__main__":
    main()
