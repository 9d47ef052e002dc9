from itertools import pairwise

import pytest
import torch
from conftest import MULTIVERSE_TRACE, NPR_TRACE

import npr_graph as ng
from npr_graph.layout import CompactMask, node_visibility

SMALL = "<guideline><plan>1: a</plan><plan>2: b</plan></guideline>\n<step>1: xx</step>\n<step>2: yyyy</step>\n<takeaway>tt</takeaway>ok"


@pytest.fixture
def small(char_tokenizer):
    return ng.parse(
        char_tokenizer.encode(SMALL),
        tokenizer=char_tokenizer,
        prompt_ids=char_tokenizer.encode("Q?"),
    )


def test_native_positions_by_hand(small):
    # prompt 2, <guideline> 1, plans 6+6, </guideline>\n 2, step1 8, step2 10, takeaway 4, "ok" 2
    expected = list(range(17)) + list(range(17, 25)) + list(range(17, 27)) + list(range(27, 33))
    assert ng.position_ids(small).tolist() == expected


def test_native_mask_hides_siblings_and_keeps_ancestors(small):
    mask = ng.attention_mask(small)
    step1, step2 = small.nodes_of("step")
    takeaway = small.nodes_of("takeaway")[0]
    s1 = slice(step1.token_start, step1.token_end)
    s2 = slice(step2.token_start, step2.token_end)
    assert not mask[s2, s1].any() and not mask[s1, s2].any()
    assert mask[takeaway.token_start, : takeaway.token_start].all()
    assert mask[s2, : step1.token_start].all()
    own = mask[s1, s1]
    assert torch.equal(own, torch.ones_like(own).tril())
    assert not (mask & ~torch.ones_like(mask).tril()).any()


def test_official_layout_by_hand(small):
    tokens = [small.token_text(i) for i in range(small.num_tokens)]
    positions = ng.position_ids(small, "official").tolist()
    by_token = list(zip(tokens, positions, strict=True))
    guideline_close = tokens.index("</guideline>")
    step_tokens = [i for i, t in enumerate(tokens) if t == "<step>"]
    assert [positions[i] for i in step_tokens] == [positions[guideline_close] + 1] * 2
    step_closes = [i for i, t in enumerate(tokens) if t == "</step>"]
    takeaway = tokens.index("<takeaway>")
    assert positions[takeaway] == max(positions[i] for i in step_closes) + 1
    assert positions[: small.prompt_num_tokens] == list(range(small.prompt_num_tokens))
    assert by_token[guideline_close + 1] == ("\n", positions[guideline_close] + 1)

    mask = ng.attention_mask(small, "official")
    (a0, a1), (b0, b1) = (step_tokens[0], step_closes[0] + 1), (step_tokens[1], step_closes[1] + 1)
    assert not mask[b0:b1, a0:a1].any()
    newline_between = step_closes[0] + 1
    assert mask[b0:b1, newline_between].all(), "the reference leaks separators between steps"
    causal = torch.ones_like(mask).tril()
    expected = causal.clone()
    expected[b0:b1, a0:a1] = False
    assert torch.equal(mask, expected)


def test_official_positions_multi_token_tags(smollm2_tokenizer):
    ids = smollm2_tokenizer.encode(NPR_TRACE, add_special_tokens=False)
    graph = ng.parse(ids, tokenizer=smollm2_tokenizer)
    positions = ng.position_ids(graph, "official")
    native = ng.position_ids(graph)
    assert positions.shape == native.shape == (len(ids),)
    step1, step2 = graph.nodes_of("step")
    assert positions[step1.token_start] == positions[step2.token_start]


def test_compact_mask_matches_dense_and_packs(small, char_tokenizer):
    for mode in ng.layout.MODES:
        compact = ng.compact_mask(small, mode)
        dense = ng.attention_mask(small, mode)
        assert torch.equal(compact.to_dense(), dense)
        q, k = torch.meshgrid(
            torch.arange(dense.shape[0]), torch.arange(dense.shape[0]), indexing="ij"
        )
        assert torch.equal(compact.allows(q, k), dense)
    other = ng.parse(char_tokenizer.encode("plain \\boxed{1}"), tokenizer=char_tokenizer)
    packed = CompactMask.concat([ng.compact_mask(small), ng.compact_mask(other)])
    dense = packed.to_dense()
    n = small.num_tokens
    assert torch.equal(dense[:n, :n], ng.attention_mask(small))
    assert torch.equal(dense[n:, n:], ng.attention_mask(other))
    assert not dense[n:, :n].any()


def test_visible_ranges_list_the_ancestor_segments(small):
    compact = ng.compact_mask(small)
    step2 = small.nodes_of("step")[1]
    step1 = small.nodes_of("step")[0]
    ranges = compact.visible_ranges(step2.token_end - 1)
    assert ranges[-1] == (step2.token_start, step2.token_end)
    covered = {t for a, b in ranges for t in range(a, b)}
    assert covered.isdisjoint(range(step1.token_start, step1.token_end))
    assert covered == set(range(step1.token_start)) | set(range(step2.token_start, step2.token_end))


@pytest.mark.parametrize("trace", [NPR_TRACE, MULTIVERSE_TRACE], ids=["npr", "multiverse"])
def test_ancestor_spans_and_the_own_node_are_what_each_token_sees(trace, char_tokenizer):
    grammar = "multiverse" if trace == MULTIVERSE_TRACE else "npr"
    graph = ng.parse(
        char_tokenizer.encode(trace),
        tokenizer=char_tokenizer,
        prompt_ids=char_tokenizer.encode("Q?"),
        grammar=grammar,
    )
    dense = ng.attention_mask(graph)
    spans = ng.layout.ancestor_spans(graph)
    assert any(s and s[-1][1] < n.token_start for s, n in zip(spans, graph.nodes, strict=True))
    for node in graph.nodes:
        for token in range(node.token_start, node.token_end):
            seen = {t for a, b in spans[node.id] for t in range(a, b)}
            seen |= set(range(node.token_start, token + 1))
            assert seen == set(torch.nonzero(dense[token]).flatten().tolist())
        assert all(a < b for a, b in spans[node.id])
        assert all(b < c for (_, b), (c, _) in pairwise(spans[node.id]))


# Unfused on the CPU on purpose: the test is about the mask, not the kernel.
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_block_mask_equals_dense_sdpa(small):
    from torch.nn.attention.flex_attention import flex_attention

    compact = ng.compact_mask(small)
    length = small.num_tokens
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, length, 8) for _ in range(3))
    flex = flex_attention(q, k, v, block_mask=compact.block_mask(block_size=16))
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=compact.to_dense())
    torch.testing.assert_close(flex, sdpa, atol=1e-5, rtol=1e-5)


def test_nested_visibility(char_tokenizer):
    graph = ng.parse(
        char_tokenizer.encode(MULTIVERSE_TRACE), tokenizer=char_tokenizer, grammar="multiverse"
    )
    visible = node_visibility(graph)
    outer, inner = graph.blocks
    path2 = outer.branches[1][0]
    for node in [
        *outer.branches[0],
        *inner.header,
        *inner.items,
        *inner.branches[0],
        *inner.branches[1],
    ]:
        assert not visible[path2, node] and not visible[node, path2]
    inner_a, inner_b = inner.branches[0][0], inner.branches[1][0]
    assert not visible[inner_b, inner_a]
    assert visible[inner_a, outer.branches[0][0]]
    conclusion = outer.join
    assert visible[conclusion, : conclusion + 1].all()


def test_layout_needs_tokens():
    with pytest.raises(ValueError, match="token"):
        ng.position_ids(ng.parse(NPR_TRACE))
    with pytest.raises(ValueError, match="mode"):
        ng.attention_mask(ng.parse(NPR_TRACE), mode="other")
