"""python -m moelora.bench.bdlora in its CPU smoke mode (issue 18): every layer variant and decode
method measured and written with the environment; the equal-budget ranks and the analytical
parameter counts agree with moelora's own count of the injected adapters."""
import json
import math

import pytest

from moelora.bench import bdlora
from moelora.bench.models import MODEL_SHAPES
from moelora.bench.versions import FIELDS


@pytest.mark.slow
def test_smoke_run_writes_every_case(tmp_path):
    res = bdlora.main(["--device", "cpu", "--model", "tiny", "--tokens", "1,8", "--layer-repeats", "2",
                       "--nblocks", "2", "--new-tokens", "2", "--repeats", "1", "--warmup", "0",
                       "--methods", "base,lora,bdlora,mixlora,mixlora_bd", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "bdlora.json").read_text())
    assert saved["environment"]["command"] and all(k in saved["environment"] for k in FIELDS)
    assert (tmp_path / "bdlora_layers.csv").read_text().count("\n") == len(res["layers"]) + 1
    layers = res["layers"]
    assert {(r["layer"], r["tokens"], r["variant"]) for r in layers} == {
        (layer, t, v) for layer in ("q_proj", "gate_proj", "down_proj") for t in (1, 8) for v in bdlora.LAYER_VARIANTS}
    for r in layers:
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and math.isfinite(r["fwd_ratio"])
        if r["variant"].startswith("bdlora"):
            assert r["max_abs_diff"] < 1e-5  # blockwise == the dense block_diag reference (fp32)
        if r["variant"] == "bdlora":  # equal budget: at most the plain LoRA's parameters, and tight
            plain = next(p["params"] for p in layers if p["layer"] == r["layer"] and p["variant"] == "lora")
            assert r["params"] <= plain < bdlora.linear_params(r["d_in"], r["d_out"], r["r"] + 2, 2, r["role"])
    decode = {(r["method"], r["nblocks"]): r for r in res["decode"]}
    assert set(decode) == {("base", 1), ("lora", 1), ("bdlora", 2), ("mixlora", 1), ("mixlora_bd", 2)}
    shape = MODEL_SHAPES["tiny_shape"]
    layers_n = shape["num_hidden_layers"]
    for (method, n), r in decode.items():
        assert "error" not in r, r
        assert math.isfinite(r["decode_ms_per_token"])
        if method != "base":
            assert len(r["paired_base_ms_repeats"]) == 1  # each repeat beside one of the plain base
            experts = 8 if method.startswith("mixlora") else 0  # the default --num-experts
            assert r["trainable"] == layers_n * bdlora.model_params(shape, r["r"], n, experts)
    assert decode[("bdlora", 2)]["trainable"] <= decode[("lora", 1)]["trainable"]
    assert decode[("mixlora_bd", 2)]["trainable"] <= decode[("mixlora", 1)]["trainable"]


def test_budget_rank_is_the_largest_that_fits():
    shape = MODEL_SHAPES["llama2_7b_shape"]
    for n in (2, 4, 8):
        for experts in (0, 8):
            r = bdlora.budget_rank(shape, 16, n, experts)
            assert r % n == 0
            plain = bdlora.model_params(shape, 16, 1, experts)
            assert bdlora.model_params(shape, r, n, experts) <= plain < bdlora.model_params(shape, r + n, n, experts)


def test_bad_flags_are_refused():
    with pytest.raises(SystemExit):
        bdlora.parse_args(["--methods", "base,s_lora"])
    with pytest.raises(SystemExit):
        bdlora.parse_args(["--nblocks", "0"])


def test_imports_nothing_the_gpu_machine_lacks():
    import subprocess
    import sys

    code = ("import sys, moelora.bench.bdlora; print(sorted(m for m in ('hydra', 'omegaconf', 'peft', 'lightning', "
            "'pytorch_lightning', 'lm_eval', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
