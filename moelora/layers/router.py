"""Token routers and the load-balance loss (docs/design.md §1).

Everything here has static shapes and no host synchronisation, so a decode step that routes
can be captured in a CUDA graph. The "dynamic" (top-p) strategy keeps K = E slots and zeroes
the weights of the dropped experts instead of changing the shape.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import _private


class Routing(NamedTuple):
    weights: torch.Tensor  # (N, K) fp32 mixing weights of the selected experts (0 = not used)
    experts: torch.Tensor  # (N, K) int64 expert ids
    probs: torch.Tensor  # (N, E) fp32 softmax over all experts
    selected: torch.Tensor | None  # (N, K) bool: slot counts as "routed" for f_e; None = all


def route(
    logits: torch.Tensor,
    strategy: str = "topk",
    top_k: int = 2,
    top_p: float = 0.8,
    capacity_factor: float = 1.0,
    token_mask: torch.Tensor | None = None,
) -> Routing:
    """Select experts from router logits (N, E).

    topk: top-k of softmax(logits), weights renormalised to sum 1 (MixLoRA / Mixtral).
    dynamic: experts in decreasing probability until the cumulative probability reaches top_p
      (the expert that crosses it is kept), weights renormalised over the kept ones.
    switch: top-1 with capacity ceil(capacity_factor * n_tokens / E); weight = its probability
      (Switch Transformer); tokens over capacity get weight 0 (frozen path only).
    """
    probs = torch.softmax(logits.float(), dim=-1)  # (N, E)
    n_experts = probs.shape[-1]
    if strategy == "topk":
        w, idx = torch.topk(probs, top_k, dim=-1)  # (N, K)
        w = w / w.sum(dim=-1, keepdim=True)
        return Routing(w, idx, probs, None)
    if strategy == "dynamic":
        p_sorted, idx = torch.sort(probs, dim=-1, descending=True)  # (N, E)
        before = torch.cumsum(p_sorted, dim=-1) - p_sorted  # mass of the experts ranked higher
        keep = before < top_p  # the first expert is always kept (before == 0)
        w = torch.where(keep, p_sorted, torch.zeros_like(p_sorted))
        w = w / w.sum(dim=-1, keepdim=True)
        return Routing(w, idx, probs, keep)
    if strategy == "switch":
        p1, idx = torch.max(probs, dim=-1, keepdim=True)  # (N, 1)
        onehot = F.one_hot(idx[:, 0], n_experts)  # (N, E)
        if token_mask is not None:
            onehot = onehot * token_mask.view(-1, 1).to(onehot.dtype)
            n_tok = token_mask.sum()
        else:
            n_tok = torch.tensor(probs.shape[0], device=probs.device)
        capacity = torch.ceil(capacity_factor * n_tok / n_experts)
        position = (torch.cumsum(onehot, dim=0) * onehot).sum(-1, keepdim=True)  # 1-based slot in its expert
        fits = position <= capacity
        w = torch.where(fits, p1, torch.zeros_like(p1))
        return Routing(w, idx, probs, None)
    raise ValueError(f"unknown routing strategy {strategy!r}; use 'topk', 'dynamic' or 'switch'")


def load_balance_terms(
    routing: Routing, token_mask: torch.Tensor | None, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sums behind f_e and P_e over non-pad tokens: (routed counts (E,), prob sums (E,), n_tokens).

    Returned as sums (not means) so that callers can pool them over layers exactly. A routing
    stacked over layers ((L, N, K) experts, (L, N, E) probs; one (N,) token mask for all) gives
    (L, E) counts and prob sums: every layer's terms in one pass (``hooks.aux_loss_from_records``)."""
    counts = F.one_hot(routing.experts, num_experts).to(torch.float32)  # (..., N, K, E)
    if routing.selected is not None:
        counts = counts * routing.selected.unsqueeze(-1)
    counts = counts.sum(-2)  # (..., N, E)
    probs = routing.probs
    if token_mask is not None:
        m = token_mask.reshape(-1, 1).to(torch.float32)
        counts, probs, n = counts * m, probs * m, m.sum()
    else:
        n = torch.tensor(float(probs.shape[-2]), device=probs.device)
    return counts.sum(-2), probs.sum(-2), n


def load_balance_loss(
    counts: torch.Tensor, prob_sums: torch.Tensor, n_tokens: torch.Tensor, num_experts: int
) -> torch.Tensor:
    """E * sum_e f_e * P_e (Switch Transformer eq. 4, Mixtral form: f summed over the K slots).

    Equals K under perfectly balanced routing; multiply by the coefficient outside. (L, E) sums
    (``load_balance_terms`` of a routing stacked over layers) give the (L,) per-layer losses."""
    n = n_tokens.clamp_min(1.0)
    return num_experts * ((counts / n) * (prob_sums / n)).sum(-1)


class TopKRouter(_private.Float32Params):
    """fp32 linear router W_g (E, D), init N(0, init_range^2), with optional training-only jitter."""

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int = 2,
        strategy: str = "topk",
        top_p: float = 0.8,
        capacity_factor: float = 1.0,
        init_range: float = 0.02,
        jitter_noise: float = 0.0,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        # fp32 even in bf16 models, also after model.half() / .to(bf16) (Float32Params): the
        # softmax/top-k decision is sensitive to rounding.
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=torch.float32, device=device))
        nn.init.normal_(self.weight, std=init_range)
        self.num_experts, self.top_k, self.strategy = num_experts, top_k, strategy
        self.top_p, self.capacity_factor, self.jitter_noise = top_p, capacity_factor, jitter_noise

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> Routing:
        x = x.float()  # (N, D)
        if self.training and self.jitter_noise > 0:
            # Out of place: the caller's hidden states (and the expert inputs) stay exact.
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        logits = F.linear(x, self.weight.float())  # (N, E); fp32 also after model.to(dtype)
        return route(logits, self.strategy, self.top_k, self.top_p, self.capacity_factor, token_mask)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, top_k={self.top_k}, strategy={self.strategy}"


def routing_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Per-token entropy (nats) of the router distribution, (N,)."""
    return -(probs * torch.log(probs.clamp_min(1e-20))).sum(-1)


def max_entropy(num_experts: int) -> float:
    return math.log(num_experts)
