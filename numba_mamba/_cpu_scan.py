"""CPU backend of the selective scan: Numba ``@njit(parallel=True)`` kernels.

The public layer (:mod:`numba_mamba.scan`) validates the inputs and hands this
module C-contiguous arrays of one compute dtype ``ftype`` (float32 or float64)
in the canonical layout below; nothing here validates or moves axes.

Math
----
Mamba's selective scan (Gu & Dao 2023), with zero-order hold for ``A`` and
Euler for ``B`` as in the reference implementation::

    delta_t = softplus(delta_t + delta_bias)          # bias and softplus optional
    h_t     = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t     (over the N states)
    y_t     = sum_n C_t[n] * h_t[n]
    out_t   = (y_t + D * u_t) * silu(z_t)             # D and z optional

with ``h_0 = initial_state`` (zeros when None), ``softplus(x) = log1p(exp(x))``
(``x`` itself for ``x > 20``) and ``silu(z) = z * sigmoid(z)``.  Per channel
the recurrence is the linear scan ``h_t = a_t * h_{t-1} + b_t`` whose
associative operator is ``(a1, b1) o (a2, b2) = (a2*a1, a2*b1 + b2)``; on the
CPU one thread walks it sequentially.

Canonical layout
----------------
=================  ===============================  ===========================
name               shape                            notes
=================  ===============================  ===========================
``u``, ``delta``   ``(Bt, Dc, L)``                  batch, channels, length
``z``              ``(Bt, Dc, L)`` or None
``A``              ``(Dc, N)``                      N states per channel
``B``, ``C``       ``(Dc, N)`` or ``(Bt, G, N, L)``  constant or variable, each
                                                    on its own; channel ``d``
                                                    uses group ``d // (Dc // G)``
``D``              ``(Dc,)`` or None
``delta_bias``     ``(Dc,)`` or None
``initial_state``  ``(Bt, Dc, N)`` or None          None means zeros
``chunk_states``   ``(Bt, Dc, n_chunks, N)``        saved: state entering each
                                                    chunk of ``chunk_size`` steps
=================  ===============================  ===========================

Algorithm
---------
Forward: one parallel task per (batch, channel) pair keeps the N states of
that channel in a small local array and sweeps over time, writing ``out`` and,
at the start of every chunk of ``chunk_size`` steps, a copy of the state.  Only
these chunk-boundary states (and ``h_L``) are kept, never the (Bt, Dc, L, N)
history.

Backward: per channel, walk the chunks in reverse.  For each chunk, recompute
the states inside it from its saved boundary state into a local
``(chunk_size + 1, N)`` buffer (with the decays ``exp(delta_t A)`` and the
effective steps), then run the adjoint recurrence backwards through the chunk::

    dy_t = dout_t * silu(z_t)                (dout_t without z)
    dh_t = C_t * dy_t + q_{t+1},   q_{t+1} = exp(delta_{t+1} A) * dh_{t+1},
    q_{L+1} = dlast_state,         dinitial_state = q_1

and from ``dh_t``: ``du``, ``ddelta`` (through the softplus by multiplying with
``sigmoid(delta + delta_bias)``), ``dA``, ``dB``, ``dC``, ``dD``,
``ddelta_bias``.  Reductions are race-free: see :func:`_backward_kernel`.

To keep compile time low there is one forward and one backward kernel, each
compiled once per dtype: constant B/C are passed as ``(1, Dc, N, 1)`` views
indexed by the same expression as variable ones (batch and time index forced
to 0, group size 1), and absent optional inputs are replaced by tiny dummy
arrays plus a flag.

References
----------
.. [1] A. Gu and T. Dao, "Mamba: Linear-Time Sequence Modeling with Selective
   State Spaces", arXiv:2312.00752, 2023.
.. [2] G. E. Blelloch, "Prefix Sums and Their Applications", CMU-CS-90-190,
   1990.
"""

from typing import NamedTuple

import numba
import numpy as np
from numba import njit, prange

__all__ = ["DEFAULT_CHUNK_SIZE", "CpuScanSaved", "scan_forward", "scan_backward"]

#: Steps per chunk: the backward recomputes one chunk of states at a time.
DEFAULT_CHUNK_SIZE = 64


class CpuScanSaved(NamedTuple):
    """What :func:`scan_forward` keeps for :func:`scan_backward`."""

    chunk_states: np.ndarray  # (Bt, Dc, n_chunks, N): h entering chunk c, i.e. h_{c*chunk_size}
    chunk_size: int  # steps per chunk used by the forward


# ---------------------------------------------------------------- helpers


@njit(cache=True)
def _softplus(x):
    # log1p(exp(x)), and x itself above the cut-off 20 of the reference implementation
    # (the difference, log1p(exp(-x)) < 2.1e-9, is below float32 resolution there)
    if x > 20:
        return x
    return np.log1p(np.exp(x))


@njit(cache=True)
def _sigmoid(x, one):
    # ``one`` is 1 in the dtype of x: a literal 1 or 1.0 would widen float32 to float64
    return one / (one + np.exp(-x))


@njit(cache=True)
def _step_size(delta, delta_bias, b, d, t, has_bias, softplus):
    """Effective step delta_t of channel d: optional bias, then optional softplus."""
    dt = delta[b, d, t]
    if has_bias:
        dt += delta_bias[d]
    if softplus:
        dt = _softplus(dt)
    return dt


# ---------------------------------------------------------------- forward


@njit(parallel=True, cache=True)
def _forward_kernel(u, delta, A, B, C, D, z, delta_bias, h0,
                    b_var, c_var, b_group_size, c_group_size,
                    has_D, has_z, has_bias, softplus, has_h0, chunk_size,
                    out, last_state, chunk_states):
    """Write out (Bt, Dc, L), last_state (Bt, Dc, N), chunk_states (Bt, Dc, n_chunks, N).

    B and C are 4-D: (Bt, G, N, L) when ``*_var``, else the constant (Dc, N)
    seen as (1, Dc, N, 1) with group size 1.
    """
    Bt, Dc, L = u.shape
    N = A.shape[1]
    n_chunks = chunk_states.shape[2]
    zero = u.dtype.type(0)  # constants in ftype: bare literals would widen float32
    one = u.dtype.type(1)
    for bd in prange(Bt * Dc):
        b = bd // Dc
        d = bd - b * Dc
        bb = b if b_var else 0  # batch index into B
        cb = b if c_var else 0
        gb = d // b_group_size  # group index into B (= d when constant)
        gc = d // c_group_size
        h = np.empty(N, dtype=u.dtype)  # (N,) state of this channel
        for n in range(N):
            h[n] = h0[b, d, n] if has_h0 else zero
        for c in range(n_chunks):
            for n in range(N):
                chunk_states[b, d, c, n] = h[n]
            t_end = min(L, (c + 1) * chunk_size)
            for t in range(c * chunk_size, t_end):
                dt = _step_size(delta, delta_bias, b, d, t, has_bias, softplus)
                x = u[b, d, t]
                tb = t if b_var else 0
                tc = t if c_var else 0
                y = zero
                for n in range(N):
                    a = np.exp(dt * A[d, n])
                    h[n] = a * h[n] + dt * B[bb, gb, n, tb] * x
                    y += C[cb, gc, n, tc] * h[n]
                if has_D:
                    y += D[d] * x
                if has_z:
                    zt = z[b, d, t]
                    y *= zt * _sigmoid(zt, one)
                out[b, d, t] = y
        for n in range(N):
            last_state[b, d, n] = h[n]


# ---------------------------------------------------------------- backward


@njit(parallel=True, cache=True)
def _backward_kernel(dout, dlast, u, delta, A, B, C, D, z, delta_bias, chunk_states,
                     b_var, c_var, b_group_size, c_group_size,
                     has_D, has_z, has_bias, softplus, has_dlast, chunk_size, n_slices,
                     du, ddelta, dz, dinit,
                     dA_part, dD_part, dbias_part, dB_accum, dC_accum):
    """Write du, ddelta, dz, dinit and accumulate the partial reductions.

    Parallel tasks are (batch b, channel slice p): task (b, p) handles the
    channels ``d`` in slice ``p`` of ``n_slices`` contiguous slices, one after
    the other.  Every array a task writes is indexed so that no two tasks
    touch the same element, so no atomics are needed:

    - du, ddelta, dz, dinit: per element (b, d, ...), unique to the task.
    - dA_part (Bt, Dc, N), dD_part, dbias_part (Bt, Dc): per (b, d) partial
      sums over time; the caller sums over batch after the loop.
    - dB_accum / dC_accum when constant: (Bt, 1, Dc, N, 1), per (b, d) partial
      sums over time; the caller sums over batch.
    - dB_accum / dC_accum when variable: (Bt, n_slices, G, N, L), accumulated
      over the channels of a group that fall in the task's slice; the caller
      sums over slices.  A per-channel partial (Bt, Dc, N, L) would be Dc/G
      times the output; this one is n_slices times it, and n_slices is only as
      large as needed to give every thread a task (see :func:`_num_slices`).
      Parallelising over (b, g) alone instead would leave one task per batch
      element when G = 1, the common case.

    ``dB_accum`` and ``dC_accum`` accumulate and must be zero on entry; every
    other output is overwritten.
    """
    Bt, Dc, L = u.shape
    N = A.shape[1]
    n_chunks = chunk_states.shape[2]
    zero = u.dtype.type(0)  # constants in ftype: bare literals would widen float32
    one = u.dtype.type(1)
    per_slice = (Dc + n_slices - 1) // n_slices
    for task in prange(Bt * n_slices):
        b = task // n_slices
        p = task - b * n_slices
        bb = b if b_var else 0
        cb = b if c_var else 0
        pb = p if b_var else 0  # slice index into dB_accum (constant: one slot per channel)
        pc = p if c_var else 0
        # chunk recomputation buffers, reused for every channel of the task
        steps_max = min(chunk_size, L)
        hs = np.empty((steps_max + 1, N), dtype=u.dtype)  # hs[k] = h_{t0+k}, hs[0] saved
        decay = np.empty((steps_max, N), dtype=u.dtype)  # exp(delta_t A) at t0+k
        dts = np.empty(steps_max, dtype=u.dtype)  # effective delta_t at t0+k
        q = np.empty(N, dtype=u.dtype)  # q_{t+1}: gradient reaching h_t from later steps
        dA_acc = np.empty(N, dtype=u.dtype)
        for d in range(p * per_slice, min(Dc, (p + 1) * per_slice)):
            gb = d // b_group_size
            gc = d // c_group_size
            for n in range(N):
                q[n] = dlast[b, d, n] if has_dlast else zero
                dA_acc[n] = zero
            dD_acc = zero
            dbias_acc = zero
            for c in range(n_chunks - 1, -1, -1):
                t0 = c * chunk_size
                steps = min(L, t0 + chunk_size) - t0
                # recompute this chunk's states from the saved boundary state
                # (same arithmetic as the forward, so the same values)
                for n in range(N):
                    hs[0, n] = chunk_states[b, d, c, n]
                for k in range(steps):
                    t = t0 + k
                    dt = _step_size(delta, delta_bias, b, d, t, has_bias, softplus)
                    dts[k] = dt
                    x = u[b, d, t]
                    tb = t if b_var else 0
                    for n in range(N):
                        a = np.exp(dt * A[d, n])
                        decay[k, n] = a
                        hs[k + 1, n] = a * hs[k, n] + dt * B[bb, gb, n, tb] * x
                # adjoint sweep through the chunk, last step first
                for k in range(steps - 1, -1, -1):
                    t = t0 + k
                    dt = dts[k]
                    x = u[b, d, t]
                    tb = t if b_var else 0
                    tc = t if c_var else 0
                    g = dout[b, d, t]
                    if has_z:
                        y = zero
                        for n in range(N):
                            y += C[cb, gc, n, tc] * hs[k + 1, n]
                        if has_D:
                            y += D[d] * x
                        zt = z[b, d, t]
                        sz = _sigmoid(zt, one)
                        dz[b, d, t] = g * y * sz * (one + zt * (one - sz))
                        dy = g * zt * sz
                    else:
                        dy = g
                    du_t = zero
                    if has_D:
                        du_t = dy * D[d]
                        dD_acc += dy * x
                    ddt = zero
                    for n in range(N):
                        bn = B[bb, gb, n, tb]
                        a = decay[k, n]
                        dh = C[cb, gc, n, tc] * dy + q[n]  # total gradient at h_t
                        ah = a * hs[k, n]  # exp(delta_t A) h_{t-1}
                        dC_accum[b, pc, gc, n, tc] += dy * hs[k + 1, n]
                        dB_accum[b, pb, gb, n, tb] += dh * dt * x
                        ddt += dh * (ah * A[d, n] + bn * x)
                        dA_acc[n] += dh * ah * dt
                        du_t += dh * dt * bn
                        q[n] = a * dh
                    du[b, d, t] = du_t
                    if softplus:
                        pre = delta[b, d, t]
                        if has_bias:
                            pre += delta_bias[d]
                        ddt *= _sigmoid(pre, one)
                    ddelta[b, d, t] = ddt
                    dbias_acc += ddt
            for n in range(N):
                dinit[b, d, n] = q[n]
                dA_part[b, d, n] = dA_acc[n]
            dD_part[b, d] = dD_acc
            dbias_part[b, d] = dbias_acc


# ---------------------------------------------------------------- launchers


def _as_4d(M, Dc):
    """(M4, is_variable, group_size): B or C in the kernels' 4-D indexing scheme."""
    if M.ndim == 2:  # constant (Dc, N): batch and time index 0, one "group" per channel
        return M.reshape(1, Dc, M.shape[1], 1), False, 1
    return M, True, Dc // M.shape[1]


def _dummy(ndim, ftype):
    """Stand-in for an absent optional array (never read: its flag is False)."""
    return np.zeros((1,) * ndim, dtype=ftype)


def _n_chunks(L, chunk_size):
    return (L + chunk_size - 1) // chunk_size


def _num_slices(Bt, Dc):
    """Channel slices per batch element in the backward: enough tasks for every thread."""
    threads = numba.get_num_threads()
    return max(1, min(Dc, -(-threads // Bt)))


def scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                 chunk_size=DEFAULT_CHUNK_SIZE, save=True, out=None):
    """Selective scan forward on the CPU, keeping only chunk-boundary states.

    Parameters
    ----------
    u, delta : ndarray, shape (Bt, Dc, L)
        Input and raw step size (before ``delta_bias`` and softplus).
    A : ndarray, shape (Dc, N)
        Diagonal state matrix, one row per channel.
    B, C : ndarray, shape (Dc, N) or (Bt, G, N, L)
        Constant or variable input/output matrices, each independently.
    D : ndarray, shape (Dc,), or None
        Skip connection.
    z : ndarray, shape (Bt, Dc, L), or None
        Gate: ``out *= silu(z)``.
    delta_bias : ndarray, shape (Dc,), or None
        Added to ``delta`` before the softplus.
    delta_softplus : bool
        Apply softplus to the (biased) ``delta``.
    initial_state : ndarray, shape (Bt, Dc, N), or None
        ``h_0``; None means zeros.
    chunk_size : int, optional
        Steps between saved states (default :data:`DEFAULT_CHUNK_SIZE`).  The
        result does not depend on it; it trades saved memory
        (``Bt*Dc*ceil(L/chunk_size)*N``) against the backward's local buffer.
    save : bool, optional
        Whether a backward will follow; accepted for the GPU backend's
        signature (whose state engine then keeps no states).  The chunk
        states are kept either way.
    out : ndarray, shape (Bt, Dc, L), optional
        Written with the result and returned, in place of a new array: of
        ``u``'s dtype, C-contiguous, writeable, sharing no memory with the
        inputs (unchecked here).

    All arrays are C-contiguous and share one dtype, float32 or float64, in
    which everything is computed.

    Returns
    -------
    out : ndarray, shape (Bt, Dc, L)
    last_state : ndarray, shape (Bt, Dc, N)
        ``h_L``.
    saved : CpuScanSaved
        ``chunk_states`` (Bt, Dc, ceil(L / chunk_size), N), the state entering
        each chunk, and ``chunk_size``; pass it to :func:`scan_backward`.

    Raises
    ------
    ValueError
        If ``chunk_size`` is not a positive integer.

    See Also
    --------
    scan_backward : the vector-Jacobian product, from ``saved``.
    numba_mamba.reference.selective_scan : the float64 oracle.

    Notes
    -----
    ``h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t``, ``y_t = <C_t, h_t>``,
    ``out_t = (y_t + D u_t) silu(z_t)``: see the module docstring.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_mamba import _cpu_scan
    >>> rng = np.random.default_rng(0)
    >>> u = rng.standard_normal((1, 2, 5)); delta = rng.uniform(0.1, 1.0, (1, 2, 5))
    >>> A = -np.ones((2, 3)); B = np.ones((2, 3)); C = np.ones((2, 3))
    >>> out, last, saved = _cpu_scan.scan_forward(u, delta, A, B, C, None, None, None,
    ...                                           False, None, chunk_size=2)
    >>> out.shape, last.shape, saved.chunk_states.shape
    ((1, 2, 5), (1, 2, 3), (1, 2, 3, 3))
    """
    chunk_size = _check_positive("chunk_size", chunk_size)
    Bt, Dc, L = u.shape
    N = A.shape[1]
    ftype = u.dtype
    B4, b_var, b_group_size = _as_4d(B, Dc)
    C4, c_var, c_group_size = _as_4d(C, Dc)
    if out is None:
        out = np.empty((Bt, Dc, L), dtype=ftype)
    last_state = np.empty((Bt, Dc, N), dtype=ftype)
    chunk_states = np.empty((Bt, Dc, _n_chunks(L, chunk_size), N), dtype=ftype)
    _forward_kernel(
        u, delta, A, B4, C4,
        _dummy(1, ftype) if D is None else D,
        _dummy(3, ftype) if z is None else z,
        _dummy(1, ftype) if delta_bias is None else delta_bias,
        _dummy(3, ftype) if initial_state is None else initial_state,
        b_var, c_var, b_group_size, c_group_size,
        D is not None, z is not None, delta_bias is not None, bool(delta_softplus),
        initial_state is not None, chunk_size,
        out, last_state, chunk_states)
    return out, last_state, CpuScanSaved(chunk_states, chunk_size)


def scan_backward(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                  initial_state, saved, chunk_size=None, n_slices=None):
    """Vector-Jacobian product of the selective scan on the CPU.

    Parameters
    ----------
    dout : ndarray, shape (Bt, Dc, L)
        Gradient of the loss with respect to ``out``.
    dlast_state : ndarray, shape (Bt, Dc, N), or None
        Gradient with respect to ``last_state``; None means zero.
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state
        The forward's inputs, as in :func:`scan_forward`.
    saved : CpuScanSaved
        The third result of :func:`scan_forward` on these inputs.
    chunk_size : int or None, optional
        Must be None or the forward's ``chunk_size`` (which ``saved`` holds).
    n_slices : int or None, optional
        Parallel tasks per batch element: the channels are split into this
        many contiguous slices (capped at ``Dc``).  Variable dB/dC take
        ``n_slices`` times their own size in partial sums.  Default: just
        enough tasks to occupy every Numba thread.  Only the summation order
        of variable dB/dC depends on it.

    Returns
    -------
    du, ddelta : ndarray, shape (Bt, Dc, L)
        ``ddelta`` is with respect to the raw ``delta`` (before bias and
        softplus).
    dA : ndarray, shape (Dc, N)
    dB, dC : ndarray, shape like B and C
        (Dc, N) when constant (summed over batch and time), (Bt, G, N, L)
        when variable (summed over the channels of each group).
    dD : ndarray, shape (Dc,), or None
    dz : ndarray, shape (Bt, Dc, L), or None
    ddelta_bias : ndarray, shape (Dc,), or None
        Sum over batch and time of the gradient at ``delta + delta_bias``.
    dinitial_state : ndarray, shape (Bt, Dc, N), or None
        Each gradient is None exactly where its input was None, and has the
        dtype of ``u``.

    Raises
    ------
    ValueError
        If ``chunk_size`` is given and differs from ``saved.chunk_size``, or
        ``n_slices`` is not a positive integer.

    See Also
    --------
    scan_forward
    numba_mamba.reference.selective_scan_vjp : the float64 oracle.

    Notes
    -----
    With ``a_t = exp(delta_t A)``, ``dy_t = dout_t silu(z_t)`` (or ``dout_t``)
    and ``q_{L+1} = dlast_state``, going backwards in time::

        dh_t   = C_t dy_t + q_{t+1},        q_t = a_t dh_t,   dinitial_state = q_1
        dB_t   = dh_t delta_t u_t,          dC_t = dy_t h_t
        du_t   = dy_t D + <dh_t, delta_t B_t>
        ddelta_t = <dh_t, a_t A h_{t-1} + B_t u_t>   (times sigmoid(delta_t + bias) with softplus)
        dA     = sum_{b,t} dh_t a_t h_{t-1} delta_t

    The states ``h_t`` are recomputed one chunk at a time from
    ``saved.chunk_states`` instead of being stored by the forward.
    """
    if chunk_size is not None and chunk_size != saved.chunk_size:
        raise ValueError(f"chunk_size must be the forward's ({saved.chunk_size}) or None, "
                         f"got {chunk_size}")
    chunk_size = saved.chunk_size
    Bt, Dc, L = u.shape
    N = A.shape[1]
    ftype = u.dtype
    B4, b_var, b_group_size = _as_4d(B, Dc)
    C4, c_var, c_group_size = _as_4d(C, Dc)
    if n_slices is None:
        n_slices = _num_slices(Bt, Dc)
    n_slices = min(Dc, _check_positive("n_slices", n_slices))

    def part_like(M4, var):
        # variable: (Bt, n_slices, G, N, L) per slice; constant: (Bt, 1, Dc, N, 1) per channel
        if var:
            return np.zeros((Bt, n_slices) + M4.shape[1:], dtype=ftype)
        return np.zeros((Bt, 1) + M4.shape[1:], dtype=ftype)

    du = np.empty((Bt, Dc, L), dtype=ftype)
    ddelta = np.empty((Bt, Dc, L), dtype=ftype)
    dz = np.empty((Bt, Dc, L), dtype=ftype) if z is not None else _dummy(3, ftype)
    dinit = np.empty((Bt, Dc, N), dtype=ftype)
    dA_part = np.empty((Bt, Dc, N), dtype=ftype)
    dD_part = np.empty((Bt, Dc), dtype=ftype)
    dbias_part = np.empty((Bt, Dc), dtype=ftype)
    dB_accum = part_like(B4, b_var)
    dC_accum = part_like(C4, c_var)
    _backward_kernel(
        dout, _dummy(3, ftype) if dlast_state is None else dlast_state,
        u, delta, A, B4, C4,
        _dummy(1, ftype) if D is None else D,
        _dummy(3, ftype) if z is None else z,
        _dummy(1, ftype) if delta_bias is None else delta_bias,
        saved.chunk_states,
        b_var, c_var, b_group_size, c_group_size,
        D is not None, z is not None, delta_bias is not None, bool(delta_softplus),
        dlast_state is not None, chunk_size, n_slices,
        du, ddelta, dz, dinit, dA_part, dD_part, dbias_part, dB_accum, dC_accum)

    def finish(part, var, like):
        if var:  # sum the slices' partials: (Bt, G, N, L)
            return part[:, 0] if n_slices == 1 else part.sum(axis=1)
        return part.sum(axis=(0, 1)).reshape(like.shape)  # over batch: (Dc, N)

    return (
        du,
        ddelta,
        dA_part.sum(axis=0),
        finish(dB_accum, b_var, B),
        finish(dC_accum, c_var, C),
        None if D is None else dD_part.sum(axis=0),
        None if z is None else dz,
        None if delta_bias is None else dbias_part.sum(axis=0),
        None if initial_state is None else dinit,
    )


def _check_positive(name, value):
    """A tuning option as a Python int, or ValueError naming it."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) \
            or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)
