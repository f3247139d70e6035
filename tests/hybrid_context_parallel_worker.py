"""One rank of tests/test_hybrid_context_parallel.py (P gloo processes): a hybrid Qwen2 (sliding
and full-attention layers alternating, ``layer_types``) with ``register(context_parallel_group=...)``,
each layer through the halo or DeepSpeed's Ulysses (``set_context_parallel_exchange``: "auto" =
the cheaper per layer, "halo", "ulysses").

Every rank builds the same tiny float64 model from a config (same seed), runs its block of each row
forward and backward, and compares with the oracle: the same model and backend run by this process
alone on the whole batch (no torch.distributed involved). Loss: the shard's token-loss sum over the
label tokens of the whole batch (the group's sum is the batch mean); parameter gradients summed over
the group. The bytes this rank hands to the network during the forward and backward are counted on
the torch.distributed calls (wrapped here) and written beside each layer call's recorded choice and
modelled bytes. Writes ``rank<r>.json``.

argv: out_dir
"""

import json
import os
import sys

import torch
import torch.nn.functional as F

import deepspeed

deepspeed.init_distributed(dist_backend="gloo")
import torch.distributed as dist  # noqa: E402

torch.set_num_threads(1)
from helpers import summed_over_ranks  # noqa: E402  (tests/, this script's folder)
from transformers import AutoModelForCausalLM, Qwen2Config  # noqa: E402

from sft_kernels.integrations import transformers as sft_hf  # noqa: E402
from sft_kernels.integrations.transformers.context_parallel import (record_exchanges,  # noqa: E402
                                                                   set_context_parallel_exchange)

RANK, WORLD = dist.get_rank(), dist.get_world_size()
out_dir = sys.argv[1]
VOCAB, N, WINDOW = 61, 6 if WORLD > 2 else 12, 5
L = N * WORLD
LAYERS = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
# P = 6: MHA (6 heads of 4), where Ulysses sends less than a full layer's halo; P = 2: MQA (4 query
# heads, 1 KV head, which DeepSpeed replicates to 2), where the halo is always the cheaper
HEADS, KV_HEADS, HEAD_DIM = (6, 6, 4) if WORLD > 2 else (4, 1, 8)
PACKED = {2: [[5, 11, 8], [2, 19, 3]], 6: [[5, 13, 18], [20, 3, 13]]}[WORLD]  # sequence lengths per packed row


# ----------------------------------------------------------------------------- bytes on the wire
class Counter:
    """Bytes this rank sends: isend tensors; all_to_all_single (P-1)/P of its input; all_gather
    its input to each other rank. DeepSpeed calls these with keywords, the halo positionally."""

    def __init__(self):
        self.bytes = 0
        orig = {n: getattr(dist, n) for n in ("batch_isend_irecv", "all_to_all_single", "all_gather",
                                             "all_gather_into_tensor", "all_reduce", "reduce_scatter_tensor")}

        def nb(t):
            return t.numel() * t.element_size()

        def batch_isend_irecv(ops):
            self.bytes += sum(nb(op.tensor) for op in ops if op.op is dist.isend)
            return orig["batch_isend_irecv"](ops)

        def all_to_all_single(*a, **k):
            inp = k["input"] if "input" in k else a[1]
            self.bytes += nb(inp) * (WORLD - 1) // WORLD
            return orig["all_to_all_single"](*a, **k)

        def all_gather(*a, **k):
            inp = k["tensor"] if "tensor" in k else a[1]
            self.bytes += nb(inp) * (WORLD - 1)
            return orig["all_gather"](*a, **k)

        def refused(name):
            def call(*a, **k):
                raise AssertionError(f"{name} is not expected inside the model's forward/backward")
            return call

        self.orig = orig
        self.fns = dict(batch_isend_irecv=batch_isend_irecv, all_to_all_single=all_to_all_single,
                        all_gather=all_gather, all_gather_into_tensor=refused("all_gather_into_tensor"),
                        reduce_scatter_tensor=refused("reduce_scatter_tensor"), all_reduce=refused("all_reduce"))

    def __enter__(self):
        for n, f in self.fns.items():
            setattr(dist, n, f)
        return self

    def __exit__(self, *exc):
        for n, f in self.orig.items():
            setattr(dist, n, f)


# ----------------------------------------------------------------------------- model and data
def build(window=WINDOW):
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=HEADS * HEAD_DIM, intermediate_size=40, num_hidden_layers=4,
                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                      max_position_embeddings=256, attention_dropout=0.0, use_cache=False, pad_token_id=0,
                      use_sliding_window=True, sliding_window=window, layer_types=LAYERS)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sft_sliding_window").double()


def batch(kind, seed=1):
    g = torch.Generator().manual_seed(seed)
    if kind == "packed":
        ids = torch.randint(1, VOCAB, (2, L), generator=g)
        pos = torch.stack([torch.cat([torch.arange(m) for m in lens]) for lens in PACKED])
        labels = ids.clone()
        labels[pos == 0] = -100  # no sequence's first token is predicted from the previous sequence
        shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
        return {"input_ids": ids, "position_ids": pos}, shifted
    lengths = [L, L] if kind == "unpadded" else [L, L - 7, 5]  # row 2: padding from the first shard on
    ids = torch.randint(1, VOCAB, (len(lengths), L), generator=g)
    mask = (torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]).long()
    ids = ids * mask
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]  # shifted BEFORE sharding
    inputs = {"input_ids": ids, "position_ids": torch.arange(L).expand(len(lengths), L).clone()}
    if kind == "padded":
        inputs["attention_mask"] = mask
    return inputs, shifted


def loss_of(logits, shifted, count):
    return F.cross_entropy(logits.flatten(0, 1), shifted.flatten(), ignore_index=-100, reduction="sum") / count


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    d, n = float((a - b).norm()), float(b.norm())
    return d / n if n > 0 else d


# ----------------------------------------------------------------------------- oracle: one process
KINDS = ("unpadded", "padded", "packed")
sft_hf.register()
oracle = {}
for kind in KINDS:
    inputs, shifted = batch(kind)
    m = build()
    logits = m(**inputs).logits
    loss = loss_of(logits, shifted, (shifted != -100).sum())
    loss.backward()
    oracle[kind] = (logits.detach(), loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()})


def parallel(kind, policy, window=WINDOW):
    """Forward + backward of this rank's block; -> errors against the oracle, counted bytes, layer log."""
    sft_hf.register(context_parallel_group=dist.group.WORLD, context_parallel_packed=(kind == "packed"),
                    context_parallel_exchange=policy)
    inputs, shifted = batch(kind)
    sl = slice(RANK * N, (RANK + 1) * N)
    shard = {k: v[:, sl].contiguous() for k, v in inputs.items()}
    m = build(window)
    with record_exchanges() as log, Counter() as counter:
        logits = m(**shard).logits
        loss = loss_of(logits, shifted[:, sl], (shifted != -100).sum())
        loss.backward()
    total, grads = summed_over_ranks(loss, m)
    ref_logits, ref_loss, ref_grads = oracle[kind]
    pad = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"]))[:, sl].bool()
    errs = {"logits": rel(logits[pad], ref_logits[:, sl][pad]), "loss": rel(total, ref_loss),
            "grads_max": max(rel(grads[n], ref_grads[n]) for n in ref_grads)}
    return {"errors": errs, "bytes": counter.bytes, "layers": log}


results = {f"{kind}-{policy}": parallel(kind, policy) for kind in KINDS for policy in ("auto", "halo", "ulysses")}
controls = {"window-off-by-one-" + kind: parallel(kind, "auto", WINDOW - 1)["errors"] for kind in ("unpadded", "packed")}
set_context_parallel_exchange("auto")
info = {"world": WORLD, "n": N, "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "layer_types": LAYERS}
with open(os.path.join(out_dir, f"rank{RANK}.json"), "w") as f:
    json.dump({"info": info, "results": results, "controls": controls}, f)
dist.barrier()
from sft_kernels.train.loop import exit_process  # noqa: E402

exit_process(0)
