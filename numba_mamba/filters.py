"""State space models as filters on signals, in the conventions of scipy.signal.

A diagonal state space model with ``N`` states per channel filters a signal
``x`` sample by sample (one channel shown; every state independent)::

    Ab, Bb = discretize(A, B, dt, method)          # elementwise, see discretize
    h_t    = Ab_t * h_{t-1} + Bb_t * x_t           # N states, h_{-1} = zi
    y_t    = Re(sum_n C_t[n] h_t[n]) + D x_t

The output uses the current input ``x_t`` (the convention of the selective
scan).  ``scipy.signal.dlsim`` delays by one step; the same filter in its
convention is ``dlti(diag(Ab), Bb, C diag(Ab), C Bb + D, dt)`` with the
initial state ``x0 = zi``.

Shapes (glossary)
-----------------
==========  =============================================================
``x``       the signal, time along ``axis``; the other axes are channels
            and batch, written ``...`` below
``N``       states per channel (last axis of A, B, C, zi)
``L``       samples along ``axis``
``A``       (..., N), constant; real or complex (the diagonal)
``B, C``    constant (..., N), at most ``x.ndim`` dims; or varying along
            time: the shape of ``x`` with a state axis appended,
            ``x.ndim + 1`` dims, time at ``axis`` (length L or 1)
``dt``      scalar or broadcasting against ``x`` (per channel: length 1
            along ``axis``; per sample: length L)
``D``       optional, broadcasting against ``x`` like ``dt``
``zi, zf``  (..., N): the state before the first / after the last sample
==========  =============================================================

The channel axes of all arguments broadcast together (NumPy rules); ``y`` has
the broadcast channel shape with time at the same position from the end as in
``x``.

Engines
-------
``mode='scan'``  the recurrence: on the CPU a Numba ``@njit`` loop parallel
                 over channels; on the GPU the selective scan's parallel
                 kernel (real A with 'zoh' or 'mamba') or the chunked scan of
                 ``cuda_kernels/discretize.py`` (complex A, other methods).
``mode='conv'``  time-invariant filters only: the kernel ``K_k = Re(C Ab^k Bb)``
                 computed once, then an FFT convolution (``scipy.fft`` /
                 ``cupy.fft``); ``zi`` and ``zf`` by closed-form sums.  A
                 signal with a NaN or infinite sample is scanned instead
                 (see Causality).
``mode='auto'``  the scan, on the CPU and the GPU (see Causality).

Causality
---------
A filter never changes outputs before the sample that caused them.  The scan
computes ``y_t`` from the samples up to ``t`` only, so it keeps this exactly,
in floating point too.  The FFT convolution keeps it in exact arithmetic
only: its rounding error, of the order of ``eps * log2(n)`` times the
signal's norm times the kernel's, reaches every output, so one large sample
perturbs all earlier outputs (a 1e6 outlier in float32 by about 1e-3
relative at 2^14 samples), and a NaN or infinity would turn every earlier
output NaN.  Hence the policy: ``mode='auto'`` always scans (on the CPU the
scan is also the faster engine at every length measured; on the GPU the
convolution is faster from :data:`GPU_CONV_MIN_LENGTH` /
:data:`GPU_CONV_MIN_LENGTH_FAST_SCAN` samples, see benchmarks/RESULTS.md);
``mode='conv'`` is the caller's choice of speed over that guarantee for
signals of bounded dynamic range, and it checks the signal: where a sample
is not finite it runs the scan instead, so non-finite samples propagate only
forward in time in every mode.
"""

import math
from typing import Any

import numpy as np
from numba import njit, prange

from ._backends import gpu_module
from ._math import phi1
from ._validation import (array_namespace, check_int, complex_of, is_cupy_array, is_dask_array,
                          is_double)
from .discretize import (UnstableFilterWarning, as_param, check_method, check_state_matrix,
                         discretize_prepared, warn_unstable)
from .discretize import prepare as prepare_discretize

__all__ = ["GPU_CONV_MIN_LENGTH", "GPU_CONV_MIN_LENGTH_FAST_SCAN", "SSMFilter",
           "UnstableFilterWarning", "ssm_filter", "ssm_kernel"]

MODES = ("auto", "scan", "conv")
#: on the GPU, ``mode='conv'`` is faster than the scan from this length on for a filter
#: without a selective-scan fast path (complex A, or a method other than 'zoh'/'mamba')...
GPU_CONV_MIN_LENGTH = 2**14
#: ...and from this length on for one with it.  Both are the crossovers measured on an H200
#: for 64 channels x 16 states in float32 (benchmarks/bench_filter.py, benchmarks/RESULTS.md);
#: ``mode='auto'`` scans all the same (see Causality in the module docstring).
GPU_CONV_MIN_LENGTH_FAST_SCAN = 2**16


# --------------------------------------------------------------- CPU engine
@njit(inline="always")
def _advance(h, a, b, c, xt, zero):
    """One step of both CPU loops, in place: ``h = a h + b xt``; returns
    ``sum_n Re(c h)`` (``zero`` the real zero of the output's dtype).  Inlined
    in Numba's IR, so each loop compiles it with its own fastmath flags."""
    acc = zero
    for n in range(h.shape[0]):
        hn = a[n] * h[n] + b[n] * xt
        h[n] = hn
        acc += (c[n] * hn).real
    return acc


@njit(parallel=True, cache=True)
def _recurrence_cpu(x, a, b, c, h0, y, hf):
    """h_t = a_t h_{t-1} + b_t x_t; y_t = sum_n Re(c_t h_t); overwrites y and hf.

    x (R, L) real; a, b, c (R, La, N), La in {1, L}; h0, hf (R, N).
    """
    R, L = x.shape
    for r in prange(R):
        h = h0[r].copy()
        va, vb, vc = a.shape[1] > 1, b.shape[1] > 1, c.shape[1] > 1
        ar, br, cr = a[r, 0].copy(), b[r, 0].copy(), c[r, 0].copy()
        zero = x[r, 0] * 0
        for t in range(L):
            if va:
                ar = a[r, t]
            if vb:
                br = b[r, t]
            if vc:
                cr = c[r, t]
            y[r, t] = _advance(h, ar, br, cr, x[r, t], zero)
        hf[r] = h


# 'reassoc' lets LLVM vectorize the sum over states; the
# recurrence itself is one multiply-add per state and step either way
@njit(parallel=True, cache=True, fastmath={"reassoc", "contract"})
def _recurrence_lti_cpu(x, a, b, c, h0, y, hf):
    """_recurrence_cpu for constant a, b, c (R, N): each row's coefficients in locals."""
    R, L = x.shape
    for r in prange(R):
        h = h0[r].copy()
        ar, br, cr = a[r].copy(), b[r].copy(), c[r].copy()
        zero = x[r, 0] * 0
        for t in range(L):
            y[r, t] = _advance(h, ar, br, cr, x[r, t], zero)
        hf[r] = h


# ------------------------------------------------------------ validation
def _is_array(v):
    return isinstance(v, np.ndarray) or is_cupy_array(v)


def _normalize_axis(axis, ndim):
    if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, (int, np.integer)) \
            or not -ndim <= axis < ndim:
        raise ValueError(f"axis must be an integer in [{-ndim}, {ndim - 1}] for x with "
                         f"{ndim} dims, got {axis!r}")
    return int(axis) % ndim


def _time_param(name, v, xp, x_ndim, ax, L):
    """dt or D: broadcast against x; returns (..., Lv) with time last, Lv in {1, L}."""
    v = as_param(name, v, xp, allow_complex=False)
    if v.ndim > x_ndim:
        raise ValueError(f"{name} must broadcast against x (at most {x_ndim} dims), got "
                         f"shape {tuple(v.shape)}")
    v = v.reshape((1,) * (x_ndim - v.ndim) + tuple(v.shape))
    v = xp.moveaxis(v, ax, -1)
    if v.shape[-1] not in (1, L):
        raise ValueError(f"{name} must have length 1 or {L} (the samples of x) along axis "
                         f"{ax}, got shape {tuple(xp.moveaxis(v, -1, ax).shape)}")
    return v


def _state_param(name, v, xp, x_ndim, ax, L, N):
    """B or C: constant (..., N) -> (..., 1, N), or varying -> (..., Lv, N)."""
    v = as_param(name, v, xp)
    if v.ndim == 0:
        v = v.reshape(1)
    if v.shape[-1] not in (1, N):
        raise ValueError(f"{name} must have {N} states (like A) in its last axis, got shape "
                         f"{tuple(v.shape)}")
    if v.ndim <= x_ndim:
        return v[..., None, :]
    if v.ndim == x_ndim + 1:
        v = v.reshape(tuple(v.shape))
        vt = xp.moveaxis(v, ax, -2)
        if vt.shape[-2] not in (1, L):
            raise ValueError(
                f"{name} varies along time (x.ndim + 1 = {x_ndim + 1} dims): it must have "
                f"length {L} (the samples of x) or 1 along axis {ax}, got shape "
                f"{tuple(v.shape)}")
        return vt
    raise ValueError(f"{name} must have at most {x_ndim} dims (constant, (..., N)) or "
                     f"{x_ndim + 1} dims (varying along time, x's shape + (N,)), got shape "
                     f"{tuple(v.shape)}")


def _broadcast_lead(shapes):
    try:
        return tuple(np.broadcast_shapes(*shapes.values()))
    except ValueError:
        desc = ", ".join(f"{k} {v}" for k, v in shapes.items())
        raise ValueError(f"the channel axes of the arguments must broadcast together, got "
                         f"{desc}") from None


def _check_mode(mode):
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}")


def _prepare(A, B, C, x, D, dt, method, axis, zi, stacklevel=4):
    """Validate and bring everything to the canonical layout (see module docstring).

    ``stacklevel`` of an :class:`UnstableFilterWarning`, counted from this
    function (4: the caller of ``ssm_filter`` through ``_filter``).

    Returns a dict: xp, ftype, ctype, cplx, lead, L, N, ax, x (R, L), Ab (R, Ld, N),
    Bb (R, Lb, N), C (R, Lc, N), h0 (R, N), D (..., Lv) or None, A (R, N), dt (R, Ld),
    B (R, Lb, N) (the latter three for the selective-scan path).
    """
    check_method(method)
    given = dict(A=A, B=B, C=C, x=x, D=D, dt=dt, zi=zi)
    xp = array_namespace(**{k: v for k, v in given.items() if _is_array(v)})
    if x is None:
        raise TypeError("x is required, got None")
    x = as_param("x", x, xp, allow_complex=False)
    if x.ndim == 0:
        raise ValueError("x must have at least 1 dim (time along axis), got a scalar")
    ax = _normalize_axis(axis, x.ndim)
    xm = xp.moveaxis(x, ax, -1)
    L = xm.shape[-1]
    if L == 0:
        raise ValueError(f"x must have at least one sample along axis {axis}, got shape "
                         f"{tuple(x.shape)}")
    A = as_param("A", A, xp)
    if A.ndim > x.ndim:
        raise ValueError(f"A must have shape (..., N) with at most {x.ndim} dims (x.ndim), "
                         f"got {tuple(A.shape)}")
    check_state_matrix(A, xp)
    N = A.shape[-1]
    Bm = _state_param("B", B, xp, x.ndim, ax, L, N)
    Cm = _state_param("C", C, xp, x.ndim, ax, L, N)
    dtm = _time_param("dt", dt, xp, x.ndim, ax, L)
    if not bool(xp.isfinite(dtm).all()) or bool((dtm < 0).any()):
        raise ValueError("dt must be finite and >= 0 (the time step before each sample)")
    Dm = None if D is None else _time_param("D", D, xp, x.ndim, ax, L)
    if zi is not None:
        zi = as_param("zi", zi, xp)
        if zi.ndim == 0 or zi.shape[-1] != N:
            raise ValueError(f"zi must have shape (..., {N}) (channels, states like A), got "
                             f"{tuple(zi.shape)}")
    shapes = {"x": tuple(xm.shape[:-1]), "A": tuple(A.shape[:-1]),
              "B": tuple(Bm.shape[:-2]), "C": tuple(Cm.shape[:-2]),
              "dt": tuple(dtm.shape[:-1])}
    if Dm is not None:
        shapes["D"] = tuple(Dm.shape[:-1])
    if zi is not None:
        shapes["zi"] = tuple(zi.shape[:-1])
    lead = _broadcast_lead(shapes)
    R = math.prod(lead)

    # compute precision: that of x (half precisions compute in float32)
    ftype = np.dtype(np.float64 if is_double(x.dtype) else np.float32)
    cplx = any(v is not None and v.dtype.kind == "c" for v in (A, Bm, Cm, zi))
    ctype = complex_of(ftype) if cplx else ftype

    def rows(v, tail):
        return xp.ascontiguousarray(xp.broadcast_to(v, lead + tail)).reshape((R,) + tail)

    A_c = A.astype(ctype, copy=False)
    dt_c = dtm.astype(ftype, copy=False)
    # Bb is linear in B for every method: discretize with B = 1, then scale
    Ab, G = discretize_prepared(A_c[..., None, :], xp.ones((), ctype), dt_c[..., None], method, xp,
                        np.broadcast_shapes(A_c[..., None, :].shape, dt_c[..., None].shape))
    Bb = G * Bm.astype(ctype, copy=False)
    warn_unstable(A_c, Ab, method, stacklevel)
    Ld, Lb, Lc = Ab.shape[-2], Bb.shape[-2], Cm.shape[-2]
    out = dict(
        xp=xp, ftype=ftype, ctype=ctype, cplx=cplx, lead=lead, L=L, N=N, ax=ax,
        x_ndim=x.ndim, x_dtype=x.dtype, method=method,
        x=rows(xm.astype(ftype, copy=False), (L,)),
        Ab=rows(Ab, (Ld, N)), Bb=rows(Bb, (Lb, N)),
        C=rows(Cm.astype(ctype, copy=False), (Lc, N)),
        h0=(xp.zeros((R, N), ctype) if zi is None
            else rows(zi.astype(ctype, copy=False), (N,))),
        D=None if Dm is None else Dm.astype(ftype, copy=False),
        # for the selective-scan path (real A only)
        A=None if cplx else rows(A_c, (N,)),
        dt=rows(dt_c, (dtm.shape[-1],)),
        B=rows(Bm.astype(ctype, copy=False), (Bm.shape[-2], N)),
    )
    return out


def _finish(p, y):
    """(R, L) -> broadcast channel shape with time back at its axis; add D x; cast."""
    xp = p["xp"]
    y = y.reshape(p["lead"] + (p["L"],))
    if p["D"] is not None:
        y = y + p["D"] * p["x"].reshape(p["lead"] + (p["L"],))
    ax_from_end = p["ax"] - p["x_ndim"]  # negative
    y = xp.moveaxis(y, -1, ax_from_end)
    return y.astype(p["x_dtype"], copy=False)


# ------------------------------------------------------------------ engines
def _scan(p):
    xp = p["xp"]
    x, Ab, Bb, C, h0 = p["x"], p["Ab"], p["Bb"], p["C"], p["h0"]
    if xp is np:
        y = np.empty_like(x)
        hf = np.empty_like(h0)
        if Ab.shape[1] == Bb.shape[1] == C.shape[1] == 1:
            _recurrence_lti_cpu(x, Ab[:, 0], Bb[:, 0], C[:, 0], h0, y, hf)
        else:
            _recurrence_cpu(x, Ab, Bb, C, h0, y, hf)
        return y, hf
    if not p["cplx"] and p["method"] in ("zoh", "mamba"):
        return _selective_scan_gpu(p)

    return gpu_module("discretize").recurrence(x, Ab, Bb.astype(Ab.dtype, copy=False),
                                     C.astype(Ab.dtype, copy=False), h0)


def _selective_scan_gpu(p):
    """Real A with 'zoh' or 'mamba': the selective scan's parallel kernel.

    The scan computes exp(delta A) h + delta B' x; 'mamba' is B' = B and 'zoh'
    is B' = phi1(dt A) B (so that delta B' = Bb).  One channel per row, one
    group per channel for B and C that vary along time.
    """
    from .scan import selective_scan

    xp = p["xp"]
    x, A, dt, B, C, h0 = p["x"], p["A"], p["dt"], p["B"], p["C"], p["h0"]
    R, L = x.shape
    Bp = B
    if p["method"] == "zoh":
        Bp = B * phi1(dt[:, :, None] * A[:, None, :], xp)  # (R, Ld or Lb, N)

    def as_scan(M):  # (R, 1, N) -> (R, N); (R, L, N) -> (1, R, N, L) grouped
        if M.shape[1] == 1:
            return xp.ascontiguousarray(M[:, 0])
        return xp.ascontiguousarray(M.transpose(0, 2, 1)[None])

    delta = xp.ascontiguousarray(xp.broadcast_to(dt, (R, L)))[None]
    out, last = selective_scan(x[None], delta, A, as_scan(Bp), as_scan(C),
                               return_last_state=True, initial_state=h0[None])
    return out[0], last[0]


def _next_fast_len(n, xp):
    if xp is np:
        from scipy.fft import next_fast_len
        return next_fast_len(n, real=True)
    try:
        from cupyx.scipy.fft import next_fast_len
        return next_fast_len(n)
    except ImportError:  # pragma: no cover - old CuPy
        from scipy.fft import next_fast_len
        return next_fast_len(n, real=True)


def _fft_module(xp):
    if xp is np:
        import scipy.fft
        return scipy.fft
    return xp.fft


def _block(L):
    """Block length T of the power tables: T * ceil(L / T) >= L, T ~ sqrt(L)."""
    return max(1, math.isqrt(L - 1) + 1) if L > 1 else 1


def _power_sums(coefs, Ab, L, xp):
    """S[i, r, k] = Re(sum_n coefs[i, r, n] Ab[r, n]^k) for k < L.

    Summary of algorithm: with k = b T + j, ``Ab^k = Ab^(bT) Ab^j``, so each
    block of T powers is one batched matrix product of the per-block
    coefficients ``coefs * Ab^(bT)`` (R, n_blocks, N) with the table
    ``Ab^j`` (R, N, T): R N L multiply-adds in GEMM, and only
    O(R N (T + L/T)) powers (accurate: ``x ** k`` is evaluated directly, not
    by repeated multiplication).
    """
    R, N = Ab.shape
    T = _block(L)
    nb = -(-L // T)
    P = Ab[:, :, None] ** xp.arange(T, dtype=Ab.real.dtype)                 # (R, N, T)
    start = Ab[:, None, :] ** (xp.arange(nb, dtype=Ab.real.dtype) * T)[None, :, None]
    out = []
    for cf in coefs:
        S = xp.matmul(cf[:, None, :] * start, P)                            # (R, nb, T)
        out.append(S.real.reshape(R, nb * T)[:, :L])
    return out


def decayed_sum(x, Ab, xp):
    """E[r, n] = sum_t Ab[r, n]^(L-1-t) x[r, t] for real x (R, L) and Ab (R, N).

    The end state of the filter from a zero start is ``Bb * E`` (and its
    state transition ``Ab^L``), without computing its outputs.

    Summary of algorithm: with ``t = b T + m`` in blocks of ``T ~ sqrt(L)``,
    ``Ab^(L-1-t) = Ab^(T-1-m) Ab^(L-(b+1)T)``: one batched matrix product of
    the full blocks of ``x`` (a view, not a copy) with the table
    ``Ab^(T-1-m)`` (R, T, N), summed over the blocks with the weights
    ``Ab^(L-(b+1)T)``; the last ``L mod T`` samples take the table's last
    rows.  Complex tables are applied as two real products (``x`` is not
    cast to complex).  Powers are evaluated directly, not by repeated
    multiplication.
    """
    R, L = x.shape
    T = _block(L)
    nb = L // T
    rtype = Ab.real.dtype

    def times(X, P):
        if P.dtype.kind == "c":
            return xp.matmul(X, P.real) + 1j * xp.matmul(X, P.imag)
        return xp.matmul(X, P)

    P = Ab[:, None, :] ** xp.arange(T - 1, -1, -1, dtype=rtype)[None, :, None]  # (R, T, N)
    weights = Ab[:, None, :] ** (L - T * xp.arange(1, nb + 1, dtype=rtype))[None, :, None]
    E = (weights * times(x[:, :nb * T].reshape(R, nb, T), P)).sum(axis=1)
    rest = L - nb * T
    if rest:
        E = E + times(x[:, None, nb * T:], P[:, T - rest:])[:, 0]
    return E


def _conv(p):
    """Time-invariant filter by FFT convolution with K_k = Re(sum_n C Ab^k Bb)."""
    xp = p["xp"]
    x, Ab, Bb, C, h0 = p["x"], p["Ab"], p["Bb"], p["C"], p["h0"]
    if Ab.shape[1] != 1 or Bb.shape[1] != 1 or C.shape[1] != 1:
        raise ValueError("mode='conv' needs a time-invariant filter (dt, B and C constant "
                         "along time); use mode='scan' for a time-varying one")
    if not bool(xp.isfinite(x).all()):
        return _scan(p)  # (a NaN or inf would reach every earlier output: Causality)
    R, L = x.shape
    Ab, Bb, C = Ab[:, 0], Bb[:, 0], C[:, 0]                                 # (R, N)
    K, Y0 = _power_sums([C * Bb, C * h0 * Ab], Ab, L, xp)
    n = _next_fast_len(2 * L - 1, xp)
    fft = _fft_module(xp)
    y = fft.irfft(fft.rfft(x, n, axis=-1) * fft.rfft(K.astype(x.dtype, copy=False), n,
                                                     axis=-1), n, axis=-1)[:, :L]
    y = y + Y0
    hf = Ab ** L * h0 + Bb * decayed_sum(x, Ab, xp)  # (zf, in closed form)
    return xp.ascontiguousarray(y.astype(x.dtype, copy=False)), hf.astype(h0.dtype, copy=False)


def _pick_mode(mode):
    """The engine of ``mode``: 'auto' is the scan, on every device (Causality)."""
    _check_mode(mode)
    return "scan" if mode == "auto" else mode


def _filter(A, B, C, x, D, dt, method, axis, zi, mode):
    engine = _conv if _pick_mode(mode) == "conv" else _scan
    p = _prepare(A, B, C, x, D, dt, method, axis, zi)
    y, hf = engine(p)
    return _finish(p, y), hf.reshape(p["lead"] + (p["N"],))


def ssm_filter(A: Any, B: Any, C: Any, x: Any, D: Any = None, dt: Any = 1.0,
               method: str = "zoh", axis: int = -1, zi: Any = None, mode: str = "auto"):
    """Filter a signal with a diagonal state space model (like ``scipy.signal.lfilter``).

    Parameters
    ----------
    A : array_like, shape (..., N), real or complex
        Diagonal continuous-time state matrix per channel; ``Re(A) < 0`` for
        a stable filter.
    B, C : array_like
        Input and output vectors: constant, shape (..., N) with at most
        ``x.ndim`` dims, or varying along time (the selective filter): the
        shape of ``x`` with a state axis appended (``x.ndim + 1`` dims), time
        at ``axis``.
    x : array_like
        Real signal, time along ``axis``; float32 or float64 (float16 and
        bfloat16 compute in float32).
    D : array_like, optional
        Skip term ``D x_t``, broadcasting against ``x``.
    dt : float or array_like, optional
        Time step (default 1), broadcasting against ``x``: a scalar, one per
        channel (length 1 along ``axis``), or one per sample (length L: the
        step from the previous sample to this one, which also describes an
        irregularly sampled series; the first is the step from the time of
        ``zi``).  Must be >= 0.
    method : {'zoh', 'euler', 'backward_diff', 'bilinear', 'mamba'}, optional
        Discretization, see :func:`numba_mamba.discretize`.  Default 'zoh'.
    axis : int, optional
        Time axis of ``x`` (default -1).
    zi : array_like, shape (..., N), optional
        State ``h_{-1}`` before the first sample (real or complex).  If given,
        the final state is returned too.
    mode : {'auto', 'scan', 'conv'}, optional
        Engine: 'auto' (default) and 'scan' run the recurrence; 'conv' the
        FFT convolution, which needs dt, B and C constant along time, and
        is causal in exact arithmetic only (its rounding reaches earlier
        outputs; a signal with NaN or infinite samples is scanned instead).
        See Causality in :mod:`numba_mamba.filters`.

    Returns
    -------
    y : array
        Filtered signal in the dtype of ``x`` (native byte order; integer
        signals as float64), time at ``axis`` (counted from
        the end), channel axes broadcast over all arguments.
    zf : array, shape (..., N)
        Only if ``zi`` is given: the state after the last sample, in the
        compute precision (complex if any of A, B, C, zi is); pass it as
        ``zi`` of the next piece to continue the signal.

    Raises
    ------
    ValueError
        Shapes that do not fit (the message names the argument, the expected
        and the actual shape), empty ``x``, negative or non-finite ``dt``,
        non-finite ``A`` or one without states, unknown ``method`` or
        ``mode``, ``mode='conv'`` for a time-varying filter, ``axis`` not an
        integer axis of ``x`` (a ``bool`` is not one).
    TypeError
        Unsupported dtype; NumPy and CuPy arrays mixed.

    Warns
    -----
    UnstableFilterWarning
        If ``Re(A) > 0`` anywhere (unstable poles), or the discretized poles
        leave the unit circle (``|Ab| > 1``, e.g. 'euler' with a large
        ``dt``).  The filter still runs: the output may grow without bound.

    See Also
    --------
    ssm_kernel : the impulse response K used by ``mode='conv'``.
    SSMFilter : the same filter, streaming in pieces or sample by sample.
    numba_mamba.selective_scan : the scan behind ``mode='scan'`` on the GPU.
    scipy.signal.lfilter, scipy.signal.dlsim

    Notes
    -----
    Each state is a first-order IIR filter and the output sums them::

        h_t = Ab_t h_{t-1} + Bb_t x_t,     h_{-1} = zi
        y_t = Re(sum_n C_t[n] h_t[n]) + D x_t

    For a time-invariant filter state ``n`` is
    ``scipy.signal.lfilter([Bb_n], [1, -Ab_n], x, zi=Ab_n * zi_n)`` (scipy's
    ``zi`` is the delay-line content ``Ab zi``, and its ``zf`` is
    ``Ab * zf``).  The output uses the current sample (the selective scan's
    convention); ``scipy.signal.dlsim`` has a one-step delay, and the same
    filter there is ``dlti(diag(Ab), Bb, C diag(Ab), C Bb + D, dt=dt)`` with
    ``x0 = zi``.

    Complex ``A`` (S4D-style diagonal systems) gives complex states and the
    real part of the output; a complex-conjugate pair of poles is written as
    one of them with ``C`` doubled.  On the GPU, complex A and the methods
    'euler', 'backward_diff', 'bilinear' run on a chunked scan kernel, real A
    with 'zoh' or 'mamba' on the selective scan.

    The recurrence is the composition of affine maps ``h -> a h + b x``,
    associative under ``(a1, b1) o (a2, b2) = (a2 a1, a2 b1 + b2)``, which
    is what lets the GPU scan it in parallel [2]_.  ``mode='conv'`` computes
    ``y = K * x`` (causal, FFT of length >= 2L - 1) with
    ``K_k = Re(sum_n C_n Ab_n^k Bb_n)`` and adds ``Re(sum_n C_n Ab_n^(t+1) zi_n)``.

    References
    ----------
    .. [1] A. Gu and T. Dao, "Mamba: Linear-Time Sequence Modeling with
       Selective State Spaces", arXiv:2312.00752, 2023.
    .. [2] G. E. Blelloch, "Prefix Sums and Their Applications",
       CMU-CS-90-190, 1990.

    Examples
    --------
    A single state is a first-order low-pass filter, the same as ``lfilter``:

    >>> import numpy as np
    >>> from scipy import signal
    >>> import numba_mamba as nm
    >>> x = np.array([1.0, 0.0, 0.0, 2.0, 0.0])
    >>> y = nm.ssm_filter(np.array([-1.0]), np.array([1.0]), np.array([1.0]), x, dt=0.5)
    >>> np.round(y, 4)
    array([0.3935, 0.2387, 0.1447, 0.8747, 0.5306])
    >>> Ab, Bb = nm.discretize(-1.0, 1.0, 0.5)
    >>> bool(np.allclose(y, signal.lfilter([Bb], [1, -Ab], x)))
    True

    Four channels of 8 states, time along axis 0, split in two pieces:

    >>> rng = np.random.default_rng(0)
    >>> A = -rng.uniform(0.1, 1.0, (4, 8)); B = rng.standard_normal((4, 8))
    >>> C = rng.standard_normal((4, 8)); x = rng.standard_normal((100, 4))
    >>> y = nm.ssm_filter(A, B, C, x, axis=0)
    >>> y1, h = nm.ssm_filter(A, B, C, x[:60], axis=0, zi=np.zeros((4, 8)))
    >>> y2, _ = nm.ssm_filter(A, B, C, x[60:], axis=0, zi=h)
    >>> bool(np.allclose(y, np.concatenate([y1, y2])))
    True
    >>> bool(np.allclose(y, nm.ssm_filter(A, B, C, x, axis=0, mode="conv")))
    True
    """
    if is_dask_array(A, B, C, x, D, dt, zi):  # lazily, chunk by chunk: numba_mamba.dask
        from .dask import ssm_filter as dask_filter
        return dask_filter(A, B, C, x, D, dt, method, axis, zi, mode)
    y, zf = _filter(A, B, C, x, D, dt, method, axis, zi, mode)
    return y if zi is None else (y, zf)


def ssm_kernel(A: Any, B: Any, C: Any, dt: Any, L: int, method: str = "zoh"):
    """Impulse response ``K_k = Re(sum_n C_n Ab_n^k Bb_n)`` of a time-invariant SSM.

    Parameters
    ----------
    A : array_like, shape (..., N), real or complex
    B, C : array_like, shape (..., N)
        Broadcasting against ``A``.
    dt : float or array_like
        Time step: a scalar or one per channel, shape (..., 1).
    L : int
        Number of taps (>= 1).
    method : str, optional
        Discretization, see :func:`numba_mamba.discretize`.  Default 'zoh'.

    Returns
    -------
    K : array, shape (..., L)
        Real, in the precision of the array inputs (float64 if any is).
        ``ssm_filter(A, B, C, x, dt=dt)`` equals the causal convolution of
        ``x`` with ``K`` (plus ``D x``).

    Raises
    ------
    ValueError
        ``A`` without states (N = 0) or not finite; negative or non-finite
        ``dt``; shapes that do not broadcast; unknown ``method``; ``L < 1``.
    TypeError
        ``L`` not an integer (a ``bool`` is not one); unsupported dtype.

    Warns
    -----
    UnstableFilterWarning
        As :func:`ssm_filter`: the taps then grow without bound.

    Notes
    -----
    ``K_0 = C Bb`` because the output uses the current sample; this is
    ``scipy.signal.dimpulse`` of ``dlti(diag(Ab), Bb, C diag(Ab), C Bb, dt)``.
    Powers are evaluated directly in blocks (see ``_power_sums``), never by
    ``L`` repeated multiplications.

    Examples
    --------
    >>> import numpy as np
    >>> import numba_mamba as nm
    >>> K = nm.ssm_kernel(np.array([-1.0, -2.0]), np.ones(2), np.ones(2), 0.1, 4)
    >>> np.round(K, 4)
    array([0.1858, 0.1603, 0.1387, 0.1202])
    """
    xp = array_namespace(**{k: v for k, v in dict(A=A, B=B, C=C, dt=dt).items()
                            if _is_array(v)})
    check_method(method)
    L = check_int("L", L, low=1, what=" (the number of taps)")
    A = as_param("A", A, xp)
    if A.ndim == 0:
        A = A.reshape(1)
    check_state_matrix(A, xp)
    B = as_param("B", B, xp)
    C = as_param("C", C, xp)
    if is_double(C.dtype) and not is_double(A.dtype):  # (C's precision counts too)
        A = A.astype(np.complex128 if A.dtype.kind == "c" else np.float64)
    xp, A, B, dt, shape, _ = prepare_discretize(A, B, dt, method)
    Ab, Bb = discretize_prepared(A, B, dt, method, xp, shape)
    warn_unstable(A, Ab, method, stacklevel=2)
    try:
        shape = np.broadcast_shapes(Ab.shape, C.shape)
    except ValueError:
        raise ValueError(f"C must broadcast against A, B and dt (shape {tuple(Ab.shape)}), "
                         f"got {tuple(C.shape)}") from None
    lead, N = shape[:-1], shape[-1]
    R = math.prod(lead)
    Ab = xp.ascontiguousarray(xp.broadcast_to(Ab, shape)).reshape(R, N)
    W = xp.broadcast_to(C.astype(Bb.dtype, copy=False) * Bb, shape).reshape(R, N)
    (K,) = _power_sums([W], Ab, L, xp)
    return K.reshape(lead + (L,))


class SSMFilter:
    """A time-invariant SSM filter that keeps its state: streaming in pieces or per sample.

    Parameters
    ----------
    A, B, C, D, dt, method
        As :func:`ssm_filter` with the time axis last: ``B``, ``C`` constant
        (..., N); ``D`` and ``dt`` broadcasting against a piece (..., L), i.e.
        a scalar or (..., 1) per channel.
    zi : array_like, shape (..., N), optional
        Initial state (zeros of the broadcast shape at the first call if
        omitted).
    mode : {'auto', 'scan', 'conv'}, optional
        Engine for :meth:`__call__`.

    Raises
    ------
    ValueError, TypeError
        As :func:`ssm_filter`, at construction: every argument is checked
        here (with a one-sample signal whose channels broadcast against
        any), not at the first call.  A later piece or sample whose
        channels do not broadcast against the state's raises ValueError
        naming it (``zi``); :meth:`reset` starts a signal of other channels.

    Attributes
    ----------
    state : array or None
        The state after the samples seen so far (None before the first when
        no ``zi`` was given).

    Notes
    -----
    Pieces joined equal one pass: ``f(x[..., :k])`` then ``f(x[..., k:])``
    returns the pieces of ``ssm_filter(..., x)``.  :meth:`step` runs one
    sample in O(N) per channel (precomputed ``Ab``, ``Bb``, kept per dtype,
    array kind and shapes of the sample and the state), without the
    validation and layout work of a call.  ``dt`` may be overridden per piece
    or per step (irregular sampling).

    Examples
    --------
    >>> import numpy as np
    >>> import numba_mamba as nm
    >>> rng = np.random.default_rng(0)
    >>> A = -rng.uniform(0.1, 1, (2, 4)); B = np.ones((2, 4)); C = rng.standard_normal((2, 4))
    >>> x = rng.standard_normal((2, 50))
    >>> f = nm.SSMFilter(A, B, C)
    >>> ys = [f(x[:, :20]), f(x[:, 20:49]), f.step(x[:, 49])[:, None]]
    >>> bool(np.allclose(np.concatenate(ys, axis=-1), nm.ssm_filter(A, B, C, x)))
    True
    """

    def __init__(self, A: Any, B: Any, C: Any, D: Any = None, dt: Any = 1.0,
                 method: str = "zoh", zi: Any = None, mode: str = "auto"):
        check_method(method)
        _check_mode(mode)
        self._args = dict(A=A, B=B, C=C, D=D, dt=dt, method=method)
        self.mode = mode
        _probe(A, B, C, D, dt, method, zi)  # (every argument checked here, not at a first call)
        self.state = zi
        self._step_cache = None

    def reset(self, zi: Any = None) -> None:
        """Forget the state (start again from ``zi``, or zeros) and the
        coefficients :meth:`step` keeps."""
        self.state = zi
        self._step_cache = None

    def __call__(self, x: Any, dt: Any = None):
        """Filter the next piece ``x`` (..., L), time last; returns y and updates the state."""
        a = self._args
        zi = self.state
        with _state_hint(zi):
            y, zf = _filter(a["A"], a["B"], a["C"], x, a["D"], a["dt"] if dt is None else dt,
                            a["method"], -1, zi, self.mode)
        self.state = zf
        return y

    def step(self, x: Any, dt: Any = None):
        """Filter one sample ``x`` (...,) (the channel shape); returns y of that shape."""
        xp = array_namespace(**{k: v for k, v in dict(x=x, state=self.state).items()
                                if _is_array(v)})
        x = as_param("x", x, xp, allow_complex=False)
        ftype = np.dtype(np.float64 if is_double(x.dtype) else np.float32)
        a = self._args
        # the coefficients depend on the dtype, the array kind, the shape of the
        # sample and of the state (which they are broadcast to), and dt
        key = (ftype, xp, x.shape, None if self.state is None else tuple(self.state.shape))
        cache = self._step_cache
        if dt is None and cache is not None and cache[0] == key:
            Ab, Bb, C, D = cache[1:]
        else:
            with _state_hint(self.state):
                p = _prepare(a["A"], a["B"], a["C"], x[..., None], a["D"],
                             a["dt"] if dt is None else dt, a["method"], -1, self.state,
                             stacklevel=3)
            shape = p["lead"] + (p["N"],)
            if p["Bb"].shape[1] != 1 or p["C"].shape[1] != 1:
                raise ValueError("SSMFilter.step needs B and C constant along time")
            Ab = p["Ab"][:, 0].reshape(shape)
            Bb = p["Bb"][:, 0].reshape(shape)
            C = p["C"][:, 0].reshape(shape)
            D = None if p["D"] is None else p["D"][..., 0]
            self._step_cache = (key, Ab, Bb, C, D) if dt is None else None
        h = self.state
        if h is None:
            h = xp.zeros(np.broadcast_shapes(Ab.shape, x.shape + (1,)), Ab.dtype)
        h = Ab * h + Bb * x[..., None].astype(ftype, copy=False)
        y = (C * h).sum(axis=-1).real
        if D is not None:
            y = y + D * x
        self.state = h
        return y.astype(x.dtype, copy=False)


def _probe(A, B, C, D, dt, method, zi):
    """Validate :class:`SSMFilter`'s arguments as its first call would:
    with a one-sample signal whose channel axes (all of length 1) broadcast
    against any channel shape the arguments have."""
    given = dict(A=A, B=B, C=C, D=D, dt=dt, zi=zi)
    arrays = {k: v for k, v in given.items() if _is_array(v) or isinstance(v, (list, tuple))}
    xp = array_namespace(**{k: v for k, v in arrays.items() if _is_array(v)})
    ndim = max([1] + [np.ndim(v) for k, v in arrays.items()])
    _prepare(A, B, C, xp.zeros((1,) * ndim), D, dt, method, -1, zi, stacklevel=4)


class _state_hint:
    """Context: a ValueError about the channel axes gets a hint about the
    filter's ``state`` (kept from earlier samples) where there is one."""

    def __init__(self, state):
        self.state = state

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if kind is ValueError and self.state is not None and "channel axes" in str(exc):
            raise ValueError(f"{exc} (zi is the filter's state from earlier samples, channel "
                             f"shape {tuple(self.state.shape[:-1])}: call reset() to start a "
                             f"signal of other channels)") from None
        return False
