"""The decode kernels as ``torch.library`` custom ops, and the one entry point the layers call.

Why custom ops: under ``torch.compile`` (and the CUDA graphs of ``mode="reduce-overhead"``, which
Hugging Face's static-cache generate uses) a custom op is an opaque node, so each decode kernel
stays ONE launch inside the compiled graph. The two alternatives were measured and lose on the
H100 (experiments/2026-11-23_decode_latency, MixLoRA, Llama-2-7B shape, batch 1): Inductor
tracing the torch reference gave 2.11× base compiled, Inductor tracing the Triton source 2.51×.

The ops are functional (they return a new tensor) because compiled graphs are functional, and
they run the kernels' split (two-launch) forms: inside a CUDA graph launches are nearly free and
GPU time is what counts, and the split forms spread the rank-r shrink over many SMs. Eager decode
calls the one-launch forms directly and updates in place: there host time per launch (~30-60 µs
for a Triton launch, ~10 µs for the op dispatch) is what counts. ``lora_add`` and
``expert_hidden_routed`` pick the right form; layers never call the ops themselves.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import mixlora_ffn


@torch.library.custom_op("moelora::lora_decode_add", mutates_args=())
def lora_decode_add_op(y: Tensor, x: Tensor, lora_A: Tensor, lora_B: Tensor, idx: Optional[Tensor],
                       weight: Optional[Tensor], scaling: float) -> Tensor:
    """y + s Σ_k w_tk B[idx_tk] A[idx_tk] x_(t,k) as a new tensor (see mixlora_ffn.lora_decode_add_)."""
    out = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    # Tiles: the best split configs of benchmark_decode_kernels.py on the H100 (4.1-5.0 µs per call
    # at the Llama-2-7B decode shapes, vs 11-27 µs for the one-launch form inside a CUDA graph).
    return mixlora_ffn.lora_decode_add_(y, x, lora_A, lora_B, idx, weight, scaling, out=out, split=True, chunk=256,
                                        block_n=64, num_warps=8)


@lora_decode_add_op.register_fake
def _(y, x, lora_A, lora_B, idx, weight, scaling):
    return torch.empty(y.shape, dtype=y.dtype, device=y.device)


@torch.library.custom_op("moelora::mixlora_expert_hidden_routed", mutates_args=())
def expert_hidden_routed_op(x: Tensor, g0: Tensor, u0: Tensor, a_gate: Tensor, b_gate: Tensor, a_up: Tensor,
                            b_up: Tensor, router_weight: Tensor, top_k: int, scaling: float,
                            act: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(h, h_mix, idx, weight, probs) of mixlora_ffn.mixlora_expert_hidden with the fused router."""
    return mixlora_ffn.mixlora_expert_hidden(x, g0, u0, a_gate, b_gate, a_up, b_up, scaling=scaling, act=act,
                                             router_weight=router_weight, top_k=top_k, split=True, chunk=256,
                                             block_f=128, num_warps=8)


@expert_hidden_routed_op.register_fake
def _(x, g0, u0, a_gate, b_gate, a_up, b_up, router_weight, top_k, scaling, act):
    T, FF, E = x.shape[0], b_gate.shape[1], a_gate.shape[0]
    return (x.new_empty(T, top_k, FF), x.new_empty(T, FF), x.new_empty(T, top_k, dtype=torch.int64),
            x.new_empty(T, top_k, dtype=torch.float32), x.new_empty(T, E, dtype=torch.float32))


def lora_add(y: Tensor, x: Tensor, lora_A: Tensor, lora_B: Tensor, idx: Tensor | None, weight: Tensor | None,
             scaling: float) -> Tensor:
    """y + LoRA delta(s): in place in eager mode, a new tensor (custom op) under torch.compile.
    Always use the return value."""
    if torch.compiler.is_compiling():
        return lora_decode_add_op(y, x, lora_A, lora_B, idx, weight, float(scaling))
    return mixlora_ffn.lora_decode_add_(y, x, lora_A, lora_B, idx, weight, scaling)


def expert_hidden_routed(x, g0, u0, a_gate, b_gate, a_up, b_up, router_weight, top_k: int, scaling: float,
                         act: str):
    """Router + gate/up expert deltas + activation + mix (one launch): (h, h_mix, idx, weight, probs)."""
    if torch.compiler.is_compiling():
        return expert_hidden_routed_op(x, g0, u0, a_gate, b_gate, a_up, b_up, router_weight, int(top_k),
                                       float(scaling), act)
    return mixlora_ffn.mixlora_expert_hidden(x, g0, u0, a_gate, b_gate, a_up, b_up, scaling=scaling, act=act,
                                             router_weight=router_weight, top_k=top_k)
