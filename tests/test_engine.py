"""The executor on tiny random-weight models: consistency with training, fork/join, budgets."""

import copy
import dataclasses
import gc
import weakref

import pytest
import torch

import npr_graph as ng
from npr_graph.engine.engine import Engine, PromptError
from npr_graph.engine.kv import pages_needed
from npr_graph.engine.lanes import LaneStatus
from npr_graph.engine.sampling import SamplingParams
from npr_graph.engine.scheduler import Scheduler
from npr_graph.engine.structure import Format
from npr_graph.models import add_tag_tokens, default_tokenizer, tiny_model

FAMILIES = ("llama", "qwen2", "qwen3", "gemma3")
SHORT = dict(max_plan_tokens=4, max_step_tokens=10, max_takeaway_tokens=6)


@pytest.fixture(scope="module")
def tokenizer():
    tok = copy.deepcopy(default_tokenizer())
    return tok


@pytest.fixture(scope="module")
def special_tokenizer(tokenizer):
    tok = copy.deepcopy(tokenizer)
    add_tag_tokens(tiny_model("llama", tokenizer=tok), tok, "npr")
    return tok


def make_engine(family, tok, **kwargs):
    model = tiny_model(family, tokenizer=tok)
    return Engine(
        model,
        tok,
        page_size=kwargs.pop("page_size", 4),
        num_pages=kwargs.pop("num_pages", 2048),
        **kwargs,
    )


def dense_logprobs(model, graph):
    """One dense forward of the plain model with the graph's mask and positions."""
    ids = torch.tensor(graph.token_ids)[None].to(model.device)
    mask = ng.attention_mask(graph)[None, None].to(model.device)
    if getattr(model.config, "sliding_window", None) and "sliding_attention" in getattr(
        model.config, "layer_types", []
    ):
        window = ng.attention_mask(graph, sliding_window=model.config.sliding_window)
        mask = {"full_attention": mask, "sliding_attention": window[None, None].to(model.device)}
    with torch.no_grad():
        logits = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=ng.position_ids(graph)[None].to(model.device),
        ).logits[0]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    start = graph.prompt_num_tokens
    return logprobs[start - 1 : -1].gather(1, ids[0, start:, None]).squeeze(1).cpu()


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_forward_reproduces_engine_logprobs(family, special_tokenizer):
    engine = make_engine(family, special_tokenizer)
    params = SamplingParams(
        temperature=1.0, max_new_tokens=60, min_branches=2, max_branches=4, seed=7, n=2, **SHORT
    )
    graphs = engine.generate(
        ["What is 2+2?", "Name three primes."], params, mode="constrained", chat=False
    )
    assert len(graphs) == 4
    for graph in graphs:
        assert graph.metadata["layout_consistent"]
        metrics = ng.metrics(graph)
        assert graph.metadata["forks"] >= 1 and metrics["is_parallel"]
        # the engine's running counts (budgets read them) are the graph's own measures
        assert graph.metadata["critical_path_tokens"] == metrics["critical_path_tokens"]
        assert graph.metadata["total_tokens"] == metrics["total_tokens"]
        engine_logprobs = torch.tensor(graph.logprobs[graph.prompt_num_tokens :])
        assert (dense_logprobs(engine.model, graph) - engine_logprobs).abs().max() <= 1e-4
    assert engine.pool.num_used == 0, "every page is freed when all requests finish"
    assert engine.model.config._attn_implementation == "sdpa", (
        "the engine leaves the model as it was"
    )


def test_forced_tokens_are_the_engine_written_ones(special_tokenizer):
    engine = make_engine("llama", special_tokenizer)
    params = SamplingParams(
        temperature=0, max_new_tokens=80, min_branches=3, max_branches=3, **SHORT
    )
    (graph,) = engine.generate(["Q"], params, mode="constrained", chat=False)
    fmt = Format(special_tokenizer, special=True)
    for step_index, step in enumerate(graph.nodes_of("step")):
        header = fmt.encode(f"<step>\n{step_index + 1}:")
        span = slice(step.token_start, step.token_start + len(header))
        assert graph.token_ids[span] == header
        assert all(graph.forced[span])
    for plan_index, plan in enumerate(graph.nodes_of("plan")):
        label = f"{plan_index + 1}:"
        assert plan.content.startswith(label) and not plan.content.startswith(label * 2)
    takeaway = graph.nodes_of("takeaway")[0]
    assert graph.forced[takeaway.token_start]
    assert ng.metrics(graph)["widths"][0] == 3
    assert ng.validate(graph, "lenient") == []
    sampled = [i for i, f in enumerate(graph.forced) if not f and i >= graph.prompt_num_tokens]
    assert sampled, "the model writes the contents"


def test_same_seed_same_graph(special_tokenizer):
    engine = make_engine("qwen3", special_tokenizer)
    params = SamplingParams(temperature=1.0, max_new_tokens=50, seed=11, **SHORT)
    first = engine.generate(["Q"], params, mode="constrained", chat=False)[0]
    second = engine.generate(["Q"], params, mode="constrained", chat=False)[0]
    other = engine.generate(
        ["Q"],
        SamplingParams(temperature=1.0, max_new_tokens=50, seed=12, **SHORT),
        mode="constrained",
        chat=False,
    )[0]
    assert first.token_ids == second.token_ids
    assert first.token_ids != other.token_ids


def test_budgets_truncate_cleanly(special_tokenizer):
    engine = make_engine("llama", special_tokenizer)
    params = SamplingParams(
        temperature=0,
        max_new_tokens=20,
        max_step_tokens=50,
        max_plan_tokens=3,
        min_branches=2,
        max_branches=2,
    )
    (graph,) = engine.generate(["Q"], params, mode="constrained", chat=False)
    assert graph.metadata["truncated"] and graph.metadata["finish_reason"] == "length"
    steps = graph.nodes_of("step")
    assert len(steps) == 2 and all(s.close_tag is not None for s in steps), (
        "open branches get their closing tag"
    )
    assert graph.metadata["critical_path_tokens"] <= 20 + 4
    total = SamplingParams(
        temperature=0,
        max_new_tokens=200,
        max_total_tokens=30,
        max_plan_tokens=3,
        max_step_tokens=50,
    )
    (graph,) = engine.generate(["Q"], total, mode="constrained", chat=False)
    assert graph.metadata["truncated"] and graph.metadata["total_tokens"] <= 30 + 8
    assert engine.pool.num_used == 0
    # cut inside the first plan: the guideline closes, with no empty plans up to min_branches
    for min_branches in (1, 5):
        inside = SamplingParams(temperature=0, max_new_tokens=8, max_plan_tokens=40,
                                min_branches=min_branches, max_branches=6)  # fmt: skip
        (graph,) = engine.generate(["Q"], inside, mode="constrained", chat=False)
        assert len(graph.nodes_of("plan")) == 1, graph.response_text
        assert graph.metadata["critical_path_tokens"] <= 8 + 4


@pytest.mark.parametrize("prefill_budget", [8192, 3])
def test_small_pool_preempts_and_resumes(special_tokenizer, prefill_budget):
    params = SamplingParams(
        temperature=0, max_new_tokens=40, n=2, min_branches=2, max_branches=2, **SHORT
    )
    prompts = ["First question?", "Second one?", "A third."]
    roomy = make_engine("llama", special_tokenizer).generate(
        prompts, params, mode="constrained", chat=False
    )
    tight = make_engine("llama", special_tokenizer, num_pages=64, max_prefill_tokens=prefill_budget)
    graphs = tight.generate(prompts, params, mode="constrained", chat=False)
    assert tight.stats.preemptions > 0
    assert [g.token_ids for g in graphs] == [g.token_ids for g in roomy]
    handed = []  # a preempted prompt is handed over once, when it ends
    tight.generate(
        prompts,
        params,
        mode="constrained",
        chat=False,
        on_finish=lambda index, graphs: handed.append((index, graphs)),
    )
    assert tight.stats.preemptions > 0 and sorted(index for index, _ in handed) == [0, 1, 2]
    pairs = [g for _, pair in sorted(handed, key=lambda h: h[0]) for g in pair]
    assert [g.token_ids for g in pairs] == [g.token_ids for g in roomy]
    assert sorted(tight.stats.prompt_seconds) == [0, 1, 2]
    assert tight.pool.num_used == 0


def parks(engine):
    """Record, at each preemption, the request's blocks: (forked, joined, of those nested)."""
    seen = []
    park = engine._park

    def recording_park(request):
        lanes = [lane for sample in request.samples for lane in sample.lanes]
        forked = [lane for lane in lanes if lane.branches]
        joined = [lane for lane in forked if lane.continued_by is not None]
        nested = [lane for lane in forked if lane.owner is not None]
        nested_joined = [lane for lane in nested if lane.continued_by is not None]
        seen.append((len(forked), len(joined), len(nested), len(nested_joined)))
        park(request)

    engine._park = recording_park
    return seen


def counting(calls, then=None):
    """A logits processor that records each call (then hands the logits to ``then``)."""

    def processor(context, logits):
        calls.append(len(context))
        return logits if then is None else then(context, logits)

    return processor


def test_a_plan_tag_the_branch_bounds_leave_no_choice_for_is_written_by_the_engine(
    special_tokenizer,
):
    """Below min_branches another <plan> is the only choice, at max_branches </guideline> is:
    the engine writes it (forced, so not trained on; the policy chose nothing there), and
    samples the plan tags only where the count is open."""
    engine = make_engine("llama", special_tokenizer)
    tag_ids = {engine.format.tag_ids[t]: t for t in ("<plan>", "</guideline>")}

    def sampled_tags(min_branches, max_branches):
        params = SamplingParams(temperature=1.0, seed=5, max_new_tokens=60, n=4,
                                min_branches=min_branches, max_branches=max_branches,
                                max_blocks=1, **SHORT)  # fmt: skip
        graphs = engine.generate(["Q?", "R?"], params, mode="constrained", chat=False)
        assert all(b.width in range(min_branches, max_branches + 1)
                   for g in graphs for b in g.blocks)  # fmt: skip
        return [
            tag_ids[token]
            for g in graphs
            for token, forced in zip(g.token_ids, g.forced, strict=True)
            if token in tag_ids and not forced
        ]

    assert sampled_tags(2, 2) == [], "no choice: every plan tag is the engine's"
    assert sampled_tags(3, 3) == []
    open_count = sampled_tags(1, 3)
    assert "</guideline>" in open_count and "<plan>" in open_count


@pytest.mark.parametrize("overlap", [False, True])
def test_a_preempted_request_resumes_where_it_stopped(special_tokenizer, overlap):
    """Preemption keeps a request's lanes: when it is admitted again, prefill forwards rebuild
    the KV of its prompt, forks and joins from the tokens they hold (requests admitted together
    in the same forwards), and decoding goes on. No token is sampled twice, and the samples,
    log-probs and the dense forward's scores are those of a pool that never ran short."""
    params = SamplingParams(
        temperature=1.0, seed=9, max_new_tokens=100, n=2, min_branches=2, max_branches=3, **SHORT
    )
    prompts = ["First question?", "Second one?", "A third, longer question for the pool.", "4",
               "five five"]  # fmt: skip
    roomy = make_engine("llama", special_tokenizer, overlap=overlap)
    roomy_calls: list[int] = []
    expected = roomy.generate(
        prompts, params, mode="constrained", chat=False, logits_processor=counting(roomy_calls)
    )
    tight = make_engine(
        "llama", special_tokenizer, num_pages=80, max_prefill_tokens=16, overlap=overlap
    )
    seen = parks(tight)
    resumed = []  # requests rebuilt together
    rebuild = tight._rebuild
    tight._rebuild = lambda requests: rebuild(requests) or resumed.append(len(requests))
    calls: list[int] = []
    heard: list[int] = []
    graphs = tight.generate(
        prompts,
        params,
        mode="constrained",
        chat=False,
        logits_processor=counting(calls),
        progress=heard.append,
    )
    assert tight.stats.preemptions == len(seen) > 0
    assert any(forked > joined for forked, joined, *_ in seen), "preempted inside a block"
    assert any(joined for _, joined, *_ in seen), "preempted after a block joined"
    assert tight.stats.recomputed_tokens > 0 and max(resumed) > 1
    assert len(calls) == len(roomy_calls), "every token is sampled once"
    assert heard == sorted(heard), "progress counts the preempted request's tokens"
    for graph, reference in zip(graphs, expected, strict=True):
        assert graph.token_ids == reference.token_ids and graph.forced == reference.forced
        assert graph.metadata["layout_consistent"]
        start = graph.prompt_num_tokens
        got = torch.tensor(graph.logprobs[start:])
        assert (got - torch.tensor(reference.logprobs[start:])).abs().max() <= 1e-4
        assert (dense_logprobs(tight.model, graph) - got).abs().max() <= 1e-4
    assert tight.pool.num_used == 0


def test_a_preempted_request_keeps_the_samples_it_finished(special_tokenizer):
    """Samples that ended before their request was preempted stay as they are; only the others
    are rebuilt and decode on (sequential samples here, ended by an end of sequence that a
    processor makes likely after some token pairs)."""
    model = tiny_model("llama", tokenizer=special_tokenizer)
    params = [
        SamplingParams(temperature=1.0, seed=9 + i, max_new_tokens=40 + 30 * i, n=3)
        for i in range(5)
    ]
    prompts = ["First question?", "Second one?", "A third, longer question.", "4", "five five"]

    def run(pages):
        engine = Engine(model, special_tokenizer, page_size=4, num_pages=pages,
                        max_prefill_tokens=16)  # fmt: skip
        eos = sorted(engine.eos_ids)[0]

        def ending(context, logits):
            if hash(tuple(context[-2:])) % 45 == 0:
                logits[eos] += 50
            return logits

        finished = []
        park = engine._park
        engine._park = lambda r: finished.append(sum(s.finished for s in r.samples)) or park(r)
        graphs = engine.generate(
            prompts, params, mode="sequential", chat=False, logits_processor=ending
        )
        assert engine.pool.num_used == 0
        return graphs, finished

    runs = [run(4096), run(32)]
    (want, _), (got, finished) = runs
    assert any(finished), "a request was preempted with a sample already ended"
    cut = {g.metadata["prompt_index"] for g in got if g.metadata["finish_reason"] == "kv_exhausted"}
    assert len(cut) < len(prompts)
    for graph, reference in zip(got, want, strict=True):
        if graph.metadata["prompt_index"] not in cut:
            assert graph.token_ids == reference.token_ids
            start = graph.prompt_num_tokens
            got_lp, want_lp = graph.logprobs[start:], reference.logprobs[start:]
            assert max(abs(a - b) for a, b in zip(got_lp, want_lp, strict=True)) <= 1e-4


def test_a_resumed_request_the_pool_cannot_hold_ends_as_kv_exhausted(
    special_tokenizer, monkeypatch
):
    """Admission keeps a resumed request out until its rebuilt KV fits; should a rebuild run
    out of pages all the same (here the estimate is made to say it needs none), the unfinished
    samples of the requests being rebuilt end as ``kv_exhausted`` with what they wrote, every
    page comes back, and the others decode as they would have."""
    params = SamplingParams(
        temperature=1.0, seed=9, max_new_tokens=100, n=2, min_branches=2, max_branches=3, **SHORT
    )
    prompts = ["First question?", "Second one?", "A third, longer question for the pool."]
    expected = make_engine("llama", special_tokenizer).generate(
        prompts, params, mode="constrained", chat=False
    )
    engine = make_engine("llama", special_tokenizer, num_pages=96, max_prefill_tokens=16)
    monkeypatch.setattr(Scheduler, "pages_to_resume", lambda self, request: 0)
    graphs = engine.generate(prompts, params, mode="constrained", chat=False)
    assert engine.pool.num_used == 0 and engine.stats.preemptions > 0
    reasons = [g.metadata["finish_reason"] for g in graphs]
    assert "kv_exhausted" in reasons
    for graph, reference in zip(graphs, expected, strict=True):
        assert graph.metadata["layout_consistent"]
        if graph.metadata["finish_reason"] == "kv_exhausted":
            assert_cut_and_scored(engine, graph)
        else:
            assert graph.token_ids == reference.token_ids


def test_claim_decides_which_prompts_this_engine_decodes(special_tokenizer):
    """``claim(index)`` is asked once per prompt, when it would be admitted (not again when a
    preempted prompt comes back); the prompts it refuses give no graphs and cost no decoding."""
    params = SamplingParams(
        temperature=1.0, seed=9, max_new_tokens=100, n=2, min_branches=2, max_branches=3, **SHORT
    )
    prompts = ["First question?", "Second one?", "A third, longer question for the pool.", "4"]
    expected = make_engine("llama", special_tokenizer).generate(
        prompts, params, mode="constrained", chat=False
    )
    engine = make_engine("llama", special_tokenizer, num_pages=96)
    asked = []

    def claim(index):
        asked.append(index)
        return index != 1

    graphs = engine.generate(prompts, params, mode="constrained", chat=False, claim=claim)
    assert engine.stats.preemptions > 0 and asked == [0, 1, 2, 3]
    assert [g.metadata["prompt_index"] for g in graphs] == [0, 0, 2, 2, 3, 3]
    assert [g.token_ids for g in graphs] == [g.token_ids for g in expected[:2] + expected[4:]]
    assert sorted(engine.stats.prompt_seconds) == [0, 2, 3]
    handed = []
    engine.generate(
        prompts,
        params,
        mode="constrained",
        chat=False,
        claim=lambda index: index % 2 == 0,
        on_finish=lambda index, graphs: handed.append(index),
    )
    assert sorted(handed) == [0, 2] and engine.pool.num_used == 0


def test_admission_leaves_a_page_of_headroom_per_lane_under_way(special_tokenizer):
    """A waiting prompt is admitted beside running ones only if, once its prompt and first
    tokens have their pages, a page per running lane is still free: else the next steps would
    preempt it, its prefill wasted. With nothing running it is admitted whatever is free."""
    from types import SimpleNamespace

    from npr_graph.engine.kv import PagePool
    from npr_graph.engine.lanes import Request

    pool = PagePool(32, 4)
    request = Request(0, list(range(1, 9)), SamplingParams(n=2), "sequential")  # 2 + 2 pages
    running = [SimpleNamespace(samples=[SimpleNamespace(live_lanes=lambda: [None] * 5)])]

    def admitted(running):
        scheduler = Scheduler([request], pool, max_lanes=64)
        scheduler.running = list(running)
        return scheduler.admit()

    held = [pool.allocate() for _ in range(pool.num_free - (4 + 5) + 1)]
    assert admitted(running) == [], "one page short of the headroom"
    pool.decref(held.pop())
    assert admitted(running) == [request]
    held += [pool.allocate() for _ in range(pool.num_free)]
    assert admitted([]) == [request], "nothing runs: it goes ahead"


@pytest.mark.parametrize("page_size", [1, 2, 3])
def test_a_resumed_request_is_admitted_with_the_pages_of_its_rebuild_and_next_step(
    special_tokenizer, page_size
):
    """What admission counts for a preempted request bounds the pages its rebuild takes plus
    those of its next step, which feeds the tokens its lanes held unfed: a branch's
    engine-written header (``<step>`` and its number) spans pages when they are small, so a
    page per lane is not always enough and the newcomer would be preempted again at once."""
    params = SamplingParams(
        temperature=1.0, seed=5, max_new_tokens=60, n=2, min_branches=3, max_branches=3, **SHORT
    )
    prompts = ["First question?", "Second one?", "A third, longer question for the pool."]
    engine = make_engine(
        "llama", special_tokenizer, page_size=page_size, num_pages=160 // page_size
    )
    counted, taken = [], []
    resume = engine._resume

    def measured_resume(requests):
        counted.append(sum(Scheduler([], engine.pool, 1).pages_to_admit(r) for r in requests))
        free = engine.pool.num_free
        resume(requests)
        lanes = [
            lane
            for request in requests
            for sample in request.samples
            for lane in sample.lanes
            if lane.status is LaneStatus.RUNNING
        ]
        next_step = pages_needed([(lane.kv, len(lane.pending)) for lane in lanes])
        taken.append(free - engine.pool.num_free + next_step)

    engine._resume = measured_resume
    engine.generate(prompts, params, mode="constrained", chat=False)
    assert engine.stats.preemptions > 0 and any(taken)
    assert all(t <= c for t, c in zip(taken, counted, strict=True)), (taken, counted)


def test_scheduler_admits_in_order_within_its_caps_and_preempts_the_newest():
    """Requests are admitted in arrival order while ``max_running`` and ``max_lanes`` allow;
    ``claim`` is asked once per fresh request and a refused one is dropped; preemption takes
    the newest running request back to the front of the queue, where it is admitted first
    and counts as parked."""
    from types import SimpleNamespace

    from npr_graph.engine.kv import PagePool
    from npr_graph.engine.lanes import Request

    def request(index, n=2):
        return Request(index, [1, 2, 3], SamplingParams(n=n), "sequential", arrival=index)

    def run(request):  # as if prefilled: its samples' lanes are live
        request.samples = [SimpleNamespace(live_lanes=lambda: [None], lanes=[]) for _ in range(2)]

    pool = PagePool(64, 4)
    scheduler = Scheduler([request(i) for i in range(5)], pool, max_lanes=64, max_running=2)
    first = scheduler.admit()
    assert [r.index for r in first] == [0, 1] and not scheduler.admit(), "max_running"
    for r in first:
        run(r)
    scheduler.retire(lambda r: r.index == 0)
    asked = []
    scheduler.claim = lambda index: asked.append(index) or index != 2
    assert [r.index for r in scheduler.admit()] == [3], "2 is refused, 3 fills the place"
    assert asked == [2, 3] and [r.index for r in scheduler.waiting] == [4]
    run(scheduler.running[-1])
    victim = scheduler.preempt()
    assert victim.index == 3 and [r.index for r in scheduler.running] == [1]
    assert scheduler.parked() == [victim] and scheduler.waiting[1].index == 4
    assert [r.index for r in scheduler.admit()] == [3], "no claim asked again; then max_running"
    assert asked == [2, 3]

    lanes = Scheduler([request(0, n=3), request(1, n=3)], pool, max_lanes=4)
    assert [r.index for r in lanes.admit()] == [0], "3 + 3 lanes exceed max_lanes"
    assert not scheduler.idle and Scheduler([], pool, max_lanes=1).idle


def test_prefill_feeds_prompts_in_chunks_within_its_token_budget(special_tokenizer):
    """Prompts of different lengths are fed in forwards of at most ``max_prefill_tokens`` (rows
    times padded width), each chunk seeing the KV of the chunks before it: the samples are those
    of one whole-prompt prefill, and the dense forward scores them the same."""
    params = SamplingParams(
        temperature=1.0, seed=5, max_new_tokens=40, n=2, min_branches=2, max_branches=2, **SHORT
    )
    prompts = ["A much longer first question, with a few clauses in it?", "Two?", "And a third."]
    whole = make_engine("llama", special_tokenizer)
    expected = whole.generate(prompts, params, mode="constrained", chat=False)
    assert whole.stats.prefill_steps == 1
    chunked = make_engine("llama", special_tokenizer, max_prefill_tokens=7)
    forwards = []
    step = chunked.runner.step

    def recording_step(lanes, earlier=True, picked=None):
        if not earlier:  # a prefill forward: its rows and padded width
            forwards.append((len(lanes), max(len(lane.pending) for lane in lanes)))
        return step(lanes, earlier=earlier, picked=picked)

    chunked.runner.step = recording_step
    graphs = chunked.generate(prompts, params, mode="constrained", chat=False)
    longest = max(g.prompt_num_tokens for g in graphs)
    assert chunked.stats.prefill_steps == len(forwards) >= longest // 7
    assert all(rows * width <= 7 for rows, width in forwards)
    assert sum(rows * width for rows, width in forwards) >= sum(
        g.prompt_num_tokens for g in graphs[::2]
    )
    assert [g.token_ids for g in graphs] == [g.token_ids for g in expected]
    for graph, reference in zip(graphs, expected, strict=True):
        start = graph.prompt_num_tokens
        got = torch.tensor(graph.logprobs[start:])
        assert (got - torch.tensor(reference.logprobs[start:])).abs().max() <= 1e-4
        assert (dense_logprobs(chunked.model, graph) - got).abs().max() <= 1e-4
    assert chunked.pool.num_used == 0
    with pytest.raises(ValueError, match="max_prefill_tokens"):
        make_engine("llama", special_tokenizer, max_prefill_tokens=0)


def test_kv_memory_auto_takes_a_share_of_the_gpus_free_memory(special_tokenizer, monkeypatch):
    """``kv_memory_bytes="auto"``: on a GPU, AUTO_KV_SHARE of what it has free once the model is
    loaded; on the CPU the default 512 MiB. Anything but a positive int or "auto" is refused."""
    from npr_graph.engine import engine as engine_module

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (10 * 2**30, 80 * 2**30))
    cuda = torch.device("cuda", 0)
    assert engine_module.kv_memory_for(cuda, "auto") == int(10 * 2**30 * 0.8)
    assert engine_module.kv_memory_for(torch.device("cpu"), "auto") == 512 * 2**20
    assert engine_module.kv_memory_for(cuda, 12345) == 12345
    for bad in (0, -1, 1.5, True, "lots"):
        with pytest.raises(ValueError, match="kv_memory_bytes"):
            engine_module.kv_memory_for(cuda, bad)
    auto = make_engine("llama", special_tokenizer, num_pages=None, kv_memory_bytes="auto")
    default = make_engine("llama", special_tokenizer, num_pages=None)
    assert auto.pool.num_pages == default.pool.num_pages > 8


def test_pool_too_small_for_one_request_is_a_clear_error(special_tokenizer):
    engine = make_engine("llama", special_tokenizer, num_pages=3)
    with pytest.raises(ValueError, match="does not fit"):
        engine.generate(
            ["a prompt that needs more than two pages of four slots"], SamplingParams(), chat=False
        )


def test_a_pool_exhausted_mid_decode_ends_the_lone_request_with_a_reason(special_tokenizer):
    """Nothing left to preempt: the samples end as ``kv_exhausted`` with what they wrote and
    every page comes back. Every token the model chose is scored as the dense forward scores it;
    engine-written text the cut left unfed is dropped, and only an engine-written token whose
    logits the cut never computed (a branch's first, scored when the branch before it closes)
    has no log-prob (it takes no loss)."""
    params = SamplingParams(
        temperature=1.0, seed=3, max_new_tokens=200, n=2, min_branches=3, max_branches=3, **SHORT
    )
    engine = make_engine("llama", special_tokenizer, num_pages=24)
    graphs = engine.generate(["Q"], params, mode="constrained", chat=False)
    assert engine.stats.preemptions == 0 and engine.pool.num_used == 0
    for graph in graphs:
        assert_cut_and_scored(engine, graph)


def assert_cut_and_scored(engine, graph):
    """A sample cut for want of pages: what it wrote is scored as the dense forward scores it,
    but for engine-written tokens whose logits the cut never computed."""
    assert graph.metadata["finish_reason"] == "kv_exhausted" and graph.metadata["truncated"]
    assert graph.num_tokens > graph.prompt_num_tokens and graph.metadata["layout_consistent"]
    start = graph.prompt_num_tokens
    logprobs, forced = graph.logprobs[start:], graph.forced[start:]
    known = torch.tensor([lp is not None for lp in logprobs])
    assert all(f for lp, f in zip(logprobs, forced, strict=True) if lp is None)
    scored = torch.tensor([lp if lp is not None else 0.0 for lp in logprobs])
    assert (dense_logprobs(engine.model, graph) - scored)[known].abs().max() <= 1e-4


def test_a_pool_cut_leaves_a_sample_that_already_ended_as_it_was(special_tokenizer):
    """The lone request outgrows the pool after one of its samples ended with an end of
    sequence: that sample keeps its finish reason (training would drop it as cut otherwise),
    the others end as ``kv_exhausted``."""
    model = tiny_model("llama", tokenizer=special_tokenizer)
    engine = Engine(model, special_tokenizer, page_size=4, num_pages=30)
    eos = sorted(engine.eos_ids)[0]

    def ending(context, logits):
        if hash(tuple(context[-2:])) % 45 == 0:
            logits[eos] += 50
        return logits

    params = SamplingParams(temperature=1.0, seed=9, max_new_tokens=400, n=3)
    graphs = engine.generate(
        ["First question?"], params, mode="sequential", chat=False, logits_processor=ending
    )
    ended = [g for g in graphs if g.token_ids[-1] == eos]
    assert ended and len(ended) < len(graphs) and engine.pool.num_used == 0
    for graph in graphs:
        stopped = graph.token_ids[-1] == eos
        assert graph.metadata["finish_reason"] == ("stop" if stopped else "kv_exhausted")
        assert graph.metadata["truncated"] is not stopped


@pytest.mark.parametrize("mode", ["free", "constrained"])
def test_a_sample_its_budget_ended_is_not_relabelled_by_a_pool_cut(special_tokenizer, mode):
    """The budget ended the sample and closed what it opened; only its last token was left to
    feed, which adds nothing, when the pool ran short. It keeps its finish reason (``length``):
    relabelled ``kv_exhausted``, training dropped a whole sample as cut. A pool cut that costs
    the sample anything (a token, a closing tag) still says ``kv_exhausted``."""
    model = tiny_model("llama", tokenizer=special_tokenizer)
    params = SamplingParams(temperature=0.0, max_new_tokens=12, **SHORT)

    def run(num_pages):
        engine = Engine(model, special_tokenizer, page_size=1, num_pages=num_pages)
        (graph,) = engine.generate(["4"], params, mode=mode, chat=False)
        assert engine.pool.num_used == 0
        return graph

    ample = run(4096)
    assert ample.metadata["finish_reason"] == "length"
    kept = 0
    for pages in range(ample.num_tokens - 3, ample.num_tokens + 1):  # each cuts near the end
        graph = run(pages)
        same = (graph.token_ids, graph.logprobs, graph.forced) == (
            ample.token_ids,
            ample.logprobs,
            ample.forced,
        )
        assert graph.metadata["finish_reason"] == ("length" if same else "kv_exhausted")
        kept += same
    # free: the budget ends the sample in text, nothing to close; constrained: in a guideline,
    # whose closing tags must be fed, so every cut in the sweep costs them
    assert kept == (mode == "free"), "a pool cut the sample after its budget had ended it"


def test_the_repetition_penalty_applies_in_sequential_mode(special_tokenizer):
    """Sequential decoding has no steps: its whole response is the one the penalty reads (it
    applied to none, so a sequential baseline run "with" a penalty ran without)."""
    engine = make_engine("llama", special_tokenizer)
    picks = []
    for penalty in (1.0, 5.0):
        params = SamplingParams(temperature=0, max_new_tokens=24, repetition_penalty=penalty)
        (graph,) = engine.generate(["Q"], params, mode="sequential", chat=False)
        picks.append(graph.token_ids[graph.prompt_num_tokens :])
    assert len(set(picks[0])) < len(picks[0]), "greedy repeats itself"
    assert picks[1] != picks[0] and len(set(picks[1])) > len(set(picks[0]))


def test_one_sampling_params_or_one_per_prompt(special_tokenizer):
    engine = make_engine("llama", special_tokenizer)
    with pytest.raises(ValueError, match="one per prompt"):
        engine.generate(["a", "b"], [SamplingParams(max_new_tokens=4)], chat=False)
    per_prompt = [SamplingParams(max_new_tokens=3), SamplingParams(max_new_tokens=5)]
    graphs = engine.generate(["a", "b"], per_prompt, mode="sequential", chat=False)
    assert [g.num_tokens - g.prompt_num_tokens for g in graphs] == [3, 5]
    (graph,) = engine.generate("a", SamplingParams(max_new_tokens=2), chat=False)
    assert graph.metadata["prompt_index"] == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"min_branches": 4, "max_branches": 2}, "min_branches"),
        ({"n": 2.5}, "n must be an integer"),
        ({"max_new_tokens": 5.5}, "max_new_tokens must be an integer"),
        ({"seed": True}, "seed must be an integer or null"),
        ({"temperature": float("inf")}, "temperature must be a finite number"),
        ({"temperature": 1e-40}, "temperature must be 0"),
        ({"temperature": 1e39}, r"temperature must be at most 3.4e\+38"),  # inf in float32
        ({"top_p": float("nan")}, "top_p must be a finite number"),
        ({"suppress_tokens": [1.5]}, "suppress_tokens must be a list of integers"),
    ],
)
def test_invalid_sampling_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_warm_up_decodes_within_the_callers_budget(special_tokenizer):
    """npr eval checks each prompt with its budget, then warms the engine up on the first one:
    a warm-up of its own fixed budget ran past the context of a prompt that fit."""
    model = tiny_model("llama", tokenizer=special_tokenizer, max_position_embeddings=64)
    engine = Engine(model, special_tokenizer, page_size=4, num_pages=256)
    prompt = list(range(1000, 1050))
    params = SamplingParams(max_new_tokens=10)
    engine.check_prompt(prompt, params)
    engine.warm_up(prompt, params, ["constrained", "sequential"])
    assert engine.pool.num_used == 0


def test_a_page_size_below_one_is_a_value_error(special_tokenizer):
    model = tiny_model("llama", tokenizer=special_tokenizer)
    for page_size in (0, -2, 1.5):  # a ZeroDivisionError when the pool size was left to it
        with pytest.raises(ValueError, match="page_size must be an integer >= 1"):
            Engine(model, special_tokenizer, page_size=page_size)


def test_bad_prompts_and_modes(tokenizer, special_tokenizer):
    engine = make_engine("llama", special_tokenizer)
    with pytest.raises(ValueError, match="empty prompt"):
        engine.generate(["  "], chat=False)
    for half in ("\ud83d", "\udce9"):  # a cut emoji; a Latin-1 byte of a command line
        with pytest.raises(PromptError, match=r"character 3 is \\ud"):
            engine.generate([f"caf{half} ok"], chat=False)
    with pytest.raises(ValueError, match="context"):
        engine.generate(["x " * 5000], SamplingParams(max_new_tokens=10), chat=False)
    with pytest.raises(ValueError, match="mode"):
        engine.generate(["Q"], mode="wild", chat=False)
    text_engine = make_engine("llama", tokenizer)
    with pytest.raises(ValueError, match="special tokens"):
        text_engine.generate(["Q"], mode="constrained", chat=False)
    no_template = copy.deepcopy(tokenizer)
    no_template.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        make_engine("llama", no_template).generate(["Q"], chat=True)


def test_bad_ids_and_params_are_clear_errors_that_hold_no_pages(special_tokenizer):
    engine = make_engine("llama", special_tokenizer)
    vocab = engine.vocab_size
    cases = [
        (([[5, vocab]],), "outside the model's vocabulary"),
        (([[-1, 5]],), "outside the model's vocabulary"),
        (([5, 6, 7],), "a prompt is text or a list of token ids, not int"),
        ((["Q"], [None]), "expected SamplingParams, got NoneType"),
        ((["Q"], SamplingParams(suppress_tokens=(vocab,))), "suppress_tokens"),
        # every id suppressed: argmax over -inf picked a suppressed 0
        ((["Q"], SamplingParams(suppress_tokens=tuple(range(vocab)))), "no token of the vocab"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            engine.generate(*args, chat=False)
        assert engine.pool.num_used == 0
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            make_engine("llama", special_tokenizer, device="cuda")
        with pytest.raises(ValueError, match="CUDA is not available"):  # before loading a model
            Engine.from_pretrained("/no/such/model", device="cuda")


def test_a_model_that_soft_caps_attention_is_refused(special_tokenizer):
    """Gemma 2 soft-caps its attention logits, which the engine's attention does not: a clear
    error when the engine is built, not a NotImplementedError mid-generate."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(
        vocab_size=len(special_tokenizer), hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
    )  # fmt: skip
    with pytest.raises(ValueError, match="soft-caps its attention logits"):
        Engine(Gemma2ForCausalLM(config), special_tokenizer, num_pages=16)


def test_a_run_that_raises_returns_its_pages(special_tokenizer):
    """A failing logits processor or progress callback (or an interrupt) mid-run: the error
    comes through, every page comes back, and the engine decodes as before."""
    engine = make_engine("llama", special_tokenizer, num_pages=48)
    params = SamplingParams(n=2, seed=3, max_new_tokens=40, **SHORT)
    before = engine.generate(["Q"], params, mode="constrained", chat=False)
    calls = 0

    def failing(context, logits):
        nonlocal calls
        calls += 1
        if calls == 25:
            raise KeyError("processor failed")
        return logits

    def interrupt(tokens):
        raise KeyboardInterrupt

    with pytest.raises(KeyError, match="processor failed"):
        engine.generate(["Q"], params, mode="constrained", chat=False, logits_processor=failing)
    assert engine.pool.num_used == 0
    with pytest.raises(KeyboardInterrupt):
        engine.generate(["Q"], params, mode="constrained", chat=False, progress=interrupt)
    assert engine.pool.num_used == 0
    forward = engine.runner._forward

    def interrupted_forward(*args, **kwargs):  # Ctrl-C while the prompt prefills
        raise KeyboardInterrupt

    engine.runner._forward = interrupted_forward
    with pytest.raises(KeyboardInterrupt):
        engine.generate(["Q", "QQ"], params, mode="constrained", chat=False)
    engine.runner._forward = forward
    assert engine.pool.num_used == 0

    def failing_report(index, graphs):
        raise ValueError("writing the results failed")

    with pytest.raises(ValueError, match="writing the results failed"):
        engine.generate(
            ["Q", "QQ"],
            [params, dataclasses.replace(params, max_new_tokens=200)],
            mode="constrained",
            chat=False,
            on_finish=failing_report,
        )
    assert engine.pool.num_used == 0
    after = engine.generate(["Q"], params, mode="constrained", chat=False)
    assert [g.token_ids for g in after] == [g.token_ids for g in before]
    assert [g.metadata["finish_reason"] for g in after] == ["length", "length"]


def test_nan_logits_are_an_error_not_samples(special_tokenizer):
    model = tiny_model("llama", tokenizer=special_tokenizer)
    with torch.no_grad():
        model.lm_head.weight[7] = float("nan")
    engine = Engine(model, special_tokenizer, page_size=4, num_pages=256)
    for mode, temperature in [("free", 1.0), ("constrained", 0.0), ("sequential", 0.7)]:
        params = SamplingParams(temperature=temperature, max_new_tokens=8, **SHORT)
        with pytest.raises(FloatingPointError, match="NaN or infinite"):
            engine.generate(["Q"], params, mode=mode, chat=False)
        assert engine.pool.num_used == 0


def scripted(tok, fmt, prompt_ids, lanes):
    """A logits processor that makes the model write a chosen trace in free mode: ``lanes`` are
    the token sequences each lane should see (prompt + ancestors + own)."""
    targets = [list(prompt_ids) + seq for seq in lanes]

    def processor(context, logits):
        for target in targets:
            if len(context) < len(target) and target[: len(context)] == context:
                out = torch.full_like(logits, float("-inf"))
                out[target[len(context)]] = 0.0
                return out
        return logits

    return processor


@pytest.mark.parametrize("special", [True, False], ids=["special-tags", "text-tags"])
def test_free_mode_forks_on_the_models_own_tags(special, tokenizer, special_tokenizer):
    tok = special_tokenizer if special else tokenizer
    engine = make_engine("llama", tok)
    fmt = Format(tok, special=special)
    enc = fmt.encode
    prompt = enc("Q")
    trunk = enc("<guideline>\n<plan>1: add</plan>\n<plan>2: count</plan>\n</guideline>") + enc("\n")
    step1 = enc("<step>\n1:") + enc(" two plus two is four</step>") + enc("\n")
    step2 = enc("<step>\n2:") + enc(" count four apples</step>") + enc("\n")
    join = enc("<takeaway>\n") + enc("both give four</takeaway>") + enc(" so \\boxed{4}")
    eos = sorted(engine.eos_ids)[0]
    lanes = [trunk, trunk + step1, trunk + step2, trunk + step1 + step2 + join + [eos]]
    processor = scripted(tok, fmt, prompt, lanes)
    chunks = _record_fed_chunks(engine)
    params = SamplingParams(temperature=0, max_new_tokens=200)
    (graph,) = engine.generate([prompt], params, mode="free", logits_processor=processor)
    assert graph.token_ids[len(prompt) :] == trunk + step1 + step2 + join + [eos]
    fed = [chunk for lane_chunks in chunks.values() for chunk in lane_chunks]
    assert all(all(chunk[1:]) for chunk in fed), "only engine-written tokens ride behind a token"
    header = len(enc("<step>\n1:"))
    firsts = [lane_chunks[0] for lane_chunks in chunks.values()]
    assert sum(c == [True] * header for c in firsts) == 2, "each branch's header in one step"
    assert graph.metadata["forks"] == 1 and graph.metadata["layout_consistent"]
    assert ng.metrics(graph)["widths"] == [2]
    (block,) = graph.blocks
    step_nodes = [graph[b[0]] for b in block.branches]
    assert step_nodes[0].parents == step_nodes[1].parents
    engine_logprobs = torch.tensor(graph.logprobs[graph.prompt_num_tokens :])
    assert (dense_logprobs(engine.model, graph) - engine_logprobs).abs().max() <= 1e-4
    forced = [
        graph.forced[i]
        for i in range(
            step_nodes[1].token_start, step_nodes[1].token_start + len(enc("<step>\n2:"))
        )
    ]
    assert all(forced)


def test_free_mode_invalid_fork_decodes_sequentially(special_tokenizer):
    tok = special_tokenizer
    engine = make_engine("llama", tok)
    fmt = Format(tok, special=True)
    enc = fmt.encode
    prompt = enc("Q")
    plans = "".join(f"<plan>{i}: idea</plan>" for i in range(1, 8))
    text = enc(f"<guideline>{plans}</guideline>") + enc(
        "<step>1: a</step><step>2: b</step><takeaway>done</takeaway> ok"
    )
    eos = sorted(engine.eos_ids)[0]
    processor = scripted(tok, fmt, prompt, [text + [eos]])
    (graph,) = engine.generate(
        [prompt],
        SamplingParams(temperature=0, max_new_tokens=200),
        mode="free",
        logits_processor=processor,
    )
    assert graph.metadata["forks"] == 0
    assert any("invalid fork" in v for v in graph.metadata["engine_violations"])
    assert graph.metadata["layout_consistent"]
    assert torch.equal(ng.position_ids(graph), torch.arange(graph.num_tokens)), (
        "decoded sequentially, laid out sequentially"
    )
    assert "too_many_branches" in [v.code for v in ng.validate(graph)]


def test_sequential_mode_is_causal(special_tokenizer):
    engine = make_engine("qwen2", special_tokenizer)
    (graph,) = engine.generate(
        ["Q"], SamplingParams(temperature=0, max_new_tokens=16), mode="sequential", chat=False
    )
    assert graph.metadata["layout_consistent"] and graph.metadata["total_tokens"] == 16
    assert torch.equal(
        ng.attention_mask(graph),
        torch.ones(graph.num_tokens, graph.num_tokens, dtype=torch.bool).tril(),
    )


def _record_fed_chunks(engine):
    """Wrap the runner so every step records, per lane, the (token, forced) pairs it fed."""
    chunks: dict[int, list[list[bool]]] = {}
    step = engine.runner.step

    def recording(lanes, earlier=True, picked=None):
        for lane in (lane for lane in lanes if lane.sample is not None):  # not prompts
            fed = lane.forced[len(lane.forced) - len(lane.pending) :]
            chunks.setdefault(id(lane), []).append(list(fed))
        return step(lanes, earlier, picked)

    engine.runner.step = recording
    return chunks


def test_engine_written_text_is_fed_with_the_token_before_it(special_tokenizer):
    """Forced text costs no decode step of its own: it rides in the step of the token it
    follows (a lane's first step feeds its header alone), and is still scored exactly.
    (Tags as text: ``test_free_mode_forks_on_the_models_own_tags``.)"""
    engine = make_engine("qwen3", special_tokenizer)
    closers = ("</plan>", "</step>", "</takeaway>")
    banned = [engine.format.tag_ids[t] for t in closers] + sorted(engine.eos_ids)

    def run_to_limits(context, logits):
        logits[banned] = float("-inf")
        return logits

    chunks = _record_fed_chunks(engine)
    params = SamplingParams(
        temperature=1.0,
        seed=3,
        max_new_tokens=70,
        min_branches=3,
        max_branches=3,
        max_blocks=1,
        **SHORT,
    )
    (graph,) = engine.generate(
        ["Q"], params, mode="constrained", chat=False, logits_processor=run_to_limits
    )
    fed = [chunk for lane_chunks in chunks.values() for chunk in lane_chunks]
    assert all(all(chunk[1:]) for chunk in fed), "only engine-written tokens ride behind a token"
    later = [chunk for lane_chunks in chunks.values() for chunk in lane_chunks[1:]]
    (takeaway,) = graph.nodes_of("takeaway")
    assert graph.metadata["forks"] == 1 and takeaway.close_tag is not None
    assert all(not chunk[0] for chunk in later), "after its first step a lane leads with a sample"
    assert max(len(c) for c in fed) >= 3, "a header is fed in one step"
    responses = len(graph.token_ids) - graph.prompt_num_tokens
    assert engine.stats.decode_steps < responses - sum(graph.forced) + 3
    engine_logprobs = torch.tensor(graph.logprobs[graph.prompt_num_tokens :])
    assert (dense_logprobs(engine.model, graph) - engine_logprobs).abs().max() <= 1e-4


@pytest.mark.parametrize("rows", [16, 0], ids=["one-row-per-token", "padded"])
def test_multi_token_feeds_score_every_token(rows, special_tokenizer):
    """Feeds of several tokens per lane, run as one decode row per token or left-padded, give the
    logits after every fed token: equal to the dense forward's."""
    engine = make_engine("llama", special_tokenizer)
    engine.runner.max_rows_per_lane = rows
    params = SamplingParams(
        temperature=1.0, seed=5, max_new_tokens=60, n=3, min_branches=2, max_branches=3, **SHORT
    )
    graphs = engine.generate(["A question", "B"], params, mode="constrained", chat=False)
    for graph in graphs:
        engine_logprobs = torch.tensor(graph.logprobs[graph.prompt_num_tokens :])
        assert (dense_logprobs(engine.model, graph) - engine_logprobs).abs().max() <= 1e-4
    assert engine.pool.num_used == 0


def test_a_lone_lane_on_contiguous_slots_reads_a_view_of_the_cache(special_tokenizer, monkeypatch):
    from npr_graph.engine import runner as runner_module

    assert runner_module._slot_range(torch.tensor([4, 5, 6])) == (4, 7)
    assert runner_module._slot_range(torch.tensor([4, 6, 7])) is None
    assert runner_module._slot_range(torch.tensor([4, 3, 6])) is None
    ranges = []
    slot_range = runner_module._slot_range
    monkeypatch.setattr(
        runner_module, "_slot_range", lambda slots: ranges.append(slot_range(slots)) or ranges[-1]
    )
    engine = make_engine("qwen3", special_tokenizer)
    params = SamplingParams(temperature=1.0, seed=4, max_new_tokens=30, ignore_eos=True)
    (graph,) = engine.generate(["What is 2+2?"], params, mode="sequential", chat=False)
    assert sum(r is not None for r in ranges) > 20, "sequential decoding reads views"
    engine_logprobs = torch.tensor(graph.logprobs[graph.prompt_num_tokens :])
    assert (dense_logprobs(engine.model, graph) - engine_logprobs).abs().max() <= 1e-4


def test_finished_lanes_do_not_pin_their_steps_logits(special_tokenizer, monkeypatch):
    """A [rows, V] step tensor lives as long as a row of it is referenced: a waiting branch keeps
    at most its own row (the last branch's scores the join), a forked or finished lane none."""
    engine = make_engine("qwen3", special_tokenizer)
    vocab = engine.runner.shape.vocab_size
    checked, kept = [], []
    branch_done = Engine._branch_done

    def checking(self, lane):
        branch_done(self, lane)
        assert lane.owner.final_logits is None
        for sibling in lane.owner.tips:
            if sibling.status.value == "waiting" and sibling.final_logits is not None:
                assert sibling is lane.owner.tips[-1]
                assert sibling.final_logits.untyped_storage().nbytes() == 4 * vocab
                kept.append(sibling)
        checked.append(lane)

    monkeypatch.setattr(Engine, "_branch_done", checking)
    close = engine.format.tag_ids["</step>"]
    last_header = engine.format.encode("<step>\n3:")

    def last_branch_ends_first(context, logits):
        window = len(last_header)
        if any(context[i : i + window] == last_header for i in range(len(context) - window + 1)):
            logits[close] += 100.0
        return logits

    params = SamplingParams(
        temperature=1.0, seed=6, max_new_tokens=60, n=4, min_branches=3, max_branches=3, **SHORT
    )
    graphs = engine.generate(
        ["A question"],
        params,
        mode="constrained",
        chat=False,
        logits_processor=last_branch_ends_first,
    )
    assert len(checked) >= 3 and all(g.metadata["forks"] >= 1 for g in graphs)
    assert kept, "a last branch waited for its siblings"
    for graph in graphs:
        engine_logprobs = torch.tensor(graph.logprobs[graph.prompt_num_tokens :])
        assert (dense_logprobs(engine.model, graph) - engine_logprobs).abs().max() <= 1e-4


def test_engine_written_tokens_are_scored_in_one_batch_per_step(special_tokenizer, monkeypatch):
    """The log-probs of a step's engine-written tokens (headers, closing tags, the join opener)
    come from one batched computation: one copy to the host per step, not one per token."""
    from npr_graph.engine import engine as engine_module

    calls = []
    token_logprobs = engine_module.token_logprobs

    def counting(logits, tokens, temperatures):
        calls.append(len(tokens))
        return token_logprobs(logits, tokens, temperatures)

    monkeypatch.setattr(engine_module, "token_logprobs", counting)
    engine = make_engine("llama", special_tokenizer)
    params = SamplingParams(
        temperature=0, max_new_tokens=80, min_branches=3, max_branches=3, n=2, **SHORT
    )
    graphs = engine.generate(["Q"], params, mode="constrained", chat=False)
    stats = engine.stats
    steps = stats.decode_steps + stats.prefill_steps
    assert len(calls) <= steps and max(calls) > 1
    assert stats.forward_time > 0 and stats.pick_time > 0
    assert stats.forward_time + stats.pick_time <= stats.wall_time
    forced = sum(f for g in graphs for f in g.forced[g.prompt_num_tokens :])
    assert sum(calls) == forced, "every engine-written token is scored exactly once"
    assert all(lp is not None for g in graphs for lp in g.logprobs[g.prompt_num_tokens :])


def test_spelled_tags_match_a_brute_force_scan(special_tokenizer):
    """Constrained mode bans ordinary tokens that would finish a tag spelled in text; the fast
    path (no "<" in the tail) must ban exactly what scanning every token would."""
    from npr_graph.engine.structure import completed_tags

    fmt = Format(special_tokenizer, special=True)
    fmt.spelled_tags("")
    pieces = dict(fmt._closers)
    assert pieces, "the vocabulary has tokens with '>'"
    tails = ["", "plain words", "x = 3", "a <", "<ste", "</pla", "<guideline", "1 < 2 and 3 > 2"]
    for tail in tails:
        brute = sorted(i for i, p in pieces.items() if completed_tags(tail + p, p))
        assert sorted(fmt.spelled_tags(tail)) == brute, tail
    assert fmt.spelled_tags("<step"), 'a tail that spells a tag\'s start is completed by ">"'


@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlap"])
def test_a_fork_at_the_end_of_the_context_scores_every_branch(overlap, special_tokenizer):
    """The fork's step headers reach the model's last position: the sample ends there, and the
    first token of each branch after the first is still scored, from the last logits of the
    branch before it (the dense forward's), though no branch closes to hand them on."""
    model = tiny_model("llama", tokenizer=special_tokenizer, max_position_embeddings=40)
    engine = Engine(model, special_tokenizer, page_size=4, num_pages=256, overlap=overlap)
    for budget in (23, 24):
        params = SamplingParams(temperature=1.0, seed=0, n=2, max_new_tokens=budget,
                                min_branches=3, max_branches=3, max_plan_tokens=1,
                                max_step_tokens=3, max_takeaway_tokens=2)  # fmt: skip
        graphs = engine.generate(
            [[1000 + i for i in range(40 - budget)]], params, mode="constrained"
        )
        assert engine.pool.num_used == 0
        for graph in graphs:
            assert graph.metadata["forks"] == 1 and graph.metadata["truncated"]
            assert int(ng.position_ids(graph).max()) == 39, "a lane reached the end"
            scored = graph.logprobs[graph.prompt_num_tokens :]
            assert None not in scored
            assert (dense_logprobs(model, graph) - torch.tensor(scored)).abs().max() <= 1e-4


def test_each_generate_reports_its_own_peak_of_kv_pages(special_tokenizer):
    """``stats.peak_kv_pages`` is the call's own peak, not the largest of every earlier call."""
    engine = make_engine("llama", special_tokenizer)
    wide = SamplingParams(seed=0, max_new_tokens=40, n=4, min_branches=3, max_branches=3, **SHORT)
    engine.generate(["Q"], wide, mode="constrained", chat=False)
    wide_peak = engine.stats.peak_kv_pages
    engine.generate(["Q"], SamplingParams(seed=0, max_new_tokens=4), mode="sequential", chat=False)
    assert 0 < engine.stats.peak_kv_pages < wide_peak


@pytest.mark.parametrize("overlap", [False, True])
def test_each_prompt_is_handed_over_as_it_ends_and_the_next_admitted(overlap, special_tokenizer):
    """``on_finish`` gets each prompt's graphs while the others still decode, and the next
    waiting prompt takes its place; ``max_running`` caps the prompts decoding at once. Neither
    changes what is sampled."""
    budgets = [60, 8, 30, 12]
    params = [
        SamplingParams(
            temperature=1.0, seed=i, n=2, max_new_tokens=m, min_branches=2, max_branches=2, **SHORT
        )
        for i, m in enumerate(budgets)
    ]
    prompts = ["First question?", "Second one?", "A third.", "Four"]
    reference = make_engine("llama", special_tokenizer).generate(
        prompts, params, mode="constrained", chat=False
    )
    engine = make_engine("llama", special_tokenizer, overlap=overlap)
    reported = []

    def on_finish(index, graphs):
        reported.append((index, graphs, engine.stats.decode_steps))

    returned = engine.generate(
        prompts, params, mode="constrained", chat=False, max_running=2, on_finish=on_finish
    )
    assert returned == [], "handed over, not kept"
    assert sorted(index for index, _, _ in reported) == [0, 1, 2, 3]
    graphs = [g for _, handed, _ in sorted(reported, key=lambda r: r[0]) for g in handed]
    assert [g.token_ids for g in graphs] == [g.token_ids for g in reference]
    for got, want in zip(graphs, reference, strict=True):
        assert got.logprobs == pytest.approx(want.logprobs, abs=1e-4)
    assert all(g.metadata["prompt_index"] == i // 2 for i, g in enumerate(graphs))
    assert engine.stats.generated_tokens == sum(g.num_tokens - g.prompt_num_tokens for g in graphs)
    assert engine.stats.critical_path_tokens == max(
        g.metadata["critical_path_tokens"] for g in graphs
    )
    steps = {index: step for index, _, step in reported}
    assert steps[1] < engine.stats.decode_steps, "the short prompt is handed over mid-run"
    seconds = engine.stats.prompt_seconds
    assert sorted(seconds) == [0, 1, 2, 3]
    for index, (admitted, ended) in seconds.items():
        assert 0 <= admitted <= ended <= engine.stats.wall_time
        running = sum(a <= admitted < e for a, e in seconds.values())
        assert running <= 2, f"prompt {index} was admitted with {running - 1} others running"
    assert seconds[2][0] >= seconds[1][1], "the third prompt waits for the second to end"
    assert engine.pool.num_used == 0


def test_the_engine_keeps_nothing_of_a_prompt_it_handed_over(special_tokenizer):
    """With ``on_finish`` a long stream of prompts holds only those under way: once handed
    over, a prompt's graphs are freed as soon as the callback lets them go."""
    engine = make_engine("llama", special_tokenizer)
    params = [SamplingParams(seed=i, n=2, max_new_tokens=6 + 4 * i, **SHORT) for i in range(4)]
    handed = []

    def on_finish(index, graphs):
        gc.collect()
        alive = [ref() is not None for ref in handed]
        handed.extend(weakref.ref(g) for g in graphs)
        assert not any(alive), "an earlier prompt's graphs are still held"

    engine.generate(["Q"] * 4, params, mode="constrained", chat=False, on_finish=on_finish)
    assert len(handed) == 8


def test_progress_counts_the_calls_tokens_ended_prompts_included(special_tokenizer):
    """``progress`` hears the tokens generated so far: prompts that ended stay counted."""
    engine = make_engine("llama", special_tokenizer)
    params = [SamplingParams(seed=i, n=2, max_new_tokens=6 + 8 * i, **SHORT) for i in range(3)]
    heard = []
    engine.generate(
        ["Q"] * 3, params, mode="constrained", chat=False, max_running=2, progress=heard.append
    )
    assert heard == sorted(heard) and heard[-1] == engine.stats.generated_tokens > 0


def test_each_prompt_may_have_its_own_mode(special_tokenizer):
    """A constrained prompt and a sequential one in one call sample what each does alone."""
    engine = make_engine("llama", special_tokenizer)
    params = SamplingParams(temperature=1.0, seed=3, n=2, max_new_tokens=40, **SHORT)
    mixed = engine.generate(
        ["Q", "Q"], params, mode=["constrained", "sequential"], chat=False, max_running=1
    )
    alone = [
        graph
        for mode in ("constrained", "sequential")
        for graph in engine.generate(["Q"], params, mode=mode, chat=False)
    ]
    assert [g.token_ids for g in mixed] == [g.token_ids for g in alone]
    assert [g.metadata["mode"] for g in mixed] == ["constrained"] * 2 + ["sequential"] * 2
    assert mixed[0].blocks and not mixed[2].blocks
    with pytest.raises(ValueError, match="one mode, or one per prompt"):
        engine.generate(["Q", "Q"], params, mode=["free"], chat=False)
    with pytest.raises(ValueError, match="unknown mode 'fast'"):
        engine.generate(["Q", "Q"], params, mode=["free", "fast"], chat=False)
    for running in (0, 1.5, True):
        with pytest.raises(ValueError, match="max_running must be an integer >= 1"):
            engine.generate(["Q"], params, chat=False, max_running=running)
    with pytest.raises(ValueError, match="mode is one of free, constrained, sequential"):
        engine.generate(["Q"], params, mode=None, chat=False)
    for returned in (None, torch.zeros(3)):
        with pytest.raises(ValueError, match="the logits processor returned"):
            engine.generate(
                ["Q"], params, chat=False, logits_processor=lambda c, row, r=returned: r
            )
    assert engine.pool.num_used == 0
