"""Data-parallel training (numba_mamba.distributed): store, communicators, launcher, DP steps.

The CPU tests start real processes through the launcher (``--cpu``): this
file is also the script each rank runs (``python tests/test_distributed.py
MODE SPEC``, see :func:`_worker`).  Tolerances: in float64, N ranks with
batch B/N each and one rank with batch B compute the same gradients up to
the order of additions (~1e-16 relative), so parameters after a few AdamW
steps agree to rtol 1e-9 (the GPU tests' float64 tolerance,
tests/test_gpu_train_step.py); in float32 on the GPU to an absolute 2e-5
(a fiftieth of one step's move at lr 1e-3, as there).  Ranks of one run
hold the same bits: every rank receives the same sum.

GPU tests (marker ``gpu``): the NCCL communicator with world size 1 (one
GPU), and two ranks on two GPUs (skipped where fewer are visible).
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

if __name__ == "__main__":  # (a rank's script: the repository root on the path)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from numba_mamba import distributed, models, training  # noqa: E402
from numba_mamba.distributed import (DistributedError, TCPStore, TcpCommunicator,  # noqa: E402
                                     shard)
from numba_mamba.optim import AdamW  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = dict(d_model=8, n_layers=2, vocab_size=11, d_state=4)
HYPER = dict(lr=1e-2, min_lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), max_grad_norm=0.5)


def _global_batch(cfg, step, B=4, L=12):
    rng = np.random.default_rng(1000 + step)
    x = rng.integers(0, cfg.vocab_size, (B, L))
    return x, np.roll(x, -1, axis=1)


def _free_port():
    return distributed._free_port("127.0.0.1")


# ---------------------------------------------------------------- a rank's script


def _worker(mode, spec):
    """What each rank runs under the launcher (this file as the script)."""
    group = distributed.init_process_group(timeout=spec.get("timeout", 60))
    if mode == "train":
        xp = np
        if group.backend == "nccl":
            import cupy as xp
        cfg = models.MambaConfig(**spec["config"])
        seed = spec["seed"] + (group.rank if spec.get("seed_per_rank") else 0)
        params = models.init_params(cfg, seed=seed, dtype=np.dtype(spec["dtype"]), xp=xp)
        if spec.get("forbid_save") and group.rank != 0:
            def refuse(*a, **k):
                raise AssertionError(f"rank {group.rank} wrote a checkpoint")
            distributed.save_checkpoint = refuse
        res = distributed.train(
            params, cfg, lambda s: shard(_global_batch(cfg, s), group), spec["steps"],
            group=group, progress=False, log_every=2, checkpoint_path=spec.get("ckpt"),
            checkpoint_every=spec.get("every"), resume=spec.get("resume", False),
            bucket_bytes=spec.get("bucket_bytes", 0), **{**HYPER, **spec.get("hyper", {})})
        host = {k: (v.get() if hasattr(v, "get") else v) for k, v in params.items()}
        np.savez(os.path.join(spec["out"], f"rank{group.rank}.npz"),
                 __losses__=np.array(res.losses), __step__=res.step, **host)
    elif mode == "die":  # rank 1 dies; rank 0 waits for it in an all-reduce
        if group.rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        x = np.ones(4)
        for _ in range(100):
            group.comm.allreduce_sum(x).wait()
    elif mode == "die-gpu":  # the same through NCCL: rank 0 would wait forever
        import cupy
        if group.rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        x = cupy.ones(4, cupy.float32)
        for _ in range(100):
            group.comm.allreduce_sum(x)
        group.comm.synchronize()
    elif mode == "fail":  # rank 0 fails; rank 1 would sleep long
        if group.rank == 0:
            sys.exit(3)
        time.sleep(600)
    group.close()


def _launch(*args, timeout=120):
    """Run the launcher in a subprocess: ``(returncode, stderr, seconds)``."""
    t = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "numba_mamba.distributed", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stderr, time.monotonic() - t


def _train_ranks(tmp_path, nproc, extra=(), **spec):
    spec = {**dict(config=CFG, seed=0, dtype="float64", out=str(tmp_path)), **spec}
    rc, err, _ = _launch(*extra, "--nproc", str(nproc), os.path.join(ROOT, "tests",
                         "test_distributed.py"), "train", json.dumps(spec))
    assert rc == 0, err
    out = []
    for r in range(nproc):
        with np.load(tmp_path / f"rank{r}.npz") as f:
            out.append({k: f[k] for k in f.files})
    return out


def _single(steps, dtype=np.float64, xp=np, seed=0, hyper=None):
    """One rank with the whole batch: training.train, the same hyperparameters."""
    cfg = models.MambaConfig(**CFG)
    params = models.init_params(cfg, seed=seed, dtype=dtype, xp=xp)
    res = training.train(params, cfg, lambda s: _global_batch(cfg, s), steps, progress=False,
                         graph=False, **{**HYPER, **(hyper or {})})
    return {k: (v.get() if hasattr(v, "get") else v) for k, v in params.items()}, res.losses


# ---------------------------------------------------------------- store and communicator


def test_store_set_get_add_barrier_and_timeout():
    store = TCPStore("127.0.0.1", 0, rank=0, world_size=2, timeout=10)
    other = TCPStore("127.0.0.1", store.port, rank=1, world_size=2, timeout=10)
    try:
        got = {}
        t = threading.Thread(target=lambda: got.update(v=other.get("k")))
        t.start()  # (waits for the key)
        time.sleep(0.1)
        store.set("k", b"\x00\xffbytes")
        t.join()
        assert got["v"] == b"\x00\xffbytes"
        assert [store.add("n"), other.add("n", 5)] == [1, 6]
        t = threading.Thread(target=other.barrier)
        t.start()
        store.barrier()
        t.join()
        start = time.monotonic()
        with pytest.raises(DistributedError, match="'missing' was not set within 0.3 s"):
            other.get("missing", timeout=0.3)
        with pytest.raises(DistributedError, match="not every one of the 2 ranks"):
            store.barrier(timeout=0.3)  # (rank 1 does not come)
        assert time.monotonic() - start < 5
    finally:
        other.close()
        store.close()


def _threads(world, fn, timeout=10):
    """Run ``fn(rank, store, comm)`` on ``world`` ranks as threads; their results."""
    port = _free_port()
    results, errors = [None] * world, []

    def rank_main(r):
        try:
            store = TCPStore("127.0.0.1", port, r, world, timeout=timeout)
            comm = TcpCommunicator(store, r, world, timeout=timeout)
            try:
                results[r] = fn(r, store, comm)
            finally:
                comm.close()
                store.close()
        except BaseException as exc:  # reported by the test
            errors.append((r, exc))

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results, errors


def test_tcp_allreduce_sums_in_rank_order_and_broadcasts():
    def fn(r, store, comm):
        x = np.array([0.1, 1e16, -3.0]) * (r + 1) + np.array([0.0, 1.0, 0.0])
        comm.allreduce_sum(x).wait()
        y = np.full(5, float(r))
        comm.broadcast(y, root=2)
        store.barrier()
        return x, y

    results, errors = _threads(3, fn)
    assert not errors, errors
    parts = [np.array([0.1, 1e16, -3.0]) * (r + 1) + np.array([0.0, 1.0, 0.0]) for r in range(3)]
    want = (parts[0] + parts[1]) + parts[2]
    for x, y in results:
        assert x.tobytes() == want.tobytes()  # every rank the same bits
        np.testing.assert_array_equal(y, np.full(5, 2.0))


def test_tcp_collective_times_out_on_a_silent_rank():
    def fn(r, store, comm):
        if r == 0:
            with pytest.raises(DistributedError, match="rank 1 sent nothing within"):
                comm.allreduce_sum(np.ones(3)).wait()
            with pytest.raises(DistributedError):  # (broken from then on)
                comm.allreduce_sum(np.ones(3)).wait()
        store.barrier(timeout=10)  # (rank 1 never joined the all-reduce)

    start = time.monotonic()
    _, errors = _threads(2, fn, timeout=0.5)
    assert not errors, errors
    assert time.monotonic() - start < 10


def test_tcp_communicator_rejects_noncontiguous():
    def fn(r, store, comm):
        with pytest.raises(ValueError, match="x must be C-contiguous"):
            comm.allreduce_sum(np.ones((4, 4))[:, 1])

    _, errors = _threads(1, fn)
    assert not errors, errors


# ---------------------------------------------------------------- one rank (no launcher)


def test_single_rank_equals_plain_training():
    cfg = models.MambaConfig(**CFG)
    group = distributed.init_process_group(backend="cpu")
    try:
        p_dp = models.init_params(cfg, seed=0, dtype=np.float64)
        p_ref = models.init_params(cfg, seed=0, dtype=np.float64)
        dp = distributed.DataParallelTrainStep(p_dp, cfg, group, AdamW(lr=1e-2),
                                               max_grad_norm=0.5, bucket_bytes=200)
        ref = training.TrainStep(p_ref, cfg, AdamW(lr=1e-2), max_grad_norm=0.5)
        for s in range(4):
            x, y = _global_batch(cfg, s)
            dp.step(x, y)
            ref.step(x, y)
        assert dp.losses() == ref.losses()
        for k in p_ref:
            assert p_dp[k].tobytes() == p_ref[k].tobytes(), k
        assert dp.optimizer.t == 4
        res = distributed.train(p_dp, cfg, lambda s: _global_batch(cfg, s), 3, group=group,
                                progress=False, **HYPER)
        want = training.train(p_ref, cfg, lambda s: _global_batch(cfg, s), 3, progress=False,
                              **HYPER)
        assert res.losses == want.losses and res.step == want.step == 3
        for k in p_ref:
            assert p_dp[k].tobytes() == p_ref[k].tobytes(), k
    finally:
        group.close()


class _Recorder:
    """A world-size-1 communicator that logs when buckets start and end."""

    rank, world_size = 0, 1

    def __init__(self, log):
        self.log = log

    def allreduce_sum(self, x):
        self.log.append(("allreduce", x.size))
        return distributed._Ready()

    def broadcast(self, x, root=0):
        pass

    def synchronize(self, timeout=None):
        pass


def test_buckets_start_during_the_backward():
    cfg = models.MambaConfig(**CFG)
    params = models.init_params(cfg, seed=0, dtype=np.float64)
    log = []
    group = distributed.ProcessGroup(0, 1, 0, "cpu", None, _Recorder(log), 10.0)
    group.share = lambda value: value
    step = distributed.DataParallelTrainStep(params, cfg, group, bucket_bytes=0)
    original = step._buckets.ready

    def ready(names, grads):
        log.append(("grads", len(names)))
        original(names, grads)

    step._buckets.ready = ready
    x, y = _global_batch(cfg, 0)
    step.step(x, y)
    # bucket_bytes=0: every group is a bucket, started as soon as it is final
    kinds = [k for k, _ in log]
    assert kinds == ["grads", "allreduce"] * (cfg.n_layers + 2)
    sizes = [n for k, n in log if k == "allreduce"]
    assert sum(sizes) == sum(v.size for v in params.values())
    log.clear()
    step._buckets.bucket_bytes = 10 ** 9  # (the plan of the first step is kept)
    step.step(x, y)
    assert [k for k, _ in log] == kinds


def test_shard_rejects_an_uneven_batch():
    class G:
        rank, world_size = 0, 3
    with pytest.raises(ValueError, match="multiple of the world size 3, got 4"):
        shard((np.zeros((4, 2)),), G())


def test_params_of_the_wrong_kind_for_the_backend():
    cfg = models.MambaConfig(**CFG)
    params = models.init_params(cfg, seed=0)
    group = distributed.ProcessGroup(0, 1, 0, "nccl", None, _Recorder([]), 10.0)
    with pytest.raises(TypeError, match="params must be CuPy arrays for the group's backend"):
        distributed.DataParallelTrainStep(params, cfg, group)


# ---------------------------------------------------------------- several CPU ranks


def test_two_cpu_ranks_with_half_batches_equal_one_rank(tmp_path):
    steps = 5
    ranks = _train_ranks(tmp_path, 2, ("--cpu",), steps=steps, seed_per_rank=True)
    want, want_losses = _single(steps)
    for k in want:  # (rank 1 started from other parameters: rank 0's were broadcast)
        assert ranks[0][k].tobytes() == ranks[1][k].tobytes(), k
        np.testing.assert_allclose(ranks[0][k], want[k], rtol=1e-9, atol=1e-12, err_msg=k)
    np.testing.assert_allclose(ranks[0]["__losses__"], want_losses, rtol=1e-12)
    np.testing.assert_array_equal(ranks[0]["__losses__"], ranks[1]["__losses__"])


def test_checkpoint_by_rank0_and_resume_restores_every_rank(tmp_path):
    ckpt = str(tmp_path / "ckpt.npz")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    full = _train_ranks(tmp_path / "a", 2, ("--cpu",), steps=6)
    _train_ranks(tmp_path / "b", 2, ("--cpu",), steps=3, ckpt=ckpt, forbid_save=True)
    assert sorted(os.listdir(tmp_path)) == ["a", "b", "ckpt.npz"]  # (no temporary left)
    # resumed with rank 1 initialised otherwise: everything comes from rank 0's file
    resumed = _train_ranks(tmp_path / "b", 2, ("--cpu",), steps=6, ckpt=ckpt, every=2,
                           resume=True, seed=5, seed_per_rank=True, forbid_save=True)
    for r in range(2):
        assert int(resumed[r]["__step__"]) == 6
        np.testing.assert_array_equal(resumed[r]["__losses__"], full[0]["__losses__"])
        for k in full[0]:
            assert resumed[r][k].tobytes() == full[0][k].tobytes(), (r, k)
    assert training.load_checkpoint(ckpt).step == 6


def test_a_killed_rank_stops_the_launcher(tmp_path):
    script = os.path.join(ROOT, "tests", "test_distributed.py")
    rc, err, seconds = _launch("--cpu", "--nproc", "2", script, "die", json.dumps({}))
    assert rc != 0
    assert "rank 1 (pid" in err and "SIGKILL" in err, err
    assert seconds < 60


def test_a_failing_rank_stops_the_others(tmp_path):
    script = os.path.join(ROOT, "tests", "test_distributed.py")
    rc, err, seconds = _launch("--cpu", "--nproc", "2", "--grace", "1", script, "fail",
                               json.dumps({}))
    assert rc == 3
    assert "rank 0 (pid" in err and "exited with code 3" in err, err
    assert "stopping the 1 other running rank(s)" in err
    assert seconds < 60  # (rank 1 would have slept 600 s)


def test_launcher_environment():
    opts = distributed._parser().parse_args(
        ["--cpu", "--nproc", "2", "--hosts", "h0,h1", "--node-rank", "1", "--master-port",
         "1234", "s.py", "--x", "1"])
    envs = distributed._rank_envs(opts)
    assert [(e["RANK"], e["LOCAL_RANK"], e["WORLD_SIZE"]) for e in envs] == [
        ("2", "0", "4"), ("3", "1", "4")]
    assert {(e["MASTER_ADDR"], e["MASTER_PORT"], e["NCCL_NVLS_ENABLE"],
             e["NUMBA_MAMBA_DIST_BACKEND"]) for e in envs} == {("h0", "1234", "0", "cpu")}
    assert opts.args == ["--x", "1"]
    with pytest.raises(SystemExit, match="--master-port is required with --hosts"):
        distributed._rank_envs(distributed._parser().parse_args(
            ["--cpu", "--nproc", "2", "--hosts", "h0,h1", "s.py"]))
    with pytest.raises(SystemExit, match="--nproc must be at least 1"):
        distributed._rank_envs(distributed._parser().parse_args(
            ["--cpu", "--nproc", "0", "s.py"]))


# ---------------------------------------------------------------- GPUs (marker gpu)


def _cupy_gpus():
    cupy = pytest.importorskip("cupy")
    try:
        return cupy, cupy.cuda.runtime.getDeviceCount()
    except Exception:  # no driver
        return cupy, 0


def test_a_data_parallel_step_refuses_graph_capture():
    cfg = models.MambaConfig(**CFG)
    params = models.init_params(cfg, seed=0)
    with pytest.raises(ValueError, match="graph=True: a data-parallel step is not captured"):
        distributed.DataParallelTrainStep(params, cfg, graph=True)


@pytest.mark.gpu
@pytest.mark.parametrize("graph", [False, "auto"])
def test_nccl_single_rank_equals_plain_training(graph):
    cupy, count = _cupy_gpus()
    if count < 1:
        pytest.skip("no CUDA GPU")
    cfg = models.MambaConfig(**CFG)
    group = distributed.init_process_group(backend="nccl")
    try:
        assert isinstance(group.comm, distributed.NcclCommunicator)
        p_dp = models.init_params(cfg, seed=0, dtype=np.float32, xp=cupy)
        p_ref = models.init_params(cfg, seed=0, dtype=np.float32, xp=cupy)
        dp = distributed.DataParallelTrainStep(p_dp, cfg, group, AdamW(lr=1e-3),
                                               graph=graph, bucket_bytes=2000)
        ref = training.TrainStep(p_ref, cfg, AdamW(lr=1e-3), graph=False)
        for s in range(4):
            x, y = _global_batch(cfg, s)
            dp.step(x, y)
            ref.step(x, y)
        assert not dp.captured
        np.testing.assert_allclose(dp.losses(), ref.losses(), rtol=1e-5)
        for k in p_ref:
            np.testing.assert_allclose(p_dp[k].get(), p_ref[k].get(), rtol=0, atol=2e-5,
                                       err_msg=k)
    finally:
        group.close()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_two_gpus_with_half_batches_equal_one_gpu(tmp_path, dtype):
    cupy, count = _cupy_gpus()
    if count < 2:
        pytest.skip("needs 2 GPUs")
    steps, hyper = 5, dict(lr=1e-3, min_lr=1e-3)  # (lr 1e-3: the tolerances' premise)
    ranks = _train_ranks(tmp_path, 2, steps=steps, dtype=dtype, seed_per_rank=True, hyper=hyper)
    want, want_losses = _single(steps, np.dtype(dtype), cupy, hyper=hyper)
    f64 = dtype == "float64"
    for k in want:
        assert ranks[0][k].tobytes() == ranks[1][k].tobytes(), k
        np.testing.assert_allclose(ranks[0][k], want[k], rtol=1e-9 if f64 else 0,
                                   atol=1e-12 if f64 else 2e-5, err_msg=k)
    np.testing.assert_allclose(ranks[0]["__losses__"], want_losses, rtol=1e-9 if f64 else 1e-5)


@pytest.mark.gpu
def test_two_gpus_a_killed_rank_stops_the_launcher():
    _, count = _cupy_gpus()
    if count < 2:
        pytest.skip("needs 2 GPUs")
    script = os.path.join(ROOT, "tests", "test_distributed.py")
    rc, err, seconds = _launch("--nproc", "2", "--grace", "2", script, "die-gpu",
                               json.dumps({}))
    assert rc != 0 and "rank 1 (pid" in err and "SIGKILL" in err, err
    assert seconds < 120


if __name__ == "__main__":
    _worker(sys.argv[1], json.loads(sys.argv[2]))
