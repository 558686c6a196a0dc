"""LoRA-Switch config (the schema of its adapter_config.json)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..base import ALL_LINEAR_MODULES, AdapterConfigError, _check_targets, _RoutedConfig, check_str


@dataclass
class LoraSwitchConfig(_RoutedConfig):
    """LoRA-Switch (Kong et al. 2024, arXiv 2405.17741): N LoRA experts on every adapted linear,
    one token-wise router at the first decoder layer's input shared by all layers.

    switch_mode: "merge" merges the selected experts into the backbone at batch-1 decode (one
    fused Triton launch for all layers), "unmerged" always computes y = Wx + sum g B A x,
    "auto" merges where it is valid (batch 1, eval mode, one new token, CUDA).
    """

    target_modules: tuple[str, ...] = ALL_LINEAR_MODULES
    switch_mode: str = "auto"

    method: ClassVar[str] = "lora_switch"

    def validate(self) -> "LoraSwitchConfig":
        super().validate()
        self.target_modules = _check_targets(self.target_modules)
        check_str("switch_mode", self.switch_mode)
        if self.switch_mode not in ("auto", "merge", "unmerged"):
            raise AdapterConfigError(
                f"switch_mode must be 'auto', 'merge' or 'unmerged', got {self.switch_mode!r}"
            )
        return self
