"""Threads on the CPU (``numba_mamba._cpu_threads``): BLAS on one thread during
this library's GEMMs and model calls, and one Numba thread for small calls.

The BLAS tests need threadpoolctl and a BLAS it can see (NumPy's OpenBLAS);
they set the BLAS to 2 threads first, so that the limit to 1 is visible.
"""

import numba
import numpy as np
import pytest

from numba_mamba import _cpu_conv1d, _cpu_elementwise, _cpu_scan, _cpu_threads, layers, models
from tests.test_cpu_backend import COMBOS, _check_against_reference, _draw, _run_backend

threadpoolctl = pytest.importorskip("threadpoolctl")


@pytest.fixture
def two_blas_threads():
    """BLAS on 2 threads for the test (its count before comes back after)."""
    if not _cpu_threads.blas_threads():
        pytest.skip("threadpoolctl finds no BLAS library")
    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        before = _cpu_threads.blas_threads()
        if max(before.values()) < 2:
            pytest.skip(f"BLAS cannot run 2 threads here: {before}")
        yield before


def test_blas_limited_sets_one_thread_nests_and_restores(two_blas_threads):
    with _cpu_threads.blas_limited():
        assert set(_cpu_threads.blas_threads().values()) == {1}
        with _cpu_threads.blas_limited():
            assert set(_cpu_threads.blas_threads().values()) == {1}
        assert set(_cpu_threads.blas_threads().values()) == {1}  # the outer block still holds
    assert _cpu_threads.blas_threads() == two_blas_threads


def test_blas_limited_restores_after_an_exception(two_blas_threads):
    with pytest.raises(ZeroDivisionError):
        with _cpu_threads.blas_limited():
            1 / 0
    assert _cpu_threads.blas_threads() == two_blas_threads


def test_blas_threads_zero_limits_nothing(two_blas_threads, monkeypatch):
    monkeypatch.setattr(_cpu_threads, "BLAS_THREADS", 0)
    with _cpu_threads.blas_limited():
        assert _cpu_threads.blas_threads() == two_blas_threads


def test_a_blas_on_fewer_threads_keeps_its_count(two_blas_threads, monkeypatch):
    monkeypatch.setattr(_cpu_threads, "BLAS_THREADS", 3)
    with _cpu_threads.blas_limited():
        assert _cpu_threads.blas_threads() == two_blas_threads


@pytest.mark.parametrize("value, expected", [(None, 1), ("", 1), ("0", 0), ("4", 4)])
def test_threads_from_the_environment(value, expected):
    assert _cpu_threads._threads_from_env(value) == expected


@pytest.mark.parametrize("value", ["-1", "two", "1.5"])
def test_a_bad_environment_value_is_named(value):
    with pytest.raises(ValueError, match="NUMBA_MAMBA_BLAS_THREADS.*non-negative integer"):
        _cpu_threads._threads_from_env(value)


def _record_blas_threads(monkeypatch, module, name):
    """Replace ``module.name`` by a wrapper that records the BLAS thread counts at each call."""
    seen = []
    inner = getattr(module, name)

    def probe(*args, **kwargs):
        seen.append(set(_cpu_threads.blas_threads().values()))
        return inner(*args, **kwargs)

    monkeypatch.setattr(module, name, probe)
    return seen


def test_a_numpy_gemm_runs_on_one_blas_thread(two_blas_threads, monkeypatch):
    seen = _record_blas_threads(monkeypatch, np, "matmul")
    a = np.ones((3, 4), np.float32)
    np.testing.assert_array_equal(layers.gemm(np, a, a.T), np.full((3, 3), 4, np.float32))
    assert seen == [{1}]
    assert _cpu_threads.blas_threads() == two_blas_threads


def test_model_forward_and_backward_hold_the_limit_for_the_whole_call(two_blas_threads,
                                                                       monkeypatch):
    cfg = models.MambaConfig(d_model=8, n_layers=2, vocab_size=11, d_state=4)
    params = models.init_params(cfg, seed=0)
    tokens = np.array([[1, 2, 3, 4]])
    # rmsnorm runs between the GEMMs (no gemm of its own): the limit holds there too
    seen = _record_blas_threads(monkeypatch, models, "rmsnorm_forward")
    logits, cache = models.model_forward(tokens, params, cfg)
    assert seen == [{1}] * (cfg.n_layers + 1)
    seen_back = _record_blas_threads(monkeypatch, models, "rmsnorm_backward")
    models.model_backward(np.ones_like(logits), cache)
    assert seen_back == [{1}] * (cfg.n_layers + 1)
    seen.clear()
    models.loss_and_grads(tokens, tokens, params, cfg)
    assert seen == [{1}] * (cfg.n_layers + 1)
    assert _cpu_threads.blas_threads() == two_blas_threads


# ---------------------------------------------------------------- one Numba thread for small calls


def _record_numba_threads(monkeypatch, module, name):
    seen = []
    inner = getattr(module, name)

    def probe(*args):
        seen.append(numba.get_num_threads())
        return inner(*args)

    monkeypatch.setattr(module, name, probe)
    return seen


@pytest.fixture
def two_numba_threads():
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("Numba has one thread here")
    before = numba.get_num_threads()
    numba.set_num_threads(2)
    yield
    numba.set_num_threads(before)


def test_small_calls_run_on_one_numba_thread_and_large_ones_on_all(two_numba_threads,
                                                                    monkeypatch):
    seen = {name: _record_numba_threads(monkeypatch, mod, name) for mod, name in (
        (_cpu_scan, "_forward_kernel"), (_cpu_scan, "_backward_kernel"),
        (_cpu_conv1d, "_forward_kernel"), (_cpu_conv1d, "_backward_kernel"),
        (_cpu_elementwise, "_silu_kernel"))}
    limit = _cpu_threads.SERIAL_BELOW
    N = 4
    for L, threads in ((1, 1), (-(-limit // N), 2)):  # Bt * Dc * N * L: 4, then >= SERIAL_BELOW
        rng = np.random.default_rng(L)
        x = rng.standard_normal((1, 1, L)).astype(np.float32)
        A = -np.ones((1, N), np.float32)
        out, last, saved = _cpu_scan.scan_forward(x, x, A, A, A, None, None, None, True, None)
        _cpu_scan.scan_backward(x, None, x, x, A, A, A, None, None, None, True, None, saved)
        wide = np.repeat(x, N, axis=1)  # (1, N, L): as many elements as the scan's updates
        _cpu_conv1d.conv1d_backward(wide, wide, np.ones((N, 2), np.float32), None, True)
        _cpu_conv1d.conv1d_forward(wide, np.ones((N, 2), np.float32), None, True)
        _cpu_elementwise.silu_forward(wide)
        for name, counts in seen.items():
            assert counts[-1] == threads, (name, L, counts)
    assert numba.get_num_threads() == 2


@pytest.mark.parametrize("serial_below", [0, 1 << 40], ids=["parallel", "serial"])
@pytest.mark.parametrize("combo", COMBOS[1:3], ids=["var", "grouped"])
def test_both_paths_match_the_reference(serial_below, combo, two_numba_threads, monkeypatch):
    """The scan's serial and parallel paths each agree with the float64 reference."""
    monkeypatch.setattr(_cpu_threads, "SERIAL_BELOW", serial_below)
    L = 130
    kwargs, dout, dlast_state = _draw(7, L, combo, np.float32)
    got = _run_backend(kwargs, dout, dlast_state)
    _check_against_reference(kwargs, dout, dlast_state, got, np.float32)


# ---------------------------------------------------------------- hold_heap

_HEAP_SCRIPT = """
import resource, sys
import numpy as np
from numba_mamba import _cpu_threads

def faults_of_a_round():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    arrays = [np.ones(1 << 19, np.float32) for _ in range(6)]  # 6 x 2 MiB, then all freed
    del arrays
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

held = _cpu_threads.hold_heap()
faults_of_a_round()  # the heap grows once
print(held, faults_of_a_round())
"""


def _run_heap_script(env_extra):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")
           and k != "GLIBC_TUNABLES"}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", _HEAP_SCRIPT], env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not __import__("platform").libc_ver()[0] == "glibc", reason="glibc only")
def test_hold_heap_lets_freed_arrays_be_reused_without_page_faults():
    """A round of 12 MiB allocated and freed faults again on every round under glibc's
    defaults (the freed top of the heap is given back); after hold_heap, not."""
    held, faults = _run_heap_script({})
    assert held
    assert faults < 100, f"{faults} page faults after hold_heap (12 MiB reused)"
    held, faults = _run_heap_script({"NUMBA_MAMBA_HOLD_HEAP": "0"})
    assert not held
    assert faults > 1000, f"only {faults} page faults without hold_heap: the test shows nothing"


def test_a_cpu_train_step_holds_the_heap(monkeypatch):
    from numba_mamba import optim, training

    monkeypatch.setattr(_cpu_threads, "_heap", None)
    cfg = models.MambaConfig(d_model=8, n_layers=1, vocab_size=6, d_state=4)
    training.TrainStep(models.init_params(cfg), cfg, optim.AdamW())
    assert _cpu_threads._heap is not None  # tried (True where glibc allows it)
