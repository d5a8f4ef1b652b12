"""numba_mamba.pretrained: Hugging Face / mamba-ssm checkpoints loaded without torch.

The fixture tests/data/tiny_mamba_hf/ was written by transformers' ``save_pretrained``
(tests/data/make_tiny_mamba_hf.py); its logits and greedy tokens are transformers'.
The round-trip tests load our export with transformers (skipped where it is absent).
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from numba_mamba import models, pretrained
from numba_mamba.inference import Decoder
from numba_mamba.pretrained import PretrainedError, load, read_safetensors, save

FIXTURE = Path(__file__).resolve().parent / "data" / "tiny_mamba_hf"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())
PROMPT = np.array(EXPECTED["prompt"])


def _logit_tolerance(logits):
    """float32 agreement of two float32 forwards: relative to the logits' scale."""
    return dict(rtol=1e-5, atol=1e-5 * np.abs(logits).max())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fixture_logits_match_transformers(dtype):
    config, params = load(FIXTURE, dtype=dtype)
    assert config == models.MambaConfig(d_model=16, n_layers=2, vocab_size=64, d_state=4,
                                        d_conv=4, expand=2)
    assert config.rank == 1
    assert all(a.dtype == dtype for a in params.values())
    assert sorted(params) == sorted(models.init_params(config))
    logits, _ = models.model_forward(PROMPT, params, config)
    want = np.array(EXPECTED["logits"])
    np.testing.assert_allclose(logits, want, **_logit_tolerance(want))


def test_fixture_greedy_tokens_match_transformers():
    """Greedy continuation: our Decoder (recurrent steps) and our parallel forward both
    give transformers' generate(do_sample=False) tokens exactly."""
    config, params = load(FIXTURE)
    want = np.array(EXPECTED["generated"])
    n_new = EXPECTED["n_new"]
    got = Decoder(params, config, batch_size=2).generate(PROMPT, n_new=n_new)
    np.testing.assert_array_equal(got, want)
    tokens = PROMPT
    for _ in range(n_new):  # the same through the whole-sequence forward
        logits, _ = models.model_forward(tokens, params, config)
        tokens = np.concatenate([tokens, logits[:, -1].argmax(-1)[:, None]], axis=1)
    np.testing.assert_array_equal(tokens, want)


def test_read_safetensors_matches_the_safetensors_package():
    st = pytest.importorskip("safetensors.numpy")
    ours, meta = read_safetensors(FIXTURE / "model.safetensors")
    theirs = st.load_file(FIXTURE / "model.safetensors")
    assert sorted(ours) == sorted(theirs) and meta.get("format") == "pt"
    for k in ours:
        assert ours[k].dtype == theirs[k].dtype and np.array_equal(ours[k], theirs[k]), k


def test_half_tensors_written_by_safetensors_torch(tmp_path):
    """bfloat16 and float16 as the safetensors package writes them from torch."""
    torch = pytest.importorskip("torch")
    st = pytest.importorskip("safetensors.torch")
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(5, 3, generator=g) * 100).to(torch.bfloat16)
    y = torch.randn(2, 4, generator=g).to(torch.float16)
    st.save_file({"x": x, "y": y}, tmp_path / "h.safetensors")
    ours, _ = read_safetensors(tmp_path / "h.safetensors")
    assert ours["x"].dtype == np.float32 and ours["y"].dtype == np.float16
    np.testing.assert_array_equal(ours["x"], x.float().numpy())
    np.testing.assert_array_equal(ours["y"], y.numpy())


def test_save_load_bit_exact_and_sharded(tmp_path):
    config = models.MambaConfig(d_model=12, n_layers=3, vocab_size=30, d_state=3,
                                tie_embeddings=False, proj_bias=True)
    params = models.init_params(config, seed=5, dtype=np.float64)
    save(tmp_path / "one", config, params)
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["config.json",
                                                                   "model.safetensors"]
    save(tmp_path / "many", config, params, max_shard_size=4000)
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    for folder in ("one", "many"):
        cfg, loaded = load(tmp_path / folder)
        assert cfg == config
        assert sorted(loaded) == sorted(params)
        for k in params:
            assert loaded[k].dtype == np.float64 and np.array_equal(loaded[k], params[k]), k
    save(tmp_path / "many", config, params)  # again, as one file: the shards go
    assert sorted(p.name for p in (tmp_path / "many").iterdir()) == ["config.json",
                                                                    "model.safetensors"]


def _mamba_ssm_folder(tmp_path, layer="Mamba1", pad=8):
    """The fixture rewritten with mamba-ssm's config.json and names (embedding, lm_head kept)."""
    tensors, _ = read_safetensors(FIXTURE / "model.safetensors")
    renamed = {k.replace("backbone.embeddings.", "backbone.embedding."): v
               for k, v in tensors.items()}
    renamed["lm_head.weight"] = renamed["backbone.embedding.weight"]
    folder = tmp_path / "mamba_ssm"
    folder.mkdir()
    pretrained.write_safetensors(folder / "model.safetensors", renamed)
    cfg = {"d_model": 16, "d_intermediate": 0, "n_layer": 2, "vocab_size": 60,
           "ssm_cfg": {"layer": layer, "d_state": 4}, "attn_layer_idx": [], "rms_norm": True,
           "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": pad,
           "tie_embeddings": True}
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_mamba_ssm_layout(tmp_path):
    """mamba-ssm's config (padded vocabulary) and names give the fixture's model."""
    config, params = load(_mamba_ssm_folder(tmp_path))
    assert config.vocab_size == 64 and config.tie_embeddings and "lm_head.weight" not in params
    _, want = load(FIXTURE)
    assert sorted(params) == sorted(want)
    for k in want:
        assert np.array_equal(params[k], want[k]), k


def test_half_weights_are_widened_exactly(tmp_path):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    config, params = load(FIXTURE)
    for half in (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)):
        halved = {k: v.astype(half) for k, v in params.items()}
        save(tmp_path / half.name, config, halved)
        cfg, loaded = load(tmp_path / half.name)
        assert json.loads((tmp_path / half.name / "config.json").read_text())["dtype"] == \
            half.name
        for k in params:
            assert loaded[k].dtype == np.float32
            np.testing.assert_array_equal(loaded[k], halved[k].astype(np.float32), err_msg=k)


def _copy_fixture(tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(FIXTURE, folder)
    return folder


def _rewrite(folder, change):
    tensors, _ = read_safetensors(folder / "model.safetensors")
    change(tensors)
    pretrained.write_safetensors(folder / "model.safetensors", tensors)


def test_errors_name_file_and_tensor(tmp_path):
    folder = _copy_fixture(tmp_path)
    st = folder / "model.safetensors"
    _rewrite(folder, lambda t: t.pop("backbone.layers.1.mixer.D"))
    with pytest.raises(PretrainedError, match=rf"{st}: missing tensor "
                       r"backbone\.layers\.1\.mixer\.D \(shape \(32,\)\)"):
        load(folder)
    _rewrite(folder, lambda t: t.update({"backbone.layers.1.mixer.D": np.ones(32, np.float32),
                                         "backbone.layers.2.norm.weight": np.ones(16)}))
    with pytest.raises(PretrainedError, match=rf"{st}: unexpected tensor "
                       r"backbone\.layers\.2\.norm\.weight"):
        load(folder)
    _rewrite(folder, lambda t: (t.pop("backbone.layers.2.norm.weight"),
                                t.update({"backbone.layers.0.mixer.A_log": np.ones((32, 5))})))
    with pytest.raises(PretrainedError, match=r"tensor backbone\.layers\.0\.mixer\.A_log has "
                       r"shape \(32, 5\) .* expected shape \(32, 4\)"):
        load(folder)
    st.write_bytes(st.read_bytes()[:1000])
    with pytest.raises(PretrainedError, match=rf"{st}: not a safetensors file"):
        load(folder)


def test_pickled_weights_are_refused(tmp_path):
    folder = _copy_fixture(tmp_path)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04 pickle would run code")
    with pytest.raises(PretrainedError, match="pytorch_model.bin: pickled weights are not "
                       "loaded .* convert them to safetensors"):
        load(folder)
    with pytest.raises(PretrainedError, match="convert them to safetensors"):
        load(folder / "pytorch_model.bin")


def test_unsupported_architectures(tmp_path):
    folder = _copy_fixture(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    for model_type, what in [("mamba2", "Mamba-2"), ("falcon_mamba", "FalconMamba"),
                             ("llama", "model_type 'llama'")]:
        (folder / "config.json").write_text(json.dumps(dict(cfg, model_type=model_type)))
        with pytest.raises(PretrainedError, match=f"config.json: unsupported checkpoint: {what}"):
            load(folder)
    ssm = _mamba_ssm_folder(tmp_path, layer="Mamba2")
    with pytest.raises(PretrainedError, match="unsupported checkpoint: ssm_cfg layer 'Mamba2'"):
        load(ssm)
    (ssm / "config.json").write_text(json.dumps({"d_model": 16, "n_layer": 2, "vocab_size": 60,
                                                 "rms_norm": False}))
    with pytest.raises(PretrainedError, match="LayerNorm"):
        load(ssm)
    (folder / "config.json").unlink()
    with pytest.raises(PretrainedError, match="no config.json"):
        load(folder)


def test_save_rejects_what_has_no_hf_counterpart(tmp_path):
    reg = models.MambaConfig(d_model=8, n_layers=1, d_input=2, d_output=1)
    with pytest.raises(ValueError, match="language models"):
        save(tmp_path, reg, models.init_params(reg))
    cfg = models.MambaConfig(d_model=8, n_layers=1, vocab_size=10, d_state=4)
    params = models.init_params(cfg)
    params["layers.0.mixer.D"] = params["layers.0.mixer.D"][:3]
    with pytest.raises(ValueError, match=r"params\['layers.0.mixer.D'\] has shape \(3,\), "
                       r"expected \(16,\)"):
        save(tmp_path, cfg, params)


# ---------------------------------------------------------------- round trip with transformers


@pytest.mark.parametrize("variant", [
    dict(),
    dict(tie_embeddings=False, proj_bias=True, conv_bias=False, dt_rank=3, d_conv=3, expand=3),
])
def test_round_trip_through_transformers(tmp_path, variant):
    """Our model saved, loaded by transformers' MambaForCausalLM: the same logits."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = models.MambaConfig(d_model=24, n_layers=2, vocab_size=50, d_state=8, **variant)
    params = models.init_params(config, seed=3)
    rng = np.random.default_rng(0)
    for k in params:  # biases away from 0, norms away from 1: every tensor counts
        if k.endswith(".bias") or "norm" in k:
            params[k] = params[k] + rng.uniform(-0.5, 0.5, params[k].shape).astype(np.float32)
    save(tmp_path, config, params, max_shard_size=None if variant else 20000)
    model = transformers.MambaForCausalLM.from_pretrained(tmp_path).eval()
    tokens = rng.integers(0, 50, (2, 17))
    with torch.no_grad():
        theirs = model(torch.tensor(tokens)).logits.double().numpy()
    ours, _ = models.model_forward(tokens, params, config)
    np.testing.assert_allclose(ours, theirs, **_logit_tolerance(theirs))


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_gpu_fixture_logits_and_greedy():
    """load(xp=cupy): the fixture's logits and greedy tokens on the GPU."""
    from tests.gpu import gpu_module

    cupy, have_gpu, _ = gpu_module()
    if not have_gpu:
        pytest.skip("no CUDA GPU")
    config, params = load(FIXTURE, xp=cupy)
    assert all(isinstance(a, cupy.ndarray) for a in params.values())
    logits, _ = models.model_forward(cupy.asarray(PROMPT), params, config)
    want = np.array(EXPECTED["logits"])
    np.testing.assert_allclose(logits.get(), want, **_logit_tolerance(want))
    got = Decoder(params, config, batch_size=2).generate(cupy.asarray(PROMPT),
                                                         n_new=EXPECTED["n_new"])
    np.testing.assert_array_equal(cupy.asnumpy(got), np.array(EXPECTED["generated"]))


# ---------------------------------------------------------------- the example


def _example():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / "pretrained_generate.py"
    spec = importlib.util.spec_from_file_location("pretrained_generate", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_generates_transformers_tokens(capsys):
    ids = [str(i) for i in EXPECTED["prompt"][1]]
    out = _example().main([str(FIXTURE), "--ids", *ids, "--n-new", str(EXPECTED["n_new"])])
    assert out == EXPECTED["generated"][1]
    assert capsys.readouterr().out.split() == [str(i) for i in out]


def test_example_with_a_local_tokenizer(tmp_path, capsys):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {f"w{i}": i for i in range(64)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    text = " ".join(f"w{i}" for i in EXPECTED["prompt"][0])
    out = _example().main([str(FIXTURE), "--tokenizer", str(tmp_path / "tokenizer.json"),
                           "--text", text, "--n-new", "4"])
    assert out == EXPECTED["generated"][0][:len(EXPECTED["prompt"][0]) + 4]
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == " ".join(f"w{i}" for i in out)
