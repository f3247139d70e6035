"""Tokenizers for ``sft-kernels train``: a byte-level one for the embedded model, or the model's own.

Byte tokenizer ids (259 in all, no download, no vocabulary file)::

    0 <pad>   1 </s> (eos)   2 <s> (bos)   3 + b  for byte b in 0..255

(ByT5's layout with ``extra_ids=0``, where id 2 is an ``<unk>`` that text never produces.)
``save_pretrained(dir)`` writes

- ``sft_byte_tokenizer.json``: what :func:`load_tokenizer` reads back into a
  :class:`ByteTokenizer` (it is the marker that a directory holds this tokenizer);
- ``tokenizer.json`` + ``tokenizer_config.json``: the same mapping as a ``tokenizers``
  byte-level BPE with no merges, so ``transformers.AutoTokenizer.from_pretrained(dir)``
  loads a fast tokenizer giving the same ids for any text (one difference: it reads the
  literal strings ``<pad>``, ``</s>``, ``<s>`` in text as the special tokens).
"""

from __future__ import annotations

import json
import os
from typing import List, Optional, Sequence

MARKER = "sft_byte_tokenizer.json"


class ByteTokenizer:
    """UTF-8 bytes as tokens, plus pad (0), eos (1) and bos (2)."""

    pad_token_id = 0
    eos_token_id = 1
    bos_token_id = 2
    offset = 3
    vocab_size = 256 + 3

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = False) -> List[int]:
        ids = [b + self.offset for b in text.encode("utf-8")]
        return [self.bos_token_id] + ids if add_special_tokens else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        out = bytearray()
        for i in ids:
            i = int(i)
            if i >= self.offset:
                out.append(i - self.offset)
            elif not skip_special_tokens:
                out += {0: b"<pad>", 1: b"</s>", 2: b"<s>"}[i]
        return out.decode("utf-8", errors="replace")

    def add_special_token(self, token: str) -> None:
        raise ValueError(f"--add_eot_token: the embedded model's byte tokenizer has no added tokens ({token!r} is "
                         "encoded as its bytes); use a --model_name_or_path with a Hugging Face tokenizer")

    def save_pretrained(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, MARKER), "w") as f:
            json.dump(dict(type="byte", vocab_size=self.vocab_size, pad_token_id=self.pad_token_id,
                           eos_token_id=self.eos_token_id, bos_token_id=self.bos_token_id, offset=self.offset), f,
                      indent=1)
        self.to_hf().save_pretrained(path)

    def to_hf(self):
        """The same ids as a ``transformers`` fast tokenizer (byte-level BPE without merges)."""
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        chars = _bytes_to_unicode()
        vocab = {"<pad>": self.pad_token_id, "</s>": self.eos_token_id, "<s>": self.bos_token_id}
        vocab.update({chars[b]: b + self.offset for b in range(256)})
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<pad>", "</s>", "<s>")])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _bytes_to_unicode():
    """GPT-2's byte -> printable character table, the alphabet of the ByteLevel pre-tokenizer."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(
        range(ord("\xae"), ord("\xff") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tokenizer_problem(tok) -> Optional[str]:
    """Why a Hugging Face tokenizer cannot tokenize step-1 text, or None. Transformers 5 gives a
    directory without tokenizer files an empty tokenizer (a GPT2Tokenizer of 1 token, or a
    LlamaTokenizer of 3) that encodes any text to nothing: training on it would see only eos."""
    probe = "Human: Hello, world! Assistant: 42"
    if not tok(probe, add_special_tokens=False)["input_ids"]:
        return (f"{type(tok).__name__} with {len(tok)} token(s) encodes text to no tokens: no tokenizer files "
                "(tokenizer.json, or tokenizer_config.json with its vocabulary) were found")
    if tok.eos_token is None:
        return f"{type(tok).__name__} has no eos token, which step 1 appends to every example"
    return None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


def dschat_model_name(path: str) -> str:
    """The name DeepSpeed-Chat's ``load_hf_tokenizer`` goes by: ``_name_or_path`` of the
    directory's config.json where it has one (written by transformers 4), else the path."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            return str(json.load(f).get("_name_or_path", path))
    except (OSError, ValueError):
        return path


class HFTokenizer:
    """A Hugging Face tokenizer behind the small interface the training code uses, padded as
    DeepSpeed-Chat's ``load_hf_tokenizer`` pads: for a model whose name (:func:`dschat_model_name`)
    contains ``llama``, a ``[PAD]`` token is added where the tokenizer has no pad token; for
    every other model the pad token is the eos token. (DeepSpeed-Chat also loads ``llama``
    models' tokenizers with ``LlamaTokenizer``; here the directory's own tokenizer class is used:
    under transformers 5, ``LlamaTokenizer`` rebuilds a tokenizer from the vocabulary, which can
    tokenize differently from the model's tokenizer.json.)"""

    dschat_padding = True  # build_model resizes the embeddings as DeepSpeed-Chat does

    def __init__(self, tok, name: str = ""):
        self.tok = tok
        if "llama" in name:
            if tok.pad_token is None:
                tok.add_special_tokens({"pad_token": "[PAD]"})
        else:
            tok.pad_token = tok.eos_token
        self.pad_token_id = tok.pad_token_id
        self.eos_token_id = tok.eos_token_id
        self.bos_token_id = tok.bos_token_id
        self.vocab_size = len(tok)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def name_or_path(self) -> str:
        return getattr(self.tok, "name_or_path", "")

    def get_vocab(self):
        return self.tok.get_vocab()

    def add_special_token(self, token: str) -> None:
        """Add ``token`` as an additional special token (DeepSpeed-Chat's ``--add_eot_token``)."""
        self.tok.add_special_tokens({"additional_special_tokens": [token]})
        self.vocab_size = len(self.tok)

    def encode(self, text: str, add_special_tokens: bool = False) -> List[int]:
        """``add_special_tokens=True``: the tokenizer's own special tokens (a bos where it adds
        one), as ``tokenizer(text)`` gives them to DeepSpeed-Chat."""
        return self.tok(text, add_special_tokens=add_special_tokens)["input_ids"]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save_pretrained(self, path: str) -> None:
        self.tok.save_pretrained(path)


def load_tokenizer(path: str | None):
    """The byte tokenizer for ``None`` or a directory holding ``sft_byte_tokenizer.json``,
    else ``AutoTokenizer.from_pretrained(path)`` (local files only) as :class:`HFTokenizer`;
    a ValueError where that tokenizer is unusable (:func:`tokenizer_problem`)."""
    if path is None or os.path.exists(os.path.join(path, MARKER)):
        return ByteTokenizer()
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:  # a Llama directory without files: a ValueError
        raise ValueError(f"--model_name_or_path {path}: no usable tokenizer: transformers could not load one "
                         f"({first_line(exc)})") from None
    problem = tokenizer_problem(tok)
    if problem:
        raise ValueError(f"--model_name_or_path {path}: no usable tokenizer: {problem}")
    return HFTokenizer(tok, dschat_model_name(path))
