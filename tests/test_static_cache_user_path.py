"""``model.generate(ids, cache_implementation="static")`` as users call it: a cache per call
requested from transformers, which compiles the decode step (on CUDA with CUDA graphs).

Why it matters (issue 19): CUDA-graph trees key a recorded graph on the addresses of its static
inputs: the parameters and the KV-cache tensors (``mark_static_address``). transformers 5.x
allocates a new ``StaticCache`` on every ``generate`` call, so whether the next call replays the
recorded graph or re-records it depended on the caching allocator handing the same blocks back
(measured on the H200: a re-record on some calls for the base and every adapted method). An
adapted model's ``generate`` reuses one reset cache (``moelora/_private.ReusedStaticCache``), so
the second call's compiled decode step sees the same static inputs at the same addresses: no
graph break, no recompile, nothing that would make cudagraph trees record again.

CPU: Inductor is too slow for a unit test, so the compiled step goes to a recording backend that
notes each call's static-input addresses, exactly what cudagraph trees compare.
"""
from __future__ import annotations

import pytest
import torch
from conftest import make_tiny, randomize_adapter_
from torch._dynamo.utils import counters
from transformers import CompileConfig

import moelora

CONFIGS = {
    "lora": lambda: moelora.LoraConfig(r=4, lora_dropout=0.0),
    "mixlora": lambda: moelora.MixLoraConfig(num_experts=4, top_k=2, r=4, lora_dropout=0.0, expert_backend="fused"),
    "lora_switch": lambda: moelora.LoraSwitchConfig(num_experts=4, top_k=2, r=4, lora_dropout=0.0),
    "lora_switch_merge": lambda: moelora.LoraSwitchConfig(num_experts=4, top_k=2, r=4, lora_dropout=0.0,
                                                          switch_mode="merge"),
}


class StaticInputRecorder:
    """A torch.compile backend that runs the graph as traced and records, per call, the data
    pointers of the inputs CUDA-graph trees treat as static (parameters, mark_static_address)."""

    def __init__(self) -> None:
        self.graphs = 0
        self.calls: list[dict[str, int]] = []

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        static = []
        for i, (node, ex) in enumerate(zip(gm.graph.find_nodes(op="placeholder"), example_inputs)):
            marked = node.meta.get("tensor_dict", {}).get("_dynamo_static_input_type")
            if isinstance(ex, torch.Tensor) and (marked or isinstance(ex, torch.nn.Parameter)):
                src = getattr(node, "_dynamo_source", None)
                static.append((i, src.name if src is not None else node.name))

        def run(*args):
            self.calls.append({name: args[i].data_ptr() for i, name in static})
            return gm.forward(*args)

        return run


def _compile_config(rec: StaticInputRecorder) -> CompileConfig:
    def backend(gm, example_inputs):  # a function: CompileConfig deep-copies its backend (not a function)
        return rec(gm, example_inputs)

    cc = CompileConfig(backend=backend, mode=None, fullgraph=False)
    cc._compile_all_devices = True  # transformers compiles on accelerators only unless asked
    return cc


def _user_generate(model, ids, cc: CompileConfig, new_tokens: int = 3):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), cache_implementation="static",
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                              compile_config=cc)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_second_generate_with_a_new_static_cache_replays_the_first_calls_graph(method):
    torch._dynamo.reset()
    counters.clear()
    model = moelora.inject_adapter(make_tiny("llama"), CONFIGS[method]())
    randomize_adapter_(model)
    model.eval()
    ids = torch.randint(3, 61, (1, 5), generator=torch.Generator().manual_seed(0))
    rec = StaticInputRecorder()
    cc = _compile_config(rec)
    with moelora.kernel_backend("triton"):  # the GPU's decode path: the kernels as custom ops in the graph
        first = _user_generate(model, ids, cc)
        steps_first = len(rec.calls)
        frames_first = counters["stats"]["unique_graphs"]
        second = _user_generate(model, ids, cc)
        third = _user_generate(model, ids, cc)
    torch._dynamo.reset()
    assert not counters["graph_break"], f"graph breaks in the decode step: {dict(counters['graph_break'])}"
    assert rec.graphs == 1 and counters["stats"]["unique_graphs"] == frames_first == 1, \
        f"{rec.graphs} graphs: the later calls recompiled ({dict(counters['recompiles'])})"
    assert steps_first >= 2 and len(rec.calls) == 3 * steps_first
    moved = sorted({name for call in rec.calls[steps_first:] for name, ptr in call.items()
                    if ptr != rec.calls[0][name]})
    assert not moved, f"static inputs at new addresses in a later generate call (CUDA graphs would re-record): {moved}"
    assert torch.equal(first, second) and torch.equal(first, third)
    # the reused cache gives the tokens of a fresh one (eager, dynamic cache: the reference path)
    with torch.no_grad():
        eager = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, min_new_tokens=3,
                               do_sample=False, pad_token_id=0)
    assert torch.equal(first, eager)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_a_returned_cache_is_never_reused():
    """``return_dict_in_generate=True`` hands the cache to the caller: a later call must not reset it."""
    model = moelora.inject_adapter(make_tiny("llama"), moelora.LoraConfig(r=4))
    model.eval()
    ids = torch.randint(3, 61, (1, 5), generator=torch.Generator().manual_seed(1))
    kw = dict(attention_mask=torch.ones_like(ids), cache_implementation="static", max_new_tokens=2, do_sample=False,
              pad_token_id=0, return_dict_in_generate=True)
    with torch.no_grad():
        out = model.generate(ids, **kw)
        cache = out.past_key_values
        keys = cache.layers[0].keys.clone()
        model.generate(ids, attention_mask=torch.ones_like(ids), cache_implementation="static", max_new_tokens=2,
                       do_sample=False, pad_token_id=0)
        again = model.generate(ids, **kw).past_key_values
    assert again is not cache and torch.equal(cache.layers[0].keys, keys)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_the_held_cache_follows_deepcopy_and_dtype_moves():
    """The reused cache lives in the adapter state: a deep copy gets its own (generating with one
    never writes into the other's), and after ``.to(dtype)`` the next call gets a cache of the
    new dtype instead of the held one; the tokens equal a fresh eager generate each time."""
    import copy

    model = moelora.inject_adapter(make_tiny("llama"), moelora.LoraConfig(r=4, lora_dropout=0.0))
    randomize_adapter_(model)
    model.eval()
    ids = torch.randint(3, 61, (2, 5), generator=torch.Generator().manual_seed(2))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False, pad_token_id=0)

    def static(m):
        with torch.no_grad():
            return m.generate(ids, cache_implementation="static", **kw)

    def eager(m):
        with torch.no_grad():
            return m.generate(ids, **kw)

    first = static(model)
    held = model.moelora_state.generation_cache[2]
    twin = copy.deepcopy(model)
    twin_cache = twin.moelora_state.generation_cache[2]
    assert twin_cache is not held and twin_cache.layers[0].keys.data_ptr() != held.layers[0].keys.data_ptr()
    keys = held.layers[0].keys.clone()
    assert torch.equal(static(twin), first)
    assert torch.equal(held.layers[0].keys, keys)  # the copy generated into its own cache
    model.to(torch.float64)
    out = static(model)
    cache = model.moelora_state.generation_cache[2]
    assert cache is not held and cache.layers[0].keys.dtype == torch.float64
    assert torch.equal(out, eager(model))


# ---- the benchmark measures this path: mode static_new ------------------------------------------
def test_bench_static_new_mode_calls_generate_as_users_do(tmp_path):
    from moelora.bench import latency
    from moelora.bench.latency import run_benchmark
    from moelora.bench.settings import BenchSettings

    seen = []

    class Fake:
        def generate(self, **kwargs):
            seen.append(kwargs)

    ids = torch.ones(1, 3, dtype=torch.long)
    latency._generate(Fake(), ids, torch.ones_like(ids), 2, "static_new", None)
    assert seen[0]["cache_implementation"] == "static" and "past_key_values" not in seen[0]
    s = BenchSettings(model="tiny_shape", methods=("base", "lora", "mixlora"), batch_sizes=(1,), prompt_lens=(6,),
                      new_tokens=3, modes=("static_new",), repeats=1, warmup=1, r=4, num_experts=4, plots=False,
                      out_dir=str(tmp_path))
    rows = run_benchmark(s)["rows"]
    assert [r["method"] for r in rows] == ["base", "lora", "mixlora"]
    for r in rows:
        assert "error" not in r, r["error"]
        assert r["mode"] == "static_new" and r["decode_ms_per_token"] > 0
        assert r["cudagraph_records"] == 0 and r["cudagraph_records_per_call"] == 0  # CPU: no CUDA graphs


def test_cudagraph_record_counter_counts_recordings_and_restores_the_logger():
    import logging

    from moelora import _private

    import torch._inductor.cudagraph_trees as trees

    logger = logging.getLogger(_private.CUDAGRAPH_LOGGER)
    artifact = trees.log  # where torch logs the recording line (an artifact logger below it)
    seen = []

    class Console(logging.Handler):  # stands for a handler torch or the user put on the artifact logger
        def emit(self, record):
            seen.append(record.getMessage())

    console = Console()
    artifact.addHandler(console)
    try:
        level, propagate = logger.level, logger.propagate
        a_level, a_propagate = artifact.level, artifact.propagate
        with _private.cudagraph_records() as rec:
            artifact.debug("[%s] Recording function=%s, mode=%s, cuda_graph_id=%d, inputs: %s", "0/0", "f", "INFERENCE", 0, "")
            logger.debug("[%s] Recording function=%s, mode=%s, cuda_graph_id=%d, inputs: %s", "0/1", "g", "INFERENCE", 1, "")
            artifact.debug("[%s] Running warmup function=%s", "0/0", "f")
        assert rec.count == 2  # one per line, not counted twice through propagation
        assert seen == []  # the debug lines did not reach the console inside the block
        assert logger.level == level and logger.propagate == propagate and rec not in logger.handlers
        assert artifact.level == a_level and artifact.propagate == a_propagate and console in artifact.handlers
    finally:
        artifact.removeHandler(console)


def test_the_internals_these_rely_on_are_still_there():
    """moelora/_private.py: transformers' _prepare_static_cache keywords and torch's cudagraph-trees
    recording line (if one moved, fix _private.py, the only module that touches them)."""
    import inspect

    import torch._inductor.cudagraph_trees as trees
    from transformers import GenerationMixin

    params = inspect.signature(GenerationMixin._prepare_static_cache).parameters
    assert list(params)[1:4] == ["cache_implementation", "batch_size", "max_cache_len"], list(params)
    assert "_previous_max_cache_length" in inspect.getsource(GenerationMixin._prepare_static_cache)
    assert trees.log.name == "torch._inductor.cudagraph_trees" or trees.__name__ == "torch._inductor.cudagraph_trees"
    assert "Recording function=" in inspect.getsource(trees.CUDAGraphTreeManager.record_function)
