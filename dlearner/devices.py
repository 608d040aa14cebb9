"""The decisions of dlearner's GPU path, as plain functions of the facts they depend on.

Everything here takes the facts (GPUs per learner, how many CUDA devices a process sees, whether
the cluster is embedded, each learner's device facts) as arguments and returns a decision, so all of
it is tested on machines without a GPU. Nothing here knows about Dask: the Learner and the backends
both use it, and the callers gather the facts:

* the Dask backend's :func:`~dlearner.backends.dask.cluster.device_for` → :func:`device_for_rank`
  (which torch device each learner rank computes on);
* the embedded ``LocalCluster`` → :func:`gpu_packing` (how many GPUs ``num_learners`` need);
* ``DaskLearnerPool._choose_backend`` → :func:`device_facts` (through ``learner_ops.device_facts``,
  on every learner) and :func:`choose_backend` (NCCL or gloo);
* ``TorchLearner._to_tensors`` → :func:`host_transfer` (pinned memory and non-blocking copies).

Rules, in short:

* ``num_gpus_per_learner=0``: every learner computes on the CPU.
* A fraction ``0 < g < 1``: learners share GPUs, ``floor(1 / g)`` to a GPU (0.5 → 2, 0.25 → 4,
  0.3 → 3, leaving a tenth of each GPU unused, as a resource scheduler packing 0.3-GPU tasks
  would). Rank ``i`` of an embedded cluster computes on ``cuda:(i // floor(1/g))``.
* A whole number ``g >= 1``: each learner has ``g`` GPUs of its own and computes on the first of
  them (dlearner does data parallelism only, never model parallelism); rank ``i`` of an embedded
  cluster computes on ``cuda:(i * g)``. Fractions above 1 (1.5) are refused.
* Attached clusters (``client=``, ``address=``, ``scheduler_file=``): the worker's launcher chooses
  the GPU (dask-cuda and ``CUDA_VISIBLE_DEVICES`` give each worker its own as device 0), so the
  learner uses its worker's current CUDA device.
* NCCL only when every learner has at least one whole GPU of its own (``g >= 1``), every learner's
  torch has NCCL, and no two learners report the same physical GPU (by UUID, or PCI bus id where
  the UUID is unknown): NCCL cannot run two ranks on one device. Otherwise gloo, which moves the
  gradients through host memory.
* Pinned host memory and non-blocking host→device copies only for a CUDA target in a process where
  CUDA is available; a CPU learner converts batches with no extra copy.
"""

from __future__ import annotations

import dataclasses
import math
import socket
from typing import Any, Dict, Mapping, Optional, Sequence

from dlearner.errors import ClusterResourceError
from dlearner.validation import is_real

#: Tolerance for float arithmetic on GPU fractions (1 / 0.1 is 10.000000000000002).
_EPS = 1e-9


# ================================================================================ GPUs per learner
@dataclasses.dataclass(frozen=True)
class GpuPacking:
    """How learners asking for ``gpus_per_learner`` GPUs each are laid out on GPUs.

    ``learners_per_gpu`` learners share one GPU (1 when each learner has GPUs of its own), and each
    learner spans ``gpus_per_rank`` GPUs (1 when learners share).
    """

    gpus_per_learner: float
    learners_per_gpu: int
    gpus_per_rank: int

    @property
    def shares_gpus(self) -> bool:
        """Whether several learners compute on one GPU."""
        return self.learners_per_gpu > 1

    def gpu_index(self, rank: int) -> int:
        """The index (among the GPUs the process sees) of the GPU learner ``rank`` computes on."""
        if rank < 0:
            raise ValueError(f"A learner rank is >= 0, got {rank}.")
        return (rank // self.learners_per_gpu) * self.gpus_per_rank

    def gpus_needed(self, num_learners: int) -> int:
        """How many GPUs ``num_learners`` learners occupy."""
        if num_learners <= 0:
            return 0
        return math.ceil(num_learners / self.learners_per_gpu) * self.gpus_per_rank


def gpu_packing(gpus_per_learner: float) -> GpuPacking:
    """The layout for ``gpus_per_learner > 0`` (see the module docstring).

    Raises ``ValueError`` for a value that is not a positive number, or a fraction above 1.

    Example::

        gpu_packing(0.5).learners_per_gpu      # 2
        gpu_packing(0.3).gpus_needed(4)        # 2: three learners on the first GPU, one on the second
        gpu_packing(2).gpu_index(1)            # 2: rank 1 computes on the third GPU
    """
    g = _check_gpus(gpus_per_learner)
    if g <= 0:
        raise ValueError("gpu_packing needs num_gpus_per_learner > 0; with 0 every learner computes on the CPU.")
    if g < 1 - _EPS:
        return GpuPacking(g, learners_per_gpu=int(math.floor(1.0 / g + _EPS)), gpus_per_rank=1)
    return GpuPacking(g, learners_per_gpu=1, gpus_per_rank=int(round(g)))


def _check_gpus(gpus_per_learner: Any) -> float:
    if not is_real(gpus_per_learner):
        raise ValueError(f"num_gpus_per_learner must be a number, got {gpus_per_learner!r}.")
    g = float(gpus_per_learner)
    if not math.isfinite(g) or g < 0:
        raise ValueError(f"num_gpus_per_learner must be >= 0, got {gpus_per_learner!r}.")
    if g > 1 + _EPS and abs(g - round(g)) > _EPS:
        raise ValueError(
            f"num_gpus_per_learner={g:g}: above 1 it must be a whole number (a learner uses whole GPUs, or a "
            "fraction of one GPU that it shares with other learners)."
        )
    return g


def device_for_rank(rank: int, gpus_per_learner: float, *, embedded: bool, visible_gpus: int) -> Optional[str]:
    """The torch device string of learner ``rank``, or ``None`` for "the worker's current CUDA device".

    ``embedded``: the cluster is dlearner's own ``LocalCluster``, whose workers all see the
    ``visible_gpus`` GPUs of this machine, so ranks are spread explicitly. On an attached cluster
    the worker's launcher chose its GPU, so the answer is ``None``.

    Raises :class:`~dlearner.errors.ClusterResourceError` when an embedded rank would need a GPU
    beyond ``visible_gpus`` (never silently doubles up learners on a GPU).
    """
    g = _check_gpus(gpus_per_learner)
    if g <= 0:
        return "cpu"
    if not embedded:
        return None
    packing = gpu_packing(g)
    first = packing.gpu_index(rank)
    last = first + packing.gpus_per_rank - 1
    if last >= visible_gpus:
        raise ClusterResourceError(
            f"Learner rank {rank} with num_gpus_per_learner={g:g} needs GPU index {last}, but this machine has "
            f"{visible_gpus} visible CUDA device(s) ({packing.learners_per_gpu} learner(s) per GPU). Lower "
            "num_learners or num_gpus_per_learner, or attach to a cluster with more GPU workers."
        )
    return f"cuda:{first}"


# ============================================================================= NCCL or gloo
@dataclasses.dataclass(frozen=True)
class BackendChoice:
    """The collective backend of a group and why (``reason`` is for logs and error messages)."""

    backend: str
    reason: str

    @property
    def fell_back(self) -> bool:
        """True when the learners have GPUs but cannot use NCCL (worth a warning)."""
        return self.backend == "gloo" and self.reason.startswith("gloo instead of NCCL")


def choose_backend(gpus_per_learner: float, facts: Optional[Sequence[Mapping[str, Any]]] = None) -> BackendChoice:
    """NCCL or gloo for a group whose learners ask for ``gpus_per_learner`` and report ``facts``.

    ``facts`` holds one mapping per learner, as :func:`device_facts` returns them (``host``,
    ``device``, ``gpu_id``, ``nccl_available``); it is only needed (and only gathered) when
    ``gpus_per_learner >= 1``. NCCL is chosen only if every learner computes on a CUDA device, has
    NCCL, and no two learners are on one physical GPU.

    Example::

        choose_backend(0.5).backend                        # "gloo": learners share GPUs by design
        choose_backend(1, [{"host": "a", "device": "cuda:0", "gpu_id": "GPU-1", "nccl_available": True},
                           {"host": "a", "device": "cuda:1", "gpu_id": "GPU-2", "nccl_available": True}]).backend
        # "nccl"
    """
    g = _check_gpus(gpus_per_learner)
    if g <= 0:
        return BackendChoice("gloo", "gloo: the learners compute on CPUs.")
    if g < 1 - _EPS:
        return BackendChoice(
            "gloo", f"gloo: num_gpus_per_learner={g:g} < 1, so learners share GPUs (NCCL needs one GPU per rank)."
        )
    if not facts:
        return BackendChoice("gloo", "gloo instead of NCCL: the learners' devices are unknown.")
    not_cuda = [i for i, f in enumerate(facts) if not str(f.get("device", "")).startswith("cuda")]
    if not_cuda:
        return BackendChoice(
            "gloo", f"gloo instead of NCCL: learner rank(s) {not_cuda} do not compute on a CUDA device ({_describe(facts)})."
        )
    no_nccl = [i for i, f in enumerate(facts) if not f.get("nccl_available", True)]
    if no_nccl:
        return BackendChoice("gloo", f"gloo instead of NCCL: torch has no NCCL on learner rank(s) {no_nccl}.")
    seen: Dict[Any, int] = {}
    for rank, f in enumerate(facts):
        gpu = f.get("gpu_id")
        if gpu is None:
            return BackendChoice(
                "gloo", f"gloo instead of NCCL: learner rank {rank} could not identify its GPU ({_describe(facts)})."
            )
        key = (f.get("host"), str(gpu))
        if key in seen:
            return BackendChoice(
                "gloo",
                f"gloo instead of NCCL: learner ranks {seen[key]} and {rank} compute on the same GPU {gpu} on "
                f"{f.get('host')} (NCCL needs one GPU per rank; give each worker its own GPU, e.g. with dask-cuda).",
            )
        seen[key] = rank
    return BackendChoice("nccl", f"nccl: {len(facts)} learners, each on a GPU of its own.")


def _describe(facts: Sequence[Mapping[str, Any]]) -> str:
    return ", ".join(f"rank {i}: {f.get('device')} on {f.get('host')}" for i, f in enumerate(facts))


def device_facts(device: Any) -> Dict[str, Any]:
    """What :func:`choose_backend` needs to know about one process computing on ``device``.

    ``gpu_id`` identifies the physical GPU: its UUID, else its PCI address (unique on a host), else
    ``None`` (then NCCL is not used). It is independent of ``CUDA_VISIBLE_DEVICES`` numbering, which
    differs from worker to worker.
    """
    import torch
    import torch.distributed as dist

    device = torch.device(device)
    gpu_id: Optional[str] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        uuid = getattr(props, "uuid", None)
        if uuid is not None:
            gpu_id = f"GPU-{uuid}" if not str(uuid).startswith("GPU-") else str(uuid)
        elif getattr(props, "pci_bus_id", None) is not None:
            gpu_id = f"pci:{getattr(props, 'pci_domain_id', 0)}:{props.pci_bus_id}:{getattr(props, 'pci_device_id', 0)}"
    return {
        "host": socket.gethostname(),
        "device": str(device),
        "gpu_id": gpu_id,
        "nccl_available": bool(dist.is_available() and dist.is_nccl_available()),
    }


# ======================================================================== host → device copies
@dataclasses.dataclass(frozen=True)
class HostTransfer:
    """How a batch column travels from host memory to the learner's device."""

    pin_memory: bool
    non_blocking: bool


def host_transfer(device_type: str, cuda_available: bool) -> HostTransfer:
    """Pinned memory and non-blocking copies for a CUDA target where CUDA is available; plain copies
    otherwise (pinning needs a CUDA driver, and buys nothing for a CPU learner)."""
    on_gpu = device_type == "cuda" and bool(cuda_available)
    return HostTransfer(pin_memory=on_gpu, non_blocking=on_gpu)
