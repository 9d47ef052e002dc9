"""Triton kernels behind :mod:`kernels.attention`: split-KV paged decode and the LSE merge."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import _triton
from .attention import DecodeLevel, _flat_cache

# Globals read inside kernels must be constexpr for the compiler (the interpreter does not care).
NEG = tl.constexpr(-1.0e30)  # finite "minus infinity" for running maxima (no inf - inf)
MAX_STATES = 256  # partial states per query, all levels and splits together
# Launch settings on a GPU, chosen so that ptxas (sm_90) spills no registers with Triton 3.6 or
# 3.9; run ``python -m kernels.compile_check`` after changing a kernel or a tile. At 64-token
# tiles 4 warps spilled 148-488 bytes per thread, 8 warps 60 (Triton 3.6). float32 multiplies
# without tensor cores (``ieee``) and holds larger operands: its 64-query tiles spilled at any
# KV tile, so it takes 32-query tiles.
DECODE_TILES = {  # dtype -> (query rows of a wide tile, KV tokens per tile, warps)
    torch.bfloat16: (64, 32, 8),
    torch.float16: (64, 32, 8),
    torch.float32: (32, 32, 8),
}
NARROW_Q = 16  # query rows of a tile for levels of at most 16 (query, head) rows
MERGE_CHUNK = 16
MERGE_WARPS = 4


# Integers that change from step to step are not specialized on (Triton compiles a variant per
# value class: 1, a multiple of 16, other), so a run compiles no new variant as its views grow.
@triton.jit(do_not_specialize=["stride_ln", "state_offset", "num_qblocks", "num_splits"])
def _decode_kernel(
    query,
    k_cache,
    v_cache,
    out_values,
    out_lse,
    qo_indptr,
    kv_indptr,
    kv_indices,
    kv_last_page_len,
    stride_qn,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_on,
    stride_os,
    stride_oh,
    stride_ln,
    stride_ls,
    state_offset,
    num_qblocks,
    num_splits,
    scale,
    HEAD_DIM: tl.constexpr,
    GQ: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Program (group x query block, KV head, split): the rows are (query, query head) pairs of
    one KV head, so GQA heads and all queries of a group share each K/V tile read."""
    group = tl.program_id(0) // num_qblocks
    row0 = (tl.program_id(0) % num_qblocks) * BLOCK_Q
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    q_lo = tl.load(qo_indptr + group)
    num_rows = (tl.load(qo_indptr + group + 1) - q_lo) * GQ
    if row0 < num_rows:
        rows = row0 + tl.arange(0, BLOCK_Q)
        row_ok = rows < num_rows
        qi = q_lo + rows // GQ
        head = kv_head * GQ + rows % GQ
        dims = tl.arange(0, BLOCK_D)
        dim_ok = dims < HEAD_DIM
        q = tl.load(
            query + qi[:, None] * stride_qn + head[:, None] * stride_qh + dims[None, :],
            mask=row_ok[:, None] & dim_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            q = q.to(tl.float32)
        p_lo = tl.load(kv_indptr + group)
        num_pages = tl.load(kv_indptr + group + 1) - p_lo
        kv_len = tl.where(
            num_pages > 0, (num_pages - 1) * PAGE + tl.load(kv_last_page_len + group), 0
        )
        # Each group's KV splits evenly over the split programs (whole tiles).
        chunk = tl.cdiv(tl.cdiv(kv_len, num_splits), BLOCK_T) * BLOCK_T
        t_lo = split * chunk
        t_hi = tl.minimum(kv_len, t_lo + chunk)
        run_max = tl.full([BLOCK_Q], NEG, tl.float32)
        run_sum = tl.zeros([BLOCK_Q], tl.float32)
        acc = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
        for t0 in range(t_lo, t_hi, BLOCK_T):
            tokens = t0 + tl.arange(0, BLOCK_T)
            ok = tokens < t_hi
            page = tl.load(kv_indices + p_lo + tokens // PAGE, mask=ok, other=0)
            slot = page.to(tl.int64) * PAGE + tokens % PAGE
            kv_mask = ok[:, None] & dim_ok[None, :]
            k = tl.load(
                k_cache + slot[:, None] * stride_kt + kv_head * stride_kh + dims[None, :],
                mask=kv_mask,
                other=0.0,
            )
            v = tl.load(
                v_cache + slot[:, None] * stride_vt + kv_head * stride_vh + dims[None, :],
                mask=kv_mask,
                other=0.0,
            )
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            scores = tl.where(ok[None, :], scores, NEG)
            new_max = tl.maximum(run_max, tl.max(scores, axis=1))
            alpha = tl.exp(run_max - new_max)
            probs = tl.where(ok[None, :], tl.exp(scores - new_max[:, None]), 0.0)
            run_sum = run_sum * alpha + tl.sum(probs, axis=1)
            acc = acc * alpha[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=PRECISION)
            run_max = new_max
        # empty: this split holds no key (not run_sum > 0, which a NaN score would also fail:
        # NaN must come out NaN for the engine's check to see it)
        has = tl.zeros([BLOCK_Q], tl.int32) < t_hi - t_lo
        safe_sum = tl.where(has, run_sum, 1.0)
        out = tl.where(has[:, None], acc / safe_sum[:, None], 0.0)
        lse = tl.where(has, run_max + tl.log(safe_sum), float("-inf"))
        state = state_offset + split
        tl.store(
            out_values
            + qi[:, None] * stride_on
            + state * stride_os
            + head[:, None] * stride_oh
            + dims[None, :],
            out,
            mask=row_ok[:, None] & dim_ok[None, :],
        )
        tl.store(out_lse + qi * stride_ln + state * stride_ls + head, lse, mask=row_ok)


@triton.jit(do_not_specialize=["num_states", "stride_ln"])
def _merge_kernel(
    values,
    lse,
    out_values,
    out_lse,
    num_states,
    stride_vn,
    stride_vs,
    stride_vh,
    stride_ln,
    stride_ls,
    stride_on,
    stride_oh,
    stride_mn,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Program (query, head): weights exp(lse_s - max), empty states (lse = -inf) weigh 0. The
    states stream through in chunks of ``BLOCK_S``: holding all of them at once (up to
    ``MAX_STATES`` x ``BLOCK_D`` float32 values) made ptxas spill registers."""
    n = tl.program_id(0)
    head = tl.program_id(1)
    chunk = tl.arange(0, BLOCK_S)
    lse_row = lse + n * stride_ln + head
    tops = tl.full([BLOCK_S], float("-inf"), tl.float32)
    live = tl.zeros([BLOCK_S], tl.int32)
    for s0 in range(0, num_states, BLOCK_S):
        states = s0 + chunk
        s = tl.load(lse_row + states * stride_ls, mask=states < num_states, other=float("-inf"))
        tops = tl.maximum(tops, s)  # drops NaN; a NaN state still reaches total through its weight
        live += ((s > float("-inf")) | (s != s)).to(tl.int32)
    top = tl.max(tops, axis=0)
    # empty only when every state is (lse = -inf): a NaN or inf state comes out NaN
    empty = tl.sum(live, axis=0) == 0
    top = tl.where(empty, 0.0, top)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    totals = tl.zeros([BLOCK_S], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for s0 in range(0, num_states, BLOCK_S):
        states = s0 + chunk
        state_ok = states < num_states
        s = tl.load(lse_row + states * stride_ls, mask=state_ok, other=float("-inf"))
        weights = tl.exp(s - top)
        v = tl.load(
            values + n * stride_vn + states[:, None] * stride_vs + head * stride_vh + dims[None, :],
            mask=state_ok[:, None] & dim_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        totals += weights
        acc += tl.sum(weights[:, None] * v, axis=0)
    total = tl.sum(totals, axis=0)
    safe_total = tl.where(empty, 1.0, total)
    tl.store(
        out_values + n * stride_on + head * stride_oh + dims,
        (acc / safe_total).to(out_values.dtype.element_ty),
        mask=dim_ok,
    )
    tl.store(
        out_lse + n * stride_mn + head, tl.where(empty, float("-inf"), top + tl.log(safe_total))
    )


def merge_chunk(num_states: int) -> int:
    """States the merge kernel reads per loop iteration."""
    return max(2, min(MERGE_CHUNK, triton.next_power_of_2(num_states)))


def merge_states(
    values: torch.Tensor, lse: torch.Tensor, out_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``values [N, S, H, D]``, ``lse [N, S, H]`` -> ``([N, H, D]``, ``[N, H])``."""
    n, num_states, heads, dim = values.shape
    if values.stride(-1) != 1:
        values = values.contiguous()
    lse = lse.float().contiguous()
    out = torch.empty(n, heads, dim, dtype=out_dtype or values.dtype, device=values.device)
    out_lse = torch.empty(n, heads, dtype=torch.float32, device=values.device)
    if n == 0:
        return out, out_lse
    _merge_kernel[(n, heads)](
        values,
        lse,
        out,
        out_lse,
        num_states,
        values.stride(0),
        values.stride(1),
        values.stride(2),
        lse.stride(0),
        lse.stride(1),
        out.stride(0),
        out.stride(1),
        out_lse.stride(0),
        HEAD_DIM=dim,
        BLOCK_S=merge_chunk(num_states),
        BLOCK_D=max(16, triton.next_power_of_2(dim)),
        num_warps=1 if _triton.interpreting() else MERGE_WARPS,
    )
    return out, out_lse


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_splits(level: DecodeLevel, programs: int, block_t: int, device: torch.device) -> int:
    """Enough split programs to fill the GPU, none shorter than a few KV tiles."""
    if _triton.interpreting() or device.type != "cuda":
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    most = max(1, level.max_kv_len // (4 * block_t))
    return max(1, min(most, triton.cdiv(2 * sms, max(programs, 1)), 64))


class Launch(NamedTuple):
    """Grid and tile sizes of a step's levels; planned once per step, launched per layer."""

    block_t: int
    warps: int
    levels: list[tuple[DecodeLevel, int, int, int]]  # (level, query rows per tile, blocks, splits)
    total_states: int
    stages: int | None = None  # software-pipelining depth; None: Triton's default

    @property
    def block_q(self) -> int:
        """Query rows per tile of the widest level."""
        return max(block_q for _, block_q, _, _ in self.levels)


def plan_launch(
    levels: Sequence[DecodeLevel],
    heads: int,
    kv_heads: int,
    device: torch.device,
    num_splits: int | None = None,
    tiles: tuple[int, int, int, int] | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> Launch:
    """Grids, splits and tiles for ``levels`` of queries of ``dtype``. ``tiles``: ``(block_q,
    block_t, warps, stages)`` instead of ``DECODE_TILES``, which keep registers from spilling but
    were chosen without timing on a GPU (``benchmarks/gpu_decode.py`` sweeps others)."""
    gq = heads // kv_heads
    stages = None
    if tiles is not None:
        fixed_q, block_t, warps, stages = tiles
    elif _triton.interpreting():
        fixed_q, block_t, warps = 16, 64, 1  # few, wide tiles: the interpreter pays per op
    else:
        fixed_q = None
        wide_q, block_t, warps = DECODE_TILES.get(dtype, DECODE_TILES[torch.float32])
    entries = []
    # chosen splits share the merge's states: a level may not take more than its part
    share = max(1, MAX_STATES // max(len(levels), 1))
    for level in levels:
        rows = max(level.max_group_size * gq, 1)  # (query, head) rows of its largest group
        # A level of single lanes (GQA 4: 4 rows) would leave most of a 64-row tile empty.
        block_q = fixed_q or (NARROW_Q if rows <= NARROW_Q else wide_q)
        qblocks = triton.cdiv(rows, block_q)
        programs = level.num_groups * qblocks * kv_heads
        splits = num_splits or min(_num_splits(level, programs, block_t, device), share)
        entries.append((level, block_q, qblocks, splits))
    total = sum(splits for *_, splits in entries)
    if total > MAX_STATES:
        raise ValueError(f"{total} partial states per query exceed {MAX_STATES}")
    return Launch(block_t, warps, entries, total, stages)


def decode_partials(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    levels: Sequence[DecodeLevel],
    scale: float | None,
    num_splits: int | None = None,
    launch: Launch | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial states of every level and split: ``([Nq, S, Hq, D]`` float32, ``[Nq, S, Hq])``."""
    keys, page = _flat_cache(k_cache)
    values, _ = _flat_cache(v_cache)
    # the kernel steps through a head's dims one element at a time
    query, keys, values = (
        t if t.stride(-1) == 1 else t.contiguous() for t in (query, keys, values)
    )
    nq, heads, dim = query.shape
    kv_heads = keys.shape[1]
    if heads % kv_heads or keys.shape[-1] != dim:
        raise ValueError(f"query heads {heads} / dim {dim} do not fit KV {tuple(keys.shape)}")
    gq = heads // kv_heads
    scale = scale if scale is not None else 1.0 / math.sqrt(dim)
    launch = launch or plan_launch(
        levels, heads, kv_heads, query.device, num_splits, dtype=query.dtype
    )
    block_t, warps, plans, total_states, stages = launch
    pipelining = {} if stages is None else {"num_stages": stages}
    # A state no group writes (a query outside a level's groups) must merge as empty.
    out = torch.zeros(nq, total_states, heads, dim, dtype=torch.float32, device=query.device)
    out_lse = torch.full(
        (nq, total_states, heads), float("-inf"), dtype=torch.float32, device=query.device
    )
    offset = 0
    for level, block_q, qblocks, splits in plans:
        if level.num_groups:
            _decode_kernel[(level.num_groups * qblocks, kv_heads, splits)](
                query,
                keys,
                values,
                out,
                out_lse,
                level.qo_indptr,
                level.kv_indptr,
                level.kv_indices,
                level.kv_last_page_len,
                query.stride(0),
                query.stride(1),
                keys.stride(0),
                keys.stride(1),
                values.stride(0),
                values.stride(1),
                out.stride(0),
                out.stride(1),
                out.stride(2),
                out_lse.stride(0),
                out_lse.stride(1),
                offset,
                qblocks,
                splits,
                scale,
                HEAD_DIM=dim,
                GQ=gq,
                PAGE=page,
                BLOCK_Q=block_q,
                BLOCK_T=block_t,
                BLOCK_D=max(16, triton.next_power_of_2(dim)),
                UPCAST=_triton.upcast_dots(),
                PRECISION=_triton.dot_precision(query.dtype),
                num_warps=warps,
                **pipelining,
            )
        offset += splits
    return out, out_lse
