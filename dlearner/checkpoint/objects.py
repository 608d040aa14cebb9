"""What goes into a checkpoint for each kind of object, on top of the store in :mod:`dlearner.checkpoint.store`.

Every checkpoint holds the module specs (class paths, spaces, model config) in its metadata, so a
bare :class:`~dlearner.rl_module.RLModule` can be rebuilt from any of them for inference. Restoring
checks the stored modules against the target's before changing anything, and only imports module
classes that dlearner ships or that the caller trusts: nothing in a store can make us run its code.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

import numpy as np

from dlearner.checkpoint.inspect import read_metadata
from dlearner.checkpoint.store import load_state_tree, save_state_tree
from dlearner.columns import COMPONENT_LEARNER, COMPONENT_RL_MODULE, DEFAULT_MODULE_ID
from dlearner.rl_module import MultiRLModuleSpec, RLModule, RLModuleSpec, class_path, import_dlearner_class

KIND_MODULE = "RLModule"
KIND_LEARNER = "Learner"
KIND_LEARNER_GROUP = "LearnerGroup"
KIND_ALGORITHM = "Algorithm"
_LEARNER_KINDS = (KIND_LEARNER, KIND_LEARNER_GROUP, KIND_ALGORITHM)


# --------------------------------------------------------------------------------------- writing
def module_specs_json(spec: MultiRLModuleSpec) -> Dict[str, Any]:
    return {mid: s.to_json() for mid, s in spec.rl_module_specs.items()}


def learner_metadata(kind: str, learner_class: type, config: Any, module_spec: MultiRLModuleSpec) -> Dict[str, Any]:
    return {
        "kind": kind,
        "learner_class": class_path(learner_class),
        "config": config.to_dict() if config is not None else None,
        "module_specs": module_specs_json(module_spec),
    }


def save_module(module: RLModule, path, *, storage_options: Optional[dict] = None, module_id: str = DEFAULT_MODULE_ID) -> str:
    """Write one module's spec and weights."""
    tree = {COMPONENT_RL_MODULE: {module_id: module.get_state()}}
    metadata = {"kind": KIND_MODULE, "module_specs": {module_id: module.get_spec().to_json()}}
    return save_state_tree(path, tree, metadata=metadata, storage_options=storage_options)


def save_learner(learner, path, *, storage_options: Optional[dict] = None, kind: str = KIND_LEARNER,
                 extra_metadata: Optional[Mapping[str, Any]] = None) -> str:
    """Write a learner's full state (weights, optimizers, counters, generators, algorithm state).

    ``extra_metadata`` is merged over the standard metadata (an Algorithm stores its counters there).
    """
    return save_learner_state(
        learner.get_state(), path, learner_class=type(learner), config=learner.config,
        module_spec=learner.module_spec, kind=kind, extra_metadata=extra_metadata, storage_options=storage_options,
    )


def save_learner_state(
    state: Mapping[str, Any], path, *, learner_class: type, config: Any, module_spec: MultiRLModuleSpec,
    kind: str = KIND_LEARNER, extra_tree: Optional[Mapping[str, Any]] = None,
    extra_metadata: Optional[Mapping[str, Any]] = None, storage_options: Optional[dict] = None,
) -> str:
    """Write a learner state that is already in this process (the driver's copy of rank 0's)."""
    tree = {COMPONENT_LEARNER: dict(state), **(extra_tree or {})}
    metadata = {**learner_metadata(kind, learner_class, config, module_spec), **(extra_metadata or {})}
    return save_state_tree(path, tree, metadata=metadata, storage_options=storage_options)


def save_learner_group_state(state: Mapping[str, Any], module_spec: MultiRLModuleSpec, config: Any, path,
                             *, storage_options: Optional[dict] = None, kind: str = KIND_LEARNER_GROUP,
                             extra_metadata: Optional[Mapping[str, Any]] = None) -> str:
    """Write ``LearnerGroup.get_state()`` (``{COMPONENT_LEARNER: learner_state}``) from the driver."""
    return save_learner_state(
        state[COMPONENT_LEARNER], path, learner_class=config.get_learner_class(), config=config,
        module_spec=module_spec, kind=kind, extra_metadata=extra_metadata, storage_options=storage_options,
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
    _stored_module_specs(metadata, path)
    state = tree.get(COMPONENT_LEARNER)
    if not isinstance(state, dict):
        raise ValueError(f"Checkpoint {path} has no {COMPONENT_LEARNER!r} state (found {sorted(tree)}); it is corrupted.")
    return state, metadata


def _stored_module_specs(metadata: Mapping[str, Any], path) -> Dict[str, Dict[str, Any]]:
    """``metadata["module_specs"]``, checked to be a dict of spec dicts (a store is untrusted data)."""
    specs = metadata.get("module_specs")
    if not isinstance(specs, dict) or not all(isinstance(s, dict) for s in specs.values()):
        raise ValueError(f"Checkpoint {path} has no valid module_specs in its metadata; it is corrupted.")
    return specs


def load_learner_group_state(path, *, storage_options: Optional[dict] = None) -> Dict[str, Any]:
    """``{COMPONENT_LEARNER: learner_state}`` for ``LearnerGroup.set_state``."""
    state, _ = load_learner_state(path, storage_options=storage_options)
    return {COMPONENT_LEARNER: state}


def check_module_specs(stored: Mapping[str, Any], current: MultiRLModuleSpec, path) -> None:
    """Raise ``ValueError`` saying how the stored modules differ from the target's."""
    ours = module_specs_json(current)
    if not isinstance(stored, Mapping) or not all(isinstance(s, Mapping) for s in stored.values()):
        raise ValueError(f"Checkpoint {path} has no valid module_specs in its metadata; it is corrupted.")
    if set(stored) != set(ours):
        raise ValueError(
            f"Checkpoint {path} has modules {sorted(stored)} but the target has {sorted(ours)}."
        )
    for mid in stored:
        for field in ("observation_space", "action_space", "model_config", "module_class"):
            if stored[mid].get(field) != ours[mid].get(field):
                raise ValueError(
                    f"Module {mid!r} in checkpoint {path} differs in {field}: stored {stored[mid].get(field)!r}, "
                    f"target {ours[mid].get(field)!r}."
                )


def restore_learner(learner, path, *, storage_options: Optional[dict] = None) -> None:
    """Restore a learner from any checkpoint holding learner state; nothing changes on error."""
    state, metadata = load_learner_state(path, storage_options=storage_options)
    check_module_specs(_stored_module_specs(metadata, path), learner.module_spec, path)
    learner.set_state(state)


# ---------------------------------------------------------------------------------------- modules
def module_from_checkpoint(path, *, module_id: str = DEFAULT_MODULE_ID, storage_options: Optional[dict] = None,
                           trusted_classes: Iterable[type] = ()) -> RLModule:
    """Rebuild one module with its weights from any dlearner checkpoint (module, learner, group, algorithm)."""
    tree, metadata = load_state_tree(path, storage_options=storage_options)
    specs = _stored_module_specs(metadata, path)
    if module_id not in specs:
        raise ValueError(f"Checkpoint {path} has no module {module_id!r}; it has {sorted(specs)}.")
    spec_json = specs[module_id]
    spec = RLModuleSpec.from_json(spec_json, module_class=import_dlearner_class(spec_json["module_class"], "module", trusted_classes))
    module = spec.build()
    module.set_state(_module_weights(tree, metadata, module_id, path))
    return module


def restore_module(module: RLModule, path, *, storage_options: Optional[dict] = None, module_id: Optional[str] = None) -> None:
    """Load weights into an existing module (architecture must match)."""
    tree, metadata = load_state_tree(path, storage_options=storage_options)
    specs = _stored_module_specs(metadata, path)
    if module_id is None:
        if len(specs) != 1:
            raise ValueError(f"Checkpoint {path} holds modules {sorted(specs)}; pass module_id= to pick one.")
        module_id = next(iter(specs))
    if module_id not in specs:
        raise ValueError(f"Checkpoint {path} has no module {module_id!r}; it has {sorted(specs)}.")
    check_module_specs({module_id: specs[module_id]}, MultiRLModuleSpec(rl_module_specs={module_id: module.get_spec()}), path)
    module.set_state(_module_weights(tree, metadata, module_id, path))


def _module_weights(tree: Mapping[str, Any], metadata: Mapping[str, Any], module_id: str, path) -> Dict[str, np.ndarray]:
    keys = (COMPONENT_RL_MODULE, module_id) if metadata.get("kind") == KIND_MODULE else (COMPONENT_LEARNER, COMPONENT_RL_MODULE, module_id)
    node: Any = tree
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            raise ValueError(f"Checkpoint {path} has no weights at {'/'.join(keys)!r}; it is corrupted.")
        node = node[key]
    if not isinstance(node, dict) or not all(isinstance(v, np.ndarray) for v in node.values()):
        raise ValueError(f"Checkpoint {path} has no weight arrays at {'/'.join(keys)!r}; it is corrupted.")
    return node


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
    check_module_specs(_stored_module_specs(metadata, path), algo.module_spec, path)
    if not isinstance(metadata.get("env_runners"), list) or not isinstance(metadata.get("algorithm_state"), dict):
        raise ValueError(f"Checkpoint {path} lacks env_runners or algorithm_state in its metadata; it is corrupted.")
    algo.learner_group.restore_from_path(path, storage_options=storage_options)
    # Runners pair up by index; with more runners than stored, the extra ones keep fresh generators.
    algo.env_runner_group.set_state(metadata["env_runners"])
    algo.set_counters(metadata["algorithm_state"])


def _json_runner_state(state: Mapping[str, Any]) -> Dict[str, Any]:
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in state.items()}


def checkpoint_metadata(path, *, storage_options: Optional[dict] = None) -> Dict[str, Any]:
    """The metadata of any dlearner checkpoint (kind, config, module specs, counters)."""
    return read_metadata(path, storage_options=storage_options)
