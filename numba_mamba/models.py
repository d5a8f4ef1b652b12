"""Mamba models with hand-written backward passes: block, residual stack, heads, losses.

A model is a :class:`MambaConfig` and a plain ``dict`` of named arrays (its
parameters, flat names like ``'layers.0.mixer.in_proj.weight'``); gradients are
a dict with the same keys.  Every function is a forward returning ``(out,
cache)`` and a backward taking ``(dout, cache)``, written side by side.

Architecture (Gu & Dao 2023, and the reference implementation's
``Mamba`` / ``MixerModel`` / ``MambaLMHeadModel``)::

    h_0     = embedding[tokens]  (LM head)   or   inputs W_enc^T + b_enc  (regression)
    h_{i+1} = h_i + block_i(rmsnorm_i(h_i))                  i = 0 .. n_layers - 1
    out     = rmsnorm_f(h_n) W_head^T  (+ b)                 logits or predictions

The Mamba block, with ``d_inner = expand * d_model``, ``R = dt_rank``,
``N = d_state`` (shapes in the order they are computed)::

    x, z   = split(in_proj(u))                 (Bt, L, 2 d_inner) -> 2 x (Bt, d_inner, L)
    x      = silu(causal_depthwise_conv1d(x))  width d_conv
    dt, B, C = split(x_proj(x))                (Bt, R + 2N, L)
    dt     = dt_proj.weight @ dt               (Bt, d_inner, L); its bias is the
                                               scan's delta_bias, with softplus
    y      = selective_scan(x, dt, A = -exp(A_log), B, C, D, z)
    out    = out_proj(y)                       (Bt, L, d_model)

Layout: activations between blocks are ``(Bt, L, d_model)`` like the
reference; the scan wants time last.  The block transposes once, right after
``in_proj``: its output is copied into contiguous ``x`` and ``z`` of shape
``(Bt, d_inner, L)``, and everything up to the scan's output stays in that
layout (``x_proj`` and ``dt_proj`` are channels-first matmuls, ``B`` and ``C``
come out as ``(Bt, N, L)``).  ``out_proj`` reads ``y`` through a transposed view
(the matmul handles the strides).  The backward mirrors this: one copy of
``dx`` and ``dz`` back into ``(Bt, L, 2 d_inner)`` before ``in_proj``'s backward.

The LTI block (``block="lti"``, the S4D-style ablation of the paper) drops
``x_proj`` and ``dt_proj``: ``delta = softplus(dt_bias)`` per channel and
``B``, ``C`` are ``(d_inner, N)`` parameters, the same at every step and for
every input; the rest of the block is the same.

References
----------
.. [1] A. Gu and T. Dao, "Mamba: Linear-Time Sequence Modeling with Selective
   State Spaces", arXiv:2312.00752, 2023.
.. [2] A. Gu, A. Gupta, K. Goel and C. Ré, "On the Parameterization and
   Initialization of Diagonal State Space Models" (S4D), NeurIPS 2022.
"""

import dataclasses
import functools
import math
from contextlib import nullcontext
from typing import Any, Mapping, NamedTuple

import numpy as np

from ._cpu_threads import blas_limited
from ._validation import array_namespace, check_shape
from .layers import (embedding_backward, embedding_forward, linear_backward, linear_forward,
                     rmsnorm_backward, rmsnorm_forward, conv1d_backward, conv1d_forward,
                     selective_scan_backward, selective_scan_forward, softplus_backward,
                     softplus_forward)

__all__ = [
    "MambaConfig", "MambaBlockCache", "ModelCache",
    "block_param_names", "block_state", "init_params", "layer_params",
    "mamba_block_forward", "mamba_block_backward",
    "model_forward", "model_backward", "loss_and_grads", "device_loss_and_grads",
    "cross_entropy_forward", "cross_entropy_backward", "mse_forward", "mse_backward",
]

BLOCKS = ("mamba", "lti")


def _blas_limited_on_cpu(array_of):
    """Decorator: the call runs under :func:`numba_mamba._cpu_threads.blas_limited`
    (BLAS on one thread for the whole call, not set and undone per GEMM) when
    ``array_of(args, kwargs)``, one of its array arguments, is a NumPy array."""
    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            cpu = isinstance(array_of(args, kwargs), np.ndarray)
            with blas_limited() if cpu else nullcontext():
                return fn(*args, **kwargs)
        return run
    return wrap


def _params_arg(index):
    """``array_of`` for :func:`_blas_limited_on_cpu`: a parameter array of argument
    ``params`` (positional ``index``)."""
    def array_of(args, kwargs):
        params = args[index] if len(args) > index else kwargs.get("params")
        return next(iter(params.values()), None) if isinstance(params, Mapping) else None
    return array_of


@dataclasses.dataclass(frozen=True)
class MambaConfig:
    """Hyperparameters of a Mamba model (a stack of blocks and one head).

    Give ``vocab_size`` for a language model (tokens in, logits out), or
    ``d_input`` and ``d_output`` for a regression model (real-valued channels
    in and out, e.g. time series).

    Parameters
    ----------
    d_model : int
        Width of the residual stream.
    n_layers : int
        Number of blocks.
    vocab_size : int, optional
        Vocabulary of the language-model head.
    d_input, d_output : int, optional
        Channels in and out of the regression head.
    d_state : int, optional
        ``N``, states per channel (16).
    d_conv : int, optional
        Width of the causal convolution (4).
    expand : int, optional
        ``d_inner = expand * d_model`` (2).
    dt_rank : int, optional
        Rank of the ``dt`` projection; default ``ceil(d_model / 16)``.
    dt_min, dt_max, dt_init_floor : float, optional
        Initial time steps are drawn log-uniform in ``[dt_min, dt_max]`` and
        floored at ``dt_init_floor``.
    block : {"mamba", "lti"}, optional
        Selective block, or the LTI ablation (delta, B, C not input-dependent).
    tie_embeddings : bool, optional
        The LM head reuses the embedding matrix (True).
    norm_eps : float, optional
        RMSNorm epsilon (1e-5).
    conv_bias, proj_bias : bool, optional
        Bias in the convolution (True) and in in_proj/out_proj (False).

    Examples
    --------
    >>> from numba_mamba.models import MambaConfig
    >>> cfg = MambaConfig(d_model=32, n_layers=2, vocab_size=50)
    >>> cfg.d_inner, cfg.rank, cfg.head
    (64, 2, 'lm')
    """

    d_model: int
    n_layers: int
    vocab_size: int = None
    d_input: int = None
    d_output: int = None
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int = None
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    dt_init_floor: float = 1e-4
    block: str = "mamba"
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    conv_bias: bool = True
    proj_bias: bool = False

    def __post_init__(self):
        for name in ("d_model", "n_layers", "d_state", "d_conv", "expand"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.block not in BLOCKS:
            raise ValueError(f"block must be one of {BLOCKS}, got {self.block!r}")
        lm = self.vocab_size is not None
        reg = self.d_input is not None or self.d_output is not None
        if lm == reg or (reg and (self.d_input is None or self.d_output is None)):
            raise ValueError("give either vocab_size (language model) or both d_input and "
                             f"d_output (regression), got vocab_size={self.vocab_size}, "
                             f"d_input={self.d_input}, d_output={self.d_output}")
        if self.dt_rank is not None and self.dt_rank < 1:
            raise ValueError(f"dt_rank must be a positive integer or None, got {self.dt_rank}")
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got {self.dt_min}, {self.dt_max}")

    @property
    def d_inner(self):
        """Channels inside a block: ``expand * d_model``."""
        return self.expand * self.d_model

    @property
    def rank(self):
        """Rank of the dt projection: ``dt_rank`` or ``ceil(d_model / 16)``."""
        return self.dt_rank if self.dt_rank is not None else math.ceil(self.d_model / 16)

    @property
    def head(self):
        """``'lm'`` or ``'regression'``."""
        return "lm" if self.vocab_size is not None else "regression"

    def to_dict(self):
        """The fields as a JSON-serialisable dict."""
        def plain(v):
            return v.item() if isinstance(v, np.generic) else v
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d):
        """Inverse of :meth:`to_dict`; unknown keys raise ValueError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown MambaConfig fields {sorted(unknown)}")
        return cls(**d)


# ---------------------------------------------------------------- parameters


def block_param_names(config):
    """Local parameter names of one block (prefix ``layers.{i}.mixer.``)."""
    names = ["in_proj.weight", "conv1d.weight"]
    names += ["conv1d.bias"] if config.conv_bias else []
    if config.block == "mamba":
        names += ["x_proj.weight", "dt_proj.weight", "dt_proj.bias"]
    else:
        names += ["dt_bias", "B", "C"]
    names += ["A_log", "D", "out_proj.weight"]
    if config.proj_bias:
        names += ["in_proj.bias", "out_proj.bias"]
    return names


def param_shapes(config: "MambaConfig") -> dict:
    """Name -> shape of every parameter of a model of ``config`` (what
    :func:`init_params` makes).

    Examples
    --------
    >>> from numba_mamba.models import MambaConfig, param_shapes
    >>> param_shapes(MambaConfig(d_model=8, n_layers=1, vocab_size=10))["embedding.weight"]
    (10, 8)
    """
    dm, di, N, W, R = config.d_model, config.d_inner, config.d_state, config.d_conv, config.rank
    block = {"in_proj.weight": (2 * di, dm), "conv1d.weight": (di, W), "conv1d.bias": (di,),
             "x_proj.weight": (R + 2 * N, di), "dt_proj.weight": (di, R), "dt_proj.bias": (di,),
             "dt_bias": (di,), "B": (di, N), "C": (di, N), "A_log": (di, N), "D": (di,),
             "out_proj.weight": (dm, di), "in_proj.bias": (2 * di,), "out_proj.bias": (dm,)}
    shapes = {}
    if config.head == "lm":
        shapes["embedding.weight"] = (config.vocab_size, dm)
    else:
        shapes["encoder.weight"] = (dm, config.d_input)
        shapes["encoder.bias"] = (dm,)
    for i in range(config.n_layers):
        shapes[f"layers.{i}.norm.weight"] = (dm,)
        for name in block_param_names(config):
            shapes[f"layers.{i}.mixer.{name}"] = block[name]
    shapes["norm_f.weight"] = (dm,)
    if config.head == "lm":
        if not config.tie_embeddings:
            shapes["lm_head.weight"] = (config.vocab_size, dm)
    else:
        shapes["decoder.weight"] = (config.d_output, dm)
        shapes["decoder.bias"] = (config.d_output,)
    return shapes


def check_params(params: Mapping[str, Any], config: "MambaConfig") -> None:
    """Raise unless ``params`` are those of a model of ``config``: the names
    and shapes of :func:`param_shapes`, floating arrays.

    Raises
    ------
    TypeError
        ``params`` not a mapping, or a parameter not a floating array (the
        message names it).
    ValueError
        A parameter missing, one the config does not have (params built for
        another config: more layers, untied head, ...), or one of another
        shape (the message names it, the expected and the actual shape).
    """
    if not hasattr(params, "keys") or not hasattr(params, "__getitem__"):
        raise TypeError(f"params must be a dict of name -> array (from init_params), got "
                        f"{type(params).__name__}")
    shapes = param_shapes(config)
    missing = [k for k in shapes if k not in params]
    if missing:
        raise ValueError(f"params lacks {len(missing)} parameter(s) of the config, first "
                         f"{missing[0]!r} (shape {shapes[missing[0]]}): params built for "
                         f"another config?")
    extra = [k for k in params if k not in shapes]
    if extra:
        raise ValueError(f"params has {len(extra)} parameter(s) the config does not, first "
                         f"{extra[0]!r}: params built for another config?")
    for name, shape in shapes.items():
        x = params[name]
        dtype = getattr(x, "dtype", None)
        if dtype is None or dtype.kind != "f":
            raise TypeError(f"params[{name!r}] must be a floating array, got "
                            f"{type(x).__name__}{'' if dtype is None else ' of ' + str(dtype)}")
        if not dtype.isnative:  # (updated in place by the optimizer: not copied here)
            raise TypeError(f"params[{name!r}] must be in native byte order, got {dtype}: "
                            f"convert it with .astype({dtype.newbyteorder('=').name!r})")
        check_shape(f"params[{name!r}]", x, shape, "(from the config)")


def layer_params(params, i):
    """The parameters of block ``i`` under their local names (no copies)."""
    prefix = f"layers.{i}.mixer."
    return {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}


def _uniform(rng, bound, shape):
    return rng.uniform(-bound, bound, shape)


def _init_dt_bias(rng, config):
    """Inverse softplus of dt drawn log-uniform in [dt_min, dt_max], floored."""
    lo, hi = math.log(config.dt_min), math.log(config.dt_max)
    dt = np.exp(rng.uniform(0.0, 1.0, config.d_inner) * (hi - lo) + lo)
    dt = np.maximum(dt, config.dt_init_floor)
    return dt + np.log(-np.expm1(-dt))  # softplus(this) == dt


def init_params(config: "MambaConfig", seed: Any = 0, dtype: Any = np.float32,
                xp: Any = np) -> dict:
    """Parameters of a model, initialized as in the paper and reference code.

    Linear and convolution weights are uniform in ``+-1/sqrt(fan_in)`` (the
    PyTorch default), ``out_proj.weight`` is further divided by
    ``sqrt(n_layers)``, ``dt_proj.weight`` is uniform in ``+-rank**-0.5``, the dt
    bias is the inverse softplus of a dt drawn log-uniform in ``[dt_min,
    dt_max]`` (floor ``dt_init_floor``), ``A_log = log(1..N)`` so that
    ``A = -(1..N)`` (S4D-Real), ``D = 1``, norms 1, biases 0 except the
    convolution's (uniform like its weight), embeddings ``N(0, 0.02**2)``.
    LTI blocks: ``B = 1`` and ``C ~ N(0, 1/N)``.

    Parameters
    ----------
    config : MambaConfig
    seed : int or numpy.random.Generator, optional
        Draws are made on the host in float64, so a seed gives the same
        parameters on the CPU and the GPU.
    dtype : numpy dtype, optional
        float32 (default) or float64.
    xp : module, optional
        ``numpy`` or ``cupy``: where the arrays live.

    Returns
    -------
    dict
        Name -> array.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_mamba.models import MambaConfig, init_params
    >>> params = init_params(MambaConfig(d_model=8, n_layers=1, vocab_size=10, d_state=4))
    >>> params["layers.0.mixer.in_proj.weight"].shape, params["layers.0.mixer.x_proj.weight"].shape
    ((32, 8), (9, 16))
    >>> -np.exp(params["layers.0.mixer.A_log"][0])
    array([-1., -2., -3., -4.], dtype=float32)
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    dm, di, N, W, R = config.d_model, config.d_inner, config.d_state, config.d_conv, config.rank
    p = {}
    if config.head == "lm":
        p["embedding.weight"] = rng.normal(0.0, 0.02, (config.vocab_size, dm))
    else:
        p["encoder.weight"] = _uniform(rng, config.d_input ** -0.5, (dm, config.d_input))
        p["encoder.bias"] = np.zeros(dm)
    for i in range(config.n_layers):
        pre = f"layers.{i}."
        p[pre + "norm.weight"] = np.ones(dm)
        m = pre + "mixer."
        p[m + "in_proj.weight"] = _uniform(rng, dm ** -0.5, (2 * di, dm))
        p[m + "conv1d.weight"] = _uniform(rng, W ** -0.5, (di, W))
        if config.conv_bias:
            p[m + "conv1d.bias"] = _uniform(rng, W ** -0.5, di)
        if config.block == "mamba":
            p[m + "x_proj.weight"] = _uniform(rng, di ** -0.5, (R + 2 * N, di))
            p[m + "dt_proj.weight"] = _uniform(rng, R ** -0.5, (di, R))
            p[m + "dt_proj.bias"] = _init_dt_bias(rng, config)
        else:
            p[m + "dt_bias"] = _init_dt_bias(rng, config)
            p[m + "B"] = np.ones((di, N))
            p[m + "C"] = rng.normal(0.0, N ** -0.5, (di, N))
        p[m + "A_log"] = np.log(np.tile(np.arange(1, N + 1, dtype=np.float64), (di, 1)))
        p[m + "D"] = np.ones(di)
        p[m + "out_proj.weight"] = _uniform(rng, di ** -0.5, (dm, di)) / math.sqrt(config.n_layers)
        if config.proj_bias:
            p[m + "in_proj.bias"] = np.zeros(2 * di)
            p[m + "out_proj.bias"] = np.zeros(dm)
    p["norm_f.weight"] = np.ones(dm)
    if config.head == "lm":
        if not config.tie_embeddings:
            p["lm_head.weight"] = _uniform(rng, dm ** -0.5, (config.vocab_size, dm))
    else:
        p["decoder.weight"] = _uniform(rng, dm ** -0.5, (config.d_output, dm))
        p["decoder.bias"] = np.zeros(config.d_output)
    return {k: xp.asarray(v.astype(dtype)) for k, v in p.items()}


# ---------------------------------------------------------------- the Mamba block


class MambaBlockCache(NamedTuple):
    """What :func:`mamba_block_forward` keeps for :func:`mamba_block_backward`."""

    in_proj: object  # LinearCache of the whole in_proj (input u (Bt, L, d_model), out channels first)
    conv: object  # Conv1dCache: x before the conv (Bt, d_inner, L), contiguous
    x_proj: object  # LinearCache, channels first: xc (Bt, d_inner, L); None for LTI
    dt_proj: object  # LinearCache, channels first: dt_low (Bt, R, L) view; None for LTI
    scan: object  # ScanCache
    out_proj: object  # LinearCache: y (Bt, d_inner, L) to out (Bt, L, d_model)
    A: object  # (d_inner, N) = -exp(A_log)
    last_state: object  # (Bt, d_inner, N) scan state after the last step
    lti: bool
    rank: int  # R (0 for LTI)
    continued: bool = False  # from an initial state: conv.x starts with d_conv - 1 earlier inputs
    softplus: object = None  # with dtau: cache of the softplus of the raw step (Bt, d_inner, L)
    dtau: object = None  # with dtau: the time factor as (Bt, 1, L)


def _check_dtau(dtau, batch_length, dtype, xp):
    """Raise unless the time factor ``dtau`` is an array of ``xp`` of shape
    ``batch_length`` and ``dtype`` (its values are not read: no waiting for the device)."""
    if not (hasattr(dtau, "shape") and hasattr(dtau, "dtype")) \
            or array_namespace(dtau=dtau) is not xp:
        kind = type(dtau)
        where = "" if kind.__module__ == "builtins" else kind.__module__.split(".")[0] + "."
        raise TypeError(f"dtau must be a {xp.__name__} array like the inputs, got "
                        f"{where}{kind.__name__}")
    check_shape("dtau", dtau, batch_length, "(batch, length)")
    if dtau.dtype != dtype:
        raise TypeError(f"dtau must have dtype {np.dtype(dtype)} like the parameters, got "
                        f"{dtau.dtype}")


def mamba_block_forward(u, params, initial_state=None, dtau=None):
    """Forward of one Mamba block (selective, or LTI when it has no ``x_proj``).

    Parameters
    ----------
    u : array, shape (Bt, L, d_model)
        Block input (the normalized residual stream).
    params : dict
        The block's parameters under their local names
        (:func:`block_param_names`, :func:`layer_params`).
    initial_state : (conv_state, ssm_state), optional
        Continue from a recurrent state (:func:`block_state` of an earlier
        forward, or :mod:`numba_mamba.inference`'s): ``conv_state (Bt,
        d_inner, d_conv)`` holds the inputs of the convolution before ``u``
        (newest last; its last ``d_conv - 1`` are prepended to the
        convolution's input), ``ssm_state (Bt, d_inner, N)`` is the scan's
        ``initial_state``.  Default: the zero state.  A forward with an
        initial state has no backward here (inference only).
    dtau : array, shape (Bt, L), optional
        A time factor per sample (of ``u``'s dtype) that multiplies the
        scan's step after the softplus: ``delta = softplus(dt_proj(x) +
        dt_bias) * dtau`` (LTI: ``softplus(dt_bias) * dtau``), so the state
        decays over ``dtau`` times the learned step (irregular sampling,
        :mod:`numba_mamba.timeseries`).  Its values are not checked (that
        would wait for the device): positive and finite, or 0 where a
        sample is to leave the state as it is.  Default: none, the plain
        block (``dtau = 1`` gives the same outputs up to rounding).

    Returns
    -------
    out : array, shape (Bt, L, d_model)
    cache : MambaBlockCache

    Examples
    --------
    >>> import numpy as np
    >>> from numba_mamba import models
    >>> cfg = models.MambaConfig(d_model=8, n_layers=1, vocab_size=10, d_state=4)
    >>> p = models.layer_params(models.init_params(cfg, dtype=np.float64), 0)
    >>> u = np.random.default_rng(0).standard_normal((2, 5, 8))
    >>> out, cache = models.mamba_block_forward(u, p)
    >>> du, grads = models.mamba_block_backward(np.ones_like(out), cache)
    >>> out.shape, du.shape, grads["A_log"].shape
    ((2, 5, 8), (2, 5, 8), (16, 4))
    >>> same, _ = models.mamba_block_forward(u, p, dtau=np.ones((2, 5)))  # a unit time factor
    >>> bool(np.allclose(same, out))
    True
    """
    xp = array_namespace(u=u, **{k.replace(".", "_"): v for k, v in params.items()})
    if u.ndim != 3:
        raise ValueError(f"u must have 3 dims (batch, length, d_model), got shape "
                         f"{tuple(u.shape)}")
    if dtau is not None:
        _check_dtau(dtau, u.shape[:2], u.dtype, xp)
    p = params
    di = p["in_proj.weight"].shape[0] // 2
    lti = "x_proj.weight" not in p
    # x and z, each (Bt, di, L) and contiguous: the GEMMs write them channels
    # first, the scan's layout (the block has no transposing copy)
    W_in, b_in = p["in_proj.weight"], p.get("in_proj.bias")
    xs, c_inx = linear_forward(u, W_in[:di], None if b_in is None else b_in[:di], out_axis=-2)
    z, _ = linear_forward(u, W_in[di:], None if b_in is None else b_in[di:], out_axis=-2)
    conv0, h0 = (None, None) if initial_state is None else initial_state
    if initial_state is not None:  # the conv sees the inputs before u; their outputs dropped
        W = p["conv1d.weight"].shape[1]
        check_shape("initial_state[0]", conv0, (xs.shape[0], di, W), "(batch, d_inner, d_conv)")
        xs = xp.concatenate([conv0[..., 1:].astype(xs.dtype), xs], axis=-1)
    xc, c_conv = conv1d_forward(xs, p["conv1d.weight"], p.get("conv1d.bias"),
                                activation="silu")  # (Bt, di, L)
    if initial_state is not None:
        xc = xc[..., W - 1:]
    A = -xp.exp(p["A_log"])  # (di, N)
    N = A.shape[1]
    if lti:
        R = 0
        c_xproj = c_dt = dt = None  # delta = softplus(0 + dt_bias) at every step
        B, C, bias = p["B"], p["C"], p["dt_bias"]
    else:
        R = p["dt_proj.weight"].shape[1]
        x_dbl, c_xproj = linear_forward(xc, p["x_proj.weight"], axis=-2)  # (Bt, R+2N, L)
        B, C, bias = x_dbl[:, R:R + N], x_dbl[:, R + N:], p["dt_proj.bias"]
        # (Bt, di, L); with dtau the bias is added here, not by the scan
        dt, c_dt = linear_forward(x_dbl[:, :R], p["dt_proj.weight"],
                                  None if dtau is None else bias, axis=-2)
    c_sp = dtau3 = None
    if dtau is None:
        y, last, c_scan = selective_scan_forward(
            xc, xp.zeros_like(xc) if lti else dt, A, B, C, D=p["D"], z=z, delta_bias=bias,
            delta_softplus=True, initial_state=h0)  # y (Bt, di, L)
    else:  # delta = softplus(dt + bias) * dtau, made before the scan
        dtau3 = dtau[:, None, :]  # (Bt, 1, L)
        sp, c_sp = softplus_forward(bias if lti else dt)
        delta = (sp[:, None] if lti else sp) * dtau3
        y, last, c_scan = selective_scan_forward(xc, delta, A, B, C, D=p["D"], z=z,
                                                 initial_state=h0)
    out, c_out = linear_forward(y, p["out_proj.weight"], p.get("out_proj.bias"), axis=-2,
                                out_axis=-1)  # (Bt, L, d_model)
    return out, MambaBlockCache(c_inx._replace(weight=W_in), c_conv, c_xproj, c_dt, c_scan, c_out, A, last, lti, R,
                                initial_state is not None, c_sp, dtau3)


def mamba_block_backward(dout, cache):
    """Gradients of :func:`mamba_block_forward`.

    Parameters
    ----------
    dout : array, shape (Bt, L, d_model)
    cache : MambaBlockCache

    Returns
    -------
    du : array, shape (Bt, L, d_model)
    grads : dict
        Local parameter name -> gradient, the keys of the forward's ``params``.
    """
    c = cache
    if c.continued:
        raise ValueError("cache is of a forward from an initial_state, which has no backward")
    xp = array_namespace(dout=dout, A=c.A)
    g = {}
    dy, g["out_proj.weight"], db = linear_backward(dout, c.out_proj)  # (Bt, di, L)
    if db is not None:
        g["out_proj.bias"] = db
    s = selective_scan_backward(dy, c.scan)
    g["A_log"] = s.dA * c.A  # A = -exp(A_log): dA_log = dA * A
    g["D"] = s.dD
    dxc = s.du  # (Bt, di, L)
    ddelta = s.ddelta if c.dtau is None else s.ddelta * c.dtau  # d(delta / dtau)
    if c.lti:
        g["dt_bias"] = s.ddelta_bias if c.dtau is None else \
            softplus_backward(ddelta.sum(axis=(0, 2)), c.softplus)
        g["B"], g["C"] = s.dB, s.dC
    else:
        R = c.rank
        N = c.A.shape[1]
        if c.dtau is None:
            g["dt_proj.bias"] = s.ddelta_bias
            ddt_low, g["dt_proj.weight"], _ = linear_backward(ddelta, c.dt_proj)  # (Bt, R, L)
        else:  # the bias went through dt_proj's linear and the softplus before the scan
            ddt_low, dW, g["dt_proj.bias"] = linear_backward(
                softplus_backward(ddelta, c.softplus), c.dt_proj)
            g["dt_proj.weight"] = dW
        Bt, _, L = dxc.shape
        dx_dbl = xp.empty((Bt, R + 2 * N, L), dtype=dxc.dtype)
        dx_dbl[:, :R] = ddt_low
        dx_dbl[:, R:R + N] = s.dB
        dx_dbl[:, R + N:] = s.dC
        dxc, g["x_proj.weight"], _ = linear_backward(dx_dbl, c.x_proj, dx_add=dxc)
    # the gradient of in_proj's whole output, x's channels then z's: one GEMM
    # each for du and the weight gradient rather than one per half
    Bt, di, L = dxc.shape
    dxz = xp.empty((Bt, 2 * di, L), dtype=dxc.dtype)
    _, g["conv1d.weight"], dcb = conv1d_backward(dxc, c.conv, dx_out=dxz, dx_channel=0)
    if dcb is not None:
        g["conv1d.bias"] = dcb
    dxz[:, di:] = s.dz
    du, g["in_proj.weight"], db_in = linear_backward(dxz, c.in_proj)  # du (Bt, L, d_model)
    if db_in is not None:
        g["in_proj.bias"] = db_in
    return du, g


def block_state(cache):
    """Recurrent state after a block's parallel forward: ``(conv_state, ssm_state)``.

    ``conv_state (Bt, d_inner, d_conv)`` holds the last ``d_conv`` inputs of
    the convolution (zeros before the start), ``ssm_state (Bt, d_inner, N)``
    the scan's last state: what :func:`numba_mamba.inference.step` continues from.
    """
    x = cache.conv.x  # (Bt, di, L)
    xp = array_namespace(x=x)
    Bt, di, L = x.shape
    W = cache.conv.weight.shape[1]
    conv_state = xp.zeros((Bt, di, W), dtype=x.dtype)
    n = min(W, L)
    conv_state[..., W - n:] = x[..., L - n:]
    return conv_state, xp.ascontiguousarray(cache.last_state, dtype=x.dtype)


# ---------------------------------------------------------------- the model


class ModelCache(NamedTuple):
    """What :func:`model_forward` keeps for :func:`model_backward`."""

    config: object  # MambaConfig
    stem: object  # EmbeddingCache (LM) or LinearCache of the encoder (regression)
    norms: list  # n_layers RMSNormCache, one per pre-norm
    blocks: list  # n_layers MambaBlockCache
    norm_f: object  # RMSNormCache of the final norm
    head: object  # LinearCache of the LM head / decoder


def _check_inputs(inputs, config, params=None):
    """``inputs`` validated for ``config``; array-likes (lists) made arrays
    where ``params`` live (:func:`_as_array_like_params`)."""
    if params is not None:
        inputs = _as_array_like_params(inputs, params, config.head == "lm")
    if config.head == "lm":
        if inputs.ndim != 2 or inputs.dtype.kind not in "iu":
            raise ValueError(f"inputs must be integer token ids of shape (batch, length), "
                             f"got dtype {inputs.dtype} and shape {tuple(inputs.shape)}")
    elif inputs.ndim != 3 or inputs.shape[-1] != config.d_input:
        raise ValueError(f"inputs must have shape (batch, length, {config.d_input}) "
                         f"(d_input), got {tuple(inputs.shape)}")
    return inputs


def _as_array_like_params(x, params, integer):
    """An array-like ``x`` (a list) as an array where ``params`` live: of
    integers (token ids, ``integer``) or the parameters' dtype; arrays as
    given, in native byte order."""
    if x is None:
        return x
    if hasattr(x, "ndim") and hasattr(x, "dtype"):
        return x if x.dtype.isnative else x.astype(x.dtype.newbyteorder("="))
    w = params["norm_f.weight"]
    xp = array_namespace(w=w)
    x = xp.asarray(x)
    if not integer or x.dtype.kind not in "iu":
        x = x.astype(w.dtype)
    return x


@_blas_limited_on_cpu(_params_arg(1))
def model_forward(inputs: Any, params: Mapping[str, Any], config: "MambaConfig",
                  initial_state: Any = None, sync: bool = True,
                  keep_cache: bool = True, dtau: Any = None) -> tuple:
    """Forward of the whole model: stem, residual stack of pre-norm blocks, head.

    Parameters
    ----------
    inputs : array
        LM: integer tokens ``(Bt, L)``.  Regression: ``(Bt, L, d_input)``.
    params : dict
        From :func:`init_params` (or a checkpoint).
    config : MambaConfig
    initial_state : (conv, ssm), optional
        Continue from a recurrent state: per layer lists of conv and SSM
        states (an :class:`numba_mamba.inference.InferenceState`), as
        :func:`mamba_block_forward` takes them.  Default: the zero state.
    sync : bool, optional
        False: token ids are not checked against the vocabulary (the check
        waits for the device); the caller has validated them.
    keep_cache : bool, optional
        False: an inference forward, with no backward to follow.  Each
        layer's activations are dropped as soon as the next layer has its
        input, so the peak memory is that of one block (with the cache, all
        layers' activations live until the backward); the outputs are the
        same to the bit.
    dtau : array, shape (Bt, L), optional
        A time factor per sample, of the parameters' dtype, that multiplies
        every block's step after the softplus (see
        :func:`mamba_block_forward`): with sample times ``t`` and a time unit
        ``tau``, ``dtau_k = (t_k - t_{k-1}) / tau`` makes the state decay
        over the real time elapsed.  :func:`model_backward` gives no gradient
        for it.  Default: none, the plain model.

    Returns
    -------
    out : array
        LM: logits ``(Bt, L, vocab_size)``.  Regression: ``(Bt, L, d_output)``.
    cache : ModelCache or None
        None when ``keep_cache`` is False.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_mamba import models
    >>> cfg = models.MambaConfig(d_model=8, n_layers=2, vocab_size=11, d_state=4)
    >>> params = models.init_params(cfg)
    >>> logits, cache = models.model_forward(np.array([[1, 2, 3]]), params, cfg)
    >>> logits.shape, logits.dtype
    ((1, 3, 11), dtype('float32'))
    >>> same, none = models.model_forward(np.array([[1, 2, 3]]), params, cfg, keep_cache=False)
    >>> bool((same == logits).all()), none
    (True, None)
    >>> slow, _ = models.model_forward(np.array([[1, 2, 3]]), params, cfg,
    ...                                dtau=np.full((1, 3), 0.5, np.float32))
    >>> slow.shape
    (1, 3, 11)
    """
    check_params(params, config)
    inputs = _check_inputs(inputs, config, params)
    if dtau is not None:
        w = params["norm_f.weight"]
        _check_dtau(dtau, inputs.shape[:2], w.dtype, array_namespace(w=w))
    if config.head == "lm":
        h, c_stem = embedding_forward(inputs, params["embedding.weight"], sync=sync)
    else:
        h, c_stem = linear_forward(inputs, params["encoder.weight"], params["encoder.bias"])
    norms, blocks = [], []
    for i in range(config.n_layers):
        hn, c_norm = rmsnorm_forward(h, params[f"layers.{i}.norm.weight"], config.norm_eps)
        o, c_blk = mamba_block_forward(
            hn, layer_params(params, i),
            None if initial_state is None else (initial_state[0][i], initial_state[1][i]),
            dtau=dtau)
        h = h + o
        if keep_cache:
            norms.append(c_norm)
            blocks.append(c_blk)
        del hn, o, c_norm, c_blk  # (without the cache: this layer's activations go now)
    hf, c_normf = rmsnorm_forward(h, params["norm_f.weight"], config.norm_eps)
    if config.head == "lm":
        W = params["embedding.weight"] if config.tie_embeddings else params["lm_head.weight"]
        out, c_head = linear_forward(hf, W)
    else:
        out, c_head = linear_forward(hf, params["decoder.weight"], params["decoder.bias"])
    if not keep_cache:
        return out, None
    return out, ModelCache(config, c_stem, norms, blocks, c_normf, c_head)


@_blas_limited_on_cpu(lambda args, kwargs: args[0] if args else kwargs.get("dout"))
def model_backward(dout: Any, cache: Any, on_grads: Any = None) -> tuple:
    """Gradients of :func:`model_forward`.

    Parameters
    ----------
    dout : array
        Gradient of the loss with respect to the model's output.
    cache : ModelCache
    on_grads : callable, optional
        ``on_grads(names, grads)``, called as soon as a group of gradients
        is final (nothing later in the backward changes them), in the order
        of the backward: the head and ``norm_f`` first, then each layer from
        the last to the first, then the stem (the embedding, tied to the
        head or not, or the encoder).  ``names`` is a list of parameter
        names and ``grads`` the list of their gradients; every parameter
        comes exactly once.  On the GPU the arrays' values are final on the
        current stream (work queued after it sees them).  Data-parallel
        training (:mod:`numba_mamba.distributed`) starts averaging them
        across ranks while the backward goes on.

    Returns
    -------
    dinputs : array or None
        None for token inputs; ``(Bt, L, d_input)`` for regression.
    grads : dict
        Parameter name -> gradient (same keys as ``params``).
    """
    config = cache.config
    g = {}

    def final(names):
        if on_grads is not None:
            on_grads(names, [g[k] for k in names])

    dhf, dW, db = linear_backward(dout, cache.head)
    if config.head == "lm":
        head_name = "embedding.weight" if config.tie_embeddings else "lm_head.weight"
        g[head_name] = dW
    else:
        g["decoder.weight"], g["decoder.bias"] = dW, db
    dh, g["norm_f.weight"] = rmsnorm_backward(dhf, cache.norm_f)
    final([k for k in g if k != "embedding.weight"])  # (a tied head: final with the stem)
    for i in reversed(range(config.n_layers)):
        dhn, gb = mamba_block_backward(dh, cache.blocks[i])
        for k, v in gb.items():
            g[f"layers.{i}.mixer.{k}"] = v
        # the residual: the norm's dx added to dh in place (dh is this function's own)
        dh, g[f"layers.{i}.norm.weight"] = rmsnorm_backward(dhn, cache.norms[i], dx_add=dh)
        final([f"layers.{i}.mixer.{k}" for k in gb] + [f"layers.{i}.norm.weight"])
    if config.head == "lm":
        dE = embedding_backward(dh, cache.stem)
        g["embedding.weight"] = g["embedding.weight"] + dE if config.tie_embeddings else dE
        dinputs = None
        final(["embedding.weight"])
    else:
        dinputs, g["encoder.weight"], g["encoder.bias"] = linear_backward(dh, cache.stem)
        final(["encoder.weight", "encoder.bias"])
    return dinputs, g


# ---------------------------------------------------------------- losses


class _LossCache(NamedTuple):
    kind: str
    a: object  # CE: softmax probabilities (M, V); MSE: pred - target
    b: object  # CE: target ids (M,) with ignored set to 0; MSE: weights or None
    valid: object  # (M,) 1.0 where counted
    count: object  # number of counted positions (elements for MSE): float, or 0-d array
    shape: tuple  # shape of the forward's prediction
    bad: object = None  # CE with sync=False: 0-d bool, True if a counted target is out of range


def cross_entropy_forward(logits, targets, mask=None, ignore_index=-100, sync=True):
    """Mean cross-entropy of ``logits (..., V)`` against integer ``targets (...)``.

    Positions where ``targets == ignore_index`` or ``mask`` is False are left
    out of the mean (and get zero gradient).

    Parameters
    ----------
    logits : array, shape (..., V)
    targets : integer array, shape (...)
    mask : array, shape (...), optional
        True (or non-zero) where counted.
    ignore_index : int, optional
    sync : bool, optional
        True (default): targets outside ``[0, V)`` (other than
        ``ignore_index``) raise ValueError, and the number of counted
        positions is read back as a float (both wait for the device on the
        GPU).  False: nothing waits (a step captured as a CUDA graph): the
        count stays a 0-d array, targets out of range are left out of the
        mean and flagged in the cache's ``bad`` (a 0-d bool array), which the
        caller checks later.

    Returns
    -------
    loss : 0-d array
    cache

    Examples
    --------
    >>> import numpy as np
    >>> from numba_mamba.models import cross_entropy_forward, cross_entropy_backward
    >>> logits = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]))
    >>> loss, cache = cross_entropy_forward(logits, np.array([0, -100]))
    >>> round(float(loss), 4)  # log(2)
    0.6931
    >>> cross_entropy_backward(1.0, cache)
    array([[-0.5 ,  0.25,  0.25],
           [ 0.  ,  0.  ,  0.  ]])
    >>> loss, cache = cross_entropy_forward(logits, np.array([0, 7]), sync=False)
    >>> round(float(loss), 4), bool(cache.bad)  # target 7 is out of range: left out, flagged
    (0.6931, True)
    """
    xp = array_namespace(logits=logits, targets=targets, mask=mask)
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets must have shape {tuple(logits.shape[:-1])} (logits without "
                         f"the class axis), got {tuple(targets.shape)}")
    V = logits.shape[-1]
    flat = logits.reshape(-1, V)
    t = targets.reshape(-1)
    valid = t != ignore_index
    if mask is not None:
        valid = valid & mask.reshape(-1).astype(bool)
    bad = None
    if not sync:
        out_of_range = valid & ((t < 0) | (t >= V))
        valid = valid & ~out_of_range
        bad = out_of_range.any()
    t = xp.where(valid, t, 0)
    if sync and t.size and (int(t.min()) < 0 or int(t.max()) >= V):
        raise ValueError(f"targets must lie in [0, {V}) or equal ignore_index={ignore_index}")
    m = flat.max(axis=-1, keepdims=True)
    e = xp.exp(flat - m)
    s = e.sum(axis=-1, keepdims=True)
    logp_t = (flat[xp.arange(t.size), t] - m[:, 0]) - xp.log(s[:, 0])
    w = valid.astype(logits.dtype)
    count = _count(w, sync, xp)
    loss = -(logp_t * w).sum() / count
    return loss, _LossCache("ce", e / s, t, w, count, tuple(logits.shape), bad)


def _count(w, sync, xp):
    """``max(sum(w), 1)``: a float, or (``sync=False``) an array of ``w``'s dtype.

    Both divide the same: the sum of 0/1 weights is exact in the dtype, and a
    float32 quotient computed in double and rounded equals float32's own.
    """
    return max(float(w.sum()), 1.0) if sync else xp.maximum(w.sum(), 1)


def cross_entropy_backward(dloss, cache):
    """``dlogits = dloss * (softmax - onehot(target)) * valid / count``."""
    xp = array_namespace(p=cache.a)
    d = cache.a.copy()
    d[xp.arange(cache.b.size), cache.b] -= 1
    d *= dloss / cache.count
    d = xp.where(cache.valid[:, None] > 0, d, 0)  # ignored rows exactly 0 (not -0.0)
    return d.reshape(cache.shape)


def mse_forward(pred, target, mask=None, sync=True):
    """Mean squared error ``mean((pred - target)**2)`` over the (masked) elements.

    ``mask`` (broadcastable to ``pred``, True = counted) leaves elements out.
    ``sync=False``: the count of masked elements stays a 0-d array instead
    of a float read from the device (see :func:`cross_entropy_forward`).

    Examples
    --------
    >>> import numpy as np
    >>> from numba_mamba.models import mse_forward, mse_backward
    >>> loss, cache = mse_forward(np.array([1.0, 2.0]), np.array([0.0, 0.0]))
    >>> float(loss), mse_backward(1.0, cache)
    (2.5, array([1., 2.]))
    """
    xp = array_namespace(pred=pred, target=target, mask=mask)
    if target.shape != pred.shape:
        raise ValueError(f"target must have shape {tuple(pred.shape)} like pred, "
                         f"got {tuple(target.shape)}")
    diff = pred - target
    if mask is None:
        w = None
        count = float(diff.size)
        loss = (diff * diff).sum() / max(count, 1.0)
    else:
        w = xp.broadcast_to(mask, pred.shape).astype(pred.dtype)
        count = _count(w, sync, xp)
        loss = (diff * diff * w).sum() / count
    return loss, _LossCache("mse", diff, w, None, count, tuple(pred.shape))


def mse_backward(dloss, cache):
    """``dpred = dloss * 2 (pred - target) * mask / count``."""
    d = cache.a * (2 * dloss / cache.count)
    return d if cache.b is None else d * cache.b


@_blas_limited_on_cpu(_params_arg(2))
def _loss_and_grads(inputs, targets, params, config, mask, sync):
    """``(loss, grads, loss cache)`` of the head's loss; ``sync=False`` waits for nothing."""
    out, cache = model_forward(inputs, params, config, sync=sync)
    targets = _as_array_like_params(targets, params, config.head == "lm")
    mask = _as_array_like_params(mask, params, False)
    if config.head == "lm":
        loss, lc = cross_entropy_forward(out, targets, mask=mask, sync=sync)
        dout = cross_entropy_backward(1.0, lc)
    else:
        loss, lc = mse_forward(out, targets, mask=mask, sync=sync)
        dout = mse_backward(1.0, lc)
    _, grads = model_backward(dout, cache)
    return loss, grads, lc


def loss_and_grads(inputs: Any, targets: Any, params: Mapping[str, Any], config: "MambaConfig",
                   mask: Any = None) -> tuple:
    """Loss of the model's head (cross-entropy or MSE) and its gradients.

    Returns
    -------
    loss : float
    grads : dict
        Same keys as ``params``.

    See Also
    --------
    device_loss_and_grads : the same without waiting for the device.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_mamba import models
    >>> cfg = models.MambaConfig(d_model=8, n_layers=1, d_input=2, d_output=1, d_state=4)
    >>> params = models.init_params(cfg)
    >>> x = np.zeros((1, 6, 2), np.float32); y = np.ones((1, 6, 1), np.float32)
    >>> loss, grads = models.loss_and_grads(x, y, params, cfg)
    >>> sorted(grads) == sorted(params)
    True
    """
    loss, grads, _ = _loss_and_grads(inputs, targets, params, config, mask, sync=True)
    return float(loss), grads


def device_loss_and_grads(inputs, targets, params, config, mask=None):
    """:func:`loss_and_grads` that never waits for the device (a step captured as a CUDA graph).

    The loss stays an array, and invalid values are flagged instead of
    raising: token ids outside ``[0, vocab_size)`` are replaced by 0 and
    targets out of range are left out of the loss, and ``bad`` says so.
    With valid inputs, ``loss`` and ``grads`` are those of
    :func:`loss_and_grads` to the bit.

    Returns
    -------
    loss : 0-d array
        On the inputs' device, of the parameters' dtype (a NumPy scalar on
        the CPU).
    grads : dict
        Same keys as ``params``.
    bad : 0-d int64 array
        0, or the sum of 1 (a counted target out of range) and 2 (a token id
        out of range); always 0 for a regression head.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_mamba import models
    >>> cfg = models.MambaConfig(d_model=8, n_layers=1, vocab_size=5, d_state=4)
    >>> params = models.init_params(cfg, dtype=np.float64)
    >>> x = np.array([[1, 2, 3]]); y = np.array([[2, 3, 4]])
    >>> loss, grads, bad = models.device_loss_and_grads(x, y, params, cfg)
    >>> bool(loss == models.loss_and_grads(x, y, params, cfg)[0]), int(bad)
    (True, 0)
    >>> int(models.device_loss_and_grads(x + 3, y + 1, params, cfg)[2])  # ids and targets too big
    3
    """
    xp = array_namespace(inputs=inputs, targets=targets, mask=mask)
    if config.head != "lm":
        loss, grads, _ = _loss_and_grads(inputs, targets, params, config, mask, sync=False)
        return loss, grads, xp.zeros((), xp.int64)
    check_params(params, config)
    inputs = _check_inputs(inputs, config, params)
    out_of_range = (inputs < 0) | (inputs >= config.vocab_size)
    ids = xp.where(out_of_range, 0, inputs)
    loss, grads, lc = _loss_and_grads(ids, targets, params, config, mask, sync=False)
    bad = lc.bad.astype(xp.int64) + 2 * out_of_range.any().astype(xp.int64)
    return loss, grads, bad
