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
Channels are processed in blocks of ``LANES`` (16) channels of one group of
every variable B/C, the block's channels as the SIMD lanes of the inner loops:
at a step, the update of state n is the same arithmetic for every channel,
with ``delta``, ``u`` and ``A`` differing per lane and a variable ``B_t[n]``,
``C_t[n]`` shared by the group (a scalar broadcast over the lanes).  ``exp``,
softplus and sigmoid are :mod:`numba_mamba._cpu_vmath`'s, written in
arithmetic LLVM vectorizes.  A block reads ``u``, ``delta``, ``z`` in tiles of
up to 64 steps, transposed so that channels are innermost (the transposition
costs one copy per (channel, step), the update N of them).

Forward: one parallel task per (batch, block) keeps the block's N x 16 states
in a small local array and sweeps over time, writing ``out`` and, at the
start of every chunk of ``chunk_size`` steps, a copy of the states.  Only
these chunk-boundary states (and ``h_L``) are kept, never the (Bt, Dc, L, N)
history.

Backward: per block, walk the chunks in reverse.  For each chunk, recompute
the states inside it from its saved boundary state into a local
``(chunk_size + 1, N, 2, lanes)`` buffer (with the decays
``exp(delta_t A)``; the same step function as the forward, so the same
values), then run the adjoint recurrence backwards through the chunk::

    dy_t = dout_t * silu(z_t)                (dout_t without z)
    dh_t = C_t * dy_t + q_{t+1},   q_{t+1} = exp(delta_{t+1} A) * dh_{t+1},
    q_{L+1} = dlast_state,         dinitial_state = q_1

and from ``dh_t``: ``du``, ``ddelta`` (through the softplus by multiplying with
``sigmoid(delta + delta_bias)``), ``dA``, ``dB``, ``dC``, ``dD``,
``ddelta_bias``.  A variable dB/dC is a sum over the block's lanes (done per
chunk, after the sweep).  Reductions are race-free: see
:func:`_backward_kernel`.

To keep compile time low there is one forward and one backward kernel, each
compiled once per dtype: constant B/C are per-lane values and variable ones
per-step values, the other factor 1 (``B_t[n]`` of a lane is the product),
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
from numba.extending import overload

from ._cpu_threads import serial_below
from ._cpu_vmath import fma, vexp, vsigmoid, vsoftplus

__all__ = ["DEFAULT_CHUNK_SIZE", "CpuScanSaved", "scan_forward", "scan_backward"]

#: Steps per chunk: the backward recomputes one chunk of states at a time.
DEFAULT_CHUNK_SIZE = 64


#: Channels per block, processed as SIMD lanes, per compute dtype.  16 float32
#: fill one 512-bit register; float64 takes 16 too, as two, since LLVM does not
#: vectorize a loop of fewer than 16 iterations.
LANES = {np.dtype(np.float32): 16, np.dtype(np.float64): 16}


class CpuScanSaved(NamedTuple):
    """What :func:`scan_forward` keeps for :func:`scan_backward`."""

    chunk_states: np.ndarray  # (Bt, Dc, n_chunks, N): h entering chunk c, i.e. h_{c*chunk_size}
    chunk_size: int  # steps per chunk used by the forward


# ---------------------------------------------------------------- tiles
#
# A block's data lives in small tiles with the block's channels innermost, as
# SIMD lanes: (steps, lanes) for per-step values (flat arrays, element
# [s * lanes + k]), (N, lanes) for per-state ones.  Loops over lanes have the
# compile-time trip count ``lanes``.  Two things keep LLVM vectorizing them:
#
# - The hot loops (one step, one state, all lanes) read and write few arrays,
#   each with constant inner dimensions: per-state values are rows of one
#   (N, 8, lanes) array, the step's values rows of one (8, lanes) array.
#   LLVM then sees that the rows do not overlap; with a dozen separate arrays
#   it needs a run-time overlap check per pair, gives up past eight and
#   leaves the loop scalar.
# - Loops that call vexp, vsoftplus or vsigmoid outside the hot loops run over
#   a whole tile as one flat loop (LLVM leaves a 16-iteration loop with calls
#   that long unvectorized).

# rows of the per-state array ``par`` (N, 8, lanes)
_A, _B, _C, _H, _Q, _DA, _DB, _DC = range(8)
# rows of the per-step array ``cur`` (8, lanes)
_DT, _X, _DTX, _DY, _DU, _DDT, _Y = range(7)


def _lane_count(x):
    """Channels per block for an array ``x`` of the compute dtype (in kernels only)."""
    return LANES[x.dtype]


@overload(_lane_count, inline="always")
def _ov_lane_count(x):
    lanes = LANES[np.dtype(str(x.dtype))]

    return lambda x: lanes


@njit(inline="always")
def _load_tile(src, b, d0, kb, s0, steps, tile):
    """tile[s * lanes + k] = src[b, d0 + k, s0 + s]: a (steps, kb) block, channels innermost."""
    lanes = _lane_count(tile)
    for k in range(kb):
        row = src[b, d0 + k]
        for s in range(steps):
            tile[s * lanes + k] = row[s0 + s]


@njit(inline="always")
def _store_tile(tile, b, d0, kb, s0, steps, dst):
    """dst[b, d0 + k, s0 + s] = tile[s * lanes + k]."""
    lanes = _lane_count(tile)
    for k in range(kb):
        row = dst[b, d0 + k]
        for s in range(steps):
            row[s0 + s] = tile[s * lanes + k]


@njit(inline="always")
def _load_steps(M, var, bm, gm, s0, steps, tile):
    """tile[s, n] = M[bm, gm, n, s0 + s] for a variable B or C; a constant one
    leaves the tile as it is (ones: its values are per lane, not per step)."""
    if var:
        for n in range(tile.shape[1]):
            row = M[bm, gm, n]
            for s in range(steps):
                tile[s, n] = row[s0 + s]


@njit(inline="always")
def _block_params(par, A, B, C, b_var, c_var, d0, kb):
    """par[n, _A/_B/_C, k] for the block's lanes: A, and B and C where constant
    (ones where variable: their values come per step); unused lanes 0 and 1."""
    zero = par.dtype.type(0)  # (a bare 0 or 1 would make the selects float64)
    one = par.dtype.type(1)
    N = par.shape[0]
    for n in range(N):
        for k in range(par.shape[2]):
            use = k < kb
            d = d0 + k if use else d0
            par[n, _A, k] = A[d, n] if use else zero
            par[n, _B, k] = B[0, d, n, 0] if use and not b_var else one
            par[n, _C, k] = C[0, d, n, 0] if use and not c_var else one


@njit(inline="always")
def _step(par, cur, dts, dtx, ys, Bs, Cs, s, st, keep):
    """Step s of a tile for every state and lane: par[n, _H] becomes h_t,
    ys[s] gets y_t = <C_t, h_t>; with ``keep`` also st[s + 1, n] = (h_t,
    decay).  The forward and the backward's recomputation both run this, so
    the backward sees the forward's states bit for bit."""
    lanes = _lane_count(par)
    for k in range(lanes):
        cur[_DT, k] = dts[s * lanes + k]
        cur[_DTX, k] = dtx[s * lanes + k]
        cur[_Y, k] = 0
    for n in range(par.shape[0]):
        b_sn = Bs[s, n]
        c_sn = Cs[s, n]
        for k in range(lanes):
            a = vexp(cur[_DT, k] * par[n, _A, k])
            hn = fma(a, par[n, _H, k], cur[_DTX, k] * (par[n, _B, k] * b_sn))
            par[n, _H, k] = hn
            cur[_Y, k] = fma(par[n, _C, k] * c_sn, hn, cur[_Y, k])
            if keep:
                st[s + 1, n, 0, k] = hn
                st[s + 1, n, 1, k] = a
    for k in range(lanes):
        ys[s * lanes + k] = cur[_Y, k]


@njit(inline="always")
def _add_lanes(tile, v, steps):
    """tile[s * lanes + k] += v[k]."""
    lanes = _lane_count(tile)
    for s in range(steps):
        for k in range(lanes):
            tile[s * lanes + k] += v[k]


@njit(inline="always")
def _fma_lanes(tile, v, x, steps):
    """tile[s * lanes + k] += v[k] * x[s * lanes + k] (rounded once)."""
    lanes = _lane_count(tile)
    for s in range(steps):
        for k in range(lanes):
            tile[s * lanes + k] = fma(v[k], x[s * lanes + k], tile[s * lanes + k])


@njit(inline="always")
def _sum_lanes(acc, x, y, steps):
    """acc[k] += x[s * lanes + k] * y[s * lanes + k], s from the last step to the first (the
    adjoint's order, whatever the chunking)."""
    lanes = _lane_count(acc)
    for s in range(steps - 1, -1, -1):
        for k in range(lanes):
            acc[k] = fma(x[s * lanes + k], y[s * lanes + k], acc[k])


@njit(inline="always")
def _add_steps(acc, x, steps):
    """acc[k] += x[s * lanes + k], s from the last step to the first."""
    lanes = _lane_count(acc)
    for s in range(steps - 1, -1, -1):
        for k in range(lanes):
            acc[k] += x[s * lanes + k]


@njit(inline="always")
def _softplus_flat(x, n):
    for i in range(n):
        x[i] = vsoftplus(x[i])


@njit(inline="always")
def _mul_flat(a, b, out, n):
    for i in range(n):
        out[i] = a[i] * b[i]


@njit(inline="always")
def _gate_flat(y, z, n):
    """y *= silu(z)."""
    for i in range(n):
        zi = z[i]
        y[i] *= zi * vsigmoid(zi)


@njit(inline="always")
def _gate_grad_flat(g, z, y, dz, n, one):
    """Through ``out = y silu(z)``: dz = g y silu'(z), then g becomes g silu(z)."""
    for i in range(n):
        zi = z[i]
        sz = vsigmoid(zi)
        gi = g[i]
        dz[i] = gi * y[i] * sz * fma(zi, one - sz, one)
        g[i] = gi * zi * sz


@njit(inline="always")
def _sigmoid_mul_flat(x, pre, n):
    """x *= sigmoid(pre): through the softplus."""
    for i in range(n):
        x[i] *= vsigmoid(pre[i])


@njit(fastmath={"reassoc"}, error_model="numpy")  # (not inlined by Numba: that would drop the flag)
def _grouped_grads(st, dhs, dtx, gs, steps, dB_accum, bb, pb, gb, dC_accum, cb, pc, gc,
                   t0, b_var, c_var):
    """The chunk's variable dB[n, t] += sum_k dh_t[n, k] dtx_t[k] and
    dC[n, t] += sum_k dy_t[k] h_t[n, k] over the lanes, in any order (a
    reduction LLVM vectorizes).  ``st[s + 1, n, 0]`` holds h and ``dhs[s, n]``
    dh of step t0 + s.  Unused lanes add exact zeros: their dy, and so their
    dh and their input (so h and dtx), are 0."""
    N = st.shape[1]
    lanes = _lane_count(st)  # (all of them: 16 iterations make one vector, 15 would not)
    zero = st.dtype.type(0)
    for s in range(steps):
        for n in range(N):
            if b_var:
                acc = zero
                for k in range(lanes):
                    acc += dhs[s, n, k] * dtx[s * lanes + k]
                dB_accum[bb, pb, gb, n, t0 + s] += acc
            if c_var:
                acc = zero
                for k in range(lanes):
                    acc += gs[s * lanes + k] * st[s + 1, n, 0, k]
                dC_accum[cb, pc, gc, n, t0 + s] += acc


# ---------------------------------------------------------------- forward


@njit(parallel=True, cache=True, error_model="numpy")
def _forward_kernel(u, delta, A, B, C, D, z, delta_bias, h0, blocks, tile,
                    b_var, c_var, b_group_size, c_group_size,
                    has_D, has_z, has_bias, softplus, has_h0, chunk_size,
                    out, last_state, chunk_states):
    """Write out (Bt, Dc, L), last_state (Bt, Dc, N), chunk_states (Bt, Dc, n_chunks, N).

    One parallel task per (batch, channel block); ``blocks[j] = (d0, d1)``
    are the channel blocks (at most ``lanes`` channels, inside one group of
    every variable B/C).  B and C are 4-D: (Bt, G, N, L) when ``*_var``, else
    the constant (Dc, N) seen as (1, Dc, N, 1).  Time runs in tiles of at most
    ``tile`` steps, split at chunk boundaries.
    """
    Bt, Dc, L = u.shape
    N = A.shape[1]
    n_chunks = chunk_states.shape[2]
    n_blocks = blocks.shape[0]
    ftype = u.dtype
    zero = ftype.type(0)  # constants in ftype: bare literals would widen float32
    lanes = _lane_count(u)  # a compile-time constant
    T = min(tile, L, chunk_size)
    for task in prange(Bt * n_blocks):
        b = task // n_blocks
        j = task - b * n_blocks
        d0 = blocks[j, 0]
        kb = blocks[j, 1] - d0
        bb = b if b_var else 0
        cb = b if c_var else 0
        gb = d0 // b_group_size
        gc = d0 // c_group_size
        # per state and lane (channel d0 + k): A, constant B and C, h; per step
        # and lane: step size, step * input, y.  B_t[n] of lane k is
        # par[n, _B, k] * Bs[s, n], one factor of the two 1.
        par = np.zeros((N, 8, lanes), dtype=ftype)
        cur = np.zeros((8, lanes), dtype=ftype)
        no_states = np.zeros((1, 1, 2, lanes), dtype=ftype)  # (the forward keeps none)
        _block_params(par, A, B, C, b_var, c_var, d0, kb)
        Dk = np.zeros(lanes, dtype=ftype)
        biask = np.zeros(lanes, dtype=ftype)
        Bs = np.ones((T, N), dtype=ftype)
        Cs = np.ones((T, N), dtype=ftype)
        dts = np.zeros(T * lanes, dtype=ftype)
        xs = np.zeros(T * lanes, dtype=ftype)
        dtx = np.zeros(T * lanes, dtype=ftype)
        ys = np.zeros(T * lanes, dtype=ftype)
        zs = np.zeros(T * lanes, dtype=ftype)
        for k in range(kb):
            d = d0 + k
            if has_h0:
                for n in range(N):
                    par[n, _H, k] = h0[b, d, n]
            if has_D:
                Dk[k] = D[d]
            if has_bias:
                biask[k] = delta_bias[d]
        for c in range(n_chunks):
            for k in range(kb):
                for n in range(N):
                    chunk_states[b, d0 + k, c, n] = par[n, _H, k]
            t_end = min(L, (c + 1) * chunk_size)
            for s0 in range(c * chunk_size, t_end, T):
                steps = min(T, t_end - s0)
                flat = steps * lanes
                _load_tile(delta, b, d0, kb, s0, steps, dts)
                _load_tile(u, b, d0, kb, s0, steps, xs)
                _load_steps(B, b_var, bb, gb, s0, steps, Bs)
                _load_steps(C, c_var, cb, gc, s0, steps, Cs)
                if has_bias:
                    _add_lanes(dts, biask, steps)
                if softplus:
                    _softplus_flat(dts, flat)
                _mul_flat(dts, xs, dtx, flat)
                for s in range(steps):
                    _step(par, cur, dts, dtx, ys, Bs, Cs, s, no_states, False)
                if has_D:
                    _fma_lanes(ys, Dk, xs, steps)
                if has_z:
                    _load_tile(z, b, d0, kb, s0, steps, zs)
                    _gate_flat(ys, zs, flat)
                _store_tile(ys, b, d0, kb, s0, steps, out)
        for k in range(kb):
            for n in range(N):
                last_state[b, d0 + k, n] = par[n, _H, k]


# ---------------------------------------------------------------- backward


@njit(parallel=True, cache=True, error_model="numpy")
def _backward_kernel(dout, dlast, u, delta, A, B, C, D, z, delta_bias, chunk_states,
                     blocks, slice_starts,
                     b_var, c_var, b_group_size, c_group_size,
                     has_D, has_z, has_bias, softplus, has_dlast, chunk_size,
                     du, ddelta, dz, dinit,
                     dA_part, dD_part, dbias_part, dB_accum, dC_accum):
    """Write du, ddelta, dz, dinit and accumulate the partial reductions.

    Parallel tasks are (batch b, slice p): task (b, p) handles the channel
    blocks ``slice_starts[p] <= j < slice_starts[p + 1]`` one after the
    other, each block's channels as SIMD lanes.  Every array a task writes is
    indexed so that no two tasks touch the same element, so no atomics are
    needed:

    - du, ddelta, dz, dinit: per element (b, d, ...), unique to the task.
    - dA_part (Bt, Dc, N), dD_part, dbias_part (Bt, Dc): per (b, d) partial
      sums over time; the caller sums over batch after the loop.
    - dB_accum / dC_accum when constant: (Bt, 1, Dc, N, 1), per (b, d) partial
      sums over time; the caller sums over batch.
    - dB_accum / dC_accum when variable: (Bt, n_slices, G, N, L), accumulated
      over the channels of a group that fall in the task's slice (summed over
      a block's lanes, then over its blocks); the caller sums over slices.

    ``dB_accum`` and ``dC_accum`` accumulate and must be zero on entry; every
    other output is overwritten.  Sums over time run from the last step to the
    first, as the adjoint does, so that no result depends on the chunking.
    """
    Bt, Dc, L = u.shape
    N = A.shape[1]
    n_chunks = chunk_states.shape[2]
    n_slices = slice_starts.shape[0] - 1
    ftype = u.dtype
    zero = ftype.type(0)  # constants in ftype: bare literals would widen float32
    one = ftype.type(1)
    lanes = _lane_count(u)  # a compile-time constant
    T = min(chunk_size, L)
    for task in prange(Bt * n_slices):
        b = task // n_slices
        p = task - b * n_slices
        bb = b if b_var else 0
        cb = b if c_var else 0
        pb = p if b_var else 0  # slice index into dB_accum (constant: one slot per channel)
        pc = p if c_var else 0
        # per state and lane: A, constant B and C, the running state h, and the
        # accumulators q (gradient reaching h_t from later steps), dA, constant
        # dB and dC; per step and lane: step size, input, step * input, dy, du,
        # ddelta, y.  Per chunk: st[s, n] = (h, decay) of step t0 + s - 1
        # (st[0, n, 0] the saved state), dhs[s, n] = dh of step t0 + s (apart:
        # a store into st would keep the adjoint loop scalar), and the
        # (steps, lanes) tiles.
        par = np.zeros((N, 8, lanes), dtype=ftype)
        cur = np.zeros((8, lanes), dtype=ftype)
        Dk = np.zeros(lanes, dtype=ftype)
        biask = np.zeros(lanes, dtype=ftype)
        dD_acc = np.zeros(lanes, dtype=ftype)
        dbias_acc = np.zeros(lanes, dtype=ftype)
        Bs = np.ones((T, N), dtype=ftype)
        Cs = np.ones((T, N), dtype=ftype)
        st = np.zeros((T + 1, N, 2, lanes), dtype=ftype)
        dhs = np.zeros((T, N, lanes), dtype=ftype)
        dts = np.zeros(T * lanes, dtype=ftype)
        pre = np.zeros(T * lanes, dtype=ftype)
        xs = np.zeros(T * lanes, dtype=ftype)
        dtx = np.zeros(T * lanes, dtype=ftype)
        ys = np.zeros(T * lanes, dtype=ftype)
        gs = np.zeros(T * lanes, dtype=ftype)
        zs = np.zeros(T * lanes, dtype=ftype)
        dus = np.zeros(T * lanes, dtype=ftype)
        ddts = np.zeros(T * lanes, dtype=ftype)
        dzs = np.zeros(T * lanes, dtype=ftype)
        for j in range(slice_starts[p], slice_starts[p + 1]):
            d0 = blocks[j, 0]
            kb = blocks[j, 1] - d0
            gb = d0 // b_group_size
            gc = d0 // c_group_size
            _block_params(par, A, B, C, b_var, c_var, d0, kb)
            for k in range(lanes):
                use = k < kb
                d = d0 + k if use else d0
                for n in range(N):
                    par[n, _Q, k] = dlast[b, d, n] if has_dlast and use else zero
                    par[n, _DA, k] = zero
                    par[n, _DB, k] = zero
                    par[n, _DC, k] = zero
                Dk[k] = D[d] if has_D and use else zero
                biask[k] = delta_bias[d] if has_bias and use else zero
                dD_acc[k] = zero
                dbias_acc[k] = zero
                for s in range(T):  # unused lanes of the tiles loaded below
                    dts[s * lanes + k] = zero
                    xs[s * lanes + k] = zero
                    gs[s * lanes + k] = zero
                    zs[s * lanes + k] = zero
            for c in range(n_chunks - 1, -1, -1):
                t0 = c * chunk_size
                steps = min(L, t0 + chunk_size) - t0
                flat = steps * lanes
                _load_tile(delta, b, d0, kb, t0, steps, dts)
                _load_tile(u, b, d0, kb, t0, steps, xs)
                _load_steps(B, b_var, bb, gb, t0, steps, Bs)
                _load_steps(C, c_var, cb, gc, t0, steps, Cs)
                if has_bias:
                    _add_lanes(dts, biask, steps)
                if softplus:
                    pre[:flat] = dts[:flat]
                    _softplus_flat(dts, flat)
                _mul_flat(dts, xs, dtx, flat)
                # recompute this chunk's states from the saved boundary state (the
                # forward's arithmetic, so the forward's values), and y
                for k in range(lanes):
                    for n in range(N):
                        h = chunk_states[b, d0 + k, c, n] if k < kb else zero
                        par[n, _H, k] = h
                        st[0, n, 0, k] = h
                for s in range(steps):
                    _step(par, cur, dts, dtx, ys, Bs, Cs, s, st, True)
                # upstream gradient at y: dy = dout * silu(z), and dz
                _load_tile(dout, b, d0, kb, t0, steps, gs)
                if has_z:
                    if has_D:
                        _fma_lanes(ys, Dk, xs, steps)
                    _load_tile(z, b, d0, kb, t0, steps, zs)
                    _gate_grad_flat(gs, zs, ys, dzs, flat, one)
                    _store_tile(dzs, b, d0, kb, t0, steps, dz)
                # adjoint sweep through the chunk, last step first
                for s in range(steps - 1, -1, -1):
                    for k in range(lanes):
                        cur[_DT, k] = dts[s * lanes + k]
                        cur[_X, k] = xs[s * lanes + k]
                        cur[_DTX, k] = dtx[s * lanes + k]
                        cur[_DY, k] = gs[s * lanes + k]
                        cur[_DU, k] = zero
                        cur[_DDT, k] = zero
                    for n in range(N):
                        b_sn = Bs[s, n]
                        c_sn = Cs[s, n]
                        for k in range(lanes):
                            a = st[s + 1, n, 1, k]
                            h_t = st[s + 1, n, 0, k]
                            bk = par[n, _B, k] * b_sn
                            dy = cur[_DY, k]
                            dh = fma(par[n, _C, k] * c_sn, dy, par[n, _Q, k])  # gradient at h_t
                            ah = a * st[s, n, 0, k]  # exp(delta_t A) h_{t-1}
                            cur[_DDT, k] = fma(dh, fma(ah, par[n, _A, k], bk * cur[_X, k]),
                                               cur[_DDT, k])
                            par[n, _DA, k] = fma(dh * ah, cur[_DT, k], par[n, _DA, k])
                            cur[_DU, k] = fma(dh, bk, cur[_DU, k])
                            par[n, _Q, k] = a * dh
                            par[n, _DB, k] = fma(dh, cur[_DTX, k], par[n, _DB, k])
                            par[n, _DC, k] = fma(dy, h_t, par[n, _DC, k])
                            dhs[s, n, k] = dh
                    for k in range(lanes):
                        dus[s * lanes + k] = cur[_DU, k]
                        ddts[s * lanes + k] = cur[_DDT, k]
                if b_var or c_var:
                    _grouped_grads(st, dhs, dtx, gs, steps, dB_accum, b, pb, gb, dC_accum, b, pc,
                                   gc, t0, b_var, c_var)
                # du = <dh, B> delta + dy D; ddelta through the softplus; dD, dbias
                _mul_flat(dus, dts, dus, flat)
                if has_D:
                    _fma_lanes(dus, Dk, gs, steps)
                    _sum_lanes(dD_acc, gs, xs, steps)
                if softplus:
                    _sigmoid_mul_flat(ddts, pre, flat)
                _add_steps(dbias_acc, ddts, steps)
                _store_tile(dus, b, d0, kb, t0, steps, du)
                _store_tile(ddts, b, d0, kb, t0, steps, ddelta)
            for k in range(kb):
                d = d0 + k
                for n in range(N):
                    dinit[b, d, n] = par[n, _Q, k]
                    dA_part[b, d, n] = par[n, _DA, k]
                    if not b_var:
                        dB_accum[b, 0, d, n, 0] = par[n, _DB, k]
                    if not c_var:
                        dC_accum[b, 0, d, n, 0] = par[n, _DC, k]
                dD_part[b, d] = dD_acc[k]
                dbias_part[b, d] = dbias_acc[k]


# ---------------------------------------------------------------- launchers


def _as_4d(M, Dc):
    """(M4, is_variable, group_size): B or C in the kernels' 4-D indexing scheme."""
    if M.ndim == 2:  # constant (Dc, N): batch and time index 0, one "group" per channel
        return M.reshape(1, Dc, M.shape[1], 1), False, 1
    return M, True, Dc // M.shape[1]


def _dummy(ndim, ftype):
    """Stand-in for an absent optional array (never read: its flag is False)."""
    return np.zeros((1,) * ndim, dtype=ftype)


def _n_chunks(L, chunk_size):
    return (L + chunk_size - 1) // chunk_size


def _num_slices(Bt, n_blocks):
    """Block slices per batch element in the backward: enough tasks for every thread."""
    threads = numba.get_num_threads()
    return max(1, min(n_blocks, -(-threads // Bt)))


#: Most steps per forward tile (the backward's tile is the chunk).
TILE = 64


def _blocks(Dc, lanes, *group_sizes):
    """(n_blocks, 2) int64 array of channel ranges ``[d0, d1)``: at most ``lanes``
    channels, never across a multiple of any of ``group_sizes`` (the groups of
    a variable B or C, whose per-step values a block shares)."""
    blocks = []
    d0 = 0
    while d0 < Dc:
        d1 = min(Dc, d0 + lanes)
        for g in group_sizes:
            d1 = min(d1, (d0 // g + 1) * g)
        blocks.append((d0, d1))
        d0 = d1
    return np.array(blocks, dtype=np.int64)


def _scan_blocks(Dc, ftype, b_var, b_group_size, c_var, c_group_size):
    sizes = [g for var, g in ((b_var, b_group_size), (c_var, c_group_size)) if var]
    return _blocks(Dc, LANES[np.dtype(ftype)], *sizes)


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
    B4, b_var, b_group_size = _as_4d(B, Dc)
    C4, c_var, c_group_size = _as_4d(C, Dc)
    if out is None:
        out = np.empty((Bt, Dc, L), dtype=ftype)
    last_state = np.empty((Bt, Dc, N), dtype=ftype)
    chunk_states = np.empty((Bt, Dc, _n_chunks(L, chunk_size), N), dtype=ftype)
    blocks = _scan_blocks(Dc, ftype, b_var, b_group_size, c_var, c_group_size)
    with serial_below(Bt * Dc * N * L):
        _forward_kernel(
            u, delta, A, B4, C4,
            _dummy(1, ftype) if D is None else D,
            _dummy(3, ftype) if z is None else z,
            _dummy(1, ftype) if delta_bias is None else delta_bias,
            _dummy(3, ftype) if initial_state is None else initial_state,
            blocks, TILE,
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
        Parallel tasks per batch element: the channel blocks (of up to
        ``LANES`` channels, see :func:`_blocks`) are split into this many
        contiguous slices (capped at the number of blocks).  Variable dB/dC take
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
    B4, b_var, b_group_size = _as_4d(B, Dc)
    C4, c_var, c_group_size = _as_4d(C, Dc)
    blocks = _scan_blocks(Dc, ftype, b_var, b_group_size, c_var, c_group_size)
    n_blocks = len(blocks)
    if n_slices is None:
        n_slices = _num_slices(Bt, n_blocks)
    n_slices = min(n_blocks, _check_positive("n_slices", n_slices))
    # slice p holds blocks slice_starts[p] .. slice_starts[p + 1] - 1, as even as can be
    slice_starts = (np.arange(n_slices + 1, dtype=np.int64) * n_blocks) // n_slices

    def part_like(M4, var):
        # variable: (Bt, n_slices, G, N, L) per slice; constant: (Bt, 1, Dc, N, 1) per channel
        if var:
            return np.zeros((Bt, n_slices) + M4.shape[1:], dtype=ftype)
        return np.zeros((Bt, 1) + M4.shape[1:], dtype=ftype)

    du = np.empty((Bt, Dc, L), dtype=ftype)
    ddelta = np.empty((Bt, Dc, L), dtype=ftype)
    dz = np.empty((Bt, Dc, L), dtype=ftype) if z is not None else _dummy(3, ftype)
    dinit = np.empty((Bt, Dc, N), dtype=ftype)
    dA_part = np.empty((Bt, Dc, N), dtype=ftype)
    dD_part = np.empty((Bt, Dc), dtype=ftype)
    dbias_part = np.empty((Bt, Dc), dtype=ftype)
    dB_accum = part_like(B4, b_var)
    dC_accum = part_like(C4, c_var)
    _backward_kernel(
        dout, _dummy(3, ftype) if dlast_state is None else dlast_state,
        u, delta, A, B4, C4,
        _dummy(1, ftype) if D is None else D,
        _dummy(3, ftype) if z is None else z,
        _dummy(1, ftype) if delta_bias is None else delta_bias,
        saved.chunk_states, blocks, slice_starts,
        b_var, c_var, b_group_size, c_group_size,
        D is not None, z is not None, delta_bias is not None, bool(delta_softplus),
        dlast_state is not None, chunk_size,
        du, ddelta, dz, dinit, dA_part, dD_part, dbias_part, dB_accum, dC_accum)

    def finish(part, var, like):
        if var:  # sum the slices' partials: (Bt, G, N, L)
            return part[:, 0] if n_slices == 1 else part.sum(axis=1)
        return part.sum(axis=(0, 1)).reshape(like.shape)  # over batch: (Dc, N)

    return (
        du,
        ddelta,
        dA_part.sum(axis=0),
        finish(dB_accum, b_var, B),
        finish(dC_accum, c_var, C),
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
