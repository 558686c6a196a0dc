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

from ._private import ReusedStaticCache
from .methods.lora_switch.layer import restore_switch_weights


class AdapterGenerationMixin(ReusedStaticCache):
    """Adds ``adapter_names`` to ``generate``, and makes ``cache_implementation="static"`` reuse one
    cache across calls (``_private.ReusedStaticCache``: no CUDA-graph re-record per call); see the
    module docstring."""

    moelora_adapted_class = True

    def generate(self, *args, adapter_names=None, **kwargs):
        state = self.moelora_state
        if adapter_names is not None:
            state.resolve_names(adapter_names, None)  # unknown names fail before any work
        previous, handed = state.generation_names, state.hand_out_cache
        state.generation_names = adapter_names
        config = kwargs.get("generation_config") or self.generation_config
        state.hand_out_cache = bool(kwargs.get("return_dict_in_generate", config.return_dict_in_generate))
        try:
            return super().generate(*args, **kwargs)
        finally:
            state.generation_names, state.hand_out_cache = previous, handed
            restore_switch_weights(state)  # base weights bit-identical after generate returns or raises


_CLASSES: dict[type, type] = {}
_PREFIX, _SEP, _DOT = "adapted_", "_cls_", "_dot_"


def _pickle_name(cls: type) -> str:
    return _PREFIX + cls.__module__.replace(".", _DOT) + _SEP + cls.__qualname__.replace(".", _DOT)


def adapted_class(cls: type) -> type:
    """The subclass of ``cls`` with ``adapter_names`` in ``generate``. Its ``__name__`` is the
    original's (``save_pretrained`` writes it as the architecture); it pickles by reference as
    ``moelora.generation.<encoded name>`` (found again by this module's ``__getattr__``)."""
    if getattr(cls, "moelora_adapted_class", False):
        return cls
    sub = _CLASSES.get(cls)
    if sub is None:
        sub = type(cls.__name__, (AdapterGenerationMixin, cls), {"__module__": __name__,
                                                                  "__qualname__": _pickle_name(cls),
                                                                  "moelora_base_class": cls})
        _CLASSES[cls] = sub
    return sub


def __getattr__(name: str):
    """Unpickling an adapted model in a fresh process: rebuild its class from the encoded name."""
    if name.startswith(_PREFIX) and _SEP in name:
        import importlib

        module, qualname = (part.replace(_DOT, ".") for part in name[len(_PREFIX):].split(_SEP, 1))
        obj = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        return adapted_class(obj)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def original_class(cls: type) -> type:
    return getattr(cls, "moelora_base_class", cls) if getattr(cls, "moelora_adapted_class", False) else cls
