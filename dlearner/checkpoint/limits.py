"""Limits that keep reading an untrusted checkpoint bounded in time and memory.

A checkpoint is data that may come from anyone (a download, a shared run folder). Whatever a store
holds, loading it must end, quickly, in either the saved state or a ``ValueError``: never a hang, a
``MemoryError`` or a ``RecursionError``. Each limit below is far above what any checkpoint dlearner
writes needs, and :func:`dlearner.checkpoint.save_state_tree` refuses (before writing anything) a
state that would exceed one, so every checkpoint dlearner writes can be read back. Every message
about a limit names the file and the limit. The list, with the reasons, is in
``docs/checkpoint-format.md`` ("Reading untrusted checkpoints").

Limits that need no constant, because the store's own manifest bounds them:

* an array's chunk is read only up to its exact size, the manifest's shape × itemsize plus the 4 bytes
  of its CRC32C: checkpoints are never compressed, so nothing is ever decompressed;
* each array has exactly one chunk, so the files read are the root ``zarr.json``, the manifest, and
  one ``zarr.json`` and one chunk per array, at most ``2 * MAX_MANIFEST_NODES + 2`` files, and the
  first missing or bad one ends the load.
"""

from __future__ import annotations

MAX_JSON_DOCUMENT_BYTES = 16 * 2**20
"""Largest root ``zarr.json`` (metadata: config, specs, counters) and version manifest read.

A PPO learner's manifest is ~10 KiB and its metadata ~5 KiB; one with 1,000 modules stays under
2 MiB. Parsing JSON costs up to ~25x its size in Python objects (``[{},{},...]``), so 16 MiB keeps
the worst case under ~400 MB."""

MAX_ARRAY_METADATA_BYTES = 2**20
"""Largest ``zarr.json`` of one array read (dlearner's are ~600 bytes; the array's key is inside,
and tree keys are limited to :data:`MAX_KEY_CHARS`)."""

MAX_JSON_DEPTH = 128
"""Deepest nesting of lists and objects in any JSON document read.

Python's JSON parser and dlearner's decoders recurse once or more per level, so deeper documents
would raise ``RecursionError``. A learner's manifest nests ~25 levels (three per level of the state
tree)."""

MAX_MANIFEST_NODES = 100_000
"""Most nodes (dicts, arrays, JSON leaves) in one manifest: so at most ~200,000 files are read.

A PPO learner has ~40 nodes per module; 100,000 allows thousands of modules while bounding the
work before a store whose manifest lists millions of (missing) arrays is rejected."""

MAX_ARRAY_NDIM = 64
"""Most axes of a stored array (numpy's own maximum)."""

MAX_ARRAY_BYTES = 2**40
"""Largest array a manifest may declare (1 TiB). A sanity bound that keeps size arithmetic exact;
memory for array data is otherwise bounded by what the manifest declares, and each chunk file must
have exactly its declared size."""

MAX_KEY_CHARS = 65_536
"""Longest tree key saved (a key is stored in its node's ``zarr.json``, see
:data:`MAX_ARRAY_METADATA_BYTES`)."""

MAX_LISTED_ENTRIES = 1_000
"""Most directory entries looked at when saying what a path that is not a checkpoint holds."""
