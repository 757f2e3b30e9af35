"""`python -m data.prepare ...` (and `spark-submit data/prepare/__main__.py ...`): see data/prepare/cli.py."""

import sys

from data.prepare.cli import main

if __name__ == "__main__":
    sys.exit(main())
