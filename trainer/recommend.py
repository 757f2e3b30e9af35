"""`python -m trainer.recommend` is `python -m serving.recommend`: the command from before serving
became its own package. It imports serving only, so it still loads no TorchRec."""

import sys

from serving.recommend import main

if __name__ == "__main__":
    sys.exit(main())
