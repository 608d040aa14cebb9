"""The ``--stop-*`` flags of ``train``: when a run has trained enough."""

from __future__ import annotations

import argparse
import math
from typing import Optional

#: Iterations a ``train`` invocation runs when no stop flag is given.
DEFAULT_STOP_ITERS = 100


class StopConditions:
    """The ``--stop-*`` flags; the first one reached ends training."""

    def __init__(self, args: argparse.Namespace, start_iteration: int):
        self.stop_return: Optional[float] = args.stop_return
        self.stop_timesteps: Optional[int] = args.stop_timesteps
        self.stop_iters: Optional[int] = args.stop_iters
        self.default_used = args.stop_return is None and args.stop_timesteps is None and args.stop_iters is None
        if self.default_used:
            self.stop_iters = start_iteration + DEFAULT_STOP_ITERS

    def describe(self) -> str:
        """The conditions, for the ``stopping at ...`` line."""
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
        if (
            self.stop_return is not None
            and mean_return is not None
            and math.isfinite(mean_return)
            and mean_return >= self.stop_return
        ):
            return f"mean return {mean_return:.1f} >= {self.stop_return:g} (--stop-return)"
        if self.stop_iters is not None and iteration >= self.stop_iters:
            return (
                f"reached iteration {iteration} (--stop-iters {self.stop_iters})"
                if not self.default_used
                else f"ran {DEFAULT_STOP_ITERS} iterations (the default when no stop flag is given)"
            )
        if self.stop_timesteps is not None and env_steps >= self.stop_timesteps:
            return f"sampled {env_steps:,} env steps >= {self.stop_timesteps:,} (--stop-timesteps)"
        return None
