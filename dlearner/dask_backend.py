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
6. **The driver side**: :class:`DaskLearnerPool` sends each request straight to the learner's worker
   (one direct RPC per learner, no scheduler round trip, the shard travels once), watches for
   worker deaths through the scheduler's ``remove-worker`` events and turns them into
   :class:`LearnerDiedError` at once, and builds ``distributed.Future`` objects for
   ``update_async`` from small ``async`` tasks named ``learner-update-<group id>-<n>``.

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
import dataclasses
import datetime
import logging
import math
import os
import socket
import threading
import time
import traceback
import weakref
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import cloudpickle
import torch

from distributed import Client, Future, LocalCluster, get_worker
from distributed.comm import get_address_host
from distributed.comm.core import CommClosedError
from distributed.core import rpc as direct_rpc
from distributed.protocol import to_serialize

from dlearner.collective import TorchCollective

logger = logging.getLogger(__name__)

#: Seconds a task of ``update_async`` waits to connect to a learner's worker before calling it dead.
TASK_CONNECT_TIMEOUT_S = 10.0
#: Seconds the driver waits, after losing the connection to a learner, for the scheduler to confirm
#: that its worker left (only to word the error precisely; the learner is given up either way).
DEATH_CONFIRM_S = 2.0
#: Published results (for ``update_async`` futures) a learner keeps, newest first.
PUBLISHED_RESULTS_KEPT = 256


# ============================================================================================ errors
class LearnerGroupError(RuntimeError):
    """A problem of the Dask side of a LearnerGroup (cluster, placement, learners, process group)."""


class ClusterResourceError(LearnerGroupError):
    """The cluster lacks the workers or resources the group asked for."""


class ProcessGroupError(LearnerGroupError):
    """The learners' ``torch.distributed`` process group could not be formed."""


class LearnerDiedError(LearnerGroupError):
    """A learner's worker died or cannot be reached; the group cannot train any more."""


class RemoteLearnerError(LearnerGroupError):
    """An exception raised inside a learner whose type cannot be rebuilt in the driver."""


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
    start an embedded ``LocalCluster`` with ``num_learners`` worker processes."""
    timeout = float(config.learner_startup_timeout_s)
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
            client = Client(config.address, set_as_default=False, timeout=timeout)
        except (OSError, TimeoutError) as err:
            raise LearnerGroupError(
                f"Cannot reach the Dask scheduler at address={config.address!r} within {timeout:g} s: {err}"
            ) from err
        return ClusterConnection(client, None, owns_client=True, description=f"scheduler {config.address}")
    if config.scheduler_file is not None:
        if not os.path.exists(config.scheduler_file):
            raise FileNotFoundError(f"scheduler_file={config.scheduler_file!r} does not exist.")
        try:
            client = Client(scheduler_file=config.scheduler_file, set_as_default=False, timeout=timeout)
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
    cluster = LocalCluster(**kwargs)
    try:
        client = Client(cluster, set_as_default=False)
    except BaseException:
        cluster.close()
        raise
    return ClusterConnection(client, cluster, owns_client=True, description="embedded LocalCluster")


# ======================================================================================== placement
@dataclasses.dataclass(frozen=True)
class Placement:
    """Where one learner runs."""

    rank: int
    worker: str
    device: Optional[str]


def _worker_identity(dask_worker) -> Dict[str, Any]:
    """Runs on every worker (``client.run``): which process it is and whether it hosts a learner."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "learner": hosted_learner_key()}


def place_learners(connection: ClusterConnection, config: Any, num_learners: int) -> List[Placement]:
    """Pick ``num_learners`` distinct worker processes that have the resources a learner needs.

    Fails within ``learner_startup_timeout_s`` with a :class:`ClusterResourceError` naming what is
    missing; fails at once when the cluster already has enough workers but not enough eligible ones.
    """
    client = connection.client
    gpus = float(config.num_gpus_per_learner or 0)
    timeout = float(config.learner_startup_timeout_s)
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
    identities = client.run(_worker_identity, workers=list(workers))
    eligible, reasons, seen_processes = [], {}, {}
    for address in sorted(workers, key=lambda a: (workers[a].get("host", ""), a)):
        info, ident = workers[address], identities.get(address, {})
        process = (ident.get("host"), ident.get("pid"))
        have = float((info.get("resources") or {}).get("GPU", 0))
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


# ===================================================================================== learner side
_HOSTED: Optional["weakref.ref[LearnerActor]"] = None
_HOSTED_LOCK = threading.Lock()


def hosted_learner_key() -> Optional[str]:
    """The actor key of the learner living in this process, if any."""
    actor = _HOSTED() if _HOSTED is not None else None
    return actor.key if actor is not None and not actor.closed else None


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
            other = hosted_learner_key()
            if other is not None:
                raise LearnerGroupError(
                    f"Worker {self.address} (pid {os.getpid()}) already hosts learner {other}; two learners never "
                    "share a worker process. Give each learner its own worker process."
                )
            _HOSTED = weakref.ref(self)
        self._executor = _OrderedExecutor(name=f"dlearner-{self.key}")
        weakref.finalize(self, self._executor.stop)
        self._collective: Optional[TorchCollective] = None
        self._collective_broken: Optional[str] = None
        self._store = None  # rank 0: the TCPStore server of the process group
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
        if request.log_topic and reply["ok"]:
            # Training metrics for the dashboard / ``client.get_events(topic)``.
            self._worker.log_event(request.log_topic, {"learner": self.key, "request": seq, "result": reply["value"]})
        return reply

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
        global _HOSTED
        self._drop_process_group(None)
        self._store = None
        self.learner = None
        self.closed = True
        with _HOSTED_LOCK:
            if _HOSTED is not None and _HOSTED() is self:
                _HOSTED = None
        # Stopping from the compute thread itself: the loop exits after this request.
        threading.Thread(target=self._executor.stop, daemon=True).start()

    def _drop_process_group(self, reason: Optional[str]) -> None:
        collective, self._collective = self._collective, None
        self._collective_broken = reason
        if self.learner is not None:
            self.learner.set_collective(None)
        if collective is not None:
            collective.close()


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
    err.add_note(
        f"Raised in learner rank {reply['rank']} on Dask worker {reply['worker']}. Remote traceback:\n"
        + reply["traceback"].rstrip()
    )
    return err


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
    died_event: Optional[asyncio.Event] = None


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
        self._startup_timeout_s = float(config.learner_startup_timeout_s)
        self._lock = threading.Lock()
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
            if num_learners > 1:
                self.backend = self._choose_backend()
                self._form_process_group()
        except BaseException:
            self.shutdown()
            raise

    # -- start-up -----------------------------------------------------------------------------------
    async def _init_events(self) -> None:
        for slot in self.slots:
            slot.died_event = asyncio.Event()

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
        try:
            if self._store_port is None:
                self._store_port = self.submit("open_store", [(timeout,)], ranks=[0]).result()[0]
            store_host = get_address_host(self.slots[0].worker)
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
            raise ProcessGroupError(
                f"The learners could not form their torch.distributed process group ({self.backend}) through the "
                f"store on {self.slots[0].worker.split('://')[-1].rsplit(':', 1)[0]}:{self._store_port}: {err}"
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
        if slot.died_event is not None:
            slot.died_event.set()

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
        if self._closed:
            raise LearnerGroupError("This LearnerGroup was shut down.")
        ranks = list(range(self.num_learners)) if ranks is None else list(ranks)
        if len(args_per_rank) != len(ranks):
            raise ValueError(f"{len(args_per_rank)} argument tuples for {len(ranks)} learners.")
        with self._lock:  # numbers are handed out in call order, per learner
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
            generation = self._generation
        future = asyncio.run_coroutine_threadsafe(self._dispatch(sends, collective, generation), self._aloop)
        future.seqs = [seq for _, seq, _ in sends]  # type: ignore[attr-defined]
        return future

    def call(self, target: Any, args_per_rank: Sequence[tuple], **kwargs: Any) -> List[Any]:
        """:meth:`submit` and wait: the values by rank, or the rebuilt remote exception."""
        return self.submit(target, args_per_rank, **kwargs).result()

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
        replies = await asyncio.gather(*(self._call(slot, seq, request) for slot, seq, request in sends))
        if collective and any(not r["ok"] for r in replies) and generation == self._generation:
            # Failed ranks dropped their process group: re-form before the next update. If some ranks
            # finished the update and others did not, their states may differ: copy a finisher's.
            self._pg_broken = True
            finished = [slot.rank for (slot, _, _), r in zip(sends, replies) if r["ok"]]
            if finished and self._resync_from is None:
                self._resync_from = finished[0]
        return values_or_raise(replies)

    async def _call(self, slot: _Slot, seq: int, request: Request) -> Dict[str, Any]:
        if slot.died:
            return died_reply(slot.rank, slot.worker, slot.died)
        remote = self.connection.client.rpc(slot.worker) if self._direct else _ProxyRPC(self.connection.client.scheduler, slot.worker)
        call = asyncio.ensure_future(
            remote.actor_execute(actor=slot.key, function="run", args=[seq, to_serialize(request)], kwargs={})
        )
        death = asyncio.ensure_future(slot.died_event.wait())
        try:
            await asyncio.wait({call, death}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            death.cancel()
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
            await asyncio.wait_for(slot.died_event.wait(), DEATH_CONFIRM_S)
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
