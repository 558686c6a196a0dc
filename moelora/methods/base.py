"""What every adapter method shares: the LoRA and router hyperparameters, their checks, the error type.

Each method's own config dataclass lives in its folder (``moelora/methods/<method>/config.py``) and
is also the ``adapter_config.json`` schema of that method.

Every field is saved, so a loaded adapter reproduces the router and expert hyperparameters it
was trained with (the reference MixLoRA code forgets router coef/jitter/init range; we do not).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN_MODULES = ("gate_proj", "up_proj", "down_proj")
ALL_LINEAR_MODULES = ATTENTION_MODULES + FFN_MODULES

FORMAT_VERSION = 1


class AdapterConfigError(ValueError):
    """A config value or key is invalid; the message says which and how to fix it."""


# ---- type checks: one line naming the key, the value and the expected type -----------------
def _type_error(key: str, value: Any, expected: str) -> AdapterConfigError:
    return AdapterConfigError(f"{key}={value!r} has the wrong type: expected {expected}, got {type(value).__name__}")


def check_int(key: str, value: Any) -> None:
    """An integer (bool and float are refused: ``num_experts=True`` and ``top_k=2.0`` are mistakes)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _type_error(key, value, "an integer")


def check_number(key: str, value: Any) -> None:
    """A finite real number (int or float; bool, strings such as ``"16"``, inf and nan are refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _type_error(key, value, "a number")
    if not math.isfinite(value):
        raise AdapterConfigError(f"{key}={value!r} is not a finite number")


def check_bool(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise _type_error(key, value, "true or false")


def check_str(key: str, value: Any, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str):
        raise _type_error(key, value, "a string or null" if optional else "a string")


def check_names(key: str, value: Any) -> tuple[str, ...]:
    """A list/tuple of module names; a single string is refused (it would iterate into letters)."""
    if isinstance(value, (str, bytes)):
        raise AdapterConfigError(f"{key}={value!r} has the wrong type: expected a list of module names "
                                 f"such as [{value!r}], got a single string")
    if isinstance(value, Mapping) or not isinstance(value, Iterable):
        raise _type_error(key, value, "a list of module names")
    names = tuple(value)
    bad = [v for v in names if not isinstance(v, str)]
    if bad:
        raise AdapterConfigError(f"{key}={list(names)!r} has the wrong type: expected a list of module names "
                                 f"(strings), got {bad[0]!r} ({type(bad[0]).__name__})")
    return names


@dataclass
class _LoraHParams:
    """Hyperparameters shared by every LoRA-based method (docs/design.md §1 notation)."""

    r: int = 8  # LoRA rank R
    lora_alpha: float = 16  # scale s = alpha / r (alpha / sqrt(r) with use_rslora)
    lora_dropout: float = 0.05  # dropout on the LoRA input only, training only
    use_rslora: bool = False  # rank-stabilised scale alpha/sqrt(r) (Kalajdzievski 2023)
    init_lora_weights: str = "kaiming"  # A: "kaiming" (uniform, a=sqrt(5)) or "gaussian" (std 1/r); B = 0
    adapter_dtype: str = "auto"  # "auto" = the base weight's dtype, or "float32"/"bfloat16"/"float16"
    base_model_name_or_path: str | None = None  # informational; filled by inject if known
    base_model_type: str | None = None  # HF config.model_type, filled by inject, checked by load

    method: ClassVar[str] = "base"
    # keys an adapter_config.json must hold (others may be missing in older files: their defaults apply)
    required_keys: ClassVar[tuple[str, ...]] = ("r", "lora_alpha")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (self.r**0.5 if self.use_rslora else self.r)

    def validate(self) -> "_LoraHParams":
        """Raise AdapterConfigError with a clear message if a value has the wrong type or is out of range."""
        check_int("r", self.r)
        check_number("lora_alpha", self.lora_alpha)
        check_number("lora_dropout", self.lora_dropout)
        check_bool("use_rslora", self.use_rslora)
        check_str("init_lora_weights", self.init_lora_weights)
        check_str("adapter_dtype", self.adapter_dtype)
        check_str("base_model_name_or_path", self.base_model_name_or_path, optional=True)
        check_str("base_model_type", self.base_model_type, optional=True)
        if self.r <= 0:
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
    modules = check_names("target_modules", modules)
    if not modules:
        raise AdapterConfigError("target_modules is empty: name at least one linear to adapt")
    _check_modules("target_modules", modules, ALL_LINEAR_MODULES)
    return modules


@dataclass
class _RoutedConfig(_LoraHParams):
    """Router hyperparameters shared by the mixture methods."""

    num_experts: int = 8  # E
    top_k: int = 2  # K
    router_aux_loss_coef: float = 0.01  # coef of the Switch/Mixtral load-balance loss
    router_init_range: float = 0.02  # router weight ~ N(0, range^2)
    jitter_noise: float = 0.0  # multiplicative U(1-eps, 1+eps) on the router input, training only

    required_keys: ClassVar[tuple[str, ...]] = ("r", "lora_alpha", "num_experts", "top_k")

    def validate(self) -> "_RoutedConfig":
        super().validate()
        check_int("num_experts", self.num_experts)
        check_int("top_k", self.top_k)
        check_number("router_aux_loss_coef", self.router_aux_loss_coef)
        check_number("router_init_range", self.router_init_range)
        check_number("jitter_noise", self.jitter_noise)
        if self.num_experts <= 0:
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
