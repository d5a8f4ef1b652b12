"""numba-mamba: Mamba's selective state space scan for NumPy and CuPy arrays."""
