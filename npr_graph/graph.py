"""The reasoning DAG: typed nodes that partition a trace, and the blocks they form.

A ``ReasoningGraph`` is plain data. Its nodes tile the full sequence (prompt, then response) in
order, each a contiguous span of characters and, when tokenized, of tokens. A node's ``parents``
are the nodes whose end it depends on; every other relation (ancestors, visibility, positions)
is derived from them in :mod:`npr_graph.layout`.

Container tags are split into segments so that the partition stays contiguous: a guideline is an
``open`` segment (``<guideline>`` and the whitespace after it), its plans, and a ``close`` segment
(``</guideline>``), which is the node the steps fork from. A Multiverse ``<Path>`` holding a nested
block continues, after the nested block, in a further ``path`` segment of the same branch.
Whitespace between two nodes belongs to the earlier one.
"""

from __future__ import annotations

import copy
import json
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from enum import Enum
from itertools import pairwise
from typing import Any

import networkx as nx

from grammar import GRAMMARS

from .typecheck import type_problems

SCHEMA_VERSION = 1


class NodeKind(str, Enum):
    PROMPT = "prompt"
    TEXT = "text"
    ANSWER = "answer"
    # NPR
    GUIDELINE = "guideline"
    PLAN = "plan"
    STEP = "step"
    TAKEAWAY = "takeaway"
    # Multiverse
    PARALLEL = "parallel"
    GOAL = "goal"
    OUTLINE = "outline"
    PATH = "path"
    CONCLUSION = "conclusion"

    def __str__(self) -> str:
        return self.value


class FinishReason(str, Enum):
    """Why the engine ended a sample (``graph.metadata["finish_reason"]``)."""

    STOP = "stop"  # the model ended it (end of sequence)
    LENGTH = "length"  # its token budget (max_new_tokens on the critical path, or in all)
    CONTEXT = "context"  # the model's context
    KV_EXHAUSTED = "kv_exhausted"  # the KV pool could not hold it

    def __str__(self) -> str:
        return self.value


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _excerpt(text: str, width: int = 48) -> str:
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= width else flat[: width - 1] + "…")


@dataclass(repr=False)
class Node:
    """One segment of the trace.

    ``char_start``/``char_end`` index ``ReasoningGraph.text``; ``token_start``/``token_end`` index
    ``ReasoningGraph.token_ids`` (None when the graph is not tokenized). ``block`` is the index of
    the innermost block the node belongs to, ``branch`` its branch in that block (steps and paths),
    ``part`` is ``"open"``/``"close"`` for container segments and ``""`` otherwise. ``open_tag`` and
    ``close_tag`` are the character spans of the node's own tags, ``label`` the number a plan, step,
    outline or path states (``"2"``, ``"1.1"``).
    """

    id: int
    kind: NodeKind
    char_start: int
    char_end: int
    text: str
    parents: tuple[int, ...] = ()
    block: int | None = None
    branch: int | None = None
    part: str = ""
    depth: int = 0
    label: str | None = None
    open_tag: tuple[int, int] | None = None
    close_tag: tuple[int, int] | None = None
    token_start: int | None = None
    token_end: int | None = None

    @property
    def num_tokens(self) -> int:
        if self.token_start is None or self.token_end is None:
            raise ValueError("graph is not tokenized")
        return self.token_end - self.token_start

    def __repr__(self) -> str:
        """One line, the text shortened: ``<Node 5 step 1: block 0 branch 0, parents (4,),
        chars 431:601, '<step> 1: Multiples of 2 up to 60: floor(60/2) …'>``."""
        name = " ".join(str(part) for part in (self.kind.value, self.part, self.label) if part)
        where = [] if self.block is None else [f"block {self.block}"]
        where += [] if self.branch is None else [f"branch {self.branch}"]
        spans = [f"chars {self.char_start}:{self.char_end}"]
        if self.token_start is not None:
            spans.append(f"tokens {self.token_start}:{self.token_end}")
        fields = [" ".join(where)] if where else []
        fields += [f"parents {self.parents}", *spans, _excerpt(self.text)]
        return f"<Node {self.id} {name}: {', '.join(fields)}>"

    @property
    def content(self) -> str:
        """The text between the node's own tags (the whole text when it has none)."""
        start = self.open_tag[1] if self.open_tag else self.char_start
        end = self.close_tag[0] if self.close_tag else self.char_end
        return self.text[start - self.char_start : end - self.char_start]

    @property
    def body(self) -> str:
        """The content without its leading whitespace and the label it is numbered with (the
        ``2: `` of ``<step>2: ...``)."""
        content = self.content.lstrip()
        if self.label is not None and content.startswith(self.label):
            content = content[len(self.label) :].lstrip(" :.)")
        return content

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["kind"] = self.kind.value
        data["parents"] = list(self.parents)
        for key in ("open_tag", "close_tag"):
            if data[key] is not None:
                data[key] = list(data[key])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Node:
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in data.items() if k in known}
        values["kind"] = NodeKind(values["kind"])
        values["parents"] = tuple(values.get("parents", ()))
        for key in ("open_tag", "close_tag"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        return cls(**values)


@dataclass
class Block:
    """One fork/join unit: a header (guideline and plans), parallel branches, and a join.

    ``branches[b]`` lists the node ids of branch ``b`` in order (several when a Multiverse path
    holds nested blocks). ``parent`` is ``(block, branch)`` of the enclosing branch, or None.
    """

    index: int
    depth: int
    header: list[int] = field(default_factory=list)
    items: list[int] = field(default_factory=list)
    branches: list[list[int]] = field(default_factory=list)
    join: int | None = None
    close: list[int] = field(default_factory=list)
    parent: tuple[int, int] | None = None

    @property
    def width(self) -> int:
        return len(self.branches)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["parent"] = list(self.parent) if self.parent is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Block:
        values = copy.deepcopy(dict(data))
        if values.get("parent") is not None:
            values["parent"] = tuple(values["parent"])
        return cls(**values)


@dataclass
class Violation:
    """A broken format rule: ``code`` names the rule, the span points into the trace text."""

    code: str
    message: str
    char_start: int = 0
    char_end: int = 0
    node: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Violation:
        return cls(**data)


@dataclass(repr=False)
class ReasoningGraph:
    """A parsed trace: nodes in sequence order, blocks, and what the parser had to recover.

    ``text`` is the prompt text followed by the response text; ``response_start`` is where the
    response begins (0 without a prompt). When tokenized, ``token_ids`` holds the full sequence and
    ``token_offsets[i]`` the character where token ``i`` starts. Graphs sampled by the engine
    also carry, per token, the sampled ``logprobs`` (None for prompt tokens) and ``forced`` (True
    for engine-written tokens, which training never puts loss on).
    """

    text: str
    nodes: list[Node]
    blocks: list[Block]
    grammar: str = "npr"
    response_start: int = 0
    violations: list[Violation] = field(default_factory=list)
    token_ids: list[int] | None = None
    token_offsets: list[int] | None = None
    prompt_num_tokens: int = 0
    logprobs: list[float | None] | None = None
    forced: list[bool] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        """One line (a trace's text runs to thousands of characters): grammar, nodes, blocks
        and their widths, size, violations, and why the engine ended it."""
        widths = [len(block.branches) for block in self.blocks]
        size = f"{len(self.token_ids)} tokens" if self.tokenized else f"{len(self.text)} chars"
        fields = [_count(len(self.nodes), "node"), _count(len(self.blocks), "block")]
        fields += [f"widths {widths}"] if widths else []
        fields += [size, _count(len(self.violations), "violation")]
        if "finish_reason" in self.metadata:
            fields.append(f"finish {self.metadata['finish_reason']}")
        return f"<ReasoningGraph {self.grammar}: {', '.join(fields)}>"

    # -- navigation ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.nodes)

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def __getitem__(self, node_id: int) -> Node:
        return self.nodes[node_id]

    @property
    def tokenized(self) -> bool:
        return self.token_ids is not None

    @property
    def num_tokens(self) -> int:
        if self.token_ids is None:
            raise ValueError("graph is not tokenized: parse token ids or pass tokenizer=")
        return len(self.token_ids)

    @property
    def response_text(self) -> str:
        return self.text[self.response_start :]

    @property
    def prompt(self) -> Node | None:
        return self.nodes[0] if self.nodes and self.nodes[0].kind is NodeKind.PROMPT else None

    def response_nodes(self) -> list[Node]:
        return [n for n in self.nodes if n.kind is not NodeKind.PROMPT]

    def nodes_of(self, kind: NodeKind | str) -> list[Node]:
        kind = NodeKind(kind)
        return [n for n in self.nodes if n.kind is kind]

    def children(self) -> list[list[int]]:
        """``children()[i]``: ids of the nodes that list node ``i`` as a parent."""
        out: list[list[int]] = [[] for _ in self.nodes]
        for node in self.nodes:
            for parent in node.parents:
                out[parent].append(node.id)
        return out

    def node_at_char(self, char: int) -> Node:
        """The node whose span holds character ``char`` (the last node for the end of the text)."""
        if not 0 <= char <= len(self.text):
            raise IndexError(f"character {char} is outside the graph")
        # Nodes tile the text in order, so bisecting on char_start directly (no list of starts)
        # keeps one lookup O(log n); callers look up one position per violation.
        index = bisect_right(self.nodes, char, key=lambda node: node.char_start)
        return self.nodes[max(index - 1, 0)]

    def token_text(self, index: int) -> str:
        if self.token_offsets is None:
            raise ValueError("graph is not tokenized")
        return self.text[self.token_offsets[index] : self.token_offsets[index + 1]]

    # -- serialization ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data, sharing nothing with the graph (editing it leaves the graph
        alone); tokenized graphs also give each node its ``token_ids`` (and ``logprobs``/``forced``
        when sampled) and the dict its ``prompt_token_ids``."""
        nodes = [n.to_dict() for n in self.nodes]
        if self.token_ids is not None:
            for node, data in zip(self.nodes, nodes, strict=True):
                span = slice(node.token_start, node.token_end)
                data["token_ids"] = self.token_ids[span]
                if self.logprobs is not None:
                    data["logprobs"] = self.logprobs[span]
                if self.forced is not None:
                    data["forced"] = self.forced[span]
        return {
            "schema": SCHEMA_VERSION,
            "grammar": self.grammar,
            "text": self.text,
            "response_start": self.response_start,
            "prompt_num_tokens": self.prompt_num_tokens,
            "prompt_token_ids": self.token_ids[: self.prompt_num_tokens]
            if self.token_ids is not None
            else None,
            "nodes": nodes,
            "blocks": [b.to_dict() for b in self.blocks],
            "violations": [v.to_dict() for v in self.violations],
            "token_ids": _copied(self.token_ids),
            "token_offsets": _copied(self.token_offsets),
            "logprobs": _copied(self.logprobs),
            "forced": _copied(self.forced),
            "metadata": copy.deepcopy(self.metadata),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReasoningGraph:
        """The graph ``to_dict`` wrote; ValueError, saying what is wrong, for anything else."""
        if not isinstance(data, dict):
            raise ValueError(f"not a reasoning graph dict: a {type(data).__name__}")
        schema = data.get("schema", SCHEMA_VERSION)
        if schema != SCHEMA_VERSION:
            raise ValueError(f"unsupported graph schema {schema!r} (expected {SCHEMA_VERSION})")
        try:
            graph = cls(
                text=data["text"],
                nodes=[Node.from_dict(n) for n in data["nodes"]],
                blocks=[Block.from_dict(b) for b in data.get("blocks", [])],
                grammar=data.get("grammar", "npr"),
                response_start=data.get("response_start", 0),
                violations=[Violation.from_dict(v) for v in data.get("violations", [])],
                token_ids=_copied(data.get("token_ids")),
                token_offsets=_copied(data.get("token_offsets")),
                prompt_num_tokens=data.get("prompt_num_tokens", 0),
                logprobs=_copied(data.get("logprobs")),
                forced=_copied(data.get("forced")),
                metadata=copy.deepcopy(dict(data.get("metadata", {}))),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise ValueError(f"not a reasoning graph dict: {error!r}") from error
        problems = _type_problems(graph)
        if problems:
            raise ValueError(f"not a reasoning graph dict: {'; '.join(problems[:3])}")
        check_partition(graph)
        check_blocks(graph)
        check_spans(graph)
        return graph

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, **kwargs)

    @classmethod
    def from_json(cls, text: str) -> ReasoningGraph:
        return cls.from_dict(json.loads(text))

    def to_networkx(self) -> nx.DiGraph:
        """A DiGraph with one vertex per node (its fields as attributes) and parent→child edges."""
        graph = nx.DiGraph(**{k: v for k, v in self.to_dict().items() if k not in ("nodes",)})
        for node in self.nodes:
            graph.add_node(node.id, **node.to_dict())
        for node in self.nodes:
            for parent in node.parents:
                graph.add_edge(parent, node.id)
        return graph

    @classmethod
    def from_networkx(cls, graph: nx.DiGraph) -> ReasoningGraph:
        """Inverse of :meth:`to_networkx`; parents are read from the edges."""
        data = dict(graph.graph)
        nodes = []
        for node_id in sorted(graph.nodes):
            attrs = dict(graph.nodes[node_id])
            attrs["id"] = node_id
            attrs["parents"] = sorted(graph.predecessors(node_id))
            nodes.append(attrs)
        data["nodes"] = nodes
        return cls.from_dict(data)


def check_partition(graph: ReasoningGraph) -> None:
    """Raise ValueError unless the nodes tile the text (and tokens) in order with valid parents."""
    expected_char = 0
    expected_token = 0
    for index, node in enumerate(graph.nodes):
        if node.id != index:
            raise ValueError(f"node {index} has id {node.id}")
        if node.char_start != expected_char or node.char_end < node.char_start:
            raise ValueError(f"node {index} spans chars {node.char_start}:{node.char_end}")
        expected_char = node.char_end
        if any(not 0 <= p < index for p in node.parents):
            raise ValueError(f"node {index} has a parent that does not precede it: {node.parents}")
        if graph.token_ids is not None:
            if node.token_start != expected_token or node.token_end < node.token_start:
                raise ValueError(f"node {index} spans tokens {node.token_start}:{node.token_end}")
            expected_token = node.token_end
    if expected_char != len(graph.text):
        raise ValueError(f"nodes cover {expected_char} of {len(graph.text)} characters")
    if graph.token_ids is not None and expected_token != len(graph.token_ids):
        raise ValueError(f"nodes cover {expected_token} of {len(graph.token_ids)} tokens")


# the kinds of node a block's plans, branch heads and join may be, in either grammar
ITEM_KINDS = (NodeKind.PLAN, NodeKind.OUTLINE)
BRANCH_KINDS = (NodeKind.STEP, NodeKind.PATH)
JOIN_KINDS = (NodeKind.TAKEAWAY, NodeKind.CONCLUSION)


def check_blocks(graph: ReasoningGraph) -> None:
    """Raise ValueError unless every block names existing nodes of the right kinds (plans, branch
    heads, join), at least one and each once, no branch is empty (a branch holds at least its
    head), the nodes a block names are the nodes that name it (``Node.block``; ``Node.branch``
    for its branches' nodes, and for no other) and a nested block names an existing enclosing
    branch of a block before it."""
    nodes = graph.nodes
    named_by: dict[int, int] = {}
    for block in graph.blocks:
        if any(not branch for branch in block.branches):
            raise ValueError(f"block {block.index} has an empty branch")
        named = [*block.header, *block.items, *(i for b in block.branches for i in b), *block.close]
        if block.join is not None:
            named.append(block.join)
        if not (block.header or block.items or block.branches or block.join is not None):
            raise ValueError(f"block {block.index} names no header, plan, branch or join node")
        if any(not 0 <= i < len(nodes) for i in named):
            raise ValueError(f"block {block.index} names a node that does not exist")
        if len(set(named)) != len(named):
            raise ValueError(f"block {block.index} names a node twice")
        named_by.update(dict.fromkeys(named, block.index))
        branch_of = {i: k for k, branch in enumerate(block.branches) for i in branch}
        for i in named:
            if (nodes[i].block, nodes[i].branch) != (block.index, branch_of.get(i)):
                raise ValueError(
                    f"block {block.index} names node {i}, whose block and branch are "
                    f"{nodes[i].block} and {nodes[i].branch}"
                )
        for role, ids, kinds in (
            ("plan", block.items, ITEM_KINDS),
            ("branch head", [branch[0] for branch in block.branches], BRANCH_KINDS),
            ("join", [] if block.join is None else [block.join], JOIN_KINDS),
        ):
            wrong = next((i for i in ids if nodes[i].kind not in kinds), None)
            if wrong is not None:
                raise ValueError(
                    f"block {block.index} names node {wrong}, a {nodes[wrong].kind}, as a {role}"
                )
        if block.parent is not None:
            outer, branch = block.parent
            if not (0 <= outer < block.index and 0 <= branch < graph.blocks[outer].width):
                raise ValueError(
                    f"block {block.index} is nested in a branch that does not exist before it"
                )
    for node in nodes:
        if node.block is None and node.branch is not None:
            raise ValueError(f"node {node.id} has a branch but no block")
        if node.block is not None and named_by.get(node.id) != node.block:
            raise ValueError(f"node {node.id} is in block {node.block}, which does not name it")


def check_spans(graph: ReasoningGraph) -> None:
    """Raise ValueError unless the response start, the prompt's tokens, the token offsets, the
    nodes' tags and the violations' places lie within the text and tokens they index, and each
    node's text is the text it spans."""
    size = len(graph.text)
    if not 0 <= graph.response_start <= size:
        raise ValueError(f"response_start {graph.response_start} is outside the {size}-char text")
    tokens = 0 if graph.token_ids is None else len(graph.token_ids)
    if not 0 <= graph.prompt_num_tokens <= tokens:
        raise ValueError(f"prompt_num_tokens {graph.prompt_num_tokens} of {tokens} tokens")
    offsets = graph.token_offsets
    if offsets is not None and (
        offsets[0] != 0 or offsets[-1] != size or any(a > b for a, b in pairwise(offsets))
    ):
        raise ValueError("token_offsets must rise from 0 to the end of the text")
    for node in graph.nodes:
        if node.text != graph.text[node.char_start : node.char_end]:
            raise ValueError(f"node {node.id}'s text is not the text it spans")
        tags = [tag for tag in (node.open_tag, node.close_tag) if tag is not None]
        bounds = [node.char_start, *(i for tag in tags for i in tag), node.char_end]
        if bounds != sorted(bounds):  # each tag a pair of ints: the type check came first
            raise ValueError(f"node {node.id}'s tags do not lie in order within its span")
    for violation in graph.violations:
        if violation.node is not None and not 0 <= violation.node < len(graph.nodes):
            raise ValueError(f"a violation names node {violation.node}, which does not exist")
        if not 0 <= violation.char_start <= violation.char_end <= size:
            raise ValueError(
                f"a violation spans chars {violation.char_start}:{violation.char_end} "
                f"of a {size}-char text"
            )


def _type_problems(graph: ReasoningGraph) -> list[str]:
    """Fields of the wrong type, and per-token lists that do not match the token ids."""
    problems = [f"node {i}: {p}" for i, node in enumerate(graph.nodes) for p in type_problems(node)]
    problems += [f"block {i}: {p}" for i, b in enumerate(graph.blocks) for p in type_problems(b)]
    problems += [f"violation: {p}" for v in graph.violations for p in type_problems(v)]
    # logprobs are not held to be finite: a file another tool wrote may hold -Infinity
    problems += type_problems(graph, skip=("logprobs",))
    logprobs = graph.logprobs
    if logprobs is not None and not (
        isinstance(logprobs, list)
        and all(
            v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in logprobs
        )
    ):
        problems.append("logprobs must be a list of numbers or nulls")
    if graph.grammar not in GRAMMARS:
        problems.append(f"unknown grammar {graph.grammar!r}")
    problems += [
        f"block {i} has index {block.index}"
        for i, block in enumerate(graph.blocks)
        if block.index != i
    ]
    if graph.token_ids is not None:
        if graph.token_offsets is None:
            problems.append("token_ids come without token_offsets")
        if any(n.token_start is None or n.token_end is None for n in graph.nodes):
            problems.append("a node of a tokenized graph has no token span")
    if problems:
        return problems
    count = None if graph.token_ids is None else len(graph.token_ids)
    # token_offsets ends with the end of the text
    for name, extra in (("token_offsets", 1), ("logprobs", 0), ("forced", 0)):
        value = getattr(graph, name)
        if value is not None and (count is None or len(value) != count + extra):
            problems.append(f"{name} does not match the token ids")
    return problems


def node_of_token(graph: ReasoningGraph) -> list[int]:
    """``node_of_token(g)[t]``: the id of the node token ``t`` belongs to."""
    out: list[int] = []
    for node in graph.nodes:
        out.extend([node.id] * node.num_tokens)
    return out


def _copied(values: Any) -> Any:
    """A list as a new list (a dict and its graph share no list); anything else as it is."""
    return list(values) if isinstance(values, list) else values


def ancestors(graph: ReasoningGraph) -> list[int]:
    """Ancestor sets as bitsets: bit ``j`` of ``ancestors(g)[i]`` is set iff ``j`` is an ancestor.

    Computed from the nodes' ``parents`` on every call (a cache went stale when a user edited
    them, and the mask then disagreed with the positions)."""
    result: list[int] = []
    for node in graph.nodes:
        bits = 0
        for parent in node.parents:
            bits |= result[parent] | (1 << parent)
        result.append(bits)
    return result


def is_ancestor(graph: ReasoningGraph, ancestor: int, node: int) -> bool:
    return bool(ancestors(graph)[node] >> ancestor & 1)
