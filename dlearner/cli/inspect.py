"""``dlearner inspect DIR``: what a checkpoint holds, without loading its arrays."""

from __future__ import annotations

import argparse
import json

from dlearner.cli.errors import EXIT_OK, UsageError
from dlearner.cli.multi_agent import inspect_lines
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
        text = format_inspection(summary)
        # A multi-agent run's modules and mapping, under the header, before the long metadata listing.
        head, metadata, rest = text.partition("\nmetadata:")
        print("\n".join([head, *inspect_lines(summary.get("metadata") or {})]) + metadata + rest)
    return EXIT_OK
