"""Stand-in for DeepSpeed-Chat's step-1 main.py (see ../../README.md): same structure, tiny data."""
import argparse
import json

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, default_data_collator, get_scheduler
from transformers.integrations.deepspeed import HfDeepSpeedConfig

from dschat.utils import print_rank_0, to_device


def parse_args():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data_path", required=True)
    parser.add_argument("--model_name_or_path", required=True)
    parser.add_argument("--per_device_train_batch_size", type=int, default=2)
    parser.add_argument("--max_seq_len", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--num_train_epochs", type=int, default=1)
    parser.add_argument("--max_steps", type=int, default=3)
    parser.add_argument("--zero_stage", type=int, default=0)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--local_rank", type=int, default=-1)
    parser = deepspeed.add_config_arguments(parser)
    return parser.parse_args()


class SFTData(Dataset):
    def __init__(self, path, tokenizer, max_seq_len):
        self.rows = []
        for line in open(path):
            row = json.loads(line)
            tok = tokenizer(" " + row["prompt"] + " " + row["chosen"] + tokenizer.eos_token, max_length=max_seq_len,
                            padding="max_length", truncation=True, return_tensors="pt")
            ids, mask = tok["input_ids"].squeeze(0), tok["attention_mask"].squeeze(0)
            self.rows.append({"input_ids": ids, "attention_mask": mask, "labels": torch.where(mask.bool(), ids, -100)})

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def main():
    args = parse_args()
    if args.local_rank == -1:
        device = torch.device(get_accelerator().device_name())
    else:
        get_accelerator().set_device(args.local_rank)
        device = torch.device(get_accelerator().device_name(), args.local_rank)
        deepspeed.init_distributed()
    rank = torch.distributed.get_rank()
    world = torch.distributed.get_world_size()
    ds_config = {"train_micro_batch_size_per_gpu": args.per_device_train_batch_size,
                 "train_batch_size": args.per_device_train_batch_size * world,
                 "zero_optimization": {"stage": args.zero_stage}, "gradient_clipping": 1.0,
                 "steps_per_print": 10 ** 9}
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    tokenizer.pad_token = tokenizer.eos_token
    dschf = HfDeepSpeedConfig(ds_config) if args.zero_stage == 3 else None  # noqa: F841 (kept alive)
    config = AutoConfig.from_pretrained(args.model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, config=config)
    print_rank_0(f"attn_implementation {model.config._attn_implementation}", rank)
    partitioned = any(hasattr(p, "ds_id") for p in model.parameters())
    print_rank_0(f"partitioned at load {partitioned}", rank)

    data = SFTData(args.data_path, tokenizer, args.max_seq_len)
    loader = DataLoader(data, collate_fn=default_data_collator, sampler=DistributedSampler(data, shuffle=False),
                        batch_size=args.per_device_train_batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, betas=(0.9, 0.95))
    scheduler = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=0,
                              num_training_steps=args.num_train_epochs * len(loader))
    model, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, args=args, config=ds_config,
                                                          lr_scheduler=scheduler, dist_init_required=True)
    model.train()
    for step, batch in enumerate(loader):
        if step >= args.max_steps:
            break
        batch = to_device(batch, device)
        loss = model(**batch, use_cache=False).loss
        model.backward(loss)
        model.step()
        print(f"rank {rank} step {step} loss {loss.item():.8f}", flush=True)
    print(f"rank {rank} done", flush=True)  # DeepSpeed-Chat's script leaves the process group up


if __name__ == "__main__":
    main()
