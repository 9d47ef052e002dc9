"""Decode attention over a paged KV cache, split by KV segments and merged by log-sum-exp.

Attention of a query over the union of disjoint KV segments A and B equals a merge of the two
partial results: with ``o_X`` the softmax-weighted values over X and ``s_X`` its log-sum-exp of
scores, ``s = log(exp(s_A) + exp(s_B))`` and ``o = exp(s_A - s) o_A + exp(s_B - s) o_B``. Cascade
attention uses this to read a KV prefix shared by many queries once: each *level* groups the
queries (contiguous ranges, ``qo_indptr``) and gives every group one KV list (a page table in
FlashInfer's CSR form: ``kv_indptr``, ``kv_indices``, ``kv_last_page_len``); a query's result
is the merge over levels. One level with one query per group is plain paged batch decode.

Log-sum-exps are natural logarithms, float32; an empty segment has ``s = -inf`` and ``o = 0``.

* :func:`merge_states`: merge ``S`` partial states per query and head.
* :func:`paged_decode_attention`: one level (partial states: output and log-sum-exp).
* :func:`cascade_decode_attention`: all levels of a step, merged (what the engine runs per layer).

Each has a plain torch reference (``backend="torch"``) and a Triton kernel (``"triton"``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from . import _triton

BACKENDS = ("auto", "torch", "triton")


@dataclass
class DecodeLevel:
    """One cascade level: query group ``g`` (queries ``qo_indptr[g]:qo_indptr[g + 1]``) attends
    to the pages ``kv_indices[kv_indptr[g]:kv_indptr[g + 1]]``, the last one filled up to
    ``kv_last_page_len[g]``. ``max_kv_len`` (tokens) and ``max_group_size`` (queries) size the
    Triton launch without reading the device."""

    qo_indptr: Tensor  # int32 [G + 1]
    kv_indptr: Tensor  # int32 [G + 1]
    kv_indices: Tensor  # int32 [nnz pages]
    kv_last_page_len: Tensor  # int32 [G]
    max_kv_len: int
    max_group_size: int

    @property
    def num_groups(self) -> int:
        return self.kv_last_page_len.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> DecodeLevel:
        return self.map(lambda t: t.to(device, non_blocking=non_blocking))

    def map(self, move: Callable[[Tensor], Tensor]) -> DecodeLevel:
        """The same level with ``move`` applied to each of its tensors."""
        return DecodeLevel(
            move(self.qo_indptr),
            move(self.kv_indptr),
            move(self.kv_indices),
            move(self.kv_last_page_len),
            self.max_kv_len,
            self.max_group_size,
        )


def _pick(backend: str, *tensors: Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if tensors[0].is_cuda and _triton.available() else "torch"
    if backend == "triton":
        _triton.require(*tensors)
    return backend


def _flat_cache(cache: Tensor) -> tuple[Tensor, int]:
    """``[pages, page_size, Hkv, D]`` or ``[slots, Hkv, D]`` -> (``[slots, Hkv, D]``, page size)."""
    if cache.dim() == 4:
        return cache.reshape(-1, cache.shape[2], cache.shape[3]), cache.shape[1]
    if cache.dim() == 3:
        return cache, 1
    raise ValueError(
        f"KV cache must be [pages, page_size, Hkv, D] or [slots, Hkv, D], got {tuple(cache.shape)}"
    )


# -- merge ------------------------------------------------------------------------------------------
def merge_states(values: Tensor, lse: Tensor, *, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Merge partial attention states: ``values [N, S, H, D]`` and ``lse [N, S, H]`` (float32)
    -> ``(values [N, H, D]`` in the input dtype, ``lse [N, H]`` float32)."""
    if values.dim() != 4 or lse.shape != values.shape[:3]:
        raise ValueError(
            f"need values [N, S, H, D] and lse [N, S, H], got {tuple(values.shape)}, {tuple(lse.shape)}"
        )
    if _pick(backend, values, lse) == "triton":
        from . import attention_triton

        return attention_triton.merge_states(values, lse)
    return merge_states_reference(values, lse)


def merge_states_reference(values: Tensor, lse: Tensor) -> tuple[Tensor, Tensor]:
    lse = lse.float()
    top = lse.max(dim=1).values
    # Empty only when every state is (lse = -inf): a NaN or inf state must come out NaN, for the
    # engine's NaN check to see it, not as "no keys here".
    empty = torch.isneginf(top)
    top = torch.where(empty, torch.zeros_like(top), top)
    weights = torch.exp(lse - top[:, None])  # [N, S, H]; 0 for empty states
    total = weights.sum(dim=1)
    merged = (weights[..., None] * values.float()).sum(dim=1)
    merged = torch.where(empty[..., None], 0.0, merged / torch.where(empty, 1.0, total)[..., None])
    return merged.to(values.dtype), torch.where(empty, -math.inf, top + torch.log(total))


# -- one level ----------------------------------------------------------------------------------------
def paged_decode_attention(
    query: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    kv_indptr: Tensor,
    kv_indices: Tensor,
    kv_last_page_len: Tensor,
    qo_indptr: Tensor | None = None,
    *,
    scale: float | None = None,
    num_splits: int | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Decode attention of ``query [Nq, Hq, D]`` over paged KV, one KV list per query group.

    ``k_cache``/``v_cache``: ``[pages, page_size, Hkv, D]`` (or ``[slots, Hkv, D]``: page size 1,
    so any slot list is a page table); ``Hq`` a multiple of ``Hkv`` (GQA). ``qo_indptr`` groups
    queries (default: one query per group). Returns ``(out [Nq, Hq, D], lse [Nq, Hq])``.
    ``num_splits`` splits each KV list for parallelism (Triton; default: chosen from the shape).
    """
    level = DecodeLevel(
        qo_indptr if qo_indptr is not None else torch.arange(query.shape[0] + 1, dtype=torch.int32),
        kv_indptr,
        kv_indices,
        kv_last_page_len,
        *_level_sizes(
            kv_indptr, kv_last_page_len, qo_indptr, _flat_cache(k_cache)[1], query.shape[0]
        ),
    ).to(query.device)
    if _pick(backend, query, k_cache, v_cache) == "triton":
        from . import attention_triton

        values, lse = attention_triton.decode_partials(
            query, k_cache, v_cache, [level], scale, num_splits
        )
        return attention_triton.merge_states(values, lse, query.dtype)
    return paged_decode_reference(query, k_cache, v_cache, level, scale)


def _level_sizes(
    kv_indptr: Tensor, kv_last_page_len: Tensor, qo_indptr: Tensor | None, page_size: int, nq: int
) -> tuple[int, int]:
    pages = (kv_indptr[1:] - kv_indptr[:-1]).cpu()
    tokens = torch.where(pages > 0, (pages - 1) * page_size + kv_last_page_len.cpu(), 0)
    group = 1 if qo_indptr is None else int((qo_indptr[1:] - qo_indptr[:-1]).max().item())
    return int(tokens.max().item()) if len(tokens) else 0, group


def paged_decode_reference(
    query: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    level: DecodeLevel,
    scale: float | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Plain torch: gather each group's KV, float32 softmax. Returns ``(out, lse)``, ``out`` in
    ``out_dtype`` (default: the query's)."""
    keys, page_size = _flat_cache(k_cache)
    values, _ = _flat_cache(v_cache)
    nq, heads, dim = query.shape
    kv_heads = keys.shape[1]
    groups = heads // kv_heads
    scale = scale if scale is not None else 1.0 / math.sqrt(dim)
    out = torch.zeros(nq, heads, dim, dtype=torch.float32, device=query.device)
    lse = torch.full((nq, heads), -math.inf, dtype=torch.float32, device=query.device)
    qo, kv, last = (t.tolist() for t in (level.qo_indptr, level.kv_indptr, level.kv_last_page_len))
    for g in range(level.num_groups):
        pages = level.kv_indices[kv[g] : kv[g + 1]].long()
        if len(pages) == 0:
            continue
        num_tokens = (len(pages) - 1) * page_size + last[g]
        offsets = torch.arange(page_size, device=pages.device)
        slots = (pages[:, None] * page_size + offsets).flatten()[:num_tokens]
        q = query[qo[g] : qo[g + 1]].float().view(-1, kv_heads, groups, dim)
        scores = torch.einsum("qhgd,thd->qhgt", q, keys[slots].float()) * scale
        group_lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - group_lse[..., None])
        group_out = torch.einsum("qhgt,thd->qhgd", probs, values[slots].float())
        out[qo[g] : qo[g + 1]] = group_out.reshape(-1, heads, dim)
        lse[qo[g] : qo[g + 1]] = group_lse.reshape(-1, heads)
    return out.to(out_dtype or query.dtype), lse


# -- all levels of a step -----------------------------------------------------------------------------
def cascade_decode_attention(
    query: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    levels: Sequence[DecodeLevel],
    *,
    scale: float | None = None,
    backend: str = "auto",
    launch=None,
) -> Tensor:
    """Decode attention of ``query [Nq, Hq, D]`` over the levels' KV lists, merged: ``[Nq, Hq, D]``.

    Every query must see disjoint KV across levels (their union is its context). The Triton path
    writes every level's partial states (split for parallelism) into one buffer and merges once;
    ``launch`` (``attention_triton.plan_launch``) reuses its grid plan across layers.
    """
    if _pick(backend, query, k_cache, v_cache) == "triton":
        from . import attention_triton

        values, lse = attention_triton.decode_partials(
            query, k_cache, v_cache, levels, scale, launch=launch
        )
        return attention_triton.merge_states(values, lse, query.dtype)[0]
    parts = [
        paged_decode_reference(query, k_cache, v_cache, level, scale, torch.float32)
        for level in levels
    ]
    values = torch.stack([p[0] for p in parts], dim=1)
    lse = torch.stack([p[1] for p in parts], dim=1)
    return merge_states_reference(values, lse)[0].to(query.dtype)
