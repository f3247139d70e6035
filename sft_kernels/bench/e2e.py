"""End-to-end training step: ``attn_implementation="sft_sliding_window"`` against ``"sdpa"``.

One training step of a small Mistral-architecture model built from a config (random
weights, no download): forward with labels, backward, ``torch.optim.AdamW`` step,
``zero_grad``. One sequence of L tokens per step, with an all-ones ``attention_mask`` as an
SFT batch carries, and the same sliding window for both providers:

  sdpa                transformers' SDPA attention. Mistral's ``config.sliding_window=W`` reaches
                      it as a dense boolean (L x L) band mask built by
                      ``masking_utils.create_sliding_window_causal_mask`` (SDPA cannot skip the
                      mask once L > W), so its attention costs O(L^2) time and memory.
  sft_sliding_window  this package's backend (``sft_kernels.integrations.transformers.register``):
                      the window from the same config field, O(L * W).

The model is the same object class and the same weights for both (same seed); only the
attention implementation differs. Records: ``op="sft_train_step"``, ms (median step time),
tokens_per_s, peak_mem_bytes (GPU: ``max_memory_allocated`` above the model and optimizer
state during a step; CPU: the resident-set growth of one step in a fresh child process,
after one warm-up step), ``speedup_vs = {"baseline": "sdpa", "ratio": sdpa ms / this ms}``.

    python -m sft_kernels.bench.e2e [--quick | --lengths 8192,16384 | --toy] [--device cpu|cuda] [--out DIR]

``--lengths`` picks the sequence lengths (``scripts/gpu_check.sh`` times one); ``--toy`` is a
tiny model at L = 128 that runs every step of the script on CPU in seconds.

CPU: hidden 256, 2 layers, 4 heads of 64 (2 KV heads), window 256, fp32, L = 1k..8k.
GPU: hidden 1024, 4 layers, 16 heads of 64 (4 KV heads), window 4096, bf16, L = 2k..32k.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from . import common  # noqa: E402

OP = "sft_train_step"
BASELINE = "sdpa"
IMPLS = ("sdpa", "sft_sliding_window")

MODEL = {
    "cpu": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=64, window=256, dtype="float32"),
    "cuda": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                 num_key_value_heads=4, head_dim=64, window=4096, dtype="bfloat16"),
}
LENGTHS = {
    ("cpu", False): [1024, 2048, 4096, 8192],
    ("cpu", True): [1024, 4096],
    ("cuda", False): [2048, 4096, 8192, 16384, 32768],
    ("cuda", True): [4096, 16384, 32768],
}
VOCAB = 259


def make_config(shape):
    from transformers import MistralConfig

    return MistralConfig(
        vocab_size=VOCAB, hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
        head_dim=shape["head_dim"], max_position_embeddings=max(shape["seqlen"], 4096),
        sliding_window=shape["window"], tie_word_embeddings=True, use_cache=False, pad_token_id=0,
    )


def setup(impl, shape, device):
    """Model, optimizer and one batch; returns a zero-argument training step."""
    from transformers import AutoModelForCausalLM

    if impl == "sft_sliding_window":
        from sft_kernels.integrations.transformers import register

        register()  # the window comes from config.sliding_window
    dtype = getattr(torch, shape["dtype"])
    torch.manual_seed(0)
    from sft_kernels.train.model import dtype_kwargs

    model = AutoModelForCausalLM.from_config(make_config(shape), attn_implementation=impl,
                                             **dtype_kwargs(dtype)).to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (shape["batch"], shape["seqlen"]), generator=g).to(device)
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)

    def step():
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


TOY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
           head_dim=32, window=32, dtype="float32")


def shapes(device, quick, lengths=None, toy=False):
    m = TOY if toy else MODEL[device]
    for L in lengths or ([128] if toy else LENGTHS[(device, quick)]):
        yield dict(batch=1, seqlen=L, window=m["window"], hidden=m["hidden_size"], intermediate=m["intermediate_size"],
                   layers=m["num_hidden_layers"], heads=m["num_attention_heads"], kv_heads=m["num_key_value_heads"],
                   head_dim=m["head_dim"], dtype=m["dtype"])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer lengths")
    parser.add_argument("--lengths", default=None, help="comma-separated sequence lengths")
    parser.add_argument("--toy", action="store_true", help="tiny model at L=128 (plumbing check, CPU)")
    parser.add_argument("--out", default=None, help="result folder (default: see common.result_dir)")
    parser.add_argument("--no-memory", action="store_true", help="skip the CPU peak-memory child processes")
    parser.add_argument("--measure-memory", nargs=1, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run(args, shape_list=None):
    """Time every (shape, impl); returns records and skipped entries ([] in a memory child)."""
    if args.measure_memory:  # child process: one warm-up step, then measure one step
        impl, shape = json.loads(args.measure_memory[0])

        def make():
            step = setup(impl, shape, "cpu")
            step()
            return step

        common.child_peak_main(make)
        return [], []
    device = args.device
    env = common.environment(device)
    import transformers

    env["transformers"] = transformers.__version__
    records, skipped = [], []
    lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else None
    shape_list = list(shape_list if shape_list is not None else shapes(device, args.quick, lengths, args.toy))
    for n, shape in enumerate(shape_list):
        for impl in IMPLS:
            rec = dict(op=OP, impl=impl, device=device, dtype=shape["dtype"], shape=dict(shape), env=env)
            try:
                step = setup(impl, shape, device)
                rec["ms"] = common.time_ms(step, device)
                if device == "cuda":
                    rec["peak_mem_bytes"] = common.cuda_peak_bytes(step)
                elif not args.no_memory:
                    rec["peak_mem_bytes"] = common.cpu_peak_bytes(__spec__.name,
                                                                  [json.dumps([impl, shape])])
                else:
                    rec["peak_mem_bytes"] = None
                del step
            except Exception as exc:  # noqa: BLE001 - a provider that cannot run is recorded as skipped
                skipped.append(dict(impl=impl, shape=shape, reason=f"{type(exc).__name__}: "
                                                                  f"{str(exc).splitlines()[0][:200]}"))
                if device == "cuda":
                    torch.cuda.empty_cache()
                continue
            rec["tokens_per_s"] = shape["batch"] * shape["seqlen"] / (rec["ms"] / 1e3)
            records.append(rec)
            common.append_partial(args.out, "e2e", rec)
            mem = rec.get("peak_mem_bytes")
            common.progress(f"[{n + 1}/{len(shape_list)}] L={shape['seqlen']:6d} w={shape['window']} {impl:20s} "
                            f"{rec['ms']:10.1f} ms  {rec['tokens_per_s']:9.0f} tok/s  "
                            + ("" if mem is None else f"{mem / 2**20:8.0f} MiB"))
    for rec in records:
        base = next((r for r in records if r["impl"] == BASELINE and r["shape"] == rec["shape"]), None)
        rec["speedup_vs"] = {"baseline": BASELINE, "ratio": base["ms"] / rec["ms"] if base else None}
    return records, skipped


def summarize(records):
    rows = []
    for r in records:
        mem = r.get("peak_mem_bytes")
        rows.append(dict(L=r["shape"]["seqlen"], window=r["shape"]["window"], impl=r["impl"], ms=r["ms"],
                         tokens_per_s=r["tokens_per_s"], speedup=r["speedup_vs"]["ratio"],
                         peak_mem_mib=None if mem is None else mem / 2**20))
    f = lambda x: "" if x is None else f"{x:.2f}"  # noqa: E731
    return common.markdown_table(rows, ["L", "window", "impl", "ms", "tokens_per_s", "speedup", "peak_mem_mib"],
                                 {"ms": lambda x: f"{x:.1f}", "tokens_per_s": lambda x: f"{x:,.0f}", "speedup": f,
                                  "peak_mem_mib": lambda x: "" if x is None else f"{x:.0f}"})


def main(argv=None, shape_list=None):
    args = parse_args(argv)
    records, skipped = run(args, shape_list)
    if args.measure_memory:
        return 0
    env = records[0]["env"] if records else common.environment(args.device)
    out_dir = common.result_dir(args.out, args.device, env)
    common.write_json(dict(env=env, records=records, skipped=skipped), os.path.join(out_dir, "e2e.json"))
    table = summarize(records)
    m = TOY if args.toy else MODEL[args.device]
    with open(os.path.join(out_dir, "e2e.md"), "w") as f:
        f.write(f"# end-to-end training step, {env['device_name']}, commit {env['commit']}, {env['date']}\n\n")
        f.write(f"torch {env['torch']}, transformers {env.get('transformers')}, {env['cpu_threads']} CPU threads. "
                f"Mistral-architecture model from a config: hidden {m['hidden_size']}, {m['num_hidden_layers']} layers, "
                f"{m['num_attention_heads']} heads of {m['head_dim']} ({m['num_key_value_heads']} KV heads), "
                f"{m['dtype']}, batch 1, sliding window {m['window']} for both. One step = forward with labels, "
                "backward, AdamW step. speedup = sdpa time / this time. Peak memory: "
                + ("max_memory_allocated above the resident model and optimizer state." if args.device == "cuda" else
                   "resident-set growth of one step (after a warm-up step) in a fresh process.") + "\n\n")
        f.write(table + "\n")
        if skipped:
            f.write("\n## Skipped\n\n" + "".join(f"- {s['impl']} L={s['shape']['seqlen']}: {s['reason']}\n"
                                                 for s in skipped))
    print(table)
    print(f"\nwrote {out_dir}/e2e.json and e2e.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
