"""TrainStep, FusedAdamW and the sync-free losses on the CPU; the optim kernels'
PTX and, in the CUDA simulator, their agreement with the CPU backend.

On NumPy arrays a TrainStep runs the same code as on the GPU (device losses,
FusedAdamW, the loss ring buffer) eagerly; it must equal the loop it replaces
(``loss_and_grads``, ``clip_grad_norm``, ``AdamW.step``) to the bit.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from numba_mamba import models, training
from numba_mamba.optim import AdamW, FusedAdamW, clip_grad_norm, clip_grad_norm_device
from numba_mamba.training import TrainStep

ROOT = Path(__file__).resolve().parents[1]

LM = models.MambaConfig(d_model=8, n_layers=2, vocab_size=7, d_state=4)
REG = models.MambaConfig(d_model=8, n_layers=2, d_input=3, d_output=2, d_state=4)
REG_LTI = models.MambaConfig(d_model=8, n_layers=1, d_input=2, d_output=1, d_state=4,
                             block="lti", proj_bias=True)


def _batches(cfg, n, seed, masked, Bt=3, L=10):
    """``n`` batches ``(inputs, targets, mask)`` of one shape."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        if cfg.head == "lm":
            x = rng.integers(0, cfg.vocab_size, (Bt, L))
            y = rng.integers(0, cfg.vocab_size, (Bt, L))
            y[0, :2] = -100  # ignored
            mask = rng.random((Bt, L)) > 0.3 if masked else None
        else:
            x = rng.standard_normal((Bt, L, cfg.d_input))
            y = rng.standard_normal((Bt, L, cfg.d_output))
            mask = rng.random((Bt, L, 1)) > 0.3 if masked else None
        out.append((x, y, mask))
    return out


def _reference(params, cfg, batches, lrs, opt, max_norm):
    """The loop TrainStep replaces; yields (loss, params copy) per step."""
    for (x, y, mask), lr in zip(batches, lrs):
        loss, grads = models.loss_and_grads(x, y, params, cfg, mask=mask)
        if max_norm is not None:
            clip_grad_norm(grads, max_norm)
        opt.step(params, grads, lr=lr)
        yield loss, {k: v.copy() for k, v in params.items()}


CASES = {
    "lm-float32-mask-clipped": (LM, np.float32, True, 0.05),
    "lm-float64-noclip": (LM, np.float64, False, None),
    "regression-float32-mask": (REG, np.float32, True, 1.0),
    "regression-lti-float64-clipped": (REG_LTI, np.float64, False, 0.01),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_train_step_equals_the_loop_it_replaces_to_the_bit(case):
    cfg, dtype, masked, max_norm = CASES[case]
    batches = _batches(cfg, 6, 1, masked)
    if cfg.head == "regression":
        batches = [(x.astype(dtype), y.astype(dtype), m) for x, y, m in batches]
    lrs = [3e-2, 2e-2, 1e-2, 5e-3, 3e-2, 1e-3]
    ref_params = models.init_params(cfg, seed=2, dtype=dtype)
    params = {k: v.copy() for k, v in ref_params.items()}
    ref_opt = AdamW(lr=0.1, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.2)
    opt = AdamW(lr=0.1, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.2)
    ts = TrainStep(params, cfg, opt, max_grad_norm=max_norm, graph=False)
    reference = _reference(ref_params, cfg, batches, lrs, ref_opt, max_norm)
    for i, ((x, y, mask), lr, (ref_loss, ref_p)) in enumerate(zip(batches, lrs, reference)):
        ts.step(x, y, mask, lr=lr)
        (loss,) = ts.losses()
        assert loss == ref_loss, (i, loss, ref_loss)
        for k in params:
            np.testing.assert_array_equal(params[k], ref_p[k], err_msg=f"step {i}: {k}")
    assert opt.t == ref_opt.t == len(batches)
    for k in params:
        np.testing.assert_array_equal(opt.m[k], ref_opt.m[k], err_msg=k)
        np.testing.assert_array_equal(opt.v[k], ref_opt.v[k], err_msg=k)
    if max_norm is not None:  # the clipping was active at some step
        assert float(ts.grad_norm[0]) > 0


def test_losses_read_every_k_steps_and_past_the_ring_buffer():
    batches = _batches(LM, 11, 3, masked=False)
    ref_params = models.init_params(LM, seed=0)
    params = {k: v.copy() for k, v in ref_params.items()}
    ref = [loss for loss, _ in _reference(ref_params, LM, batches, [1e-2] * 11,
                                          AdamW(lr=1e-2), 1.0)]
    ts = TrainStep(params, LM, AdamW(lr=1e-2), history=3)  # 11 steps through 3 slots
    got = []
    for i, (x, y, _) in enumerate(batches):
        ts.step(x, y)
        if i in (1, 8):
            got += ts.losses()
    got += ts.losses()
    assert got == ref
    assert ts.losses() == []


def test_optimizer_state_loaded_later_is_taken_up():
    batches = _batches(LM, 4, 4, masked=False)
    params = models.init_params(LM, seed=0, dtype=np.float64)
    opt = AdamW(lr=1e-2)
    ts = TrainStep(params, LM, opt)
    for x, y, _ in batches[:2]:
        ts.step(x, y)
    saved = {k: v.copy() if isinstance(v, np.ndarray) else v for k, v in opt.state_dict().items()}
    saved["m"] = {k: v.copy() for k, v in saved["m"].items()}
    saved["v"] = {k: v.copy() for k, v in saved["v"].items()}
    mid = {k: v.copy() for k, v in params.items()}
    for x, y, _ in batches[2:]:
        ts.step(x, y)
    after = {k: v.copy() for k, v in params.items()}
    # back to step 2 through the optimizer's public state: the same two steps again
    for k in params:
        params[k][...] = mid[k]
    opt.load_state_dict(saved)
    for x, y, _ in batches[2:]:
        ts.step(x, y)
    assert opt.t == 4
    for k in params:
        np.testing.assert_array_equal(params[k], after[k], err_msg=k)


def test_train_log_every_gives_the_losses_of_the_loop_and_resumes(tmp_path):
    batches = _batches(LM, 9, 5, masked=True)

    def batch_fn(s):
        return batches[s]

    ref_params = models.init_params(LM, seed=1)
    opt = AdamW(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    lrs = [training.warmup_cosine(s, 1e-2, 2, 9, 1e-3) for s in range(9)]
    ref = [loss for loss, _ in _reference(ref_params, LM, batches, lrs, opt, 1.0)]
    for log_every in (1, 4, 20):
        params = models.init_params(LM, seed=1)
        res = training.train(params, LM, batch_fn, 9, lr=1e-2, warmup_steps=2, min_lr=1e-3,
                             progress=False, log_every=log_every)
        assert res.losses == ref, log_every
        for k in params:
            np.testing.assert_array_equal(params[k], ref_params[k], err_msg=k)
    # interrupted after the checkpoint of step 5, resumed: the same run
    path = str(tmp_path / "ck.npz")

    def interrupted(s):
        if s == 6:
            raise KeyboardInterrupt
        return batches[s]

    params = models.init_params(LM, seed=1)
    with pytest.raises(KeyboardInterrupt):
        training.train(params, LM, interrupted, 9, lr=1e-2, warmup_steps=2, min_lr=1e-3,
                       progress=False, checkpoint_path=path, checkpoint_every=5, log_every=2)
    params = models.init_params(LM, seed=7)  # overwritten by the checkpoint
    res = training.train(params, LM, batch_fn, 9, lr=1e-2, warmup_steps=2, min_lr=1e-3,
                         progress=False, checkpoint_path=path, resume=True, log_every=3)
    assert (res.step, res.optimizer.t) == (9, 9)
    assert res.losses == ref
    for k in params:
        np.testing.assert_array_equal(params[k], ref_params[k], err_msg=k)


def test_train_rejects_bad_log_every():
    params = models.init_params(LM)
    with pytest.raises(ValueError, match="log_every must be a positive integer, got 0"):
        training.train(params, LM, lambda s: None, 1, log_every=0)


# ---------------------------------------------------------------- errors


def _ts(cfg=LM, **kw):
    return TrainStep(models.init_params(cfg, seed=0), cfg, AdamW(lr=1e-3), **kw)


def test_step_names_the_argument_of_out_of_range_ids_and_targets():
    ts = _ts()
    x = np.array([[1, 2, 7]])
    with pytest.raises(ValueError, match=r"inputs must be token ids in \[0, 7\), got values "
                                         r"in \[1, 7\]"):
        ts.step(x, np.zeros_like(x))
    x = np.array([[1, 2, 3]])
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 7\) or equal -100"):
        ts.step(x, np.array([[-1, 0, 0]]))
    ts.step(x, np.array([[-100, 0, 6]]))  # ignored target: fine
    # a masked-out target is not counted either
    ts2 = _ts()
    ts2.step(x, np.array([[9, 0, 6]]), mask=np.array([[False, True, True]]))
    assert len(ts2.losses()) == 1


def test_step_rejects_another_shape_dtype_or_mask():
    ts = _ts()
    x = np.zeros((2, 5), np.int64)
    ts.step(x, x)
    with pytest.raises(ValueError, match=r"inputs must have shape \(2, 5\).*got shape \(2, 6\)"):
        ts.step(np.zeros((2, 6), np.int64), np.zeros((2, 6), np.int64))
    with pytest.raises(ValueError, match="targets must have shape"):
        ts.step(x, np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError, match="mask must be None at every step"):
        ts.step(x, x, mask=np.ones((2, 5), bool))
    with pytest.raises(ValueError, match=r"inputs must be integer token ids"):
        _ts().step(np.zeros((2, 5)), x)
    with pytest.raises(ValueError, match=r"mask must have the shape \(2, 5\) of targets"):
        _ts().step(x, x, mask=np.ones((2, 1), bool))
    with pytest.raises(ValueError, match=r"targets must have the \(batch, length\) \(2, 5\)"):
        _ts(REG).step(np.zeros((2, 5, 3), np.float32), np.zeros((2, 4, 2), np.float32))
    assert len(ts.losses()) == 1  # the rejected batches ran nothing


def test_constructor_errors_name_the_argument():
    params = models.init_params(LM)
    with pytest.raises(ValueError, match="history must be a positive integer"):
        TrainStep(params, LM, history=0)
    with pytest.raises(ValueError, match="graph must be"):
        TrainStep(params, LM, graph="yes")
    with pytest.raises(ValueError, match="max_grad_norm must be positive or None"):
        TrainStep(params, LM, max_grad_norm=0.0)
    mixed = dict(params)
    mixed["norm_f.weight"] = mixed["norm_f.weight"].astype(np.float64)
    with pytest.raises(TypeError, match="params must share one dtype"):
        TrainStep(mixed, LM)


def test_invalid_batch_flagged_on_the_device_raises_at_the_next_read(monkeypatch):
    # CuPy batches are checked on the device only; on the CPU the same path runs
    # when the host-side check is skipped.
    monkeypatch.setattr(training, "_check_token_ranges", lambda *a: None)
    ts = _ts()
    x = np.array([[1, 2, 3]])
    ts.step(x, x)
    ts.step(x, np.array([[0, 9, 0]]))  # step 1: a target out of range
    ts.step(np.array([[1, -2, 3]]), np.array([[0, 9, 0]]))  # step 2: both
    with pytest.raises(ValueError, match=r"step 1 .* invalid targets \(outside \[0, 7\) and "
                                         r"not -100"):
        ts.losses()
    assert len(ts.losses()) == 3  # read before raising; the flag is cleared
    ts.step(np.array([[1, 7, 3]]), x)
    with pytest.raises(ValueError, match=r"step 3 .* invalid inputs \(token ids outside"):
        ts.losses()


def test_device_loss_and_grads_flags_instead_of_raising():
    params = models.init_params(LM, seed=0, dtype=np.float64)
    x = np.array([[1, 2, 3, 4]])
    y = np.array([[2, 3, 4, 5]])
    loss, grads, bad = models.device_loss_and_grads(x, y, params, LM)
    ref_loss, ref_grads = models.loss_and_grads(x, y, params, LM)
    assert (float(loss), int(bad)) == (ref_loss, 0)
    for k in grads:
        np.testing.assert_array_equal(grads[k], ref_grads[k])
    # a bad target is left out: the loss of the other three
    loss, _, bad = models.device_loss_and_grads(x, np.array([[2, 3, 4, 70]]), params, LM)
    mask = np.array([[True, True, True, False]])
    assert (float(loss), int(bad)) == (models.loss_and_grads(x, y, params, LM, mask=mask)[0], 1)
    # a bad id reads row 0
    loss, _, bad = models.device_loss_and_grads(np.array([[1, 2, 3, -4]]), y, params, LM)
    assert (float(loss), int(bad)) == (
        models.loss_and_grads(np.array([[1, 2, 3, 0]]), y, params, LM)[0], 2)
    with pytest.raises(ValueError, match="ids must lie in"):
        models.loss_and_grads(np.array([[1, 2, 3, -4]]), y, params, LM)


def test_mse_count_as_array_divides_like_the_float():
    rng = np.random.default_rng(0)
    pred, target = rng.standard_normal((2, 3, 7, 1)).astype(np.float32)
    mask = rng.random((7, 1)) > 0.5
    for sync in (True, False):
        loss, cache = models.mse_forward(pred, target, mask=mask, sync=sync)
        assert type(cache.count) is (float if sync else np.float32)
    ref = models.mse_forward(pred, target, mask=mask)
    got = models.mse_forward(pred, target, mask=mask, sync=False)
    assert ref[0] == got[0]
    np.testing.assert_array_equal(models.mse_backward(1.0, ref[1]),
                                  models.mse_backward(1.0, got[1]))


# ---------------------------------------------------------------- FusedAdamW, clipping


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_adamw_equals_adamw_step(dtype):
    rng = np.random.default_rng(0)
    shapes = {"a.weight": (3, 4), "norm.weight": (5,), "b.bias": (2,)}
    params = {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}
    ref = {k: v.copy() for k, v in params.items()}
    opt, ref_opt = (AdamW(lr=0.05, weight_decay=0.3) for _ in range(2))
    fused = FusedAdamW(opt, params, max_grad_norm=2.0)
    for i in range(5):
        grads = {k: rng.standard_normal(s).astype(dtype) * (i + 1) for k, s in shapes.items()}
        fused.step({k: g.copy() for k, g in grads.items()}, lr=0.05 / (i + 1))
        norm = clip_grad_norm(grads, 2.0)
        ref_opt.step(ref, grads, lr=0.05 / (i + 1))
        assert float(fused.norm[0]) == norm
        for k in params:
            np.testing.assert_array_equal(params[k], ref[k], err_msg=f"{i} {k}")
    assert opt.state_dict()["t"] == 5
    with pytest.raises(KeyError, match="grads lack entries"):
        fused.step({"a.weight": grads["a.weight"]})
    with pytest.raises(ValueError, match=r"grads\['b.bias'\] must have shape \(2,\) and dtype"):
        fused.step({**grads, "b.bias": np.zeros(3, dtype)})


def test_clip_grad_norm_device_equals_clip_grad_norm():
    rng = np.random.default_rng(2)
    for max_norm in (0.5, 100.0):
        grads = {k: rng.standard_normal(s).astype(np.float32) for k, s in (("a", (4, 5)),
                                                                           ("b", (3,)))}
        ref = {k: g.copy() for k, g in grads.items()}
        norm = clip_grad_norm_device(grads, max_norm)
        assert float(norm) == pytest.approx(clip_grad_norm(ref, max_norm), rel=1e-15)
        for k in grads:
            np.testing.assert_array_equal(grads[k], ref[k])
    with pytest.raises(ValueError, match="max_norm must be positive"):
        clip_grad_norm_device(grads, 0)


# ---------------------------------------------------------------- kernels


def test_optim_kernels_compile_to_sm90_ptx_and_float32_stays_float32(monkeypatch):
    cuda = pytest.importorskip("numba.cuda")
    import numba
    if numba.config.ENABLE_CUDASIM:
        pytest.skip("no PTX under the CUDA simulator")
    from numba.cuda import dispatcher

    from numba_mamba.cuda_kernels import optim

    class _Sm90:
        compute_capability = (9, 0)

    monkeypatch.setattr(dispatcher, "get_current_device", lambda: _Sm90())
    names = []
    for name, py_func, argtypes, is_f32, _ in optim.ptx_signatures():
        ptx, _ = cuda.compile_ptx(py_func, argtypes, cc=(9, 0))
        assert ".visible .entry" in ptx, name
        if is_f32:
            assert not re.search(r"\.f64\b", ptx), f"{name} computes in float64"
        names.append((name, is_f32))
    assert ("adamw_update_float32", True) in names and ("record_loss_float32", True) in names


_SIMULATED = r"""
import numpy as np
from numba_mamba import _cpu_optim as cpu
from numba_mamba.cuda_kernels import optim as gpu
rng = np.random.default_rng(0)
for dt in (np.float32, np.float64):
    p = rng.standard_normal(700).astype(dt); g = rng.standard_normal(700).astype(dt)
    m = (rng.standard_normal(700) * 0.1).astype(dt); v = (rng.random(700) * 0.01).astype(dt)
    out = []
    for k in (gpu, cpu):
        t = np.array([4], np.int64); lr = np.array([0.01]); norm = np.zeros(1)
        hyper = np.array([0.9, 0.95, 0.1, 0.5]); sq = np.array([3.0, 5.0])
        coef = np.zeros(9, dt); coef[:5] = [0.9, 1 - 0.9, 0.95, 1 - 0.95, 1e-8]
        k.prepare(t, lr, hyper, sq, norm, coef)
        P, M, V = p.copy(), m.copy(), v.copy()
        k.adamw_update(P, g, M, V, coef, True)
        k.adamw_update(P, g, M, V, coef, False)
        hist = np.zeros(3, dt); state = np.array([0, -1, 0], np.int64)
        for i in range(5):
            k.record_loss(np.array([i], dt), np.array([2 if i == 3 else 0], np.int64), hist, state)
        out.append((t, norm, coef, P, M, V, hist, state))
    for a, b in zip(*out):
        assert np.array_equal(a, b), (dt, a, b)
    assert out[0][-1].tolist() == [5, 3, 2] and out[0][-2].tolist() == [3, 4, 2]
print("ok")
"""


def test_optim_kernels_in_the_cuda_simulator_equal_the_cpu_backend():
    pytest.importorskip("numba.cuda")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    run = subprocess.run([sys.executable, "-c", _SIMULATED], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


# ------------------------------------------------ custom forward/backward with extra inputs


def _timed_batches(n, seed, masked, Bt=3, L=10):
    """Batches ``(inputs, targets, mask, dtau)`` for ``timeseries.timed_model_forward``."""
    rng = np.random.default_rng(seed)
    out = []
    for x, y, mask in _batches(REG, n, seed, masked, Bt=Bt, L=L):
        out.append((x, y, mask, rng.uniform(0.2, 3.0, (Bt, L))))
    return out


@pytest.mark.parametrize("dtype,masked,max_norm", [(np.float32, True, 0.05),
                                                   (np.float64, False, None),
                                                   (np.float32, False, 1.0)])
def test_custom_forward_with_an_extra_input_equals_the_eager_loop_to_the_bit(dtype, masked,
                                                                             max_norm):
    from numba_mamba.timeseries import timed_model_backward, timed_model_forward

    batches = [tuple(a if a is None or a.dtype == bool else a.astype(dtype) for a in b)
               for b in _timed_batches(6, 4, masked)]
    lrs = [1e-2, 3e-2, 2e-2, 1e-2, 5e-3, 1e-3]
    p_ref = models.init_params(REG, seed=2, dtype=dtype)
    p_ts = {k: v.copy() for k, v in p_ref.items()}
    opt_ref = AdamW(lr=1e-2, weight_decay=0.1)
    ts = TrainStep(p_ts, REG, AdamW(lr=1e-2, weight_decay=0.1), max_grad_norm=max_norm,
                   forward=timed_model_forward, backward=timed_model_backward)
    ref_losses = []
    for (x, y, mask, dtau), lr in zip(batches, lrs):
        out, cache = timed_model_forward(x, p_ref, REG, dtau)
        loss, lc = models.mse_forward(out, y, mask=mask)
        _, grads = timed_model_backward(models.mse_backward(1.0, lc), cache)
        if max_norm is not None:
            clip_grad_norm(grads, max_norm)
        opt_ref.step(p_ref, grads, lr=lr)
        ref_losses.append(float(loss))
        ts.step(x, y, mask, lr=lr, extra=(dtau,))
        for k in p_ref:
            np.testing.assert_array_equal(p_ts[k], p_ref[k], err_msg=k)
    assert ts.losses() == ref_losses
    # dtau matters: a step with dtau = 1 is the plain model's, not this one's
    assert not np.allclose(batches[0][3], 1.0)


def test_custom_forward_that_is_the_models_own_equals_the_default_step():
    """The custom path (LM head: ids and targets checked on the device) runs what the default does."""
    batches = _batches(LM, 4, 6, masked=True)
    runs = []
    for custom in (False, True):
        params = models.init_params(LM, seed=1)
        kw = dict(forward=models.model_forward, backward=models.model_backward) if custom \
            else {}
        ts = TrainStep(params, LM, AdamW(lr=1e-2), **kw)
        for x, y, mask in batches:
            ts.step(x, y, mask)
        runs.append((ts.losses(), params))
    assert runs[0][0] == runs[1][0]
    for k in runs[0][1]:
        np.testing.assert_array_equal(runs[0][1][k], runs[1][1][k], err_msg=k)


def test_custom_forward_and_extra_errors_name_the_argument():
    from numba_mamba.timeseries import timed_model_backward, timed_model_forward

    params = models.init_params(REG, seed=0)
    with pytest.raises(ValueError, match="forward and backward must be given together"):
        TrainStep(params, REG, forward=timed_model_forward)
    with pytest.raises(TypeError, match="backward must be callable, got int"):
        TrainStep(params, REG, forward=timed_model_forward, backward=3)
    x, y, _, dtau = _timed_batches(1, 0, False)[0]
    x, y, dtau = x.astype(np.float32), y.astype(np.float32), dtau.astype(np.float32)
    plain = TrainStep(params, REG)
    with pytest.raises(ValueError, match=r"extra inputs \(1 given\) need a custom forward"):
        plain.step(x, y, extra=(dtau,))
    ts = TrainStep(params, REG, forward=timed_model_forward, backward=timed_model_backward)
    with pytest.raises(TypeError, match="extra must be a tuple of arrays, got ndarray"):
        ts.step(x, y, extra=dtau)
    with pytest.raises(TypeError, match=r"extra\[0\] must be a NumPy or CuPy array, got None"):
        ts.step(x, y, extra=(None,))
    ts.step(x, y, extra=(dtau,))
    with pytest.raises(ValueError, match="extra must hold 1 arrays at every step, as at the "
                                         "first, got 0"):
        ts.step(x, y)
    with pytest.raises(ValueError, match=r"extra\[0\] must have shape \(3, 10\) and dtype kind "
                                         r"'f' like the first batch \(float32\), got shape "
                                         r"\(3, 9\)"):
        ts.step(x, y, extra=(dtau[:, :9],))
    assert ts.optimizer.t == 1 and len(ts.losses()) == 1


def test_forecaster_trains_through_a_train_step_with_the_time_step_as_extra(monkeypatch):
    """Each member's training (one lookback of the forecaster's ensemble) is one TrainStep
    fed dtau; every step's loss is in the history."""
    from numba_mamba.timeseries import _engine as _ts_engine

    made = []

    class Recording(TrainStep):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)

    monkeypatch.setattr(_ts_engine, "TrainStep", Recording)
    rng = np.random.default_rng(0)
    t = np.cumsum(rng.uniform(0.5, 1.5, 90))
    y = np.sin(t / 4) + 0.05 * rng.standard_normal(90)
    f = _ts_engine.LookbackModel(lookback=8, horizon=2, steps=12, val_fraction=0.2,
                                  eval_every=5, d_model=8, n_layers=1, d_state=4,
                                  batch_size=4, progress=False).fit(y, t=t)
    assert len(made) == 1 and made[0]._model is not None  # the timed model, dtau as extra
    assert len(made[0]._batch) == 4 and made[0]._batch[3].shape == (4, 8)
    hist = f.history_[0]
    assert hist["steps_run"] == 12 == made[0].optimizer.t == len(hist["train_losses"])
    assert all(np.isfinite(hist["train_losses"]))
