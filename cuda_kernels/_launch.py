"""The launch seam: every kernel of this package is compiled and launched here.

This is the one module of numba-mamba that reads private attributes of
numba-cuda or CuPy.  Everything else launches a kernel with :func:`launch`
and compiles one with :func:`compile_kernel`.

Two launch paths
----------------
*Raw* (:class:`RawLaunch`, the fast path, ``settings.raw_launch``): the
kernel's cubin, as Numba linked it, is loaded once per device into a CuPy
module, and each launch hands the CUDA driver (``cuLaunchKernel``) one
8-byte slot per kernel parameter, laid out as Numba's own launcher lays
them out.  It reads these internals of numba-cuda: the dispatcher's
``overloads`` (one compiled kernel), the kernel's ``argument_types``, its
code library (``library`` or ``_codelibrary``), the library's
``get_cubin()`` and entry name (``_entry_name``), and Numba's argument
layout of an array (``(meminfo, parent, nitems, itemsize, data, *shape,
*strides)``).  Of CuPy: a module loaded from an image
(``cupy.cuda.function.Module``), ``cupy.cuda.driver.launchKernel`` and,
where present, an array's ``_c_contiguous`` flag (else ``flags``).

*Numba* (:func:`numba_launch`): Numba's dispatcher launches the kernel on
CuPy's current stream (``cuda.external_stream``), each CuPy array handed
over as a view made by ``cuda.as_cuda_array(x, sync=False)``.  Given a CuPy
array itself, Numba would read its ``__cuda_array_interface__`` and
synchronize on the stream it names, which is illegal while a stream is
being captured into a CUDA graph; the views make no such call.  Public API
only.

Choosing
--------
The raw path is built once per kernel and device, at the kernel's first
launch on CuPy arrays; any failure to build it -- an internal missing or of
another type, or an argument layout that differs from the one assumed --
makes that kernel take the Numba path for the rest of the process
(:func:`launch_path` and :func:`fallback_reason` say which path a kernel
takes and why; the first fallback of a process warns once with
:class:`LaunchFallbackWarning`).  What is checked when building:

* the compiled kernel's argument types are C-contiguous arrays, integers of
  at most 8 bytes and float32/float64 only;
* Numba's data model of each array has the fields ``meminfo, parent,
  nitems, itemsize, data, shape, strides`` at positions 0..6, and the
  flattened parameter list Numba's argument packer computes for the
  signature has the kinds of values the slots hold (pointer, pointer,
  integer, integer, pointer, ``ndim`` integers, ``ndim`` integers per array;
  an integer or float of the argument's width per scalar);
* where the CUDA driver and ``cuda.bindings`` provide ``cuFuncGetParamInfo``
  (CUDA 12.4+), the loaded function has exactly as many parameters as slots,
  each of the size the slot's value has.

What cannot be detected at build time: the *meaning* of fields of the same
type and width (``nitems`` against ``itemsize``, ``meminfo`` against
``parent``, shape against strides): the GPU tests compare the two paths'
results (``tests/test_gpu_launch.py``); and a change in what the
kernel does with a field that Numba's launcher fills differently (say, a
non-zero ``meminfo``).

Compiling
---------
:func:`compile_kernel` compiles a kernel body for one signature with
Numba's disk cache on (``cache=True``), so a second process loads the
compiled kernel instead of compiling it again; a cached kernel carries its
cubin, which the raw path loads.  Numba keys a cached kernel on the body's
bytecode, the values its closure holds (the device functions and the dtype
constants of the factories, pickled by value) and the signature, but not on
the ``cuda.jit`` options (``launch_bounds``, ``fastmath``, ...) nor on the
source of module-level functions a body calls: so the cache entries of a
kernel are filed under a name that adds a digest of the options and of the
kernel modules' source files (:func:`_cache_tag`).  A kernel body reads its
tunables through its factory's closure (as every factory here does), never
as module globals, which the cache does not see.  Where Numba cannot cache a
kernel (no writable cache folder, a closure it cannot pickle), it is
compiled without the cache, silently (:func:`cache_refusals` lists them).
Environment ``NUMBA_MAMBA_KERNEL_CACHE=0`` compiles every kernel without it.
"""

import array
import functools
import hashlib
import operator
import os
import pathlib
import struct
import threading
import types
import warnings

import numba
import numpy as np

try:  # numba.cuda as numba-cuda provides it (the cuda12/cuda13 extras), not numba's own
    import numba_cuda  # noqa: F401
    from numba import cuda
except ImportError as _exc:
    from numba_mamba._validation import missing_gpu_stack_message as _message

    raise ImportError(f"{_message} ({_exc})", name=__name__) from _exc

from .settings import settings

__all__ = ["BoundLaunch", "KERNEL_CACHE", "LaunchFallbackWarning", "RawLaunch", "c_strided",
           "cache_refusals",
           "check_argument_layout", "compile_kernel", "contiguity_reader", "contiguous",
           "fallback_reason", "launch", "launch_path", "layout_key", "numba_launch",
           "prepare_launch"]


class LaunchFallbackWarning(RuntimeWarning):
    """The raw launch path could not be built for a kernel, which launches
    through Numba instead (issued once per process)."""


def _simulator():
    return bool(numba.config.ENABLE_CUDASIM)


# ------------------------------------------------------------------ compiling
_KERNEL_SOURCES = pathlib.Path(__file__).resolve().parent


@functools.lru_cache(maxsize=1)
def _source_digest():
    """A digest of the kernel modules' source files (``*.py`` of this folder)
    and of the package modules whose functions some kernels compile as device
    functions (``numba_mamba/_cpu_*.py`` and ``numba_mamba/_math.py``: one
    source of the step and elementwise arithmetic)."""
    import numba_mamba

    cpu = pathlib.Path(numba_mamba.__file__).resolve().parent
    h = hashlib.sha256()
    shared = sorted(cpu.glob("_cpu_*.py")) + [cpu / "_math.py"]
    for path in sorted(_KERNEL_SOURCES.glob("*.py")) + shared:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _cache_tag(options):
    """12 hex digits naming the cache entries of a kernel compiled with
    ``options``: a digest of the options and of the kernel modules' sources."""
    h = hashlib.sha256(_source_digest().encode())
    h.update(repr(sorted(options.items())).encode())
    return h.hexdigest()[:12]


def _tagged(py_func, tag):
    """A copy of ``py_func`` (same code, globals, closure) whose qualified
    name ends with ``tag``: Numba names a kernel's cache files after it."""
    f = types.FunctionType(py_func.__code__, py_func.__globals__, py_func.__name__,
                           py_func.__defaults__, py_func.__closure__)
    f.__kwdefaults__ = py_func.__kwdefaults__
    f.__qualname__ = f"{py_func.__qualname__}-{tag}"
    f.__module__ = py_func.__module__
    f.__doc__ = py_func.__doc__
    return f


_CACHE_REFUSED = {}  # qualified name -> why Numba would not cache it

#: Compile kernels with Numba's disk cache by default; environment
#: ``NUMBA_MAMBA_KERNEL_CACHE=0`` (read at import) turns it off.
KERNEL_CACHE = os.environ.get("NUMBA_MAMBA_KERNEL_CACHE", "1") != "0"


def cache_refusals():
    """``{kernel's qualified name: reason}`` of the kernels this process
    compiled without the disk cache because Numba refused to cache them."""
    return dict(_CACHE_REFUSED)


def compile_kernel(py_func, signature=None, cache=None, **options):
    """``cuda.jit(signature, cache=cache, **options)(py_func)``, with the
    disk cache where Numba allows it.

    Parameters
    ----------
    py_func : function
        The kernel's Python body (a closure of a kernel factory, typically).
    signature : numba signature or None
        ``types.void(*argtypes)``: compiled now (the raw launch path needs
        exactly one compiled signature).  None: a lazily compiled dispatcher,
        not cached.  Under the CUDA simulator the body is handed to its
        ``cuda.jit`` as it is (no options, nothing cached).
    cache : bool, optional
        Use Numba's disk cache (``NUMBA_CACHE_DIR`` or Numba's default
        folder); default :data:`KERNEL_CACHE`.  A kernel Numba cannot cache
        is compiled without it, once and silently (see :func:`cache_refusals`).
    **options
        Other keywords of ``cuda.jit`` (``launch_bounds``, ``fastmath``...).

    Returns
    -------
    dispatcher
        A Numba CUDA dispatcher (under the simulator its stand-in).

    Examples
    --------
    >>> import numpy as np
    >>> from numba import cuda, types
    >>> from numba_mamba.cuda_kernels._launch import compile_kernel
    >>> def body(x, out):
    ...     i = cuda.grid(1)
    ...     if i < x.shape[0]:
    ...         out[i] = x[i]
    >>> a1 = types.float32[::1]
    >>> if cuda.is_available():  # compiles (or loads from the cache) on a GPU
    ...     copy = compile_kernel(body, types.void(a1, a1), launch_bounds=(128,))
    """
    if _simulator():  # (the simulator runs the body as Python: nothing to compile)
        return cuda.jit(py_func)
    if signature is None:
        return cuda.jit(**options)(py_func)
    if KERNEL_CACHE if cache is None else cache:
        tagged = _tagged(py_func, _cache_tag(options))
        try:
            return cuda.jit(signature, cache=True, **options)(tagged)
        except Exception as e:  # noqa: BLE001 (no locator, an unpicklable closure...)
            if not _cache_refused(e):
                raise
            _CACHE_REFUSED[tagged.__qualname__] = f"{type(e).__name__}: {e}"
    return cuda.jit(signature, **options)(py_func)


def _cache_refused(e):
    """Whether ``e``, raised compiling with ``cache=True``, is Numba refusing
    to cache (rather than an error in the kernel, which compiling without the
    cache would raise again)."""
    import pickle

    text = str(e)
    return (isinstance(e, (pickle.PicklingError, OSError))
            or "cannot cache" in text or "pickle" in text.lower())


# ------------------------------------------------------------- layout checks
#: Fields of Numba's data model of an array, in the order of its parameters.
_ARRAY_FIELDS = ("meminfo", "parent", "nitems", "itemsize", "data", "shape", "strides")
_FLOAT32, _FLOAT64 = -1, -2  # argument kinds of RawLaunch (> 0: an array's ndim; 0: an int)


def _argument_kinds(argtypes):
    """RawLaunch's kind of each argument type, or TypeError."""
    from numba.core import types as nbtypes

    kinds = []
    for ty in argtypes:
        if isinstance(ty, nbtypes.Array) and ty.layout == "C" and ty.ndim > 0:
            kinds.append(ty.ndim)
        elif isinstance(ty, nbtypes.Integer) and ty.bitwidth <= 64:
            kinds.append(0)
        elif isinstance(ty, nbtypes.Float) and ty.bitwidth in (32, 64):
            kinds.append(_FLOAT32 if ty.bitwidth == 32 else _FLOAT64)
        else:
            raise TypeError(f"RawLaunch takes C arrays, integers and floats, got {ty}")
    return kinds


def _slot_sizes(argtypes, kinds):
    """Bytes the driver reads of each slot: 8 per array field, a scalar's width."""
    sizes = []
    for ty, kind in zip(argtypes, kinds):
        if kind > 0:
            sizes += [8] * (5 + 2 * kind)
        else:
            sizes.append(ty.bitwidth // 8)
    return sizes


def check_argument_layout(argtypes, target_context):
    """Check that Numba lays out ``argtypes`` as :class:`RawLaunch` writes its
    slots; ValueError saying what differs where it does not.

    Reads the data model of each array type (field positions) and the
    flattened parameter list of Numba's argument packer for the signature.

    Examples
    --------
    >>> from numba.core import types
    >>> from numba.cuda.descriptor import cuda_target
    >>> from numba_mamba.cuda_kernels._launch import check_argument_layout
    >>> check_argument_layout((types.float32[:, ::1], types.int32), cuda_target.target_context)
    """
    from llvmlite import ir

    kinds = _argument_kinds(argtypes)
    expected = []  # per flattened parameter: ("ptr",) or ("int", bits) or ("float", bits)
    for ty, kind in zip(argtypes, kinds):
        if kind > 0:
            model = target_context.data_model_manager.lookup(ty)
            positions = tuple(model.get_field_position(f) for f in _ARRAY_FIELDS)
            if positions != tuple(range(len(_ARRAY_FIELDS))):
                raise ValueError(f"Numba's array model of {ty} has fields {_ARRAY_FIELDS} at "
                                 f"positions {positions}, expected 0..{len(_ARRAY_FIELDS) - 1}")
            expected += [("ptr",), ("ptr",), ("int", 64), ("int", 64), ("ptr",)]
            expected += [("int", 64)] * (2 * kind)
        elif kind == 0:
            expected.append(("int", ty.bitwidth))
        else:
            expected.append(("float", 32 if kind == _FLOAT32 else 64))
    got = []
    for t in target_context.get_arg_packer(list(argtypes)).argument_types:
        if isinstance(t, ir.PointerType):
            got.append(("ptr",))
        elif isinstance(t, ir.IntType):
            got.append(("int", t.width))
        elif isinstance(t, ir.FloatType):
            got.append(("float", 32))
        elif isinstance(t, ir.DoubleType):
            got.append(("float", 64))
        else:
            got.append((str(t),))
    if got != expected:
        raise ValueError(f"Numba flattens the arguments {tuple(map(str, argtypes))} into "
                         f"parameters {got}, RawLaunch would write {expected}")


def _param_sizes(function_ptr, limit):
    """Bytes of each parameter of the loaded function at ``function_ptr`` (at
    most ``limit`` of them) as the driver reports them (``cuFuncGetParamInfo``,
    CUDA 12.4+), or None where it cannot say."""
    try:
        from cuda.bindings import driver

        fn = driver.CUfunction(function_ptr)
        sizes = []
        for i in range(limit):
            err, _offset, size = driver.cuFuncGetParamInfo(fn, i)
            if err != driver.CUresult.CUDA_SUCCESS:
                if i == 0 or err != driver.CUresult.CUDA_ERROR_INVALID_VALUE:
                    return None  # (not supported; or a function without parameters)
                break
            sizes.append(int(size))
        return sizes
    except Exception:  # noqa: BLE001 (no cuda.bindings, or a driver without the call)
        return None


def _check_param_info(function_ptr, sizes):
    """Where the driver says, check that the loaded function takes
    ``len(sizes)`` parameters of these sizes; ValueError if not."""
    got = _param_sizes(function_ptr, len(sizes) + 1)
    if got is not None and got != list(sizes):
        raise ValueError(f"the loaded kernel takes parameters of {got} bytes, "
                         f"RawLaunch would pass {list(sizes)}")


# ------------------------------------------------ contiguity and layout keys
#: Readers of an array's C-contiguity and of its layout key
#: ``(shape, itemsize, C-contiguous)``: through the public flag, which CuPy
#: builds a ``flags`` object for per read, and through CuPy's private one.
_PUBLIC = (operator.attrgetter("flags.c_contiguous"),
           operator.attrgetter("shape", "itemsize", "flags.c_contiguous"))
_PRIVATE = (operator.attrgetter("_c_contiguous"),
            operator.attrgetter("shape", "itemsize", "_c_contiguous"))


def _probes(cls):
    """Arrays of type ``cls``, C-contiguous and not, on which a private flag
    is compared with the public one: a few CuPy arrays for CuPy's ndarray,
    none for other types (which read the public flag)."""
    if not (cls.__module__.split(".")[0] == "cupy" and cls.__name__ == "ndarray"):
        return []
    import cupy

    a = cupy.empty((3, 4), np.float32)
    if type(a) is not cls:
        return []
    return [a, a.T, a[:, ::2], a[1:], a[:, None], cupy.empty((1, 4), np.float32)[:, ::2],
            cupy.empty((0, 2), np.float32), cupy.broadcast_to(a[:1], (3, 4))]


def _choose_readers(cls):
    """:data:`_PRIVATE` where arrays of ``cls`` carry a bool ``_c_contiguous``
    that equals ``flags.c_contiguous`` on every probe of :func:`_probes` (and
    the probes hold both answers), else :data:`_PUBLIC`."""
    try:
        answers = set()
        for p in _probes(cls):
            fast = p._c_contiguous
            if type(fast) is not bool or fast != bool(p.flags.c_contiguous):
                return _PUBLIC
            answers.add(fast)
        if answers == {True, False}:
            return _PRIVATE
    except Exception:  # noqa: BLE001 (no such attribute, no CuPy, no device...)
        pass
    return _PUBLIC


_READERS = {}  # array type -> _PUBLIC or _PRIVATE


def _readers(cls):
    readers = _READERS.get(cls)
    if readers is None:
        readers = _READERS[cls] = _choose_readers(cls)
    return readers


def contiguity_reader(cls):
    """The function that tells whether an array of type ``cls`` is
    C-contiguous: a read of CuPy's private ``_c_contiguous`` flag where it was
    checked, once per type, to agree with the public ``flags.c_contiguous``
    on a few arrays, else a read of the public flag.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_mamba.cuda_kernels._launch import contiguity_reader
    >>> read = contiguity_reader(np.ndarray)  # (the public flag: no probes for NumPy)
    >>> read(np.zeros((2, 3))), read(np.zeros((2, 3)).T)
    (True, False)
    """
    return _readers(cls)[0]


def contiguous(x):
    """Whether array ``x`` is C-contiguous (see :func:`contiguity_reader`).

    Examples
    --------
    >>> import numpy as np
    >>> from numba_mamba.cuda_kernels._launch import contiguous
    >>> contiguous(np.zeros((2, 3))), contiguous(np.zeros((2, 3))[:, ::2])
    (True, False)
    """
    readers = _READERS.get(type(x)) or _readers(type(x))
    return readers[0](x)


def layout_key(arrays):
    """``((shape, itemsize, C-contiguous), ...)`` of ``arrays``: the key of
    :class:`RawLaunch`'s bound launches (C-contiguity read as
    :func:`contiguous` reads it).

    Examples
    --------
    >>> import numpy as np
    >>> from numba_mamba.cuda_kernels._launch import layout_key
    >>> layout_key([np.zeros((2, 3), np.float32), np.zeros(4)[::2]])
    (((2, 3), 4, True), ((2,), 8, False))
    """
    kinds = set(map(type, arrays))
    if len(kinds) == 1:
        (cls,) = kinds
        readers = _READERS.get(cls) or _readers(cls)
        return tuple(map(readers[1], arrays))
    return tuple([_readers(type(a))[1](a) for a in arrays])


def _picker(indices):
    """A function of a sequence returning the tuple of its items at ``indices``."""
    if len(indices) == 1:
        (i,) = indices
        return lambda args: (args[i],)
    if not indices:
        return lambda args: ()
    return operator.itemgetter(*indices)


# -------------------------------------------------------------- the raw path
class RawLaunch:
    """Launch one compiled Numba kernel through the CUDA driver, as CuPy does.

    Numba's dispatcher spends tens of microseconds per launch and more per
    CuPy array argument (it wraps each one as a Numba device array), and
    CuPy's own ``Function.__call__`` a microsecond or two per argument (each
    becomes a ctypes object).  This loads the kernel's cubin, as Numba linked
    it, into a CuPy module once and, per launch, writes the kernel's
    parameters as Numba's launcher lays them out -- an array of ``ndim``
    dimensions as ``(meminfo, parent, size, itemsize, data, *shape,
    *strides)``, an integer or a float by value -- into one 8-byte slot each
    of a buffer kept with the launcher, and hands the driver
    (``cuLaunchKernel``) a pointer per slot.

    Only the data pointers change between launches of one layout: each layout
    (the arrays' shapes and itemsizes, the scalars' values, grid and block)
    gets its :class:`BoundLaunch`, slots and all, so a launch of a layout seen
    before writes just the pointers.

    Building one checks the argument layout (see the module docstring) and
    raises where anything it reads is missing or differs; :func:`launch`
    then takes the Numba path for that kernel.

    Parameters
    ----------
    dispatcher : numba.cuda dispatcher
        Compiled for exactly one signature (``cuda.jit(signature)``), with
        C-contiguous array, integer (at most 8 bytes) and float32/float64
        arguments only.
    """

    def __init__(self, dispatcher):
        import cupy

        (kernel,) = dispatcher.overloads.values()
        argtypes = tuple(kernel.argument_types)
        self._ndims = _argument_kinds(argtypes)
        target_context = getattr(dispatcher, "targetctx", None)
        if target_context is None:
            from numba.cuda.descriptor import cuda_target

            target_context = cuda_target.target_context
        check_argument_layout(argtypes, target_context)
        lib = getattr(kernel, "library", None)
        if lib is None:
            lib = kernel._codelibrary
        entry = lib._entry_name
        if not isinstance(entry, str) or not entry:
            raise TypeError(f"expected the kernel's entry name as a str, got {entry!r}")
        image = lib.get_cubin()
        image = getattr(image, "code", image)  # numba-cuda on cuda.core: an ObjectCode
        if not isinstance(image, bytes):
            raise TypeError(f"expected the kernel's cubin as bytes, got {type(image).__name__}")
        self._module = cupy.cuda.function.Module()
        self._module.load(image)
        self._function = self._module.get_function(entry)
        sizes = _slot_sizes(argtypes, self._ndims)
        _check_param_info(self._function.ptr, sizes)
        self._init_slots(len(sizes), cupy.cuda.driver.launchKernel)

    def _init_slots(self, n_slots, launch_kernel):
        self._n_slots = n_slots
        self._launch = launch_kernel
        self._bound = {}  # (layout, grid, block) -> BoundLaunch
        self._arrays = [i for i, ndim in enumerate(self._ndims) if ndim > 0]
        self._scalars = [i for i, ndim in enumerate(self._ndims) if ndim <= 0]
        # (argument, slot) of each data pointer: (meminfo, parent, size, itemsize, data, ...)
        where = []
        slot = 0
        for i, ndim in enumerate(self._ndims):
            if ndim > 0:
                where.append((i, slot + 4))
                slot += 5 + 2 * ndim
            else:
                slot += 1
        self._data_slots = tuple(where)
        self._pick_arrays = _picker(self._arrays)
        self._pick_scalars = _picker(self._scalars)

    def _check(self, args):
        """Raise ValueError unless every array of ``args`` is C-contiguous and
        of the kernel's rank."""
        ndims = self._ndims
        for i in self._arrays:
            a = args[i]
            if len(a.shape) != ndims[i] or not contiguous(a):
                raise ValueError(f"expected a C-contiguous array of {ndims[i]} dimensions, "
                                 f"got shape {a.shape}, strides {a.strides}")

    def params(self, args):
        """The kernel's parameter values for ``args``, one int per 8-byte slot."""
        values = []
        for ndim, value in zip(self._ndims, args):
            if ndim > 0:
                key = (value.shape, value.itemsize)
                meta = _ARRAY_META.get(key)
                if meta is None:
                    meta = _ARRAY_META[key] = _array_meta(*key)
                if len(value.shape) != ndim or not contiguous(value):
                    raise ValueError(f"expected a C-contiguous array of {ndim} dimensions, "
                                     f"got shape {value.shape}, strides {value.strides}")
                values += meta[0]
                values.append(value.data.ptr)
                values += meta[1]
            elif ndim == 0:
                values.append(int(value) & _SLOT_MASK)  # two's complement, low bytes first
            else:  # a float's bits in the slot's low bytes
                code = "<f" if ndim == _FLOAT32 else "<d"
                values.append(int.from_bytes(struct.pack(code, value), "little"))
        return values

    def __call__(self, grid, block, stream, args):
        """Launch on CuPy arrays ``args`` (C-contiguous) on ``stream`` (a CuPy stream)."""
        if len(args) != len(self._ndims):
            raise ValueError(f"expected {len(self._ndims)} arguments, got {len(args)}")
        arrays = self._pick_arrays(args)
        # (the key holds each array's C-contiguity: a layout is bound, and so
        # checked, only where every array is C-contiguous and of the kernel's rank)
        scalars = self._pick_scalars(args)
        # (scalars by type and value: 1, 1.0 and np.float32(1) differ in their bits)
        key = (layout_key(arrays), scalars, tuple(map(type, scalars)), grid, block)
        bound = self._bound.get(key)
        if bound is None:
            if len(self._bound) >= _MAX_LAYOUTS:
                self._bound.clear()
            bound = self._bound[key] = self.bind(grid, block, args)
        bound(stream.ptr, [a.data.ptr for a in arrays])

    def bind(self, grid, block, args):
        """A :class:`BoundLaunch` of this kernel on ``grid`` x ``block`` threads,
        with the parameter slots of ``args`` but the arrays' data pointers, which
        each of its calls passes."""
        if len(args) != len(self._ndims):
            raise ValueError(f"expected {len(self._ndims)} arguments, got {len(args)}")
        self._check(args)
        values = self.params(args)
        if len(values) != self._n_slots:
            raise ValueError(f"expected {self._n_slots} parameter slots, got {len(values)}")
        return BoundLaunch(self._function.ptr, int(grid), int(block), values,
                           [slot for _, slot in self._data_slots], self._launch)


class BoundLaunch:
    """One kernel's launch prepared by :meth:`RawLaunch.bind`: its own slots,
    all filled but the data pointers, and the driver's pointers to them."""

    def __init__(self, function, grid, block, values, data_slots, launch_kernel):
        self._slots = array.array("Q", values)
        first = self._slots.buffer_info()[0]
        self._pointers = array.array("Q", range(first, first + 8 * len(values), 8))
        self._data_slots = data_slots
        self._function, self._grid, self._block = function, grid, block
        self._launch = launch_kernel
        self._lock = threading.Lock()

    def __call__(self, stream, ptrs):
        """Launch on the arrays at data pointers ``ptrs`` (one per array
        parameter, in order) on the stream whose handle is ``stream``."""
        slots = self._slots
        with self._lock:
            for slot, ptr in zip(self._data_slots, ptrs):
                slots[slot] = ptr
            self._launch(self._function, self._grid, 1, 1, self._block, 1, 1, 0, stream,
                         self._pointers.buffer_info()[0], 0)


_ARRAY_META = {}
_MAX_LAYOUTS = 256  # layouts a launcher keeps (then it starts again)
_SLOT_MASK = (1 << 64) - 1


def _array_meta(shape, itemsize):
    """An array's parameter slots around its data pointer: ``(meminfo, parent,
    size, itemsize)`` and ``(*shape, *C strides)``."""
    size = 1
    for s in shape:
        size *= s
    strides = []
    stride = itemsize
    for s in reversed(shape):  # C strides: Numba's kernels index by them
        strides.append(stride)
        stride *= s
    return (0, 0, size, itemsize), tuple(shape) + tuple(reversed(strides))


# -------------------------------------------------------------- the Numba path
def c_strided(x):
    """``x`` (C-contiguous) viewed with exactly C strides.

    NumPy and CuPy call an array with a zero stride on a length-1 axis (as
    ``B[:, None]`` makes) C-contiguous, Numba does not, and the kernels are
    compiled for C-contiguous arrays only.  Scalars and NumPy arrays (the
    simulator, which checks no types) pass through.
    """
    if isinstance(x, np.ndarray) or not hasattr(x, "strides"):
        return x
    stride = x.itemsize
    for size, s in zip(reversed(x.shape), reversed(x.strides)):
        if s != stride:
            import cupy

            return cupy.ndarray(x.shape, x.dtype, x.data)
        stride *= size
    return x


_STREAMS = {}  # (device, CuPy stream handle) -> Numba's external stream of it


def _numba_stream(device, handle):
    stream = _STREAMS.get((device, handle))
    if stream is None:
        if len(_STREAMS) >= _MAX_LAYOUTS:
            _STREAMS.clear()
        stream = _STREAMS[(device, handle)] = cuda.external_stream(handle)
    return stream


def numba_launch(kernel, grid, block, args):
    """Launch ``kernel`` through Numba's dispatcher on CuPy's current stream,
    each CuPy array as a ``cuda.as_cuda_array(x, sync=False)`` view (so no
    synchronization: safe while the stream is captured into a CUDA graph)."""
    import cupy

    stream = _numba_stream(cupy.cuda.runtime.getDevice(), cupy.cuda.get_current_stream().ptr)
    views = [cuda.as_cuda_array(c_strided(a), sync=False)
             if hasattr(a, "__cuda_array_interface__") else a for a in args]
    kernel[grid, block, stream](*views)


# ------------------------------------------------------------------ launching
_RAW = {}  # (kernel, device) -> RawLaunch, or None where it could not be built
_WHY = {}  # (kernel, device) -> why the raw path could not be built
_WARNED = []


def _build(kernel, key):
    try:
        raw = RawLaunch(kernel)
    except Exception as e:  # noqa: BLE001 (any failure: Numba's launch it is)
        raw = None
        _WHY[key] = f"{type(e).__name__}: {e}"
        if not _WARNED:
            _WARNED.append(key)
            warnings.warn(f"numba-mamba launches {getattr(kernel, '__name__', kernel)} (and any "
                          f"other kernel whose fast launch path cannot be built) through Numba: "
                          f"{_WHY[key]}", LaunchFallbackWarning, stacklevel=3)
    _RAW[key] = raw
    return raw


def _current_device():
    import cupy

    return cupy.cuda.runtime.getDevice()


def launch_path(kernel, device=None):
    """``'raw'`` or ``'numba'``: the path :func:`launch` takes for ``kernel``
    on CuPy arrays on ``device`` (the current one by default), building the
    raw path if that has not been tried yet; ``'numba'`` as well where
    ``settings.raw_launch`` is off."""
    if not settings.raw_launch:
        return "numba"
    key = (kernel, _current_device() if device is None else device)
    raw = _RAW[key] if key in _RAW else _build(kernel, key)
    return "numba" if raw is None else "raw"


def fallback_reason(kernel, device=None):
    """Why ``kernel`` launches through Numba on ``device`` (the current one by
    default) although ``settings.raw_launch`` is on, or None where it does not
    (or the raw path has not been tried yet)."""
    return _WHY.get((kernel, _current_device() if device is None else device))


def launch(kernel, grid, block, stream, args):
    """Launch ``kernel[grid, block, stream](*args)``.

    On CuPy arrays on CuPy's current stream: through :class:`RawLaunch`
    where ``settings.raw_launch`` is on and the raw path could be built for
    the kernel, else through :func:`numba_launch` (``stream`` is not used).
    On NumPy arrays (the CUDA simulator) through Numba's dispatcher on
    ``stream``: a Numba stream, None (the default stream) or ``"current"``
    (None there).
    """
    if not isinstance(args[0], np.ndarray) and not _simulator():
        import cupy

        if settings.raw_launch:
            key = (kernel, cupy.cuda.runtime.getDevice())  # a module per device
            raw = _RAW[key] if key in _RAW else _build(kernel, key)
            if raw is not None:
                raw(grid, block, cupy.cuda.get_current_stream(), args)
                return
        numba_launch(kernel, grid, block, args)
        return
    if isinstance(stream, str) and stream == "current":
        stream = None
    args = [c_strided(a) for a in args]
    if stream is None:
        kernel[grid, block](*args)
    else:
        kernel[grid, block, stream](*args)


def _is_scalar(a):
    return isinstance(a, (int, float, np.generic))


def prepare_launch(kernel, grid, block, args):
    """A launch of ``kernel`` on ``grid`` x ``block`` threads prepared once
    for the layout of ``args`` (as :func:`launch` takes them): a function of
    the list of the array arguments alone, in their order in ``args``.

    Each later call launches on CuPy's current stream with the scalars of
    ``args`` and the given arrays, which must have the layout of those in
    ``args`` -- the same number of bytes, C-contiguous, the same item size --
    but may differ in shape and dtype: on the raw path only their data
    pointers are read; on the Numba path (and in the simulator) each is
    viewed with the shape and dtype of its counterpart in ``args``.  This is
    unchecked: a caller keys its prepared launches on what fixes the layout
    (a launcher's per-layout plan, :mod:`.scan_states`).  The path is chosen
    when preparing, as :func:`launch` chooses it (and falls back to Numba's
    launch where the raw path cannot be built); the prepared launch holds no
    reference to the arrays of ``args``.  ``tests/test_launch.py`` runs it in
    the simulator and on the GPU on both paths.
    """
    where = [i for i, a in enumerate(args) if not _is_scalar(a)]
    views = [(args[i].shape, args[i].dtype) for i in where]
    template = list(args)
    for i in where:
        template[i] = None  # (no reference kept)

    def filled(arrays):
        full = list(template)
        for i, (shape, dtype), a in zip(where, views, arrays):
            if a.dtype != dtype:
                a = a.view(dtype)
            full[i] = a.reshape(shape) if a.shape != shape else a
        return full

    if isinstance(args[where[0]], np.ndarray) or _simulator():
        return lambda arrays: launch(kernel, grid, block, None, filled(arrays))
    import cupy

    raw = None
    if settings.raw_launch:
        key = (kernel, cupy.cuda.runtime.getDevice())
        raw = _RAW[key] if key in _RAW else _build(kernel, key)
    if raw is None:
        return lambda arrays: numba_launch(kernel, grid, block, filled(arrays))
    if [i for i, _ in raw._data_slots] != where:
        raise ValueError(f"expected the arrays at {[i for i, _ in raw._data_slots]} of the "
                         f"kernel's arguments, got arrays at {where}")
    bound = raw.bind(grid, block, args)
    current = cupy.cuda.get_current_stream

    def go(arrays):
        bound(current().ptr, [a.data.ptr for a in arrays])

    return go
