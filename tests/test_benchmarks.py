"""The benchmark scripts run end to end (tiny shapes) and write what the design asks for."""

import json
import os

import pytest


RECORD_KEYS = {"op", "impl", "device", "dtype", "shape", "ms", "tflops", "gbps", "peak_mem_bytes", "speedup_vs", "env"}


def test_attention_benchmark_writes_records(tmp_path, monkeypatch):
    from sft_kernels.bench import attention as ba

    cfgs = [dict(batch=1, heads=2, head_dim=16, dtype="float32", seqlen=L, window=w, mode=m)
            for L in (128, 256) for w in (32, "sqrt") for m in ("fwd", "fwd+bwd")]
    monkeypatch.setattr(ba, "sweep", lambda device, quick: iter(cfgs))
    monkeypatch.setattr(ba, "CPU_TARGET", dict(cfgs[-1], window=32))
    assert ba.main(["--device", "cpu", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "attention.json").read_text())
    assert {"env", "records", "skipped", "targets"} <= set(data)
    impls = {r["impl"] for r in data["records"]}
    assert {"sdpa_causal", "sft_torch"} <= impls
    for r in data["records"]:
        assert not RECORD_KEYS - set(r), RECORD_KEYS - set(r)
        assert r["ms"] > 0 and r["tflops"] > 0
        assert r["speedup_vs"]["baseline"] == "sdpa_causal"
    assert data["env"]["commit"] and data["env"]["torch"]
    # the child-process memory probe measured the target shape
    mem = [r for r in data["records"] if r.get("peak_mem_bytes") is not None]
    assert mem and all(r["peak_mem_bytes"] > 0 for r in mem)
    assert (tmp_path / "attention.md").read_text().count("|") > 20
    assert any(p.suffix == ".png" for p in tmp_path.iterdir())


def test_flop_count_matches_band():
    from sft_kernels.bench import attention as ba

    cfg = dict(batch=2, heads=3, head_dim=8, dtype="float32", seqlen=10, window=3, mode="fwd")
    # causal window of 3 keys over 10 queries: 1 + 2 + 3 * 8 = 27 pairs
    assert ba.flops(cfg, "sft_torch") == 4 * 27 * 8 * 3 * 2
    assert ba.flops(cfg, "sdpa_causal") == 4 * 55 * 8 * 3 * 2
    assert ba.flops(dict(cfg, mode="fwd+bwd"), "sft_torch") == 3.5 * 4 * 27 * 8 * 3 * 2
