"""What the GPU comparisons of the filter functions share (test_ssm_filter.py,
test_discretize.py): random diagonal systems, and the comparison of a GPU result
with the CPU path's on the same inputs."""

import numpy as np

__all__ = ["METHODS", "GPU_VS_CPU_TOL", "system", "close"]

METHODS = ("zoh", "euler", "backward_diff", "bilinear", "mamba")

# max |gpu - cpu| / max(|cpu|, 1): both compute in the dtype under test
GPU_VS_CPU_TOL = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 1e-4}


def close(name, got, ref, dtype):
    """``got`` (CuPy or NumPy) within ``GPU_VS_CPU_TOL`` of ``ref`` (NumPy), relative to
    ``max(|ref|, 1)``."""
    got = got.get() if hasattr(got, "get") else np.asarray(got)
    assert got.shape == ref.shape, f"{name}: shape {got.shape} != {ref.shape}"
    err = float(np.max(np.abs(got.astype(np.complex128) - ref))) / max(
        float(np.max(np.abs(ref))), 1.0)
    assert err <= GPU_VS_CPU_TOL[np.dtype(dtype)], f"{name}: max relative error {err:.3e}"


def system(rng, lead, N, cplx, dtype):
    """Random ``A`` (stable), ``B``, ``C`` of shape ``lead + (N,)``; complex ``A`` and
    ``C`` where ``cplx``."""
    # with dt <= 0.3 every method is stable, 'euler' included (|1 + dt A| < 1)
    ctype = (np.complex64 if dtype == np.float32 else np.complex128) if cplx else dtype
    A = -rng.uniform(0.2, 3.0, lead + (N,))
    if cplx:
        A = A + 1j * rng.uniform(-1, 1, A.shape)
    B = rng.standard_normal(lead + (N,))
    C = rng.standard_normal(lead + (N,))
    return A.astype(ctype), B.astype(dtype), C.astype(ctype)
