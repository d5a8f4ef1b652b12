"""The cuBLAS index logic of numba_mamba.cuda_kernels.blas, checked on the CPU.

:func:`gemm_plan` turns shapes and strides into the arguments of a
column-major strided-batched GEMM; here a NumPy emulation of that GEMM,
reading the operands' memory only through those arguments, must reproduce
``numpy.matmul`` for every layout the layers and the decoder use.
"""

import numpy as np
import pytest

from numba_mamba.cuda_kernels import blas


def _colmajor(x, rows, cols, ld, trans, stride, batch):
    """op(X) of each batch, X read column-major (rows x cols, leading dim ld)
    from ``x``'s first element, as cuBLAS reads it."""
    it = x.itemsize
    stored = (cols, rows) if trans else (rows, cols)
    mats = np.lib.stride_tricks.as_strided(x, shape=(batch,) + stored,
                                           strides=(stride * it, it, ld * it), writeable=False)
    return np.swapaxes(mats, 1, 2) if trans else mats


def _emulate(plan, a, b):
    """``C`` of cuBLAS's column-major strided-batched GEMM with ``plan``
    (``A`` = ``b``, ``B`` = ``a``), returned in ``plan.out_shape``."""
    p = plan
    A = _colmajor(b, p.m, p.k, p.lda, p.transa, p.stride_a, p.batch)
    B = _colmajor(a, p.k, p.n, p.ldb, p.transb, p.stride_b, p.batch)
    C = np.matmul(A, B)  # (batch, m, n): column-major C^T of the row-major result
    out = np.empty(p.out_shape, a.dtype)
    flat = out.reshape(-1)
    for i in range(p.batch):
        for j in range(p.n):  # column j of C^T: row j of the row-major result
            start = i * p.stride_c + j * p.ldc
            flat[start:start + p.m] = C[i, :, j]
    return out


def _strides(x):
    return tuple(s // x.itemsize for s in x.strides)


def _padded(rng, shape, transposed=False, pad=3):
    """An array of ``shape`` that is a strided view of a larger buffer (rows
    padded by ``pad``), or a transposed view (last two strides (1, ld))."""
    if transposed:
        *lead, r, c = shape
        base = rng.standard_normal(tuple(lead) + (c, r + pad))
        return np.swapaxes(base[..., :r], -1, -2)
    base = rng.standard_normal(tuple(shape[:-1]) + (shape[-1] + pad,))
    return base[..., :shape[-1]]


def _check(a, b):
    plan = blas.gemm_plan(a.shape, _strides(a), b.shape, _strides(b))
    assert plan is not None, (a.shape, a.strides, b.shape, b.strides)
    got = _emulate(plan, a, b)
    np.testing.assert_allclose(got, np.matmul(a, b), rtol=1e-12, atol=1e-12)
    return plan


SIZES = [(3, 4, 5), (1, 4, 5), (3, 1, 5), (3, 4, 1), (1, 1, 1)]  # (m, k, n)


@pytest.mark.parametrize("m,k,n", SIZES)
@pytest.mark.parametrize("ta", [False, True])
@pytest.mark.parametrize("tb", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_2d(m, k, n, ta, tb, padded):
    rng = np.random.default_rng(0)
    if padded:
        a, b = _padded(rng, (m, k), ta), _padded(rng, (k, n), tb)
    else:
        a = rng.standard_normal((k, m)).T if ta else rng.standard_normal((m, k))
        b = rng.standard_normal((n, k)).T if tb else rng.standard_normal((k, n))
    plan = _check(a, b)
    assert plan.batch == 1


@pytest.mark.parametrize("m,k,n", SIZES)
@pytest.mark.parametrize("lead", [(2,), (1,), (2, 3)])
@pytest.mark.parametrize("tb", [False, True])
def test_batch_times_matrix_folds(m, k, n, lead, tb):
    """(batch..., m, k) @ (k, n) with C-contiguous a: one GEMM, batch in m."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal(lead + (m, k))
    b = rng.standard_normal((n, k)).T if tb else rng.standard_normal((k, n))
    plan = _check(a, b)
    assert plan.batch == 1 and plan.n == int(np.prod(lead)) * m


@pytest.mark.parametrize("m,k,n", SIZES)
@pytest.mark.parametrize("ta", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_batch_times_matrix_strided(m, k, n, ta, padded):
    """a not foldable (transposed views, padded rows): a strided-batched GEMM."""
    rng = np.random.default_rng(2)
    a = _padded(rng, (4, m, k), ta) if padded else (
        np.swapaxes(rng.standard_normal((4, k, m)), -1, -2) if ta
        else rng.standard_normal((4, m, k)))
    b = rng.standard_normal((k, n))
    _check(a, b)


@pytest.mark.parametrize("m,k,n", SIZES)
@pytest.mark.parametrize("ta", [False, True])
@pytest.mark.parametrize("tb", [False, True])
@pytest.mark.parametrize("batch", [1, 3])
def test_matrix_times_batch(m, k, n, ta, tb, batch):
    """(m, k) @ (batch, k, n): strided batched with a shared (stride 0)."""
    rng = np.random.default_rng(3)
    a = rng.standard_normal((k, m)).T if ta else rng.standard_normal((m, k))
    b = (np.swapaxes(rng.standard_normal((batch, n, k)), -1, -2) if tb
         else rng.standard_normal((batch, k, n)))
    plan = _check(a, b)
    if batch > 1 and max(m, k) > 1:
        assert plan.stride_b == 0 and plan.batch == batch


@pytest.mark.parametrize("m,k,n", SIZES)
@pytest.mark.parametrize("ta", [False, True])
@pytest.mark.parametrize("tb", [False, True])
@pytest.mark.parametrize("lead", [(1,), (3,), (2, 3)])
def test_batch_times_batch(m, k, n, ta, tb, lead):
    rng = np.random.default_rng(4)
    a = _padded(rng, lead + (m, k), ta)
    b = (np.swapaxes(rng.standard_normal(lead + (n, k)), -1, -2) if tb
         else rng.standard_normal(lead + (k, n)))
    plan = _check(a, b)
    assert plan.batch == int(np.prod(lead))


def test_the_linear_layer_patterns():
    """What layers.linear_forward/backward multiply, channels last and first."""
    rng = np.random.default_rng(5)
    x, w = rng.standard_normal((2, 7, 5)), rng.standard_normal((6, 5))
    dout = rng.standard_normal((2, 7, 6))
    _check(x, w.T)  # forward, axis=-1
    _check(dout, w)  # dx
    _check(dout.reshape(-1, 6).T, x.reshape(-1, 5))  # dweight, one GEMM
    _check(np.swapaxes(dout, -1, -2), x)  # dweight per batch
    xc, doutc = rng.standard_normal((2, 5, 7)), rng.standard_normal((2, 6, 7))
    _check(w, xc)  # forward, axis=-2
    _check(w.T, doutc)  # dx
    _check(doutc, np.swapaxes(xc, -1, -2))  # dweight per batch
    _check(x[:, -1], w.T)  # a strided row pick (the decoder's last position)


def test_broadcast_batch_dims():
    rng = np.random.default_rng(6)
    _check(rng.standard_normal((1, 3, 4)), rng.standard_normal((2, 5, 4, 2)))
    _check(rng.standard_normal((2, 1, 3, 4)), rng.standard_normal((1, 1, 4, 2)))
    # batch dims broadcast from both sides: no one batch stride (matmul falls back)
    assert blas.gemm_plan((2, 1, 3, 4), (12, 12, 4, 1), (1, 5, 4, 2), (40, 8, 2, 1)) is None
    assert blas.gemm_plan((2, 5, 3, 4), (60, 12, 4, 1), (5, 4, 2), (8, 2, 1)) is None


@pytest.mark.parametrize("a_shape,a_strides,b_shape,b_strides", [
    ((3, 4), (8, 2), (4, 5), (5, 1)),  # neither stride of a is 1
    ((3, 4), (1, 1), (4, 5), (5, 1)),  # overlapping: ld below the rows
    ((3, 4), (4, 1), (4, 5), (5, 2)),  # b's columns strided
    ((3, 4), (-4, 1), (4, 5), (5, 1)),  # negative
    ((3, 4), (4, 1), (5, 5), (5, 1)),  # k mismatch
    ((4,), (1,), (4, 5), (5, 1)),  # 1-D
    ((2, 2, 3, 4), (1, 24, 4, 1), (4, 5), (5, 1)),  # batch dims not one stride
])
def test_layouts_that_need_a_copy(a_shape, a_strides, b_shape, b_strides):
    assert blas.gemm_plan(a_shape, a_strides, b_shape, b_strides) is None


def test_unavailable_when_the_library_cannot_be_loaded(monkeypatch):
    from cuda import pathfinder

    def missing(name):
        raise RuntimeError(f"no {name} here")

    monkeypatch.setattr(pathfinder, "load_nvidia_dynamic_lib", missing)
    monkeypatch.setattr(blas, "_cupys_cublas", lambda: (None, None))  # (nor CuPy's)
    monkeypatch.setattr(blas, "_LIB", blas._Library())
    assert blas.available() is False
    reason = blas.unavailable_reason()
    assert "cuBLAS could not be loaded" in reason and "no cublas here" in reason


def test_unavailable_when_a_symbol_is_missing(monkeypatch, tmp_path):
    """A library without the GEMM symbols (libc here) is not available."""
    import ctypes.util

    from cuda import pathfinder

    libc = ctypes.util.find_library("c")
    if libc is None:
        pytest.skip("no libc found to stand in for a library without cuBLAS symbols")

    class Loaded:
        abs_path = libc

    monkeypatch.setattr(pathfinder, "load_nvidia_dynamic_lib", lambda name: Loaded())
    monkeypatch.setattr(blas, "_LIB", blas._Library())
    assert blas.available() is False
    assert "lacks cublasCreate_v2" in blas.unavailable_reason()


def _lt_emulate(plan, a, b):
    """``C`` of a cuBLASLt matmul with the layouts of :func:`blas.lt_layouts`
    (``A`` = ``b``, ``B`` = ``a``; each stored column-major as rows x cols
    with its leading dim and batch stride, then transposed by its flag)."""
    def stored(x, rows, cols, ld, batch, stride):
        it = x.itemsize
        return np.lib.stride_tricks.as_strided(x, shape=(batch, rows, cols),
                                               strides=(stride * it, it, ld * it),
                                               writeable=False)
    lay_a, lay_b, lay_c = blas.lt_layouts(plan)
    A = stored(b, *lay_a)
    B = stored(a, *lay_b)
    A = np.swapaxes(A, 1, 2) if plan.transa else A
    B = np.swapaxes(B, 1, 2) if plan.transb else B
    C = np.matmul(A, B)
    rows, cols, ldc, batch, stride_c = lay_c
    assert C.shape == (batch, rows, cols)
    out = np.zeros(plan.out_shape, a.dtype)
    it = out.itemsize
    np.lib.stride_tricks.as_strided(out, shape=C.shape,
                                    strides=(stride_c * it, it, ldc * it))[...] = C
    return out


@pytest.mark.parametrize("case", ["2d", "folded", "shared_a", "batched", "transposed"])
def test_lt_layouts_describe_the_same_product(case):
    rng = np.random.default_rng(11)
    if case == "2d":
        a, b = rng.standard_normal((3, 4)), _padded(rng, (4, 5))
    elif case == "folded":
        a, b = rng.standard_normal((2, 3, 4)), _padded(rng, (4, 5), transposed=True)
    elif case == "shared_a":
        a, b = rng.standard_normal((6, 4)), np.swapaxes(rng.standard_normal((3, 5, 4)), -1, -2)
    elif case == "batched":
        a, b = rng.standard_normal((3, 6, 4)), rng.standard_normal((3, 4, 5))
    else:
        a, b = _padded(rng, (3, 4), transposed=True), _padded(rng, (4, 5), transposed=True)
    plan = blas.gemm_plan(a.shape, _strides(a), b.shape, _strides(b))
    np.testing.assert_allclose(_lt_emulate(plan, a, b), np.matmul(a, b), rtol=1e-12,
                               atol=1e-12)
