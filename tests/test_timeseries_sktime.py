"""MambaSktimeForecaster: the sktime adapter (skipped where sktime is not installed).  CPU."""

import pickle
import warnings

import numpy as np
import pytest

pd = pytest.importorskip("pandas")
pytest.importorskip("sktime")

from numba_mamba.timeseries import MambaForecaster, MambaSktimeForecaster  # noqa: E402


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # sktime's remember_data notice
        yield


def _series(n=96):
    idx = pd.period_range("2000-01", periods=n, freq="M")
    return pd.Series(10 + np.sin(2 * np.pi * np.arange(n) / 12) + 0.01 * np.arange(n), idx,
                     name="y")


def test_predictions_match_the_wrapped_forecaster_on_sktime_indices():
    y = _series()
    f = MambaSktimeForecaster(season=12, steps=0).fit(y, fh=[1, 2, 5])
    direct = MambaForecaster(season=12, steps=0).fit(y.to_numpy(), fh=5)
    pred = f.predict()
    assert list(pred.index) == list(pd.period_range("2008-01", periods=5, freq="M")[[0, 1, 4]])
    np.testing.assert_allclose(pred.to_numpy(), direct.predict()[[0, 1, 4]], rtol=1e-6)
    assert pred.name == "y"
    iv = f.predict_interval(coverage=0.8)
    lo, hi = direct.predict_interval(coverage=0.8)
    np.testing.assert_allclose(iv[("y", 0.8, "lower")].to_numpy(), lo[[0, 1, 4]], rtol=1e-6)
    np.testing.assert_allclose(iv[("y", 0.8, "upper")].to_numpy(), hi[[0, 1, 4]], rtol=1e-6)
    with pytest.raises(ValueError, match="re-fit"):  # sktime: fh is fixed at fit
        f.predict(fh=[7])
    with pytest.raises(NotImplementedError, match="in-sample"):  # sktime checks the tag
        MambaSktimeForecaster(season=12, steps=0).fit(y, fh=[0, 1])


def test_sktime_evaluate_clone_and_pickle():
    from sktime.forecasting.model_evaluation import evaluate
    from sktime.split import ExpandingWindowSplitter
    y = _series()
    cv = ExpandingWindowSplitter(fh=[1, 2, 3], initial_window=60, step_length=12)
    res = evaluate(MambaSktimeForecaster(season=12, steps=0), cv, y)
    assert len(res) == 3 and np.isfinite(res.iloc[:, 0]).all()
    assert res.iloc[:, 0].max() < 0.05  # MAPE of a clean seasonal series
    f = MambaSktimeForecaster(season=12, steps=2, params={"d_model": 4, "n_layers": 1})
    f.fit(y, fh=[1, 2])
    g = pickle.loads(pickle.dumps(f))
    pd.testing.assert_series_equal(g.predict(), f.predict())
    c = f.clone()
    assert c.get_params() == f.get_params() and not c.is_fitted
