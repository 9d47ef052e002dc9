"""Data parallelism over ``torchrun`` ranks (gloo on CPU, NCCL on GPU).

Every rank holds the whole model, rolls out its share of the step's prompts and computes loss on
its own samples; gradients are then summed across ranks, the loss having been divided by the
*global* token (or sample) count, so the update equals a single process training on the whole
batch. The all-reduce is explicit rather than through ``DistributedDataParallel`` because ranks
may hold different numbers of packed rows (or none, when all their rollouts were dropped), which
DDP's per-backward synchronization cannot express.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def shard(self, items: list) -> list:
        """This rank's share of ``items`` (strided, so shares differ by at most one item)."""
        return items[self.rank :: self.size]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (any picklable object), in rank order, on every rank."""
        if not self.distributed:
            return [value]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, value)
        return out

    def sum(self, value: float) -> float:
        if not self.distributed:
            return value
        tensor = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(tensor)
        return float(tensor)

    def all_reduce_grads(self, model: torch.nn.Module) -> None:
        """Sum every parameter's gradient over the ranks (missing gradients count as zero)."""
        if not self.distributed:
            return
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1).double() for p in params])
        dist.all_reduce(flat)
        offset = 0
        for p in params:
            count = p.numel()
            p.grad.copy_(flat[offset : offset + count].view_as(p.grad))
            offset += count

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def init_world() -> World:
    """Join the process group ``torchrun`` describes in the environment (one process: no-op)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return World(dist.get_rank(), dist.get_world_size())


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
