"""Seconds to import numba-mamba and make the first call of a 130m-shaped model.

A model of mamba-130m's shape (d_model 768, 24 layers, vocab 50280, N 16,
float32) prefills ``(1, 64)`` tokens through ``numba_mamba.inference.prefill``
in a fresh process; what a new process pays before its first result is the
import and the compilation (or loading from Numba's disk cache) of every
kernel the call launches.  Run it three times::

    export NUMBA_CACHE_DIR=$(mktemp -d)
    python benchmarks/first_call.py            # empty cache: compiles, fills it
    python benchmarks/first_call.py            # loads the kernels from the cache
    python benchmarks/first_call.py --no-cache # compiles without the cache

``--no-cache`` compiles every kernel without Numba's disk cache (it sets
``NUMBA_MAMBA_KERNEL_CACHE=0`` for the child).  Each run is a child process
of this script, so that nothing is imported before the clock starts; one line
of JSON is printed per run.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, sys, time
t0 = float(sys.argv[1])
import cupy
t_cupy = time.perf_counter()
import numba_mamba as nm
from numba_mamba import inference, models
t_import = time.perf_counter()
cfg = models.MambaConfig(d_model=768, n_layers=24, vocab_size=50280, d_state=16)
params = models.init_params(cfg, dtype=cupy.float32, xp=cupy)
tokens = cupy.asarray((cupy.arange(64) * 7919) % 50280, dtype=cupy.int64).reshape(1, 64)
cupy.cuda.get_current_stream().synchronize()
t_params = time.perf_counter()
logits, state = inference.prefill(tokens, params, cfg)
cupy.cuda.get_current_stream().synchronize()
t_first = time.perf_counter()
logits, state = inference.prefill(tokens, params, cfg)
cupy.cuda.get_current_stream().synchronize()
t_second = time.perf_counter()
from numba_mamba.cuda_kernels import _launch
print(json.dumps({
    "import_cupy_s": round(t_cupy - t0, 3),
    "import_numba_mamba_s": round(t_import - t_cupy, 3),
    "init_params_s": round(t_params - t_import, 3),
    "first_prefill_s": round(t_first - t_params, 3),
    "second_prefill_s": round(t_second - t_first, 3),
    "import_and_first_call_s": round(t_first - t0 - (t_params - t_import), 3),
    "cache_refusals": len(_launch.cache_refusals()),
}))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-cache", action="store_true",
                        help="compile every kernel without Numba's disk cache")
    args = parser.parse_args()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    if args.no_cache:
        env["NUMBA_MAMBA_KERNEL_CACHE"] = "0"
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", _CHILD, repr(start)], env=env,
                            capture_output=True, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stderr)
        raise SystemExit(result.returncode)
    line = json.loads(result.stdout.strip().splitlines()[-1])
    line["cache"] = "off" if args.no_cache else env.get("NUMBA_CACHE_DIR", "numba's default")
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
