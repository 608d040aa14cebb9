"""The layout of a checkpoint store, and the commit that makes a new version the checkpoint.

A store (``docs/checkpoint-format.md``, "Layout" and "Atomic commit protocol") is a Zarr v3 group:

* ``zarr.json`` at the root holds, in ``attributes["dlearner"]``, the format name and version, the
  user metadata and ``committed_version``, the id of the one complete version group. Rewriting this
  single small object is the commit.
* ``versions/<id>/`` is a version group: the manifest (key order, JSON leaves, dtypes, shapes) in its
  attributes, one Zarr group per dict of the tree and one Zarr array per numpy array (one
  uncompressed chunk for arrays of at most 1 MiB; larger ones in chunks of about 4 MiB, uncompressed
  for floats, zstd-compressed for integers and bools).

Saving is durable on local disks: everything written, the new root's temporary file included, is
made durable at once (one syncfs, or an fsync of each file and directory) before the commit, and the
commit's rename is fsynced with its directory. Versions that the commit replaced are deleted afterwards by
a background thread (:func:`wait_for_deletions`), off the save's critical path.

This module writes a version and commits it, and reads the committed root, its manifest and its
arrays, through any :class:`~dlearner.checkpoint.backends.Backend`. The bytes of each document and
chunk come from :mod:`dlearner.checkpoint.encoding`.
"""

from __future__ import annotations

import collections
import datetime
import itertools
import os
import posixpath
import re
import threading
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, TypeVar

import google_crc32c
import numpy as np
import zarr

from dlearner.checkpoint.backends import Backend, run_all, shared_pool
from dlearner.checkpoint.encoding import (
    CORRUPTED,
    ZARR_JSON,
    ArrayTemplate,
    ChunkLayout,
    InvalidCheckpointError,
    array_chunks,
    array_template,
    check_array_metadata,
    check_compressed_chunk,
    check_uncompressed_chunk,
    chunk_layout,
    compressed_chunk_limit,
    decode_chunk,
    decode_json,
    decompress_chunk,
    encode_chunk,
    encode_compressed_chunk,
    encode_uncompressed_chunk,
    group_doc,
    json_bytes,
    parse_json_document,
)
from dlearner.checkpoint.limits import (
    DECOMPRESSION_ALLOWANCE_BYTES,
    MAX_ARRAY_METADATA_BYTES,
    MAX_COMPRESSION_RATIO,
    MAX_JSON_DOCUMENT_BYTES,
    MAX_LISTED_ENTRIES,
    decompressed_bytes_allowed,
)
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
    "wait_for_deletions",
    "manifest_doc",
    "read_arrays",
    "read_committed_root",
    "read_manifest",
    "root_doc",
    "store_format_version",
]

FORMAT_NAME = "dlearner-checkpoint"
"""Value of ``attributes["dlearner"]["format"]`` in the root group of every checkpoint."""

FORMAT_VERSION = 3
"""The newest format version this module writes and reads.

Version 2 added compressed chunks (arrays over 1 MiB), version 3 uncompressed chunks of rows (float
arrays over 1 MiB, which zstd hardly shrinks); a store is written in the oldest version that holds
it, so one whose arrays are all at most 1 MiB is version 1, exactly the format older dlearners read
(see :func:`store_format_version`)."""

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
# Compressed chunks fetched in one read_many call: at most this many bytes by their read limits.
_READ_CHUNK_GROUP_BYTES = 64 * 2**20
# Threads that (de)compress the chunks of one array: zstd and reading release the GIL.
_CHUNK_THREADS = min(4, os.cpu_count() or 1)


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
    """The root of the committed checkpoint, or the error that says why there is none. Replaced
    versions that are still being deleted in the background play no part: only the committed one is read."""
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


@dataclass
class _CompressedTotals:
    """Data and chunk-file bytes of the compressed arrays met so far, in manifest order: a store may
    expand only so far (see :data:`~dlearner.checkpoint.limits.MAX_COMPRESSION_RATIO`)."""

    data_bytes: int = 0
    file_bytes: int = 0

    def within_limit(self) -> bool:
        return self.data_bytes <= decompressed_bytes_allowed(self.file_bytes)

    def describe(self) -> str:
        return (
            f"{self.data_bytes} bytes of data in {self.file_bytes} bytes of chunk files, more than the "
            f"{DECOMPRESSION_ALLOWANCE_BYTES} bytes plus {MAX_COMPRESSION_RATIO}x the chunk files readers "
            "accept (DECOMPRESSION_ALLOWANCE_BYTES, MAX_COMPRESSION_RATIO)"
        )


def _array_files(
    version_dir: str,
    leaf: ArrayLeaf,
    key: str,
    template: ArrayTemplate,
    totals: _CompressedTotals,
) -> Iterator[tuple[str, list[Any]]]:
    """The files of one array: its zarr.json and, unless it has no elements, its chunks."""
    node = f"{version_dir}/{leaf.node}"
    layout = chunk_layout(leaf.shape, leaf.dtype)
    doc = template.doc_for(leaf.shape, {ATTRS_KEY: {"key": key}}, name=posixpath.basename(leaf.node), layout=layout)
    yield f"{node}/{ZARR_JSON}", [json_bytes(doc)]
    if not leaf.nbytes:
        return
    assert leaf.array is not None
    if layout is None:
        yield f"{node}/{template.chunk_key}", encode_chunk(leaf.array, leaf.crc32c)
        return
    rows = layout.rows
    chunk_nbytes = rows * (leaf.nbytes // leaf.shape[0])
    if not layout.compressed:
        # Views of the array's own memory (a copy only for a padded last chunk), their checksums
        # computed by threads; the backend writes them from threads too.
        encoded = _in_order(lambda data: encode_uncompressed_chunk(data, chunk_nbytes), array_chunks(leaf.array, rows))
        for index, parts in enumerate(encoded):
            yield f"{node}/{template.chunk_key_of(index)}", parts
        return
    encoded = _in_order(lambda data: encode_compressed_chunk(data, chunk_nbytes), array_chunks(leaf.array, rows))
    for index, parts in enumerate(encoded):
        totals.file_bytes += sum(len(part) for part in parts)
        yield f"{node}/{template.chunk_key_of(index)}", parts
    totals.data_bytes += leaf.nbytes
    if not totals.within_limit():
        raise ValueError(
            f"cannot save: the compressed arrays up to {key!r} ({node}) hold {totals.describe()}, so readers "
            "would refuse the checkpoint. Data that compresses this well is mostly constant (such as the unused "
            "rows of a preallocated buffer): store only the rows that hold data. Nothing was committed."
        )


_T = TypeVar("_T")
_R = TypeVar("_R")


def _in_order(fn: Callable[[_T], _R], items: Iterable[_T]) -> Iterator[_R]:
    """``fn`` of each item, computed by the chunk threads and yielded in order, with at most two
    results per thread computed ahead: the consumer writes one while the next ones are being computed.
    Should the consumer stop early (a failed write), nothing is left computing once it closed this."""
    pool = shared_pool("chunk", _CHUNK_THREADS)
    pending: collections.deque[Future[_R]] = collections.deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) > 2 * _CHUNK_THREADS:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()
        wait(pending)


def _version_files(
    version_dir: str, manifest: Manifest, templates: dict[tuple[int, str], ArrayTemplate], *, versions_doc: bool = True
) -> Iterator[tuple[str, list[Any]]]:
    # Lazily, so that an encoded chunk is alive only until it is written. Groups first: their
    # directories are the parents of what follows.
    if versions_doc:
        yield f"{VERSIONS_GROUP}/{ZARR_JSON}", [group_doc({})]
    for keys, node in manifest.groups():
        yield f"{version_dir}/{node.node}/{ZARR_JSON}", [group_doc({ATTRS_KEY: {"key": keys[-1]}})]
    totals = _CompressedTotals()
    for keys, leaf in manifest.arrays():
        yield from _array_files(version_dir, leaf, keys[-1], templates[leaf.signature], totals)


def store_format_version(manifest: Manifest) -> int:
    """The format version a store of ``manifest`` is written in: the oldest that reads it. 3 if it has
    arrays in uncompressed chunks of rows (float arrays over 1 MiB), else 2 if it has compressed ones,
    else 1 (every array in one uncompressed chunk)."""
    layouts = [chunk_layout(leaf.shape, leaf.dtype) for _, leaf in manifest.arrays()]
    if any(layout is not None and not layout.compressed for layout in layouts):
        return 3
    return 2 if any(layout is not None for layout in layouts) else 1


def manifest_doc(manifest: Manifest) -> bytes:
    """The ``zarr.json`` of a version group: the manifest in its attributes."""
    return group_doc({ATTRS_KEY: {"format_version": store_format_version(manifest), "tree": manifest.root.to_json()}})


def root_doc(committed: str | None, metadata: Any, format_version: int = FORMAT_VERSION) -> bytes:
    """The root ``zarr.json`` pointing at version ``committed`` (``None``: a claimed, uncommitted store).

    ``metadata`` is already in the exact JSON encoding; ``format_version`` is the store's (see
    :func:`store_format_version`).
    """
    attrs = {
        "format": FORMAT_NAME,
        "format_version": format_version,
        "committed_version": committed,
        "committed_at": datetime.datetime.now(datetime.timezone.utc).isoformat() if committed else None,
        "metadata": metadata,
        "written_with": {"zarr": zarr.__version__, "numpy": np.__version__},
    }
    # Compact: indenting makes json use its pure-Python encoder, ~8 ms for a learner's config on
    # every save. `dlearner inspect` shows it readably.
    return group_doc({ATTRS_KEY: attrs})


def commit_version(
    backend: Backend,
    manifest: Manifest,
    manifest_doc: bytes,
    metadata: Any,
    templates: dict[tuple[int, str], ArrayTemplate],
) -> None:
    """Write a new version group holding ``manifest``'s tree and commit it, then have the versions it
    replaced deleted in the background (:func:`wait_for_deletions`).

    ``manifest_doc`` and ``metadata`` are what :func:`manifest_doc` and :func:`root_doc` take, already
    checked to be readable; ``templates`` has the array template of every signature in the manifest.
    Raises :class:`InvalidCheckpointError` (before writing anything) for a store that is not dlearner's
    or is in a newer format, and ``ValueError`` (before the commit) for compressed arrays that expand more
    than readers accept. Until the commit, readers see the previous checkpoint.
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
        backend.write_atomic(ZARR_JSON, root_doc(None, None, store_format_version(manifest)))

    version_id = uuid.uuid4().hex
    version_dir = f"{VERSIONS_GROUP}/{version_id}"
    # versions/zarr.json holds the same bytes in every store: written once (rewriting it is not atomic).
    versions_doc_missing = (
        state.kind in ("absent", "empty") or backend.read(f"{VERSIONS_GROUP}/{ZARR_JSON}", MAX_ARRAY_METADATA_BYTES) is None
    )
    backend.write_many(_version_files(version_dir, manifest, templates, versions_doc=versions_doc_missing))
    # The manifest goes last, so a version group that has one is complete on its own.
    backend.write_many([(f"{version_dir}/{ZARR_JSON}", [manifest_doc])])
    # The commit record, written aside now (a temporary file on local disks), so that the one flush
    # below makes it durable with the version instead of an fsync of its own at the commit.
    commit_record = root_doc(version_id, metadata, store_format_version(manifest))
    backend.stage_atomic(ZARR_JSON, commit_record)
    # Everything written is made durable, all at once, before the commit points at it.
    backend.flush()

    # The commit: one small object replaced atomically (a rename on local disks, a single PUT on
    # object stores). Before it readers see the previous checkpoint, after it the new one.
    backend.write_atomic(ZARR_JSON, commit_record)

    # Remove the version this commit replaced and leftovers of interrupted saves, never the new one:
    # listed now (so that nothing a later save creates is touched), deleted by a background thread
    # (deleting ~100 small directories cost more than the rest of a small save). The checkpoint is
    # already committed, so readers never need the old versions; a crash before they are gone only
    # leaves garbage that the next save lists and removes. The deletion an earlier save started here
    # ran while this save wrote; it ends before the listing (at most one deletion per store in
    # flight, and never a version listed twice).
    wait_for_deletions(backend.location)
    stale = [name for name in backend.list_dir(VERSIONS_GROUP) if _VERSION_ID.fullmatch(name) and name != version_id]
    if stale:
        _delete_in_background(backend, stale)


# --------------------------------------------------------------------------------------------------
# Deleting replaced versions in the background
# --------------------------------------------------------------------------------------------------

# One thread for all stores: deletions run one after the other, in the order of the commits.
_deletion_pool: ThreadPoolExecutor | None = None
# Per store location, the deletion of its replaced versions, until a save or wait_for_deletions()
# has seen it finish. Guarded by _deletions_lock (saves may run on several threads).
_pending_deletions: dict[str, Future[list[str]]] = {}
_deletions_lock = threading.Lock()


def _delete_in_background(backend: Backend, names: list[str]) -> None:
    """Delete ``versions/<name>`` for each name on the deletion thread (see :func:`wait_for_deletions`)."""
    global _deletion_pool

    def delete() -> list[str]:
        failures = []
        for name in names:
            try:
                backend.delete_tree(f"{VERSIONS_GROUP}/{name}")
            except OSError as exc:  # reported by the next wait for this store, in the caller's thread
                failures.append(f"removing the old version {name} failed ({exc})")
        return failures

    with _deletions_lock:
        if _deletion_pool is None:
            _deletion_pool = ThreadPoolExecutor(1, thread_name_prefix="dlearner-checkpoint-delete")
        _pending_deletions[backend.location] = _deletion_pool.submit(delete)


def wait_for_deletions(location: str | None = None) -> None:
    """Wait until the versions that earlier saves replaced are deleted: those of the store at
    ``location`` (a backend's :attr:`~dlearner.checkpoint.backends.Backend.location`), or of every
    store when ``None``.

    Every save calls it for its own store after its commit, before it lists the versions to delete
    (so at most one deletion per store is in flight, and a version is never handed over twice; the
    deletion runs while the next save writes its new version); the interpreter waits for
    the deletion thread at exit. A deletion that failed is reported here as a ``RuntimeWarning``: the
    checkpoint itself was committed, and the next save to the store retries.
    """
    with _deletions_lock:
        if location is None:
            waiting = list(_pending_deletions.items())
        else:
            waiting = [(location, _pending_deletions[location])] if location in _pending_deletions else []
    for where, future in waiting:
        failures = future.result()
        with _deletions_lock:
            if _pending_deletions.get(where) is future:
                del _pending_deletions[where]
        for failure in failures:
            warnings.warn(f"checkpoint at {where!r}: {failure}; the next save to this path retries", RuntimeWarning, stacklevel=2)


def _forget_deletions() -> None:
    # A forked child has no deletion thread: it starts its own, and waits only for its own deletions.
    global _deletion_pool, _pending_deletions, _deletions_lock
    _deletion_pool, _pending_deletions, _deletions_lock = None, {}, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_deletions)


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def read_arrays(backend: Backend, root: CommittedRoot, manifest: Manifest) -> dict[str, np.ndarray | np.generic]:
    """Every array of the committed version, keyed by its node path, each checked against the manifest."""
    where = repr(backend.display)
    version_dir = f"{VERSIONS_GROUP}/{root.version}"
    templates: dict[tuple[int, str], ArrayTemplate] = {}
    for sig in manifest.signatures():
        try:
            templates[sig] = array_template(*sig)
        except TypeError as exc:
            raise InvalidCheckpointError(f"{where}: {exc}; {CORRUPTED}") from exc
    arrays: dict[str, np.ndarray | np.generic] = {}
    totals = _CompressedTotals()

    def done(leaf: ArrayLeaf, data: np.ndarray) -> None:
        arrays[leaf.node] = data[()] if leaf.numpy_scalar else data

    leaves = [leaf for _, leaf in manifest.arrays()]

    # Each array's zarr.json, and the chunk of each array small enough to have one uncompressed chunk
    # only, a batch of arrays at a time: remote stores fetch a batch concurrently, and the first
    # missing or bad file ends the load. An uncompressed chunk is read up to its exact size (the
    # manifest's shape x itemsize, plus its 4-byte checksum), never more.
    for start in range(0, len(leaves), _READ_BATCH_ARRAYS):
        batch = leaves[start : start + _READ_BATCH_ARRAYS]
        keys: list[tuple[str, int]] = []
        for leaf in batch:
            node = f"{version_dir}/{leaf.node}"
            keys.append((f"{node}/{ZARR_JSON}", MAX_ARRAY_METADATA_BYTES))
            if _one_chunk_only(leaf):
                keys.append((f"{node}/{templates[leaf.signature].chunk_key}", leaf.nbytes + 4))
        blobs = iter(backend.read_many(keys))
        larger: list[tuple[ArrayLeaf, ChunkLayout | None]] = []  # read once their zarr.json said how they are stored
        for leaf in batch:
            node = f"{version_dir}/{leaf.node}"
            rows = _check_metadata(backend, node, leaf, templates[leaf.signature], next(blobs), where)
            if _one_chunk_only(leaf):
                done(leaf, _decode_one_chunk(node, leaf, next(blobs), where))
            elif not leaf.nbytes:
                done(leaf, np.empty(leaf.shape, dtype=leaf.dtype))  # an array with a zero-length axis has no chunk
            else:
                larger.append((leaf, rows))
        # Larger arrays in one uncompressed chunk (as format version 1 wrote them), fetched together.
        uncompressed = [leaf for leaf, layout in larger if layout is None]
        chunks = backend.read_many(
            [(f"{version_dir}/{leaf.node}/{templates[leaf.signature].chunk_key}", leaf.nbytes + 4) for leaf in uncompressed]
        )
        for leaf, chunk in zip(uncompressed, chunks):
            done(leaf, _decode_one_chunk(f"{version_dir}/{leaf.node}", leaf, chunk, where))
        for leaf, layout in larger:
            node = f"{version_dir}/{leaf.node}"
            if layout is not None and layout.compressed:
                done(leaf, _read_compressed_array(backend, node, leaf, templates[leaf.signature], layout.rows, totals, where))
            elif layout is not None:
                done(leaf, _read_chunked_array(backend, node, leaf, templates[leaf.signature], layout.rows, where))
    return arrays


def _one_chunk_only(leaf: ArrayLeaf) -> bool:
    """Whether ``leaf`` has data and is small enough that its only encoding is one uncompressed chunk."""
    return leaf.nbytes > 0 and chunk_layout(leaf.shape, leaf.dtype) is None


def _check_metadata(
    backend: Backend, node: str, leaf: ArrayLeaf, template: ArrayTemplate, meta_raw: bytes | None, where: str
) -> ChunkLayout | None:
    """The chunk layout of the array's encoding (``None``: one uncompressed chunk), from its zarr.json."""
    if meta_raw is None:
        raise InvalidCheckpointError(f"{where}: array {node} is missing; {CORRUPTED}")
    meta_key = f"{node}/{ZARR_JSON}"
    meta = _parse_json(meta_raw, meta_key, backend.display, MAX_ARRAY_METADATA_BYTES)
    # Only dlearner's own encodings are read (see check_array_metadata): another one is refused, so
    # no chunk is ever replaced by a fill value or decompressed beyond its size.
    return check_array_metadata(meta, template, leaf.shape, f"{where}: {meta_key}")


def _decode_one_chunk(node: str, leaf: ArrayLeaf, chunk: bytes | None, where: str) -> np.ndarray:
    if chunk is None:
        raise InvalidCheckpointError(f"{where}: the data of array {node} is missing; {CORRUPTED}")
    return decode_chunk(chunk, leaf.dtype, leaf.shape, leaf.crc32c, f"{where}: array {node}")


def _read_compressed_array(
    backend: Backend,
    node: str,
    leaf: ArrayLeaf,
    template: ArrayTemplate,
    rows: int,
    totals: _CompressedTotals,
    where: str,
) -> np.ndarray:
    """An array stored in compressed chunks of ``rows`` rows.

    All its chunk files are read and checked first (each up to zstd's bound for its data; checksum;
    a zstd frame that declares exactly the chunk's size), then the store's expansion limit, and only
    then is the array allocated and are the chunks decompressed, each into its exact place. The CRC32C
    of the whole data must be the manifest's: each chunk's own checksum covers its compressed bytes
    only, so this is what refuses chunks swapped within the array or moved from another one.
    """
    if leaf.crc32c is None:
        raise InvalidCheckpointError(
            f"{where}: the manifest has no crc32c for array {node}, which has compressed chunks; {CORRUPTED}"
        )
    chunk_nbytes = rows * (leaf.nbytes // leaf.shape[0])
    keys = [f"{node}/{template.chunk_key_of(i)}" for i in range(-(-leaf.shape[0] // rows))]
    limit = compressed_chunk_limit(chunk_nbytes)
    per_call = max(1, _READ_CHUNK_GROUP_BYTES // limit)
    frames: list[np.ndarray] = []
    for first in range(0, len(keys), per_call):
        group = keys[first : first + per_call]
        for key, raw in zip(group, backend.read_many([(key, limit) for key in group])):
            if raw is None:
                raise InvalidCheckpointError(f"{where}: the data of array {node} is missing ({key} not found); {CORRUPTED}")
            frames.append(check_compressed_chunk(raw, chunk_nbytes, f"{where}: {key}"))
            totals.file_bytes += len(raw)
    totals.data_bytes += leaf.nbytes
    if not totals.within_limit():
        raise InvalidCheckpointError(
            f"{where}: the compressed arrays up to {node} hold {totals.describe()}; refusing to decompress them; {CORRUPTED}"
        )

    data = np.empty(leaf.shape, leaf.dtype.newbyteorder("<"))
    flat = data.reshape(-1).view(np.uint8)

    def decompress(index: int) -> None:
        target = flat[index * chunk_nbytes : (index + 1) * chunk_nbytes]
        if target.size == chunk_nbytes:
            decompress_chunk(frames[index], target, f"{where}: {keys[index]}")
        else:  # the last chunk, padded to the full chunk shape
            padded = np.empty(chunk_nbytes, np.uint8)
            decompress_chunk(frames[index], padded, f"{where}: {keys[index]}")
            target[:] = padded[: target.size]

    run_all(shared_pool("chunk", _CHUNK_THREADS), decompress, range(len(frames)))  # the first chunk's error, in order
    if google_crc32c.value(flat) != leaf.crc32c:
        raise InvalidCheckpointError(
            f"{where}: array {node}: its chunks are intact, but together they are not the data saved for this "
            f"array (their CRC32C differs from the manifest's: chunks swapped, or moved from another array?); {CORRUPTED}"
        )
    # astype copies only for big-endian dtypes; data is written little-endian.
    return data if data.dtype == leaf.dtype else data.astype(leaf.dtype)


def _read_chunked_array(
    backend: Backend, node: str, leaf: ArrayLeaf, template: ArrayTemplate, rows: int, where: str
) -> np.ndarray:
    """An array stored in uncompressed chunks of ``rows`` rows (format version 3).

    Every chunk file must exist and hold exactly its chunk's data plus 4 bytes of CRC32C, checked
    before the array is allocated (so a manifest cannot make a reader allocate more than the store
    holds). The files are then read concurrently straight into their place in the array (the padded
    last chunk into a buffer of its own), each chunk's CRC32C checked, and finally the CRC32C of the
    whole data against the manifest's: no copy of the data besides the read itself.
    """
    if leaf.crc32c is None:
        raise InvalidCheckpointError(f"{where}: the manifest has no crc32c for array {node}, which has chunks; {CORRUPTED}")
    chunk_nbytes = rows * (leaf.nbytes // leaf.shape[0])
    keys = [f"{node}/{template.chunk_key_of(i)}" for i in range(-(-leaf.shape[0] // rows))]
    for key, size in zip(keys, backend.sizes(keys)):
        if size is None:
            raise InvalidCheckpointError(f"{where}: the data of array {node} is missing ({key} not found); {CORRUPTED}")
        if size != chunk_nbytes + 4:
            raise InvalidCheckpointError(f"{where}: {key} has {size} bytes, expected {chunk_nbytes + 4}; {CORRUPTED}")

    data = np.empty(leaf.shape, leaf.dtype.newbyteorder("<"))
    flat = data.reshape(-1).view(np.uint8)
    crcs = np.empty((len(keys), 4), np.uint8)
    targets = [flat[i * chunk_nbytes : (i + 1) * chunk_nbytes] for i in range(len(keys))]
    last = targets[-1]
    if last.size < chunk_nbytes:  # the last chunk, padded to the full chunk shape
        targets[-1] = np.empty(chunk_nbytes, np.uint8)
    backend.read_into_many([(key, [memoryview(t), memoryview(crcs[i])]) for i, (key, t) in enumerate(zip(keys, targets))])

    def check(index: int) -> None:
        check_uncompressed_chunk(targets[index], crcs[index].tobytes(), f"{where}: {keys[index]}")

    run_all(shared_pool("chunk", _CHUNK_THREADS), check, range(len(keys)))  # the first chunk's error, in order
    if last.size < chunk_nbytes:
        last[:] = targets[-1][: last.size]
    if google_crc32c.value(flat) != leaf.crc32c:
        raise InvalidCheckpointError(
            f"{where}: array {node}: its chunks are intact, but together they are not the data saved for this "
            f"array (their CRC32C differs from the manifest's: chunks swapped, or moved from another array?); {CORRUPTED}"
        )
    # astype copies only for big-endian dtypes; data is written little-endian.
    return data if data.dtype == leaf.dtype else data.astype(leaf.dtype)
