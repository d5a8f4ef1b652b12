"""Choosing the next token from logits: greedy, or sampled by the Gumbel-max trick.

The rule, the same on the CPU (here, Numba ``@njit``) and on the GPU
(``cuda_kernels/sample.py``, one block per row), so that both choose the same
greedy tokens and, from the same seed, draw from the same random numbers:

* **Greedy** (``temperature`` not above 0): the index of the largest logit;
  among equal largest logits the smallest index (as ``numpy.argmax``); NaN is
  never chosen; a row with no logit above ``-inf`` chooses 0.
* **Sampled** (``temperature > 0``): ``argmax_i (logit_i / temperature + g_i)``
  with ``g_i`` independent standard Gumbel draws, which picks ``i`` with
  probability ``softmax(logits / temperature)_i`` [1]_.  With ``top_k`` in
  ``[1, V)`` only the logits at or above the ``top_k``-th largest take part
  (ties with it included, so more than ``top_k`` tokens may).
* **Random numbers**: counter-based, no state but a 64-bit ``seed`` and a
  per-row counter (tokens chosen so far for that row): the draw of token ``i``
  of row ``b`` at count ``c`` is ``mix64(key(seed, b, c) + (i + 1) * golden)``
  (:func:`mix64` is SplitMix64's finalizer [2]_), its top 23 (float32) or 52
  (float64) bits made a uniform ``u`` in (0, 1) and ``g = -log(-log(u))``.
  Nothing is kept between calls but the counters, which the choice advances:
  a CUDA graph that replays the choice draws new numbers at each replay.
* **The k-th largest logit** is found on the logits' bits: a float's bits
  ``b`` (as a signed integer of its width) map to the integer key
  ``b if b >= 0 else -(b & magnitude mask)``, which orders like the floats and
  is equal for equal floats (``-0.0`` and ``0.0`` too).  Here by sorting a
  row's keys; on the GPU by building the key bit by bit from the top with a
  block-wide count of the keys at or above each candidate.

Canonical layout
----------------
==============  ================  ==========================================
name            shape, dtype      content
==============  ================  ==========================================
logits          (Bt, V) float     C-contiguous
temperature     (1,) float        logits' dtype
ints            (2,) int64        ``[seed, top_k]`` (``top_k <= 0``: all)
counter         (Bt,) int64       tokens chosen per row; advanced by 1
tokens          (Bt,) int64       the chosen token per row (written)
hist            (Bt, H) int64     ``hist[b, counter[b]] = token`` where the
                                  counter is below ``H``
==============  ================  ==========================================

References
----------
.. [1] E. J. Gumbel, "Statistical Theory of Extreme Values and Some Practical
   Applications", 1954; W. Kool, H. van Hoof and M. Welling, "Stochastic Beams
   and Where to Find Them: The Gumbel-Top-k Trick", ICML 2019.
.. [2] G. L. Steele, D. Lea and C. H. Flood, "Fast Splittable Pseudorandom
   Number Generators", OOPSLA 2014.
"""

import math

import numpy as np
from numba import njit

__all__ = ["choice_functions", "choose", "float_key_fn", "mix64"]

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S27, _S30, _S31 = np.uint64(27), np.uint64(30), np.uint64(31)


def mix64(x):
    """SplitMix64's finalizer: a bijection of uint64 that spreads every bit."""
    x = (x ^ (x >> _S30)) * _M1
    x = (x ^ (x >> _S27)) * _M2
    return x ^ (x >> _S31)


def choice_functions(ftype, jit):
    """``(stream_key, key, best_in_row)`` compiled by ``jit`` (``numba.njit``
    here, a CUDA device-function decorator in ``cuda_kernels/sample.py``): one
    source of the rule for both targets.

    ``stream_key(seed, row, counter)`` (uint64 each) is the key of a row's
    draws at one count; ``key(bits)`` the order key of a logit
    (:func:`float_key_fn`); ``best_in_row(logits, bits, b, start, stride, T,
    greedy, restrict, thr, skey)`` the best ``(score, index)`` of row ``b``
    over the indices ``start, start + stride, ...`` (index -1 where no score
    is above ``-inf``), the first one among equal scores: the logit itself
    (``greedy``), else ``logit / T + gumbel`` over the logits whose key is at
    least ``thr`` (all where not ``restrict``).  The Gumbel draws are computed
    in ``ftype`` from 23 (float32) or 52 (float64) random bits.
    """
    ftype = np.dtype(ftype).type
    bits = 23 if ftype is np.float32 else 52
    shift = np.uint64(64 - bits)
    half = ftype(0.5)
    scale = ftype(2.0 ** -bits)
    neg_inf = ftype(-np.inf)
    one = np.uint64(1)
    mix = jit(mix64)
    key = jit(float_key_fn(ftype))

    def stream_key(seed, row, counter):
        return mix(mix(seed ^ mix(row + GOLDEN)) + counter * GOLDEN)

    @jit
    def gumbel(skey, i):
        r = mix(skey + (np.uint64(i) + one) * GOLDEN)
        u = (ftype(r >> shift) + half) * scale  # in (0, 1), both ends excluded
        return -math.log(-math.log(u))

    def best_in_row(logits, bits, b, start, stride, T, greedy, restrict, thr, skey):
        best = neg_inf
        besti = np.int64(-1)
        for i in range(start, logits.shape[1], stride):
            v = logits[b, i]
            if greedy:
                score = v
            else:
                if restrict and key(bits[b, i]) < thr:
                    continue
                score = v / T + gumbel(skey, i)
            if score > best:
                best = score
                besti = i
        return best, besti

    return jit(stream_key), key, jit(best_in_row)


def float_key_fn(ftype):
    """``key(bits)``: the int64 order key of a float of ``ftype`` from its bits."""
    mask = np.int64(0x7FFFFFFF if np.dtype(ftype) == np.float32 else 0x7FFFFFFFFFFFFFFF)

    def key(bits):
        b = np.int64(bits)
        return b if b >= 0 else -(b & mask)

    return key


def _make_cpu_kernel(ftype):
    ftype = np.dtype(ftype).type
    zero = ftype(0.0)
    stream_key, key, best_in_row = choice_functions(ftype, njit)

    @njit
    def choose_rows(logits, bits, temperature, ints, counter, tokens, hist):
        Bt, V = logits.shape
        T = temperature[0]
        greedy = not (T > zero)
        k = ints[1]
        restrict = (not greedy) and 0 < k < V
        for b in range(Bt):
            ctr = counter[b]
            thr = np.int64(0)
            if restrict:  # the k-th largest key: by sorting the row's keys
                keys = np.empty(V, np.int64)
                for i in range(V):
                    keys[i] = key(bits[b, i])
                thr = np.sort(keys)[V - k]
            skey = stream_key(np.uint64(ints[0]), np.uint64(b), np.uint64(ctr))
            _, besti = best_in_row(logits, bits, b, 0, 1, T, greedy, restrict, thr, skey)
            tok = besti if besti >= 0 else 0
            tokens[b] = tok
            if ctr < hist.shape[1]:
                hist[b, ctr] = tok
            counter[b] = ctr + 1

    return choose_rows


_KERNELS = {}


def choose(logits, temperature, ints, counter, tokens, hist):
    """Choose one token per row of ``logits (Bt, V)`` into ``tokens`` (and
    ``hist``), advancing ``counter``; arrays as in the module's table."""
    dt = logits.dtype
    kernel = _KERNELS.get(dt)
    if kernel is None:
        kernel = _KERNELS[dt] = _make_cpu_kernel(dt)
    bits = logits.view(np.int32 if dt == np.float32 else np.int64)
    kernel(logits, bits, temperature, ints, counter, tokens, hist)
