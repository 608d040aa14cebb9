"""Action distributions built from a module's ``action_dist_inputs``.

Written with plain tensor ops rather than ``torch.distributions`` because they sit on the hot path
of every gradient step, where argument validation and object creation would cost more than the math.
"""

from __future__ import annotations

import math
from typing import Optional

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

    Example::

        dist = TorchCategorical.from_logits(torch.zeros(3, 2))
        dist.logp(torch.tensor([0, 1, 1]))   # tensor([-0.6931, -0.6931, -0.6931])
    """

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
        return self.log_probs.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)

    def entropy(self) -> torch.Tensor:
        return -(self.log_probs.exp() * self.log_probs).sum(-1)

    def kl(self, other: "TorchCategorical") -> torch.Tensor:
        return (self.log_probs.exp() * (self.log_probs - other.log_probs)).sum(-1)

    def sample(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        probs = self.log_probs.exp().reshape(-1, self.logits.shape[-1])
        return torch.multinomial(probs, 1, generator=generator).reshape(
            self.logits.shape[:-1]
        )

    def deterministic_sample(self) -> torch.Tensor:
        return self.logits.argmax(-1)


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
