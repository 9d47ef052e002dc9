import torch

from npr_graph.engine.sampling import SamplingParams, filter_top_k_top_p, select_tokens
from npr_graph.engine.structure import Kind, LaneState, Phase, completed_tags


def pick(logits, params, allowed=None, banned=None, penalized=None, scores=None, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tokens, logprobs = select_tokens(
        logits[None], [params], [generator], [allowed], [banned], [penalized], scores
    )
    return int(tokens[0]), float(logprobs[0])


def test_greedy_takes_the_argmax_and_reports_the_full_distribution_logprob():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.0])
    token, logprob = pick(logits, SamplingParams(temperature=0))
    assert token == 1
    assert abs(logprob - torch.log_softmax(logits, -1)[1].item()) < 1e-6


def test_structural_restrictions_do_not_change_the_recorded_logprob():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.0])
    token, logprob = pick(logits, SamplingParams(temperature=0), allowed=[0, 2])
    assert token == 2 and abs(logprob - torch.log_softmax(logits, -1)[2].item()) < 1e-6
    token, _ = pick(logits, SamplingParams(temperature=0), banned=[1, 3])
    assert token == 2


def test_temperature_logprob_and_sampling_respect_bans():
    logits = torch.tensor([0.0, 0.5, 1.0, 1.5])
    params = SamplingParams(temperature=0.5)
    for seed in range(50):
        token, logprob = pick(logits, params, banned=[3], seed=seed)
        assert token != 3
        assert abs(logprob - torch.log_softmax(logits / 0.5, -1)[token].item()) < 1e-6


def test_repetition_penalty_and_processor_scores_only_change_the_pick():
    logits = torch.tensor([2.0, 1.9, -5.0])
    token, logprob = pick(
        logits, SamplingParams(temperature=0, repetition_penalty=1.2), penalized=[0]
    )
    assert token == 1 and abs(logprob - torch.log_softmax(logits, -1)[1].item()) < 1e-6
    scores = torch.tensor([[0.0, 0.0, 9.0]])
    token, logprob = pick(logits, SamplingParams(temperature=0), scores=scores)
    assert token == 2 and abs(logprob - torch.log_softmax(logits, -1)[2].item()) < 1e-6


def test_top_k_and_top_p_filters():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0])
    assert torch.isinf(filter_top_k_top_p(logits, 2, 1.0)[2:]).all()
    kept = filter_top_k_top_p(logits, 0, 0.7)
    assert not torch.isinf(kept[:2]).any() and torch.isinf(kept[2:]).all()
    assert torch.equal(filter_top_k_top_p(logits, 0, 1.0), logits)


def test_seeded_sampling_is_reproducible():
    logits = torch.randn(50)
    params = SamplingParams(temperature=1.0)
    assert [pick(logits, params, seed=s)[0] for s in range(20)] == [
        pick(logits, params, seed=s)[0] for s in range(20)
    ]


def test_completed_tags_only_counts_tags_ending_in_the_new_piece():
    assert completed_tags("a </step>", "p>") == ["</step>"]
    assert completed_tags("<step> x", " x") == []
    assert completed_tags("<plan>1</plan>", "1</plan>") == ["</plan>"]


def test_free_mode_state_machine_forks_and_falls_back():
    params = SamplingParams(max_branches=2)
    state = LaneState("free")
    for tag in ["<guideline>", "<plan>", "</plan>", "<plan>", "</plan>"]:
        action, _ = state.observe([tag], params)
        assert action.kind is Kind.CONTINUE
    action, forced = state.observe(["</guideline>"], params)
    assert action.kind is Kind.FORK and action.width == 2 and forced == "\n"
    wide = LaneState("free")
    for tag in ["<guideline>"] + ["<plan>", "</plan>"] * 3:
        wide.observe([tag], params)
    action, _ = wide.observe(["</guideline>"], params)
    assert (
        action.kind is Kind.CONTINUE and action.violation and wide.phase is Phase.SEQUENTIAL_BLOCK
    )
    branch, header = state.fork_branch(1)
    assert header == "<step>\n2:" and branch.phase is Phase.FORKED
    branch.observe(["<step>"], params)
    action, forced = branch.observe(["</step>"], params)
    assert action.kind is Kind.BRANCH_DONE and forced == "\n"


def test_constrained_choices():
    params = SamplingParams(min_branches=2, max_branches=3)

    class Fmt:
        tag_ids = {
            t: i
            for i, t in enumerate(
                [
                    "<guideline>",
                    "</guideline>",
                    "<plan>",
                    "</plan>",
                    "<step>",
                    "</step>",
                    "<takeaway>",
                    "</takeaway>",
                ]
            )
        }

        def others_banned(self, keep):
            return [i for t, i in self.tag_ids.items() if t != keep]

    state = LaneState("constrained", Phase.GUIDELINE, plans=1)
    assert state.choices(Fmt(), params) == ([Fmt.tag_ids["<plan>"]], None)
    state.plans = 3
    assert state.choices(Fmt(), params) == ([Fmt.tag_ids["</guideline>"]], None)
    state.phase = Phase.STEP
    allowed, banned = state.choices(Fmt(), params)
    assert (
        allowed is None and Fmt.tag_ids["</step>"] not in banned and Fmt.tag_ids["<step>"] in banned
    )
