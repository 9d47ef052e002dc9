"""Data parallelism over ``torchrun`` ranks (gloo on CPU, NCCL on GPU).

Every rank holds the whole model, rolls out its share of the step's prompts and computes loss on
its own samples; gradients are then summed across ranks, the loss having been divided by the
*global* token (or sample) count, so the update equals a single process training on the whole
batch. The all-reduce is explicit rather than through ``DistributedDataParallel`` because ranks
may hold different numbers of packed rows (or none, when all their rollouts were dropped), which
DDP's per-backward synchronization cannot express.

With ``sharding = "fsdp2"`` the training copy of the policy is sharded over the ranks with
torch's FSDP2 (:func:`shard_policy`: one unit per decoder layer, one root unit for the rest), so
each rank keeps ``1/N`` of the weights, gradients and optimizer states. The rollout engine needs
full weights, so each rank also keeps an unsharded *replica* that :func:`gather_full_weights`
refreshes after every optimizer step: the trade is one full copy of the weights per rank in
exchange for sharding the gradients and the two AdamW moments (4 full copies become
``1 + 4/N``, plus one layer's gathered weights at a time during the training forward/backward).
FSDP2 all-gathers in every forward and reduce-scatters in every backward, so the trainer runs the
same number of row passes on every rank, padding with zero-loss rows; the reduce-scatter sums (no
division by the world size) because the loss is already divided by the global token count.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor

from npr_graph.models import resolve_device
from npr_graph.ranks import TIMEOUT, Ranks, exchange

from .data import PackedRow
from .forward import row_logprobs


@dataclass(frozen=True)
class World(Ranks):
    """The ranks of a training run: its share of the work, and sums over the ranks."""

    def shard(self, items: list) -> list:
        """This rank's share of ``items`` (strided, so shares differ by at most one item)."""
        return items[self.rank :: self.size]

    def sum(self, value: float) -> float:
        if not self.distributed:
            return value
        # NCCL reduces only CUDA tensors (init_world set this rank's device)
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        tensor = torch.tensor([value], dtype=torch.float64, device=device)
        with exchange():
            dist.all_reduce(tensor)
        return float(tensor)

    def all_reduce_grads(self, model: torch.nn.Module, bucket_elements: int = 1 << 25) -> None:
        """Sum every parameter's gradient over the ranks. A gradient missing on some ranks counts
        as zero there; one missing on every rank stays missing (``None``), as in one process,
        where the optimizer then leaves the parameter alone: a zero gradient would still move it
        (AdamW's momentum and weight decay).

        The sums run in float64, over buckets of at most ``bucket_elements`` gradient values (a
        large parameter spans several), so the float64 copy on top of the gradients is one bucket
        (256 MiB by default), not all of them at twice their float32 size."""
        if not self.distributed:
            return
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            return
        device = params[0].device
        holders = torch.tensor(
            [p.grad is not None for p in params], dtype=torch.float64, device=device
        )
        with exchange():
            dist.all_reduce(holders)
        pieces: list[tuple[torch.Tensor, int, int]] = []  # (flat gradient, start, end)
        for p, held in zip(params, holders.tolist(), strict=True):
            if not held:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            elif not p.grad.is_contiguous():
                p.grad = p.grad.contiguous()
            flat = p.grad.view(-1)
            pieces += [
                (flat, start, min(start + bucket_elements, flat.numel()))
                for start in range(0, flat.numel(), bucket_elements)
            ]
        bucket: list[tuple[torch.Tensor, int, int]] = []
        size = 0
        for flat, start, end in pieces:  # a piece fits a bucket: a full bucket is never empty
            if size + end - start > bucket_elements:
                _sum_over_ranks(bucket)
                bucket, size = [], 0
            bucket.append((flat, start, end))
            size += end - start
        if bucket:
            _sum_over_ranks(bucket)


def _sum_over_ranks(pieces: list[tuple[torch.Tensor, int, int]]) -> None:
    """All-reduce the slices ``flat[start:end]`` of ``pieces`` in place, in one float64 call."""
    summed = torch.cat([flat[start:end].double() for flat, start, end in pieces])
    with exchange():
        dist.all_reduce(summed)
    offset = 0
    for flat, start, end in pieces:
        flat[start:end].copy_(summed[offset : offset + end - start])
        offset += end - start


def init_world(device: str | torch.device | None = None) -> World:
    """Join the process group ``torchrun`` describes in the environment (one process: no-op),
    with the backend that reduces tensors on the training ``device`` (default:
    :func:`~npr_graph.models.default_device`): NCCL for a GPU, made this rank's current device,
    gloo for the CPU, also on a machine that has GPUs."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_initialized():
        device = resolve_device(device)
        if device.type == "cuda":
            index = device.index if device.index is not None else os.environ.get("LOCAL_RANK", 0)
            torch.cuda.set_device(int(index))
        # A rank waits for rank 0's checkpoint writes and for the slowest rank's rollouts and
        # held-out share: NCCL's default 10 minutes would abort a healthy run.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
        # Left to the interpreter's teardown, the group's threads outlive it now and then
        # ("terminate called without an active exception", exit code -6).
        atexit.register(_destroy_process_group)
    return World(dist.get_rank(), dist.get_world_size())


def _destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class ShardedForward(torch.nn.Module):
    """The FSDP2 root unit: it owns the policy, and its ``forward`` is the packed-row training
    forward. The root must be a module whose ``forward`` is called, because FSDP2 gathers the
    root's parameters (embeddings, final norm, head) in that call's pre-hook, and
    :func:`~papo.forward.row_logprobs` calls the decoder and reads the head's weight directly
    rather than calling the policy's own ``forward``."""

    def __init__(self, policy: torch.nn.Module) -> None:
        super().__init__()
        self.policy = policy

    def forward(
        self, row: PackedRow, temperature: float, with_entropy: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        logprobs, entropy = row_logprobs(
            self.policy, row, temperature=temperature, with_entropy=with_entropy
        )
        # Outputs of their own, not views (FSDP2 warns of a root that returns views); a copy of
        # one float per scored token.
        return logprobs.clone(), entropy.clone() if entropy is not None else None


def shard_policy(policy: torch.nn.Module, world: World) -> ShardedForward:
    """Shard ``policy`` in place with FSDP2 over all ranks (every rank calls this with the same
    weights) and return the root unit to run the training forward through."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    layers = getattr(policy.get_decoder(), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        raise ValueError("sharding 'fsdp2' needs a decoder with a 'layers' list")
    device_type = next(policy.parameters()).device.type
    mesh = init_device_mesh(device_type, (world.size,))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    root = fully_shard(ShardedForward(policy), mesh=mesh)
    for module in root.modules():
        if isinstance(module, FSDPModule):
            # the loss is already divided by the global token count: gradients must be summed
            module.set_gradient_divide_factor(1.0)
            # gloo implements neither AVG nor PREMUL_SUM; with factor 1 no division runs at all
            module.set_force_sum_reduction_for_comms(True)
    return root


def _matched_parameters(
    first: torch.nn.Module, second: torch.nn.Module
) -> list[tuple[torch.nn.Parameter, torch.nn.Parameter]]:
    pairs = []
    for (name, a), (other, b) in zip(
        first.named_parameters(), second.named_parameters(), strict=True
    ):
        if name != other or a.shape != b.shape:
            raise ValueError(f"parameters do not line up: {name} {a.shape} vs {other} {b.shape}")
        pairs.append((a, b))
    return pairs


@torch.no_grad()
def gather_full_weights(sharded: torch.nn.Module, replica: torch.nn.Module) -> None:
    """Copy the full values of ``sharded``'s parameters into ``replica`` (an unsharded model of
    the same architecture). A collective: every rank calls it, one all-gather per parameter."""
    for source, target in _matched_parameters(sharded, replica):
        target.copy_(source.full_tensor() if isinstance(source, DTensor) else source)


@torch.no_grad()
def scatter_full_weights(replica: torch.nn.Module, sharded: torch.nn.Module) -> None:
    """Set ``sharded``'s parameters from ``replica``'s full values (identical on every rank):
    each rank keeps its own shard, so nothing is communicated."""
    for target, source in _matched_parameters(sharded, replica):
        if isinstance(target, DTensor):
            source = distribute_tensor(
                source.detach().to(target.device),
                target.device_mesh,
                target.placements,
                src_data_rank=None,
            )
        target.copy_(source)
