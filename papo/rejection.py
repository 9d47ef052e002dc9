"""NPR-Beta data: rejection sampling from an NPR-Zero model.

For each problem the model samples up to ``tries`` trajectories (as one group of ``n = tries``
samples sharing the prompt's KV, which gives the same samples as trying one after another with
per-sample seeds); the first, in sample order, that the model ended itself (finish reason
``stop``: SFT appends the end-of-sequence token, so a trace its budget, the context or the KV
pool cut would teach stopping there), whose answer is correct and whose format passes
(:func:`npr_graph.format_valid`: an NPR format score of exactly 0, or a Multiverse trace without
strict violations, by the engine's grammar) is kept. Problems without an accepted trajectory are
counted, not written.

Under ``torchrun`` (``npr sample``) the ranks share the problems: each claims the next
one it has room for, writes what it finished to a part file of its own, and rank 0 folds the
parts into the log as the ranks end (and, after a kill, as the next run starts).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from npr_graph.constraints import format_valid
from npr_graph.engine.engine import Engine, PromptError, wraps_in_chat
from npr_graph.engine.sampling import SamplingParams
from npr_graph.graph import FinishReason
from npr_graph.prompts import PromptTemplate
from npr_graph.typecheck import has_shape, setting_changes

from .problems import Problem
from .rewards import get as get_reward


@dataclass(frozen=True)
class Outcome:
    """How one problem went: its samples and their grades, and the try whose trace was kept
    (None: none was)."""

    id: str
    samples: int
    correct: int
    format_valid: int
    pool_cut: int  # samples the engine ended for want of KV pages (kv_exhausted)
    tries: int | None
    unfinished: int = 0  # samples the model did not end (budget, context, KV pool): not kept
    problem_key: str | None = None  # Problem.key: what the id named when it was sampled


OUTCOME_SHAPE = {
    "id": str,
    "samples": int,
    "correct": int,
    "format_valid": int,
    "pool_cut": int,
    "tries": (int, type(None)),
    "unfinished": int,
    "problem_key": (str, type(None)),
}
# Fields a log written before they existed lacks, and their value there.
OUTCOME_BEFORE = {"unfinished": 0, "problem_key": None}


@dataclass
class SamplingReport:
    problems: int = 0
    accepted: int = 0
    samples: int = 0
    correct: int = 0
    format_valid: int = 0
    tries_used: list[int] = field(default_factory=list)
    pool_cut: int = 0  # samples the engine ended for want of KV pages (kv_exhausted)
    unfinished: int = 0  # samples the model did not end (budget, context, KV pool)
    not_run: dict[str, str] = field(default_factory=dict)  # problem id: why the engine could not

    def add(self, outcome: Outcome) -> None:
        self.problems += 1
        self.samples += outcome.samples
        self.correct += outcome.correct
        self.format_valid += outcome.format_valid
        self.pool_cut += outcome.pool_cut
        self.unfinished += outcome.unfinished
        if outcome.tries is not None:
            self.accepted += 1
            self.tries_used.append(outcome.tries)

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
            "unfinished_samples": self.unfinished,
            "not_run": [f"problem {key}: {why}" for key, why in self.not_run.items()],
        }


def ended_by_model(graph: Any) -> bool:
    """Whether the model ended the sample (finish reason ``stop``), not its budget, the context
    or the KV pool: only such a sample is kept."""
    return graph.metadata.get("finish_reason") == FinishReason.STOP


def strip_eos(text: str, eos: str | None) -> str:
    if eos and text.endswith(eos):
        return text[: -len(eos)]
    return text


def response_without_eos(graph: Any, eos_ids: Iterable[int], eos: str | None) -> str:
    """The response's text without the end-of-sequence token the model stopped with: by its id
    when the graph is tokenized (a model may stop on several, ``<|endoftext|>`` and
    ``<|im_end|>`` say), else by the tokenizer's EOS text."""
    ids, offsets = graph.token_ids, graph.token_offsets
    if ids and offsets and len(ids) > graph.prompt_num_tokens and ids[-1] in set(eos_ids):
        return graph.text[graph.response_start : max(offsets[-2], graph.response_start)]
    return strip_eos(graph.response_text, eos)


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
    on_problem: Callable[[Outcome, dict[str, Any] | None], None] | None = None,
    indices: Sequence[int] | None = None,
    claim: Callable[[int], bool] | None = None,
    reward: str = "accuracy",
) -> tuple[list[dict[str, Any]], SamplingReport]:
    """Accepted ``{"id", "prompt", "response", "answer", "tries"}`` records in problem order,
    and the counts; each record also names the prompt its response answered (``prompt_template``,
    ``prompt_digest`` of the template's text, ``chat``: whether the chat template wrapped it),
    which ``npr train sft`` checks against its own. ``params.n`` is the number of tries per
    problem. All problems go through one engine call, ``batch`` decoding at once, the next
    admitted as soon as one ends; as each problem ends, ``on_problem`` gets its outcome and
    accepted record (or None) and ``on_record`` the accepted record. A problem the engine
    cannot run (too long for the model's context or the KV pool) is reported, and the others
    go ahead.

    ``indices``: each problem's place in its dataset (default: in ``problems``). A seeded
    problem samples with ``params.seed`` plus its index, so that problems draw noise of their
    own and a resumed run samples what a whole one would.

    ``claim(index)``, asked with that index as a problem would be admitted: False skips the
    problem (another rank runs it). ``reward``: the registered reward whose ``correct`` decides
    (:mod:`papo.rewards`)."""
    grade = get_reward(reward)
    eos = getattr(engine.tokenizer, "eos_token", None)
    eos_ids = getattr(engine, "eos_ids", ())
    # the prompt each trace answered, for SFT to check it trains on the same
    sampled_with = {
        "prompt_template": template.name,
        "prompt_digest": template.digest,
        "chat": wraps_in_chat(engine.tokenizer, chat),
    }
    report = SamplingReport()
    accepted = []
    indices = range(len(problems)) if indices is None else indices
    if len(indices) != len(problems):
        raise ValueError("give one index per problem")
    ready, prompts, per_problem = [], [], []
    for problem, index in zip(problems, indices, strict=True):
        prompt = template.render(problem.prompt)
        seed = None if params.seed is None else params.seed + index
        problem_params = dataclasses.replace(params, seed=seed)
        try:
            engine.check_prompt(prompt, problem_params, chat)
        except PromptError as error:
            report.not_run[problem.id] = str(error)
            continue
        ready.append((index, problem))
        prompts.append(prompt)
        per_problem.append(problem_params)

    def judge(index: int, graphs: list) -> None:
        problem = ready[index][1]
        chosen = None
        correct = valid = cut = unfinished = 0
        samples = sorted(graphs, key=lambda g: g.metadata["sample_index"])
        for tries, graph in enumerate(samples, start=1):
            response = response_without_eos(graph, eos_ids, eos)
            right = grade(response, problem.answer).correct
            well_formed = format_valid(graph)
            ended = ended_by_model(graph)
            correct += right
            valid += well_formed
            cut += graph.metadata.get("finish_reason") == FinishReason.KV_EXHAUSTED
            unfinished += not ended
            if chosen is None and ended and right and well_formed:
                chosen = {
                    "id": problem.id,
                    "prompt": problem.prompt,
                    "response": response,
                    "answer": problem.answer,
                    "tries": tries,
                    **sampled_with,
                }
        outcome = Outcome(
            problem.id,
            len(samples),
            correct,
            valid,
            cut,
            chosen["tries"] if chosen else None,
            unfinished,
            problem.key,
        )
        report.add(outcome)
        if on_problem is not None:
            on_problem(outcome, chosen)
        if chosen is not None:
            accepted.append((index, chosen))
            if on_record is not None:
                on_record(chosen)

    if ready:
        engine.generate(
            prompts,
            per_problem,
            mode=mode,
            chat=chat,
            max_running=batch,
            on_finish=judge,
            claim=None if claim is None else lambda i: claim(ready[i][0]),
        )
    return [record for _, record in sorted(accepted, key=lambda pair: pair[0])], report


def write_jsonl(path: str | Path, records: list[dict[str, Any]]) -> None:
    Path(path).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def progress_path(out: Path) -> Path:
    """Where ``npr sample`` logs each finished problem, beside its traces."""
    return out.with_name(out.stem + ".progress.jsonl")


def part_paths(out: Path) -> list[Path]:
    """The part files of ranks under torchrun, beside ``out`` (:class:`SamplePart`)."""
    return sorted(out.parent.glob(glob.escape(out.stem) + ".part-*.jsonl"))


def claims_path(out: Path) -> Path:
    """Where ranks under torchrun claim problems (:class:`~npr_graph.ranks.Claims`)."""
    return out.with_name(out.stem + ".claims")


PART_SHAPE = {
    "outcome": OUTCOME_SHAPE,
    "trace": ({"id": str, "prompt": str, "response": str}, type(None)),
}
# Settings a log written before they existed was sampled with.
SETTINGS_BEFORE = {"reward": "accuracy", "chat": None}


class SamplePart:
    """What one rank under torchrun finished: a line per problem (its outcome and accepted
    trace or null) in one write, fsynced, so a kill leaves whole problems and at most a cut
    last line. Rank 0 folds the parts into the log (:meth:`SampleLog.absorb_parts`)."""

    def __init__(self, out: Path, rank: int) -> None:
        self.path = out.with_name(f"{out.stem}.part-{rank}-{uuid.uuid4().hex[:12]}.jsonl")
        self._handle = None

    def write(self, outcome: Outcome, trace: dict[str, Any] | None) -> None:
        if self._handle is None:
            self._handle = self.path.open("a", encoding="utf-8")
        line = json.dumps({"outcome": asdict(outcome), "trace": trace}, ensure_ascii=False)
        self._handle.write(line + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()

    def __enter__(self) -> SamplePart:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _whole_lines(path: Path) -> list[str]:
    """The file's complete lines. A last line a kill cut short (no newline) is cut off the
    file, so that what is appended next starts a line of its own."""
    data = path.read_bytes()
    whole = data.rfind(b"\n") + 1
    if whole < len(data):
        with path.open("r+b") as handle:
            handle.truncate(whole)
    text = data[:whole].decode("utf-8", errors="replace")
    return [line for line in text.split("\n") if line.strip()]


def _json_line(path: Path, number: int, line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{number}: not JSON ({error.msg})") from error


class SampleLog:
    """What ``npr sample`` writes: the accepted traces (``out``, for ``npr train sft``) and,
    beside them (:func:`progress_path`), the settings and then a line per finished problem.
    Running the same command again reads both and goes on with the problems not done; other
    settings are refused (another ``--limit`` or ``--batch`` is fine). A problem is logged
    before its trace is written, so a kill between the two leaves it logged as accepted with
    no trace: it is sampled again, and its last line counts."""

    def __init__(self, out: Path, settings: dict[str, Any]):
        self.out, self.progress = out, progress_path(out)
        self.outcomes: dict[str, Outcome] = {}
        self.resumed = self.progress.exists()
        self.traced: set[str] = set()  # ids of the traces in out
        if self.resumed:
            self._read_progress(settings)
            if self.out.exists():
                for number, line in enumerate(_whole_lines(self.out), start=1):
                    trace = _json_line(self.out, number, line)
                    if isinstance(trace, dict) and isinstance(trace.get("id"), str):
                        self.traced.add(trace["id"])
        elif self.out.exists() and self.out.stat().st_size:
            raise ValueError(
                f"{out} exists with no {self.progress.name} beside it to resume from: "
                "remove it or choose another --out"
            )
        self.settings = settings
        # done: rejected, or accepted with the trace on disk
        self.done = self.traced | {key for key, o in self.outcomes.items() if o.tries is None}
        self._traces = self._log = None

    def start(self) -> None:
        """Open both files to append to (creating them with the settings line on a first run):
        only once there is something to write, so a model that fails to load leaves none."""
        if self._log is not None:
            return
        if not self.resumed:
            self.out.write_text("")
            self.progress.write_text(json.dumps({"settings": self.settings}) + "\n")
        self._traces = self.out.open("a", encoding="utf-8")
        self._log = self.progress.open("a", encoding="utf-8")

    def _read_progress(self, settings: dict[str, Any]) -> None:
        lines = _whole_lines(self.progress)
        head = _json_line(self.progress, 1, lines[0]) if lines else None
        if not isinstance(head, dict) or not isinstance(head.get("settings"), dict):
            raise ValueError(
                f"{self.progress}: no settings line; remove it and {self.out.name} to start afresh"
            )
        before = head["settings"]
        before.update(
            {k: v for k, v in SETTINGS_BEFORE.items() if k not in before and k in settings}
        )
        changes = setting_changes(before, settings, before.keys() | settings.keys())
        if changes:
            raise ValueError(
                f"{self.out} was sampled with other settings ({changes}): rerun with those to "
                "resume, or choose another --out"
            )
        for number, line in enumerate(lines[1:], start=2):
            record = _json_line(self.progress, number, line)
            if isinstance(record, dict):
                record = {**OUTCOME_BEFORE, **record}
            if not has_shape(record, OUTCOME_SHAPE):
                raise ValueError(f"{self.progress}:{number}: not a problem's outcome")
            self.outcomes[record["id"]] = Outcome(**{k: record[k] for k in OUTCOME_SHAPE})

    def write(self, outcome: Outcome, trace: dict[str, Any] | None) -> None:
        """Log ``outcome``, then append ``trace``; each is on disk before this returns."""
        if self._log is None:
            raise RuntimeError("SampleLog.start() first")
        for handle, record in ((self._log, asdict(outcome)), (self._traces, trace)):
            if record is not None:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
        self.outcomes[outcome.id] = outcome
        self.done.add(outcome.id)
        if trace is not None:
            self.traced.add(trace["id"])

    def absorb_parts(self) -> int:
        """Fold the ranks' part files into the log, then remove them; returns how many problems
        they held. A trace already in ``out`` is not written again (a kill may have stopped an
        earlier fold between the log and the part's removal)."""
        parts = part_paths(self.out)
        if parts and not self.progress.exists():
            raise ValueError(
                f"{parts[0].name} has no {self.progress.name} beside it to resume from: remove "
                "the part files, or choose another --out"
            )
        absorbed = 0
        for part in parts:
            records = [
                _json_line(part, number, line)
                for number, line in enumerate(_whole_lines(part), start=1)
            ]
            for number, record in enumerate(records, start=1):
                if isinstance(record, dict) and isinstance(record.get("outcome"), dict):
                    record["outcome"] = {**OUTCOME_BEFORE, **record["outcome"]}
                if not has_shape(record, PART_SHAPE):
                    raise ValueError(f"{part}:{number}: not a problem's outcome and trace")
            if records:
                self.start()
            for record in records:
                outcome = Outcome(**{k: record["outcome"][k] for k in OUTCOME_SHAPE})
                trace = record["trace"]
                self.write(outcome, None if trace and trace["id"] in self.traced else trace)
                absorbed += 1
            part.unlink()
        return absorbed

    def report(self, ids: Iterable[str], not_run: dict[str, str]) -> SamplingReport:
        """The counts over the problems ``ids`` that are done, this run's or earlier ones; of
        ``not_run``, those not done (another rank, with more room, may have run one)."""
        report = SamplingReport(
            not_run={k: why for k, why in not_run.items() if k not in self.done}
        )
        for key in ids:
            if key in self.done and key in self.outcomes:
                report.add(self.outcomes[key])
        return report

    def close(self) -> None:
        for handle in (self._traces, self._log):
            if handle is not None:
                handle.close()

    def __enter__(self) -> SampleLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
