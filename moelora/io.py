"""Adapter files: ``adapter_config.json`` + ``adapter_model.safetensors`` (no pickle).

Also reads adapters written by the reference MixLoRA code (``adapter_model.bin``, loaded with
``torch.load(weights_only=True)``) and exports plain LoRA to a PEFT adapter folder.
Writes (``save_adapter``, ``export_peft``, see ``atomic_write_dir``) go to a temporary folder
that is swapped into place, so an interrupt at any moment leaves the old or the new complete
adapter, and they never delete anything they did not write; every load is validated before the
model is touched, and a failed load leaves the model exactly as it was.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import pickle
import re
import secrets
import stat
import sys
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from .config import AdapterConfigError, LoraConfig, MixLoraConfig, config_from_dict
from .methods.base import check_bool, check_names, check_number
from .inject import (
    DEFAULT_ADAPTER,
    adapter_state,
    adapter_state_dict,
    add_adapter,
    arch_spec,
    get_adapter_config,
    load_adapter_state_dict,
    set_adapter,
    transaction,
)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
REFERENCE_WEIGHTS_NAME = "adapter_model.bin"


class AdapterFileError(ValueError):
    """An adapter folder is missing, truncated, corrupted, or does not fit the base model."""


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file (the adapter format's weights_sha256), read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# Names an adapter folder of ours (or a PEFT export) holds: replacing such a folder is fine.
ADAPTER_FILES = frozenset({CONFIG_NAME, WEIGHTS_NAME})
_TMP_MARK = ".moelora-tmp-"
_OLD_MARK = ".moelora-old-"


def _check_replaceable(target: Path) -> os.stat_result | None:
    """None when ``target`` does not exist; its stat when it is a folder we may replace (empty, or
    only adapter files and our own leftovers); otherwise AdapterFileError naming what is there."""
    try:
        st = os.stat(target)
    except FileNotFoundError:
        if target.is_symlink():
            raise AdapterFileError(f"{str(target)!r} is a broken symbolic link: refusing to write an adapter "
                                   "there (nothing was changed); remove it or choose another path") from None
        return None
    if not stat.S_ISDIR(st.st_mode):
        kind = "a regular file" if stat.S_ISREG(st.st_mode) else "not a folder"
        raise AdapterFileError(
            f"{str(target)!r} exists and is {kind}, not an adapter folder: refusing to replace it "
            "(nothing was changed); remove it or choose another path"
        )
    others = []
    for entry in sorted(os.scandir(target), key=lambda e: e.name):
        if entry.name in ADAPTER_FILES and entry.is_file(follow_symlinks=False):
            continue
        if entry.name.startswith(_TMP_MARK):  # a temporary file of an interrupted write of ours
            continue
        others.append(entry.name + ("/" if entry.is_dir(follow_symlinks=False) else ""))
    if others:
        shown = ", ".join(repr(n) for n in others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise AdapterFileError(
            f"{str(target)!r} holds {shown} besides adapter files: refusing to replace the folder, "
            "which would delete them (nothing was changed); save to another path or move them away"
        )
    return st


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL / ENOSYS / EOPNOTSUPP: the filesystem or kernel cannot exchange
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_ours(folder: Path) -> None:
    """Delete the adapter files (and our temporaries) in ``folder``, then the folder if empty."""
    for entry in os.scandir(folder):
        if (entry.name in ADAPTER_FILES or entry.name.startswith(_TMP_MARK)) and entry.is_file(follow_symlinks=False):
            os.unlink(entry.path)
    try:
        os.rmdir(folder)
    except OSError:
        warnings.warn(f"{str(folder)!r} holds files moelora did not write; it was left in place", RuntimeWarning,
                      stacklevel=3)


def atomic_write_dir(target: str | os.PathLike, write_fn) -> Path:
    """Call ``write_fn(tmp_dir)`` to write the adapter files, then put them at the folder ``target``.

    Never deletes what moelora did not write: ``target`` may be missing, an empty folder or an
    adapter folder (only ``adapter_config.json`` / ``adapter_model.safetensors``, ours or a PEFT
    export), which is replaced; a regular file or a folder holding anything else raises
    ``AdapterFileError`` naming it, before anything is written. The replace never leaves a moment
    without a complete adapter at ``target``: the new folder is written beside it (files flushed
    to disk) and the two are swapped in one atomic ``renameat2(RENAME_EXCHANGE)``, then the old
    files are deleted. Where the filesystem cannot exchange, each file is ``os.replace``d into the
    existing folder, weights first and ``adapter_config.json`` last: an interrupt between the two
    leaves new weights beside the old config, whose checksum then refuses them at load
    (``AdapterFileError``), never a silently mixed adapter. The folder and files get the modes
    any file the user writes gets (the umask; a replaced folder keeps its mode)."""
    target = Path(target)
    if target.is_symlink() and target.is_dir():  # replace the folder the link points to, keep the link
        target = Path(os.path.realpath(target))
    existing = _check_replaceable(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = target.with_name(f"{_TMP_MARK}{target.name}-{secrets.token_hex(4)}")
        try:
            os.mkdir(tmp)  # mode 0o777 minus the umask, like any folder the user makes
            break
        except FileExistsError:
            continue
    try:
        write_fn(tmp)
        # safetensors writes 0600 files: give them the mode the umask gives any new file
        # (the folder was made with 0o777 minus the umask, so its mode tells the umask)
        file_mode = stat.S_IMODE(os.stat(tmp).st_mode) & 0o666
        for f in os.listdir(tmp):
            os.chmod(tmp / f, file_mode)
            _fsync(tmp / f)
        if existing is not None:
            os.chmod(tmp, stat.S_IMODE(existing.st_mode))
            _check_replaceable(target)  # again, just before the swap
            if _exchange(tmp, target):
                _remove_ours(tmp)  # tmp now holds the old adapter
                return target
            names = sorted(os.listdir(tmp), key=lambda n: n == CONFIG_NAME)  # the config last
            for name in names:
                os.replace(tmp / name, target / name)
            for name in ADAPTER_FILES - set(names):  # an adapter file the new version does not have
                if (target / name).is_file():
                    os.unlink(target / name)
            os.rmdir(tmp)
        else:
            os.rename(tmp, target)
    except BaseException:
        if tmp.is_dir():
            _remove_ours(tmp)
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
    ``path``, atomically. The files hold that adapter alone, whatever else shares the model.

    ``path`` may be new, an empty folder, or an adapter folder (ours or a PEFT export), which is
    replaced in one atomic swap; a regular file or a folder holding anything else raises
    ``AdapterFileError`` and nothing is changed (``atomic_write_dir``)."""
    cfg = get_adapter_config(model, adapter_name)
    if cfg is None:
        raise ValueError("this model has no moelora adapter; call moelora.inject_adapter first")
    tensors = {k: v.contiguous().cpu() for k, v in adapter_state_dict(model, adapter_name).items()}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "moelora": __version__})
        meta = {
            "adapter": cfg.to_dict(),
            "base_model": _model_signature(model),
            "weights_sha256": file_sha256(tmp / WEIGHTS_NAME),
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
    except OSError as e:
        raise AdapterFileError(f"{str(cfg_file)!r} cannot be read ({e})") from e
    if not isinstance(meta, dict):
        raise AdapterFileError(f"{str(cfg_file)!r} holds a JSON {type(meta).__name__}, not an object; "
                               "not a moelora adapter config")
    if "adapter" not in meta:
        raise AdapterFileError(f"{str(cfg_file)!r} has no 'adapter' section; not a moelora adapter")
    for key in ("base_model",):
        if key in meta and not isinstance(meta[key], dict):
            raise AdapterConfigError(f"{str(cfg_file)!r}: the {key!r} section must be an object, got {meta[key]!r:.60}")
    if "weights_sha256" in meta and not isinstance(meta["weights_sha256"], str):
        raise AdapterConfigError(f"{str(cfg_file)!r}: weights_sha256 must be a string, got {meta['weights_sha256']!r:.60}")
    try:
        cfg = config_from_dict(meta["adapter"], require_keys=True)
    except AdapterConfigError as e:
        raise AdapterConfigError(f"{str(cfg_file)!r}: {e}") from e
    except (TypeError, ValueError) as e:  # anything validate() did not name
        raise AdapterConfigError(f"{str(cfg_file)!r}: invalid adapter config ({e})") from e
    return cfg, meta


def _check_tensors(tensors, weights: Path) -> dict[str, torch.Tensor]:
    """Adapter tensors are floating point: integer or bool tensors (bool would load as 1.0) are refused."""
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in tensors.items()):
        raise AdapterFileError(f"{str(weights)!r} holds objects other than a mapping of names to tensors; "
                               "refused for safety")
    bad = [(k, v.dtype) for k, v in sorted(tensors.items()) if not v.is_floating_point()]
    if bad:
        desc = ", ".join(f"{k} ({str(d).replace('torch.', '')})" for k, d in bad[:3])
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise AdapterFileError(f"{str(weights)!r} holds non-floating-point adapter tensor(s) {desc}{more}: "
                               "adapter weights must be float32/bfloat16/float16/float64")
    return tensors


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
        if want is not None and file_sha256(weights) != want:
            raise AdapterFileError(
                f"{str(weights)!r} does not match the checksum in {CONFIG_NAME}: the file is corrupted or truncated"
            )
        try:
            tensors = load_file(str(weights))
        except (SafetensorError, OSError, ValueError) as e:
            raise AdapterFileError(f"{str(weights)!r} cannot be read ({e}); the file is truncated or corrupted") from e
        except Exception as e:  # safetensors raises other types for some malformed headers
            raise AdapterFileError(f"{str(weights)!r} cannot be read ({type(e).__name__}: {e}); "
                                   "the file is truncated or corrupted") from e
        _check_tensors(tensors, weights)
    with transaction(base_model):  # on any error: the model exactly as before
        add_adapter(base_model, adapter_name, cfg, trainable=trainable)
        try:
            load_adapter_state_dict(base_model, tensors, adapter_name)
        except (KeyError, ValueError, TypeError) as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else e
            raise AdapterFileError(f"adapter at {str(path)!r} does not fit this model: {msg}") from e
        if fresh:
            set_adapter(base_model, adapter_name)
    return base_model


def _check_base(meta: dict, model: nn.Module, path: Path) -> None:
    want = dict(meta.get("base_model") or {})
    have = _model_signature(model)
    cfg_type = (meta.get("adapter") or {}).get("base_model_type")
    if cfg_type is not None and want.get("model_type") is None:
        want["model_type"] = cfg_type
    elif cfg_type is not None and cfg_type != want.get("model_type"):
        raise AdapterFileError(f"adapter at {str(path)!r} names two base models: base_model_type {cfg_type!r} "
                               f"vs base_model.model_type {want.get('model_type')!r}; the config is corrupted")
    diffs = {k: (want[k], have.get(k)) for k in want if want.get(k) is not None and want[k] != have.get(k)}
    if diffs:
        desc = ", ".join(f"{k}: adapter {a!r} vs model {b!r}" for k, (a, b) in diffs.items())
        raise AdapterFileError(f"adapter at {str(path)!r} was trained for another base model ({desc})")


# ---- reference MixLoRA import ---------------------------------------------------------------
def _is_reference_mixlora(path: Path) -> bool:
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        return False
    try:
        raw = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return False
    return isinstance(raw, dict) and raw.get("peft_type") == "MIXLORA"


_REF_KNOWN_KEYS = {
    "bias", "peft_type", "task_type", "base_model_name_or_path", "r", "lora_alpha", "lora_dropout",
    "target_modules", "use_dora", "use_rslora", "lora_init", "routing_strategy", "num_experts", "top_k",
    "router_aux_loss_coef", "router_init_range", "jitter_noise", "router_loss", "act_fn", "expert_lora",
}


def _read_reference_mixlora(path: Path, model: nn.Module):
    cfg_file = path / CONFIG_NAME
    raw = json.loads(cfg_file.read_text())  # _is_reference_mixlora parsed it: a dict
    where = f"reference MixLoRA config at {str(cfg_file)!r}"
    unknown = sorted(set(raw) - _REF_KNOWN_KEYS)
    if unknown:
        raise AdapterConfigError(f"{where} has unknown key(s) {unknown}")
    missing = [k for k in ("r", "lora_alpha", "num_experts", "target_modules") if raw.get(k) is None]
    if missing:
        raise AdapterConfigError(f"{where} is missing the key(s) {missing}")
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
    try:
        targets = check_names("target_modules", targets)
        for key in ("lora_dropout", "router_aux_loss_coef", "router_init_range", "jitter_noise"):
            if raw.get(key) is not None:
                check_number(key, raw[key])
        for key in ("use_rslora",):
            if raw.get(key) is not None:
                check_bool(key, raw[key])
    except AdapterConfigError as e:
        raise AdapterConfigError(f"{where}: {e}") from e
    spec = arch_spec(model)
    inv_attn = {v: k for k, v in spec.attn.items()}
    attn = tuple(dict.fromkeys(inv_attn[t] for t in targets if t in inv_attn))
    mlp = tuple(m for m in ("gate_proj", "up_proj", "down_proj") if spec.mlp[m] in targets)

    def get(key, default):
        v = raw.get(key)
        return default if v is None else v

    try:
        cfg = MixLoraConfig(
            r=raw["r"], lora_alpha=raw["lora_alpha"], lora_dropout=float(get("lora_dropout", 0.0)),
            use_rslora=get("use_rslora", False),
            init_lora_weights="gaussian" if raw.get("lora_init") == "gaussian" else "kaiming",
            num_experts=raw["num_experts"], top_k=get("top_k", 2),
            router_aux_loss_coef=float(get("router_aux_loss_coef", 0.001)),
            router_init_range=float(get("router_init_range", 0.02)),
            jitter_noise=float(get("jitter_noise", 0.0)),
            aux_loss_pooling="pooled", attention_target_modules=attn, expert_target_modules=mlp,
            base_model_name_or_path=raw.get("base_model_name_or_path"),
        ).validate()
    except AdapterConfigError as e:
        raise AdapterConfigError(f"{where}: {e}") from e
    weights = path / REFERENCE_WEIGHTS_NAME
    if not weights.is_file():
        raise AdapterFileError(f"{str(weights)!r} is missing")
    try:
        ref = torch.load(weights, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's weights-only unpickler names a class or function it refuses; an unknown opcode
        # ("Unsupported operand") or an unpickling error without that is a damaged file
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found is not None or any(m in str(e) for m in ("Can only build", "Trying to call reduce",
                                                           "Trying to unpickle", "Unsupported class")):
            what = f" (e.g. {found.group(1)})" if found else ""
            raise AdapterFileError(
                f"{str(weights)!r} holds objects other than tensors{what}: refused for safety, "
                "since loading them would run code from the file"
            ) from None
        raise AdapterFileError(f"{str(weights)!r} cannot be read; the file is truncated or corrupted") from None
    except Exception as e:  # torch raises many types for truncated zips / unpickling errors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AdapterFileError(f"{str(weights)!r} cannot be read ({first}); the file is truncated or corrupted") from None
    _check_tensors(ref, weights)
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
        shapes = {tuple(t.shape) for t in per_expert.values()}
        if len(shapes) != 1:
            raise AdapterFileError(f"layer {i} {proj} lora_{ab}: the experts' tensors have different shapes {sorted(shapes)}")
        stacked = torch.stack([per_expert[e] for e in range(cfg.num_experts)])
        state[f"{layers_prefix}.{i}.{spec.mlp_attr}.experts.{proj}.lora_{ab}"] = stacked
    return state


# ---- PEFT export ----------------------------------------------------------------------------
def export_peft(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None) -> Path:
    """Write a plain-LoRA adapter as a PEFT folder that ``peft.PeftModel.from_pretrained`` loads.
    The target rules of ``save_adapter`` apply (an adapter folder is replaced atomically;
    anything else there is an error)."""
    cfg = get_adapter_config(model, adapter_name)
    if not isinstance(cfg, LoraConfig):  # BdLoraConfig is a LoraConfig too
        raise ValueError("only plain or block-diagonal LoRA adapters (moelora.LoraConfig, moelora.BdLoraConfig) "
                         "can be exported to PEFT")
    spec = arch_spec(model)
    actual = {m: spec.attn.get(m) or spec.mlp.get(m) for m in cfg.target_modules}
    targets = sorted(set(actual.values()))
    peft_cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.r, "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout, "target_modules": targets, "bias": "none",
        "use_rslora": cfg.use_rslora, "fan_in_fan_out": False, "inference_mode": True,
        "base_model_name_or_path": cfg.base_model_name_or_path, "modules_to_save": None,
        "init_lora_weights": True,
    }
    if cfg.method == "bdlora":
        # PEFT >= 0.21: LoraConfig(use_bdlora=BdLoraConfig(...)); its BlockDiagonalLinear stores a
        # block-diagonal factor exactly as we do (row chunk i = block i), so tensors map 1:1.
        peft_cfg["use_bdlora"] = {
            "target_modules_bd_a": sorted({actual[m] for m in cfg.target_modules if cfg.role(m) == "row"}),
            "target_modules_bd_b": sorted({actual[m] for m in cfg.target_modules if cfg.role(m) == "column"}),
            "nblocks": cfg.nblocks, "match_strict": True,
        }
    tensors = {}
    for k, v in adapter_state_dict(model, adapter_name).items():
        # ours: model.layers.0.self_attn.q_proj.lora_A -> PEFT: base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight
        tensors[f"base_model.model.{k}.weight"] = v.contiguous().cpu()

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(peft_cfg, indent=2, sort_keys=True) + "\n")

    return atomic_write_dir(path, write)
