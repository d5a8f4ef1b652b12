"""State-parallel selective scan kernels: one thread per (batch, channel, state).

Same math and canonical layout as :mod:`cuda_kernels.scan_blocks` (see its module
docstring); a second engine for problems with many independent recurrences.

Why a second engine
-------------------
The block-scan engine of ``scan.py`` gives each (batch, channel) one thread
block and parallelises along the sequence: every state of every chunk pays a
serial summary, a warp scan, a cross-warp fold through shared memory and two
block barriers.  When ``Bt * Dc * N`` is large (a Mamba layer has
``8 * 1536 * 16`` = 196,608 independent recurrences) there is parallelism
enough without splitting the sequence: here every thread runs the recurrence
of one state serially along the whole sequence, which does the least work
possible (one ``exp``, one multiply and one fused multiply-add per step and
state) with no scan machinery at all.  The block-scan engine stays the choice
when ``Bt * Dc * N`` is too small to fill the GPU (long sequences of few
channels), where parallelism along the sequence is what counts.

Layout of a block
-----------------
A block holds ``CH`` channels times ``N`` states (``CH * N <= 128`` threads;
thread ``tid`` is channel ``tid // N``, state ``tid % N``).  Its channels lie
in one group of every variable ``B``/``C`` (blocks are laid out per group of
``Dg`` channels), so the block shares one ``B`` and one ``C`` row per state.
The sequence is walked in tiles of ``T`` steps:

1. the block loads the tile's rows of ``B``, ``C`` (N x T) and ``delta`` and
   ``u`` of its channels (CH x T) in coalesced order into shared memory,
   applying bias and softplus once per element;
2. each thread advances its state through the T steps and writes
   ``C_t[n] * h_t[n]`` into its row of a (CH*N, T) shared tile;
3. the block sums that tile over ``n`` and writes ``out`` with the ``D`` and
   ``silu(z)`` epilogue, each thread on a few consecutive steps.

The step rows of the shared tiles are padded to a multiple of 4 and 16-byte
aligned (:func:`_pitch`), so that the unrolled loops over steps read and
write four steps per vector instruction (``ld.shared.v4``), and the tiles are
staged by a fixed grid of threads whose offsets advance by a constant per
element (``walker`` in :func:`_make_kernels`).

The forward saves the state entering every tile, ``(Bt, Dc, n_tiles, N)``
(``N / T`` of the size of ``u``), and ``last_state``.

Where ``Bt * Dc`` channels make too few blocks to fill the GPU, the forward
splits the sequence into segments (:func:`segments`): a first kernel runs
every segment but the last from a zero state and keeps its end state and the
sum of its deltas (the segment's decay is ``exp(A * sum delta)``); the
forward then starts each segment's blocks from the state these give, all
segments at once.

The backward walks the tiles in reverse.  For each tile it recomputes the
states from the saved one into shared memory, sums ``C h`` over ``n`` to
rebuild ``y`` for the ``z`` gate, and runs the adjoint recurrence
``dh_t = C_t dy_t + q_{t+1}``, ``q_t = a_t dh_t`` serially backwards; the
per-step terms of ``ddelta`` and ``du`` are summed over ``n`` and those of
variable ``dB``/``dC`` over the block's channels through shared tiles, then
written (or atomically added where several blocks share a group).  Sums over
steps (``dA``, constant ``dB``/``dC``, ``dD``, ``ddelta_bias``) stay in
registers and are atomically added once per thread at the end.

The backward splits the sequence into segments too where its blocks are too
few (:func:`backward_segments`; segments of whole backward tiles and whole
stretches of saved states).  The adjoint is linear in its value at a
segment's end, and ``dy`` needs no state, so a first kernel runs every
segment but the first from ``q = 0`` backwards through ``dout``, ``z``,
``delta`` and ``C`` alone and keeps the adjoint it reaches and the sum of
the segment's deltas; the backward then starts each segment's blocks from
``dlast_state`` carried through the later segments
(``q = exp(A * sum delta) * q + Q``), all segments at once, each block adding
its segment's part of the sums over steps and only the first segment writing
``dinitial_state``.

Storage types
-------------
The kernels compute in float32 or float64 (the compute type: that of ``A``
and of every shared tile, register and saved state) and may read and write
the per-step arrays in a half type, the storage type: ``u``, ``delta``,
``z``, a variable ``B``/``C`` and ``dout`` are read in it, ``out``, ``du``,
``ddelta`` and ``dz`` written in it, each value converted once in registers
(:func:`~cuda_kernels.half.storage_io`: float16 through the hardware's
conversions, bfloat16 -- passed as its ``uint16`` bits -- with bit
operations, rounding to nearest even).  So float16 and bfloat16 inputs need
no cast to float32 before the scan nor back after it, and move half the bytes.
Everything else stays in the compute type (float32 for half storage):
``A, D, delta_bias``, a constant ``B``/``C``, ``initial_state``,
``last_state``, ``dlast_state``, the saved tile states, the segment buffers
and the accumulated gradients ``dA, dB, dC, dD, ddelta_bias`` (a variable
``dB``/``dC``, summed with atomics, is cast to the storage type by the
launcher afterwards).  Without a storage type the load and store are plain
array accesses: the float32 and float64 kernels compile to the same code as
before storage types existed.

Per-step arrays reach the kernels flat and are indexed with unsigned
offsets from per-row bases; shared-memory indices are unsigned too (Numba's
negative-index handling of signed indices costs instructions on every
access), and the kernels compile with ``fastmath`` (:func:`compile_options`).
No warp shuffles are used, so the same code runs in the CUDA simulator.
"""

import functools
import math
from typing import NamedTuple

import numba
import numpy as np
from numba import cuda, types

from ._common import (activations, array_module, compile_kernel, dummy, inline_device, launch,
                      prepare_launch, simulator)
from .half import (HALF_STORAGE, kernel_view, storage_dtype, storage_io, storage_of,
                   storage_widen)
from .settings import settings

__all__ = [
    "MAX_STATES",
    "StatesPlan",
    "StatesSaved",
    "backward_plan",
    "backward_segments",
    "gradient_buffers",
    "compile_options",
    "forward_plan",
    "launch_bounds",
    "narrow",
    "narrow_kernel",
    "plan",
    "ptx_signatures",
    "scan_backward",
    "scan_forward",
    "segments",
    "usable",
]

FLAG_D = 1
FLAG_Z = 2
FLAG_BIAS = 4
FLAG_SOFTPLUS = 8
FLAG_INIT = 16
FLAG_SAVE = 32  # the forward saves tile states for a backward
FLAG_DLAST = 128

_BLOCK = 128  # most threads per block
_MAX_STATIC_SHARED = 48 * 1024
# Most output steps per thread and tile whose per-step inputs (u and z in the
# forward, dout and z in the backward) are read into registers before the
# recurrence, so that their latency hides behind it; more are read after it.
# The forward in float32 without half storage has the registers for 8 where
# the N threads of a channel share a tile's steps evenly (N = 4: 32 steps over
# 4 threads); half storage, an uneven share (N = 5: 7 steps each, guarded) or
# the backward spill at 8.
_EARLY_STEPS = 4
_EARLY_STEPS_FLOAT32 = 8

#: Largest state size the engine takes (one block holds at least one channel).
MAX_STATES = _BLOCK

# The tunables of this engine (which engine the API picks, whether it reads
# half storage directly, how many states the forward keeps, how the sequence
# is split, the blocks per multiprocessor the kernels are compiled for) are
# fields of ``numba_mamba.cuda_kernels.settings.settings``: each launcher
# reads that object once and passes it down as ``cfg``.


def usable(Bt, Dc, N, cfg=settings):
    """True where the state-parallel engine is the better choice: ``N`` at most
    :data:`MAX_STATES` and at least ``cfg.min_recurrences`` recurrences."""
    return N <= MAX_STATES and Bt * Dc * N >= cfg.min_recurrences


class StatesPlan(NamedTuple):
    """Block layout for one problem (see the module docstring)."""

    ch: int       # channels per block
    dg: int       # channels per common group of the variable B and C
    t_fwd: int    # tile length of the forward
    t_bwd: int    # tile length of the backward
    save_every: int = 1  # the forward keeps the state entering every save_every-th backward tile


def _pitch(T):
    """Row length of a shared tile of ``T`` steps: ``T + 4`` where ``T`` is a
    multiple of 4, so that four consecutive steps of a row are 16-byte aligned
    and the unrolled loops read them in one vector load (``ld.shared.v4``);
    ``T + 1`` otherwise.  Either way the rows of consecutive states begin in
    different banks (4 or 1 apart), so that a warp's threads, one per state,
    read one step of their rows without conflicts."""
    return T + 4 if T % 4 == 0 else T + 1


def _tile_bytes(N, ch, T, itemsize, backward):
    rowlen = _pitch(T)
    if backward:
        words = 2 * N * rowlen + 4 * ch * rowlen + (4 * T + 1) * (ch * N + 1)
        if N > T:  # the partial sums over states (see _make_kernels)
            words += 2 * (N // T) * ch * T
    else:
        words = 2 * N * rowlen + 2 * ch * rowlen + ch * N * rowlen
        if N > T:  # the partial sums over states
            words += (N // T) * ch * T
    return words * itemsize


def _tile(N, ch, itemsize, backward):
    T = 32
    while T > 1 and _tile_bytes(N, ch, T, itemsize, backward) > _MAX_STATIC_SHARED:
        T //= 2
    return T  # a power of two, so the backward's tile divides the forward's


def plan(dtype, N, Dc, groups_B, groups_C, cfg=settings):
    """Block layout for ``N`` states, ``Dc`` channels and the given groups,
    keeping one state in ``cfg.save_every`` backward tiles.

    Parameters
    ----------
    dtype : numpy dtype
        The compute dtype, that of the shared tiles (float32 also for
        float16/bfloat16 storage, whose tiles are float32 too).
    N, Dc : int
    groups_B, groups_C : int
        Groups of a variable ``B``/``C``; 0 for a constant one.
    cfg : Settings, optional
        Default the package's ``settings``.

    Returns
    -------
    StatesPlan
    """
    if N > MAX_STATES:
        raise ValueError(f"the state-parallel engine takes at most {MAX_STATES} states, got {N}")
    return _plan(np.dtype(dtype), int(N), int(Dc), int(groups_B), int(groups_C),
                 cfg.save_every)


@functools.lru_cache(maxsize=1024)
def _plan(dtype, N, Dc, groups_B, groups_C, save_every):
    dg = Dc
    for g in (groups_B, groups_C):
        if g:
            dg = math.gcd(dg, Dc // g)
    ch = max(1, min(_BLOCK // N, dg))
    itemsize = np.dtype(dtype).itemsize
    t_bwd = _tile(N, ch, itemsize, True)
    return StatesPlan(ch, dg, max(t_bwd, _tile(N, ch, itemsize, False)), t_bwd, save_every)


def _argtypes(ftype, storage=None, b_var=True, c_var=True):
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


def _make_kernels(ftype, N, CH, TF, TB, b_var, c_var, K=1, storage=None, det=False):
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
    BF = (N, _pitch(TF)) if b_var else (1, 1)
    CF = (N, _pitch(TF)) if c_var else (1, 1)
    BB = (N, _pitch(TB)) if b_var else (1, 1)
    CB = (N, _pitch(TB)) if c_var else (1, 1)
    CHF = (CH, _pitch(TF))    # per-channel rows of a forward tile
    CHB = (CH, _pitch(TB))
    VA = None if simulator() else 16  # alignment of the step-row tiles (see _pitch)
    YF = (NT, _pitch(TF))  # C_t h_t of the forward: a row of steps per thread
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


class _Kernels(NamedTuple):
    forward: object
    backward: object
    forward_ends: object
    backward_ends: object


def launch_bounds(dtype, kind, threads, cfg=settings):
    """``launch_bounds`` of a kernel of this module: ``threads`` and the blocks
    per multiprocessor of ``cfg.min_blocks`` (none where that is 0)."""
    m = cfg.min_blocks[(np.dtype(dtype), kind)]
    return (threads, m) if m else (threads,)


def compile_options(dtype, kind, threads, cfg=settings):
    """Keyword arguments of ``cuda.jit`` for a kernel of this module.

    ``fastmath``: flush-to-zero float32 (``ex2.approx.ftz``: 10 instead of 13
    instructions per step and state in the forward's recurrence; a state
    below 1e-38 becomes 0) and approximate division in the sigmoid (2 ulp).
    """
    return {"launch_bounds": launch_bounds(dtype, kind, threads, cfg), "fastmath": True}


@functools.lru_cache(maxsize=None)
def _get_kernels(dtype, N, ch, t_fwd, t_bwd, save_every, b_var, c_var, sim, bounds,
                 storage=None):
    bodies = _make_kernels(dtype, N, ch, t_fwd, t_bwd, b_var, c_var, save_every, storage)
    if sim:
        return _Kernels(*(cuda.jit(f) for f in bodies))
    # (the segment-end kernels, light on registers, take the forward's bounds)
    return _Kernels(*(compile_kernel(f, types.void(*t), launch_bounds=b, fastmath=True)
                      for f, t, b in zip(bodies, _argtypes(dtype, storage, b_var, c_var),
                                         (bounds[0], bounds[1], bounds[0], bounds[0]))))


def _narrow_body(storage):
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


def _narrow_argtypes(storage):
    return (types.Array(types.float32, 1, "C"),
            types.Array(numba.from_dtype(storage_dtype(storage, np.float32)), 1, "C"),
            types.int64)


@functools.lru_cache(maxsize=None)
def narrow_kernel(storage, sim=False):
    """The compiled :func:`_narrow_body` for ``storage`` (cached)."""
    body = _narrow_body(storage)
    if sim:
        return cuda.jit(body)
    return compile_kernel(body, types.void(*_narrow_argtypes(storage)))


def narrow(x, dtype, stream="current"):
    """float32 ``x`` (C-contiguous) as a new array of the half ``dtype``
    (float16 or bfloat16), rounded to nearest even by :func:`narrow_kernel`."""
    xp = array_module(x)
    storage = storage_of(dtype)[1]
    y = xp.empty(x.shape, dtype)
    n = x.size
    launch(narrow_kernel(storage, simulator()), -(-n // 256), 256, stream,
           (x.reshape(-1), kernel_view(y).reshape(-1), np.int64(n)))
    return y


@functools.lru_cache(maxsize=None)
def _get_det_backward(dtype, N, ch, t_fwd, t_bwd, save_every, b_var, c_var, sim, bound,
                      storage=None):
    body = _make_kernels(dtype, N, ch, t_fwd, t_bwd, b_var, c_var, save_every, storage,
                         det=True)[1]
    if sim:
        return cuda.jit(body)
    return compile_kernel(body, types.void(*_argtypes(dtype, storage, b_var, c_var)[1]),
                          launch_bounds=bound, fastmath=True)


def get_kernels(dtype, N, p, b_var, c_var, storage=None, cfg=settings):
    """Compiled kernels for ``N`` states, plan ``p``, variable/constant B and C (cached).

    Parameters
    ----------
    dtype : numpy dtype
        The compute type (float32 or float64).
    N : int
    p : StatesPlan
    b_var, c_var : bool
    storage : {None, 'float16', 'bfloat16'}, optional
        Type of the per-step arrays (see the module docstring); None: ``dtype``.
    cfg : Settings, optional
        Its ``min_blocks`` are compiled in; default the package's ``settings``.

    Returns
    -------
    _Kernels
        ``forward, backward, forward_ends, backward_ends``; with
        ``cfg.deterministic`` the backward that stores its partial sums
        (:func:`partial_shapes`).
    """
    dtype = np.dtype(dtype)
    bounds = (launch_bounds(dtype, "forward", p.ch * N, cfg),
              launch_bounds(dtype, "backward", p.ch * N, cfg))
    key = (dtype, int(N), p.ch, p.t_fwd, p.t_bwd, p.save_every, bool(b_var), bool(c_var),
           simulator())
    kernels = _get_kernels(*key, bounds, storage)
    if cfg.deterministic:
        kernels = kernels._replace(backward=_get_det_backward(*key, bounds[1], storage))
    return kernels


def partial_shapes(Bt, Dc, N, L, S, p, groups_B, groups_C):
    """Shapes of the partial sums of the deterministic backward
    (``settings.deterministic``), each summed over its first axis afterwards.

    ``dA``, a constant ``dB``/``dC``, ``dD`` and ``ddelta_bias`` (the last two
    also over the states): one value per (segment, batch, channel, state),
    ``(S * Bt, Dc, N)``; a variable ``dB``/``dC`` of ``G`` groups: one per block
    of its group, ``(blocks, Bt, G, N, L)``, or None where constant (0 groups).

    Examples
    --------
    >>> from numba_mamba.cuda_kernels import scan_states
    >>> p = scan_states.StatesPlan(ch=8, dg=1536, t_fwd=32, t_bwd=16)
    >>> scan_states.partial_shapes(8, 1536, 16, 2048, 1, p, 1, 0)
    ((8, 1536, 16), (192, 8, 1, 16, 2048), None)
    """
    def variable(G):
        if not G:
            return None
        blocks = (Dc // G // p.dg) * (-(-p.dg // p.ch))
        return (blocks, Bt, G, N, L)
    return (S * Bt, Dc, N), variable(groups_B), variable(groups_C)


def _ordered_sums(xp, dtype, A, B, C, D, delta_bias, Bt, L, S, p):
    """Zeroed buffers of the deterministic backward's partial sums, flat as
    its kernel takes them (dA 2-D), and a function giving the gradients
    ``dA, dB, dC, dD, ddelta_bias`` from them (None where the input is)."""
    Dc, N = A.shape
    per_thread, var_B, var_C = partial_shapes(Bt, Dc, N, L, S, p, _groups(B), _groups(C))

    def buffer(shape, wanted=True):
        return xp.zeros((math.prod(shape),), dtype) if wanted else None
    bufs = [xp.zeros((per_thread[0] * Dc, N), dtype),
            buffer(var_B) if var_B else buffer(per_thread),
            buffer(var_C) if var_C else buffer(per_thread),
            buffer(per_thread, D is not None), buffer(per_thread, delta_bias is not None)]

    def sums():
        dA = bufs[0].reshape(per_thread).sum(axis=0)
        dB = bufs[1].reshape(var_B or per_thread).sum(axis=0)
        dC = bufs[2].reshape(var_C or per_thread).sum(axis=0)
        dD, dbias = (None if b is None else b.reshape(per_thread).sum(axis=(0, 2))
                     for b in bufs[3:])
        return dA, dB, dC, dD, dbias
    return bufs, sums


def ptx_signatures():
    """Every kernel variant of this module with its argument types, for PTX checks.

    Yields ``(name, py_func, argtypes, is_float32, options)`` (``options``: the
    keyword arguments of ``cuda.jit``, from :func:`compile_options`) for both
    dtypes, variable and constant ``B``/``C``, and a Mamba-sized (N = 16) and
    an odd-sized (N = 5) layout, and in float32 N = 64 (the backward's sums
    over states split among threads); and for float32 compute with float16 and
    bfloat16 storage (``is_float32`` True: they must be free of float64 too),
    N = 16 with variable and constant ``B``/``C``.
    """
    variants = [(np.dtype(np.float32), None, N) for N in (16, 5, 64)]
    variants += [(np.dtype(np.float64), None, N) for N in (16, 5)]
    variants += [(np.dtype(np.float32), st, 16) for st in ("float16", "bfloat16")]
    for dtype, storage, N in variants:
        is_f32 = dtype == np.float32
        p = plan(dtype, N, 1536, 1, 0)
        for b_var, c_var in ((True, True), (False, False), (True, False)):
            fwd_t, bwd_t, ends_t, bends_t = _argtypes(dtype, storage, b_var, c_var)
            fwd_py, bwd_py, ends_py, bends_py = _make_kernels(dtype, N, p.ch, p.t_fwd,
                                                              p.t_bwd, b_var, c_var, 1, storage)
            tag = (f"{dtype.name}{'_' + storage if storage else ''}_n{N}"
                   f"_b{'var' if b_var else 'const'}_c{'var' if c_var else 'const'}")
            yield (f"states_forward_{tag}", fwd_py, fwd_t, is_f32,
                   compile_options(dtype, "forward", p.ch * N))
            yield (f"states_backward_{tag}", bwd_py, bwd_t, is_f32,
                   compile_options(dtype, "backward", p.ch * N))
            if c_var:  # (the forward's segment ends do not read C)
                yield (f"states_forward_ends_{tag}", ends_py, ends_t, is_f32,
                       compile_options(dtype, "forward", p.ch * N))
            if b_var:  # (the backward's do not read B)
                yield (f"states_backward_ends_{tag}", bends_py, bends_t, is_f32,
                       compile_options(dtype, "forward", p.ch * N))
            if b_var == c_var and N == 16 and storage is None:  # settings.deterministic
                yield (f"states_backward_{tag}_det",
                       _make_kernels(dtype, N, p.ch, p.t_fwd, p.t_bwd, b_var, c_var, 1,
                                     storage, det=True)[1], bwd_t, is_f32,
                       compile_options(dtype, "backward", p.ch * N))
            if b_var and c_var:  # one saved state in 4 backward tiles
                fwd4, bwd4, *_ = _make_kernels(dtype, N, p.ch, p.t_fwd, p.t_bwd, b_var,
                                               c_var, 4, storage)
                yield (f"states_forward_{tag}_save4", fwd4, fwd_t, is_f32,
                       compile_options(dtype, "forward", p.ch * N))
                yield (f"states_backward_{tag}_save4", bwd4, bwd_t, is_f32,
                       compile_options(dtype, "backward", p.ch * N))
    for storage in HALF_STORAGE:
        yield f"narrow_{storage}", _narrow_body(storage), _narrow_argtypes(storage), True, {}


# ---------------------------------------------------------------- launchers
def _groups(M):
    return M.shape[1] if M.ndim == 4 else 0


def _grid(Bt, Dc, p):
    return Bt * (Dc // p.dg) * ((p.dg + p.ch - 1) // p.ch)


class StatesSaved(NamedTuple):
    """What :func:`scan_forward` keeps for :func:`scan_backward`."""

    tile_states: object  # (Bt, Dc, n, N) state entering every save_every-th backward tile
    plan: StatesPlan


def _flags(D, z, delta_bias, delta_softplus, init_or_dlast, init_bit):
    flags = 0
    flags |= FLAG_D if D is not None else 0
    flags |= FLAG_Z if z is not None else 0
    flags |= FLAG_BIAS if delta_bias is not None else 0
    flags |= FLAG_SOFTPLUS if delta_softplus else 0
    flags |= init_bit if init_or_dlast is not None else 0
    return np.int32(flags)


def segments(Bt, Dc, L, p, n_segments=None, cfg=settings):
    """``(S, SL)``: the forward's split of the sequence into ``S`` segments of
    ``SL`` steps (a multiple of the forward tile; the last one shorter).

    One segment where ``Bt * Dc`` channels make at least
    ``cfg.forward_split_below`` blocks; fewer blocks split the sequence so
    that they approach ``cfg.target_blocks`` (an H200 holds 132
    multiprocessors x 8 forward blocks), with segments of at least
    ``cfg.min_segment`` steps.  ``n_segments`` forces a count (for tests).
    """
    if n_segments is None:
        grid = _grid(Bt, Dc, p)
        S = 1 if grid >= cfg.forward_split_below else min(-(-cfg.target_blocks // grid),
                                                           L // cfg.min_segment)
    else:
        S = int(n_segments)
    S = max(1, min(S, -(-L // p.t_fwd)))
    SL = -(-(-(-L // S)) // p.t_fwd) * p.t_fwd
    return -(-L // SL), SL


def backward_segments(Bt, Dc, L, p, n_segments=None, cfg=settings):
    """``(S, SL)``: the backward's split of the sequence into ``S`` segments of
    ``SL`` steps (the last one shorter).

    ``SL`` is a multiple of ``p.t_bwd * p.save_every``, so that a segment
    holds whole backward tiles and whole stretches of saved states.  One
    segment where ``Bt * Dc`` channels make more than half of
    ``cfg.backward_target_blocks`` blocks (the resident backward blocks of an
    H200: 132 multiprocessors x 5 float32 blocks); fewer blocks split the
    sequence into as many segments as keep all blocks in one wave of that
    count, each at least ``cfg.min_segment`` steps long (the pass that finds the adjoint
    entering each segment costs about a sixth of the backward, so a split
    pays only where it multiplies the resident blocks).  Where one wave
    splits the sequence and its segments would still be at least
    ``cfg.long_segment`` steps long, the split goes on to up to
    ``cfg.long_segment_waves`` waves, with segments of at least
    ``2 * cfg.min_segment`` steps (``benchmarks/RESULTS.md`` has the
    measurements behind both rules).
    ``n_segments`` forces a count (for tests; at most one per stretch of
    saved states).

    Parameters
    ----------
    Bt, Dc, L : int
        Batch, channels, sequence length.
    p : StatesPlan
    n_segments : int, optional
    cfg : Settings, optional
        Default the package's ``settings``.

    Returns
    -------
    S, SL : int
    """
    unit = p.t_bwd * p.save_every
    if n_segments is None:
        grid = _grid(Bt, Dc, p)
        S = min(cfg.backward_target_blocks // grid, L // cfg.min_segment)
        if S > 1 and L >= cfg.long_segment * S:  # a split into long segments: more waves pay
            S = max(S, min(cfg.long_segment_waves * cfg.backward_target_blocks // grid,
                           L // (2 * cfg.min_segment)))
    else:
        S = int(n_segments)
    S = max(1, min(S, -(-L // unit)))
    SL = -(-(-(-L // S)) // unit) * unit
    return -(-L // SL), SL


def _as_is(x):
    return x


def _check_half(half, ftype, per_step, others):
    """Raise TypeError unless the per-step arrays (a constant ``B``/``C`` is
    not one) are of the storage dtype ``half`` and the others of ``ftype``
    (RawLaunch reads any dtype's bits as the kernel's)."""
    for name, x in per_step.items():
        if x is not None and (x.ndim != 2 or name not in ("B", "C")) and x.dtype != half:
            raise TypeError(f"{name} must have the dtype of u ({half}) in a half-precision "
                            f"scan, got {x.dtype}")
    for name, x in others.items():
        if x is not None and (x.ndim == 2 or name not in ("B", "C")) and x.dtype != ftype:
            raise TypeError(f"{name} must be {ftype} in a {half} scan, got {x.dtype}")


def scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                 initial_state, *, save=True, tuning=None, n_segments=None,
                 stream="current", out=None):
    """Selective scan forward, state-parallel engine (canonical layout).

    Parameters and returns as :func:`cuda_kernels.scan.scan_forward`, except
    that ``saved`` is a :class:`StatesSaved`, or None where ``save`` is
    False: then no states are kept for a backward (at ``N = 16`` they are as
    large as ``u`` in the compute dtype) and none are written.  Works on CuPy
    arrays and, under the CUDA simulator, on NumPy arrays.

    ``tuning``, for tests: ``(channels per block, forward tile, backward
    tile[, save_every])`` in place of :func:`plan`'s choice; the tiles powers
    of two, the backward's no longer than the forward's.  ``n_segments``, for tests: the
    number of segments of the sequence (see :func:`segments`).

    float16 or bfloat16 ``u`` (half storage, see the module docstring):
    ``delta``, ``z`` and a variable ``B``/``C`` must be of that dtype, ``A``,
    ``D``, ``delta_bias``, ``initial_state`` and a constant ``B``/``C``
    float32; ``out`` is of ``u``'s dtype, ``last_state`` float32.  A given
    ``out`` (C-contiguous, ``u``'s shape and dtype, sharing no memory with
    the inputs; unchecked here) is written and returned in place of a new
    array.
    """
    arrays = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    return forward_plan(arrays, delta_softplus, save, tuning, n_segments)(arrays, out)


def forward_plan(arrays, delta_softplus, save=True, tuning=None, n_segments=None):
    """The plan of :func:`scan_forward` for the layout of ``arrays`` (``u,
    delta, A, B, C, D, z, delta_bias, initial_state``, canonical), worked out
    on the first call of a layout and kept (keyed on the arrays' shapes,
    dtypes and device, the flags and ``settings.generation``).

    Calling it, ``plan(arrays, out)``, runs the forward of ``arrays`` of that
    layout: ``(out, last_state, saved)``.  On CuPy arrays its launches read
    only the arrays' data pointers, so arrays of the same bytes in another
    shape (a variable ``B`` of shape ``(Bt, N, L)`` for ``(Bt, 1, N, L)``)
    run it too.
    """
    cfg = settings
    key = _layout_key(arrays, arrays[0], arrays[3], arrays[4],
                      (bool(delta_softplus), bool(save), tuning, n_segments, cfg.generation))
    return _remembered(_FORWARD_PLANS, key, lambda: _ForwardPlan(
        arrays, delta_softplus, save, tuning, n_segments, cfg))


def _layout_key(arrays, u, B, C, flags):
    """What a plan depends on besides ``flags``: the array type and device,
    the shapes of ``u``, ``B``, ``C``, the dtypes of ``arrays`` (None for an
    absent one)."""
    return (type(u), None if isinstance(u, np.ndarray) else u.data.device_id, u.shape,
            B.shape, C.shape, tuple([None if x is None else x.dtype for x in arrays]), flags)


def _remembered(plans, key, make):
    """``plans[key]``, made by ``make()`` and kept the first time; ``plans``
    is started again when it holds :data:`_MAX_PLANS`."""
    plan = plans.get(key)
    if plan is None:
        plan = make()
        if len(plans) >= _MAX_PLANS:
            plans.clear()
        plans[key] = plan
    return plan


#: :func:`scan_forward`'s plans by layout (the arrays' shapes, dtypes and
#: device, the flags, the settings' generation); bounded, started again when full.
_FORWARD_PLANS = {}
_MAX_PLANS = 256


def _saved_tiles(L, p):
    """How many states the forward saves of a sequence of ``L`` steps: the
    backward recomputes from the state entering every ``p.save_every``-th of
    its tiles."""
    return -(-(-(-L // p.t_bwd)) // p.save_every)


class _ForwardPlan:
    """What :func:`scan_forward` works out once per layout: the plan, the
    kernels, the segments, the flags, the buffers' shapes, and the two
    launches prepared through the launch seam
    (:func:`~cuda_kernels._launch.prepare_launch`), so that a call of a
    layout seen before allocates its outputs and launches."""

    def __init__(self, arrays, delta_softplus, save, tuning, n_segments, cfg):
        u, delta, A, B, C, D, z, delta_bias, initial_state = arrays
        xp = self.xp = array_module(u)
        dtype, storage = storage_of(u.dtype)  # compute dtype, storage of the per-step arrays
        if storage is not None:
            _check_half(u.dtype, dtype, dict(delta=delta, z=z, B=B, C=C),
                        dict(A=A, B=B, C=C, D=D, delta_bias=delta_bias,
                             initial_state=initial_state))
        Bt, Dc, L = u.shape
        N = A.shape[1]
        p = plan(dtype, N, Dc, _groups(B), _groups(C), cfg)
        if tuning is not None:
            ch, t_fwd, t_bwd, *every = (int(v) for v in tuning)
            if t_fwd % t_bwd or t_fwd & (t_fwd - 1):
                raise ValueError(f"tiles must be powers of two, backward <= forward; got "
                                 f"{tuning}")
            p = StatesPlan(min(ch, p.dg), p.dg, t_fwd, t_bwd,
                           every[0] if every else p.save_every)
        self.p, self.save = p, bool(save)
        n_tiles = _saved_tiles(L, p)
        self.out = (u.shape, u.dtype)
        self.last_state = ((Bt, Dc, N), dtype)
        self.tile_states = ((Bt, Dc, n_tiles, N), dtype)
        self.dummy1 = dummy(xp, dtype, 1)
        self.dummy3 = dummy(xp, dtype, 3)
        self.dummy_tiles = dummy(xp, dtype, 4)  # (no states saved: not written)
        self.dummy_s = dummy(xp, storage_dtype(storage, dtype), 1)  # an absent per-step array
        k = get_kernels(dtype, N, p, B.ndim == 4, C.ndim == 4, storage, cfg)
        v = kernel_view if storage == "bfloat16" else _as_is  # (bfloat16 as its bits)
        S, SL = segments(Bt, Dc, L, p, n_segments, cfg)
        # the end state of segments 0 .. S-2 from zero and their delta sums (S > 1)
        self.no_segments = _segment_buffers(xp, dtype, Bt, Dc, N, 1, self.dummy3)
        seg_h, seg_dt = _segment_buffers(xp, dtype, Bt, Dc, N, S, self.dummy3)
        self.segment_buffers = tuple((x.shape, x.dtype) for x in (seg_h, seg_dt)) \
            if S > 1 else None
        flags = _flags(D, z, delta_bias, delta_softplus, initial_state, FLAG_INIT)
        if save:
            flags |= np.int32(FLAG_SAVE)
        self.ends = None
        ints = np.int64(p.dg), np.int64(L)
        if S > 1:
            self.ends = prepare_launch(
                k.forward_ends, (S - 1) * _grid(Bt, Dc, p), p.ch * N,
                (v(u).reshape(-1), v(delta).reshape(-1), A, v(B).reshape(-1),
                 self.dummy1 if delta_bias is None else delta_bias, seg_h, seg_dt, flags,
                 *ints, np.int64(_groups(B)), np.int64(SL), np.int64(S)))
        out, last_state = (xp.empty(*shape) for shape in (self.out, self.last_state))
        tile_states = xp.empty(*self.tile_states) if save else self.dummy_tiles
        self.main = prepare_launch(
            k.forward, S * _grid(Bt, Dc, p), p.ch * N,
            (v(u).reshape(-1), v(delta).reshape(-1), A, v(B).reshape(-1), v(C).reshape(-1),
             self.dummy1 if D is None else D,
             self.dummy_s if z is None else v(z).reshape(-1),
             self.dummy1 if delta_bias is None else delta_bias,
             self.dummy3 if initial_state is None else initial_state,
             v(out).reshape(-1), last_state, tile_states, flags,
             *ints, np.int64(_groups(B)), np.int64(_groups(C)),
             seg_h, seg_dt, np.int64(SL), np.int64(S)))

    def __call__(self, arrays, out):
        """``(out, last_state, saved)`` of the forward of ``arrays`` (of this
        plan's layout) into ``out`` (None: a new array)."""
        u, delta, A, B, C, D, z, delta_bias, initial_state = arrays
        empty = self.xp.ndarray  # (uninitialized, as ``empty``; a call less)
        if out is None:
            out = empty(*self.out)
        last_state = empty(*self.last_state)
        tile_states = empty(*self.tile_states) if self.save else self.dummy_tiles
        dummy1 = self.dummy1
        bias = dummy1 if delta_bias is None else delta_bias
        seg_h, seg_dt = self.no_segments  # (not read)
        if self.ends is not None:
            seg_h, seg_dt = (empty(*shape) for shape in self.segment_buffers)
            self.ends([u, delta, A, B, bias, seg_h, seg_dt])
        self.main([u, delta, A, B, C, dummy1 if D is None else D,
                   self.dummy_s if z is None else z, bias,
                   self.dummy3 if initial_state is None else initial_state,
                   out, last_state, tile_states, seg_h, seg_dt])
        return out, last_state, StatesSaved(tile_states, self.p) if self.save else None


def gradient_buffers(xp, u, A, B, C, D, z, delta_bias):
    """Outputs of a backward kernel: ``du, ddelta, dz`` (overwritten; of ``u``'s
    dtype), ``dA, dB, dC, dD, ddelta_bias`` (accumulated into, so zeroed; of the
    compute dtype, ``A``'s, also where a half-precision ``B``/``C`` wants its
    gradient cast afterwards); None where the input is None.

    The accumulated ones are views of one buffer, zeroed by one memset."""
    dtype = A.dtype
    Dc, N = A.shape
    shapes = [(Dc, N), B.shape, C.shape,
              None if D is None else (Dc,), None if delta_bias is None else (Dc,)]
    sizes = [0 if s is None else math.prod(s) for s in shapes]
    acc = xp.zeros((sum(sizes),), dtype)
    views = []
    start = 0
    for shape, size in zip(shapes, sizes):
        if shape is None:
            views.append(None)
        elif xp is np:  # (the simulator)
            views.append(acc[start:start + size].reshape(shape))
        else:  # (a view made directly: cheaper on the host than a slice and a reshape)
            views.append(xp.ndarray(shape, dtype, memptr=acc.data + start * acc.itemsize))
        start += size
    dA, dB, dC, dD, ddelta_bias = views
    return (xp.empty(u.shape, u.dtype), xp.empty(u.shape, u.dtype), dA, dB, dC, dD,
            None if z is None else xp.empty(u.shape, u.dtype), ddelta_bias)


def scan_backward(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias,
                  delta_softplus, initial_state, saved, *, n_segments=None,
                  stream="current"):
    """Selective scan backward, state-parallel engine (canonical layout).

    Parameters and returns as :func:`cuda_kernels.scan.scan_backward`, with
    ``saved`` from :func:`scan_forward` of this module.  ``n_segments``, for
    tests: the number of segments of the sequence (see
    :func:`backward_segments`; independent of the forward's).

    Half storage as in :func:`scan_forward`, with ``dout`` of ``u``'s dtype
    and ``dlast_state`` float32: ``du``, ``ddelta``, ``dz`` are of ``u``'s
    dtype, written by the kernel; ``dB``/``dC`` are summed in float32 and
    cast to ``B``'s/``C``'s dtype at the end; ``dA``, ``dD``,
    ``ddelta_bias``, ``dinitial_state`` are float32.
    """
    arrays = (dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state)
    if settings.deterministic:
        return _deterministic_backward(arrays, delta_softplus, saved, n_segments, stream,
                                       settings)
    return backward_plan(arrays, delta_softplus, saved.plan, n_segments)(arrays,
                                                                         saved.tile_states)


def backward_plan(arrays, delta_softplus, saved_plan, n_segments=None):
    """The plan of :func:`scan_backward` for the layout of ``arrays`` (``dout,
    dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state``,
    canonical) and the forward's :class:`StatesPlan`, as :func:`forward_plan`;
    None where ``settings.deterministic`` is on (that backward sums in a
    fixed order, unplanned).

    Calling it, ``plan(arrays, tile_states)``, returns the gradients of
    :func:`scan_backward` for ``arrays`` of that layout and the forward's
    saved ``tile_states``; as a forward plan, it reads only the arrays' data
    pointers, and gives ``dB``/``dC`` the shapes of the ``B``/``C`` it is
    called with.
    """
    cfg = settings
    if cfg.deterministic:
        return None
    dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state = arrays
    key = _layout_key(arrays, u, B, C,
                      (bool(delta_softplus), saved_plan, n_segments, cfg.generation))
    return _remembered(_BACKWARD_PLANS, key, lambda: _BackwardPlan(
        arrays, delta_softplus, saved_plan, n_segments, cfg))


#: :func:`scan_backward`'s plans by layout (as :data:`_FORWARD_PLANS`, and the
#: forward's :class:`StatesPlan`).
_BACKWARD_PLANS = {}


def _backward_setup(arrays, saved_plan, n_segments, cfg):
    """What every backward of a layout shares: ``(xp, dtype, storage, S, SL, k,
    v)`` (see :func:`scan_backward`), the half-storage dtypes checked."""
    dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state = arrays
    xp = array_module(u)
    dtype, storage = storage_of(u.dtype)
    if storage is not None:
        _check_half(u.dtype, dtype, dict(dout=dout, delta=delta, z=z, B=B, C=C),
                    dict(dlast_state=dlast_state, A=A, B=B, C=C, D=D, delta_bias=delta_bias,
                         initial_state=initial_state))
    Bt, Dc, L = u.shape
    S, SL = backward_segments(Bt, Dc, L, saved_plan, n_segments, cfg)
    k = get_kernels(dtype, A.shape[1], saved_plan, B.ndim == 4, C.ndim == 4, storage, cfg)
    v = kernel_view if storage == "bfloat16" else _as_is
    return xp, dtype, storage, S, SL, k, v


def _backward_args(arrays, grads, tile_states, seg_q, seg_dt, flags, p, S, SL, dummies, v):
    """The arguments of the backward kernel, and of the segment-end kernel
    (None where ``S`` is 1): both as :func:`~cuda_kernels._launch.launch`
    takes them."""
    dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state = arrays
    du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinit = grads
    dummy1, dummy3, dummy_s = dummies
    ints = np.int64(p.dg), np.int64(u.shape[2])
    ends = None
    if S > 1:
        ends = (v(dout).reshape(-1), v(delta).reshape(-1), A, v(C).reshape(-1),
                dummy_s if z is None else v(z).reshape(-1),
                dummy1 if delta_bias is None else delta_bias, seg_q, seg_dt, flags,
                *ints, np.int64(_groups(C)), np.int64(SL), np.int64(S))
    main = (v(dout).reshape(-1), dummy3 if dlast_state is None else dlast_state,
            v(u).reshape(-1), v(delta).reshape(-1), A, v(B).reshape(-1), v(C).reshape(-1),
            dummy1 if D is None else D,
            dummy_s if z is None else v(z).reshape(-1),
            dummy1 if delta_bias is None else delta_bias,
            tile_states, v(du).reshape(-1), v(ddelta).reshape(-1), dA,
            dB.reshape(-1), dC.reshape(-1),
            dummy1 if dD is None else dD,
            dummy_s if dz is None else v(dz).reshape(-1),
            dummy1 if ddelta_bias is None else ddelta_bias,
            dinit, flags, *ints, np.int64(_groups(B)), np.int64(_groups(C)),
            seg_q, seg_dt, np.int64(SL), np.int64(S))
    return main, ends


def _segment_buffers(xp, dtype, Bt, Dc, N, S, dummy3):
    """The adjoint entering segments 1 .. S-1 from zero at their ends and their
    delta sums; where ``S`` is 1 views of a dummy (not read)."""
    if S > 1:
        return xp.empty((Bt, Dc, S - 1, N), dtype), xp.empty((Bt, Dc, S - 1), dtype)
    return dummy3.reshape(1, 1, 1, 1), dummy3


def _narrowed(dB, dC, B, C, storage, stream):
    """A variable ``dB``/``dC`` summed in float32, in ``B``'s/``C``'s half dtype."""
    if storage is not None:
        dB = dB if dB.dtype == B.dtype else narrow(dB, B.dtype, stream)
        dC = dC if dC.dtype == C.dtype else narrow(dC, C.dtype, stream)
    return dB, dC


def _deterministic_backward(arrays, delta_softplus, saved, n_segments, stream, cfg):
    """:func:`scan_backward` with ``cfg.deterministic``: partial sums, summed in
    a fixed order after the kernel."""
    dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state = arrays
    xp, dtype, storage, S, SL, k, v = _backward_setup(arrays, saved.plan, n_segments, cfg)
    p = saved.plan
    Bt, Dc, L = u.shape
    N = A.shape[1]
    (dA, dB, dC, dD, ddelta_bias), ordered = _ordered_sums(xp, dtype, A, B, C, D,
                                                           delta_bias, Bt, L, S, p)
    du, ddelta = xp.empty(u.shape, u.dtype), xp.empty(u.shape, u.dtype)
    dz = None if z is None else xp.empty(u.shape, u.dtype)
    dinit = xp.empty((Bt, Dc, N), dtype)
    dummies = (dummy(xp, dtype, 1), dummy(xp, dtype, 3),
               dummy(xp, storage_dtype(storage, dtype), 1))
    seg_q, seg_dt = _segment_buffers(xp, dtype, Bt, Dc, N, S, dummies[1])
    flags = _flags(D, z, delta_bias, delta_softplus, dlast_state, FLAG_DLAST)
    main, ends = _backward_args(arrays, (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinit),
                                saved.tile_states, seg_q, seg_dt, flags, p, S, SL, dummies, v)
    if ends is not None:
        launch(k.backward_ends, (S - 1) * _grid(Bt, Dc, p), p.ch * N, stream, ends)
    launch(k.backward, S * _grid(Bt, Dc, p), p.ch * N, stream, main)
    dA, dB, dC, dD, ddelta_bias = ordered()
    dB, dC = _narrowed(dB, dC, B, C, storage, stream)
    dinitial_state = None if initial_state is None else dinit
    return du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state


class _BackwardPlan:
    """What :func:`scan_backward` works out once per layout (as
    :class:`_ForwardPlan`): a call allocates the gradients and launches."""

    def __init__(self, arrays, delta_softplus, saved_plan, n_segments, cfg):
        dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state = arrays
        xp, dtype, storage, S, SL, k, v = _backward_setup(arrays, saved_plan, n_segments, cfg)
        p = saved_plan
        Bt, Dc, L = u.shape
        N = A.shape[1]
        self.xp, self.storage = xp, storage
        self.dummies = (dummy(xp, dtype, 1), dummy(xp, dtype, 3),
                        dummy(xp, storage_dtype(storage, dtype), 1))
        self.segments = (((Bt, Dc, S - 1, N), dtype), ((Bt, Dc, S - 1), dtype)) \
            if S > 1 else None
        self.no_segments = _segment_buffers(xp, dtype, Bt, Dc, N, 1, self.dummies[1])
        self.dinit = ((Bt, Dc, N), dtype)
        self.has_initial_state = initial_state is not None
        seg_q, seg_dt = _segment_buffers(xp, dtype, Bt, Dc, N, S, self.dummies[1])
        flags = _flags(D, z, delta_bias, delta_softplus, dlast_state, FLAG_DLAST)
        grads = gradient_buffers(xp, u, A, B, C, D, z, delta_bias)
        n_tiles = _saved_tiles(L, p)
        main, ends = _backward_args(arrays, grads + (xp.empty(*self.dinit),),
                                    xp.empty((Bt, Dc, n_tiles, N), dtype), seg_q, seg_dt,
                                    flags, p, S, SL, self.dummies, v)
        grid = _grid(Bt, Dc, p)
        self.ends = None if ends is None else prepare_launch(k.backward_ends,
                                                             (S - 1) * grid, p.ch * N, ends)
        self.main = prepare_launch(k.backward, S * grid, p.ch * N, main)

    def __call__(self, arrays, tile_states):
        """The gradients of :func:`scan_backward` for ``arrays`` of this layout."""
        dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state = arrays
        dummy1, dummy3, dummy_s = self.dummies
        du, ddelta, dA, dB, dC, dD, dz, ddelta_bias = gradient_buffers(
            self.xp, u, A, B, C, D, z, delta_bias)
        dinit = self.xp.ndarray(*self.dinit)
        seg_q, seg_dt = self.no_segments
        if self.segments is not None:
            seg_q, seg_dt = (self.xp.ndarray(*shape) for shape in self.segments)
            self.ends([dout, delta, A, C, dummy_s if z is None else z,
                       dummy1 if delta_bias is None else delta_bias, seg_q, seg_dt])
        self.main([dout, dummy3 if dlast_state is None else dlast_state, u, delta, A, B, C,
                   dummy1 if D is None else D, dummy_s if z is None else z,
                   dummy1 if delta_bias is None else delta_bias, tile_states, du, ddelta, dA,
                   dB, dC, dummy1 if dD is None else dD, dummy_s if dz is None else dz,
                   dummy1 if ddelta_bias is None else ddelta_bias, dinit, seg_q, seg_dt])
        dB, dC = _narrowed(dB, dC, B, C, self.storage, "current")
        return (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias,
                dinit if self.has_initial_state else None)
