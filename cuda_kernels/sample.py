"""Numba CUDA kernel choosing the next token on the device: greedy or sampled.

The rule (greedy argmax; Gumbel-max sampling with a counter-based hash of a
seed, the row and a per-row counter read from device memory; ``top_k`` by the
``top_k``-th largest logit, ties included) and the layout are those of
:mod:`numba_mamba._cpu_sample`, whose random-number functions are compiled
here as device functions from the same source (``choice_functions``: the
random numbers, the logits' order keys, the scan of a row): the GPU and the
CPU choose the same greedy tokens and draw from the same random numbers.

One block per row.  Every argument the choice depends on -- temperature,
seed, ``top_k``, the counters -- is read from device memory and the counters
are advanced by the kernel, so a CUDA graph that replays the launch draws new
numbers each time and never needs the host.

The ``top_k``-th largest key ``t`` of a row (the largest ``t`` with at least
``top_k`` keys ``>= t``) is built from the top bit down: its sign with one
count, then each of the 31 (float32) or 63 (float64) magnitude bits with one
block-wide count of the keys at or above the candidate, each count a pass
over the row (L2-resident for a vocabulary of 50k float32 logits).  Only
``0 < top_k < V`` with a temperature above 0 pays for it.
"""

import functools

import numba
import numpy as np
from numba import cuda, types

from .._cpu_sample import choice_functions
from ._common import compile_kernel, inline_device, launch
from .step import block_sum

__all__ = ["THREADS", "choose", "get_kernel", "ptx_signatures"]

THREADS = 256


def _argtypes(ftype):
    ftype = np.dtype(ftype)
    t = numba.from_dtype(ftype)
    ibits = types.int32 if ftype == np.float32 else types.int64
    i1, i2 = types.Array(types.int64, 1, "C"), types.Array(types.int64, 2, "C")
    # logits, bits (the logits' memory as integers), temperature, ints, counter, tokens, hist
    return (types.Array(t, 2, "C"), types.Array(ibits, 2, "C"), types.Array(t, 1, "C"),
            i1, i1, i1, i2)


def _make_kernel(ftype, threads=THREADS):
    ftype = np.dtype(ftype).type
    zero = ftype(0.0)
    n_bits = 31 if ftype is np.float32 else 63
    stream_key, key, best_in_row = choice_functions(ftype, inline_device)
    total_of = block_sum(threads)

    @inline_device
    def count_at_least(bits, b, thr, sh, t):
        """Keys of row ``b`` at or above ``thr``, summed over the block."""
        c = np.int64(0)
        for i in range(t, bits.shape[1], threads):
            if key(bits[b, i]) >= thr:
                c += 1
        return total_of(sh, c, t)

    def choose(logits, bits, temperature, ints, counter, tokens, hist):
        b = cuda.blockIdx.x
        t = cuda.threadIdx.x
        V = logits.shape[1]
        sc = cuda.shared.array(threads, types.int64)
        sv = cuda.shared.array(threads, ftype)
        si = cuda.shared.array(threads, types.int64)
        T = temperature[0]
        greedy = not (T > zero)
        k = ints[1]
        restrict = (not greedy) and k > 0 and k < V
        thr = np.int64(0)
        if restrict:
            if count_at_least(bits, b, np.int64(0), sc, t) >= k:
                for j in range(n_bits - 1, -1, -1):
                    c = thr + (np.int64(1) << j)
                    if count_at_least(bits, b, c, sc, t) >= k:
                        thr = c
            else:  # r: the largest with fewer than k keys >= -r
                r = np.int64(0)
                for j in range(n_bits - 1, -1, -1):
                    c = r + (np.int64(1) << j)
                    if count_at_least(bits, b, -c, sc, t) < k:
                        r = c
                thr = -(r + 1)
        ctr = counter[b]
        skey = stream_key(np.uint64(ints[0]), np.uint64(b), np.uint64(ctr))
        best, besti = best_in_row(logits, bits, b, t, threads, T, greedy, restrict, thr, skey)
        # the block's best: the largest score, the smallest index among equal ones
        sv[t] = best
        si[t] = besti
        cuda.syncthreads()
        half = threads // 2
        while half > 0:
            if t < half:
                oi = si[t + half]
                ov = sv[t + half]
                mi = si[t]
                mv = sv[t]
                if oi >= 0 and (mi < 0 or ov > mv or (ov == mv and oi < mi)):
                    sv[t] = ov
                    si[t] = oi
            cuda.syncthreads()
            half //= 2
        if t == 0:
            tok = si[0]
            if tok < 0:
                tok = 0
            tokens[b] = tok
            if ctr < hist.shape[1]:
                hist[b, ctr] = tok
            counter[b] = ctr + 1

    return choose


@functools.lru_cache(maxsize=None)
def get_kernel(dtype, threads=THREADS):
    """The compiled choice kernel for logits of ``dtype`` (blocks of ``threads``,
    a power of two)."""
    return compile_kernel(_make_kernel(np.dtype(dtype), threads),
                          types.void(*_argtypes(dtype)), launch_bounds=(threads,))


def ptx_signatures():
    """Yield ``(name, py_func, argtypes, is_float32, launch_bounds)`` of every kernel."""
    for dtype in (np.dtype(np.float32), np.dtype(np.float64)):
        yield (f"choose_token_{dtype.name}", _make_kernel(dtype), _argtypes(dtype),
               dtype == np.float32, (THREADS,))


def choose(logits, temperature, ints, counter, tokens, hist, threads=THREADS):
    """Choose one token per row of ``logits (Bt, V)`` into ``tokens`` and ``hist``,
    advancing ``counter``; the arguments of ``numba_mamba._cpu_sample.choose``."""
    bits = logits.view(np.int32 if logits.dtype == np.float32 else np.int64)
    launch(get_kernel(logits.dtype, threads), logits.shape[0], threads, "current",
           (logits, bits, temperature, ints, counter, tokens, hist))
