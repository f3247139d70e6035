"""Peak memory of one training step against sequence length, each memory feature on and off.

One step = forward with labels, backward, AdamW step, batch 1, one fixed small model with a real
vocabulary (Mistral architecture from a config, fp32 on CPU, bf16 on GPU; the shape is written
above the table), every variant with transformers' gradient checkpointing:

  hf_sdpa_gc          transformers' SDPA (dense causal), full logits: what a user runs today
  sft_gc              sft_sliding_window (window 1024), full logits
  sft_gc_loss         + the loss without full logits (tiled_loss; chunks of --loss-tile-bytes of fp32
                      logits, 512 tokens at vocab 32k and fewer at a larger one, or --loss-chunk tokens)
  sft_gc_loss_mlp     + the tiled MLP (tiled_mlp, chunk --mlp-chunk tokens): everything on

Measured (never modelled here; :mod:`sft_kernels.memory_model` models it): on CPU, in a fresh
process per (variant, L, vocab), ``resident`` = RSS growth from building the model to after a
64-token warm-up step (parameters + AdamW states), ``step`` = the peak RSS growth of the next step above
that (gradients, checkpoints, recompute, attention, logits); ``peak`` = resident + step. A fixed
malloc mmap threshold returns freed blocks at once, so RSS tracks live memory. On GPU:
``torch.cuda.max_memory_allocated`` likewise.

    python -m sft_kernels.bench.memory [--lengths 4096,8192] [--vocabs 32000,64000] [--tied] [--toy] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional

import torch

from ..modules.linear_cross_entropy import tile_chunk_tokens
from . import common

OP = "memory"
VARIANTS = ("hf_sdpa_gc", "sft_gc", "sft_gc_loss", "sft_gc_loss_mlp")
# --model mistral-256x4 (the default): hidden 256, 4 layers, 4 heads of 64, 2 KV heads, MLP 1024,
# untied embeddings as Llama / Mistral 7-8B (``--tied``: tied, as many small LMs)
MODEL = dict(hidden=256, layers=4, heads=4, kv_heads=2, head_dim=64, intermediate=1024, window=1024, tied=False)
TOY_MODEL = dict(hidden=32, layers=2, heads=2, kv_heads=1, head_dim=16, intermediate=64, window=16, tied=False)
# --model: the default above, or a real small LM's shape (SmolLM-135M: 30 layers of 576, 9 heads
# of 64, 3 KV heads, MLP 1536, tied embeddings) where the V x H matrices are a smaller share of
# the parameters (vocab 32k: 18.4M of 125M against 16.4M of 20.3M)
MODELS = {"mistral-256x4": MODEL,
          "smollm-135m": dict(hidden=576, layers=30, heads=9, kv_heads=3, head_dim=64, intermediate=1536,
                              window=1024, tied=True)}
LENGTHS = (4096, 8192, 16384, 32768)
TOY_LENGTHS = (256,)
VOCABS = (32000,)
TOY_VOCABS = (1000,)
MLP_CHUNK, TOY_MLP_CHUNK = 2048, 64
# the loss tile's budget: fp32 logits of 512 tokens at vocab 32k (62.5 MiB); the chunk is
# tile_chunk_tokens(vocab, budget) tokens, so the tile is the same size at any vocabulary
LOSS_TILE_BYTES, TOY_LOSS_TILE_BYTES = 512 * 32000 * 4, 64 * 1000 * 4


def describe_models(records: List[Dict]) -> str:
    """The model shape(s) the records measured, one line each (from the records, not the flags)."""
    keys = ("hidden", "layers", "heads", "kv_heads", "head_dim", "intermediate", "window", "tied")
    shapes = sorted({tuple(r["shape"].get(k) for k in keys) for r in records})
    lines = []
    for h, n, a, kv, d, i, w, tied in shapes:
        lines.append(f"Model: hidden {h}, {n} layers, {a} heads of {d}, {kv} KV heads, MLP {i}, "
                     f"window {w}, {'tied' if tied else 'untied'} embeddings.")
    return "\n".join(lines)


def make_config(model: Dict, vocab: int, seqlen: int, windowed: bool):
    from transformers import MistralConfig

    return MistralConfig(vocab_size=vocab, hidden_size=model["hidden"], intermediate_size=model["intermediate"],
                         num_hidden_layers=model["layers"], num_attention_heads=model["heads"],
                         num_key_value_heads=model["kv_heads"], head_dim=model["head_dim"],
                         max_position_embeddings=max(seqlen, 4096), sliding_window=model["window"] if windowed else None,
                         tie_word_embeddings=bool(model.get("tied", False)), use_cache=False, pad_token_id=0)


def setup(variant: str, model: Dict, vocab: int, seqlen: int, loss_chunk: Optional[int], mlp_chunk: int, device: str,
          loss_tile_bytes: Optional[int] = None):
    """The model, AdamW and one batch; returns a zero-argument training step. ``loss_chunk``: tokens
    per loss chunk, or None to size it from ``loss_tile_bytes``."""
    from transformers import AutoModelForCausalLM

    from sft_kernels.train.model import dtype_kwargs

    sft = variant != "hf_sdpa_gc"
    if sft:
        from sft_kernels.integrations.transformers import register

        register()
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    torch.manual_seed(0)
    net = AutoModelForCausalLM.from_config(make_config(model, vocab, seqlen, sft),
                                           attn_implementation="sft_sliding_window" if sft else "sdpa",
                                           **dtype_kwargs(dtype)).to(device)
    net.gradient_checkpointing_enable()
    if variant in ("sft_gc_loss", "sft_gc_loss_mlp"):
        from sft_kernels.integrations.transformers import tiled_loss

        if loss_chunk:
            tiled_loss(net, chunk_tokens=loss_chunk)
        else:
            tiled_loss(net, tile_bytes=loss_tile_bytes)
    if variant == "sft_gc_loss_mlp":
        from sft_kernels.modules.tiled_mlp import tiled_mlp

        tiled_mlp(net, chunk_tokens=mlp_chunk)
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (1, seqlen), generator=g).to(device)
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)

    def step(tokens=None):
        loss = net(**{k: v[:, :tokens] for k, v in batch.items()}).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return step


def _rss() -> int:
    return common._status_bytes("VmRSS")


def child_main(spec: Dict) -> None:
    """In a fresh process: resident (model + optimizer after a warm-up step) and the step's growth."""
    tiny = dict(spec, seqlen=64, vocab=128)
    setup(**tiny, device="cpu")()  # imports, first dispatches: not the step's memory
    base = _rss()
    step = setup(**spec, device="cpu")
    # the warm-up step at 64 tokens: AdamW's states and the gradients' first allocation depend on the
    # parameters only, and a full-length warm-up would double the run (L = 32k: minutes on 2 cores)
    loss = step(64)
    resident = _rss()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := current RSS
    step()
    peak = common._status_bytes("VmHWM")
    print(json.dumps({"resident_bytes": max(0, resident - base), "step_bytes": max(0, peak - resident),
                      "loss": loss}))


def measure_cpu(spec: Dict, timeout: float) -> Optional[Dict]:
    return common.cpu_child_json(__spec__.name if __spec__ else "sft_kernels.bench.memory", [json.dumps(spec)],
                                 timeout)


def measure_cuda(spec: Dict) -> Dict:
    step = setup(**spec, device="cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    resident = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return {"resident_bytes": resident - base, "step_bytes": torch.cuda.max_memory_allocated() - resident}


def _available_bytes() -> Optional[int]:
    if not os.path.exists("/proc/meminfo"):
        return None
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def full_logits_estimate(seqlen: int, vocab: int) -> int:
    """Bytes the full-logits loss needs at least (logits, log-softmax, their gradient: 3 fp32 L x V)."""
    return 3 * 4 * seqlen * vocab


def run(args) -> List[Dict]:
    device = args.device
    model = TOY_MODEL if args.toy else MODELS[args.model]
    lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else (TOY_LENGTHS if args.toy else LENGTHS)
    vocabs = [int(x) for x in args.vocabs.split(",")] if args.vocabs else (TOY_VOCABS if args.toy else VOCABS)
    if args.tied:
        model = dict(model, tied=True)
    loss_chunk = args.loss_chunk or None  # None: from the byte budget, per vocabulary
    tile = None if loss_chunk else (args.loss_tile_bytes or (TOY_LOSS_TILE_BYTES if args.toy else LOSS_TILE_BYTES))
    mlp_chunk = args.mlp_chunk or (TOY_MLP_CHUNK if args.toy else MLP_CHUNK)
    variants = args.variants.split(",") if args.variants else VARIANTS
    env = common.environment(device)
    records = []
    for vocab in vocabs:
        for seqlen in lengths:
            for variant in variants:
                if vocab != vocabs[0] and (variant != "sft_gc_loss_mlp" or seqlen != lengths[-1]):
                    continue  # the vocabulary sweep: everything on, at the longest length
                spec = dict(variant=variant, model=model, vocab=vocab, seqlen=seqlen, loss_chunk=loss_chunk,
                            mlp_chunk=mlp_chunk, loss_tile_bytes=tile)
                chunk = loss_chunk or tile_chunk_tokens(vocab, tile)  # the tokens per loss chunk at this vocabulary
                rec = dict(op=OP, impl=variant, device=device, dtype="float32" if device == "cpu" else "bfloat16",
                           shape=dict(seqlen=seqlen, vocab=vocab, loss_chunk=chunk, loss_tile_bytes=tile,
                                      mlp_chunk=mlp_chunk, **model), env=env)
                avail = _available_bytes() if device == "cpu" else None
                need = full_logits_estimate(seqlen, vocab) if variant in ("hf_sdpa_gc", "sft_gc") else 0
                if avail is not None and need > 0.6 * avail:
                    rec["skipped"] = f"needs about {need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available"
                    common.progress(f"L={seqlen} V={vocab} {variant}: skipped ({rec['skipped']})")
                    records.append(rec)
                    continue
                got = measure_cpu(spec, args.timeout) if device == "cpu" else measure_cuda(spec)
                if got is None:
                    rec["skipped"] = "failed or timed out"
                else:
                    rec.update(resident_bytes=got["resident_bytes"], step_bytes=got["step_bytes"],
                               peak_mem_bytes=got["resident_bytes"] + got["step_bytes"], loss=got.get("loss"))
                    common.progress(f"L={seqlen:6d} V={vocab} {variant:16s} resident {got['resident_bytes'] / 2**20:7.0f}"
                                    f" MiB  step {got['step_bytes'] / 2**20:8.0f} MiB")
                records.append(rec)
                common.append_partial(args.out, OP, rec)
    return records


def summarize(records: List[Dict]) -> str:
    rows = []
    for r in records:
        s = r["shape"]
        base = next((b for b in records if b["impl"] == "hf_sdpa_gc" and b["shape"]["seqlen"] == s["seqlen"]
                     and b["shape"]["vocab"] == s["vocab"] and "peak_mem_bytes" in b), None)
        mib = lambda k: None if k not in r else r[k] / 2**20  # noqa: E731
        rows.append(dict(L=s["seqlen"], vocab=s["vocab"], variant=r["impl"], resident_mib=mib("resident_bytes"),
                         step_mib=mib("step_bytes"), peak_mib=mib("peak_mem_bytes"),
                         vs_hf=(base["peak_mem_bytes"] / r["peak_mem_bytes"]) if base and "peak_mem_bytes" in r else None,
                         loss_chunk=s.get("loss_chunk") if r["impl"] in ("sft_gc_loss", "sft_gc_loss_mlp") else None,
                         tied="yes" if s.get("tied") else "no", note=r.get("skipped", "")))
    f0 = lambda x: "" if x is None else f"{x:.0f}"  # noqa: E731
    return common.markdown_table(rows, ["L", "vocab", "variant", "resident_mib", "step_mib", "peak_mib", "vs_hf", "loss_chunk",
                                        "tied", "note"],
                                 {"resident_mib": f0, "step_mib": f0, "peak_mib": f0, "loss_chunk": f0,
                                  "vs_hf": lambda x: "" if x is None else f"{x:.2f}x"})


def plot(records: List[Dict], path: str) -> None:
    plt = common.pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    vocab0 = min(r["shape"]["vocab"] for r in records)
    for variant in VARIANTS:
        pts = sorted((r["shape"]["seqlen"], r["peak_mem_bytes"] / 2**30) for r in records
                     if r["impl"] == variant and r["shape"]["vocab"] == vocab0 and "peak_mem_bytes" in r)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=variant)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length L")
    ax.set_ylabel("peak memory of one step (GiB)")
    ax.set_title(f"training step peak memory, vocab {vocab0}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--lengths", default=None, help="comma-separated sequence lengths")
    p.add_argument("--vocabs", default=None, help="comma-separated vocabulary sizes (the first: every variant; "
                                                  "the others: everything on, longest length)")
    p.add_argument("--variants", default=None, help=f"comma-separated, of {','.join(VARIANTS)}")
    p.add_argument("--loss-chunk", type=int, default=None, help="tiled loss chunk in tokens (default: from the budget)")
    p.add_argument("--loss-tile-bytes", type=int, default=None,
                   help=f"tiled loss budget, bytes of fp32 logits per chunk (default {LOSS_TILE_BYTES})")
    p.add_argument("--model", default="mistral-256x4", choices=sorted(MODELS),
                   help="the model's shape (default: hidden 256, 4 layers)")
    p.add_argument("--tied", action="store_true", help="tie the input embedding and the lm_head")
    p.add_argument("--mlp-chunk", type=int, default=None, help=f"tiled MLP chunk (default {MLP_CHUNK})")
    p.add_argument("--toy", action="store_true", help="a tiny model at L=256 (seconds per variant)")
    p.add_argument("--quick", action="store_true", help="accepted for sft-kernels bench; same as the defaults")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per measurement")
    p.add_argument("--out", default=None, help="result folder (default: see common.result_dir)")
    p.add_argument("--from-partial", default=None, metavar="DIR",
                   help="write memory.json, .md and .png in DIR from its memory.partial.jsonl (a run cut off)")
    p.add_argument("--measure-memory", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.measure_memory:
        child_main(json.loads(args.measure_memory))
        return 0
    if args.from_partial:
        with open(os.path.join(args.from_partial, f"{OP}.partial.jsonl")) as f:
            records = [json.loads(line) for line in f if line.strip()]
        args.out = args.from_partial
    else:
        records = run(args)
    env = records[0]["env"] if records else common.environment(args.device)
    out_dir = common.result_dir(args.out, args.device, env)
    common.write_json(dict(env=env, records=records), os.path.join(out_dir, "memory.json"))
    table = summarize(records)
    with open(os.path.join(out_dir, "memory.md"), "w") as f:
        f.write(f"# peak memory of one training step, {env['device_name']}, commit {env['commit']}, {env['date']}\n\n")
        f.write(__doc__.split("\n\n")[1] + "\n\n" + __doc__.split("\n\n")[3] + "\n\n")
        f.write(describe_models(records) + "\n\n")
        f.write(table + "\n")
    plot(records, os.path.join(out_dir, "memory.png"))
    print(table)
    print(f"\nwrote {out_dir}/memory.json, memory.md, memory.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
