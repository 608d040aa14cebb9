"""``num_env_runners=N>=1``: N :class:`~dlearner.env_runner.EnvRunner` actors sampling in parallel.

Each runner samples ``ceil(num_timesteps / N)`` steps per call; the calls run concurrently and the
fragments come back as a list. New weights go to every runner once per sync, as one message per
runner sent to all runners concurrently. Calls go through the connection's own client (never
Dask's default client), so a group attached with ``.cluster(client=...)``, ``address=`` or
``scheduler_file=`` works like an embedded one.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any, Dict, List, Optional, Sequence

from dlearner import settings
from dlearner.backends.dask.cluster import ClusterConnection, place_env_runners
from dlearner.backends.dask.rpc import UNREACHABLE, ActorMissing, call_actor, worker_rpc
from dlearner.errors import ClusterResourceError, EnvRunnerDiedError

logger = logging.getLogger(__name__)


def env_runner_actor_key(index: int, run_id: str) -> str:
    """Dashboard-readable key of an env-runner actor: ``env-runner-<index>-<run id>``."""
    return f"env-runner-{index}-{run_id}"


class DaskEnvRunnerGroup:
    """Env-runner actors on Dask workers (implements :class:`~dlearner.backends.interface.EnvRunnerGroup`)."""

    def __init__(self, config: Any, module_spec: Any, *, connection: ClusterConnection, run_id: str):
        from dlearner.env_runner import EnvRunner

        self.connection = connection
        self.run_id = run_id
        client = connection.client
        num = int(config.num_env_runners)
        timeout = config.resolved_startup_timeout_s()
        self.workers = place_env_runners(connection, num, timeout)
        self.keys = [env_runner_actor_key(i, run_id) for i in range(num)]
        runner_config = config.copy_for_learner()
        self._creation_futures = [
            client.submit(
                EnvRunner, runner_config, module_spec=module_spec, worker_index=i + 1,
                workers=[address], allow_other_workers=False, actor=True, pure=False, key=key,
            )
            for i, (address, key) in enumerate(zip(self.workers, self.keys))
        ]
        try:
            for future in self._creation_futures:
                future.result(timeout=timeout)
        except TimeoutError as err:
            self._release()
            raise ClusterResourceError(
                f"{num} env runner actor(s) did not start within {timeout:g} s on {connection.description}."
            ) from err
        except BaseException:
            self._release()
            raise

    @property
    def num_runners(self) -> int:
        return len(self.keys)

    def _all(self, method: str, args_per_runner: Sequence[tuple]) -> List[Any]:
        """``method(*args)`` on every runner concurrently; their values in runner order."""
        client = self.connection.client

        async def one(index: int, args: tuple) -> Any:
            address, key = self.workers[index], self.keys[index]
            try:
                return await call_actor(worker_rpc(client, address), key, method, args)
            except UNREACHABLE + (ActorMissing,) as err:
                raise EnvRunnerDiedError(
                    f"Env runner {index} ({key}) on Dask worker {address} is gone ({err!r}) while calling {method}. "
                    "Training cannot go on with it; continue from the last checkpoint (`dlearner train --resume`, "
                    "or algo.restore_from_path in a new Algorithm)."
                ) from err

        async def every() -> List[Any]:
            return list(await asyncio.gather(*(one(i, args) for i, args in enumerate(args_per_runner))))

        return asyncio.run_coroutine_threadsafe(every(), client.loop.asyncio_loop).result()

    def sample(self, num_timesteps: int) -> List[Dict[str, Any]]:
        per_runner = math.ceil(num_timesteps / self.num_runners)
        return self._all("sample", [(per_runner,)] * self.num_runners)

    def sync_weights(self, weights: Any) -> None:
        self._all("set_weights", [(weights,)] * self.num_runners)

    def get_metrics(self) -> List[Dict[str, Any]]:
        return self._all("get_metrics", [()] * self.num_runners)

    def evaluate(self, num_episodes: int, seed: Optional[int] = None) -> Dict[str, Any]:
        """Greedy evaluation episodes on the first runner."""
        client = self.connection.client
        coro = call_actor(worker_rpc(client, self.workers[0]), self.keys[0], "evaluate", (num_episodes,), {"seed": seed})
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
            await asyncio.gather(*(stop_one(a, k) for a, k in zip(self.workers, self.keys)))

        if client.status == "running":
            asyncio.run_coroutine_threadsafe(stop_all(), client.loop.asyncio_loop).result()
        self._release()

    def _release(self) -> None:
        # Releasing the creation futures removes the actors from the workers.
        for future in self._creation_futures:
            future.release()
        self._creation_futures = []
        self.keys = []
