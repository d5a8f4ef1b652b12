"""MambaClassifier (numba_mamba.timeseries): learning, ragged and multivariate inputs, pooling
gradients against finite differences, the scikit-learn protocol, pickling and bad input.  CPU."""

import pickle

import numpy as np
import pytest

from numba_mamba.models import init_params, model_backward, model_forward
from numba_mamba.timeseries import MambaClassifier

TINY = dict(d_model=8, n_layers=1, d_state=4, lr=1e-2)


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
    assert plain.best_steps_ == [30] and len(plain.losses_[0]) == 30


def test_ragged_multivariate_list_input_pads_without_changing_a_series_result():
    X, y = _two_frequencies(40, channels=2)
    ragged = [x[:30 + (i % 7)] for i, x in enumerate(X)]
    clf = MambaClassifier(steps=40, n_seeds=2, **TINY).fit(ragged, y)
    p_all = clf.predict_proba(ragged)
    # a series alone (no padding) gets the same probabilities as inside the padded batch
    np.testing.assert_allclose(clf.predict_proba([ragged[3]])[0], p_all[3], rtol=1e-5)
    assert clf.predict(ragged).shape == (40,) and len(clf.members_) == 2
    with pytest.raises(ValueError, match="X must have 2 channel"):
        clf.predict(X[:, :, :1])


@pytest.mark.parametrize("pool", ["mean", "last"])
def test_pooled_cross_entropy_gradient_matches_finite_differences(pool):
    X, y = _two_frequencies(6, length=12, channels=2)
    X = [x[:8 + i] for i, x in enumerate(X)]  # ragged: the mask and lengths matter
    clf = MambaClassifier(d_model=8, n_layers=1, d_state=4, pool=pool, steps=1,
                          dtype=np.float64).fit(X, y)
    x, mask, lengths = clf._prepare(X, fitted=True)
    onehot = np.eye(2)[y]
    params = init_params(clf.config_, seed=3, dtype=np.float64)

    def loss(p):
        out, cache = model_forward(x, p, clf.config_)
        z = clf._logits(out, mask, lengths)
        z = z - z.max(axis=1, keepdims=True)
        lp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return -(onehot * lp).sum(1).mean(), out, cache, np.exp(lp)

    _, out, cache, prob = loss(params)
    _, grads = model_backward(clf._dout((prob - onehot) / len(X), out, mask, lengths), cache)
    rng = np.random.default_rng(0)
    for name in ("decoder.weight", "encoder.weight", "layers.0.mixer.A_log"):
        flat = params[name].reshape(-1)
        for i in rng.choice(flat.size, 3, replace=False):
            old, eps = flat[i], 1e-6
            flat[i] = old + eps
            up = loss(params)[0]
            flat[i] = old - eps
            down = loss(params)[0]
            flat[i] = old
            np.testing.assert_allclose(grads[name].reshape(-1)[i], (up - down) / (2 * eps),
                                       rtol=1e-5, atol=1e-9)


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
