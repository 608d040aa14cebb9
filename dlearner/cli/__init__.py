"""The ``dlearner`` command: ``train``, ``evaluate``, ``inspect`` and ``plot``.

Examples::

    dlearner train --algo PPO --env CartPole-v1 --num-learners 2 --num-env-runners 1 \\
        --stop-return 475 --checkpoint runs/cartpole
    dlearner train --checkpoint runs/cartpole --resume --stop-iters 50    # continue the same run
    dlearner train ... --scheduler-file sched.json                        # attach to a running cluster
    dlearner evaluate runs/cartpole --episodes 10
    dlearner inspect runs/cartpole
    dlearner plot runs/cartpole -o curve.png                              # its metrics.jsonl
    dlearner train --env dlearner.envs:MultiAgentCartPole --policies per-agent --checkpoint runs/ma
    dlearner train --checkpoint runs/ma --resume --env dlearner.envs:MultiAgentCartPole   # names the creator again

Exit status: 0 on success; 2 for a bad flag, path or setting (a one-line message on stderr names
it); 1 when training fails (a learner's exception, a lost worker, a cluster that lacks workers: a
one-line summary on stderr, the full traceback with ``--debug``). ``train`` stopped by SIGTERM exits
0 and by SIGINT (Ctrl-C) 130, after finishing the iteration under way and saving a checkpoint; a
second signal abandons that iteration and exits at once (see ``dlearner train --help``).

Logging: messages of the ``dlearner`` logger (e.g. what cluster start-up is waiting for) go to
stderr at level INFO; ``-v/--verbose`` shows DEBUG, ``-q/--quiet`` only warnings and errors.

The package, each module one part of the command (each uses only the ones listed before it):

* :mod:`~dlearner.cli.errors`: exit statuses, :class:`UsageError`, one-line error reports;
* :mod:`~dlearner.cli.logs`: the ``dlearner`` logger on stderr at the ``-v/-q`` level;
* :mod:`~dlearner.cli.algorithms`: what ``--algo`` can name, configs rebuilt from checkpoints;
* :mod:`~dlearner.cli.runs`: run folders (store, metrics file, curve), what a stored checkpoint
  supplies to ``--resume`` and ``evaluate``, the command that continues a run;
* :mod:`~dlearner.cli.stop` and :mod:`~dlearner.cli.signals`: when ``train`` stops, by its flags
  or by SIGTERM/SIGINT;
* :mod:`~dlearner.cli.multi_agent`: ``--policies``, and how multi-agent runs' returns and modules
  are shown (progress lines, ``evaluate``, ``inspect``);
* :mod:`~dlearner.cli.cluster` and :mod:`~dlearner.cli.dashboard`: attaching to a running cluster,
  feeding the dashboard page;
* :mod:`~dlearner.cli.train_config`, :mod:`~dlearner.cli.train`, :mod:`~dlearner.cli.evaluate`,
  :mod:`~dlearner.cli.inspect`, :mod:`~dlearner.cli.plot`: the commands;
* :mod:`~dlearner.cli.parser`: the argument parser; this module: :func:`main`.

torch, dask and the algorithms are imported inside the commands, not by any of these modules:
importing torch alone takes seconds, and ``dlearner --help`` or a bad flag should answer at once.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Optional, Sequence

# The names marked F401 are not used here: they were top-level names of the single-module cli this
# package replaced, and stay importable from ``dlearner.cli``.
from dlearner.cli.algorithms import algorithm_classes, config_from_dict
from dlearner.cli.errors import (
    EXIT_BROKEN_PIPE,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,  # noqa: F401
    EXIT_USAGE,
    TrainingFailed,
    UsageError,
    report_error,
)
from dlearner.cli.evaluate import cmd_evaluate  # noqa: F401
from dlearner.cli.inspect import cmd_inspect  # noqa: F401
from dlearner.cli.logs import logging_to_stderr
from dlearner.cli.parser import build_parser
from dlearner.cli.plot import cmd_plot  # noqa: F401
from dlearner.cli.runs import CURVE_FILENAME, METRICS_FILENAME  # noqa: F401
from dlearner.cli.stop import DEFAULT_STOP_ITERS  # noqa: F401
from dlearner.cli.train import cmd_train  # noqa: F401

__all__ = ["TRAINABLE_ALGORITHMS", "config_from_dict", "main"]


def __getattr__(name: str) -> Any:
    # PEP 562: ``cli.TRAINABLE_ALGORITHMS`` keeps meaning name -> config class, built on first use.
    if name == "TRAINABLE_ALGORITHMS":
        return algorithm_classes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``dlearner`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)  # exits with status 2 and argparse's message on a bad flag
    try:
        with logging_to_stderr(args.log_level):
            return int(args.func(args))
    except (UsageError, FileNotFoundError, ValueError) as err:
        # User errors: say what was wrong, no traceback (the messages name the flag, path or setting).
        report_error(err, args.debug)
        return EXIT_USAGE
    except TrainingFailed as failure:
        # A failure while training runs (inside a learner, a lost worker, a cluster that lacks workers):
        # not a usage error, so status 1, and the remote error's own summary.
        report_error(failure.error, args.debug)
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
