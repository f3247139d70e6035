"""Run DeepSpeed-Chat's own training script on this package's attention.

    python -m sft_kernels.dschat [--window_size W] [--backend B] PATH/TO/main.py [its flags]
    deepspeed --num_gpus 8 --module sft_kernels.dschat PATH/TO/main.py [its flags]

On every rank it registers ``attn_implementation="sft_sliding_window"`` with transformers
(:func:`sft_kernels.integrations.transformers.register`), makes every model the script loads
(``from_pretrained`` / ``from_config`` of any Hugging Face model class) use it unless the
script asks for another implementation itself, and then runs the script as ``__main__`` with
its own arguments, so DeepSpeed-Chat's data pipeline, DeepSpeed configuration, optimizer,
evaluation and saving run unchanged. Nothing of the script is copied or edited.

Window: a model with a sliding window of its own (``config.sliding_window``: Mistral,
Qwen2's sliding layers) keeps it; others get ``--window_size`` (default ``-1``: none, the
same function as the model's eager attention, so a pretrained model is fine-tuned on what
it learnt). ``--backend``: ``auto`` (Triton on CUDA tensors, PyTorch on CPU), ``triton``,
``torch``, ``cuda``.

Processes. The deepspeed launcher starts each rank as ``python -m sft_kernels.dschat
--local_rank=N main.py ...``: options before the script path are this launcher's,
``--local_rank`` among them is handed on to the script (DeepSpeed-Chat's main.py reads it).
Under ``torchrun`` (``LOCAL_RANK`` in the environment, no ``--local_rank``) the script gets
``--local_rank=$LOCAL_RANK``. Started alone (``python -m sft_kernels.dschat main.py ...``, no
launcher), it is a world of one: ``RANK=0``, ``WORLD_SIZE=1``, ``LOCAL_RANK=0``,
``MASTER_ADDR=127.0.0.1`` and a free ``MASTER_PORT`` are set and the script gets
``--local_rank=0``, so its own ``deepspeed.init_distributed()`` runs (DeepSpeed-Chat's main.py
initialises only under a launcher and otherwise fails at ``torch.distributed.get_rank()``).

Transformers 5. Of what DeepSpeed-Chat's ``dschat`` package and training scripts import from
transformers, one name is gone: ``transformers.modeling_utils.no_init_weights`` (now in
``transformers.initialization``); it is put back where the script imports it from
(:func:`install_transformers4_names`). The others (``AutoConfig``, ``AutoModel``,
``AutoModelForCausalLM``, ``AutoTokenizer``, ``SchedulerType``, ``default_data_collator``,
``get_scheduler``, ``set_seed``, ``transformers.integrations.deepspeed.HfDeepSpeedConfig``,
``transformers.models.llama.LlamaTokenizer``) still exist.

Refused inputs (one line, exit status 2, before anything is trained): a model directory whose
tokenizer cannot tokenize (transformers 5 loads an empty tokenizer from a directory without
tokenizer files; DeepSpeed-Chat would train on sequences of a lone eos and report ``ppl:
nan``), checked on every tokenizer the script loads; and ``--max_seq_len`` above the model's
``max_position_embeddings``, checked when the script parses its arguments (its
``--max_seq_len`` and ``--model_name_or_path``, defaults included).

Where ``dschat`` (the package DeepSpeed-Chat's scripts import) is not installed, the nearest
folder above the script holding ``dschat/`` is put on ``sys.path`` (DeepSpeed-Chat's own
layout; its README installs it with ``pip install -e .`` instead).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import os
import runpy
import socket
import sys
from typing import List, Optional, Tuple

from .integrations.transformers import ATTN_IMPLEMENTATION

USAGE = "python -m sft_kernels.dschat [--window_size W] [--backend B] PATH/TO/main.py [its flags]"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sft_kernels.dschat", usage=USAGE,
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--window_size", default="-1",
                   help="window for models without one of their own: W keys, 'sqrt', or -1 (none, default)")
    p.add_argument("--backend", default="auto", help="kernel backend: auto, triton, torch, cuda")
    p.add_argument("--local_rank", default=None, help="set by the deepspeed launcher; passed on to the script")
    return p


def split_argv(argv: List[str]) -> Tuple[List[str], str, List[str]]:
    """``(launcher options, script path, script arguments)``: the script is the first argument
    that is not an option of this launcher (or an option's value)."""
    takes_value = {"--window_size", "--backend", "--local_rank"}
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("-h", "--help"):
            i += 1
            continue
        if a.split("=", 1)[0] in takes_value:
            i += 1 if "=" in a else 2
            continue
        if a.startswith("-"):
            raise ValueError(f"sft_kernels.dschat: unknown option {a!r} before the script path; usage: {USAGE}")
        return argv[:i], a, argv[i + 1:]
    raise ValueError(f"sft_kernels.dschat: no script given; usage: {USAGE}")


def _add_dschat_to_path(script: str) -> Optional[str]:
    if importlib.util.find_spec("dschat") is not None:
        return None
    d = os.path.dirname(os.path.abspath(script))
    while True:
        if os.path.isfile(os.path.join(d, "dschat", "__init__.py")) or os.path.isdir(os.path.join(d, "dschat")):
            sys.path.insert(0, d)
            return d
        parent = os.path.dirname(d)
        if parent == d:
            return None
        d = parent


def _parse_window(value: str):
    from .train.model import parse_window_arg

    return parse_window_arg(value)


class InputError(ValueError):
    """An input the script must not train on (printed as one line, exit status 2)."""


def install_transformers4_names() -> List[str]:
    """Put back the transformers 4 names DeepSpeed-Chat imports that transformers 5 moved;
    returns the ones added (none under transformers 4)."""
    from transformers import modeling_utils

    added = []
    if not hasattr(modeling_utils, "no_init_weights"):
        from transformers.initialization import no_init_weights

        modeling_utils.no_init_weights = no_init_weights
        added.append("transformers.modeling_utils.no_init_weights")
    return added


def _check_tokenizer(tok, where) -> None:
    from .train.tokenizer import tokenizer_problem

    problem = tokenizer_problem(tok)
    if problem:
        raise InputError(f"no usable tokenizer in {where!r}: {problem}; the script would train on nothing but eos "
                         "tokens")


def _install_tokenizer_check() -> None:
    """Every tokenizer loaded by ``from_pretrained`` (``AutoTokenizer`` and the tokenizer classes,
    ``LlamaTokenizer`` among them) is checked with :func:`~sft_kernels.train.tokenizer.tokenizer_problem`."""
    from transformers import AutoTokenizer
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    for cls in (AutoTokenizer, PreTrainedTokenizerBase):
        if cls.__dict__.get("_sft_kernels_checked", False):
            continue
        original = cls.__dict__["from_pretrained"]
        func = original.__func__

        def wrapped(klass, path, *args, __func=func, **kwargs):
            try:
                tok = __func(klass, path, *args, **kwargs)
            except (OSError, ValueError, TypeError) as exc:  # a Llama directory without files: a ValueError
                from .train.tokenizer import first_line

                raise InputError(f"no usable tokenizer in {path!r}: transformers could not load one "
                                 f"({first_line(exc)})") from None
            if isinstance(tok, PreTrainedTokenizerBase):
                _check_tokenizer(tok, path)
            return tok

        functools.update_wrapper(wrapped, func)
        setattr(cls, "from_pretrained", classmethod(wrapped))
        setattr(cls, "_sft_kernels_checked", True)


def check_script_args(namespace) -> None:
    """``--max_seq_len`` of a parsed script command line against its model's
    ``max_position_embeddings`` (a local ``--model_name_or_path``; hub names are not looked up)."""
    max_seq_len = getattr(namespace, "max_seq_len", None)
    path = getattr(namespace, "model_name_or_path", None)
    if not isinstance(max_seq_len, int) or not isinstance(path, str) or not os.path.isdir(path):
        return
    from transformers import AutoConfig

    from .train.model import check_max_seq_len

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    try:
        check_max_seq_len(max_seq_len, getattr(config, "max_position_embeddings", None), path)
    except ValueError as exc:
        raise InputError(str(exc)) from None


@contextlib.contextmanager
def _checked_parse_args():
    """While active, what ``argparse.ArgumentParser.parse_args`` returns goes through
    :func:`check_script_args` (DeepSpeed-Chat's scripts parse their arguments first thing)."""
    original = argparse.ArgumentParser.parse_args

    def parse_args(self, *args, **kwargs):
        namespace = original(self, *args, **kwargs)
        check_script_args(namespace)
        return namespace

    argparse.ArgumentParser.parse_args = parse_args
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = original


def install(window_size=None, backend: str = "auto") -> None:
    """Register the backend and make ``from_pretrained`` / ``from_config`` default to it
    (an explicit ``attn_implementation=`` of the caller wins); put back the transformers 4 names
    DeepSpeed-Chat imports; check every tokenizer loaded. Idempotent."""
    from transformers import modeling_utils

    from .integrations.transformers import register

    register(window_size=window_size, backend=backend)
    install_transformers4_names()
    _install_tokenizer_check()
    cls = modeling_utils.PreTrainedModel
    if getattr(cls, "_sft_kernels_dschat", False):
        return
    for name in ("from_pretrained", "_from_config"):
        original = getattr(cls, name).__func__

        def wrapped(klass, *args, __original=original, **kwargs):
            if kwargs.get("attn_implementation") is None:
                kwargs["attn_implementation"] = ATTN_IMPLEMENTATION
            return __original(klass, *args, **kwargs)

        functools.update_wrapper(wrapped, original)
        setattr(cls, name, classmethod(wrapped))
    cls._sft_kernels_dschat = True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_setup(local_rank: Optional[str], script_args: List[str]) -> List[str]:
    """The script's arguments with the ``--local_rank`` it needs (see "Processes" above); sets the
    single-process environment when there is no launcher."""
    if any(a == "--local_rank" or a.startswith("--local_rank=") for a in script_args):
        return script_args
    if local_rank is None:
        local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is None:  # no launcher: a world of one
        for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        local_rank = "0"
    return script_args + [f"--local_rank={local_rank}"]


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        own, script, script_args = split_argv(argv)
    except ValueError as exc:
        if any(a in ("-h", "--help") for a in argv):
            _parser().print_help()
            return 0
        print(exc, file=sys.stderr)
        return 2
    opts = _parser().parse_args(own)
    if not os.path.isfile(script):
        print(f"sft_kernels.dschat: {script!r} is not a file; usage: {USAGE}", file=sys.stderr)
        return 2
    try:
        window = _parse_window(opts.window_size)
    except ValueError as exc:
        print(f"sft_kernels.dschat: {exc}", file=sys.stderr)
        return 2
    install(window_size=window, backend=opts.backend)
    _add_dschat_to_path(script)
    script_args = process_setup(opts.local_rank, script_args)
    sys.argv = [script] + script_args
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # as `python main.py` would
    rank = os.environ.get("RANK", "0")
    if rank == "0":
        print(f"sft_kernels.dschat: running {script} with attn_implementation={ATTN_IMPLEMENTATION!r} "
              f"(window for models without their own: {opts.window_size}, backend {opts.backend})", flush=True)
    from .train.loop import exit_process

    try:
        with _checked_parse_args():
            runpy.run_path(script, run_name="__main__")
    except InputError as exc:
        # every rank meets the same input and stops here: no barrier to wait at
        print(f"sft_kernels.dschat: error: {exc}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(2)
    exit_process(0)  # DeepSpeed-Chat's scripts leave the process group up; see exit_process for why


if __name__ == "__main__":
    sys.exit(main())
