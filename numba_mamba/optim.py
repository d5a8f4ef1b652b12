"""AdamW, gradient clipping by global norm, and a warmup + cosine learning-rate schedule.

Parameters and gradients are dicts of named arrays (NumPy or CuPy) with the
same keys, as made by :func:`numba_mamba.models.init_params` and
:func:`numba_mamba.models.loss_and_grads`.  Updates are in place.

References
----------
.. [1] I. Loshchilov and F. Hutter, "Decoupled Weight Decay Regularization",
   ICLR 2019.
.. [2] D. P. Kingma and J. Ba, "Adam: A Method for Stochastic Optimization",
   ICLR 2015.
"""

import math

import numpy as np

from ._backends import backend
from ._validation import array_namespace

__all__ = ["AdamW", "FusedAdamW", "clip_grad_norm", "clip_grad_norm_device", "default_no_decay",
           "global_norm", "warmup_cosine"]


def default_no_decay(name):
    """True for parameters exempt from weight decay: A_log, D, dt biases, biases, norms.

    Examples
    --------
    >>> from numba_mamba.optim import default_no_decay
    >>> [default_no_decay(n) for n in ("layers.0.mixer.A_log", "layers.0.mixer.D",
    ...  "layers.0.mixer.dt_proj.bias", "layers.0.norm.weight", "norm_f.weight",
    ...  "layers.0.mixer.in_proj.weight", "embedding.weight")]
    [True, True, True, True, True, False, False]
    """
    parts = name.split(".")
    return parts[-1] in ("A_log", "D", "dt_bias", "bias") or any(
        part.startswith("norm") for part in parts)


class AdamW:
    """Adam with decoupled weight decay, updating a dict of arrays in place.

    For each parameter ``p`` with gradient ``g``, at step ``t = 1, 2, ...``::

        m = beta1 m + (1 - beta1) g
        v = beta2 v + (1 - beta2) g**2
        p = p (1 - lr wd) - lr / (1 - beta1**t) * m / (sqrt(v / (1 - beta2**t)) + eps)

    with ``wd = 0`` for names where ``no_decay(name)`` is True (the same
    arithmetic order as ``torch.optim.AdamW``).

    Parameters
    ----------
    lr : float
        Base learning rate (each :meth:`step` may override it, e.g. from a schedule).
    betas : (float, float), optional
    eps : float, optional
    weight_decay : float, optional
    no_decay : callable, optional
        ``name -> bool``; default :func:`default_no_decay`.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_mamba.optim import AdamW
    >>> params = {"w": np.array([1.0, -2.0])}
    >>> opt = AdamW(lr=0.1, weight_decay=0.0)
    >>> opt.step(params, {"w": np.array([0.5, -3.0])})
    >>> params["w"]  # the first step moves each entry by lr against its gradient's sign
    array([ 0.9, -1.9])
    """

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                 no_decay=default_no_decay):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"need lr, eps, weight_decay >= 0 and betas in [0, 1), got lr={lr}, "
                             f"betas={betas}, eps={eps}, weight_decay={weight_decay}")
        self.lr = float(lr)
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        self.no_decay = no_decay
        self.t = 0
        self.m = {}
        self.v = {}

    def step(self, params, grads, lr=None):
        """One update of every parameter in ``params`` (in place) from ``grads``."""
        missing = sorted(set(params) - set(grads))
        if missing:
            raise KeyError(f"grads lack entries for parameters {missing[:5]}")
        lr = self.lr if lr is None else float(lr)
        b1, b2 = self.betas
        self.t += 1
        bc1 = 1 - b1 ** self.t
        bc2_sqrt = math.sqrt(1 - b2 ** self.t)
        for name, p in params.items():
            g = grads[name]
            if g.shape != p.shape:
                raise ValueError(f"grads[{name!r}] must have shape {tuple(p.shape)}, "
                                 f"got {tuple(g.shape)}")
            xp = array_namespace(param=p, grad=g)
            if name not in self.m:
                self.m[name] = xp.zeros_like(p)
                self.v[name] = xp.zeros_like(p)
            m, v = self.m[name], self.v[name]
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * (g * g)
            wd = 0.0 if self.no_decay(name) else self.weight_decay
            if wd:
                p *= 1 - lr * wd
            p -= (lr / bc1) * m / (xp.sqrt(v) / bc2_sqrt + self.eps)

    def state_dict(self):
        """``{"t", "lr", "betas", "eps", "weight_decay", "m", "v"}`` (arrays not copied)."""
        return {"t": self.t, "lr": self.lr, "betas": list(self.betas), "eps": self.eps,
                "weight_decay": self.weight_decay, "m": dict(self.m), "v": dict(self.v)}

    def load_state_dict(self, state):
        """Restore what :meth:`state_dict` returned (moments are used as given)."""
        self.t = int(state["t"])
        self.lr = float(state["lr"])
        self.betas = tuple(float(b) for b in state["betas"])
        self.eps = float(state["eps"])
        self.weight_decay = float(state["weight_decay"])
        self.m = dict(state["m"])
        self.v = dict(state["v"])


def global_norm(grads):
    """Euclidean norm of all gradients together, as a float."""
    total = 0.0
    for g in grads.values():
        total += float((g.astype("float64") ** 2).sum()) if g.dtype.itemsize < 8 \
            else float((g * g).sum())
    return math.sqrt(total)


def clip_grad_norm(grads, max_norm):
    """Scale all gradients in place so that their global norm is at most ``max_norm``.

    Returns the norm before clipping.  As ``torch.nn.utils.clip_grad_norm_``,
    the factor is ``max_norm / (norm + 1e-6)`` when ``norm > max_norm``.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_mamba.optim import clip_grad_norm, global_norm
    >>> grads = {"a": np.array([3.0]), "b": np.array([4.0])}
    >>> clip_grad_norm(grads, 1.0)
    5.0
    >>> round(global_norm(grads), 6)
    1.0
    """
    if max_norm <= 0:
        raise ValueError(f"max_norm must be positive, got {max_norm}")
    norm = global_norm(grads)
    if norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for g in grads.values():
            g *= scale
    return norm


def _slot(a, i):
    """``a[i]`` of a 1-D array as a writeable 0-d view (NumPy would give a scalar)."""
    return a[i:i + 1].reshape(())


def clip_grad_norm_device(grads, max_norm):
    """:func:`clip_grad_norm` that never waits for the device: the norm stays an array.

    Scales all gradients in place by ``min(1, max_norm / (norm + 1e-6))``
    (exactly 1 where ``norm <= max_norm``), the factor rounded to each
    gradient's dtype as :func:`clip_grad_norm` does, and returns the global
    norm before clipping as a 0-d float64 array on the gradients' device.
    Each gradient's squared norm is summed in float64 as in
    :func:`global_norm`; their total may be added in another order (float64
    rounding).

    Examples
    --------
    >>> import numpy as np
    >>> from numba_mamba.optim import clip_grad_norm_device
    >>> grads = {"a": np.array([3.0]), "b": np.array([4.0])}
    >>> norm = clip_grad_norm_device(grads, 1.0)
    >>> float(norm), np.round(grads["a"], 6), np.round(grads["b"], 6)
    (5.0, array([0.6]), array([0.8]))
    """
    if max_norm <= 0:
        raise ValueError(f"max_norm must be positive, got {max_norm}")
    xp = array_namespace(**{f"grads[{k!r}]": g for k, g in grads.items()})
    kernels = backend(xp, "optim")
    sq = xp.zeros(len(grads), xp.float64)
    for i, g in enumerate(grads.values()):
        kernels.sum_of_squares(g, _slot(sq, i))
    norm = xp.sqrt(sq.sum())
    scale = xp.where(norm > max_norm, max_norm / (norm + 1e-6), 1.0)
    for g in grads.values():
        g *= scale.astype(g.dtype)
    return norm


class FusedAdamW:
    """:class:`AdamW` with global-norm clipping as kernels that never wait for the device.

    The learning rate, the step count and the clipping factor live in device
    memory, so :meth:`update` can be captured in a CUDA graph and replayed
    (:class:`numba_mamba.training.TrainStep` does).  Per step: one
    sum-of-squares reduction per gradient, one thread computing the global
    norm, the clipping factor and the bias corrections from the device's step
    count, and one fused kernel per parameter (``m``, ``v``, decay, update).
    The arithmetic is that of :func:`clip_grad_norm` followed by
    :meth:`AdamW.step` (on NumPy arrays the result is the same to the bit; on
    the GPU to float32 rounding: the compiler may fuse a multiply and an add).

    Parameters
    ----------
    optimizer : AdamW
        Hyperparameters (betas, eps, weight decay, ``no_decay``), base
        learning rate and state.  Its moments are copied into this object's
        buffers, and ``optimizer.m`` and ``optimizer.v`` become those buffers,
        so that ``optimizer.state_dict()`` sees every update.
    params : dict
        Parameters updated in place: C-contiguous arrays of one float dtype
        (float32 or float64), all NumPy or all CuPy.
    max_grad_norm : float, optional
        Clip the gradients to this global norm first (None: no clipping).

    Attributes
    ----------
    norm : array, shape (1,), float64
        Global norm of the last update's gradients, before clipping.
    decay : list of bool
        Whether each parameter (in the order of ``params``) decays: fixed in
        a captured graph, unlike the hyperparameters' values.

    Notes
    -----
    :meth:`update` changes no host state: whoever calls it calls
    :meth:`advance` once per update (:meth:`step` does both).  After
    ``optimizer.load_state_dict(...)``, :meth:`stale` is True; :meth:`load`
    copies the optimizer's state into the buffers again (:meth:`step` does
    that by itself).

    Examples
    --------
    >>> import numpy as np
    >>> from numba_mamba.optim import AdamW, FusedAdamW
    >>> params = {"w": np.array([1.0, -2.0])}
    >>> fused = FusedAdamW(AdamW(lr=0.1, weight_decay=0.0), params)
    >>> fused.step({"w": np.array([0.5, -3.0])})
    >>> params["w"], fused.optimizer.t
    (array([ 0.9, -1.9]), 1)
    """

    def __init__(self, optimizer, params, max_grad_norm=None):
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive or None, got {max_grad_norm}")
        if not params:
            raise ValueError("params must hold at least one array, got an empty dict")
        xp = array_namespace(**{f"params[{k!r}]": p for k, p in params.items()})
        dtypes = sorted({p.dtype.name for p in params.values()})
        if len(dtypes) != 1 or dtypes[0] not in ("float32", "float64"):
            raise TypeError(f"params must share one dtype, float32 or float64, got {dtypes}")
        for name, p in params.items():
            if not p.flags.c_contiguous:
                raise ValueError(f"params[{name!r}] must be C-contiguous")
        self.optimizer = optimizer
        self.params = params
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.xp = xp
        self.dtype = np.dtype(dtypes[0])
        self._kernels = backend(xp, "optim")
        self.m = {name: xp.zeros_like(p) for name, p in params.items()}
        self.v = {name: xp.zeros_like(p) for name, p in params.items()}
        self.t = xp.zeros(1, xp.int64)
        self.lr = xp.zeros(1, xp.float64)
        self.hyper = xp.zeros(4, xp.float64)
        self.coef = xp.zeros(len(self._kernels.COEF), self.dtype)
        self.sq = xp.zeros(len(params), xp.float64)
        self.norm = xp.zeros(1, xp.float64)
        self._sq_slots = [_slot(self.sq, i) for i in range(len(params))]
        self._flat = [(name, p.reshape(-1), self.m[name].reshape(-1), self.v[name].reshape(-1))
                      for name, p in params.items()]
        self.load()

    def load(self):
        """Copy the optimizer's step count, hyperparameters and moments into the buffers."""
        opt = self.optimizer
        xp = self.xp
        for mine, theirs, what in ((self.m, opt.m, "m"), (self.v, opt.v, "v")):
            for name, buf in mine.items():
                src = theirs.get(name)
                if src is None:
                    buf.fill(0)
                elif tuple(src.shape) != tuple(buf.shape):
                    raise ValueError(f"optimizer.{what}[{name!r}] must have shape "
                                     f"{tuple(buf.shape)} like the parameter, got "
                                     f"{tuple(src.shape)}")
                elif src is not buf:
                    buf[...] = xp.asarray(src)
        opt.m, opt.v = self.m, self.v
        b1, b2 = opt.betas
        self.t.fill(opt.t)
        self.hyper[...] = xp.asarray([b1, b2, opt.weight_decay,
                                      self.max_grad_norm or 0.0], dtype=xp.float64)
        coef = np.zeros(len(self._kernels.COEF), self.dtype)
        coef[:5] = [b1, 1 - b1, b2, 1 - b2, opt.eps]  # each rounded from float64, as AdamW does
        self.coef[...] = xp.asarray(coef)
        self.decay = [bool(opt.weight_decay) and not opt.no_decay(name)
                       for name, *_ in self._flat]
        self._seen = (opt.t, opt.betas, opt.eps, opt.weight_decay)
        self._lr_host = None

    def stale(self):
        """True when the optimizer's state was replaced or changed since :meth:`load`."""
        opt = self.optimizer
        return (opt.m is not self.m or opt.v is not self.v
                or (opt.t, opt.betas, opt.eps, opt.weight_decay) != self._seen)

    def set_lr(self, lr):
        """Write the learning rate of the next updates into device memory."""
        lr = float(lr)
        if not lr >= 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if lr != self._lr_host:
            self.lr.fill(lr)
            self._lr_host = lr

    def update(self, grads):
        """One update on the device from ``grads`` (capturable: no host reads or writes).

        The device's step count advances; the optimizer's ``t`` does not (see
        :meth:`advance`).
        """
        missing = [name for name in self.params if name not in grads]
        if missing:
            raise KeyError(f"grads lack entries for parameters {missing[:5]}")
        for name, p in self.params.items():
            g = grads[name]
            if tuple(g.shape) != tuple(p.shape) or g.dtype != p.dtype:
                raise ValueError(f"grads[{name!r}] must have shape {tuple(p.shape)} and dtype "
                                 f"{p.dtype}, got {tuple(g.shape)} and {g.dtype}")
        k = self._kernels
        in_order = [g for name, g in grads.items() if name in self.params]  # global_norm's order
        for g, slot in zip(in_order, self._sq_slots):
            k.sum_of_squares(g, slot)
        k.prepare(self.t, self.lr, self.hyper, self.sq, self.norm, self.coef)
        for (name, p, m, v), decay in zip(self._flat, self.decay):
            g = self.xp.ascontiguousarray(grads[name]).reshape(-1)
            k.adamw_update(p, g, m, v, self.coef, decay)

    def advance(self):
        """Count one update on the host (``optimizer.t += 1``), after :meth:`update`."""
        self.optimizer.t += 1
        self._seen = (self.optimizer.t,) + self._seen[1:]

    def step(self, grads, lr=None):
        """:meth:`update` then :meth:`advance`, at ``lr`` (default: the optimizer's)."""
        if self.stale():
            self.load()
        self.set_lr(self.optimizer.lr if lr is None else lr)
        self.update(grads)
        self.advance()


def warmup_cosine(step, base_lr, warmup_steps, total_steps, min_lr=0.0):
    """Learning rate at ``step`` (0-based): linear warmup, then cosine decay.

    ``base_lr * (step + 1) / warmup_steps`` for ``step < warmup_steps``, then
    ``min_lr + (base_lr - min_lr) * (1 + cos(pi * s)) / 2`` with ``s`` going
    from 0 to 1 over the remaining steps, and ``min_lr`` from ``total_steps`` on.

    Examples
    --------
    >>> from numba_mamba.optim import warmup_cosine
    >>> [round(warmup_cosine(s, 1.0, 2, 6), 3) for s in range(7)]
    [0.5, 1.0, 1.0, 0.854, 0.5, 0.146, 0.0]
    """
    if warmup_steps < 0 or total_steps < warmup_steps:
        raise ValueError(f"need 0 <= warmup_steps <= total_steps, got {warmup_steps}, "
                         f"{total_steps}")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    s = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * s))
