"""Collection rules for the doctests of optional modules.

``pytest`` collects the doctests of every module of ``numba_mamba`` (``--doctest-modules``);
a module that imports an optional dependency at its top (``numba_mamba.torch``,
``numba_mamba.dask``) is skipped where that dependency is not installed, instead of
failing the collection.
"""

import importlib.util

_OPTIONAL = {"numba_mamba/torch.py": "torch", "numba_mamba/dask.py": "dask",
             "numba_mamba/xarray.py": "xarray", "numba_mamba/distributed.py": None}

collect_ignore = [path for path, module in _OPTIONAL.items()
                  if module is not None and importlib.util.find_spec(module) is None]
