"""Loss terms that PPO and APPO share (Schulman et al., 2017), written once.

Each algorithm's loss still reads top to bottom in its own module; these are the pieces several
write the same way: the clipped surrogate objective, the rule that adapts the KL coefficient, and
the mean over the rows a loss counts (IMPALA and APPO honour ``loss_mask`` with it).
The per-module coefficients themselves are learner state, kept by
:class:`~dlearner.algorithms.kl_coeffs.AdaptiveKLCoeffs`.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

__all__ = ["RowMean", "adapted_kl_coeff", "clipped_surrogate_loss"]


class RowMean:
    """The mean a loss takes over its rows: all of them, or those ``loss_mask`` keeps (padding rows of
    multi-agent fragments, or rows the caller masked out, train nothing).

    The mask has the shape of the tensors it averages; a mask that keeps no row gives 0 (and no
    gradient). Example::

        mean = RowMean(batch.get(Columns.LOSS_MASK))
        entropy = mean(dist.entropy())
    """

    def __init__(self, loss_mask: Optional[torch.Tensor]):
        self.mask = None if loss_mask is None else loss_mask.bool()
        self.count = None if loss_mask is None else self.mask.sum().clamp(min=1)

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            return torch.mean(values)
        # Indexing, not multiplying by the mask: a padding row's inf or NaN must not reach the sum.
        return torch.sum(values[self.mask]) / self.count

    def columns(self, matrix: torch.Tensor) -> torch.Tensor:
        """The mean of each column of ``matrix`` (rows x k) in one reduction."""
        if self.mask is None:
            return matrix.mean(dim=0)
        return matrix[self.mask].sum(dim=0) / self.count


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
