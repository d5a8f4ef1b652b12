"""Layers of a Mamba model, each a forward and a hand-written backward pass.

Every layer is a pair of functions written side by side::

    out, cache = <layer>_forward(x, <parameters>..., <options>)
    dx, d<parameter>... = <layer>_backward(dout, cache)

The backward takes the gradient of a loss with respect to ``out`` and the
cache of the forward, and returns the gradients in the forward's argument
order (a bare array for one-argument layers).  The cache is a NamedTuple
whose fields say what the backward needs; where the backward recomputes
instead of storing, the docstring says so.

NumPy arrays run on the CPU (NumPy matmuls, Numba ``@njit`` kernels), CuPy
arrays on the GPU (CuPy matmuls, Numba CUDA kernels in ``cuda_kernels/``
launched on CuPy's current stream).  Layers compute in the dtype of their
input: float32 or float64.

=====================================  ==========================================
layer                                  shapes
=====================================  ==========================================
:func:`linear_forward`                 ``x (..., in)`` (``axis=-1``) or
                                       ``(..., in, L)`` (``axis=-2``);
                                       ``weight (out, in)``, ``bias (out,)``
:func:`embedding_forward`              ``ids (...)`` integers, ``weight (V, d)``
:func:`rmsnorm_forward`                ``x (..., d)``, ``weight (d,)``
:func:`conv1d_forward`                 ``x (Bt, C, L)``, ``weight (C, W)``,
                                       ``bias (C,)``: causal, depthwise
:func:`silu_forward`,                  any shape
:func:`softplus_forward`
:func:`selective_scan_forward`         as :func:`numba_mamba.selective_scan`
=====================================  ==========================================

References
----------
.. [1] A. Gu and T. Dao, "Mamba: Linear-Time Sequence Modeling with Selective
   State Spaces", arXiv:2312.00752, 2023.
.. [2] B. Zhang and R. Sennrich, "Root Mean Square Layer Normalization",
   NeurIPS 2019.
"""

import math
from typing import Callable, NamedTuple

import numpy as np

from ._cpu_threads import blas_limited
from ._backends import backend as _backend
from ._backends import gpu_module
from ._validation import array_namespace, check_shape
from .scan import ScanGrads, selective_scan_vjp

__all__ = [
    "Conv1dCache", "EmbeddingCache", "LinearCache", "RMSNormCache", "ScanCache",
    "conv1d_backward", "conv1d_forward",
    "embedding_backward", "embedding_forward",
    "linear_backward", "linear_forward",
    "rmsnorm_backward", "rmsnorm_forward",
    "selective_scan_backward", "selective_scan_forward",
    "silu_backward", "silu_forward",
    "softplus_backward", "softplus_forward",
]

LAYER_DTYPES = ("float32", "float64")
CONV_ACTIVATIONS = (None, "silu")


# ---------------------------------------------------------------- helpers


def _check_float(name, x):
    if x.dtype.name not in LAYER_DTYPES:
        raise TypeError(f"{name} must have dtype {' or '.join(LAYER_DTYPES)}, got {x.dtype}")


def _check_same_dtype(ref_name, ref, **others):
    for name, a in others.items():
        if a is not None and a.dtype != ref.dtype:
            raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), "
                            f"got {a.dtype}")


def gemm(xp, a, b, out=None):
    """``xp.matmul(a, b, out=out)``; on CuPy arrays through
    :func:`numba_mamba.cuda_kernels.blas.matmul` where cuBLAS was found (a
    GEMM a CUDA graph can capture, which CuPy's matmul is not); on NumPy
    arrays with BLAS on one thread (:mod:`numba_mamba._cpu_threads`: its
    pool and Numba's would compete for the cores)."""
    if xp is np:
        with blas_limited():
            return np.matmul(a, b, out=out)
    blas = gpu_module("blas")
    if blas.available():
        return blas.matmul(a, b, out=out)
    return xp.matmul(a, b, out=out)


def gemm_add(xp, a, b, acc):
    """``acc += a @ b`` in place, returning ``acc``: on CuPy arrays one GEMM
    that adds its product to ``acc`` (``beta = 1``) where cuBLAS was found and
    ``acc`` is C-contiguous, rather than a product and a separate sum."""
    if xp is not np and acc.flags.c_contiguous and acc.dtype == a.dtype == b.dtype:
        blas = gpu_module("blas")
        if blas.available():
            return blas.matmul(a, b, out=acc, beta=1.0)
    acc += gemm(xp, a, b)
    return acc


def _sum_to_last(a, keep):
    """Sum ``a`` over every axis except the last ``keep`` ones (on CuPy arrays
    as one memory-bound GEMM, :func:`numba_mamba.cuda_kernels.blas.sum_rows`:
    CuPy's reduction over leading axes is several times slower at the sizes of
    the weight gradients)."""
    axes = tuple(range(a.ndim - keep))
    if not axes:
        return a
    if not isinstance(a, np.ndarray) and a.flags.c_contiguous:
        rest = a.shape[-keep:]
        lead = a.size // math.prod(rest) if a.size else 0
        return gpu_module("blas").sum_rows(a.reshape(lead, -1)).reshape(rest)
    return a.sum(axis=axes)


# ---------------------------------------------------------------- Linear


class LinearCache(NamedTuple):
    """What :func:`linear_forward` keeps for :func:`linear_backward`."""

    x: object  # (..., in) with axis=-1, (..., in, L) with axis=-2: the input (maybe a view)
    weight: object  # (out, in)
    has_bias: bool
    axis: int  # -1: features last; -2: features before the time axis
    out_axis: int = None  # the feature axis of out (None: axis)


def linear_forward(x, weight, bias=None, axis=-1, out_axis=None):
    """Affine map ``x W^T + b`` over the feature axis of ``x``.

    Parameters
    ----------
    x : array, shape (..., in) or (..., in, L)
        Input; the features are along ``axis``.
    weight : array, shape (out, in)
        Weight, as ``torch.nn.Linear`` stores it.
    bias : array, shape (out,), optional
    axis : {-1, -2}, optional
        Feature axis of ``x``: -1 (activations ``(batch, L, d)``) or -2
        (channels first, ``(batch, d, L)``, the layout of the scan).
    out_axis : {-1, -2}, optional
        Feature axis of ``out`` (default ``axis``).  Where it differs from
        ``axis`` the map also moves the features, in the GEMM itself (no
        transposing copy): ``(..., L, in) -> (..., out, L)`` or
        ``(..., in, L) -> (..., L, out)``.

    Returns
    -------
    out : array, shape (..., out) or (..., out, L)
        C-contiguous.
    cache : LinearCache

    Raises
    ------
    ValueError
        Unknown ``axis`` or ``out_axis``; ``x`` without ``in`` features along
        ``axis``; bias of the wrong shape.
    TypeError
        NumPy and CuPy mixed; dtype other than float32/float64 or mixed dtypes.

    See Also
    --------
    linear_backward

    Examples
    --------
    >>> import numpy as np
    >>> from numba_mamba import layers
    >>> x = np.array([[1.0, 2.0]]); w = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    >>> out, cache = layers.linear_forward(x, w, np.array([0.0, 0.5, 1.0]))
    >>> out
    array([[1. , 3.5, 5. ]])
    >>> dx, dw, db = layers.linear_backward(np.ones_like(out), cache)
    >>> dx, db
    (array([[2., 3.]]), array([1., 1., 1.]))

    Channels first out of a features-last input, as Mamba's ``in_proj``
    feeds the scan:

    >>> u = np.arange(6.0).reshape(1, 3, 2)  # (batch, L, in)
    >>> out, _ = layers.linear_forward(u, w, out_axis=-2)  # (batch, out, L)
    >>> out.shape, bool(np.allclose(out, layers.linear_forward(u, w)[0].transpose(0, 2, 1)))
    ((1, 3, 3), True)
    """
    xp = array_namespace(x=x, weight=weight, bias=bias)
    _check_float("x", x)
    _check_same_dtype("x", x, weight=weight, bias=bias)
    if axis not in (-1, -2):
        raise ValueError(f"axis must be -1 or -2, got {axis!r}")
    if out_axis is None:
        out_axis = axis
    if out_axis not in (-1, -2):
        raise ValueError(f"out_axis must be -1 or -2, got {out_axis!r}")
    if weight.ndim != 2:
        raise ValueError(f"weight must have 2 dims (out, in), got shape {tuple(weight.shape)}")
    n_out, n_in = weight.shape
    if x.ndim < -axis or x.shape[axis] != n_in:
        raise ValueError(f"x must have {n_in} features along axis {axis} (weight is "
                         f"{tuple(weight.shape)} = (out, in)), got shape {tuple(x.shape)}")
    if bias is not None:
        check_shape("bias", bias, (n_out,), "(out features of weight)")
    if axis == -1:
        # (..., out) or (..., out, L)
        out = gemm(xp, x, weight.T) if out_axis == -1 else gemm(xp, weight, xp.swapaxes(x, -1, -2))
    else:
        # (..., out, L) or (..., L, out)
        out = gemm(xp, weight, x) if out_axis == -2 else gemm(xp, xp.swapaxes(x, -1, -2), weight.T)
    if bias is not None:
        out += bias if out_axis == -1 else bias[:, None]
    return out, LinearCache(x, weight, bias is not None, axis, out_axis)


def linear_backward(dout, cache, dx_add=None):
    """Gradients of :func:`linear_forward`.

    Parameters
    ----------
    dout : array, shape of the forward's ``out``
    cache : LinearCache
    dx_add : array, shape of ``x``, optional
        A gradient that ``dx`` is added to in place (and returned as
        ``dx``): where ``x`` feeds several operations, their gradients are
        summed without a separate sum.

    Returns
    -------
    dx : array, shape of ``x``
    dweight : array, shape (out, in)
    dbias : array, shape (out,), or None without bias
    """
    x, weight, has_bias, axis, out_axis = cache
    xp = array_namespace(x=x, dout=dout)
    if dx_add is not None:
        check_shape("dx_add", dx_add, x.shape, "like x")

    def input_grad(a, b):
        return gemm(xp, a, b) if dx_add is None else gemm_add(xp, a, b, dx_add)
    if out_axis is not None and out_axis != axis:  # features moved by the GEMM
        doutT = xp.swapaxes(dout, -1, -2)  # dout with its features along axis
        if axis == -1:  # x (..., L, in), dout (..., out, L)
            dx = input_grad(doutT, weight)  # (..., L, in)
            dweight = _sum_to_last(gemm(xp, dout, x), 2)
        else:  # x (..., in, L), dout (..., L, out)
            dx = input_grad(weight.T, doutT)  # (..., in, L)
            dweight = _sum_to_last(gemm(xp, doutT, xp.swapaxes(x, -1, -2)), 2)
        dbias = None
        if has_bias:
            dbias = _sum_to_last(dout, 1) if out_axis == -1 else \
                dout.sum(axis=tuple(i for i in range(dout.ndim) if i != dout.ndim - 2))
        return dx, dweight, dbias
    if axis == -1:
        dx = input_grad(dout, weight)  # (..., in)
        if dout.flags.c_contiguous and x.flags.c_contiguous:  # one GEMM over all rows
            dweight = gemm(xp, dout.reshape(-1, dout.shape[-1]).T, x.reshape(-1, x.shape[-1]))
        else:  # batched GEMM over the leading axes, then their sum
            dweight = _sum_to_last(gemm(xp, xp.swapaxes(dout, -1, -2), x), 2)
        dbias = _sum_to_last(dout, 1) if has_bias else None
    else:
        dx = input_grad(weight.T, dout)  # (..., in, L)
        dweight = _sum_to_last(gemm(xp, dout, xp.swapaxes(x, -1, -2)), 2)
        dbias = dout.sum(axis=tuple(i for i in range(dout.ndim) if i != dout.ndim - 2)) \
            if has_bias else None
    return dx, dweight, dbias


# ---------------------------------------------------------------- Embedding


class EmbeddingCache(NamedTuple):
    """What :func:`embedding_forward` keeps for :func:`embedding_backward`."""

    ids: object  # (...) integer token ids
    weight_shape: tuple  # (V, d)
    dtype: object


def embedding_forward(ids, weight, sync=True):
    """Rows of ``weight`` selected by integer ``ids``.

    Parameters
    ----------
    ids : integer array, shape (...)
        Token ids in ``[0, V)``.
    weight : array, shape (V, d)
    sync : bool, optional
        True (default): ids outside ``[0, V)`` raise ValueError (on the GPU
        the check waits for the device).  False: no check, nothing waits (a
        step captured as a CUDA graph); the caller has validated ``ids``.

    Returns
    -------
    out : array, shape (..., d)
    cache : EmbeddingCache

    Raises
    ------
    TypeError
        ``ids`` not integer; NumPy and CuPy mixed.
    ValueError
        An id outside ``[0, V)``.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_mamba import layers
    >>> w = np.arange(6.0).reshape(3, 2)
    >>> out, cache = layers.embedding_forward(np.array([[2, 0, 2]]), w)
    >>> out[0]
    array([[4., 5.],
           [0., 1.],
           [4., 5.]])
    >>> layers.embedding_backward(np.ones_like(out), cache)
    array([[1., 1.],
           [0., 0.],
           [2., 2.]])
    """
    array_namespace(ids=ids, weight=weight)  # not mixed
    if ids.dtype.kind not in "iu":
        raise TypeError(f"ids must have an integer dtype, got {ids.dtype}")
    _check_float("weight", weight)
    if weight.ndim != 2:
        raise ValueError(f"weight must have 2 dims (V, d), got shape {tuple(weight.shape)}")
    V = weight.shape[0]
    if sync and ids.size and (int(ids.min()) < 0 or int(ids.max()) >= V):
        raise ValueError(f"ids must lie in [0, {V}) (rows of weight), got values in "
                         f"[{int(ids.min())}, {int(ids.max())}]")
    return weight[ids], EmbeddingCache(ids, tuple(weight.shape), weight.dtype)


def embedding_backward(dout, cache):
    """Gradient of :func:`embedding_forward` with respect to ``weight``.

    ``ids`` are integers and have no gradient, so only ``dweight`` (shape
    ``(V, d)``, rows summed over every occurrence of their id) is returned.
    """
    ids, shape, dtype = cache
    xp = array_namespace(ids=ids, dout=dout)
    flat_ids = ids.reshape(-1)
    rows = dout.reshape(-1, shape[1])
    if xp is np:  # the sums of np.add.at, in its order
        return _backend(xp, "embedding").embedding_backward(flat_ids, rows, shape, dtype)
    kernels = gpu_module("embedding")
    if kernels.settings.deterministic:  # the same bits on every run
        return kernels.embedding_backward(ids, dout, shape).astype(dtype, copy=False)
    import cupyx
    dweight = xp.zeros(shape, dtype=dtype)
    cupyx.scatter_add(dweight, flat_ids, rows)
    return dweight


# ---------------------------------------------------------------- RMSNorm


class RMSNormCache(NamedTuple):
    """What :func:`rmsnorm_forward` keeps for :func:`rmsnorm_backward`."""

    x: object  # (..., d) input
    weight: object  # (d,)
    rstd: object  # (..., 1) 1 / sqrt(mean(x**2) + eps)


def rmsnorm_forward(x, weight, eps=1e-5):
    """Root-mean-square normalization over the last axis, then a gain.

    ``out = x / sqrt(mean(x**2, axis=-1) + eps) * weight``.

    Parameters
    ----------
    x : array, shape (..., d)
    weight : array, shape (d,)
    eps : float, optional

    Returns
    -------
    out : array, shape (..., d)
    cache : RMSNormCache

    Examples
    --------
    >>> import numpy as np
    >>> from numba_mamba import layers
    >>> out, cache = layers.rmsnorm_forward(np.array([[3.0, -4.0]]), np.ones(2), eps=0.0)
    >>> np.round(out, 4)
    array([[ 0.8485, -1.1314]])
    """
    xp = array_namespace(x=x, weight=weight)
    _check_float("x", x)
    _check_same_dtype("x", x, weight=weight)
    check_shape("weight", weight, (x.shape[-1],), "(last axis of x)")
    if xp is np:  # one Numba pass per row
        x = np.ascontiguousarray(x)
        weight = np.ascontiguousarray(weight)
        out, rstd = _backend(xp, "elementwise").rmsnorm_forward(
            x.reshape(-1, x.shape[-1]), weight, eps)
        return out.reshape(x.shape), RMSNormCache(x, weight, rstd.reshape(x.shape[:-1] + (1,)))
    rstd = 1 / xp.sqrt(xp.mean(x * x, axis=-1, keepdims=True) + eps)  # (..., 1)
    return x * rstd * weight, RMSNormCache(x, weight, rstd)


def rmsnorm_backward(dout, cache, dx_add=None):
    """Gradients ``(dx, dweight)`` of :func:`rmsnorm_forward`.

    With ``xhat = x * rstd`` and ``g = dout * weight``:
    ``dx = rstd * (g - xhat * mean(g * xhat, axis=-1))`` and
    ``dweight = sum(dout * xhat)`` over the leading axes.

    ``dx_add``, optional: an array of ``x``'s shape and dtype that ``dx`` is
    added to in place (and returned as ``dx``): a residual stream's
    gradient, summed without another array.
    """
    x, weight, rstd = cache
    xp = array_namespace(x=x, dout=dout)
    check_shape("dout", dout, x.shape, "like x")
    if dx_add is not None:
        check_shape("dx_add", dx_add, x.shape, "like x")
        _check_same_dtype("x", x, dx_add=dx_add)
    if xp is np:  # one Numba pass per row
        d = x.shape[-1]
        add = dx_add is not None and dx_add.flags.c_contiguous
        dx, dweight = _backend(xp, "elementwise").rmsnorm_backward(
            np.ascontiguousarray(dout, dtype=x.dtype).reshape(-1, d), x.reshape(-1, d), weight,
            rstd.reshape(-1), dx_add.reshape(-1, d) if add else None)
        if dx_add is None:
            return dx.reshape(x.shape), dweight
        if not add:
            dx_add += dx.reshape(x.shape)
        return dx_add, dweight
    xhat = x * rstd
    g = dout * weight
    dx = rstd * (g - xhat * xp.mean(g * xhat, axis=-1, keepdims=True))
    if dx_add is not None:
        dx_add += dx
        dx = dx_add
    return dx, _sum_to_last(dout * xhat, 1)


# ---------------------------------------------------------------- causal depthwise Conv1d


class Conv1dCache(NamedTuple):
    """What :func:`conv1d_forward` keeps for :func:`conv1d_backward`.

    The pre-activation is not stored: the backward recomputes it from ``x``.
    """

    x: object  # (Bt, C, L) input, C-contiguous
    weight: object  # (C, W)
    bias: object  # (C,) or None
    activation: object  # None or "silu"


def conv1d_forward(x, weight, bias=None, activation=None):
    """Causal depthwise 1-D convolution along the last axis, optionally with SiLU.

    Parameters
    ----------
    x : array, shape (Bt, C, L)
        Batch, channels, length (time last).
    weight : array, shape (C, W)
        ``W`` taps per channel; ``weight[:, -1]`` multiplies the current sample
        (``torch.nn.Conv1d(C, C, W, groups=C, padding=W-1)`` stores the same
        numbers as ``(C, 1, W)``).
    bias : array, shape (C,), optional
    activation : {None, "silu"}, optional
        Applied to the output in the same kernel.

    Returns
    -------
    out : array, shape (Bt, C, L)
    cache : Conv1dCache

    Raises
    ------
    ValueError
        Wrong dims or shapes (naming the argument), unknown activation.

    Notes
    -----
    ``pre[b, c, t] = bias[c] + sum_k weight[c, k] x[b, c, t - (W-1) + k]``
    with ``x`` zero before ``t = 0``; ``out = pre`` or ``silu(pre)``.  For one
    channel this is ``scipy.signal.lfilter(weight[c, ::-1], [1], x[b, c])``
    plus the bias.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_mamba import layers
    >>> x = np.array([[[1.0, 0.0, 0.0, 2.0]]])
    >>> out, cache = layers.conv1d_forward(x, np.array([[0.25, 0.5, 1.0]]))
    >>> out
    array([[[1.  , 0.5 , 0.25, 2.  ]]])
    >>> dx, dw, db = layers.conv1d_backward(np.ones_like(out), cache)
    >>> dx, dw, db
    (array([[[1.75, 1.75, 1.5 , 1.  ]]]), array([[1., 1., 3.]]), None)
    """
    xp = array_namespace(x=x, weight=weight, bias=bias)
    _check_float("x", x)
    _check_same_dtype("x", x, weight=weight, bias=bias)
    if x.ndim != 3:
        raise ValueError(f"x must have 3 dims (batch, channels, length), got shape "
                         f"{tuple(x.shape)}")
    C = x.shape[1]
    if weight.ndim != 2 or weight.shape[0] != C or weight.shape[1] < 1:
        raise ValueError(f"weight must have shape ({C}, W) (channels of x, taps), "
                         f"got {tuple(weight.shape)}")
    if bias is not None:
        check_shape("bias", bias, (C,), "(channels of x)")
    if activation not in CONV_ACTIVATIONS:
        raise ValueError(f"activation must be one of {CONV_ACTIVATIONS}, got {activation!r}")
    x = xp.ascontiguousarray(x)
    weight = xp.ascontiguousarray(weight)
    bias = None if bias is None else xp.ascontiguousarray(bias)
    out = _backend(xp, "conv1d").conv1d_forward(x, weight, bias, activation == "silu")
    return out, Conv1dCache(x, weight, bias, activation)


def conv1d_backward(dout, cache, dx_out=None, dx_channel=0):
    """Gradients ``(dx, dweight, dbias)`` of :func:`conv1d_forward`.

    ``dbias`` is None when the forward had no bias.  The pre-activation is
    recomputed from ``x``.

    ``dx_out``, optional: a C-contiguous array of shape ``(Bt, C', L)`` and
    ``x``'s dtype whose channels ``dx_channel .. dx_channel + C`` receive
    ``dx`` (returned as that view): a gradient written straight into a buffer
    it shares with others, as the Mamba block's joint gradient of in_proj's
    output.
    """
    x, weight, bias, activation = cache
    xp = array_namespace(x=x, dout=dout)
    check_shape("dout", dout, x.shape, "like out")
    if dx_out is not None:
        Bt, C, L = x.shape
        array_namespace(x=x, dx_out=dx_out)
        if (dx_out.ndim != 3 or dx_out.shape[0] != Bt or dx_out.shape[2] != L
                or not 0 <= dx_channel <= dx_out.shape[1] - C):
            raise ValueError(f"dx_out must have shape ({Bt}, C', {L}) with channels "
                             f"{dx_channel} .. {dx_channel + C} inside, got "
                             f"{tuple(dx_out.shape)} and dx_channel={dx_channel}")
        if dx_out.dtype != x.dtype or not dx_out.flags.c_contiguous:
            raise ValueError(f"dx_out must be C-contiguous of dtype {x.dtype}, got "
                             f"{dx_out.dtype}, C-contiguous {dx_out.flags.c_contiguous}")
    dout = xp.ascontiguousarray(dout, dtype=x.dtype)
    return _backend(xp, "conv1d").conv1d_backward(dout, x, weight, bias, activation == "silu",
                                                  dx_out, int(dx_channel))


# ---------------------------------------------------------------- SiLU and softplus


def _elementwise_forward(name, x):
    xp = array_namespace(x=x)
    _check_float("x", x)
    x = xp.ascontiguousarray(x)
    return getattr(_backend(xp, "elementwise"), f"{name}_forward")(x), (x,)


def _elementwise_backward(name, dout, cache):
    (x,) = cache
    xp = array_namespace(x=x, dout=dout)
    check_shape("dout", dout, x.shape, "like out")
    dout = xp.ascontiguousarray(dout, dtype=x.dtype)
    return getattr(_backend(xp, "elementwise"), f"{name}_backward")(dout, x)


def silu_forward(x):
    """SiLU ``x * sigmoid(x)`` in one fused kernel.

    Returns ``(out, cache)``; the cache is ``(x,)``.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_mamba import layers
    >>> out, cache = layers.silu_forward(np.array([-1.0, 0.0, 2.0]))
    >>> np.round(out, 4)
    array([-0.2689,  0.    ,  1.7616])
    >>> np.round(layers.silu_backward(np.ones(3), cache), 4)
    array([0.0723, 0.5   , 1.0908])
    """
    return _elementwise_forward("silu", x)


def silu_backward(dout, cache):
    """``dx = dout * sigmoid(x) * (1 + x * (1 - sigmoid(x)))``."""
    return _elementwise_backward("silu", dout, cache)


def softplus_forward(x):
    """Softplus ``log(1 + exp(x))`` (``x`` itself above 20) in one fused kernel.

    Returns ``(out, cache)``; the cache is ``(x,)``.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_mamba import layers
    >>> out, cache = layers.softplus_forward(np.array([-1.0, 0.0, 30.0]))
    >>> np.round(out, 4)
    array([ 0.3133,  0.6931, 30.    ])
    >>> np.round(layers.softplus_backward(np.ones(3), cache), 4)
    array([0.2689, 0.5   , 1.    ])
    """
    return _elementwise_forward("softplus", x)


def softplus_backward(dout, cache):
    """``dx = dout * sigmoid(x)``."""
    return _elementwise_backward("softplus", dout, cache)


# ---------------------------------------------------------------- selective scan


class ScanCache(NamedTuple):
    """What :func:`selective_scan_forward` keeps: the scan's backward closure.

    The closure holds the inputs and the chunk-boundary states; the states
    inside a chunk are recomputed by the backward.
    """

    backward: Callable  # backward(dout, dlast_state) -> ScanGrads


def selective_scan_forward(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                           delta_softplus=False, initial_state=None):
    """The selective scan as a layer: ``(out, last_state, cache)``.

    Arguments as :func:`numba_mamba.selective_scan`.  Unlike the other layers
    it returns two outputs, ``out (Bt, D, L)`` and ``last_state (Bt, D, N)``,
    then the cache.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_mamba import layers
    >>> rng = np.random.default_rng(0)
    >>> u = rng.standard_normal((1, 2, 5)); delta = np.full((1, 2, 5), 0.3)
    >>> A = -np.ones((2, 3)); B = rng.standard_normal((1, 3, 5)); C = np.ones((1, 3, 5))
    >>> out, last, cache = layers.selective_scan_forward(u, delta, A, B, C)
    >>> grads = layers.selective_scan_backward(np.ones_like(out), cache)
    >>> grads.du.shape, grads.dA.shape, grads.dD
    ((1, 2, 5), (2, 3), None)
    """
    out, last_state, backward = selective_scan_vjp(
        u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
        initial_state=initial_state)
    return out, last_state, ScanCache(backward)


def selective_scan_backward(dout, cache, dlast_state=None):
    """Gradients of :func:`selective_scan_forward` as :class:`~numba_mamba.ScanGrads`.

    ``(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state)`` in the
    forward's argument order; None where the input was None.  ``dlast_state``
    is the gradient reaching ``last_state`` (None: zero).
    """
    grads = cache.backward(dout, dlast_state)
    assert isinstance(grads, ScanGrads)
    return grads
