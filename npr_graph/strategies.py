"""Hypothesis strategies for reasoning traces, for property-testing code that consumes them.

A trace is described by a plain structural spec (:class:`TraceSpec` of :class:`BlockSpec`) and
turned into text by :func:`render`, which adds the tags, the ``1:``/``1.2:`` labels and the
whitespace between tags. :func:`specs` and :func:`traces` draw valid traces of either grammar,
:func:`mutations` draws traces that break exactly one format rule, and :func:`graph_shapes` /
:func:`tokenized_graphs` parse drawn traces into tokenized graphs (one token per character, each
tag one token) for layout properties::

    from hypothesis import given
    from npr_graph import parse, validate
    from npr_graph.strategies import mutations, traces

    @given(traces("multiverse"))
    def test_valid(pair):
        spec, text = pair
        assert validate(text, grammar="multiverse") == []

    @given(mutations("npr"))
    def test_caught(pair):
        text, rule = pair
        assert rule in {v.code for v in validate(text)}
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import cache

from hypothesis import strategies as st

from .constraints import PROFILES
from .graph import ReasoningGraph
from .parse import parse
from .tokenizers import CharTokenizer
from .typecheck import check_at_least

GRAMMARS = ("npr", "multiverse")
DEFAULT_MAX_BRANCHES = PROFILES["strict"].max_branches


@dataclass(frozen=True)
class Tags:
    """The tag names one grammar gives the roles of a block."""

    header: str
    item: str
    branch: str
    join: str
    wrapper: str | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t for t in (self.wrapper, self.header, self.item, self.branch, self.join) if t)


TAGS = {
    "npr": Tags("guideline", "plan", "step", "takeaway"),
    "multiverse": Tags("Goal", "Outline", "Path", "Conclusion", wrapper="Parallel"),
}
ALL_TAGS = tuple(
    f"<{slash}{name}>" for tags in TAGS.values() for name in tags.names for slash in ("", "/")
)


# -- specs --------------------------------------------------------------------------------------
@dataclass
class BlockSpec:
    """One block: the plan bodies, one step per plan, and the takeaway body.

    Bodies carry no label; :func:`render` numbers them. A step is a body, or (Multiverse) a list
    of parts in order: the body, then nested blocks with optional text between and after them.
    """

    plans: list[str]
    steps: list[Step]
    takeaway: str


Step = str | list[str | BlockSpec]


@dataclass
class TraceSpec:
    """Free text before the first block, the blocks, and the final text holding ``\\boxed{}``."""

    preamble: str
    blocks: list[BlockSpec]
    answer: str


@dataclass(frozen=True)
class Whitespace:
    """Whitespace :func:`render` puts between tags; each tuple is used cyclically.

    ``gaps`` go between the parts of a block and between blocks, ``inner`` inside steps and
    takeaways around their content (and around nested blocks), ``item`` inside plans.
    """

    gaps: tuple[str, ...] = ("\n",)
    inner: tuple[str, ...] = ("\n",)
    item: tuple[str, ...] = ("",)

    def __post_init__(self) -> None:
        for kind in ("gaps", "inner", "item"):
            runs = getattr(self, kind)
            if not runs or any(not isinstance(r, str) for r in runs):
                raise ValueError(f"Whitespace.{kind} must be a non-empty tuple of strings")


def step_body(step: Step) -> str:
    """The text a step starts with (after its label)."""
    return step if isinstance(step, str) else str(step[0])


def nested_blocks(step: Step) -> list[BlockSpec]:
    return [] if isinstance(step, str) else [p for p in step if isinstance(p, BlockSpec)]


def walk(spec: TraceSpec) -> Iterator[BlockSpec]:
    """Every block in document order (a block before the blocks nested in its steps); the n-th
    block yielded is ``graph.blocks[n]`` of the parsed trace."""

    def visit(block: BlockSpec) -> Iterator[BlockSpec]:
        yield block
        for step in block.steps:
            for inner in nested_blocks(step):
                yield from visit(inner)

    for block in spec.blocks:
        yield from visit(block)


# -- rendering ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Piece:
    """A run of rendered text and what it is, so mutations can edit one precise spot.

    ``role``: ``tag``, ``label`` (``"1.2: "``), ``body``, ``inner`` (whitespace inside an
    element), ``gap`` (whitespace between the parts of a block or between blocks, where only
    whitespace is allowed), ``space`` (other whitespace), ``preamble`` or ``answer``. ``part`` is
    the block role the piece belongs to (``wrapper``, ``header``, ``item``, ``branch``, ``join``),
    ``block`` the block's index in :func:`walk` order and ``index`` the plan or step number.
    """

    text: str
    role: str
    part: str = ""
    block: int | None = None
    index: int | None = None
    closing: bool = False


@dataclass
class _Renderer:
    tags: Tags
    whitespace: Whitespace
    pieces: list[Piece] = field(default_factory=list)
    used: dict[str, int] = field(default_factory=dict)
    blocks: int = 0

    def ws(self, kind: str) -> str:
        options = getattr(self.whitespace, kind)
        count = self.used.get(kind, 0)
        self.used[kind] = count + 1
        return options[count % len(options)]

    def add(self, text: str, role: str, **where: object) -> None:
        self.pieces.append(Piece(text, role, **where))

    def tag(self, name: str, closing: bool = False, **where: object) -> None:
        self.add(f"<{'/' if closing else ''}{name}>", "tag", closing=closing, **where)

    def trace(self, spec: TraceSpec) -> list[Piece]:
        self.add(spec.preamble, "preamble")
        for number, block in enumerate(spec.blocks):
            self.add(self.ws("gaps"), "gap" if number else "space")
            self.block(block, prefix="")
        self.add(self.ws("gaps"), "space")
        self.add(spec.answer, "answer")
        return self.pieces

    def block(self, block: BlockSpec, prefix: str) -> None:
        tags, index = self.tags, self.blocks
        self.blocks += 1
        if tags.wrapper:
            self.tag(tags.wrapper, part="wrapper", block=index)
            self.add(self.ws("gaps"), "gap", part="wrapper", block=index)
        header = {"part": "header", "block": index}
        self.tag(tags.header, **header)
        self.add(self.ws("gaps"), "gap", **header)
        for number, plan in enumerate(block.plans):
            item = {"part": "item", "block": index, "index": number}
            self.tag(tags.item, **item)
            self.add(self.ws("item"), "inner", **item)
            self.add(f"{prefix}{number + 1}: ", "label", **item)
            self.add(plan, "body", **item)
            self.add(self.ws("item"), "inner", **item)
            self.tag(tags.item, closing=True, **item)
            self.add(self.ws("gaps"), "gap", **header)
        self.tag(tags.header, closing=True, **header)
        self.add(self.ws("gaps"), "gap", **header)
        for number, step in enumerate(block.steps):
            self.step(
                step, f"{prefix}{number + 1}", {"part": "branch", "block": index, "index": number}
            )
            self.add(self.ws("gaps"), "gap", part="branch", block=index, index=number)
        join = {"part": "join", "block": index}
        self.tag(tags.join, **join)
        self.add(self.ws("inner"), "inner", **join)
        self.add(block.takeaway, "body", **join)
        self.add(self.ws("inner"), "inner", **join)
        self.tag(tags.join, closing=True, **join)
        if tags.wrapper:
            self.add(self.ws("gaps"), "gap", part="wrapper", block=index)
            self.tag(tags.wrapper, closing=True, part="wrapper", block=index)

    def step(self, step: Step, label: str, where: dict) -> None:
        self.tag(self.tags.branch, **where)
        self.add(self.ws("inner"), "inner", **where)
        self.add(f"{label}: ", "label", **where)
        parts = [step] if isinstance(step, str) else step
        for part in parts:
            if isinstance(part, BlockSpec):
                self.add(self.ws("inner"), "space", **where)
                self.block(part, prefix=f"{label}.")
            else:
                self.add(part, "body", **where)
        self.add(self.ws("inner"), "inner", **where)
        self.tag(self.tags.branch, closing=True, **where)


def pieces(
    spec: TraceSpec, grammar: str = "npr", whitespace: Whitespace | None = None
) -> list[Piece]:
    """The rendered trace as labelled pieces; ``"".join(p.text for p in pieces(...))`` is
    :func:`render`'s text."""
    return _Renderer(_tags(grammar), whitespace or Whitespace()).trace(spec)


def render(spec: TraceSpec, grammar: str = "npr", whitespace: Whitespace | None = None) -> str:
    """The trace text of ``spec`` in ``grammar``, numbering plans and steps ``1``, ``2`` (and
    ``1.1``, ``1.2`` inside step 1). Contents are written verbatim: a spec holding tags renders
    an invalid trace."""
    return _text(pieces(spec, grammar, whitespace))


def _text(parts: list[Piece]) -> str:
    return "".join(p.text for p in parts)


def _tags(grammar: str) -> Tags:
    if grammar not in TAGS:
        raise ValueError(f"unknown grammar {grammar!r}; choose one of {', '.join(GRAMMARS)}")
    return TAGS[grammar]


# -- content strategies -------------------------------------------------------------------------
SNIPPETS = (
    "<",
    ">",
    "</",
    "a < b",
    "x>y",
    "<st",
    "ep>",
    "<Step>",
    "< plan >",
    "<br/>",
    "$x^2 + y_1$",
    "\\frac{1}{2}",
    "\\box",
    "boxed{",
    "{}",
    "1:",
    "2.",
    "3)",
    "∀ε>0",
    "日本語",
    "😀",
    "\u200b",
    "\n",
    "\n\n",
    "\t",
    "\x00",
)


def is_safe(text: str) -> bool:
    """No format tag of either grammar and no box (``\\boxed``, ``\\fbox``): text usable as
    content anywhere."""
    return (
        "\\boxed" not in text and "\\fbox" not in text and not any(tag in text for tag in ALL_TAGS)
    )


_CHARACTERS = st.one_of(st.characters(), st.sampled_from("<>/{}\\$^_:.)( \n\t"))


@cache
def safe_text(max_size: int = 12) -> st.SearchStrategy[str]:
    """Arbitrary text, math, unicode and tag look-alikes, never a tag or ``\\boxed``."""
    return st.one_of(st.text(_CHARACTERS, max_size=max_size), st.sampled_from(SNIPPETS)).filter(
        is_safe
    )


@cache
def words(max_size: int = 8) -> st.SearchStrategy[str]:
    return st.text(st.characters(categories=("L", "N")), min_size=1, max_size=max_size)


@cache
def contents(max_size: int = 6) -> st.SearchStrategy[str]:
    """Non-empty content: safe text around at least one letter or digit."""
    return st.builds(
        lambda before, word, after: before + word + after,
        safe_text(max_size),
        words(max_size),
        safe_text(max_size),
    ).filter(is_safe)


@cache
def answers() -> st.SearchStrategy[str]:
    """Final text with exactly one non-empty ``\\boxed{...}``."""
    plain = safe_text().map(lambda s: s.replace("{", "").replace("}", "")).filter(is_safe)
    core = words().map(lambda s: s.replace("{", "").replace("}", ""))
    return st.builds(lambda a, c, b: f"{a}\\boxed{{{c}}}{b}", plain, core, plain).filter(
        lambda s: s.count("\\boxed") == 1
    )


GAP_CHOICES = ("", "\n", " ", "\n\n", "\t", " \n ", "\r\n")


@cache
def whitespaces() -> st.SearchStrategy[Whitespace]:
    runs = st.lists(st.sampled_from(GAP_CHOICES), min_size=1, max_size=4).map(tuple)
    return st.builds(Whitespace, gaps=runs, inner=runs, item=runs)


# -- spec strategies ----------------------------------------------------------------------------
def _nested_step(body: str, rest: list[tuple[BlockSpec, str]]) -> Step:
    return [body, *(part for pair in rest for part in pair)]


@cache
def _blocks(
    grammar: str, max_branches: int, depth: int, max_depth: int
) -> st.SearchStrategy[BlockSpec]:
    """Blocks of 1..max_branches steps; in Multiverse about one step in six nests blocks (one in
    ``max_branches + 1`` for wider blocks, so a block holds fewer than one nested block on average
    and drawn traces stay small at any width and depth)."""
    text = contents()
    step: st.SearchStrategy[Step] = text
    if TAGS[grammar].wrapper and depth < max_depth:
        inner = _blocks(grammar, max_branches, depth + 1, max_depth)
        rest = st.lists(st.tuples(inner, st.one_of(st.just(""), text)), min_size=1, max_size=2)
        # a step may open a nested block before any text of its own: it is not empty
        nested = st.builds(_nested_step, st.one_of(text, st.just("")), rest)
        # plain text at 0, which hypothesis shrinks towards: a minimal example nests only if it must
        one_in = max(5, max_branches)
        step = st.integers(0, one_in).flatmap(lambda n: nested if n == one_in else text)
    by_width = {
        width: st.builds(
            BlockSpec,
            st.lists(text, min_size=width, max_size=width),
            st.lists(step, min_size=width, max_size=width),
            text,
        )
        for width in range(1, max_branches + 1)
    }
    return st.integers(1, max_branches).flatmap(by_width.__getitem__)


def specs(
    grammar: str = "npr", max_blocks: int = 3, max_branches: int = 5, max_depth: int = 2
) -> st.SearchStrategy[TraceSpec]:
    """Valid trace specs: 1..max_blocks blocks of 1..max_branches steps each; Multiverse steps
    nest blocks down to ``Block.depth == max_depth`` (NPR never nests). Wider than the strict
    profile's 5 branches, they are valid under ``validate(text, max_branches=max_branches)``;
    ``max_depth`` stops below the parser's depth limit (``npr_graph.parse.MAX_DEPTH``)."""
    from .parse import MAX_DEPTH

    _tags(grammar)
    check_at_least("max_blocks", max_blocks, 1)
    check_at_least("max_branches", max_branches, 1)
    check_at_least("max_depth", max_depth, 0)
    if max_depth >= MAX_DEPTH:
        raise ValueError(
            f"max_depth must be < {MAX_DEPTH}: the parser reads blocks nested {MAX_DEPTH} deep "
            f"at most (depth 0 to {MAX_DEPTH - 1}), got {max_depth}"
        )
    return st.builds(
        TraceSpec,
        preamble=st.one_of(st.just(""), safe_text()),
        blocks=st.lists(
            _blocks(grammar, max_branches, 0, max_depth), min_size=1, max_size=max_blocks
        ),
        answer=answers(),
    )


def traces(
    grammar: str = "npr", max_blocks: int = 3, max_branches: int = 5, max_depth: int = 2
) -> st.SearchStrategy[tuple[TraceSpec, str]]:
    """``(spec, text)`` pairs of valid traces, with varied whitespace between tags (see
    :func:`specs` for ``max_branches`` above 5)."""
    return st.tuples(specs(grammar, max_blocks, max_branches, max_depth), whitespaces()).map(
        lambda pair: (pair[0], render(pair[0], grammar, pair[1]))
    )


# -- mutations ----------------------------------------------------------------------------------
MutationFn = Callable[[TraceSpec, str, int, Whitespace], str]


@dataclass(frozen=True)
class Mutation:
    """Turns a valid spec into trace text that breaks exactly the rule ``name``.

    ``where`` picks which block, plan, step or tag is broken (taken modulo the candidates), so a
    strategy can draw it and shrink it towards the first one.
    """

    name: str
    apply: MutationFn
    grammars: tuple[str, ...] = GRAMMARS

    def __call__(
        self,
        spec: TraceSpec,
        grammar: str = "npr",
        where: int = 0,
        whitespace: Whitespace | None = None,
    ) -> str:
        if grammar not in self.grammars:
            raise ValueError(f"mutation {self.name!r} does not apply to {grammar!r} traces")
        return self.apply(spec, grammar, where, whitespace or Whitespace())


def _pick(candidates: list, where: int):
    if not candidates:
        raise ValueError("the spec has nothing this mutation can change")
    return candidates[where % len(candidates)]


def _edit(spec: TraceSpec, where: int, edit: Callable[[BlockSpec, int], None]) -> TraceSpec:
    """A deep copy of ``spec`` with ``edit(block, rest)`` applied to the block ``where`` picks;
    ``rest`` is what is left of ``where`` to pick a spot inside the block."""
    spec = copy.deepcopy(spec)
    blocks = list(walk(spec))
    edit(_pick(blocks, where), where // len(blocks))
    return spec


def _block_number(spec: TraceSpec, where: int) -> int:
    return where % sum(1 for _ in walk(spec))


def _leaf_steps(spec: TraceSpec) -> list[tuple[int, int]]:
    return [
        (number, index)
        for number, block in enumerate(walk(spec))
        for index, step in enumerate(block.steps)
        if isinstance(step, str)
    ]


def _relabel(parts: list[Piece], target: tuple[int, int], kinds: tuple[str, ...]) -> str:
    return _text(
        [
            replace(p, text="0: ")
            if p.role == "label" and p.part in kinds and (p.block, p.index) == target
            else p
            for p in parts
        ]
    )


def _plan_numbering(spec: TraceSpec, grammar: str, where: int, ws: Whitespace) -> str:
    parts = pieces(spec, grammar, ws)
    targets = [(p.block, p.index) for p in parts if p.role == "label" and p.part == "item"]
    return _relabel(parts, _pick(targets, where), ("item",))


def _step_numbering(spec: TraceSpec, grammar: str, where: int, ws: Whitespace) -> str:
    return _relabel(pieces(spec, grammar, ws), _pick(_leaf_steps(spec), where), ("branch",))


def _branch_count(spec: TraceSpec, grammar: str, where: int, ws: Whitespace) -> str:
    def edit(block: BlockSpec, where: int) -> None:
        if len(block.steps) > 1 and where % 2:
            block.steps.pop()
        else:
            block.steps.append(block.takeaway)

    return render(_edit(spec, where, edit), grammar, ws)


def _no_plans(spec: TraceSpec, grammar: str, where: int, ws: Whitespace) -> str:
    return render(_edit(spec, where, lambda block, _: block.plans.clear()), grammar, ws)


def _too_many_branches(spec: TraceSpec, grammar: str, where: int, ws: Whitespace) -> str:
    def edit(block: BlockSpec, _: int) -> None:
        extra = DEFAULT_MAX_BRANCHES + 1 - len(block.plans)
        block.plans.extend([block.takeaway] * extra)
        block.steps.extend([block.takeaway] * extra)

    return render(_edit(spec, where, edit), grammar, ws)


def _nesting(spec: TraceSpec, grammar: str, where: int, ws: Whitespace) -> str:
    def edit(block: BlockSpec, where: int) -> None:
        index = where % len(block.steps)
        inner = BlockSpec(list(block.plans), [step_body(s) for s in block.steps], block.takeaway)
        tail = [block.takeaway] if where % 2 else []
        block.steps[index] = [step_body(block.steps[index]), inner, *tail]

    return render(_edit(spec, where, edit), grammar, ws)


def _insert_in_content(text: str) -> Callable[[TraceSpec, int], TraceSpec]:
    """Append ``text`` to the body of a step (its first part) or a takeaway."""

    def edit(spec: TraceSpec, where: int) -> TraceSpec:
        spec = copy.deepcopy(spec)
        spots: list[tuple[BlockSpec, int | None]] = [
            (block, index) for block in walk(spec) for index in [*range(len(block.steps)), None]
        ]
        block, index = _pick(spots, where)
        if index is None:
            block.takeaway += text
        elif isinstance(block.steps[index], str):
            block.steps[index] += text
        else:
            block.steps[index][0] += text
        return spec

    return edit


def _tag_in_content(spec: TraceSpec, grammar: str, where: int, ws: Whitespace) -> str:
    tag = f" <{TAGS[grammar].item}> "
    return render(_insert_in_content(tag)(spec, where), grammar, ws)


def _unmatched_close_tag(spec: TraceSpec, grammar: str, where: int, ws: Whitespace) -> str:
    tags = TAGS[grammar]
    tag = f" </{(tags.item, tags.header)[where % 2]}> "
    return render(_insert_in_content(tag)(spec, where // 2), grammar, ws)


def _empty_content(spec: TraceSpec, grammar: str, where: int, ws: Whitespace) -> str:
    spec = copy.deepcopy(spec)
    spots: list[tuple[str, BlockSpec, int]] = [
        (kind, block, index)
        for block in walk(spec)
        for kind, count in (("plan", len(block.plans)), ("step", len(block.steps)), ("join", 1))
        for index in range(count)
    ]
    kind, block, index = _pick(spots, where)
    if kind == "plan":
        block.plans[index] = ""
    elif kind == "join":
        block.takeaway = ""
    else:  # its nested blocks go too: a path holding a block is not empty
        block.steps[index] = ""
    return render(spec, grammar, ws)


def _stray_text(spec: TraceSpec, grammar: str, where: int, ws: Whitespace) -> str:
    parts = pieces(spec, grammar, ws)
    gaps = [i for i, p in enumerate(parts) if p.role == "gap"]
    target = _pick(gaps, where)
    parts[target] = replace(
        parts[target], text=f"{parts[target].text}stray note{parts[target].text}"
    )
    return _text(parts)


def _answer(text: Callable[[str], str]) -> MutationFn:
    def apply(spec: TraceSpec, grammar: str, where: int, ws: Whitespace) -> str:
        return render(replace(spec, answer=text(spec.answer)), grammar, ws)

    return apply


_BOXED = re.compile(r"\\boxed\{[^{}]*\}")


def _drop(parts: list[Piece], keep: Callable[[Piece], bool]) -> str:
    return _text([p for p in parts if keep(p)])


def _missing_join(spec: TraceSpec, grammar: str, where: int, ws: Whitespace) -> str:
    parts = pieces(spec, grammar, ws)
    block = _block_number(spec, where)
    return _drop(parts, lambda p: not (p.part == "join" and p.block == block))


def _missing_header(spec: TraceSpec, grammar: str, where: int, ws: Whitespace) -> str:
    parts = pieces(spec, grammar, ws)
    block = _block_number(spec, where)
    return _drop(parts, lambda p: not (p.part in ("header", "item") and p.block == block))


def _missing_branches(spec: TraceSpec, grammar: str, where: int, ws: Whitespace) -> str:
    parts = pieces(spec, grammar, ws)
    block = _block_number(spec, where)
    inside = [i for i, p in enumerate(parts) if p.part == "branch" and p.block == block]
    return _text(parts[: inside[0]] + parts[inside[-1] + 1 :])


def _unclosed_tag(spec: TraceSpec, grammar: str, where: int, ws: Whitespace) -> str:
    parts = pieces(spec, grammar, ws)
    closes = [
        i
        for i, p in enumerate(parts)
        if p.role == "tag" and p.closing and p.part in ("item", "branch")
    ]
    target = _pick(closes, where)
    return _text(parts[:target] + parts[target + 1 :])


def _unexpected_join(spec: TraceSpec, grammar: str, where: int, ws: Whitespace) -> str:
    parts = pieces(spec, grammar, ws)
    ends = [i for i, p in enumerate(parts) if p.role == "tag" and p.closing and p.part == "join"]
    target = _pick(ends, where)
    join = TAGS[grammar].join
    extra = Piece(f"\n<{join}>\nagain\n</{join}>", "body")
    return _text(parts[: target + 1] + [extra] + parts[target + 1 :])


def _too_deep(spec: TraceSpec, grammar: str, where: int, ws: Whitespace) -> str:
    """A step of a top-level block holding a chain of blocks nested one level past the parser's
    limit (``npr_graph.parse.MAX_DEPTH``)."""
    from .parse import MAX_DEPTH

    block, index = _pick([(b, i) for b in spec.blocks for i in range(len(b.steps))], where)
    inner = BlockSpec(["deepest"], ["deepest step"], "deepest")
    for _ in range(MAX_DEPTH - 1):  # with the top-level block's depth 0: one level too deep
        inner = BlockSpec(["deeper"], [["deeper step", inner, ""]], "deeper")
    block.steps[index] = ["too deep", inner, ""]
    return render(spec, grammar, ws)


def _missing_wrapper(spec: TraceSpec, grammar: str, where: int, ws: Whitespace) -> str:
    parts = pieces(spec, grammar, ws)
    top = [n for n, block in enumerate(walk(spec)) if any(block is b for b in spec.blocks)]
    block = _pick(top, where)
    return _drop(parts, lambda p: not (p.part == "wrapper" and p.block == block))


_ALL = [
    Mutation("plan_numbering", _plan_numbering),
    Mutation("step_numbering", _step_numbering),
    Mutation("branch_count", _branch_count),
    Mutation("no_plans", _no_plans),
    Mutation("too_many_branches", _too_many_branches),
    Mutation("nesting", _nesting, grammars=("npr",)),
    Mutation("tag_in_content", _tag_in_content),
    Mutation("empty_content", _empty_content),
    Mutation("stray_text", _stray_text),
    Mutation("missing_answer", _answer(lambda a: a.replace("\\boxed", ""))),
    Mutation("multiple_answers", _answer(lambda a: f"{a} or \\boxed{{other}}")),
    Mutation("empty_answer", _answer(lambda a: _BOXED.sub(r"\\boxed{ }", a))),
    Mutation("missing_join", _missing_join),
    Mutation("missing_header", _missing_header),
    Mutation("missing_branches", _missing_branches),
    Mutation("unclosed_tag", _unclosed_tag),
    Mutation("unmatched_close_tag", _unmatched_close_tag),
    Mutation("unexpected_join", _unexpected_join),
    Mutation("missing_wrapper", _missing_wrapper, grammars=("multiverse",)),
    Mutation("too_deep", _too_deep, grammars=("multiverse",)),
]
MUTATIONS: dict[str, Mutation] = {m.name: m for m in _ALL}


def mutation_rules(grammar: str = "npr") -> list[str]:
    """The rule codes :func:`mutations` can break in ``grammar`` traces."""
    _tags(grammar)
    return [name for name, m in MUTATIONS.items() if grammar in m.grammars]


def mutations(
    grammar: str = "npr", rules: list[str] | None = None
) -> st.SearchStrategy[tuple[str, str]]:
    """``(text, rule)``: a valid trace with exactly the rule ``rule`` broken, once or more;
    ``rule`` is drawn from ``rules`` (default: every rule of :func:`mutation_rules`)."""
    available = mutation_rules(grammar)
    chosen = available if rules is None else list(rules)
    unknown = [rule for rule in chosen if rule not in available]
    if unknown or not chosen:
        raise ValueError(
            f"rules must name some of the {grammar} mutations ({', '.join(available)}), "
            f"got {rules!r}"
        )
    return _mutations(grammar, tuple(chosen))


@st.composite
def _mutations(draw: st.DrawFn, grammar: str, rules: tuple[str, ...]) -> tuple[str, str]:
    rule = draw(st.sampled_from(rules))
    spec = draw(specs(grammar, max_blocks=2, max_branches=3, max_depth=1))
    where = draw(st.integers(0, 1 << 16))
    return MUTATIONS[rule](spec, grammar, where, draw(whitespaces())), rule


# -- tokenized graphs ---------------------------------------------------------------------------
@dataclass
class TokenizedTrace:
    """A drawn trace and its graph, parsed from token ids (prompt tokens first, if any)."""

    spec: TraceSpec
    grammar: str
    prompt: str
    text: str
    tokenizer: CharTokenizer
    graph: ReasoningGraph


def tokenize(
    spec: TraceSpec,
    grammar: str = "npr",
    prompt: str = "",
    whitespace: Whitespace | None = None,
    special_tags: bool = True,
    lenient: bool = False,
) -> TokenizedTrace:
    """Render ``spec`` and parse it from :class:`CharTokenizer` ids."""
    tokenizer = CharTokenizer(special_tags=special_tags)
    text = render(spec, grammar, whitespace)
    graph = parse(
        tokenizer.encode(text),
        grammar=grammar,
        tokenizer=tokenizer,
        prompt_ids=tokenizer.encode(prompt) if prompt else None,
        lenient=lenient,
    )
    return TokenizedTrace(spec, grammar, prompt, text, tokenizer, graph)


@st.composite
def graph_shapes(
    draw: st.DrawFn,
    grammar: str | None = None,
    prompt: bool | None = None,
    special_tags: bool | None = True,
    max_blocks: int = 2,
    max_branches: int = 3,
    max_depth: int = 1,
) -> TokenizedTrace:
    """Valid traces with their tokenized graphs. ``None`` for ``grammar``, ``prompt`` or
    ``special_tags`` draws it (a prompt is non-empty arbitrary text)."""
    grammar = grammar or draw(st.sampled_from(GRAMMARS))
    with_prompt = draw(st.booleans()) if prompt is None else prompt
    tags = draw(st.booleans()) if special_tags is None else special_tags
    spec = draw(specs(grammar, max_blocks, max_branches, max_depth))
    prompt_text = draw(st.text(min_size=1, max_size=12)) if with_prompt else ""
    return tokenize(spec, grammar, prompt_text, draw(whitespaces()), tags)


def tokenized_graphs(
    grammar: str | None = None, prompt: bool | None = None, special_tags: bool | None = True
) -> st.SearchStrategy[ReasoningGraph]:
    """Tokenized graphs of valid traces (see :func:`graph_shapes`)."""
    return graph_shapes(grammar, prompt, special_tags).map(lambda shape: shape.graph)
