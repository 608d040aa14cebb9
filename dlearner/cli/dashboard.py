"""The run's section on the dlearner page of the Dask dashboard: its links, metrics and status."""

from __future__ import annotations

import argparse
import sys
import time
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional

from dlearner.cli.runs import is_url

if TYPE_CHECKING:
    from dlearner.config import AlgorithmConfig


class RunDashboard:
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
            path = urllib.parse.urlsplit(args.checkpoint).path if is_url(args.checkpoint) else args.checkpoint
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
            publish_status(self.client, self.run_name, status, error, algorithm=algo, wait=status != "running", timeout_s=5)
        except Exception as err:  # noqa: BLE001 - the scheduler went away, or the client is closing
            print(f"dlearner: warning: could not send the run's status to the dashboard: {err}", file=sys.stderr)
