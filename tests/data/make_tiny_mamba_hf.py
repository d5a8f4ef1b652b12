"""Make tests/data/tiny_mamba_hf/: a tiny random MambaForCausalLM saved by transformers.

The fixture of tests/test_pretrained.py: the checkpoint as ``save_pretrained``
writes it (config.json, model.safetensors), and ``expected.json`` with the
model's logits on a fixed prompt (transformers' forward, float32) and its
greedy continuation (``generate(do_sample=False)``, transformers' cached
step-by-step path).  Run once where torch and transformers are installed:

    python tests/data/make_tiny_mamba_hf.py

It records the versions it ran with in the folder's README.md.  The weights
are drawn by transformers' own initialisation from a fixed torch seed, then
some are spread wider (see ``_spread``) so that the logits
are far from ties and the greedy tokens vary.
"""

import json
import platform
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import MambaConfig, MambaForCausalLM

HERE = Path(__file__).resolve().parent / "tiny_mamba_hf"
PROMPT = [[3, 17, 42, 8, 25, 61, 0, 33, 12, 50, 7, 29],
          [60, 1, 44, 44, 19, 5, 38, 2, 9, 63, 31, 14]]
N_NEW = 12


def _spread(model):
    """Widen the embedding (tied head), in_proj and out_proj weights: at transformers'
    initial scale the logits are nearly tied and the blocks barely move the residual
    stream, so that the greedy continuation only repeats the prompt's last token."""
    with torch.no_grad():
        model.backbone.embeddings.weight.mul_(10.0)
        for layer in model.backbone.layers:
            layer.mixer.in_proj.weight.mul_(3.0)
            layer.mixer.out_proj.weight.mul_(16.0)


def main():
    torch.manual_seed(20261203)
    config = MambaConfig(vocab_size=64, hidden_size=16, state_size=4, num_hidden_layers=2,
                         conv_kernel=4, expand=2, time_step_rank="auto", use_bias=False,
                         use_conv_bias=True, tie_word_embeddings=True, pad_token_id=0,
                         bos_token_id=0, eos_token_id=None)
    model = MambaForCausalLM(config).float().eval()
    _spread(model)
    HERE.mkdir(exist_ok=True)
    model.save_pretrained(HERE)
    prompt = torch.tensor(PROMPT)
    with torch.no_grad():
        logits = model(prompt).logits
        generated = model.generate(prompt, max_new_tokens=N_NEW, do_sample=False,
                                   min_new_tokens=N_NEW)
    top2 = torch.topk(logits, 2, dim=-1).values
    margin = float((top2[..., 0] - top2[..., 1]).min())
    expected = {"prompt": PROMPT, "logits": logits.double().numpy().round(7).tolist(),
                "generated": generated.tolist(), "n_new": N_NEW,
                "min_top2_margin_on_prompt": margin}
    (HERE / "expected.json").write_text(json.dumps(expected))
    (HERE / "README.md").write_text(
        "# tiny_mamba_hf: a random MambaForCausalLM as transformers saves it\n\n"
        "Made by `python tests/data/make_tiny_mamba_hf.py` (read it for what it does) with\n"
        f"transformers {transformers.__version__}, torch {torch.__version__}, "
        f"NumPy {np.__version__}, Python {platform.python_version()}, on the CPU.\n\n"
        "- `config.json`, `model.safetensors`: `save_pretrained` of the model (float32).\n"
        "- `expected.json`: `prompt` (2 x 12 token ids), `logits` of transformers' forward\n"
        f"  on it (rounded to 7 decimals), `generated`: prompt + {N_NEW} greedy tokens of\n"
        "  `generate(do_sample=False)`; the smallest gap between the two largest logits\n"
        f"  of a prompt position is {margin:.3g}.\n\n"
        "Used by tests/test_pretrained.py, which needs neither torch nor transformers.\n")
    print(f"wrote {HERE}: {sorted(p.name for p in HERE.iterdir())}, top-2 margin {margin:.3g}")
    print("generated:", generated.tolist())


if __name__ == "__main__":
    main()
