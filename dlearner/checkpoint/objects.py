"""What goes into a checkpoint for learners, learner groups and algorithms, on top of the store in
:mod:`dlearner.checkpoint.store`.

Every checkpoint holds the module specs (class paths, spaces, model config) in its metadata, so a
bare :class:`~dlearner.rl_module.RLModule` can be rebuilt from any of them for inference (modules
in checkpoints: :mod:`dlearner.checkpoint.modules`). Restoring checks the stored modules against the
target's before changing anything. Objects are known by what is called on them (``get_state``,
``config``, ``module_spec``, ...), so this layer imports none of their classes.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from dlearner.checkpoint.inspect import read_metadata
from dlearner.checkpoint.modules import MultiSpec, check_module_specs, module_specs_json, stored_module_specs
from dlearner.checkpoint.store import load_state_tree, save_state_tree
from dlearner.class_paths import class_path
from dlearner.columns import COMPONENT_LEARNER

KIND_LEARNER = "Learner"
KIND_LEARNER_GROUP = "LearnerGroup"
KIND_ALGORITHM = "Algorithm"
_LEARNER_KINDS = (KIND_LEARNER, KIND_LEARNER_GROUP, KIND_ALGORITHM)


# --------------------------------------------------------------------------------------- writing
def learner_metadata(kind: str, learner_class: type, config: Any, module_spec: MultiSpec) -> Dict[str, Any]:
    return {
        "kind": kind,
        "learner_class": class_path(learner_class),
        "config": config.to_dict() if config is not None else None,
        "module_specs": module_specs_json(module_spec),
    }


def save_learner(
    learner,
    path,
    *,
    storage_options: Optional[dict] = None,
    kind: str = KIND_LEARNER,
    extra_metadata: Optional[Mapping[str, Any]] = None,
) -> str:
    """Write a learner's full state (weights, optimizers, counters, generators, algorithm state).

    ``extra_metadata`` is merged over the standard metadata (an Algorithm stores its counters there).
    """
    return save_learner_state(
        learner.get_state(not_components=checkpoint_excluded_components(learner)),
        path,
        learner_class=type(learner),
        config=learner.config,
        module_spec=learner.module_spec,
        kind=kind,
        extra_metadata=extra_metadata,
        storage_options=storage_options,
    )


def checkpoint_excluded_components(learner) -> List[str]:
    """State paths a learner keeps out of its checkpoints (SAC's replay buffer unless
    ``store_buffer_in_checkpoints``); the learner says which through ``checkpoint_excluded_components()``."""
    excluded = getattr(learner, "checkpoint_excluded_components", None)
    return list(excluded()) if excluded is not None else []


def save_learner_state(
    state: Mapping[str, Any],
    path,
    *,
    learner_class: type,
    config: Any,
    module_spec: MultiSpec,
    kind: str = KIND_LEARNER,
    extra_tree: Optional[Mapping[str, Any]] = None,
    extra_metadata: Optional[Mapping[str, Any]] = None,
    storage_options: Optional[dict] = None,
) -> str:
    """Write a learner state that is already in this process (the driver's copy of rank 0's)."""
    tree = {COMPONENT_LEARNER: dict(state), **(extra_tree or {})}
    metadata = {**learner_metadata(kind, learner_class, config, module_spec), **(extra_metadata or {})}
    return save_state_tree(path, tree, metadata=metadata, storage_options=storage_options)


def save_learner_group_state(
    state: Mapping[str, Any],
    module_spec: MultiSpec,
    config: Any,
    path,
    *,
    storage_options: Optional[dict] = None,
    kind: str = KIND_LEARNER_GROUP,
    extra_metadata: Optional[Mapping[str, Any]] = None,
) -> str:
    """Write ``LearnerGroup.get_state()`` (``{COMPONENT_LEARNER: learner_state}``) from the driver."""
    return save_learner_state(
        state[COMPONENT_LEARNER],
        path,
        learner_class=config.get_learner_class(),
        config=config,
        module_spec=module_spec,
        kind=kind,
        extra_metadata=extra_metadata,
        storage_options=storage_options,
    )


# --------------------------------------------------------------------------------------- reading
def load_learner_state(path, *, storage_options: Optional[dict] = None) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """``(learner_state, metadata)`` from a Learner, LearnerGroup or Algorithm checkpoint."""
    tree, metadata = load_state_tree(path, storage_options=storage_options)
    if metadata.get("kind") not in _LEARNER_KINDS:
        raise ValueError(
            f"{path} is a dlearner {metadata.get('kind')!r} checkpoint, which holds no learner state; "
            f"a learner restores from one of {list(_LEARNER_KINDS)}."
        )
    stored_module_specs(metadata, path)
    state = tree.get(COMPONENT_LEARNER)
    if not isinstance(state, dict):
        raise ValueError(f"Checkpoint {path} has no {COMPONENT_LEARNER!r} state (found {sorted(tree)}); it is corrupted.")
    return state, metadata


def load_learner_group_state(path, *, storage_options: Optional[dict] = None) -> Dict[str, Any]:
    """``{COMPONENT_LEARNER: learner_state}`` for ``LearnerGroup.set_state``."""
    state, _ = load_learner_state(path, storage_options=storage_options)
    return {COMPONENT_LEARNER: state}


def restore_learner(learner, path, *, storage_options: Optional[dict] = None) -> None:
    """Restore a learner from any checkpoint holding learner state; nothing changes on error."""
    state, metadata = load_learner_state(path, storage_options=storage_options)
    check_module_specs(stored_module_specs(metadata, path), learner.module_spec, path)
    learner.set_state(state)


# -------------------------------------------------------------------------------------- algorithm
def save_algorithm(algo, path, *, storage_options: Optional[dict] = None) -> str:
    """The learner state plus the algorithm's counters and env-runner states, in one store.

    The learner state is written where the learners are (rank 0 writes straight to ``path`` when
    learners are remote); counters and env-runner states are small and travel as JSON metadata.
    """
    runners = [_json_runner_state(s) for s in algo.env_runner_group.get_state()]
    extra = {
        "kind": KIND_ALGORITHM,
        "algorithm_class": class_path(type(algo)),
        "counters": {k: v for k, v in algo.get_counters().items() if not k.startswith("recent_")},
        "algorithm_state": algo.get_counters(),
        "env_runners": runners,
    }
    return algo.learner_group.save_to_path(path, metadata=extra, storage_options=storage_options)


def restore_algorithm(algo, path, *, storage_options: Optional[dict] = None) -> None:
    """Restore learners, env runners and counters; checks the checkpoint before changing anything."""
    metadata = read_metadata(path, storage_options=storage_options)
    if metadata.get("kind") != KIND_ALGORITHM:
        raise ValueError(f"{path} is a dlearner {metadata.get('kind')!r} checkpoint, not an Algorithm checkpoint.")
    check_module_specs(stored_module_specs(metadata, path), algo.module_spec, path)
    if not isinstance(metadata.get("env_runners"), list) or not isinstance(metadata.get("algorithm_state"), dict):
        raise ValueError(f"Checkpoint {path} lacks env_runners or algorithm_state in its metadata; it is corrupted.")
    algo.learner_group.restore_from_path(path, storage_options=storage_options)
    # Runners pair up by index; with more runners than stored, the extra ones keep fresh generators.
    algo.env_runner_group.set_state(metadata["env_runners"])
    algo.set_counters(metadata["algorithm_state"])


def _json_runner_state(state: Mapping[str, Any]) -> Dict[str, Any]:
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in state.items()}
