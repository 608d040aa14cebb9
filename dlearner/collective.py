"""The collective operations a Learner needs for data-parallel training, over ``torch.distributed``.

The Learner only sees this small interface; who forms the process group (the Dask plumbing in
:mod:`dlearner.dask_backend`) is not its business.
"""

from __future__ import annotations

from typing import Any, List, Optional

import torch
import torch.distributed as dist


class TorchCollective:
    """Sum/max all-reduce and object all-gather over a ``torch.distributed`` process group.

    ``group=None`` uses the default process group. Tensors are reduced in place; for NCCL they must
    live on the learner's CUDA device, for gloo on the CPU (this class moves them when needed).
    """

    def __init__(self, group: Optional[Any] = None, device: Optional[torch.device] = None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.backend = dist.get_backend(group)
        self.device = device or torch.device("cpu")

    def _on_backend_device(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.backend == "nccl" and tensor.device.type != "cuda":
            return tensor.to(self.device)
        if self.backend == "gloo" and tensor.device.type != "cpu":
            return tensor.cpu()
        return tensor

    def _all_reduce(self, tensor: torch.Tensor, op) -> None:
        work = self._on_backend_device(tensor)
        dist.all_reduce(work, op=op, group=self.group)
        if work is not tensor:
            tensor.copy_(work)

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        """Replace ``tensor`` with its sum over all ranks."""
        self._all_reduce(tensor, dist.ReduceOp.SUM)

    def all_reduce_max(self, tensor: torch.Tensor) -> None:
        """Replace ``tensor`` with its element-wise maximum over all ranks."""
        self._all_reduce(tensor, dist.ReduceOp.MAX)

    def all_gather_object(self, obj: Any) -> List[Any]:
        """Every rank's ``obj`` (small, picklable Python objects only), in rank order."""
        out: List[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def barrier(self) -> None:
        dist.barrier(group=self.group)
