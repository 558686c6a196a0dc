"""Every access of the benchmark to moelora internals (state that is not public API), in one place.

When moelora's internals move, re-point the imports here and nothing else:

- ``switch_state(model)`` is the ONE function that reaches LoRA-Switch's merge state (today
  ``moelora.switch_state``, which reads the model's ``AdapterState``; before the multi-adapter
  core it was ``moelora.layers.lora_switch.switch_state``, reading ``model._moelora_context``);
  the two helpers below it are the only readers and writers of that state's fields.
- ``decode_graphs(enabled)`` / ``captured_graphs(model)``: the eager-decode CUDA graphs switch
  (public) and the count of graphs the adapters hold (``moelora.layers.decode_graphs``).
- ``is_adapter_parameter(name)``: moelora's "this parameter is the adapter's" filter.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, ContextManager


def switch_state(model) -> Any:
    """The LoRA-Switch merge state of ``model`` (None: no LoRA-Switch adapter on it)."""
    from moelora import switch_state as _switch_state  # the one line to re-point

    return _switch_state(model)


def force_every_merge(model) -> None:
    """LoRA-Switch merge mode with the in-kernel skip of an unchanged selection turned off: every
    decode step pays a full merge (the worst case)."""
    switch_state(model).force_merge = True


def selection_change_rate(model, generate: Callable[[], Any]) -> float | None:
    """The share of decode steps of ``generate()`` whose LoRA-Switch selection changed (the steps
    that pay for a merge; recorded at batch 1 only). None: not a merge-mode LoRA-Switch model."""
    state = switch_state(model)
    if state is None or state.mode == "unmerged":
        return None
    state.history = []
    try:
        generate()
        return state.selection_change_rate()
    finally:
        state.history = None


def decode_graphs(enabled: bool) -> ContextManager[None]:
    """Eager decode steps replay adapted modules as CUDA graphs inside the block (or not); the
    previous setting comes back on exit (``moelora.decode_graphs``, ``moelora/switches.py``)."""
    import moelora

    return moelora.decode_graphs(enabled)


def captured_graphs(model) -> int:
    """How many decode graphs ``model``'s adapted modules hold."""
    from moelora.layers.decode_graphs import captured_graphs as _captured

    return _captured(model)


def is_adapter_parameter(name: str) -> bool:
    from moelora.inject import is_adapter_parameter as _is_adapter

    return _is_adapter(name)
