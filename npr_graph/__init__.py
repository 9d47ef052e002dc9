"""npr-graph: parse parallel-reasoning traces into an explicit execution DAG.

The graph is the single source of truth: positions and visibility (:mod:`npr_graph.layout`),
format rules (:mod:`npr_graph.constraints`), rewards and metrics all read it.
"""

from .constraints import PROFILES, RULES, Profile, boxed_answers, format_valid, validate
from .format import format_score
from .graph import Block, FinishReason, Node, NodeKind, ReasoningGraph, Violation
from .layout import CompactMask, attention_mask, compact_mask, node_starts, position_ids
from .metrics import metrics
from .parse import ParseError, parse

__all__ = [
    "PROFILES",
    "RULES",
    "Block",
    "CompactMask",
    "FinishReason",
    "Node",
    "NodeKind",
    "ParseError",
    "Profile",
    "ReasoningGraph",
    "Violation",
    "attention_mask",
    "boxed_answers",
    "compact_mask",
    "format_score",
    "format_valid",
    "metrics",
    "node_starts",
    "parse",
    "position_ids",
    "validate",
]

__version__ = "0.1.0"
