"""MixLoRA: equivalence with the reference `mixlora` package, the load-balance loss, routing edge cases."""
import copy
import json

import pytest
import torch

import moelora
from moelora.layers.router import Routing, load_balance_loss, load_balance_terms, route
from conftest import make_tiny, randomize_adapter_


def _write_reference_adapter(path, model, num_experts, top_k, r=4, alpha=8, seed=0, targets=None):
    """A reference-format MixLoRA folder (adapter_config.json + adapter_model.bin) with random tensors."""
    targets = targets or ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g) * 0.2  # noqa: E731
    c = model.config
    shapes = {"q_proj": (c.num_attention_heads * (c.hidden_size // c.num_attention_heads), c.hidden_size),
              "k_proj": (c.num_key_value_heads * (c.hidden_size // c.num_attention_heads), c.hidden_size),
              "v_proj": (c.num_key_value_heads * (c.hidden_size // c.num_attention_heads), c.hidden_size),
              "o_proj": (c.hidden_size, c.hidden_size),
              "gate_proj": (c.intermediate_size, c.hidden_size), "up_proj": (c.intermediate_size, c.hidden_size),
              "down_proj": (c.hidden_size, c.intermediate_size)}
    w = {}
    for i in range(c.num_hidden_layers):
        w[f"mixlora.layers.{i}.mlp.moe_gate.weight"] = rnd(num_experts, c.hidden_size)
        for p in targets:
            out_f, in_f = shapes[p]
            if p.endswith(("gate_proj", "up_proj", "down_proj")):
                for e in range(num_experts):
                    w[f"mixlora.layers.{i}.mlp.{p}.experts.{e}.lora_A.weight"] = rnd(r, in_f)
                    w[f"mixlora.layers.{i}.mlp.{p}.experts.{e}.lora_B.weight"] = rnd(out_f, r)
            else:
                w[f"mixlora.layers.{i}.self_attn.{p}.lora_A.weight"] = rnd(r, in_f)
                w[f"mixlora.layers.{i}.self_attn.{p}.lora_B.weight"] = rnd(out_f, r)
    path.mkdir(parents=True, exist_ok=True)
    cfg = {"bias": "none", "peft_type": "MIXLORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "tiny",
           "r": r, "lora_alpha": alpha, "lora_dropout": 0.05, "target_modules": targets,
           "routing_strategy": "mixlora", "num_experts": num_experts, "top_k": top_k,
           "router_aux_loss_coef": 0.01, "router_init_range": 0.02, "jitter_noise": 0.0,
           "act_fn": c.hidden_act}
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    torch.save(w, path / "adapter_model.bin")
    return cfg, w


def _reference_logits(model, path, ids, mask):
    mixlora = pytest.importorskip("mixlora")
    config, weights = mixlora.load_adapter_weights(str(path), device="cpu", dtype=torch.float32)
    mixlora.inject_adapter_in_model(model, config, weights)
    model.eval()
    for layer in model.model.layers:  # the reference keeps expert dropout out of the module tree
        for moe in layer.mlp.mixlora_moes.values():
            for lin in moe.experts_.values():
                lin.eval()
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


def _batch(vocab=61, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    return ids, mask


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("top_k,num_experts", [(1, 4), (2, 4), (4, 4)])
@pytest.mark.parametrize("backend", ["eager", "fused"])
def test_logits_equal_reference_mixlora(tmp_path, arch, top_k, num_experts, backend):
    base = make_tiny(arch)
    ref_model = copy.deepcopy(base)
    _write_reference_adapter(tmp_path / "ref", base, num_experts, top_k)
    ids, mask = _batch()
    ref = _reference_logits(ref_model, tmp_path / "ref", ids, mask)

    ours = moelora.load_adapter(base, tmp_path / "ref")  # reads the reference format
    for m in ours.modules():
        if isinstance(m, moelora.MixLoraAdapter):
            m.backend = backend
    with torch.no_grad():
        out = ours(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=1e-5)
    # saved in our format and loaded again: same logits
    moelora.save_adapter(ours, tmp_path / "ours")
    again = moelora.load_adapter(make_tiny(arch), tmp_path / "ours")
    for m in again.modules():
        if isinstance(m, moelora.MixLoraAdapter):
            m.backend = backend
    with torch.no_grad():
        torch.testing.assert_close(again(ids, attention_mask=mask).logits, out, atol=0, rtol=0)


def test_load_balance_loss_matches_hand_formula_and_ignores_padding():
    g = torch.Generator().manual_seed(0)
    N, E, K = 50, 6, 2
    logits = torch.randn(N, E, generator=g)
    mask = torch.rand(N, generator=g) > 0.3
    r = route(logits, "topk", K)
    loss = load_balance_loss(*load_balance_terms(r, mask, E), E)
    # hand-written: f_e over non-pad tokens summed over K slots, P_e mean prob over non-pad tokens
    probs = torch.softmax(logits, -1)[mask]
    top = torch.topk(probs, K, -1).indices
    f = torch.stack([(top == e).any(-1).float().mean() for e in range(E)])
    P = probs.mean(0)
    torch.testing.assert_close(loss, E * (f * P).sum())
    # padding rows can hold anything
    logits2 = logits.clone()
    logits2[~mask] = torch.randn(int((~mask).sum()), E, generator=g) * 10
    loss2 = load_balance_loss(*load_balance_terms(route(logits2, "topk", K), mask, E), E)
    torch.testing.assert_close(loss2, loss)


@pytest.mark.parametrize("K", [1, 2, 3])
def test_load_balance_loss_is_k_under_perfect_balance(K):
    E = 6
    N = E * 10
    probs = torch.full((N, E), 1.0 / E)
    experts = torch.stack([(torch.arange(N) + j) % E for j in range(K)], -1)
    r = Routing(torch.full((N, K), 1.0 / K), experts, probs, torch.ones(N, K, dtype=torch.bool))
    assert load_balance_loss(*load_balance_terms(r, None, E), E).item() == pytest.approx(K)


def test_model_aux_loss_is_coef_times_layer_mean():
    model = moelora.inject_adapter(make_tiny("llama"), moelora.MixLoraConfig(num_experts=4, top_k=2, r=4, router_aux_loss_coef=0.1))
    ids, mask = _batch()
    labels = ids.masked_fill(mask == 0, -100)
    out = model(ids, attention_mask=mask, labels=labels)
    ce = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 61), labels[:, 1:].reshape(-1))
    per_layer = []
    for layer in model.model.layers:
        r = model.moelora_state.records["default"][layer.mlp.layer_idx]
        per_layer.append(load_balance_loss(*load_balance_terms(r.routing, r.token_mask, 4), 4))
    torch.testing.assert_close(out.aux_loss, 0.1 * torch.stack(per_layer).mean())
    torch.testing.assert_close(out.loss, ce + out.aux_loss)
    assert r.token_mask.sum() == mask.sum()


@pytest.mark.parametrize("pooling", ["layer_mean", "pooled"])
@pytest.mark.parametrize("masked", [False, True])
def test_aux_loss_over_all_layers_at_once_equals_the_loop(pooling: str, masked: bool) -> None:
    """``aux_loss_from_records`` computes every layer's load-balance terms in one batched pass
    (``hooks._stacked_terms``) when the layers share their token mask and routing shapes: the same
    loss and router gradients as the per-layer loop over ``load_balance_terms``, on fresh random
    routings, with and without a selection mask per slot (dynamic routing, a mixed batch's slots
    past an adapter's top-k); layers with different token masks take the loop."""
    from moelora import hooks
    from moelora.state import LayerRouting

    g = torch.Generator().manual_seed(3)
    L, N, E, K = 5, 23, 6, 2
    mask = (torch.rand(N, generator=g) > 0.3) if masked else None
    logits = torch.randn(L, N, E, generator=g, requires_grad=True)

    def records(selected: bool):
        out = {}
        for layer in range(L):
            probs = torch.softmax(logits[layer], -1)
            w, idx = torch.topk(probs, K, -1)
            sel = (torch.rand(N, K, generator=torch.Generator().manual_seed(layer)) > 0.2) if selected else None
            out[layer] = LayerRouting(layer, Routing(w, idx, probs, sel), mask, E)
        return out

    def loop(recs):
        terms = [load_balance_terms(r.routing, r.token_mask, E) for r in recs.values()]
        if pooling == "pooled":
            return load_balance_loss(sum(t[0] for t in terms), sum(t[1] for t in terms), sum(t[2] for t in terms), E)
        return torch.stack([load_balance_loss(*t, E) for t in terms]).mean()

    for selected in (False, True):
        recs = records(selected)
        assert hooks._stacked_terms(list(recs.values())) is not None
        got = hooks.aux_loss_from_records(recs, pooling)
        (g_got,) = torch.autograd.grad(got, logits, retain_graph=True)
        ref = loop(recs)
        (g_ref,) = torch.autograd.grad(ref, logits)
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(g_got, g_ref, rtol=1e-5, atol=1e-8)
    if masked:  # another mask in one layer (same values, other memory): the loop
        recs = records(False)
        recs[2] = LayerRouting(2, recs[2].routing, mask.clone(), E)
        assert hooks._stacked_terms(list(recs.values())) is None
        torch.testing.assert_close(hooks.aux_loss_from_records(recs, pooling), loop(recs))


def test_routing_edge_cases_eager_vs_fused():
    """All tokens to one expert, an expert with no tokens, a single token: both backends agree."""
    torch.manual_seed(0)
    model = moelora.inject_adapter(make_tiny("llama"), moelora.MixLoraConfig(num_experts=4, top_k=2, r=4, lora_dropout=0.0))
    randomize_adapter_(model)
    ffn = model.model.layers[0].mlp
    moe = ffn.adapters["default"]
    for n in (1, 9):
        x = torch.randn(n, 24)
        # every token goes to experts 2 then 0; experts 1 and 3 get nothing
        probs = torch.tensor([0.3, 0.05, 0.6, 0.05]).expand(n, 4)
        routing = Routing(torch.tensor([[0.6, 0.4]]).expand(n, 2), torch.tensor([[2, 0]]).expand(n, 2), probs, None)
        with torch.no_grad():
            eager, fused = moe.forward_eager(ffn, x, routing), moe.forward_fused(ffn, x, routing)
        torch.testing.assert_close(fused, eager, atol=1e-5, rtol=1e-5)
        counts, _, _ = load_balance_terms(routing, None, 4)
        assert counts[1] == 0 and counts[3] == 0 and counts[2] == n
    # K == E: every expert on every token
    x = torch.randn(5, 24)
    r = route(torch.randn(5, 4), "topk", 4)
    with torch.no_grad():
        torch.testing.assert_close(moe.forward_fused(ffn, x, r), moe.forward_eager(ffn, x, r), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padded_batch_equals_each_sequence_alone(padding_side):
    model = moelora.inject_adapter(make_tiny("llama"), moelora.MixLoraConfig(num_experts=4, top_k=2, r=4))
    randomize_adapter_(model)
    seqs = [torch.tensor([3, 9, 4, 1, 7, 2]), torch.tensor([8, 5, 6])]
    T = 6
    ids = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(T - len(s), T) if padding_side == "left" else slice(0, len(s))
        ids[i, sl], mask[i, sl] = s, 1
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits
        for i, s in enumerate(seqs):
            alone = model(s[None]).logits[0]
            sl = slice(T - len(s), T) if padding_side == "left" else slice(0, len(s))
            torch.testing.assert_close(batched[i, sl], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("strategy", ["dynamic", "switch"])
def test_other_strategies_run_and_backends_agree(strategy):
    model = moelora.inject_adapter(make_tiny("llama"), moelora.MixLoraConfig(
        num_experts=4, top_k=2, r=4, lora_dropout=0.0, routing_strategy=strategy, top_p=0.6, capacity_factor=0.5))
    randomize_adapter_(model, scale=0.1)
    ids, mask = _batch()
    outs = {}
    for backend in ("eager", "fused"):
        for layer in model.model.layers:
            layer.mlp.adapters["default"].backend = backend
        with torch.no_grad():
            outs[backend] = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(outs["fused"], outs["eager"], atol=1e-5, rtol=1e-5)


def test_dynamic_routing_keeps_experts_until_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    r = route(logits, "dynamic", top_p=0.7)
    kept = r.experts[r.weights > 0].tolist()
    assert kept == [0, 1]
    torch.testing.assert_close(r.weights[r.weights > 0], torch.tensor([0.625, 0.375]))


def test_switch_capacity_drops_overflow_tokens_to_frozen_ffn():
    logits = torch.tensor([[5.0, 0.0]] * 4)  # all 4 tokens want expert 0, capacity ceil(0.5*4/2) = 1
    r = route(logits, "switch", capacity_factor=0.5)
    assert (r.weights[:, 0] > 0).tolist() == [True, False, False, False]


def test_jitter_only_in_training_and_not_in_place():
    model = moelora.inject_adapter(make_tiny("llama"), moelora.MixLoraConfig(num_experts=4, top_k=2, r=4, jitter_noise=0.5))
    ids, _ = _batch()
    with torch.no_grad():
        a, b = model(ids).logits, model(ids).logits
    assert torch.equal(a, b)  # eval: deterministic
    router = model.model.layers[0].mlp.router
    x = torch.randn(5, 24)
    x0 = x.clone()
    router.train()
    router(x)
    assert torch.equal(x, x0)


def test_bad_configs_have_clear_errors():
    with pytest.raises(moelora.AdapterConfigError, match="top_k"):
        moelora.MixLoraConfig(num_experts=2, top_k=3).validate()
    with pytest.raises(moelora.AdapterConfigError, match="r must be"):
        moelora.MixLoraConfig(r=0).validate()
    with pytest.raises(moelora.AdapterConfigError, match="unknown key"):
        moelora.config_from_dict({"method": "mixlora", "num_expert": 4})
    with pytest.raises(moelora.AdapterConfigError, match="unknown adapter method"):
        moelora.config_from_dict({"method": "dora"})
    cfg = moelora.MixLoraConfig(num_experts=5, top_k=3, jitter_noise=0.1, router_init_range=0.05)
    assert moelora.config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg.validate()


_DECODE_SCRIPT = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
from conftest import make_tiny, randomize_adapter_
import moelora
_backend = moelora.kernel_backend("triton")  # the Triton kernels on CPU, for the whole script
_backend.__enter__()
for arch in ("llama", "gemma"):
    m = make_tiny(arch)
    moelora.inject_adapter(m, moelora.MixLoraConfig(num_experts=4, top_k=2, r=4, lora_dropout=0.0))
    randomize_adapter_(m)
    ids = torch.randint(0, 61, (3, 5), generator=torch.Generator().manual_seed(0))
    out = {}
    for backend in ("eager", "fused"):
        for layer in m.model.layers:
            layer.mlp.adapters["default"].backend = backend
        with torch.no_grad():
            out[backend] = m(ids).logits
    with torch.no_grad():
        ffn = m.model.layers[0].mlp
        assert ffn.adapters["default"]._decode_kernel_applies(ffn, torch.zeros(2, 24)), "decode kernel path not taken"
    torch.testing.assert_close(out["fused"], out["eager"], atol=1e-4, rtol=1e-4)
    st = moelora.router_statistics(m)
    assert abs(float(st[0]["load"].sum()) - 1.0) < 1e-5
print("OK")
"""


@pytest.mark.slow
def test_decode_kernels_match_eager_under_interpreter():
    """The one-launch decode kernels (router fused) drive a tiny model: same logits as eager."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", _DECODE_SCRIPT, os.path.dirname(__file__)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]


def test_fused_training_matches_eager_gradients():
    """The static-shape fused path (training, gathered experts) has the eager path's gradients."""
    model = moelora.inject_adapter(make_tiny("qwen2"), moelora.MixLoraConfig(num_experts=4, top_k=2, r=4, lora_dropout=0.0))
    randomize_adapter_(model, scale=0.2)
    model.train()
    ids, mask = _batch()
    grads = {}
    for backend in ("eager", "fused"):
        for layer in model.model.layers:
            layer.mlp.adapters["default"].backend = backend
        model.zero_grad()
        out = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
        out.loss.backward()
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads["fused"].keys() == grads["eager"].keys() and len(grads["eager"]) > 0
    for n, g in grads["eager"].items():
        torch.testing.assert_close(grads["fused"][n], g, atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("strategy", ["topk", "dynamic"])
def test_router_statistics_count_the_experts_each_token_runs_through(strategy):
    """experts_per_token: top_k for top-k routing; for top-p, the mean number of experts the
    tokens' routing selected (counted here from the routing records, padding left out)."""
    model = moelora.inject_adapter(make_tiny("llama"), moelora.MixLoraConfig(
        num_experts=4, top_k=2, r=4, lora_dropout=0.0, routing_strategy=strategy, top_p=0.6))
    randomize_adapter_(model, scale=0.5)
    ids, mask = _batch()
    with torch.no_grad():
        model(ids, attention_mask=mask)
    stats, records = moelora.router_statistics(model), moelora.routing_records(model)
    for s in stats:
        experts, weights, tmask = records[s["layer"]]
        per_token = (weights > 0).sum(-1).float()
        if tmask is not None:
            per_token = per_token[tmask.reshape(-1).bool()]
        want = 2.0 if strategy == "topk" else per_token.mean().item()
        assert float(s["experts_per_token"]) == pytest.approx(want, rel=1e-5), (s["layer"], strategy)
    if strategy == "dynamic":  # the test means something: top-p kept different counts per token
        assert any(len(set((w > 0).sum(-1).tolist())) > 1 for _, w, _ in records.values())
