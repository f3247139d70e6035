"""sft_kernels.bench.memory --toy: runs in fresh processes, writes JSON, Markdown and a plot, and
measures what the features change: a full-logits step grows with L x V, the tiled one does not."""

import json
import os

import pytest

pytest.importorskip("transformers")

from sft_kernels.bench import BENCHMARKS, memory  # noqa: E402


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="RSS from /proc")
def test_toy_memory_benchmark(tmp_path):
    # vocab 8000 at L 256: full logits 3 x 4 x 256 x 8000 = 23 MiB; the tiled loss holds a 64-token tile
    assert memory.main(["--toy", "--vocabs", "8000", "--variants", "hf_sdpa_gc,sft_gc_loss_mlp",
                        "--out", str(tmp_path)]) == 0
    data = json.load(open(tmp_path / "memory.json"))
    recs = {r["impl"]: r for r in data["records"]}
    assert set(recs) == {"hf_sdpa_gc", "sft_gc_loss_mlp"}
    assert all(r["resident_bytes"] > 0 and r["step_bytes"] >= 0 for r in recs.values())
    assert recs["hf_sdpa_gc"]["step_bytes"] > 15 * 2**20
    assert recs["sft_gc_loss_mlp"]["step_bytes"] < recs["hf_sdpa_gc"]["step_bytes"] / 2
    assert "| 256 | 8000 | hf_sdpa_gc |" in (tmp_path / "memory.md").read_text()
    assert "memory" in BENCHMARKS
