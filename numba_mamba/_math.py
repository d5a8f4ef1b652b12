"""The package's elementwise math, one home per dialect.

Scalar bodies (:func:`sigmoid`, :func:`softplus`, :func:`silu` and the
backward factors) are plain Python functions of scalars that Numba compiles
for both targets: :data:`cpu` holds them as ``@njit`` functions inlined into
the CPU kernels (``compiled(numba.njit(inline="always"))``), and
``cuda_kernels._common.device_math()`` as force-inlined CUDA device functions
(``compiled(inline_device)``), so a CPU kernel and its GPU twin run the same
per-element source.  They are dtype-generic:
every constant is made in the argument's type by :func:`like`, so float32
code stays float32 (no float64 instruction in a float32 kernel's PTX) and
float64 stays float64.  (The CPU scan's vectorizable versions, in plain
arithmetic so that LLVM can make SIMD loops of them, are
``numba_mamba._cpu_vmath``; the float64 oracle, ``numba_mamba.reference``,
keeps its own on purpose.)

Array functions (:func:`phi1`, :func:`phi2`, :func:`softplus_array`) take
NumPy or CuPy arrays and the array module ``xp``.

Numba's disk cache of a kernel does not see the source of the functions it
calls from another module: after editing a body here, delete the CPU
kernels' cache files (``numba_mamba/__pycache__/_cpu_*.nb[ci]``).  The GPU
kernels' cache names carry a digest of the sources they compile
(``cuda_kernels/_launch.py``, ``_source_digest``, which must read this file).

Math
----
::

    sigmoid(x)  = 1 / (1 + exp(-x))
    softplus(x) = log1p(exp(x)), x itself for x > 20 (the reference implementation's cut-off)
    silu(x)     = x * sigmoid(x), computed as x / (1 + exp(-x))
    silu_backward(g, x)     = g * s * (1 + x * (1 - s)),  s = sigmoid(x)
    softplus_backward(g, x) = g * sigmoid(x), computed as g / (1 + exp(-x))
    phi1(z) = (exp(z) - 1) / z,                 phi1(0) = 1
    phi2(z) = (z exp(z) - (exp(z) - 1)) / z**2, phi2(0) = 1/2

Examples
--------
>>> import numpy as np
>>> from numba import njit
>>> from numba_mamba import _math
>>> m = _math.compiled(njit)  # (the CPU kernels use _math.cpu, inlined)
>>> round(m.silu(np.float32(2.0)), 4)
1.7616
>>> from numba import float32
>>> [str(s) for s in m.silu.nopython_signatures if s.args == (float32,)]  # float32 out
['(float32,) -> float32']
>>> round(float(m.softplus(np.float64(-1.0))), 4), float(m.softplus(30.0))
(0.3133, 30.0)
>>> _math.phi1(np.array([0.0, 1.0]), np)
array([1.        , 1.71828183])
"""

import functools
import math
from types import SimpleNamespace

from numba import njit, types
from numba.extending import overload
from numba.np.numpy_support import as_dtype

__all__ = ["BODIES", "compiled", "cpu", "like", "phi1", "phi2", "sigmoid", "silu", "silu_backward",
           "softplus", "softplus_array", "softplus_backward"]

#: the scalar bodies that :func:`compiled` compiles
BODIES = ("sigmoid", "softplus", "silu", "silu_backward", "softplus_backward")


def like(x, value):
    """``value`` (an integer literal) as a scalar of ``x``'s float type.

    In compiled code a constant of that type (``value`` is converted at
    compile time); in Python (the CUDA simulator) ``type(x)(value)``.
    """
    return type(x)(value)


@overload(like, target="generic")
def _like_typed(x, value):
    if isinstance(x, types.Float):
        scalar = as_dtype(x).type

        def impl(x, value):
            return scalar(value)

        return impl
    return None


def sigmoid(x):
    """``1 / (1 + exp(-x))``."""
    one = like(x, 1)
    return one / (one + math.exp(-x))


def softplus(x):
    """``log1p(exp(x))``; ``x`` itself above 20."""
    if x > like(x, 20):
        return x
    return math.log1p(math.exp(x))


def silu(x):
    """``x * sigmoid(x)``, as ``x / (1 + exp(-x))``."""
    return x / (like(x, 1) + math.exp(-x))


def silu_backward(g, x):
    """``g * silu'(x) = g * s * (1 + x * (1 - s))`` with ``s = sigmoid(x)``."""
    one = like(x, 1)
    s = one / (one + math.exp(-x))
    return g * s * (one + x * (one - s))


def softplus_backward(g, x):
    """``g * softplus'(x) = g * sigmoid(x)``, as ``g / (1 + exp(-x))``."""
    return g / (like(x, 1) + math.exp(-x))


@functools.lru_cache(maxsize=None)
def compiled(jit):
    """The scalar bodies compiled by the decorator ``jit`` (a namespace with
    the names of :data:`BODIES`; cached per decorator).

    ``jit`` is ``numba.njit`` (or ``numba.njit(inline="always")``) for the
    CPU, a CUDA device-function decorator for the GPU; under the CUDA
    simulator that decorator returns the Python function itself.
    """
    return SimpleNamespace(**{name: jit(globals()[name]) for name in BODIES})


#: the bodies for the CPU kernels: ``@njit`` functions inlined into their callers
#: in Numba's IR (a call left to LLVM would keep the caller's reference counts)
cpu = compiled(njit(inline="always"))


# ------------------------------------------------------------------ arrays
# (m - 1) / m! for m = 2..10: the series of phi2 near 0
_PHI2_SERIES = (1 / 2, 1 / 3, 1 / 8, 1 / 30, 1 / 144, 1 / 840, 1 / 5760, 1 / 45360,
                1 / 403200)


def phi1(z, xp):
    """``(exp(z) - 1) / z``, 1 at 0, of a real or complex array ``z``."""
    nz = z != 0
    safe = xp.where(nz, z, 1)
    return xp.where(nz, xp.expm1(safe) / safe, 1)


def phi2(z, xp):
    """``(z exp(z) - (exp(z) - 1)) / z**2``, by its series for ``|z| < 0.1``."""
    small = abs(z) < 0.1
    safe = xp.where(small, 1, z)
    closed = (safe * xp.exp(safe) - xp.expm1(safe)) / (safe * safe)
    series = xp.zeros_like(z)
    for coef in reversed(_PHI2_SERIES):
        series = series * z + coef
    return xp.where(small, series, closed)


def softplus_array(v, xp):
    """:func:`softplus` of an array: ``log1p(exp(v))``, ``v`` itself above 20."""
    return xp.where(v > 20, v, xp.log1p(xp.exp(xp.minimum(v, 20))))
