"""GIFs of evaluation episodes (``Algorithm.evaluate(gif_path=...)``, ``dlearner evaluate --gif``).

Frames are ``env.render()`` images of an env made with ``render_mode="rgb_array"``: any gymnasium
env that renders RGB arrays (CartPole, ALE games, MuJoCo...). Each frame is downscaled and reduced to
a 256-colour palette as it arrives, so a long episode holds a few tens of MB at most, never the
raw frames.
"""

from __future__ import annotations

import os
from typing import Any, List, Optional

import numpy as np
from PIL import Image

#: Frames a GIF holds by default (about 30 s of CartPole at 50 fps, 66 s of Atari at 15 fps).
DEFAULT_MAX_FRAMES = 1000
#: The longest side of a GIF frame by default, in pixels (larger renders are downscaled).
DEFAULT_MAX_SIDE = 320


def check_rgb_array_env(env: Any) -> None:
    """``ValueError`` unless ``env`` renders RGB arrays (it was made with ``render_mode="rgb_array"``)."""
    if getattr(env, "render_mode", None) != "rgb_array":
        raise ValueError(
            f"Recording an episode needs an env made with render_mode='rgb_array', but {env} has "
            f"render_mode={getattr(env, 'render_mode', None)!r}. A gymnasium id gets it from env_config; an env creator "
            "must pass env_config['render_mode'] on to the env it makes."
        )


class GifRecorder:
    """Collects an episode's RGB frames (up to ``max_frames``, downscaled so that no side is longer
    than ``max_side``) and writes them as an animated GIF.

    ``Algorithm.evaluate(gif_path=...)`` uses one; by hand::

        env = gym.make("CartPole-v1", render_mode="rgb_array")
        recorder = GifRecorder(max_frames=500)
        env.reset(seed=0)
        recorder.add(env.render())                 # after the reset and after every step
        ...
        recorder.save("episode.gif", fps=env.metadata["render_fps"])
    """

    def __init__(self, *, max_frames: int = DEFAULT_MAX_FRAMES, max_side: int = DEFAULT_MAX_SIDE):
        if not isinstance(max_frames, int) or isinstance(max_frames, bool) or max_frames < 1:
            raise ValueError(f"max_frames must be an int >= 1, got {max_frames!r}.")
        if not isinstance(max_side, int) or isinstance(max_side, bool) or max_side < 8:
            raise ValueError(f"max_side must be an int >= 8, got {max_side!r}.")
        self.max_frames = max_frames
        self.max_side = max_side
        self.frames: List[Image.Image] = []
        #: Frames per second of the episode as played (set by whoever records; used by :meth:`save`).
        self.fps: Optional[float] = None

    @property
    def full(self) -> bool:
        """Whether ``max_frames`` frames are held (later frames are not wanted)."""
        return len(self.frames) >= self.max_frames

    def add(self, frame: Any) -> bool:
        """Keep one ``(height, width, 3)`` uint8 RGB frame (ignored once full); returns whether more are wanted."""
        if self.full:
            return False
        array = np.asarray(frame)
        if array.ndim != 3 or array.shape[2] not in (3, 4) or array.dtype != np.uint8:
            raise ValueError(
                f"A frame must be an RGB image, a (height, width, 3) uint8 array as render_mode='rgb_array' gives; got "
                f"shape {array.shape} and dtype {array.dtype}."
            )
        image = Image.fromarray(array[..., :3])
        scale = self.max_side / max(image.size)
        if scale < 1:
            image = image.resize(
                (max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.BILINEAR
            )
        # A palette image per frame (GIF's own format): a quarter of the RGB bytes while the episode runs.
        self.frames.append(image.quantize(colors=256))
        return not self.full

    def save(self, path: "str | os.PathLike[str]", *, fps: Optional[float] = None) -> int:
        """Write the frames as a looping GIF at ``fps`` (default: :attr:`fps`, else 30; at most 50, see
        :func:`gif_frame_ms`); returns how many."""
        if not self.frames:
            raise ValueError("No frames were recorded, so there is no GIF to write.")
        fps = fps or self.fps or 30.0
        if not np.isfinite(fps) or fps <= 0:
            raise ValueError(f"fps must be > 0, got {fps!r}.")
        first, *rest = self.frames
        first.save(os.fspath(path), save_all=True, append_images=rest, duration=gif_frame_ms(fps), loop=0, optimize=False)
        return len(self.frames)


def gif_frame_ms(fps: float) -> int:
    """How long a GIF frame shows at ``fps``: GIF counts hundredths of a second (rounded here, where
    Pillow would truncate), and browsers show frames under 20 ms for 100 ms, so faster envs play slower."""
    return max(20, 10 * round(100 / fps))
