"""Agents to modules: the ``policies`` of ``.multi_agent(...)``, the mapping function, and the spaces
each module takes from the agents mapped to it.

An *agent* is an actor in the environment (``"agent_0"``); a *module* (RLlib's "policy") is a
network that learners train. ``policy_mapping_fn(agent_id, episode)`` says which module acts for an
agent in an episode; several agents may share a module (they must then have the same spaces).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import gymnasium as gym

from dlearner.columns import DEFAULT_MODULE_ID
from dlearner.rl_module import RLModuleSpec, validate_module_id

PolicyMappingFn = Callable[..., str]

#: ``--policies`` of the command line: how agents map to modules without Python code.
MAPPING_SHARED = "shared"
MAPPING_PER_AGENT = "per-agent"
MAPPINGS = (MAPPING_SHARED, MAPPING_PER_AGENT)


def default_policy_mapping_fn(agent_id: str, episode: Any = None, **kwargs: Any) -> str:
    """Every agent acts with the one shared module ``DEFAULT_MODULE_ID``."""
    return DEFAULT_MODULE_ID


def per_agent_policy_mapping_fn(agent_id: str, episode: Any = None, **kwargs: Any) -> str:
    """Each agent acts with its own module, whose id is the agent id."""
    return str(agent_id)


def normalize_policies(policies: Any) -> Dict[str, Optional[RLModuleSpec]]:
    """``{module_id: RLModuleSpec or None}`` from a set/list of ids or a dict (``ValueError`` otherwise)."""
    if isinstance(policies, Mapping):
        out = {}
        for module_id, spec in policies.items():
            validate_module_id(module_id)
            if spec is not None and not isinstance(spec, RLModuleSpec):
                raise ValueError(
                    f"policies[{module_id!r}] must be an RLModuleSpec or None, got {type(spec).__name__}; "
                    "give RLModuleSpec(...) or None for the default module built from the agents' spaces."
                )
            out[str(module_id)] = spec
    elif isinstance(policies, (set, frozenset, list, tuple)):
        out = {}
        for module_id in policies:
            validate_module_id(module_id)
            out[str(module_id)] = None
        out = dict(sorted(out.items()))  # a set has no order; module order should not depend on hashing
    else:
        raise ValueError(f"policies must be a set of module ids or a dict {{module_id: RLModuleSpec or None}}, got {policies!r}.")
    if not out:
        raise ValueError("policies is empty: name at least one module id, e.g. policies={'p0', 'p1'}.")
    return out


def modules_to_train(policies_to_train: Any, module_ids: Iterable[str], batch: Any = None) -> List[str]:
    """The modules of ``module_ids`` that ``policies_to_train`` (None, a list of ids, or ``fn(module_id, batch)``) trains."""
    if policies_to_train is None:
        return list(module_ids)
    if callable(policies_to_train):
        return [mid for mid in module_ids if policies_to_train(mid, batch)]
    allowed = set(policies_to_train)
    return [mid for mid in module_ids if mid in allowed]


def check_policies_to_train(policies_to_train: Any) -> Any:
    """``None``, a list of module ids or a callable (``ValueError`` otherwise); a list comes back as a list of str."""
    if policies_to_train is None or callable(policies_to_train):
        return policies_to_train
    if isinstance(policies_to_train, str) or not isinstance(policies_to_train, (list, tuple, set, frozenset)):
        raise ValueError(
            f"policies_to_train must be None (train every module), a list of module ids or fn(module_id, batch) -> bool, "
            f"got {policies_to_train!r}."
        )
    for module_id in policies_to_train:
        validate_module_id(module_id)
    return sorted(str(m) for m in policies_to_train)


def map_agent(mapping_fn: PolicyMappingFn, agent_id: str, episode: Any, module_ids: Iterable[str]) -> str:
    """The module ``mapping_fn`` picks for ``agent_id`` (``ValueError`` if it is not one of ``module_ids``)."""
    module_id = mapping_fn(agent_id, episode)
    known = list(module_ids)
    if module_id not in known:
        raise ValueError(
            f"policy_mapping_fn mapped agent {agent_id!r} to module {module_id!r}, which is not one of the "
            f"policies {sorted(known)}; add it to .multi_agent(policies=...) or change the mapping."
        )
    return module_id


def module_spaces(
    agents: Mapping[str, Tuple[gym.Space, gym.Space]],
    mapping_fn: PolicyMappingFn,
    policies: Mapping[str, Optional[RLModuleSpec]],
) -> Dict[str, Tuple[gym.Space, gym.Space]]:
    """Each module's ``(observation space, action space)``, taken from the agents mapped to it.

    The mapping is asked with ``episode=None``. Agents with different spaces mapped to one module
    raise ``ValueError`` naming both agents and their spaces. A module no agent maps to (a frozen
    league member, say) takes its spaces from its own spec, or from the agents when they all share
    one pair of spaces.
    """
    found: Dict[str, Tuple[str, Tuple[gym.Space, gym.Space]]] = {}
    for agent_id, spaces in agents.items():
        module_id = map_agent(mapping_fn, agent_id, None, policies)
        if module_id in found:
            other, other_spaces = found[module_id]
            for kind, mine, theirs in (("observation", spaces[0], other_spaces[0]), ("action", spaces[1], other_spaces[1])):
                if mine != theirs:
                    raise ValueError(
                        f"Agents {other!r} and {agent_id!r} both map to module {module_id!r} but have different "
                        f"{kind} spaces: {theirs} and {mine}. Map them to different modules "
                        "(.multi_agent(policies=..., policy_mapping_fn=...)), or give them the same spaces."
                    )
        else:
            found[module_id] = (agent_id, spaces)
    out = {mid: spaces for mid, (_, spaces) in found.items()}
    distinct = {(repr(o), repr(a)): (o, a) for o, a in agents.values()}
    for module_id, spec in policies.items():
        if module_id in out:
            continue
        if spec is not None and spec.observation_space is not None and spec.action_space is not None:
            out[module_id] = (spec.observation_space, spec.action_space)
        elif len(distinct) == 1:
            out[module_id] = next(iter(distinct.values()))
        else:
            raise ValueError(
                f"No agent maps to module {module_id!r} and the agents' spaces differ, so its spaces are unknown; "
                f"give policies[{module_id!r}] = RLModuleSpec(observation_space=..., action_space=...)."
            )
    return out


def resolve_mapping(
    policies: Optional[Mapping[str, Optional[RLModuleSpec]]],
    policy_mapping_fn: Any,
    possible_agents: Iterable[str],
) -> Tuple[Dict[str, Optional[RLModuleSpec]], PolicyMappingFn]:
    """The modules and the mapping function a config's ``.multi_agent(...)`` settings mean for an env's agents.

    * nothing set: one module ``DEFAULT_MODULE_ID`` that every agent shares;
    * ``"per-agent"`` (without ``policies``): one module per possible agent, named after it;
    * one module in ``policies`` and no mapping: every agent acts with it;
    * several modules need a ``policy_mapping_fn`` (``ValueError`` otherwise).
    """
    if policy_mapping_fn == MAPPING_PER_AGENT:
        mapping_fn: PolicyMappingFn = per_agent_policy_mapping_fn
        if policies is None:
            policies = {str(agent): None for agent in possible_agents}
    elif policy_mapping_fn == MAPPING_SHARED:
        mapping_fn = default_policy_mapping_fn
    elif policy_mapping_fn is None:
        if policies is None:
            policies = {DEFAULT_MODULE_ID: None}
        if len(policies) != 1:
            raise ValueError(
                f"policies names {len(policies)} modules {sorted(policies)} but no policy_mapping_fn says which agent "
                "acts with which; pass .multi_agent(policy_mapping_fn=lambda agent_id, episode, **kwargs: ...)."
            )
        only = next(iter(policies))
        mapping_fn = _constant_mapping(only)
    else:
        mapping_fn = policy_mapping_fn
    if policies is None:
        policies = {DEFAULT_MODULE_ID: None}
    return dict(policies), mapping_fn


def _constant_mapping(module_id: str) -> PolicyMappingFn:
    def mapping_fn(agent_id: str, episode: Any = None, **kwargs: Any) -> str:
        return module_id

    return mapping_fn
