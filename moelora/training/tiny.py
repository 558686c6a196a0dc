"""The quickstart's base model: a tiny random Llama whose sizes come from the config.

Why the output head is rescaled: with HF's init (std 0.02) and a final RMSNorm, the logits of a
64-wide model are bounded by about 0.02 * d = +-1.3, so no adapter on the decoder layers can make
any answer confident (measured: the CE plateaus at ~4.0 of ln(101) = 4.6 and nothing is learned
in 600 steps). A trained LM's head is far larger; ``head_scale`` restores a usable logit range
while the base stays random and frozen.
"""
from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from moelora.models import build_tiny_model, char_tokenizer


def tiny_llama(
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_scale: float = 10.0,
    seed: int = 0,
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """``(model, tokenizer)``: ``moelora.models.build_tiny_model("llama", ...)`` with its output
    head multiplied by ``head_scale``, and the char-level tokenizer."""
    model = build_tiny_model(
        "llama", hidden_size=hidden_size, intermediate_size=intermediate_size, num_layers=num_layers,
        num_heads=num_heads, num_kv_heads=num_kv_heads, seed=seed,
    )
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(head_scale)
    return model, char_tokenizer()
