"""numba_mamba.timeseries on CuPy arrays: the single-lookback engine, the public
MambaForecaster and MambaClassifier match their CPU results (float64), and a fitted GPU
forecaster pickles."""

import pickle

import numpy as np

from numba_mamba.timeseries import MambaForecaster
from numba_mamba.timeseries._engine import LookbackModel
from tests.gpu import gpu_module
from tests.test_timeseries_forecaster import TINY, _ar2

cupy, _HAVE_GPU, pytestmark = gpu_module()


def test_gpu_engine_matches_cpu_engine():
    y = _ar2(120)
    kw = dict(lookback=10, horizon=3, steps=10, val_fraction=0.2, dtype=np.float64,
              d_model=8, n_layers=1, d_state=4, progress=False)
    cpu = LookbackModel(**kw).fit(y).predict(3)
    gpu = LookbackModel(**kw).fit(cupy.asarray(y)).predict(3)
    assert isinstance(gpu, cupy.ndarray)
    np.testing.assert_allclose(cupy.asnumpy(gpu), cpu, rtol=1e-6, atol=1e-8)


def test_gpu_engine_with_sample_times_matches_cpu_engine():
    # irregular times as the scan's step: models.model_forward(..., dtau=) on the GPU
    y = _ar2(120)
    t = np.cumsum(np.random.default_rng(1).uniform(0.5, 1.5, 120))
    kw = dict(lookback=10, horizon=3, steps=10, val_fraction=0.2, dtype=np.float64,
              d_model=8, n_layers=2, d_state=4, progress=False)
    cpu = LookbackModel(**kw).fit(y, t=t).predict(3)
    gpu = LookbackModel(**kw).fit(cupy.asarray(y), t=cupy.asarray(t)).predict(3)
    assert isinstance(gpu, cupy.ndarray)
    np.testing.assert_allclose(cupy.asnumpy(gpu), cpu, rtol=1e-6, atol=1e-8)


def test_gpu_forecaster_matches_cpu_and_pickles():
    y = _ar2(120)
    kw = dict(lookback=(8, 12), dtype=np.float64, **TINY)
    cpu = MambaForecaster(**kw).fit(y, fh=3)
    gpu = MambaForecaster(**kw).fit(cupy.asarray(y), fh=3)
    assert isinstance(gpu.predict(), cupy.ndarray)
    np.testing.assert_allclose(cupy.asnumpy(gpu.predict()), cpu.predict(), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(cupy.asnumpy(gpu.predict(quantiles=(0.1, 0.9))),
                               cpu.predict(quantiles=(0.1, 0.9)), rtol=1e-6, atol=1e-8)
    assert gpu.ridge_ == cpu.ridge_
    g = pickle.loads(pickle.dumps(gpu))
    np.testing.assert_array_equal(cupy.asnumpy(g.predict()), cupy.asnumpy(gpu.predict()))


def test_gpu_classifier_matches_cpu_on_ragged_input():
    from tests.test_timeseries_classifier import _two_frequencies
    from numba_mamba.timeseries import MambaClassifier
    X, y = _two_frequencies(20, channels=2)
    ragged = [x[:30 + i % 5] for i, x in enumerate(X)]
    kw = dict(d_model=8, n_layers=1, d_state=4, steps=5, dtype=np.float64)
    cpu = MambaClassifier(**kw).fit(ragged, y)
    gpu = MambaClassifier(**kw).fit([cupy.asarray(x) for x in ragged], cupy.asarray(y))
    p = gpu.predict_proba([cupy.asarray(x) for x in ragged])
    assert isinstance(p, cupy.ndarray)
    np.testing.assert_allclose(cupy.asnumpy(p), cpu.predict_proba(ragged), rtol=1e-6, atol=1e-9)
