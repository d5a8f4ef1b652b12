"""Data-parallel training on several GPUs (or CPU processes): the selective-copying task.

Each rank draws the same global batch of a step (a function of the seed and
the step only), trains on its own rows of it (``distributed.shard``), and
the ranks' gradients are averaged (NCCL between GPUs, TCP between CPU
processes).  Every row scores the same number of positions, so the average
is the gradient of the whole batch: N ranks train as one rank with the
whole batch would.  Rank 0 writes the checkpoint; ``--resume`` continues
from it on every rank.  At the end rank 0 reports the token accuracy on a
held-out set.

Run (one process per GPU, or 2 CPU processes)::

    python -m numba_mamba.distributed --nproc 2 examples/train_distributed.py --steps 400
    python -m numba_mamba.distributed --cpu --nproc 2 examples/train_distributed.py --steps 20

and, to compare, the same run on one rank (no launcher)::

    python examples/train_distributed.py --steps 20 --device cpu
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from numba_mamba import distributed, models

sys.path.insert(0, str(Path(__file__).resolve().parent))
from selective_copying import evaluate, make_batch  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "gpu"], default=None,
                   help="default: the launcher's backend (gpu unless --cpu)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=32, help="the global batch (all ranks)")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--n-tokens", type=int, default=4)
    p.add_argument("--vocab", type=int, default=16)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", default=None, help="path of the checkpoint (rank 0 writes)")
    p.add_argument("--resume", action="store_true")
    args = p.parse_args(argv)
    backend = {"cpu": "cpu", "gpu": "nccl", None: None}[args.device]
    group = distributed.init_process_group(backend=backend)
    if group.backend == "nccl":
        import cupy as xp
    else:
        xp = np
    cfg = models.MambaConfig(d_model=args.d_model, n_layers=args.n_layers,
                             vocab_size=args.vocab, d_state=16)
    params = models.init_params(cfg, seed=args.seed, xp=xp)

    def batch_fn(step):
        rng = np.random.default_rng([args.seed, 1, step])
        whole = make_batch(rng, args.batch, args.seq_len, args.n_tokens, args.vocab)
        return distributed.shard(whole, group)

    t = time.perf_counter()
    res = distributed.train(params, cfg, batch_fn, args.steps, group=group, lr=args.lr,
                            warmup_steps=min(50, args.steps // 5), min_lr=args.lr / 10,
                            weight_decay=0.0, checkpoint_path=args.checkpoint,
                            checkpoint_every=50 if args.checkpoint else None,
                            resume=args.resume, progress=group.is_main)
    seconds = time.perf_counter() - t
    if group.is_main:
        eval_set = make_batch(np.random.default_rng([args.seed, 2]), 256, args.seq_len,
                              args.n_tokens, args.vocab)
        acc, seq_acc = evaluate(params, cfg, eval_set, xp, 64)
        print(f"{group.world_size} rank(s) ({group.backend}), {res.step} steps of batch "
              f"{args.batch} in {seconds:.1f} s: loss {res.losses[0]:.3f} -> "
              f"{res.losses[-1]:.3f}, token accuracy {acc:.3f}, sequences {seq_acc:.3f}")
    group.close()


if __name__ == "__main__":
    main()
