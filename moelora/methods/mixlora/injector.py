"""Adds a MixLoRA adapter: LoRA on the attention linears, a MoE of LoRA experts on every FFN."""
from __future__ import annotations

from ...architectures import actual_names
from ..bdlora.layer import BdLoraAdapter
from ..lora.injector import add_lora_linears
from ..sites import linear_site
from ..sites import ffn_site
from .layer import MixLoraAdapter


def inject_mixlora(model, layers, spec, name: str, cfg, state) -> None:
    experts = tuple(actual_names(spec.mlp, cfg.expert_target_modules))
    for i, layer in enumerate(layers):
        if cfg.nblocks > 1:  # block-diagonal attention LoRA: B on q/k/v (column), A on o (row)
            attn, done = getattr(layer, spec.attn_attr), set()
            for logical in cfg.attention_target_modules:
                attr = spec.attn[logical]
                if attr not in done:
                    done.add(attr)
                    site = linear_site(attn, attr, state)
                    site.adapters[name] = BdLoraAdapter(site.base_layer, cfg, "row" if logical == "o_proj" else "column")
        else:
            add_lora_linears(layer, spec, name, cfg, state, cfg.attention_target_modules)
        ffn = ffn_site(layer, i, spec, state)
        adapter = MixLoraAdapter(ffn, cfg, experts)
        adapter.adapter_name = name
        ffn.adapters[name] = adapter
