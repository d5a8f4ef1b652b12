"""Numba CUDA kernels of a captured training step: the AdamW update and the loss history.

Everything that changes from step to step (the learning rate, the step count,
the clipping factor) is read from device memory, so that a CUDA graph
captured once replays a correct update at every step.

Math
----
``prepare`` (one thread, float64), at step ``t = t + 1`` with learning rate
``lr``, betas ``b1, b2``, weight decay ``wd`` and the squared norms ``sq[i]``
of the gradients::

    norm  = sqrt(sq[0] + sq[1] + ...)                 (in that order)
    scale = max_norm / (norm + 1e-6) if 0 < max_norm < norm else 1
    coef  = [scale, lr / (1 - b1**t), sqrt(1 - b2**t), 1 - lr wd]   (rounded to the dtype)

``adamw_update`` (one launch per parameter, the parameter's dtype), with
``g = grad * scale``::

    m = m b1 + (1 - b1) g
    v = v b2 + (1 - b2) g**2
    p = p (1 - lr wd)                                 (parameters with decay only)
    p = p - (lr / (1 - b1**t)) m / (sqrt(v) / sqrt(1 - b2**t) + eps)

the arithmetic order of :meth:`numba_mamba.optim.AdamW.step` and of
:func:`numba_mamba.optim.clip_grad_norm` (whose factor, rounded to the dtype,
multiplies the gradient).

``record_loss`` (one thread) writes the step's loss at ``count % size`` of a
ring buffer and keeps the first step whose batch was flagged as invalid.

The three kernels run the functions of :mod:`numba_mamba._cpu_optim`
(``prepare``, ``adamw_element``, ``record_loss``) compiled as device
functions: the CPU backend runs the same source.

Canonical layout
----------------
==============  ======================  =========================================
name            shape, dtype            notes
==============  ======================  =========================================
p, g, m, v      (n,) ftype              C-contiguous, flattened; p, m, v in place
coef            (9,) ftype              b1, 1 - b1, b2, 1 - b2, eps (set once),
                                        scale, lr / bc1, sqrt(bc2), 1 - lr wd
t               (1,) int64              step count, incremented by ``prepare``
lr              (1,) float64
hyper           (4,) float64            b1, b2, wd, max_norm (<= 0: no clipping)
sq              (n_params,) float64     squared norm of each gradient
norm            (1,) float64            global norm before clipping (written)
loss            (1,) ftype
bad             (1,) int64              0, or bits: 1 targets, 2 inputs invalid
hist            (size,) ftype           ring buffer of losses
state           (3,) int64              count, first invalid step (-1), its bits
==============  ======================  =========================================
"""

import functools

import numba
import numpy as np
from numba import cuda, types

from .. import _cpu_optim
from ._common import compile_kernel, inline_device, launch

__all__ = ["COEF", "THREADS", "adamw_update", "get_kernels", "prepare", "ptx_signatures",
           "record_loss", "sum_of_squares"]

THREADS = 256
MAX_BLOCKS = 1024
#: Slots of ``coef``.
COEF = _cpu_optim.COEF


def _argtypes(ftype):
    f = numba.from_dtype(np.dtype(ftype))
    a1 = types.Array(f, 1, "C")
    d1 = types.Array(types.float64, 1, "C")
    i1 = types.Array(types.int64, 1, "C")
    return {"prepare": (i1, d1, d1, d1, d1, a1),
            "adamw_update": (a1, a1, a1, a1, a1, types.int32),
            "record_loss": (a1, i1, a1, i1)}


def _make_kernels():
    """Python bodies of the three kernels (a dict by name), each the function of
    ``numba_mamba._cpu_optim`` compiled as a device function; the signature
    compiled decides the dtype."""
    coef_values = inline_device(_cpu_optim.coef_values)
    adamw_element = inline_device(_cpu_optim.adamw_element)
    prepare_body = inline_device(_cpu_optim.prepare)
    record_loss_body = inline_device(_cpu_optim.record_loss)

    def prepare(t, lr, hyper, sq, norm, coef):
        if cuda.grid(1) == 0:
            prepare_body(t, lr, hyper, sq, norm, coef)

    def adamw_update(p, g, m, v, coef, decay):
        c = coef_values(coef)
        start, stride = cuda.grid(1), cuda.gridsize(1)
        for i in range(start, p.shape[0], stride):
            pi, mi, vi = adamw_element(p[i], g[i], m[i], v[i], c, decay != 0)
            m[i] = mi
            v[i] = vi
            p[i] = pi

    def record_loss(loss, bad, hist, state):
        if cuda.grid(1) == 0:
            record_loss_body(loss, bad, hist, state)

    return {"prepare": prepare, "adamw_update": adamw_update, "record_loss": record_loss}


@functools.lru_cache(maxsize=None)
def get_kernels(dtype):
    """Compiled kernels for parameters of ``dtype`` (a dict by name; cached)."""
    bodies = _make_kernels()
    argtypes = _argtypes(dtype)
    return {name: compile_kernel(fn, types.void(*argtypes[name])) for name, fn in bodies.items()}


def ptx_signatures():
    """Yield ``(name, py_func, argtypes, is_float32, launch_bounds)`` of every kernel.

    ``prepare`` computes in float64 whatever the parameters' dtype (one
    thread per step, the arithmetic of the host's AdamW), so it is never
    listed as a float32 kernel.
    """
    for dtype in (np.dtype(np.float32), np.dtype(np.float64)):
        bodies = _make_kernels()
        argtypes = _argtypes(dtype)
        for name, fn in bodies.items():
            yield (f"{name}_{dtype.name}", fn, argtypes[name],
                   dtype == np.float32 and name != "prepare", ())


def _grid(n):
    return max(1, min(MAX_BLOCKS, (n + THREADS - 1) // THREADS))


def prepare(t, lr, hyper, sq, norm, coef):
    """Advance the step count ``t`` and write this step's ``coef`` and ``norm`` (one thread)."""
    launch(get_kernels(coef.dtype)["prepare"], 1, 1, "current", (t, lr, hyper, sq, norm, coef))


def adamw_update(p, g, m, v, coef, decay):
    """One AdamW update of the flattened parameter ``p`` (and ``m``, ``v``) in place."""
    launch(get_kernels(p.dtype)["adamw_update"], _grid(p.shape[0]), THREADS, "current",
           (p, g, m, v, coef, np.int32(bool(decay))))


def record_loss(loss, bad, hist, state):
    """Write ``loss (1,)`` into the ring buffer ``hist`` at ``state[0]`` (one thread)."""
    launch(get_kernels(hist.dtype)["record_loss"], 1, 1, "current", (loss, bad, hist, state))


@functools.lru_cache(maxsize=None)
def _sum_of_squares_kernel():
    import cupy

    return cupy.ReductionKernel("T x", "float64 y", "(double)x * (double)x", "a + b", "y = a",
                                "0", "numba_mamba_sum_of_squares")


def sum_of_squares(g, out):
    """``out[...] = sum(float64(g)**2)``: one reduction, ``out`` a 0-d float64 array."""
    _sum_of_squares_kernel()(g, out=out)
