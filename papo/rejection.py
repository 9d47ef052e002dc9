"""NPR-Beta data: rejection sampling from an NPR-Zero model.

For each problem the model samples up to ``tries`` trajectories (as one group of ``n = tries``
samples sharing the prompt's KV, which gives the same samples as trying one after another with
per-sample seeds); the first, in sample order, whose answer is correct and whose format passes
(:func:`npr_graph.format_valid`: an NPR format score of exactly 0, or a Multiverse trace without
strict violations, by the engine's grammar) is kept. Problems without an accepted trajectory are
counted, not written.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from npr_graph.constraints import format_valid
from npr_graph.engine.engine import Engine, PromptError
from npr_graph.engine.sampling import SamplingParams
from npr_graph.prompts import PromptTemplate

from .problems import Problem
from .rewards import get as get_reward


@dataclass
class SamplingReport:
    problems: int = 0
    accepted: int = 0
    samples: int = 0
    correct: int = 0
    format_valid: int = 0
    tries_used: list[int] = field(default_factory=list)
    pool_cut: int = 0  # samples the engine ended for want of KV pages (kv_exhausted)
    not_run: list[str] = field(default_factory=list)  # problems the engine could not run, why

    def to_dict(self) -> dict[str, Any]:
        return {
            "problems": self.problems,
            "accepted": self.accepted,
            "acceptance_rate": self.accepted / self.problems if self.problems else 0.0,
            "samples": self.samples,
            "correct_rate": self.correct / self.samples if self.samples else 0.0,
            "format_valid_rate": self.format_valid / self.samples if self.samples else 0.0,
            "mean_tries": sum(self.tries_used) / len(self.tries_used) if self.tries_used else 0.0,
            "pool_cut_samples": self.pool_cut,
            "not_run": list(self.not_run),
        }


def strip_eos(text: str, eos: str | None) -> str:
    if eos and text.endswith(eos):
        return text[: -len(eos)]
    return text


def rejection_sample(
    engine: Engine,
    problems: list[Problem],
    template: PromptTemplate,
    params: SamplingParams,
    *,
    mode: str = "sequential",
    chat: bool | None = None,
    batch: int = 8,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[list[dict[str, Any]], SamplingReport]:
    """Accepted ``{"id", "prompt", "response", "answer", "tries"}`` records in problem order,
    and the counts. ``params.n`` is the number of tries per problem. All problems go through one
    engine call, ``batch`` decoding at once, the next admitted as soon as one ends; ``on_record``
    gets each accepted record as soon as its problem ends. A problem the engine cannot run (too
    long for the model's context or the KV pool) is reported, and the others go ahead."""
    accuracy = get_reward("accuracy")
    eos = getattr(engine.tokenizer, "eos_token", None)
    report = SamplingReport()
    accepted = []
    ready, prompts = [], []
    for problem in problems:
        prompt = template.render(problem.prompt)
        try:
            engine.check_prompt(prompt, params, chat)
        except PromptError as error:
            report.not_run.append(f"problem {problem.id}: {error}")
            continue
        ready.append(problem)
        prompts.append(prompt)

    def judge(index: int, graphs: list) -> None:
        problem = ready[index]
        report.problems += 1
        chosen = None
        samples = sorted(graphs, key=lambda g: g.metadata["sample_index"])
        for tries, graph in enumerate(samples, start=1):
            response = strip_eos(graph.response_text, eos)
            correct = accuracy(response, problem.answer).correct
            valid = format_valid(graph)
            report.samples += 1
            report.pool_cut += graph.metadata.get("finish_reason") == "kv_exhausted"
            report.correct += correct
            report.format_valid += valid
            if chosen is None and correct and valid:
                chosen = {
                    "id": problem.id,
                    "prompt": problem.prompt,
                    "response": response,
                    "answer": problem.answer,
                    "tries": tries,
                }
        if chosen is not None:
            report.accepted += 1
            report.tries_used.append(chosen["tries"])
            accepted.append((index, chosen))
            if on_record is not None:
                on_record(chosen)

    if ready:
        engine.generate(prompts, params, mode=mode, chat=chat, max_running=batch, on_finish=judge)
    return [record for _, record in sorted(accepted, key=lambda pair: pair[0])], report


def write_jsonl(path: str | Path, records: list[dict[str, Any]]) -> None:
    Path(path).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
