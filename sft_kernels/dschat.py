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

The deepspeed launcher starts each rank as ``python -m sft_kernels.dschat --local_rank=N
main.py ...``: options before the script path are this launcher's, ``--local_rank`` among
them is handed on to the script (DeepSpeed-Chat's main.py reads it). Where ``dschat`` (the
package DeepSpeed-Chat's scripts import) is not installed, the nearest folder above the
script holding ``dschat/`` is put on ``sys.path`` (DeepSpeed-Chat's own layout; its README
installs it with ``pip install -e .`` instead).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import runpy
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


def install(window_size=None, backend: str = "auto") -> None:
    """Register the backend and make ``from_pretrained`` / ``from_config`` default to it
    (an explicit ``attn_implementation=`` of the caller wins). Idempotent."""
    from transformers import modeling_utils

    from .integrations.transformers import register

    register(window_size=window_size, backend=backend)
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
    if opts.local_rank is not None:
        script_args = script_args + [f"--local_rank={opts.local_rank}"]
    sys.argv = [script] + script_args
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # as `python main.py` would
    rank = os.environ.get("RANK", "0")
    if rank == "0":
        print(f"sft_kernels.dschat: running {script} with attn_implementation={ATTN_IMPLEMENTATION!r} "
              f"(window for models without their own: {opts.window_size}, backend {opts.backend})", flush=True)
    runpy.run_path(script, run_name="__main__")
    from .train.loop import exit_process

    exit_process(0)  # DeepSpeed-Chat's scripts leave the process group up; see exit_process for why


if __name__ == "__main__":
    sys.exit(main())
