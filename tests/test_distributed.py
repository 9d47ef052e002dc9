"""`npr train` under torchrun: 2 CPU processes on gloo match 1 process with the same batch."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from npr_graph.models import add_tag_tokens, default_tokenizer, tiny_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    tokenizer = copy.deepcopy(default_tokenizer())
    torch.manual_seed(0)
    model = tiny_model("llama", tokenizer=tokenizer)
    add_tag_tokens(model, tokenizer, "npr")
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    problems = root / "problems.jsonl"
    rows = [
        {"question": f"What is {a}*{b}?", "answer": str(a * b)}
        for a, b in [(2, 3), (4, 5), (6, 7), (3, 3)]
    ]
    problems.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # a reward with spread even for a random model, so every step has non-zero advantages
    (root / "launcher.py").write_text(
        "import sys\n"
        "from papo import rewards\n"
        "@rewards.register('test_length')\n"
        "def length(response, reference, **_):\n"
        "    return rewards.Reward(-len(response) / 100, False, None, None, False)\n"
        "from npr_graph.cli import main\n"
        "raise SystemExit(main(sys.argv[1:]))\n"
    )
    config = root / "papo.toml"
    config.write_text(
        f"""
model = "{root / "model"}"
data = "{problems}"
steps = 2
prompts_per_step = 4
samples_per_prompt = 2
mode = "constrained"
chat = false
lr = 1e-3
max_new_tokens = 80
max_plan_tokens = 4
max_step_tokens = 6
max_takeaway_tokens = 4
kv_pages = 512
page_size = 4
tensorboard = false
reward = "test_length"
"""
    )
    return root, config


def run(command, root):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_two_ranks_match_one(setup):
    root, config = setup
    single = root / "single"
    run(
        [sys.executable, str(root / "launcher.py"), "train", "papo", "--config", str(config),
         "--set", f"output_dir={single}"],
        root,
    )  # fmt: skip
    double = root / "double"
    run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(root / "launcher.py"), "train", "papo", "--config", str(config),
         "--set", f"output_dir={double}"],
        root,
    )  # fmt: skip
    one = [json.loads(x) for x in (single / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (double / "metrics.jsonl").read_text().splitlines()]
    assert len(one) == len(two) == 2
    for a, b in zip(one, two, strict=True):
        assert a["rollouts"] == b["rollouts"] == 8
        assert a["skipped"] is None and b["skipped"] is None and a["grad_norm"] > 0
        assert a["reward"] == pytest.approx(b["reward"], abs=1e-9)
        assert a["trained_tokens"] == b["trained_tokens"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    final_one = load_file(str(single / "checkpoints" / "step_0000002" / "model.safetensors"))
    final_two = load_file(str(double / "checkpoints" / "step_0000002" / "model.safetensors"))
    for key, value in final_one.items():
        assert torch.allclose(value, final_two[key], atol=1e-5), key
