"""Processes under ``torchrun``: this one's place among them, and the objects they exchange.

``npr eval`` and ``npr sample`` share a job's problems: every rank builds its own engine and is
given the same list of unfinished problems; a rank with room for the next problem claims it
(:class:`Claims`), so a rank whose problems run short takes more of them. They exchange only
Python objects (what is left, what failed), over gloo. Training's
:class:`papo.distributed.World` adds gradients and sums to the same :class:`Ranks`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any


class PeerLost(RuntimeError):
    """An exchange between the ranks failed: another rank stopped (its own error says why) or
    did not answer in time."""


@contextmanager
def exchange() -> Iterator[None]:
    """Around a collective: gloo's error when a peer is gone becomes :class:`PeerLost`."""
    try:
        yield
    except RuntimeError as error:  # gloo: "Connection closed by peer", a timeout
        import torch

        if isinstance(error, torch.OutOfMemoryError):  # this rank's own (NCCL's GPU buffers)
            raise
        raise _lost(error) from error


def _lost(error: BaseException) -> PeerLost:
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return PeerLost(f"another rank stopped or did not answer ({first})")


# What gloo and NCCL say when the rank at the other end of a collective is gone.
PEER_GONE_SIGNS = (
    "Connection closed by peer",
    "Connection reset by peer",
    "NCCL communicator was aborted",
    "remote process exited",
)


def peer_lost(error: BaseException) -> PeerLost | None:
    """``error`` as :class:`PeerLost` when it says another rank is gone (raised outside
    :func:`exchange`: by a collective inside FSDP's forward and backward), else None."""
    if isinstance(error, PeerLost):
        return error
    if isinstance(error, RuntimeError) and any(sign in str(error) for sign in PEER_GONE_SIGNS):
        return _lost(error)
    return None


#: A rank that ends early waits for the slowest in the last exchange, as long as the run goes on
#: (days, for a large problem set); a rank that dies is torchrun's to notice, not this timeout's.
TIMEOUT = timedelta(days=30)


@dataclass(frozen=True)
class Ranks:
    """This process's place among ``size`` ranks (one process: rank 0 of 1, and every
    collective returns its own value)."""

    rank: int = 0
    size: int = 1
    owned: bool = False  # joined here (and left when :func:`joined_ranks` ends)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            with exchange():
                dist.barrier()

    def gather(self, value: Any) -> list[Any]:
        """Every rank's value (any picklable object), in rank order, on every rank."""
        if not self.distributed:
            return [value]
        import torch.distributed as dist

        values: list[Any] = [None] * self.size
        with exchange():
            dist.all_gather_object(values, value)
        return values

    def gather_to_main(self, value: Any) -> list[Any] | None:
        """Every rank's value, in rank order, on rank 0 (None on the others): what only rank 0
        writes, without every rank holding every rank's share."""
        if not self.distributed:
            return [value]
        import torch.distributed as dist

        values: list[Any] | None = [None] * self.size if self.is_main else None
        with exchange():
            dist.gather_object(value, values, dst=0)
        return values

    def broadcast(self, value: Any) -> Any:
        """Rank 0's value, on every rank."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        box = [value]
        with exchange():
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def any_failed(self, failed: bool) -> bool:
        """Whether any rank failed, on every rank: so that all stop together, and none waits
        for a rank that gave up."""
        return any(self.gather(failed))


def rank_label() -> str:
    """``" rank R:"`` under torchrun, where every rank prints its own errors; else empty."""
    if os.environ.get("WORLD_SIZE", "1") != "1" and "RANK" in os.environ:
        return f" rank {os.environ['RANK']}:"
    return ""


def join_ranks() -> Ranks:
    """Join the process group ``torchrun`` describes in the environment (one process: no-op)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    import torch.distributed as dist

    owned = not dist.is_initialized()
    if owned:
        # NCCL would move these objects through the current GPU, which is cuda:0 on every rank
        # unless set (each engine runs on its own cuda:LOCAL_RANK): two ranks on one GPU is an
        # NCCL error.
        dist.init_process_group(backend="gloo", timeout=TIMEOUT)
    return Ranks(dist.get_rank(), dist.get_world_size(), owned)


@contextmanager
def joined_ranks() -> Iterator[Ranks]:
    """:func:`join_ranks`, leaving the group at the end if it was joined here."""
    ranks = join_ranks()
    try:
        yield ranks
    finally:
        if ranks.owned:
            import torch.distributed

            torch.distributed.destroy_process_group()


class Claims:
    """Which rank runs which problem: a file per problem in ``directory``, created with
    ``O_EXCL``, which exactly one process can do. Rank 0 clears the directory before the ranks
    start and after they end, so a run never sees an earlier run's claims."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    def take(self, key: int | str, taken_elsewhere: Callable[[], None] | None = None) -> bool:
        """Claim ``key``: True for the one process that asks first. The others call
        ``taken_elsewhere`` (a progress bar counts the problem as done by another rank)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            os.close(os.open(self.directory / str(key), os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            if taken_elsewhere is not None:
                taken_elsewhere()
            return False
        return True
