"""Shared test fixtures: tiny random models of every supported architecture (CPU, fp32)."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"]


def make_tiny(arch: str = "llama", seed: int = 0, vocab: int = 61, hidden: int = 24, inter: int = 37,
              layers: int = 2, heads: int = 4, kv_heads: int = 2):
    """A tiny random causal LM with GQA and odd sizes (CPU, fp32, eval mode)."""
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128)
    cls = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM), "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
        "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM), "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM),
        "gemma3_text": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM), "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM),
    }[arch]
    if arch.startswith("gemma") or arch == "qwen3":
        common["head_dim"] = hidden // heads
    if arch == "phi3":
        common["pad_token_id"] = 0
    torch.manual_seed(seed)
    model = cls[1](cls[0](**common)).eval()
    return model


def randomize_adapter_(model, seed: int = 0, scale: float = 0.3) -> None:
    """Give every adapter tensor non-zero random values (B starts at zero after init)."""
    import moelora

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if moelora.inject.is_adapter_parameter(name):
                p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture
def tiny_llama():
    return make_tiny("llama")
