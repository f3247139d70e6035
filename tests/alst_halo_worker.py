"""One rank of tests/test_alst_halo.py (2 processes, gloo): DeepSpeed's
``UlyssesSPDataLoaderAdapter`` shards the batches, and the halo exchange (not ALST's Ulysses)
runs the attention: ``register(context_parallel_group=<DeepSpeed's sequence-parallel group>,
context_parallel_packed=...)``.

Each rank's DataLoader yields its own rows; the adapter gathers one batch from every rank and
hands each rank its block of each, with the global position_ids (restarting per sequence for
packed rows) and ``shift_labels``. Oracle: this process on each whole batch with the same backend
and no parallelism. Prints ``RESULT {json}``: per micro-batch relative errors of the loss and of
the all-reduced gradients.

argv: kind (plain | packed), the window of the parallel run's model (5 = the oracle's; 4 = the control)
"""

import json
import sys

import torch
import torch.nn.functional as F

import deepspeed

deepspeed.init_distributed(dist_backend="gloo")
import deepspeed.comm as ds_dist  # noqa: E402
import torch.distributed as dist  # noqa: E402
from deepspeed.runtime.sequence_parallel import parallel_state_sp as mpu  # noqa: E402
from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPDataLoaderAdapter  # noqa: E402

torch.set_num_threads(1)
from transformers import AutoModelForCausalLM, MistralConfig  # noqa: E402

from sft_kernels.integrations import transformers as sft_hf  # noqa: E402

KIND, WINDOW = sys.argv[1], int(sys.argv[2])
RANK, WORLD = dist.get_rank(), dist.get_world_size()
L, VOCAB, B = 24, 61, 2
mpu.initialize_sequence_parallel(sequence_parallel_size=WORLD)
group = mpu.get_sequence_parallel_group()


def rows(seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (B, L), generator=g)
    if KIND == "packed":
        pos = torch.stack([torch.cat([torch.arange(m) for m in lens]) for lens in ([5, 11, 8], [2, 19, 3])])
    else:
        pos = torch.arange(L).expand(B, L).clone()
    labels = ids.clone()
    labels[pos == 0] = -100  # the model predicts no sequence's first token from the previous one
    return {"input_ids": ids, "position_ids": pos, "labels": labels}


def build(window=5):
    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                        attention_dropout=0.0, use_cache=False, pad_token_id=0, sliding_window=window)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sft_sliding_window").double()


def rel(a, b):
    d, n = float((a - b).norm()), float(b.norm())
    return d / n if n > 0 else d


batches = [rows(100 * RANK + i) for i in range(2)]  # this rank's DataLoader: its own rows
loader = torch.utils.data.DataLoader(batches, batch_size=None)
all_batches = [rows(100 * r + i) for i in range(2) for r in range(WORLD)]  # the order the adapter serves them

sft_hf.register()
oracle = []
for bt in all_batches:
    m = build()
    logits = m(input_ids=bt["input_ids"], position_ids=bt["position_ids"]).logits
    shifted = F.pad(bt["labels"], (0, 1), value=-100)[:, 1:]
    loss = F.cross_entropy(logits.flatten(0, 1), shifted.flatten(), ignore_index=-100, reduction="sum")
    loss = loss / (shifted != -100).sum()
    loss.backward()
    oracle.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))

sft_hf.register(context_parallel_group=group, context_parallel_packed=(KIND == "packed"))
adapter = UlyssesSPDataLoaderAdapter(loader, sp_rank=mpu.get_sequence_parallel_rank(), sp_group=group,
                                     sp_world_size=WORLD, device=torch.device("cpu"))
errs = []
for step, mb in enumerate(adapter):
    m = build(WINDOW)
    logits = m(input_ids=mb["input_ids"], position_ids=mb["position_ids"]).logits
    count = (mb["shift_labels"] != -100).sum()
    total_count = count.clone()
    dist.all_reduce(total_count, group=group)
    loss = F.cross_entropy(logits.flatten(0, 1), mb["shift_labels"].flatten(), ignore_index=-100,
                           reduction="sum") / total_count
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total, group=group)
    grads = {}
    for n, p in m.named_parameters():
        g = p.grad.clone()
        dist.all_reduce(g, group=group)
        grads[n] = g
    ref_loss, ref_grads = oracle[step]
    errs.append({"loss": rel(total, ref_loss), "grads_max": max(rel(grads[n], ref_grads[n]) for n in ref_grads)})
print("RESULT " + json.dumps({"steps": errs, "position_ids_0": mb["position_ids"][0].tolist()}), flush=True)
ds_dist.barrier()
from sft_kernels.train.loop import exit_process  # noqa: E402

exit_process(0)
