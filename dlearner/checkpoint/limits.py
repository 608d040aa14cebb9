"""Limits that keep reading an untrusted checkpoint bounded in time and memory.

A checkpoint is data that may come from anyone (a download, a shared run folder). Whatever a store
holds, loading it must end, quickly, in either the saved state or a ``ValueError``: never a hang, a
``MemoryError`` or a ``RecursionError``. Each limit below is far above what any checkpoint dlearner
writes needs, and :func:`dlearner.checkpoint.save_state_tree` refuses a state that would exceed one
(before writing anything; for :data:`MAX_COMPRESSION_RATIO`, which needs the compressed sizes,
before committing), so every checkpoint dlearner writes can be read back. Every message
about a limit names the file and the limit. The list, with the reasons, is in
``docs/checkpoint-format.md`` ("Reading untrusted checkpoints").

Limits that need no constant, because the store's own manifest bounds them:

* an uncompressed chunk (of an array of at most 1 MiB, of a float array over 1 MiB, or of any array
  in format version 1) is read only up to its exact size, the manifest's shape × itemsize plus the 4
  bytes of its CRC32C, and the chunk files of a chunked array are all checked for that size before
  the array is allocated;
* a compressed chunk (integer and bool arrays over 1 MiB) is read only up to zstd's bound for its
  data (``compressed_chunk_limit``: the data's size + 1/256 + 4 bytes), and decompressed into a
  buffer of exactly its data's size, after its frame header has declared that size: a frame that
  declares another size, or holds more, is refused before anything is allocated for it;
* an array has exactly one chunk, or the chunks that its shape determines (whole rows, at most 4 MiB
  of data each unless one row is more, so each but the last holds more than 2 MiB), so the files read
  are the root ``zarr.json``, the manifest, one ``zarr.json`` and one chunk per array, and one more
  chunk per 2 MiB of chunked arrays' data; the first missing or bad one ends the load.
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
memory for array data is otherwise bounded by what the manifest declares, each uncompressed chunk
file must have exactly its declared size, and compressed data by :data:`MAX_COMPRESSION_RATIO`."""

MAX_COMPRESSION_RATIO = 1024
"""How much compressed chunks may expand, store-wide, beyond :data:`DECOMPRESSION_ALLOWANCE_BYTES`.

Uncompressed, a store can only make a reader allocate what its files hold. zstd expands up to
~32,000x (a 4 MiB chunk of zeros is ~130 bytes), so a store of a few MB could otherwise declare
terabytes. Reading, the data of the compressed arrays read so far (in manifest order) may total at
most ``DECOMPRESSION_ALLOWANCE_BYTES + MAX_COMPRESSION_RATIO * (bytes of their chunk files)``; it is
checked before an array's memory is allocated. Real data compresses far less (the float columns of
a replay buffer ~1.1x; images and boolean columns more, but not 1,000x unless mostly constant)."""

DECOMPRESSION_ALLOWANCE_BYTES = 256 * 2**20
"""Data of compressed arrays a store may hold beyond :data:`MAX_COMPRESSION_RATIO` (see there):
enough for any checkpoint up to 256 MiB of arrays whatever its content (a Pendulum replay buffer of
1M rows is 38 MB), and the most memory a store of tiny chunks can make a reader allocate beyond
:data:`MAX_COMPRESSION_RATIO` times its size."""

MAX_KEY_CHARS = 65_536
"""Longest tree key saved (a key is stored in its node's ``zarr.json``, see
:data:`MAX_ARRAY_METADATA_BYTES`)."""

MAX_LISTED_ENTRIES = 1_000
"""Most directory entries looked at when saying what a path that is not a checkpoint holds."""


def decompressed_bytes_allowed(compressed_bytes: int) -> int:
    """Most data the compressed arrays read so far may hold, when their chunk files have
    ``compressed_bytes`` bytes (see :data:`MAX_COMPRESSION_RATIO`)."""
    return DECOMPRESSION_ALLOWANCE_BYTES + MAX_COMPRESSION_RATIO * compressed_bytes
