"""Training on a GPU (``gpu``): the trainer puts the model, the engine and every packed row on
``device``; on CUDA it must train as it does on the CPU."""

import json

import pytest
import torch

from npr_graph.models import add_tag_tokens, tiny_model
from papo.config import load_config
from papo.trainer import Trainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

TRACE = (
    "<guideline>\n<plan>1: add</plan>\n<plan>2: check</plan>\n</guideline>\n"
    "<step>\n1: 2+3=5\n</step>\n<step>\n2: 5-3=2 ok\n</step>\n"
    "<takeaway>\nboth steps give 5\n</takeaway>\nThe answer is \\boxed{5}."
)


@pytest.fixture(scope="module")
def tokenizer():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import gpu_decode  # a byte-level tokenizer built in memory: nothing to download

    tok = gpu_decode.byte_tokenizer()
    add_tag_tokens(tiny_model("llama", tokenizer=tok), tok, "npr")
    return tok


def test_sft_on_cuda_matches_the_cpu(tokenizer, tmp_path):
    data = tmp_path / "traces.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"2+3? ({i})", "response": TRACE}) + "\n"
                            for i in range(4)))  # fmt: skip
    losses = {}
    for device in ("cpu", "cuda"):
        config = load_config(None, "sft", dict(data=str(data), output_dir=str(tmp_path / device),
                                               steps=2, batch_size=2, lr=1e-2, chat=False,
                                               tensorboard=False, device=device))  # fmt: skip
        model = tiny_model("llama", tokenizer=tokenizer, seed=0)
        run = Trainer(config, model=model, tokenizer=tokenizer)
        assert next(run.model.parameters()).device.type == device
        losses[device] = [m["loss"] for m in run.train()]
    assert losses["cpu"] == pytest.approx(losses["cuda"], rel=1e-3, abs=1e-4)


def test_papo_step_on_cuda(tokenizer, tmp_path):
    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps({"problem": f"What is {a}+3?", "answer": str(a + 3)})
                            + "\n" for a in range(3)))  # fmt: skip
    config = load_config(None, "papo", dict(
        data=str(data), output_dir=str(tmp_path / "papo"), steps=1, prompts_per_step=2,
        samples_per_prompt=2, mode="constrained", reward="format", chat=False, tensorboard=False,
        max_new_tokens=40, max_plan_tokens=4, max_step_tokens=8, max_takeaway_tokens=6,
        min_branches=2, max_branches=3, page_size=4, kv_pages=1024, device="cuda",
    ))  # fmt: skip
    run = Trainer(config, model=tiny_model("llama", tokenizer=tokenizer), tokenizer=tokenizer)
    (metrics,) = run.train()
    assert run.engine.device.type == "cuda"
    assert metrics["skipped"] in (None, "no rollout left to train on")
    if metrics["skipped"] is None:
        assert metrics["logprob_gap"] < 1e-3, "on-policy on the GPU too"


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean"])
def test_every_aggregation_runs_on_cuda(aggregation):
    from papo import loss

    values = torch.tensor([1.0, 3.0, 10.0, 0.0])
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0])
    index = torch.tensor([0, 0, 1, 1])
    on_cpu = loss.aggregation(aggregation)(values, mask, index)
    on_cuda = loss.aggregation(aggregation)(values.cuda(), mask.cuda(), index.cuda())
    assert on_cuda.device.type == "cuda" and on_cuda.item() == pytest.approx(on_cpu.item())


@pytest.mark.parametrize("estimator", ["grpo", "papo"])
def test_advantages_run_on_cuda(estimator):
    from papo import advantages

    rewards = torch.tensor([1.0, -1.0, 1.0, 1.0, 0.5])
    groups = torch.tensor([0, 0, 1, 1, 2])
    on_cpu = advantages.get(estimator)(rewards, groups)
    on_cuda = advantages.get(estimator)(rewards.cuda(), groups.cuda())
    assert on_cuda.device.type == "cuda"
    assert torch.allclose(on_cuda.cpu(), on_cpu)
