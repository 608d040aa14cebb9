"""The driver side: :class:`DaskLearnerPool`, the handle on ``num_learners`` learner actors.

It numbers requests per learner (every learner runs its requests in the order they were made),
sends each request straight to the learner's worker over Dask's comms (one direct RPC per learner,
never a scheduler round trip; a batch shard travels once), forms and re-forms the learners' process
group, and builds the ``distributed.Future`` of ``update_async`` from a small ``async`` task.
Watching for deaths, replacing lost actors and their keys are those of every actor group
(:class:`~dlearner.backends.dask.actor_group.ActorGroup`).

Failure policy (see ``docs/cluster.md``): an exception inside a learner comes back as a
:class:`~dlearner.backends.dask.protocol.Failed` reply and is re-raised in the driver with the
remote traceback. A failed *update* makes the failed ranks drop their process group, so peers
blocked in a collective with them fail at once; the pool re-forms the group before the next update
(and, if ranks ended the update in different states, copies the state of one that finished to the
others). A learner whose worker dies makes every later call raise :class:`LearnerDiedError`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import threading
import time
from typing import Any, Callable, List, Optional, Sequence, Tuple

from distributed import Future
from distributed.comm import get_address_host

from dlearner import learner_ops, settings
from dlearner.backends.dask.actor import LearnerActor, ReleaseAbandonedLearners, learner_actor_key
from dlearner.backends.dask.actor_group import ActorGroup, Member
from dlearner.backends.dask.async_updates import AsyncUpdateSequencer, InterruptedUpdate, gather_published
from dlearner.backends.dask.cluster import ClusterConnection, connect, device_for, free_learner_workers, place_learners
from dlearner.backends.dask.protocol import ABANDONED, Died, Failed, Ok, Reply, Request, values_or_raise
from dlearner.errors import LearnerDiedError, LearnerGroupError, ProcessGroupError
from dlearner.events import learner_metrics_topic

logger = logging.getLogger(__name__)

#: How long shutdown waits for the learners to close before releasing them anyway.
_CLOSE_TIMEOUT_S = 30.0


@dataclasses.dataclass(eq=False)
class LearnerMember(Member):
    """A learner: its :class:`Member` bookkeeping, its device and its next request number."""

    device: Optional[str] = None
    next_seq: int = 1

    @property
    def rank(self) -> int:
        return self.index


@dataclasses.dataclass(frozen=True)
class _Send:
    slot: LearnerMember
    seq: int
    request: Request


class DaskLearnerPool(ActorGroup):
    """``num_learners`` learner actors on a Dask cluster (implements
    :class:`~dlearner.backends.interface.LearnerPool`).

    :meth:`submit` returns a ``concurrent.futures.Future`` of the per-rank values (blocking callers
    use :meth:`call`); :meth:`submit_update` sends an update, with a ``distributed.Future`` if asked.
    With fault tolerance, async updates interrupted by a lost learner are retried in order
    (:class:`~dlearner.backends.dask.async_updates.AsyncUpdateSequencer`).
    """

    is_local = False
    members: List[LearnerMember]

    def __init__(
        self,
        *,
        config: Any,
        learner_config: Any,
        module_spec: Any,
        learner_class: type,
        group_id: str,
        num_learners: int,
        collective_timeout_s: Optional[float] = None,
        connection: Optional[ClusterConnection] = None,
    ):
        """``config`` says where to run (it may hold the user's client); ``learner_config`` is what
        the learners get (no client, and the shared seed filled in). ``connection``: an open
        connection to use (the pool then leaves it open on shutdown)."""
        self.group_id = group_id
        #: The number of learners asked for; with fault tolerance the pool may run with fewer for a while.
        self.target_num_learners = num_learners
        #: Updates interrupted by a lost learner and run again on the re-formed group.
        self.num_updates_retried = 0
        self._restart_timeout_s = float(config.learner_restart_timeout_s)
        self._module_spec = module_spec
        self._learner_class = learner_class
        self._next_grow_probe = 0.0
        self.metrics_topic: Optional[str] = learner_metrics_topic(group_id)
        self.backend: Optional[str] = None
        self._config = config
        self._learner_config = learner_config
        self._collective_timeout_s = float(
            collective_timeout_s if collective_timeout_s is not None else settings.seconds("learner-group.collective-timeout")
        )
        self._startup_timeout_s = config.resolved_startup_timeout_s()
        self._max_in_flight = config.resolved_max_requests_in_flight()
        self._lock = threading.Lock()
        #: Held while the group is repaired after a loss, and by every request of a fault-tolerant
        #: pool while it is numbered: a request made meanwhile goes to the repaired group, after the retries.
        self._recovery_lock = threading.RLock()
        self._sequencer: Optional[AsyncUpdateSequencer] = None
        self._closed = False
        self._closing = False  # shutdown has begun (a recovery on another thread stops at its next step)
        self._generation = 0
        self._pg_broken = False
        self._resync_from: Optional[LearnerMember] = None
        #: Port of the process group's rendezvous store on rank 0's worker interface (2+ learners).
        self.store_port: Optional[int] = None
        self._updates_submitted = 0
        #: Keeps the scheduler's task group of this pool's update tasks alive (see :meth:`_update_future`).
        self._update_group_anchor: Optional[Future] = None
        #: The last checkpoint the group committed (a fault-tolerant pool's state of last resort).
        self.checkpoint_path: Optional[str] = None
        death_confirm_s = settings.seconds("learner-group.death-confirm")
        self._owns_connection = connection is None
        super().__init__(
            connection if connection is not None else connect(config, num_learners),
            restart_failed=config.restart_failed_learners,
            max_restarts=config.max_num_learner_restarts,
            death_confirm_s=death_confirm_s,
        )
        if self.restart_failed:
            self._sequencer = AsyncUpdateSequencer(self)
        try:
            self.connection.client.register_plugin(ReleaseAbandonedLearners(), name=ReleaseAbandonedLearners.name)
            placements = place_learners(self.connection, config, num_learners)
            self.members = [
                LearnerMember(p.rank, p.worker, learner_actor_key(p.rank, group_id), device=p.device) for p in placements
            ]
            # Pushed by the scheduler when a worker leaves: later calls fail at once.
            self.watch(self.members)
            self._start_actors(self.members)
            if num_learners > 1:
                self.backend = self._choose_backend()
                self._form_process_group()
        except BaseException:
            self.shutdown()
            raise

    # -- facts -------------------------------------------------------------------------------------
    @property
    def num_learners(self) -> int:
        """Learners in the group now (the process group's world size)."""
        return len(self.members)

    @property
    def num_healthy_learners(self) -> int:
        """Learners not known to be gone."""
        return self.num_healthy

    @property
    def num_learner_restarts(self) -> int:
        """Learners replaced or added back after a loss (fault tolerance)."""
        return self.num_restarts

    @property
    def client(self) -> Any:
        """The ``distributed.Client`` the learners run through."""
        return self.connection.client

    @property
    def learner_workers(self) -> List[str]:
        """The worker address of each learner, by rank."""
        return [s.worker for s in self.members]

    @property
    def learner_keys(self) -> List[str]:
        """The Dask key of each learner actor, by rank."""
        return [s.key for s in self.members]

    # -- start-up -----------------------------------------------------------------------------------
    def _start_actors(self, slots: List[LearnerMember]) -> None:
        gpus = float(self._config.num_gpus_per_learner or 0)
        for slot in slots:
            self.start(
                slot,
                LearnerActor,
                group_id=self.group_id,
                actor_key=slot.key,
                rank=slot.rank,
                world_size=self.num_learners,
                config=self._learner_config,
                module_spec=self._module_spec,
                learner_class=self._learner_class,
                device=slot.device,
                resources={"GPU": gpus} if gpus > 0 else None,
            )
        deadline = time.monotonic() + self._startup_timeout_s
        for slot in slots:
            try:
                slot.future.result(timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError as err:
                late = [f"rank {s.rank} on {s.worker} ({s.future.status})" for s in slots if not s.future.done()]
                raise LearnerGroupError(
                    f"Learners did not start within learner_startup_timeout_s={self._startup_timeout_s:g} s: {', '.join(late)}."
                ) from err
            except Exception as err:  # the learner's own error, with the worker's traceback
                err.add_note(f"Raised while starting learner rank {slot.rank} on Dask worker {slot.worker}.")
                raise

    def _choose_backend(self) -> str:
        """NCCL or gloo, from every learner's device facts (rules: :func:`dlearner.devices.choose_backend`)."""
        from dlearner.devices import choose_backend

        gpus = float(self._config.num_gpus_per_learner or 0)
        facts = self.call(learner_ops.device_facts, [()] * self.num_learners, result_ranks=None) if gpus >= 1 else None
        choice = choose_backend(gpus, facts)
        if choice.fell_back:
            logger.warning("LearnerGroup %s: %s", self.group_id, choice.reason)
        return choice.backend

    def _form_process_group(self) -> None:
        """(Re-)form the process group on all learners: rank 0's store, then every rank at once."""
        self._generation += 1
        timeout = self._startup_timeout_s
        store_host = get_address_host(self.members[0].worker)
        try:
            # Rank 0 serves the store (it opens one the first time, or after taking over rank 0).
            self.store_port = self._submit(LearnerActor.open_store, [(timeout,)], ranks=[0]).result()[0]
            args = (store_host, self.store_port, self._generation, self.backend, timeout, self._collective_timeout_s)
            self._submit(LearnerActor.form_group, [args] * self.num_learners, result_ranks=None).result(timeout=timeout + 30)
            self._submit(LearnerActor.close_store, [()], ranks=[0], result_ranks=()).result()
        except concurrent.futures.TimeoutError as err:
            self._pg_broken = True
            raise ProcessGroupError(
                f"The learners' torch.distributed process group ({self.backend}, store {self.store_port}) did not form "
                f"within {timeout:g} s."
            ) from err
        except LearnerDiedError:
            raise
        except Exception as err:
            self._pg_broken = True
            where = f"learner rank {err.learner_rank} on {err.learner_worker}" if hasattr(err, "learner_rank") else "a learner"
            raise ProcessGroupError(
                f"The learners could not form their torch.distributed process group ({self.backend}) through the "
                f"store on {store_host}:{self.store_port}: {where} failed with {type(err).__name__}: {err}"
            ) from err
        self._pg_broken = False

    # -- deaths -------------------------------------------------------------------------------------
    def death_message(self, member: Member) -> str:
        return f"Learner rank {member.index} ({member.key}) on Dask worker {member.worker} is gone: {member.lost}." + (
            " The group replaces it before the next update (fault tolerance)."
            if self.restart_failed
            else " The group cannot train without it; get_state()/get_weights() still read a surviving "
            "learner. Shut the group down and build a new one restoring the last checkpoint, or enable "
            "config.fault_tolerance(restart_failed_learners=True)."
        )

    def dead_error(self) -> Optional[LearnerDiedError]:
        """A :class:`LearnerDiedError` if any learner is gone, else ``None``."""
        dead = [s for s in self.members if s.lost]
        if not dead:
            return None
        return LearnerDiedError(" ".join(self.death_message(s) for s in dead))

    def live_ranks(self) -> List[int]:
        """Ranks whose learner is not known to be gone."""
        return [s.rank for s in self.members if not s.lost]

    # -- requests -----------------------------------------------------------------------------------
    def submit(
        self,
        target: Callable[..., Any],
        args_per_rank: Sequence[tuple],
        *,
        ranks: Optional[Sequence[int]] = None,
        collective: bool = False,
        result_ranks: Optional[Sequence[int]] = (0,),
        log_topic: Optional[str] = None,
    ) -> concurrent.futures.Future:
        """Run the learner operation ``target(learner, *args_per_rank[i])`` on learner ``ranks[i]``; a
        future of the values.

        ``result_ranks``: ranks whose value is sent back (others reply ``None``; ``None`` = all).
        Errors are raised by the future's ``result()``, rebuilt with the remote traceback.
        """
        # A fault-tolerant pool's requests wait for a repair in progress: never into a group being rebuilt.
        with self._recovery_lock if self.restart_failed else contextlib.nullcontext():
            return self._submit(
                LearnerActor.apply,
                _on_learner(target, args_per_rank),
                ranks=ranks,
                collective=collective,
                result_ranks=result_ranks,
                log_topic=log_topic,
            )

    def call(
        self,
        target: Callable[..., Any],
        args_per_rank: Sequence[tuple],
        *,
        ranks: Optional[Sequence[int]] = None,
        collective: bool = False,
        result_ranks: Optional[Sequence[int]] = (0,),
        log_topic: Optional[str] = None,
    ) -> List[Any]:
        """Like :meth:`submit`, but wait: the values by rank, or the rebuilt remote exception."""
        return self.submit(
            target, args_per_rank, ranks=ranks, collective=collective, result_ranks=result_ranks, log_topic=log_topic
        ).result()

    def submit_update(
        self,
        target: Callable[..., Any],
        args_for_world: Callable[[int], Sequence[tuple]],
        *,
        log_topic: Optional[str] = None,
        future: bool = False,
    ) -> Tuple[concurrent.futures.Future, Optional[Future]]:
        """An async collective update on all learners: a future of the per-rank values and, with
        ``future=True``, a ``distributed.Future`` of rank 0's value, computed by an ``async`` task
        named ``learner-update-<group id>-<n>``. ``args_for_world(n)``: the arguments of each rank
        for ``n`` learners (with fault tolerance, an update interrupted by a lost learner is sent
        again, once, to the re-formed group, which may have fewer learners)."""
        if self._sequencer is not None:
            with self._recovery_lock:
                return self._sequencer.submit(target, args_for_world, log_topic, future)
        pending = self._submit_update(target, args_for_world(self.num_learners), log_topic, publish=future)
        return pending, (self._update_future(pending, fault_tolerant=False) if future else None)

    def _submit_update(
        self, target: Callable[..., Any], args_per_rank: Sequence[tuple], log_topic: Optional[str], *, publish: bool
    ) -> concurrent.futures.Future:
        return self._submit(
            LearnerActor.apply, _on_learner(target, args_per_rank), collective=True, publish=publish, log_topic=log_topic
        )

    def _update_future(self, pending: concurrent.futures.Future, *, fault_tolerant: bool) -> Future:
        """The ``distributed.Future`` of the update ``pending`` (sent with ``publish=True``).

        Its task is of the scheduler's task group ``learner-update``, which the pool keeps alive with
        one finished task (``learner-update-<group id>-0``) held until shutdown. Without it, the group
        ends whenever no update task is left (between two updates), and the next task starts a new
        group in a new default span: Dask keeps every span with its task groups for the scheduler's
        life (dask/distributed#7977), and each worker keeps metrics per span, so a long run grew by
        a few KiB per update in the scheduler and in the workers.
        """
        if self._update_group_anchor is None:
            self._update_group_anchor = self.connection.client.submit(
                _keep_task_group, key=f"learner-update-{self.group_id}-0", pure=False
            )
        self._updates_submitted += 1
        key = f"learner-update-{self.group_id}-{self._updates_submitted}"
        targets = tuple((s.rank, s.worker, s.key, seq) for s, seq in zip(self.members, pending.seqs))  # type: ignore[attr-defined]
        if not fault_tolerant:
            return self.connection.client.submit(gather_published, targets, key=key, pure=False)
        # Long enough for the updates in flight to end, a repair and the retries; it only matters
        # if the driver is gone.
        wait_s = self._restart_timeout_s + 2 * self._startup_timeout_s + 2 * self._collective_timeout_s * self._max_in_flight + 60
        return self.connection.client.submit(gather_published, targets, key, wait_s, key=key, pure=False)

    def _submit(
        self,
        target: Callable[..., Any],
        args_per_rank: Sequence[tuple],
        *,
        ranks: Optional[Sequence[int]] = None,
        collective: bool = False,
        result_ranks: Optional[Sequence[int]] = (0,),
        log_topic: Optional[str] = None,
        publish: bool = False,
    ) -> concurrent.futures.Future:
        """Send ``target(actor, *args_per_rank[i])`` (a :class:`LearnerActor` method) to learner
        ``ranks[i]``; a future of the values, carrying the request numbers as ``.seqs``."""
        if collective and self.restart_failed:
            result_ranks = None  # every rank's result: any survivor of a lost learner can report the update
        sends, generation = self._number(target, args_per_rank, ranks, collective, result_ranks, publish, log_topic)
        future = self.submit_on_loop(self._dispatch(sends, collective, generation))
        future.seqs = [s.seq for s in sends]  # type: ignore[attr-defined]
        return future

    def _number(self, target, args_per_rank, ranks, collective, result_ranks, publish, log_topic) -> Tuple[List[_Send], int]:
        """The requests for ``ranks`` with their request numbers, handed out in call order."""
        if self._closed:
            raise LearnerGroupError("This LearnerGroup was shut down.")
        ranks = list(range(self.num_learners)) if ranks is None else list(ranks)
        if len(args_per_rank) != len(ranks):
            raise ValueError(f"{len(args_per_rank)} argument tuples for {len(ranks)} learners.")
        with self._lock:
            sends = []
            for rank, args in zip(ranks, args_per_rank):
                slot = self.members[rank]
                request = Request(
                    target=target,
                    args=tuple(args),
                    collective=collective,
                    want_result=result_ranks is None or rank in result_ranks,
                    publish=publish,
                    log_topic=log_topic if rank == 0 else None,
                )
                sends.append(_Send(slot, slot.next_seq, request))
                slot.next_seq += 1
            return sends, self._generation

    async def _dispatch(self, sends: List[_Send], collective: bool, generation: int) -> List[Any]:
        calls = [asyncio.ensure_future(self._call(s)) for s in sends]
        pending = set(calls)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if not self.restart_failed and any(isinstance(c.result(), Died) for c in done):
                break  # a learner is gone: fail now, without waiting for the others to notice
        replies: List[Reply] = [c.result() if c.done() else ABANDONED for c in calls]
        for call in calls:
            if not call.done():
                call.cancel()
        self._note_failures(sends, replies, collective, generation)
        if self.restart_failed and collective and any(isinstance(r, Died) for r in replies):
            raise InterruptedUpdate(sends, replies)
        return values_or_raise(replies)

    def _note_failures(self, sends: List[_Send], replies: List[Reply], collective: bool, generation: int) -> None:
        if collective and any(not isinstance(r, Ok) for r in replies) and generation == self._generation:
            # Failed ranks dropped their process group: re-form before the next update. If some ranks
            # finished the update and others did not, their states may differ: copy a finisher's.
            self._pg_broken = True
            finished = [s.slot for s, r in zip(sends, replies) if isinstance(r, Ok)]
            if finished and self._resync_from is None:
                self._resync_from = finished[0]

    async def _call(self, send: _Send) -> Reply:
        slot = send.slot
        try:
            outcome = await self.call_member(slot, "run", (send.seq, send.request))
        except Exception as err:  # noqa: BLE001 - the actor answered but the call failed (e.g. the request could not be unpickled)
            return Failed.from_exception(err, rank=slot.rank, worker=slot.worker)
        return outcome if isinstance(outcome, Died) else outcome.value

    # -- process group upkeep ---------------------------------------------------------------------
    def ensure_ready(self) -> None:
        """Before an update: replace lost learners (with fault tolerance; else raise
        :class:`LearnerDiedError`), grow back towards ``num_learners`` when workers joined, re-form
        the process group if a failed update broke it, and copy one learner's state to the others
        if they diverged. With fault tolerance, async updates a loss interrupted are retried first."""
        if self._sequencer is None:
            self._repair()
            return
        with self._recovery_lock:
            if any(s.lost for s in self.members) or self._sequencer.needs_recovery():
                self._sequencer.recover()
            else:
                self._repair()

    def recover(self, err: LearnerDiedError) -> Tuple[bool, Any]:
        """After ``err`` ended a blocking collective update: replace the lost learners (fault tolerance).

        Async updates sent before it that the loss interrupted are settled or retried first, in
        order. Returns ``(True, value)`` when surviving learners had applied the update already (its
        reduced result; the new learners copy their state), ``(False, None)`` when no one applied
        it: every survivor rolled back, and the caller retries the update once. Raises ``err``
        without fault tolerance, and :class:`LearnerDiedError` when recovery is impossible.
        """
        if self._sequencer is None:
            raise err
        with self._recovery_lock:
            return self._sequencer.recover(blocking=err)

    def _repair(self, source: Optional[LearnerMember] = None, behind: Sequence[LearnerMember] = ()) -> None:
        """Replace lost learners, grow back, re-form a broken process group, make diverged learners
        equal. ``source``: a survivor holding the state every learner must have (it applied the
        most updates); ``behind``: survivors that did not apply the last of them (they get its state)."""
        if any(s.lost for s in self.members):
            if not self.restart_failed:
                raise self.dead_error()  # type: ignore[misc]
            self._replace_lost_learners(state_from=source)
        elif self.restart_failed and self.num_learners < self.target_num_learners:
            self._grow_back()
        if self.num_learners > 1 and self._pg_broken:
            self._form_process_group()
        if source is not None and not source.lost and source in self.members:
            self._resync_from = None
            self._copy_state(source, [s for s in behind if s in self.members and not s.lost and s is not source])
        if self._resync_from is not None:
            source, self._resync_from = self._resync_from, None
            if not source.lost and self.num_learners > 1:
                self._copy_state(source, [s for s in self.members if s is not source])

    def _replace_lost_learners(self, state_from: Optional[LearnerMember] = None) -> None:
        dead = [s for s in self.members if s.lost]
        survivors = [s for s in self.members if not s.lost]
        if not dead:
            return
        deaths = " ".join(self.death_message(s) for s in dead)
        if len(dead) > self.restarts_left:
            raise LearnerDiedError(
                f"{len(dead)} more learner(s) lost, but max_num_learner_restarts={self.max_restarts} is reached "
                f"({self.num_restarts} restarts so far). " + deaths
            )
        if not survivors and self.checkpoint_path is None:
            raise LearnerDiedError(
                "Every learner is gone and the group has no committed checkpoint to take their state from; "
                "save checkpoints (save_to_path) during training so a fault-tolerant group can recover. " + deaths
            )
        for slot in dead:
            self.stop_watching(slot)
        exclude = [s.worker for s in dead]
        addresses = free_learner_workers(self.connection, self._config, len(dead), self._restart_timeout_s, exclude=exclude)
        if self._closing:  # shut down while waiting for workers: start nothing it would not release
            raise LearnerGroupError("The LearnerGroup was shut down while replacing a lost learner.")
        if not survivors and not addresses:
            raise LearnerDiedError(
                f"Every learner is gone and no worker could host a new one within learner_restart_timeout_s="
                f"{self._restart_timeout_s:g} s."
            )
        if len(addresses) < len(dead):
            logger.warning(
                "LearnerGroup %s: %d learner(s) lost, %d replaced; training goes on with %d learner(s) "
                "(batch sizes are global, so updates mean the same) and grows back when workers join.",
                self.group_id,
                len(dead),
                len(addresses),
                len(survivors) + len(addresses),
            )
        source = state_from if state_from is not None and not state_from.lost else (survivors[0] if survivors else None)
        self._rebuild(survivors, addresses, source)

    def _grow_back(self) -> None:
        now = time.monotonic()
        if now < self._next_grow_probe:
            return
        self._next_grow_probe = now + settings.seconds("learner-group.grow-back-interval")
        missing = self.target_num_learners - self.num_learners
        addresses = free_learner_workers(self.connection, self._config, missing, 0.0)
        if addresses:
            logger.info(
                "LearnerGroup %s: %d worker(s) joined; growing back to %d learner(s).",
                self.group_id,
                len(addresses),
                self.num_learners + len(addresses),
            )
            self._rebuild([s for s in self.members if not s.lost], addresses, self.members[0])

    def _rebuild(self, survivors: List[LearnerMember], addresses: List[str], source: Optional[LearnerMember]) -> None:
        """New learners on ``addresses`` beside ``survivors``; ranks renumbered; the process group
        re-formed; the new learners (or all, without a survivor) get ``source``'s state."""
        gpus = float(self._config.num_gpus_per_learner or 0)
        new_slots: List[LearnerMember] = []
        for address in addresses:
            rank = len(survivors) + len(new_slots)
            key = self.count_replacement(learner_actor_key(rank, self.group_id))
            new_slots.append(LearnerMember(rank, address, key, device=device_for(rank, gpus, self.connection)))
        self.members = survivors + new_slots
        for rank, slot in enumerate(self.members):
            slot.index = rank
        if survivors:
            args = [(s.rank, self.num_learners) for s in survivors]
            self._submit(LearnerActor.set_rank, args, ranks=[s.rank for s in survivors], result_ranks=()).result()
        self.watch(new_slots)
        self._start_actors(new_slots)
        if self.num_learners > 1:
            self.backend = self.backend or self._choose_backend()
            self._form_process_group()
        self._resync_from = None
        if source is not None:
            self._copy_state(source, new_slots)
        else:
            self.call(learner_ops.restore, [(self.checkpoint_path,)] * self.num_learners, result_ranks=())
        logger.warning(
            "LearnerGroup %s re-formed with %d learner(s) on %s.", self.group_id, self.num_learners, self.learner_workers
        )

    def _copy_state(self, source: LearnerMember, targets: List[LearnerMember]) -> None:
        if not targets:
            return
        state = self.call(learner_ops.get_state, [()], ranks=[source.rank])[0]
        self.call(learner_ops.set_state, [(state,)] * len(targets), ranks=[s.rank for s in targets], result_ranks=())

    # -- teardown -------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Release the actors (after the requests already sent), then close what the pool opened.
        Async updates waiting for a retry fail with :class:`LearnerGroupError`."""
        if self._closed:
            return
        self._closing = True
        if self._sequencer is not None:
            self._sequencer.close()
        live = [s for s in self.members if not s.lost and s.future is not None and s.future.status == "finished"]
        if live:
            try:
                closing = self._submit(LearnerActor.close, [()] * len(live), ranks=[s.rank for s in live], result_ranks=())
                closing.result(timeout=_CLOSE_TIMEOUT_S)
            except (concurrent.futures.TimeoutError, LearnerGroupError, OSError) as err:
                logger.warning("LearnerGroup %s: closing the learners failed (%r); releasing them anyway.", self.group_id, err)
        self._closed = True
        client = self.connection.client
        futures = [s.future for s in self.members if s.future is not None]
        self._update_group_anchor = None  # released: the task group may end with the last update task
        for slot in self.members:
            self.stop_watching(slot)
        if client.status == "running":
            if futures:
                # The scheduler forgets the actors now, so the workers are free for a new group.
                client.cancel(futures, force=True)
        if self._owns_connection:
            self.connection.close()


def _keep_task_group() -> None:
    """The task that keeps a pool's ``learner-update`` task group alive (see ``DaskLearnerPool._update_future``)."""


def _on_learner(operation: Callable[..., Any], args_per_rank: Sequence[tuple]) -> List[tuple]:
    """The arguments of :meth:`LearnerActor.apply` that run ``operation`` with each rank's ``args``."""
    return [(operation, *args) for args in args_per_rank]
