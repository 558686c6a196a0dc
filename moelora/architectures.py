"""Where the adaptable modules of each supported architecture live.

``ARCHITECTURES`` maps ``config.model_type`` to where the decoder layers live and what their
linears are called. Adding an architecture is one entry in that table (see README).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

from .methods.base import ATTENTION_MODULES


class UnsupportedArchitectureError(ValueError):
    """The model's architecture is not in ARCHITECTURES."""


@dataclass(frozen=True)
class ArchSpec:
    """Where the adaptable modules of one architecture are.

    attn / mlp map our logical names (q_proj, ..., gate_proj, ...) to the attribute names of
    the attention and MLP modules. Fused projections (Phi-3's qkv_proj, gate_up_proj) appear as
    the value of several logical names; they are adapted once, as a whole.
    """

    layers: str = "model.layers"
    attn_attr: str = "self_attn"
    mlp_attr: str = "mlp"
    attn: dict = field(default_factory=lambda: {m: m for m in ATTENTION_MODULES})
    mlp: dict = field(default_factory=lambda: {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"})
    act_attr: str = "act_fn"

    @property
    def stack(self) -> str:
        """The module that holds the decoder layers (its forward is one forward of the model)."""
        return self.layers.rsplit(".", 1)[0]


_LLAMA_LIKE = ArchSpec()
ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "phi3": ArchSpec(
        attn={"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "o_proj": "o_proj"},
        mlp={"gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj"},
        act_attr="activation_fn",
    ),
}


def arch_spec(model: nn.Module) -> ArchSpec:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not supported; supported architectures: "
            f"{sorted(ARCHITECTURES)}. Add an entry to moelora.ARCHITECTURES to support it."
        )
    return ARCHITECTURES[model_type]


def get_submodule(model: nn.Module, path: str) -> nn.Module:
    obj = model
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def decoder_layers(model: nn.Module, spec: ArchSpec | None = None) -> nn.ModuleList:
    spec = spec or arch_spec(model)
    return get_submodule(model, spec.layers)


def actual_names(mapping: dict, logical: tuple[str, ...]) -> list[str]:
    """Deduplicated attribute names for the logical targets, in first-seen order."""
    return list(dict.fromkeys(mapping[m] for m in logical if m in mapping))


def mlp_roles(spec: ArchSpec) -> dict[str, str]:
    if spec.mlp["gate_proj"] == spec.mlp["up_proj"]:
        return {"gate_up": spec.mlp["gate_proj"], "down": spec.mlp["down_proj"]}
    return {"gate": spec.mlp["gate_proj"], "up": spec.mlp["up_proj"], "down": spec.mlp["down_proj"]}
