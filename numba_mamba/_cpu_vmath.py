"""Vectorizable ``exp``, ``softplus`` and ``sigmoid`` for the CPU kernels.

LLVM vectorizes a loop only where every call in it has a vector form, and
Numba's ``np.exp`` / ``np.log1p`` are calls into the C math library that have
none (short of Intel's SVML).  The functions here are written in plain
arithmetic -- multiplies, fused multiply-adds, a rounding, integer adds and
shifts, selects, IEEE divisions -- so a loop over them becomes SIMD code
where LLVM inlines them (it does: they are short).  They are type-generic:
float32 arguments get float32 constants and compute in float32, float64 in
float64.  A kernel that calls them should be compiled with
``error_model="numpy"`` too, so that its own divisions do not branch.

``vexp(x)``
    ``exp(x) = 2**k * exp(r)`` with ``k = rint(x / ln 2)`` and
    ``r = x - k ln 2`` (Cody-Waite: ``ln 2`` split in a high part with
    trailing zero bits and a low part, each product taken by one fused
    multiply-add), so ``|r| <= ln(2) / 2``.  ``exp(r) = 1 + r + r**2 q(r)``
    with ``q`` a polynomial of degree 4 (float32) or 9 (float64) fitted on
    Chebyshev nodes of ``[-ln(2)/2, ln(2)/2]`` (:func:`_fit_exp`).  ``2**k``
    is built from its bits: ``(k + bias) << mantissa_bits``.  ``k`` is
    clamped to ``[-bias, bias + 1]`` first, so that ``x`` below about
    ``-bias ln 2`` (-88.0 in float32, -709.1 in float64) gives 0 where the
    true result is subnormal (less than the smallest normal number), and
    ``x`` above about ``(bias + 0.5) ln 2`` (88.4, 709.8) gives ``inf``
    (in float32 also for ``x`` in [88.38, 88.72], whose exact results lie
    within a factor 1.42 of the largest float32).  NaN gives NaN.  The
    relative error in between is measured by ``tests/test_cpu_scan_fast.py``.
``vsoftplus(x)``
    ``log1p(exp(x))``, and ``x`` itself for ``x > 20`` (the reference
    implementation's cut-off), as ``max(x, 0) + log1p(exp(-|x|))``.
    ``log1p(y)`` for ``y`` in [0, 1]: ``w = 1 + y`` rounded, ``w = 2**e m``
    with ``m`` in [sqrt(2)/2, sqrt(2)], ``log(m) = 2 atanh(s)`` with
    ``s = (m - 1) / (m + 1)`` (odd Taylor series in ``s``, ``|s| < 0.172``),
    plus ``(y - (w - 1)) / w`` for the rounding of ``w``.
``vsigmoid(x)``
    ``1 / (1 + exp(-x))``.

``njit_noalias(**options)``
    ``numba.njit`` whose function tells LLVM that its array arguments do not
    overlap (``noalias`` on every pointer argument, a flag Numba keeps for
    its parallel loops' bodies and offers no decorator option for).  Without
    it LLVM guards every vectorized loop with run-time overlap checks of each
    pair of arrays it writes and reads, taken again each time the loop is
    entered: for a scan's loop over 16 states inside a loop over time, more
    instructions than the loop's own work.  Where Numba's internals differ
    from what this expects, it is plain ``njit`` (the same results, slower).
"""

from decimal import Decimal, getcontext

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

__all__ = ["vexp", "vsoftplus", "vsigmoid", "fma", "njit_noalias", "EXP_COEFFS"]


# ---------------------------------------------------------------- noalias functions


def _noalias_dispatcher():
    """A CPU dispatcher class whose compiles set Numba's ``noalias`` flag, or
    None where this Numba's internals lack what it builds on."""
    try:
        from numba.core import cpu, registry
        from numba.core.options import TargetOptions

        class NoAliasOptions(cpu.CPUTargetOptions):
            noalias = TargetOptions.Mapping("noalias")

        class NoAliasTarget(registry.CPUTarget):
            # the global CPU target's contexts: callers link its code as their own
            options = NoAliasOptions
            target_context = property(lambda self: registry.cpu_target.target_context)
            typing_context = property(lambda self: registry.cpu_target.typing_context)

        class NoAliasDispatcher(registry.CPUDispatcher):
            targetdescr = NoAliasTarget("cpu")

        return NoAliasDispatcher
    except (ImportError, AttributeError, TypeError):  # pragma: no cover
        return None


_NoAliasDispatcher = _noalias_dispatcher()


def njit_noalias(**options):
    """``numba.njit(**options)`` with ``noalias`` on the function's arguments.

    The caller promises that no memory one array argument writes is read or
    written through another argument in the same call (views of disjoint
    parts of one array are fine).  Where this Numba lacks the internals used,
    plain ``njit``.

    Examples
    --------
    >>> import numpy as np
    >>> @njit_noalias(error_model="numpy")
    ... def axpy(a, x, y):
    ...     for i in range(x.shape[0]):
    ...         y[i] += a * x[i]
    >>> y = np.ones(3)
    >>> axpy(2.0, np.arange(3.0), y)
    >>> y
    array([1., 3., 5.])
    """
    if _NoAliasDispatcher is None:  # pragma: no cover
        return njit(**options)

    def wrap(py_func):
        return _NoAliasDispatcher(py_func, targetoptions=dict(options, nopython=True,
                                                              noalias=True))

    return wrap


# ---------------------------------------------------------------- LLVM intrinsics


def _float_llvm(ty):
    return ir.FloatType() if ty == types.float32 else ir.DoubleType()


@intrinsic
def fma(typingctx, a, b, c):
    """``a * b + c`` rounded once (``llvm.fma``), for three floats of one type."""
    if not (isinstance(a, types.Float) and a == b == c):
        return None

    def codegen(context, builder, sig, args):
        lty = _float_llvm(sig.return_type)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(lty, [lty, lty, lty]),
            "llvm.fma.f32" if lty == ir.FloatType() else "llvm.fma.f64")
        return builder.call(fn, args)

    return a(a, a, a), codegen


@intrinsic
def _rint(typingctx, x):
    """``x`` rounded to the nearest integer, ties to even (``llvm.rint``)."""
    if not isinstance(x, types.Float):
        return None

    def codegen(context, builder, sig, args):
        lty = _float_llvm(sig.return_type)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(lty, [lty]),
            "llvm.rint.f32" if lty == ir.FloatType() else "llvm.rint.f64")
        return builder.call(fn, args)

    return x(x), codegen


@intrinsic
def _select(typingctx, cond, a, b):
    """``a if cond else b`` as one LLVM ``select``: no branch, and no Python-level
    conditional (whose phi nodes Numba's inliner warns about)."""
    if not (isinstance(cond, types.Boolean) and isinstance(a, types.Float) and a == b):
        return None

    def codegen(context, builder, sig, args):
        return builder.select(args[0], args[1], args[2])

    return a(cond, a, b), codegen


@intrinsic
def _pow2(typingctx, k):
    """``2**k`` for an integer-valued float ``k`` in ``[-bias, bias + 1]``, from
    its bits (``k = -bias`` gives 0, ``k = bias + 1`` gives ``inf``)."""
    if not isinstance(k, types.Float):
        return None

    def codegen(context, builder, sig, args):
        if sig.return_type == types.float32:
            lty, ity, bias, shift = ir.FloatType(), ir.IntType(32), 127, 23
        else:
            lty, ity, bias, shift = ir.DoubleType(), ir.IntType(64), 1023, 52
        ki = builder.fptosi(args[0], ity)
        bits = builder.shl(builder.add(ki, ir.Constant(ity, bias)), ir.Constant(ity, shift))
        return builder.bitcast(bits, lty)

    return k(k), codegen


# ---------------------------------------------------------------- constants


_LN2 = "0.6931471805599453094172321214581765680755"  # ln 2 to 40 digits


def _fit_exp(degree):
    """Coefficients ``c[0..degree-2]`` (lowest first) of ``q`` with
    ``exp(r) ~ 1 + r + r**2 q(r)`` on ``|r| <= ln(2)/2``: least squares on
    Chebyshev nodes, near minimax for this smooth function.  Computed once
    in float64 at import; printed by ``python -m numba_mamba._cpu_vmath``."""
    half = np.log(2.0) / 2
    nodes = half * np.cos(np.pi * (np.arange(400) + 0.5) / 400)
    # (exp(r) - 1 - r) / r**2 without cancellation: the Taylor series to high order
    terms = np.zeros_like(nodes)
    fact = 2.0
    power = np.ones_like(nodes)
    for j in range(2, 30):
        terms += power / fact
        power = power * nodes
        fact *= j + 1
    # weight by r**2 / exp(r): the fit then minimises the relative error of exp(r)
    weight = nodes ** 2 / np.exp(nodes)
    vander = np.vander(nodes, degree - 1, increasing=True)
    coef, *_ = np.linalg.lstsq(vander * weight[:, None], terms * weight, rcond=None)
    return coef


class _Consts:
    """The constants of one float type, as NumPy scalars of that type."""

    def __init__(self, ftype, exp_degree, atanh_terms, ln2_hi_bits):
        F = np.dtype(ftype).type
        self.F = F
        self.log2e = F(1 / np.log(2.0))
        # ln 2 = ln2_hi + ln2_lo, ln2_hi with trailing zero bits so that k * ln2_hi is
        # exact, ln2_lo from 40 digits (float64's ln 2 is itself 1e-17 off, which
        # k up to 1024 would make 200 units in the last place of exp)
        getcontext().prec = 50
        ln2 = Decimal(_LN2)
        ln2_hi = float(int(ln2 * 2 ** ln2_hi_bits)) / 2.0 ** ln2_hi_bits
        self.ln2_hi = F(ln2_hi)
        self.ln2_lo = F(float(ln2 - Decimal(ln2_hi)))
        self.ln2 = F(float(ln2))
        bias = 127 if F is np.float32 else 1023
        # x is clamped to these first, so that k = rint(x / ln 2) stays in
        # [-bias, bias + 1] (2**k is 0 or inf at the ends) and r = x - k ln 2 small
        self.x_lo = F(-(bias + 0.4) * float(ln2))
        self.x_hi = F((bias + 1.4) * float(ln2))
        self.q = tuple(F(c) for c in _fit_exp(exp_degree))
        # 2 atanh(s) = 2 s (1 + s^2/3 + s^4/5 + ...): coefficients of s^2 powers
        self.atanh = tuple(F(1.0 / (2 * j + 1)) for j in range(atanh_terms))
        self.zero, self.half, self.one, self.two = F(0), F(0.5), F(1), F(2)
        self.sqrt2 = F(np.sqrt(2.0))
        self.twenty = F(20)


# float32: |k| <= 128 needs 8 bits, ln2_hi keeps 24 - 8 = 16; float64: 11 of 53 -> 42
_F32 = _Consts(np.float32, 6, 5, 16)
_F64 = _Consts(np.float64, 11, 11, 42)
#: ``q``'s coefficients (lowest first) per dtype name, for the tests.
EXP_COEFFS = {"float32": _F32.q, "float64": _F64.q}


#: IEEE division (a zero divisor gives inf, not ZeroDivisionError's branch, which
#: would keep LLVM from vectorizing the loop).
_JIT = {"error_model": "numpy"}


def _consts(x):
    return _F32 if x == types.float32 else _F64


# ---------------------------------------------------------------- the functions


def vexp(x):
    """``exp(x)`` in plain arithmetic, for loops LLVM can vectorize."""
    raise NotImplementedError("vexp is called from Numba-compiled code only")


def vsoftplus(x):
    """``log1p(exp(x))`` (``x`` above 20) in plain arithmetic."""
    raise NotImplementedError("vsoftplus is called from Numba-compiled code only")


def vsigmoid(x):
    """``1 / (1 + exp(-x))`` in plain arithmetic."""
    raise NotImplementedError("vsigmoid is called from Numba-compiled code only")


def _exp_impl(c):
    log2e, ln2_hi, ln2_lo, one = c.log2e, c.ln2_hi, c.ln2_lo, c.one
    x_lo, x_hi = c.x_lo, c.x_hi
    q = c.q
    if len(q) == 5:
        q0, q1, q2, q3, q4 = q

        def poly(r):
            return fma(fma(fma(fma(q4, r, q3), r, q2), r, q1), r, q0)
    else:
        q0, q1, q2, q3, q4, q5, q6, q7, q8, q9 = q

        def poly(r):
            p = fma(fma(fma(fma(q9, r, q8), r, q7), r, q6), r, q5)
            return fma(fma(fma(fma(fma(p, r, q4), r, q3), r, q2), r, q1), r, q0)
    poly = njit(inline="always")(poly)

    def impl(x):
        # (written as x86's max and min read them: a NaN x becomes x_lo here ...)
        xc = _select(x > x_lo, x, x_lo)
        xc = _select(xc < x_hi, xc, x_hi)
        k = _rint(xc * log2e)
        r = fma(k, -ln2_hi, xc)
        r = fma(k, -ln2_lo, r)
        er = fma(poly(r), r * r, r) + one
        res = er * _pow2(k)
        return _select(x == x, res, x)  # (... and NaN again here)

    return impl


@overload(vexp, jit_options=_JIT, inline="always")
def _ov_vexp(x):
    if isinstance(x, types.Float):
        return _exp_impl(_consts(x))


def _softplus_impl(c):
    zero, half, one, two = c.zero, c.half, c.one, c.two
    sqrt2, ln2, twenty = c.sqrt2, c.ln2, c.twenty
    at = c.atanh
    if len(at) == 5:
        a0, a1, a2, a3, a4 = at

        def series(s2):
            return fma(fma(fma(fma(a4, s2, a3), s2, a2), s2, a1), s2, a0)
    else:
        a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10 = at

        def series(s2):
            p = fma(fma(fma(fma(fma(a10, s2, a9), s2, a8), s2, a7), s2, a6), s2, a5)
            return fma(fma(fma(fma(fma(p, s2, a4), s2, a3), s2, a2), s2, a1), s2, a0)
    series = njit(inline="always")(series)

    def impl(x):
        ax = _select(x > zero, x, -x)
        y = vexp(-ax)  # in (0, 1]
        w = one + y  # in (1, 2]
        big = w > sqrt2
        m = _select(big, w * half, w)
        e = _select(big, one, zero)
        s = (m - one) / (m + one)
        lg = two * s * series(s * s) + e * ln2 + (y - (w - one)) / w
        pos = _select(x > zero, x, zero)
        res = pos + lg
        return _select(x > twenty, x, res)

    return impl


@overload(vsoftplus, jit_options=_JIT, inline="always")
def _ov_vsoftplus(x):
    if isinstance(x, types.Float):
        return _softplus_impl(_consts(x))


@overload(vsigmoid, jit_options=_JIT, inline="always")
def _ov_vsigmoid(x):
    if isinstance(x, types.Float):
        one = _consts(x).one

        def impl(x):
            return one / (one + vexp(-x))

        return impl


if __name__ == "__main__":  # pragma: no cover
    for name, coef in EXP_COEFFS.items():
        print(name, [float(v) for v in coef])
