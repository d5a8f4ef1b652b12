"""Data-parallel training over several processes: NCCL between GPUs, TCP between CPUs.

Every process (a *rank*) holds the whole model and its optimizer state,
computes the loss and gradients of its own shard of the batch, and the
gradients are averaged across ranks before the (identical) update, so that
the parameters stay the same on every rank.

Pieces
------
``python -m numba_mamba.distributed``
    The launcher (:func:`main`): starts one process per GPU (or ``--cpu``
    processes), with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` and
    ``NCCL_NVLS_ENABLE=0`` in their environment; when one process fails the
    others are stopped and the launcher exits non-zero.
:func:`init_process_group`
    Called by each process: rendezvous through a :class:`TCPStore` (rank 0
    listens on ``MASTER_ADDR:MASTER_PORT``) and a communicator,
    :class:`NcclCommunicator` (CuPy arrays, ``cupy.cuda.nccl``) or
    :class:`TcpCommunicator` (NumPy arrays).
:class:`DataParallelTrainStep`
    A :class:`~numba_mamba.training.TrainStep` whose gradients are averaged
    across ranks in buckets that start while the backward is still running.
:func:`train`
    :func:`numba_mamba.training.train` for several ranks: rank 0 saves the
    checkpoints, a resume restores every rank.

Overlap
-------
The backward is hand-written, so the order in which gradients become final
is known: the head and final norm, then the layers from the last to the
first, then the embedding (:func:`numba_mamba.models.model_backward`'s
``on_grads``).  Consecutive groups are packed into buckets of about
``bucket_bytes``; as soon as a bucket's gradients are final it is copied
into one flat buffer and all-reduced.  On the GPU this runs on a CUDA
stream of its own that waits (an event) for the gradients on the compute
stream: the all-reduce of the last layers' bucket overlaps the backward of
the earlier layers; only the last bucket (the embedding's) is not
overlapped.  The optimizer's update waits (an event) for all buckets.  On
the CPU a thread of the :class:`TcpCommunicator` sends and receives while
the backward runs (NumPy and the Numba kernels release the GIL).

The average is that of the ranks' gradients, each the gradient of its own
shard's mean loss: with equal shards and no mask (or the same number of
counted positions on every rank) it is the gradient of the whole batch's
mean loss; otherwise it weighs every rank alike (as PyTorch's
DistributedDataParallel does).

Several hosts
-------------
Run the same launcher command on every host with ``--hosts h0,h1,...``
(``h0`` runs rank 0 and the store), ``--node-rank`` (this host's index in
the list) and a fixed ``--master-port``; ranks are numbered host by host.
Only one host is tested.

Examples
--------
A single process (no launcher) is a group of one rank; its training equals
plain training:

>>> import numpy as np
>>> from numba_mamba import distributed, models
>>> from numba_mamba.optim import AdamW
>>> cfg = models.MambaConfig(d_model=8, n_layers=1, vocab_size=6, d_state=4)
>>> params = models.init_params(cfg, seed=0)
>>> group = distributed.init_process_group(backend="cpu")
>>> group.rank, group.world_size
(0, 1)
>>> step = distributed.DataParallelTrainStep(params, cfg, group, AdamW(lr=1e-2))
>>> x = np.array([[1, 2, 3, 4, 5, 1, 2, 3]]); y = np.roll(x, -1, axis=1)
>>> for _ in range(5):
...     step.step(x, y)
>>> len(step.losses())
5
>>> group.close()
"""

import argparse
import base64
import json
import os
import queue
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import numpy as np

from ._validation import check_int, is_cupy_array
from .checkpoint import load_checkpoint
from .models import model_backward, model_forward
from .optim import AdamW
from .training import TrainResult, TrainStep, run_steps

__all__ = ["DEFAULT_BUCKET_BYTES", "DEFAULT_TIMEOUT", "Communicator", "DataParallelTrainStep",
           "DistributedError", "NcclCommunicator", "ProcessGroup", "TCPStore", "TcpCommunicator",
           "init_process_group", "main", "shard", "train"]

#: Seconds a rendezvous or a collective may wait for the other ranks before
#: it fails (overridden by the environment variable NUMBA_MAMBA_DIST_TIMEOUT).
DEFAULT_TIMEOUT = 300.0
#: Gradients are all-reduced in buckets of at least this many bytes (a layer's
#: gradients are never split).
DEFAULT_BUCKET_BYTES = 1 << 20

_ENV_BACKEND = "NUMBA_MAMBA_DIST_BACKEND"
_ENV_TIMEOUT = "NUMBA_MAMBA_DIST_TIMEOUT"
_BACKENDS = ("nccl", "cpu")


class DistributedError(RuntimeError):
    """Another rank failed, left or did not answer in time (the message says which)."""


def _timeout(timeout):
    if timeout is None:
        timeout = float(os.environ.get(_ENV_TIMEOUT, DEFAULT_TIMEOUT))
    timeout = float(timeout)
    if not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout}")
    return timeout


# ---------------------------------------------------------------- sockets


def _send_frame(sock, payload):
    sock.sendall(struct.pack("!Q", len(payload)) + payload)


def _recv_exact(sock, n, who):
    buf = bytearray(n)
    _recv_into(sock, memoryview(buf), who)
    return bytes(buf)


def _recv_into(sock, view, who):
    """Fill the byte ``view`` from ``sock``; DistributedError when the peer leaves or is late."""
    got = 0
    while got < len(view):
        try:
            n = sock.recv_into(view[got:])
        except socket.timeout:
            raise DistributedError(f"{who} sent nothing within the timeout "
                                   f"({sock.gettimeout():g} s): is it stuck or dead?") from None
        except OSError as exc:
            raise DistributedError(f"the connection to {who} failed ({exc}): did it exit "
                                   f"or die?") from None
        if n == 0:
            raise DistributedError(f"{who} closed its connection: did it exit or die?")
        got += n


def _recv_frame(sock, who):
    (n,) = struct.unpack("!Q", _recv_exact(sock, 8, who))
    return _recv_exact(sock, n, who)


def _connect(host, port, timeout, who):
    """A socket connected to ``host:port``, retried until ``timeout`` (the peer may start later)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=min(5.0, timeout))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(timeout)
            return sock
        except OSError as exc:
            if time.monotonic() > deadline:
                raise DistributedError(f"could not connect to {who} at {host}:{port} within "
                                       f"{timeout:g} s ({exc})") from None
            time.sleep(0.05)


def _listen(host, port):
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, port))
    srv.listen(128)
    return srv


# ---------------------------------------------------------------- the store


class _StoreServer:
    """The key-value server rank 0 runs in threads (one per connection)."""

    def __init__(self, host, port):
        self._sock = _listen(host, port)
        self.port = self._sock.getsockname()[1]
        self._data = {}
        self._cond = threading.Condition()
        self.clients = 0  # connections open
        threading.Thread(target=self._accept, daemon=True, name="store-accept").start()

    def _accept(self):
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:  # closed
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._cond:
                self.clients += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True,
                             name="store-conn").start()

    def _serve(self, conn):
        try:
            self._serve_requests(conn)
        finally:
            conn.close()
            with self._cond:
                self.clients -= 1
                self._cond.notify_all()

    def _serve_requests(self, conn):
        while True:
            try:
                req = json.loads(_recv_frame(conn, "a store client"))
            except (DistributedError, ValueError):
                return
            try:
                reply = self._handle(req)
            except Exception as exc:  # a malformed request: told to the client
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            try:
                _send_frame(conn, json.dumps(reply).encode())
            except OSError:
                return

    def _handle(self, req):
        op, key = req["op"], req["key"]
        with self._cond:
            if op == "set":
                self._data[key] = req["value"]
                self._cond.notify_all()
                return {"ok": True}
            if op == "add":
                self._data[key] = int(self._data.get(key, 0)) + int(req["n"])
                self._cond.notify_all()
                return {"value": self._data[key]}
            if op == "get":  # wait for the key (and, with "at_least", for a count)
                def ready():
                    if key not in self._data:
                        return False
                    return "at_least" not in req or int(self._data[key]) >= req["at_least"]
                if not self._cond.wait_for(ready, timeout=req["timeout"]):
                    return {"timeout": True}
                return {"value": self._data[key]}
        raise ValueError(f"unknown store operation {op!r}")

    def close(self, timeout):
        """Stop listening; wait up to ``timeout`` s for the clients to disconnect."""
        self._sock.close()
        with self._cond:
            self._cond.wait_for(lambda: self.clients == 0, timeout=timeout)


class TCPStore:
    """A small key-value store over TCP for the rendezvous: rank 0 serves it.

    Every rank connects to ``host:port`` (rank 0 first starts the server
    there; ``port=0`` picks a free one, see :attr:`port`).  Values are bytes
    (JSON-encoded on the wire: nothing is unpickled).  Every call that waits
    for other ranks gives up after ``timeout`` seconds with a
    :class:`DistributedError`.

    Parameters
    ----------
    host : str
    port : int
    rank, world_size : int
    timeout : float, optional
        Seconds (default :data:`DEFAULT_TIMEOUT` or ``$NUMBA_MAMBA_DIST_TIMEOUT``).

    Examples
    --------
    >>> from numba_mamba.distributed import TCPStore
    >>> store = TCPStore("127.0.0.1", 0, rank=0, world_size=1, timeout=10)
    >>> store.set("answer", b"42")
    >>> store.get("answer"), store.add("count", 2), store.add("count", 1)
    (b'42', 2, 3)
    >>> store.barrier()
    >>> store.close()
    """

    def __init__(self, host, port, rank, world_size, timeout=None):
        self.rank = check_int("rank", rank, low=0)
        self.world_size = check_int("world_size", world_size, low=1)
        if self.rank >= self.world_size:
            raise ValueError(f"rank must be < world_size {self.world_size}, got {self.rank}")
        self.timeout = _timeout(timeout)
        self.host = host
        self._server = _StoreServer(host, int(port)) if self.rank == 0 else None
        self.port = self._server.port if self._server is not None else int(port)
        self._sock = _connect(host, self.port, self.timeout, "the store (rank 0)")
        self._lock = threading.Lock()
        self._barriers = 0

    def _call(self, req, wait=0.0):
        with self._lock:
            if self._sock is None:
                raise DistributedError("the store is closed")
            self._sock.settimeout(self.timeout + wait + 5.0)
            _send_frame(self._sock, json.dumps(req).encode())
            reply = json.loads(_recv_frame(self._sock, "the store (rank 0)"))
        if "error" in reply:
            raise DistributedError(f"the store failed: {reply['error']}")
        return reply

    def set(self, key, value):
        """Set ``key`` to the bytes ``value``."""
        if not isinstance(value, (bytes, bytearray)):
            raise TypeError(f"value must be bytes, got {type(value).__name__}")
        self._call({"op": "set", "key": str(key), "value": base64.b64encode(value).decode()})

    def get(self, key, timeout=None):
        """The value of ``key``, waiting up to ``timeout`` seconds for a rank to set it."""
        timeout = self.timeout if timeout is None else _timeout(timeout)
        reply = self._call({"op": "get", "key": str(key), "timeout": timeout}, wait=timeout)
        if reply.get("timeout"):
            raise DistributedError(f"store key {key!r} was not set within {timeout:g} s: a rank "
                                   f"did not get there (stuck or dead?)")
        return base64.b64decode(reply["value"])

    def add(self, key, n=1):
        """Add ``n`` to the counter ``key`` (0 if unset); return the new count."""
        return int(self._call({"op": "add", "key": str(key), "n": int(n)})["value"])

    def barrier(self, timeout=None):
        """Wait until every rank has called :meth:`barrier` as often as this one."""
        timeout = self.timeout if timeout is None else _timeout(timeout)
        self._barriers += 1
        key = f"__barrier/{self._barriers}"
        self.add(key, 1)
        reply = self._call({"op": "get", "key": key, "at_least": self.world_size,
                            "timeout": timeout}, wait=timeout)
        if reply.get("timeout"):
            raise DistributedError(f"barrier {self._barriers}: not every one of the "
                                   f"{self.world_size} ranks arrived within {timeout:g} s "
                                   f"(stuck or dead?)")

    def set_json(self, key, value):
        """:meth:`set` of a JSON value."""
        self.set(key, json.dumps(value).encode())

    def get_json(self, key, timeout=None):
        """:meth:`get` of a JSON value."""
        return json.loads(self.get(key, timeout))

    def close(self):
        """Close the connection (rank 0: and the server, once the other ranks have left it)."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
        if self._server is not None:
            self._server.close(self.timeout)
            self._server = None


# ---------------------------------------------------------------- communicators


class Communicator:
    """Collectives among the ranks of a group, in place on contiguous arrays.

    Every rank must call the same collectives in the same order, on arrays
    of the same shapes and dtype.

    Methods
    -------
    allreduce_sum(x)
        Start replacing ``x`` by its sum over the ranks; returns a handle
        whose ``wait()`` makes the result visible (GPU: work queued on the
        current stream after the call sees it; CPU: the host waits).
    broadcast(x, root=0)
        Replace ``x`` by rank ``root``'s (done, or queued on the current
        stream, on return).
    synchronize(timeout=None)
        Wait on the host until every collective started has finished, or
        raise :class:`DistributedError` after ``timeout`` seconds.
    close()
    """

    rank = 0
    world_size = 1

    def allreduce_sum(self, x):
        raise NotImplementedError

    def broadcast(self, x, root=0):
        raise NotImplementedError

    def synchronize(self, timeout=None):
        raise NotImplementedError

    def close(self):
        pass

    def _check(self, name, x):
        if not x.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous")


class _Work:
    """A collective queued on the communicator's thread."""

    def __init__(self, fn):
        self.fn = fn
        self.done = threading.Event()
        self.error = None

    def wait(self):
        self.done.wait()
        if self.error is not None:
            raise self.error


class TcpCommunicator(Communicator):
    """Collectives among CPU processes over TCP, for NumPy arrays.

    Rank 0 is the hub: every other rank connects to it (its address goes
    through the store), sends its array, and receives the result.  Sums are
    added in rank order on rank 0, so every rank gets the same bits.  The
    collectives run on a thread of their own, in the order they were
    started: :meth:`allreduce_sum` returns at once, and the host may go on
    computing until the handle's ``wait()``.  A rank that leaves or sends
    nothing for ``timeout`` seconds makes the others raise
    :class:`DistributedError` (and the communicator stays broken).

    Parameters
    ----------
    store : TCPStore
    rank, world_size : int
    timeout : float, optional
    host : str, optional
        The address rank 0 listens on (default: the store's host).
    """

    _ALLREDUCE, _BROADCAST = b"AR", b"BC"

    def __init__(self, store, rank, world_size, timeout=None, host=None):
        self.rank, self.world_size = rank, world_size
        self.timeout = _timeout(timeout)
        self._peers = {}  # rank -> socket (on rank 0: every other rank; elsewhere: {0: hub})
        if world_size > 1:
            if rank == 0:
                self._hub_listen(store, host or store.host)
            else:
                hub_host, port = store.get_json("__tcpcomm/addr", self.timeout)
                sock = _connect(hub_host, port, self.timeout, "rank 0")
                sock.sendall(struct.pack("!I", rank))
                self._peers[0] = sock
        self._failed = None
        self._queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, daemon=True, name="tcp-comm")
        self._thread.start()

    def _hub_listen(self, store, host):
        srv = _listen(host, 0)
        try:
            store.set_json("__tcpcomm/addr", [host, srv.getsockname()[1]])
            srv.settimeout(self.timeout)
            while len(self._peers) < self.world_size - 1:
                try:
                    conn, _ = srv.accept()
                except socket.timeout:
                    missing = sorted(set(range(1, self.world_size)) - set(self._peers))
                    raise DistributedError(f"ranks {missing} did not connect to rank 0 within "
                                           f"{self.timeout:g} s") from None
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn.settimeout(self.timeout)
                (r,) = struct.unpack("!I", _recv_exact(conn, 4, "a connecting rank"))
                self._peers[r] = conn
        finally:
            srv.close()

    def _run(self):
        while True:
            work = self._queue.get()
            if work is None:
                return
            if self._failed is None:
                try:
                    work.fn()
                except Exception as exc:
                    self._failed = exc if isinstance(exc, DistributedError) else \
                        DistributedError(f"a collective failed: {type(exc).__name__}: {exc}")
            if self._failed is not None:
                work.error = self._failed
            work.done.set()

    def _submit(self, fn):
        work = _Work(fn)
        self._queue.put(work)
        return work

    # each message: a tag, the byte count, the bytes (a mismatch means the
    # ranks disagree on the sequence of collectives)
    def _send(self, r, tag, view):
        try:
            self._peers[r].sendall(tag + struct.pack("!Q", view.nbytes))
            self._peers[r].sendall(view)
        except OSError as exc:
            raise DistributedError(f"could not send to rank {r} ({exc}): did it exit or "
                                   f"die?") from None

    def _recv(self, r, tag, view):
        who = f"rank {r}"
        head = _recv_exact(self._peers[r], 10, who)
        if head[:2] != tag or struct.unpack("!Q", head[2:])[0] != view.nbytes:
            raise DistributedError(f"{who} sent {head[:2]!r} of {struct.unpack('!Q', head[2:])[0]}"
                                   f" bytes where {tag!r} of {view.nbytes} bytes was due: the "
                                   f"ranks disagree on the sequence of collectives")
        _recv_into(self._peers[r], view, who)

    @staticmethod
    def _bytes(x):
        return memoryview(x).cast("B")

    def allreduce_sum(self, x):
        self._check("x", x)
        return self._submit(lambda: self._allreduce(x))

    def _allreduce(self, x):
        view = self._bytes(x)
        if self.rank == 0:
            tmp = np.empty_like(x)
            for r in range(1, self.world_size):  # (rank order: the same sum everywhere)
                self._recv(r, self._ALLREDUCE, self._bytes(tmp))
                x += tmp
            for r in range(1, self.world_size):
                self._send(r, self._ALLREDUCE, view)
        elif self.world_size > 1:
            self._send(0, self._ALLREDUCE, view)
            self._recv(0, self._ALLREDUCE, view)

    def broadcast(self, x, root=0):
        self._check("x", x)
        check_int("root", root, low=0)
        if root >= self.world_size:
            raise ValueError(f"root must be < world_size {self.world_size}, got {root}")
        self._submit(lambda: self._broadcast(x, root)).wait()

    def _broadcast(self, x, root):
        view = self._bytes(x)
        if self.rank == 0:
            if root != 0:
                self._recv(root, self._BROADCAST, view)
            for r in range(1, self.world_size):
                if r != root:
                    self._send(r, self._BROADCAST, view)
        elif self.rank == root:
            self._send(0, self._BROADCAST, view)
        else:
            self._recv(0, self._BROADCAST, view)

    def synchronize(self, timeout=None):
        work = self._submit(lambda: None)
        if not work.done.wait(_timeout(timeout)):
            raise DistributedError(f"collectives did not finish within {_timeout(timeout):g} s")
        work.wait()

    def close(self):
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        for sock in self._peers.values():
            sock.close()
        self._peers = {}


_NCCL_DTYPES = {"float16": "NCCL_FLOAT16", "float32": "NCCL_FLOAT32", "float64": "NCCL_FLOAT64",
                "int32": "NCCL_INT32", "int64": "NCCL_INT64", "uint8": "NCCL_UINT8"}


class _Ready:
    """The handle of a collective queued on the current stream: nothing to wait for."""

    def wait(self):
        pass


def _unique_id(nccl, values):
    """NCCL's unique id from the integers it was sent as, in the type this CuPy's
    ``get_unique_id`` returns and ``NcclCommunicator`` takes (bytes in CuPy 14, a tuple
    of ints before)."""
    if isinstance(nccl.get_unique_id(), (bytes, bytearray)):
        return bytes(v & 0xFF for v in values)
    return tuple(values)


class NcclCommunicator(Communicator):
    """Collectives among GPUs through NCCL (``cupy.cuda.nccl``), one process per GPU.

    Rank 0 makes NCCL's unique id and hands it to the others through the
    store; every collective is queued on CuPy's current stream (so work
    queued after it on that stream sees its result, and it can be captured
    in a CUDA graph).  NVLink multicast (NVLS) is left off:
    ``NCCL_NVLS_ENABLE=0`` is set before NCCL starts, unless the environment
    sets it.

    NCCL has no timeout of its own: :meth:`synchronize` waits on the host
    for at most ``timeout`` seconds, and then aborts the communicator (its
    kernels return) and raises :class:`DistributedError`.

    Parameters
    ----------
    store : TCPStore
    rank, world_size : int
    timeout : float, optional
    """

    def __init__(self, store, rank, world_size, timeout=None):
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        from cupy.cuda import nccl

        self.rank, self.world_size = rank, world_size
        self.timeout = _timeout(timeout)
        self._nccl = nccl
        if rank == 0:
            uid = nccl.get_unique_id()
            store.set_json("__nccl/id", list(uid))
        else:
            uid = _unique_id(nccl, store.get_json("__nccl/id", self.timeout))
        self._comm = nccl.NcclCommunicator(world_size, uid, rank)

    def _dtype(self, x):
        name = _NCCL_DTYPES.get(x.dtype.name)
        if name is None:
            raise TypeError(f"x must have one of the dtypes {sorted(_NCCL_DTYPES)}, got "
                            f"{x.dtype}")
        return getattr(self._nccl, name)

    def _check_gpu(self, x):
        if self._comm is None:
            raise DistributedError(f"rank {self.rank}: the NCCL communicator was aborted or "
                                   f"closed")
        if not is_cupy_array(x):
            raise TypeError(f"x must be a CuPy array, got {type(x).__name__}")
        self._check("x", x)

    def allreduce_sum(self, x):
        import cupy
        self._check_gpu(x)
        self._comm.allReduce(x.data.ptr, x.data.ptr, x.size, self._dtype(x),
                             self._nccl.NCCL_SUM, cupy.cuda.get_current_stream().ptr)
        return _Ready()

    def broadcast(self, x, root=0):
        import cupy
        self._check_gpu(x)
        root = check_int("root", root, low=0)
        if root >= self.world_size:
            raise ValueError(f"root must be < world_size {self.world_size}, got {root}")
        self._comm.bcast(x.data.ptr, x.size, self._dtype(x), root,
                         cupy.cuda.get_current_stream().ptr)

    def synchronize(self, timeout=None, stream=None):
        """Wait for ``stream`` (default: the current one) on the host, at most ``timeout`` s."""
        import cupy
        timeout = _timeout(timeout)
        event = (stream or cupy.cuda.get_current_stream()).record()
        deadline = time.monotonic() + timeout
        pause = 1e-4
        while not event.done:
            if time.monotonic() > deadline:
                self.abort()
                raise DistributedError(f"rank {self.rank}: NCCL collectives did not finish "
                                       f"within {timeout:g} s (another rank stuck or dead?); "
                                       f"the communicator was aborted")
            time.sleep(pause)
            pause = min(2 * pause, 0.01)

    def abort(self):
        """Abort the communicator: pending collectives return, later ones fail."""
        if self._comm is not None:
            self._comm.abort()
            self._comm = None

    def close(self):
        if self._comm is not None:
            self._comm.destroy()
            self._comm = None


# ---------------------------------------------------------------- the group


class ProcessGroup:
    """This process's place among the ranks: rank, world size, store, communicator.

    Made by :func:`init_process_group`.

    Attributes
    ----------
    rank, world_size, local_rank : int
    backend : {'nccl', 'cpu'}
    store : TCPStore
    comm : Communicator
    timeout : float
    """

    def __init__(self, rank, world_size, local_rank, backend, store, comm, timeout):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.backend, self.store, self.comm, self.timeout = backend, store, comm, timeout
        self._keys = 0

    @property
    def is_main(self):
        """True on rank 0 (the rank that writes checkpoints and logs)."""
        return self.rank == 0

    def barrier(self):
        """Wait for every rank (through the store)."""
        self.store.barrier()

    def share(self, value):
        """Rank 0's JSON ``value``, on every rank (every rank calls this in the same order)."""
        self._keys += 1
        key = f"__share/{self._keys}"
        if self.rank == 0:
            self.store.set_json(key, value)
            return value
        return self.store.get_json(key)

    def close(self):
        """Wait for every rank, then close the communicator and the store."""
        self.store.barrier()
        self.comm.close()
        self.store.close()

    def __repr__(self):
        return (f"ProcessGroup(rank={self.rank}, world_size={self.world_size}, "
                f"local_rank={self.local_rank}, backend={self.backend!r})")


def _env_int(name, default):
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got "
                         f"{value!r}") from None


def _have_gpu():
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no CuPy, no driver
        return False


def init_process_group(backend=None, rank=None, world_size=None, master_addr=None,
                       master_port=None, local_rank=None, timeout=None):
    """Join the group of ranks: the store's rendezvous, then the communicator.

    Every argument left None comes from the environment the launcher sets
    (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
    ``MASTER_PORT``, ``NUMBA_MAMBA_DIST_BACKEND``,
    ``NUMBA_MAMBA_DIST_TIMEOUT``); without them the process is a group of
    one rank (its store on a free port of 127.0.0.1).

    Parameters
    ----------
    backend : {'nccl', 'cpu'}, optional
        NCCL for CuPy arrays (one GPU per rank), TCP for NumPy arrays.
        Default: the environment's, else 'nccl' where CuPy sees a GPU.
    rank, world_size, local_rank : int, optional
    master_addr : str, optional
        Where rank 0 serves the store (default 127.0.0.1).
    master_port : int, optional
        Its port (0: a free one, for a single rank only).
    timeout : float, optional
        Seconds any rank waits for the others (rendezvous, collectives'
        :meth:`~Communicator.synchronize`).

    Returns
    -------
    ProcessGroup

    Notes
    -----
    With NCCL, a rank uses GPU ``local_rank`` of those it sees when it sees
    more than one (the launcher shows each rank one GPU, its device 0).
    """
    backend = backend or os.environ.get(_ENV_BACKEND) or ("nccl" if _have_gpu() else "cpu")
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    rank = check_int("rank", _env_int("RANK", 0) if rank is None else rank, low=0)
    world_size = check_int("world_size", _env_int("WORLD_SIZE", 1) if world_size is None
                           else world_size, low=1)
    local_rank = check_int("local_rank", _env_int("LOCAL_RANK", rank) if local_rank is None
                           else local_rank, low=0)
    if rank >= world_size:
        raise ValueError(f"rank must be < world_size {world_size}, got {rank}")
    master_addr = master_addr or os.environ.get("MASTER_ADDR", "127.0.0.1")
    master_port = _env_int("MASTER_PORT", 0) if master_port is None else int(master_port)
    if master_port == 0 and world_size > 1:
        raise ValueError("master_port (or MASTER_PORT) must be given for more than one rank")
    timeout = _timeout(timeout)
    if backend == "nccl":
        import cupy
        count = cupy.cuda.runtime.getDeviceCount()
        if count > 1:
            cupy.cuda.Device(local_rank % count).use()
    store = TCPStore(master_addr, master_port, rank, world_size, timeout)
    try:
        if backend == "nccl":
            comm = NcclCommunicator(store, rank, world_size, timeout)
        else:
            comm = TcpCommunicator(store, rank, world_size, timeout)
        store.barrier()
    except BaseException:
        store.close()
        raise
    return ProcessGroup(rank, world_size, local_rank, backend, store, comm, timeout)


# ---------------------------------------------------------------- gradient buckets


class _Buckets:
    """Gradients averaged across ranks in buckets, each started once its gradients are final.

    A bucket is a run of consecutive ``on_grads`` groups (a layer is never
    split) of at least ``bucket_bytes``; its gradients are copied into one
    flat buffer, all-reduced and scaled by 1 / world_size, and
    :meth:`finish` returns the gradients as views of the buffers.
    """

    def __init__(self, comm, params, config, bucket_bytes):
        self.comm = comm
        p0 = next(iter(params.values()))
        self.gpu = is_cupy_array(p0)
        self.xp = _xp(p0)
        self.stream = self.xp.cuda.Stream(non_blocking=True) if self.gpu else None
        self.dtype = p0.dtype
        self.scale = self.dtype.type(1.0 / comm.world_size)
        self.sizes = {k: (int(v.size), tuple(v.shape)) for k, v in params.items()}
        self.bucket_bytes = int(bucket_bytes)
        self.plan = None  # list of lists of names, made at the first backward
        self.buffers = []
        self._reset()

    def _reset(self):
        self.pending = {}  # name -> gradient, of the bucket being filled
        self.started = []  # handles of started buckets
        self.keep = []  # the gradients copied, held until the comm stream has read them

    def ready(self, names, grads):
        """``on_grads``: take a group; start the bucket it completes."""
        self.pending.update(zip(names, grads))
        if self.plan is None:  # (first backward: pack as the groups come)
            if sum(self.sizes[k][0] for k in self.pending) * self.dtype.itemsize \
                    >= self.bucket_bytes:
                self._start(list(self.pending))
        else:
            bucket = self.plan[len(self.started)]
            if len(self.pending) == len(bucket) and all(k in self.pending for k in bucket):
                self._start(bucket)

    def _start(self, names):
        i = len(self.started)
        if i == len(self.buffers):
            n = sum(self.sizes[k][0] for k in names)
            with self._on_stream():
                self.buffers.append((list(names), self.xp.empty(n, self.dtype)))
        buf = self.buffers[i][1]
        parts = [self.pending.pop(k).reshape(-1) for k in names]
        self.keep.append(parts)
        if self.gpu:  # the comm stream waits for the gradients on the compute stream
            self.stream.wait_event(self.xp.cuda.get_current_stream().record())
        with self._on_stream():
            self.xp.concatenate(parts, out=buf)
            self.started.append(self.comm.allreduce_sum(buf))

    def _on_stream(self):
        return self.stream if self.stream is not None else _NoStream()

    def finish(self):
        """Wait for every bucket; the averaged gradients, by name (views of the buffers)."""
        if self.pending:
            self._start(list(self.pending))
        if self.plan is None:
            self.plan = [names for names, _ in self.buffers]
        elif len(self.started) != len(self.plan):
            raise RuntimeError("the backward gave its gradients in another grouping than at "
                               "the first step")
        out = {}
        with self._on_stream():
            for work, (names, buf) in zip(self.started, self.buffers):
                work.wait()
                buf *= self.scale
                offset = 0
                for k in names:
                    n, shape = self.sizes[k]
                    out[k] = buf[offset:offset + n].reshape(shape)
                    offset += n
        if self.gpu:  # the compute stream waits for the comm stream
            self.xp.cuda.get_current_stream().wait_event(self.stream.record())
        self._reset()
        return out


class _NoStream:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _xp(a):
    if is_cupy_array(a):
        import cupy
        return cupy
    return np


# ---------------------------------------------------------------- the training step


class DataParallelTrainStep(TrainStep):
    """A :class:`~numba_mamba.training.TrainStep` whose gradients are averaged across ranks.

    Each rank calls :meth:`step` with its own shard of the batch (see
    :func:`shard`); the gradients of its shard's loss are averaged across
    the ranks in buckets started during the backward (see the module's
    Overlap), then clipped and applied on every rank alike.  The parameters
    and the optimizer's state (moments, step count, hyperparameters) are
    broadcast from rank 0 when the step is made (:meth:`sync_state`), so
    every rank starts, and stays, the same.

    Parameters
    ----------
    params : dict
        The model's parameters, NumPy (backend 'cpu') or CuPy (backend
        'nccl'), updated in place.
    config : MambaConfig
    group : ProcessGroup, optional
        Default: :func:`init_process_group` from the environment.
    optimizer : AdamW, optional
    max_grad_norm : float or None, optional
        Clip the averaged gradients to this global norm.
    graph : {'auto', False}, optional
        Default False: the step runs eagerly.  A step with its collectives is
        not captured as a CUDA graph yet (on the H200 the capture met a
        host-to-device copy); ``'auto'`` is taken as False and True is refused.
    history : int, optional
    bucket_bytes : int, optional
        Size of a bucket (default :data:`DEFAULT_BUCKET_BYTES`).

    Notes
    -----
    :meth:`losses` returns the mean over the ranks of each step's loss (the
    whole batch's loss where every rank counts as many positions) and waits
    for the collectives at most the group's ``timeout`` seconds.  The
    model is :func:`~numba_mamba.models.model_forward` and
    :func:`~numba_mamba.models.model_backward` (no ``extra`` inputs).
    """

    def __init__(self, params, config, group=None, optimizer=None, max_grad_norm=1.0,
                 graph=False, history=1024, bucket_bytes=DEFAULT_BUCKET_BYTES):
        if graph is True:
            raise ValueError("graph=True: a data-parallel step is not captured as a CUDA graph "
                             "yet; use graph=False (the default) or 'auto' (eager)")
        if graph == "auto":
            graph = False
        self.group = init_process_group() if group is None else group
        bucket_bytes = check_int("bucket_bytes", bucket_bytes, low=0)
        p0 = next(iter(params.values()), None)
        want = "nccl" if p0 is not None and is_cupy_array(p0) else "cpu"
        if p0 is not None and self.group.backend != want:
            raise TypeError(f"params must be {'NumPy' if want == 'nccl' else 'CuPy'} arrays for "
                            f"the group's backend {self.group.backend!r}, got "
                            f"{type(p0).__name__}")
        super().__init__(params, config, optimizer, max_grad_norm=max_grad_norm, graph=graph,
                         history=history, forward=_forward, backward=self._backward)
        self._buckets = _Buckets(self.group.comm, params, config, bucket_bytes)
        self.sync_state()

    def _backward(self, dout, cache):
        _, grads = model_backward(dout, cache, on_grads=self._buckets.ready)
        averaged = self._buckets.finish()
        missing = sorted(set(grads) - set(averaged))
        if missing:
            raise RuntimeError(f"gradients {missing[:5]} were not handed to on_grads")
        return None, {k: averaged[k] for k in grads}  # (the backward's order)

    def sync_state(self):
        """Broadcast the parameters and the optimizer's state from rank 0 to every rank."""
        opt, group = self.optimizer, self.group
        hyper = group.share({"t": opt.t, "lr": opt.lr, "betas": list(opt.betas), "eps": opt.eps,
                             "weight_decay": opt.weight_decay})
        self._fused.load()  # (rank 0's moments as the optimizer holds them)
        for name in self.params:
            for a in (self.params[name], opt.m[name], opt.v[name]):
                group.comm.broadcast(a, root=0)
        opt.t, opt.lr = int(hyper["t"]), float(hyper["lr"])
        opt.betas, opt.eps = tuple(hyper["betas"]), float(hyper["eps"])
        opt.weight_decay = float(hyper["weight_decay"])

    def losses(self):
        """Each step's loss since the last call, averaged over the ranks (Python floats)."""
        self.group.comm.synchronize(self.group.timeout)
        local = super().losses()
        if self.group.world_size == 1 or not local:
            return local
        xp = self.xp
        total = xp.asarray(np.asarray(local, np.float64))
        self.group.comm.allreduce_sum(total).wait()
        if xp is not np:
            self.group.comm.synchronize(self.group.timeout)
            total = total.get()
        return [float(v) / self.group.world_size for v in total]


def _forward(inputs, params, config):
    return model_forward(inputs, params, config, sync=False)


def shard(batch, group):
    """This rank's rows of a batch: ``(inputs, targets[, mask])`` split along axis 0.

    Rank ``r`` of ``n`` gets rows ``r * B/n`` to ``(r + 1) * B/n``; ``B``
    must be a multiple of the world size.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_mamba.distributed import shard
    >>> class Rank:  # (a ProcessGroup's rank and world size)
    ...     rank, world_size = 1, 2
    >>> x = np.arange(8).reshape(4, 2)
    >>> shard((x, x + 10), Rank())[0]
    array([[4, 5],
           [6, 7]])
    """
    n, r = group.world_size, group.rank
    B = batch[0].shape[0]
    if B % n:
        raise ValueError(f"the batch size must be a multiple of the world size {n}, got {B}")
    b = B // n
    return tuple(None if a is None else a[r * b:(r + 1) * b] for a in batch)


# ---------------------------------------------------------------- the training loop


def train(params, config, batch_fn, steps, group=None, lr=1e-3, warmup_steps=0, min_lr=0.0,
          weight_decay=0.1, betas=(0.9, 0.95), max_grad_norm=1.0, checkpoint_path=None,
          checkpoint_every=None, resume=False, progress=True, optimizer=None, log_every=10,
          graph=False, bucket_bytes=DEFAULT_BUCKET_BYTES):
    """:func:`numba_mamba.training.train` on every rank of a group: data-parallel.

    The arguments are those of :func:`~numba_mamba.training.train`, with
    these differences: ``batch_fn(step)`` returns *this rank's* batch (e.g.
    ``shard(global_batch_fn(step), group)``); each step is a
    :class:`DataParallelTrainStep`; the losses are the ranks' means (the
    same list on every rank); only rank 0 writes the checkpoint (atomically:
    a temporary file renamed over the target) and shows the progress bar.
    With ``resume``, rank 0 reads the checkpoint and every rank continues
    from its parameters, optimizer state, step and losses (the file need
    only be on rank 0's host).

    Parameters
    ----------
    group : ProcessGroup, optional
        Default: :func:`init_process_group` from the environment.
    graph : {'auto', False}, optional
        Default False (see :class:`DataParallelTrainStep`).
    bucket_bytes : int, optional

    Returns
    -------
    TrainResult
    """
    group = init_process_group() if group is None else group
    if isinstance(log_every, bool) or not isinstance(log_every, (int, np.integer)) \
            or log_every < 1:
        raise ValueError(f"log_every must be a positive integer, got {log_every!r}")
    if optimizer is None:
        optimizer = AdamW(lr=lr, betas=betas, weight_decay=weight_decay)
    start, losses = 0, []
    if group.is_main and resume and checkpoint_path is not None \
            and os.path.exists(checkpoint_path):
        start, losses = _restore(checkpoint_path, params, optimizer)
    start, losses = group.share([start, losses])  # (the state itself: sync_state)
    stepper = DataParallelTrainStep(params, config, group, optimizer,
                                    max_grad_norm=max_grad_norm, graph=graph,
                                    bucket_bytes=bucket_bytes)
    run_steps(stepper, batch_fn, start, steps, losses, lr, warmup_steps, min_lr, log_every,
              checkpoint_path, checkpoint_every, progress and group.is_main,
              writes=group.is_main)
    return TrainResult(params, optimizer, losses, max(start, steps))


def _restore(path, params, optimizer):
    """Load a checkpoint into ``params`` and ``optimizer``; its step and losses."""
    ck = load_checkpoint(path)
    if set(ck.params) != set(params):
        raise ValueError(f"{path} holds parameters {sorted(ck.params)[:5]}..., not those of "
                         f"this model")
    xp = _xp(next(iter(params.values())))
    for name, value in ck.params.items():
        params[name][...] = xp.asarray(value)
    if ck.optimizer is not None:
        state = dict(ck.optimizer)
        for key in ("m", "v"):
            state[key] = {k: xp.asarray(v) for k, v in state[key].items()}
        optimizer.load_state_dict(state)
    return ck.step, list((ck.extra or {}).get("losses", []))


# ---------------------------------------------------------------- the launcher


def _free_port(host):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _visible_gpus():
    """The ids of the GPUs this process sees (CUDA_VISIBLE_DEVICES, else CuPy's count)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip()]
    try:
        import cupy
        return [str(i) for i in range(cupy.cuda.runtime.getDeviceCount())]
    except Exception:  # no CuPy or no driver: no GPUs
        return []


def _parser():
    p = argparse.ArgumentParser(
        prog="python -m numba_mamba.distributed",
        description="Start one process per GPU (or --cpu processes) running SCRIPT, for "
                    "numba_mamba.distributed.init_process_group.  When one process fails the "
                    "others are stopped and the exit status is non-zero.")
    p.add_argument("--nproc", type=int, default=None,
                   help="processes on this host (default: one per visible GPU)")
    p.add_argument("--cpu", action="store_true",
                   help="CPU processes (backend 'cpu', NumPy arrays, TCP) instead of GPUs")
    p.add_argument("--hosts", default=None,
                   help="comma-separated hosts of a multi-host run, the first runs rank 0; "
                        "run this command on each with its --node-rank and the same --nproc")
    p.add_argument("--node-rank", type=int, default=0, help="this host's index in --hosts")
    p.add_argument("--master-addr", default=None,
                   help="rank 0's address (default: the first of --hosts, else 127.0.0.1)")
    p.add_argument("--master-port", type=int, default=None,
                   help="the store's port (default: a free one; required with --hosts)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds a rank waits for the others (NUMBA_MAMBA_DIST_TIMEOUT)")
    p.add_argument("--grace", type=float, default=5.0,
                   help="seconds the others get to exit after SIGTERM before SIGKILL")
    p.add_argument("script", help="the Python script each process runs")
    p.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")
    return p


def _rank_envs(opts):
    """The environment of each process to start on this host."""
    hosts = [h.strip() for h in opts.hosts.split(",")] if opts.hosts else None
    if hosts is not None and opts.master_port is None:
        raise SystemExit("--master-port is required with --hosts (every host must use the same)")
    n_hosts = len(hosts) if hosts else 1
    if not 0 <= opts.node_rank < n_hosts:
        raise SystemExit(f"--node-rank must be in [0, {n_hosts}), got {opts.node_rank}")
    gpus = [] if opts.cpu else _visible_gpus()
    nproc = opts.nproc if opts.nproc is not None else len(gpus)
    if nproc < 1:
        raise SystemExit("no GPU visible: give --nproc N with --cpu for CPU processes"
                         if not opts.cpu else "--nproc must be at least 1")
    if not opts.cpu and nproc > len(gpus):
        raise SystemExit(f"--nproc {nproc} asks for more GPUs than the {len(gpus)} visible "
                         f"(use --cpu for CPU processes)")
    addr = opts.master_addr or (hosts[0] if hosts else "127.0.0.1")
    port = opts.master_port or _free_port(addr)
    envs = []
    for local in range(nproc):
        env = dict(os.environ)
        env.update(RANK=str(opts.node_rank * nproc + local), WORLD_SIZE=str(n_hosts * nproc),
                   LOCAL_RANK=str(local), LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR=addr,
                   MASTER_PORT=str(port), NCCL_NVLS_ENABLE="0",
                   **{_ENV_BACKEND: "cpu" if opts.cpu else "nccl"})
        if opts.timeout is not None:
            env[_ENV_TIMEOUT] = str(_timeout(opts.timeout))
        if opts.cpu:  # (the host's cores shared among its ranks, unless the caller chose)
            threads = str(max(1, (os.cpu_count() or 1) // nproc))
            for name in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS"):
                env.setdefault(name, threads)
        else:
            env["CUDA_VISIBLE_DEVICES"] = gpus[local]
        envs.append(env)
    return envs


def _describe(rc):
    if rc < 0:
        try:
            return f"was killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"was killed by signal {-rc}"
    return f"exited with code {rc}"


def _stop(procs, grace):
    """SIGTERM the process groups still running, SIGKILL them after ``grace`` seconds."""
    for _, p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace
    for _, p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def main(argv=None):
    """The launcher (``python -m numba_mamba.distributed``); returns the exit status.

    Starts ``--nproc`` processes of ``python SCRIPT ARGS...`` (each in a
    process group of its own), one per visible GPU (each sees only its GPU
    through ``CUDA_VISIBLE_DEVICES``) or, with ``--cpu``, on the CPU (each
    with ``NUMBA_NUM_THREADS`` and ``OMP_NUM_THREADS`` set to its share of
    the cores, unless already set), and waits for them.  When one fails (a
    non-zero exit or a signal) the others get SIGTERM, then SIGKILL after
    ``--grace`` seconds, a line on stderr names the failed rank(s), and the
    status is non-zero (the code of the lowest failed rank, or 1 for a
    signal).  SIGINT or SIGTERM to the launcher stops them all.
    """
    opts = _parser().parse_args(argv)
    envs = _rank_envs(opts)
    procs = []

    def on_term(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        for env in envs:
            procs.append((int(env["RANK"]), subprocess.Popen(
                [sys.executable, opts.script] + list(opts.args), env=env,
                start_new_session=True)))
        while True:
            codes = [(rank, p, p.poll()) for rank, p in procs]
            failed = [(rank, p, rc) for rank, p, rc in codes if rc not in (None, 0)]
            if failed:
                running = sum(rc is None for _, _, rc in codes)
                what = "; ".join(f"rank {rank} (pid {p.pid}) {_describe(rc)}"
                                 for rank, p, rc in failed)
                print(f"numba_mamba.distributed: {what}; stopping the {running} other running "
                      f"rank(s)", file=sys.stderr, flush=True)
                _stop(procs, opts.grace)
                rc = failed[0][2]
                return rc if rc > 0 else 1
            if all(rc == 0 for _, _, rc in codes):
                return 0
            time.sleep(0.05)
    except KeyboardInterrupt:
        print("numba_mamba.distributed: interrupted; stopping every rank", file=sys.stderr,
              flush=True)
        _stop(procs, opts.grace)
        return 130
    finally:
        signal.signal(signal.SIGTERM, old)


if __name__ == "__main__":
    sys.exit(main())
