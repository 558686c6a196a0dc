"""The dependency internals moelora relies on (moelora/_private.py) are still there.

When one of these fails after a torch/transformers upgrade, the message names what moved; fix
moelora/_private.py (the only module that touches them) and widen ``TESTED``."""
import torch
import transformers

from moelora import _private


def test_tensor_version_counter_tracks_in_place_writes():
    t = torch.zeros(3)
    assert hasattr(t, "_version"), "torch.Tensor._version is gone: update moelora/_private.tensor_stamp"
    st = _private.tensor_stamp(t)
    assert _private.stamp_change(t, st) is None
    t.add_(1)
    assert _private.stamp_change(t, st) == "overwritten"
    t.data = torch.zeros(3, dtype=torch.float64)
    assert _private.stamp_change(t, st) == "moved"


def test_module_dict_lookup():
    md = torch.nn.ModuleDict({"a": torch.nn.Identity()})
    assert hasattr(md, "_modules"), "nn.Module._modules is gone: update moelora/_private.module_dict_get"
    assert _private.module_dict_get(md, "a") is md["a"] and _private.module_dict_get(md, None) is None


def test_frozen_linear_and_submodule_read_the_module_dicts():
    lin = torch.nn.Linear(5, 3)
    assert hasattr(lin, "_parameters") and hasattr(lin, "_modules"), \
        "nn.Module._parameters/_modules are gone: update moelora/_private.frozen_linear and submodule"
    x = torch.randn(2, 5)
    assert torch.equal(_private.frozen_linear(lin, x), torch.nn.functional.linear(x, lin.weight, lin.bias))
    nobias = torch.nn.Linear(5, 3, bias=False)
    assert torch.equal(_private.frozen_linear(nobias, x), x @ nobias.weight.t())
    seq = torch.nn.Sequential(lin)
    assert _private.submodule(seq, "0") is lin


def test_dynamic_cache_length():
    from transformers import DynamicCache

    c = DynamicCache()
    k = torch.randn(1, 2, 4, 8)
    c.update(k, k.clone(), 0)
    assert _private.cached_tokens({"past_key_values": c}) == 4, \
        f"DynamicCache.get_seq_length changed in transformers {transformers.__version__}"


def test_versions_are_in_the_tested_range():
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    for name, mod in (("torch", torch), ("transformers", transformers)):
        v = Version(mod.__version__.split("+")[0])
        assert v in SpecifierSet(_private.TESTED[name]), \
            f"{name} {v} is outside the range moelora/_private.py was tested with ({_private.TESTED[name]})"


def test_triton_compile_hooks_are_counted_chained_and_restored():
    from triton import knobs

    rt = knobs.runtime
    assert hasattr(rt, "jit_cache_hook") and hasattr(rt, "jit_post_compile_hook"), \
        "triton.knobs.runtime.jit_cache_hook / jit_post_compile_hook are gone: update moelora/_private.triton_compiles"
    seen = []
    rt.jit_post_compile_hook = lambda **kw: seen.append(kw["key"])
    try:
        with _private.triton_compiles() as log:
            # what triton's JITFunction._do_compile calls around one compile (keyword arguments)
            key = ("sig", 1)
            info = {"key": key, "signature": {"x": "*fp32", "N": "constexpr"}, "constants": {(1,): 8}}
            assert rt.jit_cache_hook(key=key, repr="k[num_warps=4](x: *fp32)", fn=None, compile=info) is None  # never skips
            rt.jit_post_compile_hook(key=key, repr="k[num_warps=4](x: *fp32)", fn=None, compile=info)
        assert log.count == 1 and log.kernels[0][:1] == ("k",) and log.seconds >= 0
        assert log.kernels[0][2] == "signature={'x': '*fp32', 'N': 'constexpr'} constants={(1,): 8}"  # the variant
        assert seen == [key]  # the hook installed before still ran
        assert rt.jit_cache_hook is None and seen and rt.jit_post_compile_hook is not None
        rt.jit_post_compile_hook(key="after")
        assert log.count == 1 and seen[-1] == "after"  # restored: the block's counter is off
    finally:
        rt.jit_post_compile_hook = None


def test_triton_compiles_counts_a_real_compile_on_the_gpu():
    import pytest

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA (the interpreter compiles nothing)")
    import triton
    import triton.language as tl

    @triton.jit
    def _fill(x_ptr, VALUE: tl.constexpr):
        tl.store(x_ptr, VALUE)

    x = torch.zeros(1, device="cuda")
    with _private.triton_compiles() as log:
        _fill[(1,)](x, VALUE=7.0)
        _fill[(1,)](x, VALUE=7.0)  # cached: no second compile
    torch.cuda.synchronize()
    assert x.item() == 7.0 and log.count == 1 and log.kernels[0][0] == "_fill", log.as_dict()
    assert "7.0" in log.kernels[0][2], log.as_dict()  # the constexpr's value is in the variant
