from __future__ import annotations

import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from npr_graph import render
from npr_graph.graph import NodeKind, ReasoningGraph, Violation
from npr_graph.parse import DIALECTS, parse
from npr_graph.render import to_dot, to_mermaid, to_svg, to_tree, tree_text

TRACES = Path(__file__).resolve().parents[1] / "examples" / "traces"
HAS_DOT = shutil.which("dot") is not None
needs_dot = pytest.mark.skipif(not HAS_DOT, reason="graphviz 'dot' binary not on PATH")

HOSTILE = 'He said "hi" \\ \\" \\n {x} [y] |z| <b> </b> & &amp; #quot; %%{init}%% `c` é 中文 😀'
CONTROL = "\t\r\x00\x1b\x7f\u2028\u0085\ufffe\ud800"

QUOTED = re.compile(r'"(?:[^"\\\n]|\\.)*"')
DOT_VERTEX = re.compile(r"^\s*n(\d+) \[", re.M)
DOT_EDGE = re.compile(r"^\s*n(\d+) -> n(\d+);$", re.M)
MERMAID_VERTEX = re.compile(r'^\s*n(\d+)\["[^"\n]*"\]$', re.M)
MERMAID_EDGE = re.compile(r"^\s*n(\d+) --> n(\d+)$", re.M)


class CharTokens:
    def encode(self, text: str, **_: Any) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: Sequence[int], **_: Any) -> str:
        return "".join(chr(i) for i in ids)


def load(name: str, grammar: str = "npr") -> ReasoningGraph:
    return parse((TRACES / name).read_text(encoding="utf-8"), grammar=grammar)


def cold_start() -> list[dict[str, str]]:
    lines = (TRACES / "cold_start.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def edges(graph: ReasoningGraph) -> Counter[tuple[int, int]]:
    return Counter((p, n.id) for n in graph.nodes for p in n.parents)


def hostile_graph() -> ReasoningGraph:
    bad = HOSTILE + CONTROL
    text = (
        f"{bad}\n<guideline>\n<plan>1: {bad}</plan>\n<plan>2: {bad}</plan>\n</guideline>\n"
        f"<step>\n1: {bad}\n</step>\n<step>\n2: {bad} <plan>x</plan>\n</step>\n"
        f"<takeaway>\n{bad}\n</takeaway>\n{bad} \\boxed{{{bad}}}"
    )
    return parse(text, lenient=True)


def graphs() -> list[ReasoningGraph]:
    out = [load("npr_two_blocks.txt"), load("multiverse_nested.txt", "multiverse")]
    out += [parse(r["response"], lenient=True) for r in cold_start()]
    return [*out, hostile_graph(), parse("", lenient=True)]


def assert_dot_wellformed(dot: str) -> None:
    """Quoted strings close on their line and braces outside them balance."""
    depth = 0
    for line in dot.splitlines():
        bare = QUOTED.sub("", line)
        assert '"' not in bare, line
        depth += bare.count("{") - bare.count("}")
        assert depth >= 0, line
    assert depth == 0


def cluster_parents(dot: str) -> dict[int, int | None]:
    """For each ``cluster_block_N``, the cluster it is nested in."""
    stack: list[int | None] = []
    parents: dict[int, int | None] = {}
    for line in dot.splitlines():
        bare = QUOTED.sub("", line)
        match = re.match(r"\s*subgraph cluster_block_(\d+) \{", bare)
        enclosing = next((s for s in reversed(stack) if s is not None), None)
        if match:
            parents[int(match.group(1))] = enclosing
            stack.append(int(match.group(1)))
        else:
            stack += [None] * bare.count("{")
        del stack[len(stack) - bare.count("}") :]
    return parents


def red_vertices(dot: str) -> set[int]:
    return {
        int(m.group(1))
        for m in re.finditer(r"^\s*n(\d+) \[(.*)\];$", dot, re.M)
        if f'color="{render.RED}"' in m.group(2)
    }


# -- example traces -----------------------------------------------------------------------------
def test_npr_example_is_strict_and_well_formed() -> None:
    graph = load("npr_two_blocks.txt")
    assert graph.violations == []
    assert [b.width for b in graph.blocks] == [2, 3]
    assert [len(b.items) for b in graph.blocks] == [2, 3]
    assert all(b.join is not None for b in graph.blocks)
    assert graph.nodes[-1].kind is NodeKind.ANSWER
    assert "\\boxed{44}" in graph.nodes[-1].text


def test_multiverse_example_has_one_nested_block() -> None:
    graph = load("multiverse_nested.txt", "multiverse")
    assert graph.violations == []
    nested = [b for b in graph.blocks if b.parent is not None]
    assert len(nested) == 1 and nested[0].depth == 1
    assert all(b.join is not None and len(b.items) == b.width for b in graph.blocks)
    assert "\\boxed{6}" in graph.nodes[-1].text


def test_cold_start_lines() -> None:
    records = cold_start()
    assert len(records) == 5
    assert len({r["id"] for r in records}) == 5
    graphs = [parse(r["response"], lenient=True) for r in records]
    codes = {code for g in graphs for code in (v.code for v in g.violations)}
    assert {"missing_join", "tag_in_content", "unclosed_tag"} <= codes
    assert any(len(b.items) != b.width for g in graphs for b in g.blocks)
    assert any(_text_between_blocks(g) for g in graphs)
    valid = [
        r
        for r, g in zip(records, graphs, strict=True)
        if not g.violations
        and all(len(b.items) == b.width for b in g.blocks)
        and not _text_between_blocks(g)
    ]
    assert [r["id"] for r in valid] == ["cold-005-valid"]
    assert parse(valid[0]["response"]).violations == []


def _text_between_blocks(graph: ReasoningGraph) -> bool:
    in_block = [n.block is not None for n in graph.nodes]
    return any(
        n.kind is NodeKind.TEXT
        and n.block is None
        and any(in_block[: n.id])
        and any(in_block[n.id :])
        for n in graph.nodes
    )


# -- DOT ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("graph", graphs())
def test_dot_has_a_vertex_per_node_and_an_edge_per_parent(graph: ReasoningGraph) -> None:
    dot = to_dot(graph)
    assert_dot_wellformed(dot)
    vertices = [int(v) for v in DOT_VERTEX.findall(dot)]
    assert sorted(vertices) == list(range(len(graph.nodes)))
    found = Counter((int(a), int(b)) for a, b in DOT_EDGE.findall(dot))
    assert found == edges(graph)


@pytest.mark.parametrize("graph", graphs())
def test_dot_clusters_follow_block_nesting(graph: ReasoningGraph) -> None:
    parents = cluster_parents(to_dot(graph))
    assert parents == {
        b.index: (b.parent[0] if b.parent is not None else None) for b in graph.blocks
    }


def test_dot_nested_cluster_holds_nested_nodes() -> None:
    graph = load("multiverse_nested.txt", "multiverse")
    dot = to_dot(graph)
    inner = dot[dot.index("subgraph cluster_block_1") :]
    inner = inner[: inner.index("\n    }")]
    assert {int(v) for v in DOT_VERTEX.findall(inner)} == {
        n.id for n in graph.nodes if n.block == 1
    }


def test_dot_labels_show_kind_number_and_snippet() -> None:
    dot = to_dot(load("npr_two_blocks.txt"), max_label=20)
    assert 'label="plan 2\\nCount the multiples…"' in dot
    assert 'label="step 3\\n' in dot
    assert 'label="guideline close"' in dot
    assert 'label="block 1 (width 3)"' in dot


def test_dot_marks_violation_nodes_red() -> None:
    graph = parse(cold_start()[3]["response"], lenient=True)
    (violation,) = graph.violations
    assert red_vertices(to_dot(graph)) == {graph.node_at_char(violation.char_start).id}
    assert red_vertices(to_dot(graph, violations=[])) == set()
    step = graph.nodes_of(NodeKind.STEP)[1]
    custom = [Violation("x", "custom", step.char_start + 3, step.char_start + 4)]
    assert red_vertices(to_dot(graph, violations=custom)) == {step.id}


def test_violation_past_the_end_marks_the_last_node() -> None:
    graph = load("npr_two_blocks.txt")
    end = len(graph.text)
    marks = render.violations_by_node(graph, [Violation("missing_answer", "m", end, end)])
    assert list(marks) == [len(graph.nodes) - 1]


class CountingList(list):
    """A list that counts element reads, to measure how much work a function does."""

    reads = 0

    def __iter__(self):
        for item in super().__iter__():
            self.reads += 1
            yield item

    def __getitem__(self, index):
        self.reads += 1
        return super().__getitem__(index)


def test_violations_by_node_reads_each_node_a_few_times() -> None:
    # Every violation here has node=None, so each is placed by its position; that used to rebuild
    # the list of node starts per violation (reads ~ violations x nodes).
    graph = parse("<step>x</step></plan>" * 2000, lenient=True)
    assert len(graph.violations) > 2000 and len(graph.nodes) == 4000
    assert all(v.node is None for v in graph.violations)
    graph.nodes = CountingList(graph.nodes)
    marks = render.violations_by_node(graph)
    assert sum(len(found) for found in marks.values()) == len(graph.violations)
    assert graph.nodes.reads < 30 * len(graph.violations)


NPR_BLOCK = "<guideline><plan>1: a</plan></guideline><step>1: b</step><takeaway>c</takeaway>"


def nested_multiverse(depth: int) -> str:
    """A valid Multiverse trace whose blocks nest ``depth`` levels deep."""
    opening = "<Parallel><Goal><Outline>1: o</Outline></Goal><Path>1: p "
    closing = "</Path><Conclusion>c</Conclusion></Parallel>"
    return opening * depth + "x" + closing * depth + "\n\\boxed{1}"


@pytest.mark.parametrize("render_graph", [to_dot, to_mermaid])
def test_dot_and_mermaid_read_each_node_a_few_times(render_graph: Any) -> None:
    # Laying out each block used to scan every node (reads ~ blocks x nodes).
    graph = parse(NPR_BLOCK * 500)
    assert len(graph.blocks) == 500 and not graph.violations
    graph.nodes = CountingList(graph.nodes)
    render_graph(graph)
    assert graph.nodes.reads < 10 * len(graph.nodes)


def test_dot_and_mermaid_render_blocks_nested_1000_deep() -> None:
    graph = parse(nested_multiverse(1000), grammar="multiverse", max_depth=1024)
    assert len(graph.blocks) == 1000 and not graph.violations
    dot = to_dot(graph)
    assert_dot_wellformed(dot)
    expected = {b.index: b.parent[0] if b.parent else None for b in graph.blocks}
    assert cluster_parents(dot) == expected
    assert len(DOT_VERTEX.findall(dot)) == len(graph.nodes)
    mermaid = to_mermaid(graph)
    assert len(MERMAID_VERTEX.findall(mermaid)) == len(graph.nodes)
    assert mermaid.count("subgraph block_") == len(re.findall(r"^\s*end$", mermaid, re.M)) == 1000
    # Indentation stops growing with depth, so the documents stay proportional to the graph.
    assert max(len(dot), len(mermaid)) < 200 * len(graph.nodes)


def test_hostile_text_is_escaped_in_dot() -> None:
    dot = to_dot(hostile_graph(), max_label=200)
    assert_dot_wellformed(dot)
    assert '\\"hi\\"' in dot
    assert "&lt;b&gt;" in dot and "&amp;amp;" in dot
    assert '\\\\ \\\\\\" \\\\n' in dot
    assert not any(c in dot for c in CONTROL if c not in "\t")
    assert "\t" not in dot
    dot.encode("utf-8")


@needs_dot
@pytest.mark.parametrize("graph", graphs())
def test_dot_binary_accepts_output(graph: ReasoningGraph) -> None:
    svg = to_svg(graph, max_label=200)
    assert svg is not None
    root = ET.fromstring(svg)
    classes = Counter(g.get("class") for g in root.iter("{http://www.w3.org/2000/svg}g"))
    assert classes["node"] == len(graph.nodes)
    assert classes["edge"] == sum(edges(graph).values())
    assert classes["cluster"] == len(graph.blocks)


@needs_dot
def test_svg_shows_hostile_text_literally() -> None:
    svg = to_svg(hostile_graph(), max_label=200)
    assert svg is not None
    texts = " ".join(
        t.text or "" for t in ET.fromstring(svg).iter("{http://www.w3.org/2000/svg}text")
    )
    assert 'He said "hi" \\ \\" \\n {x} [y] |z| <b> </b> & &amp; #quot;' in texts
    assert "中文 😀" in texts


def test_to_svg_without_dot_returns_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(render.shutil, "which", lambda name: None)
    assert to_svg(load("npr_two_blocks.txt")) is None


def test_to_svg_time_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    def hang(*args: Any, **kwargs: Any) -> None:
        raise subprocess.TimeoutExpired(args[0], kwargs["timeout"])

    monkeypatch.setattr(render.shutil, "which", lambda name: "/usr/bin/dot")
    monkeypatch.setattr(render.subprocess, "run", hang)
    with pytest.raises(RuntimeError, match="within 0.5s"):
        to_svg(load("npr_two_blocks.txt"), timeout=0.5)


# -- Mermaid ------------------------------------------------------------------------------------
@pytest.mark.parametrize("graph", graphs())
def test_mermaid_counts_match_dot(graph: ReasoningGraph) -> None:
    text = to_mermaid(graph, max_label=200)
    assert text.startswith("flowchart TD\n")
    vertices = [int(v) for v in MERMAID_VERTEX.findall(text)]
    assert sorted(vertices) == list(range(len(graph.nodes)))
    found = Counter((int(a), int(b)) for a, b in MERMAID_EDGE.findall(text))
    assert found == edges(graph)
    subgraphs = re.findall(r'^\s*subgraph block_(\d+) \["[^"\n]*"\]$', text, re.M)
    assert sorted(int(s) for s in subgraphs) == list(range(len(graph.blocks)))
    assert len(re.findall(r"^\s*end$", text, re.M)) == len(graph.blocks)


def test_mermaid_escapes_hostile_text() -> None:
    text = to_mermaid(hostile_graph(), max_label=200)
    body = "\n".join(line for line in text.splitlines() if "[" in line)
    assert "#quot;hi#quot;" in body
    assert "#35;quot;" in body
    assert "%" not in body and "`" not in body
    assert re.sub(r"<br/>", "", body).count("<") == 0 and ">" not in body.replace("<br/>", "")
    assert "😀" in body


def test_mermaid_marks_violations() -> None:
    graph = parse(cold_start()[0]["response"], lenient=True)
    text = to_mermaid(graph)
    marked = {graph.node_at_char(v.char_start).id for v in graph.violations}
    (line,) = [ln for ln in text.splitlines() if ln.strip().startswith("class ")]
    assert line.split()[1].split(",") == [f"n{i}" for i in sorted(marked)]
    assert "classDef violation" not in to_mermaid(graph, violations=[])


# -- tree ---------------------------------------------------------------------------------------
def test_tree_shows_blocks_branches_and_answer() -> None:
    text = tree_text(load("npr_two_blocks.txt"))
    assert "block 0 (width 2)" in text and "block 1 (width 3)" in text
    for title in ("plan 1", "plan 3", "step 1", "step 2", "step 3", "takeaway", "guideline"):
        assert title in text
    assert "answer" in text and "\\boxed{44}" in text
    assert text.index("block 0") < text.index("block 1") < text.index("\\boxed{44}")
    assert all(len(line) <= 100 for line in text.splitlines())
    assert "\x1b" not in text


def test_tree_nests_blocks_inside_paths() -> None:
    graph = load("multiverse_nested.txt", "multiverse")
    lines = tree_text(graph).splitlines()

    def indent(fragment: str) -> int:
        line = next(ln for ln in lines if fragment in ln)
        return len(line) - len(line.lstrip("│├└─ "))

    assert indent("block 0 (width 2)") < indent("path 2 [") < indent("block 1 (width 2)")
    assert indent("block 1 (width 2)") < indent("path 2.1 [") == indent("path 2.2 [")
    assert indent("path 1 [") == indent("path 2 [")
    assert any("path 2 (cont.)" in ln for ln in lines)
    assert any("\\boxed{6}" in ln for ln in lines)


def test_tree_counts_chars_or_tokens() -> None:
    text = (TRACES / "npr_two_blocks.txt").read_text(encoding="utf-8")
    plain = tree_text(parse(text))
    assert f"[{len(text)} ch]" in plain.splitlines()[0]
    tokenized = parse(text, tokenizer=CharTokens())
    assert f"[{tokenized.num_tokens} tok]" in tree_text(tokenized).splitlines()[0]


def test_tree_flags_violations_and_width_mismatch() -> None:
    records = cold_start()
    text = tree_text(parse(records[3]["response"], lenient=True))
    assert "! unclosed_tag" in text
    mismatch = tree_text(parse(records[1]["response"], lenient=True))
    assert "block 0 (width 2, 3 plans)" in mismatch
    assert "! " not in tree_text(parse(records[1]["response"], lenient=True), violations=[])


@pytest.mark.parametrize("graph", graphs())
def test_tree_has_a_leaf_per_node(graph: ReasoningGraph) -> None:
    folded = {i for b in graph.blocks for i in b.header if graph.nodes[i].part}
    assert _leaves(to_tree(graph)) == len(graph.nodes) - len(folded)


def _leaves(tree: Any) -> int:
    return 1 if not tree.children else sum(_leaves(c) for c in tree.children)


def test_tree_folds_blocks_nested_past_max_depth() -> None:
    graph = parse(nested_multiverse(1000), grammar="multiverse", max_depth=1024)
    deepest = graph.nodes_of(NodeKind.OUTLINE)[-1]
    mark = Violation("deep_mark", "m", deepest.char_start, deepest.char_start + 1)
    text = tree_text(graph, violations=[mark], width=200)
    hidden = [line for line in text.splitlines() if "…" in line]
    assert len(hidden) == 1
    assert f"… {1000 - render.TREE_MAX_DEPTH} deeper levels not shown" in hidden[0]
    assert "! deep_mark" in hidden[0]
    assert f"block {render.TREE_MAX_DEPTH - 1} (width 1)" in text
    assert f"block {render.TREE_MAX_DEPTH} " not in text


def test_tree_can_show_blocks_nested_1000_deep() -> None:
    graph = parse(nested_multiverse(1000), grammar="multiverse", max_depth=1024)
    tree = to_tree(graph, max_depth=1000)
    leaves, pending = 0, [tree]
    while pending:
        node = pending.pop()
        pending += node.children
        leaves += not node.children
    folded = {i for b in graph.blocks for i in b.header if graph.nodes[i].part}
    assert leaves == len(graph.nodes) - len(folded)


def test_tree_text_is_markup_safe() -> None:
    graph = parse("[bold]not markup[/bold] [red]", lenient=True)
    assert "[bold]not markup[/bold] [red]" in tree_text(graph)


# -- property: any text renders to valid documents ----------------------------------------------
PIECES = [
    *DIALECTS["npr"].tag_texts,
    *DIALECTS["multiverse"].tag_texts,
    "1: ",
    "2.1: ",
    "\n",
    '"',
    "\\",
    "<",
    ">",
    "&",
    "{",
    "}",
    "%%",
    "#",
    "`",
    "\x00",
    "é😀",
    "\\boxed{7}",
    " text ",
]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.sampled_from(PIECES), max_size=40),
    st.sampled_from(["npr", "multiverse"]),
)
def test_any_trace_renders(pieces: list[str], grammar: str) -> None:
    graph = parse("".join(pieces), grammar=grammar, lenient=True)
    dot = to_dot(graph, max_label=15)
    assert_dot_wellformed(dot)
    assert len(DOT_VERTEX.findall(dot)) == len(graph.nodes)
    assert Counter((int(a), int(b)) for a, b in DOT_EDGE.findall(dot)) == edges(graph)
    mermaid = to_mermaid(graph, max_label=15)
    assert len(MERMAID_VERTEX.findall(mermaid)) == len(graph.nodes)
    shown = Counter(label.split(" [")[0] for label in _labels(to_tree(graph)))
    folded = {i for b in graph.blocks for i in b.header if graph.nodes[i].part}
    names = render.titles(graph)
    needed = Counter(names[n.id] for n in graph.nodes if n.id not in folded)
    assert all(shown[name] >= count for name, count in needed.items())


def _labels(tree: Any) -> list[str]:
    return [tree.label.plain] + [label for child in tree.children for label in _labels(child)]


@needs_dot
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(PIECES), max_size=30), st.sampled_from(["npr", "multiverse"]))
def test_any_trace_is_valid_for_dot(pieces: list[str], grammar: str) -> None:
    graph = parse("".join(pieces), grammar=grammar, lenient=True)
    svg = to_svg(graph, max_label=30)
    assert svg is not None
    ET.fromstring(svg)


@pytest.mark.parametrize("box", ["\\boxed{41}", "\\fbox{41}", "\\boxed 41"])
def test_a_long_answer_keeps_its_last_box_in_any_form(box: str) -> None:
    graph = parse("We add the two counts and compare them with the total once more, so " + box)
    (answer,) = graph.nodes
    assert answer.kind is NodeKind.ANSWER
    shown = render.snippet(answer, 24)
    assert shown.startswith("… ") and box in shown


STRAY_BETWEEN_TAGS = (
    "Q.\n<guideline><plan>1: a</plan><plan>2: b</plan></guideline>\nNow I execute both plans.\n"
    "<step>1: x</step><step>2: y</step><takeaway>t</takeaway>\n\\boxed{1}"
)


def test_text_between_a_blocks_tags_is_drawn_where_it_stands() -> None:
    """Text between ``</guideline>`` and the first ``<step>`` belongs to the top level (it is
    stray text); every view draws it inside the block, before the steps, not after the block."""
    graph = parse(STRAY_BETWEEN_TAGS, lenient=True)
    stray = next(n.id for n in graph.nodes if n.content.startswith("Now I execute"))
    assert graph.nodes[stray].block is None
    assert render.shown_blocks(graph)[stray] == 0
    lines = tree_text(graph, width=100).splitlines()
    at = [next(i for i, line in enumerate(lines) if key in line)
          for key in ("plan 2", "Now I execute", "step 1", "answer")]  # fmt: skip
    assert at == sorted(at)
    assert lines[at[1]].startswith("│   ├── text"), "inside the block"
    dot = to_dot(graph)
    cluster = dot[dot.index("subgraph cluster_block_0") :]
    assert f"n{stray} [" in cluster[: cluster.index("}")]
    mermaid = to_mermaid(graph)
    assert f"n{stray}[" in mermaid[mermaid.index("subgraph") : mermaid.index("  end")]
