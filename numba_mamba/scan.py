"""The selective scan of Mamba: public API, validation and dispatch.

NumPy arrays run on the CPU (Numba ``@njit`` kernels in
:mod:`numba_mamba._cpu_scan`), CuPy arrays on the GPU (Numba CUDA kernels in
:mod:`numba_mamba.cuda_kernels.scan`).  A call reads: validate (remembered per
layout of CuPy arguments) -> canonical layout -> backend -> cast back.  Both
backends see one canonical layout: C-contiguous arrays of one compute dtype,
B and C either constant ``(D, N)`` or grouped ``(Bt, G, N, L)``.
"""

import functools
from typing import Any, NamedTuple

import numpy as np

from ._backends import cpu_module, gpu_module
from ._validation import (array_namespace, as_float_array, check_flag, check_shape,
                          compute_dtype, is_cupy_array, is_dask_array)
from .reference import ScanGrads

__all__ = ["ScanGrads", "selective_scan", "selective_scan_vjp"]


def _gpu_backend():
    """The GPU module of the scan (:func:`~numba_mamba._backends.gpu_module`)."""
    return gpu_module("scan")


def _backend(xp):
    return cpu_module("scan") if xp is np else _gpu_backend()


def _as_array(name, x, xp):
    """``x`` as an array of ``xp``: native byte order, integers as float64
    (:func:`~numba_mamba._validation.as_float_array`)."""
    return as_float_array(name, x, xp)


def _canonical(x, ftype, xp):
    """``x`` as a C-contiguous array of ``ftype`` (itself where it is one already)."""
    if x.dtype == ftype and x.flags.c_contiguous:
        return x
    return xp.ascontiguousarray(x, dtype=ftype)


_ARG_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
_HALF_NAMES = ("float16", "bfloat16")
# per gradient of ScanGrads, the index of its argument in _ARG_NAMES
_GRAD_OF = tuple(_ARG_NAMES.index(field[1:]) for field in ScanGrads._fields)


def _per_step(name, x):
    """True for the arrays with one value per step: ``u``, ``delta``, ``z`` and
    a variable ``B``/``C``."""
    return name in ("u", "delta", "z") or (name in ("B", "C") and x.ndim != 2)


def _shared_half(arrays, ftype):
    """The half dtype (float16, bfloat16) that ``u``, ``delta``, ``z`` and a
    variable ``B``/``C`` of the validated ``arrays`` (a dict by name) share,
    where the compute dtype ``ftype`` is float32; else None.  Only these can
    be read by the GPU's state engine as they are (see :func:`_reads_half`)."""
    half = arrays["u"].dtype
    if ftype != np.float32 or half.name not in _HALF_NAMES:
        return None
    for name, x in arrays.items():
        if x is not None and _per_step(name, x) and x.dtype != half:
            return None
    return half


def _reads_half(backend, Bt, Dc, N):
    """True where the GPU ``backend`` reads half-precision per-step arrays as
    they are: its ``settings.direct_half`` is on and the state engine is the
    one chosen for ``Bt * Dc`` channels of ``N`` states."""
    return backend.settings.direct_half and backend.choose_engine(Bt, Dc, N) == "states"


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


def _check_out(out, arrays, xp):
    """Raise unless ``out`` can take :func:`selective_scan`'s output for the
    validated ``arrays``: an array of their kind and ``u``'s device, shape
    and dtype, C-contiguous and writeable (its overlap with the inputs,
    which depends on addresses, is :func:`_check_overlap`'s)."""
    u = arrays["u"]
    kind = np.ndarray if xp is np else xp.ndarray
    if not isinstance(out, kind):
        raise TypeError(f"out must be a {kind.__module__.split('.')[0]}.ndarray like u, got "
                        f"{type(out).__module__}.{type(out).__name__}")
    if xp is not np and out.data.device_id != u.data.device_id:
        raise ValueError(f"out must be on u's device {u.data.device_id}, got device "
                         f"{out.data.device_id}")
    check_shape("out", out, u.shape, "like u")
    if out.dtype.newbyteorder("=") != u.dtype:  # (either byte order: the result is copied)
        raise TypeError(f"out must have u's dtype {u.dtype}, got {out.dtype}")
    if not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous, got shape {out.shape} with strides "
                         f"{out.strides}")
    if xp is np and not out.flags.writeable:
        raise ValueError("out must be writeable, got a read-only array")


def _span(x):
    """``(low, high)``: the bytes ``x`` covers, as offsets from its data pointer
    (``high`` past the last one)."""
    low = high = 0
    for n, stride in zip(x.shape, x.strides):
        if n == 0:
            return 0, 0
        reach = (n - 1) * stride
        if reach < 0:
            low += reach
        else:
            high += reach
    return low, high + x.itemsize


def _check_overlap(out, given, checked):
    """Raise ValueError where ``out`` may share memory with an input in
    ``given`` (where their byte ranges meet, as ``may_share_memory`` tells)."""
    if checked.xp is np:
        for name, x in zip(_ARG_NAMES, given):
            if x is not None and np.may_share_memory(out, x):
                raise ValueError(_overlap_message(name))
        return
    low = out.data.ptr
    high = low + checked.out_nbytes
    for name, x, span in zip(_ARG_NAMES, given, checked.spans):
        if x is not None:
            p = x.data.ptr
            if p + span[0] < high and low < p + span[1]:
                raise ValueError(_overlap_message(name))


def _overlap_message(name):
    return f"out must not share memory with {name} (the scan reads it while writing out)"


class _Checked(NamedTuple):
    """What validation found out about one layout of the scan's arguments."""

    xp: object          # numpy or cupy
    backend: object     # the module the canonical arguments go to
    ftype: np.dtype     # compute dtype
    half: object        # :func:`_shared_half`: None, or the state engine may read them in it
    dims: tuple         # (Bt, Dc, N)
    casts: tuple        # per argument: how to make it canonical (:func:`_canonical_form`)
    half_casts: tuple   # the same where the per-step arrays stay in ``half`` (else None)
    spans: tuple        # per argument: :func:`_span` (None where absent), for a given ``out``
    out_nbytes: int     # the given ``out``'s bytes (0: none)
    plans: dict         # delta_softplus -> (settings generation, the GPU forward's plan);
                        # (delta_softplus, "vjp") -> (generation, :class:`_VjpPlan`)


def _casts(arrays, ftype, half):
    """Per argument, how :func:`_canonical_form` makes it canonical: None (as it
    is), or ``(dtype, shape)``: ``dtype`` (None: no copy) is the one it is
    copied to, C-contiguous; ``shape`` (None: its own) the one a (Bt, N, L)
    ``B``/``C`` is then viewed in as one group, (Bt, 1, N, L).  Per-step
    arrays go to ``half`` where it is given, the others to ``ftype``."""
    casts = []
    for name, x in arrays.items():
        if x is None:
            casts.append(None)
            continue
        want = half if half is not None and _per_step(name, x) else ftype
        copy = None if x.dtype == want and x.flags.c_contiguous else want
        group = (x.shape[0], 1) + x.shape[1:] if name in ("B", "C") and x.ndim == 3 else None
        casts.append(None if group is None and copy is None else (copy, group))
    return tuple(casts)


def _canonical_form(x, cast, xp):
    dtype, shape = cast
    if dtype is not None:
        x = xp.ascontiguousarray(x, dtype=dtype)
    # (a reshape of a C-contiguous array has C strides, where ``x[:, None]``
    # would have a zero stride on the new axis, which Numba does not call C)
    return x if shape is None else x.reshape(shape)


def _validate(values, out):
    """Check the scan's arguments ``values`` (in the order of ``_ARG_NAMES``)
    and ``out`` (None: not given); return ``(checked, arrays)``: a
    :class:`_Checked` and the arguments as validated (NumPy's array-likes
    made arrays)."""
    given = dict(zip(_ARG_NAMES, values))
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
    if out is not None:
        _check_out(out, arrays, xp)

    ftype = compute_dtype(*arrays.values())
    half = None if xp is np else _shared_half(arrays, ftype)
    checked = _Checked(
        xp, _backend(xp), ftype, half, (Bt, Dc, N), _casts(arrays, ftype, None),
        None if half is None else _casts(arrays, ftype, half),
        tuple(None if x is None else _span(x) for x in arrays.values()),
        0 if out is None else out.nbytes, {})
    return checked, tuple(arrays.values())


#: Types :func:`_gpu_layout` found to be CuPy arrays, and None's (a set test is
#: cheaper than :func:`is_cupy_array`'s call per array).
_LAYOUT_TYPES = {type(None)}


def _gpu_layout(values):
    """The key under which the validation of CuPy arguments ``values`` is
    remembered: per array its type, shape, dtype, device and strides (None
    where absent) -- all that validation reads; None unless every given
    array is a CuPy array (NumPy arguments, whose ``A`` is checked for finite
    values, are validated on every call).

    A C-contiguous array stands for its strides by ``True`` (the launch
    seam's :func:`~numba_mamba.cuda_kernels._launch.contiguous`, cheaper than
    building the strides): what validation reads of the strides -- whether
    the array is C-contiguous, the bytes it spans -- follows from its shape
    and itemsize then (strides differ only on axes of length 1, which span
    nothing)."""
    kinds = set(map(type, values))
    if not kinds <= _LAYOUT_TYPES:
        if not all(x is None or is_cupy_array(x) for x in values):
            return None
        _LAYOUT_TYPES.update(kinds)
    contiguous = _seam_contiguous()
    return tuple([None if x is None else
                  (type(x), x.shape, x.dtype, x.data.device_id, contiguous(x) or x.strides)
                  for x in values])


@functools.lru_cache(maxsize=1)
def _seam_contiguous():
    """The launch seam's C-contiguity test (imported on the first CuPy call)."""
    from .cuda_kernels._launch import contiguous

    return contiguous


#: :func:`_gpu_layout` of CuPy arguments (and a given ``out``) that passed
#: validation -> their :class:`_Checked`; bounded, started again when full.
_VALIDATED = {}
_MAX_VALIDATED = 1024


class _Call(NamedTuple):
    """:func:`_prepare`'s result."""

    xp: object        # numpy or cupy
    backend: object   # the module that computes
    args: tuple       # the canonical arguments, as the backend's scan_forward takes them
    given: tuple      # the arguments as validated, in the order of _ARG_NAMES
    ftype: np.dtype   # compute dtype
    dout_dtype: np.dtype  # the dtype the backward takes ``dout`` in
    plans: dict       # the validated layout's forward plans (None: not remembered)
    direct: bool      # the canonical arrays are the given ones (no copy, at most a view)


def _prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, out=None,
             layout=False):
    """Validate the scan's arguments (and ``out``, where given) and put them in
    the canonical layout: a :class:`_Call`.

    The canonical arrays are C-contiguous, of the compute dtype, except where
    the GPU's state engine reads ``u``, ``delta``, ``z`` and a variable
    ``B``/``C`` in their half dtype (:func:`_shared_half`,
    :func:`_reads_half`): those stay in it, and ``dout`` is to be passed in
    it too.  The validation of CuPy arguments is remembered per
    :func:`_gpu_layout`; ``out``'s overlap with the inputs is checked on
    every call.  ``layout``: :func:`_gpu_layout` of the arguments where the
    caller has it (False: not computed yet)."""
    values = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    if layout is False:
        layout = _gpu_layout(values if out is None else values + (out,))
    checked = None if layout is None else _VALIDATED.get(layout)
    if checked is None:
        checked, given = _validate(values, out)
        # (a layout is remembered only where validation took the arrays as they
        # are: an integer array converted to float64 is validated on every call)
        if layout is not None and all(a is b for a, b in zip(values, given)):
            if len(_VALIDATED) >= _MAX_VALIDATED:
                _VALIDATED.clear()
            _VALIDATED[layout] = checked
    else:
        given = values
    casts, dout_dtype = checked.casts, checked.ftype
    if checked.half is not None and _reads_half(checked.backend, *checked.dims):
        casts, dout_dtype = checked.half_casts, checked.half
    if out is not None:
        _check_overlap(out, given, checked)
    xp = checked.xp
    args = [x if cast is None else _canonical_form(x, cast, xp) for x, cast in zip(given, casts)]
    args.insert(8, bool(delta_softplus))
    remembered = layout is not None and given is values
    return _Call(xp, checked.backend, tuple(args), given, checked.ftype, dout_dtype,
                 checked.plans if remembered else None,
                 all(cast is None or cast[0] is None for cast in casts))


def _generation():
    """The GPU settings' generation (:attr:`Settings.generation`)."""
    return _gpu_backend().settings.generation


def _remembered_plan(values, out, key):
    """``(layout, checked, plan)``: :func:`_gpu_layout` of the forward's
    arguments ``values`` and ``out`` (None: not given), the validation
    remembered for that layout (None: none yet) and the plan remembered with
    it under ``key`` (see :class:`_Checked`'s ``plans``) for the current
    settings (None where there is none yet)."""
    layout = _gpu_layout(values if out is None else values + (out,))
    checked = None if layout is None else _VALIDATED.get(layout)
    if checked is None:
        return layout, None, None
    generation, plan = checked.plans.get(key, (None, None))
    return layout, checked, plan if generation == _generation() else None


def selective_scan(u: Any, delta: Any, A: Any, B: Any, C: Any, D: Any = None, z: Any = None,
                   delta_bias: Any = None, delta_softplus: bool = False,
                   return_last_state: bool = False, initial_state: Any = None, out: Any = None):
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
        Dtype of ``u`` in native byte order (an integer ``u``: float64); the
        given ``out`` where there is one.
    last_state : array, shape (Bt, D, N)
        Only if ``return_last_state``; in the compute dtype (float64 if any
        input is float64, else float32), so that it can seed the next piece
        of a sequence without losing precision.

    Raises
    ------
    TypeError
        NumPy and CuPy arrays mixed; unsupported dtype (supported: float16,
        bfloat16, float32, float64 in either byte order; integer arrays and
        lists are taken as float64); ``out`` not an array of ``u``'s kind or
        dtype; ``delta_softplus`` or ``return_last_state`` not a bool.
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

    On the GPU, the checks of a call whose CuPy arrays (and ``out``) have
    the layout (types, shapes, dtypes, strides, device) of an earlier call
    are not repeated, except ``out``'s overlap with the inputs.

    On the GPU, ``A`` is not checked for infinities and NaNs: the check would
    make every call wait for the device (as CuPy's linear algebra does not
    check its results unless asked to).  A NaN or ``+inf`` in ``A`` makes the
    output NaN or infinite; ``-inf`` gives the limit where ``delta > 0`` in
    the forward (the state forgets at once) and NaN in the gradient of
    ``delta``.

    The GPU has two engines.  Where ``N <= 128`` (the default choice; see
    ``settings.min_recurrences``) one thread runs
    each (batch, channel, state) serially along L, with tiles of the inputs
    staged in shared memory (and, where ``Bt * D`` is small, the sequence
    split into segments whose end states, and in the backward whose
    adjoints, are combined first).  Otherwise (or with
    ``settings.engine = 'blocks'``) a
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
    check_flag("delta_softplus", delta_softplus)
    check_flag("return_last_state", return_last_state)
    values = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    layout, checked, plan = _remembered_plan(values, out, bool(delta_softplus))
    if plan is not None:  # a GPU layout validated before: its remembered plan
        if out is not None:
            _check_overlap(out, values, checked)
        result, last_state, _ = plan(values, out)
        return (result, last_state) if return_last_state else result
    if is_dask_array(u, delta, A, B, C, D, z, delta_bias, initial_state):  # numba_mamba.dask
        from .dask import selective_scan as dask_scan
        return dask_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                         return_last_state, initial_state, out)
    call = _prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, out,
                    layout)
    into = None  # (an out the kernels write: of the dtype they write)
    if out is not None and call.args[0].dtype == out.dtype:
        into = out
    result, last_state, _ = call.backend.scan_forward(*call.args, save=False, out=into)
    if call.plans is not None and call.direct and into is out:
        # (the next call of this layout runs the plan: its kernels read the
        # given arrays, of which the canonical ones are views, and write out)
        call.plans[bool(delta_softplus)] = (
            _generation(), call.backend.forward_plan(*call.args, save=False))
    if out is not None:
        if into is None:  # (float16 from the compute dtype; or out of the other byte order)
            call.xp.copyto(out, result, casting="unsafe")
        result = out
    else:
        result = result.astype(call.given[0].dtype, copy=False)
    if return_last_state:
        return result, last_state
    return result


def selective_scan_vjp(u: Any, delta: Any, A: Any, B: Any, C: Any, D: Any = None,
                       z: Any = None, delta_bias: Any = None, delta_softplus: bool = False,
                       initial_state: Any = None) -> tuple:
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
    the kept states take as much memory as ``u``.  The setting
    ``save_every = K`` of :data:`numba_mamba.cuda_kernels.settings.settings`
    (``with settings.override(save_every=K):`` around the forward, or
    ``settings.save_every = K``) keeps one state in ``K`` chunks: ``K``
    times less memory for a backward that reruns each stretch of ``K``
    chunks once (see ``benchmarks/RESULTS.md`` for its cost).

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
    check_flag("delta_softplus", delta_softplus)
    values = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    key = (bool(delta_softplus), "vjp")
    layout, checked, plan = _remembered_plan(values, None, key)
    if plan is not None:  # a GPU layout validated before: its remembered plans
        out, last_state, saved = plan.forward(values, None)
        return out, last_state, _planned_backward(plan, values, saved)
    call = _prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                    layout=layout)
    out, last_state, saved = call.backend.scan_forward(*call.args)
    plan = None
    if call.plans is not None and call.direct:
        # (the next call of this layout runs the plans: their kernels read the
        # given arrays, of which the canonical ones are views)
        forward = call.backend.forward_plan(*call.args)
        if forward is not None:
            plan = _VjpPlan(forward, call.dout_dtype, bool(delta_softplus))
            call.plans[key] = (_generation(), plan)
    return (out.astype(call.given[0].dtype, copy=False), last_state,
            _backward(call, saved, plan))


class _VjpPlan:
    """The GPU plans of one validated layout of :func:`selective_scan_vjp`
    whose canonical arrays are views of the given ones: the forward's, and
    the backward's once a backward of the layout has run (with the settings'
    generation it was made in).  Holds no arrays."""

    def __init__(self, forward, dout_dtype, delta_softplus):
        self.forward = forward
        self.dout_dtype = dout_dtype
        self.delta_softplus = delta_softplus
        self.backward = None


def _planned_backward(plan, values, saved):
    """The ``backward`` of a :func:`selective_scan_vjp` call that ran the
    remembered forward ``plan`` on the given ``values``: the remembered
    backward plan where ``dout`` is of the layout it expects (a CuPy array
    on the inputs' device, of the shape of ``u`` and the dtype the forward
    read, C-contiguous) and no ``dlast_state`` is given; else the full path."""
    u = values[0]
    contiguous = _seam_contiguous()

    def backward(dout, dlast_state=None):
        planned = plan.backward
        if (planned is not None and dlast_state is None and planned[0] == _generation()
                and type(dout) is type(u) and dout.dtype == plan.dout_dtype
                and dout.shape == u.shape and dout.data.device_id == u.data.device_id
                and contiguous(dout)):
            return _as_given(planned[1]((dout, None) + values, saved.tile_states), values)
        call = _prepare(*values[:8], plan.delta_softplus, values[8])
        return _backward(call, saved, plan)(dout, dlast_state)

    return backward


def _backward(call, saved, plan=None):
    """The ``backward`` of a :func:`selective_scan_vjp` call: its
    :class:`_Call` and the states its forward saved; ``plan``, where the
    layout is remembered (:class:`_VjpPlan`), keeps the backward's plan for
    the next calls of the layout."""

    def backward(dout, dlast_state=None):
        xp, args, given = call.xp, call.args, call.given
        Bt, Dc, L = args[0].shape
        N = args[2].shape[1]
        array_namespace(u=given[0], dout=dout, dlast_state=dlast_state)  # not mixed
        dout = _as_array("dout", dout, xp)
        check_shape("dout", dout, (Bt, Dc, L), "like out")
        canonical = _canonical(dout, call.dout_dtype, xp)  # (half where the forward read half)
        if dlast_state is not None:
            dlast_state = _as_array("dlast_state", dlast_state, xp)
            check_shape("dlast_state", dlast_state, (Bt, Dc, N), "like last_state")
            dlast_state = _canonical(dlast_state, call.ftype, xp)
        grads = call.backend.scan_backward(canonical, dlast_state, *args, saved)
        if plan is not None and dlast_state is None:
            backward_plan = call.backend.backward_plan(canonical, None, *args, saved)
            if backward_plan is not None:
                plan.backward = (_generation(), backward_plan)
        return _as_given(grads, given)

    return backward


def _as_given(grads, given):
    """The backend's gradients as :class:`ScanGrads` in the shapes and dtypes
    of the ``given`` arrays (None where one is None)."""
    result = []
    for g, i in zip(grads, _GRAD_OF):
        original = given[i]
        if original is None:
            result.append(None)
            continue
        if g.shape != original.shape:  # a (Bt, N, L) B or C was passed on as one group
            g = g.reshape(original.shape)
        result.append(g if g.dtype == original.dtype else g.astype(original.dtype))
    return ScanGrads(*result)
