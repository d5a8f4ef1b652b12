"""The public API on CuPy arrays (GPU): the grid against the float64 reference.

Runs only where CuPy sees a CUDA GPU (marker ``gpu``).  Inputs of every dtype
are drawn in float64, rounded to the dtype under test, and the reference runs
in float64 on the rounded values, so the comparison measures the kernel's
arithmetic, not the rounding of the inputs.
"""

import itertools

import numpy as np
import pytest

import numba_mamba as nm
from numba_mamba import reference
from tests.gpu import gpu_module
from tests.scan_cases import (HALF_UNIT_ROUNDOFF, TOLERANCES, assert_close, half_dtype,
                              make_inputs)

cupy, _HAVE_GPU, pytestmark = gpu_module()

# Half precisions: the reference project's own tolerances for its float16 and
# bfloat16 tests (out), and a half-rounding allowance for the gradients, which
# are returned in the half dtype.
HALF_TOLERANCES = {
    "float16": dict(out=(3e-3, 5e-3), grads=(5e-3, 1e-2)),
    "bfloat16": dict(out=(3e-2, 5e-2), grads=(5e-2, 1e-1)),
}


def _dtype(name):
    if name == "bfloat16":
        ml_dtypes = pytest.importorskip("ml_dtypes")
        dt = np.dtype(ml_dtypes.bfloat16)
        try:
            cupy.asarray(np.zeros(2, dtype=dt))
        except Exception as exc:  # CuPy without bfloat16 arrays
            pytest.skip(f"this CuPy has no bfloat16 arrays: {exc}")
        return dt
    return np.dtype(name)


def _tol(dtype, kind):
    if dtype.name in HALF_TOLERANCES:
        return HALF_TOLERANCES[dtype.name]["out" if kind == "out" else "grads"]
    return TOLERANCES[dtype][kind]


LENGTHS = [1, 7, 8, 372, 784, 1134, 2048, 4097]
FLAG_SETS = [
    dict(),
    dict(D=True, z=True, delta_bias=True, softplus=True),
    dict(D=True, initial_state=True),
    dict(z=True, softplus=True, initial_state=True),
]
BC_KINDS = [("var", "var"), ("const", "const"), ("grouped", "var"), ("const", "grouped")]


def _cases():
    cases = []
    for i, L in enumerate(LENGTHS):
        for j, dtype in enumerate(["float32", "float16", "bfloat16"]):
            flags = FLAG_SETS[(i + j) % len(FLAG_SETS)]
            bc = BC_KINDS[(i + 2 * j) % len(BC_KINDS)]
            cases.append((L, dtype, bc, flags, (i + j) % 2 == 0))
    # every flag set with every B/C kind at a multi-chunk length, float32
    for flags, bc in itertools.product(FLAG_SETS, BC_KINDS):
        cases.append((2500, "float32", bc, flags, True))
    return cases


def _id(case):
    L, dtype, bc, flags, dlast = case
    return f"L{L}-{dtype}-{bc[0]}{bc[1]}-{'+'.join(flags) or 'plain'}-{'dlast' if dlast else 'nodlast'}"


@pytest.mark.parametrize("case", _cases(), ids=_id)
def test_gpu_matches_reference(case):
    L, dtype_name, (B_kind, C_kind), flags, with_dlast = case
    dtype = _dtype(dtype_name)
    rng = np.random.default_rng(L)
    args64 = make_inputs(rng, Bt=2, Dc=8, L=L, N=4, dtype=np.float64, B_kind=B_kind,
                         C_kind=C_kind, G=2, **flags)
    host = {k: (v.astype(dtype) if isinstance(v, np.ndarray) else v) for k, v in args64.items()}
    exact = {k: (v.astype(np.float64) if isinstance(v, np.ndarray) else v) for k, v in host.items()}
    dev = {k: (cupy.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in host.items()}

    out, last, backward = nm.selective_scan_vjp(**dev)
    assert isinstance(out, cupy.ndarray) and out.dtype == dtype
    rout, rlast, rbackward = reference.selective_scan_vjp(**exact)
    assert_close("out", out.get(), rout, *_tol(dtype, "out"))
    assert_close("last_state", last.get(), rlast, *_tol(dtype, "out"))

    dout = rng.standard_normal(out.shape).astype(dtype)
    dlast = rng.standard_normal(last.shape).astype(np.float32) if with_dlast else None
    grads = backward(cupy.asarray(dout), None if dlast is None else cupy.asarray(dlast))
    want = rbackward(dout.astype(np.float64), dlast)
    for field in grads._fields:
        g, w = getattr(grads, field), getattr(want, field)
        if w is None:
            assert g is None, field
            continue
        assert isinstance(g, cupy.ndarray) and g.dtype == host[field[1:]].dtype, field
        kind = {"du": "du", "dz": "du",
                "ddelta": "ddelta_z" if flags.get("z") else "ddelta"}.get(field, "weights")
        assert_close(field, g.get(), w, *_tol(dtype, kind))


def test_gpu_float64_matches_reference_tightly():
    rng = np.random.default_rng(2)
    args = make_inputs(rng, Bt=2, Dc=4, L=3000, N=8, dtype=np.float64, B_kind="grouped",
                       C_kind="var", D=True, z=True, delta_bias=True, softplus=True,
                       initial_state=True)
    dev = {k: (cupy.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in args.items()}
    out, last, backward = nm.selective_scan_vjp(**dev)
    rout, rlast, rbackward = reference.selective_scan_vjp(**args)
    tol = TOLERANCES[np.dtype(np.float64)]
    assert_close("out", out.get(), rout, *tol["out"])
    assert_close("last_state", last.get(), rlast, *tol["out"])
    dout = rng.standard_normal(out.shape)
    dlast = rng.standard_normal(last.shape)
    grads = backward(cupy.asarray(dout), cupy.asarray(dlast))
    want = rbackward(dout, dlast)
    for field in grads._fields:
        assert_close(field, getattr(grads, field).get(), getattr(want, field), *tol["weights"])


def test_gpu_runs_on_current_stream_and_matches_cpu():
    rng = np.random.default_rng(3)
    args = make_inputs(rng, Bt=3, Dc=16, L=5000, N=16, dtype=np.float32, D=True, z=True,
                       delta_bias=True, softplus=True)
    cpu = nm.selective_scan(**args)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        dev = {k: (cupy.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in args.items()}
        out = nm.selective_scan(**dev)
        host = cupy.asnumpy(out, stream=stream)
    stream.synchronize()
    assert_close("gpu vs cpu", host, cpu, *TOLERANCES[np.dtype(np.float32)]["out"])


def test_mixing_numpy_and_cupy_is_a_type_error_naming_both():
    args = make_inputs(np.random.default_rng(0), Bt=1, Dc=2, L=5, N=2, dtype=np.float32)
    mixed = dict(args, u=cupy.asarray(args["u"]), C=cupy.asarray(args["C"]))
    with pytest.raises(TypeError, match=r"u, C are CuPy arrays on the GPU but delta, A, B are "
                                        r"on the host"):
        nm.selective_scan(**mixed)
    dev = {k: (cupy.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in args.items()}
    out, last, backward = nm.selective_scan_vjp(**dev)
    with pytest.raises(TypeError, match="dout is on the host"):
        backward(out.get())


def test_gpu_non_contiguous_inputs_read_correctly():
    rng = np.random.default_rng(4)
    args = make_inputs(rng, Bt=2, Dc=4, L=300, N=3, dtype=np.float32, D=True, z=True)
    dev = {k: (cupy.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in args.items()}
    strided = dict(dev, u=cupy.asfortranarray(dev["u"]),
                   delta=cupy.repeat(dev["delta"], 2, axis=-1)[..., ::2])
    assert not strided["delta"].flags.c_contiguous
    np.testing.assert_array_equal(nm.selective_scan(**strided).get(),
                                  nm.selective_scan(**dev).get())


@pytest.mark.parametrize("Bt,Dc", [(1, 4), (2, 1024)], ids=["blocks", "states"])
def test_gpu_non_finite_A_shows_in_the_results_without_a_check(Bt, Dc):
    # On the GPU A is not checked (a check would wait for the device): a NaN
    # in A makes that channel's output NaN; -inf forgets the state at once
    # (the limit of a very negative A) and makes the delta gradient NaN.
    rng = np.random.default_rng(5)
    args = make_inputs(rng, Bt=Bt, Dc=Dc, L=40, N=16, dtype=np.float32, D=True, z=True,
                       delta_bias=True, softplus=True)
    dev = {k: (cupy.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in args.items()}
    A = dev["A"].copy()
    A[1, 3] = cupy.nan
    out = nm.selective_scan(**dict(dev, A=A)).get()
    assert np.isnan(out[:, 1]).all()
    assert np.isfinite(np.delete(out, 1, axis=1)).all()

    A = dev["A"].copy()
    A[1, 3] = -cupy.inf
    out, _, backward = nm.selective_scan_vjp(**dict(dev, A=A))
    limit = dict(args, A=args["A"].copy())
    limit["A"][1, 3] = -1e30
    assert_close("out", out.get(), nm.selective_scan(**limit),
                 *TOLERANCES[np.dtype(np.float32)]["out"])
    grads = backward(cupy.ones_like(out))
    assert np.isnan(grads.ddelta.get()[:, 1]).any()


# ------------------------------------------- repeated layouts (cached validation), out=
REPEAT_CASES = [  # (Bt, Dc, N, L, dtype, make_inputs options): both engines, split sequences,
    # half I/O
    (1, 4, 4, 16, "float32", dict(D=True, z=True, delta_bias=True, softplus=True)),
    (2, 3, 5, 300, "float64", dict(B_kind="const", C_kind="grouped", G=3, initial_state=True)),
    (2, 1024, 16, 1100, "float32", dict(D=True, z=True, delta_bias=True, softplus=True)),
    (1, 512, 32, 700, "float32", dict(B_kind="grouped", G=2, initial_state=True, D=True)),
    (2, 1024, 16, 600, "bfloat16", dict(D=True, z=True, delta_bias=True, softplus=True)),
    (2, 1024, 16, 600, "float16", dict(z=True, initial_state=True)),
    # (the 'blocks' engine computes float16 in float32: copied into a given out)
    (1, 4, 4, 16, "float16", dict(D=True, z=True, delta_bias=True, softplus=True)),
]
ATOMIC_SUMS = ("dA", "dB", "dC", "dD", "ddelta_bias")  # summed with atomics: order varies


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


def _repeat_start(monkeypatch, case, seed):
    """A case's sizes, dtype and inputs of 3 calls, with no layout validated yet."""
    from numba_mamba import scan as api

    Bt, Dc, N, L, name, options = case
    monkeypatch.setattr(api, "_VALIDATED", {})
    dtype = half_dtype(name) if name in ("float16", "bfloat16") else np.dtype(name)
    if name == "bfloat16":
        _dtype(name)  # (skips where CuPy has no bfloat16 arrays)
    rng = np.random.default_rng(Bt * Dc + L + seed)
    return (Bt, Dc, N, L, dtype, rng,
            [_device_inputs(rng, Bt, Dc, N, L, dtype, options) for _ in range(3)])


def _first_seen(monkeypatch, fn):
    """``fn()`` with no layout validated before (the full validation)."""
    from numba_mamba import scan as api

    with monkeypatch.context() as mp:
        mp.setattr(api, "_VALIDATED", {})
        return fn()


def _equal(got, want, name=""):
    assert got.dtype == want.dtype and got.shape == want.shape, name
    np.testing.assert_array_equal(got.get().astype(np.float64), want.get().astype(np.float64),
                                  err_msg=name)


@pytest.mark.parametrize("case", REPEAT_CASES, ids=lambda c: f"{c[:4]}-{c[4]}")
@pytest.mark.parametrize("out", [False, True], ids=["new", "out="])
def test_gpu_repeated_layout_gives_the_first_calls_result_to_the_bit(monkeypatch, case, out):
    """Calls of a layout validated before (checks skipped) give, to the bit, what
    a call of a layout never seen gives; a given ``out`` is written and returned."""
    from numba_mamba import scan as api

    Bt, Dc, N, L, dtype, rng, inputs = _repeat_start(monkeypatch, case, 0)
    outs = [cupy.full((Bt, Dc, L), np.nan, dtype) if out else None for _ in inputs]
    got = [nm.selective_scan(**kw, return_last_state=True, out=o) for kw, o in zip(inputs, outs)]
    assert len(api._VALIDATED) == 1
    for kw, o, (y, last) in zip(inputs, outs, got):
        want_y, want_last = _first_seen(
            monkeypatch, lambda: nm.selective_scan(**kw, return_last_state=True))
        assert o is None or y is o
        assert y.flags.c_contiguous
        _equal(y, want_y, "out")
        _equal(last, want_last, "last_state")


@pytest.mark.parametrize("case", REPEAT_CASES[:6], ids=lambda c: f"{c[:4]}-{c[4]}")
def test_gpu_repeated_layout_vjp_and_backward_give_the_first_calls_results(monkeypatch,
                                                                           case):
    Bt, Dc, N, L, dtype, rng, inputs = _repeat_start(monkeypatch, case, 1)
    f = np.float64 if dtype == np.float64 else np.float32
    douts = [(cupy.asarray(rng.standard_normal((Bt, Dc, L)).astype(dtype)),
              cupy.asarray(rng.standard_normal((Bt, Dc, N)).astype(f))) for _ in inputs]

    def run(kw, dout, dlast):
        out, last, backward = nm.selective_scan_vjp(**kw)
        return out, last, backward(dout, dlast)

    got = [run(kw, *d) for kw, d in zip(inputs, douts)]
    for kw, d, (out, last, grads) in zip(inputs, douts, got):
        want_out, want_last, want = _first_seen(monkeypatch, lambda: run(kw, *d))
        _equal(out, want_out, "out")
        _equal(last, want_last, "last_state")
        for field in want._fields:
            g, w = getattr(grads, field), getattr(want, field)
            if w is None:
                assert g is None, field
                continue
            assert g.dtype == w.dtype and g.shape == w.shape, field
            if field not in ATOMIC_SUMS:
                _equal(g, w, field)
                continue
            # a few units in the last place of the largest sums; a sum returned in a half
            # dtype (B, C) is rounded after that, which may flip its last bit
            g, w = g.get().astype(np.float64), w.get().astype(np.float64)
            eps = np.finfo(f).eps
            half = getattr(grads, field).dtype.name
            rtol = 2 * HALF_UNIT_ROUNDOFF[half] if half in HALF_UNIT_ROUNDOFF else 0
            np.testing.assert_allclose(g, w, rtol=rtol, atol=64 * eps * np.abs(w).max(),
                                       err_msg=field)


def test_gpu_repeated_calls_with_copies_or_aliased_arrays_are_right(monkeypatch):
    from numba_mamba import scan as api

    rng = np.random.default_rng(5)
    monkeypatch.setattr(api, "_VALIDATED", {})
    kw = _device_inputs(rng, 1, 4, 4, 40, np.dtype(np.float32), dict(D=True))
    wide = cupy.asarray(rng.standard_normal((1, 4, 80)).astype(np.float32))
    strided = dict(kw, u=wide[..., ::2])  # copied to C order
    same = dict(kw, C=kw["B"])  # one array as B and C
    for args in (strided, same, strided, same):
        out = nm.selective_scan(**args)
        want = reference.selective_scan(**{k: v.get() if hasattr(v, "get") else v
                                           for k, v in args.items()})
        np.testing.assert_allclose(out.get(), want, rtol=1e-4, atol=1e-5)
    assert len(api._VALIDATED) == 2


def test_gpu_out_sharing_memory_with_an_input_is_refused_on_a_known_layout(monkeypatch):
    from numba_mamba import scan as api

    Bt, Dc, N, L, _, options = REPEAT_CASES[0]
    rng = np.random.default_rng(7)
    kw = _device_inputs(rng, Bt, Dc, N, L, np.dtype(np.float32), options)
    both = cupy.zeros(2 * kw["z"].size, cupy.float32)
    kw["z"] = both[:kw["z"].size].reshape(kw["z"].shape)
    kw["z"][...] = 0.5
    over = both[5:5 + kw["z"].size].reshape(kw["z"].shape)  # (over most of z)
    for out, arg in ((kw["u"], "u"), (over, "z")):
        before = {k: v.copy() for k, v in kw.items() if isinstance(v, cupy.ndarray)}
        for known in (False, True):
            if not known:
                monkeypatch.setattr(api, "_VALIDATED", {})
            nm.selective_scan(**kw, out=cupy.empty_like(kw["u"]))  # (the layout now known)
            with pytest.raises(ValueError, match=f"^out must not share memory with {arg} "):
                nm.selective_scan(**kw, out=out)
            for k, v in before.items():  # (no kernel ran)
                np.testing.assert_array_equal(kw[k].get(), v.get())


def test_gpu_out_of_another_kind_dtype_or_layout_is_refused():
    Bt, Dc, N, L, _, options = REPEAT_CASES[0]
    kw = _device_inputs(np.random.default_rng(8), Bt, Dc, N, L, np.dtype(np.float32), options)
    shape = kw["u"].shape
    for out, error, pattern in [
            (np.empty(shape, np.float32), TypeError, r"^out must be a cupy\.ndarray like u"),
            (cupy.empty(shape, cupy.float64), TypeError, r"^out must have u's dtype float32"),
            (cupy.empty(shape[::-1], cupy.float32).T, ValueError, r"^out must be C-contiguous"),
            (cupy.empty(shape[:2] + (L - 1,), cupy.float32), ValueError,
             r"^out must have shape \(1, 4, 16\) like u")]:
        for _ in range(2):  # (unknown, then known layout of the arguments)
            with pytest.raises(error, match=pattern):
                nm.selective_scan(**kw, out=out)


def _count_state_engine_forwards(monkeypatch):
    """A list that grows by one item per call of the state engine's launcher."""
    from numba_mamba.cuda_kernels import scan_states

    calls = []
    forward = scan_states.scan_forward

    def spy(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    monkeypatch.setattr(scan_states, "scan_forward", spy)
    return calls


def test_gpu_a_setting_changed_through_the_public_import_is_seen_by_the_api(monkeypatch):
    """``numba_mamba.cuda_kernels.settings.settings`` is the object the API's kernels
    read: forcing the engine through it changes which engine a call runs."""
    from numba_mamba import scan as api
    from numba_mamba.cuda_kernels.settings import settings

    assert api._gpu_backend().settings is settings
    rng = np.random.default_rng(9)
    kw = _device_inputs(rng, 1, 4, 4, 16, np.dtype(np.float32), dict(D=True))
    calls = _count_state_engine_forwards(monkeypatch)
    with settings.override(engine="blocks"):
        blocks = nm.selective_scan(**kw)
    assert calls == []
    states = nm.selective_scan(**kw)  # ('auto')
    assert calls == [1]
    with settings.override(engine="blocks"):
        assert nm.selective_scan(**kw).shape == blocks.shape and calls == [1]
    np.testing.assert_allclose(states.get(), blocks.get(), rtol=1e-5, atol=1e-6)


def test_gpu_a_layout_seen_before_runs_its_plan_and_follows_the_settings(monkeypatch):
    """From the third call of a layout on, ``selective_scan`` runs the plan the
    state engine worked out for it (no pass through the launchers); every
    call, new data each time, agrees with the CPU, and a change of settings
    is seen by the next call."""
    from numba_mamba import scan as api
    from numba_mamba.cuda_kernels.settings import settings

    monkeypatch.setattr(api, "_VALIDATED", {})
    rng = np.random.default_rng(11)
    options = dict(D=True, z=True, delta_bias=True, softplus=True)
    calls = _count_state_engine_forwards(monkeypatch)

    def check(n_calls):
        kw = _device_inputs(rng, 2, 8, 16, 300, np.dtype(np.float32), options)
        y, last = nm.selective_scan(**kw, return_last_state=True)
        host = {k: v.get() if hasattr(v, "get") else v for k, v in kw.items()}
        want_y, want_last = nm.selective_scan(**host, return_last_state=True)
        np.testing.assert_allclose(y.get(), want_y, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(last.get(), want_last, rtol=1e-4, atol=1e-5)
        assert len(calls) == n_calls

    for n_calls in (1, 2, 2, 2):  # validated, planned, then the plan
        check(n_calls)
    (checked,) = api._VALIDATED.values()
    assert checked.plans[True][1] is not None
    with settings.override(save_every=2):  # (a new generation: planned again)
        for n_calls in (3, 3):
            check(n_calls)
    with settings.override(engine="blocks"):  # (no plan: the blocks engine each call)
        for n_calls in (3, 3):
            check(n_calls)
    for n_calls in (4, 4):  # (back: planned again, then the plan)
        check(n_calls)
