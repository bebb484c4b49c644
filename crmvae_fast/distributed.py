"""Helpers for running on several processes with ``torch.distributed``: DDP training and sharded evaluation.

``torchrun --nproc_per_node=N -m crmvae_fast train ...`` starts N processes with ``WORLD_SIZE``, ``RANK`` and
``LOCAL_RANK`` in their environment; :func:`init_from_env` reads them, starts the process group (NCCL when the
processes use GPUs, gloo on CPUs) and says which device this rank uses. Without torchrun it starts nothing and
returns a one-process context, so the same code runs both ways.

* :func:`shard_indices` / :func:`shard_batches`: ``DistributedSampler``'s split (one shuffle shared by every
  rank, padded to a multiple of the world size by repeating the first indices, rank r takes every N-th index
  from r), so each rank sees 1/N of every epoch and every rank runs the same number of steps. With one process
  it is the order of :func:`crmvae_fast.synthetic.batches`, so a one-process run is unchanged.
* :func:`wrap_ddp`: ``DistributedDataParallel`` whose gradient all-reduce *sums* instead of averaging. CRMVAE's
  loss is a sum over the batch, so the summed gradients are exactly the gradients of one process on the union of
  the ranks' batches (DDP's default mean would divide them by N).
* :func:`fully_shard_model`: FSDP2 (``torch.distributed.fsdp.fully_shard``) of the whole model, with the same
  sum semantics, or a clear error saying why it cannot.
* :func:`rank_range`, :func:`all_reduce_sum`: an even split of ``n`` points with no padding (each point counted
  once, for evaluation) and a summing all-reduce that is a no-op without a process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .nn import first_parameter, register_output_pytree


@dataclass(frozen=True)
class DistContext:
    """Who this process is. ``world_size == 1`` and ``backend is None`` when no process group is used."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: Optional[str]
    started_here: bool  # this module started the process group (and :func:`shutdown` ends it)

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that prints and saves."""
        return self.rank == 0


def is_distributed() -> bool:
    """True when a process group with more than one process is initialized."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialized process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer (torchrun sets it), got {value!r}") from None


def init_from_env(device: Optional[Union[str, torch.device]] = None) -> DistContext:
    """Start the process group when launched by torchrun (``WORLD_SIZE`` > 1), else do nothing.

    ``device``: ``"cpu"``, ``"cuda"`` or None (CUDA when present). Under torchrun on CUDA each rank takes GPU
    ``LOCAL_RANK`` (an explicit ``"cuda:i"`` is replaced by it, since every rank got the same command line) and the
    backend is NCCL; on CPUs it is gloo. A process group that is already initialized is used as it is.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    already = dist.is_available() and dist.is_initialized()
    if already:
        rank, world = dist.get_rank(), dist.get_world_size()
    if world <= 1 and not already:
        return DistContext(0, 1, 0, device, None, False)
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={world} asks for {world} processes, but this torch build has no "
                           "torch.distributed; run without torchrun or install a build with it")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for, but CUDA is not available here; use --device cpu")
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK={local_rank} but this machine has {torch.cuda.device_count()} GPU(s): start at most "
                f"{torch.cuda.device_count()} processes per node (--nproc_per_node), or use --device cpu"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    started = False
    if not already:
        dist.init_process_group(backend=backend)
        started = True
    else:
        backend = dist.get_backend()
    return DistContext(rank, world, local_rank, device, backend, started)


def shutdown(ctx: DistContext) -> None:
    """End the process group if :func:`init_from_env` started it (after a barrier, so no rank leaves early)."""
    if ctx.started_here and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------- splitting
def shard_indices(n: int, rank: int = 0, world_size: int = 1, shuffle: bool = False,
                  seed: Optional[int] = None) -> Tensor:
    """The indices of ``n`` samples that rank ``rank`` of ``world_size`` takes this epoch, as
    ``torch.utils.data.DistributedSampler`` (``drop_last=False``) splits them: one order shared by all ranks
    (``randperm`` from a generator seeded with ``seed`` when ``shuffle``), padded to a multiple of the world size
    by repeating its first indices, then every ``world_size``-th index from ``rank``. Every rank gets
    ``ceil(n / world_size)`` indices."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"expected 0 <= rank < world_size, got rank {rank} and world_size {world_size}")
    if shuffle:
        g = torch.Generator().manual_seed(0 if seed is None else int(seed))
        order = torch.randperm(n, generator=g)
    else:
        order = torch.arange(n)
    total = -(-n // world_size) * world_size
    if total > n:
        order = torch.cat([order, order.repeat(-(-(total - n) // n))[: total - n]])
    return order[rank:total:world_size]


def shard_batches(dataset: dict, batch_size: int, rank: int = 0, world_size: int = 1, shuffle: bool = False,
                  seed: Optional[int] = None) -> Iterator[dict]:
    """Batches of this rank's share (:func:`shard_indices`) of a :mod:`crmvae_fast.synthetic` dataset. With one
    process this is exactly ``synthetic.batches(dataset, batch_size, shuffle, seed)``."""
    from .synthetic import subset

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(dataset["labels"]) if "labels" in dataset else len(next(iter(dataset["data"].values())))
    idx = shard_indices(n, rank, world_size, shuffle, seed)
    for start in range(0, len(idx), batch_size):
        yield subset(dataset, idx[start:start + batch_size])


def rank_range(n: int, rank: int, world_size: int) -> range:
    """The contiguous block of ``range(n)`` that rank ``rank`` evaluates: blocks differ in size by at most one,
    nothing is padded or repeated, so summing over ranks counts every point once."""
    return range(n * rank // world_size, n * (rank + 1) // world_size)


def collective_device(fallback: torch.device) -> torch.device:
    """The device a collective's tensor must live on: the current GPU under NCCL, else ``fallback``."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return fallback


def all_reduce_sum(t: Tensor) -> Tensor:
    """The sum of ``t`` over all ranks (``t`` itself without a process group). Moves ``t`` to the GPU under NCCL
    and back; returns a new tensor on ``t``'s device."""
    if not (dist.is_available() and dist.is_initialized()):
        return t
    buf = t.detach().to(collective_device(t.device), copy=True)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(t.device)


# ------------------------------------------------------------------------------------------------- wrapping
def _sum_allreduce_hook(state, bucket):
    """DDP communication hook: all-reduce the gradient bucket with SUM (DDP's default divides by world size)."""
    fut = dist.all_reduce(bucket.buffer(), op=dist.ReduceOp.SUM, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def wrap_ddp(model: nn.Module, device: Optional[torch.device] = None, **ddp_kwargs) -> nn.Module:
    """``DistributedDataParallel(model)`` whose gradients are summed over ranks, so that with CRMVAE's summed
    loss they equal the gradients of one process on all ranks' batches together. ``device`` (default: the
    model's): a CUDA device becomes ``device_ids=[device]``; CPU modules get no ``device_ids`` (DDP refuses them).
    Needs an initialized process group (:func:`init_from_env` under torchrun)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("wrap_ddp needs an initialized process group: launch with torchrun and call "
                           "crmvae_fast.distributed.init_from_env() (or torch.distributed.init_process_group) first")
    if device is None:
        p = first_parameter(model)
        device = p.device if p is not None else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        ddp_kwargs.setdefault("device_ids", [device])
    ddp = DDP(model, **ddp_kwargs)
    ddp.register_comm_hook(state=None, hook=_sum_allreduce_hook)
    return ddp


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` and/or ``torch.compile`` wrapper."""
    while True:
        inner = getattr(model, "module", None) if type(model).__name__ == "DistributedDataParallel" else None
        if inner is None:
            inner = getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def fully_shard_model(model: nn.Module, **fsdp_kwargs) -> nn.Module:
    """FSDP2 of the whole model (``torch.distributed.fsdp.fully_shard``, parameters sharded across ranks and
    gathered for each forward and backward), with gradients summed over ranks like :func:`wrap_ddp`.

    Raises ``RuntimeError`` saying what to do when there is no process group or this torch has no FSDP2.
    Methods other than ``forward`` (``compute_joint_nll``, ``encode``, ...) need the parameters gathered: use
    :func:`crmvae_fast.evaluate_joint_nll`, which does it, or call ``model.unshard()`` first and
    ``model.reshard()`` after.
    """
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError as exc:
        raise RuntimeError(f"FSDP2 needs torch >= 2.6 (torch.distributed.fsdp.fully_shard); this is torch "
                           f"{torch.__version__} ({exc}). Use crmvae_fast.distributed.wrap_ddp instead") from exc
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("fully_shard_model needs an initialized process group: launch with torchrun and call "
                           "crmvae_fast.distributed.init_from_env() (or torch.distributed.init_process_group) first")
    register_output_pytree()  # FSDP2 of torch 2.8 hooks the backward on the output's tensors, found by pytree
    sharded = fully_shard(model, **fsdp_kwargs)
    # sum, not mean: the loss is a sum over the batch. A plain SUM reduce-scatter (no PREMUL_SUM, which gloo lacks).
    if hasattr(sharded, "set_force_sum_reduction_for_comms"):
        sharded.set_force_sum_reduction_for_comms(True)
    sharded.set_gradient_divide_factor(1.0)
    return sharded
