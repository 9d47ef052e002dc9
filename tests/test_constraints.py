import pytest
from conftest import MULTIVERSE_TRACE, NPR_TRACE

import npr_graph as ng


def codes(text, profile="strict", **kwargs):
    return [v.code for v in ng.validate(text, profile, **kwargs)]


def test_valid_traces_have_no_violations():
    assert ng.validate(NPR_TRACE) == []
    assert ng.validate(MULTIVERSE_TRACE, grammar="multiverse") == []


def test_format_valid_uses_each_grammar_own_check():
    assert ng.format_valid(ng.parse(NPR_TRACE))
    assert ng.format_valid(ng.parse(MULTIVERSE_TRACE, grammar="multiverse"))
    # NPR: the release's format score, which does not check numbering (the strict rules do)
    renumbered = NPR_TRACE.replace("<plan>2: use", "<plan>3: use")
    assert codes(renumbered) == ["plan_numbering"] and ng.format_valid(ng.parse(renumbered))
    assert not ng.format_valid(ng.parse(NPR_TRACE.replace("</takeaway>", "", 1), lenient=True))
    # Multiverse: a block and no strict violation
    answer_only = "so \\boxed{5}"
    assert not ng.format_valid(ng.parse(answer_only, grammar="multiverse"))
    numbering = MULTIVERSE_TRACE.replace("<Path>\n2:", "<Path>\n3:")
    assert numbering != MULTIVERSE_TRACE
    assert not ng.format_valid(ng.parse(numbering, grammar="multiverse", lenient=True))


@pytest.mark.parametrize(
    "old, new, code",
    [
        ("<plan>2: use", "<plan>3: use", "plan_numbering"),
        ("<step>\n2: x=", "<step>\n1: x=", "step_numbering"),
        ("Both agree", "<plan>Both agree", "tag_in_content"),
        (
            "<step>\n1: x^2-5x+6=(x-2)(x-3), so x=2 or x=3.\n</step>",
            "<step>\n1: </step>",
            "empty_content",
        ),
        ("</guideline>\n", "</guideline>\nchatter\n", "stray_text"),
        ("\\boxed{5}", "5", "missing_answer"),
        ("\\boxed{5}", "\\boxed{5} or \\boxed{6}", "multiple_answers"),
        ("\\boxed{5}", "\\boxed{ }", "empty_answer"),
        ("<takeaway>\nBoth agree: roots 2 and 3, sum 5.\n</takeaway>\n", "", "missing_join"),
    ],
)
def test_each_rule_is_reported(old, new, code):
    text = NPR_TRACE.replace(old, new, 1)
    assert text != NPR_TRACE
    assert code in codes(text)


def test_a_path_that_only_opens_a_nested_block_is_not_empty():
    """A Multiverse path is its text and the blocks nested in it: ``<Path>1: <Parallel>…`` holds a
    block, so it is not empty (it was reported as empty_content, and format_valid failed); a
    path with neither text nor a nested block still is."""
    nested_only = MULTIVERSE_TRACE.replace(
        "<Path>\n1: split further\n<Parallel>", "<Path>\n1: <Parallel>"
    )
    assert nested_only != MULTIVERSE_TRACE
    assert ng.validate(nested_only, grammar="multiverse") == []
    assert ng.format_valid(ng.parse(nested_only, grammar="multiverse"))
    empty = nested_only.replace("<Path>\n2: five odds\n</Path>", "<Path>\n2: </Path>")
    assert empty != nested_only
    assert codes(empty, grammar="multiverse") == ["empty_content"]
    violation = ng.validate(empty, grammar="multiverse")[0]
    assert ng.parse(empty, grammar="multiverse").nodes[violation.node].label == "2"


def test_branch_count_and_limits():
    two_plans_one_step = NPR_TRACE.replace(
        "<step>\n2: x=(5±√(25-24))/2 gives 3 and 2.\n</step>\n", ""
    )
    assert "branch_count" in codes(two_plans_one_step)
    plans = "".join(f"<plan>{i}: idea {i}</plan>" for i in range(1, 7))
    steps = "".join(f"<step>{i}: doing {i}</step>" for i in range(1, 7))
    wide = f"<guideline>{plans}</guideline>{steps}<takeaway>merge all</takeaway>\\boxed{{1}}"
    assert codes(wide) == ["too_many_branches"]
    assert codes(wide, max_branches=6) == []
    no_plans = (
        "<guideline>think</guideline><step>1: go on</step><takeaway>done now</takeaway>\\boxed{1}"
    )
    assert {"no_plans", "stray_text"} <= set(codes(no_plans))


def test_npr_forbids_nesting_but_multiverse_allows_it():
    inner = "<guideline><plan>1: in</plan></guideline><step>1: inner work</step><takeaway>inner done</takeaway>"
    nested = NPR_TRACE.replace("so x=2 or x=3.", "so " + inner + " x=2", 1)
    assert "nesting" in codes(nested)
    assert "nesting" not in codes(MULTIVERSE_TRACE, grammar="multiverse")


def test_lenient_profile_keeps_only_structural_rules():
    sloppy = NPR_TRACE.replace("<plan>2: use", "<plan>7: use").replace("\\boxed{5}", "5")
    assert set(codes(sloppy)) == {"plan_numbering", "missing_answer"}
    assert codes(sloppy, "lenient") == []
    broken = NPR_TRACE.replace("</takeaway>", "")
    assert "unclosed_tag" in codes(broken, "lenient")


def test_violations_point_at_their_node():
    text = NPR_TRACE.replace("<plan>2: use", "<plan>3: use")
    graph = ng.parse(text, lenient=True)
    (violation,) = ng.validate(graph)
    node = graph[violation.node]
    assert node.kind is ng.NodeKind.PLAN and node.label == "3"
    assert text[violation.char_start : violation.char_end] == node.text


def test_boxed_answers_balance_braces():
    assert ng.boxed_answers(r"\boxed{\frac{1}{2}} and \boxed {3}") == [r"\frac{1}{2}", "3"]
    assert ng.boxed_answers(r"\boxed{unclosed") == []


def test_unknown_profile():
    with pytest.raises(ValueError, match="profile"):
        ng.validate("x", "sloppy")


def test_validate_leaves_the_graph_unchanged():
    """The parser's repairs are attributed to their nodes in the returned copies only."""
    graph = ng.parse("<step>1: a</step><takeaway>b</takeaway>", lenient=True)
    before = graph.to_dict()
    found = ng.validate(graph)
    assert [v.code for v in found] == ["missing_header", "missing_answer"]
    assert found[0].node == 0
    assert graph.to_dict() == before
    assert graph.violations[0].node is None


@pytest.mark.parametrize(
    "call",
    [
        lambda: ng.validate(None),
        lambda: ng.validate(b"<step>"),
        lambda: ng.validate(["<step>"]),
        lambda: ng.validate("x", None),
        lambda: ng.format_valid("<step>"),
    ],
)
def test_wrong_argument_types_are_named(call):
    # validate(None) used to say "token ids need tokenizer=", validate("x", None) and
    # format_valid(text) raised AttributeError.
    with pytest.raises(TypeError, match="takes|profile must be"):
        call()


@pytest.mark.parametrize("limit", [0, -3, True, 2.5, "3"])
def test_max_branches_must_be_a_positive_integer(limit):
    # A limit of -3 used to report "1 plans, more than -3"; "3" failed only on a trace with a block.
    with pytest.raises(ValueError, match="max_branches"):
        ng.validate("no blocks", max_branches=limit)
    with pytest.raises(ValueError, match="max_branches"):
        ng.Profile("mine", max_branches=limit)


def test_profile_rules_must_exist():
    # A misspelt rule used to be kept and silently never checked.
    with pytest.raises(ValueError, match="branch_cuont"):
        ng.Profile("mine", frozenset({"branch_cuont"}))
    assert codes(
        NPR_TRACE.replace("\\boxed{5}", "5"), ng.Profile("mine", frozenset({"missing_answer"}))
    ) == ["missing_answer"]


@pytest.mark.parametrize(
    "text",
    [
        "<Parallel></Parallel>\n\\boxed{1}",
        "<Parallel>\n</Parallel>\n\\boxed{1}",
        "<Parallel><Goal><Outline>1: a</Outline></Goal><Path>1: b<Parallel>\n</Parallel></Path>"
        "<Conclusion>c</Conclusion></Parallel>\\boxed{1}",
    ],
)
def test_an_empty_parallel_block_has_no_branches(text):
    # It broke no rule, so format_valid passed "<Parallel></Parallel>\boxed{1}".
    graph = ng.parse(text, grammar="multiverse", lenient=True)
    assert codes(text, grammar="multiverse") == ["missing_branches"]
    assert codes(text, "lenient", grammar="multiverse") == ["missing_branches"]
    assert not ng.format_valid(graph)
