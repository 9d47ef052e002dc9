"""The ``npr`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from . import __version__
from .constraints import validate
from .format import format_score
from .graph import ReasoningGraph, Violation
from .metrics import metrics
from .parse import parse

TEXT_FIELDS = ("text", "response", "output", "completion")


@dataclass
class Trace:
    source: str
    text: str


@dataclass
class Report:
    trace: Trace
    graph: ReasoningGraph
    violations: list[Violation]
    format_score: float
    metrics: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "graph": self.graph.to_dict(),
            "violations": [v.to_dict() for v in self.violations],
            "format_score": self.format_score,
            "metrics": self.metrics,
        }


class InputError(Exception):
    """A file could not be read; the message says which and why."""


def read_traces(path: Path, errors: list[str]) -> Iterator[Trace]:
    """Traces of a text file (one) or a JSONL file (one per line); bad lines go to ``errors``."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise InputError(f"{path}: {error.strerror or error}") from error
    text = raw.decode("utf-8", errors="replace")
    if path.suffix != ".jsonl":
        yield Trace(str(path), text)
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            errors.append(f"{path}:{number}: not JSON ({error.msg})")
            continue
        field = next(
            (f for f in TEXT_FIELDS if isinstance(record, dict) and isinstance(record.get(f), str)),
            None,
        )
        if field is None:
            errors.append(f"{path}:{number}: no text field (one of {', '.join(TEXT_FIELDS)})")
            continue
        name = record.get("id", number)
        yield Trace(f"{path.name}:{name}", record[field])


def detect_grammar(text: str) -> str:
    return "multiverse" if "<Parallel>" in text or "<Path>" in text else "npr"


def inspect_trace(trace: Trace, grammar: str, profile: str, max_branches: int | None) -> Report:
    chosen = detect_grammar(trace.text) if grammar == "auto" else grammar
    graph = parse(trace.text, grammar=chosen, lenient=True)
    violations = validate(graph, profile, max_branches=max_branches)
    return Report(trace, graph, violations, format_score(trace.text), metrics(graph))


def _print_report(console: Console, report: Report, fmt: str) -> None:
    from . import render

    if fmt == "json":
        print(json.dumps(report.to_dict(), ensure_ascii=False))
        return
    if fmt == "dot":
        print(render.to_dot(report.graph, violations=report.violations))
        return
    if fmt == "mermaid":
        print(render.to_mermaid(report.graph))
        return
    console.rule(f"[bold]{report.trace.source}")
    console.print(render.to_tree(report.graph, violations=report.violations))
    m = report.metrics
    console.print(
        f"blocks {m['blocks']}  widths {m['widths']}  depth {m['depth']}  "
        f"{m['unit']} {m['total_tokens']}  critical path {m['critical_path_tokens']}  "
        f"speedup ≤ {m['theoretical_speedup']:.2f}×  format score {report.format_score:+.1f}"
    )
    if report.violations:
        table = Table("rule", "where", "message", title=f"{len(report.violations)} violation(s)")
        for v in report.violations:
            table.add_row(v.code, f"{v.char_start}:{v.char_end}", v.message)
        console.print(table)
    else:
        console.print("[green]no violations")


def _summary(console: Console, reports: list[Report]) -> None:
    table = Table("trace", "blocks", "widths", "violations", "format", "speedup ≤", title="summary")
    for r in reports:
        codes = sorted({v.code for v in r.violations})
        table.add_row(
            r.trace.source,
            str(r.metrics["blocks"]),
            str(r.metrics["widths"]),
            ", ".join(codes) or "none",
            f"{r.format_score:+.1f}",
            f"{r.metrics['theoretical_speedup']:.2f}×",
        )
    valid = sum(1 for r in reports if not r.violations)
    table.caption = f"{valid}/{len(reports)} without violations"
    console.print(table)


def cmd_inspect(args: argparse.Namespace) -> int:
    console = Console()
    errors: list[str] = []
    reports: list[Report] = []
    for path in args.files:
        try:
            for trace in read_traces(Path(path), errors):
                report = inspect_trace(trace, args.grammar, args.profile, args.max_branches)
                reports.append(report)
                _print_report(console, report, args.format)
        except InputError as error:
            errors.append(str(error))
    if args.format == "tree" and (
        len(reports) > 1 or any(p.endswith(".jsonl") for p in args.files)
    ):
        _summary(console, reports)
    for error in errors:
        print(f"npr inspect: {error}", file=sys.stderr)
    if errors and not reports:
        return 2
    if args.check and any(r.violations for r in reports):
        return 1
    return 1 if errors else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="npr", description="Native parallel reasoning as explicit DAGs."
    )
    parser.add_argument("--version", action="version", version=f"npr-graph {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    inspect = commands.add_parser(
        "inspect", help="parse traces and report graph, violations, score, metrics"
    )
    inspect.add_argument(
        "files", nargs="+", help="text files (one trace) or .jsonl (a text/response field per line)"
    )
    inspect.add_argument("--format", choices=("tree", "json", "dot", "mermaid"), default="tree")
    inspect.add_argument("--grammar", choices=("auto", "npr", "multiverse"), default="auto")
    inspect.add_argument("--profile", choices=("strict", "lenient"), default="strict")
    inspect.add_argument("--max-branches", type=int, default=None)
    inspect.add_argument(
        "--check", action="store_true", help="exit 1 when any trace has violations"
    )
    inspect.set_defaults(run=cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
