"""Step-1 SFT data: DeepSpeed-Chat's sources and splits, tokenisation, the cache, batches.

Sources (``--data_path`` / ``--sft_only_data_path``, several allowed):

=========================================  ==================================  ============================
source                                     train / eval                        text of a row
=========================================  ==================================  ============================
``local/jsonfile`` (DeepSpeed-Chat)        ``data/train.json`` /               ``" " + prompt + " " +
                                           ``data/eval.json`` under the         chosen``
                                           working directory, else under
                                           ``../../data`` (DeepSpeed-Chat's
                                           layout seen from step 1's folder)
a directory with ``train.json[l]``         ``train.json[l]`` / ``eval.json[l]``  as ``local/jsonfile``
(and ``eval.json[l]``)                     (or ``test.json[l]``)
a ``.json`` / ``.jsonl`` file              the file / held out by               as ``local/jsonfile``
                                           ``--eval_fraction``
a ``datasets.save_to_disk`` directory      its ``train`` / ``test`` (or         ``prompt + chosen`` (the
                                           ``eval``, ``validation``) split      Dahoas/rm-static form)
=========================================  ==================================  ============================

Rows hold ``prompt`` and ``chosen`` (``rejected`` is read by steps 2 and 3, ignored here),
or this package's ``prompt`` and ``response`` (text ``prompt + response`` from any source).
A row whose prompt or chosen is null is skipped, as DeepSpeed-Chat skips it. JSON files are
JSON lines or one JSON array of objects (what ``datasets.load_dataset("json")`` reads).

Splits, as DeepSpeed-Chat's ``dschat/utils/data/data_utils.py`` makes them. ``--data_split
a,b,c``: the rows of each ``--data_path`` dataset's train split are shuffled with
``np.random.RandomState(seed).shuffle(arange(n))`` and step 1 takes the first share of that
order (cumulative boundaries ``round(share * n)``, shifted so the last is ``n``); its eval split
likewise, with the same ``seed``, and every dataset with that same seed. Several ``--data_path``
datasets are concatenated and the result shuffled the same way (seed, length of the
concatenation); ``--sft_only_data_path`` datasets are used whole (split ``10,0,0``), appended
after them and the whole shuffled once more. The default shipped dataset is used whole. A
dataset without an eval split (one file; this package's form) holds out ``--eval_fraction`` of
its step-1 share.

Examples. The text is tokenized with the tokenizer's own special tokens (a bos where it adds
one), the eos id is appended, and the result is truncated to ``--max_seq_len``, as
DeepSpeed-Chat does (it appends the eos as text). Labels: ``--loss_on full`` (default,
DeepSpeed-Chat's objective) supervises every token (Hugging Face shifts labels by one, so
all but the first); ``--loss_on response`` puts -100 on the prompt tokens. Batches are
right-padded to their longest example (DeepSpeed-Chat pads every example to max_seq_len:
the same loss, since padding is masked, with less work); padding labels are -100.

Cache. The tokenized train and eval sets are written to ``--data_output_path`` under a
name hashed from everything they depend on (sources with each file's size and mtime, split,
seed, tokenizer, max_seq_len, objective, eval_fraction); a later run with the same key
loads them. Local rank 0 builds, the other ranks wait at a barrier and load.
Unlike DeepSpeed-Chat's cache, editing a data file invalidates it.

Batches, as DeepSpeed-Chat's step-1 ``main.py`` builds them under the launcher: a
``DistributedSampler`` over the data-parallel ranks (``shuffle=True``, its default seed 0,
padded by repetition to a multiple of the ranks) and batches of ``per_device_*_batch_size``
with the last partial batch kept, for training and for evaluation. ``main.py`` never calls
``set_epoch``, so every epoch sees the same order; ``--shuffle_each_epoch`` (this package's
option) seeds the train sampler with ``--seed`` and calls ``set_epoch(epoch)``. Either way
batch order is a pure function of ``(seed, epoch, rank)``, which is what lets a resumed run
skip exactly the micro-batches the checkpoint already consumed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

IGNORE_INDEX = -100
DSCHAT_LOCAL = "local/jsonfile"
_EVAL_SPLITS = ("eval", "test", "validation")


def default_data_path() -> str:
    """The shipped ``sft_kernels/data/sft_tiny.jsonl``."""
    from importlib.resources import files

    return str(files("sft_kernels").joinpath("data", "sft_tiny.jsonl"))


# ----------------------------------------------------------------------------- reading
def _read_json_rows(path: str) -> List[dict]:
    """JSON lines, or a single JSON array of objects."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--data_path {path}: not a JSON array ({exc})") from None
        bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
        if bad is not None:
            raise ValueError(f"--data_path {path}: element {bad} of the JSON array is not an object")
        return rows
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--data_path {path}:{n}: not JSON ({exc})") from None
        if not isinstance(row, dict):
            raise ValueError(f"--data_path {path}:{n}: need a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def load_jsonl(path: str) -> List[Dict[str, str]]:
    """The rows of a JSON(-lines) file, checked to hold a prompt and a chosen or response string."""
    if not os.path.exists(path):
        raise ValueError(f"--data_path: {path!r} does not exist")
    rows = _read_json_rows(path)
    if not rows:
        raise ValueError(f"--data_path {path}: no examples")
    for n, row in enumerate(rows, 1):
        _row_format(row, f"{path}: row {n}")
    return rows


def _row_format(row: dict, where: str) -> str:
    """'chosen' or 'response': which response field the row has (a ValueError if neither)."""
    if "chosen" in row:
        field = "chosen"
    elif "response" in row:
        field = "response"
    else:
        raise ValueError(f"--data_path {where}: need 'prompt' and 'chosen' (DeepSpeed-Chat) or 'prompt' and "
                         f"'response', got keys {sorted(row)}")
    for key in ("prompt", field):
        if key not in row:
            raise ValueError(f"--data_path {where}: missing {key!r}")
        if row[key] is not None and not isinstance(row[key], str):
            raise ValueError(f"--data_path {where}: {key!r} must be a string, got {type(row[key]).__name__}")
    return field


def _texts(row: dict, style: str, where: str) -> Optional[Tuple[str, str]]:
    """(prompt part, response part) of a row, or None when DeepSpeed-Chat would skip it."""
    field = _row_format(row, where)
    prompt, response = row["prompt"], row[field]
    if prompt is None or response is None:
        return None
    if field == "response":
        return prompt, response
    if style == "jsonfile":  # DeepSpeed-Chat's LocalJsonFileDataset
        return " " + prompt, " " + response
    return prompt, response  # its hub datasets (Dahoas/rm-static ...): prompt + chosen


@dataclass
class RawSource:
    """One dataset: its rows per split, how its rows become text, what identifies it."""

    name: str
    train: List[dict]
    eval: Optional[List[dict]]
    style: str  # "jsonfile" | "hub"
    files: List[str]


def _json_in(directory: str, stem: str) -> Optional[str]:
    for ext in (".json", ".jsonl"):
        p = os.path.join(directory, stem + ext)
        if os.path.isfile(p):
            return p
    return None


def _json_dir_source(name: str, directory: str) -> RawSource:
    train = _json_in(directory, "train")
    if train is None:
        raise ValueError(f"--data_path {name}: no train.json or train.jsonl in {directory}")
    ev = next((p for p in (_json_in(directory, s) for s in _EVAL_SPLITS) if p), None)
    return RawSource(name, load_jsonl(train), load_jsonl(ev) if ev else None, "jsonfile",
                     [train] + ([ev] if ev else []))


def _is_saved_dataset(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, f)) for f in (
        "dataset_dict.json", "dataset_info.json", "state.json"))


def _saved_dataset_source(name: str, path: str) -> RawSource:
    try:
        import datasets
    except ImportError:
        raise ValueError(f"--data_path {name}: a directory written by datasets' save_to_disk needs the datasets "
                         "package: pip install datasets") from None
    ds = datasets.load_from_disk(path)
    splits = dict(ds) if isinstance(ds, datasets.DatasetDict) else {"train": ds}
    if "train" not in splits:
        raise ValueError(f"--data_path {name}: the saved dataset has splits {sorted(splits)}, none named 'train'")
    ev_name = next((s for s in _EVAL_SPLITS if s in splits), None)
    files = sorted(os.path.join(root, f) for root, _, fs in os.walk(path) for f in fs)
    return RawSource(name, splits["train"].to_list(), splits[ev_name].to_list() if ev_name else None, "hub", files)


def resolve_source(name: str) -> RawSource:
    """Read one ``--data_path`` entry (see the module docstring for the forms)."""
    if name == DSCHAT_LOCAL:
        for d in ("data", os.path.join("..", "..", "data")):
            if os.path.isfile(os.path.join(d, "train.json")) and os.path.isfile(os.path.join(d, "eval.json")):
                src = _json_dir_source(name, d)
                src.files = [os.path.abspath(f) for f in src.files]
                return src
        raise ValueError(f"--data_path {DSCHAT_LOCAL}: needs data/train.json and data/eval.json under the working "
                         f"directory ({os.getcwd()}) or under ../../data (DeepSpeed-Chat's layout); or pass the "
                         "directory that holds them as --data_path")
    if os.path.isfile(name):
        return RawSource(name, load_jsonl(name), None, "jsonfile", [os.path.abspath(name)])
    if _is_saved_dataset(name):
        return _saved_dataset_source(name, name)
    if os.path.isdir(name):
        src = _json_dir_source(name, name)
        src.files = [os.path.abspath(f) for f in src.files]
        return src
    raise ValueError(f"--data_path {name!r}: no such file or directory. Hub datasets (such as Dahoas/rm-static) are "
                     "not downloaded here: save one with datasets' save_to_disk and pass that directory, or use "
                     f"{DSCHAT_LOCAL} / a JSON file of prompt + chosen rows")


def _fingerprint(paths: Sequence[str]) -> List[List]:
    out = []
    for p in paths:
        st = os.stat(p)
        out.append([os.path.abspath(p), st.st_size, st.st_mtime_ns])
    return out


# ----------------------------------------------------------------------------- splits
def shuffle_index(seed: int, n: int) -> List[int]:
    """DeepSpeed-Chat's ``get_shuffle_idx``: ``arange(n)`` (uint32) shuffled in place by
    ``np.random.RandomState(seed)``."""
    import numpy as np

    idx = np.arange(n, dtype=np.uint32 if n < np.iinfo(np.uint32).max - 1 else np.int64)
    np.random.RandomState(seed=seed).shuffle(idx)
    return idx.tolist()


def phase_one_indices(n: int, data_split: str, seed: int) -> List[int]:
    """The step-1 share of ``n`` rows under ``data_split`` ("a,b,c"), DeepSpeed-Chat's
    ``get_raw_dataset_split_index`` for phase 1: cumulative boundaries ``round(share * n)``,
    shifted so the last one is ``n``, over :func:`shuffle_index` ``(seed, n)``."""
    shares = [float(s) for s in data_split.split(",")]
    total = sum(shares)
    bounds = [0]
    for s in shares:
        bounds.append(bounds[-1] + int(round(s / total * n)))
    diff = bounds[-1] - n
    bounds = [0] + [b - diff for b in bounds[1:]]
    return shuffle_index(seed, n)[max(0, bounds[0]):max(0, bounds[1])]


def _shuffled(n: int, seed: int) -> List[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


# ----------------------------------------------------------------------------- examples
@dataclass
class Example:
    input_ids: List[int]
    labels: List[int]


def encode(row: Dict[str, str], tokenizer, max_seq_len: int, loss_on: str = "response",
           style: str = "jsonfile") -> Optional[Example]:
    """One row as ``tokens(prompt + response) + eos``, truncated to ``max_seq_len``; with
    ``loss_on="response"`` the prompt's tokens get label -100. None for a row DeepSpeed-Chat skips."""
    texts = _texts(row, style, "row")
    if texts is None:
        return None
    prompt, response = texts
    ids = tokenizer.encode(prompt + response, add_special_tokens=True) + [tokenizer.eos_token_id]
    ids = ids[:max_seq_len]
    if loss_on == "full":
        labels = list(ids)
    elif loss_on == "response":
        # the prompt's tokens; where a merge crosses the boundary, the common prefix
        p_ids = tokenizer.encode(prompt, add_special_tokens=True)
        n = 0
        while n < min(len(p_ids), len(ids)) and p_ids[n] == ids[n]:
            n += 1
        labels = [IGNORE_INDEX] * n + ids[n:]
    else:
        raise ValueError(f"--loss_on must be 'full' or 'response', got {loss_on!r}")
    return Example(ids, labels)


def _supervised(ex: Example) -> bool:
    """Whether any target survives the one-token shift."""
    return any(lab != IGNORE_INDEX for lab in ex.labels[1:])


def encode_all(rows: Sequence[Dict[str, str]], tokenizer, max_seq_len: int, loss_on: str = "response",
               style: str = "jsonfile") -> Tuple[List[Example], int]:
    """Encoded examples, and how many were dropped (skipped rows, or no supervised token
    within ``max_seq_len``)."""
    out, dropped = [], 0
    for row in rows:
        ex = encode(row, tokenizer, max_seq_len, loss_on, style)
        if ex is None or not _supervised(ex):
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
    order = _shuffled(len(examples), seed)
    n_eval = min(len(examples) - 1, max(1, round(eval_fraction * len(examples))))
    return [examples[i] for i in order[n_eval:]], [examples[i] for i in order[:n_eval]]


# ----------------------------------------------------------------------------- the datasets of a run
@dataclass
class Datasets:
    train: List[Example]
    eval: List[Example]
    dropped: int
    description: str
    cache_file: Optional[str]
    from_cache: bool
    key: str


def _spec(args) -> Tuple[List[Tuple[str, str, bool]], bool]:
    """[(name, split, sft_only)] of every source, and whether the default shipped dataset is used."""
    paths = list(args.data_path or [])
    sft_only = list(args.sft_only_data_path or [])
    default = not paths and not sft_only
    spec = [(p, args.data_split, False) for p in paths] + [(p, "10,0,0", True) for p in sft_only]
    if default:
        spec = [(default_data_path(), "10,0,0", True)]
    return spec, default


def _tokenizer_id(tokenizer) -> str:
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    h = hashlib.sha256(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode()).hexdigest()[:16]
    return f"{type(tokenizer).__name__}:{getattr(tokenizer, 'name_or_path', '')}:{len(tokenizer)}:{h}"


def _build(spec, tokenizer, args) -> Tuple[List[Example], List[Example], int, List[str]]:
    """DeepSpeed-Chat's ``create_prompt_dataset`` for phase 1 (see the module docstring)."""
    main_parts: List[Tuple[List[Example], List[Example]]] = []
    sft_parts: List[Tuple[List[Example], List[Example]]] = []
    dropped, parts = 0, []
    for name, data_split, sft_only in spec:
        src = resolve_source(name)
        tr_rows = [src.train[j] for j in phase_one_indices(len(src.train), data_split, args.seed)]
        tr, d1 = encode_all(tr_rows, tokenizer, args.max_seq_len, args.loss_on, src.style)
        if src.eval is not None:
            ev_rows = [src.eval[j] for j in phase_one_indices(len(src.eval), data_split, args.seed)]
            ev, d2 = encode_all(ev_rows, tokenizer, args.max_seq_len, args.loss_on, src.style)
        else:
            if len(tr) < 2:
                raise ValueError(f"--data_path {name}: {len(tr)} usable examples in its step-1 share "
                                 f"(--data_split {data_split}); need at least 2 to hold out an eval split")
            tr, ev = split(tr, args.eval_fraction, args.seed + 2)
            d2 = 0
        if not tr:
            raise ValueError(f"--data_path {name}: no training example in its step-1 share (--data_split "
                             f"{data_split}, {len(src.train)} rows)")
        dropped += d1 + d2
        (sft_parts if sft_only else main_parts).append((tr, ev))
        parts.append(f"{name} ({len(tr)} train / {len(ev)} eval)")

    def concat_shuffled(pieces: List[List[Example]]) -> List[Example]:
        whole = [e for p in pieces for e in p]
        return [whole[j] for j in shuffle_index(args.seed, len(whole))]

    train_all = [e for tr, _ in main_parts for e in tr]
    eval_all = [e for _, ev in main_parts for e in ev]
    if len(main_parts) > 1:  # blending
        train_all = concat_shuffled([tr for tr, _ in main_parts])
        eval_all = concat_shuffled([ev for _, ev in main_parts])
    if sft_parts:  # appended after the --data_path datasets, then one more shuffle
        train_all = concat_shuffled([train_all] + [tr for tr, _ in sft_parts])
        eval_all = concat_shuffled([eval_all] + [ev for _, ev in sft_parts])
    if not eval_all:
        raise ValueError("no evaluation example: the eval splits' step-1 shares are empty (check --data_split)")
    return train_all, eval_all, dropped, parts


def cache_key(args, tokenizer) -> Tuple[str, dict]:
    spec, _ = _spec(args)
    files = []
    for name, _split, _sft in spec:
        if name == DSCHAT_LOCAL or os.path.exists(name):
            try:
                files.append(_fingerprint(resolve_source_files(name)))
            except ValueError:
                files.append(None)
        else:
            files.append(None)
    key = {"spec": spec, "files": files, "seed": args.seed, "tokenizer": _tokenizer_id(tokenizer),
           "max_seq_len": args.max_seq_len, "loss_on": args.loss_on, "eval_fraction": args.eval_fraction,
           "format": 3}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return digest, key


def resolve_source_files(name: str) -> List[str]:
    """The files a source reads (for the cache key and the resume check), without reading rows."""
    if name == DSCHAT_LOCAL:
        for d in ("data", os.path.join("..", "..", "data")):
            if os.path.isfile(os.path.join(d, "train.json")) and os.path.isfile(os.path.join(d, "eval.json")):
                return [os.path.abspath(os.path.join(d, f)) for f in ("train.json", "eval.json")]
        raise ValueError(f"{DSCHAT_LOCAL}: not found")
    if os.path.isfile(name):
        return [os.path.abspath(name)]
    if os.path.isdir(name):
        return sorted(os.path.join(root, f) for root, _, fs in os.walk(name) for f in fs)
    raise ValueError(f"{name}: not found")


def _save(path: str, train: List[Example], ev: List[Example], dropped: int, parts: List[str]) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save({"train": [(torch.tensor(e.input_ids, dtype=torch.int64), torch.tensor(e.labels, dtype=torch.int64))
                          for e in train],
                "eval": [(torch.tensor(e.input_ids, dtype=torch.int64), torch.tensor(e.labels, dtype=torch.int64))
                         for e in ev],
                "dropped": dropped, "parts": parts}, tmp)
    os.replace(tmp, path)


def _load(path: str):
    blob = torch.load(path, weights_only=True)
    conv = lambda items: [Example(i.tolist(), l.tolist()) for i, l in items]  # noqa: E731
    return conv(blob["train"]), conv(blob["eval"]), int(blob["dropped"]), list(blob["parts"])


def prepare(args, tokenizer, local_rank: int = 0, barrier=None) -> Datasets:
    """The train and eval examples of a run, from ``--data_output_path``'s cache when it has them.

    ``barrier``: called between local rank 0's build and the other ranks' load (distributed
    runs); without one every rank builds (or loads) by itself.
    """
    spec, _ = _spec(args)
    digest, _ = cache_key(args, tokenizer)
    cache_dir = args.data_output_path
    cache_file = os.path.join(cache_dir, f"sft_kernels_step1_{digest[:32]}.pt") if cache_dir else None
    from_cache = cache_file is not None and os.path.isfile(cache_file)
    if cache_file is None:
        train, ev, dropped, parts = _build(spec, tokenizer, args)
    else:
        if local_rank <= 0 and not from_cache:
            os.makedirs(cache_dir, exist_ok=True)
            train, ev, dropped, parts = _build(spec, tokenizer, args)
            _save(cache_file, train, ev, dropped, parts)
        if barrier is not None:
            barrier()
        if local_rank > 0 or from_cache:
            if not os.path.isfile(cache_file):
                raise RuntimeError(f"--data_output_path {cache_dir}: local rank 0 wrote {cache_file}, which this rank "
                                   "cannot see; keep --data_output_path on storage every rank of a node shares")
            train, ev, dropped, parts = _load(cache_file)
    return Datasets(train, ev, dropped, "; ".join(parts), cache_file, from_cache, digest)


# ----------------------------------------------------------------------------- batches
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


def distributed_order(n: int, rank: int, world_size: int, seed: int = 0, epoch: int = 0) -> List[int]:
    """The indices ``torch.utils.data.DistributedSampler(range(n), world_size, rank, shuffle=True,
    seed=seed)`` yields after ``set_epoch(epoch)`` (drop_last=False: padded by repetition to a
    multiple of ``world_size``)."""
    from torch.utils.data.distributed import DistributedSampler

    sampler = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return list(sampler)


class TrainBatches:
    """Micro-batches for one data-parallel rank, epoch by epoch: DeepSpeed-Chat's train
    ``DataLoader(sampler=DistributedSampler(train), batch_size=B)`` (see the module docstring).

    ``shuffle_each_epoch=False`` (DeepSpeed-Chat's ``main.py``): the sampler's default seed 0 and
    no ``set_epoch``, the same order every epoch; ``True``: seed ``seed`` and ``set_epoch(epoch)``.
    The last batch of an epoch may be partial; an accumulation of ``grad_accum`` micro-batches
    may run on into the next epoch (DeepSpeed counts micro-batches across epochs).
    """

    def __init__(self, examples: List[Example], batch_size: int, grad_accum: int, seed: int, rank: int = 0,
                 world_size: int = 1, pad_id: int = 0, shuffle_each_epoch: bool = False):
        if not examples:
            raise ValueError("no training example")
        self.examples, self.batch_size, self.grad_accum = examples, batch_size, grad_accum
        self.seed, self.rank, self.world_size, self.pad_id = seed, rank, world_size, pad_id
        self.shuffle_each_epoch = shuffle_each_epoch
        per_rank = math.ceil(len(examples) / world_size)
        self.micro_per_epoch = math.ceil(per_rank / batch_size)

    @property
    def schedule_steps_per_epoch(self) -> int:
        """DeepSpeed-Chat's ``num_update_steps_per_epoch``: ceil(micro-batches / accumulation)."""
        return math.ceil(self.micro_per_epoch / self.grad_accum)

    def order(self, epoch: int) -> List[int]:
        if self.shuffle_each_epoch:
            return distributed_order(len(self.examples), self.rank, self.world_size, self.seed, epoch)
        return distributed_order(len(self.examples), self.rank, self.world_size)

    def epoch(self, epoch: int, start_micro: int = 0) -> Iterator[Dict[str, torch.Tensor]]:
        mine = self.order(epoch)
        for i in range(start_micro, self.micro_per_epoch):
            chunk = mine[i * self.batch_size:(i + 1) * self.batch_size]
            yield collate([self.examples[j] for j in chunk], self.pad_id)


def eval_batches(examples: List[Example], batch_size: int, rank: int, world_size: int, pad_id: int):
    """DeepSpeed-Chat's eval ``DataLoader(sampler=DistributedSampler(eval), batch_size=B)``."""
    mine = distributed_order(len(examples), rank, world_size)
    for i in range(0, len(mine), batch_size):
        yield collate([examples[j] for j in mine[i:i + batch_size]], pad_id)
