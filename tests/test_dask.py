"""ssm_filter and selective_scan on Dask arrays (numba_mamba.dask) against the single-array call."""

import functools
import threading

import numpy as np
import pytest

import numba_mamba as nm

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")
Callback = pytest.importorskip("dask.callbacks").Callback


def close(got, want, rtol=1e-12):
    """Equal to float64 rounding: relative to each entry and to the largest."""
    got = np.asarray(got)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())


def compute(*arrays):
    return dask.compute(*arrays, scheduler="threads")


def check(lazy, want, rtol=1e-12):
    """Compute the Dask arrays ``lazy`` (threaded) and compare each with ``want``'s."""
    for got, expected in zip(compute(*lazy), want, strict=True):
        close(got, expected, rtol)


@pytest.fixture
def rng():
    return np.random.default_rng(7)


def lti(rng, lead, N, cplx=False):
    A = -rng.uniform(0.05, 1.0, lead + (N,))
    if cplx:
        A = A + 1j * rng.uniform(-0.5, 0.5, lead + (N,))
    B = rng.standard_normal(lead + (N,))
    C = rng.standard_normal(lead + (N,)) + (1j * rng.standard_normal(lead + (N,)) if cplx else 0)
    return A, B, C


# ------------------------------------------------------------------ ssm_filter
@pytest.mark.parametrize("time_chunks", [(50,), (1, 7, 13, 29), (1,) * 12 + (38,), (25, 25)])
def test_filter_lti_any_time_chunks(rng, time_chunks):
    A, B, C = lti(rng, (3,), 4)
    x = rng.standard_normal((3, 50))
    zi = rng.standard_normal((3, 4))
    D = rng.standard_normal((3, 1))
    xd = da.from_array(x, chunks=((2, 1), time_chunks))
    y, zf = nm.ssm_filter(A, B, C, xd, D=D, dt=0.3, zi=zi)
    assert isinstance(y, da.Array) and isinstance(zf, da.Array)
    assert y.chunks == xd.chunks and zf.chunks == ((2, 1), (4,))
    want, want_zf = nm.ssm_filter(A, B, C, x, D=D, dt=0.3, zi=zi)
    check((y, zf), (want, want_zf))


def test_filter_no_zi_returns_y_only(rng):
    A, B, C = lti(rng, (2,), 3)
    x = rng.standard_normal((2, 40))
    y = nm.ssm_filter(A, B, C, da.from_array(x, chunks=(1, 9)))
    assert isinstance(y, da.Array)
    close(compute(y)[0], nm.ssm_filter(A, B, C, x))


@pytest.mark.parametrize("method", ["bilinear", "euler", "backward_diff", "mamba"])
def test_filter_complex_time_axis_0(rng, method):
    A, B, C = lti(rng, (4,), 3, cplx=True)
    x = rng.standard_normal((60, 4))
    zi = rng.standard_normal((4, 3)) + 1j * rng.standard_normal((4, 3))
    y, zf = nm.ssm_filter(A, B, C, da.from_array(x, chunks=(17, 3)), dt=0.2, method=method,
                          axis=0, zi=zi)
    want, want_zf = nm.ssm_filter(A, B, C, x, dt=0.2, method=method, axis=0, zi=zi)
    check((y, zf), (want, want_zf))


@pytest.mark.parametrize("method", ["zoh", "euler"])
def test_filter_time_varying(rng, method):
    """dt per sample (a Dask array chunked otherwise than x), B and C varying along time."""
    L = 45
    A = -rng.uniform(0.1, 1.0, (2, 5))
    x = rng.standard_normal((2, L))
    B = rng.standard_normal((2, L, 5))
    C = rng.standard_normal((2, L, 5))
    dt = rng.uniform(0.05, 0.5, (2, L))
    zi = rng.standard_normal((2, 5))
    y, zf = nm.ssm_filter(A, B, C, da.from_array(x, chunks=(2, (1, 20, 24))),
                          dt=da.from_array(dt, chunks=(1, 15)), method=method, zi=zi,
                          axis=-1)
    want, want_zf = nm.ssm_filter(A, B, C, x, dt=dt, method=method, zi=zi)
    check((y, zf), (want, want_zf))


def test_filter_dt_per_sample_constant_b(rng):
    A, B, C = lti(rng, (3,), 4)
    x = rng.standard_normal((3, 30))
    dt = rng.uniform(0.05, 0.5, 30)
    y = nm.ssm_filter(A, B, C, da.from_array(x, chunks=(3, 7)), dt=dt)
    close(compute(y)[0], nm.ssm_filter(A, B, C, x, dt=dt))


def test_filter_broadcasts_one_signal_over_a_bank(rng):
    """A single signal (1, L) through 4 channels of filters: y (4, L)."""
    A, B, C = lti(rng, (4,), 6)
    x = rng.standard_normal((1, 33))
    y = nm.ssm_filter(A, B, C, da.from_array(x, chunks=10))
    assert y.shape == (4, 33)
    close(compute(y)[0], nm.ssm_filter(A, B, C, x))


def test_filter_conv_mode_and_float32(rng):
    A, B, C = lti(rng, (2,), 4)
    x = rng.standard_normal((2, 64))
    y = nm.ssm_filter(A, B, C, da.from_array(x, chunks=(2, 20)), mode="conv")
    close(compute(y)[0], nm.ssm_filter(A, B, C, x))
    x32 = x.astype(np.float32)
    y32 = nm.ssm_filter(A, B, C, da.from_array(x32, chunks=(2, 20)))
    assert y32.dtype == np.float32
    close(compute(y32)[0], nm.ssm_filter(A, B, C, x32), rtol=1e-5)


def test_filter_is_lazy_and_reads_each_chunk_once():
    A = -np.linspace(0.1, 1, 4)[None].repeat(2, 0)
    B = np.ones((2, 4))
    C = np.ones((2, 4))
    calls = []
    lock = threading.Lock()

    def piece(block_info=None):
        with lock:
            calls.append(block_info[None]["chunk-location"])
        start = block_info[None]["array-location"][1][0]
        return np.sin(0.1 * np.arange(start, start + block_info[None]["chunk-shape"][1])
                      )[None].repeat(2, 0)

    x = da.map_blocks(piece, chunks=((2,), (10,) * 5), dtype=np.float64)
    y, zf = nm.ssm_filter(A, B, C, x, zi=np.zeros((2, 4)))
    assert calls == []  # nothing computed to build the graph
    got, got_zf = compute(y, zf)
    assert sorted(calls) == [(0, k) for k in range(5)]  # each chunk once, shared by both passes
    want, want_zf = nm.ssm_filter(A, B, C, np.sin(0.1 * np.arange(50))[None].repeat(2, 0),
                                  zi=np.zeros((2, 4)))
    close(got, want)
    close(got_zf, want_zf)


class HeldChunks(Callback):
    """The most arrays with ``width`` samples that the scheduler held at once."""

    def __init__(self, width):
        super().__init__()
        self.width, self.most = width, 0

    def _posttask(self, key, result, dsk, state, worker_id):
        held = sum(isinstance(v, np.ndarray) and v.shape[-1] == self.width
                   for v in state["cache"].values())
        self.most = max(self.most, held)


@pytest.mark.parametrize("ahead", [1, 3])
def test_filter_streams(ahead):
    """In Dask's order (the synchronous scheduler) the chunks stream: a few
    held at once, whatever their number (see the benchmark for a cluster)."""
    A, B, C = lti(np.random.default_rng(0), (2,), 3)
    x = da.random.default_rng(1).standard_normal((2, 8 * 40), chunks=(2, 8))
    with dask.config.set({"numba-mamba.lookahead": ahead, "numba-mamba.prefix": "chain"}):
        y, zf = nm.ssm_filter(A, B, C, x, zi=np.zeros((2, 3)))
    with HeldChunks(8) as held:
        total, h = dask.compute(y.sum(axis=-1), zf, scheduler="sync")
    assert held.most <= ahead + 2
    want, want_h = nm.ssm_filter(A, B, C, x.compute(), zi=np.zeros((2, 3)))
    close(np.asarray(total), want.sum(axis=-1))
    close(np.asarray(h), want_h)


def test_lookahead_setting():
    for bad in (0, 2.5, True):
        with dask.config.set({"numba-mamba.lookahead": bad}), \
                pytest.raises(ValueError, match="numba-mamba.lookahead must be an integer"):
            nm.ssm_filter(np.array([-1.0]), np.ones(1), np.ones(1), da.ones(10, chunks=5))


def test_lookahead_automatic():
    """Unset, the lookahead is twice the scheduler's threads shared by the blocks of channels."""
    from numba_mamba.dask import lookahead, parallelism

    with dask.config.set(scheduler="sync"):
        assert (parallelism(), lookahead(), lookahead(3)) == (1, 2, 1)
    with dask.config.set(scheduler="threads", num_workers=5):
        assert (parallelism(), lookahead(), lookahead(4)) == (5, 10, 3)
    with dask.config.set({"numba-mamba.lookahead": 7}):
        assert lookahead(4) == 7  # (a set value is per block)


def prefix_depth(graph, key):
    """The most prefix compositions on a path of the graph into ``key``."""
    @functools.cache
    def depth(k):
        task = graph[k]
        deps = [d for d in task[1:] if isinstance(d, tuple) and d in graph] \
            if isinstance(task, tuple) else []
        own = isinstance(k, tuple) and str(k[0]).startswith("prefix-")
        return own + max((depth(d) for d in deps), default=0)
    return depth(key)


@pytest.mark.parametrize("with_zi", [True, False])
def test_filter_tree_prefix(rng, with_zi):
    """With a lookahead of all the chunks the prefix over them is a tree, log2 deep."""
    A, B, C = lti(rng, (3,), 4)
    x = rng.standard_normal((3, 100))
    zi = rng.standard_normal((3, 4)) if with_zi else None
    xd = da.from_array(x, chunks=((2, 1), (1, 9, 10, 3, 7, 12, 8, 8, 1, 11, 10, 10, 10)))
    with dask.config.set({"numba-mamba.lookahead": 13}, scheduler="threads", num_workers=2):
        got = nm.ssm_filter(A, B, C, xd, zi=zi)
    got = got if with_zi else (got,)
    graph = dict(got[-1].__dask_graph__())
    prefix = [k for k in graph if str(k[0]).startswith("prefix-")]
    assert len(prefix) == 2 * (6 + 6 + 5 + 5 if with_zi else 6 + 6 + 4 + 4)  # (2 blocks)
    last = max(k for k in graph if str(k[0]).startswith("state-") and k[1] == 0)
    assert prefix_depth(graph, last) == 4  # ceil(log2 13), where a chain has 12
    want = nm.ssm_filter(A, B, C, x, zi=zi)
    check(got, want if with_zi else (want,))
    with dask.config.set({"numba-mamba.lookahead": 12 if with_zi else 11}, scheduler="threads",
                         num_workers=2):
        chain = nm.ssm_filter(A, B, C, xd, zi=zi)
    graph = dict((chain[-1] if with_zi else chain).__dask_graph__())
    assert not any(str(k[0]).startswith("prefix-") for k in graph)


def test_sequential_on_one_thread(rng):
    """Built for a scheduler of one thread, the graph has no pass 1: each chunk
    runs from the one before's final state (a loop with zi/zf)."""
    A, B, C = lti(rng, (3,), 4, cplx=True)
    x = rng.standard_normal((3, 60))
    u, delta, sA, sB, sC = scan_args(rng, 2, 3, 4, 50)
    with dask.config.set(scheduler="sync"):
        y = nm.ssm_filter(A, B, C, da.from_array(x, chunks=(2, (1, 20, 39))), dt=0.2)
        yz = nm.ssm_filter(A, B, C, da.from_array(x, chunks=(3, 7)), zi=np.ones((3, 4)))
        s, h = nm.selective_scan(da.from_array(u, chunks=(1, 2, 11)), delta, sA, sB, sC,
                                 delta_softplus=True, return_last_state=True)
    for lazy in (y, yz[1], h):
        names = {str(k[0]).rsplit("-", 1)[0] for k in dict(lazy.__dask_graph__())}
        assert "pass2" in names and "pass1" not in names and "prefix" not in names
    check((y,) + yz + (s, h), (nm.ssm_filter(A, B, C, x, dt=0.2),)
          + nm.ssm_filter(A, B, C, x, zi=np.ones((3, 4)))
          + nm.selective_scan(u, delta, sA, sB, sC, delta_softplus=True, return_last_state=True))
    with dask.config.set({"numba-mamba.prefix": "tree"}, scheduler="sync"):
        y = nm.ssm_filter(A, B, C, da.from_array(x, chunks=(3, 7)), dt=0.2)
    assert any(str(k[0]).startswith("prefix-") for k in dict(y.__dask_graph__()))
    check((y,), (nm.ssm_filter(A, B, C, x, dt=0.2),))
    with dask.config.set({"numba-mamba.prefix": "fast"}), \
            pytest.raises(ValueError, match="numba-mamba.prefix must be one of"):
        nm.ssm_filter(A, B, C, da.from_array(x, chunks=(3, 7)))


def test_filter_errors(rng):
    A, B, C = lti(rng, (2,), 3)
    xd = da.zeros((2, 20), chunks=5)
    with pytest.raises(ValueError, match=r"dt must have length 1 or 20"):
        nm.ssm_filter(A, B, C, xd, dt=da.ones((2, 7), chunks=7))
    with pytest.raises(ValueError, match=r"B must have 3 states"):
        nm.ssm_filter(A, np.ones((2, 5)), C, xd)
    with pytest.raises(ValueError, match=r"axis must be an integer"):
        nm.ssm_filter(A, B, C, xd, axis=2)
    y = nm.ssm_filter(A, B, C, xd, dt=-da.ones((2, 20), chunks=5))  # values: at compute
    with pytest.raises(ValueError, match=r"dt must be finite and >= 0"):
        compute(y)


# -------------------------------------------------------------- selective_scan
def scan_args(rng, Bt, Dc, N, L, bc="var", G=1):
    u = rng.standard_normal((Bt, Dc, L))
    delta = rng.uniform(-2, 1, (Bt, Dc, L))
    A = -rng.uniform(0.5, 2.0, (Dc, N))
    shape = {"const": (Dc, N), "var": (Bt, N, L), "grouped": (Bt, G, N, L)}[bc]
    return u, delta, A, rng.standard_normal(shape), rng.standard_normal(shape)


@pytest.mark.parametrize("bc,G,chunks", [
    ("var", 1, (1, 3, (1, 9, 10, 20))),
    ("const", 1, (2, 2, 7)),
    ("grouped", 2, (2, 2, (1,) * 5 + (35,))),   # channel chunks on group borders
    ("grouped", 2, (1, (1, 3), 13)),           # a chunk straddling two groups
])
def test_scan_any_chunks(rng, bc, G, chunks):
    u, delta, A, B, C = scan_args(rng, 2, 4, 3, 40, bc, G)
    D = rng.standard_normal(4)
    z = rng.standard_normal(u.shape)
    bias = rng.uniform(-1, 1, 4)
    h0 = rng.standard_normal((2, 4, 3))
    ud = da.from_array(u, chunks=chunks)
    dd = da.from_array(delta, chunks=chunks)
    y, h = nm.selective_scan(ud, dd, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True,
                             return_last_state=True, initial_state=h0)
    assert y.chunks == ud.chunks and h.shape == (2, 4, 3)
    want, want_h = nm.selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=bias,
                                     delta_softplus=True, return_last_state=True,
                                     initial_state=h0)
    check((y, h), (want, want_h))


def test_scan_without_softplus_and_state(rng):
    u, delta, A, B, C = scan_args(rng, 1, 2, 4, 30)
    delta = np.abs(delta)
    y = nm.selective_scan(da.from_array(u, chunks=(1, 1, 8)), da.from_array(delta, chunks=10),
                          A, da.from_array(B, chunks=(1, 4, 6)), C)
    close(compute(y)[0], nm.selective_scan(u, delta, A, B, C))


def test_scan_float32(rng):
    u, delta, A, B, C = (v.astype(np.float32) for v in scan_args(rng, 1, 2, 4, 30))
    y, h = nm.selective_scan(da.from_array(u, chunks=(1, 2, 7)), delta, A, B, C,
                             delta_softplus=True, return_last_state=True)
    want, want_h = nm.selective_scan(u, delta, A, B, C, delta_softplus=True,
                                     return_last_state=True)
    check((y, h), (want, want_h), rtol=2e-5)


def test_scan_errors(rng):
    u, delta, A, B, C = scan_args(rng, 1, 2, 4, 30)
    ud = da.from_array(u, chunks=10)
    with pytest.raises(TypeError, match="out must be None"):
        nm.selective_scan(ud, delta, A, B, C, out=np.empty_like(u))
    with pytest.raises(ValueError, match=r"delta must have length 30"):
        nm.selective_scan(ud, delta[..., :20], A, B, C)
    with pytest.raises(ValueError, match=r"A must have shape \(2, N\)"):
        nm.selective_scan(ud, delta, A[:1], B, C)


# ------------------------------------------------------- on a LocalCluster
@pytest.fixture(scope="module")
def client():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as c:
        yield c


def test_local_cluster_two_processes(rng, client):
    A, B, C = lti(rng, (4,), 8)
    x = rng.standard_normal((4, 3000))
    zi = rng.standard_normal((4, 8))
    u, delta, sA, sB, sC = scan_args(rng, 2, 3, 4, 200)
    y, zf = nm.ssm_filter(A, B, C, da.from_array(x, chunks=(2, 700)), zi=zi)
    s, h = nm.selective_scan(da.from_array(u, chunks=(1, 3, 60)), delta, sA, sB, sC,
                             delta_softplus=True, return_last_state=True)
    got = client.compute([y, zf, s, h], sync=True)
    assert len(client.scheduler_info()["workers"]) == 2
    from numba_mamba.dask import lookahead, parallelism
    assert (parallelism(), lookahead(), lookahead(3)) == (2, 4, 2)  # (the client's threads)
    want = nm.ssm_filter(A, B, C, x, zi=zi) + nm.selective_scan(
        u, delta, sA, sB, sC, delta_softplus=True, return_last_state=True)
    for g, w in zip(got, want, strict=True):
        close(g, w)


def test_forecast_many_on_the_cluster(client):
    from numba_mamba.dask import forecast_many
    from numba_mamba.timeseries import MambaForecaster

    t = np.arange(150)
    rng = np.random.default_rng(3)
    series = [np.sin(2 * np.pi * t / 12 + p) + 0.1 * rng.standard_normal(150)
              for p in (0.0, 1.0, 2.0)]
    got = forecast_many(series, 6, client=client, progress=False, season=12, steps=0)
    for y, g in zip(series, got, strict=True):
        np.testing.assert_array_equal(g, MambaForecaster(season=12, steps=0).fit(y, fh=6)
                                      .predict())


# ------------------------------------------------------------------- xarray
def test_xarray_keeps_coordinates_and_stays_lazy(rng):
    xr = pytest.importorskip("xarray")
    from numba_mamba.xarray import ssm_filter

    A, B, C = lti(rng, (3,), 4)
    values = rng.standard_normal((40, 3))  # time first
    x = xr.DataArray(values, dims=("time", "station"), name="flow", attrs={"units": "m3/s"},
                     coords={"time": np.arange(40.0), "station": ["a", "b", "c"]})
    zi = rng.standard_normal((3, 4))
    y, zf = ssm_filter(A, B, C, x.chunk({"time": 9}), dt=0.5, zi=zi)
    assert isinstance(y.data, da.Array) and y.dims == ("time", "station")
    assert y.attrs == {"units": "m3/s"} and y.station.values.tolist() == ["a", "b", "c"]
    assert zf.dims == ("station", "state")
    want, want_zf = nm.ssm_filter(A, B, C, values, dt=0.5, axis=0, zi=zi)
    close(y.values, want)
    close(zf.values, want_zf)
    close(ssm_filter(A, B, C, x, dt=0.5).values,  # NumPy-backed, no zi
          nm.ssm_filter(A, B, C, values, dt=0.5, axis=0))


def test_xarray_errors(rng):
    xr = pytest.importorskip("xarray")
    from numba_mamba.xarray import ssm_filter

    A, B, C = lti(rng, (3,), 4)
    x = xr.DataArray(np.zeros((1, 10)), dims=("station", "time"))
    with pytest.raises(ValueError, match="dim must be a dimension of x"):
        ssm_filter(A, B, C, x, dim="t")
    with pytest.raises(ValueError, match=r"must fit x's dimensions \('station',\)"):
        ssm_filter(A, B, C, x)   # 3 filters on 1 station: 3 outputs
    with pytest.raises(TypeError, match="x must be an xarray.DataArray"):
        ssm_filter(A, B, C, np.zeros((3, 10)))


# ------------------------------------------------------------- CuPy chunks
def _cupy_or_skip():
    cupy = pytest.importorskip("cupy")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no CUDA GPU")
    except Exception:  # CUDA driver or runtime missing
        pytest.skip("no CUDA GPU")
    return cupy


@pytest.mark.gpu
def test_cupy_chunks(rng):
    """Dask arrays of CuPy chunks run each chunk on the GPU; float64 results
    equal the NumPy single-array call to rounding (the GPU sums otherwise)."""
    cupy = _cupy_or_skip()
    A, B, C = lti(rng, (4,), 8)
    x = rng.standard_normal((4, 3000))
    zi = rng.standard_normal((4, 8))
    g = cupy.asarray
    y, zf = nm.ssm_filter(g(A), g(B), g(C), da.from_array(g(x), chunks=(2, 700)), zi=g(zi))
    got, got_zf = compute(y, zf)
    assert isinstance(got, cupy.ndarray) and isinstance(got_zf, cupy.ndarray)
    want, want_zf = nm.ssm_filter(A, B, C, x, zi=zi)
    close(got.get(), want, rtol=1e-10)
    close(got_zf.get(), want_zf, rtol=1e-10)

    u, delta, sA, sB, sC = scan_args(rng, 2, 3, 4, 200)
    s, h = nm.selective_scan(da.from_array(g(u), chunks=(1, 3, 60)), g(delta), g(sA), g(sB),
                             g(sC), delta_softplus=True, return_last_state=True)
    got_s, got_h = compute(s, h)
    want_s, want_h = nm.selective_scan(u, delta, sA, sB, sC, delta_softplus=True,
                                       return_last_state=True)
    close(got_s.get(), want_s, rtol=1e-10)
    close(got_h.get(), want_h, rtol=1e-10)
