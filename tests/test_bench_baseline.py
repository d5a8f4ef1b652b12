"""The baseline that benchmarks/bench_scan.py times in PyTorch computes the scan.

``bench_scan.sequential_loop`` is written against operators NumPy and PyTorch
share; on NumPy arrays in float64 it must give the reference's output.
"""
import importlib.util
import pathlib

import numpy as np

from numba_mamba import reference

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_scan.py"


def _bench_scan():
    spec = importlib.util.spec_from_file_location("bench_scan", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sequential_loop_matches_reference():
    rng = np.random.default_rng(0)
    Bt, D, N, L = 2, 3, 4, 9
    u = rng.standard_normal((Bt, D, L))
    delta = rng.standard_normal((Bt, D, L)) * 0.5 - 1.0
    A = -np.exp(rng.standard_normal((D, N)) * 0.5)
    B = rng.standard_normal((Bt, N, L))
    C = rng.standard_normal((Bt, N, L))
    Dv = rng.standard_normal(D)
    z = rng.standard_normal((Bt, D, L))
    bias = rng.standard_normal(D) * 0.1
    got = _bench_scan().sequential_loop(
        np.exp, lambda x: np.logaddexp(0.0, x), lambda x: 1.0 / (1.0 + np.exp(-x)),
        u, delta, A, B, C, Dv, z, bias)
    want = reference.selective_scan(u, delta, A, B, C, D=Dv, z=z, delta_bias=bias,
                                    delta_softplus=True)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
