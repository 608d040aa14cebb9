"""`dlearner` with a multi-agent environment: `--env module:creator --policies shared|per-agent`, and
how `train`, `--resume`, `evaluate`, `inspect` and `plot` show such runs. Everything runs in this
process (`main()`, no cluster): the console script itself is tested in test_cli.py."""

from __future__ import annotations

import io
import json
import shutil

import pytest
from conftest import usage_error
from test_cli import FAST as CLI_FAST

from dlearner.cli import main
from dlearner.cli.parser import build_parser
from dlearner.cli.runs import resume_command
from dlearner.cli.train_config import make_config
from dlearner.reporting import ProgressDisplay, read_metrics

ENV = "dlearner.envs:MultiAgentCartPole"
# Small and fast: test_cli's settings, everything in this process.
FAST = ["--num-learners", "0", "--num-env-runners", "0", *CLI_FAST]


def parsed(*args: str):
    return build_parser().parse_args(list(args))


@pytest.fixture(scope="module")
def per_agent_run(tmp_path_factory):
    """A run folder trained one iteration with one module per agent (shared by the tests below)."""
    run = tmp_path_factory.mktemp("ma") / "run"
    assert main(["train", "--env", ENV, "--policies", "per-agent", "--stop-iters", "1", "--checkpoint", str(run), *FAST]) == 0
    return run


# ----------------------------------------------------------------------------- the flags
def test_a_multi_agent_env_shares_one_module_unless_policies_says_per_agent():
    config, _, setup = make_config(parsed("train", "--env", ENV))
    assert config.policy_mapping_fn == "shared"
    assert setup.agents == ["agent_0", "agent_1"] and setup.modules == ["default_policy"]
    config, _, setup = make_config(parsed("train", "--env", ENV, "--policies", "per-agent", "--env-config", '{"num_agents": 3}'))
    assert config.policy_mapping_fn == "per-agent"
    assert setup.modules == ["agent_0", "agent_1", "agent_2"]
    assert setup.describe() == "3 agents, --policies per-agent: modules agent_0, agent_1, agent_2"


def test_a_single_agent_env_has_no_multi_agent_setup():
    config, _, setup = make_config(parsed("train", "--env", "CartPole-v1"))
    assert setup is None and config.policy_mapping_fn is None


def test_policies_with_a_single_agent_env_is_a_usage_error_naming_the_flag(capsys):
    err = usage_error(capsys, "train", "--env", "CartPole-v1", "--policies", "per-agent")
    assert "--policies" in err and "single-agent" in err and "Drop --policies" in err
    err = usage_error(capsys, "train", "--env", ENV, "--policies", "each")
    assert "--policies" in err and "per-agent" in err  # argparse lists the choices


def test_agents_with_different_spaces_cannot_share_a_module(tmp_path, monkeypatch, capsys):
    (tmp_path / "cli_two_kinds_env.py").write_text(
        "import gymnasium as gym\n"
        "from dlearner import MultiAgentEnv\n\n\n"
        "class TwoKinds(MultiAgentEnv):\n"
        "    def __init__(self, config=None):\n"
        "        super().__init__()\n"
        "        self.possible_agents, self.agents = ['small', 'big'], []\n"
        "        self.observation_spaces = {'small': gym.spaces.Box(-1, 1, (2,)), 'big': gym.spaces.Box(-1, 1, (3,))}\n"
        "        self.action_spaces = {agent: gym.spaces.Discrete(2) for agent in self.possible_agents}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    err = usage_error(capsys, "train", "--env", "cli_two_kinds_env:TwoKinds", "--stop-iters", "1")
    assert "--policies" in err and "'small'" in err and "'big'" in err and "--policies per-agent" in err
    _, _, setup = make_config(parsed("train", "--env", "cli_two_kinds_env:TwoKinds", "--policies", "per-agent"))
    assert setup.modules == ["small", "big"]


# -------------------------------------------------------------------------------- a run
def test_train_per_agent_writes_a_checkpoint_with_a_module_per_agent(per_agent_run, capsys):
    assert main(["inspect", str(per_agent_run), "--json"]) == 0
    metadata = json.loads(capsys.readouterr().out)["metadata"]
    assert sorted(metadata["module_specs"]) == ["agent_0", "agent_1"]
    assert metadata["config"]["policy_mapping_fn"] == "per-agent"
    assert main(["inspect", str(per_agent_run)]) == 0
    assert "modules: agent_0, agent_1 (policy mapping: per-agent)" in capsys.readouterr().out


def test_metrics_hold_the_summed_return_and_one_per_module(per_agent_run, tmp_path, capsys):
    (row,) = read_metrics(per_agent_run / "metrics.jsonl")
    summed = row["env_runners/episode_return_mean"]
    per_agent = [row[f"env_runners/agent_episode_returns_mean/agent_{n}"] for n in (0, 1)]
    assert summed > max(per_agent) and isinstance(row["env_runners/module_episode_returns_mean/agent_0"], float)
    assert isinstance(row["learners/agent_1/total_loss"], float)
    curve = tmp_path / "curve.png"
    assert main(["plot", str(per_agent_run), "-o", str(curve)]) == 0  # the summed return
    assert curve.read_bytes().startswith(b"\x89PNG")


def test_evaluate_needs_the_env_again_and_shows_each_agents_return(per_agent_run, capsys):
    err = usage_error(capsys, "evaluate", str(per_agent_run), "--episodes", "1")
    assert f"pass --env {ENV}" in err
    assert main(["evaluate", str(per_agent_run), "--episodes", "2", "--env", ENV]) == 0
    out = capsys.readouterr().out
    assert "mean return over 2 greedy episodes" in out and "mean return per agent: agent_0 " in out
    assert main(["evaluate", str(per_agent_run), "--episodes", "2", "--env", ENV, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert sorted(result["agent_episode_returns_mean"]) == ["agent_0", "agent_1"]


def test_resume_needs_the_env_again_and_keeps_the_runs_policies(per_agent_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(per_agent_run, run)  # the other tests keep the run of one iteration
    resume = ["train", "--checkpoint", str(run), "--resume", "--stop-iters", "2"]
    assert f"pass --env {ENV}" in usage_error(capsys, *resume)
    err = usage_error(capsys, *resume, "--env", ENV, "--policies", "shared")
    assert "--policies" in err and "trained with --policies per-agent" in err
    assert main([*resume, "--env", ENV]) == 0  # no --policies: the checkpoint's
    out = capsys.readouterr().out
    assert "resumed" in out and "(2 agents, --policies per-agent: modules agent_0, agent_1)" in out
    assert "iter    2 |" in out and "module returns agent_0 " in out
    assert [row["training_iteration"] for row in read_metrics(run / "metrics.jsonl")] == [1, 2]


def test_the_command_that_continues_a_run_names_its_module_creator_env():
    args = parsed("train", "--env", ENV, "--checkpoint", "runs/ma", "--stop-iters", "5")
    assert resume_command(args) == f"dlearner train --checkpoint runs/ma --resume --env {ENV} --stop-iters 5"
    args = parsed("train", "--env", "CartPole-v1", "--checkpoint", "runs/cp")
    assert resume_command(args) == "dlearner train --checkpoint runs/cp --resume"  # a gymnasium id comes from the checkpoint


# ----------------------------------------------------------------------------- progress lines
def multi_agent_result(iteration: int) -> dict:
    return {
        "training_iteration": iteration,
        "num_env_steps_sampled_lifetime": 256 * iteration,
        "env_steps_per_s": 1000.0,
        "env_runners": {"episode_return_mean": 40.4, "module_episode_returns_mean": {"agent_1": 20.9, "agent_0": 19.6}},
    }


def test_progress_lines_of_a_multi_agent_run_show_each_modules_return_after_the_sum():
    out = io.StringIO()
    line = ProgressDisplay(out).update(multi_agent_result(1))
    parts = line.split(" | ")
    assert parts[2:4] == ["return    40.4", "module returns agent_0 19.6, agent_1 20.9"]
    assert out.getvalue() == line + "\n"  # not a terminal: one line per iteration


def test_progress_lines_name_a_few_modules_and_count_the_rest():
    result = multi_agent_result(1)
    result["env_runners"]["module_episode_returns_mean"] = {f"p{n}": float(n) for n in range(6)}
    result["env_runners"]["module_episode_returns_mean"]["p5"] = None  # no finished episode yet
    line = ProgressDisplay(io.StringIO()).update(result)
    assert "module returns p0 0.0, p1 1.0, p2 2.0, p3 3.0, +2 more |" in line


def test_progress_lines_update_in_place_on_a_terminal():
    out = io.StringIO()
    progress = ProgressDisplay(out)
    progress.live = True
    first = progress.update(multi_agent_result(1))
    second = progress.update({**multi_agent_result(2), "env_runners": {"episode_return_mean": 1.0}})  # shorter
    progress.message("done")
    assert out.getvalue() == f"\r{first}\r{second}{' ' * (len(first) - len(second))}\ndone\n"


def test_single_agent_progress_lines_are_as_before():
    result = {"training_iteration": 1, "num_env_steps_sampled_lifetime": 256, "env_runners": {"episode_return_mean": 9.0}}
    assert "module" not in ProgressDisplay(io.StringIO()).update(result)
