"""The language model of :mod:`numba_mamba.models`, written with PyTorch operations.

For ``bench_steps.py``: the same arithmetic as ``numba_mamba.models`` (its
module docstring), so that a timing compares everything around the selective
scan, which both models take from this library: the PyTorch model calls
:func:`numba_mamba.selective_scan_vjp` inside a ``torch.autograd.Function``,
the tensors shared with CuPy through DLPack (with NumPy on the CPU).

- :class:`TorchMamba`: parameters copied from a ``numba_mamba`` parameter
  dict, ``forward(tokens) -> logits``, ``loss``, ``block`` (one Mamba block:
  ``bench_block.torch_block``, the block of ``benchmarks/bench_block.py``).
- :func:`make_train_step`: autograd, ``clip_grad_norm_``, ``torch.optim.AdamW``
  with the no-decay names of :func:`numba_mamba.optim.default_no_decay`.
- :class:`TorchDecoder`: one recurrent step of the whole model on static
  buffers (greedy next token chosen on the device, written back into the
  token buffer), run eagerly or captured with ``torch.cuda.CUDAGraph``.

torch is imported by the caller and passed in: it is no dependency of the package.
"""

import sys
from pathlib import Path

import numpy as np

import numba_mamba as nm
from numba_mamba.models import layer_params
from numba_mamba.optim import default_no_decay

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_block import torch_block  # noqa: E402  (the block in PyTorch, one copy)


def host(a):
    """A NumPy copy of a NumPy or CuPy array."""
    return a.get() if hasattr(a, "get") else np.asarray(a)


def bridge(torch, xp):
    """``(to_ours, to_torch)``: a tensor as an array of ``xp`` and back, sharing memory."""
    if xp is np:
        return (lambda t: t.detach().contiguous().numpy()), torch.from_numpy
    return (lambda t: xp.from_dlpack(t.detach().contiguous())), torch.from_dlpack


def scan_function(torch, xp):
    """``scan(u, delta, A, B, C, D, z, delta_bias)`` (softplus on): this library's
    scan and its hand-written backward as a ``torch.autograd.Function``."""
    to_ours, to_torch = bridge(torch, xp)

    class Scan(torch.autograd.Function):
        @staticmethod
        def forward(ctx, u, delta, A, B, C, D, z, delta_bias):
            out, _, backward = nm.selective_scan_vjp(
                to_ours(u), to_ours(delta), to_ours(A), to_ours(B), to_ours(C), D=to_ours(D),
                z=to_ours(z), delta_bias=to_ours(delta_bias), delta_softplus=True)
            ctx.backward_fn = backward
            return to_torch(out)

        @staticmethod
        def backward(ctx, dout):
            g = ctx.backward_fn(to_ours(dout))
            return tuple(to_torch(a) for a in (g.du, g.ddelta, g.dA, g.dB, g.dC, g.dD, g.dz,
                                                g.ddelta_bias))

    return Scan.apply


class TorchMamba:
    """The LM of ``numba_mamba.models`` (selective blocks, tied head) in PyTorch.

    Parameters
    ----------
    torch : module
    params : dict
        ``numba_mamba`` parameters (NumPy or CuPy); copied into new tensors.
    config : numba_mamba.models.MambaConfig
        A language model with selective blocks, tied embeddings, no
        projection biases (the defaults).
    device : str
        ``'cuda'`` or ``'cpu'``.
    xp : module
        ``cupy`` or ``numpy``: where the scan runs (the tensors' device).
    requires_grad : bool
    """

    def __init__(self, torch, params, config, device, xp, requires_grad=False):
        if config.head != "lm" or config.block != "mamba" or not config.tie_embeddings \
                or config.proj_bias or not config.conv_bias:
            raise ValueError(f"TorchMamba covers selective LMs with tied embeddings, conv bias "
                             f"and no projection biases, got {config}")
        self.torch, self.F, self.config = torch, torch.nn.functional, config
        self.params = {k: torch.tensor(host(v), device=device).requires_grad_(requires_grad)
                       for k, v in params.items()}
        self.scan = scan_function(torch, xp)

    def layer(self, i):
        """Block ``i``'s parameters under their local names."""
        return layer_params(self.params, i)

    def rmsnorm(self, x, weight):
        t = self.torch
        return x * (1 / t.sqrt((x * x).mean(-1, keepdim=True) + self.config.norm_eps)) * weight

    def block(self, u, p):
        """One Mamba block, ``u (Bt, L, d_model)`` -> ``(Bt, L, d_model)`` (``bench_block``'s)."""
        return torch_block(self.torch, self.scan, u, p)

    def forward(self, tokens):
        """Logits ``(Bt, L, vocab)`` of integer ``tokens (Bt, L)``."""
        p = self.params
        h = p["embedding.weight"][tokens]
        for i in range(self.config.n_layers):
            h = h + self.block(self.rmsnorm(h, p[f"layers.{i}.norm.weight"]), self.layer(i))
        return self.F.linear(self.rmsnorm(h, p["norm_f.weight"]), p["embedding.weight"])

    def loss(self, tokens, targets):
        """Mean cross-entropy over all positions."""
        logits = self.forward(tokens)
        return self.F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def make_train_step(model, lr, betas, eps, weight_decay, max_grad_norm):
    """``step(tokens, targets) -> loss`` (a 0-d tensor, not synchronized): zero the
    gradients, forward, loss, backward, ``clip_grad_norm_``, ``AdamW.step``."""
    torch = model.torch
    named = list(model.params.items())
    groups = [{"params": [p for n, p in named if not default_no_decay(n)],
               "weight_decay": weight_decay},
              {"params": [p for n, p in named if default_no_decay(n)], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
    params = [p for _, p in named]

    def step(tokens, targets):
        opt.zero_grad(set_to_none=True)
        loss = model.loss(tokens, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        return loss.detach()

    return step


class TorchDecoder:
    """One recurrent step of a :class:`TorchMamba` on static buffers.

    ``token (Bt,)`` holds the input token; :meth:`run` computes the logits
    ``(Bt, vocab)`` of one step, advances the conv and SSM states in place and
    writes the greedy next token into ``token``, so that steps chain on the
    device.  :meth:`capture` records :meth:`compute` as a CUDA graph; after it
    :meth:`run` replays the graph.
    """

    def __init__(self, model, batch):
        torch, cfg = model.torch, model.config
        dev = model.params["norm_f.weight"].device
        dtype = model.params["norm_f.weight"].dtype
        self.model, self.torch = model, torch
        self.token = torch.zeros(batch, dtype=torch.int64, device=dev)
        self.conv = [torch.zeros(batch, cfg.d_inner, cfg.d_conv, dtype=dtype, device=dev)
                     for _ in range(cfg.n_layers)]
        self.ssm = [torch.zeros(batch, cfg.d_inner, cfg.d_state, dtype=dtype, device=dev)
                    for _ in range(cfg.n_layers)]
        with torch.no_grad():
            self.layers = [(model.params[f"layers.{i}.norm.weight"].detach(),
                            {k: v.detach() for k, v in model.layer(i).items()},
                            -torch.exp(model.params[f"layers.{i}.mixer.A_log"].detach()))
                           for i in range(cfg.n_layers)]
        self.emb = model.params["embedding.weight"].detach()
        self.norm_f = model.params["norm_f.weight"].detach()
        self.graph = None
        self.logits = None

    def reset(self):
        """Zero states (the state before the first token)."""
        for s in self.conv + self.ssm:
            s.zero_()

    def compute(self):
        """One step, eagerly; returns the logits."""
        torch, F, m = self.torch, self.model.F, self.model
        with torch.no_grad():
            h = self.emb[self.token]  # (Bt, d_model)
            for i, (norm_w, p, A) in enumerate(self.layers):
                di = A.shape[0]
                R = p["dt_proj.weight"].shape[1]
                N = A.shape[1]
                xz = F.linear(m.rmsnorm(h, norm_w), p["in_proj.weight"])  # (Bt, 2 di)
                x, z = xz[:, :di], xz[:, di:]
                conv = self.conv[i]  # (Bt, di, W), newest last
                conv.copy_(torch.roll(conv, -1, dims=-1))
                conv[:, :, -1] = x
                xc = F.silu((conv * p["conv1d.weight"]).sum(-1) + p["conv1d.bias"])
                x_dbl = F.linear(xc, p["x_proj.weight"])  # (Bt, R + 2N)
                dt = F.linear(x_dbl[:, :R], p["dt_proj.weight"])  # (Bt, di)
                B, C = x_dbl[:, R:R + N], x_dbl[:, R + N:]
                delta = F.softplus(dt + p["dt_proj.bias"])
                ssm = self.ssm[i]  # (Bt, di, N)
                ssm.mul_(torch.exp(delta[..., None] * A))
                ssm.add_((delta * xc)[..., None] * B[:, None, :])
                y = (ssm * C[:, None, :]).sum(-1) + p["D"] * xc
                h = h + F.linear(y * F.silu(z), p["out_proj.weight"])
            logits = F.linear(m.rmsnorm(h, self.norm_f), self.emb)
            self.token.copy_(logits.argmax(-1))
        return logits

    def capture(self, warmup=3):
        """Record :meth:`compute` as a CUDA graph (the warm-up steps change the state)."""
        torch = self.torch
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self.compute()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.compute()

    def run(self):
        """One step (graph replay once captured); returns the logits buffer."""
        if self.graph is None:
            self.logits = self.compute()
        else:
            self.graph.replay()
        return self.logits

    def feed(self, tokens):
        """One step on given ``tokens (Bt,)``; returns the logits."""
        self.token.copy_(tokens)
        return self.run()
