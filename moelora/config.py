"""Adapter configurations: one dataclass per method, which is also the adapter_config.json schema.

Every field is saved, so a loaded adapter reproduces the router and expert hyperparameters it
was trained with (the reference MixLoRA code forgets router coef/jitter/init range; we do not).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN_MODULES = ("gate_proj", "up_proj", "down_proj")
ALL_LINEAR_MODULES = ATTENTION_MODULES + FFN_MODULES

FORMAT_VERSION = 1


class AdapterConfigError(ValueError):
    """A config value or key is invalid; the message says which and how to fix it."""


@dataclass
class _LoraHParams:
    """Hyperparameters shared by every LoRA-based method (DESIGN.md §1 notation)."""

    r: int = 8  # LoRA rank R
    lora_alpha: float = 16  # scale s = alpha / r (alpha / sqrt(r) with use_rslora)
    lora_dropout: float = 0.05  # dropout on the LoRA input only, training only
    use_rslora: bool = False  # rank-stabilised scale alpha/sqrt(r) (Kalajdzievski 2023)
    init_lora_weights: str = "kaiming"  # A: "kaiming" (uniform, a=sqrt(5)) or "gaussian" (std 1/r); B = 0
    adapter_dtype: str = "auto"  # "auto" = the base weight's dtype, or "float32"/"bfloat16"/"float16"
    base_model_name_or_path: str | None = None  # informational; filled by inject if known
    base_model_type: str | None = None  # HF config.model_type, filled by inject, checked by load

    method: ClassVar[str] = "base"

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (self.r**0.5 if self.use_rslora else self.r)

    def validate(self) -> "_LoraHParams":
        """Raise AdapterConfigError with a clear message if a value is out of range."""
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise AdapterConfigError(f"r must be a positive integer, got {self.r!r}")
        if not self.lora_alpha > 0:
            raise AdapterConfigError(f"lora_alpha must be > 0, got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise AdapterConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.init_lora_weights not in ("kaiming", "gaussian"):
            raise AdapterConfigError(
                f"init_lora_weights must be 'kaiming' or 'gaussian', got {self.init_lora_weights!r}"
            )
        if self.adapter_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise AdapterConfigError(
                f"adapter_dtype must be auto/float32/bfloat16/float16, got {self.adapter_dtype!r}"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        d = {"method": self.method, "format_version": FORMAT_VERSION}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            d[f.name] = list(v) if isinstance(v, tuple) else v
        return d


def _check_modules(name: str, modules: tuple[str, ...], allowed: tuple[str, ...]) -> None:
    bad = [m for m in modules if m not in allowed]
    if bad:
        raise AdapterConfigError(f"{name} has unknown module names {bad}; choose from {list(allowed)}")


def _check_targets(modules) -> tuple[str, ...]:
    """target_modules of LoRA / LoRA-Switch: a non-empty subset of the seven linears."""
    modules = tuple(modules)
    if not modules:
        raise AdapterConfigError("target_modules is empty: name at least one linear to adapt")
    _check_modules("target_modules", modules, ALL_LINEAR_MODULES)
    return modules


@dataclass
class LoraConfig(_LoraHParams):
    """Plain LoRA (Hu et al. 2021) on the named linears: the baseline of every experiment."""

    target_modules: tuple[str, ...] = ALL_LINEAR_MODULES

    method: ClassVar[str] = "lora"

    def validate(self) -> "LoraConfig":
        super().validate()
        self.target_modules = _check_targets(self.target_modules)
        return self


@dataclass
class _RoutedConfig(_LoraHParams):
    """Router hyperparameters shared by the mixture methods."""

    num_experts: int = 8  # E
    top_k: int = 2  # K
    router_aux_loss_coef: float = 0.01  # coef of the Switch/Mixtral load-balance loss
    router_init_range: float = 0.02  # router weight ~ N(0, range^2)
    jitter_noise: float = 0.0  # multiplicative U(1-eps, 1+eps) on the router input, training only

    def validate(self) -> "_RoutedConfig":
        super().validate()
        if not isinstance(self.num_experts, int) or self.num_experts <= 0:
            raise AdapterConfigError(f"num_experts must be a positive integer, got {self.num_experts!r}")
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.num_experts:
            raise AdapterConfigError(
                f"top_k must be an integer in [1, num_experts={self.num_experts}], got {self.top_k!r}"
            )
        if self.router_aux_loss_coef < 0:
            raise AdapterConfigError(f"router_aux_loss_coef must be >= 0, got {self.router_aux_loss_coef}")
        if self.router_init_range < 0:
            raise AdapterConfigError(f"router_init_range must be >= 0, got {self.router_init_range}")
        if not 0.0 <= self.jitter_noise < 1.0:
            raise AdapterConfigError(f"jitter_noise must be in [0, 1), got {self.jitter_noise}")
        return self


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

    method: ClassVar[str] = "mixlora"

    def validate(self) -> "MixLoraConfig":
        super().validate()
        self.attention_target_modules = tuple(self.attention_target_modules)
        self.expert_target_modules = tuple(self.expert_target_modules)
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
        if self.switch_mode not in ("auto", "merge", "unmerged"):
            raise AdapterConfigError(
                f"switch_mode must be 'auto', 'merge' or 'unmerged', got {self.switch_mode!r}"
            )
        return self


CONFIG_CLASSES: dict[str, type] = {c.method: c for c in (LoraConfig, MixLoraConfig, LoraSwitchConfig)}
AdapterConfig = LoraConfig | MixLoraConfig | LoraSwitchConfig


def config_from_dict(d: dict[str, Any]) -> AdapterConfig:
    """Build and validate a config from its dict form; unknown keys are an error, not ignored."""
    d = dict(d)
    method = d.pop("method", None)
    d.pop("format_version", None)
    if method not in CONFIG_CLASSES:
        raise AdapterConfigError(
            f"unknown adapter method {method!r}; supported: {sorted(CONFIG_CLASSES)}"
        )
    cls = CONFIG_CLASSES[method]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise AdapterConfigError(
            f"unknown key(s) {unknown} for method {method!r}; valid keys: {sorted(names)}"
        )
    for k, v in list(d.items()):
        if isinstance(v, list):
            d[k] = tuple(v)
    return cls(**d).validate()
