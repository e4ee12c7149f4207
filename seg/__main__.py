"""``python -m seg ...``: the same as ``crossmae seg ...``."""

import sys

from crossmae.cli import main

if __name__ == "__main__":
    sys.exit(main(["seg", *sys.argv[1:]]))
