"""Format rules over a parsed trace, grouped into profiles.

``validate`` never raises on model output: it parses leniently, keeps the parser's repairs as
violations, and adds the rules of the chosen profile. ``strict`` holds every rule; ``lenient``
only those that change the DAG a trace describes (broken or missing structure, branch counts),
which is what matters when executing or training on cold-start outputs.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from dataclasses import dataclass, field, replace

from .format import format_score
from .graph import Block, Node, NodeKind, ReasoningGraph, Violation
from .parse import dialect, parse
from .typecheck import check_at_least

RULES: dict[str, str] = {
    # found while parsing (the lenient parser's repairs)
    "unclosed_tag": "every opened tag is closed",
    "unmatched_close_tag": "every closing tag closes an open tag",
    "tag_in_content": "no format tag inside the content of another element",
    "too_deep": "blocks nest at most 32 levels",
    "missing_header": "branches follow a guideline (a Goal)",
    "missing_wrapper": "Multiverse blocks sit inside <Parallel>",
    "missing_join": "every block ends with a takeaway (a Conclusion)",
    "missing_branches": "every guideline is followed by steps",
    "unexpected_join": "a takeaway follows the steps of a block",
    # structure
    "branch_count": "#steps == #plans",
    "no_plans": "a guideline holds at least one plan",
    "too_many_branches": "#plans <= max_branches",
    "nesting": "NPR blocks do not nest",
    # style
    "plan_numbering": "plans are numbered 1..n in order",
    "step_numbering": "steps are numbered 1..n in order, like their plans",
    "empty_content": "plans, steps and takeaways are not empty",
    "stray_text": "no text between blocks or between a block's parts",
    "missing_answer": "the final conclusion holds a \\boxed{} answer",
    "multiple_answers": "the final conclusion holds exactly one \\boxed{}",
    "empty_answer": "the \\boxed{} answer is not empty",
}

STRUCTURAL = frozenset(
    {
        "unclosed_tag",
        "unmatched_close_tag",
        "too_deep",
        "missing_header",
        "missing_wrapper",
        "missing_join",
        "missing_branches",
        "unexpected_join",
        "branch_count",
        "no_plans",
        "too_many_branches",
        "nesting",
    }
)


@dataclass(frozen=True)
class Profile:
    name: str
    rules: frozenset[str] = field(default_factory=lambda: frozenset(RULES))
    max_branches: int = 5

    def __post_init__(self) -> None:
        unknown = sorted(set(self.rules) - set(RULES))
        if unknown:
            raise ValueError(f"unknown rule(s) {', '.join(unknown)}; rules are {', '.join(RULES)}")
        check_at_least("max_branches", self.max_branches, 1)


PROFILES = {"strict": Profile("strict"), "lenient": Profile("lenient", STRUCTURAL)}


def get_profile(profile: str | Profile, max_branches: int | None = None) -> Profile:
    if not isinstance(profile, (str, Profile)):
        raise TypeError(f"profile must be a name or a Profile, got {type(profile).__name__}")
    if isinstance(profile, str):
        if profile not in PROFILES:
            raise ValueError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
        profile = PROFILES[profile]
    if max_branches is not None:
        profile = Profile(profile.name, profile.rules, max_branches)
    return profile


def validate(
    text_or_graph: str | ReasoningGraph,
    profile: str | Profile = "strict",
    *,
    grammar: str = "npr",
    max_branches: int | None = None,
) -> list[Violation]:
    """Violations of ``profile``'s rules, in text order; empty when the trace is well formed."""
    rules = get_profile(profile, max_branches)
    if isinstance(text_or_graph, ReasoningGraph):
        graph = text_or_graph
    elif isinstance(text_or_graph, str):
        graph = parse(text_or_graph, grammar=grammar, lenient=True)
    else:
        raise TypeError(
            f"validate takes trace text or a ReasoningGraph, got {type(text_or_graph).__name__}"
        )
    # Copies: attributing a parser repair to its node below must not edit the graph.
    found = [replace(violation) for violation in graph.violations]
    found += _block_rules(graph, rules.max_branches)
    found += _text_rules(graph)
    found += _answer_rules(graph)
    kept = [v for v in found if v.code in rules.rules]
    starts = [node.char_start for node in graph.nodes]
    for violation in kept:
        if violation.node is None and starts:
            violation.node = max(bisect_right(starts, violation.char_start) - 1, 0)
    return sorted(kept, key=lambda v: (v.char_start, v.char_end, v.code))


def format_valid(graph: ReasoningGraph) -> bool:
    """Whether ``graph``'s response passes its format: NPR, the NPR release's check
    (:func:`~npr_graph.format.format_score` is 0); Multiverse, at least one block and no
    violation of the strict profile."""
    if not isinstance(graph, ReasoningGraph):
        raise TypeError(f"format_valid takes a ReasoningGraph, got {type(graph).__name__}")
    if graph.grammar == "npr":
        return format_score(graph.response_text) == 0.0
    return bool(graph.blocks) and not validate(graph, "strict")


def _violation(code: str, message: str, node: Node) -> Violation:
    return Violation(code, message, node.char_start, node.char_end, node.id)


def _label_tail(label: str | None) -> str | None:
    return label.rsplit(".", 1)[-1] if label else None


def _block_rules(graph: ReasoningGraph, max_branches: int) -> list[Violation]:
    spec = dialect(graph.grammar)
    nodes = graph.nodes
    out: list[Violation] = []
    nesting = {block.parent for block in graph.blocks if block.parent is not None}
    for index, block in enumerate(graph.blocks):
        first = nodes[
            (block.header or block.items or [b[0] for b in block.branches] or [block.join])[0]
        ]
        plans = [nodes[i] for i in block.items]
        heads = [nodes[branch[0]] for branch in block.branches if branch]
        if not spec.nesting and block.depth > 0:
            out.append(_violation("nesting", f"{spec.header} nested inside a {spec.branch}", first))
        has_header = any(nodes[i].kind.value == spec.header for i in block.header)
        if not has_header and not heads:
            # An empty <Parallel>: the parser notes a header without branches, not this.
            out.append(
                _violation(
                    "missing_branches",
                    f"<{spec.wrapper or spec.header}> holds no <{spec.branch}>",
                    first,
                )
            )
        if has_header and not plans:
            out.append(_violation("no_plans", f"<{spec.header}> holds no <{spec.item}>", first))
        if len(plans) > max_branches:
            out.append(
                _violation(
                    "too_many_branches", f"{len(plans)} plans, more than {max_branches}", first
                )
            )
        if plans and heads and len(plans) != len(heads):
            out.append(
                _violation(
                    "branch_count",
                    f"{len(heads)} {spec.branch}s for {len(plans)} {spec.item}s",
                    heads[0],
                )
            )
        out += _numbering(graph, block, plans, heads)
        # A branch is its segments and the blocks nested in it: one holding only a nested block
        # (``<Path>1: <Parallel>…``) is not empty.
        empty_branches = [
            nodes[branch[0]]
            for b, branch in enumerate(block.branches)
            if branch
            and (index, b) not in nesting
            and all(_is_empty(nodes[i]) for i in branch if nodes[i].block == index)
        ]
        join = [nodes[block.join]] if block.join is not None else []
        for node in [*plans, *empty_branches, *join]:
            if _is_empty(node):
                out.append(_violation("empty_content", f"empty <{node.kind.value}>", node))
    return out


def _numbering(
    graph: ReasoningGraph, block: Block, plans: list[Node], heads: list[Node]
) -> list[Violation]:
    """Plans and steps are numbered 1..n; a nested block's numbers extend its branch's (``1.2``)."""
    prefix = ""
    if block.parent is not None:
        parent_head = graph.nodes[graph.blocks[block.parent[0]].branches[block.parent[1]][0]]
        prefix = f"{parent_head.label}." if parent_head.label else ""
    out = []
    for code, nodes in (("plan_numbering", plans), ("step_numbering", heads)):
        for index, node in enumerate(nodes, start=1):
            expected = f"{prefix}{index}"
            # Under an unlabelled branch only the last component can be checked.
            loose = block.depth > 0 and not prefix and _label_tail(node.label) == str(index)
            if node.label != expected and not loose:
                message = (
                    f"{node.kind.value} {index} is labelled {node.label!r}, expected {expected!r}"
                )
                out.append(_violation(code, message, node))
    return out


def _is_empty(node: Node) -> bool:
    return not node.body.strip()


def _text_rules(graph: ReasoningGraph) -> list[Violation]:
    """Text outside the elements is allowed before the first block and after the last."""
    nodes = graph.nodes
    in_block = [n.block is not None for n in nodes]
    first = in_block.index(True) if any(in_block) else len(nodes)
    last = len(nodes) - 1 - in_block[::-1].index(True) if any(in_block) else -1
    out = []
    for node in nodes:
        if (
            node.kind is NodeKind.TEXT
            and node.text.strip()
            and (node.block is not None or first < node.id < last)
        ):
            out.append(
                _violation(
                    "stray_text",
                    f"text outside the format's elements: {node.text.strip()[:40]!r}",
                    node,
                )
            )
    return out


BOX_OPENER = re.compile(
    r"(?P<brace>\\(?:boxed|fbox)(?![A-Za-z])\s*\{)"
    r"|(?P<cut>\\(?:boxed|fbox)(?=\s*\Z))"
    r"|(?P<token>\\(?:boxed|fbox)(?:\s+|(?=[^\s{}$A-Za-z.,;:)\]])))"
)
"""Where a box starts, as :func:`boxed_answers` reads it: ``\\boxed{`` or ``\\fbox{``
(whitespace, line breaks included, may come before the brace); either name and whitespace, or
right before a digit, a sign or a macro, whose content is one token (``\\boxed 5``, as the MATH
grader's ``last_boxed_only_string`` reads it, ``\\boxed5``, ``\\boxed\\frac{1}{2}``: a box the
grader would not read still ends the search, so an earlier, abandoned box is never the answer);
or either name with nothing but whitespace after it, a box cut off before its content."""
_SCAN = re.compile(BOX_OPENER.pattern + r"|\{|\}")
# What may end a spaced box's token: outside braces whitespace, "$" or an unmatched "}" ends it.
_TOKEN_OUTSIDE = re.compile(r"[\s${}]")
_TOKEN_INSIDE = re.compile(r"[{}]")


def _token_end(text: str, pos: int) -> int | None:
    """Where the token of a spaced box starting at ``pos`` ends (it runs up to whitespace, ``$``,
    an unmatched ``}`` or the end of the text; inside braces up to the matching ``}``), or None
    when the text ends inside one of its braces (a cut box)."""
    depth = 0
    while True:
        match = (_TOKEN_INSIDE if depth else _TOKEN_OUTSIDE).search(text, pos)
        if match is None:
            return None if depth else len(text)
        char = match.group()
        if char == "{":
            depth += 1
        elif char == "}" and depth:
            depth -= 1
        else:  # whitespace, "$" or an unmatched "}" outside the token's braces
            return match.start()
        pos = match.end()


def _scan_boxes(text: str) -> list[tuple[int, str | None]]:
    """(where the opener starts, content) of every box in ``text``, in order of their openers;
    the content is None for a box that is never closed (cut off). A braced box's content runs to
    its matching brace and may hold boxes of its own; a spaced box's token is read as it is (a
    box inside it is not one of its own). One pass, so hostile input stays linear."""
    found: list[tuple[int, str | None]] = []
    open_braces: list[tuple[int, int]] = []  # (opener start, content start) of a box brace, or
    # (-1, -1) for any other brace
    pos = 0
    while (match := _SCAN.search(text, pos)) is not None:
        pos = match.end()
        if match["brace"]:
            open_braces.append((match.start(), match.end()))
        elif match["cut"]:
            found.append((match.start(), None))
        elif match["token"]:
            end = _token_end(text, pos)
            found.append((match.start(), None if end is None else text[pos:end]))
            if end is None:  # the rest of the text is inside the cut token
                break
            pos = end
        elif match.group() == "{":
            open_braces.append((-1, -1))
        elif open_braces:  # "}"
            start, content_start = open_braces.pop()
            if start >= 0:
                found.append((start, text[content_start : match.start()]))
    found += [(start, None) for start, _ in open_braces if start >= 0]
    return sorted(found, key=lambda box: box[0])


def boxed_answers(text: str) -> list[str]:
    """Contents of every box in ``text`` (``\\boxed{...}``, ``\\fbox{...}``, ``\\boxed 5``; see
    :data:`BOX_OPENER`), in order (balanced braces; an unclosed one is dropped)."""
    return [content for _, content in _scan_boxes(text) if content is not None]


def last_box(text: str) -> str | None:
    """The content of the last box in ``text`` (the one whose opener comes last), or None when
    there is none or it is never closed: a cut last box is no answer, not the box before it."""
    boxes = _scan_boxes(text)
    return boxes[-1][1] if boxes else None


def final_text(graph: ReasoningGraph) -> Node | None:
    """The conclusion after the last block (the last node, when it is free text or an answer)."""
    last = graph.nodes[-1] if graph.nodes else None
    if last is None or last.kind not in (NodeKind.ANSWER, NodeKind.TEXT) or last.block is not None:
        return None
    return last


def _answer_rules(graph: ReasoningGraph) -> list[Violation]:
    final = final_text(graph)
    if final is None:
        end = len(graph.text)
        return [
            Violation("missing_answer", "no final conclusion after the last block", end, end, None)
        ]
    boxes = _scan_boxes(final.text)
    if not boxes:
        return [_violation("missing_answer", "the final conclusion has no \\boxed{} answer", final)]
    if boxes[-1][1] is None:  # what extract_answer reads: a cut last box is no answer
        return [_violation("missing_answer", "the last \\boxed{} answer is never closed", final)]
    answers = [content for _, content in boxes if content is not None]
    out = []
    if len(answers) > 1:
        out.append(_violation("multiple_answers", f"{len(answers)} \\boxed{{}} answers", final))
    if any(not a.strip() for a in answers):
        out.append(_violation("empty_answer", "empty \\boxed{}", final))
    return out
