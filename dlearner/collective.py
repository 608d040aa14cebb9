"""The collective operations a Learner needs for data-parallel training, over ``torch.distributed``.

The Learner only sees :class:`TorchCollective`, a small interface; :func:`open_store` and
:func:`form_process_group` are how the learner actors (:mod:`dlearner.backends.dask.actor`) form a
group: rank 0 opens a ``TCPStore`` on a port the OS picks, then every rank builds a standalone
``ProcessGroupGloo`` (``ProcessGroupNCCL`` when every learner has its own GPU) under a prefix named
after the group and a generation number, concurrently.

Two kinds of group are supported:

* a group registered with ``torch.distributed`` (``group=None`` is the default group), used through
  the ``torch.distributed`` functions;
* a standalone backend object (``ProcessGroupGloo`` / ``ProcessGroupNCCL`` built from a ``TCPStore``
  and a ``PrefixStore``), made with :meth:`TorchCollective.from_process_group`. The LearnerGroup uses
  this kind: it never touches the process-global default group, so two groups on one cluster, or a
  group re-formed after a failure, never fight over it.
"""

from __future__ import annotations

import datetime
import pickle
import socket
import time
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
        self._standalone = False
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.backend = dist.get_backend(group)
        self.device = device or torch.device("cpu")

    #: Seconds this rank has spent inside all-reduce and all-gather calls since it was made (a
    #: cumulative counter: the learner actor reports the difference per update to the dashboard).
    time_in_collectives_s: float = 0.0
    #: All-reduce and all-gather calls this rank has made since the collective was made.
    num_collective_calls: int = 0

    @classmethod
    def from_process_group(cls, process_group: Any, device: Optional[torch.device] = None) -> "TorchCollective":
        """Wrap a standalone c10d backend (e.g. ``ProcessGroupGloo(store, rank, size, opts)``).

        Such a group is not registered with ``torch.distributed``, so its own ``allreduce`` /
        ``allgather`` methods are called directly.
        """
        self = cls.__new__(cls)
        self.group = process_group
        self._standalone = True
        self.rank = process_group.rank()
        self.world_size = process_group.size()
        self.backend = process_group.name().lower()
        self.device = device or torch.device("cpu")
        return self

    def close(self) -> None:
        """Forget the process group (standalone groups only).

        Dropping the last reference to a gloo backend closes its sockets, so peers blocked in a
        collective with this rank fail at once ("Connection closed by peer") instead of waiting for
        the collective timeout. NCCL communicators are aborted explicitly.
        """
        group, self.group = self.group, None
        if group is not None and self._standalone and self.backend == "nccl" and hasattr(group, "abort"):
            group.abort()

    def _group(self):
        if self.group is None and self._standalone:
            raise RuntimeError("This collective was closed; its process group no longer exists.")
        return self.group

    def _on_backend_device(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.backend == "nccl" and tensor.device.type != "cuda":
            return tensor.to(self.device)
        if self.backend == "gloo" and tensor.device.type != "cpu":
            return tensor.cpu()
        return tensor

    def _all_reduce(self, tensor: torch.Tensor, op) -> None:
        start = time.perf_counter()
        self.num_collective_calls += 1
        try:
            self._all_reduce_timed(tensor, op)
        finally:
            self.time_in_collectives_s += time.perf_counter() - start

    def _all_reduce_timed(self, tensor: torch.Tensor, op) -> None:
        work = self._on_backend_device(tensor)
        if self._standalone:
            opts = dist.AllreduceOptions()
            opts.reduceOp = op
            self._group().allreduce([work], opts).wait()
        else:
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
        start = time.perf_counter()
        self.num_collective_calls += 1
        try:
            return self._all_gather_object(obj)
        finally:
            self.time_in_collectives_s += time.perf_counter() - start

    def _all_gather_object(self, obj: Any) -> List[Any]:
        if not self._standalone:
            out: List[Any] = [None] * self.world_size
            dist.all_gather_object(out, obj, group=self.group)
            return out
        # Standalone groups: gather the sizes first, then the pickles padded to the largest one.
        payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        size = torch.tensor([payload.numel()], dtype=torch.int64)
        sizes = self._all_gather_tensor(size)
        longest = int(max(int(s) for s in sizes))
        padded = torch.zeros(longest, dtype=torch.uint8)
        padded[: payload.numel()] = payload
        chunks = self._all_gather_tensor(padded)
        return [pickle.loads(bytes(c[: int(n)].cpu().numpy())) for c, n in zip(chunks, sizes)]

    def _all_gather_tensor(self, tensor: torch.Tensor) -> List[torch.Tensor]:
        work = self._on_backend_device(tensor)
        outputs = [torch.empty_like(work) for _ in range(self.world_size)]
        self._group().allgather([outputs], [work]).wait()
        return outputs

    def barrier(self) -> None:
        if self._standalone:
            # A one-element all-reduce is a barrier every backend supports without extra options.
            self.all_reduce_sum(torch.zeros(1, device=self.device if self.backend == "nccl" else "cpu"))
        else:
            dist.barrier(group=self.group)


# ================================================================================ forming a group
def open_store(host: str, world_size: int, timeout_s: float) -> Any:
    """Rank 0: start a ``TCPStore`` server on ``host`` (the learner's own interface, never all of
    them) and a port the OS picks now; the store's ``.port`` is what the other ranks connect to."""
    # TCPStore binds every interface when it opens its own socket, whatever ``host`` says: hand it
    # a socket bound to the worker's own interface instead.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.create_server((host, 0), family=family)
    port = listener.getsockname()[1]
    return dist.TCPStore(
        host,
        port,
        world_size,
        is_master=True,
        timeout=datetime.timedelta(seconds=timeout_s),
        wait_for_workers=False,
        master_listen_fd=listener.detach(),
    )


def form_process_group(
    *,
    rank: int,
    world_size: int,
    prefix: str,
    backend: str,
    host: str,
    store: Any = None,
    store_host: Optional[str] = None,
    store_port: Optional[int] = None,
    store_timeout_s: float = 60.0,
    op_timeout_s: float = 600.0,
    device: Optional[torch.device] = None,
) -> TorchCollective:
    """Build this rank's part of a standalone process group (all ranks call it concurrently).

    Rank 0 passes the ``store`` it opened with :func:`open_store`; the others pass its
    ``store_host`` / ``store_port``. ``prefix`` (group id and generation) keeps groups on one store
    apart, so a group can be re-formed after a failure. ``host`` is the interface gloo talks over
    (the one Dask reaches this worker on). A half-formed group fails here, in a one-element check,
    not in the first update.
    """
    if store is None:
        if store_host is None or store_port is None:
            raise ValueError("form_process_group needs the rank-0 store, or its store_host and store_port.")
        store = dist.TCPStore(
            store_host, store_port, world_size, is_master=False, timeout=datetime.timedelta(seconds=store_timeout_s)
        )
    prefixed = dist.PrefixStore(prefix, store)
    op_timeout = datetime.timedelta(seconds=op_timeout_s)
    if backend == "nccl":
        from torch.distributed import ProcessGroupNCCL  # only in CUDA builds of torch

        nccl_options = ProcessGroupNCCL.Options()
        nccl_options._timeout = op_timeout
        group = ProcessGroupNCCL(prefixed, rank, world_size, nccl_options)
    elif backend == "gloo":
        from torch.distributed import ProcessGroupGloo

        gloo_options = ProcessGroupGloo._Options()
        gloo_options._devices = [ProcessGroupGloo.create_device(hostname=host)]
        gloo_options._timeout = op_timeout
        group = ProcessGroupGloo(prefixed, rank, world_size, gloo_options)
    else:
        raise ValueError(f"Unknown collective backend {backend!r}; use 'gloo' or 'nccl'.")
    collective = TorchCollective.from_process_group(group, device=device)
    probe = torch.ones(1)
    collective.all_reduce_sum(probe)
    if int(probe.item()) != world_size:
        collective.close()
        raise RuntimeError(f"Process group check summed to {probe.item()}, expected {world_size}.")
    return collective
