"""Decoder (CPU): steps and chunked prefills equal the parallel forward, the
token choice's rule and statistics, argument errors; the GPU kernels of the
decode step and of the choice compiled to sm_90 PTX and run in the CUDA
simulator against the CPU backend."""

import json
import re

import numpy as np
import pytest
from scipy import stats

from numba_mamba import _cpu_sample, inference, models

TOL64 = dict(rtol=1e-10, atol=1e-11)


def _model(block="mamba", dtype=np.float64, seed=0, vocab=13, **kw):
    cfg = models.MambaConfig(d_model=8, n_layers=2, d_state=4, d_conv=4, block=block,
                             vocab_size=vocab, **kw)
    rng = np.random.default_rng(seed)
    params = models.init_params(cfg, seed=seed, dtype=dtype)
    # off the initialization (zero biases, D = 1) so that every term matters
    params = {k: (v + 0.2 * rng.standard_normal(v.shape)).astype(dtype) for k, v in params.items()}
    return cfg, params


# ---------------------------------------------------------------- the model's logits


@pytest.mark.parametrize("block,extra", [("mamba", {}), ("lti", {}),
                                         ("mamba", dict(proj_bias=True, tie_embeddings=False)),
                                         ("lti", dict(proj_bias=True, conv_bias=False))])
def test_decoder_equals_model_forward_at_every_position(block, extra):
    cfg, params = _model(block, seed=1, **extra)
    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, (3, 14))
    full, _ = models.model_forward(tokens, params, cfg)
    dec = inference.Decoder(params, cfg, batch_size=3)
    last = dec.prefill(tokens[:, :5])
    np.testing.assert_allclose(last, full[:, 4], **TOL64)
    for t in range(5, 14):
        logits = dec.step(tokens[:, t])
        assert logits.shape == (3, cfg.vocab_size) and dec.position == t + 1
        np.testing.assert_allclose(logits, full[:, t], **TOL64, err_msg=f"t={t}")


def test_decoder_from_the_zero_state_steps_the_whole_sequence():
    cfg, params = _model(seed=3)
    tokens = np.random.default_rng(4).integers(0, cfg.vocab_size, (2, 9))
    full, _ = models.model_forward(tokens, params, cfg)
    dec = inference.Decoder(params, cfg, batch_size=2)
    for t in range(9):
        np.testing.assert_allclose(dec.step(tokens[:, t]), full[:, t], **TOL64)
    dec.reset()
    assert dec.position == 0
    np.testing.assert_allclose(dec.step(tokens[:, 0]), full[:, 0], **TOL64)


def test_float32_decoder_is_close_to_float64():
    cfg, p64 = _model(seed=5)
    p32 = {k: v.astype(np.float32) for k, v in p64.items()}
    tokens = np.random.default_rng(6).integers(0, cfg.vocab_size, (2, 10))
    full, _ = models.model_forward(tokens, p64, cfg)
    dec = inference.Decoder(p32, cfg, batch_size=2)
    out = [dec.prefill(tokens[:, :3]).copy()] + [dec.step(tokens[:, t]).copy()
                                                 for t in range(3, 10)]
    assert out[-1].dtype == np.float32
    np.testing.assert_allclose(np.stack(out, 1), full[:, 2:], rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("chunks", [[1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], [2, 5, 3, 2],
                                    [12], [3, 9]])
def test_chunked_prefill_equals_one_whole_prefill(chunks):
    cfg, params = _model(seed=7)
    tokens = np.random.default_rng(8).integers(0, cfg.vocab_size, (2, sum(chunks)))
    whole = inference.Decoder(params, cfg, batch_size=2)
    ref = whole.prefill(tokens).copy()
    dec = inference.Decoder(params, cfg, batch_size=2)
    start = 0
    for n in chunks:
        last = dec.prefill(tokens[:, start:start + n])
        start += n
    assert dec.position == whole.position == sum(chunks)
    np.testing.assert_allclose(last, ref, **TOL64)
    for i in range(cfg.n_layers):
        np.testing.assert_allclose(dec.state.conv[i], whole.state.conv[i], **TOL64)
        np.testing.assert_allclose(dec.state.ssm[i], whole.state.ssm[i], **TOL64)
    nxt = np.array([1, 2])
    np.testing.assert_allclose(dec.step(nxt), whole.step(nxt), **TOL64)


def test_prefill_after_steps_continues_the_sequence():
    cfg, params = _model(block="lti", seed=9)
    tokens = np.random.default_rng(10).integers(0, cfg.vocab_size, (1, 11))
    full, _ = models.model_forward(tokens, params, cfg)
    dec = inference.Decoder(params, cfg)
    dec.prefill(tokens[:, :2])
    dec.step(tokens[:, 2])
    np.testing.assert_allclose(dec.prefill(tokens[:, 3:10]), full[:, 9], **TOL64)
    np.testing.assert_allclose(dec.step(tokens[:, 10]), full[:, 10], **TOL64)


def test_model_forward_from_an_initial_state_continues_the_forward():
    cfg, params = _model(seed=11)
    tokens = np.random.default_rng(12).integers(0, cfg.vocab_size, (2, 10))
    full, _ = models.model_forward(tokens, params, cfg)
    _, state = inference.prefill(tokens[:, :7], params, cfg)
    rest, cache = models.model_forward(tokens[:, 7:], params, cfg,
                                       initial_state=(state.conv, state.ssm))
    np.testing.assert_allclose(rest, full[:, 7:], **TOL64)
    out, state2 = inference.prefill(tokens[:, 7:], params, cfg, state=state)
    _, final = inference.prefill(tokens, params, cfg)
    for i in range(cfg.n_layers):
        np.testing.assert_allclose(state2.conv[i], final.conv[i], **TOL64)
        np.testing.assert_allclose(state2.ssm[i], final.ssm[i], **TOL64)
    with pytest.raises(ValueError, match="initial_state, which has no backward"):
        models.model_backward(np.ones_like(rest), cache)
    with pytest.raises(ValueError, match=r"initial_state\[0\] must have shape \(2, 16, 4\)"):
        models.mamba_block_forward(np.zeros((2, 3, 8)), models.layer_params(params, 0),
                                   (np.zeros((2, 16, 3)), np.zeros((2, 16, 4))))


def test_refresh_sees_parameters_changed_in_place():
    cfg, params = _model(seed=13)
    tokens = np.random.default_rng(14).integers(0, cfg.vocab_size, (1, 6))
    dec = inference.Decoder(params, cfg)
    dec.prefill(tokens[:, :5])
    for k in params:
        params[k] *= 1.1  # in place, as an optimizer updates them
    dec.refresh()
    dec.reset()
    dec.prefill(tokens[:, :5])
    full, _ = models.model_forward(tokens, params, cfg)
    np.testing.assert_allclose(dec.step(tokens[:, 5]), full[:, 5], **TOL64)


# ---------------------------------------------------------------- generate


def _reference_greedy(prompt, params, cfg, n_new):
    """The plain loop: parallel forward of everything so far, argmax."""
    out = prompt
    for _ in range(n_new):
        logits, _ = models.model_forward(out, params, cfg)
        out = np.concatenate([out, logits[:, -1].argmax(-1)[:, None]], axis=1)
    return out


@pytest.mark.parametrize("block", ["mamba", "lti"])
def test_greedy_generate_equals_the_reference_loop(block):
    cfg, params = _model(block, seed=15)
    prompt = np.array([[1, 5, 2], [7, 7, 0]], np.int32)
    ref = _reference_greedy(prompt, params, cfg, 7)
    dec = inference.Decoder(params, cfg, batch_size=2)
    out = dec.generate(prompt, n_new=7)
    assert out.dtype == np.int32 and dec.position == 3 + 7 - 1
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(inference.generate(prompt, params, cfg, n_new=7), ref)
    # a second call starts again from the prompt; n_new = 0 returns the prompt
    np.testing.assert_array_equal(dec.generate(prompt, n_new=7), ref)
    np.testing.assert_array_equal(dec.generate(prompt, n_new=0), prompt)
    # more tokens than the buffer held so far (it grows)
    long = dec.generate(prompt, n_new=70)
    np.testing.assert_array_equal(long[:, :10], ref)


def test_sampled_generate_is_seeded_and_top_k_one_is_greedy():
    cfg, params = _model(seed=16)
    prompt = np.array([[3, 1]])
    dec = inference.Decoder(params, cfg)
    a = dec.generate(prompt, n_new=30, temperature=1.5, seed=11)
    b = dec.generate(prompt, n_new=30, temperature=1.5, seed=11)
    c = dec.generate(prompt, n_new=30, temperature=1.5, seed=12)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    greedy = dec.generate(prompt, n_new=30)
    assert not np.array_equal(a, greedy)
    np.testing.assert_array_equal(dec.generate(prompt, n_new=30, temperature=2.0, top_k=1),
                                  greedy)


# ---------------------------------------------------------------- the choice rule


def _choose_many(logits, temperature, top_k, seed, n_draws):
    """``n_draws`` choices from one row: the row repeated, the counter advanced."""
    V = logits.shape[0]
    rows = 500
    lg = np.tile(logits, (rows, 1))
    ints = np.array([seed, top_k], np.int64)
    temp = np.array([temperature], logits.dtype)
    counter = np.zeros(rows, np.int64)
    tokens = np.zeros(rows, np.int64)
    hist = np.zeros((rows, 1), np.int64)
    counts = np.zeros(V, np.int64)
    for _ in range(n_draws // rows):
        _cpu_sample.choose(lg, temp, ints, counter, tokens, hist)
        counts += np.bincount(tokens, minlength=V)
    return counts


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_greedy_choice_is_the_first_largest_logit(dtype):
    lg = np.array([[1, 3, 3, -1], [-np.inf] * 4, [np.nan, 0, 2, 2], [0.0, -0.0, -1, -2]], dtype)
    tokens = np.full(4, -1, np.int64)
    counter = np.array([0, 5, 1, 0])
    hist = np.full((4, 2), -1, np.int64)
    _cpu_sample.choose(lg, np.zeros(1, dtype), np.array([3, 0]), counter, tokens, hist)
    np.testing.assert_array_equal(tokens, [1, 0, 2, 0])
    np.testing.assert_array_equal(counter, [1, 6, 2, 1])
    np.testing.assert_array_equal(hist, [[1, -1], [-1, -1], [-1, 2], [0, -1]])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sampled_choices_follow_the_softmax(dtype, temperature):
    logits = np.array([0.3, -1.0, 1.2, 0.0, -0.4, 0.8], dtype)
    n = 30000
    counts = _choose_many(logits, temperature, 0, 7, n)
    p = np.exp(logits.astype(np.float64) / temperature)
    p /= p.sum()
    assert stats.chisquare(counts, n * p).pvalue > 1e-3
    # a wrong temperature is rejected by the same test
    q = np.exp(logits.astype(np.float64) / (2 * temperature))
    assert stats.chisquare(counts, n * q / q.sum()).pvalue < 1e-6


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_top_k_samples_only_the_top_k_ties_included(dtype):
    # the 3rd largest logit is -1.5 (three tokens hold it): 5 candidates
    logits = np.array([-1.5, -0.5, -3.0, -1.5, -0.2, -1.5, -7.0, -2.0], dtype)
    n = 30000
    counts = _choose_many(logits, 1.0, 3, 21, n)
    allowed = logits >= -1.5
    assert allowed.sum() == 5 and counts[~allowed].sum() == 0
    p = np.where(allowed, np.exp(logits.astype(np.float64)), 0)
    p /= p.sum()
    assert stats.chisquare(counts[allowed], n * p[allowed]).pvalue > 1e-3
    # top_k >= V samples from all
    assert (_choose_many(logits, 1.0, 8, 21, 5000) > 0).all()


def test_top_k_with_mixed_signs_and_zeros():
    # the 4th largest is 0.0 and -0.0 (equal floats): both candidates
    logits = np.array([2.0, -0.0, 5.0, 0.0, -3.0, 1.0, -0.5], np.float32)
    counts = _choose_many(logits, 3.0, 4, 5, 20000)
    np.testing.assert_array_equal(counts > 0, logits >= 0)


# ---------------------------------------------------------------- arguments


def test_arguments_are_checked_and_named():
    cfg, params = _model()
    dec = inference.Decoder(params, cfg, batch_size=2)
    with pytest.raises(ValueError, match=r"^tokens must have shape \(batch_size,\) with "
                                         r"batch_size 2, got \(3,\)"):
        dec.step(np.array([1, 2, 3]))
    with pytest.raises(ValueError, match=r"^tokens must have shape \(batch_size,\).*got \(2, 1\)"):
        dec.step(np.array([[1], [2]]))
    with pytest.raises(TypeError, match="^tokens must have an integer dtype, got float64"):
        dec.step(np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"^tokens must lie in \[0, 13\) \(vocab_size\), got "
                                         r"values in \[1, 13\]"):
        dec.step(np.array([1, 13]))
    with pytest.raises(ValueError, match=r"^tokens must have shape \(batch_size, length\) with "
                                         r"batch_size 2 and length >= 1, got \(2, 0\)"):
        dec.prefill(np.zeros((2, 0), np.int64))
    with pytest.raises(ValueError, match=r"^tokens must have shape .* got \(1, 4\)"):
        dec.generate(np.zeros((1, 4), np.int64), n_new=2)
    with pytest.raises(ValueError, match="^n_new must be an integer >= 0, got -1"):
        dec.generate(np.zeros((2, 4), np.int64), n_new=-1)
    with pytest.raises(ValueError, match="^top_k must be an integer >= 1, got 0"):
        dec.generate(np.zeros((2, 4), np.int64), n_new=2, temperature=1.0, top_k=0)
    with pytest.raises(ValueError, match=r"^temperature must be a finite number >= 0, got -0.5"):
        dec.generate(np.zeros((2, 4), np.int64), n_new=2, temperature=-0.5)
    with pytest.raises(ValueError, match="^seed must be an integer"):
        dec.generate(np.zeros((2, 4), np.int64), n_new=2, seed=1.5)
    with pytest.raises(ValueError, match="^n_new must be an integer >= 0, got -2"):
        inference.generate(np.zeros((2, 4), np.int64), params, cfg, n_new=-2)
    with pytest.raises(ValueError, match="^batch_size must be an integer >= 1, got 0"):
        inference.Decoder(params, cfg, batch_size=0)
    with pytest.raises(ValueError, match="^graph must be 'auto', True or False"):
        inference.Decoder(params, cfg, graph="yes")
    reg = models.MambaConfig(d_model=8, n_layers=1, d_input=2, d_output=1)
    with pytest.raises(ValueError, match="^Decoder needs a language-model config"):
        inference.Decoder(models.init_params(reg), reg)
    mixed = dict(params, **{"norm_f.weight": params["norm_f.weight"].astype(np.float32)})
    with pytest.raises(TypeError, match="^params must all be float32 or all float64"):
        inference.Decoder(mixed, cfg)


# ---------------------------------------------------------------- GPU kernels without a GPU


@pytest.mark.ptx_modules("sample", "step")
def test_new_kernels_compile_to_sm90_ptx_and_float32_stays_float32(ptx):
    # (ptx: every kernel compiled once per session, tests/conftest.py)
    from numba_mamba.cuda_kernels import sample, step

    names = []
    for module in (sample, step):
        for name, py_func, argtypes, is_f32, bounds in module.ptx_signatures():
            assert ".target sm_90" in ptx[name]
            if is_f32:
                assert not re.search(r"\.f64\b", ptx[name]), f"{name} has float64 instructions"
            names.append(name)
    assert {f"{k}_{d}" for k in ("choose_token", "conv_step", "ssm_step", "rmsnorm_step")
            for d in ("float32", "float64")} <= set(names)


@pytest.mark.background("tests/test_decoder.py", env={"NUMBA_ENABLE_CUDASIM": "1"})
def test_gpu_kernels_in_the_simulator_match_the_cpu_backend(background):
    # (this file run as a script under the simulator, beside the other tests: tests/background.py)
    proc = background
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    bad = {k: v for k, v in report.items() if v is not True}
    assert not bad and len(report) >= 10, report


def _simulate():
    """Each GPU kernel of the decode step and of the choice, under the simulator,
    against the CPU backend (float64 and float32).  Called in the subprocess."""
    import warnings

    import numba

    assert numba.config.ENABLE_CUDASIM
    from numba_mamba import _cpu_step
    from numba_mamba.cuda_kernels import sample, step

    warnings.simplefilter("ignore", RuntimeWarning)  # (NumPy scalars wrap in the hash)
    rng = np.random.default_rng(0)
    report = {}
    Bt, d, Dc, N, R, W, V = 2, 12, 6, 3, 2, 4, 9
    for dtype in (np.float64, np.float32):
        tol = dict(rtol=1e-12, atol=1e-13) if dtype == np.float64 else dict(rtol=2e-6, atol=1e-6)

        def r(*shape):
            return rng.standard_normal(shape).astype(dtype)

        table, w = r(V, d), r(d)
        tokens = np.array([3, 8], np.int64)
        for mode in ("embed", "add", "plain"):
            h0, delta = r(Bt, d), r(Bt, d)
            outs = []
            for k, kw in ((step, dict(threads=8)), (_cpu_step, {})):
                h, hn = h0.copy(), np.empty_like(h0)
                extra = (dict(tokens=tokens, table=table) if mode == "embed" else
                         dict(delta=delta) if mode == "add" else {})
                k.residual_rmsnorm(h, hn, w, 1e-5, **extra, **kw)
                outs.append((h, hn))
            report[f"rmsnorm {mode} {dtype.__name__}"] = bool(
                np.allclose(outs[0][0], outs[1][0], **tol)
                and np.allclose(outs[0][1], outs[1][1], **tol))
        xz, cw, cb, cs = r(Bt, 2 * Dc), r(Dc, W), r(Dc), r(Bt, Dc, W)
        res = []
        for k in (step, _cpu_step):
            s = cs.copy()
            res.append((k.conv_step(xz, s, cw, cb, True, out=np.empty((Bt, Dc), dtype)), s))
        report[f"conv_step {dtype.__name__}"] = bool(
            np.allclose(res[0][0], res[1][0], **tol) and np.array_equal(res[0][1], res[1][1]))
        A = -np.exp(r(Dc, N))
        for var in (True, False):
            for gate in (True, False):
                args = (r(Bt, Dc), xz if gate else None, r(Bt, R + 2 * N) if var else None,
                        r(Dc, R) if var else None, r(Dc), A, None if var else r(Dc, N),
                        None if var else r(Dc, N), r(Dc) if gate else None)
                s0 = r(Bt, Dc, N)
                res = []
                for k in (step, _cpu_step):
                    s = s0.copy()
                    res.append((k.ssm_step(*args, s), s))
                report[f"ssm_step var={var} gate={gate} {dtype.__name__}"] = bool(
                    np.allclose(res[0][0], res[1][0], **tol)
                    and np.allclose(res[0][1], res[1][1], **tol))
        # the choice: greedy with ties, sampled, top_k over both signs with ties
        lg = np.round(r(3, 11) * 2) / 2
        lg[1] = -np.abs(lg[1]) - 0.5  # all negative: the top_k search's negative branch
        lg[2, 3] = -0.0
        for temperature, top_k in ((0.0, 0), (1.3, 0), (1.0, 3), (2.0, 11)):
            outs = []
            for kind in ("gpu", "cpu"):
                counter = np.array([0, 4, 2], np.int64)
                tokens4 = np.zeros(3, np.int64)
                hist = np.full((3, 3), -1, np.int64)
                args = (lg, np.array([temperature], dtype), np.array([99, top_k], np.int64),
                        counter, tokens4, hist)
                for _ in range(2):
                    if kind == "gpu":
                        sample.choose(*args, threads=8)
                    else:
                        _cpu_sample.choose(*args)
                outs.append((tokens4, counter, hist))
            report[f"choose T={temperature} k={top_k} {dtype.__name__}"] = all(
                np.array_equal(a, b) for a, b in zip(*outs))
    return report


if __name__ == "__main__":
    print(json.dumps(_simulate()))
