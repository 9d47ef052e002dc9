"""`npr train` under torchrun: 2 CPU processes on gloo match 1 process with the same batch, with
every rank holding the whole model and with the model sharded by FSDP2 (`sharding = "fsdp2"`):
the same draws, groups and advantages, mini-batches cut alike, checkpoints that resume with
another world size, and a rank that fails stops the others."""

import copy
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from npr_graph.models import add_tag_tokens, default_tokenizer, tiny_model
from papo.config import load_config

LAUNCHER = Path(__file__).resolve().parent / "launcher.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


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
    # 3 prompts over 2 ranks and a graph per row: rank 0 trains 4 rows, rank 1 only 2
    uneven = root / "uneven.toml"
    uneven.write_text(
        config.read_text()
        .replace("prompts_per_step = 4", "prompts_per_step = 3")
        .replace("max_new_tokens = 80", "max_new_tokens = 40")
        + "row_tokens = 16\nsave_every = 1\nseed = 11\n"  # a seed that keeps every rollout in both steps
    )
    # 3 prompts, 2 mini-batches: rank 0 holds draws 0 and 2, rank 1 draw 1; one rollout is dropped
    (root / "mini_batches.toml").write_text(
        config.read_text()
        .replace("steps = 2", "steps = 1")
        .replace("prompts_per_step = 4", "prompts_per_step = 3")
        .replace("max_new_tokens = 80", "max_new_tokens = 40")
        + 'mini_batches = 2\nadvantage = "test_batch_z_by_position"\n'
    )
    trace = (
        "<guideline>\n<plan>1: a</plan>\n<plan>2: b</plan>\n</guideline>\n<step>\n1: x{}.\n</step>\n"
        "<step>\n2: y.\n</step>\n<takeaway>\nok\n</takeaway>\nSo \\boxed{{{}}}."
    )
    traces = root / "traces.jsonl"
    traces.write_text(
        "".join(
            json.dumps({"problem": f"What is {a}*{b}?", "response": trace.format("z" * a, a * b)})
            + "\n"
            for a, b in [(2, 3), (4, 5), (6, 7), (3, 3)]
        )
    )
    (root / "sft.toml").write_text(
        f"""
model = "{root / "model"}"
data = "{traces}"
steps = 1
batch_size = 3
mini_batches = 2
chat = false
lr = 1e-3
lr_schedule = "constant"
warmup_ratio = 0
tensorboard = false
"""
    )
    return root, config


def run(command, root, timeout=600, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        command, cwd=root, env=env, capture_output=True, text=True, timeout=timeout
    )
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def metrics(directory):
    return [json.loads(x) for x in (directory / "metrics.jsonl").read_text().splitlines()]


# the training problems, held out: two samples each at temperature 1, graded by the run's reward
HELD_OUT = ["--set", "eval_data=problems.jsonl", "--set", "eval_samples=2",
            "--set", "eval_temperature=1.0"]  # fmt: skip


def logged_rollouts(directory):
    """``rollouts.jsonl``'s records: ``exact`` (what two world sizes log alike), and the
    advantages and log-probs, equal up to float rounding (batch statistics summed in another
    order, forwards over other batches). A graph's ``prompt_index`` is its engine call's."""
    out = []
    for line in (directory / "rollouts.jsonl").read_text().splitlines():
        record = json.loads(line)
        graph = record["graph"]
        logprobs = [x for x in graph.pop("logprobs") if x is not None]
        for node in graph["nodes"]:
            node.pop("logprobs", None)
        del graph["metadata"]["prompt_index"]  # in its rank's engine call
        advantage, nodes = record.pop("advantage"), record.pop("node_advantages")
        nodes = None if nodes is None else [0.0 if v is None else v for v in nodes]
        out.append(
            {
                "exact": record,
                "advantage": advantage,
                "node_advantages": nodes,
                "logprobs": logprobs,
            }
        )
    return out


def untimed(history):
    return [{k: v for k, v in m.items() if not k.endswith("_per_s")} for m in history]


def weights(directory, step):
    return load_file(str(directory / "checkpoints" / f"step_{step:07d}" / "model.safetensors"))


def rollouts(directory, ranks):
    """Every rollout the launcher recorded, each with the rank that sampled it."""
    out = []
    for rank in range(ranks):
        for record in json.loads((directory / f"rollouts.rank{rank}.json").read_text()):
            out.append({**record, "rank": rank})
    return out


def keyed(records):
    """Records by (step, group, sample within the group), the sample order being the engine's."""
    out, seen = {}, {}
    for r in records:
        draw = (r["step"], r["group"])
        seen[draw] = seen.get(draw, -1) + 1
        out[(*draw, seen[draw])] = r
    return out


def reference_advantages(records):
    """PAPO advantages of one step's kept (valid) rollouts, computed here from their rewards:
    (reward - mean of its group) / (unbiased std of all kept rewards + 1e-6); 0 alone in a group."""
    kept = [r for r in records if r["valid"]]
    rewards = torch.tensor([r["reward"] for r in kept], dtype=torch.float64)
    std = float(rewards.std()) if len(kept) > 1 else 0.0
    out = {}
    for r in kept:
        group = [k["reward"] for k in kept if k["group"] == r["group"]]
        mean = sum(group) / len(group)
        out[id(r)] = (r["reward"] - mean) / (std + 1e-6) if len(group) > 1 else 0.0
    return out


def optimizer_state(directory, step):
    path = directory / "checkpoints" / f"step_{step:07d}" / "trainer.pt"
    return torch.load(path, weights_only=False)["optimizer"]


@pytest.mark.slow
def test_two_ranks_match_one(setup):
    """Two ranks against one process: the same draws (each group whole on one rank), samples,
    advantages (and a reference computed here), metrics and weights; then a checkpoint of either
    resumes with the other world size and continues as both uninterrupted runs did."""
    root, config = setup
    single, double = root / "single", root / "double"
    single_from_double, double_from_single = (
        root / "single_from_double",
        root / "double_from_single",
    )
    run(
        [sys.executable, str(LAUNCHER), "train", "papo", "--config", str(config),
         "--set", f"output_dir={single}", "--set", "save_every=1", "--set", "rollouts_every=1",
         *HELD_OUT],
        root,
    )  # fmt: skip
    two_ranks = run(
        [*TORCHRUN, str(LAUNCHER), "train", "papo", "--config", str(config),
         "--set", f"output_dir={double}", "--set", "save_every=1", "--set", "rollouts_every=1",
         *HELD_OUT,
         "--then", "fork", str(single), str(double_from_single), "1",
         "--then", "train", "papo", "--config", str(config),
         "--set", f"output_dir={double_from_single}", "--resume"],
        root,
    )  # fmt: skip
    assert two_ranks.stderr.count("trained ") == 2, "one summary per run, not one per rank"
    run(
        [sys.executable, str(LAUNCHER), "fork", str(double), str(single_from_double), "1",
         "--then", "train", "papo", "--config", str(config),
         "--set", f"output_dir={single_from_double}", "--resume"],
        root,
    )  # fmt: skip

    # the step's draws are split by group: each group's samples all on one rank, both ranks busy,
    # and together the same groups, problems, samples and rewards as one process
    alone, split = rollouts(single, 1), rollouts(double, 2)
    for step in (0, 1):
        groups = [
            {r["group"] for r in split if r["step"] == step and r["rank"] == k} for k in (0, 1)
        ]
        assert groups[0] and groups[1] and not groups[0] & groups[1]
        assert groups[0] | groups[1] == set(range(4))
    assert keyed(alone).keys() == keyed(split).keys()
    assert len(keyed(split)) == 2 * 4 * 2  # steps * prompts * samples
    for key, a in keyed(alone).items():
        b = keyed(split)[key]
        assert (a["problem"], a["token_ids"], a["reward"], a["valid"]) == (
            b["problem"], b["token_ids"], b["reward"], b["valid"]
        ), key  # fmt: skip
    by_rank = [{tuple(r["token_ids"]) for r in split if r["rank"] == k} for k in (0, 1)]
    assert not by_rank[0] & by_rank[1]  # the ranks sampled different rollouts
    # advantages: batch-wide statistics although each rank holds half the batch
    for records in (alone, split):
        for step in (0, 1):
            of_step = [r for r in records if r["step"] == step]
            expected = reference_advantages(of_step)
            assert len(expected) > 2 and any(abs(v) > 0.1 for v in expected.values())
            for r in of_step:
                if r["valid"]:
                    assert r["advantage"] == pytest.approx(expected[id(r)], abs=1e-5)
                else:
                    assert r["advantage"] is None  # dropped, not trained on

    # rank 0 logs every rank's rollouts, in one process's order
    logged = [logged_rollouts(directory) for directory in (single, double)]
    assert len(logged[0]) == len(logged[1]) == 2 * 4 * 2
    for a, b in zip(*logged, strict=True):
        assert a["exact"] == b["exact"]
        for key in ("advantage", "node_advantages", "logprobs"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key

    one, two = metrics(single), metrics(double)
    assert [m["step"] for m in one] == [m["step"] for m in two] == [0, 1, 2]
    # held-out evaluation before and after training: each rank decodes a share, same results
    for a, b in zip(one[::2], two[::2], strict=True):
        assert a["eval_problems"] == b["eval_problems"] == 4
        assert a["eval_tokens"] == b["eval_tokens"] and a["eval_pass@2"] == b["eval_pass@2"]
        assert a["eval_accuracy"] == b["eval_accuracy"] and a["eval_mean_width"] >= 2
    one, two = one[1:], two[1:]
    for a, b in zip(one, two, strict=True):
        assert a["rollouts"] == b["rollouts"] == 8
        assert a["skipped"] is None and b["skipped"] is None and a["grad_norm"] > 0
        assert a["reward"] == pytest.approx(b["reward"], abs=1e-9)
        assert a["trained_tokens"] == b["trained_tokens"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    final_one, final_two = weights(single, 2), weights(double, 2)
    for key, value in final_one.items():
        assert torch.allclose(value, final_two[key], atol=1e-5), key

    # a checkpoint does not depend on the world size: 2 -> 1 and 1 -> 2 continue the same run
    for resumed in (single_from_double, double_from_single):
        again = metrics(resumed)[1:]  # after the evaluation before training
        assert [m["step"] for m in again] == [1, 2]
        assert again[1]["reward"] == pytest.approx(one[1]["reward"], abs=1e-9)
        assert again[1]["loss"] == pytest.approx(one[1]["loss"], abs=1e-5)
        final = weights(resumed, 2)
        for key, value in final_one.items():
            assert torch.allclose(value, final[key], atol=1e-5), (resumed.name, key)


@pytest.mark.slow
def test_mini_batches_match_one_process(setup):
    """With mini_batches = 2, two ranks cut the step's batch as one process does (by the
    sample's place in the whole batch, not in the rank's share), in PAPO (a dropped rollout, ranks
    holding 4 and 2 samples) and in SFT (3 traces: one rank's share is a whole mini-batch). The
    PAPO run's advantage estimator is graph-level and of the test's own: every rank gets the
    whole batch's graphs."""
    root, _ = setup
    rl, sft = root / "mini_batches.toml", root / "sft.toml"
    commands = []
    for prefix in ("mb_single", "mb_double"):
        commands.append(
            ["train", "papo", "--config", str(rl), "--set", f"output_dir={root / (prefix + '_rl')}",
             "--then", "train", "sft", "--config", str(sft),
             "--set", f"output_dir={root / (prefix + '_sft')}"]
        )  # fmt: skip
    run([sys.executable, str(LAUNCHER), *commands[0]], root)
    run([*TORCHRUN, str(LAUNCHER), *commands[1]], root)
    initial = load_file(str(root / "model" / "model.safetensors"))
    for stage in ("rl", "sft"):
        single, double = root / f"mb_single_{stage}", root / f"mb_double_{stage}"
        (a,), (b,) = metrics(single), metrics(double)
        assert a["skipped"] is None and b["skipped"] is None
        assert a["skipped_updates"] == b["skipped_updates"] == 0
        for key in ("trained_tokens", "rollouts", "traces"):
            assert a.get(key) == b.get(key), key
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        final_one, final_two = weights(single, 1), weights(double, 1)
        moved = max(float((final_one[k] - initial[k]).abs().max()) for k in initial)
        assert moved > 1e-4
        for key, value in final_one.items():
            assert torch.allclose(value, final_two[key], atol=1e-5), (stage, key)
    assert metrics(root / "mb_double_sft")[0]["traces"] == 3
    # each kept rollout has the same place in the step's batch on 2 ranks as in 1 process
    alone, split = (
        keyed(rollouts(root / "mb_single_rl", 1)),
        keyed(rollouts(root / "mb_double_rl", 2)),
    )
    assert {r["rank"] for r in split.values()} == {0, 1}
    assert sum(not r["valid"] for r in split.values()) >= 1  # a dropped rollout moved the places
    assert {k: r["place"] for k, r in alone.items()} == {k: r["place"] for k, r in split.items()}
    kept = [r for r in alone.values() if r["valid"]]
    rewards = torch.tensor([r["reward"] for r in kept])
    z = ((rewards - rewards.mean()) / (rewards.std() + 1e-6)).tolist()
    assert any(abs(v) > 0.1 for v in z)
    for record, expected in zip(kept, z, strict=True):  # a response's first token: the z-score
        key = next(k for k, r in alone.items() if r is record)
        assert record["advantage"] == pytest.approx(expected, abs=1e-5)
        assert split[key]["advantage"] == pytest.approx(expected, abs=1e-5)


def test_all_reduce_grads(tmp_path):
    """World.all_reduce_grads on 2 ranks: a gradient no rank has stays None (AdamW then leaves
    the parameter alone, as one process does with an empty mini-batch; a zero gradient would
    move it by its momentum and weight decay); one only rank 0 has reaches every rank."""
    out = tmp_path / "grads.json"
    run([*TORCHRUN, str(LAUNCHER), "grads-check", str(out)], tmp_path)
    report = json.loads(out.read_text())
    assert report["world_size"] == 2
    assert report["first"] == [[[2.0, 2.0, 2.0], [2.0, 2.0, 2.0]], [2.0, 2.0]]  # summed
    assert report["none_everywhere"] == [True, True]
    assert report["moved"] == 0.0
    rank_0 = [[[2.0, 2.0, 2.0], [2.0, 2.0, 2.0]], [1.0, 1.0]]
    assert report["rank_0_only"] == [rank_0, rank_0]
    # rank r holds arange * (r + 1) + index: the sum is arange * 3 + 2 * index
    bucketed = [[[0.0, 3.0, 6.0], [9.0, 12.0, 15.0]], [2.0, 5.0]]
    assert report["bucketed"] == [bucketed, bucketed]


OOM = "npr train: rank 1: out of memory (test: CUDA out of memory (a stand-in) on rank 1)"


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["reward=test_length_fails_on_rank_1"], "test: a bad problem on rank 1"),
        (["loss=test_papo_oom_on_rank_1"], OOM),
        (["loss=test_papo_oom_on_rank_1", "sharding=fsdp2"], OOM),
    ],
    ids=["bad-problem", "oom", "oom-fsdp2"],
)
def test_a_failing_rank_stops_every_rank(setup, overrides, message):
    """Rank 1 raises (in its rewards, or runs out of GPU memory in its training forward while
    rank 0 waits in the gradient all-reduce, or with FSDP2 in a collective of its forward):
    the run ends soon, failed, with rank 1's error shown; rank 0 does not wait for it (gloo's
    own timeout is 30 minutes), says in one line that another rank stopped, and no checkpoint
    is written."""
    root, config = setup
    output = root / ("failing_" + "_".join(o.partition("=")[2] for o in overrides))
    settings = [arg for override in overrides for arg in ("--set", override)]
    start = time.monotonic()
    result = run(
        [*TORCHRUN, str(LAUNCHER), "--record-end", "train", "papo", "--config", str(config),
         "--set", f"output_dir={output}", *settings],
        root, timeout=240, check=False,
    )  # fmt: skip
    assert time.monotonic() - start < 180
    assert result.returncode != 0
    assert message in result.stderr
    # each rank ended by itself (torchrun did not stop rank 0), failed, with an error line
    ended = {rank: (root / f"ended.rank{rank}.txt").read_text() for rank in (0, 1)}
    assert ended == {0: "2", 1: "2"}, (ended, result.stderr[-3000:])
    assert "error: rank 0: another rank stopped" in result.stderr, result.stderr[-3000:]
    our_frame = re.search(r'File "[^"]*/(npr_graph|papo|tests)/', result.stderr)
    assert our_frame is None, result.stderr[-3000:]  # torchrun's own traceback follows
    assert not (output / "checkpoints").exists()


@pytest.mark.slow
def test_fsdp2_matches_one_process_and_resumes(setup):
    """Two ranks with FSDP2 (rank 1 holding fewer rows than rank 0) against one unsharded
    process; then both resume step 2 from the sharded run's step-1 checkpoint; and a NaN loss on
    rank 1 only skips the step on both ranks."""
    root, _ = setup
    uneven = root / "uneven.toml"
    sharded, sharded_resumed = root / "fsdp2", root / "fsdp2_resumed"
    sharded_nan = root / "fsdp2_nan"
    sharded_runs = run(
        [*TORCHRUN, str(LAUNCHER),
         "train", "papo", "--config", str(uneven), "--set", f"output_dir={sharded}", "--set", "sharding=fsdp2",
         "--then", "fork", str(sharded), str(sharded_resumed), "1",
         "--then", "train", "papo", "--config", str(uneven), "--set", f"output_dir={sharded_resumed}",
         "--set", "sharding=fsdp2", "--resume",
         "--then", "train", "papo", "--config", str(uneven), "--set", f"output_dir={sharded_nan}",
         "--set", "sharding=fsdp2", "--set", "loss=test_papo_nan_once_on_rank_1"],
        root,
    )  # fmt: skip
    assert "returned a view" not in sharded_runs.stderr, "FSDP2's root returns views"
    single, single_resumed = root / "single_uneven", root / "single_from_fsdp2"
    run(
        [sys.executable, str(LAUNCHER),
         "train", "papo", "--config", str(uneven), "--set", f"output_dir={single}",
         "--then", "fork", str(sharded), str(single_resumed), "1",
         "--then", "train", "papo", "--config", str(uneven), "--set", f"output_dir={single_resumed}",
         "--resume"],
        root,
    )  # fmt: skip

    # (a) the same updates as one process: metrics and weights, and the ranks were uneven
    one, two = metrics(single), metrics(sharded)
    assert len(one) == len(two) == 2
    for a, b in zip(one, two, strict=True):
        assert a["rollouts"] == b["rollouts"] == 6
        assert a["skipped"] is None and b["skipped"] is None and a["grad_norm"] > 0
        assert a["reward"] == pytest.approx(b["reward"], abs=1e-9)
        assert a["trained_tokens"] == b["trained_tokens"]
        assert a["rows"] == b["rows"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert "padding_rows" not in one[0]
    assert all(b["padding_rows"] > 0 for b in two)  # the short rank ran padding passes
    initial = load_file(str(root / "model" / "model.safetensors"))
    final_one, final_two = weights(single, 2), weights(sharded, 2)
    assert final_one.keys() == final_two.keys() == initial.keys()
    moved = max(float((final_one[k] - initial[k]).abs().max()) for k in initial)
    assert moved > 1e-4  # training changed the weights, so the comparison below means something
    for key, value in final_one.items():
        assert torch.allclose(value, final_two[key], atol=1e-5), key

    # (b) the engine samples from a full replica equal to the sharded weights after the last step
    check = json.loads((sharded / "replica_check.json").read_text())
    assert check["sharded"] and check["engine_uses_replica"]
    assert check["engine_dtensors"] == 0 and check["trained_dtensors"] > 0
    assert check["replica_vs_trained"] == 0.0
    assert check["replica_vs_initial"] > 1e-4
    resumed_check = json.loads((sharded_resumed / "replica_check.json").read_text())
    assert resumed_check["replica_vs_trained"] == 0.0

    # (c) the sharded checkpoint has the unsharded format (full optimizer tensors) ...
    state_one, state_two = optimizer_state(single, 1), optimizer_state(sharded, 1)
    assert state_one["param_groups"] == state_two["param_groups"]
    assert state_one["state"].keys() == state_two["state"].keys()
    for index, entry in state_one["state"].items():
        assert entry.keys() == state_two["state"][index].keys()
        for key, value in entry.items():
            other = state_two["state"][index][key]
            assert type(other) is torch.Tensor and other.shape == value.shape, (index, key)
            # Sharded gradients are summed in another order: an entry far below the tensor's
            # largest differs by float32 rounding of that scale, not of its own.
            scale = float(value.abs().max())
            assert torch.allclose(value, other, rtol=1e-4, atol=1e-6 * scale), (index, key)
    # ... resuming it sharded continues exactly ...
    assert untimed(metrics(sharded_resumed)) == untimed(two)
    for key, value in final_two.items():
        assert torch.equal(value, weights(sharded_resumed, 2)[key]), key
    resumed_state = optimizer_state(sharded_resumed, 2)
    for index, entry in optimizer_state(sharded, 2)["state"].items():
        for key, value in entry.items():
            assert torch.equal(value, resumed_state["state"][index][key]), (index, key)
    # ... and resuming it unsharded in one process gives the unsharded run's step 2
    assert [m["loss"] for m in metrics(single_resumed)] == pytest.approx(
        [m["loss"] for m in one], abs=1e-5
    )
    final_resumed = weights(single_resumed, 2)
    for key, value in final_one.items():
        assert torch.allclose(value, final_resumed[key], atol=1e-5), key

    # a non-finite loss on rank 1 alone: both ranks skip that update and stay in step after it
    nan = metrics(sharded_nan)
    assert [m["skipped"] for m in nan] == ["non-finite loss", None]
    # step 2 samples from weights step 1 left unchanged, so its rollouts differ from two[1]'s
    assert nan[1]["grad_norm"] > 0 and nan[1]["rollouts"] == two[1]["rollouts"]
    assert json.loads((sharded_nan / "replica_check.json").read_text())["replica_vs_trained"] == 0.0


def test_sharding_config_is_validated():
    assert load_config(None, "papo", {"sharding": "fsdp2"}).sharding == "fsdp2"
    assert load_config(None, "papo").sharding == "none"
    for bad in ("fsdp", "FSDP2", "", 2, None):
        with pytest.raises(ValueError, match="sharding must be one of none, fsdp2"):
            load_config(None, "papo", {"sharding": bad})


class _Joined(Exception):
    """Raised by a stand-in ``init_process_group`` once it has recorded its backend."""


@pytest.mark.parametrize(
    ("device", "backend", "current"),
    [("cpu", "gloo", None), ("cuda", "nccl", 1), ("cuda:0", "nccl", 0)],
)
def test_init_world_reduces_on_the_training_device(monkeypatch, device, backend, current):
    """A CPU run on a machine with GPUs reduces its CPU gradients over gloo (NCCL reduces only
    CUDA tensors); a GPU run uses NCCL on its own GPU (LOCAL_RANK unless the device names one)."""
    import torch.distributed as dist

    from papo import distributed

    joined, devices = [], []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", devices.append)

    def init_process_group(backend, *args, **kwargs):
        joined.append(backend)
        raise _Joined

    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    with pytest.raises(_Joined):
        distributed.init_world(device)
    assert joined == [backend]
    assert devices == ([] if current is None else [current])


def test_eval_and_sample_ranks_exchange_results_over_gloo(monkeypatch):
    """npr eval's and npr sample's ranks exchange Python objects only: over gloo, which needs no
    current GPU (with NCCL every rank would use cuda:0 while its engine runs on
    cuda:LOCAL_RANK)."""
    import torch.distributed as dist

    from npr_graph.ranks import join_ranks

    joined = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def init_process_group(*args, **kwargs):
        joined.append(kwargs.get("backend", args[0] if args else None))
        raise _Joined

    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    with pytest.raises(_Joined):
        join_ranks()
    assert joined == ["gloo"]


@pytest.mark.slow
def test_sample_ranks_share_the_problems(setup):
    """`npr sample` on 2 ranks: each problem is sampled by one rank only, and the accepted
    traces, the progress log and the report are a one-process run's; no part file or claim is
    left behind."""
    root, _ = setup
    args = [
        "sample", "--data", str(root / "problems.jsonl"), "--model", str(root / "model"),
        "--tags", "special", "--mode", "constrained", "--tries", "2", "--max-new-tokens", "60",
        "--reward", "test_even_length", "--batch", "1", "--device", "cpu", "--out", "out.jsonl",
    ]  # fmt: skip
    one, two = root / "sample-one", root / "sample-two"
    one.mkdir()
    two.mkdir()
    single = run([sys.executable, str(LAUNCHER), *args], one)
    sharded = run([*TORCHRUN, str(LAUNCHER), *args], two)
    report = json.loads(single.stdout.strip().splitlines()[-1])
    assert report["problems"] == 4 and report["accepted"] >= 1, report
    assert json.loads(sharded.stdout.strip().splitlines()[-1]) == report

    def lines(path):
        return sorted(path.read_text().splitlines())

    assert lines(two / "out.jsonl") == lines(one / "out.jsonl")
    assert lines(two / "out.progress.jsonl") == lines(one / "out.progress.jsonl")
    graded = {rank: lines(two / f"graded.rank{rank}.txt") for rank in (0, 1)
              if (two / f"graded.rank{rank}.txt").exists()}  # fmt: skip
    assert sorted(sum(graded.values(), [])) == lines(one / "graded.rank0.txt")
    assert len(graded) < 2 or not set(graded[0]) & set(graded[1]), "a problem sampled twice"
    assert sorted(p.name for p in two.iterdir()) == sorted(
        ["out.jsonl", "out.progress.jsonl", *(f"graded.rank{rank}.txt" for rank in graded)]
    )

    # rank 1 cannot grade: it says so and stops; rank 0, left alone in the last exchange, says
    # another rank stopped, with no traceback (the launcher keeps torchrun from stopping it first)
    failing = root / "sample-failing"
    failing.mkdir()
    args[args.index("test_even_length")] = "test_even_length_fails_on_rank_1"
    result = run([*TORCHRUN, str(LAUNCHER), "--record-end", *args], failing, check=False)
    assert result.returncode != 0
    assert "error: rank 1: test: cannot grade on rank 1" in result.stderr
    ended = {rank: (failing / f"ended.rank{rank}.txt").read_text() for rank in (0, 1)}
    assert ended == {0: "2", 1: "2"}, (ended, result.stderr[-3000:])
    assert "error: rank 0: another rank stopped" in result.stderr, result.stderr[-3000:]
    our_frame = re.search(r'File "[^"]*/(npr_graph|papo|tests)/', result.stderr)
    assert our_frame is None, result.stderr[-3000:]  # torchrun's own traceback follows


def test_an_exchange_with_a_rank_that_stopped_is_a_named_error(monkeypatch):
    """gloo's error when a peer is gone (or a timeout) becomes :class:`PeerLost`, in the
    commands' exchanges and in training's sums, which the commands turn into one line instead
    of a traceback."""
    import torch.distributed as dist

    from npr_graph.ranks import PeerLost, Ranks
    from papo.distributed import World

    def closed(*args, **kwargs):
        raise RuntimeError(
            "[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
            "[127.0.0.1]:42404\nmore detail"
        )

    for name in ("all_gather_object", "broadcast_object_list", "barrier", "all_reduce"):
        monkeypatch.setattr(dist, name, closed)
    monkeypatch.setattr(dist, "get_backend", lambda: "gloo")
    ranks, world, model = Ranks(rank=0, size=2), World(rank=0, size=2), torch.nn.Linear(2, 1)
    model(torch.ones(1, 2)).sum().backward()
    for exchange in (
        lambda: ranks.gather(1),
        lambda: ranks.broadcast(1),
        ranks.barrier,
        lambda: world.sum(1.0),
        lambda: world.all_reduce_grads(model),
    ):
        with pytest.raises(PeerLost, match=r"another rank stopped .*Connection closed by peer"):
            exchange()
    assert Ranks().gather(1) == [1], "one process exchanges nothing"
    # raised by a collective outside an exchange (FSDP's, in the forward): told by its message
    from npr_graph.ranks import peer_lost

    gone = peer_lost(RuntimeError("[pair.cc:589] Connection reset by peer\nmore"))
    assert isinstance(gone, PeerLost) and "Connection reset by peer" in str(gone)
    assert peer_lost(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    assert peer_lost(ValueError("Connection closed by peer")) is None


def test_running_out_of_memory_in_an_exchange_is_not_blamed_on_another_rank(monkeypatch):
    """NCCL gathers objects through GPU buffers: this rank running out of memory there is its
    own error (the commands say what to lower), not another rank's stop."""
    import torch.distributed as dist

    from npr_graph.ranks import Ranks

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(dist, "all_gather_object", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        Ranks(rank=0, size=2).gather(1)


def test_resume_refuses_ranks_that_see_different_checkpoints(tmp_path):
    """Ranks whose output_dir is not shared (node-local disks) see different last checkpoints:
    each would resume elsewhere, and their exchanges would wait for each other for ever or sum
    gradients of different weights. Every rank refuses, naming what each sees."""
    from types import SimpleNamespace

    from papo.trainer import Trainer

    step = tmp_path / "checkpoints" / "step_0000001"
    step.mkdir(parents=True)
    (step / "state.json").write_text("{}")

    class TwoRanks:
        is_main = True

        def gather(self, value):
            return [value, None]  # rank 1 sees no checkpoint

    trainer = SimpleNamespace(output_dir=tmp_path, world=TwoRanks())
    with pytest.raises(ValueError, match=r"different last checkpoints .*rank 1: none"):
        Trainer._resume(trainer)


@pytest.mark.parametrize(
    ("name", "local_rank", "gpus", "expected"),
    [("cuda", "1", 2, "cuda:1"), ("cuda", "3", 1, "cuda:0"), ("cuda:0", "1", 2, "cuda:0"),
     ("cuda", None, 2, "cuda:1"), ("cpu", "1", 2, "cpu")],
)  # fmt: skip
def test_a_bare_cuda_device_is_this_ranks_gpu(monkeypatch, name, local_rank, gpus, expected):
    """``--device cuda`` under torchrun: torch's current GPU is GPU 0 on every rank, so every
    rank's engine (npr eval, npr sample) and model would share it; a bare ``cuda`` is the rank's
    own GPU, as for training (one GPU per rank shown only its own: that one). Outside torchrun
    it stays torch's current GPU (here 1)."""
    from npr_graph.models import resolve_device

    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert resolve_device(name) == torch.device(expected)
