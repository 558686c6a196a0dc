"""Stacked LoRA experts of one projection, shared by MixLoRA (FFN experts) and LoRA-Switch."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dispatch import gathered_kernel_applies
from .lora_math import adapter_dropout, compute_dtype, init_lora_, resolve_dtype


def _kernel_segments(lora_A, idx, cached):
    """Where the Triton kernel takes its "segment" path for ``idx`` over ``lora_A``'s experts:
    its slot order through ``cached(key, make)`` (made once per cache); else None."""
    from moelora_kernels import gathered_lora as gl

    E = lora_A.shape[0]
    if gl.path_for(idx.shape[0], E, lora_A.shape[1]) != "segment":
        return None
    return cached(("gathered_segments", E, tuple(idx.shape)), lambda: gl.segments(idx, E))


def gathered_segments(x, lora_A, idx, plan):
    """The kernel's slot order of ``idx``, once per ``plan`` (``BatchPlan.memo``: one sort for all
    linears of a serving step), where ``_gathered_lora`` takes the "segment" path; else None."""
    return _kernel_segments(lora_A, idx, plan.memo) if gathered_kernel_applies(x) else None


def one_routing_lora(kernel: bool):
    """``_gathered_lora(t, A, B, idx, weight, scaling=1.0, kernel=kernel)`` for several calls over
    ONE routing ``idx`` (a MixLoRA FFN's gate, up and down deltas): where the kernel takes its
    "segment" path, the slot order is sorted by the first call and reused (a sort is ~a dozen
    launches; per projection that was 3x per FFN and step). Use it for one routing only."""
    memo: dict = {}

    def cached(key, make):
        if key not in memo:
            memo[key] = make()
        return memo[key]

    def run(t, lora_A, lora_B, idx, weight=None):
        segs = _kernel_segments(lora_A, idx, cached) if kernel else None
        return _gathered_lora(t, lora_A, lora_B, idx, weight=weight, scaling=1.0, kernel=kernel, segments=segs)

    return run


def _gathered_lora(x, lora_A, lora_B, idx, weight=None, scaling=1.0, kernel: bool | None = None,
                   segments=None):
    """Dispatch to the Triton kernel on CUDA and to its torch reference elsewhere (``kernel``
    forces the choice: a backward that recomputes the forward takes the forward's).

    The operands (x, the stacks, the weights) are cast here, once, to the compute dtype:
    ``torch.autocast``'s where it is on and the stacks are wider floats (as autocast casts a
    matmul's; the gradients reach fp32 master weights through the cast), else the stacks' dtype.
    Callers pass x in its own dtype: a cast to the stacks' fp32 first made every (tokens, top-k,
    FFN) hidden of a bf16-mixed MixLoRA step round-trip through fp32. Why the autocast cast: the
    Triton kernels are not autocast ops, and with bf16-mixed's fp32 adapter weights they ran their
    fp32 (IEEE, no tensor core) form — H200, 7B shape, 4x1024 tokens: a MixLoRA training step
    3.5 s vs PEFT LoRA's 0.38 s."""
    from moelora_kernels import gathered_lora as gl

    dt = compute_dtype(x.device.type, lora_A.dtype)
    x, lora_A, lora_B = x.to(dt), lora_A.to(dt), lora_B.to(dt)
    weight = None if weight is None else weight.to(dt)
    if kernel is None:
        kernel = gathered_kernel_applies(x)
    if not kernel:
        return gl.gathered_lora_reference(x, lora_A, lora_B, idx, weight=weight, scaling=scaling)
    return gl.gathered_lora(x, lora_A, lora_B, idx, weight=weight, scaling=scaling, segments=segments)


def _block_diag_stack(w: torch.Tensor, nblocks: int) -> torch.Tensor:
    """(E, d_out, d_in/N) block parameters -> the dense block-diagonal (E, d_out, d_in)."""
    E, d_out, cols = w.shape
    rows = d_out // nblocks
    dense = w.new_zeros(E, d_out, cols * nblocks)
    for i in range(nblocks):
        dense[:, i * rows:(i + 1) * rows, i * cols:(i + 1) * cols] = w[:, i * rows:(i + 1) * rows]
    return dense


class LoraExperts(nn.Module):
    """E LoRA deltas of one projection, stacked: lora_A (E, R, in), lora_B (E, out, R).

    ``nblocks`` > 1 with ``block="B"`` (column-parallel projections) or ``block="A"`` (row-parallel)
    makes that factor block-diagonal (block-diagonal MixLoRA, ``MixLoraConfig(nblocks=)``): only the
    blocks are parameters (lora_B (E, out, R/N) or lora_A (E, R, in/N), PEFT's layout per expert);
    ``A()`` / ``B()`` give the dense stacks every path computes with (the parameters themselves
    when nothing is block-diagonal)."""

    def __init__(
        self,
        base_layer: nn.Linear,
        num_experts: int,
        r: int,
        scaling: float,
        dropout: float,
        init: str,
        adapter_dtype: str,
        nblocks: int = 1,
        block: str | None = None,
    ) -> None:
        super().__init__()
        w = base_layer.weight
        dtype = resolve_dtype(adapter_dtype, w)
        out_f, in_f = w.shape
        self.num_experts, self.r, self.scaling = num_experts, r, scaling
        self.nblocks, self.block = nblocks, (block if nblocks > 1 else None)
        side = {"A": in_f, "B": out_f}.get(self.block, 0)
        if self.block is not None and (side % nblocks or r % nblocks):
            raise ValueError(f"a projection of shape {tuple(w.shape)} with rank {r} cannot hold block-diagonal "
                             f"LoRA experts of nblocks={nblocks} (features and rank must divide by nblocks)")
        a_in = in_f // nblocks if self.block == "A" else in_f
        b_r = r // nblocks if self.block == "B" else r
        self.lora_A = nn.Parameter(torch.empty(num_experts, r, a_in, dtype=dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.empty(num_experts, out_f, b_r, dtype=dtype, device=w.device))
        init_lora_(self.lora_A, self.lora_B, init, r)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def A(self) -> torch.Tensor:
        return _block_diag_stack(self.lora_A, self.nblocks) if self.block == "A" else self.lora_A

    def B(self) -> torch.Tensor:
        return _block_diag_stack(self.lora_B, self.nblocks) if self.block == "B" else self.lora_B

    def delta(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """s * B_e A_e dropout(x) for the tokens x (n, in) routed to expert e (eager path)."""
        h = F.linear(self.lora_dropout(x).to(self.lora_A.dtype), self.A()[e])  # (n, R)
        return F.linear(h, self.B()[e]) * self.scaling  # (n, out)

    def gathered(self, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor | None = None,
                 state=None, name: str | None = None) -> torch.Tensor:
        """Deltas of the selected experts: x (N, in) or (N, K, in) -> (N, K, out), or (N, out)
        summed with ``weight`` (N, K). Dropout from adapter ``name``'s own stream of the model
        state ``state`` when given (``adapter_dropout``)."""
        x = adapter_dropout(self.lora_dropout, x, state, name)
        return _gathered_lora(x, self.A(), self.B(), idx, weight=weight, scaling=self.scaling)
