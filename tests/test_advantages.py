"""Advantage estimators: sample-level formulas and graph-level branch credit properties."""

import pytest
import torch
from conftest import NPR_TRACE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import npr_graph as ng
from npr_graph import strategies as ngs
from npr_graph.graph import NodeKind
from npr_graph.tokenizers import CharTokenizer
from papo import advantages

TOKENIZER = CharTokenizer()


def test_grpo_and_papo_formulas():
    rewards = torch.tensor([1.0, -1.0, -1.0, 1.0, 1.0, 1.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    group0 = rewards[:3]
    grpo = advantages.get("grpo")(rewards, groups)
    expected0 = (group0 - group0.mean()) / (group0.std() + 1e-6)
    assert torch.allclose(grpo[:3], expected0)
    assert torch.equal(grpo[3:], torch.zeros(3)), "a group with equal rewards has no signal"
    papo = advantages.get("papo")(rewards, groups)
    assert torch.allclose(papo[:3], (group0 - group0.mean()) / (rewards.std() + 1e-6))
    assert torch.equal(papo[3:], torch.zeros(3))


@pytest.mark.parametrize("name", ["grpo", "papo"])
def test_integer_rewards_give_fractional_advantages(name):
    result = advantages.get(name)(torch.tensor([1, -1]), torch.tensor([0, 0]))
    assert result.dtype == torch.get_default_dtype()
    assert torch.allclose(result, torch.tensor([0.7071, -0.7071]), atol=1e-4)


def test_singleton_groups_and_registry():
    rewards = torch.tensor([1.0, -1.0])
    assert torch.equal(advantages.get("grpo")(rewards, torch.tensor([0, 1])), torch.zeros(2))
    assert {"grpo", "papo", "branch"} <= set(advantages.names())
    with pytest.raises(KeyError, match="known: branch, grpo, papo"):
        advantages.get("nope")
    with pytest.raises(ValueError, match="finite"):
        advantages.get("papo")(torch.tensor([float("nan"), 1.0]), torch.tensor([0, 0]))


@given(
    rewards=st.lists(st.sampled_from([-1.0, 1.0, 0.5, 0.0]), min_size=2, max_size=24),
    groups=st.integers(1, 4),
)
def test_group_advantages_sum_to_zero_per_group(rewards, groups):
    rewards_t = torch.tensor(rewards)
    group_ids = torch.arange(len(rewards)) % groups
    for name in ("grpo", "papo"):
        adv = advantages.get(name)(rewards_t, group_ids)
        for g in range(groups):
            assert abs(float(adv[group_ids == g].sum())) < 1e-4


def _graph(text: str):
    return ng.parse(TOKENIZER.encode(text), tokenizer=TOKENIZER)


def random_scorer(seed: int):
    import random

    rng = random.Random(seed)

    def score(text: str, reference: str):
        return rng.choice([1.0, -1.0, None])

    return score


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pair=ngs.traces("npr"), seed=st.integers(0, 10**6), lam=st.floats(0.1, 2.0))
def test_branch_credit_properties(pair, seed, lam):
    _, text = pair
    graphs = [_graph(text), _graph(text)]
    rewards = torch.tensor([1.0, -1.0])
    groups = torch.tensor([0, 0])
    outcome = advantages.get("papo")(rewards, groups)
    per_token = advantages.get("branch")(
        graphs, ["5", "5"], rewards, groups, lam=lam, scorer=random_scorer(seed)
    )
    for graph, tokens, base in zip(graphs, per_token, outcome, strict=True):
        assert tokens.shape == (graph.num_tokens - graph.prompt_num_tokens,)
        for node in graph.response_nodes():
            span = tokens[node.token_start : node.token_end]
            if node.kind is not NodeKind.STEP:
                assert torch.all(span == float(base)), "shared nodes carry the outcome advantage"
        for block in graph.blocks:
            terms = [
                float(tokens[graph.nodes[i].token_start]) - float(base)
                for branch in block.branches
                for i in branch
                if graph.nodes[i].kind is NodeKind.STEP and graph.nodes[i].num_tokens
            ]
            assert abs(sum(terms)) < 1e-4, "branch terms sum to zero within a block"
    zero = advantages.get("branch")(
        graphs, ["5", "5"], rewards, groups, lam=0.0, scorer=random_scorer(seed)
    )
    for tokens, base in zip(zero, outcome, strict=True):
        assert torch.equal(tokens, torch.full_like(tokens, float(base))), "lam=0 equals papo"


def test_branch_default_scorer_rewards_the_step_that_verifies():
    graph = _graph(NPR_TRACE.replace("gives 3 and 2.", "gives \\boxed{7}."))
    # step 1 states no boxed value but ends in a number; step 2 states a wrong boxed value
    terms = advantages.branch_terms(graph, "3")
    steps = graph.nodes_of("step")
    assert terms[steps[0].id] > 0 > terms[steps[1].id]
    assert abs(sum(terms.values())) < 1e-9
    rewards, groups = torch.tensor([1.0, -1.0]), torch.tensor([0, 0])
    tokens = advantages.token_advantages(
        "branch", [graph, graph], ["3", "3"], rewards, groups, lam=0.5
    )[0]
    base = float(advantages.get("papo")(rewards, groups)[0])
    start = steps[0].token_start - graph.prompt_num_tokens
    assert float(tokens[start]) == pytest.approx(base + 0.5 * terms[steps[0].id])


def test_a_steps_label_is_not_its_stated_result():
    """ "2:" numbers the step: a step stating no result of its own gets no branch term, whatever
    its number (the label was read as the result, so credit followed which index equalled the
    reference)."""
    trace = (
        "<guideline>\n<plan>1: factor</plan>\n<plan>2: formula</plan>\n<plan>3: guess</plan>\n"
        "</guideline>\n<step>\n1: factoring gives roots two and three\n</step>\n"
        "<step>\n2: the formula agrees\n</step>\n<step>\n3: a guess is unreliable\n</step>\n"
        "<takeaway>\nroots two and three\n</takeaway>\nThe answer is \\boxed{3}."
    )
    for reference in ("1", "2", "3"):
        assert advantages.branch_terms(_graph(trace), reference) == {}
    stated = trace.replace("roots two and three\n</step>", "roots 2 and 3\n</step>")
    stated = _graph(stated.replace("formula agrees", "formula gives 5"))
    terms = advantages.branch_terms(stated, "3")
    assert [terms[step.id] for step in stated.nodes_of("step")] == [1.0, -1.0, 0.0]


def test_node_advantages_give_each_node_its_credit():
    """Per node, the mean advantage of its trained tokens: the outcome on shared nodes, plus
    the branch term on steps; engine-written tokens (never trained) do not count."""
    graph = _graph(NPR_TRACE.replace("gives 3 and 2.", "gives \\boxed{7}."))
    tokens = advantages.spread(graph, 0.25, "3", lam=0.5)
    terms = advantages.branch_terms(graph, "3")
    assert terms, "the steps get branch terms"
    per_node = advantages.node_advantages(graph, tokens)
    assert len(per_node) == len(graph.nodes)
    for node, value in zip(graph.nodes, per_node, strict=True):
        if not node.num_tokens:
            assert value is None
        else:
            assert value == pytest.approx(0.25 + 0.5 * terms.get(node.id, 0.0)), node

    step = graph.nodes_of("step")[0]
    graph.forced = [False] * graph.num_tokens
    graph.forced[step.token_start] = True
    tokens[step.token_start] = 100.0  # an engine-written token's advantage is not trained
    assert advantages.node_advantages(graph, tokens)[step.id] == pytest.approx(per_node[step.id])
    graph.forced[step.token_start : step.token_end] = [True] * step.num_tokens
    assert advantages.node_advantages(graph, tokens)[step.id] is None
    with pytest.raises(ValueError, match="one advantage per response token"):
        advantages.node_advantages(graph, tokens[:-1])
