"""Helpers of the forecasting API: input checks, sliding windows, per-channel scaling."""

import numpy as np

from .._validation import array_namespace

__all__ = ["Scaler", "make_windows"]

SCALERS = ("standard", "robust", "none")


# ---------------------------------------------------------------- helpers


def as_2d(name, y, xp=None):
    """``y`` as a float (T, C) array of its own namespace, and whether it was 1-D."""
    if xp is None:
        xp = array_namespace(**{name: y}) if hasattr(y, "shape") else np
    y = xp.asarray(y)
    if y.ndim not in (1, 2):
        raise ValueError(f"{name} must have shape (time,) or (time, channels), "
                         f"got {tuple(y.shape)}")
    if y.dtype.kind not in "fiu":
        raise TypeError(f"{name} must hold real numbers, got dtype {y.dtype}")
    one_d = y.ndim == 1
    return (y[:, None] if one_d else y), one_d


def check_finite(name, y, xp):
    bad = ~xp.isfinite(y)
    if bool(bad.any()):
        rows = xp.nonzero(bad.any(axis=tuple(range(1, y.ndim))))[0]
        first = [int(i) for i in rows[:5]]
        raise ValueError(f"{name} must be finite, got NaN or inf at {int(rows.size)} time "
                         f"index(es), first {first}; fill or drop them first (e.g. "
                         f"pandas .interpolate()) or pass sample times t of the kept ones")


def check_int(name, v, low=1):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
    return int(v)


# ---------------------------------------------------------------- windows and scaling


def make_windows(y, lookback, horizon, stride=1):
    """Sliding (input, target) windows of a series for direct multi-step forecasting.

    Window ``i`` starts at ``s = i * stride``: its input is
    ``y[s : s + lookback]`` and its target the ``horizon`` samples after it,
    ``y[s + lookback : s + lookback + horizon]``.

    Parameters
    ----------
    y : array, shape (T,) or (T, C)
    lookback, horizon : int
        Input and target lengths (both >= 1).
    stride : int, optional
        Step between window starts.

    Returns
    -------
    X : array, shape (n, lookback) or (n, lookback, C)
    Y : array, shape (n, horizon) or (n, horizon, C)
        ``n = (T - lookback - horizon) // stride + 1``; copies, in ``y``'s namespace.

    Raises
    ------
    ValueError
        ``T < lookback + horizon``, or a length that is not a positive integer.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_mamba.timeseries import make_windows
    >>> X, Y = make_windows(np.arange(6.0), lookback=3, horizon=2)
    >>> X
    array([[0., 1., 2.],
           [1., 2., 3.]])
    >>> Y
    array([[3., 4.],
           [4., 5.]])
    """
    lookback = check_int("lookback", lookback)
    horizon = check_int("horizon", horizon)
    stride = check_int("stride", stride)
    y2, one_d = as_2d("y", y)
    xp = array_namespace(y=y2)
    T = y2.shape[0]
    if T < lookback + horizon:
        raise ValueError(f"y must have at least lookback + horizon = {lookback + horizon} "
                         f"samples, got {T}")
    starts = xp.arange(0, T - lookback - horizon + 1, stride)
    X = y2[starts[:, None] + xp.arange(lookback)]  # (n, lookback, C)
    Y = y2[starts[:, None] + lookback + xp.arange(horizon)]  # (n, horizon, C)
    return (X[..., 0], Y[..., 0]) if one_d else (X, Y)


class Scaler:
    """Per-channel affine scaling ``(y - center) / scale``, fitted on a training series.

    ``method="standard"``: mean and standard deviation (ddof 0).
    ``method="robust"``: median and interquartile range / 1.349 (the standard
    deviation for normal data, insensitive to outliers).  ``method="none"``:
    center 0, scale 1.  A channel of zero spread gets scale 1.

    Parameters
    ----------
    method : {"standard", "robust", "none"}

    Attributes
    ----------
    center_, scale_ : array, shape (C,)
        Set by :meth:`fit`.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_mamba.timeseries import Scaler
    >>> s = Scaler("standard").fit(np.array([1.0, 2.0, 3.0, 6.0]))
    >>> float(s.center_[0]), round(float(s.scale_[0]), 4)
    (3.0, 1.8708)
    >>> s.transform(np.array([3.0, 6.0])).round(4)
    array([0.    , 1.6036])
    >>> r = Scaler("robust").fit(np.array([1.0, 2.0, 3.0, 100.0]))
    >>> float(r.center_[0]), round(float(r.scale_[0]), 4)  # median 2.5, IQR 27.25 - 1.75
    (2.5, 18.9029)
    """

    def __init__(self, method="standard"):
        if method is None:
            method = "none"
        if method not in SCALERS:
            raise ValueError(f"method must be one of {SCALERS}, got {method!r}")
        self.method = method
        self.center_ = None
        self.scale_ = None

    def fit(self, y):
        """Fit center and scale per channel on ``y (T,)`` or ``(T, C)``; returns self."""
        y2, _ = as_2d("y", y)
        xp = array_namespace(y=y2)
        y2 = y2.astype(np.float64)
        if self.method == "standard":
            center, scale = y2.mean(axis=0), y2.std(axis=0)
        elif self.method == "robust":
            q25, center, q75 = xp.percentile(y2, xp.asarray([25.0, 50.0, 75.0]), axis=0)
            scale = (q75 - q25) / 1.349
        else:
            center, scale = xp.zeros(y2.shape[1]), xp.ones(y2.shape[1])
        self.center_ = center
        self.scale_ = xp.where(scale > 0, scale, 1.0)
        return self

    def _check(self, y):
        if self.center_ is None:
            raise RuntimeError("Scaler is not fitted: call fit(y) first")
        y2, one_d = as_2d("y", y)
        if y2.shape[1] != self.center_.shape[0]:
            raise ValueError(f"y must have {self.center_.shape[0]} channels like the series "
                             f"the scaler was fitted on, got shape {tuple(y.shape)}")
        return y2, one_d

    def transform(self, y):
        """``(y - center) / scale``, shape and dtype of ``y`` (float)."""
        y2, one_d = self._check(y)
        out = ((y2 - self.center_) / self.scale_).astype(
            y2.dtype if y2.dtype.kind == "f" else np.float64)
        return out[:, 0] if one_d else out

    def inverse_transform(self, y):
        """``y * scale + center``: undoes :meth:`transform`."""
        y2, one_d = self._check(y)
        out = (y2 * self.scale_ + self.center_).astype(
            y2.dtype if y2.dtype.kind == "f" else np.float64)
        return out[:, 0] if one_d else out
