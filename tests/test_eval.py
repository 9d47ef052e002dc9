"""npr eval: problem loading, metrics, the run on a tiny model, resume, sharding, bad input."""

from __future__ import annotations

import copy
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import NPR_TRACE, ROOT
from hypothesis import given, settings
from hypothesis import strategies as st

import npr_graph as ng
from npr_graph import evaluate
from npr_graph.cli import build_parser, main
from npr_graph.evaluate import (
    SUMMARY_KEYS,
    EvalConfig,
    EvalError,
    config_from_args,
    load_problems,
    markdown_report,
    parallel_widths,
    pass_at_k,
    run_eval,
    sample_metrics,
    summarize,
)
from npr_graph.graph import ReasoningGraph
from npr_graph.prompts import load_template

PROBLEMS = [
    {"id": "p1", "problem": "What is $1+1$?", "answer": "2"},
    {"id": "p2", "question": "Compute $\\frac{1}{2}+\\frac{1}{2}$.", "answer": "1"},
    {"id": "p3", "problem": "What is 3 squared?", "solution": "It is $\\boxed{9}$."},
]
SAMPLING = dict(
    temperature=1.0,
    top_p=1.0,
    max_new_tokens=40,
    seed=0,
    min_branches=2,
    max_branches=3,
    max_plan_tokens=4,
    max_step_tokens=10,
    max_takeaway_tokens=6,
)
CLI_SAMPLING = [
    "--temperature", "1.0", "--top-p", "1.0", "--max-new-tokens", "40", "--seed", "0",
    "--max-branches", "3", "--plan-tokens", "4", "--step-tokens", "10", "--takeaway-tokens", "6",
]  # fmt: skip


def test_a_rank_decodes_the_problems_it_claims(tmp_path, data, engine) -> None:
    """Under torchrun every rank is given the unfinished problems and asks to claim each as it
    would admit it: it decodes those it gets (with their baselines) and skips the rest, which
    another rank decodes. Its samples are those of a run of its own."""
    single = run_eval(config(data, tmp_path / "single", baseline="sequential"), engine=engine)
    assert single["problems"] == 3
    want = {r["problem_id"]: r for r in read_samples(tmp_path / "single") if r["sample"] == 0}
    problems, _ = evaluate.load_problems(str(data))
    evaluator = evaluate._Evaluator(
        engine, config(data, tmp_path / "rank", baseline="sequential", batch=2)
    )
    asked, written = [], {}

    def claim(problem) -> bool:
        asked.append(problem.id)
        return problem.id != "p2"

    refused = evaluator.run(problems, lambda p, records: written.update({p.id: records}), claim)
    assert refused == [] and asked == ["p1", "p2", "p3"], "each asked once, in order"
    assert sorted(written) == ["p1", "p3"]
    for problem_id, records in written.items():
        assert response_ids(records[0]) == response_ids(want[problem_id])
        assert records[0]["group"]["baseline"]["samples"] == 2


def _env() -> dict[str, str]:
    # One thread per process: the CI machine has two cores, and threads of tiny models only contend.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random-weight Llama with the embedded model's tokenizer (tags as special tokens,
    chat template kept), saved like any local checkpoint."""
    from npr_graph.models import add_tag_tokens, default_tokenizer, tiny_model

    tokenizer = copy.deepcopy(default_tokenizer())
    add_tag_tokens(tiny_model("llama", tokenizer=tokenizer), tokenizer, "npr")
    model = tiny_model("llama", tokenizer=tokenizer)
    path = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def engine(tiny_dir):
    from npr_graph.engine import Engine

    return Engine.from_pretrained(str(tiny_dir))


@pytest.fixture
def data(tmp_path) -> Path:
    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    return path


def config(data: Path, out: Path, **overrides) -> EvalConfig:
    values = dict(
        data=str(data), n=2, mode="constrained", out=str(out), quiet=True, sampling=SAMPLING
    )
    values.update(overrides)
    return EvalConfig(**values)


def read_samples(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def response_ids(record: dict) -> list[int]:
    graph = record["graph"]
    return graph["token_ids"][graph["prompt_num_tokens"] :]


# --- metrics ------------------------------------------------------------------------------------


def test_pass_at_k_is_the_unbiased_estimator() -> None:
    # The probability that k samples drawn without replacement from n hold a correct one.
    for n, c, k in itertools.product(range(1, 7), range(7), range(1, 7)):
        if c > n or k > n:
            continue
        draws = list(itertools.combinations([True] * c + [False] * (n - c), k))
        assert pass_at_k(n, c, k) == pytest.approx(sum(any(d) for d in draws) / len(draws))
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_parallel_widths_count_branches_decoded_side_by_side() -> None:
    assert parallel_widths(ng.parse(NPR_TRACE, lenient=True)) == [2]
    assert parallel_widths(ng.parse(NPR_TRACE, lenient=True, sequential=True)) == [1]


def test_cot_format_validity_needs_a_non_empty_box() -> None:
    """An empty ``\\boxed{}`` is no answer (listed as unparsed, and it fails the NPR format
    check); a CoT sample that ends on one is not format-valid either."""
    valid = {
        text: sample_metrics(ng.parse(text, lenient=True), None)["format_valid"]
        for text in ("So \\boxed{5}.", "So \\boxed{}.", "So \\boxed{ }.", "No box.")
    }
    assert valid == {
        "So \\boxed{5}.": True,
        "So \\boxed{}.": False,
        "So \\boxed{ }.": False,
        "No box.": False,
    }
    empty_npr = ng.parse(NPR_TRACE.replace("\\boxed{5}", "\\boxed{}"), lenient=True)
    assert sample_metrics(empty_npr, "npr")["format_valid"] is False


def test_cot_format_validity_reads_every_box_form() -> None:
    """The MATH grader's box forms count as answers (a spaced \\boxed, \\fbox); empty or cut
    ones do not."""
    valid = {
        text: sample_metrics(ng.parse(text, lenient=True), None)["format_valid"]
        for text in ("So $\\boxed 5$.", "So \\fbox{5}.", "So \\fbox{}.", "So \\boxed{5}, \\fbox{6")
    }
    assert valid == {
        "So $\\boxed 5$.": True,
        "So \\fbox{5}.": True,
        "So \\fbox{}.": False,
        "So \\boxed{5}, \\fbox{6": False,
    }


def _record(problem: str, index: int, sample: int, answer, correct: bool, **metrics) -> dict:
    group = {"wall_time": 2.0, "generated_tokens": 100, "tokens_per_s": 50.0}
    group["baseline"] = {
        "wall_time": 4.0,
        "generated_tokens": 100,
        "tokens_per_s": 25.0,
        "samples": 4,
        "correct": 1,
    }
    base = {
        "tokens": 25,
        "critical_path_tokens": 20,
        "widths": [2],
        "parallel": True,
        "executed_parallel": True,
        "format_valid": True,
    }
    return {
        "problem_id": problem,
        "problem_index": index,
        "sample": sample,
        "reference": "1/2",
        "answer": answer,
        "correct": correct,
        "parsed": answer is not None,
        "metrics": {**base, **metrics},
        "group": group,
    }


def test_summary_counts_each_engine_calls_wall_time_once() -> None:
    """Problems of one call (``stream``) end at ``ended_s`` into it; a batch written before
    continuous admission (``batch``: each problem holds the batch's times) counts once; a lone
    problem counts its own time and its baseline's."""
    records = [_record(p, i, 0, "1/2", True) for i, p in enumerate("abcde")]
    for record, ended in zip(records[:2], (3.0, 5.0), strict=True):
        record["group"] = {**record["group"], "stream": {"id": "s", "ended_s": ended}}
    for record in records[2:4]:
        record["group"] = {**record["group"], "batch": {"id": "b", "problems": 2}}
    summary = summarize(records, n=1)
    assert summary["engine_calls"] == 3
    assert summary["wall_time_s"] == 5.0 + (2.0 + 4.0) + (2.0 + 4.0)


def test_summary_aggregates() -> None:
    records = [
        _record("a", 0, 0, "\\frac12", True),
        _record("a", 0, 1, "0.5", True, format_valid=False),
        _record("a", 0, 2, "3", False, widths=[], parallel=False),
        _record("a", 0, 3, None, False),
        _record("b", 1, 0, "7", False),
        _record("b", 1, 1, "7", False),
        _record("b", 1, 2, "8", False, widths=[3, 4]),
        _record("b", 1, 3, "1/2", False),
    ]
    summary = summarize(records, n=4)
    assert set(SUMMARY_KEYS) <= set(summary)
    assert summary["avg_at_n"] == pytest.approx((2 / 4 + 0) / 2)
    assert summary["pass_at_k"] == pytest.approx(
        {"1": 0.25, "2": (1 - 1 / 6) / 2, "4": 0.5}
    )  # C(2,2)/C(4,2) = 1/6
    assert summary["best_at_n"] == 0.5
    # a: \frac12 and 0.5 are one answer (2 votes): correct; b: 7 wins, wrong
    assert summary["maj_at_n"] == 0.5
    assert [p["majority"] for p in summary["per_problem"]] == ["\\frac12", "7"]
    assert summary["format_valid_rate"] == 7 / 8
    assert summary["parallel_rate"] == 7 / 8
    assert summary["mean_width"] == pytest.approx((2 * 6 + 3 + 4) / 8)
    assert summary["max_width"] == 4
    assert summary["tokens_per_s"] == 50.0 and summary["baseline"]["tokens_per_s"] == 25.0
    assert summary["speedup_vs_sequential"] == 2.0
    assert summary["latency_speedup_vs_sequential"] == 2.0
    assert summary["unparsed_answers"] == 1
    assert summary["unparsed"] == [{"problem_id": "a", "sample": 3, "answer": None}]
    assert summary["n"] == 4 and summary["problems"] == 2 and summary["samples"] == 8


def test_report_tells_no_majority_from_a_boxed_none() -> None:
    records = [_record("a", 0, s, None, False) for s in range(2)]
    records += [_record("b", 1, s, "None", False) for s in range(2)]
    report = markdown_report(summarize(records, n=2))
    assert "| a | `1/2` | 0/2 | – |" in report
    assert "| b | `1/2` | 0/2 | `None` |" in report


def _majority_defined(samples, timeout_s):
    """maj@n as defined, sample by sample: the correct samples vote as one group; a wrong one
    joins the first group of wrong answers whose first answer it equals or verifies against."""
    from papo.rewards import verify

    groups, right = [], None
    for sample in samples:
        answer = sample["answer"]
        if answer is None or not sample["parsed"]:
            continue
        if sample["correct"]:
            if right is None:
                right = []
                groups.append(right)
            right.append(sample)
            continue
        for group in groups:
            head = group[0]["answer"]
            if group is not right and (answer == head or verify(answer, head, timeout_s=timeout_s)):
                group.append(sample)
                break
        else:
            groups.append([sample])
    if not groups:
        return None, False
    best = max(groups, key=len)
    return best[0]["answer"], best is right


class _Spy:
    """A stand-in for ``verify``: any (even asymmetric, intransitive) relation; counts calls."""

    def __init__(self, related):
        self.related, self.calls = set(related), []

    def __call__(self, prediction, reference, *, timeout_s):
        self.calls.append((prediction, reference))
        return (prediction, reference) in self.related


_ANSWERS = ["1", "2", "x", "\\frac12", "0.5", "None"]
_SAMPLE = st.tuples(st.sampled_from([*_ANSWERS, None]), st.booleans(), st.booleans())


@settings(max_examples=400, deadline=None)
@given(
    st.lists(_SAMPLE, max_size=12),
    st.sets(st.tuples(st.sampled_from(_ANSWERS), st.sampled_from(_ANSWERS))),
)
def test_majority_matches_the_pairwise_vote(samples, related) -> None:
    """Grouping equal answers first and checking each distinct answer once gives the same answer
    and correctness as the sample-by-sample vote, ties and "no vote" included, whatever the
    equivalence relation; never more checks; and the correctness does not depend on the
    samples' order."""
    from unittest import mock

    records = [
        {"answer": answer, "parsed": parsed and answer is not None, "correct": correct}
        for answer, parsed, correct in samples
    ]
    before, now = _Spy(related), _Spy(related)
    with mock.patch("papo.rewards.verify", before):
        expected = _majority_defined(records, 1.0)
    with mock.patch("papo.rewards.verify", now):
        assert evaluate._majority(records, 1.0) == expected
    assert len(now.calls) <= len(before.calls)
    assert len(now.calls) == len(set(now.calls))  # no pair checked twice
    correct = [r for r in records if r["correct"] and r["parsed"]]
    if correct and 2 * len(correct) > sum(r["parsed"] for r in records):
        with mock.patch("papo.rewards.verify", _Spy(related)):
            assert evaluate._majority(records[::-1], 1.0)[1], "most votes are correct ones"


def test_majority_checks_each_distinct_answer_once(monkeypatch) -> None:
    """d distinct wrong answers, none equivalent, each given by r samples: d(d-1)/2 checks, not
    r·d(d-1)/2 (the correct answer needs none); a summary checks a pair once across its
    problems."""
    spy = _Spy(set())
    monkeypatch.setattr("papo.rewards.verify", spy)
    answers = ["1", "2", "3", "4"]
    records = [{"answer": a, "parsed": True, "correct": a == "3"} for a in answers * 8]
    assert evaluate._majority(records, 1.0) == ("1", False)
    assert len(spy.calls) == 3
    spy.calls.clear()
    assert _majority_defined(records, 1.0) == ("1", False)
    assert len(spy.calls) == 3 + 7 * 3  # what the sample-by-sample vote cost
    spy.calls.clear()
    lines = [
        _record(problem, index, sample, answer, answer == "3")
        for index, problem in enumerate("ab")
        for sample, answer in enumerate(answers * 2)
    ]
    summary = summarize(lines, n=8)
    assert [p["majority"] for p in summary["per_problem"]] == ["1", "1"]
    assert len(spy.calls) == 3


def test_summary_refuses_a_problem_without_its_n_samples() -> None:
    """pass@k and avg@n average over problems; one with fewer samples (or a sample twice) would
    count unevenly, so a summary of such lines is refused, naming the problem."""
    whole = [_record("a", 0, s, "1/2", True) for s in range(2)]
    for lines, found in [
        (whole + [_record("b", 1, 0, "7", False)], "[0]"),
        (whole + [_record("b", 1, s, "7", False) for s in (0, 0)], "[0, 0]"),
        (whole + [_record("b", 1, s, "7", False) for s in (0, 1, 2)], "[0, 1, 2]"),
    ]:
        with pytest.raises(ValueError, match=re.escape(f"problem 'b' has samples {found}")):
            summarize(lines, n=2)
    assert summarize(whole, n=2)["problems"] == 1


def test_majority_counts_equivalent_answers_together(monkeypatch) -> None:
    spy = _Spy({("0.5", "\\frac12")})
    monkeypatch.setattr("papo.rewards.verify", spy)
    records = [
        {"answer": a, "parsed": True, "correct": a != "7"}
        for a in ["7", "\\frac12", "7", "0.5", "0.5"]
    ]
    assert evaluate._majority(records, 1.0) == ("\\frac12", True)
    records[1]["answer"] = "1/2"  # graded correct: it votes with 0.5, though verify differs
    assert evaluate._majority(records, 1.0) == ("1/2", True)


def test_majority_agrees_with_the_grades_whatever_the_order(monkeypatch) -> None:
    """math-verify's equivalence is not transitive (0.5 ~ 50%, 50% ~ 50, not 0.5 ~ 50; 2 ~ x=2,
    2 ~ y=2, not x=2 ~ y=2): a correct answer grouped under a wrong first answer made maj@n 0
    with three of four samples correct, and the order of the samples decided it."""
    related = {("50\\%", "0.5"), ("0.5", "50\\%"), ("50", "50\\%"), ("50\\%", "50")}
    related |= {(a, b) for a in ("2", "x=2", "y=2") for b in ("2",)} | {("2", "x=2"), ("2", "y=2")}
    monkeypatch.setattr("papo.rewards.verify", _Spy(related))

    def records(answers, correct):
        return [{"answer": a, "parsed": True, "correct": a in correct} for a in answers]

    # reference 50: 0.5 is wrong, 50\% and 50 are right
    assert evaluate._majority(records(["0.5", "50\\%", "50", "50"], {"50\\%", "50"}), 1.0) == (
        "50\\%",
        True,
    )
    for order in (["2", "x=2", "y=2", "7", "7", "7"], ["x=2", "2", "y=2", "7", "7", "7"]):
        answer, correct = evaluate._majority(records(order, {"2", "x=2", "y=2"}), 1.0)
        assert correct and answer == order[0], "3 correct against 3 of 7: the first group"


def test_report_shows_a_dash_for_the_width_when_no_sample_has_a_block() -> None:
    records = [_record("a", 0, s, "1/2", True, widths=[], parallel=False) for s in range(2)]
    summary = summarize(records, n=2)
    assert summary["blocks"] == 0 and summary["mean_width"] == 0.0 and summary["max_width"] == 0
    assert "| branch width mean / max | – |" in markdown_report(summary)
    records = [_record("a", 0, s, "1/2", True, widths=[2, 3]) for s in range(2)]
    summary = summarize(records, n=2)
    assert summary["blocks"] == 4
    assert "| branch width mean / max | 2.50 / 3 |" in markdown_report(summary)


# --- problems and prompts -----------------------------------------------------------------------


def test_load_problems_reads_the_usual_fields(tmp_path, data) -> None:
    problems, errors = load_problems(data)
    assert errors == []
    assert [(p.id, p.reference) for p in problems] == [("p1", "2"), ("p2", "1"), ("p3", "9")]
    assert problems[1].question.startswith("Compute")
    # a solution's answer in the MATH grader's other box forms
    solutions = tmp_path / "solutions.jsonl"
    solutions.write_text(
        json.dumps({"problem": "a?", "solution": "So $\\boxed 4$."})
        + "\n"
        + json.dumps({"problem": "b?", "solution": "So \\fbox{\\frac{1}{2}}."})
        + "\n"
    )
    problems, errors = load_problems(solutions)
    assert errors == [] and [p.reference for p in problems] == ["4", "\\frac{1}{2}"]
    # a .json list, wrapped in an object, with field overrides and a limit
    records = [{"q": "one?", "final": "1", "key": "x"}, {"q": "two?", "final": "2", "key": "y"}]
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"rows": records}))
    fields = {"problem": "q", "answer": "final", "id": "key"}
    problems, errors = load_problems(wrapped, fields=fields, limit=1)
    assert errors == [] and [(p.id, p.question, p.reference) for p in problems] == [
        ("x", "one?", "1")
    ]
    # HMMT February 2025 numbers its problems with problem_idx (1..30)
    hmmt = tmp_path / "hmmt.json"
    hmmt.write_text(json.dumps([{"problem_idx": 1, "problem": "a?", "answer": "2"}]))
    assert [p.id for p in load_problems(hmmt)[0]] == ["1"]


def test_a_file_of_no_usable_problem_says_why(tmp_path, engine) -> None:
    caps = tmp_path / "caps.json"
    caps.write_text(json.dumps([{"Problem": "a?", "Answer": "1"}] * 4))
    with pytest.raises(EvalError, match=r"no problems to evaluate: .*item 1: no problem text"):
        run_eval(config(caps, tmp_path / "run"), engine=engine)


def test_load_problems_reports_bad_records_with_line_numbers(tmp_path) -> None:
    path = tmp_path / "bad.jsonl"
    lines = [
        json.dumps({"problem": "fine?", "answer": "1"}),
        "{not json",
        json.dumps({"problem": "no answer here"}),
        json.dumps({"answer": "3"}),
        json.dumps(["a list"]),
        json.dumps({"problem": "solution without a box", "solution": "it is 4"}),
        "",
        json.dumps({"problem": "also fine?", "answer": "5"}),
        '{"problem": "a cut emoji \\ud83d?", "answer": "6"}',  # not text: tokenizers refuse it
        '{"problem": "pair \\ud83d\\ude00?", "answer": "7 \\udc00"}',
        '{"problem": "a whole emoji \\ud83d\\ude00?", "answer": "8"}',
    ]
    path.write_text("\n".join(lines) + "\n")
    problems, errors = load_problems(path)
    assert [p.reference for p in problems] == ["1", "5", "8"]
    # every record counts, the one that is not JSON too: fixing it in place shifts no id
    assert [p.index for p in problems] == [0, 6, 9]
    assert [e.split(": ", 1)[0] for e in errors] == [f"{path}:{n}" for n in (2, 3, 4, 5, 6, 9, 10)]
    assert "not JSON" in errors[0] and "no answer" in errors[1] and "no problem" in errors[2]
    assert "lone surrogate (\\ud83d" in errors[5] and "lone surrogate (\\udc00" in errors[6]
    whole = tmp_path / "whole.json"
    whole.write_text('[{"problem": "q \\udc00", "answer": "1"}, {"problem": "r", "answer": "2"}]')
    problems, errors = load_problems(whole)
    assert [p.reference for p in problems] == ["2"] and "item 1: holds a lone surrogate" in errors[
        0
    ]


def test_a_repeated_id_is_renamed_to_one_no_other_problem_has(tmp_path) -> None:
    path = tmp_path / "ids.jsonl"
    ids = ["a", "a#2", "a", "a", "b"]
    path.write_text(
        "".join(json.dumps({"id": i, "problem": f"q{i}", "answer": "1"}) + "\n" for i in ids)
    )
    problems, errors = load_problems(path)
    assert [p.id for p in problems] == ["a", "a#2", "a#2#2", "a#3", "b"]
    assert errors == [
        f"{path}:3: duplicate id 'a'; using a#2#2",
        f"{path}:4: duplicate id 'a'; using a#3",
    ]


def test_numeric_answers_are_written_out_and_other_values_refused(tmp_path) -> None:
    """JSON numbers are references too, written in full (``1e-05`` is 0.00001, which math-verify
    reads); booleans, objects and non-finite numbers are not answers; a number too long for
    Python or a record nested too deeply is a bad line, not a traceback."""
    from papo.rewards import accuracy

    path = tmp_path / "numbers.jsonl"
    answers = [0.00001, 1e16, 2.5, 2.0, 42, True, {"x": 1}]
    lines = [json.dumps({"problem": f"q{i}?", "answer": a}) for i, a in enumerate(answers)]
    lines += [
        '{"problem": "inf?", "answer": Infinity}',
        '{"problem": "x", "answer": 1' + "0" * 5000 + "}",
    ]
    lines += ["[" * 100_000 + "]" * 100_000]
    path.write_text("\n".join(lines) + "\n")
    problems, errors = load_problems(path)
    assert [p.reference for p in problems] == ["0.00001", "10000000000000000", "2.5", "2", "42"]
    assert accuracy("so \\boxed{10^{-5}}", problems[0].reference).correct
    assert [e.split(": ", 1)[0] for e in errors] == [f"{path}:{n}" for n in (6, 7, 8, 9, 10)]
    assert all("not a string or a finite number" in e for e in errors[:3])
    assert all("not JSON" in e for e in errors[3:])


def test_load_problems_parquet(tmp_path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    rows = {"id": ["p1", "p2"], "question": ["one?", None], "answer": ["1", "2"]}
    pq.write_table(pa.table(rows), path)
    problems, errors = load_problems(path)
    assert [(p.id, p.reference) for p in problems] == [("p1", "1")]
    assert errors == [f"{path}:row 2: no problem text (field problem/question/prompt)"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.jsonl", None, "no such file"),
        ("broken.json", "[{", "not JSON"),
        ("scalar.json", "3", "list of problems"),
        ("data.csv", "a,b", "expected a .json"),
    ],
)
def test_load_problems_unreadable_files(tmp_path, name, content, message) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(EvalError, match=message):
        load_problems(path)


def test_prompt_templates(tmp_path) -> None:
    for name, grammar in [("npr", "npr"), ("multiverse", "multiverse"), ("cot", None)]:
        template = load_template(name)
        assert template.grammar == grammar and "\\boxed{}" in template.text
        rendered = template.render("Find $\\{x\\}$ in {braces}.")
        assert rendered.endswith("Find $\\{x\\}$ in {braces}.") and "{problem}" not in rendered
    assert (
        "<guideline>" in load_template("npr").text
        and "<Parallel>" in load_template("multiverse").text
    )
    custom = tmp_path / "mine.txt"
    custom.write_text("Answer with <step> tags.")
    template = load_template(str(custom))
    assert template.grammar == "npr" and template.render("Q?") == "Answer with <step> tags.\n\nQ?"
    with pytest.raises(FileNotFoundError, match="neither a built-in"):
        load_template(str(tmp_path / "nope.txt"))


# --- runs on a tiny model -----------------------------------------------------------------------


def test_eval_run_outputs_and_schema(tmp_path, data, engine) -> None:
    out = tmp_path / "run"
    summary = run_eval(config(data, out, baseline="sequential"), engine=engine)
    assert set(SUMMARY_KEYS) <= set(summary)
    assert summary["n"] == 2 and summary["problems"] == 3 and summary["samples"] == 6
    assert set(summary["pass_at_k"]) == {"1", "2"}
    # constrained decoding keeps the layout; a sample cut by the budget may still lose points
    assert 0 < summary["format_valid_rate"] <= 1
    assert summary["parallel_rate"] == 1.0 and summary["executed_parallel_rate"] == 1.0
    assert summary["mean_width"] >= 2
    assert summary["tokens_per_s"] > 0 and summary["speedup_vs_sequential"] > 0
    assert summary["baseline"]["mode"] == "sequential"
    assert json.loads((out / "summary.json").read_text()) == summary
    report = (out / "report.md").read_text()
    assert "avg@2" in report and "speedup vs sequential" in report and "| p3 |" in report

    records = read_samples(out)
    assert [(r["problem_id"], r["sample"]) for r in records] == [
        (p, s) for p in ("p1", "p2", "p3") for s in (0, 1)
    ]
    for record in records:
        graph = ReasoningGraph.from_dict(record["graph"])
        assert graph.metadata["mode"] == "constrained"
        # the chat template is applied (SmolLM2's starts with <|im_start|>)
        assert graph.text.startswith("<|im_start|>")
        assert record["metrics"]["tokens"] == len(response_ids(record))
        assert record["correct"] is False and record["parsed"] is False  # random weights
        assert record["group"]["baseline"]["samples"] == 2
    assert summary["unparsed_answers"] == 6
    assert not list(out.glob("samples.part-*")) and not (out / "claims").exists(), (
        "part files are merged away"
    )

    # Run again: everything is on disk, nothing is decoded, the summary is the same.
    calls = []
    again = run_eval(
        config(data, out, baseline="sequential"),
        engine=engine,
        on_problem=lambda *a: calls.append(a),
    )
    assert calls == [] and again == summary


def test_a_lone_problem_and_its_baseline_side_by_side_take_the_calls_time(
    tmp_path, data, engine
) -> None:
    """With ``batch=2`` one problem and its baseline decode at once: the call took as long as
    the later of the two, not their sum (which a lone problem's record used to give)."""
    summary = run_eval(
        config(data, tmp_path / "lone", baseline="sequential", batch=2, limit=1), engine=engine
    )
    (first, _) = read_samples(tmp_path / "lone")
    group, ends = first["group"], engine.stats.prompt_seconds
    assert group["stream"]["ended_s"] == max(end for _, end in ends.values())
    assert summary["engine_calls"] == 1
    assert summary["wall_time_s"] == group["stream"]["ended_s"]
    assert summary["wall_time_s"] < group["wall_time"] + group["baseline"]["wall_time"]
    assert summary["max_batch"] == 2


def test_batched_problems_sample_what_one_at_a_time_does(tmp_path, data, engine) -> None:
    """``batch=2`` keeps two prompts decoding (a problem's baseline is one), each next one
    admitted as one ends, and writes each problem as it ends: the samples are those of one
    prompt at a time (one seed per problem); each problem records its own time in the engine,
    and the summary takes the call's wall time from when its last problem ended; a prompt the
    engine cannot take is reported and the others decoded."""
    single = run_eval(config(data, tmp_path / "single", baseline="sequential"), engine=engine)
    calls = []
    batched = run_eval(
        config(data, tmp_path / "batched", baseline="sequential", batch=2),
        engine=engine,
        on_problem=lambda p, r: calls.append(p.id),
    )
    assert sorted(calls) == ["p1", "p2", "p3"]
    got, want = read_samples(tmp_path / "batched"), read_samples(tmp_path / "single")
    assert [response_ids(r) for r in got] == [response_ids(r) for r in want]
    assert [r["metrics"] for r in got] == [r["metrics"] for r in want]
    for record, reference in zip(got, want, strict=True):  # each problem's own tokens
        assert record["group"]["generated_tokens"] == reference["group"]["generated_tokens"]
        base, reference_base = record["group"]["baseline"], reference["group"]["baseline"]
        assert base["generated_tokens"] == reference_base["generated_tokens"]
        assert base["correct"] == reference_base["correct"] and base["samples"] == 2
    for run, batch in ((got, 2), (want, 1)):
        groups = [r["group"] for r in run[::2]]
        streams = [g["stream"] for g in groups]
        assert len({s["id"] for s in streams}) == 1, "one engine call for the shard"
        assert {(s["problems"], s["batch"]) for s in streams} == {(3, batch)}
        ended = sorted(s["ended_s"] for s in streams)
        assert ended[0] < ended[-1], "problems end one after another, not with their batch"
        for group in groups:
            for part in (group, group["baseline"]):
                assert part["wall_time"] > 0
                assert part["tokens_per_s"] == pytest.approx(
                    part["generated_tokens"] / part["wall_time"]
                )
    # one prompt at a time: each problem's and its baseline's times in the engine follow
    # each other within the call's wall time
    engine_times = [r["group"]["wall_time"] + r["group"]["baseline"]["wall_time"] for r in want]
    assert sum(engine_times[::2]) <= single["wall_time_s"]
    for summary, run in ((batched, got), (single, want)):
        firsts = run[::2]
        assert summary["engine_calls"] == 1
        assert summary["wall_time_s"] == max(r["group"]["stream"]["ended_s"] for r in firsts)
        latency = sum(r["group"]["wall_time"] for r in firsts)
        base_latency = sum(r["group"]["baseline"]["wall_time"] for r in firsts)
        assert summary["latency_s"] == pytest.approx(latency)
        assert summary["tokens_per_s"] == pytest.approx(summary["tokens"] / latency)
        assert summary["baseline"]["wall_time_s"] == pytest.approx(base_latency)
        assert summary["latency_speedup_vs_sequential"] == pytest.approx(base_latency / latency)
        assert summary["engine_tokens_per_s"] == pytest.approx(
            (summary["tokens"] + summary["baseline"]["tokens"]) / summary["wall_time_s"]
        )
    assert batched["tokens"] == single["tokens"]
    assert batched["baseline"]["tokens"] == single["baseline"]["tokens"]
    report = (tmp_path / "batched" / "report.md").read_text()
    assert "(3 problems, up to 2 prompts at once)" in report
    assert "at once" not in (tmp_path / "single" / "report.md").read_text()
    assert {k: batched[k] for k in ("avg_at_n", "parallel_rate", "mean_width")} == {
        k: single[k] for k in ("avg_at_n", "parallel_rate", "mean_width")
    }

    # a sequential run with its sequential baseline: both parts of every problem are written
    plain = run_eval(
        config(data, tmp_path / "plain", mode="sequential", baseline="sequential", batch=3),
        engine=engine,
    )
    assert plain["problems"] == 3 and plain["baseline"]["tokens"] == plain["tokens"]

    words = " ".join(["seven"] * engine.max_positions)
    rows = [PROBLEMS[0], {"id": "long", "problem": f"Add: {words}", "answer": "1"}, PROBLEMS[2]]
    long_data = tmp_path / "long.jsonl"
    long_data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = run_eval(config(long_data, tmp_path / "long", batch=3), engine=engine)
    assert summary["problems"] == 2 and summary["errors"][0].startswith("problem long: ")
    assert [r["problem_id"] for r in read_samples(tmp_path / "long")] == ["p1", "p1", "p3", "p3"]
    with pytest.raises(EvalError, match="batch must be >= 1"):
        config(data, tmp_path / "x", batch=0)


def test_samples_cut_for_want_of_kv_cache_are_counted(
    tmp_path, data, tiny_dir, monkeypatch, capsys
) -> None:
    """A pool that holds the prompt but not its samples cuts them (kv_exhausted): the summary
    and the report count them, since their grades say nothing about the model."""
    from npr_graph.engine import Engine

    small = Engine.from_pretrained(str(tiny_dir), num_pages=64, page_size=4)
    summary = run_eval(config(data, tmp_path / "run", limit=1), engine=small)
    cut = [
        r for r in read_samples(tmp_path / "run") if r["metrics"]["finish_reason"] == "kv_exhausted"
    ]
    assert summary["problems"] == 1 and summary["pool_cut_samples"] == len(cut) > 0
    report = (tmp_path / "run" / "report.md").read_text()
    assert f"| samples cut for want of KV cache | {len(cut)} |" in report
    monkeypatch.setattr(evaluate, "run_eval", lambda config: summary)
    assert main(_cli_args(tiny_dir, data, tmp_path / "run")) == 0
    assert (
        f"npr eval: {len(cut)} sample(s) cut short for want of KV cache" in capsys.readouterr().err
    )


def test_eval_modes_and_prompts(tmp_path, data, engine) -> None:
    sequential = run_eval(
        config(data, tmp_path / "seq", mode="sequential", prompt="cot", chat=False, limit=2),
        engine=engine,
    )
    assert sequential["problems"] == 2 and sequential["parallel_rate"] == 0.0
    record = read_samples(tmp_path / "seq")[0]
    assert record["graph"]["metadata"]["mode"] == "sequential"
    assert record["graph"]["text"].startswith("Solve the problem below."), "--no-chat"
    multiverse = run_eval(
        config(data, tmp_path / "mv", mode="parallel", prompt="multiverse", limit=1),
        engine=engine,
    )
    assert multiverse["problems"] == 1
    assert read_samples(tmp_path / "mv")[0]["graph"]["grammar"] == "multiverse"


def test_the_engine_warms_up_untimed_before_the_first_problem(
    tmp_path, data, tiny_dir, monkeypatch
):
    """The first problem's time held the engine's one-time costs (its baseline, decoded after
    it, did not): each evaluator warms the engine up once, in the run's modes, before its timed
    call, and the samples are those decoded without the warm-up (seeded per problem)."""
    from npr_graph.engine import Engine

    calls = []
    generate = Engine.generate

    def recording(self, prompts, params=None, **kwargs):
        calls.append((len(prompts), kwargs["mode"]))
        return generate(self, prompts, params, **kwargs)

    monkeypatch.setattr(Engine, "generate", recording)
    warmed = run_eval(config(data, tmp_path / "a", baseline="sequential"),
                      engine=Engine.from_pretrained(str(tiny_dir)))  # fmt: skip
    assert calls[:2] == [(1, "constrained"), (1, "sequential")] and len(calls) == 3
    monkeypatch.setattr(Engine, "warm_up", lambda *args: None)
    calls.clear()
    cold = run_eval(config(data, tmp_path / "b", baseline="sequential"),
                    engine=Engine.from_pretrained(str(tiny_dir)))  # fmt: skip
    assert len(calls) == 1
    assert warmed["tokens"] == cold["tokens"] and warmed["avg_at_n"] == cold["avg_at_n"]
    tokens = [[r["graph"]["token_ids"] for r in read_samples(tmp_path / d)] for d in "ab"]
    assert tokens[0] == tokens[1]


def test_interrupted_run_resumes_without_duplicates(tmp_path, data, engine) -> None:
    """A crash after the first problem: the rerun decodes only the rest, and the samples are the
    ones an uninterrupted run produces (one seed per problem)."""
    clean = tmp_path / "clean"
    run_eval(config(data, clean), engine=engine)

    out = tmp_path / "crashed"

    def crash(problem, records):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_eval(config(data, out), engine=engine, on_problem=crash)
    assert not (out / "samples.jsonl").exists() and len(list(out.glob("samples.part-*"))) == 1
    resumed = []
    run_eval(config(data, out), engine=engine, on_problem=lambda p, r: resumed.append(p.id))
    assert resumed == ["p2", "p3"]
    got, want = read_samples(out), read_samples(clean)
    assert [(r["problem_id"], r["sample"]) for r in got] == [
        (r["problem_id"], r["sample"]) for r in want
    ]
    assert [response_ids(r) for r in got] == [response_ids(r) for r in want]


def test_line_separators_in_text_neither_split_problems_nor_lose_samples(tmp_path, engine) -> None:
    """U+2028, U+2029 and U+0085 end lines for ``str.splitlines`` but sit raw inside JSON strings
    (samples are written with ensure_ascii=False): a problem holding them is one record, and a
    sample holding them survives a resume. A byte order mark does not lose line 1."""
    problems = [dict(p) for p in PROBLEMS]
    problems[0]["problem"] = "What is\u2028$1+1$?\u2029\x85"
    data = tmp_path / "problems.jsonl"
    text = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in problems)
    data.write_bytes(b"\xef\xbb\xbf" + text.encode())
    loaded, errors = load_problems(data)
    assert errors == [] and loaded[0].question == problems[0]["problem"]

    out = tmp_path / "run"

    def crash(problem, records):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_eval(config(data, out), engine=engine, on_problem=crash)
    resumed = []
    run_eval(config(data, out), engine=engine, on_problem=lambda p, r: resumed.append(p.id))
    assert resumed == ["p2", "p3"]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().split("\n")[:-1]]
    assert [r["problem_id"] for r in samples] == ["p1", "p1", "p2", "p2", "p3", "p3"]


def test_damaged_sample_lines_are_decoded_again(tmp_path, data, engine) -> None:
    """A sample line that parses as JSON but is not a sample record (keys missing, a list for an
    id) counts as cut: its problem is decoded again, and the file is whole afterwards."""
    out = tmp_path / "run"
    run_eval(config(data, out), engine=engine)
    want = read_samples(out)
    lines = (out / "samples.jsonl").read_text().splitlines()
    damaged = {
        ("p2", 0): json.dumps({"problem_id": "p2", "sample": 0}),
        ("p3", 1): json.dumps({**want[5], "problem_id": ["p3"]}),
    }
    keys = [(r["problem_id"], r["sample"]) for r in want]
    assert keys[2] == ("p2", 0) and keys[5] == ("p3", 1)
    lines[2], lines[5] = damaged[keys[2]], damaged[keys[5]]
    (out / "samples.jsonl").write_text("\n".join(lines) + "\n")
    redone = []
    summary = run_eval(
        config(data, out), engine=engine, on_problem=lambda p, r: redone.append(p.id)
    )
    assert redone == ["p2", "p3"] and summary["samples"] == 6
    got = read_samples(out)
    assert [response_ids(r) for r in got] == [response_ids(r) for r in want]


def test_prompt_longer_than_the_context_is_reported_and_the_rest_evaluated(
    tmp_path, engine
) -> None:
    words = " ".join(["seven"] * engine.max_positions)
    rows = [PROBLEMS[0], {"id": "long", "problem": f"Add: {words}", "answer": "1"}, PROBLEMS[2]]
    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    summary = run_eval(config(data, out), engine=engine)
    assert summary["problems"] == 2 and summary["samples"] == 4
    assert {r["problem_id"] for r in read_samples(out)} == {"p1", "p3"}
    [error] = summary["errors"]
    assert error.startswith("problem long: not evaluated: the prompt has ")
    assert f"exceeds the model's context of {engine.max_positions}" in error
    # a resume retries it (and reports it again) without redoing the others
    again = run_eval(config(data, out), engine=engine)
    assert again["errors"] == [error] and again["samples"] == 4


def test_a_prompt_one_rank_refused_and_another_ran_is_not_an_error(tmp_path, data, engine) -> None:
    """Ranks size their KV pools by their own GPU's free memory: a prompt one rank refuses,
    another may run. Only problems no rank ran are reported as not evaluated."""
    out = tmp_path / "run"
    run_eval(config(data, out, limit=2), engine=engine)
    problems, _ = evaluate.load_problems(str(data))
    refused = [
        (index, key, f"problem {key}: not evaluated: the pool is too small")
        for index, key in ((0, "p1"), (2, "p3"))
    ]
    summary = evaluate._merge_and_summarize(out, config(data, out), problems, [], refused, 2)
    assert summary["problems"] == 2
    assert summary["errors"] == ["problem p3: not evaluated: the pool is too small"]


def test_a_reward_of_ones_own_is_named_by_its_import_path(
    tmp_path, data, engine, monkeypatch
) -> None:
    """``--reward module:function`` grades with a function of the user's own; one that returns
    something else than a Reward, or one with a field of the wrong type, stops the run with an
    error that names it (it failed on an attribute, after the decoding)."""
    (tmp_path / "my_rewards.py").write_text(
        "from papo.rewards import Reward\n\n"
        "def always(response, reference, **options):\n"
        "    return Reward(1.0, True, reference, None, True)\n\n"
        "def a_float(response, reference, **options):\n"
        "    return 1.0\n\n"
        "def correct_as_int(response, reference, **options):\n"
        "    return Reward(0.0, 0, None, None, True)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    summary = run_eval(config(data, tmp_path / "run", reward="my_rewards:always"), engine=engine)
    assert summary["avg_at_n"] == 1.0 and summary["problems"] == 3
    expected = r"reward 'my_rewards:a_float' returned float, expected papo.rewards.Reward\(score, "
    with pytest.raises(ValueError, match=expected):
        run_eval(
            config(data, tmp_path / "float", reward="my_rewards:a_float", limit=1), engine=engine
        )
    # its samples were dropped at the merge as malformed: an empty summary, exit code 0
    expected = (
        r"reward 'my_rewards:correct_as_int' returned a .*: correct must be true or false, got 0"
    )
    with pytest.raises(ValueError, match=expected):
        run_eval(
            config(data, tmp_path / "int", reward="my_rewards:correct_as_int", limit=1),
            engine=engine,
        )
    with pytest.raises(EvalError, match="reward 'my_rewards:never' cannot be imported"):
        config(data, tmp_path / "other", reward="my_rewards:never")


def test_resume_with_other_settings_is_refused(tmp_path, data, engine) -> None:
    out = tmp_path / "run"
    run_eval(config(data, out, limit=1), engine=engine)
    with pytest.raises(EvalError, match=r"other settings \(n 2 -> 3; see"):
        run_eval(config(data, out, n=3, limit=1), engine=engine)
    longer = {**SAMPLING, "max_new_tokens": 48}
    with pytest.raises(EvalError) as refused:  # named inside the sampling settings
        run_eval(config(data, out, sampling=longer, limit=1), engine=engine)
    assert "other settings (sampling.max_new_tokens 40 -> 48; see" in str(refused.value)


def test_resume_refuses_data_whose_ids_name_other_problems(tmp_path, engine) -> None:
    """Ids that are line numbers: a problem added at the top of the data file shifts them, and a
    resumed run would skip the new problem as done. Its results hold each problem's key, so it
    is refused; an unchanged file resumes, and a file that only gained problems at the end too."""
    rows = [{"problem": "What is 2+3?", "answer": "5"}, {"problem": "What is 4+4?", "answer": "8"}]
    path = tmp_path / "numbered.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    run_eval(config(path, out), engine=engine)
    assert {r["problem_id"] for r in read_samples(out)} == {"0", "1"}
    run_eval(config(path, out), engine=engine)
    more = [*rows, {"problem": "What is 9+9?", "answer": "18"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in more))
    run_eval(config(path, out), engine=engine)
    assert {r["problem_id"] for r in read_samples(out)} == {"0", "1", "2"}
    path.write_text("".join(json.dumps(r) + "\n" for r in [more[2], *rows]))
    with pytest.raises(EvalError, match=r"3 problem\(s\) \('0', '1', '2'\) are not the ones"):
        run_eval(config(path, out), engine=engine)


def test_a_run_is_known_by_its_model_and_prompt_files_wherever_it_starts(
    tmp_path, data, engine, monkeypatch
) -> None:
    """A relative --model or --prompt names another file in another working directory: the
    run's settings hold them as absolute paths, so such a resume is refused, not mixed."""
    out = tmp_path / "run"
    for side in ("a", "b"):
        (tmp_path / side / "ckpt").mkdir(parents=True)
        (tmp_path / side / "t.txt").write_text(f"{side}: {{problem}}")
    monkeypatch.chdir(tmp_path / "a")
    run_eval(config(data, out, limit=1, model="ckpt", prompt="t.txt"), engine=engine)
    stored = json.loads((out / "config.json").read_text())
    assert (stored["model"], stored["prompt"]) == (
        str(tmp_path / "a" / "ckpt"),
        str(tmp_path / "a" / "t.txt"),
    )
    monkeypatch.chdir(tmp_path / "b")
    for changed in (dict(model="ckpt", prompt="../a/t.txt"), dict(model="../a/ckpt")):
        with pytest.raises(EvalError, match="other settings"):
            run_eval(config(data, out, limit=2, **{"prompt": "t.txt", **changed}), engine=engine)
    run_eval(config(data, out, limit=2, model="../a/ckpt", prompt="../a/t.txt"), engine=engine)
    assert {r["problem_id"] for r in read_samples(out)} == {"p1", "p2"}


def test_a_prompt_file_edited_between_runs_is_refused(tmp_path, data, engine) -> None:
    """A run's problems are all answered under one prompt: a prompt file edited in place (the
    same path) is another prompt. A run recorded before the prompt's text was still resumes."""
    out, template = tmp_path / "run", tmp_path / "t.txt"
    template.write_text("Answer: {problem}")
    run_eval(config(data, out, limit=1, prompt=str(template)), engine=engine)
    template.write_text("Answer briefly: {problem}")
    with pytest.raises(
        EvalError, match=r"other settings \(prompt_digest '[0-9a-f]+' -> '[0-9a-f]+';"
    ):
        run_eval(config(data, out, limit=2, prompt=str(template)), engine=engine)
    stored = json.loads((out / "config.json").read_text())
    del stored["prompt_digest"]
    (out / "config.json").write_text(json.dumps(stored))
    run_eval(config(data, out, limit=2, prompt=str(template)), engine=engine)
    assert {r["problem_id"] for r in read_samples(out)} == {"p1", "p2"}


def test_a_model_that_fails_to_load_pins_no_settings(tmp_path, data, tiny_dir, capsys) -> None:
    """config.json pins a run's settings; a first run whose model did not load wrote it, and
    the corrected command was refused for "other settings"."""
    out = tmp_path / "run"
    assert main(_cli_args(tmp_path / "no_such_model", data, out)) == 2
    assert "no_such_model" in capsys.readouterr().err
    assert not (out / "config.json").exists()
    assert main(_cli_args(tiny_dir, data, out)) == 0
    assert json.loads((out / "config.json").read_text())["model"] == str(tiny_dir)


@pytest.mark.parametrize("fails_here", [False, True])
def test_a_model_that_fails_to_load_on_one_rank_stops_every_rank(
    tmp_path, data, monkeypatch, fails_here
) -> None:
    """Under torchrun a rank whose model did not load stopped alone, and the others decoded
    until torchrun, seeing it exit, ended them without a word of why. Now every rank stops
    before decoding: the rank that failed with its own error, the others saying why."""
    from contextlib import contextmanager

    from npr_graph.ranks import Ranks

    class TwoRanks(Ranks):
        def gather(self, value):
            return [value, not fails_here]  # rank 1 failed, unless this rank did

        def broadcast(self, value):
            return value

    @contextmanager
    def joined():
        yield TwoRanks(rank=0, size=2)

    def load(config):
        if fails_here:
            raise OSError("no model in /nowhere")
        return object()  # never used: no rank decodes

    monkeypatch.setattr(evaluate, "joined_ranks", joined)
    monkeypatch.setattr(evaluate, "_load_engine", load)
    why = "no model in /nowhere" if fails_here else "another rank could not load the model"
    with pytest.raises(EvalError, match=why):
        run_eval(config(data, tmp_path / "run"))
    assert not list((tmp_path / "run").glob("samples*")), "nothing decoded"
    assert not (tmp_path / "run" / "config.json").exists(), "no settings pinned"


def _cli_args(tiny_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        # -n, not --n: torchrun's parser would take --n for an ambiguous prefix of its own options
        "eval", "--model", str(tiny_dir), "--data", str(data), "-n", "2",
        "--mode", "constrained", "--out", str(out), "--quiet", *CLI_SAMPLING, *extra,
    ]  # fmt: skip


def test_cli_bad_input(tmp_path, tiny_dir, capsys) -> None:
    code = main(_cli_args(tiny_dir, tmp_path / "missing.jsonl", tmp_path / "o1"))
    assert code == 2 and "no such file" in capsys.readouterr().err

    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(
        json.dumps(PROBLEMS[0]) + "\n{oops\n" + json.dumps({"problem": "no answer"}) + "\n"
    )
    code = main(_cli_args(tiny_dir, mixed, tmp_path / "o2"))
    err = capsys.readouterr().err
    assert code == 1, "input errors make the exit code 1; the good problem is still evaluated"
    assert f"{mixed}:2: not JSON" in err and f"{mixed}:3: no answer" in err
    assert "could not be parsed" in err
    summary = json.loads((tmp_path / "o2" / "summary.json").read_text())
    assert summary["problems"] == 1 and len(summary["errors"]) == 2

    code = main(_cli_args(tiny_dir, mixed, tmp_path / "o2", "--temperature", "0.5"))
    assert code == 2 and "other settings" in capsys.readouterr().err
    code = main(_cli_args(tiny_dir, mixed, tmp_path / "o3", "--prompt", "/no/such/prompt"))
    assert code == 2 and "neither a built-in" in capsys.readouterr().err
    code = main(_cli_args(tiny_dir, mixed, tmp_path / "o4", "--field", "question"))
    assert code == 2 and "KEY=NAME" in capsys.readouterr().err
    if not torch.cuda.is_available():
        code = main(_cli_args(tiny_dir, mixed, tmp_path / "o5", "--cuda-graphs"))
        assert code == 2 and "CUDA graphs need a CUDA device" in capsys.readouterr().err
        code = main(_cli_args(tiny_dir, mixed, tmp_path / "o6", "--device", "cuda"))
        assert code == 2 and "CUDA is not available" in capsys.readouterr().err
    for option, value, message in [
        ("--device", "foo", "not a device name"),
        ("--threads", "-1", "--threads must be >= 1"),
        ("--verify-timeout", "0", "positive number of seconds"),
        ("--batch", "0", "batch must be >= 1"),
        ("--max-lanes", "0", "max_lanes must be >= 1"),
        ("--reward", "acuracy", "unknown reward 'acuracy'; known: accuracy,"),
    ]:
        code = main(_cli_args(tiny_dir, mixed, tmp_path / "o7", option, value))
        assert code == 2 and message in capsys.readouterr().err, option
    assert not (tmp_path / "o7").exists(), "refused before anything ran"


def test_cli_error_names_its_rank_under_torchrun(tmp_path, tiny_dir, data, capsys, monkeypatch):
    """Under torchrun every rank prints its own error: each says which rank it is."""
    args = _cli_args(tiny_dir, data, tmp_path / "out", "--threads", "-1")
    assert main(args) == 2
    assert capsys.readouterr().err.startswith("npr eval: --threads must be >= 1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(args) == 2
    assert capsys.readouterr().err.startswith("npr eval: rank 1: --threads must be >= 1")


def test_cli_a_failing_write_is_an_error_and_the_run_resumes(
    tmp_path, tiny_dir, data, capsys, monkeypatch
) -> None:
    """A full disk while writing a problem: a one-line error, exit code 2, and the same command
    then resumes from the problems that were written whole."""
    import npr_graph.evaluate as evaluate

    fsync, calls = evaluate.os.fsync, []

    def full_disk(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        fsync(fd)

    monkeypatch.setattr(evaluate.os, "fsync", full_disk)
    out = tmp_path / "run"
    assert main(_cli_args(tiny_dir, data, out)) == 2
    err = capsys.readouterr().err
    assert "No space left on device; the problems written so far are kept" in err
    assert "Traceback" not in err
    monkeypatch.setattr(evaluate.os, "fsync", fsync)
    assert main(_cli_args(tiny_dir, data, out)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["problems"] == 3 and summary["samples"] == 3 * summary["n"]


def test_cli_kv_memory_sizes_the_engines_pool(
    tmp_path, tiny_dir, data, engine, capsys, monkeypatch
) -> None:
    """``--kv-memory GIB`` sizes the KV pool of the engine ``npr eval`` (and ``npr sample``)
    builds; ``auto``, the default, is the engine's own rule; anything else is refused."""
    import npr_graph.engine.engine as engine_module

    def parsed(*extra: str) -> EvalConfig:
        return config_from_args(build_parser().parse_args(_cli_args(tiny_dir, data, out, *extra)))

    out = tmp_path / "o"
    assert parsed().kv_memory == "auto" and parsed("--kv-memory", "0.25").kv_memory == 2**28
    pools = []

    class Recording(engine_module.Engine):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            pools.append((kwargs["kv_memory_bytes"], self.pool.num_pages, self.max_lanes))

    monkeypatch.setattr(engine_module, "Engine", Recording)
    extra = ("--limit", "1", "--kv-memory", "0.001", "--max-lanes", "9")
    assert main(_cli_args(tiny_dir, data, out, *extra)) == 0
    [(kv_bytes, pages, lanes)] = pools
    assert lanes == 9
    assert kv_bytes == int(0.001 * 2**30)
    slot_bytes = engine_module.ModelRunner.bytes_per_slot(engine.model)
    assert pages == max(8, kv_bytes // (engine.pool.page_size * slot_bytes))
    for value in ("0", "-1", "nan", "big"):
        with pytest.raises(SystemExit):
            parsed("--kv-memory", value)
        assert "--kv-memory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["sample", "--data", str(data), "--out", "x", "--kv-memory", "0"])


def test_cli_overlapped_steps_write_the_same_greedy_samples(tmp_path, tiny_dir, data) -> None:
    runs = {}
    for name, extra in {"plain": (), "overlap": ("--overlap",)}.items():
        out = tmp_path / name
        assert (
            main(_cli_args(tiny_dir, data, out, "--temperature", "0", "--limit", "2", *extra)) == 0
        )
        runs[name] = [response_ids(r) for r in read_samples(out)]
    assert len(runs["plain"]) == 4 and runs["overlap"] == runs["plain"]
    args = build_parser().parse_args(_cli_args(tiny_dir, data, tmp_path, "--overlap"))
    assert config_from_args(args).overlap


@pytest.mark.slow
def test_killed_run_resumes(tmp_path, tiny_dir, engine) -> None:
    """SIGKILL a real `npr eval` process midway, run it again: every problem has its n samples
    exactly once, equal to an uninterrupted run's."""
    problems = [
        {"id": f"q{i}", "problem": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(6)
    ]
    data = tmp_path / "six.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in problems))
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "npr_graph.cli", *_cli_args(tiny_dir, data, out)]
    process = subprocess.Popen(command, env=_env(), cwd=tmp_path, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            lines = sum(len(p.read_text().splitlines()) for p in out.glob("samples.part-*"))
            if lines >= 2:  # at least one problem written
                break
            time.sleep(0.05)
        assert process.poll() is None, "the run finished before it could be killed"
        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
    assert not (out / "summary.json").exists()
    written = sum(len(p.read_text().splitlines()) for p in out.glob("samples.part-*"))
    assert 2 <= written < 12

    result = subprocess.run(command, env=_env(), cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    got = read_samples(out)
    assert [(r["problem_id"], r["sample"]) for r in got] == [
        (f"q{i}", s) for i in range(6) for s in (0, 1)
    ]
    clean = tmp_path / "clean"
    run_eval(config(data, clean), engine=engine)
    assert [response_ids(r) for r in got] == [response_ids(r) for r in read_samples(clean)]


@pytest.mark.slow
def test_torchrun_two_ranks_merge_into_one_summary(tmp_path, tiny_dir, data, engine) -> None:
    """`torchrun --nproc_per_node 2` on gloo: problems split across two CPU ranks, merged into a
    summary of the same schema and values as a single-process run."""
    single = run_eval(config(data, tmp_path / "single", baseline="sequential"), engine=engine)
    out = tmp_path / "sharded"
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [
        str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "npr_graph.cli",
        *_cli_args(tiny_dir, data, out, "--baseline", "sequential"),
    ]  # fmt: skip
    result = subprocess.run(
        command, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sharded = json.loads((out / "summary.json").read_text())
    assert sharded.keys() == single.keys()
    assert sharded["world_size"] == 2 and single["world_size"] == 1
    same = ("avg_at_n", "pass_at_k", "best_at_n", "maj_at_n", "format_valid_rate", "parallel_rate")
    assert {k: sharded[k] for k in same + ("n", "problems")} == {
        k: single[k] for k in same + ("n", "problems")
    }
    records = read_samples(out)
    assert [(r["problem_id"], r["sample"]) for r in records] == [
        (p, s) for p in ("p1", "p2", "p3") for s in (0, 1)
    ]
    assert [response_ids(r) for r in records] == [
        response_ids(r) for r in read_samples(tmp_path / "single")
    ]
    assert not list(out.glob("samples.part-*")) and not (out / "claims").exists()


def test_progress_bar_shows_problem_ids_as_they_are() -> None:
    """A problem id is data: one that looks like rich markup ("[/b]") is shown literally, not
    parsed (which raised MarkupError on a terminal and ended the run)."""
    import io

    from rich.console import Console

    progress = evaluate.problem_progress("sample", enabled=True)
    task = progress.add_task("", total=2)
    progress.update(task, advance=1, description="last: problem [/b] [red]x")
    console = Console(file=io.StringIO(), force_terminal=True, width=120)
    console.print(progress.make_tasks_table(progress.tasks))
    assert "last: problem [/b] [red]x" in console.file.getvalue()


def test_a_prompt_every_rank_refused_is_listed_once() -> None:
    """Each rank checks every prompt against its own pool, whose size its reason quotes (pools
    sized by each GPU's free memory differ): the problem is listed once, with rank 0's reason."""
    parts = [
        [(2, "p3", "problem p3: does not fit the KV pool of 100 pages"),
         (0, "p1", "problem p1: exceeds the model's context")],
        [(0, "p1", "problem p1: exceeds the model's context"),
         (2, "p3", "problem p3: does not fit the KV pool of 98 pages")],
    ]  # fmt: skip
    assert evaluate.refused_once(parts) == [
        (0, "p1", "problem p1: exceeds the model's context"),
        (2, "p3", "problem p3: does not fit the KV pool of 100 pages"),
    ]
    assert evaluate.refused_once([[], []]) == []
