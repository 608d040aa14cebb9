"""``dlearner plot METRICS_FILE``: a learning curve from a metrics file."""

from __future__ import annotations

import argparse
from pathlib import Path

from dlearner.cli.errors import EXIT_OK
from dlearner.cli.runs import CURVE_FILENAME


def cmd_plot(args: argparse.Namespace) -> int:
    """``dlearner plot METRICS_FILE -o PNG``."""
    from dlearner.reporting import plot_learning_curve

    output = args.output or str(Path(args.metrics_file).with_name(CURVE_FILENAME))
    print(plot_learning_curve(args.metrics_file, output, title=args.title))
    return EXIT_OK
