"""Why the default forecaster trails AutoReg (AIC) on sunspots: direct vs recursive, lag choice.

Linear models only (fast), on two sets of rolling origins, 20 years apart with h = 20:

* development origins 129, 149, ..., 209 (years 1829-1909), before the backtest's;
* the backtest's test origins 229, 249, 269, 289 (``forecast_backtest.py``), shown for the
  diagnosis only: nothing below is chosen on them.

Rows (MASE, in-sample seasonal naive scale with m = 11):

* AutoReg (AIC): recursive, lag order by AIC up to 33, OLS with a constant;
* recursive AR(p) at fixed p = 11, 22, 33 (the default's lookbacks), OLS;
* direct ridge, lookbacks 11/22/33, median: the default's skip alone
  (``MambaForecaster(season=11, steps=0)``);
* direct ridge at each single lookback 11, 22, 33, and at the AIC-chosen p (``lookback=p``);
* the default forecaster itself on the development origins (``--mamba``; slow).

Run:  python examples/forecast_sunspots_gap.py [--mamba]
"""

import argparse
import warnings

import numpy as np

from numba_mamba.timeseries import MambaForecaster, mase

M, H = 11, 20
DEV = [129, 149, 169, 189, 209]
TEST = [229, 249, 269, 289]


def aic_order(train):
    from statsmodels.tsa.ar_model import ar_select_order
    sel = ar_select_order(train, maxlag=min(3 * M, len(train) // 4), ic="aic", trend="c")
    return max(sel.ar_lags) if sel.ar_lags else 0, sel.ar_lags


def recursive(train, lags):
    from statsmodels.tsa.ar_model import AutoReg
    return AutoReg(train, lags=lags, trend="c").fit().forecast(H)


def rows(y, origins, with_mamba):
    out = {}
    for o in origins:
        train, test = y[:o], y[o:o + H]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p, lags = aic_order(train)
            fc = {"AutoReg (AIC)": recursive(train, lags or 0)}
            for q in (11, 22, 33):
                fc[f"recursive AR({q})"] = recursive(train, q)
        fc["direct ridge 11/22/33 (skip alone)"] = \
            MambaForecaster(season=M, steps=0).fit(train, fh=H).predict()
        for q in (11, 22, 33):
            fc[f"direct ridge, lookback {q}"] = \
                MambaForecaster(q, season=M, steps=0).fit(train, fh=H).predict()
        fc["direct ridge, lookback = AIC p"] = \
            MambaForecaster(max(p, 1), season=M, steps=0).fit(train, fh=H).predict()
        if with_mamba:
            fc["default MambaForecaster"] = MambaForecaster(season=M).fit(train, fh=H).predict()
        for k, f in fc.items():
            out.setdefault(k, []).append(mase(test, f, train, M))
        out.setdefault("(AIC p)", []).append(p)
    return out


def show(title, origins, out):
    print(f"\n{title}: origins {origins}")
    print(f"{'method':<38}" + "".join(f"{o:>7}" for o in origins) + f"{'mean':>8}")
    for k, v in out.items():
        if k == "(AIC p)":
            print(f"{'AIC-chosen p':<38}" + "".join(f"{x:>7d}" for x in v))
        else:
            print(f"{k:<38}" + "".join(f"{x:7.3f}" for x in v) + f"{np.mean(v):8.3f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mamba", action="store_true", help="add the default forecaster")
    args = ap.parse_args()
    import statsmodels.api as sm
    y = sm.datasets.sunspots.load_pandas().data["SUNACTIVITY"].to_numpy()
    show("development origins", DEV, rows(y, DEV, args.mamba))
    show("test origins (diagnosis only)", TEST, rows(y, TEST, False))


if __name__ == "__main__":
    main()
