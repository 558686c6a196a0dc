"""``model.generate(..., adapter_names=[...])``: per-sequence adapters in Hugging Face generation.

transformers' ``generate`` rejects keyword arguments its model's ``forward`` does not declare,
so the adapted model gets a subclass of its own class whose ``generate`` takes ``adapter_names``
and keeps it in the ``AdapterState`` for the duration of the call (the hooks read it at every
forward), then restores LoRA-Switch base weights when generation returns or raises. This is the
pattern of ``torch.nn.utils.parametrize`` (the instance's class becomes a generated subclass with
the same name; ``remove_adapter`` puts the original class back): nothing is assigned on the
instance, so ``copy.deepcopy`` and ``save_pretrained`` see an ordinary model.
"""
from __future__ import annotations

from .methods.lora_switch.layer import restore_switch_weights


class AdapterGenerationMixin:
    """Adds ``adapter_names`` to ``generate``; see the module docstring."""

    moelora_adapted_class = True

    def generate(self, *args, adapter_names=None, **kwargs):
        state = self.moelora_state
        if adapter_names is not None:
            state.resolve_names(adapter_names, None)  # unknown names fail before any work
        previous = state.generation_names
        state.generation_names = adapter_names
        try:
            return super().generate(*args, **kwargs)
        finally:
            state.generation_names = previous
            restore_switch_weights(state)  # base weights bit-identical after generate returns or raises


_CLASSES: dict[type, type] = {}


def adapted_class(cls: type) -> type:
    if getattr(cls, "moelora_adapted_class", False):
        return cls
    sub = _CLASSES.get(cls)
    if sub is None:
        sub = type(cls.__name__, (AdapterGenerationMixin, cls), {"__module__": cls.__module__,
                                                                  "__qualname__": cls.__qualname__,
                                                                  "moelora_base_class": cls})
        _CLASSES[cls] = sub
    return sub


def original_class(cls: type) -> type:
    return getattr(cls, "moelora_base_class", cls) if getattr(cls, "moelora_adapted_class", False) else cls
