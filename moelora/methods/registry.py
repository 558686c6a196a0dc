"""The methods moelora knows: config class -> injector (one entry per method folder).

A new method is a folder ``moelora/methods/<method>/`` with its config (a dataclass with a
``method`` class variable), its layer(s) and an injector ``inject(model, layers, spec, name, cfg,
state)``, plus one line here (see README, "Adding a method").
"""
from __future__ import annotations

from .bdlora.config import BdLoraConfig
from .bdlora.injector import inject_bdlora
from .lora.config import LoraConfig
from .lora.injector import inject_lora
from .lora_switch.config import LoraSwitchConfig
from .lora_switch.injector import inject_lora_switch
from .mixlora.config import MixLoraConfig
from .mixlora.injector import inject_mixlora

INJECTORS = {LoraConfig: inject_lora, MixLoraConfig: inject_mixlora, LoraSwitchConfig: inject_lora_switch,
             BdLoraConfig: inject_bdlora}
