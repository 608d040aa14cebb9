"""Tests of the checkpoint storage layer (dlearner.checkpoint.store, .encoding, .inspect) on real Zarr stores.

Most behavioural tests run both on a local directory (pytest's tmp_path) and on fsspec's process-global
``memory://`` file system under a unique name.
"""

from __future__ import annotations

import errno
import json
import math
import os
import pickle
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest
import zarr

from dlearner.checkpoint import (
    FORMAT_NAME,
    FORMAT_VERSION,
    RUN_STORE_DIRNAME,
    InvalidCheckpointError,
    backends,
    encoding,
    format_inspection,
    inspect_checkpoint,
    layout,
    load_state_tree,
    read_metadata,
    resolve_checkpoint_path,
    save_state_tree,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
METADATA = {"kind": "Learner", "class": "dlearner.algorithms.ppo.PPOTorchLearner", "config": {"lr": 3e-4}}


# --------------------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------------------


@pytest.fixture(params=["local", "memory"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """A checkpoint path that does not exist yet: a local directory or a unique memory:// URL."""
    if request.param == "local":
        yield str(tmp_path / "ckpt")
        return
    url = f"memory://dlearner-test-{uuid.uuid4().hex}/ckpt"
    yield url
    fs, root = fsspec.core.url_to_fs(url)
    if fs.exists(root):
        fs.rm(root, recursive=True)


def _keys(path: str, prefix: str = "") -> list[str]:
    """Every file key below ``path`` (local or fsspec), relative to it."""
    fs, root = fsspec.core.url_to_fs(path)
    base = root.rstrip("/") + "/"
    return sorted(p[len(base) :] for p in fs.find(root + ("/" + prefix if prefix else "")))


def _cat(path: str, key: str) -> bytes:
    fs, root = fsspec.core.url_to_fs(path)
    return fs.cat_file(f"{root.rstrip('/')}/{key}")


def _pipe(path: str, key: str, data: bytes) -> None:
    fs, root = fsspec.core.url_to_fs(path)
    full = f"{root.rstrip('/')}/{key}"
    if "://" not in path:
        fs.makedirs(os.path.dirname(full), exist_ok=True)
    fs.pipe_file(full, data)


def _rm(path: str, key: str) -> None:
    fs, root = fsspec.core.url_to_fs(path)
    fs.rm(f"{root.rstrip('/')}/{key}", recursive=True)


def _root_attrs(path: str) -> dict[str, Any]:
    return json.loads(_cat(path, "zarr.json"))["attributes"]["dlearner"]


def _versions(path: str) -> set[str]:
    """The version folders in the store, once the background deletion of replaced ones has finished."""
    layout.wait_for_deletions()
    return {k.split("/")[1] for k in _keys(path, "versions") if re.fullmatch(r"versions/[0-9a-f]{32}/.*", k)}


def _assert_same(actual: Any, expected: Any, where: str = "tree") -> None:
    """Exact equality: same types, dtypes, shapes and bytes; floats compared bit for bit; key order."""
    assert type(actual) is type(expected), f"{where}: {type(actual)} != {type(expected)}"
    if isinstance(expected, np.ndarray):
        assert actual.dtype == expected.dtype and actual.dtype.str == expected.dtype.str, where
        assert actual.shape == expected.shape, where
        assert actual.tobytes() == expected.tobytes(), where
        assert actual.flags.writeable and actual.flags.c_contiguous, where
    elif isinstance(expected, np.generic):
        assert actual.dtype == expected.dtype and actual.tobytes() == expected.tobytes(), where
    elif isinstance(expected, dict):
        assert list(actual) == list(expected), f"{where}: keys {list(actual)} != {list(expected)}"
        for k in expected:
            _assert_same(actual[k], expected[k], f"{where}/{k}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            _assert_same(a, e, f"{where}[{i}]")
    elif isinstance(expected, float):
        assert (math.isnan(actual) and math.isnan(expected)) or (
            actual == expected and math.copysign(1, actual) == math.copysign(1, expected)
        ), where
    else:
        assert actual == expected, where


def _learner_like_tree(value: float = 1.0) -> dict[str, Any]:
    rng = np.random.default_rng(int(value * 1000))
    return {
        "rl_module": {
            "default_policy": {
                "pi.0.weight": rng.standard_normal((16, 4)).astype(np.float32) * value,
                "pi.0.bias": np.full((16,), value, np.float32),
            }
        },
        "optimizer": {
            "default_policy_default_optimizer": {
                "state": {"0": {"exp_avg": np.zeros((16, 4), np.float32), "step": np.array(value)}},
                "param_groups": [{"lr": 3e-4 * value, "betas": (0.9, 0.999), "params": [0]}],
            }
        },
        "counters": {"num_env_steps_trained": int(value * 100)},
    }


def _full_tree() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    return {
        "arrays": {
            "f32": rng.standard_normal((3, 5)).astype(np.float32),
            "f64": rng.standard_normal(7),
            "f16": rng.standard_normal(4).astype(np.float16),
            "i64": rng.integers(-(2**62), 2**62, size=(2, 3), dtype=np.int64),
            "i32": rng.integers(-(2**31), 2**31 - 1, size=9, dtype=np.int32),
            "i8": np.array([-128, 0, 127], np.int8),
            "u8": rng.integers(0, 256, size=(4, 4), dtype=np.uint8),
            "u64": np.array([0, 2**64 - 1], np.uint64),
            "bool": np.array([[True, False], [False, True]]),
            "c64": (rng.standard_normal(3) + 1j * rng.standard_normal(3)).astype(np.complex64),
            "special_floats": np.array([np.nan, np.inf, -np.inf, -0.0, 5e-324, 1e308], np.float64),
            "big_endian": np.arange(5, dtype=">i4"),
            "fortran_order": np.asfortranarray(rng.standard_normal((3, 4)).astype(np.float32)),
            "strided_view": np.arange(20, dtype=np.int64)[::3],
            "five_d": rng.standard_normal((2, 3, 1, 4, 2)).astype(np.float32),
            "many_unit_axes": np.full((1,) * 32, 7, np.uint8),
            "zero_d": np.array(3.25, np.float32),
            "zero_d_int": np.array(-7, np.int64),
            "empty": np.zeros((0,), np.float32),
            "empty_2d": np.zeros((0, 4), np.float64),
            "all_zero": np.zeros((64, 64), np.float32),
            "all_zero_bool": np.zeros(10, bool),
            "all_zero_0d": np.array(0, np.int32),
        },
        "scalars": {"np_f32": np.float32(1.5), "np_i64": np.int64(-3), "np_bool": np.bool_(True)},
        "json": {
            "none": None,
            "bools": [True, False],
            "huge_int": 2**127 + 12345,
            "negative_huge_int": -(2**200),
            "limit_int": 2**53 - 1,
            "floats": [0.1, 1e-300, -0.0, 1.7976931348623157e308, float("nan"), float("inf"), float("-inf")],
            "tuple": (1, "a", (2.5, None)),
            "list_of_dicts": [{"a": 1, "$tricky": 2}, {"$int": "not a tag"}, {}],
            "unicode": "Ωmega ✓ \u0000 \ud800",
            "np_in_list": [np.float64(0.1), np.int8(3)],
            "empty_list": [],
        },
        "empty_dict": {},
        "nested": {"a": {"b": {"c": {"d": np.arange(3)}}}},
    }


# --------------------------------------------------------------------------------------------------
# 1. Exact round trip
# --------------------------------------------------------------------------------------------------


def test_round_trip_is_exact(location: str) -> None:
    tree = _full_tree()
    assert save_state_tree(location, tree, metadata=METADATA) == location
    loaded, metadata = load_state_tree(location)
    _assert_same(loaded, tree)
    assert metadata == METADATA
    assert read_metadata(location) == METADATA


def test_round_trip_of_unusual_keys_and_key_order(location: str) -> None:
    keys = [
        "pi.0.weight",
        "default_policy_default_optimizer",
        "0",
        "rl_module/x",
        "a/b/c",
        "A",
        "a",
        "AB",
        "Ab",
        "aB",
        "ab",
        "%41",
        "%2F",
        "__x",
        "_",
        ".",
        "..",
        "zarr.json",
        "ZARR.JSON",
        "c",
        "x" * 300,
        "x" * 299 + "y",
        "ключ",
        " ",
        "~",
        "$dict",
        "\t\n",
    ]
    tree = {k: {"value": np.array([i], np.int16), "name": k} for i, k in enumerate(reversed(keys))}
    save_state_tree(location, tree, metadata={})
    loaded, _ = load_state_tree(location)
    _assert_same(loaded, tree)
    # Every node name is a single safe path component, unique even when compared case-insensitively.
    version = _root_attrs(location)["committed_version"]
    names = {k.split("/")[2] for k in _keys(location, f"versions/{version}") if k.count("/") > 2}
    assert len(names) == len(keys) == len({n.lower() for n in names})
    assert all(re.fullmatch(r"[a-z0-9_.\-%~A-F]{1,200}", n) and n not in (".", "..", "zarr.json") for n in names)
    assert not any(n.startswith("__") for n in names)


def test_all_zero_arrays_are_written_and_restored(tmp_path: Path) -> None:
    tree = {"z": np.zeros((128, 128), np.float32), "zb": np.zeros(5, bool), "z0": np.array(0.0)}
    path = str(tmp_path / "ckpt")
    save_state_tree(path, tree, metadata={})
    version = _root_attrs(path)["committed_version"]
    # Unlike zarr's default (write_empty_chunks=False), every chunk is written, so a missing chunk
    # can be told apart from an all-zero array.
    assert {"z/0.0", "zb/0", "z0/0"} <= {k.split("/", 2)[2] for k in _keys(path, f"versions/{version}")}
    loaded, _ = load_state_tree(path)
    _assert_same(loaded, tree)


def test_loaded_arrays_are_independent_copies(location: str) -> None:
    save_state_tree(location, {"w": np.ones(4, np.float32)}, metadata={})
    first, _ = load_state_tree(location)
    first["w"][:] = 5
    second, _ = load_state_tree(location)
    assert (second["w"] == 1).all() and first["w"].flags.owndata


def test_file_url_and_pathlike(tmp_path: Path) -> None:
    tree = _learner_like_tree()
    save_state_tree(tmp_path / "a", tree, metadata=METADATA)
    _assert_same(load_state_tree(f"file://{tmp_path / 'a'}")[0], tree)
    assert save_state_tree(f"file://{tmp_path / 'b'}", tree, metadata=METADATA) == f"file://{tmp_path / 'b'}"
    _assert_same(load_state_tree(tmp_path / "b")[0], tree)


def test_memory_store_is_process_global() -> None:
    url = f"memory://dlearner-test-{uuid.uuid4().hex}"
    try:
        save_state_tree(url, _learner_like_tree(2.0), metadata=METADATA)
        # A fresh filesystem object sees the same store.
        fs = fsspec.filesystem("memory")
        assert fs.exists(url[len("memory://") :] + "/zarr.json")
        _assert_same(load_state_tree(url)[0], _learner_like_tree(2.0))
    finally:
        fsspec.filesystem("memory").rm(url[len("memory://") :], recursive=True)


# --------------------------------------------------------------------------------------------------
# 2. Plain zarr, and no pickle
# --------------------------------------------------------------------------------------------------


def test_plain_zarr_reads_every_array_identically(location: str) -> None:
    tree = _full_tree()
    save_state_tree(location, tree, metadata=METADATA)
    root = zarr.open_group(location, mode="r")
    info = root.attrs["dlearner"]
    # No array over 1 MiB, so nothing is compressed: format version 1, which older dlearners read.
    assert info["format"] == FORMAT_NAME and info["format_version"] == 1
    assert info["metadata"] == METADATA
    version = root["versions"][info["committed_version"]]
    for entry in inspect_checkpoint(location)["arrays"]:
        expected = tree
        for key in entry["keys"]:
            expected = expected[key]
        array = zarr.open_group(location, mode="r")[entry["node"]]
        assert isinstance(array, zarr.Array)
        data = array[...]
        assert data.shape == np.shape(expected)
        assert np.asarray(data).astype(np.asarray(expected).dtype).tobytes() == np.asarray(expected).tobytes(), entry
        assert array.attrs["dlearner"]["key"] == entry["keys"][-1]
    assert version.attrs["dlearner"]["tree"]["type"] == "dict"


def test_arrays_have_unique_dimension_names_that_zarr_reads(location: str) -> None:
    tree = {"layer": {"weight": np.ones((3, 2), np.float32), "bias": np.zeros(3, np.float32)}, "step": np.int64(4)}
    save_state_tree(location, tree, metadata=METADATA)
    version = zarr.open_group(location, mode="r")["versions"][_root_attrs(location)["committed_version"]]
    assert version["layer/weight"].metadata.dimension_names == ("weight.dim_0", "weight.dim_1")
    assert version["layer/bias"].metadata.dimension_names == ("bias.dim_0",)
    assert version["step"].metadata.dimension_names is None  # 0-d: none, as zarr writes it
    np.testing.assert_array_equal(version["layer/weight"][...], tree["layer"]["weight"])


def test_arrays_without_dimension_names_still_load(tmp_path: Path) -> None:
    # As written before dimension names were added: they play no part in decoding.
    path = tmp_path / "ckpt"
    tree = {"w": np.arange(6.0).reshape(2, 3)}
    save_state_tree(path, tree, metadata={})
    (meta_file,) = path.glob("versions/*/w/zarr.json")
    meta = json.loads(meta_file.read_text())
    del meta["dimension_names"]
    meta_file.write_text(json.dumps(meta))
    _assert_same(load_state_tree(path)[0], tree)


def test_no_pickle_in_store_and_loading_never_unpickles(location: str, monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("pickle/torch serialisation must not be used")

    for name in ("dumps", "dump", "loads", "load"):
        monkeypatch.setattr(pickle, name, forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(torch, "save", forbidden)
    monkeypatch.setattr(np, "load", forbidden)
    tree = _full_tree()
    save_state_tree(location, tree, metadata=METADATA)
    _assert_same(load_state_tree(location)[0], tree)
    inspect_checkpoint(location)
    keys = _keys(location)
    assert keys
    for key in keys:
        head = _cat(location, key)[:2]
        assert not re.fullmatch(rb"\x80[\x02-\x05]", head), f"{key} looks like a pickle"
        if key.endswith("zarr.json"):
            json.loads(_cat(location, key))


# --------------------------------------------------------------------------------------------------
# 3. Atomic commit
# --------------------------------------------------------------------------------------------------


def _fail_after(monkeypatch: pytest.MonkeyPatch, n_arrays: int) -> list[int]:
    """Make the array writer raise once ``n_arrays`` arrays have been handed to the store."""
    calls = [0]
    original = layout._array_files

    def failing(*args: Any, **kwargs: Any) -> Any:
        if calls[0] >= n_arrays:
            raise OSError("injected failure while writing arrays")
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(layout, "_array_files", failing)
    return calls


def test_failed_save_keeps_previous_checkpoint(location: str, monkeypatch: pytest.MonkeyPatch) -> None:
    old = _learner_like_tree(1.0)
    save_state_tree(location, old, metadata={"step": 1})
    old_version = _root_attrs(location)["committed_version"]
    calls = _fail_after(monkeypatch, 2)
    with pytest.raises(OSError, match="injected"):
        save_state_tree(location, _learner_like_tree(2.0), metadata={"step": 2})
    assert calls[0] == 2
    monkeypatch.undo()
    assert _root_attrs(location)["committed_version"] == old_version
    loaded, metadata = load_state_tree(location)
    _assert_same(loaded, old)
    assert metadata == {"step": 1}

    # The next save succeeds and removes the partial version.
    new = _learner_like_tree(3.0)
    save_state_tree(location, new, metadata={"step": 3})
    _assert_same(load_state_tree(location)[0], new)
    assert _versions(location) == {_root_attrs(location)["committed_version"]}


def test_failed_commit_keeps_previous_checkpoint(location: str, monkeypatch: pytest.MonkeyPatch) -> None:
    old = _learner_like_tree(1.0)
    save_state_tree(location, old, metadata={"step": 1})
    for backend in (backends.LocalBackend, backends.FsspecBackend):

        def refuse(self: Any, key: str, data: bytes) -> None:
            raise OSError("injected failure at commit")

        monkeypatch.setattr(backend, "write_atomic", refuse)
    with pytest.raises(OSError, match="commit"):
        save_state_tree(location, _learner_like_tree(2.0), metadata={"step": 2})
    monkeypatch.undo()
    _assert_same(load_state_tree(location)[0], old)
    assert read_metadata(location) == {"step": 1}


def test_a_save_whose_data_is_not_made_durable_fails_and_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On ext4/xfs/btrfs/tmpfs a save makes its files durable with one syncfs (see backends.flush);
    # a writeback error it reports (EIO: a failing disk) must fail the save before its commit, and
    # the descriptor it synced through is closed all the same.
    location = str(tmp_path / "ckpt")
    old = _learner_like_tree(1.0)
    save_state_tree(location, old, metadata={"step": 1})
    assert backends._syncfs is not None and backends._syncfs_reliable(str(tmp_path)), "this test needs syncfs"
    synced: list[int] = []

    def failing_syncfs(fd: int) -> None:
        synced.append(fd)
        raise OSError(errno.EIO, "syncfs failed: Input/output error (injected)")

    monkeypatch.setattr(backends, "_syncfs", failing_syncfs)
    open_before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError, match="Input/output error"):
        save_state_tree(location, _learner_like_tree(2.0), metadata={"step": 2})
    assert len(synced) == 1
    assert str(synced[0]) not in set(os.listdir("/proc/self/fd")) - open_before
    monkeypatch.undo()
    _assert_same(load_state_tree(location)[0], old)
    assert read_metadata(location) == {"step": 1}
    new = _learner_like_tree(3.0)
    save_state_tree(location, new, metadata={"step": 3})
    _assert_same(load_state_tree(location)[0], new)


def test_interrupted_first_save_is_refused_then_recovered(location: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _fail_after(monkeypatch, 1)
    with pytest.raises(OSError, match="injected"):
        save_state_tree(location, _learner_like_tree(), metadata=METADATA)
    monkeypatch.undo()
    for reader in (load_state_tree, read_metadata, inspect_checkpoint):
        with pytest.raises(ValueError, match=r"incomplete checkpoint.*interrupted.*Save again"):
            reader(location)
    leftover = _versions(location)
    if "://" not in location:
        assert len(leftover) == 1  # local writes stream: part of the new version is on disk
    else:
        assert len(leftover) <= 1  # fsspec writes go out in batches: the failed one never did
    tree = _learner_like_tree(4.0)
    save_state_tree(location, tree, metadata=METADATA)
    _assert_same(load_state_tree(location)[0], tree)
    assert _versions(location) == {_root_attrs(location)["committed_version"]}
    assert not leftover & _versions(location)


def test_save_removes_stale_versions_but_nothing_else(location: str) -> None:
    save_state_tree(location, {"a": np.ones(2)}, metadata={})
    stale = [uuid.uuid4().hex for _ in range(2)]
    for version in stale:  # as left behind by killed saves
        _pipe(location, f"versions/{version}/zarr.json", b"{}")
        _pipe(location, f"versions/{version}/w/0.0", b"partial")
    _pipe(location, "versions/README", b"not a version")
    save_state_tree(location, {"a": np.zeros(2)}, metadata={})
    assert _versions(location) == {_root_attrs(location)["committed_version"]}
    assert "versions/README" in _keys(location)
    _assert_same(load_state_tree(location)[0], {"a": np.zeros(2)})


def test_a_save_leaves_exactly_the_committed_version_once_the_deletion_finished(location: str) -> None:
    for step in range(3):
        save_state_tree(location, _learner_like_tree(float(step)), metadata={"step": step})
        assert _versions(location) == {_root_attrs(location)["committed_version"]}
    _assert_same(load_state_tree(location)[0], _learner_like_tree(2.0))


def test_the_replaced_version_is_deleted_after_the_save_returns(location: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The deletion runs on a background thread: held back here, the save returns anyway, the new
    # version restores meanwhile, and the next save waits for it before it writes.
    save_state_tree(location, _learner_like_tree(1.0), metadata={"step": 1})
    old_version = _root_attrs(location)["committed_version"]
    release, started = threading.Event(), threading.Event()
    deleted: list[str] = []
    originals = {cls: cls.delete_tree for cls in (backends.LocalBackend, backends.FsspecBackend)}

    def held_back(self: Any, key: str) -> None:
        started.set()
        assert release.wait(30)
        deleted.append(key)
        originals[type(self)](self, key)

    for cls in originals:
        monkeypatch.setattr(cls, "delete_tree", held_back)
    save_state_tree(location, _learner_like_tree(2.0), metadata={"step": 2})
    assert started.wait(30) and not deleted  # the save returned while the deletion waits
    new_version = _root_attrs(location)["committed_version"]
    assert _keys(location, f"versions/{old_version}")  # still there, and harmless
    _assert_same(load_state_tree(location)[0], _learner_like_tree(2.0))
    release.set()
    save_state_tree(location, _learner_like_tree(3.0), metadata={"step": 3})
    assert deleted[0] == f"versions/{old_version}"  # finished before the third save wrote anything
    assert _versions(location) == {_root_attrs(location)["committed_version"]}
    assert f"versions/{new_version}" in deleted  # the second save's version, replaced by the third


def test_a_failure_between_commit_and_deletion_leaves_the_new_checkpoint(location: str, monkeypatch: pytest.MonkeyPatch) -> None:
    save_state_tree(location, _learner_like_tree(1.0), metadata={"step": 1})

    def crash(backend: Any, names: list[str]) -> None:
        raise RuntimeError("injected crash after the commit")

    monkeypatch.setattr(layout, "_delete_in_background", crash)
    with pytest.raises(RuntimeError, match="injected crash"):
        save_state_tree(location, _learner_like_tree(2.0), metadata={"step": 2})
    monkeypatch.undo()
    committed = _root_attrs(location)["committed_version"]
    assert len(_versions(location)) == 2 and committed in _versions(location)
    tree, metadata = load_state_tree(location)
    _assert_same(tree, _learner_like_tree(2.0))
    assert metadata == {"step": 2}
    save_state_tree(location, _learner_like_tree(3.0), metadata={"step": 3})  # cleans up both old ones
    assert _versions(location) == {_root_attrs(location)["committed_version"]}
    _assert_same(load_state_tree(location)[0], _learner_like_tree(3.0))


CRASH_AFTER_COMMIT_SCRIPT = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    from dlearner.checkpoint import layout, store

    store.save_state_tree(sys.argv[1], {"w": np.full(8, 1.0)}, metadata={"step": 1})
    layout.wait_for_deletions()
    # The process dies right after the second save's commit, before anything is deleted.
    layout._delete_in_background = lambda backend, names: os._exit(17)
    store.save_state_tree(sys.argv[1], {"w": np.full(8, 2.0)}, metadata={"step": 2})
    """
)


def test_a_process_killed_between_commit_and_deletion_leaves_the_new_checkpoint(tmp_path: Path) -> None:
    path = str(tmp_path / "ckpt")
    result = subprocess.run(
        [sys.executable, "-c", CRASH_AFTER_COMMIT_SCRIPT, path], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 17, result.stderr
    assert len(_versions(path)) == 2
    tree, metadata = load_state_tree(path)
    _assert_same(tree, {"w": np.full(8, 2.0)})
    assert metadata == {"step": 2}
    save_state_tree(path, {"w": np.full(8, 3.0)}, metadata={"step": 3})
    assert _versions(path) == {_root_attrs(path)["committed_version"]}


def test_a_failed_background_deletion_is_reported_and_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "ckpt")
    save_state_tree(path, {"a": np.ones(2)}, metadata={})

    def refuse(self: Any, key: str) -> None:
        raise PermissionError(f"injected: cannot remove {key}")

    monkeypatch.setattr(backends.LocalBackend, "delete_tree", refuse)
    save_state_tree(path, {"a": np.zeros(2)}, metadata={})  # committed; the deletion fails later
    with pytest.warns(RuntimeWarning, match=r"removing the old version [0-9a-f]{32} failed .*injected.*next save"):
        layout.wait_for_deletions()
    monkeypatch.undo()
    save_state_tree(path, {"a": np.full(2, 5.0)}, metadata={})
    assert _versions(path) == {_root_attrs(path)["committed_version"]}


def test_debris_of_a_killed_commit_is_ignored_and_removed(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    path.mkdir()
    debris = path / f".zarr.json.{uuid.uuid4().hex}.tmp"  # killed between writing and renaming
    debris.write_bytes(b'{"half": ')
    with pytest.raises(ValueError, match="empty directory"):
        load_state_tree(path)
    save_state_tree(path, {"a": np.ones(2)}, metadata={})
    assert not debris.exists()
    assert sorted(os.listdir(path)) == ["versions", "zarr.json"]


def test_invalid_tree_touches_nothing(location: str, tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"torch|cannot store"):
        save_state_tree(location, {"a": np.zeros(2), "b": {"c": object()}}, metadata={})
    with pytest.raises(FileNotFoundError):
        load_state_tree(location)
    save_state_tree(location, {"a": np.ones(2)}, metadata={"v": 1})
    before = {k: _cat(location, k) for k in _keys(location)}
    with pytest.raises(ValueError, match="empty tree key"):
        save_state_tree(location, {"a": {"": 1}}, metadata={})
    assert {k: _cat(location, k) for k in _keys(location)} == before


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from dlearner.checkpoint import layout, store

    original = layout._array_files
    def slow(*args, **kwargs):
        time.sleep(0.002)  # keep the save running long enough to be killed midway
        return original(*args, **kwargs)
    layout._array_files = slow
    tree = {"layers": {str(i): {"w": np.full((32,), 2.0, np.float32)} for i in range(3000)}}
    print("saving", flush=True)
    store.save_state_tree(sys.argv[1], tree, metadata={"step": 2})
    print("finished", flush=True)
    """
)


def test_killed_save_keeps_previous_checkpoint(tmp_path: Path) -> None:
    path = str(tmp_path / "ckpt")
    old = {"layers": {str(i): {"w": np.full((32,), 1.0, np.float32)} for i in range(50)}}
    save_state_tree(path, old, metadata={"step": 1})
    old_version = _root_attrs(path)["committed_version"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, path], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        versions_dir = tmp_path / "ckpt" / "versions"
        # Wait until the new version group exists and holds some arrays, then kill without warning.
        while time.monotonic() < deadline and proc.poll() is None:
            new = [d for d in versions_dir.iterdir() if d.is_dir() and d.name != old_version]
            if new and (new[0] / "layers").is_dir() and len(os.listdir(new[0] / "layers")) >= 20:
                break
            time.sleep(0.005)
        assert proc.poll() is None, f"the save ended before it was killed: {proc.communicate()}"
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert b"finished" not in out

    assert _root_attrs(path)["committed_version"] == old_version
    assert read_metadata(path) == {"step": 1}
    _assert_same(load_state_tree(path)[0], old)
    partial = _versions(path) - {old_version}
    assert len(partial) == 1  # the killed save's uncommitted version is still there ...

    new_tree = {"w": np.arange(3.0)}
    save_state_tree(path, new_tree, metadata={"step": 3})
    _assert_same(load_state_tree(path)[0], new_tree)
    assert _versions(path) == {_root_attrs(path)["committed_version"]}  # ... until the next save


# --------------------------------------------------------------------------------------------------
# 3b. Run folders: a store, or a folder that keeps it in checkpoint/ (dlearner train --checkpoint DIR)
# --------------------------------------------------------------------------------------------------


def test_readers_accept_a_run_folder_and_find_its_store(location: str) -> None:
    store_path = f"{location}/{RUN_STORE_DIRNAME}"
    tree = _learner_like_tree()
    save_state_tree(store_path, tree, metadata=METADATA)
    _pipe(location, "metrics.jsonl", b'{"training_iteration": 1}\n')  # beside the store, as the CLI writes it
    assert resolve_checkpoint_path(location) == store_path
    _assert_same(load_state_tree(location)[0], tree)
    assert read_metadata(location) == METADATA
    assert inspect_checkpoint(location)["path"] == store_path  # the nodes it lists are relative to the store


def test_a_store_resolves_to_itself(location: str) -> None:
    save_state_tree(location, {"a": np.ones(2)}, metadata={})
    assert resolve_checkpoint_path(location) == location
    assert resolve_checkpoint_path(location, new_run=True) == location


def test_a_new_run_puts_its_store_in_the_checkpoint_subfolder(location: str) -> None:
    assert resolve_checkpoint_path(location) == location  # nothing there: readers name the path as given
    assert resolve_checkpoint_path(location, new_run=True) == f"{location}/{RUN_STORE_DIRNAME}"


def test_an_empty_directory_is_a_new_run_folder(tmp_path: Path) -> None:
    assert resolve_checkpoint_path(tmp_path, new_run=True) == str(tmp_path / RUN_STORE_DIRNAME)


def test_saving_to_a_run_folder_updates_its_store(location: str) -> None:
    store_path = f"{location}/{RUN_STORE_DIRNAME}"
    save_state_tree(store_path, {"a": np.ones(2)}, metadata={"step": 1})
    _pipe(location, "metrics.jsonl", b"{}\n")
    save_state_tree(location, {"a": np.zeros(2)}, metadata={"step": 2})
    assert read_metadata(store_path) == {"step": 2}
    assert "zarr.json" not in _keys(location) and "metrics.jsonl" in _keys(location)


def test_a_folder_that_is_neither_a_store_nor_a_run_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("precious")
    (tmp_path / RUN_STORE_DIRNAME).mkdir()  # an empty checkpoint/ is no store
    assert resolve_checkpoint_path(tmp_path) == str(tmp_path)
    for reader in (load_state_tree, read_metadata, inspect_checkpoint):
        with pytest.raises(ValueError, match=r"not a dlearner checkpoint.*notes.txt.*run folder.*checkpoint/"):
            reader(tmp_path)
    with pytest.raises(FileNotFoundError, match="no-such-run"):
        read_metadata(tmp_path / "no-such-run")


# --------------------------------------------------------------------------------------------------
# 4. Errors
# --------------------------------------------------------------------------------------------------


def test_missing_path_raises_file_not_found(location: str) -> None:
    for reader in (load_state_tree, read_metadata, inspect_checkpoint):
        with pytest.raises(FileNotFoundError, match="no checkpoint"):
            reader(location)


def test_directory_with_user_files_is_refused_and_untouched(tmp_path: Path) -> None:
    path = tmp_path / "mine"
    path.mkdir()
    (path / "notes.txt").write_text("precious")
    for reader in (load_state_tree, read_metadata, inspect_checkpoint):
        with pytest.raises(ValueError, match=r"not a dlearner checkpoint.*notes.txt"):
            reader(path)
    with pytest.raises(ValueError, match=r"refusing to save.*not a dlearner checkpoint"):
        save_state_tree(path, {"a": np.zeros(1)}, metadata={})
    assert sorted(os.listdir(path)) == ["notes.txt"] and (path / "notes.txt").read_text() == "precious"


def test_foreign_files_are_refused_and_untouched(location: str) -> None:
    _pipe(location, "data.bin", b"user data")
    with pytest.raises(ValueError, match="not a dlearner checkpoint"):
        load_state_tree(location)
    with pytest.raises(ValueError, match="refusing to save"):
        save_state_tree(location, {"a": np.zeros(1)}, metadata={})
    assert _keys(location) == ["data.bin"]


def test_file_instead_of_directory(tmp_path: Path) -> None:
    path = tmp_path / "file.pt"
    path.write_bytes(b"\x80\x04junk")
    with pytest.raises(ValueError, match="is a file"):
        load_state_tree(path)
    with pytest.raises(ValueError, match=r"refusing to save.*is a file"):
        save_state_tree(path, {}, metadata={})
    assert path.read_bytes() == b"\x80\x04junk"


def test_empty_directory_is_not_a_checkpoint_but_can_be_saved_to(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    path.mkdir()
    with pytest.raises(ValueError, match="empty directory"):
        load_state_tree(path)
    save_state_tree(path, {"a": np.ones(2)}, metadata={})
    _assert_same(load_state_tree(path)[0], {"a": np.ones(2)})


def test_other_zarr_store_is_refused_and_untouched(tmp_path: Path) -> None:
    path = tmp_path / "other.zarr"
    group = zarr.open_group(path, mode="w", zarr_format=3)
    group.create_array("x", data=np.arange(3))
    before = _keys(str(path))
    with pytest.raises(ValueError, match=r"not a dlearner checkpoint.*without 'dlearner-checkpoint'"):
        load_state_tree(path)
    with pytest.raises(ValueError, match="refusing to save"):
        save_state_tree(path, {"a": np.ones(2)}, metadata={})
    assert _keys(str(path)) == before


def test_newer_format_version_is_refused(location: str) -> None:
    save_state_tree(location, {"a": np.ones(2)}, metadata=METADATA)
    doc = json.loads(_cat(location, "zarr.json"))
    doc["attributes"]["dlearner"]["format_version"] = FORMAT_VERSION + 1
    _pipe(location, "zarr.json", json.dumps(doc).encode())
    message = rf"format version {FORMAT_VERSION + 1}.*up to {FORMAT_VERSION}.*Upgrade dlearner"
    for reader in (load_state_tree, read_metadata, inspect_checkpoint):
        with pytest.raises(ValueError, match=message):
            reader(location)
    with pytest.raises(ValueError, match=rf"refusing to save.*version {FORMAT_VERSION + 1}.*version {FORMAT_VERSION}"):
        save_state_tree(location, {"a": np.zeros(2)}, metadata={})


def _committed_array(location: str, name: str) -> str:
    return next(a["node"] for a in inspect_checkpoint(location)["arrays"] if a["name"] == name)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("flip_byte", "checksum mismatch"),
        ("truncate_chunk", "array data has .* bytes, expected"),
        ("delete_chunk", "data of array .* is missing"),
        ("delete_array", "array .* is missing"),
        ("delete_version", "committed version .* is missing"),
        ("garbage_root", "zarr.json is not valid JSON"),
        ("manifest_escape", "invalid node path"),
        ("manifest_shape", "manifest says"),
    ],
)
def test_corruption_is_reported(location: str, damage: str, message: str) -> None:
    save_state_tree(location, {"m": {"w": np.arange(12, dtype=np.float32).reshape(3, 4)}}, metadata={})
    node = _committed_array(location, "m/w")
    version = node.split("/")[1]
    if damage == "flip_byte":
        data = bytearray(_cat(location, f"{node}/0.0"))
        data[5] ^= 0x01
        _pipe(location, f"{node}/0.0", bytes(data))
    elif damage == "truncate_chunk":
        _pipe(location, f"{node}/0.0", _cat(location, f"{node}/0.0")[:-8])
    elif damage == "delete_chunk":
        _rm(location, f"{node}/0.0")
    elif damage == "delete_array":
        _rm(location, node)
    elif damage == "delete_version":
        _rm(location, f"versions/{version}")
    elif damage == "garbage_root":
        _pipe(location, "zarr.json", b"{not json")
    else:
        doc = json.loads(_cat(location, f"versions/{version}/zarr.json"))
        array_node = doc["attributes"]["dlearner"]["tree"]["items"][0][1]["items"][0][1]
        if damage == "manifest_escape":
            array_node["node"] = "../../../etc"
        else:
            array_node["shape"] = [4, 3]
        _pipe(location, f"versions/{version}/zarr.json", json.dumps(doc).encode())
    with pytest.raises(ValueError, match=message) as excinfo:
        load_state_tree(location)
    assert isinstance(excinfo.value, InvalidCheckpointError)


def test_array_reencoded_by_zarr_is_refused_not_decoded(tmp_path: Path) -> None:
    # dlearner reads only its own encoding (one chunk, no compression, fill value 0): another one,
    # even a valid Zarr array, could decompress without bound or fill missing chunks with zeros.
    path = str(tmp_path / "ckpt")
    tree = {"m": {"w": np.arange(1000, dtype=np.float32).reshape(10, 100), "b": np.ones(3, np.int64)}}
    save_state_tree(path, tree, metadata={})
    node = _committed_array(path, "m/w")
    zarr.create_array(
        path,
        name=node,
        data=tree["m"]["w"],
        chunks=(5, 50),
        overwrite=True,
        attributes={"dlearner": {"key": "w"}},
        zarr_format=3,
    )
    with pytest.raises(ValueError, match=rf"{node}/zarr.json is not encoded the way dlearner writes arrays \(chunk_grid"):
        load_state_tree(path)


def test_unsupported_values_raise_type_error_naming_the_place(location: str) -> None:
    torch = pytest.importorskip("torch")
    cases = [
        ({"rl_module": {"w": torch.zeros(2)}}, r"'rl_module/w'.*numpy\(\)"),
        ({"a": np.array(["x"], dtype=object)}, "dtype object at 'a'"),
        ({"a": np.array(["x"])}, "dtype <U1 at 'a'"),
        ({"a": np.zeros(2, dtype=[("x", "f4")])}, "only bool and numeric"),
        ({"opt": {"state": {0: np.zeros(1)}}}, r"key 0 \(int\) at 'opt/state'"),
        ({"a": [np.zeros(2)]}, r"numpy array at 'a'\[0\]"),
        ({"a": {1, 2}}, "cannot store builtins.set at 'a'"),
        ({"a": [{"k": {1: 2}}]}, r"dict key 1 \(int\)"),
        ({"a": np.ma.masked_array([1, 2])}, "MaskedArray at 'a'"),
        ({"a": np.zeros(2, "M8[s]")}, "dtype datetime64"),
    ]
    if np.dtype(np.longdouble).itemsize > 8:  # extended precision has no Zarr v3 data type
        message = r"array at 'a/b': arrays of dtype \w+ cannot be stored"
        cases.append(({"a": {"b": np.zeros(2, np.longdouble)}}, message))
    for tree, message in cases:
        with pytest.raises(TypeError, match=message):
            save_state_tree(location, tree, metadata={})
    with pytest.raises(TypeError, match="metadata"):
        save_state_tree(location, {}, metadata={"cfg": object()})
    with pytest.raises(FileNotFoundError):
        load_state_tree(location)  # nothing was written by any of the failed saves


def test_storage_options_are_rejected_for_local_paths(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="storage_options"):
        save_state_tree(tmp_path / "x", {}, metadata={}, storage_options={"anon": True})


# --------------------------------------------------------------------------------------------------
# Inspection and key encoding
# --------------------------------------------------------------------------------------------------


def test_inspect_and_format(location: str) -> None:
    tree = _learner_like_tree()
    save_state_tree(location, tree, metadata=METADATA)
    summary = inspect_checkpoint(location)
    json.dumps({k: v for k, v in summary.items() if k != "values"})  # JSON-serialisable
    assert summary["format"] == FORMAT_NAME and summary["format_version"] == 1
    assert summary["metadata"] == METADATA
    by_name = {a["name"]: a for a in summary["arrays"]}
    assert by_name["rl_module/default_policy/pi.0.weight"] == {
        "name": "rl_module/default_policy/pi.0.weight",
        "keys": ["rl_module", "default_policy", "pi.0.weight"],
        "node": f"versions/{summary['version']}/rl_module/default_policy/pi.0.weight",
        "shape": [16, 4],
        "dtype": "float32",
        "nbytes": 256,
    }
    assert summary["num_arrays"] == 4
    assert summary["total_nbytes"] == 256 + 64 + 256 + 8
    values = {v["name"]: v["value"] for v in summary["values"]}
    assert values["counters/num_env_steps_trained"] == 100
    text = format_inspection(summary)
    assert "dlearner checkpoint" in text and "PPOTorchLearner" in text and "lr: 0.0003" in text
    assert re.search(r"rl_module/default_policy/pi\.0\.weight\s+float32\s+\(16, 4\)\s+256 B", text)
    assert "counters/num_env_steps_trained = 100" in text


def test_key_encoding_is_injective_and_case_safe() -> None:
    keys = [
        "a",
        "A",
        "%41",
        "%",
        "a/b",
        "a%2Fb",
        "__x",
        "_%5F_x",
        ".",
        "%2E",
        "..",
        "zarr.json",
        "zarr%2Ejson",
        "x" * 300,
        "x" * 301,
        "é",
        "e\u0301",
        "🙂",
    ]
    names = [encoding.encode_key(k) for k in keys]
    assert len(set(names)) == len(keys)
    assert len({n.lower() for n in names}) == len(keys)
    assert encoding.encode_key("pi.0.weight") == "pi.0.weight"
    assert encoding.encode_key("rl_module/x") == "rl_module%2Fx"
    assert encoding.encode_key("Adam") == "%41dam"
    assert max(len(n) for n in names) <= 200
