"""The manifest of a state tree: its structure, JSON leaves, dtypes and shapes, and the Zarr node of each array.

Saving turns a state tree into a :class:`Manifest` (:func:`plan_save`, which validates the whole
tree before anything is written); the manifest is stored as JSON in the version group's attributes,
so a reader needs no directory listing. Loading parses it back (:func:`parse_manifest`, which checks
every field of what may be untrusted data) and puts the arrays read in place (:func:`build_tree`).
No I/O here: :mod:`dlearner.checkpoint.layout` reads and writes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dlearner.checkpoint.encoding import (
    CORRUPTED,
    NODE_NAME,
    InvalidCheckpointError,
    data_crc32c,
    decode_json,
    encode_key,
)
from dlearner.checkpoint.limits import MAX_ARRAY_BYTES, MAX_ARRAY_NDIM, MAX_KEY_CHARS, MAX_MANIFEST_NODES
from dlearner.jsonsafe import json_exact
from dlearner.validation import is_int

__all__ = [
    "ArrayLeaf",
    "DictNode",
    "JsonLeaf",
    "Manifest",
    "build_tree",
    "parse_manifest",
    "plan_save",
    "where_keys",
]

_ARRAY_KINDS = frozenset("biufc")  # bool, signed, unsigned, float, complex
# numpy's dtype.str of the kinds above: byte order, kind, item size ("<f4", "|b1", ">i8", "<c16").
_DTYPE_STR = re.compile(r"[<>|][biufc][0-9]{1,2}")


@dataclass
class ArrayLeaf:
    """A numpy array (or numpy scalar) of the tree and the Zarr array that holds it."""

    node: str  # Zarr path of the array, relative to the version group
    dtype: np.dtype[Any]  # exact dtype to restore (byte order included)
    shape: tuple[int, ...]
    numpy_scalar: bool  # restore as a numpy scalar rather than a 0-d array
    array: np.ndarray | None = None  # the data, when saving
    # CRC32C of the array's whole data (raw little-endian bytes, all chunks together): each chunk's
    # own checksum proves it intact, this one that the data is this array's (not another array's of
    # the same shape moved here, nor its own compressed chunks swapped). For an uncompressed array it
    # is the checksum that ends its chunk. None for arrays without elements, and in checkpoints
    # written before it was recorded (which have no compressed arrays).
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
    _arrays: list[tuple[tuple[str, ...], ArrayLeaf]] | None = field(default=None, repr=False, compare=False)

    def groups(self) -> Iterator[tuple[tuple[str, ...], DictNode]]:
        for keys, node in self.root.walk():
            if isinstance(node, DictNode):
                yield keys, node

    def arrays(self) -> list[tuple[tuple[str, ...], ArrayLeaf]]:
        """``(keys, leaf)`` of every array, in tree order (computed once: saving and loading ask often)."""
        if self._arrays is None:
            self._arrays = [(keys, node) for keys, node in self.root.walk() if isinstance(node, ArrayLeaf)]
        return self._arrays

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
            child: DictNode | ArrayLeaf | JsonLeaf = _plan_dict(value, _child_node(node, key, used_names, child_where), keys)
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
                crc32c=data_crc32c(value),
            )
        elif isinstance(value, np.generic):
            _check_array_dtype(value.dtype, child_where)
            child = ArrayLeaf(
                node=_child_node(node, key, used_names, child_where),
                dtype=value.dtype,
                shape=(),
                numpy_scalar=True,
                array=np.asarray(value),
                crc32c=data_crc32c(np.asarray(value)),
            )
        else:
            child = JsonLeaf(json_exact(value, child_where))
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
            f"array of dtype {dtype} at {where}: only bool and numeric (int, uint, float, complex) arrays can be stored"
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
        if not isinstance(raw, str) or not all(NODE_NAME.fullmatch(part) and part not in (".", "..") for part in raw.split("/")):
            raise bad(f"invalid node path {raw!r}")
        return raw

    def too_many_nodes() -> InvalidCheckpointError:
        return InvalidCheckpointError(
            f"{where}: the manifest lists more than {MAX_MANIFEST_NODES} nodes (MAX_MANIFEST_NODES); refusing to read it"
        )

    def parse(obj: Any, *, root: bool = False) -> DictNode | ArrayLeaf | JsonLeaf:
        nonlocal num_nodes
        num_nodes += 1
        if num_nodes > MAX_MANIFEST_NODES:
            raise too_many_nodes()
        if not isinstance(obj, dict) or "type" not in obj:
            raise bad(f"expected a node object, got {obj!r:.80}")
        kind = obj["type"]
        if kind == "dict":
            items = obj.get("items")
            if not isinstance(items, list):
                raise bad("dict node without an items list")
            if num_nodes + len(items) > MAX_MANIFEST_NODES:
                raise too_many_nodes()  # before validating a flood of items one by one
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
                isinstance(raw_shape, list) and len(raw_shape) <= MAX_ARRAY_NDIM and all(is_int(d) and d >= 0 for d in raw_shape)
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
            if crc is not None and not (is_int(crc) and 0 <= crc < 2**32):
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
