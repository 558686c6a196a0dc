"""moelora: mixtures of LoRA experts (MixLoRA, LoRA-Switch) on Hugging Face causal LMs.

Quick use::

    import moelora
    model = moelora.inject_adapter(model, moelora.MixLoraConfig(num_experts=8, top_k=2, r=16))
    out = model(input_ids, attention_mask=mask, labels=labels)   # out.loss includes the aux loss
    moelora.save_adapter(model, "out/adapter")
"""
__version__ = "0.1.0"

from .config import (  # noqa: E402
    AdapterConfigError,
    LoraConfig,
    LoraSwitchConfig,
    MixLoraConfig,
    config_from_dict,
)
from .inject import (  # noqa: E402
    ARCHITECTURES,
    UnsupportedArchitectureError,
    adapter_state_dict,
    disable_adapter,
    get_adapter_config,
    inject_adapter,
    load_adapter_state_dict,
    remove_adapter,
    router_statistics,
    routing_records,
    trainable_parameters,
)
from .io import AdapterFileError, export_peft, load_adapter, read_adapter_config, save_adapter  # noqa: E402
from .layers.decode_graphs import clear_decode_graphs, set_decode_graphs  # noqa: E402
from .layers.lora import LoraLinear  # noqa: E402
from .layers.mixlora import MixLoraFFN  # noqa: E402
from .layers.router import TopKRouter, load_balance_loss  # noqa: E402


def merge_lora(model) -> None:
    """Fold every plain LoRA delta into its base weight (exactly undone by ``unmerge_lora``)."""
    for m in model.modules():
        if isinstance(m, LoraLinear):
            m.merge()


def unmerge_lora(model) -> None:
    for m in model.modules():
        if isinstance(m, LoraLinear):
            m.unmerge()


__all__ = [
    "AdapterConfigError", "AdapterFileError", "ARCHITECTURES", "LoraConfig", "LoraLinear",
    "LoraSwitchConfig", "MixLoraConfig", "MixLoraFFN", "TopKRouter", "UnsupportedArchitectureError",
    "adapter_state_dict", "clear_decode_graphs", "config_from_dict", "disable_adapter", "export_peft", "get_adapter_config", "inject_adapter",
    "load_adapter", "load_adapter_state_dict", "load_balance_loss", "merge_lora", "read_adapter_config",
    "remove_adapter", "router_statistics", "routing_records", "save_adapter", "set_decode_graphs", "trainable_parameters",
    "unmerge_lora",
]
