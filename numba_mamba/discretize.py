"""Discretization of diagonal continuous-time state space models.

A diagonal continuous-time system ``h'(s) = A h(s) + B x(s)`` sampled with a
time step ``dt`` becomes the discrete recurrence ``h_t = Ab h_{t-1} + Bb x_t``.
Every state is independent, so the matrix formulas of
``scipy.signal.cont2discrete`` reduce to elementwise ones (``z = dt * A``):

==================  ==============================  ===============================
method              Ab                              Bb
==================  ==============================  ===============================
``'zoh'``           ``exp(z)``                      ``(exp(z) - 1) / A * B``
``'euler'``         ``1 + z``                       ``dt * B``
``'backward_diff'`` ``1 / (1 - z)``                 ``dt * B / (1 - z)``
``'bilinear'``      ``(1 + z/2) / (1 - z/2)``       ``dt * B / (1 - z/2)``
``'mamba'``         ``exp(z)``                      ``dt * B``
==================  ==============================  ===============================

``'euler'``, ``'backward_diff'`` and ``'bilinear'`` are scipy's generalized
bilinear transform ``gbt`` with ``alpha`` 0, 1 and 1/2; ``'mamba'`` is the
convention of the selective scan (zero-order hold for A, Euler for B).

NumPy arrays are discretized with vectorized NumPy, CuPy arrays with the Numba
CUDA kernels of ``cuda_kernels/discretize.py``.
"""

import warnings
from typing import Any, NamedTuple

import numpy as np

from ._backends import gpu_module
from ._math import phi1, phi2
from ._validation import (array_namespace, as_float_array, complex_of, compute_dtype,
                          is_cupy_array)

__all__ = ["DISCRETIZE_METHODS", "DiscretizeGrads", "UnstableFilterWarning", "discretize",
           "discretize_vjp"]

#: accepted values of ``method``
DISCRETIZE_METHODS = ("zoh", "euler", "backward_diff", "bilinear", "mamba")
_GBT_ALPHA = {"euler": 0.0, "backward_diff": 1.0, "bilinear": 0.5}


class DiscretizeGrads(NamedTuple):
    """Gradients of :func:`discretize`, in its argument order.

    Each has the shape of its input; ``dA`` and ``dB`` are complex where the
    input is, ``ddt`` is real (None where ``dt`` was a Python scalar).
    """

    dA: object   # like A
    dB: object   # like B
    ddt: object  # like dt


class UnstableFilterWarning(RuntimeWarning):
    """The filter has poles outside the unit circle: its output can grow without bound."""


def check_method(method):
    """Raise ValueError unless ``method`` is one of :data:`DISCRETIZE_METHODS`."""
    if not isinstance(method, str) or method not in DISCRETIZE_METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, DISCRETIZE_METHODS))}, "
                         f"got {method!r}")


def as_param(name, x, xp, allow_complex=True):
    """``x`` as an array of ``xp`` with a supported real (or complex) dtype, native byte
    order; integer and boolean arrays and lists as float64."""
    return as_float_array(name, x, xp, allow_complex=allow_complex)


def check_state_matrix(A, xp, states=True):
    """The checks of ``A`` that every SSM function makes (one path for
    :func:`discretize`, ``ssm_kernel``, ``ssm_filter`` and ``SSMFilter``):
    at least one entry (with ``states``, a last axis of ``N >= 1`` states)
    and finite entries.  Raises ValueError naming ``A``."""
    if states and (A.ndim == 0 or A.shape[-1] == 0):
        raise ValueError(f"A must have shape (..., N) with N >= 1 states, got "
                         f"{tuple(A.shape)}")
    if A.size == 0:
        raise ValueError(f"A must have at least one entry, got shape {tuple(A.shape)}")
    if not bool(xp.isfinite(A).all()):
        raise ValueError("A must be finite: it has NaN or infinite entries (a pole at "
                         "infinity has no discretization)")


def warn_unstable(A, Ab, method, stacklevel):
    """Warn with :class:`UnstableFilterWarning` where ``Re(A) > 0`` or the
    discretized poles ``Ab`` leave the unit circle; ``stacklevel`` as
    :func:`warnings.warn` counts it from the caller of this function."""
    if bool((A.real > 0).any()):
        warnings.warn("A has entries with positive real part (unstable poles): the filter "
                      "output grows without bound", UnstableFilterWarning,
                      stacklevel=stacklevel + 1)
    elif bool((abs(Ab) > 1 + 8 * np.finfo(Ab.real.dtype).eps).any()):
        warnings.warn(f"the poles discretized with method {method!r} lie outside the unit "
                      f"circle (|Ab| > 1) although Re(A) <= 0: reduce dt or use 'zoh' or "
                      f"'bilinear'", UnstableFilterWarning, stacklevel=stacklevel + 1)


def _forward_cpu(A, B, dt, method):
    z = dt * A
    if method in _GBT_ALPHA:
        alpha = _GBT_ALPHA[method]
        den = 1 - alpha * z
        return (1 + (1 - alpha) * z) / den, dt * B / den
    Ab = np.exp(z)
    if method == "zoh":
        return Ab, B * dt * phi1(z, np)
    return Ab, dt * B


def _backward_cpu(A, B, dt, gAb, gBb, method):
    """Per-element g * conj(df/dx) for A, B and the real part for dt."""
    z = dt * A
    conj = np.conj
    if method in _GBT_ALPHA:
        alpha = _GBT_ALPHA[method]
        den = 1 - alpha * z
        inv2 = 1 / (den * den)
        dA = gAb * conj(dt * inv2) + gBb * conj(alpha * B * dt * dt * inv2)
        dB = gBb * conj(dt / den)
        ddt = gAb * conj(A * inv2) + gBb * conj(B * inv2)
    else:
        e = np.exp(z)
        dA = gAb * conj(dt * e)
        ddt = gAb * conj(A * e)
        if method == "zoh":
            dA = dA + gBb * conj(B * dt * dt * phi2(z, np))
            dB = gBb * conj(dt * phi1(z, np))
            ddt = ddt + gBb * conj(B * e)
        else:
            dB = gBb * dt
            ddt = ddt + gBb * conj(B)
    return dA, dB, ddt.real


def _sum_to_shape(g, shape, xp):
    """Sum a broadcast gradient back to ``shape`` (NumPy broadcasting rules)."""
    lead = g.ndim - len(shape)
    if lead:
        g = g.sum(axis=tuple(range(lead)))
    axes = tuple(i for i, s in enumerate(shape) if s == 1 and g.shape[i] != 1)
    if axes:
        g = g.sum(axis=axes, keepdims=True)
    return g


def prepare(A, B, dt, method):
    """Validate :func:`discretize`'s arguments: ``(xp, A, B, dt, shape, dt_is_array)``
    with ``A``, ``B`` in one (complex where either is) dtype, ``dt`` real, and
    ``shape`` their broadcast shape (the filters validate through it too)."""
    check_method(method)
    dt_is_array = isinstance(dt, np.ndarray) or is_cupy_array(dt)
    xp = array_namespace(A=A if not np.isscalar(A) else None,
                         B=B if not np.isscalar(B) else None,
                         dt=dt if dt_is_array else None)
    A = as_param("A", A, xp)
    check_state_matrix(A, xp, states=False)
    B = as_param("B", B, xp)
    if isinstance(dt, (bool, np.bool_)):
        raise TypeError(f"dt must be a number or an array of time steps, got {dt!r}")
    dt_arr = as_param("dt", dt, xp, allow_complex=False)
    ftype = compute_dtype(A, B, dt_arr if dt_is_array else None)
    try:
        shape = np.broadcast_shapes(A.shape, B.shape, dt_arr.shape)
    except ValueError:
        raise ValueError(f"A, B and dt must broadcast against each other, got shapes "
                         f"A {tuple(A.shape)}, B {tuple(B.shape)}, dt {tuple(dt_arr.shape)}"
                         ) from None
    if not bool(xp.isfinite(dt_arr).all()) or bool((dt_arr < 0).any()):
        raise ValueError("dt must be finite and >= 0 (a time step)")
    cplx = A.dtype.kind == "c" or B.dtype.kind == "c"
    ctype = complex_of(ftype) if cplx else ftype
    return xp, A.astype(ctype, copy=False), B.astype(ctype, copy=False), \
        dt_arr.astype(ftype, copy=False), shape, dt_is_array


def _flat(x, shape, xp):
    return xp.ascontiguousarray(xp.broadcast_to(x, shape)).reshape(-1)


def discretize_prepared(A, B, dt, method, xp, shape):
    """:func:`discretize` of validated arrays (A, B of one dtype, dt real):
    the arithmetic alone, for the filters, which validate once."""
    if xp is np:
        Ab, Bb = _forward_cpu(A, B, dt, method)
        return (np.broadcast_to(Ab, shape).astype(A.dtype, copy=True),
                np.broadcast_to(Bb, shape).astype(A.dtype, copy=True))
    kernels = gpu_module("discretize")
    Ab, Bb = kernels.discretize_forward(_flat(A, shape, xp), _flat(B, shape, xp),
                                        _flat(dt, shape, xp), method)
    return Ab.reshape(shape), Bb.reshape(shape)


def discretize(A: Any, B: Any, dt: Any, method: str = "zoh") -> tuple:
    """Discretize a diagonal continuous-time state space model.

    Parameters
    ----------
    A : array_like, real or complex
        Diagonal of the state matrix, e.g. shape (..., N): channels ``...``,
        ``N`` states.  ``Re(A) < 0`` is a stable system.
    B : array_like, real or complex
        Input matrix (one column per channel), broadcasting against ``A``.
    dt : float or array_like, real, >= 0
        Time step, broadcasting against ``A`` and ``B``: a scalar, one per
        channel (shape (..., 1) against A (..., N)), or one per sample
        (``A[..., None]`` of shape (..., N, 1) with ``dt`` (..., 1, L) gives
        (..., N, L)).
    method : {'zoh', 'euler', 'backward_diff', 'bilinear', 'mamba'}, optional
        Discretization rule (table in Notes).  Default 'zoh'.

    Returns
    -------
    Ab, Bb : array
        The broadcast shape of ``A``, ``B`` and ``dt``.  Complex if ``A`` or
        ``B`` is.  Precision float64 if any array input has it (Python
        scalars do not count), else float32; NumPy in, NumPy out (CPU), CuPy
        in, CuPy out (GPU).

    Raises
    ------
    ValueError
        Unknown ``method`` (the message lists the choices); shapes that do not
        broadcast (the message gives all three); negative or non-finite ``dt``;
        empty or non-finite ``A``.
    TypeError
        Unsupported dtype; NumPy and CuPy arrays mixed; a ``bool`` for ``dt``.

    Warns
    -----
    UnstableFilterWarning
        ``Re(A) > 0`` somewhere, or discretized poles outside the unit circle
        (``|Ab| > 1``, e.g. 'euler' with a large ``dt``).

    See Also
    --------
    discretize_vjp : the same with its backward pass.
    scipy.signal.cont2discrete : the dense-matrix version these match.

    Notes
    -----
    With ``z = dt * A`` and ``phi1(z) = (exp(z) - 1) / z`` (``phi1(0) = 1``,
    evaluated with ``expm1`` so that small ``z`` keeps its precision):

    ==================  ===========================  ===========================
    method              Ab                           Bb
    ==================  ===========================  ===========================
    'zoh'               exp(z)                       dt phi1(z) B
    'euler'             1 + z                        dt B
    'backward_diff'     1 / (1 - z)                  dt B / (1 - z)
    'bilinear'          (1 + z/2) / (1 - z/2)        dt B / (1 - z/2)
    'mamba'             exp(z)                       dt B
    ==================  ===========================  ===========================

    ``Ab`` and ``Bb`` equal those of ``scipy.signal.cont2discrete`` for the
    diagonal system with each method ('euler', 'backward_diff', 'bilinear'
    are its ``gbt`` with ``alpha`` 0, 1, 1/2); 'mamba' is the convention of
    :func:`numba_mamba.selective_scan`.

    C and D: for the ``gbt`` methods scipy also returns a changed output
    pair, ``Cd = C / (1 - alpha z)`` and ``Dd = D + alpha C Bb``, which makes
    its system, in its own output convention ``y_k = Cd s_k + Dd x_k`` with a
    one-step-delayed state, realize the transformed transfer function.  This
    function returns ``Ab`` and ``Bb`` only: the filters of this package use
    ``C`` and ``D`` unchanged with the selective scan's output
    ``y_t = C h_t + D x_t`` (see :func:`numba_mamba.ssm_filter`, which also
    gives the scipy-convention system of the same filter).

    References
    ----------
    .. [1] A. Gu and T. Dao, "Mamba: Linear-Time Sequence Modeling with
       Selective State Spaces", arXiv:2312.00752, 2023.
    .. [2] G. Zhang, X. Chen and T. Chen, "Digital redesign via the
       generalized bilinear transformation", Int. J. Control 82(4), 2009
       (the ``gbt`` of scipy).

    Examples
    --------
    >>> import numpy as np
    >>> import numba_mamba as nm
    >>> A = np.array([[-1.0, -0.5]]); B = np.ones((1, 2))
    >>> Ab, Bb = nm.discretize(A, B, 0.1, method="zoh")
    >>> np.round(Ab, 4), np.round(Bb, 4)
    (array([[0.9048, 0.9512]]), array([[0.0952, 0.0975]]))

    It agrees with ``scipy.signal.cont2discrete`` on the diagonal system:

    >>> from scipy.signal import cont2discrete
    >>> ad, bd, *_ = cont2discrete((np.diag(A[0]), B[0, :, None], np.ones((1, 2)), 0),
    ...                            0.1, method="bilinear")
    >>> Ab, Bb = nm.discretize(A, B, 0.1, method="bilinear")
    >>> bool(np.allclose(np.diag(ad), Ab[0]) and np.allclose(bd[:, 0], Bb[0]))
    True
    """
    xp, A, B, dt, shape, _ = prepare(A, B, dt, method)
    Ab, Bb = discretize_prepared(A, B, dt, method, xp, shape)
    warn_unstable(A, Ab, method, stacklevel=2)
    return Ab, Bb


def discretize_vjp(A: Any, B: Any, dt: Any, method: str = "zoh") -> tuple:
    """Discretize with the vector-Jacobian product (hand-written backward pass).

    Parameters are those of :func:`discretize`.

    Returns
    -------
    Ab, Bb : array
        As :func:`discretize`.
    backward : callable
        ``backward(dAb, dBb=None)`` takes the gradients of a real loss with
        respect to ``Ab`` and ``Bb`` (broadcast shape; None counts as zeros)
        and returns :class:`DiscretizeGrads` ``(dA, dB, ddt)``, each summed
        back to the shape of its input and in its dtype (``ddt`` is None when
        ``dt`` was a Python scalar).

    Notes
    -----
    For complex arrays the gradient follows the convention of automatic
    differentiation frameworks: for ``x = u + i v`` and a real loss ``l``,
    ``dx = dl/du + i dl/dv``; an upstream ``g`` maps to ``g * conj(df/dx)``
    for each holomorphic ``f``, and a real input takes the real part.  The
    ``zoh`` derivative ``dBb/dA = B dt^2 phi2(z)`` with
    ``phi2(z) = (z e^z - (e^z - 1)) / z^2`` uses its Taylor series for
    ``|z| < 0.1``.

    Examples
    --------
    >>> import numpy as np
    >>> import numba_mamba as nm
    >>> A = np.array([-1.0, -2.0]); B = np.array([1.0, 0.5])
    >>> Ab, Bb, backward = nm.discretize_vjp(A, B, np.array(0.1), method="zoh")
    >>> g = backward(np.ones(2), np.ones(2))
    >>> eps = 1e-7
    >>> num = (nm.discretize(A, B, 0.1 + eps)[0].sum() + nm.discretize(A, B, 0.1 + eps)[1].sum()
    ...        - Ab.sum() - Bb.sum()) / eps
    >>> bool(abs(num - g.ddt) < 1e-5)
    True
    """
    given = dict(A=A, B=B, dt=dt)
    xp, A, B, dtc, shape, dt_is_array = prepare(A, B, dt, method)
    orig = {k: as_param(k, v, xp, allow_complex=(k != "dt")) for k, v in given.items()}
    Ab, Bb = discretize_prepared(A, B, dtc, method, xp, shape)
    warn_unstable(A, Ab, method, stacklevel=2)

    def backward(dAb, dBb=None):
        array_namespace(Ab=Ab, dAb=dAb, dBb=dBb)
        g = []
        for name, v in (("dAb", dAb), ("dBb", dBb)):
            if v is None:
                v = xp.zeros(shape, Ab.dtype)
            v = as_param(name, v, xp)
            if tuple(v.shape) != tuple(shape):
                raise ValueError(f"{name} must have shape {tuple(shape)} like "
                                 f"{name[1:]}, got {tuple(v.shape)}")
            g.append(v.astype(Ab.dtype, copy=False))
        if xp is np:
            dA, dB, ddt = _backward_cpu(A, B, dtc, g[0], g[1], method)
            dA, dB, ddt = (np.broadcast_to(v, shape) for v in (dA, dB, ddt))
        else:
            kernels = gpu_module("discretize")
            dA, dB, ddt = kernels.discretize_backward(
                _flat(A, shape, xp), _flat(B, shape, xp), _flat(dtc, shape, xp),
                xp.ascontiguousarray(g[0]).reshape(-1),
                xp.ascontiguousarray(g[1]).reshape(-1), method)
            dA, dB, ddt = (v.reshape(shape) for v in (dA, dB, ddt))
        out = {}
        for name, grad in (("A", dA), ("B", dB), ("dt", ddt)):
            o = orig[name]
            grad = _sum_to_shape(grad, o.shape, xp)
            if o.dtype.kind != "c":
                grad = grad.real
            out["d" + name] = grad.astype(o.dtype, copy=True).reshape(o.shape)
        if not dt_is_array:
            out["ddt"] = None
        return DiscretizeGrads(**out)

    return Ab, Bb, backward
