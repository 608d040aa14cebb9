"""The Algorithm: sampling, learning and weight sync in a loop, plus evaluation and checkpoints.

``Algorithm`` holds the machinery; an algorithm subclass (``PPO``) only writes its
:meth:`Algorithm.training_step`, the way dask-jobqueue's batch systems override a few methods of one
core class.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np

from dlearner.callbacks import CustomMetrics, call_callback, make_callbacks
from dlearner.columns import TIMESTEP_KEY
from dlearner.env_runner import EpisodeStats

logger = logging.getLogger(__name__)

#: Counters of what fault tolerance replaced and lost; kept in checkpoints, so ``--resume`` goes on counting.
_FAULT_COUNTERS = ("num_learner_restarts", "num_env_runner_restarts", "num_env_steps_lost")


class Algorithm:
    """Trains a config end to end. Build it with ``config.build_algo()``.

    Example::

        algo = PPOConfig().environment("CartPole-v1").build_algo()
        for _ in range(10):
            result = algo.train()
        print(result["env_runners"]["episode_return_mean"])
        algo.stop()
    """

    def __init__(self, config: Any):
        config.validate()
        if config.env is None:
            raise ValueError("No environment configured: call config.environment('CartPole-v1') before build_algo().")
        self.config = config.copy()
        env = self.config.make_env()  # once, for the spaces and to tell single- from multi-agent
        try:
            #: Whether the env is a multi-agent env (``MultiAgentEnv`` or PettingZoo ``ParallelEnv``).
            self.is_multi_agent = self.config.is_multi_agent(env)
            self.module_spec = self.config.get_multi_rl_module_spec(env=env)
        finally:
            env.close()
        self.algo_id = uuid.uuid4().hex[:8]
        #: The run's name in TensorBoard and MLflow (``config.reporting(loggers=...)``) and in their default
        #: folder ``./dlearner_logs/<run_name>``; set it before the first :meth:`train` to choose your own.
        self.run_name: str = f"{type(self).__name__.lower()}-{self.config.env}-{self.algo_id}"
        #: Name of this run on the dashboard page; ``None`` stops :meth:`train` from publishing there.
        self.dashboard_run_name: Optional[str] = self.run_name
        self._dashboard_status: Optional[str] = None  # the last status told to the page
        self._result_loggers: Optional[List[Any]] = None  # built by the first train(), after a restore
        self._train_error: Optional[BaseException] = None  # what the last train() raised: the loggers' final status
        self._connection = None
        self._learner_group = None
        self._env_runner_group = None
        #: The driver's instance of ``config.callbacks_class`` (env runners build their own).
        self.callbacks = make_callbacks(self.config.callbacks_class)
        try:
            self._connection = self._connect()
            self._learner_group = self._build_learner_group()
            self._env_runner_group = self._build_env_runner_group()
            self._env_runner_group.sync_weights(self._learner_group.get_weights())
        except BaseException:
            self.stop()
            raise
        self.episode_stats = EpisodeStats(self.config.metrics_num_episodes_for_smoothing)
        self._runner_steps_seen: Dict[str, int] = {}
        self._runner_agent_steps_seen: Dict[str, int] = {}
        self._runner_time_seen: Dict[str, float] = {}  # time_total_s at each runner's previous report
        self.iteration = 0
        self.num_env_steps_sampled_lifetime = 0
        self.num_env_steps_trained_lifetime = 0
        self.num_agent_steps_sampled_lifetime = 0
        self.num_episodes_lifetime = 0
        self.time_total_s = 0.0
        # Restarts and lost env steps of the run before the checkpoint this algorithm was restored from.
        self._fault_counts_before: Dict[str, int] = dict.fromkeys(_FAULT_COUNTERS, 0)
        # What callbacks logged in the env runners, reduced into result["env_runners"].
        self.custom_metrics = CustomMetrics(self.config.metrics_num_episodes_for_smoothing)
        try:
            call_callback(self.callbacks, "on_algorithm_init", where="at the end of building the Algorithm", algorithm=self)
        except BaseException:
            self.stop()
            raise

    def _connect(self):
        """One cluster for learners and env runners: attached as configured, or an embedded
        ``LocalCluster`` this algorithm owns, with a worker process per learner and per env runner.
        Everything in this process and no cluster named: no cluster at all. (A named cluster is
        attached even then: its dashboard shows the run.)"""
        num_workers = self.config.num_learners + self.config.num_env_runners
        named = self.config.client is not None or self.config.address is not None or self.config.scheduler_file is not None
        if num_workers == 0 and not named:
            return None
        from dlearner.backends.dask.cluster import connect

        return connect(self.config, num_workers)

    def _build_learner_group(self):
        """The LearnerGroup, on this algorithm's connection (so it never owns a cluster of its own)."""
        from dlearner.learner_group import LearnerGroup

        self.config.validate()
        return LearnerGroup(config=self.config, module_spec=self.module_spec, connection=self._connection)

    def _build_env_runner_group(self):
        if self.is_multi_agent:
            from dlearner.multi_agent.env_runner import MultiAgentEnvRunner as runner_class
        else:
            from dlearner.env_runner import EnvRunner as runner_class
        if self.config.num_env_runners == 0:
            from dlearner.backends.local import LocalEnvRunnerGroup

            return LocalEnvRunnerGroup(self.config, self.module_spec, runner_class=runner_class)
        from dlearner.backends.dask.env_runners import DaskEnvRunnerGroup

        return DaskEnvRunnerGroup(
            self.config, self.module_spec, connection=self._connection, run_id=self.algo_id, runner_class=runner_class
        )

    @property
    def client(self):
        """The ``distributed.Client`` the actors run through, or ``None`` when everything is in this process."""
        return None if self._connection is None else self._connection.client

    @property
    def dashboard_url(self) -> Optional[str]:
        """The dlearner page on the cluster's dashboard (``None`` without a cluster, or if the page
        could not be added; the reason was logged)."""
        return None if self._connection is None else self._connection.dashboard_url

    @property
    def learner_group(self):
        """The :class:`~dlearner.learner_group.LearnerGroup` that trains the modules."""
        return self._learner_group

    @property
    def env_runner_group(self):
        """The env runners (in this process, or Dask actors): ``foreach_env(fn)`` changes their
        environments (a curriculum, from ``Callbacks.on_train_result``); see
        :class:`~dlearner.backends.interface.EnvRunnerGroup`."""
        return self._env_runner_group

    # -------------------------------------------------------------------------------- training
    def train(self) -> Dict[str, Any]:
        """One iteration: sample, update, sync weights. Returns a nested dict of plain numbers."""
        if self._result_loggers is None:
            self._start_result_loggers()  # before the clock starts: the iteration's time is its work's
        start = time.perf_counter()
        if self._dashboard_status != "running":
            self._publish_dashboard_status("running")
        try:
            learner_results, num_sampled = self.training_step()
        except BaseException as err:
            self._train_error = err
            self._publish_dashboard_status("stopped" if isinstance(err, KeyboardInterrupt) else "failed", err)
            raise
        self._train_error = None
        self.iteration += 1
        self.num_env_steps_sampled_lifetime += num_sampled
        runner_reports = self.collect_episode_metrics()
        for metrics in runner_reports:
            self.episode_stats.add(metrics)
            self.custom_metrics.add(metrics.get("custom"))
            self.num_episodes_lifetime += len(metrics["episode_returns"])
        extra_results = self.iteration_results()
        # The time this iteration's work took: this call, or the window an asynchronous algorithm
        # reports (its pipeline samples and updates between calls too, e.g. during save_to_path).
        elapsed = float(extra_results.get("time_this_iter_s", time.perf_counter() - start))
        self.time_total_s += elapsed
        runners = self._per_runner(runner_reports, elapsed)  # counts the agent steps too
        result = {
            "training_iteration": self.iteration,
            "env_runners": {
                **self.episode_stats.summary(),
                **self.custom_metrics.summary(),  # what callbacks logged (keys never clash: MetricsLogger checks)
                "num_episodes_lifetime": self.num_episodes_lifetime,
                "runners": runners,
            },
            "learners": learner_results,
            "num_env_steps_sampled_lifetime": self.num_env_steps_sampled_lifetime,
            "num_env_steps_trained_lifetime": self.num_env_steps_trained_lifetime,
            "num_agent_steps_sampled_lifetime": self.num_agent_steps_sampled_lifetime,
            "time_this_iter_s": elapsed,
            "time_total_s": self.time_total_s,
            "env_steps_per_s": num_sampled / elapsed if elapsed > 0 else float("nan"),
            # Fault tolerance (config.fault_tolerance): what was lost and replaced, never hidden.
            "num_healthy_learners": self._learner_group.num_healthy_learners,
            "num_learner_restarts": self._fault_count("num_learner_restarts"),
            "num_healthy_env_runners": self._env_runner_group.num_healthy_env_runners,
            "num_env_runner_restarts": self._fault_count("num_env_runner_restarts"),
            "num_env_steps_lost": self._fault_count("num_env_steps_lost"),
            **extra_results,
        }
        try:
            # Before publishing: what the callback adds to the result is reported too.
            call_callback(
                self.callbacks, "on_train_result", where=f"after iteration {self.iteration}", algorithm=self, result=result
            )
        except BaseException as err:
            self._train_error = err  # the run failed: the loggers' final status says so
            self._publish_dashboard_status("stopped" if isinstance(err, KeyboardInterrupt) else "failed", err)
            raise
        if self.client is not None and self.dashboard_run_name is not None:
            from dlearner.dashboard import publish_metrics

            publish_metrics(self.client, self.dashboard_run_name, result)  # fire-and-forget
        for result_logger in self._result_loggers:
            result_logger.log_result(result, self.iteration)  # never raises a write error: it warns once
        return result

    @property
    def result_loggers(self) -> List[Any]:
        """The :class:`~dlearner.loggers.ResultLogger` s writing this run's results (built by the first
        :meth:`train` from ``config.reporting(loggers=...)``; empty before it)."""
        return list(self._result_loggers or [])

    def _start_result_loggers(self) -> None:
        """Build the loggers and write the hyper-parameters, once per run. At the first train(), so that a
        restored run's steps go on from its restored iteration (and ``evaluate`` alone writes nothing)."""
        self._result_loggers = []
        if not self.config.loggers:
            return
        from dlearner.loggers import build_loggers

        self._result_loggers = build_loggers(self.config, self.run_name, start_iteration=self.iteration)
        hyperparameters = self.config.to_dict()
        for result_logger in self._result_loggers:
            result_logger.log_hyperparameters(hyperparameters)

    def _close_result_loggers(self) -> None:
        """End the loggers' runs: FINISHED, or FAILED / KILLED (Ctrl-C) when the last train() raised."""
        result_loggers, self._result_loggers = self._result_loggers or [], None
        error = self._train_error
        status = "FINISHED" if error is None else "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        for result_logger in result_loggers:
            result_logger.close(status)

    def _publish_dashboard_status(self, status: str, error: Optional[BaseException] = None) -> None:
        """Tell the dashboard page this run is running / finished / failed / stopped (never raises:
        the page is an extra). Final statuses wait briefly, since the client may close next."""
        if self.client is None or self.dashboard_run_name is None:
            return
        from dlearner.dashboard import publish_status

        self._dashboard_status = status
        try:
            publish_status(
                self.client, self.dashboard_run_name, status, error, algorithm=self, wait=status != "running", timeout_s=5
            )
        except Exception as err:  # noqa: BLE001 - a lost scheduler must not hide the run's own outcome
            logger.warning("Could not send the status of run %r to the dashboard: %s", self.dashboard_run_name, err)

    def training_step(self):
        """Sample, learn and sync once; returns ``(learner results, env steps sampled)``. Algorithms override."""
        raise NotImplementedError(f"{type(self).__name__} must implement training_step().")

    def _per_runner(self, reports: List[Dict[str, Any]], elapsed: float) -> Dict[str, Dict[str, float]]:
        """Each env runner's figures this iteration, keyed by its index (``"1"``, ``"2"``, ...; ``"0"``
        samples in the driver): env steps per second, episodes, lifetime counters.

        A runner's env steps/s is the steps since its previous report over the iterations' time since
        then: an asynchronous runner may deliver nothing in one iteration and twice as much in the next."""
        out: Dict[str, Dict[str, float]] = {}
        for report in reports:
            index = str(int(report.get("worker_index", 0)))
            steps = int(report.get("num_env_steps_sampled_lifetime", 0))
            entry = out.setdefault(index, {"episodes_this_iter": 0, "env_steps_this_iter": 0})
            entry["episodes_this_iter"] += len(report.get("episode_returns", ()))
            entry["num_env_steps_sampled_lifetime"] = steps
            entry["_agent_steps_lifetime"] = int(report.get("num_agent_steps_sampled_lifetime", steps))
            entry["num_episodes_lifetime"] = int(report.get("num_episodes_lifetime", 0))
        for index, entry in out.items():
            # A replaced runner starts counting from 0 again: never a negative rate.
            before = self._runner_steps_seen.get(index, 0)
            now = int(entry["num_env_steps_sampled_lifetime"])
            entry["env_steps_this_iter"] = now - before if now >= before else now
            # time_total_s already counts this iteration. A runner's first report counts from the run's
            # start (as its lifetime counter does); a restore may have set time_total_s back: this iteration.
            span = self.time_total_s - self._runner_time_seen.get(index, 0.0)
            span = span if span >= elapsed else elapsed
            entry["env_steps_per_s"] = entry["env_steps_this_iter"] / span if span > 0 else float("nan")
            self._runner_steps_seen[index] = now
            self._runner_time_seen[index] = self.time_total_s
            # Agent steps (multi-agent runners count them; a single-agent step is one agent step).
            agents_now = int(entry.pop("_agent_steps_lifetime", now))
            before = self._runner_agent_steps_seen.get(index, 0)
            self.num_agent_steps_sampled_lifetime += agents_now - before if agents_now >= before else agents_now
            self._runner_agent_steps_seen[index] = agents_now
        return out

    def collect_episode_metrics(self) -> List[Dict[str, Any]]:
        """Episode statistics of the env runners since the last iteration (one dict per runner report)."""
        return self._env_runner_group.get_metrics()

    def iteration_results(self) -> Dict[str, Any]:
        """Extra top-level entries of this iteration's result (asynchronous algorithms report policy lag here)."""
        return {}

    def modules_to_train(self, batch: Mapping[str, Any]) -> List[str]:
        """The module ids of a multi-agent ``batch`` that ``policies_to_train`` trains (the others only act)."""
        from dlearner.multi_agent.mapping import modules_to_train

        return modules_to_train(self.config.policies_to_train, list(batch), batch)

    def timesteps(self, num_sampled: int = 0) -> Dict[str, int]:
        """The ``timesteps`` dict passed to learner updates (drives learning-rate schedules)."""
        return {TIMESTEP_KEY: self.num_env_steps_sampled_lifetime + num_sampled}

    def evaluate(
        self,
        num_episodes: Optional[int] = None,
        *,
        seed: Optional[int] = None,
        gif_path: Optional[Union[str, "os.PathLike[str]"]] = None,
        gif_max_frames: Optional[int] = None,
    ) -> Dict[str, Any]:
        """Greedy episodes with the current weights; returns ``{"env_runners": {"episode_return_mean": ...}}``.

        With ``gif_path``, the first episode is also written there as an animated GIF (its first
        ``gif_max_frames`` frames, 1000 by default, of ``env.render()``, the env made with ``render_mode="rgb_array"``;
        single-agent envs that render RGB arrays). The episodes then run in this process, with the
        learners' current weights, so frames never cross the network; the result's ``gif_frames``
        says how many frames the GIF holds.
        """
        num_episodes = num_episodes or self.config.evaluation_num_episodes
        recording: Dict[str, Any] = {}
        if gif_path is None:
            out = self._env_runner_group.evaluate(num_episodes, seed=seed)
        else:
            out, recording["gif_frames"] = self._evaluate_recording(num_episodes, seed, gif_path, gif_max_frames)
        returns = out["episode_returns"]
        return {
            "env_runners": {
                "episode_return_mean": float(np.mean(returns)),
                "episode_return_min": float(np.min(returns)),
                "episode_return_max": float(np.max(returns)),
                "episode_len_mean": float(np.mean(out["episode_lengths"])),
                "num_episodes": len(returns),
                "episode_returns": [float(r) for r in returns],
                **(
                    {
                        "agent_episode_returns_mean": {
                            a: float(np.mean(v)) for a, v in sorted(out["agent_episode_returns"].items())
                        }
                    }
                    if out.get("agent_episode_returns")
                    else {}
                ),
                **recording,
            }
        }

    def _evaluate_recording(
        self, num_episodes: int, seed: Optional[int], gif_path: Union[str, "os.PathLike[str]"], max_frames: Optional[int]
    ) -> Tuple[Dict[str, Any], int]:
        """:meth:`evaluate`'s episodes on an env runner in this process, the first one recorded to ``gif_path``."""
        from dlearner.env_runner import EnvRunner
        from dlearner.envs.recording import GifRecorder

        if self.is_multi_agent:
            raise ValueError("evaluate(gif_path=...) records single-agent episodes; this run's env is multi-agent.")
        # Checks max_frames before any env is made.
        recorder = GifRecorder() if max_frames is None else GifRecorder(max_frames=max_frames)
        runner = EnvRunner(self.config, module_spec=self.module_spec)
        try:
            runner.set_weights(self._learner_group.get_weights())
            out = runner.evaluate(num_episodes, seed=seed, recorder=recorder)
        finally:
            runner.stop()
        return out, recorder.save(gif_path)

    # ------------------------------------------------------------------------- multi-agent
    def add_module(
        self,
        module_id: str,
        module_spec: Any = None,
        *,
        new_agent_to_module_mapping_fn: Any = None,
        new_should_module_be_updated: Any = None,
    ):
        """Add a module to a multi-agent run: learners train it (unless ``new_should_module_be_updated``,
        the new ``policies_to_train``, leaves it out) and env runners act with it for the agents
        ``new_agent_to_module_mapping_fn`` maps to it in episodes that start from now on.

        ``module_spec`` (an ``RLModuleSpec`` or ``None``) takes missing spaces from the agents mapped
        to it. Everything is checked before anything changes. Returns the new ``MultiRLModuleSpec``.

        Example (a frozen copy of ``p0`` for self-play)::

            algo.add_module("p0_v1", new_agent_to_module_mapping_fn=league_mapping, new_should_module_be_updated=["p0"])
            algo.learner_group.set_weights({"p0_v1": algo.learner_group.get_weights(["p0"])["p0"]})
        """
        from dlearner.rl_module import validate_module_id

        self._check_multi_agent("add_module")
        validate_module_id(module_id)
        if module_id in self.module_spec.rl_module_specs:
            raise ValueError(f"Module {module_id!r} already exists; remove it first or pick another id.")
        policies = self._current_policies()
        policies[module_id] = module_spec
        config, spec = self._module_change(policies, new_agent_to_module_mapping_fn, new_should_module_be_updated)
        self._before_module_change()
        self._learner_group.add_module(module_id=module_id, module_spec=spec.rl_module_specs[module_id])
        self._apply_module_change(config)
        weights = self._learner_group.get_weights([module_id])[module_id]
        self._env_runner_group.add_module(self.config, self.module_spec, module_id, weights)
        self._after_module_change()
        return self.module_spec

    def remove_module(
        self, module_id: str, *, new_agent_to_module_mapping_fn: Any = None, new_should_module_be_updated: Any = None
    ):
        """Remove a module from a multi-agent run (learners and env runners); the mapping must no
        longer name it. Returns the remaining ``MultiRLModuleSpec``."""
        self._check_multi_agent("remove_module")
        if module_id not in self.module_spec.rl_module_specs:
            raise ValueError(f"Unknown module {module_id!r}; modules are {sorted(self.module_spec.rl_module_specs)}.")
        policies = self._current_policies()
        del policies[module_id]
        if not policies:
            raise ValueError(f"Module {module_id!r} is the last one; a run needs at least one module.")
        config, _ = self._module_change(policies, new_agent_to_module_mapping_fn, new_should_module_be_updated)
        self._before_module_change()
        self._learner_group.remove_module(module_id)
        self._apply_module_change(config)
        self._env_runner_group.remove_module(self.config, self.module_spec, module_id)
        self._after_module_change()
        return self.module_spec

    def _check_multi_agent(self, method: str) -> None:
        if not self.is_multi_agent:
            raise ValueError(
                f"{method}() changes the modules of a multi-agent run, but {self.config.env!r} is a single-agent env; "
                "use learner_group.add_module/remove_module to manage a LearnerGroup's modules directly."
            )

    def _current_policies(self) -> Dict[str, Any]:
        """``{module_id: the spec the user gave or None}`` for the run's modules now."""
        given = self.config.policies or {}
        return {mid: given.get(mid) for mid in self.module_spec.rl_module_specs}

    def _module_change(self, policies, mapping_fn, policies_to_train):
        """The config after an add/remove and its module specs, checked against the env's agents (nothing changes yet)."""
        config = self.config.copy()
        config.multi_agent(policies=policies)
        if mapping_fn is not None:
            config.multi_agent(policy_mapping_fn=mapping_fn)
        if policies_to_train is not None:
            config.multi_agent(policies_to_train=policies_to_train)
        config.validate()
        return config, config.get_multi_rl_module_spec()

    def _apply_module_change(self, config) -> None:
        self.config.multi_agent(
            policies=config.policies, policy_mapping_fn=config.policy_mapping_fn, policies_to_train=config.policies_to_train
        )
        # The group applies policies_to_train to every batch in the driver.
        self._learner_group.config.policies_to_train = config.policies_to_train
        self.module_spec = self._learner_group.module_spec

    # Hooks around restores and module changes (asynchronous algorithms finish their updates in
    # flight before, and drop samples that can no longer be trained after).
    def _before_module_change(self) -> None:
        pass

    def _after_module_change(self) -> None:
        pass

    def _before_restore(self) -> None:
        pass

    def _after_restore(self) -> None:
        pass

    # ---------------------------------------------------------------------------------- state
    def get_counters(self) -> Dict[str, Any]:
        return {
            "iteration": self.iteration,
            "num_env_steps_sampled_lifetime": self.num_env_steps_sampled_lifetime,
            "num_env_steps_trained_lifetime": self.num_env_steps_trained_lifetime,
            "num_episodes_lifetime": self.num_episodes_lifetime,
            "time_total_s": self.time_total_s,
            "num_agent_steps_sampled_lifetime": self.num_agent_steps_sampled_lifetime,
            **self.episode_stats.get_state(),
            "recent_custom_metrics": self.custom_metrics.get_state(),
            **{name: self._fault_count(name) for name in _FAULT_COUNTERS},
        }

    def set_counters(self, counters: Mapping[str, Any]) -> None:
        self.iteration = int(counters["iteration"])
        self.num_env_steps_sampled_lifetime = int(counters["num_env_steps_sampled_lifetime"])
        self.num_env_steps_trained_lifetime = int(counters["num_env_steps_trained_lifetime"])
        self.num_episodes_lifetime = int(counters["num_episodes_lifetime"])
        self.time_total_s = float(counters["time_total_s"])
        self.num_agent_steps_sampled_lifetime = int(counters.get("num_agent_steps_sampled_lifetime", 0))
        self.episode_stats.set_state(counters)
        self.custom_metrics.set_state(counters.get("recent_custom_metrics"))
        # The run's restarts and losses go on from the checkpoint's (absent in older checkpoints: none).
        for name in _FAULT_COUNTERS:
            self._fault_counts_before[name] = int(counters.get(name, 0)) - self._group_fault_count(name)

    def _fault_count(self, name: str) -> int:
        """A restart or loss counter over the whole run, restores included."""
        return self._fault_counts_before[name] + self._group_fault_count(name)

    def _group_fault_count(self, name: str) -> int:
        group = self._learner_group if name == "num_learner_restarts" else self._env_runner_group
        return int(getattr(group, name))

    def save_to_path(self, path, *, storage_options: Optional[dict] = None) -> str:
        """Learners, env-runner state and counters in one Zarr v3 store; returns ``path``."""
        from dlearner.checkpoint import objects

        return objects.save_algorithm(self, path, storage_options=storage_options)

    def restore_from_path(self, path, *, storage_options: Optional[dict] = None) -> None:
        """Continue from a checkpoint written by :meth:`save_to_path`."""
        from dlearner.checkpoint import objects

        self._before_restore()
        objects.restore_algorithm(self, path, storage_options=storage_options)
        self._env_runner_group.sync_weights(self._learner_group.get_weights())
        self._after_restore()
        call_callback(self.callbacks, "on_checkpoint_loaded", where=f"after restoring {path}", algorithm=self, path=str(path))

    def stop(self) -> None:
        """Stop env runners and learners, and close the embedded cluster if this algorithm started one.
        A cluster you attached to keeps running."""
        if self._dashboard_status == "running":
            self._publish_dashboard_status("finished")
        # Each step runs even if an earlier one raised (a lost worker): stop() always releases everything.
        env_runner_group, self._env_runner_group = self._env_runner_group, None
        learner_group, self._learner_group = self._learner_group, None
        connection, self._connection = self._connection, None
        try:
            self._close_result_loggers()
        finally:
            try:
                if env_runner_group is not None:
                    env_runner_group.stop()
            finally:
                try:
                    if learner_group is not None:
                        learner_group.shutdown()
                finally:
                    if connection is not None:
                        connection.close()

    def __enter__(self) -> "Algorithm":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
