"""Async updates of a Dask learner pool: the task behind an ``update_async`` future, and, with fault
tolerance, the :class:`AsyncUpdateSequencer` that retries them after a lost learner.

An ``update_async`` future is an ordinary ``distributed.Future`` computed by :func:`gather_published`,
a small ``async`` task that waits for every learner's reply to its request. When nothing fails, that
is all: the driver sends nothing more per update.

With ``config.fault_tolerance(restart_failed_learners=True)`` a learner lost mid-update interrupts
the update and every update queued behind it (the survivors drop their process group). Then the
driver is the one that decides, and the sequencer makes it keep submission order:

1. it waits until every update in flight has ended (they fail fast once a learner is gone);
2. it repairs the group once (:meth:`DaskLearnerPool._repair`: replace the lost learners, re-form
   the process group, give every learner the state of a survivor that applied the most);
3. in submission order, an update the survivors had applied is done (its survivors' result); every
   other one is sent again, once, on the re-formed group;
4. each outcome reaches its ``update_async`` future through a ``distributed.Variable`` named after
   the future's key, which its task waits for when the replies alone do not decide.

Submissions hold the pool's recovery lock, so a new update is numbered after the retries. The
recovery runs on a thread of its own (its calls wait on the client's event loop, which must stay
free), one at a time, under that same lock, which blocking updates and ``ensure_ready`` share.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Deque, List, Optional, Sequence, Set, Tuple

import cloudpickle
from distributed import Future, Variable, get_worker
from distributed.core import rpc
from distributed.worker_state_machine import SecedeEvent

from dlearner import settings
from dlearner.backends.dask.protocol import Died, Failed, Ok, Reply, values_or_raise
from dlearner.backends.dask.rpc import UNREACHABLE, ActorMissing, call_actor
from dlearner.errors import LearnerDiedError, LearnerGroupError

if TYPE_CHECKING:
    from dlearner.backends.dask.pool import DaskLearnerPool, LearnerMember

logger = logging.getLogger(__name__)

#: How long shutdown waits for a recovery that is running, and for outcomes to reach the scheduler.
_SHUTDOWN_WAIT_S = 30.0


class InterruptedUpdate(LearnerDiedError):
    """A learner died during a collective update of a fault-tolerant pool: the replies of every
    learner are kept, so the pool knows whether the survivors applied the update."""

    def __init__(self, sends: List[Any], replies: List[Reply]):
        dead = [r for r in replies if isinstance(r, Died)]
        super().__init__(dead[0].message if dead else "A learner died during the update.")
        self.sends, self.replies = sends, replies

    def applied_by(self) -> List[Tuple["LearnerMember", Any]]:
        """``(learner, value)`` of each learner that finished the update."""
        return [(s.slot, r.value) for s, r in zip(self.sends, self.replies) if isinstance(r, Ok)]


# ------------------------------------------------------------------------------ the worker side
def verdict_name(key: str) -> str:
    """The ``distributed.Variable`` through which the driver tells the task of future ``key`` its outcome."""
    return f"{key}-outcome"


async def gather_published(
    targets: Tuple[Tuple[int, str, str, int], ...], key: Optional[str] = None, verdict_timeout_s: float = 0.0
) -> Any:
    """The task behind an ``update_async`` future: wait for every rank's reply, return rank 0's value.

    ``targets`` holds ``(rank, worker address, actor key, request number)`` per learner. Runs as an
    ``async`` task on any worker, so it occupies no thread while the learners work. ``key``: this
    task's own key, given by fault-tolerant pools: when the replies do not decide (a learner
    failed, or none finished), the driver's outcome is read from the Variable
    :func:`verdict_name` ``(key)``, waiting up to ``verdict_timeout_s``.
    """
    worker = get_worker()
    # A worker that is gone refuses connections, and Dask retries a refused connect until its own
    # (long) timeout: a short one makes futures of a lost learner fail within seconds.
    connect_timeout = settings.seconds("learner-group.connect-timeout")

    async def one(rank: int, address: str, key: str, seq: int) -> Reply:
        remote = rpc(address, timeout=connect_timeout, connection_args=worker.connection_args)
        try:
            return await call_actor(remote, key, "wait_published", (seq,))
        except UNREACHABLE + (ActorMissing,) as err:
            return Died(rank, address, f"Learner rank {rank} ({key}) on Dask worker {address} cannot be reached: {err!r}")
        finally:
            await remote.close_rpc()

    replies = await asyncio.gather(*(one(*t) for t in targets))
    if key is None:
        return values_or_raise(replies)[0]
    finished = [r for r in replies if isinstance(r, Ok)]
    if finished and all(isinstance(r, (Ok, Died)) for r in replies):
        # Every learner finished it, or the survivors did: the update is applied (every rank of a
        # fault-tolerant pool returns the same reduced result).
        return finished[0].value
    # While it waits for the driver, the task gives its worker's task slot back, as
    # distributed.secede() does for a thread: the learner that replaces a lost one may have to start
    # on this very worker (a Dask actor starts as a task).
    worker.handle_stimulus(SecedeEvent(key=key, compute_duration=0.0, stimulus_id=f"dlearner-outcome-wait-{time.time()}"))
    try:
        record = await worker.scheduler.variable_get(name=verdict_name(key), timeout=verdict_timeout_s)
    except asyncio.TimeoutError as err:
        raise LearnerGroupError(
            f"The update's learners did not all finish it ({_describe(replies)}) and the driver gave no outcome "
            f"within {verdict_timeout_s:g} s (is the driver still running?)."
        ) from err
    kind, payload = cloudpickle.loads(record["value"])
    if kind == "error":
        raise payload
    return payload


def _describe(replies: Sequence[Reply]) -> str:
    names = {Ok: "finished", Failed: "failed", Died: "lost"}
    return ", ".join(f"rank {i} {names[type(r)]}" for i, r in enumerate(replies))


def _verdict_payload(value: Any = None, error: Optional[BaseException] = None) -> bytes:
    if error is None:
        return cloudpickle.dumps(("value", value))
    if isinstance(error, InterruptedUpdate):  # it holds the driver's bookkeeping: send what it says
        error = LearnerDiedError(str(error))
    try:
        return cloudpickle.dumps(("error", error))
    except Exception:  # noqa: BLE001 - an exception that cannot be pickled still travels as its text
        return cloudpickle.dumps(("error", LearnerGroupError(f"{type(error).__qualname__}: {error}")))


# ------------------------------------------------------------------------------ the driver side
@dataclasses.dataclass(eq=False)
class _AsyncUpdate:
    """One async update of a fault-tolerant pool, until its outcome is known."""

    target: Callable[..., Any]
    args_for_world: Callable[[int], Sequence[tuple]]
    log_topic: Optional[str]
    #: Resolves to the per-rank values (or the error) once the update is done, retried or not.
    outcome: concurrent.futures.Future
    #: The current try's future (the first, or the one retry).
    attempt: Optional[concurrent.futures.Future] = None
    #: The ``update_async`` future and the Variable its task may wait on (``None``: update(async_update=True)).
    user_future: Optional[Future] = None
    verdict: Optional[str] = None
    retried: bool = False
    settled: bool = False


class AsyncUpdateSequencer:
    """The async updates of a fault-tolerant :class:`~dlearner.backends.dask.pool.DaskLearnerPool`,
    kept in submission order through losses (see the module docstring)."""

    def __init__(self, pool: "DaskLearnerPool"):
        self._pool = pool
        self._updates: Deque[_AsyncUpdate] = collections.deque()  # not settled yet, in submission order
        self._state = threading.Lock()  # short sections only: taken on the client's event loop too
        self._thread: Optional[threading.Thread] = None
        self._recovery_wanted = False
        self._closing = False
        self._publishing: Set[concurrent.futures.Future] = set()

    # -- submitting (the caller holds the pool's recovery lock) ------------------------------------
    def submit(
        self, target: Callable[..., Any], args_for_world: Callable[[int], Sequence[tuple]], log_topic: Optional[str], future: bool
    ) -> Tuple[concurrent.futures.Future, Optional[Future]]:
        update = _AsyncUpdate(target, args_for_world, log_topic, concurrent.futures.Future())
        update.attempt = self._pool._submit_update(target, args_for_world(self._pool.num_learners), log_topic, publish=future)
        if future:
            update.user_future = self._pool._update_future(update.attempt, fault_tolerant=True)
            update.verdict = verdict_name(update.user_future.key)
        with self._state:
            self._updates.append(update)
        self._watch(update, update.attempt)
        return update.outcome, update.user_future

    def _watch(self, update: _AsyncUpdate, attempt: concurrent.futures.Future) -> None:
        update.attempt = attempt
        attempt.add_done_callback(lambda f: self._attempt_done(update, f))

    def _attempt_done(self, update: _AsyncUpdate, attempt: concurrent.futures.Future) -> None:
        """On the client's event loop: settle what is decided, hand interruptions to a recovery."""
        if attempt is not update.attempt:
            return
        if not _interrupted(attempt) or update.retried:
            self._settle_from(update, attempt)
        elif self._closing:
            self._settle(update, error=_shut_down(attempt.exception()))
        else:
            self._start_recovery()

    # -- outcomes ------------------------------------------------------------------------------------
    def _settle_from(self, update: _AsyncUpdate, attempt: concurrent.futures.Future) -> None:
        error = _error_of(attempt)
        if error is None:
            self._settle(update, attempt.result(), tell_task=update.retried)
        else:
            self._settle(update, error=error)

    def _settle(
        self, update: _AsyncUpdate, values: Any = None, *, error: Optional[BaseException] = None, tell_task: bool = True
    ) -> None:
        """The update's outcome, once: to its driver future and (``tell_task``, always for errors) to
        the task of its ``update_async`` future."""
        with self._state:
            if update.settled:
                return
            update.settled = True
            self._updates.remove(update)
        if update.verdict is not None and (tell_task or error is not None):
            value = None if error is not None else values[0]
            self._publish(update, _verdict_payload(value, error))
        if error is not None:
            update.outcome.set_exception(error)
        else:
            update.outcome.set_result(values)

    def _publish(self, update: _AsyncUpdate, payload: bytes) -> None:
        client = self._pool.connection.client
        if client.status != "running":
            return
        name, user_future = update.verdict, update.user_future

        async def publish() -> None:
            await client.scheduler.variable_set(name=name, data=payload)

        sent = self._pool.submit_on_loop(publish())
        with self._state:
            self._publishing.add(sent)
        sent.add_done_callback(self._published)
        # The Variable lives until the future's task has read it (or ended another way).
        user_future.add_done_callback(lambda _: _delete_variable(name, client))

    def _published(self, sent: concurrent.futures.Future) -> None:
        with self._state:
            self._publishing.discard(sent)
        if not sent.cancelled() and sent.exception() is not None:
            logger.warning(
                "LearnerGroup %s: could not hand an async update's outcome to the scheduler: %r",
                self._pool.group_id,
                sent.exception(),
            )

    # -- recovery --------------------------------------------------------------------------------------
    def needs_recovery(self) -> bool:
        """An update in flight failed because a learner was lost, and is not handled yet."""
        with self._state:
            pending = list(self._updates)
        return any(u.attempt is not None and not u.retried and _interrupted(u.attempt) for u in pending)

    def _start_recovery(self) -> None:
        with self._state:
            self._recovery_wanted = True
            if self._thread is not None:
                return  # the running recovery goes round once more
            self._thread = threading.Thread(
                target=self._recovery_main, name=f"dlearner-recovery-{self._pool.group_id}", daemon=True
            )
            self._thread.start()

    def _recovery_main(self) -> None:
        while True:
            with self._state:
                if not self._recovery_wanted or self._closing:
                    self._thread = None
                    return
                self._recovery_wanted = False
            try:
                with self._pool._recovery_lock:
                    if self.needs_recovery():  # not handled meanwhile by ensure_ready or a blocking update
                        self.recover()
            except BaseException as err:  # noqa: BLE001 - every update waiting for it learns why
                logger.warning("LearnerGroup %s: recovering from a lost learner failed: %r", self._pool.group_id, err)
                self._fail_interrupted(err)

    def recover(self, blocking: Optional[LearnerDiedError] = None) -> Tuple[bool, Any]:
        """With the recovery lock held: let every update in flight end, repair the group once, then
        settle or retry each interrupted update in submission order. ``blocking``: a blocking update
        that failed too; it was sent after every async update here, so it comes last. Returns, for
        it, ``(True, value)`` if the survivors applied it, else ``(False, None)`` (the caller retries
        it); raises when the group cannot be repaired."""
        with self._state:
            pending = list(self._updates)
        # No update can be added meanwhile (submissions hold the lock); after a loss they end fast.
        concurrent.futures.wait([u.attempt for u in pending if u.attempt is not None])
        interrupted: List[Tuple[_AsyncUpdate, InterruptedUpdate]] = []
        for update in pending:
            if _interrupted(update.attempt) and not update.retried:
                interrupted.append((update, update.attempt.exception()))
            else:
                self._settle_from(update, update.attempt)
        errors: List[LearnerDiedError] = [err for _, err in interrupted] + ([blocking] if blocking is not None else [])
        # Updates run in order on every learner, and a survivor that failed one fails every later one
        # (its process group is gone): the applied ones come first. A survivor that applied the last
        # of them holds the state every learner must have.
        applied, source, behind = 0, None, []
        for err in errors:
            finished = err.applied_by() if isinstance(err, InterruptedUpdate) else []
            if not finished:
                break
            applied += 1
            source = finished[0][0]
            behind = [s.slot for s, r in zip(err.sends, err.replies) if not isinstance(r, Ok)]
        if self._closing:
            for update, interruption in interrupted:
                self._settle(update, error=_shut_down(interruption))
            if blocking is not None:
                raise _shut_down(blocking)
            return False, None
        try:
            self._pool._repair(source=source, behind=behind)
        except Exception as err:
            if interrupted:
                err.add_note(
                    f"{len(interrupted)} async update(s) interrupted by a lost learner could not be retried: {interrupted[0][1]}"
                )
            for update, _ in interrupted:
                self._settle(update, error=err)
            raise
        for update, err in interrupted[:applied]:
            self._settle(update, [value for _, value in err.applied_by()])
        retry = [update for update, _ in interrupted[applied:]]
        self._pool.num_updates_retried += len(retry)
        for i, update in enumerate(retry):
            try:
                args = update.args_for_world(self._pool.num_learners)
                attempt = self._pool._submit_update(update.target, args, update.log_topic, publish=False)
            except Exception as err:  # e.g. shut down meanwhile: no update is left waiting
                for left in retry[i:]:
                    self._settle(left, error=err)
                raise
            update.retried = True
            self._watch(update, attempt)
        if retry:
            logger.warning(
                "LearnerGroup %s: %d async update(s) interrupted by a lost learner sent again on the re-formed group.",
                self._pool.group_id,
                len(retry),
            )
        if blocking is None:
            return False, None
        if applied == len(errors) and isinstance(blocking, InterruptedUpdate):
            return True, blocking.applied_by()[0][1]
        self._pool.num_updates_retried += 1
        return False, None

    def _fail_interrupted(self, error: BaseException) -> None:
        """After a recovery failed unexpectedly: every update it left waiting ends with ``error``."""
        with self._state:
            pending = list(self._updates)
        for update in pending:
            if update.retried and update.attempt.done():
                self._settle_from(update, update.attempt)
            elif _interrupted(update.attempt) and not update.retried:
                self._settle(update, error=error)

    # -- shutdown --------------------------------------------------------------------------------------
    def close(self) -> None:
        """Before the pool releases its learners: updates in flight end (bounded waits: a running
        recovery first, which may still retry them), those left waiting for a retry fail with
        :class:`LearnerGroupError`, and every outcome reaches the scheduler."""
        with self._state:
            self._closing = True
            thread = self._thread
        if thread is not None:
            thread.join(timeout=_SHUTDOWN_WAIT_S)
        with self._state:
            left = list(self._updates)
        concurrent.futures.wait([u.attempt for u in left if u.attempt is not None], timeout=_SHUTDOWN_WAIT_S)
        for update in left:
            attempt = update.attempt
            if attempt is not None and attempt.done() and (update.retried or not _interrupted(attempt)):
                self._settle_from(update, attempt)
            else:
                self._settle(update, error=_shut_down(_error_of(attempt) if attempt is not None and attempt.done() else None))
        with self._state:
            sending = list(self._publishing)
        concurrent.futures.wait(sending, timeout=_SHUTDOWN_WAIT_S)


def _shut_down(interruption: Optional[BaseException]) -> LearnerGroupError:
    error = LearnerGroupError(
        "The LearnerGroup was shut down before this update could be retried after a lost learner"
        + (f" ({interruption})." if interruption is not None else ".")
    )
    error.__cause__ = interruption
    return error


def _interrupted(attempt: Optional[concurrent.futures.Future]) -> bool:
    return attempt is not None and attempt.done() and isinstance(_error_of(attempt), InterruptedUpdate)


def _error_of(attempt: concurrent.futures.Future) -> Optional[BaseException]:
    if attempt.cancelled():
        return LearnerGroupError("The update was cancelled.")
    return attempt.exception()


def _delete_variable(name: str, client: Any) -> None:
    if client.status == "running":
        Variable(name, client=client).delete()
