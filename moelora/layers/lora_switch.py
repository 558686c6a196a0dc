"""LoRA-Switch (Kong et al. 2024, arXiv 2405.17741): token-wise pre-gated LoRA experts.

One router at the input of the first decoder layer picks K of N experts (weights g) per token,
and every adapted linear of every layer uses that choice:

    unmerged (training, prefill, batch > 1):  y = W x + Σ_{i∈S} g_i · s · B_i A_i x
    merged (batch-1 decode):  before the layers run for token t, ONE fused launch sets
                              W_l = round(W0_l + Σ_{i∈S_t} g_i · s · B_{l,i} A_{l,i}) for all l,
                              then the token is decoded by the plain backbone.

Exactness (DESIGN.md §1): the merge starts from a pristine copy W0 kept by the merge plan, never
from the previously merged weight, so rounding never accumulates over a long generation: at
every step the weight is exactly the one rounding of W0 + Δ_t (|error| ≤ ulp/2 elementwise), and
``restore()`` writes W0 back bit-for-bit. ``generate`` is wrapped so that the restore happens
when it returns or raises. The cost is one extra copy of the adapted weights (memory, not
bandwidth: each merge reads W0 once and writes W once, as the in-place form does).
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import decode_graphs
from .context import RoutingContext
from .dispatch import decode_kernels_apply, kernels_interpreted
from .experts import LoraExperts
from .router import TopKRouter


class LoraSwitchLinear(nn.Module):
    """A frozen linear with N LoRA experts, driven by the model-wide token routing."""

    def __init__(self, base_layer: nn.Linear, cfg, context: RoutingContext) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"LoraSwitchLinear wraps nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.experts = LoraExperts(base_layer, cfg.num_experts, cfg.r, cfg.scaling, cfg.lora_dropout,
                                   cfg.init_lora_weights, cfg.adapter_dtype)
        self._context = context

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        state: SwitchState = self._context.extras["switch"]
        if state.merged:  # the selected experts are already inside base_layer.weight
            return F.linear(x, base.weight, base.bias)  # not base(x): a module call costs ~10 µs at decode
        idx, w = state.experts, state.weights  # (N, K) for the N tokens of this forward
        x2 = x.reshape(-1, x.shape[-1])
        e = self.experts
        if decode_kernels_apply(x2, self):
            # Frozen GEMM + the K selected experts' shrink/expand (eager: one launch added in place,
            # or at a decode step all of it replayed as one CUDA graph; compiled: beside the GEMM
            # on a second stream). The graph reads the routing from the router's graph outputs,
            # whose addresses are fixed (see _route_at_first_layer).
            if decode_graphs.applies(x2, self._context):
                y = decode_graphs.graphed(self, self._decode, (x2,), (base.weight, base.bias, e.lora_A, e.lora_B,
                                                                      idx, w, e.scaling))
            else:
                y = self._decode(x2)
            return y.view(*x.shape[:-1], y.shape[-1])
        y = F.linear(x, base.weight, base.bias)
        delta = e.gathered(x2, idx, weight=w)  # (N, out)
        return y + delta.view(*y.shape).to(y.dtype)

    def _decode(self, x2: torch.Tensor) -> torch.Tensor:
        """Decode math for x2 (T, in) with the current routing, through moelora_kernels.ops."""
        from moelora_kernels import ops

        base, e, state = self.base_layer, self.experts, self._context.extras["switch"]
        return ops.linear_with_lora(x2, base.weight, base.bias, e.lora_A, e.lora_B, state.experts, state.weights,
                                    e.scaling)


class SwitchState:
    """The routing decided at layer 0 for the current forward, and the merge bookkeeping."""

    def __init__(self, mode: str) -> None:
        self.mode = mode  # auto | merge | unmerged
        self.experts: torch.Tensor | None = None
        self.weights: torch.Tensor | None = None
        self.merged = False  # weights currently hold a merged selection
        self.plan = None  # built lazily at the first merge
        self.linears: list[LoraSwitchLinear] = []
        self.merge_launches = 0  # number of merge calls (for tests/benchmarks)
        self.force_merge = False  # benchmarks: never skip an unchanged selection (worst case)
        self.history: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # set to [] to record

    def selection_change_rate(self) -> float | None:
        """Share of recorded decode steps whose (experts, weights) differ from the step before:
        the steps where merge mode pays for a merge (the others are skipped in-kernel)."""
        h = self.history
        if not h or len(h) < 2:
            return None
        changed = sum(not (torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])) for a, b in zip(h, h[1:]))
        return changed / (len(h) - 1)

    def merge_allowed(self, model_training: bool, batch: int, seq: int, device: torch.device) -> bool:
        if self.mode == "unmerged" or model_training or batch != 1 or seq != 1 or torch.compiler.is_compiling():
            return False
        if self.mode == "merge":
            return True
        return device.type == "cuda"  # auto: the fused kernel pays off on the GPU

    def _build_plan(self):
        weights = [m.base_layer.weight for m in self.linears]
        a = [m.experts.lora_A.detach() for m in self.linears]
        b = [m.experts.lora_B.detach() for m in self.linears]
        s = [m.experts.scaling for m in self.linears]
        from moelora_kernels import merge

        if weights[0].is_cuda or (kernels_interpreted() and merge._INTERPRETED):
            return merge.MergePlan(weights, a, b, s, pristine=True)
        return TorchMergePlan(weights, a, b, s)

    def merge(self, idx: torch.Tensor, gate: torch.Tensor) -> None:
        if self.plan is None:
            self.plan = self._build_plan()
        elif not self.merged:
            self.plan.refresh_adapters()  # adapters may have trained since the last generation
        if isinstance(self.plan, TorchMergePlan):
            self.plan.merge(idx, gate)
        else:
            self.plan.merge(idx, gate, force=self.force_merge)
        self.merged = True
        self.merge_launches += 1
        if self.history is not None:
            self.history.append((idx.detach().clone(), gate.detach().clone()))

    def restore(self) -> None:
        if self.merged:
            self.plan.restore()
            self.merged = False


class TorchMergePlan:
    """Eager merge plan with the MergePlan interface, for CPU without the Triton interpreter."""

    def __init__(self, weights, lora_A, lora_B, scalings) -> None:
        self.weights, self.lora_A, self.lora_B, self.scalings = list(weights), list(lora_A), list(lora_B), list(scalings)
        self.pristine = [w.detach().clone() for w in self.weights]

    def merge(self, idx: torch.Tensor, gate: torch.Tensor) -> None:
        from moelora_kernels.merge import merge_selected_adapters_reference

        with torch.no_grad():
            merge_selected_adapters_reference(self.weights, self.pristine, self.lora_A, self.lora_B,
                                              self.scalings, idx, gate)

    def restore(self) -> None:
        with torch.no_grad():
            for w, w0 in zip(self.weights, self.pristine):
                w.copy_(w0)

    def refresh_adapters(self) -> None:
        pass  # holds references to the live adapter tensors


def _route_at_first_layer(router: TopKRouter, state: SwitchState, context: RoutingContext, model: nn.Module):
    def hook(module, args, kwargs):
        if context.disabled:  # moelora.disable_adapter: the base model runs
            return
        hidden = args[0] if args else kwargs["hidden_states"]  # (B, T, D)
        B, T, D = hidden.shape
        mask = context.token_mask_for(B, T)
        h2 = hidden.reshape(B * T, D)
        merging = state.merge_allowed(model.training, B, T, hidden.device)
        if not merging and decode_kernels_apply(h2, router) and decode_graphs.applies(h2, context):
            # Unmerged eager decode step: the router as a CUDA graph, so the routing lives at fixed
            # addresses that the linears' decode graphs read (decode_graphs). Merge mode keeps
            # the plain router: its linears run plain F.linear on the merged weights.
            routing = decode_graphs.graphed(router, lambda h: router(h, None), (h2,),  # top-k needs no mask
                                            (router.weight, router.top_k))
        else:
            routing = router(h2, mask)
        context.record(0, routing, mask, router.num_experts)
        state.experts, state.weights = routing.experts, routing.weights
        if merging:
            state.merge(routing.experts[0], routing.weights[0])
        else:
            state.restore()  # prefill / batch > 1 / training: unmerged math on the pristine W

    return hook


def _restoring_generate(generate, state: SwitchState):
    @functools.wraps(generate)
    def wrapped(*args, **kwargs):
        try:
            return generate(*args, **kwargs)
        finally:
            state.restore()  # base weights bit-identical after generate returns or raises

    return wrapped


def inject_lora_switch(model, layers, spec, cfg, context: RoutingContext, originals: list) -> None:
    """Wrap every target linear of every layer and install the layer-0 router (see inject.py)."""
    from ..inject import _actual_names

    state = SwitchState(cfg.switch_mode)
    context.extras["switch"] = state
    for layer in layers:
        for parent, mapping in ((getattr(layer, spec.attn_attr), spec.attn), (getattr(layer, spec.mlp_attr), spec.mlp)):
            for name in _actual_names(mapping, cfg.target_modules):
                base = getattr(parent, name)
                originals.append((parent, name, base))
                wrapped = LoraSwitchLinear(base, cfg, context)
                setattr(parent, name, wrapped)
                state.linears.append(wrapped)
    hidden = model.config.hidden_size
    router = TopKRouter(hidden, cfg.num_experts, cfg.top_k, "topk", init_range=cfg.router_init_range,
                        jitter_noise=cfg.jitter_noise, device=next(layers[0].parameters()).device)
    first = layers[0]
    originals.append((first, "router", None))  # remove_adapter deletes it again
    first.router = router
    handle = first.register_forward_pre_hook(_route_at_first_layer(router, state, context, model), with_kwargs=True)
    original_generate = model.generate
    model.generate = _restoring_generate(original_generate, state)

    def cleanup() -> None:
        state.restore()
        handle.remove()
        model.__dict__.pop("generate", None)  # back to the class's generate

    model._moelora_cleanup = [cleanup]


def switch_state(model: nn.Module) -> SwitchState | None:
    ctx = getattr(model, "_moelora_context", None)
    return None if ctx is None else ctx.extras.get("switch")


def restore_base_weights(model: nn.Module) -> None:
    """Write the pristine base weights back if a LoRA-Switch selection is merged (custom decode loops)."""
    state = switch_state(model)
    if state is not None:
        state.restore()
