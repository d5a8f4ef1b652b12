"""CPU backend of the selective scan: Numba ``@njit(parallel=True)`` kernels.

The public layer (:mod:`numba_mamba.scan`) validates the inputs and hands this
module C-contiguous arrays of one compute dtype ``ftype`` (float32 or float64)
in the canonical layout below; nothing here validates or moves axes.

Math
----
Mamba's selective scan (Gu & Dao 2023), with zero-order hold for ``A`` and
Euler for ``B`` as in the reference implementation::

    delta_t = softplus(delta_t + delta_bias)          # bias and softplus optional
    h_t     = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t     (over the N states)
    y_t     = sum_n C_t[n] * h_t[n]
    out_t   = (y_t + D * u_t) * silu(z_t)             # D and z optional

with ``h_0 = initial_state`` (zeros when None), ``softplus(x) = log1p(exp(x))``
(``x`` itself for ``x > 20``) and ``silu(z) = z * sigmoid(z)``.  Per channel
the recurrence is the linear scan ``h_t = a_t * h_{t-1} + b_t`` whose
associative operator is ``(a1, b1) o (a2, b2) = (a2*a1, a2*b1 + b2)``; on the
CPU one thread walks it sequentially.

Canonical layout
----------------
=================  ===============================  ===========================
name               shape                            notes
=================  ===============================  ===========================
``u``, ``delta``   ``(Bt, Dc, L)``                  batch, channels, length
``z``              ``(Bt, Dc, L)`` or None
``A``              ``(Dc, N)``                      N states per channel
``B``, ``C``       ``(Dc, N)`` or ``(Bt, G, N, L)``  constant or variable, each
                                                    on its own; channel ``d``
                                                    uses group ``d // (Dc // G)``
``D``              ``(Dc,)`` or None
``delta_bias``     ``(Dc,)`` or None
``initial_state``  ``(Bt, Dc, N)`` or None          None means zeros
``chunk_states``   ``(Bt, Dc, n_chunks, N)``        saved: state entering each
                                                    chunk of ``chunk_size`` steps
=================  ===============================  ===========================

Algorithm
---------
One channel at a time, its N states as the SIMD lanes of the inner loops
(N padded up to a multiple of ``SB`` = 16 with states whose A, B and C are
0): at a step the update of every state is the same arithmetic, with
``delta_t`` and ``u_t`` scalars of the channel, ``A`` a row per channel and
a variable ``B_t``, ``C_t`` rows of (time, state) planes that the channels of
a group share (the launchers transpose B and C to that layout once per call,
a copy per (batch, group, state, step) against N per (channel, state, step)
of updates).  ``exp``, softplus and sigmoid are
:mod:`numba_mamba._cpu_vmath`'s, written in arithmetic LLVM vectorizes.  The
sum ``y_t = <C_t, h_t>`` over the lanes is taken in any order (the inner
loops are compiled with ``fastmath={"reassoc"}``); so are the backward's
sums over states.

Forward: one parallel task per (batch, slice of channels) walks the chunks
of ``chunk_size`` steps and, in each, every channel of its slice (so that a
chunk's B/C rows stay in cache): softplus of the chunk's steps, the
recurrence from the channel's state, ``out``; at the start of every chunk a
copy of the states.  Only these chunk-boundary states (and ``h_L``) are
kept, never the (Bt, Dc, L, N) history.

Backward: the chunks in reverse, each channel of the slice in turn.  For a
chunk, recompute the states inside it from its saved boundary state into a
local ``(chunk_size + 1, Np)`` buffer, and their decays ``exp(delta_t A)``
into another (the forward's step function, so the forward's values bit for
bit), then run the adjoint recurrence backwards
through the chunk::

    dy_t = dout_t * silu(z_t)                (dout_t without z)
    dh_t = C_t * dy_t + q_{t+1},   q_{t+1} = exp(delta_{t+1} A) * dh_{t+1},
    q_{L+1} = dlast_state,         dinitial_state = q_1

and from ``dh_t``: ``du``, ``ddelta`` (through the softplus by multiplying with
``sigmoid(delta + delta_bias)``), ``dA``, ``dB``, ``dC``, ``dD``,
``ddelta_bias``.  The adjoint reads the decays from that buffer, and
writes its per-step sums time reversed (LLVM left the
recurrence loops scalar where the loop around them wrote memory
downwards).  In the same loop it adds dB_t = dh_t delta_t u_t and dC_t =
h_t dy_t into per-channel rows (constant B/C) or the group's (time, state)
plane (variable; dB's time reversed).  Reductions are race-free: see :func:`_backward_kernel`.

To keep compile time low there is one forward and one backward kernel, each
compiled once per dtype: constant B/C are per-channel rows and variable ones
per-step rows, the other factor 1 (``B_t[n]`` of a channel is the product),
and absent optional inputs are replaced by tiny dummy arrays plus a flag.

References
----------
.. [1] A. Gu and T. Dao, "Mamba: Linear-Time Sequence Modeling with Selective
   State Spaces", arXiv:2312.00752, 2023.
.. [2] G. E. Blelloch, "Prefix Sums and Their Applications", CMU-CS-90-190,
   1990.
"""

from typing import NamedTuple

import numba
import numpy as np
from numba import njit, prange

from ._cpu_threads import serial_below
from ._cpu_vmath import fma, njit_noalias, vexp, vsigmoid, vsoftplus

__all__ = ["DEFAULT_CHUNK_SIZE", "CpuScanSaved", "scan_forward", "scan_backward"]

#: Steps per chunk: the backward recomputes one chunk of states at a time.
DEFAULT_CHUNK_SIZE = 64

#: States per block, the SIMD lanes of the inner loops: 16 float32 fill one
#: 512-bit register, 16 float64 two.  N is padded up to a multiple of it with
#: states whose A, B and C are 0 (they stay 0 and add exact zeros).
SB = 16


class CpuScanSaved(NamedTuple):
    """What :func:`scan_forward` keeps for :func:`scan_backward`."""

    chunk_states: np.ndarray  # (Bt, Dc, n_chunks, N): h entering chunk c, i.e. h_{c*chunk_size}
    chunk_size: int  # steps per chunk used by the forward


# ---------------------------------------------------------------- the inner loops
#
# LLVM (Numba leaves its SLP vectorizer off) vectorizes a loop over the SB
# states of a block only when (i) the loop body is long enough not to be
# unrolled completely first (each loop below computes an exp), (ii) few
# distinct arrays are written in it (each pair needs a run-time overlap
# check, and past eight LLVM gives up), and (iii) (seen on the recurrence
# loops, not understood; the adjoint's loop is vectorized all the same) the
# enclosing loop over time writes upwards in memory.  Hence: B_t and C_t
# come as (time, Np) planes, states innermost; and the adjoint, which runs
# backwards in time, writes its per-step results time reversed (row j of a
# reversed chunk is its step steps - 1 - j).
#
# The functions holding these loops are compiled with ``njit_noalias``
# (their array arguments never overlap): without it LLVM guards each entry
# into a loop over a block's states, i.e. every step, with overlap checks of
# every pair of arrays, more instructions than the step's own work.  A
# channel's per-state values (A, B, C, h, q, dA) are rows of one (8, Np)
# array ``pv``, handed to them as separate row arguments: within one array
# LLVM checks the rows' overlap over all blocks at once, which fails (and
# takes the scalar loop) as soon as N > SB.

# rows of the per-channel array ``pv`` (8, Np)
_A, _B, _C, _H, _Q, _DA = range(6)


@njit_noalias(fastmath={"reassoc"}, error_model="numpy")  # (called: inlining drops the flags)
def _forward_steps(pA, pB, pC, pH, BT, CT, rb0, rc0, b_var, c_var, dts, dtx, ys, steps, hs,
                   aa, keep):
    """``steps`` steps of one channel: ys[s] = <C_t, h_t> (summed in any
    order).  Without ``keep``, from the state in pH to the state after
    the last step; with ``keep``, from hs[0] (the caller's), writing hs[s + 1]
    = h_t and aa[s + 1] = exp(delta_t A) (pH unused).  Step
    s uses rows rb0 + s of BT and rc0 + s of CT where variable, row 0 where
    constant (whose values then live in pB and pC, the other
    factor 1)."""
    zero = ys.dtype.type(0)
    for s in range(steps):
        dt = dts[s]
        x = dtx[s]
        rb = rb0 + s if b_var else 0
        rc = rc0 + s if c_var else 0
        acc = zero
        for blk in range(pA.shape[0] // SB):
            o = blk * SB
            for n in range(SB):
                a = vexp(dt * pA[o + n])
                h = hs[s, o + n] if keep else pH[o + n]
                hn = fma(a, h, x * (pB[o + n] * BT[rb, o + n]))
                if keep:
                    hs[s + 1, o + n] = hn
                    aa[s + 1, o + n] = a
                else:
                    pH[o + n] = hn
                acc += (pC[o + n] * CT[rc, o + n]) * hn
        ys[s] = acc


@njit_noalias(fastmath={"reassoc"}, error_model="numpy")
def _adjoint_steps(pA, pB, pC, pQ, pDA, BT, CT, rb0, rc0, b_var, c_var, dts, xs, dtx, gs, hs,
                   aa, dBp, rdb0, dCp, duR, ddtR, steps):
    """The adjoint of one channel through a chunk of ``steps`` steps, last
    step first: j = 0 is step s = steps - 1, t = t0 + s.  ``dts``, ``xs``,
    ``dtx``, ``gs`` the step, input, their product and dy, BT/CT rows rb0 + s
    and rc0 + s (row 0 where constant), ``hs`` :func:`_forward_steps`'s
    states (hs[s + 1] = h_t), all in time order.  pQ goes from the
    gradient reaching the chunk's last state to the one reaching the state
    entering it, pDA accumulates; so do dB_t = dh_t delta_t u_t, into
    row rdb0 + j of ``dBp`` (time reversed), and dC_t = h_t dy_t, into row
    rc0 + s of ``dCp`` (each row 0 where constant: then summed from the
    chunk's last step, as everywhere).  Written time reversed: duR[j] =
    <dh_t, B_t> and ddtR[j] = <dh_t, a_t A h_{t-1} + B_t u_t> (sums in any
    order).  The decay a_t = exp(delta_t A) is aa[s + 1], from
    :func:`_forward_steps`."""
    zero = duR.dtype.type(0)
    for j in range(steps):
        sj = steps - 1 - j
        dt = dts[sj]
        x = xs[sj]
        dy = gs[sj]
        rb = rb0 + sj if b_var else 0
        rc = rc0 + sj if c_var else 0
        rdb = rdb0 + j if b_var else 0
        w = dtx[sj]
        au = zero
        at = zero
        for blk in range(pA.shape[0] // SB):
            o = blk * SB
            for n in range(SB):
                A_n = pA[o + n]
                a = aa[sj + 1, o + n]
                bk = pB[o + n] * BT[rb, o + n]
                dh = fma(pC[o + n] * CT[rc, o + n], dy, pQ[o + n])  # at h_t
                ah = a * hs[sj, o + n]  # exp(delta_t A) h_{t-1}
                at += dh * fma(ah, A_n, bk * x)
                pDA[o + n] = fma(dh * ah, dt, pDA[o + n])
                au += dh * bk
                pQ[o + n] = a * dh
                dBp[rdb, o + n] = fma(dh, w, dBp[rdb, o + n])
                dCp[rc, o + n] = fma(hs[sj + 1, o + n], dy, dCp[rc, o + n])
        duR[j] = au
        ddtR[j] = at


@njit(inline="always")
def _load_channel(pv, A, Bc, Cc, d, bd, cd, h0, has_h0, b, dlast, has_dlast, N):
    """pv of channel d: A; B and C where constant (rows bd, cd of Bc, Cc:
    ones where variable); h from h0, q from dlast (zeros without); dA 0.
    Padded states get zeros."""
    zero = pv.dtype.type(0)
    for m in range(pv.shape[1]):
        pv[_A, m] = A[d, m]
        pv[_B, m] = Bc[bd, m]
        pv[_C, m] = Cc[cd, m]
        pv[_H, m] = h0[b, d, m] if has_h0 and m < N else zero
        pv[_Q, m] = dlast[b, d, m] if has_dlast and m < N else zero
        pv[_DA, m] = zero


@njit_noalias(error_model="numpy")
def _chunk_inputs(delta, u, b, d, t0, steps, bias, has_bias, softplus, pre, dts, xs, dtx):
    """The chunk's raw step (+ bias) in pre, step in dts (softplus), input in
    xs, their product in dtx."""
    drow = delta[b, d, t0:]
    urow = u[b, d, t0:]
    for s in range(steps):
        v = drow[s] + bias if has_bias else drow[s]
        pre[s] = v
        xs[s] = urow[s]
    if softplus:
        for s in range(steps):
            dts[s] = vsoftplus(pre[s])
    else:
        for s in range(steps):
            dts[s] = pre[s]
    for s in range(steps):
        dtx[s] = dts[s] * xs[s]


# ---------------------------------------------------------------- forward


@njit(parallel=True, cache=True, error_model="numpy")
def _forward_kernel(u, delta, A, Bc, BT, Cc, CT, D, z, delta_bias, h0, slice_starts,
                    b_var, c_var, b_group_size, c_group_size,
                    has_D, has_z, has_bias, softplus, has_h0, chunk_size,
                    out, last_state, chunk_states):
    """Write out (Bt, Dc, L), last_state (Bt, Dc, N), chunk_states (Bt, Dc, n_chunks, N).

    One parallel task per (batch b, slice p): the channels ``slice_starts[p]
    <= d < slice_starts[p + 1]``, chunk by chunk.  ``A`` is (Dc, Np), N padded to
    Np with zeros; a variable B is ``BT`` (Bt, G, L, Np), B_t[n] at
    BT[b, g, t, n], with ``Bc`` ones (1, Np); a constant one is ``Bc``
    (Dc, Np) with ``BT`` ones (1, 1, 1, Np).  The same for C.
    """
    Bt, Dc, L = u.shape
    N = last_state.shape[2]
    Np = A.shape[1]
    n_chunks = chunk_states.shape[2]
    n_slices = slice_starts.shape[0] - 1
    ftype = u.dtype
    zero = ftype.type(0)  # constants in ftype: bare literals would widen float32
    T = min(chunk_size, L)
    for task in prange(Bt * n_slices):
        b = task // n_slices
        p = task - b * n_slices
        d0 = slice_starts[p]
        nd = slice_starts[p + 1] - d0
        pvs = np.zeros((nd, 8, Np), dtype=ftype)
        pre = np.zeros(T, dtype=ftype)
        dts = np.zeros(T, dtype=ftype)
        xs = np.zeros(T, dtype=ftype)
        dtx = np.zeros(T, dtype=ftype)
        ys = np.zeros(T, dtype=ftype)
        no_states = np.zeros((1, 1), dtype=ftype)
        for i in range(nd):
            d = d0 + i
            _load_channel(pvs[i], A, Bc, Cc, d, 0 if b_var else d, 0 if c_var else d, h0, has_h0,
                          b, h0, False, N)
        # chunk by chunk, all the slice's channels (which share B_t and C_t rows)
        for c in range(n_chunks):
            t0 = c * chunk_size
            steps = min(L, t0 + chunk_size) - t0
            for i in range(nd):
                d = d0 + i
                pv = pvs[i]
                for m in range(N):
                    chunk_states[b, d, c, m] = pv[_H, m]
                BTp = BT[b if b_var else 0, d // b_group_size if b_var else 0]
                CTp = CT[b if c_var else 0, d // c_group_size if c_var else 0]
                bias = delta_bias[d] if has_bias else zero
                Dd = D[d] if has_D else zero
                _chunk_inputs(delta, u, b, d, t0, steps, bias, has_bias, softplus, pre, dts, xs,
                              dtx)
                _forward_steps(pv[_A], pv[_B], pv[_C], pv[_H], BTp, CTp, t0, t0, b_var, c_var,
                               dts, dtx, ys, steps, no_states, no_states, False)
                oseg = out[b, d, t0:]
                zseg = z[b if has_z else 0, d if has_z else 0, t0 if has_z else 0:]
                for s in range(steps):
                    y = fma(Dd, xs[s], ys[s]) if has_D else ys[s]
                    if has_z:
                        zs = zseg[s]
                        y *= zs * vsigmoid(zs)
                    oseg[s] = y
        for i in range(nd):
            for m in range(N):
                last_state[b, d0 + i, m] = pvs[i, _H, m]


# ---------------------------------------------------------------- backward


@njit(parallel=True, cache=True, error_model="numpy")
def _backward_kernel(dout, dlast, u, delta, A, Bc, BT, Cc, CT, D, z, delta_bias,
                     chunk_states, slice_starts,
                     b_var, c_var, b_group_size, c_group_size,
                     has_D, has_z, has_bias, softplus, has_dlast, chunk_size,
                     du, ddelta, dz, dinit,
                     dA_part, dD_part, dbias_part, dB_accum, dC_accum):
    """Write du, ddelta, dz, dinit and accumulate the partial reductions.

    Parallel tasks are (batch b, slice p): task (b, p) handles the channels
    ``slice_starts[p] <= d < slice_starts[p + 1]`` one after the other.
    Inputs as for :func:`_forward_kernel`.  Every array a task
    writes is indexed so that no two tasks touch the same element, so no
    atomics are needed:

    - du, ddelta, dz, dinit: per element (b, d, ...), unique to the task.
    - dA_part (Bt, Dc, N), dD_part, dbias_part (Bt, Dc): per (b, d) partial
      sums over time; the caller sums over batch.
    - dB_accum / dC_accum when constant: (Bt, 1, Dc, 1, Np), per (b, d)
      partial sums over time; the caller sums over batch.
    - dB_accum / dC_accum when variable: (Bt, n_slices, G, L, Np), dB time
      reversed (row L - 1 - t), dC in time order, accumulated over the
      channels of a group that fall in the task's slice; the caller sums
      over slices.

    ``dB_accum`` and ``dC_accum`` accumulate and must be zero on entry; every
    other output is overwritten.  Sums over time run from the last step to the
    first, as the adjoint does, so that no result depends on the chunking.
    """
    Bt, Dc, L = u.shape
    N = dinit.shape[2]
    Np = A.shape[1]
    n_chunks = chunk_states.shape[2]
    n_slices = slice_starts.shape[0] - 1
    ftype = u.dtype
    zero = ftype.type(0)  # constants in ftype: bare literals would widen float32
    one = ftype.type(1)
    T = min(chunk_size, L)
    for task in prange(Bt * n_slices):
        b = task // n_slices
        p = task - b * n_slices
        hs = np.zeros((T + 1, Np), dtype=ftype)  # recomputed states, forward in time
        aa = np.zeros((T + 1, Np), dtype=ftype)  # their decays exp(delta_t A), row t + 1
        # per step: forward in time, then time reversed (rows of one array)
        fw = np.zeros((7, T), dtype=ftype)
        pre, dts, xs, dtx, ys, gs, sgm = fw[0], fw[1], fw[2], fw[3], fw[4], fw[5], fw[6]
        rv = np.zeros((5, T), dtype=ftype)
        dtR, xR, gR, duR, ddtR = rv[0], rv[1], rv[2], rv[3], rv[4]
        d0 = slice_starts[p]
        nd = slice_starts[p + 1] - d0
        pvs = np.zeros((nd, 8, Np), dtype=ftype)
        accs = np.zeros((nd, 2), dtype=ftype)  # per channel: dD, dbias
        for i in range(nd):
            d = d0 + i
            _load_channel(pvs[i], A, Bc, Cc, d, 0 if b_var else d, 0 if c_var else d, dlast,
                          False, b, dlast, has_dlast, N)
        # chunk by chunk from the last, all the slice's channels (which share
        # B_t and C_t rows and, where variable, the dB and dC rows)
        for c in range(n_chunks - 1, -1, -1):
            t0 = c * chunk_size
            steps = min(L, t0 + chunk_size) - t0
            r0 = L - t0 - steps  # reversed row of the chunk's last step
            for i in range(nd):
                d = d0 + i
                pv = pvs[i]
                gb = d // b_group_size if b_var else 0
                gc = d // c_group_size if c_var else 0
                BTp = BT[b if b_var else 0, gb]
                CTp = CT[b if c_var else 0, gc]
                # dB, dC: the group's plane of this slice (dB's time reversed), or this channel's row
                dBp = dB_accum[b, p if b_var else 0, gb if b_var else d]
                dCp = dC_accum[b, p if c_var else 0, gc if c_var else d]
                bias = delta_bias[d] if has_bias else zero
                Dd = D[d] if has_D else zero
                _chunk_inputs(delta, u, b, d, t0, steps, bias, has_bias, softplus, pre, dts, xs,
                              dtx)
                # recompute the chunk's states from its saved boundary state (the
                # forward's arithmetic, so the forward's values), and y
                for m in range(Np):
                    hs[0, m] = chunk_states[b, d, c, m] if m < N else zero
                _forward_steps(pv[_A], pv[_B], pv[_C], pv[_H], BTp, CTp, t0, t0, b_var, c_var,
                               dts, dtx, ys, steps, hs, aa, True)
                # upstream gradient at y: dy = dout silu(z), and dz
                gseg = dout[b, d, t0:]
                if has_z:
                    zseg = z[b, d, t0:]
                    dzseg = dz[b, d, t0:]
                    for s in range(steps):
                        zs = zseg[s]
                        sz = vsigmoid(zs)
                        gi = gseg[s]
                        y = fma(Dd, xs[s], ys[s]) if has_D else ys[s]
                        dzseg[s] = gi * y * sz * fma(zs, one - sz, one)
                        gs[s] = gi * zs * sz
                else:
                    for s in range(steps):
                        gs[s] = gseg[s]
                # time-reversed copies for the adjoint
                for j in range(steps):
                    s = steps - 1 - j
                    dtR[j] = dts[s]
                    xR[j] = xs[s]
                    gR[j] = gs[s]
                _adjoint_steps(pv[_A], pv[_B], pv[_C], pv[_Q], pv[_DA], BTp, CTp, t0, t0, b_var,
                               c_var, dts, xs, dtx, gs, hs, aa, dBp, r0, dCp, duR, ddtR, steps)
                # du = <dh, B> delta + dy D; ddelta through the softplus; dD, dbias
                if softplus:  # (a loop of its own: one walking time backwards stays scalar)
                    for s in range(steps):
                        sgm[s] = vsigmoid(pre[s])
                duseg = du[b, d, t0:]
                ddseg = ddelta[b, d, t0:]
                for j in range(steps):
                    s = steps - 1 - j
                    v = duR[j] * dtR[j]
                    duseg[s] = fma(Dd, gR[j], v) if has_D else v
                    g = ddtR[j] * sgm[s] if softplus else ddtR[j]
                    ddseg[s] = g
                    accs[i, 1] += g
                    if has_D:
                        accs[i, 0] = fma(gR[j], xR[j], accs[i, 0])
        for i in range(nd):
            d = d0 + i
            for m in range(N):
                dinit[b, d, m] = pvs[i, _Q, m]
                dA_part[b, d, m] = pvs[i, _DA, m]
            dD_part[b, d] = accs[i, 0]
            dbias_part[b, d] = accs[i, 1]


# ---------------------------------------------------------------- launchers


def _padded(N):
    """N rounded up to a multiple of :data:`SB`."""
    return -(-N // SB) * SB


def _states_last(M, Dc, Np, ftype):
    """B or C as the kernels take it: (Bc, BT, is_variable, group_size).

    Constant (Dc, N): ``Bc`` the (Dc, Np) values, ``BT`` ones (1, 1, 1, Np).
    Variable (Bt, G, N, L): ``Bc`` ones (1, Np), ``BT`` the (Bt, G, L, Np)
    transpose, states innermost.  Padded states are 0.
    """
    if M.ndim == 2:
        Bc = np.zeros((Dc, Np), dtype=ftype)
        Bc[:, :M.shape[1]] = M
        return Bc, np.ones((1, 1, 1, Np), dtype=ftype), False, 1
    Bt, G, N, L = M.shape
    BT = np.zeros((Bt, G, L, Np), dtype=ftype)
    BT[..., :N] = M.transpose(0, 1, 3, 2)
    return np.ones((1, Np), dtype=ftype), BT, True, Dc // G


def _padded_A(A, Np):
    Ap = np.zeros((A.shape[0], Np), dtype=A.dtype)
    Ap[:, :A.shape[1]] = A
    return Ap


def _dummy(ndim, ftype):
    """Stand-in for an absent optional array (never read: its flag is False)."""
    return np.zeros((1,) * ndim, dtype=ftype)


def _n_chunks(L, chunk_size):
    return (L + chunk_size - 1) // chunk_size


def _num_slices(Bt, Dc):
    """Channel slices per batch element: enough tasks for every thread."""
    threads = numba.get_num_threads()
    return max(1, min(Dc, -(-threads // Bt)))


def _slice_starts(Dc, n_slices):
    """Slice p holds channels [starts[p], starts[p + 1]), as even as can be."""
    return (np.arange(n_slices + 1, dtype=np.int64) * Dc) // n_slices


def scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                 chunk_size=DEFAULT_CHUNK_SIZE, save=True, out=None):
    """Selective scan forward on the CPU, keeping only chunk-boundary states.

    Parameters
    ----------
    u, delta : ndarray, shape (Bt, Dc, L)
        Input and raw step size (before ``delta_bias`` and softplus).
    A : ndarray, shape (Dc, N)
        Diagonal state matrix, one row per channel.
    B, C : ndarray, shape (Dc, N) or (Bt, G, N, L)
        Constant or variable input/output matrices, each independently.
    D : ndarray, shape (Dc,), or None
        Skip connection.
    z : ndarray, shape (Bt, Dc, L), or None
        Gate: ``out *= silu(z)``.
    delta_bias : ndarray, shape (Dc,), or None
        Added to ``delta`` before the softplus.
    delta_softplus : bool
        Apply softplus to the (biased) ``delta``.
    initial_state : ndarray, shape (Bt, Dc, N), or None
        ``h_0``; None means zeros.
    chunk_size : int, optional
        Steps between saved states (default :data:`DEFAULT_CHUNK_SIZE`).  The
        result does not depend on it; it trades saved memory
        (``Bt*Dc*ceil(L/chunk_size)*N``) against the backward's local buffer.
    save : bool, optional
        Whether a backward will follow; accepted for the GPU backend's
        signature (whose state engine then keeps no states).  The chunk
        states are kept either way.
    out : ndarray, shape (Bt, Dc, L), optional
        Written with the result and returned, in place of a new array: of
        ``u``'s dtype, C-contiguous, writeable, sharing no memory with the
        inputs (unchecked here).

    All arrays are C-contiguous and share one dtype, float32 or float64, in
    which everything is computed.

    Returns
    -------
    out : ndarray, shape (Bt, Dc, L)
    last_state : ndarray, shape (Bt, Dc, N)
        ``h_L``.
    saved : CpuScanSaved
        ``chunk_states`` (Bt, Dc, ceil(L / chunk_size), N), the state entering
        each chunk, and ``chunk_size``; pass it to :func:`scan_backward`.

    Raises
    ------
    ValueError
        If ``chunk_size`` is not a positive integer.

    See Also
    --------
    scan_backward : the vector-Jacobian product, from ``saved``.
    numba_mamba.reference.selective_scan : the float64 oracle.

    Notes
    -----
    ``h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t``, ``y_t = <C_t, h_t>``,
    ``out_t = (y_t + D u_t) silu(z_t)``: see the module docstring.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_mamba import _cpu_scan
    >>> rng = np.random.default_rng(0)
    >>> u = rng.standard_normal((1, 2, 5)); delta = rng.uniform(0.1, 1.0, (1, 2, 5))
    >>> A = -np.ones((2, 3)); B = np.ones((2, 3)); C = np.ones((2, 3))
    >>> out, last, saved = _cpu_scan.scan_forward(u, delta, A, B, C, None, None, None,
    ...                                           False, None, chunk_size=2)
    >>> out.shape, last.shape, saved.chunk_states.shape
    ((1, 2, 5), (1, 2, 3), (1, 2, 3, 3))
    """
    chunk_size = _check_positive("chunk_size", chunk_size)
    Bt, Dc, L = u.shape
    N = A.shape[1]
    ftype = u.dtype
    Np = _padded(N)
    Bc, BT, b_var, b_group_size = _states_last(B, Dc, Np, ftype)
    Cc, CT, c_var, c_group_size = _states_last(C, Dc, Np, ftype)
    if out is None:
        out = np.empty((Bt, Dc, L), dtype=ftype)
    last_state = np.empty((Bt, Dc, N), dtype=ftype)
    chunk_states = np.empty((Bt, Dc, _n_chunks(L, chunk_size), N), dtype=ftype)
    with serial_below(Bt * Dc * N * L):
        _forward_kernel(
            u, delta, _padded_A(A, Np), Bc, BT, Cc, CT,
            _dummy(1, ftype) if D is None else D,
            _dummy(3, ftype) if z is None else z,
            _dummy(1, ftype) if delta_bias is None else delta_bias,
            _dummy(3, ftype) if initial_state is None else initial_state,
            _slice_starts(Dc, _num_slices(Bt, Dc)),
            b_var, c_var, b_group_size, c_group_size,
            D is not None, z is not None, delta_bias is not None, bool(delta_softplus),
            initial_state is not None, chunk_size,
            out, last_state, chunk_states)
    return out, last_state, CpuScanSaved(chunk_states, chunk_size)


def scan_backward(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                  initial_state, saved, chunk_size=None, n_slices=None):
    """Vector-Jacobian product of the selective scan on the CPU.

    Parameters
    ----------
    dout : ndarray, shape (Bt, Dc, L)
        Gradient of the loss with respect to ``out``.
    dlast_state : ndarray, shape (Bt, Dc, N), or None
        Gradient with respect to ``last_state``; None means zero.
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state
        The forward's inputs, as in :func:`scan_forward`.
    saved : CpuScanSaved
        The third result of :func:`scan_forward` on these inputs.
    chunk_size : int or None, optional
        Must be None or the forward's ``chunk_size`` (which ``saved`` holds).
    n_slices : int or None, optional
        Parallel tasks per batch element: the channels are split into this
        many contiguous slices (capped at the number of channels).  Variable dB/dC take
        ``n_slices`` times their own size in partial sums.  Default: just
        enough tasks to occupy every Numba thread.  Only the summation order
        of variable dB/dC depends on it.

    Returns
    -------
    du, ddelta : ndarray, shape (Bt, Dc, L)
        ``ddelta`` is with respect to the raw ``delta`` (before bias and
        softplus).
    dA : ndarray, shape (Dc, N)
    dB, dC : ndarray, shape like B and C
        (Dc, N) when constant (summed over batch and time), (Bt, G, N, L)
        when variable (summed over the channels of each group).
    dD : ndarray, shape (Dc,), or None
    dz : ndarray, shape (Bt, Dc, L), or None
    ddelta_bias : ndarray, shape (Dc,), or None
        Sum over batch and time of the gradient at ``delta + delta_bias``.
    dinitial_state : ndarray, shape (Bt, Dc, N), or None
        Each gradient is None exactly where its input was None, and has the
        dtype of ``u``.

    Raises
    ------
    ValueError
        If ``chunk_size`` is given and differs from ``saved.chunk_size``, or
        ``n_slices`` is not a positive integer.

    See Also
    --------
    scan_forward
    numba_mamba.reference.selective_scan_vjp : the float64 oracle.

    Notes
    -----
    With ``a_t = exp(delta_t A)``, ``dy_t = dout_t silu(z_t)`` (or ``dout_t``)
    and ``q_{L+1} = dlast_state``, going backwards in time::

        dh_t   = C_t dy_t + q_{t+1},        q_t = a_t dh_t,   dinitial_state = q_1
        dB_t   = dh_t delta_t u_t,          dC_t = dy_t h_t
        du_t   = dy_t D + <dh_t, delta_t B_t>
        ddelta_t = <dh_t, a_t A h_{t-1} + B_t u_t>   (times sigmoid(delta_t + bias) with softplus)
        dA     = sum_{b,t} dh_t a_t h_{t-1} delta_t

    The states ``h_t`` are recomputed one chunk at a time from
    ``saved.chunk_states`` instead of being stored by the forward.
    """
    with serial_below(u.size * A.shape[1]):  # (the slices follow the threads)
        return _scan_backward(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias,
                              delta_softplus, initial_state, saved, chunk_size, n_slices)


def _scan_backward(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                   initial_state, saved, chunk_size, n_slices):
    """:func:`scan_backward` on Numba's current thread count."""
    if chunk_size is not None and chunk_size != saved.chunk_size:
        raise ValueError(f"chunk_size must be the forward's ({saved.chunk_size}) or None, "
                         f"got {chunk_size}")
    chunk_size = saved.chunk_size
    Bt, Dc, L = u.shape
    N = A.shape[1]
    ftype = u.dtype
    Np = _padded(N)
    Bc, BT, b_var, b_group_size = _states_last(B, Dc, Np, ftype)
    Cc, CT, c_var, c_group_size = _states_last(C, Dc, Np, ftype)
    if n_slices is None:
        n_slices = _num_slices(Bt, Dc)
    n_slices = min(Dc, _check_positive("n_slices", n_slices))
    slice_starts = _slice_starts(Dc, n_slices)

    def part_like(BTx, var):
        # variable: (Bt, n_slices, G, L, Np) per slice, time reversed;
        # constant: (Bt, 1, Dc, 1, Np) per channel
        if var:
            return np.zeros((Bt, n_slices) + BTx.shape[1:], dtype=ftype)
        return np.zeros((Bt, 1, Dc, 1, Np), dtype=ftype)

    du = np.empty((Bt, Dc, L), dtype=ftype)
    ddelta = np.empty((Bt, Dc, L), dtype=ftype)
    dz = np.empty((Bt, Dc, L), dtype=ftype) if z is not None else _dummy(3, ftype)
    dinit = np.empty((Bt, Dc, N), dtype=ftype)
    dA_part = np.empty((Bt, Dc, N), dtype=ftype)
    dD_part = np.empty((Bt, Dc), dtype=ftype)
    dbias_part = np.empty((Bt, Dc), dtype=ftype)
    dB_accum = part_like(BT, b_var)
    dC_accum = part_like(CT, c_var)
    _backward_kernel(
        dout, _dummy(3, ftype) if dlast_state is None else dlast_state,
        u, delta, _padded_A(A, Np), Bc, BT, Cc, CT,
        _dummy(1, ftype) if D is None else D,
        _dummy(3, ftype) if z is None else z,
        _dummy(1, ftype) if delta_bias is None else delta_bias,
        saved.chunk_states, slice_starts,
        b_var, c_var, b_group_size, c_group_size,
        D is not None, z is not None, delta_bias is not None, bool(delta_softplus),
        dlast_state is not None, chunk_size,
        du, ddelta, dz, dinit, dA_part, dD_part, dbias_part, dB_accum, dC_accum)

    def finish(part, var, reversed_time):
        if var:  # sum the slices' partials, time in order: (Bt, G, N, L)
            total = part[:, 0] if n_slices == 1 else part.sum(axis=1)
            if reversed_time:
                total = total[:, :, ::-1]
            return np.ascontiguousarray(total[..., :N].transpose(0, 1, 3, 2))
        return part.sum(axis=(0, 1, 3))[:, :N]  # over batch: (Dc, N)

    return (
        du,
        ddelta,
        dA_part.sum(axis=0),
        finish(dB_accum, b_var, True),
        finish(dC_accum, c_var, False),
        None if D is None else dD_part.sum(axis=0),
        None if z is None else dz,
        None if delta_bias is None else dbias_part.sum(axis=0),
        None if initial_state is None else dinit,
    )


def _check_positive(name, value):
    """A tuning option as a Python int, or ValueError naming it."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) \
            or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)
