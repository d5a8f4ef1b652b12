"""``settings.deterministic`` on the GPU: the state engine's backward stores its
partial sums and adds them in a fixed order, so two runs of the same backward,
and of the same training steps, give the same bits; and the result agrees with
the default (atomic) backward to rounding.
"""

import numpy as np
import pytest

import numba_mamba as nm
from numba_mamba import models
from numba_mamba.cuda_kernels.settings import settings
from numba_mamba.optim import AdamW
from numba_mamba.training import TrainStep
from tests.gpu import gpu_module
from tests.scan_cases import half_dtype, make_inputs
from tests.test_train_step import _batches as cpu_batches

cupy, _HAVE_GPU, pytestmark = gpu_module()

NAMES = ("du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias", "dinitial_state")


def _device(kw, dtype):
    return {k: cupy.asarray(v.astype(dtype)) if isinstance(v, np.ndarray) else v
            for k, v in kw.items()}


def _grads(kw, dout, dlast):
    _, _, backward = nm.selective_scan_vjp(**kw)
    g = backward(dout, dlast)
    return [None if x is None else cupy.asnumpy(x) for x in g]


# (Bt, D, L, N, B and C kinds, G): a Mamba-like layer (one group, many blocks per
# group), grouped B/C, few channels (the sequence split into segments), N = 32
SHAPES = [(4, 256, 512, 16, "var", "var", 1), (2, 64, 300, 8, "grouped", "var", 4),
          (1, 16, 4096, 16, "var", "const", 1), (2, 128, 256, 32, "grouped", "grouped", 2)]


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
@pytest.mark.parametrize("shape", SHAPES,
                         ids=lambda s: "x".join(map(str, s[:4])) + f"-{s[4]}-{s[5]}")
def test_deterministic_backward_gives_the_same_bits_twice(shape, dtype):
    Bt, Dc, L, N, bk, ck, G = shape
    dtype = half_dtype(dtype) if dtype == "bfloat16" else np.dtype(dtype)
    rng = np.random.default_rng(11)
    kw = make_inputs(rng, Bt=Bt, Dc=Dc, L=L, N=N, dtype=np.float64, B_kind=bk, C_kind=ck,
                     G=G, D=True, z=True, delta_bias=True, softplus=True,
                     initial_state=True)
    dev = _device(kw, dtype)
    dout = cupy.asarray(rng.standard_normal((Bt, Dc, L)).astype(dtype))
    dlast = cupy.asarray(rng.standard_normal((Bt, Dc, N)).astype(
        np.float32 if dtype.itemsize == 2 else dtype))
    with settings.override(deterministic=True):
        first = _grads(dev, dout, dlast)
        second = _grads(dev, dout, dlast)
    atomic = _grads(dev, dout, dlast)
    for name, a, b, c in zip(NAMES, first, second, atomic):
        if a is None:
            continue
        assert a.dtype == c.dtype and a.shape == c.shape, name
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8), err_msg=name)
        tol = dict(rtol=1e-4, atol=1e-4) if dtype.itemsize <= 4 else dict(rtol=1e-10,
                                                                          atol=1e-10)
        if dtype.itemsize == 2 and name in ("dB", "dC"):  # rounded to bfloat16 at the end
            tol = dict(rtol=1e-2, atol=1e-2)
        scale = max(1.0, float(np.abs(c.astype(np.float64)).max()))
        np.testing.assert_allclose(a.astype(np.float64) / scale, c.astype(np.float64) / scale,
                                   err_msg=name, **tol)


def test_deterministic_training_steps_give_the_same_parameters_twice():
    cfg = models.MambaConfig(d_model=32, n_layers=2, vocab_size=16, d_state=16)
    batches = cpu_batches(cfg, 4, 5, True, Bt=4, L=64)

    def run():
        params = models.init_params(cfg, seed=3, dtype=np.float32, xp=cupy)
        ts = TrainStep(params, cfg, AdamW(lr=1e-3, weight_decay=0.1), max_grad_norm=0.5)
        for x, y, mask in batches:
            ts.step(x, y, mask)
        return {k: cupy.asnumpy(v) for k, v in params.items()}, ts.losses()

    with settings.override(deterministic=True):
        (p1, l1), (p2, l2) = run(), run()
    np.testing.assert_array_equal(l1, l2)
    for k in p1:
        np.testing.assert_array_equal(p1[k].view(np.uint8), p2[k].view(np.uint8), err_msg=k)


def test_the_blocks_engine_refuses_the_deterministic_setting():
    rng = np.random.default_rng(2)
    kw = _device(make_inputs(rng, Bt=1, Dc=4, L=32, N=4, dtype=np.float32), np.dtype("float32"))
    with settings.override(engine="blocks", deterministic=True):
        _, _, backward = nm.selective_scan_vjp(**kw)
        with pytest.raises(ValueError, match="settings.deterministic: the 'blocks' engine"):
            backward(cupy.ones((1, 4, 32), np.float32))


def test_deterministic_embedding_gradient_is_the_same_twice_and_equals_scatter_add():
    from numba_mamba import layers

    rng = np.random.default_rng(4)
    V, d = 50, 96
    ids = cupy.asarray(rng.integers(0, V, (8, 300)))  # many repeats of each id
    dout = cupy.asarray(rng.standard_normal((8, 300, d)).astype(np.float32))
    _, cache = layers.embedding_forward(ids, cupy.zeros((V, d), np.float32))
    with settings.override(deterministic=True):
        first = cupy.asnumpy(layers.embedding_backward(dout, cache))
        second = cupy.asnumpy(layers.embedding_backward(dout, cache))
    atomic = cupy.asnumpy(layers.embedding_backward(dout, cache))
    want = np.zeros((V, d))
    np.add.at(want, cupy.asnumpy(ids).reshape(-1), cupy.asnumpy(dout).reshape(-1, d))
    assert first.dtype == np.float32 and first.shape == (V, d)
    np.testing.assert_array_equal(first.view(np.uint32), second.view(np.uint32))
    np.testing.assert_allclose(first, want, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(atomic, want, rtol=1e-5, atol=1e-4)
