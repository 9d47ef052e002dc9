import numpy as np
import pytest
import torch

from npr_graph.engine.sampling import (
    NoiseStream,
    SamplingParams,
    apply_repetition_penalty,
    filter_top_k_top_p,
    gumbel_noise,
    hashed_gumbel_noise,
    select_tokens,
    truncate,
)
from npr_graph.engine.structure import Kind, LaneState, Phase, completed_tags


def pick(logits, params, allowed=None, banned=None, penalized=None, scores=None, seed=0):
    stream = NoiseStream.seeded(seed)
    tokens, logprobs, _ = select_tokens(
        logits[None], [params], [stream], [allowed], [banned], [penalized], scores
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


def test_repetition_penalty_is_transformers_rule_per_row():
    """Each row's penalty on the ids it saw (repeated ids count once), as transformers'
    ``RepetitionPenaltyLogitsProcessor`` applies it; rows without ids or with penalty 1 stay."""
    from transformers import RepetitionPenaltyLogitsProcessor

    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(5, 300, generator=generator) * 4
    seen = [[3, 3, 299, 0, 17, 3], None, np.array([5, 250, 5]), [], [8, 9]]
    penalties = [1.3, 1.3, 0.7, 2.0, 1.0]
    got = logits.clone()
    apply_repetition_penalty(got, seen, penalties)
    for row, (ids, penalty) in enumerate(zip(seen, penalties, strict=True)):
        want = logits[row : row + 1].clone()
        if ids is not None and len(ids):
            processor = RepetitionPenaltyLogitsProcessor(penalty)
            want = processor(torch.as_tensor(np.asarray(ids))[None], want)
        assert torch.equal(got[row], want[0]), row


def test_a_lanes_token_ids_follow_its_tokens():
    """The array the repetition penalty reads is converted once per token, and follows a
    picked token the host reads later and tokens taken back and written again."""
    from npr_graph.engine.lanes import PICKED, Lane

    lane = Lane(None, None, None, 0)
    for token in range(100):
        lane.tokens.append(token)
        lane.logprobs.append(0.0)
        lane.forced.append(False)
        assert lane.token_ids().tolist() == lane.tokens
    assert lane.token_ids(95).tolist() == [95, 96, 97, 98, 99]
    lane.tokens.append(PICKED)
    lane.logprobs.append(None)
    lane.forced.append(False)
    assert lane.token_ids(99).tolist() == [99, PICKED]
    lane.settle_last(7, -1.0)
    assert lane.token_ids(99).tolist() == [99, 7]
    for _ in range(3):
        lane.pop_last()
    lane.tokens += [1, 2]
    lane.logprobs += [0.0, 0.0]
    lane.forced += [False, False]
    assert lane.token_ids().tolist() == lane.tokens == [*range(98), 1, 2]


def test_a_processor_that_leaves_only_banned_tokens_does_not_lift_the_bans():
    """A processor leaving only tokens the format bans here (end of sequence inside an element)
    falls back to the logits with the bans and suppressed ids still applied: it wrote a tag
    the format did not allow. With nothing at all left, the allowed logits."""
    logits = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 9.0])  # tag 5 the model's favourite
    only_eos = torch.full((1, 6), float("-inf"))
    only_eos[0, 2] = 0.0
    greedy = SamplingParams(temperature=0, suppress_tokens=(4,))
    assert pick(logits, greedy, banned=[5, 2], scores=only_eos)[0] == 3
    assert pick(logits, greedy, allowed=[1, 5], banned=[5, 2], scores=only_eos)[0] == 1
    # the allowed set all banned: its allowed logits, as before
    assert pick(logits, greedy, allowed=[5], banned=[5], scores=only_eos)[0] == 5


def reference_filter(row, top_k, top_p):
    """One row, the plain way: top-k (ties at the k-th kept), then the top-p nucleus."""
    row = row.clone()
    if top_k:
        row[row < torch.topk(row, top_k).values[-1]] = float("-inf")
    if top_p < 1.0:
        ranked, order = torch.sort(row, descending=True)
        probs = ranked.softmax(-1)
        row[order[probs.cumsum(-1) - probs > top_p]] = float("-inf")
    return row


def test_top_k_and_top_p_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0]] * 3)
    kept = filter_top_k_top_p(logits, [2, 0, 0], [1.0, 0.7, 1.0])
    assert torch.isinf(kept[0, 2:]).all() and not torch.isinf(kept[0, :2]).any()
    assert not torch.isinf(kept[1, :2]).any() and torch.isinf(kept[1, 2:]).all()
    assert torch.equal(kept[2], logits[2])
    assert filter_top_k_top_p(logits, [0] * 3, [1.0] * 3) is logits


def test_batched_filters_match_the_row_by_row_rule():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 40, generator=generator).round(decimals=1)  # ties at the k-th value
    top_k, top_p = [0, 3, 7, 0, 5, 40], [0.9, 1.0, 0.5, 0.3, 1.0, 0.99]
    batched = filter_top_k_top_p(logits, top_k, top_p)
    for row, (k, p) in enumerate(zip(top_k, top_p, strict=True)):
        assert torch.equal(batched[row], reference_filter(logits[row], k, p)), row


def candidate_rows():
    """Rows whose cuts end among the first 256 candidates (peaked; the fourth has no cut), among
    4096 (broad, top-p 0.9), and past them (broad, top-p 0.95; a top-k whose ties reach past)."""
    generator = torch.Generator().manual_seed(5)
    vocab = 20000
    peaked = torch.randn(4, vocab, generator=generator) * 3
    peaked[:, :40] += 15.0
    broad = torch.randn(2, vocab, generator=generator) * 0.01
    broad[:, :2000] += 5.0  # 94% of the mass on 2,000 tokens
    tied = torch.zeros(1, vocab)
    tied[0, :10] = 5.0
    logits = torch.cat([peaked, broad, tied])
    return logits, [0, 50, 0, 0, 0, 0, 300], [0.9, 1.0, 0.5, 1.0, 0.9, 0.95, 1.0]


def test_filters_over_candidates_match_the_row_by_row_rule():
    """Peaked rows keep their nucleus among the first 256 candidates (a partial sort), a broad
    one among 4096; a nucleus past those, or a top-k with ties past them, sorts whole rows."""
    logits, top_k, top_p = candidate_rows()
    cases = {(0, 1, 2, 3): 256, (4,): 4096, (5,): None, (6,): None, tuple(range(7)): None}
    for rows, size in cases.items():
        k, p = [top_k[r] for r in rows], [top_p[r] for r in rows]
        ids = truncate(logits[list(rows)], k, p)[1]
        assert (None if ids is None else ids.shape[1]) == size, rows
        batched = filter_top_k_top_p(logits[list(rows)], k, p)
        for i, row in enumerate(rows):
            assert torch.equal(batched[i], reference_filter(logits[row], top_k[row], top_p[row]))


def test_speculation_ranks_the_largest_candidates_and_marks_the_rows_they_do_not_settle():
    """An overlapped step's selection reads nothing on the host: it ranks 4096 candidates
    whatever the cuts. Rows whose cut ends among them get the exact result; the others (a
    nucleus past them, ties of a top-k past them) are marked, never silently kept."""
    logits, top_k, top_p = candidate_rows()
    values, ids, settled = truncate(logits, top_k, top_p, speculate=True)
    assert ids.shape == (7, 4096)
    assert settled.tolist() == [True] * 5 + [False, False]
    exact = filter_top_k_top_p(logits, top_k, top_p)
    for row in (0, 1, 2, 4):
        assert torch.equal(exact[row].gather(0, ids[row]), values[row])
        assert torch.isinf(exact[row]).sum() == logits.shape[1] - torch.isfinite(values[row]).sum()
    assert truncate(logits[:5], top_k[:5], top_p[:5])[2] is None, "exact: nothing to mark"
    small = truncate(logits[:, :3000], top_k, top_p, speculate=True)
    assert small[1] is None and small[2] is None, "no candidate set below the vocabulary"


def test_speculated_picks_are_exact_where_settled():
    generator = torch.Generator().manual_seed(8)
    logits = torch.randn(48, 6000, generator=generator) * 3
    logits[:24, :30] += 12.0  # peaked rows: their nucleus ends among the candidates
    logits[36:] *= 0.02  # flat rows: it does not
    params = [SamplingParams(temperature=t, top_p=0.9) for t in [0.7, 1.0, 0] * 16]
    none = [None] * 48

    def select(speculate):
        streams = [NoiseStream.seeded(row) for row in range(48)]
        return select_tokens(logits, params, streams, none, none, none, speculate=speculate)

    exact, speculated = select(False), select(True)
    assert exact.settled is None
    settled = speculated.settled
    assert settled[:36].all(), "peaked rows (and broad rows at these sizes) are settled"
    assert settled.tolist()[36:] == [False, False, True] * 4, "greedy rows are always settled"
    assert torch.equal(speculated.tokens[settled], exact.tokens[settled])
    assert torch.equal(speculated.logprobs[settled], exact.logprobs[settled])


def test_a_speculating_selection_reads_nothing_on_the_host():
    """Speculation is there so that an overlapped step never waits for the device: every row
    kind (greedy, sampled, top-k, top-p, allowed, banned, penalized) selects without a value
    read on the host. Without it, top-p reads whether the candidates covered the cuts."""
    from test_backends import _HOST_SYNCS, _HostSyncProbe

    reads = _HOST_SYNCS - {"lift_fresh", "lift_fresh_copy"}  # copies to the device may go
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 5000, generator=generator)
    params = [SamplingParams(temperature=t, top_k=k, top_p=p, repetition_penalty=r)
              for t, k, p, r in [(0, 0, 1.0, 1.0), (1.0, 0, 1.0, 1.2), (0.7, 40, 1.0, 1.0),
                                 (1.0, 0, 0.9, 1.0), (0.6, 20, 0.95, 1.0), (0, 0, 0.5, 1.0)]]  # fmt: skip
    allowed = [None, None, None, [5, 6, 7], None, None]
    banned = [None, [1, 2], None, None, [9], None]
    penalized = [None, [3, 3, 4], None, None, None, None]
    for speculate in (True, False):
        probe = _HostSyncProbe(ops=reads)
        streams = [NoiseStream.seeded(row) for row in range(6)]
        with probe:
            select_tokens(logits, params, streams, allowed, banned, penalized,
                          speculate=speculate)  # fmt: skip
        assert bool(probe.seen) != speculate, probe.seen


def test_a_race_among_candidates_is_the_full_race():
    """With top-p or top-k on every sampled row, only the candidates race, with the noise the
    full race gives them (the GPU's hashed noise): the picks are the full race's."""
    generator = torch.Generator().manual_seed(6)
    logits = torch.randn(64, 3000, generator=generator) * 3
    logits[:, :30] += 12.0
    params = [SamplingParams(temperature=0.8, top_p=0.9, top_k=k) for k in [0, 20] * 32]
    streams = [NoiseStream.seeded(row) for row in range(64)]
    none = [None] * 64
    tokens = select_tokens(logits, params, streams, none, none, none).tokens
    keys = torch.tensor([NoiseStream.seeded(row).next_key() for row in range(64)])
    kept = filter_top_k_top_p(logits / 0.8, [p.top_k for p in params], [0.9] * 64)
    full_race = (kept + hashed_gumbel_noise(keys, 3000)).argmax(-1)
    assert torch.equal(tokens, full_race)


@pytest.mark.parametrize("hashed", [True, False], ids=["hashed (GPU)", "generator (CPU)"])
def test_gumbel_noise_is_a_finite_pure_function_of_the_row_key(hashed):
    keys = [0, 1, 2**31 - 2, 12345]

    def noise_of(keys):
        if hashed:
            return hashed_gumbel_noise(torch.tensor(keys), 5000)
        return gumbel_noise(keys, 5000, torch.device("cpu"))

    noise = noise_of(keys)
    assert noise.shape == (4, 5000) and noise.dtype == torch.float32
    assert torch.isfinite(noise).all() and noise.abs().max() < 90
    assert torch.equal(noise, noise_of(keys))
    assert torch.equal(noise[2:3], noise_of(keys[2:3])), "a row's noise ignores its batch"
    assert not torch.equal(noise[0], noise[1])
    # Standard Gumbel: mean = Euler's constant, variance = pi^2 / 6.
    assert abs(noise.mean().item() - 0.5772) < 0.03
    assert abs(noise.var().item() - torch.pi**2 / 6) < 0.06


@pytest.fixture(params=["generator (CPU)", "hashed (GPU)"])
def noise_kind(request, monkeypatch):
    """Both noise sources: the CPU's, and on the CPU too the hashed one GPUs use."""
    if request.param.startswith("hashed"):
        from npr_graph.engine import sampling

        def hashed(row_keys, vocab, device):
            return hashed_gumbel_noise(torch.tensor(row_keys, dtype=torch.int64), vocab)

        monkeypatch.setattr(sampling, "gumbel_noise", hashed)
    return request.param


def test_sampled_frequencies_follow_the_distribution(noise_kind):
    """One stream's successive draws (how a sample uses it) follow the softmax."""
    probs = torch.tensor([0.1, 0.0, 0.6, 0.25, 0.05])
    stream = NoiseStream.seeded(1)
    params = [SamplingParams(temperature=1.0)] * 1000
    counts = torch.zeros(5)
    for _ in range(20):
        tokens, _, _ = select_tokens(
            probs.log().expand(1000, 5), params, [stream] * 1000, [None] * 1000,
            [None] * 1000, [None] * 1000,
        )  # fmt: skip
        counts += torch.bincount(tokens, minlength=5)
    assert stream.draws == 20000
    assert counts[1] == 0 and torch.allclose(counts / 20000, probs, atol=0.012)


def test_seeds_give_distinct_repeatable_streams():
    first = NoiseStream.seeded(7)
    keys = [first.next_key() for _ in range(100)]
    again = NoiseStream.seeded(7)
    assert keys == [again.next_key() for _ in range(100)]
    assert len(set(keys)) == 100 and all(0 <= k < 2**31 for k in keys)
    seeds = [0, 1, 2, 2**31, 2**62 + 5, -3, 7 * 1_000_003 + 1]
    assert len({NoiseStream.seeded(seed).key for seed in seeds}) == len(seeds)
    torch.manual_seed(0)
    unseeded = NoiseStream.unseeded().key
    torch.manual_seed(0)
    assert NoiseStream.unseeded().key == unseeded


def test_picks_survive_tiny_changes_of_the_logits(noise_kind):
    """Another batch shape or kernel changes logits in the last bits; a pick must almost never
    follow. (Inverse-CDF sampling over a running sum of the probabilities flips 28 of these
    1000 rows: every boundary moves with the changes of all tokens before it.)"""
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(1000, 30000, generator=generator) * 3
    nudged = logits + torch.randn(1000, 30000, generator=generator) * 1e-4
    params = [SamplingParams(temperature=1.0)] * 1000

    def pick_all(values):
        streams = [NoiseStream.seeded(row) for row in range(1000)]
        none = [None] * 1000
        return select_tokens(values, params, streams, none, none, none)[0]

    assert (pick_all(logits) != pick_all(nudged)).sum() <= 3


def test_a_row_picks_the_same_token_alone_and_in_any_batch():
    """Batching is only a speed-up: each row's pick and log-prob are those it gets alone, also
    when its batch races over candidates (every sampled row trimmed) and when it does not."""
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 600, generator=generator) * 3
    logits[:, :20] += 6.0  # peaked: top-k and top-p cuts end among the first candidates
    rows = [
        (SamplingParams(temperature=0), None, None, None),
        (SamplingParams(temperature=0.7, top_k=5, seed=1), None, [0, 1], None),
        (SamplingParams(temperature=1.3, top_p=0.8, seed=2), [3, 4, 5, 9], None, None),
        (SamplingParams(temperature=0, repetition_penalty=1.5), None, None, [7, 7, 8]),
        (SamplingParams(temperature=1.0, suppress_tokens=(2, 3), seed=3), None, [4], [2]),
        (SamplingParams(temperature=0.5, seed=4), [11], None, None),
    ]

    def pick_rows(indices, seeds):
        chosen = [rows[i] for i in indices]
        streams = [NoiseStream.seeded(s) for s in seeds]
        return select_tokens(
            logits[indices], [c[0] for c in chosen], streams,
            [c[1] for c in chosen], [c[2] for c in chosen], [c[3] for c in chosen],
        )  # fmt: skip

    everything = list(range(len(rows)))
    tokens, logprobs, _ = pick_rows(everything, [100 + i for i in everything])
    for order in (everything, everything[::-1], [4, 1, 5], [1, 2], [0, 2, 3]):
        batch_tokens, batch_logprobs, _ = pick_rows(order, [100 + i for i in order])
        assert batch_tokens.tolist() == tokens[order].tolist()
        assert torch.allclose(batch_logprobs, logprobs[order])
    for i in everything:
        alone_token, alone_logprob, _ = pick_rows([i], [100 + i])
        assert int(alone_token) == int(tokens[i]) and torch.allclose(alone_logprob, logprobs[i])
    assert int(tokens[5]) == 11
    assert int(tokens[4]) not in (2, 3, 4)


def test_suppressed_tokens_are_never_picked_but_keep_their_logprob():
    logits = torch.tensor([5.0, 0.0, 0.0])
    params = SamplingParams(temperature=0, suppress_tokens=[0])
    token, logprob = pick(logits, params)
    assert token in (1, 2) and abs(logprob - torch.log_softmax(logits, -1)[token].item()) < 1e-6
    assert params.suppress_tokens == (0,)
    with pytest.raises(ValueError, match="suppress_tokens"):
        SamplingParams(suppress_tokens=(-1,))


def test_seeded_sampling_is_reproducible():
    logits = torch.randn(50)
    params = SamplingParams(temperature=1.0)
    assert [pick(logits, params, seed=s)[0] for s in range(20)] == [
        pick(logits, params, seed=s)[0] for s in range(20)
    ]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_selection_on_the_gpu_matches_the_cpu(monkeypatch):
    """The GPU's selection (hashed noise) against the same computation on the CPU: the noise is
    the same function of the keys on both, so the picks agree."""
    from npr_graph.engine import sampling

    gpu_noise = sampling.gumbel_noise
    assert gpu_noise([3], 10, torch.device("cuda")).device.type == "cuda"
    monkeypatch.setattr(
        sampling,
        "gumbel_noise",
        lambda keys, vocab, device: hashed_gumbel_noise(
            torch.tensor(keys, dtype=torch.int64).to(device), vocab
        ),
    )
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(8, 151936, generator=generator) * 4
    params = [
        SamplingParams(temperature=t, top_k=k, top_p=p, seed=i)
        for i, (t, k, p) in enumerate(
            [(0, 0, 1.0), (1.0, 0, 1.0), (0.7, 50, 1.0), (1.0, 0, 0.9)] * 2
        )
    ]
    allowed = [None, None, None, None, [5, 6, 7], None, None, None]
    banned = [None, [1, 2], None, None, None, None, None, [3]]

    def run(device):
        streams = [NoiseStream.seeded(i) for i in range(8)]
        return select_tokens(logits.to(device), params, streams, allowed, banned, [None] * 8)[:2]

    cpu_tokens, cpu_logprobs = run("cpu")
    gpu_tokens, gpu_logprobs = run("cuda")
    assert gpu_tokens.device.type == "cuda"
    # The GPU's log may differ from the CPU's in the last bit: a near-tie could flip one pick.
    same = gpu_tokens.cpu() == cpu_tokens
    assert same.float().mean() >= 7 / 8
    assert torch.allclose(gpu_logprobs.cpu()[same], cpu_logprobs[same], atol=1e-4)
    noise = hashed_gumbel_noise(torch.tensor([5, 6]), 151936)
    assert torch.allclose(hashed_gumbel_noise(torch.tensor([5, 6]).cuda(), 151936).cpu(), noise)


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

        def others_banned(self, *keep):
            return [i for t, i in self.tag_ids.items() if t not in keep]

    state = LaneState("constrained", Phase.GUIDELINE, plans=1)
    assert state.choices(Fmt(), params) == ([Fmt.tag_ids["<plan>"]], None)
    state.plans = 3
    assert state.choices(Fmt(), params) == ([Fmt.tag_ids["</guideline>"]], None)
    state.phase = Phase.STEP
    allowed, banned = state.choices(Fmt(), params)
    assert (
        allowed is None and Fmt.tag_ids["</step>"] not in banned and Fmt.tag_ids["<step>"] in banned
    )
