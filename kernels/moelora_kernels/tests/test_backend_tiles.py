"""backend.py (interpreter flag, SM counts) and tiles.py (the launch-tiles table and its lookup).

The CUDA paths are exercised without a GPU: the tests pretend Triton is not interpreted and
replace torch's device queries by counting fakes, which also proves the per-device caching.
"""
import os
from types import SimpleNamespace

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from moelora_kernels import _host, backend, gathered_lora, lora_decode, merge, mixlora_ffn, tiles  # noqa: E402


def test_interpreted_agrees_with_triton():
    kernels = (mixlora_ffn._moe_hidden_kernel, lora_decode._lora_add_kernel, gathered_lora._shrink_gather_kernel,
               merge._merge_kernel)
    for k in kernels:
        assert (type(k).__name__ == "InterpretedFunction") == backend.interpreted()
    if not torch.cuda.is_available():
        assert backend.interpreted()  # the root conftest (or this module) set TRITON_INTERPRET=1


def test_require_same_backend_rejects_a_kernel_of_the_other_backend():
    other = type("JITFunction" if backend.interpreted() else "InterpretedFunction", (), {})()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        backend.require_same_backend(other)
    backend.require_same_backend(mixlora_ffn._moe_hidden_kernel)  # same backend: fine


@pytest.fixture
def fake_cuda(monkeypatch):
    """Pretend compiled Triton and two GPUs; returns the per-index query counts."""
    calls = {"props": [], "name": []}
    names = {0: "NVIDIA A100-SXM4-80GB", 1: "NVIDIA H200", 2: "NVIDIA H100 80GB HBM3"}

    def props(i):
        calls["props"].append(i)
        return SimpleNamespace(multi_processor_count=100 + i)

    def name(i):
        calls["name"].append(i)
        return names[i]

    monkeypatch.setattr(backend, "_INTERPRETED", False)
    monkeypatch.setattr(backend, "_SM_COUNTS", {})
    monkeypatch.setattr(backend, "_GPU_NAMES", {})
    monkeypatch.setattr(tiles, "_ROWS", {})
    monkeypatch.setattr(torch.cuda, "get_device_properties", props)
    monkeypatch.setattr(torch.cuda, "get_device_name", name)
    return calls


def test_sm_count_fallback_on_cpu_and_under_the_interpreter():
    assert backend.FALLBACK_SM_COUNT == 132
    assert backend.sm_count(torch.device("cpu")) == 132
    if backend.interpreted():  # CUDA tensors in the interpreter: the same fixed count
        assert backend.sm_count(torch.device("cuda", 0)) == 132
    # the decode grids are sized from it: one program per SM over the tokens, capped by column blocks
    assert _host.column_groups(1, 132 * 128, 128, torch.device("cpu")) == (132, 128)
    assert _host.column_groups(4, 132 * 128, 128, torch.device("cpu")) == (33, 512)


def test_sm_count_read_once_per_device_index(fake_cuda):
    for _ in range(3):
        assert backend.sm_count(torch.device("cuda", 0)) == 100
        assert backend.sm_count(torch.device("cuda", 1)) == 101
    assert sorted(fake_cuda["props"]) == [0, 1]
    assert backend.sm_count(torch.device("cpu")) == backend.FALLBACK_SM_COUNT
    # the launch grids follow the device: one-launch decode kernels, gathered_lora's IN split
    assert _host.column_groups(1, 101 * 128, 128, torch.device("cuda", 1)) == (101, 128)
    cfg = tiles.lookup(torch.device("cuda", 1))["gathered_lora"]
    assert gathered_lora._split(64, 1, torch.device("cuda", 1), cfg) == (16, 4)  # capped by max_split
    assert gathered_lora._split(64, 100, torch.device("cuda", 1), cfg) == (3, 22)  # 2 waves of 101 SMs


@pytest.mark.parametrize("name,family", [
    ("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA H100 PCIe", "H100"), ("NVIDIA H200", "H200"),
    ("NVIDIA H200 NVL", "H200"), ("NVIDIA A100-SXM4-80GB", "default"), ("NVIDIA GH200 480GB", "default"),
    ("Tesla T4", "default"), ("", "default"),
])
def test_family_of_gpu_names(name, family):
    assert tiles.family(name) == family


def test_lookup_unknown_gpu_gets_default_and_is_cached(fake_cuda):
    for _ in range(3):
        assert tiles.lookup(torch.device("cuda", 0)) is tiles.TABLE["default"]  # A100: not in the table
        assert tiles.lookup(torch.device("cuda", 1)) is tiles.TABLE["H200"]
        assert tiles.lookup(torch.device("cuda", 2)) is tiles.TABLE["H100"]
    assert sorted(fake_cuda["name"]) == [0, 1, 2]  # one name query per device index
    assert tiles.lookup(torch.device("cpu")) is tiles.TABLE["default"]


def test_table_rows_start_as_the_h100_h200_tuning():
    """Every family has every kernel, and all rows hold the values tuned on the H100/H200."""
    default = tiles.TABLE["default"]
    for fam in ("H100", "H200"):
        assert tiles.TABLE[fam] == default
    assert default["lora_decode"] == dict(block_n=128, block_d=1024, num_warps=4)
    assert default["mixlora_hidden"] == dict(block_f=128, block_d=1024, num_warps=8)
    assert tiles.for_tokens(default["lora_decode_split"], 1) == dict(chunk=256, block_n=64, num_warps=8,
                                                                     shrink_warps=4)
    assert tiles.for_tokens(default["mixlora_hidden_split"], 8) == dict(chunk=256, block_f=128, num_warps=8,
                                                                        shrink_warps=4)
    assert default["merge"] == dict(block_m=32, block_n=256, num_warps=4, programs_per_sm=8)


def test_for_tokens_steps():
    steps = ((1, {"w": 8}), (16, {"w": 2}), (64, {"w": 1}))
    assert [tiles.for_tokens(steps, t)["w"] for t in (0, 1, 15, 16, 63, 64, 500)] == [8, 8, 8, 2, 2, 1, 1]
    split = tiles.TABLE["default"]["lora_decode_split"]
    assert (tiles.for_tokens(split, 15)["num_warps"], tiles.for_tokens(split, 16)["num_warps"]) == (8, 2)
