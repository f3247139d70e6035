"""One rank of tests/test_alst.py (2 processes, gloo): DeepSpeed's ALST
(``UlyssesSPAttentionHF.register_with_transformers``) with ``core_attn_implementation=
"sft_sliding_window"`` through :func:`sft_kernels.parallel.alst.register_alst`.

Every rank first runs the oracle alone: the same float64 model (same seed) with this package's
attention on one process, on each whole batch (no DeepSpeed, no torch.distributed). Then ALST is
registered and every rank feeds its half of each row (global position_ids, its slice of the 2D
mask). Loss: the sum of the shard's token losses over the whole batch's label count (so the sum
over ranks is the whole-batch mean); parameter gradients all-reduced (summed). Writes relative
errors, controls and a short fp32 training run's losses to ``rank<r>.json``.

argv: out_dir
"""

import json
import os
import sys

import torch
import torch.nn.functional as F

import deepspeed  # noqa: E402
import deepspeed.comm as ds_dist  # noqa: E402

deepspeed.init_distributed(dist_backend="gloo")
import torch.distributed as dist  # noqa: E402

RANK, WORLD = dist.get_rank(), dist.get_world_size()
torch.set_num_threads(1)

from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig  # noqa: E402
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: E402

from sft_kernels.integrations import transformers as sft_hf  # noqa: E402
from sft_kernels.parallel.alst import register_alst  # noqa: E402

from helpers import summed_over_ranks  # noqa: E402  (tests/, this script's folder)

NAME = sft_hf.register()
out_dir = sys.argv[1]
B, L, VOCAB = 3, 24, 61
N = L // WORLD
LO, HI = RANK * N, (RANK + 1) * N


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    d, n = float((a - b).norm()), float(b.norm())
    return d / n if n > 0 else d


def build(kind, window, dtype=torch.float64):
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=256, attention_dropout=0.0,
                  use_cache=False, pad_token_id=0)
    cfg = MistralConfig(sliding_window=window, **common) if kind == "mistral" else LlamaConfig(**common)
    torch.manual_seed(0)  # the same weights in every model and on every rank
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=NAME).to(dtype)


def rows_of(lengths):
    """Packed rows: position_ids restarting at each sequence of ``lengths`` (per row, summing to L)."""
    return torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])


def batch(kind, seed=1):
    """(input_ids, attention_mask or None, position_ids, shifted labels) of a whole batch."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (B, L), generator=g)
    pos = torch.arange(L).expand(B, L).clone()
    mask = None
    if kind == "right-padded":  # row 1's padding starts in the last shard; row 2's last shard is all padding
        mask = (torch.arange(L)[None, :] < torch.tensor([24, 17, 9])[:, None]).long()
    elif kind == "left-padded":  # row 1's first shard is all padding; row 2's padding ends in the first
        mask = (torch.arange(L)[None, :] >= torch.tensor([0, 13, 5])[:, None]).long()
    elif kind == "packed":  # sequences inside a shard, across the boundary (12), one whole row
        pos = rows_of([[5, 4, 9, 6], [24], [12, 12]])
    labels = ids.clone() if mask is None else torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    if mask is not None:
        ids = ids * mask
    shifted = torch.full_like(labels, -100)
    shifted[:, :-1] = labels[:, 1:]
    shifted[:, :-1][pos[:, 1:] == 0] = -100  # no label across a packed boundary
    return ids, mask, pos, shifted


def loss_of(logits, shifted, count):
    return F.cross_entropy(logits.flatten(0, 1).float() if logits.dtype == torch.float32 else logits.flatten(0, 1),
                           shifted.flatten(), ignore_index=-100, reduction="sum") / count


def whole(model, ids, mask, pos, shifted):
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    loss = loss_of(logits, shifted, (shifted != -100).sum())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return logits.detach(), loss.detach(), grads


def sharded(model, ids, mask, pos, shifted, **extra):
    m = None if mask is None else mask[:, LO:HI]
    logits = model(input_ids=ids[:, LO:HI], attention_mask=m, position_ids=pos[:, LO:HI], **extra).logits
    loss = loss_of(logits, shifted[:, LO:HI], (shifted != -100).sum())
    loss.backward()
    total, grads = summed_over_ranks(loss, model)
    model.zero_grad()
    return logits.detach(), total, grads


def errors(ref, got):
    (rl, rloss, rg), (gl, gloss, gg) = ref, got
    return {"logits": rel(gl, rl[:, LO:HI]), "loss": rel(gloss, rloss),
            "grads_max": max(rel(gg[n], rg[n]) for n in rg)}


CASES = {  # name: (model kind, window, registered window, batch kind)
    "mistral-w5-unpadded": ("mistral", 5, None, "unpadded"),
    "mistral-w5-right-padded": ("mistral", 5, None, "right-padded"),
    "mistral-w5-left-padded": ("mistral", 5, None, "left-padded"),
    "mistral-w5-packed": ("mistral", 5, None, "packed"),
    "mistral-w20-packed": ("mistral", 20, None, "packed"),
    "llama-sqrt-packed": ("llama", None, "sqrt", "packed"),  # floor(sqrt(n)) per packed sequence
    "llama-sqrt-right-padded": ("llama", None, "sqrt", "right-padded"),
}
STEPS = 4


def train(model, step_fn):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for step in range(STEPS):
        ids, mask, pos, shifted = batch(["packed", "right-padded", "left-padded", "unpadded"][step], seed=10 + step)
        losses.append(step_fn(model, ids, mask, pos, shifted))
        opt.step()
        opt.zero_grad()
    return losses


def train_whole(model, ids, mask, pos, shifted):
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    loss = loss_of(logits, shifted, (shifted != -100).sum())
    loss.backward()
    return float(loss)


def train_sharded(model, ids, mask, pos, shifted):
    m = None if mask is None else mask[:, LO:HI]
    logits = model(input_ids=ids[:, LO:HI], attention_mask=m, position_ids=pos[:, LO:HI]).logits
    loss = loss_of(logits, shifted[:, LO:HI], (shifted != -100).sum())
    loss.backward()
    for p in model.parameters():
        dist.all_reduce(p.grad)
    total = loss.detach().clone()
    dist.all_reduce(total)
    return float(total)


# ------------------------------------------------------------------ oracles: one process, whole batches
oracle = {}
for name, (kind, window, registered, bkind) in CASES.items():
    sft_hf.register(window_size=registered)
    oracle[name] = whole(build(kind, window), *batch(bkind))
sft_hf.register()
oracle_w4 = {b: whole(build("mistral", 4), *batch(b)) for b in ("unpadded", "packed")}
train_one = train(build("mistral", 5, torch.float32), train_whole)

# ------------------------------------------------------------------ ALST
model = build("mistral", 5)
mpu = register_alst(model, sequence_parallel_size=WORLD, micro_batch_size=B)
entry = ALL_ATTENTION_FUNCTIONS[NAME]
results, controls = {}, {}
for name, (kind, window, registered, bkind) in CASES.items():
    sft_hf.register(window_size=registered)  # the core's settings; ALST's entry stays in front
    results[name] = errors(oracle[name], sharded(build(kind, window), *batch(bkind)))
sft_hf.register()

# local cu_seq_lens (a flattening collator's, of this shard) reach ALST's wrapper: dropped
ids, mask, pos, shifted = batch("packed")
local = pos[:, LO:HI].reshape(-1)
starts = torch.nonzero(local == 0).flatten()
if starts.numel() == 0 or starts[0] != 0:
    starts = torch.cat([torch.zeros(1, dtype=starts.dtype), starts])
cu = torch.cat([starts, torch.tensor([local.numel()])]).to(torch.int32)
extra = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=int(cu.diff().max()), max_length_k=int(cu.diff().max()))
results["mistral-w5-packed-local-cu-seq-lens"] = errors(oracle["mistral-w5-packed"],
                                                        sharded(build("mistral", 5), ids, mask, pos, shifted, **extra))

# ------------------------------------------------------------------ controls: the comparison must fail
for b in ("unpadded", "packed"):  # a window one key narrower
    controls[f"window-off-by-one-{b}"] = errors(oracle[f"mistral-w5-{b}"],
                                                sharded(build("mistral", 4), *batch(b)))
ALL_ATTENTION_FUNCTIONS[NAME] = entry.ulysses  # ALST's own entry: the padding mask is dropped
controls["alst-alone-left-padded"] = errors(oracle["mistral-w5-left-padded"],
                                            sharded(build("mistral", 5), *batch("left-padded")))
controls["alst-alone-right-padded"] = errors(oracle["mistral-w5-right-padded"],
                                             sharded(build("mistral", 5), *batch("right-padded")))
try:  # the shard's cu_seq_lens on the gathered sequence: the op refuses them (they count B*L/P tokens)
    sharded(build("mistral", 5), ids, mask, pos, shifted, **extra)
    controls["alst-alone-local-cu-seq-lens"] = None
except ValueError as e:
    controls["alst-alone-local-cu-seq-lens"] = str(e)
ALL_ATTENTION_FUNCTIONS[NAME] = entry
controls["oracle-window-off-by-one"] = {b: rel(oracle_w4[b][1], oracle[f"mistral-w5-{b}"][1])
                                        for b in oracle_w4}

train_alst = train(build("mistral", 5, torch.float32), train_sharded)

# ------------------------------------------------------------------ bytes this rank sends, counted on the calls
sent = {"all_to_all_single": 0, "all_gather": 0}
real_a2a, real_gather = ds_dist.all_to_all_single, ds_dist.all_gather


def counted_a2a(output, tensor, *args, **kwargs):
    sent["all_to_all_single"] += tensor.numel() * tensor.element_size() * (WORLD - 1) // WORLD
    return real_a2a(output, tensor, *args, **kwargs)


def counted_gather(tensor_list, tensor, *args, **kwargs):
    sent["all_gather"] += tensor.numel() * tensor.element_size() * (WORLD - 1)
    return real_gather(tensor_list, tensor, *args, **kwargs)


ds_dist.all_to_all_single, ds_dist.all_gather = counted_a2a, counted_gather
model = build("mistral", 5)
ids, mask, pos, shifted = batch("packed")
loss = loss_of(model(input_ids=ids[:, LO:HI], position_ids=pos[:, LO:HI]).logits, shifted[:, LO:HI], 1)
loss.backward()
ds_dist.all_to_all_single, ds_dist.all_gather = real_a2a, real_gather

with open(os.path.join(out_dir, f"rank{RANK}.json"), "w") as f:
    json.dump({"results": results, "controls": controls, "train_one": train_one, "train_alst": train_alst, "sent": sent,
               "sp_world": mpu.get_sequence_parallel_world_size()}, f, indent=1)
ds_dist.barrier()
from sft_kernels.train.loop import exit_process  # noqa: E402

exit_process(0)
