"""torch.compile of adapted models: one graph, decode kernels inside it as custom ops.

Runs on CPU with the Triton interpreter (``moelora.kernel_backend("triton")``) and the ``aot_eager`` backend,
which traces exactly what Inductor would see (the GPU run compiles with Inductor + CUDA graphs).
A graph break here would split every compiled decode step into pieces, each with its own guard
checks and CUDA-graph replay.
"""
from __future__ import annotations

import pytest
import torch
from conftest import make_tiny, randomize_adapter_

import moelora

CONFIGS = {
    "mixlora": lambda: moelora.MixLoraConfig(num_experts=4, top_k=2, r=4, lora_dropout=0.0, expert_backend="fused"),
    "lora_switch": lambda: moelora.LoraSwitchConfig(num_experts=4, top_k=2, r=4, lora_dropout=0.0,
                                                    switch_mode="unmerged"),
    "lora": lambda: moelora.LoraConfig(r=4, lora_dropout=0.0),
}
# Decode ops per layer in the compiled graph: one per adapted linear (LoRA and LoRA-Switch adapt
# all seven by default); MixLoRA: q, k, v, o + one for the whole FFN.
OPS_PER_LAYER = {"mixlora": 5, "lora_switch": 7, "lora": 7}


@pytest.mark.parametrize("method", sorted(CONFIGS))
@pytest.mark.parametrize("batch", [1, 2])
def test_compiled_model_is_one_graph_with_decode_kernels(method, batch, monkeypatch):
    from torch._dynamo.backends.debugging import aot_eager

    model = moelora.inject_adapter(make_tiny("llama"), CONFIGS[method]())
    randomize_adapter_(model)
    model.eval()
    ids = torch.randint(0, 61, (batch, 3), generator=torch.Generator().manual_seed(batch))
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return aot_eager(gm, example_inputs)

    with torch.no_grad():
        ref = model(ids).logits  # torch paths
        torch.compiler.reset()
        with moelora.kernel_backend("triton"):
            out = torch.compile(model, backend=recording_backend)(ids).logits
    torch.compiler.reset()
    assert len(graphs) == 1, f"{len(graphs)} graphs: the compiled forward has graph breaks"
    n_ops = graphs[0].count("moelora.linear_lora_delta") + graphs[0].count("moelora.mixlora_ffn_delta")
    assert n_ops == OPS_PER_LAYER[method] * len(model.model.layers)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # No step tensors outlive a compiled inference step (cudagraph trees would re-record).
    state = model.moelora_state
    assert not any(state.records.values())
    if method == "lora_switch":
        assert state.switch["default"].experts is None
