"""Checkpoint save/restore medians and store sizes: dlearner's Zarr store vs torch.save/torch.load.

Run: python benchmarks/checkpoint.py [--repeats 20] [--dir DIR]
The state is a PPO learner's after one update of the W1 batch ([256, 256] policy and value MLPs plus
Adam moments); torch saves the same tensors (module and optimizer state_dicts) to one file.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import uuid

import gymnasium as gym
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import W1, fmt_s, load_w1_batch, median_time, print_table  # noqa: E402

from dlearner import PPOConfig  # noqa: E402


def dir_size(path: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    learner = PPOConfig().rl_module(model_config={"fcnet_hiddens": W1["hiddens"]}).debugging(seed=0).build_learner(env=gym.make("CartPole-v1"))
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
        memory_path = f"memory://bench/{uuid.uuid4().hex}"

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
            save = median_time(lambda: learner.save_to_path(path), repeats=args.repeats)
            load = median_time(lambda: twin.restore_from_path(path), repeats=args.repeats)
            rows.append((f"dlearner save, {label}", fmt_s(save), f"{save / t_save:.2f}", size()))
            rows.append((f"dlearner restore, {label}", fmt_s(load), f"{load / t_load:.2f}", ""))
    print_table(
        f"Checkpoint of a PPO learner ({numbers / 1e3:.0f}k numbers: weights + Adam moments), "
        f"median of {args.repeats}; ratios vs torch",
        rows,
        header=("run", "median", "ratio", "size"),
    )


if __name__ == "__main__":
    main()
