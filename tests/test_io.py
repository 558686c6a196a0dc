"""Adapter files: bit-exact round trip, atomic writes, and a clear error for every bad input."""
import json
import os

import pytest
import torch

import moelora
from moelora.io import AdapterFileError
from conftest import make_tiny, randomize_adapter_

CASES = {
    "lora": lambda: moelora.LoraConfig(r=4, target_modules=("q_proj", "v_proj", "down_proj")),
    "mixlora": lambda: moelora.MixLoraConfig(num_experts=3, top_k=2, r=4, jitter_noise=0.1, router_init_range=0.05),
    "lora_switch": lambda: moelora.LoraSwitchConfig(num_experts=3, top_k=2, r=4),
}


@pytest.fixture(params=list(CASES))
def saved(request, tmp_path):
    model = moelora.inject_adapter(make_tiny("llama"), CASES[request.param]())
    randomize_adapter_(model)
    moelora.save_adapter(model, tmp_path / "adapter")
    return model, tmp_path / "adapter"


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_save_load_is_bit_exact(saved):
    model, path = saved
    assert sorted(os.listdir(path)) == ["adapter_config.json", "adapter_model.safetensors"]
    loaded = moelora.load_adapter(make_tiny("llama"), path)
    assert moelora.get_adapter_config(loaded) == moelora.get_adapter_config(model)
    a, b = moelora.adapter_state_dict(model), moelora.adapter_state_dict(loaded)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    meta = json.loads((path / "adapter_config.json").read_text())
    assert meta["adapter"]["method"] == moelora.get_adapter_config(model).method
    ids = torch.randint(0, 61, (2, 5))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def _expect_untouched(path, match, make=lambda: make_tiny("llama")):
    model = make()
    before = _state(model)
    with pytest.raises((AdapterFileError, moelora.AdapterConfigError), match=match):
        moelora.load_adapter(model, path)
    assert moelora.get_adapter_config(model) is None
    after = _state(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_missing_folder_and_files(tmp_path, saved):
    _, path = saved
    _expect_untouched(tmp_path / "nope", "does not exist")
    (path / "adapter_model.safetensors").unlink()
    _expect_untouched(path, "is missing")
    (path / "adapter_config.json").unlink()
    _expect_untouched(path, "is missing")


def test_wrong_base_model(saved):
    _, path = saved
    _expect_untouched(path, "another base model", make=lambda: make_tiny("llama", hidden=32))
    _expect_untouched(path, "another base model", make=lambda: make_tiny("qwen2"))


def test_truncated_and_corrupted_weights(saved):
    _, path = saved
    f = path / "adapter_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    _expect_untouched(path, "corrupted or truncated")
    flipped = bytearray(data)
    flipped[-5] ^= 0xFF
    f.write_bytes(bytes(flipped))
    _expect_untouched(path, "corrupted or truncated")
    # without a checksum, safetensors itself must still reject the truncated file
    meta = json.loads((path / "adapter_config.json").read_text())
    meta.pop("weights_sha256")
    (path / "adapter_config.json").write_text(json.dumps(meta))
    f.write_bytes(data[: len(data) // 2])
    _expect_untouched(path, "truncated or corrupted")


def test_corrupted_config_and_unknown_key(saved):
    _, path = saved
    cfg = path / "adapter_config.json"
    text = cfg.read_text()
    cfg.write_text(text[:-20])
    _expect_untouched(path, "not valid JSON")
    meta = json.loads(text)
    meta["adapter"]["num_expertz"] = 3
    cfg.write_text(json.dumps(meta))
    _expect_untouched(path, "unknown key")


def test_missing_or_reshaped_tensor(saved):
    from safetensors.torch import load_file, save_file

    _, path = saved
    f = path / "adapter_model.safetensors"
    meta = json.loads((path / "adapter_config.json").read_text())
    meta.pop("weights_sha256")
    (path / "adapter_config.json").write_text(json.dumps(meta))
    tensors = load_file(str(f))
    key = sorted(tensors)[0]
    save_file({k: v for k, v in tensors.items() if k != key}, str(f))
    _expect_untouched(path, "missing")
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, *tensors[key].shape[1:])
    save_file(tensors, str(f))
    _expect_untouched(path, "shape mismatch")


def test_atomic_save_leaves_previous_adapter_on_crash(saved, monkeypatch):
    model, path = saved
    before = (path / "adapter_model.safetensors").read_bytes()
    import moelora.io as io

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(io, "save_file", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        moelora.save_adapter(model, path)
    assert (path / "adapter_model.safetensors").read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["adapter"]  # no temp folder left behind


def test_reference_adapter_bad_cases(tmp_path):
    from test_mixlora import _write_reference_adapter

    base = make_tiny("llama")
    _write_reference_adapter(tmp_path / "ref", base, 4, 2)
    f = tmp_path / "ref" / "adapter_model.bin"
    data = f.read_bytes()
    f.write_bytes(data[:100])
    _expect_untouched(tmp_path / "ref", "truncated or corrupted")
    f.write_bytes(data)
    cfg = json.loads((tmp_path / "ref" / "adapter_config.json").read_text())
    cfg["act_fn"] = "gelu"
    (tmp_path / "ref" / "adapter_config.json").write_text(json.dumps(cfg))
    _expect_untouched(tmp_path / "ref", "act_fn")


def test_remove_adapter_restores_original_model():
    model = make_tiny("llama")
    ids = torch.randint(0, 61, (1, 6))
    with torch.no_grad():
        ref = model(ids).logits
    moelora.inject_adapter(model, moelora.MixLoraConfig(num_experts=2, top_k=1, r=2))
    randomize_adapter_(model)
    moelora.remove_adapter(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)
    assert not any(moelora.inject.is_adapter_parameter(n) for n, _ in model.named_parameters())
