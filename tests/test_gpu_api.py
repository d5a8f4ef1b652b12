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
from tests.scan_cases import TOLERANCES, assert_close, make_inputs

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
