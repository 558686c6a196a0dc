"""Issue 15: nothing lost, nothing half-done. Wrong config types, transactional inject/add/load/
delete, moves after injection, non-float adapter tensors, pickled reference adapters, and a
property test of random corruptions of saved adapter folders."""
from __future__ import annotations

import json

import pytest
import torch

import moelora
from moelora.config import AdapterConfigError, config_from_dict
from moelora.io import AdapterFileError
from conftest import make_tiny, randomize_adapter_

CONFIG_CLASSES = (moelora.LoraConfig, moelora.MixLoraConfig, moelora.LoraSwitchConfig)


# ---- 5. config values of the wrong type -------------------------------------------------------
WRONG_TYPES = [
    # (key, value, classes it applies to, expected-type words)
    ("num_experts", True, (moelora.MixLoraConfig, moelora.LoraSwitchConfig), "an integer"),
    ("num_experts", "8", (moelora.MixLoraConfig, moelora.LoraSwitchConfig), "an integer"),
    ("top_k", 2.0, (moelora.MixLoraConfig, moelora.LoraSwitchConfig), "an integer"),
    ("r", 8.0, CONFIG_CLASSES, "an integer"),
    ("r", True, CONFIG_CLASSES, "an integer"),
    ("lora_alpha", "16", CONFIG_CLASSES, "a number"),
    ("lora_alpha", True, CONFIG_CLASSES, "a number"),
    ("lora_dropout", "0.1", CONFIG_CLASSES, "a number"),
    ("use_rslora", 1, CONFIG_CLASSES, "true or false"),
    ("use_rslora", "yes", CONFIG_CLASSES, "true or false"),
    ("init_lora_weights", 3, CONFIG_CLASSES, "a string"),
    ("adapter_dtype", None, CONFIG_CLASSES, "a string"),
    ("base_model_name_or_path", 5, CONFIG_CLASSES, "a string or null"),
    ("router_aux_loss_coef", "0.01", (moelora.MixLoraConfig, moelora.LoraSwitchConfig), "a number"),
    ("jitter_noise", [0.1], (moelora.MixLoraConfig, moelora.LoraSwitchConfig), "a number"),
    ("router_init_range", None, (moelora.MixLoraConfig, moelora.LoraSwitchConfig), "a number"),
    ("target_modules", "q_proj", (moelora.LoraConfig, moelora.LoraSwitchConfig), "a list of module names"),
    ("target_modules", 7, (moelora.LoraConfig, moelora.LoraSwitchConfig), "a list of module names"),
    ("target_modules", ["q_proj", 1], (moelora.LoraConfig, moelora.LoraSwitchConfig), "a list of module names"),
    ("target_modules", {"q_proj": True}, (moelora.LoraConfig, moelora.LoraSwitchConfig), "a list of module names"),
    ("attention_target_modules", "q_proj", (moelora.MixLoraConfig,), "a list of module names"),
    ("expert_target_modules", "gate_proj", (moelora.MixLoraConfig,), "a list of module names"),
    ("top_p", "0.8", (moelora.MixLoraConfig,), "a number"),
    ("capacity_factor", None, (moelora.MixLoraConfig,), "a number"),
    ("routing_strategy", ["topk"], (moelora.MixLoraConfig,), "a string"),
    ("aux_loss_pooling", 0, (moelora.MixLoraConfig,), "a string"),
    ("expert_backend", None, (moelora.MixLoraConfig,), "a string"),
    ("switch_mode", 1, (moelora.LoraSwitchConfig,), "a string"),
]


@pytest.mark.parametrize("key,value,classes,expected", WRONG_TYPES, ids=[f"{k}={v!r}" for k, v, *_ in WRONG_TYPES])
def test_wrong_config_type_fails_in_validate_with_one_line(key, value, classes, expected):
    for cls in classes:
        with pytest.raises(AdapterConfigError) as err:
            cls(**{key: value}).validate()
        msg = str(err.value)
        assert "\n" not in msg
        assert msg.startswith(f"{key}={value!r}") and expected in msg, msg
        # the same from a dict (a JSON file, a Hydra config), and on inject: nothing is touched
        d = cls().to_dict()
        d[key] = value
        with pytest.raises(AdapterConfigError, match=key):
            config_from_dict(json.loads(json.dumps(d)))
        model = make_tiny()
        with pytest.raises(AdapterConfigError, match=key):
            moelora.inject_adapter(model, cls(**{key: value}))
        assert moelora.adapter_state(model) is None and type(model).__name__ == "LlamaForCausalLM"


@pytest.mark.parametrize("key", ["lora_alpha", "lora_dropout", "router_aux_loss_coef", "router_init_range",
                                 "jitter_noise", "top_p", "capacity_factor"])
def test_non_finite_numbers_are_refused(key):
    for v in (float("inf"), float("nan"), -float("inf")):
        with pytest.raises(AdapterConfigError, match=rf"^{key}=.* (is not a finite number|must be)"):
            moelora.MixLoraConfig(**{key: v}).validate()


def test_target_modules_string_is_not_iterated_into_letters():
    with pytest.raises(AdapterConfigError, match=r"single string"):
        moelora.LoraConfig(target_modules="q_proj").validate()
    # a real list (also from Hydra/JSON) is fine and becomes a tuple
    assert moelora.LoraConfig(target_modules=["q_proj"]).validate().target_modules == ("q_proj",)


@pytest.mark.parametrize("bad", [["method", "lora"], None, "lora", 3, ({"method": "lora"},)])
def test_config_from_dict_of_a_non_mapping(bad):
    with pytest.raises(AdapterConfigError, match="must be a mapping"):
        config_from_dict(bad)


def test_config_from_dict_malformed_dicts():
    with pytest.raises(AdapterConfigError, match="unknown adapter method"):
        config_from_dict({"method": None})
    with pytest.raises(AdapterConfigError, match="unknown adapter method"):
        config_from_dict({"method": ["lora"]})
    with pytest.raises(AdapterConfigError, match="unknown key"):
        config_from_dict({"method": "lora", "rank": 4})
    with pytest.raises(AdapterConfigError, match="keys must be strings"):
        config_from_dict({"method": "lora", 1: 2})
    # adapter files must hold r (a missing one is not silently the default)
    d = moelora.MixLoraConfig().to_dict()
    for key in ("r", "lora_alpha", "num_experts", "top_k"):
        dd = {k: v for k, v in d.items() if k != key}
        with pytest.raises(AdapterConfigError, match=f"missing the key.*{key}"):
            config_from_dict(dd, require_keys=True)
        config_from_dict(dd)  # partial dicts (bench settings, Hydra groups) keep the defaults


# ---- helpers: the whole observable state of a model ------------------------------------------
def snapshot(model):
    """Everything a failed operation must leave unchanged."""
    hooks = {}
    for name, m in model.named_modules():
        for k, v in vars(m).items():
            if "hook" in k and isinstance(v, dict):
                hooks[(name, k)] = tuple((hk, id(hv)) for hk, hv in v.items())
    state = moelora.adapter_state(model)
    return {
        "class": model.__class__,
        "modules": [(n, id(m), type(m)) for n, m in model.named_modules()],
        "attrs": {n: sorted(vars(m)) for n, m in model.named_modules()},
        "hooks": hooks,
        "params": {n: (id(p), p.dtype, p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "adapters": moelora.list_adapters(model),
        "state": None if state is None else (id(state), state.active, sorted(state.adapters), len(state.originals),
                                             len(state.handles), state.switch_hook, sorted(state.switch),
                                             state.merged_lora),
        "training": [m.training for m in model.modules()],
    }


def assert_same(before, after):
    for key in before:
        if key == "params":
            assert before[key].keys() == after[key].keys()
            for n, (i, dt, rg, v) in before[key].items():
                i2, dt2, rg2, v2 = after[key][n]
                assert (i, dt, rg) == (i2, dt2, rg2), n
                assert torch.equal(v, v2), n
        elif key == "buffers":
            assert before[key].keys() == after[key].keys()
            assert all(torch.equal(before[key][n], after[key][n]) for n in before[key])
        else:
            assert before[key] == after[key], key


CFGS = {
    "lora": lambda: moelora.LoraConfig(r=2, target_modules=("q_proj", "v_proj", "down_proj")),
    "mixlora": lambda: moelora.MixLoraConfig(num_experts=2, top_k=1, r=2),
    "lora_switch": lambda: moelora.LoraSwitchConfig(num_experts=2, top_k=1, r=2),
}


class Custom(torch.nn.Module):
    """A projection that is not an nn.Linear (wraps one)."""

    def __init__(self, lin):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x)


# ---- 2. transactions --------------------------------------------------------------------------
@pytest.mark.parametrize("method", list(CFGS))
def test_inject_on_a_non_linear_projection_is_refused_and_changes_nothing(method):
    model = make_tiny()
    model.lm_head.weight.requires_grad_(False)  # a flag the user set
    orig = model.model.layers[1].self_attn.v_proj
    model.model.layers[1].self_attn.v_proj = Custom(orig)
    before = snapshot(model)
    with pytest.raises(TypeError, match=r"model\.layers\.1\.self_attn\.v_proj is a .*Custom, not a torch\.nn\.Linear"):
        moelora.inject_adapter(model, CFGS[method]())
    assert_same(before, snapshot(model))
    assert moelora.adapter_state(model) is None
    # the same on a model that has adapters already (add_adapter), and then a working second try
    model.model.layers[1].self_attn.v_proj = orig
    moelora.inject_adapter(model, CFGS["lora"](), adapter_name="first")
    model.model.layers[0].mlp.up_proj = Custom(model.model.layers[0].mlp.up_proj)
    before = snapshot(model)
    with pytest.raises(TypeError, match=r"model\.layers\.0\.mlp\.up_proj is a .*Custom"):
        moelora.add_adapter(model, "second", moelora.LoraConfig(r=2) if method == "lora" else CFGS[method]())
    assert_same(before, snapshot(model))
    model.model.layers[0].mlp.up_proj = model.model.layers[0].mlp.up_proj.lin
    moelora.add_adapter(model, "second", CFGS[method]())
    assert [a["name"] for a in moelora.list_adapters(model)] == ["first", "second"]


@pytest.mark.parametrize("method", list(CFGS))
def test_second_inject_after_a_failed_one_works(method):
    model = make_tiny()
    ids = torch.randint(0, 61, (2, 5))
    with torch.no_grad():
        ref = model(ids).logits
    model.model.layers[1].self_attn.v_proj = Custom(model.model.layers[1].self_attn.v_proj)
    with pytest.raises(TypeError):
        moelora.inject_adapter(model, CFGS[method]())
    model.model.layers[1].self_attn.v_proj = model.model.layers[1].self_attn.v_proj.lin
    moelora.inject_adapter(model, CFGS[method]())
    randomize_adapter_(model)
    moelora.remove_adapter(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)
    assert type(model).__name__ == "LlamaForCausalLM" and not hasattr(type(model), "moelora_base_class")


@pytest.mark.parametrize("method", list(CFGS))
@pytest.mark.parametrize("fail_at", [1, 3, 6])
def test_an_error_in_the_middle_of_inject_rolls_everything_back(method, fail_at, monkeypatch):
    """An error after some modules are wrapped (here: at the n-th target linear) leaves the model
    exactly as before, on a bare model and on one with adapters (add_adapter)."""
    import moelora.methods.lora.injector as lora_inj
    import moelora.methods.lora_switch.injector as switch_inj
    from moelora.methods.sites import linear_site

    for existing in (None, "lora_switch", "mixlora"):
        model = make_tiny()
        if existing is not None:
            moelora.inject_adapter(model, CFGS[existing](), adapter_name="old")
            randomize_adapter_(model)
            moelora.set_adapter(model, "old")
        model.model.embed_tokens.weight.requires_grad_(True)
        before = snapshot(model)
        calls = {"n": 0}

        exc = KeyboardInterrupt if fail_at == 3 else RuntimeError  # Ctrl-C in the middle, too

        def flaky(*a, **k):
            calls["n"] += 1
            if calls["n"] == fail_at:
                raise exc("injected failure")
            return linear_site(*a, **k)

        with monkeypatch.context() as mp:
            mp.setattr(lora_inj, "linear_site", flaky)
            mp.setattr(switch_inj, "linear_site", flaky)
            with pytest.raises(exc, match="injected failure"):
                if existing is None:
                    moelora.inject_adapter(model, CFGS[method]())
                else:
                    moelora.add_adapter(model, "new", CFGS[method]())
        assert_same(before, snapshot(model))
        ids = torch.randint(0, 61, (1, 4))
        with torch.no_grad():
            model(ids)
        if existing is None:
            moelora.inject_adapter(model, CFGS[method]())  # works after the failure
        else:
            moelora.add_adapter(model, "new", CFGS[method]())
            with torch.no_grad():
                model(torch.randint(0, 61, (2, 4)), adapter_names=["old", "new"])


def test_peft_wrapped_model_is_refused():
    peft = pytest.importorskip("peft")
    base = make_tiny()
    pm = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    for target in (pm, base):
        before = snapshot(base)
        with pytest.raises(ValueError, match="wrapped by PEFT"):
            moelora.inject_adapter(target, moelora.LoraConfig(r=2))
        assert_same(before, snapshot(base))
    with pytest.raises(ValueError, match="wrapped by PEFT"):
        moelora.inject_adapter(base, CFGS["mixlora"]())
    assert moelora.adapter_state(base) is None


def _adapted(names=("a", "b", "c")):
    model = make_tiny()
    moelora.inject_adapter(model, CFGS["lora"](), adapter_name=names[0])
    for n, m in zip(names[1:], ("mixlora", "lora_switch")):
        moelora.add_adapter(model, n, CFGS[m](), trainable=n != "c")
    randomize_adapter_(model)
    model.lm_head.weight.requires_grad_(True)
    return model


def test_failed_load_into_an_adapted_model_changes_nothing(tmp_path):
    model = _adapted()
    moelora.save_adapter(model, tmp_path / "ok", adapter_name="b")
    meta = json.loads((tmp_path / "ok" / "adapter_config.json").read_text())
    meta["adapter"]["r"] = 3
    (tmp_path / "ok" / "adapter_config.json").write_text(json.dumps(meta))
    before = snapshot(model)
    with pytest.raises(AdapterFileError, match="does not fit"):
        moelora.load_adapter(model, tmp_path / "ok", adapter_name="d")
    assert_same(before, snapshot(model))


@pytest.mark.parametrize("victim", ["a", "b", "c"])
def test_an_error_in_the_middle_of_delete_rolls_back(victim, monkeypatch):
    import moelora.inject as inject

    model = _adapted()
    if victim == "a":
        moelora.set_adapter(model, "a")
        moelora.merge_lora(model)  # a merged LoRA is unmerged by delete: rolled back, it is merged again
    before = snapshot(model)
    calls = {"n": 0}
    real = inject.clear_decode_graphs

    def flaky(m=None, **kw):
        calls["n"] += 1
        if calls["n"] == 3:  # at the second site: the first has lost the adapter already
            raise RuntimeError("injected failure")
        return real(m, **kw)

    with monkeypatch.context() as mp:
        mp.setattr(inject, "clear_decode_graphs", flaky)
        with pytest.raises(RuntimeError, match="injected failure"):
            moelora.delete_adapter(model, victim)
    assert_same(before, snapshot(model))
    if victim == "a":
        moelora.unmerge_lora(model)
    moelora.delete_adapter(model, victim)
    assert victim not in [a["name"] for a in moelora.list_adapters(model)]


def test_unknown_adapter_delete_changes_nothing():
    model = _adapted()
    before = snapshot(model)
    with pytest.raises(KeyError, match="unknown adapter"):
        moelora.delete_adapter(model, "zzz")
    assert_same(before, snapshot(model))


# ---- 1. saves never delete what we did not write; the replace is atomic ----------------------
def _lora_model(seed=0):
    model = moelora.inject_adapter(make_tiny(), CFGS["lora"]())
    randomize_adapter_(model, seed=seed)
    return model


def _tree(path):
    """Every file under path with its bytes and mode (and every folder with its mode)."""
    import os

    out = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            p = os.path.join(root, name)
            st = os.lstat(p)
            out[os.path.relpath(p, path)] = (st.st_mode, None if name in dirs else open(p, "rb").read())
    return out


def test_save_onto_a_regular_file_is_refused_and_changes_nothing(tmp_path):
    target = tmp_path / "f"
    target.write_text("my notes\n")
    for write in (moelora.save_adapter, moelora.export_peft):
        with pytest.raises(AdapterFileError, match=r"'.*f' exists and is a regular file, not an adapter folder.*nothing was changed"):
            write(_lora_model(), target)
        assert target.read_text() == "my notes\n"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


@pytest.mark.parametrize("extra", ["notes.txt", "sub/", "checkpoint/adapter_model.safetensors", ".hidden"])
def test_save_onto_a_folder_with_other_files_is_refused_and_changes_nothing(tmp_path, extra):
    target = tmp_path / "adapter"
    moelora.save_adapter(_lora_model(), target)
    p = target / extra.rstrip("/")
    if extra.endswith("/"):
        p.mkdir()
    else:
        p.parent.mkdir(exist_ok=True)
        p.write_text("keep me")
    before = _tree(tmp_path)
    name = extra.split("/")[0]
    for write in (moelora.save_adapter, moelora.export_peft):
        with pytest.raises(AdapterFileError, match=rf"holds '{name}/?' besides adapter files.*nothing was changed"):
            write(_lora_model(seed=1), target)
        assert _tree(tmp_path) == before


def test_replacing_an_adapter_folder_or_a_peft_export_works(tmp_path):
    target = tmp_path / "adapter"
    target.mkdir()  # an empty folder is fine too
    old, new = _lora_model(0), _lora_model(1)
    moelora.save_adapter(old, target)
    moelora.export_peft(new, target)  # our adapter -> a PEFT export
    assert json.loads((target / "adapter_config.json").read_text())["peft_type"] == "LORA"
    moelora.save_adapter(new, target)  # a PEFT export -> our adapter
    loaded = moelora.load_adapter(make_tiny(), target)
    a, b = moelora.adapter_state_dict(new), moelora.adapter_state_dict(loaded)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary or old folder left
    assert sorted(p.name for p in target.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_saved_files_follow_the_umask(tmp_path, umask):
    import os
    import stat

    old_mask = os.umask(umask)
    try:
        moelora.save_adapter(_lora_model(), tmp_path / "a")
        moelora.export_peft(_lora_model(), tmp_path / "p")
    finally:
        os.umask(old_mask)
    for d in ("a", "p"):
        assert stat.S_IMODE(os.stat(tmp_path / d).st_mode) == 0o777 & ~umask
        for f in (tmp_path / d).iterdir():
            assert stat.S_IMODE(os.stat(f).st_mode) == 0o666 & ~umask, f
    # a replaced folder keeps the mode its owner gave it
    os.chmod(tmp_path / "a", 0o750)
    moelora.save_adapter(_lora_model(1), tmp_path / "a")
    assert stat.S_IMODE(os.stat(tmp_path / "a").st_mode) == 0o750


def _weights_of(path):
    model = moelora.load_adapter(make_tiny(), path)
    return moelora.adapter_state_dict(model)


@pytest.mark.parametrize("exchange", [True, False], ids=["rename-exchange", "per-file-fallback"])
def test_an_interrupt_at_any_step_of_a_replace_leaves_a_complete_adapter(tmp_path, monkeypatch, exchange):
    """KeyboardInterrupt at every file-system step of a replace: the target then always holds the
    old or the new complete adapter (per-file fallback: or new weights the old checksum refuses)."""
    import os

    import moelora.io as mio

    target = tmp_path / "adapter"
    old_model, new_model = _lora_model(0), _lora_model(1)
    moelora.save_adapter(old_model, target)
    old_sd, new_sd = moelora.adapter_state_dict(old_model), moelora.adapter_state_dict(new_model)
    seen = set()
    step = 1
    while True:
        if not exchange:
            monkeypatch.setattr(mio, "_exchange", lambda a, b: False)
        moelora.save_adapter(old_model, target)
        calls = {"n": 0}
        real = {name: getattr(os, name) for name in ("replace", "rename", "unlink", "rmdir", "chmod")}
        real_x, real_sync = mio._exchange, mio._fsync

        def counted(fn):
            def wrapper(*a, **k):
                calls["n"] += 1
                if calls["n"] == step:
                    raise KeyboardInterrupt
                return fn(*a, **k)
            return wrapper

        with monkeypatch.context() as mp:
            for name, fn in real.items():
                mp.setattr(mio.os, name, counted(fn))
            mp.setattr(mio, "_exchange", counted(real_x))
            mp.setattr(mio, "_fsync", counted(real_sync))
            try:
                moelora.save_adapter(new_model, target)
                done = True
            except KeyboardInterrupt:
                done = False
        try:
            got = _weights_of(target)
            which = "new" if all(torch.equal(got[k], new_sd[k]) for k in new_sd) else "old"
            assert all(torch.equal(got[k], (new_sd if which == "new" else old_sd)[k]) for k in got)
        except AdapterFileError as e:
            assert not exchange and "checksum" in str(e), e
            which = "refused"
        seen.add(which)
        if done:
            break
        step += 1
    assert step > 4  # the loop really interrupted several steps
    assert {"old", "new"} <= seen
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["adapter"], left  # an interrupted write cleans up after itself


# ---- 4. integer / bool adapter tensors ----------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool, torch.uint8])
def test_non_float_adapter_tensors_are_refused_by_name(tmp_path, dtype):
    from safetensors.torch import load_file, save_file

    from moelora.io import file_sha256 as _sha256

    path = tmp_path / "a"
    moelora.save_adapter(_lora_model(), path)
    f = path / "adapter_model.safetensors"
    tensors = load_file(str(f))
    key = sorted(tensors)[1]
    tensors[key] = torch.ones_like(tensors[key], dtype=dtype)
    save_file(tensors, str(f))
    meta = json.loads((path / "adapter_config.json").read_text())
    meta["weights_sha256"] = _sha256(f)  # a consistent file: only the dtype is wrong
    (path / "adapter_config.json").write_text(json.dumps(meta))
    model = make_tiny()
    before = snapshot(model)
    with pytest.raises(AdapterFileError, match=rf"non-floating-point adapter tensor\(s\) {key} \({str(dtype)[6:]}\)"):
        moelora.load_adapter(model, path)
    assert_same(before, snapshot(model))
    # the in-memory API refuses them too
    model = _lora_model()
    sd = dict(moelora.adapter_state_dict(model))
    before = snapshot(model)
    sd[key] = torch.ones_like(sd[key], dtype=dtype)
    with pytest.raises(ValueError, match=rf"not floating point, e.g. {key}"):
        moelora.load_adapter_state_dict(model, sd)
    assert_same(before, snapshot(model))


# ---- 6. pickled / truncated reference adapters ------------------------------------------------
class _Payload:
    def __reduce__(self):
        return (print, ("this would run",))


def test_pickled_reference_adapter_is_refused_for_safety(tmp_path):
    from test_mixlora import _write_reference_adapter

    base = make_tiny()
    _, w = _write_reference_adapter(tmp_path / "ref", base, 2, 1)
    f = tmp_path / "ref" / "adapter_model.bin"
    good = f.read_bytes()
    for payload in ({**w, "extra": _Payload()}, {**w, "opt": torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1)}):
        torch.save(payload, f)
        before = snapshot(base)
        with pytest.raises(AdapterFileError) as err:
            moelora.load_adapter(base, tmp_path / "ref")
        msg = str(err.value)
        assert "holds objects other than tensors" in msg and "refused for safety" in msg, msg
        assert "weights_only" not in msg and "truncated" not in msg
        assert err.value.__cause__ is None and err.value.__suppress_context__
        assert_same(before, snapshot(base))
    # plain python values (weights_only allows them) are no tensors either
    torch.save({**w, "step": 3}, f)
    with pytest.raises(AdapterFileError, match="objects other than a mapping of names to tensors"):
        moelora.load_adapter(base, tmp_path / "ref")
    for data in (good[: len(good) // 2], good[:100], b"", b"garbage" * 20):
        f.write_bytes(data)
        with pytest.raises(AdapterFileError, match="truncated or corrupted") as err:
            moelora.load_adapter(base, tmp_path / "ref")
        assert "weights_only" not in str(err.value)
    f.write_bytes(good)
    moelora.load_adapter(base, tmp_path / "ref")  # the good file still loads


@pytest.mark.parametrize("change", [
    lambda c: ["not", "a", "dict"],
    lambda c: {**c, "r": None},
    lambda c: {k: v for k, v in c.items() if k != "r"},
    lambda c: {k: v for k, v in c.items() if k != "num_experts"},
    lambda c: {k: v for k, v in c.items() if k != "target_modules"},
    lambda c: {**c, "target_modules": "q_proj"},
    lambda c: {**c, "target_modules": 3},
    lambda c: {**c, "lora_dropout": "abc"},
    lambda c: {**c, "r": "4"},
    lambda c: {**c, "num_experts": True},
    lambda c: {**c, "top_k": 1.0},
    lambda c: {**c, "jitter_noise": [0]},
    lambda c: {**c, "use_rslora": "no"},
    lambda c: {**c, "lora_alpha": {"a": 1}},
])
def test_malformed_reference_config_gets_our_error(tmp_path, change):
    from test_mixlora import _write_reference_adapter

    base = make_tiny()
    cfg, _ = _write_reference_adapter(tmp_path / "ref", base, 2, 1)
    bad = change(dict(cfg))
    if isinstance(bad, dict):
        bad["peft_type"] = "MIXLORA"
    (tmp_path / "ref" / "adapter_config.json").write_text(json.dumps(bad))
    before = snapshot(base)
    with pytest.raises((AdapterConfigError, AdapterFileError)) as err:
        moelora.load_adapter(base, tmp_path / "ref")
    assert "\n" not in str(err.value)
    assert_same(before, snapshot(base))


@pytest.mark.parametrize("change", [
    lambda m: [m],
    lambda m: {**m, "adapter": None},
    lambda m: {**m, "adapter": ["lora"]},
    lambda m: {**m, "adapter": {k: v for k, v in m["adapter"].items() if k != "r"}},
    lambda m: {**m, "base_model": None},
    lambda m: {**m, "base_model": ["llama"]},
    lambda m: {**m, "weights_sha256": 5},
    lambda m: {**m, "adapter": {**m["adapter"], "base_model_type": "qwen2"}},
    lambda m: {**m, "adapter": {**m["adapter"], "method": None}},
])
def test_malformed_own_config_gets_our_error(tmp_path, change):
    path = tmp_path / "a"
    moelora.save_adapter(_lora_model(), path)
    meta = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps(change(meta)))
    model = make_tiny()
    before = snapshot(model)
    with pytest.raises((AdapterConfigError, AdapterFileError)) as err:
        moelora.load_adapter(model, path)
    assert "\n" not in str(err.value)
    assert_same(before, snapshot(model))


# ---- 3. moves after injection ----------------------------------------------------------------
MOVE_CFGS = {
    "lora": lambda: moelora.LoraConfig(r=2, target_modules=("q_proj", "v_proj", "down_proj")),
    "mixlora": lambda: moelora.MixLoraConfig(num_experts=3, top_k=2, r=2),
    "lora_switch": lambda: moelora.LoraSwitchConfig(num_experts=3, top_k=2, r=2, switch_mode="unmerged"),
}
TOL = {torch.float16: 3e-2, torch.bfloat16: 6e-2, torch.float64: 1e-5}


@pytest.mark.parametrize("method", list(MOVE_CFGS))
@pytest.mark.parametrize("move", ["half", "bfloat16", "float64"])
def test_moves_after_injection_match_a_model_moved_first(method, move):
    """inject then move == move then inject with the same adapter weights (mixed batch included)."""
    dtype = {"half": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}[move]
    a = moelora.inject_adapter(make_tiny(), MOVE_CFGS[method]())
    moelora.add_adapter(a, "other", moelora.LoraConfig(r=2))
    randomize_adapter_(a)
    sd = {n: {k: v.clone() for k, v in moelora.adapter_state_dict(a, n).items()} for n in ("default", "other")}
    a.half() if move == "half" else a.to(dtype)
    b = make_tiny().to(dtype)
    moelora.inject_adapter(b, MOVE_CFGS[method]())
    moelora.add_adapter(b, "other", moelora.LoraConfig(r=2))
    for n in sd:
        moelora.load_adapter_state_dict(b, sd[n], n)
    assert a.model.layers[0].self_attn.q_proj.weight.dtype == dtype
    ids = torch.randint(1, 61, (3, 6))
    with torch.no_grad():
        for names in (None, ["default", "other", None]):
            la = a(ids, adapter_names=names).logits.double()
            lb = b(ids, adapter_names=names).logits.double()
            assert torch.isfinite(la).all()
            torch.testing.assert_close(la, lb, atol=TOL[dtype], rtol=0)
        # a training forward (labels + aux loss) works after the move too
        out = a(ids, labels=ids)
        assert torch.isfinite(out.loss)
    # and the move back: fp32 again, still matching the fp32 original within the cast's rounding
    a.float()
    assert all(p.dtype == torch.float32 for p in a.parameters())


@pytest.mark.parametrize("move", ["half", "bfloat16", "float64"])
def test_lora_switch_merge_mode_equals_unmerged_after_a_cast(move):
    dtype = {"half": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}[move]
    model = moelora.inject_adapter(make_tiny(), moelora.LoraSwitchConfig(num_experts=3, top_k=2, r=4))
    randomize_adapter_(model)
    st = moelora.switch_state(model)
    ids = torch.randint(1, 61, (1, 4))
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    w = model.model.layers[0].self_attn.q_proj.weight
    with torch.no_grad():
        st.mode = "merge"
        model.generate(ids, **kw)  # builds the merge plan on fp32 weights
        assert st.plan is not None
        model.half() if move == "half" else model.to(dtype)
        launches = st.merge_launches
        merged = model.generate(ids, **kw)
        assert st.merge_launches > launches  # the merged path really ran after the cast
        st.mode = "unmerged"
        unmerged = model.generate(ids, **kw)
    assert torch.equal(merged, unmerged)
    w = model.model.layers[0].self_attn.q_proj.weight
    assert w.dtype == dtype


# ---- 7. property test: random corruptions of saved adapter folders ----------------------------
def _corruptions():
    """(name, function(folder, rng)) of every kind of corruption."""
    import random

    from safetensors.torch import load_file, save_file

    from moelora.io import file_sha256 as _sha256

    def meta_of(p):
        return json.loads((p / "adapter_config.json").read_text())

    def write_meta(p, m):
        (p / "adapter_config.json").write_text(json.dumps(m))

    def rewrite_tensors(p, fn, rng):
        f = p / "adapter_model.safetensors"
        t = load_file(str(f))
        fn(t, rng)
        save_file(t, str(f))
        m = meta_of(p)
        m["weights_sha256"] = _sha256(f)  # consistent checksum: the tensor checks themselves must catch it
        write_meta(p, m)

    def flip(p, rng: random.Random):
        f = p / "adapter_model.safetensors"
        data = bytearray(f.read_bytes())
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(data))
            data[i] ^= rng.randint(1, 255)
        f.write_bytes(bytes(data))

    def truncate_weights(p, rng):
        f = p / "adapter_model.safetensors"
        data = f.read_bytes()
        f.write_bytes(data[: rng.randrange(len(data))])

    def truncate_config(p, rng):
        f = p / "adapter_config.json"
        data = f.read_bytes().rstrip()
        f.write_bytes(data[: rng.randrange(len(data) - 1)])

    def delete_field(p, rng):
        m = meta_of(p)
        section, key = rng.choice([(None, "adapter")] + [("adapter", k) for k in ("method", "r", "lora_alpha")]
                                  + ([("adapter", k) for k in ("num_experts", "top_k")]
                                     if m["adapter"]["method"] != "lora" else []))
        (m if section is None else m[section]).pop(key)
        write_meta(p, m)

    def change_type(p, rng):
        m = meta_of(p)
        ad = m["adapter"]
        key = rng.choice(sorted(k for k in ad if k != "format_version"))
        v = ad[key]
        if isinstance(v, bool):
            new = rng.choice(["true", 1, None, [v]])
        elif isinstance(v, (int, float)):
            new = rng.choice([str(v), None, [v], True, {"v": v}] + ([float(v) + 0.5] if key in ("r", "num_experts", "top_k") else []))
        elif isinstance(v, str):
            new = rng.choice([1, [v], {"v": v}, 2.5] + ([None] if key not in ("base_model_type", "base_model_name_or_path") else []))
        elif isinstance(v, list):
            new = rng.choice([",".join(v), v[0] if v else "x", 3, {"a": 1}, [1, 2]])
        else:  # None (base_model_name_or_path)
            new = rng.choice([1, [1], {"a": 1}, 2.5])
        ad[key] = new
        if rng.random() < 0.3:  # or a whole section of the wrong type
            m[rng.choice(["adapter", "base_model"])] = rng.choice([None, [1], "x", 3])
        write_meta(p, m)

    def base_mismatch(p, rng):
        m = meta_of(p)
        key = rng.choice(["hidden_size", "num_hidden_layers", "intermediate_size", "model_type"])
        m["base_model"][key] = rng.choice([7, "other", 99999, [1]])
        write_meta(p, m)

    def extra_tensor(t, rng):
        k = rng.choice(sorted(t))
        t[k.replace("lora_", "lora_X") if rng.random() < 0.5 else f"model.layers.9.{k}"] = t[k].clone()

    def missing_tensor(t, rng):
        t.pop(rng.choice(sorted(t)))

    def reshape_tensor(t, rng):
        k = rng.choice(sorted(t))
        shape = list(t[k].shape)
        shape[rng.randrange(len(shape))] += rng.choice([1, -1])
        t[k] = torch.zeros(shape)

    def retype_tensor(t, rng):
        k = rng.choice(sorted(t))
        t[k] = t[k].to(rng.choice([torch.int32, torch.int64, torch.bool, torch.uint8, torch.int8]))

    return [
        ("flip", flip), ("truncate_weights", truncate_weights), ("truncate_config", truncate_config),
        ("delete_field", delete_field), ("change_type", change_type), ("base_mismatch", base_mismatch),
        ("extra_tensor", lambda p, r: rewrite_tensors(p, extra_tensor, r)),
        ("missing_tensor", lambda p, r: rewrite_tensors(p, missing_tensor, r)),
        ("reshape_tensor", lambda p, r: rewrite_tensors(p, reshape_tensor, r)),
        ("retype_tensor", lambda p, r: rewrite_tensors(p, retype_tensor, r)),
    ]


def test_random_corruptions_always_raise_and_change_nothing(tmp_path):
    """Seeded random corruptions (~60 cases, each method, into a bare and an adapted model):
    every one raises AdapterFileError/AdapterConfigError, the model is unchanged (state_dict,
    requires_grad, module types, list_adapters, hooks, class) and the folder's bytes too."""
    import random
    import shutil

    rng = random.Random(15)
    sources = {}
    for method in CFGS:
        m = moelora.inject_adapter(make_tiny(), CFGS[method]())
        randomize_adapter_(m)
        moelora.save_adapter(m, tmp_path / "src" / method)
        sources[method] = tmp_path / "src" / method
    targets = {"bare": make_tiny(), "adapted": _adapted()}
    kinds = _corruptions()
    seen = set()
    for case in range(60):
        method = rng.choice(sorted(sources))
        kind, corrupt = kinds[case % len(kinds)] if case < 2 * len(kinds) else rng.choice(kinds)
        folder = tmp_path / f"case{case}"
        shutil.copytree(sources[method], folder)
        corrupt(folder, rng)
        tree = _tree(folder)
        target = targets[rng.choice(sorted(targets))]
        before = snapshot(target)
        try:
            moelora.load_adapter(target, folder, adapter_name="loaded")
        except (AdapterFileError, AdapterConfigError) as e:
            assert "\n" not in str(e), (kind, e)
        else:
            pytest.fail(f"case {case}: {kind} on a {method} adapter loaded without error")
        seen.add(kind)
        assert_same(before, snapshot(target))
        assert _tree(folder) == tree, (case, kind)
    assert seen == {k for k, _ in kinds}


def test_save_through_a_symlink_replaces_the_linked_folder_and_keeps_the_link(tmp_path):
    real = tmp_path / "real"
    moelora.save_adapter(_lora_model(0), real)
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    new = _lora_model(1)
    moelora.save_adapter(new, tmp_path / "link")
    assert (tmp_path / "link").is_symlink()
    got = _weights_of(real)
    assert all(torch.equal(got[k], v) for k, v in moelora.adapter_state_dict(new).items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


def test_reference_experts_of_different_shapes_get_our_error(tmp_path):
    from test_mixlora import _write_reference_adapter

    base = make_tiny()
    _, w = _write_reference_adapter(tmp_path / "ref", base, 2, 1)
    key = "mixlora.layers.0.mlp.up_proj.experts.1.lora_A.weight"
    w[key] = torch.zeros(w[key].shape[0] + 1, w[key].shape[1])
    torch.save(w, tmp_path / "ref" / "adapter_model.bin")
    before = snapshot(base)
    with pytest.raises(AdapterFileError, match="different shapes"):
        moelora.load_adapter(base, tmp_path / "ref")
    assert_same(before, snapshot(base))


# the same property under hypothesis (when installed): it draws the method, the corruption, its
# random choices and the target model
try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - the seeded loop above still runs
    given = None


@pytest.fixture(scope="module")
def corruption_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("corruption_sources")
    sources = {}
    for method in CFGS:
        m = moelora.inject_adapter(make_tiny(), CFGS[method]())
        randomize_adapter_(m)
        moelora.save_adapter(m, root / method)
        sources[method] = root / method
    return sources, {"bare": make_tiny(), "adapted": _adapted()}


if given is not None:
    _KINDS = _corruptions()

    @settings(max_examples=50, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(method=st.sampled_from(sorted(CFGS)), kind=st.integers(0, len(_KINDS) - 1),
           target=st.sampled_from(["bare", "adapted"]), seed=st.integers(0, 2**32 - 1))
    def test_property_corrupted_folders_raise_and_change_nothing(corruption_setup, method, kind, target, seed):
        import random
        import shutil
        import tempfile
        from pathlib import Path

        sources, targets = corruption_setup
        name, corrupt = _KINDS[kind]
        with tempfile.TemporaryDirectory() as d:
            folder = Path(d) / "adapter"
            shutil.copytree(sources[method], folder)
            corrupt(folder, random.Random(seed))
            tree = _tree(folder)
            model = targets[target]
            before = snapshot(model)
            with pytest.raises((AdapterFileError, AdapterConfigError)) as err:
                moelora.load_adapter(model, folder, adapter_name="loaded")
            assert "\n" not in str(err.value), (name, err.value)
            assert_same(before, snapshot(model))
            assert _tree(folder) == tree, name
