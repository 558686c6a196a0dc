"""MoE-PEFT (``moe-peft`` 2.0.2 on PyPI, TUDB-Labs) and mLoRA (``mlora`` 0.5.2, its predecessor,
whose API MoE-PEFT kept) as baselines: MoE-PEFT's MixLoRA step in ``moelora.bench.training_step``
(issue 19) and both as multi-adapter trainers in ``moelora.bench.concurrent_training`` (issue 17).
Only this module touches them; both are optional (an ImportError is the row's error). The package
is a parameter (``PACKAGES``); the model object remembers which one built it.

What it takes to run MoE-PEFT 2.0.2 here (it pins torch < 2.6 and transformers < 4.47; installed
with ``pip install --no-deps``, it runs on torch 2.13 / transformers 5.x with two shims, both below):

- its LLaMA wrapper reads ``config.rope_theta``, which transformers 5 moved into
  ``config.rope_parameters``: the value is copied back onto the config;
- its package ``__init__`` imports ``datasets`` and ``evaluate`` (for its training dispatcher and
  task metrics, which the bench does not use): where one is not installed (the GPU machine has
  neither), an empty placeholder module stands in while MoE-PEFT is imported.

The base is the same random model the other methods get; MoE-PEFT wraps it (``models.from_pretrained``
on the loaded module, its eager attention), adds one MixLoRA adapter (experts on gate/up/down,
LoRA on attention, as moelora's MixLoRA), and a step is its forward on a ``LLMModelInput`` (token
id lists, as its trainer feeds them), loss + aux loss, backward; the optimizer step is the
bench's (AdamW over the adapter tensors MoE-PEFT reports). Precision is MoE-PEFT's own: the base
in the bench's dtype, its adapters in fp32 with explicit casts, and no autocast (its trainer never
enters one, and its fused LoRA backward fails under one: ``make_step`` leaves it off)."""
from __future__ import annotations

import importlib
import logging
import sys
import types

import torch

NAME = "moe_peft_mixlora"
METHODS = {NAME: "moe_peft", "mlora_mixlora": "mlora"}  # training_step method -> package
PACKAGES = ("moe_peft", "mlora")  # install with pip --no-deps: MoE-PEFT pins torch < 2.6, mLoRA torch < 2.4
# imported by MoE-PEFT's package __init__ for its trainer/evaluator only (the bench uses neither)
_OPTIONAL = ("datasets", "evaluate")
ADAPTER = "mix"


def _import(package: str = "moe_peft"):
    if package not in PACKAGES:
        raise ValueError(f"unknown baseline package {package!r}; choose from {', '.join(PACKAGES)}")
    # both packages call logging.basicConfig(force=True) on import (root handlers replaced, level
    # WARN): the caller's logging is put back as it was
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    placeholders = {}
    for name in _OPTIONAL:
        try:
            importlib.import_module(name)
        except ImportError:
            placeholders[name] = sys.modules[name] = types.ModuleType(name)
    try:
        return importlib.import_module(package)
    finally:
        for name, module in placeholders.items():
            if sys.modules.get(name) is module:
                del sys.modules[name]
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)


def _package(llm) -> types.ModuleType:
    """The package (moe_peft or mlora) whose ``LLMModel`` ``llm`` is."""
    return sys.modules[type(llm).__module__.split(".")[0]]


def wrap(model, device: torch.device, package: str = "moe_peft"):
    """``package``'s ``LLMModel`` over ``model`` (an HF LlamaForCausalLM, frozen), no adapter yet."""
    mp = _import(package)
    from_pretrained = importlib.import_module(f"{package}.models").from_pretrained

    cfg = model.config
    if not hasattr(cfg, "rope_theta"):
        cfg.rope_theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return mp.LLMModel(from_pretrained(model, attn_impl="eager", use_sliding_window=False, device=str(device)))


def add_adapter(llm, name: str, r: int, dropout: float, targets, seed: int, experts: int | None = None,
                top_k: int = 2) -> None:
    """One adapter ``name`` on ``targets``: plain LoRA (``experts`` None) or MixLoRA with ``experts``
    experts top-``top_k`` (experts on the FFN linears, LoRA on attention); rank ``r``, alpha 2r; B
    filled N(0, 0.02) as the bench's other adapters (a zero B would be another computation)."""
    mp = _package(llm)
    factory = getattr(mp, "lora_config_factory", None) or importlib.import_module(f"{mp.__name__}.adapters").lora_config_factory
    cfg = {"name": name, "task_name": "casual", "r": r, "lora_alpha": 2 * r, "lora_dropout": dropout,
           "target_modules": list(targets)}
    if experts:
        cfg.update({"peft_type": "MIXLORA", "routing_strategy": "mixlora", "num_experts": experts, "top_k": top_k})
    llm.init_adapter(factory(cfg))
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for key, t in llm.get_adapter_weight_dict(name).items():
            if "lora_B" in key:
                t.copy_(torch.randn(t.shape, generator=g) * 0.02)


def build(model, r: int, dropout: float, experts: int, top_k: int, targets, device: torch.device, seed: int,
          package: str = "moe_peft"):
    """``package`` over ``model`` with one MixLoRA adapter (``ADAPTER``): the training-step bench's row."""
    llm = wrap(model, device, package)
    add_adapter(llm, ADAPTER, r, dropout, targets, seed, experts, top_k)
    return llm


def owns(model) -> bool:
    """Whether ``model`` is a MoE-PEFT or mLoRA model (without importing either)."""
    return type(model).__module__.split(".")[0] in PACKAGES


def params(llm, name: str = ADAPTER) -> list[torch.Tensor]:
    """The tensors MoE-PEFT trains for adapter ``name`` (router, attention LoRA, experts)."""
    return [t for t in llm.get_adapter_weight_dict(name).values() if t.requires_grad]


def loss(llm, ids: torch.Tensor) -> torch.Tensor:
    """One forward of ``ids`` (labels = ids, every token real): CE + its router aux loss."""
    mp = _package(llm)
    rows = ids.tolist()
    inp = mp.LLMModelInput(batch_configs_=[mp.LLMBatchConfig(ADAPTER, 0, len(rows))], batch_tokens_=rows,
                           batch_labels_=rows, batch_masks_=[[True] * len(r) for r in rows])
    out = llm.forward(inp)[0]
    return out.loss if out.aux_loss is None else out.loss + out.aux_loss


def job_losses(llm, jobs: list[tuple[str, dict]], pad_id: int) -> list[torch.Tensor]:
    """One MoE-PEFT forward over several adapters' micro-batches, as its trainer packs them: every
    row padded to the longest row of the step (MoE-PEFT pads every job to the longest sequence),
    one ``LLMBatchConfig`` (row range) per adapter. ``jobs``: (adapter name, batch with input_ids,
    attention_mask, labels (-100 = not in the loss)). Returns each adapter's CE (+ its aux loss)."""
    mp = _package(llm)
    T = max(int(b["input_ids"].shape[1]) for _, b in jobs)
    tokens, labels, masks, configs, at = [], [], [], [], 0
    for name, b in jobs:
        ids, mask, lab = b["input_ids"].tolist(), b["attention_mask"].tolist(), b["labels"].tolist()
        for i, m, y in zip(ids, mask, lab):
            pad = T - len(i)
            tokens.append(i + [pad_id] * pad)
            labels.append(y + [-100] * pad)
            masks.append([bool(v) for v in m] + [False] * pad)
        configs.append(mp.LLMBatchConfig(name, at, at + len(ids)))
        at += len(ids)
    outs = llm.forward(mp.LLMModelInput(batch_configs_=configs, batch_tokens_=tokens, batch_labels_=labels,
                                        batch_masks_=masks))
    return [o.loss if o.aux_loss is None else o.loss + o.aux_loss for o in outs]
