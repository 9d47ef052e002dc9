"""Overlapped decode steps (``Engine(overlap=True)``): the next forward is launched before the
host reads the tokens the step before it picked. Greedy decoding must write what the plain
engine writes, token for token, with the same log-probs."""

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_engine import SHORT, dense_logprobs, scripted

import npr_graph as ng
from npr_graph.engine.engine import Engine
from npr_graph.engine.lanes import PICKED
from npr_graph.engine.sampling import SamplingParams
from npr_graph.engine.structure import Format
from npr_graph.models import add_tag_tokens, default_tokenizer, tiny_model


@pytest.fixture(scope="module")
def tokenizer():
    tok = copy.deepcopy(default_tokenizer())
    add_tag_tokens(tiny_model("llama", tokenizer=tok), tok, "npr")
    return tok


def run_both(family, tok, prompts, params, mode, num_pages=2048, **kwargs):
    """The same model and requests through the plain and the overlapped engine."""
    model = tiny_model(family, tokenizer=tok)
    runs = {}
    for overlap in (False, True):
        engine = Engine(model, tok, page_size=4, num_pages=num_pages, overlap=overlap)
        graphs = engine.generate(prompts, params, mode=mode, chat=False, **kwargs)
        assert engine.pool.num_used == 0, "every page is freed"
        runs[overlap] = (engine, graphs)
    return runs


def assert_same_output(runs, dense=True):
    """Token for token and log-prob for log-prob; ``dense``: the log-probs are also the dense
    forward's (which scores at temperature 1)."""
    (plain, want), (overlapped, got) = runs[False], runs[True]
    assert len(want) == len(got)
    for a, b in zip(want, got, strict=True):
        assert b.token_ids == a.token_ids
        assert PICKED not in b.token_ids
        assert b.forced == a.forced
        for key in ("finish_reason", "truncated", "forks", "engine_violations", "total_tokens"):
            assert b.metadata[key] == a.metadata[key], key
        assert b.metadata["layout_consistent"]
        start = b.prompt_num_tokens
        got_lp = torch.tensor(b.logprobs[start:])
        assert (got_lp - torch.tensor(a.logprobs[start:])).abs().max() <= 1e-5
        if dense:
            assert (dense_logprobs(overlapped.model, b) - got_lp).abs().max() <= 1e-4
    return plain, overlapped


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_overlapped_constrained_blocks_match_the_plain_engine(family, tokenizer):
    params = SamplingParams(
        temperature=0, max_new_tokens=70, min_branches=2, max_branches=3, n=2, **SHORT
    )
    runs = run_both(
        family, tokenizer, ["What is 2+2?", "Name three primes."], params, "constrained"
    )
    plain, overlapped = assert_same_output(runs)
    assert any(g.metadata["forks"] for g in runs[True][1]), "through fork and join"
    # Text the engine writes after a picked token waits one step, so there are more steps.
    assert overlapped.stats.decode_steps > plain.stats.decode_steps


def test_overlapped_seeded_sampling_matches(tokenizer):
    """A lane's draws are keyed by its place in the DAG and how many it made before: text that
    waits a step changes no draw, so seeded samples match too."""
    params = SamplingParams(temperature=1.0, seed=5, max_new_tokens=70, min_branches=2,
                            max_branches=3, n=3, **SHORT)  # fmt: skip
    runs = run_both("qwen3", tokenizer, ["What is 2+2?", "Primes?"], params, "constrained")
    assert_same_output(runs)
    assert sum(g.metadata["forks"] for g in runs[True][1]) >= 4


@pytest.mark.parametrize("candidates", [(4096,), (3,)], ids=["flat rows", "mixed rows"])
def test_overlapped_top_p_picks_again_what_the_candidates_miss(candidates, tokenizer, monkeypatch):
    """An overlapped step's top-p selection speculates that each nucleus ends among its
    candidates (checking it would wait for the forward). A tiny random model's flat rows reach
    past 4096 candidates, and with 3 candidates only some rows do: the host picks those rows
    again exactly, and where the token changes, the fed one is taken back (the lane is a step
    late, mid-step too). Seeded samples still match the plain engine's."""
    monkeypatch.setattr("npr_graph.engine.sampling.NUCLEUS_CANDIDATES", candidates)
    params = SamplingParams(temperature=1.0, top_p=0.5, seed=4, max_new_tokens=60,
                            min_branches=2, max_branches=3, n=2, **SHORT)  # fmt: skip
    runs = run_both("qwen3", tokenizer, ["What is 2+2?", "Primes?"], params, "constrained")
    plain, overlapped = assert_same_output(runs)
    assert plain.stats.repicks == 0
    sampled = sum(1 for g in runs[True][1] for f in g.forced[g.prompt_num_tokens :] if not f)
    assert 0 < overlapped.stats.repicks <= sampled
    if candidates == (3,):
        assert overlapped.stats.repicks < sampled, "some rows settled"
    assert sum(g.metadata["forks"] for g in runs[True][1]) >= 2


@settings(
    max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    family=st.sampled_from(["llama", "qwen3"]),
    mode=st.sampled_from(["constrained", "free", "sequential"]),
    temperature=st.sampled_from([0.0, 0.7, 1.0]),
    top_k=st.sampled_from([0, 5, 40]),
    top_p=st.sampled_from([1.0, 0.9, 0.5]),
    repetition_penalty=st.sampled_from([1.0, 1.3]),
    n=st.integers(1, 2),
    max_new_tokens=st.integers(110, 150),
    seed=st.integers(0, 1000),
    candidates=st.sampled_from([(3,), (16,), (4096,)]),
)
def test_overlapped_engine_matches_the_plain_engine_for_any_sampling(
    tokenizer, monkeypatch, family, mode, temperature, top_k, top_p, repetition_penalty, n,
    max_new_tokens, seed, candidates,
):  # fmt: skip
    """Any mix of the sampling options and modes (free mode lets a random model end anywhere;
    small candidate sets make re-picks common): the overlapped engine writes what the plain
    engine writes. The sample's budgets run out after its blocks here: a re-pick that changes a
    token makes its lane a step late, and a budget that runs out while siblings are mid-step
    cuts that lane a token earlier than the plain engine does (both graphs valid and scored)."""
    monkeypatch.setattr("npr_graph.engine.sampling.NUCLEUS_CANDIDATES", candidates)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p,
                            repetition_penalty=repetition_penalty, n=n, seed=seed,
                            max_new_tokens=max_new_tokens, min_branches=2, max_branches=3,
                            max_blocks=2, **SHORT)  # fmt: skip
    runs = run_both(family, tokenizer, ["Q?", "Another one"], params, mode)
    assert_same_output(runs, dense=temperature != 0.7)


def test_overlapped_sequential_and_budgets_match(tokenizer):
    sequential = SamplingParams(temperature=0, max_new_tokens=16, n=3)
    assert_same_output(run_both("qwen2", tokenizer, ["Q", "Other"], sequential, "sequential"))
    budgets = SamplingParams(temperature=0, max_new_tokens=20, max_step_tokens=50,
                             max_plan_tokens=3, min_branches=2, max_branches=2)  # fmt: skip
    runs = run_both("llama", tokenizer, ["Q"], budgets, "constrained")
    assert_same_output(runs)
    assert runs[True][1][0].metadata["truncated"]
    total = SamplingParams(temperature=0, max_new_tokens=200, max_total_tokens=30,
                           max_plan_tokens=3, max_step_tokens=50)  # fmt: skip
    assert_same_output(run_both("llama", tokenizer, ["Q"], total, "constrained"))


def test_overlapped_preemption_matches(tokenizer):
    params = SamplingParams(
        temperature=0, max_new_tokens=40, n=2, min_branches=2, max_branches=2, **SHORT
    )
    prompts = ["First question?", "Second one?", "A third."]
    runs = run_both("llama", tokenizer, prompts, params, "constrained", num_pages=64)
    assert runs[True][0].stats.preemptions > 0, "the pool is small enough to preempt"
    assert_same_output(runs)


def test_overlapped_exhausted_pool_matches(tokenizer):
    """One request outgrowing the pool: the overlapped engine cuts it where the plain one does,
    with a picked token outstanding, and reads nothing it did not keep."""
    params = SamplingParams(
        temperature=1.0, seed=3, max_new_tokens=200, n=2, min_branches=3, max_branches=3, **SHORT
    )
    runs = run_both("llama", tokenizer, ["Q"], params, "constrained", num_pages=24)
    (_, want), (_, got) = runs[False], runs[True]
    for a, b in zip(want, got, strict=True):
        assert b.metadata["finish_reason"] == a.metadata["finish_reason"] == "kv_exhausted"
        assert b.token_ids == a.token_ids and PICKED not in b.token_ids and b.forced == a.forced
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            assert (x is None) == (y is None) and (x is None or abs(x - y) <= 1e-5)


def test_an_end_of_sequence_inside_a_step_is_taken_back(tokenizer):
    """Free mode: the model stops inside a step. The overlapped engine has already fed that
    token when it reads it; it takes it (and its KV slot) back and closes the step, as the plain
    engine does without feeding it."""
    fmt = Format(tokenizer, special=True)
    enc = fmt.encode
    prompt = enc("Q")
    eos = sorted(tiny_eos(tokenizer))[0]
    trunk = enc("<guideline>\n<plan>1: add</plan>\n<plan>2: count</plan>\n</guideline>") + enc("\n")
    head1, head2 = enc("<step>\n1:"), enc("<step>\n2:")
    step1 = head1 + enc(" two") + enc("</step>") + enc("\n")  # the engine's closing tag
    step2 = head2 + enc(" count four apples</step>") + enc("\n")
    join = enc("<takeaway>\n") + enc("four</takeaway>") + enc(" \\boxed{4}")
    lanes = [trunk, trunk + head1 + enc(" two") + [eos], trunk + step2,
             trunk + step1 + step2 + join + [eos]]  # fmt: skip
    params = SamplingParams(temperature=0, max_new_tokens=200)
    runs = run_both("llama", tokenizer, [prompt], params, "free",
                    logits_processor=scripted(tokenizer, fmt, prompt, lanes))  # fmt: skip
    plain, overlapped = assert_same_output(runs)
    (graph,) = runs[True][1]
    assert graph.token_ids[len(prompt) :] == trunk + step1 + step2 + join + [eos]
    assert graph.metadata["forks"] == 1 and ng.metrics(graph)["widths"] == [2]


def tiny_eos(tokenizer):
    return Engine(tiny_model("llama", tokenizer=tokenizer), tokenizer, num_pages=8).eos_ids


def test_picked_tokens_are_read_after_the_next_forward_is_launched(tokenizer, monkeypatch):
    """The point of overlapping: the host reads a step's picked tokens only once the next
    forward, which feeds them from the device, has been launched."""
    engine = Engine(tiny_model("llama", tokenizer=tokenizer), tokenizer, page_size=4,
                    num_pages=512, overlap=True)  # fmt: skip
    events = []
    step, take = engine.runner.step, engine._take

    def logged_step(lanes, *args, picked=None, **kwargs):
        fed = sum(lane.pending[-1] == PICKED for lane in lanes)
        events.append(("step", fed, picked is not None))
        return step(lanes, *args, picked=picked, **kwargs)

    def logged_take(picked):
        events.append(("take", len(picked.lanes)))
        return take(picked)

    monkeypatch.setattr(engine.runner, "step", logged_step)
    monkeypatch.setattr(engine, "_take", logged_take)
    params = SamplingParams(temperature=1.0, seed=3, max_new_tokens=40, min_branches=2,
                            max_branches=2, n=2, **SHORT)  # fmt: skip
    graphs = engine.generate(["Q"], params, mode="constrained", chat=False)
    takes = [i for i, e in enumerate(events) if e[0] == "take"]
    assert len(takes) > 10
    for i in takes:
        kind, fed, with_picked = events[i - 1]
        assert kind == "step" and with_picked and fed == events[i][1], events[i - 1 : i + 1]
    for graph in graphs:
        assert PICKED not in graph.token_ids and graph.metadata["layout_consistent"]
        engine_logprobs = torch.tensor(graph.logprobs[graph.prompt_num_tokens :])
        assert (dense_logprobs(engine.model, graph) - engine_logprobs).abs().max() <= 1e-4


@pytest.mark.parametrize("mode", ["sequential", "constrained", "free"])
def test_overlapped_context_end_matches(mode, tokenizer):
    """Prompts that fill the model's context with their budget: the overlapped engine ends each
    sample where the plain one does, for the same reason (the budget's when its tokens reached
    it), with the same violations recorded, and engine-written text the last token calls for is
    scored in both."""
    model = tiny_model("llama", tokenizer=tokenizer, max_position_embeddings=32)
    boosts = torch.zeros(len(tokenizer))
    for index, tag_id in enumerate(Format(tokenizer, special=True).tag_ids.values()):
        boosts[tag_id] = 6.0 + index % 3
    params = SamplingParams(temperature=1.0, seed=1, n=3, max_new_tokens=14, min_branches=1,
                            max_branches=2, max_plan_tokens=3, max_step_tokens=4,
                            max_takeaway_tokens=3)  # fmt: skip
    prompts = [[1000 + i for i in range(32 - 14)], [2000 + i for i in range(32 - 14)]]
    runs = {}
    for overlap in (False, True):
        engine = Engine(model, tokenizer, page_size=4, num_pages=256, overlap=overlap)
        graphs = engine.generate(
            prompts, params, mode=mode, logits_processor=lambda _, r: r + boosts
        )
        runs[overlap] = (engine, graphs)
        assert engine.pool.num_used == 0
    assert_same_output(runs)
    for graph in runs[True][1]:
        assert int(ng.position_ids(graph).max()) < 32
        assert graph.metadata["finish_reason"] == "length"
        assert None not in graph.logprobs[graph.prompt_num_tokens :]
    if mode == "free":
        assert any(g.metadata["engine_violations"] for g in runs[True][1])


def test_overlapped_end_of_sequence_needs_no_page(tokenizer):
    """The model ends its response with the token that would need a new page: the plain engine
    stops there, and so does the overlapped one, which reads its picked tokens before it cuts
    or preempts anything for want of pages (the end of sequence needs none)."""
    eos = sorted(tiny_eos(tokenizer))[0]

    def stop_after_four(context, logits):
        if len(context) == 4 + 4:
            logits[eos] += 1e4
        return logits

    params = SamplingParams(temperature=1.0, seed=0, max_new_tokens=20)
    runs = run_both("llama", tokenizer, [[1000, 1001, 1002, 1003]], params, "sequential",
                    num_pages=3, logits_processor=stop_after_four)  # fmt: skip
    plain, overlapped = assert_same_output(runs)
    (graph,) = runs[True][1]
    assert graph.token_ids[-1] == eos and graph.metadata["finish_reason"] == "stop"


@pytest.mark.parametrize("num_pages", [4, 15])
def test_overlapped_exhausted_pool_drops_the_same_unfed_text(num_pages, tokenizer):
    """A lone sample outgrowing the pool: the engine-written text its lanes hold unfed when it is
    cut (the plain engine writes it behind a picked token, the overlapped one a step later) is
    dropped, so both end on the same tokens with the same log-probs."""
    params = SamplingParams(temperature=1.0, seed=0, max_new_tokens=200, min_branches=2,
                            max_branches=2, **SHORT)  # fmt: skip
    runs = run_both("llama", tokenizer, ["Q"], params, "constrained", num_pages=num_pages)
    (_, (want,)), (_, (got,)) = runs[False], runs[True]
    assert want.metadata["finish_reason"] == got.metadata["finish_reason"] == "kv_exhausted"
    assert got.token_ids == want.token_ids and got.forced == want.forced
    for x, y in zip(want.logprobs, got.logprobs, strict=True):
        assert (x is None) == (y is None) and (x is None or abs(x - y) <= 1e-5)
    assert not want.forced[-1], "the sample ends on a token the model chose"


def test_scores_queued_by_a_pool_cut_are_computed_before_the_graphs(tokenizer):
    """A pool cut that leaves the step with nothing to run queues a score (the first token of the
    branch after a lane it ended) that no forward follows: it is still computed, before the
    graph is built, not left to the engine's next call (which wrote it into a graph already
    returned). Every token the engine had the logits of is scored as the dense forward scores
    it."""
    model = tiny_model("qwen2", tokenizer=tokenizer, max_position_embeddings=60)
    engine = Engine(model, tokenizer, page_size=2, num_pages=35, overlap=True, max_lanes=4)
    eos = sorted(engine.eos_ids)[0]

    def ending(context, logits):
        if hash(tuple(context[-2:])) % 45 == 0:
            logits[eos] += 50
        return logits

    params = [
        SamplingParams(
            temperature=1.0,
            seed=seed,
            max_new_tokens=20,
            n=3,
            min_branches=least,
            max_branches=3,
            **SHORT,
        )
        for seed, least in ((37, 1), (99, 2), (49, 1))
    ]
    graphs = engine.generate(["five five", "4", "five five"], params,
                             mode=["free", "free", "constrained"], chat=False,
                             logits_processor=ending)  # fmt: skip
    assert not engine._unscored and not engine._scoring, "scores left for the next call"
    assert engine.pool.num_used == 0
    cut = graphs[-1]
    assert cut.metadata["finish_reason"] == "kv_exhausted"
    start = cut.prompt_num_tokens
    branch_first = start + 8  # the first token of the branch after the one the cut ended
    assert cut.forced[branch_first] and cut.logprobs[branch_first] is not None
    for graph in graphs:
        start = graph.prompt_num_tokens
        known = [i for i, lp in enumerate(graph.logprobs[start:]) if lp is not None]
        expected = dense_logprobs(model, graph)[known]
        got = torch.tensor([graph.logprobs[start + i] for i in known])
        assert (expected - got).abs().max() <= 1e-4
