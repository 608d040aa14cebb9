"""The multi-agent env runner: steps ``num_envs_per_env_runner`` multi-agent envs with one module per policy.

Each step, every agent with an observation acts; the agents of all envs that map to one module act
in one forward pass. Rows go into one trajectory per agent slot (env, agent, module; see
:mod:`~dlearner.multi_agent.trajectories`), and :meth:`MultiAgentEnvRunner.sample` returns them
as ``{module_id: [segment, ...]}``, each segment one slot's consecutive rows (1-D columns):

* without ``rollout_fragment_length`` in the config (PPO): every closed row, segments of any length;
  an agent's open row is closed at the end of the call with the value of its current observation
  (so GAE can bootstrap it), unless its next observation has not arrived yet (turn-based envs);
* with ``rollout_fragment_length`` (IMPALA, APPO): segments of exactly that many rows, the remainder
  carried to the next call. A slot its agent left (an ended episode whose agent did not come back,
  or came back on another module) is sent padded, its padding rows masked out (``loss_mask``).

Like :class:`~dlearner.env_runner.EnvRunner` it knows nothing about Dask.
"""

from __future__ import annotations

import collections
import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch

from dlearner.acting import ActingModule
from dlearner.callbacks import Callbacks, RunnerCallbacks
from dlearner.columns import Columns
from dlearner.env_runner import _runner_seed, runner_generator
from dlearner.multi_agent.env import ALL_AGENTS, MultiAgentEnv, agent_spaces
from dlearner.multi_agent.mapping import map_agent, resolve_mapping
from dlearner.multi_agent.trajectories import ENV_STEP_SHARE, AgentTrajectory, Episode
from dlearner.rl_module import MultiRLModuleSpec, RLModuleSpec

Segments = Dict[str, List[Dict[str, np.ndarray]]]
SlotKey = Tuple[int, str, str]  # (env index, agent id, module id)


class MultiAgentEnvRunner:
    """Samples multi-agent environments; the same interface as :class:`~dlearner.env_runner.EnvRunner`.

    Example::

        runner = MultiAgentEnvRunner(config, module_spec=config.get_multi_rl_module_spec())
        segments = runner.sample(num_timesteps=1000)      # {module_id: [{column: array}, ...]}
        runner.get_metrics()["module_episode_returns"]
    """

    def __init__(self, config: Any, *, module_spec: MultiRLModuleSpec, worker_index: int = 0):
        self.config = config
        self.worker_index = worker_index
        torch.set_num_threads(max(1, int(getattr(config, "torch_num_threads", None) or 1)))
        seed = getattr(config, "seed", None)
        self.fragment_length: Optional[int] = getattr(config, "rollout_fragment_length", None)
        self._callbacks = RunnerCallbacks.for_config(config, worker_index)  # before the envs: nothing to close if it fails
        self.envs: List[MultiAgentEnv] = []
        try:
            for _ in range(int(config.num_envs_per_env_runner)):
                env = config.make_env()
                self.envs.append(env)
                if not isinstance(env, MultiAgentEnv):
                    raise ValueError(f"The environment made from {config.env!r} is not a multi-agent env.")
            self.possible_agents = list(self.envs[0].possible_agents)
            agent_spaces(self.envs[0])  # every possible agent has spaces
        except BaseException:
            self.stop()
            raise
        policies, self.mapping_fn = resolve_mapping(config.policies, config.policy_mapping_fn, self.possible_agents)
        self.modules: Dict[str, ActingModule] = {
            mid: ActingModule(spec, seed=seed) for mid, spec in module_spec.rl_module_specs.items()
        }
        self._torch_rng = runner_generator(seed, worker_index)
        # Checked once: without episode callbacks, no per-step work for them.
        self._follow_episodes = self._callbacks.episodes
        self._episodes_started = False  # the first episodes start (for callbacks) at the first sample()
        self._slots: Dict[SlotKey, AgentTrajectory] = {}
        self._episodes: List[Episode] = []
        self._obs: List[Dict[str, Any]] = []
        base_seed = _runner_seed(seed, worker_index)
        for index, env in enumerate(self.envs):
            obs, infos = env.reset(seed=None if base_seed is None else base_seed * 100 + index)
            episode = Episode(env_index=index, worker_index=worker_index)
            if self._follow_episodes:
                episode.last_infos.update(infos or {})
            self._episodes.append(episode)
            self._obs.append(dict(obs))
        self._finished: List[Episode] = []
        self.num_env_steps_sampled_lifetime = 0
        self.num_agent_steps_sampled_lifetime = 0
        self.num_episodes_lifetime = 0

    # -------------------------------------------------------------------------------- weights
    def set_weights(self, weights: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        """Load the weights of the modules in ``weights`` (``{module_id: {name: array}}``)."""
        for module_id, state in weights.items():
            if module_id in self.modules:
                self.modules[module_id].module.set_state(state)

    def get_weights(self) -> Dict[str, Dict[str, np.ndarray]]:
        return {mid: acting.module.get_state() for mid, acting in self.modules.items()}

    @property
    def callbacks(self) -> Callbacks:
        """This runner's instance of ``config.callbacks_class`` (its episode callbacks run on it)."""
        return self._callbacks.callbacks

    def add_module(
        self, module_id: str, module_spec: RLModuleSpec, weights: Optional[Mapping[str, np.ndarray]], config: Any
    ) -> None:
        """Act with a new module, starting from ``weights``; agents map as ``config.multi_agent(...)`` now says
        (agents already in a running episode keep their module)."""
        acting = ActingModule(module_spec)
        if weights is not None:
            acting.module.set_state(weights)
        self.modules[module_id] = acting
        self._set_mapping(config)

    def remove_module(self, module_id: str, config: Any) -> None:
        """Stop acting with ``module_id``: its unsent rows are dropped (no learner trains it any more) and
        agents of running episodes that acted with it are mapped again."""
        self.modules.pop(module_id, None)
        self._set_mapping(config)
        for key in [k for k in self._slots if k[2] == module_id]:
            del self._slots[key]
        for episode in self._episodes:
            for agent, mid in list(episode.agent_to_module.items()):
                if mid == module_id:
                    del episode.agent_to_module[agent]

    def _set_mapping(self, config: Any) -> None:
        self.config.policies, self.config.policy_mapping_fn = config.policies, config.policy_mapping_fn
        _, self.mapping_fn = resolve_mapping(config.policies, config.policy_mapping_fn, self.possible_agents)

    # ------------------------------------------------------------------------------- sampling
    def _module_of(self, env_index: int, agent_id: str) -> str:
        episode = self._episodes[env_index]
        module_id = episode.agent_to_module.get(agent_id)
        if module_id is None:
            module_id = episode.agent_to_module[agent_id] = map_agent(self.mapping_fn, agent_id, episode, self.modules)
        return module_id

    def _slot(self, key: SlotKey) -> AgentTrajectory:
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = AgentTrajectory()
        return slot

    def _values_of(self, requests: List[Tuple[AgentTrajectory, int, str, Any]]) -> None:
        """Fill in the bootstrap values of closed rows: one forward pass per module."""
        by_module: Dict[str, List[Tuple[AgentTrajectory, int, Any]]] = collections.defaultdict(list)
        for slot, row, module_id, obs in requests:
            by_module[module_id].append((slot, row, obs))
        for module_id, items in by_module.items():
            acting = self.modules[module_id]
            values = acting.values(acting.stack([obs for _, _, obs in items]))
            for (slot, row, _), value in zip(items, values):
                slot.set_next_vf(row, float(value))

    def _step(self) -> None:
        """One step of every env: all agents with an observation act, one forward pass per module."""
        acting_rows: Dict[str, List[Tuple[int, str, Any]]] = collections.defaultdict(list)
        for index, obs in enumerate(self._obs):
            for agent_id, agent_obs in obs.items():
                acting_rows[self._module_of(index, agent_id)].append((index, agent_id, agent_obs))
        action_dicts: List[Dict[str, Any]] = [{} for _ in self.envs]
        acting_count = [len(obs) for obs in self._obs]
        for module_id, rows in acting_rows.items():
            acting = self.modules[module_id]
            batch = acting.stack([obs for _, _, obs in rows])
            out = acting.act(batch, generator=self._torch_rng)
            env_actions = acting.env_actions(out.actions)
            vf = out.vf_preds.numpy() if out.vf_preds is not None else np.zeros(len(rows), np.float32)
            actions, logp, inputs = out.actions.numpy(), out.logp.numpy(), out.dist_inputs.numpy()
            for i, (index, agent_id, _) in enumerate(rows):
                slot = self._slot((index, agent_id, module_id))
                if slot.pending is not None:
                    slot.close(next_vf=vf[i])  # its next observation arrived: V of it bootstraps the row
                slot.open(batch[i], actions[i], logp[i], inputs[i], vf[i], 1.0 / acting_count[index])
                action_dicts[index][agent_id] = env_actions[i]
        self.num_agent_steps_sampled_lifetime += sum(acting_count)
        bootstrap: List[Tuple[AgentTrajectory, int, str, Any]] = []
        for index, env in enumerate(self.envs):
            self._step_env(index, env, action_dicts[index], bootstrap)
        self._values_of(bootstrap)

    def _step_env(self, index: int, env: MultiAgentEnv, actions: Dict[str, Any], bootstrap: List) -> None:
        episode = self._episodes[index]
        obs, rewards, terminateds, truncateds, infos = env.step(actions)
        obs = dict(obs)
        episode.length += 1
        if self._follow_episodes:
            episode.last_infos.update(infos or {})
        for agent_id, reward in rewards.items():
            episode.add_reward(agent_id, reward)
            module_id = episode.agent_to_module.get(agent_id)
            if module_id is not None and (index, agent_id, module_id) in self._slots:
                self._slots[(index, agent_id, module_id)].add_reward(reward)
        for agent_id in (*terminateds, *truncateds):
            if agent_id != ALL_AGENTS and (terminateds.get(agent_id) or truncateds.get(agent_id)):
                episode.done_agents.add(agent_id)
        all_terminated = bool(terminateds.get(ALL_AGENTS, False))
        live_obs = {agent_id: o for agent_id, o in obs.items() if agent_id not in episode.done_agents}
        episode_over = all_terminated or bool(truncateds.get(ALL_AGENTS, False)) or not live_obs
        for agent_id, module_id in episode.agent_to_module.items():
            slot = self._slots.get((index, agent_id, module_id))
            if slot is None or slot.pending is None:
                continue
            terminated = bool(terminateds.get(agent_id, False)) or (episode_over and all_terminated)
            truncated = bool(truncateds.get(agent_id, False)) or episode_over
            if terminated or truncated:
                # The agent is done: its rows can go (padded, for IMPALA/APPO) without waiting for the
                # other agents' episode to end; the slot resumes if the agent comes back in a later episode.
                slot.idle = True
            if terminated:
                slot.close(next_vf=0.0, terminated=True)
            elif truncated:
                # Bootstrapped from the final observation's value (or, if the env gave none, the last one's).
                final_obs = obs.get(agent_id)
                row = slot.close(next_vf=slot.pending[Columns.VF_PREDS], truncated=True)
                if final_obs is not None:
                    bootstrap.append((slot, row, module_id, final_obs))
        if self._follow_episodes:
            self._callbacks.episode("on_episode_step", episode, self)
        if episode_over:
            self._end_episode(index, env)
        else:
            self._obs[index] = live_obs  # agents that are done leave the episode: they act no more

    def _end_episode(self, index: int, env: MultiAgentEnv) -> None:
        episode = self._episodes[index]
        episode.is_done = True
        self._finished.append(episode)
        self.num_episodes_lifetime += 1
        if self._follow_episodes:
            self._callbacks.episode("on_episode_end", episode, self)
        for (env_index, _, _), slot in self._slots.items():
            if env_index == index:
                slot.idle = True  # until an agent of the next episode uses it again
        obs, infos = env.reset()
        episode = self._episodes[index] = Episode(env_index=index, worker_index=self.worker_index)
        self._obs[index] = dict(obs)
        if self._follow_episodes:
            episode.last_infos.update(infos or {})
            self._callbacks.episode("on_episode_start", episode, self)

    def sample(self, num_timesteps: int) -> Segments:
        """Step each env ``ceil(num_timesteps / num_envs)`` times; returns ``{module_id: [segment, ...]}``
        (see the module docstring). Every segment has the columns of
        :data:`~dlearner.multi_agent.trajectories.FRAGMENT_COLUMNS` and ``loss_mask``."""
        if not isinstance(num_timesteps, int) or num_timesteps < 1:
            raise ValueError(f"num_timesteps must be a positive int, got {num_timesteps!r}.")
        steps = math.ceil(num_timesteps / len(self.envs))
        if self._follow_episodes and not self._episodes_started:
            self._episodes_started = True
            for episode in self._episodes:
                self._callbacks.episode("on_episode_start", episode, self)
        for _ in range(steps):
            self._step()
        self.num_env_steps_sampled_lifetime += steps * len(self.envs)
        if self.fragment_length is None:
            segments = self._take_all()
        else:
            segments = self._take_fragments(int(self.fragment_length))
        self._callbacks.sample_end(self, segments)
        return segments

    def _take_all(self) -> Segments:
        """Every closed row; open rows whose agent already has its next observation are closed first."""
        bootstrap = []
        for (index, agent_id, module_id), slot in self._slots.items():
            obs = self._obs[index].get(agent_id)
            if slot.pending is not None and obs is not None and self._episodes[index].agent_to_module.get(agent_id) == module_id:
                row = slot.close(next_vf=0.0)
                bootstrap.append((slot, row, module_id, obs))
        self._values_of(bootstrap)
        out: Segments = collections.defaultdict(list)
        for (_, _, module_id), slot in self._slots.items():
            if len(slot):
                out[module_id].append(slot.take())
        self._drop_empty_idle()
        return dict(out)

    def _take_fragments(self, length: int) -> Segments:
        """Segments of ``length`` rows; a slot left idle by an ended episode is sent padded."""
        out: Segments = collections.defaultdict(list)
        for (_, _, module_id), slot in self._slots.items():
            while len(slot) >= length:
                out[module_id].append(slot.take(length))
            if slot.idle and slot.pending is None and len(slot):
                out[module_id].append(slot.take(pad_to=length))
        self._drop_empty_idle()
        return dict(out)

    def _drop_empty_idle(self) -> None:
        for key in [k for k, slot in self._slots.items() if slot.idle and not len(slot) and slot.pending is None]:
            del self._slots[key]

    def sample_with_metrics(
        self, num_timesteps: int, weights: Optional[Mapping[str, Mapping[str, np.ndarray]]] = None
    ) -> Tuple[Segments, Dict[str, Any]]:
        """Load ``weights`` (if given), :meth:`sample`, and return the segments with :meth:`get_metrics`."""
        if weights is not None:
            self.set_weights(weights)
        segments = self.sample(num_timesteps)
        return segments, self.get_metrics()

    def split_into_fragments(
        self, segments: Segments, columns: Tuple[str, ...], num_timesteps: int
    ) -> Tuple[List[Tuple[Dict[str, np.ndarray], Dict[str, Any]]], int]:
        """A :meth:`sample` as fragments, module by module: each segment (its ``columns`` only) with its
        description (``module_id``, ``rows``, ``env_steps``, ``loss_mask``: which rows are padding), and
        the env steps sampled (see :meth:`dlearner.env_runner.EnvRunner.split_into_fragments`)."""
        fragments = [
            (
                {c: segment[c] for c in columns},
                {
                    "module_id": module_id,
                    "rows": len(segment[Columns.LOSS_MASK]),
                    "env_steps": float(segment[ENV_STEP_SHARE].sum()),
                    "loss_mask": segment[Columns.LOSS_MASK],
                },
            )
            for module_id, module_segments in segments.items()
            for segment in module_segments
        ]
        return fragments, math.ceil(num_timesteps / len(self.envs)) * len(self.envs)

    # -------------------------------------------------------------------------------- metrics
    def get_metrics(self) -> Dict[str, Any]:
        """Episodes finished since the last call (summed, per agent and per module) and lifetime counters."""
        agent_returns: Dict[str, List[float]] = collections.defaultdict(list)
        module_returns: Dict[str, List[float]] = collections.defaultdict(list)
        for episode in self._finished:
            for agent_id, value in episode.agent_returns.items():
                agent_returns[agent_id].append(value)
                module_id = episode.agent_to_module.get(agent_id)
                if module_id is not None:
                    module_returns[module_id].append(value)
        metrics = {
            "episode_returns": [e.total_return for e in self._finished],
            "episode_lengths": [e.length for e in self._finished],
            "agent_episode_returns": dict(agent_returns),
            "module_episode_returns": dict(module_returns),
            "num_env_steps_sampled_lifetime": self.num_env_steps_sampled_lifetime,
            "num_agent_steps_sampled_lifetime": self.num_agent_steps_sampled_lifetime,
            "num_episodes_lifetime": self.num_episodes_lifetime,
            "worker_index": self.worker_index,
            "custom": self._callbacks.report(),  # what callbacks logged (dlearner.callbacks.MetricsLogger)
        }
        self._finished = []
        return metrics

    @torch.no_grad()
    def evaluate(self, num_episodes: int, *, seed: Optional[int] = None) -> Dict[str, Any]:
        """``num_episodes`` greedy episodes, one after another on a fresh env (episode ``i`` reset with ``seed + i``)."""
        env = self.config.make_env()
        returns, lengths = [], []
        agent_returns: Dict[str, List[float]] = collections.defaultdict(list)
        try:
            for i in range(num_episodes):
                obs, _ = env.reset(seed=None if seed is None else seed + i)
                episode = Episode(env_index=0, worker_index=self.worker_index)
                while obs:
                    actions = {}
                    for agent_id, agent_obs in obs.items():
                        if agent_id not in episode.agent_to_module:
                            episode.agent_to_module[agent_id] = map_agent(self.mapping_fn, agent_id, episode, self.modules)
                        acting = self.modules[episode.agent_to_module[agent_id]]
                        out = acting.act(acting.stack([agent_obs]), explore=False)
                        actions[agent_id] = acting.env_actions(out.actions)[0]
                    obs, rewards, terminateds, truncateds, _ = env.step(actions)
                    episode.length += 1
                    for agent_id, reward in rewards.items():
                        episode.add_reward(agent_id, reward)
                    for agent_id in list(obs):
                        if terminateds.get(agent_id) or truncateds.get(agent_id):
                            episode.done_agents.add(agent_id)
                    if terminateds.get(ALL_AGENTS) or truncateds.get(ALL_AGENTS):
                        break
                    obs = {a: o for a, o in obs.items() if a not in episode.done_agents}
                returns.append(episode.total_return)
                lengths.append(episode.length)
                for agent_id, value in episode.agent_returns.items():
                    agent_returns[agent_id].append(value)
        finally:
            env.close()
        return {"episode_returns": returns, "episode_lengths": lengths, "agent_episode_returns": dict(agent_returns)}

    def foreach_env(self, fn: Callable[[Any], Any]) -> List[Any]:
        """``fn(env)`` for each of this runner's multi-agent envs, in order; their values (changes
        apply from the next step on; a running episode goes on in the changed env)."""
        return [fn(env) for env in self.envs]

    # ---------------------------------------------------------------------------------- state
    def get_state(self) -> Dict[str, Any]:
        """Counters and the sampling generator (environments restart on restore)."""
        return {
            "num_env_steps_sampled_lifetime": self.num_env_steps_sampled_lifetime,
            "num_agent_steps_sampled_lifetime": self.num_agent_steps_sampled_lifetime,
            "num_episodes_lifetime": self.num_episodes_lifetime,
            "torch_rng": self._torch_rng.get_state().numpy().copy(),
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        self.num_env_steps_sampled_lifetime = int(state["num_env_steps_sampled_lifetime"])
        self.num_agent_steps_sampled_lifetime = int(state.get("num_agent_steps_sampled_lifetime", 0))
        self.num_episodes_lifetime = int(state["num_episodes_lifetime"])
        if "torch_rng" in state:
            self._torch_rng.set_state(torch.from_numpy(np.asarray(state["torch_rng"], dtype=np.uint8).copy()))

    def stop(self) -> None:
        """Close the environments."""
        for env in self.envs:
            env.close()
