"""What a LearnerGroup asks of its learners: one module-level function per operation.

Every operation is ``op(learner, *args)``. Module-level functions travel to Dask workers by
reference (never by value), and the same functions run on the one local Learner: both learner
pools (:mod:`dlearner.backends`) take these and nothing else, so a learner does the same thing
wherever it runs. Each learner runs the operations sent to it in the order they were sent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, Optional

from dlearner import devices

if TYPE_CHECKING:
    import numpy as np

    from dlearner.batch import MultiBatch
    from dlearner.learner import Learner
    from dlearner.rl_module import MultiRLModuleSpec


def update(
    learner: "Learner", batch: "MultiBatch", shard: Any, timesteps: Any, options: Dict[str, Any]
) -> Dict[str, Dict[str, Any]]:
    """One update on this learner's ``shard`` of the group's batch (``options``: epochs, minibatch size, shuffle)."""
    return learner.update(batch, timesteps, shard=shard, **options)


def get_state(learner: "Learner", components: Any = None, not_components: Any = None) -> Dict[str, Any]:
    """The learner's state (all of it, or the given ``components``)."""
    return learner.get_state(components, not_components=not_components)


def set_state(learner: "Learner", state: Dict[str, Any]) -> None:
    learner.set_state(state)


def get_weights(learner: "Learner", module_ids: Any, inference_only: bool = False) -> Dict[str, Dict[str, "np.ndarray"]]:
    return learner.module.get_state(module_ids, inference_only=inference_only)


def set_weights(learner: "Learner", weights: Dict[str, Any]) -> None:
    learner.module.set_state(weights)


def foreach(learner: "Learner", fn: Callable[..., Any], kwargs: Dict[str, Any]) -> Any:
    """The user's ``fn(learner, **kwargs)`` (``LearnerGroup.foreach_learner``)."""
    return fn(learner, **kwargs)


def add_module(learner: "Learner", module_id: str, module_spec: Any, config_overrides: Any) -> "MultiRLModuleSpec":
    return learner.add_module(module_id=module_id, module_spec=module_spec, config_overrides=config_overrides)


def remove_module(learner: "Learner", module_id: str) -> "MultiRLModuleSpec":
    return learner.remove_module(module_id)


def save(learner: "Learner", path: str, options: Dict[str, Any]) -> str:
    """Write the learner's checkpoint at ``path`` (``options``: kind, metadata, storage options); the path written."""
    from dlearner.checkpoint import objects

    return objects.save_learner(learner, path, **options)


def checkpoint_excluded_components(learner: "Learner") -> Any:
    """State paths the learner keeps out of checkpoints (see ``checkpoint.objects.checkpoint_excluded_components``)."""
    from dlearner.checkpoint import objects

    return objects.checkpoint_excluded_components(learner)


def update_from_replay_buffer(
    learner: Any, rows: Any, options: Dict[str, Any], rank: int, world: int
) -> Dict[str, Dict[str, Any]]:
    """Add new rows to the learner's replay buffer and train from it (see ``ReplayLearnerMixin``)."""
    return learner.update_from_replay_buffer(rows, rank=rank, world=world, **options)


def restore(learner: "Learner", path: str, storage_options: Optional[dict] = None) -> None:
    learner.restore_from_path(path, storage_options=storage_options)


def device_facts(learner: "Learner") -> Dict[str, Any]:
    """What the learner's device is (the group chooses NCCL or gloo from every learner's facts)."""
    return devices.device_facts(learner.device)
