"""Hostile checkpoints: whatever a store holds, restoring it ends quickly in ``ValueError`` (or the state).

Every test writes a real checkpoint with ``Learner.save_to_path`` (on disk, and on ``memory://``
where the attack applies there), damages it the way an attacker could (special files, symbolic
links, compression bombs, damaged, swapped or missing compressed chunks, huge or deeply nested JSON,
millions of chunks, edited array metadata),
and checks that the restore raises ``ValueError`` naming the file and the limit, within a time bound
and, for the attacks aimed at memory, with a bounded peak of allocated memory. The learner that was
asked to restore is unchanged. The limits are in ``dlearner/checkpoint/limits.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
import tracemalloc
import uuid
import zlib
from pathlib import Path
from typing import Any, Iterator

import fsspec
import google_crc32c
import gymnasium as gym
import numcodecs.zstd
import numpy as np
import pytest

from dlearner import PPOConfig
from dlearner.checkpoint import encoding, inspect_checkpoint, layout, load_state_tree, save_state_tree
from dlearner.checkpoint.encoding import CHUNK_BYTES, compressed_chunk_limit
from dlearner.checkpoint.limits import (
    DECOMPRESSION_ALLOWANCE_BYTES,
    MAX_ARRAY_BYTES,
    MAX_ARRAY_METADATA_BYTES,
    MAX_COMPRESSION_RATIO,
    MAX_JSON_DEPTH,
    MAX_JSON_DOCUMENT_BYTES,
    MAX_KEY_CHARS,
    MAX_MANIFEST_NODES,
)

TIME_LIMIT_S = 5.0
MEMORY_LIMIT_BYTES = 200 * 2**20  # far below what each attack used to cost (GBs, or until MemoryError)
WEIGHT = "learner/rl_module/default_policy/pi.0.weight"

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX file system semantics")


# --------------------------------------------------------------------------------------------------
# A real checkpoint, and ways to look at and damage it
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def learner():
    env = gym.make("CartPole-v1")
    config = PPOConfig().training(minibatch_size=64).rl_module(model_config={"fcnet_hiddens": [8, 8]}).debugging(seed=0)
    learner = config.build_learner(env=env)
    learner.build()
    yield learner
    env.close()


@pytest.fixture
def ckpt(learner, tmp_path: Path) -> Path:
    """A learner checkpoint on disk."""
    return Path(learner.save_to_path(str(tmp_path / "ckpt")))


@pytest.fixture(params=["local", "memory"])
def location(request, learner, tmp_path: Path) -> Iterator[str]:
    """A learner checkpoint on disk or on fsspec's memory:// file system."""
    if request.param == "local":
        yield learner.save_to_path(str(tmp_path / "ckpt"))
        return
    url = learner.save_to_path(f"memory://dlearner-hostile-{uuid.uuid4().hex}/ckpt")
    yield url
    fs, root = fsspec.core.url_to_fs(url)
    fs.rm(root, recursive=True)


def _node(location: str | Path, name: str = WEIGHT) -> str:
    """The store key of an array's node (``versions/<id>/...``)."""
    return next(a["node"] for a in inspect_checkpoint(str(location))["arrays"] if a["name"] == name)


def _manifest_key(location: str | Path) -> str:
    return f"versions/{inspect_checkpoint(str(location))['version']}/zarr.json"


def _fs(location: str | Path) -> tuple[Any, str]:
    fs, root = fsspec.core.url_to_fs(str(location))
    return fs, root.rstrip("/")


def _read(location: str | Path, key: str) -> bytes:
    fs, root = _fs(location)
    return fs.cat_file(f"{root}/{key}")


def _write(location: str | Path, key: str, data: bytes) -> None:
    fs, root = _fs(location)
    fs.pipe_file(f"{root}/{key}", data)


def _edit_json(location: str | Path, key: str, edit) -> None:
    doc = json.loads(_read(location, key))
    edit(doc)
    _write(location, key, json.dumps(doc).encode())


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Fail (instead of hanging the test run) if the block takes longer; SIGALRM interrupts a blocked open()."""

    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _assert_refused(learner, location: str | Path, match: str, *, check_memory: bool = False) -> None:
    """Restoring ``location`` raises ValueError matching ``match`` within the time (and memory) bound,
    and leaves the learner as it was; so does the plain reader, load_state_tree."""
    before = learner.get_state()
    for restore in (learner.restore_from_path, load_state_tree):
        if check_memory:
            tracemalloc.start()
        start = time.perf_counter()
        try:
            with _time_limit(2 * TIME_LIMIT_S), pytest.raises(ValueError, match=match):
                restore(str(location))
        finally:
            elapsed = time.perf_counter() - start
            peak = tracemalloc.get_traced_memory()[1] if check_memory else 0
            if check_memory:
                tracemalloc.stop()
        assert elapsed < TIME_LIMIT_S, f"{restore.__name__} took {elapsed:.1f} s"
        assert peak < MEMORY_LIMIT_BYTES, f"{restore.__name__} allocated {peak / 2**20:.0f} MiB"
    _assert_same_state(learner.get_state(), before)


def _assert_same_state(actual: Any, expected: Any) -> None:
    assert type(actual) is type(expected)
    if isinstance(expected, dict):
        assert list(actual) == list(expected)
        for key in expected:
            _assert_same_state(actual[key], expected[key])
    elif isinstance(expected, np.ndarray):
        assert actual.dtype == expected.dtype and actual.tobytes() == expected.tobytes()
    else:
        assert actual == expected


# --------------------------------------------------------------------------------------------------
# Special files and symbolic links: only regular files inside the store are read
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["chunk", "array zarr.json", "manifest", "root zarr.json"])
def test_a_fifo_anywhere_is_refused_instead_of_blocking(learner, ckpt: Path, which: str) -> None:
    # Opening a FIFO for reading waits for a writer forever: this used to hang the restore.
    key = {
        "chunk": f"{_node(ckpt)}/0.0",
        "array zarr.json": f"{_node(ckpt)}/zarr.json",
        "manifest": _manifest_key(ckpt),
        "root zarr.json": "zarr.json",
    }[which]
    (ckpt / key).unlink()
    os.mkfifo(ckpt / key)
    _assert_refused(learner, ckpt, rf"{key} is a FIFO, not a regular file")


def test_a_chunk_linked_to_dev_zero_is_refused_without_reading_it(learner, ckpt: Path) -> None:
    # /dev/zero never ends: this used to read until MemoryError.
    chunk = ckpt / _node(ckpt) / "0.0"
    chunk.unlink()
    chunk.symlink_to("/dev/zero")
    _assert_refused(learner, ckpt, r"0\.0 is a symbolic link, not a regular file", check_memory=True)


def test_a_chunk_linked_to_a_file_outside_the_store_is_refused(learner, ckpt: Path, tmp_path: Path) -> None:
    # Even a link to a file with exactly the right bytes: nothing inside a store is followed.
    chunk = ckpt / _node(ckpt) / "0.0"
    outside = tmp_path / "outside"
    outside.write_bytes(chunk.read_bytes())
    chunk.unlink()
    chunk.symlink_to(outside)
    _assert_refused(learner, ckpt, r"0\.0 is a symbolic link")


def test_a_linked_directory_inside_the_store_is_refused(learner, ckpt: Path, tmp_path: Path) -> None:
    version = ckpt / _manifest_key(ckpt).rsplit("/", 1)[0]
    moved = tmp_path / "elsewhere"
    version.rename(moved)
    version.symlink_to(moved, target_is_directory=True)
    _assert_refused(learner, ckpt, rf"versions/{version.name} is a symbolic link")


def test_the_store_itself_and_a_run_folder_store_may_be_links(learner, ckpt: Path, tmp_path: Path) -> None:
    # The path the caller names is the caller's choice: only what is inside the store is untrusted.
    link = tmp_path / "link"
    link.symlink_to(ckpt, target_is_directory=True)
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint").symlink_to(ckpt, target_is_directory=True)
    expected, _ = load_state_tree(ckpt)
    for path in (link, run):
        _assert_same_state(load_state_tree(path)[0], expected)
        learner.restore_from_path(str(path))


def test_a_huge_sparse_chunk_is_refused_by_its_size_without_reading_it(learner, ckpt: Path) -> None:
    chunk = ckpt / _node(ckpt) / "0.0"
    with open(chunk, "r+b") as f:
        f.truncate(8 * 2**30)  # 8 GiB that cost no disk
    _assert_refused(learner, ckpt, r"0\.0 has 8589934592 bytes, more than the 132 bytes this file may hold", check_memory=True)


# --------------------------------------------------------------------------------------------------
# Array metadata: only dlearner's own encodings are read, so nothing is filled in, and nothing is
# decompressed but dlearner's own compressed chunks (see the next section)
# --------------------------------------------------------------------------------------------------


def test_a_gzip_bomb_behind_an_edited_codec_is_refused_without_decompressing(learner, ckpt: Path) -> None:
    # 256 MiB of zeros in 256 KiB of gzip: zarr decompressed the whole of it (4.4 GB for a bigger bomb).
    # The chunk is read only up to its declared size, and the codec is refused: nothing is decompressed.
    node = _node(ckpt)
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: the gzip container
    zeros = bytes(64 * 2**20)
    bomb = b"".join(compressor.compress(zeros) for _ in range(4)) + compressor.flush()
    assert len(bomb) < 2**19
    (ckpt / node / "0.0").write_bytes(bomb)
    _edit_json(ckpt, f"{node}/zarr.json", lambda doc: doc["codecs"].insert(1, {"name": "gzip", "configuration": {"level": 9}}))
    refused = (
        r"not encoded the way dlearner writes arrays \(codecs|0\.0 has \d+ bytes, more than the 132 bytes this file may hold"
    )
    _assert_refused(learner, ckpt, refused, check_memory=True)


def test_a_gzip_bomb_as_a_chunk_is_only_wrong_bytes(learner, ckpt: Path) -> None:
    # dlearner compresses no array this small, so a compressed chunk is just a chunk of the wrong size.
    chunk = ckpt / _node(ckpt) / "0.0"
    chunk.write_bytes(zlib.compress(bytes(2**28), 9))
    _assert_refused(learner, ckpt, r"0\.0 has \d+ bytes, more than the 132 bytes this file may hold", check_memory=True)


@pytest.mark.parametrize(
    ("field", "value", "missing_chunk"),
    [
        ("fill_value", 1.0, True),
        ("fill_value", "NaN", True),
        ("codecs", [{"name": "bytes", "configuration": {"endian": "little"}}], True),
        (
            "codecs",
            [
                {"name": "bytes", "configuration": {"endian": "little"}},
                {"name": "zstd", "configuration": {"level": 0, "checksum": False}},
            ],
            False,
        ),
        ("chunk_grid", {"name": "regular", "configuration": {"chunk_shape": [1, 1]}}, True),
        ("chunk_key_encoding", {"name": "default", "configuration": {"separator": "/"}}, False),
        ("data_type", "float64", False),
        ("shape", [4, 8], False),
        ("storage_transformers", [{"name": "sharding"}], False),
        ("zarr_format", 2, False),
    ],
)
def test_edited_array_metadata_is_refused_never_filled(
    learner, location: str, field: str, value: Any, missing_chunk: bool
) -> None:
    # Through zarr, an edited fill value or codec turned a deleted chunk into silently filled weights.
    node = _node(location)
    _edit_json(location, f"{node}/zarr.json", lambda doc: doc.__setitem__(field, value))
    if missing_chunk:
        fs, root = _fs(location)
        fs.rm_file(f"{root}/{node}/0.0")
    message = (
        "has shape .* and data type"
        if field in ("data_type", "shape")
        else rf"not encoded the way dlearner writes arrays \({field}"
    )
    _assert_refused(learner, location, message)


def test_tiny_chunks_are_refused_before_any_is_read(learner, location: str) -> None:
    # 30,000 chunks of one element: zarr took 29 s to read 10**5 before noticing anything, so ~9 s for
    # these, well past the time limit (fewer files: this test spent 11 s writing 10**5 of them).
    path = location.rstrip("/") + "-tiny"
    save_state_tree(path, {"w": np.zeros(30_000, np.float32)}, metadata={})
    node = next(a["node"] for a in inspect_checkpoint(path)["arrays"])
    _edit_json(path, f"{node}/zarr.json", lambda doc: doc["chunk_grid"]["configuration"].__setitem__("chunk_shape", [1]))
    fs, root = _fs(path)
    fs.rm_file(f"{root}/{node}/0")
    fs.pipe({f"{root}/{node}/{i}": b"\0" * 8 for i in range(30_000)})
    try:
        start = time.perf_counter()
        with pytest.raises(ValueError, match=r"not encoded the way dlearner writes arrays \(chunk_grid"):
            load_state_tree(path)
        assert time.perf_counter() - start < TIME_LIMIT_S
    finally:
        if location.startswith("memory://"):  # one by one: rm(recursive=True) is quadratic there
            for file in fs.find(root):
                fs.rm_file(file)
        else:
            shutil.rmtree(root)


# --------------------------------------------------------------------------------------------------
# Compressed chunks (arrays over 1 MiB): each checked, and decompressed only into its exact size
# --------------------------------------------------------------------------------------------------

# (6000, 256) float32: 6 MB, so in two chunks of 4096 rows (4 MiB), the second one padded. dlearner
# writes float arrays in uncompressed chunks since format version 3; ``wide_location`` writes them
# compressed, as format version 2 did (and as integer arrays still are), so that the defences of the
# compressed reader are tested on them.
WIDE = "learner/rl_module/default_policy/pi.2.weight"
WIDE_TWIN = "learner/rl_module/default_policy/vf.2.weight"  # same shape and dtype
BOMB_BYTES = 2**28


@pytest.fixture(scope="module")
def wide_learner():
    env = gym.make("CartPole-v1")
    model = {"fcnet_hiddens": [256, 6000]}
    config = PPOConfig().training(minibatch_size=64).rl_module(model_config=model).debugging(seed=0)
    learner = config.build_learner(env=env)
    learner.build()
    yield learner
    env.close()


@pytest.fixture(params=["local", "memory"])
def wide_location(request, wide_learner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A checkpoint of the wide learner, on disk or on memory://, whose WIDE array has two compressed chunks."""
    with monkeypatch.context() as patch:
        patch.setattr(encoding, "COMPRESSED_KINDS", frozenset("biufc"))  # floats compressed, as in format 2
        yield from _wide_store(request.param, wide_learner, tmp_path)


@pytest.fixture(params=["local", "memory"])
def wide_raw_location(request, wide_learner, tmp_path: Path) -> Iterator[str]:
    """A checkpoint of the wide learner whose WIDE array has two uncompressed chunks (format version 3)."""
    yield from _wide_store(request.param, wide_learner, tmp_path)


def _wide_store(where: str, wide_learner, tmp_path: Path) -> Iterator[str]:
    if where == "local":
        yield wide_learner.save_to_path(str(tmp_path / "ckpt"))
        return
    url = wide_learner.save_to_path(f"memory://dlearner-hostile-{uuid.uuid4().hex}/ckpt")
    yield url
    fs, root = _fs(url)
    for file in fs.find(root):
        fs.rm_file(file)


def _chunk(location: str, index: int, name: str = WIDE) -> str:
    return f"{_node(location, name)}/{index}.0"


def _with_crc32c(frame: bytes) -> bytes:
    """A compressed chunk file as the crc32c codec ends it: the frame, then its CRC32C."""
    return frame + google_crc32c.value(frame).to_bytes(4, "little")


def _without_content_size(frame: bytes) -> bytes:
    """The same zstd frame with its header declaring no content size, as a streaming compressor writes it."""
    descriptor = frame[4]
    assert not descriptor & 0x20 and not descriptor & 0x03, "a frame with a window descriptor and no dictionary"
    size_bytes = (0, 2, 4, 8)[descriptor >> 6]
    return frame[:4] + bytes([descriptor & 0x3F]) + frame[5:6] + frame[6 + size_bytes :]


@pytest.mark.parametrize(
    ("bomb", "message"),
    [
        # 256 MiB of zeros in 8 KiB: refused by the size its header declares, before any allocation.
        (
            "declares 256 MiB",
            rf"0\.0: the compressed chunk declares {BOMB_BYTES} bytes of data, but the chunk holds {CHUNK_BYTES}",
        ),
        # The chunk's true size in its header, and 256 MiB more behind it, in a second frame.
        ("more than it declares", rf"0\.0: the compressed chunk does not decompress to its {CHUNK_BYTES} bytes"),
        # A streamed frame, which numcodecs would decompress into a buffer that grows without bound.
        ("declares no size", r"0\.0: the compressed chunk is not a zstd frame that declares its size"),
    ],
)
def test_a_decompression_bomb_as_a_chunk_is_refused_within_its_size(
    wide_learner, wide_location: str, bomb: str, message: str
) -> None:
    zeros = numcodecs.zstd.compress(np.zeros(BOMB_BYTES, np.uint8), 1)
    frame = {
        "declares 256 MiB": zeros,
        "more than it declares": numcodecs.zstd.compress(np.zeros(CHUNK_BYTES, np.uint8), 1) + zeros,
        "declares no size": _without_content_size(zeros),
    }[bomb]
    _write(wide_location, _chunk(wide_location, 0), _with_crc32c(frame))
    _assert_refused(wide_learner, wide_location, message, check_memory=True)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("flipped byte", r"1\.0: checksum mismatch in the compressed chunk"),
        ("truncated", r"1\.0: checksum mismatch in the compressed chunk"),
        ("truncated, checksum recomputed", r"1\.0: the compressed chunk does not decompress to its \d+ bytes"),
        ("deleted", r"the data of array .*pi\.2\.weight is missing \(.*pi\.2\.weight/1\.0 not found\)"),
        ("swapped with the array's other chunk", r"pi\.2\.weight: its chunks are intact, but together they are not the data"),
        ("moved from another array", r"pi\.2\.weight: its chunks are intact, but together they are not the data"),
    ],
)
def test_a_damaged_swapped_or_missing_chunk_is_refused(wide_learner, wide_location: str, damage: str, message: str) -> None:
    chunk = _chunk(wide_location, 1)
    data = _read(wide_location, chunk)
    if damage == "flipped byte":
        _write(wide_location, chunk, data[:1000] + bytes([data[1000] ^ 0x10]) + data[1001:])
    elif damage == "truncated":
        _write(wide_location, chunk, data[: len(data) // 2])
    elif damage == "truncated, checksum recomputed":
        _write(wide_location, chunk, _with_crc32c(data[: len(data) // 2]))
    elif damage == "deleted":
        fs, root = _fs(wide_location)
        fs.rm_file(f"{root}/{chunk}")
    elif damage == "swapped with the array's other chunk":
        first = _chunk(wide_location, 0)
        _write(wide_location, chunk, _read(wide_location, first))
        _write(wide_location, first, data)
    else:
        _write(wide_location, chunk, _read(wide_location, _chunk(wide_location, 1, WIDE_TWIN)))
    _assert_refused(wide_learner, wide_location, message)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("flipped byte", r"1\.0: checksum mismatch in the chunk"),
        ("truncated", r"1\.0 has \d+ bytes, expected 4194308"),
        ("one byte more", r"1\.0 has 4194309 bytes, expected 4194308"),
        ("deleted", r"the data of array .*pi\.2\.weight is missing \(.*pi\.2\.weight/1\.0 not found\)"),
        ("swapped with the array's other chunk", r"pi\.2\.weight: its chunks are intact, but together they are not the data"),
        ("moved from another array", r"pi\.2\.weight: its chunks are intact, but together they are not the data"),
    ],
)
def test_a_damaged_swapped_or_missing_uncompressed_chunk_is_refused(
    wide_learner, wide_raw_location: str, damage: str, message: str
) -> None:
    location = wide_raw_location
    chunk = _chunk(location, 1)
    data = _read(location, chunk)
    assert len(data) == CHUNK_BYTES + 4  # the padded last chunk and its CRC32C
    if damage == "flipped byte":
        _write(location, chunk, data[:1000] + bytes([data[1000] ^ 0x10]) + data[1001:])
    elif damage == "truncated":
        _write(location, chunk, data[: len(data) // 2])
    elif damage == "one byte more":
        _write(location, chunk, data + b"\0")
    elif damage == "deleted":
        fs, root = _fs(location)
        fs.rm_file(f"{root}/{chunk}")
    elif damage == "swapped with the array's other chunk":
        first = _chunk(location, 0)
        _write(location, chunk, _read(location, first))
        _write(location, first, data)
    else:
        _write(location, chunk, _read(location, _chunk(location, 1, WIDE_TWIN)))
    _assert_refused(wide_learner, location, message, check_memory=True)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="sparse files")
def test_an_oversized_uncompressed_chunk_is_refused_by_its_size_before_allocating(wide_learner, tmp_path: Path) -> None:
    ckpt = Path(wide_learner.save_to_path(str(tmp_path / "ckpt")))
    with open(ckpt / _chunk(str(ckpt), 1), "r+b") as f:
        f.truncate(8 * 2**30)  # 8 GiB that cost no disk
    _assert_refused(wide_learner, ckpt, r"1\.0 has 8589934592 bytes, expected 4194308", check_memory=True)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="sparse files")
def test_an_oversized_compressed_chunk_is_refused_by_its_size_without_reading_it(
    wide_learner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(encoding, "COMPRESSED_KINDS", frozenset("biufc"))  # floats compressed, as in format 2
    ckpt = Path(wide_learner.save_to_path(str(tmp_path / "ckpt")))
    monkeypatch.undo()
    with open(ckpt / _chunk(str(ckpt), 1), "r+b") as f:
        f.truncate(8 * 2**30)  # 8 GiB that cost no disk
    limit = compressed_chunk_limit(CHUNK_BYTES)
    _assert_refused(
        wide_learner, ckpt, rf"1\.0 has 8589934592 bytes, more than the {limit} bytes this file may hold", check_memory=True
    )


def test_compressed_zeros_that_expand_past_the_limit_are_refused_before_allocating(location: str, monkeypatch) -> None:
    # 384 MiB of zeros are ~13 KB of chunks: a store of a few MB could otherwise make a reader allocate terabytes.
    path = location.rstrip("/") + "-zeros"
    monkeypatch.setattr(
        layout, "decompressed_bytes_allowed", lambda compressed_bytes: MAX_ARRAY_BYTES
    )  # a writer without the limit
    save_state_tree(path, {"zeros": np.zeros(384 * 2**20, np.uint8)}, metadata={})
    monkeypatch.undo()
    tracemalloc.start()
    try:
        with (
            _time_limit(2 * TIME_LIMIT_S),
            pytest.raises(ValueError, match=r"hold 402653184 bytes of data in \d+ bytes of chunk files"),
        ):
            load_state_tree(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        fs, root = _fs(path)
        for file in fs.find(root):
            fs.rm_file(file)
    assert peak < MEMORY_LIMIT_BYTES


# --------------------------------------------------------------------------------------------------
# The manifest: bounded node count, array sizes, and files examined
# --------------------------------------------------------------------------------------------------


def test_a_manifest_with_too_many_nodes_is_refused_before_reading_arrays(learner, location: str) -> None:
    def flood(doc: dict[str, Any]) -> None:
        items = doc["attributes"]["dlearner"]["tree"]["items"]
        array = {"type": "array", "node": "x", "dtype": "<f4", "shape": [1]}
        items.extend([f"junk{i}", array] for i in range(MAX_MANIFEST_NODES))

    _edit_json(location, _manifest_key(location), flood)
    _assert_refused(learner, location, rf"more than {MAX_MANIFEST_NODES} nodes \(MAX_MANIFEST_NODES\)")


def test_a_manifest_of_many_missing_arrays_is_refused_at_the_first(learner, location: str) -> None:
    def flood(doc: dict[str, Any]) -> None:
        items = doc["attributes"]["dlearner"]["tree"]["items"]
        items[:0] = [[f"junk{i}", {"type": "array", "node": f"junk{i}", "dtype": "<f4", "shape": [1]}] for i in range(50_000)]

    _edit_json(location, _manifest_key(location), flood)
    _assert_refused(learner, location, r"array versions/[0-9a-f]+/junk0 is missing")


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ([2**40], rf"declares {4 * 2**40} bytes .* more than the limit of {MAX_ARRAY_BYTES} \(MAX_ARRAY_BYTES\)"),
        ([2**62, 2**62], r"declares \d+ bytes"),
        ([1] * 65, r"invalid shape \(at most 64 axes"),
        ([True, 4], r"invalid shape"),
        ([-1, 4], r"invalid shape"),
    ],
)
def test_absurd_declared_shapes_are_refused(learner, location: str, shape: list[Any], message: str) -> None:
    def edit(doc: dict[str, Any]) -> None:
        learner_node = dict(doc["attributes"]["dlearner"]["tree"]["items"])["learner"]
        module = dict(dict(learner_node["items"])["rl_module"]["items"])["default_policy"]
        dict(module["items"])["pi.0.weight"]["shape"] = shape

    _edit_json(location, _manifest_key(location), edit)
    _assert_refused(learner, location, message, check_memory=True)


def test_a_declared_shape_larger_than_the_chunk_reads_only_the_chunk(learner, location: str) -> None:
    # The manifest says 400 MB; the chunk file has 132 bytes: read once, refused by its size.
    def edit(doc: dict[str, Any]) -> None:
        learner_node = dict(doc["attributes"]["dlearner"]["tree"]["items"])["learner"]
        module = dict(dict(learner_node["items"])["rl_module"]["items"])["default_policy"]
        dict(module["items"])["pi.0.weight"]["shape"] = [10**8]

    _edit_json(location, _manifest_key(location), edit)
    _assert_refused(learner, location, r"has shape \[8, 4\] .* manifest says \[100000000\]", check_memory=True)


# --------------------------------------------------------------------------------------------------
# JSON: size and nesting limits
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 900, 100_000])
@pytest.mark.parametrize("where", ["root zarr.json", "manifest", "array zarr.json"])
def test_deeply_nested_json_is_refused_not_a_recursion_error(learner, location: str, where: str, depth: int) -> None:
    # 100,000 levels used to raise RecursionError; 900 parse but would overflow the decoders.
    nested = json.loads(_nested(depth)) if depth < 990 else None

    def edit(doc: dict[str, Any]) -> None:
        if where == "root zarr.json":
            doc["attributes"]["dlearner"]["metadata"]["config"]["deep"] = "PLACEHOLDER"
        elif where == "manifest":
            doc["attributes"]["dlearner"]["tree"]["items"].append(["deep", {"type": "json", "value": "PLACEHOLDER"}])
        else:
            doc["attributes"]["deep"] = "PLACEHOLDER"

    key = {"root zarr.json": "zarr.json", "manifest": _manifest_key(location), "array zarr.json": f"{_node(location)}/zarr.json"}[
        where
    ]
    _edit_json(location, key, edit)
    _write(
        location,
        key,
        _read(location, key).replace(b'"PLACEHOLDER"', _nested(depth) if nested is None else json.dumps(nested).encode()),
    )
    _assert_refused(learner, location, rf"{key} nests lists and objects .*the limit of {MAX_JSON_DEPTH} \(MAX_JSON_DEPTH\)")


@pytest.mark.parametrize("which", ["root zarr.json", "manifest", "array zarr.json"])
def test_oversized_json_is_refused_without_reading_it(learner, location: str, which: str) -> None:
    key = {"root zarr.json": "zarr.json", "manifest": _manifest_key(location), "array zarr.json": f"{_node(location)}/zarr.json"}[
        which
    ]
    limit = MAX_ARRAY_METADATA_BYTES if which == "array zarr.json" else MAX_JSON_DOCUMENT_BYTES
    doc = _read(location, key)
    _write(location, key, doc[:-1] + b"," + b'"pad":"' + b"x" * (MAX_JSON_DOCUMENT_BYTES + 1) + b'"}')
    _assert_refused(
        learner, location, rf"{key} has (\d+ bytes, )?more than the {limit} bytes this file may hold", check_memory=True
    )


def test_json_with_a_huge_integer_is_refused(learner, location: str) -> None:
    key = _manifest_key(location)
    manifest = _read(location, key)
    assert b'"last_timestep",{"type":"json","value":0}' in manifest
    _write(
        location,
        key,
        manifest.replace(
            b'"last_timestep",{"type":"json","value":0}', b'"last_timestep",{"type":"json","value":' + b"9" * 100_000 + b"}"
        ),
    )
    _assert_refused(learner, location, r"is not valid JSON \(Exceeds the limit")


# --------------------------------------------------------------------------------------------------
# Saving: what readers would refuse is refused before anything is written
# --------------------------------------------------------------------------------------------------


def test_a_save_that_readers_would_refuse_is_refused_first(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    deep: Any = 0
    for _ in range(MAX_JSON_DEPTH):
        deep = [deep]
    with pytest.raises(ValueError, match=rf"cannot save: the state tree's manifest nests .* limit of {MAX_JSON_DEPTH}"):
        save_state_tree(path, {"deep": deep}, metadata={})
    with pytest.raises(ValueError, match=rf"cannot save: the metadata .* limit of {MAX_JSON_DEPTH}"):
        save_state_tree(path, {}, metadata={"deep": deep})
    with pytest.raises(ValueError, match=rf"keys are limited to {MAX_KEY_CHARS} characters"):
        save_state_tree(path, {"k" * (MAX_KEY_CHARS + 1): np.zeros(1)}, metadata={})
    with pytest.raises(ValueError, match="cannot save: the metadata .* more than the 16777216 readers accept"):
        save_state_tree(path, {}, metadata={"big": "x" * MAX_JSON_DOCUMENT_BYTES})
    assert not path.exists()


def test_a_save_whose_compressed_arrays_would_expand_past_the_limit_is_refused_before_its_commit(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    save_state_tree(path, {"zeros": np.zeros(10, np.uint8)}, metadata={"step": 1})
    zeros = np.zeros(DECOMPRESSION_ALLOWANCE_BYTES + 64 * 2**20, np.uint8)
    message = (
        rf"cannot save: the compressed arrays up to 'zeros' .* hold {zeros.nbytes} bytes of data .* more than the "
        rf"{DECOMPRESSION_ALLOWANCE_BYTES} bytes plus {MAX_COMPRESSION_RATIO}x .* store only the rows that hold data"
    )
    with pytest.raises(ValueError, match=message):
        save_state_tree(path, {"zeros": zeros}, metadata={"step": 2})
    tree, metadata = load_state_tree(path)
    assert metadata == {"step": 1} and tree["zeros"].shape == (10,)


def test_what_is_just_within_the_limits_round_trips(tmp_path: Path) -> None:
    deep: Any = 0
    for _ in range(MAX_JSON_DEPTH - 10):
        deep = [deep]
    tree = {"deep": deep, "k" * MAX_KEY_CHARS: np.arange(3)}
    save_state_tree(tmp_path / "ckpt", tree, metadata={"deep": deep})
    loaded, metadata = load_state_tree(tmp_path / "ckpt")
    assert loaded["deep"] == deep and metadata["deep"] == deep
    np.testing.assert_array_equal(loaded["k" * MAX_KEY_CHARS], np.arange(3))
