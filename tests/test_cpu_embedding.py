"""The CPU embedding backward (``numba_mamba._cpu_embedding``) against ``np.add.at``."""

import numpy as np
import pytest

from numba_mamba import _cpu_embedding, layers


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_sums_equal_np_add_at_to_the_bit(dtype):
    rng = np.random.default_rng(3)
    V, d = 7, 33
    ids = rng.integers(0, V - 1, (4, 50))  # repeated ids; row V - 1 never hit
    dout = rng.standard_normal((4, 50, d)).astype(dtype)
    want = np.zeros((V, d), dtype)
    np.add.at(want, ids.reshape(-1), dout.reshape(-1, d))
    _, cache = layers.embedding_forward(ids, np.zeros((V, d), dtype))
    got = layers.embedding_backward(dout, cache)
    assert got.dtype == dtype and got.shape == (V, d)
    np.testing.assert_array_equal(got, want)
    assert not got[V - 1].any()


def test_int32_ids_and_no_rows():
    got = _cpu_embedding.embedding_backward(np.array([2, 2], np.int32), np.ones((2, 3)), (4, 3),
                                            np.float64)
    np.testing.assert_array_equal(got, [[0] * 3, [0] * 3, [2] * 3, [0] * 3])
    empty = _cpu_embedding.embedding_backward(np.zeros(0, np.int64), np.zeros((0, 3)), (4, 3),
                                              np.float32)
    assert empty.dtype == np.float32 and not empty.any()
