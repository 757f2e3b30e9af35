"""python -m trainer.tracking replay FILE: sends a job's outbox file to its run (trainer/tracking/outbox.py)."""

import sys

from trainer.tracking.outbox import main

if __name__ == "__main__":
    sys.exit(main())
