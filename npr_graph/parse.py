"""Parsing traces into a :class:`ReasoningGraph`.

Two front ends produce the same intermediate, a tree of :class:`Element` (a tag pair and its
nested elements): the strict front end is the LALR grammar in ``grammar/<name>.lark`` turned into
elements by a lark ``Transformer``; the lenient front end lexes with the same grammar's terminals
and recovers structure with a small stack machine, recording what it had to repair as
violations. One builder then turns elements into nodes and blocks, so both modes agree on every
trace the strict grammar accepts.
"""

from __future__ import annotations

import re
import sys
from bisect import bisect_left
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any, Protocol

from lark import Token, Transformer_NonRecursive
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

import grammar as grammars

from .graph import Block, Node, NodeKind, ReasoningGraph, Violation

MAX_DEPTH = 32
"""Block nesting levels the parser follows by default. A block nested deeper is an error (strict)
or, lenient, one ``too_deep`` violation and content of the branch holding it, tags and all.
``parse(max_depth=...)`` accepts up to ``DEPTH_LIMIT``."""
DEPTH_LIMIT = 1024

LABEL = re.compile(r"\s*(\d+(?:\.\d+)*)\s*[:.)]")
"""A plan's or step's number after its open tag (``1:``, ``1.2.3.``). It matches only whitespace,
digits and ``.:)``, so it never reads past the next tag: reading every element's label stays
linear in the text, however long the label (one component per nesting level) or the whitespace
before it."""


class ParseError(ValueError):
    """No structure could be recovered: where it failed (1-based line/column) and what fits there."""

    def __init__(self, message: str, *, line: int, column: int, pos: int, expected: Sequence[str]):
        self.line = line
        self.column = column
        self.pos = pos
        self.expected = sorted(expected)
        where = f"line {line}, column {column}"
        wanted = f"; expected one of: {', '.join(self.expected)}" if self.expected else ""
        super().__init__(f"{message} at {where}{wanted}")


class Tokenizer(Protocol):
    def decode(self, ids: Sequence[int], **kwargs: Any) -> str: ...

    def encode(self, text: str, **kwargs: Any) -> list[int]: ...


@dataclass(frozen=True)
class Dialect:
    """The roles a format's tags play: a block is ``wrapper? header(item*) branch+ join``."""

    name: str
    header: str
    item: str
    branch: str
    join: str
    wrapper: str | None = None
    nesting: bool = False

    @property
    def tags(self) -> tuple[str, ...]:
        """Element kinds, outermost role first."""
        roles = (self.wrapper, self.header, self.item, self.branch, self.join)
        return tuple(tag for tag in roles if tag)

    @property
    def tag_names(self) -> tuple[str, ...]:
        """The tag names as written in traces (Multiverse capitalises them)."""
        return tuple(tag.capitalize() if self.name == "multiverse" else tag for tag in self.tags)

    @property
    def tag_texts(self) -> tuple[str, ...]:
        """Every tag as text, each opening tag followed by its closing tag."""
        return tuple(text for name in self.tag_names for text in (f"<{name}>", f"</{name}>"))


DIALECTS = {
    "npr": Dialect("npr", header="guideline", item="plan", branch="step", join="takeaway"),
    "multiverse": Dialect(
        "multiverse",
        header="goal",
        item="outline",
        branch="path",
        join="conclusion",
        wrapper="parallel",
        nesting=True,
    ),
}


def dialect(name: str) -> Dialect:
    try:
        return DIALECTS[name]
    except KeyError:
        raise ValueError(f"unknown grammar {name!r}; choose one of {', '.join(DIALECTS)}") from None


@dataclass
class Element:
    """A tag pair: ``start:open_end`` is the open tag, ``close_start:end`` the close tag.

    ``close_start`` is None when the lenient parser closed the element implicitly at ``end``.
    """

    tag: str
    start: int
    open_end: int
    close_start: int | None
    end: int
    children: list[Element] = field(default_factory=list)


# -- strict front end ---------------------------------------------------------------------------
class _ToElements(Transformer_NonRecursive):
    def __default__(self, data, children, meta):
        opener, closer = children[0], children[-1]
        elements = [c for c in children if isinstance(c, Element)]
        return Element(
            str(data), opener.start_pos, opener.end_pos, closer.start_pos, closer.end_pos, elements
        )

    def start(self, children):
        return [c for c in children if isinstance(c, Element)]


def _strict_elements(text: str, name: str) -> list[Element]:
    parser = grammars.load(name)
    try:
        tree = parser.parse(text)
    except UnexpectedInput as error:
        raise _parse_error(error, text, name) from None
    return _ToElements().transform(tree)


def _parse_error(error: UnexpectedInput, text: str, name: str) -> ParseError:
    parser = grammars.load(name)

    def readable(terminal: str) -> str:
        if terminal == "TEXT":
            return "text"
        try:
            return str(parser.get_terminal(terminal).pattern.value)
        except KeyError:
            return terminal

    if isinstance(error, UnexpectedEOF):
        pos = len(text)
        expected = error.expected
        message = "unexpected end of input"
    elif isinstance(error, UnexpectedToken):
        pos = len(text) if error.token.type == "$END" else error.token.start_pos or 0
        expected = error.expected
        found = (
            "end of input"
            if error.token.type == "$END"
            else f"{readable(error.token.type)} {str(error.token)[:40]!r}"
        )
        message = f"unexpected {found}"
    elif isinstance(error, UnexpectedCharacters):
        pos = error.pos_in_stream
        expected = error.allowed or ()
        message = f"unexpected character {text[pos : pos + 1]!r}"
    else:  # pragma: no cover - lark raises only the three above
        pos, expected, message = 0, (), str(error)
    line = text.count("\n", 0, pos) + 1
    column = pos - (text.rfind("\n", 0, pos) + 1) + 1
    return ParseError(
        message, line=line, column=column, pos=pos, expected=[readable(t) for t in expected]
    )


# -- lenient front end --------------------------------------------------------------------------
@dataclass
class _Burial:
    """A block nested too deep, read as content of the element holding it: the tags open in it
    (a stack, and a count per tag), and what it may still close.

    ``header_led``: it starts at its header, not a wrapper, so the branches and join after the
    header are still part of it. ``enclosing``: the tags of the elements open around it; a
    closing tag of one of those that nothing in the block matches ends the block.
    """

    header_led: bool
    enclosing: frozenset[str]
    open: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def push(self, tag: str) -> None:
        self.open.append(tag)
        self.counts[tag] = self.counts.get(tag, 0) + 1

    def pop(self, tag: str) -> None:
        """Close the innermost open ``tag`` and whatever is open inside it."""
        while True:
            top = self.open.pop()
            self.counts[top] -= 1
            if top == tag:
                return


class _Recovery:
    """Rebuilds elements from a tag stream the way a reader would, noting every repair."""

    def __init__(
        self, text: str, spec: Dialect, max_depth: int, branch_ends: Sequence[tuple[int, int]] = ()
    ):
        self.text = text
        self.spec = spec
        self.max_depth = max_depth
        self.branch_ends = sorted(branch_ends)
        self.violations: list[Violation] = []
        self.root = Element("", 0, 0, None, len(text))
        self.stack: list[Element] = [self.root]
        self.burial: _Burial | None = None

    def run(self) -> list[Element]:
        tags = [t for t in grammars.lexer(self.spec.name).lex(self.text) if t.type != "TEXT"]
        self._closers_ahead = self._count_closers_ahead(tags)
        ends = iter(self.branch_ends)
        end = next(ends, None)
        for index, token in enumerate(tags):
            while end is not None and end[0] <= token.start_pos:
                self._end_branches(*end)
                end = next(ends, None)
            self._index = index
            tag = token.type.split("_", 1)[1].lower()
            opening = token.type.startswith("OPEN_")
            if self.burial is not None and self._buried(opening, tag):
                continue
            if opening:
                self._open(tag, token)
            else:
                self._close(tag, token)
        for element in reversed(self.stack[1:]):
            self._implicit_close(element, len(self.text))
        return self.root.children

    def _end_branches(self, at: int, depth: int) -> None:
        """A branch ``depth`` blocks deep ended at ``at``: close what is open of it."""
        while self._depth(len(self.stack) - 1) >= depth:
            self._implicit_close(self.stack.pop(), at)

    @staticmethod
    def _count_closers_ahead(tags: list[Token]) -> list[dict[str, int]]:
        """Per tag token, for each element tag: how many of its closing tags come after this
        token before its next opening tag."""
        ahead: list[dict[str, int]] = [{}] * len(tags)
        closing: dict[str, int] = {}
        for index in range(len(tags) - 1, -1, -1):
            ahead[index] = dict(closing)
            kind, tag = tags[index].type.split("_", 1)
            tag = tag.lower()
            closing[tag] = closing.get(tag, 0) + 1 if kind == "CLOSE" else 0
        return ahead

    def _accepts(self, parent: Element, tag: str, is_root: bool) -> bool:
        spec = self.spec
        if parent.tag == spec.header:
            return tag == spec.item
        if parent.tag == spec.wrapper:
            return tag in (spec.header, spec.branch, spec.join)
        if parent.tag not in ("", spec.branch):
            return False
        if tag == spec.wrapper:
            return True
        if tag not in (spec.header, spec.branch, spec.join):
            return False
        if spec.wrapper and not is_root:
            return False
        # Inside a branch, a branch or join tag only nests after a nested header: otherwise the
        # current branch was left unclosed and the tag belongs to the enclosing block.
        last = parent.children[-1].tag if parent.children else None
        return is_root or tag == spec.header or last in (spec.header, spec.branch)

    def _depth(self, level: int) -> int:
        """How many branches hold ``self.stack[level]`` (what is open above it is closed first)."""
        return sum(1 for element in self.stack[: level + 1] if element.tag == self.spec.branch)

    def _open(self, tag: str, token: Token) -> None:
        start, end = token.start_pos, token.end_pos
        level = next(
            (
                i
                for i in range(len(self.stack) - 1, -1, -1)
                if self._accepts(self.stack[i], tag, is_root=i == 0)
            ),
            None,
        )
        if level is None or self._would_orphan(level, tag):
            where = self.stack[-1].tag or "text"
            self._note("tag_in_content", f"tag {token.value} inside {where}", start, end)
            return
        opens_block = tag in (self.spec.wrapper, self.spec.header)
        if opens_block and self._depth(level) >= self.max_depth and level > 0:
            self._note("too_deep", f"block nested deeper than {self.max_depth} levels", start, end)
            for element in reversed(self.stack[level + 1 :]):
                self._implicit_close(element, start)
            del self.stack[level + 1 :]
            self.burial = _Burial(
                header_led=tag != self.spec.wrapper,
                enclosing=frozenset(e.tag for e in self.stack[1:]),
            )
            self.burial.push(tag)
            return
        for element in reversed(self.stack[level + 1 :]):
            self._implicit_close(element, start)
        del self.stack[level + 1 :]
        element = Element(tag, start, end, None, end)
        self.stack[-1].children.append(element)
        self.stack.append(element)

    def _would_orphan(self, level: int, tag: str) -> bool:
        """Whether closing what is open above ``level`` leaves a later closing tag with nothing
        to close (then the new tag is read as text). A later closer of the new tag may close the
        new element instead; one of a tag still open below ``level`` closes that element (an
        unclosed nested branch before its block's join, with the enclosing branch's closer
        ahead)."""
        ahead = self._closers_ahead[self._index]
        for closing in {e.tag for e in self.stack[level + 1 :]} - {tag}:
            still_open = sum(1 for e in self.stack[1 : level + 1] if e.tag == closing)
            if ahead.get(closing, 0) > still_open:
                return True
        return False

    def _buried(self, opening: bool, tag: str) -> bool:
        """Whether a tag is content of the block nested too deep (then it changes nothing but
        where that block ends). The block ends at its own closing tag (its join's, when it
        starts at its header), or where a closing tag of an enclosing element comes first, or
        where something other than a branch or join follows its header or a branch."""
        burial = self.burial
        assert burial is not None
        spec = self.spec
        if burial.open:
            if opening:
                burial.push(tag)
                return True
            if burial.counts.get(tag):
                burial.pop(tag)
                if not burial.open and (not burial.header_led or tag == spec.join):
                    self.burial = None
                return True
            if tag in burial.enclosing:
                self.burial = None
                return False
            return True
        if opening and tag in (spec.branch, spec.join):
            burial.push(tag)
            return True
        self.burial = None
        return False

    def _close(self, tag: str, token: Token) -> None:
        for level in range(len(self.stack) - 1, 0, -1):
            if self.stack[level].tag == tag:
                break
        else:
            self._note(
                "unmatched_close_tag",
                f"{token.value} closes nothing",
                token.start_pos,
                token.end_pos,
            )
            return
        for element in reversed(self.stack[level + 1 :]):
            self._implicit_close(element, token.start_pos)
        element = self.stack[level]
        element.close_start, element.end = token.start_pos, token.end_pos
        del self.stack[level:]

    def _implicit_close(self, element: Element, at: int) -> None:
        element.end = at
        self._note(
            "unclosed_tag", f"<{element.tag}> is never closed", element.start, element.open_end
        )

    def _note(self, code: str, message: str, start: int, end: int) -> None:
        self.violations.append(Violation(code, message, start, end))


# -- builder ------------------------------------------------------------------------------------
KINDS = {kind.value: kind for kind in NodeKind}


@dataclass
class _OpenBlock:
    """A block whose join has not been seen yet: where its branches fork and where they end."""

    block: Block
    fork: tuple[int, ...]
    start: int
    branch_ends: list[tuple[int, ...]] = field(default_factory=list)


@dataclass
class _Scope:
    """A run of sibling elements and the text between them (the response, or a branch's content).

    Text found there becomes a node of ``kind`` at ``depth`` in ``block``/``branch``, unless it
    continues ``segment``, the scope's still-open node. Blocks opened in the scope get
    ``block_depth`` and ``parent``; the first reuses ``reuse`` (a wrapper's block) when given.
    """

    kind: NodeKind
    depth: int
    block_depth: int
    block: int | None = None
    branch: int | None = None
    segment: int | None = None
    parent: tuple[int, int] | None = None
    reuse: Block | None = None
    is_root: bool = False


class _Builder:
    """Turns elements into nodes that tile the text, and blocks; see the graph module docstring."""

    def __init__(
        self,
        text: str,
        spec: Dialect,
        offset: int,
        max_depth: int,
        sequential: bool | Collection[int] = False,
    ):
        self.text = text
        self.sequential = sequential
        self.spec = spec
        self.offset = offset
        self.max_depth = max_depth
        self.nodes: list[Node] = []
        self.blocks: list[Block] = []
        self.violations: list[Violation] = []

    def build(self, elements: list[Element], frontier: tuple[int, ...]) -> None:
        root = _Scope(NodeKind.TEXT, depth=0, block_depth=0, is_root=True)
        # The walk recurses a few frames per nesting level, bounded by max_depth.
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(max(limit, 200 + 8 * self.max_depth))
        try:
            self._scope(elements, 0, len(self.text), frontier, root)
        finally:
            sys.setrecursionlimit(limit)
        self._fill_blocks()

    # Element positions are relative to the response; nodes and violations index the full text.
    def _emit(
        self, kind: NodeKind, start: int, end: int, parents: tuple[int, ...], **fields: Any
    ) -> int:
        offset = self.offset
        node = Node(
            len(self.nodes),
            kind,
            start + offset,
            end + offset,
            "",
            tuple(sorted(parents)),
            **fields,
        )
        self.nodes.append(node)
        return node.id

    def _element(
        self, kind: NodeKind, element: Element, parents: tuple[int, ...], **fields: Any
    ) -> int:
        offset = self.offset
        close = (
            (element.close_start + offset, element.end + offset)
            if element.close_start is not None
            else None
        )
        label = None
        if kind in (KINDS[self.spec.item], KINDS[self.spec.branch]):
            label = self._label(element)
        return self._emit(
            kind,
            element.start,
            element.end,
            parents,
            open_tag=(element.start + offset, element.open_end + offset),
            close_tag=close,
            label=label,
            **fields,
        )

    def _label(self, element: Element) -> str | None:
        """The number an item or branch starts with, however far after its open tag."""
        match = LABEL.match(self.text, element.open_end)
        return match.group(1) if match else None

    def _opening(self, element: Element, parents: tuple[int, ...], **fields: Any) -> int:
        """The node of an element's open tag (and the whitespace after it)."""
        span = (element.start + self.offset, element.open_end + self.offset)
        return self._emit(
            KINDS[element.tag], element.start, element.open_end, parents, open_tag=span, **fields
        )

    def _closing(self, element: Element, parents: tuple[int, ...], **fields: Any) -> int:
        """The node of an element's close tag, after its nested elements."""
        span = (element.close_start + self.offset, element.end + self.offset)
        return self._emit(
            KINDS[element.tag], element.close_start, element.end, parents, close_tag=span, **fields
        )

    def _note(self, code: str, message: str, start: int, end: int) -> None:
        self.violations.append(Violation(code, message, start + self.offset, end + self.offset))

    def _gap(
        self, start: int, end: int, frontier: tuple[int, ...], scope: _Scope
    ) -> tuple[int, ...]:
        """Text between elements: it continues the scope's open segment, or its leading
        whitespace joins the previous node and the rest becomes a node of the scope's kind."""
        if start >= end:
            return frontier
        if scope.segment is not None and scope.segment == len(self.nodes) - 1:
            self.nodes[-1].char_end = end + self.offset
            return frontier
        gap = self.text[start:end]
        rest = gap.lstrip()
        # The prompt is not the model's: whitespace that opens the response stays in the response.
        if self.nodes and self.nodes[-1].kind is not NodeKind.PROMPT:
            if not rest:
                self.nodes[-1].char_end = end + self.offset
                return frontier
            start = end - len(rest)
            self.nodes[-1].char_end = start + self.offset
        kind = scope.kind
        if scope.is_root and end == len(self.text):
            boxed = (
                "\\boxed" in gap or "\\fbox" in gap
            )  # the box forms constraints.BOX_OPENER reads
            kind = NodeKind.ANSWER if boxed else NodeKind.TEXT
        node = self._emit(
            kind, start, end, frontier, block=scope.block, branch=scope.branch, depth=scope.depth
        )
        scope.segment = node
        return (node,)

    def _scope(
        self,
        elements: list[Element],
        start: int,
        end: int,
        frontier: tuple[int, ...],
        scope: _Scope,
    ) -> tuple[int, ...]:
        spec = self.spec
        current: _OpenBlock | None = None
        cursor = start
        for element in elements:
            tag = element.tag
            continues = (
                current is not None and current.branch_ends and tag in (spec.branch, spec.join)
            )
            if current is not None and current.branch_ends and not continues:
                frontier, current = self._close_block(current, element.start), None
            if continues:
                self._branch_gap(cursor, element.start, current)
            else:
                frontier = self._gap(cursor, element.start, frontier, scope)
                if current is not None:
                    current.fork = frontier
            scope.segment = None
            cursor = element.end
            if tag in (spec.wrapper, spec.header) or (tag == spec.branch and current is None):
                if current is not None:
                    frontier = self._close_block(current, element.start)
                current = _OpenBlock(self._new_block(scope, element), frontier, element.start)
            if tag == spec.wrapper:
                frontier, current = self._wrapper(element, frontier, current.block), None
            elif tag == spec.header:
                frontier = current.fork = self._header(element, frontier, current.block)
            elif tag == spec.branch:
                current.branch_ends.append(self._branch(element, current))
            elif tag == spec.join:
                frontier, current = self._join(element, frontier, current, scope), None
        if current is not None and current.branch_ends:
            frontier, current = self._close_block(current, end), None
        frontier = self._gap(cursor, end, frontier, scope)
        if current is not None:
            # a header without branches: what follows the block comes after the text after it
            current.fork = frontier
            frontier = self._close_block(current, end)
        return frontier

    def _new_block(self, scope: _Scope, element: Element) -> Block:
        spec = self.spec
        if scope.reuse is not None:
            block, scope.reuse = scope.reuse, None
        else:
            if scope.block_depth >= self.max_depth:
                line = self.text.count("\n", 0, element.start) + 1
                raise ParseError(
                    f"blocks nested deeper than {self.max_depth} levels",
                    line=line,
                    column=element.start - self.text.rfind("\n", 0, element.start),
                    pos=element.start,
                    expected=(),
                )
            block = Block(index=len(self.blocks), depth=scope.block_depth, parent=scope.parent)
            self.blocks.append(block)
            if spec.wrapper and element.tag != spec.wrapper:
                self._note(
                    "missing_wrapper",
                    f"<{element.tag}> outside a <{spec.wrapper}> block",
                    element.start,
                    element.open_end,
                )
        if element.tag == spec.branch:
            self._note(
                "missing_header",
                f"<{spec.branch}> without a <{spec.header}> before it",
                element.start,
                element.open_end,
            )
        return block

    def _close_block(self, current: _OpenBlock, at: int) -> tuple[int, ...]:
        """End a block that never reached its join: its branches (or header) become the frontier."""
        spec = self.spec
        start = current.start
        if current.branch_ends:
            self._note("missing_join", f"block without a <{spec.join}>", start, at)
            ends = (
                current.branch_ends[-1:]
                if self._is_sequential(current.block)
                else current.branch_ends
            )
            return tuple(sorted(set().union(*ends)))
        self._note("missing_branches", f"<{spec.header}> without any <{spec.branch}>", start, at)
        return current.fork

    def _wrapper(
        self, element: Element, frontier: tuple[int, ...], block: Block
    ) -> tuple[int, ...]:
        fields = {"block": block.index, "depth": block.depth}
        opened = self._opening(element, frontier, part="open", **fields)
        inner = _Scope(
            NodeKind.TEXT,
            block.depth,
            block.depth,
            block=block.index,
            parent=block.parent,
            reuse=block,
        )
        content_end = element.close_start if element.close_start is not None else element.end
        frontier = self._scope(element.children, element.open_end, content_end, (opened,), inner)
        if element.close_start is None:
            return frontier
        return (self._closing(element, frontier, part="close", **fields),)

    def _header(self, element: Element, frontier: tuple[int, ...], block: Block) -> tuple[int, ...]:
        fields = {"block": block.index, "depth": block.depth}
        frontier = (self._opening(element, frontier, part="open", **fields),)
        stray = _Scope(NodeKind.TEXT, block.depth, block.depth, block=block.index)
        cursor = element.open_end
        for item in element.children:
            frontier = self._gap(cursor, item.start, frontier, stray)
            stray.segment = None
            frontier = (self._element(KINDS[item.tag], item, frontier, **fields),)
            cursor = item.end
        if element.close_start is None:
            return self._gap(cursor, element.end, frontier, stray)
        frontier = self._gap(cursor, element.close_start, frontier, stray)
        return (self._closing(element, frontier, part="close", **fields),)

    def _is_sequential(self, block: Block) -> bool:
        return self.sequential is True or (
            self.sequential is not False and block.index in self.sequential
        )

    def _branch(self, element: Element, current: _OpenBlock) -> tuple[int, ...]:
        block, index = current.block, len(current.branch_ends)
        fields = {"block": block.index, "branch": index, "depth": block.depth}
        fork = current.fork
        if current.branch_ends and self._is_sequential(block):
            fork = current.branch_ends[-1]
        if not element.children:
            return (self._element(KINDS[element.tag], element, fork, **fields),)
        opened = self._opening(element, fork, **fields)
        self.nodes[opened].label = self._label(element)
        inner = _Scope(
            KINDS[element.tag],
            block.depth,
            block.depth + 1,
            block=block.index,
            branch=index,
            segment=opened,
            parent=(block.index, index),
        )
        content_end = element.close_start if element.close_start is not None else element.end
        frontier = self._scope(element.children, element.open_end, content_end, (opened,), inner)
        if element.close_start is None:
            return frontier
        if inner.segment is not None and inner.segment == len(self.nodes) - 1:
            last = self.nodes[-1]
            last.close_tag = (element.close_start + self.offset, element.end + self.offset)
            last.char_end = last.close_tag[1]
            return frontier
        return (self._closing(element, frontier, **fields),)

    def _branch_gap(self, start: int, end: int, current: _OpenBlock) -> None:
        """Text after a branch and before its sibling or join stays inside that branch."""
        index = len(current.branch_ends) - 1
        scope = _Scope(
            NodeKind.TEXT,
            current.block.depth,
            current.block.depth,
            block=current.block.index,
            branch=index,
        )
        current.branch_ends[index] = self._gap(start, end, current.branch_ends[index], scope)

    def _join(
        self, element: Element, frontier: tuple[int, ...], current: _OpenBlock | None, scope: _Scope
    ) -> tuple[int, ...]:
        kind = KINDS[element.tag]
        if current is None:
            self._note(
                "unexpected_join",
                f"<{element.tag}> without a block before it",
                element.start,
                element.open_end,
            )
            return (self._element(kind, element, frontier, depth=scope.depth),)
        block = current.block
        if not current.branch_ends:
            self._note(
                "missing_branches",
                f"<{self.spec.header}> without any <{self.spec.branch}>",
                element.start,
                element.open_end,
            )
            parents = current.fork
        else:
            ends = current.branch_ends[-1:] if self._is_sequential(block) else current.branch_ends
            parents = tuple(sorted(set().union(*ends)))
        return (self._element(kind, element, parents, block=block.index, depth=block.depth),)

    def _fill_blocks(self) -> None:
        spec = self.spec
        for node in self.nodes:
            node.text = ""
            if node.block is None:
                continue
            block = self.blocks[node.block]
            if node.branch is not None:
                while len(block.branches) <= node.branch:
                    block.branches.append([])
                block.branches[node.branch].append(node.id)
            elif node.kind.value == spec.item:
                block.items.append(node.id)
            elif node.kind.value == spec.join:
                block.join = node.id
            elif block.join is None and not (
                node.kind.value == spec.wrapper and node.part == "close"
            ):
                block.header.append(node.id)
            else:
                block.close.append(node.id)


# -- token alignment ----------------------------------------------------------------------------
def decode_pieces(tokenizer: Tokenizer, ids: Sequence[int]) -> list[str]:
    """Per-token text whose concatenation is exactly the decode of ``ids``.

    Decoding each id alone is exact for byte-level BPE vocabularies and cached per id; where it is
    not (SentencePiece spaces, UTF-8 split across tokens) an incremental decode with a small window
    attributes each character to the token that completes it.
    """
    decode = _decoder(tokenizer)
    full = decode(ids)
    cache: dict[int, str] = {}
    pieces = []
    for token_id in ids:
        piece = cache.get(token_id)
        if piece is None:
            piece = cache[token_id] = decode([token_id])
        pieces.append(piece)
    if "".join(pieces) == full:
        return pieces
    pieces = []
    prefix, emitted = 0, ""
    for index in range(len(ids)):
        text = decode(ids[prefix : index + 1])
        if text.endswith("\ufffd") and _still_open(decode, ids, prefix, index, text):
            pieces.append("")
            continue
        pieces.append(text[len(emitted) :])
        if index + 1 - prefix > 6:
            prefix = index + 1 - 4
            emitted = decode(ids[prefix : index + 1])
        else:
            emitted = text
    if "".join(pieces) != full:
        raise ValueError("this tokenizer's decode is not incremental; cannot align tokens to text")
    return pieces


def _still_open(decode, ids: Sequence[int], prefix: int, index: int, text: str) -> bool:
    """Whether the U+FFFD ending ``text`` (the decode of ``ids[prefix:index + 1]``) goes to a later
    token: the next one changes it (it completes a character split over byte tokens) or adds
    nothing (a further byte of it). Followed by new text, it is final: a written U+FFFD, or a
    byte nothing completes."""
    if index + 1 >= len(ids):
        return False
    following = decode(ids[prefix : index + 2])
    return following == text or not following.startswith(text)


def _decoder(tokenizer: Tokenizer):
    """ids -> text, special tokens kept, no clean-up; the Rust tokenizer directly when there is one
    (it skips transformers' per-id Python checks)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "decode"):
        return lambda ids: backend.decode(list(ids), skip_special_tokens=False)

    def decode(ids: Sequence[int]) -> str:
        try:
            return tokenizer.decode(
                list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False
            )
        except TypeError:
            return tokenizer.decode(list(ids))

    return decode


def _token_starts(
    nodes: list[Node], pieces: list[str], offsets: list[int], prompt_tokens: int
) -> None:
    """Give each node its token span: a token belongs to the node holding its first
    non-whitespace character (its first character when all whitespace), so a tag token never
    lands in the node before the tag. Only the token straddling a node's start needs a look."""
    count = len(pieces)
    starts = []
    for node in nodes:
        if node.kind is NodeKind.PROMPT:
            starts.append(0)
            continue
        first = bisect_left(offsets, node.char_start, prompt_tokens, count)
        if first > prompt_tokens:
            piece = pieces[first - 1]
            stripped = piece.lstrip()
            anchor = offsets[first - 1] + (len(piece) - len(stripped) if stripped else 0)
            if anchor >= node.char_start:
                first -= 1
        starts.append(first)
    if starts:
        starts[0] = 0
    for node, start, end in zip(nodes, starts, starts[1:] + [count], strict=True):
        node.token_start, node.token_end = start, max(start, end)


# -- public entry point -------------------------------------------------------------------------
def parse(
    text_or_ids: str | Sequence[int] | Any,
    *,
    grammar: str = "npr",
    tokenizer: Tokenizer | None = None,
    prompt_ids: Sequence[int] | None = None,
    lenient: bool = False,
    max_depth: int = MAX_DEPTH,
    sequential: bool | Collection[int] = False,
    branch_ends: Collection[tuple[int, int]] = (),
) -> ReasoningGraph:
    """Parse a response (text, or token ids with ``tokenizer``) into a :class:`ReasoningGraph`.

    With ``prompt_ids`` the graph starts with a prompt node and spans prompt + response tokens.
    Strict mode raises :class:`ParseError` when the grammar rejects the response; lenient mode
    always returns a graph and records each repair in ``graph.violations``. ``sequential``
    (True, or a collection of block indices) marks blocks that were decoded one branch after
    another: their branches then depend on each other in order, as in plain decoding.
    ``branch_ends`` (lenient, token ids): ``(k, depth)`` says that a branch ``depth`` blocks
    deep ends before response token ``k``; what is still open of it is closed there (a decoder
    that cut the branch off knows where it ended; the text alone may not tell).
    """
    spec = dialect(grammar)
    if not 1 <= max_depth <= DEPTH_LIMIT:
        raise ValueError(f"max_depth must be in 1..{DEPTH_LIMIT}, got {max_depth}")
    ids: list[int] | None = None
    if isinstance(text_or_ids, str):
        response = text_or_ids
        if tokenizer is not None:
            ids = list(tokenizer.encode(response, add_special_tokens=False))
    else:
        if tokenizer is None:
            raise ValueError("token ids need tokenizer= to be decoded")
        ids = [
            int(i)
            for i in (text_or_ids.tolist() if hasattr(text_or_ids, "tolist") else text_or_ids)
        ]
    prompt = [
        int(i) for i in (prompt_ids.tolist() if hasattr(prompt_ids, "tolist") else prompt_ids or [])
    ]
    if prompt and tokenizer is None:
        raise ValueError("prompt_ids need tokenizer= to be decoded")
    pieces = None
    if ids is not None:
        pieces = decode_pieces(tokenizer, prompt + ids)
        prompt_text = "".join(pieces[: len(prompt)])
        response = "".join(pieces[len(prompt) :])
    else:
        prompt_text = ""

    ends = []
    if branch_ends:
        if pieces is None or not lenient:
            raise ValueError("branch_ends needs token ids and lenient=True")
        starts = list(accumulate(map(len, pieces[len(prompt) :]), initial=0))
        for k, depth in branch_ends:
            if not (0 <= k < len(starts) and depth >= 1):
                raise ValueError(f"branch_ends: no response token {k} or depth {depth} < 1")
            ends.append((starts[k], depth))
    if lenient:
        recovery = _Recovery(response, spec, max_depth, ends)
        elements = recovery.run()
        repaired = [_shift(v, len(prompt_text)) for v in recovery.violations]
    else:
        elements = _strict_elements(response, grammar)
        repaired = []

    builder = _Builder(
        response, spec, offset=len(prompt_text), max_depth=max_depth, sequential=sequential
    )
    frontier: tuple[int, ...] = ()
    if prompt_text or prompt:
        builder.nodes.append(Node(0, NodeKind.PROMPT, 0, len(prompt_text), ""))
        frontier = (0,)
    builder.build(elements, frontier)
    full_text = prompt_text + response
    for node in builder.nodes:
        node.text = full_text[node.char_start : node.char_end]
    if not builder.nodes:
        builder.nodes.append(Node(0, NodeKind.TEXT, 0, 0, ""))

    violations = sorted(repaired + builder.violations, key=lambda v: (v.char_start, v.code))
    graph = ReasoningGraph(
        text=full_text,
        nodes=builder.nodes,
        blocks=builder.blocks,
        grammar=spec.name,
        response_start=len(prompt_text),
        violations=violations,
    )
    if pieces is not None:
        offsets = list(accumulate(map(len, pieces), initial=0))
        _token_starts(graph.nodes, pieces, offsets, len(prompt))
        graph.token_ids = prompt + ids
        graph.token_offsets = offsets
        graph.prompt_num_tokens = len(prompt)
    return graph


def _shift(violation: Violation, offset: int) -> Violation:
    violation.char_start += offset
    violation.char_end += offset
    return violation
