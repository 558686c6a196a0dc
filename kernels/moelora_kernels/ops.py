"""The decode paths of the adapted layers: frozen GEMMs plus adapter kernels, eager or compiled.

Layers call two entry points, ``linear_with_lora`` (a LoRA or LoRA-Switch linear) and
``mixlora_ffn_decode`` (a MixLoRA FFN); each picks the form for how it runs:

- **eager** (host-bound: a Triton launch costs ~30-60 µs of host time, an op dispatch ~10 µs):
  the frozen GEMM, then the one-launch kernels of ``lora_decode`` / ``mixlora_ffn`` update its
  output in place.
- **inside a CUDA-graph capture** (``moelora.layers.decode_graphs``: eager decoding replays each
  adapted module's decode math as one graph): launches cost no host time there, so the split
  forms run in line after the frozen GEMM (fewer GPU µs than the one-launch forms).
- **compiled** (``torch.compile``; Hugging Face's static-cache generate adds CUDA graphs, where
  launches cost no host time and GPU latency is what counts): ``torch.library`` custom ops, so each
  stays one opaque node of the graph. Inside an op the adapter kernels (split two-launch forms:
  the rank-r shrink spread over IN-chunks, then the expand) run on a second CUDA stream WHILE the
  frozen GEMM runs, and the op returns the GEMM output and the fp32 delta separately: the
  ``y + delta`` add is plain torch code that Inductor fuses into the next kernel (RoPE, the
  residual add + RMSNorm, ...). The adapter then adds no kernel to the critical path of a decode
  step; in a CUDA graph the two streams become parallel branches.

Why (H100, Llama-2-7B shape, batch 1, experiments/2026-11-23_decode_latency): Inductor tracing the
torch reference gave MixLoRA 2.11× base compiled, tracing the Triton source 2.51×; one-launch
kernels as ops ~3×; split kernels in line after each GEMM (one shrink + one expand on the critical
path per adapted linear) 1.35×, and the profile showed ~8 µs per added kernel (2-3 µs of kernel, the
rest dependency latency), so taking them off the critical path is the lever.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import lora_decode, mixlora_ffn

# Launch tiles: the launchers look them up in tiles.py (by GPU family, and for the split forms by
# token count), so the calls below pass none.


_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def _launch_beside(device: torch.device, launch: Callable[[], object]) -> Callable[[], None]:
    """Run ``launch`` (kernel launches only: its outputs must be allocated by the caller, on the
    current stream) on a side stream that first waits for the work queued so far; returns
    ``join()``, which makes the current stream wait for it. On CPU it runs in line."""
    if device.type != "cuda":
        launch()
        return lambda: None
    main = torch.cuda.current_stream(device)
    side = _SIDE_STREAMS.get(device.index)
    if side is None:  # from PyTorch's stream pool: no CUDA call, safe while a graph is captured
        side = _SIDE_STREAMS[device.index] = torch.cuda.Stream(device, priority=-1)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        launch()
    return lambda: main.wait_stream(side)


@torch.library.custom_op("moelora::linear_lora_delta", mutates_args=())
def linear_lora_delta_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                         idx: Optional[Tensor], gate: Optional[Tensor], scaling: float) -> tuple[Tensor, Tensor]:
    """(W x + b, s Σ_k g_tk B[idx_tk] A[idx_tk] x_t in fp32) for x (T, IN); idx=None is plain LoRA.
    The delta is computed on a side stream during the GEMM (see the module docstring)."""
    delta = torch.empty(x.shape[0], weight.shape[0], dtype=torch.float32, device=x.device)
    join = _launch_beside(x.device, lambda: lora_decode.lora_decode_add_(None, x, lora_A, lora_B, idx, gate, scaling,
                                                                         out=delta, split=True))
    y = F.linear(x, weight, bias)
    join()
    return y, delta


@linear_lora_delta_op.register_fake
def _(x, weight, bias, lora_A, lora_B, idx, gate, scaling):
    T, OUT = x.shape[0], weight.shape[0]
    return x.new_empty(T, OUT), x.new_empty(T, OUT, dtype=torch.float32)


@torch.library.custom_op("moelora::mixlora_ffn_delta", mutates_args=())
def mixlora_ffn_delta_op(x: Tensor, gate_w: Tensor, gate_b: Optional[Tensor], up_w: Tensor, up_b: Optional[Tensor],
                         down_w: Tensor, down_b: Optional[Tensor], a_gate: Tensor, b_gate: Tensor, a_up: Tensor,
                         b_up: Tensor, a_down: Optional[Tensor], b_down: Optional[Tensor], router_weight: Tensor,
                         top_k: int, scaling: float, down_scaling: float,
                         act: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """A MixLoRA FFN at decode: (W_down h_mix + b, fp32 down-expert delta, idx, weight, probs).

    Critical path: gate GEMM, up GEMM, the MoE-hidden kernel (top-k, gate/up expands, activation,
    mix: it replaces the base model's act·mul kernel), down GEMM. Beside it, on the side stream:
    the router logits + gate/up shrinks during the gate/up GEMMs, the down delta during the down GEMM."""
    dev = x.device
    parts = mixlora_ffn.empty_route_shrink_partials(x, a_gate)
    join = _launch_beside(dev, lambda: mixlora_ffn.route_shrink_partials(x, router_weight, a_gate, a_up, out=parts))
    g0 = F.linear(x, gate_w, gate_b)
    u0 = F.linear(x, up_w, up_b)
    join()
    h, h_mix, idx, weight, probs = mixlora_ffn.expert_hidden_from_partials(g0, u0, b_gate, b_up, parts, top_k,
                                                                          scaling, act)
    if a_down is None:
        delta = torch.zeros(x.shape[0], down_w.shape[0], dtype=torch.float32, device=dev)
        join = lambda: None  # noqa: E731
    else:
        delta = torch.empty(x.shape[0], down_w.shape[0], dtype=torch.float32, device=dev)
        join = _launch_beside(dev, lambda: lora_decode.lora_decode_add_(None, h, a_down, b_down, idx, weight,
                                                                        down_scaling, out=delta, split=True))
    y = F.linear(h_mix, down_w, down_b)
    join()
    return y, delta, idx, weight, probs


@mixlora_ffn_delta_op.register_fake
def _(x, gate_w, gate_b, up_w, up_b, down_w, down_b, a_gate, b_gate, a_up, b_up, a_down, b_down, router_weight,
      top_k, scaling, down_scaling, act):
    T, D, E = x.shape[0], down_w.shape[0], a_gate.shape[0]
    return (x.new_empty(T, D), x.new_empty(T, D, dtype=torch.float32), x.new_empty(T, top_k, dtype=torch.int64),
            x.new_empty(T, top_k, dtype=torch.float32), x.new_empty(T, E, dtype=torch.float32))


def _plus(y: Tensor, delta: Tensor) -> Tensor:
    """y + delta with fp32 math and one rounding, as the in-place kernels do."""
    return (y.float() + delta).to(y.dtype)


def linear_with_lora(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                     idx: Tensor | None, gate: Tensor | None, scaling: float) -> Tensor:
    """F.linear(x, weight, bias) + s Σ_k g_tk B[idx_tk] A[idx_tk] x_t for x (T, IN) at decode.
    idx=None: plain LoRA, A (R, IN), B (OUT, R)."""
    if torch.compiler.is_compiling():
        y, delta = linear_lora_delta_op(x, weight, bias, lora_A, lora_B, idx, gate, float(scaling))
        return _plus(y, delta)
    y = F.linear(x, weight, bias)
    return lora_decode.lora_decode_add_(y, x, lora_A, lora_B, idx, gate, scaling, split=_capturing(x))


def _capturing(x: Tensor) -> bool:
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def mixlora_ffn_decode(x: Tensor, gate_w: Tensor, gate_b: Tensor | None, up_w: Tensor, up_b: Tensor | None,
                       down_w: Tensor, down_b: Tensor | None, a_gate: Tensor, b_gate: Tensor, a_up: Tensor,
                       b_up: Tensor, a_down: Tensor | None, b_down: Tensor | None, router_weight: Tensor,
                       top_k: int, scaling: float, down_scaling: float, act: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A MixLoRA FFN at decode for x (T, D): (y, idx, weight, probs); the router is fused in."""
    if torch.compiler.is_compiling():
        y, delta, idx, weight, probs = mixlora_ffn_delta_op(
            x, gate_w, gate_b, up_w, up_b, down_w, down_b, a_gate, b_gate, a_up, b_up, a_down, b_down,
            router_weight, int(top_k), float(scaling), float(down_scaling), act)
        return _plus(y, delta), idx, weight, probs
    graph = _capturing(x)
    g0 = F.linear(x, gate_w, gate_b)  # frozen, once for all experts
    u0 = F.linear(x, up_w, up_b)
    h, h_mix, idx, weight, probs = mixlora_ffn.mixlora_expert_hidden(
        x, g0, u0, a_gate, b_gate, a_up, b_up, scaling=scaling, act=act, router_weight=router_weight, top_k=top_k,
        split=graph)
    y = F.linear(h_mix, down_w, down_b)
    if a_down is not None:
        y = lora_decode.lora_decode_add_(y, h, a_down, b_down, idx, weight, down_scaling, split=graph)
    return y, idx, weight, probs
