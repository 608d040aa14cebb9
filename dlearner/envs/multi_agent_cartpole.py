"""``MultiAgentCartPole``: independent CartPole-v1 copies, one per agent (RLlib's multi-agent example env).

Each agent balances its own pole; an agent leaves the episode when its pole falls (or after 500
steps), and the episode ends when every agent has left. The summed return of a perfect episode is
``500 * num_agents``.

Example::

    from dlearner import PPOConfig
    from dlearner.envs import MultiAgentCartPole

    config = PPOConfig().environment(MultiAgentCartPole, env_config={"num_agents": 2}).multi_agent(
        policies={"p0", "p1"}, policy_mapping_fn=lambda agent_id, episode, **kwargs: f"p{agent_id[-1]}"
    )

From the command line: ``dlearner train --env dlearner.envs:MultiAgentCartPole --policies per-agent``.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import gymnasium as gym

from dlearner.multi_agent.env import ALL_AGENTS, MultiAgentEnv


class MultiAgentCartPole(MultiAgentEnv):
    """``env_config["num_agents"]`` (default 2) CartPole-v1 envs stepped together; agents ``agent_0``, ``agent_1``, ..."""

    def __init__(self, config: Optional[Dict[str, Any]] = None):
        super().__init__()
        num_agents = int((config or {}).get("num_agents", 2))
        if num_agents < 1:
            raise ValueError(f"env_config['num_agents'] must be at least 1, got {num_agents}.")
        self.envs = {f"agent_{i}": gym.make("CartPole-v1") for i in range(num_agents)}
        self.possible_agents = list(self.envs)
        self.agents = []
        self.observation_spaces = {agent: env.observation_space for agent, env in self.envs.items()}
        self.action_spaces = {agent: env.action_space for agent, env in self.envs.items()}

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None):
        self.agents = list(self.possible_agents)
        obs, infos = {}, {}
        for i, (agent, env) in enumerate(self.envs.items()):
            obs[agent], infos[agent] = env.reset(seed=None if seed is None else seed + i)
        return obs, infos

    def step(self, action_dict):
        obs, rewards, terminateds, truncateds, infos = {}, {}, {}, {}, {}
        for agent, action in action_dict.items():
            obs[agent], rewards[agent], terminateds[agent], truncateds[agent], infos[agent] = self.envs[agent].step(action)
            if terminateds[agent] or truncateds[agent]:
                self.agents.remove(agent)
        # Each agent's own flags say how it left; "__all__" only says that nobody is left.
        terminateds[ALL_AGENTS] = not self.agents
        truncateds[ALL_AGENTS] = False
        return obs, rewards, terminateds, truncateds, infos

    def close(self) -> None:
        for env in self.envs.values():
            env.close()
