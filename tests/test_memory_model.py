"""The memory model (sft_kernels.memory_model) against the committed CPU measurements of
sft_kernels.bench.memory: every measured peak within 15% of the modelled one; and its
arithmetic on shapes whose answer is known by hand."""

import glob
import json
import os

import pytest

from sft_kernels import memory_model as mm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 0.15


def _measured():
    recs = []
    for path in sorted(glob.glob(os.path.join(ROOT, "benchmarks", "results", "cpu", "*", "memory*", "memory.json"))):
        with open(path) as f:
            recs += [(path, r) for r in json.load(f)["records"] if "peak_mem_bytes" in r]
    return recs


def modelled_peak(rec) -> float:
    s = rec["shape"]
    shape = mm.Shape("bench", s["hidden"], s["layers"], s["heads"], s["kv_heads"], s["head_dim"], s["intermediate"],
                     s["vocab"], window=s["window"], tied=bool(s.get("tied", False)))
    variant = rec["impl"]
    parts = mm.step_bytes(shape, s["seqlen"], dtype_bytes=4, mixed_precision=False, zero=0,
                          tiled_loss=variant in ("sft_gc_loss", "sft_gc_loss_mlp"), tiled_mlp=variant == "sft_gc_loss_mlp",
                          loss_chunk=s["loss_chunk"], mlp_chunk=s["mlp_chunk"])
    return mm.peak_bytes(parts)


def test_model_within_15_percent_of_cpu_measurements():
    recs = _measured()
    assert len(recs) >= 4, "no committed CPU memory measurements found"
    bad = []
    for path, r in recs:
        model, got = modelled_peak(r), r["peak_mem_bytes"]
        if abs(model - got) > TOLERANCE * got:
            bad.append(f"{r['impl']} L={r['shape']['seqlen']} V={r['shape']['vocab']}: measured {got / 2**20:.0f} MiB, "
                       f"modelled {model / 2**20:.0f} MiB ({(model - got) / got:+.0%})")
    assert not bad, "\n".join(bad)


def test_parameter_count_and_model_states():
    # Llama-3-8B: 8.03e9 parameters (Meta's model card)
    assert abs(mm.LLAMA3_8B.parameters() - 8.03e9) < 0.01e9
    assert abs(mm.MISTRAL_7B.parameters() - 7.24e9) < 0.01e9  # Mistral-7B-v0.1: 7.24e9
    p = mm.LLAMA3_8B.parameters()
    assert mm.step_bytes(mm.LLAMA3_8B, 1, zero=0)["model_states"] == 16 * p
    assert mm.step_bytes(mm.LLAMA3_8B, 1, zero=3, data_parallel=8)["model_states"] == 2 * p
    assert mm.step_bytes(mm.LLAMA3_8B, 1, zero=3, data_parallel=8, offload_optimizer=True)["model_states"] == 0.5 * p


def test_logits_and_flops_by_hand():
    # full logits, bf16: L V (2 + 4 + 4 + 2) bytes; tiled: the chunk's plus the fp32 weight-gradient sum
    L, V, H = 131072, 128256, 4096
    assert mm.step_bytes(mm.LLAMA3_8B, L, tiled_loss=False)["logits"] == L * V * 12
    assert mm.step_bytes(mm.LLAMA3_8B, L, loss_chunk=4096)["logits"] == 4096 * V * 12 + V * H * 4
    # a window of w keys: w(w+1)/2 + (L-w) w keys in all; dense causal L(L+1)/2
    s = mm.Shape("t", 64, 1, 1, 1, 8, 64, 10, window=4)
    assert mm.attention_flops(s, 10, checkpointing=False) == (4 * (10 + 6 * 4) * 8) * 3.5
    full = mm.Shape("t", 64, 1, 1, 1, 8, 64, 10)
    assert mm.attention_flops(full, 10, checkpointing=True) == 4 * 55 * 8 * 4.5


def test_max_length_grows_with_tiling_and_context_parallelism():
    kw = dict(offload_optimizer=True)
    one = mm.max_length(mm.LLAMA3_8B, tiled_loss=False, tiled_mlp=False, **kw)
    tiled = mm.max_length(mm.LLAMA3_8B, **kw)
    eight = mm.max_length(mm.LLAMA3_8B, data_parallel=8, context_parallel=8, **kw)
    assert 0 < one < tiled < eight
    parts = mm.step_bytes(mm.LLAMA3_8B, tiled, **kw)
    assert mm.peak_bytes(parts) <= 76 * 2**30 < mm.peak_bytes(mm.step_bytes(mm.LLAMA3_8B, tiled + 1024, **kw))
