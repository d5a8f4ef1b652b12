"""Recorded launcher calls replayed on new data pointers (``cuda_kernels._common.record``).

On the CPU, with stand-ins for CuPy (allocations, arrays, the stream) and a
driver that keeps what it is handed: a replay hands the driver, for new input
pointers and new allocations, exactly the slots a launch on those arrays
would; it rebuilds the kept results on its allocations; and it refuses the
calls it cannot repeat.  On the GPU the public scan's replays are compared
with the full path (``tests/test_gpu_replay.py``); the public scan's use of
replays on the CPU in ``tests/test_replay_api.py``.
"""

import sys
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("numba.cuda")
from cuda_kernels import _common  # noqa: E402
from tests.fake_cupy import FakeArray, FakeCupy, fake_raw_launch as _raw  # noqa: E402


@pytest.fixture
def gpu(monkeypatch):
    cupy = FakeCupy()
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setattr(_common, "RAW_LAUNCH", True)
    monkeypatch.setattr(_common, "_DUMMIES", {})
    monkeypatch.setattr(_common, "_RAW", {})
    seen = []
    first = _raw([3, 3, 1, 0], seen)  # (x, scratch, dummy, n) -> writes scratch
    second = _raw([3, 3, 3, 2, 0], seen)  # (x, scratch, out, last, n)
    _common._RAW[("first", 0)] = first
    _common._RAW[("second", 0)] = second
    return SimpleNamespace(cupy=cupy, seen=seen, first=first, second=second)


def _launcher(cupy, x, y, zero=False):
    """A launcher as the scan's are: buffers from ``empty``, kernels from ``launch``."""
    n = x.shape[2]
    scratch = _common.empty(cupy, (x.shape[0], 2, n), np.float32, zero=zero)
    out = _common.empty(cupy, x.shape, x.dtype)
    last = _common.empty(cupy, (x.shape[0], n), np.float32)
    d = _common.dummy(cupy, np.float32, 1)
    _common.launch("first", 6, 64, "current", (x, scratch.reshape(-1, 2, n), d, np.int64(n)))
    _common.launch("second", 6, 64, "current", (y, scratch, out, last, np.int64(n)))
    return out, last, SimpleNamespace(kept=None)


@pytest.mark.parametrize("small", [True, False], ids=["scratch-with-out", "scratch-apart"])
def test_a_replay_hands_the_driver_the_slots_of_a_launch_on_its_new_arrays(gpu, monkeypatch,
                                                                           small):
    cupy = gpu.cupy
    if not small:  # (the scratch, 256 bytes, is more than an eighth of out's 192)
        monkeypatch.setattr(_common, "SMALL_SCRATCH", 0)
    x, y = FakeArray((2, 3, 8), np.float32, 0xA000), FakeArray((2, 3, 8), np.float32, 0xB000)
    (out, last, _), replay = _common.record(lambda: _launcher(cupy, x, y), (x, y), keep={0, 1})
    assert replay is not None and len(gpu.seen) == 2
    gpu.seen.clear()
    before = len(cupy.allocs)
    out2, last2, third = replay([0xC000, 0xD000])
    assert third is None  # not kept
    assert out2.shape == out.shape and out2.dtype == out.dtype
    assert last2.shape == last.shape and out2.data.ptr != out.data.ptr
    if small:  # out (192 bytes, rounded up to 256) and the scratch in one allocation, last apart
        assert cupy.allocs[before:] == [256 + 256, 2 * 8 * 4]
        scratch_ptr = out2.data.ptr + 256
    else:  # one allocation per kept array and one for the scratch
        assert cupy.allocs[before:] == [2 * 3 * 8 * 4, 2 * 8 * 4, 256]
        scratch_ptr = out2.data.ptr + 0x1000 + 512 + 0x1000 + 512  # (FakeCupy's spacing)
    x2, y2 = FakeArray(x.shape, x.dtype, 0xC000), FakeArray(y.shape, y.dtype, 0xD000)
    d = _common.dummy(cupy, np.float32, 1)
    scratch = FakeArray((2, 2, 8), np.float32, scratch_ptr)
    want = [(6, 64, 0x5, gpu.first.params((x2, scratch.reshape(-1, 2, 8), d, np.int64(8)))),
            (6, 64, 0x5, gpu.second.params((y2, scratch, out2, last2, np.int64(8))))]
    assert gpu.seen == want


def test_zeroed_buffers_are_zeroed_again_before_the_launches(gpu):
    cupy = gpu.cupy
    x, y = FakeArray((1, 3, 4), np.float32, 0xA000), FakeArray((1, 3, 4), np.float32, 0xB000)
    _, replay = _common.record(lambda: _launcher(cupy, x, y, zero=True), (x, y), keep={0})
    cupy.memsets.clear()
    gpu.seen.clear()
    out2, last2, _ = replay([0xC000, 0xD000])
    assert last2 is None  # keep={0}: the last state is scratch
    (ptr, value, nbytes, stream), = cupy.memsets
    assert (value, nbytes, stream) == (0, 1 * 2 * 4 * 4, 0x5)
    first_scratch = gpu.seen[0][3][5 + 2 * 3 + 4]  # data slot of the first kernel's 2nd array
    assert ptr == first_scratch


def test_kept_views_into_one_zeroed_buffer_are_rebuilt_at_their_offsets(gpu):
    """As the scan's backward returns its summed gradients: views of one
    zeroed buffer, which the replay allocates once and zeroes again."""
    cupy = gpu.cupy
    x, y = FakeArray((1, 3, 4), np.float32, 0xA000), FakeArray((1, 3, 4), np.float32, 0xB000)

    def summing():
        acc = _common.empty(cupy, (40,), np.float32, zero=True)
        first, second = acc.reshape(40), FakeArray((2, 4), np.float32, acc.data.ptr + 64)
        out = _common.empty(cupy, x.shape, x.dtype)
        _common.launch("first", 1, 32, "current", (x, acc.reshape(1, 5, 8), first, np.int64(4)))
        return out, first, second

    _, replay = _common.record(summing, (x, y), keep={0, 1, 2})
    assert replay is not None
    cupy.memsets.clear()
    before = len(cupy.allocs)
    out2, first2, second2 = replay([0xC000, 0xD000])
    assert cupy.allocs[before:] == [160, 48]  # the summed buffer once, then out
    assert cupy.memsets == [(first2.data.ptr, 0, 160, 0x5)]
    assert second2.data.ptr == first2.data.ptr + 64 and second2.shape == (2, 4)
    assert out2.shape == x.shape and out2.data.ptr not in (first2.data.ptr, second2.data.ptr)


def test_calls_a_replay_cannot_repeat_are_not_recorded(gpu, monkeypatch):
    cupy = gpu.cupy
    x = FakeArray((1, 3, 4), np.float32, 0xA000)
    result, replay = _common.record(lambda: _launcher(cupy, x, x), (x, x), keep={0, 1})
    assert replay is None and result[0].shape == x.shape  # aliased inputs: still run
    elsewhere = FakeArray((1, 3, 4), np.float32, 0xE000)  # neither input, buffer nor dummy
    y = FakeArray((1, 3, 4), np.float32, 0xB000)
    _, replay = _common.record(lambda: _launcher(cupy, x, elsewhere), (x, y), keep={0, 1})
    assert replay is None
    monkeypatch.setattr(_common, "RAW_LAUNCH", False)  # through Numba: not replayed
    calls = []
    monkeypatch.setattr(_common, "current_stream", lambda xp: None)

    class Kernel:
        def __getitem__(self, config):
            return lambda *args: calls.append(args)

    def numba_launcher():
        _common.launch(Kernel(), 1, 32, None, (x,))
        return (None,)

    _, replay = _common.record(numba_launcher, (x,), keep={0})
    assert replay is None and len(calls) == 1


def test_a_recording_ends_with_its_call_even_when_it_raises(gpu):
    def failing():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        _common.record(failing, (), keep={0})
    assert getattr(_common._RECORDING, "now", None) is None


class _Base(FakeArray):
    """A stand-in for CuPy's compiled base class: ``_init`` does the work."""

    def __init__(self, *args, **kwargs):
        pass

    def _init(self, shape, dtype, memptr):
        FakeArray.__init__(self, shape, dtype, memptr=memptr)


class _Ndarray(_Base):
    """A stand-in for ``cupy.ndarray``: a Python ``__new__`` around ``_init``."""

    def __new__(cls, shape, dtype, memptr):
        x = _Base.__new__(cls)
        x._init(shape, dtype, memptr)
        return x


class _BadBase(_Base):
    def _init(self, shape, dtype, memptr):  # (drops the pointer's offset)
        FakeArray.__init__(self, shape, dtype, ptr=memptr.ptr & ~0xFF)


class _BadInit(_BadBase):
    """Its own ``__new__`` is right, its base's ``_init`` is not."""

    def __new__(cls, shape, dtype, memptr):
        x = _BadBase.__new__(cls)
        FakeArray.__init__(x, shape, dtype, memptr=memptr)
        return x


@pytest.mark.parametrize("kind", [_Ndarray, _BadInit], ids=["agrees", "disagrees"])
def test_kept_arrays_are_made_by_the_base_class_only_where_it_agrees(gpu, monkeypatch, kind):
    cupy = gpu.cupy
    monkeypatch.setattr(cupy, "ndarray", kind)
    x, y = FakeArray((2, 3, 8), np.float32, 0xA000), FakeArray((2, 3, 8), np.float32, 0xB000)
    _, replay = _common.record(lambda: _launcher(cupy, x, y), (x, y), keep={0})
    fast = kind is _Ndarray
    assert ("new(ndarray)" in replay.source) == fast
    assert ("ndarray((2, 3, 8)" in replay.source) == (not fast)
    before = len(cupy.allocs)
    out, last, kept = replay([0xC000, 0xD000])
    ptr = gpu.seen[-1][3][2 * 11 + 4]  # (the second kernel's third array, out: its data slot)
    assert type(out) is kind and out.shape == (2, 3, 8)
    assert out.data.ptr == ptr and len(cupy.allocs) == before + 1
    assert last is None and kept is None


def test_assigning_a_kernel_modules_setting_changes_the_replays_settings(monkeypatch):
    """A replay recorded under some launchers and tuning constants must not be
    used under others: assigning (or deleting) any attribute of the kernel
    modules changes the settings the replays are keyed on."""
    from cuda_kernels import scan, scan_states

    monkeypatch.setattr(scan, "_get_device", lambda: 0)  # (no CuPy here)
    seen = [scan.replay_settings()]
    for module, name, value in [(scan, "choose_engine", lambda Bt, Dc, N: "blocks"),
                                (scan_states, "SAVE_EVERY", 4),
                                (scan_states, "scan_forward", scan_states.scan_forward),  # (same)
                                (_common, "RAW_LAUNCH", False)]:
        monkeypatch.setattr(module, name, value)
        seen.append(scan.replay_settings())
    monkeypatch.setattr(scan_states, "NEW_SETTING", 1, raising=False)
    monkeypatch.delattr(scan_states, "NEW_SETTING")
    seen.append(scan.replay_settings())
    assert len(set(seen)) == len(seen) and {s[0] for s in seen} == {0}
    assert scan.replay_settings() == seen[-1]  # (reading changes nothing)
