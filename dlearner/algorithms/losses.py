"""Loss terms that PPO and APPO share (Schulman et al., 2017), written once.

Each algorithm's loss still reads top to bottom in its own module; these are the two pieces both
write the same way: the clipped surrogate objective and the rule that adapts the KL coefficient.
The per-module coefficients themselves are learner state, kept by
:class:`~dlearner.algorithms.kl_coeffs.AdaptiveKLCoeffs`.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["adapted_kl_coeff", "clipped_surrogate_loss"]


def clipped_surrogate_loss(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    clip_param: float,
    mean: Callable[[torch.Tensor], torch.Tensor] = torch.mean,
) -> torch.Tensor:
    """PPO's clipped surrogate objective L^CLIP (paper, eq. 7), negated into a loss::

        -mean(min(r * A, clip(r, 1 - eps, 1 + eps) * A))        # eps = clip_param

    ``ratio`` is the probability ratio ``r`` of the sampled actions, ``advantages`` their ``A``;
    ``mean`` averages over the rows the loss counts (PPO passes one that honours ``loss_mask``).
    """
    surrogate = torch.min(advantages * ratio, advantages * torch.clamp(ratio, 1 - clip_param, 1 + clip_param))
    return -mean(surrogate)


def adapted_kl_coeff(coeff: float, mean_kl: float, kl_target: float) -> float:
    """The KL coefficient after one adaptation step, RLlib's variant of the paper's rule (section 4).

    ``* 1.5`` when the mean KL overshot ``2 * kl_target``, ``* 0.5`` when it stayed under
    ``kl_target / 2``, unchanged in between.
    """
    if mean_kl > 2.0 * kl_target:
        return coeff * 1.5
    if mean_kl < 0.5 * kl_target:
        return coeff * 0.5
    return coeff
