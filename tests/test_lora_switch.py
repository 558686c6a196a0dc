"""LoRA-Switch: token-wise routing shared by all layers; merged batch-1 decode equals unmerged."""
import os
import subprocess
import sys

import pytest
import torch

import moelora
from moelora import switch_state
from conftest import make_tiny, randomize_adapter_


def _switch_model(mode="merge", arch="llama", seed=0, **kw):
    model = make_tiny(arch, seed=seed)
    moelora.inject_adapter(model, moelora.LoraSwitchConfig(num_experts=4, top_k=2, r=4, lora_dropout=0.0,
                                                           switch_mode=mode, **kw))
    randomize_adapter_(model, seed=seed, scale=0.3)
    return model


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "base_layer" in k}


def test_unmerged_layer_matches_formula():
    model = _switch_model("unmerged")
    ids = torch.randint(0, 61, (2, 5))
    captured = {}
    lin = model.model.layers[1].mlp.down_proj
    h = lin.register_forward_hook(lambda m, a, o: captured.update(x=a[0], y=o))
    with torch.no_grad():
        model(ids)
    h.remove()
    state = switch_state(model)
    x = captured["x"].reshape(-1, lin.base_layer.in_features)
    expect = lin.base_layer(x)
    for t in range(x.shape[0]):
        for k in range(2):
            e, g = state.experts[t, k], state.weights[t, k]
            expect[t] += g * lin.experts.scaling * (lin.experts.lora_B[e] @ (lin.experts.lora_A[e] @ x[t]))
    torch.testing.assert_close(captured["y"].reshape(expect.shape), expect, atol=1e-5, rtol=1e-5)
    # the routing came from layer 0's input and is shared: same for every layer
    assert state.experts.shape == (10, 2)


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_merged_decode_matches_unmerged_greedy_and_restores_weights(arch):
    ids = torch.randint(0, 61, (1, 6), generator=torch.Generator().manual_seed(1))
    outs, logits = {}, {}
    for mode in ("unmerged", "merge"):
        model = _switch_model(mode, arch=arch)
        w0 = _weights(model)
        with torch.no_grad():
            res = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                 output_scores=True, return_dict_in_generate=True, pad_token_id=0)
        outs[mode], logits[mode] = res.sequences, torch.stack(res.scores)
        state = switch_state(model)
        assert (state.merge_launches > 0) == (mode == "merge")
        assert not state.merged
        after = _weights(model)
        assert all(torch.equal(after[k], w0[k]) for k in w0), "base weights must be bit-identical after generate"
    assert torch.equal(outs["merge"], outs["unmerged"])
    torch.testing.assert_close(logits["merge"], logits["unmerged"], atol=1e-4, rtol=1e-4)


def test_weights_restored_when_generate_raises():
    model = _switch_model("merge")
    w0 = _weights(model)
    calls = {"n": 0}

    def boom(module, args, output):
        calls["n"] += 1
        if calls["n"] == 4:  # a few decode steps in, while a selection is merged
            raise RuntimeError("interrupted")

    h = model.model.norm.register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        model.generate(torch.randint(0, 61, (1, 4)), max_new_tokens=8, do_sample=False, pad_token_id=0)
    h.remove()
    assert switch_state(model).merge_launches > 0
    after = _weights(model)
    assert all(torch.equal(after[k], w0[k]) for k in w0)


def test_sampling_generate_and_batch_fallback():
    model = _switch_model("merge")
    torch.manual_seed(0)
    out = model.generate(torch.randint(0, 61, (1, 4)), max_new_tokens=5, do_sample=True, top_k=5, pad_token_id=0)
    assert out.shape == (1, 9)
    state = switch_state(model)
    n = state.merge_launches
    model.generate(torch.randint(1, 61, (2, 4)), attention_mask=torch.ones(2, 4, dtype=torch.long),
                   max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert state.merge_launches == n, "batch > 1 must use the unmerged path"


def test_training_gives_aux_loss_and_gradients():
    model = _switch_model("auto")
    model.train()
    ids = torch.randint(0, 61, (2, 7))
    out = model(ids, labels=ids)
    assert out.aux_loss is not None and out.aux_loss > 0
    out.loss.backward()
    router = model.model.layers[0].router
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    lin = model.model.layers[1].self_attn.v_proj
    assert lin.experts.lora_A.grad.abs().sum() > 0
    assert switch_state(model).merge_launches == 0


def test_remove_adapter_removes_router_and_generate_wrapper():
    model = _switch_model("merge")
    moelora.remove_adapter(model)
    assert not hasattr(model.model.layers[0], "router")
    assert "generate" not in model.__dict__


_TRITON_SCRIPT = r"""
import os, sys, torch
sys.path.insert(0, sys.argv[1])
from conftest import make_tiny, randomize_adapter_
import moelora
from moelora import switch_state
from moelora_kernels.merge import MergePlan
_backend = moelora.kernel_backend("triton")  # the Triton kernels on CPU, for the whole script
_backend.__enter__()
ids = torch.randint(0, 61, (1, 5), generator=torch.Generator().manual_seed(2))
seqs = {}
for mode in ("unmerged", "merge"):
    m = make_tiny("llama")
    moelora.inject_adapter(m, moelora.LoraSwitchConfig(num_experts=3, top_k=2, r=3, lora_dropout=0.0, switch_mode=mode))
    randomize_adapter_(m)
    w0 = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        seqs[mode] = m.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    st = switch_state(m)
    if mode == "merge":
        assert isinstance(st.plan, MergePlan), type(st.plan)
    assert all(torch.equal(v, w0[k]) for k, v in m.state_dict().items())
assert torch.equal(seqs["merge"], seqs["unmerged"]), seqs
print("OK")
"""


@pytest.mark.slow
def test_merged_decode_through_triton_kernel_interpreter():
    """The real fused kernel (under TRITON_INTERPRET=1) drives merged decode of a tiny model."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    here = os.path.dirname(__file__)
    res = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT, here], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]


def test_selection_change_rate_is_recorded():
    model = _switch_model("merge")
    state = switch_state(model)
    state.history = []
    model.generate(torch.randint(0, 61, (1, 4)), max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert len(state.history) == 5  # one merge per decode step after the prefill
    rate = state.selection_change_rate()
    assert 0.0 <= rate <= 1.0
