"""Generate tokens with a pretrained Mamba checkpoint, no torch needed.

Loads a checkpoint folder (Hugging Face ``MambaForCausalLM`` as
``save_pretrained`` writes it, e.g. a download of ``state-spaces/mamba-130m-hf``,
or mamba-ssm's layout converted to safetensors) with
:func:`numba_mamba.pretrained.load` and continues a prompt with
:class:`numba_mamba.inference.Decoder`: greedy, or sampled with a temperature
and top-k.  The prompt is given as token ids; with ``--tokenizer
tokenizer.json`` (a local file of the ``tokenizers`` package, which must be
installed) it may be given as text, and the output is decoded too.  Nothing is
downloaded.

Run:  python examples/pretrained_generate.py CHECKPOINT --ids 3 17 42 [--n-new 20]
      python examples/pretrained_generate.py CHECKPOINT --tokenizer tokenizer.json
             --text "Mamba is" [--temperature 0.7 --top-k 40 --seed 0] [--device gpu]
"""

import argparse
import sys
import time

import numpy as np

from numba_mamba import pretrained
from numba_mamba.inference import Decoder


def _xp(device):
    if device == "cpu":
        return np
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() > 0:
            return cupy
    except Exception as exc:  # no CuPy, or no GPU
        if device == "gpu":
            raise SystemExit(f"--device gpu: no usable CuPy GPU ({exc})")
    return np


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="folder with config.json and model.safetensors")
    parser.add_argument("--ids", type=int, nargs="+", help="prompt token ids")
    parser.add_argument("--text", help="prompt text (needs --tokenizer)")
    parser.add_argument("--tokenizer", help="a local tokenizer.json (tokenizers package)")
    parser.add_argument("--n-new", type=int, default=20, help="tokens to generate (20)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=["cpu", "gpu", "auto"], default="cpu")
    args = parser.parse_args(argv)
    if (args.ids is None) == (args.text is None):
        parser.error("give the prompt as --ids or as --text")
    tokenizer = None
    if args.tokenizer:
        try:
            from tokenizers import Tokenizer
        except ImportError:
            parser.error("--tokenizer needs the tokenizers package: pip install tokenizers")
        tokenizer = Tokenizer.from_file(args.tokenizer)
    if args.text is not None:
        if tokenizer is None:
            parser.error("--text needs --tokenizer")
        ids = tokenizer.encode(args.text).ids
    else:
        ids = args.ids

    xp = _xp(args.device)
    start = time.perf_counter()
    try:
        config, params = pretrained.load(args.checkpoint, xp=xp)
    except pretrained.PretrainedError as exc:
        raise SystemExit(f"cannot load the checkpoint: {exc}")
    loaded = time.perf_counter() - start
    if max(ids) >= config.vocab_size or min(ids) < 0:
        raise SystemExit(f"token ids must lie in [0, {config.vocab_size}), got {ids}")
    print(f"# {args.checkpoint}: {config.n_layers} layers, d_model {config.d_model}, "
          f"vocabulary {config.vocab_size}; loaded in {loaded:.2f} s "
          f"({'GPU' if xp is not np else 'CPU'})", file=sys.stderr)
    decoder = Decoder(params, config, batch_size=1)
    start = time.perf_counter()
    out = decoder.generate(xp.asarray([ids]), n_new=args.n_new,
                           temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    out = np.asarray(out.get() if hasattr(out, "get") else out)[0].tolist()
    took = time.perf_counter() - start
    print(f"# {args.n_new} tokens in {took:.2f} s", file=sys.stderr)
    print(" ".join(map(str, out)))
    if tokenizer is not None:
        print(tokenizer.decode(out))
    return out


if __name__ == "__main__":
    main()
