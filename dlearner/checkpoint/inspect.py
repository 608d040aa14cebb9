"""What a checkpoint holds, without loading it: metadata, and a summary for ``dlearner inspect``.

Reads only the root group and the manifest of a store written by :mod:`dlearner.checkpoint.store`
(never array data), and renders the summary as text.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

from dlearner.checkpoint.layout import FORMAT_NAME, VERSIONS_GROUP, read_committed_root, read_manifest
from dlearner.checkpoint.manifest import ArrayLeaf
from dlearner.checkpoint.store import open_checkpoint

__all__ = ["format_inspection", "inspect_checkpoint", "read_metadata"]


def read_metadata(path: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Return the metadata of the committed checkpoint at ``path``, reading only the root group.

    ``path`` is a store or a run folder that holds one. Raises the same errors as
    :func:`~dlearner.checkpoint.load_state_tree` for missing, foreign, newer-format and
    uncommitted checkpoints (array data is not read, so its corruption is not detected here).
    """
    return read_committed_root(open_checkpoint(path, storage_options)).metadata


def inspect_checkpoint(path: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Summarise the checkpoint at ``path`` without reading array data (for ``dlearner inspect``).

    Returns a JSON-serialisable dict (apart from non-JSON leaves such as tuples, which are kept)::

        {"path": str,                          # the store (for a run folder: its checkpoint/)
         "format": "dlearner-checkpoint", "format_version": int,
         "version": str, "committed_at": str | None, "metadata": dict,
         "arrays": [{"name": "rl_module/default_policy/pi.0.weight",   # keys joined with "/"
                     "keys": [...], "node": "versions/<id>/...",        # the Zarr array's path
                     "shape": [..], "dtype": "float32", "nbytes": int}, ...],
         "values": [{"name": ..., "keys": [...], "value": <JSON leaf>}, ...],
         "num_arrays": int, "total_nbytes": int}

    Raises the same errors as :func:`read_metadata`, and ``ValueError`` for a corrupted manifest.
    """
    backend = open_checkpoint(path, storage_options)
    root = read_committed_root(backend)
    manifest = read_manifest(backend, root)
    arrays: list[dict[str, Any]] = []
    values: list[dict[str, Any]] = []
    for keys, leaf in manifest.leaves():
        name = "/".join(keys)
        if isinstance(leaf, ArrayLeaf):
            arrays.append(
                {
                    "name": name,
                    "keys": list(keys),
                    "node": f"{VERSIONS_GROUP}/{root.version}/{leaf.node}",
                    "shape": list(leaf.shape),
                    "dtype": str(leaf.dtype),
                    "nbytes": leaf.nbytes,
                }
            )
        else:
            values.append({"name": name, "keys": list(keys), "value": leaf})
    return {
        "path": backend.display,
        "format": FORMAT_NAME,
        "format_version": root.format_version,
        "version": root.version,
        "committed_at": root.committed_at,
        "metadata": root.metadata,
        "arrays": arrays,
        "values": values,
        "num_arrays": len(arrays),
        "total_nbytes": sum(a["nbytes"] for a in arrays),
    }


def format_inspection(summary: dict[str, Any]) -> str:
    """Render :func:`inspect_checkpoint`'s summary as human-readable multi-line text."""
    lines = [f"dlearner checkpoint {summary['path']}"]
    committed = f", committed {summary['committed_at']}" if summary.get("committed_at") else ""
    lines.append(f"  format {summary['format']} v{summary['format_version']}, version {summary['version']}{committed}")
    metadata = summary.get("metadata") or {}
    if metadata:
        lines.append("metadata:")
        lines.extend(_format_mapping(metadata, indent=1))
    arrays = summary.get("arrays", [])
    lines.append(f"arrays: {len(arrays)}, {_human_bytes(summary.get('total_nbytes', 0))} in total")
    if arrays:
        name_width = max(len(a["name"]) for a in arrays)
        dtype_width = max(len(a["dtype"]) for a in arrays)
        for a in arrays:
            dims = [str(d) for d in a["shape"]]
            shape = "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"
            lines.append(f"  {a['name']:<{name_width}}  {a['dtype']:<{dtype_width}}  {shape:<14} {_human_bytes(a['nbytes']):>10}")
    values = summary.get("values", [])
    if values:
        lines.append(f"values: {len(values)}")
        for v in values:
            lines.append(f"  {v['name']} = {_short_json(v['value'])}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Formatting helpers
# --------------------------------------------------------------------------------------------------


def _format_mapping(mapping: dict[str, Any], indent: int) -> list[str]:
    pad = "  " * indent
    lines: list[str] = []
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            lines.append(f"{pad}{key}:")
            lines.extend(_format_mapping(value, indent + 1))
        elif isinstance(value, str):
            lines.append(f"{pad}{key}: {value}")
        else:
            lines.append(f"{pad}{key}: {_short_json(value, limit=200)}")
    return lines


def _short_json(value: Any, limit: int = 100) -> str:
    if isinstance(value, (np.generic, tuple)) or not _is_plain_json(value):
        text = repr(value)
    else:
        text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_plain_json(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, str)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_is_plain_json(v) for v in value)
    if isinstance(value, dict):
        return all(_is_plain_json(v) for v in value.values())
    return False


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")
