"""The single-lookback engine of the forecaster, and the time-aware model in TrainStep's form.

:class:`LookbackModel` trains ``n_members`` Mamba models (seeds) of one lookback with
a direct head for ``horizon`` steps and an optional ridge linear skip; the public
:class:`~numba_mamba.timeseries.MambaForecaster` is an ensemble of these over lookbacks.
"""

import math

import numpy as np

from .._validation import array_namespace, is_cupy_array
from ..models import MambaConfig, init_params, model_backward, model_forward
from ..optim import AdamW, warmup_cosine
from ..training import TrainStep, seed_everything
from ._windows import SCALERS, Scaler, as_2d, check_finite, check_int

__all__ = ["timed_model_forward", "timed_model_backward"]

TIME_AS = ("delta", "feature")
SKIP_FIT = ("direct", "recursive", "both")
TRAIN_ON = ("auto", "all", "last")
COMBINE = ("mean", "median")


# ---------------------------------------------------------------- the time-aware model


def timed_model_forward(inputs, params, config, dtau):
    """:func:`~numba_mamba.models.model_forward` with a time factor per sample, ``dtau``.

    Every block's selective step is ``softplus(dt_proj(x) + b) * dtau``; the
    form with ``dtau`` as the fourth positional argument is what a
    :class:`~numba_mamba.training.TrainStep`'s ``forward`` takes (its
    ``extra`` arrays), with :func:`timed_model_backward` as ``backward``.

    Parameters
    ----------
    inputs : array, shape (Bt, L, d_input)
    params : dict
        From :func:`~numba_mamba.models.init_params`.
    config : MambaConfig
    dtau : array, shape (Bt, L)
        Time step before each sample in units of ``tau`` (the parameters' dtype).

    Returns
    -------
    out : array, shape (Bt, L, d_output)
    cache : ModelCache

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
    return model_forward(inputs, params, config, dtau=dtau)


def timed_model_backward(dout, cache):
    """Gradients of :func:`timed_model_forward`: :func:`~numba_mamba.models.model_backward`
    (``dtau`` gets none)."""
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


class LookbackModel:
    """One lookback of the forecaster: ``n_members`` Mamba models (seeds) and a linear skip.

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
    min_gain : float, optional
        With the linear skip and validation: a member keeps its Mamba part
        only if that lowers the validation MSE of the skip alone (step 0) by
        at least this fraction; otherwise it is the skip alone (the stopping
        step is the minimum over many noisy evaluations, so a small gain is
        expected by chance).  0: the best step, whatever its gain.
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
        Lags of the linear skip; default ``lookback``.  More lags than
        ``lookback`` are allowed: the skip reads them from the series, the
        Mamba model its last ``lookback`` samples.
    skip_fit : {"direct", "recursive", "both"}, optional
        How the skip's map from the lags to the ``horizon`` next values is
        fitted: a ridge regression per step (``"direct"``); the one-step
        least-squares autoregression (no penalty) iterated over the horizon,
        which is also an affine map of the lags (``"recursive"``); or the
        mean of the two maps (``"both"``; with covariates, which a recursion
        cannot read ahead: ``"direct"``).
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
    >>> from numba_mamba.timeseries import mae
    >>> from numba_mamba.timeseries._engine import LookbackModel
    >>> y = np.sin(0.3 * np.arange(200))
    >>> f = LookbackModel(lookback=24, horizon=5, d_model=8, n_layers=1, d_state=4,
    ...                   steps=150, lr=1e-2, val_fraction=0.0, progress=False)
    >>> f = f.fit(y[:190])
    >>> y_hat = f.predict(5)
    >>> y_hat.shape, bool(mae(y[190:195], y_hat) < 0.2)
    ((5,), True)
    """

    def __init__(self, lookback=48, horizon=1, *, d_model=32, n_layers=2, d_state=16,
                 d_conv=4, expand=2, dt_min=1e-3, dt_max=1e-1, scaler="standard",
                 instance_norm=False, train_on="auto", time_as="delta", steps=1000,
                 batch_size=32, lr=3e-3, weight_decay=0.01, warmup_steps=50,
                 max_grad_norm=1.0, val_fraction=0.15, min_gain=0.0, patience=10,
                 eval_every=25,
                 refit=False, n_members=1, combine="mean", linear_skip=False,
                 skip_lags=None, skip_ridge=1e-3, skip_fit="direct", seed=0,
                 dtype=np.float32, device=None, progress=True):
        self.lookback = check_int("lookback", lookback)
        self.horizon = check_int("horizon", horizon)
        for name in ("d_model", "n_layers", "d_state", "d_conv", "expand",
                     "batch_size", "patience", "eval_every", "n_members"):
            check_int(name, locals()[name])
        check_int("steps", steps, low=0 if linear_skip else 1)  # 0: the linear skip alone
        check_int("warmup_steps", warmup_steps, low=0)
        if scaler not in SCALERS:
            raise ValueError(f"scaler must be one of {SCALERS}, got {scaler!r}")
        if time_as not in TIME_AS:
            raise ValueError(f"time_as must be one of {TIME_AS}, got {time_as!r}")
        if train_on not in TRAIN_ON:
            raise ValueError(f"train_on must be one of {TRAIN_ON}, got {train_on!r}")
        if combine not in COMBINE:
            raise ValueError(f"combine must be one of {COMBINE}, got {combine!r}")
        if skip_lags is not None:
            skip_lags = check_int("skip_lags", skip_lags)
        if skip_fit not in SKIP_FIT:
            raise ValueError(f"skip_fit must be one of {SKIP_FIT}, got {skip_fit!r}")
        if not skip_ridge >= 0:
            raise ValueError(f"skip_ridge must be >= 0, got {skip_ridge!r}")
        if not 0 <= min_gain < 1:
            raise ValueError(f"min_gain must be in [0, 1), got {min_gain!r}")
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
            val_fraction=float(val_fraction), min_gain=float(min_gain),
            patience=int(patience),
            eval_every=int(eval_every), refit=bool(refit), n_members=int(n_members),
            combine=combine, linear_skip=bool(linear_skip),
            skip_lags=None if skip_lags is None else int(skip_lags),
            skip_ridge=float(skip_ridge), skip_fit=skip_fit, seed=int(seed),
            dtype=np.dtype(dtype).name, device=device,
            progress=bool(progress))
        self.config_ = None
        self.members_ = None
        self._xp_name = "numpy"
        self.val_pred_ = self.val_true_ = None
        self.past_scaler_ = self.future_scaler_ = self.last_past_ = self.last_future_ = None
        self.history_ = None
        self.tau_ = None
        self.skip_ = None

    def __repr__(self):
        s = self.settings
        return (f"LookbackModel(lookback={s['lookback']}, horizon={s['horizon']}, "
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
    def xp_(self):
        """The array namespace of the fitted state (kept as a name: modules do not pickle)."""
        if self._xp_name == "cupy":
            import cupy
            return cupy
        return np

    @xp_.setter
    def xp_(self, xp):
        self._xp_name = "cupy" if xp is not np else "numpy"

    @property
    def _timed(self):
        return self.tau_ is not None

    @property
    def _use_delta(self):
        return self._timed and self.settings["time_as"] == "delta"

    @staticmethod
    def _check_series(y, t, xp, what="y"):
        if is_cupy_array(y) and xp is np:
            y = y.get()
        y2, one_d = as_2d(what, xp.asarray(y), xp)
        y2 = y2.astype(np.float64)
        check_finite(what, y2, xp)
        tt = None
        if t is not None:
            if is_cupy_array(t) and xp is np:
                t = t.get()
            tt = xp.asarray(t, dtype=np.float64)
            if tt.shape != (y2.shape[0],):
                raise ValueError(f"t must have shape ({y2.shape[0]},) (one time per sample of "
                                 f"{what}), got {tuple(tt.shape)}")
            check_finite("t", tt, xp)
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

    def _check_cov(self, name, a, rows, xp, at_least=False):
        """A covariate array as float64 ``(rows, K)`` (``>= rows`` rows with ``at_least``)."""
        if is_cupy_array(a) and xp is np:
            a = a.get()
        a2, _ = as_2d(name, xp.asarray(a), xp)
        a2 = a2.astype(np.float64)
        if (a2.shape[0] < rows) if at_least else (a2.shape[0] != rows):
            raise ValueError(f"{name} must have {'at least ' if at_least else ''}{rows} rows "
                             f"(time along axis 0), got shape {tuple(a2.shape)}")
        check_finite(name, a2, xp)
        return a2

    def _cov_features(self, pc, fc, T):
        """Covariate inputs ``(T, Kp + H*Kf)`` of positions ``0..T-1`` (scaled), or None.

        ``pc (T, Kp)``: past covariates, the row of each position; ``fc (>= T, Kf)``:
        known-future covariates, rows ``k+1 .. k+H`` of position ``k`` (beyond the
        last row given: its value repeated; such positions are never scored).
        """
        cols = []
        if pc is not None:
            cols.append(self.past_scaler_.transform(pc))
        if fc is not None:
            xp = array_namespace(fc=fc)
            f = self.future_scaler_.transform(fc)
            idx = xp.minimum(xp.arange(T)[:, None] + xp.arange(1, self.horizon + 1),
                             f.shape[0] - 1)
            cols.append(f[idx].reshape(T, -1))
        if not cols:
            return None
        return cols[0] if len(cols) == 1 else array_namespace(c=cols[0]).concatenate(cols, 1)

    # ------------------------------------------------------------ fit

    def fit(self, y, t=None, past=None, future=None, segments=None):
        """Train on the series ``y`` (and its sample times ``t``, for irregular sampling).

        Parameters
        ----------
        y : array, shape (T,) or (T, C)
            The series, NumPy or CuPy, no NaN (fill gaps first, or drop the
            missing samples and pass the times of the kept ones as ``t``).
        t : array, shape (T,), optional
            Strictly increasing sample times.
        past : array, shape (T,) or (T, Kp), optional
            Past covariates: known up to each forecast origin only.
        future : array, shape (T + n, Kf), optional
            Known-future covariates; rows after ``T`` (at least ``horizon`` of
            them, if any) are kept for :meth:`predict`.
        segments : list of (start, end), optional
            ``y`` is several series end to end (a panel, already scaled):
            windows, skip rows and validation parts stay inside each
            segment, the validation part being the end of each.  Not with
            times or covariates.

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
        if segments is not None and (t is not None or past is not None or future is not None):
            raise ValueError("segments (a panel) do not take times or covariates yet")
        segs = [(0, T)] if segments is None else [(int(a), int(b)) for a, b in segments]
        cuts = []
        for i, (a, b) in enumerate(segs):
            Ti = b - a
            n_val = int(round(s["val_fraction"] * Ti)) if s["val_fraction"] > 0 else 0
            if n_val:
                n_val = max(n_val, H)
            need = self._span + H + n_val
            if Ti < need:
                what = "y" if segments is None else f"series {i} of the panel"
                raise ValueError(f"{what} must have at least lookback + horizon"
                                 f"{' + validation samples' if n_val else ''} = {need} samples "
                                 f"(lookback={L}, horizon={H}"
                                 f"{f', {n_val} for validation' if n_val else ''}), got {Ti}")
            cuts.append(b - n_val)  # samples [a, cut) train, [cut, b) validate
        seed_everything(s["seed"])
        self.xp_ = xp
        self.one_d_ = one_d
        self.n_channels_ = C
        self.dtype_ = np.dtype(s["dtype"])
        cut = cuts[0] if segments is None else T  # (panel: scaled already, by the caller)
        train_rows = xp.concatenate([xp.arange(a, c) for (a, _), c in zip(segs, cuts)])
        self.scaler_ = Scaler(s["scaler"]).fit(y2[train_rows])
        self.tau_ = None
        if tt is not None:
            if T < 2:
                raise ValueError("t needs at least 2 samples to define a time step")
            self.tau_ = float(xp.median(xp.diff(tt[:cut])))
        ys = self.scaler_.transform(y2)
        q = self._queries(tt)[0] if self._timed else None
        feats, dtau = self._features(ys, tt, q)
        pc = None if past is None else self._check_cov("past_covariates", past, T, xp)
        fc = None if future is None else self._check_cov("future_covariates", future, T, xp,
                                                         at_least=True)
        self.past_scaler_ = None if pc is None else Scaler(s["scaler"]).fit(pc[:cut])
        self.future_scaler_ = None if fc is None else Scaler(s["scaler"]).fit(fc[:cut])
        cov = self._cov_features(pc, fc, T)
        if cov is not None:
            feats = xp.concatenate([feats, cov], axis=1)
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
        # window starts of training (last target inside [a, cut)) and of the refit, last
        # positions of the validation windows, per segment
        # (a skip with more lags than L: windows start where its lags are complete)
        g = self._span - L
        pool = np.concatenate([np.arange(a + g, c - L - H + 1) for (a, _), c in zip(segs, cuts)])
        pool_all = np.concatenate([np.arange(a + g, b - L - H + 1) for a, b in segs])
        val_ends = [k for (a, b), c in zip(segs, cuts)
                    for k in range(max(c - 1, a + self._span - 1), b - H)]
        n_val = T - int(sum(c - a for (a, _), c in zip(segs, cuts)))
        skip = skip_all = S = S_all = None
        if s["linear_skip"]:
            # ridge regression of y[k+1..k+H] on y[k-P+1..k] (scaled units), rows k whose
            # targets lie in the training part; the model then learns what it leaves over
            Z = self._lags(ys, cov)  # (T, P*C + K + 1)
            P = self._skip_lags
            Yh = ys[idx].reshape(T, H * C)
            rows = xp.asarray(np.concatenate([np.arange(a + P - 1, c - H)
                                              for (a, _), c in zip(segs, cuts)]))
            rows1 = xp.asarray(np.concatenate([np.arange(a + P - 1, c - 1)
                                               for (a, _), c in zip(segs, cuts)]))
            how = s["skip_fit"]
            if cov is not None and how != "direct":  # a recursion cannot read future covariates
                if how == "recursive":
                    raise ValueError("skip_fit='recursive' takes no covariates: use 'direct' "
                                     "(or 'both', which is direct with covariates)")
                how = "direct"
            skip = skip_all = self._fit_skip(Z, Yh, rows, rows1, ys, how)
            S = S_all = (Z @ skip).astype(dt)  # (T, H*C)
            if n_val and s["refit"]:  # the refit's skip sees all of y too
                rows = xp.asarray(np.concatenate([np.arange(a + P - 1, b - H) for a, b in segs]))
                rows1 = xp.asarray(np.concatenate([np.arange(a + P - 1, b - 1) for a, b in segs]))
                skip_all = self._fit_skip(Z, Yh, rows, rows1, ys, how)
                S_all = (Z @ skip_all).astype(dt)
        # positions with a full lag vector for the skip inside their segment (host)
        self._lag_ok = np.concatenate([np.arange(b - a) >= self._skip_lags - 1
                                       for a, b in segs])
        self.members_, self.history_ = [], []
        val_pred = []
        for j in range(s["n_members"]):
            self._data, self.skip_ = (F, Y, DT, S), skip
            params, hist = self._train_member(j, pool, val_ends, s["steps"])
            if val_ends:
                val_pred.append(self._val_forecast(params, val_ends))
            if n_val and s["refit"]:
                self._data, self.skip_ = (F, Y, DT, S_all), skip_all
                params, h2 = self._train_member(j, pool_all, [], hist["best_step"])
                hist["refit_train_losses"] = h2["train_losses"]
            self.members_.append(params)
            self.history_.append(hist)
        self.skip_ = skip_all
        # out-of-sample forecasts of the validation windows by the members before any refit,
        # (n_windows, n_members, H, C) in the scaler's units, and their targets (n_windows, H, C)
        self.val_pred_ = xp.stack(val_pred, axis=1).reshape(-1, len(val_pred), H, C) \
            if val_pred else None
        self.val_true_ = ys[idx][xp.asarray(val_ends, dtype=np.int64)] if val_ends else None
        keep = min(T, self._span)
        self.last_y_ = y2[T - keep:]
        self.last_past_ = None if pc is None else pc[T - keep:]
        self.last_future_ = None if fc is None else fc[T - keep:]  # history rows + known future
        self.last_t_ = None if tt is None else tt[T - keep:]
        del self._data, self._lag_ok
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
        elif S is not None:
            # the first P - 1 samples of a series have no full lag vector for the skip
            ok = self._lag_ok[np.asarray(starts)[:, None] + np.arange(L)]
            if not ok.all():
                mask = xp.asarray(ok[..., None], dtype=x.dtype)
        return (x, y, dtau, mask, sd) if with_scale else (x, y, dtau, mask)

    @property
    def _skip_lags(self):
        return self.settings["skip_lags"] or self.settings["lookback"]

    @property
    def _span(self):
        """Samples of history a forecast reads: the lookback, or more lags of the skip."""
        L = self.settings["lookback"]
        return max(L, self._skip_lags) if self.settings["linear_skip"] else L

    def _lags(self, ys, cov=None):
        """Rows ``[ys[k-P+1..k] flattened, cov[k], 1]`` of the linear skip, ``(T, P*C + K + 1)``.

        Before the start of the series the lags are 0; ``cov (T, K)``: the
        covariate features of each row (see :meth:`_cov_features`), or None.
        """
        xp = array_namespace(ys=ys)
        T, C = ys.shape
        P = self._skip_lags
        pad = xp.concatenate([xp.zeros((P - 1, C)), ys.astype(np.float64)])
        idx = xp.arange(T)[:, None] + xp.arange(P)  # (T, P): pad rows k .. k+P-1
        cols = [pad[idx].reshape(T, P * C)] + ([] if cov is None else [cov])
        return xp.concatenate(cols + [xp.ones((T, 1))], axis=1)

    def _fit_skip(self, Z, Y, rows, rows1, ys, how):
        """The skip's map ``W (P*C + K + 1, H*C)`` from the lag rows ``Z`` (see :meth:`_lags`)
        to the next ``H`` values ``Y (T, H*C)``: ridge on ``rows``, the recursive
        autoregression fitted on the one-step ``rows1`` (targets ``ys[k + 1]``), or their mean
        (``how``, the ``skip_fit``)."""
        maps = []
        if how in ("direct", "both"):
            maps.append(self._ridge(Z[rows], Y[rows]))
        if how in ("recursive", "both"):
            maps.append(self._recursive_map(Z[rows1], ys[rows1 + 1], Z.shape[1]))
        return maps[0] if len(maps) == 1 else (maps[0] + maps[1]) / 2

    def _ridge(self, Z, Y):
        """Ridge solution ``W (d, H*C)`` of ``Z W ~ Y`` (penalty ``skip_ridge * n``, the
        intercept not penalised)."""
        xp = array_namespace(Z=Z)
        n, d = Z.shape
        R = xp.eye(d) * (self.settings["skip_ridge"] * n)
        R[-1, -1] = 0.0
        return xp.linalg.solve(Z.T @ Z + R, Z.T @ Y.astype(np.float64))

    def _recursive_map(self, Z, y1, d):
        """The ``H``-step forecast of the least-squares AR(P) on the lags (and intercept), as
        an affine map ``W (d, H*C)`` of a lag row: each forecast step is a linear function of
        the row, found by iterating the one-step model on those functions."""
        xp = array_namespace(Z=Z)
        C, P, H = self.n_channels_, self._skip_lags, self.horizon
        cols = list(range(P * C)) + [d - 1]  # the lags and the intercept
        A = xp.linalg.lstsq(Z[:, cols], y1.astype(np.float64), rcond=None)[0]  # (P*C+1, C)
        E = xp.zeros((d, len(cols)))
        E[xp.asarray(cols), xp.arange(len(cols))] = 1.0
        # the functions (d, C) of the last P values, oldest first, then the forecasts
        vals = [E[:, j * C:(j + 1) * C] for j in range(P)]
        one = E[:, -1:]
        out = []
        for _ in range(H):
            nxt = one @ A[-1:]
            for j in range(P):
                nxt = nxt + vals[len(vals) - P + j] @ A[j * C:(j + 1) * C]
            vals.append(nxt)
            out.append(nxt)
        return xp.concatenate(out, axis=1)

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
        out, _ = model_forward(x, params, self.config_, dtau=dtau)
        d = out[:, -1] - y[:, -1]  # (B, H*C)
        if sd is not None:  # instance-normalised: back to the scaler's units
            d = (d.reshape(d.shape[0], -1, self.n_channels_) * sd).reshape(d.shape)
        return float((d * d).mean())

    def _val_forecast(self, params, val_ends):
        """Forecasts ``(n_windows, H*C)`` in the scaler's units at the validation positions."""
        xp = self.xp_
        L = self.settings["lookback"]
        starts = np.asarray(val_ends) - (L - 1)
        F, Y, DT, S = self._data
        pos = xp.asarray(starts)[:, None] + xp.arange(L)
        x = F[pos]
        dtau = None if DT is None or not self._use_delta else DT[pos]
        mu = sd = None
        if self.settings["instance_norm"]:
            x, _, mu, sd = self._instance_norm(x)
        out = model_forward(x, params, self.config_, dtau=dtau)[0][:, -1].astype(np.float64)  # (B, H*C)
        B, C = out.shape[0], self.n_channels_
        out = out.reshape(B, -1, C)
        if sd is not None:
            out = out * sd
        if S is not None:
            out = out + S[pos[:, -1]].astype(np.float64).reshape(B, -1, C)
        elif mu is not None:
            out = out + mu
        return out.reshape(B, -1)

    def _train_member(self, j, pool, val_ends, steps):
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
                       **(dict(forward=timed_model_forward, backward=timed_model_backward)
                          if timed else {}))
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
        zero = dict(best)
        bar = _progress(range(steps), s["progress"], f"member {j + 1}/{s['n_members']}")
        for step in bar:
            starts = pool[rng.integers(0, len(pool), min(s["batch_size"], len(pool)))]
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
        if val_ends and s["linear_skip"] and best["val"] > (1 - s["min_gain"]) * zero["val"]:
            best = zero  # too small a gain over the skip alone to tell from noise
        hist["steps_run"] = len(hist["train_losses"])
        hist["best_step"] = best["step"] if best["params"] is not None else hist["steps_run"]
        hist["best_val"] = best["val"] if best["params"] is not None else None
        return (best["params"] if best["params"] is not None else params), hist

    # ------------------------------------------------------------ predict

    def _check_fitted(self):
        if self.members_ is None:
            raise RuntimeError("the forecaster is not fitted: call fit(y) first")

    def predict(self, horizon, y=None, t=None, t_future=None, members=False, past=None,
                future=None):
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
        members : bool, optional
            Return each member's direct forecast, shape ``(n_members, horizon)``
            or ``(n_members, horizon, C)`` (``horizon`` at most the model's).
        past, future : array, optional
            With covariates fitted: the past covariates of ``y`` (its rows), and
            the known-future ones of ``y``'s rows and the model's ``horizon``
            rows after them (the head reads all of them); without ``y``:
            ``future`` holds the ``horizon`` rows after the fitted series
            (default: those given to :meth:`fit` beyond it).

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
            if yh.shape[0] < self._span:
                what = f"lookback = {L}" if self._span == L else \
                    f"skip_lags = {self._span} (the linear skip's lags)"
                raise ValueError(f"y must have at least {what} samples, got {yh.shape[0]}")
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
        cov = self._predict_cov(y, yh.shape[0], past, future)
        R = self._span
        yh, th = yh[-R:], None if th is None else th[-R:]
        if cov is not None and (not members or horizon > H):
            raise ValueError(f"with covariates the forecast is direct only: horizon must be "
                             f"<= {H} (members=True)")
        if members:  # each member's direct forecast, no recursion
            if horizon > H:
                raise ValueError(f"horizon must be <= {H} for the members' forecasts, "
                                 f"got {horizon}")
            res = self._member_forecasts(yh, th, tf, cov)[:, :horizon]
            return res[..., 0] if self.one_d_ else res
        out = []
        done = 0
        while done < horizon:
            step = self._predict_block(yh, th, None if tf is None else tf[done:])
            n = min(H, horizon - done)
            out.append(step[:n])
            yh = xp.concatenate([yh, step[:n]])[-R:]
            if th is not None:
                th = xp.concatenate([th, tf[done:done + n]])[-R:]
            done += n
        res = xp.concatenate(out)
        return res[:, 0] if self.one_d_ else res

    def _predict_block(self, yh, th, tf):
        """The direct ``(H, C)`` forecast after history ``yh (L, C)``, combined over members."""
        outs = self._member_forecasts(yh, th, tf)
        xp = self.xp_
        return xp.median(outs, axis=0) if self.settings["combine"] == "median" \
            else outs.mean(axis=0)

    def _predict_cov(self, y, n_hist, past, future):
        """Covariate features ``(L, K)`` of the last ``lookback`` history rows, or None."""
        if self.past_scaler_ is None and self.future_scaler_ is None:
            if past is not None or future is not None:
                raise ValueError("covariates given to predict but not to fit")
            return None
        # the direct head reads the covariates of all its H steps, whatever is asked of it
        xp, L, H = self.xp_, self.settings["lookback"], self.horizon
        pc = fc = None
        if self.past_scaler_ is not None:
            if y is None:
                pc = self.last_past_ if past is None else None
            if pc is None:
                if past is None:
                    raise ValueError("past_covariates of the history y are needed (fitted "
                                     "with past covariates)")
                pc = self._check_cov("past_covariates", past, n_hist, xp)
        if self.future_scaler_ is not None:
            n_known = self.last_future_.shape[0] - self.last_y_.shape[0]
            if y is None and future is None:
                if n_known < H:
                    raise ValueError(f"future_covariates of the {H} forecast steps are "
                                     f"needed: fit got {n_known} row(s) after the series")
                fc = self.last_future_
            elif y is None:
                fut = self._check_cov("future_covariates", future, H, xp, at_least=True)
                fc = xp.concatenate([self.last_future_[:self.last_y_.shape[0]], fut])
            else:
                fc = self._check_cov("future_covariates", future, n_hist + H, xp,
                                     at_least=True)
        n = min(n_hist, self._span)
        pc = None if pc is None else pc[pc.shape[0] - n:]
        if fc is not None:
            start = (self.last_y_.shape[0] if y is None else n_hist) - n
            fc = fc[start:]
        return self._cov_features(pc, fc, n)

    def _member_forecasts(self, yh, th, tf, cov=None):
        """Each member's direct forecast ``(n_members, H, C)`` after history ``yh (R, C)``,
        with covariate features ``cov (R, K)`` (or None); the models read the last
        ``lookback`` rows, the skip its lags."""
        xp = self.xp_
        H, C, L = self.horizon, self.n_channels_, self.settings["lookback"]
        ys = self.scaler_.transform(yh)
        q = None
        if self._timed:
            q, _ = self._queries(th, tf[:H])
        feats, dtau = self._features(ys, th, q)
        if cov is not None:
            feats = xp.concatenate([feats, cov], axis=1)
        x = feats[-L:].astype(self.dtype_)[None]  # (1, L, d_in)
        mu = sd = None
        if self.settings["instance_norm"]:
            x, _, mu, sd = self._instance_norm(x)
        dt = None if dtau is None or not self._use_delta else dtau[-L:].astype(self.dtype_)[None]
        outs = [model_forward(x, params, self.config_, dtau=dt)[0][0, -1].reshape(H, C)
                .astype(np.float64) for params in self.members_]
        outs = xp.stack(outs)  # (n_members, H, C)
        if sd is not None:
            outs = outs * sd[0]
        if self.skip_ is not None:
            outs = outs + (self._lags(ys, cov)[-1] @ self.skip_).reshape(H, C)
        elif mu is not None:
            outs = outs + mu[0]
        return xp.stack([self.scaler_.inverse_transform(o) for o in outs])

    # ------------------------------------------------------------ state

    _STATE = ("skip_", "last_y_", "last_t_", "val_pred_", "val_true_", "last_past_",
              "last_future_")

    def _arrays(self, prefix):
        """The fitted arrays under ``prefix``: members, scaler, skip, end of the series."""
        self._check_fitted()
        out = {f"{prefix}member{j}.{k}": v for j, p in enumerate(self.members_)
               for k, v in p.items()}
        for name, sc in (("scaler", self.scaler_), ("past_scaler", self.past_scaler_),
                         ("future_scaler", self.future_scaler_)):
            if sc is not None:
                out[f"{prefix}{name}.center"] = sc.center_
                out[f"{prefix}{name}.scale"] = sc.scale_
        for name in self._STATE:
            if getattr(self, name) is not None:
                out[prefix + name] = getattr(self, name)
        return out

    def _meta(self):
        """The JSON-able fitted state besides the arrays."""
        return {"settings": self.settings, "one_d": self.one_d_, "n_channels": self.n_channels_,
                "tau": self.tau_, "history": [{k: v for k, v in h.items()
                                               if not k.endswith("train_losses")}
                                              for h in self.history_]}

    @classmethod
    def _restore(cls, meta, arrays, prefix, config, xp):
        """Rebuild a fitted engine from :meth:`_meta` and :meth:`_arrays`."""
        s = dict(meta["settings"])
        lookback, horizon = s.pop("lookback"), s.pop("horizon")
        dtype = np.dtype(s.pop("dtype"))
        self = cls(lookback, horizon, dtype=dtype, **s)
        self.config_, self.xp_, self.dtype_ = config, xp, dtype
        self.one_d_, self.n_channels_ = bool(meta["one_d"]), int(meta["n_channels"])
        self.tau_ = meta["tau"]
        for name in ("scaler", "past_scaler", "future_scaler"):
            sc = None
            if prefix + name + ".center" in arrays:
                sc = Scaler(s["scaler"])
                sc.center_ = arrays[prefix + name + ".center"]
                sc.scale_ = arrays[prefix + name + ".scale"]
            setattr(self, name + "_", sc)
        for name in self._STATE:
            setattr(self, name, arrays.get(prefix + name))
        self.members_ = [{k[len(f"{prefix}member{j}."):]: v for k, v in arrays.items()
                          if k.startswith(f"{prefix}member{j}.")}
                         for j in range(s["n_members"])]
        self.history_ = meta["history"]
        return self
