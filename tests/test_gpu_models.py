"""Layers, block, model, optimizer and inference on CuPy arrays (GPU), and against PyTorch.

Runs only where CuPy sees a CUDA GPU (marker ``gpu``).  Each GPU result is
compared with the CPU path on the same inputs (the CPU path is checked
against finite differences in ``test_layers.py`` / ``test_models.py``); the
PyTorch tests build the same block from torch operations (autograd, a plain
sequential scan) with the same weights and compare forward and gradients.
"""

import numpy as np
import pytest

from numba_mamba import inference, layers, models
from numba_mamba.checkpoint import load_checkpoint, save_checkpoint
from numba_mamba.optim import AdamW
from tests.gpu import gpu_module

cupy, _HAVE_GPU, pytestmark = gpu_module()

# (rtol, atol) of float32 GPU vs CPU, and of float64
TOL32 = dict(rtol=2e-4, atol=2e-5)
TOL64 = dict(rtol=1e-10, atol=1e-12)


def _gpu(tree):
    if isinstance(tree, dict):
        return {k: _gpu(v) for k, v in tree.items()}
    return None if tree is None else cupy.asarray(tree)


def assert_close(name, got, want, rtol, atol, scale_atol=True):
    got = cupy.asnumpy(got) if isinstance(got, cupy.ndarray) else np.asarray(got)
    want = cupy.asnumpy(want) if isinstance(want, cupy.ndarray) else np.asarray(want)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    err = np.max(np.abs(got.astype(np.float64) - want)) if want.size else 0.0
    scale = np.max(np.abs(want)) if (want.size and scale_atol) else 1.0
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol * max(scale, 1.0),
                               err_msg=f"{name}: max abs error {err:.3g}")


# ---------------------------------------------------------------- layers


@pytest.mark.parametrize("L", [5, 2051])
def test_conv1d_gpu_writes_dx_into_a_channel_range_of_dx_out(L):
    rng = np.random.default_rng(L + 1)
    x = cupy.asarray(rng.standard_normal((2, 40, L)).astype(np.float32))
    w = cupy.asarray(rng.standard_normal((40, 4)).astype(np.float32))
    out, cache = layers.conv1d_forward(x, w, None, activation="silu")
    dout = cupy.asarray(rng.standard_normal(out.shape).astype(np.float32))
    dx, dw, _ = layers.conv1d_backward(dout, cache)
    joint = cupy.full((2, 100, L), np.nan, np.float32)
    dx2, dw2, _ = layers.conv1d_backward(dout, cache, dx_out=joint, dx_channel=50)
    assert cupy.array_equal(dx2, dx) and cupy.array_equal(joint[:, 50:90], dx)
    assert bool(cupy.isnan(joint[:, :50]).all()) and bool(cupy.isnan(joint[:, 90:]).all())
    assert cupy.array_equal(dw2, dw)


@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("L", [3, 128, 131, 2051])
def test_conv1d_gpu_matches_cpu(activation, bias, L):
    rng = np.random.default_rng(L)
    x = rng.standard_normal((3, 40, L)).astype(np.float32)
    w = rng.standard_normal((40, 4)).astype(np.float32)
    b = rng.standard_normal(40).astype(np.float32) if bias else None
    R = rng.standard_normal(x.shape).astype(np.float32)
    out, cache = layers.conv1d_forward(x, w, b, activation=activation)
    gout, gcache = layers.conv1d_forward(cupy.asarray(x), cupy.asarray(w), _gpu(b),
                                         activation=activation)
    assert isinstance(gout, cupy.ndarray) and gout.dtype == np.float32
    assert_close("out", gout, out, **TOL32)
    for name, g, c in zip(("dx", "dweight", "dbias"),
                          layers.conv1d_backward(cupy.asarray(R), gcache),
                          layers.conv1d_backward(R, cache)):
        if c is None:
            assert g is None
        else:
            assert_close(name, g, c, **TOL32)


@pytest.mark.parametrize("name", ["silu", "softplus"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_activations_gpu_match_cpu(name, dtype):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((7, 1000)) * 8).astype(dtype)
    R = rng.standard_normal(x.shape).astype(dtype)
    fwd, bwd = getattr(layers, f"{name}_forward"), getattr(layers, f"{name}_backward")
    out, cache = fwd(x)
    gout, gcache = fwd(cupy.asarray(x))
    tol = TOL32 if dtype == np.float32 else TOL64
    assert_close("out", gout, out, **tol)
    assert_close("dx", bwd(cupy.asarray(R), gcache), bwd(R, cache), **tol)


def test_linear_rmsnorm_embedding_gpu_match_cpu():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 9, 6)).astype(np.float32)
    w = rng.standard_normal((5, 6)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    for axis, xin in ((-1, x), (-2, np.ascontiguousarray(x.transpose(0, 2, 1)))):
        out, c = layers.linear_forward(xin, w, b, axis=axis)
        gout, gc = layers.linear_forward(cupy.asarray(xin), cupy.asarray(w), cupy.asarray(b),
                                         axis=axis)
        assert_close("linear", gout, out, **TOL32)
        R = rng.standard_normal(out.shape).astype(np.float32)
        for g, cg in zip(layers.linear_backward(cupy.asarray(R), gc),
                         layers.linear_backward(R, c)):
            assert_close("linear grad", g, cg, **TOL32)
    nw = rng.standard_normal(6).astype(np.float32)
    out, c = layers.rmsnorm_forward(x, nw)
    gout, gc = layers.rmsnorm_forward(cupy.asarray(x), cupy.asarray(nw))
    assert_close("rmsnorm", gout, out, **TOL32)
    R = rng.standard_normal(x.shape).astype(np.float32)
    for g, cg in zip(layers.rmsnorm_backward(cupy.asarray(R), gc), layers.rmsnorm_backward(R, c)):
        assert_close("rmsnorm grad", g, cg, **TOL32)
    ids = rng.integers(0, 7, (3, 11))
    E = rng.standard_normal((7, 6)).astype(np.float32)
    out, c = layers.embedding_forward(ids, E)
    gout, gc = layers.embedding_forward(cupy.asarray(ids), cupy.asarray(E))
    assert_close("embedding", gout, out, **TOL32)
    R = rng.standard_normal(out.shape).astype(np.float32)
    assert_close("dE", layers.embedding_backward(cupy.asarray(R), gc),
                 layers.embedding_backward(R, c), **TOL32)


# ---------------------------------------------------------------- block and model


@pytest.mark.parametrize("block", ["mamba", "lti"])
def test_block_gpu_matches_cpu_float32(block):
    cfg = models.MambaConfig(d_model=64, n_layers=1, vocab_size=5, d_state=16, block=block)
    p = models.layer_params(models.init_params(cfg, seed=0), 0)
    rng = np.random.default_rng(2)
    u = rng.standard_normal((2, 300, 64)).astype(np.float32)
    R = rng.standard_normal(u.shape).astype(np.float32)
    out, c = models.mamba_block_forward(u, p)
    gout, gc = models.mamba_block_forward(cupy.asarray(u), _gpu(p))
    assert_close("out", gout, out, **TOL32)
    du, g = models.mamba_block_backward(R, c)
    gdu, gg = models.mamba_block_backward(cupy.asarray(R), gc)
    assert_close("du", gdu, du, 1e-3, 1e-4)
    for k in g:
        assert_close(k, gg[k], g[k], 1e-3, 1e-4)


def test_model_gpu_matches_cpu_float64():
    cfg = models.MambaConfig(d_model=16, n_layers=2, vocab_size=23, d_state=8,
                             tie_embeddings=False)
    params = models.init_params(cfg, seed=1, dtype=np.float64)
    tokens = np.random.default_rng(3).integers(0, 23, (2, 50))
    loss, grads = models.loss_and_grads(tokens[:, :-1], tokens[:, 1:], params, cfg)
    gloss, ggrads = models.loss_and_grads(cupy.asarray(tokens[:, :-1]),
                                          cupy.asarray(tokens[:, 1:]), _gpu(params), cfg)
    assert abs(gloss - loss) < 1e-12 * abs(loss)
    for k in grads:
        assert isinstance(ggrads[k], cupy.ndarray)
        assert_close(k, ggrads[k], grads[k], 1e-9, 1e-11)


@pytest.mark.parametrize("block", ["mamba", "lti"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_model_with_dtau_gpu_matches_cpu(block, dtype):
    cfg = models.MambaConfig(d_model=32, n_layers=2, d_input=3, d_output=2, d_state=8,
                             block=block)
    params = models.init_params(cfg, seed=6, dtype=dtype)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 200, 3)).astype(dtype)
    dtau = rng.uniform(0.0, 3.0, (3, 200)).astype(dtype)
    R = rng.standard_normal((3, 200, 2)).astype(dtype)
    out, c = models.model_forward(x, params, cfg, dtau=dtau)
    gout, gc = models.model_forward(cupy.asarray(x), _gpu(params), cfg, dtau=cupy.asarray(dtau))
    assert isinstance(gout, cupy.ndarray) and gout.dtype == dtype
    tol = TOL32 if dtype == np.float32 else TOL64
    gtol = (1e-3, 1e-4) if dtype == np.float32 else (1e-9, 1e-11)
    assert_close("out", gout, out, **tol)
    dx, g = models.model_backward(R, c)
    gdx, gg = models.model_backward(cupy.asarray(R), gc)
    assert_close("dinputs", gdx, dx, *gtol)
    for k in g:
        assert_close(k, gg[k], g[k], *gtol)
    with pytest.raises(TypeError, match=r"^dtau must be a cupy array like the inputs, got "
                                        r"numpy\.ndarray$"):
        models.model_forward(cupy.asarray(x), _gpu(params), cfg, dtau=dtau)


@pytest.mark.parametrize("block", ["mamba", "lti"])
def test_gpu_step_equals_gpu_parallel_forward_and_cpu_step(block):
    cfg = models.MambaConfig(d_model=32, n_layers=2, vocab_size=17, d_state=8, block=block)
    params = _gpu(models.init_params(cfg, seed=4))
    tokens = cupy.asarray(np.random.default_rng(5).integers(0, 17, (3, 20)))
    full, final = inference.prefill(tokens, params, cfg)
    _, state = inference.prefill(tokens[:, :7], params, cfg)
    outs = [inference.step(tokens[:, t], state, params, cfg)[0] for t in range(7, 20)]
    assert_close("step outputs", cupy.stack(outs, 1), full[:, 7:], **TOL32)
    for i in range(cfg.n_layers):
        assert_close("conv", state.conv[i], final.conv[i], **TOL32)
        assert_close("ssm", state.ssm[i], final.ssm[i], **TOL32)
    cpu_params = {k: cupy.asnumpy(v) for k, v in params.items()}
    cpu_out = inference.generate(cupy.asnumpy(tokens[:, :5]), cpu_params, cfg, n_new=5)
    gpu_out = inference.generate(tokens[:, :5], params, cfg, n_new=5)
    # greedy choices agree unless two logits tie within float32 noise (not the case here)
    np.testing.assert_array_equal(cupy.asnumpy(gpu_out), cpu_out)


def test_adamw_and_checkpoint_on_gpu(tmp_path):
    cfg = models.MambaConfig(d_model=16, n_layers=1, d_input=2, d_output=1, d_state=4)
    params = models.init_params(cfg, seed=0, dtype=np.float64)
    gparams = _gpu(params)
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 30, 2))
    y = rng.standard_normal((2, 30, 1))
    opt, gopt = AdamW(lr=1e-2), AdamW(lr=1e-2)
    for _ in range(3):
        _, g = models.loss_and_grads(x, y, params, cfg)
        opt.step(params, g)
        _, gg = models.loss_and_grads(cupy.asarray(x), cupy.asarray(y), gparams, cfg)
        gopt.step(gparams, gg)
    for k in params:
        assert_close(k, gparams[k], params[k], 1e-9, 1e-12)
    path = tmp_path / "gpu.npz"
    save_checkpoint(path, gparams, cfg, gopt, step=3)
    ck = load_checkpoint(path, xp=cupy)
    for k in gparams:
        assert isinstance(ck.params[k], cupy.ndarray)
        assert cupy.asnumpy(ck.params[k]).tobytes() == cupy.asnumpy(gparams[k]).tobytes()


# ---------------------------------------------------------------- PyTorch comparison


def _torch_block(torch, u, p):
    """The Mamba block from torch operations: linear, grouped conv1d, softplus, a sequential scan."""
    F = torch.nn.functional
    di = p["in_proj.weight"].shape[0] // 2
    W = p["conv1d.weight"].shape[1]
    R = p["dt_proj.weight"].shape[1]
    N = p["A_log"].shape[1]
    L = u.shape[1]
    xz = u @ p["in_proj.weight"].T  # (b, l, 2di)
    x, z = xz[..., :di].transpose(1, 2), xz[..., di:].transpose(1, 2)  # (b, di, l)
    x = F.conv1d(x, p["conv1d.weight"][:, None, :], p["conv1d.bias"], padding=W - 1,
                 groups=di)[..., :L]
    x = F.silu(x)
    x_dbl = x.transpose(1, 2) @ p["x_proj.weight"].T  # (b, l, R + 2N)
    dt, B, C = x_dbl[..., :R], x_dbl[..., R:R + N], x_dbl[..., R + N:]
    dt = F.softplus(dt @ p["dt_proj.weight"].T + p["dt_proj.bias"])  # (b, l, di)
    A = -torch.exp(p["A_log"])
    h = torch.zeros(u.shape[0], di, N, dtype=u.dtype, device=u.device)
    ys = []
    for t in range(L):
        d = dt[:, t, :, None]  # (b, di, 1)
        h = torch.exp(d * A) * h + d * B[:, t, None, :] * x[:, :, t, None]
        ys.append((h * C[:, t, None, :]).sum(-1))
    y = torch.stack(ys, dim=-1) + p["D"][:, None] * x
    y = y * F.silu(z)
    return y.transpose(1, 2) @ p["out_proj.weight"].T


@pytest.mark.parametrize("dtype,rtol,atol", [(np.float64, 1e-9, 1e-11), (np.float32, 1e-3, 1e-4)])
def test_block_matches_torch_forward_and_gradients(dtype, rtol, atol):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    cfg = models.MambaConfig(d_model=32, n_layers=2, vocab_size=5, d_state=8)
    rng = np.random.default_rng(7)
    p = models.layer_params(models.init_params(cfg, seed=7, dtype=np.float64), 0)
    p = {k: (v + 0.1 * rng.standard_normal(v.shape)).astype(dtype) for k, v in p.items()}
    u = rng.standard_normal((2, 64, 32)).astype(dtype)
    R = rng.standard_normal(u.shape).astype(dtype)

    out, cache = models.mamba_block_forward(cupy.asarray(u), _gpu(p))
    du, grads = models.mamba_block_backward(cupy.asarray(R), cache)

    tp = {k: torch.tensor(v, device="cuda", requires_grad=True) for k, v in p.items()}
    tu = torch.tensor(u, device="cuda", requires_grad=True)
    tout = _torch_block(torch, tu, tp)
    (tout * torch.tensor(R, device="cuda")).sum().backward()

    assert_close("out", out, tout.detach().cpu().numpy().astype(np.float64), rtol, atol)
    assert_close("du", du, tu.grad.cpu().numpy().astype(np.float64), rtol, atol)
    for k in p:
        assert_close(k, grads[k], tp[k].grad.cpu().numpy().astype(np.float64), rtol, atol)
