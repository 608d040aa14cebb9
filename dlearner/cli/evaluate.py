"""``dlearner evaluate DIR``: greedy episodes with a checkpoint's policy, in this process."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dlearner.cli.algorithms import algo_name, config_from_dict
from dlearner.cli.errors import EXIT_OK, UsageError, flag
from dlearner.cli.runs import load_run_metadata, restore_env
from dlearner.reporting import returns_by_id


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``dlearner evaluate DIR``: greedy episodes with the checkpoint's policy, in this process."""
    metadata = load_run_metadata(args.checkpoint, "evaluate")
    config = config_from_dict(metadata["config"])
    restore_env(config, metadata, args, "drop --env.")
    # Evaluation is a few episodes in this process: no cluster, no GPU, whatever the run used. The
    # run's num_envs_per_env_runner stays: that many episodes run side by side.
    config.learners(num_learners=0, num_gpus_per_learner=0)
    config.env_runners(num_env_runners=0)
    config.address, config.scheduler_file, config.client = None, None, None
    counters = metadata.get("counters") or {}
    if args.gif is not None:
        gif_dir = Path(args.gif).expanduser().resolve().parent
        if not gif_dir.is_dir():
            raise UsageError(f"argument --gif: the folder {str(gif_dir)!r} does not exist; create it or pick another path.")
    with config.build_algo() as algo:
        algo.restore_from_path(args.checkpoint)
        if args.gif is None:
            out = algo.evaluate(args.episodes, seed=args.seed)["env_runners"]
        else:
            with flag("--gif"):  # an env that cannot render RGB images, a multi-agent run
                out = algo.evaluate(args.episodes, seed=args.seed, gif_path=args.gif, gif_max_frames=args.gif_max_frames)[
                    "env_runners"
                ]
    if args.json:
        gif = {"gif": args.gif} if args.gif is not None else {}
        print(json.dumps({"checkpoint": args.checkpoint, "iteration": counters.get("iteration"), **out, **gif}))
        return EXIT_OK
    print(
        f"checkpoint {args.checkpoint}: {algo_name(config)} on {config.env}, iteration {counters.get('iteration', '?')}, "
        f"{counters.get('num_env_steps_sampled_lifetime', 0):,} env steps"
    )
    for number, episode_return in enumerate(out["episode_returns"], start=1):
        print(f"episode {number:3d}: return {episode_return:.1f}")
    print(
        f"mean return over {out['num_episodes']} greedy episodes: {out['episode_return_mean']:.1f} "
        f"(min {out['episode_return_min']:.1f}, max {out['episode_return_max']:.1f}, "
        f"mean length {out['episode_len_mean']:.1f})"
    )
    per_agent = returns_by_id(out.get("agent_episode_returns_mean"))
    if per_agent:  # a multi-agent run: the return above is the sum over its agents
        print(f"mean return per agent: {per_agent} (the mean return above is their sum)")
    if args.gif is not None:
        print(f"episode 1 written to {args.gif} ({out['gif_frames']} frames)")
    return EXIT_OK
