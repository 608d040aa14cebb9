"""``num_env_runners=N>=1``: N :class:`~dlearner.env_runner.EnvRunner` actors sampling in parallel.

Each runner samples ``ceil(num_timesteps / N)`` steps per call; the calls run concurrently and the
fragments come back as a list. New weights go to every runner once per sync, as one message per
runner sent to all runners concurrently. Calls go through the connection's own client (never
Dask's default client), so a group attached with ``.cluster(client=...)``, ``address=`` or
``scheduler_file=`` works like an embedded one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
from typing import Any, Callable, Dict, List, Optional, Sequence

from dlearner import settings
from dlearner.backends.dask.cluster import ClusterConnection, place_env_runners
from dlearner.backends.dask.rpc import UNREACHABLE, ActorMissing, call_actor, worker_rpc
from dlearner.errors import ClusterResourceError, EnvRunnerDiedError

logger = logging.getLogger(__name__)


def _runner_died(index: int, key: str, address: str, err: Any, method: str) -> EnvRunnerDiedError:
    why = err if isinstance(err, str) else repr(err)
    died = EnvRunnerDiedError(
        f"Env runner {index} ({key}) on Dask worker {address} is gone ({why}) while calling {method}. "
        "Training cannot go on with it; continue from the last checkpoint (`dlearner train --resume`, "
        "or algo.restore_from_path in a new Algorithm), or enable "
        "config.fault_tolerance(restart_failed_env_runners=True)."
    )
    died.runner_index = index
    return died


def env_runner_actor_key(index: int, run_id: str) -> str:
    """Dashboard-readable key of an env-runner actor: ``env-runner-<index>-<run id>``."""
    return f"env-runner-{index}-{run_id}"


class DaskEnvRunnerGroup:
    """Env-runner actors on Dask workers (implements :class:`~dlearner.backends.interface.EnvRunnerGroup`)."""

    def __init__(self, config: Any, module_spec: Any, *, connection: ClusterConnection, run_id: str):
        self.connection = connection
        self.run_id = run_id
        num = int(config.num_env_runners)
        self._timeout_s = config.resolved_startup_timeout_s()
        self._runner_config = config.copy_for_learner()
        self._module_spec = module_spec
        self._restart = bool(getattr(config, "restart_failed_env_runners", False))
        self._max_restarts = int(getattr(config, "max_num_env_runner_restarts", 0) or 0)
        #: Env runners started to replace lost ones, and env steps lost with them (counted, never hidden).
        self.num_env_runner_restarts = 0
        self.num_env_steps_lost = 0
        self._weights: Any = None  # the last weights synced: a replacement starts from them
        self.workers = place_env_runners(connection, num, self._timeout_s)
        self.keys = [env_runner_actor_key(i, run_id) for i in range(num)]
        self._creation_futures: List[Any] = [None] * num
        # Set (from the client's event loop) when a runner's worker leaves: calls fail at once
        # instead of waiting for a connect timeout.
        self._lost: List[Optional[str]] = [None] * num
        self._unwatch: List[Optional[Callable[[], None]]] = [None] * num
        try:
            for i in range(num):
                self._creation_futures[i] = self._submit_runner(i)
            for future in self._creation_futures:
                future.result(timeout=self._timeout_s)
        except TimeoutError as err:
            self._release()
            raise ClusterResourceError(
                f"{num} env runner actor(s) did not start within {self._timeout_s:g} s on {connection.description}."
            ) from err
        except BaseException:
            self._release()
            raise

    def _submit_runner(self, index: int) -> Any:
        from dlearner.env_runner import EnvRunner

        self._lost[index] = None
        if self._unwatch[index] is not None:
            self._unwatch[index]()  # type: ignore[misc]
        self._unwatch[index] = self.connection.watch_worker(self.workers[index], lambda why, i=index: self._mark_lost(i, why))
        return self.connection.client.submit(
            EnvRunner, self._runner_config, module_spec=self._module_spec, worker_index=index + 1,
            workers=[self.workers[index]], allow_other_workers=False, actor=True, pure=False, key=self.keys[index],
        )

    def _mark_lost(self, index: int, why: str) -> None:
        self._lost[index] = why

    @property
    def num_healthy_env_runners(self) -> int:
        """Env runners whose worker is still in the cluster."""
        return sum(1 for why in self._lost if why is None)

    def _replace(self, index: int, err: BaseException) -> None:
        """Start a new runner in place of runner ``index`` on a live worker, with the last synced weights."""
        if self.num_env_runner_restarts >= self._max_restarts:
            raise EnvRunnerDiedError(
                f"Env runner {index} is gone ({err!r}) and max_num_env_runner_restarts={self._max_restarts} is reached."
            ) from err
        self.num_env_runner_restarts += 1
        lost = self.keys[index]
        old = self._creation_futures[index]
        if old is not None:
            old.release()
        # A worker that hosts no learner and no other runner of this group, if there is one.
        others = [w for i, w in enumerate(self.workers) if i != index and self._lost[i] is None]
        lost_workers = [w for i, w in enumerate(self.workers) if i == index or self._lost[i] is not None]
        self.workers[index] = place_env_runners(self.connection, 1, self._timeout_s, avoid=others, exclude=lost_workers)[0]
        self.keys[index] = f"{env_runner_actor_key(index, self.run_id)}-r{self.num_env_runner_restarts}"
        self._creation_futures[index] = self._submit_runner(index)
        self._creation_futures[index].result(timeout=self._timeout_s)
        logger.warning("Env runner %s was lost (%r); %s replaces it on %s.", lost, err, self.keys[index], self.workers[index])
        if self._weights is not None:
            self._all("set_weights", [(self._weights,) if i == index else None for i in range(self.num_runners)])

    @property
    def num_runners(self) -> int:
        return len(self.keys)

    def _all(self, method: str, args_per_runner: Sequence[Optional[tuple]]) -> List[Any]:
        """``method(*args)`` on every runner (``None`` args: skip that runner) concurrently; their
        values in runner order. A lost runner is replaced and its call made again once (with
        ``restart_failed_env_runners``); otherwise :class:`EnvRunnerDiedError` says what to do."""
        for _ in range(self.num_runners + 1):  # one worker may have hosted several runners
            try:
                return self._call_all(method, args_per_runner)
            except EnvRunnerDiedError as err:
                index = err.runner_index
                lost = int(args_per_runner[index][0]) if method == "sample" and index is not None and args_per_runner[index] else 0  # type: ignore[index]
                self.replace_lost(err, lost)
        return self._call_all(method, args_per_runner)

    def replace_lost(self, err: EnvRunnerDiedError, lost_env_steps: int = 0) -> None:
        """After ``err`` from a lost runner: with ``restart_failed_env_runners``, a replacement starts
        on a live worker with the last synced weights and ``lost_env_steps`` (what the lost runner
        was sampling) are counted in :attr:`num_env_steps_lost`; otherwise ``err`` is raised."""
        if not self._restart or err.runner_index is None:
            raise err
        self._replace(err.runner_index, err)
        self.num_env_steps_lost += int(lost_env_steps)

    def _call_all(self, method: str, args_per_runner: Sequence[Optional[tuple]]) -> List[Any]:
        client = self.connection.client

        async def one(index: int, args: Optional[tuple]) -> Any:
            if args is None:
                return None
            return await self._call_one(index, method, args)

        async def every() -> List[Any]:
            return list(await asyncio.gather(*(one(i, args) for i, args in enumerate(args_per_runner))))

        return asyncio.run_coroutine_threadsafe(every(), client.loop.asyncio_loop).result()

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
        client = self.connection.client
        return asyncio.run_coroutine_threadsafe(
            self._call_one(index, "sample_with_metrics", (num_timesteps, weights)), client.loop.asyncio_loop
        )

    async def _call_one(self, index: int, method: str, args: tuple, kwargs: Optional[Dict[str, Any]] = None) -> Any:
        """``method`` on runner ``index`` (on the client's loop); :class:`EnvRunnerDiedError` as soon
        as its worker is known to be gone, in flight or not."""
        address, key = self.workers[index], self.keys[index]
        if self._lost[index] is not None:
            raise _runner_died(index, key, address, self._lost[index], method)
        call = asyncio.ensure_future(call_actor(worker_rpc(self.connection.client, address), key, method, args, kwargs))
        while not call.done():
            await asyncio.wait({call}, timeout=0.25)
            if not call.done() and self._lost[index] is not None:
                call.cancel()
                raise _runner_died(index, key, address, self._lost[index], method)
        try:
            return call.result()
        except UNREACHABLE + (ActorMissing,) as err:
            raise _runner_died(index, key, address, err, method) from err

    def sync_weights(self, weights: Any) -> None:
        self._weights = weights
        self._all("set_weights", [(weights,)] * self.num_runners)

    def get_metrics(self) -> List[Dict[str, Any]]:
        return self._all("get_metrics", [()] * self.num_runners)

    def evaluate(self, num_episodes: int, seed: Optional[int] = None) -> Dict[str, Any]:
        """Greedy evaluation episodes on the first runner."""
        client = self.connection.client
        coro = self._call_one(0, "evaluate", (num_episodes,), {"seed": seed})
        return asyncio.run_coroutine_threadsafe(coro, client.loop.asyncio_loop).result()

    def get_state(self) -> List[Dict[str, Any]]:
        return self._all("get_state", [()] * self.num_runners)

    def set_state(self, states: Sequence[Dict[str, Any]]) -> None:
        self._all("set_state", [(state,) for state in states][: self.num_runners])

    def stop(self) -> None:
        """Stop every runner that still answers, then release all of them (never raises for a lost runner)."""
        if not self.keys:
            return
        timeout = settings.seconds("env-runners.stop-timeout")
        client = self.connection.client

        async def stop_one(address: str, key: str) -> None:
            try:
                await asyncio.wait_for(call_actor(worker_rpc(client, address), key, "stop"), timeout)
            except (asyncio.TimeoutError, ActorMissing) + UNREACHABLE as err:
                logger.warning("env runner %s did not stop cleanly: %r", key, err)

        async def stop_all() -> None:
            await asyncio.gather(*(stop_one(a, k) for a, k, lost in zip(self.workers, self.keys, self._lost) if lost is None))

        if client.status == "running":
            asyncio.run_coroutine_threadsafe(stop_all(), client.loop.asyncio_loop).result()
        self._release()

    def _release(self) -> None:
        # Releasing the creation futures removes the actors from the workers.
        for future in self._creation_futures:
            if future is not None:
                future.release()
        for unwatch in self._unwatch:
            if unwatch is not None:
                unwatch()
        self._creation_futures, self._unwatch, self._lost = [], [], []
        self.keys = []
