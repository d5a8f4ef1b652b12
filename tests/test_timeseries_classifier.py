"""MambaClassifier (numba_mamba.timeseries): learning, ragged and multivariate inputs, pooling
gradients against finite differences, the scikit-learn protocol, pickling and bad input.  CPU."""

import pickle

import numpy as np
import pytest

from numba_mamba.models import init_params, model_backward, model_forward
from numba_mamba.timeseries import MambaClassifier

TINY = dict(d_model=8, n_layers=1, d_state=4, lr=1e-2, n_seeds=1)  # (the default is 2)


def _two_frequencies(n, length=40, seed=0, channels=1):
    """Class 0: period ~6 samples, class 1: period ~25; random phase and noise."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    t = np.arange(length)
    X = np.stack([np.stack([np.sin(2 * np.pi * t / (6 if c == 0 else 25) + rng.uniform(0, 6))
                            for _ in range(channels)], axis=-1) for c in y])
    return X + 0.2 * rng.standard_normal(X.shape), y


def test_learns_two_frequency_classes_and_probabilities_sum_to_one():
    X, y = _two_frequencies(80)
    clf = MambaClassifier(steps=80, **TINY).fit(X[:60, :, 0], np.array(["a", "b"])[y[:60]])
    assert list(clf.classes_) == ["a", "b"]
    assert clf.score(X[60:, :, 0], np.array(["a", "b"])[y[60:]]) >= 0.9
    p = clf.predict_proba(X[60:, :, 0])
    assert p.shape == (20, 2)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-12)
    assert clf.losses_[0][-1] < 0.5 * clf.losses_[0][0]


def test_early_stopping_holds_out_each_class_and_refits_on_all():
    X, y = _two_frequencies(40)
    clf = MambaClassifier(steps=60, val_fraction=0.2, eval_every=10, patience=2, **TINY)
    val = clf._split(np.r_[np.zeros(10, int), np.ones(5, int)])
    assert len(val) == 2 + 1 and (val < 10).sum() == 2  # 20 % of each class
    clf.fit(X, y)
    assert 10 <= clf.best_steps_[0] <= 60 and clf.best_steps_[0] % 10 == 0
    assert len(clf.losses_[0]) == clf.best_steps_[0]  # the refit runs the chosen steps
    plain = MambaClassifier(steps=30, **TINY).fit(X, y)
    assert plain.best_steps_ == [30, 30] and len(plain.losses_[0]) == 30  # 2 directions


def test_ragged_multivariate_list_input_pads_without_changing_a_series_result():
    X, y = _two_frequencies(40, channels=2)
    ragged = [x[:30 + (i % 7)] for i, x in enumerate(X)]
    clf = MambaClassifier(steps=40, **dict(TINY, n_seeds=2)).fit(ragged, y)
    p_all = clf.predict_proba(ragged)
    # a series alone (no padding) gets the same probabilities as inside the padded batch
    np.testing.assert_allclose(clf.predict_proba([ragged[3]])[0], p_all[3], rtol=1e-5)
    assert clf.predict(ragged).shape == (40,) and len(clf.members_) == 4  # x 2 directions
    with pytest.raises(ValueError, match="X must have 2 channel"):
        clf.predict(X[:, :, :1])


@pytest.mark.parametrize("pool", ["mean", "last", "meanmax"])
def test_pooled_cross_entropy_gradient_matches_finite_differences(pool):
    X, y = _two_frequencies(6, length=12, channels=2)
    X = [x[:8 + i] for i, x in enumerate(X)]  # ragged: the mask and lengths matter
    clf = MambaClassifier(d_model=8, n_layers=1, d_state=4, pool=pool, n_features=5, steps=1,
                          dtype=np.float64).fit(X, y)
    x, mask, lengths = clf._prepare(X, fitted=True)
    onehot = np.eye(2)[y]
    params = init_params(clf.config_, seed=3, dtype=np.float64)
    head = clf._init_head(np.random.default_rng(4), np)
    assert params["decoder.weight"].shape[0] == (5 if pool == "meanmax" else 2)

    def loss(p, h):
        out, cache = model_forward(x, p, clf.config_)
        z, hcache = clf._head_forward(h, out, mask, lengths)
        z = z - z.max(axis=1, keepdims=True)
        lp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return -(onehot * lp).sum(1).mean(), out, cache, hcache, np.exp(lp)

    _, out, cache, hcache, prob = loss(params, head)
    dout, dhead = clf._head_backward((prob - onehot) / len(X), hcache, out, mask, lengths)
    _, grads = model_backward(dout, cache)
    grads.update({"head." + k: v for k, v in dhead.items()})
    assert sorted(dhead) == (["bias", "weight"] if pool == "meanmax" else [])
    rng = np.random.default_rng(0)
    names = ["decoder.weight", "encoder.weight", "layers.0.mixer.A_log"]
    names += ["head." + k for k in head]
    for name in names:
        arr = head[name[5:]] if name.startswith("head.") else params[name]
        flat = arr.reshape(-1)
        for i in rng.choice(flat.size, min(3, flat.size), replace=False):
            old, eps = flat[i], 1e-6
            flat[i] = old + eps
            up = loss(params, head)[0]
            flat[i] = old - eps
            down = loss(params, head)[0]
            flat[i] = old
            np.testing.assert_allclose(grads[name].reshape(-1)[i], (up - down) / (2 * eps),
                                       rtol=1e-5, atol=1e-9)


def test_reverse_flips_each_series_within_its_own_length():
    from numba_mamba.timeseries._classifier import _reverse
    x = np.arange(12.0).reshape(2, 3, 2)
    mask = np.array([[1, 1, 1], [1, 1, 0]], dtype=float)[..., None]
    r = _reverse(x * mask, mask, np.array([3, 2]))
    np.testing.assert_array_equal(r[0], x[0, ::-1])
    np.testing.assert_array_equal(r[1], [[8, 9], [6, 7], [0, 0]])


def test_crops_stay_inside_each_series_and_keep_the_share():
    X, y = _two_frequencies(8, length=20)
    clf = MambaClassifier(crop=0.5, jitter=0.0, steps=1, **TINY).fit(X, y)
    x, mask, lengths = clf._prepare([s[:10 + i] for i, s in enumerate(X)], fitted=True)
    rng = np.random.default_rng(1)
    for _ in range(20):
        xc, mc, lc = clf._augment(x, mask, lengths, rng)
        assert np.all(lc >= np.ceil(0.5 * lengths)) and np.all(lc <= lengths)
        assert xc.shape[1] == lc.max()
        np.testing.assert_array_equal(mc[..., 0].sum(axis=1), lc)
        for i in range(len(lc)):  # a contiguous piece of series i
            piece, full = xc[i, :lc[i], 0], x[i, :lengths[i], 0]
            starts = [s for s in range(lengths[i] - lc[i] + 1)
                      if np.array_equal(full[s:s + lc[i]], piece)]
            assert starts and np.all(xc[i, lc[i]:] == 0)
    xj, _, _ = MambaClassifier(crop=1.0, jitter=0.5, steps=1, **TINY)._augment(x, mask, lengths,
                                                                        rng)
    noise = (xj - x)[..., 0]
    assert np.all(noise[mask[..., 0] == 0] == 0) and 0.4 < noise[mask[..., 0] > 0].std() < 0.6


def test_meanmax_bidirectional_augmented_learns_and_pickles():
    X, y = _two_frequencies(60, channels=2)
    ragged = [x[:30 + (i % 7)] for i, x in enumerate(X)]
    clf = MambaClassifier(steps=60, pool="meanmax", n_features=8, bidirectional=True, crop=0.8,
                          jitter=0.1, **dict(TINY, n_seeds=2)).fit(ragged[:40], y[:40])
    assert [m["reverse"] for m in clf.members_] == [False, True, False, True]
    assert clf.score(ragged[40:], y[40:]) >= 0.9
    # one series alone gets the probabilities it gets inside the padded batch
    p_all = clf.predict_proba(ragged[40:])
    np.testing.assert_allclose(clf.predict_proba([ragged[43]])[0], p_all[3], rtol=1e-5)
    g = pickle.loads(pickle.dumps(clf))
    np.testing.assert_array_equal(g.predict_proba(ragged[40:]), p_all)
    with pytest.raises(ValueError, match=r"crop must be in \(0, 1\], got 0"):
        MambaClassifier(crop=0)
    with pytest.raises(ValueError, match="jitter must be >= 0, got -1"):
        MambaClassifier(jitter=-1)


def test_global_normalization_keeps_the_level_that_per_series_normalization_removes():
    # the classes differ only in level (0 or 3): standardising each series removes it
    rng = np.random.default_rng(0)
    y = np.arange(60) % 2
    X = 3.0 * y[:, None, None] + rng.standard_normal((60, 20, 2)) * [1.0, 5.0]
    kw = dict(steps=60, bidirectional=False, **TINY)
    glob = MambaClassifier(normalize="global", **kw).fit(X[:40], y[:40])
    np.testing.assert_allclose(glob.center_, X[:40].mean(axis=(0, 1)), rtol=1e-10)
    np.testing.assert_allclose(glob.scale_, X[:40].std(axis=(0, 1)), rtol=1e-10)
    assert glob.score(X[40:], y[40:]) >= 0.9
    per_series = MambaClassifier(normalize="series", **kw).fit(X[:40], y[:40])
    assert per_series.score(X[40:], y[40:]) <= 0.75
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(glob)).predict_proba(X[40:]),
                                  glob.predict_proba(X[40:]))
    with pytest.raises(ValueError, match="normalize must be True, False, 'series' or 'global'"):
        MambaClassifier(normalize="minmax")


def test_parameters_clone_and_pickle():
    X, y = _two_frequencies(20)
    clf = MambaClassifier(steps=5, pool="last", **TINY)
    p = clf.get_params()
    assert p["pool"] == "last" and MambaClassifier(**p).get_params() == p
    with pytest.raises(ValueError, match="invalid parameter 'horizon'"):
        clf.set_params(horizon=3)
    with pytest.raises(ValueError, match="pool must be one of"):
        clf.set_params(pool="max")
    assert clf.pool == "last"
    clf.fit(X, y)
    g = pickle.loads(pickle.dumps(clf))
    np.testing.assert_array_equal(g.predict_proba(X), clf.predict_proba(X))
    try:
        from sklearn.base import clone
    except ImportError:
        return
    c = clone(clf)
    assert c.get_params() == clf.get_params() and c.members_ is None


def test_rejects_bad_input_with_the_reason():
    X, y = _two_frequencies(10)
    with pytest.raises(ValueError, match=r"y must have shape \(10,\)"):
        MambaClassifier(**TINY).fit(X, y[:5])
    with pytest.raises(ValueError, match="at least 2 classes, got 1"):
        MambaClassifier(**TINY).fit(X, np.zeros(10))
    with pytest.raises(ValueError, match=r"X\[1\] must have 1 channel\(s\) like X\[0\]"):
        MambaClassifier(**TINY).fit([np.ones(5), np.ones((5, 2))], [0, 1])
    bad = X.copy()
    bad[2, 3] = np.nan
    with pytest.raises(ValueError, match="X must be finite"):
        MambaClassifier(**TINY).fit(bad, y)
    with pytest.raises(RuntimeError, match="not fitted"):
        MambaClassifier().predict(X)
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        MambaClassifier(steps=0)
