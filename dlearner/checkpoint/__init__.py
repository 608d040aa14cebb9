"""Checkpoints: Zarr v3 stores of arrays and JSON, committed atomically, never pickled.

The package is layered; each module only uses the ones above it:

* :mod:`~dlearner.checkpoint.encoding`: the hand-written Zarr v3 encoder/decoder (manifest, JSON
  values, key names, array metadata and chunks), no I/O;
* :mod:`~dlearner.checkpoint.store`: local and fsspec I/O, the atomic commit protocol, versions,
  and where a path's store is (a store or a run folder);
* :mod:`~dlearner.checkpoint.inspect`: metadata and summaries without loading arrays;
* :mod:`~dlearner.checkpoint.objects`: what each dlearner object (module, learner, group,
  algorithm) stores and how it is restored.

The format is documented in ``docs/checkpoint-format.md``. The names of ``objects`` are imported on
first use (PEP 562), like those of :mod:`dlearner`: they pull in torch, and ``dlearner inspect`` and
the storage layer do not need it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from dlearner.checkpoint.encoding import InvalidCheckpointError
from dlearner.checkpoint.inspect import format_inspection, inspect_checkpoint, read_metadata
from dlearner.checkpoint.store import (
    FORMAT_NAME,
    FORMAT_VERSION,
    RUN_STORE_DIRNAME,
    StateTree,
    load_state_tree,
    resolve_checkpoint_path,
    save_state_tree,
)

#: Names of :mod:`dlearner.checkpoint.objects`, imported on first use.
_OBJECT_NAMES = frozenset(
    {
        "KIND_ALGORITHM",
        "KIND_LEARNER",
        "KIND_LEARNER_GROUP",
        "KIND_MODULE",
        "check_module_specs",
        "load_learner_group_state",
        "load_learner_state",
        "module_from_checkpoint",
        "restore_algorithm",
        "restore_learner",
        "restore_module",
        "save_algorithm",
        "save_learner",
        "save_learner_group_state",
        "save_learner_state",
        "save_module",
    }
)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "RUN_STORE_DIRNAME",
    "InvalidCheckpointError",
    "StateTree",
    "format_inspection",
    "inspect_checkpoint",
    "load_state_tree",
    "read_metadata",
    "resolve_checkpoint_path",
    "save_state_tree",
    *sorted(_OBJECT_NAMES),
]

if TYPE_CHECKING:
    from dlearner.checkpoint.objects import (  # noqa: F401
        KIND_ALGORITHM,
        KIND_LEARNER,
        KIND_LEARNER_GROUP,
        KIND_MODULE,
        check_module_specs,
        load_learner_group_state,
        load_learner_state,
        module_from_checkpoint,
        restore_algorithm,
        restore_learner,
        restore_module,
        save_algorithm,
        save_learner,
        save_learner_group_state,
        save_learner_state,
        save_module,
    )


def __getattr__(name: str) -> Any:
    if name in _OBJECT_NAMES:
        value = getattr(importlib.import_module("dlearner.checkpoint.objects"), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _OBJECT_NAMES)
