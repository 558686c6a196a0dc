"""Checkpoint I/O that never leaves a torn file: write a temp file, fsync, then os.replace.

A run killed while Lightning writes ``last.ckpt`` keeps the previous complete checkpoint, so
``resume=true`` always finds something loadable.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO with an atomic save (same directory temp file + os.replace)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; a checkpoint is an ordinary file
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


# ---- what a resume checks before any step ------------------------------------------------------
BASE_KEY = "moelora_base"  # the base model's signature, stored by MoeLoraModule.on_save_checkpoint
_SIGNATURE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (the message names the file and the problem)."""


def base_signature(model: Any) -> dict[str, Any]:
    """``model_type``, hidden size, layers and vocabulary of ``model``'s HF config: what a
    checkpoint of adapter tensors silently depends on."""
    config = getattr(model, "config", None)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return {k: getattr(config, k, None) for k in _SIGNATURE_FIELDS}


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` of a Lightning checkpoint, or CheckpointError that
    says which file and what is wrong (empty, truncated/corrupted, not a Lightning checkpoint)."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as err:
        raise CheckpointError(f"checkpoint {str(path)!r}: cannot read it ({err.strerror})") from err
    if size == 0:
        raise CheckpointError(f"checkpoint {str(path)!r} is empty (0 bytes): a run killed before its first checkpoint?")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - torch raises RuntimeError, UnpicklingError, EOFError, ...
        text = str(err)
        if "Unsupported global" in text:
            what = "it holds objects other than tensors and is refused for safety"
        else:
            detail = next((ln.split("error:", 1)[-1].strip() for ln in text.splitlines() if "Unpickler error" in ln), "")
            detail = detail or next((ln.strip() for ln in text.splitlines() if ln.strip()), type(err).__name__)
            what = f"it is truncated or corrupted ({type(err).__name__}: {detail[:160]})"
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be loaded: {what}") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "global_step" not in ckpt:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a moelora-train (Lightning) checkpoint: "
                              "it has no state_dict/global_step")
    return ckpt


def check_resumable(ckpt: dict[str, Any], path: str | os.PathLike, model: Any, adapter_state: dict[str, torch.Tensor],
                    key_prefix: str = "model.") -> None:
    """Raise CheckpointError if ``ckpt`` was saved over another base model (signature) or holds
    adapter tensors whose names or shapes differ from ``adapter_state`` (the model's now)."""
    where = f"checkpoint {str(path)!r}"
    saved = ckpt.get(BASE_KEY)
    if isinstance(saved, dict):
        now = base_signature(model)
        diff = [f"{k}={saved.get(k)!r} in the checkpoint but {now.get(k)!r} now"
                for k in _SIGNATURE_FIELDS if saved.get(k) != now.get(k)]
        if diff:
            raise CheckpointError(f"{where} was trained on another base model: " + ", ".join(diff))
    state = ckpt["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{where}: its state_dict is not a mapping of tensors")
    expected = {key_prefix + k: tuple(v.shape) for k, v in adapter_state.items()}
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} adapter tensor(s) missing, e.g. {missing[0]!r}")
        if extra:
            parts.append(f"{len(extra)} unexpected tensor(s), e.g. {extra[0]!r}")
        raise CheckpointError(f"{where} does not match this adapter: " + "; ".join(parts))
    for k, shape in expected.items():
        v = state[k]
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{where}: {k!r} is not a tensor")
        if tuple(v.shape) != shape:
            raise CheckpointError(f"{where}: {k!r} has shape {tuple(v.shape)} but the adapter on this base "
                                  f"needs {shape} (another base model size?)")
        if not v.is_floating_point():
            raise CheckpointError(f"{where}: {k!r} has dtype {v.dtype}, not a floating-point tensor")
