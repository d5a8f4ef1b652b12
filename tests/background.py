"""Subprocesses the test session starts at its beginning and reads at its end.

Some tests wait on long work done in a separate Python process: compiling
every kernel to PTX, running kernels in the CUDA simulator (which must be
switched on before ``numba.cuda`` is imported).  A test marked
``@pytest.mark.background(script, *args, env={...})`` names such a process
(``python script *args`` in the repository root, with ``env`` added to the
environment).  ``tests/conftest.py`` starts the processes of every selected
test as soon as the tests are collected, two at a time, and moves the marked
tests to the end of the session: the processes use the second core while the
other tests run on the first.  (Not at a lower priority: on a machine shared
with other work, ``nice`` would starve them.)  A
test reads its process's result with the ``background`` fixture (a
:class:`subprocess.CompletedProcess`); tests that name the same process
share one run of it.
"""

import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKERS = 2
TIMEOUT_S = 1800

_lock = threading.Lock()
_pool = None
_futures = {}
_running = set()


def key(marker):
    """The process a ``background`` marker names: ``(args, sorted env items)``."""
    env = marker.kwargs.get("env", {})
    return tuple(str(a) for a in marker.args), tuple(sorted(env.items()))


def _run(job):
    args, env = job
    argv = [sys.executable, *args]
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), **dict(env))
    proc = subprocess.Popen(argv, cwd=ROOT, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    with _lock:
        _running.add(proc)
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        stderr += f"\n(killed after {TIMEOUT_S} s)"
    finally:
        with _lock:
            _running.discard(proc)
    return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)


def start(jobs):
    """Start the processes ``jobs`` (keys from :func:`key`) not started yet, in order."""
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="background")
        for job in jobs:
            if job not in _futures:
                _futures[job] = _pool.submit(_run, job)


def result(job):
    """The :class:`subprocess.CompletedProcess` of ``job``, started here if it was not."""
    start([job])
    return _futures[job].result()


def stop():
    """Drop the processes not started and end those running (the session is over)."""
    with _lock:
        pool, running = _pool, list(_running)
    if pool is not None:
        pool.shutdown(wait=False, cancel_futures=True)
    for proc in running:
        proc.kill()
