"""The state-parallel engine of the selective scan: one thread per (batch,
channel, state).  This module holds its design (below), its host policy --
plans, segments, launch bounds -- and its launchers; the kernel bodies are in
:mod:`.scan_states_kernels`.

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
aligned (:func:`~.scan_states_kernels.pitch`), so that the unrolled loops over steps read and
write four steps per vector instruction (``ld.shared.v4``), and the tiles are
staged by a fixed grid of threads whose offsets advance by a constant per
element (``walker`` in :func:`~.scan_states_kernels.make_kernels`).

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

import numpy as np
from numba import cuda, types

from ._common import array_module, compile_kernel, dummy, launch, prepare_launch, simulator
from .half import HALF_STORAGE, kernel_view, storage_dtype, storage_of
from .scan_states_kernels import (FLAG_BIAS, FLAG_D, FLAG_DLAST, FLAG_INIT, FLAG_SAVE,
                                  FLAG_SOFTPLUS, FLAG_Z, argtypes, make_kernels, narrow_argtypes,
                                  narrow_body, pitch)
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


_BLOCK = 128  # most threads per block
_MAX_STATIC_SHARED = 48 * 1024

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


def _tile_bytes(N, ch, T, itemsize, backward):
    rowlen = pitch(T)
    if backward:
        words = 2 * N * rowlen + 4 * ch * rowlen + (4 * T + 1) * (ch * N + 1)
        if N > T:  # the partial sums over states (see make_kernels)
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
    bodies = make_kernels(dtype, N, ch, t_fwd, t_bwd, b_var, c_var, save_every, storage)
    if sim:
        return _Kernels(*(cuda.jit(f) for f in bodies))
    # (the segment-end kernels, light on registers, take the forward's bounds)
    return _Kernels(*(compile_kernel(f, types.void(*t), launch_bounds=b, fastmath=True)
                      for f, t, b in zip(bodies, argtypes(dtype, storage, b_var, c_var),
                                         (bounds[0], bounds[1], bounds[0], bounds[0]))))


@functools.lru_cache(maxsize=None)
def narrow_kernel(storage, sim=False):
    """The compiled :func:`~.scan_states_kernels.narrow_body` for ``storage`` (cached)."""
    body = narrow_body(storage)
    if sim:
        return cuda.jit(body)
    return compile_kernel(body, types.void(*narrow_argtypes(storage)))


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
    body = make_kernels(dtype, N, ch, t_fwd, t_bwd, b_var, c_var, save_every, storage,
                         det=True)[1]
    if sim:
        return cuda.jit(body)
    return compile_kernel(body, types.void(*argtypes(dtype, storage, b_var, c_var)[1]),
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
            fwd_t, bwd_t, ends_t, bends_t = argtypes(dtype, storage, b_var, c_var)
            fwd_py, bwd_py, ends_py, bends_py = make_kernels(dtype, N, p.ch, p.t_fwd,
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
                       make_kernels(dtype, N, p.ch, p.t_fwd, p.t_bwd, b_var, c_var, 1,
                                     storage, det=True)[1], bwd_t, is_f32,
                       compile_options(dtype, "backward", p.ch * N))
            if b_var and c_var:  # one saved state in 4 backward tiles
                fwd4, bwd4, *_ = make_kernels(dtype, N, p.ch, p.t_fwd, p.t_bwd, b_var,
                                               c_var, 4, storage)
                yield (f"states_forward_{tag}_save4", fwd4, fwd_t, is_f32,
                       compile_options(dtype, "forward", p.ch * N))
                yield (f"states_backward_{tag}_save4", bwd4, bwd_t, is_f32,
                       compile_options(dtype, "backward", p.ch * N))
    for storage in HALF_STORAGE:
        yield f"narrow_{storage}", narrow_body(storage), narrow_argtypes(storage), True, {}


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
