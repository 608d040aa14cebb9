"""What a LearnerGroup asks of its learners: one module-level function per operation.

Every operation is ``op(learner, *args)``. Module-level functions travel to Dask workers by
reference (never by value), and the same functions run on the one local Learner: both learner
pools (:mod:`dlearner.backends`) take these and nothing else, so a learner does the same thing
wherever it runs. Each learner runs the operations sent to it in the order they were sent.
"""

from __future__ import annotations

import collections
import threading
import weakref
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional

from dlearner import devices
from dlearner.errors import WeightsVersionGoneError

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


def update_from_fragment_refs(
    learner: "Learner",
    sources: Dict[str, str],
    pieces: Dict[str, Any],
    shard: Any,
    timesteps: Any,
    options: Dict[str, Any],
    keep_weights_version: Optional[int] = None,
) -> Dict[str, Dict[str, Any]]:
    """One update on this learner's shard, fetched here from the env runners' workers (IMPALA / APPO
    with remote learners: the driver sends only references). ``sources``: env-runner actor key ->
    worker address; ``pieces``: per module, the ``(runner key, fragment id, start, stop)`` row ranges
    that make the shard, in order. The learner validates the shard like any batch. Raises
    :class:`~dlearner.backends.dask.fragments.FragmentsLostError` before anything changes when a
    runner's fragments cannot be fetched. ``keep_weights_version``: then :func:`keep_weights` the
    weights after the update as that version (one request instead of an update and a keep)."""
    from dlearner.backends.dask.fragments import fetch_fragment_shard

    batch = fetch_fragment_shard(sources, pieces)
    return _update_prefetched(learner, batch, shard, timesteps, options, keep_weights_version)


async def _prefetch_fragment_refs(worker: Any, sources: Dict[str, str], pieces: Dict[str, Any], *rest: Any) -> tuple:
    from dlearner.backends.dask.fragments import fetch_fragment_shard_async

    return (await fetch_fragment_shard_async(worker, sources, pieces), *rest)


def _update_prefetched(
    learner: "Learner",
    batch: "MultiBatch",
    shard: Any,
    timesteps: Any,
    options: Dict[str, Any],
    keep_weights_version: Optional[int] = None,
) -> Dict[str, Dict[str, Any]]:
    result = learner.update(batch, timesteps, shard=shard, **options)
    if keep_weights_version is not None:
        keep_weights(learner, keep_weights_version)
    return result


# A learner actor fetches the fragments when the request arrives, while the update before it still
# trains (see LearnerActor.run), then runs the update on what it fetched.
update_from_fragment_refs.prefetch = (_prefetch_fragment_refs, _update_prefetched)  # type: ignore[attr-defined]


# ------------------------------------------------------------- weights kept for the env runners
#: How many weights versions a learner keeps for env runners to pull (``keep_weights``). A runner
#: pulls the version the driver named as soon as its request arrives, normally within milliseconds;
#: on a loaded machine 4 versions (~0.25 s of APPO updates on CartPole) were once not enough.
KEPT_WEIGHTS_VERSIONS = 8

# learner -> {version: weights}, oldest first. The compute thread adds (keep_weights), the worker's
# event loop reads (LearnerActor.kept_weights): hence the lock.
_kept_weights: "weakref.WeakKeyDictionary[Any, collections.OrderedDict]" = weakref.WeakKeyDictionary()
_kept_weights_lock = threading.Lock()


def keep_weights(learner: "Learner", version: int) -> None:
    """Keep the weights as they are now (after the update of the same request) as ``version``, for
    env runners to pull (IMPALA / APPO: the weights never pass through the driver). The
    :data:`KEPT_WEIGHTS_VERSIONS` newest versions are kept."""
    weights = learner.module.get_state()  # copies, never views
    with _kept_weights_lock:
        kept = _kept_weights.setdefault(learner, collections.OrderedDict())
        kept[int(version)] = weights
        while len(kept) > KEPT_WEIGHTS_VERSIONS:
            kept.popitem(last=False)


def kept_weights(learner: "Learner", version: int) -> Dict[str, Dict[str, "np.ndarray"]]:
    """The weights kept as ``version`` by :func:`keep_weights`; :class:`WeightsVersionGoneError` if
    this learner does not keep them. Cheap (a look-up): it runs on the worker's event loop."""
    with _kept_weights_lock:
        kept = _kept_weights.get(learner) if learner is not None else None
        weights = None if kept is None else kept.get(int(version))
        newest = sorted(kept) if kept else []
    if weights is None:
        raise WeightsVersionGoneError(f"This learner keeps no weights version {version} (it keeps versions {newest}).")
    return weights
