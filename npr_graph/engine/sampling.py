"""Sampling parameters and batched token selection.

The log-prob the engine records for a token is ``log_softmax(logits / temperature)`` of the full
distribution (temperature 1 when greedy), before top-k, top-p, penalties and structural
constraints: exactly what a training forward computes for the same token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and how long to go on.

    ``temperature`` 0 means greedy. ``repetition_penalty`` applies to tokens already written in
    the current step (the NPR reference uses 1.02 there). ``max_new_tokens`` bounds the critical
    path (what a reader waits for), ``max_total_tokens`` all tokens over all branches (default:
    ``max_new_tokens`` times ``max_branches``). ``n`` samples of one prompt share its KV.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    max_new_tokens: int = 256
    max_total_tokens: int | None = None
    seed: int | None = None
    n: int = 1
    min_branches: int = 2
    max_branches: int = 5
    max_blocks: int = 4
    max_plan_tokens: int = 48
    max_step_tokens: int = 160
    max_takeaway_tokens: int = 96
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        checks = [
            (self.temperature >= 0, "temperature must be >= 0 (0 = greedy)"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0 (0 = off)"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
            (
                self.max_total_tokens is None or self.max_total_tokens >= 1,
                "max_total_tokens must be >= 1",
            ),
            (self.n >= 1, "n must be >= 1"),
            (1 <= self.min_branches <= self.max_branches, "need 1 <= min_branches <= max_branches"),
            (self.max_blocks >= 1, "max_blocks must be >= 1"),
            (
                min(self.max_plan_tokens, self.max_step_tokens, self.max_takeaway_tokens) >= 1,
                "element limits must be >= 1",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid sampling parameters: {message}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def scoring_temperature(self) -> float:
        """The temperature recorded log-probs use: 1 when greedy."""
        return 1.0 if self.greedy else self.temperature

    @property
    def total_budget(self) -> int:
        return self.max_total_tokens or self.max_new_tokens * self.max_branches


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> None:
    """In place, the usual rule: divide positive logits of seen tokens by ``penalty``, multiply
    negative ones."""
    if penalty == 1.0 or seen.numel() == 0:
        return
    values = logits[seen]
    logits[seen] = torch.where(values > 0, values / penalty, values * penalty)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """``logits [V]`` with everything outside the top-k and the top-p nucleus set to -inf."""
    if top_k and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        cumulative = probs.cumsum(-1)
        drop = cumulative - probs > top_p
        logits = logits.clone()
        logits[order[drop]] = float("-inf")
    return logits


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, temperatures: torch.Tensor
) -> torch.Tensor:
    """The recorded log-prob of ``tokens [N]`` under ``logits [N, V]``, row ``i`` at
    ``temperatures[i]`` (``SamplingParams.scoring_temperature``)."""
    scores = torch.log_softmax(logits.float() / temperatures[:, None], dim=-1)
    return scores.gather(1, tokens[:, None])[:, 0]


def select_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    allowed: Sequence[list[int] | None],
    banned: Sequence[list[int] | None],
    penalized: Sequence[list[int] | None],
    scores: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row of ``logits [B, V]``; return ``(tokens [B], logprobs [B])``.

    ``allowed[b]`` restricts row ``b`` to a structural choice, ``banned[b]`` excludes ids (tags
    the format does not allow here); ``penalized[b]`` lists the ids that row's repetition
    penalty applies to. ``scores`` (logits after user processors) are what is picked from when
    given; log-probs always come from ``logits``.
    """
    logits = logits.float()
    picked = logits if scores is None else scores.float()
    tokens = torch.empty(len(params), dtype=torch.long)
    rows = zip(params, generators, allowed, banned, penalized, strict=True)
    for row, (p, generator, allow, ban, seen) in enumerate(rows):
        choice = picked[row].clone()
        if seen:
            apply_repetition_penalty(choice, torch.tensor(sorted(set(seen))), p.repetition_penalty)
        if allow is not None:
            keep = torch.full_like(choice, float("-inf"))
            keep[allow] = 0.0
            choice = choice + keep
        if ban:
            choice[ban] = float("-inf")
        if not torch.isfinite(choice).any():  # a processor left nothing the format allows
            choice = torch.full_like(choice, float("-inf"))
            choice[allow] = logits[row, allow]
        if p.greedy:
            tokens[row] = int(torch.argmax(choice))
            continue
        choice = filter_top_k_top_p(choice / p.temperature, p.top_k, p.top_p)
        tokens[row] = int(torch.multinomial(torch.softmax(choice, dim=-1), 1, generator=generator))
    temperatures = torch.tensor([p.scoring_temperature for p in params])
    return tokens, token_logprobs(logits, tokens, temperatures)
