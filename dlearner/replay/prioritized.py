"""Proportional prioritized replay (Schaul et al. 2016) on a vectorised, blocked sum tree.

Row ``i`` is sampled with probability ``P(i) = p_i / sum_j p_j``, where ``p_i = (|td_i| + epsilon) ** alpha``
comes from the learners' TD errors (new rows get the largest priority seen so far, 1.0 at first), and
carries the importance weight ``w_i = (N * P(i)) ** -beta / max_j (N * P(j)) ** -beta``, which is
``(p_i / p_min) ** -beta`` with ``p_min`` the least priority held, so weights lie in (0, 1].

Why vectorised: a batch of 256 rows walked down a tree one row at a time costs 256 Python loops of
~20 levels each (milliseconds). Here the tree is one flat array (node ``n`` has children ``2n`` and
``2n + 1``, the root is node 1) and all draws descend together, one numpy step per level; updating
many priorities recomputes their ancestors level by level, also one numpy step per level.

Why blocked: a classic sum tree over one leaf per row plus a min tree costs 32 bytes per row in
float64, ~1.9x the 35 bytes of a Pendulum transition. Here the priorities are one float32 per row
(4 bytes), and the tree's leaves are blocks of :data:`ROWS_PER_BLOCK` rows: the sum tree (float64)
and the min tree (float32, least priority of the block's held rows) cost ~0.4 bytes per row. A draw
descends to its block, then finds its row by a cumulative sum over the block's 32 priorities. So a
million Pendulum transitions take ~1.14x their raw bytes. Sums are recomputed from the children (not
updated by differences), so no rounding error accumulates over millions of updates.

Priorities are stored in float32, so they are clipped to float32's positive range (``[1.2e-38, 3.4e38]``):
every held row keeps a chance of being drawn and every sum stays finite.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from dlearner.replay.buffer import ReplayBuffer
from dlearner.validation import is_real, non_negative, positive, unit_interval

ROWS_PER_BLOCK = 32
"""Rows per leaf of the sum tree: a draw's last step is a cumulative sum over this many priorities."""

_TINY = float(np.finfo(np.float32).tiny)
_HUGE = float(np.finfo(np.float32).max)
_UPPER_TRIANGLE = np.triu(np.ones((ROWS_PER_BLOCK, ROWS_PER_BLOCK)))  # x @ it: the cumulative sums of x's rows


class PrioritizedReplayBuffer(ReplayBuffer):
    """Proportional prioritized replay with importance weights (see the module docstring).

    Args:
        capacity: Most rows held; once full, each new row overwrites the oldest one.
        alpha: How much priorities count (>= 0): 0 samples uniformly, 1 in proportion to ``|td| + epsilon``.
        beta: How much importance weights correct for the non-uniform sampling, in [0, 1] (1: fully).
            A plain attribute: set it to anneal it.
        epsilon: Added to ``|td|`` (> 0), so rows with zero TD error are still drawn.
        seed: Seeds the buffer's own ``numpy`` generator.
    """

    buffer_type = "prioritized"

    def __init__(
        self, capacity: int, *, alpha: float = 0.6, beta: float = 0.4, epsilon: float = 1e-6, seed: Optional[int] = None
    ) -> None:
        super().__init__(capacity, seed=seed)
        self.alpha = non_negative("alpha", alpha)
        self.beta = unit_interval("beta", beta)
        self.epsilon = positive("epsilon", epsilon)
        num_blocks = -(-self.capacity // ROWS_PER_BLOCK)
        self._depth = (num_blocks - 1).bit_length()
        self._first_leaf = 1 << self._depth  # tree node of block 0; blocks past num_blocks stay empty
        self._priorities = np.zeros(num_blocks * ROWS_PER_BLOCK, np.float32)  # 0 for rows not held
        self._sums = np.zeros(2 * self._first_leaf, np.float64)
        self._mins = np.full(2 * self._first_leaf, np.inf, np.float32)
        self._max_priority = 1.0

    @property
    def nbytes(self) -> int:
        """Bytes of the preallocated column arrays, the priorities and the trees."""
        return super().nbytes + self._priorities.nbytes + self._sums.nbytes + self._mins.nbytes

    def _rows_written(self, start: int, count: int) -> None:
        rows = (start + np.arange(count)) % self.capacity
        self._priorities[rows] = self._max_priority
        self._refresh_blocks(np.unique(rows // ROWS_PER_BLOCK))

    # ---------------------------------------------------------------------------------- sampling
    def sample_indices(self, batch_size: int) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """``(indices, weights)``: ``batch_size`` rows drawn with replacement with probability ``P(i)``
        (stratified: one uniform draw in each of ``batch_size`` equal slices of the total priority),
        and their importance weights (float32, in (0, 1])."""
        self._check_can_sample(batch_size)
        targets = (np.arange(batch_size) + self._rng.random(batch_size)) * (self._sums[1] / batch_size)
        nodes = np.ones(batch_size, np.int64)
        for _ in range(self._depth):
            left = nodes * 2
            left_sums = self._sums[left]
            # Never into an empty subtree, even when rounding puts a target past the last priority.
            go_right = (targets >= left_sums) & (self._sums[left + 1] > 0)
            targets -= np.where(go_right, left_sums, 0.0)
            nodes = left + go_right
        blocks = nodes - self._first_leaf
        # Cumulative sums of each block's priorities (a product with a triangular matrix: faster than
        # np.cumsum along short rows); the row drawn is the first whose cumulative sum passes the target.
        cumulative = self._priorities.reshape(-1, ROWS_PER_BLOCK)[blocks].astype(np.float64) @ _UPPER_TRIANGLE
        # A target below the block's total lands on a row of positive priority, so never on a row not held.
        targets = np.minimum(targets, np.nextafter(cumulative[:, -1], 0.0))
        indices = blocks * ROWS_PER_BLOCK + np.argmax(cumulative > targets[:, None], axis=1)
        ratios = self._priorities[indices].astype(np.float64) / float(self._mins[1])
        weights = np.clip(ratios ** (-self.beta), _TINY, 1.0).astype(np.float32)
        return indices, weights

    def update_priorities(self, indices: np.ndarray, td_errors: np.ndarray) -> None:
        """Set ``p_i = (|td_i| + epsilon) ** alpha`` for each row of ``indices``.

        Where an index repeats, its last TD error wins. Non-finite TD errors raise ``ValueError``
        and change nothing. The largest priority seen (new rows' priority) never decreases.
        """
        indices = self._check_indices(indices, "update_priorities()")
        td_errors = np.asarray(td_errors)
        if td_errors.shape != indices.shape or td_errors.dtype.kind not in "iuf":
            raise ValueError(
                f"update_priorities() takes one real TD error per index: {indices.shape} indices, "
                f"TD errors of dtype {td_errors.dtype} and shape {td_errors.shape}."
            )
        if not np.isfinite(td_errors).all():
            raise ValueError(
                "update_priorities() got non-finite TD errors (NaN or inf); no priority changed. "
                "The critic diverged: lower the learning rate or check the rewards."
            )
        if not indices.size:
            return
        rows, first_in_reversed = np.unique(indices[::-1], return_index=True)
        priorities = self._priorities_of(td_errors[len(indices) - 1 - first_in_reversed])
        self._priorities[rows] = priorities
        self._max_priority = max(self._max_priority, float(priorities.max()))
        self._refresh_blocks(np.unique(rows // ROWS_PER_BLOCK))

    def _priorities_of(self, td_errors: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            priorities = (np.abs(td_errors.astype(np.float64)) + self.epsilon) ** self.alpha
        return np.clip(priorities, _TINY, _HUGE).astype(np.float32)

    # --------------------------------------------------------------------------------- the trees
    def _refresh_blocks(self, blocks: np.ndarray) -> None:
        """Recompute the tree leaves of ``blocks`` (no repeats) from the priorities, then their ancestors."""
        block_priorities = self._priorities.reshape(-1, ROWS_PER_BLOCK)[blocks]
        rows = blocks[:, None] * ROWS_PER_BLOCK + np.arange(ROWS_PER_BLOCK)
        nodes = self._first_leaf + blocks
        self._sums[nodes] = block_priorities.sum(axis=1, dtype=np.float64)
        self._mins[nodes] = np.where(rows < len(self), block_priorities, np.inf).min(axis=1)
        for _ in range(self._depth):
            # Repeated parents get the same value from the same children, so repeats are harmless.
            nodes >>= 1
            left = nodes << 1
            right = left + 1
            self._sums[nodes] = self._sums[left] + self._sums[right]
            self._mins[nodes] = np.minimum(self._mins[left], self._mins[right])

    # ------------------------------------------------------------------------------------- state
    def get_state(self) -> Dict[str, Any]:
        """The uniform buffer's state plus the held rows' priorities, the max priority, alpha, beta and epsilon."""
        return {
            **super().get_state(),
            "priorities": self._priorities[: len(self)].copy(),
            "max_priority": self._max_priority,
            "alpha": self.alpha,
            "beta": self.beta,
            "epsilon": self.epsilon,
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        """As :meth:`ReplayBuffer.set_state`; alpha, beta and epsilon come from the state too."""
        super().set_state(state)  # checks all of it (with this class's check_state) before changing anything
        self._priorities[:] = 0
        self._priorities[: len(self)] = state["priorities"]
        self._max_priority = float(state["max_priority"])
        self.alpha, self.beta, self.epsilon = float(state["alpha"]), float(state["beta"]), float(state["epsilon"])
        self._sums[:] = 0
        self._mins[:] = np.inf
        self._refresh_blocks(np.arange(len(self._priorities) // ROWS_PER_BLOCK))

    def _state_keys(self) -> Tuple[str, ...]:
        return (*super()._state_keys(), "priorities", "max_priority", "alpha", "beta", "epsilon")

    def check_state(self, state: Mapping[str, Any]) -> None:
        super().check_state(state)
        size = len(next(iter(state["columns"].values()))) if state["columns"] else 0
        priorities = state["priorities"]
        if not isinstance(priorities, np.ndarray) or priorities.shape != (size,) or priorities.dtype.kind not in "iuf":
            raise ValueError(
                f"Replay buffer state: priorities must be an array of {size} real numbers (one per row), "
                f"got {type(priorities).__name__} {getattr(priorities, 'shape', '')}."
            )
        with np.errstate(over="ignore"):
            as_stored = priorities.astype(np.float32)
        if not (np.isfinite(as_stored).all() and (as_stored > 0).all()):
            raise ValueError("Replay buffer state: priorities must be finite and > 0 in float32; the state is corrupted.")
        max_priority = state["max_priority"]
        highest = float(as_stored.max()) if size else 0.0
        if not is_real(max_priority) or not highest <= max_priority <= _HUGE or not max_priority > 0:
            raise ValueError(
                f"Replay buffer state: max_priority {max_priority!r:.50} must be a finite number > 0 and at least "
                f"the highest priority held ({highest})."
            )
        non_negative("replay buffer state['alpha']", state["alpha"])
        unit_interval("replay buffer state['beta']", state["beta"])
        positive("replay buffer state['epsilon']", state["epsilon"])
