"""Shape and cost of a reasoning DAG: how parallel it is and how much that could save."""

from __future__ import annotations

from typing import Any

from .graph import NodeKind, ReasoningGraph
from .layout import node_starts


def metrics(graph: ReasoningGraph) -> dict[str, Any]:
    """Counts over the response (tokens when tokenized, else characters; see ``unit``).

    ``critical_path_tokens`` is the longest dependency chain, which is exactly the native end
    position of the response, so ``theoretical_speedup`` = total / critical path is what decoding
    the branches of every block at once could gain over decoding them one after another.
    """
    if not isinstance(graph, ReasoningGraph):
        raise TypeError(
            f"metrics takes a ReasoningGraph (parse the text first), got {type(graph).__name__}"
        )
    tokenized = graph.tokenized
    lengths = [n.num_tokens if tokenized else n.char_end - n.char_start for n in graph.nodes]
    prompt = sum(
        length
        for node, length in zip(graph.nodes, lengths, strict=True)
        if node.kind is NodeKind.PROMPT
    )
    starts = node_starts(graph, lengths)
    ends = [start + length for start, length in zip(starts, lengths, strict=True)]
    total = sum(lengths) - prompt
    critical = max(ends, default=0) - prompt
    widths = [block.width for block in graph.blocks]
    return {
        "unit": "tokens" if tokenized else "chars",
        "nodes": len(graph.nodes),
        "blocks": len(graph.blocks),
        "widths": widths,
        "max_width": max(widths, default=0),
        "mean_width": sum(widths) / len(widths) if widths else 0.0,
        "depth": max((block.depth + 1 for block in graph.blocks), default=0),
        "total_tokens": total,
        "critical_path_tokens": critical,
        "theoretical_speedup": total / critical if critical > 0 else 1.0,
        "is_parallel": any(width >= 2 for width in widths),
    }
