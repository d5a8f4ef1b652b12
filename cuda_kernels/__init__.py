"""Numba CUDA kernels of numba-mamba: the subpackage ``numba_mamba.cuda_kernels``.

One module per kernel family; each holds the math and the canonical layout in
its docstring, ``inline`` device helpers, each forward kernel followed by its
backward, and thin launchers that pick the grid and launch on CuPy's current
stream.  No validation or axis handling happens here: the public functions in
:mod:`numba_mamba` do that before calling a launcher.  Every kernel is
compiled and launched through :mod:`._launch`; the tunables are the fields of
:data:`.settings.settings`.

This folder has one name, ``numba_mamba.cuda_kernels``, however the package
is installed: a wheel ships it as that subfolder, an editable install maps the
name onto the source tree's top-level ``cuda_kernels/`` folder, and with the
source tree merely on ``sys.path`` ``import numba_mamba`` registers the folder
under that name.  Importing it as the top-level ``cuda_kernels`` is an error:
two module objects of one file would each hold their own settings and caches.
"""

if __name__ != "numba_mamba.cuda_kernels":
    raise ImportError(f"the CUDA kernels are the subpackage numba_mamba.cuda_kernels: "
                      f"import numba_mamba.cuda_kernels (or a module of it), not {__name__!r}",
                      name=__name__)
