"""The ``dlearner`` command: ``train``, ``evaluate``, ``inspect`` and ``plot``.

Examples::

    dlearner train --algo PPO --env CartPole-v1 --num-learners 2 --num-env-runners 1 \\
        --stop-return 475 --checkpoint runs/cartpole
    dlearner train --checkpoint runs/cartpole --resume --stop-iters 50    # continue the same run
    dlearner train ... --scheduler-file sched.json                        # attach to a running cluster
    dlearner evaluate runs/cartpole --episodes 10
    dlearner inspect runs/cartpole
    dlearner plot runs/cartpole/metrics.jsonl -o curve.png

Exit status: 0 on success; 2 for a bad flag, path or setting (a one-line message on stderr names
it); 1 when training fails (a learner's exception, a lost worker, a cluster that lacks workers: a
one-line summary on stderr, the full traceback with ``--debug``). ``train`` stopped by SIGTERM exits
0 and by SIGINT (Ctrl-C) 130, after finishing the iteration under way and saving a checkpoint; a
second signal abandons that iteration and exits at once (see ``dlearner train --help``).

Logging: messages of the ``dlearner`` logger (e.g. what cluster start-up is waiting for) go to
stderr at level INFO; ``-v/--verbose`` shows DEBUG, ``-q/--quiet`` only warnings and errors.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import signal
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

# torch, dask and the algorithms are imported inside the commands, not here: importing torch alone
# takes seconds, and `dlearner --help` or a bad flag should answer at once.
if TYPE_CHECKING:
    from dlearner.config import AlgorithmConfig

__all__ = ["TRAINABLE_ALGORITHMS", "config_from_dict", "main"]

#: Algorithms ``dlearner train --algo`` can train on an environment: name -> ``(module, config class)``,
#: imported when a run starts. BC learns from a fixed dataset (offline), so it has no place here; add
#: online algorithms as they are written. ``cli.TRAINABLE_ALGORITHMS`` gives name -> config class.
_ALGORITHMS: Dict[str, Tuple[str, str]] = {
    "PPO": ("dlearner.algorithms", "PPOConfig"),
    "APPO": ("dlearner.algorithms", "APPOConfig"),
    "IMPALA": ("dlearner.algorithms", "IMPALAConfig"),
}


def _algorithm_classes() -> Dict[str, Callable[[], "AlgorithmConfig"]]:
    """Name -> config class of every trainable algorithm (imports them)."""
    import importlib

    return {name: getattr(importlib.import_module(module), cls) for name, (module, cls) in _ALGORITHMS.items()}


def config_from_dict(data: Mapping[str, Any]) -> "AlgorithmConfig":
    """Rebuild a config from ``AlgorithmConfig.to_dict()`` output (see :meth:`AlgorithmConfig.from_dict`)."""
    from dlearner.config import AlgorithmConfig

    return AlgorithmConfig.from_dict(data)


def __getattr__(name: str) -> Any:
    # PEP 562: ``cli.TRAINABLE_ALGORITHMS`` keeps meaning name -> config class, built on first use.
    if name == "TRAINABLE_ALGORITHMS":
        return _algorithm_classes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

#: Iterations a ``train`` invocation runs when no stop flag is given.
DEFAULT_STOP_ITERS = 100
METRICS_FILENAME = "metrics.jsonl"
CURVE_FILENAME = "learning_curve.png"

EXIT_OK = 0
EXIT_FAILED = 1  # training (or another command) failed for a reason other than the flags
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


def _positive_float(text: str) -> float:
    value = _finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
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


def _add_output_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """``-v/-q/--debug``, accepted before and after the command name (``dlearner -v train ...`` and
    ``dlearner train -v ...``). Only the top-level parser sets defaults: a subparser's default would
    overwrite a value given before the command name."""
    group = parser.add_argument_group("output")
    level = group.add_mutually_exclusive_group()
    keep = {} if defaults else {"default": argparse.SUPPRESS}
    level.add_argument("-v", "--verbose", dest="log_level", action="store_const", const="DEBUG",
                       help="also show debug messages", **({"default": "INFO"} if defaults else keep))
    level.add_argument("-q", "--quiet", dest="log_level", action="store_const", const="WARNING",
                       help="show only warnings and errors (no progress lines)", **keep)
    group.add_argument("--debug", action="store_true", help="show the full traceback when a command fails",
                       **({"default": False} if defaults else keep))


def build_parser() -> argparse.ArgumentParser:
    """The ``dlearner`` argument parser (subcommands ``train``, ``evaluate``, ``inspect``, ``plot``)."""
    from dlearner import __version__

    parser = argparse.ArgumentParser(
        prog="dlearner",
        description="Train reinforcement-learning models with data-parallel learners on Dask.",
        epilog="Exit status: 0 success, 1 a failure while running (e.g. in training), 2 a bad flag, path or setting.",
    )
    parser.add_argument("--version", action="version", version=f"dlearner {__version__}")
    _add_output_options(parser, defaults=True)
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
            "they include the iterations and steps already done. "
            "Signals: SIGTERM (kill, scancel, a batch system's time limit) or SIGINT (Ctrl-C) lets the iteration "
            "under way finish, saves a checkpoint (with --checkpoint) and exits with status 0 (SIGTERM) or 130 "
            "(SIGINT); --resume then continues from that iteration. A second signal abandons the iteration at "
            "once and exits with 128+signal without saving: the last checkpoint written stays valid. Signals "
            "that arrive while a checkpoint is being written wait until it is complete."
        ),
    )
    what = train.add_argument_group("what to train")
    what.add_argument("--algo", choices=sorted(_ALGORITHMS), default=None,
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
    where.add_argument("--startup-timeout", type=_positive_float, default=None, metavar="SECONDS",
                       help="how long to wait for enough Dask workers and for the learner and env-runner actors "
                            "to start (default: dask config dlearner.cluster.startup-timeout, 60s; raise it when "
                            "workers of a batch job start late)")

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
                     help="run folder (or fsspec URL): the checkpoint store goes in DIR/checkpoint, saved "
                          "periodically and at the end, with the metrics file and the curve beside it")
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
    _add_output_options(train, defaults=False)
    train.set_defaults(func=cmd_train)

    # ------------------------------------------------------------------------------- evaluate
    evaluate = sub.add_parser(
        "evaluate",
        help="run greedy episodes with a checkpoint's policy",
        description="Rebuild the algorithm from a checkpoint's stored settings (in this process) and run greedy episodes.",
    )
    evaluate.add_argument("checkpoint", metavar="DIR",
                          help="a run folder of `dlearner train` (or its checkpoint store)")
    evaluate.add_argument("--episodes", type=_positive_int, default=10, help="episodes to run (default: 10)")
    evaluate.add_argument("--seed", type=_non_negative_int, default=None, help="seed of the first episode's reset")
    evaluate.add_argument("--json", action="store_true", help="print the results as JSON")
    evaluate.add_argument("--env", default=None, metavar="ID",
                          help="the run's gymnasium id, needed again when it has the module:Env form (a checkpoint "
                               "never imports code by itself)")
    _add_output_options(evaluate, defaults=False)
    evaluate.set_defaults(func=cmd_evaluate)

    # -------------------------------------------------------------------------------- inspect
    inspect = sub.add_parser("inspect", help="show what a checkpoint holds",
                             description="Show a checkpoint's modules, array shapes, counters and config.")
    inspect.add_argument("checkpoint", metavar="DIR", help="a dlearner checkpoint store, or a run folder holding one")
    inspect.add_argument("--json", action="store_true", help="print the summary as JSON")
    _add_output_options(inspect, defaults=False)
    inspect.set_defaults(func=cmd_inspect)

    # ----------------------------------------------------------------------------------- plot
    plot = sub.add_parser("plot", help="draw a learning curve from a metrics file",
                          description="Draw the mean episode return against env steps from a metrics file.")
    plot.add_argument("metrics_file", metavar="METRICS_FILE", help=f"a {METRICS_FILENAME} written by `dlearner train`")
    plot.add_argument("-o", "--output", default=None, metavar="PNG",
                      help=f"PNG to write (default: {CURVE_FILENAME} beside the metrics file)")
    plot.add_argument("--title", default=None, help="plot title")
    _add_output_options(plot, defaults=False)
    plot.set_defaults(func=cmd_plot)
    return parser


# ------------------------------------------------------------------------------ entry point
def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``dlearner`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)  # exits with status 2 and argparse's message on a bad flag
    try:
        with _logging_to_stderr(args.log_level):
            return int(args.func(args))
    except (UsageError, FileNotFoundError, ValueError) as err:
        # User errors: say what was wrong, no traceback (the messages name the flag, path or setting).
        _report_error(err, args.debug)
        return EXIT_USAGE
    except TrainingFailed as failure:
        # A failure while training runs (inside a learner, a lost worker, a cluster that lacks workers):
        # not a usage error, so status 1, and the remote error's own summary.
        _report_error(failure.error, args.debug)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("dlearner: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`dlearner inspect DIR | head`): not an error of ours. Point stdout at
        # devnull so the interpreter's final flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


class TrainingFailed(Exception):
    """Wraps an exception raised while ``train`` ran (after its flags were checked): exit status 1."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


def _one_line(err: BaseException) -> str:
    """``Type: first line of the message`` (learner tracebacks ride along as notes, shown by ``--debug``)."""
    text = str(err).strip()
    first = text.splitlines()[0] if text else ""
    name = type(err).__name__
    if isinstance(err, (UsageError, FileNotFoundError)) or not first:
        return first or name
    return f"{name}: {first}"


def _report_error(err: BaseException, debug: bool) -> None:
    import traceback

    if debug:
        traceback.print_exception(err, file=sys.stderr)
    hint = "" if debug or isinstance(err, UsageError) else "  (--debug shows the full traceback)"
    print(f"dlearner: error: {_one_line(err)}{hint}", file=sys.stderr)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (pytest's capture swaps it between tests)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


class _CliFormatter(logging.Formatter):
    """``dlearner: message`` for INFO, ``dlearner: warning: message`` above, the logger's name for DEBUG."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            message = f"{message}\n{record.exc_text}"
        if record.levelno == logging.INFO:
            return f"dlearner: {message}"
        if record.levelno < logging.INFO:
            return f"dlearner: debug: [{record.name}] {message}"
        return f"dlearner: {record.levelname.lower()}: {message}"


@contextlib.contextmanager
def _logging_to_stderr(level: str) -> Iterator[None]:
    """Show the ``dlearner`` logger's records at ``level`` and above on stderr while a command runs;
    afterwards the logger is as it was (``main`` may run several times in one process, e.g. in tests)."""
    logger = logging.getLogger("dlearner")
    handler = _StderrHandler()
    handler.setFormatter(_CliFormatter())
    previous = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False  # our handler prints them; a root handler would print them twice
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous[0])
        logger.propagate = previous[1]


@contextlib.contextmanager
def _flag(name: str) -> Iterator[None]:
    """Report a ``ValueError``/``TypeError`` from a config setter as an error of the flag ``name``."""
    try:
        yield
    except (ValueError, TypeError) as err:
        raise UsageError(f"argument {name}: {err}") from err


# ---------------------------------------------------------------------------- configs
def _algo_name(config: "AlgorithmConfig") -> str:
    for name, factory in _algorithm_classes().items():
        if type(config) is factory:
            return name
    return type(config).__name__.removesuffix("Config")


def _apply_flags(config: "AlgorithmConfig", args: argparse.Namespace) -> None:
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
        ("--startup-timeout", "startup_timeout", lambda startup_timeout: config.learners(
            learner_startup_timeout_s=startup_timeout)),
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


def _checkpoint_store(path: str) -> str:
    """The Zarr store of ``--checkpoint DIR``: ``DIR/checkpoint`` for a run folder (a new run's too), or
    ``DIR`` itself when it is a store."""
    from dlearner.checkpoint import resolve_checkpoint_path

    return resolve_checkpoint_path(path, new_run=True)


def _run_dir(path: str) -> Optional[Path]:
    """The local folder of ``--checkpoint DIR`` where the metrics file and the curve go (beside the store,
    never inside it); ``None`` for remote URLs."""
    from dlearner.checkpoint import RUN_STORE_DIRNAME

    store = _local_dir(_checkpoint_store(path))
    if store is None:
        return None
    # A store named some other way (by save_to_path, or a run from before run folders) keeps them inside.
    return store.parent if store.name == RUN_STORE_DIRNAME else store


def _restore_env(config: "AlgorithmConfig", metadata: Mapping[str, Any], args: argparse.Namespace, hint: str) -> None:
    """The run's environment for ``--resume`` / ``evaluate``: a ``module:Env`` id imports its module,
    and a checkpoint is data, so such an id counts only when the user names it again with ``--env``."""
    from dlearner.config import env_id_imports_code

    stored_env = metadata["config"].get("env")
    if config.env is None and env_id_imports_code(stored_env):
        if args.env != stored_env:
            raise UsageError(
                f"argument --env: the checkpoint {args.checkpoint!r} was trained on {stored_env!r}, which imports "
                f"Python code; a checkpoint never does that by itself: pass --env {stored_env} to trust it."
            )
        config.environment(args.env)
    elif args.env is not None and args.env != config.env:
        raise UsageError(f"argument --env: the checkpoint {args.checkpoint!r} was trained on {config.env!r}, not {args.env!r}; {hint}")


def _committed_iteration(path: str, last_saved: int) -> Any:
    """The iteration the checkpoint at ``path`` holds, read from the store: a save that failed after
    its commit (a worker lost while it replied) has still written the newer one."""
    try:
        metadata = _checkpoint_metadata(path)
    except (ValueError, OSError):
        return last_saved
    counters = (metadata or {}).get("counters") or {}
    return counters.get("iteration", last_saved)


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
        _restore_env(config, metadata, args, "drop --env, or start a new run in another --checkpoint directory.")
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
        config = _algorithm_classes()[args.algo or "PPO"]()
    _apply_flags(config, args)
    with _flag("--env"):
        # Fail here, before any cluster starts, if the environment cannot be made.
        config.make_env().close()
    with _flag("--minibatch-size/--train-batch-size"):
        config.validate()
    return config, metadata


def _output_paths(args: argparse.Namespace) -> Tuple[Optional[Path], Optional[Path]]:
    """``(metrics file or None, learning-curve PNG or None)``."""
    local = _run_dir(args.checkpoint) if args.checkpoint is not None else None
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
    quiet = args.log_level == "WARNING"
    null = open(os.devnull, "w") if quiet else None  # -q: no progress lines, no informational messages
    progress = ProgressDisplay(null)
    progress.message(f"dlearner: {_describe_setup(name, config)}")
    signals = _StopSignals()
    state = _RunState()
    own_connection = algo = writer = dashboard = None
    try:
        with signals.installed():
            try:
                own_connection = _attach(args, config)
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
                        algo.save_to_path(_checkpoint_store(args.checkpoint))
                    state.last_saved = algo.iteration
                dashboard = _Dashboard(args, algo.client, algo.dashboard_url, name, config, progress)
                dashboard.status("running", algo=algo)
                signals.phase = "idle"
                stop = _StopConditions(args, start_iteration=algo.iteration)
                progress.message(f"dlearner: stopping at {stop.describe()}")
                if metrics_path is not None:
                    writer = MetricsWriter(metrics_path,
                                           resume_after_iteration=algo.iteration if resume_metadata else None)
                _train_loop(args, algo, stop, writer, progress, dashboard, signals, state)
                signals.phase = "finish"
                progress.close()
                if state.result is not None:
                    dashboard.publish(state.result, last=True)
                dashboard.status("stopped" if signals.requested is not None else "finished",
                                 state.reason if signals.requested is not None else None)
                if args.checkpoint and algo.iteration != state.last_saved:
                    with signals.during("save"):
                        algo.save_to_path(args.checkpoint)
                    state.last_saved = algo.iteration
            except (UsageError, KeyboardInterrupt):
                raise
            except Exception as err:
                # Raised while training ran: exit status 1 with the error's summary (main), not a usage error.
                if args.checkpoint and state.last_saved is not None and signals.phase != "start":
                    print(f"dlearner: the checkpoint {args.checkpoint} holds iteration "
                          f"{_committed_iteration(args.checkpoint, state.last_saved)}; continue "
                          f"with: {_resume_command(args)}", file=sys.stderr)
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
                print("dlearner: note: no --checkpoint or --metrics-file, so no metrics file or learning curve was "
                      "written.", file=sys.stderr)
            if signals.requested is not None:
                _notice(_signal_summary(args, signals.requested, state.last_saved))
                return EXIT_OK if signals.requested == signal.SIGTERM else EXIT_INTERRUPTED
            return EXIT_OK
    except KeyboardInterrupt:
        if signals.aborted_by is None:
            raise  # a Ctrl-C our handler did not see (not the main thread): main reports it
        if dashboard is not None:
            dashboard.status("stopped", f"{signal.Signals(signals.aborted_by).name} again: stopped at once")
        return _aborted(args, signals, state)
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


class _RunState:
    """What ``train`` has done so far: read by the messages after a stop, a failure or an abort."""

    def __init__(self) -> None:
        self.result: Optional[Dict[str, Any]] = None  # the last iteration's result
        self.reason: str = ""  # why training stopped
        self.last_saved: Optional[int] = None  # iteration of the newest complete checkpoint


def _train_loop(
    args: argparse.Namespace, algo: Any, stop: "_StopConditions", writer: Any, progress: Any,
    dashboard: "_Dashboard", signals: "_StopSignals", state: _RunState,
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


class _StopSignals:
    """SIGTERM and SIGINT while ``train`` runs: stop between iterations, never in the middle of one.

    What a signal does depends on the phase the run is in:

    * ``start`` (connecting, building, restoring): nothing is under way, so it stops at once.
    * ``iterate`` (inside ``algo.train()``): the first signal lets the iteration finish, then the run
      saves a checkpoint and stops; a second abandons the iteration at once (``KeyboardInterrupt``)
      without saving, so the newest checkpoint on disk stays the last complete one.
    * ``idle`` (metrics, progress between iterations): the iteration is complete; stop after it.
    * ``save`` (a checkpoint is being written): never interrupted, since a half-written checkpoint
      would leave no valid one; the run stops once the write is complete.
    * ``finish`` (after the loop): a second signal stops the remaining clean-up at once.
    """

    def __init__(self) -> None:
        self.phase = "start"
        self.requested: Optional[int] = None  # the first signal: stop after the current iteration
        self.aborted_by: Optional[int] = None  # the signal that raised KeyboardInterrupt
        self.aborted_in: Optional[str] = None  # the phase it interrupted
        self.iteration = 0  # the iteration under way (for the messages)

    @contextlib.contextmanager
    def installed(self) -> Iterator["_StopSignals"]:
        """Handle SIGTERM and SIGINT while the block runs (only the main thread may set handlers)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {signum: signal.signal(signum, self._handle) for signum in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    @contextlib.contextmanager
    def during(self, phase: str) -> Iterator[None]:
        """Run the block in ``phase``, then return to the phase before it."""
        before, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = before

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.phase == "start" or (self.phase in ("iterate", "finish") and self.requested is not None):
            self.aborted_by, self.aborted_in = signum, self.phase
            raise KeyboardInterrupt
        if self.phase == "save":
            self.requested = self.requested if self.requested is not None else signum
            _notice(f"dlearner: {name} received while a checkpoint is being written: stopping once it is complete "
                    "(SIGKILL would stop at once but could leave the checkpoint incomplete)")
            return
        if self.requested is not None:
            return  # idle: already stopping after this iteration
        self.requested = signum
        if self.phase == "iterate":
            _notice(f"dlearner: {name} received: finishing iteration {self.iteration}, then saving a checkpoint "
                    f"and stopping (send {name} again to abandon the iteration and stop at once)")
        elif self.phase == "idle":
            _notice(f"dlearner: {name} received: stopping after iteration {self.iteration}")


def _notice(text: str) -> None:
    """Write a line to stderr from a signal handler too: ``os.write`` on the descriptor, since a handler
    that runs while the main thread is inside ``sys.stderr.write`` must not re-enter the buffered stream."""
    os.write(2, (text + "\n").encode("utf-8", "replace"))


def _resume_command(args: argparse.Namespace) -> str:
    """The command that continues this run (settings come from the checkpoint; cluster and stop flags do not)."""
    import shlex

    parts = ["dlearner", "train", "--checkpoint", args.checkpoint, "--resume"]
    for flag, value in (("--address", args.address), ("--scheduler-file", args.scheduler_file),
                        ("--stop-return", args.stop_return), ("--stop-iters", args.stop_iters),
                        ("--stop-timesteps", args.stop_timesteps)):
        if value is not None:
            parts += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    return " ".join(shlex.quote(part) for part in parts)


def _signal_summary(args: argparse.Namespace, signum: int, last_saved: Optional[int]) -> str:
    name = signal.Signals(signum).name
    if not args.checkpoint:
        return f"dlearner: stopped by {name}; no --checkpoint was given, so nothing was saved."
    return (f"dlearner: stopped by {name}: the checkpoint {args.checkpoint} holds iteration {last_saved}. "
            f"Continue with: {_resume_command(args)}")


def _aborted(args: argparse.Namespace, signals: _StopSignals, state: _RunState) -> int:
    """Exit after a signal stopped ``train`` at once (see :class:`_StopSignals`); returns the exit status."""
    signum = signals.aborted_by
    assert signum is not None
    name = signal.Signals(signum).name
    graceful = EXIT_OK if signum == signal.SIGTERM else EXIT_INTERRUPTED
    if signals.aborted_in == "start":
        _notice(f"dlearner: stopped by {name} before training started" + (
            f"; the checkpoint {args.checkpoint} is unchanged" if args.checkpoint else ""))
        return graceful
    if signals.aborted_in == "finish":
        # The loop had ended and its checkpoint was written: only the clean-up was cut short.
        _notice(_signal_summary(args, signum, state.last_saved))
        return graceful
    where = (f"the checkpoint {args.checkpoint} holds iteration {state.last_saved} (the last one written). "
             f"Continue with: {_resume_command(args)}") if args.checkpoint else "nothing was saved (no --checkpoint)"
    _notice(f"dlearner: {name} again: abandoned iteration {signals.iteration} and stopped at once; {where}")
    return 128 + signum


class _Dashboard:
    """Prints the dashboard links and feeds the dlearner page (a no-op without a cluster or with --no-dashboard)."""

    def __init__(
        self, args: argparse.Namespace, client: Any, url: Optional[str], name: str, config: AlgorithmConfig, progress: Any
    ):
        """``url``: the page the connection added to the dashboard (``None`` if it could not; the
        connection logged why)."""
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
        if url is None:  # the page is an extra: training goes on without it (the warning said why)
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

    def status(self, status: str, error: Any = None, *, algo: Any = None) -> None:
        """Tell the page the run is running / finished / failed / stopped (``running`` with ``algo``, so that
        its learners show inside this run). Never raises: the run's own outcome matters more."""
        if not self.enabled:
            return
        from dlearner.dashboard import publish_status

        try:
            publish_status(self.client, self.run_name, status, error, algorithm=algo, wait=status != "running",
                           timeout_s=5)
        except Exception as err:  # noqa: BLE001 - the scheduler went away, or the client is closing
            print(f"dlearner: warning: could not send the run's status to the dashboard: {err}", file=sys.stderr)


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
    """With ``--address``/``--scheduler-file``: connect, point ``config`` at the cluster, return the
    connection (closed by ``train``: only the client, the cluster keeps running)."""
    if args.address is None and args.scheduler_file is None:
        return None
    connection = _connect(args)
    config.cluster(client=connection.client)
    if config.num_learners == 0 and config.num_env_runners == 0:
        print(
            "dlearner: warning: --num-learners and --num-env-runners are 0, so only the dashboard page uses the "
            "cluster; pass --num-learners N or --num-env-runners N to train on it.",
            file=sys.stderr,
        )
    return connection


def _connect(args: argparse.Namespace) -> Any:
    """A connection to the cluster named by ``--address`` / ``--scheduler-file`` (the backend's one
    client-creation path); errors name the flag."""
    from dlearner.backends.dask.cluster import attach
    from dlearner.errors import LearnerGroupError

    flag, target = ("--address", args.address) if args.address is not None else ("--scheduler-file", args.scheduler_file)
    try:
        return attach(address=args.address, scheduler_file=args.scheduler_file, timeout_s=30.0)
    except (LearnerGroupError, OSError) as err:
        raise UsageError(f"argument {flag}: cannot reach the Dask scheduler of {target!r}: {err}") from err
    except ValueError as err:  # e.g. a scheduler file that is not JSON, or a malformed address
        raise UsageError(f"argument {flag}: {target!r}: {err}") from err


# ------------------------------------------------------------------------------- evaluate
def cmd_evaluate(args: argparse.Namespace) -> int:
    """``dlearner evaluate DIR``: greedy episodes with the checkpoint's policy, in this process."""
    metadata = _load_run_metadata(args.checkpoint, "evaluate")
    config = config_from_dict(metadata["config"])
    _restore_env(config, metadata, args, "drop --env.")
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
