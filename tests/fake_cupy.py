"""Stand-ins for CuPy and the CUDA driver, for the replay tests on the CPU
(``tests/test_replay.py``, ``tests/test_replay_api.py``): arrays that are
only a layout and an address, allocations at increasing addresses, and a
``RawLaunch`` whose driver call keeps the slot values it is handed."""

import ctypes
import types
from types import SimpleNamespace

import numpy as np

from cuda_kernels import _common


class FakeArray:
    """What a replay (and the public scan's validation) reads of a CuPy array."""

    __module__ = "cupy._fake"  # (is_cupy_array: a type of CuPy's with the CUDA array interface)
    __cuda_array_interface__ = {}

    def __init__(self, shape, dtype, ptr=None, memptr=None):
        ptr = memptr.ptr if memptr is not None else ptr  # (``cupy.ndarray(..., memptr=)``)
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.itemsize = self.dtype.itemsize
        self.size = int(np.prod(shape))
        self.strides = ()
        self.data = SimpleNamespace(ptr=ptr, device_id=0)
        self.flags = SimpleNamespace(c_contiguous=True)
        self._c_contiguous = True

    ndim = property(lambda self: len(self.shape))
    nbytes = property(lambda self: self.size * self.itemsize)

    def reshape(self, *shape):
        shape = np.empty(self.shape, np.int8).reshape(shape).shape
        return FakeArray(shape, self.dtype, self.data.ptr)

    def astype(self, dtype, copy=True):
        assert np.dtype(dtype) == self.dtype and not copy  # (only the no-op is needed)
        return self


class FakeMemory:
    def __init__(self, ptr, size):
        self.ptr, self.size = ptr, size

    def __add__(self, offset):
        return FakeMemory(self.ptr + offset, self.size - offset)


class FakeCupy(types.ModuleType):
    """Allocations at increasing addresses; ``empty``/``zeros`` and ``cuda.alloc``."""

    def __init__(self):
        super().__init__("cupy")
        self.next = 0x10000
        self.allocs, self.memsets = [], []
        self.cuda = SimpleNamespace(
            alloc=self._alloc, get_current_stream=lambda: SimpleNamespace(ptr=0x5),
            runtime=SimpleNamespace(getDevice=lambda: 0, memsetAsync=self._memset))

    def _alloc(self, nbytes):
        mem = FakeMemory(self.next, nbytes)
        self.allocs.append(nbytes)
        self.next += -(-max(nbytes, 1) // 512) * 512 + 0x1000
        return mem

    def _memset(self, ptr, value, nbytes, stream):
        self.memsets.append((ptr, value, nbytes, stream))

    ndarray = FakeArray

    @staticmethod
    def may_share_memory(a, b):
        return a.data.ptr < b.data.ptr + b.nbytes and b.data.ptr < a.data.ptr + a.nbytes

    def empty(self, shape, dtype):
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return FakeArray(shape, dtype, self._alloc(nbytes).ptr)

    def zeros(self, shape, dtype):
        x = self.empty(shape, dtype)
        self._memset(x.data.ptr, 0, x.size * x.itemsize, 0x5)
        return x


def fake_raw_launch(kinds, seen):
    """A RawLaunch of argument kinds ``kinds`` whose driver call appends the slot values."""
    n_slots = sum(5 + 2 * k if k > 0 else 1 for k in kinds)

    def launch_kernel(f, gx, gy, gz, bx, by, bz, shared, stream, kernel_params, extra):
        pointers = (ctypes.c_uint64 * n_slots).from_address(kernel_params)
        seen.append((gx, bx, stream, [ctypes.c_uint64.from_address(p).value for p in pointers]))

    raw = _common.RawLaunch.__new__(_common.RawLaunch)
    raw._ndims = kinds
    raw._init_slots(n_slots, launch_kernel)
    raw._function = SimpleNamespace(ptr=0xF00)
    return raw
