"""Smoke tests of the synthetic-task examples (issue 6): generators, a few training steps, outputs.

No accuracy is claimed here: a few steps cannot learn either task.  The tests
check the task generators' invariants, that a short run of each script's tiny
configuration gives finite losses that fall from the uniform-guess level,
accuracies in [0, 1] at every evaluated length, and the plot file.
"""

import importlib.util
import json
import math
import pathlib

import numpy as np
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def load_example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def selective_copying():
    return load_example("selective_copying")


@pytest.fixture(scope="module")
def induction_heads():
    return load_example("induction_heads")


def has_matplotlib():
    return importlib.util.find_spec("matplotlib") is not None


def test_selective_copying_targets_are_the_data_tokens_in_order(selective_copying):
    m = selective_copying
    rng = np.random.default_rng(0)
    x, y = m.make_batch(rng, batch=32, seq_len=40, n_tokens=6, vocab=10)
    assert x.shape == y.shape == (32, 46)
    assert (x[:, 40:] == 9).all()  # markers
    assert (y[:, :40] == m.IGNORE).all()
    for row_x, row_y in zip(x, y):
        data = row_x[:40][row_x[:40] != 0]
        assert data.size == 6 and ((data >= 1) & (data <= 8)).all()
        np.testing.assert_array_equal(row_y[40:], data)


def test_induction_heads_answer_follows_the_only_earlier_trigger(induction_heads):
    m = induction_heads
    x, y = m.make_batch(np.random.default_rng(0), batch=64, length=50, vocab=8)
    assert x.shape == y.shape == (64, 50)
    assert ((x == m.TRIGGER).sum(axis=1) == 2).all()
    assert (x[:, -1] == m.TRIGGER).all()
    assert (y[:, :-1] == m.IGNORE).all()
    p = np.argmax(x == m.TRIGGER, axis=1)  # first trigger
    np.testing.assert_array_equal(y[:, -1], x[np.arange(64), p + 1])
    assert ((y[:, -1] >= 1) & (y[:, -1] < 8)).all()


TINY = ["--device", "cpu", "--d-model", "32", "--steps", "12", "--batch", "8", "--lr", "5e-3",
        "--warmup", "1", "--eval-every", "6", "--no-progress"]


def check_losses(losses, vocab):
    losses = np.asarray(losses)
    assert np.isfinite(losses).all()
    assert abs(losses[0] - math.log(vocab)) < 0.5  # a fresh model guesses about uniformly
    assert losses[-4:].mean() < losses[:4].mean(), losses


def test_selective_copying_tiny_run_trains_both_blocks(selective_copying, tmp_path):
    png = tmp_path / "sc.png"
    results = selective_copying.main(TINY + ["--seq-len", "24", "--n-tokens", "4",
                                             "--n-eval", "32", "--out", str(png)])
    assert [r["block"] for r in results] == ["mamba", "lti"]
    for r in results:
        assert len(r["losses"]) == 12
        check_losses(r["losses"], 16)
        assert r["curve"]["step"] == [6, 12]
        assert all(0.0 <= a <= 1.0 for a in r["curve"]["acc"])
    assert png.exists() == has_matplotlib()


def test_induction_heads_tiny_run_tests_every_length(induction_heads, tmp_path):
    png, js = tmp_path / "ih.png", tmp_path / "ih.json"
    out = induction_heads.main(TINY + ["--train-len", "32", "--n-eval", "32",
                                       "--monitor-log2", "7", "--n-monitor", "8",
                                       "--max-test-log2", "8", "--n-test", "16",
                                       "--eval-tokens", "128", "--test-tokens", "2048",
                                       "--min-test", "4", "--out", str(png), "--json", str(js)])
    check_losses(out["losses"], 16)
    assert [r[0] for r in out["test"]] == [64, 128, 256]
    assert [r[1] for r in out["test"]] == [16, 16, 8]  # 2048 // 256 beyond eval-tokens
    assert all(0.0 <= r[2] <= 1.0 for r in out["test"])
    assert out["curve"]["step"] == [6, 12]
    assert len(out["curve"]["acc@128"]) == 2  # the monitored longer length
    assert all(0.0 <= a <= 1.0 for a in out["curve"]["acc@128"])
    assert png.exists() == has_matplotlib()
    saved = json.loads(js.read_text())
    assert saved["wall_s"] >= saved["train_s"] > 0
    assert saved["steps_done"] == 12 and len(saved["test"]) == 3
    assert saved["config"]["dt_min"] == saved["args"]["dt_min"]


def test_induction_heads_eval_matches_recurrent_inference(induction_heads):
    """The parallel forward used for testing agrees with token-by-token inference."""
    from numba_mamba import inference, models
    m = induction_heads
    config = models.MambaConfig(d_model=16, n_layers=2, vocab_size=8, d_state=4,
                                dt_min=0.1, dt_max=1.0)
    params = models.init_params(config, seed=3)
    x, _ = m.make_batch(np.random.default_rng(1), batch=2, length=40, vocab=8)
    logits, _ = models.model_forward(x, params, config)
    state = inference.init_state(2, params, config)
    for t in range(x.shape[1]):
        step_logits, state = inference.step(x[:, t], state, params, config)
    np.testing.assert_allclose(step_logits, logits[:, -1], rtol=1e-4, atol=1e-4)
