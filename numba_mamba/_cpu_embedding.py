"""CPU backend of the embedding's backward: the rows of ``dout`` added into
``dweight`` at their token ids, in order.

``np.add.at(dweight, ids, rows)`` computes the same sums, but its unbuffered
loop is slow (milliseconds for a batch of a few thousand tokens); this Numba
loop adds the rows in the same order, so the sums are the same to the bit.
"""

import numpy as np
from numba import njit

__all__ = ["embedding_backward"]


@njit(cache=True)
def _scatter_add_rows(ids, rows, out):
    """``out[ids[i]] += rows[i]`` for i = 0, 1, ... in order."""
    d = rows.shape[1]
    for i in range(ids.shape[0]):
        r = ids[i]
        for j in range(d):
            out[r, j] += rows[i, j]


def embedding_backward(ids, rows, shape, dtype):
    """``dweight (shape)`` with ``dweight[v] = sum of rows[i] where ids[i] == v``.

    Parameters
    ----------
    ids : ndarray of integers, shape (n,)
        Token ids, each in ``[0, shape[0])`` (unchecked: the forward checked them).
    rows : ndarray, shape (n, shape[1])
        Gradient rows, of ``dtype``.
    shape : (V, d)
    dtype : float32 or float64

    Examples
    --------
    >>> import numpy as np
    >>> from numba_mamba import _cpu_embedding
    >>> _cpu_embedding.embedding_backward(np.array([1, 0, 1]), np.ones((3, 2)), (3, 2),
    ...                                   np.float64)
    array([[1., 1.],
           [2., 2.],
           [0., 0.]])
    """
    out = np.zeros(shape, dtype=dtype)
    _scatter_add_rows(np.ascontiguousarray(ids).astype(np.int64, copy=False),
                      np.ascontiguousarray(rows, dtype=dtype), out)
    return out
