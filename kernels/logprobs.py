"""Per-token log-probs (and entropy) from hidden states and the lm_head, chunk by chunk.

``log_softmax(hidden @ weight.T / temperature)[target]`` for N tokens and a vocabulary of V never
needs the ``[N, V]`` logits at once: each chunk of ``chunk_size`` tokens computes its logits,
reduces them to (log-sum-exp, target logit, entropy) and drops them. Backward recomputes each
chunk's logits, so peak memory is O(chunk_size x V) in both directions (training on long packed
rows with a 150k vocabulary would otherwise hold tens of GB of logits).

Two implementations behind one function:

* ``torch``: the readable reference, any device. Logits are computed in float32 (low-precision
  inputs are upcast; the weight once per call).
* ``triton``: forward is one fused kernel (an online softmax over vocabulary tiles, split over
  the vocabulary for parallelism, partial results merged by log-sum-exp), backward recomputes a
  chunk's logits with cuBLAS and turns them into logit gradients in one fused elementwise kernel.
  Matmul inputs stay in their dtype with float32 accumulation.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _triton

BACKENDS = ("auto", "torch", "triton")


def token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = False,
    backend: str = "auto",
) -> tuple[Tensor, Tensor | None]:
    """Log-probs of ``targets`` under ``softmax(hidden @ weight.T / temperature)``, in float32.

    ``hidden [N, H]`` (or ``[..., H]`` with ``targets [...]``), ``weight [V, H]``, ``targets``
    valid token ids. Returns ``(logprobs [N], entropy [N] or None)``, both float32. Differentiable
    w.r.t. ``hidden`` and ``weight`` (through the log-probs and the entropy); peak memory is
    O(chunk_size x V). ``backend``: ``torch`` (chunked reference, any device), ``triton``
    (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``), ``auto`` (triton on CUDA, else torch).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if hidden.shape[-1] != weight.shape[-1] or weight.dim() != 2:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} mismatch")
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"targets {tuple(targets.shape)} != hidden {tuple(hidden.shape[:-1])}")
    if temperature <= 0 or chunk_size < 1:
        raise ValueError(
            f"need temperature > 0 and chunk_size >= 1, got {temperature}, {chunk_size}"
        )
    if targets.numel() and bool(((targets < 0) | (targets >= weight.shape[0])).any()):
        # checked here: the Triton kernel found no column for such an id and returned -lse
        raise ValueError(
            f"targets must be token ids in [0, {weight.shape[0]}) (mask ignored positions out "
            "before the call)"
        )
    if backend == "auto":
        backend = "triton" if hidden.is_cuda and _triton.available() else "torch"
    if backend == "triton":
        _triton.require(hidden)
        if hidden.dtype != weight.dtype:  # its backward multiplies them together
            raise ValueError(
                f"the triton backend needs hidden and weight of one dtype, got {hidden.dtype} "
                f"and {weight.dtype}"
            )
    shape = targets.shape
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1).long()
    logprobs, entropy = _ChunkedLogprobs.apply(
        flat_hidden,
        weight,
        flat_targets,
        float(temperature),
        int(chunk_size),
        with_entropy,
        backend,
    )
    return logprobs.reshape(shape), (entropy.reshape(shape) if with_entropy else None)


def reference_logprobs(
    hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """The naive definition with full ``[N, V]`` float32 logits (tests and tiny inputs only)."""
    logits = hidden.float() @ weight.float().T / temperature
    logp = torch.log_softmax(logits, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return logp.gather(-1, targets.long()[..., None]).squeeze(-1), entropy


class _ChunkedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_size, with_entropy, backend):
        n = hidden.shape[0]
        logprobs = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logprobs)
        entropy = torch.empty_like(logprobs) if with_entropy else logprobs.new_empty(0)
        if backend == "triton":
            from . import logprobs_triton

            for lo in range(0, n, chunk_size):
                hi = min(n, lo + chunk_size)
                lp, ls, ent = logprobs_triton.forward(
                    hidden[lo:hi], weight, targets[lo:hi], temperature, with_entropy
                )
                logprobs[lo:hi], lse[lo:hi] = lp, ls
                if with_entropy:
                    entropy[lo:hi] = ent
        else:
            w = weight.float()
            for lo in range(0, n, chunk_size):
                hi = min(n, lo + chunk_size)
                logits = hidden[lo:hi].float() @ w.T / temperature
                chunk_lse = torch.logsumexp(logits, dim=-1)
                lse[lo:hi] = chunk_lse
                logprobs[lo:hi] = logits.gather(1, targets[lo:hi, None]).squeeze(1) - chunk_lse
                if with_entropy:
                    # H = sum(p * (lse - z)): terms >= 0, where lse - sum(p * z) would
                    # subtract two numbers the size of the logits.
                    gap = chunk_lse[:, None] - logits
                    entropy[lo:hi] = (torch.exp(-gap) * gap).sum(-1)
        ctx.save_for_backward(hidden, weight, targets, lse, entropy)
        ctx.temperature, ctx.chunk_size, ctx.with_entropy, ctx.backend = (
            temperature,
            chunk_size,
            with_entropy,
            backend,
        )
        ctx.mark_non_differentiable(lse)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_hidden or need_weight):
            return None, None, None, None, None, None, None
        n, t = hidden.shape[0], ctx.temperature
        if grad_logprobs is None:
            grad_logprobs = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        use_entropy = ctx.with_entropy and grad_entropy is not None
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # Weight gradients summed over chunks in float32, cast once at the end.
        grad_weight = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            if need_weight
            else None
        )
        on_triton = ctx.backend == "triton"
        if on_triton:
            from . import logprobs_triton
        w = weight if on_triton else weight.float()
        for lo in range(0, n, ctx.chunk_size):
            hi = min(n, lo + ctx.chunk_size)
            h = hidden[lo:hi] if on_triton else hidden[lo:hi].float()
            g_lp = grad_logprobs[lo:hi].float()
            g_ent = grad_entropy[lo:hi].float() if use_entropy else None
            ent = entropy[lo:hi] if use_entropy else None
            if on_triton:
                # cuBLAS recomputes the logits, one fused kernel turns them into gradients.
                logits = logprobs_triton.matmul_fp32(h, w)
                logprobs_triton.logit_grad_(logits, targets[lo:hi], lse[lo:hi], ent, g_lp, g_ent, t)
                grad_logits = logits.to(weight.dtype)
            else:
                grad_logits = _logit_grad(h @ w.T / t, targets[lo:hi], lse[lo:hi], g_lp, g_ent, ent)
                grad_logits /= t
            if need_hidden:
                grad_hidden[lo:hi] = (grad_logits @ w).to(hidden.dtype)
            if need_weight:
                grad_weight += (grad_logits.T @ h).float()
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def _logit_grad(
    logits: Tensor,
    targets: Tensor,
    lse: Tensor,
    grad_logprobs: Tensor,
    grad_entropy: Tensor | None,
    entropy: Tensor | None,
) -> Tensor:
    """d(loss)/d(z) for z = scaled logits: d logp_t/dz = onehot(t) - p and
    dH/dz = -p * (log p + H)."""
    log_p = logits - lse[:, None]
    p = log_p.exp()
    grad = -p * grad_logprobs[:, None]
    grad.scatter_add_(1, targets[:, None], grad_logprobs[:, None])
    if grad_entropy is not None:
        grad -= grad_entropy[:, None] * p * (log_p + entropy[:, None])
    return grad
