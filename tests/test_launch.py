"""The launch seam ``numba_mamba.cuda_kernels._launch`` on the CPU (no CuPy needed).

``RawLaunch`` hands the CUDA driver one 8-byte slot per kernel parameter, laid
out as Numba's own launcher lays them out.  On the GPU its results are compared
with Numba's launcher (``tests/test_gpu_backend.py``, ``tests/test_gpu_launch.py``);
here the packing itself is checked on stand-ins for CuPy arrays, and so is the
choice of path: a kernel whose raw path cannot be built (an internal missing,
a changed argument layout) launches through Numba, with views made without a
synchronization, on CuPy's current stream.  ``compile_kernel`` is checked
against a stand-in ``cuda.jit``: the disk cache on, cache entries named per
``cuda.jit`` options, a refusal to cache compiled without it.
"""

import struct
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("numba.cuda")
from numba_mamba.cuda_kernels import _launch  # noqa: E402


class FakeDeviceArray:
    """What RawLaunch reads of a CuPy array: shape, itemsize, flags, data.ptr."""

    def __init__(self, shape, itemsize, ptr, contiguous=True):
        self.shape = shape
        self.itemsize = itemsize
        self.strides = ()
        self.data = SimpleNamespace(ptr=ptr)
        self.flags = SimpleNamespace(c_contiguous=contiguous)


def _launcher(kinds):
    raw = _launch.RawLaunch.__new__(_launch.RawLaunch)  # no cubin to load on the CPU
    raw._ndims = kinds
    return raw


def test_array_slots_are_meminfo_parent_size_itemsize_data_shape_c_strides():
    raw = _launcher([3, 0])
    a = FakeDeviceArray((2, 3, 5), 4, 0x7F0000001000)
    assert raw.params([a, np.int32(9)]) == [0, 0, 30, 4, 0x7F0000001000, 2, 3, 5, 60, 20, 4, 9]


def test_integer_slots_hold_twos_complement_and_float_slots_hold_ieee_bits():
    raw = _launcher([0, 0, _launch._FLOAT32, _launch._FLOAT64])
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

    raw = _launcher([2, 0, _launch._FLOAT64])
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
    kinds = [2, 0, _launch._FLOAT32, 1]
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



# ------------------------------------------------- contiguity: private flag
class FlaggedArray(FakeDeviceArray):
    """A stand-in with a private ``_c_contiguous`` besides the public flag;
    ``private`` (default: the public flag's value) is what it says."""

    def __init__(self, contiguous=True, private=None):
        super().__init__((2, 2), 4, 0x1000, contiguous)
        if private is not ...:
            self._c_contiguous = contiguous if private is None else private


@pytest.fixture
def readers(monkeypatch):
    """``_launch``'s per-type readers emptied; probes of FlaggedArray set by the test."""
    monkeypatch.setattr(_launch, "_READERS", {})

    def probes(items):
        monkeypatch.setattr(_launch, "_probes", lambda cls: items if cls is FlaggedArray else [])
    return probes


def test_an_agreeing_private_flag_is_read_and_only_it(readers):
    readers([FlaggedArray(True), FlaggedArray(False)])
    assert _launch.contiguity_reader(FlaggedArray) is _launch._PRIVATE[0]
    a = FlaggedArray(True, private=False)  # (probed once: now the private flag is believed)
    assert _launch.contiguous(a) is False
    assert _launch.layout_key([a, FlaggedArray(True)]) == (((2, 2), 4, False), ((2, 2), 4, True))


@pytest.mark.parametrize("probes", [
    [FlaggedArray(True), FlaggedArray(False, private=True)],  # disagrees on one
    [FlaggedArray(True), FlaggedArray(False, private=...)],  # missing on one
    [FlaggedArray(True, private=1), FlaggedArray(False, private=0)],  # not a bool
    [FlaggedArray(True), FlaggedArray(True)],  # never seen to say False
    [],  # nothing to probe
])
def test_a_private_flag_not_seen_to_agree_gives_the_public_one(readers, probes):
    readers(probes)
    assert _launch.contiguity_reader(FlaggedArray) is _launch._PUBLIC[0]
    a = FlaggedArray(True, private=False)
    assert _launch.contiguous(a) is True
    assert _launch.layout_key([a]) == (((2, 2), 4, True),)


def test_probes_that_raise_give_the_public_flag(readers, monkeypatch):
    def boom(cls):
        raise RuntimeError("no device")
    monkeypatch.setattr(_launch, "_probes", boom)
    assert _launch.contiguity_reader(FlaggedArray) is _launch._PUBLIC[0]


def test_mixed_types_are_read_each_by_its_own_reader(readers):
    readers([FlaggedArray(True), FlaggedArray(False)])
    plain = FakeDeviceArray((3,), 8, 0x2000, contiguous=False)
    key = _launch.layout_key([FlaggedArray(False, private=True), plain])
    assert key == (((2, 2), 4, True), ((3,), 8, False))


def test_numpy_and_cupy_types_are_not_probed_unless_cupy(readers):
    assert _launch._probes(np.ndarray) == []
    assert _launch.contiguity_reader(np.ndarray) is _launch._PUBLIC[0]


def test_the_launch_checks_with_the_private_flag_where_it_agreed(readers):
    """A bound layout is keyed on the flag read: an array whose (agreeing)
    private flag says non-contiguous is refused, not launched."""
    readers([FlaggedArray(True), FlaggedArray(False)])
    raw, seen = _recording_launcher([2], 9)
    raw(1, 32, SimpleNamespace(ptr=0), [FlaggedArray(True)])
    with pytest.raises(ValueError, match="C-contiguous array of 2 dimensions"):
        raw(1, 32, SimpleNamespace(ptr=0), [FlaggedArray(True, private=False)])
    assert len(seen) == 1


# --------------------------------------------------------- choosing the path
import sys  # noqa: E402
import warnings  # noqa: E402

from numba.core import types as nbtypes  # noqa: E402
from numba.cuda.descriptor import cuda_target  # noqa: E402

from numba_mamba.cuda_kernels.settings import settings  # noqa: E402

CURRENT_STREAM = 0x77


class FakeCupyArray(FakeDeviceArray):
    """A CuPy array stand-in: what both paths read (C strides)."""

    def __init__(self, shape, itemsize, ptr):
        super().__init__(shape, itemsize, ptr)
        strides, stride = [], itemsize
        for n in reversed(shape):
            strides.append(stride)
            stride *= n
        self.strides = tuple(reversed(strides))
        self.__cuda_array_interface__ = {"shape": shape, "data": (ptr, False)}


class FakeModule:
    """``cupy.cuda.function.Module``: keeps the image, hands out a function."""

    loaded = []

    def load(self, image):
        FakeModule.loaded.append(image)

    def get_function(self, name):
        return SimpleNamespace(ptr=0xF00, name=name)


@pytest.fixture
def seam(monkeypatch):
    """Fresh per-kernel state of the seam, a stand-in CuPy (current stream
    ``CURRENT_STREAM``, device 0), and Numba's ``as_cuda_array`` and
    ``external_stream`` recorded instead of called."""
    from numba import cuda

    monkeypatch.setattr(_launch, "_RAW", {})
    monkeypatch.setattr(_launch, "_WHY", {})
    monkeypatch.setattr(_launch, "_STREAMS", {})
    monkeypatch.setattr(_launch, "_WARNED", [])
    launches = []

    def launch_kernel(f, gx, gy, gz, bx, by, bz, shared, stream, params, extra):
        launches.append((f, gx, bx, stream))

    cupy = SimpleNamespace(cuda=SimpleNamespace(
        runtime=SimpleNamespace(getDevice=lambda: 0),
        get_current_stream=lambda: SimpleNamespace(ptr=CURRENT_STREAM),
        function=SimpleNamespace(Module=FakeModule),
        driver=SimpleNamespace(launchKernel=launch_kernel)))
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    views = []

    def as_cuda_array(x, sync=True):
        views.append((x, sync))
        return ("view", x, sync)

    monkeypatch.setattr(cuda, "as_cuda_array", as_cuda_array)
    monkeypatch.setattr(cuda, "external_stream", lambda ptr: ("numba stream", ptr))
    monkeypatch.setattr(_launch, "_param_sizes", lambda ptr, limit: None)
    return SimpleNamespace(launches=launches, views=views)


A2 = nbtypes.Array(nbtypes.float32, 2, "C")


class FakeDispatcher:
    """A Numba CUDA dispatcher stand-in compiled for ``argtypes``; indexing it
    with a launch configuration records the Numba-path launch."""

    def __init__(self, argtypes=(A2, nbtypes.int32), library="default", targetctx=None):
        if library == "default":
            library = SimpleNamespace(get_cubin=lambda: b"cubin", _entry_name="_Z6kernel")
        kernel = SimpleNamespace(argument_types=tuple(argtypes), library=library)
        self.overloads = {tuple(argtypes): kernel}
        self.targetctx = targetctx or cuda_target.target_context
        self.calls = []
        self.__name__ = "fake_kernel"

    def __getitem__(self, config):
        grid, block, *stream = config
        return lambda *args: self.calls.append((grid, block, *stream, args))


def _args():
    return [FakeCupyArray((3, 2), 4, 0xABC000), np.int32(4)]


def _assert_numba_path(seam, kernel, args):
    assert kernel.calls == [(5, 128, ("numba stream", CURRENT_STREAM),
                             (("view", args[0], False), args[1]))]
    assert seam.views == [(args[0], False)]  # sync=False: no synchronization
    assert seam.launches == []
    assert _launch.launch_path(kernel) == "numba"


def test_a_kernel_whose_internals_are_complete_takes_the_raw_path(seam):
    kernel = FakeDispatcher()
    _launch.launch(kernel, 5, 128, "current", _args())
    assert seam.launches == [(0xF00, 5, 128, CURRENT_STREAM)]
    assert kernel.calls == [] and seam.views == []
    assert _launch.launch_path(kernel) == "raw" and _launch.fallback_reason(kernel) is None


def _fallback(seam, kernel, match):
    args = _args()
    with pytest.warns(_launch.LaunchFallbackWarning, match=match):
        _launch.launch(kernel, 5, 128, "current", args)
    _assert_numba_path(seam, kernel, args)
    assert match in _launch.fallback_reason(kernel)
    # the choice is remembered: no second build, no second warning
    kernel.calls.clear()
    seam.views.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _launch.launch(kernel, 5, 128, "current", args)
    _assert_numba_path(seam, kernel, args)


def test_a_dispatcher_without_overloads_falls_back_to_numba(seam):
    kernel = FakeDispatcher()
    del kernel.overloads
    _fallback(seam, kernel, "overloads")


def test_a_library_without_its_entry_name_falls_back_to_numba(seam):
    library = SimpleNamespace(get_cubin=lambda: b"cubin")  # no ``_entry_name``
    _fallback(seam, FakeDispatcher(library=library), "_entry_name")


def test_a_cubin_of_another_type_falls_back_to_numba(seam):
    library = SimpleNamespace(get_cubin=lambda: "not bytes", _entry_name="k")
    _fallback(seam, FakeDispatcher(library=library), "cubin as bytes")


class _Context:
    """Numba's target context with one of its answers changed."""

    def __init__(self, drop_param=False, swap_fields=False):
        self._real = cuda_target.target_context
        self.drop_param, self.swap_fields = drop_param, swap_fields

    def get_arg_packer(self, argtypes):
        params = self._real.get_arg_packer(argtypes).argument_types
        return SimpleNamespace(argument_types=params[1:] if self.drop_param else params)

    @property
    def data_model_manager(self):
        real = self._real.data_model_manager
        swap = {"nitems": "itemsize", "itemsize": "nitems"} if self.swap_fields else {}

        def lookup(ty):
            model = real.lookup(ty)
            return SimpleNamespace(
                get_field_position=lambda f: model.get_field_position(swap.get(f, f)))

        return SimpleNamespace(lookup=lookup)


def test_a_changed_argument_packing_falls_back_to_numba(seam):
    _fallback(seam, FakeDispatcher(targetctx=_Context(drop_param=True)), "flattens the arguments")


def test_a_changed_array_model_falls_back_to_numba(seam):
    _fallback(seam, FakeDispatcher(targetctx=_Context(swap_fields=True)), "array model")


def test_parameter_sizes_the_driver_reports_otherwise_fall_back_to_numba(seam, monkeypatch):
    monkeypatch.setattr(_launch, "_param_sizes", lambda ptr, limit: [8] * 9 + [8])
    _fallback(seam, FakeDispatcher(), "parameters of")


def test_parameter_sizes_the_driver_reports_alike_keep_the_raw_path(seam, monkeypatch):
    # a 2-D float32 array (9 slots of 8 bytes) and an int32 (4 bytes)
    monkeypatch.setattr(_launch, "_param_sizes", lambda ptr, limit: [8] * 9 + [4])
    kernel = FakeDispatcher()
    assert _launch.launch_path(kernel) == "raw"


def test_an_unsupported_argument_type_falls_back_to_numba(seam):
    kernel = FakeDispatcher(argtypes=(A2, nbtypes.complex64))
    _fallback(seam, kernel, "RawLaunch takes C arrays")


def test_raw_launch_off_takes_numba_path_without_building(seam):
    kernel = FakeDispatcher()
    args = _args()
    with settings.override(raw_launch=False):
        _launch.launch(kernel, 5, 128, "current", args)
        assert _launch.launch_path(kernel) == "numba"
    assert kernel.calls == [(5, 128, ("numba stream", CURRENT_STREAM),
                             (("view", args[0], False), args[1]))]
    assert seam.launches == []
    assert _launch._RAW == {}  # nothing was built
    _launch.launch(kernel, 5, 128, "current", args)  # back on: the raw path
    assert seam.launches == [(0xF00, 5, 128, CURRENT_STREAM)]


def test_numba_path_views_a_length_one_axis_with_c_strides(seam, monkeypatch):
    """A CuPy array with a zero stride on a length-1 axis is C-contiguous for
    CuPy, not for Numba: the view is made of a C-strided array."""
    made = []

    def ndarray(shape, dtype, data):
        a = FakeCupyArray(shape, 4, data.ptr)
        made.append(a)
        return a

    sys.modules["cupy"].ndarray = ndarray
    odd = FakeCupyArray((3, 1), 4, 0x1000)
    odd.strides = (4, 0)
    odd.dtype = np.dtype(np.float32)
    kernel = FakeDispatcher()
    with settings.override(raw_launch=False):
        _launch.launch(kernel, 1, 32, "current", [odd, np.int32(1)])
    assert len(made) == 1 and made[0].strides == (4, 4)
    assert kernel.calls[0][3][0] == ("view", made[0], False)


def test_numpy_arrays_launch_through_numba_on_the_given_stream(seam):
    kernel = FakeDispatcher()
    x = np.zeros((3, 2), np.float32)
    _launch.launch(kernel, 2, 32, "current", [x, 1])  # "current": the default stream
    _launch.launch(kernel, 2, 32, "s", [x, 1])
    assert kernel.calls == [(2, 32, (x, 1)), (2, 32, "s", (x, 1))]
    assert seam.launches == [] and seam.views == []


def test_every_kernel_signature_is_laid_out_as_raw_launch_writes_it():
    """Numba's own description of each kernel's parameters (array data model
    and argument packer) agrees with the slots RawLaunch writes."""
    from numba_mamba.cuda_kernels import conv1d, discretize, elementwise, scan_blocks, scan_states, step

    n = 0
    for module in (scan_blocks, scan_states, discretize, conv1d, elementwise, step):
        for name, _, argtypes, *_ in module.ptx_signatures():
            _launch.check_argument_layout(tuple(argtypes), cuda_target.target_context)
            n += 1
    assert n > 50


# ------------------------------------------------------------------ compiling
@pytest.fixture
def fake_jit(monkeypatch):
    """``cuda.jit`` recorded: each call's signature and options, and the
    function it compiled; ``fail`` makes a ``cache=True`` compile raise."""
    from numba import cuda

    seen = SimpleNamespace(calls=[], fail=None)

    def jit(signature=None, **options):
        def compile_(f):
            seen.calls.append((signature, options, f))
            if options.get("cache") and seen.fail is not None:
                raise seen.fail
            return ("dispatcher", f)
        return compile_

    monkeypatch.setattr(cuda, "jit", jit)
    monkeypatch.setattr(_launch, "_CACHE_REFUSED", {})
    return seen


def _body(scale):
    def body(x, out):
        out[0] = x[0] * scale
    return body


def test_compile_kernel_caches_under_a_name_per_options(fake_jit):
    sig = nbtypes.void(nbtypes.float32[::1], nbtypes.float32[::1])
    body = _body(np.float32(2))
    _launch.compile_kernel(body, sig, launch_bounds=(128,))
    _launch.compile_kernel(body, sig, launch_bounds=(128,))
    _launch.compile_kernel(body, sig, launch_bounds=(256,))
    _launch.compile_kernel(body, sig, launch_bounds=(128,), fastmath=True)
    names = []
    for signature, options, f in fake_jit.calls:
        assert signature == sig and options.pop("cache") is True
        assert f is not body and f.__code__ is body.__code__ and f.__closure__ is body.__closure__
        assert f.__qualname__.startswith(body.__qualname__ + "-")
        names.append(f.__qualname__)
    assert names[0] == names[1] and len(set(names)) == 3
    assert [c[1] for c in fake_jit.calls] == [{"launch_bounds": (128,)}] * 2 + [
        {"launch_bounds": (256,)}, {"launch_bounds": (128,), "fastmath": True}]


def test_compile_kernel_compiles_without_the_cache_where_numba_refuses_it(fake_jit):
    sig = nbtypes.void(nbtypes.float32[::1], nbtypes.float32[::1])
    body = _body(np.float32(2))
    fake_jit.fail = RuntimeError("cannot cache function 'body': no locator available for file")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernel = _launch.compile_kernel(body, sig)
    assert kernel == ("dispatcher", body)  # the body itself, without the cache
    assert [c[1] for c in fake_jit.calls] == [{"cache": True}, {}]
    (name, why), = _launch.cache_refusals().items()
    assert name.startswith(body.__qualname__) and "no locator" in why


def test_compile_kernel_raises_what_is_not_a_refusal_to_cache(fake_jit):
    sig = nbtypes.void(nbtypes.float32[::1], nbtypes.float32[::1])
    fake_jit.fail = TypeError("No implementation of function for argument types")
    with pytest.raises(TypeError, match="No implementation"):
        _launch.compile_kernel(_body(np.float32(2)), sig)
    assert len(fake_jit.calls) == 1 and _launch.cache_refusals() == {}


def test_compile_kernel_without_cache_compiles_the_body_itself(fake_jit):
    sig = nbtypes.void(nbtypes.float32[::1], nbtypes.float32[::1])
    body = _body(np.float32(2))
    assert _launch.compile_kernel(body, sig, cache=False, fastmath=True) == ("dispatcher", body)
    assert fake_jit.calls == [(sig, {"fastmath": True}, body)]


def test_compile_kernel_without_the_cache_where_the_environment_says_so(fake_jit, monkeypatch):
    sig = nbtypes.void(nbtypes.float32[::1], nbtypes.float32[::1])
    body = _body(np.float32(2))
    monkeypatch.setattr(_launch, "KERNEL_CACHE", False)
    assert _launch.compile_kernel(body, sig) == ("dispatcher", body)
    assert _launch.compile_kernel(body, sig, cache=True)[1] is not body  # (asked for: cached)
    assert [c[1] for c in fake_jit.calls] == [{}, {"cache": True}]


_KEY_PROBE = r"""
import hashlib, json
from numba.cuda.serialize import dumps
from numba_mamba.cuda_kernels import conv1d, discretize, elementwise, scan_blocks, scan_states, step
out = {}
for m in (scan_blocks, scan_states, discretize, conv1d, elementwise, step):
    for name, f, *_ in m.ptx_signatures():
        cells = tuple(c.cell_contents for c in (f.__closure__ or ()))
        out[name] = hashlib.sha256(dumps(cells)).hexdigest()
print(json.dumps(out))
"""


def test_kernel_closures_pickle_alike_in_every_process():
    """Numba's disk cache keys a kernel on its closure, pickled (with Numba's
    pickler, as its cache does): every kernel's closure pickles, and to the
    same bytes in two processes of different hash seeds, so a second process
    finds the first one's entries."""
    import json
    import os
    import subprocess

    digests = []
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        env.pop("NUMBA_ENABLE_CUDASIM", None)
        result = subprocess.run([sys.executable, "-c", _KEY_PROBE], env=env, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, result.stderr
        digests.append(json.loads(result.stdout.strip().splitlines()[-1]))
    assert len(digests[0]) > 50 and digests[0] == digests[1]


# ------------------------------------------------------ prepared launches
class ReshapableArray(FakeCupyArray):
    """A CuPy array stand-in that can be viewed with another shape or dtype."""

    def __init__(self, shape, ptr, dtype=np.float32):
        super().__init__(shape, np.dtype(dtype).itemsize, ptr)
        self.dtype = np.dtype(dtype)

    def reshape(self, shape):
        return ReshapableArray(shape, self.data.ptr, self.dtype)

    def view(self, dtype):
        return ReshapableArray(self.shape, self.data.ptr, dtype)


def test_a_prepared_raw_launch_writes_only_the_new_data_pointers(seam):
    import ctypes

    seen = []

    def launch_kernel(f, gx, gy, gz, bx, by, bz, shared, stream, kernel_params, extra):
        pointers = (ctypes.c_uint64 * 10).from_address(kernel_params)
        seen.append((f, gx, bx, stream, [ctypes.c_uint64.from_address(p).value
                                          for p in pointers]))

    sys.modules["cupy"].cuda.driver.launchKernel = launch_kernel
    kernel = FakeDispatcher()
    go = _launch.prepare_launch(kernel, 5, 128, [ReshapableArray((3, 2), 0xABC000),
                                                 np.int32(4)])
    assert seen == []  # (preparing launches nothing)
    go([ReshapableArray((6,), 0xDEF000)])  # another array of that layout, flat
    go([ReshapableArray((3, 2), 0x123000)])
    assert [s[:4] for s in seen] == [(0xF00, 5, 128, CURRENT_STREAM)] * 2
    assert seen[0][4] == [0, 0, 6, 4, 0xDEF000, 3, 2, 8, 4, 4]
    assert seen[1][4] == [0, 0, 6, 4, 0x123000, 3, 2, 8, 4, 4]
    assert kernel.calls == [] and seam.views == []


def test_a_prepared_launch_takes_the_numba_path_with_the_arrays_as_prepared(seam):
    kernel = FakeDispatcher()
    with settings.override(raw_launch=False):
        go = _launch.prepare_launch(kernel, 5, 128, [ReshapableArray((3, 2), 0xABC000),
                                                     np.int32(4)])
    go([ReshapableArray((6,), 0xDEF000, np.uint32)])  # viewed as (3, 2) float32
    ((grid, block, stream, (view, n)),) = kernel.calls
    assert (grid, block, stream, n) == (5, 128, ("numba stream", CURRENT_STREAM), 4)
    assert view[0] == "view" and view[2] is False  # (no synchronization)
    assert view[1].shape == (3, 2) and view[1].dtype == np.float32
    assert view[1].data.ptr == 0xDEF000
    assert seam.launches == []


def test_a_prepared_launch_falls_back_to_numba_where_the_raw_path_fails(seam):
    kernel = FakeDispatcher()
    del kernel.overloads
    with pytest.warns(_launch.LaunchFallbackWarning, match="overloads"):
        go = _launch.prepare_launch(kernel, 2, 64, [ReshapableArray((4,), 0x1000),
                                                    np.int32(1)])
    go([ReshapableArray((4,), 0x2000)])
    assert len(kernel.calls) == 1 and seam.launches == []


def test_a_prepared_launch_on_numpy_arrays_launches_through_the_dispatcher(seam):
    kernel = FakeDispatcher()
    x = np.zeros((3, 2), np.float32)
    go = _launch.prepare_launch(kernel, 2, 32, [x, np.int32(1)])
    y = np.ones(6, np.float32)
    go([y])
    ((grid, block, (arg, n)),) = kernel.calls
    assert (grid, block, n) == (2, 32, 1)
    assert arg.shape == (3, 2) and np.shares_memory(arg, y)
