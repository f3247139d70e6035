"""``python -m sft_kernels.train [flags]`` (what the ``deepspeed`` launcher runs with ``-m``)."""

import sys

from . import main

sys.exit(main())
