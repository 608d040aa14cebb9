"""RL modules in checkpoints: a module's own checkpoint, and a module's spec and weights in any checkpoint.

Every dlearner checkpoint (module, learner, group, algorithm) holds the module specs (class path,
spaces, model config) in its metadata and the weights in its tree, so a module can be restored from,
or rebuilt out of, any of them. This module writes a module's checkpoint, finds a module's spec and
weights in a checkpoint, and checks stored specs against a target's. It knows modules only by what it
calls on them (:class:`CheckpointModule`): :mod:`dlearner.rl_module` builds on it, not the reverse.
A store is untrusted data, so everything read is checked before it is used.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from dlearner.checkpoint.store import load_state_tree, save_state_tree
from dlearner.columns import COMPONENT_LEARNER, COMPONENT_RL_MODULE, DEFAULT_MODULE_ID

__all__ = [
    "KIND_MODULE",
    "CheckpointModule",
    "JsonSpec",
    "MultiSpec",
    "StoredModule",
    "check_module_specs",
    "module_specs_json",
    "read_module",
    "restore_module",
    "save_module",
    "stored_module_specs",
]

KIND_MODULE = "RLModule"
"""``metadata["kind"]`` of a module's own checkpoint (its weights are at ``rl_module/<module_id>``)."""


class JsonSpec(Protocol):
    """What a checkpoint needs of a module spec (an :class:`~dlearner.rl_module.RLModuleSpec`)."""

    def to_json(self) -> dict[str, Any]:
        """The spec as JSON (class path, spaces, model config), as stored in ``module_specs``."""


class MultiSpec(Protocol):
    """What a checkpoint needs of a :class:`~dlearner.rl_module.MultiRLModuleSpec`."""

    rl_module_specs: Mapping[str, JsonSpec]


class CheckpointModule(Protocol):
    """What a checkpoint needs of a module (an :class:`~dlearner.rl_module.RLModule`)."""

    def get_state(self) -> dict[str, np.ndarray]:
        """The weights, ``{name: array}``."""

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Load the weights; ``ValueError`` if names or shapes differ."""

    def get_spec(self) -> JsonSpec:
        """The spec that rebuilds the module."""


# --------------------------------------------------------------------------------------- specs
def module_specs_json(spec: MultiSpec) -> dict[str, Any]:
    """``module_specs`` as checkpoints store it: each module's spec JSON by module id."""
    return {mid: s.to_json() for mid, s in spec.rl_module_specs.items()}


def stored_module_specs(metadata: Mapping[str, Any], path: Any) -> dict[str, dict[str, Any]]:
    """``metadata["module_specs"]``, checked to be a dict of spec dicts (a store is untrusted data)."""
    specs = metadata.get("module_specs")
    if not isinstance(specs, dict) or not all(isinstance(s, dict) for s in specs.values()):
        raise ValueError(f"Checkpoint {path} has no valid module_specs in its metadata; it is corrupted.")
    return specs


def check_module_specs(stored: Mapping[str, Any], current: MultiSpec, path: Any) -> None:
    """Raise ``ValueError`` saying how the stored modules differ from the target's."""
    _check_specs_json(stored, module_specs_json(current), path)


def _check_specs_json(stored: Mapping[str, Any], ours: Mapping[str, Any], path: Any) -> None:
    if not isinstance(stored, Mapping) or not all(isinstance(s, Mapping) for s in stored.values()):
        raise ValueError(f"Checkpoint {path} has no valid module_specs in its metadata; it is corrupted.")
    if set(stored) != set(ours):
        raise ValueError(f"Checkpoint {path} has modules {sorted(stored)} but the target has {sorted(ours)}.")
    for mid in stored:
        for field in ("observation_space", "action_space", "model_config", "module_class"):
            if stored[mid].get(field) != ours[mid].get(field):
                raise ValueError(
                    f"Module {mid!r} in checkpoint {path} differs in {field}: stored {stored[mid].get(field)!r}, "
                    f"target {ours[mid].get(field)!r}."
                )


# ------------------------------------------------------------------------------ writing, reading
def save_module(
    module: CheckpointModule,
    path: str | os.PathLike[str],
    *,
    storage_options: dict | None = None,
    module_id: str = DEFAULT_MODULE_ID,
) -> str:
    """Write one module's spec and weights."""
    tree = {COMPONENT_RL_MODULE: {module_id: module.get_state()}}
    metadata = {"kind": KIND_MODULE, "module_specs": {module_id: module.get_spec().to_json()}}
    return save_state_tree(path, tree, metadata=metadata, storage_options=storage_options)


@dataclass
class StoredModule:
    """One module of a loaded checkpoint: its id and stored spec JSON, and where its weights are."""

    module_id: str
    spec: dict[str, Any]  # the stored spec JSON (class path, spaces, model config), unchecked
    tree: dict[str, Any]
    metadata: dict[str, Any]
    path: Any  # for messages

    def weights(self) -> dict[str, np.ndarray]:
        """The module's weights, ``{name: array}``; ``ValueError`` if the checkpoint has none for it."""
        if self.metadata.get("kind") == KIND_MODULE:
            keys: tuple[str, ...] = (COMPONENT_RL_MODULE, self.module_id)
        else:
            keys = (COMPONENT_LEARNER, COMPONENT_RL_MODULE, self.module_id)
        node: Any = self.tree
        for key in keys:
            if not isinstance(node, dict) or key not in node:
                raise ValueError(f"Checkpoint {self.path} has no weights at {'/'.join(keys)!r}; it is corrupted.")
            node = node[key]
        if not isinstance(node, dict) or not all(isinstance(v, np.ndarray) for v in node.values()):
            raise ValueError(f"Checkpoint {self.path} has no weight arrays at {'/'.join(keys)!r}; it is corrupted.")
        return node


def read_module(
    path: str | os.PathLike[str], *, module_id: str | None = None, storage_options: dict | None = None
) -> StoredModule:
    """Load the checkpoint at ``path`` (of any kind) and find module ``module_id`` in it.

    With ``module_id=None`` the checkpoint must hold exactly one module. ``ValueError`` if it holds
    no such module or its metadata is malformed.
    """
    tree, metadata = load_state_tree(path, storage_options=storage_options)
    specs = stored_module_specs(metadata, path)
    if module_id is None:
        if len(specs) != 1:
            raise ValueError(f"Checkpoint {path} holds modules {sorted(specs)}; pass module_id= to pick one.")
        module_id = next(iter(specs))
    if module_id not in specs:
        raise ValueError(f"Checkpoint {path} has no module {module_id!r}; it has {sorted(specs)}.")
    return StoredModule(module_id, specs[module_id], tree, metadata, path)


def restore_module(
    module: CheckpointModule, path: str | os.PathLike[str], *, storage_options: dict | None = None, module_id: str | None = None
) -> None:
    """Load weights into an existing module (architecture must match)."""
    stored = read_module(path, module_id=module_id, storage_options=storage_options)
    _check_specs_json({stored.module_id: stored.spec}, {stored.module_id: module.get_spec().to_json()}, path)
    module.set_state(stored.weights())
