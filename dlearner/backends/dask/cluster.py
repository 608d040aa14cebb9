"""Connecting to a Dask cluster, and choosing the worker processes that learners and env runners run on.

One client-creation path for everything dlearner starts (the LearnerGroup, the Algorithm and the
``dlearner`` command line): an existing ``distributed.Client``, a scheduler ``address``, a
``scheduler_file`` (HPC jobs, dask-jobqueue, dask-mpi), or an embedded ``LocalCluster`` of worker
processes that the connection owns, keeps at its size (:func:`_keep_workers`) and closes without
killing its workers; those workers leave SIGINT and SIGTERM to the driver (see
:mod:`dlearner.backends.dask.embedded_worker`). TLS and the other ``distributed.comm`` settings of
the client apply to everything sent through it.

Placement: one learner per worker *process*, chosen explicitly. Dask releases a task's
``resources`` as soon as the task that created an actor finishes, so resources alone would let two
learners land in one worker; the pool therefore checks the workers' ``GPU`` resource up front,
picks distinct worker processes itself and pins each actor to its worker.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import os
import socket
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import dask
import distributed
from distributed import Client, LocalCluster
from distributed.core import Status

from dlearner.backends.dask.embedded_worker import EmbeddedNanny
from dlearner.devices import device_for_rank, gpu_packing
from dlearner.errors import ClusterResourceError, LearnerGroupError

logger = logging.getLogger(__name__)

#: How often a wait for workers says what it is waiting for.
_WAIT_REPORT_EVERY_S = 10.0
#: How often the embedded cluster looks for workers that Dask's LocalCluster gave up on.
_KEEP_WORKERS_EVERY_S = 1.0
#: How long a worker process of the embedded cluster may take to exit once closed. Dask's nanny
#: allows 4 s, then kills it with a warning; a process that used torch takes 1-2 s to exit on an idle
#: machine, more on a busy one.
_WORKER_EXIT_TIMEOUT_S = 30.0


#: Samples of CPU, memory and network use that Dask's system monitor keeps in each process of the
#: embedded cluster (the scheduler's, in the driver, and each worker's): one every 500 ms, so a minute.
#: Dask keeps 7,200 (an hour) by default, so for the first hour of a run the scheduler's grew by ~0.1 MiB
#: a minute (~6 MiB in all) and each worker's by a quarter of that. Only the System pages of Dask's
#: dashboard read the history (a page opened later shows the minute before it, then plots on from there).
_SYSTEM_MONITOR_SAMPLES = 120

#: Entries of each of Dask's low-level logs (``distributed.admin.low-level-log-length``, 1,000 by
#: default) in the embedded cluster: the scheduler's events per topic, its transition log and the
#: recent messages of each connection, and in each worker its state-machine, stimulus, transfer and
#: message logs. Every learner update and every iteration adds to several of them (a compute-task
#: message holding the task, an event of the update's result, of its timings, of the dashboard's
#: metrics); at 1,000 entries they held a few MB more and, for the slower ones (an event per
#: iteration, a task a second), kept growing for 10-80 minutes of a run. They are logs for debugging
#: Dask, plus ``client.get_events(topic)``, which then returns the last 100 events of a topic.
_DASK_LOG_ENTRIES = 100

#: Dask settings of the embedded cluster's scheduler and of dlearner's client of it (both in the
#: driver process; read when they start, so ``cluster_kwargs`` does not change them).
_EMBEDDED_SCHEDULER_CONFIG: Dict[str, Any] = {
    "distributed.admin.system-monitor.log-length": _SYSTEM_MONITOR_SAMPLES,
    "distributed.admin.low-level-log-length": _DASK_LOG_ENTRIES,
}

#: Dask settings of the embedded cluster's worker processes (``cluster_kwargs={"config": {...}}`` replaces them).
#: Dask's statistical profiler is off: it samples every thread that runs an actor call 100 times a
#: second, so an env runner's sampling loop was profiled without pause, and keeps the last 1,000
#: one-second profiles (``distributed.admin.low-level-log-length``): 1-3 MiB a minute per env runner
#: for the first 17 minutes of a run, 20-50 MiB in all, and CPU time taken from sampling on small
#: machines. Only the Profile page of Dask's dashboard needs it (its Profile pages stay empty).
#: Dotted keys: the nanny adds these to a shallow copy of its own configuration, and the worker process
#: applies them after it (``dask.config.set``); a nested ``{"distributed": ...}`` would replace every
#: other ``distributed`` setting.
_EMBEDDED_WORKER_CONFIG: Dict[str, Any] = {
    "distributed.worker.profile.enabled": False,
    "distributed.admin.system-monitor.log-length": _SYSTEM_MONITOR_SAMPLES,
    "distributed.admin.low-level-log-length": _DASK_LOG_ENTRIES,
}


@dataclasses.dataclass
class ClusterConnection:
    """The client dlearner talks through, and what it must close when done."""

    client: Client
    cluster: Optional[LocalCluster]
    owns_client: bool
    description: str
    #: URL of the dlearner page on the cluster's dashboard ("" without a dashboard, ``None`` if the
    #: page could not be added).
    dashboard_url: Optional[str] = None
    _removal_callbacks: Dict[str, List[Callable[[str], None]]] = dataclasses.field(default_factory=dict)
    #: The embedded cluster's task that keeps its number of workers (see :func:`_keep_workers`).
    _keeper: Optional[concurrent.futures.Future] = None

    def watch_worker(self, address: str, callback: Callable[[str], None]) -> Callable[[], None]:
        """Call ``callback(why)`` on the client's event loop when worker ``address`` leaves the cluster
        (the scheduler pushes it at once); returns a function that stops watching.

        A client holds one handler per event topic, so every learner and env runner watching the
        same worker shares one subscription here.
        """
        callbacks = self._removal_callbacks.setdefault(address, [])
        if not callbacks:
            self.client.subscribe_topic(address, lambda event: self._worker_event(address, event))
        callbacks.append(callback)

        def unwatch() -> None:
            if callback in callbacks:
                callbacks.remove(callback)
            if not callbacks and self._removal_callbacks.get(address) is callbacks:
                del self._removal_callbacks[address]
                if self.client.status == "running":
                    self.client.unsubscribe_topic(address)

        return unwatch

    def _worker_event(self, address: str, event: Any) -> None:
        _, msg = event
        if isinstance(msg, dict) and msg.get("action") == "remove-worker":
            why = f"its worker left the cluster ({'retired' if msg.get('expected') else 'died'})"
            for callback in list(self._removal_callbacks.get(address, ())):
                callback(why)

    def close(self) -> None:
        """Close what this connection opened (its own client, an embedded cluster), nothing else."""
        if self._keeper is not None:
            self._keeper.cancel()
        if self.owns_client:
            self.client.close()
        if self.cluster is not None:
            try:
                if self.cluster.status == Status.running:
                    # Dask's own close gives each worker process 4 s to exit, then kills it with a warning.
                    self.cluster.sync(_close_worker_processes, self.cluster, _WORKER_EXIT_TIMEOUT_S)
            finally:
                self.cluster.close()


def connect(config: Any, num_workers: int) -> ClusterConnection:
    """Connect to the cluster named by ``config.client`` / ``.address`` / ``.scheduler_file``, or start
    an embedded ``LocalCluster`` with ``num_workers`` worker processes; the dlearner page is added to
    the cluster's dashboard (once per scheduler).

    Example::

        connection = connect(PPOConfig().cluster(scheduler_file="sched.json"), num_workers=2)
        print(connection.client.dashboard_link)
        connection.close()   # closes only what connect() opened
    """
    # Imported before an embedded cluster starts: its scheduler then serves the page as a Bokeh
    # application of its dashboard (see dlearner.dashboard.app).
    from dlearner.dashboard import register_dashboard

    connection = _open(config, num_workers)
    try:
        connection.dashboard_url = register_dashboard(connection.client)
    except RuntimeError as err:
        # The page is an extra: training works without it, but say why it is missing.
        logger.warning("dlearner page not added to the Dask dashboard: %s", err)
    except BaseException:
        connection.close()
        raise
    return connection


def _open(config: Any, num_workers: int) -> ClusterConnection:
    timeout = config.resolved_startup_timeout_s()
    if config.client is not None:
        client = config.client
        if not isinstance(client, Client):
            raise ValueError(f"config.client must be a distributed.Client, got {type(client).__name__}.")
        if client.asynchronous:
            raise ValueError("dlearner needs a synchronous distributed.Client (asynchronous=False).")
        if client.status not in ("running", "connecting", "newly-created"):
            raise LearnerGroupError(f"The Dask client given in .cluster(client=...) is {client.status!r}, not running.")
        return ClusterConnection(client, None, owns_client=False, description=f"client of {client.scheduler.address}")
    if config.address is not None or config.scheduler_file is not None:
        return attach(address=config.address, scheduler_file=config.scheduler_file, timeout_s=timeout, security=config.security)
    return _start_embedded_cluster(config, num_workers)


def attach(
    *, address: Optional[str] = None, scheduler_file: Optional[str] = None, timeout_s: float = 30.0, security: Any = None
) -> ClusterConnection:
    """A client of a running cluster, by scheduler ``address`` or ``scheduler_file`` (the one place
    dlearner creates such a client: the LearnerGroup, the Algorithm and the command line all come here).

    ``security``: a ``distributed.Security`` for a TLS scheduler (default: Dask's configured one).
    Raises ``FileNotFoundError`` for a missing scheduler file and :class:`LearnerGroupError` when the
    scheduler cannot be reached within ``timeout_s``.
    """
    if address is not None:
        where: Dict[str, Any] = dict(address=address)
        description, named = f"scheduler {address}", f"address={address!r}"
    elif scheduler_file is not None:
        if not os.path.exists(scheduler_file):
            raise FileNotFoundError(f"scheduler_file={scheduler_file!r} does not exist.")
        where = dict(scheduler_file=scheduler_file)
        description, named = f"scheduler file {scheduler_file}", f"scheduler_file={scheduler_file!r}"
    else:
        raise ValueError("attach() needs a scheduler address or a scheduler_file.")
    try:
        if security is not None:
            where["security"] = security
        client = Client(**where, set_as_default=_no_default_client(), timeout=timeout_s)
    except (OSError, TimeoutError) as err:
        raise LearnerGroupError(f"Cannot reach the Dask scheduler of {named} within {timeout_s:g} s: {err}") from err
    return ClusterConnection(client, None, owns_client=True, description=description)


def _start_embedded_cluster(config: Any, num_workers: int) -> ClusterConnection:
    gpus = float(config.num_gpus_per_learner or 0)
    kwargs: Dict[str, Any] = dict(
        n_workers=num_workers,
        threads_per_worker=max(1, int(config.num_cpus_per_learner)),
        processes=True,  # learners need their own processes (and their own GIL)
        # Worker processes that leave SIGINT/SIGTERM to the driver and close without a heartbeat error.
        worker_class=EmbeddedNanny,
        dashboard_address=":0",  # a free port: several groups (or tests) can run side by side
        silence_logs=logging.WARNING,
        # Dask settings of the worker processes (their nannies pass them on, to restarted workers too).
        config=_EMBEDDED_WORKER_CONFIG,
    )
    if gpus > 0:
        available = cuda_device_count()
        needed = gpu_packing(gpus).gpus_needed(config.num_learners)
        if available < needed:
            raise ClusterResourceError(
                f"num_learners={config.num_learners} with num_gpus_per_learner={gpus:g} needs {needed} GPU(s) for the "
                f"embedded LocalCluster, but torch sees {available} CUDA device(s) on this machine. Set "
                "num_gpus_per_learner=0, or attach to a cluster whose workers declare the resource 'GPU'."
            )
        kwargs["resources"] = {"GPU": gpus}
    if config.security is not None:
        kwargs["security"] = config.security
    kwargs.update(config.cluster_kwargs or {})
    # Dask's nanny sets MALLOC_TRIM_THRESHOLD_ in new workers, which makes glibc mmap/munmap every
    # tensor above 128 KiB: 30-40 % slower updates. Learner workers go without it.
    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {})
    environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    with dask.config.set({"distributed.nanny.pre-spawn-environ": environ, **_EMBEDDED_SCHEDULER_CONFIG}):
        cluster = LocalCluster(**kwargs)
        try:
            # In the settings' scope too: the scheduler opens its stream to this client now.
            client = Client(cluster, set_as_default=_no_default_client(), security=cluster.security)
        except BaseException:
            cluster.close()
            raise
    connection = ClusterConnection(client, cluster, owns_client=True, description="embedded LocalCluster")
    connection._keeper = asyncio.run_coroutine_threadsafe(_keep_workers(cluster), cluster.loop.asyncio_loop)
    return connection


async def _keep_workers(cluster: LocalCluster) -> None:
    """Keep the embedded cluster at the number of worker processes it was built with.

    A nanny restarts a killed worker, but ``LocalCluster`` gives up on a worker that has not registered
    again within ``distributed.deploy.lost-worker-timeout`` (15 s): it closes that nanny for good and
    never starts another, and a worker that imports torch on a busy machine can take that long. With
    fault tolerance, learners and env runners would then run a worker short for the rest of the run.
    dlearner owns this cluster, so it starts a new worker process in place of each one given up on,
    under a new name (the old name may still be registered while its nanny closes). Dask's setting
    is global to the process, so it is left alone: it may be the user's.
    """
    known = set(cluster.workers)
    replacements = 0
    while cluster.status == Status.running:
        known |= set(cluster.workers)  # the workers started in place of lost ones too, once they run
        known &= set(cluster.worker_spec)  # a worker scaled down on purpose leaves the spec first
        given_up = sorted(known - set(cluster.workers), key=str)
        for name in given_up:
            replacements += 1
            new_name = f"{name}-r{replacements}"
            logger.warning(
                "The embedded LocalCluster gave up on its worker %r (not back within the dask setting "
                "distributed.deploy.lost-worker-timeout); starting worker %r in its place.",
                name,
                new_name,
            )
            cluster.worker_spec[new_name] = cluster.worker_spec.pop(name)
            known.discard(name)
        if given_up:
            cluster.scale(len(cluster.worker_spec))  # starts the workers of the spec that are not running
        await asyncio.sleep(_KEEP_WORKERS_EVERY_S)


async def _close_worker_processes(cluster: LocalCluster, timeout_s: float) -> None:
    """Close every nanny of ``cluster`` (and its worker process), allowing ``timeout_s`` to exit."""
    await asyncio.gather(*(nanny.close(timeout=timeout_s) for nanny in list(cluster.workers.values())))


def _no_default_client() -> bool:
    """A client dlearner opens becomes the default one only if there is none yet, so that
    ``distributed.wait`` / ``as_completed`` work on ``update_async`` futures without touching a
    default client the user already has."""
    try:
        distributed.default_client()
    except ValueError:
        return True
    return False


def cuda_device_count() -> int:
    """CUDA devices torch sees in this process (0 without a CUDA build or device)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


# ======================================================================================== placement
@dataclasses.dataclass(frozen=True)
class Placement:
    """Where one learner runs: its rank, worker address and torch device (``None``: the worker's default)."""

    rank: int
    worker: str
    device: Optional[str]


def wait_for_workers(connection: ClusterConnection, count: int, timeout_s: float, purpose: str) -> Dict[str, Any]:
    """The scheduler's worker table once it has ``count`` workers, or whatever it has after
    ``timeout_s`` (workers of an HPC job or an autoscaler may still be joining).

    Says what it waits for (logger ``dlearner``, INFO) every few seconds, so a job that waits for
    workers that never come does not wait in silence.
    """
    client = connection.client
    start = time.monotonic()
    deadline = start + timeout_s
    next_report = start
    while True:
        workers = client.scheduler_info(n_workers=-1)["workers"]
        now = time.monotonic()
        if len(workers) >= count or now >= deadline:
            return workers
        if now >= next_report:
            logger.info(
                "Waiting for Dask workers: %s needs %d, the cluster (%s) has %d; giving up in %.0f s "
                "(learner_startup_timeout_s / dask config dlearner.cluster.startup-timeout).",
                purpose,
                count,
                connection.description,
                len(workers),
                deadline - now,
            )
            next_report = now + _WAIT_REPORT_EVERY_S
        time.sleep(0.2)


def _worker_identity(dask_worker: Any) -> Dict[str, Any]:
    """Runs on every worker (``client.run``): which process it is and whether it hosts a learner."""
    from dlearner.backends.dask.actor import hosted_learner_key

    return {"host": socket.gethostname(), "pid": os.getpid(), "learner": hosted_learner_key(dask_worker)}


def _identities(connection: ClusterConnection, workers: Dict[str, Any]) -> Dict[str, Any]:
    return connection.client.run(_worker_identity, workers=list(workers), on_error="return")


def _eligible_learner_workers(
    connection: ClusterConnection, config: Any, workers: Dict[str, Any], exclude: Sequence[str] = ()
) -> Tuple[List[str], Dict[str, str]]:
    """Worker processes that can host a learner now, in a stable order, and why the others cannot."""
    gpus = float(config.num_gpus_per_learner or 0)
    # Never ask an excluded (lost) worker: the scheduler would retry connecting to it for a long time.
    identities = _identities(connection, {a: w for a, w in workers.items() if a not in exclude})
    eligible: List[str] = []
    reasons: Dict[str, str] = {}
    seen_processes: Dict[Any, str] = {}
    for address in sorted(workers, key=lambda a: (workers[a].get("host", ""), a)):
        info, ident = workers[address], identities.get(address, {})
        have = float((info.get("resources") or {}).get("GPU", 0))
        if not isinstance(ident, dict):
            reasons[address] = f"did not answer ({ident!r})"
            continue
        process = (ident.get("host"), ident.get("pid"))
        if address in exclude:
            reasons[address] = "excluded"
        elif gpus > 0 and have + 1e-9 < gpus:
            reasons[address] = f"resource GPU={have:g} < {gpus:g}"
        elif ident.get("learner"):
            reasons[address] = f"already hosts learner {ident['learner']}"
        elif process in seen_processes:
            reasons[address] = f"shares its process with worker {seen_processes[process]}"
        else:
            seen_processes[process] = address
            eligible.append(address)
    return eligible, reasons


def place_learners(connection: ClusterConnection, config: Any, num_learners: int) -> List[Placement]:
    """Pick ``num_learners`` distinct worker processes that have the resources a learner needs.

    Fails within the startup timeout with a :class:`ClusterResourceError` naming what is missing;
    fails at once when the cluster already has enough workers but not enough eligible ones.
    """
    gpus = float(config.num_gpus_per_learner or 0)
    timeout = config.resolved_startup_timeout_s()
    workers = wait_for_workers(connection, num_learners, timeout, f"num_learners={num_learners}")
    if not workers:
        raise ClusterResourceError(
            f"The Dask cluster ({connection.description}) has no workers after {timeout:g} s; "
            f"num_learners={num_learners} needs {num_learners} worker process(es)."
        )
    eligible, reasons = _eligible_learner_workers(connection, config, workers)
    if len(eligible) < num_learners:
        missing_gpu = gpus > 0 and any("GPU" in r for r in reasons.values())
        hint = (
            f" The learners need the Dask worker resource 'GPU' >= {gpus:g} each: start workers with "
            "`dask worker ... --resources GPU=1` (or LocalCluster(resources={'GPU': 1})), or set "
            "num_gpus_per_learner=0."
            if missing_gpu
            else " Add workers (one worker process per learner; two learners never share a process), lower "
            "num_learners, or wait longer for workers to join (learner_startup_timeout_s)."
        )
        details = "; ".join(f"{a}: {r}" for a, r in reasons.items()) or "none ineligible"
        raise ClusterResourceError(
            f"num_learners={num_learners} needs {num_learners} eligible Dask worker process(es), but the cluster "
            f"({connection.description}) has {len(eligible)} of {len(workers)} eligible ({details}).{hint}"
        )
    chosen = eligible[:num_learners]
    return [Placement(rank, address, device_for(rank, gpus, connection)) for rank, address in enumerate(chosen)]


def free_learner_workers(
    connection: ClusterConnection, config: Any, count: int, timeout_s: float, exclude: Sequence[str] = ()
) -> List[str]:
    """Up to ``count`` worker processes that can host a new learner, waiting up to ``timeout_s`` for
    them to join (a nanny restarting a killed worker, an autoscaler, a batch job scaling up).
    Returns fewer, or none, when they do not come in time; never raises for that."""
    deadline = time.monotonic() + timeout_s
    while True:
        workers = connection.client.scheduler_info(n_workers=-1)["workers"]
        eligible, _ = _eligible_learner_workers(connection, config, workers, exclude) if workers else ([], {})
        if len(eligible) >= count or time.monotonic() >= deadline:
            return eligible[:count]
        time.sleep(0.5)


def device_for(rank: int, gpus: float, connection: ClusterConnection) -> Optional[str]:
    """The torch device of learner ``rank`` that asks for ``gpus`` GPUs."""
    # Embedded cluster: every worker sees every GPU of this machine, so ranks are spread explicitly
    # (with 0.5 GPU per learner, ranks 0 and 1 share cuda:0). Attached cluster: ``None``, the
    # launcher (e.g. dask-cuda) gave each worker its GPU as device 0. Rules: :mod:`dlearner.devices`.
    embedded = connection.cluster is not None
    visible = cuda_device_count() if embedded and gpus > 0 else 0
    return device_for_rank(rank, gpus, embedded=embedded, visible_gpus=visible)


def place_env_runners(
    connection: ClusterConnection, num_runners: int, timeout_s: float, avoid: Sequence[str] = (), exclude: Sequence[str] = ()
) -> List[str]:
    """One worker process per env runner, preferring workers that host no learner (nor, for a
    replacement, another runner: ``avoid``); ``exclude``: workers known to be lost.

    Env runners are synchronous actors: two on one worker would share its single actor thread and
    sample one after the other, so each gets its own worker while there are enough.
    """
    workers = wait_for_workers(connection, num_runners, timeout_s, f"num_env_runners={num_runners}")
    if not workers:
        raise ClusterResourceError(
            f"The Dask cluster ({connection.description}) has no workers after {timeout_s:g} s; "
            f"num_env_runners={num_runners} needs worker processes."
        )
    identities = _identities(connection, {a: w for a, w in workers.items() if a not in exclude})
    answered = [a for a in sorted(workers) if isinstance(identities.get(a), dict)]  # a lost worker may still be listed
    free = [a for a in answered if not identities[a].get("learner") and a not in avoid]
    busy = [a for a in answered if a not in free]
    order = free + busy
    if not order:
        raise ClusterResourceError(
            f"No worker of the Dask cluster ({connection.description}) answered; cannot place env runners."
        )
    return [order[i % len(order)] for i in range(num_runners)]
