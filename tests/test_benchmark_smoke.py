"""Smoke test of the foundation benchmark at a tiny size: the functions run, and the plain
reference token loop agrees with the library's ``official`` layout. Correctness only; no timing
is asserted."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from npr_graph import attention_mask, parse, position_ids, validate
from npr_graph.tokenizers import CharTokenizer

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load("graph")
reference = _load("reference_mask")

PROMPT = "User: count the pairs (a, b) with a < b.\nAssistant: "


@pytest.fixture(scope="module")
def tokenizer():
    return CharTokenizer(special_tags=True)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_trace_is_well_formed(tokenizer, seed):
    text = bench.make_trace(tokenizer, 2000, seed=seed)
    assert text == bench.make_trace(tokenizer, 2000, seed=seed)  # deterministic
    graph = parse(text)
    assert validate(graph) == []
    assert len(graph.blocks) >= 2
    assert all(2 <= block.width <= 5 for block in graph.blocks)
    assert "\\boxed{" in text
    assert 1500 < len(tokenizer.encode(text)) < 2500


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reference_loop_equals_official_mode(tokenizer, seed):
    text = bench.make_trace(tokenizer, 2000, seed=seed, blocks=3)
    prompt = tokenizer.encode(PROMPT)
    ids = tokenizer.encode(text)
    tags = reference.tag_token_ids(tokenizer)
    graph = parse(ids, tokenizer=tokenizer, prompt_ids=prompt)
    full = prompt + ids
    mask = reference.reference_attention_mask(full, tags, start=len(prompt))
    positions = reference.reference_position_ids(full, tags, start=len(prompt))
    assert torch.equal(mask, attention_mask(graph, mode="official"))
    assert torch.equal(positions, position_ids(graph, mode="official"))
    # the official layout really differs from plain causal/sequential here
    assert not torch.equal(mask, torch.ones_like(mask).tril())
    assert not torch.equal(positions, torch.arange(len(full)))


def test_reference_needs_single_token_tags():
    with pytest.raises(ValueError, match="single tokens"):
        reference.tag_token_ids(CharTokenizer(special_tags=False))


def test_run_and_report(tokenizer, capsys):
    results = bench.run(
        quick=True,
        repeats=1,
        tokens=2048,
        sizes=(1024, 2048),
        throughput_mb=0.05,
        tokenizer=tokenizer,
        special=tokenizer,
        prompt=PROMPT,
    )
    pipeline = results["pipeline"]
    assert pipeline["violations"] == []
    assert set(pipeline["stages_ms"]) == {
        "parse_ids",
        "parse_ids_lenient",
        "decode_pieces",
        "parse_text",
        "validate",
        "position_ids",
        "compact_mask",
    }
    assert [row["target_tokens"] for row in results["masks"]] == [1024, 2048]
    for row in results["masks"]:
        assert row["dense_bytes"] == row["tokens"] ** 2
        assert row["compact_bytes"] < row["dense_bytes"]
    assert results["throughput"]["bytes"] > 40_000
    assert results["reference"]["mask_equal"]
    assert results["reference"]["positions_equal"]
    if "hotspots" in results:
        assert results["hotspots"]
    bench.print_report(results)
    out = capsys.readouterr().out
    assert "(d) reference token loop" in out
    json.loads(json.dumps(results, default=str))


def test_quick_skips_large_dense(tokenizer):
    rows = bench.bench_masks(tokenizer, (512, 1024), repeats=1, dense_max=512)
    assert rows[0]["dense_ms"] is not None
    assert rows[1]["dense_ms"] is None and rows[1]["dense_bytes"] is None


def test_step_planning_benchmark_compares_equal_tables():
    """The cached slot table the engine builds equals the one rebuilt from segments, and its
    page table the one cut out of the padded table (the benchmark asserts both), after forks and
    appends; the rows carry what the benchmark reports."""
    planning = _load("step_planning")
    row = planning.bench(4, 300, repeats=2)
    assert row["lanes"] == 4 and row["slot_table_cached_ms"] > 0 and row["speedup"] > 0
    assert row["page_table_ms"] > 0 and row["page_table_speedup"] > 0
    assert row["append_us_per_lane"] > 0
    lanes = planning.group(3, 280)
    for step in range(20):  # appends cross page boundaries; forks copy the cache
        for lane in lanes:
            lane.append_slots(1 + step % 3)
        assert torch.equal(
            planning.slot_table(lanes).slots, planning.rebuilt_slot_table(lanes).slots
        )
        level = planning.flat_level(planning.SlotViews.of(lanes))
        indptr, indices = planning.padded_page_table(lanes)
        assert torch.equal(level.kv_indptr, indptr) and torch.equal(level.kv_indices, indices)


def test_step_planning_benchmark_stops_when_its_sides_differ(monkeypatch):
    """A side that builds other tables is an error (a RuntimeError, not an assert that
    ``python -O`` skips), not a ratio."""
    planning = _load("step_planning")
    rebuilt = planning.rebuilt_slot_table

    def off_by_one(lanes):
        table = rebuilt(lanes)
        return planning.SlotTable(table.slots, table.mask, table.lengths + 1)

    monkeypatch.setattr(planning, "rebuilt_slot_table", off_by_one)
    with pytest.raises(RuntimeError):
        planning.bench(4, 300, repeats=2)


def test_engine_host_benchmark_splits_steps_into_host_and_model_time():
    host = _load("engine_host")
    rows = host.main(["--widths", "1,2", "--step-tokens", "8", "--repeats", "1"])
    assert [(r["backend"], r["width"]) for r in rows] == [
        ("torch", 1), ("torch", 2), ("planned", 1), ("planned", 2)
    ]  # fmt: skip
    for row in rows:
        assert row["host_ms_per_step"] > 0 and row["model_ms_per_step"] > 0
        # the decode steps' own time: the call's prefill and graph building are left out
        assert 0 < row["decode_s"] < row["call_s"]
    # the structure is forced: both paths decode the same steps
    assert rows[0]["decode_steps"] == rows[2]["decode_steps"] == 7
    assert rows[1]["decode_steps"] == rows[3]["decode_steps"] > 7


def test_decode_benchmark_runs_on_the_embedded_model(smollm2_tokenizer):
    """benchmarks/decode.py at a tiny size on SmolLM2: every side decodes the same token count,
    the engine's width-2 block takes fewer steps than tokens and stores the prefix once."""
    decode = _load("decode")
    rows = decode.bench_dtype("float32", [2], step_tokens=6)
    row = rows[2]
    assert row["tokens"] > 2 * 6, "two 6-token steps and the plans, tags and takeaway"
    assert row["engine_parallel_decode_steps"] < row["tokens"]
    assert row["peak_kv_pages"] <= row["naive_kv_pages"]
    for key in ("hf_batch1_tok_s", "hf_batch2_tok_s", "engine_sequential_tok_s", "ceiling"):
        assert row[key] > 0


def test_sampling_benchmark_runs_and_both_sides_agree(capsys):
    """benchmarks/sampling.py at a tiny size: every setting timed on both sides; the script
    stops when the row-by-row loop and the batched selection pick different greedy tokens."""
    sampling = _load("sampling")
    assert sampling.main(["--vocab", "500", "--rows", "1,3", "--repeats", "1", "--json"]) == 0
    out = capsys.readouterr().out
    results = json.loads(out[out.index("{") :])["results"]
    assert len(results) == 2 * len(sampling.SETTINGS)
    assert all(r["row_by_row_ms"] > 0 and r["batched_ms"] > 0 for r in results)
    inputs = sampling.case(3, 500, dict(temperature=0), "cpu")
    old, _ = sampling.row_by_row(*inputs[:2], [0, 1, 2], *inputs[2:])
    new, _ = sampling.batched(*inputs[:2], [0, 1, 2], *inputs[2:])
    assert torch.equal(old, new)


def test_repetition_penalty_benchmark_times_both_sides_and_stops_when_they_differ(monkeypatch):
    """benchmarks/repetition_penalty.py at a tiny size: both sides timed; a side that penalizes
    other logits is an error, not a ratio."""
    penalty = _load("repetition_penalty")
    row = penalty.run_case(3, 50, 500, steps=3, repeats=2)
    assert row["reference_ms"] > 0 and row["engine_ms"] > 0
    monkeypatch.setattr(penalty, "apply_repetition_penalty", lambda *args: None)
    with pytest.raises(RuntimeError, match="penalize differently"):
        penalty.run_case(3, 50, 500, steps=3, repeats=2)


def test_repicks_benchmark_counts_the_overlapped_engines_re_picks(capsys, smollm2_tokenizer):
    """benchmarks/repicks.py at a tiny size on SmolLM2: every setting decodes, and re-picks are
    counted among the sampled tokens."""
    repicks = _load("repicks")
    assert repicks.main(["--tokens", "12", "--questions", "2", "--dtype", "float32", "--json"]) == 0
    out = capsys.readouterr().out
    rows = json.loads(out[out.index("[") :])
    assert [r["sampling"] for r in rows] == list(repicks.SETTINGS)
    assert all(r["sampled_tokens"] > 0 and 0 <= r["repicks"] <= r["sampled_tokens"] for r in rows)


def test_graph_benchmark_checks_the_compact_mask_against_the_reference(tokenizer, monkeypatch):
    """(d)'s headline speed-up is the reference loop against parse + compact mask: the compact
    mask must equal the reference's too, not only the dense one. A compact mask that lets every
    token see every earlier one (causal) is reported unequal."""
    text = bench.make_trace(tokenizer, 2000, seed=0, blocks=3)
    prompt = tokenizer.encode(PROMPT)
    right = bench.bench_reference(tokenizer, text, prompt, repeats=1)
    assert right["mask_equal"] and right["compact_mask_equal"] and right["positions_equal"]
    real = bench.compact_mask

    def causal(graph, mode="native"):
        mask = real(graph, mode=mode)
        mask.visible = torch.ones_like(mask.visible)
        return mask

    monkeypatch.setattr(bench, "compact_mask", causal)
    wrong = bench.bench_reference(tokenizer, text, prompt, repeats=1)
    assert wrong["mask_equal"] and wrong["positions_equal"]  # the dense path is untouched
    assert wrong["compact_mask_equal"] is False


def test_decode_benchmark_counts_each_blocks_own_kv_pages(smollm2_tokenizer):
    """The KV pages reported for a width are that block's peak, not the largest of every run on
    the engine so far: width 2 after width 8 stays within its naive count."""
    decode = _load("decode")
    model, tokenizer = decode.load_model(None, dtype="float32", tags="special")
    engine = decode.Engine(model, tokenizer)
    prompt_ids = engine.encode_prompt(decode.QUESTION)
    wide, narrow = (decode.run_width(engine, prompt_ids, width, 16) for width in (8, 2))
    assert narrow["peak_kv_pages"] < wide["peak_kv_pages"]
    for row in (wide, narrow):
        assert row["peak_kv_pages"] <= row["naive_kv_pages"]


@pytest.fixture(scope="module")
def train_forward_case(smollm2_tokenizer):
    """The benchmark's tokenizer (SmolLM2's, the tags as special tokens) and a tiny model."""
    from npr_graph.models import tiny_model

    train_forward = _load("train_forward")
    tokenizer = train_forward.with_special_tags(train_forward.load_smollm2())
    model = tiny_model(
        "llama", tokenizer=tokenizer, seed=0, hidden_size=32, intermediate_size=64,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
    ).train()  # fmt: skip
    return train_forward, tokenizer, model


def test_train_forward_benchmark_alternates_the_sides(train_forward_case, monkeypatch):
    """Both sides are warmed up, then timed in alternating rounds (drift hits both); the row
    carries the log-prob and gradient differences, which are tiny."""
    train_forward, tokenizer, model = train_forward_case
    calls = []
    for name in ("run_reference", "run_packed"):
        real = getattr(train_forward, name)
        monkeypatch.setattr(
            train_forward,
            name,
            lambda *a, real=real, name=name, **k: calls.append(name) or real(*a, **k),
        )
    row = train_forward.bench(tokenizer, model, samples=2, tokens=300, repeats=2)
    assert calls == ["run_reference", "run_packed"] * 3
    assert row["max_logprob_diff"] < 1e-4 and row["max_gradient_diff"] < 1e-4
    assert row["reference_s"] > 0 and row["packed_s"] > 0


def test_train_forward_benchmark_stops_when_the_gradients_differ(train_forward_case, monkeypatch):
    """A packed side whose backward leaves the weights without gradients (same log-probs, less
    work) is refused instead of timed."""
    train_forward, tokenizer, model = train_forward_case
    real = train_forward.run_packed

    def no_gradients(*args, **kwargs):
        values = real(*args, **kwargs)
        model.zero_grad(set_to_none=True)
        return values

    monkeypatch.setattr(train_forward, "run_packed", no_gradients)
    with pytest.raises(RuntimeError, match="gradients"):
        train_forward.bench(tokenizer, model, samples=2, tokens=300, repeats=1)


def test_prefill_benchmark_compares_budgets_on_the_embedded_model(capsys, smollm2_tokenizer):
    """benchmarks/prefill.py at a tiny size on SmolLM2: each budget runs in a process of its own,
    the budgeted side takes more forwards, and both pick the same tokens (else it exits 1)."""
    prefill = _load("prefill")
    args = ["--prompts", "3", "--length", "20", "--budgets", "0,16", "--repeats", "1"]
    assert prefill.main([*args, "--threads", "1"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["budget"] for row in rows] == ["none", 16]
    assert rows[0]["prefill_forwards"] == 1 and rows[1]["prefill_forwards"] >= 60 // 16
    assert all(row["seconds"] > 0 and row["peak_mib_above_loaded"] >= 0 for row in rows)


def test_admission_benchmark_decodes_the_same_samples_both_ways(capsys, smollm2_tokenizer):
    """benchmarks/admission.py at a tiny size on SmolLM2 in float32: batches of prompts and
    continuous admission decode the same samples (else it exits 1), the latter in no more
    decode steps."""
    admission = _load("admission")
    args = ["--prompts", "4", "--batch", "2", "--max-tokens", "12", "--dtype", "float32"]
    assert admission.main([*args, "--repeats", "1", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["same_samples"] == summary["samples"] == 8
    steps = {run["side"]: run["decode_steps"] for run in summary["runs"]}
    assert 0 < steps["continuous"] <= steps["batches"]
    rates = {run["side"]: run["tokens_per_s"] for run in summary["runs"]}
    assert summary["speedup"] == pytest.approx(rates["continuous"] / rates["batches"])
    # --batch 0: every prompt at once, on both sides (the batches side decoded none)
    assert admission.main([*args[:2], "--batch", "0", *args[4:], "--repeats", "1", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["same_samples"] == summary["samples"] == 8
    assert all(run["tokens"] > 0 for run in summary["runs"])
