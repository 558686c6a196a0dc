"""Finding or creating the adapted module at a target: shared by every method's injector.

A target linear is wrapped in an ``AdaptedLinear`` the first time an adapter targets it; later
adapters add themselves to its ``adapters``. A MixLoRA adapter wraps the MLP in an
``AdaptedFFN`` the same way; linears inside an MLP are found through it.
"""
from __future__ import annotations

import torch.nn as nn

from ..architectures import ArchSpec, mlp_roles
from ..layers.adapted import AdaptedFFN, AdaptedLinear, AdapterRouters


def mlp_of(layer: nn.Module, spec: ArchSpec) -> nn.Module:
    """The layer's MLP module whose attributes are the projections (inside an AdaptedFFN)."""
    mlp = getattr(layer, spec.mlp_attr)
    return mlp.base_layer if isinstance(mlp, AdaptedFFN) else mlp


def linear_site(parent: nn.Module, attr: str, state) -> AdaptedLinear:
    cur = getattr(parent, attr)
    if isinstance(cur, AdaptedLinear):
        return cur
    site = AdaptedLinear(cur, state)
    state.originals.append((parent, attr, cur))
    setattr(parent, attr, site)
    return site


def ffn_site(layer: nn.Module, layer_idx: int, spec: ArchSpec, state) -> AdaptedFFN:
    cur = getattr(layer, spec.mlp_attr)
    if isinstance(cur, AdaptedFFN):
        return cur
    site = AdaptedFFN(cur, layer_idx, state, mlp_roles(spec), spec.act_attr)
    state.originals.append((layer, spec.mlp_attr, cur))
    setattr(layer, spec.mlp_attr, site)
    return site


def router_site(first_layer: nn.Module, state) -> AdapterRouters:
    cur = getattr(first_layer, "router", None)
    if isinstance(cur, AdapterRouters):
        return cur
    if cur is not None:
        raise ValueError("the first decoder layer already has a 'router' attribute that moelora did not add")
    site = AdapterRouters(state)
    state.originals.append((first_layer, "router", None))  # remove_adapter deletes it again
    first_layer.router = site
    return site
