"""CPU backend of a captured training step: the AdamW update and the loss history in NumPy.

The same functions, arguments and layout as ``cuda_kernels/optim.py`` (read
its docstring for the math), on NumPy arrays.  The arithmetic is that of
:meth:`numba_mamba.optim.AdamW.step` and :func:`numba_mamba.optim.clip_grad_norm`
operation for operation (the per-step factors in float64 on the host, then
rounded to the parameters' dtype), so an update here equals theirs to the bit.
"""

import math

import numpy as np

__all__ = ["COEF", "adamw_update", "prepare", "record_loss", "sum_of_squares"]

COEF = ("b1", "c1", "b2", "c2", "eps", "scale", "lr_bc1", "bc2_sqrt", "decay")
_B1, _C1, _B2, _C2, _EPS, _SCALE, _LR_BC1, _BC2_SQRT, _DECAY = range(len(COEF))


def prepare(t, lr, hyper, sq, norm, coef):
    """Advance the step count ``t`` and write this step's ``coef`` and ``norm``."""
    step = int(t[0]) + 1
    t[0] = step
    b1, b2, wd, max_norm = (float(h) for h in hyper)
    total = 0.0
    for s in sq:
        total += float(s)
    nrm = math.sqrt(total)
    norm[0] = nrm
    coef[_SCALE] = max_norm / (nrm + 1e-6) if 0.0 < max_norm < nrm else 1.0
    rate = float(lr[0])
    coef[_LR_BC1] = rate / (1 - b1 ** step)
    coef[_BC2_SQRT] = math.sqrt(1 - b2 ** step)
    coef[_DECAY] = 1 - rate * wd


def adamw_update(p, g, m, v, coef, decay):
    """One AdamW update of the flattened parameter ``p`` (and ``m``, ``v``) in place."""
    g = g * coef[_SCALE]
    m *= coef[_B1]
    m += coef[_C1] * g
    v *= coef[_B2]
    v += coef[_C2] * (g * g)
    if decay:
        p *= coef[_DECAY]
    p -= coef[_LR_BC1] * m / (np.sqrt(v) / coef[_BC2_SQRT] + coef[_EPS])


def record_loss(loss, bad, hist, state):
    """Write ``loss (1,)`` into the ring buffer ``hist`` at ``state[0]``."""
    k = int(state[0])
    hist[k % hist.shape[0]] = loss[0]
    if bad[0] != 0 and state[1] < 0:
        state[1] = k
        state[2] = bad[0]
    state[0] = k + 1


def sum_of_squares(g, out):
    """``out[...] = sum(float64(g)**2)``, ``out`` a 0-d float64 array."""
    out[...] = (g.astype(np.float64) ** 2).sum()
