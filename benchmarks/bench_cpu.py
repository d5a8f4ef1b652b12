"""CPU benchmarks of issue 22: the selective scan per state update, a model
forward against transformers' PyTorch Mamba, a training step against PyTorch.

Parts (``--parts``, default all):

``scan``
    ``selective_scan_vjp`` forward and its backward on NumPy arrays, batch 2,
    D 64, N 16, L 4096 (``--quick``: 1024), z, D, delta_bias and softplus
    on, B and C variable ``(Bt, N, L)``: ns per state update (one update is
    one (batch, channel, step, state)), on 1 and 2 Numba threads, float32 and
    float64.  Beside it, on the same inputs: a NumPy loop over time
    (``bench_scan.sequential_loop``, forward; the backward column is
    :func:`numba_mamba.reference.selective_scan_vjp`, the float64 oracle,
    also a NumPy loop over time) and a PyTorch CPU loop (the same loop,
    backward by autograd), each on as many threads; ratios are theirs / ours.
``model``
    One forward of a 2-layer model, d_model 768, N 16, expand 2, vocab 1024
    (small, so that the tied head does not swamp the blocks), batch 1,
    lengths 256 and 1024, float32: ``models.model_forward`` (training caches
    kept), the same with ``keep_cache=False`` (the inference forward) and
    ``inference.prefill`` where it exists, against transformers'
    ``MambaForCausalLM`` (its pure-PyTorch path, ``torch.no_grad``) holding
    the same weights (copied array by array); the largest difference of the
    logits is printed.
``train``
    One training step of the small model of ``examples/`` (2 layers, d_model
    64, N 16, vocab 16, batch 32, length 80, AdamW, clipping at 1.0):
    ``training.TrainStep`` on NumPy arrays against PyTorch eager
    (``benchmarks/_torch_mamba.py``: autograd, ``clip_grad_norm_``,
    ``torch.optim.AdamW``; its selective scan is this library's, so the
    ratio compares everything around the scan).  The two are timed in
    turns (5 steps of ours, 5 of theirs, ``--reps`` times), so that the
    other jobs of a shared machine slow both alike.  PyTorch runs in a
    spawned process of its own, with glibc's ``malloc`` at its defaults as
    a PyTorch user has it (``TrainStep`` sets ``malloc``'s thresholds for
    its process, :func:`numba_mamba._cpu_threads.hold_heap`); the last
    column times it in our process too, where that setting speeds it up.
    Beside the ratio of wall times, the ratio of the processes' CPU times
    (on a loaded machine less disturbed by waiting for a core; with 2
    threads it counts spinning threads too).

``tiny``
    Small calls, where waking Numba's threads costs more than the work: the
    CPU scan's forward + backward (``_cpu_scan``, without the public API's
    checks; batch 1, N 16, float32) at growing sizes, on 2
    Numba threads and on 1, and which one :func:`_cpu_threads.serial_below`
    picks at its ``SERIAL_BELOW``; us per call.  The crossover sets
    ``SERIAL_BELOW``.

BLAS threads matter as much as the kernels here: on a 2-core machine
OpenBLAS's own thread pool (NumPy's matmul) and Numba's OpenMP pool compete
for the cores, and a model forward or training step can run several times
slower than with ``OPENBLAS_NUM_THREADS=1``.  The library limits BLAS to
one thread during its calls (:mod:`numba_mamba._cpu_threads`); the model and
training parts run each case under each ``--blas`` policy in the same run
(``1``: that limit, the default; ``0``: no limit, BLAS as installed) so the
two compare under the same load.  The header prints the variables that set
the pools.

Times: wall clock, after warm-up (compilation left out), the minimum over
``--reps`` repetitions (the machine is shared: the minimum is the least
disturbed run).  torch and transformers are needed only here (``pip install
torch transformers``); a part whose imports fail says so and the others run.

Run::

    python benchmarks/bench_cpu.py [--parts scan,model,train,tiny] [--reps 5] [--quick]
                                   [--blas 1,0]
"""

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import numba
import numpy as np

import numba_mamba as nm
from numba_mamba import _cpu_scan, _cpu_threads, models, optim, reference, training

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scan import sequential_loop  # noqa: E402  (one copy of the loop)


def best_time(fn, reps, warmup=1):
    """Smallest wall time of ``fn()`` in seconds over ``reps`` runs, after ``warmup``."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def alternating_best(fns, reps, timers=None):
    """Smallest wall and CPU times of each of ``fns`` in seconds, timed in turns
    (``f, g, ..., f, g, ...``, ``reps`` each, after one warm-up each), so that
    a change in the machine's load reaches all alike: ``(walls, cpus)``, the
    CPU time that of the whole process (all its threads).  ``timers[i]``,
    where not None, is called instead of timing ``fns[i]`` here and returns
    its own ``(wall, cpu)`` (a call run in another process)."""
    timers = timers or [None] * len(fns)
    for fn in fns:
        fn()
    wall = [float("inf")] * len(fns)
    cpu = [float("inf")] * len(fns)
    for _ in range(reps):
        for i, fn in enumerate(fns):
            if timers[i] is not None:
                w, c = timers[i]()
            else:
                t, c0 = time.perf_counter(), time.process_time()
                fn()
                w, c = time.perf_counter() - t, time.process_time() - c0
            wall[i], cpu[i] = min(wall[i], w), min(cpu[i], c)
    return wall, cpu


def thread_counts():
    return sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)})


def blas_policies(args):
    """``--blas`` as ints: 1 (this library's limit to one BLAS thread), 0 (no limit)."""
    return [int(v) for v in args.blas.split(",")]


def try_torch():
    try:
        import torch
    except ImportError as exc:
        print(f"(torch not importable: {exc})")
        return None
    return torch


# ---------------------------------------------------------------- scan


def scan_inputs(Bt, Dc, N, L, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return dict(
        u=rng.standard_normal((Bt, Dc, L)).astype(dtype),
        delta=rng.uniform(-3.0, 0.5, (Bt, Dc, L)).astype(dtype),
        A=-rng.uniform(0.2, 3.0, (Dc, N)).astype(dtype),
        B=rng.standard_normal((Bt, N, L)).astype(dtype),
        C=rng.standard_normal((Bt, N, L)).astype(dtype),
        D=rng.standard_normal(Dc).astype(dtype),
        z=rng.standard_normal((Bt, Dc, L)).astype(dtype),
        delta_bias=rng.uniform(-1.0, 1.0, Dc).astype(dtype),
    )


def _np_softplus(x):
    return np.where(x > 20, x, np.log1p(np.exp(np.minimum(x, 20))))


def _np_sigmoid(x):
    return 1 / (1 + np.exp(-x))


def numpy_loop_s(a):
    t = time.perf_counter()
    sequential_loop(np.exp, _np_softplus, _np_sigmoid, a["u"], a["delta"], a["A"], a["B"],
                    a["C"], a["D"], a["z"], a["delta_bias"])
    return time.perf_counter() - t


def reference_backward_s(a, dout):
    _, _, backward = reference.selective_scan_vjp(**a, delta_softplus=True)
    t = time.perf_counter()
    backward(dout)
    return time.perf_counter() - t


def torch_loop_s(torch, a, dout, threads):
    """(forward s, backward s) of the loop in PyTorch on ``threads`` threads."""
    torch.set_num_threads(threads)
    F = torch.nn.functional
    t_in = {k: torch.from_numpy(v.copy()).requires_grad_(True) for k, v in a.items()}
    g = torch.from_numpy(dout)
    t = time.perf_counter()
    out = sequential_loop(torch.exp, F.softplus, torch.sigmoid, *(t_in[k] for k in (
        "u", "delta", "A", "B", "C", "D", "z", "delta_bias")))
    fwd = time.perf_counter() - t
    t = time.perf_counter()
    out.backward(g)
    return fwd, time.perf_counter() - t


def part_scan(args):
    Bt, Dc, N, L = 2, 64, 16, 1024 if args.quick else 4096
    updates = Bt * Dc * N * L
    torch = try_torch()
    print(f"\nscan: batch {Bt}, D {Dc}, N {N}, L {L}; z, D, delta_bias, softplus on, B and C "
          f"(Bt, N, L); ns per state update (min of {args.reps})")
    head = ("dtype", "threads", "fwd ns", "bwd ns", "NumPy fwd x", "ref bwd x", "torch fwd x",
            "torch bwd x")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for dtype in (np.float32, np.float64):
        a = scan_inputs(Bt, Dc, N, L, dtype)
        dout = np.random.default_rng(1).standard_normal((Bt, Dc, L)).astype(dtype)
        np_fwd = min(numpy_loop_s(a) for _ in range(max(1, args.reps // 3)))
        ref_bwd = reference_backward_s(a, dout)
        for threads in thread_counts():
            numba.set_num_threads(threads)
            state = {}

            def forward():
                state["out"], _, state["bwd"] = nm.selective_scan_vjp(**a, delta_softplus=True)

            fwd = best_time(forward, args.reps)
            bwd = best_time(lambda: state["bwd"](dout), args.reps)
            cells = [np.dtype(dtype).name, str(threads), f"{fwd / updates * 1e9:.3f}",
                     f"{bwd / updates * 1e9:.3f}", f"{np_fwd / fwd:.1f}", f"{ref_bwd / bwd:.1f}"]
            if torch is not None:
                tf, tb = torch_loop_s(torch, a, dout, threads)
                cells += [f"{tf / fwd:.1f}", f"{tb / bwd:.1f}"]
            else:
                cells += ["-", "-"]
            print("| " + " | ".join(cells) + " |", flush=True)


# ---------------------------------------------------------------- model forward


def hf_model(torch, cfg, params):
    """transformers' MambaForCausalLM holding ``params`` (copied), in eval mode."""
    from transformers import MambaConfig, MambaForCausalLM

    hf_cfg = MambaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
                         state_size=cfg.d_state, num_hidden_layers=cfg.n_layers,
                         expand=cfg.expand, conv_kernel=cfg.d_conv, time_step_rank=cfg.rank,
                         use_bias=False, use_conv_bias=True, layer_norm_epsilon=cfg.norm_eps,
                         tie_word_embeddings=True, use_mambapy=False)
    model = MambaForCausalLM(hf_cfg).eval()
    state = model.state_dict()
    with torch.no_grad():
        for name, tensor in state.items():
            ours = name.removeprefix("backbone.").replace("embeddings.", "embedding.")
            if name == "lm_head.weight":
                ours = "embedding.weight"
            tensor.copy_(torch.from_numpy(params[ours].reshape(tensor.shape)))
    return model


def part_model(args):
    torch = try_torch()
    if torch is None:
        return
    try:
        import transformers
    except ImportError as exc:
        print(f"(model part skipped: transformers not importable: {exc})")
        return
    cfg = models.MambaConfig(d_model=768, n_layers=2, vocab_size=1024, d_state=16)
    params = models.init_params(cfg, seed=0, dtype=np.float32)
    hf = hf_model(torch, cfg, params)
    prefill = getattr(nm.inference, "prefill", None)
    print(f"\nmodel forward: 2 layers, d_model 768, N 16, vocab 1024, batch 1, float32, "
          f"transformers {transformers.__version__}, torch {torch.__version__}; ms (min of "
          f"{args.reps})")
    head = ("L", "threads", "BLAS limit", "model_forward", "no cache", "prefill", "transformers",
            "model_forward / transformers", "max |logit diff|")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for L in (256, 1024):
        tokens = np.random.default_rng(L).integers(0, cfg.vocab_size, (1, L))
        t_tokens = torch.from_numpy(tokens)
        for threads in thread_counts():
            numba.set_num_threads(threads)
            torch.set_num_threads(threads)
            with torch.no_grad():
                theirs = best_time(lambda: hf(t_tokens), args.reps)
                ref = hf(t_tokens).logits.numpy()
            for blas in blas_policies(args):
                _cpu_threads.BLAS_THREADS = blas
                ours = best_time(lambda: models.model_forward(tokens, params, cfg), args.reps)
                bare = best_time(lambda: models.model_forward(tokens, params, cfg,
                                                              keep_cache=False), args.reps)
                pre = (best_time(lambda: prefill(tokens, params, cfg), args.reps) if prefill
                       else None)
                got = models.model_forward(tokens, params, cfg)[0]
                diff = float(np.max(np.abs(got - ref)))
                print(f"| {L} | {threads} | {blas or 'none'} | {ours * 1e3:.1f} | "
                      f"{bare * 1e3:.1f} | "
                      f"{'-' if pre is None else f'{pre * 1e3:.1f}'} | {theirs * 1e3:.1f} | "
                      f"{ours / theirs:.2f} | {diff:.2g} |", flush=True)
    _cpu_threads.BLAS_THREADS = 1


# ---------------------------------------------------------------- training step


TRAIN_CFG = dict(d_model=64, n_layers=2, vocab_size=16, d_state=16)
TRAIN_ADAMW = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def train_batches(cfg, Bt=32, L=80):
    rng = np.random.default_rng(0)
    return [(rng.integers(0, cfg.vocab_size, (Bt, L)), rng.integers(0, cfg.vocab_size, (Bt, L)))
            for _ in range(4)]


def torch_five_steps(torch, threads):
    """A function running 5 PyTorch eager training steps of the examples' model."""
    from _torch_mamba import TorchMamba, make_train_step

    cfg = models.MambaConfig(**TRAIN_CFG)
    numba.set_num_threads(threads)
    torch.set_num_threads(threads)
    model = TorchMamba(torch, models.init_params(cfg, seed=0), cfg, "cpu", np,
                       requires_grad=True)
    step = make_train_step(model, max_grad_norm=1.0, **TRAIN_ADAMW)
    t_batches = [(torch.from_numpy(a), torch.from_numpy(b)) for a, b in train_batches(cfg)]

    def theirs():
        for tokens, targets in t_batches + t_batches[:1]:
            step(tokens, targets)

    return theirs


def _torch_child(conn, threads):
    """PyTorch's steps in a process of their own (spawned: glibc's malloc at its
    defaults, as a PyTorch user has it), run when the parent sends True."""
    import torch

    theirs = torch_five_steps(torch, threads)
    conn.send(None)
    while conn.recv():
        t, c = time.perf_counter(), time.process_time()
        theirs()
        conn.send((time.perf_counter() - t, time.process_time() - c))


def part_train(args):
    """Ours against PyTorch eager, both in turns.

    PyTorch runs in a spawned process of its own with glibc's ``malloc`` at its
    defaults, as a PyTorch user has it (a ``TrainStep`` on NumPy arrays sets
    ``malloc``'s thresholds for its process, :func:`numba_mamba._cpu_threads.hold_heap`,
    which speeds up PyTorch's steps in the same process too: the last column).
    """
    torch = try_torch()
    if torch is None:
        return
    import multiprocessing

    cfg = models.MambaConfig(**TRAIN_CFG)
    batches = train_batches(cfg)
    Bt, L = batches[0][0].shape
    print(f"\ntraining step: 2 layers, d_model 64, N 16, vocab 16, batch {Bt}, L {L}, AdamW, "
          f"clipping 1.0, float32; ms/step (min of {args.reps} x 5 steps, ours and theirs in "
          f"turns); PyTorch in its own process (glibc malloc's defaults), and in ours")
    head = ("threads", "BLAS limit", "TrainStep (NumPy)", "PyTorch eager", "ours / theirs",
            "CPU time: ours / theirs", "PyTorch eager in our process")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    spawn = multiprocessing.get_context("spawn")
    for threads in thread_counts():
        conn, child_end = spawn.Pipe()
        child = spawn.Process(target=_torch_child, args=(child_end, threads), daemon=True)
        child.start()
        conn.recv()  # the child is ready
        numba.set_num_threads(threads)
        theirs_here = torch_five_steps(torch, threads)
        params = models.init_params(cfg, seed=0)
        ts = training.TrainStep(params, cfg, optimizer=optim.AdamW(**TRAIN_ADAMW),
                                max_grad_norm=1.0)

        def ours():
            for tokens, targets in batches + batches[:1]:
                ts.step(tokens, targets)

        def theirs_apart():
            conn.send(True)
            return conn.recv()

        for blas in blas_policies(args):
            _cpu_threads.BLAS_THREADS = blas
            wall, cpu = alternating_best([ours, theirs_apart, theirs_here], args.reps,
                                         timers=[None, theirs_apart, None])
            mine, them, here = (t / 5 for t in wall)
            print(f"| {threads} | {blas or 'none'} | {mine * 1e3:.2f} | {them * 1e3:.2f} | "
                  f"{mine / them:.2f} | {cpu[0] / cpu[1]:.2f} | {here * 1e3:.2f} |", flush=True)
        conn.send(False)
        child.join()
    _cpu_threads.BLAS_THREADS = 1


# ---------------------------------------------------------------- small calls


def part_tiny(args):
    """Scan forward + backward per call at growing sizes on 2 and on 1 Numba thread."""
    if numba.config.NUMBA_NUM_THREADS < 2:
        print("\n(tiny part skipped: Numba has one thread)")
        return
    print(f"\nsmall calls: the CPU scan's forward + backward (``_cpu_scan``), batch 1, N 16, float32, "
          f"z, D, delta_bias, softplus on; us per call (min of {args.reps} x 20 calls); "
          f"SERIAL_BELOW = {_cpu_threads.SERIAL_BELOW} updates")
    head = ("D, L", "updates", "2 threads", "1 thread", "1 / 2", "serial_below picks")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    limit = _cpu_threads.SERIAL_BELOW
    for Dc, L in ((16, 1), (64, 1), (64, 4), (256, 4), (64, 32), (256, 16), (128, 64),
                  (256, 64), (256, 128), (512, 128)):
        a = scan_inputs(1, Dc, 16, L, np.float32)
        args_ = [a[k] for k in ("u", "delta", "A")] + [a["B"][:, None], a["C"][:, None]] + [
            a[k] for k in ("D", "z", "delta_bias")] + [True, None]
        dout = np.ones((1, Dc, L), np.float32)

        def call():
            for _ in range(20):
                saved = _cpu_scan.scan_forward(*args_)[2]
                _cpu_scan.scan_backward(dout, None, *args_, saved)

        us = {}
        _cpu_threads.SERIAL_BELOW = 0  # the thread count as set
        for threads in (2, 1):
            numba.set_num_threads(threads)
            us[threads] = best_time(call, args.reps) / 20 * 1e6
        _cpu_threads.SERIAL_BELOW = limit
        updates = Dc * 16 * L
        print(f"| {Dc}, {L} | {updates} | {us[2]:.0f} | {us[1]:.0f} | {us[1] / us[2]:.2f} | "
              f"{'1' if updates < limit else '2'} |", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="scan,model,train,tiny")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="shorter scan (L 1024)")
    parser.add_argument("--blas", default="1,0",
                        help="BLAS policies for model and train: 1 one thread, 0 no limit")
    args = parser.parse_args(argv)
    print(f"bench_cpu.py, {datetime.datetime.now().isoformat(timespec='minutes')}, "
          f"{platform.processor() or platform.machine()}, os.cpu_count()={os.cpu_count()}, "
          f"numba {numba.__version__}, numpy {np.__version__}, "
          f"numba-mamba {getattr(nm, '__version__', '?')}, load "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}; " + ", ".join(
              f"{v}={os.environ.get(v, '(unset)')}" for v in (
                  "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "NUMBA_NUM_THREADS",
                  "NUMBA_THREADING_LAYER", "NUMBA_MAMBA_BLAS_THREADS")))
    parts = {"scan": part_scan, "model": part_model, "train": part_train, "tiny": part_tiny}
    for name in args.parts.split(","):
        parts[name](args)


if __name__ == "__main__":
    main()
