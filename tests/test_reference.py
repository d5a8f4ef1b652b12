"""The float64 reference against oracles that are not our code.

* its backward against central finite differences of its forward;
* with constant delta, B, C each state is a first-order IIR filter, checked
  against ``scipy.signal.lfilter``.
"""

import numpy as np
import pytest
from scipy import signal

from numba_mamba import reference
from tests.scan_cases import make_inputs

VARIANTS = [
    dict(B_kind="const", C_kind="const"),
    dict(B_kind="var", C_kind="grouped", G=2),
    dict(B_kind="grouped", C_kind="var", G=2, D=True, z=True),
    dict(B_kind="var", C_kind="var", D=True, z=True, delta_bias=True, softplus=True,
         initial_state=True),
    dict(B_kind="grouped", C_kind="const", G=4, D=True, delta_bias=True, softplus=True,
         initial_state=True),
]


def _loss(args, dout, dlast):
    out, last, _ = reference.selective_scan_vjp(**args)
    return np.sum(out * dout) + (0.0 if dlast is None else np.sum(last * dlast))


@pytest.mark.parametrize("with_dlast", [False, True])
@pytest.mark.parametrize("variant", VARIANTS)
def test_backward_matches_finite_differences(variant, with_dlast):
    rng = np.random.default_rng(7)
    args = make_inputs(rng, Bt=2, Dc=4, L=6, N=3, dtype=np.float64, **variant)
    out, last, backward = reference.selective_scan_vjp(**args)
    dout = rng.standard_normal(out.shape)
    dlast = rng.standard_normal(last.shape) if with_dlast else None
    grads = backward(dout, dlast)._asdict()
    eps = 1e-6
    for name, value in args.items():
        if not isinstance(value, np.ndarray):
            assert grads.get("d" + name) is None
            continue
        g = grads["d" + name]
        assert g.shape == value.shape and g.dtype == value.dtype, name
        numeric = np.empty_like(value)
        for idx in np.ndindex(value.shape):
            saved = value[idx]
            value[idx] = saved + eps
            plus = _loss(args, dout, dlast)
            value[idx] = saved - eps
            minus = _loss(args, dout, dlast)
            value[idx] = saved
            numeric[idx] = (plus - minus) / (2 * eps)
        err = np.max(np.abs(g - numeric))
        assert np.allclose(g, numeric, rtol=1e-6, atol=1e-7), f"d{name}: max error {err:.3g}"


@pytest.mark.parametrize("L", [1, 7, 300])
def test_constant_params_match_scipy_lfilter(L):
    """With constant delta, B and C, state n is lfilter([dt B_n], [1, -exp(dt A_n)], u)."""
    rng = np.random.default_rng(L)
    Bt, Dc, N = 2, 3, 4
    u = rng.standard_normal((Bt, Dc, L))
    dt = rng.uniform(0.05, 0.5, Dc)
    delta = np.broadcast_to(dt[:, None], (Bt, Dc, L)).copy()
    A = -rng.uniform(0.1, 2.0, (Dc, N))
    B = rng.standard_normal((Dc, N))
    C = rng.standard_normal((Dc, N))
    Dskip = rng.standard_normal(Dc)
    out, last = reference.selective_scan(u, delta, A, B, C, D=Dskip, return_last_state=True)

    expected = np.empty_like(out)
    expected_last = np.empty_like(last)
    for d in range(Dc):
        states = np.stack([signal.lfilter([dt[d] * B[d, n]], [1.0, -np.exp(dt[d] * A[d, n])],
                                          u[:, d, :], axis=-1) for n in range(N)], axis=-1)
        expected[:, d, :] = states @ C[d] + Dskip[d] * u[:, d, :]
        expected_last[:, d, :] = states[:, -1, :]
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(last, expected_last, rtol=1e-12, atol=1e-12)


def test_outputs_and_grads_keep_input_dtype():
    rng = np.random.default_rng(1)
    args = make_inputs(rng, Bt=1, Dc=2, L=5, N=2, dtype=np.float32, D=True, z=True,
                       delta_bias=True, softplus=True, initial_state=True)
    out, last, backward = reference.selective_scan_vjp(**args)
    assert out.dtype == np.float32 and last.dtype == np.float32
    grads = backward(np.ones_like(out))
    for name, g in grads._asdict().items():
        assert g.dtype == args[name[1:]].dtype, name
