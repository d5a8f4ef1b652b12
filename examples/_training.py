"""The training loop shared by the synthetic-task examples.

``selective_copying.py`` and ``induction_heads.py`` train the library's
language model (``numba_mamba.models``) the same way: AdamW, gradient-norm
clipping, linear warmup then cosine decay, an optional wall-clock limit, and an
evaluation every so many steps.  What differs -- the task's batches and what an
evaluation measures -- comes in as two functions.
"""

import math
import time

import numpy as np

import numba_mamba as nm
from numba_mamba.training import TrainStep


def add_training_args(parser):
    """The flags :func:`fit` reads (and ``--device``, ``--seed``, the model's sizes)."""
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--n-layers", type=int, default=2)
    parser.add_argument("--d-state", type=int, default=16)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--min-lr-ratio", type=float, default=0.1,
                        help="cosine decays to lr * this")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--weight-decay", type=float, default=0.0,
                        help="AdamW decay of the matrices (never A_log, D, biases, norms)")
    parser.add_argument("--clip", type=float, default=1.0, help="gradient norm (0: none)")
    parser.add_argument("--time-limit", type=float, default=0,
                        help="stop training after this many seconds (0: none); the cosine "
                             "schedule follows time or steps, whichever is further along")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--no-progress", action="store_true")


def pick_device(name):
    """``(name, xp)``: NumPy on the CPU, or CuPy when ``--device gpu`` and a GPU is visible."""
    if name == "gpu":
        try:
            import cupy
            if cupy.cuda.runtime.getDeviceCount() > 0:
                return "gpu", cupy
            raise RuntimeError("CuPy sees no GPU")
        except Exception as exc:  # no CuPy, or no GPU
            raise SystemExit(f"--device gpu: no usable CuPy GPU ({exc}); "
                             f"install the extra: pip install '.[cuda12]'")
    return "cpu", np


def progress(iterable, enabled, desc):
    """``iterable`` under a tqdm bar where asked for and tqdm is installed."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional
        return iterable
    return tqdm(iterable, desc=desc, mininterval=2.0)


def fit(params, config, args, xp, batch, on_eval, label=""):
    """Train ``params`` in place for ``args.steps`` steps (or ``args.time_limit`` seconds).

    Parameters
    ----------
    params, config
        From ``models.init_params`` and the ``models.MambaConfig``.
    args : argparse.Namespace
        ``steps, lr, min_lr_ratio, warmup, weight_decay, clip, time_limit,
        eval_every, no_progress``.
    xp : module
        ``numpy`` or ``cupy``: where ``params`` live.
    batch : callable
        ``batch(step) -> (inputs, targets)``, NumPy integer arrays of one shape.
    on_eval : callable
        ``on_eval(done, mean_recent_loss, seconds) -> str``: evaluates the
        model after ``done`` steps and returns the line to print.
    label : str
        Printed before each line (the model's name where a script trains several).

    Returns
    -------
    losses : list of float
        Training loss of every step run (read back at each evaluation; a
        non-finite loss stops the run there).
    seconds : float
        Wall time of the loop, the first step's JIT compiles included.
    """
    opt = nm.AdamW(lr=args.lr, weight_decay=args.weight_decay)
    # One TrainStep: on the GPU a CUDA graph replayed per step, the losses read back at each
    # evaluation (each read waits for the device), not at every step.
    stepper = TrainStep(params, config, opt, max_grad_norm=args.clip or None)
    prefix = f"{label} " if label else ""
    losses = []
    bar = progress(range(args.steps), not args.no_progress, desc=label or "train")
    t0 = t1 = time.perf_counter()  # t1: end of the first step
    for s in bar:
        x, y = batch(s)
        # With --time-limit the schedule runs on whichever is further along, steps or time
        # (the time left after the first step, which holds the JIT compiles), so that a run
        # cut short by the clock still ends with the learning rate decayed.
        s_eff = s
        if args.time_limit and s > 0:
            left = max(args.time_limit - (t1 - t0), 1e-3)
            s_eff = max(s, int((time.perf_counter() - t1) / left * args.steps))
        lr = nm.warmup_cosine(min(s_eff, args.steps - 1), args.lr, min(args.warmup, args.steps),
                              args.steps, args.lr * args.min_lr_ratio)
        stepper.step(x, y, lr=lr)
        if s == 0:
            losses += stepper.losses()  # (waits for the first step: its time holds the compiles)
            t1 = time.perf_counter()
            print(f"{prefix}first step {t1 - t0:.1f} s (with JIT compiles)", flush=True)
        done = s + 1
        out_of_time = bool(args.time_limit) and time.perf_counter() - t0 > args.time_limit
        if done % args.eval_every == 0 or done == args.steps or out_of_time:
            new = stepper.losses()
            losses += new
            bad = [v for v in new if not math.isfinite(v)]
            if bad:
                raise SystemExit(f"{prefix}loss is {bad[0]} at step "
                                 f"{len(losses) - len(new) + new.index(bad[0])}")
            msg = prefix + on_eval(done, float(np.mean(losses[-args.eval_every:])),
                                   time.perf_counter() - t0)
            bar.write(msg) if hasattr(bar, "write") else print(msg, flush=True)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if out_of_time:
            print(f"{prefix}--time-limit {args.time_limit:g} s reached after {done} steps")
            break
    return losses, time.perf_counter() - t0
