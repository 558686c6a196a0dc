"""moelora: mixtures of LoRA experts (MixLoRA, LoRA-Switch) on Hugging Face causal LMs.

Quick use::

    import moelora
    model = moelora.inject_adapter(model, moelora.MixLoraConfig(num_experts=8, top_k=2, r=16))
    out = model(input_ids, attention_mask=mask, labels=labels)   # out.loss includes the aux loss
    moelora.save_adapter(model, "out/adapter")

Many adapters over one base, chosen per sequence::

    moelora.add_adapter(model, "math", moelora.LoraConfig(r=16))
    moelora.load_adapter(model, "runs/code/adapter", adapter_name="code")
    out = model(ids, attention_mask=mask, adapter_names=["math", "code", None])  # None = the base
"""
__version__ = "0.2.0"

from .architectures import ARCHITECTURES, UnsupportedArchitectureError  # noqa: E402
from .config import (  # noqa: E402
    AdapterConfigError,
    LoraConfig,
    LoraSwitchConfig,
    MixLoraConfig,
    config_from_dict,
)
from .inject import (  # noqa: E402
    adapter_parameters,
    adapter_state,
    adapter_state_dict,
    add_adapter,
    delete_adapter,
    disable_adapter,
    get_adapter_config,
    inject_adapter,
    list_adapters,
    load_adapter_state_dict,
    merge_lora,
    remove_adapter,
    restore_base_weights,
    router_statistics,
    routing_records,
    set_adapter,
    switch_state,
    trainable_parameters,
    unmerge_lora,
    use_adapter,
)
from .io import AdapterFileError, export_peft, load_adapter, read_adapter_config, save_adapter  # noqa: E402
from .layers.adapted import AdaptedFFN, AdaptedLinear  # noqa: E402
from .layers.decode_graphs import clear_decode_graphs  # noqa: E402
from .layers.router import TopKRouter, load_balance_loss  # noqa: E402
from .methods.bdlora.config import BdLoraConfig, rank_for_budget  # noqa: E402
from .methods.lora.layer import LoraAdapter  # noqa: E402
from .methods.lora_switch.layer import LoraSwitchAdapter  # noqa: E402
from .methods.mixlora.layer import MixLoraAdapter  # noqa: E402
from .switches import decode_graphs, kernel_backend  # noqa: E402

__all__ = [
    "ARCHITECTURES", "BdLoraConfig", "rank_for_budget", "AdaptedFFN", "AdaptedLinear", "AdapterConfigError", "AdapterFileError", "LoraAdapter",
    "LoraConfig", "LoraSwitchAdapter", "LoraSwitchConfig", "MixLoraAdapter", "MixLoraConfig", "TopKRouter",
    "UnsupportedArchitectureError", "adapter_parameters", "adapter_state", "adapter_state_dict", "add_adapter", "clear_decode_graphs",
    "config_from_dict", "decode_graphs", "delete_adapter", "disable_adapter", "export_peft", "get_adapter_config",
    "inject_adapter", "kernel_backend", "list_adapters", "load_adapter", "load_adapter_state_dict",
    "load_balance_loss", "merge_lora", "read_adapter_config", "remove_adapter", "restore_base_weights",
    "router_statistics", "routing_records", "save_adapter", "set_adapter", "switch_state",
    "trainable_parameters", "unmerge_lora", "use_adapter",
]
