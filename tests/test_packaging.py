"""The installed package imports, with its CUDA kernels, away from the source tree."""

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _installed():
    try:
        return importlib.metadata.distribution("numba-mamba")
    except importlib.metadata.PackageNotFoundError:
        return None


@pytest.mark.skipif(_installed() is None, reason="numba-mamba is not installed (pip install .)")
def test_installed_wheel_imports_with_kernels(tmp_path):
    code = (
        "import json, numba_mamba, numba_mamba.cuda_kernels.scan as k, numba_mamba._cpu_scan as c;"
        "print(json.dumps([numba_mamba.__file__, k.__file__, c.__file__]))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    package, kernels, cpu = map(Path, json.loads(result.stdout.strip().splitlines()[-1]))
    # The kernels are a subpackage of the installed numba_mamba (the wheel ships
    # the top-level cuda_kernels/ folder as numba_mamba.cuda_kernels).
    editable = package.parent == REPO / "numba_mamba"
    if editable:  # pip install -e . maps the subpackage onto the source folder
        assert kernels == REPO / "cuda_kernels" / "scan.py"
    else:
        assert "site-packages" in package.parts, f"imported {package}, not an installed copy"
        assert kernels.parent == package.parent / "cuda_kernels"
    assert cpu.parent == package.parent
