"""The checkpoint store: state trees as atomically committed Zarr v3 stores, on disk or via fsspec.

This module is the storage layer behind every ``save_to_path`` / ``restore_from_path`` in dlearner.
It knows nothing about learners or modules: it writes a *state tree* (nested ``dict`` with ``str``
keys whose leaves are numpy arrays or JSON values) plus a JSON *metadata* dict to a path, and reads
them back bit for bit. It owns the I/O: local directories through plain ``os`` calls, URLs through
fsspec, the atomic commit protocol, versions and the pointer to the committed one, and where a path's
store is (:func:`resolve_checkpoint_path`: a store, or a run folder that keeps it in ``checkpoint/``).
The bytes themselves come from :mod:`dlearner.checkpoint.encoding`.

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
import errno
import itertools
import os
import posixpath
import re
import shutil
import stat
import uuid
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import fsspec
import numpy as np
import zarr

from dlearner.checkpoint.encoding import (
    CORRUPTED,
    ZARR_JSON,
    ArrayLeaf,
    ArrayTemplate,
    InvalidCheckpointError,
    Manifest,
    array_template,
    build_tree,
    check_array_metadata,
    check_json_document,
    decode_chunk,
    decode_json,
    encode_chunk,
    encode_json,
    group_doc,
    json_bytes,
    parse_json_document,
    parse_manifest,
    plan_save,
    where_keys,
)
from dlearner.checkpoint.limits import MAX_ARRAY_METADATA_BYTES, MAX_JSON_DOCUMENT_BYTES, MAX_LISTED_ENTRIES

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
# Temporary file of an atomic replace; debris of one (from a killed process) does not make a
# directory "not empty" nor "not a checkpoint".
_COMMIT_TMP = re.compile(r"\.zarr\.json\.[0-9a-f]{32}\.tmp")
_WRITE_BATCH_BYTES = 64 * 2**20
# Arrays whose files are fetched in one read_many call: remote stores fetch a batch concurrently, and
# a store with a missing or bad array is rejected after at most one batch.
_READ_BATCH_ARRAYS = 256
# fsspec protocols of flat key-value stores: writing one object replaces it atomically (readers see
# the old or the new bytes) and there are no directories to create.
_OBJECT_STORE_PROTOCOLS = frozenset({"memory", "s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl"})


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
    encoded_metadata = encode_json(metadata, "metadata")
    templates: dict[tuple[int, str], ArrayTemplate] = {}
    for keys, leaf in manifest.arrays():
        if leaf.signature not in templates:
            try:
                templates[leaf.signature] = array_template(*leaf.signature)
            except TypeError as exc:
                raise TypeError(f"array at {where_keys(keys)}: {exc}") from exc
    # What readers refuse (see dlearner.checkpoint.limits) is refused here, before anything is written.
    manifest_doc = group_doc({ATTRS_KEY: {"format_version": FORMAT_VERSION, "tree": manifest.root.to_json()}})
    _check_readable(manifest_doc, "the state tree's manifest")
    _check_readable(_root_doc(uuid.uuid4().hex, encoded_metadata), "the metadata (root zarr.json)")
    # A run folder's store is updated in place; anything else is saved to exactly ``path``.
    backend = _locate(path_str, storage_options)
    _save(backend, manifest, manifest_doc, encoded_metadata, templates)
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
    arrays = _read_arrays(backend, root, manifest)
    return build_tree(manifest.root, arrays, ()), root.metadata



# --------------------------------------------------------------------------------------------------
# Backends: byte I/O for local directories (plain os calls) and fsspec URLs
# --------------------------------------------------------------------------------------------------
#
# The layout is a Zarr v3 store, but bytes are moved without zarr's store classes: zarr's async
# stores pay a thread hand-off per key, which made a 48-array save ~10x slower than the files
# themselves cost. Keys are zarr store keys ("versions/<id>/a/zarr.json"); a local directory maps
# them to files exactly as zarr's LocalStore does, and fsspec URLs through fsspec, as FsspecStore does.


class Backend(Protocol):
    """Byte I/O on one store location, in zarr store keys."""

    display: str  # the path as the caller gave it, for messages

    def probe(self) -> str:
        """'absent', 'empty', 'file' or 'nonempty' (a directory or prefix with entries)."""

    def read(self, key: str, max_bytes: int) -> bytes | None:
        """The bytes at ``key``, or None if there is no such key (or a directory is there).

        Raises :class:`InvalidCheckpointError` naming the key if it holds more than ``max_bytes``
        bytes (reading at most ``max_bytes + 1`` of them) or, on local disks, if it is not a regular
        file or a symbolic link is on its way below the store's root.
        """

    def read_many(self, keys: list[tuple[str, int]]) -> list[bytes | None]:
        """Like :meth:`read` for several ``(key, max_bytes)`` (concurrently where the file system supports it)."""

    def write_many(self, items: Iterable[tuple[str, list[Any]]]) -> None:
        """Write each ``(key, [bytes-like parts])``, creating directories; not atomic per key."""

    def write_atomic(self, key: str, data: bytes) -> None:
        """Replace ``key`` so that readers see either the old or the new bytes, never a mix."""

    def list_dir(self, key: str) -> list[str]:
        """Names directly below ``key`` (empty if it does not exist)."""

    def delete_tree(self, key: str) -> None:
        """Delete ``key`` and everything below it."""


class _LocalBackend:
    def __init__(self, display: str, root: Path) -> None:
        self.display = display
        self.root = root

    def probe(self) -> str:
        if not self.root.exists():
            return "absent"
        if not self.root.is_dir():
            return "file"
        with os.scandir(self.root) as entries:  # stops at the first entry, however many there are
            return "nonempty" if any(not _COMMIT_TMP.fullmatch(e.name) for e in entries) else "empty"

    def read(self, key: str, max_bytes: int) -> bytes | None:
        return self._read(key, max_bytes, set())

    def read_many(self, keys: list[tuple[str, int]]) -> list[bytes | None]:
        checked: set[str] = set()  # directories already known to be real directories
        return [self._read(key, max_bytes, checked) for key, max_bytes in keys]

    def _read(self, key: str, max_bytes: int, checked_dirs: set[str]) -> bytes | None:
        # Only regular files, reached without following a symbolic link below the root (the root
        # itself, or a run folder's checkpoint/, may be a link: the caller named it). A FIFO would
        # block the read forever and a device (/dev/zero) never ends; a link could lead anywhere.
        parts = key.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent in checked_dirs:
                continue
            try:
                mode = os.lstat(os.path.join(self.root, parent)).st_mode
            except (FileNotFoundError, NotADirectoryError):
                return None
            if stat.S_ISLNK(mode):
                raise self._not_regular(parent, "a symbolic link")
            if not stat.S_ISDIR(mode):
                return None
            checked_dirs.add(parent)
        path = os.path.join(self.root, key)
        if not _O_NOFOLLOW:  # no O_NOFOLLOW (Windows): look before opening
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                if stat.S_ISLNK(os.lstat(path).st_mode):
                    raise self._not_regular(key, "a symbolic link")
        try:
            # O_NONBLOCK: opening a FIFO returns at once instead of waiting for a writer.
            fd = os.open(path, _READ_FLAGS)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a symbolic link
                raise self._not_regular(key, "a symbolic link") from exc
            raise
        try:
            info = os.fstat(fd)
            if stat.S_ISDIR(info.st_mode):
                return None
            if not stat.S_ISREG(info.st_mode):
                raise self._not_regular(key, _file_kind(info.st_mode))
            if info.st_size > max_bytes:
                raise _too_large(self.display, key, info.st_size, max_bytes)
            return _read_at_most(fd, info.st_size, max_bytes, self.display, key)
        finally:
            os.close(fd)

    def _not_regular(self, key: str, what: str) -> InvalidCheckpointError:
        return InvalidCheckpointError(
            f"{self.display!r}: {key} is {what}, not a regular file; dlearner reads only regular files "
            f"inside a checkpoint and follows no symbolic links there; {CORRUPTED}"
        )

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

    def read(self, key: str, max_bytes: int) -> bytes | None:
        return self.read_many([(key, max_bytes)])[0]

    def read_many(self, keys: list[tuple[str, int]]) -> list[bytes | None]:
        if not keys:
            return []
        # One call, so async file systems (s3, gcs, ...) fetch concurrently. cat_ranges, unlike
        # cat, returns results in order and never treats "[" or "*" in a path as a glob. Each read
        # stops one byte past its limit (a ranged GET on object stores).
        found = self.fs.cat_ranges(
            [self._full(key) for key, _ in keys], 0, [limit + 1 for _, limit in keys], on_error="return"
        )
        out: list[bytes | None] = []
        for (key, limit), value in zip(keys, found):
            if isinstance(value, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
                out.append(None)
            elif isinstance(value, BaseException):
                raise value
            elif len(value) > limit:
                raise _too_large(self.display, key, None, limit)
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



_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_READ_FLAGS = (
    os.O_RDONLY
    | _O_NOFOLLOW
    | getattr(os, "O_NONBLOCK", 0)
    | getattr(os, "O_NOCTTY", 0)
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_BINARY", 0)
)


def _file_kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "a special file"


def _too_large(display: str, key: str, size: int | None, limit: int) -> InvalidCheckpointError:
    has = f"has {size} bytes, more" if size is not None else "has more"
    return InvalidCheckpointError(f"{display!r}: {key} {has} than the {limit} bytes this file may hold; {CORRUPTED}")


def _read_at_most(fd: int, size: int, limit: int, display: str, key: str) -> bytearray:
    """Up to ``limit`` bytes of the open regular file ``fd`` of ``size`` bytes (as fstat said).

    One byte more than ``size`` is asked for, so a file that grew is noticed; a file with more than
    ``limit`` bytes is refused after reading at most ``limit + 1``.
    """
    want = min(size, limit) + 1
    buf = bytearray(want)
    view = memoryview(buf)
    got = 0
    with view:
        while got < want:
            n = os.readv(fd, [view[got:]]) if _HAVE_READV else _readinto(fd, view[got:])
            if n == 0:
                break
            got += n
    if got > limit:
        raise _too_large(display, key, None, limit)
    del buf[got:]
    return buf


_HAVE_READV = hasattr(os, "readv")


def _readinto(fd: int, view: memoryview) -> int:
    data = os.read(fd, len(view))
    view[: len(data)] = data
    return len(data)


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


def _open_backend(path: str, storage_options: dict[str, Any] | None) -> Backend:
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


def _join(path: str, name: str) -> str:
    """``path/name`` for a local path or a URL (fsspec URLs, chained ones included, end in the path)."""
    if "://" in path or "::" in path:
        return f"{path.rstrip('/')}/{name}"
    return os.path.join(path, name)


def _locate(path: str, storage_options: dict[str, Any] | None, *, new_run: bool = False) -> Backend:
    """The backend of the store that ``path`` names (see :func:`resolve_checkpoint_path`)."""
    backend = _open_backend(path, storage_options)
    if backend.read(ZARR_JSON, MAX_JSON_DOCUMENT_BYTES) is not None:
        return backend  # a Zarr store: dlearner's or not, the caller's checks say
    inner = _open_backend(_join(path, RUN_STORE_DIRNAME), storage_options)
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
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise InvalidCheckpointError(
            f"{backend.display!r}: invalid format_version {version!r} in zarr.json; {CORRUPTED}"
        )
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
        raise InvalidCheckpointError(
            f"{where!r} is not a dlearner checkpoint: it is an empty directory. {_PASS_A_CHECKPOINT}"
        )
    if state.kind == "foreign":
        raise InvalidCheckpointError(
            f"{where!r} is not a dlearner checkpoint: {state.reason}. {_PASS_A_CHECKPOINT}"
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
        raise InvalidCheckpointError(
            f"{where!r}: the committed version {root.version} is missing ({key} not found); "
            f"{CORRUPTED}"
        )
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
    return group_doc({ATTRS_KEY: attrs}, indent=2)


def _save(
    backend: Backend,
    manifest: Manifest,
    manifest_doc: bytes,
    metadata: Any,
    templates: dict[tuple[int, str], ArrayTemplate],
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
        backend.write_atomic(ZARR_JSON, _root_doc(None, None))

    version_id = uuid.uuid4().hex
    version_dir = f"{VERSIONS_GROUP}/{version_id}"
    backend.write_many(_version_files(version_dir, manifest, templates))
    # The manifest goes last, so a version group that has one is complete on its own.
    backend.write_many([(f"{version_dir}/{ZARR_JSON}", [manifest_doc])])

    # The commit: one small object replaced atomically (a rename on local disks, a single PUT on
    # object stores). Before it readers see the previous checkpoint, after it the new one.
    backend.write_atomic(ZARR_JSON, _root_doc(version_id, metadata))

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


def _read_arrays(backend: Backend, root: CommittedRoot, manifest: Manifest) -> dict[str, np.ndarray | np.generic]:
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
            data = _decode_array(
                backend, node, leaf, templates[leaf.signature], meta_raw=meta_raw, chunk=chunk, where=where
            )
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
    return decode_chunk(chunk, leaf, f"{where}: array {node}")
