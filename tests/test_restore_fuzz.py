"""Restore fuzz: a real learner checkpoint, mutated at random, restores exactly or changes nothing.

Hypothesis damages a checkpoint that ``Learner.save_to_path`` wrote (flipped bytes, truncated or
deleted files, JSON values replaced by other values and types, renamed arrays and keys, edited shapes
and dtypes, junk files) and restores it into a learner. Every case must end one of two ways:

* the restore succeeds, and the learner then holds exactly what the store holds (for a mutation that
  changes no content, such as a junk file, exactly the saved learner's state); or
* it raises ``ValueError``, ``TypeError`` or ``FileNotFoundError`` and the learner's state
  (``get_state()``) is exactly what it was before the call.

Anything else (another exception, a hang, a half-restored learner) fails the test, with the mutation
that caused it.
"""

from __future__ import annotations

import json
import math
import shutil
import uuid
from typing import Any, Iterator

import fsspec
import gymnasium as gym
import numpy as np
import pytest
from conftest import ppo_batch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dlearner import PPOConfig
from dlearner.checkpoint import load_state_tree

MODEL = {"fcnet_hiddens": [8, 8]}
ALLOWED = (ValueError, TypeError, FileNotFoundError)
EXAMPLES = {"local": 250, "memory": 60}
OUTCOMES: dict[str, int] = {}  # how the cases ended, printed at the end (pytest -s)


def _learner(env, seed: int):
    config = PPOConfig().training(minibatch_size=64).rl_module(model_config=MODEL).debugging(seed=seed)
    learner = config.build_learner(env=env)
    learner.build()
    return learner


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[dict[str, Any]]:
    """The saved learner (after one update, so Adam has moments), its pristine store, and a target
    learner with another state to restore into."""
    env = gym.make("CartPole-v1")
    source = _learner(env, seed=0)
    source.update(ppo_batch(), timesteps={"num_env_steps_sampled_lifetime": 100})
    pristine = tmp_path_factory.mktemp("fuzz") / "pristine"
    source.save_to_path(str(pristine))
    target = _learner(env, seed=1)
    keys = sorted(str(p.relative_to(pristine)) for p in pristine.rglob("*") if p.is_file())
    json_paths = {key: _value_paths(json.loads((pristine / key).read_text())) for key in keys if key.endswith("zarr.json")}
    array_dirs = sorted(key.rsplit("/", 1)[0] for key in keys if key.endswith("/0.0") or key.endswith("/0"))
    yield {
        "source_state": source.get_state(),
        "target": target,
        "target_state": target.get_state(),
        "pristine": pristine,
        "keys": keys,
        "json_paths": json_paths,
        "array_dirs": array_dirs,
    }
    env.close()


def _value_paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (dict keys and list indices) to a value inside ``doc``, the root excluded."""
    paths = []
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for key, value in items:
        paths.append((*prefix, key))
        paths.extend(_value_paths(value, (*prefix, key)))
    return paths


# --------------------------------------------------------------------------------------------------
# Mutations: each is (description, function(fs, root)) and changes one thing
# --------------------------------------------------------------------------------------------------

JSON_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["<f4", "<f8", "|b1", "<i8", ">f4", "float64", "int8", "bool", "O", "gzip", "$int", "$tuple", ""]),
    st.lists(st.integers(-3, 300), max_size=4),
    st.dictionaries(
        st.sampled_from(["type", "node", "items", "value", "$int", "$float", "$tuple", "name"]), st.integers(-1, 3), max_size=2
    ),
)


@st.composite
def mutations(draw, world: dict[str, Any]):
    keys, json_paths, array_dirs = world["keys"], world["json_paths"], world["array_dirs"]
    kind = draw(
        st.sampled_from(["flip", "truncate", "delete", "edit_json", "rename_array", "delete_array", "shape_dtype", "junk"])
    )
    if kind == "flip":
        key = draw(st.sampled_from(keys))
        index, mask = draw(st.integers(0, 10**6)), draw(st.integers(1, 255))

        def apply(fs, root):
            data = bytearray(fs.cat_file(f"{root}/{key}"))
            data[index % len(data)] ^= mask
            fs.pipe_file(f"{root}/{key}", bytes(data))

        return f"flip byte {index} (mod size) of {key} with {mask:#x}", apply
    if kind == "truncate":
        key, keep = draw(st.sampled_from(keys)), draw(st.floats(0, 1, exclude_max=True))

        def apply(fs, root):
            data = fs.cat_file(f"{root}/{key}")
            fs.pipe_file(f"{root}/{key}", data[: int(len(data) * keep)])

        return f"truncate {key} to {keep:.0%}", apply
    if kind == "delete":
        key = draw(st.sampled_from(keys))
        return f"delete {key}", lambda fs, root: fs.rm_file(f"{root}/{key}")
    if kind == "edit_json":
        key = draw(st.sampled_from(sorted(json_paths)))
        path = draw(st.sampled_from(json_paths[key]))
        tweak = draw(st.sampled_from(["replace", "nudge", "drop"]))
        value = draw(JSON_VALUES)

        def apply(fs, root):
            doc = json.loads(fs.cat_file(f"{root}/{key}"))
            parent = doc
            for step in path[:-1]:
                parent = parent[step]
            old = parent[path[-1]]
            if tweak == "drop":
                del parent[path[-1]]
            elif tweak == "nudge" and isinstance(old, (int, float)) and not isinstance(old, bool):
                parent[path[-1]] = old + 1
            elif tweak == "nudge" and isinstance(old, str):
                parent[path[-1]] = old[:-1] + ("x" if not old.endswith("x") else "y")
            else:
                parent[path[-1]] = value
            fs.pipe_file(f"{root}/{key}", json.dumps(doc).encode())

        return f"{tweak} {key} at {list(path)} (value {value!r})", apply
    if kind in ("rename_array", "delete_array"):
        node = draw(st.sampled_from(array_dirs))
        if kind == "delete_array":
            return f"delete array {node}", lambda fs, root: fs.rm(f"{root}/{node}", recursive=True)
        other = draw(st.sampled_from(array_dirs))

        def apply(fs, root):
            # Swap two arrays' directories (or move one aside when both are the same).
            tmp = f"{root}/{node}.tmp"
            fs.mv(f"{root}/{node}", tmp, recursive=True)
            if other != node:
                fs.mv(f"{root}/{other}", f"{root}/{node}", recursive=True)
                fs.mv(tmp, f"{root}/{other}", recursive=True)

        return f"swap arrays {node} and {other}", apply
    if kind == "shape_dtype":
        node = draw(st.sampled_from(array_dirs))
        field = draw(st.sampled_from(["shape", "data_type"]))
        value = (
            draw(st.lists(st.integers(0, 9), max_size=3))
            if field == "shape"
            else draw(st.sampled_from(["float64", "float16", "int32", "uint32", "bool", "complex64"]))
        )
        in_manifest = draw(st.booleans())

        def apply(fs, root):
            if not in_manifest:
                doc = json.loads(fs.cat_file(f"{root}/{node}/zarr.json"))
                doc[field] = value
                fs.pipe_file(f"{root}/{node}/zarr.json", json.dumps(doc).encode())
                return
            version, _, rel = node.partition("/")[2].partition("/")
            manifest_key = f"{root}/versions/{version}/zarr.json"
            doc = json.loads(fs.cat_file(manifest_key))
            entry = _manifest_entry(doc["attributes"]["dlearner"]["tree"], rel)
            entry["shape" if field == "shape" else "dtype"] = value if field == "shape" else np.dtype(value).str
            fs.pipe_file(manifest_key, json.dumps(doc).encode())

        return f"set {field} of {node} to {value!r} in the {'manifest' if in_manifest else 'zarr.json'}", apply
    # junk: a file where none belongs (inside the store, the versions group, an array)
    where = draw(st.sampled_from(["", "versions", *array_dirs[:3], keys[0].rsplit("/", 1)[0]]))
    name = draw(st.sampled_from(["junk", "0.1", "1.0", "c", ".zarr.json.tmp", "zarr.json.bak", "0" * 32]))
    content = draw(st.binary(max_size=64))
    path = f"{where}/{name}" if where else name
    return f"add junk file {path} ({len(content)} bytes)", lambda fs, root: fs.pipe_file(f"{root}/{path}", content)


def _manifest_entry(node: dict[str, Any], rel: str) -> dict[str, Any]:
    for _, child in node["items"]:
        if child.get("node") == rel:
            return child
        if child.get("type") == "dict" and rel.startswith(child["node"] + "/"):
            return _manifest_entry(child, rel)
    raise AssertionError(f"no manifest entry for {rel}")


# --------------------------------------------------------------------------------------------------
# The property
# --------------------------------------------------------------------------------------------------


def _same(a: Any, b: Any, where: str = "state") -> list[str]:
    """Differences between two states: arrays bit for bit, other leaves by value."""
    if isinstance(b, dict):
        if not isinstance(a, dict) or set(a) != set(b):
            return [f"{where}: keys {sorted(a) if isinstance(a, dict) else type(a).__name__} != {sorted(b)}"]
        return [d for k in b for d in _same(a[k], b[k], f"{where}/{k}")]
    if isinstance(b, np.ndarray):
        if not isinstance(a, np.ndarray) or a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes():
            return [f"{where}: array differs"]
        return []
    if isinstance(b, (list, tuple)):
        if not isinstance(a, (list, tuple)) or len(a) != len(b):
            return [f"{where}: {a!r} != {b!r}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _same(x, y, f"{where}[{i}]")]
    if isinstance(b, float) and isinstance(a, float) and math.isnan(a) and math.isnan(b):
        return []
    return [] if a == b or str(a) == str(b) else [f"{where}: {a!r} != {b!r}"]


def _copy_store(world: dict[str, Any], backend: str) -> tuple[Any, str, str]:
    """A fresh copy of the pristine checkpoint: (file system, root, path to restore from)."""
    if backend == "local":
        path = world["pristine"].parent / f"case-{uuid.uuid4().hex}"
        shutil.copytree(world["pristine"], path)
        fs, root = fsspec.core.url_to_fs(str(path))
        return fs, root, str(path)
    url = f"memory://dlearner-fuzz-{uuid.uuid4().hex}/ckpt"
    fs, root = fsspec.core.url_to_fs(url)
    fs.pipe({f"{root}/{key}": (world["pristine"] / key).read_bytes() for key in world["keys"]})
    return fs, root, url


def _check_one_mutation(world: dict[str, Any], backend: str, mutation) -> None:
    description, apply = mutation
    target = world["target"]
    fs, root, path = _copy_store(world, backend)
    try:
        apply(fs, root)
        before = target.get_state()
        try:
            target.restore_from_path(path)
        except ALLOWED as exc:
            OUTCOMES[type(exc).__name__] = OUTCOMES.get(type(exc).__name__, 0) + 1
            changed = _same(target.get_state(), before)
            assert not changed, f"{description}: {type(exc).__name__}({exc}) but the learner changed: {changed[:3]}"
            return
        except Exception as exc:  # noqa: BLE001 - reported with the mutation that caused it
            pytest.fail(f"{description}: raised {type(exc).__name__}: {exc}")
        OUTCOMES["restored"] = OUTCOMES.get("restored", 0) + 1
        # Restored: the learner holds exactly what the store holds.
        stored = load_state_tree(path)[0]["learner"]
        differs = _same(target.get_state(), stored)
        assert not differs, f"{description}: restored, but the learner differs from the store: {differs[:3]}"
        # Back to the target's own state for the next case.
        target.set_state(world["target_state"])
    finally:
        if backend == "local":
            shutil.rmtree(path)
        else:
            for file in fs.find(root):
                fs.rm_file(file)


@pytest.mark.parametrize("backend", ["local", "memory"])
def test_a_mutated_checkpoint_restores_exactly_or_changes_nothing(world: dict[str, Any], backend: str) -> None:
    @settings(
        max_examples=EXAMPLES[backend],
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(mutation=mutations(world))
    def check(mutation) -> None:
        _check_one_mutation(world, backend, mutation)

    OUTCOMES.clear()
    check()
    print(f"\n{backend}: {EXAMPLES[backend]} mutations (and shrinking): {OUTCOMES}")
    assert OUTCOMES.get("restored", 0) and OUTCOMES.get("InvalidCheckpointError", 0) + OUTCOMES.get("ValueError", 0)


def test_harmless_mutations_restore_the_saved_learner(world: dict[str, Any]) -> None:
    # Junk beside the Zarr nodes and the dimension names (which play no part in decoding) change nothing.
    target = world["target"]
    fs, root, path = _copy_store(world, "local")
    try:
        fs.pipe_file(f"{root}/notes.txt", b"mine")
        fs.makedirs(f"{root}/versions/{'0' * 32}", exist_ok=True)
        fs.pipe_file(f"{root}/versions/{'0' * 32}/zarr.json", b"debris of an interrupted save")
        for node in world["array_dirs"]:
            doc = json.loads(fs.cat_file(f"{root}/{node}/zarr.json"))
            doc.pop("dimension_names", None)
            fs.pipe_file(f"{root}/{node}/zarr.json", json.dumps(doc).encode())
        target.restore_from_path(path)
        assert not _same(target.get_state(), world["source_state"])
    finally:
        shutil.rmtree(path)
        target.set_state(world["target_state"])
