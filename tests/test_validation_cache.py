"""The public scan remembers which layouts of CuPy arguments passed validation.

``numba_mamba.scan._prepare`` skips the checks for CuPy arguments whose
types, shapes, dtypes, strides (or C-contiguity) and devices it has
validated before (all that validation reads), so a repeated call costs
fewer microseconds.  Checked
here on the CPU with stand-ins for CuPy arrays: the checks are skipped only
for a layout seen before, any change of layout is validated again, and NumPy
arguments are validated on every call.
"""

import sys
import types

import numpy as np
import pytest

import numba_mamba.scan as api
from cuda_kernels._common import storage_of


class FakeCupyArray:
    """What validation reads of a CuPy array, over a NumPy array."""

    __module__ = "cupy._fake"  # is_cupy_array: a type of CuPy's ...
    __cuda_array_interface__ = {}  # ... with the CUDA array interface

    def __init__(self, a, device=0):
        self.a = a
        self.data = types.SimpleNamespace(device_id=device, ptr=a.__array_interface__["data"][0])

    shape = property(lambda self: self.a.shape)
    dtype = property(lambda self: self.a.dtype)
    strides = property(lambda self: self.a.strides)
    _c_contiguous = property(lambda self: self.a.flags.c_contiguous)
    ndim = property(lambda self: self.a.ndim)
    flags = property(lambda self: self.a.flags)

    def __getitem__(self, index):
        return FakeCupyArray(self.a[index], self.data.device_id)


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CuPy module and GPU backend stand-in; counts the full validations."""
    cupy = types.ModuleType("cupy")
    cupy.ascontiguousarray = lambda x, dtype=None: FakeCupyArray(
        np.ascontiguousarray(x.a, dtype=dtype), x.data.device_id)
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    backend = types.SimpleNamespace(scan_states=types.SimpleNamespace(DIRECT_HALF=True,
                                                                      storage_of=storage_of),
                                    choose_engine=lambda Bt, Dc, N: "blocks")
    monkeypatch.setattr(api, "_gpu_backend", lambda: backend)
    monkeypatch.setattr(api, "_VALIDATED", {})
    counted = {"full": 0}
    namespace = api.array_namespace

    def counting(**arrays):
        counted["full"] += 1
        return namespace(**arrays)

    monkeypatch.setattr(api, "array_namespace", counting)
    return counted


def _args(rng, Bt=2, Dc=3, N=4, L=5, wrap=FakeCupyArray, **changes):
    kw = dict(u=rng.standard_normal((Bt, Dc, L)), delta=rng.standard_normal((Bt, Dc, L)),
              A=-rng.uniform(0.5, 1, (Dc, N)), B=rng.standard_normal((Bt, N, L)),
              C=rng.standard_normal((Bt, 1, N, L)), D=rng.standard_normal(Dc), z=None,
              delta_bias=rng.standard_normal(Dc), initial_state=None)
    kw = {k: None if v is None else v.astype(np.float32) for k, v in kw.items()}
    kw.update(changes)
    return {k: v if v is None or not isinstance(v, np.ndarray) else wrap(v)
            for k, v in kw.items()}


def _prepare(kw):
    return api._prepare(kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], kw["D"], kw["z"],
                        kw["delta_bias"], True, kw["initial_state"])


def test_a_layout_validated_before_skips_the_checks_and_gives_the_same_result(fake_gpu):
    rng = np.random.default_rng(0)
    first = _prepare(_args(rng))
    assert fake_gpu["full"] == 1 and len(api._VALIDATED) == 1
    kw = _args(rng)  # new values, same layout
    again = _prepare(kw)
    assert fake_gpu["full"] == 1  # not validated again
    xp, backend, canon, given, ftype, dout_dtype = again
    assert (xp, backend, ftype, dout_dtype) == (first[0], first[1], first[4], first[5])
    assert canon[0] is kw["u"] and canon[2] is kw["A"] and canon[5] is kw["D"]
    assert canon[3].shape == (2, 1, 4, 5) and canon[3].a.base is kw["B"].a  # one group, a view
    assert canon[8] is True and canon[6] is None and given["B"] is kw["B"]
    for a, b in zip(first[2], canon):
        assert (a is None) == (b is None) and getattr(a, "shape", 0) == getattr(b, "shape", 0)


@pytest.mark.parametrize("change,error", [
    (dict(B=np.zeros((2, 4, 6), np.float32)), "B must have shape"),
    (dict(A=np.zeros((3, 5), np.float32)), "B must have shape"),  # N from A
    (dict(D=np.zeros(4, np.float32)), "D must have shape"),
    (dict(u=np.zeros((2, 3, 5), np.int32)), "u must have dtype"),
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
    canon = _prepare(_args(rng, u=u))[2]
    assert fake_gpu["full"] == 2 and canon[0].a.flags.c_contiguous  # copied to C order
    kw = _args(rng)
    kw["A"] = FakeCupyArray(kw["A"].a, device=1)
    with pytest.raises(TypeError, match="one device"):
        _prepare(kw)
    assert fake_gpu["full"] == 3 and len(api._VALIDATED) == 2


def test_c_contiguous_arrays_share_a_layout_whatever_their_strides_on_a_length_1_axis(fake_gpu):
    rng = np.random.default_rng(4)
    _prepare(_args(rng, Bt=1))
    u = rng.standard_normal((1, 3, 5)).astype(np.float32)
    odd = np.lib.stride_tricks.as_strided(u, u.shape, (7, 20, 4))  # (axis 0 has one element)
    assert odd.flags.c_contiguous and odd.strides != u.strides
    canon = _prepare(_args(rng, Bt=1, u=odd))[2]
    assert fake_gpu["full"] == 1 and len(api._VALIDATED) == 1  # (the layout seen before)
    assert canon[0].a is odd  # (not copied: the kernels index it by its shape)


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
