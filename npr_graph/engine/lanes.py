"""Lanes, samples and requests: the engine's view of DAGs being decoded.

A lane is one decoding leaf: a run of tokens that see each other causally. A sample is one
response under construction; its lanes form a tree: a lane that forks holds its branches and the
lane that joins them, and walking that tree (:meth:`Sample.sequence`) gives the token sequence
(trunk, branch 1 with any blocks nested in it, ..., branch k, join, ...). A request is a prompt
and its ``n`` samples, which share the prompt's KV pages.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from .kv import LaneKV
from .sampling import NoiseStream, SamplingParams
from .structure import Action, LaneState
from .transfer import HostCopy

if TYPE_CHECKING:
    from ..graph import FinishReason, ReasoningGraph

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


@dataclass(eq=False)  # lanes are compared by identity: they link to each other in a tree
class Lane:
    sample: Sample | None
    kv: LaneKV
    state: LaneState | None
    start_position: int
    # The block this lane's branch belongs to (``owner``: the lane that forked it) and which
    # branch; a join lane continues the branch its block is nested in, so it inherits both.
    branch: int | None = None
    owner: Lane | None = None
    fork_parent: Lane | None = None  # a branch's first lane: the lane that forked
    joins: Lane | None = None  # a join lane: the lane whose fork it joins
    branches: list[Lane] = field(default_factory=list)  # a lane that forked: each branch's first
    tips: list[Lane] = field(default_factory=list)  # ... and each branch's latest lane
    continued_by: Lane | None = None  # a lane that forked: the lane that joined its branches
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
    # ``tokens[:_converted]`` as an array (:meth:`token_ids`), grown as tokens come
    _ids: np.ndarray = field(default_factory=lambda: np.empty(64, np.int64), init=False, repr=False)
    _converted: int = field(default=0, init=False, repr=False)

    @property
    def end_position(self) -> int:
        return self.start_position + len(self.tokens)

    @property
    def num_fed(self) -> int:
        """How many of its tokens are in its KV (the rest wait for the next step)."""
        return len(self.tokens) - len(self.pending)

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

    def settle_last(self, token: int, logprob: float) -> None:
        """The last token, :data:`PICKED` until the host read it, is ``token``."""
        self.tokens[-1], self.logprobs[-1] = token, logprob
        self._converted = min(self._converted, len(self.tokens) - 1)

    def pop_last(self) -> None:
        """Take back the last appended token (its KV slot and count are the caller's)."""
        self.tokens.pop()
        self.logprobs.pop()
        self.forced.pop()
        self._converted = min(self._converted, len(self.tokens))

    def token_ids(self, start: int = 0) -> np.ndarray:
        """``tokens[start:]`` as a new array. Each token is converted once: a sequential
        response's repetition penalty reads all of them every step."""
        end = len(self.tokens)
        if self._converted < end:
            if len(self._ids) < end:
                self._ids = np.resize(self._ids, max(end, 2 * len(self._ids)))
            self._ids[self._converted : end] = self.tokens[self._converted : end]
            self._converted = end
        return self._ids[start:end].copy()

    def fed(self) -> None:
        self.pending.clear()

    def walk(self) -> Iterator[Lane]:
        """This lane, then every lane after it in the sequence that descends from it: its
        branches (each walked), then the lane that joined them (walked)."""
        yield self
        for branch in self.branches:
            yield from branch.walk()
        if self.continued_by is not None:
            yield from self.continued_by.walk()

    def context_lanes(self) -> list[Lane]:
        """The lanes whose tokens this lane attends to after the prompt, in sequence order: its
        ancestors' (a join: the forking lane's context and every lane of its branches), itself."""
        if self.joins is not None:
            owner = self.joins
            before = owner.context_lanes() + [
                lane for branch in owner.branches for lane in branch.walk()
            ]
        elif self.fork_parent is not None:
            before = self.fork_parent.context_lanes()
        else:
            before = []
        return [*before, self]

    def context(self) -> list[int]:
        """Every token this lane attends to, in sequence order: the prompt, its ancestors, itself."""
        prompt = list(self.sample.request.prompt_ids)
        return prompt + [t for lane in self.context_lanes() for t in lane.tokens]


@dataclass
class Sample:
    request: Request
    index: int
    lanes: list[Lane] = field(default_factory=list)
    truncated: bool = False
    finished: bool = False
    finish_reason: FinishReason | None = None
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

    def sequence(self) -> list[Lane]:
        """The lanes in the order of their tokens in the response."""
        return list(self.lanes[0].walk()) if self.lanes else []

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
    admitted_s: float | None = None  # seconds into the engine call, at its first admission
    graphs: list[ReasoningGraph] = field(default_factory=list)  # built when it finished

    @property
    def finished(self) -> bool:
        return bool(self.samples) and all(s.finished for s in self.samples)
