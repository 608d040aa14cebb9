"""The classes the Dask env-runner group starts as actors: an env runner with a
:class:`~dlearner.backends.dask.fragments.FragmentStore`, so it keeps the fragments it samples for
the learners to fetch (IMPALA / APPO). The runners themselves know nothing about Dask."""

from __future__ import annotations

from dlearner.backends.dask.fragments import FragmentStore
from dlearner.env_runner import EnvRunner
from dlearner.multi_agent.env_runner import MultiAgentEnvRunner


class DaskEnvRunner(FragmentStore, EnvRunner):
    """An :class:`~dlearner.env_runner.EnvRunner` that keeps its fragments (a Dask actor)."""


class DaskMultiAgentEnvRunner(FragmentStore, MultiAgentEnvRunner):
    """A :class:`~dlearner.multi_agent.env_runner.MultiAgentEnvRunner` that keeps its fragments (a Dask actor)."""


_ACTOR_CLASSES = {EnvRunner: DaskEnvRunner, MultiAgentEnvRunner: DaskMultiAgentEnvRunner}


def runner_actor_class(runner_class: type) -> type:
    """The actor class for ``runner_class`` (``EnvRunner`` or ``MultiAgentEnvRunner``)."""
    try:
        return _ACTOR_CLASSES[runner_class]
    except KeyError:
        raise TypeError(
            f"The Dask env-runner group starts EnvRunner or MultiAgentEnvRunner actors, not {runner_class.__name__}."
        ) from None
