"""The learner side: :class:`LearnerActor`, the Dask actor that hosts one Learner.

Requests carry a per-learner sequence number and run strictly in that order on a dedicated compute
thread (:class:`OrderedExecutor`), so every rank makes the same collective calls in the same order
(collectives deadlock otherwise). The methods the driver calls (:meth:`LearnerActor.run`,
:meth:`LearnerActor.wait_published`) are ``async`` and only hand work to that thread: the worker's
event loop is never blocked, and the worker's single actor thread is never used for waiting. What a
request runs is one of the actor's own methods: :meth:`LearnerActor.apply` for a learner operation
(:mod:`dlearner.learner_ops`), the others for the process group.

A rank whose collective request fails drops its process group, which closes its sockets, so peers
blocked in a collective with it fail at once instead of hanging; the driver re-forms the group.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import dataclasses
import logging
import os
import sys
import threading
import time
import weakref
from typing import Any, Callable, Dict, Optional, Tuple

from distributed import get_worker
from distributed.comm import get_address_host
from distributed.diagnostics.plugin import WorkerPlugin

from dlearner import settings
from dlearner.backends.dask.protocol import Failed, Ok, Reply, Request
from dlearner.backends.dask.rpc import Whole
from dlearner.collective import TorchCollective, form_process_group, open_store
from dlearner.errors import LearnerGroupError, ProcessGroupError
from dlearner.events import TIMING_TOPIC

logger = logging.getLogger(__name__)

_HOSTED: Optional["weakref.ref[LearnerActor]"] = None
_HOSTED_LOCK = threading.Lock()


def learner_actor_key(rank: int, group_id: str) -> str:
    """The Dask key of learner ``rank`` of a group, readable in the dashboard: ``learner-<rank>-<group id>``
    (a learner started to replace a lost one gets ``-r<n>`` appended by its group, as Dask keys are
    never reused)."""
    return f"learner-{rank}-{group_id}"


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


class ReleaseAbandonedLearners(WorkerPlugin):
    """Closes a learner whose Dask actor is released without its group closing it: a driver that
    was killed or lost its connection leaves no process group, store or thread behind on a
    long-lived cluster. Registered by every Dask learner pool (once per cluster, by name)."""

    name = "dlearner-release-abandoned-learners"

    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        if finish not in ("released", "forgotten"):
            return
        actor = _HOSTED() if _HOSTED is not None else None
        if actor is not None and actor.key == key and not actor.closed:
            actor.abandon()


class ProcessGroupClosed(RuntimeError):
    """Raised on a learner whose process group was dropped after an earlier failed update."""


class OrderedExecutor:
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
        """Run ``fn`` as number ``seq``; a future of its result."""
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
        """Stop after the work that is running; queued work fails with ``RuntimeError``."""
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
            except BaseException as err:  # noqa: BLE001 - delivered to the caller, never swallowed
                future.set_exception(err)


class LearnerActor:
    """The Dask actor hosting one Learner (rank ``rank`` of ``world_size``).

    Created by the pool with ``client.submit(LearnerActor, ..., actor=True, workers=[address],
    key="learner-<rank>-<group id>")``. Refuses to start in a process that already hosts a learner.
    """

    def __init__(
        self,
        *,
        group_id: str,
        actor_key: str,
        rank: int,
        world_size: int,
        config: Any,
        module_spec: Any,
        learner_class: type,
        device: Optional[str],
    ):
        global _HOSTED
        self.group_id, self.rank, self.world_size = group_id, rank, world_size
        self.key = actor_key
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
        self._executor = OrderedExecutor(name=f"dlearner-{self.key}")
        weakref.finalize(self, self._executor.stop)
        self._collective: Optional[TorchCollective] = None
        self._collective_broken: Optional[str] = None
        self._store: Any = None  # rank 0: the TCPStore server of the process group
        self._published: Dict[int, asyncio.Future] = {}
        self._timings = _TimingWindow()
        self._timings_flush: Optional[asyncio.TimerHandle] = None
        self._published_kept = int(settings.get("learner-group.published-results-kept"))
        self.learner: Any = None
        try:
            # Build on the compute thread: torch's thread settings are per thread.
            self._executor.submit(0, lambda: self._build(config, module_spec, learner_class, device)).result()
        except BaseException:
            self.closed = True
            self._executor.stop()
            raise

    def _build(self, config: Any, module_spec: Any, learner_class: type, device: Optional[str]) -> None:
        learner = learner_class(config=config, module_spec=module_spec, device=device)
        learner.build()
        self.learner = learner

    # -- requests ---------------------------------------------------------------------------------
    async def run(self, seq: int, request: Request) -> Reply:
        """Run ``request`` as this learner's request number ``seq`` (>= 1); its typed reply."""
        published = self._published_future(seq) if request.publish else None
        timing: Optional[Dict[str, Any]] = {} if request.collective else None
        queued = time.perf_counter()
        request = self._start_prefetch(request)
        try:
            if timing is None:
                future = self._executor.submit(seq, lambda: self._execute(seq, request))
            else:
                future = self._executor.submit(seq, lambda: self._execute_timed(seq, request, queued, timing))
        except RuntimeError as err:
            reply: Reply = self._failed(err)
        else:
            reply = await asyncio.wrap_future(future)
        if published is not None and not published.done():
            published.set_result(reply)
        if request.log_topic and isinstance(reply, Ok):
            # Training metrics for the dashboard / ``client.get_events(topic)``.
            self._worker.log_event(request.log_topic, {"learner": self.key, "request": seq, "result": reply.value})
        if timing:
            # At most about one timing event a second: an event per update costs the scheduler (and,
            # on a small machine, the learners) more than the update's own overhead.
            self._timings.add(timing, ok=isinstance(reply, Ok), seq=seq)
            if self._timings.due():
                self._send_timings()
            elif self._timings_flush is None:
                self._timings_flush = asyncio.get_running_loop().call_later(self._timings.wait_s(), self._send_timings)
        return reply

    def _start_prefetch(self, request: Request) -> Request:
        """For an operation with a ``prefetch`` pair (``async fetch(worker, *args) -> args``, then
        ``run(learner, *args)``), start the fetch now, on the event loop, so it overlaps the requests
        queued before this one; the request then runs ``run`` on the fetched arguments (a failed
        fetch fails the request before the learner is touched)."""
        if request.target is not LearnerActor.apply or not request.args:
            return request
        prefetch = getattr(request.args[0], "prefetch", None)
        if prefetch is None:
            return request
        fetch, run = prefetch
        fetched: concurrent.futures.Future = concurrent.futures.Future()
        task = asyncio.ensure_future(fetch(self._worker, *request.args[1:]))

        def hand_over(done: asyncio.Future) -> None:
            if done.cancelled():
                fetched.set_exception(RuntimeError("The fetch of this update's data was cancelled."))
            elif done.exception() is not None:
                fetched.set_exception(done.exception())
            else:
                fetched.set_result(done.result())

        task.add_done_callback(hand_over)
        return dataclasses.replace(request, args=(_run_prefetched, run, fetched))

    async def kept_weights(self, version: int) -> Whole:
        """The weights this learner kept as ``version`` (``learner_ops.keep_weights``, run in order
        with the updates), for an env runner that pulls them (IMPALA / APPO), as one
        :class:`~dlearner.backends.dask.rpc.Whole` (the runner receives the weights themselves,
        serialized in one piece). Served from the event loop: never queued behind the updates on the
        compute thread. Raises ``dlearner.errors.WeightsVersionGoneError`` when this learner does
        not keep that version."""
        from dlearner import learner_ops

        return Whole(learner_ops.kept_weights(self.learner, version))

    def _send_timings(self) -> None:
        """Log the update timings gathered since the last event (on the worker's event loop)."""
        if self._timings_flush is not None:
            self._timings_flush.cancel()
            self._timings_flush = None
        if self._timings.updates:
            self._worker.log_event(
                TIMING_TOPIC,
                {
                    "group": self.group_id,
                    "learner": self.key,
                    "rank": self.rank,
                    "world_size": self.world_size,
                    "worker": self.address,
                    **self._timings.take(),
                },
            )

    def _execute_timed(self, seq: int, request: Request, queued: float, timing: Dict[str, Any]) -> Reply:
        """:meth:`_execute`, noting into ``timing`` the seconds spent queued, running and in collectives."""
        started = time.perf_counter()
        collective = self._collective
        in_collectives = collective.time_in_collectives_s if collective is not None else 0.0
        reply = self._execute(seq, request)
        timing["update_s"] = time.perf_counter() - started
        timing["waiting_s"] = started - queued
        timing["allreduce_s"] = collective.time_in_collectives_s - in_collectives if collective is not None else 0.0
        timing["device"] = str(getattr(self.learner, "device", "")) or None
        value = reply.value if isinstance(reply, Ok) else None
        if isinstance(value, dict) and isinstance(value.get("__all_modules__"), dict):
            # Rows trained in this update, summed over ranks (rank 0 returns it; others return None).
            rows = value["__all_modules__"].get("num_env_steps_trained")
            timing["rows"] = float(rows) if rows is not None else None
        return reply

    async def wait_published(self, seq: int) -> Reply:
        """The reply of request ``seq`` (sent with ``publish=True``), waiting for it if needed."""
        return await asyncio.shield(self._published_future(seq))

    def _published_future(self, seq: int) -> asyncio.Future:
        future = self._published.get(seq)
        if future is None:
            future = self._published[seq] = asyncio.get_running_loop().create_future()
            if len(self._published) > self._published_kept:
                for old in sorted(self._published)[: len(self._published) - self._published_kept]:
                    if self._published[old].done():
                        del self._published[old]
        return future

    def _execute(self, seq: int, request: Request) -> Reply:
        try:
            if request.collective and self._collective_broken:
                raise ProcessGroupClosed(self._collective_broken)
            value = request.target(self, *request.args)
        except Exception as err:  # noqa: BLE001 - every failure becomes this request's reply
            secondary = isinstance(err, ProcessGroupClosed) or _is_peer_failure(err)
            if request.collective and self.world_size > 1:
                # Peers may be blocked in a collective with us: closing our sockets frees them now.
                self._drop_process_group(
                    f"The process group was closed after request {seq} failed on learner rank {self.rank}; "
                    "the LearnerGroup re-forms it before its next update."
                )
            return self._failed(err, secondary=secondary)
        return Ok(value if request.want_result else None)

    def _failed(self, err: BaseException, *, secondary: bool = False) -> Failed:
        return Failed.from_exception(err, rank=self.rank, worker=self.address, secondary=secondary)

    # -- request targets (run through :meth:`run`: on the compute thread, in order) -------------------
    def apply(self, operation: Callable[..., Any], *args: Any) -> Any:
        """``operation(learner, *args)``: one of :mod:`dlearner.learner_ops`, or ``foreach_learner``'s function."""
        return operation(self.learner, *args)

    def open_store(self, timeout_s: float) -> int:
        """Rank 0: start a TCPStore for forming the next process group, on this worker's interface;
        returns its port. It lives only until the group has formed (:meth:`close_store`)."""
        if self._store is None:
            self._store = open_store(self.host, self.world_size, timeout_s)
        return int(self._store.port)

    def close_store(self) -> None:
        """Rank 0: stop the store once every rank has joined the group. The ranks' process groups
        hold client connections only (rank 0's included), so the port closes now: nothing listens
        unauthenticated for the rest of the group's life."""
        self._store = None

    def form_group(
        self, store_host: str, port: int, generation: int, backend: str, store_timeout_s: float, op_timeout_s: float
    ) -> str:
        """Build this rank's part of process group ``generation`` (all ranks call this concurrently)."""
        self._drop_process_group(None)
        try:
            collective = form_process_group(
                rank=self.rank,
                world_size=self.world_size,
                prefix=f"dlearner/{self.group_id}/{generation}",
                backend=backend,
                host=self.host,
                store=None,  # every rank, rank 0 too, joins as a client: the server can go once formed
                store_host=store_host,
                store_port=port,
                store_timeout_s=store_timeout_s,
                op_timeout_s=op_timeout_s,
                device=self.learner.device,
            )
        except RuntimeError as err:
            raise ProcessGroupError(f"Learner rank {self.rank} could not join process group {generation}: {err}") from err
        self._collective, self._collective_broken = collective, None
        self.learner.set_collective(collective)
        return collective.backend

    def set_rank(self, rank: int, world_size: int) -> None:
        """Take position ``rank`` of ``world_size`` in the next process group (after a learner was
        replaced, dropped or added). A learner that stops being rank 0 closes the store it served."""
        self._drop_process_group(None)
        if rank != 0:
            self._store = None
        self.rank, self.world_size = rank, world_size

    def close(self) -> None:
        """Tear down: process group, store, learner; then stop the compute thread."""
        self._drop_process_group(None)
        self._store = None
        self.learner = None
        self._release(stop_from_other_thread=True)

    def abandon(self) -> None:
        """Free this process from a learner whose group never closed it (its driver was killed or
        lost): process group, store and compute thread go, so nothing keeps listening (any thread)."""
        logger.warning("Learner %s was released by Dask without being closed; stopping it.", self.key)
        self._release(stop_from_other_thread=False)
        self._drop_process_group(None)
        self._store = None
        self.learner = None

    def _release(self, *, stop_from_other_thread: bool) -> None:
        global _HOSTED
        self.closed = True
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


class _TimingWindow:
    """Update timings summed since the last timing event; :meth:`take` gives their means."""

    INTERVAL_S = 1.0

    def __init__(self) -> None:
        self._last_sent = 0.0  # the first update is reported at once
        self._reset()

    def _reset(self) -> None:
        self.updates, self.failed, self.sums, self.device = 0, 0, {"update_s": 0.0, "waiting_s": 0.0, "allreduce_s": 0.0}, None
        self.rows: Optional[float] = None
        self.request = 0

    def add(self, timing: Dict[str, Any], *, ok: bool, seq: int) -> None:
        self.request = seq
        self.updates += 1
        self.failed += 0 if ok else 1
        for name in self.sums:
            self.sums[name] += float(timing.get(name) or 0.0)
        self.device = timing.get("device") or self.device
        if timing.get("rows") is not None:
            self.rows = (self.rows or 0.0) + float(timing["rows"])

    def due(self) -> bool:
        return time.perf_counter() - self._last_sent >= self.INTERVAL_S

    def wait_s(self) -> float:
        """Seconds until the window is due."""
        return max(0.0, self.INTERVAL_S - (time.perf_counter() - self._last_sent))

    def take(self) -> Dict[str, Any]:
        """Means per update over the window (``updates`` of them, ``failed_updates`` failed)."""
        n = max(1, self.updates)
        out: Dict[str, Any] = {name: total / n for name, total in self.sums.items()}
        out.update(
            request=self.request,
            updates=self.updates,
            failed_updates=self.failed,
            ok=self.failed == 0,
            device=self.device,
            rows=None if self.rows is None else self.rows / n,
        )
        self._last_sent = time.perf_counter()
        self._reset()
        return out


def _run_prefetched(learner: Any, run: Callable[..., Any], fetched: concurrent.futures.Future) -> Any:
    """``run(learner, *args)`` once the prefetched ``args`` are there (see ``LearnerActor._start_prefetch``)."""
    return run(learner, *fetched.result())


def _is_peer_failure(err: BaseException) -> bool:
    text = str(err)
    return "Connection closed by peer" in text or "Connection reset by peer" in text


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
