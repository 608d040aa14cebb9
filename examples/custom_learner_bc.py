"""A custom Learner in one method: behaviour cloning of a fixed expert on CartPole observations.

Run: python examples/custom_learner_bc.py
A new algorithm is a TorchLearner subclass that overrides compute_loss_for_module (and, if it
needs other optimizers, configure_optimizers_for_module); everything else comes with the Learner.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch

from dlearner import AlgorithmConfig, Columns, TorchLearner


class BCTorchLearner(TorchLearner):
    """Maximise the log-likelihood of the expert's actions."""

    def compute_loss_for_module(self, *, module_id, config, batch, fwd_out):
        dist_cls = self.module[module_id].get_train_action_dist_cls()
        dist = dist_cls.from_logits(fwd_out[Columns.ACTION_DIST_INPUTS])
        return -torch.mean(dist.logp(batch[Columns.ACTIONS]))


def expert_action(obs: np.ndarray) -> np.ndarray:
    """A fixed CartPole expert: push towards where the pole is falling."""
    return (obs[:, 2] + 0.5 * obs[:, 3] > 0).astype(np.int64)


def main(num_updates: int = 150, seed: int = 0) -> float:
    env = gym.make("CartPole-v1")
    rng = np.random.default_rng(seed)
    obs = rng.uniform(-1, 1, size=(4096, 4)).astype(np.float32) * np.array([2.4, 2.0, 0.2, 2.0], np.float32)
    demos = {Columns.OBS: obs, Columns.ACTIONS: expert_action(obs)}

    config = (
        AlgorithmConfig()
        .training(learner_class=BCTorchLearner, lr=3e-3, minibatch_size=512, num_epochs=1)
        .rl_module(model_config={"fcnet_hiddens": [64, 64]})
        .debugging(seed=seed)
    )
    learner = config.build_learner(env=env)
    learner.build()
    for i in range(num_updates):
        result = learner.update(demos)
        if i % 50 == 0:
            print(f"update {i:4d}  loss {result['default_policy']['total_loss']:.4f}")

    test_obs = rng.uniform(-1, 1, size=(2000, 4)).astype(np.float32) * np.array([2.4, 2.0, 0.2, 2.0], np.float32)
    with torch.no_grad():
        logits = learner.module["default_policy"].forward_inference({Columns.OBS: torch.from_numpy(test_obs)})[
            Columns.ACTION_DIST_INPUTS
        ]
    accuracy = float((logits.argmax(-1).numpy() == expert_action(test_obs)).mean())
    print(f"action accuracy on held-out states: {accuracy:.1%}")
    return accuracy


if __name__ == "__main__":
    main()
