"""The activation functions ``model_config`` names: ``fcnet_activation`` (the MLPs of
:mod:`dlearner.rl_module`) and ``conv_activation`` (:mod:`dlearner.conv_encoder`)."""

from __future__ import annotations

from torch import nn

#: Name -> activation module class (``None``: no activation, "linear").
ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "elu": nn.ELU, "silu": nn.SiLU, "swish": nn.SiLU, "linear": None}
