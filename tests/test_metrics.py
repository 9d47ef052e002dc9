import pytest
from conftest import MULTIVERSE_TRACE, NPR_TRACE

import npr_graph as ng


def test_metrics_of_a_tokenized_trace(char_tokenizer):
    graph = ng.parse(char_tokenizer.encode(NPR_TRACE), tokenizer=char_tokenizer)
    m = ng.metrics(graph)
    step1, step2 = graph.nodes_of("step")
    longest = max(step1.num_tokens, step2.num_tokens)
    shortest = min(step1.num_tokens, step2.num_tokens)
    assert m["unit"] == "tokens"
    assert m["blocks"] == 1 and m["widths"] == [2] and m["depth"] == 1
    assert m["total_tokens"] == graph.num_tokens
    assert m["critical_path_tokens"] == graph.num_tokens - shortest
    assert m["critical_path_tokens"] == int(ng.position_ids(graph).max()) + 1
    assert m["theoretical_speedup"] == graph.num_tokens / (graph.num_tokens - shortest)
    assert m["is_parallel"] and longest >= shortest


def test_metrics_exclude_the_prompt(char_tokenizer):
    prompt = char_tokenizer.encode("a long prompt " * 10)
    graph = ng.parse(char_tokenizer.encode(NPR_TRACE), tokenizer=char_tokenizer, prompt_ids=prompt)
    assert ng.metrics(graph)["total_tokens"] == graph.num_tokens - len(prompt)


def test_metrics_of_nested_and_sequential_traces():
    m = ng.metrics(ng.parse(MULTIVERSE_TRACE, grammar="multiverse"))
    assert m["unit"] == "chars" and m["widths"] == [2, 2] and m["depth"] == 2
    flat = ng.metrics(ng.parse("no blocks \\boxed{1}"))
    assert flat["blocks"] == 0 and not flat["is_parallel"] and flat["theoretical_speedup"] == 1.0
    assert flat["critical_path_tokens"] == flat["total_tokens"]


def test_metrics_of_text_names_the_mistake():
    # It raised AttributeError: 'str' object has no attribute 'tokenized'.
    with pytest.raises(TypeError, match="ReasoningGraph"):
        ng.metrics(NPR_TRACE)
