"""Rewards: answer extraction, math equivalence (math-verify) and reward functions in a registry.

Reward functions are called as ``fn(response, reference, **options)`` and return a :class:`Reward`:

- ``accuracy``: +1 when the last boxed answer (:func:`extract_answer`: ``\\boxed{}``, ``\\fbox{}`` or
  ``\\boxed 5``, wherever it stands in the response) is equivalent to the reference, else -1 (the
  PAPO reward; a response without an answer counts as wrong);
- ``npr_zero``: the NPR-Zero stage: when ``npr_graph.format_score(response) == 0`` (the format
  passes) the ``accuracy`` reward, otherwise the format penalty (negative, floored at -2);
- ``format``: the format score alone.

:func:`verify` never raises and never hangs. Every check runs in a helper process
(``python -c 'from papo.rewards import _serve; _serve()'``), which bounds it with a ``SIGALRM``
interval timer and is killed if it does not answer in time: a timer alone cannot stop one long
C-level operation (sympy raising 10 to the 10^10 in one big-integer call ignores signals until it
returns), a killed process can. The helper's address space is capped (``_HELPER_MEMORY``) so that
such an answer fails fast with a MemoryError instead of taking gigabytes. Helper processes are
kept for reuse, one per thread verifying at the same moment. Only when no helper can be started
does the main thread check in process under the timer (saving and restoring any timer already
set, e.g. pytest-timeout's); another thread then counts the answer as wrong.

npr_graph and math-verify are imported inside the functions that need them so that the helper
process starts without torch (about 1 s instead of 4).
"""

from __future__ import annotations

import atexit
import json
import math
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from .registry import Registry

__all__ = [
    "Reward",
    "RewardFn",
    "extract_answer",
    "get",
    "names",
    "overlong_penalty",
    "register",
    "stated_result",
    "verify",
]

#: The npr_zero penalty is floored here: format_score's raw sum can go below -2 (see its docstring).
FORMAT_FLOOR = -2.0
#: A helper process gets this long beyond the check's own limit before it is killed.
_GRACE_S = 1.0
#: Starting a helper (importing math-verify and sympy) is not counted against a check's limit.
_STARTUP_TIMEOUT_S = 60.0
#: The helper's address space may grow this much (bytes) past its size once started: checking an
#: answer never needs more, and an answer like 10^{10^{10}} (a 4 GB integer) raises MemoryError.
_HELPER_MEMORY = 2 << 30


@dataclass(frozen=True)
class Reward:
    """One response's reward.

    ``score`` is what training uses; ``correct`` whether the answer matches the reference (always
    checked, whatever the score); ``answer`` the extracted answer; ``format_score`` the NPR format
    score when the reward computed it (else None); ``parsed`` False when no answer could be
    extracted or math-verify could not read it (such a response is counted as wrong).
    """

    score: float
    correct: bool
    answer: str | None
    format_score: float | None
    parsed: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "score": self.score,
            "correct": self.correct,
            "answer": self.answer,
            "format_score": self.format_score,
            "parsed": self.parsed,
        }


class RewardFn(Protocol):
    def __call__(self, response: str, reference: str, **options: Any) -> Reward: ...


# --------------------------------------------------------------------------------------------------
# extraction


def extract_answer(text: str) -> str | None:
    """The content of the last box in ``text``, stripped: ``\\boxed{...}`` or ``\\fbox{...}``
    (balanced braces), or ``\\boxed`` and a space then one token (``\\boxed 5``, up to whitespace,
    ``$`` or an unmatched ``}``), as the MATH grader's ``last_boxed_only_string`` reads them, or
    a token right behind the name (``\\boxed5``; :data:`npr_graph.constraints.BOX_OPENER`). None if there is none, or if the last one is
    never closed: a cut answer ("... so \\boxed{12") is no answer, not the box written before
    it. A box nested in another one counts as its own (later-starting) box. An empty box gives
    ``""``, which no reference matches."""
    from npr_graph.constraints import last_box

    answer = last_box(text)
    return None if answer is None else answer.strip()


# A number as people write it: sign, thousands separators, decimals, a simple fraction.
_NUMBER = r"(?:(?<![\w)])-)?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:/\d+)?"
# A LaTeX fraction of integers, one number too: -\frac{1}{2}, \dfrac{14}{3}, \frac34.
_FRACTION = r"(?:(?<![\w)])-)?\\[dt]?frac\s*(?:\{\s*-?\d+\s*\}|\d)\s*(?:\{\s*\d+\s*\}|\d)"
_STATED = re.compile(f"(?P<fraction>{_FRACTION})|(?P<number>{_NUMBER})")


def stated_result(text: str) -> str | None:
    """What a step states as its result: its last boxed value, else its last number (thousands
    separators removed: "so the sum is 1,024." -> "1024"; a LaTeX fraction of integers such as
    "-\\frac{1}{2}" is one number, not its denominator), else None."""
    boxed = extract_answer(text)
    if boxed:
        return boxed
    last = None
    for match in _STATED.finditer(text):
        last = match
    if last is None:
        return None
    if last["fraction"]:
        return last["fraction"]
    return last["number"].replace(",", "")


# --------------------------------------------------------------------------------------------------
# equivalence


class _Timeout(BaseException):
    """Raised by the interval timer. A BaseException, so that the ``except Exception`` clauses of
    math-verify and sympy do not swallow it and carry on with the remaining work."""


class _Outcome(NamedTuple):
    correct: bool
    parsed: bool  # math-verify read the prediction as a math object
    timed_out: bool


def _math_verify() -> Any:
    """math-verify, imported outside any timer (an import cut short by an alarm stays broken)."""
    import math_verify
    from math_verify import grader, parser

    # Its "timeout is disabled" warning is about exactly what this module does instead.
    grader.TIMEOUT_WARNING_SHOWN = parser.TIMEOUT_WARNING_SHOWN = True
    return math_verify


# Digits grouped in threes with a LaTeX space (1\,000, 1\;000, 1~000, 1 000) are one number, as
# LaTeX typesets them (math mode ignores spaces); math-verify read the space as a product, so
# 1\,000 scored as 0 and not as 1000.
_DIGIT_GROUP_SPACE = re.compile(r"(?<=\d)(?:\\[,;: ]|~|\s)+(?=\d{3}(?!\d))")


def _join_digit_groups(text: str) -> str:
    return _DIGIT_GROUP_SPACE.sub("", text)


# A sentence's full stop or comma at the end of an answer ("\boxed{\frac{1}{2}.}"), which
# makes the LaTeX unreadable; not an ellipsis, nor a LaTeX space such as "\,".
_TRAILING_PUNCTUATION = re.compile(r"(?<![.\\])[.,]\s*\Z")


# Unicode math that math-verify reads as text (so "½" scored wrong against \frac{1}{2}):
# super- and subscripts, vulgar fractions, roots, and a few operators, written as LaTeX.
_SCRIPTS = {"^": "⁰¹²³⁴⁵⁶⁷⁸⁹⁺⁻⁼⁽⁾ⁿⁱ", "_": "₀₁₂₃₄₅₆₇₈₉₊₋₌₍₎"}
_SCRIPT_RUNS = {mark: re.compile(f"[{chars}]+") for mark, chars in _SCRIPTS.items()}
_VULGAR_FRACTIONS = "".join(map(chr, (*range(0xBC, 0xBF), *range(0x2150, 0x215F), 0x2189)))
_MIXED_NUMBER = re.compile(rf"(\d*)([{_VULGAR_FRACTIONS}])")
_ROOT = re.compile(r"([√∛∜])\s*(\{[^{}]*\}|\([^()]*\)|\d+(?:\.\d+)?|[^\W\d_]|\\[A-Za-z]+)")
_ROOT_INDEX = {"√": "", "∛": "[3]", "∜": "[4]"}
_OPERATORS = str.maketrans(
    {"∞": r"\infty ", "·": r"\cdot ", "⋅": r"\cdot ", "÷": r"\div ", "±": r"\pm ", "∓": r"\mp "}
    | {"−": "-", "\u2044": "/"}
)


def _fraction(match: re.Match[str]) -> str:
    whole, char = match.groups()
    numerator, _, denominator = unicodedata.normalize("NFKC", char).partition("\u2044")
    fraction = rf"\frac{{{numerator}}}{{{denominator}}}"
    return f"({whole}+{fraction})" if whole else fraction  # 2½ is 2 + 1/2, not 2 · 1/2


def _root(match: re.Match[str]) -> str:
    sign, operand = match.groups()
    if operand[0] in "{(":
        operand = operand[1:-1]
    return rf"\sqrt{_ROOT_INDEX[sign]}{{{operand}}}"


def _unicode_math_as_latex(text: str) -> str:
    r"""``x²`` as ``x^{2}``, ``2½`` as ``(2+\frac{1}{2})``, ``√3`` as ``\sqrt{3}``, ``∞`` as
    ``\infty``, full-width digits as digits (NFKC), and so on; ASCII text is returned as is."""
    if text.isascii():
        return text
    for mark, run in _SCRIPT_RUNS.items():
        text = run.sub(
            lambda m, mark=mark: f"{mark}{{{unicodedata.normalize('NFKC', m[0])}}}", text
        )
    text = unicodedata.normalize("NFKC", _MIXED_NUMBER.sub(_fraction, text))
    return _ROOT.sub(_root, text).translate(_OPERATORS)


def _answer_text(text: str) -> str:
    """An answer as math-verify reads it best: line breaks as spaces (LaTeX reads them so;
    math-verify's ``$...$`` does not span lines, and a box holding a matrix written over several
    lines was read as one number in it), without a trailing full stop or comma, Unicode math
    as LaTeX."""
    text = _unicode_math_as_latex(" ".join(text.splitlines()).strip())
    return _TRAILING_PUNCTUATION.sub("", text.strip())


def _compare(prediction: str, reference: str) -> _Outcome:
    """math-verify without its own (signal-based, whole-second) timeouts; callers bound it."""
    mv = _math_verify()
    prediction = _join_digit_groups(_answer_text(prediction))
    reference = _join_digit_groups(_answer_text(reference))
    config = [mv.LatexExtractionConfig(), mv.ExprExtractionConfig()]
    # Answers arrive without math delimiters ("\frac{1}{2}", "42"); LaTeX extraction needs them.
    gold = mv.parse(f"${reference}$", config, parsing_timeout=None)
    if not gold:
        gold = mv.parse(reference, config, parsing_timeout=None)
    target = mv.parse(f"${prediction}$", config, parsing_timeout=None)
    parsed = any(not isinstance(t, str) for t in target)
    correct = bool(gold and target) and mv.verify(gold, target, timeout_seconds=None)
    return _Outcome(bool(correct), parsed or bool(correct), False)


def _raise_timeout(signum: int, frame: Any) -> None:
    raise _Timeout


def _can_use_signals() -> bool:
    return (
        hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
        # A handler installed from C cannot be restored afterwards; leave such a process alone.
        and signal.getsignal(signal.SIGALRM) is not None
    )


def _compare_with_timer(prediction: str, reference: str, timeout_s: float) -> _Outcome:
    """:func:`_compare` under a SIGALRM interval timer (main thread only).

    The timer repeats every 50 ms until cancelled, in case some library swallows one alarm with a
    bare ``except``. An alarm arriving just as the check ends is still caught (the outer ``try``).
    A timer that was already running is restored with the time it had left (at least a moment,
    so that one that should have fired meanwhile fires now).
    """
    _math_verify()
    previous_handler = signal.signal(signal.SIGALRM, _raise_timeout)
    previous_delay, previous_interval = signal.setitimer(signal.ITIMER_REAL, timeout_s, 0.05)
    started = time.monotonic()
    try:
        try:
            outcome = _compare(prediction, reference)
        except Exception:  # anything math-verify lets through: unparseable means wrong
            outcome = _Outcome(False, False, False)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _Timeout:
        outcome = _Outcome(False, False, True)
    finally:
        signal.signal(signal.SIGALRM, previous_handler)
        if previous_delay > 0:
            left = max(previous_delay - (time.monotonic() - started), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, left, previous_interval)
    return outcome


class _Helper:
    """A helper process answering checks over pipes, one JSON line each way."""

    def __init__(self) -> None:
        root = str(Path(__file__).resolve().parents[1])
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
        }
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from papo.rewards import _serve; _serve()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        self.buffer = b""
        if self._read_line(_STARTUP_TIMEOUT_S) != b"ready":
            self.kill()
            raise RuntimeError("the verification helper process did not start")

    def _read_line(self, timeout_s: float) -> bytes | None:
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout_s
        fd = self.process.stdout.fileno()
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:  # the process died
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line

    def check(self, prediction: str, reference: str, timeout_s: float) -> _Outcome | None:
        """The outcome, or None when the helper did not answer in time (it is then unusable)."""
        assert self.process.stdin is not None
        request = {"prediction": prediction, "reference": reference, "timeout_s": timeout_s}
        try:
            self.process.stdin.write(json.dumps(request).encode() + b"\n")
            self.process.stdin.flush()
        except OSError:
            return None
        line = self._read_line(timeout_s + _GRACE_S)
        if line is None:
            return None
        return _Outcome(*json.loads(line))

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()


_idle_helpers: list[_Helper] = []
_helpers_lock = threading.Lock()


def _compare_in_helper(prediction: str, reference: str, timeout_s: float) -> _Outcome | None:
    """The outcome from a helper process; None when no helper could be started."""
    with _helpers_lock:
        helper = _idle_helpers.pop() if _idle_helpers else None
    try:
        if helper is None:
            helper = _Helper()
    except Exception:
        return None
    try:
        outcome = helper.check(prediction, reference, timeout_s)
    except Exception:  # a broken pipe or a garbled line: the answer could not be checked
        helper.kill()
        return _Outcome(False, False, True)
    if outcome is None:  # stuck (or dead): kill it, a later check starts a fresh one
        helper.kill()
        return _Outcome(False, False, True)
    with _helpers_lock:
        _idle_helpers.append(helper)
    return outcome


@atexit.register
def _stop_helpers() -> None:
    with _helpers_lock:
        helpers, _idle_helpers[:] = list(_idle_helpers), []
    for helper in helpers:
        helper.kill()


def _cap_memory() -> None:
    """Limit this process's address space to what it uses now plus ``_HELPER_MEMORY`` (where
    Linux says how much that is; a lower limit already set stays)."""
    try:
        import resource

        with open("/proc/self/statm") as statm:
            in_use = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = in_use + _HELPER_MEMORY
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        if soft == resource.RLIM_INFINITY or limit < soft:
            resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ImportError, OSError, ValueError):  # not Linux, or no such limit here
        pass


def _serve() -> None:
    """The helper process's loop: one JSON request per stdin line, one outcome per stdout line."""
    # Keep the protocol channel private: anything a library prints goes to stderr instead.
    channel = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    _math_verify()  # before "ready", so that startup is not counted against a check
    _cap_memory()

    channel.write("ready\n")
    channel.flush()
    for line in sys.stdin:
        request = json.loads(line)
        outcome = _compare_with_timer(
            request["prediction"], request["reference"], request["timeout_s"]
        )
        channel.write(json.dumps(list(outcome)) + "\n")
        channel.flush()


def _check(prediction: str | None, reference: str, timeout_s: float) -> _Outcome:
    if prediction is None or not prediction.strip() or not reference.strip():
        return _Outcome(False, False, False)
    if timeout_s <= 0 or not math.isfinite(timeout_s):
        raise ValueError(f"timeout_s must be a positive number of seconds, not {timeout_s!r}")
    outcome = _compare_in_helper(prediction, reference, timeout_s)
    if outcome is not None:
        return outcome
    if _can_use_signals():  # no helper process: the timer is the best bound left
        return _compare_with_timer(prediction, reference, timeout_s)
    return _Outcome(False, False, True)


def verify(prediction: str | None, reference: str, *, timeout_s: float = 5.0) -> bool:
    """Whether ``prediction`` is mathematically equivalent to ``reference`` (math-verify: LaTeX,
    numbers, fractions, sets, intervals, equations, ...).

    Never raises on any input and never runs much past ``timeout_s`` seconds: None, empty or
    unparseable input, errors and checks that run out of time are all False. Safe from any thread
    (the check runs in a helper process; see the module docstring).
    """
    return _check(prediction, reference, timeout_s).correct


# --------------------------------------------------------------------------------------------------
# registry

_REWARDS: Registry[RewardFn] = Registry("reward", returns=Reward)
register = _REWARDS.register
get = _REWARDS.get
names = _REWARDS.names


def _answer_check(response: str, reference: str, timeout_s: float) -> tuple[str | None, _Outcome]:
    answer = extract_answer(response)
    return answer, _check(answer, reference, timeout_s)


@register("accuracy")
def accuracy(response: str, reference: str, *, timeout_s: float = 5.0) -> Reward:
    """+1 when the last boxed answer is equivalent to ``reference``, else -1."""
    answer, outcome = _answer_check(response, reference, timeout_s)
    score = 1.0 if outcome.correct else -1.0
    return Reward(score, outcome.correct, answer, None, outcome.parsed)


@register("npr_zero")
def npr_zero(
    response: str,
    reference: str,
    *,
    timeout_s: float = 5.0,
    format_floor: float | None = FORMAT_FLOOR,
) -> Reward:
    """NPR-Zero: the accuracy reward when the NPR format passes (``format_score == 0``), else the
    format penalty, floored at ``format_floor`` (None: the raw, unclipped score)."""
    from npr_graph.format import format_score

    fmt = format_score(response)
    answer, outcome = _answer_check(response, reference, timeout_s)
    if fmt == 0.0:
        score = 1.0 if outcome.correct else -1.0
    else:
        score = fmt if format_floor is None else max(fmt, format_floor)
    return Reward(score, outcome.correct, answer, fmt, outcome.parsed)


@register("format")
def format_reward(response: str, reference: str, *, timeout_s: float = 5.0) -> Reward:
    """The NPR format score alone (0 passes); correctness is still checked and reported."""
    from npr_graph.format import format_score

    fmt = format_score(response)
    answer, outcome = _answer_check(response, reference, timeout_s)
    return Reward(fmt, outcome.correct, answer, fmt, outcome.parsed)


# --------------------------------------------------------------------------------------------------
# length


def overlong_penalty(
    num_tokens: int, max_tokens: int, buffer_tokens: int, factor: float = 1.0
) -> float:
    """DAPO's soft overlong punishment, added to the reward.

    0 up to ``max_tokens - buffer_tokens`` tokens, then falling linearly to ``-factor`` at
    ``max_tokens``, and ``-factor`` beyond. With ``buffer_tokens == 0`` it is a step at
    ``max_tokens``.
    """
    if max_tokens <= 0 or not 0 <= buffer_tokens <= max_tokens:
        raise ValueError(
            f"need 0 <= buffer_tokens <= max_tokens and max_tokens > 0, "
            f"got buffer_tokens={buffer_tokens}, max_tokens={max_tokens}"
        )
    free = max_tokens - buffer_tokens
    if num_tokens <= free:
        return 0.0
    if num_tokens >= max_tokens:
        return -factor
    return -factor * (num_tokens - free) / buffer_tokens
