"""MixLoRA FFN: a sparse MoE of LoRA experts that share one frozen FFN (arXiv 2404.15159 §3).

Expert j is the frozen FFN with its own LoRA deltas: E_j(x) = W2ʲ(act(W1ʲx) ⊙ W3ʲx), Wʲ = W + ΔW_j.
Output y = Σ_{j∈S} w_j E_j(x). Two implementations of the same function:

- ``eager``: loops over experts with data-dependent indexing, like the reference code. It is the
  ground truth that every fast path is tested against.
- ``fused``: static shapes and no host sync. The frozen W1x, W3x are computed once; the selected
  experts' deltas are gathered per token; and because W2 is linear, the frozen down projection
  is applied once to Σ_j w_j h_j instead of once per expert (K× fewer big GEMMs than the reference).

``MixLoraAdapter`` holds one adapter's router and expert stacks; it lives in the ``adapters`` dict
of the ``AdaptedFFN`` (``moelora/layers/adapted.py``) that wraps the frozen MLP and provides the
frozen projections and the activation (``ffn`` below). In a batch that mixes adapters, the FFN
computes the frozen pre-activations once for all tokens and each MixLoRA adapter adds its
experts to its own tokens (``mix_hidden``: the fused math on a subset of rows).
"""
from __future__ import annotations


import torch
import torch.nn as nn

from ...layers import decode_graphs, mixture_hidden
from ...layers.dispatch import decode_kernels_apply, gathered_kernel_applies
from ...layers.experts import LoraExperts, _gathered_lora
# one home for the recomputing mixture, shared with the mixed-batch form (layers/adapted.py)
from ...layers.mix_recompute import _MixRecompute, recompute_applies
from ...layers.router import Routing, TopKRouter


class MixLoraAdapter(nn.Module):
    """One MixLoRA adapter of one FFN: its router and its LoRA expert stacks (by projection)."""

    kind = "mixlora"

    def __init__(self, ffn, cfg, expert_projs: tuple[str, ...]) -> None:
        super().__init__()
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.strategy = cfg.routing_strategy
        self.backend = cfg.expert_backend
        self.adapter_name: str | None = None  # set by the injector (the key of the routing records)
        down = ffn._proj("down")
        self.router = TopKRouter(
            down.out_features, cfg.num_experts, cfg.top_k, cfg.routing_strategy, cfg.top_p,
            cfg.capacity_factor, cfg.router_init_range, cfg.jitter_noise, device=down.weight.device,
        )
        self.experts = nn.ModuleDict()
        base_mlp = ffn.base_layer
        down_attr = ffn.proj_names["down"]
        nblocks = getattr(cfg, "nblocks", 1)
        for attr in expert_projs:  # attribute names of the base MLP that get expert LoRAs
            # block-diagonal experts: B on the column-parallel gate/up, A on the row-parallel down
            self.experts[attr] = LoraExperts(
                _frozen(getattr(base_mlp, attr)), cfg.num_experts, cfg.r, cfg.scaling,
                cfg.lora_dropout, cfg.init_lora_weights, cfg.adapter_dtype,
                nblocks=nblocks, block="A" if attr == down_attr else "B",
            )
        self.nblocks = nblocks

    def _expert(self, ffn, role: str) -> LoraExperts | None:
        name = ffn.proj_names.get(role)
        return self.experts[name] if name in self.experts else None

    def _use_fused(self, ffn, x: torch.Tensor) -> bool:
        if self.backend == "auto":
            # The eager loop draws dropout per expert, the fused math once per token (and slot):
            # an adapter with its own dropout stream trains in the fused layout, the one a mixed
            # batch uses, so that it draws the same masks alone and beside other adapters.
            return x.is_cuda or (self.training and self._own_dropout_stream(ffn))
        return self.backend == "fused"

    def _own_dropout_stream(self, ffn) -> bool:
        info = ffn._state.adapters.get(self.adapter_name)
        return info is not None and info.dropout_generator is not None

    # ---- forward -------------------------------------------------------------------------
    def forward_site(self, ffn, hidden_states: torch.Tensor) -> torch.Tensor:
        """The FFN output when every token of the batch uses this adapter."""
        B, T, D = hidden_states.shape
        x = hidden_states.reshape(B * T, D)  # (N, D)
        state = ffn._state
        mask = state.token_mask_for(B, T)
        fused = self._use_fused(ffn, x)
        if fused and self._decode_kernel_applies(ffn, x):
            if decode_graphs.applies(x, state):
                # Eager decode step: the whole FFN replayed as one CUDA graph (decode_graphs).
                y, routing = decode_graphs.graphed(self, lambda t: self.forward_decode(ffn, t), (x,),
                                                   self._decode_params(ffn))
            else:
                y, routing = self.forward_decode(ffn, x)  # router fused into the kernel
        else:
            routing = self.router(x, mask)
            y = self.forward_fused(ffn, x, routing) if fused else self.forward_eager(ffn, x, routing)
        state.record(self.adapter_name, ffn.layer_idx, routing, mask, self.num_experts)
        return y.view(B, T, D)

    def forward_eager(self, ffn, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Reference semantics: per expert, slice its tokens and run the full expert on them."""
        base_pre = {role: ffn._proj(role)(x) for role in ffn._in_roles()}  # frozen, once
        down = ffn._proj("down")
        out = torch.zeros(x.shape[0], down.out_features, dtype=torch.float32, device=x.device)
        active = routing.weights != 0  # dynamic/switch routing leaves zero-weight slots
        for e in range(self.num_experts):
            tok, slot = torch.where((routing.experts == e) & active)  # host sync: eager only
            if tok.numel() == 0:
                continue
            xe = x[tok]
            pre = {}
            for role in ffn._in_roles():
                lora = self._expert(ffn, role)
                pre[role] = base_pre[role][tok]
                if lora is not None:
                    pre[role] = pre[role] + lora.delta(e, xe).to(pre[role].dtype)
            h = ffn._activate(pre)
            y = down(h)
            lora = self._expert(ffn, "down")
            if lora is not None:
                y = y + lora.delta(e, h).to(y.dtype)
            out.index_add_(0, tok, y.float() * routing.weights[tok, slot, None])
        if self.strategy == "switch":
            # Tokens over capacity (weight 0) keep the frozen FFN output.
            rest = (1.0 - routing.weights.sum(-1).detach()).clamp_min(0.0)  # (N,)
            frozen = down(ffn._activate(base_pre))
            out = out + frozen.float() * rest[:, None]
        return out.to(x.dtype)

    def _decode_kernel_applies(self, ffn, x: torch.Tensor) -> bool:
        """Inference on CUDA with few tokens, top-k routing, a gated MLP with gate/up experts."""
        return self._decode_capable(ffn) and decode_kernels_apply(x, ffn)

    def _decode_capable(self, ffn) -> bool:
        # The static part of the test above (this runs on every decode step of every layer).
        cap = self.__dict__.get("_decode_capable_cache")
        if cap is None:
            cap = (not ffn.fused_gate_up and ffn.act_name is not None and self.strategy == "topk"
                   and self._expert(ffn, "gate") is not None and self._expert(ffn, "up") is not None)
            self.__dict__["_decode_capable_cache"] = cap
        return cap

    def _decode_params(self, ffn) -> tuple:
        """Everything ``forward_decode`` reads besides x: the key of its decode graphs."""
        eg, eu, ed = self._expert(ffn, "gate"), self._expert(ffn, "up"), self._expert(ffn, "down")
        gate, up, down = ffn._proj("gate"), ffn._proj("up"), ffn._proj("down")
        out = [gate.weight, gate.bias, up.weight, up.bias, down.weight, down.bias, eg.lora_A, eg.lora_B, eu.lora_A,
               eu.lora_B, self.router.weight, self.top_k, eg.scaling, ffn.act_name]
        if ed is not None:
            out += [ed.lora_A, ed.lora_B, ed.scaling]
        return tuple(out)

    def forward_decode(self, ffn, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        """Decode: the frozen gate/up GEMMs, one kernel for router + gate/up deltas + activation +
        mix, the ONE frozen down GEMM and the down delta (vs ~30 launches unfused); under
        torch.compile the adapter kernels run beside the GEMMs (moelora_kernels.ops)."""
        from moelora_kernels import ops

        eg, eu, ed = self._expert(ffn, "gate"), self._expert(ffn, "up"), self._expert(ffn, "down")
        gate, up, down = ffn._proj("gate"), ffn._proj("up"), ffn._proj("down")
        y, idx, w, probs = ops.mixlora_ffn_decode(
            # A()/B(): the dense stacks the kernel reads (the parameters themselves unless block-diagonal,
            # whose dense form is built here: inside the decode graph when one is captured)
            x, gate.weight, gate.bias, up.weight, up.bias, down.weight, down.bias, eg.A(), eg.B(), eu.A(),
            eu.B(), None if ed is None else ed.A(), None if ed is None else ed.B(), self.router.weight,
            self.top_k, eg.scaling, eg.scaling if ed is None else ed.scaling, ffn.act_name)
        return y, Routing(w, idx, probs, None)

    def mix_hidden(self, ffn, x: torch.Tensor, base_pre: dict, routing: Routing) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The fused math up to the frozen down projection, for tokens x (n, D) whose frozen
        pre-activations are ``base_pre``: (Σ_j w_j h_j (n, F), the down experts' delta (n, D) or None).

        In training it runs inside ``_MixRecompute``: autograd keeps only x, the frozen
        pre-activations (n, F), the routing (n, K) and the dropout masks (bool), and backward
        recomputes the (n, K, F) per-slot pre-activations, hiddens and deltas (rank-r GEMMs and
        elementwise ops) instead of storing them (issue 19: they were 5-6 (n, K, F) tensors, more
        than PEFT LoRA's whole layer)."""
        idx, w = routing.experts, routing.weights  # (n, K)
        roles = ffn._in_roles()
        loras = [self._expert(ffn, role) for role in roles] + [self._expert(ffn, "down")]
        stacks = []
        for lora in loras:
            stacks += [None, None] if lora is None else [lora.A(), lora.B()]
        # Dropout keep masks, drawn in the order the plain composition draws them (gate, up, down).
        keeps = [self._keep(lora, x.shape, x, ffn) for lora in loras[:-1]]
        n_down_in = ffn._proj("down").in_features
        keeps.append(self._keep(loras[-1], (x.shape[0], idx.shape[1], n_down_in), x, ffn))
        kernel = gathered_kernel_applies(x)
        # decided here, once: the backward recompute runs the same form even if it runs outside
        # the switch's scope (Lightning calls backward after training_step has returned)
        compiled = (roles == ("gate", "up") and self.strategy != "switch" and loras[0] is not None
                    and loras[1] is not None and mixture_hidden.applies(ffn.act_name))
        bases = [base_pre[role] for role in roles]
        nb, ns = len(bases), len(stacks)

        def run(x, idx, w, *rest):
            return self._mix_math(ffn, roles, loras, x, dict(zip(roles, rest[:nb])), idx, w,
                                  rest[nb:nb + ns], rest[nb + ns:], kernel, compiled)

        if not recompute_applies():
            return run(x, idx, w, *bases, *stacks, *keeps)
        h_mix, down_delta = _MixRecompute.apply(run, x, idx, w, *bases, *stacks, *keeps)
        return h_mix, (down_delta if loras[-1] is not None else None)

    def _keep(self, lora, shape, x, ffn) -> torch.Tensor | None:
        """The bool keep mask of ``lora``'s input dropout (``adapter_dropout``'s draw), or None."""
        if lora is None:
            return None
        drop = lora.lora_dropout
        p = getattr(drop, "p", 0.0)
        if not drop.training or p == 0.0:
            return None
        state = ffn._state
        keep = None
        if state is not None and self.adapter_name is not None:
            keep = state.dropout_keep(self.adapter_name, tuple(shape), torch.bool, x.device, p)
        if keep is None:  # torch's global RNG, drawn as F.dropout draws (same numbers consumed)
            return torch.nn.functional.dropout(x.new_ones(tuple(shape)), p, training=True) != 0
        return keep.bool()

    def _mix_math(self, ffn, roles, loras, x, base_pre, idx, w, stacks, keeps, kernel, compiled):
        """``mix_hidden``'s function of its tensors (what ``_MixRecompute`` runs twice)."""
        deltas = {}  # (n, K, F) per role with experts; x in its own dtype: _gathered_lora casts it
        for i, role in enumerate(roles):
            if loras[i] is not None:
                deltas[role] = _gathered_lora(_dropped(x, keeps[i]), stacks[2 * i], stacks[2 * i + 1], idx, None,
                                              _scaling(loras[i], keeps[i]), kernel)
        down = loras[-1]
        if compiled:
            # the elementwise middle as one compiled function (layers/mixture_hidden.py)
            h_mix, hd = mixture_hidden.compiled_hidden(base_pre["gate"], base_pre["up"], deltas["gate"], deltas["up"],
                                                       w, keeps[-1], ffn.act_name, down is not None)
        else:
            pre = {}
            for role in roles:
                base = base_pre[role].unsqueeze(1)  # (n, 1, F), frozen, once for all experts
                pre[role] = base + deltas[role].to(base.dtype) if role in deltas else base
            h = ffn._activate(pre)  # (n, K, F) or (n, 1, F) when no expert touches gate/up
            if h.shape[1] != idx.shape[1]:
                h = h.expand(-1, idx.shape[1], -1)
            wd = w.to(h.dtype).unsqueeze(-1)  # (n, K, 1)
            h_mix = (h * wd).sum(1)  # (n, F): Σ_j w_j h_j, so W2 runs once (linearity)
            if self.strategy == "switch":
                rest = (1.0 - w.sum(-1).detach()).clamp_min(0.0)
                h_mix = h_mix + ffn._activate(base_pre) * rest.to(h.dtype)[:, None]
            hd = None if down is None else _dropped(h, keeps[-1])
        if down is None:
            return h_mix, None
        return h_mix, _gathered_lora(hd, stacks[-2], stacks[-1], idx, w, _scaling(down, keeps[-1]), kernel)

    def forward_fused(self, ffn, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Static-shape path: gathered deltas per (token, slot), one frozen down projection."""
        base_pre = {role: ffn._proj(role)(x) for role in ffn._in_roles()}
        h_mix, down_delta = self.mix_hidden(ffn, x, base_pre, routing)
        y = ffn._proj("down")(h_mix)
        return y if down_delta is None else y + down_delta.to(y.dtype)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, top_k={self.top_k}, backend={self.backend}"


def _frozen(linear: nn.Module) -> nn.Linear:
    """The frozen nn.Linear under an AdaptedLinear (a LoRA adapter of another name on that projection)."""
    return getattr(linear, "base_layer", linear)


def _dropped(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """x with the dropped elements zeroed (bool ``keep``): ONE pass over x, the mask promoted
    inside the multiply. Dropout's 1/(1-p) is not applied here but folded into the LoRA scaling
    (``_scaling``; the delta is linear in its input): with the mask cast and the scale that
    was three passes over each (tokens, top-k, FFN) hidden, forward, recompute and backward."""
    return x if keep is None else x * keep


def _scaling(lora, keep: torch.Tensor | None) -> float:
    """The LoRA scaling of an input dropped by ``keep``, dropout's 1/(1-p) folded in."""
    return lora.scaling if keep is None else lora.scaling / (1.0 - lora.lora_dropout.p)
