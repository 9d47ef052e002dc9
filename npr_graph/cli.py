"""The ``npr`` command line."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from . import __version__
from .constraints import format_valid, validate
from .evaluate import LONE_SURROGATE, SURROGATE_ESCAPE
from .format import format_score
from .graph import ReasoningGraph, Violation
from .metrics import metrics
from .parse import parse

TEXT_FIELDS = ("text", "response", "output", "completion")


@dataclass
class Trace:
    source: str
    text: str  # what is parsed, or the response of ``graph``
    graph: ReasoningGraph | None = None  # a saved graph (npr generate --json, npr eval samples)


@dataclass
class Report:
    trace: Trace
    graph: ReasoningGraph
    violations: list[Violation]
    format_score: float | None  # the NPR paper's format reward: NPR traces only
    format_valid: bool
    metrics: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "graph": self.graph.to_dict(),
            "violations": [v.to_dict() for v in self.violations],
            "format_score": self.format_score,
            "format_valid": self.format_valid,
            "metrics": self.metrics,
        }


class InputError(Exception):
    """A file could not be read; the message says which and why."""


UTF8_BOM = b"\xef\xbb\xbf"


class NotJSON(ValueError):
    """A JSONL line that is not JSON; the message says why (as json puts it)."""


def json_record(line: str) -> tuple[Any, bool]:
    """The value of a JSON line with lone surrogates replaced by U+FFFD (one character each, so
    positions keep their meaning), and whether there were any. A line that is not JSON, nests
    too deeply or holds a number too long for Python raises :class:`NotJSON`."""
    try:
        value = json.loads(line)
        if not SURROGATE_ESCAPE.search(line):
            return value, False
        text = json.dumps(value, ensure_ascii=False)  # pairs are one character by now
        if not LONE_SURROGATE.search(text):
            return value, False
        return json.loads(LONE_SURROGATE.sub("\ufffd", text)), True
    except json.JSONDecodeError as error:
        raise NotJSON(error.msg) from None
    except RecursionError:
        raise NotJSON("nested too deeply") from None
    except ValueError as error:  # an integer of more than 4,300 digits
        raise NotJSON(str(error)) from None


def _decode(raw: bytes, where: str, notes: list[str] | None) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        if notes is not None:
            notes.append(
                f"{where}: bytes that are not UTF-8 (from byte {error.start}) replaced with U+FFFD"
            )
        return raw.decode("utf-8", errors="replace")


def read_lines(path: Path, notes: list[str] | None = None) -> Iterator[tuple[int, str]]:
    """(line number, line) of a text file, as UTF-8 without a leading byte order mark.

    Lines end at "\\n" only (a "\\r" before it is JSON whitespace): ``str.splitlines`` would also
    cut at U+2028, U+2029 and U+0085, which JSON strings hold raw. Invalid UTF-8 becomes U+FFFD,
    with a line in ``notes`` saying where (as the lines are taken). :class:`InputError` at once
    if the file cannot be read. The file is read as the lines are taken (a rollout log holds
    gigabytes)."""
    try:
        file = path.open("rb")
    except OSError as error:
        raise InputError(f"{path}: {error.strerror or error}") from error

    def lines() -> Iterator[tuple[int, str]]:
        with file:
            try:
                for number, raw in enumerate(file, start=1):
                    if number == 1:
                        raw = raw.removeprefix(UTF8_BOM)
                    yield number, _decode(raw.removesuffix(b"\n"), f"{path}:{number}", notes)
            except OSError as error:
                raise InputError(f"{path}: {error.strerror or error}") from error

    return lines()


def read_bytes(path: Path) -> bytes:
    """The bytes of ``path`` without a UTF-8 byte order mark; :class:`InputError` if unreadable."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise InputError(f"{path}: {error.strerror or error}") from error
    return raw.removeprefix(UTF8_BOM)


def is_jsonl(path: Path) -> bool:
    return path.suffix.lower() == ".jsonl"


def read_traces(path: Path, errors: list[str], notes: list[str] | None = None) -> Iterator[Trace]:
    """Traces of a text file (one) or a JSONL file (one per line); bad lines go to ``errors``.

    Lone surrogates in a JSONL record (one character each, so positions keep their meaning) and
    bytes that are not UTF-8 become U+FFFD, with a line in ``notes`` saying where. A .json file
    holds one record (a graph as ``to_json`` writes it) or a list of them."""
    if path.suffix.lower() == ".json":
        yield from _json_traces(path, errors, notes)
        return
    if not is_jsonl(path):
        yield Trace(str(path), _decode(read_bytes(path), str(path), notes))
        return
    for number, record in read_jsonl(path, errors, notes):
        try:
            yield _record_trace(record, path, number)
        except ValueError as error:
            errors.append(f"{path}:{number}: {error}")


_NOT_JSON = object()


def _json_value(text: str, where: str, errors: list[str], notes: list[str] | None) -> Any:
    """The JSON value of ``text`` (lone surrogates repaired, with a note), or ``_NOT_JSON``
    with the reason in ``errors``."""
    try:
        value, repaired = json_record(text)
    except NotJSON as error:
        errors.append(f"{where}: not JSON ({error})")
        return _NOT_JSON
    if repaired and notes is not None:
        notes.append(f"{where}: lone surrogates replaced with U+FFFD")
    return value


def _json_traces(path: Path, errors: list[str], notes: list[str] | None) -> Iterator[Trace]:
    value = _json_value(_decode(read_bytes(path), str(path), notes), str(path), errors, notes)
    if value is _NOT_JSON:
        return
    records = value if isinstance(value, list) else [value]
    for number, record in enumerate(records, start=1):
        try:
            yield _record_trace(record, path, number)
        except ValueError as error:
            where = f"{path}: item {number}" if isinstance(value, list) else str(path)
            errors.append(f"{where}: {error}")


def read_jsonl(
    path: Path,
    errors: list[str],
    notes: list[str] | None = None,
    keep: Callable[[str], bool] | None = None,
) -> Iterator[tuple[int, Any]]:
    """(line number, value) of each JSON line of ``path``, read as it is taken; blank lines are
    skipped, and so are lines ``keep`` refuses (unparsed), lines that are not JSON go to
    ``errors``, repairs (lone surrogates, bytes that are not UTF-8: U+FFFD) to ``notes``.
    :class:`InputError` at once if the file cannot be read."""
    lines = read_lines(path, notes)

    def records() -> Iterator[tuple[int, Any]]:
        for number, line in lines:
            if not line.strip() or (keep is not None and not keep(line)):
                continue
            record = _json_value(line, f"{path}:{number}", errors, notes)
            if record is not _NOT_JSON:
                yield number, record

    return records()


def _record_trace(record: Any, path: Path, number: int) -> Trace:
    """The trace of a JSONL record: a saved graph (npr eval's "graph" field, or a graph dict as
    npr generate --json writes it; taken as it is, tokens and prompt included), else the first
    text field. A graph dict's "text" also holds the prompt, so it is not read as a trace."""
    if not isinstance(record, dict):
        raise ValueError(
            f"not an object; expected a graph or a text field ({', '.join(TEXT_FIELDS)})"
        )
    if "problem_id" in record:
        source = f"{path.name}:{record['problem_id']}#{record.get('sample', 0)}"
    else:
        source = f"{path.name}:{record.get('id', number)}"
    saved = record.get("graph") if isinstance(record.get("graph"), dict) else None
    if saved is None and isinstance(record.get("nodes"), list):
        saved = record
    if saved is not None:
        graph = ReasoningGraph.from_dict(saved)
        return Trace(source, graph.response_text, graph)
    field = next((f for f in TEXT_FIELDS if isinstance(record.get(f), str)), None)
    if field is None:
        raise ValueError(f"no text field (one of {', '.join(TEXT_FIELDS)}) and no graph")
    return Trace(source, record[field])


def positive_int(value: str) -> int:
    """An argparse type: an integer of at least 1 (0 or less made ``--limit`` show nothing and
    ``--max-branches`` flag every block, silently)."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {number}")
    return number


def kv_memory_arg(value: str) -> int | str:
    """An argparse type: ``auto`` (on a GPU a share of its free memory, see
    ``Engine(kv_memory_bytes="auto")``) or GiB for the engine's KV pool."""
    if value == "auto":
        return value
    try:
        gib = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of GiB or 'auto': {value!r}") from None
    if not (math.isfinite(gib) and gib > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number of GiB, not {value}")
    return max(1, int(gib * 2**30))


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="torch intra-op threads (default: torch's; on a CPU other jobs also use, 1 can be "
        "much faster)",
    )


def set_threads(args: argparse.Namespace) -> None:
    """Apply ``--threads``: on a shared CPU, contended threads can make one process 10x slower."""
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)


def add_kv_memory_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--kv-memory",
        type=kv_memory_arg,
        default="auto",
        metavar="GIB",
        help="KV cache size in GiB; 'auto' (default): 80%% of the GPU's free memory once the "
        "model is loaded, 0.5 GiB on the CPU",
    )


def detect_grammar(text: str) -> str:
    return "multiverse" if "<Parallel>" in text or "<Path>" in text else "npr"


def inspect_trace(trace: Trace, grammar: str, profile: str, max_branches: int | None) -> Report:
    """A trace's report; a saved graph is reported as it is (its grammar, not ``grammar``)."""
    graph = trace.graph
    if graph is None:
        chosen = detect_grammar(trace.text) if grammar == "auto" else grammar
        graph = parse(trace.text, grammar=chosen, lenient=True)
    violations = validate(graph, profile, max_branches=max_branches)
    score = format_score(trace.text) if graph.grammar == "npr" else None
    return Report(trace, graph, violations, score, format_valid(graph), metrics(graph))


def _format_text(report: Report) -> str:
    """NPR: the format score (0 passes); Multiverse: whether its format passes."""
    if report.format_score is not None:
        return f"{report.format_score:+.1f}"
    return "valid" if report.format_valid else "invalid"


def _print_report(console: Console, report: Report, fmt: str) -> None:
    from . import render

    if fmt == "json":
        print(json.dumps(report.to_dict(), ensure_ascii=False))
        return
    if fmt == "dot":
        print(render.to_dot(report.graph, violations=report.violations))
        return
    if fmt == "mermaid":
        print(render.to_mermaid(report.graph, violations=report.violations))
        return
    # File names, record ids and violation messages (which quote model text) are shown as Text:
    # a plain string would be read as rich markup ("[/x]" raised MarkupError, "[b]" vanished);
    # names lose their control characters, with which a record id could drive the terminal.
    console.rule(Text(render.printable(report.trace.source), style="bold"))
    console.print(render.to_tree(report.graph, violations=report.violations))
    m = report.metrics
    console.print(
        f"blocks {m['blocks']}  widths {m['widths']}  depth {m['depth']}  "
        f"{m['unit']} {m['total_tokens']}  critical path {m['critical_path_tokens']}  "
        f"speedup ≤ {m['theoretical_speedup']:.2f}×  "
        + ("format score " if report.format_score is not None else "format ")
        + _format_text(report)
    )
    if report.violations:
        table = Table("rule", "where", "message", title=f"{len(report.violations)} violation(s)")
        for v in report.violations:
            table.add_row(Text(v.code), f"{v.char_start}:{v.char_end}", Text(v.message))
        console.print(table)
    else:
        console.print("[green]no violations")


def _summary(console: Console, reports: list[Report]) -> None:
    from .render import printable

    table = Table(title="summary")
    # Names and codes fold onto more lines: cut with an ellipsis at 80 columns (a pipe, a file),
    # every row of cold_start.jsonl read "cold_start.jsonl…".
    table.add_column("trace", overflow="fold")
    for name in ("blocks", "widths"):
        table.add_column(name)
    table.add_column("violations", overflow="fold")
    for name in ("format", "speedup ≤"):
        table.add_column(name, no_wrap=True)
    for r in reports:
        codes = sorted({v.code for v in r.violations})
        table.add_row(
            Text(printable(r.trace.source)),
            str(r.metrics["blocks"]),
            str(r.metrics["widths"]),
            Text(", ".join(codes) or "none"),
            _format_text(r),
            f"{r.metrics['theoretical_speedup']:.2f}×",
        )
    valid = sum(1 for r in reports if not r.violations)
    table.caption = f"{valid}/{len(reports)} without violations"
    console.print(table)


def cmd_inspect(args: argparse.Namespace) -> int:
    console = Console()
    errors: list[str] = []
    notes: list[str] = []
    reports: list[Report] = []
    for path in args.files:
        try:
            for trace in read_traces(Path(path), errors, notes):
                report = inspect_trace(trace, args.grammar, args.profile, args.max_branches)
                reports.append(report)
                _print_report(console, report, args.format)
        except InputError as error:
            errors.append(str(error))
    if not reports and not errors:
        errors.append(f"no trace in {', '.join(args.files)}")
    if args.format == "tree" and (len(reports) > 1 or any(is_jsonl(Path(p)) for p in args.files)):
        _summary(console, reports)
    for note in notes:
        print(f"npr inspect: note: {note}", file=sys.stderr)
    for error in errors:
        print(f"npr inspect: {error}", file=sys.stderr)
    if errors and not reports:
        return 2
    if args.check and any(r.violations for r in reports):
        return 1
    return 1 if errors else 0


def _sampling(args: argparse.Namespace, **overrides: Any):
    from .engine.sampling import SamplingParams

    values = {
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "repetition_penalty": args.repetition_penalty,
        "max_new_tokens": args.max_new_tokens,
        "seed": args.seed,
        "n": args.n,
        "min_branches": args.min_branches,
        "max_branches": args.max_branches,
        "max_plan_tokens": args.plan_tokens,
        "max_step_tokens": args.step_tokens,
        "max_takeaway_tokens": args.takeaway_tokens,
        "max_depth": args.max_depth,
    }
    values.update(overrides)
    return SamplingParams(**values)


def _load_engine(args: argparse.Namespace):
    from .engine.engine import Engine

    set_threads(args)
    with Console(stderr=True).status("loading model"):
        return Engine.from_pretrained(
            args.model,
            dtype=args.dtype,
            tags=args.tags,
            grammar=args.grammar,
            device=args.device,
            kv_memory_bytes=args.kv_memory,
        )


def _chat(args: argparse.Namespace) -> bool | None:
    """``Engine.generate``'s ``chat``: the template when the tokenizer has one, unless
    ``--no-chat``."""
    return False if args.no_chat else None


def _generate_with_progress(
    engine, prompts, params, mode: str, quiet: bool, chat: bool | None = None
):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    budget = params.max_new_tokens * params.n * len(prompts)
    with Progress(
        TextColumn(f"[bold]{mode}"),
        BarColumn(),
        TextColumn("{task.completed} tokens"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=quiet,
        transient=True,
    ) as progress:
        task = progress.add_task("decode", total=budget)
        return engine.generate(
            prompts,
            params,
            mode=mode,
            chat=chat,
            progress=lambda done: progress.update(task, completed=done),
        )


def cmd_generate(args: argparse.Namespace) -> int:
    from . import render

    console = Console()

    def show(index: int, graphs: list[ReasoningGraph]) -> None:
        for graph in graphs:
            if args.json:
                print(json.dumps(graph.to_dict(), ensure_ascii=False), flush=True)
            else:
                if args.prompts:
                    console.print(f"prompt {index}, sample {graph.metadata['sample_index']}")
                console.print(render.to_tree(graph))
                console.print(_describe(graph))

    try:
        params = _sampling(args)
        prompts = [args.prompt] if args.prompts is None else read_prompts(Path(args.prompts))
        engine = _load_engine(args)
        if args.prompts is None:
            graphs = _generate_with_progress(
                engine, prompts, params, args.mode, args.json, chat=_chat(args)
            )
            show(0, graphs)
        else:  # each prompt shown as soon as it ends
            engine.generate(
                prompts,
                params,
                mode=args.mode,
                chat=_chat(args),
                max_running=args.batch,
                on_finish=show,
            )
    except (ValueError, OSError, InputError) as error:  # bad parameters, prompts or model
        print(f"npr generate: {error}", file=sys.stderr)
        return 2
    if not args.json:
        console.print(_stats_line(engine.stats))
    return 0


def read_prompts(path: Path) -> list[str]:
    """Prompts from a text file (one per line) or from the ``problem`` / ``question`` /
    ``prompt`` field of each record of a .json, .jsonl or .parquet file."""
    from .evaluate import PROBLEM_FIELDS, EvalError, problem_text, read_records

    if path.suffix.lower() not in (".json", ".jsonl", ".parquet"):
        prompts = [line.rstrip("\r") for _, line in read_lines(path) if line.strip()]
    else:
        errors: list[str] = []
        prompts = []
        try:
            for where, record in read_records(path, errors):
                text = problem_text(record)
                if text is None:
                    errors.append(f"{where}: no {'/'.join(PROBLEM_FIELDS)} text")
                else:
                    prompts.append(text)
        except EvalError as error:
            raise ValueError(str(error)) from error
        if errors:
            more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
            raise ValueError("; ".join(errors[:3]) + more)
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def _describe(graph: ReasoningGraph) -> str:
    m = metrics(graph)
    meta = graph.metadata
    return (
        f"widths {m['widths']}  tokens {m['total_tokens']}  critical path {m['critical_path_tokens']}  "
        f"finish {meta.get('finish_reason')}"
        + (
            f"  format score {format_score(graph.response_text):+.1f}"
            if graph.grammar == "npr"
            else ""
        )
    )


def _stats_line(stats) -> str:
    d = stats.to_dict()
    return (
        f"{d['generated_tokens']} tokens in {d['wall_time']:.2f} s = {d['tokens_per_s']:.1f} tok/s; "
        f"{d['decode_steps']} decode steps, {d['mean_lanes_per_step']:.2f} lanes/step, peak KV pages {d['peak_kv_pages']}"
    )


def cmd_demo(args: argparse.Namespace) -> int:
    """The embedded model answers a bundled question in constrained mode; then the same number
    of tokens is decoded sequentially, and the two speeds are compared (both runs after a short
    untimed warm-up, :meth:`Engine.warm_up`)."""
    from importlib.resources import files

    from . import render

    question = args.prompt
    if question is None:
        question = files("npr_graph").joinpath("data/demo_question.txt").read_text().strip()
    chat = _chat(args)
    try:  # bad parameters fail before the model loads
        if args.n != 1:  # n samples side by side would pass for the DAG's own parallelism
            raise ValueError("the demo compares one sample with sequential decoding; -n is 1")
        params = _sampling(args)
        engine = _load_engine(args)
        with Console(stderr=True).status("warming up"):
            engine.warm_up(question, params, ["constrained", "sequential"], chat)
        console = Console()
        console.print(Text.assemble(("question:", "bold"), " ", question))
        graphs = _generate_with_progress(engine, [question], params, "constrained", False, chat)
        parallel = engine.stats
        graph = graphs[0]
        console.print(render.to_tree(graph))
        console.print(_describe(graph))
        tokens = parallel.generated_tokens
        sequential_params = _sampling(args, max_new_tokens=tokens, max_total_tokens=tokens, n=1)
        sequential_params = type(sequential_params)(
            **{**sequential_params.__dict__, "ignore_eos": True}
        )
        _generate_with_progress(engine, [question], sequential_params, "sequential", False, chat)
    except (ValueError, OSError) as error:
        print(f"npr demo: {error}", file=sys.stderr)
        return 2
    sequential = engine.stats
    console.print(f"parallel (constrained): {_stats_line(parallel)}")
    console.print(f"sequential, same token count: {_stats_line(sequential)}")
    speedup = (
        parallel.tokens_per_s / sequential.tokens_per_s if sequential.tokens_per_s else float("nan")
    )
    import torch

    threads = f", {torch.get_num_threads()} torch threads" if args.device == "cpu" else ""
    console.print(
        f"[bold]measured speedup over sequential decoding: {speedup:.2f}×[/] (wall time for "
        f"{tokens} tokens{threads})"
    )
    return 0


def _add_generation_options(parser: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="local model directory or .gguf (default: embedded SmolLM2-135M-Instruct)",
    )
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default=defaults.get("dtype", "float32")
    )
    parser.add_argument("--tags", choices=("special", "text"), default="special")
    parser.add_argument(
        "--no-chat", action="store_true", help="the raw prompt, without the chat template"
    )
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    add_threads_argument(parser)
    add_kv_memory_argument(parser)
    parser.add_argument(
        "--grammar",
        choices=("npr", "multiverse"),
        default="npr",
        help="the format decoded: NPR blocks, or Multiverse blocks that may nest",
    )
    parser.add_argument(
        "--max-depth", type=int, default=2, help="how deep Multiverse blocks nest (1 = flat)"
    )
    parser.add_argument("--seed", type=int, default=defaults.get("seed"))
    parser.add_argument("--max-new-tokens", type=int, default=defaults.get("max_new_tokens", 256))
    parser.add_argument("--min-branches", type=int, default=defaults.get("min_branches", 2))
    parser.add_argument("--max-branches", type=int, default=defaults.get("max_branches", 5))
    parser.add_argument(
        "--temperature", type=float, default=defaults.get("temperature", 0.0), help="0 = greedy"
    )
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument(
        "--repetition-penalty", type=float, default=defaults.get("repetition_penalty", 1.0)
    )
    parser.add_argument("-n", type=int, default=1, help="samples of the prompt (they share its KV)")
    parser.add_argument(
        "--plan-tokens",
        type=int,
        default=defaults.get("plan_tokens", 32),
        help="length limit of a plan in tokens after its tag, constrained mode",
    )
    parser.add_argument(
        "--step-tokens",
        type=int,
        default=defaults.get("step_tokens", 128),
        help="length limit of a step in tokens after its tag, constrained mode",
    )
    parser.add_argument(
        "--takeaway-tokens",
        type=int,
        default=defaults.get("takeaway_tokens", 64),
        help="length limit of a takeaway in tokens after its tag, constrained mode",
    )


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
        "files",
        nargs="+",
        help="text files (one trace), .jsonl (per line a text/response field, a graph dict "
        "as npr generate --json writes it, or an npr eval sample) or .json (one such record, "
        "e.g. a graph's to_json(), or a list of them)",
    )
    inspect.add_argument(
        "--format",
        choices=("tree", "json", "dot", "mermaid"),
        default="tree",
        help="tree (default); json: one line per trace; dot, mermaid: one document per trace",
    )
    inspect.add_argument("--grammar", choices=("auto", "npr", "multiverse"), default="auto")
    inspect.add_argument("--profile", choices=("strict", "lenient"), default="strict")
    inspect.add_argument("--max-branches", type=positive_int, default=None)
    inspect.add_argument(
        "--check", action="store_true", help="exit 1 when any trace has violations"
    )
    inspect.set_defaults(run=cmd_inspect)

    generate = commands.add_parser("generate", help="decode a prompt into a reasoning DAG")
    source = generate.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt")
    source.add_argument(
        "--prompts",
        metavar="FILE",
        help="many prompts: one per line of a text file, or the problem/question/prompt field "
        "of a .json, .jsonl or .parquet file; each is shown as soon as it ends",
    )
    generate.add_argument(
        "--batch",
        type=positive_int,
        default=8,
        metavar="B",
        help="with --prompts: prompts decoding at once, the next as soon as one ends (default 8)",
    )
    generate.add_argument(
        "--mode", choices=("constrained", "free", "sequential"), default="constrained"
    )
    generate.add_argument("--json", action="store_true", help="print one graph dict per line")
    _add_generation_options(generate, {})
    generate.set_defaults(run=cmd_generate)

    demo = commands.add_parser(
        "demo", help="the embedded model answers a question in parallel; speedup vs sequential"
    )
    demo.add_argument("--prompt", default=None, help="a question instead of the bundled one")
    _add_generation_options(
        demo,
        {
            "dtype": "bfloat16",
            "max_new_tokens": 200,
            "min_branches": 3,
            "max_branches": 3,
            "repetition_penalty": 1.02,
            "seed": 0,
            "temperature": 0.7,
            "plan_tokens": 24,
            "step_tokens": 64,
            "takeaway_tokens": 40,
        },
    )
    demo.set_defaults(run=cmd_demo)

    from . import evaluate, viewer

    evaluate.add_parser(commands)
    viewer.add_parser(commands)

    from papo.cli import add_commands as add_training_commands

    add_training_commands(commands)
    return parser


# What to give less of when a command runs out of memory.
MEMORY_ADVICE = {
    "train": "lower kv_pages (the rollout KV pool), row_tokens or prompts_per_step; --resume "
    "goes on from the last checkpoint",
    "inspect": "inspect fewer traces at once",
    "demo": "give the KV cache less (--kv-memory GIB)",
    "view": "view fewer samples at once",
}
ENGINE_MEMORY_ADVICE = (
    "give the KV cache less (--kv-memory GIB; auto takes 80% of the GPU's free memory once "
    "the model is loaded, leaving the rest for activations) or decode fewer prompts at once "
    "(--batch)"
)


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` says memory ran out: the GPU's (torch's ``OutOfMemoryError``) or the
    CPU allocator's."""
    torch = sys.modules.get("torch")
    if isinstance(error, MemoryError):
        return True
    if torch is not None and isinstance(error, torch.OutOfMemoryError):
        return True
    # what CUDA, cuBLAS and the CPU allocator say when they raise plain RuntimeErrors
    signs = ("out of memory", "can't allocate memory", "CUBLAS_STATUS_ALLOC_FAILED")
    return isinstance(error, RuntimeError) and any(sign in str(error) for sign in signs)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (MemoryError, RuntimeError) as error:
        if not out_of_memory(error):
            raise
        from .ranks import rank_label

        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        advice = MEMORY_ADVICE.get(args.command, ENGINE_MEMORY_ADVICE)
        if args.command in ("eval", "sample"):
            advice += "; the problems written so far are kept, and the same command resumes"
        print(
            f"npr {args.command}:{rank_label()} out of memory ({detail}): {advice}", file=sys.stderr
        )
        return 2
    except BrokenPipeError:
        # The reader of stdout went away (npr inspect ... | head): not an error of ours. Only for
        # the commands whose one pipe is stdout; training and eval talk to helper processes.
        if args.command not in ("inspect", "generate", "demo", "view"):
            raise
        # Python flushes stdout again at exit, which would fail the same way: point it nowhere.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
