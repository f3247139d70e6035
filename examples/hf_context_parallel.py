"""A Hugging Face model trained with halo context parallelism: every rank of the group holds one
block of consecutive tokens of each sequence.

    torchrun --nproc_per_node 4 examples/hf_context_parallel.py --model DIR --seqlen 65536
    torchrun --nproc_per_node 2 examples/hf_context_parallel.py --device cpu            # tiny Mistral, gloo

Per rank: shift the labels over the WHOLE sequence, then take block ``r`` of input_ids,
attention_mask (right padding only), labels and the GLOBAL position_ids; the loss is the sum of
the block's token losses over the label tokens of the whole batch (so the sum over ranks is the
usual mean); the parameters are replicated, so their gradients are summed over the group (a
DeepSpeed engine does that given the groups, as ``sft-kernels train --context_parallel_size``
does). Prints the whole batch's loss at each step.
"""

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, MistralConfig

from sft_kernels.integrations.transformers import register

p = argparse.ArgumentParser()
p.add_argument("--model", default=None, help="a local Hugging Face model directory (default: a tiny Mistral)")
p.add_argument("--seqlen", type=int, default=256, help="tokens per sequence (padded to a multiple of the ranks)")
p.add_argument("--batch", type=int, default=2)
p.add_argument("--steps", type=int, default=5)
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
args = p.parse_args()

if args.device == "cuda":
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
rank, world = dist.get_rank(), dist.get_world_size()
group = dist.group.WORLD  # one sequence over all ranks; see context_parallel_groups for data x context

register(context_parallel_group=group)  # before the model is built: the name must exist
torch.manual_seed(0)  # the same weights on every rank
if args.model:
    model = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="sft_sliding_window",
                                                 dtype=torch.bfloat16 if args.device == "cuda" else torch.float32)
else:
    config = MistralConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=32,
                           use_cache=False)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sft_sliding_window")
model.to(args.device).train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

L = world * -(-args.seqlen // world)
n = L // world
cols = slice(rank * n, (rank + 1) * n)
g = torch.Generator().manual_seed(1)  # the same batch on every rank
vocab = model.config.vocab_size
for step in range(args.steps):
    ids = torch.randint(0, vocab, (args.batch, L), generator=g).to(args.device)
    lengths = torch.randint(L // 2, L + 1, (args.batch,), generator=g).to(args.device)
    mask = (torch.arange(L, device=args.device)[None] < lengths[:, None]).long()  # right padding
    labels = torch.where(mask.bool(), ids, -100)
    shifted = torch.full_like(labels, -100)
    shifted[:, :-1] = labels[:, 1:]  # before slicing: a block's last token is labelled by the next block
    pos = torch.arange(rank * n, (rank + 1) * n, device=args.device).expand(args.batch, n)
    logits = model(input_ids=ids[:, cols], attention_mask=mask[:, cols], position_ids=pos).logits
    loss = F.cross_entropy(logits.float().flatten(0, 1), shifted[:, cols].flatten(), ignore_index=-100,
                           reduction="sum") / (shifted != -100).sum()
    loss.backward()
    for prm in model.parameters():
        dist.all_reduce(prm.grad, group=group)  # replicated parameters: sum over the blocks
    opt.step()
    opt.zero_grad()
    total = loss.detach().clone()
    dist.all_reduce(total, group=group)
    if rank == 0:
        print(f"step {step} loss {total.item():.6f}", flush=True)

from sft_kernels.train.loop import exit_process  # noqa: E402

exit_process(0)  # barrier, end the process group, skip the interpreter's teardown (gloo can abort in it)
