"""GIFs of greedy evaluation episodes: ``GifRecorder``, ``Algorithm.evaluate(gif_path=...)`` and
``dlearner evaluate DIR --gif PATH`` (a real run on CartPole, rendered with render_mode='rgb_array')."""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest
from conftest import usage_error
from PIL import Image
from test_cli import FAST, dlearner

from dlearner import PPOConfig
from dlearner.envs.recording import GifRecorder, gif_frame_ms


def frames(count: int, height: int = 40, width: int = 60):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(count)]


# ------------------------------------------------------------------------------ the recorder
def test_the_recorder_keeps_at_most_max_frames_and_writes_a_looping_gif(tmp_path):
    recorder = GifRecorder(max_frames=3)
    wanted = [recorder.add(frame) for frame in frames(5)]
    assert wanted == [True, True, False, False, False]
    assert recorder.full and len(recorder.frames) == 3
    path = tmp_path / "out.gif"
    assert recorder.save(path, fps=20) == 3
    with Image.open(path) as image:
        assert image.format == "GIF" and image.n_frames == 3 and image.size == (60, 40)
        assert image.info["loop"] == 0 and image.info["duration"] == 50


def test_gif_frame_times_round_to_hundredths_and_stay_visible():
    assert [gif_frame_ms(fps) for fps in (50, 30, 15, 7.5, 100, 1000)] == [20, 30, 70, 130, 20, 20]


def test_the_recorder_downscales_large_frames():
    recorder = GifRecorder(max_side=100)
    recorder.add(frames(1, height=400, width=600)[0])
    assert recorder.frames[0].size == (100, 67)


def test_the_recorder_refuses_what_is_not_an_rgb_image(tmp_path):
    recorder = GifRecorder()
    with pytest.raises(ValueError, match="RGB image"):
        recorder.add(np.zeros((84, 84), np.uint8))
    with pytest.raises(ValueError, match="RGB image"):
        recorder.add(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="No frames"):
        recorder.save(tmp_path / "empty.gif")
    with pytest.raises(ValueError, match="max_frames"):
        GifRecorder(max_frames=0)


# ------------------------------------------------------------------------------ the library
def test_algorithm_evaluate_writes_the_first_greedy_episode(tmp_path):
    config = PPOConfig().environment("CartPole-v1").rl_module(model_config={"fcnet_hiddens": [16]}).debugging(seed=0)
    config.env_runners(num_envs_per_env_runner=2)
    gif = tmp_path / "cartpole.gif"
    with config.build_algo() as algo:
        plain = algo.evaluate(3, seed=7)["env_runners"]
        recorded = algo.evaluate(3, seed=7, gif_path=gif, gif_max_frames=400)["env_runners"]
    # Recording changes nothing about the episodes (same seeds, greedy actions).
    assert recorded["episode_returns"] == plain["episode_returns"]
    first_length = int(plain["episode_returns"][0])  # CartPole: one reward per step
    assert recorded["gif_frames"] == min(400, first_length + 1)  # the reset's frame and one per step
    with Image.open(gif) as image:
        assert image.n_frames > 1
        assert image.size == (320, 213)  # 600x400 renders, downscaled
        # CartPole's render_fps is 50: 20 ms a frame (Pillow merges identical neighbours, adding their times).
        durations = []
        for index in range(image.n_frames):
            image.seek(index)
            durations.append(image.info["duration"])
        assert sum(durations) == 20 * recorded["gif_frames"]


def test_recording_needs_an_env_that_renders_rgb_arrays(tmp_path):
    def no_render_mode(env_config):
        return gym.make("CartPole-v1")  # ignores env_config["render_mode"]

    config = PPOConfig().environment(no_render_mode).rl_module(model_config={"fcnet_hiddens": [16]})
    with config.build_algo() as algo:
        with pytest.raises(ValueError, match="render_mode='rgb_array'"):
            algo.evaluate(1, gif_path=tmp_path / "never.gif")
    assert not (tmp_path / "never.gif").exists()


# ------------------------------------------------------------------------------ the command line
def test_evaluate_writes_a_gif_of_a_trained_cartpole_run(tmp_path, capsys):
    run = tmp_path / "cartpole"
    gif = tmp_path / "episode.gif"
    trained = dlearner(
        "train",
        "--env",
        "CartPole-v1",
        "--num-learners",
        "0",
        "--num-env-runners",
        "0",
        "--stop-iters",
        "1",
        "--checkpoint",
        str(run),
        *FAST,
    )
    assert trained.returncode == 0, trained.stderr
    evaluated = dlearner("evaluate", str(run), "--episodes", "2", "--seed", "0", "--gif", str(gif), "--gif-max-frames", "30")
    assert evaluated.returncode == 0, evaluated.stderr
    assert f"episode 1 written to {gif}" in evaluated.stdout
    with Image.open(gif) as image:
        assert image.format == "GIF" and image.n_frames > 1
    as_json = dlearner("evaluate", str(run), "--episodes", "1", "--json", "--gif", str(gif))
    assert as_json.returncode == 0, as_json.stderr
    out = json.loads(as_json.stdout)
    assert out["gif"] == str(gif) and out["gif_frames"] == int(out["episode_returns"][0]) + 1
    err = usage_error(capsys, "evaluate", str(run), "--gif", str(tmp_path / "no" / "such" / "dir.gif"))
    assert "argument --gif" in err and "does not exist" in err
    err = usage_error(capsys, "evaluate", str(run), "--gif", str(gif), "--gif-max-frames", "0")
    assert "--gif-max-frames" in err
