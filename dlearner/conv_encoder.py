"""The convolutional encoder of the default modules, for image observations.

A 3-D ``Box`` observation space, ``(height, width, channels)``, gets a stack of 2-D convolutions
(``model_config["conv_filters"]``, RLlib's format: ``[[out_channels, [kernel_h, kernel_w], stride],
...]``, "same" padding unless a layer's fourth element says ``"valid"``), each followed by
``conv_activation``, then flattened. ``fcnet_hiddens`` sizes the layers after it.

``uint8`` observations travel as ``uint8`` everywhere (4x fewer bytes than float32 on every hop)
and become floats in [0, 1] here, in the forward pass: :func:`observations_as_float`.

A custom :class:`~dlearner.rl_module.RLModule` reuses the encoder::

    encoder = ConvEncoder(observation_space, model_config={"conv_filters": [[16, [8, 8], 4], [32, [4, 4], 2]]})
    features = encoder(batch["obs"])            # (batch, encoder.out_dim), float32
"""

from __future__ import annotations

import math
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import gymnasium as gym
import torch
from torch import nn

from dlearner.activations import ACTIVATIONS

__all__ = ["ConvEncoder", "default_conv_filters", "is_image_space", "observations_as_float", "validate_conv_filters"]

# The classic RLlib vision-network filters: two "same" convolutions, then one "valid" convolution as
# large as what is left, so the encoder ends in 256 features whatever the input's size.
_DEFAULT_FILTERS = {
    (84, 84): [[16, [8, 8], 4], [32, [4, 4], 2], [256, [11, 11], 1, "valid"]],
    (64, 64): [[16, [8, 8], 4], [32, [4, 4], 2], [256, [8, 8], 1, "valid"]],
    (42, 42): [[16, [4, 4], 2], [32, [4, 4], 2], [256, [11, 11], 1, "valid"]],
}

ConvLayer = Tuple[int, Tuple[int, int], Tuple[int, int], str]  # out_channels, kernel, stride, padding


def is_image_space(space: gym.Space) -> bool:
    """Whether the default modules encode ``space`` with convolutions: a 3-D ``Box`` (height, width, channels)."""
    return isinstance(space, gym.spaces.Box) and len(space.shape) == 3


def observations_as_float(obs: torch.Tensor) -> torch.Tensor:
    """Observations as the networks compute with them: ``uint8`` scaled to [0, 1], other dtypes as float32."""
    if obs.dtype == torch.uint8:
        return obs.float().div_(255.0)
    return obs.float()


def default_conv_filters(image_shape: Sequence[int]) -> List[list]:
    """``conv_filters`` for an ``(height, width, channels)`` image when ``model_config`` gives none:
    defaults exist for 84x84, 64x64 and 42x42; other sizes raise ``ValueError`` naming ``conv_filters``."""
    height, width = int(image_shape[0]), int(image_shape[1])
    if (height, width) not in _DEFAULT_FILTERS:
        raise ValueError(
            f"Image observations of {height}x{width} pixels have no default conv_filters (defaults exist for "
            f"{', '.join(f'{h}x{w}' for h, w in _DEFAULT_FILTERS)}); set model_config['conv_filters'], e.g. "
            "[[16, [8, 8], 4], [32, [4, 4], 2]], or resize the observations."
        )
    return [list(layer) for layer in _DEFAULT_FILTERS[(height, width)]]


def validate_conv_filters(conv_filters: Any) -> Optional[List[list]]:
    """``conv_filters`` in its canonical form ``[[out, [kh, kw], [sh, sw], padding], ...]`` (or ``None``:
    the defaults); anything else raises ``ValueError`` naming ``conv_filters`` and the bad layer."""
    if conv_filters is None:
        return None
    if not isinstance(conv_filters, (list, tuple)) or not conv_filters:
        raise ValueError(
            "model_config['conv_filters'] must be a non-empty list of [out_channels, [kernel_h, kernel_w], stride] "
            f"layers (or None for the defaults), got {conv_filters!r}."
        )
    return [list(_conv_layer(i, layer)) for i, layer in enumerate(conv_filters)]


def _conv_layer(index: int, layer: Any) -> ConvLayer:
    where = f"model_config['conv_filters'][{index}]"
    if not isinstance(layer, (list, tuple)) or len(layer) not in (3, 4):
        raise ValueError(f"{where} must be [out_channels, [kernel_h, kernel_w], stride] (optionally 'valid'), got {layer!r}.")
    out_channels = layer[0]
    if isinstance(out_channels, bool) or not isinstance(out_channels, int) or out_channels < 1:
        raise ValueError(f"{where}: out_channels must be a positive int, got {out_channels!r}.")
    kernel, stride = _pair(where, "kernel size", layer[1]), _pair(where, "stride", layer[2])
    padding = layer[3] if len(layer) == 4 else "same"
    if padding not in ("same", "valid"):
        raise ValueError(f"{where}: padding must be 'same' or 'valid', got {padding!r}.")
    return out_channels, kernel, stride, padding


def _pair(where: str, what: str, value: Any) -> Tuple[int, int]:
    pair = value if isinstance(value, (list, tuple)) else [value, value]
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in pair):
        raise ValueError(f"{where}: the {what} must be a positive int or a pair of them, got {value!r}.")
    return int(pair[0]), int(pair[1])


def _same_padding(size: int, kernel: int, stride: int) -> Tuple[int, int]:
    """Padding before and after that makes the output ``ceil(size / stride)`` long (TensorFlow's and RLlib's "same")."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class ConvEncoder(nn.Module):
    """Convolutions over ``(batch, height, width, channels)`` observations; outputs ``(batch, out_dim)`` float32.

    ``model_config`` takes ``conv_filters`` (``None``: the defaults for 84x84, 64x64 and 42x42) and
    ``conv_activation`` (``"relu"`` by default). Filters that do not fit the image (an output of zero
    pixels) raise ``ValueError`` naming ``conv_filters``.
    """

    def __init__(self, observation_space: gym.spaces.Box, model_config: Optional[Mapping[str, Any]] = None):
        super().__init__()
        if not is_image_space(observation_space):
            raise ValueError(f"ConvEncoder needs a 3-D Box observation space (height, width, channels), got {observation_space}.")
        model_config = dict(model_config or {})
        activation = model_config.get("conv_activation", "relu")
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"model_config['conv_activation']={activation!r} is not supported; use one of {sorted(ACTIVATIONS)}."
            )
        height, width, channels = (int(s) for s in observation_space.shape)
        filters = validate_conv_filters(model_config.get("conv_filters"))
        if filters is None:
            filters = validate_conv_filters(default_conv_filters(observation_space.shape))
        layers: List[nn.Module] = []
        for index, (out_channels, kernel, stride, padding) in enumerate(filters):
            if padding == "same":
                top, bottom = _same_padding(height, kernel[0], stride[0])
                left, right = _same_padding(width, kernel[1], stride[1])
                if top or bottom or left or right:
                    layers.append(nn.ZeroPad2d((left, right, top, bottom)))
                height, width = math.ceil(height / stride[0]), math.ceil(width / stride[1])
            else:
                height = (height - kernel[0]) // stride[0] + 1
                width = (width - kernel[1]) // stride[1] + 1
                if height < 1 or width < 1:
                    raise ValueError(
                        f"model_config['conv_filters'][{index}] ({out_channels}, kernel {list(kernel)}, stride "
                        f"{list(stride)}, 'valid') does not fit the {observation_space.shape[0]}x"
                        f"{observation_space.shape[1]} image: the layers before it leave a smaller feature map. "
                        "Use smaller kernels or strides, or 'same' padding."
                    )
            conv = nn.Conv2d(channels, out_channels, kernel, stride)
            nn.init.orthogonal_(conv.weight, gain=math.sqrt(2.0))
            nn.init.zeros_(conv.bias)
            layers.append(conv)
            if ACTIVATIONS[activation] is not None:
                layers.append(ACTIVATIONS[activation]())
            channels = out_channels
        self.net = nn.Sequential(*layers, nn.Flatten())
        self.out_dim = channels * height * width

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        # Channels last in the env (gymnasium's and Atari's layout), channels first in torch's convolutions.
        return self.net(observations_as_float(obs).permute(0, 3, 1, 2))
