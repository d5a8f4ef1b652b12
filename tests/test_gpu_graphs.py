"""CapturedStep on the GPU: a captured step equals the eager one, replays see new
inputs, temporaries survive in the graph's pool, failures fall back or raise."""

import numpy as np
import pytest

from numba_mamba import selective_scan
from numba_mamba.cuda_kernels import blas
from numba_mamba.graphs import CapturedStep, CaptureWarning
from tests.gpu import gpu_module

cupy, _HAVE_GPU, pytestmark = gpu_module()


def _scan_step(x_in, out):
    """A step with CuPy temporaries, a Numba kernel (the scan) and a cuBLAS matmul."""
    Bt, Dc, L = x_in.shape
    rng = np.random.default_rng(1)
    A = cupy.asarray(-rng.uniform(0.5, 2.0, (Dc, 4)).astype(np.float32))
    W = cupy.asarray(rng.standard_normal((Dc, Dc)).astype(np.float32))

    def fn():
        u = cupy.tanh(x_in)  # temporaries from the graph's pool
        delta = cupy.log1p(cupy.exp(x_in * 0.5))
        y = selective_scan(u, delta, A, u[:, :4], u[:, 4:8], D=None)
        out[...] = blas.matmul(W, y)
        return y

    return fn


def test_captured_step_equals_eager_and_sees_new_inputs():
    rng = np.random.default_rng(0)
    x = cupy.asarray(rng.standard_normal((2, 8, 64)).astype(np.float32))
    out = cupy.empty_like(x)
    ref_out = cupy.empty_like(x)
    step = CapturedStep(_scan_step(x, out), graph=True)
    eager = _scan_step(x, ref_out)
    for i in range(5):
        x[...] = cupy.asarray(rng.standard_normal(x.shape).astype(np.float32))
        step()
        eager()
        cupy.cuda.get_current_stream().synchronize()
        assert step.captured == (i >= 1)
        np.testing.assert_array_equal(cupy.asnumpy(out), cupy.asnumpy(ref_out))


def test_capture_of_a_syncing_step_warns_and_runs_eagerly_in_auto_mode():
    x = cupy.arange(4, dtype=cupy.float32)
    seen = []

    def fn():
        x[...] += 1
        seen.append(float(x.sum()))  # waits for the device: not capturable

    step = CapturedStep(fn)
    step()
    with pytest.warns(CaptureWarning, match="could not capture"):
        step()
    step()
    assert not step.captured
    assert seen[-1] == float(cupy.arange(4).sum() + 4 * 3)  # three eager increments took effect


def test_capture_failure_raises_with_graph_true():
    x = cupy.arange(4, dtype=cupy.float32)
    step = CapturedStep(lambda: float(x.sum()), graph=True)
    step()
    with pytest.raises(Exception):
        step()
    # the stream can be used again afterwards
    assert float((x + 1).sum()) == 10.0
