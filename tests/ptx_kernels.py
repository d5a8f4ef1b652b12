"""The kernel signatures the PTX tests compile, and their compilation (run as a script).

Each module of ``numba_mamba.cuda_kernels`` lists its kernels with ``ptx_signatures()``:
``(name, py_func, argtypes, is_float32[, launch_bounds or dict of cuda.jit options])``.

Numba compiles a kernel's device functions through their dispatchers, which
ask the current device for its compute capability; :func:`sm90_device` puts a
stand-in device reporting (9, 0) in its place, so a whole kernel compiles for
sm_90 without a driver.  (It patches numba-cuda 0.30's private
``numba.cuda.dispatcher.get_current_device``.)

``python -m tests.ptx_kernels MODULES PART PARTS`` (modules joined by commas)
compiles every ``PARTS``-th kernel of those modules from the ``PART``-th on and
prints ``{name: PTX text}`` as JSON: the test session compiles the kernels in
the subprocesses :data:`JOBS` while other tests run (``tests/background.py``).
"""

import contextlib
import json
import sys

CC = (9, 0)
MODULES = ("scan_blocks", "scan_states", "discretize", "conv1d", "elementwise", "embedding", "step",
           "sample", "optim")
#: the compile jobs, ``(modules, part, parts)``: the state engine holds most of the
#: kernels and of the compile time, so it is split in parts; the decoder's kernels
#: (step, sample) compile alone for the tests that need only them
JOBS = tuple((("scan_states",), i, 4) for i in range(4)) + (
    (("scan_blocks", "discretize", "conv1d", "elementwise", "embedding"), 0, 1),
    (("step", "sample", "optim"), 0, 1))
assert sorted(m for modules, part, _ in JOBS if part == 0 for m in modules) == sorted(MODULES)


class _Sm90:
    compute_capability = CC


@contextlib.contextmanager
def sm90_device():
    """Numba's dispatchers see a device of compute capability (9, 0) inside."""
    from numba.cuda import dispatcher

    saved = dispatcher.get_current_device
    dispatcher.get_current_device = lambda: _Sm90()
    try:
        yield
    finally:
        dispatcher.get_current_device = saved


def signatures(modules=MODULES):
    """name -> (py_func, argtypes, is_float32, launch bounds or cuda.jit options or None)
    of every kernel of ``modules`` (of ``numba_mamba.cuda_kernels``)."""
    import importlib

    out = {}
    for module in modules:
        mod = importlib.import_module(f"numba_mamba.cuda_kernels.{module}")
        for name, py_func, argtypes, is_f32, *bounds in mod.ptx_signatures():
            out[name] = (py_func, argtypes, is_f32, bounds[0] if bounds else None)
    return out


def compile_ptx(name, sigs):
    """The PTX text of kernel ``name`` of ``sigs`` (from :func:`signatures`), for sm_90."""
    from numba import cuda

    py_func, argtypes, _, options = sigs[name]
    # a module yields its launch bounds, or a dict of cuda.jit keywords
    kwargs = (options if isinstance(options, dict)
              else dict(launch_bounds=options) if options else {})
    with sm90_device():
        text, _ = cuda.compile_ptx(py_func, argtypes, cc=CC, **kwargs)
    return text


def part(names, index, parts):
    """The names that part ``index`` of ``parts`` compiles (every ``parts``-th, sorted)."""
    return sorted(names)[index::parts]


def job_args(job):
    """The arguments of ``python`` that run ``job`` (an entry of :data:`JOBS`)."""
    modules, index, parts = job
    return ("-m", "tests.ptx_kernels", ",".join(modules), str(index), str(parts))


def jobs_by_name():
    """name -> the entry of :data:`JOBS` that compiles it, for every kernel."""
    out = {}
    for job in JOBS:
        modules, index, parts = job
        for name in part(signatures(modules), index, parts):
            out[name] = job
    return out


if __name__ == "__main__":
    sigs = signatures(sys.argv[1].split(","))
    index, parts = int(sys.argv[2]), int(sys.argv[3])
    print(json.dumps({name: compile_ptx(name, sigs) for name in part(sigs, index, parts)}))
