"""What travels between the driver and a learner actor: one request, one typed reply.

A :class:`Request` names an operation and its arguments; the learner answers every request with
exactly one reply:

* :class:`Ok` — the operation's value (``None`` when the driver did not ask for it);
* :class:`Failed` — the operation raised; the exception travels pickled when it can, always with its
  type name, message and the learner's traceback;
* :class:`Died` — made by the driver, never sent: the learner's worker is gone or cannot be reached.

Every call the driver makes on an actor, a learner's or an env runner's, ends in :class:`Ok` or
:class:`Died` (:meth:`~dlearner.backends.dask.actor_group.ActorGroup.call_member`).
:func:`values_or_raise` turns the replies of one call on several learners into their values, or
raises the most telling error of the call.
"""

from __future__ import annotations

import dataclasses
import traceback
from typing import Any, Callable, List, Optional, Sequence, Union

import cloudpickle

from dlearner.errors import LearnerDiedError, RemoteLearnerError


@dataclasses.dataclass(frozen=True)
class Request:
    """One call on one learner.

    ``target(actor, *args)`` runs on the :class:`~dlearner.backends.dask.actor.LearnerActor`: one of
    its methods, referenced through the class (``LearnerActor.apply`` runs a learner operation of
    :mod:`dlearner.learner_ops`; the others are the pool's process-group plumbing). ``collective``
    requests (updates) take part in collectives: if one fails, the learner drops its process group
    so that no peer hangs. ``publish`` keeps the reply for an ``update_async`` future;
    ``log_topic`` logs the value as a Dask event for the dashboard.
    """

    target: Callable[..., Any]
    args: tuple = ()
    collective: bool = False
    want_result: bool = True
    publish: bool = False
    log_topic: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class Ok:
    """The request ran; ``value`` is its result (``None`` unless the driver asked for it)."""

    value: Any = None


@dataclasses.dataclass(frozen=True)
class Failed:
    """The request raised inside the learner.

    ``secondary`` marks a failure caused by another rank's failure (a peer that left a collective,
    or a process group dropped after an earlier failed update): the driver reports the primary one.
    """

    rank: int
    worker: str
    error_type: str
    message: str
    traceback: str
    pickled: Optional[bytes] = None
    secondary: bool = False

    @classmethod
    def from_exception(cls, err: BaseException, *, rank: int, worker: str, secondary: bool = False) -> "Failed":
        """The reply for ``err``, pickled if it can travel (its text and traceback always do)."""
        try:
            pickled: Optional[bytes] = cloudpickle.dumps(err)
        except Exception:  # noqa: BLE001 - an exception that cannot be pickled still travels as text
            pickled = None
        return cls(
            rank=rank,
            worker=worker,
            error_type=f"{type(err).__module__}.{type(err).__qualname__}",
            message=str(err),
            traceback="".join(traceback.format_exception(err)),
            pickled=pickled,
            secondary=secondary,
        )

    def exception(self) -> BaseException:
        """The learner's exception, rebuilt in the driver with the remote traceback as a note."""
        err: Optional[BaseException] = None
        if self.pickled is not None:
            try:
                err = cloudpickle.loads(self.pickled)
            except Exception:  # noqa: BLE001 - the driver cannot import the class: its text still says it
                err = None
        if not isinstance(err, BaseException):
            err = RemoteLearnerError(f"{self.error_type}: {self.message}")
        try:
            err.learner_rank, err.learner_worker = self.rank, self.worker
        except AttributeError:  # an exception class with __slots__: the note below still says it
            pass
        err.add_note(
            f"Raised in learner rank {self.rank} on Dask worker {self.worker}. Remote traceback:\n" + self.traceback.rstrip()
        )
        return err


@dataclasses.dataclass(frozen=True)
class Died:
    """The actor's worker left the cluster or cannot be reached (made by the driver, for learners
    and env runners alike). ``index``: the learner's rank or the env runner's index; ``cause``: the
    error of the broken call, if one told it."""

    index: int
    worker: str
    message: str
    cause: Optional[BaseException] = None


#: Placeholder for the reply of a learner the driver stopped waiting for (another one died first).
ABANDONED = Failed(rank=-1, worker="", error_type="", message="abandoned", traceback="", secondary=True)

Reply = Union[Ok, Failed, Died]


def values_or_raise(replies: Sequence[Reply]) -> List[Any]:
    """The values of ``replies`` in rank order, or the most telling error if any learner failed.

    A dead learner wins; then the first failure that is not a consequence of another rank's.
    """
    failed = [r for r in replies if not isinstance(r, Ok)]
    if not failed:
        return [r.value for r in replies]  # type: ignore[union-attr]
    dead = [r for r in failed if isinstance(r, Died)]
    if dead:
        raise LearnerDiedError(dead[0].message)
    errors = [r for r in failed if isinstance(r, Failed)]
    primary = [r for r in errors if not r.secondary] or errors
    err = primary[0].exception()
    if len(errors) > 1:
        err.add_note(f"The request failed on learner ranks {[r.rank for r in errors]} of {len(replies)}.")
    raise err
