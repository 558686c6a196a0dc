"""Issue 15: nothing lost, nothing half-done. Wrong config types, transactional inject/add/load/
delete, moves after injection, non-float adapter tensors, pickled reference adapters, and a
property test of random corruptions of saved adapter folders."""
from __future__ import annotations

import json

import pytest
import torch

import moelora
from moelora.config import AdapterConfigError, config_from_dict
from moelora.io import AdapterFileError
from conftest import make_tiny, randomize_adapter_

CONFIG_CLASSES = (moelora.LoraConfig, moelora.MixLoraConfig, moelora.LoraSwitchConfig)


# ---- 5. config values of the wrong type -------------------------------------------------------
WRONG_TYPES = [
    # (key, value, classes it applies to, expected-type words)
    ("num_experts", True, (moelora.MixLoraConfig, moelora.LoraSwitchConfig), "an integer"),
    ("num_experts", "8", (moelora.MixLoraConfig, moelora.LoraSwitchConfig), "an integer"),
    ("top_k", 2.0, (moelora.MixLoraConfig, moelora.LoraSwitchConfig), "an integer"),
    ("r", 8.0, CONFIG_CLASSES, "an integer"),
    ("r", True, CONFIG_CLASSES, "an integer"),
    ("lora_alpha", "16", CONFIG_CLASSES, "a number"),
    ("lora_alpha", True, CONFIG_CLASSES, "a number"),
    ("lora_dropout", "0.1", CONFIG_CLASSES, "a number"),
    ("use_rslora", 1, CONFIG_CLASSES, "true or false"),
    ("use_rslora", "yes", CONFIG_CLASSES, "true or false"),
    ("init_lora_weights", 3, CONFIG_CLASSES, "a string"),
    ("adapter_dtype", None, CONFIG_CLASSES, "a string"),
    ("base_model_name_or_path", 5, CONFIG_CLASSES, "a string or null"),
    ("router_aux_loss_coef", "0.01", (moelora.MixLoraConfig, moelora.LoraSwitchConfig), "a number"),
    ("jitter_noise", [0.1], (moelora.MixLoraConfig, moelora.LoraSwitchConfig), "a number"),
    ("router_init_range", None, (moelora.MixLoraConfig, moelora.LoraSwitchConfig), "a number"),
    ("target_modules", "q_proj", (moelora.LoraConfig, moelora.LoraSwitchConfig), "a list of module names"),
    ("target_modules", 7, (moelora.LoraConfig, moelora.LoraSwitchConfig), "a list of module names"),
    ("target_modules", ["q_proj", 1], (moelora.LoraConfig, moelora.LoraSwitchConfig), "a list of module names"),
    ("target_modules", {"q_proj": True}, (moelora.LoraConfig, moelora.LoraSwitchConfig), "a list of module names"),
    ("attention_target_modules", "q_proj", (moelora.MixLoraConfig,), "a list of module names"),
    ("expert_target_modules", "gate_proj", (moelora.MixLoraConfig,), "a list of module names"),
    ("top_p", "0.8", (moelora.MixLoraConfig,), "a number"),
    ("capacity_factor", None, (moelora.MixLoraConfig,), "a number"),
    ("routing_strategy", ["topk"], (moelora.MixLoraConfig,), "a string"),
    ("aux_loss_pooling", 0, (moelora.MixLoraConfig,), "a string"),
    ("expert_backend", None, (moelora.MixLoraConfig,), "a string"),
    ("switch_mode", 1, (moelora.LoraSwitchConfig,), "a string"),
]


@pytest.mark.parametrize("key,value,classes,expected", WRONG_TYPES, ids=[f"{k}={v!r}" for k, v, *_ in WRONG_TYPES])
def test_wrong_config_type_fails_in_validate_with_one_line(key, value, classes, expected):
    for cls in classes:
        with pytest.raises(AdapterConfigError) as err:
            cls(**{key: value}).validate()
        msg = str(err.value)
        assert "\n" not in msg
        assert msg.startswith(f"{key}={value!r}") and expected in msg, msg
        # the same from a dict (a JSON file, a Hydra config), and on inject: nothing is touched
        d = cls().to_dict()
        d[key] = value
        with pytest.raises(AdapterConfigError, match=key):
            config_from_dict(json.loads(json.dumps(d)))
        model = make_tiny()
        with pytest.raises(AdapterConfigError, match=key):
            moelora.inject_adapter(model, cls(**{key: value}))
        assert moelora.adapter_state(model) is None and type(model).__name__ == "LlamaForCausalLM"


def test_target_modules_string_is_not_iterated_into_letters():
    with pytest.raises(AdapterConfigError, match=r"single string"):
        moelora.LoraConfig(target_modules="q_proj").validate()
    # a real list (also from Hydra/JSON) is fine and becomes a tuple
    assert moelora.LoraConfig(target_modules=["q_proj"]).validate().target_modules == ("q_proj",)


@pytest.mark.parametrize("bad", [["method", "lora"], None, "lora", 3, ({"method": "lora"},)])
def test_config_from_dict_of_a_non_mapping(bad):
    with pytest.raises(AdapterConfigError, match="must be a mapping"):
        config_from_dict(bad)


def test_config_from_dict_malformed_dicts():
    with pytest.raises(AdapterConfigError, match="unknown adapter method"):
        config_from_dict({"method": None})
    with pytest.raises(AdapterConfigError, match="unknown adapter method"):
        config_from_dict({"method": ["lora"]})
    with pytest.raises(AdapterConfigError, match="unknown key"):
        config_from_dict({"method": "lora", "rank": 4})
    with pytest.raises(AdapterConfigError, match="keys must be strings"):
        config_from_dict({"method": "lora", 1: 2})
    # adapter files must hold r (a missing one is not silently the default)
    d = moelora.MixLoraConfig().to_dict()
    for key in ("r", "lora_alpha", "num_experts", "top_k"):
        dd = {k: v for k, v in d.items() if k != key}
        with pytest.raises(AdapterConfigError, match=f"missing the key.*{key}"):
            config_from_dict(dd, require_keys=True)
        config_from_dict(dd)  # partial dicts (bench settings, Hydra groups) keep the defaults
