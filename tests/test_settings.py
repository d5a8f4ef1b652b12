"""The kernels' tunables, ``numba_mamba.cuda_kernels.settings.settings``: what
the launchers do follows it, and an override is undone after its block.

On the CPU: the engine chooser, the state engine's plan, splits and launch
bounds read in-process; the saved states of the state engine's forward (their
shape follows ``save_every``) under the CUDA simulator in a subprocess.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from numba_mamba.cuda_kernels import scan, scan_blocks, scan_states
from numba_mamba.cuda_kernels.settings import Settings, settings

ROOT = pathlib.Path(__file__).resolve().parents[1]
F32, F64 = np.dtype(np.float32), np.dtype(np.float64)


def test_the_kernel_modules_read_the_one_settings_object():
    assert scan.settings is settings and scan_states.settings is settings


def test_the_engine_chooser_follows_the_settings_and_the_override_is_undone():
    assert settings.engine == "auto"
    assert scan.choose_engine(8, 1536, 16) == "states" and scan.choose_engine(1, 4, 4) == "states"
    assert scan.choose_engine(1, 4, 129) == "blocks"  # more states than a block holds
    with settings.override(engine="blocks"):
        assert scan.choose_engine(1, 4, 4) == "blocks"
    with settings.override(min_recurrences=17):
        assert scan.choose_engine(1, 4, 4) == "blocks"
    with settings.override(engine="states"):
        assert scan.choose_engine(8, 1536, 16) == "states"
    assert settings.engine == "auto" and settings.min_recurrences == 1
    assert scan.choose_engine(1, 4, 4) == "states"


def test_an_override_is_undone_after_an_exception_and_refuses_bad_fields_first():
    with pytest.raises(RuntimeError):
        with settings.override(save_every=4, direct_half=False):
            assert (settings.save_every, settings.direct_half) == (4, False)
            raise RuntimeError
    assert (settings.save_every, settings.direct_half) == (1, True)
    for changes, error, pattern in [
            (dict(save_every=2, savee_every=3), AttributeError, "no field 'savee_every'"),
            (dict(engine="fast"), ValueError, "engine must be one of"),
            (dict(save_every=0), ValueError, "save_every must be at least 1, got 0"),
            (dict(save_every=2.0), TypeError, "save_every must be an int, got float"),
            (dict(raw_launch="no"), TypeError, "raw_launch must be a bool, got str"),
            (dict(deterministic=1), TypeError, "deterministic must be a bool, got int"),
            (dict(gemm_tuning="yes"), TypeError, "gemm_tuning must be a bool, got str"),
            (dict(gemm_tuning_min_flops=0), ValueError, "gemm_tuning_min_flops must be at least 1"),
            (dict(gemm_tuning_min_flops=1.5), TypeError, "gemm_tuning_min_flops must be an int"),
            (dict(min_blocks={(F32, "sideways"): 2}), ValueError, "min_blocks maps")]:
        with pytest.raises(error, match=pattern):
            settings.override(**changes)
        assert settings.save_every == 1  # (nothing changed)
    with pytest.raises(AttributeError, match="no field 'SAVE_EVERY'"):
        settings.SAVE_EVERY = 8


def test_assignment_and_reset():
    own = Settings()
    own.save_every = np.int64(4)
    assert own.save_every == 4 and type(own.save_every) is int
    own.min_blocks = {(np.float32, "forward"): 3}
    assert own.min_blocks[(F32, "forward")] == 3
    with pytest.raises(TypeError):  # (a read-only table: replaced whole, not edited)
        own.min_blocks[(F32, "forward")] = 4
    own.reset()
    assert own.as_dict() == Settings().as_dict() and own.save_every == 1
    assert settings.as_dict() == Settings().as_dict()  # (the package's own, untouched)


def test_the_state_engines_plan_splits_and_bounds_follow_the_settings():
    p = scan_states.plan(F32, 16, 1536, 1, 1)
    assert p.save_every == 1
    with settings.override(save_every=4):
        assert scan_states.plan(F32, 16, 1536, 1, 1).save_every == 4
    assert scan_states.plan(F32, 16, 1536, 1, 1) == p
    # one channel block of 8 at L = 4096: split to approach the target blocks
    small = scan_states.plan(F32, 16, 8, 1, 1)
    S, _ = scan_states.segments(1, 8, 4096, small)
    with settings.override(target_blocks=1):
        assert scan_states.segments(1, 8, 4096, small) == (1, 4096)
    with settings.override(forward_split_below=1):  # (one block: not below 1)
        assert scan_states.segments(1, 8, 4096, small) == (1, 4096)
    with settings.override(forward_split_below=2):
        assert scan_states.segments(1, 8, 4096, small)[0] == S
    # 384 blocks of 8 channels: enough not to split by default
    assert scan_states.segments(2, 1536, 16384, p)[0] == 1
    with settings.override(forward_split_below=385):
        assert scan_states.segments(2, 1536, 16384, p)[0] == -(-settings.target_blocks // 384)
    with settings.override(min_segment=2048):
        assert scan_states.segments(1, 8, 4096, small)[0] == min(S, 2)
    assert S > 2 and scan_states.segments(1, 8, 4096, small)[0] == S
    Sb, _ = scan_states.backward_segments(1, 8, 4096, small)
    with settings.override(backward_target_blocks=0):
        assert scan_states.backward_segments(1, 8, 4096, small) == (1, 4096)
    assert Sb > 1
    assert scan_states.launch_bounds(F32, "backward", 128) == (128, 5)
    with settings.override(min_blocks={**settings.min_blocks, (F32, "backward"): 0}):
        assert scan_states.launch_bounds(F32, "backward", 128) == (128,)
    assert scan_states.launch_bounds(F32, "backward", 128) == (128, 5)


def test_the_block_engines_default_tuning_follows_the_settings():
    assert scan._tuning(F32, None, None, settings) == (128, 16)
    with settings.override(blocks_tuning={F32: (64, 4), F64: (32, 2)}):
        assert scan._tuning(F32, None, 8, settings) == (64, 8)
        names = [name for name, *_ in scan_blocks.ptx_signatures()]
        assert "forward_float32_t64_i4" in names and "forward_float64_t32_i2" in names
    assert scan._tuning(F64, None, None, settings) == (128, 8)


_SIMULATED = r"""
import json
import numpy as np
from numba_mamba.cuda_kernels import scan_states
from numba_mamba.cuda_kernels.settings import settings
from tests.scan_cases import make_inputs

kw = make_inputs(np.random.default_rng(0), Bt=1, Dc=2, L=40, N=3, dtype=np.float32,
                 D=True, z=True)
args = (kw["u"], kw["delta"], kw["A"], kw["B"][:, None], kw["C"][:, None], kw["D"], kw["z"],
        None, False, None)
shapes, outs = {}, {}
for name, every in (("default", None), ("override", 4), ("after", None)):
    if every is None:
        out, last, saved = scan_states.scan_forward(*args, tuning=(2, 8, 2))
    else:
        with settings.override(save_every=every):
            out, last, saved = scan_states.scan_forward(*args, tuning=(2, 8, 2))
    shapes[name] = [list(saved.tile_states.shape), saved.plan.save_every]
    outs[name] = out
    dout = np.ones_like(out)
    grads = scan_states.scan_backward(dout, None, *args, saved)
    outs[name + "-du"] = grads[0]
same = all(np.array_equal(outs["default"], outs[k]) for k in ("override", "after"))
close = bool(np.allclose(outs["default-du"], outs["override-du"], rtol=1e-5, atol=1e-6))
print(json.dumps(dict(shapes=shapes, same_out=bool(same), same_du=close)))
"""


def test_save_every_changes_the_saved_states_of_the_simulated_forward():
    """Under the CUDA simulator: the forward keeps one state per backward tile of 2
    steps by default (20 for L = 40), one in 4 tiles (5) inside an override of
    ``save_every`` and 20 again after it; output and gradient agree."""
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", _SIMULATED], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["shapes"] == {"default": [[1, 2, 20, 3], 1], "override": [[1, 2, 5, 3], 4],
                                "after": [[1, 2, 20, 3], 1]}, report
    assert report["same_out"] and report["same_du"], report


def test_the_generation_changes_with_every_change_of_a_field():
    """Launchers key their per-layout plans on ``settings.generation``."""
    seen = [settings.generation]
    with settings.override(save_every=4):
        seen.append(settings.generation)
    seen.append(settings.generation)
    previous = settings.min_segment
    settings.min_segment = 128
    seen.append(settings.generation)
    settings.min_segment = previous
    seen.append(settings.generation)
    assert len(set(seen)) == len(seen)
