"""Prompt/response data for step-1 SFT: JSON lines, tokenisation, split, batches.

One example is ``bos + prompt + response + eos``; the labels are the input ids with
``-100`` on bos, the prompt and padding, so the loss (Hugging Face shifts labels by one)
covers the response and its eos only. Batches are right-padded to their longest example.

Batch order is a pure function of ``(seed, epoch, rank)``: micro-batch ``i`` of epoch ``e``
is the same in every run, which is what lets a resumed run skip exactly the micro-batches
the checkpoint already consumed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, Iterator, List, Sequence, Tuple

import torch

IGNORE_INDEX = -100


def default_data_path() -> str:
    """The shipped ``sft_kernels/data/sft_tiny.jsonl``."""
    from importlib.resources import files

    return str(files("sft_kernels").joinpath("data", "sft_tiny.jsonl"))


def load_jsonl(path: str) -> List[Dict[str, str]]:
    if not os.path.exists(path):
        raise ValueError(f"--data_path: {path!r} does not exist")
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"--data_path {path}:{n}: not JSON ({exc})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not isinstance(
                    row.get("response"), str):
                raise ValueError(f"--data_path {path}:{n}: need an object with string 'prompt' and 'response'")
            rows.append(row)
    if not rows:
        raise ValueError(f"--data_path {path}: no examples")
    return rows


@dataclass
class Example:
    input_ids: List[int]
    labels: List[int]


def encode(row: Dict[str, str], tokenizer, max_seq_len: int) -> Example:
    """``bos + prompt + response + eos``, truncated to ``max_seq_len`` tokens; prompt labels -100."""
    prompt = tokenizer.encode(row["prompt"], add_special_tokens=True)  # with bos when the tokenizer has one
    response = tokenizer.encode(row["response"]) + [tokenizer.eos_token_id]
    ids = (prompt + response)[:max_seq_len]
    labels = ([IGNORE_INDEX] * len(prompt) + response)[:max_seq_len]
    return Example(ids, labels)


def encode_all(rows: Sequence[Dict[str, str]], tokenizer, max_seq_len: int) -> Tuple[List[Example], int]:
    """Encoded examples, and how many were dropped because truncation left no response token."""
    out, dropped = [], 0
    for row in rows:
        ex = encode(row, tokenizer, max_seq_len)
        if all(lab == IGNORE_INDEX for lab in ex.labels):
            dropped += 1
            continue
        out.append(ex)
    return out, dropped


def split(examples: List[Example], eval_fraction: float, seed: int) -> Tuple[List[Example], List[Example]]:
    """A seeded shuffle, then the first ``eval_fraction`` (at least one example) for evaluation."""
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"--eval_fraction must be in (0, 1), got {eval_fraction}")
    if len(examples) < 2:
        raise ValueError(f"need at least 2 examples for a train/eval split, got {len(examples)}")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(examples), generator=g).tolist()
    n_eval = min(len(examples) - 1, max(1, round(eval_fraction * len(examples))))
    return [examples[i] for i in order[n_eval:]], [examples[i] for i in order[:n_eval]]


def collate(batch: Sequence[Example], pad_id: int) -> Dict[str, torch.Tensor]:
    """Right-pad to the longest example: ``input_ids`` (pad_id), ``attention_mask`` (0 on padding),
    ``labels`` (-100 on padding)."""
    length = max(len(ex.input_ids) for ex in batch)
    ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    for i, ex in enumerate(batch):
        n = len(ex.input_ids)
        ids[i, :n] = torch.tensor(ex.input_ids)
        labels[i, :n] = torch.tensor(ex.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class TrainBatches:
    """Micro-batches for one rank, epoch by epoch, deterministic in ``(seed, epoch)``.

    Each epoch is a seeded permutation of the training set split round-robin across ranks;
    the micro-batch count per epoch is rounded down to a multiple of the gradient
    accumulation steps, so an optimizer step never straddles two epochs (the few examples
    left over are different ones each epoch).
    """

    def __init__(self, examples: List[Example], batch_size: int, grad_accum: int, seed: int, rank: int = 0,
                 world_size: int = 1, pad_id: int = 0):
        self.examples, self.batch_size, self.grad_accum = examples, batch_size, grad_accum
        self.seed, self.rank, self.world_size, self.pad_id = seed, rank, world_size, pad_id
        micro = len(examples) // (batch_size * world_size)
        self.micro_per_epoch = micro - micro % grad_accum
        if self.micro_per_epoch == 0:
            raise ValueError(
                f"{len(examples)} training examples are too few for per_device_train_batch_size={batch_size} x "
                f"gradient_accumulation_steps={grad_accum} x world_size={world_size}")

    @property
    def steps_per_epoch(self) -> int:
        return self.micro_per_epoch // self.grad_accum

    def epoch(self, epoch: int, start_micro: int = 0) -> Iterator[Dict[str, torch.Tensor]]:
        g = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
        order = torch.randperm(len(self.examples), generator=g).tolist()
        mine = order[self.rank::self.world_size]
        for i in range(start_micro, self.micro_per_epoch):
            chunk = mine[i * self.batch_size:(i + 1) * self.batch_size]
            yield collate([self.examples[j] for j in chunk], self.pad_id)


def eval_batches(examples: List[Example], batch_size: int, rank: int, world_size: int, pad_id: int):
    mine = examples[rank::world_size]
    for i in range(0, len(mine), batch_size):
        yield collate(mine[i:i + batch_size], pad_id)
