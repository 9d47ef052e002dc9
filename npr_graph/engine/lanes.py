"""Lanes, samples and requests: the engine's view of DAGs being decoded.

A lane is one decoding leaf: a run of tokens that see each other causally. A sample is one
response under construction: its lanes, in creation order, are exactly its token sequence
(trunk, branch 1..k, join, ...). A request is a prompt and its ``n`` samples, which share the
prompt's KV pages.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import NamedTuple

import torch

from .kv import LaneKV
from .sampling import NoiseStream, SamplingParams
from .structure import Action, LaneState
from .transfer import HostCopy

# A token picked on the device and fed before the host has read it (the engine's overlapped
# steps): the lane holds this in its tokens until then.
PICKED = -1


class Picked(NamedTuple):
    """Tokens picked on the device for ``lanes``: each lane's last token is :data:`PICKED`.
    ``host`` brings the tokens, their log-probs and, when the selection speculated, which rows
    are settled (:class:`~.sampling.Selection`); ``repick(row)`` picks a row exactly."""

    lanes: list[Lane]
    tokens: torch.Tensor
    host: HostCopy
    repick: Callable[[int], tuple[int, float]]


class LaneStatus(str, Enum):
    RUNNING = "running"
    WAITING = "waiting"  # a finished branch waiting for its siblings
    DONE = "done"


@dataclass
class Lane:
    sample: Sample | None
    kv: LaneKV
    state: LaneState | None
    start_position: int
    branch: int | None = None
    siblings: list[Lane] | None = None
    fork_parent: Lane | None = None
    joined: list[Lane] | None = None
    noise: NoiseStream | None = None  # its own: draws never depend on other lanes' schedules
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    forced: list[bool] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)
    forced_queue: deque[int] = field(default_factory=deque)
    after_forced: Action | None = None
    status: LaneStatus = LaneStatus.RUNNING
    text_tail: str = ""
    final_logits: torch.Tensor | None = None
    void_row: bool = False  # its row of the coming logits follows a token taken back

    @property
    def end_position(self) -> int:
        return self.start_position + len(self.tokens)

    @property
    def pending_positions(self) -> list[int]:
        first = self.end_position - len(self.pending)
        return list(range(first, first + len(self.pending)))

    def append(self, token: int, logprob: float | None, forced: bool) -> None:
        self.tokens.append(token)
        self.logprobs.append(logprob)
        self.forced.append(forced)
        self.pending.append(token)
        if self.sample is not None:
            self.sample.count_token(self.end_position)

    def fed(self) -> None:
        self.pending.clear()

    def context(self) -> list[int]:
        """Every token this lane attends to, in sequence order: the prompt, its ancestors, itself."""
        if self.joined:
            before = self.joined[0].fork_parent.context() + [
                t for lane in self.joined for t in lane.tokens
            ]
        elif self.fork_parent is not None:
            before = self.fork_parent.context()
        else:
            before = list(self.sample.request.prompt_ids)
        return before + self.tokens


@dataclass
class Sample:
    request: Request
    index: int
    lanes: list[Lane] = field(default_factory=list)
    fork_tokens: list[int] = field(
        default_factory=list
    )  # response index of each fork's first branch token
    truncated: bool = False
    finished: bool = False
    finish_reason: str = ""
    violations: list[str] = field(default_factory=list)
    # Kept as tokens arrive: budgets are checked after every token, and a sample of many blocks
    # has many lanes to sum over.
    total_tokens: int = 0
    end_position: int = field(init=False)  # the largest end position of its lanes

    def __post_init__(self) -> None:
        self.end_position = len(self.request.prompt_ids)

    def add_lane(self, lane: Lane) -> None:
        """Add a lane of this sample (its tokens are counted as it appends them)."""
        self.lanes.append(lane)
        self.end_position = max(self.end_position, lane.end_position)

    def count_token(self, end_position: int) -> None:
        """A lane of this sample appended a token and now ends at ``end_position``."""
        self.total_tokens += 1
        self.end_position = max(self.end_position, end_position)

    def uncount_token(self) -> None:
        """A lane took back its last token (its end position is one less)."""
        self.total_tokens -= 1
        ends = [lane.end_position for lane in self.lanes]
        self.end_position = max([len(self.request.prompt_ids), *ends])

    @property
    def critical_tokens(self) -> int:
        """Tokens on the longest dependency chain after the prompt (the native end position)."""
        return self.end_position - len(self.request.prompt_ids)

    def live_lanes(self) -> list[Lane]:
        return [lane for lane in self.lanes if lane.status is not LaneStatus.DONE]


@dataclass
class Request:
    index: int
    prompt_ids: list[int]
    params: SamplingParams
    mode: str
    samples: list[Sample] = field(default_factory=list)
    prompt_lane: Lane | None = None
    arrival: int = 0

    @property
    def finished(self) -> bool:
        return bool(self.samples) and all(s.finished for s in self.samples)
