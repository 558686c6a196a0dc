"""moelora.serve.memory: the KV cache plan leaves the adapter pool, one step's activations, the
adapter stacks of a mixed step and a margin free (pure arithmetic, no device)."""
from __future__ import annotations

import pytest

from moelora.serve.memory import (GiB, MemoryPlanError, ModelDims, adapter_stack_bytes, kv_bytes_per_token,
                                  plan_kv_cache, step_activation_bytes)

# the llama2_7b_shape of the H200 run: 32 layers, hidden 4096, FFN 11008, 32 heads (no GQA), vocab 32000, bf16
L7B = ModelDims(num_layers=32, hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_kv_heads=32,
                head_dim=128, vocab_size=32000, dtype_bytes=2)


def test_kv_bytes_per_token():
    assert kv_bytes_per_token(L7B) == 2 * 32 * 4096 * 2 == 512 * 1024  # K and V, every layer, bf16


def test_plan_leaves_pool_step_stacks_and_margin_free():
    total, free = int(139.8 * GiB), int(126.0 * GiB)  # H200 with the 7B model resident
    pool, stacks = int(12.8 * GiB), adapter_stack_bytes(int(0.4 * GiB), 4)
    plan = plan_kv_cache(free_bytes=free, total_bytes=total, dims=L7B, adapter_bytes=pool, max_batch_tokens=2048,
                         block_size=256, stack_bytes=stacks)
    assert plan.num_blocks > 0 and plan.max_batch_tokens == 2048
    assert plan.kv_bytes == plan.num_blocks * 256 * kv_bytes_per_token(L7B)
    assert plan.step_bytes == step_activation_bytes(L7B, 2048) > 1 * GiB  # MixLoRA's k x FFN hidden and logits
    assert plan.margin_bytes == int(0.03 * total)
    used = plan.kv_bytes + plan.cb_bytes + pool + plan.step_bytes + stacks + plan.margin_bytes
    assert used <= free  # everything the engine allocates after the cache fits
    assert free - used < 256 * (kv_bytes_per_token(L7B) + 4 * 4096 * 2 + 8 + 2048 * 2)  # less than one block left
    # every byte given to the pool comes out of the cache (to the block)
    bigger = plan_kv_cache(free_bytes=free, total_bytes=total, dims=L7B, adapter_bytes=pool + 4 * GiB,
                           max_batch_tokens=2048, stack_bytes=stacks)
    per_block = 256 * (kv_bytes_per_token(L7B) + 4 * 4096 * 2 + 8 + 2048 * 2)
    assert 4 * GiB <= (plan.num_blocks - bigger.num_blocks) * per_block < 4 * GiB + per_block
    # a larger step or more adapters per step: fewer blocks, never more
    assert plan_kv_cache(free_bytes=free, total_bytes=total, dims=L7B, adapter_bytes=pool, max_batch_tokens=8192,
                         stack_bytes=stacks).num_blocks < plan.num_blocks
    assert plan_kv_cache(free_bytes=free, total_bytes=total, dims=L7B, adapter_bytes=pool, max_batch_tokens=2048,
                         stack_bytes=adapter_stack_bytes(int(0.4 * GiB), 16)).num_blocks < plan.num_blocks


def test_plan_options_and_errors():
    kw = dict(total_bytes=80 * GiB, dims=L7B, max_batch_tokens=1024, block_size=256)
    flash = plan_kv_cache(free_bytes=60 * GiB, adapter_bytes=4 * GiB, attention_mask=False, **kw)
    sdpa = plan_kv_cache(free_bytes=60 * GiB, adapter_bytes=4 * GiB, attention_mask=True, **kw)
    assert flash.num_blocks > sdpa.num_blocks  # the dense mask of paged sdpa costs a row entry per cache token
    capped = plan_kv_cache(free_bytes=60 * GiB, adapter_bytes=4 * GiB, kv_memory_fraction=0.25, **kw)
    assert capped.num_blocks * 256 * (kv_bytes_per_token(L7B) + 4 * 4096 * 2 + 8 + 1024 * 2) <= 0.25 * 60 * GiB
    fixed = plan_kv_cache(free_bytes=60 * GiB, adapter_bytes=4 * GiB, step_bytes=10 * GiB, **kw)
    assert fixed.step_bytes == 10 * GiB and fixed.num_blocks < sdpa.num_blocks
    with pytest.raises(MemoryPlanError, match="no room for a KV cache.*adapter pool 30.00"):
        plan_kv_cache(free_bytes=32 * GiB, adapter_bytes=30 * GiB, **kw)
    with pytest.raises(ValueError, match="kv_memory_fraction"):
        plan_kv_cache(free_bytes=60 * GiB, adapter_bytes=0, kv_memory_fraction=1.5, **kw)


def test_engine_plan_uses_the_pool_the_step_cap_and_the_largest_adapter(monkeypatch):
    """``Engine._plan_memory`` (what runs on CUDA at start), with the device's memory faked: the
    pool defaults to 10% of the device, the step cap to the slot count, the stacks are sized by
    the largest adapter known, and the registry then refuses larger ones."""
    import torch
    from conftest import make_tiny

    import moelora
    from moelora.serve import Engine

    m = make_tiny()
    moelora.inject_adapter(m, moelora.LoraConfig(r=4), adapter_name="small")
    moelora.add_adapter(m, "big", moelora.MixLoraConfig(num_experts=4, top_k=2, r=8))
    eng = Engine(m, max_new_tokens=4, eos_token_id=-1, max_resident_adapters=3)
    try:
        reg = eng.registry
        small, big = (reg.part_bytes(reg.adapters[n]) for n in ("small", "big"))
        assert small[1] == 0 and big[1] > 0 and sum(big) == reg.adapters["big"].nbytes
        monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (6 * GiB, 8 * GiB))
        reg.memory_bytes = None
        plan = eng._plan_memory(256, 16, None, None, None)
        assert reg.memory_bytes == int(0.8 * GiB) == plan.adapter_bytes
        # a stack position: the largest plain-LoRA part (r4 LoRA on 7 linears > MixLoRA's attention LoRA)
        # and the largest MixLoRA experts + router
        lora_row = max(small[0], big[0])
        assert eng.max_adapters_per_step == 3 and reg.max_part_bytes == (lora_row, big[1])
        assert plan.stack_bytes == adapter_stack_bytes(lora_row, 3, big[1]) == 4 * lora_row + 5 * big[1]
        assert plan.num_blocks > 0
        # explicit bounds win
        eng._plan_memory(256, 16, 0.001, None, None, 0.002)
        assert reg.max_part_bytes == (int(0.001 * GiB), int(0.002 * GiB))
    finally:
        eng.close()


def test_mixlora_positions_of_their_own_shrink_the_stacks(monkeypatch):
    """``max_mixlora_per_step``: only that many positions hold expert rows, beside the per-step cap
    of plain positions; the plan's stack bytes drop accordingly, and the cap is checked."""
    import torch
    from conftest import make_tiny

    import moelora
    from moelora.serve import Engine

    # 7B shape, bf16: LoRA r64 on the 7 linears (0.32 GB), MixLoRA 8 experts r16 on gate/up/down plus
    # its fp32 router (0.38 GB)
    lora = 64 * (4 * (4096 + 4096) + 3 * (4096 + 11008)) * 32 * 2
    expert = 8 * 16 * 3 * (4096 + 11008) * 32 * 2 + 8 * 4096 * 32 * 4
    shared = adapter_stack_bytes(lora, 32, expert)
    split = adapter_stack_bytes(lora, 64, expert, mixlora_positions=16)
    assert shared == 33 * lora + 34 * expert and split == (64 + 16 + 1) * lora + 17 * expert
    assert split < 1.45 * shared  # twice the positions for 1.4x the bytes
    assert adapter_stack_bytes(lora, 4) == (2 * 5 + 1) * lora  # both stacks at every position, + the zero expert

    with pytest.raises(ValueError, match="max_mixlora_per_step must be >= 1"):
        Engine(make_tiny(), max_mixlora_per_step=0)
    with pytest.raises(ValueError, match="share of max_adapters_per_step"):
        Engine(make_tiny(), max_adapters_per_step=2, max_mixlora_per_step=3)
    m = make_tiny()
    moelora.inject_adapter(m, moelora.LoraConfig(r=4), adapter_name="small")
    moelora.add_adapter(m, "big", moelora.MixLoraConfig(num_experts=4, top_k=2, r=8))
    eng = Engine(m, max_new_tokens=4, eos_token_id=-1, max_resident_adapters=3, max_mixlora_per_step=1)
    try:
        reg = eng.registry
        monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (6 * GiB, 8 * GiB))
        plan = eng._plan_memory(256, 16, None, None, None)
        lora_row, expert_row = reg.max_part_bytes
        assert plan.stack_bytes == (3 + 1 + 1) * lora_row + 2 * expert_row
        assert reg.stack_bounds().mixlora_positions == 1
    finally:
        eng.close()


def test_stacks_as_built_stay_within_the_plan_bound():
    """A mixed step's stacks as built (``adapted.stacked_adapter_bytes``: shared and split layouts) are within
    ``adapter_stack_bytes`` of the registry's per-kind parts, when the largest-rank adapter targets
    every linear the others do (the bound's premise)."""
    from conftest import make_tiny, randomize_adapter_

    import moelora
    from moelora.serve import Engine
    from moelora.layers.adapted import stacked_adapter_bytes

    for mix_cap in (None, 1):
        m = make_tiny()
        moelora.inject_adapter(m, moelora.LoraConfig(r=8), adapter_name="a")
        moelora.add_adapter(m, "b", moelora.LoraConfig(r=4))
        moelora.add_adapter(m, "mx", moelora.MixLoraConfig(num_experts=4, top_k=2, r=4))
        randomize_adapter_(m, seed=5)
        eng = Engine(m.eval(), max_new_tokens=4, eos_token_id=-1, max_adapters_per_step=3,
                     max_mixlora_per_step=mix_cap, max_resident_adapters=4)
        try:
            reg = eng.registry
            parts = [reg.part_bytes(reg.adapters[n]) for n in ("a", "b", "mx")]
            with eng._model_lock:  # one packed step of all three and the base
                rids = [eng.submit([1, 2, 3], n) for n in ("a", "b", "mx", None)]
            for r in rids:
                list(eng.stream(r))
            assert eng.mixed_steps > 0
            built = stacked_adapter_bytes(m)
            bound = adapter_stack_bytes(max(p for p, _ in parts), 3, parts[2][1], mix_cap)
            assert 0.85 * bound < built <= bound, (mix_cap, built, bound)
        finally:
            eng.close()
