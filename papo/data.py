"""Packing reasoning graphs into training rows.

Several graphs share one row: their token ids are concatenated, positions come from the
foundation's :func:`npr_graph.position_ids` of each graph, and visibility is the block-diagonal
:meth:`CompactMask.concat` of their compact masks, so no token sees another sample and no sample
needs an ``[L, L]`` matrix. Row position ``i`` predicts the token at ``i + 1`` of the same sample;
``scored`` marks the positions whose target is a response token, exactly the tokens whose
log-probs the engine recorded (a token's log-prob comes from its predecessor in sequence order).
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace

import torch

from npr_graph.graph import ReasoningGraph
from npr_graph.layout import CompactMask, compact_mask, position_ids


@dataclass
class PackedRow:
    """One training row of ``L`` tokens; per-position tensors describe the position's *target*."""

    input_ids: torch.Tensor  # LongTensor[L]
    position_ids: torch.Tensor  # LongTensor[L]
    mask: CompactMask
    targets: torch.Tensor  # LongTensor[L]: the next token of the same sample (0 where none)
    scored: torch.Tensor  # BoolTensor[L]: the target is a response token
    loss_mask: torch.Tensor  # BoolTensor[L]: scored, and the target was not written by the engine
    structural: torch.Tensor  # BoolTensor[L]: the target is (part of) a format tag
    sample_index: torch.Tensor  # LongTensor[L]: the sample (index into the batch) of the position
    advantages: torch.Tensor  # FloatTensor[L]
    old_logprobs: torch.Tensor  # FloatTensor[L]: the engine's log-probs, NaN where unknown
    samples: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    def to(self, device: torch.device | str) -> PackedRow:
        """The row with its per-position tensors on ``device`` (the compact mask stays on the
        CPU: the attention plan is made there)."""
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **moved)

    def response_slices(self) -> list[tuple[int, slice]]:
        """``(sample, positions)`` of each sample's scored positions, in row order."""
        out = []
        for sample in self.samples:
            where = torch.nonzero(self.scored & (self.sample_index == sample)).flatten()
            if where.numel():
                out.append((sample, slice(int(where[0]), int(where[-1]) + 1)))
        return out


def tag_token_mask(graph: ReasoningGraph) -> list[bool]:
    """Per token: does it overlap a format tag of the graph (the structure the model writes)."""
    flags = [False] * graph.num_tokens
    offsets = graph.token_offsets
    for node in graph.nodes:
        for span in (node.open_tag, node.close_tag):
            if span is None:
                continue
            first = bisect_right(offsets, span[0]) - 1
            last = bisect_left(offsets, span[1])
            for token in range(max(first, 0), min(last, graph.num_tokens)):
                flags[token] = True
    return flags


def _sample_tensors(
    graph: ReasoningGraph, advantages: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    length = graph.num_tokens
    prompt = graph.prompt_num_tokens
    if length - prompt < 1:
        raise ValueError("a training sample needs at least one response token")
    if advantages is not None and advantages.shape != (length - prompt,):
        raise ValueError(
            f"advantages must have one value per response token ({length - prompt}), "
            f"got {tuple(advantages.shape)}"
        )
    ids = torch.tensor(graph.token_ids, dtype=torch.long)
    targets = torch.zeros(length, dtype=torch.long)
    targets[:-1] = ids[1:]
    # position i scores token i + 1; without a prompt the first token has no predecessor
    first = max(prompt - 1, 0)
    scored = torch.zeros(length, dtype=torch.bool)
    scored[first : length - 1] = True
    forced = torch.tensor(graph.forced or [False] * length, dtype=torch.bool)
    next_forced = torch.zeros(length, dtype=torch.bool)
    next_forced[:-1] = forced[1:]
    tags = torch.tensor(tag_token_mask(graph), dtype=torch.bool)
    structural = torch.zeros(length, dtype=torch.bool)
    structural[:-1] = tags[1:]
    old = torch.full((length,), math.nan)
    if graph.logprobs is not None:
        values = [math.nan if v is None else v for v in graph.logprobs]
        old[:-1] = torch.tensor(values[1:], dtype=torch.float32)
    adv = torch.zeros(length)
    if advantages is not None:
        adv[first : length - 1] = advantages[first + 1 - prompt :]
    return {
        "input_ids": ids,
        "position_ids": position_ids(graph),
        "targets": targets,
        "scored": scored,
        "loss_mask": scored & ~next_forced,
        "structural": structural,
        "advantages": adv,
        "old_logprobs": old,
    }


def pack(
    graphs: Sequence[ReasoningGraph],
    advantages: Sequence[torch.Tensor | None] | None = None,
    *,
    max_tokens: int = 4096,
) -> list[PackedRow]:
    """Pack ``graphs`` into rows of at most ``max_tokens`` tokens (first fit, longest first; a
    graph longer than ``max_tokens`` gets a row of its own rather than being cut)."""
    if advantages is not None and len(advantages) != len(graphs):
        raise ValueError("give one advantage tensor (or None) per graph")
    lengths = [g.num_tokens for g in graphs]
    order = sorted(range(len(graphs)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for index in order:
        for b, free in enumerate(room):
            if lengths[index] <= free:
                bins[b].append(index)
                room[b] -= lengths[index]
                break
        else:
            bins.append([index])
            room.append(max_tokens - lengths[index])
    rows = []
    for members in bins:
        members.sort()
        parts = [
            _sample_tensors(graphs[i], None if advantages is None else advantages[i])
            for i in members
        ]
        row = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
        row["sample_index"] = torch.cat(
            [torch.full((lengths[i],), i, dtype=torch.long) for i in members]
        )
        row["mask"] = CompactMask.concat([compact_mask(graphs[i]) for i in members])
        rows.append(PackedRow(**row, samples=members))
    return rows
