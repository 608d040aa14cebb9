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
import ctypes
import errno
import os
import posixpath
import re
import shutil
import stat
import sys
import threading
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Protocol, TypeVar

import fsspec

from dlearner.checkpoint.encoding import CORRUPTED, InvalidCheckpointError

__all__ = ["Backend", "FsspecBackend", "LocalBackend", "open_backend"]

# Temporary file of an atomic replace; debris of one (from a killed process) does not make a
# directory "not empty" nor "not a checkpoint".
_COMMIT_TMP = re.compile(r"\.zarr\.json\.[0-9a-f]{32}\.tmp")
_WRITE_BATCH_BYTES = 64 * 2**20
_READ_INTO_BATCH = 16  # chunk files fetched per cat_ranges call by FsspecBackend.read_into_many
IO_THREADS = min(4, max(2, os.cpu_count() or 1))
"""Threads that read or write the chunk files of one array at once (file I/O releases the GIL)."""
# Files at least this large are written by IO_THREADS threads; smaller ones inline (a thread hand-off
# costs more than writing a small file).
_THREADED_WRITE_BYTES = 2**20
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

    def sizes(self, keys: list[str]) -> list[int | None]:
        """The size of each key's file, or None where there is none (same checks as :meth:`read`)."""

    def read_into_many(self, items: list[tuple[str, list[memoryview]]]) -> None:
        """Fill each ``(key, [views])`` with the bytes of ``key`` in order, which must be exactly as many
        (:class:`InvalidCheckpointError` otherwise); concurrently where possible."""

    def write_many(self, items: Iterable[tuple[str, list[Any]]]) -> None:
        """Write each ``(key, [bytes-like parts])``, creating directories; not atomic per key."""

    def flush(self) -> None:
        """Make everything :meth:`write_many` and :meth:`stage_atomic` wrote durable (on local disks: one
        syncfs of the file system where it is reliable, else an fsync of each file and directory, all
        at once); called before the commit, so that a commit never points at data that a power loss
        could take back."""

    def stage_atomic(self, key: str, data: bytes) -> None:
        """Prepare a later ``write_atomic(key, data)`` with the same ``data`` object: on local disks the
        temporary file is written now and made durable by the next :meth:`flush` (with everything
        else written), so that the commit itself only renames it and fsyncs its directory."""

    def write_atomic(self, key: str, data: bytes) -> None:
        """Replace ``key`` so that readers see either the old or the new bytes, never a mix; durably
        (the rename of a local file is fsynced with its directory before this returns)."""

    def list_dir(self, key: str) -> list[str]:
        """Names directly below ``key`` (empty if it does not exist)."""

    def delete_tree(self, key: str) -> None:
        """Delete ``key`` and everything below it."""

    @property
    def location(self) -> str:
        """Names the store: backends of the same store have the same location (the key under which
        saves wait for the background deletion of the versions they replaced)."""


class LocalBackend:
    """A local directory, through plain ``os`` calls; keys map to files as in zarr's ``LocalStore``."""

    def __init__(self, display: str, root: Path) -> None:
        self.display = display
        self.root = root
        self._unsynced: set[str] = set()  # files and directories written since the last flush
        # With syncfs (see flush): a descriptor of the store's file system, opened before the first
        # write, so that syncfs reports every writeback error on that file system since then.
        self._syncfs_fd: int | None = None
        self._syncfs_close: weakref.finalize | None = None
        # stage_atomic: key -> (its data object, the temporary file holding it, made durable yet).
        self._staged: dict[str, tuple[bytes, Path, bool]] = {}

    @property
    def location(self) -> str:
        return os.path.realpath(self.root)

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
        opened = self._open_regular(key, checked_dirs)
        if opened is None:
            return None
        fd, size = opened
        try:
            if size > max_bytes:
                raise _too_large(self.display, key, size, max_bytes)
            return _read_at_most(fd, size, max_bytes, self.display, key)
        finally:
            os.close(fd)

    def _open_regular(self, key: str, checked_dirs: set[str]) -> tuple[int, int] | None:
        """``(fd, size)`` of the regular file at ``key``, or None if there is none (or a directory).

        Only regular files are opened, reached without following a symbolic link below the root (the
        root itself, or a run folder's checkpoint/, may be a link: the caller named it). A FIFO would
        block the read forever and a device (/dev/zero) never ends; a link could lead anywhere.
        """
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
                os.close(fd)
                return None
            if not stat.S_ISREG(info.st_mode):
                raise self._not_regular(key, _file_kind(info.st_mode))
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
        return fd, info.st_size

    def sizes(self, keys: list[str]) -> list[int | None]:
        checked: set[str] = set()
        out: list[int | None] = []
        for key in keys:
            opened = self._open_regular(key, checked)
            if opened is not None:
                os.close(opened[0])
            out.append(None if opened is None else opened[1])
        return out

    def read_into_many(self, items: list[tuple[str, list[memoryview]]]) -> None:
        def read_into(item: tuple[str, list[memoryview]]) -> None:
            key, views = item
            want = sum(v.nbytes for v in views)
            opened = self._open_regular(key, set())
            if opened is None:
                raise InvalidCheckpointError(f"{self.display!r}: {key} is missing; {CORRUPTED}")
            fd, size = opened
            try:
                if size != want:
                    raise _wrong_size(self.display, key, size, want)
                _readv_exactly(fd, views, self.display, key)
            finally:
                os.close(fd)

        # Threads: reading releases the GIL, and a file system reads several files at once faster.
        run_all(shared_pool("io", IO_THREADS), read_into, items)

    def _not_regular(self, key: str, what: str) -> InvalidCheckpointError:
        return InvalidCheckpointError(
            f"{self.display!r}: {key} is {what}, not a regular file; dlearner reads only regular files "
            f"inside a checkpoint and follows no symbolic links there; {CORRUPTED}"
        )

    def write_many(self, items: Iterable[tuple[str, list[Any]]]) -> None:
        # Small files inline: a thread pool was measured slower for them (a 48-array save took 16-22 ms
        # instead of 8 ms on tmpfs, and was no faster on ext4, where inode creation dominates). Files
        # of at least _THREADED_WRITE_BYTES (the chunks of large arrays) go to IO_THREADS threads, at
        # most 2 per thread in flight, so that ``items``, consumed lazily, keeps few encoded chunks alive.
        made: set[str] = set()
        pending: deque[Future[None]] = deque()
        if self._syncfs_fd is None and not self._unsynced:
            self._open_syncfs_fd()
        pool = shared_pool("io", IO_THREADS)
        try:
            for key, parts in items:
                path = os.path.join(self.root, key)
                parent = os.path.dirname(path)
                if parent not in made:
                    self._make_dirs(parent)
                    made.add(parent)
                self._unsynced.update((path, parent))  # the file, and its entry in its directory
                if sum(memoryview(p).nbytes for p in parts) < _THREADED_WRITE_BYTES:
                    _write_file(path, parts)
                    continue
                pending.append(pool.submit(_write_file, path, parts))
                while len(pending) > 2 * IO_THREADS or (pending and pending[0].done()):
                    pending.popleft().result()
            while pending:
                pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
            wait(pending)  # no write of this save goes on after it returned or failed

    def _make_dirs(self, directory: str) -> None:
        """``os.makedirs(directory, exist_ok=True)``, noting the parent of each directory it creates:
        a new directory's entry is durable once its parent is fsynced."""
        if os.path.isdir(directory):
            return
        parent = os.path.dirname(directory)
        if parent != directory:
            self._make_dirs(parent)
        with contextlib.suppress(FileExistsError):
            os.mkdir(directory)
        self._unsynced.add(parent)

    def _open_syncfs_fd(self) -> None:
        """Before the first write since the last flush: open the store's root for :func:`_syncfs` if
        its file system is one where syncfs makes everything durable (see :meth:`flush`)."""
        root = os.fspath(self.root)
        if _syncfs is None or not os.path.isdir(root) or not _syncfs_reliable(root):
            return  # no root yet (a save claims it first, so never in practice): fsync each path
        fd = os.open(root, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self._syncfs_fd = fd
        self._syncfs_close = weakref.finalize(self, os.close, fd)  # a save that failed before its flush

    def flush(self) -> None:
        paths, self._unsynced = list(self._unsynced), set()
        fd, self._syncfs_fd = self._syncfs_fd, None
        if fd is not None and len(paths) >= _SYNCFS_MIN_PATHS:
            assert self._syncfs_close is not None
            try:
                # One syncfs of the store's file system instead of an fsync per file and directory:
                # it writes back and commits the same files and directory entries (and whatever
                # else is dirty there) at once. Measured on ext4: ~4 ms instead of 15-35 ms for the
                # ~200 files and directories of a small learner's version.
                _syncfs(fd)  # type: ignore[misc]
            finally:
                self._syncfs_close()  # closes fd
        else:
            if fd is not None:
                assert self._syncfs_close is not None
                self._syncfs_close()
            # Every file and directory at once, from threads: the file system commits concurrent
            # fsyncs together (on ext4, one journal commit rather than one per file).
            run_all(shared_pool("sync", _SYNC_THREADS), _fsync_path, paths)
        # The staged commit records are durable now: their commit only renames them.
        self._staged = {key: (data, tmp, True) for key, (data, tmp, _) in self._staged.items()}

    def stage_atomic(self, key: str, data: bytes) -> None:
        path = self.root / key
        if not path.parent.is_dir():
            return  # write_atomic makes the directory (and writes the file) itself
        tmp = path.with_name(_commit_tmp_name(path.name))
        if self._syncfs_fd is None and not self._unsynced:
            self._open_syncfs_fd()
        try:
            _write_file(os.fspath(tmp), [data])
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        # Only the file: its directory entry is made durable after the rename (see write_atomic).
        self._unsynced.add(os.fspath(tmp))
        self._staged[key] = (data, tmp, False)

    def write_atomic(self, key: str, data: bytes) -> None:
        path = self.root / key
        staged = self._staged.pop(key, None)
        if staged is not None and not (staged[0] is data and staged[2]):
            staged[1].unlink(missing_ok=True)  # other data, or not flushed since: write it again
            staged = None
        if staged is None and not path.parent.is_dir():
            self._make_dirs(os.fspath(path.parent))
            self.flush()
        tmp = staged[1] if staged is not None else path.with_name(_commit_tmp_name(path.name))
        try:
            if staged is None:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), 0o666)
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view) :]
                    os.fsync(fd)  # the new bytes are on disk before the name points at them
                finally:
                    os.close(fd)
            os.replace(tmp, path)  # atomic on POSIX and Windows
            _fsync_path(os.fspath(path.parent))  # and the rename itself
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

    @property
    def location(self) -> str:
        return self.fs.unstrip_protocol(self.root)

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

    def sizes(self, keys: list[str]) -> list[int | None]:
        out: list[int | None] = []
        for key in keys:
            try:
                info = self.fs.info(self._full(key))
            except FileNotFoundError:
                out.append(None)
                continue
            out.append(int(info["size"]) if info.get("type") == "file" else None)
        return out

    def read_into_many(self, items: list[tuple[str, list[memoryview]]]) -> None:
        # One cat_ranges call per batch (concurrent on async file systems), then a copy into place.
        for first in range(0, len(items), _READ_INTO_BATCH):
            batch = items[first : first + _READ_INTO_BATCH]
            wants = [sum(v.nbytes for v in views) for _, views in batch]
            found = self.read_many([(key, want) for (key, _), want in zip(batch, wants)])
            for (key, views), want, data in zip(batch, wants, found):
                if data is None:
                    raise InvalidCheckpointError(f"{self.display!r}: {key} is missing; {CORRUPTED}")
                if len(data) != want:
                    raise _wrong_size(self.display, key, len(data), want)
                start = 0
                for view in views:
                    view[:] = memoryview(data)[start : start + view.nbytes]
                    start += view.nbytes

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

    def flush(self) -> None:
        pass  # an object store's PUT is durable when it returns; fsspec has no fsync for the others

    def stage_atomic(self, key: str, data: bytes) -> None:
        pass  # write_atomic is one PUT (or a write aside and a move): nothing to prepare

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


def _wrong_size(display: str, key: str, size: int, want: int) -> InvalidCheckpointError:
    return InvalidCheckpointError(f"{display!r}: {key} has {size} bytes, expected exactly {want}; {CORRUPTED}")


def _readv_exactly(fd: int, views: list[memoryview], display: str, key: str) -> None:
    """Fill ``views`` from ``fd`` and check that the file ends there (it may have changed since fstat)."""
    for view in views:
        view = view.cast("B")
        got = 0
        while got < view.nbytes:
            n = os.readv(fd, [view[got:]]) if _HAVE_READV else _readinto(fd, view[got:])
            if n == 0:
                raise InvalidCheckpointError(f"{display!r}: {key} ended early; {CORRUPTED}")
            got += n
    if os.read(fd, 1):
        raise InvalidCheckpointError(f"{display!r}: {key} is longer than expected; {CORRUPTED}")


def _readinto(fd: int, view: memoryview) -> int:
    data = os.read(fd, len(view))
    view[: len(data)] = data
    return len(data)


def _commit_tmp_name(name: str) -> str:
    return f".{name}.{uuid.uuid4().hex}.tmp"


_SYNC_THREADS = 16  # fsyncs wait on the disk, not the CPU
_Item = TypeVar("_Item")
_Result = TypeVar("_Result")
_shared_pools: dict[str, ThreadPoolExecutor] = {}
_shared_pools_lock = threading.Lock()


def shared_pool(name: str, threads: int) -> ThreadPoolExecutor:
    """The process's thread pool ``name`` ("io": file reads and writes, "sync": fsyncs, "chunk":
    checksums and compression), kept between saves and restores: starting threads for each array
    cost more than a small save's work, and under load (~3 ms a thread on 2 busy cores) a large
    restore's. Tasks in it never wait for other tasks, so callers sharing it cannot deadlock."""
    with _shared_pools_lock:
        pool = _shared_pools.get(name)
        if pool is None:
            pool = _shared_pools[name] = ThreadPoolExecutor(threads, thread_name_prefix=f"dlearner-checkpoint-{name}")
        return pool


def run_all(pool: ThreadPoolExecutor, fn: Callable[[_Item], _Result], items: Iterable[_Item]) -> list[_Result]:
    """``fn`` of every item, computed in ``pool``; returns once all of them ended (so nothing of a
    failed save or restore goes on behind its back) and raises the first error, in item order."""
    futures = [pool.submit(fn, item) for item in items]
    wait(futures)
    return [future.result() for future in futures]


def _forget_shared_pools() -> None:
    # A forked child has none of the parent's threads: it starts its own pools when it first needs them.
    global _shared_pools_lock
    _shared_pools.clear()
    _shared_pools_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_shared_pools)


# syncfs(2) makes a whole file system durable with one call. It is used where it promises as much as an
# fsync of each file and directory: on Linux 5.8 and later (earlier kernels never reported writeback
# errors from syncfs) and on file systems whose syncfs writes back the data and commits the metadata
# (their statfs magic numbers below). Elsewhere (network and FUSE file systems, whose syncfs may not
# reach the server, other systems) each path is fsynced. A flush of fewer paths than
# _SYNCFS_MIN_PATHS fsyncs them too: a few fsyncs cost no more, and never wait for other writers' data.
_SYNCFS_FILE_SYSTEMS = {
    0xEF53: "ext2/3/4",
    0x58465342: "xfs",
    0x9123683E: "btrfs",
    0xF2F52010: "f2fs",
    0x01021994: "tmpfs",
}
_SYNCFS_MIN_PATHS = 16


def _load_syncfs() -> Any:
    """``syncfs(fd)`` of the C library on Linux 5.8 or later, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        major, minor = (int(x) for x in re.match(r"(\d+)\.(\d+)", os.uname().release).groups())  # type: ignore[union-attr]
        libc = ctypes.CDLL(None, use_errno=True)
        function, statfs = libc.syncfs, libc.statfs
    except (AttributeError, OSError, ValueError):  # no such C function (or an unusual release string)
        return None
    if (major, minor) < (5, 8):
        return None
    function.argtypes, statfs.argtypes = [ctypes.c_int], [ctypes.c_char_p, ctypes.c_void_p]
    return function, statfs


_SYNCFS_FUNCTIONS = _load_syncfs()


def _syncfs_reliable(path: str) -> bool:
    """Whether the file system of ``path`` is one whose syncfs makes everything on it durable."""
    assert _SYNCFS_FUNCTIONS is not None
    buffer = ctypes.create_string_buffer(256)  # struct statfs (120 bytes on 64-bit Linux); f_type first
    if _SYNCFS_FUNCTIONS[1](os.fsencode(path), buffer) != 0:
        return False  # fsync each path instead; writing reports the real error, if any
    return (ctypes.c_long.from_buffer(buffer).value & 0xFFFFFFFF) in _SYNCFS_FILE_SYSTEMS


def _syncfs_call(fd: int) -> None:
    assert _SYNCFS_FUNCTIONS is not None
    if _SYNCFS_FUNCTIONS[0](fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"syncfs failed: {os.strerror(err)}")


_syncfs = _syncfs_call if _SYNCFS_FUNCTIONS is not None else None


def _fsync_path(path: str) -> None:
    """fsync a file or a directory by path (directories: where the OS allows opening them)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    except (IsADirectoryError, PermissionError):  # Windows cannot open directories: nothing to sync
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
