"""Advantage estimators: pure tensor (and graph) functions in a name registry.

Sample-level estimators are called as ``fn(rewards, group_ids)`` with 1-D tensors (one entry per
sample; samples of one prompt share a group id) and return one advantage per sample:

- ``grpo``: ``(r - mean of the group) / (std of the group + eps)``;
- ``papo``: ``(r - mean of the group) / (std of the whole batch + eps)`` (the NPR reference).

Standard deviations are torch's default (unbiased); a group of one sample has no baseline and gets
advantage 0, and a batch whose rewards are all equal gets advantage 0 everywhere.

The graph-level estimator ``branch`` (:func:`branch_advantages`) spreads a sample's advantage over the tokens
of its graph and adds a sibling-relative term to step nodes (see its docstring). Any
sample-level estimator can serve as its outcome term.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from npr_graph.graph import NodeKind, ReasoningGraph

from .registry import Registry

EPS = 1e-6

_ESTIMATORS: Registry[Callable[..., Any]] = Registry("advantage estimator")
register = _ESTIMATORS.register
get = _ESTIMATORS.get
names = _ESTIMATORS.names


def _check(rewards: torch.Tensor, group_ids: torch.Tensor) -> None:
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError("rewards and group_ids must be 1-D tensors of the same length")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards must be finite")


def _result_dtype(rewards: torch.Tensor) -> torch.dtype:
    """Advantages keep floating rewards' dtype; integer rewards (±1) get the default float dtype,
    as advantages are fractions."""
    return rewards.dtype if rewards.is_floating_point() else torch.get_default_dtype()


def group_stats(rewards: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per sample: the mean and unbiased std of its group's rewards, and its group's size."""
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    rewards = rewards.double()
    zeros = torch.zeros(len(counts), dtype=torch.float64, device=rewards.device)
    sums = zeros.index_add(0, inverse, rewards)
    means = sums / counts
    squares = zeros.index_add(0, inverse, (rewards - means[inverse]) ** 2)
    stds = torch.where(counts > 1, squares / (counts - 1).clamp(min=1), 0.0).sqrt()
    return means[inverse], stds[inverse], counts[inverse]


@register("grpo")
def grpo(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    _check(rewards, group_ids)
    mean, std, size = group_stats(rewards, group_ids)
    advantage = (rewards.double() - mean) / (std + eps)
    return torch.where(size > 1, advantage, 0.0).to(_result_dtype(rewards))


@register("papo")
def papo(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    _check(rewards, group_ids)
    mean, _, size = group_stats(rewards, group_ids)
    batch_std = rewards.double().std() if rewards.numel() > 1 else rewards.new_zeros(())
    advantage = (rewards.double() - mean) / (batch_std + eps)
    return torch.where(size > 1, advantage, 0.0).to(_result_dtype(rewards))


# -- graph-level credit assignment ---------------------------------------------------------------
BranchScorer = Callable[[str, str], float | None]


def stated_result_scorer(step_text: str, reference: str) -> float | None:
    """+1 when the step's own stated result (its boxed value, else its final number) verifies
    against the reference answer, -1 when it states a different one, None when it states none."""
    from .rewards import stated_result, verify

    result = stated_result(step_text)
    if result is None:
        return None
    return 1.0 if verify(result, reference) else -1.0


BRANCH_KINDS = (NodeKind.STEP, NodeKind.PATH)


def step_scores(
    graph: ReasoningGraph, reference: str, scorer: BranchScorer = stated_result_scorer
) -> dict[int, float]:
    """The sibling-relative term's raw score of every step node (NPR ``<step>``, Multiverse
    ``<Path>``), block by block: the scorer's value on its branch's own text (a path holding a
    nested block is several nodes, scored together), or the mean of the block's stated scores
    for branches stating none (so they get no branch term). Blocks where no branch states a
    result are left out."""
    scores: dict[int, float] = {}
    for block in graph.blocks:
        branches = [
            [i for i in branch if graph.nodes[i].kind in BRANCH_KINDS] for branch in block.branches
        ]
        branches = [nodes for nodes in branches if nodes]
        # without the step's label: "2:" is its number, not a result it states
        stated = [
            scorer("\n".join(graph.nodes[i].body for i in nodes), reference) for nodes in branches
        ]
        known = [s for s in stated if s is not None]
        if not known:
            continue
        mean = sum(known) / len(known)
        for nodes, score in zip(branches, stated, strict=True):
            scores.update(dict.fromkeys(nodes, mean if score is None else score))
    return scores


def branch_terms(
    graph: ReasoningGraph, reference: str, scorer: BranchScorer = stated_result_scorer
) -> dict[int, float]:
    """Per step node: ``s_b - mean of its block's s`` (over branches); these sum to zero over
    the branches of every block."""
    scores = step_scores(graph, reference, scorer)
    terms: dict[int, float] = {}
    for block in graph.blocks:
        members = [[i for i in branch if i in scores] for branch in block.branches]
        members = [nodes for nodes in members if nodes]
        if not members:
            continue
        mean = sum(scores[nodes[0]] for nodes in members) / len(members)
        terms.update({i: scores[i] - mean for nodes in members for i in nodes})
    return terms


def branch_advantages(
    graphs: Sequence[ReasoningGraph],
    references: Sequence[str],
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    lam: float = 0.5,
    outcome: str = "papo",
    scorer: BranchScorer = stated_result_scorer,
) -> list[torch.Tensor]:
    """Per graph, one advantage per response token (``FloatTensor[num_tokens - prompt]``).

    Every node's tokens carry the sample's outcome advantage (estimator ``outcome``); the tokens
    of a step node also get ``lam * (s_b - mean of the block's s)``, where ``s`` is the branch
    scorer's value (default: does the step's own stated result verify against the reference).
    With ``lam = 0`` this is the outcome estimator broadcast over tokens."""
    if not len(graphs) == len(references) == len(rewards):
        raise ValueError("give one reference and one reward per graph")
    outcome_advantages = get(outcome)(rewards, group_ids)
    return [
        spread(graph, float(advantage), reference, lam=lam, scorer=scorer)
        for graph, reference, advantage in zip(graphs, references, outcome_advantages, strict=True)
    ]


def spread(
    graph: ReasoningGraph,
    outcome_advantage: float,
    reference: str | None = None,
    *,
    lam: float = 0.0,
    scorer: BranchScorer = stated_result_scorer,
) -> torch.Tensor:
    """One sample's per-response-token advantages: the outcome advantage on every token, plus
    ``lam`` times the branch term on step nodes (needs ``reference`` when ``lam != 0``)."""
    start = graph.prompt_num_tokens
    tokens = torch.full((graph.num_tokens - start,), outcome_advantage, dtype=torch.float32)
    if lam != 0.0:
        if reference is None:
            raise ValueError("branch credit needs the reference answer")
        for node_id, term in branch_terms(graph, reference, scorer).items():
            node = graph.nodes[node_id]
            tokens[node.token_start - start : node.token_end - start] += lam * term
    return tokens


branch_advantages.graph_level = True  # type: ignore[attr-defined]
register("branch")(branch_advantages)


def token_advantages(
    name: str,
    graphs: Sequence[ReasoningGraph],
    references: Sequence[str],
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    **options,
) -> list[torch.Tensor]:
    """Per-token advantages of every graph from the estimator ``name``: ``branch`` is graph-level,
    every other name is a sample-level estimator broadcast over the sample's response tokens."""
    estimator = get(name)
    if getattr(estimator, "graph_level", False):
        return estimator(graphs, references, rewards, group_ids, **options)
    per_sample = estimator(rewards, group_ids, **options)
    return [spread(g, float(a)) for g, a in zip(graphs, per_sample, strict=True)]


def node_advantages(graph: ReasoningGraph, advantages: torch.Tensor) -> list[float | None]:
    """Per node of ``graph``, the mean advantage of its trained tokens (``advantages``: one per
    response token, as :func:`spread` gives them; engine-written tokens are not trained); None
    for a node with none (the prompt, a node of engine-written text only)."""
    start = graph.prompt_num_tokens
    if advantages.shape != (graph.num_tokens - start,):
        raise ValueError(
            f"expected one advantage per response token ({graph.num_tokens - start}), "
            f"got shape {tuple(advantages.shape)}"
        )
    forced = graph.forced or [False] * graph.num_tokens
    trained = ~torch.tensor(forced[start:], dtype=torch.bool)
    out: list[float | None] = []
    for node in graph.nodes:
        if node.token_start is None or node.token_end is None:
            raise ValueError("node advantages need a tokenized graph")
        span = slice(max(node.token_start, start) - start, max(node.token_end - start, 0))
        values = advantages[span][trained[span]]
        out.append(float(values.mean()) if values.numel() else None)
    return out
