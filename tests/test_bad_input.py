"""Hostile and huge input: every entry point finishes in bounded time with a result.

Strict parsing returns a graph or raises ParseError; lenient parsing, validation and the format
score always return. Times are asserted with generous bounds: they catch hangs and super-linear
blow-ups, not small regressions.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

import pytest
from conftest import MULTIVERSE_TRACE, NPR_TRACE

from npr_graph import (
    ParseError,
    ReasoningGraph,
    compact_mask,
    format_score,
    metrics,
    parse,
    position_ids,
    validate,
)
from npr_graph.graph import check_partition
from npr_graph.parse import DIALECTS
from npr_graph.strategies import BlockSpec, TraceSpec, render
from npr_graph.tokenizers import CharTokenizer

ALL_TAG_TEXTS = DIALECTS["npr"].tag_texts + DIALECTS["multiverse"].tag_texts

MB = 1_000_000


def timed(call: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = call()
    return result, time.perf_counter() - start


def strict_or_error(text: str, grammar: str) -> ReasoningGraph | ParseError:
    try:
        graph = parse(text, grammar=grammar)
    except ParseError as error:
        assert error.line >= 1 and error.column >= 1 and 0 <= error.pos <= len(text)
        return error
    check_partition(graph)
    return graph


def survives(text: str, grammar: str, bound_s: float) -> ReasoningGraph:
    """Run every entry point on ``text``; each must return within ``bound_s`` seconds."""
    _, elapsed = timed(lambda: strict_or_error(text, grammar))
    assert elapsed < bound_s, f"strict parse took {elapsed:.1f}s"
    lenient, elapsed = timed(lambda: parse(text, grammar=grammar, lenient=True))
    assert elapsed < bound_s, f"lenient parse took {elapsed:.1f}s"
    check_partition(lenient)
    for profile in ("strict", "lenient"):
        found, elapsed = timed(lambda p=profile: validate(text, p, grammar=grammar))
        assert isinstance(found, list)
        assert elapsed < bound_s, f"validate({profile}) took {elapsed:.1f}s"
    score, elapsed = timed(lambda: format_score(text))
    assert isinstance(score, float)
    assert elapsed < bound_s, f"format_score took {elapsed:.1f}s"
    return lenient


def tokenized_survives(text: str, grammar: str, bound_s: float) -> None:
    """Lenient parse from token ids, then the layout (compact form only) and metrics."""
    tokenizer = CharTokenizer()
    start = time.perf_counter()
    graph = parse(
        tokenizer.encode(text),
        grammar=grammar,
        tokenizer=tokenizer,
        prompt_ids=tokenizer.encode("Q: "),
        lenient=True,
    )
    check_partition(graph)
    for mode in ("native", "official"):
        assert position_ids(graph, mode).shape == (graph.num_tokens,)
        assert compact_mask(graph, mode).num_tokens == graph.num_tokens
    metrics(graph)
    elapsed = time.perf_counter() - start
    assert elapsed < bound_s, f"tokenized parse and layout took {elapsed:.1f}s"


grammars = pytest.mark.parametrize("grammar", ["npr", "multiverse"])


# -- empty and garbage ------------------------------------------------------------------------
@pytest.mark.timeout(60)
@grammars
@pytest.mark.parametrize("text", ["", " ", "\n\n\t", "\x00"])
def test_empty_and_blank(grammar, text):
    graph = survives(text, grammar, bound_s=5)
    assert graph.text == text
    assert "missing_answer" in {v.code for v in validate(text, grammar=grammar)}
    assert format_score(text) == -1.5
    tokenized_survives(text, grammar, bound_s=5)


def garbage(seed: int, size: int) -> str:
    return random.Random(seed).randbytes(size).decode("utf-8", errors="replace")


@pytest.mark.timeout(60)
@grammars
@pytest.mark.parametrize("seed", range(4))
def test_binary_garbage(grammar, seed):
    text = garbage(seed, 200_000)
    assert "\ufffd" in text and "\x00" in text
    survives(text, grammar, bound_s=10)
    tokenized_survives(text[:20_000], grammar, bound_s=10)


@pytest.mark.timeout(60)
@grammars
def test_garbage_laced_with_tags(grammar):
    rng = random.Random(7)
    tags = [
        *ALL_TAG_TEXTS,
        "\\boxed{",
        "}",
    ]
    text = "".join(
        rng.choice(tags) if rng.random() < 0.3 else garbage(rng.randrange(1 << 30), 8)
        for _ in range(20_000)
    )
    survives(text, grammar, bound_s=20)
    tokenized_survives(text[:30_000], grammar, bound_s=20)


# -- unclosed tags ----------------------------------------------------------------------------
UNCLOSED = [
    ("npr", "<guideline>"),
    ("npr", "<guideline>\n<plan>1: a"),
    ("npr", "<guideline>\n<plan>1: a</plan>\n</guideline>\n<step>\n1: b"),
    ("npr", "<guideline>\n<plan>1: a</plan>\n</guideline>\n<step>\n1: b\n</step>\n<takeaway>\nc"),
    ("npr", "<step>\n1: b\n\\boxed{1}"),
    ("multiverse", "<Parallel>"),
    ("multiverse", "<Parallel>\n<Goal>\n<Outline>1: a"),
    ("multiverse", "<Parallel>\n<Goal>\n<Outline>1: a</Outline>\n</Goal>\n<Path>\n1: b"),
    ("multiverse", "<Path>\n1: b\n<Parallel>\n<Path>\n1.1: c"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("grammar", "text"), UNCLOSED)
def test_unclosed_tags(grammar, text):
    with pytest.raises(ParseError):
        parse(text, grammar=grammar)
    survives(text, grammar, bound_s=5)
    assert "unclosed_tag" in {v.code for v in validate(text, grammar=grammar)}
    tokenized_survives(text, grammar, bound_s=5)


# -- a thousand nested or repeated tags -------------------------------------------------------
def nested_multiverse(depth: int) -> str:
    opening = "<Parallel>\n<Goal>\n<Outline>1: a</Outline>\n</Goal>\n<Path>\n1: b\n"
    closing = "</Path>\n<Conclusion>\nc\n</Conclusion>\n</Parallel>\n"
    return opening * depth + closing * depth + "\\boxed{1}"


THOUSANDS = [
    ("npr", "<step>" * 1000),
    ("npr", "<plan>" * 1000),
    ("npr", "</step>" * 1000),
    ("npr", "<guideline>" * 1000),
    ("npr", "<step>\n1: x\n" * 1000),
    ("npr", "<guideline><plan>1: a</plan></guideline>" + "<step>1: x</step>" * 1000),
    ("npr", "<guideline>" * 1000 + "</guideline>" * 1000),
    ("npr", "<step>" * 1000 + "</step>" * 1000),
    ("multiverse", nested_multiverse(1000)),
    ("multiverse", "<Path>" * 1000),
    ("multiverse", "<Path>" * 1000 + "</Path>" * 1000),
    ("multiverse", "<Parallel>" * 1000),
    ("multiverse", "<Parallel><Goal>" * 1000),
    ("multiverse", "<Parallel><Path>" * 1000),
    ("multiverse", "</Parallel>" * 1000),
    ("multiverse", "<Outline>" * 1000),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("grammar", "text"), THOUSANDS, ids=lambda v: v[:24])
def test_a_thousand_tags(grammar, text):
    survives(text, grammar, bound_s=10)
    survives(text, "multiverse" if grammar == "npr" else "npr", bound_s=10)
    tokenized_survives(text, grammar, bound_s=20)


@pytest.mark.timeout(60)
def test_deep_nesting_is_cut_at_the_depth_limit():
    text = nested_multiverse(1000)
    with pytest.raises(ParseError, match="deeper than"):
        parse(text, grammar="multiverse")
    codes = {v.code for v in validate(text, grammar="multiverse")}
    assert "too_deep" in codes


@pytest.mark.timeout(60)
@pytest.mark.parametrize("lenient", [False, True])
def test_raised_depth_limit_does_not_overflow_the_stack(lenient):
    text = nested_multiverse(300)
    try:
        graph = parse(text, grammar="multiverse", lenient=lenient, max_depth=1000)
    except ParseError:
        return
    assert len(graph.blocks) == 300


@pytest.mark.timeout(60)
def test_depth_limit_is_the_same_in_both_modes():
    text = nested_multiverse(33)
    try:
        strict = parse(text, grammar="multiverse")
    except ParseError:
        strict = None
    lenient = parse(text, grammar="multiverse", lenient=True)
    if strict is None:
        assert "too_deep" in {v.code for v in lenient.violations}
    else:
        assert lenient.violations == []
        assert lenient.to_dict() == strict.to_dict()


# -- ten megabytes ----------------------------------------------------------------------------
PARAGRAPH = "Let x = 3 and y < 4; then x + y > 6, so we keep going with care. " * 4


def realistic_block(grammar: str) -> str:
    spec = TraceSpec("", [BlockSpec([PARAGRAPH[:80]] * 2, [PARAGRAPH] * 2, PARAGRAPH)], "")
    return render(spec, grammar)


@pytest.mark.slow
@pytest.mark.timeout(60)
@grammars
def test_ten_megabytes_of_repeated_blocks(grammar):
    block = realistic_block(grammar)
    text = block * (10 * MB // len(block)) + "\\boxed{1}"
    assert len(text) > 9.9 * MB
    graph, elapsed = timed(lambda: parse(text, grammar=grammar))
    assert elapsed < 30, f"strict parse took {elapsed:.1f}s"
    assert len(graph.blocks) == 10 * MB // len(block)
    found, elapsed = timed(lambda: validate(text, grammar=grammar))
    assert found == []
    assert elapsed < 30, f"validate took {elapsed:.1f}s"


@pytest.mark.timeout(60)
def test_ten_megabytes_of_repeated_blocks_lenient_and_score():
    block = realistic_block("npr")
    text = block * (10 * MB // len(block)) + "\\boxed{1}"
    _, elapsed = timed(lambda: parse(text, lenient=True))
    assert elapsed < 30, f"lenient parse took {elapsed:.1f}s"
    score, elapsed = timed(lambda: format_score(text))
    assert score == 0.0
    assert elapsed < 30, f"format_score took {elapsed:.1f}s"


@pytest.mark.timeout(60)
@grammars
def test_ten_megabytes_in_one_step(grammar):
    content = ("x < y and y > z; " * (10 * MB // 17 + 1))[: 10 * MB]
    spec = TraceSpec("", [BlockSpec(["plan"], [content], "done")], "\\boxed{1}")
    text = render(spec, grammar)
    graph = survives(text, grammar, bound_s=30)
    assert len(graph.nodes) < 20
    assert validate(text, grammar=grammar) == []


@pytest.mark.timeout(60)
def test_ten_megabytes_without_tags():
    text = "no tags here, only words < and > signs. " * (10 * MB // 40)
    survives(text, "npr", bound_s=30)
    survives(text, "multiverse", bound_s=30)


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_one_megabyte_of_minimal_blocks():
    """The densest valid trace: every few characters a tag (about 18,000 blocks per MB)."""
    block = render(TraceSpec("", [BlockSpec(["a", "b"], ["x", "y"], "z")], ""))
    text = block * (MB // len(block)) + "\\boxed{1}"
    survives(text, "npr", bound_s=30)


@pytest.mark.timeout(60)
def test_format_score_many_steps_without_takeaway():
    """The reference regex backtracks exponentially here; the port must stay linear."""
    text = "<guideline><plan>abc</plan></guideline>" + "<step>xxxxxx</step>" * 20_000
    score, elapsed = timed(lambda: format_score(text))
    assert score == -1.5
    assert elapsed < 5
    survives(text, "npr", bound_s=30)


@pytest.mark.timeout(60)
def test_tokenized_megabyte():
    block = realistic_block("npr")
    text = block * (MB // len(block)) + "\\boxed{1}"
    tokenized_survives(text, "npr", bound_s=30)


def _corrupt(data: dict, change: str) -> Any:
    import copy

    data = copy.deepcopy(data)
    if change == "not a dict":
        return [data]
    if change == "schema":
        data["schema"] = 999
    elif change == "no text":
        del data["text"]
    elif change == "node not a dict":
        data["nodes"][1] = "plan"
    elif change == "unknown kind":
        data["nodes"][1]["kind"] = "lemma"
    elif change == "gap":
        data["nodes"][2]["char_start"] += 1
    elif change == "forward parent":
        data["nodes"][1]["parents"] = [5]
    elif change == "short cover":
        data["text"] += "more"
    elif change == "token gap":
        data["nodes"][1]["token_end"] += 1
    elif change == "block field":
        data["blocks"][0]["colour"] = "red"
    elif change in ("violation node", "violation span"):
        bad = dict(node=999) if change == "violation node" else dict(char_start=5, char_end=3)
        data["violations"] = [{"code": "stray_text", "message": "m", "node": 0, **bad}]
    elif change == "offsets reversed":
        data["token_offsets"] = data["token_offsets"][::-1]
    elif change == "offsets zero":
        data["token_offsets"] = [0] * len(data["token_offsets"])
    elif change == "response start":
        data["response_start"] = 10**9
    elif change == "prompt tokens":
        data["prompt_num_tokens"] = 10**6
    elif change == "nested in itself":
        data["blocks"][0]["parent"] = [0, 0]
    elif change == "join is a plan":
        data["blocks"][0]["join"] = data["blocks"][0]["items"][0]
    elif change == "plan is a step":
        data["blocks"][0]["items"][0] = data["blocks"][0]["branches"][0][0]
    elif change == "block of no node":
        data["blocks"].append({"index": 1, "depth": 0})
    elif change == "block of close nodes only":  # validate had no first node to point at
        data["blocks"].append({"index": 1, "depth": 0, "close": [len(data["nodes"]) - 1]})
        data["nodes"][-1]["block"] = 1
    elif change == "node text":  # rules read a node's own text
        step = data["nodes"][data["blocks"][0]["branches"][0][0]]
        step["text"] = step["text"][:6] + " " * (len(step["text"]) - 13) + step["text"][-7:]
    elif change == "tag past its node":
        data["nodes"][data["blocks"][0]["branches"][0][0]]["open_tag"] = [10**6, 10**6 + 6]
    elif change == "node of a missing block":
        data["nodes"][data["blocks"][0]["join"]]["block"] = 7
    elif change == "node its block does not name":
        data["nodes"][-1]["block"] = 0
    elif change == "step of another branch":
        data["nodes"][data["blocks"][0]["branches"][0][0]]["branch"] = 1
    elif change == "plan with a branch":
        data["nodes"][data["blocks"][0]["items"][0]]["branch"] = 0
    elif change == "named twice":
        data["blocks"][0]["close"].append(data["blocks"][0]["header"][0])
    return data


@pytest.mark.parametrize(
    "change",
    ["not a dict", "schema", "no text", "node not a dict", "unknown kind", "gap",
     "forward parent", "short cover", "token gap", "block field", "violation node",
     "violation span", "offsets reversed", "offsets zero", "response start", "prompt tokens",
     "nested in itself", "join is a plan", "plan is a step", "block of no node",
     "block of close nodes only", "node text", "tag past its node",
     "node of a missing block", "node its block does not name", "step of another branch",
     "plan with a branch", "named twice"],
)  # fmt: skip
def test_a_broken_graph_dict_is_a_value_error(change):
    """Saved graphs (samples.jsonl, to_json) read back wrong: a ValueError that says what is
    wrong, never another exception or a graph that does not tile its text."""
    graph = parse(NPR_TRACE, tokenizer=CharTokenizer())
    assert ReasoningGraph.from_dict(graph.to_dict()).to_dict() == graph.to_dict()
    with pytest.raises(ValueError, match=r"graph|node|schema|cover|chars|text|tokens|before"):
        ReasoningGraph.from_dict(_corrupt(graph.to_dict(), change))
    with pytest.raises(ValueError):
        ReasoningGraph.from_json('{"text": "x", "nodes": [')


def _paths(data, prefix=()):
    """Every key path of a JSON value, the first three items of each list."""
    items = data.items() if isinstance(data, dict) else enumerate(data[:3])
    for key, value in items:
        yield (*prefix, key)
        if isinstance(value, (dict, list)):
            yield from _paths(value, (*prefix, key))


@pytest.mark.parametrize("grammar", ["npr", "multiverse"])
def test_any_one_field_of_a_graph_dict_set_wrong_is_caught_or_harmless(grammar):
    """Every field of a saved graph (nested blocks in Multiverse), set to each of a few wrong
    values: from_dict raises a ValueError, or what it returns validates, lays out and renders
    without an error."""
    import copy

    from npr_graph import attention_mask, metrics, position_ids, render, validate

    text = "pre " + (NPR_TRACE if grammar == "npr" else MULTIVERSE_TRACE)
    good = parse(text, grammar=grammar, tokenizer=CharTokenizer()).to_dict()
    values = [None, 5, -1, "x", [], {}, [1], [None], 1.5, True, "step", [[1, 2]], 10**9]
    accepted = 0
    for path in _paths(good):
        for value in values:
            data = copy.deepcopy(good)
            target = data
            for key in path[:-1]:
                target = target[key]
            target[path[-1]] = value
            try:
                graph = ReasoningGraph.from_dict(data)
            except ValueError:
                continue
            accepted += 1
            validate(graph), metrics(graph), render.to_dot(graph), render.tree_text(graph)
            attention_mask(graph), position_ids(graph), position_ids(graph, "official")
            graph.to_json()
    assert accepted > 0, "harmless changes (a label, the metadata) are still read"
