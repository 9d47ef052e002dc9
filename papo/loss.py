"""Policy losses and aggregations: pure tensor functions in name registries.

Every function works on flat token tensors (the tokens of one packed row or of a whole
micro-batch): ``logprobs[N]`` (with grad), ``advantages[N]``, ``mask[N]`` (True where a token
takes loss: response tokens the model sampled, never engine-written ones) and ``sample_index[N]``
(which sample a token belongs to, for sequence-level aggregation). What a masked-out token holds
never reaches the loss or its gradient, even NaN or infinite log-probs (engine-written tokens a
hard cut left unscored hold no old log-prob).

``papo`` is the NPR objective: the strictly on-policy ratio ``exp(logp - stopgrad(logp))``, which
is 1 in value and has the gradient of ``logp``, so no clipping ever drops a gradient. For stale
mini-batches (``old_logprobs`` given) it clips PPO-style, but never on structural tag tokens: the
structure must keep its gradient. ``ppo_clip`` is the DAPO/GRPO clipped surrogate on every token.
``sft`` is the negative log-likelihood.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .registry import Registry

Aggregation = Callable[..., torch.Tensor]


def _masked(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``values * mask``, with exactly 0 (and a zero gradient) where the mask is 0, whatever the
    value there (``nan * 0`` would be NaN)."""
    return torch.where(mask != 0, values * mask, values.new_zeros(()))


_AGGREGATIONS: Registry[Aggregation] = Registry("aggregation")
register_aggregation = _AGGREGATIONS.register
aggregation = _AGGREGATIONS.get


@register_aggregation("token-mean")
def token_mean(
    values: torch.Tensor,
    mask: torch.Tensor,
    sample_index: torch.Tensor | None = None,
    normalizer: float | None = None,
) -> torch.Tensor:
    """Sum over masked tokens divided by their count (or by ``normalizer``: the token count of
    the whole batch when it is split across micro-batches or ranks)."""
    total = _masked(values, mask).sum()
    count = mask.sum() if normalizer is None else normalizer
    return total / max(float(count), 1.0)


@register_aggregation("seq-mean")
def seq_mean(
    values: torch.Tensor,
    mask: torch.Tensor,
    sample_index: torch.Tensor | None = None,
    normalizer: float | None = None,
) -> torch.Tensor:
    """Mean over each sample's masked tokens, then the sum over samples divided by their count
    (or by ``normalizer``, the number of samples in the whole batch)."""
    if sample_index is None:
        raise ValueError("seq-mean aggregation needs sample_index")
    _, inverse = torch.unique(sample_index, return_inverse=True)
    count = int(inverse.max()) + 1 if inverse.numel() else 0
    zeros = torch.zeros(count, dtype=values.dtype, device=values.device)
    sums = zeros.index_add(0, inverse, _masked(values, mask))
    sizes = zeros.index_add(0, inverse, mask.to(values.dtype))
    present = sizes > 0
    per_sample = sums[present] / sizes[present]
    samples = int(present.sum()) if normalizer is None else normalizer
    return per_sample.sum() / max(float(samples), 1.0)


@dataclass
class LossOutput:
    loss: torch.Tensor
    stats: dict[str, float] = field(default_factory=dict)


PolicyLoss = Callable[..., LossOutput]
_LOSSES: Registry[PolicyLoss] = Registry("policy loss")
register = _LOSSES.register
get = _LOSSES.get
names = _LOSSES.names


def kl_k3(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-token KL(policy || reference) estimate ``exp(r) - r - 1`` with ``r = ref - logp``:
    non-negative, unbiased, low variance (Schulman's k3); 0 where ``mask`` is 0."""
    log_ratio = ref_logprobs - logprobs
    if mask is not None:
        log_ratio = torch.where(mask != 0, log_ratio, log_ratio.new_zeros(()))
    return torch.exp(log_ratio) - log_ratio - 1


def _finish(
    per_token: torch.Tensor,
    logprobs: torch.Tensor,
    mask: torch.Tensor,
    aggregation_name: str,
    sample_index: torch.Tensor | None,
    normalizer: float | None,
    ref_logprobs: torch.Tensor | None,
    kl_coef: float,
    stats: dict[str, float],
) -> LossOutput:
    aggregate = aggregation(aggregation_name)
    mask = mask.to(per_token.dtype)
    loss = aggregate(per_token, mask, sample_index, normalizer)
    if ref_logprobs is not None and kl_coef:
        kl = kl_k3(logprobs, ref_logprobs.to(logprobs.dtype), mask)
        kl_loss = aggregate(kl, mask, sample_index, normalizer)
        loss = loss + kl_coef * kl_loss
        stats["kl"] = float(kl_loss.detach())
    stats["tokens"] = float(mask.sum())
    return LossOutput(loss, stats)


def clipped_surrogate(
    logprobs: torch.Tensor,
    advantages: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    clip: tuple[float, float] | None,
    mask: torch.Tensor,
    exempt: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-token ``-ratio * A``, with ``ratio = exp(logp - old)`` (``old = stopgrad(logp)`` when
    not given); with ``clip = (low, high)``, the PPO pessimum of the clipped and unclipped terms,
    except on ``exempt`` tokens. Masked-out tokens get ratio 1 (their log-probs, old or new, may
    be unknown), so nothing they hold turns the loss or its gradient into NaN."""
    mask = mask != 0
    advantages = advantages.to(logprobs.dtype)
    baseline = logprobs.detach() if old_logprobs is None else old_logprobs.to(logprobs.dtype)
    log_ratio = torch.where(mask, logprobs - baseline, logprobs.new_zeros(()))
    ratio = torch.exp(log_ratio)
    unclipped = -ratio * advantages
    if clip is None:
        return unclipped, {}
    clipped = -torch.clamp(ratio, 1 - clip[0], 1 + clip[1]) * advantages
    per_token = torch.maximum(unclipped, clipped)
    if exempt is not None:
        per_token = torch.where(exempt, unclipped, per_token)
    fraction = float(((per_token != unclipped) & mask).sum()) / max(float(mask.sum()), 1.0)
    return per_token, {"clip_fraction": fraction}


@register("papo")
def papo_loss(
    logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    old_logprobs: torch.Tensor | None = None,
    structural: torch.Tensor | None = None,
    clip: tuple[float, float] | None = None,
    aggregation: str = "token-mean",
    sample_index: torch.Tensor | None = None,
    normalizer: float | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> LossOutput:
    """``-ratio * A`` with the on-policy ratio; PPO clipping only for stale batches (``old_logprobs``
    and ``clip`` given), never on ``structural`` tokens."""
    stale_clip = clip if old_logprobs is not None else None
    per_token, stats = clipped_surrogate(
        logprobs, advantages, old_logprobs, stale_clip, mask, exempt=structural
    )
    return _finish(
        per_token,
        logprobs,
        mask,
        aggregation,
        sample_index,
        normalizer,
        ref_logprobs,
        kl_coef,
        stats,
    )


@register("ppo_clip")
def ppo_clip_loss(
    logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    old_logprobs: torch.Tensor | None = None,
    clip: tuple[float, float] = (0.2, 0.28),
    aggregation: str = "token-mean",
    sample_index: torch.Tensor | None = None,
    normalizer: float | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    **_: object,
) -> LossOutput:
    """The clipped surrogate on every token (DAPO's clip-higher: ``clip = (low, high)``)."""
    per_token, stats = clipped_surrogate(logprobs, advantages, old_logprobs, clip, mask)
    return _finish(
        per_token,
        logprobs,
        mask,
        aggregation,
        sample_index,
        normalizer,
        ref_logprobs,
        kl_coef,
        stats,
    )


@register("sft")
def sft_loss(
    logprobs: torch.Tensor,
    advantages: torch.Tensor | None,
    mask: torch.Tensor,
    *,
    aggregation: str = "token-mean",
    sample_index: torch.Tensor | None = None,
    normalizer: float | None = None,
    **_: object,
) -> LossOutput:
    """Negative log-likelihood of the masked tokens (advantages are ignored)."""
    return _finish(-logprobs, logprobs, mask, aggregation, sample_index, normalizer, None, 0.0, {})
