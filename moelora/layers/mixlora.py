"""MixLoRA FFN: a sparse MoE of LoRA experts that share one frozen FFN (arXiv 2404.15159 §3).

Expert j is the frozen FFN with its own LoRA deltas: E_j(x) = W2ʲ(act(W1ʲx) ⊙ W3ʲx), Wʲ = W + ΔW_j.
Output y = Σ_{j∈S} w_j E_j(x). Two implementations of the same function:

- ``eager``: loops over experts with data-dependent indexing, like the reference code. It is the
  ground truth that every fast path is tested against.
- ``fused``: static shapes and no host sync. The frozen W1x, W3x are computed once; the selected
  experts' deltas are gathered per token; and because W2 is linear, the frozen down projection
  is applied once to Σ_j w_j h_j instead of once per expert (K× fewer big GEMMs than the reference).
"""
from __future__ import annotations


import torch
import torch.nn as nn

from . import decode_graphs
from .context import RoutingContext
from .dispatch import decode_kernels_apply
from .experts import LoraExperts
from .router import Routing, TopKRouter


# Activation modules of transformers.activations that the fused decode kernel implements.
_ACT_NAMES = {"SiLUActivation": "silu", "SiLU": "silu", "GELUTanh": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh",
              "NewGELUActivation": "gelu_tanh", "GELUActivation": "gelu", "GELU": "gelu"}


class MixLoraFFN(nn.Module):
    """Replaces a decoder layer's MLP. ``proj_names`` maps roles to the base MLP's attributes:
    gated MLPs use gate/up/down; Phi-3 uses a fused gate_up projection ('gate_up')."""

    def __init__(
        self,
        base_mlp: nn.Module,
        layer_idx: int,
        cfg,
        context: RoutingContext,
        proj_names: dict[str, str],
        act_attr: str,
        expert_projs: tuple[str, ...],
    ) -> None:
        super().__init__()
        self.base_layer = base_mlp
        self.layer_idx = layer_idx
        self.proj_names = dict(proj_names)  # role -> attribute, roles: gate, up, gate_up, down
        self.act_fn = getattr(base_mlp, act_attr)
        self.act_name = _ACT_NAMES.get(type(self.act_fn).__name__)  # None: no fused decode kernel
        self.fused_gate_up = "gate_up" in proj_names
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.strategy = cfg.routing_strategy
        self.backend = cfg.expert_backend
        self._context = context  # plain attribute: shared, not a submodule
        down = getattr(base_mlp, proj_names["down"])
        hidden = down.out_features
        self.router = TopKRouter(
            hidden, cfg.num_experts, cfg.top_k, cfg.routing_strategy, cfg.top_p,
            cfg.capacity_factor, cfg.router_init_range, cfg.jitter_noise, device=down.weight.device,
        )
        self.experts = nn.ModuleDict()
        for attr in expert_projs:  # attribute names of the base MLP that get expert LoRAs
            self.experts[attr] = LoraExperts(
                getattr(base_mlp, attr), cfg.num_experts, cfg.r, cfg.scaling,
                cfg.lora_dropout, cfg.init_lora_weights, cfg.adapter_dtype,
            )

    # ---- helpers -------------------------------------------------------------------------
    def _proj(self, role: str) -> nn.Linear:
        return getattr(self.base_layer, self.proj_names[role])

    def _expert(self, role: str) -> LoraExperts | None:
        name = self.proj_names.get(role)
        return self.experts[name] if name in self.experts else None

    def _in_roles(self) -> tuple[str, ...]:
        return ("gate_up",) if self.fused_gate_up else ("gate", "up")

    def _activate(self, pre: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.fused_gate_up:
            gate, up = pre["gate_up"].chunk(2, dim=-1)  # Phi-3 order: gate first
            return up * self.act_fn(gate)
        return self.act_fn(pre["gate"]) * pre["up"]

    def _use_fused(self, x: torch.Tensor) -> bool:
        if self.backend == "auto":
            return x.is_cuda
        return self.backend == "fused"

    # ---- forward -------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        B, T, D = hidden_states.shape
        x = hidden_states.reshape(B * T, D)  # (N, D)
        mask = self._context.token_mask_for(B, T)
        fused = self._use_fused(x)
        if fused and self._decode_kernel_applies(x):
            if decode_graphs.applies(x, self._context):
                # Eager decode step: the whole FFN replayed as one CUDA graph (decode_graphs).
                y, routing = decode_graphs.graphed(self, self.forward_decode, (x,), self._decode_params())
            else:
                y, routing = self.forward_decode(x)  # router fused into the kernel
        else:
            routing = self.router(x, mask)
            y = self.forward_fused(x, routing) if fused else self.forward_eager(x, routing)
        self._context.record(self.layer_idx, routing, mask, self.num_experts)
        return y.view(B, T, D)

    def forward_eager(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Reference semantics: per expert, slice its tokens and run the full expert on them."""
        base_pre = {role: self._proj(role)(x) for role in self._in_roles()}  # frozen, once
        down = self._proj("down")
        out = torch.zeros(x.shape[0], down.out_features, dtype=torch.float32, device=x.device)
        active = routing.weights != 0  # dynamic/switch routing leaves zero-weight slots
        for e in range(self.num_experts):
            tok, slot = torch.where((routing.experts == e) & active)  # host sync: eager only
            if tok.numel() == 0:
                continue
            xe = x[tok]
            pre = {}
            for role in self._in_roles():
                lora = self._expert(role)
                pre[role] = base_pre[role][tok]
                if lora is not None:
                    pre[role] = pre[role] + lora.delta(e, xe).to(pre[role].dtype)
            h = self._activate(pre)
            y = down(h)
            lora = self._expert("down")
            if lora is not None:
                y = y + lora.delta(e, h).to(y.dtype)
            out.index_add_(0, tok, y.float() * routing.weights[tok, slot, None])
        if self.strategy == "switch":
            # Tokens over capacity (weight 0) keep the frozen FFN output.
            rest = (1.0 - routing.weights.sum(-1).detach()).clamp_min(0.0)  # (N,)
            frozen = down(self._activate(base_pre))
            out = out + frozen.float() * rest[:, None]
        return out.to(x.dtype)

    def _decode_kernel_applies(self, x: torch.Tensor) -> bool:
        """Inference on CUDA with few tokens, top-k routing, a gated MLP with gate/up experts."""
        return self._decode_capable and decode_kernels_apply(x, self)

    @property
    def _decode_capable(self) -> bool:
        # The static part of the test above (this runs on every decode step of every layer).
        cap = self.__dict__.get("_decode_capable_cache")
        if cap is None:
            cap = (not self.fused_gate_up and self.act_name is not None and self.strategy == "topk"
                   and self._expert("gate") is not None and self._expert("up") is not None)
            self.__dict__["_decode_capable_cache"] = cap
        return cap

    def _decode_params(self) -> tuple:
        """Everything ``forward_decode`` reads besides x: the key of its decode graphs."""
        eg, eu, ed = self._expert("gate"), self._expert("up"), self._expert("down")
        gate, up, down = self._proj("gate"), self._proj("up"), self._proj("down")
        out = [gate.weight, gate.bias, up.weight, up.bias, down.weight, down.bias, eg.lora_A, eg.lora_B, eu.lora_A,
               eu.lora_B, self.router.weight, self.top_k, eg.scaling, self.act_name]
        if ed is not None:
            out += [ed.lora_A, ed.lora_B, ed.scaling]
        return tuple(out)

    def forward_decode(self, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        """Decode: the frozen gate/up GEMMs, one kernel for router + gate/up deltas + activation +
        mix, the ONE frozen down GEMM and the down delta (vs ~30 launches unfused); under
        torch.compile the adapter kernels run beside the GEMMs (moelora_kernels.ops)."""
        from moelora_kernels import ops

        eg, eu, ed = self._expert("gate"), self._expert("up"), self._expert("down")
        gate, up, down = self._proj("gate"), self._proj("up"), self._proj("down")
        y, idx, w, probs = ops.mixlora_ffn_decode(
            x, gate.weight, gate.bias, up.weight, up.bias, down.weight, down.bias, eg.lora_A, eg.lora_B, eu.lora_A,
            eu.lora_B, None if ed is None else ed.lora_A, None if ed is None else ed.lora_B, self.router.weight,
            self.top_k, eg.scaling, eg.scaling if ed is None else ed.scaling, self.act_name)
        return y, Routing(w, idx, probs, None)

    def forward_fused(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Static-shape path: gathered deltas per (token, slot), one frozen down projection."""
        idx, w = routing.experts, routing.weights  # (N, K)
        pre = {}
        for role in self._in_roles():
            base = self._proj(role)(x).unsqueeze(1)  # (N, 1, F), frozen, once for all experts
            lora = self._expert(role)
            pre[role] = base + lora.gathered(x, idx).to(base.dtype) if lora is not None else base
        h = self._activate(pre)  # (N, K, F) or (N, 1, F) when no expert touches gate/up
        if h.shape[1] != idx.shape[1]:
            h = h.expand(-1, idx.shape[1], -1)
        wd = w.to(h.dtype).unsqueeze(-1)  # (N, K, 1)
        h_mix = (h * wd).sum(1)  # (N, F): Σ_j w_j h_j, so W2 runs once (linearity)
        if self.strategy == "switch":
            rest = (1.0 - w.sum(-1).detach()).clamp_min(0.0)
            frozen_h = self._activate({r: self._proj(r)(x) for r in self._in_roles()})
            h_mix = h_mix + frozen_h * rest.to(h.dtype)[:, None]
        y = self._proj("down")(h_mix)
        lora = self._expert("down")
        if lora is not None:
            y = y + lora.gathered(h, idx, weight=w).to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return f"layer={self.layer_idx}, experts={self.num_experts}, top_k={self.top_k}, backend={self.backend}"
