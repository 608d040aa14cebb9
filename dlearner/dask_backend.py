"""All the Dask plumbing of the :class:`~dlearner.learner_group.LearnerGroup`, in one module.

Read top to bottom:

1. **Errors** the group raises for cluster problems.
2. **Connecting**: an existing ``distributed.Client``, a scheduler ``address``, a ``scheduler_file``,
   or an embedded ``LocalCluster`` of worker processes that the group owns.
3. **Placement**: one learner per worker *process*, chosen explicitly by the group. Dask releases a
   task's ``resources`` as soon as the task that created an actor finishes, so resources alone would
   let two learners land in one worker; the group therefore checks the workers' ``GPU`` resource up
   front, picks distinct worker processes itself and pins each actor to its worker.
4. **The learner side**: :class:`LearnerActor`, the Dask actor that hosts one Learner. Requests carry
   a per-learner sequence number and run strictly in that order on a dedicated compute thread, so
   every rank makes the same collective calls in the same order (collectives deadlock otherwise).
   The actor's methods are ``async`` and only hand work to that thread: the worker's event loop is
   never blocked and the worker's single actor thread is never used for waiting.
5. **The process group**: rank 0 opens a ``TCPStore`` on a free port of its own host (chosen by the
   OS at run time); all ranks then build a standalone ``ProcessGroupGloo`` (``ProcessGroupNCCL``
   when every learner has its own whole GPU) under a ``PrefixStore`` named after the group and a
   generation number, concurrently. The process-global default group is never used, so groups never
   collide and a group can be re-formed (new generation) after a failure.
6. **The direct channel**: blocking requests go over one token-authenticated socket per learner
   (plain-TCP clusters only), from the driver thread straight to the learner's process.
7. **The driver side**: :class:`DaskLearnerPool` sends each request straight to the learner's worker
   (the channel, or one direct Dask RPC per learner: never a scheduler round trip; the shard
   travels once), watches for worker deaths through the scheduler's ``remove-worker`` events and
   socket errors and turns them into :class:`LearnerDiedError` at once, and builds
   ``distributed.Future`` objects for ``update_async`` from small ``async`` tasks named
   ``learner-update-<group id>-<n>``.

Failure policy (see ``docs/cluster.md``): an exception inside a learner is sent back with its
remote traceback and re-raised in the driver. A rank whose *update* fails drops its process group,
which closes its sockets, so peers blocked in a collective with it fail at once instead of hanging;
the driver then re-forms the process group (and, if the ranks ended the failed update in different
states, copies the state of one that finished to the others) before the next update, so the group
stays usable. A learner whose worker dies makes every later call raise :class:`LearnerDiedError`
(the bookkeeping per rank, the generation-numbered process group and the store on rank 0 are what
restarting one learner later needs: new actor on a free worker, state from a survivor, re-form).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import dataclasses
import datetime
import hmac
import logging
import math
import os
import pickle
import secrets
import socket
import struct
import sys
import threading
import time
import traceback
import weakref
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import cloudpickle
import torch

import dask
import distributed
from distributed import Client, Future, LocalCluster, get_worker
from distributed.comm import get_address_host
from distributed.comm.core import CommClosedError
from distributed.core import rpc as direct_rpc
from distributed.protocol import to_serialize

from dlearner.collective import TorchCollective
from dlearner.errors import ClusterResourceError, LearnerDiedError, LearnerGroupError, ProcessGroupError, RemoteLearnerError

logger = logging.getLogger(__name__)

#: Seconds a task of ``update_async`` waits to connect to a learner's worker before calling it dead.
TASK_CONNECT_TIMEOUT_S = 10.0
#: Seconds the driver waits, after losing the connection to a learner, for the scheduler to confirm
#: that its worker left (only to word the error precisely; the learner is given up either way).
DEATH_CONFIRM_S = 2.0
#: Published results (for ``update_async`` futures) a learner keeps, newest first.
PUBLISHED_RESULTS_KEPT = 256


# ============================================================================================ errors
class _ProcessGroupClosed(RuntimeError):
    """Raised on a learner whose process group was dropped after an earlier failed update."""


# ======================================================================================= connecting
@dataclasses.dataclass
class ClusterConnection:
    """The client the group talks through, and what it must close on shutdown."""

    client: Client
    cluster: Optional[LocalCluster]
    owns_client: bool
    description: str

    def close(self) -> None:
        """Close what the group opened: its own client and its embedded cluster, nothing else."""
        if self.owns_client:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def connect(config: Any, num_learners: int) -> ClusterConnection:
    """Connect to the cluster named by ``config.client`` / ``.address`` / ``.scheduler_file``, or
    start an embedded ``LocalCluster`` with ``num_learners`` worker processes; either way the
    dlearner page is registered on the cluster's dashboard."""
    connection = _connect(config, num_learners)
    from dlearner.dashboard import register_dashboard

    try:
        register_dashboard(connection.client)
    except RuntimeError as err:
        # The page is an extra: training works without it, but say why it is missing.
        logger.warning("dlearner page not added to the Dask dashboard: %s", err)
    except BaseException:
        connection.close()
        raise
    return connection


def _connect(config: Any, num_learners: int) -> ClusterConnection:
    timeout = config.resolved_startup_timeout_s()
    if config.client is not None:
        client = config.client
        if not isinstance(client, Client):
            raise ValueError(f"config.client must be a distributed.Client, got {type(client).__name__}.")
        if client.asynchronous:
            raise ValueError("LearnerGroup needs a synchronous distributed.Client (asynchronous=False).")
        if client.status not in ("running", "connecting", "newly-created"):
            raise LearnerGroupError(f"The Dask client given in .cluster(client=...) is {client.status!r}, not running.")
        return ClusterConnection(client, None, owns_client=False, description=f"client of {client.scheduler.address}")
    if config.address is not None:
        try:
            client = Client(config.address, set_as_default=_no_default_client(), timeout=timeout)
        except (OSError, TimeoutError) as err:
            raise LearnerGroupError(
                f"Cannot reach the Dask scheduler at address={config.address!r} within {timeout:g} s: {err}"
            ) from err
        return ClusterConnection(client, None, owns_client=True, description=f"scheduler {config.address}")
    if config.scheduler_file is not None:
        if not os.path.exists(config.scheduler_file):
            raise FileNotFoundError(f"scheduler_file={config.scheduler_file!r} does not exist.")
        try:
            client = Client(scheduler_file=config.scheduler_file, set_as_default=_no_default_client(), timeout=timeout)
        except (OSError, TimeoutError) as err:
            raise LearnerGroupError(
                f"Cannot reach the Dask scheduler of scheduler_file={config.scheduler_file!r} within {timeout:g} s: {err}"
            ) from err
        return ClusterConnection(client, None, owns_client=True, description=f"scheduler file {config.scheduler_file}")
    return _start_embedded_cluster(config, num_learners)


def _start_embedded_cluster(config: Any, num_learners: int) -> ClusterConnection:
    gpus = float(config.num_gpus_per_learner or 0)
    kwargs: Dict[str, Any] = dict(
        n_workers=num_learners,
        threads_per_worker=max(1, int(config.num_cpus_per_learner)),
        processes=True,  # learners need their own processes (and their own GIL)
        dashboard_address=":0",  # a free port: several groups (or tests) can run side by side
        silence_logs=logging.WARNING,
    )
    if gpus > 0:
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        needed = math.ceil(num_learners * gpus - 1e-9)
        if available < needed:
            raise ClusterResourceError(
                f"num_learners={num_learners} with num_gpus_per_learner={gpus:g} needs {needed} GPU(s) for the "
                f"embedded LocalCluster, but torch sees {available} CUDA device(s) on this machine. Set "
                "num_gpus_per_learner=0, or attach to a cluster whose workers declare the resource 'GPU'."
            )
        kwargs["resources"] = {"GPU": gpus}
    kwargs.update(config.cluster_kwargs or {})
    # Dask's nanny sets MALLOC_TRIM_THRESHOLD_ in new workers, which makes glibc mmap/munmap every
    # tensor above 128 KiB: 30-40 % slower updates. Learner workers go without it.
    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {})
    environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
        cluster = LocalCluster(**kwargs)
    try:
        client = Client(cluster, set_as_default=_no_default_client())
    except BaseException:
        cluster.close()
        raise
    return ClusterConnection(client, cluster, owns_client=True, description="embedded LocalCluster")


def _no_default_client() -> bool:
    """A client the group opens becomes the default one only if there is none yet, so that
    ``distributed.wait`` / ``as_completed`` work on ``update_async`` futures without touching a
    default client the user already has."""
    try:
        distributed.default_client()
    except ValueError:
        return True
    return False


# ======================================================================================== placement
@dataclasses.dataclass(frozen=True)
class Placement:
    """Where one learner runs."""

    rank: int
    worker: str
    device: Optional[str]


def _worker_identity(dask_worker) -> Dict[str, Any]:
    """Runs on every worker (``client.run``): which process it is and whether it hosts a learner."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "learner": hosted_learner_key(dask_worker)}


def place_learners(connection: ClusterConnection, config: Any, num_learners: int) -> List[Placement]:
    """Pick ``num_learners`` distinct worker processes that have the resources a learner needs.

    Fails within ``learner_startup_timeout_s`` with a :class:`ClusterResourceError` naming what is
    missing; fails at once when the cluster already has enough workers but not enough eligible ones.
    """
    client = connection.client
    gpus = float(config.num_gpus_per_learner or 0)
    timeout = config.resolved_startup_timeout_s()
    deadline = time.monotonic() + timeout
    while True:
        workers = client.scheduler_info(n_workers=-1)["workers"]
        if len(workers) >= num_learners or time.monotonic() >= deadline:
            break
        time.sleep(0.2)  # workers of an HPC job or an autoscaler may still be joining
    if not workers:
        raise ClusterResourceError(
            f"The Dask cluster ({connection.description}) has no workers after {timeout:g} s; "
            f"num_learners={num_learners} needs {num_learners} worker process(es)."
        )
    identities = client.run(_worker_identity, workers=list(workers), on_error="return")
    eligible, reasons, seen_processes = [], {}, {}
    for address in sorted(workers, key=lambda a: (workers[a].get("host", ""), a)):
        info, ident = workers[address], identities.get(address, {})
        have = float((info.get("resources") or {}).get("GPU", 0))
        if not isinstance(ident, dict):
            reasons[address] = f"did not answer ({ident!r})"
            continue
        process = (ident.get("host"), ident.get("pid"))
        if gpus > 0 and have + 1e-9 < gpus:
            reasons[address] = f"resource GPU={have:g} < {gpus:g}"
        elif ident.get("learner"):
            reasons[address] = f"already hosts learner {ident['learner']}"
        elif process in seen_processes:
            reasons[address] = f"shares its process with worker {seen_processes[process]}"
        else:
            seen_processes[process] = address
            eligible.append(address)
    if len(eligible) < num_learners:
        missing_gpu = gpus > 0 and sum("GPU" in r for r in reasons.values()) > 0
        hint = (
            f" The learners need the Dask worker resource 'GPU' >= {gpus:g} each: start workers with "
            "`dask worker ... --resources GPU=1` (or LocalCluster(resources={'GPU': 1})), or set "
            "num_gpus_per_learner=0."
            if missing_gpu
            else " Add workers (one worker process per learner; two learners never share a process) or lower num_learners."
        )
        details = "; ".join(f"{a}: {r}" for a, r in reasons.items()) or "none ineligible"
        raise ClusterResourceError(
            f"num_learners={num_learners} needs {num_learners} eligible Dask worker process(es), but the cluster "
            f"({connection.description}) has {len(eligible)} of {len(workers)} eligible ({details}).{hint}"
        )
    chosen = eligible[:num_learners]
    return [Placement(rank, address, _device_for(rank, gpus, connection)) for rank, address in enumerate(chosen)]


def _device_for(rank: int, gpus: float, connection: ClusterConnection) -> Optional[str]:
    if gpus <= 0:
        return "cpu"
    if connection.cluster is not None:
        # Embedded cluster: every worker sees every GPU of this machine, so spread ranks explicitly
        # (with 0.5 GPU per learner, ranks 0 and 1 share cuda:0).
        return f"cuda:{int(rank * gpus + 1e-9) % max(1, torch.cuda.device_count())}"
    # Attached cluster: the launcher (e.g. dask-cuda) gives each worker its GPU as device 0.
    return None



# ================================================================================= direct channel
# Blocking requests are latency-bound: Dask's RPC layer costs ~0.5 ms per learner and call, and the
# driver's event loop serves the learners one after the other. On plain-TCP clusters the group
# therefore sends blocking requests over one socket per learner, straight from the driver thread
# to a reader thread in the learner's process: the same ordered requests and replies, without the
# loop hops and framing. The channel is authenticated with a random token handed over through
# Dask's own RPC, so it is exactly as trusted as the cluster's TCP comms. TLS clusters (and clients
# with ``direct_to_workers=False``) keep using Dask's RPC for everything.

_COUNT = struct.Struct("!QI")  # request number, number of frames


def _dumps(obj: Any) -> List[Any]:
    """``obj`` as pickle-5 frames (numpy buffers out of band, not copied)."""
    buffers: List[pickle.PickleBuffer] = []
    try:
        header = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
        if b"__main__" in header:  # the other side cannot import the driver's __main__
            raise pickle.PicklingError("refers to __main__")
    except (pickle.PicklingError, AttributeError, TypeError):
        buffers = []
        header = cloudpickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    return [header] + [b.raw() for b in buffers]


def _send_frames(sock: socket.socket, seq: int, frames: List[Any]) -> None:
    sizes = struct.pack(f"!{len(frames)}Q", *(memoryview(f).nbytes for f in frames))
    sock.sendall(_COUNT.pack(seq, len(frames)) + sizes + bytes(frames[0]))
    for frame in frames[1:]:
        sock.sendall(frame)


def _recv_exact(sock: socket.socket, n: int, idle: Optional[Callable[[], None]] = None) -> bytearray:
    """Read exactly ``n`` bytes; on a socket timeout call ``idle()`` (which may raise) and go on."""
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        try:
            k = sock.recv_into(view[got:], n - got)
        except socket.timeout:
            if idle is None:
                raise
            idle()
            continue
        if k == 0:
            raise ConnectionError("the connection was closed by the other side")
        got += k
    return buf


def _recv_frames(sock: socket.socket, idle: Optional[Callable[[], None]] = None) -> Tuple[int, bytearray, List[bytearray]]:
    seq, count = _COUNT.unpack(_recv_exact(sock, _COUNT.size, idle))
    sizes = struct.unpack(f"!{count}Q", _recv_exact(sock, 8 * count, idle))
    frames = [_recv_exact(sock, size, idle) for size in sizes]
    return seq, frames[0], frames[1:]


class _ChannelServer:
    """Learner side: accepts the driver's connection and feeds requests to ``on_request``."""

    def __init__(self, host: str, on_request: Callable[[int, Any, Callable[[Dict[str, Any]], None]], None]):
        self.token = secrets.token_bytes(32)
        self._on_request = on_request
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.create_server((host, 0), family=family)
        self.port = self._listener.getsockname()[1]
        self._conns: List[socket.socket] = []
        threading.Thread(target=self._accept, name="dlearner-channel-accept", daemon=True).start()

    def close(self) -> None:
        self._listener.close()
        for conn in self._conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:  # already gone
                pass
            conn.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._serve, args=(conn,), name="dlearner-channel", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.settimeout(10)
        try:
            if not hmac.compare_digest(bytes(_recv_exact(conn, len(self.token))), self.token):
                conn.close()
                return
            conn.sendall(b"ok")
        except OSError:
            conn.close()
            return
        conn.settimeout(None)
        self._conns.append(conn)
        lock = threading.Lock()

        def reply(seq: int, value: Dict[str, Any]) -> None:
            frames = _dumps(value)
            with lock:
                try:
                    _send_frames(conn, seq, frames)
                except OSError:  # the driver went away; nothing to tell
                    pass

        while True:
            try:
                seq, header, buffers = _recv_frames(conn)
            except OSError:
                return
            try:
                request = pickle.loads(header, buffers=buffers)
            except Exception as err:  # e.g. a class the worker cannot import: still answer this number
                request = err
            self._on_request(seq, request, lambda value, seq=seq: reply(seq, value))


class _ChannelLink:
    """Driver side of one learner's channel (used from one driver thread at a time)."""

    def __init__(self, host: str, port: int, token: bytes, timeout_s: float):
        self._sock = socket.create_connection((host, port), timeout=timeout_s)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock.sendall(token)
        if bytes(_recv_exact(self._sock, 2)) != b"ok":
            raise ConnectionError("the learner refused the channel")
        self._sock.settimeout(0.5)  # wake up now and then to notice a learner declared dead

    def send(self, seq: int, request: Request) -> None:
        _send_frames(self._sock, seq, _dumps(request))

    def receive(self, seq: int, idle: Callable[[], None]) -> Dict[str, Any]:
        while True:
            got, header, buffers = _recv_frames(self._sock, idle)
            if got == seq:
                return pickle.loads(header, buffers=buffers)
            if got > seq:
                raise ConnectionError(f"reply to request {got} arrived while waiting for {seq}")
            # An older reply nobody waited for (a call that gave up when another learner died).

    def close(self) -> None:
        self._sock.close()

# ===================================================================================== learner side
_HOSTED: Optional["weakref.ref[LearnerActor]"] = None
_HOSTED_LOCK = threading.Lock()


def hosted_learner_key(worker: Any) -> Optional[str]:
    """The actor key of the learner living in this worker process, if any."""
    actor = _HOSTED() if _HOSTED is not None else None
    if actor is None or actor.closed:
        return None
    if actor.key not in worker.state.actors:
        # Dask released the actor without the group closing it (its driver went away): free the
        # process for the next learner.
        actor.abandon()
        return None
    return actor.key


class _OrderedExecutor:
    """One dedicated thread that runs submitted work strictly in sequence-number order.

    Requests may arrive out of order (several connections); request ``n`` waits until ``n - 1`` ran.
    """

    def __init__(self, name: str, first_seq: int = 0):
        self._cond = threading.Condition()
        self._pending: Dict[int, Tuple[Callable[[], Any], concurrent.futures.Future]] = {}
        self._next = first_seq
        self._closing = False
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def submit(self, seq: int, fn: Callable[[], Any]) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._closing:
                raise RuntimeError("This learner was shut down.")
            if seq < self._next or seq in self._pending:
                raise RuntimeError(f"Request number {seq} was already received by this learner.")
            self._pending[seq] = (fn, future)
            self._cond.notify()
        return future

    def stop(self) -> None:
        """Stop after the work that is running; queued work is dropped."""
        with self._cond:
            self._closing = True
            for _, future in self._pending.values():
                future.set_exception(RuntimeError("This learner was shut down."))
            self._pending.clear()
            self._cond.notify()

    def _main(self) -> None:
        while True:
            with self._cond:
                while not self._closing and self._next not in self._pending:
                    self._cond.wait()
                if self._closing:
                    return
                fn, future = self._pending.pop(self._next)
                self._next += 1
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as err:  # noqa: B036 - delivered to the caller, never swallowed
                future.set_exception(err)


@dataclasses.dataclass(frozen=True)
class Request:
    """One call on one learner.

    ``target`` is a function ``fn(learner, *args)`` or, for the group's own plumbing, the name of a
    ``_op_*`` method of :class:`LearnerActor`. ``collective`` requests (updates) take part in
    collectives: if one fails, the learner drops its process group so that no peer hangs.
    """

    target: Any
    args: tuple = ()
    collective: bool = False
    want_result: bool = True
    publish: bool = False
    log_topic: Optional[str] = None


class LearnerActor:
    """The Dask actor hosting one Learner (rank ``rank`` of ``world_size``).

    Created by the group with ``client.submit(LearnerActor, ..., actor=True, workers=[address],
    key="learner-<rank>-<group id>")``. Refuses to start in a process that already hosts a learner.
    """

    def __init__(
        self,
        *,
        group_id: str,
        rank: int,
        world_size: int,
        config: Any,
        module_spec: Any,
        learner_class: type,
        device: Optional[str],
    ):
        global _HOSTED
        self.group_id, self.rank, self.world_size = group_id, rank, world_size
        self.key = learner_actor_key(rank, group_id)
        self.closed = False
        worker = get_worker()
        self._worker = worker
        self.address = worker.address
        self.host = get_address_host(worker.address)
        with _HOSTED_LOCK:
            other = hosted_learner_key(worker)
            if other is not None:
                raise LearnerGroupError(
                    f"Worker {self.address} (pid {os.getpid()}) already hosts learner {other}; two learners never "
                    "share a worker process. Give each learner its own worker process."
                )
            _HOSTED = weakref.ref(self)
        _tune_allocator()
        self._executor = _OrderedExecutor(name=f"dlearner-{self.key}")
        weakref.finalize(self, self._executor.stop)
        self._collective: Optional[TorchCollective] = None
        self._collective_broken: Optional[str] = None
        self._store = None  # rank 0: the TCPStore server of the process group
        self._channel: Optional[_ChannelServer] = None
        self._published: Dict[int, asyncio.Future] = {}
        self.learner = None
        try:
            # Build on the compute thread: torch's thread settings are per thread.
            self._executor.submit(0, lambda: self._build(config, module_spec, learner_class, device)).result()
        except BaseException:
            self.closed = True
            self._executor.stop()
            raise

    def _build(self, config, module_spec, learner_class, device) -> None:
        learner = learner_class(config=config, module_spec=module_spec, device=device)
        learner.build()
        self.learner = learner

    # -- requests ---------------------------------------------------------------------------------
    async def run(self, seq: int, request: Request) -> Dict[str, Any]:
        """Run ``request`` as this learner's request number ``seq`` (>= 1) and reply with its outcome."""
        published = self._published_future(seq) if request.publish else None
        try:
            future = self._executor.submit(seq, lambda: self._execute(seq, request))
        except RuntimeError as err:
            reply = self._error_reply(err, secondary=False)
        else:
            reply = await asyncio.wrap_future(future)
        if published is not None and not published.done():
            published.set_result(reply)
        self._log_metrics(seq, request, reply)
        return reply

    def _on_channel_request(self, seq: int, request: Any, reply: Callable[[Dict[str, Any]], None]) -> None:
        """A request from the direct channel (reader thread): same order, same replies as :meth:`run`."""
        if isinstance(request, Request):
            work = lambda: self._execute(seq, request)  # noqa: E731
        else:  # it could not be unpickled here: the error is this request's reply
            work = lambda: self._error_reply(request, secondary=False)  # noqa: E731
        try:
            future = self._executor.submit(seq, work)
        except RuntimeError as err:
            reply(self._error_reply(err, secondary=False))
            return

        def done(f: concurrent.futures.Future) -> None:
            try:
                value = f.result()
            except Exception as err:  # the learner was shut down meanwhile
                value = self._error_reply(err, secondary=False)
            reply(value)
            if isinstance(request, Request) and request.log_topic:
                self._worker.loop.add_callback(self._log_metrics, seq, request, value)

        future.add_done_callback(done)

    def _log_metrics(self, seq: int, request: Request, reply: Dict[str, Any]) -> None:
        # Training metrics for the dashboard / ``client.get_events(topic)`` (on the worker's loop).
        if request.log_topic and reply["ok"]:
            self._worker.log_event(request.log_topic, {"learner": self.key, "request": seq, "result": reply["value"]})

    async def wait_published(self, seq: int) -> Dict[str, Any]:
        """The reply of request ``seq`` (sent with ``publish=True``), waiting for it if needed."""
        return await asyncio.shield(self._published_future(seq))

    def _published_future(self, seq: int) -> asyncio.Future:
        future = self._published.get(seq)
        if future is None:
            future = self._published[seq] = asyncio.get_running_loop().create_future()
            if len(self._published) > PUBLISHED_RESULTS_KEPT:
                for old in sorted(self._published)[: len(self._published) - PUBLISHED_RESULTS_KEPT]:
                    if self._published[old].done():
                        del self._published[old]
        return future

    def _execute(self, seq: int, request: Request) -> Dict[str, Any]:
        try:
            if request.collective and self._collective_broken:
                raise _ProcessGroupClosed(self._collective_broken)
            if isinstance(request.target, str):
                value = getattr(self, "_op_" + request.target)(*request.args)
            else:
                value = request.target(self.learner, *request.args)
        except Exception as err:
            secondary = isinstance(err, _ProcessGroupClosed) or _is_peer_failure(err)
            if request.collective and self.world_size > 1:
                # Peers may be blocked in a collective with us: closing our sockets frees them now.
                self._drop_process_group(
                    f"The process group was closed after request {seq} failed on learner rank {self.rank}; "
                    "the LearnerGroup re-forms it before its next update."
                )
            return self._error_reply(err, secondary=secondary)
        return {"ok": True, "value": value if request.want_result else None}

    def _error_reply(self, err: BaseException, *, secondary: bool) -> Dict[str, Any]:
        try:
            pickled = cloudpickle.dumps(err)
        except Exception:  # an exception that cannot travel: its text and traceback still do
            pickled = None
        return {
            "ok": False,
            "error": pickled,
            "type": f"{type(err).__module__}.{type(err).__qualname__}",
            "message": str(err),
            "traceback": "".join(traceback.format_exception(err)),
            "rank": self.rank,
            "worker": self.address,
            "secondary": secondary,
        }

    # -- the group's own operations (run on the compute thread, in order) ------------------------
    def _op_device_info(self) -> Dict[str, Any]:
        device = self.learner.device
        uuid = None
        if device.type == "cuda":
            uuid = str(getattr(torch.cuda.get_device_properties(device), "uuid", device.index))
        return {"host": socket.gethostname(), "device": str(device), "gpu_uuid": uuid}

    def _op_open_channel(self) -> Tuple[int, bytes]:
        """Listen for the driver's direct channel on this worker's interface; ``(port, token)``."""
        if self._channel is None:
            self._channel = _ChannelServer(self.host, self._on_channel_request)
        return self._channel.port, self._channel.token

    def _op_open_store(self, timeout_s: float) -> int:
        """Rank 0: start the group's TCPStore on a port the OS picks now; returns the port."""
        if self._store is None:
            self._store = torch.distributed.TCPStore(
                self.host, 0, self.world_size, is_master=True,
                timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False,
            )
        return int(self._store.port)

    def _op_form_group(self, store_host: str, port: int, generation: int, backend: str, store_timeout_s: float, op_timeout_s: float) -> str:
        """Build this rank's part of process group ``generation`` (all ranks call this concurrently)."""
        self._drop_process_group(None)
        if self.rank == 0:
            store = self._store
        else:
            store = torch.distributed.TCPStore(
                store_host, port, self.world_size, is_master=False, timeout=datetime.timedelta(seconds=store_timeout_s)
            )
        prefixed = torch.distributed.PrefixStore(f"dlearner/{self.group_id}/{generation}", store)
        op_timeout = datetime.timedelta(seconds=op_timeout_s)
        if backend == "nccl":
            from torch.distributed import ProcessGroupNCCL  # only in CUDA builds of torch

            options = ProcessGroupNCCL.Options()
            options._timeout = op_timeout
            group = ProcessGroupNCCL(prefixed, self.rank, self.world_size, options)
        else:
            from torch.distributed import ProcessGroupGloo

            options = ProcessGroupGloo._Options()
            # Gloo talks over the interface Dask already uses to reach this worker.
            options._devices = [ProcessGroupGloo.create_device(hostname=self.host)]
            options._timeout = op_timeout
            group = ProcessGroupGloo(prefixed, self.rank, self.world_size, options)
        collective = TorchCollective.from_process_group(group, device=self.learner.device)
        probe = torch.ones(1)
        collective.all_reduce_sum(probe)  # a half-formed group fails here, not in the first update
        if int(probe.item()) != self.world_size:
            raise ProcessGroupError(f"Process group check summed to {probe.item()}, expected {self.world_size}.")
        self._collective, self._collective_broken = collective, None
        self.learner.set_collective(collective)
        return collective.backend

    def _op_close_group(self) -> None:
        self._drop_process_group(None)

    def _op_close(self) -> None:
        """Tear down: process group, store, learner; then stop the compute thread."""
        self._drop_process_group(None)
        self._store = None
        self.learner = None
        self._release(stop_from_other_thread=True)

    def abandon(self) -> None:
        """Free this process from a learner whose group never closed it (any thread)."""
        logger.warning("Learner %s was released by Dask without being closed; stopping it.", self.key)
        self._release(stop_from_other_thread=False)
        self._drop_process_group(None)

    def _release(self, *, stop_from_other_thread: bool) -> None:
        global _HOSTED
        self.closed = True
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        with _HOSTED_LOCK:
            if _HOSTED is not None and _HOSTED() is self:
                _HOSTED = None
        if stop_from_other_thread:
            # Called on the compute thread itself: it exits after the current request.
            threading.Thread(target=self._executor.stop, daemon=True).start()
        else:
            self._executor.stop()

    def _drop_process_group(self, reason: Optional[str]) -> None:
        collective, self._collective = self._collective, None
        self._collective_broken = reason
        if self.learner is not None:
            self.learner.set_collective(None)
        if collective is not None:
            collective.close()


def _tune_allocator() -> None:
    """Undo ``MALLOC_TRIM_THRESHOLD_`` (set by Dask's nanny) in a learner's worker process.

    With it, glibc stops adapting its mmap threshold and every tensor above 128 KiB is mmap'ed and
    unmapped again: updates get 30-40 % slower. The limits set here are glibc's own adaptive maxima.
    The worker is dedicated to the learner, so the process-wide change is its to make.
    """
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl...): nothing to undo
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 * 2**20)
    libc.mallopt(m_trim_threshold, 64 * 2**20)


def learner_actor_key(rank: int, group_id: str) -> str:
    """The Dask key of learner ``rank`` of a group: readable in the dashboard."""
    return f"learner-{rank}-{group_id}"


def _is_peer_failure(err: BaseException) -> bool:
    text = str(err)
    return "Connection closed by peer" in text or "Connection reset by peer" in text


# ================================================================================ replies → values
def rebuild_exception(reply: Dict[str, Any]) -> BaseException:
    """The exception of a failed reply, with the learner's traceback attached as a note."""
    err: Optional[BaseException] = None
    if reply.get("error") is not None:
        try:
            err = cloudpickle.loads(reply["error"])
        except Exception:  # the driver cannot import the exception's class: fall back to its text
            err = None
    if not isinstance(err, BaseException):
        err = RemoteLearnerError(f"{reply['type']}: {reply['message']}")
    try:
        err.learner_rank, err.learner_worker = reply["rank"], reply["worker"]
    except AttributeError:  # an exception class with __slots__: the note below still says it
        pass
    err.add_note(
        f"Raised in learner rank {reply['rank']} on Dask worker {reply['worker']}. Remote traceback:\n"
        + reply["traceback"].rstrip()
    )
    return err


_ABANDONED = {"ok": False, "secondary": True, "rank": -1, "worker": "", "type": "", "message": "", "traceback": "", "error": None}


def died_reply(rank: int, worker: str, message: str) -> Dict[str, Any]:
    return {"ok": False, "died": True, "rank": rank, "worker": worker, "message": message}


def values_or_raise(replies: Sequence[Dict[str, Any]]) -> List[Any]:
    """Values of the replies, in rank order; raises the most telling error if any rank failed.

    A dead learner wins; then the first error that is not a consequence of another rank's failure.
    """
    failed = [r for r in replies if not r["ok"]]
    if not failed:
        return [r["value"] for r in replies]
    dead = [r for r in failed if r.get("died")]
    if dead:
        raise LearnerDiedError(dead[0]["message"])
    primary = [r for r in failed if not r.get("secondary")] or failed
    err = rebuild_exception(primary[0])
    if len(failed) > 1:
        err.add_note(f"The request failed on learner ranks {[r['rank'] for r in failed]} of {len(replies)}.")
    raise err


async def gather_published(targets: Tuple[Tuple[int, str, str, int], ...]) -> Any:
    """The task behind an ``update_async`` future: wait for every rank's reply, return rank 0's value.

    ``targets`` holds ``(rank, worker address, actor key, request number)`` per learner. Runs as an
    ``async`` task on any worker, so it occupies no thread while the learners work.
    """
    worker = get_worker()

    async def one(rank: int, address: str, key: str, seq: int) -> Dict[str, Any]:
        remote = direct_rpc(address, timeout=TASK_CONNECT_TIMEOUT_S, connection_args=worker.connection_args)
        try:
            response = await remote.actor_execute(actor=key, function="wait_published", args=[seq], kwargs={})
        except (OSError, CommClosedError, KeyError) as err:
            return died_reply(rank, address, f"Learner rank {rank} ({key}) on Dask worker {address} cannot be reached: {err!r}")
        finally:
            await remote.close_rpc()
        if response.get("status") != "OK":
            raise response["exception"]
        return response["result"]

    replies = await asyncio.gather(*(one(*t) for t in targets))
    return values_or_raise(replies)[0]


# ===================================================================================== driver side
@dataclasses.dataclass
class _Slot:
    """The group's bookkeeping for one learner."""

    rank: int
    worker: str
    key: str
    device: Optional[str]
    future: Optional[Future] = None
    next_seq: int = 1
    died: Optional[str] = None
    link: Optional[_ChannelLink] = None  # direct channel for blocking requests, if available
    death: Optional[asyncio.Future] = None  # resolved (on the client's loop) when the learner is gone


class DaskLearnerPool:
    """The driver's handle on ``num_learners`` learner actors: requests, ordering, deaths, teardown.

    :meth:`submit` returns a ``concurrent.futures.Future`` of the per-rank values (blocking callers
    just call ``.result()``); :meth:`submit_future` also returns a ``distributed.Future``.
    """

    def __init__(
        self,
        *,
        config: Any,
        learner_config: Any,
        module_spec: Any,
        learner_class: type,
        group_id: str,
        num_learners: int,
        collective_timeout_s: float,
    ):
        """``config`` says where to run (it may hold the user's client); ``learner_config`` is what
        the learners get (no client, and the shared seed filled in)."""
        self.group_id = group_id
        self.num_learners = num_learners
        self.metrics_topic = f"learner-metrics-{group_id}"
        self._config = config
        self._learner_config = learner_config
        self._collective_timeout_s = float(collective_timeout_s)
        self._startup_timeout_s = config.resolved_startup_timeout_s()
        self._lock = threading.Lock()
        self._channel_lock = threading.Lock()
        self._closed = False
        self._generation = 0
        self._pg_broken = False
        self._resync_from: Optional[int] = None
        self._store_port: Optional[int] = None
        self.backend: Optional[str] = None
        self._updates_submitted = 0
        self.connection = connect(config, num_learners)
        try:
            client = self.connection.client
            self._aloop = client.loop.asyncio_loop
            self._direct = client.direct_to_workers is not False
            placements = place_learners(self.connection, config, num_learners)
            self.slots = [_Slot(p.rank, p.worker, learner_actor_key(p.rank, group_id), p.device) for p in placements]
            self._run_on_loop(self._init_events())
            for slot in self.slots:
                # Pushed by the scheduler when the worker leaves: later calls fail at once.
                client.subscribe_topic(slot.worker, self._worker_event_handler(slot))
            self._start_actors(module_spec, learner_class)
            self._open_channels()
            if num_learners > 1:
                self.backend = self._choose_backend()
                self._form_process_group()
        except BaseException:
            self.shutdown()
            raise

    # -- start-up -----------------------------------------------------------------------------------
    async def _init_events(self) -> None:
        loop = asyncio.get_running_loop()
        for slot in self.slots:
            slot.death = loop.create_future()

    def _start_actors(self, module_spec: Any, learner_class: type) -> None:
        client = self.connection.client
        gpus = float(self._config.num_gpus_per_learner or 0)
        for slot in self.slots:
            slot.future = client.submit(
                LearnerActor,
                group_id=self.group_id,
                rank=slot.rank,
                world_size=self.num_learners,
                config=self._learner_config,
                module_spec=module_spec,
                learner_class=learner_class,
                device=slot.device,
                actor=True,
                key=slot.key,
                workers=[slot.worker],
                allow_other_workers=False,  # placement is the group's decision, not the scheduler's
                resources={"GPU": gpus} if gpus > 0 else None,
                pure=False,
            )
        deadline = time.monotonic() + self._startup_timeout_s
        for slot in self.slots:
            try:
                slot.future.result(timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError as err:
                late = [f"rank {s.rank} on {s.worker} ({s.future.status})" for s in self.slots if not s.future.done()]
                raise LearnerGroupError(
                    f"Learners did not start within learner_startup_timeout_s={self._startup_timeout_s:g} s: "
                    f"{', '.join(late)}."
                ) from err
            except Exception as err:  # the learner's own error, with the worker's traceback
                err.add_note(f"Raised while starting learner rank {slot.rank} on Dask worker {slot.worker}.")
                raise

    def _choose_backend(self) -> str:
        gpus = float(self._config.num_gpus_per_learner or 0)
        if gpus < 1:
            return "gloo"
        infos = self.submit("device_info", [()] * self.num_learners, result_ranks=None).result()
        ids = {(i["host"], i["gpu_uuid"]) for i in infos}
        if all(i["gpu_uuid"] for i in infos) and len(ids) == self.num_learners:
            return "nccl"
        logger.warning("Learners share GPUs (%s); using gloo instead of NCCL.", infos)
        return "gloo"

    def _form_process_group(self) -> None:
        """(Re-)form the process group on all learners: rank 0's store, then every rank at once."""
        self._generation += 1
        timeout = self._startup_timeout_s
        store_host = get_address_host(self.slots[0].worker)
        try:
            if self._store_port is None:
                self._store_port = self.submit("open_store", [(timeout,)], ranks=[0]).result()[0]
            args = (store_host, self._store_port, self._generation, self.backend, timeout, self._collective_timeout_s)
            pending = self.submit("form_group", [args] * self.num_learners, result_ranks=None)
            pending.result(timeout=timeout + 30)
        except concurrent.futures.TimeoutError as err:
            self._pg_broken = True
            raise ProcessGroupError(
                f"The learners' torch.distributed process group ({self.backend}, store {self._store_port}) did not form "
                f"within {timeout:g} s."
            ) from err
        except LearnerDiedError:
            raise
        except Exception as err:
            self._pg_broken = True
            where = f"learner rank {err.learner_rank} on {err.learner_worker}" if hasattr(err, "learner_rank") else "a learner"
            raise ProcessGroupError(
                f"The learners could not form their torch.distributed process group ({self.backend}) through the "
                f"store on {store_host}:{self._store_port}: {where} failed with {type(err).__name__}: {err}"
            ) from err
        self._pg_broken = False

    # -- deaths -------------------------------------------------------------------------------------
    def _worker_event_handler(self, slot: _Slot) -> Callable[[Any], None]:
        def handler(event: Any) -> None:
            _, msg = event
            if isinstance(msg, dict) and msg.get("action") == "remove-worker":
                self._mark_dead(slot, f"its worker left the cluster ({'retired' if msg.get('expected') else 'died'})")

        return handler

    def _mark_dead(self, slot: _Slot, why: str) -> None:
        # Runs on the client's event loop.
        if slot.died is None:
            slot.died = (
                f"Learner rank {slot.rank} ({slot.key}) on Dask worker {slot.worker} is gone: {why}. The group "
                "cannot train without it; get_state()/get_weights() still read a surviving learner. Shut the group "
                "down and build a new one (restarting single learners is not implemented yet)."
            )
            logger.error(slot.died)
            if slot.future is not None:
                slot.future.release()  # so the scheduler never re-creates the actor elsewhere
        if slot.death is not None and not slot.death.done():
            slot.death.set_result(None)

    def dead_error(self) -> Optional[LearnerDiedError]:
        """A :class:`LearnerDiedError` if any learner is gone, else ``None``."""
        dead = [s for s in self.slots if s.died]
        if not dead:
            return None
        return LearnerDiedError(" ".join(s.died for s in dead))

    def live_ranks(self) -> List[int]:
        return [s.rank for s in self.slots if not s.died]

    # -- requests -----------------------------------------------------------------------------------
    def _run_on_loop(self, coro) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._aloop).result()

    def submit(
        self,
        target: Any,
        args_per_rank: Sequence[tuple],
        *,
        ranks: Optional[Sequence[int]] = None,
        collective: bool = False,
        result_ranks: Optional[Sequence[int]] = (0,),
        publish: bool = False,
        log_topic: Optional[str] = None,
    ) -> concurrent.futures.Future:
        """Send ``target(learner, *args_per_rank[i])`` to learner ``ranks[i]``; a future of the values.

        ``result_ranks``: ranks whose value is sent back (others reply ``None``; ``None`` = all).
        Errors are raised by the future's ``result()``, rebuilt with the remote traceback.
        """
        sends, generation = self._number(target, args_per_rank, ranks, collective, result_ranks, publish, log_topic)
        future = asyncio.run_coroutine_threadsafe(self._dispatch(sends, collective, generation), self._aloop)
        future.seqs = [seq for _, seq, _ in sends]  # type: ignore[attr-defined]
        return future

    def call(
        self,
        target: Any,
        args_per_rank: Sequence[tuple],
        *,
        ranks: Optional[Sequence[int]] = None,
        collective: bool = False,
        result_ranks: Optional[Sequence[int]] = (0,),
        log_topic: Optional[str] = None,
    ) -> List[Any]:
        """Like :meth:`submit`, but wait: the values by rank, or the rebuilt remote exception.

        Uses the direct channel when there is one (the latency of a blocking update matters).
        """
        if not all(s.link is not None or s.died for s in self.slots):
            return self.submit(
                target, args_per_rank, ranks=ranks, collective=collective, result_ranks=result_ranks, log_topic=log_topic
            ).result()
        with self._channel_lock:
            sends, generation = self._number(target, args_per_rank, ranks, collective, result_ranks, False, log_topic)
            replies = self._call_channel(sends)
        self._note_failures(sends, replies, collective, generation)
        return values_or_raise(replies)

    def _number(self, target, args_per_rank, ranks, collective, result_ranks, publish, log_topic):
        """The requests for ``ranks`` with their request numbers, handed out in call order."""
        if self._closed:
            raise LearnerGroupError("This LearnerGroup was shut down.")
        ranks = list(range(self.num_learners)) if ranks is None else list(ranks)
        if len(args_per_rank) != len(ranks):
            raise ValueError(f"{len(args_per_rank)} argument tuples for {len(ranks)} learners.")
        with self._lock:
            sends = []
            for rank, args in zip(ranks, args_per_rank):
                slot = self.slots[rank]
                request = Request(
                    target=target,
                    args=tuple(args),
                    collective=collective,
                    want_result=result_ranks is None or rank in result_ranks,
                    publish=publish,
                    log_topic=log_topic if rank == 0 else None,
                )
                sends.append((slot, slot.next_seq, request))
                slot.next_seq += 1
            return sends, self._generation

    def _call_channel(self, sends) -> List[Dict[str, Any]]:
        failed: Dict[int, BaseException] = {}
        for slot, seq, request in sends:  # send to every learner first: they work in parallel
            if not slot.died:
                try:
                    slot.link.send(seq, request)
                except OSError as err:
                    failed[slot.rank] = err
        replies: List[Dict[str, Any]] = []
        if not failed:
            for slot, seq, _ in sends:
                if slot.died:
                    break
                try:
                    replies.append(slot.link.receive(seq, idle=lambda: self._check_alive(sends)))
                except LearnerDiedError:
                    break  # the scheduler reported a learner of this call gone meanwhile
                except OSError as err:
                    failed[slot.rank] = err
                    break
            else:
                return replies
        # A learner is gone: the call fails now, without waiting for the others to notice.
        for slot, _, _ in sends:
            if slot.rank in failed and not slot.died:
                self._give_up(slot, failed[slot.rank])
        dead = next(slot for slot, _, _ in sends if slot.died)
        return [died_reply(dead.rank, dead.worker, dead.died)]

    def _check_alive(self, sends) -> None:
        for slot, _, _ in sends:
            if slot.died:  # set by the scheduler's remove-worker event
                raise LearnerDiedError(slot.died)

    def _give_up(self, slot: _Slot, err: BaseException) -> None:
        """Lost contact with a learner: its request stream is broken, so it is given up. Wait
        briefly for the scheduler to say why (for a precise message)."""
        deadline = time.monotonic() + DEATH_CONFIRM_S
        while not slot.died and time.monotonic() < deadline:
            time.sleep(0.05)
        if not slot.died:
            self._aloop.call_soon_threadsafe(self._mark_dead, slot, f"lost contact with it ({err!r})")
            while not slot.died:
                time.sleep(0.001)

    def _open_channels(self) -> None:
        if not self._direct or not all(s.worker.startswith("tcp://") for s in self.slots):
            return  # TLS or proxied clusters: everything goes through Dask's RPC
        infos = self.submit("open_channel", [()] * self.num_learners, result_ranks=None).result()
        try:
            for slot, (port, token) in zip(self.slots, infos):
                slot.link = _ChannelLink(get_address_host(slot.worker), port, token, timeout_s=10)
        except OSError as err:
            logger.warning(
                "LearnerGroup %s: cannot open direct channels to the learners (%r); blocking requests use Dask's RPC.",
                self.group_id, err,
            )
            for slot in self.slots:
                if slot.link is not None:
                    slot.link.close()
                slot.link = None

    def submit_future(self, target: Any, args_per_rank: Sequence[tuple], *, log_topic: Optional[str] = None) -> Tuple[concurrent.futures.Future, Future]:
        """Like :meth:`submit` for a collective request on all learners, plus a ``distributed.Future``
        of rank 0's value, computed by an ``async`` task named ``learner-update-<group id>-<n>``."""
        pending = self.submit(target, args_per_rank, collective=True, publish=True, log_topic=log_topic)
        self._updates_submitted += 1
        targets = tuple((s.rank, s.worker, s.key, seq) for s, seq in zip(self.slots, pending.seqs))  # type: ignore[attr-defined]
        dask_future = self.connection.client.submit(
            gather_published, targets, key=f"learner-update-{self.group_id}-{self._updates_submitted}", pure=False
        )
        return pending, dask_future

    async def _dispatch(self, sends, collective: bool, generation: int) -> List[Any]:
        calls = [asyncio.ensure_future(self._call(slot, seq, request)) for slot, seq, request in sends]
        pending = set(calls)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if any(not c.result()["ok"] and c.result().get("died") for c in done):
                break  # a learner is gone: fail now, without waiting for the others to notice
        replies = [c.result() if c.done() else _ABANDONED for c in calls]
        self._note_failures(sends, replies, collective, generation)
        return values_or_raise(replies)

    def _note_failures(self, sends, replies, collective: bool, generation: int) -> None:
        if collective and any(not r["ok"] for r in replies) and generation == self._generation:
            # Failed ranks dropped their process group: re-form before the next update. If some ranks
            # finished the update and others did not, their states may differ: copy a finisher's.
            self._pg_broken = True
            finished = [slot.rank for (slot, _, _), r in zip(sends, replies) if r["ok"]]
            if finished and self._resync_from is None:
                self._resync_from = finished[0]

    async def _call(self, slot: _Slot, seq: int, request: Request) -> Dict[str, Any]:
        if slot.died:
            return died_reply(slot.rank, slot.worker, slot.died)
        remote = self.connection.client.rpc(slot.worker) if self._direct else _ProxyRPC(self.connection.client.scheduler, slot.worker)
        call = asyncio.ensure_future(
            remote.actor_execute(actor=slot.key, function="run", args=[seq, to_serialize(request)], kwargs={})
        )
        await asyncio.wait({call, slot.death}, return_when=asyncio.FIRST_COMPLETED)
        if not call.done():
            call.cancel()
            return died_reply(slot.rank, slot.worker, slot.died)
        err = call.exception()
        if err is None:
            response = call.result()
            if response.get("status") == "OK":
                return response["result"]
            err = response.get("exception")
        # Lost contact while the request was in flight: the request stream of this learner is broken,
        # so it is given up. Wait briefly for the scheduler to confirm why, for a precise message.
        try:
            await asyncio.wait_for(asyncio.shield(slot.death), DEATH_CONFIRM_S)
        except asyncio.TimeoutError:
            self._mark_dead(slot, f"lost contact with it ({err!r})")
        return died_reply(slot.rank, slot.worker, slot.died)

    # -- process group upkeep ---------------------------------------------------------------------
    def ensure_process_group(self) -> None:
        """Before an update: re-form the process group if a failed update broke it (and resync)."""
        error = self.dead_error()
        if error is not None:
            raise error
        if self.num_learners > 1 and self._pg_broken:
            self._form_process_group()
            if self._resync_from is not None:
                source, self._resync_from = self._resync_from, None
                state = self.submit(_get_full_state, [()], ranks=[source]).result()[0]
                others = [r for r in range(self.num_learners) if r != source]
                self.submit(_set_full_state, [(state,)] * len(others), ranks=others, result_ranks=()).result()

    # -- teardown -------------------------------------------------------------------------------------
    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Release the actors (after the requests already sent), then close what the group opened."""
        if self._closed:
            return
        slots = getattr(self, "slots", [])
        live = [s for s in slots if not s.died and s.future is not None and s.future.status == "finished"]
        if live:
            try:
                closing = self.submit("close", [()] * len(live), ranks=[s.rank for s in live], result_ranks=())
                closing.result(timeout=timeout_s)
            except (concurrent.futures.TimeoutError, LearnerGroupError, OSError) as err:
                logger.warning("LearnerGroup %s: closing the learners failed (%r); releasing them anyway.", self.group_id, err)
        self._closed = True
        for slot in slots:
            if slot.link is not None:
                slot.link.close()
                slot.link = None
        connection = getattr(self, "connection", None)
        if connection is None:
            return
        client = connection.client
        futures = [s.future for s in slots if s.future is not None]
        if client.status == "running":
            for slot in slots:
                client.unsubscribe_topic(slot.worker)
            if futures:
                # The scheduler forgets the actors now, so the workers are free for a new group.
                client.cancel(futures, force=True)
        connection.close()


class _ProxyRPC:
    """RPC through the scheduler, for clients made with ``direct_to_workers=False``."""

    def __init__(self, scheduler_rpc, address: str):
        self._rpc, self._address = scheduler_rpc, address

    def __getattr__(self, op: str):
        async def call(**msg):
            msg["op"] = op
            return await self._rpc.proxy(worker=self._address, msg=msg)

        return call


def _get_full_state(learner) -> Dict[str, Any]:
    return learner.get_state()


def _set_full_state(learner, state) -> None:
    learner.set_state(state)


# ===================================================================================== env runners
def env_runner_actor_key(index: int, run_id: str) -> str:
    """Dashboard-readable key of an env-runner actor (contains ``env-runner``)."""
    return f"env-runner-{index}-{run_id}"


def place_env_runners(connection: ClusterConnection, num_runners: int, timeout_s: float) -> List[str]:
    """One worker process per env runner, preferring workers that host no learner.

    Env runners are synchronous actors: two on one worker would share its single actor thread
    and sample one after the other, so each gets its own worker while there are enough.
    """
    client = connection.client
    deadline = time.monotonic() + timeout_s
    while True:
        workers = client.scheduler_info(n_workers=-1)["workers"]
        if len(workers) >= num_runners or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    if not workers:
        raise ClusterResourceError(
            f"The Dask cluster ({connection.description}) has no workers after {timeout_s:g} s; "
            f"num_env_runners={num_runners} needs worker processes."
        )
    identities = client.run(_worker_identity, workers=list(workers), on_error="return")
    free = [a for a in sorted(workers) if isinstance(identities.get(a), dict) and not identities[a].get("learner")]
    busy = [a for a in sorted(workers) if a not in free]
    order = free + busy
    return [order[i % len(order)] for i in range(num_runners)]


class DaskEnvRunnerGroup:
    """``num_env_runners=N>=1``: N :class:`~dlearner.env_runner.EnvRunner` actors sampling in parallel.

    Each runner samples ``ceil(num_timesteps / N)`` steps per call; the calls run concurrently and
    the fragments come back as a list. New weights go to every runner once per sync, as one message
    per runner sent to all runners concurrently (not a round trip per runner and array).
    """

    def __init__(self, config: Any, module_spec: Any, *, connection: ClusterConnection, run_id: str):
        from dlearner.env_runner import EnvRunner

        self.connection = connection
        self.run_id = run_id
        client = connection.client
        num = int(config.num_env_runners)
        workers = place_env_runners(connection, num, config.resolved_startup_timeout_s())
        runner_config = config.copy_for_learner()
        futures = [
            client.submit(
                EnvRunner, runner_config, module_spec=module_spec, worker_index=i + 1,
                workers=[address], allow_other_workers=False, actor=True, pure=False,
                key=env_runner_actor_key(i, run_id),
            )
            for i, address in enumerate(workers)
        ]
        try:
            self.runners = [f.result(timeout=config.resolved_startup_timeout_s()) for f in futures]
        except TimeoutError as err:
            raise ClusterResourceError(
                f"{num} env runner actor(s) did not start within {config.resolved_startup_timeout_s():g} s on "
                f"{connection.description}."
            ) from err
        self._creation_futures = futures
        self.workers = workers

    @property
    def num_runners(self) -> int:
        return len(self.runners)

    def _all(self, method: str, *args_per_runner) -> List[Any]:
        calls = [getattr(runner, method)(*args) for runner, args in zip(self.runners, args_per_runner)]
        return [call.result() for call in calls]

    def sample(self, num_timesteps: int) -> List[Dict[str, Any]]:
        per_runner = math.ceil(num_timesteps / self.num_runners)
        return self._all("sample", *[(per_runner,)] * self.num_runners)

    def sync_weights(self, weights) -> None:
        self._all("set_weights", *[(weights,)] * self.num_runners)

    def get_metrics(self) -> List[Dict[str, Any]]:
        return self._all("get_metrics", *[()] * self.num_runners)

    def evaluate(self, num_episodes: int, seed: Optional[int] = None) -> Dict[str, Any]:
        return self.runners[0].evaluate(num_episodes, seed=seed).result()

    def get_state(self) -> List[Dict[str, Any]]:
        return self._all("get_state", *[()] * self.num_runners)

    def set_state(self, states: Sequence[Dict[str, Any]]) -> None:
        pairs = list(zip(self.runners, states))
        for call in [runner.set_state(state) for runner, state in pairs]:
            call.result()

    def stop(self) -> None:
        calls = [runner.stop() for runner in self.runners]
        for call in calls:
            try:
                call.result(timeout=10)
            except (OSError, TimeoutError, CommClosedError) as err:
                logger.warning("env runner did not stop cleanly: %s", err)
        # Releasing the creation futures removes the actors from the workers.
        for future in self._creation_futures:
            future.release()
        self.runners = []
