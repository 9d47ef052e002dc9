"""The executor: decodes reasoning DAGs with continuous batching over a shared paged KV cache.

Every step, the running lanes of all requests decode in one batched forward. A lane forks when
its guideline closes (one branch lane per plan, sharing the prefix's pages), and the branches
join into one lane for the takeaway once all have closed their step. Engine-written tokens
(step headers, the takeaway opener, separators, closing tags, a plan tag the branch bounds
leave no choice for) are flagged ``forced``; they are
appended right behind the token that called for them and fed in the same step, so they cost no
decode step of their own (with ``overlap``, behind a picked token they wait for the next step).

A token's log-prob is taken from the logits of the token before it in the sample's sequence,
which is what one dense forward over the finished graph computes: the first token of branch
``i > 0`` is therefore scored once branch ``i - 1`` is done.
"""

from __future__ import annotations

import math
import operator
import time
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import numpy as np
import torch

from ..graph import FinishReason, ReasoningGraph
from ..layout import ancestor_spans, node_start, position_ids
from ..models import resolve_device, text_config
from ..parse import decode_pieces, parse
from ..typecheck import check_at_least
from .attention import attention_implementation
from .backends import AttentionBackend, make_backend
from .kv import LaneKV, PagePool, PoolExhausted, join, pages_needed
from .lanes import PICKED, Lane, LaneStatus, Picked, Request, Sample
from .runner import ModelRunner
from .sampling import NoiseStream, SamplingParams, Selection, select_tokens, token_logprobs
from .scheduler import Scheduler
from .structure import MODES, Action, Format, Kind, LaneState, Phase, Tags
from .transfer import HostCopy

DEFAULT_KV_BYTES = 512 * 2**20
# kv_memory_bytes="auto" on a GPU: the rest of its free memory holds activations (a prefill of
# max_prefill_tokens, a step's [rows, vocab] logits), CUDA graphs and attention workspaces.
AUTO_KV_SHARE = 0.8


class _Unscored(NamedTuple):
    """``lane.tokens[index : index + len(logits)]``, to be scored by ``logits [n, V]``."""

    lane: Lane
    index: int
    logits: torch.Tensor

    @property
    def tokens(self) -> list[int]:
        return self.lane.tokens[self.index : self.index + self.logits.shape[0]]


class PromptError(ValueError):
    """A prompt this engine cannot run: empty, longer than the model's context with its token
    budget, or larger than the KV pool. Other prompts of a run can still go ahead."""


@dataclass
class EngineStats:
    prefill_steps: int = 0
    decode_steps: int = 0
    wall_time: float = 0.0
    generated_tokens: int = 0
    critical_path_tokens: int = 0
    peak_kv_pages: int = 0
    preemptions: int = 0
    recomputed_tokens: int = 0  # fed again to rebuild preempted requests' KV
    repicks: int = 0  # overlapped steps: rows picked again (their top-k/top-p cut reached far)
    lanes_per_step: list[int] = field(default_factory=list)
    fed_per_step: list[int] = field(default_factory=list)  # tokens: a lane feeds forced text too
    # Decode steps split in two: feeding the lanes (on a GPU: planning and launching the
    # forward) and picking (selection, scoring, the format's reaction; on a GPU it includes
    # waiting for the forward). The rest of wall_time is prefill and scheduling.
    forward_time: float = 0.0
    pick_time: float = 0.0
    # Each prompt's first admission and its end, in seconds since the call began: its latency
    # in the engine when other prompts share the steps.
    prompt_seconds: dict[int, tuple[float, float]] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.wall_time if self.wall_time > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "prefill_steps": self.prefill_steps,
            "decode_steps": self.decode_steps,
            "wall_time": self.wall_time,
            "generated_tokens": self.generated_tokens,
            "critical_path_tokens": self.critical_path_tokens,
            "tokens_per_s": self.tokens_per_s,
            "peak_kv_pages": self.peak_kv_pages,
            "preemptions": self.preemptions,
            "recomputed_tokens": self.recomputed_tokens,
            "repicks": self.repicks,
            "mean_lanes_per_step": sum(self.lanes_per_step) / max(len(self.lanes_per_step), 1),
            "mean_fed_per_step": sum(self.fed_per_step) / max(len(self.fed_per_step), 1),
            "forward_time": self.forward_time,
            "pick_time": self.pick_time,
        }


class Engine:
    """Wraps a plain transformers model (never modified) and its tokenizer.

    The KV pool holds ``num_pages`` pages of ``page_size`` slots, or as many as
    ``kv_memory_bytes`` buy (``"auto"``: a share of a GPU's free memory, :func:`kv_memory_for`).
    At most ``max_lanes`` lanes are admitted at once (a request brings ``n``), a prefill forward
    takes at most ``max_prefill_tokens`` tokens (longer prompts go in chunks), and
    ``attention_backend`` (``auto``, ``torch``, ``triton``, ``flashinfer`` or an instance) runs
    the paged attention; ``cuda_graphs`` and ``overlap`` are GPU speed-ups that leave the samples
    as they are (docs/GPU.md names the few cuts where ``overlap`` differs by a token).
    ``grammar``: ``npr`` or ``multiverse``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        *,
        num_pages: int | None = None,
        page_size: int = 16,
        kv_memory_bytes: int | str = DEFAULT_KV_BYTES,
        max_lanes: int = 64,
        max_prefill_tokens: int = 8192,
        device: torch.device | str = "cpu",
        attention_backend: str | AttentionBackend = "auto",
        cuda_graphs: bool = False,
        overlap: bool = False,
        grammar: str = "npr",
    ):
        if max_prefill_tokens < 1:  # before the KV pool, which may take most of a GPU
            raise ValueError(f"max_prefill_tokens must be >= 1, got {max_prefill_tokens}")
        check_at_least("page_size", page_size, 1)  # the pool's size is counted in pages
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = resolve_device(device)
        self.vocab_size = model.get_input_embeddings().num_embeddings
        config = text_config(model)
        if getattr(config, "attn_logit_softcapping", None) is not None:  # Gemma 2
            raise ValueError(
                f"{type(model).__name__} soft-caps its attention logits "
                f"(attn_logit_softcapping={config.attn_logit_softcapping}), which the engine's "
                "attention does not do"
            )
        self.max_positions = getattr(config, "max_position_embeddings", None) or 1 << 30
        if num_pages is None:
            probe = ModelRunner.bytes_per_slot(model)
            kv_bytes = kv_memory_for(self.device, kv_memory_bytes)
            num_pages = max(8, kv_bytes // (probe * page_size))
        self.pool = PagePool(num_pages, page_size)
        self.attention_backend = make_backend(attention_backend, self.device, model)
        self.runner = ModelRunner(model, self.pool, self.device, self.attention_backend)
        if cuda_graphs:  # decode steps replay recorded graphs (graphs.py); flashinfer, CUDA only
            # a cascade level for the branches of blocks nested one deep (Multiverse)
            self.runner.enable_graphs(max_lanes, nested_levels=int(Tags.of(grammar).nesting))
        self.max_lanes = max_lanes
        self.max_prefill_tokens = max_prefill_tokens
        # Launch each step's forward before reading the tokens the step before it picked, so the
        # host's work on them runs while the device computes (see _run).
        self.overlap = overlap
        self.grammar = grammar
        self.format = Format(
            tokenizer, special=_tags_are_special(tokenizer, grammar), grammar=grammar
        )
        # an id past the logits (a config left from a larger vocabulary) can never be sampled
        self.eos_ids = {i for i in _eos_ids(model, tokenizer) if 0 <= i < self.vocab_size}
        self.logits_processor = None
        self._pieces: dict[int, str] = {}
        self._unscored: list[_Unscored] = []
        self._scoring: list[tuple[list[_Unscored], HostCopy]] = []
        self._on_finish: Callable[[int, list[ReasoningGraph]], None] | None = None
        self._start = 0.0
        self.stats = EngineStats()

    @classmethod
    def from_pretrained(
        cls,
        path: str | None = None,
        *,
        dtype: torch.dtype | str = "float32",
        device: torch.device | str = "cpu",
        tags: str = "special",
        grammar: str = "npr",
        **kwargs,
    ) -> Engine:
        from ..models import load_model

        device = resolve_device(device)  # before the model loads, not from inside model.to
        model, tokenizer = load_model(path, dtype=dtype, tags=tags, grammar=grammar)
        return cls(model.to(device), tokenizer, device=device, grammar=grammar, **kwargs)

    # -- public API -------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | Sequence[int], chat: bool | None = None) -> list[int]:
        """Token ids of a prompt: ids are taken as they are; text goes through the tokenizer's
        chat template when it has one (``chat=True`` requires one, ``False`` skips it; a raw
        prompt starts with BOS when the tokenizer adds one)."""
        if not isinstance(prompt, str):
            try:  # ints, numpy ints and integer tensors alike; not floats
                ids = [operator.index(i) for i in prompt]
            except TypeError as error:
                raise PromptError(
                    f"a prompt is text or a list of token ids, not {type(prompt).__name__}"
                    " (several prompts of ids: a list of lists)"
                ) from error
        else:
            if not prompt.strip():
                raise PromptError("empty prompt")
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as error:  # a lone surrogate: a cut emoji, or argv bytes
                bad = ascii(prompt[error.start])[1:-1]
                raise PromptError(
                    f"the prompt is not text: character {error.start} is {bad}, half of a "
                    "UTF-16 pair (a cut emoji) or a byte that was not UTF-8"
                ) from None
            if chat and not getattr(self.tokenizer, "chat_template", None):
                raise ValueError(
                    "this tokenizer has no chat template; pass chat=False to use the raw prompt"
                )
            if wraps_in_chat(self.tokenizer, chat):
                messages = [{"role": "user", "content": prompt}]
                try:
                    text = self.tokenizer.apply_chat_template(
                        messages, add_generation_prompt=True, tokenize=False
                    )
                except Exception as error:  # jinja2's TemplateError, or the template's own
                    raise ValueError(
                        f"the tokenizer's chat template failed on this prompt "
                        f"({type(error).__name__}: {error}); use the raw prompt "
                        "(chat=False; --no-chat)"
                    ) from error
                ids = self.tokenizer.encode(text, add_special_tokens=False)
            else:
                ids = self._raw_prompt_ids(prompt)
        outside = [i for i in ids if not 0 <= i < self.vocab_size]
        if outside:  # given so, or a tokenizer with tokens its model has no row for
            raise PromptError(
                f"token ids {outside[:5]} are outside the model's vocabulary of {self.vocab_size}"
            )
        if not ids:
            raise PromptError("empty prompt")
        return ids

    def _raw_prompt_ids(self, prompt: str) -> list[int]:
        """A prompt without the chat template, with the BOS token when the tokenizer adds one
        (Llama and Gemma models read badly without it), and nothing else it might add."""
        ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        bos = getattr(self.tokenizer, "bos_token_id", None)
        if getattr(self.tokenizer, "add_bos_token", False) and bos is not None and ids[:1] != [bos]:
            ids = [bos, *ids]
        return ids

    def warm_up(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams,
        modes: Sequence[str],
        chat: bool | None = None,
    ) -> None:
        """Decode a few tokens of ``prompt`` in each of ``modes``, untimed and discarded: an
        engine's first generate (and its first block) pays one-time costs (allocations, lazy
        initialisation, caches) that would count against whatever is timed first. Seeded samples
        decode the same tokens afterwards (seeds are per call)."""
        # The fewest tokens that still reach every part of a block: the guideline, the fork into
        # branches, their steps, the join and the takeaway, and the answer after it.
        # No more than the caller's budget, which check_prompt fitted to the model's context.
        budget = params.max_new_tokens
        block = replace(params, max_new_tokens=min(32, budget), max_blocks=1, max_plan_tokens=2,
                        max_step_tokens=4, max_takeaway_tokens=2, n=1, max_total_tokens=None)  # fmt: skip
        short = min(4, budget)
        plain = replace(params, max_new_tokens=short, max_total_tokens=short, n=1, ignore_eos=True)
        for mode in dict.fromkeys(modes):
            self.generate([prompt], plain if mode == "sequential" else block, mode=mode, chat=chat)

    def check_prompt(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams,
        chat: bool | None = None,
        which: str = "the prompt",
    ) -> list[int]:
        """The prompt's ids, or a :class:`PromptError` when this engine cannot run it with
        ``params``: empty, too long for the model's context with ``max_new_tokens`` to spare, or
        too large for the KV pool with ``n`` samples."""
        ids = self.encode_prompt(prompt, chat)
        if len(ids) + params.max_new_tokens > self.max_positions:
            raise PromptError(
                f"{which} has {len(ids)} tokens; with max_new_tokens={params.max_new_tokens} "
                f"it exceeds the model's context of {self.max_positions}"
            )
        if self.pool.pages_for(len(ids)) + params.n > self.pool.num_usable:
            raise PromptError(
                f"{which} ({len(ids)} tokens) does not fit the KV pool of "
                f"{self.pool.num_usable} pages"
            )
        return ids

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        mode: str | Sequence[str] = "free",
        chat: bool | None = None,
        progress=None,
        logits_processor=None,
        max_running: int | None = None,
        on_finish: Callable[[int, list[ReasoningGraph]], None] | None = None,
        claim: Callable[[int], bool] | None = None,
    ) -> list[ReasoningGraph]:
        """Decode every prompt (``params.n`` samples each) and return their graphs, prompt by
        prompt. ``mode`` (one, or one per prompt): ``free`` (the model chooses; invalid forks
        decode sequentially and are recorded), ``constrained`` (the grammar decides which tags
        may come next; needs tags as special tokens), ``sequential`` (plain autoregressive
        decoding). ``logits_processor(context, logits) -> logits`` may reshape what is sampled
        (``context``: the ids the lane attends to); recorded log-probs stay those of the model.
        ``progress(tokens)`` hears after each decode step how many tokens the call has generated.

        Prompts are admitted in order while lanes and KV pages allow, and each next one as soon
        as room frees up; ``max_running`` caps how many decode at once. ``on_finish(index,
        graphs)`` is called as each prompt's samples are all done, while the others decode, and
        the engine keeps nothing of them (``generate`` then returns an empty list), so a long
        stream of prompts holds only those under way. ``stats.prompt_seconds`` gives each
        prompt's admission and end. ``claim(index)`` is asked once, when a prompt would be
        admitted; a prompt it refuses is skipped and gives no graphs (processes that share a
        list of prompts each claim the next one as they have room)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(mode, (str, Sequence)):
            raise ValueError(f"mode is one of {', '.join(MODES)}, or one per prompt; got {mode!r}")
        modes = [mode] * len(prompts) if isinstance(mode, str) else list(mode)
        if len(modes) != len(prompts):
            raise ValueError("give one mode, or one per prompt")
        for m in set(modes):
            if m not in MODES:
                raise ValueError(f"unknown mode {m!r}; choose one of {', '.join(MODES)}")
            if m == "constrained" and not self.format.special:
                raise ValueError(
                    "constrained mode needs the tags as special tokens "
                    "(load the model with tags='special'; npr: --tags special)"
                )
        if max_running is not None:
            check_at_least("max_running", max_running, 1)
        params = params or SamplingParams()
        per_prompt = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise ValueError("give one SamplingParams, or one per prompt")
        for p in per_prompt:
            if not isinstance(p, SamplingParams):
                raise ValueError(f"params: expected SamplingParams, got {type(p).__name__}")
            outside = [t for t in p.suppress_tokens if t >= self.vocab_size]
            if outside:
                raise ValueError(
                    f"suppress_tokens {outside[:5]} are outside the model's vocabulary of "
                    f"{self.vocab_size}"
                )
            if len(set(p.suppress_tokens)) >= self.vocab_size:
                raise ValueError("suppress_tokens leave no token of the vocabulary to pick")
        requests = []
        for index, (prompt, p, m) in enumerate(zip(prompts, per_prompt, modes, strict=True)):
            which = f"prompt {index}" if len(prompts) > 1 else "the prompt"
            ids = self.check_prompt(prompt, p, chat, which)
            requests.append(Request(index, ids, p, m, arrival=index))
        self.stats = EngineStats()
        self.pool.reset_peak()
        self.logits_processor = logits_processor
        self._on_finish = on_finish
        self._start = time.perf_counter()
        scheduler = Scheduler(requests, self.pool, self.max_lanes, max_running, claim)
        try:
            with attention_implementation(self.model):
                self._run(scheduler, progress)
        except BaseException:  # an interrupt or a failing callback included
            self._abandon(requests)
            raise
        finally:
            self._on_finish = None
        self.stats.wall_time = time.perf_counter() - self._start
        self.stats.peak_kv_pages = self.pool.peak_used
        return [graph for request in requests for graph in request.graphs]

    # -- scheduling --------------------------------------------------------------------------
    def _run(self, scheduler: Scheduler, progress) -> None:
        """Decode steps until every request is done. With ``overlap``, a step's picked tokens
        stay on the device: the next step feeds them from there, and the host reads them while
        that step's forward runs (:meth:`_take`); a lane whose token calls for engine-written
        text then writes it one step later instead of behind the token."""
        unreported: list[Request] = []
        picked: Picked | None = None
        while not scheduler.idle:
            unreported = self._report_finished(unreported)
            admitted = scheduler.admit()
            for request in admitted:
                if request.admitted_s is None:  # a preempted request keeps its first admission
                    request.admitted_s = time.perf_counter() - self._start
                    unreported.append(request)
            if admitted:
                parked = [r for r in admitted if r.samples]
                fresh = [r for r in admitted if not r.samples]
                if fresh:
                    self._prefill(fresh)
                self._resume(parked)
            scheduler.retire(self._settle)
            lanes = [
                lane
                for r in scheduler.running
                for s in r.samples
                for lane in s.lanes
                if lane.status is LaneStatus.RUNNING
            ]
            if not lanes:
                if scheduler.waiting and not scheduler.running and not admitted:
                    raise RuntimeError(
                        "scheduler stalled: nothing runs and nothing can be admitted"
                    )
                continue
            running = self._cut_at_context(lanes)
            if len(running) < len(lanes):  # a request that ended there must not be preempted
                scheduler.retire(self._settle)
            lanes = running
            if picked is not None and self._pages_short(lanes):
                # The pool runs short: read the picked tokens before preempting or cutting
                # anything, as the plain engine has (an end of sequence needs no page).
                self._take(picked, after_feed=False)
                picked = None
                scheduler.retire(self._settle)
                lanes = [lane for lane in lanes if lane.status is LaneStatus.RUNNING]
            lanes = self._make_room(lanes, scheduler)
            if not lanes:
                if picked is not None:  # their lanes were preempted or cut off
                    self._take(picked)
                    picked = None
                continue
            self.stats.decode_steps += 1
            self.stats.lanes_per_step.append(len(lanes))
            self.stats.fed_per_step.append(sum(len(lane.pending) for lane in lanes))
            started = time.perf_counter()
            logits = self.runner.step(lanes, picked=picked)
            fed = time.perf_counter()
            if picked is not None:  # overlapped: the forward above is queued on the device
                self._take(picked)
                picked = None
            self._collect_scores()
            self._score_fed(lanes, logits.earlier)
            picked = self._advance(lanes, logits.last, defer=self.overlap)
            self._score_pending()
            self.stats.forward_time += fed - started
            self.stats.pick_time += time.perf_counter() - fed
            if progress is not None:  # preempted requests wait first, keeping their tokens
                requests = scheduler.running + scheduler.parked()
                under_way = sum(s.total_tokens for r in requests for s in r.samples)
                progress(self.stats.generated_tokens + under_way)
            scheduler.retire(self._settle)
        assert picked is None, "picked tokens left unread"
        self._report_finished(unreported, last=True)

    def _report_finished(self, requests: list[Request], last: bool = False) -> list[Request]:
        """Build the graphs of the requests that ended (``last``: of all of them), count their
        tokens and hand them to ``on_finish`` (else keep them to return); the others."""
        done, left = [], []
        for request in requests:
            (done if last or _ended(request) else left).append(request)
        if not done:
            return requests
        # A cut in a step that then had nothing left to run queued scores no forward follows.
        self._score_pending()
        self._collect_scores()
        for request in done:
            graphs = [self._graph(sample) for sample in request.samples]
            request.samples = []  # their lanes, tokens and logits go
            self.stats.prompt_seconds[request.index] = (
                request.admitted_s,
                time.perf_counter() - self._start,
            )
            self.stats.generated_tokens += sum(g.num_tokens - g.prompt_num_tokens for g in graphs)
            self.stats.critical_path_tokens = max(
                [self.stats.critical_path_tokens]
                + [g.metadata["critical_path_tokens"] for g in graphs]
            )
            if self._on_finish is None:
                request.graphs = graphs
            else:
                self._on_finish(request.index, graphs)
        return left

    def _abandon(self, requests: list[Request]) -> None:
        """Return every page a failed run holds, so the engine stays usable."""
        for request in requests:
            for sample in request.samples:
                for lane in sample.lanes:
                    if lane.kv.alive:
                        lane.kv.release()
        self._unscored.clear()
        self._scoring.clear()

    def _cut_at_context(self, lanes: list[Lane]) -> list[Lane]:
        """End every sample with a lane at the end of the model's context: no token gets a
        position past it, closing tags after a budget cut included. A lane there is first fed
        what it holds (every position is inside the context): that forward scores the
        engine-written text behind its first unfed token and, from its last token, the first
        token of the branch after it; a picked token not read yet (``overlap``) is read and
        acted on as the plain engine does. :meth:`_advance` then ends the sample. So where the
        steps were cut changes neither the tokens, their log-probs, nor the finish reason."""
        for lane in lanes:
            if self._at_context_end(lane):
                self._cut_context(lane.sample)
        return [lane for lane in lanes if lane.status is LaneStatus.RUNNING]

    def _at_context_end(self, lane: Lane) -> bool:
        """Nothing more fits behind the lane, and it holds nothing to feed."""
        return (
            lane.status is LaneStatus.RUNNING
            and lane.end_position >= self.max_positions
            and not lane.pending
        )

    def _cut_context(self, sample: Sample) -> None:
        """End ``sample`` at the model's context. Its reason is the budget's when its tokens
        reached it, even if the token that did is not read yet (``overlap``)."""
        reason = sample.finish_reason or (
            FinishReason.LENGTH if _over_budget(sample) else FinishReason.CONTEXT
        )
        self._truncate(sample, reason, hard=True)

    def _make_room(self, lanes: list[Lane], scheduler: Scheduler) -> list[Lane]:
        """Preempt the newest requests until this step's appends fit in the pool; a request
        alone that does not fit is cut."""
        while self._pages_short(lanes):
            if len(scheduler.running) == 1:
                [alone] = scheduler.running
                for sample in alone.samples:
                    self._cut_for_pages(sample)
                self._settle(alone)
                scheduler.running.clear()
                return []
            victim = scheduler.preempt()
            self._park(victim)
            self.stats.preemptions += 1
            lanes = [lane for lane in lanes if lane.sample.request is not victim]
        return lanes

    def _cut_for_pages(self, sample: Sample) -> None:
        """End a sample the pool cannot hold as ``kv_exhausted``. One that already ended keeps
        its own finish reason, and so does one the budget or the context cut whose lanes
        would only feed what they hold: that adds nothing to its graph."""
        live = sample.live_lanes()
        if sample.truncated and all(self._adds_nothing_when_fed(lane) for lane in live):
            self._truncate(sample, sample.finish_reason, hard=True)
        elif live:
            self._drop_unfed_text(sample)
            self._truncate(sample, FinishReason.KV_EXHAUSTED, hard=True)

    def _adds_nothing_when_fed(self, lane: Lane) -> bool:
        """Feeding the lane's pending tokens would write no text, take no action and score no
        token: a sample cut by its budget, after its last token and every closing tag, each
        scored already."""
        return (
            lane.status is LaneStatus.RUNNING
            and None not in lane.logprobs[lane.num_fed :]
            and not lane.forced_queue
            and lane.after_forced is None
            and (lane.state is None or lane.state.closing_tag() is None)
            and _unscored_following_branch(lane) is None
        )

    def _drop_unfed_text(self, sample: Sample) -> None:
        """A sample cut for want of pages: the engine-written text its lanes hold unfed goes
        (it was never fed, mostly has no log-prob, and how much of it there is depends on how
        the steps were cut: ``overlap`` writes it a step later), and so do the branches of a
        fork that had not been fed."""
        for lane in sample.lanes:
            while lane.pending and lane.forced[-1] and lane.tokens[-1] != PICKED:
                self._take_back(lane)
        unscored = []
        for entry in self._unscored:  # what is left of them is scored
            kept = len(entry.lane.tokens) - entry.index
            if kept >= entry.logits.shape[0]:
                unscored.append(entry)
            elif kept > 0:
                unscored.append(entry._replace(logits=entry.logits[:kept]))
        self._unscored = unscored
        for lane in list(sample.lanes):
            children = lane.branches
            if children and not any(b.tokens or b.branches or b.continued_by for b in children):
                for child in children:
                    child.status = LaneStatus.DONE
                    child.final_logits = None
                    if child.kv.alive:
                        child.kv.release()
                lane.branches, lane.tips = [], []
                sample.lanes = [other for other in sample.lanes if other not in children]

    def _pages_short(self, lanes: list[Lane]) -> bool:
        """Whether this step's appends need more pages than are free."""
        return pages_needed([(lane.kv, len(lane.pending)) for lane in lanes]) > self.pool.num_free

    def _park(self, request: Request) -> None:
        """Preempt ``request``: its pages go back, and its lanes keep their tokens, states and
        noise streams for :meth:`_resume`."""
        for sample in request.samples:
            for lane in sample.live_lanes():
                lane.kv.release()

    def _settle(self, request: Request) -> bool:
        for sample in request.samples:
            if sample.truncated and not any(
                lane.status is LaneStatus.RUNNING for lane in sample.lanes
            ):  # no join comes after a cut: what waits for one is done
                for lane in sample.live_lanes():
                    self._finish_lane(lane, sample.finish_reason)
            if not sample.finished and not sample.live_lanes():
                sample.finished = True
        return request.finished

    # -- prefill and per-token progress ---------------------------------------------------------
    def _prefill(self, requests: list[Request]) -> None:
        prompt_lanes = [Lane(None, LaneKV(self.pool), None, 0) for _ in requests]
        try:
            logits = self._feed(prompt_lanes, [r.prompt_ids for r in requests])
        except BaseException:  # the prompt lanes belong to no sample yet: _abandon misses them
            for lane in prompt_lanes:
                if lane.kv.alive:
                    lane.kv.release()
            raise
        trunks, rows = [], []
        for request, lane, row in zip(requests, prompt_lanes, logits, strict=True):
            params = request.params
            for index, kv in enumerate(lane.kv.fork(params.n)):
                if params.seed is None:
                    noise = NoiseStream.unseeded()
                else:
                    noise = NoiseStream.seeded(params.seed * 1_000_003 + index)
                sample = Sample(request, index)
                state = (
                    None
                    if request.mode == "sequential"
                    else LaneState(request.mode, tags=self.format.tags)
                )
                start = node_start([len(request.prompt_ids)])
                trunk = Lane(sample, kv, state, start, noise=noise)
                if state is not None:
                    trunk.forced_queue.extend(self.format.encode(state.opening()))
                sample.add_lane(trunk)
                request.samples.append(sample)
                trunks.append(trunk)
                rows.append(row)
        self._advance(trunks, torch.stack(rows))
        self._score_pending()

    def _resume(self, requests: list[Request]) -> None:
        """Rebuild the KV of preempted requests from the tokens their lanes hold, in prefill
        forwards: the prompts, then the lane trees level by level (a lane once the lane it
        forked from is fed, a join once all its branches are), each level of every request in
        the same forwards. Nothing is sampled again: each lane goes on where it stopped, its
        unfed tokens still pending. Should the pool not hold them after all (admission checks
        a bound on what they take), their unfinished samples end as ``kv_exhausted``."""
        if not requests:
            return
        try:
            self._rebuild(requests)
        except PoolExhausted:
            for sample in (sample for request in requests for sample in request.samples):
                for lane in sample.lanes:
                    if lane.kv.alive:
                        lane.kv.release()
                self._cut_for_pages(sample)

    def _rebuild(self, requests: list[Request]) -> None:
        prompts = [Lane(None, LaneKV(self.pool), None, 0) for _ in requests]
        try:
            self._feed(prompts, [request.prompt_ids for request in requests])
        except BaseException:
            for prompt in prompts:
                prompt.kv.release()
            raise
        level: list[Lane] = []
        for request, prompt in zip(requests, prompts, strict=True):
            self.stats.recomputed_tokens += len(request.prompt_ids)
            trunks = [sample.lanes[0] for sample in request.samples if sample.live_lanes()]
            for trunk, kv in zip(trunks, prompt.kv.fork(len(trunks)), strict=True):
                trunk.kv = kv
            level += trunks
        rebuilt: set[int] = set()
        joins: list[Lane] = []  # lanes whose branches joined: the join waits for every branch
        while level:
            tokens = [lane.tokens[: lane.num_fed] for lane in level]
            self._feed([Lane(None, lane.kv, None, lane.start_position) for lane in level], tokens)
            self.stats.recomputed_tokens += sum(map(len, tokens))
            following: list[Lane] = []
            for lane in level:
                rebuilt.add(id(lane))
                if lane.branches:
                    kvs = lane.kv.fork(len(lane.branches))
                    for branch, kv in zip(lane.branches, kvs, strict=True):
                        branch.kv = kv
                    following += lane.branches
                    if lane.continued_by is not None:
                        joins.append(lane)
            for owner in [o for o in joins if all(id(tip) in rebuilt for tip in o.tips)]:
                joins.remove(owner)
                owner.continued_by.kv = join([tip.kv for tip in owner.tips], prefix=owner.kv)
                following.append(owner.continued_by)
            level = following
        for sample in (sample for request in requests for sample in request.samples):
            for lane in sample.lanes:  # a finished lane no other lane reads (after a cut)
                if lane.status is LaneStatus.DONE and lane.kv.alive:
                    lane.kv.release()

    def _feed(self, lanes: list[Lane], tokens: list[list[int]]) -> list[torch.Tensor | None]:
        """Feed each lane its tokens (a prompt, or what a preempted lane held) in forwards of
        at most ``max_prefill_tokens`` (rows times the padded width), so a prefill's
        activations stay bounded however many or long the prompts are: each forward takes the
        next chunk of every unfinished row (the first ``max_prefill_tokens`` of them), each
        chunk seeing the KV of those before it. Returns each row's logits after its last token
        (None for a row with no tokens)."""
        fed = [0] * len(lanes)
        last: list[torch.Tensor | None] = [None] * len(lanes)
        while True:
            rows = [i for i, row in enumerate(tokens) if fed[i] < len(row)]
            rows = rows[: self.max_prefill_tokens]
            if not rows:
                return last
            width = self.max_prefill_tokens // len(rows)
            for i in rows:
                chunk = tokens[i][fed[i] : fed[i] + width]
                for token in chunk:
                    lanes[i].append(token, None, False)
                fed[i] += len(chunk)
            logits = self.runner.step([lanes[i] for i in rows], earlier=False).last
            self.stats.prefill_steps += 1
            for row, i in enumerate(rows):
                if fed[i] == len(tokens[i]):
                    last[i] = logits[row]

    def _advance(
        self, lanes: list[Lane], logits: torch.Tensor, defer: bool = False
    ) -> Picked | None:
        """Each lane was just fed: act on its finished forced text, or write its next token.
        ``defer``: leave picked tokens on the device, :data:`PICKED` in their lanes, and return
        them (:meth:`_take` reads them)."""
        fed = []
        for lane, row in zip(lanes, logits, strict=True):
            if lane.void_row:  # it fed a token that was taken back: this row follows nothing
                lane.void_row = False
            elif lane.status is LaneStatus.RUNNING and not lane.sample.finished:
                lane.final_logits = row
                fed.append(lane)
        for lane in fed:  # fed what it held at the end of the context: nothing more fits
            if self._at_context_end(lane):
                self._cut_context(lane.sample)
        to_sample = []
        for lane in fed:
            row = lane.final_logits
            if lane.sample.finished or lane.status is not LaneStatus.RUNNING:
                continue
            if lane.after_forced is not None and not lane.forced_queue:
                action, lane.after_forced = lane.after_forced, None
                self._act(lane, action)
            elif lane.forced_queue:
                token = lane.forced_queue.popleft()
                self._write(lane, token, forced=True, scored_from=row)
            elif lane.state is not None and lane.state.closing:
                self._close_next(lane, row)
            else:
                to_sample.append(lane)
        if not to_sample:
            return None
        constraints = [self._constraints(lane) for lane in to_sample]
        logits = torch.stack([lane.final_logits for lane in to_sample])
        scores = None
        if self.logits_processor is not None:
            processed = [
                self.logits_processor(lane.context(), row.clone())
                for lane, row in zip(to_sample, logits, strict=True)
            ]
            for row in processed:
                if not isinstance(row, torch.Tensor) or row.shape != logits.shape[1:]:
                    got = tuple(row.shape) if isinstance(row, torch.Tensor) else type(row).__name__
                    raise ValueError(
                        f"the logits processor returned {got}; expected a tensor of the row's "
                        f"shape {tuple(logits.shape[1:])}"
                    )
            scores = torch.stack(processed)
        params = [lane.sample.request.params for lane in to_sample]
        streams = [lane.noise for lane in to_sample]
        before = [NoiseStream(s.key, s.draws) for s in streams] if defer else []

        def select(rows: slice, streams: list[NoiseStream], speculate: bool) -> Selection:
            return select_tokens(
                logits[rows],
                params[rows],
                streams,
                *zip(*constraints[rows], strict=True),
                None if scores is None else scores[rows],
                speculate=speculate,
            )

        selection = select(slice(None), streams, speculate=defer)
        if defer:
            for lane in to_sample:
                lane.append(PICKED, None, False)

            def repick(row: int) -> tuple[int, float]:
                again = select(slice(row, row + 1), [before[row]], speculate=False)
                return again.tokens.item(), again.logprobs.item()

            settled = () if selection.settled is None else (selection.settled,)
            host = HostCopy(selection.tokens, selection.logprobs, *settled)
            return Picked(to_sample, selection.tokens, host, repick)
        logprobs = _checked(selection.logprobs.tolist())
        for lane, token, logprob in zip(
            to_sample, selection.tokens.tolist(), logprobs, strict=True
        ):
            if token in self.eos_ids and not lane.sample.request.params.ignore_eos:
                self._end_of_sequence(lane, token, logprob)
            else:
                self._write(lane, token, forced=False, logprob=logprob)
        return None

    def _take(self, picked: Picked, after_feed: bool = True) -> None:
        """Read the tokens a step picked on the device and write them into their lanes, whose
        :data:`PICKED` token the next step has fed already; engine-written text that one calls
        for waits for the step after (it was not known when that step was launched). A row the
        selection did not settle is picked again exactly; if that changes its token, the fed
        one is taken back, like an end of sequence. ``after_feed=False``: read before the next
        step fed them, so a lane that takes its token back has no row to skip."""
        fed, logprobs, *settled = picked.host.tolist()  # settled: only when it speculated
        _checked(logprobs)
        unsettled = {row for row, ok in enumerate(settled[0]) if not ok} if settled else set()
        self.stats.repicks += len(unsettled)
        for row, lane in enumerate(picked.lanes):
            token, logprob = fed[row], logprobs[row]
            if row in unsettled:
                token, logprob = picked.repick(row)
            live = lane.status is LaneStatus.RUNNING and not lane.sample.finished
            live = live and lane.kv.alive  # not cut off (budget, preemption) after it picked
            ends = token in self.eos_ids and not lane.sample.request.params.ignore_eos
            if live and (ends or token != fed[row]):  # as if the next step had not fed it
                self._take_back(lane)
                if ends:  # the engine decides what it means
                    self._end_of_sequence(lane, token, logprob)
                else:
                    self._write(lane, token, forced=False, logprob=logprob)
                lane.void_row = after_feed
            elif ends and lane.state is not None and not lane.state.ends_response_on_eos():
                self._take_back(lane)  # an end inside an element is never kept
            else:
                lane.settle_last(token, logprob)
                if lane.pending[-1:] == [PICKED]:  # read before it was fed
                    lane.pending[-1] = token
                # A lane cut after it picked keeps the token: the format still sees it (the
                # plain engine records its violations before the cut).
                self._react(lane, token)

    def _take_back(self, lane: Lane) -> None:
        """Undo the lane's last append: a picked token the engine does not keep (an end of
        sequence inside an element, a speculated pick that picking again changed); if it was
        fed, its slot goes back too."""
        lane.pop_last()
        if lane.pending:
            lane.pending.pop()
        elif lane.kv.alive:
            lane.kv.drop_last()
        lane.sample.uncount_token()

    def _constraints(
        self, lane: Lane
    ) -> tuple[list[int] | None, list[int] | None, np.ndarray | None]:
        params = lane.sample.request.params
        state = lane.state
        if state is None:  # sequential: the whole response is its one step
            penalize = params.repetition_penalty != 1.0 and lane.tokens
            return None, None, lane.token_ids() if penalize else None
        allowed, banned = state.choices(self.format, params)
        if state.mode == "constrained":
            banned = (banned or []) + self.format.spelled_tags(lane.text_tail)
            if state.phase is not Phase.TEXT:
                banned += sorted(self.eos_ids)
        penalized = None
        if state.phase is Phase.STEP and params.repetition_penalty != 1.0 and state.stretch_tokens:
            penalized = lane.token_ids(max(0, len(lane.tokens) - state.stretch_tokens))
        return allowed, banned, penalized

    def _score_later(self, lane: Lane, index: int, logits: torch.Tensor) -> None:
        """Record that ``lane.tokens[index : index + len(logits)]`` are scored by ``logits
        [n, V]``: every such log-prob of a step is computed in one batch when it ends."""
        self._unscored.append(_Unscored(lane, index, logits))

    def _score_pending(self) -> None:
        """Log-probs of the step's engine-written tokens: one batched computation where the
        logits are and one copy of the values to the host (:meth:`_collect_scores`)."""
        if not self._unscored:
            return
        pending, self._unscored = self._unscored, []
        logits = torch.cat([entry.logits for entry in pending])
        tokens = [token for entry in pending for token in entry.tokens]
        temperatures = [
            entry.lane.sample.request.params.scoring_temperature
            for entry in pending
            for _ in entry.tokens
        ]
        self._scoring.append((pending, HostCopy(token_logprobs(logits, tokens, temperatures))))
        if not self.overlap:
            self._collect_scores()

    def _collect_scores(self) -> None:
        """Write the log-probs :meth:`_score_pending` computed into their lanes (overlapped:
        after the next step's forward was launched, so reading them does not hold it back)."""
        for pending, copy in self._scoring:
            (values,) = copy.tolist()
            _checked(values)
            at = 0
            for entry in pending:
                count = entry.logits.shape[0]
                kept = min(count, len(entry.lane.tokens) - entry.index)  # some may be dropped
                if kept > 0:
                    entry.lane.logprobs[entry.index : entry.index + kept] = values[at : at + kept]
                at += count
        self._scoring.clear()

    def _piece(self, token: int) -> str:
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = decode_pieces(self.tokenizer, [token])[0]
        return piece

    def _score_fed(self, lanes: list[Lane], earlier: list[torch.Tensor | None]) -> None:
        """Log-probs of the tokens fed after another token in the same step (engine-written
        text, written right behind the token before it): from the logits after that token."""
        for lane, logits in zip(lanes, earlier, strict=True):
            if logits is not None:
                self._score_later(lane, len(lane.tokens) - logits.shape[0], logits)

    def _write(
        self,
        lane: Lane,
        token: int,
        forced: bool,
        logprob: float | None = None,
        scored_from: torch.Tensor | None = None,
    ) -> None:
        """Append a token (its log-prob given, or computed at the step's end from the logits
        ``scored_from`` it follows), then any text the engine writes after it: all are fed in one
        step (the forced tokens are scored from that step's logits, :meth:`_score_fed`)."""
        index = len(lane.tokens)
        self._append(lane, token, logprob, forced)
        if scored_from is not None:
            self._score_later(lane, index, scored_from[None])
        while (
            lane.forced_queue
            and lane.status is LaneStatus.RUNNING
            and lane.end_position < self.max_positions  # the rest is cut (_cut_at_context)
        ):
            self._append(lane, lane.forced_queue.popleft(), None, True)

    def _append(self, lane: Lane, token: int, logprob: float | None, forced: bool) -> None:
        """Append a token; let the format react (forced text, fork, branch end); check budgets."""
        lane.append(token, logprob, forced)
        self._react(lane, token)

    def _react(self, lane: Lane, token: int) -> None:
        """The format's reaction to the lane's last token (forced text, fork, branch end), and
        the sample's budgets."""
        sample = lane.sample
        if lane.state is not None:
            piece = self._piece(token)
            lane.text_tail = (lane.text_tail + piece)[-64:]
            action, forced_text = lane.state.observe(
                self.format.completed_tags(lane.text_tail, piece), sample.request.params
            )
            if action.violation:
                sample.violations.append(action.violation)
            if forced_text:
                lane.forced_queue.extend(self.format.encode(forced_text))
            if action.kind is not Kind.CONTINUE:
                lane.after_forced = action
            elif not lane.forced_queue and lane.after_forced is None:
                limit = lane.state.element_limit(sample.request.params)
                if limit:
                    lane.forced_queue.extend(self.format.encode(limit))
        if _over_budget(sample) and not sample.truncated:
            self._truncate(sample, FinishReason.LENGTH)

    def _end_of_sequence(self, lane: Lane, token: int, logprob: float) -> None:
        state = lane.state
        if state is None or state.ends_response_on_eos():
            lane.append(token, logprob, False)
            self._finish_lane(lane, FinishReason.STOP)
        else:  # the model stopped inside an element: close it and carry on
            state.closing = True
            self._close_next(lane, lane.final_logits)

    def _close_next(self, lane: Lane, logits: torch.Tensor) -> None:
        tag = lane.state.closing_tag()
        if tag is None:
            lane.state.closing = False
            if lane.sample.truncated:
                self._finish_lane(lane, lane.sample.finish_reason)
            else:
                self._advance([lane], logits[None])
            return
        ids = self.format.encode(tag)
        lane.forced_queue.extend(ids[1:])
        self._write(lane, ids[0], forced=True, scored_from=logits)

    def _truncate(self, sample: Sample, reason: FinishReason, hard: bool = False) -> None:
        """Budget exhausted: close what is open in every lane, then stop (no new forks/joins)."""
        sample.truncated = True
        sample.finish_reason = reason
        for lane in sample.live_lanes():
            if hard or lane.state is None:
                self._finish_lane(lane, reason)
            elif lane.status is LaneStatus.RUNNING:
                lane.state.closing = True

    def _finish_lane(self, lane: Lane, reason: FinishReason) -> None:
        if lane.status is LaneStatus.RUNNING and not lane.pending:  # cut with its last token fed
            self._score_following_branch(lane)
        lane.status = LaneStatus.DONE
        lane.final_logits = None
        if lane.kv.alive:
            lane.kv.release()
        if not lane.sample.finish_reason:
            lane.sample.finish_reason = reason

    def _act(self, lane: Lane, action: Action) -> None:
        if action.kind is Kind.FORK:
            if lane.sample.truncated and lane.state.outer:
                lane.state.close_unforked()
                self._close_next(lane, lane.final_logits)
            elif lane.sample.truncated:
                self._finish_lane(lane, lane.sample.finish_reason)
            else:
                self._fork(lane, action.width)
        elif action.kind is Kind.BRANCH_DONE:
            self._branch_done(lane)

    def _fork(self, lane: Lane, width: int) -> None:
        sample = lane.sample
        start = node_start([lane.end_position])
        children = []
        for index, kv in enumerate(lane.kv.fork(width)):
            state, header = lane.state.fork_branch(index)
            noise = lane.noise.child(index + 1)
            child = Lane(
                sample, kv, state, start, branch=index, owner=lane, fork_parent=lane, noise=noise
            )
            child.forced_queue.extend(self.format.encode(header))
            children.append(child)
        lane.status = LaneStatus.DONE
        lane.branches, lane.tips = children, list(children)
        for child in children:  # all live before any writes: a budget hit must close them all
            sample.add_lane(child)
        for index, child in enumerate(children):
            token = child.forced_queue.popleft()
            # Branch i > 0 is scored from branch i - 1's last logits when that ends.
            self._write(
                child, token, forced=True, scored_from=lane.final_logits if index == 0 else None
            )
        lane.final_logits = None

    def _score_following_branch(self, lane: Lane) -> None:
        """A branch's last logits score the first token of the branch after it, which the fork
        wrote with no logits of its own."""
        following = _unscored_following_branch(lane)
        if following is not None and lane.final_logits is not None:
            self._score_later(following, 0, lane.final_logits[None])

    def _branch_done(self, lane: Lane) -> None:
        """``lane`` closed its branch (it is the branch's first lane, or the join lane of a
        block nested in it); once every branch of its block is closed, they join."""
        lane.status = LaneStatus.WAITING
        owner = lane.owner
        following = lane.branch + 1
        # A waiting branch must not pin its step's [rows, V] logits: only the last branch keeps
        # its own row (it scores the join's first token).
        if following < len(owner.branches):
            self._score_following_branch(lane)
            lane.final_logits = None
        elif lane.final_logits is not None:
            lane.final_logits = lane.final_logits.clone()
        tips = owner.tips
        if any(tip.status is not LaneStatus.WAITING for tip in tips):
            return
        sample = lane.sample
        if sample.truncated and owner.owner is None:  # nothing comes after a cut block
            for tip in tips:
                self._finish_lane(tip, sample.finish_reason)
            return
        last = tips[-1]
        state, opener = last.state.join_lane(blocks=max(tip.state.blocks for tip in tips))
        joined = Lane(
            sample,
            join([tip.kv for tip in tips], prefix=owner.kv),
            state,
            node_start(tip.end_position for tip in tips),
            branch=owner.branch,
            owner=owner.owner,
            joins=owner,
            noise=owner.noise.child(0),
        )
        owner.continued_by = joined
        if owner.owner is not None:  # the join goes on with the branch the block is nested in
            owner.owner.tips[owner.branch] = joined
        joined.forced_queue.extend(self.format.encode(opener))
        # A nested block cut by the budget still joins, at once closing what it opens, so the
        # path it is in can close too and the graph keeps its shape.
        joined.state.closing = sample.truncated
        for tip in tips:
            tip.status = LaneStatus.DONE
        sample.add_lane(joined)
        token = joined.forced_queue.popleft()
        self._write(joined, token, forced=True, scored_from=last.final_logits)
        for tip in tips:
            tip.final_logits = None

    # -- output ------------------------------------------------------------------------------
    def _graph(self, sample: Sample) -> ReasoningGraph:
        request = sample.request
        prompt = request.prompt_ids
        lanes = sample.sequence()
        ids = [t for lane in lanes for t in lane.tokens]
        if PICKED in ids:  # a picked token never read back: a bug, not a result to return
            raise RuntimeError(f"sample {sample.index}: a picked token was not read back")
        logprobs = [lp for lane in lanes for lp in lane.logprobs]
        forced = [f for lane in lanes for f in lane.forced]
        engine_positions = [
            lane.start_position + i for lane in lanes for i in range(len(lane.tokens))
        ]
        offsets, at = {}, 0
        for lane in lanes:
            offsets[id(lane)] = at
            at += len(lane.tokens)
        fork_tokens = {offsets[id(lane.branches[0])] for lane in lanes if lane.branches}
        sequential = request.mode == "sequential"
        branch_ends = []  # a cut leaves branches open: where each ended, for the parser
        if sample.truncated:
            for lane in lanes:
                for branch in lane.branches:
                    last = list(branch.walk())[-1]
                    branch_ends.append((offsets[id(last)] + len(last.tokens), _depth(branch)))

        def parsed(sequential: bool | set[int]) -> ReasoningGraph:
            return parse(
                ids,
                grammar=self.grammar,
                tokenizer=self.tokenizer,
                prompt_ids=prompt,
                lenient=True,
                sequential=sequential,
                branch_ends=branch_ends,
            )

        graph = parsed(sequential)
        if not sequential:
            unforked = {
                b.index
                for b in graph.blocks
                if self._first_branch_token(graph, b) not in fork_tokens
            }
            if unforked:
                graph = parsed(unforked)
        graph.logprobs = [None] * len(prompt) + logprobs
        graph.forced = [False] * len(prompt) + forced
        consistent = position_ids(graph)[len(prompt) :].tolist() == engine_positions
        consistent = consistent and _sees_as_decoded(graph, lanes, len(prompt))
        graph.metadata.update(
            {
                "prompt_index": request.index,
                "sample_index": sample.index,
                "mode": request.mode,
                "finish_reason": str(sample.finish_reason or FinishReason.STOP),
                "truncated": sample.truncated,
                "engine_violations": list(sample.violations),
                "forks": len(fork_tokens),
                "total_tokens": len(ids),
                "critical_path_tokens": sample.critical_tokens,
                "layout_consistent": consistent,
            }
        )
        return graph

    @staticmethod
    def _first_branch_token(graph: ReasoningGraph, block) -> int | None:
        if not block.branches or not block.branches[0]:
            return None
        return graph.nodes[block.branches[0][0]].token_start - graph.prompt_num_tokens


def kv_memory_for(device: torch.device, setting: int | str) -> int:
    """Bytes for the KV pool: ``setting`` itself, or with ``"auto"`` a share
    (:data:`AUTO_KV_SHARE`) of what the CUDA device has free once the model is on it (on the
    CPU, :data:`DEFAULT_KV_BYTES`)."""
    if setting == "auto":
        if device.type != "cuda":
            return DEFAULT_KV_BYTES
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * AUTO_KV_SHARE)
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 1:
        raise ValueError(f"kv_memory_bytes must be a positive int or 'auto', got {setting!r}")
    return setting


def _sees_as_decoded(graph: ReasoningGraph, lanes: list[Lane], prompt_length: int) -> bool:
    """Whether every token of ``lanes`` (a sample's, in sequence order) was decoded seeing
    exactly the tokens the graph's layout lets it see. Checked where a lane or a node starts:
    in between, both add the token before."""
    starts = [node.token_start for node in graph.nodes if node.num_tokens]
    nodes = [node.id for node in graph.nodes if node.num_tokens]
    graph_keys = ancestor_spans(graph)
    span: dict[int, tuple[int, int]] = {}  # each lane's tokens in the sequence
    at = prompt_length
    for lane in lanes:
        span[id(lane)] = (at, at + len(lane.tokens))
        at += len(lane.tokens)
    for lane in lanes:
        start, end = span[id(lane)]
        keys = [(0, prompt_length), *(span[id(seen)] for seen in lane.context_lanes()[:-1])]
        for token in [start, *(s for s in starts if start < s < end)] if start < end else []:
            node = nodes[bisect_right(starts, token) - 1]
            decoded = _merged([*keys, (start, token)])
            if decoded != _merged([*graph_keys[node], (graph.nodes[node].token_start, token)]):
                return False
    return True


def _merged(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for first, last in sorted(span for span in spans if span[0] < span[1]):
        if out and first <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], last))
        else:
            out.append((first, last))
    return out


def _depth(branch: Lane) -> int:
    """How many blocks deep the branch is (1: a branch of a top-level block)."""
    depth = 0
    while branch.owner is not None:
        depth, branch = depth + 1, branch.owner
    return depth


def _ended(request: Request) -> bool:
    """Finished, with every token read (``overlap`` reads a step's tokens one step later)."""
    lanes = (lane for sample in request.samples for lane in sample.lanes)
    return request.finished and not any(PICKED in lane.tokens[-1:] for lane in lanes)


def _over_budget(sample: Sample) -> bool:
    params = sample.request.params
    return (
        sample.critical_tokens >= params.max_new_tokens
        or sample.total_tokens >= params.total_budget
    )


def _checked(logprobs: list[float]) -> list[float]:
    """Log-probs as read back; NaN means the logits held NaN or infinity (broken weights, an
    overflowing dtype), and nothing sampled from them can be scored or trained on."""
    if any(math.isnan(value) for value in logprobs):
        raise FloatingPointError(
            "the model's logits hold NaN or infinite values: check its weights and dtype"
        )
    return logprobs


def _tags_are_special(tokenizer, grammar: str) -> bool:
    texts = Tags.of(grammar).texts  # an unknown grammar is an error, not plain-text tags
    try:
        return all(len(tokenizer.encode(t, add_special_tokens=False)) == 1 for t in texts)
    except Exception:
        return False


def wraps_in_chat(tokenizer, chat: bool | None) -> bool:
    """Whether a text prompt goes through ``tokenizer``'s chat template: ``chat`` None means
    when it has one."""
    return bool(getattr(tokenizer, "chat_template", None)) and chat is not False


def _eos_ids(model: torch.nn.Module, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def _unscored_following_branch(lane: Lane) -> Lane | None:
    """The branch after ``lane``'s when its first token (which the fork wrote with no logits of
    its own) still waits for ``lane``'s last logits to score it."""
    owner = lane.owner
    if owner is None or lane.branch + 1 >= len(owner.branches):
        return None
    following = owner.branches[lane.branch + 1]
    return following if following.tokens and following.logprobs[0] is None else None


__all__ = ["Engine", "EngineStats", "SamplingParams"]
