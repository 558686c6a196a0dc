"""``python -m moelora.bench.multi_adapter`` on CPU: the three moelora cases, their files, and the
``--profile`` split of wall time and aten ops per case."""
from __future__ import annotations

import json
from pathlib import Path

from moelora.bench.multi_adapter import main


def test_multi_adapter_bench_writes_rows_and_profiles(tmp_path: Path) -> None:
    res = main(["--shape", "tiny_shape", "--adapters", "2", "--batch", "2", "--prompt", "4", "--new-tokens", "2",
                "--repeats", "1", "--rounds", "1", "--modes", "eager", "--no-peft", "--profile", "--out", str(tmp_path)])
    cases = {r["case"] for r in res["rows"] if "error" not in r}
    assert cases == {"base", "moelora_single", "moelora_mixed"}, res["rows"]
    assert res["checks"]["moelora_mixed_vs_alone_max_abs_diff"] < 1e-4
    on_disk = json.loads((tmp_path / "multi_adapter.json").read_text())
    prof = on_disk["profiles"]
    assert set(prof) == {f"eager/{c}" for c in cases}
    for key, p in prof.items():
        assert p["wall_ms"] > 0 and p["aten_ops"] > 0 and (tmp_path / p["table"]).is_file(), key
    # the adapted cases run more aten ops than the base (else the count would show nothing)
    assert prof["eager/moelora_mixed"]["aten_ops"] > prof["eager/base"]["aten_ops"]
