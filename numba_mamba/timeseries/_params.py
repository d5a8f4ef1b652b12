"""The scikit-learn parameter convention shared by the forecaster and the classifier."""

import inspect

__all__ = ["Params"]


class Params:
    """``get_params`` / ``set_params`` over the constructor's named arguments (scikit-learn's
    convention); the class defines ``_validate()`` and may name removed arguments in
    ``_REMOVED`` (name -> why)."""

    _REMOVED = {}

    @classmethod
    def _param_names(cls):
        sig = inspect.signature(cls.__init__)
        return [p.name for p in sig.parameters.values()
                if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]

    def get_params(self, deep=True):
        """The constructor arguments, as given (scikit-learn convention)."""
        return {k: getattr(self, k) for k in self._param_names()}

    def set_params(self, **params):
        """Set constructor arguments (checked as by the constructor); returns self.

        Raises
        ------
        ValueError
            An argument the constructor does not have, or a value it rejects
            (the parameters are then left as they were).
        """
        names = self._param_names()
        for k in params:
            if k not in names:
                hint = f" ({self._REMOVED[k]})" if k in self._REMOVED else ""
                raise ValueError(f"invalid parameter {k!r} for {type(self).__name__}{hint}; "
                                 f"valid parameters: {', '.join(names)}")
        old = self.get_params()
        for k, v in params.items():
            setattr(self, k, v)
        try:
            self._validate()
        except (TypeError, ValueError):
            for k, v in old.items():
                setattr(self, k, v)
            raise
        return self
