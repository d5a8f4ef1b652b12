"""Hardening (issue 21) on the GPU: the filters' causality policy, validation.

Runs only where CuPy sees a CUDA GPU (marker ``gpu``).  The GPU path shares
the CPU's dispatch (``numba_mamba.filters``): ``mode='auto'`` scans, and
``mode='conv'`` scans a signal with non-finite samples.  Before issue 21,
``'auto'`` convolved long time-invariant filters on the GPU (from 2^14 or
2^16 samples), where one outlier moved every earlier output and a NaN made
them all NaN.
"""

import numpy as np
import pytest

import numba_mamba as nm
from tests.gpu import gpu_module

cupy, _HAVE_GPU, pytestmark = gpu_module()


def _lti(rng, L, cplx, dtype=np.float32):
    A = -rng.uniform(0.05, 1, (4, 16))
    if cplx:
        A = A + 1j * rng.uniform(-1, 1, A.shape)
    B, C = rng.standard_normal((4, 16)), rng.standard_normal((4, 16))
    x = rng.standard_normal((4, L)).astype(dtype)
    return [cupy.asarray(v) for v in (A, B, C)], x


@pytest.mark.parametrize("cplx,L", [(False, 2**16), (True, 2**14)])
def test_auto_mode_outputs_before_an_outlier_do_not_move(cplx, L):
    """At the lengths where 'auto' used to convolve: an outlier at t leaves
    every output before t unchanged to the bit, and a NaN at t leaves them finite."""
    (A, B, C), x = _lti(np.random.default_rng(0), L, cplx)
    t = L - 1000
    plain = cupy.asnumpy(nm.ssm_filter(A, B, C, cupy.asarray(x)))
    for value in (np.float32(1e6), np.float32(np.nan), np.float32(np.inf)):
        bad = x.copy()
        bad[2, t] = value
        y = cupy.asnumpy(nm.ssm_filter(A, B, C, cupy.asarray(bad)))
        np.testing.assert_array_equal(y[:, :t], plain[:, :t])
        np.testing.assert_array_equal(y[[0, 1, 3]], plain[[0, 1, 3]])
        if not np.isfinite(value):
            assert not np.isfinite(y[2, t:]).any()


@pytest.mark.parametrize("cplx", [False, True])
def test_conv_mode_scans_a_signal_with_a_non_finite_sample(cplx):
    (A, B, C), x = _lti(np.random.default_rng(1), 2**14, cplx)
    t = 9000
    bad = x.copy()
    bad[1, t] = np.nan
    scan = cupy.asnumpy(nm.ssm_filter(A, B, C, cupy.asarray(bad), mode="scan"))
    conv = cupy.asnumpy(nm.ssm_filter(A, B, C, cupy.asarray(bad), mode="conv"))
    np.testing.assert_array_equal(conv, scan)
    assert np.isfinite(conv[:, :t]).all() and np.isnan(conv[1, t:]).all()


def test_gpu_validation_matches_the_cpu():
    one = cupy.ones((2, 3))
    with pytest.raises(ValueError, match="^A must be finite"):
        nm.ssm_kernel(cupy.full((2, 3), cupy.nan), one, one, 0.1, 4)
    with pytest.raises(ValueError, match="^A must be finite"):
        nm.discretize(cupy.full((2, 3), cupy.nan), one, 0.1)
    with pytest.warns(nm.UnstableFilterWarning, match="positive real part"):
        nm.ssm_kernel(cupy.ones((2, 3)), one, one, 0.1, 4)
    x = nm.ssm_filter(-cupy.ones((2, 3), cupy.int64), one, one, cupy.ones((2, 5), cupy.int32))
    assert x.dtype == cupy.float64
    with pytest.raises(TypeError, match="^L must be an integer"):
        nm.ssm_kernel(-one, one, one, 0.1, True)
    f = nm.SSMFilter(-cupy.ones(3), cupy.ones(3), cupy.ones(3))
    assert f.step(cupy.ones((4, 2))).shape == (4, 2)
    f.reset()
    assert f.step(cupy.ones(2)).shape == (2,)
