"""MixLoRA config (the schema of its adapter_config.json)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..base import (
    ATTENTION_MODULES,
    FFN_MODULES,
    AdapterConfigError,
    _check_modules,
    _RoutedConfig,
    check_int,
    check_names,
    check_number,
    check_str,
)


@dataclass
class MixLoraConfig(_RoutedConfig):
    """MixLoRA (Li et al. 2024, arXiv 2404.15159): each FFN becomes a sparse MoE of LoRA experts
    sharing the frozen FFN, plus plain LoRA on attention.

    routing_strategy: "topk" (paper default), "dynamic" (top-p: keep experts in order of
    probability until their cumulative probability reaches ``top_p``), or "switch" (top-1 with a
    capacity of ``ceil(capacity_factor * tokens / E)`` tokens per expert; overflow tokens use the
    frozen FFN only, and the expert output is scaled by its probability as in Switch Transformer).
    aux_loss_pooling: "layer_mean" averages the per-layer loss over layers; "pooled" computes
    f and P over the tokens of all layers together (the reference MixLoRA / HF Mixtral form).
    expert_backend: "eager" loops over experts (reference semantics, host syncs), "fused" uses
    static-shape gathered kernels (no host sync; Triton on CUDA), "auto" picks fused on CUDA.
    """

    routing_strategy: str = "topk"
    top_p: float = 0.8
    capacity_factor: float = 1.0
    aux_loss_pooling: str = "layer_mean"
    attention_target_modules: tuple[str, ...] = ATTENTION_MODULES
    expert_target_modules: tuple[str, ...] = FFN_MODULES
    expert_backend: str = "auto"
    # >1: block-diagonal MixLoRA for tensor parallelism (as moelora.BdLoraConfig): the experts' B
    # on gate/up and A on down, and the attention LoRA, block-diagonal with nblocks blocks
    nblocks: int = 1

    method: ClassVar[str] = "mixlora"

    def validate(self) -> "MixLoraConfig":
        super().validate()
        self.attention_target_modules = check_names("attention_target_modules", self.attention_target_modules)
        self.expert_target_modules = check_names("expert_target_modules", self.expert_target_modules)
        for key in ("routing_strategy", "aux_loss_pooling", "expert_backend"):
            check_str(key, getattr(self, key))
        check_number("top_p", self.top_p)
        check_int("nblocks", self.nblocks)
        if self.nblocks < 1 or self.r % self.nblocks:
            raise AdapterConfigError(f"nblocks must be a positive divisor of r={self.r}, got {self.nblocks}")
        check_number("capacity_factor", self.capacity_factor)
        _check_modules("attention_target_modules", self.attention_target_modules, ATTENTION_MODULES)
        _check_modules("expert_target_modules", self.expert_target_modules, FFN_MODULES)
        if self.routing_strategy not in ("topk", "dynamic", "switch"):
            raise AdapterConfigError(
                f"routing_strategy must be 'topk', 'dynamic' or 'switch', got {self.routing_strategy!r}"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise AdapterConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.capacity_factor <= 0:
            raise AdapterConfigError(f"capacity_factor must be > 0, got {self.capacity_factor}")
        if self.aux_loss_pooling not in ("layer_mean", "pooled"):
            raise AdapterConfigError(
                f"aux_loss_pooling must be 'layer_mean' or 'pooled', got {self.aux_loss_pooling!r}"
            )
        if self.expert_backend not in ("auto", "eager", "fused"):
            raise AdapterConfigError(
                f"expert_backend must be 'auto', 'eager' or 'fused', got {self.expert_backend!r}"
            )
        return self
