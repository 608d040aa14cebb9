"""Exceptions a LearnerGroup raises for problems of the cluster rather than of the user's code.

An exception raised *inside* a learner (a bad loss, a ``ValueError`` from a batch check) reaches
the caller as itself, with the learner's traceback attached as a note; these classes are for what
only a distributed run can go through.
"""

from __future__ import annotations

__all__ = [
    "LearnerGroupError",
    "ClusterResourceError",
    "ProcessGroupError",
    "LearnerDiedError",
    "RemoteLearnerError",
    "EnvRunnerDiedError",
]


class LearnerGroupError(RuntimeError):
    """A problem of the Dask side of a LearnerGroup (cluster, placement, learners, process group)."""


class ClusterResourceError(LearnerGroupError):
    """The cluster lacks the workers or resources the group asked for."""


class ProcessGroupError(LearnerGroupError):
    """The learners' ``torch.distributed`` process group could not be formed."""


class LearnerDiedError(LearnerGroupError):
    """A learner's worker died or cannot be reached; the group cannot train any more."""


class RemoteLearnerError(LearnerGroupError):
    """An exception raised inside a learner whose type cannot be rebuilt in the driver."""


class EnvRunnerDiedError(LearnerGroupError):
    """An env runner's worker died or cannot be reached."""

    #: Which env runner of its group was lost (``None`` if unknown).
    runner_index = None
