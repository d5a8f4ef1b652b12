"""Time-series classification with Mamba as a sequence encoder (``MambaClassifier``)."""

import numpy as np

from .._validation import array_namespace, is_cupy_array
from ..models import MambaConfig, init_params, model_backward, model_forward
from ..optim import AdamW, clip_grad_norm, warmup_cosine
from ..training import seed_everything
from ._params import Params
from ._windows import check_int

__all__ = ["MambaClassifier"]

POOLS = ("mean", "last", "meanmax")


def _reverse(x, mask, lengths):
    """Each series of the padded batch ``x`` ``(n, L, C)`` reversed in time over its own length."""
    xp = array_namespace(x=x)
    t = np.arange(x.shape[1])[None, :]
    idx = np.where(t < lengths[:, None], lengths[:, None] - 1 - t, t)
    return xp.take_along_axis(x, xp.asarray(idx)[..., None], axis=1) * mask


def _batch(X, n_channels=None, xp=None):
    """``(x (n, L, C) float64, lengths (n,))`` of equal-length or ragged inputs, zero-padded.

    ``X``: an array ``(n, L)`` or ``(n, L, C)``, or a list of ``(L_i,)`` or ``(L_i, C)`` arrays.
    """
    if isinstance(X, (list, tuple)):
        if not X:
            raise ValueError("X must hold at least one series, got an empty list")
        xp = xp or array_namespace(X=X[0]) if hasattr(X[0], "shape") else (xp or np)
        seqs = []
        for i, s in enumerate(X):
            s = xp.asarray(s, dtype=np.float64)
            if s.ndim == 1:
                s = s[:, None]
            if s.ndim != 2 or s.shape[0] == 0:
                raise ValueError(f"X[{i}] must have shape (length,) or (length, channels) with "
                                 f"length >= 1, got {tuple(s.shape)}")
            seqs.append(s)
        C = seqs[0].shape[1]
        for i, s in enumerate(seqs):
            if s.shape[1] != C:
                raise ValueError(f"X[{i}] must have {C} channel(s) like X[0], got "
                                 f"shape {tuple(s.shape)}")
        lengths = np.array([s.shape[0] for s in seqs])
        x = xp.zeros((len(seqs), int(lengths.max()), C))
        for i, s in enumerate(seqs):
            x[i, :s.shape[0]] = s
    else:
        xp = xp or (array_namespace(X=X) if hasattr(X, "shape") else np)
        x = xp.asarray(X, dtype=np.float64)
        if x.ndim == 2:
            x = x[:, :, None]
        if x.ndim != 3 or 0 in x.shape[:2]:
            raise ValueError(f"X must have shape (n, length) or (n, length, channels) or be a "
                             f"list of series, got {tuple(x.shape)}")
        lengths = np.full(x.shape[0], x.shape[1])
    if n_channels is not None and x.shape[2] != n_channels:
        raise ValueError(f"X must have {n_channels} channel(s) like the training series, got "
                         f"{x.shape[2]}")
    if not bool(xp.isfinite(x).all()):
        raise ValueError("X must be finite, got NaN or inf")
    return x, lengths


class MambaClassifier(Params):
    """Classify (multivariate, variable-length) time series with a small Mamba encoder.

    A stack of Mamba blocks reads each series causally.  With ``pool="mean"``
    or ``"last"`` the regression head emits one logit per class at every
    position and the series' logits are their mean over its positions or the
    last position's; with ``pool="meanmax"`` it emits ``n_features`` features
    per position, whose mean and maximum over the series go through a linear
    layer to the logits.  Trained with softmax cross-entropy and AdamW (linear
    warmup, cosine decay), optionally on augmented views (random crops,
    noise); ``n_seeds`` models (twice as many with ``bidirectional``: one
    reading each series forwards, one backwards) are averaged in probability.

    Parameters
    ----------
    d_model, n_layers, d_state, d_conv, expand : int, optional
        Model size (:class:`~numba_mamba.models.MambaConfig`).
    dt_min, dt_max : float, optional
        Range of the initial selective time step, in samples.
    normalize : {True, "series", "global", False}, optional
        ``True`` or ``"series"``: standardise each series per channel over
        its own samples (the UCR convention; a channel without spread is
        only centred).  ``"global"``: standardise each channel by the mean
        and spread of all training samples (keeps each series' level and
        amplitude; the default, chosen over ``"series"`` and ``False`` on
        held-out parts of the BasicMotions and JapaneseVowels training
        splits; the four univariate UCR datasets used are z-normalised
        already).  ``False``: the values as given.
    pool : {"mean", "last", "meanmax"}, optional
    n_features : int, optional
        Features per position pooled by ``"meanmax"`` (unused otherwise).
        ``"meanmax"`` scored below ``"mean"`` on held-out parts of three
        UCR training splits (``examples/RESULTS_forecasting.md``).
    bidirectional : bool, optional
        Train a second model per seed on the time-reversed series.
    crop : float, optional
        Training batches show each series as a random contiguous piece of at
        least this share of its length (1: whole series).
    jitter : float, optional
        Standard deviation of Gaussian noise added to the (standardised)
        training series at every step (0: none).

        The defaults of these three (True, 0.8, 0.1) were chosen over
        (False, 1, 0) on held-out parts of six UCR/UEA training splits,
        never their test splits (``examples/RESULTS_forecasting.md``).
    steps, batch_size, lr, weight_decay, warmup_steps, max_grad_norm : optional
        Optimisation (at most ``steps`` per seed).
    val_fraction : float, optional
        Share of each class held out (stratified) to pick the stopping step:
        the validation cross-entropy is evaluated every ``eval_every`` steps
        and training stops after ``patience`` evaluations without a better
        one; 0 (default): train ``steps`` steps.  On six UCR/UEA datasets
        0.2 scored lower on average than 0 (``examples/RESULTS_forecasting.md``).
    eval_every, patience : int, optional
    refit : bool, optional
        After early stopping, train again from the same initialization on
        all series for the chosen number of steps.
    n_seeds : int, optional
        Models per direction, with seeds ``seed, seed + 1, ...``; their
        probabilities are averaged.  2 (the default) scored above 1 on
        held-out parts of six UCR/UEA training splits (mean 0.903 against
        0.881, ``examples/RESULTS_forecasting.md``) at twice the fit time.
    seed : int, optional
    dtype : {numpy.float32, numpy.float64}, optional

    Attributes
    ----------
    classes_ : ndarray
        The labels, sorted (``numpy.unique`` of ``y``).
    members_ : list of dict
        Per trained model (seed, then direction): ``{"reverse": bool,
        "model": params, "head": params of the pooled features' layer}``.
    losses_ : list of list of float
        Training loss per step, per member (of the final training).
    best_steps_ : list of int
        The stopping step of each member (``steps`` without validation).

    Examples
    --------
    >>> import numpy as np
    >>> from numba_mamba.timeseries import MambaClassifier
    >>> rng = np.random.default_rng(0)
    >>> t = np.arange(40)
    >>> X = np.stack([np.sin(t / (2 + k % 2 * 4)) for k in range(40)])
    >>> X = X + 0.1 * rng.standard_normal(X.shape)
    >>> y = np.array(["slow" if k % 2 else "fast" for k in range(40)])
    >>> clf = MambaClassifier(d_model=8, n_layers=1, d_state=4, steps=60, lr=1e-2)
    >>> clf = clf.fit(X[:30], y[:30])
    >>> bool((clf.predict(X[30:]) == y[30:]).mean() >= 0.9), clf.predict_proba(X[30:]).shape
    (True, (10, 2))
    """

    def __init__(self, *, d_model=32, n_layers=2, d_state=16, d_conv=4, expand=2,
                 dt_min=1e-3, dt_max=1e-1, normalize="global", pool="mean", n_features=32,
                 bidirectional=True, crop=0.8, jitter=0.1, steps=400,
                 batch_size=32, lr=3e-3, weight_decay=0.01, warmup_steps=40,
                 max_grad_norm=1.0, val_fraction=0.0, eval_every=20, patience=5, refit=True,
                 n_seeds=2, seed=0, dtype=np.float32):
        args = {k: v for k, v in locals().items() if k != "self"}
        for k, v in args.items():
            setattr(self, k, v)
        self._validate()
        self.members_ = None

    def _validate(self):
        for name in ("d_model", "n_layers", "d_state", "d_conv", "expand", "steps", "n_features",
                     "batch_size", "n_seeds", "eval_every", "patience"):
            check_int(name, getattr(self, name))
        check_int("warmup_steps", self.warmup_steps, low=0)
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")
        if np.dtype(self.dtype) not in (np.float32, np.float64):
            raise TypeError(f"dtype must be float32 or float64, got {np.dtype(self.dtype)}")
        if self.normalize not in (True, False, "series", "global"):
            raise ValueError(f"normalize must be True, False, 'series' or 'global', "
                             f"got {self.normalize!r}")
        if not 0 < self.crop <= 1:
            raise ValueError(f"crop must be in (0, 1], got {self.crop!r}")
        if not self.jitter >= 0:
            raise ValueError(f"jitter must be >= 0, got {self.jitter!r}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")

    def __repr__(self):
        return f"MambaClassifier(d_model={self.d_model}, n_layers={self.n_layers})"

    # ------------------------------------------------------------ data

    def _prepare(self, X, fitted=False):
        """Padded, normalised inputs ``(n, L, C)`` in the model dtype and the mask ``(n, L, 1)``."""
        x, lengths = _batch(X, self.n_channels_ if fitted else None)
        xp = array_namespace(x=x)
        mask = (xp.arange(x.shape[1])[None, :] < xp.asarray(lengths)[:, None])[..., None]
        mask = mask.astype(np.float64)
        if self.normalize is True or self.normalize == "series":
            n = xp.asarray(lengths, dtype=np.float64)[:, None, None]
            mu = x.sum(axis=1, keepdims=True) / n
            sd = xp.sqrt((((x - mu) * mask) ** 2).sum(axis=1, keepdims=True) / n)
            x = (x - mu) / xp.where(sd > 0, sd, 1.0) * mask
        elif self.normalize == "global":
            if not fitted:  # per channel, over every sample of the training series
                n = float(sum(lengths))
                mu = (x * mask).sum(axis=(0, 1)) / n
                sd = xp.sqrt((((x - mu) * mask) ** 2).sum(axis=(0, 1)) / n)
                self.center_, self.scale_ = mu, xp.where(sd > 0, sd, 1.0)
            x = (x - xp.asarray(self.center_)) / xp.asarray(self.scale_) * mask
        dt = np.dtype(self.dtype)
        return x.astype(dt), mask.astype(dt), lengths

    def _head_forward(self, head, out, mask, lengths):
        """Logits ``(n, K)`` of the model outputs ``out`` ``(n, L, F)`` and the backward's cache.

        ``"mean"``/``"last"``: ``out`` holds per-position logits, pooled.
        ``"meanmax"``: ``out`` holds ``n_features`` features per position; their
        mean and maximum over the series' positions go through the linear
        layer ``head`` (``{"weight": (2F, K), "bias": (K,)}``).
        """
        xp = array_namespace(out=out)
        n = xp.asarray(lengths, dtype=out.dtype)[:, None]
        if self.pool == "last":
            return out[xp.arange(out.shape[0]), xp.asarray(lengths) - 1], None
        mean = (out * mask).sum(axis=1) / n
        if self.pool == "mean":
            return mean, None
        masked = xp.where(mask > 0, out, out.dtype.type(-np.inf))
        arg = masked.argmax(axis=1)  # (n, F)
        mx = xp.take_along_axis(masked, arg[:, None, :], axis=1)[:, 0]
        feat = xp.concatenate([mean, mx], axis=1)
        return feat @ head["weight"] + head["bias"], (feat, arg, out.shape, mask, n, head)

    def _head_backward(self, dz, hcache, out, mask, lengths):
        """``(dout, dhead)`` from the logits' gradient ``dz`` ``(n, K)``."""
        xp = array_namespace(out=out)
        if self.pool == "last":
            d = xp.zeros_like(out)
            d[xp.arange(out.shape[0]), xp.asarray(lengths) - 1] = dz
            return d, {}
        if self.pool == "mean":
            n = xp.asarray(lengths, dtype=out.dtype)[:, None, None]
            return dz[:, None, :] * mask / n, {}
        feat, arg, shape, mask, n, head = hcache
        dfeat = dz @ head["weight"].T
        F = shape[2]
        dout = dfeat[:, None, :F] * mask / n[:, :, None]
        rows = xp.arange(shape[0])[:, None]
        cols = xp.arange(F)[None, :]
        dout[rows, arg, cols] += dfeat[:, F:]
        return dout, {"weight": feat.T @ dz, "bias": dz.sum(axis=0)}

    def _init_head(self, rng, xp):
        """The linear layer on the pooled features (``"meanmax"``); ``{}`` otherwise."""
        if self.pool != "meanmax":
            return {}
        K, F = len(self.classes_), self.n_features
        dt = np.dtype(self.dtype)
        W = rng.standard_normal((2 * F, K)) / np.sqrt(2 * F)
        return {"weight": xp.asarray(W, dtype=dt), "bias": xp.zeros(K, dtype=dt)}

    def _augment(self, x, mask, lengths, rng):
        """Training views of a batch: random crops (``crop``) and noise (``jitter``)."""
        xp = array_namespace(x=x)
        if self.crop < 1:
            lo = np.ceil(self.crop * lengths).astype(np.int64)
            new = rng.integers(np.minimum(lo, lengths), lengths + 1)
            start = rng.integers(0, lengths - new + 1)
            L = int(new.max())
            t = np.arange(L)[None, :]
            idx = np.minimum(start[:, None] + t, x.shape[1] - 1)
            keep = (t < new[:, None]).astype(x.dtype)[..., None]
            idx = xp.asarray(idx)
            x = xp.take_along_axis(x, idx[..., None], axis=1) * xp.asarray(keep)
            mask, lengths = xp.asarray(keep), new
        if self.jitter > 0:
            noise = rng.standard_normal(x.shape).astype(x.dtype) * x.dtype.type(self.jitter)
            x = x + xp.asarray(noise) * mask
        return x, mask, lengths

    # ------------------------------------------------------------ fit / predict

    def fit(self, X, y):
        """Train on series ``X`` with labels ``y``.

        Parameters
        ----------
        X : array, shape (n, L) or (n, L, C), or a list of (L_i,) or (L_i, C) arrays
            Time along axis 1 (axis 0 of each listed series); series of
            different lengths are zero-padded at the end and masked.
        y : array-like, shape (n,)
            Labels of any type (at least two classes).

        Returns
        -------
        self
        """
        self._validate()
        x, mask, lengths = self._prepare(X)
        y = np.asarray(y.get() if is_cupy_array(y) else y)
        if y.shape != (x.shape[0],):
            raise ValueError(f"y must have shape ({x.shape[0]},) (one label per series), "
                             f"got {tuple(y.shape)}")
        self.classes_, yi = np.unique(y, return_inverse=True)
        K = len(self.classes_)
        if K < 2:
            raise ValueError(f"y must hold at least 2 classes, got {K}")
        xp = array_namespace(x=x)
        self.n_channels_ = x.shape[2]
        self.config_ = MambaConfig(d_model=self.d_model, n_layers=self.n_layers,
                                   d_input=self.n_channels_,
                                   d_output=self.n_features if self.pool == "meanmax" else K,
                                   d_state=self.d_state, d_conv=self.d_conv, expand=self.expand,
                                   dt_min=self.dt_min, dt_max=self.dt_max)
        seed_everything(self.seed)
        onehot = xp.asarray(np.eye(K)[yi], dtype=x.dtype)
        views = [(False, (x, mask, lengths, onehot))]
        if self.bidirectional:
            views.append((True, (_reverse(x, mask, lengths), mask, lengths, onehot)))
        val = self._split(yi)
        train = np.setdiff1d(np.arange(x.shape[0]), val)
        self.members_, self.losses_, self.best_steps_ = [], [], []
        for j in range(self.n_seeds):
            for reverse, self._data in views:
                params, losses, best = self._train(j, train, val, self.steps, reverse)
                if len(val) and self.refit:
                    params, losses, _ = self._train(j, np.arange(x.shape[0]), [], best, reverse)
                self.members_.append({"reverse": reverse, **params})
                self.losses_.append(losses)
                self.best_steps_.append(best)
        del self._data
        return self

    def _split(self, yi):
        """Stratified validation indices: ``val_fraction`` of each class with 2+ series."""
        if self.val_fraction == 0:
            return np.zeros(0, dtype=np.int64)
        rng = np.random.default_rng([self.seed, 7])
        out = []
        for c in np.unique(yi):
            idx = rng.permutation(np.nonzero(yi == c)[0])
            out.append(idx[:min(int(round(self.val_fraction * len(idx))), len(idx) - 1)])
        return np.sort(np.concatenate(out)).astype(np.int64)

    def _batch_loss(self, member, idx, rng=None):
        """Mean cross-entropy and a closure giving the gradients, on series ``idx``.

        ``rng``: augment the batch (training); None: the series as they are.
        """
        x, mask, lengths, onehot = self._data
        xp = array_namespace(x=x)
        ix = xp.asarray(idx)
        xb, mb, lb = x[ix], mask[ix], lengths[np.asarray(idx)]
        if rng is not None:
            xb, mb, lb = self._augment(xb, mb, lb, rng)
        out, cache = model_forward(xb, member["model"], self.config_)
        z, hcache = self._head_forward(member["head"], out, mb, lb)
        z = z - z.max(axis=1, keepdims=True)
        lse = xp.log(xp.exp(z).sum(axis=1, keepdims=True))
        ob = onehot[ix]
        loss = float(-(ob * (z - lse)).sum(axis=1).mean())

        def grads():
            dout, dhead = self._head_backward((xp.exp(z - lse) - ob) / len(idx), hcache, out,
                                              mb, lb)
            _, g = model_backward(dout, cache)
            return {**g, **{"head." + k: v for k, v in dhead.items()}}
        return loss, grads

    def _train(self, j, train, val, steps, reverse=False):
        """Train seed ``j`` on series ``train``; early stopping on ``val`` (if any).

        Returns ``(member, losses, best_step)``, ``member`` = ``{"model": params, "head": ...}``.
        """
        xp = array_namespace(x=self._data[0])
        rng = np.random.default_rng([self.seed, j, int(reverse)])
        init = np.random.default_rng([self.seed, j, 1])
        member = {"model": init_params(self.config_, seed=init, dtype=np.dtype(self.dtype),
                                       xp=xp),
                  "head": self._init_head(init, xp)}
        flat = {**member["model"], **{"head." + k: v for k, v in member["head"].items()}}
        opt = AdamW(lr=self.lr, weight_decay=self.weight_decay)
        n = len(train)
        B = min(self.batch_size, n)
        warm = min(self.warmup_steps, self.steps)
        losses, best, bad = [], (np.inf, steps, None), 0
        order, pos = rng.permutation(train), 0
        augment = self.crop < 1 or self.jitter > 0
        for step in range(steps):
            if pos + B > n:  # epochs of random batches
                order, pos = rng.permutation(train), 0
            loss, grad_fn = self._batch_loss(member, order[pos:pos + B], rng if augment else None)
            pos += B
            losses.append(loss)
            grads = grad_fn()
            if self.max_grad_norm is not None:
                clip_grad_norm(grads, self.max_grad_norm)
            opt.step(flat, grads, lr=warmup_cosine(step, self.lr, warm, self.steps,
                                                    self.lr / 10))
            if len(val) and ((step + 1) % self.eval_every == 0 or step + 1 == steps):
                v = sum(self._batch_loss(member, val[k:k + 256])[0] * len(val[k:k + 256])
                        for k in range(0, len(val), 256)) / len(val)
                if v < best[0]:
                    best = (v, step + 1, {part: {k: a.copy() for k, a in d.items()}
                                          for part, d in member.items()})
                    bad = 0
                else:
                    bad += 1
                    if bad >= self.patience:
                        break
        if best[2] is None:
            return member, losses, steps
        return best[2], losses, best[1]

    def predict_proba(self, X, batch_size=256):
        """Class probabilities ``(n, n_classes)``, columns in the order of ``classes_``."""
        if self.members_ is None:
            raise RuntimeError("MambaClassifier is not fitted: call fit(X, y) first")
        x, mask, lengths = self._prepare(X, fitted=True)
        xp = array_namespace(x=x)
        out = xp.zeros((x.shape[0], len(self.classes_)))
        xr = _reverse(x, mask, lengths) if self.bidirectional else None
        for member in self.members_:
            xm = xr if member["reverse"] else x
            for s in range(0, x.shape[0], batch_size):
                sl = slice(s, s + batch_size)
                o, _ = model_forward(xm[sl], member["model"], self.config_)
                z = self._head_forward(member["head"], o, mask[sl], lengths[sl])[0]
                z = z.astype(np.float64)
                z = xp.exp(z - z.max(axis=1, keepdims=True))
                out[sl] += z / z.sum(axis=1, keepdims=True)
        return out / len(self.members_)

    def predict(self, X):
        """Labels ``(n,)``: the most probable class of each series."""
        p = self.predict_proba(X)
        if is_cupy_array(p):
            p = p.get()
        return self.classes_[np.argmax(p, axis=1)]

    def score(self, X, y):
        """Accuracy on ``(X, y)``."""
        return float((self.predict(X) == np.asarray(y)).mean())
