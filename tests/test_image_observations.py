"""Image observations: the default modules' CNN encoder, and uint8 observations kept uint8 from the env
runner to the loss (the module scales them to [0, 1])."""

from __future__ import annotations

import importlib.util
import pathlib

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import killable_cluster

from dlearner import APPOConfig, Columns, PPOConfig, RLModule, RLModuleSpec, SACConfig
from dlearner.algorithms.appo import APPOTorchLearner
from dlearner.algorithms.ppo import PPOTorchLearner
from dlearner.algorithms.sac import SACTorchLearner
from dlearner.columns import DEFAULT_MODULE_ID
from dlearner.conv_encoder import ConvEncoder
from dlearner.envs import FindTheSquare

IMAGE = gym.spaces.Box(0, 255, (42, 42, 1), np.uint8)
TWO_ACTIONS = gym.spaces.Discrete(2)
SMALL_CNN = {"conv_filters": [[8, [4, 4], 2], [16, [4, 4], 2]], "fcnet_hiddens": [32]}


def image_space(height: int, width: int, channels: int = 4) -> gym.spaces.Box:
    return gym.spaces.Box(0, 255, (height, width, channels), np.uint8)


@pytest.mark.parametrize("size", [84, 64, 42])
def test_default_filters_exist_for_84_64_and_42_pixel_images(size):
    module = RLModuleSpec(observation_space=image_space(size, size), action_space=gym.spaces.Discrete(6)).build()
    assert module.pi_conv.out_dim == 256
    obs = torch.zeros((3, size, size, 4), dtype=torch.uint8)
    out = module.forward_train({Columns.OBS: obs})
    assert out[Columns.ACTION_DIST_INPUTS].shape == (3, 6) and out[Columns.VF_PREDS].shape == (3,)


def test_other_image_sizes_need_conv_filters():
    with pytest.raises(ValueError, match=r"50x50.*conv_filters"):
        RLModuleSpec(observation_space=image_space(50, 50), action_space=TWO_ACTIONS).build()
    module = RLModuleSpec(
        observation_space=image_space(50, 50), action_space=TWO_ACTIONS, model_config={"conv_filters": [[8, [5, 5], 3]]}
    ).build()
    assert module.pi_conv.out_dim == 8 * 17 * 17  # "same" padding: ceil(50 / 3) = 17


def test_building_an_algorithm_with_an_unsupported_image_size_says_conv_filters():
    config = PPOConfig().environment(FindTheSquare, env_config={"size": 30}).env_runners(num_env_runners=0)
    with pytest.raises(ValueError, match="conv_filters"):
        config.learners(num_learners=0).build_algo()


def test_filters_that_do_not_fit_the_image_are_refused():
    filters = [[16, [8, 8], 4], [32, [12, 12], 1, "valid"]]  # 42 / 4 -> 11 pixels, a 12-pixel kernel
    with pytest.raises(ValueError, match=r"conv_filters'\]\[1\].*does not fit the 42x42 image"):
        RLModuleSpec(observation_space=IMAGE, action_space=TWO_ACTIONS, model_config={"conv_filters": filters}).build()


@pytest.mark.parametrize(
    "conv_filters, message",
    [
        ([[16, [0, 4], 2]], r"\[0\].*kernel size"),
        ([[16, [4, 4], 0]], r"\[0\].*stride"),
        ([[0, [4, 4], 2]], r"\[0\].*out_channels"),
        ([[16, [4, 4], 2], [8, 3, 1, "full"]], r"\[1\].*padding must be 'same' or 'valid'"),
        ([], "non-empty list"),
        ("big", "non-empty list"),
    ],
)
def test_bad_conv_filters_are_refused_with_the_setting_named(conv_filters, message):
    with pytest.raises(ValueError, match=message):
        PPOConfig().rl_module(model_config={"conv_filters": conv_filters}).build_learner(spaces=(IMAGE, TWO_ACTIONS))


def test_bad_conv_activation_is_refused():
    with pytest.raises(ValueError, match="conv_activation"):
        RLModuleSpec(observation_space=IMAGE, action_space=TWO_ACTIONS, model_config={"conv_activation": "gelu?"}).build()


def test_same_padding_gives_ceil_of_size_over_stride_as_rllib():
    for size, kernel, stride in [(42, 4, 2), (21, 3, 2), (84, 8, 4), (11, 11, 1), (7, 2, 3)]:
        encoder = ConvEncoder(image_space(size, size, 1), {"conv_filters": [[1, [kernel, kernel], stride]]})
        out = encoder(torch.zeros((1, size, size, 1), dtype=torch.uint8))
        side = -(-size // stride)
        assert out.shape == (1, side * side) and encoder.out_dim == side * side


def test_uint8_observations_become_floats_in_0_1_inside_the_module():
    module = RLModuleSpec(observation_space=IMAGE, action_space=TWO_ACTIONS, model_config=SMALL_CNN).build()
    pixels = torch.randint(0, 256, (5, 42, 42, 1), dtype=torch.uint8)
    from_uint8 = module.forward_train({Columns.OBS: pixels})
    from_floats = module.forward_train({Columns.OBS: pixels.float() / 255.0})
    for key in from_uint8:
        torch.testing.assert_close(from_uint8[key], from_floats[key])


def test_a_custom_module_reuses_the_conv_encoder():
    class TinyPolicy(RLModule):
        def setup(self):
            self.encoder = ConvEncoder(self.observation_space, self.model_config)
            self.head = torch.nn.Linear(self.encoder.out_dim, 2)

        def forward_train(self, batch):
            return {Columns.ACTION_DIST_INPUTS: self.head(self.encoder(batch[Columns.OBS]))}

    module = RLModuleSpec(
        module_class=TinyPolicy, observation_space=IMAGE, action_space=TWO_ACTIONS, model_config=SMALL_CNN
    ).build()
    out = module.forward_train({Columns.OBS: torch.zeros((2, 42, 42, 1), dtype=torch.uint8)})
    assert out[Columns.ACTION_DIST_INPUTS].shape == (2, 2)


# -- uint8 on every hop --------------------------------------------------------------------------------
class _ObsDtypeMixin:
    """Reports, per update, whether the batch's observations reached the loss as uint8."""

    def compute_loss_for_module(self, *, module_id, config, batch, fwd_out):
        for column in (Columns.OBS, Columns.NEXT_OBS):
            if column in batch:
                self.metrics.log_value((module_id, f"{column}_uint8"), float(batch[column].dtype == torch.uint8), reduce="last")
        return super().compute_loss_for_module(module_id=module_id, config=config, batch=batch, fwd_out=fwd_out)


class ObsDtypePPOLearner(_ObsDtypeMixin, PPOTorchLearner):
    pass


class ObsDtypeAPPOLearner(_ObsDtypeMixin, APPOTorchLearner):
    pass


class ObsDtypeSACLearner(_ObsDtypeMixin, SACTorchLearner):
    pass


@pytest.fixture(scope="module")
def client():
    with killable_cluster(2) as client:  # two worker processes: an env runner and a learner
        yield client


def _image_config(config_class, learner_class, **training):
    return (
        config_class()
        .environment(FindTheSquare, env_config={"size": 42})
        .env_runners(num_env_runners=1)
        .learners(num_learners=1, learner_startup_timeout_s=60)
        .rl_module(model_config=SMALL_CNN)
        .training(learner_class=learner_class, **training)
        .debugging(seed=1)
    )


@pytest.mark.parametrize(
    "config_class, learner_class, training",
    [
        (PPOConfig, ObsDtypePPOLearner, dict(train_batch_size=200, minibatch_size=100, num_epochs=1)),
        (APPOConfig, ObsDtypeAPPOLearner, dict(train_batch_size=100, min_time_s_per_iteration=0)),
        (
            SACConfig,
            ObsDtypeSACLearner,
            dict(train_batch_size=32, num_steps_sampled_before_learning_starts=64, min_sample_timesteps_per_iteration=128),
        ),
    ],
    ids=["PPO", "APPO", "SAC"],
)
def test_uint8_observations_stay_uint8_from_the_env_runner_to_the_loss(client, config_class, learner_class, training):
    with _image_config(config_class, learner_class, **training).cluster(client=client).build_algo() as algo:
        results = {}
        for _ in range(10):
            results = algo.train()["learners"].get(DEFAULT_MODULE_ID, {})
            if "obs_uint8" in results:
                break
        assert results["obs_uint8"] == 1.0
        if config_class is SACConfig:
            assert results["new_obs_uint8"] == 1.0
            dtypes = algo.learner_group.foreach_learner(
                lambda learner: {
                    name: str(value.dtype)
                    for name, value in learner.replay_buffer.get_state()["columns"].items()
                    if "obs" in name
                }
            )[0]
            assert dtypes and set(dtypes.values()) == {"uint8"}, dtypes


def test_a_cnn_checkpoint_restores_the_same_policy_and_keeps_uint8_replay_rows(tmp_path):
    config = (
        SACConfig()
        .environment(FindTheSquare, env_config={"size": 42})
        .env_runners(num_env_runners=0)
        .learners(num_learners=0)
        .rl_module(model_config=SMALL_CNN)
        .training(
            train_batch_size=32,
            num_steps_sampled_before_learning_starts=64,
            min_sample_timesteps_per_iteration=128,
            store_buffer_in_checkpoints=True,
        )
        .debugging(seed=2)
    )
    with config.build_algo() as algo:
        algo.train()
        algo.save_to_path(tmp_path / "ckpt")
        weights = algo.learner_group.get_weights()
    with config.build_algo() as restored:
        restored.restore_from_path(tmp_path / "ckpt")
        for name, value in weights[DEFAULT_MODULE_ID].items():
            np.testing.assert_array_equal(restored.learner_group.get_weights()[DEFAULT_MODULE_ID][name], value, err_msg=name)
        buffer = restored.learner_group.foreach_learner(lambda learner: learner.replay_buffer.get_state())[0]
        obs_columns = {name: value for name, value in buffer["columns"].items() if "obs" in name}
        assert obs_columns and all(value.dtype == np.uint8 for value in obs_columns.values())
    module = RLModule.from_checkpoint(tmp_path / "ckpt")
    assert isinstance(module.pi.conv, ConvEncoder)


@pytest.mark.slow
def test_the_image_example_learns_where_the_square_is_from_pixels(capsys):
    path = pathlib.Path(__file__).resolve().parent.parent / "examples" / "image_find_the_square.py"
    spec = importlib.util.spec_from_file_location("image_find_the_square_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = example.main(seed=0)
    assert out["result"]["env_runners"]["episode_return_mean"] >= 9.0  # a random policy gets 5 of 10
    assert out["evaluation"]["episode_return_mean"] >= 9.0
    assert "greedy evaluation over 20 episodes" in capsys.readouterr().out
