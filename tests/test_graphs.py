"""CapturedStep on the CPU: eager execution, argument checks (the capture itself: test_gpu_graphs.py)."""

import numpy as np
import pytest

from numba_mamba.graphs import CapturedStep, check_graph_mode


def test_numpy_steps_run_eagerly_every_call_and_return_fn_result():
    x = np.zeros(2)
    calls = []

    def fn():
        calls.append(1)
        x[...] += 1
        return x.sum()

    step = CapturedStep(fn, xp=np)
    assert [step() for _ in range(4)] == [2.0, 4.0, 6.0, 8.0]
    assert len(calls) == 4 and not step.captured


def test_graph_false_runs_eagerly_without_cupy():
    n = []
    step = CapturedStep(lambda: n.append(1), graph=False)
    for _ in range(3):
        step()
    assert len(n) == 3 and not step.captured


@pytest.mark.parametrize("bad", ["yes", 1, 0, None, "True"])
def test_graph_mode_must_be_auto_true_or_false(bad):
    with pytest.raises(ValueError, match="^graph must be 'auto', True or False, got"):
        check_graph_mode(bad)
    with pytest.raises(ValueError, match="^graph must be"):
        CapturedStep(lambda: None, graph=bad)
