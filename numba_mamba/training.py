"""Training: a whole step (captured as a CUDA graph on the GPU) and a small loop around it.

:class:`TrainStep` is one training step -- forward, loss, backward, gradient
clipping and the AdamW update -- over static batch buffers.  On the GPU it is
captured once as a CUDA graph (:class:`numba_mamba.graphs.CapturedStep`) and
replayed at every step: nothing in it waits for the device, the loss stays
on the device (a ring buffer the graph writes) and is read every so many
steps.  On NumPy arrays the same step runs eagerly.

:func:`train` is the loop: seeding, warmup + cosine schedule,
checkpoint/resume.  It asks for the batch of each step from a function of the
step number, ``batch_fn(step) -> (inputs, targets)`` or ``(inputs, targets,
mask)``, so that a run resumed from a checkpoint sees the same batches as an
uninterrupted one and continues it identically.
"""

import os
from typing import NamedTuple

import numpy as np

from ._cpu_threads import hold_heap
from ._validation import is_cupy_array
from .checkpoint import load_checkpoint, save_checkpoint
from .graphs import CapturedStep, check_graph_mode
from .models import (cross_entropy_backward, cross_entropy_forward, device_loss_and_grads,
                     mse_backward, mse_forward)
from ._backends import backend
from .optim import AdamW, FusedAdamW, warmup_cosine

__all__ = ["TrainResult", "TrainStep", "seed_everything", "train"]

IGNORE_INDEX = -100  # targets equal to this are left out (cross_entropy_forward's default)


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


class TrainStep:
    """One training step over static buffers, captured as a CUDA graph on the GPU.

    ``step(inputs, targets)`` copies the batch into buffers of a fixed shape
    and runs the forward, the loss (cross-entropy or MSE, by the model's
    head), the backward, clipping to a global gradient norm and one AdamW
    update (:class:`numba_mamba.optim.FusedAdamW`: learning rate, step count
    and clipping factor in device memory).  On CuPy parameters the first step
    runs eagerly, the second is captured (:class:`~numba_mamba.graphs.CapturedStep`)
    and every later step replays the graph; nothing waits for the device
    until :meth:`losses` reads the losses back.  On NumPy parameters every
    step runs eagerly; the result equals ``loss_and_grads``, ``clip_grad_norm``
    and ``AdamW.step`` to the bit.

    Parameters
    ----------
    params : dict
        The model's parameters (one float dtype, all NumPy or all CuPy),
        updated in place.
    config : MambaConfig
    optimizer : AdamW, optional
        Hyperparameters, base learning rate and state (default ``AdamW()``).
        Its ``m``, ``v`` become the step's device buffers and its ``t``
        counts the steps, so ``optimizer.state_dict()`` is current after
        every :meth:`step`; a state loaded into it later is taken up at the
        next step.
    max_grad_norm : float or None, optional
        Clip the gradients to this global norm (None: no clipping).
    graph : {'auto', True, False}, optional
        As :class:`~numba_mamba.graphs.CapturedStep`: ``'auto'`` captures
        where possible and runs eagerly (with a ``CaptureWarning``) where the
        capture fails; False never captures.
    history : int, optional
        Losses held on the device between reads (a ring buffer); a step that
        would overwrite an unread loss reads them first (one wait).
    forward, backward : callable, optional
        Another model of the same parameters (both or neither):
        ``forward(inputs, params, config, *extra) -> (out, cache)`` and
        ``backward(dout, cache) -> (dinputs, grads)``, where ``extra`` are
        the arrays given as ``step(..., extra=...)``; the loss is still the
        head's (cross-entropy or MSE).  Default: the model of
        :mod:`numba_mamba.models`.  Both must not wait for the device.

    Notes
    -----
    Every batch must have the shapes and dtypes of the first one (the graph
    runs on fixed buffers): another shape raises ValueError; make another
    ``TrainStep`` for it.  A mask, if any, must be given at every step.
    Regression targets are cast to the parameters' dtype.

    Invalid token ids or targets (outside ``[0, vocab_size)``, targets other
    than -100) given as NumPy arrays raise ValueError in :meth:`step`.  Given
    as CuPy arrays they cannot be checked without waiting for the device:
    the step flags them on the device (ids are replaced by 0, targets left
    out of the loss) and the next :meth:`losses` raises ValueError naming the
    first such step.

    On the GPU the results agree with the eager path to float32 rounding,
    not to the bit: the scan's backward adds the gradients of B and C with
    atomic operations, in an order that varies from run to run.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_mamba import models
    >>> from numba_mamba.optim import AdamW
    >>> from numba_mamba.training import TrainStep
    >>> cfg = models.MambaConfig(d_model=8, n_layers=1, vocab_size=6, d_state=4)
    >>> params = models.init_params(cfg, seed=0)
    >>> step = TrainStep(params, cfg, AdamW(lr=1e-2))
    >>> x = np.array([[1, 2, 3, 4, 5, 1, 2, 3]]); y = np.roll(x, -1, axis=1)
    >>> for _ in range(20):
    ...     step.step(x, y)
    >>> losses = step.losses()
    >>> len(losses), bool(losses[-1] < losses[0]), step.optimizer.t
    (20, True, 20)
    """

    def __init__(self, params, config, optimizer=None, max_grad_norm=1.0, graph="auto",
                 history=1024, forward=None, backward=None):
        check_graph_mode(graph)
        if (forward is None) != (backward is None):
            raise ValueError("forward and backward must be given together (or neither), got "
                             f"forward={forward!r}, backward={backward!r}")
        for name, fn in (("forward", forward), ("backward", backward)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
        self._model = None if forward is None else (forward, backward)
        if isinstance(history, bool) or not isinstance(history, (int, np.integer)) \
                or history < 1:
            raise ValueError(f"history must be a positive integer, got {history!r}")
        self.params = params
        self.config = config
        self.optimizer = AdamW() if optimizer is None else optimizer
        self._fused = FusedAdamW(self.optimizer, params, max_grad_norm)
        xp = self.xp = self._fused.xp
        if xp is np:  # each step's arrays reuse the last step's memory (no page faults)
            hold_heap()
        self._kernels = backend(xp, "optim")
        self._hist = xp.zeros(int(history), self._fused.dtype)
        self._state = xp.asarray(np.array([0, -1, 0], np.int64))
        self._batch = None  # static (inputs, targets, mask, *extra)
        self._pinned = {}  # page-locked staging of NumPy batches for device buffers
        self._graph = graph
        self._step = CapturedStep(self._run, graph=graph, xp=xp)
        self._done = 0  # steps run
        self._read = 0  # steps whose loss was read back
        self._losses = []  # read back, not yet returned

    @property
    def captured(self):
        """True once the step is a CUDA graph that each :meth:`step` replays."""
        return self._step.captured

    @property
    def grad_norm(self):
        """Global gradient norm of the last step before clipping: a (1,) float64 device array."""
        return self._fused.norm

    def step(self, inputs, targets, mask=None, lr=None, extra=()):
        """One training step on a batch; returns None (the loss stays on the device).

        Parameters
        ----------
        inputs : array
            LM: integer token ids ``(Bt, L)``; regression: ``(Bt, L, d_input)``.
        targets : array
            LM: integer ids ``(Bt, L)`` (-100: ignored); regression
            ``(Bt, L, d_output)``.
        mask : array, optional
            True where counted: ``(Bt, L)`` (LM), broadcastable to the
            predictions (regression).
        lr : float, optional
            Learning rate of this step (default ``optimizer.lr``).
        extra : tuple of arrays, optional
            Further inputs of a custom ``forward`` (its arguments after
            ``config``), copied into static buffers like the batch: the same
            number, shapes and dtype kinds at every step.
        """
        if not isinstance(extra, (tuple, list)):
            raise TypeError(f"extra must be a tuple of arrays, got {type(extra).__name__}")
        if extra and self._model is None:
            raise ValueError(f"extra inputs ({len(extra)} given) need a custom forward: make "
                             f"the TrainStep with forward= and backward=")
        self._put(inputs, targets, mask, tuple(extra))
        fused = self._fused
        if fused.stale():
            decay = fused.decay
            fused.load()
            if fused.decay != decay:  # (which parameters decay is written into the graph)
                self._step = CapturedStep(self._run, graph=self._graph, xp=self.xp)
        fused.set_lr(self.optimizer.lr if lr is None else lr)
        if self._done - self._read == self._hist.shape[0]:
            self._drain()
        self._step()
        fused.advance()
        self._done += 1

    def losses(self):
        """Losses of the steps since the last call, as Python floats (one wait for the device).

        Raises
        ------
        ValueError
            A batch given as CuPy arrays held token ids or targets out of
            range (the losses read are kept for the next call).
        """
        self._drain()
        out, self._losses = self._losses, []
        return out

    # ------------------------------------------------------------ inside

    def _run(self):
        """The captured work: no waits, no host state changed."""
        inputs, targets, mask, *extra = self._batch
        if self._model is None:
            loss, grads, bad = device_loss_and_grads(inputs, targets, self.params, self.config,
                                                     mask=mask)
        else:
            loss, grads, bad = self._custom_loss_and_grads(inputs, targets, mask, extra)
        self._fused.update(grads)
        xp = self.xp
        self._kernels.record_loss(xp.reshape(loss, (1,)), xp.reshape(bad, (1,)), self._hist,
                                  self._state)

    def _custom_loss_and_grads(self, inputs, targets, mask, extra):
        """:func:`~numba_mamba.models.device_loss_and_grads` through ``forward``, ``backward``."""
        xp, cfg = self.xp, self.config
        forward, backward = self._model
        bad = xp.zeros((), xp.int64)
        if cfg.head == "lm":
            out_of_range = (inputs < 0) | (inputs >= cfg.vocab_size)
            inputs = xp.where(out_of_range, 0, inputs)
            bad = bad + 2 * out_of_range.any().astype(xp.int64)
        out, cache = forward(inputs, self.params, cfg, *extra)
        if cfg.head == "lm":
            loss, lc = cross_entropy_forward(out, targets, mask=mask, sync=False)
            dout = cross_entropy_backward(1.0, lc)
            bad = bad + lc.bad.astype(xp.int64)
        else:
            loss, lc = mse_forward(out, targets, mask=mask, sync=False)
            dout = mse_backward(1.0, lc)
        _, grads = backward(dout, cache)
        return loss, grads, bad

    def _drain(self):
        if self._done == self._read:
            return
        hist = _to_host(self._hist)
        state = _to_host(self._state)
        cap = hist.shape[0]
        self._losses.extend(float(hist[k % cap]) for k in range(self._read, self._done))
        self._read = self._done
        first, bits = int(state[1]), int(state[2])
        if first >= 0:
            self._state[1] = -1
            self._state[2] = 0
            V = self.config.vocab_size
            what = " and ".join(w for b, w in (
                (2, f"inputs (token ids outside [0, {V}): replaced by 0)"),
                (1, f"targets (outside [0, {V}) and not {IGNORE_INDEX}: left out of the loss)"))
                if bits & b)
            raise ValueError(f"the batch of step {first} (counting from 0, this TrainStep's "
                             f"steps) had invalid {what}; that step and any later ones were "
                             f"run and applied")

    def _put(self, inputs, targets, mask, extra=()):
        """Check the batch against the static buffers (made from the first) and copy it in."""
        given = {"inputs": inputs, "targets": targets, "mask": mask}
        given.update((f"extra[{k}]", a) for k, a in enumerate(extra))
        for k, a in enumerate(extra):
            if a is None:
                raise TypeError(f"extra[{k}] must be a NumPy or CuPy array, got None")
        for name, a in given.items():
            if a is None:
                continue
            if not (isinstance(a, np.ndarray) or is_cupy_array(a)):
                raise TypeError(f"{name} must be a NumPy or CuPy array, got {type(a).__name__}")
            if self.xp is np and not isinstance(a, np.ndarray):
                raise TypeError(f"{name} must be a NumPy array like the parameters, got a "
                                f"CuPy array")
        if self._batch is None:
            self._batch = self._buffers(inputs, targets, mask) + tuple(
                self.xp.empty(a.shape, a.dtype) for a in extra)
        if len(given) != len(self._batch):
            raise ValueError(f"extra must hold {len(self._batch) - 3} arrays at every step, as "
                             f"at the first, got {len(extra)}")
        for (name, a), buf in zip(given.items(), self._batch):
            if (a is None) != (buf is None):
                raise ValueError(f"{name} must be {'given' if a is None else 'None'} at every "
                                 f"step, as at the first")
            if a is not None and (a.shape != buf.shape or a.dtype.kind != buf.dtype.kind):
                raise ValueError(
                    f"{name} must have shape {buf.shape} and dtype kind {buf.dtype.kind!r} like "
                    f"the first batch ({buf.dtype}), got shape {a.shape} and dtype {a.dtype} "
                    f"(a TrainStep runs on buffers of one shape: make another for this one)")
        if self.config.head == "lm":
            _check_token_ranges(inputs, targets, mask, self.config.vocab_size)
        for i, (a, buf) in enumerate(zip(given.values(), self._batch)):
            if a is None:
                continue
            if is_cupy_array(buf) and isinstance(a, np.ndarray):
                self._upload(i, a, buf)
            else:
                buf[...] = a

    def _upload(self, i, a, buf):
        """Copy NumPy ``a`` into device ``buf`` without waiting for the device.

        A copy from pageable memory would wait for the stream (the previous
        step); from page-locked memory it is queued.  Two page-locked slots
        per buffer take turns: a slot is refilled once its copy of two steps
        ago has run (a wait only when the host is two steps ahead).
        """
        import cupy
        import cupyx

        slots = self._pinned.get(i)
        if slots is None:
            slots = self._pinned[i] = [[cupyx.empty_pinned(buf.shape, buf.dtype), None]
                                       for _ in range(2)]
        slot = slots[self._done % 2]
        if slot[1] is not None:
            slot[1].synchronize()
        np.copyto(slot[0], a, casting="unsafe")
        stream = cupy.cuda.get_current_stream()
        buf.set(slot[0], stream=stream)  # (a stream given: an asynchronous copy)
        slot[1] = stream.record()

    def _buffers(self, inputs, targets, mask):
        xp, cfg = self.xp, self.config
        if cfg.head == "lm":
            for name, a in (("inputs", inputs), ("targets", targets)):
                if a.ndim != 2 or a.dtype.kind not in "iu":
                    raise ValueError(f"{name} must be integer token ids of shape (batch, length), "
                                     f"got dtype {a.dtype} and shape {tuple(a.shape)}")
            if mask is not None and mask.shape != targets.shape:
                raise ValueError(f"mask must have the shape {tuple(targets.shape)} of targets, "
                                 f"got {tuple(mask.shape)}")
            t_dtype = targets.dtype
        else:
            t_dtype = self._fused.dtype
        if targets.shape[:2] != inputs.shape[:2]:
            raise ValueError(f"targets must have the (batch, length) {tuple(inputs.shape[:2])} of "
                             f"inputs, got shape {tuple(targets.shape)}")
        return (xp.empty(inputs.shape, inputs.dtype), xp.empty(targets.shape, t_dtype),
                None if mask is None else xp.empty(mask.shape, mask.dtype))


def _check_token_ranges(inputs, targets, mask, V):
    """ValueError, naming the argument, for token ids or targets outside ``[0, V)`` (NumPy only)."""
    if isinstance(inputs, np.ndarray) and inputs.size:
        lo, hi = int(inputs.min()), int(inputs.max())
        if lo < 0 or hi >= V:
            raise ValueError(f"inputs must be token ids in [0, {V}), got values in [{lo}, {hi}]")
    if isinstance(targets, np.ndarray):
        counted = targets != IGNORE_INDEX
        if mask is not None and isinstance(mask, np.ndarray):
            counted &= mask.astype(bool)
        t = targets[counted]
        if t.size and (int(t.min()) < 0 or int(t.max()) >= V):
            raise ValueError(f"targets must lie in [0, {V}) or equal {IGNORE_INDEX} (ignored), "
                             f"got values in [{int(t.min())}, {int(t.max())}]")


def _to_host(a):
    return a.get() if is_cupy_array(a) else np.array(a)


class TrainResult(NamedTuple):
    """What :func:`train` returns."""

    params: dict  # the trained parameters (the same dict, updated in place)
    optimizer: AdamW
    losses: list  # loss of every step run, from step 0 (including those before a resume)
    step: int  # steps done in total


def train(params, config, batch_fn, steps, lr=1e-3, warmup_steps=0, min_lr=0.0,
          weight_decay=0.1, betas=(0.9, 0.95), max_grad_norm=1.0, checkpoint_path=None,
          checkpoint_every=None, resume=False, progress=True, optimizer=None, log_every=10,
          graph="auto"):
    """Train ``params`` (in place) for ``steps`` steps in total.

    Each step is one :class:`TrainStep` (a CUDA graph replay on the GPU):
    the loss of ``batch_fn(step)`` and its gradients, clipping to global norm
    ``max_grad_norm`` (None: no clipping), one AdamW update at
    ``warmup_cosine(step, lr, warmup_steps, steps, min_lr)``.  The same as
    ``loss_and_grads``, ``clip_grad_norm`` and ``AdamW.step`` in a loop.

    Parameters
    ----------
    params : dict
    config : MambaConfig
    batch_fn : callable
        ``step -> (inputs, targets[, mask])``, deterministic in ``step``, of
        one shape at every step.
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
        Show a tqdm progress bar (if tqdm is installed), moved every ``log_every`` steps.
    optimizer : AdamW, optional
    log_every : int, optional
        Read the losses back from the device every this many steps (each
        read waits for the device), at checkpoints and at the end.
    graph : {'auto', True, False}, optional
        Capture the step as a CUDA graph (see :class:`TrainStep`).

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
    if isinstance(log_every, bool) or not isinstance(log_every, (int, np.integer)) \
            or log_every < 1:
        raise ValueError(f"log_every must be a positive integer, got {log_every!r}")
    check_graph_mode(graph)
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
    stepper = TrainStep(params, config, optimizer, max_grad_norm=max_grad_norm, graph=graph)
    run_steps(stepper, batch_fn, start, steps, losses, lr, warmup_steps, min_lr, log_every,
              checkpoint_path, checkpoint_every, progress)
    return TrainResult(params, optimizer, losses, max(start, steps))


def run_steps(stepper, batch_fn, start, steps, losses, lr, warmup_steps, min_lr, log_every,
              checkpoint_path, checkpoint_every, progress, writes=True):
    """The loop of :func:`train` (and of ``distributed.train``): steps ``start .. steps - 1``
    of ``stepper`` (a :class:`TrainStep`) on ``batch_fn(s)``, the learning rate of
    :func:`~numba_mamba.optim.warmup_cosine`, the losses read into ``losses`` every
    ``log_every`` steps and at checkpoints, which are written where ``writes``."""
    bar = _progress(progress, initial=start, total=steps)
    shown = start
    for s in range(start, steps):
        batch = batch_fn(s)
        step_lr = warmup_cosine(s, lr, warmup_steps, steps, min_lr)
        stepper.step(batch[0], batch[1], batch[2] if len(batch) > 2 else None, lr=step_lr)
        done = s + 1
        save = checkpoint_path is not None and (
            done == steps or (checkpoint_every and done % checkpoint_every == 0))
        if save or done % log_every == 0 or done == steps:
            losses.extend(stepper.losses())
            if bar is not None:
                bar.update(done - shown)
                bar.set_postfix(loss=f"{losses[-1]:.4g}", lr=f"{step_lr:.2e}")
                shown = done
        if save and writes:
            save_checkpoint(checkpoint_path, stepper.params, stepper.config, stepper.optimizer,
                            step=done, extra={"losses": losses})
    if bar is not None:
        bar.close()


def _namespace(params):
    from ._validation import array_namespace
    return array_namespace(ref=next(iter(params.values())))


def _progress(enabled, initial, total):
    """A tqdm bar moved by hand, or None (disabled, or tqdm not installed)."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: train without a bar
        return None
    return tqdm(initial=initial, total=total, desc="train")
