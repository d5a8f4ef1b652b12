"""Data-parallel training (issue 26): throughput on N GPUs against one, all-reduce time, overlap.

The model of the issue's target: 4 layers, d_model 256, N 16, vocab 16,
float32, AdamW with clipping at 1.0, batch 32 per GPU, length 1024.  For
each world size N given (``--nproc 1,2``) the script starts itself on N
ranks through the launcher (``python -m numba_mamba.distributed``) and each
rank times, in lockstep with the others:

``plain``
    :class:`numba_mamba.training.TrainStep` (captured as a CUDA graph where
    possible): one GPU's training without any data parallelism.
``dp``, ``dp_graph``
    :class:`numba_mamba.distributed.DataParallelTrainStep`, eager and with
    ``graph='auto'`` (captured, collectives included, where possible).
``local``
    The same data-parallel step with a communicator that does nothing: the
    buckets' copies and scaling without any communication.
``allreduce``
    The buckets' all-reduces alone, back to back on the communication
    stream (no compute competing): the all-reduce time per step.

Derived: throughput (tokens/s over all ranks) and its ratio to ``plain`` on
one GPU (the target is >= 1.8 on 2 GPUs); the exposed communication
``dp - local`` per step and the overlapped fraction ``1 - exposed /
allreduce`` (how much of the all-reduce time the backward hides).

Times: CUDA events on rank 0 (the host clock on the CPU), after warm-up
(compiling, capturing), median over ``--reps`` repetitions of
``--steps`` steps each.

Run on a machine with 2 GPUs (about 3 minutes)::

    python benchmarks/bench_distributed.py --nproc 1,2 --json dist.json

and on the CPU, at tiny sizes, to check the script (its times mean nothing)::

    python benchmarks/bench_distributed.py --nproc 1,2 --device cpu
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from numba_mamba import distributed, models, training  # noqa: E402
from numba_mamba.optim import AdamW  # noqa: E402


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nproc", default="1,2", help="world sizes to run, comma-separated")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--batch", type=int, default=None, help="batch per rank (default 32; CPU 2)")
    p.add_argument("--length", type=int, default=None, help="sequence length (1024; CPU 64)")
    p.add_argument("--steps", type=int, default=None, help="steps per repetition (10; CPU 2)")
    p.add_argument("--reps", type=int, default=None, help="repetitions (5; CPU 2)")
    p.add_argument("--bucket-bytes", type=int, default=distributed.DEFAULT_BUCKET_BYTES)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)  # (a rank's result file)
    a = p.parse_args(argv)
    gpu = a.device == "cuda"
    a.batch = a.batch or (32 if gpu else 2)
    a.length = a.length or (1024 if gpu else 64)
    a.steps = a.steps or (10 if gpu else 2)
    a.reps = a.reps or (5 if gpu else 2)
    return a


def _config(gpu):
    if gpu:
        return models.MambaConfig(d_model=256, n_layers=4, vocab_size=16, d_state=16)
    return models.MambaConfig(d_model=32, n_layers=4, vocab_size=16, d_state=8)


class _Timer:
    """Seconds of ``fn()`` (CUDA events on the current stream, or the host clock)."""

    def __init__(self, xp):
        self.xp = xp

    def __call__(self, fn):
        if self.xp is np:
            t = time.perf_counter()
            fn()
            return time.perf_counter() - t
        start, stop = self.xp.cuda.Event(), self.xp.cuda.Event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        return self.xp.cuda.get_elapsed_time(start, stop) / 1e3


class _NoComm:
    """A communicator that does nothing (the buckets' copies without communication)."""

    rank, world_size = 0, 1

    def allreduce_sum(self, x):
        return distributed._Ready()

    def broadcast(self, x, root=0):
        pass

    def synchronize(self, timeout=None):
        pass


def _rank_main(a):
    group = distributed.init_process_group()
    gpu = group.backend == "nccl"
    if gpu:
        import cupy as xp
    else:
        xp = np
    cfg = _config(gpu)
    rng = np.random.default_rng(group.rank)
    batches = [(rng.integers(0, cfg.vocab_size, (a.batch, a.length)),
                rng.integers(0, cfg.vocab_size, (a.batch, a.length))) for _ in range(4)]
    batches = [(xp.asarray(x), xp.asarray(y)) for x, y in batches]
    timer = _Timer(xp)

    def new_params():
        return models.init_params(cfg, seed=0, dtype=np.float32, xp=xp)

    def run(step, n):
        for k in range(n):
            x, y = batches[k % len(batches)]
            step.step(x, y)

    def time_steps(step):
        run(step, 3)  # (warm-up: compiling, capturing)
        step.losses()
        group.barrier()
        times = []
        for _ in range(a.reps):
            times.append(timer(lambda: run(step, a.steps)) / a.steps)
            step.losses()
        return statistics.median(times)

    local_group = distributed.ProcessGroup(group.rank, group.world_size, group.local_rank,
                                           group.backend, group.store, _NoComm(), group.timeout)
    local_group.share = lambda value: value
    opt = dict(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    graph = "auto" if gpu else False
    makers = {
        "plain": lambda: training.TrainStep(new_params(), cfg, AdamW(**opt), graph=graph),
        "local": lambda: distributed.DataParallelTrainStep(
            new_params(), cfg, local_group, AdamW(**opt), bucket_bytes=a.bucket_bytes),
        "dp": lambda: distributed.DataParallelTrainStep(
            new_params(), cfg, group, AdamW(**opt), bucket_bytes=a.bucket_bytes),
    }
    if gpu:
        makers["dp_graph"] = lambda: distributed.DataParallelTrainStep(
            new_params(), cfg, group, AdamW(**opt), graph="auto", bucket_bytes=a.bucket_bytes)
    res = {"world_size": group.world_size, "device": a.device, "batch_per_rank": a.batch,
           "length": a.length, "config": cfg.to_dict(), "bucket_bytes": a.bucket_bytes,
           "seconds_per_step": {}}
    steps = {}
    for name, make in makers.items():
        steps[name] = make()
        res["seconds_per_step"][name] = time_steps(steps[name])
        if name == "dp_graph":
            res["dp_graph_captured"] = steps[name].captured
    # the all-reduces of one step alone, on the step's communication stream
    buckets = steps["dp"]._buckets
    res["buckets"] = [len(names) for names, _ in buckets.buffers]
    res["bucket_bytes_each"] = [int(buf.nbytes) for _, buf in buckets.buffers]

    def allreduce_all():
        with buckets._on_stream():
            for _, buf in buckets.buffers:
                group.comm.allreduce_sum(buf).wait()
        if gpu:
            xp.cuda.get_current_stream().wait_event(buckets.stream.record())

    for _ in range(3):
        allreduce_all()
    group.comm.synchronize()
    group.barrier()
    res["seconds_allreduce"] = statistics.median(
        timer(allreduce_all) for _ in range(a.reps * a.steps))
    t = res["seconds_per_step"]
    tokens = group.world_size * a.batch * a.length
    res["tokens_per_second"] = {k: tokens / v for k, v in t.items()}
    res["exposed_comm_seconds"] = t["dp"] - t["local"]
    ar = res["seconds_allreduce"]
    res["overlapped_fraction"] = (min(1.0, max(0.0, 1 - res["exposed_comm_seconds"] / ar))
                                  if ar > 0 else None)
    if group.is_main and a.out:
        Path(a.out).write_text(json.dumps(res))
    group.close()


def _report(results):
    one = next((r for r in results if r["world_size"] == 1), None)
    for r in results:
        t, tps = r["seconds_per_step"], r["tokens_per_second"]
        print(f"\nN = {r['world_size']} ({r['device']}), batch {r['batch_per_rank']} per rank, "
              f"L {r['length']}, buckets {r['buckets']} ({sum(r['bucket_bytes_each'])} bytes)")
        for name in t:
            line = f"  {name:9s} {t[name] * 1e3:9.3f} ms/step {tps[name]:12.0f} tokens/s"
            if one is not None:
                line += f"   x{tps[name] / one['tokens_per_second']['plain']:.2f} of plain N=1"
            print(line)
        if "dp_graph_captured" in r:
            print(f"  dp_graph captured: {r['dp_graph_captured']}")
        print(f"  all-reduce alone {r['seconds_allreduce'] * 1e3:.3f} ms/step; exposed "
              f"(dp - local) {r['exposed_comm_seconds'] * 1e3:.3f} ms/step; overlapped "
              f"fraction {r['overlapped_fraction']}")


def main(argv=None):
    a = _args(argv)
    if "RANK" in os.environ:  # (a rank, started by the launcher)
        return _rank_main(a)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in [int(v) for v in a.nproc.split(",")]:
            out = os.path.join(tmp, f"n{n}.json")
            cmd = [sys.executable, "-m", "numba_mamba.distributed", "--nproc", str(n)]
            cmd += ["--cpu"] if a.device == "cpu" else []
            cmd += [__file__, "--device", a.device, "--batch", str(a.batch), "--length",
                    str(a.length), "--steps", str(a.steps), "--reps", str(a.reps),
                    "--bucket-bytes", str(a.bucket_bytes), "--out", out]
            rc = subprocess.run(cmd, cwd=ROOT).returncode
            if rc != 0:
                print(f"world size {n}: the launcher failed with status {rc}", file=sys.stderr)
                continue
            results.append(json.loads(Path(out).read_text()))
    _report(results)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
