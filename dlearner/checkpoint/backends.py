"""Byte I/O on a checkpoint store: local directories through plain ``os`` calls, URLs through fsspec.

A backend moves bytes by Zarr store key (``"versions/<id>/a/zarr.json"``) and knows nothing of what
they mean (:mod:`dlearner.checkpoint.layout` does). The store is a Zarr v3 store, but bytes are moved
without zarr's store classes: zarr's async stores pay a thread hand-off per key, which made a 48-array
save ~10x slower than the files themselves cost. A local directory maps keys to files exactly as
zarr's ``LocalStore`` does, and fsspec URLs map them through fsspec, as ``FsspecStore`` does.

Reads are bounded for untrusted stores: a read names the most bytes the key may hold, and on local
disks only regular files are read, never through a symbolic link below the store's root.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import re
import shutil
import stat
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import fsspec

from dlearner.checkpoint.encoding import CORRUPTED, InvalidCheckpointError

__all__ = ["Backend", "FsspecBackend", "LocalBackend", "open_backend"]

# Temporary file of an atomic replace; debris of one (from a killed process) does not make a
# directory "not empty" nor "not a checkpoint".
_COMMIT_TMP = re.compile(r"\.zarr\.json\.[0-9a-f]{32}\.tmp")
_WRITE_BATCH_BYTES = 64 * 2**20
# fsspec protocols of flat key-value stores: writing one object replaces it atomically (readers see
# the old or the new bytes) and there are no directories to create.
_OBJECT_STORE_PROTOCOLS = frozenset({"memory", "s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl"})


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


class LocalBackend:
    """A local directory, through plain ``os`` calls; keys map to files as in zarr's ``LocalStore``."""

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


class FsspecBackend:
    """An fsspec URL (``memory://``, ``s3://``, ...); keys map to paths as in zarr's ``FsspecStore``."""

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
        found = self.fs.cat_ranges([self._full(key) for key, _ in keys], 0, [limit + 1 for _, limit in keys], on_error="return")
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


def open_backend(path: str, storage_options: dict[str, Any] | None) -> Backend:
    """The backend of ``path`` exactly (a local path, ``file://`` included, or an fsspec URL)."""
    if path.startswith("file://"):
        local: str | None = path[len("file://") :]
    elif "://" in path or "::" in path:
        local = None
    else:
        local = path
    if local is None:
        return FsspecBackend(path, path, dict(storage_options or {}))
    if storage_options:
        raise ValueError(
            f"storage_options={storage_options!r} were given for the local path {path!r}; "
            "they only apply to fsspec URLs such as s3://..."
        )
    return LocalBackend(path, Path(local).expanduser().absolute())
