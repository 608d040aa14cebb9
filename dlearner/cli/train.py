"""``dlearner train``: build the run, train until a stop condition or a signal, save, report.

See :mod:`dlearner.cli` and ``dlearner train --help`` for what the user sees.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional

from dlearner.cli.algorithms import algo_name
from dlearner.cli.cluster import attach
from dlearner.cli.dashboard import RunDashboard
from dlearner.cli.errors import EXIT_INTERRUPTED, EXIT_OK, TrainingFailed, UsageError
from dlearner.cli.multi_agent import MultiAgentSetup
from dlearner.cli.runs import checkpoint_store, committed_iteration, output_paths, resume_command
from dlearner.cli.signals import StopSignals, aborted, notice, signal_summary
from dlearner.cli.stop import StopConditions
from dlearner.cli.train_config import check_train_args, make_config

if TYPE_CHECKING:
    from dlearner.config import AlgorithmConfig


def cmd_train(args: argparse.Namespace) -> int:
    """``dlearner train``: see the module docstring and ``dlearner train --help``."""
    from dlearner.reporting import MetricsWriter, ProgressDisplay

    check_train_args(args)
    config, resume_metadata, multi_agent = make_config(args)  # every flag is checked before any cluster starts
    name = algo_name(config)
    metrics_path, png_path = output_paths(args)
    quiet = args.log_level == "WARNING"
    null = open(os.devnull, "w") if quiet else None  # -q: no progress lines, no informational messages
    progress = ProgressDisplay(null)
    progress.message(f"dlearner: {_describe_setup(name, config, multi_agent)}")
    signals = StopSignals()
    state = RunState()
    own_connection = algo = writer = dashboard = None
    try:
        with signals.installed():
            try:
                own_connection = attach(args, config)
                algo = config.build_algo()
                algo.dashboard_run_name = None  # this command publishes under its own run name (below)
                if resume_metadata is not None:
                    algo.restore_from_path(args.checkpoint)
                    progress.message(
                        f"dlearner: resumed {args.checkpoint} at iteration {algo.iteration}, "
                        f"{algo.num_env_steps_sampled_lifetime:,} env steps"
                    )
                    state.last_saved = algo.iteration
                elif args.checkpoint is not None:
                    # Save before anything else is written there: the run folder holds its store from the start
                    # (and --resume works at once). Later saves to DIR find DIR/checkpoint (save_to_path resolves).
                    with signals.during("save"):
                        algo.save_to_path(checkpoint_store(args.checkpoint))
                    state.last_saved = algo.iteration
                dashboard = RunDashboard(args, algo.client, algo.dashboard_url, name, config, progress)
                algo.run_name = dashboard.run_name  # TensorBoard and MLflow name the run as the page does
                _describe_loggers(algo, progress)
                dashboard.status("running", algo=algo)
                signals.phase = "idle"
                stop = StopConditions(args, start_iteration=algo.iteration)
                progress.message(f"dlearner: stopping at {stop.describe()}")
                if metrics_path is not None:
                    writer = MetricsWriter(metrics_path, resume_after_iteration=algo.iteration if resume_metadata else None)
                _train_loop(args, algo, stop, writer, progress, dashboard, signals, state)
                signals.phase = "finish"
                progress.close()
                if state.result is not None:
                    dashboard.publish(state.result, last=True)
                dashboard.status(
                    "stopped" if signals.requested is not None else "finished",
                    state.reason if signals.requested is not None else None,
                )
                if args.checkpoint and algo.iteration != state.last_saved:
                    with signals.during("save"):
                        algo.save_to_path(args.checkpoint)
                    state.last_saved = algo.iteration
            except (UsageError, KeyboardInterrupt):
                raise
            except Exception as err:
                # Raised while training ran: exit status 1 with the error's summary (main), not a usage error.
                if args.checkpoint and state.last_saved is not None and signals.phase != "start":
                    print(
                        f"dlearner: the checkpoint {args.checkpoint} holds iteration "
                        f"{committed_iteration(args.checkpoint, state.last_saved)}; continue "
                        f"with: {resume_command(args)}",
                        file=sys.stderr,
                    )
                if dashboard is not None:
                    dashboard.status("failed", err)
                raise TrainingFailed(err) from err
            progress.message(f"dlearner: stopped: {state.reason}")
            if args.checkpoint:
                progress.message(
                    f"dlearner: checkpoint {args.checkpoint} (iteration {algo.iteration}, "
                    f"{algo.num_env_steps_sampled_lifetime:,} env steps)"
                )
            if writer is not None:
                writer.close()
                progress.message(f"dlearner: metrics {metrics_path}")
                _draw_curve(metrics_path, png_path, f"{name} on {config.env} ({dashboard.run_name})", progress)
            elif state.result is not None and not quiet:
                print(
                    "dlearner: note: no --checkpoint or --metrics-file, so no metrics file or learning curve was written.",
                    file=sys.stderr,
                )
            if signals.requested is not None:
                notice(signal_summary(args, signals.requested, state.last_saved))
                return EXIT_OK if signals.requested == signal.SIGTERM else EXIT_INTERRUPTED
            return EXIT_OK
    except KeyboardInterrupt:
        if signals.aborted_by is None:
            raise  # a Ctrl-C our handler did not see (not the main thread): main reports it
        if dashboard is not None:
            dashboard.status("stopped", f"{signal.Signals(signals.aborted_by).name} again: stopped at once")
        return aborted(args, signals, state.last_saved)
    finally:
        progress.close()
        if writer is not None:
            writer.close()
        try:
            if algo is not None:
                algo.stop()
        finally:
            if own_connection is not None:
                own_connection.close()  # only our client: the cluster we attached to keeps running
            if null is not None:
                null.close()


class RunState:
    """What ``train`` has done so far: read by the messages after a stop, a failure or an abort."""

    def __init__(self) -> None:
        self.result: Optional[Dict[str, Any]] = None  # the last iteration's result
        self.reason: str = ""  # why training stopped
        self.last_saved: Optional[int] = None  # iteration of the newest complete checkpoint


def _train_loop(
    args: argparse.Namespace,
    algo: Any,
    stop: StopConditions,
    writer: Any,
    progress: Any,
    dashboard: RunDashboard,
    signals: StopSignals,
    state: RunState,
) -> None:
    """Train until a stop condition is reached or SIGTERM/SIGINT asks to stop; fills in ``state``.

    The stop request is only looked at between iterations, so an iteration is never cut in half: the
    checkpoint written after the loop holds the weights and counters of the same iteration.
    """
    progress.begin(algo.num_env_steps_sampled_lifetime)
    reason = stop.reached(algo.iteration, algo.num_env_steps_sampled_lifetime, None)
    while reason is None and signals.requested is None:
        signals.iteration = algo.iteration + 1
        with signals.during("iterate"):
            result = algo.train()
        state.result = result
        if writer is not None:
            writer.write(result)
        progress.update(result)
        dashboard.publish(result)
        iteration = int(result["training_iteration"])
        if args.checkpoint and args.checkpoint_every and iteration % args.checkpoint_every == 0:
            with signals.during("save"):
                algo.save_to_path(args.checkpoint)
            state.last_saved = iteration
        reason = stop.reached(
            iteration, int(result["num_env_steps_sampled_lifetime"]), result["env_runners"].get("episode_return_mean")
        )
    if reason is None and signals.requested is not None:
        reason = f"{signal.Signals(signals.requested).name} received after iteration {algo.iteration}"
    state.reason = reason or ""


def _describe_setup(name: str, config: AlgorithmConfig, multi_agent: Optional[MultiAgentSetup]) -> str:
    learners = config.num_learners
    runners = config.num_env_runners
    where = (
        (f"{learners} learner actor{'s' if learners != 1 else ''}" if learners else "1 learner in this process")
        + ", "
        + (f"{runners} env-runner actor{'s' if runners != 1 else ''}" if runners else "sampling in this process")
        + f" x {config.num_envs_per_env_runner} env{'s' if config.num_envs_per_env_runner != 1 else ''}"
    )
    agents = f" ({multi_agent.describe()})" if multi_agent is not None else ""
    return f"training {name} on {config.env}{agents}: {where}"


def _describe_loggers(algo: Any, progress: Any) -> None:
    """One line per ``--logger``: where it writes and how to look at it."""
    from dlearner.loggers import logger_targets

    for name, target in logger_targets(algo.config, algo.run_name).items():
        if name == "tensorboard":
            progress.message(f"dlearner: TensorBoard event files in {target}  (tensorboard --logdir {target})")
        else:
            progress.message(
                f"dlearner: MLflow run {algo.run_name!r} in experiment {algo.config.mlflow_experiment_name!r} at {target}"
                + (f"  (mlflow ui --backend-store-uri {target})" if target.startswith("sqlite:") else "")
            )


def _draw_curve(metrics_path: Path, png_path: Optional[Path], title: str, progress: Any) -> None:
    from dlearner.reporting import plot_learning_curve

    if png_path is None:
        return
    try:
        plot_learning_curve(metrics_path, png_path, title=title)
    except ValueError as err:  # no finished episode yet: training itself succeeded
        print(f"dlearner: warning: learning curve not drawn: {err}", file=sys.stderr)
    else:
        progress.message(f"dlearner: learning curve {png_path}")
