"""lm-eval model ``moelora`` and ``evaluate()``, the Python entry point of accuracy evaluation.

``MoeLoraLM`` is lm-eval's ``HFLM`` around an already built model: it loads the base model with
``moelora.models.load_base_model`` (``tiny``, ``smollm2``, a local HF folder, ...), loads the
moelora adapter into it, and leaves batching, ``loglikelihood``, ``loglikelihood_rolling`` and
``generate_until`` to HFLM. The adapter runs its default fast path (fused MixLoRA experts on
CUDA, LoRA-Switch ``switch_mode="auto"``); plain LoRA is merged into the base weights, which is
exact up to one rounding and removes the adapter's extra matmuls.

    python -m moelora.eval.lm_eval --model moelora \\
        --model_args pretrained=logs/train/runs/<run>,dtype=float32 \\
        --tasks moelora_synthetic --include_path TASK_DIR --output_path OUT

``pretrained`` may be a moelora-train run directory: the base model is rebuilt from the run's
``.hydra/config.yaml`` (the quickstart's tiny Llama differs from ``load_base_model("tiny")``) and
the adapter defaults to ``<run>/adapter``.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lm_eval.models.huggingface import HFLM

import moelora
from moelora.models import load_base_model

log = logging.getLogger("moelora.eval")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str | None) -> torch.device:
    """``auto``/``None`` -> cuda when available; ``cuda`` without a GPU falls back to cpu with a
    warning (lm-eval's CLI passes ``cuda`` unless told otherwise)."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        log.warning("device %s requested but CUDA is not available: using cpu", device)
        return torch.device("cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``auto`` -> bfloat16 on CUDA, float32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "", "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use auto or one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def build_from_node(node: dict, dtype: torch.dtype):
    """``(model, tokenizer)`` from a Hydra model-group node (``_target_`` + keyword arguments),
    without Hydra: the target is imported and called, then the model is cast to ``dtype``."""
    import importlib

    module, _, name = node["_target_"].rpartition(".")
    fn = getattr(importlib.import_module(module), name)
    out = fn(**{k: v for k, v in node.items() if not k.startswith("_")})
    model, tokenizer = out if isinstance(out, tuple) else (out, None)
    return model.to(dtype), tokenizer


def training_run_model_node(run_dir: Path) -> dict | None:
    """The ``model`` node of a moelora-train run directory (``.hydra/config.yaml``), or None."""
    cfg_file = run_dir / ".hydra" / "config.yaml"
    if not cfg_file.is_file():
        return None
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(cfg_file)
    try:
        return OmegaConf.to_container(cfg.model, resolve=True)
    except Exception:  # noqa: BLE001 - an interpolation into the rest of the config
        return OmegaConf.to_container(cfg.model, resolve=False)


def load_model_with_adapter(pretrained: str, adapter: str | None = None, dtype: str | torch.dtype | None = "auto",
                            device: str | None = "auto", merge_lora: bool = True):
    """``(model, tokenizer)``: the base model, with the moelora adapter at ``adapter`` loaded,
    in eval mode on ``device``. Errors say what is wrong (missing folder, other base model).

    ``pretrained`` is a name or folder for ``moelora.models.load_base_model``, or a moelora-train
    run directory: then the base model is rebuilt from the run's config and ``adapter``
    defaults to ``<run>/adapter``."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    node = training_run_model_node(Path(pretrained)) if Path(pretrained).is_dir() else None
    if node is not None:
        model, tokenizer = build_from_node(node, dt)
        adapter = adapter or str(Path(pretrained) / "adapter")
    else:
        model, tokenizer = load_base_model(str(pretrained), dtype=dt)
    model = model.to(dev)
    if adapter:
        model = moelora.load_adapter(model, Path(adapter))
        if merge_lora and isinstance(moelora.get_adapter_config(model), moelora.LoraConfig):
            moelora.merge_lora(model)
    return model.eval(), tokenizer


class MoeLoraLM(HFLM):
    """lm-eval model ``moelora``: a base model plus a moelora adapter (see the module docstring).

    ``pretrained`` is a name/path for ``moelora.models.load_base_model`` or a model object (then
    pass ``tokenizer`` too, and ``adapter`` only if the model has none yet). Every other keyword
    goes to ``HFLM`` (``batch_size``, ``max_length``, ``add_bos_token``, ...)."""

    def __init__(self, pretrained: Any = "tiny", adapter: str | None = None, tokenizer: Any = None,
                 dtype: str | torch.dtype | None = "auto", device: str | None = "auto",
                 batch_size: int | str = 16, merge_lora: bool = True, **kwargs: Any) -> None:
        if isinstance(pretrained, (str, Path)):
            name = str(pretrained)
            if adapter is None and Path(name).is_dir() and training_run_model_node(Path(name)) is not None:
                adapter = str(Path(name) / "adapter")
            model, tok = load_model_with_adapter(name, adapter, dtype, device, merge_lora)
            tokenizer = tokenizer or tok
        else:
            name = getattr(getattr(pretrained, "config", None), "_name_or_path", None) or type(pretrained).__name__
            model = pretrained
            if adapter:
                model = moelora.load_adapter(model, Path(adapter))
            if tokenizer is None:
                raise ValueError("MoeLoraLM(pretrained=<model object>) needs tokenizer=<its tokenizer>")
            model.eval()
        super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **kwargs)
        self.pretrained_name = name
        self.adapter_path = str(adapter) if adapter else None

    def get_model_info(self) -> dict:
        """What lm-eval records about the model, without HFLM's hub look-ups (we are offline)."""
        cfg = moelora.get_adapter_config(self.model)
        return {
            "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
            "model_dtype": str(self.model.dtype),
            "pretrained": self.pretrained_name,
            "adapter": self.adapter_path,
            "adapter_method": cfg.method if cfg is not None else None,
            "adapter_trainable_parameters": moelora.trainable_parameters(self.model)["trainable"] if cfg else 0,
        }


# ---- Python entry point ---------------------------------------------------------------------
def task_manager(include_paths: Sequence[str | Path], include_defaults: bool = False):
    """An lm-eval TaskManager over our task folders. Indexing lm-eval's ~15k built-in tasks
    takes 10-40 s, so they are left out unless asked for."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(p) for p in include_paths] or None, include_defaults=include_defaults)


def check_task_names(names: Sequence[str], manager) -> None:
    """Raise UnknownTaskError naming the unknown tasks and the known moelora ones."""
    from moelora.eval.tasks import UnknownTaskError

    known = set(manager.all_tasks)
    unknown = [n for n in names if n not in known]
    if unknown:
        ours = sorted(n for n in known if n.startswith("moelora"))
        raise UnknownTaskError(f"unknown lm-eval task(s) {unknown}; the task folders define {ours}")


def flatten_results(results: dict) -> dict[str, float]:
    """lm-eval's ``results`` section as ``{"<metric>/<task>": value}`` (filter ``none`` dropped,
    stderr kept as ``<metric>_stderr``, the document count as ``n``); non-numbers are skipped."""
    flat: dict[str, float] = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if key == "alias" or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, _, filt = key.partition(",")
            metric = "n" if metric == "sample_len" else metric  # documents evaluated
            if filt and filt != "none":
                metric = f"{metric}[{filt}]"
            flat[f"{metric}/{task}"] = float(value)
    return flat


def evaluate(lm: HFLM, tasks: Sequence[str], include_paths: Sequence[str | Path] = (), limit: int | float | None = None,
             num_fewshot: int | None = None, mc_modes: Sequence[str] = ("loglikelihood",),
             include_defaults: bool = False, log_samples: bool = False, seed: int = 0,
             gen_kwargs: dict | None = None) -> dict[str, Any]:
    """Run lm-eval ``tasks`` on ``lm`` (a ``MoeLoraLM``) and, with ``"fast"`` in ``mc_modes``, the
    MixLoRA paper's label-logit scoring of the same multiple-choice documents.

    Returns ``{"metrics": {"<metric>/<task>": float}, "lm_eval": <lm-eval results without samples>,
    "fast_mc": {task: {...}}}``. Fast-mode metrics appear as ``fast_acc/<task>``."""
    from lm_eval import simple_evaluate

    bad = set(mc_modes) - {"loglikelihood", "fast"}
    if bad:
        raise ValueError(f"unknown mc_modes {sorted(bad)}; use 'loglikelihood' and/or 'fast'")
    manager = task_manager(include_paths, include_defaults)
    check_task_names(tasks, manager)
    out: dict[str, Any] = {"metrics": {}, "lm_eval": None, "fast_mc": {}}
    if "loglikelihood" in mc_modes or not _all_multiple_choice(manager, tasks):
        res = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                              num_fewshot=num_fewshot, log_samples=log_samples, random_seed=seed,
                              numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                              gen_kwargs=gen_kwargs)
        out["lm_eval"] = res
        out["metrics"].update(flatten_results(res))
    if "fast" in mc_modes:
        from moelora.eval.multiple_choice import fast_choice_eval

        for task, docs in task_documents(manager, tasks, limit).items():
            if docs and docs[0].get("mc_choices"):
                r = fast_choice_eval(lm.model, lm.tokenizer, docs, batch_size=int(lm.batch_size) if str(lm.batch_size).isdigit() else 16)
                out["fast_mc"][task] = r
                out["metrics"][f"fast_acc/{task}"] = r["acc"]
    return out


def _all_multiple_choice(manager, tasks: Sequence[str]) -> bool:
    loaded = manager.load(list(tasks))["tasks"]
    return all(t.OUTPUT_TYPE == "multiple_choice" for t in loaded.values())


def task_documents(manager, tasks: Sequence[str], limit: int | float | None = None) -> dict[str, list[dict]]:
    """The evaluation documents of every leaf task under ``tasks``, cut like lm-eval's ``limit``."""
    loaded = manager.load(list(tasks))["tasks"]
    docs: dict[str, list[dict]] = {}
    for name, task in loaded.items():
        rows = list(task.eval_docs)
        if limit is not None:
            n = int(limit * len(rows)) if isinstance(limit, float) and limit < 1.0 else int(limit)
            rows = rows[:n]
        docs[name] = [dict(r) for r in rows]
    return docs
