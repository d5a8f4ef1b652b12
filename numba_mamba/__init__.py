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
"""

from . import reference
from .scan import ScanGrads, selective_scan, selective_scan_vjp

__all__ = ["ScanGrads", "reference", "selective_scan", "selective_scan_vjp"]
__version__ = "0.1.0"
