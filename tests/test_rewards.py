"""papo.rewards: answer extraction, math-verify equivalence, time limits, the reward registry."""

from __future__ import annotations

import re
import signal
import threading
import time

import pytest
from conftest import MULTIVERSE_TRACE, NPR_TRACE

from npr_graph.format import format_score
from papo import rewards
from papo.rewards import (
    Reward,
    extract_answer,
    get,
    names,
    overlong_penalty,
    register,
    stated_result,
    verify,
)

# An expression that sympy evaluates for ever (a 2^(2^100)-bit integer).
HUGE = "2^{2^{2^{100}}}"


# --- extraction ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("so \\boxed{42}.", "42"),
        ("first \\boxed{1}, then \\boxed{ 2 }", "2"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("\\boxed {x^{2}+1}", "x^{2}+1"),
        ("no answer here", None),
        ("unclosed \\boxed{12", None),
        # a cut last answer is no answer, not the box before it (a step's, say)
        ("step: \\boxed{5}. So the answer is \\boxed{12", None),
        ("\\boxed{1} and \\boxed{\\frac{1}{2}", None),
        ("\\boxed{\\boxed{5}", "5"),
        ("\\boxed{5} \\boxed {6}}", "6"),
        ("", None),
        # \boxed and a space then one token, and \fbox{...}, as the MATH grader reads them
        ("so $\\boxed 5$.", "5"),
        ("\\boxed{1}, so \\boxed 42", "42"),
        ("\\boxed 2^{10} apples", "2^{10}"),
        ("\\boxed \\text{no solution}.", "\\text{no solution}."),
        ("\\fbox{7}", "7"),
        ("\\boxed{1} then \\fbox {\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\fbox{1}, then \\boxed{2}", "2"),
        ("\\fbox{\\boxed 5}", "5"),
        ("\\boxed{3} \\fboxsep{2pt} \\boxedfoo 4", "3"),  # other macros
        # a cut last box of any form is no answer
        ("\\boxed{3}. So \\fbox{4", None),
        ("\\boxed{3}. So \\boxed 2^{1", None),
        ("\\boxed{3}. So \\boxed", None),
        ("\\boxed{3}. So \\boxed \n", None),
        # an empty last box is an empty answer (which no reference matches)
        ("\\boxed{3}. So \\fbox{}", ""),
        ("\\boxed{3}. So $\\boxed $", ""),
        # a last box the MATH grader does not read is still the last box, not the one before it
        ("First guess \\boxed{3}. Correction: $\\boxed5$.", "5"),
        ("\\boxed{3} ... final $\\boxed\\frac{1}{2}$", "\\frac{1}{2}"),
        ("\\boxed{3} then \\boxed\n{5}", "5"),
        ("\\boxed{3} then \\boxed\t5", "5"),
        ("\\boxed{3} then \\fbox 5", "5"),
        ("\\boxed{3} then \\boxed-2", "-2"),
        ("\\boxed{3}, set with \\boxed. or \\boxed, in prose", "3"),
    ],
)
def test_extract_answer(text: str, answer: str | None) -> None:
    assert extract_answer(text) == answer


def test_extraction_stays_linear_on_hostile_input() -> None:
    for unit in ("\\boxed a{", "\\boxed ", "\\fbox{", "{\\boxed x}", "\\boxed a{b}c "):
        started = time.monotonic()
        extract_answer(unit * 50_000)
        assert time.monotonic() - started < 2.0, unit


@pytest.mark.parametrize(
    "final",
    [
        "\\boxed{5}",
        "\\fbox{5}",
        "$\\boxed 5$",
        "\\boxed 5",
        "\\fbox{}",
        "$\\boxed $",
        "\\boxed{ }",
        "5",
        "\\fbox{5",
        "\\boxed 2^{5",
        "\\boxed{4} or rather \\fbox{5",
        "\\boxed{4} or rather \\boxed{5",
        "\\boxed{4} or rather \\boxed",
        "\\fbox{\\boxed 5}",
        "\\boxed{4} or rather $\\boxed5$",
        "\\boxed{4} or rather \\fbox 5",
        "\\boxed\n{5}",
    ],
)
def test_format_rules_read_the_answer_the_reward_reads(final: str) -> None:
    """validate's answer rules find an answer exactly when the reward does, and an empty one
    when the reward's is empty (Multiverse's format_valid rests on them)."""
    from npr_graph.constraints import validate

    for trace in (NPR_TRACE, MULTIVERSE_TRACE):
        boxed = "\\boxed{5}" if trace is NPR_TRACE else "\\boxed{10}"
        text = trace.replace(boxed, final)
        codes = {
            v.code for v in validate(text, grammar="npr" if trace is NPR_TRACE else "multiverse")
        }
        answer = extract_answer(text)
        assert ("missing_answer" in codes) == (answer is None), text
        assert ("empty_answer" in codes) == (answer == ""), text


def test_accuracy_reads_a_spaced_box_and_an_fbox() -> None:
    assert get("accuracy")("So $\\boxed 5$.", "5").correct
    assert get("accuracy")("So \\fbox{\\frac{1}{2}}.", "0.5").correct
    assert not get("accuracy")("So \\boxed{5}, no: \\fbox{6", "5").correct


def test_answers_written_over_several_lines_are_read_whole() -> None:
    """math-verify's ``$...$`` does not span lines: a matrix written over several lines in its
    box was graded by one number in it, right answers wrong and wrong ones right."""
    accuracy = get("accuracy")
    matrix = "\\begin{pmatrix} -7 \\\\ 16 \\\\ 5 \\end{pmatrix}"
    written = "\\[\n\\boxed{\\begin{pmatrix}\n-7 \\\\\n16 \\\\\n%s\n\\end{pmatrix}}\n\\]"
    assert accuracy(written % "5", matrix).correct
    assert not accuracy(written % "6", "6").correct
    assert not accuracy(written % "6", matrix).correct
    assert accuracy("\\boxed{\\frac{3}{\n4}}", "0.75").correct
    assert accuracy("\\boxed{(1,\n2)}", "(1,2)").correct
    assert not accuracy("$$\\boxed{1\n+2}$$", "1").correct
    assert accuracy("$$\\boxed{1\n+2}$$", "3").correct
    assert accuracy("\\boxed{5}", "5\n").correct, "a reference read from a file may hold one too"


@pytest.mark.parametrize(
    ("response", "reference", "correct"),
    [
        ("\\boxed{\\frac{1}{2}.}", "0.5", True),
        ("\\boxed{\\sqrt{2}.}", "\\sqrt{2}", True),
        ("\\boxed{\\frac{1}{2},}", "\\frac12", True),
        ("\\boxed{1, 2}", "1,2", True),
        ("\\boxed{\\frac{1}{2}.}", "0.6", False),
        ("\\boxed{1, 2, \\ldots}", "1", False),
    ],
)
def test_a_sentences_full_stop_in_the_box_is_not_part_of_the_answer(
    response: str, reference: str, correct: bool
) -> None:
    outcome = get("accuracy")(response, reference)
    assert outcome.correct is correct and outcome.parsed


def test_extract_answer_of_the_fixture_traces() -> None:
    assert extract_answer(NPR_TRACE) == "5"
    assert extract_answer(MULTIVERSE_TRACE) == "10"


@pytest.mark.parametrize(
    ("text", "result"),
    [
        ("1: x^2-5x+6=(x-2)(x-3), so the sum is 42.", "42"),
        ("adding gives \\boxed{\\frac{3}{4}} and then 7", "\\frac{3}{4}"),
        ("the total is 1,024 apples.", "1024"),
        ("the difference is -3", "-3"),
        ("x-5 is zero at 5", "5"),
        ("about 3.25 or 13/4", "13/4"),
        # a LaTeX fraction is one number, not its denominator
        ("1: the probability is \\frac{3}{4}.", "\\frac{3}{4}"),
        ("2: so x = -\\frac{1}{2}", "-\\frac{1}{2}"),
        ("ratio \\dfrac{14}{3}, or \\tfrac34", "\\tfrac34"),
        ("x = 3 - \\frac{1}{2}", "\\frac{1}{2}"),
        ("\\frac{3}{4} of 12 is 9", "9"),
        ("no numbers at all", None),
    ],
)
def test_stated_result(text: str, result: str | None) -> None:
    assert stated_result(text) == result


# --- equivalence --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "reference"),
    [
        ("42", "42"),
        ("42.0", "42"),
        ("\\frac{1}{2}", "0.5"),
        ("\\frac12", "1/2"),
        ("\\dfrac{3}{4}", "\\frac{3}{4}"),
        ("2\\sqrt{2}", "\\sqrt{8}"),
        ("(3, \\pi/2)", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("1,000", "1000"),
        ("1\\,000", "1000"),
        ("12\\,345\\,678", "12345678"),
        ("1\\;000", "1000"),
        ("1~000", "1000"),
        ("1 000", "1000"),
        ("2\\,000", "2,000"),
        ("x = 5", "5"),
        ("\\text{Evelyn}", "\\text{Evelyn}"),
    ],
)
def test_equivalent_answers(prediction: str, reference: str) -> None:
    assert verify(prediction, reference)


@pytest.mark.parametrize(
    ("prediction", "reference"),
    [
        ("41", "42"),
        ("\\frac{1}{2}", "\\frac{1}{3}"),
        ("(3, \\pi)", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("-5", "5"),
        ("1\\,000", "0"),  # not 1 * 000
        ("1 000", "0"),
        ("1\\,000", "1"),
    ],
)
def test_wrong_answers(prediction: str, reference: str) -> None:
    assert not verify(prediction, reference)


@pytest.mark.parametrize(
    ("prediction", "reference"),
    [
        ("½", "\\frac{1}{2}"),
        ("⅔", "2/3"),
        ("2½", "\\frac{5}{2}"),  # a mixed number, not 2 times one half
        ("-1¾", "-1.75"),
        ("√2", "\\sqrt{2}"),
        ("3√5", "3\\sqrt{5}"),
        ("√(x+1)", "\\sqrt{x+1}"),
        ("√π", "\\sqrt{\\pi}"),
        ("∛8", "2"),
        ("x² + 2x", "x^2 + 2x"),
        ("10⁻³", "0.001"),
        ("a₁", "a_1"),
        ("１２", "12"),
        ("3·4", "12"),
        ("(-∞, 3]", "(-\\infty, 3]"),
        ("\\frac{√3}{2}", "\\frac{\\sqrt{3}}{2}"),
        ("\\frac{\\sqrt{3}}{2}", "√3/2"),  # the reference is read the same way
    ],
)
def test_unicode_math_answers_are_read_as_latex(prediction: str, reference: str) -> None:
    assert verify(prediction, reference)
    assert get("accuracy")(f"so \\boxed{{{prediction}}}", reference).correct


@pytest.mark.parametrize(
    ("prediction", "reference"),
    [("½", "2"), ("2½", "1"), ("√2", "2"), ("x²", "2x"), ("∛8", "\\sqrt{8}"), ("a₁", "a1")],
)
def test_unicode_math_answers_keep_their_meaning(prediction: str, reference: str) -> None:
    assert not verify(prediction, reference)


@pytest.mark.parametrize("prediction", [None, "", "   ", "{{{", "\\frac{", "}}\\left(", "\x00\xff"])
def test_unparseable_predictions_are_wrong_and_do_not_raise(prediction: str | None) -> None:
    assert verify(prediction, "1") is False


def test_invalid_timeout_is_an_error() -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        verify("1", "1", timeout_s=0)


def test_timeout_in_main_thread_returns_false_quickly() -> None:
    verify("1", "1")  # import and warm math-verify outside the timed part
    started = time.monotonic()
    assert verify(HUGE, "1", timeout_s=0.3) is False
    assert time.monotonic() - started < 2.0
    assert verify("7", "7", timeout_s=0.3), "the module still works after a timeout"


def test_timer_restores_an_outer_alarm() -> None:
    """A SIGALRM timer set by someone else (pytest-timeout uses one) survives a check."""
    fired: list[bool] = []
    previous = signal.signal(signal.SIGALRM, lambda *_: fired.append(True))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.8)
        assert verify("2", "2")
        assert verify(HUGE, "1", timeout_s=0.2) is False
        assert signal.getsignal(signal.SIGALRM) is not rewards._raise_timeout
        remaining = signal.getitimer(signal.ITIMER_REAL)[0]
        assert 0 < remaining < 0.8
        time.sleep(remaining + 0.2)
        assert fired == [True]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _in_thread(fn, *args, **kwargs):
    results: list = []
    thread = threading.Thread(target=lambda: results.append(fn(*args, **kwargs)))
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive()
    return results[0]


def test_verify_from_other_threads_uses_a_helper_process() -> None:
    assert _in_thread(verify, "\\frac{1}{2}", "0.5") is True
    assert _in_thread(verify, "3", "4") is False
    started = time.monotonic()
    assert _in_thread(verify, HUGE, "1", timeout_s=0.3) is False
    assert time.monotonic() - started < 3.0
    assert _in_thread(verify, "7", "7"), "the helper survives a timeout"


def test_unresponsive_helper_is_killed_and_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    _in_thread(verify, "1", "1")  # a warm helper
    helper = rewards._idle_helpers[-1]
    # With a negative grace the caller stops waiting before the helper can answer.
    monkeypatch.setattr(rewards, "_GRACE_S", -0.25)
    assert _in_thread(verify, HUGE, "1", timeout_s=0.3) is False
    assert helper.process.poll() is not None, "the stuck helper was killed"
    assert helper not in rewards._idle_helpers
    monkeypatch.setattr(rewards, "_GRACE_S", 1.0)
    assert _in_thread(verify, "8", "8")


def test_a_check_stuck_in_c_code_still_ends_in_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """One C-level operation holds off a timer's signal until it returns (sympy working on the
    integer 10^(10^10) ignored a 1 s limit for 10 s and more); checks run in a helper process,
    which can be killed. Simulated here by a check that blocks SIGALRM in this process."""
    assert verify("1", "1")  # a warm helper

    def stuck(prediction: str, reference: str):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        try:
            time.sleep(3)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGALRM})
        return rewards._Outcome(False, False, False)

    monkeypatch.setattr(rewards, "_compare", stuck)
    started = time.monotonic()
    assert verify("7", "7", timeout_s=0.5) is True
    assert time.monotonic() - started < 2.0


def test_huge_integer_answers_end_in_time() -> None:
    """A real answer of that kind: the helper's memory cap makes it fail at once."""
    assert verify("1", "1")
    started = time.monotonic()
    reward = get("accuracy")("\\boxed{(10^{10^{10}})!}", "9^9", timeout_s=1.0)
    assert not reward.correct
    assert time.monotonic() - started < 1.0 + rewards._GRACE_S + 1.0


def test_without_a_helper_the_main_thread_uses_the_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_helper() -> None:
        raise RuntimeError("no processes here")

    monkeypatch.setattr(rewards, "_Helper", no_helper)
    monkeypatch.setattr(rewards, "_idle_helpers", [])
    assert verify("\\frac{1}{2}", "0.5") is True
    started = time.monotonic()
    assert verify(HUGE, "1", timeout_s=0.3) is False
    assert time.monotonic() - started < 2.0
    assert _in_thread(verify, "7", "7") is False, "no helper, no timer: counted as wrong"


def test_many_threads_at_once() -> None:
    cases = [(str(i), str(i), True) for i in range(3)] + [("1", "2", False)]
    results: dict[int, bool] = {}

    def run(index: int, prediction: str, reference: str) -> None:
        results[index] = verify(prediction, reference)

    threads = [threading.Thread(target=run, args=(i, p, r)) for i, (p, r, _) in enumerate(cases)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert results == {i: expected for i, (_, _, expected) in enumerate(cases)}


# --- rewards ------------------------------------------------------------------------------------

INVALID_FORMAT = "Let me think. 2+3 = 5, so \\boxed{5}."
BROKEN_BLOCK = (
    "<guideline>\n<plan>1: a</plan>\n<plan>2: b</plan>\n</guideline>\n"
    "<step>\n1: only one step here\n</step>\n<takeaway>\nso it is 5\n</takeaway>\n\\boxed{5}"
)


def test_accuracy_reward() -> None:
    accuracy = get("accuracy")
    assert accuracy(NPR_TRACE, "5") == Reward(1.0, True, "5", None, True)
    assert accuracy(NPR_TRACE, "6") == Reward(-1.0, False, "5", None, True)
    assert accuracy("I do not know.", "5") == Reward(-1.0, False, None, None, False)
    assert accuracy("\\boxed{\\frac{}", "5").score == -1.0


def test_npr_zero_on_valid_format_is_accuracy() -> None:
    assert format_score(NPR_TRACE) == 0.0
    npr_zero = get("npr_zero")
    assert npr_zero(NPR_TRACE, "5") == Reward(1.0, True, "5", 0.0, True)
    assert npr_zero(NPR_TRACE, "\\frac{10}{2}").score == 1.0
    assert npr_zero(NPR_TRACE, "4") == Reward(-1.0, False, "5", 0.0, True)


@pytest.mark.parametrize("text", [INVALID_FORMAT, BROKEN_BLOCK, MULTIVERSE_TRACE, ""])
def test_npr_zero_on_invalid_format_is_the_penalty(text: str) -> None:
    penalty = format_score(text)
    assert penalty < 0
    reward = get("npr_zero")(text, "5")
    assert reward.score == max(penalty, -2.0)
    assert -2.0 <= reward.score < 0
    assert reward.format_score == penalty


def test_npr_zero_floor_and_correctness_are_reported() -> None:
    # Every plan too short, every step too short, takeaway too short, empty box: below -2 raw.
    many = "".join(
        "<guideline><plan>a</plan><plan>b</plan></guideline><step>x</step><step>y</step>"
        "<takeaway>z</takeaway>"
        for _ in range(3)
    )
    text = many + "\\boxed{}"
    assert format_score(text) < -2.0
    assert get("npr_zero")(text, "5").score == -2.0
    assert get("npr_zero")(text, "5", format_floor=None).score == format_score(text)
    # A correct answer in a broken format: penalised, but reported as correct.
    reward = get("npr_zero")(INVALID_FORMAT, "5")
    assert reward.correct and reward.score == format_score(INVALID_FORMAT)


def test_format_reward() -> None:
    assert get("format")(NPR_TRACE, "5") == Reward(0.0, True, "5", 0.0, True)
    reward = get("format")(INVALID_FORMAT, "7")
    assert reward.score == format_score(INVALID_FORMAT) and not reward.correct


def test_reward_to_dict() -> None:
    assert get("accuracy")(NPR_TRACE, "5").to_dict() == {
        "score": 1.0,
        "correct": True,
        "answer": "5",
        "format_score": None,
        "parsed": True,
    }


# --- registry -----------------------------------------------------------------------------------


def test_registry_names() -> None:
    assert {"accuracy", "npr_zero", "format"} <= set(names())


def test_unknown_reward_lists_the_known_ones() -> None:
    with pytest.raises(KeyError, match="unknown reward 'nope'.*accuracy.*format.*npr_zero"):
        get("nope")


def test_a_function_of_ones_own_is_named_by_its_import_path() -> None:
    """``module:function`` imports the function (the known names stay the registered ones; a
    reward's calls are checked to return a Reward); what cannot be imported, or is not a
    function, is a KeyError that says so."""
    import operator

    from papo.advantages import get as estimator

    assert get("operator:add").__wrapped__ is operator.add and "operator:add" not in names()
    with pytest.raises(ValueError, match="reward 'operator:add' returned str, expected"):
        get("operator:add")("a", "b")
    assert estimator("operator:sub") is operator.sub
    for name, why in [
        ("no_such_module_here:f", "cannot be imported: No module named 'no_such_module_here'"),
        ("math:no_such_function", "cannot be imported: module 'math' has no attribute"),
        (":f", "cannot be imported: Empty module name"),
        ("math:pi", "is not a function"),
    ]:
        with pytest.raises(KeyError, match=re.escape(f"reward {name!r} {why}")):
            get(name)


def test_unknown_option_is_an_error() -> None:
    with pytest.raises(TypeError):
        get("accuracy")(NPR_TRACE, "5", no_such_option=1)


def test_register_a_custom_reward() -> None:
    @register("test_constant")
    def constant(response: str, reference: str, **options) -> Reward:
        return Reward(0.5, False, None, None, False)

    try:
        assert get("test_constant") is constant
        assert "test_constant" in names()
    finally:
        rewards._REWARDS.unregister("test_constant")


# --- overlong penalty ---------------------------------------------------------------------------


def test_overlong_penalty_shape() -> None:
    values = [overlong_penalty(n, 100, 20, 1.0) for n in (0, 50, 80, 85, 90, 100, 101, 10_000)]
    assert values == pytest.approx([0, 0, 0, -0.25, -0.5, -1.0, -1.0, -1.0])
    assert overlong_penalty(90, 100, 20, factor=0.5) == pytest.approx(-0.25)
    # monotone, continuous at both ends of the buffer
    series = [overlong_penalty(n, 100, 20) for n in range(120)]
    assert all(a >= b for a, b in zip(series, series[1:], strict=False))
    assert max(abs(a - b) for a, b in zip(series, series[1:], strict=False)) <= 1 / 20 + 1e-12


def test_overlong_penalty_without_buffer_is_a_step() -> None:
    assert overlong_penalty(100, 100, 0) == 0.0
    assert overlong_penalty(101, 100, 0) == -1.0


@pytest.mark.parametrize(("max_tokens", "buffer"), [(0, 0), (100, -1), (100, 101)])
def test_overlong_penalty_rejects_bad_arguments(max_tokens: int, buffer: int) -> None:
    with pytest.raises(ValueError, match="buffer_tokens"):
        overlong_penalty(10, max_tokens, buffer)
