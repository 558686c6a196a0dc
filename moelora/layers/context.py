"""State shared by the routed layers of one model during a forward pass.

Hugging Face decoder layers do not pass the attention mask to the MLP, yet the load-balance
loss must ignore padding. A forward pre-hook on the top model stores the mask here, and every
routed layer reads the slice that matches its own tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .router import Routing


@dataclass
class LayerRouting:
    """What one routed layer decided in the last forward (kept for the aux loss and analysis)."""

    layer: int
    routing: Routing
    token_mask: torch.Tensor | None  # (N,) bool, True = real token
    num_experts: int


@dataclass
class RoutingContext:
    attention_mask: torch.Tensor | None = None
    has_labels: bool = False
    last: dict[int, LayerRouting] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    past_tokens: int = 0  # tokens already in the forward's dynamic KV cache (0: prefill or unknown)
    disabled: bool = False  # inside moelora.disable_adapter: the hooks do nothing, the base modules run
    _mask_cache: tuple | None = field(default=None, repr=False)  # (attention_mask, (B, T), mask)

    def token_mask_for(self, batch: int, seq: int) -> torch.Tensor | None:
        """(batch*seq,) bool mask of the current tokens, or None when there is no padding info.

        During cached decoding the mask covers past + new tokens; the new ones are the last `seq`.
        Computed once per forward (three launches), not once per routed layer."""
        am = self.attention_mask
        if am is None or am.dim() != 2 or am.shape[0] != batch or am.shape[1] < seq:
            return None
        c = self._mask_cache
        if c is not None and c[0] is am and c[1] == (batch, seq):
            return c[2]
        mask = am[:, am.shape[1] - seq :].reshape(-1).bool()
        self._mask_cache = (am, (batch, seq), mask)
        return mask

    def cached_decode_step(self) -> bool:
        """Whether this forward decodes on top of cached tokens (``past_tokens > 0``, set from the
        forward's KV cache by inject's pre-hook). The eager decode graphs (``decode_graphs``)
        apply only then, never to a prefill, whose outputs a KV cache may keep by reference."""
        return self.past_tokens > 0

    def record(self, layer: int, routing: Routing, token_mask: torch.Tensor | None, num_experts: int) -> None:
        if torch.compiler.is_compiling() and not (torch.is_grad_enabled() or self.has_labels):
            # Compiled inference keeps no routing records (router_statistics() stays empty): under
            # CUDA graphs (mode="reduce-overhead", HF's static cache) the routing tensors are graph
            # outputs that the next replay overwrites, so a record kept past its step would be
            # stale, and live outputs constrain how cudagraph trees may replay.
            return
        self.last[layer] = LayerRouting(layer, routing, token_mask, num_experts)

    def end_compiled_step(self) -> None:
        """Drop step-local tensors held on Python objects (see ``record``); compiled inference only."""
        state = self.extras.get("switch")
        if state is not None:
            state.experts = state.weights = None
