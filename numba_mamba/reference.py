"""Readable float64 reference of the selective scan, forward and backward.

This module is the oracle the fast CPU and GPU paths are tested against, and a
plain statement of what they compute.  It is a sequential loop over time in the
notation of the paper (Gu & Dao 2023), vectorised only over batch, channels and
states, and always computes in float64 whatever the input dtype.

Glossary (shapes)
-----------------
============  ==========================================================
``Bt``        batch
``D``         channels (``d_inner`` in the paper)
``L``         sequence length
``N``         states per channel (``d_state``)
``G``         groups sharing one B (or C); channel ``d`` uses group
              ``d // (D // G)``
============  ==========================================================

Recurrence (zero-order hold for ``A``, Euler for ``B``, as in the reference
implementation)::

    delta   = softplus(delta + delta_bias)          # each step optional
    h_t     = exp(delta_t A) * h_{t-1} + delta_t B_t u_t
    y_t     = <C_t, h_t>
    out_t   = (y_t + D u_t) * silu(z_t)             # D and z optional

The backward pass runs the adjoint recurrence in reverse::

    dh_t    = C_t dy_t + exp(delta_{t+1} A) * dh_{t+1},   dh_L = C_L dy_L + dlast_state

References
----------
.. [1] A. Gu and T. Dao, "Mamba: Linear-Time Sequence Modeling with Selective
   State Spaces", arXiv:2312.00752, 2023.

Examples
--------
>>> import numpy as np
>>> from numba_mamba import reference
>>> rng = np.random.default_rng(0)
>>> u = rng.standard_normal((1, 2, 5)); delta = rng.uniform(0.1, 1.0, (1, 2, 5))
>>> A = -np.ones((2, 3)); B = np.ones((2, 3)); C = np.ones((2, 3))
>>> out, last = reference.selective_scan(u, delta, A, B, C, return_last_state=True)
>>> out.shape, last.shape
((1, 2, 5), (1, 2, 3))
"""

from typing import NamedTuple

import numpy as np

__all__ = ["ScanGrads", "selective_scan", "selective_scan_vjp"]


class ScanGrads(NamedTuple):
    """Gradients of the selective scan, in the forward's argument order.

    Each field has the shape and dtype of its input, and is None where that
    input was None.
    """

    du: object  # (Bt, D, L)
    ddelta: object  # (Bt, D, L)
    dA: object  # (D, N)
    dB: object  # (D, N), (Bt, N, L) or (Bt, G, N, L), like B
    dC: object  # like C
    dD: object  # (D,) or None
    dz: object  # (Bt, D, L) or None
    ddelta_bias: object  # (D,) or None
    dinitial_state: object  # (Bt, D, N) or None


def _softplus(x):
    # log(1 + e^x) without overflow for large x
    return np.logaddexp(0.0, x)


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _per_step(M, Bt, D, L):
    """Return a function t -> (Bt, D, N) view of B or C at time t, in float64.

    ``M`` is constant (D, N), variable (Bt, N, L) or grouped (Bt, G, N, L).
    """
    M = np.asarray(M, dtype=np.float64)
    if M.ndim == 2:
        return lambda t: np.broadcast_to(M, (Bt,) + M.shape)
    if M.ndim == 3:
        return lambda t: np.broadcast_to(M[:, None, :, t], (Bt, D, M.shape[1]))
    G = M.shape[1]
    channel_group = np.arange(D) // (D // G)
    return lambda t: M[..., t][:, channel_group]


def _reduce_like(grad_steps, M, Bt, D):
    """Sum per-step gradients (list over t of (Bt, D, N)) into the shape of M."""
    g = np.stack(grad_steps, axis=-1)  # (Bt, D, N, L)
    if M.ndim == 2:
        return g.sum(axis=(0, 3))
    if M.ndim == 3:
        return g.sum(axis=1)
    G = M.shape[1]
    return g.reshape(Bt, G, D // G, g.shape[2], g.shape[3]).sum(axis=2)


def _cast(x, like):
    return None if x is None else x.astype(np.asarray(like).dtype, copy=False)


def _forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state):
    u = np.asarray(u, dtype=np.float64)
    Bt, Dc, L = u.shape
    A = np.asarray(A, dtype=np.float64)
    N = A.shape[1]
    pre = np.asarray(delta, dtype=np.float64)
    if delta_bias is not None:
        pre = pre + np.asarray(delta_bias, dtype=np.float64)[:, None]
    dt = _softplus(pre) if delta_softplus else pre
    B_at, C_at = _per_step(B, Bt, Dc, L), _per_step(C, Bt, Dc, L)

    h = np.zeros((Bt, Dc, N))
    if initial_state is not None:
        h = np.array(initial_state, dtype=np.float64)
    states = [h]  # states[t] = h_t, with h_0 the initial state
    y = np.empty((Bt, Dc, L))
    for t in range(L):
        decay = np.exp(dt[:, :, t, None] * A)  # (Bt, D, N)
        h = decay * h + (dt[:, :, t] * u[:, :, t])[:, :, None] * B_at(t)
        states.append(h)
        y[:, :, t] = np.sum(C_at(t) * h, axis=-1)

    out = y
    if D is not None:
        out = out + np.asarray(D, dtype=np.float64)[:, None] * u
    if z is not None:
        zz = np.asarray(z, dtype=np.float64)
        out_pre_gate = out
        out = out_pre_gate * zz * _sigmoid(zz)
    else:
        out_pre_gate = None
    return out, states, dt, pre, out_pre_gate


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                   delta_softplus=False, return_last_state=False, initial_state=None):
    """Selective scan, sequential float64 reference.

    Same signature and conventions as :func:`numba_mamba.selective_scan`;
    inputs are not validated.  Outputs take the dtype of ``u``.

    Returns
    -------
    out : ndarray, shape (Bt, D, L)
    last_state : ndarray, shape (Bt, D, N)
        Only when ``return_last_state`` is True.
    """
    out, states, *_ = _forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                               initial_state)
    out = _cast(out, u)
    if return_last_state:
        return out, _cast(states[-1], u)
    return out


def selective_scan_vjp(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                       delta_softplus=False, initial_state=None):
    """Selective scan and its vector-Jacobian product, sequential float64 reference.

    Returns
    -------
    out : ndarray, shape (Bt, D, L)
    last_state : ndarray, shape (Bt, D, N)
    backward : callable
        ``backward(dout, dlast_state=None)`` returns :class:`ScanGrads`, each
        gradient cast to the dtype of its input.
    """
    out, states, dt, pre, out_pre_gate = _forward(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state)
    uu = np.asarray(u, dtype=np.float64)
    Bt, Dc, L = uu.shape
    AA = np.asarray(A, dtype=np.float64)
    B_at, C_at = _per_step(B, Bt, Dc, L), _per_step(C, Bt, Dc, L)

    def backward(dout, dlast_state=None):
        dout = np.asarray(dout, dtype=np.float64)
        if z is not None:
            zz = np.asarray(z, dtype=np.float64)
            sig = _sigmoid(zz)
            dy = dout * zz * sig  # through the gate, onto y + D u
            dz = dout * out_pre_gate * sig * (1.0 + zz * (1.0 - sig))
        else:
            dy, dz = dout, None
        du = np.zeros((Bt, Dc, L))
        dD = None
        if D is not None:
            du += dy * np.asarray(D, dtype=np.float64)[:, None]
            dD = np.sum(dy * uu, axis=(0, 2))
        ddt = np.zeros((Bt, Dc, L))
        dA = np.zeros_like(AA)
        dB_steps, dC_steps = [None] * L, [None] * L

        # q is the gradient flowing into h_t from later steps (and from last_state)
        q = np.zeros_like(states[-1]) if dlast_state is None else np.array(
            dlast_state, dtype=np.float64)
        for t in range(L - 1, -1, -1):
            h_prev, h = states[t], states[t + 1]
            dC_steps[t] = dy[:, :, t, None] * h
            dh = C_at(t) * dy[:, :, t, None] + q  # total gradient at h_t
            decay = np.exp(dt[:, :, t, None] * AA)
            Bt_ = B_at(t)
            dB_steps[t] = dh * (dt[:, :, t] * uu[:, :, t])[:, :, None]
            du[:, :, t] += np.sum(dh * Bt_, axis=-1) * dt[:, :, t]
            ddt[:, :, t] = np.sum(dh * (h_prev * decay * AA + Bt_ * uu[:, :, t, None]), axis=-1)
            dA += np.sum(dh * h_prev * decay * dt[:, :, t, None], axis=0)
            q = dh * decay
        dpre = ddt * _sigmoid(pre) if delta_softplus else ddt
        return ScanGrads(
            du=_cast(du, u),
            ddelta=_cast(dpre, delta),
            dA=_cast(dA, A),
            dB=_cast(_reduce_like(dB_steps, np.asarray(B), Bt, Dc), B),
            dC=_cast(_reduce_like(dC_steps, np.asarray(C), Bt, Dc), C),
            dD=None if D is None else _cast(dD, D),
            dz=None if z is None else _cast(dz, z),
            ddelta_bias=None if delta_bias is None else _cast(dpre.sum(axis=(0, 2)), delta_bias),
            dinitial_state=None if initial_state is None else _cast(q, initial_state),
        )

    return _cast(out, u), _cast(states[-1], u), backward
