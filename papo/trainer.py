"""The three NPR training stages on one loop: rollouts or traces in, one optimizer step out.

- ``zero`` (NPR-Zero): RL with DAPO on an instruct model, tags as plain text; sequential
  rollouts, reward ``npr_zero`` (accuracy when the format check passes, the format penalty when it
  fails), GRPO advantages, clip-higher surrogate, dynamic sampling (groups with equal rewards are
  dropped), optional overlong penalty.
- ``sft`` (NPR-Beta): parallel SFT on accepted traces (see :mod:`papo.rejection`) with tags as
  special tokens, loss on the response only, mask and positions from the graph.
- ``papo`` (NPR): RL on rollouts from the parallel executor, ``n`` samples per prompt sharing the
  prompt's KV; structurally invalid rollouts are dropped and counted, and so, in both RL stages,
  are rollouts the engine cut for want of KV pages (``pool_cut_rollouts``) and rollouts whose
  parsed layout is not the one the engine decoded at (``layout_consistent``); PAPO advantages
  (or the graph-level ``branch`` estimator); the strictly on-policy objective, token-mean, no KL.

Both RL stages train on exactly what the engine sampled: the graphs' token ids (never
re-tokenized text), the engine's positions (the foundation's native rule) and loss only on the
tokens the model chose (engine-written ``forced`` tokens are masked). Each step logs
``logprob_gap``, the largest difference between the training forward's log-probs and the
engine's on the trained tokens (0 up to float error when training is on-policy).

With ``sharding = "fsdp2"`` (several ranks) the policy trains sharded and the engine samples from
a full replica refreshed after every optimizer step (see :mod:`papo.distributed` for the memory
trade); updates, metrics and checkpoints are those of the unsharded run.
"""

from __future__ import annotations

import copy
import json
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

import npr_graph as ng
from npr_graph.engine.engine import Engine, PromptError, wraps_in_chat
from npr_graph.engine.sampling import SamplingParams
from npr_graph.graph import FinishReason
from npr_graph.models import load_model, resolve_device
from npr_graph.prompts import PLACEHOLDER, PromptTemplate, load_template
from npr_graph.typecheck import setting_changes

from . import advantages as advantage_estimators
from . import checkpoint, distributed, rewards
from . import loss as losses
from .config import TrainConfig
from .data import PackedRow, pack
from .distributed import World, init_world
from .forward import row_logprobs
from .logs import RolloutLog, StepLogger
from .problems import Problem, Trace, read_problems, read_traces


@dataclass
class Rollout:
    """One sampled graph and what the trainer knows about it."""

    problem: int  # global index of its problem
    group: int  # its draw's place in the step's batch: a problem drawn twice is two groups
    graph: ng.ReasoningGraph
    reward: rewards.Reward
    valid: bool
    response_tokens: int
    # Cut for want of KV pages (finish reason kv_exhausted): the engine's capacity, not the
    # model, ended it, so its reward says nothing about the policy.
    pool_cut: bool = False
    # The engine decoded its tokens at positions its parsed graph does not give them (free-mode
    # tag soup the format refused): training could not score what was sampled.
    layout_differs: bool = False


class Trainer:
    """Runs one stage. ``model``/``tokenizer`` may be given (tests, examples); otherwise they are
    loaded from ``config.model`` with ``config.tags``."""

    def __init__(
        self,
        config: TrainConfig,
        *,
        model: torch.nn.Module | None = None,
        tokenizer=None,
        world: World | None = None,
        console: Console | None = None,
    ) -> None:
        self.config = config
        self.world = world or init_world(config.device)
        self.console = console or Console(stderr=True)
        # everything that can be wrong with the inputs fails before the slow model load
        self.reward_fn = rewards.get(config.reward)
        self.loss_fn = losses.get(config.loss)
        if config.advantage != "branch":
            advantage_estimators.get(config.advantage)
        self.template = _template(config.prompt_template)
        if not config.data.strip():
            raise ValueError("no training data: set data in the config (or --set data=FILE)")
        if config.stage == "sft":
            self.traces = read_traces(config.data, config.prompt_field, config.response_field)
            self.sampled_chat = _check_sampled_prompts(self.traces, self.template, config.data)
            self.items = len(self.traces)
            passes = self.items * config.epochs  # the last step's batch fills from the next
            self.total_steps = config.steps or math.ceil(passes / config.batch_size)
            self.per_step = config.batch_size
        else:
            if config.steps is None:
                raise ValueError("RL stages need 'steps' in the config")
            self.problems = read_problems(config.data, config.prompt_field, config.answer_field)
            self.items = len(self.problems)
            self.total_steps = config.steps
            self.per_step = config.prompts_per_step
        if self.items == 0:
            raise ValueError(f"{config.data}: no usable records")
        self.eval_problems: list[Problem] = []
        if config.eval_data is not None:
            self.eval_problems = read_problems(
                config.eval_data,
                config.eval_prompt_field or config.prompt_field,
                config.eval_answer_field or config.answer_field,
            )
            if not self.eval_problems:
                raise ValueError(f"{config.eval_data}: no usable records")
        dtype = getattr(torch, config.dtype)
        self.device = resolve_device(config.device)
        if model is None:
            model, tokenizer = load_model(
                config.model, dtype=dtype, tags=config.tags, grammar=config.grammar
            )
        elif tokenizer is None:
            raise ValueError("give the tokenizer with the model")
        self.model, self.tokenizer = model.to(self.device), tokenizer
        if config.stage == "sft" and self.sampled_chat is not None:
            chat = wraps_in_chat(tokenizer, config.chat)
            if chat != self.sampled_chat:
                raise ValueError(
                    f"{config.data}: its traces were sampled "
                    f"{'with' if self.sampled_chat else 'without'} the chat template and this "
                    f"run trains {'with' if chat else 'without'} it: set chat = "
                    f"{str(self.sampled_chat).lower()} (or drop the traces' chat field to train "
                    "on other prompts on purpose)"
                )
        self.output_dir = Path(config.output_dir)
        if config.sharding == "fsdp2" and not self.world.distributed:
            self.console.print("sharding 'fsdp2' with one process: training unsharded")
        self.sharded = config.sharding == "fsdp2" and self.world.distributed
        # sharded: the engine samples from a full replica (one extra copy of the weights per rank)
        self.replica: torch.nn.Module | None = None
        self.sharded_forward: distributed.ShardedForward | None = None
        self.padding_row: PackedRow | None = None
        if self.sharded:
            self.replica = copy.deepcopy(model).requires_grad_(False).eval()
            self.sharded_forward = distributed.shard_policy(model, self.world)
            # the shards came from each rank's own copy; the replica follows what was sharded
            distributed.gather_full_weights(model, self.replica)
            self.padding_row = _padding_row(tokenizer).to(self.device)
        self.rollout_model = self.replica if self.replica is not None else model
        self.engine = Engine(
            self.rollout_model,
            tokenizer,
            page_size=config.page_size,
            num_pages=config.kv_pages,
            device=self.device,
            cuda_graphs=config.cuda_graphs,
            overlap=config.overlap,
            grammar=config.grammar,
        )
        self.model.eval()  # no dropout: rollouts and the training forward see the same network
        # the KL term's reference is the policy as training starts, frozen
        self.reference = (
            copy.deepcopy(self.rollout_model).requires_grad_(False).eval()
            if config.kl_coef > 0
            else None
        )
        if config.stage == "sft":
            self.graphs = [self._trace_graph(trace) for trace in self.traces]
        else:
            self._check_prompts(self.problems, config.data, self._sampling_params(seed=None))
        if self.eval_problems:
            self._check_prompts(self.eval_problems, config.eval_data, self._eval_params())
        self.optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=config.lr,
            betas=config.betas,
            weight_decay=config.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.step = 0
        self.skipped = 0
        self._unlogged: tuple[dict[str, Any], bool] | None = None
        self.logger = StepLogger(
            self.output_dir,
            enabled=self.world.is_main,
            tensorboard=config.tensorboard,
            console=self.console,
        )
        self.rollout_log = RolloutLog(
            self.output_dir, enabled=self.world.is_main, console=self.console
        )

    def _check_prompts(
        self, problems: list[Problem], source: str | None, params: SamplingParams
    ) -> None:
        """Refuse problems the engine cannot run with ``params`` (:meth:`Engine.check_prompt`),
        all of them when the trainer starts, so a run does not stop at whichever step first
        draws one (or at its first evaluation); warn when one group may outgrow the pool."""
        errors, longest = [], 0
        for problem in problems:
            try:
                prompt = self.template.render(problem.prompt)
                ids = self.engine.check_prompt(prompt, params, self.config.chat, "its prompt")
                longest = max(longest, len(ids))
            except PromptError as error:
                errors.append(f"problem {problem.id!r}: {error}")
        if errors:
            more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
            raise ValueError(f"{source}: " + "; ".join(errors[:5]) + more)
        # The most one group can hold: every sample at its total budget (all its branches).
        group = params.n * (longest + params.total_budget)
        slots = self.engine.pool.num_usable * self.engine.pool.page_size
        if group > slots and self.world.is_main:
            self.console.print(
                f"warning: the KV pool holds {slots} tokens (kv_pages x page_size); one group of "
                f"the longest prompt of {source} may need up to {group} ({params.n} samples of "
                f"{longest} + {params.total_budget} tokens): samples that outgrow it when nothing "
                "is left to preempt are cut (pool_cut_rollouts; eval_pool_cut) and left out of "
                "training; raise kv_pages",
                markup=False,
            )

    # -- schedule ----------------------------------------------------------------------------
    def _lr_factor(self, step: int) -> float:
        warmup = int(self.config.warmup_ratio * self.total_steps)
        if step < warmup:
            return (step + 1) / warmup
        if self.config.lr_schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, self.total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    def batch_indices(self, step: int) -> list[int]:
        """The data items of ``step``: consecutive slices of per-epoch permutations, a pure
        function of (seed, step), so a resumed run reads exactly what an uninterrupted one would."""
        start = step * self.per_step
        out = []
        for position in range(start, start + self.per_step):
            epoch, offset = divmod(position, self.items)
            generator = torch.Generator().manual_seed(self.config.seed * 7919 + epoch)
            out.append(int(torch.randperm(self.items, generator=generator)[offset]))
        return out

    # -- running -----------------------------------------------------------------------------
    def train(self, resume: bool = False, stop_after: int | None = None) -> list[dict[str, Any]]:
        """Run to ``total_steps`` (continuing from the latest checkpoint with ``resume``; stopping
        early after step ``stop_after``) and return the metrics of the steps run."""
        if resume:
            self._resume()
        history = []
        save_every = self.config.save_every
        end = self.total_steps if stop_after is None else min(stop_after, self.total_steps)
        try:
            if self.step == 0 and self.eval_problems:  # where training starts from
                self.logger.log(0, self.evaluate())
            if self._unlogged is not None:  # the checkpoint's line, lost to a kill after it
                metrics, evaluated = self._unlogged
                self.logger.log(self.step, metrics | (self.evaluate() if evaluated else {}))
                self._unlogged = None
            while self.step < end:
                metrics = self.train_step()
                self.step += 1
                evaluated = self._eval_due()
                logged = (
                    self.step % self.config.log_every == 0
                    or self.step == self.total_steps
                    or evaluated
                )
                if (save_every and self.step % save_every == 0) or self.step == self.total_steps:
                    # first: an evaluation that fails loses no training; what the line of this
                    # step holds goes with it, so a resume logs the line a kill prevented
                    self.save((metrics, evaluated) if logged else None)
                if evaluated:
                    metrics.update(self.evaluate())
                history.append(metrics)
                if logged:
                    self.logger.log(self.step, metrics)
        finally:
            self.logger.close()
        return history

    def _eval_due(self) -> bool:
        every = self.config.eval_every
        last = self.step == self.total_steps
        return bool(self.eval_problems) and (last or bool(every and self.step % every == 0))

    def evaluate(self) -> dict[str, Any]:
        """The policy on the held-out problems (``eval_data``), ``eval_samples`` each at
        ``eval_temperature``, decoded as rollouts are (mode, budgets), with the same seeds at
        every evaluation: accuracy (and pass@n), format-valid and parallel rates, mean branch
        width and response tokens. Under torchrun each rank decodes a share of the problems."""
        c = self.config
        start = time.perf_counter()
        mine = self.world.shard(list(range(len(self.eval_problems))))
        outcomes = []

        def grade(index: int, graphs: list[ng.ReasoningGraph]) -> None:  # graphs go as they end
            problem = self.eval_problems[mine[index]]
            for graph in graphs:
                cut = graph.metadata.get("finish_reason") == FinishReason.KV_EXHAUSTED
                correct = not cut and self.reward_fn(graph.response_text, problem.answer).correct
                outcomes.append((problem.id, bool(correct), cut, _shape(graph)))

        if mine:  # each problem seeded by its place in eval_data, whichever rank decodes it
            prompts = [self.template.render(self.eval_problems[i].prompt) for i in mine]
            params = self._eval_params()
            seeded = [replace(params, seed=(c.seed * 1_000_003 + i) * 7919 + 1) for i in mine]
            self.engine.generate(prompts, seeded, mode=c.mode, chat=c.chat, on_finish=grade)
        everything = [o for part in self.world.gather(outcomes) for o in part]
        return _eval_metrics(everything, c.eval_samples, time.perf_counter() - start)

    def _eval_params(self) -> SamplingParams:
        c = self.config
        return replace(
            self._sampling_params(seed=None), temperature=c.eval_temperature, n=c.eval_samples
        )

    def train_step(self) -> dict[str, Any]:
        if self.config.stage == "sft":
            return self._sft_step()
        return self._rl_step()

    def save(self, line: tuple[dict[str, Any], bool] | None = None) -> Path | None:
        """Write a checkpoint of this step; ``line``: the step's training metrics and whether
        an evaluation joins them, when the step is logged after the checkpoint."""
        path = None
        optimizer_state = None
        if self.sharded:  # every rank takes part in gathering the sharded optimizer state
            optimizer_state = checkpoint.full_optimizer_state(
                self.optimizer, keep=self.world.is_main
            )
        if self.world.is_main:
            state = {
                "data_position": self.step * self.per_step,
                "skipped_steps": self.skipped,
                "config": self.config.to_dict(),
            }
            if line is not None:
                state["line"] = {"metrics": line[0], "evaluated": line[1]}
            path = checkpoint.save(
                self.output_dir / "checkpoints",
                self.step,
                self.rollout_model,
                self.tokenizer,
                self.optimizer,
                self.scheduler,
                state,
                optimizer_state=optimizer_state,
            )
        self.world.barrier()
        return path

    def _resume(self) -> None:
        path = checkpoint.latest(self.output_dir / "checkpoints")
        seen = self.world.gather(None if path is None else str(path))
        if len(set(seen)) > 1:  # each would train on other weights, or wait for the others
            listed = ", ".join(f"rank {r}: {p or 'none'}" for r, p in enumerate(seen))
            raise ValueError(
                f"--resume: the ranks see different last checkpoints in "
                f"{self.output_dir / 'checkpoints'} ({listed}); give them one output_dir they "
                "all read"
            )
        if path is None:
            if self.world.is_main:
                self.console.print("no checkpoint to resume from; starting at step 0")
            self.logger.truncate_after(-1)  # the steps logged before are done again
            self.rollout_log.truncate_after(-1)
            return
        state = checkpoint.load(path, self.rollout_model, self.optimizer, self.scheduler)
        _check_resumed_settings(path, state.get("config"), self.config)
        if self.replica is not None:
            distributed.scatter_full_weights(self.replica, self.model)
        self.step = state["step"]
        self.skipped = state.get("skipped_steps", 0)
        self.logger.truncate_after(self.step)
        self.rollout_log.truncate_after(self.step)
        line = state.get("line")
        if isinstance(line, dict) and not self.world.broadcast(self.logger.logged(self.step)):
            self._unlogged = (line["metrics"], bool(line["evaluated"]))
        if self.world.is_main:
            self.console.print(f"resumed from {path} at step {self.step}", markup=False)

    # -- SFT ---------------------------------------------------------------------------------
    def _trace_graph(self, trace: Trace) -> ng.ReasoningGraph:
        prompt_ids = self.engine.encode_prompt(self.template.render(trace.prompt), self.config.chat)
        response_ids = self.tokenizer.encode(trace.response, add_special_tokens=False)
        eos = self.tokenizer.eos_token_id
        if eos is not None and (not response_ids or response_ids[-1] != eos):
            response_ids.append(eos)
        # parse takes the response ids; with prompt_ids the graph spans prompt + response
        return ng.parse(
            response_ids,
            grammar=self.config.grammar,
            tokenizer=self.tokenizer,
            prompt_ids=prompt_ids,
            lenient=True,
        )

    def _sft_step(self) -> dict[str, Any]:
        batch = self.batch_indices(self.step)
        indices = self.world.shard(batch)
        graphs = [self.graphs[i] for i in indices]
        # this rank's traces are the batch's places rank, rank + size, ... (World.shard)
        places = list(range(self.world.rank, len(batch), self.world.size))
        start = time.perf_counter()
        result = self._optimize(graphs, [None] * len(graphs), temperature=1.0, places=places)
        return {
            **result,
            "traces": len(batch),
            "time_s": time.perf_counter() - start,
        }

    # -- RL ----------------------------------------------------------------------------------
    def rollout(self, draws: list[tuple[int, int]], step: int) -> tuple[list[Rollout], float]:
        """Sample ``samples_per_prompt`` graphs for each draw ``(group, problem)``, seeded by
        (seed, step, group); returns them and the time."""
        c = self.config
        prompts = [self.template.render(self.problems[problem].prompt) for _, problem in draws]
        params = [
            self._sampling_params(seed=(c.seed * 1_000_003 + step) * 1_000_003 + group)
            for group, _ in draws
        ]
        if not prompts:
            return [], 0.0
        graphs = self.engine.generate(prompts, params, mode=c.mode, chat=c.chat)
        wall = self.engine.stats.wall_time
        out = []
        for graph in graphs:
            group, problem = draws[graph.metadata["prompt_index"]]
            response = graph.response_text
            reward = self.reward_fn(response, self.problems[problem].answer)
            tokens = graph.num_tokens - graph.prompt_num_tokens
            if c.overlong_buffer:
                # max_new_tokens bounds the critical path (the native end position), not the
                # sum over branches: a parallel rollout within its budget is not overlong
                length = ng.metrics(graph)["critical_path_tokens"]
                penalty = rewards.overlong_penalty(
                    length, c.max_new_tokens, c.overlong_buffer, c.overlong_factor
                )
                reward = rewards.Reward(
                    reward.score + penalty,
                    reward.correct,
                    reward.answer,
                    reward.format_score,
                    reward.parsed,
                )
            valid = _structurally_valid(graph)
            pool_cut = graph.metadata.get("finish_reason") == FinishReason.KV_EXHAUSTED
            differs = not graph.metadata.get("layout_consistent", True)
            out.append(Rollout(problem, group, graph, reward, valid, tokens, pool_cut, differs))
        return out, wall

    def _sampling_params(self, seed: int | None) -> SamplingParams:
        c = self.config
        return SamplingParams(
            temperature=c.temperature,
            top_p=c.top_p,
            top_k=c.top_k,
            max_new_tokens=c.max_new_tokens,
            n=c.samples_per_prompt,
            seed=seed,
            min_branches=c.min_branches,
            max_branches=c.max_branches,
            max_blocks=c.max_blocks,
            max_depth=c.max_depth,
            max_plan_tokens=c.max_plan_tokens,
            max_step_tokens=c.max_step_tokens,
            max_takeaway_tokens=c.max_takeaway_tokens,
        )

    def _rl_step(self) -> dict[str, Any]:
        c = self.config
        world = self.world
        draws = world.shard(list(enumerate(self.batch_indices(self.step))))
        rollouts, wall = self.rollout(draws, self.step)
        # every rank sees every rollout's summary: advantages use batch-wide statistics
        summaries = [
            (r.group, r.reward.score, r.valid, r.reward.correct, r.pool_cut, r.layout_differs)
            for r in rollouts
        ]
        gathered = world.gather((summaries, wall, [_shape(r.graph) for r in rollouts]))
        everything = [s for part, _, _ in gathered for s in part]
        shapes = [s for _, _, part in gathered for s in part]
        pool_cut = sum(cut for *_, cut, _ in everything)
        kept = [
            not cut and not differs and (valid or not c.drop_invalid)
            for _, _, valid, _, cut, differs in everything
        ]
        dropped = len(kept) - sum(kept) - pool_cut
        if c.dynamic_sampling:
            kept = _keep_informative_groups(everything, kept)
        filtered = len(everything) - dropped - pool_cut - sum(kept)
        metrics = _rollout_metrics(everything, shapes, dropped, filtered, gathered, c)
        metrics["pool_cut_rollouts"] = pool_cut
        # this rank's rollouts sit at a known offset of the gathered list
        offset = sum(len(part) for part, _, _ in gathered[: world.rank])
        mine = slice(offset, offset + len(rollouts))
        if not any(kept):
            self._log_rollouts(rollouts, kept[mine], {})
            self.skipped += 1
            return {**metrics, **self._skip("no rollout left to train on")}
        scores = torch.tensor([s[1] for s, k in zip(everything, kept, strict=True) if k])
        groups = torch.tensor([s[0] for s, k in zip(everything, kept, strict=True) if k])
        kept_before = [sum(kept[:i]) for i in range(len(kept) + 1)]
        estimator = advantage_estimators.get(c.advantage)
        own_graph_level = c.advantage != "branch" and getattr(estimator, "graph_level", False)
        if own_graph_level:
            per_token = self._graph_level_advantages(
                estimator, rollouts, kept[mine], scores, groups
            )
            outcome = None
        else:
            outcome_name = "papo" if c.advantage == "branch" else c.advantage
            outcome = advantage_estimators.get(outcome_name)(scores, groups)
        # a kept rollout's place in the order one process holds them (by draw, then sample; the
        # gathered list is by rank): mini-batches are cut by it, so they do not depend on the ranks
        by_draw = sorted(range(len(everything)), key=lambda position: everything[position][0])
        place = {position: i for i, position in enumerate(p for p in by_draw if kept[p])}
        graphs, token_advantages, places = [], [], []
        advantages: dict[int, tuple[float, torch.Tensor]] = {}  # this rank's, by local index
        lam = c.branch_lambda if c.advantage == "branch" else 0.0
        for local, rollout in enumerate(rollouts):
            position = offset + local
            if not kept[position]:
                continue
            graphs.append(rollout.graph)
            places.append(place[position])
            if outcome is None:
                tokens = per_token[kept_before[position]]
                value = float(tokens.mean()) if tokens.numel() else 0.0
            else:
                value = float(outcome[kept_before[position]])
                answer = self.problems[rollout.problem].answer
                tokens = advantage_estimators.spread(rollout.graph, value, answer, lam=lam)
            token_advantages.append(tokens)
            advantages[local] = (value, tokens)
        # scored at the temperature the engine recorded its log-probs at (its rule, not a copy)
        temperature = SamplingParams(temperature=c.temperature).scoring_temperature
        result = self._optimize(graphs, token_advantages, temperature, places=places)
        self._log_rollouts(rollouts, kept[mine], advantages, skipped=result.get("skipped"))
        return {**metrics, **result}

    def _graph_level_advantages(
        self,
        estimator: Callable[..., Any],
        rollouts: list[Rollout],
        kept: list[bool],
        scores: torch.Tensor,
        groups: torch.Tensor,
    ) -> list[torch.Tensor]:
        """A graph-level estimator of the user's own (``graph_level = True``, called as
        ``fn(graphs, references, rewards, group_ids)``) sees every kept rollout of the step, on
        every rank, in the order of ``scores``; one tensor per response token of each comes back."""
        mine = [
            (rollout.graph, self.problems[rollout.problem].answer)
            for rollout, keep in zip(rollouts, kept, strict=True)
            if keep
        ]
        everyone = [pair for part in self.world.gather(mine) for pair in part]
        graphs = [graph for graph, _ in everyone]
        result = estimator(graphs, [answer for _, answer in everyone], scores, groups)
        name = self.config.advantage
        if not isinstance(result, Sequence) or len(result) != len(graphs):
            raise ValueError(f"advantage estimator {name!r} must return one tensor per graph")
        for graph, tokens in zip(graphs, result, strict=True):
            expected = (graph.num_tokens - graph.prompt_num_tokens,)
            if not isinstance(tokens, torch.Tensor) or tokens.shape != expected:
                got = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens)
                raise ValueError(
                    f"advantage estimator {name!r} must return one advantage per response "
                    f"token: expected shape {expected}, got {got}"
                )
            if not torch.isfinite(tokens).all():
                raise ValueError(f"advantage estimator {name!r} returned a non-finite advantage")
        return [tokens.float() for tokens in result]

    def _log_rollouts(
        self,
        rollouts: list[Rollout],
        kept: list[bool],
        advantages: dict[int, tuple[float, torch.Tensor]],
        skipped: str | None = None,
    ) -> None:
        """Every ``rollouts_every`` steps, append the step's rollouts to ``rollouts.jsonl`` (rank
        0 writes what every rank sampled; a step whose update was ``skipped`` trained none).
        A collective under torchrun, on the same steps on every rank."""
        every = self.config.rollouts_every
        if not every or (self.step + 1) % every:
            return
        records = self._rollout_records(self.step + 1, rollouts, kept, advantages)
        if skipped:
            for record in (r for r in records if r["trained"]):
                record.update(trained=False, left_out=f"step skipped: {skipped}")
        parts = self.world.gather_to_main(records)
        if parts is not None:
            gathered = sorted(
                (r for part in parts for r in part), key=lambda r: (r["group"], r["sample"])
            )
            self.rollout_log.write(gathered)

    def _rollout_records(
        self,
        step: int,
        rollouts: list[Rollout],
        kept: list[bool],
        advantages: dict[int, tuple[float, torch.Tensor]],
    ) -> list[dict[str, Any]]:
        """One record per rollout, in the fields of ``npr eval``'s samples (so ``npr view``
        shows them) and what training made of it: ``trained``, ``left_out`` (why not:
        ``kv_exhausted``, ``layout_inconsistent``, ``invalid`` or ``uninformative group``), the
        outcome ``advantage``
        and ``node_advantages`` (per graph node, the mean over its trained tokens)."""
        from npr_graph.evaluate import sample_metrics

        records = []
        for local, (rollout, trained) in enumerate(zip(rollouts, kept, strict=True)):
            left_out = None
            if rollout.pool_cut:
                left_out = "kv_exhausted"
            elif rollout.layout_differs:
                left_out = "layout_inconsistent"
            elif not rollout.valid and self.config.drop_invalid:
                left_out = "invalid"
            elif not trained:  # dynamic sampling
                left_out = "uninformative group"
            value, tokens = advantages.get(local, (None, None))
            graph, reward = rollout.graph, rollout.reward
            problem = self.problems[rollout.problem]
            records.append(
                {
                    "step": step,
                    "problem_id": problem.id,
                    "problem_index": rollout.problem,
                    "group": rollout.group,
                    "sample": graph.metadata.get("sample_index", 0),
                    "reference": problem.answer,
                    "answer": reward.answer,
                    "correct": reward.correct,
                    "parsed": reward.parsed,
                    "reward": reward.score,
                    "trained": trained,
                    "left_out": left_out,
                    "advantage": value,
                    "node_advantages": (
                        None
                        if tokens is None
                        else advantage_estimators.node_advantages(graph, tokens)
                    ),
                    "metrics": sample_metrics(graph, self.config.grammar),
                    "graph": graph.to_dict(),
                }
            )
        return records

    # -- one optimizer step -------------------------------------------------------------------
    def _optimize(
        self,
        graphs: list[ng.ReasoningGraph],
        token_advantages: list[torch.Tensor | None],
        temperature: float,
        places: list[int] | None = None,
    ) -> dict[str, Any]:
        """One training step: ``mini_batches`` optimizer updates over the step's samples. The
        first update is on-policy; later ones see a policy the first already moved (stale), so
        they use the engine's log-probs as the old policy (clipped when ``clip`` is set).
        Mini-batch ``i`` holds the samples whose place in the whole step's batch (``places``:
        where this rank's samples stand in it; default: this list is the batch) is ``i`` modulo
        ``mini_batches``, so every world size cuts the batch alike."""
        count = self.config.mini_batches
        places = list(range(len(graphs))) if places is None else places
        parts = []
        for i in range(count):
            members = [j for j, place in enumerate(places) if place % count == i]
            parts.append(
                self._update(
                    [graphs[j] for j in members],
                    [token_advantages[j] for j in members],
                    temperature,
                    stale=i > 0,
                )
            )
        done = [p for p in parts if p.get("skipped") is None]
        with warnings.catch_warnings():  # a step whose updates were all skipped took none
            warnings.simplefilter("ignore", UserWarning)
            lr = self.scheduler.get_last_lr()[0]
            self.scheduler.step()  # the schedule follows steps, taken or skipped
        if not done:
            self.skipped += 1
            return {
                "loss": None,
                "grad_norm": None,
                "lr": lr,
                "skipped": parts[0]["skipped"],
                "skipped_steps": self.skipped,
            }
        tokens = sum(p["trained_tokens"] for p in done)
        return {
            "loss": sum(p["loss"] for p in done) / len(done),
            "grad_norm": max(p["grad_norm"] for p in done),
            "lr": lr,
            "trained_tokens": tokens,
            "entropy": sum(p["entropy_sum"] for p in done) / max(tokens, 1),
            "logprob_gap": parts[0].get("logprob_gap"),
            "clip_fraction": sum(p["clip_fraction"] for p in done) / len(done),
            "kl": sum(p["kl"] for p in done) / len(done),
            "rows": sum(p["rows"] for p in done),
            **({"padding_rows": sum(p["padding_rows"] for p in done)} if self.sharded else {}),
            "skipped_updates": len(parts) - len(done),
            "skipped": None,
            "skipped_steps": self.skipped,
        }

    def _update(
        self,
        graphs: list[ng.ReasoningGraph],
        token_advantages: list[torch.Tensor | None],
        temperature: float,
        stale: bool,
    ) -> dict[str, Any]:
        c = self.config
        world = self.world
        rows = pack(graphs, token_advantages, max_tokens=c.row_tokens) if graphs else []
        local_tokens = sum(int(row.loss_mask.sum()) for row in rows)
        normalizer = world.sum(local_tokens if c.aggregation == "token-mean" else len(graphs))
        # the strictly on-policy ratio exp(logp - stopgrad(logp)) unless the batch is stale;
        # DAPO's clipped surrogate always measures against the rollout policy
        use_old = stale or c.loss == "ppo_clip"
        # sharded: every forward and backward is a collective, so all ranks run as many passes
        # as the rank with the most rows, the extra ones on a padding row with zero loss
        passes = max(world.gather(len(rows))) if self.sharded else len(rows)
        self.optimizer.zero_grad(set_to_none=True)
        total_loss, gap, entropy_sum, clipped, kl, bad = 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
        for index in range(passes):
            if index >= len(rows) or bad:
                assert self.padding_row is not None
                logprobs, _ = self._row_logprobs(self.padding_row, temperature)
                (logprobs.sum() * 0.0).backward()  # exactly zero gradient
                continue
            row = rows[index].to(self.device)
            logprobs, entropy = self._row_logprobs(row, temperature)
            scored = row.scored
            mask = row.loss_mask[scored]
            old = row.old_logprobs[scored]
            reference = None
            if self.reference is not None:
                with torch.no_grad():
                    reference, _ = row_logprobs(self.reference, row, temperature=temperature)
            out = self.loss_fn(
                logprobs,
                row.advantages[scored],
                mask,
                old_logprobs=_known(old, mask, logprobs) if use_old else None,
                structural=row.structural[scored],
                clip=c.clip,
                aggregation=c.aggregation,
                sample_index=row.sample_index[scored],
                normalizer=normalizer,
                ref_logprobs=reference,
                kl_coef=c.kl_coef,
            )
            if not torch.isfinite(out.loss):
                bad = 1.0
                if not self.sharded:
                    break
                # the gradient is discarded below; the backward keeps the collectives in step
                (logprobs.sum() * 0.0).backward()
                continue
            out.loss.backward()
            total_loss += float(out.loss.detach())
            entropy_sum += float((entropy.detach() * mask).sum())
            clipped += out.stats.get("clip_fraction", 0.0) * float(mask.sum())
            kl += out.stats.get("kl", 0.0)
            if mask.any() and not torch.isnan(old[mask]).any():
                gap = max(gap, float((logprobs.detach()[mask] - old[mask]).abs().max()))
        if world.sum(bad):
            self.optimizer.zero_grad(set_to_none=True)
            return {"skipped": "non-finite loss"}
        if not self.sharded:  # FSDP2's reduce-scatter has already summed the gradients
            world.all_reduce_grads(self.model)
        # on DTensor gradients this is the global norm
        grad_norm = float(
            torch.nn.utils.clip_grad_norm_(
                [p for p in self.model.parameters() if p.requires_grad], c.max_grad_norm
            )
        )
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            return {"skipped": "non-finite gradient"}
        self.optimizer.step()
        if self.replica is not None:
            distributed.gather_full_weights(self.model, self.replica)
        tokens = world.sum(local_tokens)
        return {
            "loss": world.sum(total_loss),
            "grad_norm": grad_norm,
            "trained_tokens": int(tokens),
            "entropy_sum": world.sum(entropy_sum),
            "logprob_gap": max(world.gather(gap)),
            "clip_fraction": world.sum(clipped) / max(tokens, 1.0),
            "kl": world.sum(kl),
            "rows": int(world.sum(len(rows))),
            **({"padding_rows": int(world.sum(passes - len(rows)))} if self.sharded else {}),
            "skipped": None,
        }

    def _row_logprobs(
        self, row: PackedRow, temperature: float
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.sharded_forward is not None:
            return self.sharded_forward(row, temperature, with_entropy=True)
        return row_logprobs(self.model, row, temperature=temperature, with_entropy=True)

    def _skip(self, reason: str) -> dict[str, Any]:
        with warnings.catch_warnings():  # no optimizer step was taken, on purpose
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()  # the schedule follows steps, taken or skipped
        return {
            "loss": None,
            "grad_norm": None,
            "lr": self.scheduler.get_last_lr()[0],
            "skipped": reason,
            "skipped_steps": self.skipped,
        }


# -- helpers -------------------------------------------------------------------------------------
def _padding_row(tokenizer) -> PackedRow:
    """A two-token row (one scored position) for the padding passes of sharded training."""
    token = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    graph = ng.parse([token], tokenizer=tokenizer, prompt_ids=[token], lenient=True)
    return pack([graph], [None], max_tokens=16)[0]


def _check_sampled_prompts(traces: list[Trace], template: PromptTemplate, data: str) -> bool | None:
    """Refuse SFT on prompts other than those ``npr sample`` wrote its traces for (a response
    answers the prompt it was sampled with); returns whether they were chat-wrapped (None:
    unknown, traces from elsewhere)."""
    recorded = {trace.sampled_with for trace in traces if trace.sampled_with is not None}
    if not recorded:
        return None
    if len({(digest, chat) for _, digest, chat in recorded}) > 1:
        names = sorted({name for name, _, _ in recorded})
        raise ValueError(
            f"{data}: its traces were sampled with different prompts ({', '.join(names)}, or "
            "with and without the chat template); train on one sampling run's traces at a time"
        )
    name = min(name for name, _, _ in recorded)
    _, digest, chat = next(iter(recorded))
    if digest != template.digest:
        raise ValueError(
            f"{data}: its traces answered prompt template {name!r}, and this run's prompt_template "
            f"is {template.name!r} (another text): set prompt_template = {name!r} (or drop the "
            "traces' prompt_template field to train on other prompts on purpose)"
        )
    return chat


def _template(value: str) -> PromptTemplate:
    """A literal template holding ``{problem}``, a built-in name (npr, multiverse, cot) or a file."""
    if PLACEHOLDER in value:
        return PromptTemplate("inline", value, None)
    return load_template(value)


def _known(old: torch.Tensor, mask: torch.Tensor, current: torch.Tensor) -> torch.Tensor | None:
    """The engine's log-probs where the loss reads them, or None when one of those is unknown
    (SFT traces were not sampled). Outside the loss they may be unknown (engine-written tokens a
    hard cut left unscored): there the current ones stand in, so the ratio there is 1."""
    if torch.isnan(old[mask]).any():
        return None
    return torch.where(mask, old, current.detach())


def _structurally_valid(graph: ng.ReasoningGraph) -> bool:
    """No structural violation (the lenient profile) and no fork the engine had to refuse."""
    if graph.metadata.get("engine_violations"):
        return False
    return not ng.validate(graph, "lenient")


def _shape(graph: ng.ReasoningGraph) -> dict[str, Any]:
    m = ng.metrics(graph)
    return {
        "parallel": m["is_parallel"],
        "widths": m["widths"],
        "format_valid": ng.format_valid(graph),
        "tokens": m["total_tokens"],
    }


def _keep_informative_groups(everything: list[tuple], kept: list[bool]) -> list[bool]:
    """DAPO dynamic sampling: drop every group whose kept rewards are all equal."""
    scores: dict[int, set[float]] = {}
    for (group, score, *_), keep in zip(everything, kept, strict=True):
        if keep:
            scores.setdefault(group, set()).add(score)
    return [
        keep and len(scores[group]) > 1 for (group, *_), keep in zip(everything, kept, strict=True)
    ]


def _rollout_metrics(everything, shapes, dropped, filtered, gathered, config) -> dict[str, Any]:
    count = max(len(everything), 1)
    widths = [w for s in shapes for w in s["widths"]]
    tokens = sum(s["tokens"] for s in shapes)
    wall = max((w for _, w, _ in gathered), default=0.0)
    return {
        "rollouts": len(everything),
        "reward": sum(s[1] for s in everything) / count,
        "accuracy": sum(1 for s in everything if s[3]) / count,
        "format_valid_rate": sum(1 for s in shapes if s["format_valid"]) / count,
        "dropped_rollouts": dropped,
        "filtered_rollouts": filtered,
        "parallel_rate": sum(1 for s in shapes if s["parallel"]) / count,
        "mean_width": sum(widths) / len(widths) if widths else 0.0,
        "rollout_tokens": tokens,
        "rollout_tokens_per_s": tokens / wall if wall > 0 else 0.0,
    }


def _eval_metrics(outcomes: list[tuple], samples: int, seconds: float) -> dict[str, Any]:
    """``eval_*`` metrics of the held-out samples ``(problem id, correct, cut, shape)``."""
    count = max(len(outcomes), 1)
    widths = [w for *_, shape in outcomes for w in shape["widths"]]
    solved: dict[str, bool] = {}
    for problem, correct, *_ in outcomes:
        solved[problem] = solved.get(problem, False) or correct
    metrics = {
        "eval_problems": len(solved),
        "eval_accuracy": sum(correct for _, correct, *_ in outcomes) / count,
        "eval_format_valid_rate": sum(s["format_valid"] for *_, s in outcomes) / count,
        "eval_parallel_rate": sum(s["parallel"] for *_, s in outcomes) / count,
        "eval_mean_width": sum(widths) / len(widths) if widths else 0.0,
        "eval_tokens": sum(s["tokens"] for *_, s in outcomes) / count,
        "eval_pool_cut": sum(cut for _, _, cut, _ in outcomes),
        "eval_time_s": seconds,
    }
    if samples > 1:
        metrics[f"eval_pass@{samples}"] = sum(solved.values()) / max(len(solved), 1)
    return metrics


# Settings a resumed run may change: they decide what is logged, evaluated, where and how long
# the run goes, or the resources it takes, not what a step computes.
RESUMABLE_CHANGES = frozenset(
    {
        "steps", "epochs", "log_every", "save_every", "rollouts_every", "tensorboard",
        "eval_data", "eval_prompt_field", "eval_answer_field", "eval_every", "eval_samples",
        "eval_temperature", "output_dir", "device", "sharding", "kv_pages", "row_tokens",
        "cuda_graphs", "overlap",
    }
)  # fmt: skip


def _check_resumed_settings(path: Path, before: Any, config: TrainConfig) -> None:
    """Refuse a resume whose settings change what a step computes (the learning rate would be
    the checkpoint's anyway: its scheduler state comes back), naming each change."""
    if not isinstance(before, dict):
        return  # a checkpoint that did not record them
    now = json.loads(json.dumps(config.to_dict()))
    changes = setting_changes(before, now, (before.keys() & now.keys()) - RESUMABLE_CHANGES)
    if changes:
        raise ValueError(
            f"{path} was trained with other settings ({changes}): resume with those, or "
            "train into another output_dir"
        )


def _check_fresh_output(config: TrainConfig, resume: bool) -> None:
    """A run that does not resume must not append its steps to another run's logs."""
    output = Path(config.output_dir)
    if resume:
        return
    done = checkpoint.latest(output / "checkpoints")
    metrics = output / "metrics.jsonl"
    if done is not None or (metrics.is_file() and metrics.stat().st_size):
        held = f"checkpoints up to {done.name}" if done is not None else "a metrics log"
        raise ValueError(
            f"{output} holds a run ({held}): --resume to go on with it, or train into another "
            "output_dir"
        )


def run(
    config: TrainConfig, resume: bool = False, console: Console | None = None
) -> list[dict[str, Any]]:
    """Build a trainer for ``config`` and train (what ``npr train`` runs)."""
    _check_fresh_output(config, resume)
    trainer = Trainer(config, console=console)
    if trainer.world.is_main:
        trainer.output_dir.mkdir(parents=True, exist_ok=True)
        (trainer.output_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=1))
    return trainer.train(resume=resume)
