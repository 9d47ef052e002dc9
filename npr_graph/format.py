"""Format reward for NPR (Native Parallel Reasoner) traces.

A well-formed trace is a sequence of blocks, each a ``<guideline>`` holding one
``<plan>`` per parallel branch, then exactly as many ``<step>`` elements, then a
``<takeaway>``; the final answer goes in a non-empty ``\\boxed{...}``.
:func:`format_score` grades that layout with the penalties of the NPR release
(``compute_format_score`` in ``evals/utils/grader.py`` of
github.com/bigai-nlco/Native-Parallel-Reasoner, commit e148ad5), so scores stay
comparable. That is the variant the release actually calls; the older
``get_format_reward`` in ``npr-zero/.../math_dapo.py`` has its call commented out.

The reference finds blocks with nested lazy regular expressions that backtrack
exponentially on some inputs (e.g. many ``<step>`` pairs and no ``<takeaway>``);
here the same matches are found with linear scans, so any string, however long
or malformed, is scored in linear time and never raises.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from .parse import DIALECTS

TAGS = DIALECTS["npr"].tag_texts

_TAG = re.compile("|".join(map(re.escape, TAGS)))
_PLAN = re.compile(r"<plan>(.*?)</plan>", re.DOTALL)
_STEP = re.compile(r"<step>(.*?)</step>", re.DOTALL)
_BOXED = "\\boxed{"


class _Block(NamedTuple):
    start: int
    end: int
    guideline: str
    steps: str
    takeaway: str


def _has_tag(text: str) -> bool:
    return _TAG.search(text) is not None


def _blocks(text: str) -> list[_Block]:
    """Blocks exactly as the reference regex finds them, left to right.

    The reference pattern is ``<guideline>(.*?)</guideline>((?:<step>.*?</step>)+)
    <takeaway>(.*?)</takeaway>``. From a given position its first match runs from
    the next ``<guideline>`` to the first ``</guideline>`` directly followed by
    ``<step>``, then to the first ``</step>`` directly followed by ``<takeaway>``,
    then to the next ``</takeaway>``. If any of these is missing, no later match
    exists either, so the scan stops.
    """
    blocks: list[_Block] = []
    pos = 0
    while True:
        start = text.find("<guideline>", pos)
        if start < 0:
            break
        guide_start = start + len("<guideline>")
        guide_end = text.find("</guideline><step>", guide_start)
        if guide_end < 0:
            break
        steps_start = guide_end + len("</guideline>")
        steps_end = text.find("</step><takeaway>", steps_start + len("<step>"))
        if steps_end < 0:
            break
        steps_end += len("</step>")
        take_start = steps_end + len("<takeaway>")
        take_end = text.find("</takeaway>", take_start)
        if take_end < 0:
            break
        pos = take_end + len("</takeaway>")
        guideline, steps = text[guide_start:guide_end], text[steps_start:steps_end]
        blocks.append(_Block(start, pos, guideline, steps, text[take_start:take_end]))
    return blocks


def _pairs(text: str, pair: re.Pattern[str], close_tag: str) -> tuple[list[str], list[str]]:
    """Contents of the lazily matched pairs in ``text`` and the gaps around them.

    Same matches as ``pair.findall(text)``; ``gaps`` has one more entry than the
    contents (before, between and after the pairs). Searching only up to the last
    closing tag means every opening tag seen has a close ahead, so an unclosed tag
    cannot make the lazy scan rescan the rest of the text (quadratic time).
    """
    close = text.rfind(close_tag)
    region_end = close + len(close_tag) if close >= 0 else 0
    parts = pair.split(text[:region_end])
    gaps = parts[0::2]
    gaps[-1] += text[region_end:]
    return parts[1::2], gaps


def _adjacent(gaps: list[str], close_open: str) -> bool:
    # The reference rewrites each pair as close+open and then deletes every
    # close+open, so a trailing gap made only of repeated close+open (a dangling
    # "</plan><plan>") passes too. Kept so that scores match the reference.
    *inner, tail = gaps
    return not any(inner) and tail == close_open * (len(tail) // len(close_open))


def _has_empty_boxed(text: str) -> bool:
    # Mirrors the reference's non-overlapping lazy "\boxed{(.*?)}" scan rather
    # than a substring test: in "\boxed{\boxed{}" the outer box swallows the
    # inner one, and the reference does not penalise it.
    pos = 0
    while True:
        start = text.find(_BOXED, pos)
        if start < 0:
            return False
        end = text.find("}", start + len(_BOXED))
        if end < 0:
            return False
        if end == start + len(_BOXED):
            return True
        pos = end + 1


def format_score(text: str) -> float:
    """Score the guideline/plan/step/takeaway layout of ``text``; 0.0 means it passes.

    All whitespace is removed first, so lengths count visible characters only.
    Early returns: no block at all -1.5; a tag in the text before or between
    blocks -1.5; a guideline without plans -1.0; a step count different from the
    plan count -1.0; a tag in the text after the last block -1.0. Otherwise the
    penalties add up: per block, guideline holding more than its plans -0.4,
    plans not adjacent -0.2, steps not adjacent -0.2, each plan shorter than 3 or
    holding a tag -0.4, each step shorter than 6 or holding a tag -0.4, takeaway
    shorter than 6 -0.4; and -1.0 once if any ``\\boxed{}`` is empty.

    The total is deliberately *not* clipped to [-2, 0]: the reference does not
    clip, and the NPR evaluation averages these raw values, so clipping would
    make our numbers incomparable with published ones. The "(0, -2]" range is
    therefore not guaranteed; accumulated penalties can go lower (e.g. -2.8).
    """
    if not isinstance(text, str):
        raise TypeError(f"format_score takes the response text, got {type(text).__name__}")
    # str.split() drops exactly the characters the reference's regex \s removes.
    text = "".join(text.split())
    blocks = _blocks(text)
    if not blocks:
        return -1.5

    # Penalties are subtracted in the reference's order so that the float sums
    # are bit-identical to it (-0.4 - 0.2 is not exactly -0.6).
    score = 0.0
    pos = 0
    for block in blocks:
        if _has_tag(text[pos : block.start]):
            return -1.5
        pos = block.end

        plans, plan_gaps = _pairs(block.guideline, _PLAN, "</plan>")
        if not plans:
            return -1.0
        # Plans can only fail to be adjacent if something lies around them.
        if any(plan_gaps):
            score -= 0.4
            if not _adjacent(plan_gaps, "</plan><plan>"):
                score -= 0.2

        steps, step_gaps = _pairs(block.steps, _STEP, "</step>")
        if len(steps) != len(plans):
            return -1.0
        if any(step_gaps) and not _adjacent(step_gaps, "</step><step>"):
            score -= 0.2

        for plan in plans:
            if len(plan) < 3 or _TAG.search(plan):
                score -= 0.4
        for step in steps:
            if len(step) < 6 or _TAG.search(step):
                score -= 0.4
        if len(block.takeaway) < 6:
            score -= 0.4

    if _has_tag(text[pos:]):
        return -1.0
    if _has_empty_boxed(text):
        score -= 1.0
    return score
