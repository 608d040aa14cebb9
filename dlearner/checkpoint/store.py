"""The checkpoint store: state trees as atomically committed Zarr v3 stores, on disk or via fsspec.

This module is the public face of the storage layer behind every ``save_to_path`` /
``restore_from_path`` in dlearner. It knows nothing about learners or modules: it writes a *state
tree* (nested ``dict`` with ``str`` keys whose leaves are numpy arrays or JSON values) plus a JSON
*metadata* dict to a path, and reads them back bit for bit. It checks input before anything is
written and decides where a path's store is (:func:`resolve_checkpoint_path`: a store, or a run
folder that keeps it in ``checkpoint/``). The work is done below it:

* :mod:`dlearner.checkpoint.manifest`: the tree's structure, checked before anything is written;
* :mod:`dlearner.checkpoint.encoding`: key names, ``zarr.json`` documents and chunks;
* :mod:`dlearner.checkpoint.layout`: versions, the commit protocol, and reading the committed version;
* :mod:`dlearner.checkpoint.backends`: moving bytes, for local directories and fsspec URLs.

The on-disk layout, the key encoding, the commit protocol and the versioning policy are documented
in ``docs/checkpoint-format.md``. No pickle is involved anywhere: arrays are raw little-endian bytes
(integer arrays over 1 MiB zstd-compressed), everything else is JSON.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

from dlearner.checkpoint.backends import Backend, open_backend
from dlearner.checkpoint.encoding import (
    ZARR_JSON,
    ArrayTemplate,
    InvalidCheckpointError,
    array_template,
    check_json_document,
)
from dlearner.checkpoint.layout import (
    ATTRS_KEY,
    FORMAT_NAME,
    FORMAT_VERSION,
    RUN_STORE_DIRNAME,
    VERSIONS_GROUP,
    CommittedRoot,
    commit_version,
    manifest_doc,
    read_arrays,
    read_committed_root,
    read_manifest,
    root_doc,
)
from dlearner.checkpoint.limits import MAX_JSON_DOCUMENT_BYTES
from dlearner.checkpoint.manifest import build_tree, plan_save, where_keys
from dlearner.jsonsafe import json_exact

__all__ = [
    "ATTRS_KEY",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "RUN_STORE_DIRNAME",
    "VERSIONS_GROUP",
    "Backend",
    "CommittedRoot",
    "InvalidCheckpointError",
    "StateTree",
    "load_state_tree",
    "open_checkpoint",
    "read_committed_root",
    "read_manifest",
    "resolve_checkpoint_path",
    "save_state_tree",
]

StateTree = dict
"""A nested ``dict`` with non-empty ``str`` keys. Leaves are ``np.ndarray`` (any shape, bool or
numeric dtype), numpy scalars, or JSON values (``None``, ``bool``, ``int`` of any size, ``float``
including nan/inf, ``str``, and ``list``/``tuple``/``dict`` of those)."""


def save_state_tree(
    path: str | os.PathLike[str],
    tree: StateTree,
    *,
    metadata: dict[str, Any],
    storage_options: dict[str, Any] | None = None,
) -> str:
    """Atomically write ``tree`` and ``metadata`` as a Zarr v3 checkpoint at ``path``.

    Args:
        path: A local directory (created if missing; an empty one is fine) or an fsspec URL such as
            ``memory://run1``, ``file:///tmp/run1`` or ``s3://bucket/run1``. A run folder (a
            directory without ``zarr.json`` whose ``checkpoint/`` subfolder is a store) means that
            store (see :func:`resolve_checkpoint_path`).
        tree: The state tree to store (see :data:`StateTree`). It is validated completely before
            anything is written, so a bad tree leaves ``path`` untouched.
        metadata: JSON metadata, e.g. ``{"kind": "Learner", "class": "...", "config": {...}}``,
            stored in the root group's attributes and returned by
            :func:`~dlearner.checkpoint.read_metadata`.
        storage_options: Passed to fsspec for URLs (credentials, endpoint, ...). Not allowed for
            local paths.

    Returns:
        ``path`` as a string, exactly as given.

    Raises:
        TypeError: ``tree`` or ``metadata`` holds something that cannot be stored (a torch tensor,
            an object array, a non-``str`` key, ...); the message names where.
        ValueError: a tree key is empty, or ``path`` holds something that is not a dlearner
            checkpoint or a checkpoint in a newer format (:class:`InvalidCheckpointError`; the path
            is left untouched).

    If the save fails or the process dies at any point, ``path`` still holds the previous checkpoint
    (or, for a first save, an uncommitted store that :func:`load_state_tree` refuses). Only one
    process may save to a given path at a time.
    """
    path_str = _fspath(path)
    if not isinstance(tree, dict):
        raise TypeError(f"tree must be a dict, got {type(tree).__name__}")
    if not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
    # Everything that can fail on bad input happens here, before the store is touched.
    manifest = plan_save(tree)
    encoded_metadata = json_exact(metadata, "metadata")
    templates: dict[tuple[int, str], ArrayTemplate] = {}
    for keys, leaf in manifest.arrays():
        if leaf.signature not in templates:
            try:
                templates[leaf.signature] = array_template(*leaf.signature)
            except TypeError as exc:
                raise TypeError(f"array at {where_keys(keys)}: {exc}") from exc
    # What readers refuse (see dlearner.checkpoint.limits) is refused here, before anything is written.
    version_doc = manifest_doc(manifest)
    _check_readable(version_doc, "the state tree's manifest")
    _check_readable(root_doc(uuid.uuid4().hex, encoded_metadata), "the metadata (root zarr.json)")
    # A run folder's store is updated in place; anything else is saved to exactly ``path``.
    backend = _locate(path_str, storage_options)
    commit_version(backend, manifest, version_doc, encoded_metadata, templates)
    return path_str


def _check_readable(doc: bytes, what: str) -> None:
    """Raise ``ValueError`` if readers would refuse ``doc`` (too large or too deeply nested)."""
    if len(doc) > MAX_JSON_DOCUMENT_BYTES:
        raise ValueError(
            f"cannot save: {what} would be {len(doc)} bytes of JSON, more than the {MAX_JSON_DOCUMENT_BYTES} "
            "readers accept (MAX_JSON_DOCUMENT_BYTES); store large data as numpy arrays in the tree"
        )
    try:
        check_json_document(doc, f"{what}")
    except InvalidCheckpointError as exc:
        raise ValueError(f"cannot save: {exc.args[0].split('; ')[0]}; readers would refuse it") from None


def load_state_tree(
    path: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None
) -> tuple[StateTree, dict[str, Any]]:
    """Read the committed checkpoint at ``path``.

    Returns:
        ``(tree, metadata)``: arrays come back with the same dtype, shape and bytes (writable,
        C-contiguous, owning their memory), numpy scalars as numpy scalars, JSON leaves equal to what
        was saved (tuples stay tuples, dict key order is kept).

    ``path`` is a store or a run folder that holds one (see :func:`resolve_checkpoint_path`).

    Raises:
        FileNotFoundError: nothing exists at ``path``.
        ValueError: (:class:`InvalidCheckpointError`) ``path`` is not a dlearner checkpoint, holds a
            save that was interrupted before it committed, uses a newer format version, or is
            corrupted (missing arrays, bad checksums, malformed metadata). The message says which
            and what to do.
    """
    backend = open_checkpoint(path, storage_options)
    root = read_committed_root(backend)
    manifest = read_manifest(backend, root)
    arrays = read_arrays(backend, root, manifest)
    return build_tree(manifest.root, arrays, ()), root.metadata


# --------------------------------------------------------------------------------------------------
# Where a path's store is
# --------------------------------------------------------------------------------------------------


def _fspath(path: str | os.PathLike[str]) -> str:
    path_str = os.fspath(path)
    if not isinstance(path_str, str):
        raise TypeError(f"path must be a str or os.PathLike[str], got {type(path).__name__}")
    if not path_str:
        raise ValueError("checkpoint path must not be empty")
    return path_str


def _join(path: str, name: str) -> str:
    """``path/name`` for a local path or a URL (fsspec URLs, chained ones included, end in the path)."""
    if "://" in path or "::" in path:
        return f"{path.rstrip('/')}/{name}"
    return os.path.join(path, name)


def _locate(path: str, storage_options: dict[str, Any] | None, *, new_run: bool = False) -> Backend:
    """The backend of the store that ``path`` names (see :func:`resolve_checkpoint_path`)."""
    backend = open_backend(path, storage_options)
    if backend.read(ZARR_JSON, MAX_JSON_DOCUMENT_BYTES) is not None:
        return backend  # a Zarr store: dlearner's or not, the caller's checks say
    inner = open_backend(_join(path, RUN_STORE_DIRNAME), storage_options)
    if inner.read(ZARR_JSON, MAX_JSON_DOCUMENT_BYTES) is not None or (new_run and backend.probe() in ("absent", "empty")):
        return inner
    return backend


def open_checkpoint(path: str | os.PathLike[str], storage_options: dict[str, Any] | None) -> Backend:
    """The backend of the store ``path`` names (the store or a run folder), for reading."""
    return _locate(_fspath(path), storage_options)


def resolve_checkpoint_path(
    path: str | os.PathLike[str],
    *,
    storage_options: dict[str, Any] | None = None,
    new_run: bool = False,
) -> str:
    """Where the checkpoint store of ``path`` is: ``path`` itself, or the store of a run folder.

    A run folder (what ``dlearner train --checkpoint DIR`` names) keeps its Zarr store in the
    subfolder :data:`RUN_STORE_DIRNAME` (``DIR/checkpoint``), with ``metrics.jsonl`` and
    ``learning_curve.png`` beside it. Every reader in :mod:`dlearner.checkpoint` (and so every
    ``restore_from_path``, ``dlearner evaluate`` and ``dlearner inspect``) accepts either.

    Args:
        path: A local path or an fsspec URL (``memory://run``, ``s3://bucket/run``, ...).
        storage_options: Passed to fsspec for URLs.
        new_run: Where a new run puts its store: with ``True``, a ``path`` that holds nothing yet
            (absent, or an empty directory) resolves to ``path/checkpoint``.

    Returns:
        ``path`` (as a string) if it holds a ``zarr.json``; ``path/checkpoint`` if that does;
        otherwise ``path`` unchanged (``path/checkpoint`` with ``new_run`` as described above), so
        that reading it raises ``FileNotFoundError`` or ``ValueError`` naming the path as given.
    """
    return _locate(_fspath(path), storage_options, new_run=new_run).display
