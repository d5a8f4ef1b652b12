"""cuda_kernels.blas on the GPU: equal to cupy.matmul for every layout the model
uses, and capturable into a CUDA graph (which CuPy's own matmul is not)."""

import numpy as np
import pytest

from numba_mamba.cuda_kernels import blas
from numba_mamba.graphs import CapturedStep
from tests.gpu import gpu_module

cupy, _HAVE_GPU, pytestmark = gpu_module()

# float32: cuBLAS and CuPy may pick different GEMM algorithms (summation orders);
# k here is at most 37, so 1e-5 relative bounds that reordering.
RTOL = {np.float32: 1e-5, np.float64: 1e-12}
SIZES = [(3, 37, 5), (1, 4, 5), (3, 1, 5), (3, 4, 1), (1, 1, 1), (64, 33, 48)]


def _arr(rng, shape, dtype, transposed=False, padded=False):
    if transposed:
        *lead, r, c = shape
        x = _arr(rng, tuple(lead) + (c, r), dtype, padded=padded)
        return cupy.swapaxes(x, -1, -2)
    if padded:
        base = rng.standard_normal(tuple(shape[:-1]) + (shape[-1] + 3,)).astype(dtype)
        return cupy.asarray(base)[..., :shape[-1]]
    return cupy.asarray(rng.standard_normal(shape).astype(dtype))


def _check(a, b, dtype):
    assert blas.available(), blas.unavailable_reason()
    got = blas.matmul(a, b)
    want = cupy.matmul(a, b)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(cupy.asnumpy(got), cupy.asnumpy(want), rtol=RTOL[dtype],
                               atol=RTOL[dtype])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m,k,n", SIZES)
@pytest.mark.parametrize("ta", [False, True])
@pytest.mark.parametrize("tb", [False, True])
def test_patterns_equal_cupy(dtype, m, k, n, ta, tb):
    rng = np.random.default_rng(0)
    _check(_arr(rng, (m, k), dtype, ta), _arr(rng, (k, n), dtype, tb), dtype)  # 2-D
    _check(_arr(rng, (m, k), dtype, ta, padded=True), _arr(rng, (k, n), dtype, tb), dtype)
    _check(_arr(rng, (2, 3, m, k), dtype), _arr(rng, (k, n), dtype, tb), dtype)  # folded
    _check(_arr(rng, (4, m, k), dtype, ta), _arr(rng, (k, n), dtype, tb), dtype)  # batched
    _check(_arr(rng, (m, k), dtype, ta), _arr(rng, (4, k, n), dtype, tb), dtype)  # shared a
    _check(_arr(rng, (1, m, k), dtype, ta), _arr(rng, (1, k, n), dtype, tb), dtype)
    _check(_arr(rng, (3, m, k), dtype, ta, padded=True), _arr(rng, (3, k, n), dtype, tb),
           dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_out_beta_and_copies(dtype):
    rng = np.random.default_rng(1)
    a, b = _arr(rng, (5, 7), dtype), _arr(rng, (7, 6), dtype)
    out = _arr(rng, (5, 6), dtype)
    before = out.copy()
    assert blas.matmul(a, b, out=out, beta=1.0) is out
    np.testing.assert_allclose(cupy.asnumpy(out), cupy.asnumpy(a @ b + before),
                               rtol=RTOL[dtype], atol=RTOL[dtype])
    strided = _arr(rng, (5, 14), dtype)[:, ::2]  # neither stride 1: copied first
    _check(strided, b, dtype)
    with pytest.raises(ValueError, match="out must be C-contiguous of shape"):
        blas.matmul(a, b, out=cupy.empty((6, 5), dtype).T)
    with pytest.raises(ValueError, match="out must be C-contiguous of shape"):
        blas.matmul(a, b, out=cupy.empty((5, 7), dtype))
    with pytest.raises(ValueError, match="beta"):
        blas.matmul(a, b, beta=1.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_captured_gemms_replay_with_new_inputs(dtype):
    """Every pattern inside one CapturedStep(graph=True): replays equal eager."""
    rng = np.random.default_rng(2)
    x = _arr(rng, (2, 9, 16), dtype)
    w = _arr(rng, (24, 16), dtype)
    dout = _arr(rng, (2, 9, 24), dtype)
    outs = {k: None for k in ("fwd", "dx", "dw", "dw_b", "cf")}

    def fn():
        outs["fwd"] = blas.matmul(x, w.T)  # (batch folded into m)
        outs["dx"] = blas.matmul(dout, w)
        outs["dw"] = blas.matmul(dout.reshape(-1, 24).T, x.reshape(-1, 16))
        outs["dw_b"] = blas.matmul(cupy.swapaxes(dout, -1, -2), x)  # batched
        outs["cf"] = blas.matmul(w, cupy.swapaxes(x, -1, -2))  # shared a
        return dict(outs)

    step = CapturedStep(fn, graph=True)
    for i in range(4):
        x[...] = _arr(rng, x.shape, dtype)
        dout[...] = _arr(rng, dout.shape, dtype)
        got = {k: v.copy() for k, v in step().items()}
        if i >= 1:
            assert step.captured
        want = {"fwd": x @ w.T, "dx": dout @ w,
                "dw": dout.reshape(-1, 24).T @ x.reshape(-1, 16),
                "dw_b": cupy.swapaxes(dout, -1, -2) @ x, "cf": w @ cupy.swapaxes(x, -1, -2)}
        for k in want:
            np.testing.assert_allclose(cupy.asnumpy(got[k]), cupy.asnumpy(want[k]),
                                       rtol=RTOL[dtype], atol=RTOL[dtype], err_msg=k)


def test_captured_equals_eager_bit_for_bit():
    """The graph replays the same cuBLAS calls as the eager path: identical bits."""
    rng = np.random.default_rng(3)
    a, b = _arr(rng, (4, 32, 48), np.float32), _arr(rng, (48, 40), np.float32)
    out = cupy.empty((4, 32, 40), np.float32)
    step = CapturedStep(lambda: blas.matmul(a, b, out=out), graph=True)
    step()
    step()
    assert step.captured
    a[...] = _arr(rng, a.shape, np.float32)
    step()
    eager = blas.matmul(a, b)
    assert cupy.array_equal(out, eager)


def _bound(a, b, k, dtype):
    """A rounding bound of a computed ``a @ b`` whatever the summation order:
    ``k * eps * (|a| @ |b|)`` (the classic ``gamma_k`` bound, first order)."""
    return k * np.finfo(dtype).eps * (np.abs(a) @ np.abs(b))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("pattern", ["shared_a", "batched_t", "folded"])
def test_tuned_shapes_are_right_and_replay_bit_for_bit(dtype, pattern):
    """A tuned shape (cuBLASLt or cuBLAS, whichever timed faster) is right
    to the rounding bound, also with ``beta``, and a captured graph replays
    the tuned choice: identical bits to the eager call."""
    from numba_mamba.cuda_kernels.settings import settings

    rng = np.random.default_rng(4)
    if pattern == "shared_a":  # weight @ channels-first activations
        a, b = _arr(rng, (192, 160), dtype), _arr(rng, (3, 160, 256), dtype)
    elif pattern == "batched_t":  # dout @ x^T per batch (a weight gradient)
        a = _arr(rng, (3, 192, 256), dtype)
        b = cupy.swapaxes(_arr(rng, (3, 160, 256), dtype), -1, -2)
    else:  # tokens @ weight.T (batch folded into rows)
        a, b = _arr(rng, (3, 256, 160), dtype), _arr(rng, (160, 192), dtype, transposed=True)
    with settings.override(gemm_tuning=True, gemm_tuning_min_flops=1, deterministic=False):
        got = blas.matmul(a, b)
        want = cupy.asnumpy(a).astype(np.float64) @ cupy.asnumpy(b).astype(np.float64)
        k = a.shape[-1]
        bound = _bound(cupy.asnumpy(a).astype(np.float64), cupy.asnumpy(b).astype(np.float64),
                       k, dtype)
        err = np.abs(cupy.asnumpy(got) - want)
        assert np.all(err <= bound), f"error {err.max()} beyond the bound {bound.min()}..."
        assert got.dtype == dtype
        plan = blas._plan(a, b)
        key = (plan.m, plan.n, plan.k, plan.batch, np.dtype(dtype).name)
        assert key in blas.choices(), (key, blas.choices())
        print("choice", key, blas.choices()[key])
        before = cupy.asarray(rng.standard_normal(got.shape).astype(dtype))
        acc = before.copy()
        blas.matmul(a, b, out=acc, beta=1.0)
        err = np.abs(cupy.asnumpy(acc) - cupy.asnumpy(before) - want)
        assert np.all(err <= bound + 2 * np.finfo(dtype).eps * np.abs(cupy.asnumpy(acc))), \
            f"with beta: error {err.max()}"
        out = cupy.empty(got.shape, dtype)
        step = CapturedStep(lambda: blas.matmul(a, b, out=out), graph=True)
        step()
        step()
        assert step.captured
        b[...] = cupy.asarray(rng.standard_normal(b.shape).astype(dtype))
        step()
        eager = blas.matmul(a, b)
        assert cupy.array_equal(out, eager), \
            f"replay differs from eager by {float(cupy.abs(out - eager).max())}"


def test_no_tuning_when_deterministic_or_off():
    from numba_mamba.cuda_kernels.settings import settings

    rng = np.random.default_rng(5)
    for i, fields in enumerate([dict(deterministic=True), dict(gemm_tuning=False)]):
        a, b = _arr(rng, (96 + i, 64), np.float32), _arr(rng, (2, 64, 80), np.float32)
        with settings.override(gemm_tuning_min_flops=1, **fields):
            blas.matmul(a, b)
        plan = blas._plan(a, b)
        assert (plan.m, plan.n, plan.k, plan.batch, "float32") not in blas.choices()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 5), (8, 300), (64, 7), (33, 1)])
@pytest.mark.parametrize("gemm", [True, False])
def test_sum_rows_equals_the_sum_over_the_first_axis(dtype, shape, gemm, monkeypatch):
    monkeypatch.setattr(blas, "SUM_ROWS_MIN", 1 if gemm else 1 << 40)
    rng = np.random.default_rng(6)
    a = _arr(rng, shape, dtype)
    got = blas.sum_rows(a)
    host = cupy.asnumpy(a).astype(np.float64)
    bound = shape[0] * np.finfo(dtype).eps * np.abs(host).sum(axis=0)
    assert got.shape == (shape[1],) and got.dtype == dtype
    assert np.all(np.abs(cupy.asnumpy(got) - host.sum(axis=0)) <= bound)
    strided = _arr(rng, (shape[0], 2 * shape[1]), dtype)[:, ::2]  # the fallback
    np.testing.assert_allclose(cupy.asnumpy(blas.sum_rows(strided)),
                               cupy.asnumpy(strided).sum(axis=0), rtol=RTOL[dtype],
                               atol=RTOL[dtype] * shape[0])
