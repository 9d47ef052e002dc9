"""Tests for npr_graph.format.format_score, the NPR format reward."""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npr_graph.format import TAGS, format_score

PLANS = ["1: factor the quadratic", "2: complete the square"]
STEPS = ["1: x^2-5x+6 = (x-2)(x-3), so x = 2 or 3", "2: (x-5/2)^2 = 1/4, so x = 2 or 3"]


def block(
    plans: list[str] = PLANS,
    steps: list[str] = STEPS,
    takeaway: str = "both routes give x = 2 or x = 3",
    *,
    before_plans: str = "",
) -> str:
    """One guideline/steps/takeaway block laid out the way models write it."""
    guideline = before_plans + "".join(f"<plan>\n{p}\n</plan>\n" for p in plans)
    body = "".join(f"<step>\n{s}\n</step>\n" for s in steps)
    return f"<guideline>\n{guideline}</guideline>\n{body}<takeaway>\n{takeaway}\n</takeaway>\n"


CHECK = block(["check both roots"], ["2^2-10+6 = 0 and 9-15+6 = 0"], "both roots check out")
VALID = block() + CHECK + "The roots are \\boxed{2, 3}."


def test_valid_two_block_trace_scores_zero() -> None:
    assert format_score(VALID) == 0.0


def test_tag_free_prose_around_blocks_is_allowed() -> None:
    text = "Let me think.\n" + block() + "Now verify.\n" + CHECK + "So \\boxed{2,3}."
    assert format_score(text) == 0.0


# --- early returns --------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   \n\t",
        "The answer is \\boxed{3}.",
        "<guideline><plan>abc</plan></guideline><takeaway>abcdef</takeaway>",  # no step
        "<guideline><plan>abc</plan></guideline><step>abcdef</step>",  # no takeaway
        "<plan>abc</plan><step>abcdef</step><takeaway>abcdef</takeaway>",  # no guideline
        "<guideline><plan>abc</plan></guideline>x<step>abcdef</step><takeaway>abcdef</takeaway>",
    ],
)
def test_no_block_scores_minus_one_and_a_half(text: str) -> None:
    assert format_score(text) == -1.5


def test_tag_before_first_block() -> None:
    assert format_score("<step>warm-up</step>\n" + VALID) == -1.5


def test_tag_between_blocks_overrides_earlier_penalties() -> None:
    first = block(takeaway="short")  # would cost -0.4
    assert format_score(first + "</plan>\n" + CHECK + "\\boxed{}") == -1.5


def test_guideline_without_plans() -> None:
    text = "<guideline>just think</guideline><step>abcdef</step><takeaway>abcdef</takeaway>"
    assert format_score(text) == -1.0


@pytest.mark.parametrize("steps", [STEPS[:1], [*STEPS, "3: one step too many"]])
def test_step_count_differs_from_plan_count(steps: list[str]) -> None:
    assert format_score(block(steps=steps) + CHECK) == -1.0


def test_step_count_mismatch_discards_accumulated_penalties() -> None:
    # The first block alone would cost 2 x -0.4 (short plan, short takeaway).
    text = block(plans=["ab", PLANS[1]], takeaway="tiny") + block(steps=STEPS[:1])
    assert format_score(text) == -1.0


def test_tag_after_last_block_discards_accumulated_penalties() -> None:
    text = block(takeaway="tiny") + "<step>an afterthought</step> \\boxed{}"
    assert format_score(text) == -1.0


# --- accumulating penalties -----------------------------------------------------


@pytest.mark.parametrize(
    "guideline",
    [
        "Two routes:<plan>factor it</plan><plan>complete square</plan>",
        "<plan>factor it</plan>and<plan>complete square</plan>",
        "<plan>factor it</plan><plan>complete square</plan>done",
    ],
)
def test_text_in_guideline_besides_plans(guideline: str) -> None:
    # -0.4 for holding more than plans, -0.2 because the plans are not adjacent.
    text = f"<guideline>{guideline}</guideline>" + "".join(f"<step>{s}</step>" for s in STEPS)
    assert format_score(text + "<takeaway>both give 2 and 3</takeaway>") == pytest.approx(-0.6)


def test_dangling_close_open_in_guideline_is_not_an_adjacency_failure() -> None:
    # Reference quirk: a trailing "</plan><plan>" only costs the -0.4.
    text = "<guideline><plan>factor it</plan></plan><plan></guideline>"
    text += "<step>x = 2 or 3</step><takeaway>roots 2 and 3</takeaway>"
    assert format_score(text) == -0.4


def test_steps_not_adjacent() -> None:
    text = block().replace("</step>\n<step>", "</step>\nand then\n<step>")
    assert format_score(text + CHECK) == -0.2


@pytest.mark.parametrize(("plan", "expected"), [("ab", -0.4), ("abc", 0.0), ("a<step>b", -0.4)])
def test_short_or_tagged_plan(plan: str, expected: float) -> None:
    assert format_score(block(plans=[plan, PLANS[1]]) + CHECK) == expected


def test_each_bad_plan_is_penalised() -> None:
    assert format_score(block(plans=["a", "b"])) == pytest.approx(-0.8)


@pytest.mark.parametrize(
    ("step", "expected"), [("abcde", -0.4), ("abcdef", 0.0), ("x = 2<plan>y", -0.4)]
)
def test_short_or_tagged_step(step: str, expected: float) -> None:
    assert format_score(block(steps=[STEPS[0], step]) + CHECK) == expected


def test_each_bad_step_is_penalised() -> None:
    assert format_score(block(steps=["x", "y"])) == pytest.approx(-0.8)


@pytest.mark.parametrize(("takeaway", "expected"), [("abcde", -0.4), ("abcdef", 0.0)])
def test_short_takeaway(takeaway: str, expected: float) -> None:
    assert format_score(block(takeaway=takeaway) + CHECK) == expected


def test_penalties_accumulate_across_blocks_without_clipping() -> None:
    # Block 1: short plan -0.4, short step -0.4. Block 2: stray guideline text
    # -0.4 - 0.2, short takeaway -0.4. Empty box -1.0. Total -2.8, below -2.
    first = block(plans=["ab", PLANS[1]], steps=[STEPS[0], "tiny"])
    second = block(["check both roots"], ["2 and 3 both work"], "ok", before_plans="hmm")
    assert format_score(first + second + "\\boxed{}") == pytest.approx(-2.8)


# --- \boxed{} ------------------------------------------------------------------


@pytest.mark.parametrize("answer", ["\\boxed{}", "\\boxed{ \n }", "\\boxed{} or \\boxed{}"])
def test_empty_boxed(answer: str) -> None:
    assert format_score(block() + CHECK + answer) == -1.0


def test_empty_boxed_inside_a_step_counts() -> None:
    assert format_score(block(steps=[STEPS[0], "so \\boxed{} here"]) + CHECK) == -1.0


def test_empty_boxed_adds_to_other_penalties() -> None:
    assert format_score(block(takeaway="tiny") + "\\boxed{}") == pytest.approx(-1.4)


def test_box_swallowed_by_an_unclosed_box_is_not_empty() -> None:
    # Reference quirk: the lazy "\boxed{...}" scan reads "\boxed{" as the outer content.
    assert format_score(VALID + "\\boxed{\\boxed{}") == 0.0


def test_missing_boxed_is_not_penalised() -> None:
    assert format_score(block() + CHECK) == 0.0


# --- whitespace -----------------------------------------------------------------


def test_whitespace_is_ignored_everywhere() -> None:
    squashed = "".join(VALID.split())
    spread = re.sub(r"(?<=.)(?=.)", " \n", squashed)  # whitespace between every char
    assert format_score(squashed) == format_score(spread) == 0.0
    assert format_score(VALID.replace("<step>", "< step\t>")) == 0.0


def test_whitespace_does_not_count_towards_lengths() -> None:
    assert format_score(block(steps=[STEPS[0], "a b c d e  \n"]) + CHECK) == -0.4


# --- arbitrary input ------------------------------------------------------------

TOKENS = [
    *TAGS,
    "a",
    "abcdef",
    " ",
    "\n",
    "\\boxed{",
    "}",
    "\\boxed{}",
    "</plan><plan>",
    "</step><step>",
    "<",
    ">",
]
tag_soup = st.lists(st.sampled_from(TOKENS), max_size=16).map("".join)


def _pairs_as_markers(text: str, tag: str) -> str:
    return re.sub(f"<{tag}>.*?</{tag}>", f"</{tag}><{tag}>", text)


def naive_format_score(text: str) -> float:
    """Straight regex transcription of the rules; exponential time, small inputs only."""
    text = re.sub(r"\s+", "", text)
    pattern = r"<guideline>(.*?)</guideline>((?:<step>.*?</step>)+)<takeaway>(.*?)</takeaway>"
    matches = list(re.finditer(pattern, text))
    if not matches:
        return -1.5
    score, pos = 0.0, 0
    for match in matches:
        if any(tag in text[pos : match.start()] for tag in TAGS):
            return -1.5
        pos = match.end()
        guideline, steps_block, takeaway = match.groups()
        plans = re.findall("<plan>(.*?)</plan>", guideline)
        if not plans:
            return -1.0
        if "".join(f"<plan>{p}</plan>" for p in plans) != guideline:
            score -= 0.4
        if _pairs_as_markers(guideline, "plan").replace("</plan><plan>", ""):
            score -= 0.2
        steps = re.findall("<step>(.*?)</step>", steps_block)
        if len(steps) != len(plans):
            return -1.0
        if _pairs_as_markers(steps_block, "step").replace("</step><step>", ""):
            score -= 0.2
        for content, minimum in [(p, 3) for p in plans] + [(s, 6) for s in steps]:
            if len(content) < minimum or any(tag in content for tag in TAGS):
                score -= 0.4
        if len(takeaway) < 6:
            score -= 0.4
    if any(tag in text[pos:] for tag in TAGS):
        return -1.0
    if "" in re.findall(r"\\boxed\{(.*?)\}", text):
        score -= 1.0
    return score


@given(st.text())
def test_arbitrary_text_never_raises(text: str) -> None:
    score = format_score(text)
    assert isinstance(score, float)
    assert score <= 0.0


@settings(max_examples=500)
@given(tag_soup)
def test_tag_soup_matches_naive_transcription(text: str) -> None:
    assert format_score(text) == naive_format_score(text)


@given(tag_soup, st.text(alphabet=" \t\n\r\x0b\x0c\u00a0\u2003\u3000", min_size=1))
def test_inserted_whitespace_never_changes_the_score(text: str, space: str) -> None:
    assert format_score(space.join(text)) == format_score(text)


# --- bounded time ---------------------------------------------------------------

HEAD = "<guideline><plan>abc</plan></guideline>"
PATHOLOGICAL = {
    "open guidelines": lambda n: "<guideline>" * n,
    "open plans": lambda n: "<guideline>" + "<plan>" * n + "</guideline><step>abcdef</step>",
    "nested plans": lambda n: "<guideline>" + "<plan>" * n + "a" + "</plan>" * n + "</guideline>",
    "open steps": lambda n: HEAD + "<step>" * n + "</step><takeaway>abcdef</takeaway>",
    # Exponential for the reference's nested lazy regex: 2^(n-1) ways to split.
    "steps without takeaway": lambda n: HEAD + "<step>abcdef</step>" * n,
    "open takeaways": lambda n: HEAD + "<step>abcdef</step>" + "<takeaway>" * n,
    "open boxes": lambda n: VALID + "\\boxed{" * n,
    "mixed opens": lambda n: "".join(TAGS[::2]) * n,
}


def _elapsed(text: str) -> float:
    start = time.perf_counter()
    format_score(text)
    return time.perf_counter() - start


@pytest.mark.parametrize("make", PATHOLOGICAL.values(), ids=PATHOLOGICAL.keys())
def test_thousand_nested_or_unclosed_tags_are_fast(make: Callable[[int], str]) -> None:
    assert _elapsed(make(1000)) < 1.0


@pytest.mark.slow
@pytest.mark.parametrize("make", PATHOLOGICAL.values(), ids=PATHOLOGICAL.keys())
def test_ten_megabyte_malformed_input_is_fast(make: Callable[[int], str]) -> None:
    unit = len(make(2)) - len(make(1))
    text = make(10_000_000 // unit + 1)
    assert len(text) >= 10_000_000
    assert _elapsed(text) < 2.0


@pytest.mark.slow
def test_ten_megabytes_of_valid_blocks_is_linear() -> None:
    # ~80k blocks, each handled in Python: the bound is loose for slow CI
    # machines but far below what any quadratic rescanning would take.
    text = VALID * (10_000_000 // len(VALID) + 1)
    assert _elapsed(text) < 10.0


@pytest.mark.parametrize("value", [None, b"<guideline>", ["<step>"]])
def test_non_text_is_a_type_error(value: object) -> None:
    # None raised AttributeError ('NoneType' object has no attribute 'split').
    with pytest.raises(TypeError, match="response text"):
        format_score(value)  # type: ignore[arg-type]
