"""The forecaster: an ensemble over lookbacks and seeds with a ridge skip, intervals, backtests."""

import os
import time

import numpy as np

from .._validation import is_cupy_array
from ..checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ._engine import LookbackModel
from ._metrics import (interval_coverage, mae, mase, pinball_loss, quantile_levels, rmse,
                       smape)
from ._params import Params
from ._windows import Scaler, as_2d, check_int

__all__ = ["MambaForecaster", "ar_order_aic", "detect_season"]

_FORMAT = "numba-mamba-forecaster-ensemble"
_OLD_FORMAT = "numba-mamba-forecaster"
MIN_WINDOWS = 8  # training windows every lookback keeps on a short series
NO_SEASON_LOOKBACKS = (8, 16, 32)
_REMOVED = {
    "horizon": "the forecast horizon is given at fit: fit(y, fh=h) trains a direct head for "
               "h steps and predict(fh) forecasts up to h steps (horizon had two meanings)",
    "n_members": "members now differ in lookback and seed: use n_seeds (seeds per lookback)",
}


def _host(a):
    return a.get() if is_cupy_array(a) else np.asarray(a)


def detect_season(y, max_period=None, min_acf=0.3):
    """Seasonal period of a series from the autocorrelation of its first differences.

    The differences remove a trend; the period is the lag of the highest
    local maximum of their autocorrelation (averaged over channels) among
    lags 2 .. ``max_period``, or the smallest lag whose peak reaches 90 % of
    it (the fundamental rather than a multiple).  A peak counts only if the
    autocorrelation there is at least ``max(min_acf, 3 / sqrt(T))``.

    Parameters
    ----------
    y : array, shape (T,) or (T, C)
    max_period : int, optional
        Longest period considered; default ``T // 3`` (at most 500).
    min_acf : float, optional

    Returns
    -------
    int
        The period, or 1 where no peak qualifies (no seasonality found, or a
        series too short to tell).

    Examples
    --------
    >>> import numpy as np
    >>> from numba_mamba.timeseries import detect_season
    >>> t = np.arange(240)
    >>> detect_season(np.sin(2 * np.pi * t / 12) + 0.05 * t)
    12
    >>> detect_season(np.random.default_rng(0).standard_normal(240))
    1
    """
    y2, _ = as_2d("y", _host(y))
    d = np.diff(y2.astype(np.float64), axis=0)
    T = d.shape[0]
    K = min(T // 3, 500 if max_period is None else check_int("max_period", max_period))
    if K < 3:
        return 1
    d = d - d.mean(axis=0)
    den = (d * d).sum(axis=0)
    keep = den > 0
    if not keep.any():
        return 1
    d, den = d[:, keep], den[keep]
    acf = np.array([1.0] + [float(((d[k:] * d[:-k]).sum(axis=0) / den).mean())
                            for k in range(1, K + 1)])
    floor = max(min_acf, 3 / np.sqrt(T))
    peaks = [k for k in range(2, K) if acf[k] > acf[k - 1] and acf[k] >= acf[k + 1]
             and acf[k] >= floor]
    if not peaks:
        return 1
    best = max(acf[k] for k in peaks)
    return min(k for k in peaks if acf[k] >= 0.9 * best)


def ar_order_aic(y, max_lag, segments=None):
    """Lag order of a least-squares autoregression with intercept, chosen by AIC.

    Every order ``p = 0 .. max_lag`` is fitted on the same rows (those with
    ``max_lag`` earlier samples); the AIC is ``n log det(S) + 2 k``, with
    ``S`` the residual covariance and ``k = (p C + 1) C`` coefficients
    (a vector autoregression for ``C`` channels).

    Parameters
    ----------
    y : array, shape (T,) or (T, C)
    max_lag : int
    segments : list of (start, end), optional
        ``y`` is several series end to end (a panel): lags stay inside each.

    Returns
    -------
    int
        The order, at least 1 (0 is scored, but the linear skip needs a lag).

    Examples
    --------
    >>> import numpy as np
    >>> from numba_mamba.timeseries import ar_order_aic
    >>> rng = np.random.default_rng(0)
    >>> y = np.zeros(500)
    >>> for t in range(3, 500):
    ...     y[t] = 0.5 * y[t - 1] - 0.4 * y[t - 2] + 0.3 * y[t - 3] + rng.standard_normal()
    >>> ar_order_aic(y, 10)
    3
    """
    y2, _ = as_2d("y", _host(y))
    y2 = y2.astype(np.float64)
    T, C = y2.shape
    P = check_int("max_lag", max_lag)
    segs = [(0, T)] if segments is None else [(int(a), int(b)) for a, b in segments]
    ks = np.concatenate([np.arange(a + P, b) for a, b in segs])
    if ks.size <= P * C + 1:
        raise ValueError(f"y must have more than max_lag + {P * C + 1} samples in its "
                         f"segments for max_lag = {P}, got {T}")
    lags = np.stack([y2[ks - j] for j in range(1, P + 1)], axis=1).reshape(len(ks), P * C)
    target, n = y2[ks], len(ks)
    jitter = 1e-12 * np.eye(C) * max(float(target.var(axis=0).max()), 1e-300)
    best = None
    for p in range(P + 1):
        X = np.concatenate([lags[:, :p * C], np.ones((n, 1))], axis=1)
        r = target - X @ np.linalg.lstsq(X, target, rcond=None)[0]
        aic = n * np.linalg.slogdet(r.T @ r / n + jitter)[1] + 2 * (p * C + 1) * C
        if best is None or aic < best[0] - 1e-9 * abs(best[0]):
            best = (aic, p)
    return max(best[1], 1)


def _is_panel(y):
    """A list or tuple of arrays (not of numbers or nested lists) is a panel of series."""
    return isinstance(y, (list, tuple)) and len(y) > 0 and all(hasattr(e, "shape") for e in y)


class MambaForecaster(Params):
    """Forecast a series (or a panel of series) with an ensemble of small Mamba models.

    ``fit(y, fh=h)`` trains, for every lookback and seed, a Mamba model with
    a *direct* head for the ``h`` steps after each position, on top of a
    linear autoregression (the linear skip); ``predict()``
    forecasts the ``h`` samples after the end of ``y`` as the median over
    all members, and ``predict(quantiles=...)`` / :meth:`predict_interval`
    add quantiles from the validation residuals.

    The defaults (skip lags, skip map and ``min_gain`` chosen on development
    origins of sunspots, CO2, airline and lynx; ``examples/forecast_select.py``):

    * lookbacks of 1, 2 and 3 seasonal periods (``season`` given, or found
      by :func:`detect_season`; 8, 16, 32 samples without a season), capped
      on short series so that every lookback keeps at least 8 training
      windows;
    * ``n_seeds`` members per lookback, combined by the median;
    * the linear skip reads ``skip_lags`` lags, chosen by AIC on the
      series (:func:`ar_order_aic`, up to the longest lookback and a
      quarter of the series' length), and is the mean of a direct ridge map and the
      iterated one-step autoregression (``skip_fit="both"``); all members
      share it;
    * the last ``val_fraction`` of the series is a validation split: it
      picks the ridge penalty of the skip among ``skip_ridge`` (mean
      validation MSE over lookbacks, skip alone), each member's stopping
      step (step 0 is the skip alone, and a member keeps its Mamba part
      only if it removes ``min_gain`` = 25 % of the skip's validation MSE),
      and gives the residuals of the intervals; each member is then
      refitted on the whole series (``refit``);
    * each window is normalised by its own mean and spread for the Mamba
      part (``instance_norm``); the skip sees the globally scaled series.

    How the defaults behave (tested in ``tests/test_timeseries_forecaster.py``):
    a constant series is forecast as that constant with a zero-width
    interval; a linear trend is continued (the skip is an autoregression
    with an intercept, which extrapolates a trend); a seasonal series gets
    its period detected and its lookbacks tied to it; a short series (down
    to about ``fh + 2 + 8`` training samples plus the validation part) gets
    shorter lookbacks instead of an error.

    Parameters
    ----------
    lookback : int, sequence of int or None, optional
        Lookbacks of the ensemble; None: 1, 2 and 3 seasonal periods.
    season : int or None, optional
        Seasonal period in samples (1: none); None: detected at fit
        (``season_``).
    n_seeds : int, optional
        Members per lookback, differing in initialization and batches.
    combine : {"median", "mean"}, optional
        How all members' forecasts are combined.
    linear_skip : bool, optional
        Add the linear autoregression (the skip); the Mamba models learn what
        it leaves over, and each member's early stopping can keep the skip
        alone (step 0).  ``steps=0``: the skip alone.
    skip_lags : "aic", int or None, optional
        Lags of the skip: chosen by AIC on the training part (``"aic"``), a
        fixed number, or None: each member's lookback.
    skip_fit : {"both", "direct", "recursive"}, optional
        The skip's map from its lags to the ``fh`` next values: a ridge
        regression per step (``"direct"``), the least-squares one-step
        autoregression iterated over the horizon (``"recursive"``), or the
        mean of the two (``"both"``; direct alone with covariates, which a
        recursion cannot read ahead).
    skip_ridge : float or sequence of float, optional
        Ridge penalty (per training row) of the skip, or candidates picked
        on validation (without validation: the middle candidate).
    instance_norm, refit, d_model, n_layers, d_state, d_conv, expand, dt_min, dt_max, scaler, \
train_on, time_as, steps, batch_size, lr, weight_decay, warmup_steps, max_grad_norm, \
val_fraction, min_gain, patience, eval_every : optional
        Training and model settings of every member, as in the engine (see
        the module docstring): ``steps`` is the most optimizer steps per
        member, ``val_fraction`` the held-out end of the series (0: no
        validation, no intervals), ``min_gain`` the fraction of the skip's
        validation MSE a member's Mamba part must remove to be kept,
        ``patience`` evaluations every
        ``eval_every`` steps without improvement stop a member.
    seed : int, optional
        First seed; the members of every lookback use seeds
        ``seed, seed + 1, ...``.
    dtype : {numpy.float32, numpy.float64}, optional
    device : {None, "cpu", "gpu"}, optional
        None: where ``y`` lives (NumPy: CPU, CuPy: GPU).
    progress : bool, optional
        A tqdm progress bar per member.

    Attributes
    ----------
    fh_ : int
        The horizon fitted for (the direct head's length).
    season_ : int
    lookbacks_ : tuple of int
    ridge_ : float or None
        The skip's penalty used.
    skip_lags_ : int or None
        The skip's lags (None: each member's lookback, or no skip).
    residuals_ : array, shape (n_windows, fh, C) or None
        Validation residuals ``y - forecast`` of the combined forecast of the
        members trained before the refit (original units; after a fit on a
        panel: each series' scaled units, pooled over the series).
    sigma_ : array, shape (fh, C) or None
        Root mean square of ``residuals_`` per step, made non-decreasing
        along the horizon: the scale of the intervals.
    engines_ : list
        One fitted model per lookback (its members' parameters are arrays).
    panel_scalers_ : list of Scaler or None
        After ``fit`` on a list of series: each series' scaling (fitted on
        its training part); the engines are one global model of all the
        scaled series.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_mamba.timeseries import MambaForecaster, mae
    >>> y = np.sin(2 * np.pi * np.arange(160) / 10)
    >>> f = MambaForecaster(steps=20, d_model=8, n_layers=1, d_state=4).fit(y[:150], fh=5)
    >>> f.season_, f.lookbacks_
    (10, (10, 20, 30))
    >>> bool(mae(y[150:155], f.predict()) < 0.1)
    True
    >>> lo, hi = f.predict_interval(coverage=0.8)
    >>> lo.shape, bool((lo <= f.predict()).all())
    ((5,), True)
    """

    _REMOVED = _REMOVED

    def __init__(self, lookback=None, *, season=None, n_seeds=1, combine="median",
                 linear_skip=True, skip_ridge=(1e-5, 1e-3, 1e-1), skip_lags="aic",
                 skip_fit="both", instance_norm=True,
                 refit=True, d_model=16, n_layers=2, d_state=16, d_conv=4, expand=2,
                 dt_min=0.01, dt_max=1.0, scaler="standard", train_on="auto",
                 time_as="delta", steps=300, batch_size=32, lr=2e-3, weight_decay=0.01,
                 warmup_steps=50, max_grad_norm=1.0, val_fraction=0.15, min_gain=0.25,
                 patience=100,
                 eval_every=25, seed=0, dtype=np.float32, device=None, progress=False,
                 **removed):
        args = {k: v for k, v in locals().items() if k not in ("self", "removed")}
        for k in removed:
            if k in _REMOVED:
                raise TypeError(f"MambaForecaster has no argument {k!r} any more: "
                                f"{_REMOVED[k]}")
            raise TypeError(f"MambaForecaster got an unexpected keyword argument {k!r}")
        for k, v in args.items():
            setattr(self, k, v)
        self._validate()
        self._reset()

    # ------------------------------------------------------------ parameters

    def get_params(self, deep=True):
        """The constructor arguments, as given (scikit-learn convention).

        Examples
        --------
        >>> from numba_mamba.timeseries import MambaForecaster
        >>> f = MambaForecaster(season=12, n_seeds=3)
        >>> p = f.get_params()
        >>> p["season"], p["n_seeds"], p["lookback"]
        (12, 3, None)
        >>> MambaForecaster(**p).get_params() == p
        True
        """
        return super().get_params(deep)

    def _ridges(self):
        r = self.skip_ridge
        return tuple(float(v) for v in r) if isinstance(r, (list, tuple)) else (float(r),)

    def _lookbacks_given(self):
        lb = self.lookback
        if lb is None:
            return None
        return tuple(lb) if isinstance(lb, (list, tuple)) else (lb,)

    def _validate(self):
        if self.season is not None:
            check_int("season", self.season)
        check_int("n_seeds", self.n_seeds)
        lbs = self._lookbacks_given()
        if lbs is not None:
            if not lbs:
                raise ValueError("lookback must be None, an integer or a non-empty sequence "
                                 "of integers, got an empty sequence")
            for v in lbs:
                check_int("lookback", v)
        r = self.skip_ridge
        if isinstance(r, (list, tuple)) and not r:
            raise ValueError("skip_ridge must be a number >= 0 or a non-empty sequence of them, "
                             "got an empty sequence")
        try:
            ridges = self._ridges()
        except (TypeError, ValueError):
            raise ValueError(f"skip_ridge must be a number >= 0 or a sequence of them, "
                             f"got {r!r}") from None
        sl = self.skip_lags
        if sl is not None and sl != "aic":
            if isinstance(sl, str):
                raise ValueError(f"skip_lags must be 'aic', a positive integer or None, "
                                 f"got {sl!r}")
            check_int("skip_lags", sl)
        # the engine checks the rest (and names the argument)
        LookbackModel(max(lbs) if lbs else 8, 1, **self._engine_kwargs(ridges[0]))

    def _engine_kwargs(self, ridge, n_members=None, skip_lags=None):
        return dict(d_model=self.d_model, n_layers=self.n_layers, d_state=self.d_state,
                    d_conv=self.d_conv, expand=self.expand, dt_min=self.dt_min,
                    dt_max=self.dt_max, scaler=self.scaler, instance_norm=self.instance_norm,
                    train_on=self.train_on, time_as=self.time_as, steps=self.steps,
                    batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay,
                    warmup_steps=self.warmup_steps, max_grad_norm=self.max_grad_norm,
                    val_fraction=self.val_fraction, min_gain=self.min_gain,
                    patience=self.patience,
                    eval_every=self.eval_every, refit=self.refit,
                    n_members=self.n_seeds if n_members is None else n_members,
                    combine=self.combine, linear_skip=self.linear_skip, skip_ridge=ridge,
                    skip_lags=skip_lags, skip_fit=self.skip_fit, seed=self.seed,
                    dtype=self.dtype, device=self.device, progress=self.progress)

    def __repr__(self):
        default = type(self)()
        args = [f"{k}={v!r}" for k, v in self.get_params().items()
                if not (v is getattr(default, k) or (isinstance(v, (int, float, str))
                                                     and v == getattr(default, k)))]
        return f"MambaForecaster({', '.join(args)})"

    # ------------------------------------------------------------ fit

    def _n_val(self, T, fh):
        n_val = int(round(self.val_fraction * T)) if self.val_fraction > 0 else 0
        return max(n_val, fh) if n_val else 0

    def _auto_lookbacks(self, season, T, fh):
        cut = T - self._n_val(T, fh)
        cap = cut - fh - MIN_WINDOWS + 1
        base = (season, 2 * season, 3 * season) if season >= 2 else NO_SEASON_LOOKBACKS
        out = sorted({min(max(b, 4), cap) for b in base})
        if out[0] < 2:
            raise ValueError(f"y is too short for fh = {fh}: {T} samples leave {cut} for "
                             f"training (val_fraction = {self.val_fraction}), fewer than "
                             f"lookback 2 + fh + {MIN_WINDOWS - 1} = {fh + MIN_WINDOWS + 1}")
        return tuple(out)

    def fit(self, y, fh=1, t=None, past_covariates=None, future_covariates=None):
        """Train the ensemble to forecast the ``fh`` samples after the end of ``y``.

        Parameters
        ----------
        y : array, shape (T,) or (T, C), or a list of such arrays
            The series (NumPy or CuPy, no NaN).  A list or tuple of arrays
            (unequal lengths allowed) is a panel: each series is scaled by
            its own training part and one global ensemble is fitted on all
            of them (windows, skip rows and validation parts inside each
            series; the season is the most frequent one detected, the
            lookbacks capped by the shortest series); :meth:`predict`
            returns a list.  Not with times or covariates yet.
        fh : int, optional
            Forecast horizon: the direct head forecasts ``fh`` steps and
            :meth:`predict` forecasts up to ``fh`` steps.
        t : array, shape (T,), optional
            Strictly increasing sample times (irregular sampling; a list of
            them for a panel).
        past_covariates : array, shape (T,) or (T, Kp), optional
            Covariates known only up to each forecast origin (measured
            drivers): each position's row is an input of the Mamba members
            and of the linear skip.
        future_covariates : array, shape (T + n, Kf), optional
            Covariates known ahead (calendar, planned inputs): position ``k``
            sees rows ``k+1 .. k+fh``.  Rows after ``T`` (``n >= fh`` of
            them, or none) are kept for :meth:`predict`.

        Returns
        -------
        self

        Raises
        ------
        ValueError
            ``fh`` not a positive integer; NaN or inf in ``y``; a series too
            short for ``fh`` and the validation part; bad times.
        """
        if isinstance(fh, bool) or not isinstance(fh, (int, np.integer)) or fh < 1:
            raise ValueError(f"fh must be a positive integer (the forecast horizon), got {fh!r}")
        fh = int(fh)
        self._validate()
        cov = dict(past=past_covariates, future=future_covariates)
        probe = LookbackModel(2, 1, **self._engine_kwargs(self._ridges()[0]))
        if _is_panel(y):
            if t is not None or past_covariates is not None or future_covariates is not None:
                raise ValueError("times and covariates are not supported for a panel yet")
            return self._fit_panel(y, fh, probe._xp_for(y[0]))
        xp = probe._xp_for(y)
        y2, one_d, tt = LookbackModel._check_series(y, t, xp)
        T = y2.shape[0]
        n_val = self._n_val(T, fh)
        season = self.season if self.season is not None \
            else detect_season(y2[:T - n_val])
        lookbacks = self._lookbacks_given()
        lookbacks = tuple(int(v) for v in lookbacks) if lookbacks is not None \
            else self._auto_lookbacks(season, T, fh)
        lags = self._choose_skip_lags(y2, lookbacks)
        self._fit_members(y2[:, 0] if one_d else y2, fh, season, lookbacks, n_val > 0,
                          dict(t=tt, **cov), dict(skip_lags=lags))
        self.skip_lags_ = lags
        self.one_d_, self.n_channels_ = one_d, y2.shape[1]
        if self.residuals_ is not None:  # to the series' units
            self.residuals_ = self.residuals_ * self.engines_[0].scaler_.scale_
        self._set_sigma()
        return self

    def _fit_members(self, yy, fh, season, lookbacks, has_val, fit_kw, engine_kw):
        """Pick the skip's penalty, fit one engine per lookback, keep the validation residuals
        (in the engines' scaled units)."""
        ridges = self._ridges()
        ridge, scores = None, {}
        if self.linear_skip:
            ridge = ridges[len(ridges) // 2]
            if len(ridges) > 1 and has_val:
                for r in ridges:  # the skip alone, no training: closed form
                    kw = dict(self._engine_kwargs(r, n_members=1), **engine_kw)
                    kw.update(steps=0, refit=False, progress=False)
                    scores[r] = float(np.mean([
                        LookbackModel(lb, fh, **kw).fit(yy, **fit_kw).history_[0]["best_val"]
                        for lb in lookbacks]))
                ridge = min(scores, key=scores.get)
        n_members = 1 if self.linear_skip and self.steps == 0 else None  # identical members
        kw = dict(self._engine_kwargs(ridges[0] if ridge is None else ridge, n_members),
                  **engine_kw)
        engines = [LookbackModel(lb, fh, **kw).fit(yy, **fit_kw) for lb in lookbacks]
        self._reset()
        self.engines_, self.fh_, self.season_, self.lookbacks_ = engines, fh, int(season), \
            lookbacks
        self.ridge_, self.ridge_scores_ = ridge, scores
        if all(e.val_pred_ is not None for e in engines):
            xp = engines[0].xp_
            pred = self._combine(xp.concatenate([e.val_pred_ for e in engines], axis=1))
            self.residuals_ = engines[0].val_true_ - pred

    def _fit_panel(self, ys, fh, xp):
        """One global model on a list of series, each scaled by its own training part."""
        series = []
        for i, yi in enumerate(ys):
            y2, one_d, _ = LookbackModel._check_series(yi, None, xp, what=f"y[{i}]")
            if series and (one_d != series[0][1] or y2.shape[1] != series[0][0].shape[1]):
                raise ValueError(f"y[{i}] must have the shape kind of y[0] "
                                 f"({'(T,)' if series[0][1] else '(T, C)'} with the same "
                                 f"channels), got {tuple(xp.asarray(yi).shape)}")
            series.append((y2, one_d))
        lengths = [y2.shape[0] for y2, _ in series]
        n_vals = [self._n_val(T, fh) for T in lengths]
        if self.season is not None:
            season = self.season
        else:  # the most frequent of the series' seasons (the smallest among ties)
            found = [detect_season(y2[:T - nv]) for (y2, _), T, nv in zip(series, lengths,
                                                                            n_vals)]
            season = int(np.argmax(np.bincount(found)))
        lookbacks = self._lookbacks_given()
        lookbacks = tuple(int(v) for v in lookbacks) if lookbacks is not None \
            else self._auto_lookbacks(season, min(lengths), fh)
        scalers = [Scaler(self.scaler).fit(y2[:T - nv])
                   for (y2, _), T, nv in zip(series, lengths, n_vals)]
        z = xp.concatenate([sc.transform(y2) for sc, (y2, _) in zip(scalers, series)])
        ends = np.cumsum(lengths)
        segments = [(int(e - T), int(e)) for e, T in zip(ends, lengths)]
        one_d = series[0][1]
        lags = self._choose_skip_lags(z, lookbacks, segments)
        self._fit_members(z[:, 0] if one_d else z, fh, season, lookbacks, n_vals[0] > 0,
                          dict(segments=segments), dict(scaler="none", skip_lags=lags))
        self.skip_lags_ = lags
        self.one_d_, self.n_channels_ = one_d, z.shape[1]
        self.panel_scalers_ = scalers
        self.panel_last_ = [y2[-max(max(lookbacks), lags or 0):] for y2, _ in series]
        self._set_sigma()  # in scaled units: each series' scale multiplies it
        return self

    def _choose_skip_lags(self, train, lookbacks, segments=None):
        """The skip's lags: ``skip_lags``, or by AIC on the whole series ``train`` (an
        in-sample criterion, as for AutoReg; up to the longest lookback and a quarter of the
        shortest series)."""
        if not self.linear_skip or self.skip_lags is None:
            return None
        if self.skip_lags != "aic":
            return int(self.skip_lags)
        shortest = min(b - a for a, b in segments) if segments else train.shape[0]
        return ar_order_aic(train, max(1, min(max(lookbacks), shortest // 4)), segments)

    def _reset(self):
        self.engines_ = self.panel_scalers_ = self.panel_last_ = self.skip_lags_ = None
        self.residuals_ = self.sigma_ = None

    def _set_sigma(self):
        self.sigma_ = None
        if self.residuals_ is not None:
            xp = self.engines_[0].xp_
            s = xp.sqrt((self.residuals_ ** 2).mean(axis=0))  # (fh, C)
            self.sigma_ = xp.asarray(np.maximum.accumulate(_host(s), axis=0))

    def _combine(self, outs, axis=1):
        xp = self.engines_[0].xp_
        return xp.median(outs, axis=axis) if self.combine == "median" else outs.mean(axis=axis)

    # ------------------------------------------------------------ predict

    def _check_fitted(self):
        if self.engines_ is None:
            raise RuntimeError("MambaForecaster is not fitted: call fit(y, fh=h) first")

    def _check_fh(self, fh):
        if fh is None:
            return self.fh_
        if isinstance(fh, bool) or not isinstance(fh, (int, np.integer)) or fh < 1:
            raise ValueError(f"fh must be a positive integer, got {fh!r}")
        if fh > self.fh_:
            raise ValueError(f"fh must be <= {self.fh_}, the horizon this forecaster was "
                             f"fitted for, got {fh}: fit again with fit(y, fh={int(fh)}) to "
                             f"forecast further (forecasts are direct, not recursive)")
        return int(fh)

    def predict_members(self, fh=None, y=None, t=None, t_future=None, past_covariates=None,
                        future_covariates=None):
        """Every member's forecast, ``(n_members, fh)`` or ``(n_members, fh, C)``.

        Members are ordered by lookback, then seed; their spread shows how
        much the forecast depends on them.
        """
        self._check_fitted()
        if self.panel_scalers_ is not None:
            raise ValueError("predict_members takes one series, not a panel")
        fh = self._check_fh(fh)
        xp = self.engines_[0].xp_
        return xp.concatenate([e.predict(fh, y=y, t=t, t_future=t_future, members=True,
                                         past=past_covariates, future=future_covariates)
                               for e in self.engines_])

    def predict(self, fh=None, y=None, t=None, t_future=None, quantiles=None,
                past_covariates=None, future_covariates=None):
        """Forecast the ``fh`` samples after the end of a series (median over members).

        Parameters
        ----------
        fh : int, optional
            Steps ahead, at most the ``fh`` given to :meth:`fit` (default).
        y : array, shape (T,) or (T, C), optional
            History to forecast from (at least the longest lookback);
            default: the end of the series given to :meth:`fit`.  After a fit
            on a panel: a list of histories (or None).
        t, t_future : array, optional
            Sample times of ``y`` and of the forecast samples (irregular
            sampling; see the module docstring).
        past_covariates, future_covariates : array, optional
            With covariates fitted and a history ``y``: the past covariates of
            ``y``'s rows, and the future ones of ``y``'s rows and the fitted
            ``fh_`` after them.  Without ``y``: ``future_covariates`` holds the
            ``fh_`` rows after the fitted series (default: those given to
            :meth:`fit` beyond it).
        quantiles : sequence of float, optional
            Return these quantiles instead: ``forecast + sign(q - 0.5)
            sigma_[j] a_|2q-1|`` at step ``j``, with ``a_p`` the ``p``
            quantile of the absolute validation residuals divided by their
            step's ``sigma_``, pooled over windows and steps (a symmetric
            split-conformal interval with a scale per step; the 0.5
            quantile is the point forecast).  The residuals' mean is not
            added: the members' refit on the whole series changes it.

        Returns
        -------
        array, shape (fh,) or (fh, C); with ``quantiles``: (fh, n_q) or (fh, C, n_q)
            In the forecaster's array namespace.  A list of them after a fit
            on a panel.

        Raises
        ------
        ValueError
            ``fh`` larger than fitted; a bad history (see the engine).
        RuntimeError
            ``quantiles`` without validation residuals (``val_fraction=0``).
        """
        self._check_fitted()
        if self.panel_scalers_ is not None:
            return self._predict_panel(fh, y, t, t_future, quantiles, past_covariates,
                                       future_covariates)
        fh = self._check_fh(fh)
        point = self._combine(self.predict_members(fh, y, t, t_future, past_covariates,
                                                   future_covariates), axis=0)
        if quantiles is None:
            return point
        return point[..., None] + self._quantile_offsets(fh, quantiles)

    def _predict_panel(self, fh, y, t, t_future, quantiles, past_covariates,
                       future_covariates):
        if t is not None or t_future is not None or past_covariates is not None \
                or future_covariates is not None:
            raise ValueError("times and covariates are not supported for a panel yet")
        fh = self._check_fh(fh)
        n = len(self.panel_scalers_)
        ys = [None] * n if y is None else list(y)
        if len(ys) != n:
            raise ValueError(f"y must be a list of {n} histories like the panel fitted, "
                             f"got {len(ys)}")
        xp = self.engines_[0].xp_
        off = None if quantiles is None else self._quantile_offsets(fh, quantiles)
        out = []
        for i, (sc, last, yi) in enumerate(zip(self.panel_scalers_, self.panel_last_, ys)):
            if yi is not None:
                yi, _, _ = LookbackModel._check_series(yi, None, xp, what=f"y[{i}]")
            z = sc.transform(last if yi is None else yi)
            members = xp.concatenate([e.predict(fh, y=z[:, 0] if self.one_d_ else z,
                                                members=True) for e in self.engines_])
            point = self._combine(members, axis=0)
            scale = sc.scale_[0] if self.one_d_ else sc.scale_
            center = sc.center_[0] if self.one_d_ else sc.center_
            point = point * scale + center
            if off is not None:
                point = point[..., None] + off * (scale if self.one_d_ else scale[:, None])
            out.append(point)
        return out

    def _quantile_offsets(self, fh, quantiles):
        q = quantile_levels(quantiles)
        if self.sigma_ is None:
            raise RuntimeError("quantiles need validation residuals: fit with val_fraction > 0")
        xp = self.engines_[0].xp_
        sigma, res = _host(self.sigma_), _host(self.residuals_)  # (fh_, C), (n, fh_, C)
        a = np.abs(res / np.where(sigma > 0, sigma, 1.0)).reshape(-1, sigma.shape[1])
        qa = np.quantile(a, np.abs(2 * q - 1), axis=0)  # (n_q, C): pooled over windows, steps
        zq = np.sign(q - 0.5)[:, None] * qa
        off = xp.asarray(sigma[:fh, :, None] * zq.T[None])  # (fh, C, n_q)
        return off[:, 0] if self.one_d_ else off

    def predict_interval(self, fh=None, coverage=0.8, y=None, t=None, t_future=None,
                         past_covariates=None, future_covariates=None):
        """Central prediction interval of nominal ``coverage``: ``(lower, upper)``.

        The quantiles ``(1 - coverage) / 2`` and ``(1 + coverage) / 2`` of
        :meth:`predict`; each of shape ``(fh,)`` or ``(fh, C)`` (lists after a
        fit on a panel).

        Raises
        ------
        ValueError
            ``coverage`` not in (0, 1).
        """
        if not 0 < coverage < 1:
            raise ValueError(f"coverage must be in (0, 1), got {coverage!r}")
        qs = self.predict(fh, y, t, t_future, quantiles=((1 - coverage) / 2, (1 + coverage) / 2),
                          past_covariates=past_covariates, future_covariates=future_covariates)
        if isinstance(qs, list):
            return [q[..., 0] for q in qs], [q[..., 1] for q in qs]
        return qs[..., 0], qs[..., 1]

    # ------------------------------------------------------------ backtest

    def backtest(self, y, fh, n_origins=4, step=None, t=None, m=None, coverage=0.8,
                 quantiles=(0.1, 0.5, 0.9), past_covariates=None, future_covariates=None):
        """Rolling-origin evaluation: refit a copy at ``n_origins`` origins and score each.

        Origin ``i`` (of ``n``) is ``T - fh - (n - 1 - i) * step``: a copy of
        this forecaster (same parameters, ``self`` untouched) is fitted on
        ``y[:origin]`` and forecasts ``y[origin:origin + fh]``.

        Parameters
        ----------
        y : array, shape (T,) or (T, C)
        fh : int
        n_origins : int, optional
        step : int, optional
            Samples between origins; default ``fh`` (test windows do not overlap).
        t : array, shape (T,), optional
        m : int, optional
            Season of MASE's scale; default the fitted ``season_`` at each origin.
        coverage : float, optional
            Nominal coverage of the scored interval.
        quantiles : sequence of float, optional
            Levels of the pinball loss.
        past_covariates, future_covariates : array, optional
            Aligned with ``y`` (``T`` rows); each origin's fit gets the rows
            before it, plus the ``fh`` rows after it of the future ones.

        Returns
        -------
        list of dict
            Per origin: ``origin``, ``mae``, ``rmse``, ``mase`` (NaN where
            undefined), ``smape``, ``coverage`` (fraction of the test samples
            inside the interval), ``width`` (mean interval width), ``pinball``
            and ``seconds`` (fit and predictions); the interval entries are
            None without validation residuals.
        """
        if _is_panel(y):
            raise ValueError("backtest takes one series: call it for each series of the panel")
        fh = check_int("fh", fh)
        n_origins = check_int("n_origins", n_origins)
        step = fh if step is None else check_int("step", step)
        yh = _host(y)
        T = yh.shape[0]
        first = T - fh - (n_origins - 1) * step
        if first < 1:
            raise ValueError(f"y must have more than fh + (n_origins - 1) * step = "
                             f"{fh + (n_origins - 1) * step} samples, got {T}")
        if t is not None:
            t = _host(t)
        lo_q, hi_q = (1 - coverage) / 2, (1 + coverage) / 2
        levels = tuple(quantiles) + (lo_q, hi_q)
        rows = []
        for i in range(n_origins):
            o = first + i * step
            t0 = time.perf_counter()
            f = type(self)(**self.get_params())
            f.fit(y[:o], fh=fh, t=None if t is None else t[:o],
                  past_covariates=None if past_covariates is None else past_covariates[:o],
                  future_covariates=None if future_covariates is None
                  else future_covariates[:o + fh])
            kw = {} if t is None else dict(t_future=t[o:o + fh])
            point = _host(f.predict(fh, **kw))
            qs = None if f.sigma_ is None else _host(f.predict(fh, quantiles=levels, **kw))
            secs = time.perf_counter() - t0
            truth = yh[o:o + fh]
            try:
                ms = mase(truth, point, yh[:o], f.season_ if m is None else m)
            except ValueError:  # a training series without naive error
                ms = float("nan")
            row = dict(origin=o, mae=mae(truth, point), rmse=rmse(truth, point), mase=ms,
                       smape=smape(truth, point), coverage=None, width=None, pinball=None,
                       seconds=secs)
            if qs is not None:
                nq = len(quantiles)
                row.update(coverage=interval_coverage(truth, qs[..., nq], qs[..., nq + 1]),
                           width=float((qs[..., nq + 1] - qs[..., nq]).mean()),
                           pinball=pinball_loss(truth, qs[..., :nq], quantiles))
            rows.append(row)
        return rows

    # ------------------------------------------------------------ save / load

    def save(self, path):
        """Write the fitted forecaster to one ``.npz`` checkpoint (no pickle).

        Uses :func:`numba_mamba.checkpoint.save_checkpoint`: each lookback's
        members, scaler, skip and end of the series under ``lookback<i>.``,
        the validation residuals, and the parameters and fitted settings as
        JSON.  Not for a fit on a panel (pickle that).
        """
        self._check_fitted()
        if self.panel_scalers_ is not None:
            raise ValueError("save writes a forecaster of one series: pickle a panel's")
        arrays = {}
        for i, e in enumerate(self.engines_):
            arrays.update(e._arrays(f"lookback{i}."))
        if self.residuals_ is not None:
            arrays["residuals"] = self.residuals_
        params = self.get_params()
        params["dtype"] = np.dtype(params["dtype"]).name
        extra = {"format": _FORMAT, "params": params, "fh": self.fh_, "season": self.season_,
                 "lookbacks": list(self.lookbacks_), "ridge": self.ridge_,
                 "skip_lags": self.skip_lags_,
                 "ridge_scores": [[k, v] for k, v in self.ridge_scores_.items()],
                 "one_d": self.one_d_, "n_channels": self.n_channels_,
                 "engines": [e._meta() for e in self.engines_]}
        save_checkpoint(os.fspath(path), arrays, self.engines_[0].config_, step=0, extra=extra)

    @classmethod
    def load(cls, path, xp=np):
        """Read a forecaster written by :meth:`save`; arrays go to ``xp`` (numpy or cupy).

        Raises
        ------
        numba_mamba.CheckpointError
            Not a readable checkpoint, a checkpoint of something else, or of
            the single-model forecaster of earlier versions.
        """
        ck = load_checkpoint(path, xp=xp)
        extra = ck.extra if isinstance(ck.extra, dict) else {}
        if extra.get("format") == _OLD_FORMAT:
            raise CheckpointError(f"{path} holds a forecaster of an earlier numba-mamba "
                                  f"(one lookback, horizon at construction): fit a "
                                  f"MambaForecaster again and save it")
        if extra.get("format") != _FORMAT:
            raise CheckpointError(f"{path} is a numba-mamba checkpoint but not of a "
                                  f"MambaForecaster (extra format {extra.get('format')!r})")
        params = dict(extra["params"])
        params["dtype"] = np.dtype(params["dtype"]).type
        # checkpoints from before skip_lags/skip_fit: each lookback's lags, the direct map
        params.setdefault("skip_lags", None)
        params.setdefault("skip_fit", "direct")
        for k in ("lookback", "skip_ridge"):
            if isinstance(params[k], list):
                params[k] = tuple(params[k])
        self = cls(**params)
        self.engines_ = [LookbackModel._restore(meta, ck.params, f"lookback{i}.", ck.config, xp)
                         for i, meta in enumerate(extra["engines"])]
        self.fh_, self.season_ = int(extra["fh"]), int(extra["season"])
        self.lookbacks_ = tuple(extra["lookbacks"])
        self.ridge_ = extra["ridge"]
        self.skip_lags_ = extra.get("skip_lags")
        self.ridge_scores_ = {k: v for k, v in extra["ridge_scores"]}
        self.one_d_, self.n_channels_ = bool(extra["one_d"]), int(extra["n_channels"])
        self.residuals_ = ck.params.get("residuals")
        self._set_sigma()
        return self
