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

One step of the model (``_cpu_step.py`` on the CPU, ``cuda_kernels/step.py``
on the GPU; the projections are matmuls into buffers of the step)::

    h     = embedding[token]                            (or the encoder's output)
    per layer i:
      hn    = rmsnorm_i(h)                              h += out first, after layer 0
      xz    = in_proj(hn)                               x = xz[:, :d_inner], z = xz[:, d_inner:]
      x     = conv_step(x, conv[i])                     shift x in, silu(bias + <weight, conv[i]>)
      x_dbl = x_proj(x)                                 dt_low, B, C
      y     = ssm_step(x, x_dbl, z, ssm[i])             dt = dt_proj(dt_low) inside;
                                                        h = exp(delta A) h + delta B x;
                                                        y = (<C, h> + D x) silu(z)
      out   = out_proj(y)
    logits = head(rmsnorm_f(h + out))

These are the same operations as the parallel forward, one time step at a
time, so running :func:`step` over a sequence reproduces
:func:`~numba_mamba.models.model_forward` and its final states.

:class:`Decoder` runs that step over buffers of its own (the state, the
token ids, every intermediate, the logits), so that on the GPU the step is
captured once as a CUDA graph (:class:`~numba_mamba.graphs.CapturedStep`)
and replayed per token; :meth:`Decoder.generate` chooses the next token on
the device too (``cuda_kernels/sample.py``; the same rule on the CPU in
``_cpu_sample.py``), so that generating a token is one graph replay, with no
wait for the device until the tokens are read.
"""

import numbers
from typing import NamedTuple

import numpy as np

from ._validation import array_namespace, is_cupy_array
from .graphs import CapturedStep, check_graph_mode
from ._backends import backend
from .layers import embedding_forward, gemm, linear_forward, rmsnorm_forward
from .models import block_state, layer_params, mamba_block_forward, model_forward

__all__ = ["Decoder", "InferenceState", "generate", "init_state", "prefill", "step"]


class InferenceState(NamedTuple):
    """Recurrent state of a model: one conv and one SSM state per layer."""

    conv: list  # n_layers arrays (Bt, d_inner, d_conv)
    ssm: list  # n_layers arrays (Bt, d_inner, N)


def _kernels(xp):
    return backend(xp, "step")


def _sampler(xp):
    return backend(xp, "sample")


class _Plan:
    """What a step reads of the parameters: per layer the local parameter dict,
    the norm's weight and ``A = -exp(A_log)`` (computed here, once), and the
    head.  Holds the parameter arrays themselves, not copies."""

    def __init__(self, params, config, xp):
        n = config.n_layers
        self.layers = [layer_params(params, i) for i in range(n)]
        self.norms = [params[f"layers.{i}.norm.weight"] for i in range(n)]
        self.norm_f = params["norm_f.weight"]
        self.eps = config.norm_eps
        self.A = [-xp.exp(p["A_log"]) for p in self.layers]
        if config.head == "lm":
            self.embedding = params["embedding.weight"]
            self.head_w = self.embedding if config.tie_embeddings else params["lm_head.weight"]
            self.head_b = None
        else:
            self.embedding = None
            self.head_w, self.head_b = params["decoder.weight"], params["decoder.bias"]

    def refresh(self, xp):
        """Recompute ``A`` from ``A_log`` into the same arrays (a captured step
        keeps reading them)."""
        for p, A in zip(self.layers, self.A):
            xp.exp(p["A_log"], out=A)
            xp.negative(A, out=A)


class _Work(NamedTuple):
    """The intermediates of one step, each (Bt, features)."""

    h: object  # (Bt, d_model) residual stream
    hn: object  # (Bt, d_model) normalized
    xz: object  # (Bt, 2 d_inner) in_proj's output
    xc: object  # (Bt, d_inner) the convolution's output
    x_dbl: object  # (Bt, R + 2N) x_proj's output; None for LTI blocks
    y: object  # (Bt, d_inner) the SSM's output
    out: object  # (Bt, d_model) out_proj's output
    head: object  # (Bt, V) logits, or (Bt, d_output)


def _work(xp, batch, config, dtype):
    dm, di = config.d_model, config.d_inner
    n_out = config.vocab_size if config.head == "lm" else config.d_output
    x_dbl = (xp.empty((batch, config.rank + 2 * config.d_state), dtype)
             if config.block == "mamba" else None)
    return _Work(xp.zeros((batch, dm), dtype), xp.empty((batch, dm), dtype),
                 xp.empty((batch, 2 * di), dtype), xp.empty((batch, di), dtype), x_dbl,
                 xp.empty((batch, di), dtype), xp.empty((batch, dm), dtype),
                 xp.empty((batch, n_out), dtype))


def _model_step(k, xp, plan, state, w, tokens=None):
    """One step of the model into ``w.head``: from the token ids ``tokens`` (LM)
    or from ``w.h`` (the encoder's output, regression).  Allocates nothing;
    waits for nothing."""
    for i, p in enumerate(plan.layers):
        if i == 0:
            k.residual_rmsnorm(w.h, w.hn, plan.norms[0], plan.eps, tokens=tokens,
                               table=None if tokens is None else plan.embedding)
        else:
            k.residual_rmsnorm(w.h, w.hn, plan.norms[i], plan.eps, delta=w.out)
        gemm(xp, w.hn, p["in_proj.weight"].T, out=w.xz)
        if "in_proj.bias" in p:
            xp.add(w.xz, p["in_proj.bias"], out=w.xz)
        k.conv_step(w.xz, state.conv[i], p["conv1d.weight"], p.get("conv1d.bias"), True,
                    out=w.xc)
        if w.x_dbl is not None:
            gemm(xp, w.xc, p["x_proj.weight"].T, out=w.x_dbl)
            k.ssm_step(w.xc, w.xz, w.x_dbl, p["dt_proj.weight"], p["dt_proj.bias"], plan.A[i],
                       None, None, p["D"], state.ssm[i], out=w.y)
        else:  # LTI: delta = softplus(dt_bias), constant B and C
            k.ssm_step(w.xc, w.xz, None, None, p["dt_bias"], plan.A[i], p["B"], p["C"], p["D"],
                       state.ssm[i], out=w.y)
        gemm(xp, w.y, p["out_proj.weight"].T, out=w.out)
        if "out_proj.bias" in p:
            xp.add(w.out, p["out_proj.bias"], out=w.out)
    k.residual_rmsnorm(w.h, w.hn, plan.norm_f, plan.eps, delta=w.out)
    gemm(xp, w.hn, plan.head_w.T, out=w.head)
    if plan.head_b is not None:
        xp.add(w.head, plan.head_b, out=w.head)
    return w.head


def init_state(batch, params, config):
    """Zero state for ``batch`` sequences (the state before the first token)."""
    ref = next(iter(params.values()))
    xp = array_namespace(ref=ref)
    di, N, W = config.d_inner, config.d_state, config.d_conv
    return InferenceState([xp.zeros((batch, di, W), ref.dtype) for _ in range(config.n_layers)],
                          [xp.zeros((batch, di, N), ref.dtype) for _ in range(config.n_layers)])


def prefill(inputs, params, config, state=None):
    """Parallel forward over a prompt that also hands over the recurrent state.

    Parameters
    ----------
    inputs : array
        LM: tokens ``(Bt, L)``; regression: ``(Bt, L, d_input)``.
    params : dict
    config : MambaConfig
    state : InferenceState, optional
        Continue from this state (a prompt fed in pieces); default the zero
        state.  It is not changed.

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
    out, cache = model_forward(inputs, params, config,
                               initial_state=None if state is None else (state.conv, state.ssm))
    conv, ssm = zip(*(block_state(c) for c in cache.blocks))
    return out, InferenceState(list(conv), list(ssm))


def _check_state(state, Bt, config, dtype):
    for name, arrays, shape in (("conv", state.conv, (config.d_inner, config.d_conv)),
                                ("ssm", state.ssm, (config.d_inner, config.d_state))):
        if len(arrays) != config.n_layers or any(
                a.shape != (Bt,) + shape or a.dtype != dtype or not a.flags.c_contiguous
                for a in arrays):
            raise ValueError(f"state.{name} must hold {config.n_layers} C-contiguous "
                             f"{dtype} arrays of shape {(Bt,) + shape}")


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

    See Also
    --------
    Decoder : the same step over buffers of its own, captured on the GPU.
    """
    ref = params["norm_f.weight"]
    xp = array_namespace(x_t=x_t, ref=ref)
    Bt = x_t.shape[0] if x_t.ndim else 0
    tokens = None
    if config.head == "lm":
        if x_t.ndim != 1 or x_t.dtype.kind not in "iu":
            raise ValueError(f"x_t must be integer token ids of shape (batch,), got dtype "
                             f"{x_t.dtype} and shape {tuple(x_t.shape)}")
        tokens = xp.ascontiguousarray(x_t, dtype=np.int64)  # (the kernels' layout)
    elif x_t.ndim != 2 or x_t.shape[1] != config.d_input:
        raise ValueError(f"x_t must have shape (batch, {config.d_input}), got "
                         f"{tuple(x_t.shape)}")
    _check_state(state, Bt, config, ref.dtype)
    w = _work(xp, Bt, config, ref.dtype)
    plan = _Plan(params, config, xp)
    if tokens is None:
        gemm(xp, x_t.astype(ref.dtype, copy=False), params["encoder.weight"].T, out=w.h)
        xp.add(w.h, params["encoder.bias"], out=w.h)
    return _model_step(_kernels(xp), xp, plan, state, w, tokens), state


def _check_int(name, value, low):
    if (not isinstance(value, numbers.Integral) or isinstance(value, bool)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


class Decoder:
    """Token-by-token decoding of a language model over buffers of its own.

    Holds the recurrent state, the token ids, every intermediate of a step and
    the logits in arrays made once, so that a step allocates nothing: on the
    GPU the step is captured as a CUDA graph at its second call and replayed
    from then on (:class:`~numba_mamba.graphs.CapturedStep`), and
    :meth:`generate` chooses each next token on the device, one graph replay
    per token.  On NumPy parameters the same steps run eagerly.

    Parameters
    ----------
    params : dict
        The model's parameters (NumPy or CuPy, float32 or float64).  The
        decoder reads these arrays at every step, not copies: an update in
        place (as :class:`~numba_mamba.optim.AdamW` makes) is seen by the next
        step once :meth:`refresh` has recomputed what is derived from them;
        parameters replaced by new arrays need a new decoder.
    config : MambaConfig
        With the language-model head.
    batch_size : int, optional
        Sequences decoded side by side (1).
    graph : {'auto', True, False}, optional
        As :class:`~numba_mamba.graphs.CapturedStep`: capture on the GPU,
        warn and run eagerly where the capture fails ('auto'); raise instead
        (True); never capture (False).

    Attributes
    ----------
    position : int
        Tokens consumed since the last :meth:`reset`.
    state : InferenceState
        The decoder's state arrays (updated in place by every call).

    Notes
    -----
    Token ids given on the GPU to :meth:`step` are not checked against the
    vocabulary (that would wait for the device): an id outside ``[0, V)`` is
    read as the nearest valid one.  NumPy ids are checked.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_mamba import inference, models
    >>> cfg = models.MambaConfig(d_model=16, n_layers=3, vocab_size=20, d_state=8)
    >>> dec = inference.Decoder(models.init_params(cfg, dtype=np.float64), cfg, batch_size=2)
    >>> prompt = np.array([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])
    >>> full, _ = models.model_forward(prompt, dec.params, cfg)
    >>> _ = dec.prefill(prompt[:, :2]), dec.prefill(prompt[:, 2:4])  # a prompt in pieces
    >>> bool(np.allclose(dec.step(prompt[:, 4]), full[:, 4])), dec.position
    (True, 5)
    >>> dec.generate(prompt, n_new=4, temperature=0.8, top_k=5, seed=1).shape
    (2, 9)
    """

    def __init__(self, params, config, batch_size=1, graph="auto"):
        if config.head != "lm":
            raise ValueError("Decoder needs a language-model config (vocab_size given), got a "
                             "regression config")
        self.batch_size = _check_int("batch_size", batch_size, 1)
        check_graph_mode(graph)
        xp = array_namespace(**{k.replace(".", "_"): v for k, v in params.items()})
        dtype = params["norm_f.weight"].dtype
        bad = [k for k, v in params.items() if v.dtype != dtype]
        if dtype.name not in ("float32", "float64") or bad:
            raise TypeError(f"params must all be float32 or all float64, got {dtype} for "
                            f"norm_f.weight and other dtypes for {bad}")
        self.params, self.config, self._xp = params, config, xp
        self._k, self._s = _kernels(xp), _sampler(xp)
        self._plan = _Plan(params, config, xp)
        Bt = self.batch_size
        self.state = init_state(Bt, params, config)
        self._work = _work(xp, Bt, config, dtype)
        self._tokens = xp.zeros(Bt, np.int64)
        # the choice's settings and counters, read by the kernels from memory
        self._temperature = xp.zeros(1, dtype)
        self._ints = xp.zeros(2, np.int64)  # [seed, top_k]
        self._counter = xp.zeros(Bt, np.int64)
        self._hist = xp.zeros((Bt, 1), np.int64)  # generated tokens (grown as needed)
        self._graph = graph
        self._step = CapturedStep(self._forward, graph, xp=xp)
        self._next = CapturedStep(self._forward_and_choose, graph, xp=xp)
        self.position = 0

    # -- the captured work
    def _forward(self):
        return _model_step(self._k, self._xp, self._plan, self.state, self._work, self._tokens)

    def _choose(self):
        self._s.choose(self._work.head, self._temperature, self._ints, self._counter,
                       self._tokens, self._hist)

    def _forward_and_choose(self):
        self._forward()
        self._choose()

    # -- public
    def reset(self):
        """Zero the state (the start of new sequences); ``position`` becomes 0."""
        for a in self.state.conv + self.state.ssm:
            a.fill(0)
        self.position = 0

    def refresh(self):
        """Recompute what the decoder derives from the parameters (``A =
        -exp(A_log)`` per layer) after they were changed in place."""
        self._plan.refresh(self._xp)

    @property
    def captured(self):
        """True once :meth:`step` replays a CUDA graph."""
        return self._step.captured

    def _check_tokens(self, name, tokens, ndim):
        xp = self._xp
        host = isinstance(tokens, np.ndarray)
        if not host and not (xp is not np and is_cupy_array(tokens)):
            raise TypeError(f"{name} must be a NumPy{' or CuPy' if xp is not np else ''} array "
                            f"of token ids, got {type(tokens).__name__}")
        shape = "(batch_size,)" if ndim == 1 else "(batch_size, length)"
        if tokens.ndim != ndim or tokens.shape[0] != self.batch_size or (
                ndim == 2 and tokens.shape[1] < 1):
            raise ValueError(f"{name} must have shape {shape} with batch_size "
                             f"{self.batch_size}{' and length >= 1' if ndim == 2 else ''}, "
                             f"got {tuple(tokens.shape)}")
        if tokens.dtype.kind not in "iu":
            raise TypeError(f"{name} must have an integer dtype, got {tokens.dtype}")
        V = self.config.vocab_size
        if host and tokens.size and (tokens.min() < 0 or tokens.max() >= V):
            raise ValueError(f"{name} must lie in [0, {V}) (vocab_size), got values in "
                             f"[{tokens.min()}, {tokens.max()}]")
        return tokens if xp is np or not host else xp.asarray(tokens)

    def prefill(self, tokens):
        """Consume a prompt, or a piece of one, from the current state.

        Runs the parallel forward of the blocks over ``tokens`` continuing
        from the state (so a long prompt can be fed in pieces), keeps the
        state after its last position and computes the logits of that
        position only.

        Parameters
        ----------
        tokens : integer array, shape (batch_size, L), L >= 1

        Returns
        -------
        logits : array, shape (batch_size, vocab_size)
            The next token's logits; the decoder's buffer, which the next
            :meth:`step` overwrites.
        """
        tokens = self._check_tokens("tokens", tokens, 2)
        xp, plan, state = self._xp, self._plan, self.state
        h, _ = embedding_forward(tokens, plan.embedding)  # (Bt, L, dm)
        continued = self.position > 0
        for i, p in enumerate(plan.layers):
            hn, _ = rmsnorm_forward(h, plan.norms[i], plan.eps)
            o, cache = mamba_block_forward(
                hn, p, (state.conv[i], state.ssm[i]) if continued else None)
            h = h + o
            conv, ssm = block_state(cache)
            state.conv[i][...] = conv
            state.ssm[i][...] = ssm
        hf, _ = rmsnorm_forward(h[:, -1], plan.norm_f, plan.eps)
        gemm(xp, hf, plan.head_w.T, out=self._work.head)
        self.position += tokens.shape[1]
        return self._work.head

    def step(self, tokens):
        """Consume one token per sequence; return the next token's logits.

        Parameters
        ----------
        tokens : integer array, shape (batch_size,)

        Returns
        -------
        logits : array, shape (batch_size, vocab_size)
            The decoder's buffer: the next :meth:`step` overwrites it.
        """
        tokens = self._check_tokens("tokens", tokens, 1)
        self._tokens[...] = tokens
        self._step()
        self.position += 1
        return self._work.head

    def generate(self, prompt, n_new, temperature=0.0, top_k=None, seed=0):
        """Continue token sequences, each next token chosen on the device.

        Resets the state, consumes ``prompt`` (:meth:`prefill`) and chooses
        ``n_new`` tokens, each from the logits of the step before: the most
        likely (``temperature`` 0), or drawn from ``softmax(logits /
        temperature)`` restricted to the ``top_k`` largest logits (ties with
        the ``top_k``-th included), with counter-based random numbers of
        ``seed`` (``numba_mamba/_cpu_sample.py`` has the rule).  On the GPU
        each token after the first is one graph replay; nothing waits for the
        device until the result is read.  Afterwards ``position`` is
        ``L0 + n_new - 1``: the last token is chosen, not consumed.

        Parameters
        ----------
        prompt : integer array, shape (batch_size, L0), L0 >= 1
        n_new : int
            Tokens to generate (>= 0).
        temperature : float, optional
            0 (default): greedy; > 0: sampled.
        top_k : int, optional
            Sample among the ``top_k`` (>= 1) largest logits only.
        seed : int, optional
            Of the random numbers (any integer; taken modulo 2**64).

        Returns
        -------
        tokens : integer array, shape (batch_size, L0 + n_new)
            The prompt followed by the new tokens, of the prompt's dtype and on
            its device.
        """
        n_new = _check_int("n_new", n_new, 0)
        if not isinstance(temperature, numbers.Real) or not 0 <= temperature < np.inf:
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
        k = 0 if top_k is None else _check_int("top_k", top_k, 1)
        if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        xp = self._xp
        self.reset()
        self.prefill(prompt)
        if n_new == 0:
            return prompt.copy()
        if self._hist.shape[1] < n_new:  # a new buffer: the choosing step is captured anew
            self._hist = xp.zeros((self.batch_size, max(64, 1 << (n_new - 1).bit_length())),
                                  np.int64)
            self._next = CapturedStep(self._forward_and_choose, self._graph, xp=xp)
        self._temperature.fill(temperature)
        seed = int(seed) % 2 ** 64  # (as the kernels' uint64, stored in an int64)
        self._ints[...] = xp.asarray(np.array([seed - (seed >> 63 << 64), k], np.int64))
        self._counter.fill(0)
        self._choose()  # the first new token, from the prompt's logits
        for _ in range(n_new - 1):
            self._next()
            self.position += 1
        new = self._hist[:, :n_new].astype(prompt.dtype)
        if isinstance(prompt, np.ndarray):
            return np.concatenate([prompt, new if xp is np else new.get()], axis=1)
        return xp.concatenate([prompt, new], axis=1)


def generate(prompt, params, config, n_new, temperature=0.0, top_k=None, seed=0, graph="auto"):
    """Continue token sequences: :meth:`Decoder.generate` of a new :class:`Decoder`.

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
        Of the counter-based random numbers (a Generator gives one integer).
    graph : {'auto', True, False}, optional
        As :class:`Decoder`.

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
    _check_int("n_new", n_new, 0)
    if isinstance(seed, np.random.Generator):
        seed = int(seed.integers(0, 2 ** 63))
    if getattr(prompt, "ndim", 0) != 2:
        raise ValueError(f"prompt must have shape (batch, length), got "
                         f"{tuple(getattr(prompt, 'shape', ()))}")
    dec = Decoder(params, config, batch_size=prompt.shape[0], graph=graph)
    return dec.generate(prompt, n_new, temperature=temperature, top_k=top_k, seed=seed)
