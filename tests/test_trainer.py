"""The training loop on tiny random-weight models: stages, logging, checkpoints, bad steps."""

import copy
import json

import pytest
import torch

import npr_graph as ng
from npr_graph.models import add_tag_tokens, default_tokenizer, tiny_model
from papo import checkpoint, rewards, trainer
from papo.config import load_config
from papo.trainer import Trainer

SHORT = dict(
    max_new_tokens=40,
    max_plan_tokens=4,
    max_step_tokens=8,
    max_takeaway_tokens=6,
    min_branches=2,
    max_branches=3,
    kv_pages=1024,
    page_size=4,
)
TRACE = (
    "<guideline>\n<plan>1: add</plan>\n<plan>2: check</plan>\n</guideline>\n"
    "<step>\n1: 2+3=5\n</step>\n<step>\n2: 5-3=2 ok\n</step>\n"
    "<takeaway>\nboth steps give 5\n</takeaway>\nThe answer is \\boxed{5}."
)


@pytest.fixture(scope="module")
def tokenizers():
    text = copy.deepcopy(default_tokenizer())
    special = copy.deepcopy(text)
    add_tag_tokens(tiny_model("llama", tokenizer=special), special, "npr")
    return {"text": text, "special": special}


def make_model(tokenizer, seed=0):
    return tiny_model("llama", tokenizer=tokenizer, seed=seed)


@pytest.fixture
def problems(tmp_path):
    path = tmp_path / "problems.jsonl"
    rows = [
        {"problem": f"What is {a}+{b}?", "answer": str(a + b)} for a, b in [(2, 3), (4, 4), (1, 6)]
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def traces(tmp_path):
    path = tmp_path / "traces.jsonl"
    rows = [{"prompt": f"What is 2+3? ({i})", "response": TRACE} for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@rewards.register("test_length")
def length_reward(response: str, reference: str, **_) -> rewards.Reward:
    """A reward with spread even for a random model: shorter responses score higher."""
    return rewards.Reward(-len(response) / 100, False, None, None, False)


def papo_config(data, out, **overrides):
    values = dict(
        data=str(data),
        output_dir=str(out),
        steps=2,
        prompts_per_step=2,
        samples_per_prompt=2,
        mode="constrained",
        temperature=1.0,
        lr=1e-3,
        chat=False,
        tensorboard=True,
        reward="test_length",
        **SHORT,
    )
    values.update(overrides)
    return load_config(None, "papo", values)


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_papo_steps_log_and_checkpoint(problems, tmp_path, tokenizers):
    model = make_model(tokenizers["special"])
    before = weights(model)
    run = Trainer(
        papo_config(problems, tmp_path / "run"), model=model, tokenizer=tokenizers["special"]
    )
    history = run.train()
    assert len(history) == 2
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2]
    for key in (
        "reward",
        "accuracy",
        "format_valid_rate",
        "dropped_rollouts",
        "pool_cut_rollouts",
        "parallel_rate",
        "mean_width",
        "rollout_tokens_per_s",
        "loss",
        "grad_norm",
        "lr",
    ):
        assert key in lines[0], key
    assert lines[0]["rollouts"] == 4
    assert lines[0]["parallel_rate"] == 1.0, "constrained rollouts always fork"
    assert lines[0]["mean_width"] >= 2
    assert any((tmp_path / "run" / "tensorboard").iterdir())
    latest = checkpoint.latest(tmp_path / "run" / "checkpoints")
    assert latest is not None and latest.name == "step_0000002"
    assert (latest / "model.safetensors").exists()
    assert lines[0]["logprob_gap"] <= 1e-4, "training log-probs are the engine's"
    assert all(x["skipped"] is None and x["grad_norm"] > 0 for x in lines)
    assert any(not torch.equal(before[k], v) for k, v in weights(model).items())


def test_rollout_log_records_what_training_made_of_each_rollout(problems, tmp_path, tokenizers):
    """``rollouts_every``: each logged step's rollouts in ``rollouts.jsonl``, with the graph,
    the reward, the advantage training gave the sample and each node; ``npr view`` shows them."""
    from npr_graph.viewer import load_views
    from papo import advantages

    tok = tokenizers["special"]
    config = papo_config(problems, tmp_path / "run", steps=3, rollouts_every=2, advantage="branch")
    Trainer(config, model=make_model(tok), tokenizer=tok).train()
    path = tmp_path / "run" / "rollouts.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in records] == [2] * 4, "steps 2 only: 1 and 3 are not logged"
    assert [(r["group"], r["sample"]) for r in records] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    kept = [r for r in records if r["trained"]]
    for record in records:
        graph = ng.ReasoningGraph.from_dict(record["graph"])
        if not record["trained"]:  # dropped: structurally invalid
            assert record["left_out"] == "invalid" and not trainer._structurally_valid(graph)
            assert record["advantage"] is None and record["node_advantages"] is None
        else:
            assert record["left_out"] is None and trainer._structurally_valid(graph)
    assert kept, "some rollouts were trained on"
    rewards_ = torch.tensor([r["reward"] for r in kept])
    groups = torch.tensor([r["group"] for r in kept])
    expected = advantages.papo(rewards_, groups)  # branch's outcome term, over the kept ones
    for record, advantage in zip(kept, expected.tolist(), strict=True):
        graph = ng.ReasoningGraph.from_dict(record["graph"])
        assert record["advantage"] == pytest.approx(advantage, abs=1e-6)
        assert record["reward"] == length_reward(graph.response_text, "").score
        assert record["reference"] == ["5", "8", "7"][record["problem_index"]]
        nodes = record["node_advantages"]
        assert len(nodes) == len(graph.nodes) and nodes[0] is None, "the prompt is not trained"
        trained = [v for v in nodes if v is not None]
        # a random model's steps state no result: every trained node gets the outcome
        assert trained and all(v == pytest.approx(advantage, abs=1e-6) for v in trained)
        assert record["metrics"]["blocks"] >= 1 and graph.blocks

    views = load_views(path, errors := [])
    assert errors == [] and len(views) == 4
    at = records.index(kept[0])
    view = views[at]
    assert view["title"] == f"step 2 · {kept[0]['problem_id']} · sample {kept[0]['sample']}"
    assert [n["advantage"] for n in view["nodes"]] == kept[0]["node_advantages"]
    shown = dict(view["metrics"])
    assert shown["trained"] == "true" and float(shown["advantage"]) == pytest.approx(
        kept[0]["advantage"], abs=1e-3
    )
    assert all(line.startswith('{"step": 2, ') for line in path.read_text().splitlines()), (
        "npr view --step reads the step from this prefix"
    )
    assert load_views(path, [], steps=["last"]) == views

    with pytest.raises(ValueError, match="rollouts_every logs RL rollouts"):
        load_config(None, "sft", {"data": "x", "rollouts_every": 1})


def test_a_graph_level_estimator_of_ones_own_gets_the_graphs(problems, tmp_path, tokenizers):
    """An advantage estimator flagged ``graph_level`` (as ``branch`` is) is called with the kept
    rollouts' graphs and references, and its per-token advantages are what training logs (and
    uses); one returning the wrong shape is a clear error."""
    from papo import advantages

    calls = []

    def by_position(graphs, references, rewards_, group_ids):
        calls.append((list(graphs), list(references), rewards_.clone(), group_ids.clone()))
        out = []
        for graph, reward in zip(graphs, rewards_.tolist(), strict=True):
            length = graph.num_tokens - graph.prompt_num_tokens
            out.append(reward * torch.linspace(1.0, 0.0, length))  # earlier tokens, more credit
        return out

    by_position.graph_level = True
    advantages.register("test_by_position")(by_position)
    tok = tokenizers["special"]
    config = papo_config(
        problems, tmp_path / "run", steps=1, rollouts_every=1, advantage="test_by_position"
    )
    Trainer(config, model=make_model(tok), tokenizer=tok).train()
    [(graphs, references, rewards_, groups)] = calls
    records = [json.loads(line) for line in (tmp_path / "run" / "rollouts.jsonl").open()]
    kept = [r for r in records if r["trained"]]
    assert len(graphs) == len(kept) >= 2
    assert [g.to_dict() for g in graphs] == [r["graph"] for r in kept]
    assert references == [r["reference"] for r in kept]
    assert rewards_.tolist() == pytest.approx([r["reward"] for r in kept])
    assert groups.tolist() == [r["group"] for r in kept]
    for graph, record in zip(graphs, kept, strict=True):
        tokens = by_position([graph], [""], torch.tensor([record["reward"]]), torch.tensor([0]))[0]
        assert record["node_advantages"] == advantages.node_advantages(graph, tokens)
        assert record["advantage"] == pytest.approx(float(tokens.mean()))

    def too_short(graphs, references, rewards_, group_ids):
        return [torch.zeros(1) for _ in graphs]

    too_short.graph_level = True
    advantages.register("test_too_short")(too_short)
    config = papo_config(problems, tmp_path / "bad", steps=1, advantage="test_too_short")
    with pytest.raises(ValueError, match="one advantage per response token: expected shape"):
        Trainer(config, model=make_model(tok), tokenizer=tok).train()
    advantages._ESTIMATORS.unregister("test_by_position")
    advantages._ESTIMATORS.unregister("test_too_short")


@rewards.register("test_even")
def even_reward(response: str, reference: str, **_) -> rewards.Reward:
    """Correct for about half the responses of a random model: an even length."""
    correct = len(response) % 2 == 0
    return rewards.Reward(1.0 if correct else -1.0, correct, None, None, True)


def test_held_out_evaluation_before_during_and_after_training(problems, tmp_path, tokenizers):
    """``eval_data``: the held-out problems are decoded before the first step, every
    ``eval_every`` steps and after the last, with the same seeds each time, so unchanged
    weights give unchanged results; the metrics count every sample of every problem."""
    tok = tokenizers["special"]
    held_out = tmp_path / "held_out.jsonl"
    rows = [{"problem": f"What is {a}*{b}?", "answer": str(a * b)} for a, b in [(2, 3), (3, 4)]]
    held_out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    settings = dict(steps=3, eval_data=str(held_out), eval_every=2, eval_samples=2,
                    eval_temperature=1.0, reward="test_even", log_every=3)  # fmt: skip
    run = Trainer(
        papo_config(problems, tmp_path / "frozen", lr=0.0, **settings),
        model=make_model(tok),
        tokenizer=tok,
    )
    graded = []

    def grading(response, reference, **kw):
        graded.append(reference)
        return even_reward(response, reference)

    run.reward_fn = grading
    first = run.evaluate()
    assert sorted(graded) == ["12", "12", "6", "6"], "every sample of every held-out problem"
    assert first["eval_problems"] == 2 and 0 <= first["eval_accuracy"] <= 1
    assert first["eval_parallel_rate"] == 1.0 and first["eval_format_valid_rate"] == 1.0
    assert first["eval_mean_width"] >= 2 and first["eval_tokens"] > 0
    assert first["eval_pass@2"] >= first["eval_accuracy"]
    history = run.train()
    lines = [
        json.loads(x) for x in (tmp_path / "frozen" / "metrics.jsonl").read_text().splitlines()
    ]
    # step 0 (before training), 2 (eval_every; logged though log_every is 3), 3 (the last)
    assert [x["step"] for x in lines] == [0, 2, 3]
    assert [("eval_accuracy" in x) for x in history] == [False, True, True]

    def results(metrics):
        return {k: v for k, v in metrics.items() if k.startswith("eval_") and k != "eval_time_s"}

    assert all(results(x) == results(first) for x in lines), "lr 0: the same weights, seeds"

    for bad, message in [
        (dict(eval_samples=2, eval_temperature=0.0), "needs eval_temperature > 0"),
        (dict(eval_every=2), "eval_every needs eval_data"),
    ]:
        with pytest.raises(ValueError, match=message):
            papo_config(problems, tmp_path / "x", **bad)


def test_held_out_problems_may_name_fields_of_their_own(tmp_path, tokenizers):
    """eval_data is read with the training data's field names unless eval_prompt_field and
    eval_answer_field name its own (a benchmark file beside a dataset of other names)."""
    tok = tokenizers["special"]
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"query": "What is 1+1?", "gold": "2"}) + "\n")
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text(json.dumps({"problem": "What is 2*3?", "solution": "\\boxed{6}"}) + "\n")
    named = dict(prompt_field="query", answer_field="gold", eval_data=str(held_out))
    with pytest.raises(ValueError, match=r"held_out.jsonl:1: no problem text \(field query\)"):
        Trainer(papo_config(data, tmp_path / "a", **named), model=make_model(tok), tokenizer=tok)
    config = papo_config(data, tmp_path / "b", eval_prompt_field="problem",
                         eval_answer_field="solution", **named)  # fmt: skip
    run = Trainer(config, model=make_model(tok), tokenizer=tok)
    assert [(p.prompt, p.answer) for p in run.problems] == [("What is 1+1?", "2")]
    assert [(p.prompt, p.answer) for p in run.eval_problems] == [("What is 2*3?", "6")]
    with pytest.raises(ValueError, match="name fields of eval_data"):
        papo_config(data, tmp_path / "c", eval_prompt_field="problem")


def test_resume_without_a_checkpoint_starts_its_logs_over(problems, tmp_path, tokenizers):
    """A run killed before its first checkpoint resumes at step 0: the steps it logged (and its
    evaluation before training) are done again, not logged twice."""
    tok = tokenizers["special"]
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text(json.dumps({"problem": "What is 2*3?", "answer": "6"}) + "\n")
    config = papo_config(
        problems, tmp_path / "r", steps=2, rollouts_every=1, eval_data=str(held_out)
    )
    Trainer(config, model=make_model(tok), tokenizer=tok).train(stop_after=1)
    assert not (tmp_path / "r" / "checkpoints").exists()
    Trainer(config, model=make_model(tok), tokenizer=tok).train(resume=True)
    metrics = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in metrics] == [0, 1, 2]
    rollouts = (tmp_path / "r" / "rollouts.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in rollouts] == [1] * 4 + [2] * 4


def test_held_out_problems_are_checked_with_the_evaluations_sampling(
    problems, tmp_path, tokenizers
):
    """The start-up check asks the pool for ``eval_samples`` samples of each held-out prompt,
    not the rollouts' ``samples_per_prompt``."""
    tok = tokenizers["special"]
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text(json.dumps({"problem": "What is 2*3?", "answer": "6"}) + "\n")
    settings = dict(eval_data=str(held_out), kv_pages=8, page_size=4, samples_per_prompt=2)
    with pytest.raises(ValueError, match=r"held_out.jsonl: problem '0'.*does not fit the KV pool"):
        config = papo_config(problems, tmp_path / "r", eval_samples=8, eval_temperature=1.0,
                             **settings)  # fmt: skip
        Trainer(config, model=make_model(tok), tokenizer=tok)
    config = papo_config(problems, tmp_path / "r", **settings)  # one sample: it fits
    assert Trainer(config, model=make_model(tok), tokenizer=tok).evaluate()["eval_problems"] == 1


def test_a_lone_surrogate_in_the_data_is_refused_naming_its_line(tmp_path, tokenizers):
    """A reference holding a lone surrogate (a cut emoji, read from a JSON escape) is not text:
    the data is refused, naming the line, before the model loads (as for any bad record)."""
    data = tmp_path / "odd.jsonl"
    data.write_text('{"problem": "What is 2+3?", "answer": "5"}\n')
    data.write_text(data.read_text() + '{"problem": "What is 2+4?", "answer": "6 \\ud83d"}\n')
    tok = tokenizers["special"]
    config = papo_config(data, tmp_path / "r", steps=1, prompts_per_step=1, rollouts_every=1)
    with pytest.raises(ValueError, match=r"odd.jsonl:2: holds a lone surrogate \(\\ud83d"):
        Trainer(config, model=make_model(tok), tokenizer=tok)


def test_overlapped_rollouts_train_on_the_engines_logprobs(problems, tmp_path, tokenizers):
    tok = tokenizers["special"]
    config = papo_config(problems, tmp_path / "overlap", steps=1, overlap=True)
    run = Trainer(config, model=make_model(tok), tokenizer=tok)
    assert run.engine.overlap
    (metrics,) = run.train()
    assert metrics["rollouts"] == 4 and metrics["grad_norm"] > 0
    assert metrics["logprob_gap"] <= 1e-4, "training log-probs are the engine's"
    if not torch.cuda.is_available():
        config = papo_config(problems, tmp_path / "graphs", steps=1, cuda_graphs=True)
        with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
            Trainer(config, model=make_model(tok), tokenizer=tok)


def test_resume_continues_exactly(problems, tmp_path, tokenizers):
    tok = tokenizers["special"]
    config = papo_config(problems, tmp_path / "whole", steps=4, save_every=2, rollouts_every=1)
    whole = Trainer(config, model=make_model(tok), tokenizer=tok)
    whole_history = whole.train()

    config = papo_config(problems, tmp_path / "split", steps=4, save_every=2, rollouts_every=1)
    first = Trainer(config, model=make_model(tok), tokenizer=tok)
    first.train(stop_after=3)  # step 3 is logged, then redone from the checkpoint of step 2
    with (tmp_path / "split" / "rollouts.jsonl").open("a") as log:
        log.write('{"step": 4, "problem_id": "cut by a ki')
    # a fresh process: different initial weights, resumed from the checkpoint
    second = Trainer(config, model=make_model(tok, seed=99), tokenizer=tok)
    resumed_history = second.train(resume=True)
    assert len(resumed_history) == 2
    for key, value in weights(whole.model).items():
        assert torch.equal(value, second.model.state_dict()[key]), key
    assert all(x["grad_norm"] > 0 for x in whole_history), "every step updates the weights"
    for a, b in zip(whole_history[2:], resumed_history, strict=True):
        assert a["loss"] == b["loss"] and a["reward"] == b["reward"]
    logged = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in logged] == [1, 2, 3, 4]
    rollouts = (tmp_path / "split" / "rollouts.jsonl").read_text()
    assert rollouts == (tmp_path / "whole" / "rollouts.jsonl").read_text()
    assert [json.loads(x)["step"] for x in rollouts.splitlines()] == [1] * 4 + [2] * 4 + [3] * 4 + [
        4
    ] * 4


def test_a_problem_drawn_twice_in_a_step_is_two_groups_of_fresh_samples(tmp_path, tokenizers):
    """More prompts per step than problems (or a step across an epoch boundary) draws a problem
    twice: each draw is its own group with its own seeds, not a copy of the other's samples."""
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"problem": "What is 2+3?", "answer": "5"}) + "\n")
    tok = tokenizers["special"]
    run = Trainer(
        papo_config(data, tmp_path / "r", prompts_per_step=2, steps=1),
        model=make_model(tok),
        tokenizer=tok,
    )
    assert run.batch_indices(0) == [0, 0]
    rollouts, _ = run.rollout(list(enumerate(run.batch_indices(0))), step=0)
    by_group = {}
    for rollout in rollouts:
        by_group.setdefault(rollout.group, []).append(rollout.graph.token_ids)
    assert sorted(by_group) == [0, 1] and all(len(ids) == 2 for ids in by_group.values())
    assert by_group[0] != by_group[1]
    (metrics,) = run.train()
    assert metrics["rollouts"] == 4 and metrics["skipped"] is None


def test_all_invalid_rollouts_skip_the_step(problems, tmp_path, tokenizers, monkeypatch):
    monkeypatch.setattr(trainer, "_structurally_valid", lambda graph: False)
    model = make_model(tokenizers["special"])
    before = weights(model)
    run = Trainer(
        papo_config(problems, tmp_path / "r", steps=1, rollouts_every=1),
        model=model,
        tokenizer=tokenizers["special"],
    )
    (metrics,) = run.train()
    assert metrics["skipped"] == "no rollout left to train on"
    assert metrics["dropped_rollouts"] == 4 and metrics["skipped_steps"] == 1
    logged = [json.loads(x) for x in (tmp_path / "r" / "rollouts.jsonl").read_text().splitlines()]
    assert len(logged) == 4, "a skipped step's rollouts are logged too"
    for record in logged:
        assert not record["trained"] and record["left_out"] == "invalid"
        assert record["advantage"] is None and record["node_advantages"] is None
    assert all(torch.equal(before[k], v) for k, v in weights(model).items())


def test_rollouts_cut_for_want_of_kv_pages_are_not_trained_on(tmp_path, tokenizers, monkeypatch):
    """A pool too small for a step's samples cuts some (finish reason kv_exhausted): the engine's
    capacity, not the policy, ended them, so they are counted and left out of the advantages and
    the loss, like invalid ones, whatever ``drop_invalid`` says."""
    data = tmp_path / "four.jsonl"
    rows = [{"problem": f"What is {i}+3?", "answer": str(i + 3)} for i in range(4)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tok = tokenizers["special"]
    config = papo_config(data, tmp_path / "r", steps=1, kv_pages=40, page_size=4,
                         max_new_tokens=60, drop_invalid=False, rollouts_every=1)  # fmt: skip
    run = Trainer(config, model=make_model(tok), tokenizer=tok)
    scored = []
    estimator = trainer.advantage_estimators.get

    def recording(name):
        def estimate(scores, groups):
            scored.append(len(scores))
            return estimator(name)(scores, groups)

        return estimate

    monkeypatch.setattr(trainer.advantage_estimators, "get", recording)
    rollouts, _ = run.rollout(list(enumerate(run.batch_indices(0))), step=0)
    cut = [r.graph.metadata["finish_reason"] == "kv_exhausted" for r in rollouts]
    assert [r.pool_cut for r in rollouts] == cut and 0 < sum(cut) < len(cut)
    (metrics,) = run.train()
    assert metrics["pool_cut_rollouts"] == sum(cut) and metrics["dropped_rollouts"] == 0
    assert scored == [metrics["rollouts"] - sum(cut)]
    logged = [json.loads(x) for x in (tmp_path / "r" / "rollouts.jsonl").read_text().splitlines()]
    reasons = [r["left_out"] for r in logged]
    assert reasons.count("kv_exhausted") == sum(cut) and reasons.count(None) == len(cut) - sum(cut)


def test_held_out_samples_cut_for_want_of_kv_pages_count_as_wrong(tmp_path, tokenizers):
    """An evaluation on a pool too small for its samples: each sample the pool cut counts as
    wrong (``eval_pool_cut`` says how many), whatever its text grades as."""
    data = tmp_path / "four.jsonl"
    rows = [{"problem": f"What is {i}+3?", "answer": str(i + 3)} for i in range(4)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tok = tokenizers["special"]
    config = papo_config(data, tmp_path / "r", steps=1, kv_pages=44, page_size=4,
                         max_new_tokens=60, eval_data=str(data), eval_samples=2,
                         eval_temperature=1.0)  # fmt: skip
    run = Trainer(config, model=make_model(tok), tokenizer=tok)
    run.reward_fn = lambda response, reference, **_: rewards.Reward(1.0, True, None, None, True)
    metrics = run.evaluate()
    assert 0 < metrics["eval_pool_cut"] < 8
    assert metrics["eval_accuracy"] == (8 - metrics["eval_pool_cut"]) / 8


def test_rollouts_whose_layout_differs_from_the_engines_are_not_trained_on(
    problems, tmp_path, tokenizers
):
    """A graph whose parsed positions are not those the engine decoded at (free-mode tag soup
    the format refused) cannot be scored as it was sampled: it is left out of the advantages
    and the loss whatever ``drop_invalid`` says, counted among the dropped rollouts."""
    tok = tokenizers["special"]
    config = papo_config(problems, tmp_path / "r", steps=1, drop_invalid=False, rollouts_every=1)
    run = Trainer(config, model=make_model(tok), tokenizer=tok)
    generate = run.engine.generate

    def one_differs(*args, **kwargs):
        graphs = generate(*args, **kwargs)
        graphs[0].metadata["layout_consistent"] = False
        return graphs

    run.engine.generate = one_differs
    (metrics,) = run.train()
    assert metrics["dropped_rollouts"] == 1 and metrics["rollouts"] == 4
    logged = [json.loads(x) for x in (tmp_path / "r" / "rollouts.jsonl").read_text().splitlines()]
    differing = [r for r in logged if r["left_out"] == "layout_inconsistent"]
    assert len(differing) == 1 and not differing[0]["trained"]
    assert differing[0]["advantage"] is None


@rewards.register("test_flat_for_8")
def flat_for_8(response: str, reference: str, **_) -> rewards.Reward:
    """No spread for a problem whose answer is 8; shorter is better for the others."""
    score = 0.0 if reference == "8" else -len(response) / 100
    return rewards.Reward(score, False, None, None, False)


def test_dynamic_sampling_drops_groups_whose_rewards_are_all_equal(tmp_path, tokenizers):
    """DAPO's dynamic sampling: a group whose samples all scored the same has zero advantage
    everywhere, so it is filtered out (counted, and logged as an uninformative group)."""
    data = tmp_path / "two.jsonl"
    rows = [{"problem": "What is 4+4?", "answer": "8"}, {"problem": "What is 2+3?", "answer": "5"}]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tok = tokenizers["special"]
    config = papo_config(data, tmp_path / "r", steps=1, samples_per_prompt=3, rollouts_every=1,
                         dynamic_sampling=True, reward="test_flat_for_8")  # fmt: skip
    run = Trainer(config, model=make_model(tok), tokenizer=tok)
    (metrics,) = run.train()
    logged = [json.loads(x) for x in (tmp_path / "r" / "rollouts.jsonl").read_text().splitlines()]
    flat = [r for r in logged if r["reference"] == "8"]
    varied = [r for r in logged if r["reference"] == "5" and r["left_out"] != "invalid"]
    assert len(flat) == 3 and len({r["reward"] for r in varied}) > 1
    reasons = [r["left_out"] for r in flat]
    assert set(reasons) <= {"uninformative group", "invalid"} and "uninformative group" in reasons
    assert all(r["trained"] and r["advantage"] is not None for r in varied)
    assert metrics["filtered_rollouts"] == 3 - sum(r["left_out"] == "invalid" for r in flat)
    assert metrics["skipped"] is None and metrics["grad_norm"] > 0


def test_a_pool_too_small_for_a_group_is_warned_about_at_start(tmp_path, problems, tokenizers):
    from io import StringIO

    from rich.console import Console

    tok = tokenizers["special"]
    for pages, warned in ((40, True), (4096, False)):
        out = StringIO()
        config = papo_config(problems, tmp_path / f"r{pages}", kv_pages=pages, page_size=4)
        Trainer(config, model=make_model(tok), tokenizer=tok, console=Console(file=out))
        text = " ".join(out.getvalue().split())
        assert ("warning: the KV pool holds 156 tokens" in text) == warned, text
        assert ("raise kv_pages" in text) == warned


def test_non_finite_loss_skips_and_keeps_checkpoints_loadable(problems, tmp_path, tokenizers):
    tok = tokenizers["special"]
    model = make_model(tok)
    config = papo_config(problems, tmp_path / "r", steps=1, rollouts_every=1)
    run = Trainer(config, model=model, tokenizer=tok)
    real = run.loss_fn

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        out.loss = out.loss * float("nan")
        return out

    run.loss_fn = poisoned
    before = weights(model)
    (metrics,) = run.train()
    assert metrics["skipped"] == "non-finite loss"
    assert all(torch.equal(before[k], v) for k, v in weights(model).items())
    logged = [json.loads(x) for x in (tmp_path / "r" / "rollouts.jsonl").read_text().splitlines()]
    assert {(r["trained"], r["left_out"]) for r in logged} == {
        (False, "step skipped: non-finite loss")
    }, "the rollout log says the step trained none"
    fresh = make_model(tok, seed=5)
    state = checkpoint.load(
        checkpoint.latest(tmp_path / "r" / "checkpoints"), fresh, run.optimizer, run.scheduler
    )
    assert state["skipped_steps"] == 1
    assert all(torch.equal(before[k], v) for k, v in weights(fresh).items())


def test_checkpoints_load_split_untied_and_on_fewer_gpus(tmp_path, tokenizers, monkeypatch):
    """What a checkpoint may hold besides one weights file: the files save_pretrained splits a
    large model into (resume read only model.safetensors); an untied head, which must be there
    (transformers lists tied keys per class, so a missing one loaded silently); and more GPUs'
    RNG states than this machine has (an IndexError traceback)."""
    from safetensors.torch import load_file, save_file

    tok = tokenizers["special"]
    model = tiny_model("llama", tokenizer=tok, tie_word_embeddings=False, seed=2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    path = checkpoint.save(tmp_path / "c", 1, model, tok, optimizer, scheduler, {})
    model.save_pretrained(tmp_path / "split", max_shard_size="100KB")  # as a 50 GB model is
    assert len(list((tmp_path / "split").glob("model-*.safetensors"))) > 1
    (path / "model.safetensors").unlink()
    for file in (tmp_path / "split").glob("model*.safetensors*"):
        file.rename(path / file.name)
    fresh = tiny_model("llama", tokenizer=tok, tie_word_embeddings=False, seed=5)
    checkpoint.load(path, fresh, optimizer, scheduler)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in model.state_dict().items())

    path = checkpoint.save(tmp_path / "d", 1, model, tok, optimizer, scheduler, {})
    weights_file = path / "model.safetensors"
    tensors = load_file(str(weights_file))
    del tensors["lm_head.weight"]
    save_file(tensors, str(weights_file), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"does not fit the model: missing \['lm_head.weight'\]"):
        checkpoint.load(path, fresh, optimizer, scheduler)

    restored = []
    state = {**checkpoint.rng_state(), "cuda": [torch.zeros(8, dtype=torch.uint8)] * 8}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append(device))
    checkpoint.set_rng_state(state)  # saved by 8 GPUs, resumed on 1
    assert restored == [0]


def _cut(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _other_shape(path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    name = next(iter(tensors))
    tensors[name] = torch.cat([tensors[name], tensors[name][:1]])
    save_file(tensors, str(path), metadata={"format": "pt"})


def _latest_a_directory(path):
    pointer = path.parent.parent / checkpoint.LATEST
    pointer.unlink()
    pointer.mkdir()


def test_a_line_a_kill_after_the_checkpoint_prevented_is_logged_on_resume(
    problems, tmp_path, tokenizers
):
    """Step 1's checkpoint is written before its evaluation, its metrics line after: an
    evaluation that failed (or a kill) there lost that line for good, as resuming starts after
    the checkpoint. The checkpoint now holds the line's training metrics, and the resume logs
    them with the evaluation done again (helper's audit)."""
    tok = tokenizers["special"]
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text(json.dumps({"problem": "What is 2*3?", "answer": "6"}) + "\n")
    settings = dict(steps=3, save_every=1, eval_data=str(held_out), eval_every=1, lr=0.0)
    whole = Trainer(papo_config(problems, tmp_path / "whole", **settings), model=make_model(tok),
                    tokenizer=tok)  # fmt: skip
    whole.train()
    config = papo_config(problems, tmp_path / "r", **settings)
    failing = Trainer(config, model=make_model(tok), tokenizer=tok)
    real = failing.evaluate
    failing.evaluate = lambda: real() if failing.step == 0 else 1 / 0
    with pytest.raises(ZeroDivisionError):
        failing.train()
    assert checkpoint.latest(tmp_path / "r" / "checkpoints").name == "step_0000001"
    Trainer(config, model=make_model(tok), tokenizer=tok).train(resume=True)

    def lines(run):
        return [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    assert [x["step"] for x in lines("r")] == [0, 1, 2, 3]
    for a, b in zip(lines("whole"), lines("r"), strict=True):
        same = {k for k in a if k != "eval_time_s" and not k.endswith(("_per_s", "time_s"))}
        assert {k: a[k] for k in same} == {k: b[k] for k in same}


def test_resume_refuses_other_settings_and_a_fresh_run_refuses_a_used_directory(
    problems, tmp_path, tokenizers, monkeypatch
):
    """A resume continues the run the checkpoint holds: a setting that changes what a step
    computes is refused with each change named (lr was taken from the checkpoint's scheduler
    while config.json said otherwise); how long it runs, what it logs and evaluates, and the
    resources it takes, and how the rollouts run (overlapped decode steps) may change. A run without --resume does not append its steps to another
    run's logs. A lost ``latest`` pointer resumes from the newest step directory, not from
    step 0 (helper's audit)."""
    from papo import trainer as trainer_module

    tok = tokenizers["special"]
    monkeypatch.setattr(trainer_module, "Trainer", lambda config, console=None: Trainer(
        config, model=make_model(tok), tokenizer=tok, console=console))  # fmt: skip
    config = papo_config(problems, tmp_path / "r", steps=2, tensorboard=False)
    trainer_module.run(config)
    with pytest.raises(ValueError, match=r"holds a run \(checkpoints up to step_0000002\)"):
        trainer_module.run(config)
    changed = papo_config(problems, tmp_path / "r", steps=2, lr=0.05, seed=7, tensorboard=False)
    with pytest.raises(ValueError, match=r"other settings \(lr 0.001 -> 0.05, seed 0 -> 7\)"):
        trainer_module.run(changed, resume=True)
    (tmp_path / "r" / "checkpoints" / "latest").unlink()
    longer = papo_config(problems, tmp_path / "r", steps=3, log_every=3, overlap=True,
                         tensorboard=False)  # fmt: skip
    history = trainer_module.run(longer, resume=True)
    assert len(history) == 1, "resumed after step 2, from the newest step directory"
    logged = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in logged] == [1, 2, 3]


@pytest.mark.parametrize(
    ("name", "damage", "message"),
    [("trainer.pt", lambda p: p.write_bytes(b""), "cannot read checkpoint .*trainer.pt"),
     ("trainer.pt", lambda p: p.write_bytes(b"garbage" * 10), "cannot read checkpoint .*trainer.pt"),
     ("model.safetensors", _cut, "cannot read checkpoint .*model.safetensors"),
     ("model.safetensors", lambda p: p.write_bytes(b""), "cannot read checkpoint"),
     ("model.safetensors", _other_shape, "does not fit the model"),
     ("state.json", lambda p: p.write_text("{}"), "cannot read checkpoint .*no step number"),
     ("state.json", lambda p: p.write_text("[1]"), "cannot read checkpoint .*no step number"),
     ("state.json", lambda p: p.write_text('{"step": "1"}'), "cannot read checkpoint"),
     ("state.json", lambda p: p.write_text('{"step": 1, "skipped_steps": "x"}'),
      "cannot read checkpoint .*skipped_steps"),
     ("state.json", _latest_a_directory, "cannot read checkpoint pointer .*latest")],
)  # fmt: skip
def test_a_damaged_checkpoint_is_a_clear_error_on_resume(
    name, damage, message, problems, tmp_path, tokenizers
):
    tok = tokenizers["special"]
    config = papo_config(problems, tmp_path / "r", steps=1, tensorboard=False)
    Trainer(config, model=make_model(tok), tokenizer=tok).train()
    damage(checkpoint.latest(tmp_path / "r" / "checkpoints") / name)
    with pytest.raises(ValueError, match=message):
        Trainer(config, model=make_model(tok), tokenizer=tok).train(resume=True)


def test_resume_drops_a_cut_metrics_line(tmp_path):
    import io

    from rich.console import Console

    from papo.logs import StepLogger

    console = Console(file=io.StringIO(), width=200)
    logger = StepLogger(tmp_path, tensorboard=False, console=console)
    for step in (1, 2, 3):
        logger.log(step, {"loss": 0.5})
    with logger.path.open("a") as file:  # a valid line that is no record, then a kill mid-write
        file.write('[1]\n{"step": 4, "loss": 0.')
    logger.truncate_after(2)
    lines = [json.loads(line) for line in logger.path.read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]
    assert "dropped 2 unreadable line(s): 4, 5" in console.file.getvalue()


def test_a_long_log_is_cut_in_place_or_rewritten_line_by_line(tmp_path, monkeypatch):
    """Resuming cuts a log after the checkpoint's step: in place when what goes is its tail
    (a kill's leftovers), else by copying the kept lines; a kept record whose newline a kill
    cut gets it back. The file is never read whole (a rollout log holds gigabytes)."""
    import io
    from pathlib import Path

    from rich.console import Console

    from papo.logs import truncate_steps

    console = Console(file=io.StringIO(), width=200)
    path = tmp_path / "rollouts.jsonl"
    records = [
        {"step": step, "text": "x" * 100, "nested": {"kind": "step"}} for step in (1, 1, 2, 3)
    ]
    whole = "".join(json.dumps(r) + "\n" for r in records)
    monkeypatch.setattr(Path, "read_text", lambda *a, **k: pytest.fail("read whole"))
    monkeypatch.setattr(Path, "read_bytes", lambda *a, **k: pytest.fail("read whole"))

    def lines():
        with path.open() as file:
            return [json.loads(line)["step"] for line in file]

    path.write_text(whole + '{"step": 4, "text": "cut by a ki')
    inode = path.stat().st_ino
    truncate_steps(path, 2, console)
    assert lines() == [1, 1, 2] and path.stat().st_ino == inode, "cut in place"
    # a record cut right before its newline is whole: kept, and the next line starts anew
    path.write_text(whole[:-1])
    truncate_steps(path, 3, console)
    assert lines() == [1, 1, 2, 3] and path.open().read().endswith("}\n")
    # a line joined to the rest of a cut one, then a later run's records: copied
    path.write_text(whole + '{"step": 2, "te' + json.dumps({"step": 4}) + "\n" + whole)
    truncate_steps(path, 2, console)
    assert lines() == [1, 1, 2, 1, 1, 2]
    assert "dropped 1 unreadable line(s): 5" in console.file.getvalue()
    assert not (tmp_path / "rollouts.jsonl.tmp").exists()
    truncate_steps(path, -1, console)
    assert path.stat().st_size == 0, "no checkpoint: every line goes"


def test_sft_learns_the_traces(traces, problems, tmp_path, tokenizers):
    tok = tokenizers["special"]
    config = load_config(
        None,
        "sft",
        dict(
            data=str(traces),
            output_dir=str(tmp_path / "sft"),
            steps=6,
            batch_size=2,
            lr=2e-2,
            warmup_ratio=0.0,
            chat=False,
            tensorboard=False,
            eval_data=str(problems),  # held-out problems, decoded before and after
            max_new_tokens=40,
        ),
    )
    run = Trainer(config, model=make_model(tok), tokenizer=tok)
    graph = run.graphs[0]
    assert [n.kind.value for n in graph.nodes_of("step")] == ["step", "step"]
    history = run.train()
    losses = [x["loss"] for x in history]
    assert losses[-1] < 0.7 * losses[0]
    logged = [json.loads(x) for x in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    evaluated = [x["step"] for x in logged if x.get("eval_problems") == 3]
    assert evaluated == [0, 6]
    assert history[0]["lr"] == pytest.approx(2e-2)
    assert history[-1]["lr"] < history[0]["lr"], "cosine schedule"


def test_zero_stage_uses_text_tags_and_dapo(problems, tmp_path, tokenizers):
    tok = tokenizers["text"]
    config = load_config(
        None,
        "zero",
        dict(
            data=str(problems),
            output_dir=str(tmp_path / "zero"),
            steps=1,
            prompts_per_step=2,
            samples_per_prompt=3,
            max_new_tokens=24,
            overlong_buffer=8,
            chat=False,
            tensorboard=False,
            kv_pages=1024,
            page_size=4,
        ),
    )
    assert config.tags == "text" and config.mode == "sequential" and config.clip == (0.2, 0.28)
    run = Trainer(config, model=make_model(tok), tokenizer=tok)
    (metrics,) = run.train()
    assert metrics["rollouts"] == 6
    # a random model never writes a valid format: every reward is a format penalty in (0, -2],
    # possibly minus the overlong penalty
    assert -3.0 <= metrics["reward"] < 0
    assert metrics["format_valid_rate"] == 0.0


def test_overlong_penalty_measures_the_critical_path(problems, tmp_path, tokenizers, monkeypatch):
    """max_new_tokens bounds a sample's critical path, so the DAPO overlong penalty measures
    that, not the tokens of all branches together (a parallel rollout within its budget was
    penalized as overlong, more the wider it was)."""
    import dataclasses

    tok = tokenizers["special"]
    config = papo_config(problems, tmp_path / "run", max_new_tokens=80, overlong_buffer=40)
    run = Trainer(config, model=make_model(tok), tokenizer=tok)
    # samples end at 60 tokens in all, inside the budget's slope, their critical paths shorter
    params = run._sampling_params
    monkeypatch.setattr(
        run, "_sampling_params", lambda seed: dataclasses.replace(params(seed), max_total_tokens=60)
    )
    rollouts, _ = run.rollout([(0, 0), (1, 1)], step=0)
    shorter = 0
    for rollout in rollouts:
        graph = rollout.graph
        critical = ng.metrics(graph)["critical_path_tokens"]
        shorter += 40 < critical < rollout.response_tokens
        base = rewards.get("test_length")(graph.response_text, "").score
        expected = rewards.overlong_penalty(critical, 80, 40)
        assert rollout.reward.score == pytest.approx(base + expected)
    assert shorter, "some rollout's critical path is on the slope and shorter than its tokens"


def test_bad_data_is_a_clear_error(tmp_path, tokenizers):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"problem": "1+1"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: no answer"):
        Trainer(
            papo_config(path, tmp_path / "x"),
            model=make_model(tokenizers["special"]),
            tokenizer=tokenizers["special"],
        )
    with pytest.raises(ValueError, match="unknown config keys: learning_rate"):
        load_config(None, "papo", {"learning_rate": 1})
    with pytest.raises(ValueError, match=r"unknown config keys: stepz \(did you mean steps\?\)"):
        load_config(None, "papo", {"stepz": 1})
    with pytest.raises(ValueError, match="constrained.*special"):
        load_config(None, "papo", {"mode": "constrained", "tags": "text"})
    assert (
        load_config(None, "papo", {"mode": "constrained", "tags": "special"}).mode == "constrained"
    )


def test_a_prompt_too_long_is_refused_when_the_trainer_starts(problems, tmp_path, tokenizers):
    tok = tokenizers["special"]
    rows = [json.loads(line) for line in problems.read_text().splitlines()]
    rows.insert(1, {"problem": "add " * 4100, "answer": "1", "id": "long"})
    problems.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = papo_config(problems, tmp_path / "x", kv_pages=8192)
    with pytest.raises(ValueError, match="problem 'long': .*exceeds the model's context of 4096"):
        Trainer(config, model=make_model(tok), tokenizer=tok)
    del rows[1]
    rows.append({"problem": "add " * 40, "answer": "1"})  # no id: its record number
    problems.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = papo_config(problems, tmp_path / "x", kv_pages=8)
    with pytest.raises(ValueError, match=r"problems.jsonl: problem '3': .*the KV pool of 7 pages"):
        Trainer(config, model=make_model(tok), tokenizer=tok)


@pytest.mark.parametrize("stage", ["zero", "sft", "papo"])
def test_example_configs_load(stage):
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "configs" / f"{stage}.toml"
    config = load_config(path, stage)
    assert config.stage == stage
    assert config.tags == ("text" if stage == "zero" else "special")


class ScriptedEngine:
    """Returns fixed responses as graphs, the way the engine orders its samples."""

    def __init__(self, responses, grammar="npr"):
        self.responses = responses
        self.grammar = grammar
        self.tokenizer = type("T", (), {"eos_token": "<eos>"})()

    def check_prompt(self, prompt, params, chat=None):
        return []

    def generate(
        self, prompts, params, mode, chat=None, max_running=None, on_finish=None, claim=None
    ):
        """Hands each prompt's graphs to ``on_finish`` last prompt first, as if it ended first;
        a prompt ``claim`` refuses (asked in order) gives none."""
        import npr_graph as ng

        graphs = []
        n = params[0].n if isinstance(params, list) else params.n
        claimed = [index for index in range(len(prompts)) if claim is None or claim(index)]
        for index in claimed:
            for sample in range(n):
                text = self.responses[index][sample] + "<eos>"
                graph = ng.parse(text, grammar=self.grammar, lenient=True)
                graph.metadata.update(prompt_index=index, sample_index=sample, finish_reason="stop")
                graphs.append(graph)
        if on_finish is not None:
            for place, index in reversed(list(enumerate(claimed))):
                on_finish(index, graphs[place * n : (place + 1) * n])
        return graphs


def test_rejection_sampling_keeps_the_first_correct_well_formatted_trace():
    from npr_graph.engine.sampling import SamplingParams
    from npr_graph.prompts import load_template
    from papo.problems import Problem
    from papo.rejection import rejection_sample

    wrong = TRACE.replace("\\boxed{5}", "\\boxed{6}")
    unformatted = "2+3 is \\boxed{5}"
    second_ok = TRACE.replace("both steps", "the steps")
    engine = ScriptedEngine(
        [[wrong, unformatted, TRACE, second_ok], [wrong, wrong, unformatted, wrong]]
    )
    problems = [Problem("a", "What is 2+3?", "5"), Problem("b", "What is 2+5?", "7")]
    scripted = engine.generate

    def last_sample_cut(
        prompts, params, mode, chat=None, max_running=None, on_finish=None, claim=None
    ):
        def cut_last(index, graphs):  # as if the pool had run out under the last sample
            if index == len(prompts) - 1:
                graphs[-1].metadata["finish_reason"] = "kv_exhausted"
            on_finish(index, graphs)

        return scripted(prompts, params, mode, chat, max_running, cut_last, claim)

    engine.generate = last_sample_cut
    accepted, report = rejection_sample(
        engine, problems, load_template("npr"), SamplingParams(n=4), mode="sequential"
    )
    npr = load_template("npr")
    assert accepted == [
        {"id": "a", "prompt": "What is 2+3?", "response": TRACE, "answer": "5", "tries": 3,
         "prompt_template": "npr", "prompt_digest": npr.digest, "chat": False}
    ]  # fmt: skip
    summary = report.to_dict()
    assert summary["problems"] == 2 and summary["accepted"] == 1 and summary["samples"] == 8
    assert summary["mean_tries"] == 3 and summary["pool_cut_samples"] == 1


def test_sft_epochs_are_whole_passes_over_the_traces(tmp_path, tokenizers):
    """Without steps, SFT takes epochs passes over the traces, rounded up to a whole batch: 5
    traces in batches of 2 for 2 epochs are 5 steps, each trace drawn twice (it was 3 steps per
    epoch, 6 in all: 12 draws, two traces three times)."""
    path = tmp_path / "five.jsonl"
    rows = [{"prompt": f"What is 2+3? ({i})", "response": TRACE} for i in range(5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = tokenizers["special"]
    values = dict(data=str(path), batch_size=2, epochs=2, chat=False, tensorboard=False,
                  output_dir=str(tmp_path / "sft"))  # fmt: skip
    run = Trainer(load_config(None, "sft", values), model=make_model(tok), tokenizer=tok)
    assert run.total_steps == 5
    draws = [i for step in range(run.total_steps) for i in run.batch_indices(step)]
    assert sorted(draws) == sorted(list(range(5)) * 2)


def test_sft_trains_on_the_prompts_its_traces_answered(tmp_path, tokenizers):
    """Traces from ``npr sample`` name the prompt they answered; SFT with another template, or
    with the chat template where sampling had none, is refused before training (it taught
    responses to prompts the model never saw), and accepted with the same."""
    from npr_graph.prompts import load_template

    npr = load_template("npr")
    path = tmp_path / "accepted.jsonl"
    record = {"id": "a", "prompt": "What is 2+3?", "response": TRACE, "answer": "5", "tries": 1,
              "prompt_template": "npr", "prompt_digest": npr.digest, "chat": False}  # fmt: skip
    path.write_text(json.dumps(record) + "\n")
    tok = tokenizers["special"]

    def trainer(**settings):
        values = dict(data=str(path), output_dir=str(tmp_path / "run"), steps=1, **settings)
        return Trainer(load_config(None, "sft", values), model=make_model(tok), tokenizer=tok)

    with pytest.raises(ValueError, match="answered prompt template 'npr'.*set prompt_template"):
        trainer()  # the default template is the bare problem
    with pytest.raises(ValueError, match="sampled without the chat template.*set chat = false"):
        trainer(prompt_template="npr")  # this tokenizer has a chat template
    run = trainer(prompt_template="npr", chat=False)
    assert run.traces[0].sampled_with == ("npr", npr.digest, False)
    copy_ = tmp_path / "my_npr.txt"
    copy_.write_text(npr.text)
    trainer(prompt_template=str(copy_), chat=False)  # the same text, elsewhere
    second = {**record, "id": "b", "chat": True}
    path.write_text(json.dumps(record) + "\n" + json.dumps(second) + "\n")
    with pytest.raises(ValueError, match="sampled with different prompts"):
        trainer(prompt_template="npr", chat=False)
    path.write_text(json.dumps({k: v for k, v in record.items() if k != "prompt_digest"}) + "\n")
    assert trainer().traces[0].sampled_with is None, "traces from elsewhere: not checked"


def test_rejection_sampling_keeps_only_samples_the_model_ended():
    """A correct, well-formatted sample its budget, the context or the KV pool cut is not kept
    (SFT would append EOS where it was cut); the report counts such samples."""
    from npr_graph.engine.sampling import SamplingParams
    from npr_graph.prompts import load_template
    from papo.problems import Problem
    from papo.rejection import rejection_sample

    engine = ScriptedEngine([[TRACE] * 4])
    scripted = engine.generate
    reasons = ["length", "context", "kv_exhausted", "stop"]

    def cut(prompts, params, mode, chat=None, max_running=None, on_finish=None, claim=None):
        def mark(index, graphs):
            for graph, reason in zip(graphs, reasons, strict=True):
                graph.metadata["finish_reason"] = reason
            on_finish(index, graphs)

        return scripted(prompts, params, mode, chat, max_running, mark, claim)

    engine.generate = cut
    problems = [Problem("a", "What is 2+3?", "5")]
    accepted, report = rejection_sample(engine, problems, load_template("npr"), SamplingParams(n=4))
    assert [r["tries"] for r in accepted] == [4]
    summary = report.to_dict()
    assert summary["unfinished_samples"] == 3 and summary["pool_cut_samples"] == 1
    assert summary["correct_rate"] == 1.0 and summary["format_valid_rate"] == 1.0
    reasons[-1] = "length"
    accepted, report = rejection_sample(engine, problems, load_template("npr"), SamplingParams(n=4))
    assert accepted == [] and report.to_dict()["unfinished_samples"] == 4


def test_the_end_of_sequence_token_leaves_the_trace_whichever_the_model_stopped_on(tokenizers):
    """A model may stop on several ids (generation_config lists ``<|endoftext|>`` and
    ``<|im_end|>``): the one it stopped on is cut by its id, not only the tokenizer's EOS text."""
    import npr_graph as ng
    from papo.rejection import response_without_eos

    tok = tokenizers["text"]
    prompt = tok.encode("Q: 2+3?", add_special_tokens=False)
    ids = tok.encode("It is \\boxed{5}.", add_special_tokens=False) + [0]
    graph = ng.parse(ids, tokenizer=tok, prompt_ids=prompt, lenient=True)
    assert tok.convert_ids_to_tokens(0) == "<|endoftext|>" != tok.eos_token
    assert graph.response_text.endswith("<|endoftext|>")
    assert response_without_eos(graph, {0, 2}, tok.eos_token) == "It is \\boxed{5}."
    assert response_without_eos(graph, {2}, tok.eos_token) == graph.response_text
    untokenized = ng.parse("It is 5.<|im_end|>", lenient=True)
    assert response_without_eos(untokenized, {0, 2}, "<|im_end|>") == "It is 5."


def test_rejection_sampling_goes_on_past_a_problem_the_engine_cannot_run():
    """A prompt too long for the context or the pool is reported, and the other problems are
    decoded; accepted records come in problem order, and to ``on_record`` as each ends."""
    from npr_graph.engine.engine import PromptError
    from npr_graph.engine.sampling import SamplingParams
    from npr_graph.prompts import load_template
    from papo.problems import Problem
    from papo.rejection import rejection_sample

    class PickyEngine(ScriptedEngine):
        def check_prompt(self, prompt, params, chat=None):
            if "LONG" in prompt:
                raise PromptError("the prompt exceeds the model's context")
            return []

    engine = PickyEngine([[TRACE]] * 3)
    problems = [Problem("a", "2+3", "5"), Problem("b", "LONG", "5"), Problem("c", "3+2", "5")]
    written = []
    accepted, report = rejection_sample(
        engine, problems, load_template("npr"), SamplingParams(n=1), on_record=written.append
    )
    assert [r["id"] for r in accepted] == ["a", "c"]
    assert [r["id"] for r in written] == ["c", "a"], "written as each problem ends"
    with pytest.raises(ValueError, match="one index per problem"):
        rejection_sample(engine, problems, load_template("npr"), SamplingParams(n=1), indices=[0])
    summary = report.to_dict()
    assert summary["problems"] == 2
    assert summary["not_run"] == ["problem b: the prompt exceeds the model's context"]


class PromptedEngine(ScriptedEngine):
    """Answers each prompt by the question in it, whichever problems a call holds."""

    def generate(
        self, prompts, params, mode, chat=None, max_running=None, on_finish=None, claim=None
    ):
        scripted = ScriptedEngine(
            [next(v for k, v in self.responses.items() if k in p) for p in prompts]
        )
        return scripted.generate(prompts, params, mode, chat, max_running, on_finish, claim)


def test_sample_log_resumes_where_a_killed_run_stopped(tmp_path):
    """``npr sample``'s files after a kill: a line cut short is cut off, a problem logged and
    not yet traced is sampled again, and the rest is not; the outcome is the whole run's."""
    from npr_graph.engine.sampling import SamplingParams
    from npr_graph.prompts import load_template
    from papo.problems import Problem
    from papo.rejection import SampleLog, progress_path, rejection_sample

    wrong = TRACE.replace("\\boxed{5}", "\\boxed{6}")
    engine = PromptedEngine({"2+3": [wrong, TRACE], "2+4": [wrong, wrong], "3+2": [TRACE, wrong]})
    problems = [Problem("a", "2+3", "5"), Problem("b", "2+4", "5"), Problem("c", "3+2", "5")]
    settings = {"tries": 2, "seed": 0}

    def run(out):
        with SampleLog(out, settings) as log:
            todo = [p for p in problems if p.id not in log.done]
            if todo:
                log.start()
                rejection_sample(
                    engine, todo, load_template("npr"), SamplingParams(n=2), on_problem=log.write
                )
            return todo, log.report([p.id for p in problems], {})

    def lines(path):
        return sorted(path.read_text().splitlines())

    whole = tmp_path / "whole.jsonl"
    assert [p.id for p in run(whole)[0]] == ["a", "b", "c"]
    want = run(whole)[1].to_dict()
    assert want["problems"] == 3 and want["accepted"] == 2 and want["mean_tries"] == 1.5
    assert run(whole)[0] == [], "done"

    # killed after logging a (accepted) but before its trace; b logged; c cut mid-line
    out = tmp_path / "killed.jsonl"
    progress = progress_path(whole).read_text().splitlines()
    assert sorted(json.loads(line)["id"] for line in whole.read_text().splitlines()) == ["a", "c"]
    logged = {json.loads(line).get("id"): line for line in progress[1:]}
    progress_path(out).write_text(
        "\n".join([progress[0], logged["a"], logged["b"]]) + "\n" + logged["c"][:9]
    )
    out.write_text("")
    todo, report = run(out)
    assert [p.id for p in todo] == ["a", "c"]
    assert report.to_dict() == want
    assert lines(out) == lines(whole)
    assert len(lines(progress_path(out))) == 5, "a is logged twice; the last line counts"

    with pytest.raises(ValueError, match=r"other settings \(seed 0 -> 1\)"):
        SampleLog(out, {**settings, "seed": 1})
    # a log written before --reward existed was graded by accuracy: it resumes with that only
    assert SampleLog(out, {**settings, "reward": "accuracy"}).resumed
    with pytest.raises(ValueError, match=r"other settings \(reward 'accuracy' -> 'format'\)"):
        SampleLog(out, {**settings, "reward": "format"})
    stray = tmp_path / "stray.jsonl"
    stray.write_text('{"id": "x"}\n')
    with pytest.raises(ValueError, match="no stray.progress.jsonl beside it"):
        SampleLog(stray, settings)
    progress_path(out).write_text(progress[0] + "\nnot json\n")
    with pytest.raises(ValueError, match=r"killed.progress.jsonl:2: not JSON"):
        SampleLog(out, settings)
    progress_path(out).write_text(progress[0] + '\n{"id": "a", "samples": "2"}\n')
    with pytest.raises(ValueError, match=r"killed.progress.jsonl:2: not a problem's outcome"):
        SampleLog(out, settings)


def test_ranks_share_the_problems_through_claims_and_part_files(tmp_path):
    """Under torchrun each rank claims problems as it would admit them and writes what it
    finishes to a part file of its own; rank 0 folds the parts into the log. The result is a
    one-process run's: each problem sampled once, the same traces and counts. A fold a kill
    stopped is done again without writing a trace twice; a damaged or orphaned part is an error."""
    from npr_graph.engine.sampling import SamplingParams
    from npr_graph.prompts import load_template
    from npr_graph.ranks import Claims
    from papo.problems import Problem
    from papo.rejection import (
        SampleLog,
        SamplePart,
        claims_path,
        part_paths,
        progress_path,
        rejection_sample,
    )

    wrong = TRACE.replace("\\boxed{5}", "\\boxed{6}")
    engine = PromptedEngine({"2+3": [wrong, TRACE], "2+4": [wrong, wrong], "3+2": [TRACE, wrong]})
    problems = [Problem("a", "2+3", "5"), Problem("b", "2+4", "5"), Problem("c", "3+2", "5")]
    settings = {"tries": 2, "seed": 0}
    ids = [p.id for p in problems]

    def sample(on_problem, claim=None):
        return rejection_sample(
            engine,
            problems,
            load_template("npr"),
            SamplingParams(n=2),
            on_problem=on_problem,
            claim=claim,
        )

    whole = tmp_path / "whole.jsonl"
    with SampleLog(whole, settings) as log:
        log.start()
        sample(log.write)
        want = log.report(ids, {}).to_dict()

    out = tmp_path / "ranks.jsonl"
    claims = Claims(claims_path(out))
    asked, taken_elsewhere = {0: [], 1: []}, {0: 0, 1: 0}

    def claim_for(rank, takes):
        def count() -> None:
            taken_elsewhere[rank] += 1

        def claim(index):
            asked[rank].append(index)
            return index in takes and claims.take(index, count)

        return claim

    with SampleLog(out, settings) as log:
        log.start()
        with SamplePart(out, 1) as part:  # rank 1 has room for problem b only
            sample(part.write, claim_for(1, {1}))
        with SamplePart(out, 0) as part:
            sample(part.write, claim_for(0, {0, 1, 2}))
        assert asked == {0: [0, 1, 2], 1: [0, 1, 2]}
        assert taken_elsewhere == {0: 1, 1: 0}  # rank 0 found problem b taken
        assert sorted(p.name for p in claims.directory.iterdir()) == ["0", "1", "2"]
        parts = part_paths(out)
        assert len(parts) == 2 and out.read_text() == ""
        folded = [p.read_text() for p in parts]
        assert log.absorb_parts() == 3 and part_paths(out) == []
        assert log.report(ids, {}).to_dict() == want
    assert sorted(out.read_text().splitlines()) == sorted(whole.read_text().splitlines())

    # killed after folding the parts in, before removing them: folded again, traces once
    for number, text in enumerate(folded):
        (tmp_path / f"ranks.part-{number}-x.jsonl").write_text(text[:-5])  # the last line cut
    with SampleLog(out, settings) as log:
        assert log.absorb_parts() == 1
        assert log.report(ids, {}).to_dict() == want
    assert sorted(out.read_text().splitlines()) == sorted(whole.read_text().splitlines())
    assert len(progress_path(out).read_text().splitlines()) == 1 + 3 + 1

    damaged = tmp_path / "ranks.part-0-y.jsonl"
    damaged.write_text('{"outcome": {"id": "a"}, "trace": null}\n')
    with pytest.raises(ValueError, match=r"ranks.part-0-y.jsonl:1: not a problem's outcome"):
        SampleLog(out, settings).absorb_parts()
    orphan = tmp_path / "orphan.part-0-z.jsonl"
    orphan.write_text(folded[0])
    with pytest.raises(ValueError, match="orphan.part-0-z.jsonl has no orphan.progress.jsonl"):
        SampleLog(tmp_path / "orphan.jsonl", settings).absorb_parts()


def test_rejection_sampling_checks_the_format_of_the_engine_grammar():
    """Multiverse traces are checked by the strict Multiverse rules, not the NPR format score."""
    from test_multiverse_engine import NESTED_TRACE

    import npr_graph as ng
    from npr_graph.engine.sampling import SamplingParams
    from npr_graph.prompts import load_template
    from papo.problems import Problem
    from papo.rejection import rejection_sample

    unclosed = NESTED_TRACE.replace("</Conclusion>\n</Parallel>\n\\boxed{6}", "\\boxed{6}")
    no_block = "so \\boxed{6}"
    assert ng.validate(unclosed, "strict", grammar="multiverse"), "a block left open"
    engine = ScriptedEngine([[unclosed, no_block, NESTED_TRACE]], grammar="multiverse")
    problems = [Problem("a", "Q", "6")]
    accepted, report = rejection_sample(
        engine, problems, load_template("multiverse"), SamplingParams(n=3), mode="constrained"
    )
    assert [(r["response"], r["tries"]) for r in accepted] == [(NESTED_TRACE, 3)]
    assert report.to_dict()["format_valid_rate"] == pytest.approx(1 / 3)
    assert report.to_dict()["correct_rate"] == 1.0


def test_bad_sft_traces_are_named_by_file_and_line(tmp_path):
    from papo.problems import read_problems, read_traces

    path = tmp_path / "traces.jsonl"
    rows = ['{"prompt": "Q", "response": "A"}', "[1, 2]", '{"prompt": "Q"}',
            '{"prompt": "Q", "response": "  "}', '{"response": "A"}', "{broken"]  # fmt: skip
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(ValueError) as error:
        read_traces(path)
    message = str(error.value)
    for line, why in [(2, "not an object"), (3, "no response"), (4, "no response"),
                      (5, "no problem/question/prompt"), (6, "")]:  # fmt: skip
        assert f"traces.jsonl:{line}: {why}" in message
    assert "traces.jsonl:1" not in message
    path.write_text("".join(f"[{i}]\n" for i in range(8)))
    with pytest.raises(ValueError, match=r"\(and 3 more\)$"):
        read_traces(path)
    with pytest.raises(ValueError, match="missing.jsonl"):
        read_traces(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="missing.jsonl"):
        read_problems(tmp_path / "missing.jsonl")
    path.write_text('{"question": "Q", "response": "A"}\n')
    assert [t.prompt for t in read_traces(path, prompt_field="question")] == ["Q"]


def test_unknown_old_logprobs_matter_only_where_the_loss_reads_them():
    from papo.trainer import _known

    nan = float("nan")
    current = torch.tensor([-1.0, -2.0, -3.0], requires_grad=True)
    mask = torch.tensor([True, False, True])
    old = _known(torch.tensor([-1.5, nan, -2.5]), mask, current)
    assert old.tolist() == [-1.5, -2.0, -2.5] and not old.requires_grad
    assert _known(torch.tensor([nan, -1.0, -2.5]), mask, current) is None


def test_train_cli_reports_bad_configs(tmp_path, capsys):
    from npr_graph.cli import main

    config = tmp_path / "c.toml"
    config.write_text('steps = "many"\n')
    assert main(["train", "papo", "--config", str(config)]) == 2
    assert "error" in capsys.readouterr().err
    assert main(["train", "sft", "--set", "data=/nonexistent.jsonl"]) == 2
    capsys.readouterr()
    assert main(["train", "sft", "--set", "steps=1"]) == 2  # it said ".: no such file"
    assert "no training data: set data in the config" in capsys.readouterr().err
    # refused as the config loads: the model named here is never looked for
    config.write_text("steps = 1\nmax_grad_norm = nan\n")
    assert main(["train", "papo", "--config", str(config), "--set", "model=/nonexistent"]) == 2
    assert "invalid training config: max_grad_norm" in capsys.readouterr().err
    for setting in ["reward=acuracy", "aggregation=token_mean", "lr=Infinity", "steps=1.5"]:
        key = setting.partition("=")[0]
        assert main(["train", "papo", "--set", setting, "--set", "model=/nonexistent"]) == 2
        assert f"invalid training config: {key}" in capsys.readouterr().err
    # a stage set here is the command's or an error (it was dropped); a config of another
    # suffix is named, not read as JSON
    assert main(["train", "papo", "--set", "stage=sft", "--set", "steps=1"]) == 2
    assert "--set stage=sft in a run of stage 'papo'" in capsys.readouterr().err
    for name in ("c.TOML", "c.yaml"):
        (tmp_path / name).write_text("steps = 1\n")
        code = main(["train", "papo", "--config", str(tmp_path / name), "--set", "data=x.jsonl"])
        err = capsys.readouterr().err.replace("\n", "")
        assert (code, "a .toml or .json file" in err) == (
            (2, True) if name == "c.yaml" else (2, False)
        )


@pytest.mark.parametrize(
    ("key", "value"),
    [("seed", "abc"), ("seed", 1.5), ("steps", 1.5), ("steps", True), ("prompts_per_step", 1.5),
     ("samples_per_prompt", 1.5), ("mini_batches", 1.5), ("data", 123), ("kl_coef", "abc"),
     ("kl_coef", -1), ("temperature", "abc"), ("max_new_tokens", "abc"), ("max_blocks", "abc"),
     ("betas", [0.9]), ("betas", [0.9, 1.5]), ("log_every", "abc"), ("log_every", 0),
     ("save_every", "abc"), ("save_every", -1), ("rollouts_every", -1), ("rollouts_every", 0.5), ("branch_lambda", "abc"), ("clip", ["a", "b"]),
     ("overlong_factor", "abc"), ("overlong_buffer", 2000), ("chat", "maybe"),
     ("max_grad_norm", float("nan")), ("max_grad_norm", 0), ("lr", float("inf")), ("top_p", 0),
     ("reward", "acuracy"), ("advantage", "gpro"), ("loss", "ppo"), ("aggregation", "token_mean"),
     ("mode", 1), ("dtype", "float16"), ("model", ""), ("model", "  "), ("temperature", 1e-9), ("temperature", 1e39),
     ("eval_temperature", 1e-7), ("eval_samples", 0)],
)  # fmt: skip
def test_bad_config_values_are_refused_by_key(key, value):
    with pytest.raises(ValueError, match=f"^invalid training config: {key}"):
        load_config(None, "papo", {key: value})


def test_config_types_accept_what_they_should():
    config = load_config(
        None, "papo", dict(lr=1, clip=[0, 1], chat=None, steps=3, reward="test_length")
    )
    assert (config.lr, config.clip, config.chat, config.steps) == (1, (0.0, 1.0), None, 3)
    assert load_config(None, "sft", {"steps": None}).steps is None
    with pytest.raises(ValueError, match="known: .*test_length"):
        load_config(None, "papo", {"reward": "nope"})
    own = {"reward": "operator:add", "advantage": "operator:sub", "loss": "operator:mul"}
    config = load_config(None, "papo", own)  # functions of one's own, by import path
    assert (config.reward, config.advantage, config.loss) == tuple(own.values())
    with pytest.raises(ValueError, match="reward 'operator:nope' cannot be imported"):
        load_config(None, "papo", {"reward": "operator:nope"})


def test_stale_mini_batches_clip_against_the_rollout_policy(problems, tmp_path, tokenizers):
    tok = tokenizers["special"]
    config = papo_config(
        problems, tmp_path / "mb", steps=1, mini_batches=2, clip=[0.2, 0.28], lr=5e-2
    )
    run = Trainer(config, model=make_model(tok), tokenizer=tok)
    (metrics,) = run.train()
    assert metrics["skipped"] is None and metrics["skipped_updates"] == 0
    assert metrics["logprob_gap"] <= 1e-4, "the first mini-batch is on-policy"
    assert 0.0 <= metrics["clip_fraction"] <= 1.0


def test_kl_to_the_initial_policy(problems, tmp_path, tokenizers):
    tok = tokenizers["special"]
    config = papo_config(problems, tmp_path / "kl", steps=2, kl_coef=0.1, lr=5e-2)
    run = Trainer(config, model=make_model(tok), tokenizer=tok)
    first, second = run.train()
    assert first["kl"] == pytest.approx(0.0, abs=1e-6), "the policy starts at the reference"
    assert first["grad_norm"] > 0 and second["kl"] > 0
    assert all(not p.requires_grad for p in run.reference.parameters())


def test_sample_cli_writes_the_accepted_traces(problems, tmp_path, tokenizers, capsys, monkeypatch):
    from npr_graph.cli import main

    model_dir = tmp_path / "tiny"
    make_model(tokenizers["text"]).save_pretrained(model_dir)
    tokenizers["text"].save_pretrained(model_dir)
    out = tmp_path / "accepted.jsonl"
    args = ["sample", "--data", str(problems), "--out", str(out), "--model", str(model_dir),
            "--tries", "2", "--limit", "2", "--max-new-tokens", "8", "--device", "cpu"]  # fmt: skip
    threads = []  # on a shared CPU, --threads 1 can be much faster than contended threads
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    assert main([*args, "--threads", "1"]) == 0
    assert out.exists()  # a random model is rarely right: accepted traces may well be none
    assert threads == [1]
    with pytest.raises(SystemExit):
        main([*args, "--threads", "0"])
    assert "must be at least 1" in capsys.readouterr().err
    assert main([*args[:-2], "--device", "tpu"]) == 2
    assert "device" in capsys.readouterr().err
    assert main([*args, "--mode", "constrained"]) == 2  # the model's tags are plain text
    assert "--tags special" in capsys.readouterr().err
    missing = ["--out", str(tmp_path / "no" / "such" / "dir.jsonl")]
    assert main([*args, *missing]) == 2
    assert "its folder does not exist" in capsys.readouterr().err


def test_sample_cli_resume_refuses_data_whose_ids_name_other_problems(
    problems, tmp_path, tokenizers, capsys
):
    """Ids that are line numbers: a problem added at the top of the data file shifts them, and
    the rerun skipped the new problem as done. Each logged outcome holds its problem's key, so
    the rerun is refused."""
    from npr_graph.cli import main

    model_dir = tmp_path / "tiny"
    make_model(tokenizers["text"]).save_pretrained(model_dir)
    tokenizers["text"].save_pretrained(model_dir)
    out = tmp_path / "accepted.jsonl"
    args = ["sample", "--data", str(problems), "--out", str(out), "--model", str(model_dir),
            "--tries", "1", "--max-new-tokens", "4", "--device", "cpu"]  # fmt: skip
    assert main([*args, "--limit", "2"]) == 0
    assert main(args) == 0, "the problems after the first two are new"
    lines = problems.read_text().splitlines()
    problems.write_text(
        "\n".join([json.dumps({"problem": "What is 9+9?", "answer": "18"}), *lines])
    )
    capsys.readouterr()
    assert main(args) == 2
    assert "are not the ones" in capsys.readouterr().err.replace("\n", "")


def test_sample_cli_refuses_bad_settings_before_writing_anything(problems, tmp_path, capsys):
    from npr_graph.cli import main

    args = ["sample", "--data", str(problems), "--out", str(tmp_path / "out.jsonl"),
            "--model", str(tmp_path / "no-model")]  # fmt: skip
    for limit in ("0", "-1"):
        assert main([*args, "--limit", limit]) == 2
        assert f"--limit must be >= 1, got {limit}" in capsys.readouterr().err
    assert main([*args, "--batch", "0"]) == 2
    assert "--batch must be >= 1, got 0" in capsys.readouterr().err
    assert main([*args, "--reward", "acuracy"]) == 2
    assert "unknown reward 'acuracy'; known: accuracy," in capsys.readouterr().err
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    assert main([*args[:2], str(empty), *args[3:]]) == 2
    # rich wraps at a space or inside a long path, depending on the temporary path's length
    err = "".join(capsys.readouterr().err.split())
    assert "empty.json:noproblemstosample" in err
    assert not list(tmp_path.glob("out*"))


def test_sample_settings_name_the_model_and_prompt_files_wherever_a_run_starts(
    tmp_path, monkeypatch
):
    """A relative --model or --prompt names another file in another working directory: the
    settings a rerun must match hold absolute paths (a resume from elsewhere mixed models)."""
    from npr_graph.cli import build_parser
    from papo.cli import _sample_settings

    def settings(*extra):
        argv = ["sample", "--data", str(tmp_path / "d.jsonl"), "--out", "o.jsonl", *extra]
        return _sample_settings(build_parser().parse_args(argv), "npr")

    monkeypatch.chdir(tmp_path)
    here = settings("--model", "ckpt", "--prompt", "t.txt")
    assert (here["model"], here["prompt"]) == (str(tmp_path / "ckpt"), str(tmp_path / "t.txt"))
    assert (settings()["model"], settings()["prompt"]) == (None, "npr")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    assert settings("--model", "ckpt", "--prompt", "t.txt") != here
    assert settings("--model", "../ckpt", "--prompt", "../t.txt") == here


def test_sample_ranks_stop_together_and_only_a_failing_rank_says_why():
    """A failure on any rank stops every rank (exit code 2); only the rank that failed prints
    its error, so no rank reports another's failure under its own name."""
    from types import SimpleNamespace

    from papo.cli import _SampleJob, _Stop

    job = _SampleJob.__new__(_SampleJob)
    job.ranks = SimpleNamespace(any_failed=lambda failed: True)  # another rank failed
    with pytest.raises(_Stop) as quiet:
        job._agree(None)
    assert quiet.value.args == ()
    with pytest.raises(_Stop, match="^disk full; resume$"):
        job._agree("disk full", "; resume")
    job.ranks = SimpleNamespace(any_failed=lambda failed: failed)
    job._agree(None)  # none failed: nothing happens


def test_sample_cli_a_reward_that_refuses_a_problem_is_an_error(
    problems, tmp_path, tokenizers, monkeypatch, capsys
):
    """A reward of one's own (``--reward module:function``) that raises a ValueError stops the
    run with its message and exit code 2, keeping the problems done before it."""
    from npr_graph.cli import main
    from papo.rejection import progress_path

    model_dir = tmp_path / "tiny"
    make_model(tokenizers["text"]).save_pretrained(model_dir)
    tokenizers["text"].save_pretrained(model_dir)
    (tmp_path / "picky.py").write_text(
        "from papo.rewards import Reward\n\n"
        "def reward(response, reference, **options):\n"
        "    if reference == '8':\n"
        "        raise ValueError('cannot grade against 8')\n"
        "    return Reward(0.0, False, None, None, True)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out.jsonl"
    args = ["sample", "--data", str(problems), "--out", str(out), "--model", str(model_dir),
            "--tries", "2", "--max-new-tokens", "4", "--batch", "1", "--reward", "picky:reward"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.replace("\n", "")
    assert "cannot grade against 8; the problems written so far are kept" in err
    logged = [json.loads(line) for line in progress_path(out).read_text().splitlines()[1:]]
    assert [outcome["id"] for outcome in logged] == ["0"]


def test_sample_cli_batch_sets_the_problems_decoding_at_once(
    problems, tmp_path, tokenizers, monkeypatch, capsys
):
    """``--batch`` problems decode at once; the same command again resumes the run: nothing
    is left to sample, and the report is the whole run's. Other settings are refused."""
    from npr_graph.cli import main
    from npr_graph.engine.engine import Engine

    model_dir = tmp_path / "tiny"
    make_model(tokenizers["text"]).save_pretrained(model_dir)
    tokenizers["text"].save_pretrained(model_dir)
    calls = []
    generate = Engine.generate

    seeds = []

    def counted(self, prompts, params, *args, **kwargs):
        calls.append((len(prompts), kwargs["max_running"]))
        seeds.append([p.seed for p in params])
        return generate(self, prompts, params, *args, **kwargs)

    monkeypatch.setattr(Engine, "generate", counted)
    args = ["sample", "--data", str(problems), "--out", str(tmp_path / "a.jsonl"), "--model",
            str(model_dir), "--tries", "2", "--limit", "3", "--max-new-tokens", "4"]  # fmt: skip
    assert main(args) == 0 and calls == [(3, 8)]
    assert seeds == [[0, 1, 2]], "each problem samples with the seed plus its index"
    report = capsys.readouterr().out
    assert json.loads(report)["problems"] == 3
    calls.clear()
    assert main(args) == 0 and calls == [], "a rerun resumes: nothing is left to sample"
    assert capsys.readouterr().out == report
    assert main([*args, "--seed", "1"]) == 2 and calls == []
    assert "other settings (seed 0 -> 1)" in capsys.readouterr().err.replace("\n", "")
    other = [*args[:4], str(tmp_path / "b.jsonl"), *args[5:]]
    assert main([*other, "--batch", "2"]) == 0 and calls == [(3, 2)]

    import papo.rejection as rejection

    fsync, logged = rejection.os.fsync, []

    def full_disk(fd):  # the second problem's progress line is written, its fsync fails
        logged.append(fd)
        if len(logged) == 2:
            raise OSError(28, "No space left on device")
        fsync(fd)

    monkeypatch.setattr(rejection.os, "fsync", full_disk)
    full = [*args[:4], str(tmp_path / "c.jsonl"), *args[5:]]
    assert main(full) == 2
    err = capsys.readouterr().err.replace("\n", "")
    assert "No space left on device; the problems written so far are kept" in err
    monkeypatch.setattr(rejection.os, "fsync", fsync)
    calls.clear()
    assert main(full) == 0 and calls == [(1, 8)], "the rerun samples what was not logged"
    assert json.loads(capsys.readouterr().out)["problems"] == 3

    seeds.clear()  # a resumed problem keeps its seed: the seed plus its place in the data
    limited = [*args[:4], str(tmp_path / "d.jsonl"), *args[5:]]
    assert main([*limited[:-4], "--limit", "1", *limited[-2:]]) == 0
    assert main(limited) == 0 and seeds == [[0], [1, 2]]


def test_train_and_sample_cli_print_errors_literally(tmp_path, capsys):
    """Error text quotes file names and data (a problem id, a path): rich markup in it is shown,
    neither applied nor a MarkupError."""
    from npr_graph.cli import main

    (tmp_path / "[").mkdir()  # so that paths can hold "[/b]"
    data = tmp_path / "[/b]problems.jsonl"
    problem = json.dumps({"id": "[/b]", "problem": "1+1?", "answer": "2"}) + "\n"
    data.write_text(problem * 2)
    args = ["sample", "--data", str(data), "--out", str(tmp_path / "out.jsonl"),
            "--model", str(tmp_path / "no-model")]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.replace("\n", "")
    assert "duplicate id '[/b]'" in err and "using" not in err, "the run stops: nothing is used"
    assert main(["train", "sft", "--set", f"data={tmp_path / '[/x]missing.jsonl'}"]) == 2
    assert "[/x]missing.jsonl" in capsys.readouterr().err.replace("\n", "")


@pytest.mark.parametrize(
    ("options", "grammar"),
    [([], "npr"), (["--prompt", "multiverse"], "multiverse"),
     (["--prompt", "multiverse", "--grammar", "npr"], "npr"),
     (["--prompt", "MULTIVERSE_FILE", "--no-chat"], "multiverse")],
)  # fmt: skip
def test_sample_cli_decodes_the_grammar_of_its_prompt(options, grammar, problems, tmp_path,
                                                      tokenizers, monkeypatch):  # fmt: skip
    """The prompt's format is decoded and checked, a template file's read from its tags (as
    npr eval reads it); ``--no-chat`` samples the raw prompt."""
    import papo.rejection
    from npr_graph.cli import main
    from npr_graph.prompts import load_template

    model_dir = tmp_path / "tiny"
    make_model(tokenizers["text"]).save_pretrained(model_dir)
    tokenizers["text"].save_pretrained(model_dir)
    own = tmp_path / "my_multiverse.txt"
    own.write_text(load_template("multiverse").text)
    options = [str(own) if option == "MULTIVERSE_FILE" else option for option in options]
    seen = []

    def recording(engine, problems, template, params, **kwargs):
        seen.append((engine.grammar, engine.format.tags.opener, kwargs["chat"]))
        return [], papo.rejection.SamplingReport()

    monkeypatch.setattr(papo.rejection, "rejection_sample", recording)
    args = ["sample", "--data", str(problems), "--out", str(tmp_path / "out.jsonl"),
            "--model", str(model_dir), "--device", "cpu", *options]  # fmt: skip
    assert main(args) == 0
    opener = "<Parallel>" if grammar == "multiverse" else "<guideline>"
    assert seen == [(grammar, opener, False if "--no-chat" in options else None)]


def test_trainer_device_is_validated(traces, tmp_path, tokenizers):
    tok = tokenizers["special"]
    with pytest.raises(ValueError, match="device must be cpu, cuda or cuda:N"):
        load_config(None, "sft", dict(data=str(traces), output_dir=str(tmp_path), device="tpu"))
    config = load_config(
        None, "sft", dict(data=str(traces), output_dir=str(tmp_path), device="cpu", steps=1)
    )
    run = Trainer(config, model=make_model(tok), tokenizer=tok)
    assert run.device == torch.device("cpu") and run.engine.device == torch.device("cpu")
    if not torch.cuda.is_available():
        config.device = "cuda:0"
        with pytest.raises(ValueError, match="CUDA is not available"):
            Trainer(config, model=make_model(tok), tokenizer=tok)


def test_train_cli_error_names_its_rank_under_torchrun(tmp_path, capsys, monkeypatch):
    """Under torchrun every rank prints its error: each says which rank it is."""
    from npr_graph.cli import main

    missing = tmp_path / "missing.jsonl"
    assert main(["train", "sft", "--set", f"data={missing}"]) == 2
    assert "rank" not in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["train", "sft", "--set", f"data={missing}"]) == 2
    assert capsys.readouterr().err.startswith("error: rank 1: ")
