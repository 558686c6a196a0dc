"""One adapted linear sharded over a 1-D ``DeviceMesh`` with torch DTensor (issue 18).

The single-layer view of ``moelora.parallel.parallelize`` (``model.py``): the same placements
(``PLACEMENTS``) and the same boundaries. Megatron layout: a column-parallel linear (q, k, v,
gate, up) holds the rows of W for its output slice and gives a sharded output; a row-parallel one
(o, down) holds the columns for its input slice and its partial output is summed by one
all-reduce. Three forms of the LoRA delta:

- ``"bdlora"`` (block-diagonal LoRA, ``moelora.BdLoraConfig``): column: rank i holds A's rows for
  its slice of the rank and the block B_ii — its output slice is local; row: rank i holds
  block A_ii and the column slice B_i, and x_i A_ii^T B_i^T is a partial sum that joins the base
  layer's all-reduce. No collective beyond the base's.
- ``"slora"`` (plain LoRA sharded S-LoRA style): column: A sharded along the rank, so the (…, r)
  activation x A^T is all-gathered before B's output slice (the extra collective); row: A sharded
  along the input, x_i A_i^T is a partial sum and B (replicated) is linear, so it joins the base's
  all-reduce too.
- ``"replicated"`` (plain LoRA on every rank): every rank computes the whole delta (n× the adapter
  FLOPs) and keeps its share; no extra collective in the forward, the gradients of the
  replicated factors are summed over ranks in the backward.

The math runs on DTensors, so DTensor's sharding propagation places the collectives and autograd
differentiates them (nothing here is hand-written communication); ``CommDebugMode`` counts them.
Parameters are DTensors; ``forward`` takes and returns local tensors (column: x replicated → y
sharded on its last dim; row: x sharded on its last dim → y replicated).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from ..methods.bdlora.layer import blocked_linear
from .model import FORMS, PLACEMENTS


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
        a_place, b_place = PLACEMENTS[(form, "column" if col else "row")]
        self.lora_A = nn.Parameter(distribute_tensor(lora_A.detach().clone(), mesh, [a_place]))
        self.lora_B = nn.Parameter(distribute_tensor(lora_B.detach().clone(), mesh, [b_place]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        col = self.style == "colwise"
        xd = DTensor.from_local(x, self.mesh, [Replicate()] if col else [Shard(x.dim() - 1)], run_check=False)
        y = F.linear(xd, self.weight, self.bias if col else None)  # column: Shard(-1); row: Partial
        if self.form == "bdlora" and col:  # (x A_i^T) B_ii^T: this rank's rank slice and block
            delta = blocked_linear(F.linear(xd, self.lora_A), self.lora_B, self.n)
        elif self.form == "bdlora":  # x_i A_ii^T B_i^T: a partial sum like the base's
            delta = F.linear(blocked_linear(xd, self.lora_A, self.n), self.lora_B)
        else:
            delta = F.linear(F.linear(xd, self.lora_A), self.lora_B)
        y = y + delta * self.scaling
        if col:
            return y.to_local()
        y = y.redistribute(self.mesh, [Replicate()]).to_local()  # the base layer's own all-reduce
        return y if self.bias is None else y + self.bias.to_local()  # once, after the sum


def dense_delta_weight(lora_A, lora_B, scaling: float, form: str, style: str, nblocks: int | None = None):
    """The (out, in) weight of the delta the sharded module computes (the reference)."""
    from ..methods.bdlora.layer import block_diag_of

    if form == "bdlora":
        a = lora_A if style == "colwise" else block_diag_of(lora_A, nblocks)
        b = block_diag_of(lora_B, nblocks) if style == "colwise" else lora_B
        return (b @ a) * scaling
    return (lora_B @ lora_A) * scaling


__all__ = ["FORMS", "TensorParallelLoraLinear", "dense_delta_weight", "blocked_linear"]
