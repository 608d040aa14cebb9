"""``dlearner inspect DIR``: what a checkpoint holds, without loading its arrays."""

from __future__ import annotations

import argparse
import json

from dlearner.cli.errors import EXIT_OK, UsageError
from dlearner.cli.runs import not_a_checkpoint


def cmd_inspect(args: argparse.Namespace) -> int:
    """``dlearner inspect DIR``: the checkpoint's modules, arrays, counters and config."""
    from dlearner.checkpoint import InvalidCheckpointError, format_inspection, inspect_checkpoint

    try:
        summary = inspect_checkpoint(args.checkpoint)
    except InvalidCheckpointError as err:
        raise UsageError(not_a_checkpoint(args.checkpoint, err)) from err
    if args.json:
        print(json.dumps(summary, default=list, indent=2))
    else:
        print(format_inspection(summary))
    return EXIT_OK
