"""CPU backend of a captured training step: the AdamW update and the loss history.

The same functions, arguments and layout as ``cuda_kernels/optim.py`` (read
its docstring for the math), on NumPy arrays.  The arithmetic is that of
:meth:`numba_mamba.optim.AdamW.step` and :func:`numba_mamba.optim.clip_grad_norm`
operation for operation (the per-step factors in float64 on the host, then
rounded to the parameters' dtype), so an update here equals theirs to the bit.
The update of one element (:func:`adamw_element`, an ``@njit`` loop here),
:func:`prepare` and :func:`record_loss` are the sources of the GPU kernels too.
"""

import math

import numpy as np
from numba import njit

__all__ = ["COEF", "adamw_element", "adamw_update", "coef_values", "prepare", "record_loss",
           "sum_of_squares"]

COEF = ("b1", "c1", "b2", "c2", "eps", "scale", "lr_bc1", "bc2_sqrt", "decay")
_B1, _C1, _B2, _C2, _EPS, _SCALE, _LR_BC1, _BC2_SQRT, _DECAY = range(len(COEF))


def prepare(t, lr, hyper, sq, norm, coef):
    """Advance the step count ``t`` and write this step's ``coef`` and ``norm``.

    In float64 whatever ``coef``'s dtype (the host's arithmetic of AdamW.step
    and clip_grad_norm), rounded to it where stored.  Plain Python here (one
    call a step) and the body of the GPU's one-thread kernel.
    """
    step = t[0] + 1
    t[0] = step
    b1 = hyper[0]
    b2 = hyper[1]
    wd = hyper[2]
    max_norm = hyper[3]
    total = 0.0
    for i in range(sq.shape[0]):
        total += sq[i]
    nrm = math.sqrt(total)
    norm[0] = nrm
    scale = 1.0
    if max_norm > 0.0 and nrm > max_norm:
        scale = max_norm / (nrm + 1e-6)
    rate = lr[0]
    coef[_SCALE] = scale
    coef[_LR_BC1] = rate / (1.0 - math.pow(b1, float(step)))
    coef[_BC2_SQRT] = math.sqrt(1.0 - math.pow(b2, float(step)))
    coef[_DECAY] = 1.0 - rate * wd


def coef_values(coef):
    """The nine entries of ``coef`` as a tuple of scalars (:data:`COEF` order),
    read once before a loop of :func:`adamw_element`."""
    return (coef[0], coef[1], coef[2], coef[3], coef[4], coef[5], coef[6], coef[7], coef[8])


def adamw_element(p, g, m, v, c, decay):
    """One element's AdamW update: ``(p, m, v)`` after the step, from the
    gradient ``g`` and the values ``c`` of :func:`coef_values` (``decay``:
    apply the weight decay).  A plain function of scalars that ``@njit`` and
    the CUDA kernel (``cuda_kernels/optim.py``) both compile, in the
    operation order of :meth:`numba_mamba.optim.AdamW.step`."""
    b1, c1, b2, c2, eps, scale, lr_bc1, bc2_sqrt, keep = c
    gi = g * scale
    mi = m * b1 + c1 * gi
    vi = v * b2 + c2 * (gi * gi)
    if decay:
        p = p * keep
    return p - (lr_bc1 * mi) / (math.sqrt(vi) / bc2_sqrt + eps), mi, vi


_coef_values = njit(inline="always")(coef_values)
_adamw_element = njit(inline="always")(adamw_element)


@njit(cache=True, error_model="numpy")  # (divisions without a zero check: SIMD)
def _adamw_kernel(p, g, m, v, coef, decay):
    c = _coef_values(coef)
    for i in range(p.shape[0]):
        p[i], m[i], v[i] = _adamw_element(p[i], g[i], m[i], v[i], c, decay)


def adamw_update(p, g, m, v, coef, decay):
    """One AdamW update of the flattened parameter ``p`` (and ``m``, ``v``) in place."""
    _adamw_kernel(p, g, m, v, coef, bool(decay))


def record_loss(loss, bad, hist, state):
    """Write ``loss (1,)`` into the ring buffer ``hist`` at ``state[0]``; keep the
    first step whose ``bad`` flag is set.  Plain Python here and the body of
    the GPU's one-thread kernel."""
    k = state[0]
    hist[k % hist.shape[0]] = loss[0]
    if bad[0] != 0 and state[1] < 0:
        state[1] = k
        state[2] = bad[0]
    state[0] = k + 1


def sum_of_squares(g, out):
    """``out[...] = sum(float64(g)**2)``, ``out`` a 0-d float64 array."""
    out[...] = (g.astype(np.float64) ** 2).sum()
