"""Time the captured steps of issue 18 against the same models in PyTorch, in one process.

Rows (``--rows``, default all):

1. Decoding, mamba-130m's shape (d_model 768, 24 layers, vocab 50280, N 16,
   d_conv 4, expand 2, float32), batch 1 and 16, ms/token:
   ``Decoder.generate`` (greedy; the slope of its time over the number of new
   tokens, so the prompt's prefill drops out) and ``Decoder.step`` alone,
   against PyTorch's step of the same model, eager and captured with
   ``torch.cuda.CUDAGraph`` (greedy argmax on the device).  Then ms/token of
   ``Decoder.step`` after prompts of 16, 4096 and 65,536 tokens (``prefill``
   in chunks of 4096), and the ratio max/min of the three (target <= 1.10).
2. Training step, 2 layers, d_model 64, N 16, vocab 16, batch 32, length 80,
   AdamW, clipping at 1.0: ``TrainStep.step`` against PyTorch eager
   (autograd, ``clip_grad_norm_``, ``torch.optim.AdamW``), and
   ``TrainStep.step`` on NumPy arrays (the CPU).
3. Training step, 4 layers, d_model 256, N 16, vocab 16, batch 16, length 1024.
4. One Mamba block forward + backward (d_model 768, batch 8, length 2048):
   ``models.mamba_block_forward`` / ``mamba_block_backward`` against the
   PyTorch block.
5. Host time of a tiny ``numba_mamba.selective_scan`` (batch 1, D 4, N 4,
   L 16, float32) against CuPy's ``u + z`` in the same rounds (the stream
   synchronized before each call; median of 200 calls per round).

In the PyTorch models the selective scan is this library's, shared through
DLPack inside a ``torch.autograd.Function`` (``benchmarks/_torch_mamba.py``),
so a ratio compares everything around the scan.  Both models start from the
same ``models.init_params`` arrays, and before timing the script checks that
they agree (logits, the losses of two training steps, the block's output and
gradients) and prints the largest differences.  TF32 is off in PyTorch (CuPy
does not use it either).

Times: CUDA events (host clock for the CPU and row 5), after warm-up (so
compiling and capturing are left out), median over ``--reps`` repetitions,
each on inputs drawn at random beforehand; the GPU's clocks are left as they
are.  A row whose numba-mamba API is missing from the tree reports the error
and the other measurements still run.

Run on the GPU (about 5 minutes with ``--quick``)::

    python benchmarks/bench_steps.py --quick --json steps.json

and on the CPU, at tiny sizes, to check the models and the script (its
times mean nothing)::

    python benchmarks/bench_steps.py --device cpu
"""

import argparse
import dataclasses
import datetime
import json
import platform
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np

import numba_mamba as nm
from numba_mamba import inference, models, optim, training

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _torch_mamba as tm  # noqa: E402

ADAMW = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
MAX_GRAD_NORM = 1.0


@dataclasses.dataclass
class Sizes:
    """The shapes and repetition counts of a run."""

    decode: models.MambaConfig
    decode_batches: tuple
    prompt: int  # prompt of the timed generate calls
    tokens: int  # steps per timed repetition
    positions: tuple  # prompt lengths of the flatness check
    chunk: int  # prefill chunk
    flat_batch: int
    small: models.MambaConfig
    small_batch: tuple  # (batch, length)
    medium: models.MambaConfig
    medium_batch: tuple
    block_d_model: int
    block_batch: tuple
    reps: int
    steps_per_rep: int  # training steps per timed repetition
    cpu_reps: int
    rounds: int  # row 5
    round_calls: int


def sizes_for(args):
    gpu = args.device == "cuda"
    lm = models.MambaConfig
    if gpu:
        s = Sizes(decode=lm(d_model=768, n_layers=24, vocab_size=50280, d_state=16),
                  decode_batches=(1, 16), prompt=16, tokens=64,
                  positions=(16, 4096, 65536), chunk=4096, flat_batch=1,
                  small=lm(d_model=64, n_layers=2, vocab_size=16, d_state=16),
                  small_batch=(32, 80),
                  medium=lm(d_model=256, n_layers=4, vocab_size=16, d_state=16),
                  medium_batch=(16, 1024), block_d_model=768, block_batch=(8, 2048),
                  reps=20, steps_per_rep=10, cpu_reps=5, rounds=5, round_calls=200)
        if args.quick:
            s = dataclasses.replace(s, tokens=32, reps=7, steps_per_rep=5, cpu_reps=2,
                                    rounds=3)
    else:  # tiny: checks the models and the script, times mean nothing
        s = Sizes(decode=lm(d_model=16, n_layers=2, vocab_size=37, d_state=4),
                  decode_batches=(1, 3), prompt=4, tokens=3, positions=(4, 16, 40), chunk=16,
                  flat_batch=1, small=lm(d_model=16, n_layers=2, vocab_size=16, d_state=4),
                  small_batch=(4, 12), medium=lm(d_model=32, n_layers=3, vocab_size=16,
                                                 d_state=4),
                  medium_batch=(2, 20), block_d_model=16, block_batch=(2, 24), reps=2,
                  steps_per_rep=1, cpu_reps=2, rounds=2, round_calls=20)
    overrides = {k: getattr(args, k) for k in ("reps", "tokens", "chunk", "flat_batch")
                 if getattr(args, k) is not None}
    if args.positions:
        overrides["positions"] = tuple(int(v) for v in args.positions.split(","))
    return dataclasses.replace(s, **overrides)


# ---------------------------------------------------------------- timing


class Clock:
    """Milliseconds of a call: CUDA events on the current stream ('cupy', 'torch') or host time."""

    def __init__(self, kind, lib=None):
        self.kind, self.lib = kind, lib
        if kind == "cupy":
            self.events = lib.cuda.Event(), lib.cuda.Event()
        elif kind == "torch":
            self.events = (lib.cuda.Event(enable_timing=True),
                           lib.cuda.Event(enable_timing=True))

    def sync(self):
        if self.kind == "cupy":
            self.lib.cuda.Device().synchronize()
        elif self.kind == "torch":
            self.lib.cuda.synchronize()

    def measure(self, fn, reps, warmup=2, setup=None, per=1):
        """Median ms / ``per`` of ``fn(k)`` over ``reps`` calls, after ``warmup`` calls;
        ``setup(k)`` runs before each, outside the timed span."""
        for k in range(warmup):
            if setup:
                setup(k)
            fn(k)
        samples = []
        for k in range(reps):
            if setup:
                setup(k)
            self.sync()
            if self.kind == "host":
                t = time.perf_counter()
                fn(k)
                samples.append((time.perf_counter() - t) * 1e3 / per)
                continue
            start, stop = self.events
            start.record()
            fn(k)
            stop.record()
            stop.synchronize()
            ms = (self.lib.cuda.get_elapsed_time(start, stop) if self.kind == "cupy"
                  else start.elapsed_time(stop))
            samples.append(ms / per)
        return statistics.median(samples), samples


# ---------------------------------------------------------------- results


class Results:
    """Table rows, agreement checks and errors of a run."""

    def __init__(self):
        self.rows, self.checks, self.errors = [], [], []

    def add(self, row, work, unit, ours=None, eager=None, graph=None, vs=None, target=None,
            note=""):
        """One line; ``vs`` ('eager', 'graph' or a number) is what ``ours`` is divided by."""
        base = {"eager": eager, "graph": graph}.get(vs, vs)
        ratio = ours / base if ours is not None and base else None
        met = None if ratio is None or target is None else ratio <= target
        self.rows.append(dict(row=row, work=work, unit=unit, ours=ours, torch_eager=eager,
                              torch_graph=graph, ratio=ratio, ratio_of=vs, target=target,
                              met=met, note=note))
        print(f"  row {row}: {work}: ours {_fmt(ours)}, eager {_fmt(eager)}, graph "
              f"{_fmt(graph)} {unit}; ratio {_fmt(ratio)}" + (f" ({note})" if note else ""),
              flush=True)

    def check(self, row, what, got, want, rtol, norm=False):
        """Record ``max |got - want|`` against ``rtol * max |want|`` (``norm``: the
        Euclidean norms ``|got - want|`` against ``rtol * |want|`` instead)."""
        got, want = (_as_host(a) for a in (got, want))
        if got.shape != want.shape:
            raise ValueError(f"{what}: shapes differ, got {got.shape}, want {want.shape}")
        measure = np.linalg.norm if norm else (lambda a: float(np.abs(a).max()) if a.size else 0.)
        diff, scale = float(measure(got - want)), float(measure(want))
        ok = bool(np.isfinite(diff) and diff <= rtol * max(scale, 1e-30))
        name = "norm" if norm else "max"
        self.checks.append(dict(row=row, what=what, diff=diff, ref=scale, measure=name,
                                rtol=rtol, ok=ok))
        print(f"  check row {row}: {what}: {name} |diff| {diff:.3g} ({name} |ref| {scale:.3g}, "
              f"rtol {rtol:g}): {'agree' if ok else 'DISAGREE'}", flush=True)
        return ok

    def error(self, row, what, exc):
        tb = traceback.extract_tb(exc.__traceback__)
        where = f"{Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
        msg = f"{type(exc).__name__}: {exc}"
        self.errors.append(dict(row=row, what=what, error=msg, where=where))
        print(f"  FAILED row {row}: {what}: {msg} [{where}]", file=sys.stderr, flush=True)

    def attempt(self, row, what, fn, *a):
        """``fn(*a)``, or None with the error recorded."""
        try:
            return fn(*a)
        except Exception as exc:  # a missing API or a failed measurement: report, go on
            self.error(row, what, exc)
            return None

    def table(self):
        lines = ["| row | work | unit | numba-mamba | PyTorch eager | PyTorch CUDA graph | "
                 "ratio | target | met |", "|---|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            ratio = "" if r["ratio"] is None else f"{r['ratio']:.3g}x" + (
                f" of {r['ratio_of']}" if isinstance(r["ratio_of"], str) else "")
            target = "" if r["target"] is None else f"<= {r['target']:g}"
            met = {None: "", True: "yes", False: "**no**"}[r["met"]]
            work = r["work"] + (f" ({r['note']})" if r["note"] else "")
            lines.append(f"| {r['row']} | {work} | {r['unit']} | {_fmt(r['ours'])} | "
                         f"{_fmt(r['torch_eager'])} | {_fmt(r['torch_graph'])} | {ratio} | "
                         f"{target} | {met} |")
        return "\n".join(lines)


def _as_host(a):
    """A float64 NumPy copy of a NumPy or CuPy array, a tensor or a list of numbers."""
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(tm.host(a), dtype=np.float64)


def _update(after, before):
    """All parameters' changes, ``after - before``, as one flat host vector (sorted names)."""
    return np.concatenate([(_as_host(after[k]) - _as_host(before[k])).ravel()
                           for k in sorted(before)])


def _fmt(v):
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# ---------------------------------------------------------------- environment


class Env:
    """The array module, PyTorch, clocks and random data of one run."""

    def __init__(self, args):
        self.gpu = args.device == "cuda"
        self.rng = np.random.default_rng(args.seed)
        if self.gpu:
            import cupy
            self.xp, self.clock = cupy, Clock("cupy", cupy)
        else:
            self.xp, self.clock = np, Clock("host")
        self.host_clock = Clock("host")
        self.torch = self.torch_clock = None
        try:
            import torch
        except ImportError as exc:
            self.torch_error = exc
        else:
            self.torch = torch
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
            self.device = "cuda" if self.gpu else "cpu"
            self.torch_clock = Clock("torch", torch) if self.gpu else Clock("host")

    def need_torch(self):
        if self.torch is None:
            raise RuntimeError(f"PyTorch is not installed ({self.torch_error})")
        return self.torch

    def tokens(self, shape, vocab):
        """Random token ids (host int64)."""
        return self.rng.integers(0, vocab, shape, dtype=np.int64)

    def normal(self, shape):
        return self.rng.standard_normal(shape).astype(np.float32)

    def ours(self, a):
        return self.xp.asarray(a)

    def theirs(self, a):
        return self.need_torch().tensor(a, device=self.device)

    def params(self, cfg):
        return models.init_params(cfg, seed=0, xp=self.xp)

    def torch_model(self, params, cfg, requires_grad=False):
        return tm.TorchMamba(self.need_torch(), params, cfg, self.device, self.xp,
                             requires_grad=requires_grad)

    def release(self):
        """Give cached device memory back between rows."""
        if self.gpu:
            self.xp.get_default_memory_pool().free_all_blocks()
            if self.torch is not None:
                self.torch.cuda.empty_cache()

    def info(self):
        from importlib import metadata

        d = {"date": datetime.date.today().isoformat(), "python": platform.python_version()}
        for name in ("numba-mamba", "numba", "numba-cuda", "cupy-cuda13x", "cupy-cuda12x",
                     "cupy", "torch", "numpy"):
            try:
                d[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                pass
        if self.gpu:
            d["device"] = self.xp.cuda.runtime.getDeviceProperties(0)["name"].decode()
        else:
            d["device"] = f"CPU ({platform.processor() or platform.machine()})"
        return d


def api(module, name):
    """``module.name``, or RuntimeError saying that the issue-18 API is not in this tree."""
    try:
        return getattr(module, name)
    except AttributeError:
        raise RuntimeError(f"{module.__name__}.{name} is missing from this tree (the captured-step "
                           f"API of issue 18): measurement skipped") from None


def capture_notes(caught):
    """'EAGER, capture failed: ...' for the first CaptureWarning in ``caught``, else ''."""
    msgs = [str(w.message) for w in caught if type(w.message).__name__ == "CaptureWarning"]
    return "EAGER, capture failed: " + msgs[0][:120] if msgs else ""


# ---------------------------------------------------------------- row 1: decoding


def row_decode(env, s, res):
    cfg = s.decode
    print(f"row 1: decoding, d_model {cfg.d_model}, {cfg.n_layers} layers, vocab "
          f"{cfg.vocab_size}, N {cfg.d_state}", flush=True)
    params = env.params(cfg)
    model = res.attempt(1, "PyTorch model", env.torch_model, params, cfg)
    for Bt in s.decode_batches:
        decode_batch(env, s, res, cfg, params, model, Bt)
        env.release()
    res.attempt(1, "flat from position 16 on", decode_flat, env, s, res, cfg, params)


def decode_batch(env, s, res, cfg, params, model, Bt):
    seq = env.tokens((8, Bt), cfg.vocab_size)  # the agreement check's tokens
    ref = res.attempt(1, f"reference inference.step, batch {Bt}", reference_logits,
                      env, params, cfg, seq)
    ours = res.attempt(1, f"numba-mamba Decoder, batch {Bt}", ours_decode, env, s, res, cfg,
                       params, Bt, seq, ref)
    eager = graph = None
    if model is not None:
        eager, graph = res.attempt(1, f"PyTorch decode, batch {Bt}", torch_decode, env, s, res,
                                   model, Bt, seq, ref) or (None, None)
    gen, total, step_ms, note = ours or (None, None, None, "")
    gen_note = ", ".join(n for n in (note, total and f"total / n_new {total:.4g}") if n)
    res.add(1, f"decode, batch {Bt}, Decoder.generate", "ms/token", gen, eager, graph,
            vs="graph" if env.gpu else "eager", target=1.0 if env.gpu else None, note=gen_note)
    res.add(1, f"decode, batch {Bt}, Decoder.step", "ms/token", step_ms, eager, graph,
            vs="graph" if env.gpu else "eager", target=1.0 if env.gpu else None, note=note)


def reference_logits(env, params, cfg, seq):
    """Logits of the last of ``seq (T, Bt)`` fed one by one to ``inference.step``."""
    state = inference.init_state(seq.shape[1], params, cfg)
    for tok in seq:
        out, state = inference.step(env.ours(tok), state, params, cfg)
    return out


def ours_decode(env, s, res, cfg, params, Bt, seq, ref):
    """(generate ms/token (slope), generate ms/token (total / n), step ms/token, note)
    of ``inference.Decoder``."""
    K = s.tokens
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dec = api(inference, "Decoder")(params, cfg, batch_size=Bt)
        # agreement: steps, then a prefill of the same tokens, against inference.step
        dec.reset()
        for tok in seq:
            out = dec.step(env.ours(tok))
        if ref is not None:
            res.check(1, f"Decoder.step logits vs inference.step, batch {Bt}", out, ref, 1e-4)
        dec.reset()
        out = dec.prefill(env.ours(seq.T.copy()))
        if ref is not None:
            res.check(1, f"Decoder.prefill logits vs inference.step, batch {Bt}", out, ref, 1e-4)
        # generate: fresh prompts, the slope over the number of new tokens
        prompts = [env.ours(env.tokens((Bt, s.prompt), cfg.vocab_size))
                   for _ in range(s.reps + 2)]
        n_short, n_long = max(1, K // 4), K + max(1, K // 4)
        gen = dec.generate(prompts[0], n_long)
        if gen.shape != (Bt, s.prompt + n_long):
            raise ValueError(f"Decoder.generate returned shape {tuple(gen.shape)}, expected "
                             f"{(Bt, s.prompt + n_long)}")
        times = {}
        for n in (n_short, n_long):
            times[n], _ = env.clock.measure(lambda k: dec.generate(prompts[k], n), s.reps,
                                            setup=lambda k: dec.reset())
        per_token = (times[n_long] - times[n_short]) / (n_long - n_short)
        # step alone, on random tokens
        steps = env.ours(env.tokens((s.reps + 2, K, Bt), cfg.vocab_size))
        toks = [[steps[k, j] for j in range(K)] for k in range(s.reps + 2)]

        def run(k):
            for t in toks[k]:
                dec.step(t)
        step_ms, _ = env.clock.measure(run, s.reps, per=K)
    note = capture_notes(caught)
    print(f"  Decoder batch {Bt}: generate({n_short}) {times[n_short]:.3f} ms, "
          f"generate({n_long}) {times[n_long]:.3f} ms, total/n {times[n_long] / n_long:.4f} "
          f"ms/token", flush=True)
    return per_token, times[n_long] / n_long, step_ms, note


def torch_decode(env, s, res, model, Bt, seq, ref):
    """(eager, graph) ms/token of the PyTorch step (graph None on the CPU)."""
    K = s.tokens
    dec = tm.TorchDecoder(model, Bt)
    starts = [env.theirs(env.tokens(Bt, model.config.vocab_size)) for _ in range(s.reps + 2)]

    def check(label):
        dec.reset()
        for tok in seq:
            out = dec.feed(env.theirs(tok))
        if ref is not None:
            res.check(1, f"PyTorch {label} step logits vs inference.step, batch {Bt}", out,
                      ref, 1e-4)

    def run(k):
        for _ in range(K):
            dec.run()

    def setup(k):
        dec.token.copy_(starts[k])

    check("eager")
    reps_eager = max(2, s.reps // 3)
    eager, _ = env.torch_clock.measure(run, reps_eager, warmup=1, setup=setup, per=K)
    graph = None
    if env.gpu:
        dec.capture()
        check("CUDA-graph")
        graph, _ = env.torch_clock.measure(run, s.reps, setup=setup, per=K)
    return eager, graph


def decode_flat(env, s, res, cfg, params):
    """ms/token of Decoder.step after prompts of s.positions tokens; the ratio max/min."""
    Bt, K = s.flat_batch, s.tokens
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dec = api(inference, "Decoder")(params, cfg, batch_size=Bt)
        steps = env.ours(env.tokens((s.reps + 2, K, Bt), cfg.vocab_size))
        toks = [[steps[k, j] for j in range(K)] for k in range(s.reps + 2)]

        def run(k):
            for t in toks[k]:
                dec.step(t)
        per_position = {}
        for P in s.positions:
            dec.reset()
            for start in range(0, P, s.chunk):
                n = min(s.chunk, P - start)
                dec.prefill(env.ours(env.tokens((Bt, n), cfg.vocab_size)))
            if getattr(dec, "position", P) != P:
                raise ValueError(f"Decoder.position is {dec.position} after a prompt of {P}")
            per_position[P], _ = env.clock.measure(run, s.reps, per=K)
            res.add(1, f"decode, batch {Bt}, Decoder.step after a prompt of {P}", "ms/token",
                    per_position[P])
            env.release()
    lo, hi = min(per_position.values()), max(per_position.values())
    res.add(1, f"decode flatness, batch {Bt}: max/min of ms/token over positions "
            f"{', '.join(map(str, s.positions))}", "ratio", hi / lo, vs=1.0,
            target=1.1 if env.gpu else None, note=capture_notes(caught))


# ---------------------------------------------------------------- rows 2, 3: training


def row_train(env, s, res, row):
    cfg, (Bt, L) = (s.small, s.small_batch) if row == 2 else (s.medium, s.medium_batch)
    target = 0.25 if row == 2 else 0.8
    print(f"row {row}: training step, {cfg.n_layers} layers, d_model {cfg.d_model}, N "
          f"{cfg.d_state}, vocab {cfg.vocab_size}, batch {Bt}, length {L}", flush=True)
    n_sets = s.reps + 2
    batches = [(env.tokens((Bt, L), cfg.vocab_size), env.tokens((Bt, L), cfg.vocab_size))
               for _ in range(n_sets)]
    check_in, check_tg = batches[0]
    want = res.attempt(row, "reference (loss_and_grads, clip_grad_norm, AdamW)",
                       reference_steps, env, cfg, check_in, check_tg)
    spr = s.steps_per_rep
    ours = res.attempt(row, "numba-mamba TrainStep", ours_train, env, s, res, row, cfg,
                       batches, want, env.xp, env.clock, s.reps, spr)
    theirs = res.attempt(row, "PyTorch eager training step", torch_train, env, s, res, row,
                         cfg, batches, want)
    ms, note = ours or (None, "")
    label = f"train step, {cfg.n_layers} x d_model {cfg.d_model}, batch {Bt}, L {L}"
    res.add(row, label, "ms/step", ms, theirs, vs="eager", target=target if env.gpu else None,
            note=note)
    if env.gpu and row == 2:
        env.release()
        cpu = res.attempt(row, "numba-mamba TrainStep on the CPU", ours_train, env, s, res, row,
                          cfg, batches, None, np, env.host_clock, s.cpu_reps, 1)
        if cpu is not None:
            res.add(row, label + ", numba-mamba on the CPU (NumPy)", "ms/step", cpu[0], vs=ms,
                    note=f"CPU / GPU {cpu[0] / ms:.3g}x" if ms else "")
    env.release()


def reference_steps(env, cfg, inputs, targets, steps=2):
    """``(losses, update)`` of ``steps`` steps of the eager path of ``training.train`` on
    one batch: the losses, and the parameters' change (:func:`_update`)."""
    params = env.params(cfg)
    init = {k: v.copy() for k, v in params.items()}
    opt = optim.AdamW(**ADAMW)
    losses = []
    for _ in range(steps):
        loss, grads = models.loss_and_grads(env.ours(inputs), env.ours(targets), params, cfg)
        optim.clip_grad_norm(grads, MAX_GRAD_NORM)
        opt.step(params, grads)
        losses.append(loss)
    return np.array(losses), _update(params, init)


def check_steps(res, row, who, losses, update, want):
    """Check the losses and the parameters' change of two steps against the reference's.

    The change is compared by its norm: a parameter whose gradient is near zero
    may take AdamW's first step (``lr`` times the gradient's sign) either way."""
    if want is not None:
        res.check(row, f"{who} losses of 2 steps vs reference", losses, want[0], 1e-4)
        res.check(row, f"{who} parameter change of 2 steps vs reference", update, want[1],
                  1e-3, norm=True)


def ours_train(env, s, res, row, cfg, batches, want, xp, clock, reps, per):
    """(ms/step, note) of ``training.TrainStep`` on ``xp`` arrays; checks its first steps
    (it updates the given parameter arrays)."""
    params = models.init_params(cfg, seed=0, xp=xp)
    init = {k: v.copy() for k, v in params.items()}
    data = [(xp.asarray(a), xp.asarray(b)) for a, b in batches]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ts = api(training, "TrainStep")(params, cfg, optimizer=optim.AdamW(**ADAMW),
                                        max_grad_norm=MAX_GRAD_NORM)
        for _ in range(2):
            ts.step(*data[0])
        check_steps(res, row, "TrainStep", ts.losses(), _update(params, init), want)

        def run(k):
            for j in range(per):
                ts.step(*data[(k * per + j) % len(data)])
        ms, _ = clock.measure(run, reps, per=per)
        later = ts.losses()
    if not np.all(np.isfinite(later)):
        raise FloatingPointError(f"TrainStep losses not finite: {later[:5]}")
    return ms, capture_notes(caught)


def torch_train(env, s, res, row, cfg, batches, want):
    """ms/step of the PyTorch eager step; checks its logits and first steps."""
    params = env.params(cfg)
    model = env.torch_model(params, cfg, requires_grad=True)
    data = [(env.theirs(a), env.theirs(b)) for a, b in batches]
    logits, _ = models.model_forward(env.ours(batches[0][0]), params, cfg)
    with env.torch.no_grad():
        res.check(row, "PyTorch forward logits vs models.model_forward",
                  model.forward(data[0][0]), logits, 1e-4)
    step = tm.make_train_step(model, max_grad_norm=MAX_GRAD_NORM, **ADAMW)
    first = [float(step(*data[0])) for _ in range(2)]
    check_steps(res, row, "PyTorch", first, _update(model.params, params), want)
    per = s.steps_per_rep

    def run(k):
        for j in range(per):
            step(*data[(k * per + j) % len(data)])
    ms, _ = env.torch_clock.measure(run, s.reps, per=per)
    return ms


# ---------------------------------------------------------------- row 4: one block


def row_block(env, s, res):
    dm, (Bt, L) = s.block_d_model, s.block_batch
    cfg = models.MambaConfig(d_model=dm, n_layers=1, vocab_size=8)
    print(f"row 4: one Mamba block forward+backward, d_model {dm} (d_inner {cfg.d_inner}, "
          f"N {cfg.d_state}), batch {Bt}, length {L}", flush=True)
    params = env.params(cfg)
    p = models.layer_params(params, 0)
    n_sets = 3
    host = [(env.normal((Bt, L, dm)), env.normal((Bt, L, dm))) for _ in range(n_sets)]
    ours_data = [(env.ours(u), env.ours(d)) for u, d in host]
    out, cache = models.mamba_block_forward(ours_data[0][0], p)
    du, grads = models.mamba_block_backward(ours_data[0][1], cache)
    del cache

    def ours(k):
        o, c = models.mamba_block_forward(ours_data[k % n_sets][0], p)
        models.mamba_block_backward(ours_data[k % n_sets][1], c)
    t_ours = res.attempt(4, "numba-mamba block", lambda: env.clock.measure(ours, s.reps)[0])
    t_torch = res.attempt(4, "PyTorch block", torch_block, env, s, res, params, cfg, host,
                          (out, du, grads))
    res.add(4, f"block fwd+bwd, d_model {dm}, batch {Bt}, L {L}", "ms", t_ours, t_torch,
            vs="eager", target=0.8 if env.gpu else None)
    env.release()


def torch_block(env, s, res, params, cfg, host, want):
    model = env.torch_model(params, cfg, requires_grad=True)
    p = model.layer(0)
    data = [(env.theirs(u).requires_grad_(True), env.theirs(d)) for u, d in host]
    u0, d0 = data[0]
    out = model.block(u0, p)
    out.backward(d0)
    w_out, w_du, w_grads = want
    res.check(4, "PyTorch block output vs mamba_block_forward", out, w_out, 1e-4)
    res.check(4, "PyTorch block du vs mamba_block_backward", u0.grad, w_du, 1e-4)
    for name in ("in_proj.weight", "A_log", "x_proj.weight"):
        res.check(4, f"PyTorch block d{name} vs mamba_block_backward", p[name].grad,
                  w_grads[name], 1e-4)
    leaves = list(p.values())

    def run(k):
        u, d = data[k % len(data)]
        for v in leaves:
            v.grad = None
        u.grad = None
        model.block(u, p).backward(d)
    return env.torch_clock.measure(run, s.reps)[0]


# ---------------------------------------------------------------- row 5: a tiny scan's host time


def row_tiny_scan(env, s, res):
    """Host us of ``selective_scan`` and of ``u + z`` in the same rounds; ratio of medians."""
    xp = env.xp
    Bt, Dc, N, L = 1, 4, 4, 16
    print(f"row 5: host time of selective_scan {(Bt, Dc, N, L)} float32 against u + z, "
          f"{s.rounds} rounds of {s.round_calls} calls", flush=True)
    n_sets = 8

    def inputs():
        a = env.normal
        return dict(u=a((Bt, Dc, L)), delta=a((Bt, Dc, L)) * 0.5 - 1,
                    A=-np.exp(a((Dc, N)) * 0.5), B=a((Bt, N, L)), C=a((Bt, N, L)),
                    D=a((Dc,)), z=a((Bt, Dc, L)), delta_bias=a((Dc,)) * 0.1)
    sets = [{k: env.ours(v) for k, v in inputs().items()} for _ in range(n_sets)]
    calls = {"selective_scan": lambda i: nm.selective_scan(**sets[i], delta_softplus=True),
             "u + z": lambda i: sets[i]["u"] + sets[i]["z"]}
    sync = xp.cuda.get_current_stream().synchronize if env.gpu else (lambda: None)
    for fn in calls.values():
        for i in range(n_sets):
            fn(i)
    per_round = {name: [] for name in calls}
    for r in range(s.rounds):
        for name, fn in calls.items():
            ts = []
            for k in range(s.round_calls):
                sync()
                t = time.perf_counter()
                fn(k % n_sets)
                ts.append(time.perf_counter() - t)
            sync()
            per_round[name].append(statistics.median(ts) * 1e6)
        print(f"  round {r}: " + ", ".join(f"{n} {v[-1]:.2f} us" for n, v in per_round.items()),
              flush=True)
    scan_us = statistics.median(per_round["selective_scan"])
    add_us = statistics.median(per_round["u + z"])
    res.add(5, f"tiny selective_scan {(Bt, Dc, N, L)} host time (eager column: u + z, "
            f"{'CuPy' if env.gpu else 'NumPy'})",
            "us", scan_us, add_us, vs="eager", target=2.0 if env.gpu else None,
            note="rounds: " + "; ".join(f"{a:.1f}/{b:.1f}" for a, b in
                                         zip(per_round["selective_scan"], per_round["u + z"])))


# ---------------------------------------------------------------- main


ROWS = {1: row_decode, 2: lambda e, s, r: row_train(e, s, r, 2),
        3: lambda e, s, r: row_train(e, s, r, 3), 4: row_block, 5: row_tiny_scan}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,2,3,4,5", help="comma-separated rows (1-5)")
    parser.add_argument("--reps", type=int, help="timed repetitions per measurement")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (GPU: ~5 min)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: every row at tiny sizes on NumPy / torch CPU (a smoke test)")
    parser.add_argument("--json", help="write the results to this path")
    parser.add_argument("--tokens", type=int, help="decode steps per timed repetition")
    parser.add_argument("--positions", help="row 1 flatness: prompt lengths, comma-separated")
    parser.add_argument("--chunk", type=int, help="row 1 flatness: prefill chunk")
    parser.add_argument("--flat-batch", type=int, help="row 1 flatness: batch size")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rows = [int(r) for r in args.rows.split(",") if r]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        parser.error(f"--rows takes numbers in {sorted(ROWS)}, got {unknown}")
    s = sizes_for(args)
    env = Env(args)
    res = Results()
    info = env.info()
    print("# bench_steps " + ", ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    t0 = time.perf_counter()
    for r in rows:
        res.attempt(r, "row", ROWS[r], env, s, res)
    elapsed = time.perf_counter() - t0
    print()
    print(f"# numba-mamba captured steps against PyTorch, {info['device']}, {info['date']}; "
          f"median of {s.reps} repetitions; {elapsed:.0f} s")
    print(res.table())
    bad = [c for c in res.checks if not c["ok"]]
    print(f"\nagreement checks: {len(res.checks) - len(bad)} agree, {len(bad)} disagree; "
          f"errors: {len(res.errors)}")
    for c in bad:
        print(f"  DISAGREE row {c['row']}: {c['what']}: {c['measure']} |diff| {c['diff']:.3g}")
    for e in res.errors:
        print(f"  ERROR row {e['row']}: {e['what']}: {e['error']} [{e['where']}]")
    if args.json:
        out = dict(info=info, args=vars(args), sizes=_plain(dataclasses.asdict(s)),
                   elapsed_s=elapsed, rows=res.rows, checks=res.checks, errors=res.errors)
        Path(args.json).write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")
    return 1 if bad or res.errors else 0


def _plain(v):
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


if __name__ == "__main__":
    sys.exit(main())
