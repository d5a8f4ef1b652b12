"""A small training loop: seeding, AdamW with warmup + cosine, clipping, checkpoint/resume.

The loop asks for the batch of each step from a function of the step number,
``batch_fn(step) -> (inputs, targets)`` or ``(inputs, targets, mask)``, so
that a run resumed from a checkpoint sees the same batches as an
uninterrupted one and continues it identically.
"""

import os
from typing import NamedTuple

import numpy as np

from .checkpoint import load_checkpoint, save_checkpoint
from .models import loss_and_grads
from .optim import AdamW, clip_grad_norm, warmup_cosine

__all__ = ["TrainResult", "seed_everything", "train"]


def seed_everything(seed):
    """Seed NumPy's global generator (and CuPy's, if installed); return ``default_rng(seed)``.

    Examples
    --------
    >>> from numba_mamba.training import seed_everything
    >>> float(seed_everything(0).random()) == float(seed_everything(0).random())
    True
    """
    np.random.seed(seed)
    try:
        import cupy
        cupy.random.seed(seed)
    except Exception:  # no CuPy, or no GPU: nothing else to seed
        pass
    return np.random.default_rng(seed)


class TrainResult(NamedTuple):
    """What :func:`train` returns."""

    params: dict  # the trained parameters (the same dict, updated in place)
    optimizer: AdamW
    losses: list  # loss of every step run, from step 0 (including those before a resume)
    step: int  # steps done in total


def train(params, config, batch_fn, steps, lr=1e-3, warmup_steps=0, min_lr=0.0,
          weight_decay=0.1, betas=(0.9, 0.95), max_grad_norm=1.0, checkpoint_path=None,
          checkpoint_every=None, resume=False, progress=True, optimizer=None):
    """Train ``params`` (in place) for ``steps`` steps in total.

    Each step: ``loss, grads = loss_and_grads(*batch_fn(step), params, config)``,
    clip the gradients to global norm ``max_grad_norm`` (None: no clipping),
    one AdamW update at ``warmup_cosine(step, lr, warmup_steps, steps, min_lr)``.

    Parameters
    ----------
    params : dict
    config : MambaConfig
    batch_fn : callable
        ``step -> (inputs, targets[, mask])``, deterministic in ``step``.
    steps : int
        Total number of steps (a resumed run continues up to it).
    lr, warmup_steps, min_lr : float, int, float
        Schedule.
    weight_decay, betas : float, (float, float)
        AdamW settings, used when ``optimizer`` is None.
    max_grad_norm : float or None
    checkpoint_path : str, optional
        Where to save parameters, optimizer, step and the loss history.
    checkpoint_every : int, optional
        Save every this many steps (and always at the end when a path is given).
    resume : bool
        Continue from ``checkpoint_path`` if that file exists.
    progress : bool
        Show a tqdm progress bar (if tqdm is installed).
    optimizer : AdamW, optional

    Returns
    -------
    TrainResult

    Examples
    --------
    >>> import numpy as np
    >>> from numba_mamba import models, training
    >>> cfg = models.MambaConfig(d_model=8, n_layers=1, d_input=1, d_output=1, d_state=4)
    >>> params = models.init_params(cfg, seed=0)
    >>> x = np.sin(np.linspace(0, 6, 32, dtype=np.float32)).reshape(1, 32, 1)
    >>> res = training.train(params, cfg, lambda s: (x, 0.5 * x), steps=40, lr=3e-2,
    ...                      progress=False)
    >>> len(res.losses), bool(res.losses[-1] < res.losses[0] / 10)
    (40, True)
    """
    if optimizer is None:
        optimizer = AdamW(lr=lr, betas=betas, weight_decay=weight_decay)
    losses = []
    start = 0
    if resume and checkpoint_path is not None and os.path.exists(checkpoint_path):
        ck = load_checkpoint(checkpoint_path)
        if set(ck.params) != set(params):
            raise ValueError(f"{checkpoint_path} holds parameters {sorted(ck.params)[:5]}..., "
                             f"not those of this model")
        xp = _namespace(params)
        for name, value in ck.params.items():
            params[name][...] = xp.asarray(value)
        if ck.optimizer is not None:
            state = dict(ck.optimizer)
            state["m"] = {k: xp.asarray(v) for k, v in state["m"].items()}
            state["v"] = {k: xp.asarray(v) for k, v in state["v"].items()}
            optimizer.load_state_dict(state)
        start = ck.step
        losses = list((ck.extra or {}).get("losses", []))
    bar = _progress(range(start, steps), progress, initial=start, total=steps)
    for s in bar:
        batch = batch_fn(s)
        loss, grads = loss_and_grads(*batch[:2], params, config,
                                     mask=batch[2] if len(batch) > 2 else None)
        if max_grad_norm is not None:
            clip_grad_norm(grads, max_grad_norm)
        step_lr = warmup_cosine(s, lr, warmup_steps, steps, min_lr)
        optimizer.step(params, grads, lr=step_lr)
        losses.append(loss)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{loss:.4g}", lr=f"{step_lr:.2e}")
        done = s + 1
        if checkpoint_path is not None and (
                done == steps or (checkpoint_every and done % checkpoint_every == 0)):
            save_checkpoint(checkpoint_path, params, config, optimizer, step=done,
                            extra={"losses": losses})
    return TrainResult(params, optimizer, losses, max(start, steps))


def _namespace(params):
    from ._validation import array_namespace
    return array_namespace(ref=next(iter(params.values())))


def _progress(iterable, enabled, initial, total):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: train without a bar
        return iterable
    return tqdm(iterable, initial=initial, total=total, desc="train")
