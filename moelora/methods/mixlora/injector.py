"""Adds a MixLoRA adapter: LoRA on the attention linears, a MoE of LoRA experts on every FFN."""
from __future__ import annotations

from ...architectures import actual_names
from ..lora.injector import add_lora_linears
from ..sites import ffn_site
from .layer import MixLoraAdapter


def inject_mixlora(model, layers, spec, name: str, cfg, state) -> None:
    experts = tuple(actual_names(spec.mlp, cfg.expert_target_modules))
    for i, layer in enumerate(layers):
        add_lora_linears(layer, spec, name, cfg, state, cfg.attention_target_modules)
        ffn = ffn_site(layer, i, spec, state)
        adapter = MixLoraAdapter(ffn, cfg, experts)
        adapter.adapter_name = name
        ffn.adapters[name] = adapter
