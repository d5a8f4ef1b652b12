"""SSM filters on labelled arrays (``xarray.DataArray``), time named by its dimension.

A thin wrapper over :func:`numba_mamba.ssm_filter` with ``xarray.apply_ufunc``:
the time axis is given by name, coordinates and attributes are kept, and a
Dask-backed ``DataArray`` (``.chunk(...)``, ``open_dataset(..., chunks=...)``)
stays lazy (the filter runs through :mod:`numba_mamba.dask`).  Importing this
module imports xarray.
"""

import xarray as xr

from .filters import ssm_filter as _ssm_filter

__all__ = ["ssm_filter"]


def ssm_filter(A, B, C, x, dim="time", D=None, dt=1.0, method="zoh", zi=None, mode="auto",
               state_dim="state"):
    """:func:`numba_mamba.ssm_filter` along the dimension ``dim`` of a DataArray.

    Parameters
    ----------
    A, B, C, D, dt, method, mode
        As :func:`numba_mamba.ssm_filter`, for the signal with ``dim`` moved
        last: their channel axes broadcast against ``x``'s other dimensions
        in ``x``'s order (``A`` of shape ``(N,)`` for one filter on every
        channel, or ``(n_1, ..., N)`` for one per channel).
    x : xarray.DataArray
        Real signal; NumPy- or Dask-backed.
    dim : str, optional
        The time dimension of ``x`` (default ``'time'``).
    zi : array_like, optional
        Initial state, shape ``(..., N)`` (the other dimensions, states); if
        given, the final state is returned too.
    state_dim : str, optional
        Name of the states' dimension of ``zf`` (default ``'state'``).

    Returns
    -------
    y : xarray.DataArray
        ``x``'s dimensions, coordinates and attributes (``name`` dropped),
        lazy if ``x`` is Dask-backed.
    zf : xarray.DataArray
        Only if ``zi`` is given: ``x``'s other dimensions and ``state_dim``.

    Raises
    ------
    ValueError
        ``dim`` not a dimension of ``x``; arguments whose channels do not
        fit ``x``'s other dimensions (the filter's output must have ``x``'s
        shape); otherwise as :func:`numba_mamba.ssm_filter`.
    TypeError
        ``x`` not a DataArray.

    Examples
    --------
    >>> import numpy as np
    >>> import xarray as xr
    >>> from numba_mamba.xarray import ssm_filter
    >>> x = xr.DataArray(np.random.default_rng(0).standard_normal((3, 100)),
    ...                  dims=("station", "time"),
    ...                  coords={"station": ["a", "b", "c"], "time": np.arange(100) * 0.5})
    >>> y = ssm_filter(np.array([-1.0, -0.1]), np.ones(2), np.ones(2), x.chunk({"time": 30}),
    ...                dt=0.5)
    >>> y.dims, y.station.values.tolist(), y.chunks[1]
    (('station', 'time'), ['a', 'b', 'c'], (30, 30, 30, 10))
    >>> bool(np.allclose(y.values, ssm_filter(np.array([-1.0, -0.1]), np.ones(2), np.ones(2),
    ...                                       x, dt=0.5).values))
    True
    """
    if not isinstance(x, xr.DataArray):
        raise TypeError(f"x must be an xarray.DataArray, got {type(x).__module__}."
                        f"{type(x).__name__}")
    if dim not in x.dims:
        raise ValueError(f"dim must be a dimension of x {x.dims}, got {dim!r}")
    other = tuple(d for d in x.dims if d != dim)
    shape = tuple(x.sizes[d] for d in other) + (x.sizes[dim],)

    def run(values):
        out = _ssm_filter(A, B, C, values, D, dt, method, -1, zi, mode)
        y = out if zi is None else out[0]
        if tuple(y.shape) != shape:
            raise ValueError(f"the filter's channels must fit x's dimensions {other} of sizes "
                             f"{shape[:-1]}: the output would have shape {tuple(y.shape)}, "
                             f"expected {shape}")
        return out

    core = [[dim], [state_dim]] if zi is not None else [[dim]]
    result = xr.apply_ufunc(run, x, input_core_dims=[[dim]], output_core_dims=core,
                            dask="allowed", keep_attrs=True)
    if zi is None:
        return result.transpose(*x.dims)
    y, zf = result
    return y.transpose(*x.dims), zf

