"""``moelora-serve``: the Hydra entry point of the OpenAI-compatible server (conf/serve.yaml).

``build_server(cfg)`` -> (app, engine) is what the entry point runs under uvicorn; tests call it
with a composed config (``compose_serve_config``)."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

log = logging.getLogger("moelora.serve")

CONFIG_PATH = str(Path(__file__).resolve().parents[2] / "conf")


def _register_tiny() -> None:
    """``model=tiny``: conf/model/tiny_llama.yaml (the in-process tiny random Llama that
    ``moelora-train`` trains on by default, so its run's ``adapter/`` folders serve on it), as a
    config node in Hydra's ConfigStore beside conf/model/*.yaml."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    path = Path(CONFIG_PATH) / "model" / "tiny_llama.yaml"
    if path.is_file():
        ConfigStore.instance().store(group="model", name="tiny", node=OmegaConf.load(path))


_register_tiny()


def _device_dtype(cfg):
    import torch

    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = cfg.dtype
    if dtype == "auto":
        dtype = "bfloat16" if str(device).startswith("cuda") else "float32"
    return torch.device(device), getattr(torch, dtype)


def _model_name(cfg) -> str:
    if cfg.get("served_model_name"):
        return str(cfg.served_model_name)
    name = cfg.model.get("name_or_path") or cfg.model._target_.rsplit(".", 1)[-1]
    return Path(str(name)).name or str(name)


def build_server(cfg: DictConfig):
    """(FastAPI app, Engine) from a composed serve config."""
    from .app import create_app
    from .engine import Engine

    if cfg.get("expandable_segments", True):  # before the first CUDA allocation
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    device, dtype = _device_dtype(cfg)
    model, tokenizer = hydra.utils.instantiate(cfg.model)
    model = model.to(device=device, dtype=dtype).eval()
    engine = Engine(model, cfg.get("adapters"), max_pending=int(cfg.max_pending),
                    max_new_tokens=int(cfg.max_new_tokens), context_len=cfg.get("context_len"),
                    eos_token_id=tokenizer.eos_token_id, base_name=_model_name(cfg),
                    num_blocks=cfg.get("num_blocks"), max_batch_tokens=cfg.get("max_batch_tokens"),
                    max_resident_adapters=cfg.get("max_resident_adapters"),
                    adapter_memory_gb=cfg.get("adapter_memory_gb"),
                    max_adapters_per_step=cfg.get("max_adapters_per_step"),
                    max_mixlora_per_step=cfg.get("max_mixlora_per_step"), max_bypass=int(cfg.get("max_bypass", 8)),
                    attn_implementation=cfg.get("attn_implementation"), max_adapter_gb=cfg.get("max_adapter_gb"),
                    max_expert_gb=cfg.get("max_expert_gb"),
                    step_memory_gb=cfg.get("step_memory_gb"), kv_memory_fraction=cfg.get("kv_memory_fraction"),
                    cuda_graphs=bool(cfg.get("cuda_graphs", False)), compile_level=int(cfg.get("compile_level", 0)),
                    warmup=bool(cfg.get("warmup", True)))
    for name, err in engine.load_errors.items():
        log.error("adapter %s is not served: %s", name, err)
    log.info("serving %s with adapters %s on %s (attention: %s)", engine.base_name, engine.adapter_names(), device,
             engine.attn_implementation)
    return create_app(engine, tokenizer), engine


def compose_serve_config(overrides: list[str] | None = None) -> DictConfig:
    """The config ``moelora-serve <overrides>`` would run (tests)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        return compose("serve", overrides=list(overrides or []))


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="serve")
def serve_main(cfg: DictConfig) -> None:
    """``moelora-serve model=tiny device=cpu adapters=DIR port=8000``"""
    import uvicorn

    from moelora.models import ModelLoadError

    try:
        app, engine = build_server(cfg)
    except (ModelLoadError, FileNotFoundError, ValueError) as err:
        if os.environ.get("MOELORA_DEBUG"):
            raise
        print(f"moelora-serve: error: {err}  (set MOELORA_DEBUG=1 for the traceback)", file=sys.stderr)
        sys.exit(2)
    # uvicorn drains in-flight requests on SIGTERM/SIGINT, then the app's lifespan closes the engine.
    uvicorn.run(app, host=cfg.host, port=int(cfg.port), log_level=str(cfg.log_level),
                timeout_graceful_shutdown=30)


if __name__ == "__main__":
    serve_main()
