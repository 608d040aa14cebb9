"""Checkpoint save/restore medians, throughput and ratios: dlearner's Zarr store vs torch.save/torch.load.

Run: python benchmarks/checkpoint.py [--sizes 1MB,200MB] [--repeats 7] [--big-repeats 3] [--dir DIR]
     python benchmarks/checkpoint.py --sizes 1MB,200MB,2GB      # the 2 GB row (needs ~12 GB of RAM)

Each state is a PPO learner's (policy and value MLPs plus Adam moments, after one update): ``1MB`` is
the W1 learner ([256, 256] hidden layers, 1.6 MB); ``200MB`` and ``2GB`` widen the two hidden layers
until weights and moments hold that many bytes. For each state and each location (a local directory,
and ``memory://``, an in-memory file system, compared with ``torch.save`` into a ``BytesIO``), the
timings of every contender are taken in the same process, alternating call by call, so that load on
the machine falls on all of them alike; the table gives medians, throughput (state bytes / median) and
ratios:

* ``torch``: ``torch.save({"model": state_dict, "optimizer": state_dict}, file)``; restore is
  ``torch.load(weights_only=True)`` + ``load_state_dict`` of module and optimizer;
* ``torch durable``: the same file written as durably and atomically as a dlearner checkpoint: saved to
  a temporary file in the same directory, the file fsynced, renamed over the checkpoint, the
  directory fsynced (restore is the same as ``torch``'s);
* ``dlearner``: ``Learner.save_to_path`` / ``Learner.restore_from_path`` (get_state / set_state
  included), which validate, checksum and commit atomically (``docs/checkpoint-format.md``). The
  save returns after the commit; the version it replaced is deleted by a background thread, which the
  next save to the same path waits for after its own commit (so a round's save pays for the deletion
  only where the previous round's has not finished by the time this one has written and committed);
* ``dlearner + deletion`` (save only): ``save_to_path`` followed by waiting for that background
  deletion, i.e. the whole work of a save, to its own path.

``--zarr-api`` adds, for the 1 MB state, the same tree written and read through zarr's public API
(``zarr.open_group`` / ``create_array``, one chunk per array, the same codecs; no commit protocol
or manifest): it shows what the hand-written encoder in ``dlearner/checkpoint/encoding.py`` saves.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import pathlib
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import gymnasium as gym
import numpy as np
import torch
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import W1, fmt_s, load_w1_batch, print_table  # noqa: E402

from dlearner import PPOConfig  # noqa: E402
from dlearner.checkpoint.backends import open_backend  # noqa: E402
from dlearner.checkpoint.encoding import decode_json, dimension_names  # noqa: E402
from dlearner.checkpoint.layout import wait_for_deletions  # noqa: E402
from dlearner.jsonsafe import json_exact  # noqa: E402

SIZES = {"1MB": None, "200MB": 200e6, "2GB": 2e9}
"""State sizes: None is the W1 learner (1.6 MB); otherwise the bytes of weights + Adam moments."""


# --------------------------------------------------------------------------------------------------
# The states
# --------------------------------------------------------------------------------------------------


def hidden_width(target_bytes: float) -> int:
    """The width of two hidden layers whose CartPole policy + value MLPs, with Adam's two moments,
    hold about ``target_bytes`` (float32: 2 nets x (h^2 + 7h + 3) numbers, x 3 copies, x 4 bytes)."""
    return max(8, round((-7 + math.sqrt(49 + 4 * target_bytes / 24)) / 2))


def build_learners(size: str):
    """A trained learner of ``size`` and an untrained twin to restore into."""
    target = SIZES[size]
    hiddens = W1["hiddens"] if target is None else [hidden_width(target)] * 2
    config = PPOConfig().rl_module(model_config={"fcnet_hiddens": hiddens}).debugging(seed=0)
    rows = 4000
    if target is not None:  # one small update is enough to fill the Adam moments
        config = config.training(minibatch_size=64, num_epochs=1)
        rows = 64
    learner = config.build_learner(env=gym.make("CartPole-v1"))
    learner.build()
    learner.update(load_w1_batch(rows), {"num_env_steps_sampled_lifetime": rows})
    twin = config.build_learner(env=gym.make("CartPole-v1"))
    twin.build()
    return learner, twin


def state_bytes(learner) -> int:
    module = learner.module["default_policy"]
    tensors = list(module.state_dict().values())
    for state in learner.get_optimizer().state_dict()["state"].values():
        tensors += [v for v in state.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in tensors)


# --------------------------------------------------------------------------------------------------
# torch's checkpoints
# --------------------------------------------------------------------------------------------------


def torch_state(learner) -> dict:
    return {"model": learner.module["default_policy"].state_dict(), "optimizer": learner.get_optimizer().state_dict()}


def torch_restore(twin, source) -> None:
    data = torch.load(source, weights_only=True)
    twin.module["default_policy"].load_state_dict(data["model"])
    twin.get_optimizer().load_state_dict(data["optimizer"])


def torch_save_durable(state: dict, path: pathlib.Path) -> None:
    """``torch.save`` made as durable and atomic as a dlearner checkpoint: a temporary file in the same
    directory, fsynced, renamed over ``path``, and the directory fsynced (so the rename is on disk)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------------
# zarr's public API (--zarr-api)
# --------------------------------------------------------------------------------------------------


def zarr_api_save(path, tree: dict) -> None:
    """``tree`` as a Zarr v3 hierarchy written through zarr's public API."""
    _zarr_write(zarr.open_group(str(path), mode="w", zarr_format=3, attributes=_json_leaves(tree)), tree)


def _json_leaves(tree: dict) -> dict:
    return {k: json_exact(v, k) for k, v in tree.items() if not isinstance(v, (dict, np.ndarray, np.generic))}


def _zarr_write(group, tree: dict) -> None:
    for key, value in tree.items():
        if isinstance(value, dict):
            _zarr_write(group.create_group(key, attributes=_json_leaves(value)), value)
        elif isinstance(value, (np.ndarray, np.generic)):
            value = np.asarray(value)
            array = group.create_array(
                key,
                shape=value.shape,
                dtype=value.dtype,
                chunks=tuple(max(d, 1) for d in value.shape),
                filters=None,
                serializer=BytesCodec(endian="little"),
                compressors=[Crc32cCodec()],
                fill_value=0,
                chunk_key_encoding={"name": "v2", "separator": "."},
                dimension_names=dimension_names(key, value.ndim) or None,
            )
            array[...] = value


def zarr_api_load(path) -> dict:
    """The tree :func:`zarr_api_save` wrote, read through zarr's public API."""
    return _zarr_read(zarr.open_group(str(path), mode="r"))


def _zarr_read(group) -> dict:
    tree = {k: decode_json(v, k) for k, v in group.attrs.items()}
    for key, member in group.members():
        if isinstance(member, zarr.Group):
            tree[key] = _zarr_read(member)
        else:
            data = member[...]
            tree[key] = data[()] if data.ndim == 0 else data
    return tree


def assert_same_arrays(a: dict, b: dict) -> None:
    """The zarr API round trip holds the same values (checked once, outside the timings)."""
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    for key in a:
        if isinstance(a[key], dict):
            assert_same_arrays(a[key], b[key])
        elif isinstance(a[key], np.ndarray):
            np.testing.assert_array_equal(a[key], b[key])
        else:
            assert a[key] == b[key], key


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------


def interleaved_medians(calls: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each call, the calls alternating round by round (so load falls on all alike)."""
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


@dataclass
class Impl:
    """A checkpoint implementation besides torch: save(learner, path) and restore(twin, path)."""

    save: Callable[[Any, str], Any]
    restore: Callable[[Any, str], Any]


def default_impls() -> dict[str, Impl]:
    return {"dlearner": Impl(lambda learner, path: learner.save_to_path(path), lambda twin, path: twin.restore_from_path(path))}


def measure_size(size: str, repeats: int, root: pathlib.Path, impls: dict[str, Impl], zarr_api: bool) -> list[tuple]:
    learner, twin = build_learners(size)
    nbytes = state_bytes(learner)
    mb = nbytes / 1e6
    rows: list[tuple] = []
    tag = uuid.uuid4().hex[:8]
    torch_path = root / f"torch-{tag}.pt"
    torch_durable_path = root / f"torch-durable-{tag}.pt"
    buffer = io.BytesIO()

    def torch_save_memory() -> None:
        buffer.seek(0)
        buffer.truncate()
        torch.save(torch_state(learner), buffer)

    def torch_load_memory() -> None:
        buffer.seek(0)
        torch_restore(twin, buffer)

    # Save-only contenders: dlearner's save including the background deletion it starts.
    extra_saves = ["dlearner + deletion"] if "dlearner" in impls else []
    locations = {
        "local disk": {name: str(root / f"{name.replace(' ', '')}-{tag}") for name in [*impls, *extra_saves]},
        "memory://": {name: f"memory://bench/{name.replace(' ', '')}-{tag}" for name in [*impls, *extra_saves]},
    }
    for where, paths in locations.items():
        saves: dict[str, Callable[[], Any]] = {}
        loads: dict[str, Callable[[], Any]] = {}
        if where == "local disk":
            saves["torch"] = lambda: torch.save(torch_state(learner), torch_path)
            saves["torch durable"] = lambda: torch_save_durable(torch_state(learner), torch_durable_path)
            loads["torch"] = lambda: torch_restore(twin, torch_path)
        else:
            saves["torch"] = torch_save_memory
            loads["torch"] = torch_load_memory
        for name, impl in impls.items():
            saves[name] = lambda impl=impl, path=paths[name]: impl.save(learner, path)
            loads[name] = lambda impl=impl, path=paths[name]: impl.restore(twin, path)
        for name in extra_saves:
            # Waits for its own store's deletion only, not for the other contenders'.
            location = open_backend(paths[name], None).location
            saves[name] = lambda path=paths[name], location=location: (learner.save_to_path(path), wait_for_deletions(location))
        save_t = interleaved_medians(saves, repeats)
        load_t = interleaved_medians(loads, repeats)
        durable = save_t.get("torch durable")
        for op, medians in (("save", save_t), ("restore", load_t)):
            for name in [*impls, *extra_saves] if op == "save" else impls:
                t = medians[name]
                rows.append(
                    (
                        size if not rows else "",
                        where,
                        f"{op} {name}",
                        fmt_s(t),
                        f"{mb / t:.0f}",
                        fmt_s(medians["torch"]),
                        f"{mb / medians['torch']:.0f}",
                        f"{t / medians['torch']:.2f}",
                        f"{t / durable:.2f} ({fmt_s(durable)})" if op == "save" and durable else "",
                    )
                )
        if zarr_api and size == "1MB":
            api_path = str(root / f"zarr-api-{tag}") if where == "local disk" else f"memory://bench/zarr-api-{tag}"
            zarr_api_save(api_path, learner.get_state())
            assert_same_arrays(zarr_api_load(api_path), learner.get_state())
            api = interleaved_medians(
                {
                    "save": lambda p=api_path: zarr_api_save(p, learner.get_state()),
                    "torch save": saves["torch"],
                    "restore": lambda p=api_path: twin.set_state(zarr_api_load(p)),
                    "torch restore": loads["torch"],
                },
                repeats,
            )
            for op in ("save", "restore"):
                rows.append(
                    (
                        "",
                        where,
                        f"{op} zarr API",
                        fmt_s(api[op]),
                        f"{mb / api[op]:.0f}",
                        fmt_s(api[f"torch {op}"]),
                        f"{mb / api[f'torch {op}']:.0f}",
                        f"{api[op] / api[f'torch {op}']:.2f}",
                        "",
                    )
                )
    rows[0] = (f"{size} ({mb:.1f} MB)", *rows[0][1:])
    return rows


def main(argv: list[str] | None = None, impls: dict[str, Impl] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1MB,200MB", help=f"comma-separated, of {', '.join(SIZES)} (default: 1MB,200MB)")
    parser.add_argument("--repeats", type=int, default=9, help="timed rounds for the 1MB state (default 9)")
    parser.add_argument("--big-repeats", type=int, default=3, help="timed rounds for 200MB and 2GB states (default 3)")
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    parser.add_argument("--zarr-api", action="store_true", help="add zarr public API rows for the 1MB state")
    args = parser.parse_args(argv)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        parser.error(f"unknown sizes {unknown}; choose from {list(SIZES)}")
    torch.set_num_threads(1)
    impls = impls or default_impls()
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {os.cpu_count()} CPUs")
    rows: list[tuple] = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for size in sizes:
            repeats = args.repeats if SIZES[size] is None else args.big_repeats
            rows += measure_size(size, repeats, pathlib.Path(tmp), impls, args.zarr_api)
    print_table(
        f"Checkpoint save/restore of PPO learners (weights + Adam moments); medians of {args.repeats} rounds (1MB) "
        f"and {args.big_repeats} (larger), contenders alternating; MB/s = state bytes / median",
        rows,
        header=("state", "where", "operation", "median", "MB/s", "torch", "torch MB/s", "ratio", "vs torch durable"),
    )
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
