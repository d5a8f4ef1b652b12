"""The public scan remembers which layouts of CuPy arguments passed validation.

``numba_mamba.scan._prepare`` skips the checks for CuPy arguments (and a
given ``out``) whose types, shapes, dtypes, strides and devices it has
validated before -- public attributes only, all that validation reads -- so a
repeated call costs fewer microseconds.  Checked here on the CPU with
stand-ins for CuPy arrays that have nothing but CuPy's public attributes: the
checks are skipped only for a layout seen before, any change of layout is
validated again, NumPy arguments are validated on every call, ``out``'s
overlap with the inputs is checked on every call, and a setting changed
between two calls of one layout is honoured.
"""

import sys
import types

import numpy as np
import pytest

import numba_mamba.scan as api
from numba_mamba.cuda_kernels.settings import Settings


class FakeCupyArray:
    """CuPy's public attributes over a NumPy array; reading any private one fails."""

    __module__ = "cupy._fake"  # is_cupy_array: a type of CuPy's ...
    __cuda_array_interface__ = {}  # ... with the CUDA array interface

    def __init__(self, a, device=0):
        self.a = a
        self.data = types.SimpleNamespace(device_id=device, ptr=a.__array_interface__["data"][0])

    shape = property(lambda self: self.a.shape)
    dtype = property(lambda self: self.a.dtype)
    strides = property(lambda self: self.a.strides)
    itemsize = property(lambda self: self.a.itemsize)
    nbytes = property(lambda self: self.a.nbytes)
    ndim = property(lambda self: self.a.ndim)
    flags = property(lambda self: self.a.flags)

    def __getattr__(self, name):  # (only reached for attributes the class lacks)
        raise AssertionError(f"the scan read {name!r}, not a public attribute of CuPy's arrays")

    def __getitem__(self, index):
        return FakeCupyArray(self.a[index], self.data.device_id)

    def reshape(self, shape):
        return FakeCupyArray(self.a.reshape(shape), self.data.device_id)


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CuPy module and GPU backend stand-in; counts the full validations."""
    cupy = types.ModuleType("cupy")
    cupy.ndarray = FakeCupyArray
    cupy.ascontiguousarray = lambda x, dtype=None: FakeCupyArray(
        np.ascontiguousarray(x.a, dtype=dtype), x.data.device_id)
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    backend = types.SimpleNamespace(settings=Settings(), engine=["blocks"])
    backend.choose_engine = lambda Bt, Dc, N: backend.engine[0]
    monkeypatch.setattr(api, "_gpu_backend", lambda: backend)
    monkeypatch.setattr(api, "_VALIDATED", {})
    counted = {"full": 0, "backend": backend}
    namespace = api.array_namespace

    def counting(**arrays):
        counted["full"] += 1
        return namespace(**arrays)

    monkeypatch.setattr(api, "array_namespace", counting)
    return counted


def _args(rng, Bt=2, Dc=3, N=4, L=5, wrap=FakeCupyArray, dtype=np.float32, **changes):
    kw = dict(u=rng.standard_normal((Bt, Dc, L)), delta=rng.standard_normal((Bt, Dc, L)),
              A=-rng.uniform(0.5, 1, (Dc, N)), B=rng.standard_normal((Bt, N, L)),
              C=rng.standard_normal((Bt, 1, N, L)), D=rng.standard_normal(Dc), z=None,
              delta_bias=rng.standard_normal(Dc), initial_state=None)
    kw = {k: None if v is None else v.astype(dtype) for k, v in kw.items()}
    kw.update(changes)
    return {k: v if v is None or not isinstance(v, np.ndarray) else wrap(v)
            for k, v in kw.items()}


def _prepare(kw, out=None):
    return api._prepare(kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], kw["D"], kw["z"],
                        kw["delta_bias"], True, kw["initial_state"], out)


def test_a_layout_validated_before_skips_the_checks_and_gives_the_same_result(fake_gpu):
    rng = np.random.default_rng(0)
    first = _prepare(_args(rng))
    assert fake_gpu["full"] == 1 and len(api._VALIDATED) == 1
    kw = _args(rng)  # new values, same layout
    again = _prepare(kw)
    assert fake_gpu["full"] == 1  # not validated again
    assert again.xp is first.xp and again.backend is first.backend is fake_gpu["backend"]
    assert again.ftype == first.ftype == again.dout_dtype == np.float32
    canon = again.args
    assert canon[0] is kw["u"] and canon[2] is kw["A"] and canon[5] is kw["D"]
    assert canon[3].shape == (2, 1, 4, 5) and canon[3].a.base is kw["B"].a  # one group, a view
    assert canon[8] is True and canon[6] is None and again.given[3] is kw["B"]
    for a, b in zip(first.args, canon):
        assert (a is None) == (b is None) and getattr(a, "shape", 0) == getattr(b, "shape", 0)


@pytest.mark.parametrize("change,error", [
    (dict(B=np.zeros((2, 4, 6), np.float32)), "B must have shape"),
    (dict(A=np.zeros((3, 5), np.float32)), "B must have shape"),  # N from A
    (dict(D=np.zeros(4, np.float32)), "D must have shape"),
    (dict(u=np.zeros((2, 3, 5), np.complex64)), "u must have dtype"),
    (dict(z=np.zeros((2, 3, 4), np.float32)), "z must have shape"),
])
def test_a_changed_layout_is_validated_again(fake_gpu, change, error):
    rng = np.random.default_rng(1)
    _prepare(_args(rng))
    with pytest.raises((ValueError, TypeError), match=error):
        _prepare(_args(rng, **change))
    assert fake_gpu["full"] == 2 and len(api._VALIDATED) == 1


def test_other_strides_or_devices_are_validated_again(fake_gpu):
    rng = np.random.default_rng(2)
    _prepare(_args(rng))
    u = np.asfortranarray(rng.standard_normal((2, 3, 5)).astype(np.float32))
    canon = _prepare(_args(rng, u=u)).args
    assert fake_gpu["full"] == 2 and canon[0].a.flags.c_contiguous  # copied to C order
    canon = _prepare(_args(rng, u=u)).args  # (remembered: copied again, not validated)
    assert fake_gpu["full"] == 2 and canon[0].a.flags.c_contiguous
    kw = _args(rng)
    kw["A"] = FakeCupyArray(kw["A"].a, device=1)
    with pytest.raises(TypeError, match="one device"):
        _prepare(kw)
    assert fake_gpu["full"] == 3 and len(api._VALIDATED) == 2


def test_c_contiguous_arrays_with_other_strides_on_a_length_1_axis_are_not_copied(fake_gpu):
    rng = np.random.default_rng(4)
    _prepare(_args(rng, Bt=1))
    u = rng.standard_normal((1, 3, 5)).astype(np.float32)
    odd = np.lib.stride_tricks.as_strided(u, u.shape, (7, 20, 4))  # (axis 0 has one element)
    assert odd.flags.c_contiguous and odd.strides != u.strides
    canon = _prepare(_args(rng, Bt=1, u=odd)).args
    # (C-contiguous arrays are keyed by their shape: strides on a length-1 axis change
    # nothing validation finds, neither the copies nor the bytes spanned)
    assert fake_gpu["full"] == 1 and len(api._VALIDATED) == 1
    assert canon[0].a is odd  # (not copied: the kernels index it by its shape)


def test_a_remembered_contiguous_layout_still_finds_an_overlapping_out(fake_gpu):
    """The bytes an input spans, remembered per layout, hold for any strides
    on a length-1 axis: ``out`` overlapping such an input is refused."""
    rng = np.random.default_rng(5)
    _prepare(_args(rng, Bt=1), out=FakeCupyArray(np.zeros((1, 3, 5), np.float32)))
    u = rng.standard_normal((1, 3, 5)).astype(np.float32)
    odd = np.lib.stride_tricks.as_strided(u, u.shape, (-4, 20, 4))
    assert odd.flags.c_contiguous
    with pytest.raises(ValueError, match="out must not share memory with u"):
        _prepare(_args(rng, Bt=1, u=odd), out=FakeCupyArray(u))
    assert fake_gpu["full"] == 1


def test_non_contiguous_arrays_are_keyed_by_their_strides(fake_gpu):
    rng = np.random.default_rng(6)
    base = rng.standard_normal((2, 3, 10)).astype(np.float32)
    _prepare(_args(rng, u=base[:, :, ::2]))
    _prepare(_args(rng, u=base[:, :, ::2]))
    assert fake_gpu["full"] == 1
    _prepare(_args(rng, u=base[:, :, :5]))  # (other strides: validated again)
    assert fake_gpu["full"] == 2 and len(api._VALIDATED) == 2


def test_numpy_arguments_are_validated_on_every_call(monkeypatch):
    monkeypatch.setattr(api, "_VALIDATED", {})
    rng = np.random.default_rng(3)
    kw = _args(rng, wrap=lambda a: a)
    _prepare(kw)
    kw["A"] = kw["A"].copy()
    kw["A"][0, 0] = np.inf  # NumPy's A is checked for finite values on every call
    with pytest.raises(ValueError, match="A must be finite"):
        _prepare(kw)
    assert api._VALIDATED == {}


def test_out_is_validated_with_the_layout_and_its_overlap_on_every_call(fake_gpu):
    rng = np.random.default_rng(5)
    kw = _args(rng)
    out = FakeCupyArray(np.empty((2, 3, 5), np.float32))
    _prepare(kw, out)
    _prepare(_args(rng), FakeCupyArray(np.empty((2, 3, 5), np.float32)))
    assert fake_gpu["full"] == 1 and len(api._VALIDATED) == 1
    # the layout seen before, but out over u, or over part of a strided delta
    with pytest.raises(ValueError, match="^out must not share memory with u "):
        _prepare(kw, FakeCupyArray(kw["u"].a))
    wide = np.zeros((2, 3, 10), np.float32)
    strided = _args(rng, delta=wide[..., ::2])
    _prepare(strided, out)  # (a new layout: validated)
    over = FakeCupyArray(wide.reshape(-1)[25:55].reshape(2, 3, 5))
    with pytest.raises(ValueError, match="^out must not share memory with delta "):
        _prepare(strided, over)
    assert fake_gpu["full"] == 2
    # right after delta's last element (index 58 of the buffer): apart; on it: not
    buffer = np.zeros(60 + 30, np.float32)
    delta = buffer[:60].reshape(2, 3, 10)[..., ::2]
    _prepare(_args(rng, delta=delta), FakeCupyArray(buffer[59:89].reshape(2, 3, 5)))
    with pytest.raises(ValueError, match="^out must not share memory with delta "):
        _prepare(_args(rng, delta=delta), FakeCupyArray(buffer[58:88].reshape(2, 3, 5)))


@pytest.mark.parametrize("out,error,pattern", [
    (lambda: np.empty((2, 3, 5), np.float32), TypeError, r"^out must be a cupy\.ndarray"),
    (lambda: FakeCupyArray(np.empty((2, 3, 5))), TypeError, r"^out must have u's dtype float32"),
    (lambda: FakeCupyArray(np.empty((5, 3, 2), np.float32).T), ValueError,
     r"^out must be C-contiguous"),
    (lambda: FakeCupyArray(np.empty((2, 3, 4), np.float32)), ValueError,
     r"^out must have shape \(2, 3, 5\) like u"),
    (lambda: FakeCupyArray(np.empty((2, 3, 5), np.float32), device=1), ValueError,
     r"^out must be on u's device 0"),
])
def test_out_of_another_kind_dtype_layout_or_device_is_refused(fake_gpu, out, error, pattern):
    rng = np.random.default_rng(6)
    for _ in range(2):  # (the layout of the arguments known or not)
        with pytest.raises(error, match=pattern):
            _prepare(_args(rng), out())


def test_a_setting_changed_between_calls_of_one_layout_is_honoured(fake_gpu):
    """Half storage read directly (``settings.direct_half`` and the state engine)
    or cast to float32, decided on each call of a remembered layout."""
    rng = np.random.default_rng(7)
    backend = fake_gpu["backend"]
    f16, f32 = np.dtype(np.float16), np.dtype(np.float32)
    kw = _args(rng, dtype=np.float16)
    backend.engine[0] = "states"
    call = _prepare(kw)
    assert call.args[0] is kw["u"] and call.dout_dtype == f16 and call.ftype == f32
    assert call.args[2].dtype == f32  # (A is not per-step: float32)
    with backend.settings.override(direct_half=False):
        call = _prepare(kw)
    assert call.args[0].dtype == call.args[1].dtype == call.dout_dtype == f32
    backend.engine[0] = "blocks"
    assert _prepare(kw).args[0].dtype == f32
    backend.engine[0] = "states"
    assert _prepare(kw).args[0] is kw["u"]
    assert fake_gpu["full"] == 1
