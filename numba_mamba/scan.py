"""The selective scan of Mamba: public API, validation and dispatch.

NumPy arrays run on the CPU (Numba ``@njit`` kernels in
:mod:`numba_mamba._cpu_scan`), CuPy arrays on the GPU (Numba CUDA kernels in
``cuda_kernels/scan.py``).  Both backends see one canonical layout: C-contiguous
arrays of one compute dtype, B and C either constant ``(D, N)`` or grouped
``(Bt, G, N, L)``.
"""

import functools

import numpy as np

from ._validation import (array_namespace, check_dtype, check_shape, compute_dtype,
                          is_cupy_array, missing_gpu_stack_message)
from .reference import ScanGrads

__all__ = ["ScanGrads", "selective_scan", "selective_scan_vjp"]


@functools.lru_cache(maxsize=1)  # (``cuda.is_available()`` costs microseconds; a failure is not kept)
def _gpu_backend():
    try:
        from numba import cuda
        if not cuda.is_available():
            raise RuntimeError("numba.cuda.is_available() is False")
        try:
            from .cuda_kernels import scan as backend  # installed wheel / editable install
        except ImportError:
            from cuda_kernels import scan as backend  # source tree on sys.path
    except (ImportError, RuntimeError) as exc:
        raise RuntimeError(f"{missing_gpu_stack_message} ({exc})") from exc
    return backend


def _backend(xp):
    if xp is np:
        from . import _cpu_scan
        return _cpu_scan
    return _gpu_backend()


def _as_array(name, x, xp):
    if xp is np and not isinstance(x, np.ndarray):
        x = np.asarray(x)
        if x.dtype.kind in "iub":
            x = x.astype(np.float64)
    check_dtype(name, x)
    return x


def _canonical(x, ftype, xp):
    """``x`` as a C-contiguous array of ``ftype`` (itself where it is one already)."""
    if x.dtype == ftype and x.flags.c_contiguous:
        return x
    return xp.ascontiguousarray(x, dtype=ftype)


def _direct_half(xp, arrays, ftype, Bt, Dc, N):
    """The half dtype in which the GPU's state engine reads ``u``, ``delta``,
    ``z`` and a variable ``B``/``C`` as given (and writes ``out`` and their
    gradients), or None where they are cast to ``ftype`` first.

    Direct where ``cuda_kernels.scan_states.DIRECT_HALF`` is on, the arrays
    are CuPy arrays, the state engine is the one chosen, and those arrays
    share one half dtype (the others may be float32 or of that dtype too).
    """
    if xp is np or ftype != np.float32:
        return None
    backend = _gpu_backend()
    half = arrays["u"].dtype
    if backend.scan_states.storage_of(half)[1] is None:  # not a half dtype
        return None
    for name in ("delta", "z", "B", "C"):
        x = arrays[name]
        if x is not None and (x.ndim != 2 or name not in ("B", "C")) and x.dtype != half:
            return None
    if not backend.scan_states.DIRECT_HALF or backend.choose_engine(Bt, Dc, N) != "states":
        return None
    return half


def _check_bc(name, M, Bt, Dc, N, L):
    if M.ndim == 2:
        check_shape(name, M, (Dc, N), "(constant: channels, states)")
    elif M.ndim == 3:
        check_shape(name, M, (Bt, N, L), "(variable: batch, states, length)")
    elif M.ndim == 4:
        G = M.shape[1]
        if G < 1 or Dc % G:
            raise ValueError(f"{name} has {G} groups (shape {tuple(M.shape)}); the number of "
                             f"groups must divide the {Dc} channels")
        check_shape(name, M, (Bt, G, N, L), "(grouped: batch, groups, states, length)")
    else:
        raise ValueError(f"{name} must have 2 dims (D, N), 3 dims (Bt, N, L) or 4 dims "
                         f"(Bt, G, N, L), got {M.ndim} dims with shape {tuple(M.shape)}")


_ARG_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
_UNKNOWN = object()  # (a layout not computed yet)
#: Layouts of CuPy arguments that passed validation -> their compute dtype
#: (see :func:`_gpu_layout`); bounded, started again when full.
_VALIDATED = {}
_MAX_VALIDATED = 1024


def _gpu_layout(given):
    """The key under which CuPy arguments' validation (and, with flags and
    settings, their replay) is remembered: per argument its type, shape,
    dtype, strides (True where C-contiguous: the kernels index those by their
    shape alone) and device (None where absent); None unless every given
    array is a CuPy array.

    Validation reads only these (NumPy arguments, whose ``A`` is checked for
    finite values, are validated on every call), so arguments of a layout
    seen before pass it again."""
    return _gpu_layout_and_pointers(given)[0]


#: Types :func:`_gpu_layout_and_pointers` found to be CuPy arrays, with the
#: ``_c_contiguous`` flag CuPy's arrays have (a set lookup is cheaper than
#: :func:`is_cupy_array`'s call).
_LAYOUT_TYPES = set()


def _gpu_layout_and_pointers(given):
    """(:func:`_gpu_layout`, the arrays' data pointers: 0 for None) of
    ``given``, in one pass; (None, None) unless every given array is a CuPy
    array.

    Each CuPy attribute read costs 70-150 ns on the GPU machine's host, and a
    replayed call reads these of seven arrays: this reads each attribute once
    and, for a C-contiguous array, its one-word flag instead of the strides
    tuple CuPy builds on each read."""
    layout, pointers = [], []
    for x in given:
        if x is None:
            layout.append(None)
            pointers.append(0)
            continue
        cls = type(x)
        if cls not in _LAYOUT_TYPES:
            if not (is_cupy_array(x) and hasattr(x, "_c_contiguous")):
                return None, None
            _LAYOUT_TYPES.add(cls)
        data = x.data
        layout.append((cls, x.shape, x.dtype, x._c_contiguous or x.strides, data.device_id))
        pointers.append(data.ptr)
    return tuple(layout), pointers


#: Recorded GPU calls (``cuda_kernels._common.Replay``) per :func:`_replay_key`:
#: the call repeated on new data pointers without validation, canonical forms
#: or launch arguments; None where it cannot be replayed.  Bounded, started
#: again when full.
_REPLAYS = {}
_MAX_REPLAYS = 1024


def _replay_key(values, *flags):
    """``(key, pointers)``: the key of a call's replay -- the layout of its CuPy
    arguments (see :func:`_gpu_layout`), its flags and the backend's settings
    -- and the arrays' data pointers the replay takes (0 for None);
    ``(None, None)`` unless every given array is a CuPy array."""
    layout, pointers = _gpu_layout_and_pointers(values)
    if layout is None:
        return None, None
    return (layout, flags, _gpu_backend().replay_settings()), pointers


def _layout_of(key):
    """The scan arguments' :func:`_gpu_layout` in a :func:`_replay_key` (None
    for no key: not all CuPy arrays), less a given ``out``'s."""
    return None if key is None else key[0][:len(_ARG_NAMES)]


def _check_out(out, arrays, xp):
    """Raise unless ``out`` can take :func:`selective_scan`'s output for the
    validated ``arrays``: an array of their kind and ``u``'s device, shape
    and dtype, C-contiguous, writeable, sharing no memory with any of them."""
    u = arrays["u"]
    kind = np.ndarray if xp is np else xp.ndarray
    if not isinstance(out, kind):
        raise TypeError(f"out must be a {kind.__module__.split('.')[0]}.ndarray like u, got "
                        f"{type(out).__module__}.{type(out).__name__}")
    if xp is not np and out.data.device_id != u.data.device_id:
        raise ValueError(f"out must be on u's device {u.data.device_id}, got device "
                         f"{out.data.device_id}")
    check_shape("out", out, u.shape, "like u")
    if out.dtype != u.dtype:
        raise TypeError(f"out must have u's dtype {u.dtype}, got {out.dtype}")
    if not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous, got shape {out.shape} with strides "
                         f"{out.strides}")
    if xp is np and not out.flags.writeable:
        raise ValueError("out must be writeable, got a read-only array")
    for name, x in arrays.items():
        if x is not None and xp.may_share_memory(out, x):
            raise ValueError(_overlap_message(name))


def _overlap_message(name):
    return f"out must not share memory with {name} (the scan reads it while writing out)"


class _ReplayInto:
    """The replay of a :func:`selective_scan` call with ``out``: each call first
    checks that ``out`` shares no memory with an input (a replay skips the
    validation, and the check depends on the addresses, not the layout)."""

    def __init__(self, replay, values, out):
        self._replay = replay
        # (replayed inputs are never copied, so C-contiguous: each spans its nbytes)
        self._spans = [(i, name, x.nbytes) for i, (name, x) in enumerate(zip(_ARG_NAMES, values))
                       if x is not None]
        self._out_nbytes = out.nbytes

    def __call__(self, pointers):
        low = pointers[-1]
        high = low + self._out_nbytes
        for i, name, nbytes in self._spans:
            p = pointers[i]
            if p < high and low < p + nbytes:
                raise ValueError(_overlap_message(name))
        return self._replay(pointers)


def _remember_replay(key, replay):
    if len(_REPLAYS) >= _MAX_REPLAYS:
        _REPLAYS.clear()
    _REPLAYS[key] = replay


def _same_data(canonical, given):
    """True where every canonical array is its given array or a view of it at
    the same address (a replay takes the given arrays' data pointers), not a
    copy."""
    for c, x in zip(canonical, given):
        if (c is None) != (x is None) or (c is not None and c.data.ptr != x.data.ptr):
            return False
    return True


def _prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
             layout=_UNKNOWN):
    """Validate the scan's arguments and return (xp, backend, canonical args,
    originals, compute dtype, dtype of ``dout`` for the backward).  ``layout``:
    their :func:`_gpu_layout`, where the caller has it already.

    The canonical arrays are C-contiguous, of the compute dtype, except where
    :func:`_direct_half` finds the state engine takes ``u``, ``delta``, ``z``
    and a variable ``B``/``C`` in their half dtype: those stay in it (and
    ``dout`` is to be passed in it too)."""
    values = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    given = dict(zip(_ARG_NAMES, values))
    if layout is _UNKNOWN:
        layout = _gpu_layout(values)
    ftype = None if layout is None else _VALIDATED.get(layout)
    if ftype is not None:  # validated before: only the canonical forms to make
        import cupy

        return _canonical_args(cupy, given, ftype, delta_softplus)
    for name in ("u", "delta", "A", "B", "C"):
        if given[name] is None:
            raise TypeError(f"{name} is required, got None")
    xp = array_namespace(**given)
    arrays = {name: None if x is None else _as_array(name, x, xp) for name, x in given.items()}
    u = arrays["u"]
    if u.ndim != 3:
        raise ValueError(f"u must have 3 dims (batch, channels, length), got {u.ndim} dims "
                         f"with shape {tuple(u.shape)}")
    Bt, Dc, L = u.shape
    if L == 0 or Bt == 0 or Dc == 0:
        raise ValueError(f"u must have non-empty batch, channels and length, got shape "
                         f"{tuple(u.shape)}")
    check_shape("delta", arrays["delta"], u.shape, "like u")
    A = arrays["A"]
    if A.ndim != 2 or A.shape[0] != Dc or A.shape[1] == 0:
        raise ValueError(f"A must have shape ({Dc}, N) with N >= 1 (channels of u, states), "
                         f"got {tuple(A.shape)}")
    N = A.shape[1]
    if xp is np and not np.isfinite(A).all():  # (on the GPU a check would wait for the device)
        raise ValueError("A must be finite: exp(delta * A) and its gradient are undefined "
                         "for infinite or NaN entries")
    _check_bc("B", arrays["B"], Bt, Dc, N, L)
    _check_bc("C", arrays["C"], Bt, Dc, N, L)
    for name in ("D", "delta_bias"):
        if arrays[name] is not None:
            check_shape(name, arrays[name], (Dc,), "(one per channel)")
    if arrays["z"] is not None:
        check_shape("z", arrays["z"], u.shape, "like u")
    if arrays["initial_state"] is not None:
        check_shape("initial_state", arrays["initial_state"], (Bt, Dc, N),
                    "(batch, channels, states)")

    ftype = compute_dtype(*arrays.values())
    if layout is not None:
        if len(_VALIDATED) >= _MAX_VALIDATED:
            _VALIDATED.clear()
        _VALIDATED[layout] = ftype
    return _canonical_args(xp, arrays, ftype, delta_softplus)


def _canonical_args(xp, arrays, ftype, delta_softplus):
    """:func:`_prepare`'s result for validated ``arrays``."""
    Bt, Dc, _ = arrays["u"].shape
    N = arrays["A"].shape[1]
    half = _direct_half(xp, arrays, ftype, Bt, Dc, N)
    canon = {}
    for name, x in arrays.items():
        if x is None:
            canon[name] = None
            continue
        per_step = name in ("u", "delta", "z") or (name in ("B", "C") and x.ndim != 2)
        if name in ("B", "C") and x.ndim == 3:
            x = x[:, None]  # (Bt, N, L) is one group
        canon[name] = _canonical(x, half if half is not None and per_step else ftype, xp)
    canon["delta_softplus"] = bool(delta_softplus)
    order = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "delta_softplus",
             "initial_state")
    return (xp, _backend(xp), tuple(canon[k] for k in order), arrays, ftype,
            ftype if half is None else half)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, initial_state=None, out=None):
    """Selective state space scan of Mamba.

    Computes, for every batch element and channel, the time-varying linear
    recurrence over the N states (zero-order hold for A, Euler for B)::

        delta = softplus(delta + delta_bias)           # each step optional
        h_t   = exp(delta_t A) * h_{t-1} + delta_t B_t u_t
        y_t   = <C_t, h_t>
        out_t = (y_t + D u_t) * silu(z_t)              # D and z optional

    NumPy arrays run on the CPU, CuPy arrays on the GPU; the output is of the
    same kind.

    Parameters
    ----------
    u : array, shape (Bt, D, L)
        Input signal: batch, channels, length.
    delta : array, shape (Bt, D, L)
        Time step of each sample (before ``delta_bias`` and softplus).
    A : array, shape (D, N)
        Diagonal state matrix of each channel (real, finite; negative for a
        stable filter).
    B, C : array, shape (D, N), (Bt, N, L) or (Bt, G, N, L)
        Input and output matrices: constant per channel, varying along time
        (selective), or varying in ``G`` groups of ``D // G`` channels.
    D : array, shape (D,), optional
        Skip connection.
    z : array, shape (Bt, D, L), optional
        Gate: the output is multiplied by ``silu(z)``.
    delta_bias : array, shape (D,), optional
        Added to ``delta`` before the softplus.
    delta_softplus : bool, optional
        Apply ``softplus`` to ``delta`` (after the bias).
    return_last_state : bool, optional
        Also return the final state ``h_L``.
    initial_state : array, shape (Bt, D, N), optional
        State ``h_0`` before the first step (zeros if omitted).
    out : array, shape (Bt, D, L), optional
        Array the output is written into and returned, as NumPy's ``out=``:
        of ``u``'s kind, device, shape and dtype, C-contiguous, writeable,
        sharing no memory with any input.  Where ``u`` is of the dtype the
        scan writes (float32, float64; on the GPU's state engine also
        float16/bfloat16) the kernels write it directly; otherwise the
        result is copied into it.

    Returns
    -------
    out : array, shape (Bt, D, L)
        Dtype of ``u``; the given ``out`` where there is one.
    last_state : array, shape (Bt, D, N)
        Only if ``return_last_state``; in the compute dtype (float64 if any
        input is float64, else float32), so that it can seed the next piece
        of a sequence without losing precision.

    Raises
    ------
    TypeError
        NumPy and CuPy arrays mixed; unsupported dtype (supported: float16,
        bfloat16, float32, float64); ``out`` not an array of ``u``'s kind or
        dtype.
    ValueError
        Wrong number of dims or shape (the message names the argument, the
        expected and the actual shape); empty ``u``; non-finite ``A`` (NumPy
        arrays only, see Notes); ``out`` on another device, not
        C-contiguous, read-only or sharing memory with an input.
    RuntimeError
        CuPy arrays given but the CUDA stack is missing (the message says what
        to install).

    See Also
    --------
    selective_scan_vjp : the same scan with its hand-written backward pass.
    numba_mamba.reference.selective_scan : readable float64 reference.

    Notes
    -----
    float32 and float64 inputs compute in their own precision; float16 and
    bfloat16 compute in float32 and return their own dtype.  Non-contiguous
    inputs are copied to C order first.  No backward follows this call, so
    the GPU's state-parallel engine keeps no states for one (use
    :func:`selective_scan_vjp` for gradients).

    On the GPU, a call whose CuPy arrays have the layout (shapes, dtypes,
    C-contiguity or strides, device) and flags of an earlier call, with the
    same engine settings, repeats that call's kernel launches on the new
    arrays' addresses: validation, canonical forms and launch arguments are
    skipped, and only the outputs are allocated (none but ``last_state``
    where ``out`` is given).  Calls that copy an argument (a
    non-contiguous one, or one cast to the compute dtype) or that pass one
    array twice (``B`` as ``C``) always take the full path.

    On the GPU, ``A`` is not checked for infinities and NaNs: the check would
    make every call wait for the device (as CuPy's linear algebra does not
    check its results unless asked to).  A NaN or ``+inf`` in ``A`` makes the
    output NaN or infinite; ``-inf`` gives the limit where ``delta > 0`` in
    the forward (the state forgets at once) and NaN in the gradient of
    ``delta``.

    The GPU has two engines, chosen by the problem's size.  Where there are
    many recurrences (``Bt * D * N >= 16384``, ``N <= 128``: a Mamba layer) one thread runs
    each (batch, channel, state) serially along L, with tiles of the inputs
    staged in shared memory (and, where ``Bt * D`` is small, the sequence
    split into segments whose end states, and in the backward whose
    adjoints, are combined first).  Otherwise a
    hierarchical parallel scan along L with the associative operator
    ``(a1, b1) o (a2, b2) = (a2*a1, a2*b1 + b2)`` [2]_: each thread scans a
    contiguous piece, warps combine summaries with shuffles, warps combine
    through shared memory, and a carry passes between chunks.

    References
    ----------
    .. [1] A. Gu and T. Dao, "Mamba: Linear-Time Sequence Modeling with
       Selective State Spaces", arXiv:2312.00752, 2023.
    .. [2] G. E. Blelloch, "Prefix Sums and Their Applications", CMU-CS-90-190,
       1990.

    Examples
    --------
    A single channel with one state is a first-order low-pass filter:

    >>> import numpy as np
    >>> import numba_mamba as nm
    >>> u = np.ones((1, 1, 6))
    >>> delta = np.full((1, 1, 6), 0.5)
    >>> A = np.array([[-1.0]]); B = np.array([[1.0]]); C = np.array([[1.0]])
    >>> np.round(nm.selective_scan(u, delta, A, B, C), 3)
    array([[[0.5  , 0.803, 0.987, 1.099, 1.166, 1.207]]])

    Splitting a sequence and passing the state on gives the same result:

    >>> rng = np.random.default_rng(0)
    >>> u = rng.standard_normal((2, 3, 10)); delta = rng.uniform(0.1, 1, (2, 3, 10))
    >>> A = -rng.uniform(0.5, 2, (3, 4)); B = rng.standard_normal((2, 4, 10))
    >>> C = rng.standard_normal((2, 4, 10))
    >>> whole = nm.selective_scan(u, delta, A, B, C)
    >>> first, h = nm.selective_scan(u[..., :4], delta[..., :4], A, B[..., :4], C[..., :4],
    ...                              return_last_state=True)
    >>> second = nm.selective_scan(u[..., 4:], delta[..., 4:], A, B[..., 4:], C[..., 4:],
    ...                            initial_state=h)
    >>> bool(np.allclose(whole, np.concatenate([first, second], axis=-1)))
    True

    The output can go into an array of the caller's (a buffer reused from
    call to call):

    >>> y = np.empty_like(u)
    >>> nm.selective_scan(u, delta, A, B, C, out=y) is y
    True
    >>> bool(np.allclose(y, whole))
    True
    """
    values = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    key, pointers = _replay_key(values if out is None else values + (out,),
                                bool(delta_softplus), bool(return_last_state))
    replay = None if key is None else _REPLAYS.get(key)
    if replay is not None:  # (a layout validated and recorded before: its out is u's dtype)
        result, last_state, _ = replay(pointers)
        if out is not None:  # (written there: an input of the replay)
            result = out
    else:
        xp, backend, args, given, ftype, _ = _prepare(u, delta, A, B, C, D, z, delta_bias,
                                                      delta_softplus, initial_state,
                                                      _layout_of(key))
        into = None  # (an out the kernels write: of the dtype they write)
        if out is not None:
            _check_out(out, given, xp)
            into = out if args[0].dtype == out.dtype else None
        if key is not None and key not in _REPLAYS:
            keep = ({0} if into is None else set()) | ({1} if return_last_state else set())
            (result, last_state, _), replay = backend.forward_replay(
                args, save=False, keep=keep, out=into)
            same = _same_data(args[:8] + args[9:], values) and (out is None or into is not None)
            if same and out is not None:
                replay = _ReplayInto(replay, values, out)
            _remember_replay(key, replay if same else None)
        else:
            result, last_state, _ = backend.scan_forward(*args, save=False, out=into)
        if out is not None and into is None:
            xp.copyto(out, result, casting="unsafe")  # (float16 from the compute dtype)
            result = out
        result = result.astype(given["u"].dtype, copy=False)
    if return_last_state:
        return result, last_state
    return result


def selective_scan_vjp(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                       delta_softplus=False, initial_state=None):
    """Selective scan with its vector-Jacobian product (hand-written backward pass).

    Parameters are those of :func:`selective_scan`.

    Returns
    -------
    out : array, shape (Bt, D, L)
        As :func:`selective_scan`.
    last_state : array, shape (Bt, D, N)
        Final state ``h_L``, in the compute dtype.
    backward : callable
        ``backward(dout, dlast_state=None)`` takes the gradient of a loss with
        respect to ``out`` (shape (Bt, D, L)) and optionally ``last_state``
        (shape (Bt, D, N); for truncated backpropagation through time) and
        returns :class:`ScanGrads` ``(du, ddelta, dA, dB, dC, dD, dz,
        ddelta_bias, dinitial_state)``: each with the shape and dtype of its
        input, None where the input was None.  ``ddelta`` is with respect to
        the raw ``delta`` argument.  It may be called more than once.

    Notes
    -----
    The forward keeps only the state entering each chunk of the sequence; the
    backward recomputes the states inside a chunk from it and runs the adjoint
    recurrence ``dh_t = C_t dy_t + exp(delta_{t+1} A) dh_{t+1}`` in reverse
    with the same parallel scan.

    On the GPU's state-parallel engine (many recurrences, see
    :func:`selective_scan`) the chunks are 16 steps long, so at ``N = 16``
    the kept states take as much memory as ``u``.  Setting
    ``numba_mamba.cuda_kernels.scan_states.SAVE_EVERY = K`` (in a source
    checkout: ``cuda_kernels.scan_states``) keeps one state in ``K``
    chunks: ``K`` times less memory for a backward that reruns each stretch
    of ``K`` chunks once (measured on an H200 at ``K = 8``: 8x less, 16 %
    slower backward).

    On the GPU, this call and ``backward`` are replayed as
    :func:`selective_scan` is (see its Notes) where their arrays' layout was
    seen before.

    Examples
    --------
    >>> import numpy as np
    >>> import numba_mamba as nm
    >>> rng = np.random.default_rng(0)
    >>> u = rng.standard_normal((1, 2, 8)); delta = rng.uniform(0.1, 1, (1, 2, 8))
    >>> A = -rng.uniform(0.5, 2, (2, 3)); B = rng.standard_normal((1, 3, 8))
    >>> C = rng.standard_normal((1, 3, 8))
    >>> out, last_state, backward = nm.selective_scan_vjp(u, delta, A, B, C, D=np.ones(2))
    >>> grads = backward(np.ones_like(out))
    >>> grads.dA.shape, grads.dB.shape, grads.dz is None
    ((2, 3), (1, 3, 8), True)

    The gradient agrees with a finite difference of the forward:

    >>> eps = 1e-6; A2 = A.copy(); A2[0, 0] += eps
    >>> numeric = (nm.selective_scan(u, delta, A2, B, C, D=np.ones(2)).sum() - out.sum()) / eps
    >>> bool(abs(numeric - grads.dA[0, 0]) < 1e-4)
    True
    """
    values = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    key, pointers = _replay_key(values, bool(delta_softplus), "vjp")
    replay = None if key is None else _REPLAYS.get(key)
    if replay is not None:  # (a layout validated and recorded before)
        out, last_state, saved = replay(pointers)
        return out, last_state, _backward(values, pointers, delta_softplus, key, None, saved)
    prepared = _prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                        _layout_of(key))
    xp, backend, args, given, ftype, _ = prepared
    if key is not None and key not in _REPLAYS:
        (out, last_state, saved), replay = backend.forward_replay(args, save=True, keep=range(3))
        _remember_replay(key, replay if _same_data(args[:8] + args[9:], values) else None)
    else:
        out, last_state, saved = backend.scan_forward(*args)
    return (out.astype(given["u"].dtype, copy=False), last_state,
            _backward(values, pointers, delta_softplus, key, prepared, saved))


def _backward(values, pointers, delta_softplus, key, prepared, saved):
    """The ``backward`` of a :func:`selective_scan_vjp` call on ``values`` (its
    arrays, at data ``pointers``), with the forward's replay key (None for NumPy arrays),
    :func:`_prepare`'s result (None where the forward was replayed: then made
    when first needed) and the states it saved.  A call with ``dout`` and
    ``dlast_state`` of a layout recorded before is replayed."""

    def backward(dout, dlast_state=None):
        nonlocal prepared
        bkey, bpointers = (None, None) if key is None else _replay_key(
            (dout, dlast_state), "backward", key)
        replay = None if bkey is None else _REPLAYS.get(bkey)
        if replay is not None:
            states = _gpu_backend().saved_states(saved)
            grads = replay(bpointers + pointers + [0 if states is None else states.data.ptr])
            return _as_given(grads, dict(zip(_ARG_NAMES, values)))
        if prepared is None:
            prepared = _prepare(*values[:8], delta_softplus, values[8])
        xp, backend, args, given, ftype, dout_dtype = prepared
        Bt, Dc, L = args[0].shape
        N = args[2].shape[1]
        array_namespace(u=given["u"], dout=dout, dlast_state=dlast_state)  # not mixed
        dout = _as_array("dout", dout, xp)
        check_shape("dout", dout, (Bt, Dc, L), "like out")
        canonical = _canonical(dout, dout_dtype, xp)  # (half where the forward read half)
        dlast = dlast_state
        if dlast_state is not None:
            dlast_state = _as_array("dlast_state", dlast_state, xp)
            check_shape("dlast_state", dlast_state, (Bt, Dc, N), "like last_state")
            dlast = _canonical(dlast_state, ftype, xp)
        if bkey is not None and bkey not in _REPLAYS:
            grads, replay = backend.backward_replay(canonical, dlast, args, saved)
            same = _same_data((canonical, dlast) + args[:8] + args[9:],
                              (dout, dlast_state) + values)
            _remember_replay(bkey, replay if same else None)
        else:
            grads = backend.scan_backward(canonical, dlast, *args, saved)
        return _as_given(grads, given)

    return backward


def _as_given(grads, given):
    """The backend's gradients as :class:`ScanGrads` in the shapes and dtypes
    of the ``given`` arrays (None where one is None)."""
    result = {}
    for field, g in zip(ScanGrads._fields, grads):
        original = given[field[1:]]
        if original is None:
            result[field] = None
            continue
        if g.shape != original.shape:  # a (Bt, N, L) B or C was passed on as one group
            g = g.reshape(original.shape)
        result[field] = g.astype(original.dtype, copy=False)
    return ScanGrads(**result)
