"""Triton kernels behind ``token_logprobs(..., backend="triton")``; see :mod:`kernels.logprobs`."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _triton

# Globals read inside kernels must be constexpr for the compiler (the interpreter does not care).
NEG = tl.constexpr(-1.0e30)  # finite "minus infinity": keeps exp(m_old - m_new) free of inf - inf
GRAD_BLOCK_V = 1024  # vocabulary columns per program of the logit gradient, on a GPU
GRAD_WARPS = 4


@triton.jit
def _forward_kernel(
    hidden,
    weight,
    targets,
    max_out,
    sum_out,
    target_out,
    entropy_out,
    n,
    vocab,
    dim,
    stride_hidden,
    stride_weight,
    cols_per_split,
    inv_temperature,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One (row block, vocabulary split): online softmax over the split's vocabulary tiles.

    Writes per row the split's running max m, sum of exp(z - m), the target's logit (0 if the
    target is in another split) and, for the entropy, sum of exp(z - m) * (m - z): terms >= 0,
    where lse - sum(p * z) would subtract two numbers the size of the logits.
    """
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n
    target = tl.load(targets + rows, mask=row_ok, other=-1)
    run_max = tl.full([BLOCK_N], NEG, tl.float32)
    run_sum = tl.zeros([BLOCK_N], tl.float32)
    run_target = tl.zeros([BLOCK_N], tl.float32)
    run_gap = tl.zeros([BLOCK_N], tl.float32)
    v_lo = pid_s * cols_per_split
    v_hi = tl.minimum(v_lo + cols_per_split, vocab)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_hi
        acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
        for h0 in range(0, dim, BLOCK_H):
            ks = h0 + tl.arange(0, BLOCK_H)
            k_ok = ks < dim
            x = tl.load(
                hidden + rows[:, None] * stride_hidden + ks[None, :],
                mask=row_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            w = tl.load(
                weight + cols[:, None] * stride_weight + ks[None, :],
                mask=col_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            if UPCAST:
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
        z = tl.where(col_ok[None, :], acc * inv_temperature, NEG)
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        scale = tl.exp(run_max - new_max)
        p = tl.where(col_ok[None, :], tl.exp(z - new_max[:, None]), 0.0)
        if WITH_ENTROPY:  # earlier terms move from the old max to the new one
            run_gap = scale * (run_gap + run_sum * (new_max - run_max))
            run_gap += tl.sum(p * (new_max[:, None] - z), axis=1)
        run_sum = run_sum * scale + tl.sum(p, axis=1)
        hit = (cols[None, :] == target[:, None]) & col_ok[None, :]
        run_target += tl.sum(tl.where(hit, z, 0.0), axis=1)
        run_max = new_max
    out = pid_s * n + rows
    tl.store(max_out + out, run_max, mask=row_ok)
    tl.store(sum_out + out, run_sum, mask=row_ok)
    tl.store(target_out + out, run_target, mask=row_ok)
    if WITH_ENTROPY:
        tl.store(entropy_out + out, run_gap, mask=row_ok)


@triton.jit
def _logit_grad_kernel(
    logits,
    targets,
    lse,
    entropy,
    grad_logprobs,
    grad_entropy,
    vocab,
    stride_row,
    inv_temperature,
    BLOCK_V: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
):
    """In place: raw logits x -> d(loss)/dx for one row and one vocabulary tile."""
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    ok = cols < vocab
    ptr = logits + row * stride_row + cols
    z = tl.load(ptr, mask=ok, other=0.0).to(tl.float32) * inv_temperature
    log_p = z - tl.load(lse + row)
    p = tl.exp(log_p)
    g_lp = tl.load(grad_logprobs + row)
    grad = tl.where(cols == tl.load(targets + row), g_lp, 0.0) - p * g_lp
    if WITH_ENTROPY:
        grad -= tl.load(grad_entropy + row) * p * (log_p + tl.load(entropy + row))
    tl.store(ptr, (grad * inv_temperature).to(logits.dtype.element_ty), mask=ok)


# (BLOCK_N, BLOCK_V, BLOCK_H, num_warps) on a GPU, chosen so that ptxas (sm_90) spills no
# registers (``python -m kernels.compile_check``); float32 multiplies without tensor cores and
# spilled 36 bytes per thread at bf16's tiles.
FORWARD_TILES = {
    torch.bfloat16: (64, 128, 64, 8),
    torch.float16: (64, 128, 64, 8),
    torch.float32: (64, 64, 32, 8),
}


def _blocks(dtype: torch.dtype = torch.bfloat16) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_V, BLOCK_H, num_warps) for ``dtype``; tiny tiles under the interpreter."""
    if _triton.interpreting():
        return 16, 32, 32, 1
    return FORWARD_TILES.get(dtype, FORWARD_TILES[torch.float32])


def forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(logprobs, lse, entropy or None) of one chunk, float32."""
    hidden, weight = hidden.contiguous(), weight.contiguous()
    n, dim = hidden.shape
    vocab = weight.shape[0]
    block_n, block_v, block_h, warps = _blocks(hidden.dtype)
    row_blocks = triton.cdiv(n, block_n)
    # Split the vocabulary so that small chunks still fill the GPU; partial softmax states are
    # merged by log-sum-exp below (each split is a few [n] vectors).
    if hidden.is_cuda:
        programs = 4 * torch.cuda.get_device_properties(hidden.device).multi_processor_count
    else:
        programs = 4
    splits = max(1, min(triton.cdiv(vocab, block_v), triton.cdiv(programs, row_blocks)))
    cols_per_split = triton.cdiv(triton.cdiv(vocab, splits), block_v) * block_v
    splits = triton.cdiv(vocab, cols_per_split)
    parts = torch.empty(4, splits, n, dtype=torch.float32, device=hidden.device)
    _forward_kernel[(row_blocks, splits)](
        hidden,
        weight,
        targets,
        parts[0],
        parts[1],
        parts[2],
        parts[3],
        n,
        vocab,
        dim,
        hidden.stride(0),
        weight.stride(0),
        cols_per_split,
        1.0 / temperature,
        BLOCK_N=block_n,
        BLOCK_V=block_v,
        BLOCK_H=block_h,
        WITH_ENTROPY=with_entropy,
        UPCAST=_triton.upcast_dots(),
        PRECISION=_triton.dot_precision(hidden.dtype),
        num_warps=warps,
    )
    split_max, split_sum, split_target, split_gap = parts
    top = split_max.max(0).values
    scale = torch.exp(split_max - top)
    total = (split_sum * scale).sum(0)
    lse = top + torch.log(total)
    logprobs = split_target.sum(0) - lse
    entropy = None
    if with_entropy:  # H = sum(p * (lse - z)) = log(total) + sum(p * (top - z))
        gap = (scale * (split_gap + split_sum * (top - split_max))).sum(0)
        entropy = torch.log(total) + gap / total
    return logprobs, lse, entropy


def matmul_fp32(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``hidden @ weight.T`` with float32 output (no rounding of low-precision logits)."""
    if hidden.dtype == torch.float32:
        return hidden @ weight.T
    try:
        return torch.mm(hidden, weight.T, out_dtype=torch.float32)
    except (RuntimeError, TypeError, NotImplementedError):  # out_dtype: CUDA only, torch >= 2.8
        # in float32 (a copy of the weight per call): logits rounded to bf16 do not fit the
        # forward's float32 LSE, and their probabilities summed to 0.94-1.06 (10x the gradient
        # error)
        return hidden.float() @ weight.float().T


def logit_grad_(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    grad_logprobs: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    temperature: float,
) -> torch.Tensor:
    """Overwrite raw logits ``[n, V]`` with the loss gradient w.r.t. them; returns ``logits``."""
    n, vocab = logits.shape
    block_v = 32 if _triton.interpreting() else GRAD_BLOCK_V
    with_entropy = grad_entropy is not None
    _logit_grad_kernel[(n, triton.cdiv(vocab, block_v))](
        logits,
        targets,
        lse,
        entropy if with_entropy else lse,
        grad_logprobs.contiguous(),
        grad_entropy.contiguous() if with_entropy else lse,
        vocab,
        logits.stride(0),
        1.0 / temperature,
        BLOCK_V=block_v,
        WITH_ENTROPY=with_entropy,
        num_warps=1 if _triton.interpreting() else GRAD_WARPS,
    )
    return logits
