"""Multi-agent environments: RLlib's dict-per-agent protocol, and PettingZoo's ``ParallelEnv`` as it is.

Every per-agent value is a dict keyed by agent id::

    obs, infos = env.reset(seed=0)                                   # {agent_id: obs}, {agent_id: info}
    obs, rewards, terminateds, truncateds, infos = env.step({agent_id: action, ...})

Agents act when they have an observation: the agents in ``obs`` after a step are the ones whose
actions the next step takes. ``terminateds["__all__"]`` / ``truncateds["__all__"]`` end the episode;
so does an episode without agents left. An agent that terminates or truncates on its own leaves the
episode (it is absent from later observations); an agent whose id appears for the first time
later joins it.

A ``pettingzoo.ParallelEnv`` has the same shape without ``"__all__"`` and with
``observation_space(agent)`` / ``action_space(agent)`` methods; :func:`as_multi_agent_env` wraps it
so env runners see one protocol.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import gymnasium as gym

ALL_AGENTS = "__all__"
"""The key of ``terminateds`` / ``truncateds`` that ends the whole episode."""

AgentDict = Dict[str, Any]


class MultiAgentEnv(gym.Env):
    """Base class of a multi-agent environment (RLlib's protocol; subclass it).

    Set ``possible_agents`` (every agent id that may ever act), ``agents`` (those in the current
    episode), ``observation_spaces`` and ``action_spaces`` (``{agent_id: space}``), and implement
    ``reset`` and ``step`` with dicts keyed by agent id.

    Example::

        class TwoCartPoles(MultiAgentEnv):
            def __init__(self, config=None):
                super().__init__()
                self.envs = {f"agent_{i}": gym.make("CartPole-v1") for i in range(2)}
                self.possible_agents = list(self.envs)
                self.observation_spaces = {a: e.observation_space for a, e in self.envs.items()}
                self.action_spaces = {a: e.action_space for a, e in self.envs.items()}
            ...
    """

    possible_agents: List[str] = []
    agents: List[str] = []
    observation_spaces: Dict[str, gym.Space] = {}
    action_spaces: Dict[str, gym.Space] = {}

    def get_observation_space(self, agent_id: str) -> gym.Space:
        """The observation space of ``agent_id``."""
        return self.observation_spaces[agent_id]

    def get_action_space(self, agent_id: str) -> gym.Space:
        """The action space of ``agent_id``."""
        return self.action_spaces[agent_id]

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None) -> Tuple[AgentDict, AgentDict]:
        """Start an episode; returns ``(obs, infos)`` of the agents that act first."""
        raise NotImplementedError(f"{type(self).__name__} must implement reset().")

    def step(self, action_dict: Mapping[str, Any]) -> Tuple[AgentDict, AgentDict, AgentDict, AgentDict, AgentDict]:
        """Apply each acting agent's action; returns ``(obs, rewards, terminateds, truncateds, infos)``."""
        raise NotImplementedError(f"{type(self).__name__} must implement step().")


def is_parallel_env(env: Any) -> bool:
    """Whether ``env`` looks like a ``pettingzoo.ParallelEnv``: judged by its methods and
    ``possible_agents``, so PettingZoo (an optional extra) is never imported for it, and wrappers
    around a ParallelEnv count too."""
    methods = ("observation_space", "action_space", "reset", "step")
    return (
        not isinstance(env, gym.Env)
        and hasattr(env, "possible_agents")
        and all(callable(getattr(env, name, None)) for name in methods)
    )


def is_multi_agent_env(env: Any) -> bool:
    """Whether ``env`` is a :class:`MultiAgentEnv` or a PettingZoo ``ParallelEnv``."""
    return isinstance(env, MultiAgentEnv) or is_parallel_env(env)


class ParallelEnvAdapter(MultiAgentEnv):
    """A PettingZoo ``ParallelEnv`` seen through :class:`MultiAgentEnv`'s protocol.

    ``"__all__"`` is added to ``terminateds`` / ``truncateds``: true once no agent is left (PettingZoo
    ends an episode by emptying ``env.agents``).
    """

    def __init__(self, env: Any):
        super().__init__()
        self.env = env
        self.possible_agents = list(env.possible_agents)
        self.observation_spaces = {a: env.observation_space(a) for a in self.possible_agents}
        self.action_spaces = {a: env.action_space(a) for a in self.possible_agents}

    @property
    def agents(self) -> List[str]:  # type: ignore[override]
        return list(self.env.agents)

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None):
        obs, infos = self.env.reset(seed=seed, options=options)
        return dict(obs), dict(infos or {})

    def step(self, action_dict):
        obs, rewards, terminateds, truncateds, infos = self.env.step(dict(action_dict))
        terminateds, truncateds = dict(terminateds), dict(truncateds)
        left = not self.env.agents
        terminateds[ALL_AGENTS] = left and bool(terminateds) and all(terminateds.values())
        truncateds[ALL_AGENTS] = left and not terminateds[ALL_AGENTS]
        return dict(obs), dict(rewards), terminateds, truncateds, dict(infos or {})

    def close(self) -> None:
        self.env.close()


def as_multi_agent_env(env: Any) -> MultiAgentEnv:
    """``env`` under the :class:`MultiAgentEnv` protocol (a ``ParallelEnv`` wrapped, a MultiAgentEnv as it is)."""
    if isinstance(env, MultiAgentEnv):
        return env
    if is_parallel_env(env):
        return ParallelEnvAdapter(env)
    raise ValueError(
        f"{type(env).__name__} is not a multi-agent environment: give a dlearner.MultiAgentEnv or a pettingzoo.ParallelEnv."
    )


def agent_spaces(env: MultiAgentEnv, agents: Optional[Iterable[str]] = None) -> Dict[str, Tuple[gym.Space, gym.Space]]:
    """``{agent_id: (observation space, action space)}`` of ``agents`` (default: every possible agent)."""
    agents = list(env.possible_agents if agents is None else agents)
    if not agents:
        raise ValueError(
            f"{type(env).__name__} names no agents: set possible_agents (every agent id that may act) in its __init__."
        )
    out = {}
    for agent in agents:
        try:
            out[agent] = (env.get_observation_space(agent), env.get_action_space(agent))
        except (KeyError, AttributeError) as err:
            raise ValueError(
                f"{type(env).__name__} has no observation or action space for agent {agent!r}: set "
                "observation_spaces and action_spaces ({agent_id: space}) for every agent in possible_agents."
            ) from err
    return out
