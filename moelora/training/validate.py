"""Type and range checks of the training config's plain values, run before anything is built.

Hydra parses ``trainer.max_steps=abc`` into the string ``'abc'`` and ``adapter.num_experts=True``
into a bool; without a check such values reach Lightning or torch and end in a traceback deep
inside them (or, worse, run: a bool is an int to Python). ``check_config_values`` names the key,
the value and what is expected in one line. Only keys present in the config are checked (a
swapped optimizer or trainer keeps working); the adapter's own values are checked by
``moelora.config_from_dict`` (AdapterConfigError).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any


class ConfigValueError(ValueError):
    """A config value of the wrong type or out of range (the message is one line)."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


Check = tuple[Callable[[Any], bool], str]


def int_at_least(lo: int, *, null: bool = False) -> Check:
    what = f"an integer >= {lo}" + (" or null" if null else "")
    return (lambda v: (null and v is None) or (_is_int(v) and v >= lo)), what


def number_at_least(lo: float, *, strict: bool = False, null: bool = False) -> Check:
    what = f"a number {'>' if strict else '>='} {lo:g}" + (" or null" if null else "")
    return (lambda v: (null and v is None) or (_is_number(v) and (v > lo if strict else v >= lo))), what


def number_in(lo: float, hi: float) -> Check:
    return (lambda v: _is_number(v) and lo <= v <= hi), f"a number in [{lo:g}, {hi:g}]"


def one_of(*options: Any) -> Check:
    return (lambda v: v in options and not isinstance(v, bool)), "one of " + " | ".join(map(str, options))


BOOL: Check = (lambda v: isinstance(v, bool), "true or false")
INT: Check = (_is_int, "an integer")
OPT_INT: Check = (lambda v: v is None or _is_int(v), "an integer or null")
OPT_STR: Check = (lambda v: v is None or isinstance(v, str), "a path (string) or null")
POS_INT = int_at_least(1)
COUNT = int_at_least(0)
# Lightning's "n batches or a fraction of the loader" settings (limit_*_batches, val_check_interval)
BATCHES: Check = (lambda v: v is None or (_is_int(v) and v >= 0) or (_is_number(v) and 0.0 <= v <= 1.0),
                  "an integer >= 0 (batches) or a fraction in [0, 1]")
BETAS: Check = (lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_number(b) and 0 <= b < 1 for b in v),
                "two numbers in [0, 1), e.g. [0.9, 0.999]")

CHECKS: dict[str, Check] = {
    "seed": OPT_INT,
    "train": BOOL, "test": BOOL, "save_adapter": BOOL, "plot": BOOL,
    "ckpt_path": OPT_STR,
    "resume": (lambda v: isinstance(v, (bool, str)), "true, false or a run directory"),
    "trainer.max_steps": int_at_least(-1),
    "trainer.max_epochs": int_at_least(-1, null=True),
    "trainer.min_steps": int_at_least(0, null=True),
    "trainer.accumulate_grad_batches": POS_INT,
    "trainer.gradient_clip_val": number_at_least(0, null=True),
    "trainer.val_check_interval": BATCHES,
    "trainer.check_val_every_n_epoch": int_at_least(1, null=True),
    "trainer.log_every_n_steps": COUNT,
    "trainer.num_sanity_val_steps": int_at_least(-1),
    "trainer.limit_train_batches": BATCHES,
    "trainer.limit_val_batches": BATCHES,
    "trainer.limit_test_batches": BATCHES,
    "trainer.overfit_batches": BATCHES,
    "trainer.fast_dev_run": (lambda v: isinstance(v, bool) or (_is_int(v) and v >= 0), "true, false or a number of batches"),
    "trainer.num_nodes": POS_INT,
    "trainer.deterministic": (lambda v: isinstance(v, bool) or v == "warn", "true, false or warn"),
    "data.batch_size": POS_INT,
    "data.eval_batch_size": POS_INT,
    "data.max_length": POS_INT,
    "data.num_workers": COUNT,
    "data.n_train": int_at_least(1, null=True),
    "data.n_val": int_at_least(0, null=True),
    "data.n_test": int_at_least(0, null=True),
    "data.seed": OPT_INT,
    "module.optimizer.lr": number_at_least(0, strict=True),
    "module.optimizer.weight_decay": number_at_least(0),
    "module.optimizer.eps": number_at_least(0, strict=True),
    "module.optimizer.momentum": number_at_least(0),
    "module.optimizer.betas": BETAS,
    "module.scheduler.name": one_of("cosine", "linear", "constant"),
    "module.scheduler.warmup_steps": COUNT,
    "module.scheduler.min_lr_ratio": number_in(0, 1),
    "module.max_new_tokens": int_at_least(1, null=True),
    "module.router_stats_every_n_steps": COUNT,
    "module.compiled_expert_hidden": BOOL,
    "module.mixture_recompute": BOOL,
    "callbacks.model_checkpoint.every_n_train_steps": int_at_least(0, null=True),
    "callbacks.model_checkpoint.save_top_k": int_at_least(-1),
    "callbacks.progress_bar.refresh_rate": COUNT,
    "logger.csv.flush_logs_every_n_steps": POS_INT,
}

_MISSING = object()


def _get(cfg: Mapping[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _MISSING
        node = node[part]
    return node


def check_config_values(cfg: Mapping[str, Any], checks: Mapping[str, Check] = CHECKS) -> None:
    """Raise ConfigValueError for the first value in ``cfg`` (a resolved plain dict) that fails
    its check: ``trainer.max_steps='abc': expected an integer >= -1``."""
    for key, (ok, what) in checks.items():
        value = _get(cfg, key)
        if value is _MISSING or ok(value):
            continue
        raise ConfigValueError(f"{key}={value!r}: expected {what}")
    for group in ("adapter", "data", "model", "module", "trainer"):
        node = cfg.get(group, _MISSING)
        if node is not _MISSING and node is not None and not isinstance(node, Mapping):
            raise ConfigValueError(f"{group}={node!r}: expected a config group (pick one with {group}=<name>)")


_HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
# the arguments moelora-train passes itself (not from the config)
_PASSED_IN = {"module": {"model", "tokenizer", "task_names", "score_fn", "max_new_tokens"},
              "trainer": {"callbacks", "logger", "plugins"}}


def check_target_keys(cfg: Mapping[str, Any], groups: tuple[str, ...] = ("trainer", "data", "module", "model")) -> None:
    """Raise ConfigValueError for a key that the group's ``_target_`` does not take (a typo such as
    ``trainer.max_step`` or ``+trainer.foo=1``), found before the model loads. Targets that take
    ``**kwargs`` or cannot be imported are left to instantiation."""
    import difflib
    import inspect

    from hydra.utils import get_object

    def check(path: str, node: Any) -> None:
        if not isinstance(node, Mapping) or not isinstance(node.get("_target_"), str):
            return
        try:
            target = get_object(node["_target_"])
            params = inspect.signature(target).parameters
        except Exception:  # noqa: BLE001 - an unimportable target is reported when it is built
            return
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return
        for key in node:
            if key in _HYDRA_KEYS or key in params:
                continue
            close = difflib.get_close_matches(str(key), list(params), n=1)
            hint = f" (did you mean {path}.{close[0]}?)" if close else ""
            raise ConfigValueError(f"{path}.{key}={node[key]!r}: {node['_target_']} takes no argument {key!r}{hint}")

    for group in groups:
        node = cfg.get(group)
        check(group, node)
        if isinstance(node, Mapping):
            for key, sub in node.items():
                check(f"{group}.{key}", sub)
