"""Whole-model tensor parallelism (moelora.parallel.parallelize) on DTensor with gloo, 2 and 4 CPU
processes (issue 18): a tiny Llama with a block-diagonal LoRA, an S-LoRA-style sharded and a
replicated plain LoRA, and the bare base. Logits, every adapter gradient, one SGD step and greedy
decoding equal the single-process model; collectives per forward are counted with CommDebugMode
(block-diagonal: the base's; S-LoRA-style: one more per column-parallel linear)."""
import os

import pytest
import torch
import torch.distributed as dist
from gloo_ranks import spawn_ranks

import moelora
from moelora.models import build_tiny_model
from moelora.parallel.model import check_parallelizable, tp_roles

R, LR, NEW_TOKENS = 4, 0.01, 4
# 2 x 40 = 80 tokens: above layers.dispatch.DECODE_MAX_TOKENS, so the one-device reference runs the
# dense block-diagonal form and the sharded model its blockwise form (BdLoraAdapter.execute_delta)
SEQ = 40


def _model(form: str, n: int, adapter_seed: int = 1):
    """The same weights on every call (every rank builds it; the reference too)."""
    from conftest import randomize_adapter_

    model = build_tiny_model("llama", num_heads=4, num_kv_heads=n, seed=0)
    if form == "bdlora":
        moelora.inject_adapter(model, moelora.BdLoraConfig(r=R, lora_alpha=2 * R, nblocks=n, lora_dropout=0.0))
    elif form == "bdlora_some":  # some linears adapted, the others plain (torch's Colwise/RowwiseParallel)
        moelora.inject_adapter(model, moelora.BdLoraConfig(r=R, lora_alpha=2 * R, nblocks=n, lora_dropout=0.0,
                                                           target_modules=("q_proj", "v_proj", "down_proj")))
    elif form in ("slora", "replicated"):
        moelora.inject_adapter(model, moelora.LoraConfig(r=R, lora_alpha=2 * R, lora_dropout=0.0))
    if form != "base":
        randomize_adapter_(model, seed=adapter_seed, scale=0.1)  # B starts at zero: make every delta non-zero
    return model


def _close(a, b, atol=1e-5):
    return torch.allclose(a, b, atol=atol, rtol=1e-5), (a - b).abs().max().item()


def _worker(rank, n, port, queue):
    import sys

    sys.path.insert(0, os.path.dirname(__file__))  # conftest's randomize_adapter_ in the spawned process
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=n)
    try:
        from torch.distributed.tensor import DTensor, init_device_mesh
        from torch.distributed.tensor.debug import CommDebugMode

        from moelora.parallel import full_adapter_state_dict, parallelize

        mesh = init_device_mesh("cpu", (n,))
        g = torch.Generator().manual_seed(3)
        ids = torch.randint(3, 90, (2, SEQ), generator=g)
        out = {}
        for form in ("base", "bdlora", "bdlora_some", "slora", "replicated"):
            res = out[form] = {}
            ref, tp = _model(form, n), _model(form, n)
            parallelize(tp, mesh, {"base": None, "bdlora_some": "bdlora"}.get(form, form))
            with torch.no_grad(), CommDebugMode() as comm:
                logits = tp(ids).logits
            res["collectives"] = comm.get_total_counts()
            res["logits"] = _close(logits, ref(ids).logits)
            res["generate"] = torch.equal(
                tp.generate(ids[:1], max_new_tokens=NEW_TOKENS, do_sample=False),
                ref.generate(ids[:1], max_new_tokens=NEW_TOKENS, do_sample=False))
            if form == "base":
                continue
            tp.train(), ref.train()
            tp(ids, labels=ids).loss.backward()
            ref(ids, labels=ids).loss.backward()
            tp_p = {k: p for k, p in tp.named_parameters() if p.requires_grad}
            ref_p = {k: p for k, p in ref.named_parameters() if p.requires_grad}
            res["same_params"] = sorted(tp_p) == sorted(ref_p) and all(isinstance(p, DTensor) for p in tp_p.values())
            res["grads"] = max((_close(tp_p[k].grad.full_tensor(), ref_p[k].grad) for k in ref_p),
                               key=lambda c: (not c[0], c[1]))
            for model, params in ((tp, tp_p), (ref, ref_p)):
                torch.optim.SGD(params.values(), lr=LR).step()
            res["step"] = max((_close(tp_p[k].full_tensor(), ref_p[k].detach()) for k in ref_p),
                              key=lambda c: (not c[0], c[1]))
            tp.eval(), ref.eval()
            with torch.no_grad():
                res["logits_after_step"] = _close(tp(ids).logits, ref(ids).logits)
                # the gathered adapter in an unsharded model: the reference's trained adapter
                dense = _model(form, n, adapter_seed=5)  # other adapter values until loaded
                moelora.load_adapter_state_dict(dense, full_adapter_state_dict(tp))
                res["gathered"] = _close(dense(ids).logits, ref(ids).logits)
            if form == "bdlora":  # only blocks are parameters: the dense factors' off-block entries are zero
                site = ref.model.layers[0].self_attn.q_proj.adapters["default"]
                b_dense = site.dense_factors()[1]
                mask = torch.block_diag(*[torch.ones(b_dense.shape[0] // n, R // n)] * n).bool()
                res["off_block_zero"] = bool((b_dense[~mask] == 0).all()) and bool((b_dense[mask] != 0).any())
                local = tp.model.layers[0].self_attn.q_proj.adapters["default"].lora_B.to_local()
                res["local_block"] = tuple(local.shape) == (b_dense.shape[0] // n, R // n)
        queue.put((rank, out))
    except BaseException as e:  # report instead of hanging the parent on queue.get
        queue.put((rank, repr(e)))
        raise
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("n", [2, 4])
def test_parallelized_model_equals_single_process(n):
    got, exitcodes = spawn_ranks(_worker, n, timeout=300)
    for rank, out in got.items():
        assert isinstance(out, dict), f"rank {rank} failed: {out}"
    assert exitcodes == [0] * n
    roles = tp_roles(_model("base", n))
    rows = sum(r == "row" for r in roles.values())
    cols = sum(r == "column" for r in roles.values())
    for rank, out in got.items():
        for form, res in out.items():
            for key in ("logits", "grads", "step", "logits_after_step", "gathered"):
                if key in res:
                    ok, diff = res[key]
                    assert ok, f"rank {rank}, {form}: {key} differ from the single-process model by {diff:.2e}"
            assert res["generate"], f"rank {rank}, {form}: greedy tokens differ from the single-process model"
            if form != "base":
                assert res["same_params"], f"{form}: the trainable parameters are not the reference's, as DTensors"
        # the base's row-parallel all-reduces, nothing else; S-LoRA: + one all-gather of x·A per column linear
        assert out["base"]["collectives"] == rows
        assert out["bdlora"]["collectives"] == rows
        assert out["bdlora_some"]["collectives"] == rows
        assert out["slora"]["collectives"] == rows + cols
        assert out["replicated"]["collectives"] == rows  # n× the adapter FLOPs instead
        assert out["bdlora"]["off_block_zero"] and out["bdlora"]["local_block"]


# ---- validation before anything changes (single process) -------------------------------------
def test_bad_inputs_are_refused_by_name():
    four_heads = build_tiny_model("llama", num_heads=4, num_kv_heads=4)
    moelora.inject_adapter(four_heads, moelora.BdLoraConfig(r=R, nblocks=2))
    with pytest.raises(ValueError, match="nblocks=2 but the tensor-parallel size is 4"):
        check_parallelizable(four_heads, 4)
    with pytest.raises(ValueError, match="num_key_value_heads=2 is not divisible"):
        check_parallelizable(_model("base", 2), 4)
    with pytest.raises(ValueError, match="form 'bdlora' shards 'bdlora' adapters"):
        check_parallelizable(_model("slora", 2), 2, "bdlora")
    with pytest.raises(ValueError, match="form must be one of"):
        check_parallelizable(_model("slora", 2), 2, "sharded")
    mix = build_tiny_model("llama", num_heads=4, num_kv_heads=2)
    moelora.inject_adapter(mix, moelora.MixLoraConfig(num_experts=2, top_k=1, r=R, nblocks=2))
    with pytest.raises(NotImplementedError, match="'mixlora' adapters is not implemented"):
        check_parallelizable(mix, 2)
    row_q = build_tiny_model("llama", num_heads=4, num_kv_heads=2)
    moelora.inject_adapter(row_q, moelora.BdLoraConfig(
        r=R, nblocks=2, column_modules=("k_proj", "v_proj", "gate_proj", "up_proj"),
        row_modules=("q_proj", "o_proj", "down_proj")))
    with pytest.raises(ValueError, match="q_proj is column-parallel in the model's tp_plan"):
        check_parallelizable(row_q, 2)
    assert check_parallelizable(_model("bdlora", 2), 2) == "bdlora"
    assert check_parallelizable(_model("slora", 2), 2) == "slora"
    assert check_parallelizable(_model("base", 2), 2) is None
