"""The tunables of the GPU kernels, in one object.

Every number or switch that a launcher reads beyond its arguments -- which
launch path it takes, which scan engine it picks, how the state engine splits
a sequence and how many states it keeps -- is a field of :data:`settings`,
the one :class:`Settings` instance of the package.  A launcher reads it once
at its top and passes the values down; nothing else holds a copy, so a change
is seen by the next call.

Change a field for a block of code with :meth:`Settings.override` (restored
on leaving the block, also after an exception), or for the rest of the
process by assigning it (``settings.save_every = 8``).  The object is shared
by every thread: an override in one thread is seen by calls in the others
while it lasts.

Import it as ``numba_mamba.cuda_kernels.settings`` (the kernels' own name for
it); the module and its object are the same whichever way the package was
installed.
"""

import contextlib
import dataclasses
import os
import types

import numpy as np

__all__ = ["ENGINES", "Settings", "settings"]

#: Values of :attr:`Settings.engine`.
ENGINES = ("auto", "blocks", "states")


def _mapping(d):
    return types.MappingProxyType(dict(d))


def _default_min_blocks():
    return _mapping({
        (np.dtype(np.float32), "forward"): 6,
        (np.dtype(np.float64), "forward"): 4,
        (np.dtype(np.float32), "backward"): 5,
        (np.dtype(np.float64), "backward"): 0,
    })


def _default_blocks_tuning():
    return _mapping({
        np.dtype(np.float32): (128, 16),
        np.dtype(np.float64): (128, 8),  # 16 doubles per array would spill
    })


def _raw_launch_from_env():
    return os.environ.get("NUMBA_MAMBA_RAW_LAUNCH", "1") != "0"


@dataclasses.dataclass(slots=True, eq=False)
class Settings:
    """Tunables of the GPU launchers (see the module docstring).

    A misspelt field is an error (``AttributeError``), not a new attribute.
    The two tables (:attr:`min_blocks`, :attr:`blocks_tuning`) are read-only
    mappings: replace one whole (``settings.override(min_blocks={...})``)
    rather than editing it.

    Attributes
    ----------
    raw_launch : bool
        Launch kernels through the CUDA driver with a cubin loaded once
        (the fast path of ``numba_mamba.cuda_kernels._launch``) rather than
        through Numba's dispatcher.  Default on; the environment variable
        ``NUMBA_MAMBA_RAW_LAUNCH=0`` at import turns it off.
    engine : {'auto', 'blocks', 'states'}
        The selective scan's engine: ``'auto'`` (default) chooses by size
        (``scan.choose_engine``), the others force one.
    direct_half : bool
        The public API hands float16/bfloat16 ``u``, ``delta``, ``z`` and a
        variable ``B``/``C`` to the state engine as they are (half storage);
        False casts them to float32 first.
    deterministic : bool
        Default False.  True: the state engine's backward stores its partial
        sums (``dA``, ``dB``, ``dC``, ``dD``, ``ddelta_bias``, a variable
        ``dB``/``dC`` summed over the blocks of a group) and sums them in a
        fixed order afterwards, instead of adding them atomically in whatever
        order the blocks finish: two runs of the same backward on the same
        GPU give the same bits.  It costs memory (a variable ``dB``/``dC``
        once per block of its group) and time (``benchmarks/RESULTS.md``).
        The blocks engine (``N > 128``) has no such mode and refuses it.
    save_every : int
        Backward tiles per state the state engine's forward keeps: 1 keeps
        the state entering every backward tile (as many values as ``u`` at
        N = 16), K keeps one in K and the backward reruns the recurrence
        through each stretch of K tiles once more.
    min_recurrences : int
        ``Bt * D * N`` from which ``'auto'`` picks the state engine.  1: the
        state engine wherever it can take the problem (``N`` at most
        ``scan_states.MAX_STATES``), since with its split of the sequence into
        segments it is the faster of the two on every shape of
        ``benchmarks/bench_scan.py --grid``, few recurrences included.
    target_blocks : int
        Thread blocks the state engine's forward aims for where it splits
        the sequence into segments.
    forward_split_below : int
        The state engine's forward splits the sequence only where the
        ``Bt * D`` channels make fewer blocks than this (two per
        multiprocessor of an H200); from there on the occupancy the split
        buys costs more than its pass over the segments' ends.  0: never.
    backward_target_blocks : int
        Resident backward blocks (one wave) the state engine's backward
        fills by splitting the sequence.
    min_segment : int
        Shortest segment (steps) of a split sequence.
    long_segment : int
        Where one wave of the backward's blocks (``backward_target_blocks``)
        splits the sequence into segments of at least this many steps, the
        state engine's backward splits it further: into up to
        ``long_segment_waves`` waves of blocks, with segments of at least
        twice ``min_segment`` steps.
    long_segment_waves : int
        See ``long_segment``; 1 keeps the backward to one wave.
    min_blocks : mapping
        ``(dtype, 'forward' | 'backward') -> blocks per multiprocessor`` the
        compiler must fit in registers (``launch_bounds``' second entry; 0
        leaves it free) for the state engine's kernels.  Read when a kernel
        is compiled: kernels are cached per value.
    blocks_tuning : mapping
        ``dtype -> (threads, items)`` of the block engine where the caller
        gives none.
    gemm_tuning : bool
        Default True.  ``blas.matmul`` times, at the first eager call of each
        GEMM shape of at least ``gemm_tuning_min_flops``, cuBLAS's own call
        against the algorithms cuBLASLt proposes for it, and keeps the
        fastest for the process (``blas.choices``).  Off, or with
        ``deterministic`` on (the choice could differ between processes), every
        GEMM takes cuBLAS's own call.
    gemm_tuning_min_flops : int
        ``2 m n k batch`` from which a GEMM is tuned.

    Examples
    --------
    >>> from numba_mamba.cuda_kernels.settings import settings
    >>> settings.save_every
    1
    >>> with settings.override(save_every=8, engine="states"):
    ...     settings.save_every, settings.engine
    (8, 'states')
    >>> settings.save_every, settings.engine
    (1, 'auto')
    >>> settings.override(save_evry=8)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    AttributeError: Settings has no field 'save_evry'; fields: raw_launch, engine, ...
    """

    raw_launch: bool = dataclasses.field(default_factory=_raw_launch_from_env)
    engine: str = "auto"
    direct_half: bool = True
    deterministic: bool = False
    save_every: int = 1
    min_recurrences: int = 1
    target_blocks: int = 1056
    forward_split_below: int = 264
    backward_target_blocks: int = 660
    min_segment: int = 256
    long_segment: int = 2048
    long_segment_waves: int = 4
    min_blocks: types.MappingProxyType = dataclasses.field(default_factory=_default_min_blocks)
    blocks_tuning: types.MappingProxyType = dataclasses.field(
        default_factory=_default_blocks_tuning)
    gemm_tuning: bool = True
    gemm_tuning_min_flops: int = 1 << 28

    def __setattr__(self, name, value):
        _set(self, name, _checked(name, value))

    @property
    def generation(self):
        """A number that changes whenever a field of any :class:`Settings`
        changes (an assignment, an override and its end, :meth:`reset`): a
        launcher that works out a plan once per layout keys it on this, so a
        change of settings is seen by the next call."""
        return _GENERATION[0]

    def override(self, **changes):
        """A context manager: the fields in ``changes`` take their values for
        the ``with`` block and get their previous ones back after it.

        Raises
        ------
        AttributeError
            A name that is not a field (before anything is changed).
        ValueError, TypeError
            A value of the wrong kind (before anything is changed).
        """
        checked = {name: _checked(name, value) for name, value in changes.items()}
        return self._override(checked)

    @contextlib.contextmanager
    def _override(self, checked):
        previous = {name: getattr(self, name) for name in checked}
        for name, value in checked.items():
            _set(self, name, value)
        try:
            yield self
        finally:
            for name, value in previous.items():
                _set(self, name, value)

    def reset(self):
        """Every field back to its default (``raw_launch`` from the environment)."""
        for f in dataclasses.fields(self):
            _set(self, f.name, f.default_factory()
                 if f.default is dataclasses.MISSING else f.default)

    def as_dict(self):
        """The fields and their values (the tables as plain dicts)."""
        return {f.name: dict(v) if isinstance(v, types.MappingProxyType) else v
                for f in dataclasses.fields(self) for v in [getattr(self, f.name)]}


_POSITIVE = ("save_every", "min_recurrences", "target_blocks", "forward_split_below",
             "backward_target_blocks",
             "min_segment", "long_segment", "long_segment_waves", "gemm_tuning_min_flops")
_ZERO_ALLOWED = ("target_blocks", "forward_split_below", "backward_target_blocks")  # 0: no split


_GENERATION = [0]


def _set(settings_object, name, value):
    object.__setattr__(settings_object, name, value)
    _GENERATION[0] += 1


def _checked(name, value):
    """``value`` for the field ``name`` (a table as a read-only mapping), or an
    error naming the field and what it takes."""
    names = [f.name for f in dataclasses.fields(Settings)]
    if name not in names:
        raise AttributeError(f"Settings has no field {name!r}; fields: {', '.join(names)}")
    if name == "engine":
        if value not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {value!r}")
    elif name in ("raw_launch", "direct_half", "deterministic", "gemm_tuning"):
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
        value = bool(value)
    elif name in _POSITIVE:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
        value = int(value)
        least = 0 if name in _ZERO_ALLOWED else 1
        if value < least:
            raise ValueError(f"{name} must be at least {least}, got {value}")
    elif name == "min_blocks":
        value = _mapping({(np.dtype(dt), kind): int(m) for (dt, kind), m in dict(value).items()})
        for (dt, kind), m in value.items():
            if kind not in ("forward", "backward") or m < 0:
                raise ValueError(f"min_blocks maps (dtype, 'forward' | 'backward') to a count "
                                 f">= 0, got {(dt, kind)!r}: {m}")
    elif name == "blocks_tuning":
        value = _mapping({np.dtype(dt): (int(t), int(i)) for dt, (t, i) in dict(value).items()})
    return value


#: The package's one :class:`Settings`.
settings = Settings()
