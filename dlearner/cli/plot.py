"""``dlearner plot RUN``: a learning curve from a run folder's metrics file (or any metrics file)."""

from __future__ import annotations

import argparse
from pathlib import Path

from dlearner.cli.errors import EXIT_OK, UsageError
from dlearner.cli.runs import CURVE_FILENAME, METRICS_FILENAME


def cmd_plot(args: argparse.Namespace) -> int:
    """``dlearner plot RUN_DIR|METRICS_FILE -o PNG``."""
    from dlearner.reporting import plot_learning_curve

    metrics = metrics_file(args.metrics_file)
    output = args.output or str(metrics.with_name(CURVE_FILENAME))
    title = args.title or f"{run_name(metrics)}: mean episode return"
    print(plot_learning_curve(metrics, output, title=title))
    return EXIT_OK


def metrics_file(path: str) -> Path:
    """The metrics file ``plot`` draws: ``path`` itself, or the ``metrics.jsonl`` of a run folder."""
    given = Path(path)
    if not given.is_dir():
        return given  # a missing file is reported by the reader, naming it
    inside = given / METRICS_FILENAME
    if not inside.is_file():
        raise UsageError(
            f"{path!r} is a directory without {METRICS_FILENAME}: pass the folder of a run "
            f"(`dlearner train --checkpoint DIR` writes DIR/{METRICS_FILENAME}) or a metrics file."
        )
    return inside


def run_name(metrics: Path) -> str:
    """The run a metrics file belongs to: its folder's name for a run folder's ``metrics.jsonl``, else the file's stem."""
    if metrics.name == METRICS_FILENAME:
        return metrics.resolve().parent.name
    return metrics.stem
