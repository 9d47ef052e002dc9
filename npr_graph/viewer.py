"""``npr view``: one self-contained HTML page showing sampled reasoning DAGs.

The page (template ``npr_graph/data/viewer.html``: inline CSS and JavaScript, no network fetch)
lists the samples with filters (all, correct, incorrect, invalid format) and draws the selected
one: blocks with their branches side by side, parent edges, the critical path in bold, nodes with
violations in red; clicking a node shows its full text. Per-sample metrics are listed beside it.
Training rollouts (``npr train``'s ``rollouts.jsonl``) also show the advantage of each node.

Everything the page needs is computed here, in Python, and embedded as JSON: the nesting of
nodes into blocks and branches (:func:`layout_tree`), the critical path (:func:`critical_path`),
strict violations. The JavaScript only builds DOM from it (node text always through
``textContent``, so trace text cannot inject markup).

Input lines may be ``npr eval`` samples or ``npr train`` rollouts (a ``graph`` field), graph dicts
(``nodes``), or records with a ``text``/``response`` field (parsed leniently, grammar detected
from the tags).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Collection
from importlib.resources import files
from pathlib import Path
from typing import Any

from .graph import ReasoningGraph
from .render import block_depths, descendant_blocks, nodes_by_block, shown_blocks

TEXT_FIELDS = ("text", "response", "output", "completion")
# what npr train's rollouts.jsonl adds to an eval sample's fields
TRAINING_FIELDS = ("step", "trained", "left_out", "advantage")
PLACEHOLDER = "__NPR_VIEWER_DATA__"
#: Node text beyond this is cut in the page (the detail panel says so); keeps pages loadable.
MAX_NODE_CHARS = 20_000


def _lengths(graph: ReasoningGraph) -> list[int]:
    if graph.tokenized:
        return [node.num_tokens for node in graph.nodes]
    return [node.char_end - node.char_start for node in graph.nodes]


def critical_path(graph: ReasoningGraph) -> list[int]:
    """Node ids of the longest dependency chain, in order: from the node that ends last, back
    through the parent each node's start comes from (its latest-ending parent)."""
    from .layout import node_starts

    if not graph.nodes:
        return []
    lengths = _lengths(graph)
    starts = node_starts(graph, lengths)
    ends = [start + length for start, length in zip(starts, lengths, strict=True)]
    node = max(range(len(ends)), key=lambda i: (ends[i], i))
    path = [node]
    while graph.nodes[node].parents:
        node = max(graph.nodes[node].parents, key=lambda p: (ends[p], p))
        path.append(node)
    return path[::-1]


VIEW_MAX_DEPTH = 64


def layout_tree(graph: ReasoningGraph) -> list[dict[str, Any]]:
    """The response as nested items: ``{"node": id}`` or ``{"block": index, "header": [...],
    "branches": [[...], ...], "footer": [...]}``, each list holding items in text order.

    A node belongs to its innermost block: to the header (guideline and plans, or goal and
    outlines), to a branch (steps, paths; a nested block sits in the branch holding it), or to
    the footer (takeaway, conclusion, closing segments). Blocks nested more than
    ``VIEW_MAX_DEPTH`` levels deep are not drawn as blocks: their nodes stand in text order in
    the branch of the deepest block drawn (the page's JSON nests a few levels per block, and
    JSON encoders stop at a recursion limit)."""
    slots: dict[Any, list[tuple[int, dict[str, Any]]]] = {}

    def put(slot: Any, first: int, item: dict[str, Any]) -> None:
        slots.setdefault(slot, []).append((first, item))

    shown = shown_blocks(graph)
    members = nodes_by_block(graph, shown)
    depth = block_depths(graph)
    block_items = {}
    for block in graph.blocks:
        if depth.get(block.index, 0) > VIEW_MAX_DEPTH:
            if depth.get(block.index, 0) == VIEW_MAX_DEPTH + 1:  # flat, in the branch around it
                for inner in descendant_blocks(graph, block.index):
                    for node_id in members.get(inner, []):
                        put(tuple(block.parent), node_id, {"node": node_id})
            continue
        branch_ids = {i: b for b, branch in enumerate(block.branches) for i in branch}
        header = set(block.header) | set(block.items)
        first_branch = min(branch_ids, default=None)
        for node_id in members.get(block.index, []):
            node = graph.nodes[node_id]
            if node_id in header:
                slot = (block.index, "header")
            elif node_id in branch_ids:
                slot = (block.index, branch_ids[node_id])
            elif (
                node.block == block.index
                and node.branch is not None
                and node.branch < len(block.branches)
            ):
                slot = (block.index, node.branch)
            elif first_branch is not None and node_id < first_branch:
                slot = (block.index, "header")
            else:
                slot = (block.index, "footer")
            put(slot, node_id, {"node": node_id})
        item = {"block": block.index, "header": [], "branches": [], "footer": []}
        block_items[block.index] = item
        parent_slot = tuple(block.parent) if block.parent is not None else None
        put(parent_slot, min(members.get(block.index, [0])), item)
    for node_id in members.get(None, []):
        put(None, node_id, {"node": node_id})

    def ordered(slot: Any) -> list[dict[str, Any]]:
        return [item for _, item in sorted(slots.get(slot, []), key=lambda pair: pair[0])]

    for block in graph.blocks:
        if block.index not in block_items:
            continue
        item = block_items[block.index]
        item["header"] = ordered((block.index, "header"))
        item["branches"] = [ordered((block.index, b)) for b in range(len(block.branches))]
        item["footer"] = ordered((block.index, "footer"))
    return ordered(None)


def _record_metrics(record: dict[str, Any]) -> dict[str, Any]:
    metrics = record.get("metrics")
    return metrics if isinstance(metrics, dict) else {}


def _status(record: dict[str, Any]) -> dict[str, Any]:
    correct = record.get("correct")
    valid = _record_metrics(record).get("format_valid")
    return {
        "correct": correct if isinstance(correct, bool) else None,
        "format_valid": valid if isinstance(valid, bool) else None,
    }


def _metric_rows(record: dict[str, Any], graph: ReasoningGraph) -> list[list[str]]:
    from .metrics import metrics as graph_metrics

    shown = dict(graph_metrics(graph))
    shown.update({k: v for k, v in _record_metrics(record).items() if k != "violations"})
    for key in ("reward", "answer", "reference", "correct", "parsed", *TRAINING_FIELDS):
        if key in record:
            shown[key] = record[key]
    for key in ("finish_reason", "mode", "forks"):
        if key in graph.metadata and key not in shown:
            shown[key] = graph.metadata[key]
    rows = []
    for key, value in shown.items():
        if isinstance(value, float):
            value = f"{value:.3f}"
        rows.append([key, value if isinstance(value, str) else json.dumps(value)])
    return rows


def _node_advantages(record: dict[str, Any], graph: ReasoningGraph) -> list[float | None]:
    """A training rollout's advantage per node (``node_advantages``); None where the record
    has none or it does not fit the graph."""
    values = record.get("node_advantages")
    fits = isinstance(values, list) and len(values) == len(graph.nodes)
    if not fits or not all(v is None or _finite(v) for v in values):
        return [None] * len(graph.nodes)
    return [None if v is None else float(v) for v in values]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _shown(value: Any) -> str | None:
    """A record's value as the page shows it: text as it is, anything else as JSON. Python's
    JSON reads NaN and Infinity, which JSON.parse rejects (embedded raw, one blanked the page)."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def sample_view(record: dict[str, Any], graph: ReasoningGraph, title: str) -> dict[str, Any]:
    """What the page shows of one sample: plain JSON data."""
    from .constraints import format_valid, validate

    violations = validate(graph, "strict") if graph.grammar else []
    marks: dict[int, list[str]] = {}
    for v in violations:
        if v.node is not None:
            marks.setdefault(v.node, []).append(f"{v.code}: {v.message}")
    lengths = _lengths(graph)
    critical = critical_path(graph)
    credit = _node_advantages(record, graph)
    nodes = []
    for node, length, advantage in zip(graph.nodes, lengths, credit, strict=True):
        text = node.text
        nodes.append(
            {
                "id": node.id,
                "kind": node.kind.value,
                "label": node.label,
                "part": node.part,
                "parents": list(node.parents),
                "size": length,
                "text": text[:MAX_NODE_CHARS],
                "cut": len(text) > MAX_NODE_CHARS,
                "violations": marks.get(node.id, []),
                "advantage": advantage,
            }
        )
    status = _status(record)
    if status["format_valid"] is None:  # the record does not say: npr eval's own check
        status["format_valid"] = format_valid(graph) if graph.grammar else not violations
    return {
        "title": title,
        **status,
        "answer": _shown(record.get("answer")),
        "reference": _shown(record.get("reference")),
        "unit": "tokens" if graph.tokenized else "chars",
        "grammar": graph.grammar,
        "nodes": nodes,
        "layout": layout_tree(graph),
        "critical": critical,
        "violations": [v.to_dict() for v in violations],
        "metrics": _metric_rows(record, graph),
    }


def _graph_of(record: Any) -> tuple[dict[str, Any], ReasoningGraph]:
    from .cli import detect_grammar
    from .parse import parse

    if not isinstance(record, dict):
        raise ValueError("not an object")
    if isinstance(record.get("graph"), dict):
        return record, ReasoningGraph.from_dict(record["graph"])
    if isinstance(record.get("nodes"), list):
        return {}, ReasoningGraph.from_dict(record)
    for name in TEXT_FIELDS:
        if isinstance(record.get(name), str):
            text = record[name]
            return record, parse(text, grammar=detect_grammar(text), lenient=True)
    raise ValueError(f"no graph, graph dict or text field ({', '.join(TEXT_FIELDS)})")


# How npr train's rollout log begins a line: the step is known without parsing the line.
_STEP_PREFIX = re.compile(r'\{"step": (-?\d+)[,}]')
LAST_STEP = "last"


def _record_step(record: Any) -> int | None:
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def _line_step(line: str) -> int | None:
    """The step a line logs (None: none, or not a JSON object)."""
    match = _STEP_PREFIX.match(line)
    if match:
        return int(match[1])
    try:
        return _record_step(json.loads(line)) if line.strip() else None
    except ValueError:
        return None


def _last_step(path: Path) -> int | None:
    from .cli import read_lines

    logged = (_line_step(line) for _, line in read_lines(path))
    return max((step for step in logged if step is not None), default=None)


def load_views(
    path: Path,
    errors: list[str],
    limit: int | None = None,
    notes: list[str] | None = None,
    steps: Collection[int | str] | None = None,
) -> list[dict[str, Any]]:
    """Page data for each usable line of a JSONL file; bad lines go to ``errors`` with their
    line numbers, repairs (lone surrogates, bytes that are not UTF-8: U+FFFD) to ``notes``.
    ``steps`` keeps only the records of those training steps (``"last"``: the file's last);
    the other lines of a rollout log are skipped unparsed.

    Raises :class:`FileNotFoundError` when the file cannot be read."""
    from .cli import InputError, read_jsonl

    views: list[dict[str, Any]] = []
    try:  # lone surrogates (a cut emoji) become U+FFFD, which the page can hold
        wanted = None if steps is None else _wanted_steps(path, steps)
        logged: set[int] = set()  # the steps of the lines read, or skipped for their step

        def keep(line: str) -> bool:
            match = _STEP_PREFIX.match(line)
            if match:
                logged.add(int(match[1]))
            return not match or int(match[1]) in wanted

        for number, record in read_jsonl(path, errors, notes, None if wanted is None else keep):
            if limit is not None and len(views) >= limit:
                break
            if wanted is not None:
                step = _record_step(record)
                if step is not None:
                    logged.add(step)
                if step not in wanted:
                    continue
            try:
                record, graph = _graph_of(record)
            except ValueError as error:
                errors.append(f"{path}:{number}: {error}")
                continue
            views.append(sample_view(record, graph, _title(record, path, number)))
            if limit is not None and len(views) >= limit:
                break  # before the next line is read: its repairs would be noted
    except InputError as error:
        raise FileNotFoundError(str(error)) from error
    if wanted is not None and not wanted & logged:
        errors.append(
            f"{path}: no record of step {_ranges(wanted) or LAST_STEP}; "
            f"steps logged: {_ranges(logged) or 'none'}"
        )
    return views


def _wanted_steps(path: Path, steps: Collection[int | str]) -> set[int]:
    wanted = {step for step in steps if isinstance(step, int)}
    if LAST_STEP in steps and (last := _last_step(path)) is not None:
        wanted.add(last)
    return wanted


def _ranges(numbers: Collection[int], most: int = 6) -> str:
    """``0, 2-5, 9`` for {0, 2, 3, 4, 5, 9}; past ``most`` runs, the first and last three."""
    spans: list[list[int]] = []
    for number in sorted(numbers):
        if spans and number == spans[-1][1] + 1:
            spans[-1][1] = number
        else:
            spans.append([number, number])
    shown = [str(a) if a == b else f"{a}-{b}" for a, b in spans]
    if len(shown) > most:
        shown = [*shown[:3], "...", *shown[-3:]]
        return ", ".join(shown) + f" ({len(numbers)} steps)"
    return ", ".join(shown)


def _title(record: dict[str, Any], path: Path, number: int) -> str:
    if "problem_id" not in record:
        return str(record.get("id", f"{path.name}:{number}"))
    title = f"{record['problem_id']} · sample {record.get('sample', 0)}"
    step = _record_step(record)
    return title if step is None else f"step {step} · {title}"  # npr train's rollouts.jsonl


def render_page(views: list[dict[str, Any]], title: str = "npr view") -> str:
    """The HTML page with ``views`` embedded (``<`` escaped, so no text can close the script)."""
    template = files("npr_graph").joinpath("data/viewer.html").read_text("utf-8")
    data = json.dumps({"title": title, "samples": views}, ensure_ascii=False)
    data = data.replace("<", "\\u003c").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    return template.replace(PLACEHOLDER, data)


def write_page(
    sources: list[str],
    output: str | Path,
    limit: int | None = None,
    notes: list[str] | None = None,
    steps: Collection[int | str] | None = None,
) -> tuple[int, list[str]]:
    """Write the page for the samples of ``sources`` (of training ``steps`` only, if given);
    returns how many samples it shows and the input errors (bad lines, a step no file logs).
    With no sample to show, no page is written.

    Raises :class:`ValueError` when ``output`` is one of ``sources`` (it would be overwritten)."""
    for source in sources:
        if Path(output).exists() and Path(source).exists() and Path(output).samefile(source):
            raise ValueError(f"{output}: is an input file; write the page elsewhere (-o)")
    errors: list[str] = []
    views: list[dict[str, Any]] = []
    for source in sources:
        views += load_views(Path(source), errors, limit, notes, steps)
    if views:
        title = ", ".join(Path(s).name for s in sources)
        Path(output).write_text(render_page(views, f"npr view: {title}"), "utf-8")
    return len(views), errors


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register ``npr view`` on the ``npr`` command's subparsers."""
    parser = commands.add_parser(
        "view",
        help="write an HTML page showing sampled DAGs (npr eval's samples.jsonl, npr train's "
        "rollouts.jsonl)",
    )
    parser.add_argument(
        "files", nargs="+", help="JSONL: eval samples, training rollouts, graph dicts or text lines"
    )
    parser.add_argument("-o", "--output", default="view.html", help="the HTML file to write")
    from .cli import positive_int

    parser.add_argument(
        "--limit", type=positive_int, default=None, help="first N samples of each file"
    )
    parser.add_argument(
        "--step",
        dest="steps",
        action="append",
        type=_step,
        metavar="N|last",
        help="training rollouts of step N only (repeatable; last: the file's last step); other "
        "lines are skipped unparsed",
    )
    parser.set_defaults(run=cmd_view)


def _step(text: str) -> int | str:
    if text == LAST_STEP:
        return text
    try:
        step = int(text)
    except ValueError:
        step = -1
    if step < 0:
        raise argparse.ArgumentTypeError(f"expected a step number or {LAST_STEP}, got {text!r}")
    return step


def cmd_view(args: argparse.Namespace) -> int:
    notes: list[str] = []
    try:
        shown, errors = write_page(args.files, args.output, args.limit, notes, args.steps)
    except (OSError, ValueError) as error:
        print(f"npr view: {error}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"npr view: note: {note}", file=sys.stderr)
    for error in errors:
        print(f"npr view: {error}", file=sys.stderr)
    if not shown:
        print(f"npr view: no sample to show; {args.output} not written", file=sys.stderr)
        return 2
    print(f"wrote {args.output}")
    return 1 if errors else 0
