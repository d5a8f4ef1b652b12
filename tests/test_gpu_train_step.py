"""TrainStep on the GPU: the captured step against the eager one, the learning
rate read from the device, the loss history, the device flag of invalid
batches, and the fused AdamW kernel against AdamW.step.

Tolerances.  Graph and eager run the same kernels, but the scan's backward
adds the gradients of B and C (and of the LTI block's parameters) with
atomic operations, whose order varies between runs, so the two paths need not
agree to the bit.  In float64 that noise is ~1e-16 relative and the paths
must agree to rtol 1e-9 after several steps.  In float32 Adam's update
``m / sqrt(v)`` amplifies gradient noise where a gradient is near zero, so
parameters are compared with an absolute tolerance of 2e-5, a fiftieth of
one step's largest move (lr = 1e-3), and losses to rtol 1e-5.  The fused
kernel is compared with AdamW.step (CuPy elementwise operations, each
rounded) to rtol 1e-6 in float32: the compiler fuses multiply-adds in the
kernel (one rounding instead of two); to rtol 1e-13 in float64.
"""

import warnings

import numpy as np
import pytest

from numba_mamba import models, training
from numba_mamba.graphs import CaptureWarning
from numba_mamba.optim import AdamW, FusedAdamW, clip_grad_norm, clip_grad_norm_device
from numba_mamba.training import TrainStep
from tests.gpu import gpu_module
from tests.test_train_step import _batches as cpu_batches

cupy, _HAVE_GPU, pytestmark = gpu_module()

LM = models.MambaConfig(d_model=32, n_layers=2, vocab_size=16, d_state=8)
REG_LTI = models.MambaConfig(d_model=16, n_layers=2, d_input=3, d_output=2, d_state=4,
                             block="lti")


def _batches(cfg, n, seed, masked=True):
    """``n`` NumPy batches ``(inputs, targets, mask)`` of one shape (4, 40)."""
    return cpu_batches(cfg, n, seed, masked, Bt=4, L=40)


def _host(params):
    return {k: cupy.asnumpy(v) for k, v in params.items()}


def _run(cfg, dtype, graph, batches, lrs):
    params = models.init_params(cfg, seed=3, dtype=dtype, xp=cupy)
    ts = TrainStep(params, cfg, AdamW(lr=1e-3, weight_decay=0.1), max_grad_norm=0.5,
                   graph=graph)
    for (x, y, mask), lr in zip(batches, lrs):
        if cfg.head == "regression":
            x = x.astype(dtype)
        ts.step(x, y, mask, lr=lr)
    return ts, _host(params), ts.losses()


@pytest.mark.parametrize("cfg,dtype", [(LM, np.float64), (LM, np.float32),
                                       (REG_LTI, np.float64), (REG_LTI, np.float32)],
                         ids=["lm-f64", "lm-f32", "lti-regression-f64", "lti-regression-f32"])
def test_graph_and_eager_train_steps_agree(cfg, dtype):
    batches = _batches(cfg, 8, 0)
    lrs = [1e-3 * (1 + (i % 3)) / 3 for i in range(8)]  # a new learning rate at most steps
    g_ts, g_params, g_losses = _run(cfg, dtype, True, batches, lrs)
    e_ts, e_params, e_losses = _run(cfg, dtype, False, batches, lrs)
    assert g_ts.captured and not e_ts.captured
    assert len(g_losses) == len(e_losses) == 8
    assert g_ts.optimizer.t == e_ts.optimizer.t == 8
    f64 = dtype == np.float64
    np.testing.assert_allclose(g_losses, e_losses, rtol=1e-9 if f64 else 1e-5)
    for k in g_params:
        if f64:
            np.testing.assert_allclose(g_params[k], e_params[k], rtol=1e-9, atol=1e-12,
                                       err_msg=k)
        else:
            np.testing.assert_allclose(g_params[k], e_params[k], rtol=0, atol=2e-5, err_msg=k)


def test_eager_train_step_on_the_gpu_equals_the_loop_it_replaces():
    """float64: the eager GPU step against loss_and_grads + clip_grad_norm + AdamW.step."""
    batches = _batches(LM, 4, 1)
    params = models.init_params(LM, seed=3, dtype=np.float64, xp=cupy)
    ref = {k: v.copy() for k, v in params.items()}
    ts = TrainStep(params, LM, AdamW(lr=1e-3, weight_decay=0.1), max_grad_norm=0.5,
                   graph=False)
    opt = AdamW(lr=1e-3, weight_decay=0.1)
    for x, y, mask in batches:
        ts.step(x, y, mask)
        loss, grads = models.loss_and_grads(cupy.asarray(x), cupy.asarray(y), ref, LM,
                                            mask=cupy.asarray(mask))
        clip_grad_norm(grads, 0.5)
        opt.step(ref, grads)
        (got,) = ts.losses()
        assert got == pytest.approx(loss, rel=1e-12)
    for k in params:
        np.testing.assert_allclose(cupy.asnumpy(params[k]), cupy.asnumpy(ref[k]), rtol=1e-9,
                                   atol=1e-12, err_msg=k)


def test_learning_rate_is_read_from_the_device_at_each_replay():
    batches = _batches(LM, 5, 2)
    params = models.init_params(LM, seed=3, xp=cupy)
    ts = TrainStep(params, LM, AdamW(lr=1e-3, weight_decay=0.1), graph=True)
    for x, y, mask in batches[:3]:
        ts.step(x, y, mask)
    assert ts.captured
    before = _host(params)
    m_before = {k: cupy.asnumpy(v) for k, v in ts.optimizer.m.items()}
    x, y, mask = batches[3]
    ts.step(x, y, mask, lr=0.0)  # no move, no decay: 1 - 0 * wd = 1
    after = _host(params)
    for k in params:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)
    assert any(not np.array_equal(cupy.asnumpy(ts.optimizer.m[k]), m_before[k])
               for k in params)
    x, y, mask = batches[4]
    ts.step(x, y, mask, lr=1e-2)
    moved = _host(params)
    assert max(float(np.abs(moved[k] - after[k]).max()) for k in params) > 5e-3


def test_loss_history_through_a_small_ring_buffer():
    batches = _batches(LM, 11, 3)
    params = models.init_params(LM, seed=3, dtype=np.float64, xp=cupy)
    ref_params = {k: v.copy() for k, v in params.items()}
    ts = TrainStep(params, LM, AdamW(lr=1e-3), graph=True, history=3)
    ref = TrainStep(ref_params, LM, AdamW(lr=1e-3), graph=False)
    got, want = [], []
    for i, (x, y, mask) in enumerate(batches):
        ts.step(x, y, mask)
        ref.step(x, y, mask)
        want += ref.losses()  # one at a time: the eager reference
        if i in (1, 8):
            got += ts.losses()
    got += ts.losses()
    assert ts.captured
    np.testing.assert_allclose(got, want, rtol=1e-9)
    assert ts.losses() == []


def test_cupy_batch_with_invalid_targets_raises_at_the_next_read():
    batches = _batches(LM, 4, 4, masked=False)
    params = models.init_params(LM, seed=3, xp=cupy)
    ts = TrainStep(params, LM, AdamW(lr=1e-3), graph=True)
    for i, (x, y, _) in enumerate(batches):
        if i == 2:
            y = y.copy()
            y[1, 5] = LM.vocab_size
        ts.step(cupy.asarray(x), cupy.asarray(y))
    assert ts.captured
    with pytest.raises(ValueError, match=r"step 2 .* invalid targets"):
        ts.losses()
    assert len(ts.losses()) == 4
    x, y, _ = batches[0]
    ts.step(cupy.asarray(x) - 1, cupy.asarray(y))  # an id -1
    with pytest.raises(ValueError, match=r"step 4 .* invalid inputs"):
        ts.losses()


def test_numpy_batch_validated_on_the_host_before_anything_runs():
    params = models.init_params(LM, seed=3, xp=cupy)
    ts = TrainStep(params, LM, AdamW(lr=1e-3))
    x = np.zeros((2, 8), np.int64)
    with pytest.raises(ValueError, match=r"inputs must be token ids in \[0, 16\)"):
        ts.step(x + 16, x)
    assert ts.optimizer.t == 0 and ts.losses() == []


def test_train_on_the_gpu_captures_and_matches_eager():
    batches = _batches(LM, 12, 5)
    runs = {}
    for graph in (True, False):
        params = models.init_params(LM, seed=3, dtype=np.float64, xp=cupy)
        with warnings.catch_warnings():
            warnings.simplefilter("error", CaptureWarning)
            res = training.train(params, LM, lambda s: batches[s], 12, lr=1e-3,
                                 warmup_steps=3, progress=False, log_every=5, graph=graph)
        runs[graph] = (res.losses, _host(params))
    assert len(runs[True][0]) == 12
    np.testing.assert_allclose(runs[True][0], runs[False][0], rtol=1e-9)
    for k in runs[True][1]:
        np.testing.assert_allclose(runs[True][1][k], runs[False][1][k], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_adamw_kernel_matches_adamw_step(dtype):
    rng = np.random.default_rng(0)
    shapes = {"w.weight": (300, 70), "norm.weight": (70,), "x.bias": (5,)}
    params = {k: cupy.asarray(rng.standard_normal(s).astype(dtype)) for k, s in shapes.items()}
    ref = {k: v.copy() for k, v in params.items()}
    fused = FusedAdamW(AdamW(lr=1e-2, weight_decay=0.1), params, max_grad_norm=3.0)
    opt = AdamW(lr=1e-2, weight_decay=0.1)
    rtol = 1e-6 if dtype == np.float32 else 1e-13
    for i in range(6):
        grads = {k: cupy.asarray(rng.standard_normal(s).astype(dtype)) * (0.2 * i)
                 for k, s in shapes.items()}
        fused.step({k: g.copy() for k, g in grads.items()}, lr=1e-2 / (i + 1))
        norm = clip_grad_norm(grads, 3.0)
        opt.step(ref, grads, lr=1e-2 / (i + 1))
        assert float(fused.norm[0]) == pytest.approx(norm, rel=1e-12)
        for k in params:
            np.testing.assert_allclose(cupy.asnumpy(params[k]), cupy.asnumpy(ref[k]),
                                       rtol=rtol, atol=rtol * 1e-2, err_msg=f"{i} {k}")
    for k in params:
        # m_t = b1 m + (1 - b1) g rounds on terms as large as max |m| (fused into
        # one FMA on the GPU): where the two cancel, the difference is a few ulp
        # of those terms, not of the small result
        want = cupy.asnumpy(opt.m[k])
        np.testing.assert_allclose(cupy.asnumpy(fused.m[k]), want, rtol=rtol * 10,
                                   atol=rtol * np.abs(want).max())


def test_clip_grad_norm_device_matches_clip_grad_norm():
    rng = np.random.default_rng(1)
    grads = {k: cupy.asarray(rng.standard_normal(s).astype(np.float32))
             for k, s in (("a", (100, 30)), ("b", (7,)))}
    ref = {k: g.copy() for k, g in grads.items()}
    norm = clip_grad_norm_device(grads, 1.0)
    assert isinstance(norm, cupy.ndarray)
    assert float(norm) == pytest.approx(clip_grad_norm(ref, 1.0), rel=1e-12)
    for k in grads:
        np.testing.assert_array_equal(cupy.asnumpy(grads[k]), cupy.asnumpy(ref[k]))


def _forecaster_fit(monkeypatch, device, graph):
    """A fit of one lookback of the forecaster (float64, irregular times, time_as="delta")
    and its TrainSteps.

    ``graph`` is forced on every TrainStep the forecaster makes; a CaptureWarning fails.
    """
    from numba_mamba.timeseries import _engine as _ts_engine

    made = []

    class Forced(TrainStep):
        def __init__(self, *a, **kw):
            kw["graph"] = graph
            super().__init__(*a, **kw)
            made.append(self)

    monkeypatch.setattr(_ts_engine, "TrainStep", Forced)
    rng = np.random.default_rng(0)
    t = np.cumsum(rng.uniform(0.5, 1.5, 200))
    y = np.stack([np.sin(t / 5), np.cos(t / 7)], 1) + 0.05 * rng.standard_normal((200, 2))
    f = _ts_engine.LookbackModel(lookback=16, horizon=3, steps=30, val_fraction=0.2,
                                  eval_every=10, time_as="delta", d_model=16, n_layers=2,
                                  d_state=8, batch_size=8, dtype=np.float64, device=device,
                                  progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CaptureWarning)
        f.fit(y, t=t)
    return f.history_[0], made


def test_forecaster_with_time_as_delta_trains_through_a_captured_step(monkeypatch):
    """Captured, the fit equals the eager (graph=False) GPU fit to float64 rounding (rtol 1e-9,
    see the module docstring), and the CPU fit's first losses to rtol 1e-6 (other kernels and
    reduction orders; the same bound as test_gpu_forecaster_matches_cpu_forecaster)."""
    captured, made = _forecaster_fit(monkeypatch, "gpu", "auto")
    assert len(made) == 1 and made[0].captured and made[0]._model is not None
    assert isinstance(made[0]._batch[3], cupy.ndarray)  # dtau, the extra input, on the device
    eager, made_e = _forecaster_fit(monkeypatch, "gpu", False)
    assert not made_e[0].captured
    cpu, _ = _forecaster_fit(monkeypatch, "cpu", "auto")
    assert captured["steps_run"] == eager["steps_run"] == cpu["steps_run"] == 30
    np.testing.assert_allclose(captured["train_losses"], eager["train_losses"], rtol=1e-9)
    np.testing.assert_allclose([v for _, v in captured["val_losses"]],
                               [v for _, v in eager["val_losses"]], rtol=1e-9)
    np.testing.assert_allclose(captured["train_losses"][:5], cpu["train_losses"][:5], rtol=1e-6)
