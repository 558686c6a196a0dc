"""Plain LoRA config (the schema of its adapter_config.json)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..base import ALL_LINEAR_MODULES, _check_targets, _LoraHParams


@dataclass
class LoraConfig(_LoraHParams):
    """Plain LoRA (Hu et al. 2021) on the named linears: the baseline of every experiment."""

    target_modules: tuple[str, ...] = ALL_LINEAR_MODULES

    method: ClassVar[str] = "lora"

    def validate(self) -> "LoraConfig":
        super().validate()
        self.target_modules = _check_targets(self.target_modules)
        return self
