"""An sktime ``BaseForecaster`` around :class:`MambaForecaster` (imports sktime; optional).

Imported only through ``numba_mamba.timeseries.MambaSktimeForecaster`` (a lazy attribute), so
that sktime stays an optional package: nothing imports this module unless it is asked for.
"""

import numpy as np

from ._forecaster import MambaForecaster

try:
    import pandas as pd
    from sktime.forecasting.base import BaseForecaster
except ImportError as e:  # the class exists only where sktime does
    BaseForecaster, IMPORT_ERROR = None, e
else:
    IMPORT_ERROR = None

__all__ = ["MambaSktimeForecaster"]


class _Missing:
    """Stands in for the adapter where sktime is not installed."""

    def __init__(self, *args, **kwargs):
        raise ImportError(f"MambaSktimeForecaster needs sktime (pip install sktime): "
                          f"{IMPORT_ERROR}")


if BaseForecaster is None:
    MambaSktimeForecaster = _Missing
else:
    class MambaSktimeForecaster(BaseForecaster):
        """:class:`~numba_mamba.timeseries.MambaForecaster` as an sktime forecaster.

        Univariate, no exogenous data, future horizons only (``fh`` of steps
        1, 2, ...; needed at ``fit``: the forecaster's head is direct).  The
        horizon fitted is the largest step of ``fh``; prediction intervals and
        quantiles come from :meth:`MambaForecaster.predict` with ``quantiles``.
        sktime's tools (``evaluate``, ``ForecastingGridSearchCV``, ...) run it.

        Parameters
        ----------
        season : int or None, optional
        n_seeds, steps : int, optional
        seed : int, optional
        params : dict or None, optional
            Further keyword arguments of :class:`MambaForecaster`.

        Examples
        --------
        >>> import numpy as np, pandas as pd
        >>> from numba_mamba.timeseries import MambaSktimeForecaster
        >>> y = pd.Series(np.sin(2 * np.pi * np.arange(120) / 12) + 5.0)
        >>> f = MambaSktimeForecaster(season=12, steps=0).fit(y, fh=[1, 2, 3])
        >>> f.predict().index.tolist()
        [120, 121, 122]
        """

        _tags = {
            "authors": "numba-mamba",
            "capability:multivariate": False,
            "capability:exogenous": False,
            "capability:insample": False,
            "capability:pred_int": True,
            "capability:pred_int:insample": False,
            "capability:missing_values": False,
            "y_inner_mtype": "pd.Series",
            "requires-fh-in-fit": True,
        }

        def __init__(self, season=None, n_seeds=1, steps=300, seed=0, params=None):
            self.season = season
            self.n_seeds = n_seeds
            self.steps = steps
            self.seed = seed
            self.params = params
            super().__init__()

        def _steps(self, fh):
            rel = np.asarray(fh.to_relative(self.cutoff), dtype=np.int64)
            if rel.min() < 1:
                raise ValueError(f"fh must hold future steps >= 1 (MambaSktimeForecaster has no "
                                 f"in-sample forecasts), got relative steps {rel.tolist()}")
            return rel

        def _fit(self, y, X=None, fh=None):
            rel = self._steps(fh)
            self.forecaster_ = MambaForecaster(season=self.season, n_seeds=self.n_seeds,
                                               steps=self.steps, seed=self.seed,
                                               **(self.params or {}))
            self.forecaster_.fit(y.to_numpy(dtype=np.float64), fh=int(rel.max()))
            return self

        def _predict(self, fh, X=None):
            rel = self._steps(fh)
            point = np.asarray(self.forecaster_.predict(), dtype=np.float64)
            return pd.Series(point[rel - 1], index=fh.to_absolute_index(self.cutoff),
                             name=self._y.name)

        def _predict_quantiles(self, fh, X, alpha):
            rel = self._steps(fh)
            q = np.asarray(self.forecaster_.predict(quantiles=tuple(alpha)), dtype=np.float64)
            name = self._y.name if self._y.name is not None else 0
            cols = pd.MultiIndex.from_product([[name], list(alpha)])
            return pd.DataFrame(q[rel - 1], index=fh.to_absolute_index(self.cutoff), columns=cols)

        @classmethod
        def get_test_params(cls, parameter_set="default"):
            """Small settings for sktime's estimator checks."""
            return [{"steps": 0}, {"season": 4, "steps": 2, "params": {"d_model": 4,
                                                                      "n_layers": 1,
                                                                      "d_state": 2}}]

