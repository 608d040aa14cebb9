"""The ``dlearner`` command: ``train``, ``evaluate``, ``inspect`` and ``plot``.

Examples::

    dlearner train --algo PPO --env CartPole-v1 --num-learners 2 --num-env-runners 1 \\
        --stop-return 475 --checkpoint runs/cartpole
    dlearner train --checkpoint runs/cartpole --resume --stop-iters 50    # continue the same run
    dlearner train ... --scheduler-file sched.json                        # attach to a running cluster
    dlearner evaluate runs/cartpole --episodes 10
    dlearner inspect runs/cartpole
    dlearner plot runs/cartpole/metrics.jsonl -o curve.png

Exit status: 0 on success, 2 for a bad flag, path or setting (the message on stderr names it),
130 when interrupted with Ctrl-C (training saves a checkpoint first).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from dlearner.algorithms import PPOConfig
from dlearner.config import AlgorithmConfig

__all__ = ["TRAINABLE_ALGORITHMS", "config_from_dict", "main"]

#: Algorithms ``dlearner train --algo`` can train on an environment, by name. BC learns from a fixed
#: dataset (offline), so it has no place here; add online algorithms as they are written.
TRAINABLE_ALGORITHMS: Dict[str, Callable[[], AlgorithmConfig]] = {"PPO": PPOConfig}

#: Iterations a ``train`` invocation runs when no stop flag is given.
DEFAULT_STOP_ITERS = 100
METRICS_FILENAME = "metrics.jsonl"
CURVE_FILENAME = "learning_curve.png"

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what shells report for a command whose reader closed the pipe


class UsageError(Exception):
    """A user mistake (bad flag, path or setting): reported as ``dlearner: error: ...``, exit status 2."""


# ------------------------------------------------------------------------------- the parser
def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type for ints ``>= minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _hiddens(text: str) -> List[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer sizes such as 64,64, got {text!r}") from None
    if any(size < 1 for size in sizes):
        raise argparse.ArgumentTypeError(f"layer sizes must be >= 1, got {text!r}")
    return sizes


def _json_object(text: str) -> Dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"invalid JSON ({err.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"key\": 1}}', got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``dlearner`` argument parser (subcommands ``train``, ``evaluate``, ``inspect``, ``plot``)."""
    from dlearner import __version__

    parser = argparse.ArgumentParser(
        prog="dlearner",
        description="Train reinforcement-learning models with data-parallel learners on Dask.",
    )
    parser.add_argument("--version", action="version", version=f"dlearner {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # ---------------------------------------------------------------------------------- train
    train = sub.add_parser(
        "train",
        help="train an algorithm on an environment",
        description=(
            "Train an algorithm on a gymnasium environment until a stop condition is reached. Without --address "
            "or --scheduler-file, Dask learners and env runners run on an embedded LocalCluster; with "
            "--num-learners 0 --num-env-runners 0 everything runs in this process. With --resume, the settings "
            "stored in the checkpoint are used and the flags given override them."
        ),
        epilog=(
            f"Stop flags: training stops at the first one reached; with none, it runs {DEFAULT_STOP_ITERS} "
            "iterations. --stop-iters and --stop-timesteps count from the start of the run, so after --resume "
            "they include the iterations and steps already done."
        ),
    )
    what = train.add_argument_group("what to train")
    what.add_argument("--algo", choices=sorted(TRAINABLE_ALGORITHMS), default=None,
                      help="algorithm (default: PPO, or the checkpoint's with --resume)")
    what.add_argument("--env", default=None, metavar="ID",
                      help="gymnasium environment id, e.g. CartPole-v1 (required unless --resume)")
    what.add_argument("--env-config", type=_json_object, default=None, metavar="JSON",
                      help="keyword arguments for gymnasium.make, as a JSON object")

    where = train.add_argument_group("where it runs")
    cluster = where.add_mutually_exclusive_group()
    cluster.add_argument("--address", default=None, metavar="ADDR",
                         help="attach to the Dask scheduler at ADDR, e.g. tcp://host:8786")
    cluster.add_argument("--scheduler-file", default=None, metavar="PATH",
                         help="attach to the Dask scheduler described by this scheduler file (HPC)")
    where.add_argument("--num-learners", type=_non_negative_int, default=None, metavar="N",
                       help="Learner actors on Dask workers; 0 = one learner in this process (default: 0)")
    where.add_argument("--num-env-runners", type=_non_negative_int, default=None, metavar="N",
                       help="env-runner actors on Dask workers; 0 = sample in this process (default: 0)")
    where.add_argument("--num-envs-per-env-runner", type=_positive_int, default=None, metavar="K",
                       help="vectorised environments per env runner (default: the algorithm's)")
    where.add_argument("--num-gpus-per-learner", type=_finite_float, default=None, metavar="G",
                       help="GPUs per learner; fractional values share a GPU (default: 0)")
    where.add_argument("--num-cpus-per-learner", type=_positive_int, default=None, metavar="C",
                       help="CPU threads per learner (default: 1)")

    hyper = train.add_argument_group("hyper-parameters (default: the algorithm's)")
    hyper.add_argument("--lr", type=_finite_float, default=None, help="learning rate")
    hyper.add_argument("--gamma", type=_finite_float, default=None, help="discount factor")
    hyper.add_argument("--train-batch-size", type=_positive_int, default=None, metavar="ROWS",
                       help="env steps sampled per iteration (over all env runners)")
    hyper.add_argument("--minibatch-size", type=_positive_int, default=None, metavar="ROWS",
                       help="rows per gradient step (over all learners)")
    hyper.add_argument("--num-epochs", type=_positive_int, default=None, metavar="N",
                       help="passes over each train batch")
    hyper.add_argument("--fcnet-hiddens", type=_hiddens, default=None, metavar="SIZES",
                       help="hidden layer sizes, e.g. 64,64")
    hyper.add_argument("--fcnet-activation", default=None, metavar="NAME", help="hidden activation, e.g. tanh, relu")
    hyper.add_argument("--seed", type=_non_negative_int, default=None, help="seed for reproducible runs")

    stop = train.add_argument_group("when to stop")
    stop.add_argument("--stop-return", type=_finite_float, default=None, metavar="R",
                      help="stop when the mean episode return reaches R")
    stop.add_argument("--stop-iters", type=_positive_int, default=None, metavar="N",
                      help="stop after training iteration N")
    stop.add_argument("--stop-timesteps", type=_positive_int, default=None, metavar="T",
                      help="stop once T env steps have been sampled")

    out = train.add_argument_group("checkpoints and output")
    out.add_argument("--checkpoint", default=None, metavar="DIR",
                     help="checkpoint directory (or fsspec URL): saved periodically and at the end")
    out.add_argument("--checkpoint-every", type=_non_negative_int, default=10, metavar="N",
                     help="save every N iterations; 0 = only at the end (default: 10)")
    out.add_argument("--resume", action="store_true", help="continue from the checkpoint in --checkpoint")
    out.add_argument("--metrics-file", default=None, metavar="PATH",
                     help=f"JSON-lines metrics file (default: DIR/{METRICS_FILENAME} with --checkpoint)")
    out.add_argument("--plot", default=None, metavar="PNG",
                     help=f"learning-curve PNG written at the end (default: DIR/{CURVE_FILENAME} with --checkpoint, "
                          "else beside the metrics file)")
    out.add_argument("--run-name", default=None, metavar="NAME",
                     help="name of the run on the dashboard page (default: the checkpoint directory's name)")
    out.add_argument("--no-dashboard", action="store_true", help="do not add the dlearner page to the Dask dashboard")
    train.set_defaults(func=cmd_train)

    # ------------------------------------------------------------------------------- evaluate
    evaluate = sub.add_parser(
        "evaluate",
        help="run greedy episodes with a checkpoint's policy",
        description="Rebuild the algorithm from a checkpoint's stored settings (in this process) and run greedy episodes.",
    )
    evaluate.add_argument("checkpoint", metavar="DIR", help="a checkpoint written by `dlearner train`")
    evaluate.add_argument("--episodes", type=_positive_int, default=10, help="episodes to run (default: 10)")
    evaluate.add_argument("--seed", type=_non_negative_int, default=None, help="seed of the first episode's reset")
    evaluate.add_argument("--json", action="store_true", help="print the results as JSON")
    evaluate.set_defaults(func=cmd_evaluate)

    # -------------------------------------------------------------------------------- inspect
    inspect = sub.add_parser("inspect", help="show what a checkpoint holds",
                             description="Show a checkpoint's modules, array shapes, counters and config.")
    inspect.add_argument("checkpoint", metavar="DIR", help="a dlearner checkpoint")
    inspect.add_argument("--json", action="store_true", help="print the summary as JSON")
    inspect.set_defaults(func=cmd_inspect)

    # ----------------------------------------------------------------------------------- plot
    plot = sub.add_parser("plot", help="draw a learning curve from a metrics file",
                          description="Draw the mean episode return against env steps from a metrics file.")
    plot.add_argument("metrics_file", metavar="METRICS_FILE", help=f"a {METRICS_FILENAME} written by `dlearner train`")
    plot.add_argument("-o", "--output", default=None, metavar="PNG",
                      help=f"PNG to write (default: {CURVE_FILENAME} beside the metrics file)")
    plot.add_argument("--title", default=None, help="plot title")
    plot.set_defaults(func=cmd_plot)
    return parser


# ------------------------------------------------------------------------------ entry point
def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``dlearner`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)  # exits with status 2 and argparse's message on a bad flag
    try:
        return int(args.func(args))
    except (UsageError, FileNotFoundError, ValueError) as err:
        # User errors: say what was wrong, no traceback (the messages name the flag, path or setting).
        print(f"dlearner: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("dlearner: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`dlearner inspect DIR | head`): not an error of ours. Point stdout at
        # devnull so the interpreter's final flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


@contextlib.contextmanager
def _flag(name: str) -> Iterator[None]:
    """Report a ``ValueError``/``TypeError`` from a config setter as an error of the flag ``name``."""
    try:
        yield
    except (ValueError, TypeError) as err:
        raise UsageError(f"argument {name}: {err}") from err


# ---------------------------------------------------------------------------- configs
config_from_dict = AlgorithmConfig.from_dict


def _algo_name(config: AlgorithmConfig) -> str:
    for name, factory in TRAINABLE_ALGORITHMS.items():
        if type(config) is factory:
            return name
    return type(config).__name__.removesuffix("Config")


def _apply_flags(config: AlgorithmConfig, args: argparse.Namespace) -> None:
    """Apply the settings flags the user gave (``None`` = not given) to ``config``."""
    if args.env is not None:
        with _flag("--env"):
            config.environment(args.env)
    if args.env_config is not None:
        with _flag("--env-config"):
            config.environment(env_config=args.env_config)
    for flag, attr, setter in (
        ("--num-env-runners", "num_env_runners", config.env_runners),
        ("--num-envs-per-env-runner", "num_envs_per_env_runner", config.env_runners),
        ("--num-learners", "num_learners", config.learners),
        ("--num-gpus-per-learner", "num_gpus_per_learner", config.learners),
        ("--num-cpus-per-learner", "num_cpus_per_learner", config.learners),
        ("--lr", "lr", config.training),
        ("--gamma", "gamma", config.training),
        ("--train-batch-size", "train_batch_size", config.training),
        ("--minibatch-size", "minibatch_size", config.training),
        ("--num-epochs", "num_epochs", config.training),
        ("--seed", "seed", config.debugging),
    ):
        value = getattr(args, attr)
        if value is not None:
            with _flag(flag):
                setter(**{attr: value})
    model_config = dict(config.model_config)
    if args.fcnet_hiddens is not None:
        model_config["fcnet_hiddens"] = args.fcnet_hiddens
    if args.fcnet_activation is not None:
        model_config["fcnet_activation"] = args.fcnet_activation
    if model_config != config.model_config:
        with _flag("--fcnet-hiddens/--fcnet-activation"):
            config.rl_module(model_config=model_config)


# ---------------------------------------------------------------------------- checkpoints
def _is_url(path: str) -> bool:
    return "://" in path


def _local_dir(path: str) -> Optional[Path]:
    """The local directory of a checkpoint path (``file://`` URLs included), or ``None`` for remote URLs."""
    if path.startswith("file://"):
        return Path(urllib.parse.urlsplit(path).path)
    return None if _is_url(path) else Path(path)


def _checkpoint_metadata(path: str) -> Optional[Dict[str, Any]]:
    """The metadata of the checkpoint at ``path``, ``None`` if nothing is there.

    Raises ``ValueError`` for something that is not a dlearner checkpoint (its message says what is there).
    """
    from dlearner.checkpoint import read_metadata

    local = _local_dir(path)
    if local is not None and local.is_dir() and not any(local.iterdir()):
        return None  # an empty directory: a fine place for a new run
    try:
        return read_metadata(path)
    except FileNotFoundError:
        return None


def _load_run_metadata(path: str, what: str) -> Dict[str, Any]:
    """Metadata of the Algorithm checkpoint at ``path``; errors name ``path``."""
    from dlearner.checkpoint import read_metadata

    metadata = read_metadata(path)  # FileNotFoundError / ValueError name the path
    if metadata.get("kind") != "Algorithm" or not isinstance(metadata.get("config"), Mapping):
        raise ValueError(
            f"{path!r} is a dlearner {metadata.get('kind')!r} checkpoint, not a training run's (Algorithm) checkpoint; "
            f"{what} needs a checkpoint written by `dlearner train` or algo.save_to_path()."
        )
    return metadata


# ---------------------------------------------------------------------------------- train
class _StopConditions:
    """The ``--stop-*`` flags; the first one reached ends training."""

    def __init__(self, args: argparse.Namespace, start_iteration: int):
        self.stop_return: Optional[float] = args.stop_return
        self.stop_timesteps: Optional[int] = args.stop_timesteps
        self.stop_iters: Optional[int] = args.stop_iters
        self.default_used = args.stop_return is None and args.stop_timesteps is None and args.stop_iters is None
        if self.default_used:
            self.stop_iters = start_iteration + DEFAULT_STOP_ITERS

    def describe(self) -> str:
        parts = []
        if self.stop_return is not None:
            parts.append(f"mean return >= {self.stop_return:g}")
        if self.stop_iters is not None:
            parts.append(f"iteration {self.stop_iters}")
        if self.stop_timesteps is not None:
            parts.append(f"{self.stop_timesteps:,} env steps")
        text = " or ".join(parts)
        return text + (f" (no stop flag given: {DEFAULT_STOP_ITERS} iterations)" if self.default_used else "")

    def reached(self, iteration: int, env_steps: int, mean_return: Optional[float]) -> Optional[str]:
        """Why to stop now, or ``None`` to go on."""
        if self.stop_return is not None and mean_return is not None and math.isfinite(mean_return) \
                and mean_return >= self.stop_return:
            return f"mean return {mean_return:.1f} >= {self.stop_return:g} (--stop-return)"
        if self.stop_iters is not None and iteration >= self.stop_iters:
            return f"reached iteration {iteration} (--stop-iters {self.stop_iters})" if not self.default_used \
                else f"ran {DEFAULT_STOP_ITERS} iterations (the default when no stop flag is given)"
        if self.stop_timesteps is not None and env_steps >= self.stop_timesteps:
            return f"sampled {env_steps:,} env steps >= {self.stop_timesteps:,} (--stop-timesteps)"
        return None


def _check_train_args(args: argparse.Namespace) -> None:
    if args.resume and args.checkpoint is None:
        raise UsageError("argument --resume: needs --checkpoint DIR, the run to continue.")
    if args.scheduler_file is not None and not Path(args.scheduler_file).is_file():
        raise UsageError(
            f"argument --scheduler-file: {args.scheduler_file!r} does not exist; pass the file the scheduler wrote "
            "(dask scheduler --scheduler-file PATH)."
        )
    if args.plot is not None and args.checkpoint is None and args.metrics_file is None:
        raise UsageError(
            "argument --plot: the curve is drawn from the metrics file; pass --checkpoint DIR or --metrics-file PATH."
        )
    if args.checkpoint is not None and _is_url(args.checkpoint) and _local_dir(args.checkpoint) is None \
            and args.metrics_file is None:
        raise UsageError(
            f"argument --checkpoint: {args.checkpoint!r} is a URL; pass --metrics-file PATH for the metrics file "
            "(it is written locally)."
        )


def _make_config(args: argparse.Namespace) -> Tuple[AlgorithmConfig, Optional[Dict[str, Any]]]:
    """``(config, metadata of the checkpoint to resume or None)`` from the flags."""
    metadata = None
    if args.resume:
        with _flag("--checkpoint"):
            existing = _checkpoint_metadata(args.checkpoint)
        if existing is None:
            raise UsageError(
                f"argument --resume: there is no checkpoint at {args.checkpoint!r} to continue; "
                "drop --resume to start a new run there."
            )
        metadata = _load_run_metadata(args.checkpoint, "--resume")
        with _flag("--resume"):
            config = config_from_dict(metadata["config"])
        stored_algo = _algo_name(config)
        if args.algo is not None and args.algo != stored_algo:
            raise UsageError(
                f"argument --algo: the checkpoint {args.checkpoint!r} was trained with {stored_algo}, not {args.algo}."
            )
        if args.env is not None and args.env != config.env:
            raise UsageError(
                f"argument --env: the checkpoint {args.checkpoint!r} was trained on {config.env!r}, not {args.env!r}; "
                "drop --env, or start a new run in another --checkpoint directory."
            )
        # Where the earlier run's cluster was says nothing about this one: only this invocation's flags count.
        config.address, config.scheduler_file, config.client = None, None, None
    else:
        if args.env is None:
            raise UsageError("argument --env: required to start a run, e.g. --env CartPole-v1 (or continue one with --resume).")
        if args.checkpoint is not None:
            with _flag("--checkpoint"):
                existing = _checkpoint_metadata(args.checkpoint)
            if existing is not None:
                counters = existing.get("counters") or {}
                raise UsageError(
                    f"argument --checkpoint: {args.checkpoint!r} already holds a checkpoint "
                    f"(iteration {counters.get('iteration', '?')}); pass --resume to continue it, or choose a new directory."
                )
        config = TRAINABLE_ALGORITHMS[args.algo or "PPO"]()
    _apply_flags(config, args)
    with _flag("--env"):
        # Fail here, before any cluster starts, if the environment cannot be made.
        config.make_env().close()
    with _flag("--minibatch-size/--train-batch-size"):
        config.validate()
    return config, metadata


def _output_paths(args: argparse.Namespace) -> Tuple[Optional[Path], Optional[Path]]:
    """``(metrics file or None, learning-curve PNG or None)``."""
    local = _local_dir(args.checkpoint) if args.checkpoint is not None else None
    metrics = Path(args.metrics_file) if args.metrics_file else None
    if metrics is None and local is not None:
        metrics = local / METRICS_FILENAME
    if args.plot:
        png = Path(args.plot)
    elif local is not None:
        png = local / CURVE_FILENAME
    elif metrics is not None:
        png = metrics.with_name(CURVE_FILENAME)
    else:
        png = None
    return metrics, png


def _describe_setup(name: str, config: AlgorithmConfig) -> str:
    learners = config.num_learners
    runners = config.num_env_runners
    where = (
        f"{learners} learner actor{'s' if learners != 1 else ''}" if learners else "1 learner in this process"
    ) + ", " + (
        f"{runners} env-runner actor{'s' if runners != 1 else ''}" if runners else "sampling in this process"
    ) + f" x {config.num_envs_per_env_runner} env{'s' if config.num_envs_per_env_runner != 1 else ''}"
    return f"training {name} on {config.env}: {where}"


def cmd_train(args: argparse.Namespace) -> int:
    """``dlearner train``: see the module docstring and ``dlearner train --help``."""
    from dlearner.reporting import MetricsWriter, ProgressDisplay

    _check_train_args(args)
    config, resume_metadata = _make_config(args)  # every flag is checked before any cluster starts
    name = _algo_name(config)
    metrics_path, png_path = _output_paths(args)
    progress = ProgressDisplay()
    progress.message(f"dlearner: {_describe_setup(name, config)}")
    own_client = algo = writer = None
    try:
        own_client = _attach(args, config)
        algo = config.build_algo()
        algo.dashboard_run_name = None  # this command publishes under its own run name (below)
        if resume_metadata is not None:
            algo.restore_from_path(args.checkpoint)
            progress.message(
                f"dlearner: resumed {args.checkpoint} at iteration {algo.iteration}, "
                f"{algo.num_env_steps_sampled_lifetime:,} env steps"
            )
        elif args.checkpoint is not None:
            # Save before anything else is written there: the directory is a checkpoint from the start,
            # so the metrics file and the curve can live beside the store (and --resume works at once).
            algo.save_to_path(args.checkpoint)
        dashboard = _Dashboard(args, own_client if own_client is not None else algo.client, name, config, progress)
        stop = _StopConditions(args, start_iteration=algo.iteration)
        progress.message(f"dlearner: stopping at {stop.describe()}")
        if metrics_path is not None:
            writer = MetricsWriter(metrics_path, resume_after_iteration=algo.iteration if resume_metadata else None)
        result, reason, interrupted, last_saved = _train_loop(args, algo, stop, writer, progress, dashboard)
        progress.close()
        if result is not None:
            dashboard.publish(result, last=True)
        if args.checkpoint and algo.iteration != last_saved:
            algo.save_to_path(args.checkpoint)
        progress.message(f"dlearner: stopped: {reason}")
        if args.checkpoint:
            progress.message(
                f"dlearner: checkpoint {args.checkpoint} (iteration {algo.iteration}, "
                f"{algo.num_env_steps_sampled_lifetime:,} env steps)"
            )
        if writer is not None:
            writer.close()
            progress.message(f"dlearner: metrics {metrics_path}")
            _draw_curve(metrics_path, png_path, f"{name} on {config.env} ({dashboard.run_name})", progress)
        elif result is not None:
            print("dlearner: note: no --checkpoint or --metrics-file, so no metrics file or learning curve was written.",
                  file=sys.stderr)
        return EXIT_INTERRUPTED if interrupted else EXIT_OK
    finally:
        progress.close()
        if writer is not None:
            writer.close()
        if algo is not None:
            algo.stop()
        if own_client is not None:
            own_client.close()  # only our connection: the cluster we attached to keeps running


def _train_loop(
    args: argparse.Namespace, algo: Any, stop: "_StopConditions", writer: Any, progress: Any, dashboard: "_Dashboard"
) -> Tuple[Optional[Dict[str, Any]], str, bool, Optional[int]]:
    """Train until a stop condition (or Ctrl-C/SIGTERM); returns ``(last result, why it stopped,
    interrupted?, iteration of the last checkpoint saved or None)``."""
    progress.begin(algo.num_env_steps_sampled_lifetime)
    reason = stop.reached(algo.iteration, algo.num_env_steps_sampled_lifetime, None)
    last_saved = algo.iteration if args.checkpoint else None
    result: Optional[Dict[str, Any]] = None
    restore_sigterm = _sigterm_interrupts()
    try:
        while reason is None:
            result = algo.train()
            if writer is not None:
                writer.write(result)
            progress.update(result)
            dashboard.publish(result)
            iteration = int(result["training_iteration"])
            if args.checkpoint and args.checkpoint_every and iteration % args.checkpoint_every == 0:
                algo.save_to_path(args.checkpoint)
                last_saved = iteration
            reason = stop.reached(
                iteration, int(result["num_env_steps_sampled_lifetime"]), result["env_runners"].get("episode_return_mean")
            )
    except KeyboardInterrupt:
        return result, "interrupted (Ctrl-C or SIGTERM)", True, last_saved
    finally:
        restore_sigterm()
    return result, reason, False, last_saved


class _Dashboard:
    """Prints the dashboard links and feeds the dlearner page (a no-op without a cluster or with --no-dashboard)."""

    def __init__(self, args: argparse.Namespace, client: Any, name: str, config: AlgorithmConfig, progress: Any):
        self.client = client
        self.enabled = client is not None and not args.no_dashboard
        if args.run_name:
            self.run_name = args.run_name
        elif args.checkpoint:
            # The checkpoint directory's name: a resumed run continues its curve on the page.
            path = urllib.parse.urlsplit(args.checkpoint).path if _is_url(args.checkpoint) else args.checkpoint
            self.run_name = Path(path).name
        else:
            self.run_name = f"{name.lower()}-{config.env}-{time.strftime('%Y%m%d-%H%M%S')}"
        if client is None:
            return
        progress.message(f"dlearner: Dask dashboard {client.dashboard_link}")
        if not self.enabled:
            return
        from dlearner.dashboard import register_dashboard

        try:
            url = register_dashboard(client)
        except RuntimeError as err:
            # The page is an extra: training goes on without it, but say why it is missing.
            print(f"dlearner: warning: no training page on the dashboard: {err}", file=sys.stderr)
            self.enabled = False
            return
        if url:
            progress.message(f"dlearner: training page {url}  (run {self.run_name!r})")

    def publish(self, result: Mapping[str, Any], *, last: bool = False) -> None:
        """Send ``result`` to the page; the ``last`` one waits until it has arrived (the client closes next)."""
        if not self.enabled:
            return
        from dlearner.dashboard import publish_metrics

        try:
            publish_metrics(self.client, self.run_name, result, wait=last)
        except OSError as err:  # the scheduler went away: the run's own outputs are unaffected
            print(f"dlearner: warning: could not send the last metrics to the dashboard: {err}", file=sys.stderr)


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


def _attach(args: argparse.Namespace, config: AlgorithmConfig) -> Any:
    """With ``--address``/``--scheduler-file``: connect, point ``config`` at the cluster, return the client."""
    if args.address is None and args.scheduler_file is None:
        return None
    client = _connect(args)
    config.cluster(client=client)
    if config.num_learners == 0 and config.num_env_runners == 0:
        print(
            "dlearner: warning: --num-learners and --num-env-runners are 0, so only the dashboard page uses the "
            "cluster; pass --num-learners N or --num-env-runners N to train on it.",
            file=sys.stderr,
        )
    return client


def _sigterm_interrupts() -> Callable[[], None]:
    """Make SIGTERM (``kill``, SLURM's time limit, ``scancel``) stop training like Ctrl-C, so the run
    saves its checkpoint; returns a function that restores the previous handler."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # signal handlers can only be set from the main thread

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    return lambda: signal.signal(signal.SIGTERM, previous)


def _connect(args: argparse.Namespace) -> Any:
    """A client of the cluster named by ``--address`` / ``--scheduler-file``; errors name the flag."""
    from distributed import Client

    flag, target = ("--address", args.address) if args.address is not None else ("--scheduler-file", args.scheduler_file)
    try:
        if args.address is not None:
            return Client(args.address, set_as_default=False, timeout="30s")
        return Client(scheduler_file=args.scheduler_file, set_as_default=False, timeout="30s")
    except (OSError, TimeoutError) as err:
        raise UsageError(f"argument {flag}: cannot reach the Dask scheduler of {target!r}: {err}") from err
    except ValueError as err:  # e.g. a scheduler file that is not JSON, or a malformed address
        raise UsageError(f"argument {flag}: {target!r}: {err}") from err


# ------------------------------------------------------------------------------- evaluate
def cmd_evaluate(args: argparse.Namespace) -> int:
    """``dlearner evaluate DIR``: greedy episodes with the checkpoint's policy, in this process."""
    metadata = _load_run_metadata(args.checkpoint, "evaluate")
    config = config_from_dict(metadata["config"])
    # Evaluation is a few episodes in this process: no cluster, no GPU, whatever the run used.
    config.learners(num_learners=0, num_gpus_per_learner=0)
    config.env_runners(num_env_runners=0, num_envs_per_env_runner=1)
    config.address, config.scheduler_file, config.client = None, None, None
    counters = metadata.get("counters") or {}
    with config.build_algo() as algo:
        algo.restore_from_path(args.checkpoint)
        out = algo.evaluate(args.episodes, seed=args.seed)["env_runners"]
    if args.json:
        print(json.dumps({"checkpoint": args.checkpoint, "iteration": counters.get("iteration"), **out}))
        return EXIT_OK
    print(
        f"checkpoint {args.checkpoint}: {_algo_name(config)} on {config.env}, iteration {counters.get('iteration', '?')}, "
        f"{counters.get('num_env_steps_sampled_lifetime', 0):,} env steps"
    )
    for number, episode_return in enumerate(out["episode_returns"], start=1):
        print(f"episode {number:3d}: return {episode_return:.1f}")
    print(
        f"mean return over {out['num_episodes']} greedy episodes: {out['episode_return_mean']:.1f} "
        f"(min {out['episode_return_min']:.1f}, max {out['episode_return_max']:.1f}, "
        f"mean length {out['episode_len_mean']:.1f})"
    )
    return EXIT_OK


# -------------------------------------------------------------------------------- inspect
def cmd_inspect(args: argparse.Namespace) -> int:
    """``dlearner inspect DIR``: the checkpoint's modules, arrays, counters and config."""
    from dlearner.checkpoint import format_inspection, inspect_checkpoint

    summary = inspect_checkpoint(args.checkpoint)
    if args.json:
        print(json.dumps(summary, default=list, indent=2))
    else:
        print(format_inspection(summary))
    return EXIT_OK


# ----------------------------------------------------------------------------------- plot
def cmd_plot(args: argparse.Namespace) -> int:
    """``dlearner plot METRICS_FILE -o PNG``."""
    from dlearner.reporting import plot_learning_curve

    output = args.output or str(Path(args.metrics_file).with_name(CURVE_FILENAME))
    print(plot_learning_curve(args.metrics_file, output, title=args.title))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
