"""Forecast accuracy metrics: point (MAE, RMSE, MASE, sMAPE) and probabilistic (pinball loss,
interval coverage), and the seasonal naive forecast."""

import numpy as np

from .._validation import array_namespace
from ._windows import as_2d, check_int

__all__ = ["mae", "rmse", "mase", "smape", "pinball_loss", "interval_coverage", "seasonal_naive"]


def _pair(y_true, y_pred):
    xp = array_namespace(y_true=y_true, y_pred=y_pred)
    a, p = xp.asarray(y_true, dtype=np.float64), xp.asarray(y_pred, dtype=np.float64)
    if a.shape != p.shape:
        raise ValueError(f"y_pred must have shape {tuple(a.shape)} like y_true, "
                         f"got {tuple(p.shape)}")
    if a.size == 0:
        raise ValueError("y_true must not be empty")
    return xp, a, p


def mae(y_true, y_pred):
    """Mean absolute error ``mean(|y_true - y_pred|)`` over all elements, as a float.

    Examples
    --------
    >>> from numba_mamba.timeseries import mae
    >>> mae([1.0, 2.0, 3.0], [2.0, 2.0, 1.0])
    1.0
    """
    xp, a, p = _pair(y_true, y_pred)
    return float(xp.abs(a - p).mean())


def rmse(y_true, y_pred):
    """Root mean squared error ``sqrt(mean((y_true - y_pred)**2))``, as a float.

    Examples
    --------
    >>> from numba_mamba.timeseries import rmse
    >>> rmse([0.0, 0.0], [3.0, -4.0])  # sqrt((9 + 16) / 2)
    3.5355339059327378
    """
    xp, a, p = _pair(y_true, y_pred)
    return float(xp.sqrt(((a - p) ** 2).mean()))


def mase(y_true, y_pred, y_train, m=1):
    """Mean absolute scaled error (Hyndman & Koehler 2006).

    ``MASE = mean|y_true - y_pred| / mean_t |y_train[t] - y_train[t - m]|``:
    the forecast's MAE divided by the in-sample MAE of the seasonal naive
    forecast with period ``m`` on the training series.  Below 1: better than
    that naive forecast was in sample.  For several channels the scale is
    per channel and the scaled errors are averaged over channels.

    Parameters
    ----------
    y_true, y_pred : array, shape (h,) or (h, C)
    y_train : array, shape (T,) or (T, C)
        The series the forecast was made from (time along axis 0).
    m : int, optional
        Seasonal period of the scale (1: the random-walk naive forecast).

    Returns
    -------
    float

    Raises
    ------
    ValueError
        ``y_train`` has no more than ``m`` samples, or a channel of
        ``y_train`` has zero scale (it repeats with period ``m`` exactly;
        MASE is then undefined).

    Examples
    --------
    >>> import numpy as np
    >>> from numba_mamba.timeseries import mase
    >>> y_train = np.array([1.0, 3.0, 2.0, 4.0])  # naive errors 2, 1, 2: scale 5/3
    >>> round(mase([5.0, 6.0], [4.0, 4.0], y_train), 12)  # MAE 1.5
    0.9
    >>> mase([5.0, 6.0], [4.0, 4.0], y_train, m=2)  # seasonal errors 1, 1: scale 1
    1.5
    """
    m = check_int("m", m)
    xp, a, p = _pair(y_true, y_pred)
    tr, _ = as_2d("y_train", y_train, xp)
    tr = tr.astype(np.float64)
    a2, _ = as_2d("y_true", a, xp)
    p2, _ = as_2d("y_pred", p, xp)
    if a2.shape[1] != tr.shape[1]:
        raise ValueError(f"y_train must have {a2.shape[1]} channels like y_true, "
                         f"got shape {tuple(tr.shape)}")
    if tr.shape[0] <= m:
        raise ValueError(f"y_train must have more than m = {m} samples, got {tr.shape[0]}")
    scale = xp.abs(tr[m:] - tr[:-m]).mean(axis=0)  # (C,)
    if bool((scale == 0).any()):
        raise ValueError(f"MASE is undefined: y_train's seasonal naive error (period m = {m}) "
                         f"is zero in channel(s) {[int(i) for i in xp.nonzero(scale == 0)[0]]}")
    return float((xp.abs(a2 - p2).mean(axis=0) / scale).mean())


def smape(y_true, y_pred):
    """Symmetric mean absolute percentage error, in percent (0 to 200).

    ``sMAPE = 100 mean(2 |y_pred - y_true| / (|y_true| + |y_pred|))``, a term
    being 0 where ``y_true = y_pred = 0`` (the forecast is exact there).

    Examples
    --------
    >>> from numba_mamba.timeseries import smape
    >>> smape([1.0, 0.0, 0.0], [3.0, 0.0, 2.0])  # terms 1, 0 (0/0), 2
    100.0
    """
    xp, a, p = _pair(y_true, y_pred)
    den = xp.abs(a) + xp.abs(p)
    terms = xp.where(den > 0, 2 * xp.abs(p - a) / xp.where(den > 0, den, 1.0), 0.0)
    return float(100 * terms.mean())


def quantile_levels(quantiles):
    q = np.asarray(quantiles, dtype=np.float64)
    if q.ndim != 1 or q.size == 0 or not bool(((q > 0) & (q < 1)).all()):
        raise ValueError(f"quantiles must be a non-empty sequence of levels in (0, 1), "
                         f"got {quantiles!r}")
    return q


def pinball_loss(y_true, y_quantiles, quantiles):
    """Mean pinball (quantile) loss of quantile forecasts.

    For level ``q`` and error ``e = y_true - y_q`` the loss is
    ``max(q e, (q - 1) e)``; the result is its mean over levels and elements.
    For the level 0.5 it is half the absolute error.  With many evenly
    spaced levels, twice the mean pinball loss approximates the CRPS of the
    forecast distribution.

    Parameters
    ----------
    y_true : array, shape (h,) or (h, C)
    y_quantiles : array, shape y_true.shape + (len(quantiles),)
        Forecast quantiles, levels along the last axis (as returned by
        ``MambaForecaster.predict(fh, quantiles=...)``).
    quantiles : sequence of float
        Levels in (0, 1).

    Returns
    -------
    float

    Examples
    --------
    >>> import numpy as np
    >>> from numba_mamba.timeseries import pinball_loss
    >>> y = np.array([1.0, 2.0])
    >>> yq = np.array([[0.0, 1.0, 3.0], [2.0, 2.0, 2.0]])  # levels 0.1, 0.5, 0.9
    >>> round(pinball_loss(y, yq, (0.1, 0.5, 0.9)), 6)  # (0.1 + 0 + 0.2 + 0) / 6
    0.05
    """
    q = quantile_levels(quantiles)
    xp = array_namespace(y_true=y_true, y_quantiles=y_quantiles)
    a = xp.asarray(y_true, dtype=np.float64)
    p = xp.asarray(y_quantiles, dtype=np.float64)
    if p.shape != a.shape + (q.size,):
        raise ValueError(f"y_quantiles must have shape {tuple(a.shape) + (q.size,)} "
                         f"(y_true's shape + one per quantile), got {tuple(p.shape)}")
    if a.size == 0:
        raise ValueError("y_true must not be empty")
    e = a[..., None] - p
    qq = xp.asarray(q)
    return float(xp.maximum(qq * e, (qq - 1) * e).mean())


def interval_coverage(y_true, lower, upper):
    """Fraction of ``y_true`` inside the closed intervals ``[lower, upper]``.

    Examples
    --------
    >>> from numba_mamba.timeseries import interval_coverage
    >>> interval_coverage([1.0, 2.0, 5.0, 0.0], [0.0, 2.0, 3.0, 1.0], [2.0, 3.0, 4.0, 2.0])
    0.5
    """
    xp, a, lo = _pair(y_true, lower)
    _, _, hi = _pair(y_true, upper)
    if bool((lo > hi).any()):
        raise ValueError("lower must be <= upper everywhere")
    return float(((a >= lo) & (a <= hi)).mean())


def seasonal_naive(y_train, horizon, m=1):
    """Seasonal naive forecast: repeat the last season, ``y_hat[j] = y[T - m + (j mod m)]``.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_mamba.timeseries import seasonal_naive
    >>> seasonal_naive(np.array([1.0, 2.0, 3.0, 4.0, 5.0]), 5, m=2)
    array([4., 5., 4., 5., 4.])
    """
    horizon = check_int("horizon", horizon)
    m = check_int("m", m)
    tr, one_d = as_2d("y_train", y_train)
    xp = array_namespace(y_train=tr)
    T = tr.shape[0]
    if T < m:
        raise ValueError(f"y_train must have at least m = {m} samples, got {T}")
    out = tr[T - m + xp.arange(horizon) % m]
    return out[:, 0] if one_d else out
