"""The training forward on packed graph rows reproduces the engine's sampled log-probs."""

import copy

import pytest
import torch

import npr_graph as ng
from npr_graph.engine.engine import Engine
from npr_graph.engine.sampling import SamplingParams
from npr_graph.models import add_tag_tokens, default_tokenizer, tiny_model
from npr_graph.tokenizers import CharTokenizer
from papo.data import pack
from papo.forward import GraphAttentionPlan, row_logprobs

SHORT = dict(max_plan_tokens=4, max_step_tokens=10, max_takeaway_tokens=6)


@pytest.fixture(scope="module")
def special_tokenizer():
    tok = copy.deepcopy(default_tokenizer())
    add_tag_tokens(tiny_model("llama", tokenizer=tok), tok, "npr")
    return tok


def sampled_graphs(family, tokenizer, temperature=1.0, seed=3):
    model = tiny_model(family, tokenizer=tokenizer)
    engine = Engine(model, tokenizer, page_size=4, num_pages=2048)
    params = SamplingParams(
        temperature=temperature,
        max_new_tokens=60,
        min_branches=2,
        max_branches=3,
        seed=seed,
        n=2,
        **SHORT,
    )
    graphs = engine.generate(
        ["What is 2+2?", "Name a prime."], params, mode="constrained", chat=False
    )
    return model, graphs


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_packed_training_logprobs_equal_engine_logprobs(family, special_tokenizer):
    model, graphs = sampled_graphs(family, special_tokenizer, temperature=0.7)
    assert all(ng.metrics(g)["is_parallel"] for g in graphs)
    for max_tokens in (10_000, 1):  # everything in one row; one row per sample
        rows = pack(graphs, max_tokens=max_tokens)
        assert len(rows) == (1 if max_tokens > 1 else len(graphs))
        for row in rows:
            with torch.no_grad():
                logprobs, entropy = row_logprobs(model, row, temperature=0.7, with_entropy=True)
            expected = row.old_logprobs[row.scored]
            assert not torch.isnan(expected).any(), "every response token has an engine log-prob"
            assert (logprobs - expected).abs().max() <= 1e-4
            assert entropy is not None and (entropy >= 0).all()


def test_gradients_match_a_dense_masked_forward(special_tokenizer):
    model, graphs = sampled_graphs("llama", special_tokenizer)
    (row,) = pack(graphs[:2], max_tokens=10_000)
    logprobs, _ = row_logprobs(model, row)
    logprobs.sum().backward()
    packed_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    total = 0.0
    for graph in graphs[:2]:
        ids = torch.tensor(graph.token_ids)[None]
        mask = ng.attention_mask(graph)[None, None]
        logits = model(
            input_ids=ids, attention_mask=mask, position_ids=ng.position_ids(graph)[None]
        ).logits[0]
        start = graph.prompt_num_tokens
        dense = torch.log_softmax(logits.float(), -1)[start - 1 : -1].gather(
            1, ids[0, start:, None]
        )
        total = total + dense.sum()
    total.backward()
    assert float(logprobs.detach().sum()) == pytest.approx(float(total.detach()), abs=1e-3)
    for packed, dense in zip(packed_grads, (p.grad for p in model.parameters()), strict=True):
        assert torch.allclose(packed, dense, atol=1e-4, rtol=1e-3)


def test_plan_groups_follow_the_dag():
    tokenizer = CharTokenizer()
    text = (
        "<guideline><plan>1: a</plan><plan>2: b</plan></guideline>"
        "<step>1: x</step><step>2: y</step><takeaway>z</takeaway> \\boxed{1}"
    )
    graph = ng.parse(tokenizer.encode(text), tokenizer=tokenizer)
    plan = GraphAttentionPlan(ng.compact_mask(graph), query_chunk=10_000)
    # the header and the first step are one causal run (step 1 sees all before it); step 2
    # sees the header only; the takeaway and the answer see everything before them
    assert len(plan.chunks) == 3
    head, step2, tail = plan.chunks
    header_end = graph.nodes_of("step")[0].token_start
    assert head.causal_only and head.key_ranges == [(0, head.q_end)]
    assert step2.q_start == graph.nodes_of("step")[1].token_start
    assert step2.key_ranges == [(0, header_end), (step2.q_start, step2.q_end)]
    assert step2.full == header_end
    assert tail.key_ranges == [(0, tail.q_end)] and tail.full == tail.q_start
    dense = ng.attention_mask(graph)
    for chunk_id, chunk in enumerate(plan.chunks):
        mask = plan.mask(chunk_id, None, torch.device("cpu"))
        keys = torch.cat([torch.arange(a, b) for a, b in chunk.key_ranges])
        rows = dense[chunk.q_start : chunk.q_end]
        if mask is None:
            assert torch.equal(rows[:, keys], torch.ones_like(rows[:, keys]).tril_())
        else:
            assert torch.equal(rows[:, keys], mask)
        assert rows.sum() == rows[:, keys].sum(), "no visible key is left out"


def test_plan_chunks_are_exact_on_random_masks():
    """Any segment table (each segment sees itself), segments in runs or interleaved, several
    rows' masks concatenated: every chunk's keys and mask are the dense mask's rows, and no
    visible key is left out."""
    import random

    from npr_graph.layout import CompactMask

    rng = random.Random(0)
    for trial in range(60):
        masks = []
        for _ in range(rng.randint(1, 3)):
            count = rng.randint(1, 12)
            visible = (torch.rand(count, count, generator=torch.Generator().manual_seed(trial))
                       < 0.5) | torch.eye(count, dtype=torch.bool)  # fmt: skip
            ids = [rng.randrange(count) for _ in range(rng.randint(1, 30))]
            masks.append(CompactMask(torch.tensor(sorted(ids) if trial % 2 else ids), visible))
        mask = CompactMask.concat(masks)
        dense = mask.to_dense()
        for query_chunk in (1, 4, 1024):
            plan = GraphAttentionPlan(mask, query_chunk=query_chunk)
            covered = 0
            for chunk_id, chunk in enumerate(plan.chunks):
                chunk_mask = plan.mask(chunk_id, None, torch.device("cpu"))
                keys = torch.cat([torch.arange(a, b) for a, b in chunk.key_ranges])
                rows = dense[chunk.q_start : chunk.q_end]
                want = torch.ones_like(rows[:, keys]).tril_(len(keys) - len(rows))
                assert torch.equal(rows[:, keys], want if chunk_mask is None else chunk_mask)
                assert rows.sum() == rows[:, keys].sum(), "no visible key is left out"
                covered += len(rows)
            assert covered == len(dense)


def test_query_chunks_are_exact(special_tokenizer):
    model, graphs = sampled_graphs("qwen3", special_tokenizer)
    (row,) = pack(graphs, max_tokens=10_000)
    with torch.no_grad():
        whole, _ = row_logprobs(model, row)
        chunked, _ = row_logprobs(model, row, query_chunk=7)
    assert torch.allclose(whole, chunked, atol=1e-5)


def test_train_forward_benchmark_smoke(special_tokenizer):
    """The benchmark's reference (one sample, dense float mask, full logits) and packed paths
    give the same log-probs at a tiny size; no timing is checked."""
    import importlib.util
    import sys
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location("_bench_train", folder / "train_forward.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model = tiny_model("llama", tokenizer=special_tokenizer).train()
    graphs = bench.make_graphs(special_tokenizer, samples=2, tokens=160)
    reference = bench.run_reference(model, graphs)
    reference_grad = model.model.embed_tokens.weight.grad.clone()
    packed = bench.run_packed(model, graphs, row_tokens=10_000)
    assert reference.shape == packed.shape
    assert (reference - packed).abs().max() <= 1e-4
    assert torch.allclose(model.model.embed_tokens.weight.grad, reference_grad, atol=1e-4)


def test_sft_traces_need_a_prompt_that_is_not_blank(tmp_path):
    """A blank prompt is a bad record, as a blank problem is for RL data (it trained the
    response on the template alone); a null id is the record number, not "None"."""
    from papo.problems import read_traces

    path = tmp_path / "traces.jsonl"
    path.write_text('{"prompt": "Q", "response": "A"}\n{"prompt": "  ", "response": "A"}\n')
    with pytest.raises(ValueError, match=r"traces.jsonl:2: no problem/question/prompt field"):
        read_traces(path)
    path.write_text('{"problem": "", "prompt": "Q", "response": "A", "id": null}\n')
    (trace,) = read_traces(path)
    assert (trace.id, trace.prompt) == ("0", "Q")
