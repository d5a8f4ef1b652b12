"""The parameter slots of ``cuda_kernels._common.RawLaunch`` (CPU: no CuPy needed).

``RawLaunch`` hands the CUDA driver one 8-byte slot per kernel parameter, laid
out as Numba's own launcher lays them out.  On the GPU its results are compared
with Numba's launcher (``tests/test_gpu_backend.py``); here the packing itself
is checked on stand-ins for CuPy arrays.
"""

import struct
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("numba.cuda")
from cuda_kernels import _common  # noqa: E402


class FakeDeviceArray:
    """What RawLaunch reads of a CuPy array: shape, itemsize, flags, data.ptr."""

    def __init__(self, shape, itemsize, ptr, contiguous=True):
        self.shape = shape
        self.itemsize = itemsize
        self.strides = ()
        self.data = SimpleNamespace(ptr=ptr)
        self.flags = SimpleNamespace(c_contiguous=contiguous)


def _launcher(kinds):
    raw = _common.RawLaunch.__new__(_common.RawLaunch)  # no cubin to load on the CPU
    raw._ndims = kinds
    return raw


def test_array_slots_are_meminfo_parent_size_itemsize_data_shape_c_strides():
    raw = _launcher([3, 0])
    a = FakeDeviceArray((2, 3, 5), 4, 0x7F0000001000)
    assert raw.params([a, np.int32(9)]) == [0, 0, 30, 4, 0x7F0000001000, 2, 3, 5, 60, 20, 4, 9]


def test_integer_slots_hold_twos_complement_and_float_slots_hold_ieee_bits():
    raw = _launcher([0, 0, _common._FLOAT32, _common._FLOAT64])
    slots = raw.params([np.int64(-2), 7, np.float32(1.5), 0.1])
    assert slots[0] == (1 << 64) - 2  # the low 4 bytes read as int32 give -2 as well
    assert struct.unpack("<i", slots[0].to_bytes(8, "little")[:4])[0] == -2
    assert slots[1] == 7
    assert struct.unpack("<f", slots[2].to_bytes(8, "little")[:4])[0] == 1.5
    assert struct.unpack("<d", slots[3].to_bytes(8, "little"))[0] == 0.1


def test_non_contiguous_or_wrong_rank_arrays_are_refused():
    raw = _launcher([2])
    with pytest.raises(ValueError, match="C-contiguous array of 2 dimensions"):
        raw.params([FakeDeviceArray((4, 4), 4, 0x1000, contiguous=False)])
    with pytest.raises(ValueError, match="C-contiguous array of 2 dimensions"):
        raw.params([FakeDeviceArray((16,), 4, 0x1000)])


def test_launch_hands_the_driver_one_pointer_per_slot_holding_its_value():
    import ctypes

    seen = {}

    def launch_kernel(f, gx, gy, gz, bx, by, bz, shared, stream, kernel_params, extra):
        n = 11  # (2-D array: 5 + 2 * 2) + int + float
        pointers = (ctypes.c_uint64 * n).from_address(kernel_params)
        seen.update(f=f, grid=(gx, gy, gz), block=(bx, by, bz), stream=stream, extra=extra,
                    values=[ctypes.c_uint64.from_address(p).value for p in pointers])

    raw = _launcher([2, 0, _common._FLOAT64])
    raw._init_slots(11, launch_kernel)
    raw._function = SimpleNamespace(ptr=0xF00)
    a = FakeDeviceArray((3, 2), 8, 0xABC000)
    raw(5, 128, SimpleNamespace(ptr=0x5), [a, np.int32(4), 2.0])
    assert seen["f"] == 0xF00 and seen["grid"] == (5, 1, 1) and seen["block"] == (128, 1, 1)
    assert seen["stream"] == 0x5 and seen["extra"] == 0
    assert seen["values"] == [0, 0, 6, 8, 0xABC000, 3, 2, 16, 8, 4,
                              int.from_bytes(struct.pack("<d", 2.0), "little")]


def _recording_launcher(kinds, n_slots):
    import ctypes

    seen = []

    def launch_kernel(f, gx, gy, gz, bx, by, bz, shared, stream, kernel_params, extra):
        pointers = (ctypes.c_uint64 * n_slots).from_address(kernel_params)
        seen.append([ctypes.c_uint64.from_address(p).value for p in pointers])

    raw = _launcher(kinds)
    raw._init_slots(n_slots, launch_kernel)
    raw._function = SimpleNamespace(ptr=0xF00)
    return raw, seen


def test_cached_layouts_give_the_slots_params_computes():
    """Launches that alternate layouts (shapes, itemsizes, scalar values and
    types) and data pointers hand the driver what ``params`` computes for each."""
    kinds = [2, 0, _common._FLOAT32, 1]
    raw, seen = _recording_launcher(kinds, 9 + 1 + 1 + 7)
    def args(shape, itemsize, p, q, n=np.int32(4), x=np.float32(2.0)):
        return [FakeDeviceArray(shape, itemsize, p), n, x, FakeDeviceArray((5,), itemsize, q)]

    calls = [args((3, 2), 4, 0x1000, 0x2000), args((3, 2), 4, 0x3000, 0x4000),
             args((4, 2), 4, 0x3000, 0x4000), args((3, 2), 8, 0x5000, 0x6000),
             args((3, 2), 4, 0x7000, 0x8000), args((3, 2), 4, 0x7000, 0x8000, n=np.int64(4)),
             args((3, 2), 4, 0x7000, 0x8000, x=2.5)]
    for a in calls:
        raw(1, 32, SimpleNamespace(ptr=0), a)
    assert seen == [raw.params(a) for a in calls]
    assert len(raw._bound) == 5  # calls 0, 1 and 4 share one layout
    raw(1, 32, SimpleNamespace(ptr=0), calls[2])
    assert seen[-1] == raw.params(calls[2])


def test_cached_layout_still_refuses_a_non_contiguous_array():
    raw, seen = _recording_launcher([2], 9)
    raw(1, 32, SimpleNamespace(ptr=0), [FakeDeviceArray((4, 4), 4, 0x1000)])
    with pytest.raises(ValueError, match="C-contiguous array of 2 dimensions"):
        raw(1, 32, SimpleNamespace(ptr=0), [FakeDeviceArray((4, 4), 4, 0x1000, contiguous=False)])
    assert len(seen) == 1

