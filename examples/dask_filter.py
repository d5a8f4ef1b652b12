"""Filter a long multichannel record that is never held whole, with Dask (issue 25).

A record of 16 sensors x 2^22 samples (512 MiB of float64) is generated
chunk by chunk, as it would be read from a zarr or netCDF store; a bank of
diagonal state space filters (a slow and a fast band per sensor) runs on it
lazily with ``numba_mamba.ssm_filter`` -- the same call as for a NumPy array
-- and only small reductions come back: the power per sensor of the
filtered signal and the final state (to continue the record later).  The
result is checked against the same filter run on the chunks one after
another with ``zi``/``zf``.

Run ``python examples/dask_filter.py`` (under a minute on 2 cores) or
``python examples/dask_filter.py --scheduler tcp://host:8786`` on a cluster:
the code is the same, only the scheduler differs.
"""

import argparse
import time

import dask
import dask.array as da
import numpy as np

import numba_mamba as nm

SENSORS, LENGTH, CHUNK = 16, 2**22, 2**18


def record(start, n):
    """Samples ``start .. start + n`` of the record: a daily cycle, noise, and a
    step at sample 3,000,000 on sensor 0 (a function of position only)."""
    t = np.arange(start, start + n)
    rng = np.random.default_rng([7, start])
    x = np.sin(2 * np.pi * t / 86_400)[None, :] + 0.5 * rng.standard_normal((SENSORS, n))
    x[0] += t >= 3_000_000
    return x


def lazy_record():
    def block(block_info=None):
        (_, _), (start, stop) = block_info[None]["array-location"]
        return record(start, stop - start)

    return da.map_blocks(block, chunks=((SENSORS,), (CHUNK,) * (LENGTH // CHUNK)),
                         dtype=np.float64, meta=np.empty((0, 0)))


def filter_bank():
    """Two states per sensor: time constants of 1,000 and 30 samples."""
    A = np.tile([-1e-3, -1 / 30], (SENSORS, 1))
    B = np.ones((SENSORS, 2))
    C = np.tile([1e-3, -1 / 30], (SENSORS, 1))  # slow minus fast: a band-pass
    return A, B, C


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scheduler", default=None,
                        help="a dask.distributed scheduler address (default: threads here)")
    args = parser.parse_args()
    client = None
    if args.scheduler:
        from distributed import Client
        client = Client(args.scheduler)

    A, B, C = filter_bank()
    x = lazy_record()
    t0 = time.perf_counter()
    y, zf = nm.ssm_filter(A, B, C, x, zi=np.zeros((SENSORS, 2)))   # lazy: nothing runs yet
    power, state = dask.compute((y ** 2).mean(axis=-1), zf)
    print(f"{SENSORS} sensors x {LENGTH} samples ({x.nbytes / 2**20:.0f} MiB) in "
          f"{x.numblocks[1]} chunks: {time.perf_counter() - t0:.1f} s with Dask")
    print("band power per sensor:", np.round(power, 4))

    # the same, chunk after chunk with zi/zf
    h = np.zeros((SENSORS, 2))
    acc = np.zeros(SENSORS)
    t0 = time.perf_counter()
    for start in range(0, LENGTH, CHUNK):
        yk, h = nm.ssm_filter(A, B, C, record(start, CHUNK), zi=h)
        acc += (yk ** 2).sum(axis=-1)
    print(f"chunk after chunk with zi/zf: {time.perf_counter() - t0:.1f} s")
    assert np.allclose(power, acc / LENGTH, rtol=1e-10), "Dask and the loop disagree"
    assert np.allclose(state, h, rtol=1e-10, atol=1e-12), "final states disagree"
    print("Dask result equals the chunked loop: yes")
    if client is not None:
        client.close()


if __name__ == "__main__":
    main()
