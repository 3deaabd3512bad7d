"""`python -m pd_deploy <command>` (the same as the `pd-deploy` console script)."""
from __future__ import annotations

import sys

from pd_deploy.cli import main

if __name__ == "__main__":
    sys.exit(main())
