"""Forecasting API (numba_mamba.timeseries): windows, scaling, metrics, the time-aware model,
and the single-lookback engine of the forecaster (fit/predict, linear skip, bad input).  The
public MambaForecaster is tested in test_timeseries_forecaster.py.  CPU (the GPU tests are in
test_gpu_timeseries.py)."""

import numpy as np
import pytest

from numba_mamba import models
from numba_mamba.checkpoint import CheckpointError, save_checkpoint
from numba_mamba.timeseries import (MambaForecaster, Scaler, mae, make_windows, mase, rmse,
                                    seasonal_naive, smape, timed_model_backward,
                                    timed_model_forward)
from numba_mamba.timeseries._engine import LookbackModel as Engine

SMALL = dict(d_model=8, n_layers=1, d_state=4, progress=False)

# ---------------------------------------------------------------- windows and scaling


def test_make_windows_matches_hand_computed_windows_multichannel_with_stride():
    y = np.arange(14.0).reshape(7, 2)  # y[t] = (2t, 2t+1)
    X, Y = make_windows(y, lookback=2, horizon=2, stride=2)
    # starts 0, 2 ((7 - 2 - 2) // 2 + 1 = 2 windows)
    np.testing.assert_array_equal(X, [[[0, 1], [2, 3]], [[4, 5], [6, 7]]])
    np.testing.assert_array_equal(Y, [[[4, 5], [6, 7]], [[8, 9], [10, 11]]])


def test_make_windows_rejects_series_shorter_than_lookback_plus_horizon():
    with pytest.raises(ValueError, match=r"at least lookback \+ horizon = 5 samples, got 4"):
        make_windows(np.arange(4.0), 3, 2)
    with pytest.raises(ValueError, match="horizon must be an integer >= 1, got 0"):
        make_windows(np.arange(10.0), 3, 0)


def test_standard_and_robust_scalers_match_hand_computed_statistics():
    y = np.array([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0], [10.0, 5.0]])
    s = Scaler("standard").fit(y)
    np.testing.assert_allclose(s.center_, [4.0, 5.0])
    np.testing.assert_allclose(s.scale_, [np.sqrt((9 + 4 + 1 + 36) / 4), 1.0])  # 0 spread -> 1
    r = Scaler("robust").fit(y)
    # percentiles by linear interpolation: q25 = 1.75, median 2.5, q75 = 4.75
    np.testing.assert_allclose(r.center_, [2.5, 5.0])
    np.testing.assert_allclose(r.scale_, [3.0 / 1.349, 1.0])
    z = r.transform(y)
    np.testing.assert_allclose(z[:, 0], (y[:, 0] - 2.5) / (3.0 / 1.349))
    np.testing.assert_allclose(r.inverse_transform(z), y)


def test_scaler_rejects_unknown_method_and_wrong_channel_count():
    with pytest.raises(ValueError, match="method must be one of"):
        Scaler("minmax")
    s = Scaler().fit(np.ones((5, 2)))
    with pytest.raises(ValueError, match="y must have 2 channels"):
        s.transform(np.ones((5, 3)))


# ---------------------------------------------------------------- metrics


def test_mae_and_rmse_match_hand_computed_values():
    a, p = np.array([1.0, 2.0, 4.0, 0.0]), np.array([2.0, 2.0, 1.0, -2.0])
    assert mae(a, p) == pytest.approx((1 + 0 + 3 + 2) / 4)
    assert rmse(a, p) == pytest.approx(np.sqrt((1 + 0 + 9 + 4) / 4))


def test_mase_scales_by_in_sample_seasonal_naive_error():
    y_train = np.array([1.0, 4.0, 2.0, 6.0, 3.0])
    # m = 1: |3| |2| |4| |3| -> 3; m = 2: |1| |2| |1| -> 4/3
    a, p = np.array([5.0, 5.0]), np.array([2.0, 8.0])  # MAE 3
    assert mase(a, p, y_train) == pytest.approx(1.0)
    assert mase(a, p, y_train, m=2) == pytest.approx(3 / (4 / 3))


def test_mase_averages_per_channel_scaled_errors():
    y_train = np.array([[0.0, 0.0], [1.0, 10.0], [2.0, 20.0]])  # scales 1 and 10
    a = np.zeros((2, 2))
    p = np.array([[1.0, 10.0], [3.0, 30.0]])  # MAEs 2 and 20
    assert mase(a, p, y_train) == pytest.approx(2.0)


def test_mase_edge_cases_raise_with_the_reason():
    with pytest.raises(ValueError, match="MASE is undefined.*zero in channel"):
        mase([1.0], [2.0], np.full(5, 3.0))
    with pytest.raises(ValueError, match="more than m = 4 samples, got 4"):
        mase([1.0], [2.0], np.arange(4.0), m=4)
    with pytest.raises(ValueError, match=r"y_pred must have shape \(2,\) like y_true, got \(3,\)"):
        mase([1.0, 2.0], [1.0, 2.0, 3.0], np.arange(5.0))


def test_smape_is_zero_at_zero_over_zero_and_bounded_by_200():
    assert smape([0.0, 0.0], [0.0, 0.0]) == 0.0
    assert smape([0.0, 1.0], [0.0, 1.0]) == 0.0
    assert smape([0.0, 0.0], [1.0, -3.0]) == pytest.approx(200.0)
    assert smape([1.0, 0.0], [3.0, 0.0]) == pytest.approx(100 * (2 * 2 / 4 + 0) / 2)
    assert smape([2.0], [1.0]) == pytest.approx(smape([1.0], [2.0]))


def test_seasonal_naive_repeats_the_last_season():
    y = np.arange(10.0).reshape(5, 2)
    np.testing.assert_array_equal(seasonal_naive(y, 3, m=2), [[6, 7], [8, 9], [6, 7]])
    np.testing.assert_array_equal(seasonal_naive(np.arange(5.0), 2), [4, 4])


# ---------------------------------------------------------------- the time-aware model


def _timed_setup(seed=0):
    cfg = models.MambaConfig(d_model=8, n_layers=2, d_input=3, d_output=2, d_state=4)
    params = models.init_params(cfg, seed=seed, dtype=np.float64)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 7, 3))
    return cfg, params, x, rng


def test_timed_model_is_the_model_with_dtau():
    # timed_model_* are the TrainStep-shaped spelling of models.model_forward(..., dtau=)
    # (its gradients are checked against finite differences in test_models.py)
    cfg, params, x, rng = _timed_setup(1)
    dtau = rng.uniform(0.2, 3.0, (2, 7))
    dout = rng.standard_normal((2, 7, 2))
    out, cache = timed_model_forward(x, params, cfg, dtau)
    ref, rcache = models.model_forward(x, params, cfg, dtau=dtau)
    np.testing.assert_array_equal(out, ref)
    dx, g = timed_model_backward(dout, cache)
    rdx, rg = models.model_backward(dout, rcache)
    np.testing.assert_array_equal(dx, rdx)
    assert list(g) == list(rg)
    for k in g:
        np.testing.assert_array_equal(g[k], rg[k], err_msg=k)
    assert np.abs(out - models.model_forward(x, params, cfg)[0]).max() > 1e-6  # dtau acts


def test_timed_model_step_scales_the_scan_step():
    # With a longer gap the state decays more: doubling dtau changes the output.
    cfg, params, x, _ = _timed_setup(2)
    for i in range(cfg.n_layers):  # selective steps near 1 (at init they are 1e-3..1e-1)
        params[f"layers.{i}.mixer.dt_proj.bias"][:] = 0.5
    out1, _ = timed_model_forward(x, params, cfg, np.ones((2, 7)))
    out2, _ = timed_model_forward(x, params, cfg, np.full((2, 7), 2.0))
    assert np.max(np.abs(out2 - out1)) > 1e-3
    # causality: changing the step at the last position leaves earlier outputs as they were
    d = np.ones((2, 7))
    d[:, -1] = 5.0
    out3, _ = timed_model_forward(x, params, cfg, d)
    np.testing.assert_allclose(out3[:, :-1], out1[:, :-1], rtol=1e-12, atol=1e-13)


# ---------------------------------------------------------------- fit / predict


def _ar2(n, seed=0, sigma=0.5):
    rng = np.random.default_rng(seed)
    y = np.zeros(n + 100)
    e = sigma * rng.standard_normal(n + 100)
    for t in range(2, n + 100):
        y[t] = 1.5 * y[t - 1] - 0.75 * y[t - 2] + e[t]
    return y[100:]


def test_fit_predict_on_ar2_reaches_near_the_noise_floor():
    sigma = 0.5
    y = _ar2(700, sigma=sigma)
    train, n = 600, 700
    f = Engine(lookback=16, horizon=1, steps=300, lr=1e-2, val_fraction=0.15,
                        patience=4, seed=0, **SMALL).fit(y[:train])
    pred = np.array([f.predict(1, y=y[:o])[0] for o in range(train, n)])
    mse = np.mean((pred - y[train:n]) ** 2)
    # the optimal one-step forecast has MSE sigma^2; the series' variance is ~ 5.5 sigma^2
    assert mse < 1.35 * sigma ** 2, f"one-step MSE {mse:.4f} vs noise {sigma ** 2}"
    assert mse < 0.3 * np.var(y)


def test_same_seed_gives_identical_forecasts():
    y = _ar2(200)
    kw = dict(lookback=12, horizon=3, steps=30, val_fraction=0.0, seed=3, **SMALL)
    a = Engine(**kw).fit(y).predict(3)
    b = Engine(**kw).fit(y).predict(3)
    np.testing.assert_array_equal(a, b)


def test_multivariate_forecast_shapes_and_recursive_extension_starts_with_direct_block():
    rng = np.random.default_rng(0)
    y = np.cumsum(rng.standard_normal((150, 3)), axis=0)
    f = Engine(lookback=12, horizon=4, steps=20, val_fraction=0.2, n_members=2,
                        scaler="robust", **SMALL).fit(y)
    direct = f.predict(4)
    longer = f.predict(10)
    assert direct.shape == (4, 3) and longer.shape == (10, 3)
    np.testing.assert_allclose(longer[:4], direct, rtol=1e-6)
    assert len(f.history_) == 2 and f.history_[0]["best_step"] <= 20


def test_sample_times_reduce_error_on_an_irregularly_sampled_sine():
    # With gaps drawn in [0.1, 1.5], the phase at the next sample depends on the gap:
    # a forecaster that ignores the times cannot know it.
    rng = np.random.default_rng(0)
    t = np.cumsum(rng.uniform(0.1, 1.5, 360))
    y = np.sin(t)
    kw = dict(lookback=16, horizon=1, steps=150, lr=1e-2, val_fraction=0.0, seed=0, **SMALL)
    timed = Engine(**kw).fit(y[:300], t=t[:300])
    plain = Engine(**kw).fit(y[:300])
    e_timed = np.mean([(timed.predict(1, y=y[:o], t=t[:o], t_future=t[o:o + 1])[0] - y[o]) ** 2
                       for o in range(300, 360)])
    e_plain = np.mean([(plain.predict(1, y=y[:o])[0] - y[o]) ** 2 for o in range(300, 360)])
    assert e_timed < 0.5 * e_plain, f"MSE with times {e_timed:.4f}, without {e_plain:.4f}"


def _ridge_map(z, P, H, lam):
    """Hand-made ridge map (P + 1, H) from P lags and 1 to the next H values."""
    X, Y = make_windows(z, P, H)
    Z = np.c_[X, np.ones(len(X))]
    R = lam * len(Z) * np.eye(P + 1)
    R[-1, -1] = 0
    return np.linalg.solve(Z.T @ Z + R, Z.T @ Y)


def test_linear_skip_alone_is_the_ridge_direct_autoregression():
    # steps=0: the forecast is the closed-form ridge regression of the next H scaled values
    # on the last P scaled values (and 1), fitted on every window of the series
    y = _ar2(150) + 3.0
    P, H, lam = 6, 3, 1e-2
    f = Engine(lookback=10, horizon=H, skip_lags=P, skip_ridge=lam, steps=0,
                        linear_skip=True, val_fraction=0.0, **SMALL).fit(y)
    z = (y - y.mean()) / y.std()
    W = _ridge_map(z, P, H, lam)
    np.testing.assert_allclose(f.skip_, W, rtol=1e-8, atol=1e-10)
    want = (np.r_[z[-P:], 1.0] @ W) * y.std() + y.mean()
    np.testing.assert_allclose(f.predict(H), want, rtol=1e-5)


def _iterated_ar(z, P, H):
    """Hand-made recursive forecast of the least-squares AR(P) with intercept."""
    rows = np.arange(P - 1, len(z) - 1)
    X = np.stack([np.r_[z[k - P + 1:k + 1], 1.0] for k in rows])
    a = np.linalg.lstsq(X, z[rows + 1], rcond=None)[0]
    hist = list(z[-P:])
    for _ in range(H):
        hist.append(float(np.r_[hist[-P:], 1.0] @ a))
    return np.array(hist[P:])


def test_recursive_skip_is_the_iterated_autoregression_and_both_is_the_mean():
    y = _ar2(150) + 3.0
    P, H = 5, 4
    kw = dict(lookback=8, horizon=H, skip_lags=P, steps=0, linear_skip=True,
              val_fraction=0.0, dtype=np.float64, **SMALL)
    rec = Engine(skip_fit="recursive", **kw).fit(y)
    z = (y - y.mean()) / y.std()
    np.testing.assert_allclose(rec.predict(H), _iterated_ar(z, P, H) * y.std() + y.mean(),
                               rtol=1e-9)
    direct = Engine(skip_fit="direct", **kw).fit(y)
    both = Engine(skip_fit="both", **kw).fit(y)
    np.testing.assert_allclose(both.skip_, (rec.skip_ + direct.skip_) / 2, rtol=1e-12)
    np.testing.assert_allclose(both.predict(H), (rec.predict(H) + direct.predict(H)) / 2,
                               rtol=1e-9)
    assert not np.allclose(rec.predict(H), direct.predict(H))


def test_skip_may_read_more_lags_than_the_lookback():
    y = _ar2(200)
    P, H, lam = 12, 3, 1e-3
    f = Engine(lookback=4, horizon=H, skip_lags=P, skip_ridge=lam, steps=0, linear_skip=True,
               val_fraction=0.0, dtype=np.float64, **SMALL).fit(y)
    z = (y - y.mean()) / y.std()
    W = _ridge_map(z, P, H, lam)
    np.testing.assert_allclose(f.skip_, W, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(f.predict(H), (np.r_[z[-P:], 1.0] @ W) * y.std() + y.mean(),
                               rtol=1e-8)
    np.testing.assert_allclose(f.predict(H, y=y[:150]),
                               (np.r_[z[150 - P:150], 1.0] @ W) * y.std() + y.mean(), rtol=1e-8)
    with pytest.raises(ValueError, match=r"at least skip_lags = 12 \(the linear skip's lags\) "
                                         r"samples, got 11"):
        f.predict(H, y=y[:11])
    # with Mamba members (window 4) on top: trains, validates and forecasts
    g = Engine(lookback=4, horizon=H, skip_lags=P, linear_skip=True, steps=10, eval_every=5,
               val_fraction=0.2, **SMALL).fit(y)
    assert g.predict(H).shape == (H,) and np.isfinite(g.predict(H)).all()


def test_min_gain_keeps_the_skip_alone_unless_mamba_removes_that_share_of_its_error():
    y = _ar2(200)
    kw = dict(lookback=8, horizon=2, linear_skip=True, val_fraction=0.2, steps=50,
              eval_every=10, patience=100, lr=1e-2, seed=1, **SMALL)
    free = Engine(**kw).fit(y).history_[0]
    v0 = free["val_losses"][0][1]
    assert free["best_step"] > 0 and free["best_val"] < v0  # some step beats the skip...
    gain = 1 - free["best_val"] / v0
    strict = Engine(min_gain=min(0.99, gain + 0.01), **kw).fit(y).history_[0]
    assert strict["best_step"] == 0 and strict["best_val"] == v0  # ...but not by that much
    loose = Engine(min_gain=gain / 2, **kw).fit(y).history_[0]
    assert loose["best_step"] == free["best_step"]
    with pytest.raises(ValueError, match=r"min_gain must be in \[0, 1\), got 1.0"):
        Engine(min_gain=1.0)


def test_linear_skip_members_validate_against_the_same_skip_and_refit_uses_all_data():
    y = _ar2(200)
    kw = dict(lookback=12, horizon=2, linear_skip=True, val_fraction=0.2, refit=True,
              n_members=2, steps=10, eval_every=5, **SMALL)
    f = Engine(**kw).fit(y)
    # step 0 (the skip alone, the head is 0) is scored first, with the skip of the training
    # part for every member: the refit's skip (all of y) must not leak into validation
    v0 = [h["val_losses"][0] for h in f.history_]
    assert v0[0][0] == 0 and v0[0] == v0[1]
    # the final skip is refitted on all of y (in the scaler's units, fitted on the training part)
    X, Y = make_windows(f.scaler_.transform(y), 12, 2)
    Z = np.c_[X, np.ones(len(X))]
    R = 1e-3 * len(Z) * np.eye(13)
    R[-1, -1] = 0
    np.testing.assert_allclose(f.skip_, np.linalg.solve(Z.T @ Z + R, Z.T @ Y), rtol=1e-8)


def test_linear_skip_with_mamba_beats_the_skip_alone_on_a_nonlinear_series():
    # y[t] = 1.5 sin(2 y[t-1]) + noise: a linear autoregression explains little of it
    # (validation MSE 0.66 in scaled units); the Mamba part must bring it near the noise
    # (0.08 with seeds 0-2)
    rng = np.random.default_rng(0)
    y = np.zeros(700)
    for t in range(1, 700):
        y[t] = 1.5 * np.sin(2 * y[t - 1]) + 0.3 * rng.standard_normal()
    f = Engine(lookback=8, horizon=1, linear_skip=True,
                        steps=200, lr=1e-2, val_fraction=0.2, patience=100, seed=0,
                        **SMALL).fit(y)
    h = f.history_[0]
    v0 = h["val_losses"][0][1]
    assert h["best_step"] > 0 and h["best_val"] < 0.3 * v0, (h["best_val"], v0)


def test_median_combine_with_linear_skip_and_constructor_errors():
    y = _ar2(160)
    kw = dict(lookback=10, horizon=3, steps=15, val_fraction=0.0, n_members=3,
              linear_skip=True, instance_norm=True, **SMALL)
    f = Engine(combine="median", **kw).fit(y)
    m = Engine(combine="mean", **kw).fit(y)
    members = f.predict(3, members=True)
    assert members.shape == (3, 3)
    np.testing.assert_array_equal(f.predict(3), np.median(members, axis=0))
    assert not np.allclose(f.predict(3), m.predict(3))  # median of 3 differs from the mean
    with pytest.raises(ValueError, match="combine must be one of"):
        Engine(combine="max")
    with pytest.raises(ValueError, match="skip_fit must be one of"):
        Engine(lookback=10, skip_fit="ols", linear_skip=True)
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        Engine(steps=0)  # 0 steps only with the linear skip


# ---------------------------------------------------------------- bad input


def test_rejects_nan_in_the_series_naming_the_indices():
    y = _ar2(100)
    y[[10, 50]] = np.nan
    with pytest.raises(ValueError, match=r"y must be finite, got NaN or inf at 2 time "
                                         r"index\(es\), first \[10, 50\]"):
        Engine(lookback=8, **SMALL).fit(y)


def test_rejects_non_positive_horizon():
    f = Engine(lookback=8, horizon=2, steps=2, val_fraction=0.0, **SMALL)
    f.fit(_ar2(60))
    for h in (0, -3, 1.5):
        with pytest.raises(ValueError, match="horizon must be a positive integer"):
            f.predict(h)
    with pytest.raises(ValueError, match="horizon must be an integer >= 1, got 0"):
        Engine(lookback=8, horizon=0)


def test_rejects_series_too_short_for_the_lookback():
    with pytest.raises(ValueError, match=r"at least lookback \+ horizon = 25 samples "
                                         r"\(lookback=20, horizon=5\), got 24"):
        Engine(lookback=20, horizon=5, val_fraction=0.0, **SMALL).fit(np.ones(24))
    # 0.2 * 30 -> 6 validation samples, at least horizon = 5
    with pytest.raises(ValueError, match=r"\+ validation samples = 31 samples .*"
                                         r"6 for validation\), got 30"):
        Engine(lookback=20, horizon=5, val_fraction=0.2, **SMALL).fit(np.ones(30))
    f = Engine(lookback=8, steps=2, val_fraction=0.0, **SMALL).fit(_ar2(40))
    with pytest.raises(ValueError, match="y must have at least lookback = 8 samples, got 5"):
        f.predict(1, y=np.ones(5))


def test_rejects_bad_times_and_use_before_fit():
    y = np.ones(50)
    t = np.arange(50.0)
    t[20] = t[19]
    with pytest.raises(ValueError, match=r"t must be strictly increasing, got t\[19\]"):
        Engine(lookback=8, **SMALL).fit(y, t=t)
    with pytest.raises(ValueError, match=r"t must have shape \(50,\)"):
        Engine(lookback=8, **SMALL).fit(y, t=np.arange(49.0))
    with pytest.raises(RuntimeError, match="not fitted"):
        Engine(lookback=8, **SMALL).predict(1)


def test_load_rejects_a_checkpoint_that_is_not_a_forecaster(tmp_path):
    path = tmp_path / "plain.npz"
    save_checkpoint(path, {"w": np.zeros(2)})
    with pytest.raises(CheckpointError, match="not of a MambaForecaster"):
        MambaForecaster.load(path)
