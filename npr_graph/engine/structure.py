"""Where a lane stands in the NPR format, and what the format lets it write next.

A :class:`Format` knows the tag strings and, when tags are special tokens, their ids. Each lane
carries a :class:`LaneState`; after every token the engine reports the tags the token completed
and the state answers with an :class:`Action`: keep going, write some text first (engine-written
tokens), fork, end the branch, or finish. In ``constrained`` mode :meth:`LaneState.choices`
also narrows what may be sampled, so every output is a valid DAG.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum

from ..parse import DIALECTS

NPR_TAGS = DIALECTS["npr"].tag_names
TAG_PATTERN = re.compile(r"</?(?:" + "|".join(NPR_TAGS) + r")>")
LONGEST_TAG = max(len(f"</{t}>") for t in NPR_TAGS)

MODES = ("free", "constrained", "sequential")


class Phase(str, Enum):
    TEXT = "text"  # outside blocks: preamble, between blocks, the answer
    GUIDELINE = "guideline"  # inside <guideline>, between plans
    PLAN = "plan"
    STEP = "step"
    TAKEAWAY = "takeaway"
    SEQUENTIAL_BLOCK = "sequential"  # an invalid fork: plain text until </takeaway>
    FORKED = "forked"  # a new branch lane, before its <step>
    JOINING = "joining"  # a new join lane, before its <takeaway>
    CLOSED = "closed"  # a lane that forked, or a branch that closed its step


# The elements with a length limit, and the tags that close them.
ELEMENT_CLOSERS = {Phase.PLAN: "</plan>", Phase.STEP: "</step>", Phase.TAKEAWAY: "</takeaway>"}


class Kind(str, Enum):
    CONTINUE = "continue"
    FORK = "fork"
    BRANCH_DONE = "branch_done"


@dataclass
class Action:
    kind: Kind = Kind.CONTINUE
    width: int = 0
    violation: str | None = None


class Format:
    """Tag texts and ids of a tokenizer; ``special`` when every tag is a single token."""

    def __init__(self, tokenizer, special: bool):
        self.tokenizer = tokenizer
        self.special = special
        self.tag_ids: dict[str, int] = {}
        if special:
            for name in NPR_TAGS:
                for text in (f"<{name}>", f"</{name}>"):
                    ids = tokenizer.encode(text, add_special_tokens=False)
                    if len(ids) != 1:
                        raise ValueError(
                            f"tags='special' needs {text} as one token; load the model with tags='special'"
                        )
                    self.tag_ids[text] = ids[0]
        self._encoded: dict[str, list[int]] = {}
        self._closers: list[tuple[int, str]] | None = None
        self._self_contained: list[int] = []
        self._others: dict[str | None, list[int]] = {}

    def encode(self, text: str) -> list[int]:
        """Token ids of engine-written text (tags as single tokens when special)."""
        if text not in self._encoded:
            ids: list[int] = []
            cursor = 0
            for match in TAG_PATTERN.finditer(text) if self.special else ():
                ids += (
                    self.tokenizer.encode(text[cursor : match.start()], add_special_tokens=False)
                    if match.start() > cursor
                    else []
                )
                ids.append(self.tag_ids[match.group()])
                cursor = match.end()
            if cursor < len(text):
                ids += self.tokenizer.encode(text[cursor:], add_special_tokens=False)
            self._encoded[text] = ids
        return self._encoded[text]

    def others_banned(self, keep: str | None) -> list[int]:
        """Every tag id except ``keep``'s (a new list: callers extend it)."""
        if keep not in self._others:
            self._others[keep] = [i for t, i in self.tag_ids.items() if t != keep]
        return list(self._others[keep])

    def spelled_tags(self, tail: str) -> list[int]:
        """Ids of ordinary tokens that would complete a tag spelled out in text after ``tail``
        (the parser cannot tell a spelled ``<step>`` from the special token)."""
        if self._closers is None:
            from ..parse import decode_pieces

            ids = list(range(len(self.tokenizer)))
            pieces = decode_pieces(self.tokenizer, ids) if ids else []
            self._closers = [
                (i, p)
                for i, p in zip(ids, pieces, strict=True)
                if ">" in p and i not in self.tag_ids.values()
            ]
            # A tag that starts inside a token's piece does not depend on the text before it.
            self._self_contained = [
                i for i, p in self._closers if "<" in p and completed_tags(p, p)
            ]
        tail = tail[-LONGEST_TAG:]
        if "<" not in tail:  # only a token holding its own "<" can complete a tag
            return list(self._self_contained)
        return [i for i, piece in self._closers if completed_tags(tail + piece, piece)]


def completed_tags(tail: str, piece: str) -> list[str]:
    """Tags that end inside ``piece``, the newest text of ``tail`` (which ends with it)."""
    if ">" not in piece:  # a tag ends with its ">"
        return []
    start = len(tail) - len(piece)
    return [m.group() for m in TAG_PATTERN.finditer(tail) if m.end() > start]


@dataclass
class LaneState:
    """The format state of one lane; ``mode`` is ``free`` or ``constrained``."""

    mode: str
    phase: Phase = Phase.TEXT
    plans: int = 0
    blocks: int = 0
    element_tokens: int = 0
    branch: int | None = None
    closing: bool = False  # closing open elements (the model stopped early, or the budget ran out)
    violations: list[str] = field(default_factory=list)

    # -- what comes next ------------------------------------------------------------------------
    def opening(self) -> str:
        """Engine-written text at the start of a response (constrained mode opens a block)."""
        return "<guideline>" if self.mode == "constrained" else ""

    def fork_branch(self, index: int) -> tuple[LaneState, str]:
        """The state of branch ``index`` forked from this lane, and its engine-written header."""
        state = LaneState(self.mode, Phase.FORKED, blocks=self.blocks, branch=index)
        return state, f"<step>\n{index + 1}:"

    def join_lane(self) -> tuple[LaneState, str]:
        """The state of the lane joining this lane's siblings, and its engine-written opener."""
        return LaneState(self.mode, Phase.JOINING, blocks=self.blocks), "<takeaway>\n"

    def choices(self, fmt: Format, params) -> tuple[list[int] | None, list[int] | None]:
        """``(allowed, banned)`` token ids for the next sample; both None when unconstrained."""
        if self.mode != "constrained":
            return None, None
        if self.phase is Phase.GUIDELINE:
            allowed = []
            if self.plans < params.max_branches:
                allowed.append(fmt.tag_ids["<plan>"])
            if self.plans >= params.min_branches:
                allowed.append(fmt.tag_ids["</guideline>"])
            return allowed, None
        closing = ELEMENT_CLOSERS.get(self.phase)
        if closing is not None:
            return None, fmt.others_banned(closing)
        keep = "<guideline>" if self.blocks < params.max_blocks else None
        return None, fmt.others_banned(keep)

    def element_limit(self, params) -> str | None:
        """Closing text to force when the current element reached its length limit."""
        closing = ELEMENT_CLOSERS.get(self.phase)
        if self.mode != "constrained" or closing is None:
            return None
        limit = {
            Phase.PLAN: params.max_plan_tokens,
            Phase.STEP: params.max_step_tokens,
            Phase.TAKEAWAY: params.max_takeaway_tokens,
        }[self.phase]
        return closing if self.element_tokens >= limit else None

    def closing_tag(self) -> str | None:
        """The tag that closes the innermost open element, None when nothing is open."""
        return {
            Phase.PLAN: "</plan>",
            Phase.GUIDELINE: "</guideline>",
            Phase.STEP: "</step>",
            Phase.TAKEAWAY: "</takeaway>",
        }.get(self.phase)

    # -- what just happened ---------------------------------------------------------------------
    def observe(self, tags: list[str], params) -> tuple[Action, str]:
        """Advance over the tags a token completed; return the action and text to force."""
        self.element_tokens += 1
        action, forced = Action(), ""
        for tag in tags:
            action, forced = self._transition(tag, params)
        return action, forced

    def _transition(self, tag: str, params) -> tuple[Action, str]:
        phase = self.phase
        constrained = self.mode == "constrained"
        if phase is Phase.SEQUENTIAL_BLOCK:
            if tag == "</takeaway>":
                self.phase = Phase.TEXT
            return Action(), ""
        if tag == "<step>" and phase is Phase.FORKED:
            self.phase, self.element_tokens = Phase.STEP, 0
            return Action(), ""
        if tag == "<takeaway>" and phase is Phase.JOINING:
            self.phase, self.element_tokens = Phase.TAKEAWAY, 0
            return Action(), ""
        if tag == "<guideline>" and phase is Phase.TEXT:
            self.phase, self.plans = Phase.GUIDELINE, 0
            self.blocks += 1
            # the forced <plan> then gets its "1:" from the <plan> transition below
            return Action(), "\n<plan>" if constrained else ""
        if tag == "<plan>" and phase is Phase.GUIDELINE:
            self.phase, self.element_tokens = Phase.PLAN, 0
            return Action(), f"{self.plans + 1}:" if constrained else ""
        if tag == "</plan>" and phase is Phase.PLAN:
            self.phase, self.plans = Phase.GUIDELINE, self.plans + 1
            return Action(), "\n" if constrained else ""
        if tag == "</guideline>" and phase is Phase.GUIDELINE:
            if 1 <= self.plans <= params.max_branches:
                self.phase = Phase.CLOSED
                return Action(Kind.FORK, width=self.plans), "\n"
            self.phase = Phase.SEQUENTIAL_BLOCK
            reason = f"invalid fork: {self.plans} plans (allowed 1..{params.max_branches}); decoded sequentially"
            self.violations.append(reason)
            return Action(violation=reason), ""
        if tag == "</step>" and phase is Phase.STEP:
            self.phase = Phase.CLOSED
            return Action(Kind.BRANCH_DONE), "\n"
        if tag == "</takeaway>" and phase is Phase.TAKEAWAY:
            self.phase = Phase.TEXT
            return Action(), "\n" if constrained else ""
        self.violations.append(f"{tag} in {phase.value}")
        return Action(violation=f"unexpected {tag} in {phase.value}"), ""
