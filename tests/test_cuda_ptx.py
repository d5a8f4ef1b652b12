"""Every GPU kernel compiles to PTX for sm_90, and float32 kernels stay float32.

``numba.cuda.compile_ptx`` needs NVRTC/NVVM (the ``cu12`` extra of numba-cuda)
but no GPU, so this runs on any machine.  A stray Python float literal in a
float32 kernel would promote arithmetic to float64 (slow on most GPUs, and a
silent change of precision); the PTX shows it as ``.f64`` instructions.  So
does a libdevice function with a float64 slow path (``sinf`` and ``cosf`` have
one, which is why the complex float32 filter kernels use their own sine and
cosine).

The kernels and their compilation for sm_90 without a driver are in
``tests/ptx_kernels.py``; the ``ptx`` fixture (``tests/conftest.py``) compiles
them all once per session, in subprocesses that run while other tests do.
"""

import re

import numpy as np
import pytest

cuda = pytest.importorskip("numba.cuda")
import numba  # noqa: E402

if numba.config.ENABLE_CUDASIM:  # pragma: no cover - the simulator has no PTX
    pytest.skip("compile_ptx is not available under the CUDA simulator",
                allow_module_level=True)

from numba_mamba.cuda_kernels import scan, scan_blocks, scan_states  # noqa: E402
from tests.ptx_kernels import CC, signatures, sm90_device  # noqa: E402

SIGNATURES = signatures()
_F64 = re.compile(r"\.f64\b")


def test_lists_every_kernel_for_both_dtypes():
    names = set(SIGNATURES)
    for dtype in ("float32", "float64"):
        threads, items = scan.settings.blocks_tuning[np.dtype(dtype)]
        tag = f"{dtype}_t{threads}_i{items}"
        assert {f"forward_{tag}", f"backward_{tag}"} <= names
        for kind in ("real", "complex"):
            assert {f"discretize_forward_{kind}_{dtype}", f"discretize_backward_{kind}_{dtype}",
                    *(f"recurrence_{k}_{kind}_{dtype}" for k in ("summary", "carry", "output"))
                    } <= names
        assert {f"conv1d_forward_{dtype}_w4", f"conv1d_backward_{dtype}_w4",
                f"silu_forward_{dtype}", f"silu_backward_{dtype}",
                f"softplus_forward_{dtype}", f"softplus_backward_{dtype}",
                f"conv_step_{dtype}", f"ssm_step_{dtype}"} <= names


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_kernel_compiles_to_sm90_ptx(ptx, name):
    assert ".target sm_90" in ptx[name]
    assert ".entry" in ptx[name]


@pytest.mark.parametrize("name", sorted(n for n, r in SIGNATURES.items() if r[2]))
def test_float32_kernel_has_no_f64(ptx, name):
    lines = [ln.strip() for ln in ptx[name].splitlines() if _F64.search(ln)]
    assert not lines, f"{name}: {len(lines)} float64 lines, e.g. {lines[:5]}"


@pytest.mark.parametrize("name", sorted(n for n, r in SIGNATURES.items()
                                         if not r[2] and not n.endswith("_float32")))
def test_float64_kernel_computes_in_float64(ptx, name):
    # (a kernel of float32 arrays that computes in float64 on purpose, optim's
    # prepare, rounds its results to float32: not listed here)
    assert _F64.search(ptx[name])
    assert not re.search(r"\bcvt\.rn\.f32\.f64\b", ptx[name]), "float64 kernel rounds to float32"


@pytest.mark.parametrize("name", sorted(n for n in SIGNATURES if n.startswith(("forward_",
                                                                              "backward_"))))
def test_scan_warp_combine_uses_shuffles(ptx, name):
    # not the simulator's shared-memory path
    assert "shfl.sync" in ptx[name]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_default_scan_tuning_keeps_item_arrays_in_registers(ptx, dtype):
    # the per-thread item arrays are fully unrolled into registers; a local
    # memory depot would mean they are indexed dynamically (slow)
    threads, items = scan.settings.blocks_tuning[np.dtype(dtype)]
    for kind in ("forward", "backward"):
        text = ptx[f"{kind}_{dtype}_t{threads}_i{items}"]
        assert "__local_depot" not in text, f"{kind} {dtype} uses local memory"


@pytest.mark.parametrize("name", sorted(n for n, r in SIGNATURES.items()
                                        if r[2] and n.startswith(("discretize_", "recurrence_"))))
def test_float32_filter_kernels_use_no_local_memory(ptx, name):
    assert "__local_depot" not in ptx[name], f"{name} uses local memory"


def test_conv1d_backward_uses_shared_memory_and_barriers(ptx):
    text = ptx["conv1d_backward_float32_w4"]
    assert ".shared" in text and "bar.sync" in text


@pytest.mark.parametrize("dtype,threads,items", [("float32", 256, 16), ("float64", 128, 16)])
def test_chunk_too_large_for_static_shared_memory_is_rejected(dtype, threads, items):
    # four staged rows of threads * (items + 1) values must fit in 48 KiB
    with pytest.raises(ValueError, match=rf"^threads \* items = {threads * items} needs"):
        scan_blocks._make_kernels(np.dtype(dtype), threads, items, sim=False)


@pytest.mark.parametrize("shape", [(8, 1536, 2048), (2, 1536, 16384), (64, 64, 1024),
                                   (1, 1536, 2 ** 20), (1, 4, 16), (3, 40, 1000)])
def test_state_engine_segments_cover_the_sequence(shape):
    """The forward's split: whole tiles, every step once, more segments for fewer blocks."""
    Bt, Dc, L = shape
    p = scan_states.plan(np.float32, 16, Dc, 1, 1)
    S, SL = scan_states.segments(Bt, Dc, L, p)
    assert SL % p.t_fwd == 0 and (S - 1) * SL < L <= S * SL
    blocks = scan_states._grid(Bt, Dc, p)
    cfg = scan_states.settings
    if (blocks >= min(cfg.target_blocks, cfg.forward_split_below)
            or L < 2 * cfg.min_segment):
        assert S == 1
    else:
        assert S > 1 and SL >= scan_states.settings.min_segment - p.t_fwd


@pytest.mark.parametrize("save_every", [1, 4])
@pytest.mark.parametrize("shape", [(8, 1536, 2048), (2, 1536, 16384), (64, 64, 1024),
                                   (1, 1536, 2 ** 20), (1, 4, 16), (3, 40, 1000), (2, 12, 1000)])
def test_state_engine_backward_segments_cover_the_sequence(shape, save_every):
    """The backward's split: whole tiles and stretches of saved states, every step once,
    more segments for fewer blocks."""
    Bt, Dc, L = shape
    p = scan_states.plan(np.float32, 16, Dc, 1, 1)._replace(save_every=save_every)
    S, SL = scan_states.backward_segments(Bt, Dc, L, p)
    assert SL % (p.t_bwd * save_every) == 0 and (S - 1) * SL < L <= S * SL
    blocks = scan_states._grid(Bt, Dc, p)
    cfg = scan_states.settings
    target = cfg.backward_target_blocks
    one_wave = max(1, min(target // blocks, L // cfg.min_segment))
    if one_wave > 1 and L >= cfg.long_segment * one_wave:  # split into more waves
        assert S >= one_wave and S * blocks <= cfg.long_segment_waves * target
        assert S == 1 or SL >= 2 * cfg.min_segment
    elif 2 * blocks > target or L < 2 * cfg.min_segment:
        assert S == 1
    else:
        assert S > 1 and SL >= cfg.min_segment
        assert S * blocks <= target  # one wave
        assert (S + 1) * blocks > target or (S + 1) * cfg.min_segment > L
    for n in (1, 2, 3, 4):  # a forced count, where the stretches allow it
        S, SL = scan_states.backward_segments(Bt, Dc, L, p, n)
        assert SL % (p.t_bwd * save_every) == 0 and (S - 1) * SL < L <= S * SL
        assert S <= n


def test_state_engine_backward_splits_a_grid_of_under_half_a_wave_or_long_segments():
    # float32, N = 16: (64, 64, 1024) and (2, 1536, 16384) make 512 and 384
    # blocks (more than half of the 660 resident: one segment); (1, 768, 4096)
    # makes 96 (6 segments of 688 steps); where one wave splits into segments
    # of 2048 steps or more, up to 4 waves: (1, 1536, 2**20) 192 blocks, 13
    def split(Bt, Dc, L):
        return scan_states.backward_segments(Bt, Dc, L, scan_states.plan(np.float32, 16, Dc,
                                                                          1, 1))

    assert scan_states._grid(2, 1536, scan_states.plan(np.float32, 16, 1536, 1, 1)) == 384
    assert split(64, 64, 1024) == (1, 1024)
    assert split(1, 768, 4096) == (6, 688)
    assert split(8, 1536, 2048) == (1, 2048)
    assert split(2, 1536, 16384) == (1, 16384)
    assert split(1, 1536, 2 ** 20) == (13, 80672)
    assert split(2, 768, 8192) == (13, 640)
    with scan_states.settings.override(long_segment_waves=1):  # (one wave)
        assert split(1, 1536, 2 ** 20) == (3, 349536)
        assert split(2, 768, 8192) == (3, 2736)


def test_state_engine_lists_its_backward_segment_kernel():
    for dtype in ("float32", "float64"):
        for N in (16, 5):
            assert {f"states_backward_ends_{dtype}_n{N}_bvar_cvar",
                    f"states_backward_ends_{dtype}_n{N}_bvar_cconst"} <= set(SIGNATURES)


def _storage_copy_kernel(storage):
    """A kernel that loads each element of a ``storage`` array as float32 and
    stores twice it back: the conversions of ``half.storage_io`` alone."""
    from numba import types

    from numba_mamba.cuda_kernels.half import storage_dtype, storage_io

    load, store = storage_io(storage, np.float32)

    def copy(src, dst, f):
        i = np.uint64(cuda.grid(1))
        v = load(src, i)
        f[i] = v
        store(dst, i, v + v)

    s = types.Array(numba.from_dtype(storage_dtype(storage, np.float32)), 1, "C")
    return copy, (s, s, types.Array(types.float32, 1, "C"))


@pytest.mark.parametrize("storage", ["float16", "bfloat16"])
def test_half_storage_conversions_compile_without_f64(storage):
    py_func, argtypes = _storage_copy_kernel(storage)
    with sm90_device():
        text, _ = cuda.compile_ptx(py_func, argtypes, cc=CC, fastmath=True)
    assert not _F64.search(text)
    assert "ld.global.u16" in text and "st.global.u16" in text
    if storage == "float16":  # the hardware conversions
        assert "cvt.f32.f16" in text and "cvt.rn.f16.f32" in text
    else:  # bit operations only: no float16 conversion, no call
        assert "cvt.f32.f16" not in text and "cvt.rn.f16" not in text
        assert "call" not in text and re.search(r"shl\.b32\s+%r\d+, %r\d+, 16;", text)


def _body(ptx):
    """The instructions of a PTX kernel, its name (in its parameters' names
    too) replaced by ``K``, without comments and line information."""
    lines = [ln.split("//")[0].strip() for ln in ptx.splitlines()]
    start = next(i for i, ln in enumerate(lines) if ln.startswith(".visible .entry"))
    name = lines[start].split()[2].split("(")[0]
    return [ln.replace(name, "K") for ln in lines[start + 1:]
            if ln and not ln.startswith(".loc")]


@pytest.mark.parametrize("storage", [None, "float16", "bfloat16"])
def test_storage_widen_of_a_read_is_a_load(storage):
    """``storage_widen``'s ``widen(M[i])`` compiles to the instructions of
    ``storage_io``'s ``load(M, i)``: the state engine may read a value raw
    long before it widens it, and gets what a load gives."""
    from numba import types

    from numba_mamba.cuda_kernels.half import storage_dtype, storage_io, storage_widen

    load, _ = storage_io(storage, np.float32)
    zero, widen = storage_widen(storage, np.float32)
    assert zero == 0 and np.asarray(zero).dtype == storage_dtype(storage, np.float32)

    def by_load(src, f):
        i = np.uint64(cuda.grid(1))
        f[i] = load(src, i)

    def by_widen(src, f):
        i = np.uint64(cuda.grid(1))
        f[i] = widen(src[i])

    s = types.Array(numba.from_dtype(storage_dtype(storage, np.float32)), 1, "C")
    argtypes = (s, types.Array(types.float32, 1, "C"))
    with sm90_device():
        texts = [cuda.compile_ptx(k, argtypes, cc=CC, fastmath=True)[0]
                 for k in (by_load, by_widen)]
    assert _body(texts[0]) == _body(texts[1])
    assert not _F64.search(texts[1])


@pytest.mark.parametrize("storage", ["float16", "bfloat16"])
def test_state_engine_lists_half_storage_kernels(storage):
    for kind in ("forward", "backward", "forward_ends", "backward_ends"):
        assert f"states_{kind}_float32_{storage}_n16_bvar_cvar" in SIGNATURES
    assert f"states_forward_float32_{storage}_n16_bconst_cconst" in SIGNATURES
    assert SIGNATURES[f"states_backward_float32_{storage}_n16_bvar_cvar"][2]  # f64-free


@pytest.mark.parametrize("storage", ["float16", "bfloat16"])
@pytest.mark.parametrize("kind", ["forward", "backward"])
def test_state_engine_half_storage_reads_and_writes_16_bits(ptx, storage, kind):
    text = ptx[f"states_{kind}_float32_{storage}_n16_bvar_cvar"]
    assert "ld.global.u16" in text and "st.global.u16" in text
    assert ("cvt.f32.f16" in text) == (storage == "float16")
    # float32 kernels read no 16-bit values
    assert "ld.global.u16" not in ptx[f"states_{kind}_float32_n16_bvar_cvar"]
