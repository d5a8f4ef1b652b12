"""What every test module shares: the PTX tests are opt-in; long work runs in the background.

The PTX tests (``ptx`` in their node id) compile the kernels for sm_90 with
NVRTC, which comes with the opt-in extra ``ptx`` (numba-cuda's ``cu12``
extra; CI installs it).  Where no NVRTC library can be loaded they are
skipped, so that the ``test`` extra needs no CUDA toolkit.  The CUDA
simulator's tests need numba-cuda only, which the ``test`` extra brings.

Tests marked ``background`` (the simulator's, and every test of the ``ptx``
fixture) wait on subprocesses that start as soon as the tests are collected
and run beside the other tests (``tests/background.py``); they run last.
"""

import functools
import json
import os
from collections.abc import Mapping

import pytest

from tests import background as _background
from tests import ptx_kernels as _ptx

@functools.lru_cache(maxsize=1)
def nvrtc_missing():
    """None where the NVRTC library loads; else why not."""
    try:
        from cuda.pathfinder import load_nvidia_dynamic_lib

        load_nvidia_dynamic_lib("nvrtc")
    except Exception as exc:  # (ImportError, or the library not found)
        return f"{type(exc).__name__}: {exc}"
    return None


def _ptx_jobs(item):
    """The compile jobs of the kernels a test of the ``ptx`` fixture reads: those of
    the modules its ``ptx_modules`` marker names, else all."""
    marker = item.get_closest_marker("ptx_modules")
    modules = set(marker.args if marker else _ptx.MODULES)
    return [job for job in _ptx.JOBS if modules & set(job[0])]


def pytest_collection_modifyitems(config, items):
    ptx = [item for item in items if "ptx" in item.nodeid.lower()]
    reason = nvrtc_missing() if ptx else None
    if reason is not None:
        skip = pytest.mark.skip(reason=f"PTX tests need NVRTC (pip install '.[test,ptx]'): {reason}")
        for item in ptx:
            item.add_marker(skip)
    elif os.environ.get("NUMBA_ENABLE_CUDASIM", "0") == "0":
        for item in items:
            if "ptx" in getattr(item, "fixturenames", ()):
                for job in _ptx_jobs(item):
                    item.add_marker(pytest.mark.background(*_ptx.job_args(job)))


def _waits(item):
    return (item.get_closest_marker("background") is not None
            and item.get_closest_marker("skip") is None)


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session):
    # (after deselection: only the processes of tests that will run)
    items = session.items
    waiting = [item for item in items if _waits(item)]
    items[:] = [item for item in items if not _waits(item)] + waiting
    jobs = []
    for item in waiting:
        for marker in item.iter_markers("background"):
            jobs.append(_background.key(marker))
    if not session.config.option.collectonly:
        _background.start(jobs)


def pytest_sessionfinish(session):
    _background.stop()


@pytest.fixture
def background(request):
    """The finished subprocess (``subprocess.CompletedProcess``) the test's
    ``background`` marker names."""
    return _background.result(_background.key(request.node.get_closest_marker("background")))


class _Ptx(Mapping):
    """name -> PTX text of a kernel, read from the output of the job that compiles it."""

    def __init__(self):
        self._job = _ptx.jobs_by_name()
        self._text = {}

    def __getitem__(self, name):
        job = self._job[name]
        if job not in self._text:
            proc = _background.result((_ptx.job_args(job), ()))
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(proc.args)} failed:\n{proc.stderr[-5000:]}")
            self._text[job] = json.loads(proc.stdout)
        return self._text[job][name]

    def __iter__(self):
        return iter(self._job)

    def __len__(self):
        return len(self._job)


@pytest.fixture(scope="session")
def ptx():
    """name -> PTX text (sm_90) of every kernel that a module of
    ``numba_mamba.cuda_kernels`` lists, each compiled once per session
    (``tests/ptx_kernels.py``), in the background from the start of the session."""
    import numba

    pytest.importorskip("numba.cuda")
    if numba.config.ENABLE_CUDASIM:
        pytest.skip("compile_ptx is not available under the CUDA simulator")
    return _Ptx()


class Backend:
    """One backend of the public functions, for tests parametrised by backend.

    ``name`` is ``'cpu'`` (NumPy arrays) or ``'gpu'`` (CuPy arrays); ``xp`` the
    array module; ``put`` moves a NumPy array, or every NumPy array among the
    values of a dict, to the backend (anything else is passed through);
    ``host`` brings an array of the backend back as a NumPy array.
    """

    def __init__(self, name, xp):
        self.name, self.xp = name, xp

    def put(self, value):
        if isinstance(value, dict):
            return {k: self.put(v) for k, v in value.items()}
        import numpy as np

        return self.xp.asarray(value) if isinstance(value, np.ndarray) else value

    def host(self, value):
        return value.get() if self.name == "gpu" else value

    def __repr__(self):
        return f"Backend({self.name!r})"


def _gpu_backend():
    from tests.gpu import cupy_or_why_not

    cupy, why_not = cupy_or_why_not()
    if cupy is None:
        pytest.skip(why_not)
    return Backend("gpu", cupy)


@pytest.fixture(params=["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
def backend(request):
    """The backend a test runs on: ``'cpu'`` (NumPy), and ``'gpu'`` (CuPy; marked
    ``gpu``, skipped where CuPy sees no CUDA GPU).  The CUDA simulator cannot be
    a backend here: it must be switched on before ``numba.cuda`` is imported, so
    its tests run in subprocesses (``tests/test_cuda_simulator.py``)."""
    if request.param == "cpu":
        import numpy as np

        return Backend("cpu", np)
    return _gpu_backend()


@pytest.fixture
def gpu():
    """The GPU backend alone, for tests that compare it with the CPU path (mark such
    tests ``gpu``); skipped where CuPy sees no CUDA GPU."""
    return _gpu_backend()
