"""Multi-agent runs on the command line: ``--policies``, and how their returns and modules are shown.

A multi-agent environment comes as ``--env module:creator`` (``creator(env_config)`` returns a
``dlearner.MultiAgentEnv`` or a ``pettingzoo.ParallelEnv``). ``--policies`` picks which modules its
agents act with: ``shared`` (one module, ``default_policy``, for every agent) or ``per-agent`` (one
module per agent, named after it). The choice is stored in the checkpoint's config, so ``--resume``
needs no ``--policies``.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any, List, Mapping, Optional

from dlearner.cli.errors import UsageError

if TYPE_CHECKING:
    from dlearner.config import AlgorithmConfig

#: ``--policies`` values: the named mappings of ``AlgorithmConfig.multi_agent(policy_mapping_fn=...)``.
POLICIES_CHOICES = ("shared", "per-agent")
#: The mapping a multi-agent run gets without ``--policies``.
DEFAULT_POLICIES = "shared"
#: Modules named on one progress line; more are counted (``+3 more``) to keep the line short.


class MultiAgentSetup:
    """What a multi-agent run trains: its agents, its modules and the mapping between them."""

    def __init__(self, agents: List[str], modules: List[str], mapping: str):
        self.agents = agents
        self.modules = modules
        self.mapping = mapping

    def describe(self) -> str:
        """``2 agents, --policies per-agent: modules agent_0, agent_1`` (for the start-up line)."""
        agents = f"{len(self.agents)} agent{'s' if len(self.agents) != 1 else ''}"
        modules = f"module{'s' if len(self.modules) != 1 else ''} {', '.join(self.modules)}"
        return f"{agents}, --policies {self.mapping}: {modules}"


def apply_policies(config: "AlgorithmConfig", args: argparse.Namespace, env: Any) -> Optional[MultiAgentSetup]:
    """Check ``--policies`` against the run's environment ``env`` (made from ``config``) and set the
    mapping on ``config``; the setup of a multi-agent run, ``None`` for a single-agent one.

    For ``--resume`` (``config`` rebuilt from the checkpoint), the stored mapping stays: a
    ``--policies`` that names another one is refused, since the checkpoint's modules are fixed.
    Raises :class:`UsageError` naming ``--policies``.
    """
    from dlearner.multi_agent.env import agent_spaces, as_multi_agent_env, is_multi_agent_env

    if not is_multi_agent_env(env):
        if args.policies is not None:
            raise UsageError(
                f"argument --policies: {config.env!r} is a single-agent environment (a gymnasium.Env); --policies "
                "chooses the modules of a multi-agent env given as --env module:creator (a dlearner.MultiAgentEnv or "
                "a pettingzoo.ParallelEnv). Drop --policies."
            )
        return None
    if args.resume:
        mapping = _stored_mapping(config, args)
    else:
        mapping = args.policies or DEFAULT_POLICIES
        config.multi_agent(policy_mapping_fn=mapping)
    try:
        agents = list(agent_spaces(as_multi_agent_env(env)))
        # Agents with different spaces sharing one module are refused here, before any cluster starts.
        modules = list(config.get_multi_rl_module_spec(env=env).rl_module_specs)
    except ValueError as err:
        hint = " Pass --policies per-agent to give each agent its own module." if mapping == "shared" else ""
        raise UsageError(f"argument --policies: {err}{hint}") from err
    return MultiAgentSetup(agents, modules, mapping)


def _stored_mapping(config: "AlgorithmConfig", args: argparse.Namespace) -> str:
    """The checkpoint's mapping (``--resume``), as ``--policies`` names it; a different ``--policies`` is refused."""
    stored = config.policy_mapping_fn
    if stored is None and config.policies is None:
        stored = DEFAULT_POLICIES  # no .multi_agent(...): every agent shares one module, as with "shared"
    shown = stored if isinstance(stored, str) else "its own policies and mapping"
    if args.policies is not None and args.policies != stored:
        trained_with = f"--policies {stored}" if stored in POLICIES_CHOICES else f"the policy mapping {shown}"
        raise UsageError(
            f"argument --policies: the checkpoint {args.checkpoint!r} was trained with {trained_with}, whose modules it "
            f"holds; it cannot continue with --policies {args.policies}. Drop --policies, or start a new run in another "
            "--checkpoint directory."
        )
    return shown


# ----------------------------------------------------------------------------------- inspect
def inspect_lines(metadata: Mapping[str, Any]) -> List[str]:
    """For a multi-agent run's checkpoint: ``modules: agent_0, agent_1 (policy mapping: per-agent)``
    (its modules and how agents map to them); ``[]`` for other checkpoints."""
    config = metadata.get("config") if isinstance(metadata.get("config"), Mapping) else {}
    mapping, policies = config.get("policy_mapping_fn"), config.get("policies")
    if mapping is None and policies is None:
        return []  # a single-agent run (or a multi-agent one with the default: one shared module)
    modules = sorted(metadata.get("module_specs") or policies or {})
    shown = mapping if mapping is not None else "one module for every agent"
    return [f"modules: {', '.join(modules)} (policy mapping: {shown})"]
