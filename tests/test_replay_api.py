"""How the public scan uses replays (``numba_mamba.scan._REPLAYS``), on the CPU.

Stand-ins for CuPy, the driver and a GPU backend whose launchers allocate
through ``_common.empty`` and launch through ``_common.launch`` (one kernel
each way): a call of a layout seen before skips validation and the
launcher and hands the driver the new arrays' addresses; a change of flags
or layout records again; a call that copies an argument is never replayed;
the backward of a replayed forward reads the states that forward saved.
The numbers the GPU computes on a replay are checked in
``tests/test_gpu_replay.py``.
"""

import sys
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
import pytest

pytest.importorskip("numba.cuda")
import numba_mamba as nm  # noqa: E402
from cuda_kernels import _common  # noqa: E402
from numba_mamba import scan as api  # noqa: E402
from tests.fake_cupy import FakeArray, FakeCupy, fake_raw_launch  # noqa: E402

F32 = np.float32
Bt, Dc, N, L = 2, 3, 4, 5
DATA = 0  # (the data slot of an array: meminfo, parent, size, itemsize, data, ...)


class Saved(NamedTuple):
    states: object
    note: str


def _data_slots(kinds):
    """The slot index of each array argument's data pointer."""
    slots, at = [], 0
    for k in kinds:
        if k > 0:
            slots.append(at + 4)
            at += 5 + 2 * k
        else:
            at += 1
    return slots


FORWARD = [3, 3, 2, 4, 4, 1, 3, 3, 4, 0]  # u, delta, A, B, C, D, out, last, states, flags
BACKWARD = [3, 3, 4, 3, 3, 1, 0]  # dout, u, states, du, ddelta, summed, flags


class FakeBackend:
    """The GPU backend's replay interface over one forward and one backward kernel."""

    def __init__(self, cupy):
        self.cupy = cupy
        self.forwards = self.backwards = 0
        self.scan_states = SimpleNamespace(DIRECT_HALF=False, storage_of=_common.storage_of)

    def choose_engine(self, Bt, Dc, N):
        return "blocks"

    def replay_settings(self):
        return ("fake",)

    def scan_forward(self, u, delta, A, B, C, D, z, delta_bias, softplus, init, save=True,
                     out=None):
        self.forwards += 1
        xp = self.cupy
        out = _common.empty(xp, u.shape, u.dtype) if out is None else out
        last = _common.empty(xp, (Bt, Dc, N), F32)
        states = _common.empty(xp, (Bt, Dc, 2, N), F32)
        D = _common.dummy(xp, F32, 1) if D is None else D
        _common.launch("forward", 6, 64, "current",
                       (u, delta, A, B, C, D, out, last, states, np.int64(softplus)))
        return out, last, Saved(states, "kept")

    def forward_replay(self, args, *, save, keep, out=None):
        u, delta, A, B, C, D, z, delta_bias, _, init = args
        inputs = (u, delta, A, B, C, D, z, delta_bias, init) + (() if out is None else (out,))
        return _common.record(lambda: self.scan_forward(*args, save=save, out=out),
                              inputs, keep)

    def saved_states(self, saved):
        return saved.states

    def scan_backward(self, dout, dlast, u, delta, A, B, C, D, z, delta_bias, softplus, init,
                      saved):
        self.backwards += 1
        xp = self.cupy
        du = _common.empty(xp, u.shape, u.dtype)
        ddelta = _common.empty(xp, u.shape, u.dtype)
        summed = _common.empty(xp, (A.size + B.size + C.size,), F32, zero=True)
        dA = FakeArray(A.shape, F32, summed.data.ptr)
        dB = FakeArray(B.shape, F32, summed.data.ptr + 4 * A.size)
        dC = FakeArray(C.shape, F32, summed.data.ptr + 4 * (A.size + B.size))
        _common.launch("backward", 6, 64, "current",
                       (dout, u, saved.states, du, ddelta, summed, np.int64(1)))
        return du, ddelta, dA, dB, dC, None, None, None, None

    def backward_replay(self, dout, dlast, args, saved):
        u, delta, A, B, C, D, z, delta_bias, _, init = args
        return _common.record(lambda: self.scan_backward(dout, dlast, *args, saved),
                              (dout, dlast, u, delta, A, B, C, D, z, delta_bias, init,
                               saved.states), range(9))


@pytest.fixture
def gpu(monkeypatch):
    cupy = FakeCupy()
    cupy.ascontiguousarray = lambda x, dtype=None: cupy.empty(x.shape, dtype or x.dtype)
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setattr(_common, "RAW_LAUNCH", True)
    monkeypatch.setattr(_common, "_DUMMIES", {})
    monkeypatch.setattr(_common, "_RAW", {})
    seen = []
    _common._RAW[("forward", 0)] = fake_raw_launch(FORWARD, seen)
    _common._RAW[("backward", 0)] = fake_raw_launch(BACKWARD, seen)
    backend = FakeBackend(cupy)
    monkeypatch.setattr(api, "_gpu_backend", lambda: backend)
    monkeypatch.setattr(api, "_REPLAYS", {})
    monkeypatch.setattr(api, "_VALIDATED", {})
    prepared = []
    prepare = api._prepare
    monkeypatch.setattr(api, "_prepare", lambda *a: prepared.append(1) or prepare(*a))
    return SimpleNamespace(cupy=cupy, seen=seen, backend=backend, prepared=prepared)


def _inputs(cupy, D=True):
    def arr(*shape):
        return cupy.empty(shape, F32)

    return dict(u=arr(Bt, Dc, L), delta=arr(Bt, Dc, L), A=arr(Dc, N), B=arr(Bt, 1, N, L),
                C=arr(Bt, 1, N, L), D=arr(Dc) if D else None)


def _pointers_seen(seen, kinds):
    """The data pointers of the last launch the driver saw."""
    slots = seen[-1][3]
    return [slots[i] for i in _data_slots(kinds)]


def test_a_repeated_layout_is_replayed_on_the_new_arrays(gpu):
    nm.selective_scan(**_inputs(gpu.cupy))
    assert gpu.backend.forwards == 1 and len(gpu.prepared) == 1
    (replay,) = api._REPLAYS.values()
    assert replay is not None
    kw = _inputs(gpu.cupy)
    out = nm.selective_scan(**kw)
    assert gpu.backend.forwards == 1 and len(gpu.prepared) == 1  # neither ran again
    assert isinstance(out, FakeArray) and out.shape == (Bt, Dc, L) and out.dtype == F32
    ptrs = _pointers_seen(gpu.seen, FORWARD)
    assert ptrs[:6] == [kw[k].data.ptr for k in ("u", "delta", "A", "B", "C", "D")]
    assert ptrs[6] == out.data.ptr  # the new output
    assert len(gpu.seen) == 2


def test_other_flags_or_layouts_are_recorded_apart(gpu):
    nm.selective_scan(**_inputs(gpu.cupy))
    nm.selective_scan(**_inputs(gpu.cupy), delta_softplus=True)
    out, last = nm.selective_scan(**_inputs(gpu.cupy), return_last_state=True)
    nm.selective_scan(**_inputs(gpu.cupy, D=False))
    assert gpu.backend.forwards == 4 and len(api._REPLAYS) == 4
    assert last.shape == (Bt, Dc, N) and last.dtype == F32
    assert gpu.seen[1][3][-1] == 1 and gpu.seen[0][3][-1] == 0  # (the softplus flag slot)
    out2, last2 = nm.selective_scan(**_inputs(gpu.cupy), return_last_state=True)
    assert gpu.backend.forwards == 4 and last2.shape == last.shape
    assert _pointers_seen(gpu.seen, FORWARD)[6:8] == [out2.data.ptr, last2.data.ptr]


def test_a_call_that_copies_an_argument_is_never_replayed(gpu):
    for _ in range(2):
        kw = _inputs(gpu.cupy)
        kw["u"].flags = SimpleNamespace(c_contiguous=False)  # (to be copied to C order)
        kw["u"]._c_contiguous = False
        nm.selective_scan(**kw)
        assert _pointers_seen(gpu.seen, FORWARD)[0] != kw["u"].data.ptr  # the copy's
    assert list(api._REPLAYS.values()) == [None] and gpu.backend.forwards == 2


def test_the_backward_of_a_replayed_forward_reads_the_states_it_saved(gpu):
    cupy = gpu.cupy
    nm.selective_scan_vjp(**_inputs(cupy, D=False))[2](cupy.empty((Bt, Dc, L), F32))  # recorded
    assert (gpu.backend.forwards, gpu.backend.backwards) == (1, 1)
    kw = _inputs(cupy, D=False)
    out, last, backward = nm.selective_scan_vjp(**kw)
    states = _pointers_seen(gpu.seen, FORWARD)[8]
    dout = cupy.empty((Bt, Dc, L), F32)
    grads = backward(dout)
    assert (gpu.backend.forwards, gpu.backend.backwards) == (1, 1) and len(gpu.prepared) == 1
    ptrs = _pointers_seen(gpu.seen, BACKWARD)
    assert ptrs[:3] == [dout.data.ptr, kw["u"].data.ptr, states]
    assert ptrs[3:5] == [grads.du.data.ptr, grads.ddelta.data.ptr]
    assert grads.dA.data.ptr == ptrs[5]  # the summed gradients: views of one zeroed buffer
    assert grads.dB.data.ptr == ptrs[5] + 4 * Dc * N and grads.dB.shape == kw["B"].shape
    assert grads.dD is None and grads.dz is None
    assert cupy.memsets[-1][0] == ptrs[5]  # zeroed again before the launch


def test_a_given_out_is_an_input_of_the_replay_checked_against_the_inputs(gpu):
    cupy = gpu.cupy
    out = cupy.empty((Bt, Dc, L), F32)
    assert nm.selective_scan(**_inputs(cupy), out=out) is out  # recorded
    assert _pointers_seen(gpu.seen, FORWARD)[6] == out.data.ptr
    (replay,) = api._REPLAYS.values()
    assert replay is not None
    kw, out2 = _inputs(cupy), cupy.empty((Bt, Dc, L), F32)
    allocs = len(cupy.allocs)
    assert nm.selective_scan(**kw, out=out2) is out2
    assert gpu.backend.forwards == 1 and len(gpu.prepared) == 1  # replayed
    ptrs = _pointers_seen(gpu.seen, FORWARD)
    assert ptrs[:6] == [kw[k].data.ptr for k in ("u", "delta", "A", "B", "C", "D")]
    assert ptrs[6] == out2.data.ptr
    assert len(cupy.allocs) == allocs + 1  # (the scratch: last state and states, not kept)
    # an out over part of an input: refused by the replay, before any launch
    for name in ("u", "D"):
        kw = _inputs(cupy)
        over = FakeArray((Bt, Dc, L), F32, kw[name].data.ptr + 4)
        with pytest.raises(ValueError, match=f"^out must not share memory with {name} "):
            nm.selective_scan(**kw, out=over)
    assert gpu.backend.forwards == 1 and len(gpu.seen) == 2
    # the full path refuses it too
    api._REPLAYS.clear()
    with pytest.raises(ValueError, match="^out must not share memory with D "):
        nm.selective_scan(**kw, out=over)
