"""Everything in the calling process: one local Learner (``num_learners=0``) and one env runner
(``num_env_runners=0``), behind the same interfaces as the Dask actors (:mod:`.interface`).

The learner runs the same operations (:mod:`dlearner.learner_ops`) as a Dask learner; a request's
ranks, collective flag, result ranks and log topic mean nothing for one learner in this process.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from dlearner.env_runner import EnvRunner
from dlearner.errors import LearnerDiedError


class LocalLearnerPool:
    """``num_learners=0``: one Learner in this process (implements :class:`~dlearner.backends.interface.LearnerPool`).

    Blocking calls run inline. Async requests (and, once one was made, every later call, so order
    is kept) run on one background thread; their futures are ``concurrent.futures.Future`` objects.
    """

    is_local = True
    num_learners = 1
    backend: Optional[str] = None
    metrics_topic: Optional[str] = None
    client: Any = None
    learner_workers: List[str] = []
    learner_keys: List[str] = []
    num_healthy_learners = 1
    num_learner_restarts = 0
    num_updates_retried = 0
    checkpoint_path: Optional[str] = None

    def __init__(self, learner_config: Any, module_spec: Any, learner_class: type):
        self.learner = learner_class(config=learner_config, module_spec=module_spec)
        self.learner.build()
        self._executor: Optional[concurrent.futures.ThreadPoolExecutor] = None

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
        (args,) = args_per_rank
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1,
                thread_name_prefix="dlearner-local-learner",
                # torch's thread count is per thread: give the background thread the learner's.
                initializer=self.learner._set_torch_threads,
            )
        return self._executor.submit(lambda: [target(self.learner, *args)])

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
        (args,) = args_per_rank
        if self._executor is None:
            return [target(self.learner, *args)]  # no async request was made: run inline
        return self.submit(target, args_per_rank).result()  # after the async requests, in order

    def submit_update(
        self,
        target: Callable[..., Any],
        args_for_world: Callable[[int], Sequence[tuple]],
        *,
        log_topic: Optional[str] = None,
        future: bool = False,
    ) -> Tuple[concurrent.futures.Future, Optional[concurrent.futures.Future]]:
        pending = self.submit(target, args_for_world(1))
        return pending, (first_value(pending) if future else None)

    def ensure_ready(self) -> None:
        pass

    def recover(self, err: LearnerDiedError) -> Tuple[bool, Any]:
        raise err  # nothing to recover in this process

    def dead_error(self) -> Optional[LearnerDiedError]:
        return None

    def live_ranks(self) -> List[int]:
        return [0]

    def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        self.learner = None


def first_value(future: concurrent.futures.Future) -> concurrent.futures.Future:
    """A future of ``future.result()[0]`` (cancelled with it)."""
    out: concurrent.futures.Future = concurrent.futures.Future()

    def done(f: concurrent.futures.Future) -> None:
        if f.cancelled():
            out.cancel()
            out.set_running_or_notify_cancel()
            return
        error = f.exception()
        if error is not None:
            out.set_exception(error)
        else:
            out.set_result(f.result()[0])

    future.add_done_callback(done)
    return out


class LocalEnvRunnerGroup:
    """``num_env_runners=0``: one :class:`EnvRunner` in the driver process (implements
    :class:`~dlearner.backends.interface.EnvRunnerGroup`)."""

    num_healthy_env_runners = 1
    num_env_runner_restarts = 0
    num_env_steps_lost = 0

    def __init__(self, config: Any, module_spec: Any, *, runner_class: type = EnvRunner):
        self.runners = [runner_class(config, module_spec=module_spec, worker_index=0)]

    @property
    def num_runners(self) -> int:
        return len(self.runners)

    def sample(self, num_timesteps: int) -> List[Dict[str, np.ndarray]]:
        return [self.runners[0].sample(num_timesteps)]

    def sample_async(self, index: int, num_timesteps: int, *, weights: Any = None) -> concurrent.futures.Future:
        """Sample in the driver now (loading ``weights`` first if given); a finished future of
        ``(fragment, episode metrics)``, so asynchronous loops treat 0 and N env runners alike."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:
            future.set_result(self.runners[index].sample_with_metrics(num_timesteps, weights))
        except Exception as err:  # noqa: BLE001 - delivered through the future, as for remote runners
            future.set_exception(err)
        return future

    def sync_weights(self, weights: Any) -> None:
        self.runners[0].set_weights(weights)

    def foreach_env(self, fn: Callable[[Any], Any]) -> List[List[Any]]:
        """``fn(env)`` on every env of the runner: ``[[value per env]]`` (see the interface)."""
        return [runner.foreach_env(fn) for runner in self.runners]

    def replace_lost(self, err: BaseException, lost_env_steps: int = 0) -> None:
        raise err  # a runner in this process is never lost on its own

    def get_metrics(self) -> List[Dict[str, Any]]:
        return [self.runners[0].get_metrics()]

    def evaluate(self, num_episodes: int, seed: Optional[int] = None) -> Dict[str, Any]:
        return self.runners[0].evaluate(num_episodes, seed=seed)

    def add_module(self, config: Any, module_spec: Any, module_id: str, weights: Any) -> None:
        self.runners[0].add_module(module_id, module_spec.rl_module_specs[module_id], weights, config)

    def remove_module(self, config: Any, module_spec: Any, module_id: str) -> None:
        self.runners[0].remove_module(module_id, config)

    def get_state(self) -> List[Dict[str, Any]]:
        return [r.get_state() for r in self.runners]

    def set_state(self, states: Sequence[Mapping[str, Any]]) -> None:
        for runner, state in zip(self.runners, states):
            runner.set_state(state)

    def stop(self) -> None:
        for runner in self.runners:
            runner.stop()
