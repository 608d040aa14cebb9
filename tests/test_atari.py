"""Atari: ``.environment(..., atari=True)`` / ``dlearner train --atari`` applies the standard
preprocessing to ALE games (84x84 grayscale, frame skip 4, noop starts, the 4 latest frames stacked
last), the setting survives checkpoints, and APPO trains and evaluates on ALE/Pong-v5 end to end.

ale-py and opencv are in the test extra: these tests run, never skip."""

from __future__ import annotations

import json
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
from conftest import usage_error
from PIL import Image
from test_cli import dlearner

from dlearner import PPOConfig
from dlearner.algorithms.appo import APPOConfig
from dlearner.cli.parser import build_parser
from dlearner.cli.runs import load_run_metadata
from dlearner.cli.train_config import make_config
from dlearner.config import AlgorithmConfig
from dlearner.envs.atari import FrameStackLast, make_atari_env, register_ale_envs

PONG = "ALE/Pong-v5"
ATARI_SPACE = gym.spaces.Box(0, 255, (84, 84, 4), np.uint8)


def parsed(*args: str):
    return build_parser().parse_args(list(args))


# ------------------------------------------------------------------------------ the wrapper
def test_atari_observations_are_84x84x4_uint8():
    env = PPOConfig().environment(PONG, atari=True).make_env()
    try:
        assert env.observation_space == ATARI_SPACE
        assert env.observation_space.dtype == np.uint8
        assert env.action_space == gym.spaces.Discrete(6)
        obs, _ = env.reset(seed=0)
        assert obs.shape == (84, 84, 4) and obs.dtype == np.uint8 and obs.flags.c_contiguous
        assert env.observation_space.contains(obs)
        # A reset fills the stack with its first frame.
        assert all(np.array_equal(obs[..., i], obs[..., 3]) for i in range(3))
    finally:
        env.close()


def test_pong_stacks_the_latest_frame_last():
    env = PPOConfig().environment(PONG, atari=True).make_env()
    try:
        obs, _ = env.reset(seed=1)
        actions = np.random.default_rng(0).integers(0, 6, 60)
        changed = 0
        for action in actions:
            next_obs, _, terminated, truncated, _ = env.step(action)
            assert not (terminated or truncated)  # no reset between obs and next_obs
            assert next_obs.shape == (84, 84, 4) and next_obs.dtype == np.uint8
            # The frames shift one place towards the front; the new one is last.
            assert np.array_equal(obs[..., 3], next_obs[..., 2])
            assert np.array_equal(obs[..., 1:], next_obs[..., :3])
            changed += not np.array_equal(next_obs[..., 3], next_obs[..., 2])
            obs = next_obs
        assert changed > 10  # the game moves: the checks above compared different frames
    finally:
        env.close()


def test_the_stack_is_gymnasiums_frame_stack_with_channels_last():
    """Same seed and actions: our (84, 84, 4) observation is gymnasium's FrameStackObservation of
    AtariPreprocessing, (4, 84, 84), with the stack axis moved last (so the preprocessing is the standard one)."""
    register_ale_envs()
    ours = make_atari_env(PONG)
    reference = gym.make(PONG, frameskip=1)
    reference = gym.wrappers.AtariPreprocessing(
        reference, noop_max=30, frame_skip=4, screen_size=84, grayscale_obs=True, terminal_on_life_loss=False
    )
    reference = gym.wrappers.FrameStackObservation(reference, 4)
    try:
        obs, _ = ours.reset(seed=3)
        ref_obs, _ = reference.reset(seed=3)
        assert np.array_equal(obs, np.moveaxis(ref_obs, 0, -1))
        for action in np.random.default_rng(1).integers(0, 6, 40):
            obs, reward, terminated, truncated, _ = ours.step(action)
            ref_obs, ref_reward, ref_terminated, ref_truncated, _ = reference.step(action)
            assert np.array_equal(obs, np.moveaxis(ref_obs, 0, -1))
            assert (reward, terminated, truncated) == (ref_reward, ref_terminated, ref_truncated)
    finally:
        ours.close()
        reference.close()


def test_frame_stack_last_refuses_observations_that_are_not_frames():
    with pytest.raises(ValueError, match="2-D frames"):
        FrameStackLast(gym.make("CartPole-v1"), 4)


def test_an_ale_id_without_atari_is_the_raw_game():
    env = PPOConfig().environment(PONG).make_env()
    try:
        assert env.observation_space.shape == (210, 160, 3)
    finally:
        env.close()


# ------------------------------------------------------------------------------ the setting
def test_atari_refuses_frameskip_in_env_config():
    with pytest.raises(ValueError, match=r"frameskip=4.*frameskip=1"):
        PPOConfig().environment(PONG, env_config={"frameskip": 4}, atari=True)
    config = PPOConfig().environment(PONG, atari=True)
    with pytest.raises(ValueError, match="frameskip"):
        config.environment(env_config={"frameskip": 2})
    assert config.env_config == {}  # nothing changed by the refused call
    with pytest.raises(ValueError, match="frameskip"):
        make_atari_env(PONG, {"frameskip": 3})
    # frameskip=1 is what the preprocessing needs anyway; other keys go to gymnasium.make.
    env = PPOConfig().environment(PONG, env_config={"frameskip": 1, "repeat_action_probability": 0.0}, atari=True).make_env()
    try:
        assert env.unwrapped._frameskip == 1
        assert env.observation_space == ATARI_SPACE
    finally:
        env.close()


def test_atari_needs_an_ale_id():
    with pytest.raises(ValueError, match=r"Arcade Learning Environment id.*'CartPole-v1'"):
        PPOConfig().environment("CartPole-v1", atari=True)
    with pytest.raises(ValueError, match="creator"):
        PPOConfig().environment(lambda env_config: gym.make(PONG), atari=True)
    config = PPOConfig().environment(PONG, atari=True)
    with pytest.raises(ValueError, match="Arcade Learning Environment"):
        config.environment("CartPole-v1")  # atari=True stays until turned off
    assert config.env == PONG
    assert config.environment("CartPole-v1", atari=False).env == "CartPole-v1"
    with pytest.raises(ValueError, match="atari must be True or False"):
        PPOConfig().environment(PONG, atari=1)
    with pytest.raises(ValueError, match="gym_env_vectorize_mode='sync'"):
        PPOConfig().environment(PONG, atari=True).env_runners(gym_env_vectorize_mode="vector_entry_point").validate()


def test_a_missing_ale_py_names_the_extra():
    # A fresh interpreter where ale_py cannot be imported, as on an install without the extra.
    code = (
        "import sys; sys.modules['ale_py'] = None\n"
        "from dlearner import PPOConfig\n"
        "from dlearner.cli import main\n"
        "try:\n"
        "    PPOConfig().environment('ALE/Pong-v5', atari=True).make_env()\n"
        "except ImportError as err:\n"
        "    print(err)\n"
        "sys.exit(main(['train', '--env', 'ALE/Pong-v5', '--atari', '--stop-iters', '1']))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert 'pip install "dlearner[atari]"' in out.stdout
    assert out.returncode == 2, out.stderr  # a usage error, before any cluster starts
    assert "argument --env" in out.stderr and 'pip install "dlearner[atari]"' in out.stderr
    assert "Traceback" not in out.stderr


def test_atari_survives_the_config_round_trip():
    config = APPOConfig().environment(PONG, atari=True)
    data = json.loads(json.dumps(config.to_dict()))  # as a checkpoint stores it
    assert data["atari"] is True
    restored = AlgorithmConfig.from_dict(data)
    assert type(restored) is APPOConfig
    assert (restored.env, restored.atari) == (PONG, True)
    assert AlgorithmConfig.from_dict(APPOConfig().environment("CartPole-v1").to_dict()).atari is False
    stored_without = {k: v for k, v in APPOConfig().environment("CartPole-v1").to_dict().items() if k != "atari"}
    assert AlgorithmConfig.from_dict(stored_without).atari is False  # a checkpoint of an earlier version
    tampered = {**data, "env": "CartPole-v1"}
    with pytest.raises(ValueError, match="Arcade Learning Environment"):
        AlgorithmConfig.from_dict(tampered)


# ------------------------------------------------------------------------------ the command line
def test_the_atari_flag_sets_the_config():
    config, _, _ = make_config(parsed("train", "--algo", "APPO", "--env", PONG, "--atari"))
    assert (config.env, config.atari) == (PONG, True)
    config, _, _ = make_config(parsed("train", "--env", PONG))
    assert config.atari is False


def test_the_atari_flag_refuses_other_envs(capsys):
    err = usage_error(capsys, "train", "--env", "CartPole-v1", "--atari")
    assert "argument --atari" in err and "Arcade Learning Environment" in err
    err = usage_error(capsys, "train", "--env", PONG, "--atari", "--env-config", '{"frameskip": 4}')
    assert "argument --atari" in err and "frameskip" in err


@pytest.mark.slow
def test_appo_trains_and_evaluates_on_pong_from_the_command_line(tmp_path):
    """One APPO iteration on ALE/Pong-v5 with --atari (one env runner on an embedded cluster with the
    dashboard page, the CNN encoder), a checkpoint, --resume's config, and evaluate of that run (atari
    comes from the stored config) with a GIF."""
    run = tmp_path / "pong"
    gif = tmp_path / "pong.gif"
    trained = dlearner(
        "train",
        "--algo",
        "APPO",
        "--env",
        PONG,
        "--atari",
        # Episodes of at most 400 emulator frames (100 agent steps): the greedy evaluation below stays short.
        "--env-config",
        '{"max_episode_steps": 400}',
        "--num-learners",
        "0",
        "--num-env-runners",
        "1",
        "--train-batch-size",
        "200",
        "--minibatch-size",
        "200",
        "--stop-iters",
        "1",
        "--seed",
        "0",
        "--checkpoint",
        str(run),
        timeout=120,
    )
    assert trained.returncode == 0, trained.stderr
    assert "Traceback" not in trained.stderr
    assert load_run_metadata(str(run), "evaluate")["config"]["atari"] is True
    resumed, _, _ = make_config(parsed("train", "--checkpoint", str(run), "--resume", "--stop-iters", "2"))
    assert (resumed.env, resumed.atari) == (PONG, True)  # --resume preprocesses as the run did
    evaluated = dlearner(
        "evaluate", str(run), "--episodes", "1", "--seed", "0", "--json", "--gif", str(gif), "--gif-max-frames", "40"
    )
    assert evaluated.returncode == 0, evaluated.stderr
    out = json.loads(evaluated.stdout)
    assert out["num_episodes"] == 1 and -21 <= out["episode_return_mean"] <= 21
    assert out["episode_len_mean"] <= 100  # the stored env_config came along with atari
    assert out["gif_frames"] == 40
    with Image.open(gif) as image:
        assert image.size == (160, 210)  # the emulator's screen, not the 84x84 observation
        assert image.n_frames > 1
        # 15 agent steps a second, the game's own speed (60 frames / 4): 70 ms a frame (Pillow merges
        # identical neighbours, adding their times).
        durations = []
        for index in range(image.n_frames):
            image.seek(index)
            durations.append(image.info["duration"])
        assert sum(durations) == 70 * out["gif_frames"]
