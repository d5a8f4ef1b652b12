"""The public MambaForecaster (numba_mamba.timeseries): parameters, clone, pickling, the horizon,
save/load, intervals, backtests, panels, season detection and the defaults on constant,
trending, seasonal and short series.  CPU, tiny models (the GPU
tests are in test_gpu_timeseries.py)."""

import pickle

import numpy as np
import pytest

from numba_mamba.checkpoint import CheckpointError, save_checkpoint
from numba_mamba.timeseries import (MambaForecaster, ar_order_aic, detect_season,
                                    interval_coverage, mae, make_windows, pinball_loss)

# tiny members, few steps: these tests check the protocol, not accuracy
TINY = dict(d_model=8, n_layers=1, d_state=4, steps=10, eval_every=5)


def _ar2(n, seed=0):
    rng = np.random.default_rng(seed)
    y = np.zeros(n + 50)
    e = rng.standard_normal(n + 50)
    for t in range(2, n + 50):
        y[t] = 1.5 * y[t - 1] - 0.75 * y[t - 2] + e[t]
    return y[50:]


def _seasonal(n, m=12, seed=0):
    t = np.arange(n)
    return 10 + np.sin(2 * np.pi * t / m) + 0.05 * np.random.default_rng(seed).standard_normal(n)


@pytest.fixture(scope="module")
def fitted():
    return MambaForecaster(season=6, **TINY).fit(_ar2(150), fh=4)


# ---------------------------------------------------------------- parameters and protocol


def test_get_params_returns_the_constructor_arguments_and_set_params_checks_them():
    f = MambaForecaster(season=12, n_seeds=2, lookback=(12, 24), skip_ridge=1e-3)
    p = f.get_params()
    assert p["season"] == 12 and p["n_seeds"] == 2 and p["lookback"] == (12, 24)
    assert set(p) == set(MambaForecaster().get_params())
    assert "horizon" not in p and "fh" not in p
    g = MambaForecaster(**p)
    assert g.get_params() == p
    assert f.set_params(n_seeds=3, combine="mean") is f and f.n_seeds == 3
    with pytest.raises(ValueError, match="invalid parameter 'fh' for MambaForecaster"):
        f.set_params(fh=3)
    with pytest.raises(ValueError, match="combine must be one of"):
        f.set_params(combine="max")
    assert f.combine == "mean"  # a rejected set_params leaves the parameters as they were
    with pytest.raises(ValueError, match="n_seeds must be an integer >= 1, got 0"):
        MambaForecaster(n_seeds=0)
    with pytest.raises(ValueError, match="lookback must be an integer >= 1"):
        MambaForecaster(lookback=(12, 0))
    with pytest.raises(ValueError, match="skip_ridge must be a number >= 0 or a non-empty"):
        MambaForecaster(skip_ridge=())


def test_sklearn_clone_gives_an_unfitted_copy_with_equal_parameters(fitted):
    base = pytest.importorskip("sklearn.base")
    c = base.clone(fitted)
    assert c.get_params() == fitted.get_params() and c.engines_ is None
    with pytest.raises(RuntimeError, match="not fitted"):
        c.predict()


def test_the_old_horizon_argument_raises_a_clear_error():
    with pytest.raises(TypeError, match=r"no argument 'horizon' any more: .*fit\(y, fh=h\)"):
        MambaForecaster(lookback=12, horizon=5)
    with pytest.raises(TypeError, match="use n_seeds"):
        MambaForecaster(n_members=3)
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
        MambaForecaster(bogus=1)


def test_fh_is_the_fitted_horizon_and_predict_never_goes_beyond_it(fitted):
    full = fitted.predict()
    assert full.shape == (4,) and fitted.fh_ == 4
    np.testing.assert_array_equal(fitted.predict(2), full[:2])  # the direct head's first steps
    with pytest.raises(ValueError, match=r"fh must be <= 4, the horizon this forecaster was "
                                         r"fitted for, got 5: fit again with fit\(y, fh=5\)"):
        fitted.predict(5)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="fh must be a positive integer"):
            fitted.predict(bad)
    with pytest.raises(ValueError, match="fh must be a positive integer"):
        MambaForecaster(**TINY).fit(_ar2(100), fh=0)


def test_pickled_fitted_forecaster_predicts_identically(fitted):
    g = pickle.loads(pickle.dumps(fitted))
    np.testing.assert_array_equal(g.predict(), fitted.predict())
    np.testing.assert_array_equal(g.predict(quantiles=(0.1, 0.9)),
                                  fitted.predict(quantiles=(0.1, 0.9)))


def test_save_load_round_trip_multichannel(tmp_path):
    rng = np.random.default_rng(0)
    y = np.cumsum(rng.standard_normal((120, 2)), axis=0)
    f = MambaForecaster(lookback=(8, 12), n_seeds=2, **TINY).fit(y, fh=3)
    f.save(tmp_path / "f.npz")
    g = MambaForecaster.load(tmp_path / "f.npz")
    assert g.get_params() == f.get_params()
    assert (g.fh_, g.lookbacks_, g.season_, g.ridge_, g.skip_lags_) == \
        (f.fh_, f.lookbacks_, f.season_, f.ridge_, f.skip_lags_)
    np.testing.assert_array_equal(g.predict(), f.predict())
    np.testing.assert_array_equal(g.predict(y=y[:90]), f.predict(y=y[:90]))
    np.testing.assert_array_equal(g.predict_members(), f.predict_members())
    np.testing.assert_array_equal(g.predict(quantiles=(0.2, 0.5)),
                                  f.predict(quantiles=(0.2, 0.5)))
    assert f.predict().shape == (3, 2) and f.predict_members().shape == (4, 3, 2)


def test_save_load_round_trip_with_sample_times(tmp_path):
    rng = np.random.default_rng(1)
    t = np.cumsum(rng.uniform(0.1, 1.0, 120))
    y = np.sin(t)
    f = MambaForecaster(lookback=10, season=1, min_gain=0.0, **TINY).fit(y, fh=3, t=t)
    f.save(tmp_path / "f.npz")
    g = MambaForecaster.load(tmp_path / "f.npz")
    tf = t[-1] + np.array([0.3, 0.9, 1.2])
    np.testing.assert_array_equal(g.predict(t_future=tf), f.predict(t_future=tf))
    assert not np.allclose(f.predict(t_future=tf), f.predict(t_future=tf * 0 + tf[0] + [0, 2, 4]))


def test_load_rejects_other_checkpoints_with_the_reason(tmp_path):
    save_checkpoint(tmp_path / "plain.npz", {"w": np.zeros(2)})
    with pytest.raises(CheckpointError, match="not of a MambaForecaster"):
        MambaForecaster.load(tmp_path / "plain.npz")
    save_checkpoint(tmp_path / "old.npz", {"w": np.zeros(2)},
                    extra={"format": "numba-mamba-forecaster"})
    with pytest.raises(CheckpointError, match="earlier numba-mamba"):
        MambaForecaster.load(tmp_path / "old.npz")


# ---------------------------------------------------------------- the recipe


def test_ridge_penalty_is_the_candidate_with_the_lowest_validation_mse():
    y = _ar2(160)
    f = MambaForecaster(lookback=(6, 12), skip_ridge=(1e-4, 1.0, 10.0), steps=0).fit(y, fh=2)
    assert set(f.ridge_scores_) == {1e-4, 1.0, 10.0}
    assert f.ridge_ == min(f.ridge_scores_, key=f.ridge_scores_.get)
    assert f.ridge_scores_[10.0] > f.ridge_scores_[f.ridge_]  # heavy shrinkage hurts on AR(2)
    # without validation: the middle candidate
    g = MambaForecaster(lookback=6, skip_ridge=(1e-4, 1.0, 10.0), steps=0,
                        val_fraction=0.0).fit(y, fh=2)
    assert g.ridge_ == 1.0 and g.sigma_ is None


def test_residuals_are_the_out_of_sample_errors_of_the_skip_fitted_on_the_training_part():
    y = _ar2(150) + 3.0
    P, H, lam = 6, 3, 1e-2
    f = MambaForecaster(lookback=P, skip_ridge=lam, steps=0, val_fraction=0.2,
                        skip_lags=None, skip_fit="direct", dtype=np.float64).fit(y, fh=H)
    cut = 150 - 30
    mu, sd = y[:cut].mean(), y[:cut].std()
    z = (y - mu) / sd
    X, Y = make_windows(z[:cut], P, H)
    Z = np.c_[X, np.ones(len(X))]
    R = lam * len(Z) * np.eye(P + 1)
    R[-1, -1] = 0
    W = np.linalg.solve(Z.T @ Z + R, Z.T @ Y)
    ends = np.arange(cut - 1, 150 - H)
    pred = np.stack([np.r_[z[k - P + 1:k + 1], 1.0] @ W for k in ends])
    true = np.stack([z[k + 1:k + 1 + H] for k in ends])
    np.testing.assert_allclose(f.residuals_[..., 0], (true - pred) * sd, rtol=1e-6, atol=1e-9)
    sigma = np.maximum.accumulate(np.sqrt(((true - pred) ** 2).mean(0)) * sd)
    np.testing.assert_allclose(f.sigma_[:, 0], sigma, rtol=1e-6)


def test_quantiles_and_interval_come_from_the_validation_residuals(fitted):
    q = fitted.predict(quantiles=(0.1, 0.5, 0.9))
    point = fitted.predict()
    assert q.shape == (4, 3)
    assert (q[:, 0] < q[:, 1]).all() and (q[:, 2] > q[:, 1]).all()
    # quantile = point -+ sigma_j * (pooled 0.8 quantile of |residuals| / sigma): symmetric
    a = np.quantile(np.abs(fitted.residuals_ / fitted.sigma_).ravel(), 0.8)
    np.testing.assert_allclose(q[:, 1], point, rtol=1e-12)
    np.testing.assert_allclose(q[:, 2], point + fitted.sigma_[:, 0] * a, rtol=1e-12)
    np.testing.assert_allclose(q[:, 0], point - fitted.sigma_[:, 0] * a, rtol=1e-12)
    assert (np.diff(fitted.sigma_[:, 0]) >= 0).all()  # scales do not shrink along the horizon
    lo, hi = fitted.predict_interval(coverage=0.8)
    np.testing.assert_allclose(lo, q[:, 0], rtol=1e-12)
    np.testing.assert_allclose(hi, q[:, 2], rtol=1e-12)
    lo95, hi95 = fitted.predict_interval(coverage=0.95)
    assert (hi95 - lo95 > hi - lo).all()
    with pytest.raises(ValueError, match=r"coverage must be in \(0, 1\)"):
        fitted.predict_interval(coverage=1.0)
    with pytest.raises(ValueError, match=r"quantiles must be a non-empty sequence of levels"):
        fitted.predict(quantiles=(0.5, 1.2))
    g = MambaForecaster(lookback=8, val_fraction=0.0, **TINY).fit(_ar2(100), fh=2)
    with pytest.raises(RuntimeError, match="fit with val_fraction > 0"):
        g.predict_interval()


def test_members_are_combined_by_the_median(fitted):
    members = fitted.predict_members()
    assert members.shape == (len(fitted.lookbacks_) * fitted.n_seeds, 4)
    np.testing.assert_allclose(fitted.predict(), np.median(members, axis=0), rtol=1e-12)


# ---------------------------------------------------------------- season and defaults


def _var(n, order, seed=0):
    """A stable 2-channel VAR of the given order (coefficients only at lags 1 and order)."""
    rng = np.random.default_rng(seed)
    y = np.zeros((n + 50, 2))
    A1, Ap = np.array([[0.5, 0.1], [0.0, 0.4]]), np.array([[-0.3, 0.0], [0.2, -0.35]])
    for t in range(order, n + 50):
        y[t] = A1 @ y[t - 1] + Ap @ y[t - order] + rng.standard_normal(2)
    return y[50:]


def test_ar_order_aic_finds_the_order_of_univariate_vector_and_panel_series():
    assert ar_order_aic(_ar2(400), 12) == 2
    assert ar_order_aic(_var(600, 4), 10) == 4
    # a panel end to end (each series scaled alike): no lag row spans two series; a series
    # shorter than max_lag gives no rows
    y = np.r_[_ar2(300, seed=3), _ar2(300, seed=4), _ar2(5, seed=5)]
    segs = [(0, 300), (300, 600), (600, 605)]
    assert ar_order_aic(y, 8, segments=segs) == 2
    assert ar_order_aic(np.full(100, 3.0), 6) == 1  # no order explains more: the smallest
    with pytest.raises(ValueError, match="max_lag must be an integer >= 1, got 0"):
        ar_order_aic(y, 0)
    with pytest.raises(ValueError, match="more than max_lag"):
        ar_order_aic(np.arange(8.0), 6)


def test_default_skip_reads_the_aic_order_and_averages_direct_and_recursive_maps():
    y = _seasonal(200, m=12) + 0.3 * _ar2(200)
    f = MambaForecaster(season=12, steps=0, dtype=np.float64).fit(y, fh=6)
    assert f.skip_lags_ == ar_order_aic(y, min(36, 200 // 4))
    assert all(e.settings["skip_lags"] == f.skip_lags_ and e.settings["skip_fit"] == "both"
               for e in f.engines_)
    direct = MambaForecaster(season=12, steps=0, skip_fit="direct", skip_lags=f.skip_lags_,
                             dtype=np.float64).fit(y, fh=6)
    rec = MambaForecaster(season=12, steps=0, skip_fit="recursive", skip_lags=f.skip_lags_,
                          dtype=np.float64).fit(y, fh=6)
    assert rec.ridge_scores_ and direct.ridge_ == f.ridge_  # the same penalty is picked
    np.testing.assert_allclose(f.predict(), (direct.predict() + rec.predict()) / 2, rtol=1e-9)
    # the earlier skip: each lookback's lags, direct ridge
    old = MambaForecaster(season=12, steps=0, skip_lags=None, skip_fit="direct").fit(y, fh=6)
    assert old.skip_lags_ is None and [e._skip_lags for e in old.engines_] == [12, 24, 36]
    with pytest.raises(ValueError, match="skip_lags must be 'aic', a positive integer or None"):
        MambaForecaster(skip_lags="bic")
    with pytest.raises(ValueError, match="skip_fit must be one of"):
        MambaForecaster(skip_fit="ols")


def test_detect_season_finds_the_period_under_a_trend_and_none_in_noise():
    t = np.arange(300)
    assert detect_season(np.sin(2 * np.pi * t / 7) + 0.05 * t) == 7
    assert detect_season(_seasonal(300, m=12)) == 12
    assert detect_season(np.stack([_seasonal(300, 12), _seasonal(300, 12, 1)], 1)) == 12
    rng = np.random.default_rng(0)
    assert detect_season(rng.standard_normal(300)) == 1
    assert detect_season(np.cumsum(rng.standard_normal(300))) == 1
    assert detect_season(np.ones(50)) == 1 and detect_season(np.arange(5.0)) == 1


def test_defaults_constant_series_forecast_the_constant_with_a_zero_width_interval():
    f = MambaForecaster(**TINY).fit(np.full(80, 4.2), fh=5)
    assert f.season_ == 1 and f.lookbacks_ == (8, 16, 32)
    np.testing.assert_allclose(f.predict(), 4.2, atol=1e-5)
    lo, hi = f.predict_interval()
    np.testing.assert_allclose(hi - lo, 0.0, atol=1e-5)


def test_defaults_continue_a_linear_trend():
    y = 2.0 + 0.5 * np.arange(100) + 0.05 * np.random.default_rng(0).standard_normal(100)
    f = MambaForecaster(**TINY).fit(y[:90], fh=10)
    pred = f.predict()
    assert np.isfinite(pred).all()
    # continues upward, far closer than the last value carried forward
    assert mae(y[90:], pred) < 0.1 * mae(y[90:], np.full(10, y[89])), pred
    lo, hi = f.predict_interval()
    assert interval_coverage(y[90:], lo, hi) >= 0.5


def test_defaults_tie_the_lookbacks_to_a_detected_season_and_follow_it():
    y = _seasonal(200, m=12)
    f = MambaForecaster(**TINY).fit(y[:188], fh=12)
    assert f.season_ == 12 and f.lookbacks_ == (12, 24, 36)
    assert mae(y[188:], f.predict()) < 0.15  # the noise is 0.05; the amplitude 1


def test_defaults_on_a_short_series_shrink_the_lookbacks_and_stay_finite():
    y = _seasonal(30, m=4)
    f = MambaForecaster(**TINY).fit(y, fh=3)
    # 30 samples, 5 for validation: lookbacks capped at 25 - 3 - 8 + 1 = 15
    assert max(f.lookbacks_) <= 15 and len(f.lookbacks_) >= 1
    pred = f.predict()
    assert np.isfinite(pred).all() and np.isfinite(f.predict(quantiles=(0.1, 0.9))).all()
    assert np.abs(pred - 10).max() < 3  # within the range of the series
    with pytest.raises(ValueError, match="y is too short for fh = 3: 12 samples"):
        MambaForecaster(**TINY).fit(y[:12], fh=3)


# ---------------------------------------------------------------- backtest and panels


def test_backtest_refits_copies_at_each_origin_and_reports_metrics(fitted):
    y = _ar2(150)
    before = fitted.predict()
    rows = MambaForecaster(season=6, steps=0).backtest(y, fh=5, n_origins=3)
    assert [r["origin"] for r in rows] == [135, 140, 145]
    for r in rows:
        assert {"mae", "rmse", "mase", "smape", "coverage", "width", "pinball"} <= set(r)
        assert 0 <= r["coverage"] <= 1 and r["width"] > 0 and r["mae"] > 0
    # the last origin equals a plain fit on y[:145]
    f = MambaForecaster(season=6, steps=0).fit(y[:145], fh=5)
    assert rows[-1]["mae"] == pytest.approx(mae(y[145:], f.predict()), rel=1e-12)
    np.testing.assert_array_equal(fitted.predict(), before)
    with pytest.raises(ValueError, match=r"more than fh \+ \(n_origins - 1\) \* step = 150"):
        MambaForecaster(steps=0).backtest(y, fh=10, n_origins=15)
    with pytest.raises(ValueError, match="backtest takes one series"):
        MambaForecaster(steps=0).backtest([y, y], fh=5)


def test_a_list_of_series_is_one_global_model_with_per_series_scaling():
    ys = [_ar2(90, seed=s) * (s + 1) + 10 * s for s in range(3)] + [3 * _ar2(130, seed=7) - 5]
    f = MambaForecaster(lookback=(6, 12), steps=0, skip_ridge=1e-3, skip_lags=None,
                        skip_fit="direct").fit(ys, fh=3)
    preds = f.predict()
    assert len(preds) == 4 and all(p.shape == (3,) for p in preds)
    # the global skip, by hand: ridge on every series' (own-scaled) lag windows, training parts
    sc = [((y[:len(y) - f._n_val(len(y), 3)]).mean(), (y[:len(y) - f._n_val(len(y), 3)]).std())
          for y in ys]
    for P, e in zip((6, 12), f.engines_):
        rows = [make_windows((y - m) / s, P, 3) for y, (m, s) in zip(ys, sc)]
        X = np.concatenate([r[0] for r in rows])
        Y = np.concatenate([r[1] for r in rows])
        Z = np.c_[X, np.ones(len(X))]
        R = 1e-3 * len(Z) * np.eye(P + 1)
        R[-1, -1] = 0
        np.testing.assert_allclose(e.skip_, np.linalg.solve(Z.T @ Z + R, Z.T @ Y), rtol=1e-8)
    for p, y, (m, s) in zip(preds, ys, sc):
        want = np.median([(np.r_[(y[-P:] - m) / s, 1.0] @ e.skip_) * s + m
                          for P, e in zip((6, 12), f.engines_)], axis=0)
        np.testing.assert_allclose(p, want, rtol=1e-5)
    lo, hi = f.predict_interval()
    assert len(lo) == 4 and all((a < b).all() for a, b in zip(lo, hi))
    # intervals scale with each series: the fourth (x3) is wider than the first (x1)
    assert (hi[3] - lo[3]).mean() > 2 * (hi[0] - lo[0]).mean()
    # the default skip: the AIC order of the scaled series, no lag row across two of them
    g = MambaForecaster(lookback=(6, 12), steps=0).fit(ys, fh=3)
    z = np.concatenate([(y - m) / s for y, (m, s) in zip(ys, sc)])
    ends = np.cumsum([len(y) for y in ys])
    assert g.skip_lags_ == ar_order_aic(z, min(12, 90 // 4),
                                        [(e - len(y), e) for e, y in zip(ends, ys)])
    assert all(np.isfinite(p).all() for p in g.predict())
    histories = [y[:80] for y in ys]
    assert len(f.predict(y=histories)) == 4
    with pytest.raises(ValueError, match="list of 4 histories"):
        f.predict(y=histories[:2])
    with pytest.raises(ValueError, match=r"y\[1\] must have the shape kind of y\[0\]"):
        MambaForecaster(steps=0).fit([ys[0], np.c_[ys[1], ys[1]]], fh=3)
    g = pickle.loads(pickle.dumps(f))
    np.testing.assert_array_equal(g.predict()[3], preds[3])
    m = MambaForecaster(lookback=8, **TINY).fit(ys, fh=2)  # the Mamba members train across series
    assert all(np.isfinite(p).all() for p in m.predict())


# ---------------------------------------------------------------- covariates


def test_known_future_covariates_are_read_for_the_forecast_steps(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(153)  # known ahead, e.g. a planned input
    y = 2.0 * x[:150] + 0.05 * rng.standard_normal(150)
    f = MambaForecaster(lookback=(4, 8), steps=0).fit(y, fh=3, future_covariates=x)
    assert mae(2.0 * x[150:], f.predict()) < 0.1
    blind = MambaForecaster(lookback=(4, 8), steps=0).fit(y, fh=3)
    assert mae(2.0 * x[150:], blind.predict()) > 0.5
    # another history: its covariate rows and the 3 after them
    np.testing.assert_allclose(f.predict(y=y[:100], future_covariates=x[:103]), 2 * x[100:103],
                               atol=0.2)
    # the forecast steps' rows given at predict instead of at fit
    g = MambaForecaster(lookback=(4, 8), steps=0).fit(y, fh=3, future_covariates=x[:150])
    np.testing.assert_allclose(g.predict(future_covariates=x[150:]), f.predict(), rtol=1e-12)
    with pytest.raises(ValueError, match="future_covariates of the 3 forecast steps are needed"):
        g.predict()
    with pytest.raises(ValueError, match=r"future_covariates must have at least 103 rows"):
        f.predict(y=y[:100], future_covariates=x[:101])
    with pytest.raises(ValueError, match="covariates given to predict but not to fit"):
        blind.predict(future_covariates=x[150:])
    f.save(tmp_path / "f.npz")
    np.testing.assert_array_equal(MambaForecaster.load(tmp_path / "f.npz").predict(), f.predict())
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(f)).predict(), f.predict())


def test_past_covariates_drive_the_next_step_and_the_mamba_members_take_them():
    rng = np.random.default_rng(1)
    x = rng.standard_normal(160)
    y = np.r_[0.0, 0.9 * x[:-1]] + 0.05 * rng.standard_normal(160)  # y[t] = 0.9 x[t-1]
    f = MambaForecaster(lookback=(4, 8), steps=0).fit(y[:150], fh=1, past_covariates=x[:150])
    preds = [f.predict(y=y[:o], past_covariates=x[:o])[0] for o in range(150, 160)]
    assert mae(y[150:160], preds) < 0.1
    blind = MambaForecaster(lookback=(4, 8), steps=0).fit(y[:150], fh=1)
    assert mae(y[150:160], [blind.predict(y=y[:o])[0] for o in range(150, 160)]) > 0.4
    with pytest.raises(ValueError, match=r"past_covariates must have 150 rows"):
        MambaForecaster(steps=0).fit(y[:150], fh=1, past_covariates=x[:149])
    with pytest.raises(ValueError, match="past_covariates of the history y are needed"):
        f.predict(y=y[:120])
    with pytest.raises(ValueError, match="skip_fit='recursive' takes no covariates"):
        MambaForecaster(steps=0, skip_fit="recursive").fit(y[:150], fh=1,
                                                           past_covariates=x[:150])
    m = MambaForecaster(lookback=8, **TINY).fit(y[:150], fh=2, past_covariates=np.c_[x, x][:150])
    assert m.engines_[0].config_.d_input == 1 + 2 and np.isfinite(m.predict()).all()
    rows = MambaForecaster(lookback=8, steps=0).backtest(y, fh=1, n_origins=3,
                                                          past_covariates=x)
    assert len(rows) == 3 and np.mean([r["mae"] for r in rows]) < 0.15


# ---------------------------------------------------------------- metrics


def test_pinball_loss_matches_hand_computed_values():
    y = np.array([1.0, 2.0])
    yq = np.array([[0.0, 1.0, 3.0], [2.0, 2.0, 2.0]])
    # errors y - q: [1, 0, -2], [0, 0, 0]; losses 0.1*1, 0, (0.9-1)*(-2) = 0.2
    assert pinball_loss(y, yq, (0.1, 0.5, 0.9)) == pytest.approx(0.3 / 6)
    # at level 0.5 it is half the absolute error
    assert pinball_loss(y, np.array([[3.0], [1.0]]), (0.5,)) == pytest.approx(0.5 * 1.5)
    with pytest.raises(ValueError, match=r"y_quantiles must have shape \(2, 3\)"):
        pinball_loss(y, yq[:, :2], (0.1, 0.5, 0.9))
    assert interval_coverage([1.0, 5.0], [0.0, 0.0], [1.0, 4.0]) == 0.5
    with pytest.raises(ValueError, match="lower must be <= upper"):
        interval_coverage([1.0], [2.0], [1.0])
