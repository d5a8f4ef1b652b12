"""Helpers shared by the kernel modules: device functions, streams, layouts.

Nothing here computes; these are the few lines every launcher needs, kept in
one place.  Kernels are compiled and launched through :mod:`._launch`
(:func:`compile_kernel`, :func:`launch`, re-exported here).
"""

import array
import itertools
import math
import os
import struct
import sys
import threading
import types

import numba
import numpy as np
from numba import cuda

__all__ = ["BoundLaunch", "HALF_STORAGE", "RawLaunch", "Replay", "activations",
           "array_module", "as_variable", "bfloat16_bits_to_float32", "c_strided", "compile_kernel",
           "current_stream", "dummy", "empty", "float32_to_bfloat16_bits", "inline_device",
           "kernel_view", "launch", "record", "simulator", "storage_dtype", "storage_io",
           "storage_of", "storage_widen"]


def simulator():
    """True under the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``)."""
    return bool(numba.config.ENABLE_CUDASIM)


def inline_device(fn):
    """Compile ``fn`` as a device function, force-inlined into its callers.

    Under the simulator it stays a plain Python function (the simulator runs
    kernels as Python, with the ``cuda`` module swapped for its emulation).
    """
    if simulator():
        return fn
    return cuda.jit(device=True, forceinline=True)(fn)


def activations(ftype):
    """Device functions ``softplus(x)`` (``x`` itself above 20) and ``sigmoid(x)``
    with every constant cast to ``ftype``, so float32 code stays float32."""
    one = ftype(1.0)
    twenty = ftype(20.0)

    @inline_device
    def softplus(x):
        if x > twenty:
            return x
        return math.log1p(math.exp(x))

    @inline_device
    def sigmoid(x):
        return one / (one + math.exp(-x))

    return softplus, sigmoid


# ------------------------------------------------------ half-precision storage
#: Storage kinds of per-step arrays that kernels read and write in a half type
#: while computing in float32 (see :func:`storage_io`).
HALF_STORAGE = ("float16", "bfloat16")


_STORAGE_OF = {}  # dtype -> (compute dtype, storage) (``dtype.name`` costs microseconds)


def storage_of(dtype):
    """``(compute dtype, storage)`` for arrays of ``dtype``: float16 and bfloat16
    compute in float32 and keep their name as the storage kind; float32 and
    float64 compute in themselves with storage None (no conversion)."""
    found = _STORAGE_OF.get(dtype)
    if found is None:
        d = np.dtype(dtype)
        found = (np.dtype(np.float32), d.name) if d.name in HALF_STORAGE else (d, None)
        _STORAGE_OF[dtype] = found
    return found


def storage_dtype(storage, ftype):
    """dtype of the arrays a kernel takes for ``storage``: float16 itself,
    bfloat16 as its bits (``uint16``; Numba has no bfloat16 arrays), None
    the compute dtype ``ftype``."""
    if storage is None:
        return np.dtype(ftype)
    if storage == "float16":
        return np.dtype(np.float16)
    if storage == "bfloat16":
        return np.dtype(np.uint16)
    raise ValueError(f"storage must be None, 'float16' or 'bfloat16', got {storage!r}")


def kernel_view(x):
    """``x`` as the kernels take it: a bfloat16 array viewed as ``uint16``
    (:func:`storage_dtype`), any other array (and None) unchanged."""
    if x is not None and storage_of(x.dtype)[1] == "bfloat16":
        return x.view(np.uint16)
    return x


def bfloat16_bits_to_float32(bits):
    """float32 value of bfloat16 bits (``uint16``, scalar or array): the bits
    are the high half of the float32's.  NumPy; the simulator's load."""
    b = np.asarray(bits, np.uint16).astype(np.uint32) << np.uint32(16)
    return b.view(np.float32)[()]


def float32_to_bfloat16_bits(x):
    """bfloat16 bits (``uint16``) of float32 ``x`` (scalar or array), rounded
    to nearest, ties to even, on the bits (infinities stay infinite, values
    past the largest bfloat16 become infinite, subnormals round like any
    value); a NaN stays a NaN (its quiet bit set).  NumPy; the simulator's
    store."""
    b = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    rounded = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    nan = (b & 0x7FFFFFFF) > 0x7F800000
    return np.where(nan, (b >> 16) | 0x40, rounded).astype(np.uint16)[()]


def _bf16_load_gpu(M, i):
    # the 16 bits shifted into the high half of a float32's
    return cuda.libdevice.int_as_float(np.int32(np.int64(M[i]) << 16))


def _bf16_store_gpu(M, i, y):
    b = np.int64(cuda.libdevice.float_as_int(y)) & 0xFFFFFFFF
    if (b & 0x7FFFFFFF) > 0x7F800000:  # NaN: keep it one (quiet)
        h = (b >> 16) | 0x40
    else:  # round to nearest even: a carry past the 16 low bits rounds up
        h = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    M[i] = np.uint16(h)


def storage_widen(storage, ftype):
    """``(zero, widen)``: the zero of :func:`storage_dtype` and a device function
    converting one value read from an array of it to ``ftype`` (what
    :func:`storage_io`'s ``load`` does after the read).  A kernel that reads a
    value long before it uses it keeps the raw value in a register and widens
    it late: the conversion waits for the read, the register does not."""
    zero = storage_dtype(storage, ftype).type(0)
    if storage is None:
        @inline_device
        def widen(v):
            return v
    elif storage == "float16":
        @inline_device
        def widen(v):
            return np.float32(v)
    elif simulator():
        def widen(v):
            return bfloat16_bits_to_float32(v)
    else:
        @inline_device
        def widen(v):
            return cuda.libdevice.int_as_float(np.int32(np.int64(v) << 16))
    return zero, widen


def storage_io(storage, ftype):
    """Device functions ``load(M, i)`` (``M[i]`` as ``ftype``) and
    ``store(M, i, y)`` (``ftype`` ``y`` into ``M[i]``) for arrays of
    ``storage`` (:func:`storage_dtype`).

    None: plain ``M[i]`` and ``M[i] = y`` (the compiled code is that of an
    array of ``ftype``).  ``'float16'``: Numba's float16 conversions
    (``cvt`` instructions).  ``'bfloat16'``: on bits (``uint16`` arrays) --
    a load puts them in the high half of a float32, a store rounds to
    nearest even (:func:`float32_to_bfloat16_bits`); under the simulator
    the NumPy versions of both.
    """
    storage_dtype(storage, ftype)  # (checks the kind)
    if storage is None:
        @inline_device
        def load(M, i):
            return M[i]

        @inline_device
        def store(M, i, y):
            M[i] = y
    elif storage == "float16":
        @inline_device
        def load(M, i):
            return np.float32(M[i])

        @inline_device
        def store(M, i, y):
            M[i] = np.float16(y)
    elif simulator():
        def load(M, i):
            return bfloat16_bits_to_float32(M[i])

        def store(M, i, y):
            M[i] = float32_to_bfloat16_bits(y)
    else:
        load = inline_device(_bf16_load_gpu)
        store = inline_device(_bf16_store_gpu)
    return load, store


def as_variable(M):
    """A constant ``B``/``C`` (Dc, N) viewed as (1, Dc, N, 1): a variable one with
    G = Dc groups, batch 1 and length 1; a (Bt, G, N, L) one unchanged."""
    return M.reshape(1, M.shape[0], M.shape[1], 1) if M.ndim == 2 else M


def array_module(x):
    """``numpy`` for NumPy arrays (which reach the kernels only under the simulator), else ``cupy``."""
    if isinstance(x, np.ndarray):
        return np
    import cupy

    return cupy


def current_stream(xp=None):
    """CuPy's current stream as a Numba stream; None for NumPy arrays (the simulator)."""
    if xp is np:
        return None
    import cupy

    return cuda.external_stream(cupy.cuda.get_current_stream().ptr)


# ------------------------------------------------------------------ settings
#: ``[n]``: changes with every assignment (or deletion) of an attribute of a
#: :class:`SettingsModule` from outside it.  A recorded replay holds only for
#: the settings it was recorded under, so the replays' keys include this
#: (see ``scan.replay_settings``): one number read per call instead of the
#: settings themselves.
SETTINGS_VERSION = [0]
_VERSIONS = itertools.count(1)  # (``next`` is atomic: two threads never share a version)


class SettingsModule(types.ModuleType):
    """The class of a kernel module whose attributes -- the launch path, its
    launchers, its tuning constants -- are settings a recorded replay depends
    on: assigning or deleting one from outside the module (as tests and
    benchmarks do) moves :data:`SETTINGS_VERSION` on, so no replay recorded
    before is used after.  A module becomes one with :func:`watch_settings`."""

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        SETTINGS_VERSION[0] = next(_VERSIONS)

    def __delattr__(self, name):
        super().__delattr__(name)
        SETTINGS_VERSION[0] = next(_VERSIONS)


def watch_settings(module_name):
    """Make the (imported) module ``module_name`` a :class:`SettingsModule`."""
    sys.modules[module_name].__class__ = SettingsModule


# ------------------------------------------------------------------ launching
# Every launch goes through the launch seam, ``_launch`` (the one module that
# reads internals of numba-cuda and CuPy); its names are re-exported here for
# the kernel modules.
from ._launch import BoundLaunch, RawLaunch, c_strided, compile_kernel, launch  # noqa: E402


_DUMMIES = {}


def dummy(xp, dtype, ndim):
    """A one-element array of ``ndim`` dimensions standing in for an absent
    optional argument (kernels take every argument; a flag says it is absent).
    Cached per device and dtype: never written, so shared by every launch."""
    if xp is np:
        return np.zeros((1,) * ndim, dtype)
    key = (xp.cuda.runtime.getDevice(), dtype, ndim)
    x = _DUMMIES.get(key)
    if x is None:
        x = _DUMMIES[key] = xp.zeros((1,) * ndim, dtype)
    return x


# ------------------------------------------------------------- replayed calls
#: The recording running in this thread, if any (see :func:`record`).
_RECORDING = threading.local()


def empty(xp, shape, dtype, zero=False):
    """``xp.empty(shape, dtype)`` (``xp.zeros`` where ``zero``): the buffers of a
    launcher allocated through this are known to a :func:`record` running in the
    thread, which allocates (and zeroes) them again on each replay."""
    x = xp.zeros(shape, dtype) if zero else xp.empty(shape, dtype)
    recording = getattr(_RECORDING, "now", None)
    if recording is not None:
        recording.allocated(x, zero)
    return x


class _Recording:
    """What one call did: its buffers (from :func:`empty`), in order with its
    launches (from :func:`launch`); ``replayable`` turns False where it did
    anything else a replay could not repeat (a launch through Numba)."""

    def __init__(self):
        self.steps = []  # ("alloc", array, zero) or ("launch", RawLaunch, grid, block, args)
        self.replayable = True

    def allocated(self, x, zero):
        self.steps.append(("alloc", x, zero))

    def launched(self, raw, grid, block, args):
        self.steps.append(("launch", raw, grid, block, args))


def record(fn, inputs, keep):
    """Call ``fn()`` and return ``(result, replay)``: ``replay`` a :class:`Replay`
    that repeats the call's work for other arrays of the layout of ``inputs``,
    or None where it cannot.

    ``fn`` is a launcher of this package: every buffer it allocates comes from
    :func:`empty`, every kernel it runs from :func:`launch`, and it reads
    nothing of the arrays but their layout.  ``inputs`` are the arrays it
    launches on (None where absent), each to be replaced by the data pointer
    given to the replay; ``keep`` the indices of the items of its result (a
    tuple) the replay returns (the others come back None, and buffers only
    they hold are scratch: freed when the replay returns, or with the first
    kept array where they are small).

    None where a kernel got an array that is none of ``inputs``, of the buffers
    ``fn`` allocated and of the cached :func:`dummy` arrays; where two inputs
    share a data pointer (a replay could not tell which one a kernel read);
    where a kernel launched through Numba; or where a kept result is not a
    buffer ``fn`` allocated (with C strides).
    """
    recording = _Recording()
    previous = getattr(_RECORDING, "now", None)
    _RECORDING.now = recording
    try:
        result = fn()
    finally:
        _RECORDING.now = previous
    if not recording.replayable:
        return result, None
    try:
        kept = {i: result[i] for i in sorted(keep)}
        return result, Replay(recording.steps, inputs, kept, len(result))
    except _NotReplayable:
        return result, None


#: Bytes of scratch a :class:`Replay` puts in its first result's allocation
#: (more, up to an eighth of that result, too).
SMALL_SCRATCH = 64 * 1024


class _NotReplayable(Exception):
    pass


def _is_array(x):
    return hasattr(x, "__cuda_array_interface__")


def _nbytes(x):
    return x.size * x.itemsize


_NEW_INIT = {}  # cupy.ndarray (the class) -> (new, init) or None


def _ndarray_new_init(cupy):
    """``(new, init)`` such that ``x = new(cupy.ndarray); init(x, shape, dtype,
    memptr)`` makes what ``cupy.ndarray(shape, dtype, memptr=memptr)`` makes,
    or None where this CuPy does not have them.

    ``cupy.ndarray`` is a Python subclass of CuPy's compiled base class: its
    ``__new__`` (and an empty ``__init__``) run as Python frames around the
    base's ``_init``, which is half of the 1.8 us an ``ndarray`` costs on the
    GPU machine's host.  For ``cupy.ndarray`` itself (not a subclass) that
    ``__new__`` is the base's ``__new__`` then ``_init``, called here directly.
    These are CuPy's internals, so they are used only where one array made
    both ways agrees in every attribute a caller sees (checked once per
    class)."""
    nd = cupy.ndarray
    if nd not in _NEW_INIT:
        _NEW_INIT[nd] = _check_new_init(cupy)
    return _NEW_INIT[nd]


def _check_new_init(cupy):
    nd = cupy.ndarray
    base = nd.__mro__[1] if len(nd.__mro__) > 2 else None
    init = getattr(base, "_init", None)
    if not callable(init):
        return None
    try:
        mem = cupy.cuda.alloc(64)
        x = base.__new__(nd)
        init(x, (2, 3), np.dtype(np.float32), mem + 8)
        y = nd((2, 3), np.dtype(np.float32), memptr=mem + 8)
    except Exception:  # noqa: BLE001 (any failure: the public constructor it is)
        return None

    def seen(a):
        flags = a.flags
        return (type(a), a.shape, a.strides, a.dtype, a.size, a.data.ptr,
                getattr(a.data, "mem", None), getattr(a, "base", None), flags.c_contiguous,
                getattr(flags, "owndata", None))

    return (base.__new__, init) if type(x) is nd and seen(x) == seen(y) else None


class Replay:
    """A launcher's call, repeated on new data pointers: its buffers allocated
    again (one allocation per kept result's buffer; the others in one scratch
    allocation, or at the end of the first kept buffer's where they are small,
    see :data:`SMALL_SCRATCH`), zeroed where the call zeroed them, its kernels
    launched with the slots :meth:`RawLaunch.bind` prepared.  Made by
    :func:`record`; a call costs about one CuPy allocation and one
    ``ndarray`` per kept array, one driver call per kernel and a microsecond
    or so of Python: the steps are compiled into one function
    (:meth:`_compile`; its text is ``source``).
    """

    def __init__(self, steps, inputs, kept, n_results):
        import cupy

        self._alloc = cupy.cuda.alloc
        self._ndarray = cupy.ndarray
        self._new_init = _ndarray_new_init(cupy)
        self._stream = cupy.cuda.get_current_stream
        self._memset = cupy.cuda.runtime.memsetAsync
        self._n_results = n_results
        given = {}
        for i, x in enumerate(inputs):
            if x is not None:
                if x.data.ptr in given:
                    raise _NotReplayable  # aliased inputs
                given[x.data.ptr] = i
        buffers = [(step[1], step[2]) for step in steps if step[0] == "alloc"]
        # which buffers the kept results are: one allocation each; the rest scratch
        result_of = {}
        for r, item in kept.items():
            for leaf in (item if isinstance(item, tuple) else (item,)):
                if _is_array(leaf):
                    j = self._buffer_of(leaf, buffers)
                    if j is None:
                        raise _NotReplayable
                    result_of.setdefault(j, r)
        self._groups = []  # bytes per allocation: one per kept buffer, then the scratch
        where = {}  # buffer -> (allocation, offset)
        for j in sorted(result_of):
            where[j] = (len(self._groups), 0)
            self._groups.append(_nbytes(buffers[j][0]))
        scratch = [j for j in range(len(buffers)) if j not in where]
        sizes = [-(-max(_nbytes(buffers[j][0]), 1) // 256) * 256 for j in scratch]
        # a small scratch goes at the end of the first kept buffer's allocation
        # (one allocation less per call, the scratch held as long as that array)
        if self._groups and sum(sizes) <= max(SMALL_SCRATCH, self._groups[0] // 8):
            g, start = 0, -(-self._groups[0] // 256) * 256
        else:
            g, start = len(self._groups), 0
        for j, size in zip(scratch, sizes):
            where[j] = (g, start)
            start += size
        if scratch:
            self._groups[g:g + 1] = [start]
        n_in = len(inputs)
        # pointer sources: 0 .. n_in - 1 the inputs, then the allocations, then constants
        self._consts = []

        def source(x):
            ptr = x.data.ptr
            if ptr in given:
                return given[ptr], 0
            j = self._buffer_of(x, buffers)
            if j is not None:
                g, off = where[j]
                return n_in + g, off + ptr - buffers[j][0].data.ptr
            for d in _DUMMIES.values():
                if d.data.ptr <= ptr < d.data.ptr + _nbytes(d):
                    self._consts.append(ptr)
                    return n_in + len(self._groups) + len(self._consts) - 1, 0
            raise _NotReplayable  # an array from elsewhere

        self._steps = []
        for step in steps:
            if step[0] == "alloc":
                x, zero = step[1], step[2]
                if zero:
                    self._steps.append((None, source(x), _nbytes(x)))
                continue
            _, raw, grid, block, args = step
            arrays = [args[i] for i in raw._arrays]
            self._steps.append((raw.bind(grid, block, args), [source(a) for a in arrays], 0))
        # per kept result's index: ("value", it), ("array", spec) or ("tuple", type, fields)
        self._results = {}
        for r, item in kept.items():
            if isinstance(item, tuple):  # (a NamedTuple: its arrays rebuilt, the rest kept)
                self._results[r] = ("tuple", type(item), [
                    ("array", self._spec(f, buffers, where)) if _is_array(f) else ("value", f)
                    for f in item])
            elif _is_array(item):
                self._results[r] = ("array", self._spec(item, buffers, where))
            else:
                self._results[r] = ("value", item)
        self.source, self._run = self._compile(n_in)

    @staticmethod
    def _buffer_of(x, buffers):
        ptr = x.data.ptr
        for j, (b, _) in enumerate(buffers):
            if b.data.ptr <= ptr < b.data.ptr + max(_nbytes(b), 1):
                return j
        return None

    @staticmethod
    def _spec(x, buffers, where):
        contiguous = getattr(x, "_c_contiguous", None)
        if contiguous is None:
            contiguous = x.flags.c_contiguous
        if not contiguous:
            raise _NotReplayable
        j = Replay._buffer_of(x, buffers)
        g, off = where[j]
        return g, off + x.data.ptr - buffers[j][0].data.ptr, x.shape, x.dtype

    def __call__(self, ptrs):
        """The call's result for inputs at data pointers ``ptrs`` (in the order of
        :func:`record`'s ``inputs``; 0 where absent), launched on CuPy's current
        stream."""
        return self._run(ptrs)

    def _compile(self, n_in):
        """The replay as one Python function of ``ptrs`` with every offset, size,
        slot and launch configuration written in as a constant (what Python's
        own ``namedtuple`` does): it allocates, zeroes, writes each launch's
        data pointers into its slots and calls the driver, with no loop over
        the recorded steps left to run.  Returns ``(source, function)``."""
        names = {"alloc": self._alloc, "stream": self._stream, "memset": self._memset,
                 "ndarray": self._ndarray, "lock": threading.Lock()}
        if self._new_init is not None:
            names["new"], names["init"] = self._new_init

        def name(value, prefix):
            key = f"{prefix}{len(names)}"
            names[key] = value
            return key

        def pointer(i, off):
            if i < n_in:
                return f"ptrs[{i}]"
            g = i - n_in
            if g < len(self._groups):
                return f"a{g} + {off}" if off else f"a{g}"
            return hex(self._consts[g - len(self._groups)])  # (a cached dummy's address)

        lines = ["def replay(ptrs):"]
        for g, nbytes in enumerate(self._groups):
            lines.append(f"    m{g} = alloc({nbytes})")
            lines.append(f"    a{g} = m{g}.ptr")
        lines.append("    s = stream().ptr")
        # (the launches' slots are this replay's own, see :meth:`RawLaunch.bind`:
        # one lock keeps two threads from writing them at once)
        lines.append("    with lock:")
        for bound, sources, nbytes in self._steps:
            if bound is None:
                lines.append(f"        memset({pointer(*sources)}, 0, {nbytes}, s)")
                continue
            name(bound, "bound")  # (keeps the slots and the driver's pointers to them)
            slots = name(bound._slots, "slots")
            for slot, source in zip(bound._data_slots, sources):
                lines.append(f"        {slots}[{slot}] = {pointer(*source)}")
            lines.append(f"        {name(bound._launch, 'launch')}({bound._function:#x}, "
                         f"{bound._grid}, 1, 1, {bound._block}, 1, 1, 0, s, "
                         f"{bound._pointers.buffer_info()[0]:#x}, 0)")

        def result(r):
            if r[0] == "array":
                g, off, shape, dtype = r[1]
                mem = f"m{g} + {off}" if off else f"m{g}"
                dtype = name(dtype, "dtype")
                if self._new_init is None:
                    return f"ndarray({shape!r}, {dtype}, memptr={mem})"
                array = f"r{len(lines)}"
                lines.append(f"    {array} = new(ndarray)")
                lines.append(f"    init({array}, {shape!r}, {dtype}, {mem})")
                return array
            if r[0] == "tuple":
                return f"{name(r[1], 'kind')}({', '.join(result(f) for f in r[2])})"
            return name(r[1], "value")

        results = [result(self._results[r]) if r in self._results else "None"
                   for r in range(self._n_results)]
        lines.append(f"    return ({', '.join(results)},)")
        source = "\n".join(lines) + "\n"
        exec(compile(source, f"<replay {id(self):#x}>", "exec"), names)
        return source, names["replay"]


watch_settings(__name__)
