"""The public scan's replays on the GPU: a call of a layout recorded before is
repeated on the new arrays' data pointers (``numba_mamba.scan._REPLAYS``,
``cuda_kernels._common.record``) and gives, to the bit, what the full path
(validation, canonical forms, launch arguments) gives on the same arrays.
"""

import numpy as np
import pytest

import numba_mamba as nm
from numba_mamba import scan as api
from tests.gpu import gpu_module
from tests.scan_cases import HALF_UNIT_ROUNDOFF, half_dtype, make_inputs

cupy, _HAVE_GPU, pytestmark = gpu_module()


def _dtype(name):
    if name == "bfloat16":
        pytest.importorskip("ml_dtypes")
    dtype = half_dtype(name) if name in ("float16", "bfloat16") else np.dtype(name)
    try:
        cupy.asarray(np.zeros(2, dtype=dtype))
    except Exception as exc:  # CuPy without bfloat16 arrays
        pytest.skip(f"this CuPy has no {name} arrays: {exc}")
    return dtype


CASES = [  # (Bt, Dc, N, L, dtype, make_inputs options): both engines, split sequences, half I/O
    (1, 4, 4, 16, "float32", dict(D=True, z=True, delta_bias=True, softplus=True)),
    (2, 3, 5, 300, "float64", dict(B_kind="const", C_kind="grouped", G=3, initial_state=True)),
    (2, 1024, 16, 1100, "float32", dict(D=True, z=True, delta_bias=True, softplus=True)),
    (1, 512, 32, 700, "float32", dict(B_kind="grouped", G=2, initial_state=True, D=True)),
    (2, 1024, 16, 600, "bfloat16", dict(D=True, z=True, delta_bias=True, softplus=True)),
    (2, 1024, 16, 600, "float16", dict(z=True, initial_state=True)),
]


def _device_inputs(rng, Bt, Dc, N, L, dtype, options):
    host = make_inputs(rng, Bt=Bt, Dc=Dc, L=L, N=N, dtype=np.float64, **options)
    per_step = ("u", "delta", "z", "B", "C")
    out = {}
    for k, v in host.items():
        if not isinstance(v, np.ndarray):
            out[k] = v
        elif dtype.itemsize == 2 and (k not in per_step or v.ndim == 2):
            out[k] = cupy.asarray(v.astype(np.float32))  # (half I/O: the rest float32)
        else:
            out[k] = cupy.asarray(v.astype(dtype))
    return out


def _start(monkeypatch, case, seed):
    """A case's sizes, dtype and random generator, with no replays recorded."""
    Bt, Dc, N, L, name, options = case
    monkeypatch.setattr(api, "_REPLAYS", {})
    return Bt, Dc, N, L, name, options, _dtype(name), np.random.default_rng(Bt * Dc + L + seed)


def _full_path(monkeypatch, kw, last):
    with monkeypatch.context() as mp:
        mp.setattr(api, "_REPLAYS", {})
        mp.setattr(api, "_remember_replay", lambda key, replay: None)  # never replayed
        return nm.selective_scan(**kw, return_last_state=last)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[:4]}-{c[4]}")
@pytest.mark.parametrize("last", [False, True], ids=["out", "out+last"])
def test_gpu_replayed_call_gives_the_full_paths_result_to_the_bit(monkeypatch, case, last):
    Bt, Dc, N, L, name, options, dtype, rng = _start(monkeypatch, case, 0)
    first = _device_inputs(rng, Bt, Dc, N, L, dtype, options)
    nm.selective_scan(**first, return_last_state=last)  # recorded
    (replay,) = api._REPLAYS.values()
    assert replay is not None
    backend = api._gpu_backend()
    calls = []
    monkeypatch.setattr(backend.scan_states, "scan_forward",
                        lambda *a, **k: calls.append(1))  # (not reached by a replay)
    replay_key = api._replay_key
    monkeypatch.setattr(api, "_replay_key",
                        lambda values, *flags: (key, replay_key(values, *flags)[1]))
    (key,) = api._REPLAYS  # (the settings now include the spy: keep the recorded key)
    inputs = [_device_inputs(rng, Bt, Dc, N, L, dtype, options) for _ in range(2)]
    replayed = [nm.selective_scan(**kw, return_last_state=last) for kw in inputs]
    assert calls == [] and len(api._REPLAYS) == 1
    monkeypatch.undo()
    for kw, got in zip(inputs, replayed):  # (the first result after the second call too)
        want = _full_path(monkeypatch, kw, last)
        got, want = (got, want) if last else ((got,), (want,))
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and g.shape == w.shape
            assert g.flags.c_contiguous
            np.testing.assert_array_equal(g.get().astype(np.float64),
                                          w.get().astype(np.float64))


def test_gpu_calls_with_copies_or_aliased_arrays_are_not_replayed_but_right(monkeypatch):
    rng = np.random.default_rng(5)
    monkeypatch.setattr(api, "_REPLAYS", {})
    kw = _device_inputs(rng, 1, 4, 4, 40, np.dtype(np.float32), dict(D=True))
    wide = cupy.asarray(rng.standard_normal((1, 4, 80)).astype(np.float32))
    strided = dict(kw, u=wide[..., ::2])  # copied to C order: not replayable
    same = dict(kw, C=kw["B"])  # one array as B and C: not replayable
    for args in (strided, same, strided, same):
        out = nm.selective_scan(**args)
        want = nm.reference.selective_scan(**{k: v.get() if hasattr(v, "get") else v
                                              for k, v in args.items()})
        np.testing.assert_allclose(out.get(), want, rtol=1e-4, atol=1e-5)
    assert list(api._REPLAYS.values()) == [None, None]


def test_gpu_replay_runs_on_the_current_stream(monkeypatch):
    rng = np.random.default_rng(6)
    monkeypatch.setattr(api, "_REPLAYS", {})
    kw = _device_inputs(rng, 2, 1024, 16, 2000, np.dtype(np.float32), dict(z=True))
    nm.selective_scan(**kw)  # recorded on the default stream
    want = _full_path(monkeypatch, kw, False).get()
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        for _ in range(3):
            out = nm.selective_scan(**kw)  # replayed on ``stream``
        host = cupy.asnumpy(out, stream=stream)  # (ordered after the kernels on ``stream``)
    stream.synchronize()
    np.testing.assert_array_equal(host, want)


def test_gpu_replayed_results_are_cupy_arrays_made_by_cupys_base_class(monkeypatch):
    """The installed CuPy passes the check for making kept arrays without its
    Python ``__new__`` (``_common._ndarray_new_init``), and what a replay
    makes that way is an ordinary array of its own allocation."""
    from cuda_kernels import _common

    assert _common._ndarray_new_init(cupy) is not None
    rng = np.random.default_rng(7)
    monkeypatch.setattr(api, "_REPLAYS", {})
    kw = _device_inputs(rng, 1, 4, 4, 16, np.dtype(np.float32), dict(D=True, z=True))
    first = nm.selective_scan(**kw)
    (replay,) = api._REPLAYS.values()
    assert "new(ndarray)" in replay.source
    out = nm.selective_scan(**kw)
    assert type(out) is type(first) is cupy.ndarray and out.base is None
    assert out.flags.c_contiguous and out.flags.owndata and out.strides == first.strides
    assert out.data.ptr != first.data.ptr and out.data.mem.size >= out.nbytes
    np.testing.assert_array_equal((out * 2).get(), 2 * first.get())
    del out  # (its allocation goes back to CuPy's pool)


ATOMIC_SUMS = ("dA", "dB", "dC", "dD", "ddelta_bias")  # summed with atomics: order varies


def _vjp_full_path(monkeypatch, kw, dout, dlast):
    with monkeypatch.context() as mp:
        mp.setattr(api, "_REPLAYS", {})
        mp.setattr(api, "_remember_replay", lambda key, replay: None)  # never replayed
        out, last, backward = nm.selective_scan_vjp(**kw)
        return out, last, backward(dout, dlast)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[:4]}-{c[4]}")
@pytest.mark.parametrize("with_dlast", [False, True], ids=["dout", "dout+dlast"])
def test_gpu_replayed_vjp_and_backward_give_the_full_paths_results(monkeypatch, case,
                                                                     with_dlast):
    Bt, Dc, N, L, name, options, dtype, rng = _start(monkeypatch, case, 1)

    def grads_inputs():
        dout = cupy.asarray(rng.standard_normal((Bt, Dc, L)).astype(dtype))
        dlast = cupy.asarray(rng.standard_normal((Bt, Dc, N)).astype(
            np.float64 if dtype == np.float64 else np.float32)) if with_dlast else None
        return dout, dlast

    kw = _device_inputs(rng, Bt, Dc, N, L, dtype, options)
    backward = nm.selective_scan_vjp(**kw)[2]
    backward(*grads_inputs())  # both recorded
    forward_replay, backward_replay = api._REPLAYS.values()
    assert forward_replay is not None and backward_replay is not None
    prepared = []
    prepare = api._prepare
    monkeypatch.setattr(api, "_prepare", lambda *a: prepared.append(1) or prepare(*a))
    calls = [(_device_inputs(rng, Bt, Dc, N, L, dtype, options), *grads_inputs())
             for _ in range(2)]
    got = []
    for kw, dout, dlast in calls:
        out, last, backward = nm.selective_scan_vjp(**kw)
        got.append((out, last, backward(dout, dlast)))
    assert len(prepared) == 0 and len(api._REPLAYS) == 2
    monkeypatch.undo()
    for (kw, dout, dlast), (out, last, grads) in zip(calls, got):
        want_out, want_last, want = _vjp_full_path(monkeypatch, kw, dout, dlast)
        np.testing.assert_array_equal(out.get().astype(np.float64),
                                      want_out.get().astype(np.float64))
        np.testing.assert_array_equal(last.get(), want_last.get())
        for field in want._fields:
            g, w = getattr(grads, field), getattr(want, field)
            if w is None:
                assert g is None, field
                continue
            assert g.dtype == w.dtype and g.shape == w.shape, field
            g, w = g.get().astype(np.float64), w.get().astype(np.float64)
            if field in ATOMIC_SUMS:
                # a few units in the last place of the largest sums; a sum returned in
                # a half dtype (B, C) is rounded after that, which may flip its last bit
                eps = np.finfo(np.float64 if dtype == np.float64 else np.float32).eps
                half = getattr(grads, field).dtype.name
                rtol = 2 * HALF_UNIT_ROUNDOFF[half] if half in HALF_UNIT_ROUNDOFF else 0
                np.testing.assert_allclose(g, w, rtol=rtol, atol=64 * eps * np.abs(w).max(),
                                           err_msg=field)
            else:
                np.testing.assert_array_equal(g, w, err_msg=field)


OUT_CASES = CASES + [  # (the 'blocks' engine computes float16 in float32: copied into out)
    (1, 4, 4, 16, "float16", dict(D=True, z=True, delta_bias=True, softplus=True)),
]


@pytest.mark.parametrize("case", OUT_CASES, ids=lambda c: f"{c[:4]}-{c[4]}")
@pytest.mark.parametrize("last", [False, True], ids=["out", "out+last"])
def test_gpu_out_is_written_with_the_full_paths_result_replayed_or_not(monkeypatch, case,
                                                                        last):
    Bt, Dc, N, L, name, options, dtype, rng = _start(monkeypatch, case, 2)
    inputs = [_device_inputs(rng, Bt, Dc, N, L, dtype, options) for _ in range(3)]
    outs = [cupy.full((Bt, Dc, L), np.nan, dtype) for _ in inputs]
    got = [nm.selective_scan(**kw, return_last_state=last, out=o)  # recorded, then replayed
           for kw, o in zip(inputs, outs)]
    (replay,) = api._REPLAYS.values()
    # (float16 on the 'blocks' engine: computed in float32 and copied, never replayed)
    copied = name == "float16" and api._gpu_backend().choose_engine(Bt, Dc, N) == "blocks"
    assert (replay is None) == copied
    for kw, o, g in zip(inputs, outs, got):
        want = _full_path(monkeypatch, kw, last)
        g, want = (g, want) if last else ((g,), (want,))
        assert g[0] is o
        for a, w in zip(g, want):
            assert a.dtype == w.dtype and a.shape == w.shape
            np.testing.assert_array_equal(a.get().astype(np.float64),
                                          w.get().astype(np.float64))


def test_gpu_out_sharing_memory_with_an_input_is_refused_replayed_or_not(monkeypatch):
    Bt, Dc, N, L, name, options = CASES[0]
    rng = np.random.default_rng(7)
    monkeypatch.setattr(api, "_REPLAYS", {})
    kw = _device_inputs(rng, Bt, Dc, N, L, np.dtype(np.float32), options)
    nm.selective_scan(**kw, out=cupy.empty_like(kw["u"]))  # recorded
    (replay,) = api._REPLAYS.values()
    assert replay is not None
    kw = _device_inputs(rng, Bt, Dc, N, L, np.dtype(np.float32), options)
    both = cupy.zeros(2 * kw["z"].size, cupy.float32)
    kw["z"] = both[:kw["z"].size].reshape(kw["z"].shape)
    kw["z"][...] = 0.5
    over = both[5:5 + kw["z"].size].reshape(kw["z"].shape)  # (over most of z)
    for out, arg in ((kw["u"], "u"), (over, "z")):
        before = {k: v.copy() for k, v in kw.items() if isinstance(v, cupy.ndarray)}
        for replayed in (True, False):
            if not replayed:
                api._REPLAYS.clear()
            with pytest.raises(ValueError, match=f"^out must not share memory with {arg} "):
                nm.selective_scan(**kw, out=out)
            for k, v in before.items():  # (no kernel ran)
                np.testing.assert_array_equal(kw[k].get(), v.get())


def test_gpu_out_of_another_kind_dtype_or_layout_is_refused():
    Bt, Dc, N, L, name, options = CASES[0]
    kw = _device_inputs(np.random.default_rng(8), Bt, Dc, N, L, np.dtype(np.float32), options)
    shape = kw["u"].shape
    for out, error, pattern in [
            (np.empty(shape, np.float32), TypeError, r"^out must be a cupy\.ndarray like u"),
            (cupy.empty(shape, cupy.float64), TypeError, r"^out must have u's dtype float32"),
            (cupy.empty(shape[::-1], cupy.float32).T, ValueError, r"^out must be C-contiguous"),
            (cupy.empty(shape[:2] + (L - 1,), cupy.float32), ValueError,
             r"^out must have shape \(1, 4, 16\) like u")]:
        with pytest.raises(error, match=pattern):
            nm.selective_scan(**kw, out=out)
