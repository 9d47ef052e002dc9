"""``npr eval``: accuracy, parallelism and speed of a model on a problem set.

Per problem, the engine decodes ``n`` samples in one call (they share the prompt's KV); each
sample's answer is checked with the training reward code (:mod:`papo.rewards`), its graph measured
(:func:`npr_graph.metrics`), and the ``n`` lines are appended to a part file in one write and
fsynced. A run that stops (killed, crashed) is resumed by running the same command again:
problems whose ``n`` samples are all on disk are skipped, partial ones are redone, and the final
merge keeps exactly one complete group per problem. With ``--baseline sequential`` every problem is
decoded a second time in sequential mode, for the speedup.

Under ``torchrun --nproc_per_node N`` each rank builds its own engine (GPU ``LOCAL_RANK`` when
CUDA is present) and the ranks share the unfinished problems: a rank with room for the next
problem claims it (a file created in ``DIR/claims``, which exactly one rank can create), so a
rank whose problems run short takes more of them; rank 0 merges the ranks' part files
into ``samples.jsonl`` and writes ``summary.json`` and ``report.md``. The summary is computed from
the merged sample lines alone, so it has the same schema as a single-process run.

Output (``--out DIR``): ``config.json`` (the settings a resumed run must match), ``samples.jsonl``
(one line per sample: problem id, graph dict, extracted answer, correct, metrics),
``summary.json`` and ``report.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .graph import FinishReason, ReasoningGraph
from .ranks import Claims, PeerLost, Ranks, joined_ranks, rank_label
from .typecheck import has_shape, setting_changes

if TYPE_CHECKING:
    import torch

PROBLEM_FIELDS = ("problem", "question", "prompt")
ANSWER_FIELDS = ("answer", "final_answer", "solution")
ID_FIELDS = ("id", "unique_id", "problem_id", "idx", "problem_idx")  # problem_idx: HMMT
MODES = {"parallel": "free", "constrained": "constrained", "sequential": "sequential"}
SUMMARY_KEYS = (
    "avg_at_n",
    "pass_at_k",
    "best_at_n",
    "maj_at_n",
    "format_valid_rate",
    "parallel_rate",
    "mean_width",
    "tokens_per_s",
    "speedup_vs_sequential",
    "n",
    "problems",
)
#: Settings that change what a sample is; a resumed run must agree on all of them.
RUN_IDENTITY = (
    "model",
    "data",
    "n",
    "mode",
    "prompt",
    "prompt_digest",
    "baseline",
    "reward",
    "fields",
    "chat",
    "dtype",
    "tags",
    "sampling",
)
SAMPLES = "samples.jsonl"
PART_GLOB = "samples.part-*.jsonl"
CLAIMS = "claims"  # under torchrun: a file per problem a rank took


class EvalError(Exception):
    """A problem with the inputs or the output directory; the message says which."""


# --------------------------------------------------------------------------------------------------
# problems


@dataclass
class Problem:
    """``index``: position in the data file (the sampling seed derives from it); ``id``: the
    record's id field, else the index as text."""

    index: int
    id: str
    question: str
    reference: str

    @property
    def key(self) -> str:
        return problem_key(self.question, self.reference)


def problem_key(question: str, reference: str) -> str:
    """A short digest of a problem's question and reference, logged with its results: a resumed
    run checks that each id still names the problem it did (a line added to the data file
    shifts the ids that are line numbers)."""
    digest = hashlib.sha256(json.dumps([question, reference]).encode("utf-8", "surrogatepass"))
    return digest.hexdigest()[:16]


def changed_problems(
    keys: dict[str, str | None], problems: Iterable[tuple[str, str]], data: str, out: Path
) -> str | None:
    """Why a resumed run cannot go on, or None: ``keys`` (problem id: its logged
    :func:`problem_key`; None for a log written before keys were) against ``problems`` (id and
    key now)."""
    changed = [pid for pid, key in problems if keys.get(pid) not in (None, key)]
    if not changed:
        return None
    shown = ", ".join(repr(pid) for pid in changed[:3]) + (" ..." if len(changed) > 3 else "")
    return (
        f"{data}: {len(changed)} problem(s) ({shown}) are not the ones {out} holds under their "
        "ids (the data changed); write this run to another output"
    )


# JSON can escape half of a surrogate pair ("\ud800", as JavaScript writes an emoji it cut in
# two); such a string cannot be written as UTF-8, so printing or tokenizing it fails.
LONE_SURROGATE = re.compile("[\ud800-\udfff]")
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def json_lines(text: str) -> list[str]:
    """Lines of a JSONL text. Not ``str.splitlines``: that also cuts at U+2028, U+2029 and
    U+0085, which JSON strings hold raw (samples are written with ``ensure_ascii=False``)."""
    return text.split("\n")


UNREADABLE = object()  # a JSONL line that is not JSON, where read_records(holes=True) yields one


def read_records(path: Path, errors: list[str], holes: bool = False) -> Iterator[tuple[str, Any]]:
    """(where, record) for each record of a .json, .jsonl or .parquet file; bad lines -> errors,
    and with ``holes`` also ``(where, UNREADABLE)``, so that counting records counts them."""
    if not path.is_file():
        raise EvalError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as error:
            raise EvalError(
                f"{path}: reading .parquet needs pyarrow (pip install pyarrow)"
            ) from error
        try:
            table = pq.read_table(path)
        except Exception as error:
            raise EvalError(f"{path}: not a readable parquet file ({error})") from error
        for number, record in enumerate(table.to_pylist(), start=1):
            yield f"{path}:row {number}", record
        return
    try:
        text = path.read_text("utf-8-sig", errors="replace")
    except OSError as error:
        raise EvalError(f"{path}: {error.strerror or error}") from error
    if suffix == ".jsonl":
        for number, line in enumerate(json_lines(text), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError) as error:  # also too many digits, too deep
                errors.append(f"{path}:{number}: not JSON ({_json_error(error)})")
                if holes:
                    yield f"{path}:{number}", UNREADABLE
                continue
            if SURROGATE_ESCAPE.search(line) and _refused_for_surrogate(
                f"{path}:{number}", record, errors
            ):
                if holes:
                    yield f"{path}:{number}", UNREADABLE
                continue
            yield f"{path}:{number}", record
        return
    if suffix != ".json":
        raise EvalError(f"{path}: expected a .json, .jsonl or .parquet file")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as error:
        line = f":{error.lineno}" if isinstance(error, json.JSONDecodeError) else ""
        raise EvalError(f"{path}{line}: not JSON ({_json_error(error)})") from error
    if isinstance(data, dict):  # {"data": [...]} and similar wrappers
        lists = [value for value in data.values() if isinstance(value, list)]
        if len(lists) != 1:
            raise EvalError(f"{path}: expected a list of problems (or an object holding one list)")
        data = lists[0]
    if not isinstance(data, list):
        raise EvalError(f"{path}: expected a list of problems")
    escaped = SURROGATE_ESCAPE.search(text) is not None  # else no record needs the check
    for number, record in enumerate(data, start=1):
        if escaped and _refused_for_surrogate(f"{path}: item {number}", record, errors):
            if holes:
                yield f"{path}: item {number}", UNREADABLE
            continue
        yield f"{path}: item {number}", record


def _refused_for_surrogate(where: str, record: Any, errors: list[str]) -> bool:
    """Whether the record's strings (keys too) hold a lone surrogate; if so, an error says so."""
    found = LONE_SURROGATE.search(json.dumps(record, ensure_ascii=False))
    if found:
        errors.append(
            f"{where}: holds a lone surrogate ({ascii(found.group())[1:-1]}: half of a UTF-16 "
            "pair, as a cut emoji leaves), which is not text"
        )
    return found is not None


def _json_error(error: Exception) -> str:
    if isinstance(error, json.JSONDecodeError):
        return error.msg
    return "nested too deeply" if isinstance(error, RecursionError) else str(error)


def _reference(answer: Any) -> str | None:
    """A reference answer as text: strings as they are, numbers written out in full (JSON's
    ``1e-05`` is ``0.00001``, which math-verify reads); None for anything else."""
    if isinstance(answer, str):
        return answer
    if isinstance(answer, int) and not isinstance(answer, bool):
        return str(answer)
    if isinstance(answer, float) and math.isfinite(answer):
        text = format(Decimal(repr(answer)), "f")
        return text[:-2] if text.endswith(".0") else text
    return None


def _pick(record: dict[str, Any], override: str | None, names: Sequence[str]) -> tuple[str, Any]:
    for name in [override] if override else names:
        value = record.get(name)
        if value is not None and (not isinstance(value, str) or value.strip()):
            return name, value
    return "", None


def problem_text(record: Any, field: str | None = None) -> str | None:
    """A record's question: ``field``, else the first of ``problem``/``question``/``prompt``
    present; None when the record is not an object or the question is not text."""
    if not isinstance(record, dict):
        return None
    _, question = _pick(record, field, PROBLEM_FIELDS)
    return question if isinstance(question, str) else None


def load_problems(
    path: str | os.PathLike[str],
    *,
    fields: dict[str, str] | None = None,
    limit: int | None = None,
    rename_duplicates: bool = True,
) -> tuple[list[Problem], list[str]]:
    """Problems of a data file and the errors met reading it (``"file:line: why"``).

    The question is read from the first of ``problem``/``question``/``prompt`` present, the
    reference from ``answer``/``final_answer``, else from the last box of ``solution`` (read as
    the reward reads answers, :func:`papo.rewards.extract_answer`);
    ``fields`` (keys ``problem``, ``answer``, ``id``) names other fields. A record without a
    question or a reference is reported and skipped; ``limit`` keeps the first valid problems.
    A repeated id is reported and, with ``rename_duplicates``, the later problem goes on as
    ``id#index`` (a caller that stops on errors asks for no renaming: the message names none).
    Raises :class:`EvalError` when the file cannot be read at all.
    """
    from papo.rewards import extract_answer

    fields = fields or {}
    errors: list[str] = []
    problems: list[Problem] = []
    seen: set[str] = set()
    # a line that is not JSON keeps its place: the ids and seeds after it stay as they are
    # when it is fixed (a resumed run checks that ids name the same problems)
    for index, (where, record) in enumerate(read_records(Path(path), errors, holes=True)):
        if limit is not None and len(problems) >= limit:
            break
        if record is UNREADABLE:
            continue
        if not isinstance(record, dict):
            errors.append(f"{where}: not an object")
            continue
        question = problem_text(record, fields.get("problem"))
        if question is None:
            wanted = fields.get("problem") or "/".join(PROBLEM_FIELDS)
            errors.append(f"{where}: no problem text (field {wanted})")
            continue
        name, answer = _pick(record, fields.get("answer"), ANSWER_FIELDS)
        if name == "solution" and isinstance(answer, str):
            answer = extract_answer(answer)
        if answer is None or (isinstance(answer, str) and not answer.strip()):
            wanted = fields.get("answer") or "/".join(ANSWER_FIELDS)
            errors.append(f"{where}: no answer (field {wanted}, or a \\boxed{{}} in solution)")
            continue
        reference = _reference(answer)
        if reference is None:
            errors.append(f"{where}: the answer is not a string or a finite number: {answer!r:.60}")
            continue
        _, given_id = _pick(record, fields.get("id"), ID_FIELDS)
        problem_id = str(given_id) if given_id is not None else str(index)
        if problem_id in seen:
            unique = f"{problem_id}#{index}"
            while unique in seen:  # an id given as "a#2" before a second "a" at index 2
                unique += f"#{index}"
            renamed = f"; using {unique}" if rename_duplicates else ""
            errors.append(f"{where}: duplicate id {problem_id!r}{renamed}")
            problem_id = unique
        seen.add(problem_id)
        problems.append(Problem(index, problem_id, question, reference))
    return problems, errors


# --------------------------------------------------------------------------------------------------
# metrics


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimator (Codex paper): 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def ks_for(n: int) -> list[int]:
    """1, 2, 4, ... up to n."""
    return [1 << i for i in range(n.bit_length()) if 1 << i <= n]


def parallel_widths(graph: ReasoningGraph) -> list[int]:
    """Per block, how many branches ran side by side: those whose first node has the same parents
    as the first branch's (a block decoded one branch after another counts 1)."""
    widths = []
    for block in graph.blocks:
        heads = [graph.nodes[branch[0]].parents for branch in block.branches if branch]
        widths.append(sum(1 for parents in heads if parents == heads[0]) if heads else 0)
    return widths


def sample_metrics(graph: ReasoningGraph, grammar: str | None) -> dict[str, Any]:
    """Shape, size and format validity of one sampled graph.

    ``parallel``: a block of >= 2 branches was written (the trigger rate counts these);
    ``executed_parallel``: >= 2 of them were decoded side by side. ``format_valid``: NPR output
    passes ``format_score`` (0.0); Multiverse output has a block and no strict violation; plain
    reasoning has a non-empty box answer (:func:`papo.rewards.extract_answer`).
    """
    from papo.rewards import extract_answer

    from .constraints import format_valid, validate
    from .format import format_score
    from .metrics import metrics

    m = metrics(graph)
    executed = parallel_widths(graph)
    response = graph.response_text
    fmt = format_score(response) if grammar == "npr" else None
    violations = validate(graph, "strict") if grammar else []
    # An empty box is no answer (unparsed, and an NPR format fault), so no valid CoT either.
    valid = format_valid(graph) if grammar else bool(extract_answer(response))
    meta = graph.metadata
    return {
        "tokens": m["total_tokens"],
        "critical_path_tokens": m["critical_path_tokens"],
        "theoretical_speedup": m["theoretical_speedup"],
        "blocks": m["blocks"],
        "widths": m["widths"],
        "parallel_widths": executed,
        "max_width": m["max_width"],
        "mean_width": m["mean_width"],
        "parallel": m["is_parallel"],
        "executed_parallel": any(width >= 2 for width in executed),
        "format_score": fmt,
        "format_valid": valid,
        "violations": [v.to_dict() for v in violations],
        "finish_reason": meta.get("finish_reason"),
        "truncated": meta.get("truncated", False),
    }


def _majority(
    samples: Sequence[dict[str, Any]],
    timeout_s: float,
    cache: dict[tuple[str, str], bool] | None = None,
) -> tuple[str | None, bool]:
    """The most frequent answer (answers grouped by math equivalence; ties go to the group seen
    first) and whether it is correct. Samples without a parsed answer do not vote.

    The correct samples (as graded) form one group: math-verify's equivalence is not
    transitive (``0.5 ~ 50\\%`` and ``50\\% ~ 50``, but not ``0.5 ~ 50``), so grouping a correct
    answer under a wrong one, or the reverse, made maj@n disagree with the grades and depend on
    the samples' order. Wrong answers are grouped among themselves: each joins the first group
    whose first answer it equals or verifies against (``verify(answer, first)``), else starts
    one. Identical answers are counted together, so each distinct answer is checked once
    against the groups before it; ``cache`` (shared across calls, e.g. the problems of one
    summary) keeps the outcome of each ordered pair checked."""
    from papo import rewards

    cache = {} if cache is None else cache
    counts: dict[tuple[str, bool], int] = {}
    for sample in samples:
        answer = sample["answer"]
        if answer is None or not sample["parsed"]:
            continue
        key = (answer, bool(sample["correct"]))
        counts[key] = counts.get(key, 0) + 1
    heads: list[str] = []  # each group's first answer, in the order the groups started
    sizes: list[int] = []
    right: int | None = None  # the group of the correct answers
    for (answer, correct), count in counts.items():
        if correct:
            if right is None:
                right = len(heads)
                heads.append(answer)
                sizes.append(0)
            sizes[right] += count
            continue
        for index, head in enumerate(heads):
            if index == right:
                continue
            key = (answer, head)
            if key not in cache:
                cache[key] = rewards.verify(answer, head, timeout_s=timeout_s)
            if cache[key]:
                sizes[index] += count
                break
        else:
            heads.append(answer)
            sizes.append(count)
    if not heads:
        return None, False
    best = sizes.index(max(sizes))  # index keeps the first of equal-sized groups
    return heads[best], best == right


def _call_walls(firsts: list[dict[str, Any]]) -> list[float]:
    """The wall time of each engine call, from each problem's first sample record: the problems
    of a call (``group["stream"]``) ended at ``ended_s`` into it; a problem alone in its call
    took its own time and its baseline's. Lines written before continuous admission may name
    a batch (``group["batch"]``) whose problems each hold the batch's times: counted once."""
    walls: dict[str, float] = {}
    for record in firsts:
        group = record["group"]
        stream, batch = group.get("stream"), group.get("batch")
        if isinstance(stream, dict) and isinstance(stream.get("ended_s"), (int, float)):
            key = f"stream {stream.get('id')}"
            walls[key] = max(walls.get(key, 0.0), stream["ended_s"])
            continue
        key = f"problem {record['problem_id']}"
        if isinstance(batch, dict) and isinstance(batch.get("id"), str):
            key = f"batch {batch['id']}"
        baseline = group["baseline"]
        walls[key] = group["wall_time"] + (baseline["wall_time"] if baseline else 0.0)
    return list(walls.values())


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def _rate(part: float, whole: float) -> float | None:
    return part / whole if whole > 0 else None


def summarize(
    records: Sequence[dict[str, Any]],
    *,
    n: int,
    info: dict[str, Any] | None = None,
    errors: Sequence[str] = (),
    timeout_s: float = 5.0,
) -> dict[str, Any]:
    """The summary of sample lines: aggregates, then ``per_problem``. Pure: the same lines give
    the same summary whichever process (or how many) produced them. Every problem needs its
    samples ``0 .. n-1``, once each: averages over problems with fewer would weigh them unevenly."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault(record["problem_id"], []).append(record)
    for problem_id, samples in groups.items():
        numbers = sorted(s["sample"] for s in samples)
        if numbers != list(range(n)):
            raise ValueError(
                f"problem {problem_id!r} has samples {numbers}; a summary needs samples "
                f"0..{n - 1} of every problem"
            )
    ks = ks_for(n)
    verified: dict[tuple[str, str], bool] = {}  # the majority votes' equivalence checks
    per_problem = []
    for problem_id, samples in groups.items():
        samples = sorted(samples, key=lambda r: r["sample"])
        count, correct = len(samples), sum(bool(s["correct"]) for s in samples)
        majority, majority_correct = _majority(samples, timeout_s, verified)
        group = samples[0]["group"]
        baseline = group.get("baseline")
        per_problem.append(
            {
                "id": problem_id,
                "index": samples[0]["problem_index"],
                "reference": samples[0]["reference"],
                "samples": count,
                "correct": correct,
                "avg": correct / count,
                "pass_at_k": {str(k): pass_at_k(count, correct, k) for k in ks if k <= count},
                "majority": majority,
                "majority_correct": majority_correct,
                "format_valid": sum(s["metrics"]["format_valid"] for s in samples) / count,
                "parallel": sum(s["metrics"]["parallel"] for s in samples) / count,
                "tokens": group["generated_tokens"],
                "wall_time_s": group["wall_time"],
                "tokens_per_s": group["tokens_per_s"],
                "baseline_tokens_per_s": baseline["tokens_per_s"] if baseline else None,
                "baseline_wall_time_s": baseline["wall_time"] if baseline else None,
            }
        )
    per_problem.sort(key=lambda p: p["index"])
    samples = [r for p in per_problem for r in groups[p["id"]]]
    metrics = [s["metrics"] for s in samples]
    widths = [w for m in metrics for w in m["widths"]]
    tokens = sum(p["tokens"] for p in per_problem)
    firsts = [s for s in samples if s["sample"] == 0]
    walls = _call_walls(firsts)
    wall = sum(walls)
    latency = sum(p["wall_time_s"] for p in per_problem)  # each problem's time in the engine
    tokens_per_s = tokens / latency if latency > 0 else 0.0
    baseline = None
    baselines = [s["group"]["baseline"] for s in firsts]
    if baselines and all(b is not None for b in baselines):
        base_tokens = sum(b["generated_tokens"] for b in baselines)
        base_latency = sum(b["wall_time"] for b in baselines)
        base_correct = sum(b["correct"] for b in baselines)
        base_samples = sum(b["samples"] for b in baselines)
        baseline = {
            "mode": "sequential",
            "tokens": base_tokens,
            "wall_time_s": base_latency,
            "tokens_per_s": base_tokens / base_latency if base_latency > 0 else 0.0,
            "avg_at_n": base_correct / base_samples if base_samples else None,
        }
    all_tokens = tokens + (baseline["tokens"] if baseline else 0)
    streams = [s["group"].get("stream") for s in firsts]
    batches = [s.get("batch") for s in streams if isinstance(s, dict)]
    unparsed = [
        {"problem_id": s["problem_id"], "sample": s["sample"], "answer": s["answer"]}
        for s in samples
        if not s["parsed"]
    ]
    count = len(per_problem)
    summary: dict[str, Any] = {
        "avg_at_n": _mean(p["avg"] for p in per_problem),
        "pass_at_k": {
            str(k): _mean(p["pass_at_k"][str(k)] for p in per_problem if str(k) in p["pass_at_k"])
            for k in ks
        },
        "best_at_n": _mean(float(p["correct"] > 0) for p in per_problem),
        "maj_at_n": _mean(float(p["majority_correct"]) for p in per_problem),
        "format_valid_rate": _mean(float(m["format_valid"]) for m in metrics),
        "parallel_rate": _mean(float(m["parallel"]) for m in metrics),
        "executed_parallel_rate": _mean(float(m["executed_parallel"]) for m in metrics),
        "blocks": len(widths),
        "mean_width": _mean(widths),
        "max_width": max(widths, default=0),
        "tokens": tokens,
        "mean_tokens": _mean(m["tokens"] for m in metrics),
        "mean_critical_path_tokens": _mean(m["critical_path_tokens"] for m in metrics),
        "wall_time_s": wall,
        "engine_calls": len(walls),
        "max_batch": max((b for b in batches if isinstance(b, int)), default=1),
        "latency_s": latency,
        "tokens_per_s": tokens_per_s,
        "engine_tokens_per_s": all_tokens / wall if wall > 0 else 0.0,
        "baseline": baseline,
        "speedup_vs_sequential": (
            tokens_per_s / baseline["tokens_per_s"]
            if baseline and baseline["tokens_per_s"] > 0
            else None
        ),
        "latency_speedup_vs_sequential": (
            baseline["wall_time_s"] / latency if baseline and latency > 0 else None
        ),
        "n": n,
        "problems": count,
        "samples": len(samples),
        "unparsed_answers": len(unparsed),
        "unparsed": unparsed,
        # samples the engine ended for want of KV pages: their grades say nothing about the model
        "pool_cut_samples": sum(
            m.get("finish_reason") == FinishReason.KV_EXHAUSTED for m in metrics
        ),
        "errors": list(errors),
        **(info or {}),
        "per_problem": per_problem,
    }
    return summary


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _num(value: float | None, digits: int = 2, suffix: str = "") -> str:
    return "–" if value is None else f"{value:.{digits}f}{suffix}"


def _widths(summary: dict[str, Any]) -> str:
    """Mean and max branch width, or a dash when no sample has a block (the summary's zeros are
    then no widths)."""
    if not summary["blocks"]:
        return "–"
    return f"{_num(summary['mean_width'])} / {summary['max_width']}"


def _calls_note(summary: dict[str, Any]) -> str:
    """How the problems were decoded, when not one at a time (``--batch``)."""
    batch = summary.get("max_batch") or 1
    if batch == 1:
        return ""
    return f" ({summary['problems']} problems, up to {batch} prompts at once)"


def markdown_report(summary: dict[str, Any], *, details: bool = True) -> str:
    """A readable report of a summary: settings and the aggregate table, then (``details``) the
    problems, the answers that could not be parsed and the input errors."""
    n = summary["n"]
    lines = [
        f"# Evaluation: {summary.get('data', '')}",
        "",
        f"model `{summary.get('model')}`, mode `{summary.get('mode')}`, prompt "
        f"`{summary.get('prompt')}`, n = {n}, {summary['problems']} problems, "
        f"{summary['samples']} samples",
        "",
        "| metric | value |",
        "| --- | --- |",
        f"| avg@{n} | {_pct(summary['avg_at_n'])} |",
        *(f"| pass@{k} | {_pct(v)} |" for k, v in summary["pass_at_k"].items()),
        f"| best@{n} | {_pct(summary['best_at_n'])} |",
        f"| maj@{n} | {_pct(summary['maj_at_n'])} |",
        f"| format valid | {_pct(summary['format_valid_rate'])} |",
        f"| parallel trigger rate | {_pct(summary['parallel_rate'])} |",
        f"| executed in parallel | {_pct(summary['executed_parallel_rate'])} |",
        f"| branch width mean / max | {_widths(summary)} |",
        f"| tokens generated | {summary['tokens']} |",
        f"| mean tokens / critical path per sample | {_num(summary['mean_tokens'], 1)} / "
        f"{_num(summary['mean_critical_path_tokens'], 1)} |",
        f"| decode wall time{' (baseline included)' if summary.get('baseline') else ''} | "
        f"{_num(summary['wall_time_s'], 1, ' s')}{_calls_note(summary)} |",
        f"| tokens/s (each problem's over its time in the engine) | "
        f"{_num(summary['tokens_per_s'], 1)} |",
        f"| engine tokens/s (every prompt's, baseline included) | "
        f"{_num(summary.get('engine_tokens_per_s'), 1)} |",
    ]
    if summary.get("pool_cut_samples"):
        lines.append(f"| samples cut for want of KV cache | {summary['pool_cut_samples']} |")
    baseline = summary.get("baseline")
    if baseline:
        lines += [
            f"| sequential baseline tokens/s | {_num(baseline['tokens_per_s'], 1)} |",
            f"| sequential baseline avg@{n} | {_pct(baseline['avg_at_n'])} |",
            f"| speedup vs sequential (tokens/s) | {_num(summary['speedup_vs_sequential'])}× |",
            f"| speedup vs sequential (wall time) | "
            f"{_num(summary['latency_speedup_vs_sequential'])}× |",
        ]
    lines += [
        f"| unparsed answers | {summary['unparsed_answers']} |",
    ]
    if not details:
        return "\n".join(lines) + "\n"
    lines += [
        "",
        "## Problems",
        "",
        "| id | reference | correct | majority | format valid | parallel | tokens | tokens/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for p in summary["per_problem"]:
        cells = [
            str(p["id"]),
            f"`{p['reference']}`",
            f"{p['correct']}/{p['samples']}",
            # no sample voted: a dash, not `None`, which a model may have boxed
            "–" if p["majority"] is None else f"`{p['majority']}`" + (" ✓" * p["majority_correct"]),
            _pct(p["format_valid"]),
            _pct(p["parallel"]),
            str(p["tokens"]),
            _num(p["tokens_per_s"], 1),
        ]
        lines.append(
            "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"
        )
    if summary["unparsed"]:
        lines += ["", "## Answers that could not be parsed (counted as wrong)", ""]
        lines += [
            f"- problem {u['problem_id']} sample {u['sample']}: "
            + (
                "no \\boxed{} answer"
                if u["answer"] is None
                else f"`{u['answer']}`"
                if u["answer"].strip()
                else "empty \\boxed{}"
            )
            for u in summary["unparsed"]
        ]
    if summary["errors"]:
        lines += ["", "## Input errors", ""] + [f"- {e}" for e in summary["errors"]]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# the run


@dataclass
class EvalConfig:
    data: str
    model: str | None = None  # None: the embedded default
    n: int = 8
    mode: str = "parallel"
    prompt: str = "npr"
    out: str | None = None
    limit: int | None = None
    baseline: str | None = None
    reward: str = "accuracy"
    fields: dict[str, str] = field(default_factory=dict)
    chat: bool | None = None
    dtype: str = "float32"
    tags: str = "special"
    device: str | None = None
    # Speed only, not part of a run's identity: decode steps as CUDA graphs; overlapped steps.
    cuda_graphs: bool = False
    overlap: bool = False
    batch: int = 1  # prompts decoding at once (a problem's baseline is one too)
    kv_memory: int | str = "auto"  # the KV pool's bytes, or "auto" (Engine's kv_memory_bytes)
    max_lanes: int = 64
    verify_timeout_s: float = 5.0
    quiet: bool = False
    sampling: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise EvalError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.baseline not in (None, "sequential"):
            raise EvalError(f"unknown baseline {self.baseline!r}; the only one is 'sequential'")
        if self.n < 1:
            raise EvalError("n must be >= 1")
        if self.limit is not None and self.limit < 1:
            raise EvalError("limit must be >= 1")
        if self.batch < 1:
            raise EvalError("batch must be >= 1")
        if self.max_lanes < 1:
            raise EvalError("max_lanes must be >= 1")
        from papo import rewards

        try:  # before config.json is written, which pins it
            rewards.get(self.reward)
        except KeyError as error:
            raise EvalError(error.args[0]) from None
        if not (isinstance(self.verify_timeout_s, (int, float)) and self.verify_timeout_s > 0):
            raise EvalError(
                "verify_timeout_s (--verify-timeout) must be a positive number of seconds"
            )

    def out_dir(self) -> Path:
        if self.out:
            return Path(self.out)
        prompt = Path(self.prompt).stem
        return Path("out") / "eval" / f"{Path(self.data).stem}-{self.mode}-{prompt}"

    def identity(self) -> dict[str, Any]:
        from .prompts import load_template, template_identity

        values = asdict(self)
        values["prompt_digest"] = load_template(self.prompt).digest  # an edited file is another
        values["data"] = str(Path(self.data).resolve())
        values["model"] = absolute_path(self.model)
        values["prompt"] = template_identity(self.prompt)
        return {key: values[key] for key in RUN_IDENTITY}


def absolute_path(path: str | None) -> str | None:
    """``path`` made absolute, so that a run's identity does not depend on where it started."""
    return None if path is None else str(Path(path).expanduser().resolve())


def _device(config: EvalConfig) -> torch.device:
    from .models import resolve_device

    return resolve_device(config.device)


_NUMBER = (int, float)
_BASELINE_SHAPE = {
    "generated_tokens": int,
    "wall_time": _NUMBER,
    "tokens_per_s": _NUMBER,
    "correct": int,
    "samples": int,
}
# What summarize reads from a sample line, with its type.
SAMPLE_SHAPE: dict[str, Any] = {
    "problem_id": str,
    "problem_index": int,
    "sample": int,
    "reference": str,
    "answer": (str, type(None)),
    "correct": bool,
    "parsed": bool,
    "metrics": {
        "format_valid": bool,
        "parallel": bool,
        "executed_parallel": bool,
        "widths": list,
        "tokens": int,
        "critical_path_tokens": int,
    },
    "group": {
        "generated_tokens": int,
        "wall_time": _NUMBER,
        "tokens_per_s": _NUMBER,
        "baseline": (_BASELINE_SHAPE, type(None)),
    },
}


def _read_sample_files(out: Path) -> list[tuple[Path, list[dict[str, Any]]]]:
    """Valid lines of samples.jsonl and every part file: a line cut short by a kill, or one
    damaged otherwise (not of a sample record's shape), is skipped, so its problem is decoded
    again."""
    found = []
    for path in [out / SAMPLES, *sorted(out.glob(PART_GLOB))]:
        if not path.is_file():
            continue
        records = []
        for line in json_lines(path.read_text("utf-8", errors="replace")):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if has_shape(record, SAMPLE_SHAPE):
                records.append(record)
        found.append((path, records))
    return found


def _complete_groups(
    files: list[tuple[Path, list[dict[str, Any]]]], n: int
) -> dict[str, list[dict[str, Any]]]:
    """Per problem, the first file's group holding all ``n`` samples once (a problem a kill cut
    short is absent, so it is decoded again)."""
    complete: dict[str, list[dict[str, Any]]] = {}
    for _, records in files:
        by_problem: dict[str, dict[int, dict[str, Any]]] = {}
        for record in records:
            by_problem.setdefault(record["problem_id"], {})[record["sample"]] = record
        for problem_id, samples in by_problem.items():
            if problem_id not in complete and set(samples) == set(range(n)):
                complete[problem_id] = [samples[i] for i in range(n)]
    return complete


def _load_engine(config: EvalConfig) -> Any:
    from .engine.engine import Engine
    from .prompts import load_template

    grammar = load_template(config.prompt).grammar
    return Engine.from_pretrained(
        config.model,
        dtype=config.dtype,
        tags=config.tags,
        grammar="multiverse" if grammar == "multiverse" else "npr",
        device=_device(config),
        cuda_graphs=config.cuda_graphs,
        overlap=config.overlap,
        kv_memory_bytes=config.kv_memory,
        max_lanes=config.max_lanes,
    )


def _check_config(out: Path, config: EvalConfig) -> bool:
    """Refuses a run whose ``out`` holds one of other settings; True when it holds none yet
    (:func:`_write_config` then pins the settings, once the model has loaded)."""
    path = out / "config.json"
    if not path.is_file():
        out.mkdir(parents=True, exist_ok=True)
        return True
    try:
        stored = json.loads(path.read_text("utf-8"))
    except json.JSONDecodeError:
        stored = None
    settings = json.loads(json.dumps(config.identity()))
    if isinstance(stored, dict) and "prompt_digest" not in stored:
        del settings["prompt_digest"]  # a run from before the text was recorded
    if stored != settings:
        changes = "unreadable"
        if isinstance(stored, dict):
            changes = setting_changes(stored, settings, stored.keys() | settings.keys())
        raise EvalError(
            f"{out} holds a run with other settings ({changes}; see {path}): rerun with those "
            "to resume, or use another --out or delete that directory"
        )
    return False


def _write_config(out: Path, config: EvalConfig) -> None:
    _write_atomic(out / "config.json", json.dumps(config.identity(), indent=1) + "\n")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text, "utf-8")
    os.replace(tmp, path)


class _Evaluator:
    """Decodes and scores problems on one engine, a batch of them per engine call."""

    def __init__(self, engine: Any, config: EvalConfig):
        from papo import rewards

        from .engine.sampling import SamplingParams
        from .prompts import load_template

        self.engine = engine
        self.config = config
        self.template = load_template(config.prompt)
        self.reward = rewards.get(config.reward)
        self.params = SamplingParams(**{**config.sampling, "n": config.n})
        self.warm = False

    def _params(self, problem: Problem):
        import dataclasses

        seed = self.params.seed
        # One seed per problem: a resumed, sharded or batched run samples what a whole run would.
        return dataclasses.replace(self.params, seed=None if seed is None else seed + problem.index)

    def _metrics_graph(self, graph: ReasoningGraph) -> ReasoningGraph:
        """The engine's graph; for Multiverse output from an engine made for NPR, a re-parse of
        the same tokens with the Multiverse grammar (that engine decoded the blocks one branch
        after another, so marked so)."""
        if self.template.grammar != "multiverse" or graph.grammar == "multiverse":
            return graph
        if graph.token_ids is None:
            return graph
        from .parse import parse

        reparsed = parse(
            graph.token_ids[graph.prompt_num_tokens :],
            grammar="multiverse",
            tokenizer=self.engine.tokenizer,
            prompt_ids=graph.token_ids[: graph.prompt_num_tokens],
            lenient=True,
            sequential=True,
        )
        reparsed.logprobs, reparsed.forced = graph.logprobs, graph.forced
        reparsed.metadata = dict(graph.metadata)
        return reparsed

    def _grade(self, graph: ReasoningGraph, problem: Problem):
        return self.reward(
            graph.response_text, problem.reference, timeout_s=self.config.verify_timeout_s
        )

    def run(
        self,
        problems: list[Problem],
        on_done: Callable[[Problem, list[dict[str, Any]]], None],
        claim: Callable[[Problem], bool] | None = None,
    ) -> list[tuple[Problem, Exception]]:
        """Decode ``problems`` in one engine call, ``config.batch`` prompts at a time (a
        problem's baseline, queued right behind it, is a prompt too); hand each problem's sample
        records to ``on_done`` as soon as it and its baseline end. ``claim(problem)``, asked as
        a problem would be admitted: whether to decode it (else another process does). Returns
        the problems whose prompt the engine cannot take, with why.

        A problem's ``group`` holds its own tokens, its time in the engine (admission to end)
        and their ratio, and the same for its baseline; with several problems in the call,
        ``group["stream"]`` names the call and when the problem ended in it, from which a
        summary takes the call's wall time."""
        from .engine.engine import PromptError

        ready, prompts, params, refused = [], [], [], []
        for problem in problems:
            prompt = self.template.render(problem.question)
            problem_params = self._params(problem)
            try:
                self.engine.check_prompt(prompt, problem_params, self.config.chat)
            except PromptError as error:
                refused.append((problem, error))
                continue
            ready.append(problem)
            prompts.append(prompt)
            params.append(problem_params)
        if not ready:
            return refused
        modes = [MODES[self.config.mode]]
        if self.config.baseline == "sequential":
            modes.append("sequential")
        stream = None
        if len(ready) * len(modes) > 1:  # a lone problem and its baseline may overlap too
            stream = {"id": uuid.uuid4().hex, "problems": len(ready), "batch": self.config.batch}
        ended: dict[int, dict[int, list[ReasoningGraph]]] = {}  # problem: part: graphs

        def on_finish(index: int, graphs: list[ReasoningGraph]) -> None:
            at, part = divmod(index, len(modes))
            parts = ended.setdefault(at, {})
            parts[part] = graphs
            if len(parts) < len(modes):
                return
            seconds = self.engine.stats.prompt_seconds
            timing = [seconds[at * len(modes) + i] for i in range(len(modes))]
            problem = ready[at]
            group = self._group(graphs=parts[0], seconds=timing[0])
            if len(modes) > 1:
                base_graphs = parts[1]
                group["baseline"] = {
                    **self._group(graphs=base_graphs, seconds=timing[1]),
                    "samples": len(base_graphs),
                    "correct": sum(self._grade(g, problem).correct for g in base_graphs),
                }
            if stream is not None:
                group["stream"] = {**stream, "ended_s": max(end for _, end in timing)}
            on_done(problem, self._records(problem, parts[0], group))
            del ended[at]

        claimed: set[int] = set()

        def claim_part(index: int) -> bool:
            at, part = divmod(index, len(modes))
            if part == 0 and (claim is None or claim(ready[at])):
                claimed.add(at)
            return at in claimed  # a baseline goes with its problem

        if not self.warm:  # the first problem's time would hold the engine's one-time costs
            self.engine.warm_up(prompts[0], params[0], modes, self.config.chat)
            self.warm = True
        self.engine.generate(
            [prompt for prompt in prompts for _ in modes],
            [p for p in params for _ in modes],
            mode=modes * len(ready),
            chat=self.config.chat,
            max_running=self.config.batch,
            on_finish=on_finish,
            claim=claim_part,
        )
        assert not ended, "a problem decoded without its baseline"
        return refused

    @staticmethod
    def _group(graphs: list[ReasoningGraph], seconds: tuple[float, float]) -> dict[str, Any]:
        """A prompt's tokens, its time in the engine and their ratio."""
        tokens, wall = _generated(graphs), seconds[1] - seconds[0]
        return {
            "generated_tokens": tokens,
            "wall_time": wall,
            "tokens_per_s": tokens / wall if wall > 0 else 0.0,
            "baseline": None,
        }

    def _records(
        self, problem: Problem, graphs: list[ReasoningGraph], group: dict[str, Any]
    ) -> list[dict[str, Any]]:
        records = []
        for index, graph in enumerate(graphs):
            graph = self._metrics_graph(graph)
            reward = self._grade(graph, problem)
            records.append(
                {
                    "problem_id": problem.id,
                    "problem_index": problem.index,
                    "problem_key": problem.key,
                    "sample": index,
                    "reference": problem.reference,
                    "answer": reward.answer,
                    "correct": reward.correct,
                    "parsed": reward.parsed,
                    "reward": reward.score,
                    "metrics": sample_metrics(graph, self.template.grammar),
                    "group": group,
                    "graph": graph.to_dict(),
                }
            )
        return records


def _generated(graphs: list[ReasoningGraph]) -> int:
    return sum(len(g.token_ids) - g.prompt_num_tokens for g in graphs)


def problem_progress(label: str, enabled: bool):
    """A progress bar of problems on stderr (``npr eval``, ``npr sample``), gone when done."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}", markup=False),  # problem ids are data, not markup
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=not enabled,
        transient=True,
    )


def refused_once(parts: list[list[tuple[int, str, str]]]) -> list[tuple[int, str, str]]:
    """The problems the ranks refused, ``(index, id, why)`` in problem order, each once: every
    rank checks every prompt, and its reason may quote its own pool's size (the lowest rank's
    is kept)."""
    first: dict[tuple[int, str], str] = {}
    for part in parts:
        for index, problem_id, why in part:
            first.setdefault((index, problem_id), why)
    return [(index, problem_id, why) for (index, problem_id), why in sorted(first.items())]


def run_eval(
    config: EvalConfig,
    *,
    engine: Any = None,
    on_problem: Callable[[Problem, list[dict[str, Any]]], None] | None = None,
) -> dict[str, Any]:
    """Evaluate (or resume evaluating) ``config`` and return the summary, on every rank.

    ``engine`` replaces loading ``config.model`` (tests pass tiny ones); ``on_problem`` is called
    after each problem's lines are on disk. Raises :class:`EvalError` for unusable inputs.
    """
    with joined_ranks() as ranks:
        return _run(config, ranks, engine, on_problem)


def _run(
    config: EvalConfig,
    ranks: Ranks,
    engine: Any,
    on_problem: Callable[[Problem, list[dict[str, Any]]], None] | None,
) -> dict[str, Any]:
    from .prompts import load_template

    out = config.out_dir()
    failure, new_run = None, False
    try:
        load_template(config.prompt)
        problems, errors = load_problems(config.data, fields=config.fields, limit=config.limit)
        if not problems:
            why = "; ".join(errors[:3]) + (
                f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
            )
            raise EvalError(f"{config.data}: no problems to evaluate" + (f": {why}" if why else ""))
        if ranks.is_main:
            new_run = _check_config(out, config)
    except (EvalError, OSError, ValueError) as error:
        failure = str(error)
    # Every rank stops on rank 0's verdict, so that none waits for a rank that gave up.
    failure = ranks.broadcast(failure) or failure
    if failure:
        raise EvalError(failure)

    # Rank 0 decides what is left, before any rank writes or claims: every rank then shares the
    # same list, and the claims of an earlier run are gone.
    claims = Claims(out / CLAIMS)
    done = failure = None
    if ranks.is_main:
        groups = _complete_groups(_read_sample_files(out), config.n)
        done = set(groups)
        keys = {pid: group[0].get("problem_key") for pid, group in groups.items()}
        failure = changed_problems(keys, [(p.id, p.key) for p in problems], config.data, out)
        claims.clear()
    failure, done = ranks.broadcast((failure, done))
    if failure:
        raise EvalError(failure)
    todo = [p for p in problems if p.id not in done]
    # problems whose prompt the engine cannot take: (index, id, why)
    not_run: list[tuple[int, str, str]] = []
    if todo and engine is None:
        try:
            engine = _load_engine(config)
        except (EvalError, OSError, ValueError) as error:
            failure = str(error)
    # One rank's model that does not load stops every rank before any decodes, each saying
    # why (else the others decode until torchrun, seeing that rank exit, ends them unexplained).
    if ranks.any_failed(failure is not None):
        raise EvalError(failure or "another rank could not load the model")
    if new_run:  # once the model has loaded: a model that fails to load pins no settings
        _write_config(out, config)
    if todo:
        evaluator = _Evaluator(engine, config)
        part = out / f"samples.part-{ranks.rank}-{uuid.uuid4().hex[:12]}.jsonl"
        show = not config.quiet and ranks.is_main
        with part.open("a", encoding="utf-8") as handle, problem_progress("eval", show) as progress:
            task = progress.add_task("", total=len(todo))

            def write(problem: Problem, records: list[dict[str, Any]]) -> None:
                # One write per problem, then fsync: a kill leaves whole groups or a cut
                # group (redone on resume), never a group that looks complete but is not.
                lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
                handle.write(lines)
                handle.flush()
                os.fsync(handle.fileno())
                progress.update(task, description=f"last done: problem {problem.id}")
                progress.advance(task)
                if on_problem is not None:
                    on_problem(problem, records)

            def claim(problem: Problem) -> bool:
                return claims.take(problem.index, lambda: progress.advance(task))

            # One call per --batch problems would leave lanes idle while its slowest problem
            # ends; one call for them all admits the next problem as soon as one ends.
            for problem, error in evaluator.run(todo, write, claim if ranks.distributed else None):
                line = f"problem {problem.id}: not evaluated: {error}"
                not_run.append((problem.index, problem.id, line))
                progress.advance(task)
    # A collective, so also the barrier before rank 0 merges what every rank wrote.
    not_run = refused_once(ranks.gather(not_run))

    result: dict[str, Any] | str | None = None
    if ranks.is_main:
        try:
            result = _merge_and_summarize(out, config, problems, errors, not_run, ranks.size)
        except Exception as error:  # told to the other ranks too, then raised here
            result = f"merging the results failed: {error!r}"
            if not ranks.distributed:
                raise
    result = ranks.broadcast(result)
    if isinstance(result, str):
        raise EvalError(result)
    return result


def _merge_and_summarize(
    out: Path,
    config: EvalConfig,
    problems: list[Problem],
    errors: list[str],
    not_run: list[tuple[int, str, str]],
    world: int,
) -> dict[str, Any]:
    files = _read_sample_files(out)
    groups = _complete_groups(files, config.n)
    # a rank whose pool is too small refuses a prompt that another rank, with room, runs
    errors = errors + [line for _, key, line in not_run if key not in groups]
    order = {p.id: p.index for p in problems}
    # Problems of earlier runs outside this run's selection (another --limit) are kept on disk.
    ordered = sorted(groups.items(), key=lambda kv: (order.get(kv[0], math.inf), kv[0]))
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for _, g in ordered for r in g)
    _write_atomic(out / SAMPLES, text)
    for path, _ in files:
        if path.name != SAMPLES:
            path.unlink(missing_ok=True)
    Claims(out / CLAIMS).clear()
    selected = [r for p in problems if p.id in groups for r in groups[p.id]]
    info = {
        "model": config.model or "default",
        "data": config.data,
        "mode": config.mode,
        "prompt": config.prompt,
        "reward": config.reward,
        "world_size": world,
        "sampling": {**config.sampling, "n": config.n},
    }
    summary = summarize(
        selected, n=config.n, info=info, errors=errors, timeout_s=config.verify_timeout_s
    )
    _write_atomic(out / "summary.json", json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    _write_atomic(out / "report.md", markdown_report(summary))
    return summary


# --------------------------------------------------------------------------------------------------
# command line


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register ``npr eval`` on the ``npr`` command's subparsers."""
    from .cli import add_kv_memory_argument

    parser = commands.add_parser(
        "eval",
        help="accuracy, parallel trigger rate and speed on a problem set",
        description="Evaluate a model on problems from a .json, .jsonl or .parquet file. "
        "Run it again with the same arguments to resume an interrupted run; under torchrun the "
        "ranks share the problems, each claiming the next one it has room for.",
    )
    parser.add_argument("--model", default="default", help="local model dir, .gguf or 'default'")
    parser.add_argument("--data", required=True, help="problems: .json, .jsonl or .parquet")
    parser.add_argument("--limit", type=int, default=None, help="first N problems")
    parser.add_argument("--n", "-n", type=int, default=8, help="samples per problem")
    parser.add_argument("--mode", choices=tuple(MODES), default="parallel")
    parser.add_argument("--prompt", default="npr", help="npr, multiverse, cot or a template file")
    parser.add_argument("--out", default=None, help="output dir (default out/eval/<data>-<mode>-…)")
    parser.add_argument("--baseline", choices=("sequential",), default=None)
    parser.add_argument(
        "--field",
        action="append",
        default=[],
        metavar="KEY=NAME",
        help="read KEY (problem, answer, id) from field NAME",
    )
    parser.add_argument("--reward", default="accuracy", help="reward that decides correctness")
    parser.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--tags", choices=("special", "text"), default="special")
    parser.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK, else cpu")
    parser.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="replay decode steps as CUDA graphs (flashinfer or triton attention)",
    )
    parser.add_argument(
        "--overlap",
        action="store_true",
        help="launch each decode step before reading the tokens of the one before (GPU speed; "
        "the same samples)",
    )
    add_kv_memory_argument(parser)
    parser.add_argument(
        "--max-lanes",
        type=int,
        default=64,
        metavar="L",
        help="lanes (samples and their branches) the engine admits at once (default 64)",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=1,
        metavar="B",
        help="prompts decoding at once, the next admitted as soon as one ends (throughput; a "
        "problem's --baseline is a prompt too); each problem's tokens/s is then under that load",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's)"
    )
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--max-total-tokens", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-branches", type=int, default=2)
    parser.add_argument("--max-branches", type=int, default=4)
    parser.add_argument("--plan-tokens", type=int, default=48)
    parser.add_argument("--step-tokens", type=int, default=256)
    parser.add_argument("--takeaway-tokens", type=int, default=128)
    parser.add_argument("--verify-timeout", type=float, default=5.0, help="seconds per check")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary table")
    parser.set_defaults(run=cmd_eval)


def _parse_fields(pairs: Sequence[str]) -> dict[str, str]:
    fields = {}
    for pair in pairs:
        key, sep, name = pair.partition("=")
        if not sep or key not in ("problem", "answer", "id") or not name:
            raise EvalError(f"--field takes KEY=NAME with KEY one of problem, answer, id: {pair!r}")
        fields[key] = name
    return fields


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    sampling = {
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "repetition_penalty": args.repetition_penalty,
        "max_new_tokens": args.max_new_tokens,
        "max_total_tokens": args.max_total_tokens,
        "seed": args.seed,
        "min_branches": args.min_branches,
        "max_branches": args.max_branches,
        "max_plan_tokens": args.plan_tokens,
        "max_step_tokens": args.step_tokens,
        "max_takeaway_tokens": args.takeaway_tokens,
    }
    return EvalConfig(
        data=args.data,
        model=None if args.model in (None, "default") else args.model,
        n=args.n,
        mode=args.mode,
        prompt=args.prompt,
        out=args.out,
        limit=args.limit,
        baseline=args.baseline,
        reward=args.reward,
        fields=_parse_fields(args.field),
        chat=False if args.no_chat else None,
        dtype=args.dtype,
        tags=args.tags,
        device=args.device,
        cuda_graphs=args.cuda_graphs,
        overlap=args.overlap,
        batch=args.batch,
        kv_memory=args.kv_memory,
        max_lanes=args.max_lanes,
        verify_timeout_s=args.verify_timeout,
        quiet=args.quiet,
        sampling=sampling,
    )


def cmd_eval(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
        from .engine.sampling import SamplingParams

        SamplingParams(**config.sampling)  # bad values fail before the model loads
        _device(config)
        if args.threads is not None and args.threads < 1:
            raise EvalError("--threads must be >= 1")
        if args.threads:
            # On a shared CPU one thread per process can be 10x faster than contended threads.
            import torch

            torch.set_num_threads(args.threads)
        summary = run_eval(config)
    except (EvalError, ValueError, FileNotFoundError, KeyError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"npr eval:{rank_label()} {message}", file=sys.stderr)
        return 2
    except (OSError, PeerLost) as error:  # writing the results (a full disk), another rank
        # that stopped: what is written is whole
        print(
            f"npr eval:{rank_label()} {error}; the problems written so far are kept, and the same command "
            "resumes the run",
            file=sys.stderr,
        )
        return 2
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    for error in summary["errors"]:
        print(f"npr eval: {error}", file=sys.stderr)
    if summary["unparsed_answers"]:
        print(
            f"npr eval: {summary['unparsed_answers']} answer(s) could not be parsed "
            "(counted as wrong; listed in summary.json and report.md)",
            file=sys.stderr,
        )
    if summary["pool_cut_samples"]:
        print(
            f"npr eval: {summary['pool_cut_samples']} sample(s) cut short for want of KV cache "
            "(finish reason kv_exhausted; graded as they stand): give --kv-memory more",
            file=sys.stderr,
        )
    if not config.quiet:
        print(markdown_report(summary, details=False))
    print(f"results in {config.out_dir()}/ (samples.jsonl, summary.json, report.md)")
    return 1 if summary["errors"] else 0
