"""``python -m sft_kernels.train [flags]`` (what the ``deepspeed`` launcher runs with ``-m``)."""

import sys

from . import main
from .loop import shutdown

rc = main()
if rc == 0:
    shutdown()
sys.exit(rc)
