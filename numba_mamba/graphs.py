"""Whole steps as CUDA graphs: a step's GPU work captured once, replayed per call.

A training or decoding step launches hundreds of small kernels; launched one
by one from Python, each pays the interpreter and the driver (several
microseconds), and a small model's step is bound by the host.  A CUDA graph
records the launches of one step once (CuPy's stream capture) and replays
them with one driver call.

What a captured function must do
--------------------------------
- Read its inputs from, and write its results into, arrays that outlive the
  graph ("static buffers"): a replay runs the same kernels on the same
  addresses.  New inputs are copied into the static buffers before a replay.
- Never wait for the device: no ``float(x)``, ``int(x)``, ``x.get()``,
  ``x.item()``, no stream synchronization (a loss stays on the device).
- Take any value that changes from step to step (a learning rate, a step
  count, a random seed's counter) from device memory, not as a Python number:
  Python numbers are written into the graph at capture.
- Change no host state (a Python counter, a list): what the function does on
  the host happens once, at the capture, not at each replay.

Temporaries the function allocates during the capture come from a memory pool
of the graph's own, kept as long as the graph: no other code can be handed
that memory while a replay may still write it.

References
----------
.. [1] NVIDIA, "CUDA C++ Programming Guide", section "CUDA Graphs".
"""

import warnings

import numpy as np

__all__ = ["CaptureWarning", "CapturedStep", "GRAPH_MODES"]

#: Values of the ``graph`` argument: capture where possible and run eagerly
#: (with a :class:`CaptureWarning`) where the capture fails; always capture
#: (a failure raises); never capture.
GRAPH_MODES = ("auto", True, False)


class CaptureWarning(RuntimeWarning):
    """A step could not be captured as a CUDA graph and runs eagerly."""


def check_graph_mode(graph):
    """Raise unless ``graph`` is one of :data:`GRAPH_MODES`; return it."""
    if not any(graph is m or (isinstance(graph, str) and graph == m) for m in GRAPH_MODES):
        raise ValueError(f"graph must be 'auto', True or False, got {graph!r}")
    return graph


class CapturedStep:
    """``fn()`` run as a CUDA graph: eagerly once, then captured, then replayed.

    Parameters
    ----------
    fn : callable
        ``fn()`` does one step's work on CuPy arrays that stay alive between
        calls (see the module's notes: no waiting for the device, changing
        values read from device memory).  Its return value (arrays allocated
        by the call, say) is returned by each call; after the capture it is
        the captured call's, whose arrays every replay writes again.
    graph : {'auto', True, False}, optional
        ``'auto'`` (default) captures and, where the capture fails, warns
        with :class:`CaptureWarning` and runs ``fn`` eagerly from then on;
        ``True`` raises instead; ``False`` always runs ``fn`` eagerly.
    xp : module, optional
        ``numpy`` runs ``fn`` eagerly (nothing to capture on the CPU);
        default ``cupy``.

    Notes
    -----
    The first call runs ``fn`` eagerly: it compiles and loads the kernels and
    creates the libraries' handles, none of which may happen during a
    capture.  The second call captures ``fn`` on a stream of its own (the
    capture runs nothing) and launches the graph on CuPy's current stream;
    every later call launches it again.  Results therefore agree with the
    eager path to the bit wherever the kernels themselves are deterministic
    (reductions with atomics are not).

    Examples
    --------
    On NumPy arrays a step runs eagerly:

    >>> import numpy as np
    >>> from numba_mamba.graphs import CapturedStep
    >>> acc = np.zeros(3)
    >>> def add_one():
    ...     acc[...] += 1
    >>> step = CapturedStep(add_one, xp=np)
    >>> for _ in range(3):
    ...     step()
    >>> acc, step.captured
    (array([3., 3., 3.]), False)
    """

    def __init__(self, fn, graph="auto", xp=None):
        self._fn = fn
        self._mode = check_graph_mode(graph)
        self._eager = xp is np or graph is False
        self._calls = 0
        self._graph = None
        self._pool = None
        self._result = None

    @property
    def captured(self):
        """True once ``fn`` is captured and calls replay the graph."""
        return self._graph is not None

    def __call__(self):
        self._calls += 1
        if self._graph is not None:
            import cupy

            self._graph.launch(cupy.cuda.get_current_stream())
            return self._result
        if self._eager or self._calls == 1:
            return self._fn()
        try:
            self._capture()
        except Exception as exc:  # noqa: BLE001 (any failure: the eager path it is)
            if self._mode is True:
                raise
            self._eager = True
            warnings.warn(f"could not capture {getattr(self._fn, '__qualname__', self._fn)!r} "
                          f"as a CUDA graph ({type(exc).__name__}: {exc}); running it eagerly",
                          CaptureWarning, stacklevel=2)
            return self._fn()
        return self()

    def _capture(self):
        import cupy

        current = cupy.cuda.get_current_stream()
        stream = cupy.cuda.Stream(non_blocking=True)
        stream.wait_event(current.record())  # (work queued before is visible to the capture)
        pool = cupy.cuda.MemoryPool()
        with cupy.cuda.using_allocator(pool.malloc), stream:
            stream.begin_capture()
            try:
                result = self._fn()
            except BaseException:
                try:
                    stream.end_capture()
                except Exception:  # noqa: BLE001 (an invalidated capture ends with an error)
                    pass
                raise
            graph = stream.end_capture()
        current.wait_event(stream.record())
        self._graph, self._pool, self._result = graph, pool, result
        self._stream = stream  # (kept: the graph was captured on it)
