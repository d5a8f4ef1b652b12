"""Time-series forecasting with Mamba: a fit/predict forecaster, windowing, scaling, metrics.

A small API in the style of darts and sktime::

    f = MambaForecaster(lookback=48, horizon=20, seed=0)
    f.fit(y)                    # y (T,) or (T, C), NumPy (CPU) or CuPy (GPU)
    y_hat = f.predict(20)       # (20,) or (20, C): the 20 samples after the end of y
    f.save("model.npz"); g = MambaForecaster.load("model.npz")

The model is a stack of Mamba blocks with a regression head
(:mod:`numba_mamba.models`) read out *directly* for all ``H = horizon``
steps at once: at every position ``k`` of a window the head emits
``H * C`` numbers, the forecasts of ``y[k+1], ..., y[k+H]`` given
``y[..k]``.  Prediction reads the last position of the last ``lookback``
samples.  Horizons beyond ``H`` are forecast recursively, ``H`` steps at a
time, feeding the forecasts back in.

Irregularly sampled series
--------------------------
Given sample times ``t`` (strictly increasing), the time step between
samples becomes the SSM's time step.  With ``tau`` the median step of the
training times and ``dtau_k = (t_k - t_{k-1}) / tau`` (``dtau_0 = 1``), the
selective time step of every block is a learned multiple of it::

    delta_k = softplus(dt_proj(x_k) + dt_bias) * dtau_k              (Bt, d_inner, L)
    h_k     = exp(delta_k A) h_{k-1} + delta_k B_k x_k

so the state decays over the real time elapsed (zero-order hold for ``A``
over each gap).  On a regular grid ``dtau = 1`` and this is the plain Mamba
block.  The inputs also carry ``dtau_k`` and the offsets of the query times,
``(t_{k+j} - t_k) / tau`` for ``j = 1..H``, so the head knows *when* it is
asked to forecast.  ``time_as="feature"`` keeps those inputs but leaves the
scan's step alone (an ablation); without ``t`` the times are ignored.  The
causal convolution inside each block still counts samples, not time.

:mod:`numba_mamba.models` builds ``delta`` inside the block and has no input
for an external time step, so the time-aware stack (:func:`timed_model_forward`,
:func:`timed_model_backward`) is composed here from :mod:`numba_mamba.layers`
with the same parameter names; with ``dtau = 1`` it equals
:func:`~numba_mamba.models.model_forward`.

Linear skip
-----------
With ``linear_skip=True`` the forecast is ``skip(y[k-P+1..k]) + model(window)``:
a ridge-regression direct forecast of all ``H`` steps from the last ``P``
scaled values (a linear autoregression, fitted in closed form, like the
highway component of LSTNet [4]_ or the linear models of [5]_) plus the Mamba
model's correction, trained on the skip's residuals.  With instance
normalisation the model's inputs are the normalised window and its targets
``(y - skip) / sd``.  ``steps=0`` gives the skip alone, an ablation.

Metrics
-------
:func:`mae`, :func:`rmse`, :func:`mase` (scaled by the in-sample mean
absolute error of the seasonal naive forecast with period ``m`` on the
training series) and :func:`smape` (in percent, 0 where ``|y| + |y_hat| = 0``).

References
----------
.. [1] A. Gu and T. Dao, "Mamba: Linear-Time Sequence Modeling with Selective
   State Spaces", arXiv:2312.00752, 2023.
.. [2] R. J. Hyndman and A. B. Koehler, "Another look at measures of forecast
   accuracy", International Journal of Forecasting 22(4), 2006 (MASE).
.. [3] T. Kim et al., "Reversible Instance Normalization for Accurate
   Time-Series Forecasting against Distribution Shift", ICLR 2022.
.. [4] G. Lai et al., "Modeling Long- and Short-Term Temporal Patterns with
   Deep Neural Networks" (LSTNet), SIGIR 2018.
.. [5] A. Zeng et al., "Are Transformers Effective for Time Series
   Forecasting?", AAAI 2023.
"""

import math
import os
from typing import NamedTuple

import numpy as np

from ._validation import array_namespace, is_cupy_array
from .checkpoint import load_checkpoint, save_checkpoint
from .layers import (conv1d_backward, conv1d_forward, linear_backward, linear_forward,
                     rmsnorm_backward, rmsnorm_forward, selective_scan_backward,
                     selective_scan_forward, softplus_backward, softplus_forward)
from .models import MambaConfig, init_params, layer_params, model_backward, model_forward
from .optim import AdamW, warmup_cosine
from .training import TrainStep, seed_everything

__all__ = [
    "MambaForecaster", "Scaler", "make_windows", "seasonal_naive",
    "mae", "rmse", "mase", "smape",
    "timed_model_forward", "timed_model_backward",
]

SCALERS = ("standard", "robust", "none")
TIME_AS = ("delta", "feature")
TRAIN_ON = ("auto", "all", "last")
COMBINE = ("mean", "median")
_FORMAT = "numba-mamba-forecaster"


# ---------------------------------------------------------------- helpers


def _as_2d(name, y, xp=None):
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


def _check_finite(name, y, xp):
    bad = ~xp.isfinite(y)
    if bool(bad.any()):
        rows = xp.nonzero(bad.any(axis=tuple(range(1, y.ndim))))[0]
        first = [int(i) for i in rows[:5]]
        raise ValueError(f"{name} must be finite, got NaN or inf at {int(rows.size)} time "
                         f"index(es), first {first}; fill or drop them first (e.g. "
                         f"pandas .interpolate()) or pass sample times t of the kept ones")


def _check_int(name, v, low=1):
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
    lookback = _check_int("lookback", lookback)
    horizon = _check_int("horizon", horizon)
    stride = _check_int("stride", stride)
    y2, one_d = _as_2d("y", y)
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
        y2, _ = _as_2d("y", y)
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
        y2, one_d = _as_2d("y", y)
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


# ---------------------------------------------------------------- metrics


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
    m = _check_int("m", m)
    xp, a, p = _pair(y_true, y_pred)
    tr, _ = _as_2d("y_train", y_train, xp)
    tr = tr.astype(np.float64)
    a2, _ = _as_2d("y_true", a, xp)
    p2, _ = _as_2d("y_pred", p, xp)
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


def seasonal_naive(y_train, horizon, m=1):
    """Seasonal naive forecast: repeat the last season, ``y_hat[j] = y[T - m + (j mod m)]``.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_mamba.timeseries import seasonal_naive
    >>> seasonal_naive(np.array([1.0, 2.0, 3.0, 4.0, 5.0]), 5, m=2)
    array([4., 5., 4., 5., 4.])
    """
    horizon = _check_int("horizon", horizon)
    m = _check_int("m", m)
    tr, one_d = _as_2d("y_train", y_train)
    xp = array_namespace(y_train=tr)
    T = tr.shape[0]
    if T < m:
        raise ValueError(f"y_train must have at least m = {m} samples, got {T}")
    out = tr[T - m + xp.arange(horizon) % m]
    return out[:, 0] if one_d else out


# ---------------------------------------------------------------- the time-aware model


class TimedBlockCache(NamedTuple):
    """What :func:`_timed_block_forward` keeps for :func:`_timed_block_backward`."""

    in_x: object  # LinearCache of in_proj (input u (Bt, L, d_model))
    conv: object  # Conv1dCache (Bt, d_inner, L)
    x_proj: object  # LinearCache, channels first: xc (Bt, d_inner, L)
    dt_proj: object  # LinearCache with bias, channels first: dt_low (Bt, R, L)
    softplus: object  # (dt_raw,) with dt_raw (Bt, d_inner, L)
    scan: object  # ScanCache
    out_proj: object  # LinearCache: y^T (Bt, L, d_inner)
    A: object  # (d_inner, N)
    dtau: object  # (Bt, 1, L) time step in units of tau
    rank: int


def _timed_block_forward(u, p, dtau):
    """Mamba block whose selective step is ``softplus(dt_proj(x) + b) * dtau``."""
    xp = array_namespace(u=u, dtau=dtau)
    di = p["in_proj.weight"].shape[0] // 2
    xz, c_in = linear_forward(u, p["in_proj.weight"], p.get("in_proj.bias"))  # (Bt, L, 2di)
    xs = xp.ascontiguousarray(xz[..., :di].transpose(0, 2, 1))  # (Bt, di, L)
    z = xp.ascontiguousarray(xz[..., di:].transpose(0, 2, 1))
    xc, c_conv = conv1d_forward(xs, p["conv1d.weight"], p.get("conv1d.bias"),
                                activation="silu")
    A = -xp.exp(p["A_log"])  # (di, N)
    N = A.shape[1]
    R = p["dt_proj.weight"].shape[1]
    x_dbl, c_xproj = linear_forward(xc, p["x_proj.weight"], axis=-2)  # (Bt, R+2N, L)
    dt_raw, c_dt = linear_forward(x_dbl[:, :R], p["dt_proj.weight"], p["dt_proj.bias"],
                                  axis=-2)  # (Bt, di, L)
    sp, c_sp = softplus_forward(dt_raw)
    dtau3 = dtau[:, None, :]  # (Bt, 1, L)
    y, last, c_scan = selective_scan_forward(xc, sp * dtau3, A, x_dbl[:, R:R + N],
                                             x_dbl[:, R + N:], D=p["D"], z=z)
    out, c_out = linear_forward(y.transpose(0, 2, 1), p["out_proj.weight"],
                                p.get("out_proj.bias"))  # (Bt, L, d_model)
    return out, TimedBlockCache(c_in, c_conv, c_xproj, c_dt, c_sp, c_scan, c_out, A, dtau3, R)


def _timed_block_backward(dout, c):
    xp = array_namespace(dout=dout, A=c.A)
    g = {}
    dyT, g["out_proj.weight"], db = linear_backward(dout, c.out_proj)
    if db is not None:
        g["out_proj.bias"] = db
    s = selective_scan_backward(dyT.transpose(0, 2, 1), c.scan)
    g["A_log"] = s.dA * c.A
    g["D"] = s.dD
    ddt_raw = softplus_backward(s.ddelta * c.dtau, c.softplus)  # delta = softplus(dt_raw) dtau
    ddt_low, g["dt_proj.weight"], g["dt_proj.bias"] = linear_backward(ddt_raw, c.dt_proj)
    R, N = c.rank, c.A.shape[1]
    Bt, di, L = s.du.shape
    dx_dbl = xp.empty((Bt, R + 2 * N, L), dtype=s.du.dtype)
    dx_dbl[:, :R] = ddt_low
    dx_dbl[:, R:R + N] = s.dB
    dx_dbl[:, R + N:] = s.dC
    dxc2, g["x_proj.weight"], _ = linear_backward(dx_dbl, c.x_proj)
    dxs, g["conv1d.weight"], dcb = conv1d_backward(s.du + dxc2, c.conv)
    if dcb is not None:
        g["conv1d.bias"] = dcb
    dxz = xp.empty((Bt, L, 2 * di), dtype=dxs.dtype)
    dxz[..., :di] = dxs.transpose(0, 2, 1)
    dxz[..., di:] = s.dz.transpose(0, 2, 1)
    du, g["in_proj.weight"], dbin = linear_backward(dxz, c.in_x)
    if dbin is not None:
        g["in_proj.bias"] = dbin
    return du, g


class TimedModelCache(NamedTuple):
    """What :func:`timed_model_forward` keeps for :func:`timed_model_backward`."""

    config: object
    stem: object  # LinearCache of the encoder
    norms: list  # RMSNormCache per layer
    blocks: list  # TimedBlockCache per layer
    norm_f: object
    head: object  # LinearCache of the decoder


def timed_model_forward(inputs, params, config, dtau):
    """Regression model of :mod:`numba_mamba.models` with an external time step per sample.

    The same residual stack, norms, encoder and decoder as
    :func:`~numba_mamba.models.model_forward`, with every block's selective
    step multiplied by ``dtau``: ``delta = softplus(dt_proj(x) + b) * dtau``.

    Parameters
    ----------
    inputs : array, shape (Bt, L, d_input)
    params : dict
        From :func:`~numba_mamba.models.init_params` (``block="mamba"``).
    config : MambaConfig
        A regression config.
    dtau : array, shape (Bt, L)
        Positive time step before each sample (dtype of ``inputs``).

    Returns
    -------
    out : array, shape (Bt, L, d_output)
    cache : TimedModelCache

    Examples
    --------
    >>> import numpy as np
    >>> from numba_mamba import models, timeseries
    >>> cfg = models.MambaConfig(d_model=8, n_layers=1, d_input=1, d_output=2, d_state=4)
    >>> params = models.init_params(cfg, dtype=np.float64)
    >>> x = np.random.default_rng(0).standard_normal((2, 6, 1))
    >>> out, cache = timeseries.timed_model_forward(x, params, cfg, np.ones((2, 6)))
    >>> bool(np.allclose(out, models.model_forward(x, params, cfg)[0]))  # dtau = 1: plain Mamba
    True
    """
    if config.head != "regression" or config.block != "mamba":
        raise ValueError(f"config must be a regression model of Mamba blocks, got head "
                         f"{config.head!r}, block {config.block!r}")
    if inputs.ndim != 3 or inputs.shape[-1] != config.d_input:
        raise ValueError(f"inputs must have shape (batch, length, {config.d_input}), "
                         f"got {tuple(inputs.shape)}")
    if tuple(dtau.shape) != tuple(inputs.shape[:2]):
        raise ValueError(f"dtau must have shape {tuple(inputs.shape[:2])} (batch, length), "
                         f"got {tuple(dtau.shape)}")
    h, c_stem = linear_forward(inputs, params["encoder.weight"], params["encoder.bias"])
    norms, blocks = [], []
    for i in range(config.n_layers):
        hn, c_norm = rmsnorm_forward(h, params[f"layers.{i}.norm.weight"], config.norm_eps)
        o, c_blk = _timed_block_forward(hn, layer_params(params, i), dtau)
        h = h + o
        norms.append(c_norm)
        blocks.append(c_blk)
    hf, c_normf = rmsnorm_forward(h, params["norm_f.weight"], config.norm_eps)
    out, c_head = linear_forward(hf, params["decoder.weight"], params["decoder.bias"])
    return out, TimedModelCache(config, c_stem, norms, blocks, c_normf, c_head)


def timed_model_backward(dout, cache):
    """Gradients of :func:`timed_model_forward`: ``(dinputs, grads)`` like
    :func:`~numba_mamba.models.model_backward` (``dtau`` gets none)."""
    g = {}
    dhf, g["decoder.weight"], g["decoder.bias"] = linear_backward(dout, cache.head)
    dh, g["norm_f.weight"] = rmsnorm_backward(dhf, cache.norm_f)
    for i in reversed(range(cache.config.n_layers)):
        dhn, gb = _timed_block_backward(dh, cache.blocks[i])
        for k, v in gb.items():
            g[f"layers.{i}.mixer.{k}"] = v
        dh_norm, g[f"layers.{i}.norm.weight"] = rmsnorm_backward(dhn, cache.norms[i])
        dh = dh + dh_norm
    dinputs, g["encoder.weight"], g["encoder.bias"] = linear_backward(dh, cache.stem)
    return dinputs, g


def _forward(inputs, params, config, dtau):
    if dtau is None:
        return model_forward(inputs, params, config)
    return timed_model_forward(inputs, params, config, dtau)


def _backward(dout, cache):
    if isinstance(cache, TimedModelCache):
        return timed_model_backward(dout, cache)
    return model_backward(dout, cache)


# ---------------------------------------------------------------- the forecaster


def _progress(iterable, enabled, desc):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional
        return iterable
    return tqdm(iterable, desc=desc, leave=False)


class MambaForecaster:
    """Forecast a univariate or multivariate series with a small Mamba model.

    ``fit(y)`` trains on sliding windows of ``lookback`` samples with a direct
    head for ``horizon`` steps; ``predict(h)`` forecasts the ``h`` samples
    after the end of the series.  See the module docstring for the model and
    the handling of sample times.

    Parameters
    ----------
    lookback : int
        Samples the model sees before each forecast.
    horizon : int
        Steps of the direct multi-step head (``predict`` goes further
        recursively).
    d_model, n_layers, d_state, d_conv, expand : int, optional
        Model size (:class:`~numba_mamba.models.MambaConfig`).
    dt_min, dt_max : float, optional
        Range of the initial selective time step, in samples (or in units
        of the median sample spacing with times).
    scaler : {"standard", "robust", "none"}, optional
        Per-channel scaling fitted on the training part of the series.
    instance_norm : bool, optional
        Also normalise each window by its own per-channel mean and standard
        deviation (reversible instance normalisation without the learned
        affine; helps with level shifts and trends).  Forecasts are mapped
        back with the window's statistics.
    train_on : {"auto", "all", "last"}, optional
        Positions of a window that count in the loss: every position (each
        forecasts its own next ``horizon`` samples), or only the last.
        ``"auto"``: ``"last"`` with instance normalisation (its statistics
        come from the whole window, which earlier positions would peek at),
        else ``"all"``.
    time_as : {"delta", "feature"}, optional
        With sample times: time step as the SSM's step and as input
        (``"delta"``), or as input only (``"feature"``).
    steps : int, optional
        Maximum optimizer steps per ensemble member (0 with ``linear_skip``:
        the linear skip alone, no training).
    batch_size : int, optional
        Windows per step.
    lr, weight_decay, warmup_steps, max_grad_norm : optional
        AdamW with linear warmup and cosine decay to ``lr / 10`` over ``steps``.
    val_fraction : float, optional
        Fraction of the series (its end) held out to pick the stopping step;
        0 disables validation (train ``steps`` steps).
    patience : int, optional
        Stop after this many evaluations without a better validation loss.
    eval_every : int, optional
        Steps between validation evaluations.
    refit : bool, optional
        After early stopping, train again from the same initialization on
        the whole series (validation part included) for the chosen number of
        steps.
    n_members : int, optional
        Ensemble size: members differ in seed, forecasts are combined.
    combine : {"mean", "median"}, optional
        How the members' forecasts are combined.
    linear_skip : bool, optional
        Add a direct linear autoregression to the model's forecast: ridge
        regression of the next ``horizon`` (scaled) values on the last
        ``skip_lags`` ones, fitted in closed form on the training part
        before the model is trained; the Mamba model then learns what it
        leaves over (its head starts at zero, and step 0, the skip alone,
        is a candidate for early stopping).  The skip sees the globally
        scaled values, so it keeps the level and amplitude that instance
        normalisation and the final RMSNorm take from the model's input.
    skip_lags : int, optional
        Lags of the linear skip (<= ``lookback``); default ``lookback``.
    skip_ridge : float, optional
        Ridge penalty of the skip, per training row (the intercept is not
        penalised).
    seed : int, optional
    dtype : {numpy.float32, numpy.float64}, optional
    device : {None, "cpu", "gpu"}, optional
        None: where ``y`` lives (NumPy: CPU, CuPy: GPU).
    progress : bool, optional
        Show a tqdm progress bar per member.

    Attributes
    ----------
    config_ : MambaConfig
    members_ : list of dict
        Trained parameters of each ensemble member.
    history_ : list of dict
        Per member: ``best_step``, ``best_val`` (validation MSE in scaled
        units), ``steps_run``, ``train_losses``, ``val_losses``.
    skip_ : array, shape (skip_lags * C + 1, horizon * C) or None
        Weights of the linear skip (scaled units; last row the intercept).

    Examples
    --------
    >>> import numpy as np
    >>> from numba_mamba.timeseries import MambaForecaster, mae
    >>> y = np.sin(0.3 * np.arange(200))
    >>> f = MambaForecaster(lookback=24, horizon=5, d_model=8, n_layers=1, d_state=4,
    ...                     steps=150, lr=1e-2, val_fraction=0.0, progress=False)
    >>> f = f.fit(y[:190])
    >>> y_hat = f.predict(5)
    >>> y_hat.shape, bool(mae(y[190:195], y_hat) < 0.2)
    ((5,), True)
    """

    def __init__(self, lookback=48, horizon=1, *, d_model=32, n_layers=2, d_state=16,
                 d_conv=4, expand=2, dt_min=1e-3, dt_max=1e-1, scaler="standard",
                 instance_norm=False, train_on="auto", time_as="delta", steps=1000,
                 batch_size=32, lr=3e-3, weight_decay=0.01, warmup_steps=50,
                 max_grad_norm=1.0, val_fraction=0.15, patience=10, eval_every=25,
                 refit=False, n_members=1, combine="mean", linear_skip=False,
                 skip_lags=None, skip_ridge=1e-3, seed=0, dtype=np.float32, device=None,
                 progress=True):
        self.lookback = _check_int("lookback", lookback)
        self.horizon = _check_int("horizon", horizon)
        for name in ("d_model", "n_layers", "d_state", "d_conv", "expand",
                     "batch_size", "patience", "eval_every", "n_members"):
            _check_int(name, locals()[name])
        _check_int("steps", steps, low=0 if linear_skip else 1)  # 0: the linear skip alone
        _check_int("warmup_steps", warmup_steps, low=0)
        if scaler not in SCALERS:
            raise ValueError(f"scaler must be one of {SCALERS}, got {scaler!r}")
        if time_as not in TIME_AS:
            raise ValueError(f"time_as must be one of {TIME_AS}, got {time_as!r}")
        if train_on not in TRAIN_ON:
            raise ValueError(f"train_on must be one of {TRAIN_ON}, got {train_on!r}")
        if combine not in COMBINE:
            raise ValueError(f"combine must be one of {COMBINE}, got {combine!r}")
        if skip_lags is not None:
            skip_lags = _check_int("skip_lags", skip_lags)
            if skip_lags > self.lookback:
                raise ValueError(f"skip_lags must be <= lookback = {self.lookback}, "
                                 f"got {skip_lags}")
        if not skip_ridge >= 0:
            raise ValueError(f"skip_ridge must be >= 0, got {skip_ridge!r}")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
        if np.dtype(dtype) not in (np.float32, np.float64):
            raise TypeError(f"dtype must be float32 or float64, got {np.dtype(dtype)}")
        if device not in (None, "cpu", "gpu"):
            raise ValueError(f"device must be None, 'cpu' or 'gpu', got {device!r}")
        self.settings = dict(
            lookback=self.lookback, horizon=self.horizon, d_model=int(d_model),
            n_layers=int(n_layers), d_state=int(d_state), d_conv=int(d_conv),
            expand=int(expand), dt_min=float(dt_min), dt_max=float(dt_max), scaler=scaler,
            instance_norm=bool(instance_norm), train_on=train_on, time_as=time_as,
            steps=int(steps), batch_size=int(batch_size), lr=float(lr),
            weight_decay=float(weight_decay), warmup_steps=int(warmup_steps),
            max_grad_norm=None if max_grad_norm is None else float(max_grad_norm),
            val_fraction=float(val_fraction), patience=int(patience),
            eval_every=int(eval_every), refit=bool(refit), n_members=int(n_members),
            combine=combine, linear_skip=bool(linear_skip),
            skip_lags=None if skip_lags is None else int(skip_lags),
            skip_ridge=float(skip_ridge), seed=int(seed), dtype=np.dtype(dtype).name, device=device,
            progress=bool(progress))
        self.config_ = None
        self.members_ = None
        self.history_ = None
        self.tau_ = None
        self.skip_ = None

    def __repr__(self):
        s = self.settings
        return (f"MambaForecaster(lookback={s['lookback']}, horizon={s['horizon']}, "
                f"d_model={s['d_model']}, n_layers={s['n_layers']}, "
                f"n_members={s['n_members']})")

    # ------------------------------------------------------------ setup

    def _xp_for(self, y):
        dev = self.settings["device"]
        if dev == "gpu":
            import cupy
            return cupy
        if dev == "cpu":
            return np
        return array_namespace(y=y) if hasattr(y, "shape") else np

    @property
    def _timed(self):
        return self.tau_ is not None

    @property
    def _use_delta(self):
        return self._timed and self.settings["time_as"] == "delta"

    def _check_series(self, y, t, xp, what="y"):
        if is_cupy_array(y) and xp is np:
            y = y.get()
        y2, one_d = _as_2d(what, xp.asarray(y), xp)
        y2 = y2.astype(np.float64)
        _check_finite(what, y2, xp)
        tt = None
        if t is not None:
            if is_cupy_array(t) and xp is np:
                t = t.get()
            tt = xp.asarray(t, dtype=np.float64)
            if tt.shape != (y2.shape[0],):
                raise ValueError(f"t must have shape ({y2.shape[0]},) (one time per sample of "
                                 f"{what}), got {tuple(tt.shape)}")
            _check_finite("t", tt, xp)
            if tt.size > 1 and bool((xp.diff(tt) <= 0).any()):
                k = int(xp.nonzero(xp.diff(tt) <= 0)[0][0])
                raise ValueError(f"t must be strictly increasing, got t[{k}] = {float(tt[k])} "
                                 f">= t[{k + 1}] = {float(tt[k + 1])}")
        return y2, one_d, tt

    def _features(self, ys, tt, q):
        """Model inputs ``(T, d_input)`` and time steps ``(T,)`` for a scaled series.

        ``ys (T, C)`` scaled values, ``tt (T,)`` times or None, ``q (T, H)``
        query-time offsets or None.  Columns: the C values, then with times
        ``dtau - 1`` and the H offsets in units of ``tau * H``.
        """
        xp = array_namespace(ys=ys)
        if not self._timed:
            return ys, None
        dtau = xp.ones(ys.shape[0])
        dtau[1:] = xp.diff(tt) / self.tau_
        H = self.horizon
        return xp.concatenate([ys, dtau[:, None] - 1.0, q / (self.tau_ * H)], axis=1), dtau

    def _queries(self, tt, t_future=None):
        """Offsets ``(T, H)`` of the H query times after each sample (known ones only).

        Beyond the last known time the spacing continues with ``tau``.
        """
        xp = array_namespace(tt=tt)
        H = self.horizon
        ext = tt if t_future is None else xp.concatenate([tt, t_future])
        n = ext.shape[0]
        pad = ext[-1] + self.tau_ * xp.arange(1, H + 1)
        ext = xp.concatenate([ext, pad])
        idx = xp.arange(tt.shape[0])[:, None] + xp.arange(1, H + 1)
        return ext[idx] - tt[:, None], n

    # ------------------------------------------------------------ fit

    def fit(self, y, t=None):
        """Train on the series ``y`` (and its sample times ``t``, for irregular sampling).

        Parameters
        ----------
        y : array, shape (T,) or (T, C)
            The series, NumPy or CuPy, no NaN (fill gaps first, or drop the
            missing samples and pass the times of the kept ones as ``t``).
        t : array, shape (T,), optional
            Strictly increasing sample times.

        Returns
        -------
        self

        Raises
        ------
        ValueError
            NaN or inf in ``y`` or ``t``; ``t`` not increasing or of the wrong
            shape; a series too short for ``lookback + horizon`` (plus the
            validation part).
        """
        s = self.settings
        xp = self._xp_for(y)
        y2, one_d, tt = self._check_series(y, t, xp)
        T, C = y2.shape
        L, H = s["lookback"], s["horizon"]
        n_val = int(round(s["val_fraction"] * T)) if s["val_fraction"] > 0 else 0
        if n_val:
            n_val = max(n_val, H)
        need = L + H + n_val
        if T < need:
            raise ValueError(f"y must have at least lookback + horizon"
                             f"{' + validation samples' if n_val else ''} = {need} samples "
                             f"(lookback={L}, horizon={H}"
                             f"{f', {n_val} for validation' if n_val else ''}), got {T}")
        seed_everything(s["seed"])
        self.xp_ = xp
        self.one_d_ = one_d
        self.n_channels_ = C
        self.dtype_ = np.dtype(s["dtype"])
        cut = T - n_val  # samples [0, cut) train, [cut, T) validate
        self.scaler_ = Scaler(s["scaler"]).fit(y2[:cut])
        self.tau_ = None
        if tt is not None:
            if T < 2:
                raise ValueError("t needs at least 2 samples to define a time step")
            self.tau_ = float(xp.median(xp.diff(tt[:cut])))
        ys = self.scaler_.transform(y2)
        q = self._queries(tt)[0] if self._timed else None
        feats, dtau = self._features(ys, tt, q)
        d_in = feats.shape[1]
        self.config_ = MambaConfig(d_model=s["d_model"], n_layers=s["n_layers"], d_input=d_in,
                                   d_output=H * C, d_state=s["d_state"], d_conv=s["d_conv"],
                                   expand=s["expand"], dt_min=s["dt_min"], dt_max=s["dt_max"])
        dt = self.dtype_
        F = feats.astype(dt)  # (T, d_in)
        # targets (T, H*C): row k holds y[k+1 .. k+H] (h-major), valid for k <= T-1-H
        idx = xp.minimum(xp.arange(T)[:, None] + xp.arange(1, H + 1), T - 1)
        Y = ys[idx].reshape(T, H * C).astype(dt)
        DT = None if dtau is None else dtau.astype(dt)
        # window w covers positions [w, w + L); its last position w + L - 1 forecasts up to w+L-1+H
        n_train = cut - L - H + 1  # last target inside [0, cut)
        val_ends = list(range(max(cut - 1, L - 1), T - H))  # last positions of validation windows
        skip = skip_all = S = S_all = None
        if s["linear_skip"]:
            # ridge regression of y[k+1..k+H] on y[k-P+1..k] (scaled units), rows k whose
            # targets lie in the training part; the model then learns what it leaves over
            Z = self._lags(ys)  # (T, P*C + 1)
            P = self._skip_lags
            Yh = ys[idx].reshape(T, H * C)
            skip = skip_all = self._fit_skip(Z[P - 1:cut - H], Yh[P - 1:cut - H])
            S = S_all = (Z @ skip).astype(dt)  # (T, H*C)
            if n_val and s["refit"]:  # the refit's skip sees all of y too
                skip_all = self._fit_skip(Z[P - 1:T - H], Yh[P - 1:T - H])
                S_all = (Z @ skip_all).astype(dt)
        self.members_, self.history_ = [], []
        for j in range(s["n_members"]):
            self._data, self.skip_ = (F, Y, DT, S), skip
            params, hist = self._train_member(j, n_train, val_ends, s["steps"])
            if n_val and s["refit"]:
                self._data, self.skip_ = (F, Y, DT, S_all), skip_all
                params, h2 = self._train_member(j, T - L - H + 1, [], hist["best_step"])
                hist["refit_train_losses"] = h2["train_losses"]
            self.members_.append(params)
            self.history_.append(hist)
        self.skip_ = skip_all
        keep = min(T, L)
        self.last_y_ = y2[T - keep:]
        self.last_t_ = None if tt is None else tt[T - keep:]
        del self._data
        return self

    def _window(self, starts, train_on, with_scale=False):
        """Gather windows starting at ``starts`` (host ints): inputs, targets, dtau, mask.

        With the linear skip the targets are what the skip leaves over.
        ``with_scale``: also return the instance-norm scale ``(B, 1, C)`` (or None).
        """
        xp = self.xp_
        F, Y, DT, S = self._data
        L = self.settings["lookback"]
        pos = xp.asarray(starts)[:, None] + xp.arange(L)  # (B, L)
        x, y = F[pos], Y[pos]  # (B, L, d_in), (B, L, H*C)
        base = None if S is None else S[pos]
        dtau = None if DT is None or not self._use_delta else DT[pos]
        sd = None
        if self.settings["instance_norm"]:
            x, y, _, sd = self._instance_norm(x, y, base)
        elif base is not None:
            y = y - base
        mask = None
        if train_on == "last":
            mask = xp.zeros((1, L, 1), dtype=x.dtype)
            mask[:, -1] = 1
        elif S is not None and int(starts.min()) < self._skip_lags - 1:
            # the first P - 1 samples of the series have no full lag vector for the skip
            mask = (pos >= self._skip_lags - 1)[..., None].astype(x.dtype)
        return (x, y, dtau, mask, sd) if with_scale else (x, y, dtau, mask)

    @property
    def _skip_lags(self):
        return self.settings["skip_lags"] or self.settings["lookback"]

    def _lags(self, ys):
        """Rows ``[ys[k-P+1..k] flattened, 1]`` of the linear skip, ``(T, P*C + 1)``.

        Before the start of the series the lags are 0.
        """
        xp = array_namespace(ys=ys)
        T, C = ys.shape
        P = self._skip_lags
        pad = xp.concatenate([xp.zeros((P - 1, C)), ys.astype(np.float64)])
        idx = xp.arange(T)[:, None] + xp.arange(P)  # (T, P): pad rows k .. k+P-1
        return xp.concatenate([pad[idx].reshape(T, P * C), xp.ones((T, 1))], axis=1)

    def _fit_skip(self, Z, Y):
        """Ridge solution ``W (P*C + 1, H*C)`` of ``Z W ~ Y`` (penalty ``skip_ridge * n``,
        the intercept not penalised)."""
        xp = array_namespace(Z=Z)
        n, d = Z.shape
        R = xp.eye(d) * (self.settings["skip_ridge"] * n)
        R[-1, -1] = 0.0
        return xp.linalg.solve(Z.T @ Z + R, Z.T @ Y.astype(np.float64))

    def _instance_norm(self, x, y=None, base=None):
        """Normalise the value columns of windows ``x (B, L, d_in)`` by their own stats.

        Targets ``y`` become ``(y - mu) / sd``, or ``(y - base) / sd`` given the
        skip's forecast ``base``.
        """
        xp = self.xp_
        C = self.n_channels_
        v = x[..., :C]
        mu = v.mean(axis=1, keepdims=True)  # (B, 1, C)
        sd = xp.sqrt(v.var(axis=1, keepdims=True) + 1e-5)
        x = x.copy()
        x[..., :C] = (v - mu) / sd
        if y is not None:
            B, L = y.shape[:2]
            sub = mu[:, :, None] if base is None else base.reshape(B, L, -1, C)
            y = ((y.reshape(B, L, -1, C) - sub) / sd[:, :, None]).reshape(B, L, -1)
        return x, y, mu, sd

    def _val_loss(self, params, val_ends):
        """MSE of the last position's forecasts, in the scaler's units (not the window's)."""
        L = self.settings["lookback"]
        starts = np.asarray(val_ends) - (L - 1)
        x, y, dtau, _, sd = self._window(starts, "last", with_scale=True)
        out, _ = _forward(x, params, self.config_, dtau)
        d = out[:, -1] - y[:, -1]  # (B, H*C)
        if sd is not None:  # instance-normalised: back to the scaler's units
            d = (d.reshape(d.shape[0], -1, self.n_channels_) * sd).reshape(d.shape)
        return float((d * d).mean())

    def _train_member(self, j, n_train, val_ends, steps):
        s = self.settings
        train_on = s["train_on"]
        if train_on == "auto":
            train_on = "last" if s["instance_norm"] else "all"
        rng = np.random.default_rng([s["seed"], j])
        params = init_params(self.config_, seed=np.random.default_rng([s["seed"], j, 1]),
                             dtype=self.dtype_, xp=self.xp_)
        if s["linear_skip"]:  # start from the skip alone: the head's output is 0
            params["decoder.weight"][...] = 0
        opt = AdamW(lr=s["lr"], weight_decay=s["weight_decay"])
        # one whole step (forward, MSE, backward, clipping, AdamW) over static buffers: a CUDA
        # graph replayed per step on the GPU, eager on NumPy; losses are read at evaluations
        timed = self._data[2] is not None and self._use_delta
        ts = TrainStep(params, self.config_, opt, max_grad_norm=s["max_grad_norm"],
                       **(dict(forward=_forward, backward=_backward) if timed else {}))
        xp = self.xp_
        masked = train_on == "last" or self._data[3] is not None  # (see _window)
        warm = min(s["warmup_steps"], s["steps"])
        best = dict(val=math.inf, step=steps, params=None)
        hist = dict(train_losses=[], val_losses=[])
        bad = 0
        if val_ends and s["linear_skip"]:  # step 0 (the skip alone) is a candidate too
            v = self._val_loss(params, val_ends)
            hist["val_losses"].append((0, v))
            best.update(val=v, step=0, params={k: a.copy() for k, a in params.items()})
        bar = _progress(range(steps), s["progress"], f"member {j + 1}/{s['n_members']}")
        for step in bar:
            starts = rng.integers(0, n_train, min(s["batch_size"], n_train))
            x, y, dtau, mask = self._window(starts, train_on)
            if mask is None and masked:  # the shapes of a TrainStep's buffers stay fixed
                mask = xp.ones(x.shape[:2] + (1,), dtype=x.dtype)
            ts.step(x, y, mask, lr=warmup_cosine(step, s["lr"], warm, s["steps"], s["lr"] / 10),
                    extra=() if dtau is None else (dtau,))
            done = step + 1
            if val_ends and (done % s["eval_every"] == 0 or done == steps):
                hist["train_losses"].extend(ts.losses())
                v = self._val_loss(params, val_ends)
                hist["val_losses"].append((done, v))
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{hist['train_losses'][-1]:.4g}", val=f"{v:.4g}")
                if v < best["val"]:
                    best.update(val=v, step=done,
                                params={k: a.copy() for k, a in params.items()})
                    bad = 0
                else:
                    bad += 1
                    if bad >= s["patience"]:
                        break
        hist["train_losses"].extend(ts.losses())
        hist["steps_run"] = len(hist["train_losses"])
        hist["best_step"] = best["step"] if best["params"] is not None else hist["steps_run"]
        hist["best_val"] = best["val"] if best["params"] is not None else None
        return (best["params"] if best["params"] is not None else params), hist

    # ------------------------------------------------------------ predict

    def _check_fitted(self):
        if self.members_ is None:
            raise RuntimeError("MambaForecaster is not fitted: call fit(y) first")

    def predict(self, horizon, y=None, t=None, t_future=None):
        """Forecast the ``horizon`` samples after the end of a series.

        Parameters
        ----------
        horizon : int
            Steps ahead (>= 1); beyond the model's ``horizon`` the forecast
            continues recursively, ``horizon`` steps at a time.
        y : array, shape (T,) or (T, C), optional
            History to forecast from (at least ``lookback`` samples are used);
            default: the end of the series given to :meth:`fit`.
        t : array, shape (T,), optional
            Sample times of ``y`` (needed with ``y`` if fitted with times).
        t_future : array, shape (horizon,), optional
            Times of the samples to forecast, after the last of ``t``; with
            times, default: continue with the median spacing of the training
            times.

        Returns
        -------
        array, shape (horizon,) or (horizon, C)
            In the forecaster's array namespace (NumPy on the CPU).

        Raises
        ------
        ValueError
            ``horizon`` not a positive integer; a history shorter than
            ``lookback``, with NaN, or of the wrong number of channels.
        """
        if isinstance(horizon, bool) or not isinstance(horizon, (int, np.integer)) \
                or horizon <= 0:
            raise ValueError(f"horizon must be a positive integer, got {horizon!r}")
        self._check_fitted()
        xp = self.xp_
        L, H, C = self.settings["lookback"], self.horizon, self.n_channels_
        if y is None:
            if t is not None:
                raise ValueError("t given without y: pass the history y with its times t")
            yh, th = self.last_y_, self.last_t_
        else:
            yh, _, th = self._check_series(y, t, xp)
            if yh.shape[1] != C:
                raise ValueError(f"y must have {C} channel(s) like the fitted series, got "
                                 f"shape {tuple(xp.asarray(y).shape)}")
            if yh.shape[0] < L:
                raise ValueError(f"y must have at least lookback = {L} samples, got "
                                 f"{yh.shape[0]}")
            if self._timed and th is None:
                raise ValueError("this forecaster was fitted with sample times: pass t with y")
        if th is not None and not self._timed:
            th = None  # fitted without times: they are ignored
        tf = None
        if self._timed:
            if t_future is None:
                tf = th[-1] + self.tau_ * xp.arange(1, horizon + 1)
            else:
                tf = xp.asarray(t_future, dtype=np.float64)
                if tf.shape != (horizon,):
                    raise ValueError(f"t_future must have shape ({horizon},) (horizon), "
                                     f"got {tuple(tf.shape)}")
                if bool((xp.diff(xp.concatenate([th[-1:], tf])) <= 0).any()):
                    raise ValueError("t_future must be strictly increasing and after the "
                                     "last time of t")
        yh, th = yh[-L:], None if th is None else th[-L:]
        out = []
        done = 0
        while done < horizon:
            step = self._predict_block(yh, th, None if tf is None else tf[done:])
            n = min(H, horizon - done)
            out.append(step[:n])
            yh = xp.concatenate([yh, step[:n]])[-L:]
            if th is not None:
                th = xp.concatenate([th, tf[done:done + n]])[-L:]
            done += n
        res = xp.concatenate(out)
        return res[:, 0] if self.one_d_ else res

    def _predict_block(self, yh, th, tf):
        """The direct ``(H, C)`` forecast after history ``yh (L, C)``, averaged over members."""
        xp = self.xp_
        H, C = self.horizon, self.n_channels_
        ys = self.scaler_.transform(yh)
        q = None
        if self._timed:
            q, _ = self._queries(th, tf[:H])
        feats, dtau = self._features(ys, th, q)
        x = feats.astype(self.dtype_)[None]  # (1, L, d_in)
        mu = sd = None
        if self.settings["instance_norm"]:
            x, _, mu, sd = self._instance_norm(x)
        dt = None if dtau is None or not self._use_delta else dtau.astype(self.dtype_)[None]
        outs = [_forward(x, params, self.config_, dt)[0][0, -1].reshape(H, C).astype(np.float64)
                for params in self.members_]
        outs = xp.stack(outs)  # (n_members, H, C)
        if sd is not None:
            outs = outs * sd[0]
        if self.skip_ is not None:
            outs = outs + (self._lags(ys)[-1] @ self.skip_).reshape(H, C)
        elif mu is not None:
            outs = outs + mu[0]
        pred = xp.median(outs, axis=0) if self.settings["combine"] == "median" \
            else outs.mean(axis=0)
        return self.scaler_.inverse_transform(pred)

    # ------------------------------------------------------------ save / load

    def save(self, path):
        """Write the fitted forecaster to one ``.npz`` checkpoint (no pickle).

        Uses :func:`numba_mamba.checkpoint.save_checkpoint`: the members'
        parameters under ``member<j>.<name>``, the scaler, the end of the
        series (what :meth:`predict` starts from) and the settings as JSON.
        """
        self._check_fitted()
        arrays = {f"member{j}.{k}": v for j, p in enumerate(self.members_) for k, v in p.items()}
        arrays["scaler.center"] = self.scaler_.center_
        arrays["scaler.scale"] = self.scaler_.scale_
        arrays["data.last_y"] = self.last_y_
        if self.skip_ is not None:
            arrays["skip.weight"] = self.skip_
        if self.last_t_ is not None:
            arrays["data.last_t"] = self.last_t_
        extra = {"format": _FORMAT, "settings": self.settings, "one_d": self.one_d_,
                 "n_channels": self.n_channels_, "tau": self.tau_,
                 "history": [{k: v for k, v in h.items() if k != "train_losses"}
                             for h in self.history_]}
        save_checkpoint(os.fspath(path), arrays, self.config_, step=0, extra=extra)

    @classmethod
    def load(cls, path, xp=np):
        """Read a forecaster written by :meth:`save`; arrays go to ``xp`` (numpy or cupy).

        Raises
        ------
        numba_mamba.CheckpointError
            Not a readable checkpoint, or a checkpoint of something else.
        """
        from .checkpoint import CheckpointError
        ck = load_checkpoint(path, xp=xp)
        extra = ck.extra if isinstance(ck.extra, dict) else {}
        if extra.get("format") != _FORMAT:
            raise CheckpointError(f"{path} is a numba-mamba checkpoint but not of a "
                                  f"MambaForecaster (extra format {extra.get('format')!r})")
        s = dict(extra["settings"])
        s.pop("lookback"), s.pop("horizon")
        dtype = np.dtype(s.pop("dtype"))
        self = cls(extra["settings"]["lookback"], extra["settings"]["horizon"], dtype=dtype,
                   **s)
        self.config_ = ck.config
        self.xp_ = xp
        self.one_d_ = bool(extra["one_d"])
        self.n_channels_ = int(extra["n_channels"])
        self.dtype_ = dtype
        self.tau_ = extra["tau"]
        self.scaler_ = Scaler(s["scaler"])
        self.scaler_.center_ = ck.params["scaler.center"]
        self.scaler_.scale_ = ck.params["scaler.scale"]
        self.last_y_ = ck.params["data.last_y"]
        self.last_t_ = ck.params.get("data.last_t")
        self.skip_ = ck.params.get("skip.weight")
        n = s["n_members"]
        self.members_ = [{k[len(f"member{j}."):]: v for k, v in ck.params.items()
                          if k.startswith(f"member{j}.")} for j in range(n)]
        self.history_ = extra["history"]
        return self
