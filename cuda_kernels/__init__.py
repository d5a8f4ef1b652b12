"""Numba CUDA kernels of numba-mamba.

One module per kernel family; each holds the math and the canonical layout in
its docstring, ``inline`` device helpers, each forward kernel followed by its
backward, and thin launchers that pick the grid and launch on CuPy's current
stream.  No validation or axis handling happens here: the public functions in
:mod:`numba_mamba` do that before calling a launcher.

In an installed wheel this folder is the subpackage ``numba_mamba.cuda_kernels``;
in the source tree it is the top-level package ``cuda_kernels``.
"""
