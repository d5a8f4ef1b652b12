"""Recurrent inference: training runs in parallel, inference as a recurrence.

A Mamba model is causal with a finite state, so after the parallel forward of
a prompt (:func:`prefill`) every further token costs the same, whatever the
length so far (:func:`step`).  Per layer the state is

==============  =======================  ==========================================
field           shape                    content
==============  =======================  ==========================================
``conv[i]``     (Bt, d_inner, d_conv)    the last ``d_conv`` inputs of the causal
                                         convolution, newest last (zeros before t=0)
``ssm[i]``      (Bt, d_inner, N)         the scan state ``h_t``
==============  =======================  ==========================================

One step of a block (two fused Numba kernels update the states in place:
``_cpu_step.py`` on the CPU, ``cuda_kernels/step.py`` on the GPU; the
projections are matmuls)::

    x, z  = split(in_proj(u_t))
    x     = conv_step(x, conv[i])          shift x in, silu(bias + <weight, conv[i]>)
    dt, B, C = split(x_proj(x));  dt = dt_proj.weight @ dt
    y     = ssm_step(x, dt, ..., ssm[i])   h = exp(delta A) h + delta B x;  y = (<C, h> + D x) silu(z)
    out_t = out_proj(y)

These are the same operations as the parallel forward, one time step at a
time, so running :func:`step` over a sequence reproduces
:func:`~numba_mamba.models.model_forward` and its final states.
"""

import importlib
from typing import NamedTuple

import numpy as np

from ._validation import array_namespace
from .layers import gpu_kernels, linear_forward, rmsnorm_forward
from .models import block_state, layer_params, model_forward

__all__ = ["InferenceState", "generate", "init_state", "prefill", "step"]


class InferenceState(NamedTuple):
    """Recurrent state of a model: one conv and one SSM state per layer."""

    conv: list  # n_layers arrays (Bt, d_inner, d_conv)
    ssm: list  # n_layers arrays (Bt, d_inner, N)


def _kernels(xp):
    if xp is np:
        return importlib.import_module("numba_mamba._cpu_step")
    return gpu_kernels("step")


def init_state(batch, params, config):
    """Zero state for ``batch`` sequences (the state before the first token)."""
    ref = next(iter(params.values()))
    xp = array_namespace(ref=ref)
    di, N, W = config.d_inner, config.d_state, config.d_conv
    return InferenceState([xp.zeros((batch, di, W), ref.dtype) for _ in range(config.n_layers)],
                          [xp.zeros((batch, di, N), ref.dtype) for _ in range(config.n_layers)])


def prefill(inputs, params, config):
    """Parallel forward over a prompt that also hands over the recurrent state.

    Parameters
    ----------
    inputs : array
        LM: tokens ``(Bt, L)``; regression: ``(Bt, L, d_input)``.
    params : dict
    config : MambaConfig

    Returns
    -------
    out : array
        As :func:`~numba_mamba.models.model_forward`.
    state : InferenceState
        The state after the last position, for :func:`step`.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_mamba import inference, models
    >>> cfg = models.MambaConfig(d_model=8, n_layers=2, vocab_size=12, d_state=4)
    >>> params = models.init_params(cfg, dtype=np.float64)
    >>> tokens = np.array([[3, 1, 4, 1, 5, 9]])
    >>> full, _ = models.model_forward(tokens, params, cfg)
    >>> _, state = inference.prefill(tokens[:, :4], params, cfg)
    >>> out4, state = inference.step(tokens[:, 4], state, params, cfg)
    >>> out5, state = inference.step(tokens[:, 5], state, params, cfg)
    >>> bool(np.allclose(out5, full[:, 5]) and np.allclose(out4, full[:, 4]))
    True
    """
    out, cache = model_forward(inputs, params, config)
    conv, ssm = zip(*(block_state(c) for c in cache.blocks)) if config.n_layers else ((), ())
    return out, InferenceState(list(conv), list(ssm))


def step(x_t, state, params, config):
    """One recurrent step of the whole model; updates ``state`` in place.

    Parameters
    ----------
    x_t : array
        LM: token ids ``(Bt,)``; regression: ``(Bt, d_input)``.
    state : InferenceState
        From :func:`init_state` or :func:`prefill`; its arrays are updated.
    params : dict
    config : MambaConfig

    Returns
    -------
    out_t : array
        LM: logits ``(Bt, vocab_size)``; regression: ``(Bt, d_output)``.
    state : InferenceState
        The same object, advanced by one step.
    """
    xp = array_namespace(x_t=x_t, ref=params["norm_f.weight"])
    k = _kernels(xp)
    if config.head == "lm":
        if x_t.ndim != 1 or x_t.dtype.kind not in "iu":
            raise ValueError(f"x_t must be integer token ids of shape (batch,), got dtype "
                             f"{x_t.dtype} and shape {tuple(x_t.shape)}")
        h = params["embedding.weight"][x_t]  # (Bt, dm)
    else:
        if x_t.ndim != 2 or x_t.shape[1] != config.d_input:
            raise ValueError(f"x_t must have shape (batch, {config.d_input}), got "
                             f"{tuple(x_t.shape)}")
        h, _ = linear_forward(x_t, params["encoder.weight"], params["encoder.bias"])
    Bt = h.shape[0]
    for name, arrays, shape in (("conv", state.conv, (config.d_inner, config.d_conv)),
                                ("ssm", state.ssm, (config.d_inner, config.d_state))):
        if len(arrays) != config.n_layers or any(
                a.shape != (Bt,) + shape or a.dtype != h.dtype or not a.flags.c_contiguous
                for a in arrays):
            raise ValueError(f"state.{name} must hold {config.n_layers} C-contiguous "
                             f"{h.dtype} arrays of shape {(Bt,) + shape}")
    di = config.d_inner
    for i in range(config.n_layers):
        p = layer_params(params, i)
        hn, _ = rmsnorm_forward(h, params[f"layers.{i}.norm.weight"], config.norm_eps)
        xz, _ = linear_forward(hn, p["in_proj.weight"], p.get("in_proj.bias"))  # (Bt, 2di)
        xs = xp.ascontiguousarray(xz[:, :di])
        z = xp.ascontiguousarray(xz[:, di:])
        xc = k.conv_step(xs, state.conv[i], p["conv1d.weight"], p.get("conv1d.bias"), True)
        A = -xp.exp(p["A_log"])
        if "x_proj.weight" in p:
            R = p["dt_proj.weight"].shape[1]
            N = A.shape[1]
            x_dbl, _ = linear_forward(xc, p["x_proj.weight"])  # (Bt, R + 2N)
            dt, _ = linear_forward(x_dbl[:, :R], p["dt_proj.weight"])  # (Bt, di)
            B = xp.ascontiguousarray(x_dbl[:, R:R + N])
            C = xp.ascontiguousarray(x_dbl[:, R + N:])
            y = k.ssm_step(xc, dt, A, B, C, p["D"], z, p["dt_proj.bias"], True, state.ssm[i],
                           True)
        else:  # LTI: delta = softplus(dt_bias), constant B and C
            y = k.ssm_step(xc, xp.zeros_like(xc), A, p["B"], p["C"], p["D"], z, p["dt_bias"],
                           True, state.ssm[i], False)
        out, _ = linear_forward(y, p["out_proj.weight"], p.get("out_proj.bias"))
        h = h + out
    hf, _ = rmsnorm_forward(h, params["norm_f.weight"], config.norm_eps)
    if config.head == "lm":
        W = params["embedding.weight"] if config.tie_embeddings else params["lm_head.weight"]
        out, _ = linear_forward(hf, W)
    else:
        out, _ = linear_forward(hf, params["decoder.weight"], params["decoder.bias"])
    return out, state


def generate(prompt, params, config, n_new, temperature=0.0, top_k=None, seed=0):
    """Continue token sequences: prefill the prompt, then one :func:`step` per new token.

    Parameters
    ----------
    prompt : integer array, shape (Bt, L0)
    params : dict
    config : MambaConfig
        Must have the LM head.
    n_new : int
        Tokens to generate.
    temperature : float, optional
        0 (default) takes the most likely token; otherwise tokens are drawn
        from ``softmax(logits / temperature)``.
    top_k : int, optional
        Draw only among the ``top_k`` most likely tokens.
    seed : int or numpy.random.Generator, optional
        For drawing (on the host).

    Returns
    -------
    tokens : integer array, shape (Bt, L0 + n_new)
        The prompt followed by the new tokens, on the prompt's device.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_mamba import inference, models
    >>> cfg = models.MambaConfig(d_model=8, n_layers=1, vocab_size=12, d_state=4)
    >>> params = models.init_params(cfg)
    >>> out = inference.generate(np.array([[1, 2, 3]]), params, cfg, n_new=4)
    >>> out.shape, bool((out[:, :3] == [1, 2, 3]).all())
    ((1, 7), True)
    """
    if config.head != "lm":
        raise ValueError("generate needs a language-model config (vocab_size given)")
    if n_new < 0:
        raise ValueError(f"n_new must be >= 0, got {n_new}")
    xp = array_namespace(prompt=prompt)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    logits, state = prefill(prompt, params, config)
    last = logits[:, -1]
    tokens = [prompt]
    for i in range(n_new):
        nxt = xp.asarray(_choose(last, temperature, top_k, rng)).astype(prompt.dtype)
        tokens.append(nxt[:, None])
        if i + 1 < n_new:
            last, state = step(nxt, state, params, config)
    return xp.concatenate(tokens, axis=1)


def _choose(logits, temperature, top_k, rng):
    """Next token per row (host NumPy) from logits (Bt, V)."""
    lg = np.asarray(logits.get() if hasattr(logits, "get") else logits, dtype=np.float64)
    if temperature == 0:
        return lg.argmax(axis=-1)
    lg = lg / temperature
    if top_k is not None and top_k < lg.shape[-1]:
        kth = np.partition(lg, -top_k, axis=-1)[:, -top_k][:, None]
        lg = np.where(lg < kth, -np.inf, lg)
    p = np.exp(lg - lg.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return np.array([rng.choice(p.shape[-1], p=row) for row in p])
