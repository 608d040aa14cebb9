"""RL modules and action distributions."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch.distributions import Categorical, Normal, kl_divergence

from dlearner import Columns, MultiRLModule, RLModuleSpec
from dlearner.distributions import TorchCategorical, TorchDiagGaussian
from dlearner.rl_module import DefaultActorCriticRLModule


def test_default_module_for_discrete_actions(cartpole):
    module = RLModuleSpec(observation_space=cartpole.observation_space, action_space=cartpole.action_space).build()
    assert isinstance(module, DefaultActorCriticRLModule)
    out = module.forward_train({Columns.OBS: torch.zeros(5, 4)})
    assert out[Columns.ACTION_DIST_INPUTS].shape == (5, 2) and out[Columns.VF_PREDS].shape == (5,)
    assert module.forward_inference({Columns.OBS: torch.zeros(5, 4)})[Columns.ACTION_DIST_INPUTS].shape == (5, 2)
    assert module.forward_exploration({Columns.OBS: torch.zeros(5, 4)})[Columns.ACTION_DIST_INPUTS].shape == (5, 2)
    assert module.get_train_action_dist_cls() is TorchCategorical
    # RLlib's defaults: [256, 256] tanh, separate policy and value networks.
    assert module.pi[0].out_features == 256 and isinstance(module.pi[1], torch.nn.Tanh) and module.encoder is None


def test_default_module_for_box_actions_and_shared_layers():
    env = gym.make("Pendulum-v1")
    spec = RLModuleSpec(
        observation_space=env.observation_space,
        action_space=env.action_space,
        model_config={"fcnet_hiddens": [16], "vf_share_layers": True, "fcnet_activation": "relu"},
    )
    module = spec.build()
    out = module.forward_train({Columns.OBS: torch.zeros(3, 3)})
    assert out[Columns.ACTION_DIST_INPUTS].shape == (3, 2)  # mean and log-std of a 1-D action
    assert module.get_train_action_dist_cls() is TorchDiagGaussian
    assert module.encoder is not None


def test_unknown_model_config_keys_are_refused(cartpole):
    with pytest.raises(ValueError, match="fcnet_hidden"):
        RLModuleSpec(
            observation_space=cartpole.observation_space, action_space=cartpole.action_space, model_config={"fcnet_hidden": [8]}
        ).build()


def test_unsupported_spaces_are_refused_with_advice(cartpole):
    with pytest.raises(ValueError, match="Tuple"):
        RLModuleSpec(
            observation_space=cartpole.observation_space, action_space=gym.spaces.Tuple([gym.spaces.Discrete(2)])
        ).build()


def test_module_state_is_numpy_and_round_trips(cartpole):
    spec = RLModuleSpec(
        observation_space=cartpole.observation_space, action_space=cartpole.action_space, model_config={"fcnet_hiddens": [8]}
    )
    a, b = spec.build(), spec.build()
    b.set_state(a.get_state())
    for key, value in a.get_state().items():
        assert isinstance(value, np.ndarray)
        np.testing.assert_array_equal(value, b.get_state()[key])
    with pytest.raises(ValueError, match="missing"):
        b.set_state({})


def test_multi_rl_module_is_a_dict_of_modules(cartpole):
    spec = RLModuleSpec(
        observation_space=cartpole.observation_space, action_space=cartpole.action_space, model_config={"fcnet_hiddens": [8]}
    )
    multi = MultiRLModule({"a": spec.build()})
    multi.add_module("b", spec.build())
    assert list(multi.keys()) == ["a", "b"] and "a" in multi and len(multi) == 2
    with pytest.raises(ValueError, match="already exists"):
        multi.add_module("a", spec.build())
    multi.remove_module("a")
    assert list(multi) == ["b"]
    with pytest.raises(ValueError, match="reserved"):
        multi.add_module("__all_modules__", spec.build())


def test_categorical_matches_torch_distributions():
    logits, other = torch.randn(6, 3), torch.randn(6, 3)
    actions = torch.randint(0, 3, (6,))
    ours, ref = TorchCategorical.from_logits(logits), Categorical(logits=logits)
    torch.testing.assert_close(ours.logp(actions), ref.log_prob(actions))
    torch.testing.assert_close(ours.entropy(), ref.entropy())
    torch.testing.assert_close(ours.kl(TorchCategorical.from_logits(other)), kl_divergence(ref, Categorical(logits=other)))
    assert ours.sample().shape == (6,)
    torch.testing.assert_close(ours.deterministic_sample(), logits.argmax(-1))


def test_diag_gaussian_matches_torch_distributions():
    inputs, other = torch.randn(6, 4), torch.randn(6, 4)
    actions = torch.randn(6, 2)
    ours = TorchDiagGaussian.from_logits(inputs)
    ref = Normal(inputs[:, :2], inputs[:, 2:].exp())
    ref_other = Normal(other[:, :2], other[:, 2:].exp())
    torch.testing.assert_close(ours.logp(actions), ref.log_prob(actions).sum(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.entropy(), ref.entropy().sum(-1))
    torch.testing.assert_close(
        ours.kl(TorchDiagGaussian.from_logits(other)), kl_divergence(ref, ref_other).sum(-1), rtol=1e-5, atol=1e-5
    )
    generator = torch.Generator().manual_seed(0)
    assert ours.sample(generator=generator).shape == (6, 2)
    torch.testing.assert_close(ours.deterministic_sample(), inputs[:, :2])


def test_discrete_start_actions_are_env_values_mapped_to_logit_indices():
    space = gym.spaces.Discrete(3, start=-1)
    dist_cls = RLModuleSpec(observation_space=gym.spaces.Box(-1, 1, (2,)), action_space=space).build().get_train_action_dist_cls()
    logits = torch.randn(6, 3)
    dist, ref = dist_cls.from_logits(logits), Categorical(logits=logits)
    actions = torch.tensor([-1, 0, 1, 1, 0, -1])
    torch.testing.assert_close(dist.logp(actions), ref.log_prob(actions + 1))  # logit 0 is action -1
    torch.testing.assert_close(dist.deterministic_sample(), logits.argmax(-1) - 1)
    samples = dist_cls.from_logits(torch.zeros(1000, 3)).sample(generator=torch.Generator().manual_seed(0))
    assert set(samples.tolist()) == {-1, 0, 1}


def test_categorical_class_for_a_start_is_one_class_and_pickles_by_name():
    import pickle

    cls = TorchCategorical.for_space(gym.spaces.Discrete(4, start=5))
    assert cls is TorchCategorical.for_space(gym.spaces.Discrete(2, start=5)) and cls.start == 5
    assert TorchCategorical.for_space(gym.spaces.Discrete(2)) is TorchCategorical
    assert pickle.loads(pickle.dumps(cls)) is cls
    negative = TorchCategorical.for_space(gym.spaces.Discrete(2, start=-3))
    assert pickle.loads(pickle.dumps(negative)) is negative


def test_default_module_takes_dict_observations_flattened():
    obs_space = gym.spaces.Dict({"pos": gym.spaces.Box(-1, 1, (3,)), "mode": gym.spaces.Discrete(4)})
    module = RLModuleSpec(
        observation_space=obs_space, action_space=gym.spaces.Discrete(2), model_config={"fcnet_hiddens": [8]}
    ).build()
    assert module.pi[0].in_features == gym.spaces.flatdim(obs_space) == 7
    assert module.forward_train({Columns.OBS: torch.zeros(5, 7)})[Columns.ACTION_DIST_INPUTS].shape == (5, 2)


def test_module_spec_json_round_trip_keeps_discrete_start():
    spec = RLModuleSpec(
        observation_space=gym.spaces.Box(-1, 1, (2,)),
        action_space=gym.spaces.Discrete(3, start=-2),
        model_config={"fcnet_hiddens": [8]},
    )
    restored = RLModuleSpec.from_json(spec.to_json(), module_class=DefaultActorCriticRLModule)
    assert restored.action_space == gym.spaces.Discrete(3, start=-2)
    assert restored.build().get_train_action_dist_cls().start == -2
