"""Where a lane stands in the format (NPR or Multiverse), and what it lets the lane write next.

A :class:`Format` knows a dialect's tag strings and, when tags are special tokens, their ids.
Each lane carries a :class:`LaneState`; after every token the engine reports the tags the token
completed and the state answers with an :class:`Action`: keep going, write some text first
(engine-written tokens), fork, end the branch, or finish. In ``constrained`` mode
:meth:`LaneState.choices` also narrows what may be sampled, so every output is a valid DAG.

Multiverse blocks nest: a ``<Path>`` may open a ``<Parallel>`` block, whose branches fork from
the path's lane; its join lane closes ``</Parallel>`` and then goes on with the enclosing path
(:attr:`LaneState.outer` holds what the path was doing before it nested).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property

from ..parse import DIALECTS, dialect

NPR_TAGS = DIALECTS["npr"].tag_names
TAG_PATTERN = re.compile(r"</?(?:" + "|".join(NPR_TAGS) + r")>")
LONGEST_TAG = max(len(f"</{t}>") for t in NPR_TAGS)

MODES = ("free", "constrained", "sequential")


class Phase(str, Enum):
    TEXT = "text"  # outside blocks: preamble, between blocks, the answer
    WRAPPER = "wrapper"  # inside <Parallel>, before its <Goal> (Multiverse)
    GUIDELINE = "guideline"  # inside the header (<guideline>, <Goal>), between plans
    PLAN = "plan"
    STEP = "step"  # inside a branch (<step>, <Path>)
    TAKEAWAY = "takeaway"  # inside the join (<takeaway>, <Conclusion>)
    WRAPPER_END = "wrapper_end"  # after </Conclusion>, before </Parallel> (Multiverse)
    SEQUENTIAL_BLOCK = "sequential"  # an invalid fork: plain text to the block's end
    FORKED = "forked"  # a new branch lane, before its branch tag
    JOINING = "joining"  # a new join lane, before its join tag
    CLOSED = "closed"  # a lane that forked, or a branch that closed its step


class Kind(str, Enum):
    CONTINUE = "continue"
    FORK = "fork"
    BRANCH_DONE = "branch_done"


@dataclass
class Action:
    kind: Kind = Kind.CONTINUE
    width: int = 0
    violation: str | None = None


@dataclass(frozen=True)
class Tags:
    """A dialect's tags by role, as written: ``header`` is ``<guideline>`` or ``<Goal>``, and
    ``end(header)`` its closing tag."""

    grammar: str
    header: str
    item: str
    branch: str
    join: str
    wrapper: str | None
    nesting: bool
    names: tuple[str, ...]

    @classmethod
    def of(cls, grammar: str = "npr") -> Tags:
        spec = dialect(grammar)
        names = spec.tag_names
        by_role = dict(zip(spec.tags, names, strict=True))

        def tag(role: str | None) -> str | None:
            return None if role is None else f"<{by_role[role]}>"

        return cls(
            grammar,
            tag(spec.header),
            tag(spec.item),
            tag(spec.branch),
            tag(spec.join),
            tag(spec.wrapper),
            spec.nesting,
            names,
        )

    @staticmethod
    def end(tag: str) -> str:
        return "</" + tag[1:]

    @property
    def opener(self) -> str:
        """The tag that opens a block: the wrapper when the dialect has one, else the header."""
        return self.wrapper or self.header

    @cached_property
    def texts(self) -> list[str]:
        return [text for name in self.names for text in (f"<{name}>", f"</{name}>")]

    @cached_property
    def pattern(self) -> re.Pattern[str]:
        return re.compile(r"</?(?:" + "|".join(self.names) + r")>")

    @cached_property
    def element_closers(self) -> dict[Phase, str]:
        """The elements with a length limit, and the tags that close them."""
        return {
            Phase.PLAN: self.end(self.item),
            Phase.STEP: self.end(self.branch),
            Phase.TAKEAWAY: self.end(self.join),
        }


NPR = Tags.of("npr")


class Format:
    """Tag texts and ids of a tokenizer for one dialect; ``special`` when every tag is a single
    token."""

    def __init__(self, tokenizer, special: bool, grammar: str = "npr"):
        self.tokenizer = tokenizer
        self.special = special
        self.tags = Tags.of(grammar)
        self.pattern = self.tags.pattern
        self.longest_tag = max(len(text) for text in self.tags.texts)
        self.tag_ids: dict[str, int] = {}
        if special:
            for text in self.tags.texts:
                ids = tokenizer.encode(text, add_special_tokens=False)
                if len(ids) != 1:
                    raise ValueError(
                        f"tags='special' needs {text} as one token; load the model with "
                        f"tags='special' and grammar={grammar!r}"
                    )
                self.tag_ids[text] = ids[0]
        self._encoded: dict[str, list[int]] = {}
        self._closers: list[tuple[int, str]] | None = None
        self._self_contained: list[int] = []
        self._others: dict[tuple[str, ...], list[int]] = {}

    def encode(self, text: str) -> list[int]:
        """Token ids of engine-written text (tags as single tokens when special)."""
        if text not in self._encoded:
            ids: list[int] = []
            cursor = 0
            for match in self.pattern.finditer(text) if self.special else ():
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

    def others_banned(self, *keep: str | None) -> list[int]:
        """Every tag id except those of ``keep`` (a new list: callers extend it)."""
        if keep not in self._others:
            self._others[keep] = [i for t, i in self.tag_ids.items() if t not in keep]
        return list(self._others[keep])

    def completed_tags(self, tail: str, piece: str) -> list[str]:
        """Tags of this dialect that end inside ``piece``, the newest text of ``tail``."""
        return completed_tags(tail, piece, self.pattern)

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
                i for i, p in self._closers if "<" in p and self.completed_tags(p, p)
            ]
        tail = tail[-self.longest_tag :]
        if "<" not in tail:  # only a token holding its own "<" can complete a tag
            return list(self._self_contained)
        return [i for i, piece in self._closers if self.completed_tags(tail + piece, piece)]


def completed_tags(tail: str, piece: str, pattern: re.Pattern[str] = TAG_PATTERN) -> list[str]:
    """Tags (of ``pattern``'s dialect, NPR by default) that end inside ``piece``, the newest
    text of ``tail`` (which ends with it)."""
    if ">" not in piece:  # a tag ends with its ">"
        return []
    start = len(tail) - len(piece)
    return [m.group() for m in pattern.finditer(tail) if m.end() > start]


@dataclass(frozen=True)
class Frame:
    """An enclosing branch a nested block returns to: its label and its length so far."""

    number: str
    element_tokens: int


@dataclass
class LaneState:
    """The format state of one lane; ``mode`` is ``free`` or ``constrained``.

    ``number`` is the label of the branch the lane is in (``"2"``, nested ``"2.1"``); ``outer``
    the branches, outermost first, that the lane's block is nested in; ``nested`` counts the
    block openers met inside a block decoded sequentially (an invalid fork).
    """

    mode: str
    phase: Phase = Phase.TEXT
    plans: int = 0
    blocks: int = 0
    element_tokens: int = 0
    # the element's tokens on the current lane: a path resumed after a nested block counts from
    # there (the lane before it holds the nested block's join)
    stretch_tokens: int = 0
    branch: int | None = None
    closing: bool = False  # closing open elements (the model stopped early, or the budget ran out)
    violations: list[str] = field(default_factory=list)
    tags: Tags = NPR
    number: str = ""
    outer: tuple[Frame, ...] = ()
    nested: int = 0

    @property
    def depth(self) -> int:
        """How many blocks enclose the lane's current element (0 at the top level)."""
        inside = self.phase not in (Phase.TEXT, Phase.SEQUENTIAL_BLOCK)
        return len(self.outer) + (1 if inside else 0)

    @property
    def _label(self) -> str:
        return f"{self.number}." if self.number else ""

    def ends_response_on_eos(self) -> bool:
        """Whether an end of sequence here ends the response (elsewhere the engine closes what
        is open and carries on)."""
        return not self.outer and self.phase in (Phase.TEXT, Phase.SEQUENTIAL_BLOCK)

    # -- what comes next ------------------------------------------------------------------------
    def opening(self) -> str:
        """Engine-written text at the start of a response (constrained mode opens a block)."""
        return self.tags.opener if self.mode == "constrained" else ""

    def fork_branch(self, index: int) -> tuple[LaneState, str]:
        """The state of branch ``index`` forked from this lane, and its engine-written header."""
        number = f"{self._label}{index + 1}"
        state = LaneState(
            self.mode,
            Phase.FORKED,
            blocks=self.blocks,
            branch=index,
            tags=self.tags,
            number=number,
            outer=self.outer,
        )
        return state, f"{self.tags.branch}\n{number}:"

    def join_lane(self, blocks: int | None = None) -> tuple[LaneState, str]:
        """The state of the lane joining this lane's siblings (``blocks``: the most any of
        them opened), and its engine-written opener."""
        state = LaneState(
            self.mode,
            Phase.JOINING,
            blocks=self.blocks if blocks is None else blocks,
            tags=self.tags,
            outer=self.outer,
        )
        return state, f"{self.tags.join}\n"

    def _may_open(self, params) -> bool:
        """Whether a block may open here: at the top level within ``max_blocks``, inside a
        branch of a nesting dialect within ``max_depth`` too."""
        if self.blocks >= params.max_blocks:
            return False
        if self.phase is Phase.TEXT and not self.outer:
            return True
        return self.phase is Phase.STEP and self.tags.nesting and self.depth < params.max_depth

    def choices(self, fmt: Format, params) -> tuple[list[int] | None, list[int] | None]:
        """``(allowed, banned)`` token ids for the next sample; both None when unconstrained."""
        if self.mode != "constrained":
            return None, None
        tags = self.tags
        if self.phase is Phase.GUIDELINE:
            allowed = []
            if self.plans < params.max_branches:
                allowed.append(fmt.tag_ids[tags.item])
            if self.plans >= params.min_branches:
                allowed.append(fmt.tag_ids[tags.end(tags.header)])
            return allowed, None
        if self.phase is Phase.WRAPPER:
            return [fmt.tag_ids[tags.header]], None
        if self.phase is Phase.WRAPPER_END:
            return [fmt.tag_ids[tags.end(tags.wrapper)]], None
        opener = tags.opener if self._may_open(params) else None
        closing = tags.element_closers.get(self.phase)
        if closing is not None:
            return None, fmt.others_banned(closing, opener)
        return None, fmt.others_banned(opener)

    def element_limit(self, params) -> str | None:
        """Closing text to force when the current element reached its length limit."""
        closing = self.tags.element_closers.get(self.phase)
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
        tags = self.tags
        if self.phase in (Phase.WRAPPER, Phase.WRAPPER_END) or (
            self.phase is Phase.SEQUENTIAL_BLOCK and self.outer
        ):
            return tags.end(tags.wrapper)
        role = {
            Phase.PLAN: tags.item,
            Phase.GUIDELINE: tags.header,
            Phase.STEP: tags.branch,
            Phase.TAKEAWAY: tags.join,
        }.get(self.phase)
        return None if role is None else tags.end(role)

    # -- what just happened ---------------------------------------------------------------------
    def observe(self, tags: list[str], params) -> tuple[Action, str]:
        """Advance over the tags a token completed; return the action and text to force."""
        self.element_tokens += 1
        self.stretch_tokens += 1
        action, forced = Action(), ""
        for tag in tags:
            action, forced = self._transition(tag, params)
        return action, forced

    def close_unforked(self) -> None:
        """A nested block whose header closed after a budget cut: close it without forking,
        then the path around it."""
        self.phase, self.closing = Phase.WRAPPER_END, True

    def _open_block(self, params) -> str:
        """A block opener was written here: nest (a branch keeps its place in ``outer``)."""
        if self.phase is Phase.STEP:
            self.outer = (*self.outer, Frame(self.number, self.element_tokens))
        self.blocks += 1
        self.plans = 0
        if self.tags.wrapper is not None:
            self.phase = Phase.WRAPPER
            return f"\n{self.tags.header}" if self.mode == "constrained" else ""
        self.phase = Phase.GUIDELINE
        # the forced item tag then gets its "1:" from the item transition
        return f"\n{self.tags.item}" if self.mode == "constrained" else ""

    def _close_block(self) -> str:
        """The block ended: back to the enclosing branch, or to the top level."""
        if self.outer:
            frame, self.outer = self.outer[-1], self.outer[:-1]
            self.phase, self.number = Phase.STEP, frame.number
            self.element_tokens, self.stretch_tokens = frame.element_tokens, 0
        else:
            self.phase = Phase.TEXT
        return "\n" if self.mode == "constrained" else ""

    def _transition(self, tag: str, params) -> tuple[Action, str]:
        phase, tags = self.phase, self.tags
        constrained = self.mode == "constrained"
        last_tag = tags.end(tags.wrapper or tags.join)  # what ends a block
        if phase is Phase.SEQUENTIAL_BLOCK:
            if tag == tags.opener and tags.nesting:
                self.nested += 1
            elif tag == last_tag and self.nested:
                self.nested -= 1
            elif tag == last_tag:
                self._close_block()
            return Action(), ""
        if tag == tags.branch and phase is Phase.FORKED:
            self.phase, self.element_tokens, self.stretch_tokens = Phase.STEP, 0, 0
            return Action(), ""
        if tag == tags.join and phase is Phase.JOINING:
            self.phase, self.element_tokens = Phase.TAKEAWAY, 0
            return Action(), ""
        if tag == tags.opener and (phase is Phase.TEXT or (phase is Phase.STEP and tags.nesting)):
            # free mode, like a block at the top level past max_blocks: only depth is refused
            if phase is Phase.STEP and self.depth >= params.max_depth:
                self.outer = (*self.outer, Frame(self.number, self.element_tokens))
                self.phase, self.nested = Phase.SEQUENTIAL_BLOCK, 0
                reason = f"{tag} deeper than max_depth={params.max_depth}; decoded sequentially"
                self.violations.append(reason)
                return Action(violation=reason), ""
            return Action(), self._open_block(params)
        if tag == tags.header and phase is Phase.WRAPPER:
            self.phase = Phase.GUIDELINE
            return Action(), f"\n{tags.item}" if constrained else ""
        if tag == tags.item and phase is Phase.GUIDELINE:
            self.phase, self.element_tokens = Phase.PLAN, 0
            return Action(), f"{self._label}{self.plans + 1}:" if constrained else ""
        if tag == tags.end(tags.item) and phase is Phase.PLAN:
            self.phase, self.plans = Phase.GUIDELINE, self.plans + 1
            if not constrained:
                return Action(), ""
            # Where the bounds leave one choice, the engine writes it: a token the policy did not
            # choose is not trained on (forced), and it costs no decode step.
            if self.plans < params.min_branches and not self.closing:  # a cut block opens none
                return Action(), f"\n{tags.item}"
            if self.plans >= params.max_branches:
                return Action(), f"\n{tags.end(tags.header)}"
            return Action(), "\n"
        if tag == tags.end(tags.header) and phase is Phase.GUIDELINE:
            if 1 <= self.plans <= params.max_branches:
                self.phase = Phase.CLOSED
                return Action(Kind.FORK, width=self.plans), "\n"
            self.phase, self.nested = Phase.SEQUENTIAL_BLOCK, 0
            reason = f"invalid fork: {self.plans} plans (allowed 1..{params.max_branches}); decoded sequentially"
            self.violations.append(reason)
            return Action(violation=reason), ""
        if tag == tags.end(tags.branch) and phase is Phase.STEP:
            self.phase = Phase.CLOSED
            return Action(Kind.BRANCH_DONE), "\n"
        if tag == tags.end(tags.join) and phase is Phase.TAKEAWAY:
            if tags.wrapper is not None:
                self.phase = Phase.WRAPPER_END
                return Action(), f"\n{tags.end(tags.wrapper)}" if constrained else ""
            return Action(), self._close_block()
        if tags.wrapper is not None and tag == tags.end(tags.wrapper):
            if phase is Phase.WRAPPER_END:
                return Action(), self._close_block()
            if phase is Phase.WRAPPER:  # a block closed before its header: nothing to fork
                reason = f"{tag} before {tags.header}"
                self.violations.append(reason)
                self._close_block()
                return Action(violation=reason), ""
        self.violations.append(f"{tag} in {phase.value}")
        return Action(violation=f"unexpected {tag} in {phase.value}"), ""
