"""numba-mamba: Mamba's selective state space scan for NumPy and CuPy arrays.

NumPy arrays run on the CPU through Numba ``@njit`` kernels, CuPy arrays on the
GPU through Numba CUDA kernels; there is no C++ or PyTorch dependency.

Glossary
--------
==========  ===============================================================
``Bt``      batch size
``D``       channels (``d_inner`` in the paper); also the skip parameter D
``L``       sequence length (time is the last axis)
``N``       states per channel (``d_state``)
``G``       groups: channel ``d`` uses the B/C of group ``d // (D // G)``
``delta``   input-dependent time step (Δ in the paper)
``A``       diagonal continuous-time state matrix, one row per channel
``B, C``    input and output matrices, constant or varying along time
==========  ===============================================================

Public functions
----------------
selective_scan       forward scan, returning out (and the last state)
selective_scan_vjp   forward scan and a backward closure returning ScanGrads
reference            readable float64 implementation used as the oracle
discretize           diagonal continuous -> discrete (zoh, euler, backward_diff,
                     bilinear, mamba), with discretize_vjp for its backward
ssm_filter           an SSM as a filter on signals (scipy.signal conventions),
                     with ssm_kernel (its impulse response) and SSMFilter
                     (streaming)

Models (issue 5)
layers               Linear, Embedding, RMSNorm, causal depthwise Conv1d, SiLU,
                     softplus, the scan, each with its hand-written backward
models               MambaConfig, init_params, Mamba and LTI blocks, residual
                     stack with LM / regression heads, losses, loss_and_grads
optim                AdamW, clip_grad_norm, warmup_cosine
training             train (loop with progress bar, checkpoint/resume), seed_everything
checkpoint           save_checkpoint / load_checkpoint (one .npz, no pickle)
inference            prefill, step, generate: recurrent inference

Whole steps and several machines
graphs               CapturedStep: a step captured once as a CUDA graph, then replayed
training             also TrainStep (forward, loss, backward, clipping, AdamW as one step)
inference            also Decoder (static buffers, captured decoding, generate)
distributed          data-parallel training (NCCL or TCP ranks) and its launcher
dask, xarray         ssm_filter and selective_scan on Dask arrays / DataArrays
                     (optional: the ``dask`` extra)

Interop
torch                selective_scan_fn (mamba-ssm's signature) and a Mamba module
                     (optional: the ``torch`` extra)
pretrained           load / save Hugging Face and mamba-ssm checkpoints without torch

Time series (issues 7 and 24)
timeseries           MambaForecaster (an ensemble over lookbacks and seeds, fh at fit,
                     intervals, covariates, panels, backtest, save/load, pickling),
                     MambaClassifier, make_windows, Scaler, metrics mae, rmse, mase,
                     smape, pinball_loss, interval_coverage, seasonal_naive;
                     MambaSktimeForecaster (optional: needs sktime)
"""

import importlib.util as _importlib_util
import sys as _sys
from pathlib import Path as _Path


def _register_kernels():
    """Make ``numba_mamba.cuda_kernels`` the one name of the CUDA kernels.

    A wheel ships them as the subfolder ``numba_mamba/cuda_kernels``; in a
    source tree (on ``sys.path`` or installed editable) the top-level
    ``cuda_kernels/`` folder beside this package is registered here as the
    subpackage.  Either way every kernel file loads as exactly one module,
    ``numba_mamba.cuda_kernels.<name>``; ``import cuda_kernels`` fails.
    """
    name = __name__ + ".cuda_kernels"
    if name in _sys.modules or (_Path(__file__).parent / "cuda_kernels").is_dir():
        return  # (a wheel: the subfolder)
    # the source tree's folder beside this package (also what an editable
    # install maps the name onto; preferred to the mapping, which may be
    # another tree's)
    folder = _Path(__file__).resolve().parent.parent / "cuda_kernels"
    if not (folder / "__init__.py").is_file():
        return  # (no kernels: a CPU-only copy; importing them fails as usual)
    spec = _importlib_util.spec_from_file_location(
        name, folder / "__init__.py", submodule_search_locations=[str(folder)])
    module = _importlib_util.module_from_spec(spec)
    _sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del _sys.modules[name]
        raise
    globals()["cuda_kernels"] = module  # (what the import system does for a subpackage)


_register_kernels()

from . import checkpoint, inference, layers, models, optim, reference, timeseries, training  # noqa: E402
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .discretize import DISCRETIZE_METHODS, DiscretizeGrads, discretize, discretize_vjp
from .filters import SSMFilter, UnstableFilterWarning, ssm_filter, ssm_kernel
from .inference import generate, prefill
from .models import MambaConfig, init_params, loss_and_grads, model_backward, model_forward
from .optim import AdamW, clip_grad_norm, warmup_cosine
from .scan import ScanGrads, selective_scan, selective_scan_vjp
from .timeseries import MambaForecaster
from .training import seed_everything, train

__all__ = [
    # the selective scan
    "ScanGrads", "reference", "selective_scan", "selective_scan_vjp",
    # sequence filters
    "DISCRETIZE_METHODS", "DiscretizeGrads", "SSMFilter", "UnstableFilterWarning", "discretize",
    "discretize_vjp", "ssm_filter", "ssm_kernel",
    # models
    "AdamW", "CheckpointError", "MambaConfig", "checkpoint", "clip_grad_norm", "generate",
    "inference", "init_params", "layers", "load_checkpoint", "loss_and_grads", "model_backward",
    "model_forward", "models", "optim", "prefill", "save_checkpoint", "seed_everything", "train",
    "training", "warmup_cosine",
    # forecasting
    "MambaForecaster", "timeseries",
]
__version__ = "0.1.0"
