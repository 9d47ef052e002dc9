"""Sampling parameters and batched token selection.

The log-prob the engine records for a token is ``log_softmax(logits / temperature)`` of the full
distribution (temperature 1 when greedy), before top-k, top-p, penalties and structural
constraints: exactly what a training forward computes for the same token.

Selection runs where the logits are (the GPU on a CUDA model) as a few batched tensor operations
over all rows; only the picked ids and their log-probs come back to the host. Sampling is the
Gumbel-max race, ``argmax(logits / t + G)``, with each row's noise ``G`` a pure function of a key
derived from (the sample's seed, the lane's place in the DAG, the lane's draw count): the noise
of a seeded sample depends neither on what it is batched with nor on when its lanes are
scheduled. Its logits may, by their last bits (another batch shape, another kernel, another world
size): a race keeps picks stable under such changes, where inverse-CDF sampling over a running sum
of 10^5 probabilities flips about 1% of them. (In bf16 the changes are larger, and over hundreds
of tokens a near-tie does flip.)

Top-k and top-p rank a few candidates per row (a partial sort) and sort whole rows only when a
row's cut reaches past them, which the host checks. An overlapped engine step must not wait for
the device, so it *speculates* instead: it ranks the largest candidate set, and a row whose cut
reached past it is marked unsettled, for the engine to pick again exactly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from ..typecheck import type_problems
from .transfer import to_device

MIN_TEMPERATURE = 1e-6
MAX_TEMPERATURE = torch.finfo(torch.float32).max


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and how long to go on.

    ``temperature`` 0 means greedy. ``repetition_penalty`` applies to tokens already written in
    the current step (the NPR reference uses 1.02 there; a path resumed after a nested block:
    since it resumed), in sequential mode to the whole response (its one step), and nowhere
    else (plans, takeaways, text between blocks). ``max_new_tokens`` bounds the critical
    path (what a reader waits for), ``max_total_tokens`` all tokens over all branches (default:
    ``max_new_tokens`` times ``max_branches``); the engine-written text under way when a budget
    is reached (a branch header, then the closing tags of the cut) is still written, a few tokens
    past it. In constrained mode ``max_plan_tokens``, ``max_step_tokens`` and
    ``max_takeaway_tokens`` bound each element's tokens after its opening tag, the text the
    engine writes there included (a step's newline and ``1:``); the engine then closes it.
    ``n`` samples of one prompt share its KV.
    ``max_blocks`` bounds the blocks on any one path through a sample, ``max_depth`` how deep
    blocks nest where the format allows it (Multiverse; 1 = no nesting). ``suppress_tokens`` are never picked (their log-probs still count in the recorded ones).
    ``seed`` fixes every sample's tokens on a given kind of device (sample ``i`` of a prompt uses
    ``seed * 1_000_003 + i``), whatever else runs in the same batch and however its lanes are
    scheduled (in bf16, another batch shape can flip a near-tie); unseeded samples draw their
    keys from torch's global generator.
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
    max_depth: int = 2
    max_plan_tokens: int = 48
    max_step_tokens: int = 160
    max_takeaway_tokens: int = 96
    ignore_eos: bool = False
    suppress_tokens: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        problems = type_problems(self)
        if problems:
            raise ValueError(f"invalid sampling parameters: {'; '.join(problems)}")
        object.__setattr__(self, "suppress_tokens", tuple(self.suppress_tokens))
        checks = [
            # below that, logits / temperature overflows to inf and the picks turn to NaN
            (
                self.temperature == 0 or self.temperature >= MIN_TEMPERATURE,
                f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}",
            ),
            # above it, the float32 temperature is inf and banned ids' -inf / inf is NaN
            (
                self.temperature <= MAX_TEMPERATURE,
                f"temperature must be at most {MAX_TEMPERATURE:.3g}",
            ),
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
            (self.max_depth >= 1, "max_depth must be >= 1 (1 = no nested blocks)"),
            (
                min(self.max_plan_tokens, self.max_step_tokens, self.max_takeaway_tokens) >= 1,
                "element limits must be >= 1",
            ),
            (all(t >= 0 for t in self.suppress_tokens), "suppress_tokens must be ids >= 0"),
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


def apply_repetition_penalty(
    logits: torch.Tensor,
    penalized: Sequence[Sequence[int] | np.ndarray | None],
    penalties: Sequence[float],
) -> None:
    """In place on ``logits [B, V]`` (contiguous), the usual rule on the ids ``penalized[b]`` of
    row ``b``: divide positive logits by ``penalties[b]``, multiply negative ones."""
    rows, counts, factors, ids = [], [], [], []
    for row, (seen, penalty) in enumerate(zip(penalized, penalties, strict=True)):
        if seen is not None and len(seen) and penalty != 1.0:
            rows.append(row)
            counts.append(len(seen))
            factors.append(penalty)
            ids.append(np.asarray(seen, dtype=np.int64))
    if not rows:
        return
    # A sequential response's every id, each step: deduplicating them in Python and indexing by
    # (row, id) pairs cost host time linear in the response, in Python. An id seen twice is
    # read and written twice with the same value.
    counts = np.array(counts)
    flat = np.repeat(np.array(rows) * logits.shape[1], counts) + np.concatenate(ids)
    index = to_device(torch.from_numpy(flat), logits.device)
    factor = torch.from_numpy(np.repeat(np.array(factors), counts)).to(logits.dtype)
    factor = to_device(factor, logits.device)
    values = logits.view(-1).index_select(0, index)
    penalized_values = torch.where(values > 0, values / factor, values * factor)
    logits.view(-1).index_copy_(0, index, penalized_values)


# Most top-k sets and nuclei are small: rank this many candidates first (a partial sort), and
# sort whole rows only when a row's nucleus reaches past them.
NUCLEUS_CANDIDATES = (256, 4096)


def filter_top_k_top_p(
    logits: torch.Tensor, top_k: Sequence[int], top_p: Sequence[float]
) -> torch.Tensor:
    """``logits [B, V]`` with everything outside row ``b``'s top-``top_k[b]`` (0: off; ties at
    the k-th value kept) and then outside its top-``top_p[b]`` nucleus set to -inf."""
    values, ids, _ = truncate(logits, top_k, top_p)
    return values if ids is None else _whole_rows(logits, top_k, top_p, values, ids)


def _whole_rows(
    logits: torch.Tensor,
    top_k: Sequence[int],
    top_p: Sequence[float],
    values: torch.Tensor,
    ids: torch.Tensor,
) -> torch.Tensor:
    """:func:`truncate`'s candidate form ``(values, ids)`` spread over whole rows: an untrimmed
    row's candidates carry its logits unchanged, and its other tokens stay too."""
    trimmed = _on(_trims(top_k, top_p, logits.shape[-1]), logits.device, torch.bool)
    return logits.masked_fill(trimmed[:, None], float("-inf")).scatter_(1, ids, values)


def _trims(top_k: Sequence[int], top_p: Sequence[float], vocab: int) -> list[bool]:
    """Whether each row has a top-k or a top-p cut."""
    return [0 < k < vocab or p < 1.0 for k, p in zip(top_k, top_p, strict=True)]


def truncate(
    logits: torch.Tensor, top_k: Sequence[int], top_p: Sequence[float], speculate: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """:func:`filter_top_k_top_p`, in the cheapest form: ``(values [B, V], None, None)``, or
    ``(values [B, n], ids [B, n], None)`` when every trimmed row's survivors are among its ``n``
    best candidates (``values`` -inf where dropped). In the second form rows without top-k or
    top-p keep only their candidates: a caller may take it only when those rows need no more
    (greedy).

    ``speculate``: read nothing on the host (the check above waits for the device). Rank the
    largest candidate set that holds every top-k (whole rows if none does), and return
    ``settled [B]`` (bool, on the device) last: False where a trimmed row's cut reaches past the
    candidates, whose values then cover only the candidates."""
    vocab = logits.shape[-1]
    trims = _trims(top_k, top_p, vocab)
    if not any(trims):
        return logits, None, None
    device = logits.device
    cuts = [k for k in top_k if 0 < k < vocab]
    has_k = _on([0 < k < vocab for k in top_k], device, torch.bool)[:, None]
    kth_index = _on([k - 1 if 0 < k < vocab else 0 for k in top_k], device)[:, None]
    # A nucleus of 1 keeps everything (float sums may pass 1 by an ulp).
    nucleus = to_device(torch.tensor([p if p < 1.0 else float("inf") for p in top_p]), device)
    trimmed = _on(trims, device, torch.bool)
    sizes = [c for c in NUCLEUS_CANDIDATES if max(cuts, default=0) <= c < vocab] + [vocab]
    if speculate:
        sizes = sizes[-2:-1] or sizes  # the largest candidate set, else whole rows
    kth = None
    for size in sizes:
        if size < vocab:
            ranked, order = logits.topk(size, dim=-1)
        else:
            ranked, order = torch.sort(logits, dim=-1, descending=True)
        if kth is None:  # every ranking tried holds each row's k-th best: once for all sizes
            kth = torch.where(has_k, ranked.gather(1, kth_index), float("-inf"))
            kept = logits.masked_fill(logits < kth, float("-inf"))
            log_total = kept.logsumexp(-1, keepdim=True)
        ranked = ranked.masked_fill(ranked < kth, float("-inf"))
        probs = (ranked - log_total).exp()
        cumulative = probs.cumsum(-1)
        drop = cumulative - probs > nucleus[:, None]
        if size == vocab:
            return (
                kept.masked_fill(torch.zeros_like(drop).scatter_(1, order, drop), float("-inf")),
                None,
                None,
            )
        # Settled: each trimmed row's top-k cut or nucleus ends within the candidates.
        beyond = ranked[:, -1] < kth[:, 0]  # top-k already cut inside
        settled = beyond | (cumulative[:, -1] > nucleus) | ~trimmed
        if speculate:
            return ranked.masked_fill(drop, float("-inf")), order, settled
        if bool(settled.all()):
            return ranked.masked_fill(drop, float("-inf")), order, None
    raise AssertionError("unreachable: the last size sorts whole rows")


_M31 = (1 << 31) - 1


def _mix31(x):
    """A bijection on [0, 2^31), on Python ints and int64 tensors alike (products stay < 2^63)."""
    x = ((x ^ (x >> 15)) * 0x2C1B3C6D) & _M31
    x = ((x ^ (x >> 12)) * 0x297A2D39) & _M31
    return x ^ (x >> 15)


@dataclass
class NoiseStream:
    """The randomness of one lane: draw ``i`` is keyed by ``(key, i)`` alone. The 62-bit key
    makes two lanes' streams practically never coincide (each draw's row key has 31 bits)."""

    key: int
    draws: int = 0

    @classmethod
    def seeded(cls, seed: int) -> NoiseStream:
        return cls(_key_of(str(seed)))

    @classmethod
    def unseeded(cls) -> NoiseStream:
        """A key from torch's global generator (``torch.manual_seed`` makes it repeatable)."""
        return cls(int(torch.randint(0, 1 << 62, (), dtype=torch.int64)))

    def child(self, index: int) -> NoiseStream:
        """The stream of the ``index``-th lane this stream's lane starts (a fork's branches, its
        join): a pure function of this key, whenever either lane draws."""
        return NoiseStream(_key_of(f"{self.key}/{index}"))

    def next_key(self) -> int:
        """The row key of the next draw, in [0, 2^31)."""
        self.draws += 1
        low, high = self.key & _M31, self.key >> 31
        return _mix31(low ^ _mix31((self.draws ^ high) & _M31))


def _key_of(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 2


def gumbel_noise(row_keys: Sequence[int], vocab: int, device: torch.device) -> torch.Tensor:
    """Standard Gumbel noise ``[B, vocab]`` (float32, finite) on ``device`` for rows that race
    over the whole vocabulary, row ``b`` a pure function of ``row_keys[b]`` on a given kind of
    device. On a GPU one batched hash of (key, token id) makes it (:func:`hashed_gumbel_noise`);
    on the CPU, where integer hashing costs twice a generator's draws, each row comes from a CPU
    generator seeded with its key."""
    if torch.device(device).type != "cpu":
        return hashed_gumbel_noise(_on(row_keys, device, torch.int64), vocab)
    noise = torch.empty(len(row_keys), vocab)
    for row, key in enumerate(row_keys):
        noise[row].exponential_(generator=torch.Generator().manual_seed(key))
    return noise.clamp_(min=torch.finfo(torch.float32).tiny).log_().neg_()


def hashed_gumbel_noise(row_keys: torch.Tensor, tokens: int | torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise (float32, on ``row_keys``' device) for token ids ``tokens [B, n]``
    (or all ``tokens`` ids: ``[B, tokens]``), entry ``(b, id)`` a pure function of
    ``row_keys[b]`` and ``id`` on any device. Uniforms come from 31 hash bits, the exponential
    from whichever of ``u`` and ``1 - u`` is exact, so |G| < 23."""
    if isinstance(tokens, int):
        tokens = torch.arange(tokens, dtype=torch.int64, device=row_keys.device)[None, :]
    bits = _mix31((tokens * 0x9E3779B1 + row_keys[:, None]) & _M31)
    below_half = bits < (1 << 30)
    low = (bits.float() + 0.5) * 2.0**-31  # u
    high = ((_M31 - bits).float() + 0.5) * 2.0**-31  # 1 - u
    exponential = torch.where(below_half, -torch.log(low), -torch.log1p(-high))
    return -torch.log(exponential)


def token_logprobs(
    logits: torch.Tensor,
    tokens: torch.Tensor | Sequence[int],
    temperatures: Sequence[float],
) -> torch.Tensor:
    """The recorded log-prob of ``tokens [N]`` under ``logits [N, V]``, row ``i`` at
    ``temperatures[i]`` (``SamplingParams.scoring_temperature``), on the logits' device:
    ``log_softmax(logits / t)[token]``, without writing a ``[N, V]`` result."""
    device = logits.device
    tokens = to_device(torch.as_tensor(tokens, dtype=torch.long), device)
    scaled = logits.float()
    if any(t != 1.0 for t in temperatures):  # greedy and t = 1 skip a [N, V] pass
        scaled = scaled / _on(temperatures, device, torch.float32)[:, None]
    return (scaled.gather(1, tokens[:, None]) - scaled.logsumexp(-1, keepdim=True))[:, 0]


class Selection(NamedTuple):
    """:func:`select_tokens`' picks, on the logits' device. ``settled [B]`` (bool) is given only
    when it speculated: False where a row's pick may be wrong (its cut reached past the
    candidates); select that row again without speculating."""

    tokens: torch.Tensor
    logprobs: torch.Tensor
    settled: torch.Tensor | None = None


def select_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    streams: Sequence[NoiseStream],
    allowed: Sequence[list[int] | None],
    banned: Sequence[list[int] | None],
    penalized: Sequence[Sequence[int] | np.ndarray | None],
    scores: torch.Tensor | None = None,
    speculate: bool = False,
) -> Selection:
    """Pick one token per row of ``logits [B, V]``: ``(tokens [B], logprobs [B], settled)`` on
    the logits' device.

    ``allowed[b]`` restricts row ``b`` to a structural choice, ``banned[b]`` excludes ids (tags
    the format does not allow here) besides ``params[b].suppress_tokens``; ``penalized[b]`` lists
    the ids that row's repetition penalty applies to. ``scores`` (logits after user processors)
    are what is picked from when given; log-probs always come from ``logits``. A row left with
    nothing to pick (a processor or the bans removed all it allows) picks from the logits with
    its allowed set, bans and suppressed ids applied (the format stays valid), and only when
    that too is empty from the allowed logits.
    ``speculate``: never wait for the device (see :func:`truncate`).
    """
    rows, vocab = logits.shape
    device = logits.device
    logits = logits.float()
    choice = (logits if scores is None else scores.float()).clone()
    apply_repetition_penalty(choice, penalized, [p.repetition_penalty for p in params])
    excluded = [[*(b or ()), *p.suppress_tokens] for b, p in zip(banned, params, strict=True)]
    allow = None
    if any(a is not None for a in allowed):
        allow = torch.zeros(rows, vocab, dtype=torch.bool, device=device)
        allow[_on([r for r, a in enumerate(allowed) if a is None], device)] = True
        allow[
            _pairs([(r, i) for r, a in enumerate(allowed) if a is not None for i in a], device)
        ] = True
        choice.masked_fill_(~allow, float("-inf"))
    exclude = _pairs([(r, i) for r, ids in enumerate(excluded) for i in ids], device)
    choice[exclude] = float("-inf")
    if scores is not None or any(
        a is not None and not set(a) - set(ids) for a, ids in zip(allowed, excluded, strict=True)
    ):
        permitted = logits if allow is None else logits.masked_fill(~allow, float("-inf"))
        fallback = permitted.clone()
        fallback[exclude] = float("-inf")
        empty = ~torch.isfinite(fallback).any(-1, keepdim=True)
        fallback = torch.where(empty, permitted, fallback)
        nothing_left = ~torch.isfinite(choice).any(-1, keepdim=True)
        choice = torch.where(nothing_left, fallback, choice)

    sampled = [row for row, p in enumerate(params) if not p.greedy]
    settled = None
    if not sampled:
        tokens = choice.argmax(-1)
    else:
        temperatures = [1.0 if p.greedy else p.temperature for p in params]
        if any(t != 1.0 for t in temperatures):
            choice.div_(to_device(torch.tensor(temperatures), device)[:, None])
        top_k, top_p = [p.top_k for p in params], [p.top_p for p in params]
        keys = {row: streams[row].next_key() for row in sampled}
        # A row with top-k or top-p races with hashed noise on every device, so that its picks
        # do not depend on whether its batch races over candidates or whole rows.
        trims = _trims(top_k, top_p, vocab)
        trimmed = [row for row in sampled if trims[row]]
        plain = [row for row in sampled if not trims[row]]
        values, ids, settled = truncate(choice, top_k, top_p, speculate)
        if plain:  # these race over whole rows
            if ids is not None:
                values, ids = _whole_rows(choice, top_k, top_p, values, ids), None
            noise = gumbel_noise([keys[r] for r in plain], vocab, device)
            if len(plain) == rows:  # the usual step: no row to leave out
                values += noise
            else:
                values[_on(plain, device)] += noise
        if trimmed:
            at = _on(trimmed, device)
            where = vocab if ids is None else ids[at]
            values[at] += hashed_gumbel_noise(_on([keys[r] for r in trimmed], device), where)
        if ids is None:
            tokens = values.argmax(-1)  # greedy rows race without noise
        else:  # only the candidates raced, with the noise a full race would give them
            tokens = ids.gather(1, values.argmax(-1, keepdim=True))[:, 0]
        if settled is not None:  # a greedy row's best logit is always a candidate
            settled = settled | _on([p.greedy for p in params], device, torch.bool)
    logprobs = token_logprobs(logits, tokens, [p.scoring_temperature for p in params])
    return Selection(tokens, logprobs, settled)


def _on(values: Sequence, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    return to_device(torch.tensor(values, dtype=dtype), device)


def _pairs(index: list[tuple[int, int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = to_device(torch.tensor(index, dtype=torch.long).reshape(-1, 2), device)
    return pairs[:, 0], pairs[:, 1]
