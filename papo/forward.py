"""The training forward on packed graph rows: graph-masked attention and per-token log-probs.

Visibility comes from the row's :class:`~npr_graph.layout.CompactMask` (a segment per node, the
native rule). :class:`GraphAttentionPlan` turns it, once per row, into *groups*: maximal runs of
segments that see one fixed set of earlier key ranges plus everything before them inside the run,
so that within a group attention is plain causal attention over ``external keys + own tokens``.
A sequential stretch of a trace (prompt, guideline, plans; a takeaway and what follows) is one
group; each step of a block is its own group seeing the block's prefix. Every layer then runs one
SDPA call per group (long groups in query chunks), reusing the plan, and no ``[L, L]`` mask is
ever built. Flex attention would do the same from the block mask on GPU, but has no backward on
CPU in torch 2.13; this path runs anywhere and is exact.

Log-probs come from the decoder's hidden states through :func:`kernels.token_logprobs`, which
never materializes ``[tokens, vocab]`` logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F
from transformers import AttentionInterface

from kernels import token_logprobs
from npr_graph.engine.attention import attention_implementation
from npr_graph.layout import CompactMask

from .data import PackedRow

ATTENTION_NAME = "npr_graph_train"
QUERY_CHUNK = 1024


@dataclass
class _Chunk:
    """Queries ``[q_start, q_end)`` attend to the keys at ``key_ranges`` (in order); the first
    ``full`` keys are visible to every query, the rest form a causal diagonal block."""

    q_start: int
    q_end: int
    key_ranges: list[tuple[int, int]]
    full: int

    @property
    def causal_only(self) -> bool:
        return self.full == 0


class GraphAttentionPlan:
    """Per-row attention groups, derived once from the compact mask and used by every layer."""

    def __init__(
        self,
        mask: CompactMask,
        positions: torch.Tensor | None = None,
        query_chunk: int = QUERY_CHUNK,
    ) -> None:
        self.positions = positions
        self.chunks = _chunks(mask, query_chunk)
        self._masks: dict[tuple[int, int | None], torch.Tensor | None] = {}
        self._key_index: dict[int, torch.Tensor] = {}

    def key_index(self, chunk_id: int, device: torch.device) -> torch.Tensor | slice:
        chunk = self.chunks[chunk_id]
        if len(chunk.key_ranges) == 1:
            return slice(*chunk.key_ranges[0])
        if chunk_id not in self._key_index:
            self._key_index[chunk_id] = torch.cat(
                [torch.arange(a, b, device=device) for a, b in chunk.key_ranges]
            )
        return self._key_index[chunk_id]

    def mask(
        self, chunk_id: int, sliding_window: int | None, device: torch.device
    ) -> torch.Tensor | None:
        """The chunk's boolean mask ``[Q, K]``, or None when plain causal attention is exact."""
        key = (chunk_id, sliding_window)
        if key in self._masks:
            return self._masks[key]
        chunk = self.chunks[chunk_id]
        queries = chunk.q_end - chunk.q_start
        if chunk.causal_only and sliding_window is None:
            self._masks[key] = None
            return None
        diagonal = torch.ones(queries, queries, dtype=torch.bool, device=device).tril_()
        mask = torch.cat(
            [torch.ones(queries, chunk.full, dtype=torch.bool, device=device), diagonal], dim=1
        )
        if sliding_window is not None:
            if self.positions is None:
                raise ValueError("sliding-window layers need the plan's positions")
            positions = self.positions.to(device)
            index = self.key_index(chunk_id, device)
            key_positions = positions[index]
            query_positions = positions[chunk.q_start : chunk.q_end]
            mask &= (query_positions[:, None] - key_positions[None, :]) < sliding_window
        self._masks[key] = mask
        return mask


_SEEN_BLOCK = 1024  # spans whose visibility rows are read at once (a [1024, spans] table)


def _chunks(mask: CompactMask, query_chunk: int) -> list[_Chunk]:
    spans = mask.segment_spans()
    segments = torch.tensor([int(mask.segment[start]) for start, _ in spans], dtype=torch.long)
    visible = mask.visible.cpu()
    # bit i of seen[j]: span i is an earlier span that span j may attend to. Built a block of
    # spans at a time from the segment table (a pair at a time was quadratic in Python: 7 s for
    # a row of 2,200 spans)
    seen = []
    for j0 in range(0, len(spans), _SEEN_BLOCK):
        j1 = min(j0 + _SEEN_BLOCK, len(spans))
        block = visible[segments[j0:j1]][:, segments[:j1]]
        block &= torch.arange(j1)[None, :] < torch.arange(j0, j1)[:, None]  # earlier spans
        for row in block.numpy():
            seen.append(int.from_bytes(np.packbits(row, bitorder="little").tobytes(), "little"))
    groups: list[tuple[int, int]] = []  # (first span, last span + 1)
    for j in range(len(spans)):
        if groups:
            first, _ = groups[-1]
            inside = ((1 << j) - 1) ^ ((1 << first) - 1)  # spans first..j-1
            if seen[j] == seen[first] | inside:
                groups[-1] = (first, j + 1)
                continue
        groups.append((j, j + 1))
    chunks = []
    for first, end in groups:
        external = [spans[i] for i in range(first) if seen[first] >> i & 1]
        external = _merge(external)
        full = sum(b - a for a, b in external)
        start, stop = spans[first][0], spans[end - 1][1]
        for q_start in range(start, stop, query_chunk):
            q_end = min(q_start + query_chunk, stop)
            own_before = [(start, q_start)] if q_start > start else []
            key_ranges = _merge(external + own_before + [(q_start, q_end)])
            chunks.append(_Chunk(q_start, q_end, key_ranges, full + q_start - start))
    return chunks


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in ranges:
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        elif b > a:
            out.append((a, b))
    return out


def graph_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    npr_graph_plan: GraphAttentionPlan | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """``query [1, H, L, D]``, ``key``/``value [1, Hkv, L, D]`` of one packed row."""
    if npr_graph_plan is None:
        raise RuntimeError("npr_graph_train attention needs a GraphAttentionPlan (npr_graph_plan=)")
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("attention logit soft-capping is not supported in training")
    if query.shape[0] != 1:
        raise ValueError("graph attention runs one packed row at a time")
    plan = npr_graph_plan
    window = kwargs.get("sliding_window")
    gqa = query.shape[1] != key.shape[1]
    dropout = dropout if module.training else 0.0
    out = torch.empty_like(query)
    for chunk_id, chunk in enumerate(plan.chunks):
        index = plan.key_index(chunk_id, query.device)
        chunk_keys = key[:, :, index]
        chunk_values = value[:, :, index]
        mask = plan.mask(chunk_id, window, query.device)
        out[:, :, chunk.q_start : chunk.q_end] = F.scaled_dot_product_attention(
            query[:, :, chunk.q_start : chunk.q_end],
            chunk_keys,
            chunk_values,
            attn_mask=mask,
            is_causal=mask is None,
            dropout_p=dropout,
            scale=scaling,
            enable_gqa=gqa,
        )
    return out.transpose(1, 2), None


AttentionInterface.register(ATTENTION_NAME, graph_attention)


def _decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    config = getattr(model.config, "text_config", model.config)
    if getattr(config, "final_logit_softcapping", None):
        raise NotImplementedError("final logit soft-capping is not supported in training")
    head = model.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        raise NotImplementedError("training needs a bias-free linear lm_head")
    return model.get_decoder(), head


def row_logprobs(
    model: torch.nn.Module,
    row: PackedRow,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_size: int = 1024,
    backend: str = "auto",
    query_chunk: int = QUERY_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (and entropies) at the row's ``scored`` positions, in row order: for each scored
    position, ``log_softmax(logits / temperature)`` of its target. Differentiable."""
    decoder, head = _decoder_and_head(model)
    device = head.weight.device
    plan = GraphAttentionPlan(row.mask, row.position_ids, query_chunk)
    with attention_implementation(model, ATTENTION_NAME):
        hidden = decoder(
            input_ids=row.input_ids[None].to(device),
            position_ids=row.position_ids[None].to(device),
            npr_graph_plan=plan,
            use_cache=False,
        ).last_hidden_state[0]
    scored = row.scored.to(device)
    return token_logprobs(
        hidden[scored],
        head.weight,
        row.targets.to(device)[scored],
        temperature=temperature,
        chunk_size=chunk_size,
        with_entropy=with_entropy,
        backend=backend,
    )
