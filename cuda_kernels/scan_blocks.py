"""The selective scan's blocks engine: one thread block per (batch, channel)
walks the sequence in chunks (Mamba, Gu & Dao 2023).

Its kernels and their launchers (:func:`forward_into`, :func:`backward_into`);
:mod:`.scan` chooses between this engine and the state engine
(:mod:`.scan_states`) and allocates the outputs.

Math
----
Reference-implementation convention (ZOH for ``A``, Euler for ``B``)::

    delta = softplus(delta + delta_bias)          (bias and softplus optional)
    h_t   = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t     (per state n)
    y_t   = sum_n C_t[n] * h_t[n]
    out   = (y + D * u) * silu(z)                  (D and z optional)

with ``h_0 = initial_state`` (zeros when absent) and ``softplus(x) = log1p(exp(x))``
(``x`` itself for ``x > 20``).  Writing ``a_t = exp(delta_t * A)`` and
``b_t = delta_t * B_t * u_t``, the recurrence ``h_t = a_t * h_{t-1} + b_t`` is a
composition of affine maps, which is associative under

    (a1, b1) o (a2, b2) = (a2 * a1, a2 * b1 + b2)        (first 1, then 2)

so it can be computed by a parallel scan (Blelloch 1990).  The backward pass
runs the same operator in reverse on the adjoint ``q_t = a_t * (g_t + q_{t+1})``
with ``g_t = C_t * dy_t`` and ``q_{L+1} = dlast_state``; then
``dh_t = g_t + q_{t+1}`` and ``dinitial_state = q_1``.

Canonical layout (C-contiguous, one float dtype ``ftype``)
---------------------------------------------------------
=================  =====================================  =========================
name               shape                                  notes
=================  =====================================  =========================
u, delta, z, out   (Bt, Dc, L)                            z optional
A                  (Dc, N)
B, C               (Dc, N) or (Bt, G, N, L)               constant or variable;
                                                          channel d uses group
                                                          d // (Dc // G)
D, delta_bias      (Dc,)                                  optional
initial_state      (Bt, Dc, N)                            optional (zeros)
last_state         (Bt, Dc, N)                            h_L
chunk_states       (Bt, Dc, n_chunks, N)                  state entering each chunk
=================  =====================================  =========================

Inside the kernels a constant ``B`` of shape (Dc, N) is viewed as (1, Dc, N, 1),
i.e. as a "variable" array with G = Dc groups, batch 1 and length 1, so that one
compiled kernel serves constant, variable and grouped ``B`` and ``C``.  Absent
optional inputs are passed as 1-element dummies and switched off by bits of an
integer ``flags`` argument.

Summary of algorithm
--------------------
Forward (one thread block per (batch, channel); ``grid = Bt * Dc``):

1. The block walks ``L`` in chunks of ``threads * items`` steps.  Thread ``k``
   owns the ``items`` contiguous steps ``[k*items, (k+1)*items)`` of the chunk.
2. For each state ``n``: every thread composes the affine maps of its steps
   serially into one summary ``(a, b)``; a warp scans the summaries with
   ``shfl_up`` (inclusive), then shifts them by one lane (exclusive); the last
   lane of each warp publishes the warp total in shared memory; after a barrier
   each thread applies the totals of the warps before it to the carry (the state
   entering the chunk) and its exclusive prefix, which gives the state entering
   its own steps; a serial sweep then produces ``h_t`` and adds ``C_t * h_t``
   to the output accumulated over ``n`` in registers.  The last thread's state
   is the carry into the next chunk.
3. The epilogue adds ``D * u`` and multiplies by ``silu(z)``.

A variable ``B`` or ``C`` row (one state, one chunk) is first loaded by the
whole block in coalesced order (consecutive threads, consecutive steps) into
shared memory, padded to ``items + 1`` per thread so the threads' strided
reads hit distinct banks; the backward stages its ``dB``/``dC`` rows the same
way before storing them.  Four staged rows must fit in 48 KiB of static shared
memory, which bounds the chunk (2048 steps in float32, 1024 in float64 with
``items`` = 16 and 8).

The (Bt, Dc, L, N) state is never written to memory: only ``chunk_states``
(the state entering every chunk, kept for the backward) and ``last_state``.

Backward: chunks in reverse order.  For each state ``n`` the forward inside the
chunk is recomputed from ``chunk_states`` (the same block scan), which gives
``h_{t-1}``, ``h_t`` and ``a_t``; a reverse block scan (``shfl_down``, the
operator mirrored) gives ``q_{t+1}`` at every step from the reverse carry,
which flows from the later chunk to the earlier one, starting at
``dlast_state``.  Per-step gradients (``du``, ``ddelta``, ``dz``, ``dB`` and
``dC`` of a channel's own variable group) are stored per element; ``dB`` and
``dC`` of a group shared by several channels are atomically added per element;
sums over steps (``dA``, constant ``dB``/``dC``, ``dD``, ``ddelta_bias``) are
reduced in the warp first and then atomically added into zeroed outputs.

References
----------
A. Gu and T. Dao, "Mamba: Linear-Time Sequence Modeling with Selective State
Spaces", arXiv:2312.00752, 2023.

G. E. Blelloch, "Prefix Sums and Their Applications", CMU-CS-90-190, 1990.
"""

import functools
import math
from typing import NamedTuple

import numba
import numpy as np
from numba import cuda, types

from ._common import (activations, array_module, as_variable, compile_kernel, dummy,
                      inline_device, launch, simulator)
from .settings import settings

__all__ = ["backward_into", "forward_into", "get_kernels", "ptx_signatures"]

# Bits of the kernels' ``flags`` argument.
FLAG_D = 1
FLAG_Z = 2
FLAG_BIAS = 4
FLAG_SOFTPLUS = 8
FLAG_INIT = 16
FLAG_B_VAR = 32
FLAG_C_VAR = 64
FLAG_DLAST = 128

_FULL_MASK = 0xFFFFFFFF
_MAX_STATIC_SHARED = 48 * 1024  # bytes of static shared memory per block
_WARP = 32
# Under the CUDA simulator a "warp" is emulated in shared memory; a small size
# lets tiny blocks still exercise the combine across warps.
_SIM_WARP = 4

# (threads, items) per dtype when the caller gives none: ``settings.blocks_tuning``.


def _argtypes(ftype):
    """Kernel argument types (forward, backward) for ``ftype``."""
    t = numba.from_dtype(np.dtype(ftype))
    a1 = types.Array(t, 1, "C")
    a2 = types.Array(t, 2, "C")
    a3 = types.Array(t, 3, "C")
    a4 = types.Array(t, 4, "C")
    i32 = types.int32
    # u, delta, A, B, C, D, z, delta_bias, initial_state, out, last_state,
    # chunk_states, flags
    fwd = (a3, a3, a2, a4, a4, a1, a3, a1, a3, a3, a3, a4, i32)
    # dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, chunk_states,
    # du, ddelta, dA_acc, dB_acc, dC_acc, dD_acc, dz, ddelta_bias_acc, q_buf,
    # flags
    bwd = (a3, a3, a3, a3, a2, a4, a4, a1, a3, a1, a4,
           a3, a3, a2, a4, a4, a1, a3, a1, a4, i32)
    return fwd, bwd


def _make_kernels(ftype, threads, items, sim):
    """Build the Python bodies of the forward and backward kernels.

    Parameters
    ----------
    ftype : type
        ``np.float32`` or ``np.float64``; every constant is cast to it.
    threads, items : int
        Threads per block and contiguous steps per thread (chunk =
        ``threads * items``).
    sim : bool
        Build for the CUDA simulator: the warp scans and reductions go through
        shared memory instead of shuffles (the simulator has none).

    Returns
    -------
    forward, backward : function
        Plain Python functions, to be wrapped by ``cuda.jit`` or compiled with
        ``cuda.compile_ptx``.

    Raises
    ------
    ValueError
        If ``threads`` is not a multiple of the warp size, or the staged rows
        of a chunk do not fit in 48 KiB of static shared memory.
    """
    ftype = np.dtype(ftype).type
    zero = ftype(0.0)
    one = ftype(1.0)
    WS = _SIM_WARP if sim else _WARP
    WS = min(WS, threads)
    if threads % WS:
        raise ValueError(f"threads must be a multiple of {WS}, got {threads}")
    NW = threads // WS
    CHUNK = threads * items
    SC = threads if sim else 1  # scratch for the simulated warp operations
    # a staged row of B, C, dB or dC: thread k's steps at k*(items+1) + i, the
    # padding keeps the threads' strided reads free of bank conflicts
    SP = CHUNK + threads
    shared_bytes = (4 * SP + 4 * NW + 2 * SC) * np.dtype(ftype).itemsize
    if shared_bytes > _MAX_STATIC_SHARED:
        raise ValueError(
            f"threads * items = {CHUNK} needs {shared_bytes} bytes of shared memory "
            f"for {np.dtype(ftype).name}, more than {_MAX_STATIC_SHARED}; use a "
            f"smaller chunk")

    # ------------------------------------------------------------------ helpers
    # Every helper takes (lane, tid, sc_a, sc_b) so both variants share one
    # signature; the shuffle variants ignore tid and the scratch arrays.
    if sim:

        @inline_device
        def scan_up(a, b, lane, tid, sc_a, sc_b):
            # inclusive and exclusive scans of (a, b) over the lanes of the warp
            sc_a[tid] = a
            sc_b[tid] = b
            cuda.syncthreads()  # every lane's summary is written
            ea = one
            eb = zero
            for k in range(tid - lane, tid):
                eb = sc_a[k] * eb + sc_b[k]
                ea = sc_a[k] * ea
            cuda.syncthreads()  # all reads done before the scratch is reused
            return a * ea, a * eb + b, ea, eb

        @inline_device
        def scan_down(a, b, lane, tid, sc_a, sc_b):
            # the same over lanes lane..WS-1, later lanes applied first
            sc_a[tid] = a
            sc_b[tid] = b
            cuda.syncthreads()  # every lane's summary is written
            ea = one
            eb = zero
            for j in range(WS - 1 - lane):
                k = tid - lane + WS - 1 - j
                eb = sc_a[k] * eb + sc_b[k]
                ea = sc_a[k] * ea
            cuda.syncthreads()  # all reads done before the scratch is reused
            return a * ea, a * eb + b, ea, eb

        @inline_device
        def warp_sum(v, lane, tid, sc_a, sc_b):
            # sum of v over the warp, valid on lane 0
            sc_a[tid] = v
            cuda.syncthreads()  # every lane's value is written
            s = zero
            if lane == 0:
                for k in range(WS):
                    s += sc_a[tid + k]
            cuda.syncthreads()  # reads done before the scratch is reused
            return s

        @inline_device
        def warp_sum2(v, w, lane, tid, sc_a, sc_b):
            # sums of v and of w over the warp, valid on lane 0
            sc_a[tid] = v
            sc_b[tid] = w
            cuda.syncthreads()  # every lane's values are written
            sv = zero
            sw = zero
            if lane == 0:
                for k in range(WS):
                    sv += sc_a[tid + k]
                    sw += sc_b[tid + k]
            cuda.syncthreads()  # reads done before the scratch is reused
            return sv, sw

    else:

        @inline_device
        def scan_up(a, b, lane, tid, sc_a, sc_b):
            # inclusive and exclusive scans of (a, b) over the lanes of the warp
            off = 1
            while off < WS:
                a_up = cuda.shfl_up_sync(_FULL_MASK, a, off)
                b_up = cuda.shfl_up_sync(_FULL_MASK, b, off)
                if lane >= off:
                    b = a * b_up + b
                    a = a * a_up
                off *= 2
            ea = cuda.shfl_up_sync(_FULL_MASK, a, 1)
            eb = cuda.shfl_up_sync(_FULL_MASK, b, 1)
            if lane == 0:
                ea = one
                eb = zero
            return a, b, ea, eb

        @inline_device
        def scan_down(a, b, lane, tid, sc_a, sc_b):
            # the same over lanes lane..WS-1, later lanes applied first
            off = 1
            while off < WS:
                a_dn = cuda.shfl_down_sync(_FULL_MASK, a, off)
                b_dn = cuda.shfl_down_sync(_FULL_MASK, b, off)
                if lane + off < WS:
                    b = a * b_dn + b
                    a = a * a_dn
                off *= 2
            ea = cuda.shfl_down_sync(_FULL_MASK, a, 1)
            eb = cuda.shfl_down_sync(_FULL_MASK, b, 1)
            if lane == WS - 1:
                ea = one
                eb = zero
            return a, b, ea, eb

        @inline_device
        def warp_sum(v, lane, tid, sc_a, sc_b):
            # sum of v over the warp, valid on lane 0
            off = WS // 2
            while off > 0:
                v += cuda.shfl_down_sync(_FULL_MASK, v, off)
                off //= 2
            return v

        @inline_device
        def warp_sum2(v, w, lane, tid, sc_a, sc_b):
            # sums of v and of w over the warp, valid on lane 0
            off = WS // 2
            while off > 0:
                v += cuda.shfl_down_sync(_FULL_MASK, v, off)
                w += cuda.shfl_down_sync(_FULL_MASK, w, off)
                off //= 2
            return v, w

    softplus, sigmoid = activations(ftype)

    # ------------------------------------------------------------------ forward
    def forward(u, delta, A, B, C, D, z, delta_bias, initial_state,
                out, last_state, chunk_states, flags):
        tid = cuda.threadIdx.x
        lane = tid % WS
        wid = tid // WS
        Dc = u.shape[1]
        L = u.shape[2]
        N = A.shape[1]
        n_chunks = chunk_states.shape[2]
        blk = np.int64(cuda.blockIdx.x)  # 64-bit from here on
        bi = blk // Dc
        d = blk - bi * Dc

        has_D = (flags & FLAG_D) != 0
        has_z = (flags & FLAG_Z) != 0
        has_bias = (flags & FLAG_BIAS) != 0
        use_softplus = (flags & FLAG_SOFTPLUS) != 0
        has_init = (flags & FLAG_INIT) != 0
        b_var = (flags & FLAG_B_VAR) != 0
        c_var = (flags & FLAG_C_VAR) != 0
        gB = d // (Dc // B.shape[1])  # constant B: G = Dc, so gB = d
        gC = d // (Dc // C.shape[1])
        D_d = zero
        if has_D:
            D_d = D[d]
        bias = zero
        if has_bias:
            bias = delta_bias[d]

        tot_a = cuda.shared.array(NW, ftype)  # warp totals
        tot_b = cuda.shared.array(NW, ftype)
        sB = cuda.shared.array(SP, ftype)  # variable B row of the chunk
        sC = cuda.shared.array(SP, ftype)  # variable C row of the chunk
        sc_a = cuda.shared.array(SC, ftype)
        sc_b = cuda.shared.array(SC, ftype)
        u_v = cuda.local.array(items, ftype)
        dt_v = cuda.local.array(items, ftype)
        y_v = cuda.local.array(items, ftype)
        a_v = cuda.local.array(items, ftype)
        b_v = cuda.local.array(items, ftype)  # b_t, then h_t
        own = tid * (items + 1)  # this thread's steps in a staged row

        if tid == 0:
            for n in range(N):
                h0 = zero
                if has_init:
                    h0 = initial_state[bi, d, n]
                chunk_states[bi, d, 0, n] = h0
        # (the first barrier below, before any thread reads chunk_states,
        # publishes these writes)

        for c in range(n_chunks):
            c0 = c * CHUNK
            t0 = c0 + tid * items
            for i in range(items):
                t = t0 + i
                uu = zero
                dt = zero  # padding past L: a = 1, b = 0 (identity)
                if t < L:
                    uu = u[bi, d, t]
                    dt = delta[bi, d, t] + bias
                    if use_softplus:
                        dt = softplus(dt)
                u_v[i] = uu
                dt_v[i] = dt
                y_v[i] = zero

            for n in range(N):
                A_n = A[d, n]
                B_n = zero
                if not b_var:
                    B_n = B[0, gB, n, 0]
                C_n = zero
                if not c_var:
                    C_n = C[0, gC, n, 0]
                if b_var:
                    for j in range(items):  # coalesced: consecutive threads, steps
                        tl = j * threads + tid
                        v = zero
                        if c0 + tl < L:
                            v = B[bi, gB, n, c0 + tl]
                        sB[tl + tl // items] = v
                # staged B visible; also every thread is done with the
                # previous state's C row and warp totals
                cuda.syncthreads()
                # serial summary of this thread's steps
                sa = one
                sb = zero
                for i in range(items):
                    bt = B_n
                    if b_var:
                        bt = sB[own + i]
                    a = math.exp(dt_v[i] * A_n)
                    bb = dt_v[i] * bt * u_v[i]
                    a_v[i] = a
                    b_v[i] = bb
                    sb = a * sb + bb
                    sa = a * sa
                sa, sb, ea, eb = scan_up(sa, sb, lane, tid, sc_a, sc_b)
                if lane == WS - 1:
                    tot_a[wid] = sa
                    tot_b[wid] = sb
                if c_var:
                    for j in range(items):
                        tl = j * threads + tid
                        v = zero
                        if c0 + tl < L:
                            v = C[bi, gC, n, c0 + tl]
                        sC[tl + tl // items] = v
                cuda.syncthreads()  # warp totals, staged C and the carry are visible
                h = chunk_states[bi, d, c, n]
                for k in range(wid):
                    h = tot_a[k] * h + tot_b[k]
                h = ea * h + eb  # state entering this thread's steps
                for i in range(items):
                    h = a_v[i] * h + b_v[i]
                    ct = C_n
                    if c_var:
                        ct = sC[own + i]
                    y_v[i] += ct * h
                if tid == threads - 1:
                    # h is now the state at the end of the chunk
                    if c + 1 < n_chunks:
                        chunk_states[bi, d, c + 1, n] = h
                    else:
                        last_state[bi, d, n] = h

            for i in range(items):
                t = t0 + i
                if t < L:
                    o = y_v[i] + D_d * u_v[i]
                    if has_z:
                        zz = z[bi, d, t]
                        o = o * zz * sigmoid(zz)
                    out[bi, d, t] = o

    # ----------------------------------------------------------------- backward
    def backward(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias,
                 chunk_states, du, ddelta, dA_acc, dB_acc, dC_acc, dD_acc, dz,
                 ddelta_bias_acc, q_buf, flags):
        tid = cuda.threadIdx.x
        lane = tid % WS
        wid = tid // WS
        Dc = u.shape[1]
        L = u.shape[2]
        N = A.shape[1]
        n_chunks = chunk_states.shape[2]
        blk = np.int64(cuda.blockIdx.x)  # 64-bit from here on
        bi = blk // Dc
        d = blk - bi * Dc

        has_D = (flags & FLAG_D) != 0
        has_z = (flags & FLAG_Z) != 0
        has_bias = (flags & FLAG_BIAS) != 0
        use_softplus = (flags & FLAG_SOFTPLUS) != 0
        has_dlast = (flags & FLAG_DLAST) != 0
        b_var = (flags & FLAG_B_VAR) != 0
        c_var = (flags & FLAG_C_VAR) != 0
        cpgB = Dc // B.shape[1]  # channels per group
        cpgC = Dc // C.shape[1]
        gB = d // cpgB
        gC = d // cpgC
        D_d = zero
        if has_D:
            D_d = D[d]
        bias = zero
        if has_bias:
            bias = delta_bias[d]

        fa = cuda.shared.array(NW, ftype)  # forward warp totals
        fb = cuda.shared.array(NW, ftype)
        ra = cuda.shared.array(NW, ftype)  # reverse warp totals
        rb = cuda.shared.array(NW, ftype)
        sB = cuda.shared.array(SP, ftype)   # variable B row of the chunk
        sC = cuda.shared.array(SP, ftype)   # variable C row
        sdB = cuda.shared.array(SP, ftype)  # its dB row, before the store
        sdC = cuda.shared.array(SP, ftype)  # its dC row
        sc_a = cuda.shared.array(SC, ftype)
        sc_b = cuda.shared.array(SC, ftype)
        u_v = cuda.local.array(items, ftype)
        dt_v = cuda.local.array(items, ftype)   # delta after bias/softplus
        dy_v = cuda.local.array(items, ftype)   # dout * silu(z)
        y_v = cuda.local.array(items, ftype)    # recomputed y (for dz)
        du_v = cuda.local.array(items, ftype)   # sum_n dh * delta * B
        ddt_v = cuda.local.array(items, ftype)  # d/d(delta after softplus)
        a_v = cuda.local.array(items, ftype)
        h_v = cuda.local.array(items, ftype)    # b_t, then h_t
        own = tid * (items + 1)  # this thread's steps in a staged row

        # reverse carry q lives in q_buf[slot]; chunk c reads slot (c+1)%2 and
        # writes slot c%2, so a slot is never read and written in one pass
        if tid == 0:
            for n in range(N):
                q0 = zero
                if has_dlast:
                    q0 = dlast_state[bi, d, n]
                q_buf[n_chunks % 2, bi, d, n] = q0
        # (published by the first barrier below, before any thread reads it)

        acc_D = zero
        acc_bias = zero
        for cc in range(n_chunks):
            c = n_chunks - 1 - cc
            c0 = c * CHUNK
            t0 = c0 + tid * items
            for i in range(items):
                t = t0 + i
                uu = zero
                dt = zero
                dy = zero
                if t < L:
                    uu = u[bi, d, t]
                    dt = delta[bi, d, t] + bias
                    if use_softplus:
                        dt = softplus(dt)
                    dy = dout[bi, d, t]
                    if has_z:
                        zz = z[bi, d, t]
                        dy = dy * zz * sigmoid(zz)
                u_v[i] = uu
                dt_v[i] = dt
                dy_v[i] = dy
                y_v[i] = zero
                du_v[i] = zero
                ddt_v[i] = zero

            for n in range(N):
                A_n = A[d, n]
                B_n = zero
                if not b_var:
                    B_n = B[0, gB, n, 0]
                C_n = zero
                if not c_var:
                    C_n = C[0, gC, n, 0]
                # stage the variable rows, coalesced (every thread finished
                # with the previous rows before the last barrier of state n-1)
                for j in range(items):
                    tl = j * threads + tid
                    vb = zero
                    vc = zero
                    if c0 + tl < L:
                        if b_var:
                            vb = B[bi, gB, n, c0 + tl]
                        if c_var:
                            vc = C[bi, gC, n, c0 + tl]
                    sB[tl + tl // items] = vb
                    sC[tl + tl // items] = vc
                cuda.syncthreads()  # staged B and C are visible

                # recompute the forward inside the chunk
                sa = one
                sb = zero
                for i in range(items):
                    bt = B_n
                    if b_var:
                        bt = sB[own + i]
                    a = math.exp(dt_v[i] * A_n)
                    bb = dt_v[i] * bt * u_v[i]
                    a_v[i] = a
                    h_v[i] = bb
                    sb = a * sb + bb
                    sa = a * sa
                sa, sb, ea, eb = scan_up(sa, sb, lane, tid, sc_a, sc_b)
                if lane == WS - 1:
                    fa[wid] = sa
                    fb[wid] = sb
                cuda.syncthreads()  # forward warp totals are visible
                h = chunk_states[bi, d, c, n]
                for k in range(wid):
                    h = fa[k] * h + fb[k]
                h = ea * h + eb
                h_in = h  # state before this thread's first step
                acc_C = zero
                for i in range(items):
                    h = a_v[i] * h + h_v[i]
                    h_v[i] = h
                    ct = C_n
                    if c_var:
                        ct = sC[own + i]
                    y_v[i] += ct * h
                    dct = dy_v[i] * h  # dC_t[n]
                    if c_var:
                        sdC[own + i] = dct
                    else:
                        acc_C += dct

                # reverse scan of q_t = a_t * q_{t+1} + a_t * g_t, g_t = C_t * dy_t
                # (g is recomputed from the staged C rather than kept in registers)
                sa = one
                sb = zero
                for j in range(items):
                    i = items - 1 - j
                    a = a_v[i]
                    ct = C_n
                    if c_var:
                        ct = sC[own + i]
                    sb = a * sb + a * (ct * dy_v[i])
                    sa = a * sa
                sa, sb, ea, eb = scan_down(sa, sb, lane, tid, sc_a, sc_b)
                if lane == 0:
                    ra[wid] = sa
                    rb[wid] = sb
                cuda.syncthreads()  # reverse warp totals and the dC row are visible
                if c_var:
                    for j in range(items):  # coalesced store of the dC row
                        tl = j * threads + tid
                        if c0 + tl < L:
                            v = sdC[tl + tl // items]
                            if cpgC == 1:
                                dC_acc[bi, gC, n, c0 + tl] = v
                            else:
                                cuda.atomic.add(dC_acc, (bi, gC, n, c0 + tl), v)
                q = q_buf[(c + 1) % 2, bi, d, n]
                for j in range(NW - 1 - wid):
                    k = NW - 1 - j
                    q = ra[k] * q + rb[k]
                q = ea * q + eb  # q_{t+1} after this thread's last step
                acc_A = zero
                acc_B = zero
                for j in range(items):
                    i = items - 1 - j
                    a = a_v[i]
                    if i > 0:
                        h_prev = h_v[i - 1]
                    else:
                        h_prev = h_in
                    ct = C_n
                    if c_var:
                        ct = sC[own + i]
                    dh = ct * dy_v[i] + q
                    q = a * dh
                    bt = B_n
                    if b_var:
                        bt = sB[own + i]
                    dt = dt_v[i]
                    dbt = dh * dt * u_v[i]  # dB_t[n]
                    if b_var:
                        sdB[own + i] = dbt
                    else:
                        acc_B += dbt
                    du_v[i] += dh * dt * bt
                    ha = h_prev * a
                    ddt_v[i] += dh * (ha * A_n + bt * u_v[i])
                    acc_A += dh * ha * dt
                if tid == 0:
                    # q is now q at the first step of the chunk
                    q_buf[c % 2, bi, d, n] = q
                # the dB row is visible; also every thread is done with this
                # state's staged rows and warp totals
                cuda.syncthreads()
                if b_var:
                    for j in range(items):  # coalesced store of the dB row
                        tl = j * threads + tid
                        if c0 + tl < L:
                            v = sdB[tl + tl // items]
                            if cpgB == 1:
                                dB_acc[bi, gB, n, c0 + tl] = v
                            else:
                                cuda.atomic.add(dB_acc, (bi, gB, n, c0 + tl), v)

                # dA always; the sums of constant B and C ride along
                if b_var and c_var:
                    acc_A = warp_sum(acc_A, lane, tid, sc_a, sc_b)
                elif c_var:
                    acc_A, acc_B = warp_sum2(acc_A, acc_B, lane, tid, sc_a, sc_b)
                elif b_var:
                    acc_A, acc_C = warp_sum2(acc_A, acc_C, lane, tid, sc_a, sc_b)
                else:
                    acc_A, acc_B = warp_sum2(acc_A, acc_B, lane, tid, sc_a, sc_b)
                    acc_C = warp_sum(acc_C, lane, tid, sc_a, sc_b)
                if lane == 0:
                    cuda.atomic.add(dA_acc, (d, n), acc_A)
                    if not b_var:
                        cuda.atomic.add(dB_acc, (0, gB, n, 0), acc_B)
                    if not c_var:
                        cuda.atomic.add(dC_acc, (0, gC, n, 0), acc_C)

            for i in range(items):
                t = t0 + i
                if t < L:
                    uu = u_v[i]
                    du[bi, d, t] = dy_v[i] * D_d + du_v[i]
                    acc_D += dy_v[i] * uu
                    if has_z:
                        zz = z[bi, d, t]
                        sz = sigmoid(zz)
                        o = y_v[i] + D_d * uu
                        dz[bi, d, t] = (dout[bi, d, t] * o * sz
                                        * (one + zz * (one - sz)))
                    g = ddt_v[i]
                    if use_softplus:
                        g = g * sigmoid(delta[bi, d, t] + bias)
                    ddelta[bi, d, t] = g
                    acc_bias += g

        acc_D, acc_bias = warp_sum2(acc_D, acc_bias, lane, tid, sc_a, sc_b)
        if lane == 0:
            if has_D:
                cuda.atomic.add(dD_acc, d, acc_D)
            if has_bias:
                cuda.atomic.add(ddelta_bias_acc, d, acc_bias)

    return forward, backward


class _Kernels(NamedTuple):
    forward: object   # launchable forward kernel
    backward: object  # launchable backward kernel
    threads: int
    items: int


@functools.lru_cache(maxsize=None)
def _get_kernels(dtype, threads, items, sim):
    fwd_py, bwd_py = _make_kernels(dtype, threads, items, sim)
    if sim:
        return _Kernels(cuda.jit(fwd_py), cuda.jit(bwd_py), threads, items)
    fwd_t, bwd_t = _argtypes(dtype)
    bounds = (threads,)
    fwd = compile_kernel(fwd_py, types.void(*fwd_t), launch_bounds=bounds)
    bwd = compile_kernel(bwd_py, types.void(*bwd_t), launch_bounds=bounds)
    return _Kernels(fwd, bwd, threads, items)


def get_kernels(dtype, threads, items):
    """Compiled forward and backward kernels for one configuration (cached).

    Parameters
    ----------
    dtype : numpy dtype
        float32 or float64.
    threads, items : int
        Threads per block (a multiple of 32 on a GPU) and contiguous steps per
        thread.

    Returns
    -------
    _Kernels
        ``(forward, backward, threads, items)``; under the CUDA simulator the
        kernels are the simulator's and use shared memory for warp operations.
    """
    return _get_kernels(np.dtype(dtype), int(threads), int(items), simulator())


def ptx_signatures(tunings=None):
    """Every kernel of this module with its argument types, for PTX checks.

    Parameters
    ----------
    tunings : iterable of (threads, items), optional
        Configurations to list; default the tuning of each dtype in
        ``settings.blocks_tuning`` and a small one ``(32, 4)``.

    Yields
    ------
    name : str
    py_func : function
        The kernel body (compile with ``numba.cuda.compile_ptx``).
    argtypes : tuple of numba types
    is_float32 : bool
    launch_bounds : tuple
        ``(threads,)``, as used when the kernel is launched.
    """
    for dtype in (np.dtype(np.float32), np.dtype(np.float64)):
        tlist = tunings if tunings is not None else [settings.blocks_tuning[dtype], (32, 4)]
        fwd_t, bwd_t = _argtypes(dtype)
        for threads, items in tlist:
            fwd_py, bwd_py = _make_kernels(dtype, threads, items, sim=False)
            tag = f"{dtype.name}_t{threads}_i{items}"
            yield (f"forward_{tag}", fwd_py, fwd_t, dtype == np.float32, (threads,))
            yield (f"backward_{tag}", bwd_py, bwd_t, dtype == np.float32, (threads,))


# ---------------------------------------------------------------- launchers
def forward_into(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                 initial_state, out, last_state, chunk_states, *, threads,
                 items, stream=None):
    """Launch the forward kernel on preallocated outputs.

    Works on CuPy arrays (GPU) and, under the CUDA simulator, on NumPy arrays.
    Inputs are in the canonical layout (see the module docstring).

    Parameters
    ----------
    out : array, (Bt, Dc, L)
        Overwritten with the scan output.
    last_state : array, (Bt, Dc, N)
        Overwritten with ``h_L``.
    chunk_states : array, (Bt, Dc, ceil(L / (threads*items)), N)
        Overwritten with the state entering each chunk.
    threads, items : int
        Block size and steps per thread.
    stream : numba stream, None or "current", optional
        Launch stream where Numba launches (see :func:`_common.launch`);
        None launches on the default stream.  CuPy arrays launch on CuPy's
        current stream.
    """
    xp = array_module(u)
    dtype = u.dtype
    Bt, Dc, _ = u.shape
    dummy1 = dummy(xp, dtype, 1)
    dummy3 = dummy(xp, dtype, 3)
    flags = 0
    flags |= FLAG_D if D is not None else 0
    flags |= FLAG_Z if z is not None else 0
    flags |= FLAG_BIAS if delta_bias is not None else 0
    flags |= FLAG_SOFTPLUS if delta_softplus else 0
    flags |= FLAG_INIT if initial_state is not None else 0
    flags |= FLAG_B_VAR if B.ndim == 4 else 0
    flags |= FLAG_C_VAR if C.ndim == 4 else 0
    k = get_kernels(dtype, threads, items)
    args = (u, delta, A, as_variable(B), as_variable(C),
            dummy1 if D is None else D,
            dummy3 if z is None else z,
            dummy1 if delta_bias is None else delta_bias,
            dummy3 if initial_state is None else initial_state,
            out, last_state, chunk_states, np.int32(flags))
    launch(k.forward, Bt * Dc, threads, stream, args)


def backward_into(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias,
                  delta_softplus, chunk_states, du, ddelta, dA, dB, dC, dD, dz,
                  ddelta_bias, q_buf, *, threads, items, stream=None):
    """Launch the backward kernel on preallocated outputs.

    ``du``, ``ddelta`` and ``dz`` are overwritten; ``dA``, ``dB``, ``dC``,
    ``dD`` and ``ddelta_bias`` are accumulated into and must be zeroed by the
    caller.  ``q_buf`` has shape (2, Bt, Dc, N); on return ``q_buf[0]`` holds
    the gradient w.r.t. the initial state.  Absent optional arrays are None.
    Works on CuPy arrays and, under the CUDA simulator, on NumPy arrays.
    """
    xp = array_module(u)
    dtype = u.dtype
    Bt, Dc, _ = u.shape
    dummy1 = dummy(xp, dtype, 1)
    dummy3 = dummy(xp, dtype, 3)
    flags = 0
    flags |= FLAG_D if D is not None else 0
    flags |= FLAG_Z if z is not None else 0
    flags |= FLAG_BIAS if delta_bias is not None else 0
    flags |= FLAG_SOFTPLUS if delta_softplus else 0
    flags |= FLAG_DLAST if dlast_state is not None else 0
    flags |= FLAG_B_VAR if B.ndim == 4 else 0
    flags |= FLAG_C_VAR if C.ndim == 4 else 0
    k = get_kernels(dtype, threads, items)
    args = (dout, dummy3 if dlast_state is None else dlast_state,
            u, delta, A, as_variable(B), as_variable(C),
            dummy1 if D is None else D,
            dummy3 if z is None else z,
            dummy1 if delta_bias is None else delta_bias,
            chunk_states, du, ddelta, dA, as_variable(dB), as_variable(dC),
            dummy1 if dD is None else dD,
            dummy3 if dz is None else dz,
            dummy1 if ddelta_bias is None else ddelta_bias,
            q_buf, np.int32(flags))
    launch(k.backward, Bt * Dc, threads, stream, args)
