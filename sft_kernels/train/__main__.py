"""``python -m sft_kernels.train [flags]`` (what the ``deepspeed`` launcher runs with ``-m``)."""

from . import main
from .loop import exit_process

exit_process(main())
