"""GPU checks of the fast paths against the eager references (skipped without CUDA)."""
import pytest
import torch

import moelora
from moelora import switch_state
from conftest import make_tiny, randomize_adapter_

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _mix(dtype, hidden=256, inter=688, layers=2):
    model = make_tiny("llama", hidden=hidden, inter=inter, layers=layers, heads=8, kv_heads=4).to("cuda", dtype)
    moelora.inject_adapter(model, moelora.MixLoraConfig(num_experts=8, top_k=2, r=16, lora_dropout=0.0))
    randomize_adapter_(model, scale=0.05)
    return model


def _set_backend(model, backend):
    for m in model.modules():
        if isinstance(m, moelora.MixLoraAdapter):
            m.backend = backend


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("batch,seq", [(1, 1), (8, 1), (2, 33), (1, 300)])
def test_mixlora_fused_and_decode_paths_match_eager(dtype, tol, batch, seq):
    model = _mix(dtype)
    ids = torch.randint(0, 61, (batch, seq), device="cuda")
    out = {}
    for backend in ("eager", "fused"):
        _set_backend(model, backend)
        with torch.no_grad():
            out[backend] = model(ids).logits.float()
    err = (out["fused"] - out["eager"]).norm() / out["eager"].norm()
    assert err < tol, err


def test_mixlora_fused_training_grads_match_eager():
    model = _mix(torch.float32)
    model.train()
    ids = torch.randint(0, 61, (4, 64), device="cuda")
    grads = {}
    for backend in ("eager", "fused"):
        _set_backend(model, backend)
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for n, g in grads["eager"].items():
        err = (grads["fused"][n] - g).norm() / g.norm().clamp_min(1e-12)
        assert err < 1e-3, (n, err)


def test_mixlora_decode_step_has_no_host_sync():
    model = _mix(torch.bfloat16)
    _set_backend(model, "fused")
    ids = torch.randint(0, 61, (1, 8), device="cuda")
    with torch.no_grad():
        out = model(ids, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            model(nxt, past_key_values=out.past_key_values, use_cache=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_switch_merged_decode_on_gpu(dtype):
    ids = torch.randint(0, 61, (1, 12), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    res = {}
    for mode in ("unmerged", "merge"):
        model = make_tiny("llama", hidden=256, inter=688, heads=8, kv_heads=4).to("cuda", dtype)
        moelora.inject_adapter(model, moelora.LoraSwitchConfig(num_experts=8, top_k=2, r=16, lora_dropout=0.0, switch_mode=mode))
        randomize_adapter_(model, scale=0.05)
        w0 = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            r = model.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0,
                               output_scores=True, return_dict_in_generate=True)
        res[mode] = (r.sequences, torch.stack(r.scores).float())
        assert (switch_state(model).merge_launches > 0) == (mode == "merge")
        assert all(torch.equal(v, w0[k]) for k, v in model.state_dict().items()), "weights not restored bit-exactly"
    if dtype == torch.float32:
        assert torch.equal(res["merge"][0], res["unmerged"][0])
        torch.testing.assert_close(res["merge"][1], res["unmerged"][1], atol=1e-3, rtol=1e-3)
    else:
        # bf16: the merged weight is rounded once, so logits agree to bf16 tolerance on the same prefix
        a, b = res["merge"][1][0], res["unmerged"][1][0]
        ok = torch.isfinite(b)  # min_new_tokens masks EOS to -inf
        assert torch.equal(ok, torch.isfinite(a))
        assert ((a[ok] - b[ok]).norm() / b[ok].norm()) < 2e-2


@pytest.mark.parametrize("method", ["mixlora", "lora_switch", "lora"])
def test_static_cache_compiled_generate_matches_eager(method):
    """HF's static-cache generate compiles the forward (Inductor + CUDA graphs) with our decode
    kernels as custom ops inside: same greedy tokens as eager decoding, logits within bf16 noise."""
    cfg = {"mixlora": moelora.MixLoraConfig(num_experts=8, top_k=2, r=16, lora_dropout=0.0),
           "lora_switch": moelora.LoraSwitchConfig(num_experts=8, top_k=2, r=16, lora_dropout=0.0,
                                                   switch_mode="unmerged"),
           "lora": moelora.LoraConfig(r=16, lora_dropout=0.0)}[method]
    model = make_tiny("llama", hidden=256, inter=688, layers=2, heads=8, kv_heads=4).to("cuda", torch.bfloat16)
    ids = torch.randint(4, 61, (1, 12), device="cuda")
    gen = dict(do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        base = model.generate(ids, max_new_tokens=1, **gen).logits[0].float()
    moelora.inject_adapter(model, cfg)
    randomize_adapter_(model, scale=0.05)
    torch.compiler.reset()
    out = {}
    with torch.no_grad():
        for mode in ("eager", "static"):
            kw = {"cache_implementation": "static"} if mode == "static" else {}
            out[mode] = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0,
                                       output_logits=True, return_dict_in_generate=True, **kw)
    torch.compiler.reset()
    # A random tiny model has near-tied logits, so bf16 noise may flip a greedy token; compare the
    # steps up to and including the first differing token (both runs saw the same prefix there).
    new_s, new_e = out["static"].sequences[0, 12:], out["eager"].sequences[0, 12:]
    differ = (new_s != new_e).nonzero()
    n = int(differ[0]) + 1 if len(differ) else len(new_e)
    # How much the adapter moves the logits (first step): a compiled path that lost the adapter
    # delta would be off by about this much, so it must be far above the compiled-vs-eager error.
    effect = float((out["eager"].logits[0].float() - base).norm() / base.norm())
    assert effect > 0.05, effect
    for a, b in list(zip(out["static"].logits, out["eager"].logits))[:n]:
        err = (a.float() - b.float()).norm() / b.float().norm()
        assert err < min(2e-2, effect / 5), (err, effect)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-3), (torch.bfloat16, 6e-2)])
def test_mixed_adapter_batch_matches_each_row_alone_on_gpu(dtype, tol):
    """LoRA (two ranks), MixLoRA and LoRA-Switch adapters and the base in one batch on CUDA: the
    Triton gathered kernel (plain LoRA slots) and the routed paths against each row alone."""
    model = make_tiny("llama", hidden=256, inter=688, layers=2, heads=8, kv_heads=4).to("cuda", dtype)
    moelora.inject_adapter(model, moelora.LoraConfig(r=16, lora_dropout=0.0), adapter_name="l16")
    moelora.add_adapter(model, "l4", moelora.LoraConfig(r=4, lora_dropout=0.0))
    moelora.add_adapter(model, "mix", moelora.MixLoraConfig(num_experts=8, top_k=2, r=8, lora_dropout=0.0))
    moelora.add_adapter(model, "sw", moelora.LoraSwitchConfig(num_experts=4, top_k=2, r=8, lora_dropout=0.0))
    randomize_adapter_(model, scale=0.05)
    model.eval()
    names = ["l16", "l4", None, "mix", "sw", "l16", "l4", "l4"]
    ids = torch.randint(1, 61, (len(names), 9), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0, output_scores=True,
              return_dict_in_generate=True)
    with torch.no_grad():
        mixed = model(ids, attention_mask=mask, adapter_names=names).logits.float()
        gen = model.generate(ids, attention_mask=mask, adapter_names=names, **kw)
        for i, n in enumerate(names):
            alone = model(ids[i:i + 1], attention_mask=mask[i:i + 1], adapter_names=[n]).logits.float()
            real = mask[i].bool()
            torch.testing.assert_close(mixed[i][real], alone[0][real], atol=tol, rtol=tol)
            one = model.generate(ids[i:i + 1], attention_mask=mask[i:i + 1], adapter_names=[n], **kw)
            step = torch.stack(gen.scores)[:, i].float()
            torch.testing.assert_close(step[0], torch.stack(one.scores)[0, 0].float(), atol=tol, rtol=tol)
            if dtype == torch.float32:
                assert torch.equal(gen.sequences[i], one.sequences[0]), f"row {i} ({n})"


def test_own_dropout_stream_survives_a_move_to_the_gpu():
    """seed_dropout on the CPU, then model.to("cuda"): training draws its masks from the adapter's
    own (CPU) stream, the same masks as on the CPU model with the same seed."""
    def loss_after_seed(device):
        model = make_tiny("llama")
        moelora.inject_adapter(model, moelora.LoraConfig(r=4, lora_dropout=0.5))
        randomize_adapter_(model, seed=1)
        moelora.adapter_state(model).seed_dropout("default", 7)  # a CPU generator
        model.to(device).train()
        ids = torch.randint(1, 61, (2, 6), generator=torch.Generator().manual_seed(0)).to(device)
        return model(ids, labels=ids).loss.item()

    assert loss_after_seed("cuda") == pytest.approx(loss_after_seed("cpu"), rel=1e-4)
