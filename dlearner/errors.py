"""Exceptions a LearnerGroup raises for problems of the cluster rather than of the user's code.

An exception raised *inside* a learner (a bad loss, a ``ValueError`` from a batch check) reaches
the caller as itself, with the learner's traceback attached as a note; these classes are for what
only a distributed run can go through, and :class:`CallbackError` for a user callback that raised
(:class:`dlearner.Callbacks`), which must never pass for a lost worker.
"""

from __future__ import annotations

import traceback
from typing import Any, Dict, Optional

__all__ = [
    "LearnerGroupError",
    "ClusterResourceError",
    "ProcessGroupError",
    "LearnerDiedError",
    "RemoteLearnerError",
    "EnvRunnerDiedError",
    "CallbackError",
]


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


class EnvRunnerDiedError(LearnerGroupError):
    """An env runner's worker died or cannot be reached."""

    #: Which env runner of its group was lost (``None`` if unknown).
    runner_index = None


class CallbackError(RuntimeError):
    """A method of the configured :class:`dlearner.Callbacks` raised.

    The message names the callback class and method and where it ran (the episode id, env index and
    env runner for episode callbacks); the original exception is the ``__cause__``. Raised in an
    env-runner actor, it reaches ``algo.train()`` as itself: the original travels with it when it
    can be pickled, and its type, message and traceback always do (in the message and a note). It is
    a ``RuntimeError``, never an :class:`EnvRunnerDiedError`: fault tolerance does not replace a
    runner whose callback failed, since a replacement would fail the same way.

    Attributes: ``callback_class`` (import path), ``method``, ``episode_id``, ``env_index``,
    ``env_runner_index`` (``None`` where they do not apply).
    """

    def __init__(
        self,
        message: str,
        *,
        callback_class: Optional[str] = None,
        method: Optional[str] = None,
        episode_id: Optional[str] = None,
        env_index: Optional[int] = None,
        env_runner_index: Optional[int] = None,
    ):
        super().__init__(message)
        self.callback_class = callback_class
        self.method = method
        self.episode_id = episode_id
        self.env_index = env_index
        self.env_runner_index = env_runner_index

    def __reduce__(self) -> Any:
        # Exceptions pickle without their __cause__ and tracebacks never pickle. From an env-runner
        # actor the cause comes along when it can (its class importable in the driver), and its
        # traceback always does, as a note.
        state: Dict[str, Any] = dict(self.__dict__)
        cause = self.__cause__
        if cause is not None:
            import cloudpickle

            remote = "".join(traceback.format_exception(cause)).rstrip()
            state["__notes__"] = [*state.get("__notes__", []), f"Traceback of the callback, where it ran:\n{remote}"]
            try:
                state["_pickled_cause"] = cloudpickle.dumps(cause)
            except Exception:  # noqa: BLE001 - an unpicklable cause still travels as text (message and note)
                pass
        return (_rebuild_callback_error, (type(self), self.args, state))


def _rebuild_callback_error(cls: type, args: tuple, state: Dict[str, Any]) -> "CallbackError":
    err = cls.__new__(cls)
    err.args = args
    pickled = state.pop("_pickled_cause", None)
    err.__dict__.update(state)
    if pickled is not None:
        import cloudpickle

        try:
            err.__cause__ = cloudpickle.loads(pickled)
        except Exception:  # noqa: BLE001 - the driver cannot import the cause's class: the note still shows it
            pass
    return err


def callback_error(
    err: BaseException,
    *,
    callbacks: Any,
    method: str,
    where: str,
    episode_id: Optional[str] = None,
    env_index: Optional[int] = None,
    env_runner_index: Optional[int] = None,
) -> CallbackError:
    """The :class:`CallbackError` for ``err``, raised by ``callbacks.method`` ``where`` (a phrase such
    as ``"in episode 3f2a... (env index 1) of env runner 2"``); raise it ``from err``."""
    cls = type(callbacks)
    path = f"{cls.__module__}.{cls.__qualname__}"
    return CallbackError(
        f"Callback {path}.{method} raised {type(err).__name__}: {err} ({where}). Fix the callback, or set "
        "config.callbacks(...) to a class without it.",
        callback_class=path,
        method=method,
        episode_id=episode_id,
        env_index=env_index,
        env_runner_index=env_runner_index,
    )


class WeightsVersionGoneError(LookupError):
    """A learner was asked for a weights version it does not keep (never kept there, or replaced by
    ``learner_ops.KEPT_WEIGHTS_VERSIONS`` newer ones)."""
