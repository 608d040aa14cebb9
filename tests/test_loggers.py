"""Result loggers (``config.reporting(loggers=...)``, ``dlearner train --logger``): what TensorBoard and
MLflow hold after training, read back with their own readers (tensorboard's EventAccumulator, mlflow's
MlflowClient on the SQLite store), and how a logger that cannot write warns once while training goes on.

Everything trains in this process with a tiny model, except one run with an env-runner actor on an
embedded LocalCluster (slow)."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import gymnasium as gym
import pytest
from conftest import usage_error
from test_cli import FAST as CLI_FAST

from dlearner import PPOConfig
from dlearner.cli import main
from dlearner.loggers import MLFLOW_HTTP_DEFAULTS, MLflowLogger, TensorBoardLogger, mlflow_key

RETURN = "env_runners/episode_return_mean"
LOSS = "learners/default_policy/total_loss"
ITERATIONS = 3


def tiny_config(**reporting) -> PPOConfig:
    """CartPole, a tiny model, everything in this process; ``reporting`` goes to ``config.reporting``."""
    return (
        PPOConfig()
        .environment("CartPole-v1")
        .env_runners(num_env_runners=0, num_envs_per_env_runner=1)
        .learners(num_learners=0)
        .training(train_batch_size=256, minibatch_size=128, num_epochs=1)
        .rl_module(model_config={"fcnet_hiddens": [16]})
        .debugging(seed=0)
        .reporting(**reporting)
    )


def train(config: PPOConfig, iterations: int, *, run_name: str = None) -> list:
    """Build, train ``iterations`` times, stop; returns the results."""
    algo = config.build_algo()
    if run_name is not None:
        algo.run_name = run_name
    try:
        return [algo.train() for _ in range(iterations)]
    finally:
        algo.stop()


def tensorboard_events(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir / "tensorboard"))
    events.Reload()
    return events


def mlflow_client(log_dir: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{log_dir / 'mlflow.db'}")


def mlflow_runs(log_dir: Path) -> list:
    client = mlflow_client(log_dir)
    experiment = client.get_experiment_by_name("dlearner")
    return client.search_runs([experiment.experiment_id])


def metric_points(log_dir: Path, run_id: str, key: str) -> list:
    return sorted((point.step, point.value) for point in mlflow_client(log_dir).get_metric_history(run_id, key))


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def logger_warnings(caplog) -> list:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name.startswith("dlearner") and record.levelno == logging.WARNING
    ]


@pytest.fixture(scope="module")
def both_loggers(tmp_path_factory):
    """One run of ITERATIONS iterations with both loggers: ``(log_dir, results, run name)``."""
    log_dir = tmp_path_factory.mktemp("loggers") / "run"
    results = train(tiny_config(loggers=["tensorboard", "mlflow"], log_dir=log_dir), ITERATIONS, run_name="cartpole-both")
    return log_dir, results, "cartpole-both"


# ------------------------------------------------------------------------------ TensorBoard
def test_tensorboard_has_one_point_per_iteration_for_each_numeric_result_key(both_loggers):
    log_dir, results, _ = both_loggers
    events = tensorboard_events(log_dir)
    for key, value_of in (
        (RETURN, lambda r: r["env_runners"]["episode_return_mean"]),
        (LOSS, lambda r: r["learners"]["default_policy"]["total_loss"]),
    ):
        points = [(event.step, event.value) for event in events.Scalars(key)]
        assert [step for step, _ in points] == [1, 2, 3], key
        assert [value for _, value in points] == pytest.approx([value_of(r) for r in results], rel=1e-6), key
    assert "env_runners/runners/0/env_steps_this_iter" in events.Tags()["scalars"]


def test_tensorboard_holds_the_hyperparameters_once_as_hparams_and_as_text(both_loggers):
    from tensorboard.plugins.hparams import plugin_data_pb2
    from tensorboard.util import tensor_util

    log_dir, _, _ = both_loggers
    events = tensorboard_events(log_dir)
    start = plugin_data_pb2.HParamsPluginData.FromString(events.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    assert start.session_start_info.hparams["train_batch_size"].number_value == 256
    assert start.session_start_info.hparams["model_config/fcnet_hiddens"].string_value == "[16]"
    texts = events.Tensors("hyperparameters/text_summary")
    assert len(texts) == 1
    config = json.loads(tensor_util.make_ndarray(texts[0].tensor_proto).item().decode())
    assert config["train_batch_size"] == 256 and config["loggers"] == ["tensorboard", "mlflow"]


# ----------------------------------------------------------------------------------- MLflow
def test_mlflow_run_has_a_metric_history_per_key_and_ends_finished(both_loggers):
    log_dir, results, run_name = both_loggers
    (run,) = mlflow_runs(log_dir)
    assert run.info.run_name == run_name and run.info.status == "FINISHED"
    losses = [r["learners"]["default_policy"]["total_loss"] for r in results]
    assert metric_points(log_dir, run.info.run_id, LOSS) == [(i + 1, pytest.approx(v)) for i, v in enumerate(losses)]
    assert [step for step, _ in metric_points(log_dir, run.info.run_id, "num_env_steps_sampled_lifetime")] == [1, 2, 3]


def test_mlflow_run_has_the_config_as_params(both_loggers):
    log_dir, _, _ = both_loggers
    (run,) = mlflow_runs(log_dir)
    params = run.data.params
    assert params["train_batch_size"] == "256"
    assert params["model_config/fcnet_hiddens"] == "[16]"  # nested settings: "/"-joined names, JSON values
    assert params["env"] == "CartPole-v1"


def test_mlflow_names_and_values_are_kept_within_mlflows_limits():
    assert mlflow_key("custom/success rate{%}") == "custom/success rate___"  # letters (any script), digits, _-./ and space stay
    assert mlflow_key("custom/succès") == "custom/succès"
    assert mlflow_key("a//b/./c/") == "a/_/b/_/c/_"
    assert len(mlflow_key("k" * 400)) == 250


def test_a_resumed_run_continues_its_series_from_the_restored_iteration(tmp_path):
    config = tiny_config(loggers=["tensorboard", "mlflow"], log_dir=tmp_path / "run")
    algo = config.build_algo()
    algo.run_name = "resumed"
    algo.train()
    algo.train()
    algo.save_to_path(tmp_path / "checkpoint")
    lost = algo.train()["learners"]["default_policy"]["total_loss"]  # iteration 3, after the checkpoint
    algo.stop()

    algo = config.build_algo()
    algo.run_name = "resumed"
    algo.restore_from_path(tmp_path / "checkpoint")
    again = [algo.train()["learners"]["default_policy"]["total_loss"] for _ in range(2)]  # iterations 3 and 4
    algo.stop()

    # TensorBoard hides the first session's iteration 3: each step once, the resumed values.
    points = [(event.step, event.value) for event in tensorboard_events(tmp_path / "run").Scalars(LOSS)]
    assert [step for step, _ in points] == [1, 2, 3, 4]
    assert [value for _, value in points[2:]] == pytest.approx(again)
    # MLflow continues the same run; it cannot delete points, so iteration 3 is there from both sessions.
    (run,) = mlflow_runs(tmp_path / "run")
    assert run.info.status == "FINISHED"
    steps = metric_points(tmp_path / "run", run.info.run_id, LOSS)
    assert [step for step, _ in steps] == [1, 2, 3, 3, 4]
    assert sorted(value for step, value in steps if step == 3) == pytest.approx(sorted([lost, again[0]]))


class CartPoleThatBreaks(gym.Wrapper):
    """CartPole whose 300th step raises (a bug in a user's env): the second iteration fails."""

    def __init__(self, config=None):
        super().__init__(gym.make("CartPole-v1"))
        self.steps = 0

    def step(self, action):
        self.steps += 1
        if self.steps == 300:
            raise RuntimeError("the env broke at step 300")
        return super().step(action)


def test_training_that_fails_ends_the_mlflow_run_as_failed(tmp_path):
    config = tiny_config(loggers=["mlflow"], log_dir=tmp_path).environment(CartPoleThatBreaks)
    algo = config.build_algo()
    try:
        algo.train()
        with pytest.raises(RuntimeError, match="broke at step 300"):
            algo.train()
    finally:
        algo.stop()
    (run,) = mlflow_runs(tmp_path)
    assert run.info.status == "FAILED"
    assert [step for step, _ in metric_points(tmp_path, run.info.run_id, LOSS)] == [1]


# ------------------------------------------------------------------ a logger that cannot write
def test_a_tensorboard_folder_that_cannot_be_made_warns_once_and_training_goes_on(tmp_path, caplog):
    (tmp_path / "a_file").write_text("not a folder")
    log_dir = tmp_path / "a_file" / "run"  # its parent is a regular file: mkdir fails with NotADirectoryError
    with caplog.at_level(logging.WARNING, logger="dlearner"):
        results = train(tiny_config(loggers=["tensorboard"], log_dir=log_dir), 2)
    assert [r["training_iteration"] for r in results] == [1, 2]
    (warning,) = logger_warnings(caplog)
    assert "TensorBoard logger cannot write to" in warning and str(log_dir / "tensorboard") in warning
    assert "NotADirectoryError" in warning and "training goes on" in warning


# The writer's thread meets the error first and reports it as unhandled before the next call raises it here.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_full_disk_under_tensorboard_warns_once_and_training_goes_on(tmp_path, caplog):
    algo = tiny_config(loggers=["tensorboard"], log_dir=tmp_path).build_algo()
    try:
        algo.train()
        (event_file,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
        event_file.unlink()
        event_file.symlink_to("/dev/full")  # every later write fails with ENOSPC, as on a full disk
        with caplog.at_level(logging.WARNING, logger="dlearner"):
            results = [algo.train() for _ in range(3)]
        (result_logger,) = algo.result_loggers
        assert not result_logger.writing
    finally:
        algo.stop()
    assert [r["training_iteration"] for r in results] == [2, 3, 4]
    (warning,) = logger_warnings(caplog)
    assert "No space left on device" in warning and "training goes on" in warning


@pytest.fixture
def mlflow_http_env(monkeypatch):
    """No MLflow HTTP settings in the environment (the logger's own apply); restored afterwards."""
    for name in MLFLOW_HTTP_DEFAULTS:
        monkeypatch.delenv(name, raising=False)
    yield
    for name in MLFLOW_HTTP_DEFAULTS:
        os.environ.pop(name, None)  # set by the logger; monkeypatch puts back any the environment had


def test_an_mlflow_server_that_is_gone_warns_once_quickly_and_training_goes_on(tmp_path, caplog, mlflow_http_env):
    uri = f"http://127.0.0.1:{closed_port()}"
    config = tiny_config(loggers=["mlflow"], log_dir=tmp_path, mlflow_tracking_uri=uri)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="dlearner"):
        results = train(config, 3)
    assert time.monotonic() - start < 60  # MLflow's default retries would wait minutes
    assert [r["training_iteration"] for r in results] == [1, 2, 3]
    (warning,) = logger_warnings(caplog)
    assert f"MLflow logger cannot write to {uri}" in warning and "training goes on" in warning
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"


def test_a_logger_closed_after_its_error_stays_quiet(tmp_path):
    (tmp_path / "a_file").write_text("")
    for result_logger in (
        TensorBoardLogger(tmp_path / "a_file" / "tb"),
        MLflowLogger(f"sqlite:///{tmp_path / 'a_file' / 'mlflow.db'}", "dlearner", "run"),
    ):
        result_logger.log_result({"x": 1.0}, 1)
        assert result_logger.error is not None
        result_logger.close("FINISHED")  # nothing raised, nothing more written
        assert not result_logger.writing


# ----------------------------------------------------------------------------------- config
def test_logger_names_are_checked_where_they_are_set():
    with pytest.raises(ValueError, match=r"'wandb' is not a logger; choose from \['mlflow', 'tensorboard'\]"):
        PPOConfig().reporting(loggers=["wandb"])
    with pytest.raises(ValueError, match="loggers must be a list"):
        PPOConfig().reporting(loggers="tensorboard")


def test_the_logger_settings_are_plain_json_and_survive_a_checkpoint_config(tmp_path):
    config = PPOConfig().reporting(loggers=["mlflow", "tensorboard"], log_dir=tmp_path, mlflow_experiment_name="cartpole")
    stored = json.loads(json.dumps(config.to_dict()))
    again = PPOConfig.from_dict(stored)
    assert (again.loggers, again.log_dir, again.mlflow_experiment_name) == (["mlflow", "tensorboard"], str(tmp_path), "cartpole")


def test_a_logger_whose_extra_is_missing_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # how Python marks a package that cannot be imported
    with pytest.raises(ImportError, match=r'pip install "dlearner\[mlflow\]"'):
        PPOConfig().reporting(loggers=["mlflow"])


def test_importing_dlearner_imports_neither_tensorboard_nor_mlflow():
    code = (
        "import sys, dlearner, dlearner.loggers, dlearner.cli\n"
        "dlearner.PPOConfig().reporting(loggers=['tensorboard', 'mlflow'])\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorboard', 'mlflow')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


# -------------------------------------------------------------------------------------- CLI
FAST = ["--env", "CartPole-v1", "--num-learners", "0", "--num-env-runners", "0", *CLI_FAST]


def test_cli_loggers_write_into_the_run_folder_beside_the_metrics_file(tmp_path, capsys):
    run = tmp_path / "cartpole"
    assert (
        main(["train", *FAST, "--stop-iters", "2", "--checkpoint", str(run), "--logger", "tensorboard", "--logger", "mlflow"])
        == 0
    )
    out = capsys.readouterr().out
    assert f"tensorboard --logdir {run / 'tensorboard'}" in out
    assert {"metrics.jsonl", "tensorboard", "mlflow.db"} <= {path.name for path in run.iterdir()}
    assert [event.step for event in tensorboard_events(run).Scalars(LOSS)] == [1, 2]
    (mlflow_run,) = mlflow_runs(run)
    assert mlflow_run.info.run_name == "cartpole"  # the run folder's name, as on the dashboard page
    assert [step for step, _ in metric_points(run, mlflow_run.info.run_id, LOSS)] == [1, 2]


def test_cli_logger_needs_a_run_folder(capsys):
    err = usage_error(capsys, "train", *FAST, "--logger", "tensorboard")
    assert "--logger" in err and "--checkpoint DIR" in err


def test_cli_mlflow_tracking_uri_needs_the_mlflow_logger(tmp_path, capsys):
    err = usage_error(
        capsys, "train", *FAST, "--checkpoint", str(tmp_path / "run"), "--mlflow-tracking-uri", "http://127.0.0.1:5000"
    )
    assert "--mlflow-tracking-uri" in err and "--logger mlflow" in err


def test_cli_logger_names_the_choices(capsys):
    err = usage_error(capsys, "train", *FAST, "--logger", "wandb")
    assert "--logger" in err and "mlflow" in err and "tensorboard" in err


def test_cli_logger_whose_extra_is_missing_fails_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    err = usage_error(capsys, "train", *FAST, "--checkpoint", str(tmp_path / "run"), "--logger", "tensorboard")
    assert "--logger" in err and 'pip install "dlearner[tensorboard]"' in err
    assert not (tmp_path / "run").exists()  # nothing started, nothing written


# ------------------------------------------------------------------------ env-runner actors
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_loggers_write_the_figures_of_env_runner_actors_on_an_embedded_cluster(tmp_path):
    from test_callbacks import LengthStats

    config = tiny_config(loggers=["tensorboard", "mlflow"], log_dir=tmp_path).env_runners(num_env_runners=1)
    results = train(config.callbacks(LengthStats), 2)
    # What the actor's callbacks logged is a series like every other result key.
    assert [event.step for event in tensorboard_events(tmp_path).Scalars("env_runners/longest")] == [1, 2]
    assert results[-1]["num_healthy_env_runners"] == 1
    actor_key = "env_runners/runners/1/env_steps_this_iter"  # runner 1: the actor (0 samples in the driver)
    assert [event.step for event in tensorboard_events(tmp_path).Scalars(actor_key)] == [1, 2]
    (run,) = mlflow_runs(tmp_path)
    assert [step for step, _ in metric_points(tmp_path, run.info.run_id, actor_key)] == [1, 2]
