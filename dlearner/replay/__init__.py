"""Replay buffers for off-policy learning (SAC): uniform and proportional prioritized.

* ``buffer.py``: :class:`ReplayBuffer`, transitions as columns of preallocated arrays in a ring (uniform sampling);
* ``prioritized.py``: :class:`PrioritizedReplayBuffer`, sampling by TD error on a vectorised sum tree;
* ``config.py``: ``replay_buffer_config`` checked (:func:`validate_replay_buffer_config`) and built (:func:`make_replay_buffer`).

Example::

    >>> import numpy as np
    >>> buffer = make_replay_buffer(validate_replay_buffer_config({"capacity": 1000}, train_batch_size=2), seed=0)
    >>> buffer.add({"obs": np.zeros((5, 3), np.float32), "rewards": np.ones(5, np.float32)})
    >>> len(buffer), sorted(buffer.sample(2))
    (5, ['obs', 'rewards'])
"""

from __future__ import annotations

from dlearner.replay.buffer import ReplayBuffer
from dlearner.replay.config import REPLAY_BUFFER_TYPES, make_replay_buffer, validate_replay_buffer_config
from dlearner.replay.prioritized import PrioritizedReplayBuffer

__all__ = [
    "REPLAY_BUFFER_TYPES",
    "PrioritizedReplayBuffer",
    "ReplayBuffer",
    "make_replay_buffer",
    "validate_replay_buffer_config",
]
