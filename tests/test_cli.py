"""The `dlearner` command, run as users run it (the installed console script, in a subprocess), plus
the reporting helpers it uses (metrics file, progress display, learning curve) and config round trips."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pytest

from dlearner import PPOConfig, RLModuleSpec
from dlearner.cli import config_from_dict, main
from dlearner.reporting import MetricsWriter, ProgressDisplay, flatten_result, plot_learning_curve, read_metrics

# The console script of the environment running the tests (CI runs .venv/bin/python without activating
# the venv, so PATH may not have it); PATH as a fallback.
_BESIDE_PYTHON = Path(sys.executable).with_name("dlearner")
DLEARNER = str(_BESIDE_PYTHON) if _BESIDE_PYTHON.is_file() else shutil.which("dlearner")
# Small and fast: a tiny model, small batches, everything in the driver unless a test says otherwise.
FAST = [
    "--fcnet-hiddens",
    "16,16",
    "--train-batch-size",
    "256",
    "--minibatch-size",
    "128",
    "--num-epochs",
    "1",
    "--num-envs-per-env-runner",
    "4",
    "--seed",
    "0",
]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def dlearner(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    assert DLEARNER is not None, "the `dlearner` console script is not installed (pip install -e .)"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([DLEARNER, *args], capture_output=True, text=True, timeout=timeout, env=env)


def side_by_side(
    *commands: List[str], env: Optional[Dict[str, str]] = None, timeout: float = 180
) -> List[subprocess.CompletedProcess]:
    """Run `dlearner` commands that do not depend on one another at the same time (each one spends its
    first seconds importing torch on a single core); their results, in the order given."""
    env = {**(os.environ if env is None else env), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([DLEARNER, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for args in commands
    ]
    try:
        results = []
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
        return results
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


def assert_user_error(proc: subprocess.CompletedProcess, *names: str) -> None:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    for name in names:
        assert name in proc.stderr, (name, proc.stderr)


def assert_real_plot(path: Path) -> None:
    import matplotlib.image

    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 10_000, len(data)
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300
    colours = np.unique(image.reshape(-1, image.shape[-1]).round(2), axis=0)
    assert len(colours) > 20, "the PNG is (nearly) a single colour"


# ------------------------------------------------------------------------------ user errors
@pytest.mark.parametrize(
    "args, names",
    [
        (["train", "--env", "CartPole-v1", "--num-learnerz", "2"], ["--num-learnerz"]),
        (["train", "--env", "CartPole-v1", "--lr", "-0.1"], ["--lr"]),
        (
            ["train", "--env", "CartPole-v1", "--scheduler-file", "/no/such/sched.json"],
            ["--scheduler-file", "/no/such/sched.json"],
        ),
    ],
)
def test_bad_flags_exit_non_zero_naming_the_flag(args, names):
    assert_user_error(dlearner(*args), *names)


@pytest.mark.parametrize(
    "args, names",
    [
        (["train", "--env", "CartPole-v1", "--num-learners", "two"], ["--num-learners", "two"]),
        (["train", "--env", "NoSuchEnv-v0", "--stop-iters", "1"], ["--env", "NoSuchEnv-v0"]),
        (["train", "--stop-iters", "1"], ["--env"]),
        (["train", "--env", "CartPole-v1", "--resume"], ["--resume", "--checkpoint"]),
        (["train", "--env", "CartPole-v1", "--algo", "BC"], ["--algo", "BC"]),
        (["train", "--env", "CartPole-v1", "--minibatch-size", "4096"], ["--minibatch-size", "4096"]),
        (["train", "--env", "CartPole-v1", "--env-config", "[1]"], ["--env-config"]),
        (["plot", "metrics.jsonl", "--bogus"], ["--bogus"]),
    ],
)
def test_more_bad_flags_in_process(args, names, capsys):
    # The same main() the console script calls, without a subprocess per case.
    try:
        status = main(args)
    except SystemExit as exit_:  # argparse's own errors
        status = exit_.code
    err = capsys.readouterr().err
    assert status == 2, err
    assert "Traceback" not in err
    for name in names:
        assert name in err, (name, err)


def test_missing_checkpoint_paths_are_named(tmp_path, capsys):
    missing = str(tmp_path / "no-such-run")
    for args in (["evaluate", missing], ["inspect", missing]):
        proc = dlearner(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert_user_error(proc, missing)
    for args in (["train", "--checkpoint", missing, "--resume"], ["plot", missing + "/metrics.jsonl"]):
        assert main(args) == 2
        assert missing in capsys.readouterr().err


def test_paths_that_hold_no_checkpoint_are_explained_in_plain_words(tmp_path, capsys):
    notes = tmp_path / "afile.txt"
    notes.write_text("not a run")
    runs = tmp_path / "runs"
    (runs / "cartpole" / "checkpoint").mkdir(parents=True)  # a folder of run folders, not a run

    def refused(*args: str) -> str:
        assert main(list(args)) == 2, args
        err = capsys.readouterr().err
        assert "Error" not in err and "save_to_path" not in err, err  # no exception class, no Python API name
        return err

    # A new run needs a directory: --checkpoint names the run's folder.
    err = refused("train", "--env", "CartPole-v1", "--checkpoint", str(notes))
    assert "is a file, but --checkpoint takes a directory" in err and "--resume" in err
    err = refused("train", "--env", "CartPole-v1", "--checkpoint", str(runs))
    assert "holds no checkpoint" in err and f"--checkpoint {runs / 'cartpole'} --resume" in err
    # Reading one: what the path is, and what a checkpoint looks like.
    for command in ("inspect", "evaluate"):
        err = refused(command, str(notes))
        assert f"{str(notes)!r} is a file, not a directory. A checkpoint is a directory" in err
        err = refused(command, str(runs))
        assert "holds no checkpoint" in err and "A checkpoint is a directory" in err and str(runs / "cartpole") in err
    err = refused("train", "--checkpoint", str(runs), "--resume")
    assert "argument --checkpoint" in err and "A checkpoint is a directory" in err


def test_plot_takes_a_run_folder_and_titles_the_curve_with_the_runs_name(tmp_path, capsys, monkeypatch):
    import dlearner.reporting

    run = tmp_path / "cartpole-run1"
    run.mkdir()
    with MetricsWriter(run / "metrics.jsonl") as writer:
        for i in range(1, 4):
            writer.write(
                {
                    "training_iteration": i,
                    "num_env_steps_sampled_lifetime": 100 * i,
                    "env_runners": {"episode_return_mean": 10.0 * i},
                }
            )
    titles = []
    draw = dlearner.reporting.plot_learning_curve
    monkeypatch.setattr(
        dlearner.reporting, "plot_learning_curve", lambda *a, title, **kw: titles.append(title) or draw(*a, title=title, **kw)
    )

    assert main(["plot", str(run)]) == 0
    assert capsys.readouterr().out.strip() == str(run / "learning_curve.png")
    assert_real_plot(run / "learning_curve.png")
    assert main(["plot", str(run / "metrics.jsonl"), "-o", str(tmp_path / "again.png")]) == 0
    assert titles == ["cartpole-run1: mean episode return"] * 2

    assert main(["plot", str(tmp_path)]) == 2  # a folder that is no run
    err = capsys.readouterr().err
    assert "is a directory without metrics.jsonl" in err and "Traceback" not in err


# ------------------------------------------------------------------- train, resume, inspect, evaluate
def test_train_resume_inspect_evaluate_and_plot(tmp_path, capsys):
    run = tmp_path / "cartpole"
    first = dlearner(
        "train",
        "--algo",
        "PPO",
        "--env",
        "CartPole-v1",
        "--num-learners",
        "0",
        "--num-env-runners",
        "0",
        "--stop-iters",
        "2",
        "--checkpoint",
        str(run),
        *FAST,
    )
    assert first.returncode == 0, first.stderr
    assert "Traceback" not in first.stderr
    # Not a terminal: one progress line per iteration.
    progress = [line.split("|")[0].strip() for line in first.stdout.splitlines() if line.startswith("iter")]
    assert progress == ["iter    1", "iter    2"]
    assert (run / "checkpoint" / "zarr.json").is_file()  # the store, with metrics.jsonl beside it
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["training_iteration"] for r in rows] == [1, 2]
    steps_after_2 = rows[-1]["num_env_steps_sampled_lifetime"]
    assert steps_after_2 >= 512
    assert isinstance(rows[-1]["learners/default_policy/total_loss"], float)

    # Starting again in the same directory without --resume would overwrite the run: refused.
    again = dlearner("train", "--env", "CartPole-v1", "--checkpoint", str(run), "--stop-iters", "1", *FAST)
    assert_user_error(again, "--resume", str(run))

    # --resume continues the counters; the settings come from the checkpoint.
    second = dlearner("train", "--checkpoint", str(run), "--resume", "--stop-iters", "4")
    assert second.returncode == 0, second.stderr
    assert "resumed" in second.stdout and "iteration 2" in second.stdout
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["training_iteration"] for r in rows] == [1, 2, 3, 4]
    steps = [r["num_env_steps_sampled_lifetime"] for r in rows]
    assert steps[2] > steps_after_2 and steps == sorted(steps)
    assert steps[3] - steps[2] == steps[1] - steps[0]  # same settings: same steps per iteration
    assert_real_plot(run / "learning_curve.png")

    inspected = dlearner("inspect", str(run))
    assert inspected.returncode == 0, inspected.stderr
    assert "Algorithm" in inspected.stdout and "default_policy" in inspected.stdout
    assert "CartPole-v1" in inspected.stdout
    assert main(["inspect", str(run), "--json"]) == 0
    as_json = json.loads(capsys.readouterr().out)
    assert as_json["metadata"]["counters"]["iteration"] == 4
    assert as_json["metadata"]["config"]["model_config"] == {"fcnet_hiddens": [16, 16]}

    evaluated = dlearner("evaluate", str(run), "--episodes", "2")
    assert evaluated.returncode == 0, evaluated.stderr
    assert len([line for line in evaluated.stdout.splitlines() if line.startswith("episode")]) == 2
    assert "mean return over 2 greedy episodes" in evaluated.stdout
    assert main(["evaluate", str(run), "--episodes", "2", "--seed", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["num_episodes"] == 2 and out["iteration"] == 4 and out["episode_return_mean"] > 0

    curve = tmp_path / "curve.png"
    assert main(["plot", str(run / "metrics.jsonl"), "-o", str(curve)]) == 0
    assert capsys.readouterr().out.strip() == str(curve)
    assert_real_plot(curve)


def test_train_attaches_with_a_scheduler_file_and_leaves_the_cluster_running(tmp_path):
    from distributed import Client, LocalCluster

    scheduler_file = tmp_path / "scheduler.json"
    with LocalCluster(n_workers=1, processes=True, threads_per_worker=1, dashboard_address=":0") as cluster:
        with Client(cluster) as client:
            client.write_scheduler_file(str(scheduler_file))
            proc = dlearner(
                "train",
                "--env",
                "CartPole-v1",
                "--num-learners",
                "1",
                "--num-env-runners",
                "0",
                "--stop-iters",
                "2",
                "--scheduler-file",
                str(scheduler_file),
                "--checkpoint",
                str(tmp_path / "attached"),
                "--run-name",
                "attached-run",
                *FAST,
            )
            assert proc.returncode == 0, proc.stderr
            assert "Traceback" not in proc.stderr
            page = client.dashboard_link.replace("/status", "/dlearner")
            assert page in proc.stdout  # the dashboard link is printed at start
            # The cluster is still there and usable, with its worker.
            assert cluster.status.name == "running"
            assert len(client.scheduler_info()["workers"]) == 1
            assert client.submit(sum, [1, 2]).result() == 3
            # The run's metrics reached the page on the cluster's own dashboard port.
            with urllib.request.urlopen(page + "/metrics.json?run=attached-run", timeout=30) as response:
                (run,) = json.loads(response.read())["runs"]
            assert run["step"] == 2 and "total_loss" in run["learners"]["default_policy"]
    assert [r["training_iteration"] for r in read_metrics(tmp_path / "attached" / "metrics.jsonl")] == [1, 2]


@pytest.mark.slow
def test_train_on_an_embedded_cluster_prints_the_dashboard_link(tmp_path):
    proc = dlearner(
        "train",
        "--env",
        "CartPole-v1",
        "--num-learners",
        "1",
        "--stop-iters",
        "1",
        "--metrics-file",
        str(tmp_path / "m.jsonl"),
        *FAST,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Dask dashboard http://" in proc.stdout and "/dlearner" in proc.stdout
    assert (tmp_path / "learning_curve.png").is_file()


# --------------------------------------------------------------------------- config round trip
def test_config_from_dict_round_trips_the_stored_config():
    config = (
        PPOConfig()
        .environment("CartPole-v1", env_config={"render_mode": None})
        .training(lr=[[0, 1e-3], [1000, 1e-4]], entropy_coeff=0.01, train_batch_size=512)
        .rl_module(model_config={"fcnet_hiddens": [8]})
        .learners(num_learners=2)
        .debugging(seed=7)
    )
    rebuilt = config_from_dict(json.loads(json.dumps(config.to_dict())))
    assert type(rebuilt) is PPOConfig
    assert rebuilt.to_dict() == json.loads(json.dumps(config.to_dict()))


def test_config_from_dict_rebuilds_module_specs_and_refuses_foreign_classes(cartpole):
    spec = RLModuleSpec(
        observation_space=cartpole.observation_space, action_space=cartpole.action_space, model_config={"fcnet_hiddens": [8]}
    )
    config = PPOConfig().environment("CartPole-v1").rl_module(rl_module_spec=spec)
    rebuilt = config_from_dict(config.to_dict())
    assert rebuilt.rl_module_spec.observation_space == cartpole.observation_space
    assert rebuilt.get_multi_rl_module_spec().rl_module_specs["default_policy"].model_config == {"fcnet_hiddens": [8]}

    foreign = {**config.to_dict(), "config_class": "os.system"}
    with pytest.raises(ValueError, match="does not ship"):
        config_from_dict(foreign)
    with pytest.raises(ValueError, match="does not know"):
        config_from_dict({**config.to_dict(), "warp_drive": True})
    with pytest.raises(ValueError, match="callable"):
        config_from_dict({**config.to_dict(), "env": "<callable make_env>"})


# ------------------------------------------------------------------------------------ reporting
def test_flatten_result_gives_plain_json_values():
    flat = flatten_result(
        {
            "training_iteration": np.int64(3),
            "env_runners": {"episode_return_mean": np.float32(1.5), "episode_len_mean": float("nan")},
            "learners": {"default_policy": {"total_loss": np.float64(0.25)}},
            "returns": np.array([1.0, float("inf")]),
        }
    )
    assert flat == {
        "training_iteration": 3,
        "env_runners/episode_return_mean": 1.5,
        "env_runners/episode_len_mean": None,
        "learners/default_policy/total_loss": 0.25,
        "returns": [1.0, None],
    }
    assert type(flat["training_iteration"]) is int and type(flat["env_runners/episode_return_mean"]) is float
    with pytest.raises(TypeError, match="bad"):
        flatten_result({"bad": object()})


def test_metrics_writer_appends_and_resumes_after_the_checkpoint(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    with MetricsWriter(path) as writer:
        for i in range(1, 6):
            writer.write(
                {
                    "training_iteration": i,
                    "num_env_steps_sampled_lifetime": 10 * i,
                    "env_runners": {"episode_return_mean": float(i)},
                }
            )
    with path.open("a") as f:
        f.write('{"training_iteration": 6, "num_env')  # a line torn by a crash
    assert [r["training_iteration"] for r in read_metrics(path)] == [1, 2, 3, 4, 5]
    # Resuming from a checkpoint of iteration 3 drops the rows written after it.
    with MetricsWriter(path, resume_after_iteration=3) as writer:
        writer.write({"training_iteration": 4, "num_env_steps_sampled_lifetime": 40})
    assert [r["training_iteration"] for r in read_metrics(path)] == [1, 2, 3, 4]
    for line in path.read_text().splitlines():
        assert "NaN" not in line
    with MetricsWriter(path) as writer:  # a new run starts a new file
        pass
    assert read_metrics(path) == []


def test_a_metrics_file_grows_within_its_rate_however_fast_the_iterations(tmp_path):
    path = tmp_path / "metrics.jsonl"
    burst, per_day = 20_000, 86_400 * 1000  # 1 kB a second after a 20 kB burst
    started = time.monotonic()
    with MetricsWriter(path, max_bytes_per_day=per_day, burst_bytes=burst) as writer:
        for i in range(1, 3001):  # thousands of iterations a second: far over the rate
            writer.write({"training_iteration": i, "num_env_steps_sampled_lifetime": 500 * i, "pad": "x" * 200})
        skipped = writer.lines_skipped
    elapsed = time.monotonic() - started
    iterations = [r["training_iteration"] for r in read_metrics(path)]
    line = len(path.read_text().splitlines()[0]) + 1
    assert path.stat().st_size <= burst + elapsed * 1000 + 2 * line
    assert skipped > 0 and len(iterations) in (3000 - skipped, 3000 - skipped + 1)  # + the last, held back
    assert iterations[0] == 1 and iterations[-1] == 3000  # the first lines and the run's last one are there
    assert iterations == sorted(iterations)
    with MetricsWriter(path, max_bytes_per_day=None) as writer:  # no bound: every line
        for i in range(1, 3001):
            writer.write({"training_iteration": i, "pad": "x" * 200})
    assert len(read_metrics(path)) == 3000


def test_plot_learning_curve_draws_a_real_plot_and_explains_an_empty_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsWriter(path) as writer:
        writer.write(
            {"training_iteration": 1, "num_env_steps_sampled_lifetime": 100, "env_runners": {"episode_return_mean": float("nan")}}
        )
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_learning_curve(path, tmp_path / "empty.png")
    with MetricsWriter(path) as writer:
        for i in range(1, 30):
            writer.write(
                {
                    "training_iteration": i,
                    "num_env_steps_sampled_lifetime": 1000 * i,
                    "env_runners": {
                        "episode_return_mean": 10.0 + i * i / 2,
                        "episode_return_min": 5.0,
                        "episode_return_max": 20.0 + i * i,
                    },
                }
            )
    png = tmp_path / "curve.png"
    assert plot_learning_curve(path, png, title="test") == str(png)
    assert_real_plot(png)


def test_progress_display_lines_and_live_mode():
    result = {
        "training_iteration": 2,
        "num_env_steps_sampled_lifetime": 4000,
        "time_this_iter_s": 0.5,
        "env_runners": {"episode_return_mean": 42.25},
    }
    plain = io.StringIO()
    display = ProgressDisplay(plain, start_env_steps=2000)
    assert display.live is False  # a StringIO is not a terminal
    text = display.update(result)
    assert plain.getvalue() == text + "\n"
    assert "iter    2" in text and "4,000" in text and "42.2" in text and "4,000 steps/s" in text and "elapsed" in text
    display.update({**result, "env_runners": {"episode_return_mean": float("nan")}})
    assert "return     n/a" in plain.getvalue()

    live = io.StringIO()
    display = ProgressDisplay(live, live=True)
    display.update(result)
    display.update({**result, "training_iteration": 3})
    display.message("done")
    assert live.getvalue().count("\r") == 2 and live.getvalue().endswith("\ndone\n")


# ------------------------------------------------------------------- start-up time, output flags
def test_importing_the_cli_does_not_import_torch_and_help_works():
    # `dlearner --help` and bad flags must answer at once: torch, dask and the algorithms load inside commands.
    probe = subprocess.run(
        [sys.executable, "-c", "import dlearner.cli, sys; print('torch' in sys.modules, 'distributed' in sys.modules)"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == ["False", "False"]
    for args in (["--help"], ["train", "--help"]):
        proc = dlearner(*args)
        assert proc.returncode == 0, proc.stderr
        assert "usage: dlearner" in proc.stdout
    assert "--startup-timeout" in proc.stdout and "SIGTERM" in proc.stdout


def test_the_package_imports_its_public_names_lazily():
    import dlearner

    code = (
        "import sys, dlearner; assert 'torch' not in sys.modules; "
        "from dlearner import *; from dlearner import PPOConfig, Columns, LearnerGroup, DEFAULT_MODULE_ID; "
        "import dlearner.checkpoint; print(sorted(dlearner.__all__) == sorted(n for n in dir(dlearner) if n in dlearner.__all__))"
    )
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "True"
    for name in dlearner.__all__:
        assert getattr(dlearner, name) is not None
    with pytest.raises(AttributeError, match="no_such_name"):
        dlearner.no_such_name  # noqa: B018


def test_quiet_and_verbose_set_what_is_shown(tmp_path, capsys):
    args = ["train", "--env", "CartPole-v1", "--stop-iters", "1", "--metrics-file", str(tmp_path / "m.jsonl"), *FAST]
    assert main(["-q", *args]) == 0
    out = capsys.readouterr()
    assert out.out == "" and "iter" not in out.err  # no progress, no informational messages
    assert main([*args, "--verbose"]) == 0
    out = capsys.readouterr()
    assert "iter    1" in out.out
    import logging

    # The logger is left as it was found (main() may run many times in one process).
    assert not logging.getLogger("dlearner").handlers


def test_startup_timeout_must_be_a_positive_number(capsys):
    for bad in ("0", "-1", "soon"):
        with pytest.raises(SystemExit) as exit_:
            main(["train", "--env", "CartPole-v1", "--startup-timeout", bad])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert "--startup-timeout" in err and "Traceback" not in err


def test_a_failure_inside_training_exits_1_in_one_line_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    """Not a usage error: status 1 and the error's own one-line summary; --debug adds the traceback."""
    from dlearner.algorithms.ppo import PPOConfig as Config

    def broken_build(self):
        raise RuntimeError("learner exploded\nsecond line of detail")

    monkeypatch.setattr(Config, "build_algo", broken_build)
    args = ["train", "--env", "CartPole-v1", "--stop-iters", "1", *FAST]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "dlearner: error: RuntimeError: learner exploded  (--debug shows the full traceback)"
    assert "Traceback" not in err and "second line" not in err
    assert main([*args, "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "second line of detail" in err


def test_run_folder_keeps_the_store_in_a_subfolder_and_commands_accept_either(tmp_path, capsys):
    import warnings

    import zarr

    run = tmp_path / "layout"
    assert (
        main(
            [
                "train",
                "--env",
                "CartPole-v1",
                "--num-learners",
                "0",
                "--num-env-runners",
                "0",
                "--stop-iters",
                "1",
                "--checkpoint",
                str(run),
                *FAST,
            ]
        )
        == 0
    )
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint", "learning_curve.png", "metrics.jsonl"]
    store = run / "checkpoint"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # zarr warns about files in a store that are not Zarr nodes
        assert list(zarr.open_group(str(store), mode="r").members(max_depth=None))

    # --resume given the store itself: the metrics still go beside it, into the run folder.
    assert main(["train", "--checkpoint", str(store), "--resume", "--stop-iters", "2"]) == 0
    assert [r["training_iteration"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2]
    assert sorted(p.name for p in store.iterdir()) == ["versions", "zarr.json"]
    capsys.readouterr()
    for where in (run, store):
        assert main(["inspect", str(where), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["metadata"]["counters"]["iteration"] == 2
        assert main(["evaluate", str(where), "--episodes", "1", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["iteration"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("algo, batch_size", [("APPO", None), ("IMPALA", 500)])
def test_train_runs_the_asynchronous_algorithms_and_logs_policy_lag(tmp_path, algo, batch_size):
    run = tmp_path / algo.lower()
    sized = ["--train-batch-size", str(batch_size)] if batch_size else []
    proc = dlearner(
        "train",
        "--algo",
        algo,
        "--env",
        "CartPole-v1",
        "--stop-iters",
        "2",
        "--checkpoint",
        str(run),
        "--fcnet-hiddens",
        "16,16",
        "--seed",
        "0",
        *sized,
    )
    assert proc.returncode == 0, proc.stderr
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["training_iteration"] for r in rows] == [1, 2]
    assert all("policy_lag_mean" in r and r["num_env_steps_dropped_lifetime"] == 0 for r in rows)
    if batch_size is None:
        # By default an iteration (one progress line, one metrics line) stands for at least 5 s of work.
        assert all(r["time_this_iter_s"] >= 5.0 for r in rows)
    else:
        # --train-batch-size makes an iteration stand for that many newly trained samples instead.
        trained = [0] + [r["num_env_steps_trained_lifetime"] for r in rows]
        assert all(after - before >= batch_size for before, after in zip(trained, trained[1:]))
        assert all(r["time_this_iter_s"] < 5.0 for r in rows)
    inspected = dlearner("inspect", str(run))
    assert inspected.returncode == 0 and algo in inspected.stdout


@pytest.mark.slow
def test_train_runs_sac_on_a_continuous_action_env_and_resumes_with_a_refilled_buffer(tmp_path):
    run = tmp_path / "sac"
    common = ["--env", "Pendulum-v1", "--num-learners", "0", "--num-env-runners", "0", "--checkpoint", str(run)]
    proc = dlearner("train", "--algo", "SAC", *common, "--stop-iters", "2", "--fcnet-hiddens", "16,16", "--lr", "0.002")
    assert proc.returncode == 0, proc.stderr
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["replay_buffer_size"] for r in rows] == [1000, 2000]
    # Learning starts at 1,000 transitions: one update of 256 rows per env step after that.
    assert rows[-1]["num_env_steps_trained_lifetime"] == 1000 * 256
    for name in ("qf", "policy", "alpha"):  # --lr sets SAC's three learning rates
        assert rows[-1][f"learners/default_policy/{name}_learning_rate"] == pytest.approx(0.002)
    resumed = dlearner("train", "--resume", *common, "--stop-iters", "3")
    assert resumed.returncode == 0, resumed.stderr
    last = read_metrics(run / "metrics.jsonl")[-1]
    # The buffer stays out of checkpoints by default: the resumed run refills it before learning again.
    assert last["training_iteration"] == 3 and last["replay_buffer_size"] == 1000
    assert last["num_env_steps_trained_lifetime"] == 1000 * 256


@pytest.mark.slow
def test_a_checkpoint_never_imports_the_module_of_a_module_env_id_by_itself(tmp_path):
    """`module:Env` ids import `module`: `--resume` and `evaluate` need the user to name the id again."""
    (tmp_path / "their_envs.py").write_text(
        "import gymnasium as gym\n"
        "gym.register('TheirCartPole-v0', entry_point='gymnasium.envs.classic_control.cartpole:CartPoleEnv', "
        "max_episode_steps=500)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    run, env_id = tmp_path / "run", "their_envs:TheirCartPole-v0"

    def cli(*args):
        return subprocess.run([DLEARNER, *args], capture_output=True, text=True, timeout=180, env=env)

    assert cli("train", "--env", env_id, "--stop-iters", "1", "--checkpoint", str(run), *FAST).returncode == 0
    # These three only read the checkpoint: they run side by side.
    refused, evaluated, refused_resume = side_by_side(
        ["evaluate", str(run), "--episodes", "1"],
        ["evaluate", str(run), "--episodes", "1", "--env", env_id],
        ["train", "--checkpoint", str(run), "--resume", "--stop-iters", "2", *FAST],
        env=env,
    )
    assert refused.returncode == 2 and f"pass --env {env_id}" in refused.stderr
    assert evaluated.returncode == 0, evaluated.stderr
    assert refused_resume.returncode == 2 and f"pass --env {env_id}" in refused_resume.stderr
    assert cli("train", "--checkpoint", str(run), "--resume", "--stop-iters", "2", "--env", env_id, *FAST).returncode == 0
