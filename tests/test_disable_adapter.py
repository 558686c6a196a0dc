"""moelora.disable_adapter: the base model inside the block (its own modules), the adapter after it."""
import pytest
import torch

import moelora
from conftest import make_tiny, randomize_adapter_

CONFIGS = {
    "lora": lambda: moelora.LoraConfig(r=4, lora_dropout=0.0),
    "mixlora": lambda: moelora.MixLoraConfig(num_experts=3, top_k=2, r=4, lora_dropout=0.0),
    "lora_switch_merge": lambda: moelora.LoraSwitchConfig(num_experts=3, top_k=2, r=4, lora_dropout=0.0, switch_mode="merge"),
}


def _ids(b=2, t=7, seed=3):
    return torch.randint(0, 61, (b, t), generator=torch.Generator().manual_seed(seed))


def _adapted(method):
    """(model with a random ``method`` adapter in eval mode, input ids, the base model's logits)."""
    model = make_tiny("llama")
    ids = _ids()
    with torch.no_grad():
        base_logits = model(ids).logits
    moelora.inject_adapter(model, CONFIGS[method]())
    randomize_adapter_(model)
    model.eval()
    return model, ids, base_logits


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_inside_the_block_the_base_modules_run_and_the_adapter_returns(method):
    model = make_tiny("llama")
    ids = _ids()
    with torch.no_grad():
        base_logits = model(ids).logits
        base_gen = model.generate(ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
    base_types = [type(m) for m in model.modules()]
    moelora.inject_adapter(model, CONFIGS[method]())
    randomize_adapter_(model)
    model.eval()
    with torch.no_grad():
        adapted = model(ids).logits
        adapted_gen = model.generate(ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)  # merges in merge mode
        assert not torch.allclose(adapted, base_logits, atol=1e-3)
        with moelora.disable_adapter(model) as m:
            assert m is model
            assert not any(isinstance(x, (moelora.AdaptedLinear, moelora.AdaptedFFN)) for x in model.model.layers.modules())
            torch.testing.assert_close(model(ids).logits, base_logits, atol=0, rtol=0)  # the very same modules and weights
            torch.testing.assert_close(model.generate(ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0), base_gen)
            assert moelora.routing_records(model) == {}
            with moelora.disable_adapter(model):  # nested: no-op
                torch.testing.assert_close(model(ids).logits, base_logits, atol=0, rtol=0)
        torch.testing.assert_close(model(ids).logits, adapted, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(model.generate(ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0), adapted_gen)
    assert [type(m) for m in model.modules()] != base_types
    moelora.remove_adapter(model)
    assert [type(m) for m in model.modules()] == base_types


def test_training_inside_the_block_has_no_aux_loss_and_an_exception_restores_the_adapter():
    model = make_tiny("llama")
    ids = _ids()
    with torch.no_grad():
        base_loss = model(ids, labels=ids).loss
    moelora.inject_adapter(model, CONFIGS["mixlora"]())
    randomize_adapter_(model)
    model.train()
    out = model(ids, labels=ids)
    assert out.aux_loss > 0  # the routed forward recorded routing
    with pytest.raises(RuntimeError, match="boom"):
        with moelora.disable_adapter(model):
            out = model(ids, labels=ids)
            assert "aux_loss" not in out  # no stale routing records from the adapted forward
            torch.testing.assert_close(out.loss, base_loss)
            model.eval()
            raise RuntimeError("boom")
    assert isinstance(model.model.layers[0].mlp, moelora.AdaptedFFN)
    assert not model.model.layers[0].mlp.training  # the adapted modules follow the mode set inside
    assert model(ids).logits.shape == (2, 7, 61)


def test_merged_lora_is_taken_out_and_folded_back():
    model, ids, base_logits = _adapted("lora")
    with torch.no_grad():
        adapted = model(ids).logits
        moelora.merge_lora(model)
        with moelora.disable_adapter(model):
            torch.testing.assert_close(model(ids).logits, base_logits, atol=1e-5, rtol=1e-5)
        assert all(m.merged for m in model.modules() if isinstance(m, moelora.AdaptedLinear) and "default" in m.adapters)
        torch.testing.assert_close(model(ids).logits, adapted, atol=1e-5, rtol=1e-5)


def test_no_adapter_is_a_no_op():
    model = make_tiny("llama")
    with moelora.disable_adapter(model) as m:
        assert m is model


def test_a_compiled_forward_follows_the_swap():
    """torch.compile guards on the module tree: inside the block the compiled model is the base,
    after it the adapter again (dynamo with the eager backend: the guards, not Inductor)."""
    model, ids, base = _adapted("mixlora")
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        adapted = model(ids).logits
        for _ in range(2):
            torch.testing.assert_close(compiled(ids).logits, adapted, atol=1e-5, rtol=1e-5)
            with moelora.disable_adapter(model):
                torch.testing.assert_close(compiled(ids).logits, base, atol=1e-5, rtol=1e-5)
