"""MixLoRA training memory (issue 19): the expert mixture is recomputed in backward
(``_MixRecompute``) instead of storing its (N, K, F) per-slot tensors. Its twin is the plain
composition (``dispatch.plain_mixture_backward()``): same outputs and every gradient, on the torch path and
on the Triton path (interpreter on CPU, in a subprocess); and what autograd saves is small."""
import os
import subprocess
import sys

import pytest
import torch

import moelora
from moelora.layers.dispatch import plain_mixture_backward
from conftest import make_tiny, randomize_adapter_


def _batch(vocab=61, seed=3, shape=(3, 11)):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, shape, generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    return ids, mask


def _step(model, ids, mask, recompute: bool, seed: int = 7):
    with plain_mixture_backward(not recompute):
        model.zero_grad()
        torch.manual_seed(seed)  # the same dropout masks for both forms
        out = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
        out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


def _compare(model, ids, mask, atol=1e-6, rtol=1e-5):
    a = _step(model, ids, mask, True)
    b = _step(model, ids, mask, False)
    torch.testing.assert_close(a[0], b[0], atol=atol, rtol=rtol)
    torch.testing.assert_close(a[1], b[1], atol=atol, rtol=rtol)
    assert a[2].keys() == b[2].keys() and any("lora_A" in n and "mlp" in n for n in a[2])
    for n, g in b[2].items():
        torch.testing.assert_close(a[2][n], g, atol=atol, rtol=rtol, msg=n)


@pytest.mark.parametrize("kw", [dict(lora_dropout=0.0), dict(lora_dropout=0.2),
                                dict(lora_dropout=0.2, routing_strategy="switch", top_k=1),
                                dict(lora_dropout=0.0, expert_target_modules=("up_proj", "down_proj"))])
def test_recompute_matches_plain_composition(kw):
    cfg = dict(num_experts=4, top_k=2, r=4, expert_backend="fused")
    cfg.update(kw)
    model = moelora.inject_adapter(make_tiny("llama"), moelora.MixLoraConfig(**cfg))
    randomize_adapter_(model, scale=0.2)
    model.train()
    _compare(model, *_batch())


def test_recompute_own_dropout_stream_matches():
    model = moelora.inject_adapter(make_tiny("qwen2"), moelora.MixLoraConfig(num_experts=4, top_k=2, r=4,
                                                                             lora_dropout=0.3))
    randomize_adapter_(model, scale=0.2)
    model.moelora_state.seed_dropout("default", 5)
    model.train()
    ids, mask = _batch()
    gen = model.moelora_state.adapters["default"].dropout_generator
    s0 = gen.get_state()
    a = _step(model, ids, mask, True)
    gen.set_state(s0)
    b = _step(model, ids, mask, False)
    torch.testing.assert_close(a[0], b[0], atol=1e-6, rtol=1e-5)
    for n, g in b[2].items():
        torch.testing.assert_close(a[2][n], g, atol=1e-6, rtol=1e-5, msg=n)


def test_training_saves_no_per_slot_tensors():
    """The FFN saves no (N, K, F) floating tensor for backward (only bool dropout masks)."""
    model = moelora.inject_adapter(make_tiny("llama", inter=37),
                                   moelora.MixLoraConfig(num_experts=4, top_k=2, r=4, lora_dropout=0.1,
                                                         expert_backend="fused"))
    model.train()
    ids, mask = _batch()
    N, F = ids.numel(), 37
    per_slot = []

    def pack(t):
        if t.is_floating_point() and t.numel() >= N * 2 * F and not isinstance(t, torch.nn.Parameter):
            per_slot.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    assert not per_slot, per_slot


_TRITON_SCRIPT = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
import test_mixlora_training_memory as t
from conftest import make_tiny, randomize_adapter_
import moelora
with moelora.kernel_backend("triton"):
    for kw in (dict(lora_dropout=0.0), dict(lora_dropout=0.2)):
        for shape in ((3, 11), (2, 40)):  # 33 and 80 tokens: the tile kernels
            m = moelora.inject_adapter(make_tiny("llama"), moelora.MixLoraConfig(num_experts=4, top_k=2, r=4,
                                       expert_backend="fused", **kw))
            randomize_adapter_(m, scale=0.2)
            m.train()
            t._compare(m, *t._batch(shape=shape), atol=1e-5, rtol=1e-4)
# the Triton path with recompute against the eager expert loop (no dropout)
m = moelora.inject_adapter(make_tiny("llama"), moelora.MixLoraConfig(num_experts=4, top_k=2, r=4, lora_dropout=0.0))
randomize_adapter_(m, scale=0.2)
m.train()
ids, mask = t._batch()
res = {}
for be in ("eager", "fused"):
    for layer in m.model.layers:
        layer.mlp.adapters["default"].backend = be
    with moelora.kernel_backend("triton"):
        res[be] = t._step(m, ids, mask, True)
torch.testing.assert_close(res["fused"][0], res["eager"][0], atol=1e-5, rtol=1e-4)
for n, g in res["eager"][2].items():
    torch.testing.assert_close(res["fused"][2][n], g, atol=1e-5, rtol=1e-4, msg=n)
print("OK")
"""


def test_recompute_triton_path_matches():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT, os.path.dirname(__file__)], env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]


@pytest.mark.parametrize("backward", [True, False])
def test_a_deleted_model_is_freed_after_a_training_forward(backward):
    """The routing records of the last forward hold values, not its graph: a recomputing
    mixture's ctx (-> FFN -> state -> records -> graph) made a cycle no collector could break,
    and a deleted MixLoRA model kept its base weights (H200, 7B shape: 13.8 GB per model)."""
    import gc
    import weakref

    model = make_tiny("llama", hidden=64, inter=96, layers=2, heads=4, kv_heads=2)
    moelora.inject_adapter(model, moelora.MixLoraConfig(num_experts=4, top_k=2, r=8, expert_backend="fused"))
    model.train()
    ids, mask = _batch()
    out = model(ids, attention_mask=mask, labels=ids)
    assert out.aux_loss.grad_fn is not None  # the aux loss still trains the routers
    if backward:
        out.loss.backward()
        assert all(p.grad is not None for n, p in model.named_parameters() if "router" in n)
    stats = moelora.router_statistics(model)
    assert len(stats) == 2 and all(abs(sum(s["load"]) - 1) < 1e-5 for s in stats)
    refs = [weakref.ref(model.model.layers[0].mlp), weakref.ref(model.lm_head.weight), weakref.ref(model.moelora_state)]
    del model, out
    gc.collect()
    assert [r() is None for r in refs] == [True, True, True]
