"""Adapter configurations: one dataclass per method, which is also the adapter_config.json schema.

Every field is saved, so a loaded adapter reproduces the router and expert hyperparameters it
was trained with (the reference MixLoRA code forgets router coef/jitter/init range; we do not).
Each class lives with its method (``moelora/methods/<method>/config.py``); this module gathers
them and turns a saved dict back into a config.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from .methods.base import (  # noqa: F401 - re-exported
    ALL_LINEAR_MODULES,
    ATTENTION_MODULES,
    FFN_MODULES,
    FORMAT_VERSION,
    AdapterConfigError,
)
from .methods.lora.config import LoraConfig
from .methods.lora_switch.config import LoraSwitchConfig
from .methods.mixlora.config import MixLoraConfig
from .methods.registry import INJECTORS

CONFIG_CLASSES: dict[str, type] = {c.method: c for c in INJECTORS}  # method name -> config class
AdapterConfig = LoraConfig | MixLoraConfig | LoraSwitchConfig


def config_from_dict(d: dict[str, Any], *, require_keys: bool = False) -> AdapterConfig:
    """Build and validate a config from its dict form; unknown keys are an error, not ignored.

    Anything malformed (not a mapping, an unknown method or key, a value of the wrong type) raises
    ``AdapterConfigError`` naming it. ``require_keys=True`` (adapter files) also requires the keys
    every saved config holds (``r``, ``lora_alpha``; ``num_experts``, ``top_k`` for the mixtures)
    instead of silently taking their defaults."""
    if not isinstance(d, Mapping):
        raise AdapterConfigError(
            f"an adapter config must be a mapping of keys to values (a JSON object), got {type(d).__name__}: {d!r:.80}"
        )
    d = dict(d)
    bad_keys = [k for k in d if not isinstance(k, str)]
    if bad_keys:
        raise AdapterConfigError(f"adapter config keys must be strings, got {bad_keys[0]!r}")
    method = d.pop("method", None)
    d.pop("format_version", None)
    if not isinstance(method, str) or method not in CONFIG_CLASSES:
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
    if require_keys:
        missing = [k for k in cls.required_keys if k not in d]
        if missing:
            raise AdapterConfigError(f"adapter config of method {method!r} is missing the key(s) {missing}")
    for k, v in list(d.items()):
        if isinstance(v, list):
            d[k] = tuple(v)
    return cls(**d).validate()
