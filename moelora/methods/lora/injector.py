"""Adds a plain LoRA adapter to every target linear of every decoder layer."""
from __future__ import annotations

from ...architectures import actual_names
from ..sites import linear_site, mlp_of
from .layer import LoraAdapter


def lora_adapter_for(site, cfg) -> LoraAdapter:
    return LoraAdapter(site.base_layer, cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.use_rslora,
                       cfg.init_lora_weights, cfg.adapter_dtype)


def add_lora_linears(layer, spec, name: str, cfg, state, attention: tuple, mlp: tuple = ()) -> None:
    """LoRA ``cfg`` on the named attention / MLP linears of one decoder layer (also MixLoRA's attention)."""
    attn = getattr(layer, spec.attn_attr)
    for attr in actual_names(spec.attn, attention):
        site = linear_site(attn, attr, state)
        site.adapters[name] = lora_adapter_for(site, cfg)
    mlp_mod = mlp_of(layer, spec)
    for attr in actual_names(spec.mlp, mlp):
        site = linear_site(mlp_mod, attr, state)
        site.adapters[name] = lora_adapter_for(site, cfg)


def inject_lora(model, layers, spec, name: str, cfg, state) -> None:
    for layer in layers:
        add_lora_linears(layer, spec, name, cfg, state, cfg.target_modules, cfg.target_modules)
