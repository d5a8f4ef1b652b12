"""The scalar bodies of ``numba_mamba._math``: one source, compiled for the CPU and the GPU.

Checked here: the bodies against float64 NumPy formulas in both dtypes, that
their constants take the argument's type (float32 in, float32 out, no float64
instruction in the PTX of a float32 kernel: ``tests/test_cuda_ptx.py``), that
the CPU elementwise kernels compute exactly the bodies, and that the GPU elementwise kernels, run in the
CUDA simulator, agree with the CPU ones (a subprocess: ``tests/background.py``).
"""

import json
import math

import numpy as np
import pytest
from numba import njit

from numba_mamba import _cpu_elementwise, _math


def _x(dtype):
    # both sides of 0, the softplus cut-off at 20 from both sides, tails
    x = np.concatenate([np.linspace(-30, 30, 241), [19.999, 20.0, 20.001, -0.0, 0.0, 1e-8]])
    return x.astype(dtype)


def _expected(name, x, g):
    x = x.astype(np.float64)
    g = g.astype(np.float64)
    s = 1 / (1 + np.exp(-x))
    return {"sigmoid": s,
            "softplus": np.where(x > 20, x, np.log1p(np.exp(np.minimum(x, 20)))),
            "silu": x * s,
            "silu_backward": g * s * (1 + x * (1 - s)),
            "softplus_backward": g * s}[name]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", _math.BODIES)
def test_cpu_bodies_match_float64_formulas_and_keep_the_dtype(name, dtype):
    inlined = getattr(_math.cpu, name)  # (as the CPU kernels call them)
    called = getattr(_math.compiled(njit), name)
    two = name.endswith("backward")

    @njit
    def apply(x, g, out):
        for i in range(x.size):
            out[i] = inlined(g[i], x[i]) if two else inlined(x[i])

    x = _x(dtype)
    g = np.linspace(-2, 3, x.size).astype(dtype)
    out = np.empty_like(x)
    apply(x, g, out)
    rtol = 1e-6 if dtype == np.float32 else 1e-14
    np.testing.assert_allclose(out, _expected(name, x, g), rtol=rtol, atol=rtol * 1e-3)
    called(*((g[0], x[0]) if two else (x[0],)))
    ret = {str(s.return_type) for s in called.nopython_signatures
           if {str(a) for a in s.args} == {np.dtype(dtype).name}}
    assert ret == {np.dtype(dtype).name}, called.nopython_signatures


def test_softplus_is_the_identity_above_20_and_keeps_nan():
    sp = _math.compiled(njit).softplus
    for dtype in (np.float32, np.float64):
        assert sp(dtype(20.5)) == dtype(20.5)
        assert sp(dtype(20.0)) == np.float64(math.log1p(math.exp(20.0))).astype(dtype)
        assert math.isnan(sp(dtype(np.nan)))


def test_like_is_a_constant_of_the_argument_type():
    @njit
    def one_like(x):
        return _math.like(x, 1)

    assert one_like(np.float32(3.5)) == 1
    assert [str(s.return_type) for s in one_like.nopython_signatures] == ["float32"]
    one_like(2.5)
    assert "float64" in [str(s.return_type) for s in one_like.nopython_signatures]
    assert type(_math.like(np.float32(2), 20)) is np.float32  # the simulator's Python path


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cpu_elementwise_kernels_are_the_bodies_to_the_bit(dtype):
    x = _x(dtype)
    g = np.linspace(-2, 3, x.size).astype(dtype)
    m = _math.compiled(njit)
    for name in ("silu", "softplus"):
        got = getattr(_cpu_elementwise, f"{name}_forward")(x)
        want = np.array([getattr(m, name)(v) for v in x], dtype)
        np.testing.assert_array_equal(got, want)
        got = getattr(_cpu_elementwise, f"{name}_backward")(g, x)
        want = np.array([getattr(m, f"{name}_backward")(a, v) for a, v in zip(g, x)], dtype)
        np.testing.assert_array_equal(got, want)


def test_array_functions():
    z = np.array([0.0, 1e-9, 0.05, -0.3, 2.0])
    with np.errstate(divide="ignore", invalid="ignore"):
        closed1 = np.where(z != 0, np.expm1(z) / z, 1.0)
        closed2 = np.where(z != 0, (z * np.exp(z) - np.expm1(z)) / (z * z), 0.5)
    np.testing.assert_allclose(_math.phi1(z, np), closed1, rtol=1e-15)
    np.testing.assert_allclose(_math.phi2(z, np)[[0, 3, 4]], closed2[[0, 3, 4]], rtol=1e-12)
    np.testing.assert_allclose(_math.phi2(z, np)[2], closed2[2], rtol=1e-9)
    v = np.array([-5.0, 0.0, 19.0, 21.0, 800.0])
    np.testing.assert_allclose(_math.softplus_array(v, np),
                               _expected("softplus", v, v), rtol=1e-15)


@pytest.mark.background("tests/test_math.py", env={"NUMBA_ENABLE_CUDASIM": "1"})
def test_gpu_elementwise_kernels_in_the_simulator_match_the_cpu_kernels(background):
    proc = background
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    bad = {k: v for k, v in report.items() if v is not True}
    assert not bad and len(report) == 8, report


def _simulate():
    """The GPU elementwise kernels under the simulator against the CPU kernels
    (float64 to the bit; float32 within rounding: the simulator's ``math.exp``
    computes in double).  Called in the subprocess."""
    import numba

    assert numba.config.ENABLE_CUDASIM
    from numba_mamba.cuda_kernels import elementwise

    report = {}
    for dtype in (np.float64, np.float32):
        x = _x(dtype)[::7].copy()
        g = np.linspace(-2, 3, x.size).astype(dtype)
        for name in ("silu", "softplus"):
            pairs = ((f"{name}_forward", (x,)), (f"{name}_backward", (g, x)))
            for fn, args in pairs:
                got = getattr(elementwise, fn)(*args)
                want = getattr(_cpu_elementwise, fn)(*args)
                ok = got.dtype == want.dtype and (
                    np.array_equal(got, want) if dtype == np.float64
                    else np.allclose(got, want, rtol=2e-7, atol=1e-30))
                report[f"{fn} {dtype.__name__}"] = bool(ok) or float(np.max(np.abs(got - want)))
    return report


if __name__ == "__main__":
    print(json.dumps(_simulate()))
