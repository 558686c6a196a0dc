"""One adapted linear sharded over a 1-D ``DeviceMesh`` with torch DTensor (issue 18).

Megatron layout: a column-parallel linear (q, k, v, gate, up) holds the rows of W for its output
slice and gives a sharded output; a row-parallel one (o, down) holds the columns for its input
slice and its partial output is summed by one all-reduce. Three forms of the LoRA delta:

- ``"bdlora"`` (block-diagonal LoRA, ``moelora.BdLoraConfig``): column: rank i holds A's rows for
  its slice of the rank and the block B_ii — its output slice is local; row: rank i holds
  block A_ii and the column slice B_i, and x_i A_ii^T B_i^T is a partial sum that joins the base
  layer's all-reduce. No collective beyond the base's.
- ``"slora"`` (plain LoRA sharded S-LoRA style): column: A sharded along the rank, so the (…, r)
  activation x A^T is all-gathered before B's output slice; row: A sharded along the input, so
  the partial x_i A_i^T is all-reduced before B. One extra collective per layer.
- ``"replicated"`` (plain LoRA on every rank): column: each rank computes the whole delta and keeps
  its output slice (no collective, n× the adapter FLOPs; the adapter's gradients are partial per
  rank and need the usual data-parallel sum); row: the input slice is all-gathered and every rank
  adds the whole delta after the base all-reduce (one extra collective).

The collectives are DTensor redistributions (``Partial`` / ``Shard`` → ``Replicate``), so autograd,
``CommDebugMode`` counting and any DTensor-aware optimizer work unchanged. Parameters are DTensors;
``forward`` takes and returns local tensors (column: x replicated → y sharded on its last dim;
row: x sharded on its last dim → y replicated).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

from ..methods.bdlora.layer import blocked_linear

FORMS = ("bdlora", "slora", "replicated")


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (a DTensor Partial -> Replicate redistribution); backward: identity, because the
    sum is then used the same way on every rank (Megatron's row-parallel output)."""

    @staticmethod
    def forward(ctx, t, mesh):
        return DTensor.from_local(t.detach(), mesh, [Partial()]).redistribute(mesh, [Replicate()]).to_local()

    @staticmethod
    def backward(ctx, g):
        return g, None


class _GatherLast(torch.autograd.Function):
    """All-gather along the last dim (Shard(-1) -> Replicate); backward: the gradients of every
    rank summed (each rank used the gathered tensor differently), this rank's chunk kept."""

    @staticmethod
    def forward(ctx, t, mesh):
        ctx.mesh, ctx.width = mesh, t.shape[-1]
        return DTensor.from_local(t.detach(), mesh, [Shard(t.dim() - 1)]).redistribute(mesh, [Replicate()]).to_local()

    @staticmethod
    def backward(ctx, g):
        total = DTensor.from_local(g.contiguous(), ctx.mesh, [Partial()]).redistribute(ctx.mesh, [Replicate()]).to_local()
        rank = ctx.mesh.get_local_rank()
        return total[..., rank * ctx.width:(rank + 1) * ctx.width], None


def _allreduce(t: torch.Tensor, mesh) -> torch.Tensor:
    return _SumOverRanks.apply(t, mesh)


def _allgather_last(t: torch.Tensor, mesh) -> torch.Tensor:
    return _GatherLast.apply(t, mesh)


class TensorParallelLoraLinear(nn.Module):
    """A frozen linear and one LoRA delta of ``form`` (module docstring), sharded over ``mesh``.

    ``weight`` (out, in) and ``bias`` are the dense base tensors; ``lora_A``/``lora_B`` the
    adapter's factors as the adapter stores them (block parameters for ``"bdlora"``: see
    ``BdLoraAdapter``; dense (r, in) / (out, r) otherwise); every rank passes the same tensors and
    keeps its shard."""

    def __init__(self, weight, bias, lora_A, lora_B, scaling: float, style: str, form: str, mesh,
                 nblocks: int | None = None) -> None:
        super().__init__()
        if style not in ("colwise", "rowwise"):
            raise ValueError(f"style must be 'colwise' or 'rowwise', got {style!r}")
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        n = mesh.size()
        if form == "bdlora" and nblocks != n:
            raise ValueError(f"a block-diagonal adapter with nblocks={nblocks} needs a mesh of {nblocks} ranks, got {n}")
        self.style, self.form, self.mesh, self.scaling, self.n = style, form, mesh, scaling, n
        col = style == "colwise"
        self.weight = nn.Parameter(distribute_tensor(weight.detach(), mesh, [Shard(0 if col else 1)]),
                                   requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(
            distribute_tensor(bias.detach(), mesh, [Shard(0)] if col else [Replicate()]), requires_grad=False)
        if form == "bdlora":
            a_place = [Shard(0)]  # column: A's rows for this block's slice of the rank; row: A's blocks
            b_place = [Shard(0)] if col else [Shard(1)]  # column: B's blocks (row chunks); row: B's rank slice
        elif form == "slora":
            a_place = [Shard(0)] if col else [Shard(1)]  # along the rank / along the input
            b_place = [Shard(0)] if col else [Replicate()]
        else:
            a_place, b_place = [Replicate()], [Replicate()]
        self.lora_A = nn.Parameter(distribute_tensor(lora_A.detach().clone(), mesh, a_place))
        self.lora_B = nn.Parameter(distribute_tensor(lora_B.detach().clone(), mesh, b_place))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to_local()
        b = None if self.bias is None else self.bias.to_local()
        a, bb = self.lora_A.to_local(), self.lora_B.to_local()
        rank = self.mesh.get_local_rank()
        if self.style == "colwise":  # x: replicated (…, in) -> y: this rank's output slice
            y = F.linear(x, w, b)
            if self.form == "bdlora":  # (x A_i^T) B_ii^T: this rank's rank slice and block, all local
                return y + F.linear(F.linear(x, a), bb) * self.scaling
            if self.form == "slora":
                h = _allgather_last(F.linear(x, a), self.mesh)  # (…, r): the extra collective
                return y + F.linear(h, bb) * self.scaling
            d = F.linear(F.linear(x, a), bb) * self.scaling  # replicated: the whole delta
            out = d.shape[-1] // self.n
            return y + d[..., rank * out:(rank + 1) * out]
        # rowwise: x is this rank's input slice (…, in/n) -> y: the full output, summed over ranks
        y = F.linear(x, w)
        if self.form == "bdlora":
            y = y + F.linear(F.linear(x, a), bb) * self.scaling  # x_i A_ii^T B_i^T: joins the sum
        y = _allreduce(y, self.mesh)  # the base layer's own all-reduce
        if self.form == "slora":
            h = _allreduce(F.linear(x, a), self.mesh)  # the extra collective: Σ_i x_i A_i^T
            y = y + F.linear(h, bb) * self.scaling  # the same on every rank
        elif self.form == "replicated":
            xf = _allgather_last(x, self.mesh)  # the extra collective
            y = y + F.linear(F.linear(xf, a), bb) * self.scaling
        return y if b is None else y + b


def dense_delta_weight(lora_A, lora_B, scaling: float, form: str, style: str, nblocks: int | None = None):
    """The (out, in) weight of the delta the sharded module computes (the reference)."""
    from ..methods.bdlora.layer import block_diag_of

    if form == "bdlora":
        a = lora_A if style == "colwise" else block_diag_of(lora_A, nblocks)
        b = block_diag_of(lora_B, nblocks) if style == "colwise" else lora_B
        return (b @ a) * scaling
    return (lora_B @ lora_A) * scaling


__all__ = ["FORMS", "TensorParallelLoraLinear", "dense_delta_weight", "blocked_linear"]
