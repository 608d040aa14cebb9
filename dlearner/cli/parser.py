"""The ``dlearner`` argument parser: its commands, their flags and help, and how flag text becomes values.

The parser only checks each value on its own (an int >= 1, a finite number, JSON); combinations and
settings are checked by the commands, which name the flag in their errors.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any, Callable, Dict, List

from dlearner.cli.algorithms import ALGORITHMS
from dlearner.cli.evaluate import cmd_evaluate
from dlearner.cli.inspect import cmd_inspect
from dlearner.cli.multi_agent import POLICIES_CHOICES
from dlearner.cli.plot import cmd_plot
from dlearner.cli.runs import CURVE_FILENAME, METRICS_FILENAME
from dlearner.cli.stop import DEFAULT_STOP_ITERS
from dlearner.cli.train import cmd_train
from dlearner.loggers import LOGGER_NAMES


# ---------------------------------------------------------------------------- value types
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
    level.add_argument(
        "-v",
        "--verbose",
        dest="log_level",
        action="store_const",
        const="DEBUG",
        help="also show debug messages",
        **({"default": "INFO"} if defaults else keep),
    )
    level.add_argument(
        "-q",
        "--quiet",
        dest="log_level",
        action="store_const",
        const="WARNING",
        help="show only warnings and errors (no progress lines)",
        **keep,
    )
    group.add_argument(
        "--debug",
        action="store_true",
        help="show the full traceback when a command fails",
        **({"default": False} if defaults else keep),
    )


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
            "Train an algorithm on a gymnasium (or multi-agent) environment until a stop condition is reached. "
            "Without --address or --scheduler-file, Dask learners and env runners run on an embedded LocalCluster; with "
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
    what.add_argument(
        "--algo", choices=sorted(ALGORITHMS), default=None, help="algorithm (default: PPO, or the checkpoint's with --resume)"
    )
    what.add_argument(
        "--env",
        default=None,
        metavar="ID",
        help="gymnasium environment id, e.g. CartPole-v1, or module:creator for an env creator such as the "
        "multi-agent dlearner.envs:MultiAgentCartPole (creator(env_config) returns a gymnasium.Env, a "
        "dlearner.MultiAgentEnv or a pettingzoo.ParallelEnv); required unless --resume, and again with --resume "
        "of a module:creator run",
    )
    what.add_argument(
        "--env-config",
        type=_json_object,
        default=None,
        metavar="JSON",
        help="keyword arguments for gymnasium.make, or the env_config a module:creator receives, as a JSON object",
    )
    what.add_argument(
        "--atari",
        action="store_true",
        default=None,
        help="apply the standard Atari preprocessing to an ALE game such as ALE/Pong-v5 (84x84 grayscale, frame skip 4, "
        'noop starts, the 4 latest frames stacked); needs pip install "dlearner[atari]". A resumed run keeps the '
        "checkpoint's setting",
    )
    what.add_argument(
        "--policies",
        choices=POLICIES_CHOICES,
        default=None,
        help="multi-agent envs only: 'shared' (one module, default_policy, for every agent; the default) or "
        "'per-agent' (one module per agent, named after it). A resumed run keeps the checkpoint's.",
    )

    where = train.add_argument_group("where it runs")
    cluster = where.add_mutually_exclusive_group()
    cluster.add_argument(
        "--address", default=None, metavar="ADDR", help="attach to the Dask scheduler at ADDR, e.g. tcp://host:8786"
    )
    cluster.add_argument(
        "--scheduler-file",
        default=None,
        metavar="PATH",
        help="attach to the Dask scheduler described by this scheduler file (HPC)",
    )
    where.add_argument(
        "--num-learners",
        type=_non_negative_int,
        default=None,
        metavar="N",
        help="Learner actors on Dask workers; 0 = one learner in this process (default: 0)",
    )
    where.add_argument(
        "--num-env-runners",
        type=_non_negative_int,
        default=None,
        metavar="N",
        help="env-runner actors on Dask workers; 0 = sample in this process (default: 0)",
    )
    where.add_argument(
        "--num-envs-per-env-runner",
        type=_positive_int,
        default=None,
        metavar="K",
        help="vectorised environments per env runner (default: the algorithm's)",
    )
    where.add_argument(
        "--num-gpus-per-learner",
        type=_finite_float,
        default=None,
        metavar="G",
        help="GPUs per learner; fractional values share a GPU (default: 0)",
    )
    where.add_argument(
        "--num-cpus-per-learner", type=_positive_int, default=None, metavar="C", help="CPU threads per learner (default: 1)"
    )
    where.add_argument(
        "--startup-timeout",
        type=_positive_float,
        default=None,
        metavar="SECONDS",
        help="how long to wait for enough Dask workers and for the learner and env-runner actors "
        "to start (default: dask config dlearner.cluster.startup-timeout, 60s; raise it when "
        "workers of a batch job start late)",
    )

    hyper = train.add_argument_group("hyper-parameters (default: the algorithm's)")
    hyper.add_argument("--lr", type=_finite_float, default=None, help="learning rate")
    hyper.add_argument("--gamma", type=_finite_float, default=None, help="discount factor")
    hyper.add_argument(
        "--train-batch-size",
        type=_positive_int,
        default=None,
        metavar="ROWS",
        help="env steps sampled per iteration (over all env runners)",
    )
    hyper.add_argument(
        "--minibatch-size", type=_positive_int, default=None, metavar="ROWS", help="rows per gradient step (over all learners)"
    )
    hyper.add_argument("--num-epochs", type=_positive_int, default=None, metavar="N", help="passes over each train batch")
    hyper.add_argument("--fcnet-hiddens", type=_hiddens, default=None, metavar="SIZES", help="hidden layer sizes, e.g. 64,64")
    hyper.add_argument("--fcnet-activation", default=None, metavar="NAME", help="hidden activation, e.g. tanh, relu")
    hyper.add_argument("--seed", type=_non_negative_int, default=None, help="seed for reproducible runs")

    stop = train.add_argument_group("when to stop")
    stop.add_argument(
        "--stop-return", type=_finite_float, default=None, metavar="R", help="stop when the mean episode return reaches R"
    )
    stop.add_argument("--stop-iters", type=_positive_int, default=None, metavar="N", help="stop after training iteration N")
    stop.add_argument(
        "--stop-timesteps", type=_positive_int, default=None, metavar="T", help="stop once T env steps have been sampled"
    )

    out = train.add_argument_group("checkpoints and output")
    out.add_argument(
        "--checkpoint",
        default=None,
        metavar="DIR",
        help="run folder (or fsspec URL): the checkpoint store goes in DIR/checkpoint, saved "
        "periodically and at the end, with the metrics file and the curve beside it",
    )
    out.add_argument(
        "--checkpoint-every",
        type=_non_negative_int,
        default=10,
        metavar="N",
        help="save every N iterations; 0 = only at the end (default: 10)",
    )
    out.add_argument("--resume", action="store_true", help="continue from the checkpoint in --checkpoint")
    out.add_argument(
        "--metrics-file",
        default=None,
        metavar="PATH",
        help=f"JSON-lines metrics file (default: DIR/{METRICS_FILENAME} with --checkpoint)",
    )
    out.add_argument(
        "--plot",
        default=None,
        metavar="PNG",
        help=f"learning-curve PNG written at the end (default: DIR/{CURVE_FILENAME} with --checkpoint, "
        "else beside the metrics file)",
    )
    out.add_argument(
        "--run-name",
        default=None,
        metavar="NAME",
        help="name of the run on the dashboard page (default: the checkpoint directory's name)",
    )
    out.add_argument("--no-dashboard", action="store_true", help="do not add the dlearner page to the Dask dashboard")
    out.add_argument(
        "--logger",
        dest="loggers",
        action="append",
        choices=sorted(LOGGER_NAMES),
        default=None,
        help="also write every result and the hyper-parameters to TensorBoard (event files in DIR/tensorboard) or "
        "MLflow (the SQLite store DIR/mlflow.db), beside the metrics file; repeat the flag for both. Each needs "
        'its extra: pip install "dlearner[tensorboard]" / "dlearner[mlflow]". A resumed run keeps the '
        "checkpoint's loggers unless --logger is given",
    )
    out.add_argument(
        "--callbacks",
        default=None,
        metavar="MODULE:CLASS",
        help="a dlearner.Callbacks subclass to run (episode metrics, curriculum), e.g. my_pkg.callbacks:SuccessRate; "
        "the module must be importable here and on the Dask workers. A checkpoint never imports it: give it again "
        "with --resume",
    )
    out.add_argument(
        "--mlflow-tracking-uri",
        default=None,
        metavar="URI",
        help="the MLflow tracking server or store of --logger mlflow, e.g. http://host:5000 (default: sqlite:///DIR/mlflow.db)",
    )
    _add_output_options(train, defaults=False)
    train.set_defaults(func=cmd_train)

    # ------------------------------------------------------------------------------- evaluate
    evaluate = sub.add_parser(
        "evaluate",
        help="run greedy episodes with a checkpoint's policy",
        description="Rebuild the algorithm from a checkpoint's stored settings (in this process) and run greedy episodes.",
    )
    evaluate.add_argument("checkpoint", metavar="DIR", help="a run folder of `dlearner train` (or its checkpoint store)")
    evaluate.add_argument("--episodes", type=_positive_int, default=10, help="episodes to run (default: 10)")
    evaluate.add_argument("--seed", type=_non_negative_int, default=None, help="seed of the first episode's reset")
    evaluate.add_argument("--json", action="store_true", help="print the results as JSON")
    evaluate.add_argument(
        "--gif",
        default=None,
        metavar="PATH",
        help="also write the first episode as an animated GIF (frames of env.render() with render_mode='rgb_array'; "
        "any env that renders RGB images, e.g. CartPole-v1 or an ALE game)",
    )
    evaluate.add_argument(
        "--gif-max-frames",
        type=_positive_int,
        default=1000,
        metavar="N",
        help="record at most the first N frames of the episode (default: 1000)",
    )
    evaluate.add_argument(
        "--env",
        default=None,
        metavar="ID",
        help="the run's --env, needed again when it has the module:Env or module:creator form (a checkpoint never "
        "imports code by itself)",
    )
    _add_output_options(evaluate, defaults=False)
    evaluate.set_defaults(func=cmd_evaluate)

    # -------------------------------------------------------------------------------- inspect
    inspect = sub.add_parser(
        "inspect",
        help="show what a checkpoint holds",
        description="Show a checkpoint's modules, array shapes, counters and config.",
    )
    inspect.add_argument("checkpoint", metavar="DIR", help="a dlearner checkpoint store, or a run folder holding one")
    inspect.add_argument("--json", action="store_true", help="print the summary as JSON")
    _add_output_options(inspect, defaults=False)
    inspect.set_defaults(func=cmd_inspect)

    # ----------------------------------------------------------------------------------- plot
    plot = sub.add_parser(
        "plot",
        help="draw a learning curve from a run folder or a metrics file",
        description="Draw the mean episode return against env steps from a run's metrics file.",
    )
    plot.add_argument(
        "metrics_file",
        metavar="RUN",
        help=f"a run folder of `dlearner train --checkpoint DIR` (its {METRICS_FILENAME} is drawn), or a metrics file",
    )
    plot.add_argument(
        "-o", "--output", default=None, metavar="PNG", help=f"PNG to write (default: {CURVE_FILENAME} beside the metrics file)"
    )
    plot.add_argument("--title", default=None, help="plot title (default: the run's name)")
    _add_output_options(plot, defaults=False)
    plot.set_defaults(func=cmd_plot)
    return parser
