"""Adapter files: ``adapter_config.json`` + ``adapter_model.safetensors`` (no pickle).

Also reads adapters written by the reference MixLoRA code (``adapter_model.bin``, loaded with
``torch.load(weights_only=True)``) and exports plain LoRA to a PEFT adapter folder.
Every write goes to a temporary folder first and is renamed into place, so a crash never
leaves a half-written adapter; every load is validated before the model is touched.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from .config import AdapterConfigError, LoraConfig, MixLoraConfig, config_from_dict
from .inject import (
    DEFAULT_ADAPTER,
    adapter_state,
    adapter_state_dict,
    add_adapter,
    arch_spec,
    delete_adapter,
    get_adapter_config,
    load_adapter_state_dict,
    remove_adapter,
    set_adapter,
)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
REFERENCE_WEIGHTS_NAME = "adapter_model.bin"


class AdapterFileError(ValueError):
    """An adapter folder is missing, truncated, corrupted, or does not fit the base model."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_dir(target: str | os.PathLike, write_fn) -> Path:
    """Call ``write_fn(tmp_dir)`` then move tmp_dir to ``target``, replacing it atomically enough:
    the old folder is renamed aside first and deleted only after the new one is in place."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write_fn(tmp)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            if old.exists():
                shutil.rmtree(old)
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _model_signature(model: nn.Module) -> dict:
    c = model.config
    return {
        "model_type": c.model_type,
        "hidden_size": getattr(c, "hidden_size", None),
        "num_hidden_layers": getattr(c, "num_hidden_layers", None),
        "intermediate_size": getattr(c, "intermediate_size", None),
    }


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None) -> Path:
    """Write one adapter (config + tensors; default: the active or only one) to the folder
    ``path``, atomically. The files hold that adapter alone, whatever else shares the model."""
    cfg = get_adapter_config(model, adapter_name)
    if cfg is None:
        raise ValueError("this model has no moelora adapter; call moelora.inject_adapter first")
    tensors = {k: v.contiguous().cpu() for k, v in adapter_state_dict(model, adapter_name).items()}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "moelora": __version__})
        meta = {
            "adapter": cfg.to_dict(),
            "base_model": _model_signature(model),
            "weights_sha256": _sha256(tmp / WEIGHTS_NAME),
            "moelora_version": __version__,
        }
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")

    return atomic_write_dir(path, write)


def read_adapter_config(path: str | os.PathLike):
    """Read and validate ``adapter_config.json`` of our format (no tensors loaded)."""
    path = Path(path)
    cfg_file = path / CONFIG_NAME
    if not path.is_dir():
        raise AdapterFileError(f"adapter folder {str(path)!r} does not exist")
    if not cfg_file.is_file():
        raise AdapterFileError(f"{str(cfg_file)!r} is missing: not an adapter folder (expected {CONFIG_NAME})")
    try:
        meta = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFileError(f"{str(cfg_file)!r} is not valid JSON ({e}); the file is corrupted") from e
    if "adapter" not in meta:
        raise AdapterFileError(f"{str(cfg_file)!r} has no 'adapter' section; not a moelora adapter")
    return config_from_dict(meta["adapter"]), meta


def load_adapter(base_model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None,
                 trainable: bool = True) -> nn.Module:
    """Add the adapter stored at ``path`` to ``base_model`` as ``adapter_name`` and load its tensors.

    On a model without moelora the adapter is named "default" (unless named) and made active,
    as ``inject_adapter`` does; on a model that has adapters already it is added beside them
    (``add_adapter``), not made active. Reads our format, or a reference MixLoRA folder
    (peft_type MIXLORA + adapter_model.bin). On any error (wrong base model, missing/extra
    tensor, shape mismatch, truncated or corrupted file, unknown config key) raises and leaves
    ``base_model`` exactly as it was, requires_grad flags included."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterFileError(f"adapter folder {str(path)!r} does not exist")
    state = adapter_state(base_model)
    fresh = state is None
    if adapter_name is None:
        if not fresh and DEFAULT_ADAPTER in state.adapters:
            raise ValueError(f"the model has adapters {sorted(state.adapters)} already: pass adapter_name= "
                             "to load this one beside them")
        adapter_name = DEFAULT_ADAPTER
    if _is_reference_mixlora(path):
        cfg, tensors = _read_reference_mixlora(path, base_model)
    else:
        cfg, meta = read_adapter_config(path)
        _check_base(meta, base_model, path)
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            raise AdapterFileError(f"{str(weights)!r} is missing")
        want = meta.get("weights_sha256")
        if want is not None and _sha256(weights) != want:
            raise AdapterFileError(
                f"{str(weights)!r} does not match the checksum in {CONFIG_NAME}: the file is corrupted or truncated"
            )
        try:
            tensors = load_file(str(weights))
        except (SafetensorError, OSError, ValueError) as e:
            raise AdapterFileError(f"{str(weights)!r} cannot be read ({e}); the file is truncated or corrupted") from e
    grads = {p: p.requires_grad for p in base_model.parameters()}
    add_adapter(base_model, adapter_name, cfg, trainable=trainable)
    try:
        load_adapter_state_dict(base_model, tensors, adapter_name)
        if fresh:
            set_adapter(base_model, adapter_name)
    except BaseException as e:
        if fresh:
            remove_adapter(base_model)
        else:
            delete_adapter(base_model, adapter_name)
        for p, g in grads.items():
            p.requires_grad_(g)
        if isinstance(e, (KeyError, ValueError)) and not isinstance(e, AdapterFileError):
            raise AdapterFileError(f"adapter at {str(path)!r} does not fit this model: {e}") from e
        raise
    return base_model


def _check_base(meta: dict, model: nn.Module, path: Path) -> None:
    want = meta.get("base_model", {})
    have = _model_signature(model)
    diffs = {k: (want[k], have[k]) for k in want if want.get(k) is not None and want[k] != have.get(k)}
    if diffs:
        desc = ", ".join(f"{k}: adapter {a!r} vs model {b!r}" for k, (a, b) in diffs.items())
        raise AdapterFileError(f"adapter at {str(path)!r} was trained for another base model ({desc})")


# ---- reference MixLoRA import ---------------------------------------------------------------
def _is_reference_mixlora(path: Path) -> bool:
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        return False
    try:
        return json.loads(cfg_file.read_text()).get("peft_type") == "MIXLORA"
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


_REF_KNOWN_KEYS = {
    "bias", "peft_type", "task_type", "base_model_name_or_path", "r", "lora_alpha", "lora_dropout",
    "target_modules", "use_dora", "use_rslora", "lora_init", "routing_strategy", "num_experts", "top_k",
    "router_aux_loss_coef", "router_init_range", "jitter_noise", "router_loss", "act_fn", "expert_lora",
}


def _read_reference_mixlora(path: Path, model: nn.Module):
    raw = json.loads((path / CONFIG_NAME).read_text())
    unknown = sorted(set(raw) - _REF_KNOWN_KEYS)
    if unknown:
        raise AdapterConfigError(f"reference MixLoRA config at {str(path)!r} has unknown key(s) {unknown}")
    if raw.get("routing_strategy", "mixlora") != "mixlora":
        raise AdapterConfigError(f"only the reference routing_strategy 'mixlora' can be imported, got {raw['routing_strategy']!r}")
    if raw.get("use_dora"):
        raise AdapterConfigError("reference adapters with use_dora=true are not supported")
    if "expert_lora" in raw:
        raise AdapterConfigError("reference adapters with a separate expert_lora config are not supported")
    act = raw.get("act_fn")
    model_act = getattr(model.config, "hidden_activation", None) or getattr(model.config, "hidden_act", None)
    if act is not None and act != model_act:
        raise AdapterConfigError(
            f"reference adapter uses act_fn {act!r} but the base model's FFN uses {model_act!r}; "
            "moelora experts share the frozen FFN and its activation"
        )
    targets = raw["target_modules"]
    if isinstance(targets, dict):
        targets = [k for k, v in targets.items() if v]
    spec = arch_spec(model)
    inv_attn = {v: k for k, v in spec.attn.items()}
    attn = tuple(dict.fromkeys(inv_attn[t] for t in targets if t in inv_attn))
    mlp = tuple(m for m in ("gate_proj", "up_proj", "down_proj") if spec.mlp[m] in targets)
    cfg = MixLoraConfig(
        r=raw["r"], lora_alpha=raw["lora_alpha"], lora_dropout=float(raw.get("lora_dropout", 0.0)),
        use_rslora=bool(raw.get("use_rslora", False)),
        init_lora_weights="gaussian" if raw.get("lora_init") == "gaussian" else "kaiming",
        num_experts=raw["num_experts"], top_k=raw.get("top_k", 2),
        router_aux_loss_coef=float(raw.get("router_aux_loss_coef", 0.001)),
        router_init_range=float(raw.get("router_init_range", 0.02)),
        jitter_noise=float(raw.get("jitter_noise", 0.0)),
        aux_loss_pooling="pooled", attention_target_modules=attn, expert_target_modules=mlp,
        base_model_name_or_path=raw.get("base_model_name_or_path"),
    ).validate()
    weights = path / REFERENCE_WEIGHTS_NAME
    if not weights.is_file():
        raise AdapterFileError(f"{str(weights)!r} is missing")
    try:
        ref = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated zips / unpickling errors
        raise AdapterFileError(f"{str(weights)!r} cannot be read ({e}); the file is truncated or corrupted") from e
    return cfg, _convert_reference_state(ref, cfg, model, spec)


_REF_ATTN = re.compile(r"mixlora\.layers\.(\d+)\.self_attn\.(\w+)\.lora_([AB])\.weight")
_REF_EXPERT = re.compile(r"mixlora\.layers\.(\d+)\.mlp\.(\w+)\.experts\.(\d+)\.lora_([AB])\.weight")
_REF_GATE = re.compile(r"mixlora\.layers\.(\d+)\.mlp\.moe_gate\.weight")


def _convert_reference_state(ref: dict, cfg: MixLoraConfig, model: nn.Module, spec) -> dict[str, torch.Tensor]:
    """Map reference keys to our module paths; expert tensors are stacked to (E, ...)."""
    layers_prefix = spec.layers
    state: dict[str, torch.Tensor] = {}
    experts: dict[tuple, dict[int, torch.Tensor]] = {}
    for key, t in ref.items():
        if m := _REF_ATTN.fullmatch(key):
            i, proj, ab = m.groups()
            state[f"{layers_prefix}.{i}.{spec.attn_attr}.{proj}.lora_{ab}"] = t
        elif m := _REF_EXPERT.fullmatch(key):
            i, proj, e, ab = m.groups()
            experts.setdefault((i, proj, ab), {})[int(e)] = t
        elif m := _REF_GATE.fullmatch(key):
            state[f"{layers_prefix}.{m.group(1)}.{spec.mlp_attr}.router.weight"] = t.float()
        else:
            raise AdapterFileError(f"unexpected tensor {key!r} in reference MixLoRA weights")
    for (i, proj, ab), per_expert in experts.items():
        if sorted(per_expert) != list(range(cfg.num_experts)):
            raise AdapterFileError(f"layer {i} {proj}: expert tensors {sorted(per_expert)} do not cover 0..{cfg.num_experts - 1}")
        stacked = torch.stack([per_expert[e] for e in range(cfg.num_experts)])
        state[f"{layers_prefix}.{i}.{spec.mlp_attr}.experts.{proj}.lora_{ab}"] = stacked
    return state


# ---- PEFT export ----------------------------------------------------------------------------
def export_peft(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None) -> Path:
    """Write a plain-LoRA adapter as a PEFT folder that ``peft.PeftModel.from_pretrained`` loads."""
    cfg = get_adapter_config(model, adapter_name)
    if not isinstance(cfg, LoraConfig):
        raise ValueError("only plain LoRA adapters (moelora.LoraConfig) can be exported to PEFT")
    spec = arch_spec(model)
    targets = sorted({spec.attn.get(m) or spec.mlp.get(m) for m in cfg.target_modules})
    peft_cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.r, "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout, "target_modules": targets, "bias": "none",
        "use_rslora": cfg.use_rslora, "fan_in_fan_out": False, "inference_mode": True,
        "base_model_name_or_path": cfg.base_model_name_or_path, "modules_to_save": None,
        "init_lora_weights": True,
    }
    tensors = {}
    for k, v in adapter_state_dict(model, adapter_name).items():
        # ours: model.layers.0.self_attn.q_proj.lora_A -> PEFT: base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight
        tensors[f"base_model.model.{k}.weight"] = v.contiguous().cpu()

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(peft_cfg, indent=2, sort_keys=True) + "\n")

    return atomic_write_dir(path, write)
