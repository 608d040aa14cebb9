"""The two interfaces the LearnerGroup and the Algorithm program against.

A :class:`LearnerPool` runs operations on the learners (one local Learner, or N Dask actors); an
:class:`EnvRunnerGroup` samples with env runners (one in the driver, or N Dask actors). The
LearnerGroup and the Algorithm know nothing else about where things run: each backend is one
implementation of both, with these very signatures (``dlearner.backends.local``,
``dlearner.backends.dask``), the way dask-jobqueue's batch systems each implement one core class.

Operations are the functions ``op(learner, *args)`` of :mod:`dlearner.learner_ops` (module-level,
so they travel to workers by reference); every learner runs the operations sent to it in the order
they were sent.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple, runtime_checkable

from dlearner.errors import LearnerDiedError


@runtime_checkable
class LearnerPool(Protocol):
    """The learners of one LearnerGroup."""

    #: ``True`` for the one local Learner (``num_learners=0``).
    is_local: bool
    #: Learners that take part in every update (1 for a local pool).
    num_learners: int
    #: ``"gloo"`` / ``"nccl"`` for 2+ learners, else ``None``.
    backend: Optional[str]
    #: Dask event topic where rank 0 logs each update's results (``None`` for a local pool).
    metrics_topic: Optional[str]
    #: The ``distributed.Client`` the learners run through (``None`` for a local pool).
    client: Any
    #: Worker address and actor key of each learner, by rank (empty for a local pool).
    learner_workers: List[str]
    learner_keys: List[str]
    #: Learners alive now, and learners started to replace lost ones (fault tolerance).
    num_healthy_learners: int
    num_learner_restarts: int
    num_updates_retried: int
    #: The last checkpoint the group committed (set by the group; a fault-tolerant pool restores it
    #: when no learner survived).
    checkpoint_path: Optional[str]

    def submit(
        self,
        target: Any,
        args_per_rank: Sequence[tuple],
        *,
        ranks: Optional[Sequence[int]] = None,
        collective: bool = False,
        result_ranks: Optional[Sequence[int]] = (0,),
        log_topic: Optional[str] = None,
    ) -> concurrent.futures.Future:
        """Run ``target(learner, *args)`` on each rank; a future of the values of ``result_ranks``
        (others ``None``), or of the learners' exception."""

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
        """:meth:`submit` and wait: the values by rank, or the learners' exception raised here."""

    def submit_update(
        self,
        target: Any,
        args_for_world: Callable[[int], Sequence[tuple]],
        *,
        log_topic: Optional[str] = None,
        future: bool = False,
    ) -> Tuple[concurrent.futures.Future, Any]:
        """An async collective update on all learners: ``(future of the values, user-facing future of
        rank 0's value, or None unless future=True)``. ``args_for_world(n)``: each rank's arguments for
        ``n`` learners (a fault-tolerant pool retries an interrupted update on its re-formed group)."""

    def ensure_ready(self) -> None:
        """Before an update: raise if a learner is gone (or replace it, with fault tolerance), repair
        what an earlier failure broke."""

    def recover(self, err: LearnerDiedError) -> Tuple[bool, Any]:
        """After ``err`` ended a collective update: ``(True, result)`` if the surviving learners
        applied it, ``(False, None)`` if it must be retried on the repaired group; re-raises ``err``
        when the pool cannot recover."""

    def dead_error(self) -> Optional[LearnerDiedError]:
        """The error to raise if a learner is gone, else ``None``."""

    def live_ranks(self) -> List[int]:
        """Ranks whose learner is not known to be gone."""

    def shutdown(self) -> None:
        """Stop the learners after the requests already sent; close what the pool opened."""


@runtime_checkable
class EnvRunnerGroup(Protocol):
    """The env runners of one Algorithm."""

    num_runners: int
    #: Runners in service, runners started to replace lost ones, env steps lost with them.
    num_healthy_env_runners: int
    num_env_runner_restarts: int
    num_env_steps_lost: int

    def sample(self, num_timesteps: int) -> List[Dict[str, Any]]:
        """About ``num_timesteps`` env steps over all runners: one fragment per runner."""

    def sample_async(self, index: int, num_timesteps: int, *, weights: Any = None) -> concurrent.futures.Future:
        """Start ``num_timesteps`` env steps on runner ``index`` without waiting (after loading
        ``weights`` if given): a future of ``(fragment, episode metrics since its last report)``.
        Asynchronous algorithms (IMPALA, APPO) keep one in flight per runner."""

    def sync_weights(self, weights: Any) -> None:
        """Give every runner the learners' current module weights."""

    def foreach_env(self, fn: Callable[[Any], Any]) -> List[List[Any]]:
        """Call ``fn(env)`` on every environment of every runner, where the runner is (in its Dask
        actor for remote runners, so ``fn`` must pickle: a lambda or a module-level function); the
        values per runner, per env: ``[[fn(env) for env in runner's envs] for runner]``.

        A single-agent runner's envs are the sub-envs of its ``SyncVectorEnv`` as
        ``config.make_env()`` made them (``env.unwrapped`` is the bare env); a multi-agent runner's
        its multi-agent envs. This is the documented way for ``Callbacks.on_train_result`` to
        change the environments (a curriculum): the change applies from each env's next step on,
        running episodes go on in the changed env. A runner started later to replace a lost one
        (``restart_failed_env_runners``) replays every ``fn`` given so far, in order, so it samples
        the same task; ``config.env_config`` itself does not change. Give ``fn`` that sets rather
        than increments: a call a lost runner interrupted is made again on every runner.

        Example::

            algorithm.env_runner_group.foreach_env(lambda env: env.unwrapped.set_task(2))
        """

    def replace_lost(self, err: BaseException, lost_env_steps: int = 0) -> None:
        """After ``err`` from a lost runner: replace it (``restart_failed_env_runners``), counting the
        env steps it was sampling as lost; otherwise raise ``err``."""

    def get_metrics(self) -> List[Dict[str, Any]]:
        """Each runner's episode statistics since the last call."""

    def add_module(self, config: Any, module_spec: Any, module_id: str, weights: Any) -> None:
        """Multi-agent runs: every runner acts with the new module ``module_id`` (starting from
        ``weights``), mapping agents as the updated ``config`` says; replacements start with it."""

    def remove_module(self, config: Any, module_spec: Any, module_id: str) -> None:
        """Multi-agent runs: every runner stops acting with ``module_id``."""

    def evaluate(self, num_episodes: int, seed: Optional[int] = None) -> Dict[str, Any]:
        """Greedy evaluation episodes."""

    def get_state(self) -> List[Dict[str, Any]]:
        """Each runner's state (for checkpoints)."""

    def set_state(self, states: Sequence[Dict[str, Any]]) -> None:
        """Restore each runner's state."""

    def stop(self) -> None:
        """Stop and release every runner; never raises for a runner that is already gone."""
