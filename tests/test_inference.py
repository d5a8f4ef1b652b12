"""Recurrent inference (CPU): step over a sequence equals the parallel forward."""

import numpy as np
import pytest

from numba_mamba import inference, models

TOL = {np.float64: dict(rtol=1e-10, atol=1e-11), np.float32: dict(rtol=2e-4, atol=2e-5)}


def _model(head, block, dtype, seed=0, **kw):
    extra = dict(vocab_size=13) if head == "lm" else dict(d_input=3, d_output=2)
    cfg = models.MambaConfig(d_model=8, n_layers=2, d_state=4, d_conv=4, block=block,
                             **extra, **kw)
    rng = np.random.default_rng(seed)
    params = models.init_params(cfg, seed=seed, dtype=dtype)
    # move off the initialization (zero biases, D = 1) so every term matters
    params = {k: (v + 0.2 * rng.standard_normal(v.shape)).astype(dtype) for k, v in params.items()}
    return cfg, params


def _inputs(cfg, rng, L, dtype):
    if cfg.head == "lm":
        return rng.integers(0, cfg.vocab_size, (2, L))
    return rng.standard_normal((2, L, cfg.d_input)).astype(dtype)


@pytest.mark.parametrize("head,block", [("lm", "mamba"), ("regression", "mamba"),
                                        ("lm", "lti"), ("regression", "lti")])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_step_over_a_sequence_equals_parallel_forward(head, block, dtype):
    cfg, params = _model(head, block, dtype, proj_bias=(block == "lti"))
    rng = np.random.default_rng(1)
    L = 11
    x = _inputs(cfg, rng, L, dtype)
    full, final = inference.prefill(x, params, cfg)
    state = inference.init_state(2, params, cfg)
    outs = []
    for t in range(L):
        out, state = inference.step(x[:, t], state, params, cfg)
        assert out.dtype == dtype
        outs.append(out)
    np.testing.assert_allclose(np.stack(outs, axis=1), full, **TOL[dtype])
    for i in range(cfg.n_layers):
        np.testing.assert_allclose(state.conv[i], final.conv[i], **TOL[dtype])
        np.testing.assert_allclose(state.ssm[i], final.ssm[i], **TOL[dtype])


@pytest.mark.parametrize("split", [1, 2, 5, 9])
def test_prefill_then_step_equals_full_forward(split):
    cfg, params = _model("lm", "mamba", np.float64, seed=2)
    rng = np.random.default_rng(3)
    tokens = _inputs(cfg, rng, 12, np.float64)
    full, _ = models.model_forward(tokens, params, cfg)
    head, state = inference.prefill(tokens[:, :split], params, cfg)
    np.testing.assert_allclose(head, full[:, :split], **TOL[np.float64])
    for t in range(split, 12):
        out, state = inference.step(tokens[:, t], state, params, cfg)
        np.testing.assert_allclose(out, full[:, t], **TOL[np.float64], err_msg=f"t={t}")


def test_prefill_shorter_than_conv_width_pads_conv_state_with_zeros():
    cfg, params = _model("lm", "mamba", np.float64)
    _, state = inference.prefill(np.array([[4, 2]]), params, cfg)
    assert state.conv[0].shape == (1, cfg.d_inner, cfg.d_conv)
    assert not state.conv[0][..., :2].any() and state.conv[0][..., 2:].any()


def test_greedy_generation_picks_the_argmax_of_the_parallel_forward():
    cfg, params = _model("lm", "mamba", np.float64, seed=4)
    prompt = np.array([[1, 5, 2], [7, 7, 0]])
    out = inference.generate(prompt, params, cfg, n_new=6)
    assert out.shape == (2, 9) and np.array_equal(out[:, :3], prompt)
    for t in range(3, 9):
        logits, _ = models.model_forward(out[:, :t], params, cfg)
        np.testing.assert_array_equal(out[:, t], logits[:, -1].argmax(-1), err_msg=f"t={t}")


def test_sampling_is_seeded_and_top_k_one_is_greedy():
    cfg, params = _model("lm", "mamba", np.float64, seed=5)
    prompt = np.array([[3, 1]])
    a = inference.generate(prompt, params, cfg, n_new=8, temperature=1.5, seed=11)
    b = inference.generate(prompt, params, cfg, n_new=8, temperature=1.5, seed=11)
    assert np.array_equal(a, b)
    greedy = inference.generate(prompt, params, cfg, n_new=8)
    top1 = inference.generate(prompt, params, cfg, n_new=8, temperature=2.0, top_k=1, seed=0)
    assert np.array_equal(greedy, top1)


def test_step_rejects_state_of_wrong_shape():
    cfg, params = _model("lm", "mamba", np.float64)
    state = inference.init_state(3, params, cfg)
    with pytest.raises(ValueError, match=r"^state.conv must hold 2 C-contiguous float64 arrays "
                                         r"of shape \(2, 16, 4\)"):
        inference.step(np.array([1, 2]), state, params, cfg)


def test_generate_rejects_regression_config():
    cfg, params = _model("regression", "mamba", np.float64)
    with pytest.raises(ValueError, match="language-model config"):
        inference.generate(np.zeros((1, 2), np.int64), params, cfg, n_new=1)
