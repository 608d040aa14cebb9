"""The hand-written Zarr v3 encoder and decoder behind dlearner checkpoints.

Pure data transformations, no I/O: this module names Zarr nodes after tree keys, writes and checks
the ``zarr.json`` documents of groups and arrays, encodes and decodes the single chunk of each array,
and parses JSON documents within the limits for untrusted data (JSON values are stored by the exact
policy of :mod:`dlearner.jsonsafe`). It writes what ``zarr.create_array`` would write, byte for byte,
at a fraction of the cost (``benchmarks/checkpoint.py`` has a "zarr API" row to keep that true):
:func:`array_template` asks zarr for the metadata of a sample array once per (ndim, dtype) and checks
that our chunk encoding is identical to zarr's. :mod:`dlearner.checkpoint.manifest` lays a tree out
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
import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec

from dlearner.checkpoint.limits import MAX_JSON_DEPTH
from dlearner.jsonsafe import MalformedJSONError, from_json_exact

ZARR_JSON = "zarr.json"
"""Name of the metadata document of every Zarr v3 group and array."""

CORRUPTED = "the checkpoint is corrupted; restore from another checkpoint"
"""Ending of every message about damaged data."""

NODE_NAME = re.compile(r"[a-z0-9_.\-%~A-F]+")
"""Every name :func:`encode_key` returns matches this; manifests naming other nodes are refused."""

_SAFE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_.-")
_MAX_NAME_CHARS = 200  # file systems limit one path component to 255 bytes
_TRUNCATED_PREFIX_CHARS = 150

__all__ = [
    "CORRUPTED",
    "NODE_NAME",
    "ZARR_JSON",
    "ArrayTemplate",
    "InvalidCheckpointError",
    "array_template",
    "check_array_metadata",
    "check_json_document",
    "data_crc32c",
    "decode_chunk",
    "decode_json",
    "dimension_names",
    "encode_chunk",
    "encode_key",
    "group_doc",
    "json_bytes",
    "parse_json_document",
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
# zarr.json and for the encoding of a sample, and dlearner writes every array's zarr.json (the
# template with the real shape) and its single chunk itself. The chunk encoding is the one fixed by
# the template's codecs ("bytes" little-endian, then "crc32c"); array_template checks that our
# encoding of the sample is byte-identical to zarr's, so a zarr release that encodes differently
# fails loudly instead of producing stores that zarr reads differently.


@dataclass(frozen=True)
class ArrayTemplate:
    """What zarr writes for arrays of one (ndim, dtype), from :func:`array_template`."""

    doc: dict[str, Any]  # zarr.json for the sample shape, without "attributes" and "dimension_names"
    chunk_key: str  # key of the single chunk relative to the array node

    def doc_for(
        self, shape: tuple[int, ...], attributes: dict[str, Any] | None = None, name: str | None = None
    ) -> dict[str, Any]:
        """The ``zarr.json`` of an array of ``shape``; with ``name``, its dimension names too."""
        doc = dict(self.doc)
        doc["shape"] = list(shape)
        # Zarr requires chunk edges >= 1; an array with a zero-length axis has no chunks at all.
        doc["chunk_grid"] = {"name": "regular", "configuration": {"chunk_shape": [max(d, 1) for d in shape]}}
        if attributes is not None:
            doc["attributes"] = attributes
        if name is not None and shape:  # zarr, too, writes none for 0-d arrays
            doc["dimension_names"] = dimension_names(name, len(shape))
        return doc


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
            dimension_names=dimension_names("sample", ndim) or None,
        )
    except (ValueError, TypeError) as exc:
        # e.g. float128, which Zarr v3 has no data type for.
        raise TypeError(f"arrays of dtype {dtype} cannot be stored in a Zarr v3 checkpoint ({exc})") from exc
    array[...] = sample
    doc = json.loads(store.pop(ZARR_JSON).to_bytes())
    if len(store) != 1:
        raise RuntimeError(f"zarr {zarr.__version__} wrote chunks {sorted(store)} for a one-chunk array")
    ((chunk_key, chunk),) = store.items()
    expected_grid = {"name": "regular", "configuration": {"chunk_shape": list(sample_shape)}}
    if (
        doc.get("shape") != list(sample_shape)
        or doc.get("chunk_grid") != expected_grid
        or doc.pop("dimension_names", None) != (dimension_names("sample", ndim) or None)
    ):
        raise RuntimeError(f"zarr {zarr.__version__} wrote unexpected array metadata {doc!r}")
    if b"".join(bytes(p) for p in encode_chunk(sample)) != chunk.to_bytes():
        raise RuntimeError(
            f"zarr {zarr.__version__} encodes {dtype} chunks differently from dlearner.checkpoint; "
            "please report this (checkpoints written now might not be readable by zarr)"
        )
    doc.pop("attributes", None)
    return ArrayTemplate(doc, chunk_key)


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


def check_array_metadata(meta: Any, expected: dict[str, Any], name: str) -> None:
    """Raise :class:`InvalidCheckpointError` unless ``meta`` is what dlearner writes for this array.

    ``expected`` is :meth:`ArrayTemplate.doc_for` of the manifest's shape. Attributes and dimension
    names play no part in decoding and are ignored (checkpoints written before dimension names
    existed have none); an absent ``storage_transformers`` means none, as in the Zarr v3 spec. Any
    other difference (data type, shape, chunk grid, chunk key encoding, fill value, codecs such as
    compression) is refused rather than decoded some other way: dlearner reads its own encoding
    only, so a missing chunk can never be replaced by a fill value and nothing is decompressed.
    """
    if not isinstance(meta, dict):
        raise InvalidCheckpointError(f"{name} is not a JSON object; {CORRUPTED}")
    got = {k: v for k, v in meta.items() if k not in ("attributes", "dimension_names")}
    got.setdefault("storage_transformers", [])
    expected = {"storage_transformers": [], **expected}
    if got == expected:
        return
    if got.get("shape") != expected["shape"] or got.get("data_type") != expected["data_type"]:
        raise InvalidCheckpointError(
            f"{name} has shape {got.get('shape')!r:.80} and data type {got.get('data_type')!r:.40}, but the "
            f"manifest says {expected['shape']} and {expected['data_type']!r}; {CORRUPTED}"
        )
    differs = sorted(k for k in set(got) | set(expected) if got.get(k, _MISSING) != expected.get(k, _MISSING))
    shown = ", ".join(f"{k} {_short_json(got.get(k))} instead of {_short_json(expected.get(k))}" for k in differs)
    raise InvalidCheckpointError(
        f"{name} is not encoded the way dlearner writes arrays ({shown}); dlearner reads only its own "
        f"encoding (one uncompressed chunk, fill value 0, bytes + crc32c codecs), never another one "
        f"that could fill in missing data; {CORRUPTED}"
    )


_MISSING = object()


def _short_json(value: Any, limit: int = 100) -> str:
    text = "(absent)" if value is None else json.dumps(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _chunk_data(array: np.ndarray) -> np.ndarray:
    """The raw little-endian C-order bytes of ``array`` (a view where it already is so)."""
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).reshape(-1).view(np.uint8)


def data_crc32c(array: np.ndarray) -> int | None:
    """The CRC32C of ``array``'s chunk data (``None`` for an array without elements)."""
    return google_crc32c.value(_chunk_data(array)) if array.size else None


def encode_chunk(array: np.ndarray, crc32c: int | None = None) -> list[Any]:
    """The chunk as parts: raw little-endian C-order bytes, then their CRC32C (little-endian).

    ``crc32c``, when given, is the data's checksum computed earlier (by :func:`data_crc32c`).
    """
    data = _chunk_data(array)
    return [data, (google_crc32c.value(data) if crc32c is None else crc32c).to_bytes(4, "little")]


def decode_chunk(raw: bytes, dtype: np.dtype[Any], shape: tuple[int, ...], expected_crc32c: int | None, where: str) -> np.ndarray:
    """The array of ``dtype`` and ``shape`` from its chunk, after checking size and CRC32C; a writable copy.

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
