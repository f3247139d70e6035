"""``sft-kernels train``: DeepSpeed-Chat step-1 supervised fine-tuning on this package's kernels.

    from sft_kernels.train import build_parser, main
    main(["--max_steps", "20", "--output_dir", "out"])   # -> 0

Modules: ``args`` (flags), ``data`` (JSON lines, labels, batches), ``tokenizer`` (byte-level
tokenizer), ``model`` (embedded config, attention backend, Hugging Face export),
``loop`` (DeepSpeed engine, evaluation, training, checkpoints), ``context_parallel``
(``--context_parallel_size``: batches through DeepSpeed's adapter, halo or ALST), ``tiny_dataset``
(regenerates the shipped ``data/sft_tiny.jsonl``). Importing this package does not import
deepspeed or transformers.
"""

from .args import build_parser
from .loop import main, run, train

__all__ = ["build_parser", "main", "run", "train"]
