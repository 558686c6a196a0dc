"""Adds a block-diagonal LoRA adapter to every target linear (role from the config)."""
from __future__ import annotations

from ..sites import linear_site, mlp_of
from .layer import BdLoraAdapter


def inject_bdlora(model, layers, spec, name: str, cfg, state) -> None:
    for layer in layers:
        for parent, mapping in ((getattr(layer, spec.attn_attr), spec.attn), (mlp_of(layer, spec), spec.mlp)):
            done = set()
            for logical in cfg.target_modules:
                attr = mapping.get(logical)
                if attr is None or attr in done:
                    continue
                done.add(attr)  # a fused projection (Phi-3's qkv_proj) is adapted once, with its first role
                site = linear_site(parent, attr, state)
                site.adapters[name] = BdLoraAdapter(site.base_layer, cfg, cfg.role(logical))
