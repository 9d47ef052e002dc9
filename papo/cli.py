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
    from npr_graph.ranks import peer_lost

    from .trainer import run

    console = Console(stderr=True)
    try:
        config = load_config(args.config, args.stage, _overrides(args.set))
        history = run(config, resume=args.resume, console=console)
    except (ValueError, FileNotFoundError) as error:
        console.print(_error_line(error))
        return 2
    except RuntimeError as error:  # the rank that stopped printed why
        lost = peer_lost(error)
        if lost is None:
            raise
        console.print(_error_line(f"{lost}; --resume goes on from the last checkpoint"))
        return 2
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary for the whole run
        done = [h for h in history if h.get("skipped") is None]
        console.print(
            f"trained {len(done)} steps ({len(history) - len(done)} skipped); "
            f"checkpoints and metrics in {config.output_dir}",
            markup=False,
        )
    return 0


def _error_line(error: Exception | str) -> Text:
    from npr_graph.ranks import rank_label

    return Text.assemble(("error:", "red"), f"{rank_label()} {error}")


def cmd_sample(args: argparse.Namespace) -> int:
    from pathlib import Path

    from npr_graph.cli import set_threads
    from npr_graph.engine.sampling import SamplingParams
    from npr_graph.models import resolve_device
    from npr_graph.prompts import load_template
    from npr_graph.ranks import PeerLost, joined_ranks

    from .problems import read_problems
    from .rewards import get as get_reward

    console = Console(stderr=True)
    try:
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {args.limit}")
        if args.batch < 1:
            raise ValueError(f"--batch must be >= 1, got {args.batch}")
        if not Path(args.out).parent.is_dir():  # before the model loads, not after
            raise ValueError(f"--out {args.out}: its folder does not exist")
        problems = read_problems(args.data, args.prompt_field, args.answer_field)[: args.limit]
        if not problems:
            raise ValueError(f"{args.data}: no problems to sample")
        template = load_template(args.prompt)
        # the template's own format, as npr eval reads it (a file of Multiverse tags included)
        grammar = args.grammar or ("multiverse" if template.grammar == "multiverse" else "npr")
        if args.mode == "constrained" and args.tags != "special":
            raise ValueError("--mode constrained needs the tags as special tokens (--tags special)")
        try:  # a name not registered stops here, not after the model is loaded
            get_reward(args.reward)
        except KeyError as error:
            raise ValueError(error.args[0]) from None
        params = SamplingParams(
            temperature=args.temperature,
            top_p=args.top_p,
            max_new_tokens=args.max_new_tokens,
            n=args.tries,
            seed=args.seed,
        )
        device = resolve_device(args.device)
        set_threads(args)
    except (ValueError, OSError) as error:
        console.print(_error_line(error))
        return 2
    with joined_ranks() as ranks:
        job = _SampleJob(args, Path(args.out), problems, template, params, grammar, device, ranks)
        try:
            return job.run(console)
        except _Stop as stop:
            if stop.args:  # this rank's own failure (the others stop quietly)
                console.print(_error_line(stop))
            return 2
        except PeerLost as error:
            console.print(_error_line(f"{error}; the same command resumes the run"))
            return 2
        finally:
            job.close()


class _Stop(Exception):
    """Ends ``npr sample`` with exit code 2; its message, if any, is this rank's error."""


class _SampleJob:
    """``npr sample`` on one process, or on each rank under torchrun: rank 0 keeps the log
    (reads it, folds the ranks' parts into it, reports); every rank claims problems as it has
    room, writing what it finishes to a part file of its own."""

    def __init__(self, args, out, problems, template, params, grammar, device, ranks) -> None:
        from npr_graph.ranks import Claims

        from .rejection import claims_path

        self.args, self.out, self.problems, self.template = args, out, problems, template
        self.params, self.grammar, self.device, self.ranks = params, grammar, device, ranks
        self.claims = Claims(claims_path(out))
        self.log = None

    def _agree(self, failure: str | None, then: str = "") -> None:
        """Stop every rank if any failed; a rank that failed tells why."""
        if self.ranks.any_failed(failure is not None):
            raise _Stop(failure + then) if failure is not None else _Stop()

    def run(self, console: Console) -> int:
        from npr_graph.evaluate import changed_problems, problem_progress

        from .rejection import Outcome, SampleLog, SamplePart, SamplingReport, rejection_sample

        ranks = self.ranks
        failure = done = None
        if ranks.is_main:
            try:
                self.log = SampleLog(self.out, _sample_settings(self.args, self.grammar))
                # an earlier run's ranks, killed before rank 0 folded their parts in
                self.log.absorb_parts()
                self.claims.clear()
                done = self.log.done
                keys = {pid: o.problem_key for pid, o in self.log.outcomes.items()}
                now = [(p.id, p.key) for p in self.problems]
                failure = changed_problems(keys, now, self.args.data, self.out)
            except (ValueError, OSError) as error:
                failure = str(error)
        self._agree(failure)
        done = ranks.broadcast(done)
        todo = [(i, p) for i, p in enumerate(self.problems) if p.id not in done]
        if ranks.is_main and self.log.resumed:
            console.print(
                f"resuming {self.out}: {len(self.problems) - len(todo)} of "
                f"{len(self.problems)} problems are done",
                markup=False,
            )
        this_run = SamplingReport()
        if todo:
            engine = self._engine()
            writer = self.log if not ranks.distributed else SamplePart(self.out, ranks.rank)
            # Under torchrun rank 0's bar counts the problems it finished or another rank took,
            # and the traces it accepted.
            progress = problem_progress("sample", enabled=ranks.is_main)
            task = progress.add_task("", total=len(todo))
            accepted, here = 0, " here" if ranks.distributed else ""

            def finished(outcome: Outcome, trace: dict | None) -> None:
                nonlocal accepted
                writer.write(outcome, trace)
                accepted += trace is not None
                description = f"{accepted} accepted{here}; last: problem {outcome.id}"
                progress.update(task, advance=1, description=description)

            def claim(index: int) -> bool:
                return self.claims.take(index, lambda: progress.advance(task))

            try:
                with progress:
                    _, this_run = rejection_sample(
                        engine,
                        [problem for _, problem in todo],
                        self.template,
                        self.params,
                        mode=self.args.mode,
                        chat=_chat(self.args),
                        batch=self.args.batch,
                        on_problem=finished,
                        indices=[index for index, _ in todo],
                        claim=claim if ranks.distributed else None,
                        reward=self.args.reward,
                    )
            except (OSError, ValueError) as error:  # writing (a full disk), a reward that
                # refuses a problem: what is written is whole
                raise _Stop(
                    f"{error}; the problems written so far are kept, and the same command "
                    "resumes the run"
                ) from error
            finally:
                if writer is not self.log:
                    writer.close()
        # a collective, so also the barrier before rank 0 folds in what every rank wrote
        not_run = {k: why for part in ranks.gather(this_run.not_run) for k, why in part.items()}
        failure = None
        if ranks.is_main and ranks.distributed:
            try:
                self.log.absorb_parts()
                self.claims.clear()
            except (ValueError, OSError) as error:
                failure = str(error)
        self._agree(failure, "; the same command folds the ranks' parts in and resumes the run")
        if not ranks.is_main:
            return 0
        report = self.log.report([p.id for p in self.problems], not_run)
        json.dump(report.to_dict(), sys.stdout)
        print()
        for line in report.to_dict()["not_run"]:
            console.print(Text.assemble(("not run:", "yellow"), f" {line}"))
        console.print(
            f"accepted {report.accepted} of {report.problems} problems -> {self.out}",
            markup=False,
        )
        return 0

    def _engine(self):
        """Every rank's engine (each on its own device); rank 0 then starts the log. A failure
        on any rank stops them all, and a model that fails to load leaves no files."""
        from npr_graph.engine.engine import Engine
        from npr_graph.models import load_model

        args, device, failure, engine = self.args, self.device, None, None
        try:
            model, tokenizer = load_model(
                args.model, dtype=args.dtype, tags=args.tags, grammar=self.grammar
            )
            engine = Engine(
                model.to(device),
                tokenizer,
                device=device,
                grammar=self.grammar,
                kv_memory_bytes=args.kv_memory,
            )
        except (ValueError, OSError) as error:
            failure = str(error)
        self._agree(failure)
        failure = None
        if self.log is not None:
            try:
                self.log.start()
            except OSError as error:
                failure = str(error)
        self._agree(failure)
        return engine

    def close(self) -> None:
        if self.log is not None:
            self.log.close()


def _chat(args: argparse.Namespace) -> bool | None:
    """``--no-chat``: the raw prompt; else the chat template when the tokenizer has one."""
    return False if args.no_chat else None


def _sample_settings(args: argparse.Namespace, grammar: str) -> dict:
    """What decides ``npr sample``'s traces: a rerun resumes only with the same."""
    from pathlib import Path

    from npr_graph.evaluate import absolute_path
    from npr_graph.prompts import template_identity

    return {
        "data": str(Path(args.data).resolve()),
        "model": absolute_path(args.model),
        "tags": args.tags,
        "mode": args.mode,
        "prompt": template_identity(args.prompt),
        "grammar": grammar,
        "tries": args.tries,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
        "reward": args.reward,
        "chat": _chat(args),
        "dtype": args.dtype,
        "prompt_field": args.prompt_field,
        "answer_field": args.answer_field,
    }


def add_commands(commands: argparse._SubParsersAction) -> None:
    from npr_graph.cli import add_kv_memory_argument, add_threads_argument

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
        "(OUT's progress file, beside it, says which problems are done); under torchrun the "
        "ranks share the problems, each claiming the next one it has room for.",
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
        help="the format decoded and checked (default: the prompt's, multiverse for a template "
        "of Multiverse tags, else npr)",
    )
    sample.add_argument(
        "--no-chat",
        action="store_true",
        help="the raw prompt, without the tokenizer's chat template (as a config's chat = false)",
    )
    sample.add_argument("--tries", type=int, default=8)
    sample.add_argument(
        "--reward", default="accuracy", help="the registered reward that decides correctness"
    )
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
    add_threads_argument(sample)
    sample.add_argument("--prompt-field", default=None)
    sample.add_argument("--answer-field", default=None)
    sample.set_defaults(run=cmd_sample)
