"""Filters and scans on Dask arrays: time-chunked, lazy, past one machine.

:func:`numba_mamba.ssm_filter` and :func:`numba_mamba.selective_scan` take
``dask.array.Array`` arguments and return Dask arrays (they call the
functions of this module); nothing is computed until the result is asked
for.  The arrays may be chunked along time and along the batch and channel
axes.

Summary of algorithm
--------------------
Every recurrence here is ``h_t = a_t h_{t-1} + b_t`` per (batch, channel,
state), a composition of affine maps, associative under
``(a1, b1) o (a2, b2) = (a2 a1, a2 b1 + b2)``.  A naive ``map_blocks`` would
start every time chunk from a zero state; instead, per block of channels:

1. pass 1, one task per time chunk ``k`` (all in parallel): the chunk's
   transition ``a_k`` (the product of its per-step factors: ``Ab^len`` for a
   time-invariant filter, ``exp(A * sum(delta))`` for the selective scan)
   and its end state ``b_k`` from a zero start;
2. the prefix over chunks: ``s_0 = zi`` (zeros if absent),
   ``s_{k+1} = a_k s_k + b_k``, small tasks (O(batch x channels x states)
   work each): a chain, or Sklansky's tree ``ceil(log2 K)`` deep for ``K``
   chunks (:func:`prefix_kind`);
3. pass 2, one task per time chunk: the public function reruns the chunk
   from its true initial state ``s_k`` (``zi=`` / ``initial_state=``).

Pass 1 of chunk ``k`` waits for pass 2 of chunk ``k - lookahead``
(:func:`lookahead`, Dask's configuration value ``numba-mamba.lookahead``,
by default twice the scheduler's threads): a chunk of the input is held
from its read to its pass 2 only, so on a ``dask.distributed`` cluster
(which starts input chunks only as workers have room) a worker's memory
stays at a few chunks.  Dask's local threaded scheduler starts every ready
input chunk as threads come free, so with many threads it may read ahead
further.  On a cluster of one-thread workers, the scheduler's
``distributed.scheduler.worker-saturation`` (Dask's default 1.1) hands a
worker two input chunks at once, so it holds one chunk more than a loop
with ``zi``/``zf`` would; 1.0 holds none more (set it before the cluster
starts).  Where fresh memory is dear (the kernel clearing newly faulted
pages) that extra chunk shows in the time.  Where the lookahead covers
all chunks, pass 1 runs on them at once and the prefix is the tree;
otherwise pass 2 paces it and a chain (fewer tasks) is as fast.  Built
for a scheduler of one thread the graph has no pass 1 at all: each chunk
runs from the final state of the one before, which is what one thread
would do best.  For a time-invariant
filter pass 1 needs no recurrence: the end state is
``Bb sum_t Ab^(len-1-t) x_t``, a batched matrix product with tables of
powers (``mode='conv'``'s final state), about half the scan's work.

CuPy chunks go the same way (each chunk is handed to the public functions);
only NumPy chunks are tested.

The results equal the single-array call up to rounding (the order of the
operations differs at chunk boundaries), for any chunking.
"""

import itertools
import math
import operator
from functools import partial

import dask.array as da
import numpy as np
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

from ._math import softplus_array
from ._validation import array_namespace, as_float_array, is_double

__all__ = ["forecast_many", "lookahead", "parallelism", "prefix_kind", "selective_scan",
           "ssm_filter"]


# ------------------------------------------------------------- shared parts
def _namespace(v):
    """numpy or cupy: of an array, of a Dask array's chunks (its meta)."""
    if isinstance(v, da.Array):
        v = v._meta
    return array_namespace(v=v) if hasattr(v, "shape") else np


def _probe_value(v, shape):
    """A stand-in for ``v`` in the validating probe call: zeros of ``shape``
    in its dtype where ``v`` is a Dask array (whose values are checked
    when its chunks are computed), else ``v`` itself."""
    if isinstance(v, da.Array):
        return _namespace(v).zeros(shape, v.dtype)
    return v


def _time_slice(v, dim):
    """``v`` with one sample along ``dim`` (a stand-in zeros for Dask arrays)."""
    if isinstance(v, da.Array):
        shape = list(v.shape)
        shape[dim] = 1
        return _probe_value(v, tuple(shape))
    index = [slice(None)] * v.ndim
    index[dim] = slice(0, 1)
    return v[tuple(index)]


def _check_length(name, v, dim, L, what):
    if v.shape[dim] not in (1, L):
        raise ValueError(f"{name} must have length 1 or {L} (the samples of {what}) along "
                         f"its axis {dim - v.ndim}, got shape {tuple(v.shape)}")


def _choose_chunks(dims, full, args):
    """Chunks of the output per dim name in ``dims``: those of the first
    Dask argument (``args``: ``(array, dim names)``, the signal first)
    spanning the whole dim, else one chunk."""
    chunks = {}
    for name in dims:
        chunks[name] = (full[name],)
        for v, names in args:
            if isinstance(v, da.Array) and name in names \
                    and v.shape[names.index(name)] == full[name] > 1:
                chunks[name] = v.chunks[names.index(name)]
                break
    return chunks


def _as_chunked(v, names, chunks):
    """``v`` (NumPy, CuPy or Dask) as a Dask array chunked as ``chunks`` on
    its dims of full length; dims of length 1 (broadcast) in one chunk."""
    want = tuple(chunks[n] if v.shape[i] == sum(chunks[n]) else (v.shape[i],)
                 for i, n in enumerate(names))
    if isinstance(v, da.Array):
        return v.rechunk(want)
    return da.from_array(v, chunks=want)


def _key(v, names, block):
    """The key of the chunk of ``v`` (dims ``names``) that output ``block``
    (a dict from dim name to block index) reads; broadcast dims: chunk 0."""
    if v is None:
        return None
    return (v.name,) + tuple(block[n] if v.numblocks[i] > 1 else 0
                             for i, n in enumerate(names))


def _chain(state, pair):
    """One step of the prefix over chunks: the state after a chunk with
    transition ``a`` and zero-start end state ``b``, entered with ``state``."""
    a, b = pair
    return b if state is None else a * state + b


def _last_state(state, shape, dtype):
    xp = array_namespace(state=state)
    return xp.ascontiguousarray(xp.broadcast_to(state, shape).astype(dtype, copy=False))


def _build(name, out_dims, chunks, pass1, pass2, args, state0, need_last):
    """The graph of pass 1, the prefix and pass 2 over the chunks of ``out_dims``.

    ``out_dims`` names the output's dims, time (``'t'``) last; ``args`` maps
    an argument name to ``(dask array or None, dim names)``; ``pass1`` and
    ``pass2`` are ``(function, argument names)``, called per chunk with
    those arguments' chunks as keywords, ``pass2`` also with ``state`` (the
    chunk's initial state; None: zeros).  ``state0`` names the argument
    holding the initial state (or None).  Returns ``(layer, last)``: the
    output's keys are ``(name, *block)``; with ``need_last``, ``last`` maps
    each block of channels to the key of its final state.
    """
    lead = out_dims[:-1]
    token = name.rsplit("-", 1)[-1]
    p1_name, st_name, done_name = f"pass1-{token}", f"state-{token}", f"done-{token}"
    tree_name, p2_name = f"prefix-{token}", f"pass2-{token}"
    ahead = lookahead(math.prod(len(chunks[n]) for n in lead))
    kind = prefix_kind()
    if kind == "auto" and parallelism() == 1:
        kind = "sequential"
    dsk, last = {}, {}

    def task(fn_names, block, *extra):
        fn, names = fn_names
        keys = tuple(_key(args[n][0], args[n][1], block) for n in names)
        return (_Call(fn, names + ("state",) * len(extra)),) + keys + extra

    for lead_index in itertools.product(*(range(len(chunks[n])) for n in lead)):
        block = dict(zip(lead, lead_index), n=0)
        zi = _key(args[state0][0], args[state0][1], block) if state0 else None
        K = len(chunks["t"])
        if kind == "sequential":  # pass 2 only, each chunk from the one before's final state
            state = zi
            for k in range(K):
                block["t"] = k
                both = (p2_name,) + lead_index + (k,)
                dsk[both] = task((partial(pass2[0], final=True), pass2[1]), block, state)
                dsk[(name,) + lead_index + (k,)] = (operator.getitem, both, 0)
                state = (st_name,) + lead_index + (k,)
                dsk[state] = (operator.getitem, both, 1)
            last[lead_index] = state
            continue
        p1 = []
        for k in range(K if need_last else K - 1):  # (the last chunk's: for the final state)
            block["t"] = k
            p1.append((p1_name,) + lead_index + (k,))
            dsk[p1[k]] = task(pass1, block)
            if k >= ahead:  # (after pass 2 of chunk k - ahead: a bounded read-ahead)
                done = (done_name,) + lead_index + (k - ahead,)
                dsk[done] = (_done, (name,) + lead_index + (k - ahead,))
                dsk[p1[k]] = (_first, dsk[p1[k]], done)
        states = [zi] + [(st_name,) + lead_index + (k,) for k in range(len(p1))]
        if kind == "tree" or kind == "auto" and ahead >= len(p1):  # (pass 1 all at once)
            for k, pair in enumerate(_sklansky(dsk, p1, (tree_name,) + lead_index)):
                dsk[states[k + 1]] = (_chain, zi, pair)
        else:  # pass 1 paced by pass 2: a chain, as deep as the chunks, fewer tasks
            for k, pair in enumerate(p1):
                dsk[states[k + 1]] = (_chain, states[k], pair)
        for k in range(K):
            block["t"] = k
            dsk[(name,) + lead_index + (k,)] = task(pass2, block, states[k])
        if need_last:
            last[lead_index] = states[K]
    return dsk, last if need_last else {}


def _compose(first, then):
    """The pair ``(a, b)`` of two chunks, ``first`` then ``then``: their
    affine maps composed (the scan's operator)."""
    (a1, b1), (a2, b2) = first, then
    return a2 * a1, a2 * b1 + b2


def _sklansky(dsk, keys, name):
    """Inclusive prefixes of the pairs at ``keys`` under :func:`_compose`, as
    tasks added to ``dsk`` (keys ``(*name, level, i)``); returns their keys.

    Summary of algorithm: Sklansky's prefix: at level ``l`` every item in
    the upper half of a block of ``2^(l+1)`` is composed after the last
    item of the lower half; ``ceil(log2 K)`` levels deep, ``(K/2) log2 K``
    compositions.
    """
    keys, width, level = list(keys), 1, 0
    while width < len(keys):
        new = list(keys)
        for i in range(len(keys)):
            if (i // width) % 2:
                new[i] = name + (level, i)
                dsk[new[i]] = (_compose, keys[(i // width) * width - 1], keys[i])
        keys, width, level = new, 2 * width, level + 1
    return keys


def lookahead(blocks=1):
    """How many time chunks pass 1 may run ahead of pass 2 per block of
    channels: Dask's configuration value ``numba-mamba.lookahead`` if set,
    else ``ceil(2 P / blocks)`` with ``P`` the tasks the scheduler runs at
    once (:func:`parallelism`), read when the graph is built.

    Each chunk read ahead is held in memory until its pass 2, and each
    block of channels runs up to this many chunks' passes in parallel:
    ``2 P`` in all keeps ``P`` workers busy while a worker holds a few
    chunks; with one thread more only costs memory.

    Parameters
    ----------
    blocks : int, optional
        The blocks of channels (and batch) of the array, each with its own
        chain over time; they share the automatic value.

    Examples
    --------
    >>> import dask
    >>> from numba_mamba.dask import lookahead
    >>> with dask.config.set(scheduler="synchronous"):
    ...     lookahead()
    2
    >>> with dask.config.set({"numba-mamba.lookahead": 200}):
    ...     lookahead()
    200
    """
    import dask

    value = dask.config.get("numba-mamba.lookahead", None)
    if value is None:
        return max(1, -(-2 * parallelism() // blocks))
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"the Dask configuration value numba-mamba.lookahead must be an "
                         f"integer >= 1 (or None: automatic), got {value!r}")
    return int(value)


def prefix_kind():
    """How the initial states of the time chunks are found: Dask's
    configuration value ``numba-mamba.prefix``, one of

    ``'auto'`` (default)
        ``'sequential'`` where the scheduler runs one task at a time
        (:func:`parallelism` is 1, when the graph is built), else
        ``'tree'`` where pass 1 may run on all chunks at once (the
        :func:`lookahead` covers them), else ``'chain'``;
    ``'chain'``
        pass 1, then ``s_{k+1} = a_k s_k + b_k`` chunk after chunk, paced
        by pass 2 through the lookahead (fewer tasks than a tree);
    ``'tree'``
        pass 1, then Sklansky's parallel prefix, ``ceil(log2 K)`` tasks deep
        for ``K`` chunks (``(K/2) log2 K`` small tasks);
    ``'sequential'``
        no pass 1: each chunk runs from the final state of the one before,
        as a loop with ``zi``/``zf`` would (no parallelism along time).

    Examples
    --------
    >>> import dask
    >>> from numba_mamba.dask import prefix_kind
    >>> prefix_kind()
    'auto'
    >>> with dask.config.set({"numba-mamba.prefix": "tree"}):
    ...     prefix_kind()
    'tree'
    """
    import dask

    value = dask.config.get("numba-mamba.prefix", "auto")
    if value not in ("auto", "chain", "tree", "sequential"):
        raise ValueError(f"the Dask configuration value numba-mamba.prefix must be one of "
                         f"'auto', 'chain', 'tree', 'sequential', got {value!r}")
    return value


def parallelism():
    """How many tasks the current Dask scheduler runs at once: the threads of
    all workers of the current ``distributed`` client, else 1 for the
    synchronous scheduler, else the local pool's threads (Dask's
    ``num_workers``, default the CPU count).

    Examples
    --------
    >>> import dask
    >>> from numba_mamba.dask import parallelism
    >>> with dask.config.set(scheduler="synchronous"):
    ...     parallelism()
    1
    >>> with dask.config.set(scheduler="threads", num_workers=3):
    ...     parallelism()
    3
    """
    import os
    import sys

    import dask

    scheduler = dask.config.get("scheduler", None)
    if scheduler in ("sync", "synchronous", "single-threaded"):
        return 1
    if hasattr(scheduler, "nthreads"):  # a distributed.Client
        return max(1, sum(scheduler.nthreads().values()))
    if scheduler in (None, "dask.distributed", "distributed") and "distributed" in sys.modules:
        try:
            client = sys.modules["distributed"].default_client()
        except ValueError:  # (no client)
            client = None
        if client is not None:
            return max(1, sum(client.nthreads().values()))
    return max(1, int(dask.config.get("num_workers", None) or os.cpu_count() or 1))


def _done(_):
    """A token that a chunk's pass 2 finished (holding nothing of it)."""
    return None


def _first(value, *_):
    return value


class _Call:
    """A chunk function called with keyword arguments (picklable)."""

    def __init__(self, fn, names):
        self.fn, self.names = fn, names

    def __call__(self, *values):
        return self.fn(**dict(zip(self.names, values)))


def _array(dsk, deps, name, chunks, meta):
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=deps)
    return da.Array(graph, name, chunks, meta=meta)


def _meta(like, ndim):
    xp = array_namespace(like=like)
    return xp.empty((0,) * ndim, like.dtype)


# ------------------------------------------------------------------ ssm_filter
def _pad(v, ndim):
    """``v`` with leading axes of length 1 up to ``ndim`` dims."""
    return v[(None,) * (ndim - v.ndim) + (Ellipsis,)]


def _move(v, src, dst):
    return da.moveaxis(v, src, dst) if isinstance(v, da.Array) else \
        array_namespace(v=v).moveaxis(v, src, dst)


def _as_array(v, xp):
    return v if isinstance(v, da.Array) or hasattr(v, "__array_namespace__") \
        or isinstance(v, np.ndarray) else xp.asarray(v)


def _filter_pass1(x, A, B, dt, method):
    """``(a, b)`` of one chunk: its transition and end state from zero.

    Chunks in the canonical layout: x (..., Lc), A (..., 1, N),
    B (..., T, N), dt (..., T), T in {1, Lc}.
    """
    from .discretize import discretize
    from .filters import decayed_sum
    from .filters import ssm_filter as filt

    xp = array_namespace(x=x, A=A, B=B, dt=dt)
    x = as_float_array("x", x, xp)
    ftype = np.dtype(np.float64 if is_double(x.dtype) else np.float32)
    cplx = A.dtype.kind == "c" or B.dtype.kind == "c"
    ctype = np.dtype(np.complex128 if ftype == np.float64 else np.complex64) if cplx \
        else ftype
    A = A[..., 0, :].astype(ctype if A.dtype.kind == "c" else ftype, copy=False)
    dt = xp.asarray(dt).astype(ftype, copy=False)
    Lc = x.shape[-1]
    if B.shape[-2] == 1 and dt.shape[-1] == 1:  # time-invariant: no recurrence
        Ab, Bb = discretize(A, B[..., 0, :].astype(ctype, copy=False), dt, method)
        lead = np.broadcast_shapes(x.shape[:-1], Ab.shape[:-1])
        rows = math.prod(lead)
        xr = xp.broadcast_to(x.astype(ftype, copy=False), lead + (Lc,)).reshape(rows, Lc)
        E = decayed_sum(xr, xp.broadcast_to(Ab, lead + Ab.shape[-1:]).reshape(rows, -1), xp)
        return Ab ** Lc, Bb * E.reshape(lead + Ab.shape[-1:])
    _, b = filt(A, B, xp.ones((1,), ftype), x, dt=dt, method=method, axis=-1,
                zi=xp.zeros((A.shape[-1],), ftype))
    if method in ("zoh", "mamba"):  # exp(dt A) multiplied along time: exp(A sum dt)
        total = dt.sum(axis=-1, keepdims=True, dtype=np.float64) if dt.shape[-1] > 1 \
            else dt.astype(np.float64) * Lc
        a = xp.exp(A * total.astype(ftype))
    else:
        Ab, _ = discretize(A[..., None, :], xp.ones((), ftype), dt[..., None], method)
        a = Ab[..., 0, :] ** Lc if dt.shape[-1] == 1 else xp.prod(Ab, axis=-2)
    return a, b



def _filter_pass2(x, A, B, C, D, dt, state, method, mode, final=False):
    """The chunk's output from its initial ``state``; with ``final`` also its final state."""
    from .filters import ssm_filter as filt

    A = A[..., 0, :]
    if state is None and not final:
        return filt(A, B, C, x, D, dt, method, -1, None, mode)
    if state is None:
        state = array_namespace(A=A).zeros(A.shape[-1:], A.dtype)
    y, zf = filt(A, B, C, x, D, dt, method, -1, state, mode)
    return (y, zf) if final else y



def ssm_filter(A, B, C, x, D=None, dt=1.0, method="zoh", axis=-1, zi=None, mode="auto"):
    """:func:`numba_mamba.ssm_filter` on Dask arrays, lazily.

    Called by :func:`numba_mamba.ssm_filter` where any argument is a
    ``dask.array.Array``; the arguments and results are those of that
    function, as Dask arrays.  Arguments given as NumPy arrays are put in
    the graph as they are (split along the chunks of the Dask ones).

    Parameters
    ----------
    A, B, C, x, D, dt, method, axis, zi, mode
        As :func:`numba_mamba.ssm_filter`.  ``x`` may be chunked along any
        axis; arguments varying along time (``dt``, ``D``, ``B``, ``C``) are
        rechunked to ``x``'s time chunks, and every argument to the output's
        channel chunks (those of ``x``, or of the first Dask argument that
        spans a channel axis).

    Returns
    -------
    y : dask.array.Array
        As :func:`numba_mamba.ssm_filter`'s, chunked as ``x`` along time.
    zf : dask.array.Array
        Only if ``zi`` is given: the final state, one chunk along the states.

    Raises
    ------
    ValueError, TypeError
        As :func:`numba_mamba.ssm_filter`, when called for the shapes and
        dtypes (a probe with one sample); the values of Dask arguments (a
        negative ``dt``, say) are checked as their chunks are computed.

    Notes
    -----
    Summary of algorithm: see :mod:`numba_mamba.dask`.  The result equals
    the single-array call up to rounding for any chunking (chunks of one
    sample included).

    Examples
    --------
    >>> import numpy as np
    >>> import dask.array as da
    >>> import numba_mamba as nm
    >>> rng = np.random.default_rng(0)
    >>> A = -rng.uniform(0.1, 1, (4, 8)); B = rng.standard_normal((4, 8))
    >>> C = rng.standard_normal((4, 8)); x = rng.standard_normal((4, 1000))
    >>> xd = da.from_array(x, chunks=(2, 300))
    >>> y = nm.ssm_filter(A, B, C, xd)
    >>> y.chunks
    ((2, 2), (300, 300, 300, 100))
    >>> bool(np.allclose(y.compute(), nm.ssm_filter(A, B, C, x)))
    True
    """
    from .filters import ssm_filter as filt

    xp = _namespace(x)
    given = {k: _as_array(v, xp) for k, v in dict(A=A, B=B, C=C, x=x, D=D, dt=dt,
                                                     zi=zi).items() if v is not None}
    x = given["x"]
    if x.ndim == 0:
        raise ValueError("x must have at least 1 dim (time along axis), got a scalar")
    n = x.ndim
    if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, (int, np.integer)) \
            or not -n <= axis < n:
        raise ValueError(f"axis must be an integer in [{-n}, {n - 1}] for x with {n} dims, "
                         f"got {axis!r}")
    ax = int(axis) % n
    L = x.shape[ax]

    # the dim of each argument along time (None: constant along time)
    time_dim = {"x": ax}
    for k in ("dt", "D"):
        v = given.get(k)
        if v is not None and 1 <= v.ndim <= n and ax - (n - v.ndim) >= 0:
            time_dim[k] = ax - (n - v.ndim)
    for k in ("B", "C"):
        if given[k].ndim == n + 1:
            time_dim[k] = ax
    for k, d in time_dim.items():
        if k != "x":
            _check_length(k, given[k], d, L, "x")

    # validate shapes and dtypes with one sample (Dask arguments as zeros)
    probe = {k: _time_slice(v, time_dim[k]) if k in time_dim else
             _probe_value(v, v.shape) for k, v in given.items()}
    y0, zf0 = filt(probe["A"], probe["B"], probe["C"], probe["x"], probe.get("D"),
                   probe["dt"], method, ax, probe.get("zi", xp.zeros(probe["A"].shape[-1:])),
                   mode)
    nl = y0.ndim - 1
    lead, N = zf0.shape[:-1], zf0.shape[-1]

    # canonical layout: leading channel dims '0'.., time 't' last, states 'n'
    ld = tuple(str(i) for i in range(nl))
    canon = {}
    canon["x"] = (_pad(_move(x, ax, -1), nl + 1), ld + ("t",))
    for k in ("dt", "D"):
        v = given.get(k)
        if v is not None:
            v = _pad(v, n) if v.ndim else v.reshape((1,) * n)
            canon[k] = (_pad(_move(v, ax, -1), nl + 1), ld + ("t",))
    for k in ("A", "B", "C", "zi"):
        v = given.get(k)
        if v is None:
            continue
        if v.ndim == 0:
            v = v.reshape(1)
        if k in time_dim:
            v = _move(v, ax, -2)
        elif k != "zi":
            v = v[..., None, :]
        names = ld + (("n",) if k == "zi" else ("t", "n"))
        canon[k] = (_pad(v, len(names)), names)
    full = dict(zip(ld, lead), t=L, n=N)
    chunks = _choose_chunks(ld + ("t",), full, list(canon.values()))
    chunks["n"] = (N,)
    args = {k: (_as_chunked(v, names, chunks), names) for k, (v, names) in canon.items()}
    args.setdefault("D", (None, ()))

    token = tokenize(args, method, mode, "ssm_filter")
    name = f"ssm_filter-{token}"
    pass1 = (partial(_filter_pass1, method=method), ("x", "A", "B", "dt"))
    pass2 = (partial(_filter_pass2, method=method, mode=mode), ("x", "A", "B", "C", "D", "dt"))
    dsk, last = _build(name, ld + ("t",), chunks, pass1, pass2, args,
                       "zi" if zi is not None else None, zi is not None)
    deps = [v for v, _ in args.values() if v is not None]
    yc = _array(dsk, deps, name, tuple(chunks[d] for d in ld + ("t",)), _meta(y0, nl + 1))
    y = da.moveaxis(yc, -1, ax - n)
    if zi is None:
        return y
    zname = f"ssm_filter_zf-{token}"
    zsk = {(zname,) + i + (0,): (_last_state, key,
                                 tuple(chunks[d][j] for d, j in zip(ld, i)) + (N,),
                                 zf0.dtype)
           for i, key in last.items()}
    zf = _array(zsk, [yc], zname, tuple(chunks[d] for d in ld) + ((N,),), _meta(zf0, nl + 1))
    return y, zf


# -------------------------------------------------------------- selective_scan
def _scan_pass1(u, delta, A, B, C, delta_bias, delta_softplus):
    """``(a, b)`` of one chunk: ``exp(A * sum of its deltas)`` and its end state from zero."""
    from .scan import selective_scan as scan

    _, b = scan(u, delta, A, B, C, delta_bias=delta_bias, delta_softplus=delta_softplus,
                return_last_state=True)
    xp = array_namespace(b=b)
    ftype = b.dtype
    dt = xp.asarray(delta).astype(ftype)
    if delta_bias is not None:
        dt = dt + xp.asarray(delta_bias).astype(ftype)[:, None]
    if delta_softplus:
        dt = softplus_array(dt, xp)
    total = dt.sum(axis=-1, dtype=np.float64).astype(ftype)                # (Bt, D)
    return xp.exp(xp.asarray(A).astype(ftype)[None] * total[..., None]), b


def _scan_pass2(u, delta, A, B, C, D, z, delta_bias, state, delta_softplus, final=False):
    """The chunk's output from its initial ``state``; with ``final`` also its final state."""
    from .scan import selective_scan as scan

    return scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state=state,
                return_last_state=final)


def _grouped(M, Dc, chunks):
    """A grouped ``B``/``C`` (Bt, G, N, L) whose chunk ``j`` along the groups
    serves chunk ``j`` of the channels: split at the channel chunks' borders
    where they fall on groups' borders, else one group per channel."""
    G = M.shape[1]
    per = Dc // G
    if G == 1:
        return M
    M = M if isinstance(M, da.Array) else da.from_array(M, chunks=M.shape)
    borders = np.cumsum((0,) + chunks["d"])
    if (borders % per == 0).all():
        return M.rechunk({1: tuple(c // per for c in chunks["d"])})
    return da.take(M, np.arange(Dc) // per, axis=1).rechunk({1: chunks["d"]})


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, initial_state=None, out=None):
    """:func:`numba_mamba.selective_scan` (forward) on Dask arrays, lazily.

    Called by :func:`numba_mamba.selective_scan` where any argument is a
    ``dask.array.Array``; the arguments and results are those of that
    function, as Dask arrays.

    Parameters
    ----------
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state
        As :func:`numba_mamba.selective_scan`.  ``u`` may be chunked along
        batch, channels and time; the other arguments are rechunked to match
        (a grouped ``B``/``C`` (Bt, G, N, L) whose groups straddle a chunk
        border of the channels is expanded to one group per channel).
    out : None
        Not supported for Dask arrays (the result is a lazy array).

    Returns
    -------
    out : dask.array.Array, shape (Bt, D, L)
        Chunked as ``u``.
    last_state : dask.array.Array, shape (Bt, D, N)
        Only if ``return_last_state``; one chunk along the states.

    Raises
    ------
    TypeError
        ``out`` given; otherwise as :func:`numba_mamba.selective_scan`.
    ValueError
        As :func:`numba_mamba.selective_scan` for the shapes (checked at the
        call with a one-step probe); the values of Dask arguments are checked
        as their chunks are computed.

    Notes
    -----
    Summary of algorithm: see :mod:`numba_mamba.dask`; a chunk's transition
    is ``exp(A * sum_t delta_t)`` (``delta`` after the bias and softplus).

    Examples
    --------
    >>> import numpy as np
    >>> import dask.array as da
    >>> import numba_mamba as nm
    >>> rng = np.random.default_rng(0)
    >>> u = rng.standard_normal((2, 3, 100)); delta = rng.uniform(0.1, 1, (2, 3, 100))
    >>> A = -rng.uniform(0.5, 2, (3, 4)); B = rng.standard_normal((2, 4, 100))
    >>> C = rng.standard_normal((2, 4, 100))
    >>> ud, dd = da.from_array(u, chunks=(1, 3, 40)), da.from_array(delta, chunks=(1, 3, 40))
    >>> y, h = nm.selective_scan(ud, dd, A, B, C, return_last_state=True)
    >>> y.chunks, h.shape
    (((1, 1), (3,), (40, 40, 20)), (2, 3, 4))
    >>> want, want_h = nm.selective_scan(u, delta, A, B, C, return_last_state=True)
    >>> bool(np.allclose(y.compute(), want)), bool(np.allclose(h.compute(), want_h))
    (True, True)
    """
    from .scan import selective_scan as scan

    if out is not None:
        raise TypeError(f"out must be None for Dask arrays (the result is a lazy Dask array), "
                        f"got {type(out).__module__}.{type(out).__name__}")
    xp = _namespace(u)
    given = {k: None if v is None else _as_array(v, xp)
             for k, v in dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z,
                              delta_bias=delta_bias, initial_state=initial_state).items()}
    u = given["u"]
    if u.ndim != 3:
        raise ValueError(f"u must have 3 dims (batch, channels, length), got {u.ndim} dims "
                         f"with shape {tuple(u.shape)}")
    Bt, Dc, L = u.shape
    along_time = [k for k in ("u", "delta", "z", "B", "C")
                  if given[k] is not None and (k not in "BC" or given[k].ndim in (3, 4))]
    for k in along_time:
        v = given[k]
        if v.ndim >= 1 and v.shape[-1] != L:
            raise ValueError(f"{k} must have length {L} (u's) along its last axis, got shape "
                             f"{tuple(v.shape)}")
    probe = {k: None if v is None else
             _time_slice(v, v.ndim - 1) if k in along_time else _probe_value(v, v.shape)
             for k, v in given.items()}
    y0, last0 = scan(**probe, delta_softplus=delta_softplus, return_last_state=True)
    N = last0.shape[-1]

    dims = {"u": ("b", "d", "t"), "delta": ("b", "d", "t"), "z": ("b", "d", "t"),
            "A": ("d", "n"), "D": ("d",), "delta_bias": ("d",),
            "initial_state": ("b", "d", "n")}
    for k in ("B", "C"):
        dims[k] = {2: ("d", "n"), 3: ("b", "n", "t"), 4: ("b", "d", "n", "t")}[given[k].ndim]
    canon = {k: (v, dims[k]) for k, v in given.items() if v is not None}
    full = dict(b=Bt, d=Dc, t=L, n=N)
    chunks = _choose_chunks(("b", "d", "t"), full,
                            [canon[k] for k in ("u", "delta", "z") if k in canon]
                            + [v for k, v in canon.items() if k not in ("u", "delta", "z")])
    chunks["n"] = (N,)
    args = {}
    for k, (v, names) in canon.items():
        if len(names) == 4 and v.shape[1] != Dc:  # grouped, G < D
            v = _grouped(v, Dc, chunks)
            want = {0: chunks["b"], 2: (N,), 3: chunks["t"]}
            args[k] = (v.rechunk(want), names)
        else:
            args[k] = (_as_chunked(v, names, chunks), names)
    for k in dims:
        args.setdefault(k, (None, ()))

    token = tokenize(args, bool(delta_softplus), "selective_scan")
    name = f"selective_scan-{token}"
    pass1 = (partial(_scan_pass1, delta_softplus=bool(delta_softplus)),
             ("u", "delta", "A", "B", "C", "delta_bias"))
    pass2 = (partial(_scan_pass2, delta_softplus=bool(delta_softplus)),
             ("u", "delta", "A", "B", "C", "D", "z", "delta_bias"))
    state0 = "initial_state" if initial_state is not None else None
    dsk, last = _build(name, ("b", "d", "t"), chunks, pass1, pass2, args, state0,
                       return_last_state)
    deps = [v for v, _ in args.values() if v is not None]
    y = _array(dsk, deps, name, (chunks["b"], chunks["d"], chunks["t"]), _meta(y0, 3))
    if not return_last_state:
        return y
    hname = f"selective_scan_last-{token}"
    hsk = {(hname,) + i + (0,): (_last_state, key, (chunks["b"][i[0]], chunks["d"][i[1]], N),
                                 last0.dtype)
           for i, key in last.items()}
    return y, _array(hsk, [y], hname, (chunks["b"], chunks["d"], (N,)), _meta(last0, 3))


# ----------------------------------------------------------------- many series
def _fit_predict(y, fh, params):
    from .timeseries import MambaForecaster

    return MambaForecaster(**params).fit(y, fh=fh).predict()


def forecast_many(series, fh, client=None, progress=True, **params):
    """Fit one :class:`~numba_mamba.timeseries.MambaForecaster` per series in
    parallel with Dask and forecast each.

    Parameters
    ----------
    series : sequence of arrays, shape (T,) or (T, C) each, or an array (n, T)
        The series (unequal lengths allowed in a sequence).
    fh : int
        Forecast horizon, as :meth:`MambaForecaster.fit`.
    client : distributed.Client, optional
        Runs the fits on its cluster (``Client("tcp://scheduler:8786")`` on
        a real one), with ``distributed.progress`` as the progress bar;
        default: Dask's current scheduler (a local one unless a client is
        active) with ``dask.diagnostics.ProgressBar``.
    progress : bool, optional
        Show the progress bar (default True).
    **params
        Arguments of :class:`MambaForecaster` (the same for every series).

    Returns
    -------
    forecasts : list of arrays, shape (fh,) or (fh, C) each
        In the order of ``series``.

    Notes
    -----
    One task per series; a worker should run one thread with
    ``NUMBA_NUM_THREADS=1`` so that the workers, not Numba's threads, share
    the cores.  For one global model on a panel, fit a single
    :class:`MambaForecaster` on the panel instead.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_mamba.dask import forecast_many
    >>> t = np.arange(120)
    >>> series = [np.sin(2 * np.pi * t / 12) * a for a in (1.0, 2.0, 3.0)]
    >>> out = forecast_many(series, fh=6, progress=False, season=12, steps=0)
    >>> len(out), out[0].shape
    (3, (6,))
    >>> bool(np.allclose(out[2], 3 * np.sin(2 * np.pi * np.arange(120, 126) / 12), atol=1e-2))
    True
    """
    import dask

    tasks = [dask.delayed(_fit_predict, pure=True)(np.asarray(y), fh, params)
             for y in series]
    if client is not None:
        futures = client.compute(tasks)
        if progress:
            from distributed import progress as show

            show(futures)
        return client.gather(futures)
    if progress:
        from dask.diagnostics import ProgressBar

        with ProgressBar():
            return list(dask.compute(*tasks))
    return list(dask.compute(*tasks))
