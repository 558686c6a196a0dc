"""Serving many adapters over one base: ``Engine`` (transformers' continuous batching with a
per-token adapter plan) and an OpenAI-compatible HTTP server (``moelora.serve.app``,
``moelora-serve``; needs the ``[serve]`` extra)."""
from .engine import (AdapterLoadError, Engine, EngineError, PromptTooLongError, QueueFullError,  # noqa: F401
                     UnknownAdapterError)

__all__ = ["Engine", "EngineError", "UnknownAdapterError", "QueueFullError", "PromptTooLongError", "AdapterLoadError"]
