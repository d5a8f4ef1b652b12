"""Matrix products on CuPy arrays through cuBLAS, capturable into CUDA graphs.

CuPy refuses every cuBLAS call while a stream is being captured (its
``setStream`` wrapper raises), so a step holding a CuPy matmul cannot become a
CUDA graph.  cuBLAS itself supports capture (its "CUDA Graphs Support"
section): the handle needs a workspace owned by the caller
(``cublasSetWorkspace``) and the stream set on the handle.  This module calls
cuBLAS's C API through :mod:`ctypes` on a handle of its own -- one per thread
and device, each with a 32 MiB workspace (cuBLAS's recommendation for Hopper,
above the 4 MiB it recommends for older GPUs) -- setting CuPy's current stream
before each GEMM.  The default math mode is kept (no TF32), as in CuPy.

Row-major ``C = A @ B`` is column-major ``C^T = B^T A^T``: cuBLAS's first
operand is our ``b`` and its second our ``a``.  A row-major operand with
strides ``(ld, 1)`` is, read column-major, its own transpose with leading
dimension ``ld`` (no transpose flag); a transposed view, strides ``(1, ld)``,
takes the flag.  :func:`gemm_plan` holds this index logic and needs no GPU.

The library is found with ``cuda.pathfinder.load_nvidia_dynamic_lib`` (or,
where that fails, as the cuBLAS CuPy itself loaded);
:func:`available` says whether it and every symbol used were found and
:func:`unavailable_reason` why not.

Tuning.  cuBLAS's own heuristic picks small tiles for some batched products
(the Mamba block's channels-first GEMMs among them).  Where cuBLASLt is found
too, the first eager call of a large enough GEMM shape (``settings.gemm_tuning``,
``gemm_tuning_min_flops``) times cuBLAS's call against the algorithms
cuBLASLt's heuristic proposes, on a scratch output, and the fastest serves every
later call of that shape in the process, captured ones included
(:func:`choices` lists them).  A shape first seen inside a capture, or any
cuBLASLt error, takes cuBLAS's own call.
"""

import ctypes
import functools
import threading
from typing import NamedTuple

import numpy as np

__all__ = ["GemmPlan", "available", "choices", "gemm_plan", "lt_layouts", "matmul",
           "sum_rows", "unavailable_reason"]

#: Bytes of the workspace given to each handle.
WORKSPACE_BYTES = 32 * 1024 * 1024

_OP_N, _OP_T = 0, 1  # cublasOperation_t
_POINTER_MODE_HOST = 0  # cublasPointerMode_t
_INT_MAX = 2**31 - 1

# cuBLASLt (cublasLt.h): dtype -> (cublasComputeType_t, cudaDataType_t), attribute ids
_LT_TYPES = {np.dtype(np.float32): (68, 0), np.dtype(np.float64): (70, 1)}
_LT_DESC_TRANSA, _LT_DESC_TRANSB = 3, 4
_LT_LAYOUT_BATCH_COUNT, _LT_LAYOUT_BATCH_OFFSET = 5, 6
_LT_PREF_MAX_WORKSPACE = 1
_LT_PREF_REDUCTION_SCHEME_MASK = 3
_LT_REDUCTIONS_NOT_INPLACE = 2 | 4  # split-K sums in the compute or output type, in workspace
_LT_CANDIDATES = 8  # algorithms asked of cuBLASLt's heuristic per shape
_TIMING_REPS = 3


class GemmPlan(NamedTuple):
    """Arguments of one column-major strided-batched GEMM computing ``a @ b``.

    ``first`` is cuBLAS's ``A`` (our ``b``), ``second`` its ``B`` (our ``a``);
    ``transa``/``transb`` are 0 (N) or 1 (T) for them; strides are in elements
    (0: the operand is shared by every batch); ``out_shape`` is the shape of
    the C-contiguous result, whose leading dimension is ``ldc``.
    """

    transa: int
    transb: int
    m: int
    n: int
    k: int
    lda: int
    ldb: int
    ldc: int
    stride_a: int
    stride_b: int
    stride_c: int
    batch: int
    out_shape: tuple


def _matrix(rows, cols, s_row, s_col):
    """``(trans, ld)`` of a row-major ``(rows, cols)`` operand with element
    strides ``(s_row, s_col)`` read column-major: ``(N, ld)`` for rows of
    stride ``ld`` (its transpose is stored), ``(T, ld)`` for columns of stride
    ``ld`` (a transposed view); None for other layouts."""
    if cols == 1 or s_col == 1:  # row-major: stored column-major as (cols, rows)
        ld = s_row if rows > 1 else max(cols, 1)
        if ld >= max(cols, 1):
            return _OP_N, ld
    if rows == 1 or s_row == 1:  # transposed view: stored column-major as (rows, cols)
        ld = s_col if cols > 1 else max(rows, 1)
        if ld >= max(rows, 1):
            return _OP_T, ld
    return None


def _collapse(shape, strides):
    """The one stride that walks the dims ``shape`` (row-major order) of an
    operand with these element strides, or None where no single stride does.
    Dims of size 1 are skipped; no dims (or all of size 1) give 0."""
    dims = [(n, s) for n, s in zip(shape, strides) if n != 1]
    if not dims:
        return 0
    for (_, s_outer), (n_inner, s_inner) in zip(dims, dims[1:]):
        if s_outer != s_inner * n_inner:
            return None
    return dims[-1][1]


@functools.lru_cache(maxsize=4096)
def gemm_plan(a_shape, a_strides, b_shape, b_strides):
    """cuBLAS arguments for ``a @ b`` with NumPy's matmul semantics, or None.

    Remembered per arguments (a pure function of them: a layout seen before
    costs a lookup).

    Parameters
    ----------
    a_shape, b_shape : tuple of int
        Shapes, each with at least 2 dims: ``(batch..., m, k)`` and
        ``(batch..., k, n)``; the batch dims broadcast as in NumPy.
    a_strides, b_strides : tuple of int
        Strides in elements (not bytes).

    Returns
    -------
    GemmPlan or None
        None where the layout needs a copy first (a matrix whose rows and
        columns both have strides other than 1, negative or overlapping
        strides, batch dims no single stride walks), the shapes do not match,
        or a size exceeds cuBLAS's 32-bit ints.  With ``a``'s batch dims
        collapsible onto its rows and ``b`` shared by every batch, the batch
        is folded into ``m`` (one GEMM, ``batch == 1``).

    Examples
    --------
    >>> from numba_mamba.cuda_kernels.blas import gemm_plan
    >>> p = gemm_plan((4, 3), (3, 1), (3, 5), (1, 3))  # x @ w.T, w of shape (5, 3)
    >>> p.transa, p.transb, p.m, p.n, p.k, p.lda, p.ldb, p.ldc, p.out_shape
    (1, 0, 5, 4, 3, 3, 3, 5, (4, 5))
    """
    if len(a_shape) < 2 or len(b_shape) < 2:
        return None
    m, k = a_shape[-2:]
    k_b, n = b_shape[-2:]
    if k != k_b:
        return None
    if min(a_strides) < 0 or min(b_strides) < 0:
        return None
    try:
        batch_shape = np.broadcast_shapes(tuple(a_shape[:-2]), tuple(b_shape[:-2]))
    except ValueError:
        return None
    out_shape = tuple(batch_shape) + (m, n)
    nb = len(batch_shape)

    def batch_strides(shape, strides):
        lead = (1,) * (nb - (len(shape) - 2)) + tuple(shape[:-2])
        st = (0,) * (nb - (len(shape) - 2)) + tuple(strides[:-2])
        return tuple(0 if n_dim == 1 else s for n_dim, s in zip(lead, st))

    sa, sb = batch_strides(a_shape, a_strides), batch_strides(b_shape, b_strides)
    batch = int(np.prod(batch_shape, dtype=np.int64)) if nb else 1
    b_mat = _matrix(k, n, b_strides[-2], b_strides[-1])
    if b_mat is None:
        return None
    a_mat = None
    if batch > 1 and _collapse(batch_shape, sb) == 0:  # b shared: fold a's batch into m
        s_rows = _collapse(tuple(batch_shape) + (m,), sa + (a_strides[-2],))
        if s_rows is not None:
            a_mat = _matrix(batch * m, k, s_rows, a_strides[-1])
            if a_mat is not None and a_mat[0] != _OP_N:
                a_mat = None  # (a transposed view of a batch does not fold)
    if a_mat is not None:
        M, stride_a, stride_b, stride_c, n_batch = batch * m, 0, 0, 0, 1
    else:
        M, n_batch = m, batch
        a_mat = _matrix(m, k, a_strides[-2], a_strides[-1])
        stride_a, stride_b = _collapse(batch_shape, sb), _collapse(batch_shape, sa)
        if a_mat is None or stride_a is None or stride_b is None:
            return None
        stride_c = m * n if batch > 1 else 0
    if max(M, n, k, a_mat[1], b_mat[1], n_batch) > _INT_MAX:
        return None
    return GemmPlan(transa=b_mat[0], transb=a_mat[0], m=n, n=M, k=k, lda=b_mat[1],
                    ldb=a_mat[1], ldc=max(n, 1), stride_a=stride_a, stride_b=stride_b,
                    stride_c=stride_c, batch=n_batch, out_shape=out_shape)


def lt_layouts(plan):
    """cuBLASLt's view of ``plan``: ``(rows, cols, ld, batch, stride)`` of its
    ``A``, ``B`` and ``C`` (column-major, before the transpose flags).

    Examples
    --------
    >>> from numba_mamba.cuda_kernels.blas import gemm_plan, lt_layouts
    >>> lt_layouts(gemm_plan((4, 3), (3, 1), (3, 5), (1, 3)))
    ((3, 5, 3, 1, 0), (3, 4, 3, 1, 0), (5, 4, 5, 1, 0))
    """
    a = (plan.m, plan.k) if plan.transa == _OP_N else (plan.k, plan.m)
    b = (plan.k, plan.n) if plan.transb == _OP_N else (plan.n, plan.k)
    return ((*a, plan.lda, plan.batch, plan.stride_a), (*b, plan.ldb, plan.batch, plan.stride_b),
            (plan.m, plan.n, plan.ldc, plan.batch, plan.stride_c))


# ------------------------------------------------------------------ the library
class _Library:
    """cuBLAS loaded once; ``lib`` None with ``reason`` where it failed."""

    def __init__(self):
        self.lib, self.reason = None, None
        self.lock = threading.Lock()
        self.local = threading.local()  # .handles: device id -> _Handle
        self.loaded = False

    def load(self):
        with self.lock:
            if self.loaded:
                return self.lib
            self.loaded = True
            try:
                from cuda import pathfinder

                path = pathfinder.load_nvidia_dynamic_lib("cublas").abs_path
                lib = ctypes.CDLL(path)
            except Exception as exc:  # noqa: BLE001 (any failure: the reason is kept)
                self.reason = f"cuBLAS could not be loaded: {type(exc).__name__}: {exc}"
                path, lib = _cupys_cublas()
                if lib is None:
                    return None
                self.reason = None
            vp, i, ll = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong
            gemm = [vp, i, i, i, i, i, vp, vp, i, vp, i, vp, vp, i]
            batched = [vp, i, i, i, i, i, vp, vp, i, ll, vp, i, ll, vp, vp, i, ll, i]
            protos = {"cublasCreate_v2": [ctypes.POINTER(vp)],
                      "cublasSetStream_v2": [vp, vp],
                      "cublasSetWorkspace_v2": [vp, vp, ctypes.c_size_t],
                      "cublasSetPointerMode_v2": [vp, i],
                      "cublasSgemm_v2": gemm, "cublasDgemm_v2": gemm,
                      "cublasSgemmStridedBatched": batched,
                      "cublasDgemmStridedBatched": batched}
            missing = [name for name in protos if not hasattr(lib, name)]
            if missing:
                self.reason = f"cuBLAS at {path} lacks {', '.join(missing)}"
                return None
            for name, args in protos.items():
                fn = getattr(lib, name)
                fn.argtypes, fn.restype = args, ctypes.c_int
            self.lib = lib
            return lib


def _cupys_cublas():
    """``(soname, library)`` of the cuBLAS CuPy loaded (dlopen of a loaded
    library's soname returns it), or ``(None, None)``."""
    try:
        import cupy_backends.cuda.libs.cublas  # noqa: F401 (loads CuPy's cuBLAS)
    except Exception:  # noqa: BLE001 (no CuPy or no cuBLAS for it)
        return None, None
    for soname in ("libcublas.so.13", "libcublas.so.12"):
        try:
            return soname, ctypes.CDLL(soname)
        except OSError:
            continue
    return None, None


_LIB = _Library()


class _HeuristicResult(ctypes.Structure):
    """``cublasLtMatmulHeuristicResult_t``."""

    _fields_ = [("algo", ctypes.c_uint64 * 8), ("workspace", ctypes.c_size_t),
                ("state", ctypes.c_int), ("waves", ctypes.c_float),
                ("reserved", ctypes.c_int * 4)]


class _LtLibrary:
    """cuBLASLt loaded once (None where it or a symbol is missing: then every
    GEMM takes cuBLAS's own call)."""

    def __init__(self):
        self.lib, self.loaded, self.lock = None, False, threading.Lock()
        self.local = threading.local()  # .handles: device id -> cublasLtHandle_t

    def load(self):
        with self.lock:
            if not self.loaded:
                self.loaded = True
                self.lib = _load_lt()
            return self.lib


def _load_lt():
    lib = None
    try:
        from cuda import pathfinder

        lib = ctypes.CDLL(pathfinder.load_nvidia_dynamic_lib("cublasLt").abs_path)
    except Exception:  # noqa: BLE001 (then by soname, as cuBLAS loaded it)
        for soname in ("libcublasLt.so.13", "libcublasLt.so.12"):
            try:
                lib = ctypes.CDLL(soname)
                break
            except OSError:
                continue
    if lib is None:
        return None
    vp, i, sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
    pvp = ctypes.POINTER(vp)
    protos = {"cublasLtCreate": [pvp],
              "cublasLtMatmulDescCreate": [pvp, i, i],
              "cublasLtMatmulDescSetAttribute": [vp, i, vp, sz],
              "cublasLtMatrixLayoutCreate": [pvp, i, ctypes.c_uint64, ctypes.c_uint64,
                                             ctypes.c_int64],
              "cublasLtMatrixLayoutSetAttribute": [vp, i, vp, sz],
              "cublasLtMatmulPreferenceCreate": [pvp],
              "cublasLtMatmulPreferenceSetAttribute": [vp, i, vp, sz],
              "cublasLtMatmulPreferenceDestroy": [vp],
              "cublasLtMatmulAlgoGetHeuristic": [vp] * 7 + [i, ctypes.POINTER(_HeuristicResult),
                                                            ctypes.POINTER(i)],
              "cublasLtMatmul": [vp] * 14 + [sz, vp]}
    if any(not hasattr(lib, name) for name in protos):
        return None
    for name, args in protos.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, ctypes.c_int
    return lib


_LT = _LtLibrary()
#: (plan, dtype char, device) -> _LtGemm, or None for cuBLAS's own call
_CHOICES = {}


def available():
    """True where cuBLAS and every function used here were found.

    Examples
    --------
    >>> from numba_mamba.cuda_kernels import blas
    >>> isinstance(blas.available(), bool)
    True
    """
    return _LIB.load() is not None


def unavailable_reason():
    """Why :func:`available` is False (None where it is True)."""
    _LIB.load()
    return _LIB.reason


def _check(name, status):
    if status != 0:
        raise RuntimeError(f"{name} failed with cuBLAS status {status}")


class _Handle:
    """A cuBLAS handle of one device with its workspace (kept alive here)."""

    def __init__(self, lib, cupy):
        if cupy.cuda.get_current_stream().is_capturing():
            raise RuntimeError("the cuBLAS handle of this thread and device is created at its "
                               "first matmul, which must not be inside a stream capture: "
                               "run the step once eagerly first")
        self.ptr = ctypes.c_void_p()
        _check("cublasCreate_v2", lib.cublasCreate_v2(ctypes.byref(self.ptr)))
        _check("cublasSetPointerMode_v2", lib.cublasSetPointerMode_v2(self.ptr,
                                                                      _POINTER_MODE_HOST))
        self.workspace = cupy.cuda.memory.alloc(WORKSPACE_BYTES)
        _check("cublasSetWorkspace_v2", lib.cublasSetWorkspace_v2(
            self.ptr, ctypes.c_void_p(self.workspace.ptr), WORKSPACE_BYTES))


def _handle(lib, cupy):
    handles = getattr(_LIB.local, "handles", None)
    if handles is None:
        handles = _LIB.local.handles = {}
    device = cupy.cuda.Device().id
    h = handles.get(device)
    if h is None:
        h = handles[device] = _Handle(lib, cupy)
    return h


def _gemm(lib, cupy, plan, a, b, out, beta):
    """Launch ``plan`` on CuPy's current stream: ``out = a @ b + beta * out``,
    through the tuned choice of its shape where there is one."""
    h = _handle(lib, cupy)
    choice = _choice(lib, cupy, h, plan, a, b, out)
    if choice is not None and choice(cupy, h, a, b, out, beta) == 0:
        return
    _classic(lib, cupy, h, plan, a, b, out, beta)


def _classic(lib, cupy, h, plan, a, b, out, beta):
    """cuBLAS's own (strided-batched) GEMM."""
    _check("cublasSetStream_v2",
           lib.cublasSetStream_v2(h.ptr, ctypes.c_void_p(cupy.cuda.get_current_stream().ptr)))
    single = out.dtype == np.float32
    scalar = ctypes.c_float if single else ctypes.c_double
    alpha, beta_c = scalar(1.0), scalar(beta)
    p = plan
    ptrs = (ctypes.c_void_p(b.data.ptr), ctypes.c_void_p(a.data.ptr), ctypes.c_void_p(out.data.ptr))
    if p.batch == 1:
        name = "cublasSgemm_v2" if single else "cublasDgemm_v2"
        status = getattr(lib, name)(h.ptr, p.transa, p.transb, p.m, p.n, p.k, ctypes.byref(alpha),
                                    ptrs[0], p.lda, ptrs[1], p.ldb, ctypes.byref(beta_c),
                                    ptrs[2], p.ldc)
    else:
        name = "cublasSgemmStridedBatched" if single else "cublasDgemmStridedBatched"
        status = getattr(lib, name)(h.ptr, p.transa, p.transb, p.m, p.n, p.k, ctypes.byref(alpha),
                                    ptrs[0], p.lda, p.stride_a, ptrs[1], p.ldb, p.stride_b,
                                    ctypes.byref(beta_c), ptrs[2], p.ldc, p.stride_c, p.batch)
    _check(name, status)


class _LtGemm:
    """One cuBLASLt algorithm for one GEMM shape, its descriptors kept alive."""

    def __init__(self, lt, handle, desc, layouts, result, dtype):
        self.lt, self.handle, self.desc, self.layouts = lt, handle, desc, layouts
        self.result, self.scalar = result, ctypes.c_float if dtype == np.float32 else ctypes.c_double

    def __call__(self, cupy, h, a, b, out, beta):
        """Run it (cuBLAS's ``A`` is our ``b``); the cuBLASLt status (0: done)."""
        lay_a, lay_b, lay_c = self.layouts
        alpha, beta_c = self.scalar(1.0), self.scalar(beta)
        return self.lt.cublasLtMatmul(
            self.handle, self.desc, ctypes.byref(alpha), ctypes.c_void_p(b.data.ptr), lay_a,
            ctypes.c_void_p(a.data.ptr), lay_b, ctypes.byref(beta_c),
            ctypes.c_void_p(out.data.ptr), lay_c, ctypes.c_void_p(out.data.ptr), lay_c,
            ctypes.byref(self.result.algo), ctypes.c_void_p(h.workspace.ptr), WORKSPACE_BYTES,
            ctypes.c_void_p(cupy.cuda.get_current_stream().ptr))


def _lt_handle(lt, cupy):
    handles = getattr(_LT.local, "handles", None)
    if handles is None:
        handles = _LT.local.handles = {}
    device = cupy.cuda.Device().id
    if device not in handles:
        ptr = ctypes.c_void_p()
        _check("cublasLtCreate", lt.cublasLtCreate(ctypes.byref(ptr)))
        handles[device] = ptr
    return handles[device]


def _lt_candidates(lt, cupy, plan, dtype):
    """The algorithms cuBLASLt's heuristic proposes for ``plan`` (best guess
    first) as :class:`_LtGemm` objects; [] where it proposes none."""
    compute, data = _LT_TYPES[np.dtype(dtype)]
    handle = _lt_handle(lt, cupy)
    desc = ctypes.c_void_p()
    _check("cublasLtMatmulDescCreate", lt.cublasLtMatmulDescCreate(ctypes.byref(desc), compute,
                                                                    data))
    for attr, value in ((_LT_DESC_TRANSA, plan.transa), (_LT_DESC_TRANSB, plan.transb)):
        v = ctypes.c_int32(value)
        _check("cublasLtMatmulDescSetAttribute", lt.cublasLtMatmulDescSetAttribute(
            desc, attr, ctypes.byref(v), ctypes.sizeof(v)))
    layouts = []
    for rows, cols, ld, batch, stride in lt_layouts(plan):
        lay = ctypes.c_void_p()
        _check("cublasLtMatrixLayoutCreate", lt.cublasLtMatrixLayoutCreate(
            ctypes.byref(lay), data, rows, cols, ld))
        if batch > 1:
            for attr, v in ((_LT_LAYOUT_BATCH_COUNT, ctypes.c_int32(batch)),
                            (_LT_LAYOUT_BATCH_OFFSET, ctypes.c_int64(stride))):
                _check("cublasLtMatrixLayoutSetAttribute", lt.cublasLtMatrixLayoutSetAttribute(
                    lay, attr, ctypes.byref(v), ctypes.sizeof(v)))
        layouts.append(lay)
    pref = ctypes.c_void_p()
    _check("cublasLtMatmulPreferenceCreate", lt.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)))
    try:
        ws = ctypes.c_uint64(WORKSPACE_BYTES)
        _check("cublasLtMatmulPreferenceSetAttribute", lt.cublasLtMatmulPreferenceSetAttribute(
            pref, _LT_PREF_MAX_WORKSPACE, ctypes.byref(ws), ctypes.sizeof(ws)))
        mask = ctypes.c_uint32(_LT_REDUCTIONS_NOT_INPLACE)
        _check("cublasLtMatmulPreferenceSetAttribute", lt.cublasLtMatmulPreferenceSetAttribute(
            pref, _LT_PREF_REDUCTION_SCHEME_MASK, ctypes.byref(mask), ctypes.sizeof(mask)))
        results = (_HeuristicResult * _LT_CANDIDATES)()
        found = ctypes.c_int(0)
        status = lt.cublasLtMatmulAlgoGetHeuristic(
            handle, desc, layouts[0], layouts[1], layouts[2], layouts[2], pref, _LT_CANDIDATES,
            results, ctypes.byref(found))
    finally:
        lt.cublasLtMatmulPreferenceDestroy(pref)
    if status != 0:
        return []
    keep = []
    for r in results[:found.value]:
        if r.state == 0 and r.workspace <= WORKSPACE_BYTES:
            own = _HeuristicResult()
            ctypes.pointer(own)[0] = r
            keep.append(_LtGemm(lt, handle, desc, layouts, own, dtype))
    return keep


def _median_ms(cupy, run):
    """Median of ``_TIMING_REPS`` timed runs of ``run()`` after one warm-up;
    inf where a run reports a nonzero status."""
    if run() != 0:
        return float("inf")
    times = []
    for _ in range(_TIMING_REPS):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        run()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop))
    return sorted(times)[len(times) // 2]


def _choice(lib, cupy, h, plan, a, b, out):
    """The tuned :class:`_LtGemm` of this GEMM's shape, or None for cuBLAS's
    own call (tuning off, a small or untunable shape, a shape first seen in a
    capture, or cuBLAS's call timed fastest)."""
    from .settings import settings

    if not settings.gemm_tuning or settings.deterministic:
        return None
    key = (plan, out.dtype.char, cupy.cuda.Device().id)
    if key in _CHOICES:
        return _CHOICES[key]
    if 2 * plan.m * plan.n * plan.k * plan.batch < settings.gemm_tuning_min_flops:
        return None
    if cupy.cuda.get_current_stream().is_capturing():
        return None
    lt = _LT.load()
    if lt is None:
        _CHOICES[key] = None
        return None
    scratch = cupy.empty_like(out)

    def classic():
        _classic(lib, cupy, h, plan, a, b, scratch, 0.0)
        return 0

    best, best_ms = None, _median_ms(cupy, classic)
    for cand in _lt_candidates(lt, cupy, plan, out.dtype):
        ms = _median_ms(cupy, lambda c=cand: c(cupy, h, a, b, scratch, 0.0))
        if ms < best_ms:
            best, best_ms = cand, ms
    _CHOICES[key] = best
    return best


def choices():
    """The tuned GEMM shapes of this process: ``{(m, n, k, batch, dtype):
    'cublas' | 'cublaslt'}`` in cuBLAS's column-major terms (``m``, ``n`` are
    our ``n``, ``m``).

    Examples
    --------
    >>> from numba_mamba.cuda_kernels import blas
    >>> isinstance(blas.choices(), dict)
    True
    """
    return {(p.m, p.n, p.k, p.batch, np.dtype(dt).name): "cublas" if c is None else "cublaslt"
            for (p, dt, _), c in _CHOICES.items()}


def _elements(x):
    """Strides of ``x`` in elements, or None where one is not a whole number."""
    size = x.itemsize
    if any(s % size for s in x.strides):
        return None
    return tuple(s // size for s in x.strides)


def _c_strides(shape):
    """Element strides of a C-contiguous array of ``shape``."""
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def _plan(a, b):
    sa, sb = _elements(a), _elements(b)
    if sa is None or sb is None:
        return None
    return gemm_plan(tuple(a.shape), sa, tuple(b.shape), sb)


def matmul(a, b, out=None, *, beta=0.0):
    """``a @ b`` (plus ``beta * out``) on CuPy arrays through cuBLAS.

    Capturable into a CUDA graph (the GEMM runs on CuPy's current stream, on a
    handle of this module with its own workspace) once this thread has called
    it on the device outside a capture.

    Parameters
    ----------
    a : cupy.ndarray, shape (batch..., m, k)
    b : cupy.ndarray, shape (batch..., k, n)
        Batch dims broadcast as in ``numpy.matmul``; either operand may be a
        transposed view.  float32 or float64, both of one dtype.
    out : cupy.ndarray, shape (batch..., m, n), optional
        C-contiguous, of the operands' dtype; written in place.
    beta : float
        ``out`` is ``a @ b + beta * out`` (needs ``out`` unless 0).

    Returns
    -------
    cupy.ndarray
        ``out``, or a new C-contiguous array.

    Raises
    ------
    ValueError
        ``out`` of the wrong shape, dtype or layout; ``beta`` without ``out``;
        shapes that do not multiply.

    Notes
    -----
    Other layouts are copied to C-contiguous first.  Other dtypes, 1-D
    operands, sizes beyond 32-bit ints, or no cuBLAS (:func:`available`)
    fall back to ``cupy.matmul``, which cannot be captured.

    Examples
    --------
    >>> from numba_mamba.cuda_kernels import blas  # doctest: +SKIP
    >>> blas.matmul(x, w.T, out=y)  # doctest: +SKIP
    """
    import cupy

    if beta != 0 and out is None:
        raise ValueError(f"beta={beta!r} needs out (out = a @ b + beta * out)")
    lib = _LIB.load()
    ok_dtype = (a.dtype == b.dtype and a.dtype in (np.float32, np.float64)
                and (out is None or out.dtype == a.dtype))
    if lib is None or not ok_dtype or a.ndim < 2 or b.ndim < 2:
        if out is not None and out.dtype != np.result_type(a.dtype, b.dtype):
            raise ValueError(f"out must have dtype {np.result_type(a.dtype, b.dtype)}, got "
                             f"{out.dtype}")
        if beta == 0:
            return cupy.matmul(a, b, out=out)
        out *= out.dtype.type(beta)
        out += cupy.matmul(a, b)
        return out
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(f"a (shape {tuple(a.shape)}) and b (shape {tuple(b.shape)}) do not "
                         f"multiply: a.shape[-1] must equal b.shape[-2]")
    plan = _plan(a, b)
    if plan is None:  # copy the operand(s) whose layout cuBLAS cannot read
        sa, sb = _elements(a), _elements(b)
        if sa is not None and gemm_plan(a.shape, sa, b.shape, _c_strides(b.shape)):
            b = cupy.ascontiguousarray(b)
        elif sb is not None and gemm_plan(a.shape, _c_strides(a.shape), b.shape, sb):
            a = cupy.ascontiguousarray(a)
        else:
            a, b = cupy.ascontiguousarray(a), cupy.ascontiguousarray(b)
        plan = _plan(a, b)
    if plan is None:  # (shapes that do not broadcast, sizes beyond 32-bit ints)
        return cupy.matmul(a, b, out=out)
    if out is None:
        out = cupy.empty(plan.out_shape, dtype=a.dtype)
    elif tuple(out.shape) != plan.out_shape or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous of shape {plan.out_shape} (dtype "
                         f"{a.dtype}), got shape {tuple(out.shape)}, C-contiguous "
                         f"{out.flags.c_contiguous}")
    if out.size == 0:
        return out
    if plan.k == 0:
        if beta == 0:
            out.fill(0)
        else:
            out *= out.dtype.type(beta)
        return out
    _gemm(lib, cupy, plan, a, b, out, beta)
    return out


#: Elements from which :func:`sum_rows` multiplies rather than reduces.
SUM_ROWS_MIN = 1 << 20


def sum_rows(a):
    """The sum over the first axis of a 2-D CuPy array; for arrays of at least
    :data:`SUM_ROWS_MIN` elements as one product ``ones @ a``: a memory-bound
    GEMM that reads ``a`` once, in a fixed order (the same bits on every run),
    where CuPy's reduction over a leading axis is several times slower on the
    GPU (it is faster on the host: smaller arrays take it).  Also
    ``a.sum(axis=0)`` where :func:`matmul` would not take ``a`` (no cuBLAS,
    other dtypes, not C-contiguous).

    Examples
    --------
    >>> from numba_mamba.cuda_kernels import blas  # doctest: +SKIP
    >>> blas.sum_rows(partial_sums)  # doctest: +SKIP
    """
    import cupy

    if (a.ndim != 2 or a.size < SUM_ROWS_MIN or not a.flags.c_contiguous
            or a.dtype not in (np.float32, np.float64) or not available()):
        return a.sum(axis=0)
    return matmul(cupy.ones((1, a.shape[0]), dtype=a.dtype), a).reshape(a.shape[1])
