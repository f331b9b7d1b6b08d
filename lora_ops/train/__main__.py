"""``python -m lora_ops.train …`` and ``accelerate launch [--num_processes N] -m lora_ops.train …``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
