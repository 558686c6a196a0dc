"""LoRA-Switch (Kong et al. 2024, arXiv 2405.17741): token-wise pre-gated LoRA experts.

One router at the input of the first decoder layer picks K of N experts (weights g) per token,
and every adapted linear of every layer uses that choice:

    unmerged (training, prefill, batch > 1):  y = W x + Σ_{i∈S} g_i · s · B_i A_i x
    merged (batch-1 decode):  before the layers run for token t, ONE fused launch sets
                              W_l = round(W0_l + Σ_{i∈S_t} g_i · s · B_{l,i} A_{l,i}) for all l,
                              then the token is decoded by the plain backbone.

Exactness (docs/design.md §1): the merge starts from a pristine copy W0 kept by the merge plan, never
from the previously merged weight, so rounding never accumulates over a long generation: at
every step the weight is exactly the one rounding of W0 + Δ_t (|error| ≤ ulp/2 elementwise), and
``restore()`` writes W0 back bit-for-bit; ``model.generate`` restores when it returns or raises
(``moelora/generation.py``), and so does every forward that does not merge, ``state_dict``,
``load_state_dict``, ``disable_adapter`` and ``save_adapter``. A plan checks its weights before
every use: after ``.to()``/``.half()``/``deepcopy`` (new storage) it writes W0 converted back and
is rebuilt; after an in-place overwrite (``load_state_dict``) it takes the new weights as W0. The cost is one extra copy of the adapted weights (memory, not
bandwidth: each merge reads W0 once and writes W once, as the in-place form does).

Several LoRA-Switch adapters may sit on one model: each has its own layer-0 router (in the
``AdapterRouters`` at ``layers[0].router``) and its ``SwitchState`` in ``AdapterState.switch``. In a
batch that mixes adapters each LoRA-Switch adapter routes its own tokens and runs unmerged.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ... import _private
from ...layers import decode_graphs
from ...layers.dispatch import decode_kernels_apply
from ...layers.experts import LoraExperts
from ...switches import triton_kernels_for


class LoraSwitchAdapter(nn.Module):
    """One LoRA-Switch adapter of one linear: N LoRA experts, driven by the adapter's token routing."""

    kind = "lora_switch"
    merged = False  # a merged selection lives in the SwitchState, not here

    def __init__(self, base_layer: nn.Linear, cfg, adapter_name: str) -> None:
        super().__init__()
        self.experts = LoraExperts(base_layer, cfg.num_experts, cfg.r, cfg.scaling, cfg.lora_dropout,
                                   cfg.init_lora_weights, cfg.adapter_dtype)
        self.adapter_name = adapter_name

    def _routing(self, site) -> "SwitchState":
        state = site._state.switch.get(self.adapter_name)
        if state is None or state.experts is None:
            raise RuntimeError("LoRA-Switch routing is decided at the first decoder layer: call the model "
                               "(or its decoder stack), not an inner layer on its own")
        return state

    def forward_site(self, site, x: torch.Tensor) -> torch.Tensor:
        base = _private.submodule(site, "base_layer")
        state = site._state.switch[self.adapter_name]
        if state.merged:  # the selected experts are already inside base_layer.weight
            return _private.frozen_linear(base, x)  # not base(x): a module call costs ~10 µs at decode
        state = self._routing(site)
        idx, w = state.experts, state.weights  # (N, K) for the N tokens of this forward
        x2 = x.reshape(-1, x.shape[-1])
        e = self.experts
        if decode_kernels_apply(x2, site):
            # Frozen GEMM + the K selected experts' shrink/expand (eager: one launch added in place,
            # or at a decode step all of it replayed as one CUDA graph; compiled: beside the GEMM
            # on a second stream). The graph reads the routing from the router's graph outputs,
            # whose addresses are fixed (see route_first_layer).
            if decode_graphs.applies(x2, site._state):
                y = decode_graphs.graphed(self, lambda t: self._decode(site, t), (x2,),
                                          (base.weight, base.bias, e.lora_A, e.lora_B, idx, w, e.scaling))
            else:
                y = self._decode(site, x2)
            return y.view(*x.shape[:-1], y.shape[-1])
        y = F.linear(x, base.weight, base.bias)
        delta = e.gathered(x2, idx, weight=w)  # (N, out)
        return y + delta.view(*y.shape).to(y.dtype)

    def delta_rows(self, site, x_rows: torch.Tensor, slot: int) -> torch.Tensor:
        """The delta for this adapter's tokens of a mixed batch (routed at layer 0, unmerged)."""
        state = self._routing(site)
        return self.experts.gathered(x_rows, state.experts, weight=state.weights)

    def _decode(self, site, x2: torch.Tensor) -> torch.Tensor:
        """Decode math for x2 (T, in) with the current routing, through moelora_kernels.ops."""
        from moelora_kernels import ops

        base, e, state = site.base_layer, self.experts, site._state.switch[self.adapter_name]
        return ops.linear_with_lora(x2, base.weight, base.bias, e.lora_A, e.lora_B, state.experts, state.weights,
                                    e.scaling)


class SwitchState:
    """The routing decided at layer 0 for the current forward, and the merge bookkeeping."""

    def __init__(self, mode: str) -> None:
        self.mode = mode  # auto | merge | unmerged
        self.experts: torch.Tensor | None = None  # (n, K) for the n tokens that use this adapter
        self.weights: torch.Tensor | None = None
        self.rows: torch.Tensor | None = None  # their indices in the forward's tokens (None: all)
        self.stamps: list | None = None  # the weights' (storage, version) after the plan's last write
        self.merged = False  # weights currently hold a merged selection
        self.plan = None  # built lazily at the first merge
        self.linears: list[tuple[nn.Module, LoraSwitchAdapter]] = []  # (site, adapter) pairs
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
        weights = [site.base_layer.weight for site, _ in self.linears]
        a = [m.experts.lora_A.detach() for _, m in self.linears]
        b = [m.experts.lora_B.detach() for _, m in self.linears]
        s = [m.experts.scaling for _, m in self.linears]
        from moelora_kernels import merge

        if triton_kernels_for(weights[0]):
            return merge.MergePlan(weights, a, b, s, pristine=True)
        return TorchMergePlan(weights, a, b, s)

    def _weights(self) -> list[torch.Tensor]:
        return [site.base_layer.weight for site, _ in self.linears]

    def _stamp(self) -> None:
        self.stamps = [_private.tensor_stamp(w) for w in self._weights()]

    def check_plan(self, quick: bool = False) -> None:
        """Drop a plan whose weights changed under it (see the module docstring): new storage
        (``.to()``, ``.half()``, deepcopy) while merged gets W0 written back, converted; an in-place
        overwrite makes the new values W0. The next merge builds a new plan from the weights."""
        if self.plan is None or self.stamps is None:
            return
        if quick:
            first, last = self.linears[0][0].base_layer.weight, self.linears[-1][0].base_layer.weight
            if _private.stamp_change(first, self.stamps[0]) is None and _private.stamp_change(last, self.stamps[-1]) is None:
                return
        changes = [_private.stamp_change(w, st) for w, st in zip(self._weights(), self.stamps)]
        if not any(changes):
            return
        if self.merged:
            with torch.no_grad():
                for w, w0, change in zip(self._weights(), self.plan.pristine_weights(), changes):
                    if change == "moved":
                        w.copy_(w0.to(device=w.device, dtype=w.dtype))
                    elif change is None:
                        w.copy_(w0)
        self.plan, self.stamps, self.merged = None, None, False

    def merge(self, idx: torch.Tensor, gate: torch.Tensor) -> None:
        # Between decode steps of one generation (already merged) a move of the weights is caught
        # by their first and last; the full check (~1 ms for 224 weights) runs at the first merge
        # after a restore, i.e. once per generate call.
        self.check_plan(quick=self.merged)
        if self.plan is None:
            self.plan = self._build_plan()
        elif not self.merged:
            self.plan.refresh_adapters()  # adapters may have trained since the last generation
        if isinstance(self.plan, TorchMergePlan):
            self.plan.merge(idx, gate)
        else:
            self.plan.merge(idx, gate, force=self.force_merge)
        if isinstance(self.plan, TorchMergePlan) or self.stamps is None:
            self._stamp()  # copy_ moved the version counters (the Triton kernel's writes do not)
        self.merged = True
        self.merge_launches += 1
        if self.history is not None:
            self.history.append((idx.detach().clone(), gate.detach().clone()))

    def restore(self) -> None:
        if self.merged:
            self.check_plan()
        if self.merged:
            self.plan.restore()
            self.merged = False
            self._stamp()


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

    def pristine_weights(self) -> list[torch.Tensor]:
        return self.pristine


def route_first_layer(module, args, kwargs):
    """Forward pre-hook of the first decoder layer (a plain function: the routers and the state
    are found through ``module.router``). Routes the tokens of every LoRA-Switch adapter the
    batch uses, merges at a batch-1 decode step where allowed, restores every other merge."""
    routers = module.router
    ctx = routers._state
    if ctx.disabled:  # moelora.disable_adapter: the base model runs
        return
    hidden = args[0] if args else kwargs["hidden_states"]  # (B, T, D)
    B, T, D = hidden.shape
    plan = ctx.plan
    h2 = hidden.reshape(B * T, D)
    mask = ctx.token_mask_for(B, T)
    merging = None
    for name, state in ctx.switch.items():
        router = _private.module_dict_get(routers.adapters, name)
        if name not in plan.slot_names:
            state.experts = state.weights = state.rows = None
            continue
        if plan.mixed:
            rows = plan.rows_of(plan.slot_names.index(name), B, T)
            m = None if mask is None else mask[rows]
            routing = router(h2[rows], m)
            ctx.record(name, 0, routing, m, router.num_experts)
            state.experts, state.weights, state.rows = routing.experts, routing.weights, rows
            continue
        if state.merge_allowed(module.training, B, T, hidden.device):
            merging = name
            routing = router(h2, mask)
        elif decode_kernels_apply(h2, router) and decode_graphs.applies(h2, ctx):
            # Unmerged eager decode step: the router as a CUDA graph, so the routing lives at fixed
            # addresses that the linears' decode graphs read (decode_graphs). Merge mode keeps
            # the plain router: its linears run plain F.linear on the merged weights.
            routing = decode_graphs.graphed(router, lambda h: router(h, None), (h2,),  # top-k needs no mask
                                            (router.weight, router.top_k))
        else:
            routing = router(h2, mask)
        ctx.record(name, 0, routing, mask, router.num_experts)
        state.experts, state.weights, state.rows = routing.experts, routing.weights, None
    for name, state in ctx.switch.items():
        if name != merging:
            state.restore()  # prefill / batch > 1 / training / another adapter: unmerged math on W0
    if merging is not None:
        state = ctx.switch[merging]
        state.merge(state.experts[0], state.weights[0])


def restore_switch_weights(ctx) -> None:
    """Write the pristine base weights back wherever a LoRA-Switch selection is merged."""
    for state in ctx.switch.values():
        state.restore()
