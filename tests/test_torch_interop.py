"""numba_mamba.torch: selective_scan_fn (eager and as a custom op), the Mamba module.

CPU tests run wherever torch is installed (skipped elsewhere); the tests
marked ``gpu`` need CUDA tensors, CuPy and a GPU.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import numba_mamba as nm  # noqa: E402
from numba_mamba import models, reference  # noqa: E402
from numba_mamba.torch import Mamba, selective_scan_fn  # noqa: E402
from tests.scan_cases import TOLERANCES, assert_close, make_inputs  # noqa: E402

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
OP = torch.ops.numba_mamba.selective_scan


def _tensors(kw, device="cpu", dtype=None, grad=False):
    """make_inputs' arrays as tensors (None stays None), in the order of NAMES."""
    out = []
    for name in NAMES:
        a = kw[name]
        if a is None:
            out.append(None)
            continue
        t = torch.tensor(a, device=device)
        if dtype is not None:
            t = t.to(dtype)
        out.append(t.requires_grad_(grad))
    return out


def _op(u, delta, A, B, C, D, z, delta_bias, initial_state, softplus):
    return OP(u, delta, A, B, C, D, z, delta_bias, initial_state, softplus)


def _eager(u, delta, A, B, C, D, z, delta_bias, initial_state, softplus):
    return selective_scan_fn(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                             delta_softplus=softplus, return_last_state=True,
                             initial_state=initial_state)


CASES = [
    dict(B_kind="var", C_kind="var", D=True, z=True, delta_bias=True, softplus=True,
         initial_state=True),
    dict(B_kind="const", C_kind="grouped", D=True, z=False, delta_bias=True, softplus=False,
         initial_state=True),
    dict(B_kind="grouped", C_kind="const", D=False, z=True, delta_bias=False, softplus=True,
         initial_state=False),
]


@pytest.mark.parametrize("path", [_eager, _op], ids=["eager", "custom_op"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_gradcheck_every_input(path, case):
    """float64 gradcheck of out and last_state in every tensor input, initial_state included."""
    kw = make_inputs(np.random.default_rng(case), Bt=2, Dc=4, L=7, N=3, G=2, **CASES[case])
    args = _tensors(kw, grad=True)
    softplus = kw["delta_softplus"]
    present = [t for t in args if t is not None]
    assert len(present) >= 6

    def f(*given):
        it = iter(given)
        full = [next(it) if t is not None else None for t in args]
        return path(*full, softplus)

    assert torch.autograd.gradcheck(f, present, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_forward_and_grads_match_reference(case):
    """Eager path and custom op give the float64 reference's out, last_state and gradients."""
    rng = np.random.default_rng(10 + case)
    kw = make_inputs(rng, Bt=2, Dc=4, L=33, N=5, G=2, **CASES[case])
    out_r, last_r, backward = reference.selective_scan_vjp(**kw)
    dout = rng.standard_normal(out_r.shape)
    dlast = rng.standard_normal(last_r.shape)
    want = backward(dout, dlast)
    for path in (_eager, _op):
        args = _tensors(kw, grad=True)
        out, last = path(*args, kw["delta_softplus"])
        torch.autograd.backward([out, last], [torch.tensor(dout), torch.tensor(dlast)])
        assert_close("out", out.detach(), out_r, 1e-10, 1e-10)
        assert_close("last_state", last.detach(), last_r, 1e-10, 1e-10)
        for name, t, g in zip(NAMES, args, want):
            assert (t is None) == (g is None), name
            if t is not None:
                assert_close("d" + name, t.grad, g, 1e-9, 1e-9)


def test_last_state_alone_carries_gradient():
    """A loss on last_state only (out unused) still reaches every input."""
    kw = make_inputs(np.random.default_rng(3), Bt=1, Dc=2, L=6, N=3, initial_state=True)
    for path in (_eager, _op):
        args = _tensors(kw, grad=True)
        _, last = path(*args, False)
        last.sum().backward()
        _, _, backward = reference.selective_scan_vjp(**kw)
        want = backward(np.zeros((1, 2, 6)), np.ones((1, 2, 3)))
        assert_close("dinitial_state", args[8].grad, want.dinitial_state, 1e-10, 1e-10)
        assert_close("du", args[0].grad, want.du, 1e-10, 1e-10)


def test_input_modified_in_place_before_backward_is_an_error():
    """As with any autograd op: an input changed in place after the forward makes the
    backward raise instead of computing gradients of other values."""
    kw = make_inputs(np.random.default_rng(15), Bt=1, Dc=2, L=6, N=3)
    for path in (_eager, _op):
        args = _tensors(kw, grad=True)
        delta = args[1] * 1  # a non-leaf input
        out, _ = path(args[0], delta, *args[2:], False)
        with torch.no_grad():
            delta.add_(1.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()


def test_mamba_ssm_semantics():
    """(batch, N, L) B/C equal one group; return_last_state's dtype; out in u's dtype."""
    kw = make_inputs(np.random.default_rng(4), Bt=2, Dc=4, L=9, N=3, dtype=np.float32,
                     D=True, z=True, delta_bias=True, softplus=True)
    u, delta, A, B, C, D, z, bias, _ = _tensors(kw)
    out3, last3 = selective_scan_fn(u, delta, A, B, C, D, z, bias, True, True)
    out4, last4 = selective_scan_fn(u, delta, A, B[:, None], C[:, None], D, z, bias, True, True)
    assert torch.equal(out3, out4) and torch.equal(last3, last4)
    assert out3.dtype == torch.float32 and last3.dtype == torch.float32
    assert last3.shape == (2, 4, 3)
    only = selective_scan_fn(u, delta, A, B, C, D, z, bias, True)
    assert isinstance(only, torch.Tensor) and torch.equal(only, out3)
    want = nm.selective_scan(*(t.numpy() for t in (u, delta, A, B, C, D, z, bias)),
                             delta_softplus=True)
    np.testing.assert_array_equal(out3.numpy(), want)


def test_cpu_zero_copy_inputs():
    """CPU tensors are read in place: the scan of a view sees the base tensor's values."""
    kw = make_inputs(np.random.default_rng(5), Bt=1, Dc=2, L=8, N=2)
    u, delta, A, B, C, *_ = _tensors(kw)
    from numba_mamba.torch import _to_numpy

    assert np.shares_memory(_to_numpy(u), u.numpy())
    wide = torch.zeros(1, 2, 16, dtype=torch.float64)
    wide[..., ::2] = u
    got = selective_scan_fn(wide[..., ::2], delta, A, B, C)  # a strided view
    np.testing.assert_array_equal(got.numpy(), selective_scan_fn(u, delta, A, B, C).numpy())


@pytest.mark.parametrize("dtype,tol", [(torch.float16, (3e-3, 5e-3)),
                                       (torch.bfloat16, (3e-2, 5e-2))])
def test_half_tensors_on_cpu(dtype, tol):
    """float16/bfloat16 tensors (bfloat16 through ml_dtypes) against the float64 reference
    of the same rounded inputs (tolerances of the reference project's half tests)."""
    if dtype == torch.bfloat16:
        pytest.importorskip("ml_dtypes")
    kw = make_inputs(np.random.default_rng(6), Bt=2, Dc=4, L=20, N=4, D=True, z=True,
                     delta_bias=True, softplus=True)
    args = _tensors(kw, dtype=dtype, grad=True)
    out, last = _eager(*args, True)
    assert out.dtype == dtype and last.dtype == torch.float32
    rounded = {n: None if t is None else t.detach().double().numpy() for n, t in zip(NAMES, args)}
    rounded["delta_softplus"] = True
    want, want_last, backward = reference.selective_scan_vjp(**rounded)
    assert_close("out", out.detach().double(), want, *tol)
    assert_close("last_state", last.detach(), want_last, *tol)
    out.double().sum().backward()
    grads = backward(np.ones_like(want))
    for name, t, g in zip(NAMES, args, grads):
        if t is not None:
            assert t.grad.dtype == dtype, name
            scale = np.abs(g).max()
            assert_close("d" + name, t.grad.double(), g, 5 * tol[0], 5 * tol[1] * scale)


def test_errors_name_the_argument():
    kw = make_inputs(np.random.default_rng(7), Bt=1, Dc=2, L=5, N=3)
    u, delta, A, B, C, *_ = _tensors(kw)
    with pytest.raises(TypeError, match="u must be a torch.Tensor, got ndarray"):
        selective_scan_fn(kw["u"], delta, A, B, C)
    with pytest.raises(TypeError, match="delta must have dtype .* got torch.int64"):
        selective_scan_fn(u, delta.long(), A, B, C)
    with pytest.raises(ValueError, match=r"A must have shape \(2, N\)"):
        selective_scan_fn(u, delta, A[:1], B, C)
    with pytest.raises(ValueError, match=r"C must have shape \(1, 3, 5\)"):
        selective_scan_fn(u, delta, A, B, C[..., :4])
    with pytest.raises(ValueError, match="meta"):
        selective_scan_fn(u, delta, A.to("meta"), B, C)


def test_opcheck():
    """torch.library's own checks of the op: schema, fake tensor, autograd registration,
    AOT dispatch."""
    kw = make_inputs(np.random.default_rng(8), Bt=2, Dc=4, L=6, N=3, G=2, B_kind="grouped",
                     D=True, z=True, delta_bias=True, softplus=True, initial_state=True)
    args = _tensors(kw, grad=True)
    torch.library.opcheck(OP, (*args, True))


def test_fake_tensor_shapes():
    """The fake implementation's outputs: u's shape and dtype, last_state in the compute dtype."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        u = torch.empty(3, 8, 11, dtype=torch.bfloat16)
        A = torch.empty(8, 5)
        B = torch.empty(3, 2, 5, 11, dtype=torch.bfloat16)
        out, last = OP(u, u, A, B, B, None, None, None, None, True)
        assert out.shape == (3, 8, 11) and out.dtype == torch.bfloat16
        assert last.shape == (3, 8, 5) and last.dtype == torch.float32
        out64, last64 = OP(u, u, A.double(), B, B, None, None, None, None, True)
        assert last64.dtype == torch.float64


def _compile_or_skip(fn):
    try:
        import torch._inductor  # noqa: F401
    except Exception as exc:  # pragma: no cover
        pytest.skip(f"torch.compile unavailable: {exc}")
    return torch.compile(fn, fullgraph=True)


def test_torch_compile_matches_eager():
    """A compiled function around selective_scan_fn (one graph, the op inside) gives the
    eager forward and gradients."""
    kw = make_inputs(np.random.default_rng(9), Bt=2, Dc=4, L=12, N=3, dtype=np.float32,
                     D=True, z=True, delta_bias=True, softplus=True, initial_state=True)

    def f(u, delta, A, B, C, D, z, delta_bias, h0):
        x = torch.tanh(u) * 2  # torch work around the op, fused by the compiler
        out, last = selective_scan_fn(x, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                      delta_softplus=True, return_last_state=True,
                                      initial_state=h0)
        return (out * out).sum() + last.sum()

    compiled = _compile_or_skip(f)
    eager_args = _tensors(kw, grad=True)
    comp_args = _tensors(kw, grad=True)
    want = f(*eager_args)
    want.backward()
    got = compiled(*comp_args)
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    for name, a, b in zip(NAMES, comp_args, eager_args):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5, msg=name)


# ---------------------------------------------------------------- the Mamba module


def test_mamba_module_names_and_init():
    """mamba-ssm's parameter names and shapes; its initialisation of A_log, D, dt bias."""
    torch.manual_seed(0)
    m = Mamba(d_model=20, d_state=6, d_conv=3, expand=2, dt_min=0.01, dt_max=0.05)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "A_log": (40, 6), "D": (40,), "in_proj.weight": (80, 20), "conv1d.weight": (40, 1, 3),
        "conv1d.bias": (40,), "x_proj.weight": (2 + 12, 40), "dt_proj.weight": (40, 2),
        "dt_proj.bias": (40,), "out_proj.weight": (20, 40)}
    torch.testing.assert_close(m.A_log[3], torch.log(torch.arange(1.0, 7.0)))
    dt = torch.nn.functional.softplus(m.dt_proj.bias)
    assert bool(((dt >= 0.01 - 1e-6) & (dt <= 0.05 + 1e-6)).all())
    assert m.A_log._no_weight_decay and m.D._no_weight_decay
    assert Mamba(16, bias=True).out_proj.bias is not None
    with pytest.raises(NotImplementedError):
        m(torch.zeros(1, 3, 20), inference_params=object())
    with pytest.raises(ValueError, match=r"hidden_states must have shape \(batch, length, 20\)"):
        m(torch.zeros(1, 3, 21))


@pytest.mark.parametrize("bias", [False, True])
def test_mamba_module_matches_our_block(bias):
    """The module's forward and autograd gradients equal mamba_block_forward/backward's."""
    cfg = models.MambaConfig(d_model=12, n_layers=1, vocab_size=5, d_state=4, d_conv=3,
                             proj_bias=bias)
    params = models.layer_params(models.init_params(cfg, seed=1, dtype=np.float64), 0)
    rng = np.random.default_rng(2)
    if bias:
        params["in_proj.bias"] = rng.standard_normal(params["in_proj.bias"].shape)
        params["out_proj.bias"] = rng.standard_normal(params["out_proj.bias"].shape)
    block = Mamba.from_params(params)
    assert block.A_log.dtype == torch.float64
    u = rng.standard_normal((2, 10, 12))
    dout = rng.standard_normal((2, 10, 12))
    want, cache = models.mamba_block_forward(u, params)
    du_want, grads_want = models.mamba_block_backward(dout, cache)
    tu = torch.tensor(u, requires_grad=True)
    got = block(tu)
    got.backward(torch.tensor(dout))
    assert_close("out", got.detach(), want, 1e-12, 1e-12)
    assert_close("du", tu.grad, du_want, 1e-10, 1e-10)
    named = dict(block.named_parameters())
    assert set(named) == set(grads_want)
    for name, g in grads_want.items():
        t = named[name].grad
        assert_close(name, t.reshape(g.shape), g, 1e-9, 1e-10)


def test_mamba_module_half_keeps_A_log_and_D_float32():
    """In bfloat16 the block keeps A_log and D in float32 (mamba-ssm) and stays near the
    float32 block with the same (rounded) weights."""
    pytest.importorskip("ml_dtypes")
    torch.manual_seed(2)
    half = Mamba(d_model=16, d_state=4, dtype=torch.bfloat16)
    assert half.A_log.dtype == half.D.dtype == torch.float32
    assert half.in_proj.weight.dtype == torch.bfloat16
    full = Mamba(d_model=16, d_state=4)
    full.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
    x = torch.randn(2, 24, 16).to(torch.bfloat16)
    y = half(x)
    assert y.dtype == torch.bfloat16
    want = full(x.float())
    scale = float(want.abs().max())
    torch.testing.assert_close(y.float(), want, rtol=3e-2, atol=5e-2 * scale)
    y.float().sum().backward()
    assert half.A_log.grad.dtype == torch.float32 and bool(half.A_log.grad.abs().sum() > 0)


def test_mamba_module_gradcheck():
    """gradcheck of the whole module in float64 (input and every parameter)."""
    torch.manual_seed(1)
    block = Mamba(d_model=4, d_state=2, d_conv=2, expand=1, dtype=torch.float64)
    x = torch.randn(1, 5, 4, dtype=torch.float64, requires_grad=True)
    params = tuple(block.parameters())
    names = [n for n, _ in block.named_parameters()]

    def f(x, *ps):
        return torch.func.functional_call(block, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-7)


# ---------------------------------------------------------------- GPU


def _cuda_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device for torch")
    pytest.importorskip("cupy")


# the reference project's half tolerances (out) and a half-rounding allowance for the
# gradients, as in tests/test_selective_scan.py; float32/float64: tests/scan_cases.TOLERANCES
HALF_TOLERANCES = {
    torch.float16: dict(out=(3e-3, 5e-3), grads=(5e-3, 1e-2)),
    torch.bfloat16: dict(out=(3e-2, 5e-2), grads=(5e-2, 1e-1)),
}


def _tol(dtype, kind):
    if dtype in HALF_TOLERANCES:
        return HALF_TOLERANCES[dtype]["out" if kind == "out" else "grads"]
    return TOLERANCES[np.dtype(str(dtype).removeprefix("torch."))][kind]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=str)
@pytest.mark.parametrize("shape", [(2, 8, 372, 4), (2, 1024, 100, 16)],
                         ids=["few-channels", "layer"])
def test_gpu_against_float64_reference(dtype, shape):
    """CUDA tensors of every dtype (halves as mamba-ssm passes them: A, D, delta_bias and
    initial_state float32): out, last_state and the gradients of every input against the
    float64 reference of the same rounded inputs."""
    _cuda_or_skip()
    Bt, Dc, L, N = shape
    kw = make_inputs(np.random.default_rng(11), Bt=Bt, Dc=Dc, L=L, N=N, G=2, D=True, z=True,
                     delta_bias=True, softplus=True, initial_state=True)
    args = _tensors(kw, device="cuda", dtype=dtype)
    if dtype in HALF_TOLERANCES:
        for i in (2, 5, 7, 8):  # A, D, delta_bias, initial_state
            args[i] = args[i].float()
    args = [t.requires_grad_(True) for t in args]
    out, last = _eager(*args, True)
    assert out.device.type == "cuda" and out.dtype == dtype
    rounded = {n: t.detach().double().cpu().numpy() for n, t in zip(NAMES, args)}
    want, want_last, backward = reference.selective_scan_vjp(**rounded, delta_softplus=True)
    assert_close("out", out.detach().double().cpu(), want, *_tol(dtype, "out"))
    assert_close("last_state", last.detach().double().cpu(), want_last, *_tol(dtype, "out"))
    rng = np.random.default_rng(12)
    dout = torch.tensor(rng.standard_normal(want.shape)).to(dtype)
    dlast = torch.tensor(rng.standard_normal(want_last.shape), dtype=torch.float32)
    torch.autograd.backward([out, last], [dout.cuda(), dlast.cuda()])
    grads = backward(dout.double().numpy(), dlast.double().numpy())
    for name, t, g in zip(NAMES, args, grads):
        assert t.grad.dtype == t.dtype, name
        kind = {"u": "du", "z": "du", "delta": "ddelta_z"}.get(name, "weights")
        assert_close("d" + name, t.grad.double().cpu(), g, *_tol(dtype, kind))


@pytest.mark.gpu
def test_gpu_runs_on_torch_current_stream():
    """On a non-default stream kept busy, the scan is queued behind torch's work on it (and
    its backward too): results are right without any synchronisation in between."""
    _cuda_or_skip()
    kw = make_inputs(np.random.default_rng(13), Bt=4, Dc=512, L=256, N=16, dtype=np.float32,
                     D=True, z=True, delta_bias=True, softplus=True)
    base = _tensors(kw, device="cuda")
    want_out, _ = _eager(*base, True)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(200_000_000)  # the stream is busy for a while
        args = [None if t is None else (t * 1).requires_grad_(True) for t in base]  # written late
        out, last = _eager(*args, True)
        out.backward(torch.ones_like(out))
        du = args[0].grad * 1
    stream.synchronize()
    # (float32 rounding apart, in case a reduction's order varies; a race is far off)
    torch.testing.assert_close(out.detach(), want_out, rtol=1e-5, atol=1e-6)
    base_grad = [None if t is None else t.detach().requires_grad_(True) for t in base]
    ref_out, _ = _eager(*base_grad, True)
    ref_out.backward(torch.ones_like(ref_out))
    torch.testing.assert_close(du, base_grad[0].grad, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_gpu_custom_op_and_compile():
    """The op and torch.compile on CUDA tensors match the eager path."""
    _cuda_or_skip()
    kw = make_inputs(np.random.default_rng(14), Bt=2, Dc=64, L=128, N=8, dtype=np.float32,
                     D=True, z=True, delta_bias=True, softplus=True, initial_state=True)
    args = _tensors(kw, device="cuda")
    want, want_last = _eager(*args, True)
    got, got_last = _op(*args, True)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.library.opcheck(OP, (*[t.requires_grad_(True) for t in args], True))

    def f(*a):
        out, last = _eager(*a, True)
        return out.square().sum() + last.sum()

    compiled = _compile_or_skip(f)
    e_args = [t.detach().clone().requires_grad_(True) for t in args]
    c_args = [t.detach().clone().requires_grad_(True) for t in args]
    f(*e_args).backward()
    compiled(*c_args).backward()
    for name, a, b in zip(NAMES, c_args, e_args):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.gpu
def test_gpu_mamba_module_matches_cpu():
    """The module on CUDA (float32) against the same module in float64 on the CPU."""
    _cuda_or_skip()
    torch.manual_seed(3)
    cpu = Mamba(d_model=64, d_state=16, dtype=torch.float64)
    gpu = Mamba(d_model=64, d_state=16, device="cuda")
    gpu.load_state_dict({k: v.float() for k, v in cpu.state_dict().items()})
    x = torch.randn(2, 200, 64, dtype=torch.float64)
    want = cpu(x)
    got = gpu(x.float().cuda())
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-3, atol=1e-4)
