"""Callbacks (``config.callbacks(...)``): episode hooks in env runners, metrics they log reduced into
``result["env_runners"]``, driver hooks, errors that name the callback, a curriculum through
``env_runner_group.foreach_env``, the dashboard, and env-runner actors on a real LocalCluster."""

from __future__ import annotations

import importlib.util
import logging
import math
import pathlib
import re

import distributed
import gymnasium as gym
import numpy as np
import pytest
from gymnasium.envs.classic_control import CartPoleEnv
from gymnasium.vector import AutoresetMode

from dlearner import Callbacks, IMPALAConfig, PPOConfig
from dlearner.callbacks import CustomMetrics, callbacks_from_path, sub_env_info
from dlearner.config import AlgorithmConfig
from dlearner.dashboard.html import CUSTOM_METRICS_TITLE, env_runners_table, run_charts
from dlearner.dashboard.protocol import KIND_TRAIN, sanitize
from dlearner.dashboard.store import MetricsStore
from dlearner.env_runner import EnvRunner
from dlearner.envs import MultiAgentCartPole
from dlearner.errors import CallbackError
from dlearner.multi_agent.env_runner import MultiAgentEnvRunner

ROOT = pathlib.Path(__file__).resolve().parent.parent
SMALL = {"fcnet_hiddens": [16]}
ENV_ID = "DlearnerCallbacksTest/StepInfoCartPole-v0"


# ------------------------------------------------------------------------------------ envs
class StepInfo(gym.Wrapper):
    """CartPole whose ``info`` says ``reset=True`` after a reset and ``t``, the step number in the
    episode, after each step."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.t = 0

    def reset(self, **kwargs):
        self.t = 0
        obs, info = self.env.reset(**kwargs)
        return obs, {**info, "reset": True}

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.t += 1
        return obs, reward, terminated, truncated, {**info, "t": self.t}


class TaskCartPole(CartPoleEnv):
    """CartPole with a curriculum's knob: ``set_task(task)``, and ``info["task"]`` after each step."""

    def __init__(self):
        super().__init__()
        self.task = 0

    def set_task(self, task: int) -> int:
        before, self.task = self.task, task
        return before

    def step(self, action):
        obs, reward, terminated, truncated, info = super().step(action)
        return obs, reward, terminated, truncated, {**info, "task": self.task}


def task_cartpole(env_config) -> gym.Env:
    return gym.wrappers.TimeLimit(TaskCartPole(), max_episode_steps=500)


def make_step_info_env(**kwargs) -> gym.Env:
    return StepInfo(gym.make("CartPole-v1", **kwargs))


def next_step_vector_env(num_envs: int, **kwargs) -> gym.vector.VectorEnv:
    """The env's own vector env: sub-envs that reset in the step after an episode ends (NEXT_STEP)."""
    return gym.vector.SyncVectorEnv(
        [lambda: make_step_info_env(**kwargs) for _ in range(num_envs)], autoreset_mode=AutoresetMode.NEXT_STEP
    )


if ENV_ID not in gym.registry:
    gym.register(ENV_ID, entry_point=make_step_info_env, vector_entry_point=next_step_vector_env)


# ------------------------------------------------------------------------------- callbacks
class EpisodeRecorder(Callbacks):
    """Records every episode callback on its instance (read back through ``runner.callbacks``)."""

    def __init__(self):
        self.events = []

    def on_episode_start(self, *, episode, env_index, **kwargs):
        self.events.append(("start", episode.id_, env_index, episode.length, dict(episode.last_info)))

    def on_episode_step(self, *, episode, env_index, **kwargs):
        self.events.append(("step", episode.id_, env_index, episode.length, dict(episode.last_info)))

    def on_episode_end(self, *, episode, env_index, **kwargs):
        self.events.append(("end", episode.id_, env_index, episode.length, episode.get_return(), dict(episode.last_info)))


class MultiAgentRecorder(Callbacks):
    def __init__(self):
        self.starts, self.steps, self.ends = [], [], []

    def on_episode_start(self, *, episode, **kwargs):
        self.starts.append(episode.id_)

    def on_episode_step(self, *, episode, **kwargs):
        self.steps.append(episode.id_)

    def on_episode_end(self, *, episode, **kwargs):
        self.ends.append(
            (episode.id_, episode.length, episode.get_return(), dict(episode.agent_returns), dict(episode.last_infos))
        )


class LengthStats(Callbacks):
    """Each finished episode's length under all four reductions, and 1 per episode summed."""

    def on_episode_end(self, *, episode, metrics_logger, **kwargs):
        metrics_logger.log_value("length", episode.length)  # reduce="mean"
        metrics_logger.log_value("episodes", 1, reduce="sum")
        metrics_logger.log_value("shortest", episode.length, reduce="min")
        metrics_logger.log_value("longest", episode.length, reduce="max")


class RunnerIndex(Callbacks):
    """Which env runners finished episodes, and how many episodes (for actors on a cluster)."""

    def on_episode_end(self, *, episode, metrics_logger, **kwargs):
        metrics_logger.log_value("lowest_runner", episode.worker_index, reduce="min")
        metrics_logger.log_value("highest_runner", episode.worker_index, reduce="max")
        metrics_logger.log_value("episodes", 1, reduce="sum")


class FailsAtStepFive(Callbacks):
    def on_episode_step(self, *, episode, **kwargs):
        if episode.length == 5:
            raise ZeroDivisionError("no fifth steps here")


class LogsAReservedKey(Callbacks):
    def on_episode_end(self, *, metrics_logger, **kwargs):
        metrics_logger.log_value("episode_return_mean", 1.0)


class Curriculum(Callbacks):
    """Task 2 from the second iteration on; each iteration reports the lowest task its episodes ended in."""

    def on_episode_end(self, *, episode, metrics_logger, **kwargs):
        metrics_logger.log_value("task", episode.last_info["task"], reduce="min")

    def on_train_result(self, *, algorithm, result, **kwargs):
        if result["training_iteration"] == 1:
            result["tasks_before"] = algorithm.env_runner_group.foreach_env(lambda env: env.unwrapped.set_task(2))


class DriverHooks(Callbacks):
    def __init__(self):
        self.calls = []

    def on_algorithm_init(self, *, algorithm, **kwargs):
        self.calls.append(("on_algorithm_init", algorithm.iteration))

    def on_train_result(self, *, algorithm, result, **kwargs):
        self.calls.append(("on_train_result", result["training_iteration"]))

    def on_checkpoint_loaded(self, *, algorithm, path, **kwargs):
        self.calls.append(("on_checkpoint_loaded", algorithm.iteration))


def ppo(env=ENV_ID, **env_runners) -> PPOConfig:
    """A small PPO config that samples in this process."""
    return (
        PPOConfig()
        .environment(env)
        .env_runners(**{"num_envs_per_env_runner": 4, **env_runners})
        .training(train_batch_size=256, minibatch_size=128, num_epochs=1)
        .rl_module(model_config=SMALL)
        .debugging(seed=0)
    )


# ------------------------------------------------------------------------------ episodes
@pytest.mark.parametrize("mode, autoreset", [("sync", AutoresetMode.SAME_STEP), ("vector_entry_point", AutoresetMode.NEXT_STEP)])
def test_episode_callbacks_see_every_episode_once_with_its_length_return_and_infos(mode, autoreset):
    config = ppo(gym_env_vectorize_mode=mode).callbacks(EpisodeRecorder)
    runner = EnvRunner(config, module_spec=config.get_multi_rl_module_spec())
    assert runner.env.metadata["autoreset_mode"] == autoreset
    runner.sample(800)
    metrics = runner.get_metrics()
    events = runner.callbacks.events

    ends = [e for e in events if e[0] == "end"]
    # The episodes the env runner's own statistics counted, in the same order, with the same figures.
    assert [e[3] for e in ends] == metrics["episode_lengths"] and len(ends) >= 10
    np.testing.assert_allclose([e[4] for e in ends], metrics["episode_returns"])
    assert len({e[1] for e in ends}) == len(ends)
    for _, episode_id, env_index, length, _, info in ends:
        starts = [e for e in events if e[0] == "start" and e[1] == episode_id]
        steps = [e for e in events if e[0] == "step" and e[1] == episode_id]
        assert len(starts) == 1 and starts[0][2] == env_index and starts[0][3] == 0
        assert starts[0][4] == {"reset": True}  # the sub-env's reset info, nothing of the vector env's
        assert [s[3] for s in steps] == list(range(1, length + 1))
        assert [s[4]["t"] for s in steps] == list(range(1, length + 1))  # each step's own info
        assert info == {"t": length}  # the last step's info, not the next episode's reset info


def test_multi_agent_episode_callbacks_get_the_episode_with_per_agent_returns_and_infos():
    config = (
        PPOConfig()
        .environment(MultiAgentCartPole, env_config={"num_agents": 2})
        .env_runners(num_envs_per_env_runner=2)
        .rl_module(model_config=SMALL)
        .callbacks(MultiAgentRecorder)
        .debugging(seed=0)
    )
    runner = MultiAgentEnvRunner(config, module_spec=config.get_multi_rl_module_spec())
    runner.sample(400)
    metrics = runner.get_metrics()
    recorder = runner.callbacks

    assert [length for _, length, _, _, _ in recorder.ends] == metrics["episode_lengths"] and len(recorder.ends) >= 5
    np.testing.assert_allclose([ret for _, _, ret, _, _ in recorder.ends], metrics["episode_returns"])
    for episode_id, length, episode_return, agent_returns, last_infos in recorder.ends:
        assert recorder.starts.count(episode_id) == 1 and recorder.steps.count(episode_id) == length
        assert set(agent_returns) == {"agent_0", "agent_1"} and sum(agent_returns.values()) == pytest.approx(episode_return)
        assert set(last_infos) == {"agent_0", "agent_1"}


def test_sub_env_info_takes_one_sub_envs_entries_of_batched_vector_infos():
    infos = {
        "is_success": np.array([False, True]),
        "_is_success": np.array([False, True]),
        "nested": {"x": np.array([1, 2]), "_x": np.array([True, True])},
        "_nested": np.array([True, True]),
        "episode": {"r": np.array([0.0, 9.0])},
        "_episode": np.array([False, True]),
    }
    assert sub_env_info(infos, 0) == {"nested": {"x": 1}}
    assert sub_env_info(infos, 1) == {"is_success": True, "nested": {"x": 2}}


# ------------------------------------------------------------------------------- metrics
def test_logged_values_are_reduced_into_the_results_env_runners():
    config = ppo().callbacks(LengthStats).reporting(metrics_num_episodes_for_smoothing=10_000)
    with config.build_algo() as algo:
        result = algo.train()
    runners = result["env_runners"]
    assert runners["episodes"] == runners["runners"]["0"]["episodes_this_iter"] > 0
    # Over every episode so far: the window holds them all.
    assert runners["length"] == pytest.approx(runners["episode_len_mean"])
    assert runners["longest"] == runners["episode_return_max"]  # CartPole: return = length
    assert runners["shortest"] == runners["episode_return_min"]


def test_values_of_several_env_runners_reduce_per_key_as_logged():
    metrics = CustomMetrics(window=3)
    metrics.add({"rate": {"reduce": "mean", "values": [1.0, 0.0]}, "n": {"reduce": "sum", "values": [2.0]}})
    metrics.add({"rate": {"reduce": "mean", "values": [1.0, 1.0]}, "n": {"reduce": "sum", "values": [3.0]}})
    metrics.add({"low": {"reduce": "min", "values": [4.0]}, "high": {"reduce": "max", "values": [4.0]}})
    metrics.add({"low": {"reduce": "min", "values": [2.0]}, "high": {"reduce": "max", "values": [7.0]}})
    assert metrics.summary() == {"rate": pytest.approx(2 / 3), "n": 5.0, "low": 2.0, "high": 7.0}
    # An iteration where nothing was logged: the mean keeps its window; a sum is 0, a min or max unknown.
    quiet = metrics.summary()
    assert quiet["rate"] == pytest.approx(2 / 3) and quiet["n"] == 0.0 and math.isnan(quiet["low"]) and math.isnan(quiet["high"])


def test_custom_metrics_arrive_with_every_sample_of_impala():
    config = (
        IMPALAConfig()
        .environment(ENV_ID)
        .env_runners(num_envs_per_env_runner=4, rollout_fragment_length=25)
        .training(train_batch_size=200, min_time_s_per_iteration=None)
        .rl_module(model_config=SMALL)
        .callbacks(LengthStats)
        .debugging(seed=0)
    )
    with config.build_algo() as algo:
        results = [algo.train() for _ in range(2)]
    assert sum(r["env_runners"]["episodes"] for r in results) == results[-1]["env_runners"]["num_episodes_lifetime"] > 0


def test_a_key_that_dlearner_reports_itself_is_refused_by_name():
    with ppo().callbacks(LogsAReservedKey).build_algo() as algo, pytest.raises(CallbackError) as raised:
        algo.train()
    assert isinstance(raised.value.__cause__, ValueError) and "'episode_return_mean'" in str(raised.value)


# -------------------------------------------------------------------------------- errors
def test_a_raising_callback_stops_training_with_an_error_naming_callback_and_episode():
    with ppo().callbacks(FailsAtStepFive).build_algo() as algo, pytest.raises(CallbackError) as raised:
        algo.train()
    err = raised.value
    assert isinstance(err.__cause__, ZeroDivisionError)
    assert f"{__name__}.FailsAtStepFive.on_episode_step raised ZeroDivisionError: no fifth steps here" in str(err)
    assert f"in episode {err.episode_id} (env index {err.env_index}) of the driver's env runner" in str(err)
    assert err.method == "on_episode_step" and err.env_runner_index == 0 and err.env_index in range(4)


def test_config_callbacks_takes_a_callbacks_class_only():
    with pytest.raises(ValueError, match="pass the class, not an instance"):
        PPOConfig().callbacks(LengthStats())
    with pytest.raises(ValueError, match="Callbacks subclass"):
        PPOConfig().callbacks(dict)


def test_a_callbacks_class_named_by_a_command_line_path_is_imported_and_checked():
    assert callbacks_from_path(f"{__name__}:LengthStats") is callbacks_from_path(f"{__name__}.LengthStats") is LengthStats
    with pytest.raises(ValueError, match="Callbacks subclass"):
        callbacks_from_path("collections:OrderedDict")


def test_a_stored_config_names_the_callbacks_but_never_imports_them(caplog):
    stored = ppo().callbacks(LengthStats).to_dict()
    assert stored["callbacks_class"] == f"{__name__}.LengthStats"
    stored["callbacks_class"] = "their_module.TheirCallbacks"  # importing it would run the checkpoint's code
    with caplog.at_level(logging.WARNING, logger="dlearner.config"):
        config = AlgorithmConfig.from_dict(stored)
    assert config.callbacks_class is Callbacks
    assert "config.callbacks(TheirCallbacks)" in caplog.text


# -------------------------------------------------------------------- driver and curriculum
def test_on_train_result_changes_the_env_runners_envs_for_a_curriculum():
    with ppo(env=task_cartpole).callbacks(Curriculum).build_algo() as algo:
        first, second = algo.train(), algo.train()
    assert first["tasks_before"] == [[0, 0, 0, 0]]  # per env runner, per sub-env: set_task's return values
    assert first["env_runners"]["task"] == 0 and second["env_runners"]["task"] == 2


def test_driver_hooks_run_at_init_after_each_iteration_and_after_a_restore(tmp_path):
    config = ppo().callbacks(DriverHooks)
    with config.build_algo() as algo:
        algo.train()
        algo.save_to_path(tmp_path / "checkpoint")
        assert algo.callbacks.calls == [("on_algorithm_init", 0), ("on_train_result", 1)]
    with config.build_algo() as restored:
        restored.restore_from_path(tmp_path / "checkpoint")
        assert restored.callbacks.calls == [("on_algorithm_init", 0), ("on_checkpoint_loaded", 1)]


# ---------------------------------------------------------------------------------- dashboard
def test_the_dashboard_shows_logged_metrics_among_the_env_runner_figures_and_as_curves():
    store = MetricsStore()
    for iteration, rate in ((1, 0.25), (2, 0.5)):
        result = {
            "training_iteration": iteration,
            "num_env_steps_sampled_lifetime": 100 * iteration,
            "env_runners": {"episode_return_mean": 20.0, "num_episodes_lifetime": 4, "runners": {}, "success_rate": rate},
        }
        store.add({"run_id": "run", "kind": KIND_TRAIN, "result": sanitize(result)})
    (run,) = store.to_json()["runs"]
    assert "success_rate (callbacks)" in env_runners_table(run) and "0.5" in env_runners_table(run)
    assert [p["custom_metrics"] for p in run["history"]] == [{"success_rate": 0.25}, {"success_rate": 0.5}]
    assert any(CUSTOM_METRICS_TITLE in chart for chart in run_charts(run))


# ------------------------------------------------------------------------------------ example
def test_the_success_rate_example_reports_a_rate_each_iteration(capsys):
    spec = importlib.util.spec_from_file_location("callbacks_success_rate", ROOT / "examples" / "callbacks_success_rate.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    rates = example.main(iterations=2)
    assert len(rates) == 2 and all(0.0 <= rate <= 1.0 for rate in rates)
    assert capsys.readouterr().out.count("success rate") == 2


def test_the_tracking_docs_show_the_examples_code_as_it_is():
    docs = (ROOT / "docs" / "tracking.md").read_text()
    match = re.search(r"<!-- excerpt of examples/callbacks_success_rate.py .*?-->\s*```python\n(.*?)```", docs, re.S)
    assert match and match.group(1) in (ROOT / "examples" / "callbacks_success_rate.py").read_text()


# ------------------------------------------------------------------------ env-runner actors
@pytest.fixture(scope="module")
def client():
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0", silence_logs=logging.CRITICAL
        ) as cluster,
        distributed.Client(cluster, set_as_default=False) as client,
    ):
        yield client


def on_cluster(client, callbacks_class) -> PPOConfig:
    return (
        ppo(num_env_runners=2, num_envs_per_env_runner=2)
        .fault_tolerance(restart_failed_env_runners=True)
        .callbacks(callbacks_class)
        .cluster(client=client)
    )


@pytest.mark.slow
def test_metrics_logged_in_env_runner_actors_reduce_across_them(client, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = on_cluster(client, RunnerIndex).reporting(loggers=["tensorboard"], log_dir=str(tmp_path))
    with config.build_algo() as algo:
        result = algo.train()
    runners = result["env_runners"]
    assert (runners["lowest_runner"], runners["highest_runner"]) == (1, 2)  # both actors' episodes
    assert runners["episodes"] == sum(r["episodes_this_iter"] for r in runners["runners"].values()) > 0
    # A run on a cluster you attached to is logged the same way (the loggers live in the driver).
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [event.value for event in events.Scalars("env_runners/episodes")] == [runners["episodes"]]


@pytest.mark.slow
def test_a_callback_raising_in_an_actor_is_a_callback_error_not_a_lost_runner(client):
    with on_cluster(client, FailsAtStepFive).build_algo() as algo:
        with pytest.raises(CallbackError, match="FailsAtStepFive.on_episode_step") as raised:
            algo.train()
        assert raised.value.env_runner_index in (1, 2) and f"of env runner {raised.value.env_runner_index}" in str(raised.value)
        assert isinstance(raised.value.__cause__, ZeroDivisionError)  # the original came along from the actor
        assert "in on_episode_step" in raised.value.__notes__[-1]  # with the callback's traceback, where it ran
        assert algo.env_runner_group.num_env_runner_restarts == 0 and algo.env_runner_group.num_healthy_env_runners == 2


def test_the_command_line_runs_a_callbacks_class_it_names(tmp_path, capsys):
    from test_cli import FAST

    from dlearner.cli import main
    from dlearner.reporting import read_metrics

    run = tmp_path / "run"
    args = ["train", "--env", "CartPole-v1", "--checkpoint", str(run), "--stop-iters", "2", "-q", *FAST]
    assert main([*args, "--callbacks", "test_callbacks:LengthStats", "--num-learners", "0"]) == 0
    rows = read_metrics(run / "metrics.jsonl")
    assert all(row["env_runners/longest"] > 0 for row in rows)
    assert main(["train", "--env", "CartPole-v1", "--callbacks", "no_such_module:Callbacks", "-q"]) == 2
    assert "argument --callbacks: Cannot import module 'no_such_module'" in capsys.readouterr().err
