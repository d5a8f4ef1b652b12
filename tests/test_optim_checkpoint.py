"""AdamW, clipping, schedule, checkpoints and resume (CPU)."""

import json
import math
import os
import zipfile

import numpy as np
import pytest

from numba_mamba import models, training
from numba_mamba.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from numba_mamba.optim import AdamW, clip_grad_norm, default_no_decay, global_norm, warmup_cosine

# ---------------------------------------------------------------- AdamW


def test_adamw_matches_the_update_rule_written_out():
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(5)
    grads = [rng.standard_normal(5) for _ in range(4)]
    lr, (b1, b2), eps, wd = 0.05, (0.8, 0.95), 1e-6, 0.3
    params = {"w": p0.copy(), "norm.weight": p0.copy()}
    opt = AdamW(lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    for g in grads:
        opt.step(params, {"w": g, "norm.weight": g})
    for name, decay in (("w", wd), ("norm.weight", 0.0)):
        p, m, v = p0.copy(), np.zeros(5), np.zeros(5)
        for t, g in enumerate(grads, start=1):
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            mhat, vhat = m / (1 - b1 ** t), v / (1 - b2 ** t)
            p = p - lr * (mhat / (np.sqrt(vhat) + eps)) - lr * decay * p
        np.testing.assert_allclose(params[name], p, rtol=1e-12, err_msg=name)


def test_weight_decay_spares_A_log_D_biases_and_norms():
    cfg = models.MambaConfig(d_model=8, n_layers=1, vocab_size=5, d_state=4, proj_bias=True)
    params = models.init_params(cfg, dtype=np.float64)
    before = {k: v.copy() for k, v in params.items()}
    AdamW(lr=0.1, weight_decay=0.5).step(params, {k: np.zeros_like(v) for k, v in params.items()})
    spared = {k for k in params if np.array_equal(params[k], before[k])}
    assert spared == {k for k in params if k.endswith(("A_log", ".D", ".bias")) or "norm" in k}
    assert {"layers.0.mixer.A_log", "layers.0.mixer.D", "layers.0.mixer.dt_proj.bias",
            "layers.0.mixer.conv1d.bias", "layers.0.norm.weight", "norm_f.weight"} <= spared
    for k in set(params) - spared:
        np.testing.assert_allclose(params[k], before[k] * (1 - 0.1 * 0.5), rtol=1e-14)


def test_default_no_decay_covers_lti_dt_bias():
    assert default_no_decay("layers.3.mixer.dt_bias")
    assert not default_no_decay("layers.3.mixer.B")


def test_adamw_rejects_missing_gradient():
    with pytest.raises(KeyError, match="grads lack entries"):
        AdamW().step({"a": np.zeros(2), "b": np.zeros(2)}, {"a": np.zeros(2)})


# ---------------------------------------------------------------- clipping and schedule


def test_clip_grad_norm_scales_to_max_norm_and_leaves_small_gradients():
    rng = np.random.default_rng(1)
    grads = {"a": rng.standard_normal((3, 4)), "b": rng.standard_normal(7)}
    norm = math.sqrt(sum(float((g ** 2).sum()) for g in grads.values()))
    copy = {k: v.copy() for k, v in grads.items()}
    assert clip_grad_norm(grads, norm / 4) == pytest.approx(norm, rel=1e-14)
    assert global_norm(grads) == pytest.approx(norm / 4, rel=1e-5)
    for k in grads:  # direction kept
        np.testing.assert_allclose(grads[k] * 4, copy[k], rtol=1e-5)
    small = {k: v.copy() for k, v in copy.items()}
    clip_grad_norm(small, 2 * norm)
    assert all(np.array_equal(small[k], copy[k]) for k in copy)


def test_warmup_cosine_warms_up_linearly_then_decays_to_min():
    lrs = [warmup_cosine(s, 1.0, 10, 110, min_lr=0.1) for s in range(120)]
    np.testing.assert_allclose(lrs[:10], np.arange(1, 11) / 10)
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.55)  # halfway through the cosine
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[110:] == [0.1] * 10


# ---------------------------------------------------------------- checkpoints


def _trained_state(dtype):
    cfg = models.MambaConfig(d_model=8, n_layers=2, vocab_size=9, d_state=4, block="mamba")
    params = models.init_params(cfg, seed=1, dtype=dtype)
    opt = AdamW(lr=1e-2)
    tokens = np.random.default_rng(0).integers(0, 9, (2, 10))
    for _ in range(2):
        _, grads = models.loss_and_grads(tokens[:, :-1], tokens[:, 1:], params, cfg)
        opt.step(params, grads)
    return cfg, params, opt


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_save_load_round_trip_is_bit_exact(tmp_path, dtype):
    cfg, params, opt = _trained_state(dtype)
    path = tmp_path / "ck.npz"
    save_checkpoint(path, params, cfg, opt, step=2, extra={"losses": [1.5, 0.25]})
    ck = load_checkpoint(path)
    assert ck.config == cfg and ck.step == 2 and ck.extra == {"losses": [1.5, 0.25]}
    assert sorted(ck.params) == sorted(params)
    for k in params:
        assert ck.params[k].dtype == params[k].dtype
        assert ck.params[k].tobytes() == params[k].tobytes(), k
    state = opt.state_dict()
    assert ck.optimizer["t"] == 2 and ck.optimizer["betas"] == list(opt.betas)
    for which in ("m", "v"):
        for k in params:
            assert ck.optimizer[which][k].tobytes() == state[which][k].tobytes()
    assert os.listdir(tmp_path) == ["ck.npz"]  # no temporary file left behind


def test_load_rejects_truncated_file(tmp_path):
    cfg, params, opt = _trained_state(np.float32)
    path = tmp_path / "ck.npz"
    save_checkpoint(path, params, cfg, opt)
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 10, 100):
        bad = tmp_path / f"cut{cut}.npz"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="not a readable numba-mamba checkpoint"):
            load_checkpoint(bad)


def test_load_rejects_corrupted_bytes(tmp_path):
    cfg, params, opt = _trained_state(np.float32)
    path = tmp_path / "ck.npz"
    save_checkpoint(path, params, cfg, opt)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:  # flip a byte inside the data of one array
        info = zf.getinfo("param/layers.0.mixer.in_proj.weight.npy")
    data[info.header_offset + 30 + len(info.filename) + 200] ^= 0xFF
    bad = tmp_path / "bad.npz"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_checkpoint(bad)


def test_load_rejects_foreign_npz_and_random_bytes(tmp_path):
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, weights=np.ones(3))
    with pytest.raises(CheckpointError, match="no __meta__ entry"):
        load_checkpoint(foreign)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"\x00not a zip file at all" * 10)
    with pytest.raises(CheckpointError):
        load_checkpoint(junk)


def test_load_rejects_other_format_and_newer_version(tmp_path):
    for meta, message in (({"format": "something-else", "version": 1}, "format"),
                          ({"format": "numba-mamba-checkpoint", "version": 99},
                           "format version 99")):
        path = tmp_path / "m.npz"
        np.savez(path, __meta__=np.frombuffer(json.dumps(meta).encode(), np.uint8))
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(path)


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ck.npz"
    save_checkpoint(path, {"w": np.arange(4.0)}, step=1)
    original = path.read_bytes()

    def broken_savez(f, **arrays):
        f.write(b"PK partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"w": np.zeros(4)}, step=2)
    monkeypatch.undo()
    assert path.read_bytes() == original
    assert os.listdir(tmp_path) == ["ck.npz"]
    assert load_checkpoint(path).step == 1


def test_load_never_unpickles(tmp_path):
    path = tmp_path / "obj.npz"
    meta = {"format": "numba-mamba-checkpoint", "version": 1, "config": None, "step": 0,
            "optimizer": None, "extra": None, "arrays": {"param/x": [[1], "|O"]}}
    np.savez(path, __meta__=np.frombuffer(json.dumps(meta).encode(), np.uint8),
             **{"param/x": np.array([object()], dtype=object)})
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


# ---------------------------------------------------------------- training loop and resume


def _setup():
    cfg = models.MambaConfig(d_model=8, n_layers=2, vocab_size=11, d_state=4)
    data = np.random.default_rng(5).integers(0, 11, (16, 2, 13))

    def batch_fn(step):
        tok = data[step % len(data)]
        return tok[:, :-1], tok[:, 1:]

    return cfg, batch_fn


def test_resume_continues_training_identically(tmp_path):
    cfg, batch_fn = _setup()
    kwargs = dict(steps=10, lr=5e-3, warmup_steps=2, progress=False)
    straight = training.train(models.init_params(cfg, seed=0), cfg, batch_fn, **kwargs)

    path = str(tmp_path / "run.npz")

    def crashing(step):
        if step == 7:
            raise KeyboardInterrupt  # the run dies before step 7
        return batch_fn(step)

    with pytest.raises(KeyboardInterrupt):
        training.train(models.init_params(cfg, seed=0), cfg, crashing, checkpoint_path=path,
                       checkpoint_every=3, **kwargs)
    assert load_checkpoint(path).step == 6
    fresh = models.init_params(cfg, seed=99)  # overwritten by the checkpoint
    resumed = training.train(fresh, cfg, batch_fn, checkpoint_path=path, resume=True, **kwargs)
    assert resumed.step == 10 and resumed.losses == straight.losses
    for k in straight.params:
        assert resumed.params[k].tobytes() == straight.params[k].tobytes(), k
    assert load_checkpoint(path).step == 10


def test_train_with_progress_bar_reduces_loss(capsys):
    pytest.importorskip("tqdm")
    cfg, batch_fn = _setup()
    res = training.train(models.init_params(cfg), cfg, lambda s: batch_fn(0), steps=25, lr=2e-2,
                         progress=True)
    assert res.losses[-1] < 0.5 * res.losses[0]
    assert "train" in capsys.readouterr().err


def test_seed_everything_makes_draws_repeat():
    a = training.seed_everything(3).standard_normal(4), np.random.standard_normal(2)
    b = training.seed_everything(3).standard_normal(4), np.random.standard_normal(2)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
