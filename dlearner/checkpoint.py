"""Checkpoint storage: nested state trees as atomically committed Zarr v3 stores.

This module is the storage layer behind every ``save_to_path`` / ``restore_from_path`` in dlearner.
It knows nothing about learners or modules: it writes a *state tree* (nested ``dict`` with ``str``
keys whose leaves are numpy arrays or JSON values) plus a JSON *metadata* dict to a path, and reads
them back bit for bit.

The on-disk layout, the key encoding, the commit protocol and the versioning policy are documented
in ``docs/checkpoint-format.md``. In short:

* ``<path>/zarr.json`` is a Zarr v3 group whose ``attributes["dlearner"]`` holds the format name,
  the format version, the user metadata and ``committed_version``, the id of the one complete
  version group. Rewriting this single small object is the commit.
* ``<path>/versions/<id>/`` is a version group: one Zarr group per dict of the tree, one Zarr array
  (one chunk, no compression, crc32c checksum) per numpy array, and a manifest (key order, JSON
  leaves, dtypes, shapes) in the version group's attributes.

No pickle is involved anywhere: arrays are raw little-endian bytes, everything else is JSON.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import math
import os
import posixpath
import re
import shutil
import uuid
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import fsspec
import google_crc32c  # a hard dependency of zarr 3 (its crc32c codec); the same checksum, computed here
import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec
from zarr.storage import FsspecStore, LocalStore

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "InvalidCheckpointError",
    "StateTree",
    "format_inspection",
    "inspect_checkpoint",
    "load_state_tree",
    "read_metadata",
    "save_state_tree",
]

StateTree = dict
"""A nested ``dict`` with non-empty ``str`` keys. Leaves are ``np.ndarray`` (any shape, bool or
numeric dtype), numpy scalars, or JSON values (``None``, ``bool``, ``int`` of any size, ``float``
including nan/inf, ``str``, and ``list``/``tuple``/``dict`` of those)."""

FORMAT_NAME = "dlearner-checkpoint"
"""Value of ``attributes["dlearner"]["format"]`` in the root group of every checkpoint."""

FORMAT_VERSION = 1
"""The format version this module writes, and the newest one it reads."""

ATTRS_KEY = "dlearner"
"""Attribute key under which dlearner keeps its attributes in every group and array it writes."""

VERSIONS_GROUP = "versions"

_ZARR_JSON = "zarr.json"
_VERSION_ID = re.compile(r"[0-9a-f]{32}")
# Temporary file of an atomic replace; debris of one (from a killed process) does not make a
# directory "not empty" nor "not a checkpoint".
_COMMIT_TMP = re.compile(r"\.zarr\.json\.[0-9a-f]{32}\.tmp")
# Output alphabet of _encode_key (see there); used to reject manifests that point outside the store.
_NODE_NAME = re.compile(r"[a-z0-9_.\-%~A-F]+")
_SAFE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_.-")
_MAX_NAME_CHARS = 200  # file systems limit one path component to 255 bytes
_TRUNCATED_PREFIX_CHARS = 150
_MAX_EXACT_JSON_INT = 2**53 - 1  # larger ints are stored as strings so non-Python readers stay exact
_ARRAY_KINDS = frozenset("biufc")  # bool, signed, unsigned, float, complex
_WRITE_BATCH_BYTES = 64 * 2**20
# fsspec protocols of flat key-value stores: writing one object replaces it atomically (readers see
# the old or the new bytes) and there are no directories to create.
_OBJECT_STORE_PROTOCOLS = frozenset({"memory", "s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl"})


_CORRUPTED = "the checkpoint is corrupted; restore from another checkpoint"


class InvalidCheckpointError(ValueError):
    """A path holds something that is not a complete, readable dlearner checkpoint.

    Subclass of ``ValueError`` so that callers can follow the API contract ("any bad checkpoint
    raises ``ValueError``") while tests and tools can tell these apart from other errors.
    """


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


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
            ``memory://run1``, ``file:///tmp/run1`` or ``s3://bucket/run1``.
        tree: The state tree to store (see :data:`StateTree`). It is validated completely before
            anything is written, so a bad tree leaves ``path`` untouched.
        metadata: JSON metadata, e.g. ``{"kind": "Learner", "class": "...", "config": {...}}``,
            stored in the root group's attributes and returned by :func:`read_metadata`.
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
    manifest = _plan_save(tree)
    encoded_metadata = _encode_json(metadata, "metadata")
    templates: dict[tuple[int, str], _ArrayTemplate] = {}
    for keys, leaf in manifest.arrays():
        if leaf.signature not in templates:
            try:
                templates[leaf.signature] = _array_template(*leaf.signature)
            except TypeError as exc:
                raise TypeError(f"array at {_where(keys)}: {exc}") from exc
    backend = _open_backend(path_str, storage_options)
    _save(backend, manifest, encoded_metadata, templates)
    return path_str


def load_state_tree(
    path: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None
) -> tuple[StateTree, dict[str, Any]]:
    """Read the committed checkpoint at ``path``.

    Returns:
        ``(tree, metadata)``: arrays come back with the same dtype, shape and bytes (writable,
        C-contiguous, owning their memory), numpy scalars as numpy scalars, JSON leaves equal to what
        was saved (tuples stay tuples, dict key order is kept).

    Raises:
        FileNotFoundError: nothing exists at ``path``.
        ValueError: (:class:`InvalidCheckpointError`) ``path`` is not a dlearner checkpoint, holds a
            save that was interrupted before it committed, uses a newer format version, or is
            corrupted (missing arrays, bad checksums, malformed metadata). The message says which
            and what to do.
    """
    backend = _open_backend(_fspath(path), storage_options)
    root = _read_committed_root(backend)
    manifest = _read_manifest(backend, root)
    arrays = _read_arrays(backend, root, manifest)
    return _build_tree(manifest.root, arrays, ()), root.metadata


def read_metadata(
    path: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Return the metadata of the committed checkpoint at ``path``, reading only the root group.

    Raises the same errors as :func:`load_state_tree` for missing, foreign, newer-format and
    uncommitted checkpoints (array data is not read, so its corruption is not detected here).
    """
    return _read_committed_root(_open_backend(_fspath(path), storage_options)).metadata


def inspect_checkpoint(
    path: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Summarise the checkpoint at ``path`` without reading array data (for ``dlearner inspect``).

    Returns a JSON-serialisable dict (apart from non-JSON leaves such as tuples, which are kept)::

        {"path": str, "format": "dlearner-checkpoint", "format_version": int,
         "version": str, "committed_at": str | None, "metadata": dict,
         "arrays": [{"name": "rl_module/default_policy/pi.0.weight",   # keys joined with "/"
                     "keys": [...], "node": "versions/<id>/...",        # the Zarr array's path
                     "shape": [..], "dtype": "float32", "nbytes": int}, ...],
         "values": [{"name": ..., "keys": [...], "value": <JSON leaf>}, ...],
         "num_arrays": int, "total_nbytes": int}

    Raises the same errors as :func:`read_metadata`, and ``ValueError`` for a corrupted manifest.
    """
    backend = _open_backend(_fspath(path), storage_options)
    root = _read_committed_root(backend)
    manifest = _read_manifest(backend, root)
    arrays: list[dict[str, Any]] = []
    values: list[dict[str, Any]] = []
    for keys, leaf in manifest.leaves():
        name = "/".join(keys)
        if isinstance(leaf, _ArrayLeaf):
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
    lines.append(
        f"  format {summary['format']} v{summary['format_version']}, "
        f"version {summary['version']}{committed}"
    )
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
            lines.append(
                f"  {a['name']:<{name_width}}  {a['dtype']:<{dtype_width}}  {shape:<14} "
                f"{_human_bytes(a['nbytes']):>10}"
            )
    values = summary.get("values", [])
    if values:
        lines.append(f"values: {len(values)}")
        for v in values:
            lines.append(f"  {v['name']} = {_short_json(v['value'])}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Backends: byte I/O for local directories (plain os calls) and fsspec URLs
# --------------------------------------------------------------------------------------------------
#
# The layout is a Zarr v3 store, but bytes are moved without zarr's store classes: zarr's async
# stores pay a thread hand-off per key, which made a 48-array save ~10x slower than the files
# themselves cost. Keys are zarr store keys ("versions/<id>/a/zarr.json"); a local directory maps
# them to files exactly as zarr's LocalStore does, and fsspec URLs through fsspec, as FsspecStore does.


class _Backend(Protocol):
    display: str  # the path as the caller gave it, for messages

    def probe(self) -> str:
        """'absent', 'empty', 'file' or 'nonempty' (a directory or prefix with entries)."""

    def read(self, key: str) -> bytes | None:
        """The bytes at ``key``, or None if there is no such key."""

    def read_many(self, keys: list[str]) -> list[bytes | None]:
        """Like :meth:`read` for several keys (concurrently where the file system supports it)."""

    def write_many(self, items: Iterable[tuple[str, list[Any]]]) -> None:
        """Write each ``(key, [bytes-like parts])``, creating directories; not atomic per key."""

    def write_atomic(self, key: str, data: bytes) -> None:
        """Replace ``key`` so that readers see either the old or the new bytes, never a mix."""

    def list_dir(self, key: str) -> list[str]:
        """Names directly below ``key`` (empty if it does not exist)."""

    def delete_tree(self, key: str) -> None:
        """Delete ``key`` and everything below it."""

    def zarr_store(self) -> Any:
        """A read-only zarr store on the same location (for arrays dlearner did not encode)."""


class _LocalBackend:
    def __init__(self, display: str, root: Path) -> None:
        self.display = display
        self.root = root

    def probe(self) -> str:
        if not self.root.exists():
            return "absent"
        if not self.root.is_dir():
            return "file"
        return "nonempty" if any(not _COMMIT_TMP.fullmatch(n) for n in os.listdir(self.root)) else "empty"

    def read(self, key: str) -> bytes | None:
        try:
            with open(self.root / key, "rb") as f:
                return f.read()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def read_many(self, keys: list[str]) -> list[bytes | None]:
        return [self.read(key) for key in keys]

    def write_many(self, items: Iterable[tuple[str, list[Any]]]) -> None:
        # Sequential on purpose: writing from a thread pool was measured slower (a 48-array save took
        # 16-22 ms instead of 8 ms on tmpfs, and was no faster on ext4, where inode creation
        # dominates), and consuming ``items`` lazily keeps one encoded chunk alive at a time.
        made: set[str] = set()
        for key, parts in items:
            path = os.path.join(self.root, key)
            parent = os.path.dirname(path)
            if parent not in made:
                os.makedirs(parent, exist_ok=True)
                made.add(parent)
            _write_file(path, parts)

    def write_atomic(self, key: str, data: bytes) -> None:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(_commit_tmp_name(path.name))
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)  # atomic on POSIX and Windows
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        # A process killed between writing and renaming leaves its temporary file behind.
        for name in os.listdir(path.parent):
            if _COMMIT_TMP.fullmatch(name) and name.startswith(f".{path.name}."):
                (path.parent / name).unlink(missing_ok=True)

    def list_dir(self, key: str) -> list[str]:
        try:
            return os.listdir(self.root / key)
        except (FileNotFoundError, NotADirectoryError):
            return []

    def delete_tree(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(self.root / key)

    def zarr_store(self) -> LocalStore:
        return LocalStore(self.root, read_only=True)


class _FsspecBackend:
    def __init__(self, display: str, url: str, storage_options: dict[str, Any]) -> None:
        self.display = display
        self.url = url
        self.storage_options = storage_options
        try:
            self.fs, self.root = fsspec.core.url_to_fs(url, **storage_options)
        except ImportError as exc:
            raise ValueError(f"cannot open {url!r}: the fsspec implementation for it is not installed ({exc})") from exc
        protocols = self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)
        self.object_store = any(p in _OBJECT_STORE_PROTOCOLS for p in protocols)
        self.memory = "memory" in protocols

    def _full(self, key: str) -> str:
        return f"{self.root.rstrip('/')}/{key}"

    def probe(self) -> str:
        if not self.fs.exists(self.root):
            return "absent"
        if not self.fs.isdir(self.root):
            return "file"
        names = [posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.root, detail=False)]
        return "nonempty" if any(not _COMMIT_TMP.fullmatch(n) for n in names) else "empty"

    def read(self, key: str) -> bytes | None:
        try:
            return self.fs.cat_file(self._full(key))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def read_many(self, keys: list[str]) -> list[bytes | None]:
        if not keys:
            return []
        # One call, so async file systems (s3, gcs, ...) fetch concurrently. cat_ranges, unlike
        # cat, returns results in order and never treats "[" or "*" in a path as a glob.
        found = self.fs.cat_ranges([self._full(key) for key in keys], None, None, on_error="return")
        out: list[bytes | None] = []
        for value in found:
            if isinstance(value, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
                out.append(None)
            elif isinstance(value, BaseException):
                raise value
            else:
                out.append(value)
        return out

    def write_many(self, items: Iterable[tuple[str, list[Any]]]) -> None:
        batch: dict[str, bytes] = {}
        size = 0
        made: set[str] = set()
        for key, parts in items:
            path = self._full(key)
            parent = posixpath.dirname(path)
            # Only file systems with directories need them made (and fsspec's memory file system
            # scans every key of the process on each makedirs).
            if not self.object_store and parent not in made:
                self.fs.makedirs(parent, exist_ok=True)
                made.add(parent)
            data = b"".join(bytes(p) if not isinstance(p, bytes) else p for p in parts)
            batch[path] = data
            size += len(data)
            if size >= _WRITE_BATCH_BYTES:
                self.fs.pipe(batch)
                batch, size = {}, 0
        if batch:
            self.fs.pipe(batch)

    def write_atomic(self, key: str, data: bytes) -> None:
        path = self._full(key)
        if self.object_store:
            self.fs.pipe_file(path, data)
            return
        # File systems with directories (sftp, hdfs, ...): write aside, then rename over.
        self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        tmp = f"{posixpath.dirname(path)}/{_commit_tmp_name(posixpath.basename(path))}"
        self.fs.pipe_file(tmp, data)
        self.fs.mv(tmp, path)

    def list_dir(self, key: str) -> list[str]:
        try:
            return [posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self._full(key), detail=False)]
        except FileNotFoundError:
            return []

    def delete_tree(self, key: str) -> None:
        path = self._full(key)
        if self.memory:
            # fsspec's MemoryFileSystem.rm(recursive=True) compares every path with every key in
            # the process; deleting the files found under the prefix one by one is O(1) each.
            for file in self.fs.find(path):
                self.fs.rm_file(file)
            return
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(path, recursive=True)

    def zarr_store(self) -> FsspecStore:
        return FsspecStore.from_url(self.url, storage_options=self.storage_options or None, read_only=True)


def _commit_tmp_name(name: str) -> str:
    return f".{name}.{uuid.uuid4().hex}.tmp"


def _write_file(path: str, parts: list[Any]) -> None:
    # os-level calls: a buffered file object per file cost more than the write itself.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), 0o666)
    try:
        for part in parts:
            view = memoryview(part).cast("B")
            while view:
                view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def _fspath(path: str | os.PathLike[str]) -> str:
    path_str = os.fspath(path)
    if not isinstance(path_str, str):
        raise TypeError(f"path must be a str or os.PathLike[str], got {type(path).__name__}")
    if not path_str:
        raise ValueError("checkpoint path must not be empty")
    return path_str


def _open_backend(path: str, storage_options: dict[str, Any] | None) -> _Backend:
    if path.startswith("file://"):
        local: str | None = path[len("file://") :]
    elif "://" in path or "::" in path:
        local = None
    else:
        local = path
    if local is None:
        return _FsspecBackend(path, path, dict(storage_options or {}))
    if storage_options:
        raise ValueError(
            f"storage_options={storage_options!r} were given for the local path {path!r}; "
            "they only apply to fsspec URLs such as s3://..."
        )
    return _LocalBackend(path, Path(local).expanduser().absolute())


# --------------------------------------------------------------------------------------------------
# JSON values: an exact, unambiguous encoding into plain JSON
# --------------------------------------------------------------------------------------------------
#
# Plain JSON cannot hold nan/inf, tuples, or (for non-Python readers) ints beyond 2**53, and it has
# nothing for numpy scalars. Such values become single-key "tag" objects whose key starts with "$".
# A dict that itself has a key starting with "$" is wrapped as {"$dict": [[k, v], ...]} so that no
# user dict is ever mistaken for a tag. Everything else is stored as is, so ordinary configs stay
# readable in zarr.json.


def _encode_json(value: Any, where: str) -> Any:
    # numpy scalars first: np.float64 subclasses float and np.bool_ is not bool.
    if isinstance(value, np.generic):
        if value.dtype.kind not in _ARRAY_KINDS:
            raise TypeError(f"numpy scalar of dtype {value.dtype} at {where} is not bool or numeric")
        return {"$numpy": [value.dtype.str, value.tobytes().hex()]}
    if value is None:
        return None
    # Subclasses (StrEnum, IntEnum members, ...) are stored as their plain value, as json.dumps does.
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        value = int(value)
        return value if abs(value) <= _MAX_EXACT_JSON_INT else {"$int": str(value)}
    if isinstance(value, float):
        value = float(value)
        if math.isfinite(value):
            return value
        return {"$float": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
    if isinstance(value, list):
        return [_encode_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return {"$tuple": [_encode_json(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, dict):
        for k in value:
            if not isinstance(k, str):
                raise TypeError(
                    f"dict key {k!r} ({type(k).__name__}) at {where}: JSON dict keys must be str; "
                    "convert the keys with str() before saving"
                )
        if any(k.startswith("$") for k in value):
            return {"$dict": [[k, _encode_json(v, f"{where}/{k}")] for k, v in value.items()]}
        return {k: _encode_json(v, f"{where}/{k}") for k, v in value.items()}
    if isinstance(value, np.ndarray):
        raise TypeError(
            f"numpy array at {where}: arrays are only supported as dict values, not inside lists, "
            "tuples or metadata; put them in a dict with str keys"
        )
    raise TypeError(_unsupported_type_message(value, where))


def _decode_json(value: Any, where: str) -> Any:
    if isinstance(value, list):
        return [_decode_json(v, where) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        ((tag, payload),) = value.items()
        if tag.startswith("$"):
            return _decode_tag(tag, payload, where)
    elif any(k.startswith("$") for k in value):
        raise InvalidCheckpointError(f"{where}: malformed JSON value (unknown tagged object {value!r})")
    return {k: _decode_json(v, where) for k, v in value.items()}


def _decode_tag(tag: str, payload: Any, where: str) -> Any:
    try:
        if tag == "$int":
            return int(payload)
        if tag == "$float":
            if payload not in ("nan", "inf", "-inf"):
                raise ValueError(payload)
            return float(payload)
        if tag == "$tuple":
            if not isinstance(payload, list):
                raise ValueError(payload)
            return tuple(_decode_json(v, where) for v in payload)
        if tag == "$dict":
            out = {}
            for k, v in payload:
                if not isinstance(k, str):
                    raise ValueError(f"key {k!r}")
                out[k] = _decode_json(v, where)
            return out
        if tag == "$numpy":
            dtype_str, hex_bytes = payload
            dtype = np.dtype(dtype_str)
            if dtype.kind not in _ARRAY_KINDS:
                raise ValueError(dtype_str)
            return np.frombuffer(bytes.fromhex(hex_bytes), dtype=dtype)[0]
    except (ValueError, TypeError, IndexError) as exc:
        raise InvalidCheckpointError(
            f"{where}: malformed tagged JSON value {{{tag!r}: {payload!r}}} ({exc}); "
            f"{_CORRUPTED}"
        ) from exc
    raise InvalidCheckpointError(f"{where}: unknown tagged JSON value {tag!r}; {_CORRUPTED}")


def _unsupported_type_message(value: Any, where: str) -> str:
    module = type(value).__module__
    if module.startswith("torch"):
        hint = "convert tensors to numpy first, e.g. tensor.detach().cpu().numpy()"
    else:
        hint = "state trees hold dicts, numpy arrays, numpy scalars and JSON values only"
    return f"cannot store {type(value).__module__}.{type(value).__qualname__} at {where}: {hint}"


# --------------------------------------------------------------------------------------------------
# Tree keys -> Zarr node names
# --------------------------------------------------------------------------------------------------


def _encode_key(key: str) -> str:
    """Encode a tree key as a Zarr node name that is safe on every store.

    Lower-case ASCII letters, digits, ``_``, ``.`` and ``-`` are kept; every other character
    (including upper-case letters, ``/`` and ``%``) becomes ``%XX`` per UTF-8 byte with upper-case
    hex digits. The result is injective and stays unique on case-insensitive file systems (literal
    letters are always lower case, escape digits always upper case). Then: a leading ``__`` (reserved
    by Zarr) gets its first ``_`` escaped, ``.``/``..``/``zarr.json`` get their dots escaped, and a
    name longer than 200 characters is cut to 150 and suffixed with ``~`` and 16 hex digits of the
    key's SHA-256 (``~`` never appears otherwise). The original key is kept in the manifest and in
    the node's attributes, so names are never decoded.
    """
    parts: list[str] = []
    for ch in key:
        if ch in _SAFE_CHARS:
            parts.append(ch)
        else:
            parts.extend(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass"))
    name = "".join(parts)
    if name.startswith("__"):
        name = "%5F" + name[1:]
    if name in (".", "..", "zarr.json"):
        name = name.replace(".", "%2E")
    if len(name) > _MAX_NAME_CHARS:
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:16]
        name = f"{name[:_TRUNCATED_PREFIX_CHARS]}~{digest}"
    return name


# --------------------------------------------------------------------------------------------------
# The manifest: the tree's structure, JSON leaves, and where each array lives
# --------------------------------------------------------------------------------------------------


@dataclass
class _ArrayLeaf:
    node: str  # Zarr path of the array, relative to the version group
    dtype: np.dtype[Any]  # exact dtype to restore (byte order included)
    shape: tuple[int, ...]
    numpy_scalar: bool  # restore as a numpy scalar rather than a 0-d array
    array: np.ndarray | None = None  # the data, when saving

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def signature(self) -> tuple[int, str]:
        # Data is always stored little-endian; big-endian input is swapped on write and back on read.
        return len(self.shape), self.dtype.newbyteorder("<").str

    def to_json(self) -> dict[str, Any]:
        if self.numpy_scalar:
            return {"type": "numpy_scalar", "node": self.node, "dtype": self.dtype.str}
        return {"type": "array", "node": self.node, "dtype": self.dtype.str, "shape": list(self.shape)}


@dataclass
class _DictNode:
    node: str  # Zarr path of the group, relative to the version group ("" for the version group)
    items: list[tuple[str, _DictNode | _ArrayLeaf | _JsonLeaf]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"type": "dict", "node": self.node, "items": [[k, v.to_json()] for k, v in self.items]}

    def walk(self, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
        """Yield ``(keys, node)`` for every node below this one, depth first, in key order."""
        for key, child in self.items:
            keys = (*prefix, key)
            yield keys, child
            if isinstance(child, _DictNode):
                yield from child.walk(keys)


@dataclass
class _JsonLeaf:
    encoded: Any  # already in the tagged JSON encoding

    def to_json(self) -> dict[str, Any]:
        return {"type": "json", "value": self.encoded}


@dataclass
class _Manifest:
    root: _DictNode

    def groups(self) -> Iterator[tuple[tuple[str, ...], _DictNode]]:
        for keys, node in self.root.walk():
            if isinstance(node, _DictNode):
                yield keys, node

    def arrays(self) -> Iterator[tuple[tuple[str, ...], _ArrayLeaf]]:
        for keys, node in self.root.walk():
            if isinstance(node, _ArrayLeaf):
                yield keys, node

    def leaves(self) -> Iterator[tuple[tuple[str, ...], _ArrayLeaf | Any]]:
        """Arrays as :class:`_ArrayLeaf`, JSON leaves decoded, in tree order."""
        for keys, node in self.root.walk():
            if isinstance(node, _ArrayLeaf):
                yield keys, node
            elif isinstance(node, _JsonLeaf):
                yield keys, _decode_json(node.encoded, "/".join(keys))

    def signatures(self) -> set[tuple[int, str]]:
        return {leaf.signature for _, leaf in self.arrays()}


def _plan_save(tree: dict[str, Any]) -> _Manifest:
    """Validate ``tree`` and lay it out; raises before anything is written."""
    return _Manifest(_plan_dict(tree, node="", where=()))


def _plan_dict(tree: dict[str, Any], node: str, where: tuple[str, ...]) -> _DictNode:
    result = _DictNode(node)
    used_names: dict[str, str] = {}
    for key, value in tree.items():
        if not isinstance(key, str):
            raise TypeError(
                f"tree key {key!r} ({type(key).__name__}) at {_where(where)}: keys must be str; "
                "convert them with str() before saving"
            )
        if not key:
            raise ValueError(f"empty tree key at {_where(where)}: keys must be non-empty strings")
        keys = (*where, key)
        child_where = _where(keys)
        if isinstance(value, dict):
            child: _DictNode | _ArrayLeaf | _JsonLeaf = _plan_dict(
                value, _child_node(node, key, used_names, child_where), keys
            )
        elif isinstance(value, np.ndarray):
            if type(value) is not np.ndarray:
                raise TypeError(
                    f"{type(value).__qualname__} at {child_where}: only plain numpy arrays can be "
                    "stored; convert with np.asarray() if dropping the subclass is intended"
                )
            _check_array_dtype(value.dtype, child_where)
            child = _ArrayLeaf(
                node=_child_node(node, key, used_names, child_where),
                dtype=value.dtype,
                shape=tuple(int(d) for d in value.shape),
                numpy_scalar=False,
                array=value,
            )
        elif isinstance(value, np.generic):
            _check_array_dtype(value.dtype, child_where)
            child = _ArrayLeaf(
                node=_child_node(node, key, used_names, child_where),
                dtype=value.dtype,
                shape=(),
                numpy_scalar=True,
                array=np.asarray(value),
            )
        else:
            child = _JsonLeaf(_encode_json(value, child_where))
        result.items.append((key, child))
    return result


def _child_node(parent: str, key: str, used: dict[str, str], where: str) -> str:
    name = _encode_key(key)
    if name in used:  # only possible through a SHA-256 prefix collision of two very long keys
        raise ValueError(f"keys {used[name]!r} and {key!r} at {where} map to the same node name {name!r}")
    used[name] = key
    return f"{parent}/{name}" if parent else name


def _check_array_dtype(dtype: np.dtype[Any], where: str) -> None:
    if dtype.kind not in _ARRAY_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise TypeError(
            f"array of dtype {dtype} at {where}: only bool and numeric (int, uint, float, complex) "
            "arrays can be stored"
        )


def _where(keys: tuple[str, ...]) -> str:
    return repr("/".join(keys)) if keys else "the tree root"


def _parse_manifest(doc: Any, where: str) -> _Manifest:
    """Turn the manifest JSON of a version group back into nodes, validating as we go."""

    def bad(msg: str) -> InvalidCheckpointError:
        return InvalidCheckpointError(f"{where}: malformed manifest ({msg}); {_CORRUPTED}")

    def node_path(raw: Any, *, root: bool = False) -> str:
        if root and raw == "":
            return ""
        if not isinstance(raw, str) or not all(
            _NODE_NAME.fullmatch(part) and part not in (".", "..") for part in raw.split("/")
        ):
            raise bad(f"invalid node path {raw!r}")
        return raw

    def parse(obj: Any, *, root: bool = False) -> _DictNode | _ArrayLeaf | _JsonLeaf:
        if not isinstance(obj, dict) or "type" not in obj:
            raise bad(f"expected a node object, got {obj!r:.80}")
        kind = obj["type"]
        if kind == "dict":
            items = obj.get("items")
            if not isinstance(items, list):
                raise bad("dict node without an items list")
            node = _DictNode(node_path(obj.get("node"), root=root))
            for item in items:
                if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str) and item[0]):
                    raise bad(f"invalid dict item {item!r:.80}")
                node.items.append((item[0], parse(item[1])))
            return node
        if kind in ("array", "numpy_scalar"):
            try:
                dtype = np.dtype(obj["dtype"])
                shape = () if kind == "numpy_scalar" else tuple(obj["shape"])
            except (KeyError, TypeError) as exc:
                raise bad(f"array node {obj!r:.80}: {exc}") from exc
            if dtype.kind not in _ARRAY_KINDS or not all(isinstance(d, int) and d >= 0 for d in shape):
                raise bad(f"array node with dtype {dtype} and shape {shape}")
            return _ArrayLeaf(node_path(obj.get("node")), dtype, shape, kind == "numpy_scalar")
        if kind == "json":
            if "value" not in obj:
                raise bad("json node without a value")
            return _JsonLeaf(obj["value"])
        raise bad(f"unknown node type {kind!r}")

    root_node = parse(doc, root=True)
    if not isinstance(root_node, _DictNode):
        raise bad("the tree root is not a dict node")
    return _Manifest(root_node)


def _build_tree(node: _DictNode, arrays: dict[str, np.ndarray | np.generic], where: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, child in node.items:
        keys = (*where, key)
        if isinstance(child, _DictNode):
            out[key] = _build_tree(child, arrays, keys)
        elif isinstance(child, _ArrayLeaf):
            out[key] = arrays[child.node]
        else:
            out[key] = _decode_json(child.encoded, _where(keys))
    return out


# --------------------------------------------------------------------------------------------------
# Zarr metadata documents and chunk encoding
# --------------------------------------------------------------------------------------------------
#
# Creating each array through zarr's array API costs about 0.7 ms of Python per array, far more than
# a whole torch.save of a small model. So zarr is asked once per (ndim, dtype) for a template
# zarr.json and for the encoding of a sample, and dlearner writes every array's zarr.json (the
# template with the real shape) and its single chunk itself. The chunk encoding is the one fixed by
# the template's codecs ("bytes" little-endian, then "crc32c"); _array_template checks that our
# encoding of the sample is byte-identical to zarr's, so a zarr release that encodes differently
# fails loudly instead of producing stores that zarr reads differently.


@dataclass(frozen=True)
class _ArrayTemplate:
    doc: dict[str, Any]  # zarr.json for the sample shape, without "attributes"
    chunk_key: str  # key of the single chunk relative to the array node

    def doc_for(self, shape: tuple[int, ...], attributes: dict[str, Any] | None = None) -> dict[str, Any]:
        doc = dict(self.doc)
        doc["shape"] = list(shape)
        # Zarr requires chunk edges >= 1; an array with a zero-length axis has no chunks at all.
        doc["chunk_grid"] = {"name": "regular", "configuration": {"chunk_shape": [max(d, 1) for d in shape]}}
        if attributes is not None:
            doc["attributes"] = attributes
        return doc


@lru_cache(maxsize=256)
def _array_template(ndim: int, dtype_str: str) -> _ArrayTemplate:
    """Ask zarr for the metadata and chunk bytes of a small sample array of this ndim and dtype."""
    dtype = np.dtype(dtype_str)
    # Small whatever ndim is, with first and last axes of different lengths so that C and Fortran
    # order differ; distinct nonzero values so the chunk is written and byte order would show.
    sample_shape = () if ndim == 0 else (3,) if ndim == 1 else (2, *(1,) * (ndim - 2), 3)
    size = int(np.prod(sample_shape, dtype=np.int64))
    sample = np.arange(1, size + 1).astype(dtype).reshape(sample_shape)
    store: dict[str, Any] = {}
    try:
        array = zarr.create_array(
            store,
            shape=sample_shape,
            dtype=dtype,
            chunks=sample_shape,
            filters=None,
            serializer=BytesCodec(endian="little"),
            compressors=[Crc32cCodec()],
            fill_value=0,
            chunk_key_encoding={"name": "v2", "separator": "."},
            zarr_format=3,
            attributes={},
        )
    except (ValueError, TypeError) as exc:
        # e.g. float128, which Zarr v3 has no data type for.
        raise TypeError(f"arrays of dtype {dtype} cannot be stored in a Zarr v3 checkpoint ({exc})") from exc
    array[...] = sample
    doc = json.loads(store.pop(_ZARR_JSON).to_bytes())
    if len(store) != 1:
        raise RuntimeError(f"zarr {zarr.__version__} wrote chunks {sorted(store)} for a one-chunk array")
    ((chunk_key, chunk),) = store.items()
    expected_grid = {"name": "regular", "configuration": {"chunk_shape": list(sample_shape)}}
    if doc.get("shape") != list(sample_shape) or doc.get("chunk_grid") != expected_grid:
        raise RuntimeError(f"zarr {zarr.__version__} wrote unexpected array metadata {doc!r}")
    if b"".join(bytes(p) for p in _encode_chunk(sample)) != chunk.to_bytes():
        raise RuntimeError(
            f"zarr {zarr.__version__} encodes {dtype} chunks differently from dlearner.checkpoint; "
            "please report this (checkpoints written now might not be readable by zarr)"
        )
    doc.pop("attributes", None)
    return _ArrayTemplate(doc, chunk_key)


@lru_cache(maxsize=1)
def _group_template() -> dict[str, Any]:
    store: dict[str, Any] = {}
    zarr.create_group(store, zarr_format=3, attributes={})
    doc = json.loads(store[_ZARR_JSON].to_bytes())
    doc.pop("attributes", None)
    return doc


def _json_bytes(doc: dict[str, Any], *, indent: int | None = None) -> bytes:
    # Compact by default: with ``indent`` json falls back to its pure-Python encoder, which made JSON
    # the largest cost of a save. allow_nan=False: every attribute value went through _encode_json,
    # so a NaN here would be a bug.
    text = json.dumps(doc, indent=indent, separators=None if indent else (",", ":"), allow_nan=False)
    return text.encode("utf-8")


def _group_doc(attributes: dict[str, Any], *, indent: int | None = None) -> bytes:
    return _json_bytes({**_group_template(), "attributes": attributes}, indent=indent)


def _encode_chunk(array: np.ndarray) -> list[Any]:
    """The chunk as parts: raw little-endian C-order bytes, then their CRC32C (little-endian)."""
    data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).reshape(-1).view(np.uint8)
    return [data, google_crc32c.value(data).to_bytes(4, "little")]


def _decode_chunk(raw: bytes, leaf: _ArrayLeaf, where: str) -> np.ndarray:
    if len(raw) != leaf.nbytes + 4:
        raise InvalidCheckpointError(
            f"{where}: array data has {len(raw)} bytes, expected {leaf.nbytes + 4} for "
            f"{leaf.dtype} {leaf.shape}; {_CORRUPTED}"
        )
    data = np.frombuffer(raw, dtype=np.uint8)[:-4]  # no copy; google_crc32c takes numpy buffers
    if google_crc32c.value(data) != int.from_bytes(raw[-4:], "little"):
        raise InvalidCheckpointError(f"{where}: checksum mismatch in array data; {_CORRUPTED}")
    # astype copies, so the result is writable and owns its memory rather than viewing the bytes read.
    le_view = data.view(leaf.dtype.newbyteorder("<")).reshape(leaf.shape)
    return le_view.astype(leaf.dtype, copy=True)


# --------------------------------------------------------------------------------------------------
# Reading the root and the manifest
# --------------------------------------------------------------------------------------------------


def _parse_json(raw: bytes, key: str, where: str) -> Any:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        message = f"{where!r}: {key} is not valid JSON ({exc}); {_CORRUPTED}"
        raise InvalidCheckpointError(message) from exc


@dataclass
class _RootState:
    """What the root of a location holds."""

    kind: str  # "absent" | "empty" | "foreign" | "ours"
    reason: str = ""  # for "foreign": what was found
    attrs: dict[str, Any] = field(default_factory=dict)  # for "ours": attributes["dlearner"]


def _probe_root(backend: _Backend) -> _RootState:
    """Classify a location without modifying it."""
    raw = backend.read(_ZARR_JSON)
    if raw is None:
        kind = backend.probe()
        if kind in ("absent", "empty"):
            return _RootState(kind)
        if kind == "file":
            return _RootState("foreign", "it is a file, not a directory")
        entries = sorted(backend.list_dir(""))
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        return _RootState("foreign", f"it has no zarr.json but holds {shown}")
    doc = _parse_json(raw, _ZARR_JSON, backend.display)
    if not (isinstance(doc, dict) and doc.get("zarr_format") == 3 and doc.get("node_type") == "group"):
        return _RootState("foreign", "its zarr.json is not a Zarr v3 group")
    attributes = doc.get("attributes")
    attrs = attributes.get(ATTRS_KEY) if isinstance(attributes, dict) else None
    if not isinstance(attrs, dict) or attrs.get("format") != FORMAT_NAME:
        return _RootState("foreign", f"it is a Zarr group without {FORMAT_NAME!r} attributes")
    version = attrs.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise InvalidCheckpointError(
            f"{backend.display!r}: invalid format_version {version!r} in zarr.json; {_CORRUPTED}"
        )
    return _RootState("ours", attrs=attrs)


@dataclass
class _CommittedRoot:
    format_version: int
    version: str
    committed_at: str | None
    metadata: dict[str, Any]


def _read_committed_root(backend: _Backend) -> _CommittedRoot:
    where = backend.display
    state = _probe_root(backend)
    if state.kind == "absent":
        raise FileNotFoundError(f"no checkpoint at {where!r}: the path does not exist")
    if state.kind == "empty":
        raise InvalidCheckpointError(
            f"{where!r} is not a dlearner checkpoint: it is an empty directory. Pass a path written by save_to_path()."
        )
    if state.kind == "foreign":
        raise InvalidCheckpointError(
            f"{where!r} is not a dlearner checkpoint: {state.reason}. Pass a path written by save_to_path()."
        )
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
        raise InvalidCheckpointError(f"{where!r}: invalid committed_version {version!r}; {_CORRUPTED}")
    metadata = attrs.get("metadata")
    if not isinstance(metadata, dict):
        raise InvalidCheckpointError(f"{where!r}: metadata is missing from zarr.json; {_CORRUPTED}")
    committed_at = attrs.get("committed_at")
    return _CommittedRoot(
        format_version=attrs["format_version"],
        version=version,
        committed_at=committed_at if isinstance(committed_at, str) else None,
        metadata=_decode_json(metadata, f"{where!r} metadata"),
    )


def _read_manifest(backend: _Backend, root: _CommittedRoot) -> _Manifest:
    where = backend.display
    key = f"{VERSIONS_GROUP}/{root.version}/{_ZARR_JSON}"
    raw = backend.read(key)
    if raw is None:
        raise InvalidCheckpointError(
            f"{where!r}: the committed version {root.version} is missing ({key} not found); "
            f"{_CORRUPTED}"
        )
    doc = _parse_json(raw, key, where)
    attributes = doc.get("attributes") if isinstance(doc, dict) else None
    attrs = attributes.get(ATTRS_KEY) if isinstance(attributes, dict) else None
    if not isinstance(attrs, dict) or "tree" not in attrs:
        raise InvalidCheckpointError(f"{where!r}: {key} has no manifest; {_CORRUPTED}")
    return _parse_manifest(attrs["tree"], f"{where!r} {key}")


# --------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------


def _array_files(version_dir: str, leaf: _ArrayLeaf, key: str, template: _ArrayTemplate) -> list[tuple[str, list[Any]]]:
    """The files of one array: its zarr.json and, unless it has no elements, its single chunk."""
    node = f"{version_dir}/{leaf.node}"
    files = [(f"{node}/{_ZARR_JSON}", [_json_bytes(template.doc_for(leaf.shape, {ATTRS_KEY: {"key": key}}))])]
    if leaf.nbytes:
        assert leaf.array is not None
        files.append((f"{node}/{template.chunk_key}", _encode_chunk(leaf.array)))
    return files


def _version_files(
    version_dir: str, manifest: _Manifest, templates: dict[tuple[int, str], _ArrayTemplate]
) -> Iterator[tuple[str, list[Any]]]:
    # Lazily, so that an encoded chunk is alive only until it is written. Groups first: their
    # directories are the parents of what follows.
    yield f"{VERSIONS_GROUP}/{_ZARR_JSON}", [_group_doc({})]
    for keys, node in manifest.groups():
        yield f"{version_dir}/{node.node}/{_ZARR_JSON}", [_group_doc({ATTRS_KEY: {"key": keys[-1]}})]
    for keys, leaf in manifest.arrays():
        yield from _array_files(version_dir, leaf, keys[-1], templates[leaf.signature])


def _root_doc(committed: str | None, metadata: Any) -> bytes:
    attrs = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "committed_version": committed,
        "committed_at": datetime.datetime.now(datetime.timezone.utc).isoformat() if committed else None,
        "metadata": metadata,
        "written_with": {"zarr": zarr.__version__, "numpy": np.__version__},
    }
    # Indented: this is the file people open to see what a checkpoint is.
    return _group_doc({ATTRS_KEY: attrs}, indent=2)


def _save(
    backend: _Backend,
    manifest: _Manifest,
    metadata: Any,
    templates: dict[tuple[int, str], _ArrayTemplate],
) -> None:
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
        backend.write_atomic(_ZARR_JSON, _root_doc(None, None))

    version_id = uuid.uuid4().hex
    version_dir = f"{VERSIONS_GROUP}/{version_id}"
    backend.write_many(_version_files(version_dir, manifest, templates))
    # The manifest goes last, so a version group that has one is complete on its own.
    version_attrs = {ATTRS_KEY: {"format_version": FORMAT_VERSION, "tree": manifest.root.to_json()}}
    backend.write_many([(f"{version_dir}/{_ZARR_JSON}", [_group_doc(version_attrs)])])

    # The commit: one small object replaced atomically (a rename on local disks, a single PUT on
    # object stores). Before it readers see the previous checkpoint, after it the new one.
    backend.write_atomic(_ZARR_JSON, _root_doc(version_id, metadata))

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


def _read_arrays(backend: _Backend, root: _CommittedRoot, manifest: _Manifest) -> dict[str, np.ndarray | np.generic]:
    where = repr(backend.display)
    version_dir = f"{VERSIONS_GROUP}/{root.version}"
    leaves = [leaf for _, leaf in manifest.arrays()]
    templates: dict[tuple[int, str], _ArrayTemplate] = {}
    for sig in manifest.signatures():
        try:
            templates[sig] = _array_template(*sig)
        except TypeError as exc:
            raise InvalidCheckpointError(f"{where}: {exc}; {_CORRUPTED}") from exc
    # Every array's zarr.json and chunk in one batch, so remote stores fetch them concurrently.
    keys: list[str] = []
    for leaf in leaves:
        node = f"{version_dir}/{leaf.node}"
        keys += [f"{node}/{_ZARR_JSON}", f"{node}/{templates[leaf.signature].chunk_key}"]
    blobs = backend.read_many(keys)
    arrays: dict[str, np.ndarray | np.generic] = {}
    for i, leaf in enumerate(leaves):
        node = f"{version_dir}/{leaf.node}"
        data = _decode_array(
            backend, node, leaf, templates[leaf.signature], meta_raw=blobs[2 * i], chunk=blobs[2 * i + 1], where=where
        )
        arrays[leaf.node] = data[()] if leaf.numpy_scalar else data
    return arrays


def _decode_array(
    backend: _Backend,
    node: str,
    leaf: _ArrayLeaf,
    template: _ArrayTemplate,
    *,
    meta_raw: bytes | None,
    chunk: bytes | None,
    where: str,
) -> np.ndarray:
    if meta_raw is None:
        raise InvalidCheckpointError(f"{where}: array {node} is missing; {_CORRUPTED}")
    meta = _parse_json(meta_raw, f"{node}/{_ZARR_JSON}", backend.display)
    if not isinstance(meta, dict):
        raise InvalidCheckpointError(f"{where}: {node}/zarr.json is not a JSON object; {_CORRUPTED}")
    meta = {k: v for k, v in meta.items() if k != "attributes"}
    expected = template.doc_for(leaf.shape)
    if meta.get("shape") != expected["shape"] or meta.get("data_type") != expected["data_type"]:
        raise InvalidCheckpointError(
            f"{where}: array {node} has shape {meta.get('shape')} and data type {meta.get('data_type')!r}, "
            f"but the manifest says {list(leaf.shape)} and {expected['data_type']!r}; {_CORRUPTED}"
        )
    if meta != expected:
        # Re-encoded with zarr (other chunking, compression, another zarr's metadata): the raw
        # decoding below does not apply, so let zarr decode it.
        return _read_array_with_zarr(backend, node, leaf, where)
    if not leaf.nbytes:
        return np.empty(leaf.shape, dtype=leaf.dtype)
    if chunk is None:
        raise InvalidCheckpointError(f"{where}: the data of array {node} is missing; {_CORRUPTED}")
    return _decode_chunk(chunk, leaf, f"{where}: array {node}")


def _read_array_with_zarr(backend: _Backend, node: str, leaf: _ArrayLeaf, where: str) -> np.ndarray:
    try:
        array = zarr.open_array(store=backend.zarr_store(), path=node, mode="r", zarr_format=3)
        data = np.asarray(array[...])
    except (ValueError, TypeError, KeyError, FileNotFoundError) as exc:
        raise InvalidCheckpointError(
            f"{where}: array {node} cannot be read by zarr ({exc}); {_CORRUPTED}"
        ) from exc
    if data.shape != leaf.shape:
        raise InvalidCheckpointError(f"{where}: array {node} has shape {data.shape}, expected {leaf.shape}")
    return data.astype(leaf.dtype, copy=True)


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
