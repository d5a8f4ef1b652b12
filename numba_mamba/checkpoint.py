"""Checkpoints: parameters and optimizer state in one ``.npz`` file, without pickle.

File format (version 1): an uncompressed NumPy ``.npz`` archive holding

==========================  ===================================================
entry                       content
==========================  ===================================================
``__meta__``                uint8 array: UTF-8 JSON with ``format``
                            (``"numba-mamba-checkpoint"``), ``version``, the
                            model ``config``, ``step``, the optimizer's
                            hyperparameters and step count, ``extra`` (any
                            JSON), and the name, shape and dtype of every array
``param/<name>``            each parameter
``adam_m/<name>``,          AdamW's first and second moments, where saved
``adam_v/<name>``
==========================  ===================================================

Loading uses ``numpy.load(..., allow_pickle=False)``: reading a checkpoint never
executes code.  Saving writes a temporary file in the target's folder, flushes
it to disk and renames it over the target (``os.replace``), so a crash leaves
either the old file or the new one, never half of one.  Arrays are stored
byte for byte: a round trip is bit-exact.  CuPy arrays are copied to the host
to be saved; :func:`load_checkpoint` returns NumPy arrays unless given
``xp=cupy``.
"""

import json
import os
import tempfile
import zipfile
from typing import Any, Mapping, NamedTuple, Union

import numpy as np

from ._validation import check_int, is_cupy_array

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "Checkpoint", "CheckpointError",
           "load_checkpoint", "save_checkpoint"]

CHECKPOINT_FORMAT = "numba-mamba-checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A file is not a readable numba-mamba checkpoint (truncated, corrupted, foreign).

    The message names the file and, for metadata that breaks the schema, the
    field of ``__meta__`` (e.g. ``optimizer.betas``).
    """


_META_KEYS = ("format", "version", "config", "step", "optimizer", "extra", "arrays")
_OPTIMIZER_KEYS = ("t", "lr", "betas", "eps", "weight_decay")
_SECTIONS = ("param/", "adam_m/", "adam_v/")


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_meta(path, meta):
    """Raise :class:`CheckpointError` (naming ``path`` and the field) unless
    the decoded ``__meta__`` follows the schema of format version 1.

    Format and version are checked first, so that a foreign file or another
    version is reported as such rather than as a schema error."""
    def bad(field, expected, value):
        raise CheckpointError(f"{path}: __meta__ field {field!r} must be {expected}, got "
                              f"{value!r:.200}")

    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} is not a numba-mamba checkpoint: its __meta__ is a "
                              f"{type(meta).__name__}, not a JSON object")
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a numba-mamba checkpoint: format "
                              f"{meta.get('format')!r:.200}")
    if meta.get("version") != CHECKPOINT_VERSION or not _is_int(meta.get("version")):
        raise CheckpointError(f"{path} has checkpoint format version "
                              f"{meta.get('version')!r:.200}; this numba-mamba reads version "
                              f"{CHECKPOINT_VERSION}")
    missing = [k for k in _META_KEYS if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: __meta__ lacks the field(s) {', '.join(missing)}")
    if not _is_int(meta["step"]) or meta["step"] < 0:
        bad("step", "an integer >= 0", meta["step"])
    if meta["config"] is not None and not isinstance(meta["config"], dict):
        bad("config", "an object (the MambaConfig's fields) or null", meta["config"])
    opt = meta["optimizer"]
    if opt is not None:
        if not isinstance(opt, dict):
            bad("optimizer", "an object (AdamW's hyperparameters) or null", opt)
        for key in _OPTIMIZER_KEYS:
            if key not in opt:
                raise CheckpointError(f"{path}: __meta__ field 'optimizer' lacks {key!r}")
        unknown = sorted(set(opt) - set(_OPTIMIZER_KEYS))
        if unknown:
            raise CheckpointError(f"{path}: __meta__ field 'optimizer' has unknown keys "
                                  f"{unknown}")
        if not _is_int(opt["t"]) or opt["t"] < 0:
            bad("optimizer.t", "an integer >= 0", opt["t"])
        for key in ("lr", "eps", "weight_decay"):
            if not _is_number(opt[key]):
                bad(f"optimizer.{key}", "a number", opt[key])
        betas = opt["betas"]
        if not (isinstance(betas, list) and len(betas) == 2 and all(map(_is_number, betas))):
            bad("optimizer.betas", "a list of two numbers", betas)
    manifest = meta["arrays"]
    if not isinstance(manifest, dict):
        bad("arrays", "an object (entry -> [shape, dtype])", manifest)
    for key, entry in manifest.items():
        if not key.startswith(_SECTIONS):
            bad("arrays", f"entries named {', '.join(p + '<name>' for p in _SECTIONS)}", key)
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], list)
                and all(_is_int(n) and n >= 0 for n in entry[0])
                and isinstance(entry[1], str)):
            bad(f"arrays.{key}", "[shape (a list of integers >= 0), dtype (a string)]", entry)


class Checkpoint(NamedTuple):
    """What :func:`load_checkpoint` returns."""

    params: dict  # name -> array
    config: object  # MambaConfig, or None if none was saved
    optimizer: object  # AdamW state dict (load with AdamW.load_state_dict), or None
    step: int
    extra: object  # the JSON value saved as ``extra``


def _host(x):
    return x.get() if is_cupy_array(x) else np.asarray(x)


def save_checkpoint(path: Union[str, os.PathLike], params: Mapping[str, Any],
                    config: Any = None, optimizer: Any = None, step: int = 0,
                    extra: Any = None) -> None:
    """Write parameters, optimizer state and metadata to ``path`` atomically.

    Parameters
    ----------
    path : str or os.PathLike
        Target file (written as given; ``.npz`` is the customary suffix).
    params : dict
        Name -> NumPy or CuPy array.
    config : MambaConfig, optional
    optimizer : AdamW or dict, optional
        An :class:`~numba_mamba.optim.AdamW` or its ``state_dict()``.
    step : int, optional
        Training step reached (an integer >= 0: what :func:`load_checkpoint`
        accepts; a ``bool`` or a float is a TypeError).
    extra : JSON-serialisable, optional
        Anything else to keep (e.g. a loss history).

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> from numba_mamba.checkpoint import save_checkpoint, load_checkpoint
    >>> path = os.path.join(tempfile.mkdtemp(), "ckpt.npz")
    >>> save_checkpoint(path, {"w": np.arange(3.0)}, step=7)
    >>> ck = load_checkpoint(path)
    >>> ck.params["w"], ck.step
    (array([0., 1., 2.]), 7)
    """
    step = check_int("step", step, low=0)
    path = os.fspath(path)
    arrays = {}
    manifest = {}

    def put(key, x):
        a = np.ascontiguousarray(_host(x))
        if a.dtype.hasobject:
            raise TypeError(f"{key} has dtype object, which cannot be saved without pickle")
        arrays[key] = a
        manifest[key] = [list(a.shape), a.dtype.str]

    for name, x in params.items():
        put(f"param/{name}", x)
    opt_meta = None
    if optimizer is not None:
        state = optimizer.state_dict() if hasattr(optimizer, "state_dict") else optimizer
        opt_meta = {k: v for k, v in state.items() if k not in ("m", "v")}
        for name, x in state["m"].items():
            put(f"adam_m/{name}", x)
        for name, x in state["v"].items():
            put(f"adam_v/{name}", x)
    meta = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": None if config is None else config.to_dict(),
        "step": step,
        "optimizer": opt_meta,
        "extra": extra,
        "arrays": manifest,
    }
    arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path: Union[str, os.PathLike], xp: Any = np) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Parameters
    ----------
    path : str or os.PathLike
    xp : module, optional
        ``numpy`` (default) or ``cupy``: where the returned arrays live.

    Returns
    -------
    Checkpoint
        ``(params, config, optimizer, step, extra)``.

    Raises
    ------
    CheckpointError
        The file is truncated or corrupted (bad zip, CRC mismatch), is not a
        numba-mamba checkpoint (no or foreign ``__meta__``), has a newer
        format version, its ``__meta__`` breaks the schema of the module
        docstring (a field missing or of the wrong type: the message names
        the file and the field), or its arrays disagree with its manifest.
    FileNotFoundError
        No file at ``path``.
    """
    from .models import MambaConfig

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "__meta__" not in npz.files:
                raise CheckpointError(f"{path} is not a numba-mamba checkpoint: it has no "
                                      f"__meta__ entry (entries: {npz.files[:5]})")
            meta = json.loads(npz["__meta__"].tobytes().decode("utf-8"))
            _check_meta(path, meta)
            manifest = meta["arrays"]
            if set(manifest) != set(npz.files) - {"__meta__"}:
                raise CheckpointError(f"{path}: its entries do not match its manifest")
            arrays = {}
            for key, (shape, dtype) in manifest.items():
                a = npz[key]  # reads the member: a truncated or corrupted one raises here
                if list(a.shape) != shape or a.dtype.str != dtype:
                    raise CheckpointError(f"{path}: {key} has shape {a.shape} and dtype "
                                          f"{a.dtype}, the manifest says {tuple(shape)} {dtype}")
                arrays[key] = a
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, KeyError, TypeError,
            UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not a readable numba-mamba checkpoint "
                              f"(truncated or corrupted?): {type(exc).__name__}: {exc}") from exc

    def section(prefix):  # (native byte order: a file of another machine's order too)
        n = len(prefix)
        return {k[n:]: xp.asarray(v if v.dtype.isnative else v.astype(v.dtype.newbyteorder("=")))
                for k, v in arrays.items() if k.startswith(prefix)}

    optimizer = None
    if meta["optimizer"] is not None:
        optimizer = dict(meta["optimizer"], m=section("adam_m/"), v=section("adam_v/"))
    config = None
    if meta["config"] is not None:
        try:
            config = MambaConfig.from_dict(meta["config"])
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: __meta__ field 'config' is not a MambaConfig: "
                                  f"{exc}") from exc
    return Checkpoint(section("param/"), config, optimizer, int(meta["step"]), meta["extra"])
