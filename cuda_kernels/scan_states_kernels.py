"""The state engine's kernel bodies: the forward and backward of the selective
scan with one thread per (batch, channel, state), their segment-end passes,
and the kernel that narrows float32 to a half storage type.

The engine -- its math, the layout of a block, the tiles, the segments, the
storage types -- is described in :mod:`.scan_states`, which holds its host
policy (plans, segments, launch bounds), compiles these bodies and launches
them.  Here only the Python bodies Numba compiles (:func:`make_kernels`,
:func:`narrow_body`), their argument types and the few constants they and
the launchers share.
"""

import math
from typing import NamedTuple

import numba
import numpy as np
from numba import cuda, types

from ._common import activations, inline_device, simulator
from .half import storage_dtype, storage_io, storage_widen

__all__ = ["FLAG_BIAS", "FLAG_D", "FLAG_DLAST", "FLAG_INIT", "FLAG_SAVE", "FLAG_SOFTPLUS",
           "FLAG_Z", "argtypes", "make_kernels", "narrow_argtypes", "narrow_body", "pitch"]

# bits of the kernels' integer ``flags`` argument
FLAG_D = 1
FLAG_Z = 2
FLAG_BIAS = 4
FLAG_SOFTPLUS = 8
FLAG_INIT = 16
FLAG_SAVE = 32  # the forward saves tile states for a backward
FLAG_DLAST = 128

# Most output steps per thread and tile whose per-step inputs (u and z in the
# forward, dout and z in the backward) are read into registers before the
# recurrence, so that their latency hides behind it; more are read after it.
# The forward in float32 without half storage has the registers for 8 where
# the N threads of a channel share a tile's steps evenly (N = 4: 32 steps over
# 4 threads); half storage, an uneven share (N = 5: 7 steps each, guarded) or
# the backward spill at 8.
_EARLY_STEPS = 4
_EARLY_STEPS_FLOAT32 = 8


def pitch(T):
    """Row length of a shared tile of ``T`` steps: ``T + 4`` where ``T`` is a
    multiple of 4, so that four consecutive steps of a row are 16-byte aligned
    and the unrolled loops read them in one vector load (``ld.shared.v4``);
    ``T + 1`` otherwise.  Either way the rows of consecutive states begin in
    different banks (4 or 1 apart), so that a warp's threads, one per state,
    read one step of their rows without conflicts."""
    return T + 4 if T % 4 == 0 else T + 1


def argtypes(ftype, storage=None, b_var=True, c_var=True):
    """Argument types of the four kernels (forward, backward, forward_ends,
    backward_ends) for compute type ``ftype`` and per-step arrays of
    ``storage`` (:func:`~cuda_kernels.half.storage_dtype`; a constant
    ``B``/``C`` is of ``ftype``)."""
    t = numba.from_dtype(np.dtype(ftype))
    a1 = types.Array(t, 1, "C")
    a2 = types.Array(t, 2, "C")
    a3 = types.Array(t, 3, "C")
    a4 = types.Array(t, 4, "C")
    s1 = types.Array(numba.from_dtype(storage_dtype(storage, ftype)), 1, "C")  # per-step
    b1 = s1 if b_var else a1
    c1 = s1 if c_var else a1
    i32 = types.int32
    i64 = types.int64
    # u, delta, A, B, C, D, z, delta_bias, initial_state, out, last_state,
    # tile_states, flags, dg, L, groups_B, groups_C (u, delta, B, C, z, out
    # flat), segment end states, segment delta sums, segment length, segments
    fwd = (s1, s1, a2, b1, c1, a1, s1, a1, a3, s1, a3, a4, i32, i64, i64, i64, i64,
           a4, a3, i64, i64)
    # u, delta, A, B, delta_bias, segment end states, segment delta sums,
    # flags, dg, L, groups_B, segment length, segments
    ends = (s1, s1, a2, b1, a1, a4, a3, i32, i64, i64, i64, i64, i64)
    # dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, tile_states,
    # du, ddelta, dA_acc, dB_acc, dC_acc, dD_acc, dz, ddelta_bias_acc,
    # dinitial_state, flags, dg
    # (per-step arrays flat as in the forward; dB_acc, dC_acc of ftype), L,
    # groups_B, groups_C, segment adjoints, segment delta sums, segment
    # length, segments
    bwd = (s1, a3, s1, s1, a2, b1, c1, a1, s1, a1, a4,
           s1, s1, a2, a1, a1, a1, s1, a1, a3, i32, i64, i64, i64, i64,
           a4, a3, i64, i64)
    # dout, delta, A, C, z, delta_bias (dout, delta, C, z flat), segment
    # adjoints, segment delta sums, flags, dg, L, groups_C, segment length, segments
    bwd_ends = (s1, s1, a2, c1, s1, a1, a4, a3, i32, i64, i64, i64, i64, i64)
    return fwd, bwd, ends, bwd_ends


def make_kernels(ftype, N, CH, TF, TB, b_var, c_var, K=1, storage=None, det=False):
    """Python bodies of the forward and backward kernels for one layout.

    ``N`` states, ``CH`` channels per block, tiles of ``TF`` (forward) and
    ``TB`` (backward) steps; ``b_var``/``c_var`` select variable or constant
    ``B``/``C`` at compile time.  Every constant is cast to ``ftype``, the
    compute type.  ``storage`` (None, ``'float16'``, ``'bfloat16'``): the
    type in which the per-step arrays (``u, delta, z``, variable ``B``/``C``,
    ``dout``; ``out, du, ddelta, dz``) are read and written, through
    :func:`~cuda_kernels.half.storage_io` (None: ``ftype`` itself).
    ``det``: the backward stores its partial sums (:func:`partial_shapes`)
    instead of adding them atomically, for a reduction in a fixed order.
    """
    ftype = np.dtype(ftype).type
    zero = ftype(0.0)
    one = ftype(1.0)
    twenty = ftype(20.0)
    log2e = ftype(1.4426950408889634)
    U = np.uint64  # shared-memory indices: unsigned, so no negative-index wraparound code
    NT = CH * N           # threads per block
    YW = NT + 1           # row of a (T, CH*N) tile, padded against bank conflicts
    BF = (N, pitch(TF)) if b_var else (1, 1)
    CF = (N, pitch(TF)) if c_var else (1, 1)
    BB = (N, pitch(TB)) if b_var else (1, 1)
    CB = (N, pitch(TB)) if c_var else (1, 1)
    CHF = (CH, pitch(TF))    # per-channel rows of a forward tile
    CHB = (CH, pitch(TB))
    VA = None if simulator() else 16  # alignment of the step-row tiles (see pitch)
    YF = (NT, pitch(TF))  # C_t h_t of the forward: a row of steps per thread
    YB = (TB, YW)
    HB = (TB + 1, YW)     # states of a backward tile: row 0 enters it, row k + 1 after step k

    softplus, sigmoid = activations(ftype)
    load, store = storage_io(storage, ftype)  # per-step arrays in global memory
    # A per-step value read long before it is used (the forward's fetch) stays
    # raw, in its storage type, until then: its conversion would wait for the
    # read.  Not float16, which converts as it reads (NVVM rejects Numba's IR
    # for a float16 value chosen between a read and a constant).
    if storage == "float16":
        raw_zero, rtype, read_raw = zero, numba.from_dtype(np.dtype(ftype)), load

        @inline_device
        def widen(v):
            return v
    else:
        raw_zero, widen = storage_widen(storage, ftype)
        rtype = numba.from_dtype(storage_dtype(storage, ftype))

        @inline_device
        def read_raw(M, i):
            return M[i]

    class Cells(NamedTuple):
        # How NT threads cover an (R, T) tile of R rows of T consecutive steps:
        # a grid of RP rows of CP threads on consecutive steps (coalesced global
        # reads), the thread at (tid // CP, tid % CP) if tid < RP * CP, taking
        # rows rr + i*RP (i < NR) and steps cc + j*CP (j < NC); `exact_*` where
        # no cell of the grid falls outside the tile.  Element (r, tt) of the
        # tile is at flat offset base + r*L + t0 + tt of a per-step array.
        RP: int
        CP: int
        NR: int
        NC: int
        all_threads: bool
        exact_r: bool
        exact_c: bool

    def cells(R, T):
        CP = min(T, NT)
        RP = NT // CP
        NR = (R + RP - 1) // RP
        NC = (T + CP - 1) // CP
        return Cells(RP, CP, NR, NC, RP * CP == NT, NR * RP == R, NC * CP == T)

    def walker(R, T, body):
        # walk(base, t0, full, L, tid, ctx) calls body(ctx, k, r, tt, o, inside)
        # for every element (r, tt) of an (R, T) tile at step t0 that this
        # thread covers (cells(R, T)): its number k among them (< NR * NC), its
        # flat offset o in a per-step array (base + r*L + t0 + tt) and whether
        # it is a step of the sequence (t0 + tt < L).  The offset is computed
        # once and advanced by a row stride.
        RP, CP, NR, NC, all_threads, exact_r, exact_c = cells(R, T)

        @inline_device
        def walk(base, t0, full, L, tid, ctx):
            uL = U(L)
            utid = U(tid)
            r = utid // U(CP)
            cc = utid - r * U(CP)
            o = r * uL + t0 + cc
            o += base
            if all_threads or utid < U(RP * CP):
                for i in range(NR):
                    if exact_r or r < U(R):
                        for j in range(NC):
                            tt = cc + U(j * CP)
                            if exact_c or tt < U(T):
                                body(ctx, i * NC + j, r, tt, o + U(j * CP),
                                     full or t0 + tt < uL)
                    r += U(RP)
                    o += U(RP) * uL
        return walk, NR * NC

    # Staging a tile in two halves, so that the global reads of the next tile
    # overlap the work on this one: a fetch reads this thread's elements into
    # registers, raw (zeros past L and for idle channels), a put stores them
    # into the shared tiles.  Rows of B/C (N rows of T steps):
    @inline_device
    def fetch_row(ctx, k, r, tt, o, inside):
        M, regs = ctx
        v = raw_zero
        if inside:
            v = read_raw(M, o)
        regs[k] = v

    @inline_device
    def put_row(ctx, k, r, tt, o, inside):
        regs, sM = ctx
        sM[r, tt] = widen(regs[k])

    @inline_device
    def stage_row(ctx, k, r, tt, o, inside):  # (both at once)
        M, sM = ctx
        sM[r, tt] = load(M, o) if inside else zero

    # delta and u of the block's channels (CH rows); r is the channel
    @inline_device
    def fetch_channel(ctx, k, r, tt, o, inside):
        delta, u, nch, rdt, ru = ctx
        dt = raw_zero
        uu = raw_zero
        if inside and r < U(nch):
            dt = read_raw(delta, o)
            uu = read_raw(u, o)
        rdt[k] = dt
        ru[k] = uu

    # the epilogue's early reads: a per-step value and z at one offset, raw
    # (zeros where not inside, z's also where there is no z)
    @inline_device
    def fetch_pair(X, z, o, inside, has_z):
        xv = raw_zero
        zv = raw_zero
        if inside:
            xv = read_raw(X, o)
            if has_z:
                zv = read_raw(z, o)
        return xv, zv

    @inline_device
    def block_channels(Dc, dg, blk):
        # (batch, first channel of the block, channels in the block) of block
        # number blk (of one segment of the sequence)
        nb = (dg + CH - 1) // CH
        per_b = (Dc // dg) * nb
        bi = blk // per_b
        r = blk - bi * per_b
        sg = r // nb
        k = r - sg * nb
        d0 = sg * dg + k * CH
        nch = min(CH, dg - k * CH)
        return bi, d0, nch

    @inline_device
    def group_rows(bi, d0, Dc, G, uL):
        # flat offset of the first row of the block's group of a variable B/C
        return U(bi * G + d0 // (Dc // G)) * U(N) * uL

    @inline_device
    def group_block(d0, Dc, G, dg, size):
        # flat offset of the slice, in a buffer of `size` partial sums of a
        # variable dB/dC, of the block whose first channel is d0: its number
        # among the blocks of its group of G (per batch and segment)
        per_dg = (dg + CH - 1) // CH
        Dgr = Dc // G
        k = d0 % Dgr
        n_blocks = (Dgr // dg) * per_dg
        return U((k // dg) * per_dg + (k % dg) // CH) * U(size // n_blocks)

    @inline_device
    def delta_at(delta, delta_bias, o, k, has_bias, use_softplus):
        # delta at flat offset o after the bias of channel k and the softplus,
        # and the softplus's derivative there (1 without it)
        return delta_after(load(delta, o), delta_bias, k, has_bias, use_softplus)

    @inline_device
    def delta_after(dt, delta_bias, k, has_bias, use_softplus):
        # delta_at for the value dt read from delta
        if has_bias:
            dt += delta_bias[k]
        sg = one
        if use_softplus:
            if dt <= twenty:
                sg = sigmoid(dt)
            dt = softplus(dt)
        return dt, sg

    # ------------------------------------------------------------------ forward
    # The forward takes its per-step arrays flat (u, delta, z, out: Bt*Dc*L;
    # variable B/C: Bt*G*N*L; constant B/C: Dc*N) and indexes them with
    # unsigned offsets computed from row bases fixed for the whole sequence:
    # a 4-D signed index costs some 35 instructions per staged element
    # (wraparound selects, 64-bit stride products), an offset 3.
    #
    # Where Bt * Dc * N recurrences are too few to fill the GPU, the sequence
    # is split into NS segments of SL steps (a multiple of TF), and a first
    # kernel (forward_ends) runs each segment but the last from a zero state,
    # keeping its final state and the sum of its deltas: the state entering
    # segment s is then h = exp(A * sum delta) * h + h_end over the segments
    # before it, and the forward runs every segment from there in parallel.
    NSUM = (TF + N - 1) // N              # output steps each thread sums per tile
    # the forward reads u and z of those steps before the recurrence (into 2 *
    # NSUM registers) where they are few, else in the epilogue
    EARLY = (_EARLY_STEPS_FLOAT32 if ftype is np.float32 and storage is None and NSUM * N == TF
             else _EARLY_STEPS)
    EPI_EARLY = NSUM <= EARLY
    UTF = U(TF)
    UN = U(N)
    # With more states than a tile has steps (N > TF), PF = N // TF threads of
    # a channel share the sum over states of each step, as in the backward
    # (PB below): each sums NKF consecutive states into a shared (PF, CH * TF)
    # tile, the first of the step adds the PF partial sums.
    PF = N // TF if N > TF else 1
    NKF = (N + PF - 1) // PF
    SPLIT_F = PF > 1
    PARTF = (PF, CH * TF) if SPLIT_F else (1, 1)
    def tile_fetcher(fetch_rows, fetch_channels):
        # the first half of staging a tile (walkers of its size): this
        # thread's elements of B, C, delta and u, raw, into registers
        @inline_device
        def fetch_tile(B, C, delta, u, baseB, baseC, row0, nch, t0, full, L, rB, rC, rdt,
                       ru, tid):
            if b_var:
                fetch_rows(baseB, t0, full, L, tid, (B, rB))
            if c_var:
                fetch_rows(baseC, t0, full, L, tid, (C, rC))
            fetch_channels(row0, t0, full, L, tid, (delta, u, nch, rdt, ru))
        return fetch_tile

    fetch_flat, NEBC = walker(N, TF, fetch_row)
    put_flat = walker(N, TF, put_row)[0]
    fetch_delta, NEF = walker(CH, TF, fetch_channel)
    fetch_tile_f = tile_fetcher(fetch_flat, fetch_delta)

    @inline_device
    def put_channel_f(ctx, k, r, tt, o, inside):
        # bias and softplus of the fetched delta, and delta * u, into sdt, sdu
        rdt, ru, delta_bias, d0, nch, has_bias, use_softplus, sdt, sdu = ctx
        dt = zero  # past L or an idle channel: a = 1, b = 0
        du_ = zero
        if inside and r < U(nch):
            dt = delta_after(widen(rdt[k]), delta_bias, U(d0) + r, has_bias,
                             use_softplus)[0]
            du_ = dt * widen(ru[k])
        sdt[r, tt] = dt
        sdu[r, tt] = du_

    put_delta = walker(CH, TF, put_channel_f)[0]

    @inline_device
    def segment_blocks(Dc, dg, n_segments):
        # (segment, batch, first channel, channels) of this block
        nblk = np.int64(cuda.gridDim.x) // n_segments
        blk = np.int64(cuda.blockIdx.x)
        seg = blk // nblk
        bi, d0, nch = block_channels(Dc, dg, blk - seg * nblk)
        return seg, bi, d0, nch

    @inline_device
    def segment_tiles(seg, SL, L, T):
        # the tiles of T steps of segment seg: first, one past the last
        return seg * (SL // T), (min((seg + 1) * SL, L) + T - 1) // T

    @inline_device
    def thread_rows(Dc, dg, L, GB, GC, n_segments):
        # where this thread works, in a grid of n_segments segments: its channel
        # ch in the block and state n, the block's segment, batch, first channel
        # and channels (valid: ch is one of them), the channel d it reads (ch
        # clamped: idle threads read, never write), and unsigned flat offsets
        # of row (bi, d0 + c) of u/delta (c*L past row0), of row d (rowd) and
        # of the block's group of a variable B/C (baseB/baseC)
        tid = cuda.threadIdx.x
        ch = tid // N
        n = tid - ch * N
        seg, bi, d0, nch = segment_blocks(Dc, dg, n_segments)
        d = d0 + min(ch, nch - 1)
        uL = U(L)
        row0 = U(bi * Dc + d0) * uL
        rowd = U(bi * Dc + d) * uL
        baseB = group_rows(bi, d0, Dc, GB, uL) if b_var else U(0)
        baseC = group_rows(bi, d0, Dc, GC, uL) if c_var else U(0)
        return tid, ch, n, seg, bi, d0, nch, ch < nch, d, uL, row0, rowd, baseB, baseC

    def forward_ends(u, delta, A, B, delta_bias, seg_h, seg_dt, flags, dg, L, GB, SL, NS):
        Dc = A.shape[0]
        # segments 0 .. NS-2 (the last one's end is not needed)
        (tid, ch, n, seg, bi, d0, nch, valid, d, uL, row0, _, baseB,
         _) = thread_rows(Dc, dg, L, GB, 1, NS - 1)  # (C is not read: any group count)
        has_bias = (flags & FLAG_BIAS) != 0
        use_softplus = (flags & FLAG_SOFTPLUS) != 0

        sB = cuda.shared.array(BF, ftype, alignment=VA)
        sdt = cuda.shared.array(CHF, ftype, alignment=VA)
        sdu = cuda.shared.array(CHF, ftype, alignment=VA)

        A2 = A[d, n] * log2e
        B_n = zero
        if not b_var:
            B_n = B[U(d) * UN + U(n)]
        uch = U(ch)
        un = U(n)
        h = zero
        sum_dt = zero
        rB = cuda.local.array(NEBC, rtype)  # the next tile's elements (as the forward)
        rdt = cuda.local.array(NEF, rtype)
        ru = cuda.local.array(NEF, rtype)
        first, stop = segment_tiles(seg, SL, L, TF)
        if first < stop:
            t0 = U(first) * UTF
            full = t0 + UTF <= uL
            if b_var:
                fetch_flat(baseB, t0, full, L, tid, (B, rB))
            fetch_delta(row0, t0, full, L, tid, (delta, u, nch, rdt, ru))
        for tile in range(first, stop):
            t0 = U(tile) * UTF
            full = t0 + UTF <= uL
            if b_var:
                put_flat(U(0), t0, full, L, tid, (rB, sB))
            put_delta(U(0), t0, full, L, tid, (rdt, ru, delta_bias, d0, nch, has_bias,
                                                 use_softplus, sdt, sdu))
            cuda.syncthreads()  # the tile is staged
            if tile + 1 < stop:  # fetch the next one
                t1 = t0 + UTF
                full1 = t1 + UTF <= uL
                if b_var:
                    fetch_flat(baseB, t1, full1, L, tid, (B, rB))
                fetch_delta(row0, t1, full1, L, tid, (delta, u, nch, rdt, ru))
            for tt in range(TF):
                k = U(tt)
                dt = sdt[uch, k]
                bt = B_n
                if b_var:
                    bt = sB[un, k]
                h = math.exp2(dt * A2) * h + sdu[uch, k] * bt
                sum_dt += dt
            cuda.syncthreads()  # the tile is consumed
        if valid:
            seg_h[bi, d, seg, n] = h
            if n == 0:
                seg_dt[bi, d, seg] = sum_dt

    def forward(u, delta, A, B, C, D, z, delta_bias, initial_state,
                out, last_state, tile_states, flags, dg, L, GB, GC,
                seg_h, seg_dt, SL, NS):
        Dc = A.shape[0]
        n_btiles = tile_states.shape[2] if K == 1 else (L + TB - 1) // TB
        (tid, ch, n, seg, bi, d0, nch, valid, d, uL, row0, rowd, baseB,
         baseC) = thread_rows(Dc, dg, L, GB, GC, NS)

        has_D = (flags & FLAG_D) != 0
        has_z = (flags & FLAG_Z) != 0
        has_bias = (flags & FLAG_BIAS) != 0
        use_softplus = (flags & FLAG_SOFTPLUS) != 0
        has_init = (flags & FLAG_INIT) != 0
        save = (flags & FLAG_SAVE) != 0

        sB = cuda.shared.array(BF, ftype, alignment=VA)
        sC = cuda.shared.array(CF, ftype, alignment=VA)
        sdt = cuda.shared.array(CHF, ftype, alignment=VA)   # delta after bias/softplus
        sdu = cuda.shared.array(CHF, ftype, alignment=VA)   # delta * u
        sy = cuda.shared.array(YF, ftype, alignment=VA)  # C_t[n] h_t[n], row tid
        py = cuda.shared.array(PARTF, ftype)  # partial sums over states (SPLIT_F)

        A2 = A[d, n] * log2e  # exp(dt * A) = exp2(dt * A2)
        B_n = zero
        if not b_var:
            B_n = B[U(d) * UN + U(n)]
        C_n = zero
        if not c_var:
            C_n = C[U(d) * UN + U(n)]
        D_d = zero
        if has_D:
            D_d = D[d]
        uch = U(ch)
        un = U(n)
        utid = U(tid)
        h = zero
        if has_init:
            h = initial_state[bi, d, n]
        for s in range(seg):  # the state entering this block's segment
            h = math.exp2(seg_dt[bi, d, s] * A2) * h + seg_h[bi, d, s, n]

        # this thread's elements of the next tile, read from global memory while
        # the block works on the current one
        # (raw: in the storage type)
        rB = cuda.local.array(NEBC, rtype)
        rC = cuda.local.array(NEBC, rtype)
        rdt = cuda.local.array(NEF, rtype)
        ru = cuda.local.array(NEF, rtype)
        ue = cuda.local.array(NSUM, rtype)  # u and z of the steps whose out it writes
        ze = cuda.local.array(NSUM, rtype)
        first, stop = segment_tiles(seg, SL, L, TF)
        if first < stop:
            t0 = U(first) * UTF
            fetch_tile_f(B, C, delta, u, baseB, baseC, row0, nch, t0, t0 + UTF <= uL, L,
                         rB, rC, rdt, ru, tid)
        for tile in range(first, stop):
            t0 = U(tile) * UTF
            full = t0 + UTF <= uL
            # 1. stage the tile (fetched during the previous one), consecutive
            # threads on consecutive steps
            if b_var:
                put_flat(U(0), t0, full, L, tid, (rB, sB))
            if c_var:
                put_flat(U(0), t0, full, L, tid, (rC, sC))
            put_delta(U(0), t0, full, L, tid, (rdt, ru, delta_bias, d0, nch, has_bias,
                                                 use_softplus, sdt, sdu))
            cuda.syncthreads()  # the tile is staged
            if tile + 1 < stop:  # fetch the next one
                t1 = t0 + UTF
                fetch_tile_f(B, C, delta, u, baseB, baseC, row0, nch, t1, t1 + UTF <= uL, L,
                             rB, rC, rdt, ru, tid)
            # this tile's u and z for the epilogue, read before the recurrence too
            if EPI_EARLY and valid:
                for j in range(NSUM):
                    tt = un * U(NSUM) + U(j)
                    ue[j], ze[j] = fetch_pair(
                        u, z, rowd + t0 + tt,
                        (NSUM * N == TF or tt < UTF) and (full or t0 + tt < uL), has_z)
            # 2. the recurrence of this thread's state through the tile,
            # saving the state entering every backward tile
            for sub in range(TF // TB):
                ts = tile * (TF // TB) + sub
                if save and valid and ts < n_btiles and ts % K == 0:
                    tile_states[bi, d, ts // K, n] = h
                for tt in range(sub * TB, (sub + 1) * TB):
                    k = U(tt)
                    a = math.exp2(sdt[uch, k] * A2)
                    bt = B_n
                    if b_var:
                        bt = sB[un, k]
                    ct = C_n
                    if c_var:
                        ct = sC[un, k]
                    h = a * h + sdu[uch, k] * bt
                    sy[utid, k] = ct * h
            cuda.syncthreads()  # every C h of the tile is written
            # 3. y = sum over states, then the epilogue
            # (each thread sums NSUM consecutive steps, read as one vector)
            base = uch * UN
            if SPLIT_F:
                tp = un % UTF
                pp = un // UTF
                if pp < U(PF):
                    s = zero
                    for k in range(NKF):
                        kk = pp * U(NKF) + U(k)
                        if NKF * PF == N or kk < UN:
                            s += sy[base + kk, tp]
                    py[pp, uch * UTF + tp] = s
                cuda.syncthreads()  # the partial sums are written
            if valid:
                ys = cuda.local.array(NSUM, ftype)  # (in registers: indices are constant)
                for j in range(NSUM):
                    ys[j] = zero
                if SPLIT_F:  # (NSUM is 1)
                    if un < UTF:
                        for p in range(PF):
                            ys[0] += py[U(p), uch * UTF + un]
                else:
                    for k in range(N):
                        for j in range(NSUM):
                            if NSUM * N == TF or un * U(NSUM) + U(j) < UTF:
                                ys[j] += sy[base + U(k), un * U(NSUM) + U(j)]
                for j in range(NSUM):
                    tt = un * U(NSUM) + U(j)
                    if (NSUM * N == TF or tt < UTF) and (full or t0 + tt < uL):
                        o = rowd + t0 + tt
                        y = ys[j] + D_d * (widen(ue[j]) if EPI_EARLY else load(u, o))
                        if has_z:
                            zz = widen(ze[j]) if EPI_EARLY else load(z, o)
                            y = y * zz * sigmoid(zz)
                        store(out, o, y)
            # (the next tile's staging writes sB, sC, sdt, sdu, read only in
            # step 2, which every thread has left at the barrier above; sy is
            # next written after the next staging barrier)
        if valid and seg == NS - 1:
            last_state[bi, d, n] = h

    # ----------------------------------------------------------------- backward
    # Flat arrays and unsigned offsets as in the forward (gradients too:
    # du, ddelta, dz like u; dB_acc/dC_acc like B/C).
    NSUMB = (TB + N - 1) // N             # steps each thread sums over states per tile
    EPI_EARLY_B = NSUMB <= _EARLY_STEPS  # dout and z of those steps read early (as EPI_EARLY)
    # The sums over channels of a variable dB/dC cover N * TB (state, step)
    # items per tile, NIC per thread, item = state * TB + step: a warp's threads
    # take consecutive steps of one or two states, so that their atomic adds
    # fall on few consecutive addresses (one thread per state would put the 32
    # adds of a warp on 32 rows of the (N, L) array).
    NI = N * TB
    NIC = (NI + NT - 1) // NT
    UTB = U(TB)
    # With more states than a tile has steps (N > TB), TB threads of a channel
    # would sum all N states of one step each while the others wait: instead
    # PB = N // TB threads share each step, each summing NKB consecutive states
    # into a shared (PB, CH * TB) tile, and the first thread of the step adds
    # the PB partial sums.  (The work of a sum then grows as N / PB = TB, not N.)
    PB = N // TB if N > TB else 1
    NKB = (N + PB - 1) // PB
    SPLIT_B = PB > 1
    PART = (PB, CH * TB) if SPLIT_B else (1, 1)
    SENT = (K, NT) if K > 1 else (1, 1)

    fetch_flat_b, NEBC_B = walker(N, TB, fetch_row)
    put_flat_b = walker(N, TB, put_row)[0]
    fetch_chan_b, NEB = walker(CH, TB, fetch_channel)

    @inline_device
    def put_channel_b(ctx, k, r, tt, o, inside):
        # the fetched delta after bias and softplus, u, and the softplus's
        # derivative into sdt, su, ssg
        rdt, ru, delta_bias, d0, nch, has_bias, use_softplus, sdt, su, ssg = ctx
        dt = zero
        uu = zero
        sg = one
        if inside and r < U(nch):
            dt, sg = delta_after(widen(rdt[k]), delta_bias, U(d0) + r, has_bias,
                                 use_softplus)
            uu = widen(ru[k])
        sdt[r, tt] = dt
        su[r, tt] = uu
        ssg[r, tt] = sg

    put_chan_b = walker(CH, TB, put_channel_b)[0]

    @inline_device
    def partial_over_states(S, tt, first, base):
        # sum of S[tt, base + k] over the NKB states k from first (< N)
        s = zero
        for k in range(NKB):
            kk = first + U(k)
            if NKB * PB == N or kk < UN:
                s += S[tt, base + kk]
        return s

    fetch_tile = tile_fetcher(fetch_flat_b, fetch_chan_b)

    @inline_device
    def put_tile(rB, rC, rdt, ru, delta_bias, d0, nch, t0, full, L, has_bias, use_softplus,
                 sB, sC, sdt, su, ssg, tid):
        # the second half: the tile's rows of B, C, and delta (after bias and
        # softplus), u and the softplus's derivative of the block's channels
        if b_var:
            put_flat_b(U(0), t0, full, L, tid, (rB, sB))
        if c_var:
            put_flat_b(U(0), t0, full, L, tid, (rC, sC))
        put_chan_b(U(0), t0, full, L, tid, (rdt, ru, delta_bias, d0, nch, has_bias,
                                            use_softplus, sdt, su, ssg))

    # the segment-end pass of the backward stages C and, per channel, delta
    # and dL/dy (dout after the z gate), at once
    stage_row_b = walker(N, TB, stage_row)[0]

    @inline_device
    def stage_channel_ends(ctx, k, r, tt, o, inside):
        delta, dout, z, delta_bias, d0, nch, has_bias, use_softplus, has_z, sdt, sdy = ctx
        dt = zero  # past L or an idle channel: a = 1, dy = 0
        g = zero
        if inside and r < U(nch):
            dt = delta_at(delta, delta_bias, o, U(d0) + r, has_bias, use_softplus)[0]
            g = load(dout, o)
            if has_z:
                zz = load(z, o)
                g = g * zz * sigmoid(zz)
        sdt[r, tt] = dt
        sdy[r, tt] = g

    stage_ends = walker(CH, TB, stage_channel_ends)[0]

    # Where Bt * Dc * N recurrences make too few backward blocks, the sequence
    # is split into NS segments of SL steps (a multiple of TB * K, so that
    # segments hold whole stretches of saved states).  The adjoint q is linear
    # in its value at a segment's end: q entering the segment from before is
    # exp(A * sum delta) * q_end + Q, with Q the adjoint from q_end = 0.  A
    # first kernel (backward_ends) runs each segment but the first from q = 0
    # backwards, keeping Q and the sum of its deltas (neither needs the states:
    # dh = q + C_t dy_t with dy after the z gate); the backward then starts
    # each segment's blocks from dlast_state carried through the later
    # segments, all segments at once.
    def backward_ends(dout, delta, A, C, z, delta_bias, seg_q, seg_dt, flags, dg, L, GC,
                      SL, NS):
        Dc = A.shape[0]
        # segments 1 .. NS-1 (the first one's adjoint is not needed), kept at seg - 1
        (tid, ch, n, sp, bi, d0, nch, valid, d, uL, row0, _, _,
         baseC) = thread_rows(Dc, dg, L, 1, GC, NS - 1)  # (B is not read: any group count)
        has_z = (flags & FLAG_Z) != 0
        has_bias = (flags & FLAG_BIAS) != 0
        use_softplus = (flags & FLAG_SOFTPLUS) != 0

        sC = cuda.shared.array(CB, ftype, alignment=VA)
        sdt = cuda.shared.array(CHB, ftype, alignment=VA)   # delta after bias/softplus
        sdy = cuda.shared.array(CHB, ftype, alignment=VA)   # dL/dy (after the z gate)

        A2 = A[d, n] * log2e
        C_n = zero
        if not c_var:
            C_n = C[U(d) * UN + U(n)]
        uch = U(ch)
        un = U(n)
        q = zero
        sum_dt = zero
        first, stop = segment_tiles(sp + 1, SL, L, TB)
        for rt in range(stop - first):
            t0 = U(stop - 1 - rt) * UTB
            full = t0 + UTB <= uL
            if c_var:
                stage_row_b(baseC, t0, full, L, tid, (C, sC))
            stage_ends(row0, t0, full, L, tid, (delta, dout, z, delta_bias, d0, nch, has_bias,
                                                use_softplus, has_z, sdt, sdy))
            cuda.syncthreads()  # the tile is staged
            k = UTB
            while k > U(0):
                k -= U(1)
                dt = sdt[uch, k]
                ct = C_n
                if c_var:
                    ct = sC[un, k]
                q = math.exp2(dt * A2) * (q + ct * sdy[uch, k])
                sum_dt += dt
            cuda.syncthreads()  # the tile is consumed
        if valid:
            seg_q[bi, d, sp, n] = q
            if n == 0:
                seg_dt[bi, d, sp] = sum_dt

    def backward(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias,
                 tile_states, du, ddelta, dA_acc, dB_acc, dC_acc, dD_acc, dz,
                 ddelta_bias_acc, dinitial_state, flags, dg, L, GB, GC,
                 seg_q, seg_dt, SL, NS):
        Dc = A.shape[0]
        n_btiles = tile_states.shape[2] if K == 1 else (L + TB - 1) // TB
        (tid, ch, n, seg, bi, d0, nch, valid, d, uL, row0, rowd, baseB,
         baseC) = thread_rows(Dc, dg, L, GB, GC, NS)

        has_D = (flags & FLAG_D) != 0
        has_z = (flags & FLAG_Z) != 0
        has_bias = (flags & FLAG_BIAS) != 0
        use_softplus = (flags & FLAG_SOFTPLUS) != 0
        has_dlast = (flags & FLAG_DLAST) != 0

        sB = cuda.shared.array(BB, ftype, alignment=VA)
        sC = cuda.shared.array(CB, ftype, alignment=VA)
        sdt = cuda.shared.array(CHB, ftype, alignment=VA)   # delta after bias/softplus
        su = cuda.shared.array(CHB, ftype, alignment=VA)    # u
        sdy = cuda.shared.array(CHB, ftype, alignment=VA)   # dL/dy (after the z gate)
        ssg = cuda.shared.array(CHB, ftype, alignment=VA)   # d softplus / d delta
        sh = cuda.shared.array(HB, ftype)        # h_t (row t + 1), then dB terms
        s1 = cuda.shared.array(YB, ftype)        # C h, then dC terms
        s2 = cuda.shared.array(YB, ftype)        # ddelta terms
        s3 = cuda.shared.array(YB, ftype)        # du terms
        sent = cuda.shared.array(SENT, ftype)    # states entering the tiles of a saved stretch
        p1 = cuda.shared.array(PART, ftype)      # partial sums over states: y, then ddelta
        p2 = cuda.shared.array(PART, ftype)      # (du)

        A_n = A[d, n]
        A2 = A_n * log2e
        dn = U(d) * UN + U(n)  # flat (d, n) of a constant B/C and of its gradient
        # det: this block's slice of the partial sums of a variable dB / dC
        # (one per block of the group), see partial_shapes
        offB = U(0)
        offC = U(0)
        if det and b_var:
            offB = group_block(d0, Dc, GB, dg, dB_acc.shape[0])
        if det and c_var:
            offC = group_block(d0, Dc, GC, dg, dC_acc.shape[0])
        B_n = zero
        if not b_var:
            B_n = B[dn]
        C_n = zero
        if not c_var:
            C_n = C[dn]
        D_d = zero
        if has_D:
            D_d = D[d]
        uch = U(ch)
        un = U(n)
        utid = U(tid)
        tp = un % UTB  # with SPLIT_B, the step and the part of the states this thread sums
        pp = un // UTB
        pcol = uch * UTB + tp
        q = zero  # adjoint flowing in from later steps
        if has_dlast:
            q = dlast_state[bi, d, n]
        for r in range(NS - 1 - seg):  # through the later segments, last first
            sp = NS - 2 - r  # (segment sp + 1)
            q = math.exp2(seg_dt[bi, d, sp] * A2) * q + seg_q[bi, d, sp, n]
        dA_r = zero
        dB_r = zero
        dC_r = zero
        dD_r = zero
        dbias_r = zero

        # this thread's elements of the tile before the current one (the next in
        # this backward walk), read from global memory during the current one
        rB = cuda.local.array(NEBC_B, rtype)
        rC = cuda.local.array(NEBC_B, rtype)
        rdt = cuda.local.array(NEB, rtype)
        ru = cuda.local.array(NEB, rtype)
        gE = cuda.local.array(NSUMB, rtype)  # dout and z of the steps it gates
        zE = cuda.local.array(NSUMB, rtype)
        # (and of a stretch rerun with save_every > 1, read and staged at once)
        xB = cuda.local.array(NEBC_B if K > 1 else 1, rtype)
        xC = cuda.local.array(NEBC_B if K > 1 else 1, rtype)
        xdt = cuda.local.array(NEB if K > 1 else 1, rtype)
        xu = cuda.local.array(NEB if K > 1 else 1, rtype)
        seg_first, seg_stop = segment_tiles(seg, SL, L, TB)
        if seg_first < seg_stop:
            t0 = U(seg_stop - 1) * UTB
            fetch_tile(B, C, delta, u, baseB, baseC, row0, nch, t0, t0 + UTB <= uL, L,
                       rB, rC, rdt, ru, tid)
        for rt in range(seg_stop - seg_first):
            tile = seg_stop - 1 - rt
            t0 = U(tile) * UTB
            full = t0 + UTB <= uL
            first = (tile // K) * K  # the first backward tile of this one's saved stretch
            if K > 1 and tile == min(first + K, n_btiles) - 1:
                # entering a stretch of K tiles from its end: rerun the recurrence
                # from the saved state through the stretch, keeping the state
                # entering each tile
                h = tile_states[bi, d, tile // K, n]
                sent[U(0), utid] = h
                for kt in range(first, tile):
                    cuda.syncthreads()  # the shared tiles are consumed
                    ta = U(kt) * UTB
                    fetch_tile(B, C, delta, u, baseB, baseC, row0, nch, ta, True, L,
                               xB, xC, xdt, xu, tid)
                    put_tile(xB, xC, xdt, xu, delta_bias, d0, nch, ta, True, L, has_bias,
                             use_softplus, sB, sC, sdt, su, ssg, tid)
                    cuda.syncthreads()  # the tile is staged
                    for tt in range(TB):
                        k = U(tt)
                        dt = sdt[uch, k]
                        bt = B_n
                        if b_var:
                            bt = sB[un, k]
                        h = math.exp2(dt * A2) * h + dt * su[uch, k] * bt
                    sent[U(kt - first + 1), utid] = h
            cuda.syncthreads()  # the previous tile's shared tiles are consumed
            put_tile(rB, rC, rdt, ru, delta_bias, d0, nch, t0, full, L, has_bias,
                     use_softplus, sB, sC, sdt, su, ssg, tid)
            if K > 1:
                h0 = sent[U(tile - first), utid]
            else:
                h0 = tile_states[bi, d, tile, n]
            cuda.syncthreads()  # the tile is staged
            if tile > seg_first:  # fetch the one before it
                t1 = t0 - UTB
                fetch_tile(B, C, delta, u, baseB, baseC, row0, nch, t1, t1 + UTB <= uL, L,
                           rB, rC, rdt, ru, tid)
            # this tile's dout and z for the z gate, read before the recomputation
            if EPI_EARLY_B and valid:
                for j in range(NSUMB):
                    tt = un + U(j) * UN
                    gE[j], zE[j] = fetch_pair(
                        dout, z, rowd + t0 + tt,
                        (NSUMB * N == TB or tt < UTB) and (full or t0 + tt < uL), has_z)
            # recompute the states of the tile
            h = h0
            sh[U(0), utid] = h0
            for tt in range(TB):
                k = U(tt)
                dt = sdt[uch, k]
                a = math.exp2(dt * A2)
                bt = B_n
                if b_var:
                    bt = sB[un, k]
                ct = C_n
                if c_var:
                    ct = sC[un, k]
                h = a * h + dt * su[uch, k] * bt
                sh[k + U(1), utid] = h
                s1[k, utid] = ct * h
            cuda.syncthreads()  # states and C h are written
            # y over states, the z gate, dz, dD; dy for the adjoint
            base = uch * UN
            if SPLIT_B:
                if pp < U(PB):
                    p1[pp, pcol] = partial_over_states(s1, tp, pp * U(NKB), base)
                cuda.syncthreads()  # the partial sums of y are written
            for j in range(NSUMB):
                tt = un + U(j) * UN
                if NSUMB * N == TB or tt < UTB:
                    g = zero
                    if valid and (full or t0 + tt < uL):
                        y = zero
                        if SPLIT_B:
                            for p in range(PB):
                                y += p1[U(p), uch * UTB + tt]
                        else:
                            for k in range(N):
                                y += s1[tt, base + U(k)]
                        uu = su[uch, tt]
                        o = rowd + t0 + tt
                        go = widen(gE[j]) if EPI_EARLY_B else load(dout, o)
                        g = go
                        if has_z:
                            zz = widen(zE[j]) if EPI_EARLY_B else load(z, o)
                            sz = sigmoid(zz)
                            g = go * zz * sz
                            store(dz, o, go * (y + D_d * uu) * sz * (one + zz * (one - sz)))
                        dD_r += g * uu
                    sdy[uch, tt] = g
            cuda.syncthreads()  # dy is staged
            # the adjoint recurrence, backwards through the tile (h_t of step k
            # is h_prev of step k + 1, carried in a register)
            h_t = sh[UTB, utid]
            k = UTB
            while k > U(0):
                k -= U(1)
                dt = sdt[uch, k]
                uu = su[uch, k]
                g = sdy[uch, k]
                bt = B_n
                if b_var:
                    bt = sB[un, k]
                ct = C_n
                if c_var:
                    ct = sC[un, k]
                h_prev = sh[k, utid]
                a = math.exp2(dt * A2)
                dh = q + ct * g
                dCp = g * h_t
                dBp = dh * dt * uu
                if c_var:
                    s1[k, utid] = dCp
                else:
                    dC_r += dCp
                if b_var:
                    sh[k + U(1), utid] = dBp  # (h_t is in a register)
                else:
                    dB_r += dBp
                ah = a * h_prev
                dA_r += dh * dt * ah
                s2[k, utid] = dh * (A_n * ah + bt * uu)
                s3[k, utid] = dh * dt * bt
                q = a * dh
                h_t = h_prev
            cuda.syncthreads()  # the per-step terms are written
            # ddelta and du: sums over states
            if SPLIT_B:  # (p1's partial sums of y were read before the barrier above)
                if pp < U(PB):
                    p1[pp, pcol] = partial_over_states(s2, tp, pp * U(NKB), base)
                    p2[pp, pcol] = partial_over_states(s3, tp, pp * U(NKB), base)
                cuda.syncthreads()  # the partial sums are written
            if valid:
                for j in range(NSUMB):
                    tt = un + U(j) * UN
                    if (NSUMB * N == TB or tt < UTB) and (full or t0 + tt < uL):
                        sd = zero
                        sv = zero
                        if SPLIT_B:
                            for p in range(PB):
                                sd += p1[U(p), uch * UTB + tt]
                                sv += p2[U(p), uch * UTB + tt]
                        else:
                            for k in range(N):
                                sd += s2[tt, base + U(k)]
                                sv += s3[tt, base + U(k)]
                        sd *= ssg[uch, tt]
                        o = rowd + t0 + tt
                        store(ddelta, o, sd)
                        dbias_r += sd
                        store(du, o, sv + D_d * sdy[uch, tt])
            # variable dB and dC: sums over the block's channels (all CH of
            # them: an idle channel staged delta = 0 and dy = 0, so its dB and
            # dC terms are exact zeros), item (state ni, step tt) by item
            if b_var or c_var:
                for j in range(NIC):
                    item = utid + U(j * NT)
                    ni = item // UTB
                    tt = item - ni * UTB
                    if (NIC * NT == NI or item < U(NI)) and (full or t0 + tt < uL):
                        if b_var:
                            s = zero
                            for c in range(CH):
                                s += sh[tt + U(1), U(c) * UN + ni]
                            if det:
                                dB_acc[offB + baseB + ni * uL + t0 + tt] = s
                            else:
                                cuda.atomic.add(dB_acc, baseB + ni * uL + t0 + tt, s)
                        if c_var:
                            s = zero
                            for c in range(CH):
                                s += s1[tt, U(c) * UN + ni]
                            if det:
                                dC_acc[offC + baseC + ni * uL + t0 + tt] = s
                            else:
                                cuda.atomic.add(dC_acc, baseC + ni * uL + t0 + tt, s)

        if valid and det:  # this thread's partial sums, one slot per (segment, batch, d, n)
            if seg == 0:
                dinitial_state[bi, d, n] = q
            sbd = (seg * tile_states.shape[0] + bi) * Dc + d
            slot = U(sbd) * UN + un
            dA_acc[sbd, n] = dA_r
            if not b_var:
                dB_acc[slot] = dB_r
            if not c_var:
                dC_acc[slot] = dC_r
            if has_D:
                dD_acc[slot] = dD_r
            if has_bias:
                ddelta_bias_acc[slot] = dbias_r
        elif valid:
            if seg == 0:
                dinitial_state[bi, d, n] = q
            # (sums over this segment's steps: every segment's blocks add theirs)
            cuda.atomic.add(dA_acc, (d, n), dA_r)
            if not b_var:
                cuda.atomic.add(dB_acc, dn, dB_r)
            if not c_var:
                cuda.atomic.add(dC_acc, dn, dC_r)
            if has_D:
                cuda.atomic.add(dD_acc, d, dD_r)
            if has_bias:
                cuda.atomic.add(ddelta_bias_acc, d, dbias_r)

    return forward, backward, forward_ends, backward_ends


def narrow_body(storage):
    """Python body of the kernel ``narrow(x, y, n)``: float32 ``x[i]`` rounded
    into ``y[i]`` of ``storage`` (:func:`storage_dtype`: float16, or bfloat16
    bits), ``i < n`` -- what ``x.astype`` does, as a kernel of this package,
    launched like the others."""
    _, store = storage_io(storage, np.float32)

    def narrow(x, y, n):
        i = cuda.grid(1)
        if i < n:
            store(y, i, x[i])

    return narrow


def narrow_argtypes(storage):
    return (types.Array(types.float32, 1, "C"),
            types.Array(numba.from_dtype(storage_dtype(storage, np.float32)), 1, "C"),
            types.int64)
