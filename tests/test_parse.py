import itertools

import pytest
from conftest import MULTIVERSE_TRACE, NPR_TRACE

import npr_graph as ng
from npr_graph.constraints import validate
from npr_graph.graph import check_partition
from npr_graph.models import default_tokenizer
from npr_graph.parse import MAX_DEPTH
from npr_graph.strategies import BlockSpec, TraceSpec, render


def kinds(graph):
    return [(n.kind.value, n.part) for n in graph.nodes]


def test_npr_nodes_partition_and_dependencies():
    graph = ng.parse(NPR_TRACE)
    check_partition(graph)
    assert "".join(n.text for n in graph.nodes) == NPR_TRACE
    assert kinds(graph) == [
        ("guideline", "open"),
        ("plan", ""),
        ("plan", ""),
        ("guideline", "close"),
        ("step", ""),
        ("step", ""),
        ("takeaway", ""),
        ("answer", ""),
    ]
    g_open, plan1, plan2, g_close, step1, step2, takeaway, answer = graph.nodes
    assert plan1.parents == (g_open.id,) and plan2.parents == (plan1.id,)
    assert g_close.parents == (plan2.id,)
    assert step1.parents == step2.parents == (g_close.id,)
    assert takeaway.parents == (step1.id, step2.id)
    assert answer.parents == (takeaway.id,)
    assert (step1.branch, step2.branch) == (0, 1)
    assert [plan1.label, plan2.label, step1.label, step2.label] == ["1", "2", "1", "2"]
    assert step1.content.strip().startswith("1: x^2")


def test_graphs_and_nodes_print_on_one_short_line():
    """A REPL shows a graph by its shape, not its text (thousands of characters), and a node
    by its place and the start of its text."""
    long = NPR_TRACE.replace("Both agree", "Both agree " + "and more " * 2000)
    graph = ng.parse(long, lenient=True)
    shown = repr(graph)
    assert "\n" not in shown and len(shown) < 120
    assert shown.startswith(f"<ReasoningGraph npr: {len(graph.nodes)} nodes, 1 block, widths [2]")
    tokenized = ng.parse(NPR_TRACE, tokenizer=default_tokenizer())
    assert f"{tokenized.num_tokens} tokens" in repr(tokenized)
    takeaway = graph.nodes_of("takeaway")[0]
    shown = repr(takeaway)
    assert "\n" not in shown and len(shown) < 160
    assert shown.startswith(f"<Node {takeaway.id} takeaway: block 0, parents {takeaway.parents}")
    assert "'<takeaway> Both agree and more and more" in shown and shown.endswith("…'>")
    step = repr(graph.nodes_of("step")[1])
    assert " step 2: block 0 branch 1, " in step


def test_whitespace_between_sibling_steps_belongs_to_the_earlier_step():
    graph = ng.parse(NPR_TRACE)
    step1 = graph.nodes_of("step")[0]
    assert step1.text.endswith("</step>\n")
    assert graph.nodes_of("step")[1].text.startswith("<step>")


def test_blocks_collect_their_nodes():
    graph = ng.parse(NPR_TRACE)
    (block,) = graph.blocks
    assert block.width == 2 and block.depth == 0 and block.parent is None
    assert [graph[i].kind.value for i in block.items] == ["plan", "plan"]
    assert [graph[b[0]].kind.value for b in block.branches] == ["step", "step"]
    assert graph[block.join].kind.value == "takeaway"


def test_multiverse_nesting_follows_the_same_rules_recursively():
    graph = ng.parse(MULTIVERSE_TRACE, grammar="multiverse")
    check_partition(graph)
    outer, inner = graph.blocks
    assert inner.parent == (0, 0) and inner.depth == 1 and outer.depth == 0
    path1 = outer.branches[0]
    assert len(path1) == 2, "path 1 is split around its nested block"
    first_segment, continuation = (graph[i] for i in path1)
    inner_open = graph[inner.header[0]]
    assert inner_open.parents == (first_segment.id,)
    assert continuation.parents == (inner.close[0],)
    assert graph[inner.branches[0][0]].label == "1.1"
    conclusion = graph[outer.join]
    assert conclusion.parents == (continuation.id, outer.branches[1][0])


def test_strict_and_lenient_agree_on_valid_traces():
    for text, grammar in ((NPR_TRACE, "npr"), (MULTIVERSE_TRACE, "multiverse")):
        strict = ng.parse(text, grammar=grammar)
        lenient = ng.parse(text, grammar=grammar, lenient=True)
        assert strict.to_dict() == lenient.to_dict()
        assert lenient.violations == []


@pytest.mark.parametrize(
    "text, line, column, expected",
    [
        ("<guideline><plan>1: a</plan></guideline>\n<step>1: b</step>\nend", 3, 4, "<takeaway>"),
        ("<step>1: b</step>", 1, 1, "<guideline>"),
        ("<guideline>\n<plan>1: a<step></plan>", 2, 11, "</plan>"),
    ],
)
def test_strict_parse_error_says_where_and_what(text, line, column, expected):
    with pytest.raises(ng.ParseError) as caught:
        ng.parse(text)
    error = caught.value
    assert isinstance(error, ValueError)
    assert (error.line, error.column) == (line, column)
    assert expected in error.expected
    assert f"line {line}" in str(error)


def test_lenient_records_repairs_instead_of_failing():
    text = "intro\n<guideline><plan>1: a</plan><plan>2: b</plan></guideline>\n<step>1: x</step>\nmid\n<step>2: y"
    graph = ng.parse(text, lenient=True)
    check_partition(graph)
    codes = [v.code for v in graph.violations]
    assert "unclosed_tag" in codes and "missing_join" in codes
    (block,) = graph.blocks
    assert block.width == 2
    stray = graph[block.branches[0][-1]]
    assert stray.kind.value == "text" and stray.text.strip() == "mid"


@pytest.mark.parametrize(
    "grammar, text",
    [
        ("multiverse", "<Parallel><Goal><Outline>1: a</Outline></Goal>\nno paths</Parallel>\nend"),
        ("npr", "<guideline><plan>1: a</plan></guideline>\nno steps<guideline><plan>1: b</plan>"),
    ],
)
def test_text_after_a_header_without_branches_comes_before_what_follows(grammar, text):
    """Nothing forks, so the text runs on in one line: what follows the block depends on the
    text after its header, not on the header's end (which would give both the same positions)."""
    graph = ng.parse(text, grammar=grammar, lenient=True, tokenizer=default_tokenizer())
    assert "missing_branches" in {v.code for v in graph.violations}
    for node, after in itertools.pairwise(graph.nodes):
        assert after.parents == (node.id,)
    assert ng.position_ids(graph).tolist() == list(range(graph.num_tokens))


def test_lenient_treats_misplaced_tags_as_content():
    graph = ng.parse("<guideline><plan>1: use <step> here</plan></guideline>", lenient=True)
    assert [v.code for v in graph.violations if v.code == "tag_in_content"] == ["tag_in_content"]
    assert "<step>" in graph.nodes_of("plan")[0].content


def test_depth_limit_counts_only_the_branches_that_stay_open():
    """A header that first closes an unclosed path opens a block beside it, not inside it:
    no depth limit refuses it, and every limit reads the trace the same way."""
    text = (
        "<Parallel><Goal><Outline>1: a</Outline></Goal><Path>1: b"
        "<Goal><Outline>1: c</Outline></Goal><Path>1: d</Path><Conclusion>e</Conclusion></Parallel>"
    )
    reads = []
    for max_depth in (1, 2, 32):
        graph = ng.parse(text, grammar="multiverse", lenient=True, max_depth=max_depth)
        reads.append(
            ([(v.code, v.char_start) for v in graph.violations], graph.to_dict()["blocks"])
        )
    assert reads[0] == reads[1] == reads[2]
    assert "too_deep" not in [code for code, _ in reads[0][0]]


def nested_chain(depth):
    """One block per level, each the first step's content of the block around it."""
    block = BlockSpec(["a"], ["b"], "c")
    for _ in range(depth - 1):
        block = BlockSpec(["a"], [["b", block]], "c")
    return TraceSpec("", [block], "\\boxed{1}")


def test_labels_are_read_however_long_at_the_deepest_level_allowed():
    """At the default limit the innermost label is 63 characters (after a newline): it is read
    whole, so the valid trace has no numbering violation."""
    text = render(nested_chain(MAX_DEPTH), "multiverse")
    graph = ng.parse(text, grammar="multiverse")
    innermost = graph.blocks[-1]
    (path,) = innermost.branches
    assert graph[path[0]].label == ".".join(["1"] * MAX_DEPTH)
    assert validate(text, grammar="multiverse") == []
    spaced = text.replace("<Path>\n", "<Path>\n" + " " * 200)
    assert validate(spaced, grammar="multiverse") == []


@pytest.mark.parametrize(
    ("grammar", "text", "max_depth", "buried"),
    [
        ("multiverse", render(nested_chain(MAX_DEPTH + 1), "multiverse"), MAX_DEPTH, None),
        (
            "npr",
            "<guideline><plan>1: a</plan></guideline>\n<step>1: x <guideline><plan>1.1: p</plan>"
            "</guideline><step>1.1: y</step><takeaway>t</takeaway> after</step>\n"
            "<takeaway>done</takeaway>\n\\boxed{1}",
            1,
            "<guideline><plan>1.1: p</plan></guideline><step>1.1: y</step><takeaway>t</takeaway>",
        ),
        (
            "npr",
            "<guideline><plan>1: a</plan></guideline>\n<step>1: x <guideline><plan>1.1: p</plan>"
            "</guideline><step>1.1: y</step> after</step>\n<takeaway>done</takeaway>\n\\boxed{1}",
            1,
            "<guideline><plan>1.1: p</plan></guideline><step>1.1: y</step>",
        ),
    ],
    ids=["multiverse", "npr", "npr-without-join"],
)
def test_a_block_nested_too_deep_is_content_of_the_branch_holding_it(
    grammar, text, max_depth, buried
):
    """The block is reported once, as too_deep, and its text stays in the enclosing branch:
    no knock-on repairs, every other block read as usual."""
    graph = ng.parse(text, grammar=grammar, lenient=True, max_depth=max_depth)
    check_partition(graph)
    assert [v.code for v in graph.violations] == ["too_deep"]
    assert len(graph.blocks) == max_depth
    (path,) = graph.blocks[-1].branches
    holder = "".join(graph[i].text for i in path)
    if buried is None:  # the innermost block, whole
        buried = text[text.rindex("<Parallel>") : text.index("</Parallel>") + len("</Parallel>")]
    assert buried in holder
    assert graph[graph.blocks[0].join].parents == tuple(graph.blocks[0].branches[0][-1:])


def test_answer_and_free_text_kinds():
    assert ng.parse("just thinking").nodes[0].kind is ng.NodeKind.TEXT
    assert ng.parse("so \\boxed{3}").nodes[0].kind is ng.NodeKind.ANSWER
    empty = ng.parse("")
    assert len(empty.nodes) == 1 and empty.nodes[0].text == ""


def test_math_with_angle_brackets_is_content():
    graph = ng.parse(NPR_TRACE.replace("x=2 or x=3", "2 < x < 4 or x<y> z"))
    assert "x<y> z" in graph.nodes_of("step")[0].content


def test_unknown_grammar_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown grammar"):
        ng.parse("x", grammar="nope")


def test_token_ids_need_a_tokenizer():
    with pytest.raises(ValueError, match="tokenizer"):
        ng.parse([1, 2, 3])


def test_branch_ends_close_branches_a_decoder_cut_off(char_tokenizer):
    """Path 1 holds a nested block whose paths were cut off unclosed; by the text alone, the
    outer block's path 2 is one more path of the nested block. Told where branch 1 ended (a
    branch one block deep, before path 2's tag), the parser closes it there."""
    outer = "<Parallel>\n<Goal>\n<Outline>1: a</Outline>\n<Outline>2: b</Outline>\n</Goal>\n"
    nested = "<Parallel>\n<Goal>\n<Outline>1.1: c</Outline>\n<Outline>1.2: d</Outline>\n</Goal>\n"
    cut = outer + "<Path>\n1: " + nested + "<Path>\n1.1: e<Path>\n1.2: f"
    ids = char_tokenizer.encode(cut + "<Path>\n2: g</Path>\n")
    path_2 = len(char_tokenizer.encode(cut))
    prompt = char_tokenizer.encode("Q")

    def paths_per_block(**kwargs):
        graph = ng.parse(ids, grammar="multiverse", tokenizer=char_tokenizer, prompt_ids=prompt,
                         lenient=True, **kwargs)  # fmt: skip
        return [len(block.branches) for block in graph.blocks]

    assert paths_per_block() == [1, 3]
    assert paths_per_block(branch_ends=[(path_2, 2), (path_2, 1)]) == [2, 2]
    assert paths_per_block(branch_ends=[(path_2, 2)]) == [1, 3], "only nested paths close"
    with pytest.raises(ValueError, match="branch_ends"):
        ng.parse(cut, grammar="multiverse", lenient=True, branch_ends=[(0, 1)])
    for bad in ([(len(ids) + 1, 1)], [(path_2, 0)]):
        with pytest.raises(ValueError, match="branch_ends"):
            ng.parse(ids, grammar="multiverse", tokenizer=char_tokenizer, lenient=True,
                     branch_ends=bad)  # fmt: skip


def test_token_spans_with_special_tag_tokens(char_tokenizer):
    ids = char_tokenizer.encode(NPR_TRACE)
    prompt = char_tokenizer.encode("Find the sum of the roots.")
    graph = ng.parse(ids, tokenizer=char_tokenizer, prompt_ids=prompt)
    check_partition(graph)
    assert graph.prompt is not None and graph.prompt.num_tokens == len(prompt)
    assert graph.token_ids == prompt + ids
    assert graph.response_text == NPR_TRACE
    for node in graph.nodes:
        assert (
            char_tokenizer.decode(graph.token_ids[node.token_start : node.token_end]) == node.text
        )
    step = graph.nodes_of("step")[0]
    assert graph.token_ids[step.token_start] == char_tokenizer.tag_ids["<step>"]


def test_text_with_tokenizer_is_tokenized(char_tokenizer):
    graph = ng.parse(NPR_TRACE, tokenizer=char_tokenizer)
    assert graph.tokenized and graph.num_tokens == len(char_tokenizer.encode(NPR_TRACE))


class ByteTokenizer:
    """One token per UTF-8 byte, each tag one token of its own; counts the ids it decodes."""

    def __init__(self, grammar="npr"):
        from npr_graph.engine.structure import Tags

        self.tags = Tags.of(grammar).texts
        self.decoded = 0

    def encode(self, text, add_special_tokens=False):
        ids, at = [], 0
        while at < len(text):
            tag = next((t for t in self.tags if text.startswith(t, at)), None)
            if tag:
                ids.append(256 + self.tags.index(tag))
                at += len(tag)
            else:
                ids.extend(text[at].encode())
                at += 1
        return ids

    def decode(self, ids, **_):
        self.decoded += len(ids)
        out, run = [], bytearray()
        for i in ids:
            if i < 256:
                run.append(i)
                continue
            out.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            out.append(self.tags[i - 256])
        return "".join(out) + run.decode("utf-8", errors="replace")


@pytest.mark.parametrize(
    "text",
    [
        "漢 x\ufffd<guideline><plan>1: a</plan></guideline><step>1: b</step><takeaway>c</takeaway>",
        "<guideline><plan>1: a</plan><plan>2: b</plan></guideline><step>1: 漢</step>\ufffd"
        "<step>2: c</step><takeaway>t</takeaway>",
    ],
)
def test_a_final_replacement_character_stays_with_its_own_token(text):
    """U+FFFD that no later byte completes (written, or a lone byte) belongs to its own token,
    not to the next one, so a tag token after it is still its tag's node's first token."""
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode(text)
    graph = ng.parse(ids, tokenizer=tokenizer)
    check_partition(graph)
    for node in graph.nodes:
        if node.open_tag is not None:
            assert graph.token_text(node.token_start) == graph.text[slice(*node.open_tag)]
    lone_lead_byte = ids[:3] + [0xE6] + ids[3:]
    pieces = ng.parse(lone_lead_byte, tokenizer=tokenizer, lenient=True).token_text
    assert pieces(3) == "\ufffd" and pieces(4) == tokenizer.decode(ids[3:4])


def test_token_alignment_stays_linear_over_replacement_characters():
    from npr_graph.parse import decode_pieces

    tokenizer = ByteTokenizer()
    ids = tokenizer.encode("漢 " + "\ufffd" * 500) + [0x89] * 500 + tokenizer.encode(" done")
    pieces = decode_pieces(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids) and len(pieces) == len(ids)
    assert tokenizer.decoded < 40 * len(ids), "a window of a few tokens per token"


def test_tags_as_multi_token_text(smollm2_tokenizer):
    ids = smollm2_tokenizer.encode(NPR_TRACE + " ünïcode 😀", add_special_tokens=False)
    prompt = smollm2_tokenizer.encode("Solve x^2-5x+6=0.", add_special_tokens=False)
    graph = ng.parse(ids, tokenizer=smollm2_tokenizer, prompt_ids=prompt)
    check_partition(graph)
    assert graph.text == smollm2_tokenizer.decode(prompt + ids)
    assert [n.kind.value for n in graph.nodes][:3] == ["prompt", "guideline", "plan"]
    for step in graph.nodes_of("step"):
        first = graph.token_text(step.token_start)
        assert first.strip().startswith("<"), first
    lengths = [n.num_tokens for n in graph.nodes]
    assert sum(lengths) == len(prompt) + len(ids)


def test_final_text_holding_any_box_form_is_the_answer():
    for text in ("so \\fbox{3}", "so \\boxed 3", "so \\boxed {3}"):
        assert ng.parse(text).nodes[0].kind is ng.NodeKind.ANSWER, text
