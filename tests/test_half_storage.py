"""The half-precision storage conversions of ``cuda_kernels.half`` on the CPU.

The state-parallel engine reads and writes bfloat16 arrays as their bits
(``uint16``): a load puts the bits in the high half of a float32, a store
rounds a float32 to nearest, ties to even, on the bits.  These are the NumPy
versions (the CUDA simulator's); the GPU versions compile to PTX in
``tests/test_cuda_ptx.py``.  Both are compared here with ``ml_dtypes``.
"""

import types

import numpy as np
import pytest

from numba_mamba.cuda_kernels.half import (bfloat16_bits_to_float32, float32_to_bfloat16_bits,
                                            kernel_view, storage_dtype, storage_of)

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)


def _float32_values():
    """Many float32 values: random over the whole range, every tie between two
    neighbouring bfloat16 values (even and odd low bit) and its neighbours,
    subnormals, the largest finite values, zeros, infinities and NaNs."""
    rng = np.random.default_rng(0)
    bits = [rng.integers(0, 2 ** 32, 200_000, dtype=np.uint64).astype(np.uint32)]
    hi = rng.integers(0, 2 ** 16, 20_000, dtype=np.uint64).astype(np.uint32) << np.uint32(16)
    for low in (0x8000, 0x7FFF, 0x8001, 0x0000, 0x0001, 0xFFFF):  # ties and around them
        bits.append(hi | np.uint32(low))
    sub = np.arange(0, 0x00800000, 97, dtype=np.uint32)  # float32 subnormals
    bits += [sub, sub | np.uint32(0x80000000)]
    special = np.array([0x00000000, 0x80000000, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F8000,
                        0x7F7F7FFF, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000,
                        0x7F800001, 0x7FBFFFFF, 0xFF800001, 0x00008000, 0x00018000,
                        0x3F808000, 0x3F818000], np.uint32)
    bits.append(special)
    return np.concatenate(bits).view(np.float32)


def test_float32_to_bfloat16_rounds_like_ml_dtypes():
    x = _float32_values()
    got = float32_to_bfloat16_bits(x)
    assert got.dtype == np.uint16 and got.shape == x.shape
    with np.errstate(invalid="ignore"):  # (ml_dtypes warns on NaNs)
        want = x.astype(BF16).view(np.uint16)
    nan = np.isnan(x)
    np.testing.assert_array_equal(got[~nan], want[~nan])
    # a NaN stays a NaN, of its sign
    back = got[nan].view(BF16).astype(np.float32)
    assert np.isnan(back).all()
    np.testing.assert_array_equal(np.signbit(back), np.signbit(x[nan]))


def test_bfloat16_ties_round_to_even():
    # 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: to 1 (even); 1 + 3 * 2^-8
    # halfway between 1 + 2^-7 and 1 + 2^-6: up to the even 1 + 2^-6
    x = np.array([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8)], np.float32)
    got = float32_to_bfloat16_bits(x).view(BF16).astype(np.float64)
    np.testing.assert_array_equal(got, [1.0, 1 + 2 ** -6, -1.0])
    # half an ulp past the largest bfloat16 (0x7F7F, odd): up to infinity; less stays
    at = np.array([0x7F7F8000, 0x7F7F7FFF], np.uint32).view(np.float32)
    np.testing.assert_array_equal(float32_to_bfloat16_bits(at), [0x7F80, 0x7F7F])


def test_bfloat16_to_float32_is_exact_for_every_bit_pattern():
    bits = np.arange(2 ** 16, dtype=np.uint16)
    got = bfloat16_bits_to_float32(bits)
    assert got.dtype == np.float32
    want = bits.view(BF16).astype(np.float32)
    nan = np.isnan(want)
    np.testing.assert_array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))
    assert np.isnan(got[nan]).all()
    # and back: every bfloat16 survives the round trip bit for bit
    np.testing.assert_array_equal(float32_to_bfloat16_bits(got)[~nan], bits[~nan])


def test_scalar_conversions_give_scalars():
    # (the simulator converts one element at a time)
    v = bfloat16_bits_to_float32(np.uint16(0x3FC0))
    assert isinstance(v, np.float32) and v == 1.5
    b = float32_to_bfloat16_bits(np.float32(1.5))
    assert isinstance(b, np.uint16) and b == 0x3FC0


def test_storage_kinds():
    assert storage_of(np.float16) == (np.dtype(np.float32), "float16")
    assert storage_of(BF16) == (np.dtype(np.float32), "bfloat16")
    assert storage_of(np.float32) == (np.dtype(np.float32), None)
    assert storage_of(np.float64) == (np.dtype(np.float64), None)
    assert storage_dtype("bfloat16", np.float32) == np.uint16
    assert storage_dtype("float16", np.float32) == np.float16
    assert storage_dtype(None, np.float64) == np.float64
    with pytest.raises(ValueError, match="storage"):
        storage_dtype("int8", np.float32)
    x = np.ones(3, BF16)
    assert kernel_view(x).dtype == np.uint16 and kernel_view(x).base is x
    y = np.ones(3, np.float16)
    assert kernel_view(y) is y and kernel_view(None) is None


def test_api_finds_the_half_dtype_the_per_step_arrays_share():
    """``numba_mamba.scan._shared_half``: the half dtype where ``u``, ``delta``, ``z``
    and a variable B/C share one and the compute dtype is float32; None (cast to
    float32) otherwise."""
    import numba_mamba.scan as api

    f32 = np.dtype(np.float32)
    h = BF16

    def shared(ftype=f32, **dtypes):
        shapes = dict(u=(1, 2, 5), delta=(1, 2, 5), A=(2, 3), B=(1, 3, 5), C=(1, 1, 3, 5),
                      D=(2,), z=(1, 2, 5))
        arrays = {k: np.zeros(shapes[k], dtypes.get(k, h)) for k in shapes}
        return api._shared_half(arrays, ftype)

    assert shared() == h
    assert shared(A=f32, D=f32) == h  # weights may be float32
    assert shared(B=np.float16) is None  # mixed half dtypes
    assert shared(delta=f32) is None
    assert shared(ftype=np.dtype(np.float64)) is None
    assert shared(u=np.float16, delta=np.float16, z=np.float16, B=np.float16,
                  C=np.float16) == np.dtype(np.float16)
    assert shared(u=f32, delta=f32, z=f32, B=f32, C=f32) is None  # not a half dtype


@pytest.mark.parametrize("switch", [False, True])
def test_api_reads_half_directly_only_where_switched_on_and_the_state_engine_runs(switch):
    """``numba_mamba.scan._reads_half``: the backend's ``settings.direct_half`` and
    its engine choice (which reads ``settings.engine``) decide."""
    import numba_mamba.scan as api
    from numba_mamba.cuda_kernels import scan
    from numba_mamba.cuda_kernels.settings import Settings

    backend = types.SimpleNamespace(settings=Settings(direct_half=switch),
                                    choose_engine=scan.choose_engine)
    assert api._reads_half(backend, 8, 1536, 16) is switch  # (the state engine's size)
    assert api._reads_half(backend, 1, 4, 256) is False  # (the blocks engine's: N > 128)
    with scan.settings.override(engine="blocks"):
        assert api._reads_half(backend, 1, 4, 4) is False
    with scan.settings.override(engine="states"):
        assert api._reads_half(backend, 1, 4, 4) is switch
    with scan.settings.override(engine="blocks"):
        assert api._reads_half(backend, 8, 1536, 16) is False


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_narrow_kernel_in_the_simulator_rounds_as_astype(dtype):
    """``scan_states.narrow`` (the half ``dB``/``dC`` of the state engine's
    backward) run in the CUDA simulator gives ``astype``'s bits."""
    from numba_mamba.cuda_kernels import _common, scan_states

    if not _common.simulator():
        pytest.skip("runs in the CUDA simulator (NUMBA_ENABLE_CUDASIM=1)")
    dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    rng = np.random.default_rng(12)
    x = (rng.standard_normal(300) * 10.0 ** rng.integers(-6, 6, 300)).astype(np.float32)
    x[:4] = [np.inf, -np.inf, 0.0, 1.0 + float(ml_dtypes.finfo(dtype).eps) / 2]
    with np.errstate(over="ignore"):  # (float16 overflows to infinity, as it should)
        got = scan_states.narrow(x.reshape(3, 100), dtype)
        want = x.astype(dtype)
    assert got.dtype == dtype and got.shape == (3, 100)
    np.testing.assert_array_equal(got.reshape(-1).view(np.uint16), want.view(np.uint16))
