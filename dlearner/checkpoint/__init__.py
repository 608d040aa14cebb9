"""Checkpoints: Zarr v3 stores of arrays and JSON, committed atomically, never pickled.

The package is layered; each module only uses the ones above it:

* :mod:`~dlearner.checkpoint.limits`: the bounds that keep reading untrusted stores safe;
* :mod:`~dlearner.checkpoint.encoding`: the hand-written Zarr v3 encoder/decoder (node names,
  ``zarr.json`` documents, chunks, JSON documents), no I/O; JSON values follow :mod:`dlearner.jsonsafe`;
* :mod:`~dlearner.checkpoint.manifest`: a state tree's structure, JSON leaves and arrays, no I/O;
* :mod:`~dlearner.checkpoint.backends`: byte I/O for local directories and fsspec URLs;
* :mod:`~dlearner.checkpoint.layout`: the root group, version groups and the atomic commit;
* :mod:`~dlearner.checkpoint.store`: the public API (save and load a state tree) and where a
  path's store is (a store or a run folder);
* :mod:`~dlearner.checkpoint.inspect`: metadata and summaries without loading arrays;
* :mod:`~dlearner.checkpoint.modules`: a module's spec and weights in any checkpoint;
* :mod:`~dlearner.checkpoint.objects`: what learners, groups and algorithms store and how they
  are restored.

None of them imports dlearner's modules, learners or algorithms (they know them by the methods
they call): those build on this package, so building a module out of a checkpoint is the module
layer's (:meth:`dlearner.RLModule.from_checkpoint`). The format is documented in
``docs/checkpoint-format.md``.
"""

from __future__ import annotations

from dlearner.checkpoint.encoding import InvalidCheckpointError
from dlearner.checkpoint.inspect import format_inspection, inspect_checkpoint, read_metadata
from dlearner.checkpoint.modules import KIND_MODULE, check_module_specs, restore_module, save_module
from dlearner.checkpoint.objects import (
    KIND_ALGORITHM,
    KIND_LEARNER,
    KIND_LEARNER_GROUP,
    load_learner_group_state,
    load_learner_state,
    restore_algorithm,
    restore_learner,
    save_algorithm,
    save_learner,
    save_learner_group_state,
    save_learner_state,
)
from dlearner.checkpoint.store import (
    FORMAT_NAME,
    FORMAT_VERSION,
    RUN_STORE_DIRNAME,
    StateTree,
    load_state_tree,
    resolve_checkpoint_path,
    save_state_tree,
)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "KIND_ALGORITHM",
    "KIND_LEARNER",
    "KIND_LEARNER_GROUP",
    "KIND_MODULE",
    "RUN_STORE_DIRNAME",
    "InvalidCheckpointError",
    "StateTree",
    "check_module_specs",
    "format_inspection",
    "inspect_checkpoint",
    "load_learner_group_state",
    "load_learner_state",
    "load_state_tree",
    "read_metadata",
    "resolve_checkpoint_path",
    "restore_algorithm",
    "restore_learner",
    "restore_module",
    "save_algorithm",
    "save_learner",
    "save_learner_group_state",
    "save_learner_state",
    "save_module",
    "save_state_tree",
]
