"""The hand-written Zarr v3 encoder and decoder behind dlearner checkpoints.

Pure data transformations, no I/O: this module turns a state tree into a *manifest* (the tree's
structure, JSON leaves, dtypes and shapes, and the Zarr node that holds each array), encodes JSON
values exactly, encodes tree keys as Zarr node names, and writes/reads the ``zarr.json`` documents
and single chunks of arrays. It writes what ``zarr.create_array`` would write, byte for byte, at a
fraction of the cost (``benchmarks/checkpoint.py`` has a "zarr API" row to keep that true);
:func:`array_template` asks zarr for the metadata of a sample array once per (ndim, dtype) and checks
that our chunk encoding is identical to zarr's. :mod:`dlearner.checkpoint.store` moves the bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import google_crc32c  # a hard dependency of zarr 3 (its crc32c codec); the same checksum, computed here
import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec

from dlearner.checkpoint.limits import (
    MAX_ARRAY_BYTES,
    MAX_ARRAY_NDIM,
    MAX_JSON_DEPTH,
    MAX_KEY_CHARS,
    MAX_MANIFEST_NODES,
)

ZARR_JSON = "zarr.json"
"""Name of the metadata document of every Zarr v3 group and array."""

CORRUPTED = "the checkpoint is corrupted; restore from another checkpoint"
"""Ending of every message about damaged data."""

# Output alphabet of encode_key (see there); used to reject manifests that point outside the store.
_NODE_NAME = re.compile(r"[a-z0-9_.\-%~A-F]+")
_SAFE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_.-")
_MAX_NAME_CHARS = 200  # file systems limit one path component to 255 bytes
_TRUNCATED_PREFIX_CHARS = 150
_MAX_EXACT_JSON_INT = 2**53 - 1  # larger ints are stored as strings so non-Python readers stay exact
_ARRAY_KINDS = frozenset("biufc")  # bool, signed, unsigned, float, complex
# numpy's dtype.str of the kinds above: byte order, kind, item size ("<f4", "|b1", ">i8", "<c16").
_DTYPE_STR = re.compile(r"[<>|][biufc][0-9]{1,2}")

__all__ = [
    "CORRUPTED",
    "ZARR_JSON",
    "ArrayLeaf",
    "ArrayTemplate",
    "DictNode",
    "InvalidCheckpointError",
    "JsonLeaf",
    "Manifest",
    "array_template",
    "build_tree",
    "check_array_metadata",
    "check_json_document",
    "decode_chunk",
    "decode_json",
    "dimension_names",
    "encode_chunk",
    "encode_json",
    "encode_key",
    "group_doc",
    "json_bytes",
    "parse_json_document",
    "parse_manifest",
    "plan_save",
    "where_keys",
]


class InvalidCheckpointError(ValueError):
    """A path holds something that is not a complete, readable dlearner checkpoint.

    Subclass of ``ValueError`` so that callers can follow the API contract ("any bad checkpoint
    raises ``ValueError``") while tests and tools can tell these apart from other errors.
    """



# --------------------------------------------------------------------------------------------------
# JSON values: an exact, unambiguous encoding into plain JSON
# --------------------------------------------------------------------------------------------------
#
# Plain JSON cannot hold nan/inf, tuples, or (for non-Python readers) ints beyond 2**53, and it has
# nothing for numpy scalars. Such values become single-key "tag" objects whose key starts with "$".
# A dict that itself has a key starting with "$" is wrapped as {"$dict": [[k, v], ...]} so that no
# user dict is ever mistaken for a tag. Everything else is stored as is, so ordinary configs stay
# readable in zarr.json.


def encode_json(value: Any, where: str) -> Any:
    """``value`` in the tagged JSON encoding; ``TypeError`` naming ``where`` for what JSON cannot hold."""
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
        return [encode_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return {"$tuple": [encode_json(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, dict):
        for k in value:
            if not isinstance(k, str):
                raise TypeError(
                    f"dict key {k!r} ({type(k).__name__}) at {where}: JSON dict keys must be str; "
                    "convert the keys with str() before saving"
                )
        if any(k.startswith("$") for k in value):
            return {"$dict": [[k, encode_json(v, f"{where}/{k}")] for k, v in value.items()]}
        return {k: encode_json(v, f"{where}/{k}") for k, v in value.items()}
    if isinstance(value, np.ndarray):
        raise TypeError(
            f"numpy array at {where}: arrays are only supported as dict values, not inside lists, "
            "tuples or metadata; put them in a dict with str keys"
        )
    raise TypeError(_unsupported_type_message(value, where))


def decode_json(value: Any, where: str) -> Any:
    """Inverse of :func:`encode_json`; :class:`InvalidCheckpointError` naming ``where`` for malformed tags."""
    if isinstance(value, list):
        return [decode_json(v, where) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        ((tag, payload),) = value.items()
        if tag.startswith("$"):
            return _decode_tag(tag, payload, where)
    elif any(k.startswith("$") for k in value):
        raise InvalidCheckpointError(f"{where}: malformed JSON value (unknown tagged object {value!r})")
    return {k: decode_json(v, where) for k, v in value.items()}


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
            return tuple(decode_json(v, where) for v in payload)
        if tag == "$dict":
            out = {}
            for k, v in payload:
                if not isinstance(k, str):
                    raise ValueError(f"key {k!r}")
                out[k] = decode_json(v, where)
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
            f"{CORRUPTED}"
        ) from exc
    raise InvalidCheckpointError(f"{where}: unknown tagged JSON value {tag!r}; {CORRUPTED}")


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
# The manifest: the tree's structure, JSON leaves, and where each array lives
# --------------------------------------------------------------------------------------------------


@dataclass
class ArrayLeaf:
    """A numpy array (or numpy scalar) of the tree and the Zarr array that holds it."""

    node: str  # Zarr path of the array, relative to the version group
    dtype: np.dtype[Any]  # exact dtype to restore (byte order included)
    shape: tuple[int, ...]
    numpy_scalar: bool  # restore as a numpy scalar rather than a 0-d array
    array: np.ndarray | None = None  # the data, when saving
    # CRC32C of the chunk's data, kept in the manifest too: the chunk's own checksum proves it is
    # intact, this one that it is this array's (not another array's of the same shape, moved here).
    # None for arrays without elements, and in checkpoints written before it was recorded.
    crc32c: int | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def signature(self) -> tuple[int, str]:
        # Data is always stored little-endian; big-endian input is swapped on write and back on read.
        return len(self.shape), self.dtype.newbyteorder("<").str

    def to_json(self) -> dict[str, Any]:
        if self.numpy_scalar:
            doc = {"type": "numpy_scalar", "node": self.node, "dtype": self.dtype.str}
        else:
            doc = {"type": "array", "node": self.node, "dtype": self.dtype.str, "shape": list(self.shape)}
        if self.crc32c is not None:
            doc["crc32c"] = self.crc32c
        return doc


@dataclass
class DictNode:
    """A dict of the tree and the Zarr group that holds it."""

    node: str  # Zarr path of the group, relative to the version group ("" for the version group)
    items: list[tuple[str, DictNode | ArrayLeaf | JsonLeaf]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"type": "dict", "node": self.node, "items": [[k, v.to_json()] for k, v in self.items]}

    def walk(self, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
        """Yield ``(keys, node)`` for every node below this one, depth first, in key order."""
        for key, child in self.items:
            keys = (*prefix, key)
            yield keys, child
            if isinstance(child, DictNode):
                yield from child.walk(keys)


@dataclass
class JsonLeaf:
    """A JSON leaf of the tree; it lives in the manifest only."""

    encoded: Any  # already in the tagged JSON encoding

    def to_json(self) -> dict[str, Any]:
        return {"type": "json", "value": self.encoded}


@dataclass
class Manifest:
    """The whole tree's structure, as stored in the version group's attributes."""

    root: DictNode

    def groups(self) -> Iterator[tuple[tuple[str, ...], DictNode]]:
        for keys, node in self.root.walk():
            if isinstance(node, DictNode):
                yield keys, node

    def arrays(self) -> Iterator[tuple[tuple[str, ...], ArrayLeaf]]:
        for keys, node in self.root.walk():
            if isinstance(node, ArrayLeaf):
                yield keys, node

    def leaves(self) -> Iterator[tuple[tuple[str, ...], ArrayLeaf | Any]]:
        """Arrays as :class:`ArrayLeaf`, JSON leaves decoded, in tree order."""
        for keys, node in self.root.walk():
            if isinstance(node, ArrayLeaf):
                yield keys, node
            elif isinstance(node, JsonLeaf):
                yield keys, decode_json(node.encoded, "/".join(keys))

    def signatures(self) -> set[tuple[int, str]]:
        return {leaf.signature for _, leaf in self.arrays()}


def plan_save(tree: dict[str, Any]) -> Manifest:
    """Validate ``tree`` and lay it out; raises before anything is written."""
    return Manifest(_plan_dict(tree, node="", where=()))


def _plan_dict(tree: dict[str, Any], node: str, where: tuple[str, ...]) -> DictNode:
    result = DictNode(node)
    used_names: dict[str, str] = {}
    for key, value in tree.items():
        if not isinstance(key, str):
            raise TypeError(
                f"tree key {key!r} ({type(key).__name__}) at {where_keys(where)}: keys must be str; "
                "convert them with str() before saving"
            )
        if not key:
            raise ValueError(f"empty tree key at {where_keys(where)}: keys must be non-empty strings")
        if len(key) > MAX_KEY_CHARS:
            raise ValueError(
                f"tree key of {len(key)} characters at {where_keys(where)}: keys are limited to "
                f"{MAX_KEY_CHARS} characters (MAX_KEY_CHARS)"
            )
        keys = (*where, key)
        child_where = where_keys(keys)
        if isinstance(value, dict):
            child: DictNode | ArrayLeaf | JsonLeaf = _plan_dict(
                value, _child_node(node, key, used_names, child_where), keys
            )
        elif isinstance(value, np.ndarray):
            if type(value) is not np.ndarray:
                raise TypeError(
                    f"{type(value).__qualname__} at {child_where}: only plain numpy arrays can be "
                    "stored; convert with np.asarray() if dropping the subclass is intended"
                )
            _check_array_dtype(value.dtype, child_where)
            child = ArrayLeaf(
                node=_child_node(node, key, used_names, child_where),
                dtype=value.dtype,
                shape=tuple(int(d) for d in value.shape),
                numpy_scalar=False,
                array=value,
                crc32c=_data_crc32c(value),
            )
        elif isinstance(value, np.generic):
            _check_array_dtype(value.dtype, child_where)
            child = ArrayLeaf(
                node=_child_node(node, key, used_names, child_where),
                dtype=value.dtype,
                shape=(),
                numpy_scalar=True,
                array=np.asarray(value),
                crc32c=_data_crc32c(np.asarray(value)),
            )
        else:
            child = JsonLeaf(encode_json(value, child_where))
        result.items.append((key, child))
    return result


def _child_node(parent: str, key: str, used: dict[str, str], where: str) -> str:
    name = encode_key(key)
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


def where_keys(keys: tuple[str, ...]) -> str:
    """A tree position for messages: ``'a/b'`` or ``the tree root``."""
    return repr("/".join(keys)) if keys else "the tree root"


def parse_manifest(doc: Any, where: str) -> Manifest:
    """Turn the manifest JSON of a version group back into nodes, validating as we go."""

    def bad(msg: str) -> InvalidCheckpointError:
        return InvalidCheckpointError(f"{where}: malformed manifest ({msg}); {CORRUPTED}")

    num_nodes = 0

    def node_path(raw: Any, *, root: bool = False) -> str:
        if root and raw == "":
            return ""
        if not isinstance(raw, str) or not all(
            _NODE_NAME.fullmatch(part) and part not in (".", "..") for part in raw.split("/")
        ):
            raise bad(f"invalid node path {raw!r}")
        return raw

    def parse(obj: Any, *, root: bool = False) -> DictNode | ArrayLeaf | JsonLeaf:
        nonlocal num_nodes
        num_nodes += 1
        if num_nodes > MAX_MANIFEST_NODES:
            raise InvalidCheckpointError(
                f"{where}: the manifest lists more than {MAX_MANIFEST_NODES} nodes (MAX_MANIFEST_NODES); "
                "refusing to read it"
            )
        if not isinstance(obj, dict) or "type" not in obj:
            raise bad(f"expected a node object, got {obj!r:.80}")
        kind = obj["type"]
        if kind == "dict":
            items = obj.get("items")
            if not isinstance(items, list):
                raise bad("dict node without an items list")
            node = DictNode(node_path(obj.get("node"), root=root))
            for item in items:
                if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str) and item[0]):
                    raise bad(f"invalid dict item {item!r:.80}")
                node.items.append((item[0], parse(item[1])))
            return node
        if kind in ("array", "numpy_scalar"):
            raw_dtype = obj.get("dtype")
            raw_shape = [] if kind == "numpy_scalar" else obj.get("shape")
            # Only the dtype strings dlearner writes (numpy's dtype.str of bool and numeric types):
            # np.dtype() of arbitrary JSON could build structured or object dtypes.
            if not (isinstance(raw_dtype, str) and _DTYPE_STR.fullmatch(raw_dtype)):
                raise bad(f"array node {obj!r:.80}: invalid dtype {raw_dtype!r:.40}")
            if not (
                isinstance(raw_shape, list)
                and len(raw_shape) <= MAX_ARRAY_NDIM
                and all(type(d) is int and d >= 0 for d in raw_shape)
            ):
                raise bad(f"array node {obj!r:.80}: invalid shape (at most {MAX_ARRAY_NDIM} axes of ints >= 0)")
            try:
                dtype = np.dtype(raw_dtype)
            except TypeError as exc:
                raise bad(f"array node {obj!r:.80}: {exc}") from exc
            if dtype.kind not in _ARRAY_KINDS or dtype.str != raw_dtype:
                raise bad(f"array node with dtype {raw_dtype!r}")
            shape = tuple(raw_shape)
            crc = obj.get("crc32c")
            if crc is not None and not (type(crc) is int and 0 <= crc < 2**32):
                raise bad(f"array node {obj!r:.80}: invalid crc32c {crc!r:.40}")
            leaf = ArrayLeaf(node_path(obj.get("node")), dtype, shape, kind == "numpy_scalar", crc32c=crc)
            if leaf.nbytes > MAX_ARRAY_BYTES:
                raise InvalidCheckpointError(
                    f"{where}: array {leaf.node} declares {leaf.nbytes} bytes ({dtype} {shape}), more than "
                    f"the limit of {MAX_ARRAY_BYTES} (MAX_ARRAY_BYTES); {CORRUPTED}"
                )
            return leaf
        if kind == "json":
            if "value" not in obj:
                raise bad("json node without a value")
            return JsonLeaf(obj["value"])
        raise bad(f"unknown node type {kind!r}")

    root_node = parse(doc, root=True)
    if not isinstance(root_node, DictNode):
        raise bad("the tree root is not a dict node")
    return Manifest(root_node)


def build_tree(node: DictNode, arrays: dict[str, np.ndarray | np.generic], where: tuple[str, ...]) -> dict[str, Any]:
    """The state tree of a manifest, with the arrays read (keyed by node path) put in place."""
    out: dict[str, Any] = {}
    for key, child in node.items:
        keys = (*where, key)
        if isinstance(child, DictNode):
            out[key] = build_tree(child, arrays, keys)
        elif isinstance(child, ArrayLeaf):
            out[key] = arrays[child.node]
        else:
            out[key] = decode_json(child.encoded, where_keys(keys))
    return out


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
    # the largest cost of a save. allow_nan=False: every attribute value went through encode_json,
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


def _data_crc32c(array: np.ndarray) -> int | None:
    return google_crc32c.value(_chunk_data(array)) if array.size else None


def encode_chunk(array: np.ndarray, crc32c: int | None = None) -> list[Any]:
    """The chunk as parts: raw little-endian C-order bytes, then their CRC32C (little-endian).

    ``crc32c``, when given, is the data's checksum computed earlier (by :func:`plan_save`).
    """
    data = _chunk_data(array)
    return [data, (google_crc32c.value(data) if crc32c is None else crc32c).to_bytes(4, "little")]


def decode_chunk(raw: bytes, leaf: ArrayLeaf, where: str) -> np.ndarray:
    """The array of ``leaf`` from its chunk, after checking size and CRC32C; a writable copy."""
    if len(raw) != leaf.nbytes + 4:
        raise InvalidCheckpointError(
            f"{where}: array data has {len(raw)} bytes, expected {leaf.nbytes + 4} for "
            f"{leaf.dtype} {leaf.shape}; {CORRUPTED}"
        )
    data = np.frombuffer(raw, dtype=np.uint8)[:-4]  # no copy; google_crc32c takes numpy buffers
    crc = int.from_bytes(raw[-4:], "little")
    if google_crc32c.value(data) != crc:
        raise InvalidCheckpointError(f"{where}: checksum mismatch in array data; {CORRUPTED}")
    if leaf.crc32c is not None and crc != leaf.crc32c:
        raise InvalidCheckpointError(
            f"{where}: the array data is intact but is not the data saved for this array (its checksum "
            f"differs from the manifest's; moved from another array?); {CORRUPTED}"
        )
    # astype copies, so the result is writable and owns its memory rather than viewing the bytes read.
    le_view = data.view(leaf.dtype.newbyteorder("<")).reshape(leaf.shape)
    return le_view.astype(leaf.dtype, copy=True)

