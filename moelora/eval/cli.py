"""Console script ``moelora-eval`` (Hydra): the only eval code that sees a DictConfig. It turns
the composed config into typed calls and writes the run directory; ``evaluate_from_config`` is
what tests call after ``compose()``. ``moelora-bench`` lives in ``moelora.bench.cli`` and uses
``CONFIG_PATH``, ``_plain``, ``_overrides`` and ``_fail`` from here.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("moelora.eval")


def _config_dir() -> str:
    """The conf/ folder as an absolute path. A relative ``config_path`` would be resolved by Hydra
    as the Python package ``conf`` (pkg://conf), which exists only when running from the repo."""
    here = Path(__file__).resolve()
    for cand in (here.parents[1] / "conf", here.parents[2] / "conf"):  # packaged, then the repo's
        if (cand / "eval.yaml").is_file():
            return str(cand)
    return str(here.parents[2] / "conf")


CONFIG_PATH = _config_dir()


def _plain(node: Any) -> Any:
    """A DictConfig/ListConfig as plain Python, resolved where it can be (``${hydra:...}`` has
    no value outside a Hydra app, e.g. under ``compose()`` in tests: then it stays unresolved)."""
    if not (isinstance(node, DictConfig) or OmegaConf.is_list(node)):
        return node
    try:
        return OmegaConf.to_container(node, resolve=True)
    except Exception:  # noqa: BLE001 - InterpolationResolutionError and friends
        return OmegaConf.to_container(node, resolve=False)


def _overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


# ---- moelora-eval -----------------------------------------------------------------------------
def evaluate_from_config(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Evaluate ``cfg.model`` + ``cfg.adapter_dir`` on ``cfg.tasks``; write results.json/.md, the
    task folder, lm-eval's output and (for routed adapters) the routing report into the run
    directory. Returns ``(metrics, objects)``."""
    import moelora
    from moelora.eval import harness, report, routing
    from moelora.eval.tasks import resolve_sources

    start = time.time()
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = harness.resolve_device(cfg.device)
    dtype = harness.resolve_dtype(cfg.dtype, device)
    mc_modes = list(cfg.mc_modes)
    # Everything a typo can break is checked before the model is loaded.
    if cfg.adapter_dir and not Path(cfg.adapter_dir).is_dir():
        raise moelora.AdapterFileError(f"adapter_dir {cfg.adapter_dir!r} does not exist")
    tasks = resolve_sources(list(cfg.tasks), run_dir / "tasks", n_test=cfg.n_test, seed=cfg.seed)
    manager = harness.task_manager(tasks.include_paths, tasks.include_defaults)
    harness.check_task_names(tasks.names, manager)

    node = _plain(cfg.model)
    if cfg.get("base_from_run", True) and cfg.adapter_dir:
        # An adapter inside a moelora-train run fits that run's base model, whatever cfg.model says.
        run_node = harness.training_run_model_node(Path(cfg.adapter_dir).resolve().parent)
        if run_node is not None:
            log.info("base model from the training run: %s", run_node)
            node = run_node
    model, tokenizer = harness.build_from_node(node, dtype)
    model = model.to(device)
    if cfg.adapter_dir:
        model = moelora.load_adapter(model, cfg.adapter_dir)
    adapter_cfg = moelora.get_adapter_config(model)
    params = moelora.trainable_parameters(model)  # before merging: merged LoRA has no adapter tensors left
    if cfg.merge_lora and isinstance(adapter_cfg, moelora.LoraConfig):
        moelora.merge_lora(model)
    lm = harness.MoeLoraLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size,
                           max_length=cfg.get("max_length"))
    res = harness.evaluate(lm, tasks.names, tasks.include_paths, limit=cfg.limit, num_fewshot=cfg.num_fewshot,
                           mc_modes=mc_modes, include_defaults=tasks.include_defaults, seed=cfg.seed)
    metrics = res["metrics"]

    routing_files = None
    if cfg.routing and adapter_cfg is not None and hasattr(adapter_cfg, "num_experts"):
        docs = harness.task_documents(manager, tasks.names, cfg.limit)
        rep = routing.routing_report(model, tokenizer, docs, batch_size=cfg.batch_size)
        routing_files = {k: str(v) for k, v in routing.write_routing_report(rep, run_dir).items()}

    info = {
        "model": node.get("name_or_path") or node.get("name") or node.get("_target_"),
        "model_config": node,
        "adapter": str(cfg.adapter_dir) if cfg.adapter_dir else None,
        "method": adapter_cfg.method if adapter_cfg is not None else "base",
        "adapter_config": adapter_cfg.to_dict() if adapter_cfg is not None else None,
        "trainable_params": params,
        "tasks": tasks.names,
        "mc_modes": mc_modes,
        "fast_mc": {t: {k: v for k, v in r.items() if k != "predictions"} for t, r in res["fast_mc"].items()},
        "routing_files": routing_files,
        "config": _plain(cfg),
        "overrides": _overrides(),
        "device": str(device),
        "wall_time_s": round(time.time() - start, 2),
    }
    results = report.write_eval_report(run_dir, metrics, info, res["lm_eval"])
    return metrics, {"cfg": cfg, "model": model, "tokenizer": tokenizer, "lm": lm, "results": results,
                     "run_dir": run_dir, "raw": res}


def _fail(prog: str, err: Exception) -> None:
    if os.environ.get("MOELORA_DEBUG"):
        raise err
    print(f"{prog}: error: {err}  (set MOELORA_DEBUG=1 for the traceback)", file=sys.stderr)
    sys.exit(2)


def _user_errors() -> tuple[type[Exception], ...]:
    import moelora
    from moelora.eval.tasks import UnknownTaskError
    from moelora.models import ModelLoadError

    return (UnknownTaskError, moelora.AdapterFileError, moelora.AdapterConfigError, ModelLoadError,
            FileNotFoundError)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="eval")
def eval_main(cfg: DictConfig) -> float | None:
    """``moelora-eval adapter_dir=<run>/adapter tasks=[synthetic,gsm8k] ...``"""
    try:
        metrics, objects = evaluate_from_config(cfg)
    except _user_errors() as err:
        _fail("moelora-eval", err)
    run_dir = objects["run_dir"]
    print((run_dir / "results.md").read_text())
    print(f"Results are in {run_dir}/ (results.json, results.md, lm_eval_results.json, tasks/"
          + (", routing.json, routing_load.csv" if objects["results"].get("routing_files") else "") + ")")
    accs = [v for k, v in metrics.items() if k.startswith("acc/")]
    return sum(accs) / len(accs) if accs else None


if __name__ == "__main__":
    eval_main()
