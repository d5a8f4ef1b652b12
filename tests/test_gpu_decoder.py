"""Decoder on the GPU: the captured step against the eager one and the float64
CPU reference, generate with the graph, the device choice's statistics.

Tolerances.  The graph replays the eager step's kernels on the same buffers,
so graph and eager agree to the bit where every kernel is deterministic; the
matmuls are cuBLAS's, which may pick another kernel while a stream is
captured, so the logits are compared to 8 float32 ulps of their scale
(``rtol=1e-6`` of the largest logit) and the chosen tokens exactly.  Against
the float64 CPU reference a float32 decode is within ``2e-4`` of the largest
logit: float32 rounding through the layers over a few dozen steps.
"""

import numpy as np
import pytest
from scipy import stats

from numba_mamba import inference, models
from tests.gpu import gpu_module

cupy, _HAVE_GPU, pytestmark = gpu_module()


def _model(dtype=np.float32, seed=0, d_model=32, n_layers=2, vocab=37, block="mamba",
           d_state=8, **kw):
    cfg = models.MambaConfig(d_model=d_model, n_layers=n_layers, d_state=d_state,
                             vocab_size=vocab, block=block, **kw)
    rng = np.random.default_rng(seed)
    params = models.init_params(cfg, seed=seed, dtype=np.float64)
    params = {k: v + 0.1 * rng.standard_normal(v.shape) for k, v in params.items()}
    return cfg, params, {k: cupy.asarray(v.astype(dtype)) for k, v in params.items()}


def _close_to_scale(name, got, ref, rtol):
    got, ref = cupy.asnumpy(got).astype(np.float64), np.asarray(ref, np.float64)
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err <= rtol, f"{name}: max error {err:.3g} of the largest |value| > {rtol}"


@pytest.mark.parametrize("block", ["mamba", "lti"])
def test_graph_steps_equal_eager_steps(block):
    cfg, _, params = _model(block=block, seed=1, proj_bias=(block == "lti"))
    tokens = cupy.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, (3, 30)))
    graph = inference.Decoder(params, cfg, batch_size=3, graph=True)
    eager = inference.Decoder(params, cfg, batch_size=3, graph=False)
    for dec in (graph, eager):
        dec.prefill(tokens[:, :6])
    for t in range(6, 30):
        a = graph.step(tokens[:, t]).copy()
        b = eager.step(tokens[:, t]).copy()
        _close_to_scale(f"logits t={t}", a, cupy.asnumpy(b), 1e-6)
    assert graph.captured and not eager.captured
    for i in range(cfg.n_layers):
        _close_to_scale("ssm state", graph.state.ssm[i], cupy.asnumpy(eager.state.ssm[i]), 1e-6)
        np.testing.assert_array_equal(cupy.asnumpy(graph.state.conv[i]),
                                      cupy.asnumpy(eager.state.conv[i]))


@pytest.mark.parametrize("block", ["mamba", "lti"])
def test_float32_gpu_decode_matches_the_float64_cpu_reference(block):
    cfg, p64, params = _model(block=block, seed=3)
    tokens = np.random.default_rng(4).integers(0, cfg.vocab_size, (2, 40))
    full, _ = models.model_forward(tokens, p64, cfg)
    dec = inference.Decoder(params, cfg, batch_size=2, graph=True)
    dec.prefill(cupy.asarray(tokens[:, :5]))
    dec.prefill(tokens[:, 5:9])  # host tokens, a second piece
    for t in range(9, 40):
        _close_to_scale(f"t={t}", dec.step(cupy.asarray(tokens[:, t])), full[:, t], 2e-4)
    assert dec.captured


def test_float64_gpu_decode_matches_the_cpu_decode_and_samples_the_same_tokens():
    cfg, p64, params = _model(np.float64, seed=5)
    prompt = np.random.default_rng(6).integers(0, cfg.vocab_size, (2, 7))
    cpu = inference.Decoder(p64, cfg, batch_size=2)
    gpu = inference.Decoder(params, cfg, batch_size=2, graph=True)
    for kw in (dict(), dict(temperature=1.3, seed=5), dict(temperature=0.8, top_k=4, seed=9)):
        a = cpu.generate(prompt, n_new=25, **kw)
        b = gpu.generate(cupy.asarray(prompt), n_new=25, **kw)
        assert isinstance(b, cupy.ndarray)
        # the same rule and random numbers; a draw could differ only where two
        # scores tie within a float64 ulp
        np.testing.assert_array_equal(cupy.asnumpy(b), a, err_msg=str(kw))
    np.testing.assert_allclose(cupy.asnumpy(gpu.step(prompt[:, 0])), cpu.step(prompt[:, 0]),
                               rtol=1e-10, atol=1e-12)


def test_generate_with_the_graph_at_a_scaled_down_130m_shape():
    # mamba-130m is d_model 768, 24 layers, vocab 50280: a quarter of each
    cfg, _, params = _model(seed=7, d_model=192, n_layers=6, vocab=12570, d_state=16)
    prompt = cupy.asarray(np.random.default_rng(8).integers(0, cfg.vocab_size, (2, 17)))
    graph = inference.Decoder(params, cfg, batch_size=2, graph=True)
    eager = inference.Decoder(params, cfg, batch_size=2, graph=False)
    for kw in (dict(), dict(temperature=1.0, top_k=50, seed=3)):
        a = graph.generate(prompt, n_new=40, **kw)
        b = eager.generate(prompt, n_new=40, **kw)
        assert a.shape == (2, 57) and graph._next.captured
        np.testing.assert_array_equal(cupy.asnumpy(a), cupy.asnumpy(b), err_msg=str(kw))
    # each greedy token of the graph is the argmax of the eager step's logits
    eager.reset()
    seq = cupy.asnumpy(graph.generate(prompt, n_new=12))
    logits = eager.prefill(prompt)
    for t in range(17, 29):
        assert (cupy.asnumpy(logits.argmax(-1)) == seq[:, t]).all()
        logits = eager.step(cupy.asarray(seq[:, t]))
    assert inference.generate(prompt, params, cfg, n_new=3).shape == (2, 20)


def _draws(logits_row, temperature, top_k, rows=4000, rounds=5, seed=17):
    """Choices from one row of logits: ``rows`` copies per launch (each row its
    own stream of numbers), ``rounds`` launches (the counters advance)."""
    from numba_mamba.cuda_kernels import sample

    lg = cupy.asarray(np.tile(logits_row, (rows, 1)))
    args = (cupy.asarray([temperature], lg.dtype), cupy.asarray([seed, top_k], cupy.int64),
            cupy.zeros(rows, cupy.int64), cupy.zeros(rows, cupy.int64),
            cupy.zeros((rows, 1), cupy.int64))
    counts = np.zeros(lg.shape[1], np.int64)
    for _ in range(rounds):
        sample.choose(lg, *args)
        counts += np.bincount(cupy.asnumpy(args[3]), minlength=lg.shape[1])
    return counts


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_device_sampling_follows_the_softmax_and_top_k(dtype):
    logits = np.array([0.3, -1.0, 1.2, 0.0, -0.4, 0.8, -1.5, -1.5], dtype)
    counts = _draws(logits, 0.7, 0)
    p = np.exp(logits.astype(np.float64) / 0.7)  # (float64: chisquare wants the sums equal)
    assert stats.chisquare(counts, counts.sum() * p / p.sum()).pvalue > 1e-3
    counts = _draws(logits, 1.0, 7)  # the 7th largest is -1.5, held twice: all 8 allowed
    assert (counts > 0).all()
    counts = _draws(logits, 1.0, 3)
    allowed = logits >= 0.3
    p = np.where(allowed, np.exp(logits.astype(np.float64)), 0)
    assert counts[~allowed].sum() == 0
    assert stats.chisquare(counts[allowed], counts.sum() * p[allowed] / p.sum()).pvalue > 1e-3


def test_device_choice_at_vocabulary_size_greedy_and_top_k():
    from numba_mamba.cuda_kernels import sample

    rng = np.random.default_rng(9)
    Bt, V, k = 64, 50280, 40
    host = np.round(rng.standard_normal((Bt, V)) * 8).astype(np.float32) / 4  # many ties
    host[5] = -np.abs(host[5]) - 1  # a row of negative logits
    lg = cupy.asarray(host)
    out = cupy.zeros(Bt, cupy.int64)
    counter = cupy.zeros(Bt, cupy.int64)
    hist = cupy.zeros((Bt, 4), cupy.int64)
    sample.choose(lg, cupy.zeros(1, cupy.float32), cupy.asarray([0, 0]), counter, out, hist)
    np.testing.assert_array_equal(cupy.asnumpy(out), host.argmax(-1))
    kth = np.partition(host, V - k, axis=-1)[:, V - k]
    temp = cupy.asarray([3.0], cupy.float32)
    for seed in range(3):
        sample.choose(lg, temp, cupy.asarray([seed, k]), counter, out, hist)
        chosen = host[np.arange(Bt), cupy.asnumpy(out)]
        assert (chosen >= kth).all()
    np.testing.assert_array_equal(cupy.asnumpy(counter), 4)
    assert (cupy.asnumpy(hist)[:, 1:] != cupy.asnumpy(hist)[:, :1]).any()  # draws differ
