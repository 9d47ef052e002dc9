"""Properties of parsing, validation, layout and metrics over generated traces.

Traces come from :mod:`npr_graph.strategies`; every reference below (masks, positions, critical
paths) is recomputed here from the rendered text or from first principles, not from the module
under test.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from dataclasses import dataclass, field

import networkx as nx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from npr_graph import (
    RULES,
    ParseError,
    ReasoningGraph,
    attention_mask,
    compact_mask,
    metrics,
    parse,
    position_ids,
    validate,
)
from npr_graph.constraints import STRUCTURAL
from npr_graph.graph import check_partition, node_of_token
from npr_graph.strategies import (
    ALL_TAGS,
    GRAMMARS,
    MUTATIONS,
    TAGS,
    BlockSpec,
    TokenizedTrace,
    TraceSpec,
    Whitespace,
    graph_shapes,
    mutation_rules,
    mutations,
    nested_blocks,
    render,
    step_body,
    tokenize,
    traces,
    walk,
    whitespaces,
)
from npr_graph.strategies import specs as spec_strategy
from npr_graph.tokenizers import CharTokenizer

PROPERTY = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
grammars = pytest.mark.parametrize("grammar", GRAMMARS)


# -- round trips ---------------------------------------------------------------------------------
def _strip_label(content: str, label: str | None) -> str:
    return content.strip().removeprefix(f"{label}:").strip()


def _expected_blocks(spec: TraceSpec) -> list[dict]:
    """Per block in document order: depth, enclosing (block, branch), labelled contents."""
    out: list[dict] = []

    def visit(block: BlockSpec, depth: int, parent: tuple[int, int] | None, prefix: str) -> None:
        index = len(out)
        entry: dict = {"depth": depth, "parent": parent, "takeaway": block.takeaway.strip()}
        entry["plans"] = [(f"{prefix}{i}", p.strip()) for i, p in enumerate(block.plans, 1)]
        entry["steps"] = []
        out.append(entry)
        for i, step in enumerate(block.steps, 1):
            texts = [step_body(step).strip()]
            if not isinstance(step, str):
                texts += [p.strip() for p in step[1:] if isinstance(p, str) and p.strip()]
            entry["steps"].append((f"{prefix}{i}", texts))
            for inner in nested_blocks(step):
                visit(inner, depth + 1, (index, i - 1), f"{prefix}{i}.")

    for block in spec.blocks:
        visit(block, 0, None, "")
    return out


def _recovered_blocks(graph: ReasoningGraph) -> list[dict]:
    nodes = graph.nodes
    out = []
    for block in graph.blocks:
        steps = []
        for branch in block.branches:
            head = nodes[branch[0]]
            tails = [nodes[i].content.strip() for i in branch[1:] if nodes[i].content.strip()]
            steps.append((head.label, [_strip_label(head.content, head.label), *tails]))
        out.append(
            {
                "depth": block.depth,
                "parent": block.parent,
                "takeaway": nodes[block.join].content.strip(),
                "plans": [
                    (nodes[i].label, _strip_label(nodes[i].content, nodes[i].label))
                    for i in block.items
                ],
                "steps": steps,
            }
        )
    return out


@grammars
@settings(PROPERTY, max_examples=40)
@given(data=st.data())
def test_valid_traces_round_trip(grammar, data):
    """parse(render(spec)) recovers the spec; lenient parsing agrees node for node; no rule
    is broken."""
    spec, text = data.draw(traces(grammar, max_blocks=3, max_branches=4, max_depth=2))
    graph = parse(text, grammar=grammar)
    expected = _expected_blocks(spec)
    assert _recovered_blocks(graph) == expected
    assert [b.width for b in graph.blocks] == [len(e["steps"]) for e in expected]
    assert graph.nodes[-1].kind.value == "answer"
    assert graph.nodes[-1].content.strip() == spec.answer.strip()
    lenient = parse(text, grammar=grammar, lenient=True)
    assert lenient.violations == []
    assert lenient.to_dict() == graph.to_dict()
    assert validate(text, "strict", grammar=grammar) == []
    assert validate(graph, "strict") == []


@grammars
@settings(PROPERTY, max_examples=20)
@given(data=st.data())
def test_serialization_round_trips(grammar, data):
    shape = data.draw(graph_shapes(grammar, special_tags=None))
    graph = shape.graph
    expected = graph.to_dict()
    assert ReasoningGraph.from_json(graph.to_json()).to_dict() == expected
    assert ReasoningGraph.from_networkx(graph.to_networkx()).to_dict() == expected
    untokenized = parse(shape.text, grammar=grammar)
    assert ReasoningGraph.from_json(untokenized.to_json()).to_dict() == untokenized.to_dict()
    # a dict shares nothing with its graph, either way: editing one leaves the other alone
    graph.metadata["engine"] = {"violations": []}
    data_out = graph.to_dict()
    for key in ("token_ids", "token_offsets"):
        data_out[key].append(0)
    data_out["metadata"]["engine"]["violations"].append("x")
    assert graph.to_dict() != data_out and graph.metadata == {"engine": {"violations": []}}
    back = ReasoningGraph.from_dict(graph.to_dict())
    source = graph.to_dict()
    back_from = ReasoningGraph.from_dict(source)
    source["token_ids"][0] = -1
    source["metadata"]["engine"]["violations"].append("y")
    for block in source["blocks"]:
        block["items"].append(-1)
        for branch in block["branches"]:
            branch.append(-1)
    assert back_from.to_dict() == back.to_dict()


# -- mutations -----------------------------------------------------------------------------------
def _codes(text: str, grammar: str) -> set[str]:
    return {v.code for v in validate(text, "strict", grammar=grammar)}


def test_every_required_rule_has_a_mutation():
    required = {
        "plan_numbering",
        "step_numbering",
        "branch_count",
        "no_plans",
        "too_many_branches",
        "nesting",
        "tag_in_content",
        "empty_content",
        "stray_text",
        "missing_answer",
        "multiple_answers",
        "empty_answer",
        "missing_join",
        "unclosed_tag",
        "unmatched_close_tag",
        "missing_header",
        "too_deep",
    }
    assert required <= set(MUTATIONS)
    assert set(mutation_rules("npr")) == set(MUTATIONS) - {"missing_wrapper", "too_deep"}
    assert set(mutation_rules("multiverse")) == set(MUTATIONS) - {"nesting"}
    with pytest.raises(ValueError):
        MUTATIONS["nesting"](TraceSpec("", [], ""), "multiverse")


def _mutation_cases() -> list[tuple[str, str]]:
    return [(g, rule) for g in GRAMMARS for rule in mutation_rules(g)]


@pytest.mark.parametrize(("grammar", "rule"), _mutation_cases())
@settings(PROPERTY, max_examples=10)
@given(data=st.data())
def test_mutation_is_reported_alone(grammar, rule, data):
    text, drawn = data.draw(mutations(grammar, rules=[rule]))
    assert drawn == rule
    codes = _codes(text, grammar)
    assert rule in codes, f"{rule} not reported: {sorted(codes)}"
    extra = codes - {rule}
    assert not extra & STRUCTURAL, f"{rule} also reported structural {sorted(extra)}"
    assert not extra, f"{rule} also reported {sorted(extra)}"


# Rules the strict grammar enforces itself; the others are validation rules over a parsed graph.
SYNTAX_RULES = {
    "unclosed_tag",
    "unmatched_close_tag",
    "tag_in_content",
    "missing_join",
    "missing_header",
    "missing_branches",
    "unexpected_join",
    "missing_wrapper",
    "nesting",
    "too_deep",
}


@grammars
@settings(PROPERTY, max_examples=40)
@given(data=st.data())
def test_strict_grammar_rejects_exactly_the_syntax_mutations(grammar, data):
    text, rule = data.draw(mutations(grammar))
    if rule in SYNTAX_RULES:
        with pytest.raises(ParseError):
            parse(text, grammar=grammar)
    else:
        graph = parse(text, grammar=grammar)
        assert graph.to_dict() == parse(text, grammar=grammar, lenient=True).to_dict()


def test_missing_goal_reports_only_missing_header():
    text = (
        "<Parallel>\n<Path>\n1: a\n</Path>\n<Conclusion>\nb\n</Conclusion>\n</Parallel>\n\\boxed{1}"
    )
    assert _codes(text, "multiverse") == {"missing_header"}


def test_unclosed_nested_path_reports_only_unclosed_tag():
    """The nested block's <Conclusion> closes the unclosed nested <Path>: the </Path> ahead
    closes the enclosing path, which is still open."""
    text = (
        "<Parallel><Goal><Outline>1: a</Outline></Goal>"
        "<Path>1: b<Parallel><Goal><Outline>1.1: c</Outline></Goal>"
        "<Path>1.1: d<Conclusion>e</Conclusion></Parallel></Path>"
        "<Conclusion>f</Conclusion></Parallel>\\boxed{0}"
    )
    assert _codes(text, "multiverse") == {"unclosed_tag"}
    graph = parse(text, grammar="multiverse", lenient=True)
    assert [block.join is not None for block in graph.blocks] == [True, True]
    # With both </Path> closers still ahead, the nested <Path> is closed later: the <Conclusion>
    # inside it is content, as before.
    inside = text.replace(
        "d<Conclusion>e</Conclusion>", "d<Conclusion>e</Path><Conclusion>e</Conclusion>"
    )
    assert _codes(inside, "multiverse") == {"tag_in_content"}


# -- partition ------------------------------------------------------------------------------------
def _token_offsets(shape: TokenizedTrace) -> list[int]:
    offsets = [0]
    for token in shape.graph.token_ids:
        offsets.append(offsets[-1] + len(shape.tokenizer.decode([token])))
    return offsets


@PROPERTY
@given(shape=graph_shapes(prompt=None, special_tags=None))
def test_nodes_tile_text_and_tokens(shape):
    graph = shape.graph
    check_partition(graph)
    assert graph.text == shape.prompt + shape.text
    assert "".join(n.text for n in graph.nodes) == graph.text
    assert all(n.text == graph.text[n.char_start : n.char_end] for n in graph.nodes)
    owner = node_of_token(graph)
    assert len(owner) == graph.num_tokens == len(shape.tokenizer.encode(graph.text))
    assert owner == sorted(owner)
    offsets = _token_offsets(shape)
    assert graph.token_offsets == offsets
    for token, node_id in enumerate(owner):
        node = graph.nodes[node_id]
        assert node.char_start <= offsets[token] < node.char_end
    if shape.prompt:
        assert graph.nodes[0].kind.value == "prompt"
        assert graph.nodes[0].token_start == 0
        assert graph.prompt_num_tokens == len(shape.tokenizer.encode(shape.prompt))


# -- the format's own structure, read from the rendered tags -------------------------------------
@dataclass
class _Frame:
    """One block as its tags show it, in token indices."""

    fork: int | None = None  # last token of the header's close tag
    branches: list[list[int]] = field(default_factory=list)  # [open first, close last]
    join: list[int] = field(default_factory=list)  # [open first, close last]


def _frames(shape: TokenizedTrace) -> list[_Frame]:
    """Blocks in document order, found by scanning the response's tags with a stack."""
    tags = TAGS[shape.grammar]
    offsets = _token_offsets(shape)
    base = len(shape.prompt)
    opens_block = tags.wrapper or tags.header
    closes_block = tags.wrapper or tags.join
    frames: list[_Frame] = []
    stack: list[_Frame] = []
    pattern = "|".join(re.escape(t) for t in ALL_TAGS)
    for match in re.finditer(pattern, shape.text):
        closing, name = match.group().startswith("</"), match.group().strip("</>")
        first = bisect_right(offsets, base + match.start()) - 1
        last = bisect_right(offsets, base + match.end() - 1) - 1
        if name == opens_block and not closing:
            stack.append(_Frame())
            frames.append(stack[-1])
        frame = stack[-1]
        if name == tags.header and closing:
            frame.fork = last
        elif name == tags.branch:
            if closing:
                frame.branches[-1].append(last)
            else:
                frame.branches.append([first])
        elif name == tags.join:
            (frame.join.append(last) if closing else frame.join.append(first))
        if name == closes_block and closing:
            stack.pop()
    return frames


def _sibling_spans(frame: _Frame) -> list[range]:
    """Each branch from its open tag up to the next branch or the join: the whitespace after a
    close tag belongs to the branch before it."""
    starts = [b[0] for b in frame.branches] + [frame.join[0]]
    return [range(a, b) for a, b in zip(starts, starts[1:], strict=False)]


# -- native layout ---------------------------------------------------------------------------------
def _native_reference(graph: ReasoningGraph) -> tuple[torch.Tensor, torch.Tensor]:
    """Visibility from networkx ancestors; positions from longest chains of parent ends."""
    digraph = graph.to_networkx()
    length = graph.num_tokens
    mask = torch.zeros(length, length, dtype=torch.bool)
    end: dict[int, int] = {}
    positions = torch.zeros(length, dtype=torch.long)
    for node_id in nx.topological_sort(digraph):
        node = graph.nodes[node_id]
        rows = slice(node.token_start, node.token_end)
        for other in nx.ancestors(digraph, node_id):
            seen = graph.nodes[other]
            mask[rows, seen.token_start : seen.token_end] = True
        size = node.token_end - node.token_start
        mask[rows, rows] = torch.ones(size, size, dtype=torch.bool).tril()
        start = max((end[p] for p in digraph.predecessors(node_id)), default=0)
        positions[rows] = torch.arange(start, start + size)
        end[node_id] = start + size
    return mask, positions


def _check_compact(graph: ReasoningGraph, mode: str) -> None:
    compact = compact_mask(graph, mode)
    dense = attention_mask(graph, mode)
    assert torch.equal(compact.to_dense(), dense)
    length = graph.num_tokens
    query = torch.arange(length).repeat_interleave(length)
    key = torch.arange(length).repeat(length)
    assert torch.equal(compact.allows(query, key).view(length, length), dense)


@settings(PROPERTY, max_examples=40)
@given(shape=graph_shapes(prompt=None, special_tags=None, max_depth=2))
def test_native_layout(shape):
    graph = shape.graph
    mask = attention_mask(graph)
    positions = position_ids(graph)
    reference_mask, reference_positions = _native_reference(graph)
    assert torch.equal(mask, reference_mask)
    assert torch.equal(positions, reference_positions)
    _check_compact(graph, "native")

    length = graph.num_tokens
    assert not (mask & ~torch.ones(length, length, dtype=torch.bool).tril()).any()
    assert mask.diagonal().all()
    prompt = graph.prompt_num_tokens
    assert mask[prompt:, :prompt].all()
    assert positions[:prompt].tolist() == list(range(prompt))
    for node in graph.nodes:
        run = positions[node.token_start : node.token_end]
        assert torch.equal(run, torch.arange(node.token_end - node.token_start) + run[:1])

    for frame in _frames(shape):
        spans = _sibling_spans(frame)
        join = range(frame.join[0], frame.join[1] + 1)
        for i, mine in enumerate(spans):
            for j, other in enumerate(spans):
                if i != j:
                    assert not mask[mine.start : mine.stop, other.start : other.stop].any()
            assert mask[join.start : join.stop, mine.start : mine.stop].all()
        assert len({int(positions[span.start]) for span in spans}) == 1
        assert positions[spans[0].start] == positions[spans[0].start - 1] + 1
        longest = max(int(positions[span.stop - 1]) for span in spans)
        assert positions[frame.join[0]] == longest + 1


# -- official layout -------------------------------------------------------------------------------
def _official_reference(shape: TokenizedTrace) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference SFT layout, from the tags: a causal mask with every pair of branch spans of a
    block masked both ways; positions sequential except that each branch open tag restarts one
    past the header's close tag and the join's open tag one past the largest branch close tag."""
    length = shape.graph.num_tokens
    mask = torch.ones(length, length, dtype=torch.bool).tril()
    restarts: dict[int, tuple[str, list[int]]] = {}
    for frame in _frames(shape):
        spans = [range(a, b + 1) for a, b in frame.branches]
        for i, mine in enumerate(spans):
            for j, other in enumerate(spans):
                if i != j:
                    mask[mine.start : mine.stop, other.start : other.stop] = False
            restarts[mine.start] = ("after", [frame.fork])
        restarts[frame.join[0]] = ("after", [b for _, b in frame.branches])
    positions: list[int] = []
    for token in range(length):
        if token in restarts:
            positions.append(max(positions[t] for t in restarts[token][1]) + 1)
        else:
            positions.append(positions[-1] + 1 if positions else 0)
    return mask, torch.tensor(positions)


@PROPERTY
@given(shape=graph_shapes("npr", prompt=None, special_tags=None))
def test_official_layout_npr(shape):
    mask, positions = _official_reference(shape)
    assert torch.equal(position_ids(shape.graph, "official"), positions)
    assert torch.equal(attention_mask(shape.graph, "official"), mask)
    _check_compact(shape.graph, "official")


@PROPERTY
@given(shape=graph_shapes("multiverse", prompt=None, special_tags=None, max_depth=0))
def test_official_layout_multiverse_flat(shape):
    mask, positions = _official_reference(shape)
    assert torch.equal(position_ids(shape.graph, "official"), positions)
    assert torch.equal(attention_mask(shape.graph, "official"), mask)
    _check_compact(shape.graph, "official")


@PROPERTY
@given(shape=graph_shapes("multiverse", prompt=None, special_tags=None, max_depth=2))
def test_official_positions_multiverse_nested(shape):
    _, positions = _official_reference(shape)
    assert torch.equal(position_ids(shape.graph, "official"), positions)
    _check_compact(shape.graph, "official")


NESTED = (
    "<Parallel>\n<Goal>\n<Outline>1: a</Outline>\n<Outline>2: b</Outline>\n</Goal>\n"
    "<Path>\n1: c\n<Parallel>\n<Goal>\n<Outline>1.1: d</Outline>\n</Goal>\n"
    "<Path>\n1.1: e\n</Path>\n<Conclusion>\nf\n</Conclusion>\n</Parallel>\n</Path>\n"
    "<Path>\n2: g\n</Path>\n<Conclusion>\nh\n</Conclusion>\n</Parallel>\n\\boxed{1}"
)


def test_official_mask_hides_nested_paths_from_sibling_paths():
    tokenizer = CharTokenizer()
    graph = parse(tokenizer.encode(NESTED), grammar="multiverse", tokenizer=tokenizer)
    mask = attention_mask(graph, "official")
    text = NESTED
    nested_path = text.index("1.1: e")
    sibling = text.index("2: g")
    offsets = graph.token_offsets
    query = bisect_right(offsets, sibling) - 1
    key = bisect_right(offsets, nested_path) - 1
    assert not mask[query, key]


# -- metrics ---------------------------------------------------------------------------------------
def _longest_chain(graph: ReasoningGraph, weight) -> int:
    digraph = graph.to_networkx()
    best: dict[int, int] = {}
    for node_id in nx.topological_sort(digraph):
        node = graph.nodes[node_id]
        own = 0 if node.kind.value == "prompt" else weight(node)
        best[node_id] = own + max((best[p] for p in digraph.predecessors(node_id)), default=0)
    return max(best.values(), default=0)


@PROPERTY
@given(shape=graph_shapes(prompt=None, special_tags=None, max_depth=2))
def test_critical_path_is_longest_weighted_path(shape):
    for graph, weight in (
        (shape.graph, lambda n: n.num_tokens),
        (parse(shape.text, grammar=shape.grammar), lambda n: n.char_end - n.char_start),
    ):
        found = metrics(graph)
        total = sum(weight(n) for n in graph.nodes if n.kind.value != "prompt")
        critical = _longest_chain(graph, weight)
        assert found["critical_path_tokens"] == critical
        assert found["total_tokens"] == total
        assert found["theoretical_speedup"] == pytest.approx(total / critical)
        assert found["widths"] == [b.width for b in graph.blocks]


def test_prompt_node_stays_within_the_prompt():
    tokenizer = CharTokenizer()
    response = "\n\n" + render(TraceSpec("", [BlockSpec(["a"], ["b"], "c")], "\\boxed{1}"))
    graph = parse(tokenizer.encode(response), tokenizer=tokenizer, prompt_ids=tokenizer.encode("Q"))
    assert graph.nodes[0].token_end == graph.prompt_num_tokens
    assert metrics(graph)["total_tokens"] == graph.num_tokens - graph.prompt_num_tokens


# -- hostile input -----------------------------------------------------------------------------------
SOUP_PIECES = ALL_TAGS + ("\n", " ", "1: ", "1.1: ", "2: ", "\\boxed{x}", "\\boxed{", "}", "x")
tag_soup = st.lists(st.one_of(st.sampled_from(SOUP_PIECES), st.text(max_size=3)), max_size=40).map(
    "".join
)
anything = st.one_of(st.text(), tag_soup)


def _parse_any(text: str, grammar: str) -> None:
    try:
        graph = parse(text, grammar=grammar)
    except ParseError:
        pass
    else:
        check_partition(graph)
        assert graph.to_dict() == parse(text, grammar=grammar, lenient=True).to_dict()
    lenient = parse(text, grammar=grammar, lenient=True)
    check_partition(lenient)
    assert "".join(n.text for n in lenient.nodes) == text
    for profile in ("strict", "lenient"):
        found = validate(text, profile, grammar=grammar)
        assert all(v.code in RULES for v in found)


@grammars
@settings(PROPERTY, max_examples=600)
@given(text=anything)
def test_parser_total_on_arbitrary_text(grammar, text):
    _parse_any(text, grammar)


@grammars
@settings(PROPERTY, max_examples=100)
@given(data=st.data())
def test_parser_total_on_mutated_traces(grammar, data):
    text, _ = data.draw(mutations(grammar))
    cut = data.draw(st.integers(0, len(text)))
    _parse_any(text, grammar)
    _parse_any(text[:cut], grammar)


@grammars
@settings(PROPERTY, max_examples=100)
@given(text=tag_soup, prompt=st.text(max_size=4), special=st.booleans())
def test_layout_total_on_lenient_graphs(grammar, text, prompt, special):
    tokenizer = CharTokenizer(special_tags=special)
    graph = parse(
        tokenizer.encode(text),
        grammar=grammar,
        tokenizer=tokenizer,
        prompt_ids=tokenizer.encode(prompt) or None,
        lenient=True,
    )
    check_partition(graph)
    length = graph.num_tokens
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    for mode in ("native", "official"):
        mask = attention_mask(graph, mode)
        assert not (mask & ~causal).any()
        assert mask.diagonal().all()
        assert position_ids(graph, mode).shape == (length,)
        _check_compact(graph, mode)
    metrics(graph)


# -- the strategies themselves -----------------------------------------------------------------------
@grammars
@settings(PROPERTY, max_examples=20)
@given(data=st.data())
def test_render_whitespace_does_not_change_structure(grammar, data):
    spec = data.draw(spec_strategy(grammar, max_blocks=2, max_branches=3, max_depth=1))
    plain = parse(render(spec, grammar), grammar=grammar)
    spaced = parse(render(spec, grammar, data.draw(whitespaces())), grammar=grammar)
    assert _recovered_blocks(plain) == _recovered_blocks(spaced)
    assert [b.width for b in plain.blocks] == [b.width for b in spaced.blocks]


def test_tokenize_helper_matches_manual_parse():
    spec = TraceSpec("pre", [BlockSpec(["a", "b"], ["c", "d"], "e")], "\\boxed{1}")
    shape = tokenize(spec, prompt="Q: ")
    tokenizer = CharTokenizer()
    manual = parse(
        tokenizer.encode(render(spec)),
        tokenizer=tokenizer,
        prompt_ids=tokenizer.encode("Q: "),
    )
    assert shape.graph.to_dict() == manual.to_dict()
    assert render(spec).startswith("pre\n<guideline>\n<plan>1: a</plan>\n<plan>2: b</plan>\n")


# too_slow is timing-dependent; the draws that run out of data fail filter_too_much reliably.
@settings(
    max_examples=20,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(pair=traces("multiverse", max_blocks=3, max_branches=20, max_depth=10))
def test_wide_deep_traces_pass_the_health_checks(pair):
    """Wide blocks nest less often. At one step in six, a block of 20 steps held about 3 nested
    blocks, so trees grew to the depth bound: most draws ran out of data and the health checks
    failed (filter_too_much, too_slow)."""
    spec, text = pair
    assert all(1 <= len(block.steps) <= 20 for block in walk(spec))
    assert validate(text, grammar="multiverse", max_branches=20) == [], "valid at that width"


@pytest.mark.parametrize(
    ("make", "error"),
    [
        # KeyError: 'bogus'
        (lambda: mutations("npr", rules=["bogus"]), "bogus"),
        # drawn, then refused by the mutation at draw time
        (lambda: mutations("multiverse", rules=["nesting"]), "nesting"),
        # an empty list drew from every rule
        (lambda: mutations("npr", rules=[]), r"\[\]"),
        # hypothesis' "Cannot have max_size=0 < min_size=1"
        (lambda: spec_strategy("npr", max_blocks=0), "max_blocks"),
        (lambda: traces("npr", max_branches=0), "max_branches"),
        # silently the same as max_depth=0
        (lambda: spec_strategy("multiverse", max_depth=-1), "max_depth"),
        # traces nested past the parser's limit, which are not valid
        (lambda: spec_strategy("multiverse", max_depth=32), "max_depth must be < 32"),
        # ZeroDivisionError at render time
        (lambda: Whitespace(gaps=()), "gaps"),
        (lambda: Whitespace(inner=("\n", None)), "inner"),
    ],
)
def test_strategy_arguments_are_checked_when_built(make, error):
    with pytest.raises(ValueError, match=error):
        make()


def test_multiverse_examples_shrink_to_plain_steps() -> None:
    """hypothesis shrinks towards a strategy's simplest choice: for a step that is plain
    text, not a nested block (minimal failing examples carried nested blocks they did not need)."""
    from hypothesis import find

    found = find(
        spec_strategy("multiverse", max_depth=1),
        lambda spec: any(len(block.steps) >= 2 for block in spec.blocks),
        settings=settings(database=None, derandomize=True, max_examples=500),
    )
    assert [len(block.steps) for block in walk(found)] == [2], found


def test_an_edited_graph_is_laid_out_from_its_new_parents() -> None:
    """Positions and visibility both follow ``parents`` as they are now (the ancestor sets were
    cached, so an edit changed the positions but not the mask)."""
    from npr_graph import attention_mask, position_ids
    from npr_graph.tokenizers import CharTokenizer

    tok = CharTokenizer()
    text = (
        "<guideline><plan>1: a</plan><plan>2: b</plan></guideline><step>1: c</step>"
        "<step>2: d</step><takeaway>e</takeaway>\\boxed{1}"
    )
    graph = parse(tok.encode(text), tokenizer=tok)
    attention_mask(graph)
    first, second = graph.nodes_of("step")
    assert not attention_mask(graph)[second.token_start, first.token_start]
    second.parents = (first.id,)
    assert attention_mask(graph)[second.token_start, first.token_start]
    assert position_ids(graph)[second.token_start] == position_ids(graph)[first.token_end - 1] + 1


def test_safe_text_holds_no_box_of_any_form() -> None:
    from npr_graph.strategies import is_safe

    assert is_safe("plain words, 2^{10}")
    for text in ("a \\boxed{1}", "a \\fbox{1}", "a \\boxed 1"):
        assert not is_safe(text), text


@PROPERTY
@given(answer=st.data())
def test_drawn_answers_hold_exactly_one_box(answer) -> None:
    from npr_graph.constraints import boxed_answers
    from npr_graph.strategies import answers

    assert len(boxed_answers(answer.draw(answers()))) == 1
