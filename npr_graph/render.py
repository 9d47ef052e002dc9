"""Views of a :class:`ReasoningGraph`: Graphviz DOT (and SVG through ``dot``), Mermaid, rich trees.

Every view shows one vertex per node and one edge per parent relation; blocks become clusters
(subgraphs), nested inside the cluster of the block whose branch holds them. Node text is reduced
to a one-line snippet with control characters removed, then escaped for the target syntax, so any
trace yields a valid document. Nodes that violations point at are drawn in red.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from functools import partial

from rich.console import Console
from rich.text import Text
from rich.tree import Tree

from .constraints import BOX_OPENER
from .graph import Block, Node, NodeKind, ReasoningGraph, Violation
from .parse import LABEL

RED = "#d62728"
DOT_TIMEOUT_S = 30.0
MAX_INDENT = 40
# Block nesting shown by to_tree: each level indents the tree by 8 columns, and a console drops
# tree levels that its width cannot indent.
TREE_MAX_DEPTH = 6

_FILL = {
    NodeKind.PROMPT: "#eeeeee",
    NodeKind.TEXT: "#ffffff",
    NodeKind.ANSWER: "#d9f2d9",
    NodeKind.GUIDELINE: "#dde8f7",
    NodeKind.PLAN: "#eef3fb",
    NodeKind.STEP: "#fff4d6",
    NodeKind.TAKEAWAY: "#e6dcf5",
    NodeKind.PARALLEL: "#e8e8e8",
    NodeKind.GOAL: "#dde8f7",
    NodeKind.OUTLINE: "#eef3fb",
    NodeKind.PATH: "#fff4d6",
    NodeKind.CONCLUSION: "#e6dcf5",
}

_DOT_ESCAPES = str.maketrans(
    {"\\": "\\\\", '"': '\\"', "&": "&amp;", "<": "&lt;", ">": "&gt;", "\n": " "}
)
_MERMAID_ESCAPES = str.maketrans(
    {
        "#": "#35;",
        '"': "#quot;",
        "&": "#amp;",
        "<": "#lt;",
        ">": "#gt;",
        "`": "#96;",
        "%": "#37;",
        "\n": " ",
    }
)
_XML_INVALID = {"\ufffe", "\uffff"}


# -- shared helpers -----------------------------------------------------------------------------
def printable(text: str) -> str:
    """One line of printable text: whitespace runs collapsed, control characters dropped."""
    text = " ".join(text.split())
    return "".join(
        c for c in text if c not in _XML_INVALID and unicodedata.category(c) not in ("Cc", "Cs")
    )


def shorten(text: str, max_len: int) -> str:
    """``text`` on one line, cut to at most ``max_len`` characters with a trailing ellipsis."""
    text = printable(text)
    if len(text) <= max_len:
        return text
    if max_len <= 1:
        return "…"[:max_len]
    return text[: max_len - 1].rstrip() + "…"


def snippet(node: Node, max_len: int) -> str:
    """A short, single-line excerpt of the node's content (its label number removed); an answer
    too long to show whole keeps its last box (``\\boxed{}``, ``\\fbox{}``, ``\\boxed 5``)."""
    content = node.content
    match = LABEL.match(content) if node.label else None
    if match:
        content = content[match.end() :]
    if node.kind is NodeKind.ANSWER and len(printable(content)) > max_len:
        openers = list(BOX_OPENER.finditer(content))
        if openers:
            content = "… " + content[openers[-1].start() :]
    return shorten(content, max_len)


def _branch_name(graph: ReasoningGraph, block: Block, branch: int) -> str:
    ids = block.branches[branch]
    kind = graph.nodes[ids[0]].kind.value if ids else "branch"
    label = graph.nodes[ids[0]].label if ids else None
    return f"{kind} {label}" if label else f"{kind} #{branch + 1}"


def titles(graph: ReasoningGraph) -> list[str]:
    """Per node: its kind, stated number and segment part, e.g. ``plan 2``, ``guideline close``.

    Later segments of a branch are titled after the branch's first segment (``path 2 (cont.)``).
    """
    head = {i: ids[0] for block in graph.blocks for ids in block.branches for i in ids}
    out = []
    for node in graph.nodes:
        words = [node.kind.value]
        if node.label:
            words.append(node.label)
        elif head.get(node.id, node.id) != node.id:
            inherited = graph.nodes[head[node.id]].label
            words.append(f"{inherited} (cont.)" if inherited else "(cont.)")
        if node.part:
            words.append(node.part)
        out.append(" ".join(words))
    return out


def violations_by_node(
    graph: ReasoningGraph, violations: Iterable[Violation] | None = None
) -> dict[int, list[Violation]]:
    """Violations grouped by the node they mark: ``violation.node`` when set, else the node
    whose span holds ``char_start`` (the last node for positions at or past the end)."""
    found = graph.violations if violations is None else violations
    out: dict[int, list[Violation]] = {}
    for violation in found:
        node_id = violation.node
        if node_id is None or not 0 <= node_id < len(graph.nodes):
            node_id = _node_at(graph, violation.char_start)
        out.setdefault(node_id, []).append(violation)
    return out


def _node_at(graph: ReasoningGraph, char: int) -> int:
    try:
        return graph.node_at_char(max(char, 0)).id
    except IndexError:
        return len(graph.nodes) - 1


def _block_children(graph: ReasoningGraph) -> dict[int | None, list[int]]:
    """Nested block indices per block index (None: the top level)."""
    out: dict[int | None, list[int]] = {}
    for block in graph.blocks:
        out.setdefault(block.parent[0] if block.parent else None, []).append(block.index)
    return out


def shown_blocks(graph: ReasoningGraph) -> list[int | None]:
    """Per node, the block a view draws it in: its own (``Node.block``), or a block nested
    deeper whose nodes surround it. Text between a block's tags that is not in its grammar
    (between ``</guideline>`` and the first ``<step>``, say: ``stray_text``) belongs to the
    scope around the block, and drawn there it would stand after the whole block."""
    nested = _block_children(graph)
    depth = _block_depths(nested)
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    for node in graph.nodes:  # each block's span of node ids, its nested blocks' included
        block = node.block
        while block is not None:
            first[block] = min(first.get(block, node.id), node.id)
            last[block] = max(last.get(block, node.id), node.id)
            parent = graph.blocks[block].parent
            block = parent[0] if parent is not None else None
    shown = [node.block for node in graph.nodes]
    for block in sorted(first, key=lambda b: depth.get(b, 0)):  # the innermost block wins
        for i in range(first[block], last[block] + 1):
            if shown[i] is None or depth.get(shown[i], 0) < depth.get(block, 0):
                shown[i] = block
    return shown


def nodes_by_block(
    graph: ReasoningGraph, shown: list[int | None] | None = None
) -> dict[int | None, list[int]]:
    """Node ids per block they are drawn in (``shown``, default :func:`shown_blocks`; None: the
    top level), in sequence order."""
    out: dict[int | None, list[int]] = {}
    for node_id, block in enumerate(shown if shown is not None else shown_blocks(graph)):
        out.setdefault(block, []).append(node_id)
    return out


def _deeper(indent: str) -> str:
    """The indent of a nested scope. Past ``MAX_INDENT`` it stops growing: DOT and Mermaid ignore
    indentation, and two more spaces per level would grow the output with depth squared."""
    return indent if len(indent) >= MAX_INDENT else indent + "  "


def block_title(graph: ReasoningGraph, block: Block) -> str:
    """``block 0 (width 2)``, with the item count added when it differs from the width."""
    items = len(block.items)
    if block.items and items != block.width:
        noun = graph.nodes[block.items[0]].kind.value + ("s" if items != 1 else "")
        return f"block {block.index} (width {block.width}, {items} {noun})"
    return f"block {block.index} (width {block.width})"


def _edges(graph: ReasoningGraph) -> list[tuple[int, int]]:
    return [(parent, node.id) for node in graph.nodes for parent in node.parents]


# -- Graphviz -----------------------------------------------------------------------------------
def dot_escape(text: str) -> str:
    """Text for a double-quoted DOT string (entities keep ``<``, ``>``, ``&`` literal)."""
    return text.translate(_DOT_ESCAPES)


def _dot_node(node: Node, title: str, max_label: int, marks: Sequence[Violation]) -> str:
    text = snippet(node, max_label)
    label = dot_escape(title) + (f"\\n{dot_escape(text)}" if text else "")
    attrs = [f'label="{label}"', f'fillcolor="{_FILL.get(node.kind, "#ffffff")}"']
    if marks:
        tooltip = "; ".join(f"{v.code}: {v.message}" for v in marks)
        attrs += [f'color="{RED}"', f'fontcolor="{RED}"', "penwidth=2"]
        attrs.append(f'tooltip="{dot_escape(shorten(tooltip, 300))}"')
    return f"n{node.id} [{', '.join(attrs)}];"


def _scope_lines(
    graph: ReasoningGraph,
    node_lines: dict[int, str],
    section: Callable[[int, str, str], tuple[list[str], str]],
    rank_branches: bool = False,
) -> list[str]:
    """Each block scope's node lines, then a section per nested block (``section(block, indent,
    inner)``: its opening lines and its closing line), top level first. With ``rank_branches``,
    a block's branch heads share a rank (DOT)."""
    nested, members = _block_children(graph), nodes_by_block(graph)
    lines: list[str] = []
    # An explicit stack rather than recursion: blocks may nest as deep as parse() allows (1024).
    # Entries are either a finished line or a (block, indent) scope still to lay out.
    stack: list[str | tuple[int | None, str]] = [(None, "  ")]
    while stack:
        entry = stack.pop()
        if isinstance(entry, str):
            lines.append(entry)
            continue
        block, indent = entry
        lines += [indent + node_lines[i] for i in members.get(block, [])]
        if rank_branches and block is not None:
            heads = [ids[0] for ids in graph.blocks[block].branches if ids]
            if len(heads) > 1:
                lines.append(f"{indent}{{rank=same; {' '.join(f'n{i};' for i in heads)}}}")
        pending: list[str | tuple[int | None, str]] = []
        inner = _deeper(indent)
        for child in nested.get(block, []):
            opening, closing = section(child, indent, inner)
            pending += [*opening, (child, inner), closing]
        stack += reversed(pending)
    return lines


def to_dot(
    graph: ReasoningGraph,
    *,
    max_label: int = 40,
    violations: Sequence[Violation] | None = None,
) -> str:
    """Graphviz DOT of the DAG: a box per node, a ``cluster_block_N`` per block, parent→child
    edges. ``violations`` defaults to the parser's; nodes they point at are red."""
    marks = violations_by_node(graph, violations)
    names = titles(graph)
    node_lines = {
        n.id: _dot_node(n, names[n.id], max_label, marks.get(n.id, ())) for n in graph.nodes
    }
    lines = [
        "digraph reasoning {",
        '  graph [rankdir=TB, fontname="Helvetica", fontsize=11];',
        '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10];',
        '  edge [color="#555555", arrowsize=0.7];',
    ]

    def section(block: int, indent: str, inner: str) -> tuple[list[str], str]:
        title = dot_escape(block_title(graph, graph.blocks[block]))
        return [
            f"{indent}subgraph cluster_block_{block} {{",
            f'{inner}label="{title}";',
            f'{inner}style="rounded,dashed"; color="#888888"; fontcolor="#555555";',
        ], f"{indent}}}"

    lines += _scope_lines(graph, node_lines, section, rank_branches=True)
    lines += [f"  n{a} -> n{b};" for a, b in _edges(graph)]
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_svg(
    graph: ReasoningGraph,
    *,
    max_label: int = 40,
    violations: Sequence[Violation] | None = None,
    timeout: float = DOT_TIMEOUT_S,
) -> str | None:
    """:func:`to_dot` rendered to SVG by the Graphviz ``dot`` binary; None when it is not on PATH.

    Raises RuntimeError when ``dot`` fails or runs past ``timeout`` seconds.
    """
    binary = shutil.which("dot")
    if binary is None:
        return None
    source = to_dot(graph, max_label=max_label, violations=violations)
    try:
        result = subprocess.run(
            [binary, "-Tsvg"],
            input=source.encode("utf-8"),
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as error:
        raise RuntimeError(f"dot did not finish within {timeout:g}s") from error
    if result.returncode != 0:
        message = result.stderr.decode("utf-8", "replace").strip()
        raise RuntimeError(f"dot failed with exit status {result.returncode}: {message}")
    return result.stdout.decode("utf-8", "replace")


# -- Mermaid ------------------------------------------------------------------------------------
def mermaid_escape(text: str) -> str:
    """Text for a double-quoted Mermaid label, with ``#name;`` entity codes for risky characters."""
    return text.translate(_MERMAID_ESCAPES)


def _mermaid_node(node: Node, title: str, max_label: int) -> str:
    text = snippet(node, max_label)
    label = mermaid_escape(title) + (f"<br/>{mermaid_escape(text)}" if text else "")
    return f'n{node.id}["{label}"]'


def to_mermaid(
    graph: ReasoningGraph,
    *,
    max_label: int = 40,
    violations: Sequence[Violation] | None = None,
) -> str:
    """A Mermaid ``flowchart TD``: a node per graph node, a ``block_N`` subgraph per block, and
    parent→child edges; nodes that ``violations`` (default: the parser's) point at get the
    ``violation`` class."""
    names = titles(graph)
    node_lines = {n.id: _mermaid_node(n, names[n.id], max_label) for n in graph.nodes}
    lines = ["flowchart TD"]

    def section(block: int, indent: str, inner: str) -> tuple[list[str], str]:
        title = mermaid_escape(block_title(graph, graph.blocks[block]))
        return [
            f'{indent}subgraph block_{block} ["{title}"]',
            f"{inner}direction TB",
        ], f"{indent}end"

    lines += _scope_lines(graph, node_lines, section)
    lines += [f"  n{a} --> n{b}" for a, b in _edges(graph)]
    marked = sorted(violations_by_node(graph, violations))
    if marked:
        lines.append(f"  classDef violation fill:#fde0e0,stroke:{RED},stroke-width:2px,color:{RED}")
        lines.append(f"  class {','.join(f'n{i}' for i in marked)} violation")
    return "\n".join(lines) + "\n"


# -- terminal tree ------------------------------------------------------------------------------
def _size(graph: ReasoningGraph, ids: Iterable[int]) -> int:
    nodes = [graph.nodes[i] for i in ids]
    if graph.tokenized:
        return sum(n.num_tokens for n in nodes)
    return sum(n.char_end - n.char_start for n in nodes)


def _size_text(graph: ReasoningGraph, ids: Iterable[int]) -> str:
    unit = "tok" if graph.tokenized else "ch"
    return f"[{_size(graph, ids)} {unit}]"


# One step of building the tree: it adds its own entry and returns the steps for that entry's
# children, in display order.
_Step = Callable[[], "list[_Step]"]


class _TreeBuilder:
    """Lays out nodes and blocks as rich tree branches, in sequence order; blocks nested deeper
    than ``max_depth`` are folded into one marker entry."""

    def __init__(
        self,
        graph: ReasoningGraph,
        violations: Sequence[Violation] | None,
        max_label: int,
        max_depth: int,
    ):
        self.graph = graph
        self.max_label = max_label
        self.max_depth = max_depth
        self.marks = violations_by_node(graph, violations)
        self.names = titles(graph)
        self.nested = _block_children(graph)
        self.depth = _block_depths(self.nested)
        self.shown = shown_blocks(graph)
        self.members = nodes_by_block(graph, self.shown)

    def build(self, tree: Tree, node_ids: Iterable[int], blocks: Iterable[int]) -> None:
        """Add nodes and blocks (with everything inside them) to ``tree``."""
        # Steps wait on an explicit stack instead of calling each other: blocks may nest as deep
        # as parse() allows (1024), past Python's recursion limit.
        stack = self.entries(tree, node_ids, blocks)[::-1]
        while stack:
            stack += reversed(stack.pop()())

    def label(self, title: str, ids: Sequence[int], text: str = "") -> Text:
        marks = [v for i in ids for v in self.marks.get(i, ())]
        out = Text(title, style="bold red" if marks else "bold", no_wrap=True, overflow="ellipsis")
        out.append(" " + _size_text(self.graph, ids), style="dim")
        for code in dict.fromkeys(v.code for v in marks):
            out.append(f" ! {code}", style="red")
        if text:
            out.append(": ")
            out.append(text)
        return out

    def leaf(self, tree: Tree, node_id: int) -> list[_Step]:
        node = self.graph.nodes[node_id]
        tree.add(self.label(self.names[node_id], [node_id], snippet(node, self.max_label)))
        return []

    def entries(self, tree: Tree, node_ids: Iterable[int], blocks: Iterable[int]) -> list[_Step]:
        """Steps adding nodes and nested blocks to ``tree``, ordered by where they start."""
        items: list[tuple[int, int, bool]] = [(i, i, False) for i in node_ids]
        for index in blocks:
            first = min(_block_nodes(self.graph.blocks[index]), default=len(self.graph.nodes))
            items.append((first, index, True))
        steps: list[_Step] = []
        for _, value, is_block in sorted(items):
            if not is_block:
                steps.append(partial(self.leaf, tree, value))
            elif self.depth[value] > self.max_depth:
                steps.append(partial(self.hidden, tree, value))
            else:
                steps.append(partial(self.block, tree, self.graph.blocks[value]))
        return steps

    def block(self, tree: Tree, block: Block) -> list[_Step]:
        ids = _block_nodes(block)
        nested = self.nested.get(block.index, [])
        all_ids = ids + [i for b in nested for i in _descendant_nodes(self.graph, b, self.nested)]
        # text of the scope around, between this block's tags: where it stands in the text
        listed = set(ids)
        strays = [i for i in self.members.get(block.index, []) if i not in listed]
        all_ids += strays
        branch = tree.add(self.label(block_title(self.graph, block), sorted(all_ids)))
        self.header(branch, block)
        first_branch = min((i for b in block.branches for i in b), default=len(self.graph.nodes))
        steps: list[_Step] = [
            partial(self.leaf, branch, node_id) for node_id in strays if node_id < first_branch
        ]
        steps += [
            partial(self.branch, branch, block, index, node_ids)
            for index, node_ids in enumerate(block.branches)
        ]
        if block.join is not None:
            steps.append(partial(self.leaf, branch, block.join))
        steps += [partial(self.leaf, branch, node_id) for node_id in block.close]
        steps += [partial(self.leaf, branch, i) for i in strays if i >= first_branch]
        return steps

    def hidden(self, tree: Tree, index: int) -> list[_Step]:
        """One entry standing for a block nested too deep to show and everything inside it."""
        blocks = _descendant_blocks(index, self.nested)
        ids = sorted(i for b in blocks for i in _block_nodes(self.graph.blocks[b]))
        levels = max(self.depth[b] for b in blocks) - self.depth[index] + 1
        title = f"… {_plural(levels, 'deeper level')} not shown"
        tree.add(self.label(title, ids))
        return []

    def header(self, tree: Tree, block: Block) -> None:
        if not block.header and not block.items:
            return
        containers = [i for i in block.header if self.graph.nodes[i].part]
        kinds = dict.fromkeys(self.graph.nodes[i].kind.value for i in containers)
        title = " + ".join(kinds) or "header"
        sub = tree.add(self.label(title, containers))
        for node_id in sorted(block.items + [i for i in block.header if i not in containers]):
            self.leaf(sub, node_id)

    def branch(self, tree: Tree, block: Block, index: int, node_ids: list[int]) -> list[_Step]:
        node_ids = [i for i in node_ids if self.shown[i] == block.index]  # not a nested block's
        nested = [
            b for b in self.nested.get(block.index, []) if self.graph.blocks[b].parent[1] == index
        ]
        if len(node_ids) == 1 and not nested:
            return self.leaf(tree, node_ids[0])
        inner = [i for b in nested for i in _descendant_nodes(self.graph, b, self.nested)]
        title = _branch_name(self.graph, block, index)
        sub = tree.add(self.label(title, sorted(node_ids + inner)))
        return self.entries(sub, node_ids, nested)


def _block_nodes(block: Block) -> list[int]:
    ids = block.header + block.items + [i for ids in block.branches for i in ids] + block.close
    return sorted(ids + ([block.join] if block.join is not None else []))


def _descendant_blocks(index: int, nested: dict[int | None, list[int]]) -> list[int]:
    """Block ``index`` and every block nested inside it, at any depth."""
    out: list[int] = []
    pending = [index]
    while pending:
        block = pending.pop()
        out.append(block)
        pending += nested.get(block, [])
    return out


def _descendant_nodes(
    graph: ReasoningGraph, index: int, nested: dict[int | None, list[int]]
) -> list[int]:
    return [i for b in _descendant_blocks(index, nested) for i in _block_nodes(graph.blocks[b])]


def block_depths(graph: ReasoningGraph) -> dict[int, int]:
    """Per block index, how deep it nests: 1 for a top-level block."""
    return _block_depths(_block_children(graph))


def descendant_blocks(graph: ReasoningGraph, index: int) -> list[int]:
    """Block ``index`` and every block nested inside it, at any depth."""
    return _descendant_blocks(index, _block_children(graph))


def _block_depths(nested: dict[int | None, list[int]]) -> dict[int, int]:
    """Per block index, how deep it nests: 1 for a top-level block."""
    depths: dict[int, int] = {}
    pending: list[tuple[int | None, int]] = [(None, 0)]
    while pending:
        parent, depth = pending.pop()
        for child in nested.get(parent, []):
            depths[child] = depth + 1
            pending.append((child, depth + 1))
    return depths


def to_tree(
    graph: ReasoningGraph,
    *,
    violations: Sequence[Violation] | None = None,
    max_label: int = 60,
    max_depth: int = TREE_MAX_DEPTH,
) -> Tree:
    """A rich tree: top-level text, prompt and answer nodes, and one branch per block holding its
    header (guideline and plans), its parallel branches (nested blocks inside them) and its join.
    Sizes are token counts when the graph is tokenized, character counts otherwise.

    Blocks nested more than ``max_depth`` levels deep are summed up in one "… N deeper levels
    not shown" entry each: a console silently drops tree levels its width cannot indent."""
    builder = _TreeBuilder(graph, violations, max_label, max_depth)
    count = sum(len(marks) for marks in builder.marks.values())
    root_label = Text(f"{graph.grammar} trace", style="bold")
    counts = [_plural(len(graph.nodes), "node"), _plural(len(graph.blocks), "block")]
    root_label.append(f" ({', '.join([*counts, _plural(count, 'violation')])}) ")
    root_label.append(_size_text(graph, range(len(graph.nodes))), style="dim")
    root = Tree(root_label)
    top = builder.members.get(None, [])
    builder.build(root, top, builder.nested.get(None, []))
    return root


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def tree_text(
    graph: ReasoningGraph,
    *,
    violations: Sequence[Violation] | None = None,
    max_label: int = 60,
    max_depth: int = TREE_MAX_DEPTH,
    width: int = 100,
) -> str:
    """:func:`to_tree` rendered as plain text (no color) at a fixed ``width``."""
    buffer = io.StringIO()
    console = Console(
        file=buffer,
        width=width,
        color_system=None,
        force_terminal=False,
        no_color=True,
        record=True,
        legacy_windows=False,
    )
    console.print(to_tree(graph, violations=violations, max_label=max_label, max_depth=max_depth))
    return console.export_text(styles=False)
