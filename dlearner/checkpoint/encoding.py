"""The hand-written Zarr v3 encoder and decoder behind dlearner checkpoints.

Pure data transformations, no I/O: this module names Zarr nodes after tree keys, writes and checks
the ``zarr.json`` documents of groups and arrays, encodes and decodes the chunks of each array (one
uncompressed chunk, or for arrays over :data:`COMPRESS_OVER_BYTES` chunks of about
:data:`CHUNK_BYTES`, zstd-compressed for the dtypes in :data:`COMPRESSED_KINDS`), and parses JSON documents within the limits for untrusted data (JSON values
are stored by the exact policy of :mod:`dlearner.jsonsafe`). It writes what ``zarr.create_array`` would write, byte for byte,
at a fraction of the cost (``benchmarks/checkpoint.py`` has a "zarr API" row to keep that true):
:func:`array_template` asks zarr for the metadata of a sample array once per (ndim, dtype) and checks
that our chunk encodings are identical to zarr's. :mod:`dlearner.checkpoint.manifest` lays a tree out
in nodes; :mod:`dlearner.checkpoint.layout` puts the documents and chunks in place.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import google_crc32c  # a hard dependency of zarr 3 (its crc32c codec); the same checksum, computed here
import numcodecs.zstd  # a hard dependency of zarr 3 (its zstd codec); the same compressor, called here
import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec

from dlearner.checkpoint.limits import MAX_JSON_DEPTH
from dlearner.jsonsafe import MalformedJSONError, from_json_exact

ZARR_JSON = "zarr.json"
"""Name of the metadata document of every Zarr v3 group and array."""

CORRUPTED = "the checkpoint is corrupted; restore from another checkpoint"
"""Ending of every message about damaged data."""

NODE_NAME = re.compile(r"[a-z0-9_.\-%~A-F]+")
"""Every name :func:`encode_key` returns matches this; manifests naming other nodes are refused."""

COMPRESS_OVER_BYTES = 2**20
"""Arrays of more data than this are stored in chunks of whole rows of about :data:`CHUNK_BYTES`
(compressed for the dtypes in :data:`COMPRESSED_KINDS`).

Smaller arrays keep one uncompressed chunk, exactly as format version 1 stores every array: a
model's parameters and optimizer moments (a 512x512 float32 layer is 1 MiB) are floats that hardly
compress. Every array, of any size, is a Zarr array of its own."""

CHUNK_BYTES = 4 * 2**20
"""Most data of one compressed chunk: whole rows (along axis 0) of at most this many bytes, or one row.

zstd compresses no better in larger chunks (measured on replay-buffer columns: the same ratio for 1,
4 and 16 MiB); a chunk that size costs far more to transfer than to open or fetch (a file, an object
store GET); a 40 MB buffer is still ~10 chunks that threads (de)compress in parallel; and a buffer
of GBs of images streams through memory a few chunks at a time."""

ZSTD_LEVEL = 1
"""zstd level of compressed chunks: its fastest regular level; higher ones cost 1.5-3x the time for a
few percent (no gain on float columns)."""

COMPRESSED_KINDS = frozenset("biu")
"""numpy dtype kinds whose arrays over :data:`COMPRESS_OVER_BYTES` are written zstd-compressed: bool,
signed and unsigned integers (actions, flags, uint8 images), which shrink a lot. Float and complex
arrays (weights, optimizer moments, float observations) shrink ~8% at ~3x the CPU time of writing them
(their mantissas are noise), so since format version 3 they are written in uncompressed chunks of the
same rows; readers accept either encoding for any dtype."""

_SAFE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_.-")
_MAX_NAME_CHARS = 200  # file systems limit one path component to 255 bytes
_TRUNCATED_PREFIX_CHARS = 150

__all__ = [
    "CHUNK_BYTES",
    "COMPRESSED_KINDS",
    "COMPRESS_OVER_BYTES",
    "ChunkLayout",
    "CORRUPTED",
    "NODE_NAME",
    "ZARR_JSON",
    "ArrayTemplate",
    "InvalidCheckpointError",
    "array_chunks",
    "array_template",
    "check_array_metadata",
    "check_compressed_chunk",
    "check_uncompressed_chunk",
    "check_json_document",
    "chunk_layout",
    "chunk_rows",
    "compressed_chunk_limit",
    "data_crc32c",
    "decode_chunk",
    "decode_json",
    "decompress_chunk",
    "dimension_names",
    "encode_chunk",
    "encode_compressed_chunk",
    "encode_uncompressed_chunk",
    "encode_key",
    "group_doc",
    "json_bytes",
    "parse_json_document",
    "zstd_content_size",
]


class InvalidCheckpointError(ValueError):
    """A path holds something that is not a complete, readable dlearner checkpoint.

    Subclass of ``ValueError`` so that callers can follow the API contract ("any bad checkpoint
    raises ``ValueError``") while tests and tools can tell these apart from other errors.
    """


# --------------------------------------------------------------------------------------------------
# JSON documents: values in the exact encoding of dlearner.jsonsafe, read within the limits
# --------------------------------------------------------------------------------------------------


def decode_json(value: Any, where: str) -> Any:
    """The value stored as ``value`` (see :func:`dlearner.jsonsafe.from_json_exact`), or
    :class:`InvalidCheckpointError` naming ``where`` for a malformed tag."""
    try:
        return from_json_exact(value, where)
    except MalformedJSONError as exc:
        raise InvalidCheckpointError(f"{exc}; {CORRUPTED}") from exc


# Bytes that are not JSON structure: deleting them, escapes and strings leaves only brackets.
_NOT_STRUCTURAL = bytes(b for b in range(256) if b not in b'"[]{}')


def parse_json_document(raw: bytes, name: str, max_bytes: int) -> Any:
    """``raw`` (UTF-8 JSON) parsed, within the limits for untrusted documents.

    ``name`` names the document in messages (the store and the file). Raises
    :class:`InvalidCheckpointError` for a document over ``max_bytes``, nested deeper than
    :data:`~dlearner.checkpoint.limits.MAX_JSON_DEPTH`, or not valid UTF-8 JSON.
    """
    if len(raw) > max_bytes:
        raise InvalidCheckpointError(
            f"{name} has {len(raw)} bytes, more than the limit of {max_bytes} for this document; {CORRUPTED}"
        )
    try:
        # Decoded here, not by json: json.loads also guesses UTF-16/32 from bytes, and the nesting
        # check below reads the bytes as UTF-8.
        doc = json.loads(raw.decode("utf-8"))
    except RecursionError as exc:
        # Far deeper than MAX_JSON_DEPTH: Python's parser gave up before we could count.
        raise InvalidCheckpointError(
            f"{name} nests lists and objects deeper than the limit of {MAX_JSON_DEPTH} (MAX_JSON_DEPTH); {CORRUPTED}"
        ) from exc
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, integers over 4300 digits
        raise InvalidCheckpointError(f"{name} is not valid JSON ({exc}); {CORRUPTED}") from exc
    check_json_document(raw, name)
    return doc


def check_json_document(raw: bytes, name: str) -> None:
    """Raise :class:`InvalidCheckpointError` if the valid JSON ``raw`` nests deeper than MAX_JSON_DEPTH."""
    depth = json_nesting_depth(raw)
    if depth > MAX_JSON_DEPTH:
        raise InvalidCheckpointError(
            f"{name} nests lists and objects {depth} levels deep, more than the limit of {MAX_JSON_DEPTH} "
            f"(MAX_JSON_DEPTH); {CORRUPTED}"
        )


def json_nesting_depth(raw: bytes) -> int:
    """How deep lists and objects nest in the *valid* UTF-8 JSON ``raw``, without recursion.

    Linear and in C: escaped backslashes and quotes go first (a backslash outside an escape pair
    starts one), then every byte that is not a quote or bracket, then what lies between quotes.
    """
    if raw.count(b"[") + raw.count(b"{") <= MAX_JSON_DEPTH:
        return 0  # cannot be deeper than the limit; the exact depth is not needed
    text = raw.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _NOT_STRUCTURAL)
    brackets = np.frombuffer(b"".join(text.split(b'"')[::2]), np.uint8)
    if not brackets.size:
        return 0
    # "[" and "{" have bit 0x02 set, "]" and "}" do not: +1 and -1.
    return int(np.cumsum((brackets & 2).astype(np.int32) - 1).max())


# --------------------------------------------------------------------------------------------------
# Tree keys -> Zarr node names
# --------------------------------------------------------------------------------------------------


def encode_key(key: str) -> str:
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
# Zarr metadata documents and chunk encoding
# --------------------------------------------------------------------------------------------------
#
# Creating each array through zarr's array API costs about 0.7 ms of Python per array, far more than
# a whole torch.save of a small model. So zarr is asked once per (ndim, dtype) for a template
# zarr.json and for the encoding of a sample (and once per process for compressed chunks), and
# dlearner writes every array's zarr.json (the template with the real shape) and its chunks itself.
# The chunk encodings are the ones fixed by the codecs: "bytes" little-endian then "crc32c" for one
# uncompressed chunk, and "bytes", "zstd", "crc32c" for compressed chunks; array_template and
# _compressed_codecs check that our encoding of the samples is byte-identical to zarr's, so a zarr
# release that encodes differently fails loudly instead of producing stores that zarr reads
# differently.


def chunk_rows(shape: tuple[int, ...], itemsize: int) -> int | None:
    """Rows (along axis 0) per compressed chunk of an array of this shape and itemsize, or ``None``
    for an array stored in one uncompressed chunk (at most :data:`COMPRESS_OVER_BYTES`, so also every
    0-d array and every array without elements).

    Whole rows of at most :data:`CHUNK_BYTES`, or one row where a row is larger. The last chunk is
    padded to the full chunk shape with the fill value 0, as Zarr stores edge chunks.
    """
    nbytes = math.prod(shape) * itemsize
    if nbytes <= COMPRESS_OVER_BYTES:
        return None
    return min(shape[0], max(1, CHUNK_BYTES // (nbytes // shape[0])))


@dataclass(frozen=True)
class ChunkLayout:
    """How an array over :data:`COMPRESS_OVER_BYTES` is chunked: ``rows`` per chunk (whole rows along
    axis 0, from :func:`chunk_rows`), zstd-compressed or not."""

    rows: int
    compressed: bool


def chunk_layout(shape: tuple[int, ...], dtype: np.dtype[Any]) -> ChunkLayout | None:
    """How dlearner writes an array of ``shape`` and ``dtype``: ``None`` for one uncompressed chunk
    (at most :data:`COMPRESS_OVER_BYTES`), else chunks of whole rows, compressed for the dtype kinds
    in :data:`COMPRESSED_KINDS` only."""
    rows = chunk_rows(shape, dtype.itemsize)
    return None if rows is None else ChunkLayout(rows, dtype.kind in COMPRESSED_KINDS)


def compressed_chunk_limit(chunk_nbytes: int) -> int:
    """Most bytes a compressed chunk of ``chunk_nbytes`` bytes of data may have: zstd's own bound for
    that much data (``ZSTD_COMPRESSBOUND``: incompressible data grows by ~1/256), plus the CRC32C."""
    small_input_margin = ((128 << 10) - chunk_nbytes) >> 11 if chunk_nbytes < (128 << 10) else 0
    return chunk_nbytes + (chunk_nbytes >> 8) + small_input_margin + 4


@dataclass(frozen=True)
class ArrayTemplate:
    """What zarr writes for arrays of one (ndim, dtype), from :func:`array_template`."""

    doc: dict[str, Any]  # zarr.json for the sample shape, without "attributes" and "dimension_names"
    chunk_key: str  # key of the single chunk relative to the array node (of the first one, when several)
    itemsize: int

    def doc_for(
        self,
        shape: tuple[int, ...],
        attributes: dict[str, Any] | None = None,
        name: str | None = None,
        *,
        layout: ChunkLayout | None = None,
    ) -> dict[str, Any]:
        """The ``zarr.json`` of an array of ``shape``; with ``name``, its dimension names too.

        One uncompressed chunk, or with ``layout``, chunks of ``layout.rows`` rows, zstd-compressed
        if ``layout.compressed``.
        """
        doc = dict(self.doc)
        doc["shape"] = list(shape)
        if layout is None:
            # Zarr requires chunk edges >= 1; an array with a zero-length axis has no chunks at all.
            chunk_shape = [max(d, 1) for d in shape]
        else:
            chunk_shape = [layout.rows, *shape[1:]]
            if layout.compressed:
                doc["codecs"] = _compressed_codecs()
            else:
                _check_uncompressed_chunks()
        doc["chunk_grid"] = {"name": "regular", "configuration": {"chunk_shape": chunk_shape}}
        if attributes is not None:
            doc["attributes"] = attributes
        if name is not None and shape:  # zarr, too, writes none for 0-d arrays
            doc["dimension_names"] = dimension_names(name, len(shape))
        return doc

    def chunk_key_of(self, index: int) -> str:
        """Key of the ``index``-th chunk along axis 0 (chunk key encoding ``v2`` with ``.``)."""
        return ".".join([str(index), *self.chunk_key.split(".")[1:]])


def dimension_names(name: str, ndim: int) -> list[str]:
    """The dimension names of the array node ``name``: ``["<name>.dim_0", "<name>.dim_1", ...]``.

    Unique per array: readers such as ``xarray.open_zarr`` treat equal names in one group as one
    axis, and two parameters of a layer may have axes of different lengths.
    """
    return [f"{name}.dim_{i}" for i in range(ndim)]


@lru_cache(maxsize=256)
def array_template(ndim: int, dtype_str: str) -> ArrayTemplate:
    """Ask zarr for the metadata and chunk bytes of a small sample array of this ndim and dtype."""
    dtype = np.dtype(dtype_str)
    # Small whatever ndim is, with first and last axes of different lengths so that C and Fortran
    # order differ; distinct nonzero values so the chunk is written and byte order would show.
    sample_shape = () if ndim == 0 else (3,) if ndim == 1 else (2, *(1,) * (ndim - 2), 3)
    doc, chunks = _zarr_sample(dtype, sample_shape, sample_shape, compressors=[Crc32cCodec()])
    if len(chunks) != 1:
        raise RuntimeError(f"zarr {zarr.__version__} wrote chunks {sorted(chunks)} for a one-chunk array")
    ((chunk_key, chunk),) = chunks.items()
    if b"".join(bytes(p) for p in encode_chunk(_sample(dtype, sample_shape))) != chunk:
        raise _encodes_differently(dtype)
    return ArrayTemplate(doc, chunk_key, dtype.itemsize)


@lru_cache(maxsize=1)
def _compressed_codecs() -> list[dict[str, Any]]:
    """The codecs of compressed chunks, as zarr writes them, after checking once that zarr writes a
    sample in three compressed chunks (the last one partial) byte for byte as dlearner does.

    Once, not per dtype: the zstd and crc32c codecs see only bytes, and :func:`array_template`
    checks the ``bytes`` codec of each dtype; edge chunks are padded with zeros for every dtype.
    """
    dtype, shape = np.dtype("<f4"), (5, 3)
    doc, chunks = _zarr_sample(dtype, shape, (2, 3), compressors=[ZstdCodec(level=ZSTD_LEVEL, checksum=False), Crc32cCodec()])
    template = array_template(2, dtype.str)
    expected = {**template.doc_for(shape), "chunk_grid": doc["chunk_grid"], "codecs": doc["codecs"]}
    if doc != expected:
        raise RuntimeError(f"zarr {zarr.__version__} wrote unexpected array metadata {doc!r}")
    ours = {
        template.chunk_key_of(i): b"".join(bytes(p) for p in encode_compressed_chunk(data, 2 * 3 * dtype.itemsize))
        for i, data in enumerate(array_chunks(_sample(dtype, shape), 2))
    }
    if ours != chunks:
        raise _encodes_differently(dtype)
    return doc["codecs"]


@lru_cache(maxsize=1)
def _check_uncompressed_chunks() -> None:
    """Check once that zarr writes a sample in three uncompressed chunks (the last one partial,
    padded with zeros) with the one-chunk codecs, byte for byte as dlearner does."""
    dtype, shape = np.dtype("<f4"), (5, 3)
    doc, chunks = _zarr_sample(dtype, shape, (2, 3), compressors=[Crc32cCodec()])
    template = array_template(2, dtype.str)
    if doc != {**template.doc_for(shape), "chunk_grid": doc["chunk_grid"]} or doc["codecs"] != template.doc["codecs"]:
        raise RuntimeError(f"zarr {zarr.__version__} wrote unexpected array metadata {doc!r}")
    ours = {
        template.chunk_key_of(i): b"".join(bytes(p) for p in encode_uncompressed_chunk(data, 2 * 3 * dtype.itemsize))
        for i, data in enumerate(array_chunks(_sample(dtype, shape), 2))
    }
    if ours != chunks:
        raise _encodes_differently(dtype)


def _sample(dtype: np.dtype[Any], shape: tuple[int, ...]) -> np.ndarray:
    return np.arange(1, math.prod(shape) + 1).astype(dtype).reshape(shape)


def _zarr_sample(
    dtype: np.dtype[Any], shape: tuple[int, ...], chunk_shape: tuple[int, ...], compressors: list[Any]
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The ``zarr.json`` (without attributes) and the chunks zarr writes for a sample array."""
    store: dict[str, Any] = {}
    try:
        array = zarr.create_array(
            store,
            shape=shape,
            dtype=dtype,
            chunks=chunk_shape,
            filters=None,
            serializer=BytesCodec(endian="little"),
            compressors=compressors,
            fill_value=0,
            chunk_key_encoding={"name": "v2", "separator": "."},
            zarr_format=3,
            attributes={},
            dimension_names=dimension_names("sample", len(shape)) or None,
        )
    except (ValueError, TypeError) as exc:
        # e.g. float128, which Zarr v3 has no data type for.
        raise TypeError(f"arrays of dtype {dtype} cannot be stored in a Zarr v3 checkpoint ({exc})") from exc
    array[...] = _sample(dtype, shape)
    doc = json.loads(store.pop(ZARR_JSON).to_bytes())
    expected_grid = {"name": "regular", "configuration": {"chunk_shape": list(chunk_shape)}}
    if (
        doc.get("shape") != list(shape)
        or doc.get("chunk_grid") != expected_grid
        or doc.pop("dimension_names", None) != (dimension_names("sample", len(shape)) or None)
    ):
        raise RuntimeError(f"zarr {zarr.__version__} wrote unexpected array metadata {doc!r}")
    doc.pop("attributes", None)
    return doc, {key: chunk.to_bytes() for key, chunk in store.items()}


def _encodes_differently(dtype: np.dtype[Any]) -> RuntimeError:
    return RuntimeError(
        f"zarr {zarr.__version__} encodes {dtype} chunks differently from dlearner.checkpoint; "
        "please report this (checkpoints written now might not be readable by zarr)"
    )


@lru_cache(maxsize=1)
def _group_template() -> dict[str, Any]:
    store: dict[str, Any] = {}
    zarr.create_group(store, zarr_format=3, attributes={})
    doc = json.loads(store[ZARR_JSON].to_bytes())
    doc.pop("attributes", None)
    return doc


def json_bytes(doc: dict[str, Any], *, indent: int | None = None) -> bytes:
    """``doc`` as UTF-8 JSON, compact unless ``indent`` is given."""
    # Compact by default: with ``indent`` json falls back to its pure-Python encoder, which made JSON
    # the largest cost of a save. allow_nan=False: every attribute value went through json_exact,
    # so a NaN here would be a bug.
    text = json.dumps(doc, indent=indent, separators=None if indent else (",", ":"), allow_nan=False)
    return text.encode("utf-8")


def group_doc(attributes: dict[str, Any], *, indent: int | None = None) -> bytes:
    """The ``zarr.json`` of a Zarr v3 group with these attributes."""
    return json_bytes({**_group_template(), "attributes": attributes}, indent=indent)


def check_array_metadata(meta: Any, template: ArrayTemplate, shape: tuple[int, ...], name: str) -> ChunkLayout | None:
    """Which of dlearner's encodings ``meta`` (an array's ``zarr.json``) uses, for the manifest's ``shape``.

    Returns ``None`` for one uncompressed chunk (any array; the only encoding of format version 1)
    or the :class:`ChunkLayout` of chunks of whole rows, zstd-compressed (format version 2) or not
    (version 3), only for arrays over :data:`COMPRESS_OVER_BYTES` and only in the chunk shape
    :func:`chunk_rows` gives, whatever the dtype. Raises :class:`InvalidCheckpointError` for anything
    else. Attributes and dimension names play no part in decoding and are ignored (checkpoints
    written before dimension names existed have none); an absent ``storage_transformers`` means none,
    as in the Zarr v3 spec. Any other difference (data type, shape, chunk grid, chunk key encoding,
    fill value, codecs) is refused rather than decoded some other way: dlearner reads its own
    encodings only, so a missing chunk can never be replaced by a fill value and nothing is
    decompressed but its own zstd chunks, each into a buffer of exactly its size.
    """
    if not isinstance(meta, dict):
        raise InvalidCheckpointError(f"{name} is not a JSON object; {CORRUPTED}")
    got = {k: v for k, v in meta.items() if k not in ("attributes", "dimension_names")}
    got.setdefault("storage_transformers", [])
    rows = chunk_rows(shape, template.itemsize)
    # What dlearner writes now comes last, so that the messages below compare with it.
    accepted: list[ChunkLayout | None] = [None] if rows is None else [None, ChunkLayout(rows, False), ChunkLayout(rows, True)]
    for candidate in accepted:
        expected = {"storage_transformers": [], **template.doc_for(shape, layout=candidate)}
        if got == expected:
            return candidate
    if got.get("shape") != expected["shape"] or got.get("data_type") != expected["data_type"]:
        raise InvalidCheckpointError(
            f"{name} has shape {got.get('shape')!r:.80} and data type {got.get('data_type')!r:.40}, but the "
            f"manifest says {expected['shape']} and {expected['data_type']!r}; {CORRUPTED}"
        )
    differs = sorted(k for k in set(got) | set(expected) if got.get(k, _MISSING) != expected.get(k, _MISSING))
    shown = ", ".join(f"{k} {_short_json(got.get(k))} instead of {_short_json(expected.get(k))}" for k in differs)
    raise InvalidCheckpointError(
        f"{name} is not encoded the way dlearner writes arrays ({shown}); dlearner reads only its own "
        f"encodings (one uncompressed chunk; for arrays over {COMPRESS_OVER_BYTES >> 20} MiB also chunks of whole "
        "rows, uncompressed or zstd-compressed; fill value 0, bytes + crc32c codecs), never another one that could "
        f"fill in missing data or decompress without bound; {CORRUPTED}"
    )


_MISSING = object()


def _short_json(value: Any, limit: int = 100) -> str:
    text = "(absent)" if value is None else json.dumps(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _chunk_data(array: np.ndarray) -> np.ndarray:
    """The raw little-endian C-order bytes of ``array`` (a view where it already is so)."""
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).reshape(-1).view(np.uint8)


def data_crc32c(array: np.ndarray) -> int | None:
    """The CRC32C of ``array``'s data, its raw little-endian C-order bytes (``None`` for an array
    without elements): what ends its chunk when uncompressed, and the manifest's ``crc32c``."""
    return google_crc32c.value(_chunk_data(array)) if array.size else None


def encode_chunk(array: np.ndarray, crc32c: int | None = None) -> list[Any]:
    """The one uncompressed chunk as parts: raw little-endian C-order bytes, then their CRC32C (little-endian).

    ``crc32c``, when given, is the data's checksum computed earlier (by :func:`data_crc32c`).
    """
    data = _chunk_data(array)
    return [data, (google_crc32c.value(data) if crc32c is None else crc32c).to_bytes(4, "little")]


def decode_chunk(raw: bytes, dtype: np.dtype[Any], shape: tuple[int, ...], expected_crc32c: int | None, where: str) -> np.ndarray:
    """The array of ``dtype`` and ``shape`` from its one uncompressed chunk, after checking size and
    CRC32C; a writable copy.

    ``expected_crc32c`` is the manifest's checksum of the array (``None`` where it has none).
    """
    nbytes = math.prod(shape) * dtype.itemsize
    if len(raw) != nbytes + 4:
        raise InvalidCheckpointError(
            f"{where}: array data has {len(raw)} bytes, expected {nbytes + 4} for {dtype} {shape}; {CORRUPTED}"
        )
    data = np.frombuffer(raw, dtype=np.uint8)[:-4]  # no copy; google_crc32c takes numpy buffers
    crc = int.from_bytes(raw[-4:], "little")
    if google_crc32c.value(data) != crc:
        raise InvalidCheckpointError(f"{where}: checksum mismatch in array data; {CORRUPTED}")
    if expected_crc32c is not None and crc != expected_crc32c:
        raise InvalidCheckpointError(
            f"{where}: the array data is intact but is not the data saved for this array (its checksum "
            f"differs from the manifest's; moved from another array?); {CORRUPTED}"
        )
    # astype copies, so the result is writable and owns its memory rather than viewing the bytes read.
    le_view = data.view(dtype.newbyteorder("<")).reshape(shape)
    return le_view.astype(dtype, copy=True)


# --------------------------------------------------------------------------------------------------
# Compressed chunks: bytes -> zstd -> crc32c, decompressed only into a buffer of the exact size
# --------------------------------------------------------------------------------------------------

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def array_chunks(array: np.ndarray, rows: int) -> list[np.ndarray]:
    """The data of each compressed chunk of ``rows`` rows of ``array``: raw little-endian C-order bytes
    (views where the array already is so); the last one is short where the rows do not divide evenly."""
    data = _chunk_data(array)
    step = rows * (data.size // array.shape[0])
    return [data[start : start + step] for start in range(0, data.size, step)]


def _padded(data: np.ndarray, chunk_nbytes: int) -> np.ndarray:
    """``data`` padded with zeros to ``chunk_nbytes`` (as Zarr stores edge chunks); itself if full."""
    if data.size >= chunk_nbytes:
        return data
    padded = np.zeros(chunk_nbytes, np.uint8)
    padded[: data.size] = data
    return padded


def encode_uncompressed_chunk(data: np.ndarray, chunk_nbytes: int) -> list[Any]:
    """An uncompressed chunk of several as parts: ``data`` (padded with zeros to ``chunk_nbytes``),
    then its CRC32C (little-endian). Views, not copies, except for a padded last chunk."""
    data = _padded(data, chunk_nbytes)
    return [data, google_crc32c.value(data).to_bytes(4, "little")]


def check_uncompressed_chunk(chunk: np.ndarray, stored_crc32c: bytes, where: str) -> None:
    """Raise :class:`InvalidCheckpointError` unless ``stored_crc32c`` (the 4 bytes ending the chunk
    file) is the CRC32C of ``chunk``, the chunk's data read in place."""
    if google_crc32c.value(chunk) != int.from_bytes(stored_crc32c, "little"):
        raise InvalidCheckpointError(f"{where}: checksum mismatch in the chunk; {CORRUPTED}")


def encode_compressed_chunk(data: np.ndarray, chunk_nbytes: int) -> list[bytes]:
    """A compressed chunk as parts: the zstd frame of ``data`` (padded with zeros to ``chunk_nbytes``,
    as Zarr stores edge chunks), then the frame's CRC32C (little-endian)."""
    frame = numcodecs.zstd.compress(_padded(data, chunk_nbytes), ZSTD_LEVEL)
    return [frame, google_crc32c.value(frame).to_bytes(4, "little")]


def zstd_content_size(frame: bytes | np.ndarray) -> int | None:
    """The data size the zstd frame at the start of ``frame`` declares in its header, or ``None`` where
    it declares none (a streamed frame) or is no zstd frame (RFC 8878, section 3.1.1.1)."""
    if len(frame) < 6 or bytes(frame[:4]) != _ZSTD_MAGIC:
        return None
    descriptor = int(frame[4])
    if descriptor & 0x08:  # the reserved bit: no valid frame sets it
        return None
    single_segment = (descriptor >> 5) & 1
    size_bytes = (single_segment, 2, 4, 8)[descriptor >> 6]
    start = 5 + (1 - single_segment) + (0, 1, 2, 4)[descriptor & 3]  # after the window and dictionary id
    if not size_bytes or len(frame) < start + size_bytes:
        return None
    size = int.from_bytes(bytes(frame[start : start + size_bytes]), "little")
    return size + 256 if size_bytes == 2 else size


def check_compressed_chunk(raw: bytes | bytearray, chunk_nbytes: int, where: str) -> np.ndarray:
    """The zstd frame of a compressed chunk (a uint8 view of ``raw``), after checking its CRC32C and
    that it declares exactly ``chunk_nbytes`` bytes of data; nothing is decompressed or allocated here."""
    if len(raw) < 4:
        raise InvalidCheckpointError(f"{where}: the chunk has {len(raw)} bytes, too few for its checksum; {CORRUPTED}")
    frame = np.frombuffer(raw, dtype=np.uint8)[:-4]  # no copy; google_crc32c and numcodecs take numpy buffers
    if google_crc32c.value(frame) != int.from_bytes(raw[-4:], "little"):
        raise InvalidCheckpointError(f"{where}: checksum mismatch in the compressed chunk; {CORRUPTED}")
    declared = zstd_content_size(frame)
    if declared != chunk_nbytes:
        said = "is not a zstd frame that declares its size" if declared is None else f"declares {declared} bytes of data"
        raise InvalidCheckpointError(
            f"{where}: the compressed chunk {said}, but the chunk holds {chunk_nbytes}; refusing to decompress "
            f"it (a decompression bomb, or a chunk of another array); {CORRUPTED}"
        )
    return frame


def decompress_chunk(frame: np.ndarray, out: np.ndarray, where: str) -> None:
    """Decompress a frame checked by :func:`check_compressed_chunk` into ``out`` (uint8, exactly the
    chunk's size). zstd writes at most ``out.nbytes`` bytes: a frame holding more or less data than it
    declared (more frames behind it, damaged blocks) raises :class:`InvalidCheckpointError`."""
    try:
        numcodecs.zstd.decompress(frame, out)
    except (RuntimeError, ValueError) as exc:  # numcodecs' errors for bad frames and sizes
        raise InvalidCheckpointError(
            f"{where}: the compressed chunk does not decompress to its {out.nbytes} bytes ({exc}); {CORRUPTED}"
        ) from exc
