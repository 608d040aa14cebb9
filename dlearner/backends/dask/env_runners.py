"""``num_env_runners=N>=1``: N :class:`~dlearner.env_runner.EnvRunner` actors sampling in parallel.

Each runner samples ``ceil(num_timesteps / N)`` steps per call; the calls run concurrently and the
fragments come back as a list. New weights go to every runner once per sync, as one message per
runner sent to all runners concurrently. Calls go through the connection's own client (never
Dask's default client), so a group attached with ``.cluster(client=...)``, ``address=`` or
``scheduler_file=`` works like an embedded one. Watching for deaths, replacing lost runners and
their keys are those of every actor group (:class:`~dlearner.backends.dask.actor_group.ActorGroup`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from dlearner import settings
from dlearner.backends.dask.actor_group import ActorGroup, Member
from dlearner.backends.dask.cluster import ClusterConnection, place_env_runners
from dlearner.backends.dask.fragments import WeightsRef
from dlearner.backends.dask.protocol import Died
from dlearner.backends.dask.rpc import UNREACHABLE, ActorMissing, call_actor, worker_rpc
from dlearner.errors import ClusterResourceError, EnvRunnerDiedError

logger = logging.getLogger(__name__)


def env_runner_actor_key(index: int, run_id: str) -> str:
    """Dashboard-readable key of an env-runner actor: ``env-runner-<index>-<run id>`` (a runner
    started to replace a lost one gets ``-r<n>`` appended, as Dask keys are never reused)."""
    return f"env-runner-{index}-{run_id}"


#: What a user can do when an env runner is lost for good.
_CONTINUE = "continue from the last checkpoint (`dlearner train --resume`, or algo.restore_from_path in a new Algorithm)"


def _gone(member: Member) -> str:
    return f"Env runner {member.index} ({member.key}) on Dask worker {member.worker} is gone ({member.lost})."


def _runner_died(died: Died, method: str) -> EnvRunnerDiedError:
    """The error of a call to a lost runner (``died.message``: the group's :meth:`~DaskEnvRunnerGroup.death_message`)."""
    error = EnvRunnerDiedError(f"{method} failed: {died.message}")
    error.runner_index = died.index
    return error


class DaskEnvRunnerGroup(ActorGroup):
    """Env-runner actors on Dask workers (implements :class:`~dlearner.backends.interface.EnvRunnerGroup`)."""

    def __init__(
        self, config: Any, module_spec: Any, *, connection: ClusterConnection, run_id: str, runner_class: Optional[type] = None
    ):
        super().__init__(
            connection, restart_failed=config.restart_failed_env_runners, max_restarts=config.max_num_env_runner_restarts
        )
        self.run_id = run_id
        num = int(config.num_env_runners)
        self._timeout_s = config.resolved_startup_timeout_s()
        self._runner_config = config.copy_for_learner()
        self._module_spec = module_spec
        self._runner_class = runner_class  # None: the single-agent EnvRunner
        #: Env steps lost with lost runners (counted, never hidden).
        self.num_env_steps_lost = 0
        self._weights: Any = None  # the last weights synced: a replacement starts from them
        # Every foreach_env function so far, in order: a replacement replays them (a curriculum's task).
        self._env_calls: List[Any] = []
        workers = place_env_runners(connection, num, self._timeout_s)
        self.members = [Member(i, worker, env_runner_actor_key(i, run_id)) for i, worker in enumerate(workers)]
        try:
            # Pushed by the scheduler when a worker leaves: calls fail at once instead of waiting
            # for a connect timeout.
            self.watch(self.members)
            for member in self.members:
                self._start_runner(member)
            for member in self.members:
                member.future.result(timeout=self._timeout_s)
        except TimeoutError as err:
            self._release_all()
            raise ClusterResourceError(
                f"{num} env runner actor(s) did not start within {self._timeout_s:g} s on {connection.description}."
            ) from err
        except BaseException:
            self._release_all()
            raise

    def _start_runner(self, member: Member) -> None:
        # Imported here: the runner classes import gymnasium, which connecting to a cluster does not need.
        from dlearner.backends.dask.runner_actors import runner_actor_class
        from dlearner.env_runner import EnvRunner

        actor_class = runner_actor_class(self._runner_class or EnvRunner)
        self.start(member, actor_class, self._runner_config, module_spec=self._module_spec, worker_index=member.index + 1)

    # -- facts -------------------------------------------------------------------------------------
    @property
    def num_runners(self) -> int:
        return len(self.members)

    @property
    def workers(self) -> List[str]:
        """The worker address of each runner."""
        return [m.worker for m in self.members]

    @property
    def keys(self) -> List[str]:
        """The Dask key of each runner actor."""
        return [m.key for m in self.members]

    @property
    def num_healthy_env_runners(self) -> int:
        """Env runners whose worker is still in the cluster."""
        return self.num_healthy

    @property
    def num_env_runner_restarts(self) -> int:
        """Env runners started to replace lost ones."""
        return self.num_restarts

    def death_message(self, member: Member) -> str:
        """What happened to ``member`` and what comes next: its replacement, or what the user can do."""
        if self.restart_failed and self.restarts_left > 0:
            return (
                f"{_gone(member)} A new env runner replaces it on a live worker "
                "(fault tolerance: restart_failed_env_runners=True)."
            )
        if self.restart_failed:
            return (
                f"{_gone(member)} max_num_env_runner_restarts={self.max_restarts} is reached, so it is not replaced; "
                f"{_CONTINUE} (or raise max_num_env_runner_restarts)."
            )
        return (
            f"{_gone(member)} Training cannot go on with it; {_CONTINUE}, or enable "
            "config.fault_tolerance(restart_failed_env_runners=True)."
        )

    # -- losses ------------------------------------------------------------------------------------
    def replace_lost(self, err: EnvRunnerDiedError, lost_env_steps: int = 0) -> None:
        """After ``err`` from a lost runner: with ``restart_failed_env_runners``, a replacement starts
        on a live worker with the last synced weights and ``lost_env_steps`` (what the lost runner
        was sampling) are counted in :attr:`num_env_steps_lost`; otherwise ``err`` is raised."""
        if not self.restart_failed or err.runner_index is None:
            raise err
        self._replace(err.runner_index, err)
        self.num_env_steps_lost += int(lost_env_steps)

    def _replace(self, index: int, err: BaseException) -> None:
        """Start a new runner in place of runner ``index`` on a live worker, with the last synced weights."""
        if self.restarts_left < 1:
            raise EnvRunnerDiedError(self.death_message(self.members[index])) from err
        key = self.count_replacement(env_runner_actor_key(index, self.run_id))
        lost = self.members[index]
        self.release(lost)
        # A worker that hosts no learner and no other runner of this group, if there is one.
        others = [m.worker for m in self.members if m is not lost and m.lost is None]
        lost_workers = [m.worker for m in self.members if m is lost or m.lost is not None]
        worker = place_env_runners(self.connection, 1, self._timeout_s, avoid=others, exclude=lost_workers)[0]
        replacement = self.members[index] = Member(index, worker, key)
        self.watch([replacement])
        self._start_runner(replacement)
        replacement.future.result(timeout=self._timeout_s)
        logger.warning("Env runner %s (%s) replaces the lost %s on Dask worker %s.", index, key, lost.key, worker)
        if self._weights is not None:
            # The last weights sent: by value, or where the runners pull them from.
            method = "load_weights_ref" if isinstance(self._weights, WeightsRef) else "set_weights"
            self._all(method, [(self._weights,) if i == index else None for i in range(self.num_runners)])
        for fn in self._env_calls:
            self._all("foreach_env", [(fn,) if i == index else None for i in range(self.num_runners)])

    # -- calls -------------------------------------------------------------------------------------
    def _all(self, method: str, args_per_runner: Sequence[Optional[tuple]]) -> List[Any]:
        """``method(*args)`` on every runner (``None`` args: skip that runner) concurrently; their
        values in runner order. A lost runner is replaced and its call made again once (with
        ``restart_failed_env_runners``); otherwise :class:`EnvRunnerDiedError` says what to do."""
        for _ in range(self.num_runners + 1):  # one worker may have hosted several runners
            try:
                return self._call_all(method, args_per_runner)
            except EnvRunnerDiedError as err:
                index = err.runner_index
                lost = (
                    int(args_per_runner[index][0]) if method == "sample" and index is not None and args_per_runner[index] else 0
                )  # type: ignore[index]
                self.replace_lost(err, lost)
        return self._call_all(method, args_per_runner)

    def _call_all(self, method: str, args_per_runner: Sequence[Optional[tuple]]) -> List[Any]:
        async def one(index: int, args: Optional[tuple]) -> Any:
            if args is None:
                return None
            return await self._call_one(index, method, args)

        async def every() -> List[Any]:
            return list(await asyncio.gather(*(one(i, args) for i, args in enumerate(args_per_runner))))

        return self.run_on_loop(every())

    async def _call_one(self, index: int, method: str, args: tuple, kwargs: Optional[Dict[str, Any]] = None) -> Any:
        """``method`` on runner ``index`` (on the client's loop); :class:`EnvRunnerDiedError` as soon
        as its worker is known to be gone, in flight or not."""
        outcome = await self.call_member(self.members[index], method, args, kwargs)
        if isinstance(outcome, Died):
            raise _runner_died(outcome, method) from outcome.cause
        return outcome.value

    def sample(self, num_timesteps: int) -> List[Dict[str, Any]]:
        per_runner = math.ceil(num_timesteps / self.num_runners)
        return self._all("sample", [(per_runner,)] * self.num_runners)

    def sample_async(self, index: int, num_timesteps: int, *, weights: Any = None) -> concurrent.futures.Future:
        """Start sampling ``num_timesteps`` env steps on runner ``index`` and return at once.

        The runner first loads ``weights`` if given (the next fragment uses them; the runner never
        stops for a broadcast). A ``concurrent.futures.Future`` of ``(fragment, episode metrics
        since the runner's last report)``; ``concurrent.futures.wait`` / ``as_completed`` work on
        it. A lost runner makes it raise :class:`EnvRunnerDiedError`.
        """
        if weights is not None:
            self._weights = weights  # a replacement runner starts from them
        return self.submit_on_loop(self._call_one(index, "sample_with_metrics", (num_timesteps, weights)))

    def sample_fragment_refs_async(
        self, index: int, num_timesteps: int, *, columns: Sequence[str], weights: Any = None, release: Sequence[int] = ()
    ) -> concurrent.futures.Future:
        """Like :meth:`sample_async`, but the fragments stay on runner ``index`` (see
        :class:`~dlearner.backends.dask.fragments.FragmentStore`): a future of ``(fragment descriptions, episode
        metrics, env steps sampled, weights version info)``. The runner first forgets the fragments
        ``release``; ``weights`` may be a :class:`~dlearner.backends.dask.fragments.WeightsRef` (the runner pulls
        them from the learner that keeps them)."""
        if weights is not None:
            self._weights = weights  # a replacement runner starts from them
        args = (num_timesteps, tuple(columns), weights, list(release))
        return self.submit_on_loop(self._call_one(index, "sample_fragment_refs", args))

    def fragment_source(self, index: int) -> Tuple[str, str]:
        """``(actor key, worker address)`` of runner ``index``: where learners fetch its fragments."""
        member = self.members[index]
        return member.key, member.worker

    def is_lost(self, index: int) -> bool:
        """Whether runner ``index`` is known to be gone (its worker left; it is replaced on its next call)."""
        return self.members[index].lost is not None

    def sync_weights(self, weights: Any) -> None:
        self._weights = weights
        self._all("set_weights", [(weights,)] * self.num_runners)

    def get_metrics(self) -> List[Dict[str, Any]]:
        return self._all("get_metrics", [()] * self.num_runners)

    def foreach_env(self, fn: Callable[[Any], Any]) -> List[List[Any]]:
        """``fn(env)`` on every env of every runner actor (see the interface); replacements replay it."""
        values = self._all("foreach_env", [(fn,)] * self.num_runners)
        self._env_calls.append(fn)
        return values

    def add_module(self, config: Any, module_spec: Any, module_id: str, weights: Any) -> None:
        # Replacements start from the new config and specs (and the next synced weights).
        self._runner_config, self._module_spec = config.copy_for_learner(), module_spec
        args = (module_id, module_spec.rl_module_specs[module_id], weights, self._runner_config)
        self._all("add_module", [args] * self.num_runners)

    def remove_module(self, config: Any, module_spec: Any, module_id: str) -> None:
        self._runner_config, self._module_spec = config.copy_for_learner(), module_spec
        self._all("remove_module", [(module_id, self._runner_config)] * self.num_runners)

    def evaluate(self, num_episodes: int, seed: Optional[int] = None) -> Dict[str, Any]:
        """Greedy evaluation episodes on the first runner."""
        return self.run_on_loop(self._call_one(0, "evaluate", (num_episodes,), {"seed": seed}))

    def get_state(self) -> List[Dict[str, Any]]:
        return self._all("get_state", [()] * self.num_runners)

    def set_state(self, states: Sequence[Dict[str, Any]]) -> None:
        self._all("set_state", [(state,) for state in states][: self.num_runners])

    # -- teardown ----------------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop every runner that still answers, then release all of them (never raises for a lost runner)."""
        if not self.members:
            return
        timeout = settings.seconds("env-runners.stop-timeout")
        client = self.connection.client

        async def stop_one(member: Member) -> None:
            try:
                await asyncio.wait_for(call_actor(worker_rpc(client, member.worker), member.key, "stop"), timeout)
            except (asyncio.TimeoutError, ActorMissing) + UNREACHABLE as err:
                logger.warning("env runner %s did not stop cleanly: %r", member.key, err)

        async def stop_all() -> None:
            await asyncio.gather(*(stop_one(m) for m in self.members if m.lost is None))

        if client.status == "running":
            self.run_on_loop(stop_all())
        self._release_all()

    def _release_all(self) -> None:
        # Releasing the creation futures removes the actors from the workers.
        for member in self.members:
            self.release(member)
        self.members = []
