"""PPO learns from pixels: ``FindTheSquare``'s 42x42 uint8 images, through the default CNN encoder.

Each step shows a noisy image with one bright square; the policy says in which half it lies. A
random policy scores 5 of 10 per episode; the CNN (dlearner's default filters for 42x42 images,
one encoder shared by policy and value) gets past 9 in about 10,000 env steps, well under a minute
on 2 cores. Observations stay uint8 from the env to the module, which scales them to [0, 1].

Run: python examples/image_find_the_square.py [--num-learners N] [--num-env-runners M] [--size 84]
With 0 learners and 0 env runners everything runs in this process; otherwise an embedded Dask
LocalCluster starts (and is closed at the end).
"""

from __future__ import annotations

import argparse

from dlearner import PPOConfig
from dlearner.envs import FindTheSquare


def main(
    num_learners: int = 0, num_env_runners: int = 0, size: int = 42, stop_return: float = 9.0, max_iters: int = 25, seed: int = 0
) -> dict:
    config = (
        PPOConfig()
        .environment(FindTheSquare, env_config={"size": size})
        .env_runners(num_env_runners=num_env_runners, num_envs_per_env_runner=4)
        .learners(num_learners=num_learners)
        # conv_filters=None: the default filters for the image's size; fcnet_hiddens follow the encoder.
        .rl_module(model_config={"conv_filters": None, "fcnet_hiddens": [64], "vf_share_layers": True})
        .training(train_batch_size=1000, minibatch_size=250, num_epochs=4, lr=1e-3)
        .debugging(seed=seed)
    )
    with config.build_algo() as algo:
        for _ in range(max_iters):
            result = algo.train()
            print(
                f"iter {result['training_iteration']:3d}  env steps {result['num_env_steps_sampled_lifetime']:6d}  "
                f"return {result['env_runners']['episode_return_mean']:5.2f}",
                flush=True,
            )
            if result["env_runners"]["episode_return_mean"] >= stop_return:
                break
        evaluation = algo.evaluate(20, seed=seed + 1000)["env_runners"]
        print(f"greedy evaluation over {evaluation['num_episodes']} episodes: {evaluation['episode_return_mean']:.2f} of 10")
        return {"result": result, "evaluation": evaluation}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-learners", type=int, default=0)
    parser.add_argument("--num-env-runners", type=int, default=0)
    parser.add_argument("--size", type=int, default=42, choices=[42, 64, 84])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(args.num_learners, args.num_env_runners, args.size, seed=args.seed)
