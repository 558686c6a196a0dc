"""Block-diagonal LoRA config (the schema of its adapter_config.json)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..base import AdapterConfigError, _check_modules
from ..lora.config import LoraConfig

# Tensor-parallel roles (Megatron layout): column-parallel linears shard their output features,
# row-parallel ones their input features.
COLUMN_MODULES = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_MODULES = ("o_proj", "down_proj")


@dataclass
class BdLoraConfig(LoraConfig):
    """Block-diagonal LoRA (arXiv 2510.23346): LoRA whose factor on the sharded side is
    block-diagonal with ``nblocks`` blocks aligned with the tensor-parallel shards, so a sharded
    adapter needs no collective beyond the base layer's own:

    - column-parallel linears (``column_modules``: q, k, v, gate, up): **B** is block-diagonal;
      rank i holds A's rows i (its r/N slice of the rank) and the block B_ii; its output slice is local;
    - row-parallel linears (``row_modules``: o, down): **A** is block-diagonal; rank i computes
      x_i A_ii B_i, a partial sum that joins the base layer's all-reduce.

    Only the blocks are parameters (off-block entries cannot drift). Parameters per linear:
    r·d_in + r·d_out/N (column) and r·d_in/N + r·d_out (row); ``rank_for_budget`` picks the rank
    whose count matches a plain LoRA's. ``r``, and each adapted dimension, must divide by ``nblocks``.
    """

    nblocks: int = 2
    column_modules: tuple[str, ...] = COLUMN_MODULES
    row_modules: tuple[str, ...] = ROW_MODULES

    method: ClassVar[str] = "bdlora"

    def validate(self) -> "BdLoraConfig":
        super().validate()
        if not isinstance(self.nblocks, int) or isinstance(self.nblocks, bool) or self.nblocks < 1:
            raise AdapterConfigError(f"nblocks must be a positive integer, got {self.nblocks!r}")
        if self.r % self.nblocks:
            raise AdapterConfigError(f"r={self.r} must be a multiple of nblocks={self.nblocks}")
        self.column_modules, self.row_modules = tuple(self.column_modules), tuple(self.row_modules)
        _check_modules("column_modules", self.column_modules, COLUMN_MODULES + ROW_MODULES)
        _check_modules("row_modules", self.row_modules, COLUMN_MODULES + ROW_MODULES)
        both = sorted(set(self.column_modules) & set(self.row_modules))
        if both:
            raise AdapterConfigError(f"{both} are in both column_modules and row_modules; each linear has one role")
        loose = [m for m in self.target_modules if m not in self.column_modules + self.row_modules]
        if loose:
            raise AdapterConfigError(f"target_modules {loose} are in neither column_modules nor row_modules: "
                                     "say which factor is block-diagonal for them")
        return self

    def role(self, logical: str) -> str:
        return "column" if logical in self.column_modules else "row"


def rank_for_budget(r_plain: int, d_in: int, d_out: int, nblocks: int, role: str) -> int:
    """The largest rank (a multiple of ``nblocks``) whose block-diagonal linear has at most the
    parameters of a plain rank-``r_plain`` LoRA on a (d_out, d_in) linear."""
    budget = r_plain * (d_in + d_out)
    per_rank = d_in + d_out / nblocks if role == "column" else d_in / nblocks + d_out
    r = int(budget // per_rank)
    return max(nblocks, r - r % nblocks)
