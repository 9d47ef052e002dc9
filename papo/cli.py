"""``npr train {zero,sft,papo}`` and ``npr sample``: the training stages from the command line."""

from __future__ import annotations

import argparse
import json
import os
import sys

from rich.console import Console
from rich.text import Text

from .config import STAGES, load_config, parse_value


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {pair!r}")
        out[key.strip()] = parse_value(value)
    return out


def cmd_train(args: argparse.Namespace) -> int:
    from .trainer import run

    console = Console(stderr=True)
    try:
        config = load_config(args.config, args.stage, _overrides(args.set))
        history = run(config, resume=args.resume, console=console)
    except (ValueError, FileNotFoundError) as error:
        # Under torchrun every rank prints its own error: say whose it is.
        ranked = os.environ.get("WORLD_SIZE", "1") != "1" and "RANK" in os.environ
        rank = f" rank {os.environ['RANK']}:" if ranked else ""
        console.print(Text.assemble(("error:", "red"), f"{rank} {error}"))
        return 2
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary for the whole run
        done = [h for h in history if h.get("skipped") is None]
        console.print(
            f"trained {len(done)} steps ({len(history) - len(done)} skipped); "
            f"checkpoints and metrics in {config.output_dir}",
            markup=False,
        )
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from pathlib import Path

    from npr_graph.engine.engine import Engine
    from npr_graph.engine.sampling import SamplingParams
    from npr_graph.models import load_model, resolve_device
    from npr_graph.prompts import load_template

    from .problems import read_problems
    from .rejection import SampleLog, SamplingReport, rejection_sample

    console = Console(stderr=True)

    def fail(error: Exception | str) -> int:
        console.print(Text.assemble(("error:", "red"), f" {error}"))
        return 2

    try:
        world = os.environ.get("WORLD_SIZE", "1")
        if world != "1":  # every rank would write the same files
            raise ValueError(
                f"npr sample runs as one process, not under torchrun (WORLD_SIZE={world}); "
                "to use several GPUs, run one per part of the problems, each with its own --out"
            )
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {args.limit}")
        if args.batch < 1:
            raise ValueError(f"--batch must be >= 1, got {args.batch}")
        problems = read_problems(args.data, args.prompt_field, args.answer_field)[: args.limit]
        template = load_template(args.prompt)
        grammar = args.grammar or ("multiverse" if args.prompt == "multiverse" else "npr")
        if args.mode == "constrained" and args.tags != "special":
            raise ValueError("--mode constrained needs the tags as special tokens (--tags special)")
        params = SamplingParams(
            temperature=args.temperature,
            top_p=args.top_p,
            max_new_tokens=args.max_new_tokens,
            n=args.tries,
            seed=args.seed,
        )
        device = resolve_device(args.device)
        log = SampleLog(Path(args.out), _sample_settings(args, grammar))
    except (ValueError, OSError) as error:
        return fail(error)
    this_run = SamplingReport()
    with log:
        todo = [(i, p) for i, p in enumerate(problems) if p.id not in log.done]
        if log.resumed:
            console.print(
                f"resuming {args.out}: {len(problems) - len(todo)} of {len(problems)} problems "
                "are done",
                markup=False,
            )
        if todo:
            try:
                model, tokenizer = load_model(
                    args.model, dtype=args.dtype, tags=args.tags, grammar=grammar
                )
                engine = Engine(
                    model.to(device),
                    tokenizer,
                    device=device,
                    grammar=grammar,
                    kv_memory_bytes=args.kv_memory,
                )
                log.start()
            except (ValueError, OSError) as error:
                return fail(error)
            try:
                _, this_run = rejection_sample(
                    engine,
                    [problem for _, problem in todo],
                    template,
                    params,
                    mode=args.mode,
                    batch=args.batch,
                    on_problem=log.write,
                    indices=[index for index, _ in todo],
                )
            except OSError as error:  # writing, a full disk say: what is written is whole
                return fail(
                    f"{error}; the problems written so far are kept, and the same command "
                    "resumes the run"
                )
        report = log.report([p.id for p in problems], this_run.not_run)
    json.dump(report.to_dict(), sys.stdout)
    print()
    for line in report.not_run:
        console.print(Text.assemble(("not run:", "yellow"), f" {line}"))
    console.print(
        f"accepted {report.accepted} of {report.problems} problems -> {args.out}", markup=False
    )
    return 0


def _sample_settings(args: argparse.Namespace, grammar: str) -> dict:
    """What decides ``npr sample``'s traces: a rerun resumes only with the same."""
    from pathlib import Path

    return {
        "data": str(Path(args.data).resolve()),
        "model": args.model,
        "tags": args.tags,
        "mode": args.mode,
        "prompt": args.prompt,
        "grammar": grammar,
        "tries": args.tries,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
        "dtype": args.dtype,
        "prompt_field": args.prompt_field,
        "answer_field": args.answer_field,
    }


def add_commands(commands: argparse._SubParsersAction) -> None:
    from npr_graph.cli import add_kv_memory_argument

    train = commands.add_parser(
        "train", help="run a training stage: zero (DAPO, text tags), sft, papo"
    )
    train.add_argument("stage", choices=STAGES)
    train.add_argument("--config", default=None, help="a .toml or .json file of settings")
    train.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting"
    )
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    train.set_defaults(run=cmd_train)

    sample = commands.add_parser(
        "sample",
        help="rejection sampling: keep the first correct, well-formatted trajectory",
        description="Sample --tries trajectories per problem and keep the first correct, "
        "well-formatted one. Run it again with the same arguments to resume an interrupted run "
        "(OUT's progress file, beside it, says which problems are done).",
    )
    sample.add_argument("--data", required=True, help="problems (.jsonl/.json/.parquet)")
    sample.add_argument("--out", required=True, help="accepted traces (.jsonl) for `npr train sft`")
    sample.add_argument("--model", default=None, help="model directory (default: embedded)")
    sample.add_argument("--tags", choices=("text", "special"), default="text")
    sample.add_argument(
        "--mode", choices=("sequential", "free", "constrained"), default="sequential"
    )
    sample.add_argument("--prompt", default="npr", help="npr | multiverse | cot | a template file")
    sample.add_argument(
        "--grammar",
        choices=("npr", "multiverse"),
        default=None,
        help="the format decoded and checked (default: multiverse with --prompt multiverse, else npr)",
    )
    sample.add_argument("--tries", type=int, default=8)
    sample.add_argument(
        "--batch",
        type=int,
        default=8,
        metavar="B",
        help="problems decoding at once, the next as soon as one ends (default 8)",
    )
    sample.add_argument("--limit", type=int, default=None)
    sample.add_argument("--max-new-tokens", type=int, default=1024)
    sample.add_argument("--temperature", type=float, default=1.0)
    sample.add_argument("--top-p", type=float, default=1.0)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    sample.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK, else cpu")
    add_kv_memory_argument(sample)
    sample.add_argument("--prompt-field", default=None)
    sample.add_argument("--answer-field", default=None)
    sample.set_defaults(run=cmd_sample)
