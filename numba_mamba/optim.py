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

from ._validation import array_namespace

__all__ = ["AdamW", "clip_grad_norm", "default_no_decay", "global_norm", "warmup_cosine"]


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
