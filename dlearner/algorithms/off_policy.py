"""Learners that train from a replay buffer of their own (SAC): the buffer lives with the learners.

Env runners sample; the driver turns their fragments into transitions and sends each batch of new
rows once to every learner (:meth:`LearnerGroup.update_from_replay_buffer`); every learner adds them
to its own copy of the replay buffer and samples its training batches there, so training batches
never travel. All copies hold the same rows and sample with the same generator, so every learner
draws the same global batch and trains its shard of it, exactly as N learners train a batch the
driver shards (N learners equal one learner on the whole batch). Prioritized replay keeps the
copies equal too: each learner computes the TD errors of its shard, and one all-reduce gives every
learner all of them before the priorities change.

The buffer is learner state (``learner_state/replay_buffer``): a learner that replaces a lost one
gets it with the rest of the state, and checkpoints hold it when ``store_buffer_in_checkpoints``.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import torch

from dlearner.batch import ShardInfo
from dlearner.columns import ALL_MODULES, DEFAULT_MODULE_ID

#: Key of the replay buffer in the learner state.
REPLAY_BUFFER_STATE = "replay_buffer"
#: Key of the id of the last row batch added (a retried call adds its rows once).
ROWS_ADDED_STATE = "last_replay_row_batch"
#: Column of importance weights (prioritized replay) in a training batch.
WEIGHTS = "weights"


class ReplayLearnerMixin:
    """A learner's replay buffer and its updates from it. Put it before the Learner base class.

    The learner's loss must store ``self.td_errors[module_id]``: one value per row of its shard (in
    row order) when the buffer is prioritized.
    """

    def build(self) -> None:
        super().build()
        from dlearner.replay import make_replay_buffer

        self.replay_buffer = make_replay_buffer(self.config.replay_buffer_config, seed=self.config.seed)
        self.last_replay_row_batch = ""
        self.td_errors: Dict[str, torch.Tensor] = {}

    @property
    def is_prioritized(self) -> bool:
        return self.config.replay_buffer_config["type"] == "prioritized"

    def update_from_replay_buffer(
        self,
        rows: Optional[Mapping[str, np.ndarray]],
        *,
        row_batch_id: str,
        num_updates: int,
        batch_size: int,
        timesteps: Mapping[str, Any],
        rank: int = 0,
        world: int = 1,
    ) -> Dict[str, Dict[str, Any]]:
        """Add ``rows`` (whose id ``row_batch_id`` makes a retried call add them once), then ``num_updates`` updates on ``batch_size`` rows sampled from the buffer, of
        which this learner (``rank`` of ``world``) trains its shard. Returns the results averaged over
        the updates (counts summed), with ``replay_buffer_size``."""
        if rows is not None and row_batch_id != self.last_replay_row_batch:
            self.replay_buffer.add(rows)
            self.last_replay_row_batch = row_batch_id
        results: List[Dict[str, Dict[str, Any]]] = []
        if num_updates > 0 and len(self.replay_buffer) == 0:
            raise ValueError("The replay buffer is empty; add rows before training from it.")
        bounds = np.linspace(0, batch_size, world + 1).round().astype(int)
        lo, hi = int(bounds[rank]), int(bounds[rank + 1])
        # The call's updates stand or fall together: one snapshot and one non-finite check for all of
        # them (each would cost SAC's small update ~9 %). A failed call leaves the weights, optimizers
        # and counters as before it; the rows stay added (once) and earlier priorities stay updated.
        with self.updates_as_one():
            for _ in range(num_updates):
                indices, weights = self.replay_buffer.sample_indices(batch_size)
                local = self.replay_buffer.gather(indices[lo:hi]) if hi > lo else {}
                if weights is not None and hi > lo:
                    local[WEIGHTS] = weights[lo:hi]
                shard = ShardInfo(row_offsets={DEFAULT_MODULE_ID: lo}, global_rows={DEFAULT_MODULE_ID: batch_size})
                batch = {DEFAULT_MODULE_ID: local} if local else {}
                results.append(self.update(batch, timesteps, shard=shard if world > 1 else None, shuffle=False))
                if self.is_prioritized:
                    self._update_priorities(indices, lo, hi)
        out = _mean_results(results) if results else {ALL_MODULES: {}}
        out[ALL_MODULES]["replay_buffer_size"] = len(self.replay_buffer)
        return out

    def _update_priorities(self, indices: np.ndarray, lo: int, hi: int) -> None:
        """New priorities from the TD errors of every learner's rows (one all-reduce puts them together)."""
        errors = torch.zeros(len(indices), dtype=torch.float64)
        if hi > lo:
            errors[lo:hi] = self.td_errors[DEFAULT_MODULE_ID].detach().to("cpu", torch.float64)
        if self._collective is not None and self._collective.world_size > 1:
            errors = errors.to(self.device)
            self._collective.all_reduce_sum(errors)
        self.replay_buffer.update_priorities(indices, errors.cpu().numpy())

    # -- state ----------------------------------------------------------------------------------
    def get_learner_state(self) -> Dict[str, Any]:
        state = super().get_learner_state()
        if not getattr(self, "_snapshotting", False):
            state[REPLAY_BUFFER_STATE] = self.replay_buffer.get_state()
        state[ROWS_ADDED_STATE] = self.last_replay_row_batch
        return state

    def learner_state_for_snapshot(self) -> Dict[str, Any]:
        """The learner state without the buffer: an update never changes it (rows join before, priorities
        change after), and copying a million rows for every update's snapshot would cost more than the
        update. The subclass's own state (SAC's noise generator) is in, as ``get_learner_state`` gives it."""
        self._snapshotting = True
        try:
            return self.get_learner_state()
        finally:
            self._snapshotting = False

    def _check_learner_state(self, state) -> None:
        super()._check_learner_state(state)
        if ROWS_ADDED_STATE in state and not (isinstance(state[ROWS_ADDED_STATE], str) and len(state[ROWS_ADDED_STATE]) < 100):
            raise ValueError(f"learner_state/{ROWS_ADDED_STATE} must be a short string, got {state[ROWS_ADDED_STATE]!r:.100}.")
        if REPLAY_BUFFER_STATE in state:
            self.replay_buffer.check_state(state[REPLAY_BUFFER_STATE])

    def set_learner_state(self, state) -> None:
        super().set_learner_state(state)
        if REPLAY_BUFFER_STATE in state:
            self.replay_buffer.set_state(state[REPLAY_BUFFER_STATE])
        if ROWS_ADDED_STATE in state:
            self.last_replay_row_batch = state[ROWS_ADDED_STATE]

    def checkpoint_excluded_components(self) -> List[str]:
        """The buffer stays out of checkpoints unless ``store_buffer_in_checkpoints``."""
        return [] if self.config.store_buffer_in_checkpoints else [f"learner_state/{REPLAY_BUFFER_STATE}"]


def _mean_results(results: List[Dict[str, Dict[str, Any]]]) -> Dict[str, Dict[str, Any]]:
    """Several updates' results as one: counts (``num_*``) summed, lifetime counts and learning rates
    the last, everything else averaged."""
    out: Dict[str, Dict[str, Any]] = {}
    for key in results[-1]:
        values: Dict[str, Any] = {}
        for name, last in results[-1][key].items():
            series = [r[key][name] for r in results if name in r.get(key, {})]
            if name.endswith("_lifetime") or name.endswith("_learning_rate") or not isinstance(last, (int, float)):
                values[name] = last
            elif name.startswith("num_"):
                values[name] = sum(series)
            else:
                values[name] = float(np.mean(series))
        out[key] = values
    return out
