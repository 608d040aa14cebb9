"""Classes named by import path (``package.module.QualName``), as specs, configs and checkpoints store them.

A checkpoint or a config file is data: importing a path it names runs that module's code. So
:func:`import_dlearner_class` imports only classes that dlearner ships or that the caller trusts.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable

__all__ = ["class_path", "import_class", "import_dlearner_class"]


def class_path(cls: type) -> str:
    """``module.QualName`` of a class, as stored in specs and checkpoints."""
    return f"{cls.__module__}.{cls.__qualname__}"


def import_class(path: str) -> type:
    """Import a class from its ``module.QualName`` path."""
    module_name, _, name = path.rpartition(".")
    if not module_name:
        raise ValueError(f"{path!r} is not an import path of the form 'package.module.ClassName'.")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"Cannot import module {module_name!r} for class {path!r}: {err}") from err
    for part in name.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ValueError(f"Module {module_name!r} has no class {name!r} (from {path!r}).")
    if not isinstance(obj, type):
        raise ValueError(f"{path!r} is not a class.")
    return obj


def import_dlearner_class(path: str, what: str, trusted: Iterable[type] = ()) -> type:
    """Import a class named in a checkpoint, but only one dlearner ships or the caller trusts.

    Importing an arbitrary module path would run code chosen by whoever wrote the file.
    """
    for cls in trusted:
        if class_path(cls) == path:
            return cls
    if not isinstance(path, str) or not path.startswith("dlearner."):
        raise ValueError(
            f"The checkpoint names the {what} class {path!r}, which dlearner does not ship; importing it would run "
            f"code chosen by the checkpoint. Pass trusted_classes=[{str(path).rpartition('.')[2]}] (or rebuild the "
            "config in Python) if you trust it."
        )
    return import_class(path)
