"""A mixed-adapter batch under ``generate(cache_implementation/static cache)`` compiles to one graph
that builds no tensor from Python data.

Why it matters: on the GPU, transformers compiles the decode step with mode="reduce-overhead"
(CUDA graphs); a ``torch.tensor(list)`` inside the graph is a CPU constant copied to the device,
and Inductor then skips CUDA graphs for the whole step (measured on the H200: mixed batch of 8
adapters 2.4x its single-adapter batch instead of ~1.1x). A graph break does the same. CPU
inductor is too slow for a unit test, so the graphs are inspected with a recording backend.
"""
from __future__ import annotations

import pytest
import torch
from transformers import CompileConfig, StaticCache

import moelora
from moelora.bench.models import build_shape_model

TARGETS = ("q_proj", "v_proj", "down_proj")


def _compiled_generate_graphs(model, ids, names):
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    cc = CompileConfig(backend=record, mode=None, fullgraph=False)
    cc._compile_all_devices = True  # transformers compiles on accelerators only unless asked
    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + 8)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                             max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0,
                             adapter_names=names, compile_config=cc)
    return graphs, out


def _two_adapter_model(device: str = "cpu"):
    """A tiny Llama with LoRA adapters "a" (r4) and "b" (r8) on TARGETS, B non-zero, eval mode."""
    model, _ = build_shape_model("tiny_shape", "float32", device, 0)
    moelora.inject_adapter(model, moelora.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS), adapter_name="a")
    moelora.add_adapter(model, "b", moelora.LoraConfig(r=8, lora_alpha=8, target_modules=TARGETS))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.eval()
    return model


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_mixed_batch_decode_compiles_to_one_graph_without_python_constants():
    torch._dynamo.reset()
    model = _two_adapter_model()
    ids = torch.randint(3, model.config.vocab_size, (3, 5), generator=torch.Generator().manual_seed(0))
    names = ["a", "b", None]
    graphs, out = _compiled_generate_graphs(model, ids, names)
    assert len(graphs) == 1, f"the decode step broke into {len(graphs)} graphs"
    built = [n for n in graphs[0].graph.nodes
             if n.op == "call_function" and n.target in (torch.tensor, torch.as_tensor)]
    assert not built, f"tensors built from Python data inside the compiled step: {[n.format_node() for n in built]}"
    torch._dynamo.reset()
    # The compiled path gives the eager tokens.
    with torch.no_grad():
        eager = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                               min_new_tokens=4, do_sample=False, pad_token_id=0, adapter_names=names)
    assert torch.equal(out, eager)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_compiled_mixed_batch_runs_the_slots_delta_as_the_decode_op():
    """With the Triton kernels (CUDA; here the interpreter) the compiled mixed decode step computes
    each adapted linear's delta with the ``moelora::linear_lora_delta`` custom op, each token's
    adapter slot as its expert (as the single-adapter step does), not a traced torch gather per
    linear; its tokens equal the eager torch path's."""
    from moelora_kernels import backend

    if not (torch.cuda.is_available() or backend.interpreted()):
        pytest.skip("needs CUDA or the Triton interpreter")
    torch._dynamo.reset()
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # CPU tensors take the torch path on a CUDA machine
    model = _two_adapter_model(dev)
    ids = torch.randint(3, model.config.vocab_size, (3, 5), generator=torch.Generator().manual_seed(1)).to(dev)
    names = ["a", "b", None]
    with moelora.kernel_backend("triton"):
        graphs, out = _compiled_generate_graphs(model, ids, names)
    assert len(graphs) == 1, f"the decode step broke into {len(graphs)} graphs"
    ops = [n for n in graphs[0].graph.nodes if n.op == "call_function" and "linear_lora_delta" in str(n.target)]
    sites = sum(1 for m in model.modules() if type(m).__name__ == "AdaptedLinear")
    assert len(ops) == sites, f"{len(ops)} delta ops for {sites} adapted linears"
    torch._dynamo.reset()
    with torch.no_grad(), moelora.kernel_backend("torch"):
        eager = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                               min_new_tokens=4, do_sample=False, pad_token_id=0, adapter_names=names)
    assert torch.equal(out, eager)


def _eager_tokens(model, ids, names):
    with torch.no_grad(), moelora.kernel_backend("torch"):
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                              min_new_tokens=4, do_sample=False, pad_token_id=0, adapter_names=names)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_compiled_mixed_decode_reads_the_prefills_adapter_stacks():
    """Inside ``generate`` the compiled mixed decode step reads the batch's stacked adapters that
    the eager prefill built (a graph input), instead of padding and stacking every adapter in the
    graph at every step; an adapter written in place between two calls is seen by the next call
    (the prefill checks and rebuilds the stacks), with the same graph."""
    torch._dynamo.reset()
    model = _two_adapter_model()
    ids = torch.randint(3, model.config.vocab_size, (3, 5), generator=torch.Generator().manual_seed(2))
    names = ["a", "b", None]
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    cc = CompileConfig(backend=record, mode=None, fullgraph=False)
    cc._compile_all_devices = True

    def compiled_tokens():
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                  min_new_tokens=4, do_sample=False, pad_token_id=0, adapter_names=names,
                                  cache_implementation="static", compile_config=cc)

    out = compiled_tokens()
    assert len(graphs) == 1, f"the decode step broke into {len(graphs)} graphs"
    built = [n.format_node() for n in graphs[0].graph.nodes
             if n.op == "call_function" and getattr(n.target, "__name__", "") in ("pad", "stack")]
    assert not built, f"adapter stacks built inside the compiled decode step: {built[:4]}"
    assert torch.equal(out, _eager_tokens(model, ids, names))
    with torch.no_grad():  # change adapter b in place: the next call must decode with the new weights
        for name, p in model.named_parameters():
            if "adapters.b." in name and "lora_B" in name:
                p.mul_(-3.0)
    expected = _eager_tokens(model, ids, names)
    assert not torch.equal(expected, out), "the change should alter the tokens (else the test shows nothing)"
    assert torch.equal(compiled_tokens(), expected)
    assert len(graphs) == 1, "the second call recompiled the decode step"
