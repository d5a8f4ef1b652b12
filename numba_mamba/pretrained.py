"""Pretrained Mamba checkpoints (Hugging Face and mamba-ssm layouts) without torch.

:func:`load` reads a checkpoint folder into a :class:`~numba_mamba.models.MambaConfig`
and a parameter dict of this library's models; :func:`save` writes ours in the
Hugging Face ``MambaForCausalLM`` layout, which ``transformers`` loads with
``MambaForCausalLM.from_pretrained(path)``.

A checkpoint folder holds ``config.json`` and the weights in safetensors
files: ``model.safetensors``, or shards listed by
``model.safetensors.index.json``.  Two layouts are understood:

====================================  ==============================  =====================
Hugging Face (``model_type: mamba``)  mamba-ssm (``d_model``, ...)    here
====================================  ==============================  =====================
``backbone.embeddings.weight``        ``backbone.embedding.weight``   ``embedding.weight``
``backbone.layers.{i}.norm.weight``   (same)                          ``layers.{i}.norm...``
``backbone.layers.{i}.mixer.<name>``  (same)                          ``layers.{i}.mixer...``
``...mixer.conv1d.weight`` (C, 1, W)  (same)                          (C, W)
``backbone.norm_f.weight``            (same)                          ``norm_f.weight``
``lm_head.weight`` (untied only)      (same)                          ``lm_head.weight``
====================================  ==============================  =====================

The safetensors format is read and written here byte by byte (a JSON
header, then the raw little-endian tensors): no torch, no pickle, and no
package beyond NumPy, bfloat16 included (widened to float32 exactly).
Pickled weights (``pytorch_model.bin``, ``.pt``, ``.ckpt``) are refused:
unpickling runs code.  Convert them once where torch is installed::

    import torch, safetensors.torch
    sd = torch.load("pytorch_model.bin", map_location="cpu", weights_only=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()},
                                "model.safetensors", metadata={"format": "pt"})

Supported: Mamba (version 1) language models with RMSNorm, no attention or
MLP layers and the SiLU activation; Mamba-2, FalconMamba, LayerNorm and
hybrid checkpoints raise :class:`PretrainedError` saying so.
"""

import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np

from ._validation import is_cupy_array
from .models import MambaConfig, block_param_names

__all__ = ["PretrainedError", "load", "save", "read_safetensors", "write_safetensors"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# safetensors dtype -> NumPy dtype (little-endian); BF16 is read as its bits
_ST_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8",
              "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?"}
_ST_NAMES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16"}
_MAX_HEADER = 100 * 2 ** 20


class PretrainedError(ValueError):
    """A checkpoint that cannot be read: the message names the file (and the tensor)."""


# ---------------------------------------------------------------- safetensors files


def _bf16_to_float32(bits):
    """bfloat16 bit patterns (uint16) as float32: the same values, exactly."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def read_safetensors(path):
    """The tensors of one safetensors file as NumPy arrays.

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    tensors : dict
        Name -> array (a copy, C-contiguous).  bfloat16 tensors come as
        float32 (every bfloat16 is a float32); the other dtypes as stored.
    metadata : dict
        The header's ``__metadata__`` (strings), empty where there is none.

    Raises
    ------
    PretrainedError
        The file is no well-formed safetensors file (the message names the
        file, and the tensor where one is at fault).

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> from numba_mamba.pretrained import read_safetensors, write_safetensors
    >>> path = os.path.join(tempfile.mkdtemp(), "t.safetensors")
    >>> write_safetensors(path, {"w": np.arange(6, dtype=np.float32).reshape(2, 3)})
    >>> tensors, meta = read_safetensors(path)
    >>> tensors["w"], meta
    (array([[0., 1., 2.],
           [3., 4., 5.]], dtype=float32), {'format': 'pt'})
    """
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        raise PretrainedError(f"{path}: not a safetensors file ({size} bytes)")
    data = np.memmap(path, dtype=np.uint8, mode="r")  # (each tensor is copied out once)
    n = int.from_bytes(data[:8].tobytes(), "little")
    if n > min(_MAX_HEADER, size - 8):
        raise PretrainedError(f"{path}: not a safetensors file (header length {n} for a file "
                              f"of {size} bytes)")
    try:
        header = json.loads(data[8:8 + n].tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PretrainedError(f"{path}: not a safetensors file (header: {exc})") from None
    if not isinstance(header, dict):
        raise PretrainedError(f"{path}: not a safetensors file (header is no JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    body = data[8 + n:]
    tensors = {}
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            shape = tuple(int(s) for s in shape)
        except (KeyError, TypeError, ValueError):
            raise PretrainedError(f"{path}: tensor {name}: malformed header entry "
                                  f"{info!r}") from None
        if dtype not in _ST_DTYPES:
            raise PretrainedError(f"{path}: tensor {name} has dtype {dtype}, not one of "
                                  f"{', '.join(_ST_DTYPES)}")
        np_dtype = np.dtype(_ST_DTYPES[dtype])
        size = math.prod(shape) * np_dtype.itemsize
        if not 0 <= begin <= end <= len(body) or end - begin != size or min(shape, default=0) < 0:
            raise PretrainedError(f"{path}: tensor {name} of dtype {dtype} and shape {shape} "
                                  f"has data offsets [{begin}, {end}) in a body of "
                                  f"{len(body)} bytes (needs {size} bytes)")
        a = body[begin:end].view(np_dtype).reshape(shape)
        tensors[name] = (_bf16_to_float32(a) if dtype == "BF16"
                         else np.array(a, dtype=np_dtype.newbyteorder("=")))
    del data, body  # (the file is unmapped once no array refers to it)
    return tensors, metadata


def _host(a):
    return a.get() if is_cupy_array(a) else np.asarray(a)


def _atomic_write(path, chunks):
    """Write ``chunks`` (bytes-likes) to ``path`` through a temporary file renamed over it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_safetensors(path, tensors, metadata=None):
    """Write NumPy or CuPy arrays to one safetensors file (replaced atomically).

    Parameters
    ----------
    path : str or Path
    tensors : dict
        Name -> array of dtype float64, float32, float16 or bfloat16
        (``ml_dtypes``).
    metadata : dict of str, optional
        The header's ``__metadata__``; default ``{"format": "pt"}``, which
        ``transformers`` asks for.
    """
    metadata = {"format": "pt"} if metadata is None else metadata
    header = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}}
    arrays, offset = [], 0
    for name, a in tensors.items():
        a = np.ascontiguousarray(_host(a))
        if a.dtype.name not in _ST_NAMES:
            raise TypeError(f"tensor {name} has dtype {a.dtype}; safetensors files are written "
                            f"from float64, float32, float16 or bfloat16 arrays")
        a = a.astype(a.dtype.newbyteorder("<")) if a.dtype.byteorder == ">" else a
        header[name] = {"dtype": _ST_NAMES[a.dtype.name], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        arrays.append(a)
        offset += a.nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the body starts 8-byte aligned
    _atomic_write(path, [len(text).to_bytes(8, "little"), text]
                  + [a.reshape(-1).view(np.uint8) for a in arrays])


# ---------------------------------------------------------------- configs


def _unsupported(path, what):
    return PretrainedError(f"{path}: unsupported checkpoint: {what}; numba-mamba loads Mamba "
                           f"(version 1) language models")


def _rank(rank, d_model):
    """MambaConfig's ``dt_rank``: None where it is the default ``ceil(d_model / 16)``."""
    return None if rank == "auto" or int(rank) == math.ceil(d_model / 16) else int(rank)


def _config_from_hf(c, path):
    kind = c.get("model_type")
    if kind != "mamba":
        name = {"mamba2": "Mamba-2", "falcon_mamba": "FalconMamba (extra RMS norms of B, C "
                "and dt)"}.get(kind, f"model_type {kind!r}")
        raise _unsupported(path, name)
    if c.get("hidden_act", "silu") != "silu":
        raise _unsupported(path, f"hidden_act {c['hidden_act']!r} (only 'silu')")
    d_model, d_inner = c["hidden_size"], c.get("intermediate_size", 2 * c["hidden_size"])
    if d_inner % d_model:
        raise _unsupported(path, f"intermediate_size {d_inner} is no multiple of hidden_size "
                           f"{d_model}")
    rank = c.get("time_step_rank", "auto")
    return MambaConfig(
        d_model=d_model, n_layers=c["num_hidden_layers"], vocab_size=c["vocab_size"],
        d_state=c.get("state_size", 16), d_conv=c.get("conv_kernel", 4),
        expand=d_inner // d_model,
        dt_rank=_rank(rank, d_model),
        dt_min=c.get("time_step_min", 1e-3), dt_max=c.get("time_step_max", 1e-1),
        dt_init_floor=c.get("time_step_floor", 1e-4),
        tie_embeddings=c.get("tie_word_embeddings", True),
        norm_eps=c.get("layer_norm_epsilon", 1e-5), conv_bias=c.get("use_conv_bias", True),
        proj_bias=c.get("use_bias", False))


def _config_from_mamba_ssm(c, path, vocab_rows):
    ssm = dict(c.get("ssm_cfg") or {})
    layer = ssm.pop("layer", "Mamba1")
    if layer != "Mamba1":
        raise _unsupported(path, f"ssm_cfg layer {layer!r}" + (" (Mamba-2)" if layer == "Mamba2"
                                                                else ""))
    if not c.get("rms_norm", True):
        raise _unsupported(path, "rms_norm false (LayerNorm)")
    if c.get("d_intermediate", 0):
        raise _unsupported(path, f"d_intermediate {c['d_intermediate']} (MLP layers)")
    if c.get("attn_layer_idx"):
        raise _unsupported(path, f"attention layers {c['attn_layer_idx']}")
    rank = ssm.get("dt_rank", "auto")
    d_model = c["d_model"]
    vocab = c["vocab_size"]
    multiple = c.get("pad_vocab_size_multiple", 1)
    padded = vocab + (-vocab % multiple)
    return MambaConfig(
        d_model=d_model, n_layers=c["n_layer"],
        vocab_size=vocab_rows if vocab_rows in (vocab, padded) else padded,
        d_state=ssm.get("d_state", 16), d_conv=ssm.get("d_conv", 4),
        expand=ssm.get("expand", 2),
        dt_rank=_rank(rank, d_model),
        dt_min=ssm.get("dt_min", 1e-3), dt_max=ssm.get("dt_max", 1e-1),
        dt_init_floor=ssm.get("dt_init_floor", 1e-4),
        tie_embeddings=c.get("tie_embeddings", True), norm_eps=c.get("norm_epsilon", 1e-5),
        conv_bias=ssm.get("conv_bias", True), proj_bias=ssm.get("bias", False))


def _read_config(path):
    file = path / CONFIG_NAME
    if not file.is_file():
        raise PretrainedError(f"{file}: no config.json in the checkpoint folder {path}")
    try:
        c = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PretrainedError(f"{file}: not a JSON file ({exc})") from None
    if not isinstance(c, dict):
        raise PretrainedError(f"{file}: no JSON object")
    return file, c


def _to_hf_config(config, dtype):
    return {
        "architectures": ["MambaForCausalLM"], "model_type": "mamba",
        "hidden_size": config.d_model, "num_hidden_layers": config.n_layers,
        "vocab_size": config.vocab_size, "state_size": config.d_state,
        "conv_kernel": config.d_conv, "expand": config.expand,
        "intermediate_size": config.d_inner, "time_step_rank": config.rank,
        "time_step_min": config.dt_min, "time_step_max": config.dt_max,
        "time_step_floor": config.dt_init_floor, "use_bias": config.proj_bias,
        "use_conv_bias": config.conv_bias, "layer_norm_epsilon": config.norm_eps,
        "hidden_act": "silu", "residual_in_fp32": True,
        "tie_word_embeddings": config.tie_embeddings, "dtype": dtype,
    }


# ---------------------------------------------------------------- weights


def _weight_files(path):
    """The safetensors files of a checkpoint folder: ``(index file or None,
    {file: None})``; refuses pickled weights."""
    index = path / INDEX_NAME
    single = path / WEIGHTS_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (KeyError, TypeError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PretrainedError(f"{index}: no readable weight_map ({exc!r})") from None
        return index, weight_map
    if single.is_file():
        return None, None
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLED)
    if pickled:
        raise PretrainedError(
            f"{path / pickled[0]}: pickled weights are not loaded (unpickling runs code); "
            f"convert them to safetensors first (see numba_mamba.pretrained's docstring: "
            f"torch.load(..., weights_only=True) then safetensors.torch.save_file to "
            f"{WEIGHTS_NAME})")
    raise PretrainedError(f"{path}: no {WEIGHTS_NAME} or {INDEX_NAME} in the checkpoint folder")


def _read_weights(path):
    """``(weights, source)``: name -> (array, file) of every tensor of the
    checkpoint folder, and the file that lists them (the weights' or the index)."""
    index, weight_map = _weight_files(path)
    if index is None:
        tensors, _ = read_safetensors(path / WEIGHTS_NAME)
        return {k: (v, path / WEIGHTS_NAME) for k, v in tensors.items()}, path / WEIGHTS_NAME
    out = {}
    for shard in sorted(set(weight_map.values())):
        file = path / shard
        if Path(shard).name != shard or not file.is_file():
            raise PretrainedError(f"{index}: shard {shard!r} is not a file of {path}")
        tensors, _ = read_safetensors(file)
        for name, a in tensors.items():
            if weight_map.get(name) != shard:
                raise PretrainedError(f"{file}: tensor {name} is not listed for this shard in "
                                      f"{index}")
            out[name] = (a, file)
    missing = sorted(set(weight_map) - set(out))
    if missing:
        raise PretrainedError(f"{index}: tensor {missing[0]} is listed in shard "
                              f"{weight_map[missing[0]]} but not found there")
    return out, index


def _our_name(name):
    """This library's name of a checkpoint tensor (None: not one of ours)."""
    if name.startswith("backbone."):
        name = name[len("backbone."):]
        if name in ("embeddings.weight", "embedding.weight"):
            return "embedding.weight"
        return name
    return name if name == "lm_head.weight" else None


def _expected_shapes(config):
    dm, di, N, W, R = config.d_model, config.d_inner, config.d_state, config.d_conv, config.rank
    local = {"in_proj.weight": (2 * di, dm), "conv1d.weight": (di, W), "conv1d.bias": (di,),
             "x_proj.weight": (R + 2 * N, di), "dt_proj.weight": (di, R),
             "dt_proj.bias": (di,), "A_log": (di, N), "D": (di,), "out_proj.weight": (dm, di),
             "in_proj.bias": (2 * di,), "out_proj.bias": (dm,)}
    shapes = {"embedding.weight": (config.vocab_size, dm)}
    for i in range(config.n_layers):
        shapes[f"layers.{i}.norm.weight"] = (dm,)
        for name in block_param_names(config):
            shapes[f"layers.{i}.mixer.{name}"] = local[name]
    shapes["norm_f.weight"] = (dm,)
    if not config.tie_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, dm)
    return shapes


def _checkpoint_name(ours, hf):
    if ours == "lm_head.weight":
        return ours
    if ours == "embedding.weight":
        return "backbone.embeddings.weight" if hf else "backbone.embedding.weight"
    return "backbone." + ours


def load(path, dtype=None, xp=np):
    """Load a pretrained Mamba language model: ``(config, params)``.

    Parameters
    ----------
    path : str or Path
        A checkpoint folder (``config.json`` and ``model.safetensors`` or a
        sharded ``model.safetensors.index.json``), as written by
        ``MambaForCausalLM.save_pretrained`` or :func:`save`, or with
        mamba-ssm's ``config.json`` and names (see the module docstring).
    dtype : numpy dtype, optional
        float32 or float64; default float64 where the checkpoint stores
        float64, else float32 (float16 and bfloat16 weights are widened).
    xp : module, optional
        ``numpy`` or ``cupy``: where the arrays are put.

    Returns
    -------
    config : MambaConfig
        The language-model config (``vocab_size`` is the embedding's rows,
        which mamba-ssm pads).
    params : dict
        This library's names -> arrays (:func:`numba_mamba.models.init_params`'s
        keys), for :func:`~numba_mamba.models.model_forward` and
        :class:`~numba_mamba.inference.Decoder`.

    Raises
    ------
    PretrainedError
        Naming the file and, where one is at fault, the tensor: a missing,
        unexpected or misshapen tensor; pickled weights; an unsupported
        architecture (Mamba-2, FalconMamba, LayerNorm, attention or MLP
        layers).

    Examples
    --------
    >>> import tempfile
    >>> import numpy as np
    >>> from numba_mamba import models, pretrained
    >>> cfg = models.MambaConfig(d_model=8, n_layers=2, vocab_size=20, d_state=4)
    >>> params = models.init_params(cfg, seed=0)
    >>> folder = tempfile.mkdtemp()
    >>> pretrained.save(folder, cfg, params)
    >>> cfg2, params2 = pretrained.load(folder)
    >>> cfg2 == cfg, all(np.array_equal(params[k], params2[k]) for k in params)
    (True, True)
    """
    path = Path(path)
    if path.is_file() and path.suffix in _PICKLED:
        raise PretrainedError(f"{path}: pickled weights are not loaded (unpickling runs code); "
                              f"convert them to safetensors first (see "
                              f"numba_mamba.pretrained's docstring)")
    if not path.is_dir():
        raise PretrainedError(f"{path}: not a checkpoint folder")
    config_file, c = _read_config(path)
    hf = "model_type" in c
    if not hf and not {"d_model", "n_layer", "vocab_size"} <= set(c):
        raise PretrainedError(f"{config_file}: neither a Hugging Face config (model_type) nor "
                              f"mamba-ssm's (d_model, n_layer, vocab_size)")
    if hf:
        config = _config_from_hf(c, config_file)
    weights, source = _read_weights(path)
    if not hf:
        emb = weights.get("backbone.embedding.weight", weights.get("backbone.embeddings.weight"))
        config = _config_from_mamba_ssm(c, config_file, None if emb is None else emb[0].shape[0])
    tie_extra = config.tie_embeddings and "lm_head.weight" in weights
    shapes = _expected_shapes(config)
    found = {}
    for name, (a, file) in weights.items():
        ours = _our_name(name)
        if ours == "lm_head.weight" and tie_extra:
            continue  # tied: the embedding's copy (mamba-ssm saves it)
        if ours not in shapes:
            raise PretrainedError(f"{file}: unexpected tensor {name} (shape {a.shape}) for "
                                  f"{config_file}'s config")
        want = shapes[ours]
        if ours.endswith("conv1d.weight") and a.shape == (want[0], 1, want[1]):
            a = a.reshape(want)
        if a.shape != want or a.dtype.kind != "f":
            raise PretrainedError(f"{file}: tensor {name} has shape {a.shape} and dtype "
                                  f"{a.dtype}, expected shape {want} of floats")
        found[ours] = a
    missing = [k for k in shapes if k not in found]
    if missing:
        raise PretrainedError(f"{source}: missing tensor "
                              f"{_checkpoint_name(missing[0], hf)} (shape {shapes[missing[0]]})"
                              + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    if dtype is None:
        dtype = np.float64 if any(a.dtype == np.float64 for a in found.values()) else np.float32
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    params = {k: xp.asarray(np.ascontiguousarray(found[k], dtype=dtype)) for k in shapes}
    return config, params


def save(path, config, params, max_shard_size=None):
    """Write a model in the Hugging Face ``MambaForCausalLM`` layout.

    Parameters
    ----------
    path : str or Path
        The checkpoint folder (made where missing); ``config.json`` and the
        weights are written into it, each file replaced atomically.
    config : MambaConfig
        A language model with selective blocks.
    params : dict
        This library's names -> NumPy or CuPy arrays (float32 or float64),
        stored as they are (the conv weight as ``(C, 1, W)``).
    max_shard_size : int, optional
        Bytes per weight file: where the weights take more, they are split
        into ``model-0000k-of-0000n.safetensors`` files listed by
        ``model.safetensors.index.json``.  Default: one file.

    Raises
    ------
    ValueError
        A regression or LTI config (no Hugging Face counterpart), or params
        whose names or shapes do not fit the config (named).

    Examples
    --------
    >>> import os, tempfile
    >>> from numba_mamba import models, pretrained
    >>> cfg = models.MambaConfig(d_model=8, n_layers=2, vocab_size=20, d_state=4)
    >>> folder = tempfile.mkdtemp()
    >>> pretrained.save(folder, cfg, models.init_params(cfg), max_shard_size=4000)
    >>> sorted(os.listdir(folder))  # doctest: +NORMALIZE_WHITESPACE
    ['config.json', 'model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors',
     'model.safetensors.index.json']
    """
    if config.head != "lm" or config.block != "mamba":
        raise ValueError(f"save writes Mamba language models (vocab_size, block='mamba'), "
                         f"got head {config.head!r} and block {config.block!r}")
    shapes = _expected_shapes(config)
    unexpected = sorted(set(params) - set(shapes))
    if unexpected:
        raise ValueError(f"params has {unexpected[0]}, which the config has no place for")
    tensors = {}
    for ours, want in shapes.items():
        if ours not in params:
            raise ValueError(f"params is missing {ours} (shape {want})")
        a = _host(params[ours])
        if a.shape != want:
            raise ValueError(f"params[{ours!r}] has shape {a.shape}, expected {want}")
        if ours.endswith("conv1d.weight"):
            a = a.reshape(want[0], 1, want[1])
        tensors[_checkpoint_name(ours, hf=True)] = a
    dtypes = {a.dtype.name for a in tensors.values()}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    shards = [{}]
    size = 0
    for name, a in tensors.items():
        if max_shard_size is not None and shards[-1] and size + a.nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = a
        size += a.nbytes
    stale = [path / WEIGHTS_NAME, path / INDEX_NAME] + list(path.glob("model-*-of-*.safetensors"))
    if len(shards) == 1:
        write_safetensors(path / WEIGHTS_NAME, shards[0])
        keep = {path / WEIGHTS_NAME}
    else:
        n = len(shards)
        weight_map, keep = {}, set()
        for k, shard in enumerate(shards, 1):
            name = f"model-{k:05d}-of-{n:05d}.safetensors"
            write_safetensors(path / name, shard)
            keep.add(path / name)
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(a.nbytes for a in tensors.values())
        _atomic_write(path / INDEX_NAME, [json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2).encode()])
        keep.add(path / INDEX_NAME)
    for old in stale:  # weights of an earlier save in another layout
        if old not in keep and old.is_file():
            old.unlink()
    config_json = _to_hf_config(config, dtypes.pop() if len(dtypes) == 1 else "float32")
    _atomic_write(path / CONFIG_NAME, [json.dumps(config_json, indent=2).encode()])

