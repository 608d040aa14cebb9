"""What a multi-agent env runner keeps between steps: each agent's trajectory and each env's episode.

A row of an agent's trajectory is one of its steps: the observation it acted on, the action and
what the module said about it (log-probability, distribution inputs, value), and the reward it got
until it acted again. A row is *open* until the agent's next observation arrives (its value then
bootstraps the row) or the agent is done. Rows of one agent slot (env, agent, module) stay in time
order across episodes; ``terminateds`` / ``truncateds`` mark where an episode ended, so GAE and
V-trace never run across episodes.
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any, Dict, List, Optional

import numpy as np

from dlearner.columns import Columns

#: Column of a multi-agent fragment: the share of one env step a row stands for (1 / the agents that
#: acted in that step), so ``sum(env_step_share)`` over a module's rows counts env steps.
ENV_STEP_SHARE = "env_step_share"
#: V(s_{t+1}) per row (the bootstrap value), as in single-agent fragments.
NEXT_VF_PREDS = "next_vf_preds"

_ROW_COLUMNS = (
    Columns.OBS,
    Columns.ACTIONS,
    Columns.ACTION_LOGP,
    Columns.ACTION_DIST_INPUTS,
    Columns.VF_PREDS,
    ENV_STEP_SHARE,
)
_CLOSING_COLUMNS = (Columns.REWARDS, Columns.TERMINATEDS, Columns.TRUNCATEDS, NEXT_VF_PREDS)
FRAGMENT_COLUMNS = _ROW_COLUMNS + _CLOSING_COLUMNS


class AgentTrajectory:
    """The rows of one agent slot (env index, agent id, module id), oldest first."""

    def __init__(self) -> None:
        self._closed: Dict[str, List[Any]] = {c: [] for c in FRAGMENT_COLUMNS}
        self.pending: Optional[Dict[str, Any]] = None  # the open row
        self.idle = False  # its agent's episode ended and no later episode has used this slot yet

    def __len__(self) -> int:
        return len(self._closed[Columns.OBS])

    def open(self, obs: np.ndarray, action: Any, logp: float, dist_inputs: np.ndarray, vf: float, share: float) -> None:
        """Start a row for the agent's new step (the previous one must be closed)."""
        self.pending = {
            Columns.OBS: obs,
            Columns.ACTIONS: action,
            Columns.ACTION_LOGP: logp,
            Columns.ACTION_DIST_INPUTS: dist_inputs,
            Columns.VF_PREDS: vf,
            ENV_STEP_SHARE: share,
            Columns.REWARDS: 0.0,
        }
        self.idle = False

    def add_reward(self, reward: float) -> None:
        if self.pending is not None:
            self.pending[Columns.REWARDS] += float(reward)

    def close(self, *, next_vf: float, terminated: bool = False, truncated: bool = False) -> int:
        """Close the open row; returns its index (its ``next_vf`` may be filled in later with :meth:`set_next_vf`)."""
        row = self.pending
        assert row is not None, "close() without an open row"
        for column in _ROW_COLUMNS:
            self._closed[column].append(row[column])
        self._closed[Columns.REWARDS].append(row[Columns.REWARDS])
        self._closed[Columns.TERMINATEDS].append(bool(terminated))
        self._closed[Columns.TRUNCATEDS].append(bool(truncated and not terminated))
        self._closed[NEXT_VF_PREDS].append(0.0 if terminated else float(next_vf))
        self.pending = None
        return len(self) - 1

    def set_next_vf(self, index: int, value: float) -> None:
        self._closed[NEXT_VF_PREDS][index] = float(value)

    def take(self, num_rows: Optional[int] = None, *, pad_to: Optional[int] = None) -> Dict[str, np.ndarray]:
        """Remove and return the oldest ``num_rows`` closed rows (all by default) as arrays; with
        ``pad_to``, padded to that length by repeating the last row with ``loss_mask`` False."""
        num_rows = len(self) if num_rows is None else num_rows
        out = {c: np.asarray(values[:num_rows]) for c, values in self._closed.items()}
        for values in self._closed.values():
            del values[:num_rows]
        out[Columns.OBS] = out[Columns.OBS].astype(np.float32, copy=False)
        for column in (Columns.ACTION_LOGP, Columns.VF_PREDS, Columns.REWARDS, NEXT_VF_PREDS, ENV_STEP_SHARE):
            out[column] = out[column].astype(np.float32, copy=False)
        out[Columns.ACTION_DIST_INPUTS] = out[Columns.ACTION_DIST_INPUTS].astype(np.float32, copy=False)
        out[Columns.LOSS_MASK] = np.ones(num_rows, dtype=bool)
        if pad_to is not None and num_rows < pad_to:
            extra = pad_to - num_rows
            for column, values in out.items():
                out[column] = np.concatenate([values, np.repeat(values[-1:], extra, axis=0)])
            # Padding rows train nothing and end an episode, so V-trace never bootstraps through them.
            out[Columns.LOSS_MASK][num_rows:] = False
            out[Columns.TERMINATEDS][num_rows:] = True
            out[Columns.TRUNCATEDS][num_rows:] = False
            out[Columns.REWARDS][num_rows:] = 0.0
            out[NEXT_VF_PREDS][num_rows:] = 0.0
            out[ENV_STEP_SHARE][num_rows:] = 0.0
        return out


@dataclasses.dataclass
class Episode:
    """One env's running episode, as the policy mapping function, the episode metrics and episode
    callbacks (:class:`dlearner.Callbacks`) see it.

    ``policy_mapping_fn(agent_id, episode)`` receives this object: ``id_``, ``env_index``,
    ``worker_index``, ``length`` (env steps so far) and ``agent_to_module`` (the mapping so far).
    Callbacks also read ``agent_returns`` (rewards summed per agent), :meth:`get_return`,
    ``last_infos`` (each agent's latest ``info``, from reset on; filled only while episode
    callbacks are configured), ``done_agents``, ``is_done`` and ``custom_data`` (a dict for your own
    per-episode data).
    """

    env_index: int
    worker_index: int
    id_: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)
    length: int = 0
    agent_to_module: Dict[str, str] = dataclasses.field(default_factory=dict)
    agent_returns: Dict[str, float] = dataclasses.field(default_factory=dict)
    done_agents: set = dataclasses.field(default_factory=set)
    last_infos: Dict[str, Any] = dataclasses.field(default_factory=dict)
    is_done: bool = False
    custom_data: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def add_reward(self, agent_id: str, reward: float) -> None:
        self.agent_returns[agent_id] = self.agent_returns.get(agent_id, 0.0) + float(reward)

    @property
    def total_return(self) -> float:
        """The sum over agents (RLlib's ``episode_return``)."""
        return float(sum(self.agent_returns.values()))

    def get_return(self) -> float:
        """The episode's return so far, summed over agents (RLlib's name)."""
        return self.total_return
