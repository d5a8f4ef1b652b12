"""Numba CUDA kernels of the sequence filter: discretization and a diagonal recurrence.

Math
----
Discretization of one diagonal state ``(a, b)`` over a time step ``h`` (each
element independently; ``z = h * a``)::

    zoh            Ab = exp(z)                    Bb = b * h * phi1(z)
    mamba          Ab = exp(z)                    Bb = b * h
    gbt(alpha)     Ab = (1 + (1-alpha) z) / (1 - alpha z)
                                                  Bb = b * h / (1 - alpha z)

with ``phi1(z) = (exp(z) - 1) / z`` (``phi1(0) = 1``); euler is gbt(0),
backward_diff gbt(1), bilinear gbt(1/2).  The backward pass returns, for an
upstream gradient ``g`` of each output, ``g * conj(df/dx)`` per element and
input (the real part for the real ``h``)::

    zoh    dAb/da = h e^z        dAb/dh = a e^z
           dBb/db = h phi1(z)    dBb/da = b h^2 phi2(z)   dBb/dh = b e^z
    mamba  as zoh for Ab;        dBb/db = h,              dBb/dh = b
    gbt    dAb/da = h / den^2    dAb/dh = a / den^2       (den = 1 - alpha z)
           dBb/db = h / den      dBb/da = alpha b h^2 / den^2
                                 dBb/dh = b / den^2

with ``phi2(z) = (z e^z - (e^z - 1)) / z^2``, evaluated by its series
``sum_{m>=2} (m-1)/m! z^(m-2)`` for ``|z| < 0.1`` (the closed form cancels).

The recurrence, per row ``r`` and state ``n`` (``a, b, c`` constant or varying
along time)::

    h_t = a_t * h_{t-1} + b_t * x_t,      h_{-1} = h0
    y_t = sum_n Re(c_t[n] * h_t[n])

is computed as a chunked scan (Blelloch 1990): the affine maps
``h -> a h + b x`` compose associatively under
``(a1, b1) o (a2, b2) = (a2 a1, a2 b1 + b2)``, so

1. ``summary``: one thread per (row, chunk) composes the maps of its chunk of
   ``T`` steps into ``(prod a, h_end with h_start = 0)`` for every state;
2. ``carry``: one thread per (row, state) walks the chunk summaries in order,
   giving the state entering every chunk and the final state;
3. ``output``: one thread per (row, chunk) reruns its chunk from the carry and
   writes ``y``.

Complex arrays reach the kernels as float views with interleaved real and
imaginary parts (last axis doubled), so float32 kernels never touch float64
(Numba's ``cmath`` promotes complex64 to float64 on the GPU).

Canonical layout (C-contiguous, float dtype ``ftype``; ``W = 2`` for complex)
----------------------------------------------------------------------------
=====================  ======================  ==================================
name                   shape                   notes
=====================  ======================  ==================================
A, B, Ab, Bb, dA, dB   (M * W,)                broadcast and flattened; B complex
                                               when A is
dt, ddt                (M,)                    real
x, y                   (R, L)                  real
a, b, c                (R, La, N * W)          La = 1 (constant) or L
h0, hf                 (R, N * W)              state before / after the signal
sa, sb, carry          (R, K, N * W)           K = ceil(L / T) chunks
=====================  ======================  ==================================

References
----------
G. E. Blelloch, "Prefix Sums and Their Applications", CMU-CS-90-190, 1990.
"""

import functools
import math

import numba
import numpy as np
from numba import cuda, types

from ._common import array_module, compile_kernel, inline_device, launch, simulator

__all__ = [
    "METHOD_CODES",
    "discretize_backward",
    "discretize_forward",
    "ptx_signatures",
    "recurrence",
]

#: method name -> (code, alpha) passed to the discretization kernels
METHOD_CODES = {
    "zoh": (0, 0.0),
    "mamba": (1, 0.0),
    "euler": (2, 0.0),
    "backward_diff": (2, 1.0),
    "bilinear": (2, 0.5),
}
_ZOH, _MAMBA, _GBT = 0, 1, 2
_THREADS = 128
# Target number of (row, chunk) threads of the recurrence; the chunk length is
# chosen so that rows * chunks reaches it (bounded below and above).
_TARGET_THREADS = 1 << 16
_MIN_CHUNK, _MAX_CHUNK = 16, 4096
# 1/m! * (m-1) for m = 2..10: the series of phi2 (see the module docstring)
_PHI2_SERIES = tuple((m - 1) / math.factorial(m) for m in range(2, 11))


# ------------------------------------------------------------ discretization
def _make_discretize_kernels(ftype, cplx):
    """Python bodies of the forward and backward discretization kernels.

    ``ftype`` is np.float32 or np.float64 (every constant is cast to it);
    ``cplx`` selects interleaved complex A, B, Ab, Bb, dA, dB.
    """
    ftype = np.dtype(ftype).type
    zero, one, two, half = ftype(0.0), ftype(1.0), ftype(2.0), ftype(0.5)
    small = ftype(0.1)
    c2, c3, c4, c5, c6, c7, c8, c9, c10 = (ftype(v) for v in _PHI2_SERIES)
    two_over_pi = ftype(2.0 / math.pi)
    # pi/2 split in three (Cody-Waite): k * P1 and k * P2 are exact for moderate k
    P1, P2, P3 = ftype(1.5703125), ftype(4.837512969970703125e-4), ftype(7.54978995489188216e-8)
    S3, S5, S7, S9 = (ftype(v) for v in (-1 / 6, 1 / 120, -1 / 5040, 1 / 362880))
    C2, C4, C6, C8, C10 = (ftype(v) for v in (-1 / 2, 1 / 24, -1 / 720, 1 / 40320,
                                              -1 / 3628800))
    own_sincos = np.dtype(ftype) == np.float32

    @inline_device
    def sincos_poly(y):
        # y = k pi/2 + r with |r| <= pi/4; Taylor polynomials (error < 2e-9)
        k = int(math.floor(y * two_over_pi + half))
        kf = ftype(k)
        r = ((y - kf * P1) - kf * P2) - kf * P3
        r2 = r * r
        s = r + r * r2 * (S3 + r2 * (S5 + r2 * (S7 + r2 * S9)))
        c = one + r2 * (C2 + r2 * (C4 + r2 * (C6 + r2 * (C8 + r2 * C10))))
        q = k & 3
        if q == 0:
            return s, c
        if q == 1:
            return c, -s
        if q == 2:
            return -s, -c
        return -c, s

    @inline_device
    def sincos(y):
        # float32: libdevice's sinf/cosf carry a float64 path for huge
        # arguments, so float32 kernels use the polynomial above
        if own_sincos:
            return sincos_poly(y)
        return math.sin(y), math.cos(y)

    # -- complex helpers on (re, im) pairs
    @inline_device
    def cmul(ar, ai, br, bi):
        return ar * br - ai * bi, ar * bi + ai * br

    @inline_device
    def cdiv(ar, ai, br, bi):
        # Smith's algorithm: no overflow in |b|^2
        if abs(br) >= abs(bi):
            r = bi / br
            den = br + bi * r
            return (ar + ai * r) / den, (ai - ar * r) / den
        r = br / bi
        den = br * r + bi
        return (ar * r + ai) / den, (ai * r - ar) / den

    @inline_device
    def cexp(x, y):
        e = math.exp(x)
        sn, cs = sincos(y)
        return e * cs, e * sn

    @inline_device
    def cexpm1(x, y):
        # exp(x + iy) - 1 without cancellation near 0
        s, _ = sincos(half * y)
        sn, cs = sincos(y)
        return math.expm1(x) * cs - two * s * s, math.exp(x) * sn

    @inline_device
    def cphi1(x, y):
        if x == zero and y == zero:
            return one, zero
        er, ei = cexpm1(x, y)
        return cdiv(er, ei, x, y)

    @inline_device
    def cphi2(x, y):
        if x * x + y * y < small * small:
            # Horner on the series 1/2 + z/3 + z^2/8 + ...
            pr, pi = c10, zero
            pr, pi = cmul(pr, pi, x, y)
            pr = pr + c9
            pr, pi = cmul(pr, pi, x, y)
            pr = pr + c8
            pr, pi = cmul(pr, pi, x, y)
            pr = pr + c7
            pr, pi = cmul(pr, pi, x, y)
            pr = pr + c6
            pr, pi = cmul(pr, pi, x, y)
            pr = pr + c5
            pr, pi = cmul(pr, pi, x, y)
            pr = pr + c4
            pr, pi = cmul(pr, pi, x, y)
            pr = pr + c3
            pr, pi = cmul(pr, pi, x, y)
            return pr + c2, pi
        er, ei = cexp(x, y)
        mr, mi = cexpm1(x, y)
        nr, ni = cmul(x, y, er, ei)
        zr, zi = cmul(x, y, x, y)
        return cdiv(nr - mr, ni - mi, zr, zi)

    @inline_device
    def phi1(z):
        if z == zero:
            return one
        return math.expm1(z) / z

    @inline_device
    def phi2(z):
        if abs(z) < small:
            p = c10
            p = p * z + c9
            p = p * z + c8
            p = p * z + c7
            p = p * z + c6
            p = p * z + c5
            p = p * z + c4
            p = p * z + c3
            return p * z + c2
        return (z * math.exp(z) - math.expm1(z)) / (z * z)

    if not cplx:

        def forward(A, B, dt, Ab, Bb, method, alpha):
            i = cuda.grid(1)
            if i >= Ab.shape[0]:
                return
            a = A[i]
            b = B[i]
            h = dt[i]
            z = h * a
            if method == _GBT:
                den = one - alpha * z
                Ab[i] = (one + (one - alpha) * z) / den
                Bb[i] = b * h / den
            else:
                Ab[i] = math.exp(z)
                if method == _ZOH:
                    Bb[i] = b * h * phi1(z)
                else:
                    Bb[i] = b * h

        def backward(A, B, dt, gAb, gBb, dA, dB, ddt, method, alpha):
            # overwrites dA, dB, ddt with per-element gradients
            i = cuda.grid(1)
            if i >= dA.shape[0]:
                return
            a = A[i]
            b = B[i]
            h = dt[i]
            ga = gAb[i]
            gb = gBb[i]
            z = h * a
            if method == _GBT:
                den = one - alpha * z
                inv2 = one / (den * den)
                dA[i] = (ga + gb * alpha * b * h) * h * inv2
                dB[i] = gb * h / den
                ddt[i] = (ga * a + gb * b) * inv2
            else:
                e = math.exp(z)
                if method == _ZOH:
                    dA[i] = ga * h * e + gb * b * h * h * phi2(z)
                    dB[i] = gb * h * phi1(z)
                    ddt[i] = (ga * a + gb * b) * e
                else:
                    dA[i] = ga * h * e
                    dB[i] = gb * h
                    ddt[i] = ga * a * e + gb * b

        return forward, backward

    def forward_c(A, B, dt, Ab, Bb, method, alpha):
        i = cuda.grid(1)
        if i >= dt.shape[0]:
            return
        ar, ai = A[2 * i], A[2 * i + 1]
        br, bi = B[2 * i], B[2 * i + 1]
        h = dt[i]
        zr, zi = h * ar, h * ai
        if method == _GBT:
            dr, di = one - alpha * zr, -alpha * zi
            nr, ni = one + (one - alpha) * zr, (one - alpha) * zi
            Ab[2 * i], Ab[2 * i + 1] = cdiv(nr, ni, dr, di)
            Bb[2 * i], Bb[2 * i + 1] = cdiv(h * br, h * bi, dr, di)
        else:
            Ab[2 * i], Ab[2 * i + 1] = cexp(zr, zi)
            if method == _ZOH:
                pr, pi = cphi1(zr, zi)
                Bb[2 * i], Bb[2 * i + 1] = cmul(h * br, h * bi, pr, pi)
            else:
                Bb[2 * i], Bb[2 * i + 1] = h * br, h * bi

    def backward_c(A, B, dt, gAb, gBb, dA, dB, ddt, method, alpha):
        # g * conj(df/dx) per element; ddt takes the real part (dt is real)
        i = cuda.grid(1)
        if i >= dt.shape[0]:
            return
        ar, ai = A[2 * i], A[2 * i + 1]
        br, bi = B[2 * i], B[2 * i + 1]
        gar, gai = gAb[2 * i], gAb[2 * i + 1]
        gbr, gbi = gBb[2 * i], gBb[2 * i + 1]
        h = dt[i]
        zr, zi = h * ar, h * ai
        if method == _GBT:
            dr, di = one - alpha * zr, -alpha * zi
            qr, qi = cmul(dr, di, dr, di)
            ir, ii = cdiv(one, zero, qr, qi)       # 1 / den^2
            # dAb/da = h/den^2, dBb/da = alpha b h^2/den^2
            fr, fi = cmul(alpha * h * h * br, alpha * h * h * bi, ir, ii)
            ur, ui = cmul(gar, gai, h * ir, -h * ii)
            vr, vi = cmul(gbr, gbi, fr, -fi)
            dA[2 * i], dA[2 * i + 1] = ur + vr, ui + vi
            sr, si = cdiv(h, zero, dr, di)         # dBb/db = h/den
            dB[2 * i], dB[2 * i + 1] = cmul(gbr, gbi, sr, -si)
            # dAb/dh = a/den^2, dBb/dh = b/den^2
            pr, pi = cmul(ar, ai, ir, ii)
            tr, ti = cmul(br, bi, ir, ii)
            ddt[i] = (gar * pr + gai * pi) + (gbr * tr + gbi * ti)
        else:
            er, ei = cexp(zr, zi)
            # dAb/da = h e^z, dAb/dh = a e^z
            ur, ui = cmul(gar, gai, h * er, -h * ei)
            pr, pi = cmul(ar, ai, er, ei)
            dt_sum = gar * pr + gai * pi
            if method == _ZOH:
                p1r, p1i = cphi1(zr, zi)
                p2r, p2i = cphi2(zr, zi)
                fr, fi = cmul(h * h * br, h * h * bi, p2r, p2i)   # dBb/da
                vr, vi = cmul(gbr, gbi, fr, -fi)
                dA[2 * i], dA[2 * i + 1] = ur + vr, ui + vi
                dB[2 * i], dB[2 * i + 1] = cmul(gbr, gbi, h * p1r, -h * p1i)
                tr, ti = cmul(br, bi, er, ei)                      # dBb/dh
                ddt[i] = dt_sum + gbr * tr + gbi * ti
            else:
                dA[2 * i], dA[2 * i + 1] = ur, ui
                dB[2 * i], dB[2 * i + 1] = gbr * h, gbi * h
                ddt[i] = dt_sum + gbr * br + gbi * bi

    return forward_c, backward_c


def _discretize_argtypes(ftype):
    t = numba.from_dtype(np.dtype(ftype))
    a1 = types.Array(t, 1, "C")
    fwd = (a1, a1, a1, a1, a1, types.int32, t)
    bwd = (a1, a1, a1, a1, a1, a1, a1, a1, types.int32, t)
    return fwd, bwd


# ------------------------------------------------------------- recurrence
def _make_recurrence_kernels(ftype, cplx):
    """Python bodies of the summary, carry and output kernels (see docstring)."""
    ftype = np.dtype(ftype).type
    zero, one = ftype(0.0), ftype(1.0)
    W = 2 if cplx else 1

    @inline_device
    def load(m, r, t, n):
        # element (r, t, n) of a (R, La, N*W) array; t is ignored when La == 1
        tt = t if m.shape[1] > 1 else 0
        if cplx:
            return m[r, tt, 2 * n], m[r, tt, 2 * n + 1]
        return m[r, tt, n], zero

    def summary(x, a, b, sa, sb, T):
        i = cuda.grid(1)
        R, L = x.shape
        K = sa.shape[1]
        N = sa.shape[2] // W
        if i >= R * K:
            return
        r = i // K
        k = i - r * K
        t0 = k * T
        t1 = min(L, t0 + T)
        for n in range(N):
            pr, pi = one, zero   # product of a over the chunk
            sr, si = zero, zero  # state at the chunk end, from a zero start
            for t in range(t0, t1):
                ar, ai = load(a, r, t, n)
                br, bi = load(b, r, t, n)
                xt = x[r, t]
                sr, si = ar * sr - ai * si + br * xt, ar * si + ai * sr + bi * xt
                pr, pi = ar * pr - ai * pi, ar * pi + ai * pr
            sa[r, k, W * n] = pr
            sb[r, k, W * n] = sr
            if cplx:
                sa[r, k, W * n + 1] = pi
                sb[r, k, W * n + 1] = si

    def carry(h0, sa, sb, carry_out, hf):
        i = cuda.grid(1)
        R, K = sa.shape[0], sa.shape[1]
        N = sa.shape[2] // W
        if i >= R * N:
            return
        r = i // N
        n = i - r * N
        hr = h0[r, W * n]
        hi = h0[r, W * n + 1] if cplx else zero
        for k in range(K):
            carry_out[r, k, W * n] = hr
            if cplx:
                carry_out[r, k, W * n + 1] = hi
            ar, ai = load(sa, r, k, n)
            br, bi = load(sb, r, k, n)
            hr, hi = ar * hr - ai * hi + br, ar * hi + ai * hr + bi
        hf[r, W * n] = hr
        if cplx:
            hf[r, W * n + 1] = hi

    def output(x, a, b, c, carry_in, y, T):
        i = cuda.grid(1)
        R, L = x.shape
        K = carry_in.shape[1]
        N = carry_in.shape[2] // W
        if i >= R * K:
            return
        r = i // K
        k = i - r * K
        t0 = k * T
        t1 = min(L, t0 + T)
        for t in range(t0, t1):
            y[r, t] = zero
        for n in range(N):
            hr, hi = load(carry_in, r, k, n)
            for t in range(t0, t1):
                ar, ai = load(a, r, t, n)
                br, bi = load(b, r, t, n)
                cr, ci = load(c, r, t, n)
                xt = x[r, t]
                hr, hi = ar * hr - ai * hi + br * xt, ar * hi + ai * hr + bi * xt
                y[r, t] += cr * hr - ci * hi

    return summary, carry, output


def _recurrence_argtypes(ftype):
    t = numba.from_dtype(np.dtype(ftype))
    a2 = types.Array(t, 2, "C")
    a3 = types.Array(t, 3, "C")
    i64 = types.int64
    summary = (a2, a3, a3, a3, a3, i64)
    carry = (a2, a3, a3, a3, a2)
    output = (a2, a3, a3, a3, a3, a2, i64)
    return summary, carry, output


@functools.lru_cache(maxsize=None)
def _get_kernels(family, dtype, cplx, sim):
    """Compiled kernels of one family ('discretize' or 'recurrence'), cached."""
    if family == "discretize":
        bodies = _make_discretize_kernels(dtype, cplx)
        sigs = _discretize_argtypes(dtype)
    else:
        bodies = _make_recurrence_kernels(dtype, cplx)
        sigs = _recurrence_argtypes(dtype)
    if sim:
        return tuple(cuda.jit(f) for f in bodies)
    return tuple(compile_kernel(f, types.void(*s)) for f, s in zip(bodies, sigs))


def ptx_signatures():
    """Every kernel of this module with its argument types, for PTX checks.

    Yields
    ------
    name : str
    py_func : function
        The kernel body (compile with ``numba.cuda.compile_ptx``).
    argtypes : tuple of numba types
    is_float32 : bool
    """
    for dtype in (np.dtype(np.float32), np.dtype(np.float64)):
        for cplx in (False, True):
            kind = "complex" if cplx else "real"
            fwd, bwd = _make_discretize_kernels(dtype, cplx)
            fwd_t, bwd_t = _discretize_argtypes(dtype)
            f32 = dtype == np.float32
            yield f"discretize_forward_{kind}_{dtype.name}", fwd, fwd_t, f32
            yield f"discretize_backward_{kind}_{dtype.name}", bwd, bwd_t, f32
            bodies = _make_recurrence_kernels(dtype, cplx)
            for name, body, sig in zip(("summary", "carry", "output"), bodies,
                                       _recurrence_argtypes(dtype)):
                yield f"recurrence_{name}_{kind}_{dtype.name}", body, sig, f32


# -------------------------------------------------------------- launchers
def _launch(kernel, n_threads, stream, args):
    launch(kernel, max(1, -(-n_threads // _THREADS)), _THREADS, stream, args)


def _real_view(x):
    """Complex array -> float view with interleaved parts (last axis doubled)."""
    if x.dtype.kind != "c":
        return x
    return x.view(x.real.dtype)


def discretize_forward(A, B, dt, method):
    """Discretize flat arrays on the GPU (CuPy; NumPy under the simulator).

    Parameters
    ----------
    A, B : array, (M,)
        Contiguous, float or (both) complex of one precision.
    dt : array, (M,)
        Contiguous, real, of that precision.
    method : str
        A key of :data:`METHOD_CODES`.

    Returns
    -------
    Ab, Bb : array, (M,)
        Dtype of ``A``.
    """
    xp = array_module(A)
    cplx = A.dtype.kind == "c"
    ftype = dt.dtype
    code, alpha = METHOD_CODES[method]
    Ab = xp.empty_like(A)
    Bb = xp.empty_like(A)
    fwd, _ = _get_kernels("discretize", ftype, cplx, simulator())
    _launch(fwd, dt.shape[0], "current",
            (_real_view(A), _real_view(B), dt, _real_view(Ab), _real_view(Bb),
             np.int32(code), ftype.type(alpha)))
    return Ab, Bb


def discretize_backward(A, B, dt, gAb, gBb, method):
    """Per-element gradients of :func:`discretize_forward`.

    Parameters
    ----------
    A, B, dt : array, (M,)
        As in :func:`discretize_forward`.
    gAb, gBb : array, (M,)
        Upstream gradients, dtype of ``A``.

    Returns
    -------
    dA, dB : array, (M,)
        ``g * conj(df/dx)`` per element, dtype of ``A``.
    ddt : array, (M,)
        Real.
    """
    xp = array_module(A)
    cplx = A.dtype.kind == "c"
    ftype = dt.dtype
    code, alpha = METHOD_CODES[method]
    dA = xp.empty_like(A)
    dB = xp.empty_like(A)
    ddt = xp.empty_like(dt)
    _, bwd = _get_kernels("discretize", ftype, cplx, simulator())
    _launch(bwd, dt.shape[0], "current",
            (_real_view(A), _real_view(B), dt, _real_view(gAb), _real_view(gBb),
             _real_view(dA), _real_view(dB), ddt, np.int32(code), ftype.type(alpha)))
    return dA, dB, ddt


def chunk_length(R, L):
    """Steps per chunk so that rows * chunks is about the target thread count."""
    chunks = max(1, -(-_TARGET_THREADS // max(R, 1)))
    return int(min(_MAX_CHUNK, max(_MIN_CHUNK, -(-L // chunks))))


def recurrence(x, a, b, c, h0, chunk=None):
    """Run the diagonal recurrence (see the module docstring) on the GPU.

    Parameters
    ----------
    x : array, (R, L)
        Real input, float32 or float64, contiguous.
    a, b, c : array, (R, La, N)
        Contiguous, ``La`` 1 or L each; real of the dtype of ``x`` or (all
        three) complex of its precision.
    h0 : array, (R, N)
        State before the first sample, dtype of ``a``.
    chunk : int, optional
        Steps per chunk (default :func:`chunk_length`); the result does not
        depend on it beyond rounding.

    Returns
    -------
    y : array, (R, L)
        ``sum_n Re(c_t[n] h_t[n])``, dtype of ``x``.
    hf : array, (R, N)
        Final state, dtype of ``a``.
    """
    xp = array_module(x)
    cplx = a.dtype.kind == "c"
    R, L = x.shape
    N = a.shape[2]
    T = chunk_length(R, L) if chunk is None else int(chunk)
    K = -(-L // T)
    summary, carry, output = _get_kernels("recurrence", x.dtype, cplx, simulator())
    stream = "current"
    sa = xp.empty((R, K, N), a.dtype)
    sb = xp.empty((R, K, N), a.dtype)
    carries = xp.empty((R, K, N), a.dtype)
    hf = xp.empty((R, N), a.dtype)
    y = xp.empty((R, L), x.dtype)
    av, bv, cv = _real_view(a), _real_view(b), _real_view(c)
    _launch(summary, R * K, stream, (x, av, bv, _real_view(sa), _real_view(sb), np.int64(T)))
    _launch(carry, R * N, stream, (_real_view(h0), _real_view(sa), _real_view(sb),
                                   _real_view(carries), _real_view(hf)))
    _launch(output, R * K, stream, (x, av, bv, cv, _real_view(carries), y, np.int64(T)))
    return y, hf
