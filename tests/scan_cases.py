"""Random inputs for the selective scan tests, shared by every test file.

``make_inputs`` returns a dict of keyword arguments for ``selective_scan`` /
``selective_scan_vjp`` (NumPy arrays; move them to CuPy in GPU tests).  The
values are drawn so the scan is well conditioned: negative A, positive delta
around the range a trained Mamba uses, unit-scale u, B, C.
"""

import numpy as np

__all__ = ["make_inputs", "TOLERANCES", "HALF_UNIT_ROUNDOFF", "assert_close", "half_dtype",
           "rounded_once", "float64_args", "non_native"]


def _bc(rng, kind, Bt, Dc, N, L, G, dtype):
    if kind == "const":
        return rng.standard_normal((Dc, N)).astype(dtype)
    if kind == "var":
        return rng.standard_normal((Bt, N, L)).astype(dtype)
    if kind == "grouped":
        return rng.standard_normal((Bt, G, N, L)).astype(dtype)
    raise ValueError(kind)


def make_inputs(rng, Bt=2, Dc=4, L=16, N=4, dtype=np.float64, B_kind="var", C_kind="var",
                G=2, D=False, z=False, delta_bias=False, softplus=False, initial_state=False):
    """Keyword arguments for one selective scan call, drawn from ``rng``."""
    if softplus:
        delta = rng.uniform(-3.0, 0.5, (Bt, Dc, L))
    else:
        delta = rng.uniform(0.01, 0.6, (Bt, Dc, L))
    args = dict(
        u=rng.standard_normal((Bt, Dc, L)).astype(dtype),
        delta=delta.astype(dtype),
        A=(-rng.uniform(0.2, 3.0, (Dc, N))).astype(dtype),
        B=_bc(rng, B_kind, Bt, Dc, N, L, G, dtype),
        C=_bc(rng, C_kind, Bt, Dc, N, L, G, dtype),
        D=rng.standard_normal(Dc).astype(dtype) if D else None,
        z=rng.standard_normal((Bt, Dc, L)).astype(dtype) if z else None,
        # without softplus delta + delta_bias must stay positive, or the state grows without bound
        delta_bias=(rng.uniform(-1.0, 1.0, Dc) if softplus else rng.uniform(0.0, 0.3, Dc)
                    ).astype(dtype) if delta_bias else None,
        delta_softplus=bool(softplus),
        initial_state=rng.standard_normal((Bt, Dc, N)).astype(dtype) if initial_state else None,
    )
    return args


# rtol, atol per dtype and quantity.  float32 figures are the reference
# project's own test tolerances (out rtol 6e-4 atol 2e-3; du 2x; ddelta 5x,
# 10x with z; weights 1e-3).
TOLERANCES = {
    np.dtype(np.float64): dict(out=(1e-10, 1e-10), du=(1e-9, 1e-9), ddelta=(1e-9, 1e-9),
                               ddelta_z=(1e-9, 1e-9), weights=(1e-9, 1e-9)),
    np.dtype(np.float32): dict(out=(6e-4, 2e-3), du=(1.2e-3, 4e-3), ddelta=(3e-3, 1e-2),
                               ddelta_z=(6e-3, 2e-2), weights=(1e-3, 1e-3)),
}


# Unit roundoff of the half precisions (half the distance between 1 and the next
# value): a value rounded to nearest once is off by at most this much relative.
HALF_UNIT_ROUNDOFF = {"float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}


def half_dtype(name):
    """The NumPy dtype of ``'float16'`` or ``'bfloat16'`` (from ``ml_dtypes``)."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def rounded_once(rtol, atol, unit):
    """Tolerances ``(rtol, atol)`` of a result within ``(rtol, atol)`` of the
    reference, then rounded once to a type of unit roundoff ``unit``:
    ``|round(g) - g| <= unit |g| <= unit (|r| (1 + rtol) + atol)``."""
    return rtol + unit * (1.0 + rtol), atol * (1.0 + unit)


def assert_close(name, got, expected, rtol, atol):
    """assert_allclose that names the quantity and prints the max error."""
    got = np.asarray(got, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert got.shape == expected.shape, f"{name}: shape {got.shape} != {expected.shape}"
    err = np.max(np.abs(got - expected)) if got.size else 0.0
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=atol,
                               err_msg=f"{name}: max abs error {err:.3g}")


def float64_args(rng, Bt=2, D=3, N=4, L=9):
    """Small float64 arguments of ``selective_scan`` with variable B and C, D, z and a
    bias (for tests of input kinds, not of accuracy)."""
    return dict(u=rng.standard_normal((Bt, D, L)), delta=rng.uniform(0.1, 1, (Bt, D, L)),
                A=-rng.uniform(0.5, 2, (D, N)), B=rng.standard_normal((Bt, N, L)),
                C=rng.standard_normal((Bt, N, L)), D=rng.standard_normal(D),
                z=rng.standard_normal((Bt, D, L)), delta_bias=rng.standard_normal(D))


def non_native(x, code="f8"):
    """``x`` as dtype ``code`` in non-native byte order (big-endian on a little-endian
    host)."""
    other = np.dtype(code).newbyteorder("S")
    return np.asarray(x).astype(other)
