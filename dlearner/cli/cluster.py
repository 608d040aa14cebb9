"""``--address`` / ``--scheduler-file``: attaching ``train`` to a running Dask cluster."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from dlearner.cli.errors import UsageError

if TYPE_CHECKING:
    from dlearner.config import AlgorithmConfig


def attach(args: argparse.Namespace, config: "AlgorithmConfig") -> Any:
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
    from dlearner.backends.dask.cluster import attach as attach_to_cluster
    from dlearner.errors import LearnerGroupError

    flag, target = ("--address", args.address) if args.address is not None else ("--scheduler-file", args.scheduler_file)
    try:
        return attach_to_cluster(address=args.address, scheduler_file=args.scheduler_file, timeout_s=30.0)
    except (LearnerGroupError, OSError) as err:
        raise UsageError(f"argument {flag}: cannot reach the Dask scheduler of {target!r}: {err}") from err
    except ValueError as err:  # e.g. a scheduler file that is not JSON, or a malformed address
        raise UsageError(f"argument {flag}: {target!r}: {err}") from err
