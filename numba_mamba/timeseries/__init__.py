"""Time-series forecasting with Mamba: an ensemble forecaster, intervals, backtests, metrics.

A small API in the style of darts and sktime (and :class:`MambaClassifier`,
``fit(X, y)`` / ``predict_proba(X)``, for classifying series)::

    f = MambaForecaster(season=12)      # or season=None: detected
    f.fit(y, fh=24)                     # y (T,) or (T, C), NumPy (CPU) or CuPy (GPU)
    y_hat = f.predict()                 # (24,) or (24, C): the 24 samples after the end of y
    lo, hi = f.predict_interval(coverage=0.8)
    rows = f.backtest(y, fh=24, n_origins=4)          # per-origin metrics
    f.fit(y, fh=24, future_covariates=calendar)       # (T + 24, K): known ahead
    f.save("model.npz"); g = MambaForecaster.load("model.npz")   # or pickle.dumps(f)

``fh`` is the forecast horizon, given at ``fit``: every member has a
*direct* head for ``fh`` steps (at every position ``k`` of a window the
head emits ``fh * C`` numbers, the forecasts of ``y[k+1], ..., y[k+fh]``
given ``y[..k]``); ``predict`` reads the last position of the last
``lookback`` samples and forecasts up to ``fh`` steps, never recursively.
The members are small Mamba models (:mod:`numba_mamba.models`), one per
lookback and seed, on top of a ridge linear skip (below); their forecasts
are combined by the median.  See :class:`MambaForecaster` for the
defaults and the intervals.

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

The model is :mod:`numba_mamba.models`'s, given ``dtau`` as its time factor
(``model_forward(inputs, params, config, dtau=dtau)``);
:func:`timed_model_forward` and :func:`timed_model_backward` are the same in
the form a :class:`~numba_mamba.training.TrainStep` takes (``dtau`` as the
fourth positional argument).

Linear skip
-----------
With ``linear_skip=True`` the forecast is ``skip(y[k-P+1..k]) + model(window)``:
an affine forecast of all ``H`` steps from the last ``P`` scaled values (a
linear autoregression, fitted in closed form, like the highway component of
LSTNet [4]_ or the linear models of [5]_) plus the Mamba model's
correction, trained on the skip's residuals.  The map is a ridge regression
per step (direct), the least-squares one-step autoregression iterated over
the ``H`` steps (recursive; still an affine map of the lags), or by default
the mean of the two; ``P`` is by default the AIC's lag order
(:func:`ar_order_aic`).  With instance
normalisation the model's inputs are the normalised window and its targets
``(y - skip) / sd``.  ``steps=0`` gives the skip alone, an ablation.

Metrics
-------
:func:`mae`, :func:`rmse`, :func:`mase` (scaled by the in-sample mean
absolute error of the seasonal naive forecast with period ``m`` on the
training series), :func:`smape` (in percent, 0 where ``|y| + |y_hat| = 0``),
:func:`pinball_loss` of quantile forecasts and :func:`interval_coverage`.

Modules
-------
The names above are imported from the package's private modules:
``_metrics`` (the metrics and the seasonal naive forecast), ``_windows``
(input checks, sliding windows, scaling), ``_params`` (scikit-learn's
``get_params``/``set_params``), ``_engine`` (one lookback's members: training,
forecasting, the linear skip), ``_forecaster`` (:class:`MambaForecaster`, the
ensemble over lookbacks), ``_classifier`` and ``_sktime`` (the sktime
adapter, imported on first use).

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
from ._windows import Scaler, make_windows
from ._classifier import MambaClassifier
from ._engine import timed_model_backward, timed_model_forward
from ._forecaster import MambaForecaster, ar_order_aic, detect_season
from ._metrics import interval_coverage, mae, mase, pinball_loss, rmse, seasonal_naive, smape

__all__ = [
    "MambaForecaster", "MambaClassifier", "detect_season", "ar_order_aic", "Scaler", "make_windows",
    "seasonal_naive", "mae", "rmse", "mase", "smape", "pinball_loss", "interval_coverage",
    "timed_model_forward", "timed_model_backward",
]


def __getattr__(name):
    """``MambaSktimeForecaster`` on first use (it imports sktime, an optional package)."""
    if name == "MambaSktimeForecaster":
        from ._sktime import MambaSktimeForecaster
        return MambaSktimeForecaster
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
