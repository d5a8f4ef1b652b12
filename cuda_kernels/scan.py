"""The selective scan on the GPU: which engine runs a call, and its outputs.

Two engines compute the same scan (the math, the canonical layout and the
flags are in :mod:`.scan_blocks`' docstring):

* the **state engine** (:mod:`.scan_states`): one thread per state of a
  channel, the sequence split into segments where the recurrences alone do
  not fill the GPU; it takes ``N`` up to ``scan_states.MAX_STATES``;
* the **blocks engine** (:mod:`.scan_blocks`): one thread block per (batch,
  channel), a block-wide parallel scan over chunks of the sequence; any ``N``.

:func:`choose_engine` picks one by size and ``settings.engine``;
:func:`scan_forward` / :func:`scan_backward` allocate the outputs and launch
it; :func:`forward_plan` / :func:`backward_plan` give the state engine's
per-layout plans.
"""

from typing import NamedTuple

from . import scan_states
from .scan_blocks import backward_into, forward_into
from .settings import settings

__all__ = ["GpuScanSaved", "backward_plan", "choose_engine", "forward_plan", "scan_backward",
           "scan_forward", "settings"]


class GpuScanSaved(NamedTuple):
    """What :func:`scan_forward` keeps for :func:`scan_backward`."""

    chunk_states: object  # (Bt, Dc, n_chunks, N) state entering each chunk
    threads: int          # tuning of the forward (chunk = threads * items)
    items: int


def _tuning(dtype, threads, items, cfg):
    dt, di = cfg.blocks_tuning[dtype]
    return (dt if threads is None else int(threads),
            di if items is None else int(items))


def choose_engine(Bt, Dc, N, cfg=settings):
    """The engine of a scan of ``Bt * Dc`` channels of ``N`` states:
    ``cfg.engine`` where that is not ``'auto'``; else ``'states'``
    (:mod:`numba_mamba.cuda_kernels.scan_states`) where ``Bt * Dc * N``
    recurrences fill the GPU by themselves (:func:`scan_states.usable`), else
    ``'blocks'`` (this module's parallel scan along the sequence).

    Examples
    --------
    >>> from numba_mamba.cuda_kernels import scan
    >>> scan.choose_engine(8, 1536, 16), scan.choose_engine(1, 4, 256)
    ('states', 'blocks')
    >>> with scan.settings.override(engine="blocks"):
    ...     scan.choose_engine(8, 1536, 16)
    'blocks'
    """
    engine = cfg.engine
    if engine != "auto":
        return engine
    return "states" if scan_states.usable(Bt, Dc, N, cfg) else "blocks"


def scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                 initial_state, *, save=True, threads=None, items=None, engine=None,
                 out=None):
    """Selective scan forward on CuPy arrays (canonical layout).

    Parameters
    ----------
    u, delta : cupy.ndarray, (Bt, Dc, L)
    A : cupy.ndarray, (Dc, N)
    B, C : cupy.ndarray, (Dc, N) or (Bt, G, N, L)
    D, delta_bias : cupy.ndarray, (Dc,), or None
    z : cupy.ndarray, (Bt, Dc, L), or None
    delta_softplus : bool
    initial_state : cupy.ndarray, (Bt, Dc, N), or None
    save : bool, optional
        Keep what :func:`scan_backward` needs (default).  False: the
        ``'states'`` engine keeps and writes no saved states (as large as
        ``u`` at ``N = 16``) and ``saved`` is None; the ``'blocks'`` engine
        keeps its chunk states either way (one per chunk of
        ``threads * items`` steps).
    threads, items : int, optional
        Block size (multiple of 32) and steps per thread of the ``'blocks'``
        engine; defaults in ``settings.blocks_tuning``.  The result does not
        depend on them beyond rounding.  Giving either selects that engine.
    engine : {'blocks', 'states'}, optional
        Default :func:`choose_engine` (which reads ``settings.engine``).  The ``'states'`` engine also takes
        float16 or bfloat16 ``u``, ``delta``, ``z`` and variable ``B``/``C``
        with the rest float32 (half storage, see
        :func:`cuda_kernels.scan_states.scan_forward`); the ``'blocks'``
        engine float32 or float64 only.
    out : cupy.ndarray, (Bt, Dc, L), optional
        Written with the result and returned, in place of a new array: of
        ``u``'s dtype, C-contiguous, sharing no memory with the inputs
        (unchecked here).

    Returns
    -------
    out : cupy.ndarray, (Bt, Dc, L)
    last_state : cupy.ndarray, (Bt, Dc, N)
    saved : GpuScanSaved or scan_states.StatesSaved
        Saved states and the tuning, for :func:`scan_backward`.
    """
    import cupy

    cfg = settings
    Bt, Dc, L = u.shape
    N = A.shape[1]
    if engine is None:
        engine = "blocks" if threads or items else choose_engine(Bt, Dc, N, cfg)
    if engine == "states":
        return scan_states.scan_forward(u, delta, A, B, C, D, z, delta_bias,
                                        delta_softplus, initial_state, save=save, out=out)
    if engine != "blocks":
        raise ValueError(f"engine must be 'blocks' or 'states', got {engine!r}")
    if u.dtype not in cfg.blocks_tuning:
        raise TypeError(f"the 'blocks' engine computes in float32 or float64, got {u.dtype} "
                        f"(half-precision storage is the 'states' engine's)")
    threads, items = _tuning(u.dtype, threads, items, cfg)
    chunk = threads * items
    n_chunks = (L + chunk - 1) // chunk
    if out is None:
        out = cupy.empty(u.shape, u.dtype)
    last_state = cupy.empty((Bt, Dc, N), u.dtype)
    chunk_states = cupy.empty((Bt, Dc, n_chunks, N), u.dtype)
    forward_into(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                 initial_state, out, last_state, chunk_states,
                 threads=threads, items=items, stream="current")
    return out, last_state, GpuScanSaved(chunk_states, threads, items)


def forward_plan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, *,
                 save=True):
    """The state engine's plan of :func:`scan_forward` for these canonical
    arguments (:func:`cuda_kernels.scan_states.forward_plan`), where
    :func:`choose_engine` picks that engine; else None."""
    Bt, Dc, _ = u.shape
    if choose_engine(Bt, Dc, A.shape[1]) != "states":
        return None
    return scan_states.forward_plan((u, delta, A, B, C, D, z, delta_bias, initial_state),
                                    delta_softplus, save)


def backward_plan(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                  initial_state, saved):
    """The state engine's plan of :func:`scan_backward` for these canonical
    arguments and the forward's ``saved``
    (:func:`cuda_kernels.scan_states.backward_plan`: ``plan(arrays,
    tile_states)``), where that engine ran the forward and
    ``settings.deterministic`` is off; else None."""
    if not isinstance(saved, scan_states.StatesSaved):
        return None
    return scan_states.backward_plan(
        (dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state),
        delta_softplus, saved.plan)


def scan_backward(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias,
                  delta_softplus, initial_state, saved, *, threads=None,
                  items=None):
    """Selective scan backward (VJP of ``(out, last_state)``) on CuPy arrays.

    Parameters
    ----------
    dout : cupy.ndarray, (Bt, Dc, L)
    dlast_state : cupy.ndarray, (Bt, Dc, N), or None (zeros)
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state
        As given to :func:`scan_forward`.
    saved : GpuScanSaved or scan_states.StatesSaved
        From :func:`scan_forward`; selects the engine.
    threads, items : int, optional
        Default: those of the forward.  ``threads * items`` must equal the
        forward's chunk, since ``saved`` holds one state per chunk.

    Returns
    -------
    du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state
        Gradients in the canonical shapes of their inputs; ``dD``, ``dz``,
        ``ddelta_bias`` and ``dinitial_state`` are None where their input is.
        ``ddelta`` is w.r.t. the raw ``delta`` (before bias and softplus).

    Raises
    ------
    ValueError
        If ``threads * items`` differs from the forward's chunk.
    """
    import cupy

    if isinstance(saved, scan_states.StatesSaved):
        return scan_states.scan_backward(dout, dlast_state, u, delta, A, B, C, D, z,
                                         delta_bias, delta_softplus, initial_state, saved)
    if settings.deterministic:
        raise ValueError(
            "settings.deterministic: the 'blocks' engine adds its sums over steps atomically "
            "and has no ordered mode; the state engine has one (N <= "
            f"{scan_states.MAX_STATES}, settings.engine 'auto' or 'states'), got N = "
            f"{A.shape[1]} on the 'blocks' engine")
    chunk = saved.threads * saved.items
    if threads is None and items is None:
        threads, items = saved.threads, saved.items
    else:
        threads = saved.threads if threads is None else int(threads)
        items = chunk // threads if items is None else int(items)
        if threads * items != chunk:
            raise ValueError(
                f"threads * items must equal the forward's chunk {chunk} "
                f"({saved.threads} * {saved.items}), got {threads} * {items}")
    Bt, Dc, L = u.shape
    N = A.shape[1]
    dtype = u.dtype
    du, ddelta, dA, dB, dC, dD, dz, ddelta_bias = scan_states.gradient_buffers(
        cupy, u, A, B, C, D, z, delta_bias)
    q_buf = cupy.empty((2, Bt, Dc, N), dtype)
    backward_into(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias,
                  delta_softplus, saved.chunk_states, du, ddelta, dA, dB, dC,
                  dD, dz, ddelta_bias, q_buf, threads=threads, items=items,
                  stream="current")
    dinitial_state = None if initial_state is None else q_buf[0]
    return du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state
