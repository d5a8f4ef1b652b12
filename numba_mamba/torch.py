"""PyTorch interop: mamba-ssm's ``selective_scan_fn`` and ``Mamba`` block over this library's scan.

``pip install "numba-mamba[torch]"``.  This is the one module of the package
that imports torch.

- :func:`selective_scan_fn`: mamba-ssm's function of the same name (its
  signature, shapes and semantics), plus ``initial_state=`` with its
  gradient.  CPU tensors run on the NumPy path, CUDA tensors on the CuPy path,
  shared without copies through DLPack and run on torch's current CUDA
  stream; the backward is this library's hand-written one.
- ``torch.ops.numba_mamba.selective_scan`` (and ``selective_scan_backward``):
  the scan as a ``torch.library`` custom op with a fake implementation and an
  autograd formula, which ``torch.compile`` and ``torch.autograd.gradcheck``
  take as an opaque, differentiable operator.
- :class:`Mamba`: the Mamba block as a ``torch.nn.Module`` with mamba-ssm's
  constructor arguments and parameter names.

Names in mamba-ssm and here (and in :func:`numba_mamba.selective_scan`)::

    mamba-ssm            numba-mamba
    u                    u          (batch, channels, length)
    delta                delta
    return_last_state    return_last_state; the state is also accepted back
    (none)               initial_state (its gradient too)

Eagerly, :func:`selective_scan_fn` runs through a ``torch.autograd.Function``
that keeps the forward's backward closure (the chunk states it saved); under
``torch.compile`` (while Dynamo traces) it calls the custom op, whose
backward op reruns the forward's chunk states before the backward pass (one
more forward: ops exchange tensors only).
"""

import functools

import numpy as np
import torch

from .scan import selective_scan as _np_scan
from .scan import selective_scan_vjp as _np_scan_vjp

__all__ = ["Mamba", "selective_scan_fn"]

_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---------------------------------------------------------------- tensors <-> arrays


@functools.lru_cache(maxsize=1)
def _np_bfloat16():
    try:
        import ml_dtypes
    except ImportError as exc:  # pragma: no cover (ml_dtypes comes with the test extra)
        raise TypeError("bfloat16 CPU tensors need the ml_dtypes package (NumPy has no "
                        "bfloat16): pip install ml_dtypes") from exc
    return np.dtype(ml_dtypes.bfloat16)


def _to_numpy(t):
    """A CPU tensor as a NumPy array sharing its memory."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(_np_bfloat16())
    return t.numpy()


def _from_numpy(a):
    """A NumPy array as a CPU tensor sharing its memory."""
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


@functools.lru_cache(maxsize=1)
def _cupy():
    try:
        import cupy
    except ImportError as exc:
        raise RuntimeError("CUDA tensors need CuPy and the CUDA stack of numba-mamba: "
                           "pip install 'numba-mamba[cuda12]' (or [cuda13])") from exc
    return cupy


class _Bridge:
    """Converts the tensors of one call to arrays and the results back: NumPy
    for CPU tensors; CuPy through DLPack for CUDA tensors, inside
    ``with bridge:``, where CuPy's current stream is torch's current one (and
    the device torch's), so that the scan is ordered with torch's work and
    nothing waits."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            cupy = _cupy()
            self._device = cupy.cuda.Device(device.index)
            self._stream = cupy.cuda.ExternalStream(
                torch.cuda.current_stream(device).cuda_stream, device.index)
            self.xp = cupy
        else:
            self.xp = np

    def __enter__(self):
        if self.cuda:
            self._device.__enter__()
            self._stream.__enter__()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self._stream.__exit__(*exc)
            self._device.__exit__(*exc)

    def array(self, t):
        if t is None:
            return None
        return _to_numpy(t) if not self.cuda else self.xp.from_dlpack(t.detach())

    def tensor(self, a):
        if a is None:
            return None
        return _from_numpy(a) if not self.cuda else torch.from_dlpack(a)


def _check_tensors(values):
    """Raise unless the scan's arguments ``values`` (in the order of
    ``_NAMES``) are tensors of a float dtype on one CPU or CUDA device
    (shapes are :func:`numba_mamba.selective_scan`'s to check); return that
    device."""
    device = None
    for name, t in zip(_NAMES, values):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOATS:
            raise TypeError(f"{name} must have dtype float16, bfloat16, float32 or float64, "
                            f"got {t.dtype}")
        if t.device.type not in ("cpu", "cuda"):
            raise ValueError(f"{name} must be a CPU or CUDA tensor, got device {t.device}")
        if device is None:
            device, first = t.device, name
        elif t.device != device:
            raise ValueError(f"{name} is on {t.device} but {first} is on {device}: the scan's "
                             f"tensors must be on one device")
    return device


def _compute_dtype(values):
    """The dtype the scan computes in and returns its last state in."""
    if any(t is not None and t.dtype == torch.float64 for t in values):
        return torch.float64
    return torch.float32


# ---------------------------------------------------------------- the custom ops


@torch.library.custom_op("numba_mamba::selective_scan", mutates_args=())
def _scan_op(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
             C: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None,
             delta_bias: torch.Tensor | None, initial_state: torch.Tensor | None,
             delta_softplus: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, last_state)`` of the scan (:func:`numba_mamba.selective_scan`)."""
    return _forward((u, delta, A, B, C, D, z, delta_bias, initial_state), delta_softplus)


def _forward(values, delta_softplus):
    """``(out, last_state)`` of the scan of the tensors ``values`` (in the order
    of ``_NAMES``), without what a backward needs."""
    with _Bridge(_check_tensors(values)) as bridge:
        out, last = _np_scan(*map(bridge.array, values[:8]), delta_softplus=delta_softplus,
                             return_last_state=True, initial_state=bridge.array(values[8]))
        return bridge.tensor(out), bridge.tensor(last)


@_scan_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus):
    values = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    Bt, Dc, _ = u.shape
    return (torch.empty_like(u, memory_format=torch.contiguous_format),
            u.new_empty((Bt, Dc, A.shape[1]), dtype=_compute_dtype(values)))


@torch.library.custom_op("numba_mamba::selective_scan_backward", mutates_args=())
def _scan_backward_op(dout: torch.Tensor, dlast_state: torch.Tensor | None, u: torch.Tensor,
                      delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                      D: torch.Tensor | None, z: torch.Tensor | None,
                      delta_bias: torch.Tensor | None, initial_state: torch.Tensor | None,
                      delta_softplus: bool) -> list[torch.Tensor]:
    """The gradients of the scan's nine inputs (an empty tensor for an absent
    one): the forward's chunk states recomputed, then the backward pass."""
    values = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    with _Bridge(_check_tensors(values)) as bridge:
        arrays = list(map(bridge.array, values))
        _, _, backward = _np_scan_vjp(*arrays[:8], delta_softplus=delta_softplus,
                                      initial_state=arrays[8])
        grads = backward(bridge.array(dout), bridge.array(dlast_state))
        return [u.new_empty(0) if g is None else bridge.tensor(g) for g in grads]


@_scan_backward_op.register_fake
def _(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus):
    return [u.new_empty(0) if x is None else torch.empty_like(x)
            for x in (u, delta, A, B, C, D, z, delta_bias, initial_state)]


def _setup_context(ctx, inputs, output):
    *tensors, ctx.delta_softplus = inputs
    ctx.present = tuple(t is not None for t in tensors)
    ctx.save_for_backward(*[t for t in tensors if t is not None])


def _op_backward(ctx, dout, dlast_state):
    saved = iter(ctx.saved_tensors)
    tensors = [next(saved) if present else None for present in ctx.present]
    if dout is None and dlast_state is None:
        return (None,) * 10
    if dout is None:
        dout = torch.zeros_like(tensors[0])
    grads = _scan_backward_op(dout, dlast_state, *tensors, ctx.delta_softplus)
    return (*[g if present else None for g, present in zip(grads, ctx.present)], None)


_scan_op.register_autograd(_op_backward, setup_context=_setup_context)


# ---------------------------------------------------------------- eager autograd


class _EagerScan(torch.autograd.Function):
    """The scan eagerly: the backward closure of :func:`numba_mamba.selective_scan_vjp`
    is kept between forward and backward (no recomputation)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus):
        values = (u, delta, A, B, C, D, z, delta_bias, initial_state)
        ctx.set_materialize_grads(False)
        ctx.bridge = _Bridge(_check_tensors(values))
        ctx.present = tuple(t is not None for t in values)
        # (saved only for autograd's check that no input changes in place before the
        # backward: the closure reads them)
        ctx.save_for_backward(*[t for t in values if t is not None])
        with ctx.bridge as bridge:
            arrays = list(map(bridge.array, values))
            out, last, ctx.backward_fn = _np_scan_vjp(*arrays[:8], delta_softplus=delta_softplus,
                                                      initial_state=arrays[8])
            ctx.out_shape, ctx.out_dtype = u.shape, u.dtype
            return bridge.tensor(out), bridge.tensor(last)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dlast_state):
        if dout is None and dlast_state is None:
            return (None,) * 10
        ctx.saved_tensors  # noqa: B018  (raises where an input was modified in place)
        bridge = ctx.bridge
        if bridge.cuda:  # the stream of the backward: torch's current one now
            bridge = _Bridge((dout if dout is not None else dlast_state).device)
        with bridge:
            if dout is None:  # (only last_state reached the loss)
                dout = torch.zeros(ctx.out_shape, dtype=ctx.out_dtype, device=dlast_state.device)
            grads = ctx.backward_fn(bridge.array(dout), bridge.array(dlast_state))
            result = [bridge.tensor(g) if present else None
                      for g, present in zip(grads, ctx.present)]
        return (*result, None)


# ---------------------------------------------------------------- public function


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False, initial_state=None):
    """mamba-ssm's ``selective_scan_fn`` on torch tensors, through this library's scan.

    The scan of :func:`numba_mamba.selective_scan` (see it for the
    recurrence), differentiable in every tensor argument.  CPU tensors are
    computed by the NumPy path and CUDA tensors by the CuPy path, both sharing
    the tensors' memory (DLPack for CUDA); CUDA work is queued on torch's
    current stream of the tensors' device, and nothing waits for the device.

    Parameters
    ----------
    u : Tensor, shape (batch, D, L)
        Input.
    delta : Tensor, shape (batch, D, L)
        Time steps, before ``delta_bias`` and the softplus.
    A : Tensor, shape (D, N)
        Diagonal state matrix (real; negative for a stable filter).
    B, C : Tensor, shape (D, N), (batch, N, L) or (batch, G, N, L)
        Input and output matrices: constant, variable, or variable in ``G``
        groups of ``D // G`` channels.
    D : Tensor, shape (D,), optional
        Skip connection.
    z : Tensor, shape (batch, D, L), optional
        Gate: the output is multiplied by ``silu(z)``.
    delta_bias : Tensor, shape (D,), optional
        Added to ``delta`` before the softplus.
    delta_softplus : bool, optional
        Apply softplus to ``delta`` (after the bias).
    return_last_state : bool, optional
        Also return the state after the last step.
    initial_state : Tensor, shape (batch, D, N), optional
        State before the first step (zeros where omitted); not in mamba-ssm.

    Returns
    -------
    out : Tensor, shape (batch, D, L)
        Of ``u``'s dtype.
    last_state : Tensor, shape (batch, D, N)
        Only with ``return_last_state``: float64 where an input is float64,
        else float32 (mamba-ssm: float32).

    Raises
    ------
    TypeError
        An argument is no tensor or of an unsupported dtype.
    ValueError
        Tensors on different devices or on a device other than CPU and CUDA;
        a shape that does not fit (named as :func:`numba_mamba.selective_scan`
        names it).

    Notes
    -----
    Eagerly the backward is the one of :func:`numba_mamba.selective_scan_vjp`
    of the same forward; where no gradient is wanted (``torch.no_grad()``,
    no input requiring one) the forward of :func:`numba_mamba.selective_scan`
    runs, which keeps nothing for a backward.  Under ``torch.compile`` the op
    ``torch.ops.numba_mamba.selective_scan`` is called instead, with its
    registered fake implementation and backward op, which recomputes the
    forward's chunk states first.  Complex ``A``, ``B``, ``C`` (mamba-ssm's
    complex variant) are not supported.

    Examples
    --------
    >>> import torch
    >>> from numba_mamba.torch import selective_scan_fn
    >>> g = torch.Generator().manual_seed(0)
    >>> u = torch.randn(2, 4, 16, generator=g, requires_grad=True)
    >>> delta = torch.rand(2, 4, 16, generator=g)
    >>> A = -torch.rand(4, 8, generator=g) - 0.5
    >>> B, C = torch.randn(2, 2, 8, 16, generator=g).unbind(1)
    >>> out, last = selective_scan_fn(u, delta, A, B, C, D=torch.ones(4), delta_softplus=True,
    ...                               return_last_state=True)
    >>> out.shape, last.shape
    (torch.Size([2, 4, 16]), torch.Size([2, 4, 8]))
    >>> out.sum().backward()
    >>> u.grad.shape
    torch.Size([2, 4, 16])

    The state carries a sequence over from one call to the next:

    >>> first, h = selective_scan_fn(u[..., :10], delta[..., :10], A, B[..., :10], C[..., :10],
    ...                              D=torch.ones(4), delta_softplus=True, return_last_state=True)
    >>> second = selective_scan_fn(u[..., 10:], delta[..., 10:], A, B[..., 10:], C[..., 10:],
    ...                            D=torch.ones(4), delta_softplus=True, initial_state=h)
    >>> torch.allclose(torch.cat([first, second], -1), out, atol=1e-5)
    True
    """
    values = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    softplus = bool(delta_softplus)
    if torch.compiler.is_compiling():
        out, last = _scan_op(*values, softplus)
    elif torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                         for t in values):
        out, last = _EagerScan.apply(*values, softplus)
    else:  # no gradient wanted: the forward keeps nothing for a backward
        out, last = _forward(values, softplus)
    return (out, last) if return_last_state else out


# ---------------------------------------------------------------- the Mamba block


def _wide(t):
    """``t`` in float32 where it is half precision (mamba-ssm keeps ``A``,
    ``D`` and the dt bias in float32), else as it is."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class Mamba(torch.nn.Module):
    """The Mamba block (mamba-ssm's ``Mamba``): its constructor arguments and
    parameter names, this library's scan.

    ``in_proj`` splits the input into ``x`` and the gate ``z``; ``x`` goes
    through the causal depthwise convolution and SiLU, ``x_proj`` makes the
    time steps (low rank, then ``dt_proj``), ``B`` and ``C`` from it, the
    selective scan (:func:`selective_scan_fn`, softplus of ``dt`` with
    ``dt_proj``'s bias) runs with ``A = -exp(A_log)``, ``D`` and ``z``, and
    ``out_proj`` maps back to ``d_model``.  Its ``state_dict`` is
    mamba-ssm's; :meth:`from_params` takes one block of
    :func:`numba_mamba.models.init_params` (or of a loaded checkpoint).

    Parameters
    ----------
    d_model : int
    d_state : int, optional
        ``N`` (16).
    d_conv : int, optional
        Convolution width (4).
    expand : int, optional
        ``d_inner = expand * d_model`` (2).
    dt_rank : int or "auto", optional
        ``"auto"``: ``ceil(d_model / 16)``.
    dt_min, dt_max, dt_init_floor : float, optional
        Initial time steps log-uniform in ``[dt_min, dt_max]``, floored.
    dt_init : {"random", "constant"}, optional
        ``dt_proj.weight`` uniform in ``+-dt_rank**-0.5 * dt_scale``, or that
        constant.
    dt_scale : float, optional
    conv_bias : bool, optional
        Bias in the convolution (True).
    bias : bool, optional
        Biases in ``in_proj`` and ``out_proj`` (False).
    use_fast_path : bool, optional
        Accepted for mamba-ssm's signature; there is one path here.
    layer_idx : int, optional
        Kept as an attribute (mamba-ssm's key of the inference cache).
    device, dtype : optional
        Of the parameters; ``A_log`` and ``D`` stay float32 where ``dtype``
        is float16 or bfloat16 (as mamba-ssm keeps them).

    Examples
    --------
    >>> import torch
    >>> from numba_mamba.torch import Mamba
    >>> _ = torch.manual_seed(0)
    >>> block = Mamba(d_model=16, d_state=8)
    >>> x = torch.randn(2, 12, 16)
    >>> y = block(x)
    >>> y.shape
    torch.Size([2, 12, 16])
    >>> y.square().mean().backward()
    >>> block.A_log.grad.shape, block.conv1d.weight.shape
    (torch.Size([32, 8]), torch.Size([32, 1, 4]))
    """

    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, dt_rank="auto", dt_min=0.001,
                 dt_max=0.1, dt_init="random", dt_scale=1.0, dt_init_floor=1e-4,
                 conv_bias=True, bias=False, use_fast_path=True, layer_idx=None, device=None,
                 dtype=None):
        super().__init__()
        if dt_init not in ("random", "constant"):
            raise ValueError(f"dt_init must be 'random' or 'constant', got {dt_init!r}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = -(-d_model // 16) if dt_rank == "auto" else int(dt_rank)
        self.use_fast_path, self.layer_idx = use_fast_path, layer_idx
        di, N, R = self.d_inner, d_state, self.dt_rank
        nn = torch.nn
        self.in_proj = nn.Linear(d_model, 2 * di, bias=bias, **factory)
        self.conv1d = nn.Conv1d(di, di, d_conv, groups=di, padding=d_conv - 1, bias=conv_bias,
                                **factory)
        self.act = nn.SiLU()
        self.x_proj = nn.Linear(di, R + 2 * N, bias=False, **factory)
        self.dt_proj = nn.Linear(R, di, bias=True, **factory)
        self.out_proj = nn.Linear(di, d_model, bias=bias, **factory)
        std = R ** -0.5 * dt_scale
        with torch.no_grad():
            if dt_init == "constant":
                nn.init.constant_(self.dt_proj.weight, std)
            else:
                nn.init.uniform_(self.dt_proj.weight, -std, std)
            lo, hi = np.log(dt_min), np.log(dt_max)
            dt = torch.exp(torch.rand(di, **factory) * (hi - lo) + lo).clamp(min=dt_init_floor)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        self.dt_proj.bias._no_reinit = True
        # A_log and D stay float32 in a half-precision block, as in mamba-ssm
        wide = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        A = torch.arange(1, N + 1, dtype=torch.float32, device=device).repeat(di, 1)
        self.A_log = nn.Parameter(torch.log(A).to(wide or torch.float32))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(di, device=device, dtype=wide))
        self.D._no_weight_decay = True

    @classmethod
    def from_params(cls, params, d_conv=None, device=None, dtype=None):
        """The block with the parameters of one block of this library's models.

        Parameters
        ----------
        params : dict
            Local names -> NumPy or CuPy arrays
            (:func:`numba_mamba.models.layer_params`); copied.
        device, dtype : optional
            Of the new parameters (default: CPU, the arrays' dtype).

        Returns
        -------
        Mamba

        Examples
        --------
        >>> import numpy as np
        >>> import torch
        >>> from numba_mamba import models
        >>> from numba_mamba.torch import Mamba
        >>> cfg = models.MambaConfig(d_model=8, n_layers=1, vocab_size=10, d_state=4)
        >>> p = models.layer_params(models.init_params(cfg, dtype=np.float64), 0)
        >>> block = Mamba.from_params(p)
        >>> u = np.random.default_rng(0).standard_normal((1, 5, 8))
        >>> ours, _ = models.mamba_block_forward(u, p)
        >>> bool(np.allclose(block(torch.from_numpy(u)).detach().numpy(), ours))
        True
        """
        if "x_proj.weight" not in params:
            raise ValueError("params must be of a selective block (with x_proj.weight); the "
                             "LTI block has no Mamba module")
        di, W = params["conv1d.weight"].shape
        N = params["A_log"].shape[1]
        R = params["dt_proj.weight"].shape[1]
        d_model = params["in_proj.weight"].shape[1]
        if dtype is None:
            dtype = getattr(torch, np.dtype(params["in_proj.weight"].dtype).name)
        block = cls(d_model, d_state=N, d_conv=W, expand=di // d_model, dt_rank=R,
                    conv_bias="conv1d.bias" in params, bias="in_proj.bias" in params,
                    device=device, dtype=dtype)
        if block.d_inner != di:
            raise ValueError(f"conv1d.weight has {di} channels, not a multiple of d_model "
                             f"{d_model}")
        state = {}
        for name, value in params.items():
            host = value.get() if hasattr(value, "get") else np.asarray(value)
            t = torch.from_numpy(np.ascontiguousarray(host))
            state[name] = t[:, None, :] if name == "conv1d.weight" else t
        block.load_state_dict(state)
        return block

    def forward(self, hidden_states, inference_params=None):
        """``(batch, L, d_model) -> (batch, L, d_model)``.

        ``inference_params`` (mamba-ssm's step-by-step decoding cache) is not
        supported: decode with :class:`numba_mamba.inference.Decoder`.
        """
        if inference_params is not None:
            raise NotImplementedError("inference_params is not supported; decode with "
                                      "numba_mamba.inference.Decoder")
        if hidden_states.ndim != 3 or hidden_states.shape[-1] != self.d_model:
            raise ValueError(f"hidden_states must have shape (batch, length, {self.d_model}), "
                             f"got {tuple(hidden_states.shape)}")
        L = hidden_states.shape[1]
        R, N = self.dt_rank, self.d_state
        xz = self.in_proj(hidden_states).transpose(1, 2)  # (batch, 2 d_inner, L)
        x, z = xz.chunk(2, dim=1)
        x = self.act(self.conv1d(x)[..., :L])
        x_dbl = torch.nn.functional.linear(x.transpose(1, 2), self.x_proj.weight)  # (b, L, R+2N)
        dt, B, C = x_dbl.split([R, N, N], dim=-1)
        dt = torch.nn.functional.linear(dt, self.dt_proj.weight).transpose(1, 2)
        y = selective_scan_fn(x, dt, -torch.exp(_wide(self.A_log)), B.transpose(1, 2),
                              C.transpose(1, 2), _wide(self.D), z=z,
                              delta_bias=_wide(self.dt_proj.bias), delta_softplus=True)
        return self.out_proj(y.transpose(1, 2))
