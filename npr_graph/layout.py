"""Positions and visibility: the one definition the engine, training and rewards all read.

**native** (the default): a token sees the earlier tokens of its own node and every token of its
ancestor nodes, nothing else; a node's first position is the largest end position among its
parents (0 for a node without parents), so the steps of a block share a start and the takeaway
starts after the longest step.

**official** reproduces the NPR reference SFT code on the response (the prompt stays causal and
sequential): a causal mask from which, per block, every pair of branch spans (``<step>`` through
``</step>``) is masked both ways, while text between branches stays visible; positions run on
sequentially except that each ``<step>`` restarts at one past ``</guideline>`` and ``<takeaway>``
at one past the last ``</step>`` of its block.

Both are expressed as a :class:`CompactMask` (a segment id per token and a segment-level
visibility table, causal within it) from which the dense ``[L, L]`` mask, the per-segment lists
the engine attends over, and a flex-attention ``BlockMask`` are derived.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import accumulate

import torch

from .graph import ReasoningGraph, ancestors

MODES = ("native", "official")


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown layout mode {mode!r}; choose one of {', '.join(MODES)}")


def _token_lengths(graph: ReasoningGraph) -> list[int]:
    if not graph.tokenized:
        raise ValueError("layout needs token spans: parse token ids, or text with tokenizer=")
    return [node.num_tokens for node in graph.nodes]


def node_start(parent_ends: Iterable[int]) -> int:
    """The native rule: a node starts at the largest end position among its parents, 0 without
    parents. The engine calls this when a lane starts a node, so rollout and training agree."""
    return max(parent_ends, default=0)


def node_starts(graph: ReasoningGraph, lengths: list[int] | None = None) -> list[int]:
    """Native first position of every node: the largest end position among its parents.

    ``lengths`` weighs nodes by something other than tokens (metrics use characters when the
    graph is not tokenized)."""
    lengths = _token_lengths(graph) if lengths is None else lengths
    starts: list[int] = []
    ends: list[int] = []
    for node in graph.nodes:
        start = node_start(ends[p] for p in node.parents)
        starts.append(start)
        ends.append(start + lengths[node.id])
    return starts


def position_ids(graph: ReasoningGraph, mode: str = "native") -> torch.Tensor:
    """Position of every token of the full sequence (prompt + response), ``LongTensor[L]``."""
    _check_mode(mode)
    if mode == "official":
        return _official_positions(graph)
    out: list[int] = []
    for node, start in zip(graph.nodes, node_starts(graph), strict=True):
        out.extend(range(start, start + node.num_tokens))
    return torch.tensor(out, dtype=torch.long)


def ancestor_spans(graph: ReasoningGraph) -> list[list[tuple[int, int]]]:
    """Per node, the token ranges ``[start, end)`` of its ancestors, merged, in sequence order:
    with the node's own tokens up to itself, what each of its tokens attends to (native)."""
    lengths = _token_lengths(graph)
    starts = [0, *accumulate(lengths)]
    out = []
    for bits in ancestors(graph):
        spans: list[tuple[int, int]] = []
        while bits:
            lowest = bits & -bits
            bits ^= lowest
            node = lowest.bit_length() - 1
            if not lengths[node]:
                continue
            if spans and spans[-1][1] == starts[node]:
                spans[-1] = (spans[-1][0], starts[node + 1])
            else:
                spans.append((starts[node], starts[node + 1]))
        out.append(spans)
    return out


@dataclass
class CompactMask:
    """Visibility without an ``[L, L]`` matrix.

    Token ``q`` may attend to token ``k`` iff ``k <= q`` and ``visible[segment[q], segment[k]]``.
    In native mode the segments are the graph's nodes; in official mode they are the branch spans
    and the text around them.
    """

    segment: torch.Tensor  # LongTensor[L]
    visible: torch.Tensor  # BoolTensor[S, S]

    @property
    def num_tokens(self) -> int:
        return int(self.segment.numel())

    def to_dense(self) -> torch.Tensor:
        """The ``BoolTensor[L, L]`` mask (True = may attend), filled one segment run at a time."""
        dense = torch.empty(self.num_tokens, self.num_tokens, dtype=torch.bool)
        for start, end in self.segment_spans():
            dense[start:end] = self.visible[self.segment[start], self.segment]
        return dense.tril_()

    def allows(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """Elementwise rule over index tensors; the ``mask_mod`` of flex attention."""
        return (key <= query) & self.visible[self.segment[query], self.segment[key]]

    def block_mask(self, block_size: int = 128, device: str | torch.device = "cpu"):
        """A ``torch.nn.attention.flex_attention.BlockMask`` for this mask (one sequence)."""
        from torch.nn.attention.flex_attention import create_block_mask

        segment = self.segment.to(device)
        visible = self.visible.to(device)

        def mask_mod(batch, head, query, key):
            return (key <= query) & visible[segment[query], segment[key]]

        length = self.num_tokens
        return create_block_mask(
            mask_mod, None, None, length, length, device=device, BLOCK_SIZE=block_size
        )

    def segment_spans(self) -> list[tuple[int, int]]:
        """Token ranges ``[start, end)`` of each maximal run of one segment, in sequence order."""
        if self.num_tokens == 0:
            return []
        change = torch.nonzero(self.segment[1:] != self.segment[:-1]).flatten() + 1
        bounds = [0, *change.tolist(), self.num_tokens]
        return list(zip(bounds, bounds[1:], strict=False))

    def visible_ranges(self, token: int) -> list[tuple[int, int]]:
        """The token ranges token ``token`` attends to (its own segment up to itself included)."""
        out = []
        row = self.visible[self.segment[token]]
        for start, end in self.segment_spans():
            if start > token:
                break
            if row[self.segment[start]]:
                out.append((start, min(end, token + 1)))
        return out

    @staticmethod
    def concat(masks: list[CompactMask]) -> CompactMask:
        """Pack several sequences into one row: block-diagonal, no cross-sequence attention."""
        segments, offset = [], 0
        for mask in masks:
            segments.append(mask.segment + offset)
            offset += mask.visible.shape[0]
        return CompactMask(torch.cat(segments), torch.block_diag(*[m.visible for m in masks]))


def node_visibility(graph: ReasoningGraph) -> torch.Tensor:
    """``BoolTensor[N, N]``: entry ``[i, j]`` is True iff node ``i`` may see node ``j``
    (``j`` is ``i`` or one of its ancestors)."""
    count = len(graph.nodes)
    rows = []
    for node_id, bits in enumerate(ancestors(graph)):
        bits |= 1 << node_id
        packed = bits.to_bytes((count + 7) // 8, "little")
        rows.append(torch.frombuffer(bytearray(packed), dtype=torch.uint8))
    if not rows:
        return torch.zeros(0, 0, dtype=torch.bool)
    bytes_ = torch.stack(rows)
    bits_ = (bytes_[:, :, None] >> torch.arange(8, dtype=torch.uint8)) & 1
    return bits_.reshape(count, -1)[:, :count].bool()


def compact_mask(graph: ReasoningGraph, mode: str = "native") -> CompactMask:
    """The mask of ``graph`` in compact form (see :class:`CompactMask`)."""
    _check_mode(mode)
    if mode == "official":
        return _official_mask(graph)
    segment: list[int] = []
    for node, length in enumerate(_token_lengths(graph)):
        segment.extend([node] * length)
    return CompactMask(torch.tensor(segment, dtype=torch.long), node_visibility(graph))


def attention_mask(
    graph: ReasoningGraph, mode: str = "native", sliding_window: int | None = None
) -> torch.Tensor:
    """``BoolTensor[L, L]`` over prompt + response tokens; True = may attend.

    With ``sliding_window`` (models with local attention layers), a token also sees only keys
    fewer than that many *positions* behind it, positions being those of ``position_ids``."""
    mask = compact_mask(graph, mode).to_dense()
    if sliding_window is not None:
        positions = position_ids(graph, mode)
        mask &= (positions[:, None] - positions[None, :]) < sliding_window
    return mask


# -- official (reference) layout -----------------------------------------------------------------
def _tag_token(graph: ReasoningGraph, char: int) -> int:
    """Index of the token holding character ``char`` of the text."""
    return bisect_right(graph.token_offsets, char) - 1


def _branch_spans(graph: ReasoningGraph) -> list[list[tuple[int, int]]]:
    """Per block, the token span of each branch from its open tag through its close tag."""
    spans = []
    for block in graph.blocks:
        block_spans = []
        for branch in block.branches:
            tagged = [
                graph.nodes[i] for i in branch if graph.nodes[i].kind.value in ("step", "path")
            ]
            if not tagged:
                continue
            first, last = tagged[0], tagged[-1]
            start = _tag_token(graph, first.open_tag[0]) if first.open_tag else first.token_start
            end = _tag_token(graph, last.close_tag[1] - 1) + 1 if last.close_tag else last.token_end
            block_spans.append((start, max(start, end)))
        spans.append(block_spans)
    return spans


def _official_mask(graph: ReasoningGraph) -> CompactMask:
    """Segments are runs of tokens with the same branch memberships (a nested branch's tokens
    also lie in the enclosing branch); two segments are hidden from each other when they sit in
    different branches of one block."""
    opening: dict[int, list[tuple[int, int]]] = defaultdict(list)
    closing: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for block, block_spans in enumerate(_branch_spans(graph)):
        for branch, (start, end) in enumerate(block_spans):
            if start < end:
                opening[start].append((block, branch))
                closing[end].append((block, branch))
    bounds = sorted({0, graph.num_tokens, *opening, *closing})
    memberships: list[frozenset[tuple[int, int]]] = []
    ids: dict[frozenset[tuple[int, int]], int] = {}
    segment: list[int] = []
    active: set[tuple[int, int]] = set()
    for start, end in zip(bounds, bounds[1:], strict=False):  # a sweep over the span bounds
        active.difference_update(closing.get(start, ()))
        active.update(opening.get(start, ()))
        member = frozenset(active)
        if member not in ids:
            ids[member] = len(memberships)
            memberships.append(member)
        segment.extend([ids[member]] * (end - start))
    count = len(memberships)
    in_block: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for index, member in enumerate(memberships):
        for block, branch in member:
            in_block[block].append((index, branch))
    hidden = torch.zeros(count, count, dtype=torch.bool)
    for entries in in_block.values():
        rows = torch.tensor([index for index, _ in entries])
        branches = torch.tensor([branch for _, branch in entries])
        grid = (rows[:, None], rows[None, :])
        hidden[grid] |= branches[:, None] != branches[None, :]
    return CompactMask(torch.tensor(segment, dtype=torch.long), ~hidden)


def _official_positions(graph: ReasoningGraph) -> torch.Tensor:
    """Sequential positions with restarts, built run by run: a restart's value depends only on
    positions of earlier tokens."""
    restarts: list[tuple[int, list[int], int]] = []  # (token, tokens whose max position..., +1)
    for block, block_spans in zip(graph.blocks, _branch_spans(graph), strict=True):
        if not block_spans:
            continue
        fork_end = block_spans[0][0] - 1
        closes = [graph.nodes[i] for i in block.header if graph.nodes[i].close_tag is not None]
        if closes:
            fork_end = _tag_token(graph, closes[-1].close_tag[1] - 1)
        for start, _ in block_spans:
            restarts.append((start, [fork_end], 1))
        join = graph.nodes[block.join] if block.join is not None else None
        if join is not None and join.open_tag is not None:
            restarts.append(
                (_tag_token(graph, join.open_tag[0]), [end - 1 for _, end in block_spans], 1)
            )
    restarts.sort()
    run_starts = [0]
    run_bases = [0]

    def position(token: int) -> int:
        if token < 0:
            return -1
        run = bisect_right(run_starts, token) - 1
        return run_bases[run] + token - run_starts[run]

    for token, sources, step in restarts:
        base = max(position(source) for source in sources) + step
        if run_starts[-1] == token:
            run_bases[-1] = base
        else:
            run_starts.append(token)
            run_bases.append(base)
    out: list[int] = []
    for start, end, base in zip(
        run_starts, [*run_starts[1:], graph.num_tokens], run_bases, strict=True
    ):
        out.extend(range(base, base + end - start))
    return torch.tensor(out, dtype=torch.long)
