"""Adds a LoRA-Switch adapter: N LoRA experts on every target linear, one router at layer 0."""
from __future__ import annotations

from ...architectures import actual_names
from ...layers.router import TopKRouter
from ..sites import linear_site, mlp_of, router_site
from .layer import LoraSwitchAdapter, SwitchState, route_first_layer


def inject_lora_switch(model, layers, spec, name: str, cfg, state) -> None:
    switch = SwitchState(cfg.switch_mode)
    for layer in layers:
        for parent, mapping in ((getattr(layer, spec.attn_attr), spec.attn), (mlp_of(layer, spec), spec.mlp)):
            for attr in actual_names(mapping, cfg.target_modules):
                site = linear_site(parent, attr, state)
                adapter = LoraSwitchAdapter(site.base_layer, cfg, name)
                site.adapters[name] = adapter
                switch.linears.append((site, adapter))
    first = layers[0]
    routers = router_site(first, state)
    if state.switch_hook is None:  # the first LoRA-Switch adapter installs the routing hook
        state.switch_hook = first.register_forward_pre_hook(route_first_layer, with_kwargs=True)
    routers.adapters[name] = TopKRouter(model.config.hidden_size, cfg.num_experts, cfg.top_k, "topk",
                                        init_range=cfg.router_init_range, jitter_noise=cfg.jitter_noise,
                                        device=next(first.parameters()).device)
    state.switch[name] = switch
