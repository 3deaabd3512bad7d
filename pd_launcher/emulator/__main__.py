"""`python -m pd_launcher.emulator serve MODEL [vllm serve flags]`."""
from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
