"""The layout of a checkpoint store, and the commit that makes a new version the checkpoint.

A store (``docs/checkpoint-format.md``, "Layout" and "Atomic commit protocol") is a Zarr v3 group:

* ``zarr.json`` at the root holds, in ``attributes["dlearner"]``, the format name and version, the
  user metadata and ``committed_version``, the id of the one complete version group. Rewriting this
  single small object is the commit.
* ``versions/<id>/`` is a version group: one Zarr group per dict of the tree, one Zarr array (one
  chunk) per numpy array, and the manifest (key order, JSON leaves, dtypes, shapes) in its attributes.

This module writes a version and commits it, and reads the committed root, its manifest and its
arrays, through any :class:`~dlearner.checkpoint.backends.Backend`. The bytes of each document and
chunk come from :mod:`dlearner.checkpoint.encoding`.
"""

from __future__ import annotations

import datetime
import itertools
import posixpath
import re
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr

from dlearner.checkpoint.backends import Backend
from dlearner.checkpoint.encoding import (
    CORRUPTED,
    ZARR_JSON,
    ArrayTemplate,
    InvalidCheckpointError,
    array_template,
    check_array_metadata,
    decode_chunk,
    decode_json,
    encode_chunk,
    group_doc,
    json_bytes,
    parse_json_document,
)
from dlearner.checkpoint.limits import MAX_ARRAY_METADATA_BYTES, MAX_JSON_DOCUMENT_BYTES, MAX_LISTED_ENTRIES
from dlearner.checkpoint.manifest import ArrayLeaf, Manifest, parse_manifest
from dlearner.validation import is_int

__all__ = [
    "ATTRS_KEY",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "RUN_STORE_DIRNAME",
    "VERSIONS_GROUP",
    "CommittedRoot",
    "commit_version",
    "manifest_doc",
    "read_arrays",
    "read_committed_root",
    "read_manifest",
    "root_doc",
]

FORMAT_NAME = "dlearner-checkpoint"
"""Value of ``attributes["dlearner"]["format"]`` in the root group of every checkpoint."""

FORMAT_VERSION = 1
"""The format version this module writes, and the newest one it reads."""

ATTRS_KEY = "dlearner"
"""Attribute key under which dlearner keeps its attributes in every group and array it writes."""

VERSIONS_GROUP = "versions"
"""The group below the root that holds the version groups."""

RUN_STORE_DIRNAME = "checkpoint"
"""The subfolder of a run folder (``dlearner train --checkpoint DIR``) that holds the store."""

_PASS_A_CHECKPOINT = (
    f"Pass a path written by save_to_path(), or a `dlearner train` run folder (its store is in {RUN_STORE_DIRNAME}/)."
)
_VERSION_ID = re.compile(r"[0-9a-f]{32}")
# Arrays whose files are fetched in one read_many call: remote stores fetch a batch concurrently, and
# a store with a missing or bad array is rejected after at most one batch.
_READ_BATCH_ARRAYS = 256


# --------------------------------------------------------------------------------------------------
# Reading the root and the manifest
# --------------------------------------------------------------------------------------------------


def _parse_json(raw: bytes, key: str, where: str, max_bytes: int = MAX_JSON_DOCUMENT_BYTES) -> Any:
    return parse_json_document(raw, f"{where!r}: {key}", max_bytes)


@dataclass
class _RootState:
    """What the root of a location holds."""

    kind: str  # "absent" | "empty" | "foreign" | "ours"
    reason: str = ""  # for "foreign": what was found
    attrs: dict[str, Any] = field(default_factory=dict)  # for "ours": attributes["dlearner"]


def _probe_root(backend: Backend) -> _RootState:
    """Classify a location without modifying it."""
    raw = backend.read(ZARR_JSON, MAX_JSON_DOCUMENT_BYTES)
    if raw is None:
        kind = backend.probe()
        if kind in ("absent", "empty"):
            return _RootState(kind)
        if kind == "file":
            return _RootState("foreign", "it is a file, not a directory")
        entries = sorted(itertools.islice(backend.list_dir(""), MAX_LISTED_ENTRIES))
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        return _RootState("foreign", f"it has no zarr.json but holds {shown}")
    doc = _parse_json(raw, ZARR_JSON, backend.display)
    if not (isinstance(doc, dict) and doc.get("zarr_format") == 3 and doc.get("node_type") == "group"):
        return _RootState("foreign", "its zarr.json is not a Zarr v3 group")
    attributes = doc.get("attributes")
    attrs = attributes.get(ATTRS_KEY) if isinstance(attributes, dict) else None
    if not isinstance(attrs, dict) or attrs.get("format") != FORMAT_NAME:
        return _RootState("foreign", f"it is a Zarr group without {FORMAT_NAME!r} attributes")
    version = attrs.get("format_version")
    if not is_int(version) or version < 1:
        raise InvalidCheckpointError(f"{backend.display!r}: invalid format_version {version!r} in zarr.json; {CORRUPTED}")
    return _RootState("ours", attrs=attrs)


@dataclass
class CommittedRoot:
    """What the root group of a committed checkpoint says."""

    format_version: int
    version: str
    committed_at: str | None
    metadata: dict[str, Any]


def read_committed_root(backend: Backend) -> CommittedRoot:
    """The root of the committed checkpoint, or the error that says why there is none."""
    where = backend.display
    state = _probe_root(backend)
    if state.kind == "absent":
        raise FileNotFoundError(f"no checkpoint at {where!r}: the path does not exist")
    if state.kind == "empty":
        raise InvalidCheckpointError(f"{where!r} is not a dlearner checkpoint: it is an empty directory. {_PASS_A_CHECKPOINT}")
    if state.kind == "foreign":
        raise InvalidCheckpointError(f"{where!r} is not a dlearner checkpoint: {state.reason}. {_PASS_A_CHECKPOINT}")
    attrs = state.attrs
    if attrs["format_version"] > FORMAT_VERSION:
        raise InvalidCheckpointError(
            f"{where!r} is a {FORMAT_NAME} in format version {attrs['format_version']}, but this "
            f"dlearner reads format versions up to {FORMAT_VERSION}. Upgrade dlearner to load it."
        )
    version = attrs.get("committed_version")
    if version is None:
        raise InvalidCheckpointError(
            f"incomplete checkpoint at {where!r}: a save was interrupted before it committed, so no "
            "complete checkpoint exists there. Save again to this path (that also removes the partial "
            "data) or restore from another checkpoint."
        )
    if not isinstance(version, str) or not _VERSION_ID.fullmatch(version):
        raise InvalidCheckpointError(f"{where!r}: invalid committed_version {version!r}; {CORRUPTED}")
    metadata = attrs.get("metadata")
    if not isinstance(metadata, dict):
        raise InvalidCheckpointError(f"{where!r}: metadata is missing from zarr.json; {CORRUPTED}")
    committed_at = attrs.get("committed_at")
    return CommittedRoot(
        format_version=attrs["format_version"],
        version=version,
        committed_at=committed_at if isinstance(committed_at, str) else None,
        metadata=decode_json(metadata, f"{where!r} metadata"),
    )


def read_manifest(backend: Backend, root: CommittedRoot) -> Manifest:
    """The manifest of the committed version."""
    where = backend.display
    key = f"{VERSIONS_GROUP}/{root.version}/{ZARR_JSON}"
    raw = backend.read(key, MAX_JSON_DOCUMENT_BYTES)
    if raw is None:
        raise InvalidCheckpointError(f"{where!r}: the committed version {root.version} is missing ({key} not found); {CORRUPTED}")
    doc = _parse_json(raw, key, where)
    attributes = doc.get("attributes") if isinstance(doc, dict) else None
    attrs = attributes.get(ATTRS_KEY) if isinstance(attributes, dict) else None
    if not isinstance(attrs, dict) or "tree" not in attrs:
        raise InvalidCheckpointError(f"{where!r}: {key} has no manifest; {CORRUPTED}")
    return parse_manifest(attrs["tree"], f"{where!r} {key}")


# --------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------


def _array_files(version_dir: str, leaf: ArrayLeaf, key: str, template: ArrayTemplate) -> list[tuple[str, list[Any]]]:
    """The files of one array: its zarr.json and, unless it has no elements, its single chunk."""
    node = f"{version_dir}/{leaf.node}"
    doc = template.doc_for(leaf.shape, {ATTRS_KEY: {"key": key}}, name=posixpath.basename(leaf.node))
    files = [(f"{node}/{ZARR_JSON}", [json_bytes(doc)])]
    if leaf.nbytes:
        assert leaf.array is not None
        files.append((f"{node}/{template.chunk_key}", encode_chunk(leaf.array, leaf.crc32c)))
    return files


def _version_files(
    version_dir: str, manifest: Manifest, templates: dict[tuple[int, str], ArrayTemplate]
) -> Iterator[tuple[str, list[Any]]]:
    # Lazily, so that an encoded chunk is alive only until it is written. Groups first: their
    # directories are the parents of what follows.
    yield f"{VERSIONS_GROUP}/{ZARR_JSON}", [group_doc({})]
    for keys, node in manifest.groups():
        yield f"{version_dir}/{node.node}/{ZARR_JSON}", [group_doc({ATTRS_KEY: {"key": keys[-1]}})]
    for keys, leaf in manifest.arrays():
        yield from _array_files(version_dir, leaf, keys[-1], templates[leaf.signature])


def manifest_doc(manifest: Manifest) -> bytes:
    """The ``zarr.json`` of a version group: the manifest in its attributes."""
    return group_doc({ATTRS_KEY: {"format_version": FORMAT_VERSION, "tree": manifest.root.to_json()}})


def root_doc(committed: str | None, metadata: Any) -> bytes:
    """The root ``zarr.json`` pointing at version ``committed`` (``None``: a claimed, uncommitted store).

    ``metadata`` is already in the exact JSON encoding.
    """
    attrs = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "committed_version": committed,
        "committed_at": datetime.datetime.now(datetime.timezone.utc).isoformat() if committed else None,
        "metadata": metadata,
        "written_with": {"zarr": zarr.__version__, "numpy": np.__version__},
    }
    # Indented: this is the file people open to see what a checkpoint is.
    return group_doc({ATTRS_KEY: attrs}, indent=2)


def commit_version(
    backend: Backend,
    manifest: Manifest,
    manifest_doc: bytes,
    metadata: Any,
    templates: dict[tuple[int, str], ArrayTemplate],
) -> None:
    """Write a new version group holding ``manifest``'s tree and commit it, then remove older versions.

    ``manifest_doc`` and ``metadata`` are what :func:`manifest_doc` and :func:`root_doc` take, already
    checked to be readable; ``templates`` has the array template of every signature in the manifest.
    Raises :class:`InvalidCheckpointError` (before writing anything) for a store that is not dlearner's
    or is in a newer format. Until the commit, readers see the previous checkpoint.
    """
    where = backend.display
    state = _probe_root(backend)
    if state.kind == "foreign":
        raise InvalidCheckpointError(
            f"refusing to save to {where!r}: it holds data that is not a dlearner checkpoint ({state.reason}). "
            "Choose a new or empty directory; nothing was changed."
        )
    if state.kind == "ours" and state.attrs["format_version"] > FORMAT_VERSION:
        raise InvalidCheckpointError(
            f"refusing to save to {where!r}: it holds a {FORMAT_NAME} in format version "
            f"{state.attrs['format_version']}, newer than the version {FORMAT_VERSION} this dlearner "
            "writes. Upgrade dlearner or choose another path; nothing was changed."
        )
    if state.kind in ("absent", "empty"):
        # Claim the location first: a first save that dies later leaves a store that readers
        # recognise as an uncommitted dlearner checkpoint and that the next save may clean up.
        backend.write_atomic(ZARR_JSON, root_doc(None, None))

    version_id = uuid.uuid4().hex
    version_dir = f"{VERSIONS_GROUP}/{version_id}"
    backend.write_many(_version_files(version_dir, manifest, templates))
    # The manifest goes last, so a version group that has one is complete on its own.
    backend.write_many([(f"{version_dir}/{ZARR_JSON}", [manifest_doc])])

    # The commit: one small object replaced atomically (a rename on local disks, a single PUT on
    # object stores). Before it readers see the previous checkpoint, after it the new one.
    backend.write_atomic(ZARR_JSON, root_doc(version_id, metadata))

    # Remove the previous version and leftovers of interrupted saves. The new checkpoint is already
    # committed, so a failure here only leaves garbage that the next save removes: warn, don't raise.
    for name in backend.list_dir(VERSIONS_GROUP):
        if _VERSION_ID.fullmatch(name) and name != version_id:
            try:
                backend.delete_tree(f"{VERSIONS_GROUP}/{name}")
            except OSError as exc:
                warnings.warn(
                    f"checkpoint saved to {where!r}, but removing the old version {name} failed ({exc}); "
                    "the next save to this path retries",
                    RuntimeWarning,
                    stacklevel=3,
                )


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def read_arrays(backend: Backend, root: CommittedRoot, manifest: Manifest) -> dict[str, np.ndarray | np.generic]:
    """Every array of the committed version, by node path, each checked against the manifest."""
    where = repr(backend.display)
    version_dir = f"{VERSIONS_GROUP}/{root.version}"
    leaves = [leaf for _, leaf in manifest.arrays()]
    templates: dict[tuple[int, str], ArrayTemplate] = {}
    for sig in manifest.signatures():
        try:
            templates[sig] = array_template(*sig)
        except TypeError as exc:
            raise InvalidCheckpointError(f"{where}: {exc}; {CORRUPTED}") from exc
    arrays: dict[str, np.ndarray | np.generic] = {}
    # Each array's zarr.json and chunk, a batch of arrays at a time: remote stores fetch a batch
    # concurrently, and the first missing or bad file ends the load. A chunk is read up to its exact
    # size (the manifest's shape x itemsize, plus its 4-byte checksum), never more.
    for start in range(0, len(leaves), _READ_BATCH_ARRAYS):
        batch = leaves[start : start + _READ_BATCH_ARRAYS]
        keys: list[tuple[str, int]] = []
        for leaf in batch:
            node = f"{version_dir}/{leaf.node}"
            keys.append((f"{node}/{ZARR_JSON}", MAX_ARRAY_METADATA_BYTES))
            if leaf.nbytes:  # arrays with a zero-length axis have no chunk
                keys.append((f"{node}/{templates[leaf.signature].chunk_key}", leaf.nbytes + 4))
        blobs = iter(backend.read_many(keys))
        for leaf in batch:
            node = f"{version_dir}/{leaf.node}"
            meta_raw = next(blobs)
            chunk = next(blobs) if leaf.nbytes else None
            data = _decode_array(backend, node, leaf, templates[leaf.signature], meta_raw=meta_raw, chunk=chunk, where=where)
            arrays[leaf.node] = data[()] if leaf.numpy_scalar else data
    return arrays


def _decode_array(
    backend: Backend,
    node: str,
    leaf: ArrayLeaf,
    template: ArrayTemplate,
    *,
    meta_raw: bytes | None,
    chunk: bytes | None,
    where: str,
) -> np.ndarray:
    if meta_raw is None:
        raise InvalidCheckpointError(f"{where}: array {node} is missing; {CORRUPTED}")
    meta_key = f"{node}/{ZARR_JSON}"
    meta = _parse_json(meta_raw, meta_key, backend.display, MAX_ARRAY_METADATA_BYTES)
    # Only dlearner's own encoding is read (see check_array_metadata): another one is refused, so
    # no chunk is ever decompressed or replaced by a fill value.
    check_array_metadata(meta, template.doc_for(leaf.shape), f"{where}: {meta_key}")
    if not leaf.nbytes:
        return np.empty(leaf.shape, dtype=leaf.dtype)
    if chunk is None:
        raise InvalidCheckpointError(f"{where}: the data of array {node} is missing; {CORRUPTED}")
    return decode_chunk(chunk, leaf.dtype, leaf.shape, leaf.crc32c, f"{where}: array {node}")
