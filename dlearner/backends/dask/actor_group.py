"""What every group of Dask actors shares, the learners of a LearnerGroup and the env runners of an
Algorithm alike, the way dask-jobqueue's core ``Job`` carries what every batch system shares:

* a :class:`Member` per actor: its position, worker, Dask key and the future that holds the actor;
* starting an actor pinned to its worker (placement is the group's decision, not the scheduler's);
* deaths, event-driven: the scheduler's ``remove-worker`` event for a member's worker
  (:meth:`~dlearner.backends.dask.cluster.ClusterConnection.watch_worker`) and a call whose
  connection broke both end in :meth:`ActorGroup.mark_dead`, which resolves the member's ``death``
  future; a call in flight races that future, so it ends the moment the worker is known to be gone;
* calls with typed outcomes: :meth:`ActorGroup.call_member` gives :class:`~.protocol.Ok` or
  :class:`~.protocol.Died`;
* replacements: at most ``max_restarts`` over the group's life, each under a fresh key
  ``<key>-r<n>`` (Dask keys are never reused).

:class:`~dlearner.backends.dask.pool.DaskLearnerPool` and
:class:`~dlearner.backends.dask.env_runners.DaskEnvRunnerGroup` add what is theirs: the learners'
numbered requests and process group, the env runners' sampling.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
from typing import Any, Callable, Coroutine, Dict, List, Mapping, Optional, Sequence, Union

from distributed import Future

from dlearner.backends.dask.cluster import ClusterConnection
from dlearner.backends.dask.protocol import Died, Ok
from dlearner.backends.dask.rpc import UNREACHABLE, ActorMissing, call_actor, worker_rpc

logger = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class Member:
    """One actor of a group."""

    #: The learner's rank, or the env runner's index.
    index: int
    worker: str
    key: str
    #: The future of the actor's creation: while the group holds it, Dask keeps the actor.
    future: Optional[Future] = None
    #: Why the actor is gone (``None`` while it is not known to be).
    lost: Optional[str] = None
    #: Resolved, on the client's event loop, when the actor is gone.
    death: Optional[asyncio.Future] = None
    #: Stops watching the worker's removal.
    unwatch: Optional[Callable[[], None]] = None


class ActorGroup:
    """The bookkeeping of a group of actors on the Dask cluster of ``connection``.

    ``restart_failed`` / ``max_restarts``: whether lost actors are replaced, and how many times over
    the group's life. ``death_confirm_s``: after a call lost contact with an actor, how long to wait
    for the scheduler to say why before giving the actor up (only the message gains from it).
    """

    def __init__(self, connection: ClusterConnection, *, restart_failed: bool, max_restarts: int, death_confirm_s: float = 0.0):
        self.connection = connection
        self.restart_failed = restart_failed
        self.max_restarts = max_restarts
        #: Actors started to replace lost ones (or, for learners, to grow back).
        self.num_restarts = 0
        self.members: List[Member] = []
        self._death_confirm_s = death_confirm_s
        self._loop = connection.client.loop.asyncio_loop

    # -- facts -------------------------------------------------------------------------------------
    @property
    def num_healthy(self) -> int:
        """Members not known to be gone."""
        return sum(1 for m in self.members if m.lost is None)

    @property
    def restarts_left(self) -> int:
        return self.max_restarts - self.num_restarts

    def count_replacement(self, key: str) -> str:
        """Count one more replacement actor; its Dask key: ``key`` + ``-r<n>``."""
        self.num_restarts += 1
        return f"{key}-r{self.num_restarts}"

    # -- life and death ------------------------------------------------------------------------------
    def watch(self, members: Sequence[Member]) -> None:
        """Follow the workers of ``members``: when one leaves the cluster (the scheduler pushes it at
        once), its members are marked dead and their calls in flight end."""
        self.run_on_loop(self._make_death_futures(members))
        for member in members:
            member.unwatch = self.connection.watch_worker(member.worker, lambda why, m=member: self.mark_dead(m, why))

    async def _make_death_futures(self, members: Sequence[Member]) -> None:
        loop = asyncio.get_running_loop()
        for member in members:
            if member.death is None:
                member.death = loop.create_future()

    def stop_watching(self, member: Member) -> None:
        if member.unwatch is not None:
            member.unwatch()
            member.unwatch = None

    def start(
        self, member: Member, actor_class: type, *args: Any, resources: Optional[Dict[str, float]] = None, **kwargs: Any
    ) -> None:
        """Start ``actor_class(*args, **kwargs)`` as the member's actor, on its worker and no other;
        :attr:`Member.future` holds it."""
        member.future = self.connection.client.submit(
            actor_class,
            *args,
            actor=True,
            key=member.key,
            workers=[member.worker],
            allow_other_workers=False,
            resources=resources,
            pure=False,
            **kwargs,
        )

    def mark_dead(self, member: Member, why: str) -> None:
        """The one place an actor is declared gone (runs on the client's event loop)."""
        if member.lost is None:
            member.lost = why
            logger.warning(self.death_message(member))
            if member.future is not None:
                member.future.release()  # so the scheduler never re-creates the actor elsewhere
        if member.death is not None and not member.death.done():
            member.death.set_result(None)

    def death_message(self, member: Member) -> str:
        """What to tell the user about a lost member (the reason alone unless a group says more)."""
        return member.lost or "its worker left the cluster"

    def release(self, member: Member) -> None:
        """Stop following ``member`` and drop the group's hold on its actor (Dask removes it)."""
        self.stop_watching(member)
        if member.future is not None:
            member.future.release()

    # -- calls ------------------------------------------------------------------------------------------
    async def call_member(
        self, member: Member, method: str, args: Sequence[Any] = (), kwargs: Optional[Mapping[str, Any]] = None
    ) -> Union[Ok, Died]:
        """``method(*args, **kwargs)`` on the member's actor (on the client's loop): :class:`Ok` of its
        value, or :class:`Died` as soon as the worker is known to be gone, before or during the call.
        The method's own exception is raised here."""
        if member.lost is not None:
            return self._died(member)
        remote = worker_rpc(self.connection.client, member.worker)
        call = asyncio.ensure_future(call_actor(remote, member.key, method, args, kwargs))
        await asyncio.wait({call, member.death}, return_when=asyncio.FIRST_COMPLETED)
        if not call.done():
            call.cancel()
            return self._died(member)
        err = call.exception()
        if err is None:
            return Ok(call.result())
        if not isinstance(err, UNREACHABLE + (ActorMissing,)):
            raise err
        # Lost contact while the call was in flight: the actor's request stream is broken, so it is
        # given up. Waiting briefly for the scheduler to confirm why makes the message precise.
        if self._death_confirm_s > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(member.death), self._death_confirm_s)
        self.mark_dead(member, f"lost contact with it ({err!r})")
        return self._died(member, cause=err)

    def _died(self, member: Member, cause: Optional[BaseException] = None) -> Died:
        return Died(member.index, member.worker, self.death_message(member), cause)

    def run_on_loop(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Run ``coro`` on the client's event loop and wait for its value."""
        return self.submit_on_loop(coro).result()

    def submit_on_loop(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future:
        """Run ``coro`` on the client's event loop; a future of its value."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop)
