"""Tests of the CPU backend ``numba_mamba._cpu_scan`` against the float64 reference.

The backend is called directly in the canonical layout (C-contiguous arrays of
one dtype, B and C either constant (Dc, N) or (Bt, G, N, L)); the oracle is
:mod:`numba_mamba.reference`, run on float64 copies of the same inputs.
"""

import math

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from numba_mamba import _cpu_scan, reference
from tests.scan_cases import TOLERANCES, assert_close, make_inputs

BACKEND_ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "delta_softplus",
                "initial_state")

# float32: the shared table (the reference project's tolerances).  float64:
# tighter than the contract's rtol = atol = 1e-10, since it holds: over the grid
# below the worst error is about 2e-14 (dA, dB, dD summed over 2 x 4097 steps).
TOL = {
    np.dtype(np.float32): TOLERANCES[np.dtype(np.float32)],
    np.dtype(np.float64): dict(out=(1e-12, 1e-12), du=(1e-12, 1e-12), ddelta=(1e-12, 1e-12),
                               ddelta_z=(1e-12, 1e-12), weights=(1e-12, 1e-12)),
}

# (B kind, C kind, D, z, delta_bias, softplus, initial_state, dlast_state)
COMBOS = [
    ("const", "const", False, False, False, False, False, False),
    ("var", "var", True, True, True, True, True, True),
    ("grouped", "const", True, False, True, False, True, False),
    ("const", "grouped", False, True, False, True, False, True),
    ("var", "grouped", True, False, False, True, True, False),
    ("grouped", "var", False, True, True, False, False, True),
]
SHORT_L = (1, 7, 8)
LONG_L = (372, 784, 1134, 2048, 4097)


def _grid():
    """Every combination at the short lengths, a rotating half of them at the long ones.

    Over the long lengths each combination (so each factor on and off, and each
    kind of B and C) appears at least twice, with the default chunk size of 64
    giving partial last chunks at every long L except 2048.
    """
    cases = [(L, combo) for L in SHORT_L for combo in COMBOS]
    for i, L in enumerate(LONG_L):
        cases += [(L, COMBOS[(i + j) % len(COMBOS)]) for j in (0, 2, 4)]
    return cases


def _case_id(case):
    L, (Bk, Ck, D, z, bias, sp, h0, dlast) = case
    on = [name for name, flag in (("D", D), ("z", z), ("bias", bias), ("softplus", sp),
                                  ("h0", h0), ("dlast", dlast)) if flag]
    return f"L{L}-B{Bk}-C{Ck}" + ("-" + "-".join(on) if on else "")


GRID = _grid()


def _canonical(kwargs):
    """Backend argument tuple: a (Bt, N, L) B or C becomes one group (Bt, 1, N, L)."""
    args = dict(kwargs)
    for name in ("B", "C"):
        if args[name].ndim == 3:
            args[name] = np.ascontiguousarray(args[name][:, None])
    return tuple(args[name] for name in BACKEND_ARGS)


def _float64(kwargs):
    return {k: v.astype(np.float64) if isinstance(v, np.ndarray) else v
            for k, v in kwargs.items()}


def _draw(seed, L, combo, dtype, Bt=2, Dc=4, N=3, G=2):
    """Inputs, upstream gradients and the float64 reference results for one case."""
    Bk, Ck, D, z, bias, sp, h0, dlast = combo
    rng = np.random.default_rng(seed)
    kwargs = make_inputs(rng, Bt=Bt, Dc=Dc, L=L, N=N, dtype=dtype, B_kind=Bk, C_kind=Ck, G=G,
                         D=D, z=z, delta_bias=bias, softplus=sp, initial_state=h0)
    if bias and not sp:
        # make_inputs draws the bias in [-1, 1] for softplus; without it the step
        # delta + bias could turn negative and exp(delta A) grow without bound
        # over a long sequence, so keep the biased step positive here
        kwargs["delta_bias"] = rng.uniform(0.0, 0.3, Dc).astype(dtype)
    dout = rng.standard_normal((Bt, Dc, L)).astype(dtype)
    dlast_state = rng.standard_normal((Bt, Dc, N)).astype(dtype) if dlast else None
    return kwargs, dout, dlast_state


def _reference(kwargs, dout, dlast_state):
    out, last, backward = reference.selective_scan_vjp(**_float64(kwargs))
    grads = backward(dout.astype(np.float64),
                     None if dlast_state is None else dlast_state.astype(np.float64))
    return out, last, grads


def _run_backend(kwargs, dout, dlast_state, chunk_size=_cpu_scan.DEFAULT_CHUNK_SIZE,
                 n_slices=None):
    args = _canonical(kwargs)
    out, last, saved = _cpu_scan.scan_forward(*args, chunk_size=chunk_size)
    grads = _cpu_scan.scan_backward(dout, dlast_state, *args, saved, n_slices=n_slices)
    return out, last, grads


def _check_against_reference(kwargs, dout, dlast_state, got, dtype):
    out, last, grads = got
    ref_out, ref_last, ref = _reference(kwargs, dout, dlast_state)
    tol = TOL[np.dtype(dtype)]
    has_z = kwargs["z"] is not None
    assert out.dtype == dtype and last.dtype == dtype
    assert_close("out", out, ref_out, *tol["out"])
    assert_close("last_state", last, ref_last, *tol["out"])
    kind = {"du": "du", "ddelta": "ddelta_z" if has_z else "ddelta", "dz": "out",
            "dinitial_state": "du"}
    for name, g, r in zip(ref._fields, grads, ref):
        assert (g is None) == (r is None), f"{name}: None-ness differs from the reference"
        if g is None:
            continue
        assert g.dtype == dtype, f"{name}: dtype {g.dtype}"
        # a (Bt, N, L) B or C came back as (Bt, 1, N, L)
        g = g.reshape(r.shape) if g.size == r.size else g
        assert_close(name, g, r, *tol[kind.get(name, "weights")])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", GRID, ids=[_case_id(c) for c in GRID])
def test_cpu_matches_reference(case, dtype):
    L, combo = case
    kwargs, dout, dlast_state = _draw(L, L, combo, dtype)
    got = _run_backend(kwargs, dout, dlast_state)
    _check_against_reference(kwargs, dout, dlast_state, got, dtype)


@pytest.mark.parametrize("n_slices", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("kinds", [("grouped", "var"), ("const", "grouped"), ("var", "const")])
def test_reductions_match_reference_for_any_channel_slicing(kinds, n_slices):
    # Dc = 6 channels in G = 2 groups of 3: with 2, 4 or 6 slices a slice ends
    # inside a group (its dB/dC partials are summed across slices), with 4
    # slices of 2 the last one is empty.  Variable grads use float64 here, so
    # any race or lost partial shows up far above the tolerance.
    combo = kinds + (True, True, True, True, True, True)
    kwargs, dout, dlast_state = _draw(11, 97, combo, np.float64, Bt=2, Dc=6, N=3, G=2)
    got = _run_backend(kwargs, dout, dlast_state, chunk_size=16, n_slices=n_slices)
    _check_against_reference(kwargs, dout, dlast_state, got, np.float64)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_chunk_states_are_states_at_chunk_boundaries(dtype):
    # chunk_states[:, :, c] must be h_{c * chunk_size}: the reference's last
    # state after the first c * chunk_size steps (h_0 = initial_state for c = 0)
    L, chunk_size = 50, 16
    combo = ("grouped", "var", True, True, True, True, True, False)
    kwargs, _, _ = _draw(3, L, combo, dtype)
    out, last, saved = _cpu_scan.scan_forward(*_canonical(kwargs), chunk_size=chunk_size)
    Bt, Dc, N = last.shape
    n_chunks = math.ceil(L / chunk_size)
    assert saved.chunk_size == chunk_size
    assert saved.chunk_states.shape == (Bt, Dc, n_chunks, N)
    assert saved.chunk_states.dtype == dtype
    assert_close("chunk 0", saved.chunk_states[:, :, 0], kwargs["initial_state"], 0, 0)
    ref = _float64(kwargs)
    for c in range(1, n_chunks):
        t = c * chunk_size
        prefix = dict(ref, u=ref["u"][..., :t], delta=ref["delta"][..., :t], z=ref["z"][..., :t])
        for name in ("B", "C"):
            if prefix[name].ndim > 2:
                prefix[name] = prefix[name][..., :t]
        _, h_t = reference.selective_scan(**prefix, return_last_state=True)
        assert_close(f"chunk {c}", saved.chunk_states[:, :, c], h_t, *TOL[np.dtype(dtype)]["out"])


def _assert_identical(name, got, expected):
    if expected is None:
        assert got is None, f"{name}: expected None"
        return
    err = np.max(np.abs(got.astype(np.float64) - expected)) if got.size else 0.0
    assert np.array_equal(got, expected), f"{name}: max abs difference {err:.3g}"


@settings(max_examples=25, deadline=None)
@given(
    L=st.integers(1, 150),
    chunk_sizes=st.tuples(st.integers(1, 160), st.integers(1, 160)),
    combo=st.sampled_from(COMBOS),
    dtype=st.sampled_from([np.float32, np.float64]),
    seed=st.integers(0, 2**16),
)
def test_result_independent_of_chunk_size(L, chunk_sizes, combo, dtype, seed):
    # Chunking only decides which states are saved and recomputed; the same
    # arithmetic runs in the same order, so every result is bitwise identical.
    kwargs, dout, dlast_state = _draw(seed, L, combo, dtype)
    first = _run_backend(kwargs, dout, dlast_state, chunk_size=chunk_sizes[0])
    second = _run_backend(kwargs, dout, dlast_state, chunk_size=chunk_sizes[1])
    _assert_identical("out", second[0], first[0])
    _assert_identical("last_state", second[1], first[1])
    for name, g2, g1 in zip(reference.ScanGrads._fields, second[2], first[2]):
        _assert_identical(name, g2, g1)


def _float32_signatures(kernel):
    return [sig for sig in kernel.signatures
            if any(getattr(a, "dtype", None) == numba.float32 for a in sig)]


def test_float32_kernels_compute_in_float32():
    # Look at the LLVM IR of both kernels compiled for float32: any float64
    # arithmetic (a widened literal, say) would show up as a 'double' value
    # or an fpext.  Numba keeps the IR of what it compiled in this process;
    # where it loaded a kernel from its disk cache instead (no IR), compile
    # uncached copies of both and look at theirs.
    kwargs, dout, _ = _draw(0, 9, COMBOS[1], np.float32)
    args = _canonical(kwargs)
    kernels = (_cpu_scan._forward_kernel, _cpu_scan._backward_kernel)
    out, last, saved = _cpu_scan.scan_forward(*args)
    _cpu_scan.scan_backward(dout, last, *args, saved)
    if any(k.stats.cache_hits[sig] for k in kernels for sig in _float32_signatures(k)):
        kernels = (numba.njit(parallel=True)(_cpu_scan._forward_kernel.py_func),
                   numba.njit(parallel=True)(_cpu_scan._backward_kernel.py_func))
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(_cpu_scan, "_forward_kernel", kernels[0])
            mp.setattr(_cpu_scan, "_backward_kernel", kernels[1])
            out, last, saved = _cpu_scan.scan_forward(*args)
            _cpu_scan.scan_backward(dout, last, *args, saved)
    for kernel in kernels:
        sigs = _float32_signatures(kernel)
        assert sigs, kernel.py_func.__name__
        for sig in sigs:
            ir = kernel.inspect_llvm(sig)
            assert "fadd float" in ir  # the IR is there and does float32 arithmetic
            assert "double" not in ir and "fpext" not in ir, kernel.py_func.__name__


def test_backward_rejects_chunk_size_other_than_forward():
    kwargs, dout, _ = _draw(0, 10, COMBOS[0], np.float64)
    args = _canonical(kwargs)
    _, _, saved = _cpu_scan.scan_forward(*args, chunk_size=4)
    with pytest.raises(ValueError, match=r"^chunk_size must be the forward's \(4\) or None, got 5$"):
        _cpu_scan.scan_backward(dout, None, *args, saved, chunk_size=5)


@pytest.mark.parametrize("bad", [0, -3, 2.0, True])
def test_rejects_chunk_size_not_positive_integer(bad):
    kwargs, _, _ = _draw(0, 10, COMBOS[0], np.float64)
    with pytest.raises(ValueError, match="^chunk_size must be a positive integer"):
        _cpu_scan.scan_forward(*_canonical(kwargs), chunk_size=bad)


def test_compiles_one_specialisation_per_dtype():
    # flags and dummy arrays instead of None: every option combination, and
    # constant or variable B/C, share one compiled kernel per dtype
    for dtype in (np.float32, np.float64):
        for combo in COMBOS:
            kwargs, dout, dlast_state = _draw(1, 5, combo, dtype)
            _run_backend(kwargs, dout, dlast_state)
    # (other test files may add read-only-array variants through the public API)
    for kernel in (_cpu_scan._forward_kernel, _cpu_scan._backward_kernel):
        writable = [sig for sig in kernel.signatures
                    if all(arg.mutable for arg in sig if isinstance(arg, numba.types.Array))]
        assert len(writable) == 2, writable


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_backward_rejects_n_slices_not_positive_integer(bad):
    kwargs, dout, _ = _draw(0, 10, COMBOS[0], np.float64)
    args = _canonical(kwargs)
    _, _, saved = _cpu_scan.scan_forward(*args)
    with pytest.raises(ValueError, match="^n_slices must be a positive integer"):
        _cpu_scan.scan_backward(dout, None, *args, saved, n_slices=bad)
