"""Checkpoint save/restore medians and store sizes: dlearner's Zarr store vs torch.save/torch.load and
vs the same store written and read through zarr's public API.

Run: python benchmarks/checkpoint.py [--repeats 20] [--dir DIR]
The state is a PPO learner's after one update of the W1 batch ([256, 256] policy and value MLPs plus
Adam moments); torch saves the same tensors (module and optimizer state_dicts) to one file.

The "zarr API" rows write the same state tree with ``zarr.open_group`` / ``Group.create_array`` (one
chunk per array, the same ``bytes`` + ``crc32c`` codecs and dimension names, JSON leaves as group
attributes) and read it back with ``Group.members`` and ``array[...]``. They skip dlearner's commit
protocol and manifest, so they do less than dlearner does: the comparison shows what the hand-written
encoder in ``dlearner/checkpoint/encoding.py`` saves over the public API, and whether it still does.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import uuid

import gymnasium as gym
import numpy as np
import torch
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import W1, fmt_s, load_w1_batch, median_time, print_table  # noqa: E402

from dlearner import PPOConfig  # noqa: E402
from dlearner.checkpoint.encoding import decode_json, dimension_names  # noqa: E402
from dlearner.jsonsafe import json_exact  # noqa: E402


def dir_size(path: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    learner = (
        PPOConfig()
        .rl_module(model_config={"fcnet_hiddens": W1["hiddens"]})
        .debugging(seed=0)
        .build_learner(env=gym.make("CartPole-v1"))
    )
    learner.build()
    learner.update(load_w1_batch(), {"num_env_steps_sampled_lifetime": 4000})
    twin = PPOConfig().rl_module(model_config={"fcnet_hiddens": W1["hiddens"]}).build_learner(env=gym.make("CartPole-v1"))
    twin.build()
    module = learner.module["default_policy"]
    optimizer = learner.get_optimizer()
    numbers = sum(p.numel() for p in module.parameters()) * 3

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = pathlib.Path(tmp)
        zarr_path, torch_path = root / "zarr-ckpt", root / "torch-ckpt.pt"
        api_path = root / "zarr-api-ckpt"
        memory_path = f"memory://bench/{uuid.uuid4().hex}"
        api_memory_path = f"memory://bench/{uuid.uuid4().hex}"

        def torch_save():
            torch.save({"model": module.state_dict(), "optimizer": optimizer.state_dict()}, torch_path)

        def torch_load():
            data = torch.load(torch_path, weights_only=True)
            twin.module["default_policy"].load_state_dict(data["model"])
            twin.get_optimizer().load_state_dict(data["optimizer"])

        rows = []
        t_save = median_time(torch_save, repeats=args.repeats)
        t_load = median_time(torch_load, repeats=args.repeats)
        rows.append(("torch.save (one file)", fmt_s(t_save), "1.00", f"{os.path.getsize(torch_path) / 1e6:.2f} MB"))
        rows.append(("torch.load + load_state_dict", fmt_s(t_load), "1.00", ""))
        for label, path, size in (
            ("local disk", zarr_path, lambda: f"{dir_size(zarr_path) / 1e6:.2f} MB"),
            ("memory://", memory_path, lambda: ""),
        ):
            save = median_time(lambda path=path: learner.save_to_path(path), repeats=args.repeats)
            load = median_time(lambda path=path: twin.restore_from_path(path), repeats=args.repeats)
            rows.append((f"dlearner save, {label}", fmt_s(save), f"{save / t_save:.2f}", size()))
            rows.append((f"dlearner restore, {label}", fmt_s(load), f"{load / t_load:.2f}", ""))
        # The same work through zarr's public API: get_state + write; read + set_state.
        for label, path, size in (
            ("local disk", api_path, lambda: f"{dir_size(api_path) / 1e6:.2f} MB"),
            ("memory://", api_memory_path, lambda: ""),
        ):
            zarr_api_save(path, learner.get_state())
            assert_same_arrays(zarr_api_load(path), learner.get_state())
            save = median_time(lambda path=path: zarr_api_save(path, learner.get_state()), repeats=args.repeats)
            load = median_time(lambda path=path: twin.set_state(zarr_api_load(path)), repeats=args.repeats)
            rows.append((f"zarr API save, {label}", fmt_s(save), f"{save / t_save:.2f}", size()))
            rows.append((f"zarr API restore, {label}", fmt_s(load), f"{load / t_load:.2f}", ""))
    print_table(
        f"Checkpoint of a PPO learner ({numbers / 1e3:.0f}k numbers: weights + Adam moments), "
        f"median of {args.repeats}; ratios vs torch",
        rows,
        header=("run", "median", "ratio", "size"),
    )


if __name__ == "__main__":
    main()
