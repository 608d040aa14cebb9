"""Action distributions built from a module's ``action_dist_inputs``.

Written with plain tensor ops rather than ``torch.distributions`` because they sit on the hot path
of every gradient step, where argument validation and object creation would cost more than the math.
"""

from __future__ import annotations

import math
import re
from typing import Dict, Optional, Type

import torch
import torch.nn.functional as F


class TorchDistribution:
    """Common interface: ``from_logits``, ``logp``, ``entropy``, ``kl``, ``sample``, ``deterministic_sample``."""

    @classmethod
    def from_logits(cls, logits: torch.Tensor) -> "TorchDistribution":
        """Build the distribution from the module's ``action_dist_inputs``."""
        raise NotImplementedError

    @staticmethod
    def required_input_dim(action_space) -> int:
        """Size of the last dimension of ``action_dist_inputs`` for ``action_space``."""
        raise NotImplementedError

    def logp(self, actions: torch.Tensor) -> torch.Tensor:
        """Log-probability of each action (one value per row)."""
        raise NotImplementedError

    def entropy(self) -> torch.Tensor:
        """Entropy per row."""
        raise NotImplementedError

    def kl(self, other: "TorchDistribution") -> torch.Tensor:
        """KL(self || other) per row."""
        raise NotImplementedError

    def sample(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """A random action per row (drawn from ``generator`` when given)."""
        raise NotImplementedError

    def deterministic_sample(self) -> torch.Tensor:
        """The most likely action per row (greedy evaluation)."""
        raise NotImplementedError


class TorchCategorical(TorchDistribution):
    """Categorical distribution over ``n`` discrete actions, parameterised by unnormalised logits.

    Actions are the environment's own values: for ``Discrete(n, start=s)`` they run from ``s`` to
    ``s + n - 1`` while the logits are indexed from 0. :meth:`for_space` gives the class for a space;
    the plain class has ``start = 0``.

    Example::

        dist = TorchCategorical.from_logits(torch.zeros(3, 2))
        dist.logp(torch.tensor([0, 1, 1]))   # tensor([-0.6931, -0.6931, -0.6931])
        TorchCategorical.for_space(gym.spaces.Discrete(2, start=-1)).from_logits(logits).sample()  # -1 or 0
    """

    #: The action value of logit 0 (``Discrete.start``).
    start: int = 0

    @classmethod
    def for_space(cls, action_space) -> Type["TorchCategorical"]:
        """The categorical class whose actions are ``action_space``'s values (``Discrete``, any ``start``)."""
        return categorical_with_start(int(action_space.start))

    def __init__(self, logits: torch.Tensor):
        self.logits = logits
        self.log_probs = F.log_softmax(logits, dim=-1)

    @classmethod
    def from_logits(cls, logits: torch.Tensor) -> "TorchCategorical":
        return cls(logits)

    @staticmethod
    def required_input_dim(action_space) -> int:
        return int(action_space.n)

    def logp(self, actions: torch.Tensor) -> torch.Tensor:
        return self.log_probs.gather(-1, (actions.long() - self.start).unsqueeze(-1)).squeeze(-1)

    def entropy(self) -> torch.Tensor:
        return -(self.log_probs.exp() * self.log_probs).sum(-1)

    def kl(self, other: "TorchCategorical") -> torch.Tensor:
        return (self.log_probs.exp() * (self.log_probs - other.log_probs)).sum(-1)

    def sample(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        probs = self.log_probs.exp().reshape(-1, self.logits.shape[-1])
        index = torch.multinomial(probs, 1, generator=generator).reshape(self.logits.shape[:-1])
        return index + self.start

    def deterministic_sample(self) -> torch.Tensor:
        return self.logits.argmax(-1) + self.start


_CATEGORICALS: Dict[int, Type[TorchCategorical]] = {0: TorchCategorical}


def categorical_with_start(start: int) -> Type[TorchCategorical]:
    """``TorchCategorical`` for actions ``start, start + 1, ...`` (one class per start, so ``is`` checks hold)."""
    start = int(start)
    if start not in _CATEGORICALS:
        name = _categorical_name(start)
        cls = type(name, (TorchCategorical,), {"start": start, "__module__": __name__, "__qualname__": name})
        _CATEGORICALS[start] = cls
    return _CATEGORICALS[start]


def _categorical_name(start: int) -> str:
    return f"TorchCategoricalStart{start}" if start >= 0 else f"TorchCategoricalStartMinus{-start}"


def __getattr__(name: str):
    # The classes above are made on demand; this lets pickle find them by name in another process.
    match = re.fullmatch(r"TorchCategoricalStart(Minus)?(\d+)", name)
    if match is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    start = int(match.group(2)) * (-1 if match.group(1) else 1)
    if _categorical_name(start) != name:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return categorical_with_start(start)


_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


class TorchDiagGaussian(TorchDistribution):
    """Diagonal Gaussian over a ``Box`` action space; inputs are ``[mean, log_std]`` concatenated (as RLlib)."""

    def __init__(self, loc: torch.Tensor, log_std: torch.Tensor):
        self.loc = loc
        self.log_std = log_std

    @classmethod
    def from_logits(cls, logits: torch.Tensor) -> "TorchDiagGaussian":
        loc, log_std = torch.chunk(logits, 2, dim=-1)
        return cls(loc, log_std)

    @staticmethod
    def required_input_dim(action_space) -> int:
        return 2 * int(math.prod(action_space.shape))

    def logp(self, actions: torch.Tensor) -> torch.Tensor:
        actions = actions.reshape(self.loc.shape)
        z = (actions - self.loc) * torch.exp(-self.log_std)
        return (-0.5 * z.pow(2) - self.log_std - _HALF_LOG_2PI).sum(-1)

    def entropy(self) -> torch.Tensor:
        return (self.log_std + 0.5 + _HALF_LOG_2PI).sum(-1)

    def kl(self, other: "TorchDiagGaussian") -> torch.Tensor:
        var_ratio = torch.exp(2.0 * (self.log_std - other.log_std))
        mean_term = ((self.loc - other.loc) * torch.exp(-other.log_std)).pow(2)
        return 0.5 * (var_ratio + mean_term - 1.0).sum(-1) - (self.log_std - other.log_std).sum(-1)

    def sample(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        noise = torch.randn(self.loc.shape, generator=generator, dtype=self.loc.dtype, device=self.loc.device)
        return self.loc + torch.exp(self.log_std) * noise

    def deterministic_sample(self) -> torch.Tensor:
        return self.loc


class TorchSquashedGaussian(TorchDistribution):
    """A Gaussian squashed by ``tanh`` and rescaled to a bounded ``Box``: SAC's policy (Haarnoja et al. 2018,
    appendix C). Inputs are ``[mean, log_std]`` concatenated; ``log_std`` is mapped smoothly into
    ``[LOG_STD_MIN, LOG_STD_MAX]`` (as CleanRL does). Sampled actions always lie inside the bounds.

    :meth:`for_space` gives the class for a space's bounds; :meth:`rsample_with_logp` is the
    reparameterised sample the SAC loss differentiates through.
    """

    LOG_STD_MIN = -5.0
    LOG_STD_MAX = 2.0
    #: ``(high - low) / 2`` and ``(high + low) / 2`` of the action space (set by :meth:`for_space`).
    scale: Optional[torch.Tensor] = None
    center: Optional[torch.Tensor] = None

    @classmethod
    def for_space(cls, action_space) -> Type["TorchSquashedGaussian"]:
        """The class whose actions lie in ``action_space``'s bounds (a 1-D ``Box`` with finite bounds)."""
        low = torch.as_tensor(action_space.low, dtype=torch.float32).reshape(-1)
        high = torch.as_tensor(action_space.high, dtype=torch.float32).reshape(-1)
        if not (torch.isfinite(low).all() and torch.isfinite(high).all() and (high > low).all()):
            raise ValueError(
                f"A tanh-squashed Gaussian needs finite bounds with high > low, but the action space is {action_space}; "
                "wrap the env so its actions are bounded (e.g. gymnasium.wrappers.RescaleAction)."
            )
        return type(cls.__name__, (cls,), {"scale": (high - low) / 2.0, "center": (high + low) / 2.0, "__module__": __name__})

    def __init__(self, loc: torch.Tensor, log_std: torch.Tensor):
        self.loc = loc
        self.log_std = log_std

    @classmethod
    def from_logits(cls, logits: torch.Tensor) -> "TorchSquashedGaussian":
        loc, raw_log_std = torch.chunk(logits, 2, dim=-1)
        log_std = cls.LOG_STD_MIN + 0.5 * (cls.LOG_STD_MAX - cls.LOG_STD_MIN) * (torch.tanh(raw_log_std) + 1.0)
        return cls(loc, log_std)

    @staticmethod
    def required_input_dim(action_space) -> int:
        return 2 * int(math.prod(action_space.shape))

    def _bounds(self):
        return self.scale.to(self.loc.device), self.center.to(self.loc.device)

    def rsample_with_logp(self, noise: torch.Tensor):
        """``(action, log pi(action))`` for standard-normal ``noise``, differentiable in the inputs::

        u = mean + std * noise;  a = center + scale * tanh(u)
        log pi(a) = log N(u; mean, std) - sum log(scale * (1 - tanh(u)^2))
        """
        scale, center = self._bounds()
        u = self.loc + torch.exp(self.log_std) * noise
        squashed = torch.tanh(u)
        gaussian_logp = (-0.5 * noise.pow(2) - self.log_std - _HALF_LOG_2PI).sum(-1)
        # log(1 - tanh(u)^2) written stably: 2 * (log 2 - u - softplus(-2u)).
        log_det = (2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u)) + torch.log(scale)).sum(-1)
        return center + scale * squashed, gaussian_logp - log_det

    def logp(self, actions: torch.Tensor) -> torch.Tensor:
        scale, center = self._bounds()
        squashed = torch.clamp((actions.reshape(self.loc.shape) - center) / scale, -1.0 + 1e-6, 1.0 - 1e-6)
        u = torch.atanh(squashed)
        noise = (u - self.loc) * torch.exp(-self.log_std)
        gaussian_logp = (-0.5 * noise.pow(2) - self.log_std - _HALF_LOG_2PI).sum(-1)
        return gaussian_logp - (torch.log(scale * (1.0 - squashed.pow(2)))).sum(-1)

    def entropy(self) -> torch.Tensor:
        raise NotImplementedError("A squashed Gaussian has no closed-form entropy; SAC estimates it as -log pi(a).")

    def kl(self, other: "TorchDistribution") -> torch.Tensor:
        raise NotImplementedError("A squashed Gaussian has no closed-form KL divergence.")

    def sample(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        noise = torch.randn(self.loc.shape, generator=generator, dtype=self.loc.dtype, device=self.loc.device)
        return self.rsample_with_logp(noise)[0]

    def deterministic_sample(self) -> torch.Tensor:
        scale, center = self._bounds()
        return center + scale * torch.tanh(self.loc)
