"""Selective copying: a selective SSM copies data tokens out of noise; a time-invariant one cannot.

The task (Gu & Dao 2023, section 4.1.1 and Table 1): a sequence of ``seq_len``
tokens is mostly noise, with ``n_tokens`` data tokens at random positions;
after it come ``n_tokens`` marker tokens, and at the marker positions the
model must output the data tokens in their order.  Because the spacing is
random, a model has to *select* what to keep by content, not by position:
the point of making delta, B and C depend on the input.

Token ids (vocabulary ``V = --vocab``)::

    0            noise
    1 .. V-2     data
    V-1          marker (one per token to recall, after the context)

    inputs   n n 7 n n n 3 n 9 n n n  M M M        (seq_len + n_tokens tokens)
    targets  . . . . . . . . . . . .  7 3 9        ('.' not scored)

This script trains the selective model (``block="mamba"``) and the LTI
ablation (``block="lti"``: delta, B, C constant, S4D-style) on freshly drawn
batches, with the library's model, loss, AdamW, clipping and warmup+cosine
schedule, evaluates token accuracy on a fixed held-out set during training,
prints a table and saves a plot (loss and accuracy over training).

Paper (arXiv:2312.00752, Table 1; seq_len 4096, 16 data tokens, vocabulary 16,
2 layers, d_model 64, 400K steps, batch 64, lr 1e-4): Mamba with S6 99.8%,
Mamba with S4 56.4%, S4 without gating 18.3%.  ``--paper`` selects those
settings; the default is a tiny configuration that runs in about a minute on a
laptop CPU (far too short to learn the task: a smoke run).

Run:  python examples/selective_copying.py [--device cpu|gpu] [--block both|mamba|lti]
      [--seq-len 64] [--n-tokens 4] [--steps 100] [--batch 16] [--paper]
      [--out selective_copying.png]
"""

import argparse
import json
import time

import sys
from pathlib import Path

import numpy as np

import numba_mamba as nm
from numba_mamba import models

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the examples' shared loop
from _training import add_training_args, fit, pick_device  # noqa: E402

IGNORE = -100  # target id of positions that are not scored


def to_host(a):
    return a.get() if hasattr(a, "get") else np.asarray(a)


# ---------------------------------------------------------------- the task


def make_batch(rng, batch, seq_len, n_tokens, vocab):
    """One batch of the selective-copying task.

    Returns
    -------
    inputs : int64 array, shape (batch, seq_len + n_tokens)
    targets : int64 array, same shape; the data tokens at the marker
        positions, ``IGNORE`` elsewhere.
    """
    if vocab < 3 or n_tokens > seq_len:
        raise ValueError(f"need vocab >= 3 and n_tokens <= seq_len, got vocab={vocab}, "
                         f"n_tokens={n_tokens}, seq_len={seq_len}")
    data = rng.integers(1, vocab - 1, (batch, n_tokens))  # (batch, K) data ids 1 .. V-2
    # K distinct positions per row, in increasing order: the K smallest of random keys.
    pos = np.sort(np.argpartition(rng.random((batch, seq_len)), n_tokens - 1, axis=1)
                  [:, :n_tokens], axis=1)  # (batch, K)
    inputs = np.zeros((batch, seq_len + n_tokens), dtype=np.int64)
    np.put_along_axis(inputs, pos, data, axis=1)
    inputs[:, seq_len:] = vocab - 1  # markers
    targets = np.full_like(inputs, IGNORE)
    targets[:, seq_len:] = data
    return inputs, targets


def batch_for_step(seed, step, args):
    """The training batch of ``step``: a function of (seed, step) only."""
    return make_batch(np.random.default_rng([seed, 1, step]), args.batch, args.seq_len,
                      args.n_tokens, args.vocab)


def evaluate(params, config, eval_set, xp, eval_batch):
    """Token accuracy and whole-sequence accuracy on the answer positions."""
    inputs, targets = eval_set
    K = int((targets[0] != IGNORE).sum())  # the answer positions are the last K
    correct = total = seq_ok = 0
    for i in range(0, len(inputs), eval_batch):
        x, t = inputs[i:i + eval_batch], targets[i:i + eval_batch]
        logits, _ = models.model_forward(xp.asarray(x), params, config)
        pred = to_host(logits[:, -K:].argmax(axis=-1))  # (b, K)
        want = t[:, -K:]
        hit = pred == want
        correct += int(hit.sum())
        total += hit.size
        seq_ok += int(hit.all(axis=1).sum())
    return correct / total, seq_ok / len(inputs)


# ---------------------------------------------------------------- training


def train_one(block, args, xp, eval_set):
    """Train one model; return its curves and final accuracies."""
    config = models.MambaConfig(d_model=args.d_model, n_layers=args.n_layers,
                                vocab_size=args.vocab, d_state=args.d_state, block=block)
    params = models.init_params(config, seed=args.seed, xp=xp)
    n_params = sum(int(p.size) for p in params.values())
    curve = {"step": [], "acc": [], "seq_acc": []}

    def on_eval(done, loss, seconds):
        acc, seq_acc = evaluate(params, config, eval_set, xp, args.eval_batch)
        curve["step"].append(done)
        curve["acc"].append(acc)
        curve["seq_acc"].append(seq_acc)
        return f"step {done:6d}  loss {loss:.4f}  acc {acc:.4f}"

    losses, wall = fit(params, config, args, xp, lambda s: batch_for_step(args.seed, s, args),
                       on_eval, label=f"{block:5s}")
    return {"block": block, "n_params": n_params, "losses": losses, "curve": curve,
            "steps_done": len(losses),
            "acc": curve["acc"][-1], "seq_acc": curve["seq_acc"][-1], "best_acc": max(curve["acc"]),
            "wall_s": wall}


# ---------------------------------------------------------------- report


PAPER = {"mamba": 99.8, "lti": 56.4}  # Table 1: Mamba with S6, Mamba with S4


def print_table(results, args):
    print()
    print(f"Selective copying: context {args.seq_len}, {args.n_tokens} data tokens, vocabulary "
          f"{args.vocab}, {args.n_layers} layers, d_model {args.d_model}, d_state {args.d_state}, "
          f"up to {args.steps} steps x batch {args.batch}, lr {args.lr}, "
          f"eval on {args.n_eval} sequences")
    print("| model | block | params | steps | token accuracy | sequence accuracy | "
          "best token acc. | train time (s) | paper (L=4096) |")
    print("|---|---|---|---|---|---|---|---|---|")
    names = {"mamba": "Mamba (S6, selective)", "lti": "Mamba with LTI SSM (S4D-style)"}
    for r in results:
        print(f"| {names[r['block']]} | {r['block']} | {r['n_params']} | {r['steps_done']} | "
              f"{100 * r['acc']:.1f}% | "
              f"{100 * r['seq_acc']:.1f}% | {100 * r['best_acc']:.1f}% | {r['wall_s']:.0f} | "
              f"{PAPER[r['block']]}% |")


def plot(results, args, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install '.[examples]')")
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        loss = np.asarray(r["losses"])
        w = max(1, len(loss) // 100)
        smooth = np.convolve(loss, np.ones(w) / w, mode="valid")
        ax1.plot(np.arange(len(smooth)) + w, smooth, label=r["block"])
        ax2.plot(r["curve"]["step"], 100 * np.asarray(r["curve"]["acc"]), marker=".",
                 label=f"{r['block']} (final {100 * r['acc']:.1f}%)")
    ax1.set(xlabel="step", ylabel="cross-entropy (answer tokens)", yscale="log",
            title="training loss")
    ax2.axhline(100.0 / (args.vocab - 2), color="gray", ls=":", label="chance")
    ax2.set(xlabel="step", ylabel="token accuracy (%)", ylim=(0, 101),
            title=f"held-out accuracy, L={args.seq_len}, {args.n_tokens} tokens")
    for ax in (ax1, ax2):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle("Selective copying: selective (mamba) vs time-invariant (lti) SSM")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"saved {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_training_args(parser)
    parser.add_argument("--block", choices=["both", "mamba", "lti"], default="both")
    parser.add_argument("--seq-len", type=int, default=64, help="context length (before markers)")
    parser.add_argument("--n-tokens", type=int, default=4, help="data tokens to copy")
    parser.add_argument("--vocab", type=int, default=16, help="incl. noise and marker tokens")
    parser.add_argument("--n-eval", type=int, default=256, help="held-out sequences")
    parser.add_argument("--eval-batch", type=int, default=64)
    parser.add_argument("--paper", action="store_true",
                        help="paper settings: seq-len 4096, 16 tokens, vocab 16, 400K steps, "
                             "batch 64, lr 1e-4 (constant)")
    parser.add_argument("--out", default="selective_copying.png", help="PNG path ('' to skip)")
    parser.add_argument("--json", default="", help="write results (curves included) here")
    args = parser.parse_args(argv)
    if args.paper:
        args.seq_len, args.n_tokens, args.vocab = 4096, 16, 16
        args.d_model, args.n_layers = 64, 2
        args.steps, args.batch, args.lr, args.min_lr_ratio, args.warmup = 400_000, 64, 1e-4, 1.0, 0
        args.eval_every = 5000
    t_start = time.perf_counter()
    device, xp = pick_device(args.device)
    nm.seed_everything(args.seed)
    eval_set = make_batch(np.random.default_rng([args.seed, 2]), args.n_eval, args.seq_len,
                          args.n_tokens, args.vocab)
    blocks = ["mamba", "lti"] if args.block == "both" else [args.block]
    print(f"device {device}; blocks {blocks}")
    results = [train_one(b, args, xp, eval_set) for b in blocks]
    print_table(results, args)
    if args.out:
        plot(results, args, args.out)
    wall = time.perf_counter() - t_start
    print(f"wall time {wall:.0f} s ({device})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": device, "wall_s": wall,
                       "results": results}, f)
        print(f"saved {args.json}")
    return results


if __name__ == "__main__":
    main()
