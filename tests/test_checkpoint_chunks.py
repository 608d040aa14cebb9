"""Large arrays in checkpoints: chunks of whole rows that plain zarr reads, restored exactly.

Arrays over 1 MiB (``COMPRESS_OVER_BYTES``), such as the columns of a replay buffer or large layers,
are split along axis 0 into chunks of at most 4 MiB (``CHUNK_BYTES``). Bool and integer arrays are
stored with Zarr v3's standard codecs ``bytes``, ``zstd``, ``crc32c`` (format version 2); float and
complex arrays, which zstd hardly shrinks, with ``bytes``, ``crc32c`` (format version 3). Smaller
arrays keep the one uncompressed chunk of format version 1, and checkpoints of every older format
still load. Damaged and hostile chunks are in ``tests/test_checkpoint_hostile.py``.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any, Iterator

import fsspec
import numcodecs.zstd
import numpy as np
import pytest
import zarr

from dlearner.checkpoint import backends, encoding, inspect_checkpoint, layout, load_state_tree, save_state_tree
from dlearner.checkpoint.encoding import CHUNK_BYTES, COMPRESS_OVER_BYTES, compressed_chunk_limit

ROWS = 20 * 2**20 // 16  # 20 MiB of (ROWS, 4) float32
ROWS_PER_CHUNK = CHUNK_BYTES // 16  # whole rows of 16 bytes in 4 MiB


@pytest.fixture(params=["local", "memory"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A checkpoint path that does not exist yet: a local directory or a unique memory:// URL."""
    if request.param == "local":
        yield str(tmp_path / "ckpt")
        return
    url = f"memory://dlearner-chunks-{uuid.uuid4().hex}/ckpt"
    yield url
    fs, root = fsspec.core.url_to_fs(url)
    for file in fs.find(root):  # one by one: rm(recursive=True) is quadratic on memory://
        fs.rm_file(file)


def _column(content: str, rows: int = ROWS, dtype: Any = np.uint32) -> np.ndarray:
    """(rows, 4) of a 4-byte ``dtype``: uint32 is stored compressed, float32 in uncompressed chunks."""
    rng = np.random.default_rng(0)
    if content == "compressible":  # runs of equal values, as in a replay buffer's repeated observations
        return np.repeat(rng.integers(0, 2**32, size=(rows // 64, 4), dtype=np.uint32), 64, axis=0).view(dtype)
    return rng.integers(0, 2**32, size=(rows, 4), dtype=np.uint32).view(dtype)  # incompressible bits


def _files(location: str, node: str) -> dict[str, int]:
    """The files of an array node and their sizes."""
    fs, root = fsspec.core.url_to_fs(location)
    base = f"{root.rstrip('/')}/{node}/"
    return {path[len(base) :]: info["size"] for path, info in fs.find(base, detail=True).items()}


def _array_node(location: str, name: str) -> str:
    return next(a["node"] for a in inspect_checkpoint(location)["arrays"] if a["name"] == name)


def _zarr_json(location: str, node: str) -> dict[str, Any]:
    fs, root = fsspec.core.url_to_fs(location)
    return json.loads(fs.cat_file(f"{root.rstrip('/')}/{node}/zarr.json"))


def _format_version(location: str) -> int:
    return zarr.open_group(location, mode="r").attrs["dlearner"]["format_version"]


def _assert_same_array(actual: Any, expected: np.ndarray) -> None:
    assert type(actual) is np.ndarray and actual.dtype.str == expected.dtype.str and actual.shape == expected.shape
    assert actual.tobytes() == expected.tobytes()
    assert actual.flags.writeable and actual.flags.c_contiguous and actual.flags.owndata


# --------------------------------------------------------------------------------------------------
# Exact round trips, and what is stored
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint32, np.float32])
@pytest.mark.parametrize("content", ["compressible", "random"])
def test_a_large_array_round_trips_exactly_and_zarr_reads_the_same(location: str, content: str, dtype: Any) -> None:
    column = _column(content, dtype=dtype)
    save_state_tree(location, {"buffer": {"obs": column, "size": ROWS}}, metadata={})
    tree, _ = load_state_tree(location)
    _assert_same_array(tree["buffer"]["obs"], column)
    assert tree["buffer"]["size"] == ROWS
    by_zarr = zarr.open_group(location, mode="r")[_array_node(location, "buffer/obs")][...]
    assert by_zarr.tobytes() == column.tobytes()


@pytest.mark.parametrize("content", ["compressible", "random"])
def test_a_large_array_is_stored_as_compressed_chunks_of_whole_rows(location: str, content: str) -> None:
    save_state_tree(location, {"obs": _column(content)}, metadata={})
    node = _array_node(location, "obs")
    meta = _zarr_json(location, node)
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [ROWS_PER_CHUNK, 4]
    assert meta["codecs"] == [
        {"name": "bytes", "configuration": {"endian": "little"}},
        {"name": "zstd", "configuration": {"level": 1, "checksum": False}},
        {"name": "crc32c"},
    ]
    chunks = {key: size for key, size in _files(location, node).items() if key != "zarr.json"}
    assert sorted(chunks) == [f"{i}.0" for i in range(5)]  # 20 MiB in chunks of 4 MiB
    if content == "compressible":
        assert all(size < CHUNK_BYTES // 10 for size in chunks.values())
    else:  # incompressible data grows a little, within zstd's bound, which is the read limit
        assert all(CHUNK_BYTES < size <= compressed_chunk_limit(CHUNK_BYTES) for size in chunks.values())
    assert _format_version(location) == 2  # readers from before compressed chunks refuse it by its version


def test_float_arrays_over_1_mib_are_stored_in_uncompressed_chunks_of_whole_rows(location: str) -> None:
    column = _column("compressible", dtype=np.float32)
    save_state_tree(location, {"obs": column}, metadata={})
    node = _array_node(location, "obs")
    meta = _zarr_json(location, node)
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [ROWS_PER_CHUNK, 4]
    assert meta["codecs"] == [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]
    chunks = {key: size for key, size in _files(location, node).items() if key != "zarr.json"}
    assert chunks == {f"{i}.0": CHUNK_BYTES + 4 for i in range(5)}  # the data and its CRC32C, never compressed
    assert _format_version(location) == 3  # readers from before uncompressed chunks refuse it by its version
    _assert_same_array(load_state_tree(location)[0]["obs"], column)


@pytest.mark.parametrize("dtype", [np.uint32, np.float32])
def test_the_last_chunk_is_padded_to_the_chunk_shape_as_zarr_stores_edge_chunks(tmp_path: Path, dtype: Any) -> None:
    rows = ROWS_PER_CHUNK + 100
    column = _column("random", rows, dtype)
    save_state_tree(tmp_path / "ckpt", {"obs": column}, metadata={})
    node = _array_node(str(tmp_path / "ckpt"), "obs")
    last = (tmp_path / "ckpt" / node / "1.0").read_bytes()[:-4]  # the chunk's data (a zstd frame), without its CRC32C
    raw = numcodecs.zstd.decompress(last) if dtype == np.uint32 else last
    data = np.frombuffer(raw, dtype).reshape(-1, 4)
    assert data.shape == (ROWS_PER_CHUNK, 4)
    assert data[:100].tobytes() == column[ROWS_PER_CHUNK:].tobytes() and not data[100:].any()
    _assert_same_array(load_state_tree(tmp_path / "ckpt")[0]["obs"], column)
    assert zarr.open_array(str(tmp_path / "ckpt" / node), mode="r")[...].tobytes() == column.tobytes()


def test_arrays_up_to_1_mib_keep_one_uncompressed_chunk_and_format_version_1(location: str) -> None:
    weight = np.random.default_rng(0).standard_normal((512, 512)).astype(np.float32)  # exactly 1 MiB
    assert weight.nbytes == COMPRESS_OVER_BYTES
    save_state_tree(location, {"weight": weight}, metadata={})
    node = _array_node(location, "weight")
    assert node.endswith("/weight")  # a Zarr array of its own
    assert [codec["name"] for codec in _zarr_json(location, node)["codecs"]] == ["bytes", "crc32c"]
    assert _files(location, node)["0.0"] == weight.nbytes + 4
    assert _format_version(location) == 1
    _assert_same_array(load_state_tree(location)[0]["weight"], weight)

    one_row_more = np.vstack([weight, weight[:1]])
    save_state_tree(location, {"weight": one_row_more}, metadata={})
    node = _array_node(location, "weight")
    assert [codec["name"] for codec in _zarr_json(location, node)["codecs"]] == ["bytes", "crc32c"]
    assert _zarr_json(location, node)["chunk_grid"]["configuration"]["chunk_shape"] == [513, 512]
    assert _format_version(location) == 3
    _assert_same_array(load_state_tree(location)[0]["weight"], one_row_more)

    counts = one_row_more.view(np.int32)
    save_state_tree(location, {"counts": counts}, metadata={})
    node = _array_node(location, "counts")
    assert [codec["name"] for codec in _zarr_json(location, node)["codecs"]] == ["bytes", "zstd", "crc32c"]
    assert _format_version(location) == 2
    _assert_same_array(load_state_tree(location)[0]["counts"], counts)


def test_rows_larger_than_a_chunk_get_one_chunk_each(location: str) -> None:
    frames = np.random.default_rng(0).integers(0, 256, size=(3, 5 * 2**20), dtype=np.uint8)
    save_state_tree(location, {"frames": frames}, metadata={})
    node = _array_node(location, "frames")
    assert _zarr_json(location, node)["chunk_grid"]["configuration"]["chunk_shape"] == [1, 5 * 2**20]
    assert sorted(_files(location, node)) == ["0.0", "1.0", "2.0", "zarr.json"]
    _assert_same_array(load_state_tree(location)[0]["frames"], frames)


def test_every_dtype_byte_order_and_shape_round_trips(location: str) -> None:
    rng = np.random.default_rng(0)
    tree = {
        "big_endian": rng.standard_normal((100_000, 2, 3)).astype(">f8"),
        "terminateds": rng.random(2_000_000) < 0.01,
        "complex": (rng.standard_normal(200_000) + 1j * rng.standard_normal(200_000)).astype(np.complex64),
        "images": rng.integers(0, 4, size=(300, 84, 84), dtype=np.uint8),
        "fortran_order": np.asfortranarray(rng.standard_normal((300_000, 2))),
        "strided_view": np.arange(3_000_000, dtype=np.int64)[::2],
    }
    save_state_tree(location, tree, metadata={})
    loaded, _ = load_state_tree(location)
    for key, expected in tree.items():
        _assert_same_array(loaded[key], np.ascontiguousarray(expected))
    group = zarr.open_group(location, mode="r")
    for entry in inspect_checkpoint(location)["arrays"]:
        assert (
            group[entry["node"]][...].tobytes()
            == tree[entry["name"]].astype(tree[entry["name"]].dtype.newbyteorder("<")).tobytes()
        )


def test_large_arrays_of_format_version_1_still_load(location: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # As dlearner wrote them before compressed chunks: every array in one uncompressed chunk.
    column = _column("random", dtype=np.float32)
    monkeypatch.setattr(layout, "chunk_layout", lambda shape, dtype: None)
    save_state_tree(location, {"obs": column}, metadata={})
    monkeypatch.undo()
    node = _array_node(location, "obs")
    assert _files(location, node) == {"zarr.json": _files(location, node)["zarr.json"], "0.0": column.nbytes + 4}
    assert _format_version(location) == 1
    _assert_same_array(load_state_tree(location)[0]["obs"], column)


def test_float_arrays_of_format_version_2_still_load(location: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # As dlearner wrote them before uncompressed chunks: float arrays over 1 MiB compressed with zstd.
    column = _column("random", dtype=np.float32)
    monkeypatch.setattr(encoding, "COMPRESSED_KINDS", frozenset("biufc"))
    save_state_tree(location, {"obs": column, "small": np.arange(3.0)}, metadata={})
    monkeypatch.undo()
    node = _array_node(location, "obs")
    assert [codec["name"] for codec in _zarr_json(location, node)["codecs"]] == ["bytes", "zstd", "crc32c"]
    assert _format_version(location) == 2
    tree, _ = load_state_tree(location)
    _assert_same_array(tree["obs"], column)
    _assert_same_array(tree["small"], np.arange(3.0))


def test_chunks_read_and_written_concurrently_equal_the_original_bit_for_bit(
    location: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Many chunks per array (small chunks), arrays of both encodings and a padded last chunk, with
    # more threads than chunks in flight: every byte lands in its place.
    monkeypatch.setattr(encoding, "CHUNK_BYTES", 64 * 2**10)
    monkeypatch.setattr(backends, "IO_THREADS", 8)
    monkeypatch.setattr(backends, "_THREADED_WRITE_BYTES", 1)
    rng = np.random.default_rng(1)
    tree = {
        "floats": rng.standard_normal((300_001, 3)).astype(np.float32),
        "doubles": rng.standard_normal(200_003).astype(">f8"),
        "ints": rng.integers(0, 1000, size=(400_007, 2), dtype=np.int32),
    }
    save_state_tree(location, tree, metadata={})
    assert len(_files(location, _array_node(location, "floats"))) > 50
    loaded, _ = load_state_tree(location)
    for key, expected in tree.items():
        _assert_same_array(loaded[key], expected)


@pytest.mark.parametrize("dtype", [np.uint32, np.float32])
@pytest.mark.parametrize("location", ["memory"], indirect=True)
def test_the_chunks_of_an_array_are_fetched_in_one_request(location: str, monkeypatch: pytest.MonkeyPatch, dtype: Any) -> None:
    # Object stores fetch the keys of one read_many call concurrently.
    save_state_tree(location, {"obs": _column("random", dtype=dtype)}, metadata={})
    calls: list[list[str]] = []
    original = backends.FsspecBackend.read_many

    def recording(self: Any, keys: list[tuple[str, int]]) -> list[bytes | None]:
        calls.append([key for key, _ in keys])
        return original(self, keys)

    monkeypatch.setattr(backends.FsspecBackend, "read_many", recording)
    load_state_tree(location)
    node = _array_node(location, "obs")
    assert [f"{node}/{i}.0" for i in range(5)] in calls


def test_a_large_array_in_another_chunking_or_compression_is_refused(tmp_path: Path) -> None:
    # Even valid Zarr arrays: dlearner reads its own encodings only (see test_checkpoint_hostile.py).
    path = str(tmp_path / "ckpt")
    column = _column("compressible")
    for chunks, level, field in [((ROWS_PER_CHUNK // 2, 4), 1, "chunk_grid"), ((ROWS_PER_CHUNK, 4), 3, "codecs")]:
        save_state_tree(path, {"obs": column}, metadata={})
        node = _array_node(path, "obs")
        zarr.create_array(
            path,
            name=node,
            data=column,
            chunks=chunks,
            compressors=[zarr.codecs.ZstdCodec(level=level), zarr.codecs.Crc32cCodec()],
            chunk_key_encoding={"name": "v2", "separator": "."},
            fill_value=0,
            overwrite=True,
            zarr_format=3,
        )
        with pytest.raises(ValueError, match=rf"{node}/zarr.json is not encoded the way dlearner writes arrays \({field}"):
            load_state_tree(path)
